"""EDM's network pickles, converted without EDM's code and without running what they carry.

The pickles here are written as EDM's training loop writes its snapshots, with a stand-in
for its torch_utils.persistence that exists only while pickling: each module of
tests/torch_song_unet.py is stored as persistence stores a persistent class, as the source
of its module (here code that fails the test if it ever runs) and its __dict__ with the
constructor's arguments. tests/test_upstream_code.py checks a pickle of EDM's own classes.
"""

import builtins
import os
import pickle
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

import test_edm_unet
from test_config import REPO
from test_config import parse_main_flags
from secant_jax.convert import common
from secant_jax.convert import edm as convert_edm
from secant_jax.convert import edm_pickle
from secant_jax.models import edm_unet
from secant_jax.models import registry

pytestmark = pytest.mark.torch

_SOURCE = "import os; os.environ['SECANT_TEST_PICKLED_SOURCE'] = 'ran'"


class _RunsCode:
  """Unpickles as exec(code): what a pickle can do to a reader that trusts it."""

  def __reduce__(self):
    return builtins.exec, ("import os; os.environ['SECANT_TEST_PICKLED_CALL'] = 'ran'",)


def _persistence():
  """A module torch_utils.persistence with its _reconstruct_persistent_obj (never called:
  the pickle only names it)."""
  module = types.ModuleType('torch_utils.persistence')

  def _reconstruct_persistent_obj(meta):
    raise AssertionError(f'the stand-in rebuilt {meta["class_name"]}')

  _reconstruct_persistent_obj.__module__ = module.__name__
  _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
  module._reconstruct_persistent_obj = _reconstruct_persistent_obj
  return module


def write_edm_pickle(path, net, kwargs_of, class_names=(), key='ema'):
  """Pickles dict(key=net, ...) as EDM's training snapshots; `kwargs_of(module)` gives the
  constructor arguments each persistent module recorded; torch_song_unet's Precond is
  EDM's EDMPrecond, and `class_names` renames classes further."""
  import torch_song_unet
  persistence = _persistence()
  class_names = {'Precond': 'EDMPrecond', **dict(class_names)}

  class Pickler(pickle.Pickler):

    def reducer_override(self, obj):
      if type(obj).__module__ != torch_song_unet.__name__:
        return NotImplemented
      name = type(obj).__name__
      state = {**obj.__dict__, '_init_args': (), '_init_kwargs': kwargs_of(obj)}
      meta = dict(type='class', version=6, module_src=_SOURCE,
                  class_name=class_names.get(name, name), state=state)
      return persistence._reconstruct_persistent_obj, (meta,)

  data = {key: net, 'loss_fn': None, 'augment_pipe': None,
          'dataset_kwargs': {'path': 'cifar10-32x32.zip', 'hook': _RunsCode()}}
  modules = {'torch_utils': types.ModuleType('torch_utils'), persistence.__name__: persistence}
  with pytest.MonkeyPatch.context() as patch:
    for name, module in modules.items():
      patch.setitem(sys.modules, name, module)
    with open(path, 'wb') as f:
      Pickler(f).dump(data)


def _edm_kwargs(settings, label_dim):
  """kwargs_of for torch_song_unet.Precond(**settings): what EDM's EDMPrecond and SongUNet
  record when built as EDM's train.py builds them."""
  import torch_song_unet
  unet = {**settings, 'label_dim': label_dim, 'decoder_type': 'standard', 'dropout': 0.13,
          'channel_mult': list(settings['channel_mult']),
          'resample_filter': list(settings['resample_filter'])}
  precond = {k: v for k, v in unet.items() if k not in ('in_channels', 'out_channels')}
  precond.update(img_channels=settings['in_channels'], use_fp16=False, model_type='SongUNet')

  def kwargs_of(module):
    if isinstance(module, torch_song_unet.Precond):
      return precond
    return unet if isinstance(module, torch_song_unet.SongUNet) else {}

  return kwargs_of


def _precond(arch, label_dim, sigma_data=0.5, seed=0):
  import torch
  import torch_song_unet
  settings = test_edm_unet._reduced(arch)
  torch.manual_seed(seed)
  net = torch_song_unet.Precond(sigma_data=sigma_data, label_dim=label_dim, **settings)
  return net.eval().requires_grad_(False), settings


@pytest.mark.parametrize('arch,label_dim', [('ddpmpp', 10), ('ncsnpp', 0)])
def test_a_pickle_converts_as_its_state_dict_and_runs_nothing_it_carries(
    arch, label_dim, tmp_path, capsys, monkeypatch):
  net, settings = _precond(arch, label_dim)
  write_edm_pickle(tmp_path / 'net.pkl', net, _edm_kwargs(settings, label_dim))
  for variable in ('SECANT_TEST_PICKLED_SOURCE', 'SECANT_TEST_PICKLED_CALL'):
    monkeypatch.delenv(variable, raising=False)
  assert 'torch_utils' not in sys.modules

  convert_edm.main(['--in', str(tmp_path / 'net.pkl'), '--out', str(tmp_path / 'ckpt')])
  printed = capsys.readouterr().out
  assert 'SECANT_TEST_PICKLED_SOURCE' not in os.environ
  assert 'SECANT_TEST_PICKLED_CALL' not in os.environ
  data = edm_pickle.load(tmp_path / 'net.pkl')
  assert type(data['dataset_kwargs']['hook']).__name__ == 'builtins.exec'
  assert data['dataset_kwargs']['hook'].args == (_RunsCode().__reduce__()[1][0],)

  model = edm_unet.SongUNet(label_dim=label_dim, dropout=0.13, **settings)
  expected = convert_edm.convert({k: v.numpy() for k, v in net.state_dict().items()},
                                 convert_edm.init_variables(model), model.resample_filter)
  converted = common.load_variables(tmp_path / 'ckpt')
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, expected)
  assert printed.startswith(f'SongUNet ({arch}, label_dim {label_dim}): '
                            f'{common.parameter_count(expected):,} parameters → ')
  assert f"set config.model.arch = '{arch}', config.model.num_classes = {label_dim}, " \
         "config.model.unet = {'img_resolution': 16, 'in_channels': 3" in printed


def test_the_printed_config_entries_build_the_pickled_network(tmp_path):
  net, settings = _precond('ncsnpp', 10, sigma_data=0.66)
  write_edm_pickle(tmp_path / 'net.pkl', net, _edm_kwargs(settings, 10))
  _, model, sigma_data = convert_edm.from_pickle(tmp_path / 'net.pkl')
  assert sigma_data == 0.66 and convert_edm.settings(model)['num_blocks'] == 2
  assert convert_edm.config_for(model, sigma_data).endswith(
      'config.path.sigma_data = 0.66 to build it')
  # and a SongUNet of neither arch's settings: the entries override the arch's
  mixed = model.clone(encoder_type='standard')
  for network in (model, mixed):
    entries = convert_edm.model_config(network)
    built = registry.build(ml_collections.ConfigDict(
        dict(family='edm_unet', dtype='float32', **entries)), guided=False).module
    assert convert_edm.settings(built) == convert_edm.settings(network)
  assert convert_edm.model_config(mixed)['unet']['embedding_type'] == 'fourier'


@pytest.mark.parametrize('arch,classes', [('ddpmpp', 0), ('ncsnpp', 10)])
def test_edms_cifar10_networks_are_named_with_the_config_that_builds_them(arch, classes):
  """What `config_for` prints for EDM's published CIFAR-10 networks, run as main's flags,
  builds them."""
  model = edm_unet.cifar10(arch, label_dim=classes)
  claim = convert_edm.config_for(model, 0.5)
  assert claim.endswith(' builds it'), claim
  config_file, *overrides = claim.removesuffix(' builds it').split()
  assert config_file == 'configs/cifar10_edm.py' + (':classes=10' if classes else '')
  config = parse_main_flags(f'--config={REPO}/{config_file}', *overrides)
  built = registry.build(config.model, guided=False).module
  assert convert_edm.settings(built) == convert_edm.settings(model)
  assert convert_edm.config_for(model, 0.66).startswith('set config.model.arch')


def test_networks_that_are_not_implemented_are_named(tmp_path, capsys):
  net, settings = _precond('ddpmpp', 0)
  kwargs_of = _edm_kwargs(settings, 0)
  for renamed, message in (
      ({'Precond': 'VPPrecond'}, r"network is a VPPrecond: secant-jax implements EDM's own "
                                 r'preconditioning \(EDMPrecond'),
      ({'SongUNet': 'DhariwalUNet'}, r'EDMPrecond wraps a DhariwalUNet; only SongUNet')):
    write_edm_pickle(tmp_path / 'net.pkl', net, kwargs_of, class_names=renamed)
    with pytest.raises(common.ConversionError, match=message):
      convert_edm.from_pickle(tmp_path / 'net.pkl')

  skip = lambda m: {**kwargs_of(m), 'decoder_type': 'skip'} if kwargs_of(m) else {}
  write_edm_pickle(tmp_path / 'net.pkl', net, skip)
  with pytest.raises(common.ConversionError, match=r"SongUNet has decoder_type='skip'; "
                                                   r"edm_unet.SongUNet implements "
                                                   r"decoder_type='standard' only"):
    convert_edm.from_pickle(tmp_path / 'net.pkl')

  write_edm_pickle(tmp_path / 'net.pkl', net, kwargs_of, key='net')
  with pytest.raises(common.ConversionError, match=r"net.pkl has no network under 'ema' \(it "
                                                   r"holds \['augment_pipe', 'dataset_kwargs'"):
    convert_edm.from_pickle(tmp_path / 'net.pkl')
  assert convert_edm.from_pickle(tmp_path / 'net.pkl', key='net')[1].label_dim == 0

  with pytest.raises(SystemExit):
    convert_edm.main(['--in', str(tmp_path / 'net.pkl'), '--out', str(tmp_path / 'c'),
                      '--label-dim', '10'])
  assert ('net.pkl is an EDM pickle, which records its architecture and label_dim: leave '
          'out --arch and --label-dim.') in capsys.readouterr().err


def test_a_pickle_on_a_bucket_is_read_through_epath(tmp_path):
  """As test_convert_cli's bucket test: gs://bucket is a directory behind epath's mock."""
  from unittest import mock
  from etils.epath import gpath
  from etils.epath import testing
  net, settings = _precond('ddpmpp', 0)
  (tmp_path / 'bucket').mkdir()
  write_edm_pickle(tmp_path / 'bucket' / 'net.pkl', net, _edm_kwargs(settings, 0))

  def from_bucket(original, path, *args):
    return original(str(path).replace('gs://bucket', str(tmp_path / 'bucket')), *args)

  with testing.mock_epath(open=from_bucket, exists=from_bucket), \
       mock.patch.object(gpath, '_is_tf_installed', lambda: False):
    state, model, _ = convert_edm.from_pickle('gs://bucket/net.pkl')
    with pytest.raises(FileNotFoundError, match='EDM pickle gs://bucket/gone.pkl does not'):
      convert_edm.from_pickle('gs://bucket/gone.pkl')
  assert model.num_blocks == 2 and sorted(state) == sorted(net.state_dict())
  for key, value in net.state_dict().items():
    np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
