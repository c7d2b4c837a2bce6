"""Parity with the upstream PyTorch code itself, not our statements of it (tests/torch_dit.py,
tests/torch_song_unet.py, test_official_losses, test_sampling's Algorithm 2): the official
secant code (SECANT_EXPECTATION_DIR, a checkout of poppuppy/secant_expectation: its
models.py, models_original.py, transport/ and train.py, which need timm, torchdiffeq and
accelerate), EDM's training/networks.py and generate.py's sampler (EDM_DIR, a checkout
of NVlabs/edm; its generate.py needs click) and the crop of fast-DiT's
extract_features.py, which made the official code's latents (FASTDIT_DIR, a checkout of
chuanyangjin/fast-DiT; only that function is run). None can be fetched where CI runs, so
each test is skipped unless its variable names a checkout:

    git clone https://github.com/poppuppy/secant_expectation /src/secant_expectation
    git clone https://github.com/NVlabs/edm /src/edm
    git clone https://github.com/chuanyangjin/fast-DiT /src/fast-DiT
    pip install timm torchdiffeq click accelerate
    SECANT_EXPECTATION_DIR=/src/secant_expectation EDM_DIR=/src/edm FASTDIT_DIR=/src/fast-DiT \
      pytest -m upstream -s tests
"""

import argparse
import ast
import importlib
import os
import shlex
import sys
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from secant_jax import paths
from secant_jax import sampling
from secant_jax import secant
from secant_jax.convert import common
from secant_jax.convert import edm as convert_edm
from secant_jax.convert import sit as convert_sit
from secant_jax.convert import to_official
from secant_jax.data import encode
from secant_jax.models import dit
from secant_jax.models import edm_unet
from secant_jax.models import precond
from test_config import parse_main_flags
from test_edm_unet import _reduced
from test_official_losses import _ours, assert_bias_gradients_match

pytestmark = [pytest.mark.torch, pytest.mark.upstream]


def _checkout(variable, marker_file):
  directory = os.environ.get(variable)
  if not directory:
    pytest.skip(f'{variable} is not set: it names a checkout of the upstream code (module '
                'docstring)')
  if not os.path.isfile(os.path.join(directory, marker_file)):
    raise FileNotFoundError(f'{variable}={directory} has no {marker_file}; point it at the '
                            'root of the checkout.')
  return directory


@pytest.fixture(scope='module')
def official_code():
  """poppuppy/secant_expectation's models, models_original and transport modules (the
  checkout goes on sys.path: transport is a package of relative imports)."""
  pytest.importorskip('timm')
  pytest.importorskip('torchdiffeq')  # transport.integrators imports it
  directory = _checkout('SECANT_EXPECTATION_DIR', os.path.join('transport', 'transport.py'))
  sys.path.insert(0, directory)
  yield types.SimpleNamespace(**{name: importlib.import_module(name) for name in
                                 ('models', 'models_original', 'transport')})
  sys.path.remove(directory)


@pytest.fixture(scope='module')
def edm_networks():
  """NVlabs/edm's training.networks (it imports its torch_utils, so the checkout goes on
  sys.path)."""
  directory = _checkout('EDM_DIR', os.path.join('training', 'networks.py'))
  sys.path.insert(0, directory)
  from training import networks  # pylint: disable=import-outside-toplevel
  yield networks
  sys.path.remove(directory)


@pytest.mark.parametrize('online_cfg', ['1.0-2.5', None], ids=['embedded', 'unguided'])
def test_official_sit_checkpoints_convert_both_ways(official_code, tmp_path, capsys,
                                                    online_cfg):
  """A checkpoint of its DiT (DiT-S/2, 128 px) as its train.py saves it: converted, our DiT
  computes its forward; exported back from a run of the flags the importer printed, the
  file loads into its DiT with strict=True, every tensor equal to the original."""
  import torch
  import torch_dit
  net = official_code.models.DiT_models['DiT-S/2'](input_size=16, online_cfg=online_cfg).eval()
  torch_dit.randomize(net, 1)
  train_args = argparse.Namespace(model='DiT-S/2', image_size=128, num_classes=1000,
                                  loss_type='sdei' if online_cfg else 'stee', num_steps=4,
                                  online_cfg=online_cfg)
  torch.save({'ema': net.state_dict(), 'args': train_args}, tmp_path / 'in.pt')
  run = tmp_path / 'run'
  convert_sit.main(['--in', str(tmp_path / 'in.pt'), '--out', str(run / 'ema')])
  capsys.readouterr()

  guided = online_cfg is not None
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 16, 16, 4)).astype(np.float32)
  t = np.array([0.0, 0.3, 0.5, 0.9], np.float32)
  s = np.array([0.25, 0.6, 1.0, 0.95], np.float32)
  y = np.array([3, 999, 1000, 7])  # 1000: the null class
  w = np.array([1.0, 1.7, 2.5, 1.2], np.float32)
  model = dit.from_name('DiT-S/2', input_size=16, guidance_embed=guided)
  ours = np.asarray(model.apply(common.load_variables(run / 'ema'), x, t, s, y,
                                (w - 1.0) / 1.5 if guided else None))
  with torch.no_grad():
    theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 torch.from_numpy(s), torch.from_numpy(y),
                 cfg=torch.from_numpy(w) if guided else None).permute(0, 2, 3, 1).numpy()
  print(f'{online_cfg}: max |ours − its models.py| {np.abs(ours - theirs).max():.2e} '
        f'(max |f| {np.abs(theirs).max():.2f})')
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5)

  flags = shlex.split(' '.join(convert_sit.official_run_flags(train_args)))
  (run / 'config.json').write_text(parse_main_flags(*flags).to_json_best_effort())
  to_official.main(['--run', str(run), '--out', str(tmp_path / 'out.pt')])
  exported = torch.load(tmp_path / 'out.pt')
  assert exported['args'] == vars(train_args)
  back = official_code.models.DiT_models['DiT-S/2'](input_size=16, online_cfg=online_cfg)
  back.load_state_dict(exported['ema'], strict=True)
  for key, value in net.state_dict().items():
    assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize('variant, guided', [('sdei', True), ('stei', True), ('sdee', True),
                                             ('stee', False)])
def test_the_train_step_objective_is_the_official_training_losses(official_code, variant,
                                                                  guided):
  """Its Transport.training_losses itself, on its DiT student and its models_original
  teacher (SiT's, called with one time; its unguided SDEI, STEI and SDEE do not run as
  published, see README), against our train step's objective (test_official_losses._ours)
  from the draws it made: the times and noise its `sample` returned, the label-dropout draw
  after them, the scale it passed the student. Loss and every bias gradient."""
  import torch
  import torch_dit
  arch = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
              num_classes=1000)  # its training_losses fixes 1000 classes
  w_range = (1.25, 3.0)
  student = official_code.models.DiT(
      online_cfg=f'{w_range[0]}-{w_range[1]}' if guided else None, **arch)
  torch_dit.randomize(student, 0)
  teacher = official_code.models_original.DiT(**arch).eval()
  torch_dit.randomize(teacher, 1)
  transport = official_code.transport.create_transport('Linear', 'velocity')
  torch.manual_seed(3)
  x1 = torch.randn(6, 4, 8, 8)
  y = torch.randint(0, 1000, (6,))

  draws, scales, real_rand, real_sample = {}, [], torch.rand, transport.sample

  def recording_rand(*args, **kwargs):
    draws.setdefault('rand', []).append(real_rand(*args, **kwargs))
    return draws['rand'][-1]

  def recording_sample(*args):
    draws['sample'], draws['rand_before'] = real_sample(*args), len(draws.get('rand', []))
    return draws['sample']

  def recording_student(x, t, s, y, cfg=None):
    scales.append(cfg)
    return type(student).forward(student, x, t, s, y, cfg)

  with mock.patch.object(torch, 'rand', recording_rand), \
       mock.patch.object(transport, 'sample', recording_sample), \
       mock.patch.object(student, 'forward', recording_student):
    expected = transport.training_losses(
        student, teacher, x1, student.online_cfg, 4, variant, dict(y=y))['loss'].mean()
  expected.backward()

  tau, r, s, t, x0, _ = draws['sample']
  drop = draws['rand'][draws['rand_before']] < 0.1  # its drop_ids
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  times = secant.TimePairs(t.numpy(), s.numpy(), r.numpy(),
                           np.zeros(6, np.float32) if tau is None else tau.numpy())
  w = scales[-1].numpy() if guided else np.ones(6, np.float32)
  state = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  loss, grads = _ours(variant, guided, state(student), state(teacher), nhwc(x1), nhwc(x0),
                      times, y.numpy(), np.where(drop.numpy(), 1000, y.numpy()), w,
                      arch=arch, w_range=w_range)
  print(f'{variant}: loss {float(loss):.6f}, its training_losses {expected.item():.6f}')
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
  assert_bias_gradients_match(grads, student)


def test_the_latent_importer_reads_the_files_in_the_official_loaders_order(official_code,
                                                                             tmp_path):
  """Its train.py's CustomDataset itself over features of one latent per file, named as
  the extraction on several ranks writes them (<k>_<rank>.npy; k past 9, so that plain
  name order differs): our importer's records are its items in its order, and one more at
  the end, the last file, which its loader leaves out."""
  del official_code  # its checkout on sys.path
  pytest.importorskip('accelerate')  # train.py's imports
  from secant_jax.data import latents
  from test_loop import TINY_DIT, _config
  official_train = importlib.import_module('train')
  rng = np.random.default_rng(0)
  features, labels = tmp_path / 'imagenet256_features', tmp_path / 'imagenet256_labels'
  features.mkdir()
  labels.mkdir()
  for k in (0, 1, 2, 10):
    for rank in range(3):
      np.save(features / f'{k}_{rank}.npy',
              rng.normal(scale=1 / 0.18215, size=(1, 4, 8, 8)).astype(np.float32))
      np.save(labels / f'{k}_{rank}.npy', rng.integers(0, 1000, 1))
  theirs = official_train.CustomDataset(str(tmp_path))
  assert latents.import_npy(features, labels, tmp_path / 'records') == len(theirs) + 1 == 12
  ours = latents.source(_config(TINY_DIT, dict(name='imagenet_latents',
                                              dir=str(tmp_path / 'records')), 'stee').data)
  for i in range(len(theirs)):
    x, y = theirs[i]
    np.testing.assert_allclose(ours[i]['x'], x.numpy().transpose(1, 2, 0) * 0.18215,
                               rtol=1e-3, atol=1e-3)
    assert ours[i]['y'] == int(y)
  last = np.load(features / '10_2.npy')[0].transpose(1, 2, 0) * 0.18215
  np.testing.assert_allclose(ours[11]['x'], last, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('label_dim', [0, 10])
@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_edm_song_unet_matches_nvlabs_edm(edm_networks, arch, label_dim):
  """Its EDMPrecond(SongUNet) with EDM's --arch settings at width 16 (three resolutions,
  attention at 8², augment_dim 9), converted: our secant f at σ_s = σ_t is its
  (x − D(x; σ))/σ."""
  import torch
  import torch_dit
  settings = _reduced(arch, label_dim=label_dim)  # test_edm_unet's parity size
  channels = settings.pop('in_channels')
  assert settings.pop('out_channels') == channels
  net = edm_networks.EDMPrecond(
      img_channels=channels, model_type='SongUNet', dropout=0.13, decoder_type='standard',
      **{**settings, 'resample_filter': list(settings['resample_filter'])}).eval()
  torch_dit.randomize(net, 2)
  model = edm_unet.SongUNet(in_channels=channels, out_channels=channels, dropout=0.0,
                            **settings)
  variables = convert_edm.convert({k: v.numpy() for k, v in net.state_dict().items()},
                                  convert_edm.init_variables(model), model.resample_filter)
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 16, 16, 3)) * 5).astype(np.float32)
  sigma = np.array([40.0, 2.0, 0.3], np.float32)
  labels = np.eye(10, dtype=np.float32)[[1, 4, 9]] if label_dim else None
  secant_fn = precond.secant_from_network(
      paths.EDM(), lambda x, ct, cs, y, w: model.apply(variables, x, ct, cs, labels),
      sigma_data=0.5)
  ours = np.asarray(secant_fn(x, sigma, sigma, None, None))
  with torch.no_grad():
    denoised = net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(sigma),
                   None if labels is None else torch.from_numpy(labels))
  theirs = (x - denoised.permute(0, 2, 3, 1).numpy()) / sigma[:, None, None, None]
  print(f'{arch}, label_dim {label_dim}: max |f ours − its networks.py| '
        f'{np.abs(ours - theirs).max():.2e} (max |f| {np.abs(theirs).max():.2f})')
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp'])
def test_a_pickle_of_its_networks_converts_without_its_code(edm_networks, arch, tmp_path):
  """An EDMPrecond(SongUNet) of its networks.py pickled through its torch_utils.persistence
  in a snapshot as its training loop writes them (with its EDMLoss), read by
  convert.edm_pickle in a process without its code: the state dict and the SongUNet's
  settings are the network's."""
  import copy
  import pickle
  import subprocess
  import torch
  import torch_dit
  settings = _reduced(arch, label_dim=10)
  channels = settings.pop('in_channels')
  settings.pop('out_channels')
  net = edm_networks.EDMPrecond(
      img_channels=channels, model_type='SongUNet', dropout=0.13, decoder_type='standard',
      use_fp16=False, **{**settings, 'channel_mult': list(settings['channel_mult']),
                         'resample_filter': list(settings['resample_filter'])})
  torch_dit.randomize(net, 3)
  from training import loss as edm_loss  # pylint: disable=import-outside-toplevel
  snapshot = dict(ema=copy.deepcopy(net).eval().requires_grad_(False).cpu(),
                  loss_fn=edm_loss.EDMLoss(), augment_pipe=None,
                  dataset_kwargs=dict(path='cifar10-32x32.zip'))
  with open(tmp_path / 'net.pkl', 'wb') as f:
    pickle.dump(snapshot, f)
  torch.save(net.state_dict(), tmp_path / 'state.pt')
  code = (f'from secant_jax.convert import edm; import sys; state, model, sd = '
          f"edm.from_pickle({str(tmp_path / 'net.pkl')!r}); "
          "assert 'dnnlib' not in sys.modules and 'torch_utils' not in sys.modules; "
          'import numpy as np; np.savez(sys.argv[1], **state); print(edm.settings(model), sd)')
  printed = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'state.npz')],
                           check=True, capture_output=True, text=True).stdout
  expected = edm_unet.SongUNet(in_channels=channels, out_channels=channels, dropout=0.13,
                               **settings)
  assert printed.strip() == f'{convert_edm.settings(expected)} 0.5'
  state = np.load(tmp_path / 'state.npz')
  reference = torch.load(tmp_path / 'state.pt')
  assert sorted(state) == sorted(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize('evaluations,num_steps', [(35, 18), (7, 4)])
def test_the_sigma_path_heun_is_edms_own_sampler(edm_networks, evaluations, num_steps):
  """Its generate.edm_sampler (float64, S_churn 0) on a Gaussian mixture's exact denoiser
  D(x; σ) = x − σ·v(x, σ), against our Heun on the σ-path at 2·num_steps − 1 evaluations."""
  del edm_networks  # its checkout on sys.path
  pytest.importorskip('click')  # generate.py's command line
  import torch
  from test_sampling import _mixture
  edm_generate = importlib.import_module('generate')
  mixture, path = _mixture(), paths.EDM()

  class ExactDenoiser:
    sigma_min, sigma_max = 0.0, float('inf')
    round_sigma = staticmethod(torch.as_tensor)

    def __call__(self, x, sigma, class_labels=None):
      del class_labels
      x = np.asarray(x)
      with jax.enable_x64(True):
        v = mixture.velocity(jnp.asarray(x), jnp.full(x.shape[:1], float(sigma)), path)
      return torch.from_numpy(x - float(sigma) * np.asarray(v))

  noise = jax.random.normal(jax.random.key(2), (64, 2))
  theirs = edm_generate.edm_sampler(ExactDenoiser(), torch.from_numpy(np.asarray(noise)),
                                    num_steps=num_steps).numpy()
  with jax.enable_x64(True):
    ours = sampling.solve_with_nfe(lambda x, t: mixture.velocity(x, t, path),
                                   noise.astype(jnp.float64), path, evaluations, 'heun')
  error = np.abs(np.asarray(ours) - theirs).max()
  print(f'{num_steps} steps: max |ours − edm_sampler| {error:.2e}')
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_the_crop_is_the_one_fast_dits_extraction_made_the_latents_with():
  """Its extract_features.py's center_crop_arr (ADM's), run alone from its source, against
  `encode.center_crop` on images of ImageNet-like and awkward sizes."""
  directory = _checkout('FASTDIT_DIR', 'extract_features.py')
  with open(os.path.join(directory, 'extract_features.py'), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  function = next(node for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name == 'center_crop_arr')
  namespace = {'Image': Image, 'np': np}
  exec(compile(ast.Module([function], []), 'extract_features.py', 'exec'), namespace)  # pylint: disable=exec-used
  rng = np.random.default_rng(0)
  for width, height in ((500, 375), (1024, 683), (256, 256), (300, 700), (513, 512),
                        (257, 1000), (2000, 97)):
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    theirs = np.asarray(namespace['center_crop_arr'](image, 256))
    np.testing.assert_array_equal(encode.center_crop(image, 256), theirs)
