"""FID and Inception Score of a secant model's samples, all in JAX, batched over the mesh.

Per batch: noise and uniform labels from the seed → the config's sampler (steps,
embedded or classic CFG, guidance interval) → SD-VAE decode when the data are latents →
uint8 quantisation → Inception pool features and logits → streamed statistics. Reference
statistics come from config.fid.reference (an .npz with mu/sigma, e.g. ADM's ImageNet-256
or EDM's cifar10-32x32.npz) or, for pixel datasets, are computed once from the training
images and cached as workdir/fid_reference.npz. Grey images are repeated to RGB.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from secant_jax import generate
from secant_jax.convert import inception as convert_inception
from secant_jax.convert import vae as convert_vae
from secant_jax.evaluation import fid
from secant_jax.models import inception
from secant_jax.models import vae
from secant_jax.train import parallel

REFERENCE_FILE = 'fid_reference.npz'


def _features_fn(mesh, decoder_variables):
  """images or latents [B, ...] (batch-sharded) → {'2048', 'logits_unbiased'} float32."""
  net = inception.InceptionV3()
  decoder = vae.VAEDecoder() if decoder_variables is not None else None

  def features(inception_variables, x):
    if decoder is not None:
      x = decoder.apply(decoder_variables, x)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    out = net.apply(inception_variables, fid.to_uint8(x))
    return {'2048': out['2048'], 'logits_unbiased': out['logits_unbiased']}

  return jax.jit(features, out_shardings=parallel.batch_sharding(mesh))


class SampleQuality:
  """Loads Inception (and the VAE for latent data) once; call it with a model's variables."""

  def __init__(self, config, workdir, mesh):
    if not config.fid.inception:
      raise ValueError('FID needs the Inception weights: set config.fid.inception to '
                       f'{convert_inception.WEIGHTS_URL.rsplit("/", 1)[1]} (download '
                       f'{convert_inception.WEIGHTS_URL}) or its conversion.')
    self.config, self.mesh = config, mesh
    replicated = parallel.replicated(mesh)
    self.inception_variables = jax.device_put(convert_inception.load(config.fid.inception),
                                              replicated)
    decoder_variables = None
    if config.data.name == 'imagenet_latents':
      if not config.fid.vae:
        raise ValueError('FID on latents needs the SD-VAE decoder: set config.fid.vae to '
                         f'the weights ({convert_vae.WEIGHTS_URL}) or their conversion.')
      decoder_variables = jax.device_put(convert_vae.load(config.fid.vae), replicated)
    self._features = _features_fn(mesh, decoder_variables)
    self.reference = self._reference(workdir)

  def _reference(self, workdir):
    if self.config.fid.reference:
      return fid.load_reference(self.config.fid.reference)
    cached = os.path.join(workdir, REFERENCE_FILE)
    if os.path.exists(cached):
      return fid.load_reference(cached)
    if self.config.data.name == 'imagenet_latents':
      raise ValueError('ImageNet FID needs reference statistics: set config.fid.reference '
                       'to ADM\'s VIRTUAL_imagenet256_labeled.npz (its mu/sigma).')
    from secant_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    source = pipeline.source(self.config.data)
    stats = fid.FeatureStats(2048)
    batch = self.config.fid.batch_size
    local = batch // jax.process_count()
    offset = jax.process_index() * local
    sharding = parallel.batch_sharding(self.mesh)
    total = min(len(source), self.config.fid.num_reference_images or len(source))
    for start in range(0, total, batch):  # record start + r is global row r
      count = min(batch, total - start)
      images = np.stack([source[start + (offset + j) % count]['x'] for j in range(local)])
      images = jax.make_array_from_process_local_data(sharding, images)
      stats.add(self._features(self.inception_variables, images)['2048'], count)
    mu, sigma = stats.mu_sigma()
    if jax.process_index() == 0:
      np.savez(cached, mu=mu, sigma=sigma)
    return mu, sigma

  def __call__(self, network, task, variables, num_samples, seed):
    """{'fid', 'inception_score', 'inception_score_std'} of `num_samples` samples."""
    batch = self.config.fid.batch_size
    parallel.check_batch_size(batch, self.mesh)
    sharding = parallel.batch_sharding(self.mesh)
    num_classes = self.config.model.get('num_classes', 0)

    def draw(v, key):
      k_noise, k_label = jax.random.split(key)
      noise = jax.random.normal(k_noise, (batch, *network.image_shape))
      labels = jax.random.randint(k_label, (batch,), 0, max(num_classes, 1))
      return generate.sample(network, task, v, self.config.secant, noise, labels)

    sample = jax.jit(draw, out_shardings=sharding)
    stats, logits = fid.FeatureStats(2048), []
    num_batches = -(-num_samples // batch)
    for i in range(num_batches):
      out = self._features(self.inception_variables,
                           sample(variables, jax.random.fold_in(jax.random.key(seed), i)))
      keep = min(batch, num_samples - i * batch)
      stats.add(out['2048'], keep)
      logits.append(np.asarray(multihost_utils.process_allgather(out['logits_unbiased'],
                                                                 tiled=True))[:keep])
      if (i + 1) % max(1, num_batches // 10) == 0 or i + 1 == num_batches:
        logging.info('FID samples: %d / %d', min((i + 1) * batch, num_samples), num_samples)
    mu, sigma = stats.mu_sigma()
    score, score_std = fid.inception_score(np.concatenate(logits))
    return {'fid': fid.frechet_distance(mu, sigma, *self.reference),
            'inception_score': score, 'inception_score_std': score_std}
