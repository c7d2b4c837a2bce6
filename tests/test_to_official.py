"""Exporting a training run to the official train.py's checkpoint format
(secant_jax.convert.to_official): the inverse key mapping, a strict load into the reference
DiT, the official sampling loop on the exported file against our sample mode, and the
refusals."""

import argparse
import json

import jax
import numpy as np
import pytest
from etils import epath
from flax import traverse_util

from secant_jax import files
from secant_jax import generate
from secant_jax import main as main_lib
from secant_jax.convert import common
from secant_jax.convert import sit as convert_sit
from secant_jax.convert import to_official
from secant_jax.models import dit
from secant_jax.models import edm_unet
from secant_jax.train import loop
from secant_jax.train import recipe
from test_loop import TINY_DIT, _config

# digits: 8×8 grey images, 10 classes; two blocks so that block indices are exercised
ARCH = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
            num_classes=10)


def _random_like(template, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: rng.normal(size=a.shape).astype(np.float32), template)


@pytest.mark.parametrize('network', ['dit', 'unet'])
def test_the_export_mapping_inverts_the_import(network):
  if network == 'dit':
    template = jax.eval_shape(lambda: convert_sit.init_variables(
        dit.DiT(guidance_embed=True, **ARCH)))
    first = ('x_embedder.proj.weight', (32, 1, 2, 2))  # Conv2d: OIHW
  else:
    module = edm_unet.SongUNet(img_resolution=16, in_channels=3, out_channels=3,
                               model_channels=8, channel_mult=(1, 2), num_blocks=1,
                               attn_resolutions=(8,))
    template = common.abstract_variables(module, np.zeros((1, 16, 16, 3)), np.zeros((1,)),
                                         np.zeros((1,)))
    first = ('enc.16x16_conv.weight', (8, 3, 3, 3))
  variables = _random_like(template)
  state_dict = common.to_state_dict(variables)
  assert state_dict[first[0]].shape == first[1]
  back = traverse_util.flatten_dict(common.convert(state_dict, template))
  flat = traverse_util.flatten_dict(variables)
  assert back.keys() == flat.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(back[path], value, err_msg='/'.join(path))


def test_bad_exports_are_refused_by_name(tmp_path):
  with pytest.raises(SystemExit, match=r'--out .*sdei\.npz: expected a \.pt file'):
    to_official.main(['--run', str(tmp_path), '--out', str(tmp_path / 'sdei.npz')])
  (tmp_path / 'taken.pt').write_bytes(b'')
  with pytest.raises(SystemExit, match=r'taken\.pt exists; pass --overwrite'):
    to_official.main(['--run', str(tmp_path), '--out', str(tmp_path / 'taken.pt')])
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    to_official.export(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'model': {'family': 'edm_unet'}}))
  (tmp_path / 'ema').mkdir()
  with pytest.raises(ValueError, match=r"trained a 'edm_unet' network \(config.model.family\); "
                                       r"the official secant code's model is SiT's DiT"):
    to_official.export(str(tmp_path))


@pytest.mark.torch
@pytest.mark.parametrize('guided', [True, False], ids=['embedded', 'classic cfg'])
def test_an_exported_run_loads_strictly_and_samples_in_the_official_loop_as_ours(
    tmp_path, capsys, guided):
  """A run (STEE on digits, 1 step from random non-zero weights) exported, loaded into the
  reference DiT with strict=True, sampled by the official loop from our sample mode's noise
  and labels at its scale and guidance interval: the same samples. The file's training
  arguments give back the run's flags through the importer."""
  import torch
  import torch_dit
  from test_official_sampler import _official_samples
  source = torch_dit.with_random_weights(5, guidance_embed=guided, **ARCH)
  c = _config(dict(TINY_DIT, in_channels=1, depth=2), dict(name='digits'), 'stee',
              init_checkpoint=str(tmp_path / 'init'), num_sample_images=4)
  if guided:  # STEE embeds no scale by default; either way it trains
    c.secant.guidance = (1.0, 2.0)
  network = recipe.make_network(c)
  common.save(convert_sit.convert({k: v.numpy() for k, v in source.state_dict().items()},
                                  convert_sit.init_variables(network.module)),
              tmp_path / 'init')
  c.secant.guidance_interval = (0.5, 1.0)  # the first of the 2 steps unguided
  run = tmp_path / 'run'
  loop.train_and_evaluate(c, run)
  # A guided checkpoint is a secant model's: no teacher to record. An unguided one is a
  # teacher's, recorded as the one the run starts from.
  assert (run / loop.TEACHER_RECORD).exists() == (not guided)
  c.mode = 'sample'
  main_lib.run(c, run)
  capsys.readouterr()

  to_official.main(['--run', str(run), '--out', str(tmp_path / 'stee.pt')])
  printed = capsys.readouterr().out
  assert f'DiT-S/2: {sum(p.numel() for p in source.parameters()) - 512:,} parameters' in printed
  assert ("Its sample_ddp.py cannot build this model as published: its DiT-S/2 has "
          "{'depth': 12, 'hidden_size': 384, 'num_heads': 6}, this model {'depth': 2, "
          "'hidden_size': 32, 'num_heads': 2}; it samples 4-channel latents") in printed
  guidance = ('--embed-cfg --online-cfg 1.0-2.0 --cfg-scale 1.5' if guided else
              '--no-embed-cfg --cfg-scale 1.5')
  assert ("its classic CFG takes label 1000 for the null class, this model's null class is "
          "10" in printed) != guided
  assert (f'sample_ddp.py --model DiT-S/2 --ckpt {tmp_path / "stee.pt"} --image-size 64 '
          f'--num-sampling-steps 2 --num-classes 10 {guidance} --cfg-interval 0.5,1.0'
          ) in printed
  assert ('its forward_with_cfg adds the output of a guidance embedder' in printed) != guided

  # as its sample_ddp.py's find_model loads it: torch.load's defaults (weights_only since 2.6)
  checkpoint = torch.load(tmp_path / 'stee.pt', map_location=lambda storage, loc: storage)
  assert sorted(checkpoint) == ['args', 'ema']
  exported = torch_dit.SecantDiT(guidance_embed=guided, **ARCH)
  exported.load_state_dict(checkpoint['ema'], strict=True)
  ours = np.load(run / 'samples.npz')
  noise, labels = generate.fixed_noise_and_labels(c.seed, 4, (8, 8, 1), 10)
  np.testing.assert_array_equal(ours['labels'], labels)
  expected = _official_samples(exported, noise, labels, 2, 1.5, (0.5, 1.0),
                               'embedded' if guided else 'cfg', (1.0, 2.0), null=10)
  print(f'max |ours − official| {np.abs(ours["samples"] - expected).max():.2e}, '
        f'max |official − noise| {np.abs(expected - noise).max():.2f}')
  assert np.abs(expected - noise).max() > 0.2  # the network moved the samples
  np.testing.assert_allclose(ours['samples'], expected, rtol=1e-5, atol=1e-5)

  assert checkpoint['args'] == dict(model='DiT-S/2', image_size=64, num_classes=10,
                                    loss_type='stee', num_steps=2,
                                    online_cfg='1.0-2.0' if guided else None)
  flags = convert_sit.official_run_flags(argparse.Namespace(**checkpoint['args']))
  assert flags[0] == '--config=configs/imagenet_sit.py:variant=stee,steps=2'
  assert flags[-1] == ("--config.secant.guidance='(1.0, 2.0)'" if guided else
                       '--config.secant.label_dropout=0.1')
  state_dict = {k: v.numpy() for k, v in checkpoint['ema'].items()}
  saved = common.load_variables(run / 'ema')
  back = traverse_util.flatten_dict(convert_sit.convert(state_dict, saved))
  for path, value in traverse_util.flatten_dict(saved).items():
    np.testing.assert_array_equal(back[path], value, err_msg='/'.join(path))


@pytest.mark.torch
@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_a_teacher_run_exports_its_weights_without_training_arguments(tmp_path, capsys,
                                                                      request, where):
  """A teacher (variant 'diffusion', as the demo's, without learned sigma), on a disk or
  with run and file on a bucket: its weights only, and the reasons its sample_ddp.py cannot
  build it."""
  import torch
  c = _config(dict(TINY_DIT, in_channels=1, learn_sigma=False), dict(name='digits'),
              'diffusion')
  network = recipe.make_network(c)
  run = str(tmp_path) if where == 'local' else request.getfixturevalue('gcs_bucket') + '/run'
  files.write_text(f'{run}/config.json', c.to_json_best_effort())
  common.save(network.init(jax.random.key(0)), f'{run}/ema')
  to_official.main(['--run', run, '--out', f'{run}/teacher.pt'])
  printed = capsys.readouterr().out
  with epath.Path(f'{run}/teacher.pt').open('rb') as f:
    (tmp_path / 'copy.pt').write_bytes(f.read())
  assert "its DiT learns sigma (2 × 4 output channels), this model does not" in printed
  assert "A 'diffusion' run, not a secant model: no training arguments written" in printed
  assert 'sample_ddp.py --model' not in printed
  checkpoint = torch.load(tmp_path / 'copy.pt')
  assert sorted(checkpoint) == ['ema']
  assert checkpoint['ema']['final_layer.linear.weight'].shape == (4, 32)  # p² · 1 channel
