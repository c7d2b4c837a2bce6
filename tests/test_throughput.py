"""The throughput benchmark at CPU size: it runs the real step and sampler and prints its
fields (a smoke test: no timing is asserted); the analytic FLOP count is checked."""

import pytest

from secant_jax import paths
from secant_jax.bench import flops
from secant_jax.bench import throughput
from secant_jax.convert import common
from secant_jax.models import dit
from secant_jax.models import registry
from secant_jax.train import step


def test_sit_xl2_forward_flops_match_the_published_count():
  # DiT/SiT-XL/2 at 256² is 118.6 GMACs (DiT paper, Table 4) for the one-time model.
  module = dit.from_name('SiT-XL/2', two_times=False)
  assert flops.dit_forward(module) / 2 == pytest.approx(118.6e9, rel=2e-3)


def test_forward_equivalents_per_variant():
  def task(variant, guidance_range=None):
    return step.SecantTask(variant, paths.Linear(), 4, 1000, guidance_range=guidance_range)
  assert flops.train_forward_equivalents(task('sdei', (1.0, 2.5))) == 6
  assert flops.train_forward_equivalents(task('sdee')) == 5
  assert flops.train_forward_equivalents(task('stee')) == 4
  assert flops.train_forward_equivalents(task('stei')) == 8
  assert flops.train_forward_equivalents(task('diffusion')) == 3
  assert flops.sample_forward_equivalents(4, classic_cfg=True) == 8
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops('cpu') is None
  assert flops.peak_bandwidth('NVIDIA H200') == 4.8e12
  assert flops.peak_bandwidth('cpu') is None


@pytest.mark.parametrize('extra', [['--variant', 'sdei', '--traffic'],
                                   ['--variant', 'stee', '--remat'],
                                   ['--sample', '--num-steps', '2', '--profile', '1']])
def test_benchmark_runs_on_cpu_and_prints_its_fields(extra, capsys):
  argv = ['--model', 'DiT-S/8', '--batch', '8', '--steps', '2', '--warmup', '1', '--dtype',
          'float32', *extra]
  fields = throughput.main(argv)
  printed = capsys.readouterr().out
  for key in ('images_per_second', 'step_ms', 'peak_memory_gib', 'achieved_tflops', 'mfu'):
    assert key in printed
  assert fields['images_per_second'] > 0 and fields['mfu'] is None  # CPU: no known peak
  assert fields['static_memory_gb'] > 0 and fields['memory_floor_ms'] is None
  # The compiled program holds at least its arguments: the fp32 variables (sampling) or the
  # train state, which is parameters, EMA and Adam's two moments.
  config = throughput.load_config(throughput.parse_args(argv))
  parameters = common.parameter_count(
      registry.build(config.model, guided=False).abstract_variables())
  copies = 1 if '--sample' in extra else 4
  assert fields['compiled_memory_gib'] * 2 ** 30 > copies * 4 * parameters
  if '--traffic' in extra:
    assert 'static memory traffic' in printed and fields['traffic']['kinds']['matmul'] > 0
  if '--profile' in extra:
    assert 'device busy' in printed and fields['profile']['kinds']['matmul'] > 0
