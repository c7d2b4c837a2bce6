"""A run's samples as the images they stand for: on pixel data (digits, Fashion-MNIST,
CIFAR-10) the samples themselves; on ImageNet's latents the SD-VAE decoder's images of
them (config.fid.vae, the weights FID decodes with), as the official `sample_ddp.py`
decodes before it saves. Sample grids of training, sample mode and compare mode go
through here, and FID's features (`evaluation.sample_quality`) through `decode`."""

import jax
import numpy as np
from absl import logging
from flax import struct

from secant_jax.convert import vae as convert_vae
from secant_jax.models import vae

LATENT_DATA = ('imagenet_latents',)


@struct.dataclass
class Decoder:
  """The SD-VAE decoder's `variables` and the `latent_scale` of the latents it decodes
  (config.data.latent_scale, by which the training data multiplied the VAE's raw latents:
  0.18215 for SD-VAE's, another VAE's scaling factor for latents that `data.encode` made
  with it). A pytree whose scale is static: device_put and jit take it whole."""
  variables: dict
  latent_scale: float = struct.field(pytree_node=False)


def load_decoder(config, needed_by):
  """The Decoder of config's latents (config.fid.vae's weights) where config.data holds
  latents, None for pixel data. Latents without config.fid.vae are an error that says
  `needed_by` needs it."""
  if config.data.name not in LATENT_DATA:
    return None
  if not config.fid.vae:
    raise ValueError(f'{needed_by} on latent data ({config.data.name!r}) needs the SD-VAE '
                     f'decoder: set config.fid.vae to its weights ({convert_vae.WEIGHTS_URL}) '
                     'or their conversion (python -m secant_jax.convert.vae).')
  return Decoder(convert_vae.load(config.fid.vae),
                 float(config.data.get('latent_scale', vae.SD_VAE_SCALE)))


def images_unavailable(config, output):
  """Whether images cannot be made of config's samples (latent data without
  config.fid.vae); where so, logs a warning that `output` is not written and what to set."""
  missing = config.data.name in LATENT_DATA and not config.fid.vae
  if missing:
    logging.warning('%s is not written: the samples are latents (%r), and their images need '
                    'the SD-VAE decoder; set config.fid.vae to its weights (%s) or their '
                    'conversion.', output, config.data.name, convert_vae.WEIGHTS_URL)
  return missing


def decode(decoder, samples):
  """Samples [B, h, w, C] → images [B, H, W, c] in about [−1, 1]: the samples where
  `decoder` (a Decoder) is None, else the SD-VAE's decoding of them ÷ its latent_scale
  (traceable)."""
  if decoder is None:
    return samples
  return vae.VAEDecoder(latent_scale=decoder.latent_scale).apply(decoder.variables, samples)


_decode_jitted = jax.jit(decode)


def as_images(decoder, samples, chunk=8):
  """`decode` of host samples [N, ...] (numpy out), `chunk` at a time on the default device
  (the last chunk padded to the same shape, so one compile serves every call; at 256 × 256
  each of the decoder's 128-channel activations of 8 images takes 256 MiB). The decoder
  is put on that device first; a caller that decodes again should put it there once."""
  samples = np.asarray(samples)
  if decoder is None:
    return samples
  decoder = jax.device_put(decoder)
  images = []
  for start in range(0, len(samples), chunk):
    part = samples[start:start + chunk]
    padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]),
                                            part.dtype)])
    images.append(np.asarray(_decode_jitted(decoder, padded))[:len(part)])
  return np.concatenate(images)
