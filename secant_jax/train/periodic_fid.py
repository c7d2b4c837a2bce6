"""The FID (FD-<data> with a domain feature network) of a training run's EMA model every
config.eval_every steps, on config.fid.train_num_samples samples, which SIGTERM or Ctrl-C
cuts short and the resumed run finishes.

At scale the FID's sampling takes minutes, longer than a preemption's notice. A stop
requested during the FID at step S (the run's stop_requests.StopRequests, answered after
the batch under way, at the same batch on every process) saves its running sums in
<workdir>/fid_progress, stamped with S (evaluation.progress.Progress); the loop then saves
the checkpoint at S and stops. The run resumed from that checkpoint finishes the FID at S
from the saved batches before its next step, so that its FID curve has every point, each
the value an unstopped run writes. Saves of another step (a checkpoint at S that never
committed: the run resumes before S) are deleted then, unused.
"""

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from secant_jax import files
from secant_jax import stop_requests
from secant_jax.evaluation import progress as progress_lib
from secant_jax.evaluation import sample_quality

DIRECTORY = 'fid_progress'


class PeriodicFid:
  """The feature network, decoder and reference loaded once (SampleQuality); called with
  the EMA variables at a step."""

  def __init__(self, config, workdir, mesh):
    self._config = config
    self._quality = sample_quality.SampleQuality(config, workdir, mesh)
    self.directory = files.make_directory(os.path.join(workdir, DIRECTORY))

  def _progress(self, step, stop):
    """The FID at `step`'s Progress: saved only where `stop` asks (and after its last
    batch)."""
    stamp = {'step': step, **sample_quality.samples_stamp(self._config)}
    return progress_lib.Progress(self.directory, stamp, math.inf, stop)

  def __call__(self, network, task, variables, step, stop):
    """{metric: value} of the samples of the EMA `variables` at `step` (resumed from the
    saves a stop left), or None where `stop` cut it short, its progress saved."""
    progress = self._progress(step, stop)
    try:
      scores = self._quality(network, task, variables, self._config.fid.train_num_samples,
                             self._config.seed + 2, progress)
    except stop_requests.Stopped:
      return None
    progress.clear()
    return scores

  def left_unfinished(self, step):
    """Whether a stopped run left the FID at `step` unfinished (some process has saves of
    it); this process's saves of any other step are deleted."""
    progress = self._progress(step, stop=None)
    cut = (progress.latest_stamp() or {}).get('step') == step
    if jax.process_count() > 1:
      cut = bool(np.max(multihost_utils.process_allgather(np.asarray(cut))))
    if not cut:
      progress.clear()
    return cut
