"""Static memory traffic of compiled HLO (bench.traffic) and the benchmark's deviceless
GPU target (bench.targets): byte counts checked exactly on HLO whose answer is known."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from secant_jax.bench import throughput
from secant_jax.bench import traffic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A copy (256 B moved), a dot (two 128 B reads, one 64 B write) and a loop of 5 trips whose
# body adds two scalars (12 B) and runs a fusion (two 128 B reads, one write): 2556 B in
# 12 kernels. The body's header holds an /*index=2*/ comment, as XLA writes for tuples.
_HLO = """HloModule jit_f, entry_computation_layout={(f32[4,8]{1,0})->f32[4,4]{1,0}}

%fused_add (p0: f32[4,8], p1: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %sum = f32[4,8]{1,0} add(%p0, %p1)
}

%cond (c: (s32[], f32[4,8], /*index=2*/bf16[16])) -> pred[] {
  %c = (s32[], f32[4,8]{1,0}, /*index=2*/bf16[16]{0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(5)
  ROOT %lt = pred[] compare(%ci, %limit), direction=LT
}

%body (state: (s32[], f32[4,8], /*index=2*/bf16[16])) -> (s32[], f32[4,8], bf16[16]) {
  %state = (s32[], f32[4,8]{1,0}, /*index=2*/bf16[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%state), index=1
  %b = bf16[16]{0} get-tuple-element(%state), index=2
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[4,8]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  ROOT %out = (s32[], f32[4,8]{1,0}, bf16[16]{0}) tuple(%next, %y, %b)
}

ENTRY %main (x: f32[4,8], b: bf16[16]) -> f32[4,4] {
  %x = f32[4,8]{1,0} parameter(0)
  %b = bf16[16]{0} parameter(1)
  %c = f32[4,8]{1,0} copy(%x)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}, bf16[16]{0}) tuple(%zero, %c, %b)
  %loop = (s32[], f32[4,8]{1,0}, /*index=2*/bf16[16]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %last = f32[4,8]{1,0} get-tuple-element(%loop), index=1
  ROOT %dot = f32[4,4]{1,0} dot(%last, %last), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""

# One fusion: two slices of its first operand, one through a transpose (32 B each of 128 B), a slice and a negate of
# its second (read whole), written out as 32 + 32 + 128 B: 384 B, not the 448 B of reading
# both operands whole.
_SLICING_HLO = """HloModule jit_g, entry_computation_layout={(f32[4,8]{1,0}, f32[4,8]{1,0})->(f32[4,2]{1,0}, f32[2,4]{1,0}, f32[4,8]{1,0})}

%fused_split (p0: f32[4,8], p1: f32[4,8]) -> (f32[4,2], f32[2,4], f32[4,8]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  %a = f32[4,2]{1,0} slice(%p0), slice={[0:4], [0:2]}
  %p0t = f32[8,4]{1,0} transpose(%p0), dimensions={1,0}
  %b = f32[2,4]{1,0} slice(%p0t), slice={[6:8], [0:4]}
  %c = f32[4,2]{1,0} slice(%p1), slice={[0:4], [0:2]}
  %e = f32[4,2]{1,0} add(%a, %c)
  %d = f32[4,8]{1,0} negate(%p1)
  ROOT %t = (f32[4,2]{1,0}, f32[2,4]{1,0}, f32[4,8]{1,0}) tuple(%e, %b, %d)
}

ENTRY %main (x: f32[4,8], y: f32[4,8]) -> (f32[4,2], f32[2,4], f32[4,8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %y = f32[4,8]{1,0} parameter(1)
  ROOT %f = (f32[4,2]{1,0}, f32[2,4]{1,0}, f32[4,8]{1,0}) fusion(%x, %y), kind=kLoop, calls=%fused_split
}
"""


# A cuBLASLt GEMM as XLA compiles it for a GPU: its output tuple ends in the workspace
# (s8[4194304], 4 MiB), which is scratch; it moves its two 128 B operands and 64 B output.
_GEMM_HLO = """HloModule jit_h, entry_computation_layout={(f32[4,8]{1,0})->f32[4,4]{1,0}}

ENTRY %main (x: f32[4,8]) -> f32[4,4] {
  %x = f32[4,8]{1,0} parameter(0)
  %gemm = (f32[4,4]{1,0}, s8[4194304]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul"
  ROOT %out = f32[4,4]{1,0} get-tuple-element(%gemm), index=0
}
"""


def test_a_custom_calls_workspace_is_not_counted():
  summary = traffic.summarize(_GEMM_HLO)
  assert summary['bytes'] == 320 and summary['kinds'] == {'matmul': 320}
  two_outputs = _GEMM_HLO.replace('s8[4194304]{0}', 'f32[4,4]{1,0}')  # not scratch: counted
  assert traffic.summarize(two_outputs)['bytes'] == 384


def test_array_bytes_of_hlo_shapes():
  assert traffic.array_bytes('(bf16[64,256]{1,0}, /*index=1*/f32[8]{0})') == 32800
  assert traffic.array_bytes('pred[3]{0}') == 3
  assert traffic.array_bytes('s4[4]{0}') == 2
  assert traffic.array_bytes('f8e4m3fn[10]{0}') == 10
  assert traffic.array_bytes('f32[]') == 4


def test_traffic_counts_each_kernel_once_and_loop_bodies_per_trip():
  summary = traffic.summarize(_HLO)
  assert summary['bytes'] == 2556 and summary['kernels'] == 12
  assert summary['kinds'] == {'matmul': 320, 'elementwise': 5 * (12 + 384), 'layout': 256}
  rows = {name: (kind, moved, count, layer)
          for name, _, kind, moved, count, layer in summary['top']}
  assert rows['y'] == ('elementwise', 5 * 384, 5, 'unnamed')  # HLO without op_name metadata
  assert rows['c'] == ('layout', 256, 1, 'unnamed')


def test_a_fusion_reads_an_operand_it_only_slices_as_the_slices():
  summary = traffic.summarize(_SLICING_HLO)
  assert summary['bytes'] == 384 and summary['kernels'] == 1


def test_traffic_of_a_compiled_matmul():
  def program(x, w):
    with jax.named_scope('proj'):
      return x @ w

  compiled = jax.jit(program).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  summary = traffic.summarize(compiled.as_text())
  assert summary['kinds']['matmul'] == 4 * (64 * 32 + 32 * 16 + 64 * 16)
  assert summary['scopes']['proj'] == summary['kinds']['matmul']
  lines = traffic.format_summary(summary, bandwidth=1e12)
  assert lines[0].startswith('static memory traffic 0.00 GB per call in') and 'TB/s' in lines[0]


def test_profile_cannot_combine_with_a_compile_only_target(capsys):
  with pytest.raises(SystemExit):
    throughput.parse_args(['--target', 'h100', '--profile', '2'])
  assert '--profile times kernels on a device; --target only compiles' in capsys.readouterr().err


def test_benchmark_compiles_for_an_h100_without_one_or_says_what_it_needs():
  """With JAX's CUDA plugin installed the step compiles for an H100 here and the static
  fields print; without it, the error names the package to install."""
  result = subprocess.run(
      [sys.executable, '-m', 'secant_jax.bench.throughput', '--model', 'DiT-S/8', '--batch',
       '8', '--dtype', 'float32', '--target', 'h100'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'XLA_FLAGS': '', 'PYTHONPATH': REPO})
  if result.returncode:
    assert ("Compiling for NVIDIA H100 80GB HBM3 without one needs JAX's CUDA plugin: pip "
            "install -e '.[cuda]'") in result.stderr
  else:
    assert 'device: 1 x NVIDIA H100 80GB HBM3' in result.stdout
    assert 'memory_floor_ms' in result.stdout and 'static memory traffic' in result.stdout


@pytest.mark.skipif(not any(importlib.util.find_spec(f'jax_cuda{v}_plugin') for v in (12, 13)),
                    reason="needs JAX's CUDA plugin: pip install -e '.[cuda]'")
def test_cudnn_attention_on_several_gpus_compiles_to_one_program_in_every_process(tmp_path):
  """cuDNN's attention on 2 H100s (dit.Attention runs it per device on the mesh): two
  processes compile the same train step, so the persistent compilation cache holds one
  entry for it, which a resumed run would read. Called as it is, the kernel's partitioning
  callback puts each process's own id into the program: two entries."""
  env = {**os.environ, 'XLA_FLAGS': '', 'PYTHONPATH': REPO,
         'JAX_COMPILATION_CACHE_DIR': str(tmp_path),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  for _ in range(2):
    result = subprocess.run(
        [sys.executable, '-m', 'secant_jax.bench.throughput', '--model', 'DiT-S/8',
         '--batch', '8', '--attention', 'cudnn', '--variant', 'stee', '--target', '2xh100'],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'device: 2 x NVIDIA H100 80GB HBM3' in result.stdout
  assert len([f for f in os.listdir(tmp_path) if f.startswith('jit_train_step-')]) == 1
