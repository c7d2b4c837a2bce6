"""The FID Inception-v3 ('pt_inception-2015-12-05'), as torch-fidelity computes it, in NHWC.

Input: uint8 images [B, H, W, 3]. They are resized to 299×299 with TensorFlow 1's bilinear
rule (source coordinate = destination · in/out, no half-pixel offset, edge clamped),
mapped to [−1, 1] by (x − 128)/128, and run through the 2015 TensorFlow graph's network:
torchvision's Inception-v3 with TF's quirks (average pools that do not count padding, a
max pool in the last block's pool branch, BatchNorm ε = 1e-3, a 1008-way classifier).
Outputs: the 2048-d pool features (FID), the logits without the classifier bias
('logits_unbiased', Inception Score) and with it. Every convolution and matmul runs at
float32 precision (TPUs would otherwise use bf16 passes). Module and variable names
follow torch-fidelity's state dict so `convert.inception` maps it one to one.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) → BatchNorm (inference, ε = 1e-3) → ReLU."""
  features: int
  kernel_size: int | tuple = 1
  stride: int = 1
  padding: int | tuple = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x, stride, padding=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name='branch1x1')(x)
    b5 = BasicConv2d(48, name='branch5x5_1')(x)
    b5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv2d(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv2d(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, stride=2, name='branch3x3')(x)
    bd = BasicConv2d(64, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, 3, stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, name='branch1x1')(x)
    b7 = BasicConv2d(c7, name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv2d(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name='branch3x3_1')(x)
    b3 = BasicConv2d(320, 3, stride=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, 3, stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], -1)


class InceptionE(nn.Module):
  """The last two blocks; TF's graph pools the second one's pool branch with a max pool."""
  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, name='branch1x1')(x)
    b3 = BasicConv2d(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)],
                         -1)
    bd = BasicConv2d(448, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1),
                                      name='branch3x3dbl_3a')(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0),
                                      name='branch3x3dbl_3b')(bd)], -1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool_branch else _avg_pool_3x3(x)
    bp = BasicConv2d(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class Classifier(nn.Module):
  """The 1008-way layer: (features·W, features·W + b); Inception Score uses the first."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    unbiased = jnp.dot(x, kernel, precision=HIGHEST)
    return unbiased, unbiased + bias


@functools.lru_cache(maxsize=None)
def _resize_taps(in_size, out_size):
  """TF1 bilinear (align_corners=False) sample positions: (lo, hi, fraction) per output."""
  position = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = position.astype(np.int64)
  return lo, np.minimum(lo + 1, in_size - 1), position - lo.astype(np.float32)


def resize_bilinear_tf1(x, size):
  """[B, H, W, C] float → [B, size, size, C] as TensorFlow 1's resize_bilinear computes it."""
  y_lo, y_hi, dy = _resize_taps(x.shape[1], size)
  x_lo, x_hi, dx = _resize_taps(x.shape[2], size)
  rows_lo, rows_hi = x[:, y_lo], x[:, y_hi]
  dx = dx[None, None, :, None]

  def horizontal(rows):
    left, right = rows[:, :, x_lo], rows[:, :, x_hi]
    return left + (right - left) * dx

  top, bottom = horizontal(rows_lo), horizontal(rows_hi)
  return top + (bottom - top) * dy[None, :, None, None]


class InceptionV3(nn.Module):
  """uint8 [B, H, W, 3] → {'2048': [B, 2048], 'logits_unbiased': [B, 1008],
  'logits': [B, 1008]}, all float32."""

  @nn.compact
  def __call__(self, images):
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError('InceptionV3 takes uint8 RGB images [B, H, W, 3] (quantised as '
                       f'evaluation.fid.to_uint8 does), got {images.dtype} {images.shape}.')
    x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE)
    x = (x - 128.0) / 128.0
    x = BasicConv2d(32, 3, stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool_branch=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool_branch=True, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    unbiased, logits = Classifier(1008, name='fc')(pool)
    return {'2048': pool, 'logits_unbiased': unbiased, 'logits': logits}
