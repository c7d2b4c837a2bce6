"""--config.mode=sample: secant samples from a run's EMA export (workdir/ema) as a PNG grid
and an .npz of the raw samples, with the config's steps and guidance. With several
processes each computes the same samples and process 0 writes them."""

import os

import jax
import numpy as np

from secant_jax import files
from secant_jax import generate
from secant_jax.train import loop
from secant_jax.train import recipe


def write_samples(config, workdir):
  network = recipe.make_network(config)
  task = recipe.make_task(config, network)
  variables = loop.load_into(network, os.path.join(workdir, 'ema'), jax.random.key(0))
  noise, labels = generate.fixed_noise_and_labels(
      config.seed, config.num_sample_images, network.image_shape, network.num_classes)
  samples = np.asarray(jax.jit(lambda v: generate.sample(
      network, task, v, config.secant, noise, labels))(variables))
  path = os.path.join(workdir, 'samples.png')
  if jax.process_index() == 0:
    files.write_npz(os.path.join(workdir, 'samples.npz'), samples=samples,
                    labels=np.asarray(labels))
    files.write_png((generate.image_grid(samples) * 255).round().astype(np.uint8), path)
  return path
