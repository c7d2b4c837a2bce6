"""A train step's device memory from its compile, and the refusal of a step that cannot fit,
with the numbers and the settings that shrink it, before any step runs."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import config as config_lib
from secant_jax.train import loop
from secant_jax.train import memory
from test_loop import _digits_config

MIB = 2 ** 20


class _Accelerator:
  """A device as far as `memory` reads one."""
  platform, device_kind = 'gpu', 'NVIDIA H100 80GB HBM3'

  def memory_stats(self):
    return {'bytes_limit': 80 * 2 ** 30}


def _doubling(donate):
  """jit(2x) of a float32 [1024, 256] (1 MiB), compiled, its argument donated or not."""
  return jax.jit(lambda x: 2 * x, donate_argnums=0 if donate else ()).lower(
      jax.ShapeDtypeStruct((1024, 256), jnp.float32)).compile()


def test_compiled_bytes_count_outputs_only_where_not_donated():
  donated, kept = memory.compiled_bytes(_doubling(True)), memory.compiled_bytes(_doubling(False))
  assert (donated['arguments'], donated['outputs']) == (MIB, 0)
  assert (kept['arguments'], kept['outputs']) == (MIB, MIB)
  for needed in (donated, kept):
    assert needed['total'] == needed['arguments'] + needed['outputs'] + needed['temporaries']


def test_a_cpu_device_has_its_share_of_the_host_memory_and_an_accelerator_its_limit():
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  available, what = memory.device_bytes(jax.devices()[0])
  assert jax.local_device_count() == 8  # conftest's emulated CPU devices
  assert available == host // 8
  assert what == f"the host's {host / 2 ** 30:.3g} GiB give each of its 8 CPU devices"
  assert memory.device_bytes(_Accelerator()) == (80 * 2 ** 30, 'NVIDIA H100 80GB HBM3 allows')


def test_sizes_are_written_in_the_unit_that_leaves_at_least_one():
  """The refusal printed 'outputs beside them 4.1e-06' (GiB) before."""
  assert [memory.size_text(n) for n in (0, 12, 4300, 500 * MIB, 43727541312)] == [
      '0 B', '12 B', '4.2 KiB', '500 MiB', '40.7 GiB']


def test_a_unet_step_that_does_not_fit_is_not_told_to_remat():
  config = config_lib.base_config()
  config.model.family = 'edm_unet'
  fits = _Accelerator()
  memory.check_train_step_fits(_doubling(True), config, fits)
  fits.memory_stats = lambda: {'bytes_limit': MIB // 2}
  with pytest.raises(MemoryError, match=r'temporaries 0 B\), and NVIDIA H100 80GB '
                                        r'HBM3 allows 512 KiB: lower config.batch_size, or '
                                        r'split each batch with config.microbatches=N '
                                        r'\(gradient accumulation\), or shard parameters and '
                                        r'optimizer state with config.fsdp=N\.$'):
    memory.check_train_step_fits(_doubling(True), config, fits)


def test_a_train_step_that_does_not_fit_is_refused_before_its_first_step(tmp_path, monkeypatch):
  monkeypatch.setattr(memory, 'device_bytes', lambda device: (MIB // 4, 'the test allows'))
  with pytest.raises(MemoryError) as refused:
    loop.train_and_evaluate(_digits_config(2), tmp_path)
  message = str(refused.value)
  parts = re.fullmatch(
      r"The train step needs ([\d.]+ [KM]iB) per device \(XLA's buffer assignment: arguments "
      r'([\d.]+ [KM]?i?B), outputs beside them ([\d.]+ [KM]?i?B), temporaries ([\d.]+ '
      r'[KM]iB)\), and the test allows 256 KiB: lower config.batch_size, or split each batch with '
      r'config.microbatches=N \(gradient accumulation\), or recompute activations with '
      r'config.model.remat=True, or shard parameters and optimizer state with '
      r'config.fsdp=N\.', message)
  assert parts, message
  scale = {'B': 1, 'KiB': 2 ** 10, 'MiB': 2 ** 20}
  total, *summands = (float(n) * scale[u] for n, u in (p.split() for p in parts.groups()))
  np.testing.assert_allclose(sum(summands), total, rtol=0.01)
  assert not os.listdir(tmp_path / 'checkpoints')  # no step ran
  assert not os.path.exists(tmp_path / 'config.json')


def test_a_finished_run_rerun_is_not_compiled_again(tmp_path, monkeypatch):
  loop.train_and_evaluate(_digits_config(1), tmp_path)
  checked = []
  monkeypatch.setattr(memory, 'check_train_step_fits', lambda *args: checked.append(args))
  loop.train_and_evaluate(_digits_config(1), tmp_path)  # finished: exports its EMA again
  assert not checked
  _, history = loop.train_and_evaluate(_digits_config(2), tmp_path)  # one step more
  assert len(checked) == 1 and [h['step'] for h in history] == [2]
