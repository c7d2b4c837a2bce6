"""The SD-VAE decoder (diffusers' AutoencoderKL, as in stabilityai/sd-vae-ft-ema) in Flax, NHWC.

latents [B, h, w, 4] (scaled, as the secant models produce them) → ÷ latent_scale →
post_quant_conv → decoder → RGB [B, 8h, 8w, 3] in about [−1, 1]. The decoder: conv_in;
a middle block (ResNet, single-head self-attention over all pixels, ResNet); up blocks
from the widest channels down, each `layers_per_block + 1` ResNets then (except the last)
nearest 2× upsampling and a 3×3 conv; GroupNorm, SiLU, conv_out. ResNet blocks are
GroupNorm → SiLU → conv3×3 twice, with a 1×1 conv shortcut when the width changes;
GroupNorm ε = 1e-6 throughout. Module names follow diffusers' state dict keys.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              latent_channels=4, out_channels=3)


def _conv(features, kernel, name):
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, name=name)


class ResnetBlock(nn.Module):
  features: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name='norm1')(x))
    h = _conv(self.features, 3, 'conv1')(h)
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name='norm2')(h))
    h = _conv(self.features, 3, 'conv2')(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, 'conv_shortcut')(x)
    return x + h


class SelfAttention(nn.Module):
  """Single-head attention over all h·w positions, with a residual connection."""
  groups: int

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = nn.GroupNorm(self.groups, epsilon=1e-6, name='group_norm')(x).reshape(b, -1, c)
    q, k, v = (nn.Dense(c, name=n)(h) for n in ('to_q', 'to_k', 'to_v'))
    weights = jax.nn.softmax(jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32)
                             / jnp.sqrt(c).astype(jnp.float32), axis=-1)
    h = jnp.einsum('bqk,bkc->bqc', weights.astype(v.dtype), v)
    return x + nn.Dense(c, name='to_out_0')(h).reshape(b, height, width, c)


class MidBlock(nn.Module):
  groups: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name='resnets_0')(x)
    x = SelfAttention(self.groups, name='attentions_0')(x)
    return ResnetBlock(c, self.groups, name='resnets_1')(x)


class Upsample(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'nearest')
    return _conv(self.features, 3, 'conv')(x)


class UpBlock(nn.Module):
  features: int
  num_resnets: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_resnets):
      x = ResnetBlock(self.features, self.groups, name=f'resnets_{j}')(x)
    if self.upsample:
      x = Upsample(self.features, name='upsamplers_0')(x)
    return x


class Decoder(nn.Module):
  block_out_channels: tuple
  layers_per_block: int
  norm_num_groups: int
  out_channels: int

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(self.block_out_channels))
    x = _conv(widths[0], 3, 'conv_in')(z)
    x = MidBlock(self.norm_num_groups, name='mid_block')(x)
    for i, width in enumerate(widths):
      x = UpBlock(width, self.layers_per_block + 1, self.norm_num_groups,
                  upsample=i < len(widths) - 1, name=f'up_blocks_{i}')(x)
    x = nn.silu(nn.GroupNorm(self.norm_num_groups, epsilon=1e-6, name='conv_norm_out')(x))
    return _conv(self.out_channels, 3, 'conv_out')(x)


class VAEDecoder(nn.Module):
  """Scaled latents [B, h, w, C] → images [B, 8h, 8w, 3] (for the SD-VAE)."""
  block_out_channels: tuple = SD_VAE['block_out_channels']
  layers_per_block: int = SD_VAE['layers_per_block']
  norm_num_groups: int = SD_VAE['norm_num_groups']
  latent_channels: int = SD_VAE['latent_channels']
  out_channels: int = SD_VAE['out_channels']
  latent_scale: float = 0.18215

  @nn.compact
  def __call__(self, latents):
    if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f'VAEDecoder takes NHWC latents [B, h, w, {self.latent_channels}], '
                       f'got {latents.shape}.')
    z = latents.astype(jnp.float32) / self.latent_scale
    z = _conv(self.latent_channels, 1, 'post_quant_conv')(z)
    return Decoder(tuple(self.block_out_channels), self.layers_per_block,
                   self.norm_num_groups, self.out_channels, name='decoder')(z)
