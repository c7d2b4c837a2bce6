"""The data pipeline's global stream: any number of processes read the same global
batches, each its own slice, and a state saved with one process count resumes with
another; how many threads read them changes nothing but the speed; the input benchmark
times what one process reads."""

import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

from secant_jax.bench import input as input_bench
from secant_jax.data import pipeline

SOURCE = [{'x': np.full((2, 2, 1), i, np.float32), 'y': np.int32(i % 10)} for i in range(37)]


def _global_batches(processes, global_batch, steps, state=None):
  """Each step's global batch 'x' (one value per record), as `processes` processes would
  read it, each process's slice in order."""
  slices = []
  for p in range(processes):
    it = pipeline.batches(SOURCE, global_batch, seed=5, augment=_jitter, process=(p, processes))
    if state is not None:
      it.set_state(state)
    slices.append([next(it)['x'][:, 0, 0, 0] for _ in range(steps)])
  return np.stack([np.concatenate([s[k] for s in slices]) for k in range(steps)])


def _jitter(record, rng):
  return {**record, 'x': record['x'] + rng.random()}


def test_one_two_and_four_processes_read_the_same_global_batches():
  one = _global_batches(1, 8, 10)
  np.testing.assert_array_equal(_global_batches(2, 8, 10), one)
  np.testing.assert_array_equal(_global_batches(4, 8, 10), one)
  records = np.floor(one.reshape(-1)[:74]).astype(int)  # two epochs of 37
  assert sorted(records[:37]) == sorted(records[37:]) == list(range(37))
  assert list(records[:37]) != list(records[37:])  # reshuffled each epoch
  assert not np.array_equal(one.reshape(-1)[:37] % 1, one.reshape(-1)[37:74] % 1)


def test_a_state_saved_on_one_process_count_resumes_on_another():
  straight = _global_batches(2, 8, 7)
  with pytest.MonkeyPatch.context() as m:  # the default: JAX's own process index and count
    m.setattr(jax, 'process_count', lambda: 2)
    m.setattr(jax, 'process_index', lambda: 1)
    it = pipeline.batches(SOURCE, 8, seed=5, augment=_jitter)
  for _ in range(4):
    next(it)
  state = it.get_state()
  np.testing.assert_array_equal(_global_batches(4, 8, 3, state), straight[4:])
  np.testing.assert_array_equal(_global_batches(1, 8, 3, state), straight[4:])


def test_a_global_batch_that_does_not_divide_over_the_processes_is_refused():
  with pytest.MonkeyPatch.context() as m:
    m.setattr(jax, 'process_count', lambda: 4)
    with pytest.raises(ValueError, match=r'Global batch size 6 does not divide over the 4 '
                                         r'processes; set the config.s batch_size'):
      pipeline.batches(SOURCE, 6, seed=0)


class _SlowSource:
  """SOURCE, each read taking a millisecond (a record in a bucket: one request), noting
  the threads that read it."""

  def __init__(self):
    self.threads = set()

  def __len__(self):
    return len(SOURCE)

  def __getitem__(self, index):
    self.threads.add(threading.get_ident())
    time.sleep(1e-3)
    return SOURCE[index]


def test_the_read_threads_read_the_same_batches():
  batches = {}
  for threads in (1, 4):
    source = _SlowSource()
    it = pipeline.batches(source, 8, seed=5, augment=_jitter, read_threads=threads)
    batches[threads] = np.stack([next(it)['x'] for _ in range(12)])
    assert (len(source.threads) == 1) == (threads == 1), source.threads
  np.testing.assert_array_equal(batches[4], batches[1])


def test_read_threads_default_to_many_for_a_bucket_and_one_for_a_disk():
  def threads(read_threads, directory):
    return pipeline.read_threads(ml_collections.ConfigDict(dict(read_threads=read_threads,
                                                                dir=directory)))
  assert threads(0, 'gs://bucket/latents') == 16
  assert threads(0, '/data/latents') == threads(0, '') == 1
  assert threads(4, 'gs://bucket/latents') == threads(4, '/data/latents') == 4


def test_the_input_benchmark_times_one_process_share_of_the_configs_pipeline():
  from configs import demo  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  fields = input_bench.measure(config, batches=6, warmup=2, processes=2)
  assert fields['dataset'] == 'digits' and fields['batch'] == config.batch_size // 2
  assert fields['read_threads'] == 1  # digits are in memory
  assert fields['images_per_second'] == pytest.approx(fields['batches_per_second'] *
                                                      fields['batch'])
  record_bytes = 4 * np.prod(fields['record_shape']) + 4  # float32 image, int32 label
  assert fields['megabytes_per_second'] == pytest.approx(
      fields['images_per_second'] * record_bytes / 1e6)
