"""diffusers AutoencoderKL weights (stabilityai/sd-vae-ft-ema) → Flax `models.vae.VAEDecoder`.

    python -m secant_jax.convert.vae --in diffusion_pytorch_model.safetensors --out ckpt/sd-vae-ft-ema

Only the decoder side is kept (post_quant_conv, decoder.*); encoder.* and quant_conv.* are
dropped. Older files name the attention projections query/key/value/proj_attn (and some
store them as 1×1 convolutions): they are renamed to to_q/to_k/to_v/to_out.0 and squeezed.
"""

import jax.numpy as jnp

from secant_jax.convert import common
from secant_jax.models import vae

WEIGHTS_URL = ('https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/'
               'diffusion_pytorch_model.safetensors')
_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def template(model):
  return common.abstract_variables(model, jnp.zeros((1, 4, 4, model.latent_channels)))


def convert(state_dict, model=None):
  """An AutoencoderKL state dict → VAEDecoder variables."""
  model = model or vae.VAEDecoder()
  kept = {}
  for key, value in state_dict.items():
    if key.startswith(('encoder.', 'quant_conv.')):
      continue
    *module, leaf = key.split('.')
    if module and module[-1] in _OLD_ATTENTION:
      module = module[:-1] + _OLD_ATTENTION[module[-1]].split('.')
    if '.attentions.' in key and value.ndim == 4:
      value = value[:, :, 0, 0]
    kept['.'.join([*module, leaf])] = value
  return common.convert(kept, template(model))


def load(path):
  """VAEDecoder variables from a converted directory or the diffusers weights file."""
  return common.load_or_convert(path, convert, 'VAE', WEIGHTS_URL + ' (sd-vae-ft-ema)',
                                'config.fid.vae')


def main(argv=None):
  common.weights_cli(__doc__.split('\n\n')[0], convert, 'SD-VAE decoder', WEIGHTS_URL, argv)


if __name__ == '__main__':
  main()
