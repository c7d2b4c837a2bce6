"""How fast a run trains, logged with its metrics: images/s, TFLOP/s per device and MFU.

Over each log window (the steps since the previous log), from the wall time between the two
logs; each log reads the window's metrics from the device, so every step of the window has
run when it is timed. Sample grids and FID evaluations inside a window are left out of its
time (the clock stops while they run), checkpoint saves are not. A process's first window
is not reported: the clock starts at its first log.

    images/s = batch_size · steps / seconds
    TFLOP/s per device = images/s · FLOP per image / devices
    MFU = TFLOP/s per device / the device's dense bf16 peak

FLOP per image is the analytic count the throughput benchmark uses (bench.flops: matmuls
only, the student's forward and backward, the Picard estimate, the teacher's passes), so
a run's MFU and the benchmark's are the same number for the same step; MFU is left out
where the device's peak is not known (CPUs).
"""

import contextlib
import time

import jax

from secant_jax.bench import flops


def of_run(task, network, batch_size):
  """The TrainRate of training `task` on `network` at `batch_size` over all devices."""
  return TrainRate(flops.train_forward_equivalents(task) * flops.network_forward(network),
                   batch_size, jax.device_count(),
                   flops.peak_flops(jax.devices()[0].device_kind))


class TrainRate:
  """Call `scalars(step)` at each log, after the metrics were read; run sample grids and
  evaluations inside `paused(state)`."""

  def __init__(self, flop_per_image, batch_size, device_count, peak_flops,
               clock=time.perf_counter):
    self._flop, self._batch = flop_per_image, batch_size
    self._devices, self._peak, self._clock = device_count, peak_flops, clock
    self._step = None  # the step of the previous log
    self._since = None  # when the clock last started
    self._elapsed = 0.0  # seconds counted in this window before the clock last started

  def scalars(self, step):
    """The rate over the window that ends at `step`: {} at the process's first log."""
    now = self._clock()
    values = {}
    if self._step is not None:
      seconds = self._elapsed + now - self._since
      images_per_second = (step - self._step) * self._batch / seconds
      tflops = images_per_second * self._flop / self._devices / 1e12
      values = {'images_per_second': images_per_second, 'tflops_per_device': tflops}
      if self._peak:
        values['mfu'] = tflops * 1e12 / self._peak
    self._step, self._since, self._elapsed = step, now, 0.0
    return values

  @contextlib.contextmanager
  def paused(self, state):
    """The clock stopped for the block, once the steps that produced `state` have run."""
    if self._since is None:
      yield
      return
    jax.block_until_ready(state)
    self._elapsed += self._clock() - self._since
    try:
      yield
    finally:
      self._since = self._clock()
