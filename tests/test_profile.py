"""The profile breakdown: HLO instructions classified by kind (GPU-style HLO written here)
and by layer (JAX's name stacks as jax 0.10 writes them), and a traced CPU program whose
time lands on the right kinds and layers."""

import jax
import jax.numpy as jnp
import pytest

from secant_jax.bench import profile

GPU_HLO = '''HloModule jit_train_step, is_scheduled=true, entry_computation_layout={(bf16[8,16]{1,0})->bf16[8,16]{1,0}}

%fused_ln (param_0: f32[8,16]) -> f32[8] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0, %constant.1), dimensions={1}, to_apply=%add
}

%fused_gelu (param_0.1: bf16[8,16]) -> bf16[8,16] {
  %param_0.1 = bf16[8,16]{1,0} parameter(0)
  ROOT %tanh.0 = bf16[8,16]{1,0} tanh(%param_0.1)
}

%triton_dot (p0: bf16[8,16], p1: bf16[16,16]) -> bf16[8,16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,16]{1,0} parameter(1)
  ROOT %dot.7 = bf16[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (x: bf16[8,16]) -> bf16[8,16] {
  %x = bf16[8,16]{1,0} parameter(0)
  %custom-call.3 = (bf16[8,16]{1,0}, s8[1024]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul"
  %custom-call.4 = (bf16[8,16]{1,0}, u8[0]{0}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax"
  %gemm_fusion.2 = bf16[8,16]{1,0} fusion(%x, %x), kind=kCustom, calls=%triton_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %input_reduce_fusion = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_ln
  %loop_tanh_fusion = bf16[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_gelu
  %copy.5 = bf16[16,8]{0,1} copy(%x)
  %all-reduce-start.1 = f32[8]{0} all-reduce-start(%input_reduce_fusion), to_apply=%add
  %rng-bit-generator.2 = (u64[2]{0}, u32[8]{0}) rng-bit-generator(%x), algorithm=rng_default
  ROOT %add.8 = bf16[8,16]{1,0} add(%x, %loop_tanh_fusion)
}
'''


def test_instruction_kinds_of_gpu_hlo():
  kinds = profile.instruction_kinds(GPU_HLO)
  assert kinds['custom-call.3'] == 'matmul'
  assert kinds['custom-call.4'] == 'attention'
  assert kinds['gemm_fusion.2'] == 'matmul'
  assert kinds['input_reduce_fusion'] == 'reduction'
  assert kinds['loop_tanh_fusion'] == 'elementwise'
  assert kinds['copy.5'] == 'layout'
  assert kinds['all-reduce-start.1'] == 'collective'
  assert kinds['rng-bit-generator.2'] == 'other'
  assert kinds['add.8'] == 'elementwise'
  assert profile.module_name(GPU_HLO) == 'jit_train_step'


@pytest.mark.parametrize('op_name, layer', [
    ('jit(train_step)/transpose(jvp(student))/DiT/blocks_13/mlp/fc1/dot_general',
     'student/DiT/blocks_*/mlp/fc1 (backward)'),
    ('jit(train_step)/jvp(teacher)/DiT/blocks_0/attn/dot_product_attention_fwd',
     'teacher/DiT/blocks_*/attn (forward)'),
    ('jit(train_step)/add', 'top level'),
    ('jit(loss)/jvp()/mul', 'top level (forward)'),
    ('jit(train_step)/jit(_threefry_split)/make_train_step.<locals>.train_step/shift_left',
     'top level'),
    ('jit(loss)/transpose(jvp(student))/Net/jvp(student)/Net/checkpoint/'
     'rematted_computation/blocks_1/tanh', 'student/Net/blocks_* (backward)'),
    ('jit(<lambda>)/while/body/closed_call/Net/checkpoint/blocks_0/fc/dot_general',
     'Net/blocks_*/fc'),
    ('jit(f)/SongUNet/enc_32x32_block3/jit(silu)/logistic', 'SongUNet/enc_32x32_block*'),
    ('jit(f)/SongUNet/dec_16x16_in1/conv0/conv_general_dilated', 'SongUNet/dec_16x16_in1/conv0'),
    ('jit(f)/SongUNet/map_layer0/dot_general', 'SongUNet/map_layer0'),
])
def test_scope_reads_the_layer_and_pass_from_a_name_stack(op_name, layer):
  assert profile.scope(op_name) == layer


def test_largest_scopes_keeps_the_top_and_sums_the_rest():
  totals = {'a': 5.0, 'b': 1.0, 'c': 3.0, 'd': 2.0}
  assert profile.largest_scopes(totals, top=2) == [('a', 5.0), ('c', 3.0),
                                                   ('(2 more layers)', 3.0)]
  assert profile.largest_scopes(totals, top=3) == [('a', 5.0), ('c', 3.0), ('d', 2.0),
                                                   ('b', 1.0)]


def test_module_name_error_names_what_to_pass():
  with pytest.raises(ValueError, match=r'compiled\.as_text\(\)'):
    profile.module_name('not hlo')


def test_breakdown_of_a_traced_program_puts_a_large_matmul_first(tmp_path):
  # Each 2048² product takes some 100 ms on a 2-core CPU, the elementwise fusion 3.5 ms:
  # a margin that a busy machine's stalls do not close (at 1024², 12 ms against 0.2 ms, a
  # stall in the fusion once put it first while another job shared the cores).
  def program(a):
    with jax.named_scope('product'):
      b = a @ a @ a
    return jnp.tanh(b) + 1.0

  a = jnp.ones((2048, 2048), jnp.float32)
  compiled = jax.jit(program).lower(a).compile()
  result = profile.breakdown(lambda: compiled(a), compiled.as_text(), iterations=2,
                             directory=str(tmp_path))
  assert result['trace'].startswith(str(tmp_path))
  assert result['kinds']['matmul'] > result['kinds']['elementwise'] > 0
  assert result['busy_ms'] == pytest.approx(sum(result['kinds'].values()))
  assert result['top'][0][1] == 'matmul' and result['top'][0][4] == 'product'
  assert result['scopes']['product'] > result['scopes']['top level'] > 0
  assert sum(result['scopes'].values()) == pytest.approx(result['busy_ms'])
  lines = profile.format_breakdown(result, step_ms=10.0)
  assert lines[0].startswith('device busy') and any('matmul' in l for l in lines[2:])
