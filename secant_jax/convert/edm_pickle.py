"""EDM's network pickles (edm-cifar10-32x32-*.pkl) read as data: no EDM code, nothing run.

EDM pickles its training snapshots, dict(ema=network, loss_fn=..., augment_pipe=...,
dataset_kwargs=...), through its `torch_utils.persistence`: every object of a network class
is stored as the source code of the class's module plus the object's state (its
`__dict__`, with the constructor's arguments as `_init_kwargs`), and unpickling it
normally executes that source, which needs EDM's `dnnlib` and `torch_utils` and runs
whatever code the file carries. `load` instead rebuilds each such object, and every other
class or function the file names, as an inert `PickledObject` (its name, its constructor's
arguments, its state), except torch's tensor rebuilders, whose storages are read with
`torch.load(weights_only=True)`, and a few plain containers; so a pickle yields only data.
`state_dict` then walks an object's `_parameters`, `_buffers` and `_modules` as
`torch.nn.Module.state_dict()` does.
"""

import functools
import io
import pickle

from etils import epath

from secant_jax import files
from secant_jax.convert import common

# The globals rebuilt for real: tensors, parameters, their storages (see _storage), and
# plain containers and dtypes; every other global becomes an inert PickledObject class.
_REAL = {('collections', 'OrderedDict'), ('torch', 'Size'),
         ('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_parameter'),
         ('torch._utils', '_rebuild_parameter_with_state'), ('numpy', 'dtype'),
         ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar')}


class PickledObject(dict):
  """An object of class `class_name` rebuilt as data: `args` (what its class or function
  was called with), `state` (what the pickle set on it: a module's `__dict__`) and, for a
  dict subclass such as EDM's EasyDict, its items."""
  class_name = ''
  args = ()
  state = None

  def __init__(self, *args):
    super().__init__()
    self.args = args

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'PickledObject({self.class_name})'


@functools.cache
def _inert_class(class_name):
  return type(class_name, (PickledObject,), {'class_name': class_name})


def _persistent_object(meta):
  """What torch_utils.persistence._reconstruct_persistent_obj(meta) would build, as data:
  meta = dict(type='class', version, module_src, class_name, state)."""
  if not isinstance(meta, dict) or meta.get('type') != 'class':
    raise common.ConversionError(f'An EDM persistent object of an unknown form: {meta!r:.200}')
  obj = _inert_class(meta['class_name'])()
  obj.state = meta.get('state')
  return obj


def _storage(data):
  """A tensor storage from the bytes torch pickles it as (its torch.save), read as data."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.load(io.BytesIO(data), weights_only=True)


class _Unpickler(pickle.Unpickler):
  """Gives the rebuilders above for the globals a pickle names, an inert class otherwise."""

  def find_class(self, module, name):
    import torch  # pylint: disable=import-outside-toplevel
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
      return _persistent_object
    if (module, name) == ('torch.storage', '_load_from_bytes'):
      return _storage
    if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
      return getattr(torch, name)
    if (module, name) in _REAL:
      return super().find_class(module, name)
    return _inert_class(f'{module}.{name}')


def load(path):
  """The object an EDM pickle holds (local or on a bucket), rebuilt as data."""
  path = files.absolute(path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'EDM pickle {path} does not exist; pass the path of the '
                            'downloaded network pickle (e.g. edm-cifar10-32x32-uncond-vp.pkl).')
  common.import_torch(f'Reading {path}')
  with epath.Path(path).open('rb') as stream:
    return _Unpickler(stream).load()


def network(data, path, key='ema'):
  """The network object under `key` of a loaded EDM snapshot `data` (read from `path`)."""
  if not isinstance(data, dict) or key not in data:
    keys = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise common.ConversionError(f'{path} has no network under {key!r} (it holds {keys}); '
                                 "EDM's snapshots keep it under 'ema'.")
  net = data[key]
  if not isinstance(net, PickledObject) or not isinstance(net.state, dict):
    raise common.ConversionError(f"{path}'s {key!r} is not a pickled network but {net!r}.")
  return net


def submodule(module, name):
  """The child module `name` of a pickled module (its `_modules` entry)."""
  children = module.state.get('_modules') or {}
  if name not in children:
    raise common.ConversionError(f'The pickled {module.class_name} has no submodule {name!r}; '
                                 f'its submodules are {sorted(children)}.')
  return children[name]


def init_kwargs(module):
  """The keyword arguments a pickled persistent module was constructed with."""
  kwargs = module.state.get('_init_kwargs')
  if kwargs is None:
    raise common.ConversionError(f'The pickled {module.class_name} did not record its '
                                 'constructor arguments (EDM\'s persistent classes do).')
  return dict(kwargs)


def state_dict(module, prefix=''):
  """{name: float32 numpy array}, the pickled module's `state_dict()`: its parameters and
  persistent buffers, then its submodules' under 'name.'."""
  state = module.state
  skipped = state.get('_non_persistent_buffers_set') or set()
  tensors = {**(state.get('_parameters') or {}),
             **{k: v for k, v in (state.get('_buffers') or {}).items() if k not in skipped}}
  result = {prefix + k: common.to_numpy(v) for k, v in tensors.items() if v is not None}
  for name, child in (state.get('_modules') or {}).items():
    if child is not None:
      result.update(state_dict(child, f'{prefix}{name}.'))
  return result
