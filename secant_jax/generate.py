"""Sampling a trained secant network as the config says: embedded guidance (distilled
models take w as an input), classic two-pass CFG (models trained with label dropout), or
plain conditional; and tiling images into a grid."""

import jax
import jax.numpy as jnp
import numpy as np

from secant_jax import guidance
from secant_jax import sampling
from secant_jax.evaluation import reference_error
from secant_jax.train import step as step_lib


def sampler_secant(network, task, variables, secant_config):
  """(secant_fn(x, t, s, y, w), w) for sampling with the config's guidance (w None: the
  plain conditional secant, which classic CFG at scale 1 equals)."""
  secant_fn = step_lib.student_secant(task, network.apply,
                                      network.inference_variables(variables), None)
  if task.guidance_range is not None:
    return secant_fn, secant_config.sample_guidance_scale
  if task.label_dropout > 0 and secant_config.sample_cfg_scale != 1.0:  # CFG at 1: v_y
    conditional = lambda x, t, s, y: secant_fn(x, t, s, y, None)
    return guidance.classifier_free(conditional, task.null_class), secant_config.sample_cfg_scale
  return secant_fn, None


def guidance_interval(secant_config):
  """config.secant.guidance_interval as the sampler takes it: (a, b), a <= b, the unit times
  [a, b) of the steps it guides (a reversed pair would guide none)."""
  interval = tuple(secant_config.guidance_interval)
  guidance.check_ordered_pair(interval, 'guidance_interval (config.secant.guidance_interval: '
                              'the unit times [a, b) of the guided steps)', names=('a', 'b'))
  return interval


def secant_steps(network, task, variables, secant_config, labels, num_steps=None):
  """The sampling.Steps of the secant sampler in `num_steps` (default: the task's) steps,
  guided as the config says, for `labels` [B]."""
  secant_fn, scale = sampler_secant(network, task, variables, secant_config)
  w = None if scale is None else jnp.full(labels.shape, scale, jnp.float32)
  return sampling.secant_steps(secant_fn, task.path, num_steps or task.num_steps, labels, w,
                               guidance_interval(secant_config))


def sample(network, task, variables, secant_config, noise, labels, num_steps=None):
  """Secant samples [B, H, W, C] from `noise` in `num_steps` (default: the task's) steps."""
  return sampling.run_steps(
      secant_steps(network, task, variables, secant_config, labels, num_steps), noise,
      task.path)


def model_sample(network, task, variables, config, noise, labels):
  """A run's samples from `noise` [B, ...] for `labels` [B] (traceable): a secant model's
  in its task's steps with config.secant's guidance (`sample`); a teacher's (variant
  'diffusion', trained on f(x, t, t) only, whose one step would show the class mean) by
  solving its conditional ODE with Heun at config.teacher_sample_nfe evaluations."""
  if task.variant != 'diffusion':
    return sample(network, task, variables, config.secant, noise, labels)
  tangent = reference_error.teacher_tangent(network, variables, task, labels, None)
  return sampling.solve_with_nfe(tangent, noise, task.path, config.teacher_sample_nfe, 'heun')


def image_grid(images, columns=None):
  """[N, H, W, C] in [−1, 1] → one [rows·H, columns·W, C] float image in [0, 1]."""
  images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  padded = np.zeros((rows * columns, h, w, c), np.float32)
  padded[:n] = images
  return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(
      rows * h, columns * w, c)


def fixed_noise_and_labels(seed, count, image_shape, num_classes):
  """`count` noises [count, *image_shape] from key(seed), and labels that cycle through
  0 … num_classes − 1 (all 0 for an unconditional network, num_classes 0), so that every
  class is sampled as evenly as `count` allows."""
  key = jax.random.key(seed)
  noise = jax.random.normal(key, (count, *image_shape))
  return noise, jnp.arange(count, dtype=jnp.int32) % max(num_classes, 1)
