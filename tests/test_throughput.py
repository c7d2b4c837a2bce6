"""The throughput benchmark at CPU size: it runs the real step and sampler and prints its
fields (a smoke test: no timing is asserted); the analytic FLOP count is checked."""

import os
import subprocess
import sys

import pytest

from secant_jax import paths
from secant_jax.bench import flops
from secant_jax.bench import throughput
from secant_jax.convert import common
from secant_jax.models import dit
from secant_jax.models import registry
from secant_jax.train import step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sit_xl2_forward_flops_match_the_published_count():
  # DiT/SiT-XL/2 at 256² is 118.6 GMACs (DiT paper, Table 4) for the one-time model.
  module = dit.from_name('SiT-XL/2', two_times=False)
  assert flops.dit_forward(module) / 2 == pytest.approx(118.6e9, rel=2e-3)


def test_forward_equivalents_per_variant():
  def task(variant, guidance_range=None, **settings):
    return step.SecantTask(variant, paths.Linear(), 4, 1000, guidance_range=guidance_range,
                           **settings)
  assert flops.train_forward_equivalents(task('sdei', (1.0, 2.5))) == 6
  assert flops.train_forward_equivalents(task('sdee')) == 5
  assert flops.train_forward_equivalents(task('stee')) == 4
  assert flops.train_forward_equivalents(task('stei')) == 8
  assert flops.train_forward_equivalents(task('stei', stei_target='self')) == 8
  assert flops.train_forward_equivalents(task('stei', stei_lambda=0.0)) == 5
  assert flops.train_forward_equivalents(task('diffusion')) == 3
  assert flops.sample_forward_equivalents(4, classic_cfg=True) == 8
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops('cpu') is None
  assert flops.peak_bandwidth('NVIDIA H200') == 4.8e12
  assert flops.peak_bandwidth('cpu') is None


@pytest.mark.usefixtures('two_block_dit')
@pytest.mark.parametrize('extra', [['--variant', 'sdei', '--traffic'],
                                   ['--variant', 'stee', '--remat', '--split-qkv',
                                    '--batch', '16', '--microbatches', '2'],
                                   ['--sample', '--num-steps', '2', '--profile', '1']])
def test_benchmark_runs_on_cpu_and_prints_its_fields(extra, capsys):
  argv = ['--model', 'DiT-S/8', '--batch', '8', '--steps', '2', '--warmup', '1', '--dtype',
          'float32', *extra]
  fields = throughput.main(argv)
  printed = capsys.readouterr().out
  for key in ('images_per_second', 'step_ms', 'peak_memory_gib', 'achieved_tflops', 'mfu'):
    assert key in printed
  assert fields['images_per_second'] > 0 and fields['mfu'] is None  # CPU: no known peak
  assert fields['compile_s'] > 0 and 'compile_s' in printed
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
    layers = fields['traffic']['scopes']  # the student's layers told from the teacher's
    assert layers['teacher/DiT/blocks_*/mlp/fc1 (forward)'] > 0
    assert layers['student/DiT/blocks_*/mlp/fc1 (backward)'] > 0
    assert sum(layers.values()) == fields['traffic']['bytes']
  if '--profile' in extra:
    assert 'device busy' in printed and fields['profile']['kinds']['matmul'] > 0


def test_xla_counts_a_dit_forward_as_the_formula_does():
  # The U-Net's FLOPs are XLA's count; on the DiT the count and the formula agree up to
  # the elementwise ops the formula leaves out (1.2% more here, bf16 with its casts).
  network = registry.build(throughput.load_config(throughput.parse_args(
      ['--model', 'DiT-S/2'])).model, guided=True)
  assert flops.network_forward(network) == flops.dit_forward(network.module)
  assert flops.counted_forward(network) == pytest.approx(flops.dit_forward(network.module),
                                                         rel=2e-2)


def test_the_residual_dtype_flag_reaches_the_dit():
  build = lambda *flags: registry.build(throughput.load_config(throughput.parse_args(
      ['--model', 'DiT-S/2', *flags])).model, guided=True).module
  assert build().residual_dtype == 'float32'  # the config's, as PyTorch's autocast
  assert build('--residual-dtype', 'bfloat16').residual_dtype == 'bfloat16'


def test_the_edm_config_benchmarks_the_unet(edit_benchmark_config, capsys):
  small_unet = edit_benchmark_config(  # EDM's DDPM++ at CPU size: one resolution
      lambda config: config.model.unet.update(model_channels=16, channel_mult=(1,),
                                              num_blocks=1))
  argv = ['--config', 'cifar10_edm', '--variant', 'stee', '--batch', '8', '--steps', '2',
          '--warmup', '1']
  fields = throughput.main(argv)
  assert 'train stee EDM ddpmpp' in capsys.readouterr().out
  assert fields['what'] == 'train stee EDM ddpmpp' and fields['images_per_second'] > 0
  assert fields['matmul_precision'] == 'float32'  # the config's, as EDM trains
  network = registry.build(small_unet(throughput.parse_args(argv)).model, guided=False)
  assert network.module.dtype == 'float32'  # the config's, as EDM trains
  # STEE: the student's forward and backward (3) and its Picard estimate (1).
  assert fields['tflop_per_image'] * 1e12 == pytest.approx(4 * flops.counted_forward(network))
  with pytest.raises(SystemExit, match='--model SiT-XL/2 is not a SongUNet: --config '
                                       'cifar10_edm takes --model ddpmpp or ncsnpp'):
    throughput.main(['--config', 'cifar10_edm', '--model', 'SiT-XL/2'])
  with pytest.raises(SystemExit, match='--split-qkv is a DiT option; --config cifar10_edm is '
                                       'a SongUNet'):
    throughput.main(['--config', 'cifar10_edm', '--split-qkv'])
  with pytest.raises(SystemExit, match='--residual-dtype is a DiT option; --config '
                                       'cifar10_edm is a SongUNet'):
    throughput.main(['--config', 'cifar10_edm', '--residual-dtype', 'bfloat16'])


@pytest.mark.parametrize('flag, value, expected', [
    ('--batch', '0', 'a positive integer'), ('--steps', '-1', 'a positive integer'),
    ('--num-steps', '2.5', 'a positive integer'), ('--warmup', '-1', 'a non-negative integer'),
    ('--profile', '-3', 'a non-negative integer')])
def test_counts_are_refused_by_flag(flag, value, expected, capsys):
  with pytest.raises(SystemExit):
    throughput.parse_args([flag, value])
  assert f"argument {flag}: expected {expected}, got '{value}'" in capsys.readouterr().err
  throughput.parse_args([flag, '1'])


def _one_cpu_device(**settings):
  """The environment with `settings` for a subprocess on one CPU device, not the suite's
  eight (its XLA_FLAGS)."""
  env = dict(os.environ, **settings)
  env.pop('XLA_FLAGS', None)
  return env


# Run in a fresh interpreter in which importing any of DATA_STACK fails, as on a GPU image
# that has only JAX's libraries and the benchmark's own dependencies.
DATA_STACK = ('tensorflow', 'tensorflow_datasets', 'clu', 'grain', 'array_record', 'sklearn',
              'torch', 'torchvision', 'PIL', 'safetensors', 'diffusers')
_WITHOUT_DATA_STACK = f"""
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in {DATA_STACK!r}:
      raise ModuleNotFoundError(f'no module named {{name!r}} here', name=name)
sys.meta_path.insert(0, Refuse())
try:
  import clu
except ModuleNotFoundError:
  print('clu refused')
sys.argv = ['throughput', *sys.argv[1:]]
runpy.run_module('secant_jax.bench.throughput', run_name='__main__')
"""


def test_the_benchmark_needs_no_data_stack():
  """Its docstring's promise: the train step, model and optimizer without TensorFlow, CLU,
  grain, torch, scikit-learn or PIL."""
  env = _one_cpu_device(JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_DATA_STACK, '--model', 'DiT-S/8', '--variant', 'stee',
       '--batch', '2', '--steps', '1', '--warmup', '1', '--dtype', 'float32'],
      env=env, cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('clu refused') and 'images_per_second' in result.stdout


def test_the_table_script_runs_each_setting_in_its_own_process_into_one_table(tmp_path):
  """launch/throughput_table.sh at CPU size: one row, both qkv forms; a bad setting is named
  before anything runs."""
  env = _one_cpu_device(PYTHON=sys.executable, MODEL='DiT-S/8', ATTENTION='xla',
                        ROWS='sample', GEMMS='triton', QKV='fused split',
                        EXTRA='--batch 2 --steps 1 --warmup 1 --dtype float32 --num-steps 1')
  script = os.path.join(REPO, 'launch', 'throughput_table.sh')
  subprocess.run(['bash', script, str(tmp_path)], env=env, check=True, capture_output=True)
  rows = (tmp_path / 'table.md').read_text().splitlines()[2:]
  assert [row.split(' | ')[:3] for row in rows] == [['| sample', 'triton', 'fused'],
                                                    ['| sample', 'triton', 'split']]
  assert '--split-qkv' in rows[1] and '--split-qkv' not in rows[0]
  assert all(float(row.split(' | ')[3]) > 0 for row in rows)  # img/s
  assert all(float(row.split(' | ')[9]) > 0 for row in rows)  # compile s
  bad = subprocess.run(['bash', script, str(tmp_path / 'bad')],
                       env=dict(env, QKV='fused three'), capture_output=True, text=True)
  assert bad.returncode != 0
  assert "unknown setting 'three' in QKV; expected fused and/or split" in bad.stderr
  assert not list((tmp_path / 'bad').iterdir())  # refused before the first run
