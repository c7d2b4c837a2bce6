"""Checkpoints of a run: async Orbax saves every N steps, the latest K kept, a forced save
when the process is told to stop (SIGTERM: preemption of a TPU VM or a Slurm job; Ctrl-C in
the terminal of a one-process run), and restore of the latest on start.

A checkpoint holds two checkpointables: 'state' (the TrainState pytree, restored with the
shardings of the abstract state given) and 'data' (the data iterator's JSON state, written
by process 0: every process's iterator over its slices of the global batches is at the
same {'next_index': k}, which restores any number of processes). Orbax
writes into a temporary directory and renames on commit, and only deletes old steps after
a newer one is committed, so a run never loses a checkpoint it had written. Call every
method on all processes.

SIGTERM or Ctrl-C (secant_jax.stop_requests) forces a save after the current step, at
which every process stops; a second Ctrl-C stops the run at once, leaving the block still
waiting for a save under way to commit.

Use it as a context manager: leaving the block, however (a finished run, a non-finite loss,
a config that does not fit), waits for the save in flight to commit and gives SIGTERM and
SIGINT back to their previous handlers. A run stopped on a request ends by raising
stop_requests.Stopped (exit status 75 from python -m secant_jax.main).
"""

import os

import jax
from orbax.checkpoint import v1 as ocp

from secant_jax import orbax_context
from secant_jax import stop_requests


class Checkpoints:
  """Saves and restores a run's checkpoints under `directory`; `stop` is the
  stop_requests.StopRequests it answers to."""

  def __init__(self, directory, every, keep):
    self._every = every
    self._checkpointer = ocp.training.Checkpointer(
        os.fspath(directory), context=orbax_context.context(),
        preservation_policy=ocp.training.preservation_policies.LatestN(keep))
    self.stop = stop_requests.StopRequests(
        'the run stops after this step, with a checkpoint. Ctrl-C again: it stops now (a '
        'save under way still commits).')

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  @property
  def latest_step(self):
    latest = self._checkpointer.latest
    return None if latest is None else latest.step

  def save_if_due(self, step, state, data_iter, before_save=lambda: None):
    """Saves asynchronously every `every` steps, or now (and waits) if a stop was requested.
    Returns whether the run should stop. Between saves this costs nothing: Orbax is only
    called (and the data iterator's state only read) when a save is due. `before_save()`
    is called first when one is: an exception from it (a state not fit to keep) leaves the
    checkpoints as they are."""
    stop = self.stop.reached()
    if stop or step % self._every == 0:
      before_save()
      self.save(step, state, data_iter)
    if stop:
      self.wait()
    return stop

  def save(self, step, state, data_iter):
    """Starts an async save at `step` unless that step is already saved."""
    if self.latest_step == step:
      return
    self._checkpointer.save_checkpointables_async(
        step, {'state': state, 'data': data_iter.get_state()}, force=True)

  def restore_latest(self, abstract_state):
    """(state, data_state) of the latest checkpoint, placed as `abstract_state`'s leaves
    (ShapeDtypeStructs with shardings) say; None when there is none. A checkpoint whose
    arrays are not those of `abstract_state` (the run's config changed its model or
    optimizer) is an error that lists the differences, and is left as it is."""
    step = self.latest_step
    if step is None:
      return None
    saved = self._checkpointer.checkpointables_metadata(step).metadata['state']
    differences = state_differences(saved, abstract_state)
    if differences:
      shown = '; '.join(differences[:3]) + ('; ...' if len(differences) > 3 else '')
      raise ValueError(
          f'The checkpoint at step {step} in {self._checkpointer.directory} does not fit the '
          f'configured run ({len(differences)} arrays differ: {shown}): the config changed '
          'since it was saved. Resume with the config it was saved with (config.json in '
          "the run's --workdir), or start the changed run in a new --workdir.")
    restored = self._checkpointer.load_checkpointables(
        step, {'state': abstract_state, 'data': None})
    return restored['state'], restored['data']

  def wait(self):
    self._checkpointer.wait()

  def close(self):
    self._checkpointer.wait()
    self._checkpointer.close()
    self.stop.close()


def _flat_arrays(tree):
  """{'a/b/0/c': (shape, dtype)} of a pytree's array leaves, whether its nodes are dicts,
  lists, dataclasses or named tuples (a checkpoint's metadata has only dicts and lists)."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'/'.join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_differences(saved, abstract_state):
  """What differs between a checkpoint's arrays (its metadata) and `abstract_state`'s, as
  readable lines: arrays of another shape or dtype, then missing ones, then unexpected ones."""
  saved, wanted = _flat_arrays(saved), _flat_arrays(abstract_state)
  lines = [f'{k} is {saved[k][0]} {saved[k][1]} in the checkpoint, {wanted[k][0]} '
           f'{wanted[k][1]} in the run' for k in wanted if k in saved and saved[k] != wanted[k]]
  lines += [f'{k} is not in the checkpoint' for k in wanted if k not in saved]
  lines += [f'{k} is only in the checkpoint' for k in saved if k not in wanted]
  return lines


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` with the given shardings (a pytree or one Sharding)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, state)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
