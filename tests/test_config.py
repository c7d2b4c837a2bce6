"""Variant settings as the official code trains them, and switching guidance from the command
line as `python -m secant_jax.main` parses it (ml_collections' config_flags, locked)."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from secant_jax import config as config_lib
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


def _parse(*args):
  argv = ['main', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize('variant, override, expected', [
    ('stei', '()', None), ('stei', '(1.5, 3.0)', (1.5, 3.0)), ('stee', '(1.0, 2.0)', (1.0, 2.0)),
    ('stee', None, None)])
def test_guidance_is_set_either_way_from_the_command_line(variant, override, expected):
  argv = [f'--config={REPO}/configs/imagenet_sit.py:variant={variant}']
  if override is not None:
    argv.append(f'--config.secant.guidance={override}')
  c = _parse(*argv)
  assert recipe.guidance_range(c.secant) == expected
  network = recipe.make_network(c)
  assert network.guided == (expected is not None)
  assert recipe.make_task(c, network).guidance_range == expected


def test_none_and_the_empty_tuple_are_the_same_setting_on_resume():
  saved = {'secant': {'guidance': None, 'label_dropout': 0.0}}
  assert config_lib.changed_settings(saved, {'secant': {'guidance': [],
                                                        'label_dropout': 0.0}}) == []
  assert config_lib.changed_settings(saved, {'secant': {'guidance': [1.0, 2.5],
                                                        'label_dropout': 0.1}}) == [
      'secant.guidance: None → [1.0, 2.5]', 'secant.label_dropout: 0.0 → 0.1']
