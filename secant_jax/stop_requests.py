"""What asks a run to stop before its end, and the point at which every process stops.

SIGTERM (preemption of a TPU VM or a Slurm job, a scheduler's time limit) and, in the
terminal of a one-process run, Ctrl-C ask the run to stop at its next save point (a
training step, an evaluation's batch), after saving there, where they would otherwise end
it wherever it was and lose what it computed since its last save. A second Ctrl-C raises
KeyboardInterrupt at once. A process that started with SIGINT ignored (a background job of
a shell script, such as launch/fashion_mnist.sh's stages, which it stops with SIGTERM)
keeps ignoring it.

With several processes, hosts get SIGTERM at different save points; stopping on the local
flag would leave the others waiting in a collective. There JAX's preemption sync service
(started by jax.distributed.initialize, which owns SIGTERM) picks one point at which every
process stops. The service stops all at the point after the furthest any process had
reached, so the points are numbered here, by `reached`'s calls: every process calls it at
the same points (each training step, each batch of an evaluation, in the same order).
Several processes leave SIGINT as it is.

A run that stopped so raises `Stopped`, which `python -m secant_jax.main` turns into exit
status 75 (sysexits' EX_TEMPFAIL: run again later), so that a scheduler can tell it from a
finished run and queue it again. Process 0 alone exits 75, the others 0: process 0 commits
the save, so a launcher that kills the remaining processes when one exits non-zero (srun
--kill-on-bad-exit) cannot cut a commit short.
"""

import os
import signal

import jax
from jax.experimental import multihost_utils

STOPPED_EXIT_STATUS = 75


class Stopped(Exception):
  """The run saved and stopped before its end, on SIGTERM or Ctrl-C."""


class StopRequests:
  """Watches for SIGTERM and Ctrl-C from its creation to `close` (a context manager);
  `reached()` at every save point says whether to save and stop there.
  `ctrl_c_message` is what the first Ctrl-C prints after 'Ctrl-C: '."""

  def __init__(self, ctrl_c_message):
    self._ctrl_c_message = f'\nCtrl-C: {ctrl_c_message}\n'.encode()
    self.requested = False
    self.by = 'SIGTERM'  # what asked the run to stop, for its last message
    self._multihost = jax.process_count() > 1
    self._points = 0  # reached's calls: the save points the sync service numbers
    self._previous_handlers = {}
    if not self._multihost:
      signals = [signal.SIGTERM]
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
        signals.append(signal.SIGINT)
      self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in signals}

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      self.by = 'Ctrl-C'
      os.write(2, self._ctrl_c_message)  # unbuffered
    self.requested = True

  def reached(self):
    """Whether the run stops at this save point (every process calls this at the same
    points); once it has said so, at every later point too."""
    self._points += 1
    if self._multihost and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(self._points)
    return self.requested

  def close(self):
    """Gives SIGTERM and SIGINT back to their previous handlers."""
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}
