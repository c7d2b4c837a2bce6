"""Where scalars, images and the step rate go.

CLU's default writer (TensorBoard events, plus log lines) and its `ReportProgress`, as
everywhere this package runs with its requirements installed. CLU's writers import
TensorFlow; accelerator images that ship jax and torch but no TensorFlow (and no CLU)
still run the trainer and every mode: there the scalars go to the log and to
`<logdir>/scalars.jsonl` (one {"step", **scalars} object per line), the images to
`<logdir>/images/<name>_<step>.png`, and the step rate to the log.
"""

import importlib
import json
import os
import time

import numpy as np
from absl import logging

from secant_jax import files


def _clu(module):
  """clu.<module>, or None (with a warning) where CLU or TensorFlow is not installed."""
  try:
    return importlib.import_module(f'clu.{module}')
  except ImportError as e:
    logging.warning('clu.%s is unavailable (%s): writing scalars to scalars.jsonl and '
                    'images to PNG files instead of TensorBoard events; install clu, '
                    'tensorflow-cpu and tensorboard for TensorBoard.', module, e)
    return None


class FileWriter:
  """The part of CLU's MetricWriter the package uses, as JSON lines and PNG files."""

  def __init__(self, logdir, just_logging=False):
    self.logdir = None if just_logging else logdir
    if self.logdir:
      files.make_directory(os.path.join(self.logdir, 'images'))

  def write_scalars(self, step, scalars):
    values = {k: float(v) for k, v in scalars.items()}
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in values.items()))
    if self.logdir:
      files.append_text(os.path.join(self.logdir, 'scalars.jsonl'),
                        json.dumps({'step': int(step), **values}) + '\n')

  def write_images(self, step, images):
    """images: {name: [N, H, W, C] uint8 or float in [0, 1]}; the first of each is saved."""
    for name, batch in images.items():
      image = np.asarray(batch)[0]
      if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
      logging.info('[%d] image %s %s', step, name, image.shape)
      if self.logdir:
        files.write_png(image, os.path.join(self.logdir, 'images',
                                            f"{name.replace('/', '_')}_{step}.png"))

  def flush(self):
    """Nothing to do: each write opens, appends to and closes its file."""

  def close(self):
    """Nothing to do: no file stays open between writes."""


class StepRate:
  """Logs steps/s and the estimated time left every `every` steps (ReportProgress's role)."""

  def __init__(self, num_train_steps, every=100):
    self.num_train_steps, self.every = num_train_steps, every
    self.last = None

  def __call__(self, step):
    now = time.perf_counter()
    if self.last is None:
      self.last = (step, now)
    elif step % self.every == 0 and step > self.last[0]:
      rate = (step - self.last[0]) / (now - self.last[1])
      logging.info('step %d: %.3g steps/s, %.0f s left', step, rate,
                   (self.num_train_steps - step) / rate)
      self.last = (step, now)


def create(logdir, just_logging=False):
  """A metric writer for `logdir` (only log lines where just_logging, i.e. process > 0)."""
  clu_writers = _clu('metric_writers')
  if clu_writers is None:
    return FileWriter(logdir, just_logging)
  return clu_writers.create_default_writer(logdir, just_logging=just_logging)


def progress(num_train_steps, writer):
  """Called with each step number; reports steps/s and ETA."""
  actions = _clu('periodic_actions')
  if actions is None:
    return StepRate(num_train_steps)
  return actions.ReportProgress(num_train_steps=num_train_steps, writer=writer)
