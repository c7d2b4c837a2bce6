"""The converters end to end: weights files written by the tests → Orbax checkpoints."""

import subprocess
import sys
import textwrap
from unittest import mock

import jax
import numpy as np
import pytest
from flax import traverse_util

from secant_jax.convert import common
from secant_jax.convert import edm as convert_edm
from secant_jax.convert import sit as convert_sit
from secant_jax.models import dit
from secant_jax.models import edm_unet


def test_npz_and_safetensors_load_with_ema_selection(tmp_path):
  arrays = {'a.weight': np.ones((2, 3), np.float32), 'a.bias': np.zeros(2, np.float32)}
  np.savez(tmp_path / 'w.npz', **arrays)
  loaded = common.load_state_dict(tmp_path / 'w.npz')
  assert sorted(loaded) == sorted(arrays)
  from safetensors.numpy import save_file
  save_file(arrays, str(tmp_path / 'w.safetensors'))
  np.testing.assert_array_equal(common.load_state_dict(tmp_path / 'w.safetensors')['a.weight'],
                                arrays['a.weight'])


@pytest.mark.torch
@pytest.mark.parametrize('name', ['w.pt', 'w.safetensors', 'w.npz'])
def test_weights_on_a_bucket_are_read_through_epath(tmp_path, name):
  """gs:// weights (a TPU pod's bucket) are read, not taken for a missing local file. The
  bucket is a directory behind epath's mock backend (TensorFlow's GCS one switched off)."""
  import torch
  from etils.epath import gpath
  from etils.epath import testing
  from safetensors.numpy import save_file
  arrays = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
            'a.bias': np.ones(2, np.float32)}
  (tmp_path / 'bucket').mkdir()
  local = tmp_path / 'bucket' / name
  if name.endswith('.pt'):
    torch.save({'ema': {k: torch.from_numpy(v) for k, v in arrays.items()}}, local)
  elif name.endswith('.safetensors'):
    save_file(arrays, str(local))
  else:
    np.savez(local, **arrays)
  asked = []

  def from_bucket(original, path, *args):
    asked.append(str(path))
    return original(str(path).replace('gs://bucket', str(tmp_path / 'bucket')), *args)

  with testing.mock_epath(open=from_bucket, exists=from_bucket), \
       mock.patch.object(gpath, '_is_tf_installed', lambda: False):
    loaded = common.load_state_dict(f'gs://bucket/{name}')
    with pytest.raises(FileNotFoundError, match='Checkpoint gs://bucket/gone.pt does not'):
      common.load_state_dict('gs://bucket/gone.pt')
  assert f'gs://bucket/{name}' in asked
  assert sorted(loaded) == sorted(arrays)
  np.testing.assert_array_equal(loaded['a.weight'], arrays['a.weight'])


@pytest.mark.torch
@pytest.mark.parametrize('name', ['w.pt', 'w.npz'])
def test_weights_stream_without_a_second_copy(tmp_path, name):
  """SiT-XL/2's checkpoint is 2.7 GB: loading holds the tensors once, not the file's bytes
  besides. The peak resident memory (VmHWM; a fresh process, counted from after importing
  torch) while loading a 256 MiB file: about 1x the file (2x when it was read whole first)."""
  import torch
  tensors = {f'w{i}': np.full((16, 1024, 1024), i, np.float32) for i in range(4)}
  if name.endswith('.pt'):
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / name)
  else:
    np.savez(tmp_path / name, **tensors)
  del tensors
  script = textwrap.dedent(f"""
      import re, torch
      from secant_jax.convert import common
      def peak_kib():
        with open('/proc/self/status') as f:
          return int(re.search(r'VmHWM:\\s*(\\d+)', f.read()).group(1))
      start = peak_kib()
      loaded = common.load_state_dict({str(tmp_path / name)!r})
      assert float(loaded['w3'][0, 0, 0]) == 3.0
      print((peak_kib() - start) / 1024)
      """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          check=True)
  peak_mib = float(result.stdout.split()[-1])
  assert 240 < peak_mib < 1.4 * 256, peak_mib


def test_missing_or_unknown_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'Checkpoint .*nothere.pt does not exist'):
    common.load_state_dict(tmp_path / 'nothere.pt')
  (tmp_path / 'w.ckpt').write_text('x')
  with pytest.raises(common.ConversionError, match=r"Unknown checkpoint format '.ckpt'"):
    common.load_state_dict(tmp_path / 'w.ckpt')
  with pytest.raises(FileNotFoundError, match=r'Converted checkpoint .*nope does not exist'):
    common.load_variables(tmp_path / 'nope')
  (tmp_path / 'edm.pkl').write_text('x')
  with pytest.raises(FileNotFoundError, match=r'edm.pkl is a weights file, not a converted '
                                              r'checkpoint \(a directory\): convert it once '
                                              r'with python -m secant_jax.convert.edm --in '):
    common.load_variables(tmp_path / 'edm.pkl')
  run = tmp_path / 'teacher-run'
  with pytest.raises(FileNotFoundError, match=r'teacher-run/ema does not exist and .*teacher-run '
                                              r'holds no training run; train one there'):
    common.load_variables(run / 'ema')
  run.mkdir()
  (run / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'teacher-run/ema does not exist: the run in '
                                              r'.*teacher-run has not finished .* to resume it '
                                              r'to the end.$'):
    common.load_variables(run / 'ema')
  for step in ('400', '1200', 'tmp'):  # an orbax step directory, and a save in flight
    (run / 'checkpoints' / step).mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r'to resume it to the end, or with '
                                              r'--config.num_train_steps=1200 \(its latest '
                                              r'checkpoint\) to export the EMA it has now and '
                                              r'train on later.$'):
    common.load_variables(run / 'ema')


def test_files_that_need_torch_say_so_without_it(tmp_path, monkeypatch):
  from secant_jax.convert import edm_pickle
  for name in ('w.pt', 'net.pkl'):
    (tmp_path / name).write_bytes(b'x')
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch fails
  with pytest.raises(ImportError, match=r'Reading .*w.pt needs PyTorch: pip install torch \(the '
                                        r'CPU build is enough\), or export it to .safetensors'):
    common.load_state_dict(tmp_path / 'w.pt')
  with pytest.raises(ImportError, match=r'Reading .*net.pkl needs PyTorch: pip install torch '
                                        r'\(the CPU build is enough\)\.$'):
    edm_pickle.load(tmp_path / 'net.pkl')


def test_a_missing_edm_pickle_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'EDM pickle .*/edm.pkl does not exist; pass the '
                                              r'path of the downloaded network pickle'):
    convert_edm.main(['--in', str(tmp_path / 'edm.pkl'), '--out', str(tmp_path / 'o')])


@pytest.mark.torch
@pytest.mark.parametrize('args_as, guided', [('Namespace', True), ('dict', True),
                                             ('Namespace', False)])
def test_sit_cli_converts_a_checkpoint_of_the_official_train_py(tmp_path, capsys, args_as,
                                                                guided):
  """As its train.py saves them: model, EMA, AdamW state and the argparse.Namespace of its
  arguments (which torch.load's weights_only refuses unless allowed), or those arguments
  as a dict, as convert.to_official writes them; a cfg_embedder in the file makes a guided
  model without --guidance-embed. The printed command samples as its sampler does."""
  import argparse
  import torch
  import torch_dit
  torch.manual_seed(0)
  net = torch_dit.SecantDiT(input_size=16, patch_size=8, hidden_size=384, depth=12, num_heads=6,
                            num_classes=1000, guidance_embed=guided)
  ema = {k: v + 1.0 if k != 'pos_embed' else v for k, v in net.state_dict().items()}
  opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0)
  net(torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1), torch.zeros(1).long(),
      torch.zeros(1)).sum().backward()
  opt.step()
  train_args = argparse.Namespace(loss_type='sdei' if guided else 'stee', num_steps=1,
                                  online_cfg='1-2.5' if guided else None, model='DiT-XL/2',
                                  lr=1e-5)
  torch.save({'model': net.state_dict(), 'ema': ema, 'opt': opt.state_dict(),
              'args': train_args if args_as == 'Namespace' else vars(train_args)},
             tmp_path / '0010000.pt')
  out = tmp_path / 'converted'
  convert_sit.main(['--in', str(tmp_path / '0010000.pt'), '--out', str(out), '--model',
                    'DiT-S/8', '--input-size', '16'])
  printed = capsys.readouterr().out
  if guided:
    assert 'DiT-S/8 with guidance input:' in printed
    assert ("python -m secant_jax.main --config=configs/imagenet_sit.py:variant=sdei,steps=1 "
            "--config.secant.guidance='(1.0, 2.5)' --workdir=RUN --config.mode=evaluate"
            ) in printed
    assert 'to sample as it does, add --config.secant.sample_guidance_scale=1.0' in printed
  else:
    assert 'DiT-S/8: ' in printed
    assert ("python -m secant_jax.main --config=configs/imagenet_sit.py:variant=stee,steps=1 "
            "--config.secant.guidance='()' --config.secant.label_dropout=0.1 --workdir=RUN "
            "--config.mode=evaluate") in printed
    assert ('samples a model without embedded guidance (two-pass CFG) in float32, outside '
            'autocast; to sample as it does, add --config.model.dtype=float32') in printed
  model = dit.from_name('DiT-S/8', input_size=16, guidance_embed=guided)
  restored = common.fit(traverse_util.flatten_dict(common.load_variables(out)),
                      jax.eval_shape(lambda: convert_sit.init_variables(model)))
  # The default is the EMA weights.
  np.testing.assert_allclose(restored['params']['blocks_3']['attn']['qkv']['kernel'],
                             ema['blocks.3.attn.qkv.weight'].numpy().T)


@pytest.mark.torch
@pytest.mark.parametrize('label_dim', [0, 10])  # EDM's uncond and cond CIFAR-10 networks
def test_edm_cli_converts_an_exported_state_dict(tmp_path, label_dim):
  import torch
  import torch_song_unet
  torch.manual_seed(0)
  net = torch_song_unet.Precond(img_resolution=32, in_channels=3, out_channels=3,
                                label_dim=label_dim, model_channels=128,
                                channel_mult=(2, 2, 2), augment_dim=9)
  torch.save(net.state_dict(), tmp_path / 'edm.pt')
  convert_edm.main(['--in', str(tmp_path / 'edm.pt'), '--out', str(tmp_path / 'converted'),
                    '--label-dim', str(label_dim)])
  model = edm_unet.cifar10('ddpmpp', label_dim=label_dim)
  saved = common.load_variables(tmp_path / 'converted')
  restored = common.fit(traverse_util.flatten_dict(saved), convert_edm.init_variables(model))
  flat = traverse_util.flatten_dict(restored['params'])
  np.testing.assert_allclose(flat[('enc_32x32_conv', 'kernel')],
                             net.model.enc['32x32_conv'].weight.detach().numpy().transpose(2, 3, 1, 0))
  assert (('map_label', 'kernel') in flat) == bool(label_dim)
  if label_dim:
    np.testing.assert_allclose(flat[('map_label', 'kernel')],
                               net.model.map_label.weight.detach().numpy().T)
