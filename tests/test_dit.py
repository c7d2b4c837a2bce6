import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.ad_checkpoint import print_saved_residuals

from secant_jax import paths
from secant_jax.convert import common
from secant_jax.convert import sit as convert_sit
from secant_jax.models import dit
from secant_jax.models import precond
from secant_jax.models import registry
from secant_jax.train import parallel

NAMES = [f'DiT-{size}/{p}' for size in dit.SIZES for p in dit.PATCH_SIZES]
# Reduced models for parity: DiT-S/2 at two blocks, and a narrow SiT with patch 4.
CASES = {
    'DiT-S/2': dict(input_size=16, patch_size=2, hidden_size=384, depth=2, num_heads=6),
    'reduced SiT/4': dict(input_size=16, patch_size=4, hidden_size=96, depth=3, num_heads=4),
}


def _inputs(batch, size, channels, seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=rng.normal(size=(batch, size, size, channels)).astype(np.float32),
              t=rng.uniform(size=batch).astype(np.float32),
              s=rng.uniform(size=batch).astype(np.float32),
              y=rng.integers(0, 10, size=batch).astype(np.int32),
              w=rng.uniform(size=batch).astype(np.float32))


@pytest.mark.parametrize('name', NAMES)
def test_every_named_size_gives_nhwc_output(name):
  model = dit.from_name(name, input_size=32, guidance_embed=True)
  x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
  z = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, z, z, y, z)
  out = jax.eval_shape(model.apply, variables, x, z, z, y, z)
  assert out.shape == (2, 32, 32, 4) and out.dtype == jnp.float32


def test_unknown_name_and_wrong_input_are_named():
  with pytest.raises(ValueError, match=r"Unknown model name 'SiT-XXL/2'.*'SiT-XL/2'"):
    dit.from_name('SiT-XXL/2')
  model = dit.from_name('DiT-S/8', input_size=16, num_classes=10)
  with pytest.raises(ValueError, match=r'DiT input must be \[B, 16, 16, 4\] \(NHWC\)'):
    model.init(jax.random.key(0), jnp.zeros((1, 4, 16, 16)), jnp.zeros(1), jnp.zeros(1))


SIT_XL2_TORCH_COUNT = 675_129_632  # PyTorch's count: includes the fixed pos_embed
SIT_XL2_POS_EMBED = 256 * 1152


@pytest.mark.parametrize('family, num_classes', [('dit', 7), ('dit', 0), ('edm_unet', 10),
                                                 ('edm_unet', 0)])
def test_a_built_network_knows_its_classes_and_puts_the_null_class_after_them(
    family, num_classes):
  import ml_collections
  settings = (dict(name='DiT-S/8', input_size=16, in_channels=4) if family == 'dit' else
              dict(arch='ddpmpp', unet=dict(img_resolution=16, model_channels=16,
                                            channel_mult=(1,), num_blocks=1)))
  network = registry.build(ml_collections.ConfigDict(dict(
      family=family, num_classes=num_classes, dtype='float32', **settings)), guided=False)
  assert (network.num_classes, network.null_class) == (num_classes, num_classes)


def test_sit_xl2_parameter_count():
  """Flax holds the pos_embed as a constant, not a parameter; the secant model adds an
  s-embedder and a guidance embedder, each the size of the t-embedder."""
  count = lambda m: common.parameter_count(jax.eval_shape(lambda: convert_sit.init_variables(m)))
  n_teacher = count(dit.from_name('SiT-XL/2', two_times=False))
  n_secant = count(dit.from_name('SiT-XL/2', guidance_embed=True))
  print(f'SiT-XL/2 teacher {n_teacher:,} + pos_embed {SIT_XL2_POS_EMBED:,}; '
        f'secant with guidance embedding {n_secant:,}')
  assert n_teacher + SIT_XL2_POS_EMBED == SIT_XL2_TORCH_COUNT
  t_embedder = 256 * 1152 + 1152 + 1152 * 1152 + 1152
  assert n_secant == n_teacher + 2 * t_embedder


def test_bf16_forward_stays_close_to_fp32():
  kwargs = dict(CASES['DiT-S/2'], num_classes=10, guidance_embed=True)
  fp32, bf16 = (dit.DiT(dtype=d, **kwargs) for d in (jnp.float32, jnp.bfloat16))
  inp = _inputs(2, 16, 4)
  variables = fp32.init(jax.random.key(0), **inp)
  # Give the zero-initialised output layers weight so the comparison means something.
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), variables)
  ref = jax.jit(fp32.apply)(variables, **inp)
  out = jax.jit(bf16.apply)(variables, **inp)
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  print(f'bf16 vs fp32 relative error {rel:.4f}')
  assert out.dtype == jnp.float32 and rel < 0.03


def test_inference_variables_of_a_bf16_dit_are_bf16_and_change_no_output_bit():
  """Every DiT parameter enters a layer that casts it to the compute dtype, so casting
  them once beforehand (the sampler's and the frozen teacher's variables) is exact."""
  module = dit.DiT(dtype=jnp.bfloat16, num_classes=10, guidance_embed=True,
                   **CASES['reduced SiT/4'])
  network = registry.Network(module, guided=True, image_shape=(16, 16, 4), null_class=10)
  inp = _inputs(3, 16, 4)
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape),
      network.init(jax.random.key(0)))
  cast = network.inference_variables(variables)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
  apply = jax.jit(network.apply)
  np.testing.assert_array_equal(apply(cast, **inp), apply(variables, **inp))


def test_gelu_recomputed_keeps_only_its_input_for_the_backward_pass(capsys):
  """Plain autodiff of the tanh GELU keeps four [b, n, 4C]-shaped intermediates besides h;
  the recomputed one keeps h alone, with GELU's values and gradient."""
  h = jax.random.normal(jax.random.key(0), (4, 8), jnp.bfloat16)
  loss = lambda gelu: (lambda u: gelu(u).astype(jnp.float32).sum())
  plain = lambda u: nn.gelu(u, approximate=True)
  print_saved_residuals(loss(dit.gelu_recomputed), h)
  saved = [line for line in capsys.readouterr().out.splitlines() if '[4,8]' in line]
  assert saved == ['bf16[4,8] from the argument u']
  np.testing.assert_array_equal(dit.gelu_recomputed(h), plain(h))
  h32 = h.astype(jnp.float32)
  np.testing.assert_allclose(jax.grad(loss(dit.gelu_recomputed))(h32),
                             jax.grad(loss(plain))(h32), rtol=1e-6, atol=1e-7)


def test_layer_norm_is_two_pass_where_evaluated_and_one_pass_where_differentiated():
  """Evaluated, layer_norm keeps its precision on rows whose mean dwarfs their spread (as
  PyTorch's Welford LayerNorm does), where E[x²] − E[x]² in float32 loses it; differentiated,
  it is the one-pass form, with that form's derivative, which is LayerNorm's."""
  rng = np.random.default_rng(0)
  offset = (1000 + 0.01 * rng.normal(size=(2, 64))).astype(np.float32)
  exact = lambda a: ((a - a.mean(-1, keepdims=True))
                     / np.sqrt(a.var(-1, keepdims=True) + dit.LAYER_NORM_EPSILON))
  reference = exact(offset.astype(np.float64))
  assert np.abs(dit.layer_norm(jnp.asarray(offset)) - reference).max() < 0.01
  assert np.abs(dit._one_pass_normalize(jnp.asarray(offset)) - reference).max() > 1
  x = rng.normal(size=(3, 5, 16)).astype(np.float32) * 2 + 1
  np.testing.assert_allclose(dit.layer_norm(jnp.asarray(x)), exact(x.astype(np.float64)),
                             atol=1e-5)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  objective = lambda norm: lambda u: jnp.sum(norm(u) * cotangent)
  grad = jax.grad(objective(dit.layer_norm))(jnp.asarray(x))
  np.testing.assert_array_equal(grad, jax.grad(objective(dit._one_pass_normalize))(x))
  step = 1e-3  # central differences of the exact LayerNorm, in float64
  basis = np.eye(x.size).reshape(x.size, *x.shape)[::17]
  numeric = [np.sum((exact(x + step * e) - exact(x - step * e)) * cotangent) / (2 * step)
             for e in basis.astype(np.float64)]
  np.testing.assert_allclose(np.asarray(grad).reshape(-1)[::17], numeric, rtol=1e-3,
                             atol=1e-4)
  tangent_out = jax.jvp(dit.layer_norm, (jnp.asarray(x),), (jnp.ones_like(x),))[1]
  np.testing.assert_allclose(tangent_out, 0.0, atol=1e-5)  # a shift changes no LayerNorm
  assert dit.layer_norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_qkv_projection_is_timms_fused_linear_whether_split_or_not():
  """Both forms hold nn.Dense(3·hidden)'s parameters, initialised as it initialises them,
  and compute its q, k, v: the fused form bit for bit, the split one to rounding."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 12))
  dense = nn.Dense(36, kernel_init=nn.initializers.xavier_uniform())
  fused, split = (dit.QKVProjection(12, 3, split=s) for s in (False, True))
  reference = dense.init(jax.random.key(1), x)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, fused.init(jax.random.key(1), x), reference))
  variables = jax.tree_util.tree_map(lambda a: a + 0.1, reference)  # a non-zero bias
  expected = jnp.moveaxis(dense.apply(variables, x).reshape(2, 5, 3, 3, 4), 2, 0)
  for got, want in zip(fused.apply(variables, x), expected):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(split.apply(variables, x), expected):
    assert got.shape == (2, 5, 3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_dit_with_split_qkv_takes_the_same_variables_and_gives_the_same_output():
  kwargs = dict(CASES['reduced SiT/4'], num_classes=10, guidance_embed=True)
  fused, split = (dit.DiT(split_qkv=s, **kwargs) for s in (False, True))
  inp = _inputs(2, 16, 4)
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape),
      fused.init(jax.random.key(0), **inp))
  np.testing.assert_allclose(jax.jit(split.apply)(variables, **inp),
                             jax.jit(fused.apply)(variables, **inp), rtol=1e-5, atol=1e-5)


def test_attention_per_device_on_a_mesh_gives_the_same_values_and_gradients():
  """dit.Attention with a mesh: shard_map over the batch (split over both axes, as the
  train step splits it), the values and gradients of the plain network; a batch that does
  not split evenly (initialisation's) runs unsplit."""
  mesh = parallel.make_mesh(2, jax.devices()[:4])
  kwargs = dict(CASES['reduced SiT/4'], num_classes=10, remat=True)
  plain, per_device = dit.DiT(**kwargs), dit.DiT(attention_mesh=mesh, **kwargs)
  inp = _inputs(8, 16, 4)
  inp.pop('w')
  variables = per_device.init(jax.random.key(0), **{k: v[:1] for k, v in inp.items()})
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), variables)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  inp = jax.device_put(inp, batch)
  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda v, inp: jnp.mean(model.apply(v, **inp) ** 2)))
  (value, grads), (want, want_grads) = loss(per_device)(variables, inp), loss(plain)(
      variables, inp)
  assert value > 0.01
  np.testing.assert_allclose(value, want, rtol=1e-5)
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7),
                         grads, want_grads)
  program = lambda model, inp: jax.jit(model.apply).lower(variables, **inp).as_text()
  assert program(per_device, inp).count('sdy.manual_computation') == kwargs['depth']
  assert 'manual_computation' not in program(plain, inp)
  odd = jax.device_put({k: v[:6] for k, v in inp.items()})  # 6 over 4 devices
  assert 'manual_computation' not in program(per_device, odd)


@pytest.mark.parametrize('attention, devices, per_device', [
    ('cudnn', 2, True), ('cudnn', 1, False), ('', 2, False), ('xla', 2, False)])
def test_only_cudnn_attention_on_several_devices_is_built_to_run_per_device(
    attention, devices, per_device):
  import ml_collections
  mesh = parallel.make_mesh(1, jax.devices()[:devices])
  network = registry.build(ml_collections.ConfigDict(dict(
      family='dit', name='DiT-S/8', input_size=16, in_channels=4, num_classes=10,
      dtype='bfloat16', attention=attention)), guided=False, mesh=mesh)
  assert network.module.attention_mesh is (mesh if per_device else None)


def test_cudnn_attention_in_float32_is_refused_and_measured_runs_use_xlas():
  """cuDNN's kernel takes float16/bfloat16 only: a float32 DiT with it is refused when
  built, and the float32 copy an integration error measures (compare_in_float32) of a run
  trained with it uses XLA's attention."""
  import ml_collections
  from secant_jax.evaluation import reference_error
  run = ml_collections.ConfigDict(dict(model=dict(
      family='dit', name='DiT-S/8', input_size=16, in_channels=4, num_classes=10,
      dtype='bfloat16', residual_dtype='float32', attention='cudnn')))
  assert registry.build(run.model, guided=False).module.attention_implementation == 'cudnn'
  measured = reference_error.measured_config(run, True)
  assert (measured.model.dtype, measured.model.attention) == ('float32', 'xla')
  assert registry.build(measured.model, guided=False).module.dtype == jnp.float32
  assert run.model.attention == 'cudnn'  # the run's own config is left as it was
  with pytest.raises(ValueError, match=r"config.model.attention='cudnn' computes in float16 "
                     r"or bfloat16 only, and config.model.dtype is 'float32': set "
                     r"--config.model.dtype=bfloat16 or --config.model.attention=''"):
    registry.build(ml_collections.ConfigDict({**run.model.to_dict(), 'dtype': 'float32'}),
                   guided=False)


def _torch_model(unit_gain=False, **kwargs):
  import torch_dit
  return torch_dit.with_random_weights(0, unit_gain, **kwargs).eval()


def _torch_out(model, inp, with_s=True, with_w=False):
  import torch
  x = torch.from_numpy(inp['x']).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = model(x, torch.from_numpy(inp['t']), torch.from_numpy(inp['s']) if with_s else None,
                torch.from_numpy(inp['y']).long(), torch.from_numpy(inp['w']) if with_w else None)
  return out.float().permute(0, 2, 3, 1).numpy()


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.torch
@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('guidance_embed', [False, True])
def test_parity_with_pytorch_secant_dit(case, guidance_embed):
  arch = dict(CASES[case], in_channels=4, num_classes=10)
  torch_model = _torch_model(guidance_embed=guidance_embed, **arch)
  model = dit.DiT(guidance_embed=guidance_embed, **arch)
  inp = _inputs(3, arch['input_size'], 4)
  template = jax.eval_shape(model.init, jax.random.key(0), **inp)
  variables = convert_sit.convert(_state_dict(torch_model), template)
  out = np.asarray(model.apply(variables, **inp))
  ref = _torch_out(torch_model, inp, with_w=guidance_embed)
  err = np.abs(out - ref).max()
  print(f'{case} guidance={guidance_embed}: max abs error {err:.2e} (output std {ref.std():.2f})')
  assert err <= 1e-4


# The bf16 comparison's models: a 12-block DiT-S/2, and SiT-XL/2's shape (70 s and 9 GB of
# memory on 2 CPU cores).
BF16_CASES = {
    'DiT-S/2, 12 blocks': dict(CASES['DiT-S/2'], depth=12),
    'SiT-XL/2': dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}


@pytest.mark.torch
@pytest.mark.parametrize('case', ['DiT-S/2, 12 blocks',
                                  pytest.param('SiT-XL/2', marks=pytest.mark.slow)])
def test_bf16_dit_is_as_precise_as_pytorch_bf16_autocast(case):
  """The official code trains under autocast, which keeps the residual stream and c in
  float32; so does a bfloat16 DiT by default, and its error to the float32 model stays near
  autocast's. A bfloat16 residual stream (the option that moves fewer bytes) is worse.
  Weights of unit gain (`torch_dit.randomize`), for 28 blocks of width 1152."""
  import torch
  arch = dict(BF16_CASES[case], in_channels=4, num_classes=10)
  torch_model = _torch_model(unit_gain=True, **arch)
  inp = _inputs(2, arch['input_size'], 4)
  ref = _torch_out(torch_model, inp)
  relative_error = lambda out: np.linalg.norm(out - ref) / np.linalg.norm(ref)
  autocast = {}
  for dtype in (torch.bfloat16, torch.float16):
    with torch.autocast('cpu', dtype=dtype):
      autocast[dtype] = relative_error(_torch_out(torch_model, inp))
  errors = {}
  for residual in ('float32', 'bfloat16'):
    model = dit.DiT(dtype=jnp.bfloat16, residual_dtype=jnp.dtype(residual), **arch)
    variables = convert_sit.convert(_state_dict(torch_model),
                                    jax.eval_shape(model.init, jax.random.key(0), **inp))
    errors[residual] = relative_error(np.asarray(jax.jit(model.apply)(variables, **inp)))
    del variables
  print(f'{case}: relative error to float32: PyTorch bf16 autocast '
        f'{autocast[torch.bfloat16]:.5f} (fp16 autocast {autocast[torch.float16]:.5f}), ours '
        f'with a float32 residual stream {errors["float32"]:.5f}, a bfloat16 one '
        f'{errors["bfloat16"]:.5f}')
  assert errors['float32'] < 1.25 * autocast[torch.bfloat16]
  assert errors['bfloat16'] > 1.5 * autocast[torch.bfloat16]


@pytest.mark.torch
def test_converted_teacher_reproduces_the_teacher_at_s_equals_t():
  arch = dict(CASES['DiT-S/2'], in_channels=4, num_classes=10)
  teacher = _torch_model(two_times=False, **arch)
  model = dit.DiT(guidance_embed=True, **arch)
  inp = _inputs(3, arch['input_size'], 4)
  variables = convert_sit.convert(_state_dict(teacher), convert_sit.init_variables(model))
  np.testing.assert_array_equal(variables['params']['s_embedder']['mlp_0']['kernel'],
                                variables['params']['t_embedder']['mlp_0']['kernel'])
  secant_fn = precond.secant_from_network(
      paths.Linear(), lambda x, t, s, y, w: model.apply(variables, x, t, s, y, w))
  tangent = precond.tangent_from_secant(secant_fn)(inp['x'], inp['t'], inp['y'], inp['w'])
  ref = _torch_out(teacher, inp, with_s=False)
  assert np.abs(np.asarray(tangent) - ref).max() <= 1e-4
  # ...and the one-time Flax teacher is the same function.
  one_time = dit.DiT(two_times=False, **arch)
  tv = convert_sit.convert(_state_dict(teacher), jax.eval_shape(
      one_time.init, jax.random.key(0), inp['x'], inp['t'], None, inp['y']))
  assert np.abs(np.asarray(one_time.apply(tv, inp['x'], inp['t'], None, inp['y'])) - ref).max() <= 1e-4


@pytest.mark.torch
def test_full_sit_xl2_checkpoint_shapes_are_accepted_without_running_it():
  import torch
  import torch_dit
  with torch.device('meta'):
    teacher = torch_dit.SecantDiT(two_times=False)
  print(f'PyTorch SiT-XL/2 parameters: {sum(p.numel() for p in teacher.parameters()):,}')
  assert sum(p.numel() for p in teacher.parameters()) == SIT_XL2_TORCH_COUNT
  state = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in teacher.state_dict().items()}
  state['pos_embed'] = dit.sincos_position_embedding(1152, 16)[None]
  model = dit.from_name('SiT-XL/2', two_times=False)
  template = jax.eval_shape(lambda: convert_sit.init_variables(model))
  variables = common.convert({k: v for k, v in state.items() if k != 'pos_embed'}, template)
  assert common.parameter_count(variables) == SIT_XL2_TORCH_COUNT - SIT_XL2_POS_EMBED


def test_conversion_errors_name_the_key_and_shapes():
  arch = dict(CASES['reduced SiT/4'], in_channels=4, num_classes=10)
  model = dit.DiT(two_times=False, **arch)
  inp = _inputs(1, 16, 4)
  template = jax.eval_shape(model.init, jax.random.key(0), inp['x'], inp['t'], None, inp['y'])
  flat = {}
  for path, leaf in traverse_util.flatten_dict(template['params']).items():
    key = common.torch_key(path[:-1]) + '.' + ('bias' if path[-1] == 'bias' else 'weight')
    shape = leaf.shape
    if path[-1] == 'kernel':  # PyTorch layouts: Linear [out, in], Conv [out, in, kh, kw]
      shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    flat[key] = np.zeros(shape, np.float32)
  assert common.parameter_count(convert_sit.convert(flat, template)) == common.parameter_count(
      template)
  bad = dict(flat, **{'blocks.1.attn.qkv.weight': np.zeros((288, 95), np.float32)})
  with pytest.raises(common.ConversionError,
                     match=r"Shape mismatch for 'blocks.1.attn.qkv.weight': checkpoint has "
                           r"\(288, 95\).*expects \(96, 288\)"):
    convert_sit.convert(bad, template)
  with pytest.raises(common.ConversionError, match=r"Unexpected key 'blocks.7.attn.qkv.weight'"):
    convert_sit.convert(dict(flat, **{'blocks.7.attn.qkv.weight': np.zeros(1)}), template)
  missing = {k: v for k, v in flat.items() if k != 'final_layer.linear.bias'}
  with pytest.raises(common.ConversionError, match=r'Missing 1 key.*final_layer.linear.bias'):
    convert_sit.convert(missing, template)
  with pytest.raises(common.ConversionError, match="Key 'pos_embed'"):
    convert_sit.convert(dict(flat, pos_embed=np.ones((1, 16, 96), np.float32)), template)
