"""--config.mode=sample: samples from a run's EMA export (workdir/ema), a secant model's with
the config's steps and guidance, a teacher's by Heun at config.teacher_sample_nfe
(`generate.model_sample`), as samples.npz (`samples`, the sampler's outputs, latents on
ImageNet; `labels`; `images`, the uint8 images they stand for, quantised as the official
`sample_ddp.py` saves them) and a PNG grid of the images. On latent data the images are
the SD-VAE decoder's (config.fid.vae); without it only `samples` and `labels` are written.
With several processes each computes the same samples and process 0 writes them. A config
of another model than the run's config.json is refused (`loop.check_trained_model`)."""

import os

import jax
import numpy as np

from secant_jax import files
from secant_jax import generate
from secant_jax import sample_images
from secant_jax.evaluation import fid
from secant_jax.train import loop
from secant_jax.train import recipe


def write_samples(config, workdir):
  """Returns the grid's path; None where no images can be made of the samples (latents
  without config.fid.vae: `sample_images.images_unavailable`)."""
  loop.check_trained_model(config, workdir, 'Sample mode')
  with_images = not sample_images.images_unavailable(config,
                                                     "samples.png (and samples.npz's images)")
  decoder = sample_images.load_decoder(config, 'Sample mode') if with_images else None
  network = recipe.make_network(config)
  task = recipe.make_task(config, network)
  variables = loop.load_into(network, os.path.join(workdir, 'ema'), jax.random.key(0))
  noise, labels = generate.fixed_noise_and_labels(
      config.seed, config.num_sample_images, network.image_shape, network.num_classes)
  samples = np.asarray(jax.jit(lambda v: generate.model_sample(
      network, task, v, config, noise, labels))(variables))
  arrays = {'samples': samples, 'labels': np.asarray(labels)}
  path = os.path.join(workdir, 'samples.png') if with_images else None
  if with_images:
    images = sample_images.as_images(decoder, samples)
    arrays['images'] = np.asarray(fid.to_uint8(images))
  if jax.process_index() == 0:
    files.write_npz(os.path.join(workdir, 'samples.npz'), **arrays)
    if path:
      files.write_png((generate.image_grid(images) * 255).round().astype(np.uint8), path)
  return path
