"""PyTorch state dicts ↔ Flax variables: file loading, key mapping, layout, validation.

One rule maps a PyTorch key to a Flax path: split at '.', join a segment that starts with a
digit to the one before it with '_' (ModuleList / Sequential / ModuleDict entries), and
rename the leaf: 'weight' → the template's 'kernel' (Linear: transposed; Conv: OIHW → HWIO),
'scale' (norms) or 'embedding'; 'bias' and buffers keep their names. The Flax template
(from `jax.eval_shape(model.init, ...)`) says what must come out, so any missing,
unexpected or mis-shaped key is an error that names it. `to_state_dict` is the same rule
read backwards, for exporting trained variables to PyTorch.
"""

import argparse
import os
import re

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from secant_jax import config as config_lib
from secant_jax import files
from secant_jax import orbax_context

WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')


class ConversionError(ValueError):
  """A checkpoint does not fit the model: the message names the key and both shapes."""


def load_state_dict(path, key=None):
  """{name: float32 numpy array} from a .pt/.pth (torch), .safetensors or .npz file, local or
  on a bucket (gs://): `state_dict(read_checkpoint(path), key, path)`."""
  return state_dict(read_checkpoint(path), key, path)


def import_torch(doing, otherwise=''):
  """The torch module, or an ImportError saying that `doing` ('Reading FILE') needs it and
  how to install it (then `otherwise`, another way)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'{doing} needs PyTorch: pip install torch (the CPU build is '
                      f'enough){otherwise}.') from e
  return torch


def read_checkpoint(path):
  """The top-level dict of a .pt/.pth (torch), .safetensors or .npz file, local or on a
  bucket (gs://), read through epath. Torch and npz files stream tensor by tensor, so the
  peak memory is about the checkpoint's size; safetensors files are read whole first. Torch
  files load without running their code (weights_only), with one class allowed besides
  tensors and containers: argparse.Namespace, the training arguments the official
  train.py saves next to 'model', 'ema' and 'opt'."""
  path = files.absolute(path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'Checkpoint {path} does not exist; pass the path of the '
                            'downloaded weights file (.pt, .pth, .safetensors or .npz).')
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.pt', '.pth', '.bin', '.safetensors', '.npz'):
    raise ConversionError(f'Unknown checkpoint format {ext!r} for {path}: expected .pt, '
                          '.pth, .bin, .safetensors or .npz.')
  if ext in ('.pt', '.pth', '.bin'):
    torch = import_torch(f'Reading {path}', ', or export it to .safetensors/.npz elsewhere')
  with epath.Path(path).open('rb') as stream:
    if ext == '.safetensors':
      from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
      return load(stream.read())
    if ext == '.npz':
      with np.load(stream) as f:
        return dict(f)
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(stream, map_location='cpu', weights_only=True)


def state_dict(data, key, path):
  """{name: float32 numpy array} of a checkpoint's top-level dict `data` (read from
  `path`). Checkpoints that hold several state dicts (the secant checkpoints' 'model' and
  'ema', EDM exports, training checkpoints) are narrowed with `key`; by default 'ema' if
  present, else 'model', else `data` itself."""
  if key is None:
    key = next((k for k in ('ema', 'model') if k in data and isinstance(data[k], dict)), None)
  if key is not None:
    if key not in data:
      raise ConversionError(f'Checkpoint {path} has no entry {key!r}; its top-level keys are '
                            f'{sorted(data)[:10]}.')
    data = data[key]
  return {k: to_numpy(v) for k, v in data.items()}


def to_numpy(value):
  if hasattr(value, 'detach'):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def module_path(torch_key):
  """'blocks.3.attn.qkv' → ('blocks_3', 'attn', 'qkv')."""
  parts = []
  for segment in torch_key.split('.'):
    if parts and segment[:1].isdigit():
      parts[-1] = f'{parts[-1]}_{segment}'
    else:
      parts.append(segment)
  return tuple(parts)


def torch_key(flax_path):
  """The inverse of `module_path` (messages, export): ('blocks_3', 'attn') → 'blocks.3.attn'."""
  return '.'.join(re.sub(r'^(.*?)_(\d.*)$', r'\1.\2', p) for p in flax_path)


# The axes of a PyTorch 'kernel' in Flax's order, by rank: Linear [out, in] → [in, out],
# Conv2d OIHW → HWIO. Exporting applies the inverse permutation.
_FLAX_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}


def _relayout(leaf, value, to_flax=True):
  axes = _FLAX_AXES.get(value.ndim) if leaf == 'kernel' else None
  if axes is None:
    return value
  return value.transpose(axes if to_flax else tuple(np.argsort(axes)))


def to_state_dict(variables):
  """Flax variables → {PyTorch key: float32 array in PyTorch layout}, the inverse of
  `to_flax_paths`: ('params', 'blocks_3', 'attn', 'qkv', 'kernel') → 'blocks.3.attn.qkv.weight',
  transposed. Fixed tensors that Flax does not hold (DiT's pos_embed) are the caller's."""
  out = {}
  for (_, *mods, leaf), value in traverse_util.flatten_dict(variables).items():
    name = 'weight' if leaf in WEIGHT_LEAVES else leaf
    out[f'{torch_key(mods)}.{name}'] = np.array(
        _relayout(leaf, np.asarray(value), to_flax=False), np.float32, order='C')
  return out


def to_flax_paths(state_dict, template, ignore=()):
  """{PyTorch key: array} → {Flax path: array in Flax layout}, paths found in `template`."""
  flat = traverse_util.flatten_dict(template)
  out = {}
  for key, value in state_dict.items():
    if key in ignore:
      continue
    *mods, leaf = key.split('.')
    mods = module_path('.'.join(mods))
    names = WEIGHT_LEAVES if leaf == 'weight' else (leaf,)
    target = next(((col, *mods, name) for col in template for name in names
                   if (col, *mods, name) in flat), None)
    if target is None:
      raise ConversionError(f'Unexpected key {key!r} (shape {tuple(value.shape)}) in the '
                            'checkpoint: the model has no such parameter; check the model '
                            'name/settings match the checkpoint.')
    converted = _relayout(target[-1], value)
    if converted.shape != tuple(flat[target].shape):
      raise ConversionError(f'Shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}'
                            f' (Flax layout {converted.shape}), the model expects '
                            f'{tuple(flat[target].shape)} at {"/".join(target)}; check the '
                            'model size and settings.')
    out[target] = converted
  return out


def fit(flat, template, *, keep_from_template=(), copy_missing=None, fresh=None):
  """Fills the template's variables from {Flax path: array}.

  Args:
    flat: the checkpoint's variables by Flax path (collection first).
    template: the model's variables (arrays, or ShapeDtypeStructs where nothing is kept
      or `fresh` gives what is).
    keep_from_template: top-level module names taken from the template when `flat` lacks
      them (modules new in the secant model, e.g. the guidance embedder).
    copy_missing: {missing module: source module} copied within `flat` (the s-embedder
      starts as the t-embedder).
    fresh: None, or a function returning variables shaped as the template to take those
      modules from instead, called only where one is missing (a model's init, which a
      checkpoint that holds every module does not pay for).

  Returns:
    Variables shaped as the template. Missing, unexpected and mis-shaped entries raise
    ConversionError naming them.
  """
  flat = dict(flat)
  expected = traverse_util.flatten_dict(template)
  for target, origin in (copy_missing or {}).items():
    wanted = any(p[1] == target for p in expected)
    if wanted and not any(p[1] == target for p in flat):
      flat.update({(p[0], target, *p[2:]): v for p, v in flat.items() if p[1] == origin})
  unexpected = [p for p in flat if p not in expected]
  if unexpected:
    raise ConversionError(f'Unexpected {len(unexpected)} variable(s) in the checkpoint, e.g. '
                          f'{", ".join("/".join(p) for p in unexpected[:3])}; check the model '
                          'name/settings match the checkpoint.')
  out, missing, kept = {}, [], None
  for path, leaf in expected.items():
    if path in flat:
      if tuple(flat[path].shape) != tuple(leaf.shape):
        raise ConversionError(f'Shape mismatch at {"/".join(path)}: checkpoint has '
                              f'{tuple(flat[path].shape)}, the model expects '
                              f'{tuple(leaf.shape)}; check the model size and settings.')
      out[path] = flat[path]
    elif path[1] in keep_from_template:
      if kept is None:
        kept = traverse_util.flatten_dict(fresh()) if fresh else expected
      out[path] = np.asarray(kept[path])
    else:
      missing.append(f'{torch_key(path[1:-1])}.{path[-1]} {tuple(leaf.shape)}')
  if missing:
    raise ConversionError(f'Missing {len(missing)} key(s) in the checkpoint, e.g. '
                          f'{", ".join(missing[:3])} (Flax name and shape); check the model '
                          'name/settings match the checkpoint.')
  return traverse_util.unflatten_dict(out)


def convert(state_dict, template, *, ignore=(), keep_from_template=(), copy_missing=None):
  """A PyTorch state dict → variables shaped as the template (see `fit`)."""
  return fit(to_flax_paths(state_dict, template, ignore), template,
             keep_from_template=keep_from_template, copy_missing=copy_missing)


def module_fields(arguments):
  """Constructor arguments read from a file (a pickle, a config.json) as Flax module fields:
  lists become tuples, as a module's fields must be hashable."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}


def abstract_variables(model, *args, **kwargs):
  """The model's variables as ShapeDtypeStructs (no memory, no compute)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def parameter_count(variables):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables['params'])))


def save(variables, directory, overwrite=False):
  """Writes variables as an Orbax checkpoint that the trainer can start from; an existing
  one at `directory` is an error unless `overwrite` (a run re-exporting its EMA)."""
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel
  with orbax_context.context():
    ocp.save(files.absolute(directory), variables, overwrite=overwrite)


def load_variables(directory):
  """A converted checkpoint's variables as saved (numpy), whatever model they fit."""
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel
  directory = existing_checkpoint(directory)
  metadata = ocp.metadata(directory).metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata,
      is_leaf=lambda m: hasattr(m, 'shape'))
  return jax.tree_util.tree_map(np.asarray, ocp.load(directory, abstract))


def load_or_convert(path, convert_fn, what, url, config_key):
  """Variables of a fixed network (Inception, VAE): from a converted directory, or converted
  in memory from the published weights file. A missing path names the download."""
  path = os.fspath(path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'{what} weights {path} do not exist; download {url}, then set '
                            f'{config_key} to the file or to its conversion.')
  if epath.Path(path).is_dir():
    return load_variables(path)
  return convert_fn(load_state_dict(path))


def weights_cli(description, convert_fn, what, url, argv=None):
  """`--in FILE --out DIR`: converts a published weights file and saves it with Orbax."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--in', dest='input', required=True, help=f'the file from {url}')
  parser.add_argument('--out', required=True, help='Orbax checkpoint directory to write')
  args = parser.parse_args(argv)
  variables = convert_fn(load_state_dict(args.input))
  save(jax.tree_util.tree_map(np.asarray, variables), args.out)
  print(f'{what}: {parameter_count(variables):,} parameters → {args.out}')


def load_run(run_dir):
  """(config, EMA directory) of a finished training run: its config.json (with the settings
  added since at the values it trained with, `config.with_added_settings`) and ema/."""
  config_file = os.path.join(run_dir, 'config.json')
  if not epath.Path(config_file).exists():
    raise FileNotFoundError(f'{run_dir} has no config.json: pass the --workdir of a training '
                            'run (python -m secant_jax.main --config=... --workdir=DIR).')
  config = config_lib.with_added_settings(files.read_json(config_file))
  return ml_collections.ConfigDict(config), existing_checkpoint(os.path.join(run_dir, 'ema'))


def existing_checkpoint(directory):
  """`directory`, absolute, if it exists; else an error that says how it is made: RUN/ema
  when the training run in RUN finishes, anything else by a converter."""
  directory = files.absolute(directory)
  if epath.Path(directory).is_dir():
    return directory
  if epath.Path(directory).exists():
    converter = 'edm' if directory.endswith('.pkl') else 'sit (or .edm)'
    raise FileNotFoundError(f'{directory} is a weights file, not a converted checkpoint (a '
                            f'directory): convert it once with python -m secant_jax.convert.'
                            f'{converter} --in {directory} --out DIR and point the config '
                            'at DIR.')
  run_dir = os.path.dirname(directory)
  if os.path.basename(directory) != 'ema':
    raise FileNotFoundError(f'Converted checkpoint {directory} does not exist; make it with '
                            'python -m secant_jax.convert.sit (or .edm) --in WEIGHTS --out DIR.')
  if epath.Path(run_dir, 'config.json').exists():
    steps = [int(p.name) for p in epath.Path(run_dir, 'checkpoints').glob('*')
             if p.name.isdigit()]
    now = (f', or with --config.num_train_steps={max(steps)} (its latest checkpoint) to '
           'export the EMA it has now and train on later' if steps else '')
    raise FileNotFoundError(f'{directory} does not exist: the run in {run_dir} has not '
                            'finished (a training run exports its EMA there when it reaches '
                            'num_train_steps); run it again with the same --config and '
                            f'--workdir={run_dir} to resume it to the end{now}.')
  raise FileNotFoundError(f'{directory} does not exist and {run_dir} holds no training run; '
                          'train one there (python -m secant_jax.main --config=... '
                          f'--workdir={run_dir}), or point the config at a converted '
                          'checkpoint.')
