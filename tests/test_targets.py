"""Deviceless targets: TPU slice names map to libtpu's topologies; with libtpu installed the
real train step compiles for a slice on this CPU machine, and one that does not fit in the
chip's memory is refused with what to change."""

import importlib.util

import pytest

from secant_jax.bench import targets
from secant_jax.bench import throughput
from secant_jax.convert import common
from secant_jax.models import registry

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="needs libtpu: pip install -e '.[tpu]'")


@pytest.mark.parametrize('name, topology', [
    ('v4-8', 'v4:2x2x1'), ('v4-32', 'v4:2x2x4'), ('v5p-128', 'v5p:4x4x4'),
    ('v4-512', 'v4:4x8x8'), ('v5litepod-16', 'v5e:4x4'), ('v5e-32', 'v5e:4x8'),
    ('v6e-1', 'v6e:1x1'), ('v6e-8', 'v6e:2x4'), ('v6e-256', 'v6e:16x16')])
def test_tpu_slices_are_the_torus_gcloud_lays_out(name, topology):
  assert targets.get(name).topology_name() == topology


@pytest.mark.parametrize('name, message', [
    ('v5p-6', "No TPU slice 'v5p-6': 3 chips: a slice has 1 .* or a power of two"),
    ('v4-7', "No TPU slice 'v4-7': its number counts TensorCores, 2 per chip"),
    ('v5e-2', "No TPU slice 'v5e-2': 2 chips"),
    ('a100', r"Unknown target 'a100': expected a GPU \(h100, h200\), a host of N of them "
             r"\(8xh100\) or a TPU slice"),
    ('0xh100', r"Unknown target '0xh100'")])
def test_a_target_that_does_not_exist_is_refused_with_the_valid_forms(name, message):
  with pytest.raises(ValueError, match=message):
    targets.get(name)


@pytest.mark.parametrize('name, kind, count', [('h100', 'NVIDIA H100 80GB HBM3', 1),
                                               ('8xh100', 'NVIDIA H100 80GB HBM3', 8),
                                               ('2xh200', 'NVIDIA H200', 2)])
def test_a_gpu_host_is_named_by_its_count_and_gpu(name, kind, count):
  target = targets.get(name)
  assert (target.device_kind, target.count, target.memory_bytes) == (
      kind, count, targets.GPUS[name.split('x')[-1]].memory_bytes)


def test_the_benchmark_refuses_a_bad_target_before_compiling(capsys):
  with pytest.raises(SystemExit):
    throughput.parse_args(['--target', 'v4-6'])
  assert "No TPU slice 'v4-6': 3 chips" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.usefixtures('two_block_dit')
def test_the_train_step_compiles_for_a_tpu_slice_without_one(capsys):
  argv = ['--model', 'DiT-S/8', '--batch', '8', '--dtype', 'float32', '--target', 'v5e-4']
  fields = throughput.main(argv)
  printed = capsys.readouterr().out
  assert fields['device'] == '4 x TPU v5 lite' and fields['device_memory_gib'] == 15.75
  # Every chip holds the replicated train state: parameters, EMA and Adam's two moments.
  config = throughput.load_config(throughput.parse_args(argv))
  parameters = common.parameter_count(
      registry.build(config.model, guided=False).abstract_variables())
  assert 4 * 4 * parameters < fields['compiled_memory_gib'] * 2 ** 30 < 2 ** 30
  # 8 images over 4 chips at v5e's 197 TFLOP/s.
  assert fields['flop_floor_ms'] == pytest.approx(
      1e3 * 8 * fields['tflop_per_image'] * 1e12 / (4 * 197e12))
  assert fields['static_memory_gb'] is None and 'not counted on TPUs' in printed
  assert 'images_per_second' not in fields


@needs_libtpu
def test_a_step_whose_temporaries_do_not_fit_is_refused_with_what_to_change():
  argv = ['--model', 'DiT-S/8', '--batch', '16384', '--dtype', 'float32', '--target',
          'v5e-1']
  with pytest.raises(SystemExit) as refused:
    throughput.main(argv)
  message = str(refused.value)
  assert message.startswith('DiT-S/8 sdei, batch 16384, does not fit on 1 x TPU v5 lite')
  assert 'RESOURCE_EXHAUSTED' in message and '--fsdp N' in message


@needs_libtpu
@pytest.mark.usefixtures('two_block_dit')
def test_a_step_whose_state_and_temporaries_together_do_not_fit_is_refused(monkeypatch):
  # XLA only checks the temporaries; the benchmark adds the arguments. A v5e with 0.125 GiB
  # cannot hold two-block DiT-S/8's replicated train state (0.10 GiB) and its step
  # (0.15 GiB in all), though XLA passes the step's temporaries alone.
  small = targets.TpuGeneration('v5e', 2, 1, 2 ** 27)
  monkeypatch.setitem(targets.TPUS, 'v5e', small)
  argv = ['--model', 'DiT-S/8', '--batch', '8', '--dtype', 'float32', '--target', 'v5e-4']
  with pytest.raises(SystemExit) as refused:
    throughput.main(argv)
  assert str(refused.value).startswith(
      'DiT-S/8 sdei, batch 8, does not fit on 4 x TPU v5 lite: it needs 0.15')
  assert 'per device, the device has 0.12 GiB' in str(refused.value)
