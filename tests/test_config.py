"""Variant settings as the official code trains them, and switching guidance from the command
line as `python -m secant_jax.main` parses it (ml_collections' config_flags, locked)."""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from configs import demo as demo_config
from secant_jax import config as config_lib
from secant_jax import demo
from secant_jax import main
from secant_jax.convert import sit as convert_sit
from secant_jax.train import recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('variant, guidance, label_dropout', [
    ('sdei', (1.0, 2.5), 0.0), ('stei', (1.0, 2.5), 0.1), ('sdee', (1.0, 2.5), 0.0),
    ('stee', None, 0.1), ('diffusion', None, 0.1)])
def test_variants_embed_guidance_and_drop_labels_as_the_official_code(variant, guidance,
                                                                      label_dropout):
  s = config_lib.secant_config(variant, 4)
  assert recipe.guidance_range(s) == guidance
  assert s.label_dropout == label_dropout


def parse_main_flags(*args):
  """The config that `python -m secant_jax.main *args --workdir=DIR` runs."""
  return main.parse_command_line([*args, '--workdir=unused'])[0]


@pytest.mark.parametrize('variant, override, expected', [
    ('stei', '()', None), ('stei', '(1.5, 3.0)', (1.5, 3.0)), ('stee', '(1.0, 2.0)', (1.0, 2.0)),
    ('stee', None, None)])
def test_guidance_is_set_either_way_from_the_command_line(variant, override, expected):
  argv = [f'--config={REPO}/configs/imagenet_sit.py:variant={variant}']
  if override is not None:
    argv.append(f'--config.secant.guidance={override}')
  c = parse_main_flags(*argv)
  assert recipe.guidance_range(c.secant) == expected
  network = recipe.make_network(c)
  assert network.guided == (expected is not None)
  assert recipe.make_task(c, network).guidance_range == expected


@pytest.mark.parametrize('config_file', ['imagenet_sit.py', 'fashion_mnist.py:stage=teacher',
                                         'fashion_mnist.py:stage=secant,model=tiny', 'demo.py'])
def test_every_dit_config_takes_the_gpu_settings(config_file):
  """The same flags tune any DiT config (config.dit_model), as the GPU launchers pass them."""
  c = parse_main_flags(f'--config={REPO}/configs/{config_file}',
                       '--config.model.attention=cudnn', '--config.model.split_qkv=True',
                       '--config.model.remat=True', '--config.model.residual_dtype=bfloat16')
  assert (c.model.attention, c.model.split_qkv, c.model.remat, c.model.residual_dtype) == (
      'cudnn', True, True, 'bfloat16')


def test_a_config_that_does_not_load_or_a_flag_that_names_no_setting_is_a_flags_error():
  unet = f'--config={REPO}/configs/fashion_mnist.py:model=unet-tiny'
  with pytest.raises(flags.Error, match=r'^--config.model.split_qkv names no setting of the '
                                        r'config; config.model has: arch, dtype, family, '
                                        r'num_classes, unet\. Spell each flag as a setting'):
    parse_main_flags(unet, '--config.model.split_qkv=True')
  with pytest.raises(flags.Error, match=r'--config.model.name.x: config.model.name is a value, '
                                        r'not a group of settings\.'):
    parse_main_flags(f'--config={REPO}/configs/fashion_mnist.py', '--config.model.name.x=1')
  with pytest.raises(flags.Error, match=r'(?s)Failed loading config file .*configs/nope.py'
                                        r'.*No such file'):
    parse_main_flags(f'--config={REPO}/configs/nope.py')
  run = subprocess.run([sys.executable, '-m', 'secant_jax.main', unet, '--workdir=unused',
                        '--config.optimizer.lr', '0.1'], cwd=REPO, capture_output=True,
                       text=True, check=False)
  assert run.returncode == 1, run.stderr
  assert ('FATAL Flags parsing error: --config.optimizer.lr names no setting of the config; '
          'config.optimizer has: b1, b2, eps, grad_clip, learning_rate, warmup_steps, '
          'weight_decay.') in run.stderr, run.stderr


def saved_before(config, *keys):
  """The config.json (a JSON dict, as the trainer writes it) that a run of `config` from
  before the settings `keys` (dotted) existed would have."""
  saved = json.loads(config.to_json_best_effort())
  for key in keys:
    *sections, name = key.split('.')
    node = saved
    for section in sections:
      node = node[section]
    del node[name]
  return saved


def older_run(config, *keys):
  """`config` as `common.load_run` reads the config.json of a run from before the settings
  `keys` (dotted) existed."""
  return ml_collections.ConfigDict(config_lib.with_added_settings(saved_before(config, *keys)))


def _values_around(range_text, integer):
  """(values in `range_text`, values just outside it) of an int or float setting."""
  low, high = (float(b) for b in range_text[1:-1].split(','))
  cast = int if integer else float
  inside = [cast(low) if range_text[0] == '[' else cast(low + 1)]
  outside = [cast(low - 1) if range_text[0] == '[' else cast(low)]
  if high != float('inf'):
    inside.append(cast(high) if range_text[-1] == ']' else cast((low + high) / 2))
    outside.append(cast(high + 1) if range_text[-1] == ']' else cast(high))
  return inside, outside


@pytest.mark.parametrize('ranges, name, range_text', [
    (ranges, name, range_text) for ranges in (config_lib.SETTING_RANGES, demo.DEMO_RANGES)
    for name, range_text, _ in ranges])
def test_a_setting_outside_its_range_is_refused_by_name(ranges, name, range_text):
  config = demo_config.get_config() if ranges is demo.DEMO_RANGES else config_lib.base_config()
  *sections, key = name.split('.')
  node = config
  for section in sections:
    node = node[section]
  is_tuple = isinstance(node[key], tuple)
  inside, outside = _values_around(range_text, isinstance(node[key], (int, tuple)))
  for value in inside:
    node[key] = (value, value) if is_tuple else value
    config_lib.check_setting_ranges(config, ranges)
  low = re.escape(range_text[1:range_text.index(',')])
  flag = (r'each value of --config\.' if is_tuple else r'--config\.') + re.escape(name)
  if 'inf' not in range_text:
    must, fix = rf'in {re.escape(range_text)}', rf'set {flag} to a value in {re.escape(range_text)}'
  elif range_text[0] == '(':
    must, fix = rf'more than {low}', rf'set {flag} to more than {low}'
  else:
    must, fix = rf'at least {low}', rf'set {flag}{" to " if is_tuple else "="}{low} or more'
  for value in outside:
    node[key] = (inside[0], value) if is_tuple else value
    shown = re.escape(repr(node[key]) if is_tuple else str(value))
    each = ', each' if is_tuple else ','
    with pytest.raises(ValueError, match=rf'^config\.{re.escape(name)} is {shown}{each} must be '
                                         rf'{must} \(.+\): {fix}\.$'):
      config_lib.check_setting_ranges(config, ranges)


def test_loss_weighting_reaches_the_task_and_older_runs_train_uniform():
  """--config.secant.loss_weighting=edm makes an EDM-weighted task; a run's config.json
  from before the setting existed (no key) is read as 'uniform'."""
  c = parse_main_flags(f'--config={REPO}/configs/cifar10_edm.py:variant=stee',
                       '--config.secant.loss_weighting=edm')
  network = recipe.make_network(c)
  assert recipe.make_task(c, network).loss_weighting == 'edm'
  older = older_run(c, 'secant.loss_weighting')
  assert recipe.make_task(older, network).loss_weighting == 'uniform'


def test_log_normal_sigma_reaches_the_task_and_older_runs_draw_from_the_grid():
  """--config.secant.diffusion_log_sigma='(-1.2, 1.2)' makes a task that draws the
  diffusion term's σ as EDM does; '()' and a config.json from before the setting existed
  draw it from the path's grid; a secant variant without a diffusion term refuses it."""
  teacher = f'--config={REPO}/configs/fashion_mnist.py:stage=teacher,model=unet-tiny'
  c = parse_main_flags(teacher, "--config.secant.diffusion_log_sigma=(-1.2, 1.2)")
  network = recipe.make_network(c)
  assert recipe.make_task(c, network).diffusion_log_sigma == (-1.2, 1.2)
  c = parse_main_flags(teacher, '--config.secant.diffusion_log_sigma=()')
  assert recipe.make_task(c, network).diffusion_log_sigma is None
  older = older_run(c, 'secant.diffusion_log_sigma')
  assert recipe.make_task(older, network).diffusion_log_sigma is None
  c = parse_main_flags(f'--config={REPO}/configs/cifar10_edm.py:variant=sdei',
                       "--config.secant.diffusion_log_sigma=(-1.2, 1.2)")
  with pytest.raises(ValueError, match=r"diffusion_log_sigma \(config.secant.diffusion_log_"
                                       r"sigma\) is \(-1.2, 1.2\), but variant 'sdei' has no "
                                       'diffusion term'):
    recipe.make_task(c, recipe.make_network(c))


def test_a_run_from_before_a_setting_existed_resumes_as_it_trained():
  """A config.json without a setting added since holds the value from before: resuming
  it under the config that now sets another (the Fashion-MNIST U-Net teacher's EDM loss
  and EMA warm-up) is refused as changes; with the old values on the command line it is
  none."""
  teacher = f'--config={REPO}/configs/fashion_mnist.py:stage=teacher,model=unet-tiny'
  older = saved_before(parse_main_flags(teacher), 'secant.loss_weighting',
                       'secant.diffusion_log_sigma', 'ema_warmup')
  now = saved_before(parse_main_flags(teacher))
  assert sorted(config_lib.changed_settings(older, now)) == [
      'ema_warmup: False → True', 'secant.diffusion_log_sigma: None → [-1.2, 1.2]',
      "secant.loss_weighting: 'uniform' → 'edm'"]
  as_before = parse_main_flags(teacher, '--config.ema_warmup=False', '--config.secant.'
                               'loss_weighting=uniform', '--config.secant.diffusion_log_sigma=()')
  assert config_lib.changed_settings(older, saved_before(as_before)) == []


def test_none_and_the_empty_tuple_are_the_same_setting_on_resume():
  saved = {'secant': {'guidance': None, 'label_dropout': 0.0}}
  assert config_lib.changed_settings(saved, {'secant': {'guidance': [],
                                                        'label_dropout': 0.0}}) == []
  assert config_lib.changed_settings(saved, {'secant': {'guidance': [1.0, 2.5],
                                                        'label_dropout': 0.1}}) == [
      'secant.guidance: None → [1.0, 2.5]', 'secant.label_dropout: 0.0 → 0.1']


@pytest.mark.parametrize('loss_type, online_cfg, guidance, label_dropout', [
    ('sdei', '1-2.5', (1.0, 2.5), 0.0), ('stei', '1.5-3', (1.5, 3.0), 0.1),
    ('sdee', '2', (2.0, 2.0), 0.0), ('sdei', None, None, 0.1), ('stee', None, None, 0.1)])
def test_official_training_arguments_give_the_flags_of_the_same_model(
    loss_type, online_cfg, guidance, label_dropout, monkeypatch):
  train_args = argparse.Namespace(loss_type=loss_type, num_steps=2, online_cfg=online_cfg)
  monkeypatch.chdir(REPO)  # the flags name configs/imagenet_sit.py from the checkout
  c = parse_main_flags(*shlex.split(' '.join(convert_sit.official_run_flags(train_args))))
  assert (c.secant.variant, c.secant.steps) == (loss_type, 2)
  assert recipe.guidance_range(c.secant) == guidance
  assert c.secant.label_dropout == label_dropout


@pytest.mark.parametrize('config_file, precision', [('cifar10_edm.py', 'float32'),
                                                     ('imagenet_sit.py', 'tensorfloat32')])
def test_the_run_computes_at_the_configs_matmul_precision(monkeypatch, config_file, precision):
  """EDM's config asks for true float32 products (EDM trains with TF32 off), SiT's for TF32
  (the official train.py and sample_ddp.py allow it); main.run traces every mode inside
  that setting, and a bad value is refused naming the key."""
  import jax
  from secant_jax import main
  from secant_jax import sample_mode
  seen = []
  monkeypatch.setattr(sample_mode, 'write_samples',
                      lambda config, workdir: seen.append(jax.config.jax_default_matmul_precision))
  config = parse_main_flags(f'--config={REPO}/configs/{config_file}', '--config.mode=sample')
  assert config.matmul_precision == precision
  main.run(config, '/nonexistent')
  with config.unlocked():
    config.matmul_precision = ''
  main.run(config, '/nonexistent')
  assert seen == [precision, None]
  assert jax.config.jax_default_matmul_precision is None  # left as it was
  with config.unlocked():
    config.matmul_precision = 'fp32'
  with pytest.raises(ValueError, match=r"matmul_precision \(config.matmul_precision\) must be "
                                       r"one of \('', 'bfloat16', 'tensorfloat32', 'float32'\), "
                                       "got 'fp32'"):
    main.run(config, '/nonexistent')


def test_a_config_that_is_not_mains_is_refused_by_name():
  oracle = parse_main_flags(f'--config={REPO}/configs/oracle.py')
  with pytest.raises(ValueError, match=r'^The config has no mode: it is not a config of python '
                                       r'-m secant_jax.main \(configs/oracle.py is python -m '
                                       r"secant_jax.bench.oracle's\)\. Give "):
    main.run(oracle, '/nonexistent')
