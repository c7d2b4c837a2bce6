"""diffusers AutoencoderKL weights (stabilityai/sd-vae-ft-ema) → Flax `models.vae`.

    python -m secant_jax.convert.vae --in diffusion_pytorch_model.safetensors --out ckpt/sd-vae-ft-ema

The converted directory holds the decoder (post_quant_conv, decoder.*), which FID and the
images of latent samples (`secant_jax.sample_images`) need; the encoder (encoder.*,
quant_conv.*), which `secant_jax.data.encode` needs, is read from the weights file itself,
or from the directory diffusers' save_pretrained writes. Older files name the attention
projections query/key/value/proj_attn (and some store them as 1×1 convolutions): they are
renamed to to_q/to_k/to_v/to_out.0 and squeezed.
"""

import json

import jax.numpy as jnp
from etils import epath

from secant_jax.convert import common
from secant_jax.models import vae

WEIGHTS_URL = ('https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/'
               'diffusion_pytorch_model.safetensors')
DIFFUSERS_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def template(model):
  if isinstance(model, vae.VAEEncoder):
    return common.abstract_variables(model, jnp.zeros((1, 8, 8, 3)))
  return common.abstract_variables(model, jnp.zeros((1, 4, 4, model.latent_channels)))


def convert(state_dict, model=None):
  """An AutoencoderKL state dict → the variables of `model`, a VAEDecoder (the default) or
  a VAEEncoder; the other half's keys are dropped."""
  model = model or vae.VAEDecoder()
  shape = template(model)
  kept = {}
  for key, value in state_dict.items():
    if key.split('.')[0] not in shape['params']:
      continue
    *module, leaf = key.split('.')
    if module and module[-1] in _OLD_ATTENTION:
      module = module[:-1] + _OLD_ATTENTION[module[-1]].split('.')
    if '.attentions.' in key and value.ndim == 4:
      value = value[:, :, 0, 0]
    kept['.'.join([*module, leaf])] = value
  return common.convert(kept, shape)


def load(path):
  """VAEDecoder variables from a converted directory or the diffusers weights file."""
  return common.load_or_convert(path, convert, 'VAE', WEIGHTS_URL + ' (sd-vae-ft-ema)',
                                'config.fid.vae')


def load_encoder(path):
  """(VAEEncoder, its variables, the VAE's scaling factor) of a diffusers AutoencoderKL:
  the directory `save_pretrained` writes (config.json, whose architecture and
  scaling_factor it reads, beside diffusion_pytorch_model.safetensors or .bin) or the
  weights file alone (SD-VAE's architecture and 0.18215). A converted directory holds
  only the decoder."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'VAE weights {path} do not exist; download {WEIGHTS_URL} '
                            "(sd-vae-ft-ema), or use the directory diffusers' save_pretrained "
                            'writes, and pass it as --vae.')
  settings = {}
  if path.is_dir():
    weights = [path / name for name in DIFFUSERS_WEIGHTS if (path / name).exists()]
    if not (path / 'config.json').exists() or not weights:
      raise FileNotFoundError(
          f'{path} is not a diffusers AutoencoderKL directory (config.json and '
          f'{" or ".join(DIFFUSERS_WEIGHTS)}); converted VAE checkpoints hold only the '
          f'decoder. Pass the diffusers weights file ({WEIGHTS_URL}) or the directory '
          'save_pretrained writes.')
    settings, path = json.loads((path / 'config.json').read_text()), weights[0]
  model = vae.VAEEncoder(**common.module_fields(_encoder_settings(settings, path)))
  variables = convert(common.load_state_dict(path), model)
  return model, variables, settings.get('scaling_factor', vae.SD_VAE_SCALE)


def _encoder_settings(settings, weights):
  """VAEEncoder's fields from a diffusers config.json (`settings`; empty: SD-VAE's),
  refusing what this encoder does not compute."""
  expected = {'_class_name': 'AutoencoderKL', 'in_channels': 3, 'act_fn': 'silu',
              'use_quant_conv': True, 'mid_block_add_attention': True, 'shift_factor': None}
  for key, value in expected.items():
    if settings.get(key, value) != value:
      raise ValueError(f'The VAE of {weights} has {key}={settings[key]!r} in its config.json '
                       f'where this encoder computes {key}={value!r} (stabilityai/sd-vae-ft-ema'
                       "'s): it is another kind of autoencoder.")
  kinds = set(settings.get('down_block_types', ['DownEncoderBlock2D']))
  if kinds != {'DownEncoderBlock2D'}:
    raise ValueError(f'The VAE of {weights} has down blocks {sorted(kinds)} in its '
                     'config.json where this encoder computes DownEncoderBlock2D only.')
  fields = ('block_out_channels', 'layers_per_block', 'norm_num_groups', 'latent_channels')
  return {field: settings.get(field, vae.SD_VAE[field]) for field in fields}


def main(argv=None):
  common.weights_cli(__doc__.split('\n\n')[0], convert, 'SD-VAE decoder', WEIGHTS_URL, argv)


if __name__ == '__main__':
  main()
