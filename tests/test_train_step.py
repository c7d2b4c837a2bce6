import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from configs import demo as demo_config
from secant_jax import paths
from secant_jax.models import dit
from secant_jax.models import registry
from secant_jax.train import loop
from secant_jax.train import parallel
from secant_jax.train import recipe
from secant_jax.train import state as state_lib
from secant_jax.train import step as step_lib

ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
            num_classes=10)
BATCH = 16


def _apply(model):
  return lambda v, x, t, s, y, w, key: model.apply(v, x, t, s, y, w)


def _setup(variant, guidance_range=(1.0, 2.5), mesh=None, microbatches=1):
  """A tiny DiT student and teacher; with `mesh`, their applies gather FSDP-sharded
  variables as the trainer's do (`parallel.fsdp_apply`)."""
  guided = variant in ('sdei', 'stei', 'sdee')
  wrap = (lambda apply: apply) if mesh is None else (
      lambda apply: parallel.fsdp_apply(apply, mesh))
  student = dit.DiT(guidance_embed=guided, **ARCH)
  teacher = dit.DiT(**ARCH)
  x = jax.random.normal(jax.random.key(0), (BATCH, 8, 8, 4))
  y = jnp.arange(BATCH) % 10
  z = jnp.full((BATCH,), 0.5)
  perturb = lambda v, k: jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.fold_in(k, a.size), a.shape), v)
  variables = perturb(student.init(jax.random.key(1), x, z, z, y, z if guided else None),
                      jax.random.key(2))
  teacher_variables = perturb(teacher.init(jax.random.key(3), x, z, z, y), jax.random.key(4))
  task = step_lib.SecantTask(variant=variant, path=paths.Linear(), num_steps=4, null_class=10,
                             label_dropout=0.1 if variant in ('stei', 'stee') else 0.0,
                             guidance_range=guidance_range if guided else None)
  optimizer = optax.adamw(1e-3, weight_decay=0.0)
  train_step = step_lib.make_train_step(task, wrap(_apply(student)), wrap(_apply(teacher)),
                                        optimizer, ema_decay=0.9,
                                        microbatches=microbatches)
  state = state_lib.create(variables, optimizer, jax.random.key(5))
  return train_step, state, teacher_variables, {'x': x, 'y': y}


@pytest.mark.parametrize('variant', ['sdei', 'stei', 'sdee', 'stee', 'diffusion'])
def test_one_step_per_variant_moves_params_and_ema(variant):
  train_step, state, teacher_variables, batch = _setup(variant)
  new, metrics = jax.jit(train_step)(state, teacher_variables, batch)
  assert int(new.step) == 1
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  delta = lambda a, b: max(float(jnp.abs(u - v).max()) for u, v in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  assert delta(new.params, state.params) > 0
  # EMA with decay 0.9: ema' = 0.9·ema + 0.1·params'.
  for e_new, e_old, p_new in zip(*(jax.tree_util.tree_leaves(t) for t in (
      new.ema_params, state.ema_params, new.params))):
    np.testing.assert_allclose(e_new, 0.9 * e_old + 0.1 * p_new, rtol=1e-6, atol=1e-7)
  if variant == 'stei':
    assert float(metrics['loss_diffusion']) > 0


@pytest.mark.parametrize('guided', [True, False], ids=['embedded-guidance', 'unguided'])
def test_stei_drops_labels_in_its_unguided_terms_only(guided):
  """Label dropout 1 and a stand-in network that ignores x: on the diagonal s = t (only the
  diffusion term calls it there) it returns 100·[y = null] + 1000·w (w normalised), off it
  100·[y = null]; the teacher returns 0 and the data are 0. With embedded guidance the
  secant term sees the true labels (f = 0 = its CFG target: term 0) and the diffusion term
  dropped labels at w = 1, normalised 0 (f = 100 against the tangent −ε: term ≈ 100² + 1);
  without, both terms see dropped labels (secant term 100²)."""
  null = 10

  def apply_fn(variables, x, t, s, y, w, key):
    is_null = 100.0 * (y == null)
    diagonal = is_null + (0.0 if w is None else 1000.0 * w)
    f = jnp.where(t == s, diagonal, is_null) + 0.0 * variables['params']['b']
    return jnp.broadcast_to(f[:, None, None, None], x.shape)

  teacher_apply = lambda variables, x, t, s, y, w, key: jnp.zeros_like(x)
  task = step_lib.SecantTask('stei', paths.Linear(), 4, null, label_dropout=1.0,
                             guidance_range=(1.0, 2.5) if guided else None)
  optimizer = optax.sgd(0.1)
  train_step = step_lib.make_train_step(task, apply_fn, teacher_apply, optimizer, 0.9)
  state = state_lib.create({'params': {'b': jnp.zeros(())}}, optimizer, jax.random.key(0))
  batch = {'x': jnp.zeros((BATCH, 8, 8, 4)), 'y': jnp.arange(BATCH) % null}
  _, metrics = jax.jit(train_step)(state, {}, batch)
  assert float(metrics['loss_secant']) == (0.0 if guided else 100.0 ** 2)
  np.testing.assert_allclose(float(metrics['loss_diffusion']), 100.0 ** 2 + 1, rtol=0.02)


def _params_after(train_step, state, teacher_variables, batch, mesh=None, fsdp=False):
  if mesh is None:
    new, _ = jax.jit(train_step)(state, teacher_variables, batch)
    return new.params
  state_sharding = parallel.tree_sharding(state, mesh, fsdp, min_size=256)
  teacher_sharding = parallel.tree_sharding(teacher_variables, mesh, fsdp, min_size=256)
  step = parallel.jit_train_step(train_step, state_sharding, teacher_sharding, mesh)
  state = jax.device_put(state, state_sharding)
  if fsdp:
    specs = [s.spec for s in jax.tree_util.tree_leaves(state_sharding)]
    assert any('fsdp' in spec for spec in specs)
  new, _ = step(state, jax.device_put(teacher_variables, teacher_sharding),
                jax.device_put(batch, parallel.batch_sharding(mesh)))
  return new.params


@pytest.mark.parametrize('fsdp', [1, 4], ids=['data-parallel', 'fsdp4'])
def test_sharded_step_equals_single_device_step(fsdp):
  assert jax.device_count() == 8
  train_step, state, teacher_variables, batch = _setup('sdei')
  single = _params_after(train_step, state, teacher_variables, batch)
  mesh = parallel.make_mesh(fsdp)
  train_step, *_ = _setup('sdei', mesh=mesh)
  sharded = _params_after(train_step, state, teacher_variables, batch, mesh, fsdp > 1)
  err = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)))
  print(f'fsdp={fsdp}: max abs difference of new params {err:.2e}')
  assert err <= 1e-5


@pytest.mark.parametrize('variant', ['sdei', 'stee'])
def test_microbatches_accumulate_the_gradient_of_the_whole_batch(variant):
  """Gradient accumulation over 2 and 4 slices of the batch takes the step the whole batch
  takes at once (the same draws; rounding apart), also on 8 devices, each slice split over
  all of them."""
  train_step, state, teacher_variables, batch = _setup(variant)
  whole, whole_metrics = jax.jit(train_step)(state, teacher_variables, batch)
  differences = lambda a, b: max(float(jnp.abs(u - v).max()) for u, v in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  for microbatches in (2, 4):
    step, *_ = _setup(variant, microbatches=microbatches)
    new, metrics = jax.jit(step)(state, teacher_variables, batch)
    print(f'{variant}, {microbatches} microbatches: max abs difference of new params '
          f'{differences(new.params, whole.params):.2e}, of the loss '
          f'{abs(float(metrics["loss"]) - float(whole_metrics["loss"])):.2e}')
    assert differences(new.params, whole.params) <= 1e-5
    for name, value in whole_metrics.items():
      np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  mesh = parallel.make_mesh(1)
  step, *_ = _setup(variant, mesh=mesh, microbatches=2)
  assert differences(_params_after(step, state, teacher_variables, batch, mesh),
                     whole.params) <= 1e-5


def test_fsdp_apply_gathers_the_weights_and_keeps_the_batch_split():
  """Under FSDP a weight sharded on its output axis meets a batch-split activation; left to
  itself XLA gathers the activation (on this CPU too: the output then stays split over
  'data' only), which on TPU v5e cost more memory than sharding the state saved.
  `fsdp_apply` gathers the weight instead: the only all-gather is the weight's, and the
  output stays split over all devices like the batch."""
  mesh = parallel.make_mesh(4)
  w = jax.device_put(jnp.ones((64, 256)), parallel.tree_sharding(
      jnp.ones((64, 256)), mesh, fsdp=True, min_size=1))
  assert w.sharding.spec == PartitionSpec(None, 'fsdp')
  x = jax.device_put(jnp.ones((16, 64)), parallel.batch_sharding(mesh))
  layer = lambda v, x: jnp.tanh(x @ v['w']) @ v['w'].T
  compiled = jax.jit(parallel.fsdp_apply(layer, mesh)).lower({'w': w}, x).compile()
  assert compiled.output_shardings.spec == parallel.batch_sharding(mesh).spec
  gathers = [line.split('=')[1].split()[0] for line in compiled.as_text().splitlines()
             if ' all-gather(' in line]
  assert gathers and all(shape.startswith('f32[64,256]') for shape in gathers), gathers
  assert parallel.fsdp_apply(layer, parallel.make_mesh(1)) is layer


def test_no_recompilation_after_the_first_step():
  train_step, state, teacher_variables, batch = _setup('stee')
  mesh = parallel.make_mesh(1)
  state_sharding = parallel.tree_sharding(state, mesh)
  step = parallel.jit_train_step(chex.assert_max_traces(train_step, n=1), state_sharding,
                                 parallel.tree_sharding(teacher_variables, mesh), mesh)
  state = jax.device_put(state, state_sharding)
  losses = []
  for _ in range(3):
    state, metrics = step(state, teacher_variables, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 3 and len(set(losses)) == 3  # fresh draws every step


def test_bad_setups_are_named():
  for batch in (30, 0):
    with pytest.raises(ValueError, match=rf'Global batch size {batch} is not a positive '
                                         r'multiple of the 8 devices; set config.fid.'
                                         r'batch_size to a multiple of 8\.'):
      parallel.check_batch_size(batch, parallel.make_mesh(1), 'config.fid.batch_size')
  with pytest.raises(ValueError, match=r'Global batch size 24 is not a positive multiple of '
                                       r'2 microbatches \(config.microbatches\) × 8 devices; '
                                       r"set the config's batch_size to a multiple of 16\."):
    parallel.check_batch_size(24, parallel.make_mesh(1), microbatches=2)
  with pytest.raises(ValueError, match=r'microbatches \(config.microbatches\) must be a '
                                       r'positive integer \(1: no gradient accumulation\), '
                                       r'got 0\.'):
    _setup('stee', microbatches=0)
  train_step, state, teacher_variables, batch = _setup('stee', microbatches=3)
  with pytest.raises(ValueError, match=r'The batch of 16 examples does not split into 3 '
                                       r'equal microbatches \(config.microbatches\); set '
                                       r'config.batch_size to a multiple of 3\.'):
    jax.jit(train_step)(state, teacher_variables, batch)
  with pytest.raises(ValueError, match='fsdp=3 does not divide the 8 devices'):
    parallel.make_mesh(3)
  with pytest.raises(ValueError, match="Unknown secant variant 'sdie'"):
    step_lib.SecantTask(variant='sdie', path=paths.Linear(), num_steps=4, null_class=10)
  bad_settings = [
      (dict(num_steps=0), r'num_steps \(config.secant.steps\) must be a positive integer, '
                          'got 0'),
      (dict(label_dropout=1.5), r'label_dropout \(config.secant.label_dropout\) must be in '
                                r'\[0, 1\], got 1.5'),
      (dict(guidance_range=(2.5, 1.0)), r'guidance_range \(config.secant.guidance\) must be '
                                        r'\(w_min, w_max\) with w_min <= w_max, got '
                                        r'\(2.5, 1.0\)'),
      (dict(guidance_range=(1.0,)), r'must be \(w_min, w_max\) .* got \(1.0,\)'),
      (dict(variant='stei', stei_target='ema'), r"stei_target \(config.secant.stei_target\) "
                                                r"must be one of \('teacher', 'self'\)"),
      (dict(variant='stei', stei_target='self', guidance_range=(1.0, 2.5)),
       r"stei_target='self' trains without a teacher, .* guidance_range is \(1.0, 2.5\): set "
       r"none with --config.secant.guidance='\(\)'"),
      (dict(loss_weighting='sigma'), r"loss_weighting \(config.secant.loss_weighting\) must "
                                     r"be one of \('uniform', 'edm'\), got 'sigma'"),
      (dict(loss_weighting='edm'), r"loss_weighting \(config.secant.loss_weighting\)='edm' "
                                   r"weights the network output of EDM's preconditioning, "
                                   r"which only the EDM path has; the path is Linear\(\)"),
  ]
  for change, message in bad_settings:
    settings = dict(variant='sdei', path=paths.Linear(), num_steps=4, null_class=10)
    with pytest.raises(ValueError, match=message):
      step_lib.SecantTask(**{**settings, **change})
  task = step_lib.SecantTask(variant='sdei', path=paths.Linear(), num_steps=4, null_class=10)
  with pytest.raises(ValueError, match="Variant 'sdei' needs a teacher"):
    step_lib.make_train_step(task, None, None, optax.sgd(0.1), 0.9)


def test_float16_training_and_settings_no_network_takes_are_refused():
  """float16 would need loss scaling, so the trainer's step (and the benchmark's, the same)
  refuses it; a dtype or attention no network takes is named with the ones it could be."""
  config = demo_config.get_config()
  with config.unlocked():
    config.model.dtype = 'float16'
  network = recipe.make_network(config)  # float16 builds: it is training that is refused
  with pytest.raises(ValueError, match=r"config.model.dtype='float16' does not train: "
                                       'without loss scaling'):
    recipe.make_train_step(config, recipe.make_task(config, network), network, None,
                           optax.sgd(0.1), parallel.make_mesh(1))
  for key, value, allowed in [('dtype', 'int8', "'float32', 'bfloat16', 'float16'"),
                              ('dtype', 'float', None), ('residual_dtype', 'float16',
                                                         "'float32', 'bfloat16'")]:
    bad = demo_config.get_config()
    with bad.unlocked():
      bad.model[key] = value
    with pytest.raises(ValueError, match=rf"config.model.{key}='{value}' is not a dtype the "
                                         rf"networks compute in: expected one of "
                                         rf"\({allowed or '.*'}\); set --config.model.{key}"):
      registry.build(bad.model, guided=False)
  bad = demo_config.get_config()
  with bad.unlocked():
    bad.model.attention = 'flash'
  with pytest.raises(ValueError, match=r"config.model.attention='flash' is not an attention "
                                       r"implementation: expected one of \('', 'xla', "
                                       r"'cudnn'\); set --config.model.attention"):
    registry.build(bad.model, guided=False)


def test_ema_warmup_follows_the_params_early_and_caps_at_the_decay():
  decays = [float(step_lib.ema_decay_at(k, 0.999, True)) for k in (0, 10, 2000, 100_000)]
  np.testing.assert_allclose(decays, [0.1, 11 / 20, 2001 / 2010, 0.999], rtol=1e-6)
  assert step_lib.ema_decay_at(0, 0.999, False) == 0.999
  _, state, _, batch = _setup('diffusion')
  optimizer = optax.adamw(1e-3, weight_decay=0.0)
  task = step_lib.SecantTask(variant='diffusion', path=paths.Linear(), num_steps=1,
                             null_class=10)
  model = dit.DiT(**ARCH)
  warm = step_lib.make_train_step(task, _apply(model), None, optimizer, 0.999, ema_warmup=True)
  new, _ = jax.jit(warm)(state, None, batch)
  for e_new, e_old, p_new in zip(*(jax.tree_util.tree_leaves(t) for t in (
      new.ema_params, state.ema_params, new.params))):
    np.testing.assert_allclose(e_new, 0.1 * e_old + 0.9 * p_new, rtol=1e-5, atol=1e-6)


def test_the_emas_share_of_the_initial_weights_and_the_warning_of_a_large_one(caplog):
  """An EMA that starts at 1 while the parameters stay 0 is, after N updates, the share of
  the initial weights; a run whose exported EMA would keep more than 1% of them is told."""
  for decay, warmup, steps in [(0.999, False, 1000), (0.99, True, 50), (0.999, True, 2000)]:
    ema = 1.0
    for k in range(steps):
      ema *= min(decay, (1 + k) / (10 + k)) if warmup else decay
    np.testing.assert_allclose(step_lib.ema_initial_share(decay, warmup, steps), ema,
                               rtol=1e-4)
  np.testing.assert_allclose(step_lib.ema_initial_share(0.999, False, 1000), 0.36770,
                             rtol=1e-4)
  config = demo_config.get_config()
  with config.unlocked():
    config.ema_decay, config.ema_warmup, config.num_train_steps = 0.999, False, 1000
  loop._warn_of_initial_weights_in_ema(config)  # pylint: disable=protected-access
  assert ('The EMA at decay 0.999 over 1000 steps keeps 36.8% of the weights the run starts '
          'from; set --config.ema_warmup=True' in caplog.text)
  caplog.clear()
  for change in (dict(ema_warmup=True), dict(num_train_steps=5000)):  # 0.67%
    quiet = config.copy_and_resolve_references()
    quiet.update(change)
    loop._warn_of_initial_weights_in_ema(quiet)  # pylint: disable=protected-access
  assert 'The EMA at decay' not in caplog.text


@pytest.mark.torch
def test_the_optimizer_steps_as_torch_adamw_does():
  """The configs' AdamW (recipe.make_optimizer) against torch.optim.AdamW, the official
  train.py's optimizer, over five steps of the same gradients; eps and weight decay set
  large enough that where each enters the update shows (eps beside √v̂ of gradients of its
  size; decay decoupled from the moments)."""
  import ml_collections
  import torch
  from secant_jax.train import recipe
  opt_config = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-3, grad_clip=0.0,
      warmup_steps=0))
  rng = np.random.default_rng(0)
  start = rng.normal(size=(3, 4)).astype(np.float32)
  grads = (rng.normal(size=(5, 3, 4)) * 1e-3).astype(np.float32)
  optimizer = recipe.make_optimizer(opt_config)
  params, opt_state = jnp.asarray(start), optimizer.init(jnp.asarray(start))
  weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
  torch_opt = torch.optim.AdamW([weight], lr=1e-2, betas=(0.9, 0.999), eps=1e-3,
                                weight_decay=0.05)
  for g in grads:
    updates, opt_state = optimizer.update(jnp.asarray(g), opt_state, params)
    params = optax.apply_updates(params, updates)
    weight.grad = torch.from_numpy(g.copy())
    torch_opt.step()
  np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-6,
                             atol=1e-7)
  assert np.abs(np.asarray(params) - start).max() > 1e-3  # the steps moved the weights
