"""DiT / SiT with two times: the secant network f(x, t, s, y, w) on VAE latents (NHWC).

The architecture is DiT's (Peebles & Xie): patch embedding + fixed 2-D sin-cos positions,
adaLN-Zero transformer blocks, a final adaLN layer, learn-sigma output. Conditioning

    c = (emb_t(t) + emb_s(s)) / 2 + emb_y(y) [+ emb_w(ŵ)],

where emb_s is a second timestep embedder (a copy of emb_t when initialised from a
teacher, so that f(x, t, t) = v_teacher(x, t)), y = num_classes is the null class for CFG
and ŵ ∈ [0, 1] the normalised guidance scale (its embedder's last layer starts at zero).
Called with s = t this is the teacher; `two_times=False` builds the one-time teacher whose
parameters are exactly a SiT checkpoint's.

Precision: the products (Dense, Conv, attention) compute in `dtype`; the sums the network
accumulates, the token stream's residual adds (with the LayerNorms and modulation that read
it) and c, are kept in `residual_dtype`, float32 by default, as PyTorch's autocast keeps
them in the official fp16/bf16 training. With `dtype=bfloat16`, keeping them in bfloat16
too moves about 10% fewer bytes but doubles the error: on SiT-XL/2's shape (random
weights) the output's relative ℓ2 error to float32 is 0.69% with a float32 residual
stream, 1.55% with a bfloat16 one, 0.66% under PyTorch's bf16 autocast (README, Models).

Submodule names follow the PyTorch state-dict keys ('blocks.3.attn.qkv.weight' ↔
blocks_3/attn/qkv/kernel) so conversion is mechanical.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# name → (depth, hidden size, heads), as in DiT/SiT.
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)

_xavier = nn.initializers.xavier_uniform()
LAYER_NORM_EPSILON = 1e-6


def timestep_frequencies(t, dim=256, max_period=10000.0):
  """GLIDE's sinusoidal features [cos(t·φ_i), sin(t·φ_i)], φ_i = max_period^(−i/half)."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_position_embedding(dim, grid_size):
  """DiT's fixed 2-D embedding [T, dim]: first half encodes the column, second the row."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                           np.arange(grid_size, dtype=np.float32))

  def embed(pos):
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _one_pass_normalize(x):
  """(x − E[x]) / sqrt(Var[x] + ε) over the last axis, Var[x] = max(E[x²] − E[x]², 0)."""
  mean = jnp.mean(x, -1, keepdims=True)
  variance = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
  return (x - mean) * jax.lax.rsqrt(variance + LAYER_NORM_EPSILON)


@jax.custom_jvp
def layer_norm(x):
  """DiT's LayerNorm without scale or bias, over the last axis, computed in float32:

      (x − μ) / sqrt(σ² + ε),   μ = E[x],   σ² = E[(x − μ)²] (two passes over x).

  Where it is differentiated (the student in a train step) it computes the same function
  as σ² = E[x²] − μ² instead, from one pass (`_one_pass_normalize`, as flax's LayerNorm),
  and its derivative is that form's. Each form is the one XLA compiles to fewer bytes on a
  GPU where it is used: evaluated alone (sampling, the frozen teacher, the Picard
  estimates), the two-pass form becomes one Triton kernel per LayerNorm that also takes in
  the residual add before it, so the stream between a block's two halves is never written
  (4-step sampling of SiT-XL/2 at batch 256 on an H100 moves 8.4% fewer bytes); under
  differentiation the one-pass statistics fuse into the residual add's kernel, and the
  two-pass form would move 5% more for STEE. The two differ by float32 rounding only; the
  two-pass form is also what PyTorch's LayerNorm computes (Welford's algorithm), and keeps
  its precision where |μ| ≫ σ.
  """
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, -1, keepdims=True)
  variance = jnp.mean(jnp.square(centred), -1, keepdims=True)
  return (centred * jax.lax.rsqrt(variance + LAYER_NORM_EPSILON)).astype(x.dtype)


@layer_norm.defjvp
def _layer_norm_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y, dy = jax.jvp(_one_pass_normalize, (x.astype(jnp.float32),), (dx.astype(jnp.float32),))
  return y.astype(x.dtype), dy.astype(x.dtype)


class LayerNorm(nn.Module):
  """`layer_norm` as a module without parameters, so that its ops carry its name
  (norm1, norm2, norm_final: the PyTorch modules' names) in profiles."""

  @nn.compact
  def __call__(self, x):
    return layer_norm(x)


class TimestepEmbedder(nn.Module):
  """Sinusoidal features → Linear → SiLU → Linear (keys mlp.0, mlp.2)."""
  hidden_size: int
  dtype: jnp.dtype = jnp.float32
  zero_output: bool = False

  @nn.compact
  def __call__(self, t):
    h = timestep_frequencies(t)
    h = nn.Dense(self.hidden_size, dtype=self.dtype, name='mlp_0',
                 kernel_init=nn.initializers.normal(0.02))(h)
    out_init = nn.initializers.zeros if self.zero_output else nn.initializers.normal(0.02)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name='mlp_2',
                    kernel_init=out_init)(nn.silu(h))


class QKVProjection(nn.Module):
  """timm's fused qkv Linear (key attn.qkv: kernel [hidden, 3·hidden], columns q | k | v),
  returning q, k and v [B, T, heads, head_dim].

  `split=False` computes the one product [B, T, 3·hidden] and copies q, k and v out of it;
  `split=True` computes three products from the kernel's column blocks, which writes q, k
  and v where attention reads them (no copy) but reads the input three times. The
  parameters, and so checkpoints and conversion, are the same either way.
  """
  hidden_size: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  split: bool = False

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    kernel = self.param('kernel', _xavier, (d, 3 * self.hidden_size), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (3 * self.hidden_size,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    heads = (self.num_heads, self.hidden_size // self.num_heads)
    if self.split:
      return tuple((x @ k + c).reshape(b, n, *heads)
                   for k, c in zip(jnp.split(kernel, 3, 1), jnp.split(bias, 3)))
    return tuple(jnp.moveaxis((x @ kernel + bias).reshape(b, n, 3, *heads), 2, 0))


class Attention(nn.Module):
  """timm's Attention: qkv projection, scaled dot-product attention, output projection.

  With a `mesh`, the scaled dot-product attention runs on each device's share of the batch
  (`jax.shard_map`, the batch split over all the mesh's axes as the train step and the
  samplers split it), where the batch splits evenly (not initialisation's batch of one).
  That is how XLA would partition it too, but a kernel that JAX partitions through a
  Python callback (`jax.experimental.custom_partitioning`, as cuDNN's is) is then inlined
  instead of calling back, and the program carries no per-process callback id: the same
  program, and so the same persistent-compilation-cache key, in every run.
  """
  hidden_size: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str | None = None
  split_qkv: bool = False
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x):
    q, k, v = QKVProjection(self.hidden_size, self.num_heads, self.dtype, self.split_qkv,
                            name='qkv')(x)
    attend = functools.partial(jax.nn.dot_product_attention,
                               implementation=self.implementation)
    if self.mesh is not None and x.shape[0] % self.mesh.size == 0:
      batch = P(self.mesh.axis_names)
      attend = jax.shard_map(attend, mesh=self.mesh, in_specs=batch, out_specs=batch,
                             check_vma=False)  # no collectives in it to check
    out = attend(q, k, v)
    return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_xavier,
                    name='proj')(out.reshape(x.shape[:2] + (self.hidden_size,)))


@jax.checkpoint
def gelu_recomputed(h):
  """GELU, tanh approximation: ½h(1 + tanh(√(2/π)(h + 0.044715h³))), whose backward pass
  keeps only h and recomputes the rest.

  Plain autodiff keeps four of the formula's intermediates besides h, each the size of h
  ([batch, tokens, 4·hidden] per block), written in the forward pass and read back in the
  backward; recomputing them from h inside the backward's elementwise kernel moves fewer
  bytes and holds less memory. The forward values are GELU's, bit for bit.
  """
  return nn.gelu(h, approximate=True)


class Mlp(nn.Module):
  """timm's Mlp: fc1 → GELU (tanh approximation, `gelu_recomputed`) → fc2."""
  hidden_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden_features, dtype=self.dtype, kernel_init=_xavier, name='fc1')(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_xavier,
                    name='fc2')(gelu_recomputed(h))


class DiTBlock(nn.Module):
  """adaLN-Zero block: x += g₁·Attn(mod(LN(x))); x += g₂·MLP(mod(LN(x)))."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None
  split_qkv: bool = False
  attention_mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x, c):
    """x [B, T, hidden] in the residual dtype, which the LayerNorms keep; c [B, hidden]."""
    mod = nn.Dense(6 * self.hidden_size, dtype=self.dtype, name='adaLN_modulation_1',
                   kernel_init=nn.initializers.zeros)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = Attention(self.hidden_size, self.num_heads, self.dtype,
                  self.attention_implementation, self.split_qkv, self.attention_mesh,
                  name='attn')(
                      modulate(LayerNorm(name='norm1')(x), shift_msa, scale_msa))
    x = x + gate_msa[:, None] * h
    h = modulate(LayerNorm(name='norm2')(x), shift_mlp, scale_mlp)
    h = Mlp(int(self.hidden_size * self.mlp_ratio), self.dtype, name='mlp')(h)
    return x + gate_mlp[:, None] * h


class PatchEmbed(nn.Module):
  """Non-overlapping p×p patches → tokens [B, T, hidden] (key x_embedder.proj)."""
  hidden_size: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    # Initialised like a Linear over the flattened patch, as DiT does.
    init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2),
                                            out_axis=-1)
    h = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=init, name='proj')(x.astype(self.dtype))
    return h.reshape(x.shape[0], -1, self.hidden_size)


class LabelEmbedder(nn.Module):
  """Class labels → vectors; row num_classes is the null class (key y_embedder)."""
  num_classes: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    return nn.Embed(self.num_classes + 1, self.hidden_size, dtype=self.dtype,
                    embedding_init=nn.initializers.normal(0.02), name='embedding_table')(y)


class FinalLayer(nn.Module):
  """adaLN → Linear to p·p·C_out per token (zero-initialised)."""
  hidden_size: int
  out_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    mod = nn.Dense(2 * self.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='adaLN_modulation_1')(nn.silu(c))
    shift, scale = jnp.split(mod, 2, -1)
    x = modulate(LayerNorm(name='norm_final')(x), shift, scale)
    return nn.Dense(self.out_features, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='linear')(x)


class DiT(nn.Module):
  """The secant DiT/SiT. Inputs: x [B, H, W, C], t, s [B] in [0, 1], y [B] int labels,
  w [B] normalised guidance scale (only with guidance_embed). Output [B, H, W, C] float32."""
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  two_times: bool = True
  guidance_embed: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None
  remat: bool = False  # recompute each block's activations in the backward pass
  split_qkv: bool = False  # q, k, v as three products (QKVProjection)
  residual_dtype: jnp.dtype = jnp.float32  # of the residual stream and c (module docstring)
  attention_mesh: jax.sharding.Mesh | None = None  # attention per device on it (Attention)

  @property
  def null_class(self):
    return self.num_classes

  @nn.compact
  def __call__(self, x, t, s=None, y=None, w=None):
    b, height, width, channels = x.shape
    p = self.patch_size
    if (height, width, channels) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f'DiT input must be [B, {self.input_size}, {self.input_size}, '
                       f'{self.in_channels}] (NHWC), got {x.shape}.')
    grid = self.input_size // p
    accumulated = lambda a: a.astype(self.residual_dtype)
    h = accumulated(PatchEmbed(self.hidden_size, p, self.dtype, name='x_embedder')(x))
    h = h + accumulated(sincos_position_embedding(self.hidden_size, grid))

    c = accumulated(TimestepEmbedder(self.hidden_size, self.dtype, name='t_embedder')(t))
    if self.two_times:
      if s is None:
        raise ValueError('This DiT takes two times (two_times=True): pass s (s = t for the '
                         'teacher tangent).')
      c = 0.5 * (c + accumulated(
          TimestepEmbedder(self.hidden_size, self.dtype, name='s_embedder')(s)))
    if y is None:
      y = jnp.full((b,), self.null_class, jnp.int32)
    c = c + accumulated(LabelEmbedder(self.num_classes, self.hidden_size, self.dtype,
                                      name='y_embedder')(y))
    if self.guidance_embed:
      if w is None:
        raise ValueError('This DiT embeds the guidance scale (guidance_embed=True): pass the '
                         'normalised scale w in [0, 1].')
      c = c + accumulated(TimestepEmbedder(self.hidden_size, self.dtype, zero_output=True,
                                           name='cfg_embedder')(w))

    block = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block(self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype,
                self.attention_implementation, self.split_qkv, self.attention_mesh,
                name=f'blocks_{i}')(h, c)

    out_channels = self.in_channels * (2 if self.learn_sigma else 1)
    h = FinalLayer(self.hidden_size, p * p * out_channels, self.dtype, name='final_layer')(h, c)
    h = h.reshape(b, grid, grid, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    h = h.reshape(b, height, width, out_channels).astype(jnp.float32)
    return h[..., :self.in_channels]


def parse_name(name):
  """'SiT-XL/2' or 'DiT-S/4' → (depth, hidden, heads, patch)."""
  match = re.fullmatch(r'(?:SiT|DiT)-(S|B|L|XL)/(\d+)', name)
  if not match or int(match.group(2)) not in PATCH_SIZES:
    raise ValueError(f'Unknown model name {name!r}: expected (SiT|DiT)-(S|B|L|XL)/(2|4|8), '
                     "e.g. 'SiT-XL/2'.")
  depth, hidden, heads = SIZES[match.group(1)]
  return depth, hidden, heads, int(match.group(2))


def from_name(name, **kwargs):
  """The named size, e.g. from_name('SiT-XL/2', guidance_embed=True, dtype=jnp.bfloat16);
  keyword arguments override the name's depth, hidden_size and num_heads too."""
  depth, hidden, heads, patch = parse_name(name)
  return DiT(**{**dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch),
                **kwargs})
