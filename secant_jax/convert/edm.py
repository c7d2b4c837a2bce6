"""EDM SongUNet checkpoints → Flax SongUNet variables.

    python -m secant_jax.convert.edm --in edm-cifar10-uncond-vp.pt --out DIR [--arch ddpmpp]
    python -m secant_jax.convert.edm --in edm-cifar10-cond-vp.pt --out DIR --label-dim 10

EDM publishes pickles of whole network objects (edm-cifar10-32x32-uncond-vp.pkl), which
only unpickle next to EDM's own code. Export the state dict once, in a checkout of
NVlabs/edm:

    python -c "import pickle, torch; net = pickle.load(open('edm-cifar10-32x32-uncond-vp.pkl', 'rb'))['ema']; torch.save(net.state_dict(), 'edm-cifar10-uncond-vp.pt')"

The EDMPrecond wrapper's 'model.' prefix is dropped; the fixed resampling filters are
checked against the architecture's; NCSN++'s Fourier frequencies go to 'buffers'.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from secant_jax.convert import common
from secant_jax.models import edm_unet


def convert(state_dict, template, resample_filter):
  """State dict (with or without the 'model.' prefix) → variables shaped as `template`."""
  if all(k.startswith('model.') for k in state_dict):
    state_dict = {k[len('model.'):]: v for k, v in state_dict.items()}
  taps = len(resample_filter)
  filters = [k for k in state_dict if k.endswith('.resample_filter')]
  for key in filters:
    if state_dict[key].shape[-2:] != (taps, taps):
      raise common.ConversionError(
          f'Key {key!r} is a {state_dict[key].shape[-1]}-tap resampling filter, the model '
          f'uses {taps} taps {tuple(resample_filter)}; pick the matching --arch.')
  return common.convert(state_dict, template, ignore=filters)


def init_variables(model):
  size, ch = model.img_resolution, model.in_channels
  z = jnp.zeros((1,))
  return common.abstract_variables(model, jnp.zeros((1, size, size, ch)), z, z)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--in', dest='input', required=True, help='.pt/.pth/.safetensors/.npz')
  parser.add_argument('--out', required=True, help='Orbax checkpoint directory to write')
  parser.add_argument('--arch', default='ddpmpp', choices=sorted(edm_unet.SETTINGS))
  parser.add_argument('--label-dim', type=int, default=0,
                      help='classes of a conditional network (10 for edm-cifar10-32x32-cond-*)')
  parser.add_argument('--key', default=None)
  args = parser.parse_args(argv)
  if args.input.endswith('.pkl'):
    raise SystemExit(f'{args.input} is an EDM pickle; export its state dict first (see '
                     'python -m secant_jax.convert.edm --help or this module\'s docstring).')
  model = edm_unet.cifar10(args.arch, label_dim=args.label_dim)
  variables = convert(common.load_state_dict(args.input, args.key), init_variables(model),
                      model.resample_filter)
  common.save(jax.tree_util.tree_map(np.asarray, variables), args.out)
  print(f'SongUNet {args.arch}: {common.parameter_count(variables):,} parameters → {args.out}')


if __name__ == '__main__':
  main()
