"""Feature networks for Fréchet distances: the parameter of the FID code.

A FeatureNetwork maps uint8 images (already quantised as the official evaluation does)
to features whose statistics `evaluation.fid` compares. FID is the Fréchet distance in
torch-fidelity's Inception-v3 pool features (and gives an Inception Score from its
logits); on Fashion-MNIST the penultimate layer of our own classifier gives FD-FMNIST
(`evaluation.fmnist_features`). config.fid.features picks one; its result key is the
network's `metric`.
"""

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from secant_jax.convert import inception as convert_inception
from secant_jax.models import inception as inception_model

NETWORKS = ('inception', 'fmnist')


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  metric: str  # the result key of the Fréchet distance: 'fid', 'fd_fmnist'
  dim: int
  # (variables, uint8 [B, H, W, C]) → {'features': [B, dim]} (+ 'logits' for an IS)
  apply: Callable[[Any, Any], dict]
  variables: Any


def _inception_apply(variables, images):
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  out = inception_model.InceptionV3().apply(variables, images)
  return {'features': out['2048'], 'logits': out['logits_unbiased']}


def inception(weights):
  """torch-fidelity's FID Inception-v3 from its .pth or its conversion."""
  if not weights:
    raise ValueError('FID needs the Inception weights: set config.fid.inception to '
                     f'{convert_inception.WEIGHTS_URL.rsplit("/", 1)[1]} (download '
                     f'{convert_inception.WEIGHTS_URL}) or its conversion.')
  return FeatureNetwork('fid', 2048, _inception_apply, convert_inception.load(weights))


def configured(fid_config):
  """Whether config.fid names the weights of its feature network."""
  return bool(fid_config.get(fid_config.features))


def from_config(fid_config):
  """The feature network config.fid.features names, with its weights loaded."""
  if fid_config.features == 'inception':
    return inception(fid_config.inception)
  if fid_config.features == 'fmnist':
    from secant_jax.evaluation import fmnist_features  # pylint: disable=import-outside-toplevel
    return fmnist_features.feature_network(fid_config.fmnist)
  raise ValueError(f'Unknown feature network {fid_config.features!r}: expected one of '
                   f'{NETWORKS}; set config.fid.features.')
