"""The teacher's reference solutions kept on disk (config.compare.references), so that a
later comparison of the same teacher on the same noise, e.g. of newly trained secant
models, reads them instead of solving again. The adaptive solve is most of a comparison's
cost: Tsit5 at rtol 1e-6 takes some 25 to 50 steps of 6 network evaluations per sample,
against 15 evaluations for a secant model at 1, 2, 4 and 8 steps.

One file per batch, `reference.<start>.npz` with the whole batch, written by process 0
and read by all (in a multi-host run the directory must be shared, as the workdir is), each
stamped with what the solution depends on (the teacher, guidance scale, seed, number of
samples, batch size, whether it was solved in float32 and the precision of float32
products); a file stamped otherwise is an error that names what differs.
"""

import json
import os

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from secant_jax import files
from secant_jax.evaluation import progress


class References:
  """Reference solutions per batch under `directory`, stamped with `fingerprint` (a
  JSON-serialisable dict)."""

  def __init__(self, directory, fingerprint):
    self.directory = files.make_directory(directory)
    self.fingerprint = json.dumps(fingerprint, sort_keys=True)

  def _path(self, start):
    return os.path.join(self.directory, f'reference.{start}.npz')

  def read(self, start):
    """The batch starting at sample `start` (numpy, the whole batch), or None when it is not
    kept; process 0 looks, so that every process solves or reads the same batches."""
    kept = np.asarray(epath.Path(self._path(start)).exists())
    if jax.process_count() > 1:
      kept = multihost_utils.broadcast_one_to_all(kept)
    if not kept:
      return None
    return progress.read_stamped(
        self._path(start), self.fingerprint, 'the reference solutions of another '
        'comparison', 'pass another --config.compare.references, or delete its '
        'reference.* files to solve them again')['x']

  def write(self, start, x):
    """Keeps the batch starting at sample `start` (`x`, a global array)."""
    x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if jax.process_index() == 0:
      progress.write_stamped(self._path(start), self.fingerprint, {'x': x})
