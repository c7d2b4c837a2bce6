"""A profiler trace of a few steps of a training run, as it trains.

The throughput benchmark's `--profile` (bench.throughput) traces the train step alone on
synthetic batches; a run's own steps also wait for its data pipeline, its host loop,
checkpoint saves and whatever else the loop does. With config.profile_steps = n > 0, the
loop traces n of its steps with jax.profiler, after the first config.profile_skip_steps
steps of the process (the first warm up; a resumed run skips as many after its restore).
Each step is a `jax.profiler.StepTraceAnnotation('train', step_num=k)`, so XProf's overview
page graphs the steps' times split into device compute, input and host time. Each process
writes its own trace, <workdir>/plugins/profile/<date>/<host>.xplane.pb, which
`tensorboard --logdir <workdir>` with XProf installed (`pip install xprof`) shows beside the
scalars.
"""

import os

import jax
from absl import logging

from secant_jax import files


class StepTrace:
  """Starts the trace before the step after `skip_steps` steps of this process and stops it
  once `num_steps` steps later have run on the device (or when the loop leaves the block).
  Use as a context manager; call `step(number, state)` around each step and `stepped(state)`
  after it. Traces nothing when num_steps is 0."""

  def __init__(self, logdir, skip_steps, num_steps):
    for name, value in (('profile_skip_steps', skip_steps), ('profile_steps', num_steps)):
      if not isinstance(value, int) or value < 0:
        raise ValueError(f'config.{name} must be a whole number of steps, 0 or more, got '
                         f'{value!r}; e.g. --config.profile_steps=5 to trace five steps '
                         'after the first config.profile_skip_steps.')
    self._logdir, self._skip, self._count = str(logdir), skip_steps, num_steps
    self._done = 0  # steps this process has run
    self._tracing = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stop()

  def step(self, number, state):
    """The annotation of training step `number` (the state's step after it), which starts
    from `state`. Before the window's first step, waits for the steps before it (so that
    the trace holds the window's steps and no other) and starts the trace."""
    if self._count and self._done == self._skip:
      jax.block_until_ready(state)
      try:
        # made first: a trace that fails to export leaves JAX's profiler started, and
        # unable to start again, for the rest of the process
        files.make_directory(os.path.join(self._logdir, 'plugins', 'profile'))
        jax.profiler.start_trace(self._logdir)  # RuntimeError: another trace is running
        self._tracing = True
        logging.info('Tracing %d steps from step %d into %s', self._count, number,
                     self._logdir)
      except (OSError, RuntimeError) as e:
        _warn(self._logdir, e)
    return jax.profiler.StepTraceAnnotation('train', step_num=number)

  def stepped(self, state):
    """After each step: when it was the window's last, waits for it and stops the trace."""
    self._done += 1
    if self._tracing and self._done == self._skip + self._count:
      jax.block_until_ready(state)
      self._stop()

  def _stop(self):
    """Ends the trace and writes it. A trace that cannot be started or written is a
    warning: the run it would describe goes on."""
    if self._tracing:
      self._tracing = False
      try:
        jax.profiler.stop_trace()
      except RuntimeError as e:
        _warn(self._logdir, e)


def _warn(logdir, error):
  logging.warning('The profiler trace could not be written under %s (%s); training goes on '
                  'without it.', logdir, error)
