import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import paths
from secant_jax.convert import common
from secant_jax.convert import edm as convert_edm
from secant_jax.models import edm_unet
from secant_jax.models import precond
from secant_jax.models import registry

EDM_CIFAR10_DDPMPP_COUNT = 55_733_891  # EDM's DDPM++ CIFAR-10 network (augment_dim 9)


def _trained_like(variables, seed=0):
  """EDM's init damps every residual branch by 1e-5; perturb the parameters so that the
  noise conditioning and dropout visibly act."""
  leaves, tree = jax.tree_util.tree_flatten(variables['params'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  return {**variables, 'params': jax.tree_util.tree_unflatten(tree, params)}


def _relative_change(a, b):
  """EDM initialises output layers at 1e-5 scale, so compare relative to the output."""
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _reduced(arch, **overrides):
  """Three resolutions with down/up-sampling and attention, at width 16 (parity size)."""
  return {**dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16,
                 channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,), augment_dim=9),
          **edm_unet.SETTINGS[arch], **overrides}


def _small(arch):
  """Two resolutions, one block each: enough for shapes, conditioning and dropout."""
  return _reduced(arch, channel_mult=(1, 2), num_blocks=1)


def test_cifar10_ddpmpp_parameter_count():
  model = edm_unet.cifar10('ddpmpp')
  variables = convert_edm.init_variables(model)
  print(f'EDM DDPM++ CIFAR-10 parameters: {common.parameter_count(variables):,}')
  assert common.parameter_count(variables) == EDM_CIFAR10_DDPMPP_COUNT


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_shapes_and_teacher_equality_at_equal_noise(arch):
  model = edm_unet.SongUNet(dropout=0.0, **_small(arch))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  c = jnp.array([0.3, -1.0])
  variables = _trained_like(model.init(jax.random.key(1), x, c, c))
  assert set(variables) == ({'params', 'buffers'} if arch == 'ncsnpp' else {'params'})
  both = model.apply(variables, x, c, c)
  assert both.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(both, model.apply(variables, x, c))
  assert _relative_change(model.apply(variables, x, c, c + 1.0), both) > 1e-3


def test_inference_variables_leave_a_bf16_unet_in_fp32():
  """Its GroupNorm scales in fp32: bf16 parameters would change the output, so
  `Network.inference_variables` must return them as they are."""
  module = edm_unet.SongUNet(dropout=0.0, dtype=jnp.bfloat16, **_small('ddpmpp'))
  network = registry.Network(module, guided=False, image_shape=(16, 16, 3), null_class=0)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  c = jnp.array([0.3, -1.0])
  variables = _trained_like(jax.jit(module.init)(jax.random.key(1), x, c, c))
  assert network.inference_variables(variables) is variables
  bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
  apply = jax.jit(module.apply)
  assert _relative_change(apply(bf16, x, c, c), apply(variables, x, c, c)) > 0


def test_dropout_needs_a_key_only_in_training():
  model = edm_unet.SongUNet(dropout=0.5, **_small('ddpmpp'))
  x, c = jnp.ones((1, 16, 16, 3)), jnp.zeros((1,))
  variables = _trained_like(model.init(jax.random.key(0), x, c, c))
  train = lambda key: model.apply(variables, x, c, c, train=True, rngs={'dropout': key})
  assert _relative_change(train(jax.random.key(1)), train(jax.random.key(2))) > 1e-3
  np.testing.assert_array_equal(model.apply(variables, x, c, c), model.apply(variables, x, c, c))


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="Unknown SongUNet settings 'adm'"):
    edm_unet.from_settings('adm')
  with pytest.raises(ValueError, match="encoder_type must be 'standard' or 'residual', got 'skip'"):
    edm_unet.SongUNet(encoder_type='skip')


def _torch_precond(arch, seed=0):
  import torch
  import torch_song_unet
  torch.manual_seed(seed)
  return torch_song_unet.Precond(**_reduced(arch)).eval()


@pytest.mark.torch
@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_parity_with_pytorch_song_unet_secant(arch):
  import torch
  net = _torch_precond(arch)
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  model = edm_unet.SongUNet(dropout=0.0, **_reduced(arch))
  variables = convert_edm.convert(state, convert_edm.init_variables(model),
                                  model.resample_filter)
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 16, 16, 3)) * 5).astype(np.float32)
  sigma_t = np.array([40.0, 2.0, 0.3], np.float32)
  sigma_s = np.array([10.0, 0.5, 0.02], np.float32)
  secant_fn = precond.secant_from_network(
      paths.EDM(), lambda x, ct, cs, y, w: model.apply(variables, x, ct, cs), sigma_data=0.5)
  out = np.asarray(jax.jit(secant_fn)(x, sigma_t, sigma_s, None, None))
  with torch.no_grad():
    ref = net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(sigma_t),
              torch.from_numpy(sigma_s)).permute(0, 2, 3, 1).numpy()
  err = np.abs(out - ref).max()
  print(f'{arch}: secant f max abs error {err:.2e} (|f| max {np.abs(ref).max():.2f})')
  assert err <= 1e-4
  # The network alone, before preconditioning, too.
  c_t, c_s = np.log(sigma_t) / 4, np.log(sigma_s) / 4
  raw = np.asarray(jax.jit(model.apply)(variables, x, c_t, c_s))
  with torch.no_grad():
    raw_ref = net.model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(c_t),
                        torch.from_numpy(c_s)).permute(0, 2, 3, 1).numpy()
  assert np.abs(raw - raw_ref).max() <= 1e-4


@pytest.mark.torch
def test_full_cifar10_checkpoint_is_accepted_and_counts_match():
  import torch_song_unet
  net = torch_song_unet.Precond(img_resolution=32, in_channels=3, out_channels=3,
                                model_channels=128, channel_mult=(2, 2, 2), augment_dim=9)
  assert sum(p.numel() for p in net.parameters()) == EDM_CIFAR10_DDPMPP_COUNT
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  model = edm_unet.cifar10('ddpmpp')
  variables = convert_edm.convert(state, convert_edm.init_variables(model), model.resample_filter)
  assert common.parameter_count(variables) == EDM_CIFAR10_DDPMPP_COUNT


@pytest.mark.torch
def test_wrong_architecture_is_named():
  state = {k: v.numpy() for k, v in _torch_precond('ncsnpp').state_dict().items()}
  model = edm_unet.SongUNet(**_reduced('ddpmpp'))
  with pytest.raises(common.ConversionError, match=r"resample_filter' is a 4-tap .* 2 taps"):
    convert_edm.convert(state, convert_edm.init_variables(model), model.resample_filter)


@pytest.mark.torch
def test_class_conditional_parity_with_one_hot_labels_and_zeros_for_the_null_class():
  import ml_collections
  import torch
  import torch_song_unet
  settings = _reduced('ddpmpp', augment_dim=0)
  torch.manual_seed(1)
  net = torch_song_unet.Precond(label_dim=10, **settings).eval()
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  network = registry.build(ml_collections.ConfigDict(dict(
      family='edm_unet', arch='ddpmpp', num_classes=10, dtype='float32',
      unet={k: v for k, v in settings.items() if k not in edm_unet.SETTINGS['ddpmpp']})),
      guided=False)
  assert network.null_class == 10 and network.module.label_dim == 10
  variables = convert_edm.convert(state, network.abstract_variables(),
                                  network.module.resample_filter)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  c_t = np.log(np.array([20.0, 1.0, 0.1], np.float32)) / 4
  c_s = np.log(np.array([5.0, 0.5, 0.05], np.float32)) / 4
  y = np.array([3, 10, 7], np.int32)  # 10: the null class
  out = np.asarray(jax.jit(network.apply)(variables, x, c_t, c_s, y, None))
  one_hot = np.eye(10, dtype=np.float32)[[3, 0, 7]]
  one_hot[1] = 0.0
  with torch.no_grad():
    ref = net.model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(c_t),
                    torch.from_numpy(c_s), torch.from_numpy(one_hot)).permute(0, 2, 3, 1)
  err = np.abs(out - ref.numpy()).max()
  print(f'class-conditional ddpmpp: network max abs error {err:.2e}')
  assert err <= 1e-4
  other = np.asarray(jax.jit(network.apply)(variables, x, c_t, c_s, np.array([4, 10, 7]), None))
  assert np.abs(other[0] - out[0]).max() > 1e-3  # the label acts
