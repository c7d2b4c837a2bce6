"""A long evaluation's running sums kept on disk, so that a preempted run resumes after its
last saved batch instead of starting over (the comparison table's adaptive reference
solves take hours at ImageNet scale, evaluate mode's FID over 50,000 samples long enough to
meet a preemption).

Each process saves its own arrays (feature sums stay per process until the end) as
`progress.process_<i>.<done>.npz` in its directory (compare mode's workdir, evaluate mode's
workdir/eval), `done` being the samples processed so far, each written whole or not at all
(files.write_npz) and the previous one kept, so a preemption during a write, or between two
processes' writes, leaves a state every process has. A resumed run loads the largest `done`
that all processes saved. Saves are taken every `save_seconds` (timed on process 0, so
that all processes save after the same batch) and after the last batch, and, where a
stop_requests.StopRequests is given, after the batch at which SIGTERM or Ctrl-C stops the
run (at the same batch on every process), which then raises stop_requests.Stopped.

Every file records a fingerprint, a JSON object of what is being evaluated; loading a
file whose fingerprint differs is an error that names the file and the keys that differ,
never a silent restart or a mix of two evaluations.
"""

import hashlib
import json
import os
import re
import time

import jax
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from secant_jax import files
from secant_jax import stop_requests

KEEP = 2  # saves kept per process: the latest and the one before it


def weights_digest(variables):
  """A SHA-256 hex digest of a tree of arrays (paths, dtypes, shapes and values): what
  stamps an evaluation of these weights and no others."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};'.encode())
    digest.update(array.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def write_stamped(path, fingerprint, arrays):
  """Writes {name: array} and `fingerprint` (a JSON string) whole (files.write_npz)."""
  files.write_npz(path, fingerprint=np.asarray(fingerprint), **arrays)


def read_stamp(path):
  """The fingerprint `write_stamped` wrote to `path`, as a dict ({} for a file without one),
  its arrays left unread."""
  with epath.Path(path).open('rb') as f, np.load(f) as saved:
    return json.loads(str(saved['fingerprint'])) if 'fingerprint' in saved.files else {}


def _read_with_differences(path, fingerprint):
  """(the arrays `write_stamped` wrote to `path`, the keys in which its stamp differs from
  `fingerprint`, sorted; a file without a stamp differs in all of them)."""
  with epath.Path(path).open('rb') as f, np.load(f) as saved:
    arrays = {k: saved[k] for k in saved.files}
  theirs, ours = (traverse_util.flatten_dict(json.loads(str(s)), sep='.')
                  for s in (arrays.pop('fingerprint', '{}'), fingerprint))
  return arrays, sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))


def read_stamped(path, fingerprint, holds, fix):
  """The arrays `write_stamped` wrote to `path`, if it was stamped with `fingerprint`;
  otherwise an error that it holds `holds`, naming the keys that differ and saying `fix`."""
  arrays, differ = _read_with_differences(path, fingerprint)
  if differ:
    raise ValueError(f'{path} holds {holds} (it differs in {", ".join(differ)}): {fix}.')
  return arrays


def read_if_stamped(path, fingerprint):
  """The arrays `write_stamped` wrote to `path` if it was stamped with `fingerprint`, else
  None (another stamp, or none: a file from before stamps), for a cache to recompute."""
  arrays, differ = _read_with_differences(path, fingerprint)
  return None if differ else arrays


def stop_requests_of_an_evaluation():
  """A stop_requests.StopRequests for a Progress (a context manager: SIGTERM and Ctrl-C are
  watched until it is left)."""
  return stop_requests.StopRequests(
      'the run stops after this batch, with its progress saved. Ctrl-C again: it stops now '
      '(its last save is kept).')


class Progress:
  """Saves and loads {name: array} under `directory`, stamped with `fingerprint` (a
  JSON-serialisable dict); `save_if_due` saves every `save_seconds` (0: every call), and
  where `stop` (a stop_requests.StopRequests) asks, then stops the run."""

  def __init__(self, directory, fingerprint, save_seconds=0.0, stop=None):
    self.directory = directory
    self.fingerprint = json.dumps(fingerprint, sort_keys=True)
    self.save_seconds = save_seconds
    self._stop = stop
    self._prefix = f'progress.process_{jax.process_index()}.'
    self._last_save = time.monotonic()

  def _path(self, done):
    return os.path.join(self.directory, f'{self._prefix}{done}.npz')

  def saved(self):
    """The `done` counts this process has files for, ascending."""
    pattern = re.compile(re.escape(self._prefix) + r'(\d+)\.npz')
    return sorted(int(m.group(1)) for p in epath.Path(self.directory).glob(self._prefix + '*')
                  if (m := pattern.fullmatch(p.name)))

  def latest_stamp(self):
    """The fingerprint (a dict) of this process's latest save, or None where it has none."""
    saved = self.saved()
    return read_stamp(self._path(saved[-1])) if saved else None

  def load(self):
    """(done, {name: array}) of the latest save every process has, or (0, None)."""
    self._last_save = time.monotonic()
    latest = max(self.saved(), default=0)
    if jax.process_count() > 1:
      latest = int(np.min(multihost_utils.process_allgather(np.asarray(latest))))
    if not latest:
      return 0, None
    path = self._path(latest)
    if not epath.Path(path).exists():
      raise FileNotFoundError(f'{path} is missing, though every process has saved after '
                              f'{latest} samples: restore it, or delete the '
                              f'progress.process_* files in {self.directory} to start '
                              'over.')
    return latest, read_stamped(
        path, self.fingerprint, 'the progress of a different evaluation', 'finish that one '
        'with its settings, or delete the progress.process_* files in '
        f'{self.directory} to start this one over')

  def save(self, done, arrays):
    """Writes the arrays after `done` samples and deletes all but the KEEP latest saves."""
    write_stamped(self._path(done), self.fingerprint, arrays)
    self._last_save = time.monotonic()
    for old in self.saved()[:-KEEP]:
      epath.Path(self._path(old)).unlink()

  def save_if_due(self, done, total, arrays_of):
    """`save`s arrays_of() after `done` of `total` samples if it is the last batch or
    save_seconds have passed since the last save (or the load), or if the run is asked to
    stop, and then raises stop_requests.Stopped (at the last batch it finishes instead)."""
    stop = self._stop is not None and self._stop.reached() and done < total
    if done == total or stop or self._due():
      self.save(done, arrays_of())
    if stop:
      raise stop_requests.Stopped(
          f'Stopped on {self._stop.by} after {done} of {total} samples, with the progress '
          f'saved in {self.directory}; the same command resumes it.')

  def _due(self):
    """Whether save_seconds have passed on process 0, told to every process so that all
    save after the same batch."""
    due = np.asarray(time.monotonic() - self._last_save >= self.save_seconds)
    if jax.process_count() > 1:
      due = multihost_utils.broadcast_one_to_all(due)
    return bool(due)

  def clear(self):
    """Deletes this process's saves: the evaluation is over and its result written."""
    for done in self.saved():
      epath.Path(self._path(done)).unlink()
