"""The SD-VAE (diffusers' AutoencoderKL, as in stabilityai/sd-vae-ft-ema) in Flax, NHWC.

Encoder: RGB [B, H, W, 3] in [−1, 1] → conv_in; down blocks from the narrowest channels
up, each `layers_per_block` ResNets then (except the last) a 3×3 convolution of stride 2
after one zero row and column at the bottom and right; the middle block; GroupNorm, SiLU,
conv_out to 2C channels; quant_conv → the mean and log-variance (clipped to [−30, 20]) of
the raw latent's diagonal Gaussian [B, H/8, W/8, C].

Decoder: scaled latents [B, h, w, C] (as the secant models produce them) → ÷ latent_scale
→ post_quant_conv → conv_in; the middle block; up blocks from the widest channels down,
each `layers_per_block + 1` ResNets then (except the last) nearest 2× upsampling and a 3×3
conv; GroupNorm, SiLU, conv_out → RGB [B, 8h, 8w, 3] in about [−1, 1].

The middle block is ResNet, single-head self-attention over all pixels, ResNet. ResNet
blocks are GroupNorm → SiLU → conv3×3 twice, with a 1×1 conv shortcut when the width
changes; GroupNorm ε = 1e-6 throughout. Module names follow diffusers' state dict keys.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

SD_VAE_SCALE = 0.18215  # ≈ 1 / the std of its raw latents; the secant models see latents ×this
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


class Downsample(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(self.features, (3, 3), strides=2, padding='VALID', name='conv')(x)


class Stage(nn.Module):
  """`num_resnets` ResNets, then diffusers' downsampler ('down') or upsampler ('up'), or
  none (''): an encoder's down block or a decoder's up block."""
  features: int
  num_resnets: int
  groups: int
  resample: str

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_resnets):
      x = ResnetBlock(self.features, self.groups, name=f'resnets_{j}')(x)
    if self.resample == 'down':
      x = Downsample(self.features, name='downsamplers_0')(x)
    elif self.resample == 'up':
      x = Upsample(self.features, name='upsamplers_0')(x)
    return x


class Encoder(nn.Module):
  block_out_channels: tuple
  layers_per_block: int
  norm_num_groups: int
  latent_channels: int

  @nn.compact
  def __call__(self, images):
    widths = self.block_out_channels
    x = _conv(widths[0], 3, 'conv_in')(images)
    for i, width in enumerate(widths):
      x = Stage(width, self.layers_per_block, self.norm_num_groups,
                'down' if i < len(widths) - 1 else '', name=f'down_blocks_{i}')(x)
    x = MidBlock(self.norm_num_groups, name='mid_block')(x)
    x = nn.silu(nn.GroupNorm(self.norm_num_groups, epsilon=1e-6, name='conv_norm_out')(x))
    return _conv(2 * self.latent_channels, 3, 'conv_out')(x)


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
      x = Stage(width, self.layers_per_block + 1, self.norm_num_groups,
                'up' if i < len(widths) - 1 else '', name=f'up_blocks_{i}')(x)
    x = nn.silu(nn.GroupNorm(self.norm_num_groups, epsilon=1e-6, name='conv_norm_out')(x))
    return _conv(self.out_channels, 3, 'conv_out')(x)


class VAEDecoder(nn.Module):
  """Scaled latents [B, h, w, C] → images [B, 8h, 8w, 3] (for the SD-VAE)."""
  block_out_channels: tuple = SD_VAE['block_out_channels']
  layers_per_block: int = SD_VAE['layers_per_block']
  norm_num_groups: int = SD_VAE['norm_num_groups']
  latent_channels: int = SD_VAE['latent_channels']
  out_channels: int = SD_VAE['out_channels']
  latent_scale: float = SD_VAE_SCALE

  @nn.compact
  def __call__(self, latents):
    if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f'VAEDecoder takes NHWC latents [B, h, w, {self.latent_channels}], '
                       f'got {latents.shape}.')
    z = latents.astype(jnp.float32) / self.latent_scale
    z = _conv(self.latent_channels, 1, 'post_quant_conv')(z)
    return Decoder(tuple(self.block_out_channels), self.layers_per_block,
                   self.norm_num_groups, self.out_channels, name='decoder')(z)


class VAEEncoder(nn.Module):
  """Images [B, H, W, 3] in [−1, 1] → (mean, std) of the raw latent [B, H/8, W/8, C] (for
  the SD-VAE; a sample is mean + std·ε, and × SD_VAE_SCALE makes it what the models see)."""
  block_out_channels: tuple = SD_VAE['block_out_channels']
  layers_per_block: int = SD_VAE['layers_per_block']
  norm_num_groups: int = SD_VAE['norm_num_groups']
  latent_channels: int = SD_VAE['latent_channels']

  @property
  def downsampling(self):
    """The ratio of image to latent size (8 for the SD-VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'VAEEncoder takes NHWC RGB images [B, H, W, 3], got {images.shape}.')
    moments = Encoder(tuple(self.block_out_channels), self.layers_per_block,
                      self.norm_num_groups, self.latent_channels,
                      name='encoder')(images.astype(jnp.float32))
    moments = _conv(2 * self.latent_channels, 1, 'quant_conv')(moments)
    mean, log_variance = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(log_variance, -30.0, 20.0))
