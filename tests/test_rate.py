"""train.rate: images/s, TFLOP/s per device and MFU over log windows, on a fake clock."""

import jax.numpy as jnp
import pytest

from secant_jax.train import rate


class _Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_each_window_is_timed_from_the_previous_log_without_its_pauses():
  clock = _Clock()
  r = rate.TrainRate(flop_per_image=1e12, batch_size=64, device_count=2, peak_flops=500e12,
                     clock=clock)
  clock.now = 30.0  # the first window: the compile
  assert r.scalars(10) == {}
  clock.now = 32.0
  with r.paused(jnp.zeros(3)):  # a sample grid: 5 s not counted
    clock.now = 37.0
  clock.now = 43.0  # 10 steps of 64 images in 8 s of training
  assert r.scalars(20) == pytest.approx(
      {'images_per_second': 80.0, 'tflops_per_device': 40.0, 'mfu': 0.08})
  unknown = rate.TrainRate(1e12, 64, 2, None, clock=clock)  # no peak known: no MFU
  with unknown.paused(jnp.zeros(3)):  # before its first log: nothing to stop
    clock.now = 50.0
  assert unknown.scalars(40) == {}
  assert r.scalars(40) == pytest.approx(  # 20 steps in 7 s
      {'images_per_second': 1280 / 7, 'tflops_per_device': 640 / 7, 'mfu': 1.28 / 7})
  clock.now = 51.0
  assert unknown.scalars(42) == pytest.approx(
      {'images_per_second': 128.0, 'tflops_per_device': 64.0})
