"""Networks from the config: the Flax module, its apply-function in the form the train
step and samplers use, and dummy inputs for initialisation.

apply_fn(variables, x, t, s, y, w, dropout_key): t and s are what the network is
conditioned on (the path's preconditioning maps path times to them); dropout_key None
means evaluation. y are integer labels with null_class for "no label": the DiT embeds
them, a class-conditional U-Net (config.model.num_classes > 0) takes them one-hot.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from secant_jax.models import dit
from secant_jax.models import edm_unet

FAMILIES = ('dit', 'edm_unet')
# What config.model.dtype (the compute dtype) and config.model.residual_dtype may name.
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
RESIDUAL_DTYPES = ('float32', 'bfloat16')
# config.model.attention: '' lets XLA choose, 'cudnn' is the fused kernel of NVIDIA GPUs.
ATTENTIONS = ('', 'xla', 'cudnn')


@dataclasses.dataclass(frozen=True)
class Network:
  module: object
  guided: bool  # takes the normalised guidance scale w as an input
  image_shape: tuple  # H, W, C
  null_class: int

  @property
  def num_classes(self):
    """Its labels are 0 … num_classes − 1 (0: an unconditional network); the null class
    that follows them is num_classes in both families."""
    return self.null_class

  def apply(self, variables, x, t, s, y, w, dropout_key=None):
    if isinstance(self.module, dit.DiT):
      return self.module.apply(variables, x, t, s, y, w if self.guided else None)
    rngs = {} if dropout_key is None else {'dropout': dropout_key}
    return self.module.apply(variables, x, t, s, self._one_hot(y),
                             train=dropout_key is not None, rngs=rngs)

  def _one_hot(self, y):
    """The U-Net's class input: EDM's one-hot labels; the null class (label_dim) and
    y=None are all-zero rows, as EDM's label dropout makes them."""
    if not self.module.label_dim or y is None:
      return None
    return jax.nn.one_hot(y, self.module.label_dim, dtype=jnp.float32)

  def inference_variables(self, variables):
    """`variables` as the network computes with them, for calls that take no gradient: a
    DiT, whose every parameter enters a Flax layer that casts it to the compute dtype, gets
    them cast once (the same outputs bit for bit, half the bytes in bf16, no cast per call);
    the U-Net's are returned as they are (its GroupNorm scales the normalised input in fp32).
    """
    if not isinstance(self.module, dit.DiT):
      return variables
    dtype = self.module.dtype
    return jax.tree_util.tree_map(
        lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, variables)

  def init(self, key):
    """Fresh variables, in one compiled call: run op by op, a U-Net's initialisers compile
    one at a time, most of a CPU trainer's start. The network is closed over, not a static
    argument: a module built from a config read back from JSON has lists in its attributes
    and is not hashable."""
    return jax.jit(functools.partial(Network._init_variables, self))(key)

  def _init_variables(self, key):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    z = jnp.zeros((1,), jnp.float32)
    if isinstance(self.module, dit.DiT):
      return self.module.init(key, x, z, z, jnp.zeros((1,), jnp.int32),
                              z if self.guided else None)
    labels = jnp.zeros((1, self.module.label_dim)) if self.module.label_dim else None
    return self.module.init(key, x, z, z, labels)

  def abstract_variables(self):
    return jax.eval_shape(functools.partial(Network._init_variables, self), jax.random.key(0))


def compute_dtype(model_config):
  """config.model.dtype as a dtype, one of COMPUTE_DTYPES."""
  return _named_dtype(model_config, 'dtype', COMPUTE_DTYPES)


def _named_dtype(model_config, key, allowed):
  name = model_config.get(key, 'float32')
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in allowed:
    raise ValueError(f'config.model.{key}={name!r} is not a dtype the networks compute in: '
                     f'expected one of {allowed}; set --config.model.{key}.')
  return dtype


def _attention(model_config, dtype):
  """config.model.attention as jax.nn.dot_product_attention's `implementation`, for a
  network computing in `dtype`."""
  name = model_config.get('attention') or ''
  if name not in ATTENTIONS:
    raise ValueError(f'config.model.attention={name!r} is not an attention implementation: '
                     f'expected one of {ATTENTIONS}; set --config.model.attention.')
  if name == 'cudnn' and dtype == jnp.float32:
    raise ValueError("config.model.attention='cudnn' computes in float16 or bfloat16 only, "
                     "and config.model.dtype is 'float32': set --config.model.dtype=bfloat16 "
                     "or --config.model.attention='' (XLA's attention).")
  return name or None


def build(model_config, guided, mesh=None):
  """config.model → Network; `guided` adds the embedded guidance scale (DiT only).

  `mesh`: the devices that the programs calling the network split its batch over. A DiT
  with cuDNN's attention on more than one device runs that kernel per device on it
  (`dit.Attention`): JAX partitions cuDNN's kernel through a Python callback whose
  per-process id it writes into the program, so that no later run (a resumed one) could
  read the program back from the persistent compilation cache. XLA's attention is
  partitioned by XLA and left to it.
  """
  dtype = compute_dtype(model_config)
  if model_config.family == 'dit':
    attention = _attention(model_config, dtype)
    per_device = attention == 'cudnn' and mesh is not None and mesh.size > 1
    sizes = {k: model_config[k] for k in ('hidden_size', 'depth', 'num_heads')
             if k in model_config}
    module = dit.from_name(
        model_config.name, input_size=model_config.input_size,
        in_channels=model_config.in_channels, num_classes=model_config.num_classes,
        learn_sigma=model_config.get('learn_sigma', True), guidance_embed=guided, dtype=dtype,
        residual_dtype=_named_dtype(model_config, 'residual_dtype', RESIDUAL_DTYPES),
        attention_implementation=attention, attention_mesh=mesh if per_device else None,
        remat=model_config.get('remat', False),
        split_qkv=model_config.get('split_qkv', False), **sizes)
    shape = (model_config.input_size, model_config.input_size, model_config.in_channels)
    return Network(module, guided, shape, module.null_class)
  if model_config.family == 'edm_unet':
    if guided:
      raise ValueError('The EDM U-Net has no guidance-scale input (embedded-CFG '
                       'distillation is DiT/SiT only); set config.secant.guidance to None.')
    kwargs = {'label_dim': model_config.get('num_classes', 0),
              **model_config.get('unet', {})}
    module = edm_unet.from_settings(model_config.arch, dtype=dtype, **kwargs)
    shape = (module.img_resolution, module.img_resolution, module.in_channels)
    return Network(module, False, shape, module.label_dim)
  raise ValueError(f'Unknown model family {model_config.family!r}: expected one of '
                   f'{FAMILIES}; set config.model.family.')
