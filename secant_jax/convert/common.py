"""PyTorch state dicts → Flax variables: file loading, key mapping, layout, validation.

One rule maps a PyTorch key to a Flax path: split at '.', join a segment that starts with a
digit to the one before it with '_' (ModuleList / Sequential / ModuleDict entries), and
rename the leaf: 'weight' → the template's 'kernel' (Linear: transposed; Conv: OIHW → HWIO),
'scale' (norms) or 'embedding'; 'bias' and buffers keep their names. The Flax template
(from `jax.eval_shape(model.init, ...)`) says what must come out, so any missing,
unexpected or mis-shaped key is an error that names it.
"""

import os
import re

import jax
import numpy as np
from flax import traverse_util

WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')


class ConversionError(ValueError):
  """A checkpoint does not fit the model: the message names the key and both shapes."""


def load_state_dict(path, key=None):
  """{name: float32 numpy array} from a .pt/.pth (torch), .safetensors or .npz file.

  Checkpoints that hold several state dicts (the secant checkpoints' 'model' and 'ema',
  EDM exports, training checkpoints) are narrowed with `key`; by default 'ema' if present,
  else 'model', else the file's dict itself.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Checkpoint {path} does not exist; pass the path of the '
                            'downloaded weights file (.pt, .pth, .safetensors or .npz).')
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.pt', '.pth'):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f'Reading {path} needs PyTorch: pip install torch (CPU build is '
                        'enough), or export it to .safetensors/.npz elsewhere.') from e
    data = torch.load(path, map_location='cpu', weights_only=True)
  elif ext == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    data = load_file(path)
  elif ext == '.npz':
    with np.load(path) as f:
      data = dict(f)
  else:
    raise ConversionError(f'Unknown checkpoint format {ext!r} for {path}: expected .pt, '
                          '.pth, .safetensors or .npz.')
  if key is None:
    key = next((k for k in ('ema', 'model') if k in data and isinstance(data[k], dict)), None)
  if key is not None:
    if key not in data:
      raise ConversionError(f'Checkpoint {path} has no entry {key!r}; its top-level keys are '
                            f'{sorted(data)[:10]}.')
    data = data[key]
  return {k: _to_numpy(v) for k, v in data.items()}


def _to_numpy(value):
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
  """The inverse of `module_path` for messages: ('blocks_3', 'attn') → 'blocks.3.attn'."""
  return '.'.join(re.sub(r'^(.*?)_(\d.*)$', r'\1.\2', p) for p in flax_path)


def _to_flax_layout(leaf, value):
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def convert(state_dict, template, *, ignore=(), keep_from_template=()):
  """Maps a {key: array} state dict onto the template's variables.

  Args:
    state_dict: PyTorch keys → numpy arrays (any model-specific prefix already removed).
    template: Flax variables (arrays or ShapeDtypeStructs), e.g. {'params': ..., 'buffers': ...}.
    ignore: PyTorch keys the caller has handled (fixed buffers it checked itself).
    keep_from_template: top-level Flax module names to take from the template when the
      checkpoint lacks them (new modules of the secant model).

  Returns:
    Variables shaped as the template, float32 numpy arrays.
  """
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
    converted = _to_flax_layout(target[-1], value)
    expected = tuple(flat[target].shape)
    if converted.shape != expected:
      raise ConversionError(f'Shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}'
                            f' (Flax layout {converted.shape}), the model expects {expected} '
                            f'at {"/".join(target)}; check the model size and settings.')
    out[target] = converted
  missing = []
  for path, leaf in flat.items():
    if path in out:
      continue
    if path[1] in keep_from_template:
      out[path] = np.asarray(leaf)
    else:
      missing.append(f'{torch_key(path[1:-1])}.{path[-1]} {tuple(leaf.shape)}')
  if missing:
    raise ConversionError(f'Missing {len(missing)} key(s) in the checkpoint, e.g. '
                          f'{", ".join(missing[:3])} (Flax name and shape); check the model '
                          'name/settings match the checkpoint.')
  return traverse_util.unflatten_dict(out)


def abstract_variables(model, *args, **kwargs):
  """The model's variables as ShapeDtypeStructs (no memory, no compute)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def parameter_count(variables):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables['params'])))


def save(variables, directory):
  """Writes variables as an Orbax checkpoint that the trainer can start from."""
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel
  ocp.save(os.path.abspath(os.fspath(directory)), variables)


def restore(directory, template, sharding=None):
  """Reads variables saved by `save`, shaped as `template`, placed by `sharding` (one
  Sharding for every leaf, default the first local device)."""
  from orbax.checkpoint import v1 as ocp  # pylint: disable=import-outside-toplevel
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'Converted checkpoint {directory} does not exist; make it with '
                            'python -m secant_jax.convert.sit (or .edm) --in WEIGHTS --out DIR.')
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
  return ocp.load(directory, abstract)
