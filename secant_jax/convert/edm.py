"""EDM SongUNet checkpoints → Flax SongUNet variables.

    python -m secant_jax.convert.edm --in edm-cifar10-32x32-uncond-vp.pkl --out DIR
    python -m secant_jax.convert.edm --in edm-cifar10-uncond-vp.pt --out DIR [--arch ddpmpp] [--label-dim 10]

EDM publishes pickles of whole network objects (edm-cifar10-32x32-uncond-vp.pkl); they are
read as data (`edm_pickle`: without EDM's code, running nothing the file carries), and the
SongUNet is built from the constructor arguments the pickle recorded, so `--arch` and
`--label-dim` are only for state dicts (.pt/.pth/.safetensors/.npz), whose keys do not say
them. The EDMPrecond wrapper's 'model.' prefix is dropped; the fixed resampling filters are
checked against the architecture's; NCSN++'s Fourier frequencies go to 'buffers'.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from secant_jax.convert import common
from secant_jax.convert import edm_pickle
from secant_jax.models import edm_unet

# EDM SongUNet arguments without a field here: the one value implemented, and those that
# only act in training (EDM's label dropout for CFG is config.secant.label_dropout here).
_FIXED_ARGUMENTS = {'decoder_type': 'standard'}
_TRAINING_ARGUMENTS = ('label_dropout',)
_NOT_SETTINGS = ('parent', 'name', 'dtype')  # SongUNet fields that are not its architecture


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


def from_pickle(path, key='ema'):
  """(state dict, SongUNet, σ_data) of the EDMPrecond(SongUNet) network under `key` of an
  EDM pickle, the SongUNet built from the constructor arguments the pickle recorded."""
  net = edm_pickle.network(edm_pickle.load(path), path, key)
  if net.class_name != 'EDMPrecond':
    raise common.ConversionError(
        f"{path}'s network is a {net.class_name}: secant-jax implements EDM's own "
        'preconditioning (EDMPrecond, as in models/precond.py), which the published '
        'edm-*.pkl networks use; convert one of those.')
  inner = edm_pickle.submodule(net, 'model')
  if inner.class_name != 'SongUNet':
    raise common.ConversionError(
        f"{path}'s EDMPrecond wraps a {inner.class_name}; only SongUNet (DDPM++, NCSN++: "
        "EDM's CIFAR-10, FFHQ and AFHQ networks) is implemented here.")
  kwargs = edm_pickle.init_kwargs(inner)
  for name, value in _FIXED_ARGUMENTS.items():
    given = kwargs.pop(name, value)
    if given != value:
      raise common.ConversionError(f"{path}'s SongUNet has {name}={given!r}; "
                                   f'edm_unet.SongUNet implements {name}={value!r} only.')
  for name in _TRAINING_ARGUMENTS:
    kwargs.pop(name, None)
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(edm_unet.SongUNet)})
  if unknown:
    raise common.ConversionError(f"{path}'s SongUNet was built with {unknown}, which "
                                 'edm_unet.SongUNet does not implement.')
  model = edm_unet.SongUNet(**common.module_fields(kwargs))
  return edm_pickle.state_dict(net), model, float(net.state.get('sigma_data', 0.5))


def arch_of(model):
  """The name in edm_unet.SETTINGS whose settings a SongUNet has, or None."""
  return next((name for name, fixed in edm_unet.SETTINGS.items()
               if all(getattr(model, k) == v for k, v in fixed.items())), None)


def settings(model):
  """{field: value} of a SongUNet's architecture."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in _NOT_SETTINGS}


def model_config(model):
  """The config.model entries (arch, num_classes, unet) that build `model` (in
  models.registry, unet's entries override the arch's settings)."""
  arch = arch_of(model) or 'ddpmpp'
  fixed = edm_unet.SETTINGS[arch]
  return dict(arch=arch, num_classes=model.label_dim,
              unet={k: v for k, v in settings(model).items()
                    if k != 'label_dim' and not (k in fixed and fixed[k] == v)})


def config_for(model, sigma_data):
  """Which config builds `model` on the σ-path with `sigma_data`, in words:
  configs/cifar10_edm.py where it does, else the config entries that do."""
  entries = model_config(model)
  arch = entries['arch']
  if sigma_data == 0.5 and model.label_dim in (0, 10) and settings(model) == settings(
      edm_unet.cifar10(arch, label_dim=model.label_dim)):
    return ('configs/cifar10_edm.py' + (':classes=10' if model.label_dim else '')
            + ('' if arch == 'ddpmpp' else f' --config.model.arch={arch}') + ' builds it')
  return 'set ' + ', '.join([f'config.model.{k} = {v!r}' for k, v in entries.items()]
                            + [f'config.path.sigma_data = {sigma_data}']) + ' to build it'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--in', dest='input', required=True,
                      help="EDM's .pkl, or a state dict: .pt/.pth/.safetensors/.npz")
  parser.add_argument('--out', required=True, help='Orbax checkpoint directory to write')
  parser.add_argument('--arch', choices=sorted(edm_unet.SETTINGS),
                      help='the architecture of a state dict (default ddpmpp)')
  parser.add_argument('--label-dim', type=int,
                      help='classes of a conditional state dict (10 for '
                           'edm-cifar10-32x32-cond-*; default 0)')
  parser.add_argument('--key', default=None,
                      help="the entry that holds the network (default: 'ema')")
  args = parser.parse_args(argv)
  if args.input.endswith('.pkl'):
    if args.arch or args.label_dim is not None:
      parser.error(f'{args.input} is an EDM pickle, which records its architecture and '
                   'label_dim: leave out --arch and --label-dim.')
    state, model, sigma_data = from_pickle(args.input, args.key or 'ema')
    where = f'; {config_for(model, sigma_data)}'
  else:
    model = edm_unet.cifar10(args.arch or 'ddpmpp', label_dim=args.label_dim or 0)
    state, where = common.load_state_dict(args.input, args.key), ''
  variables = convert(state, init_variables(model), model.resample_filter)
  common.save(jax.tree_util.tree_map(np.asarray, variables), args.out)
  print(f'SongUNet ({arch_of(model) or "other settings"}, label_dim {model.label_dim}): '
        f'{common.parameter_count(variables):,} parameters → {args.out}{where}')


if __name__ == '__main__':
  main()
