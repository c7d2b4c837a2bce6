"""EDM's SongUNet (DDPM++ / NCSN++) in Flax, NHWC, with two noise levels for the secant.

The structure, layer for layer, is EDM's `SongUNet` (Karras et al. 2022, after Song et al.
2021): a noise-embedding mapping network, an encoder of UNetBlocks per resolution (with
down-sampling blocks, and for NCSN++ a residual auxiliary path), a decoder with skip
concatenations, and an output head. The secant change is in the mapping network: the
positional (DDPM++) or Fourier (NCSN++) features of c_noise(σ_t) and c_noise(σ_s) are
averaged before the MLP, so with σ_s = σ_t the network is the teacher exactly and a teacher
checkpoint initialises it with no new parameters.

Module names follow the PyTorch keys after dropping EDMPrecond's 'model.' prefix:
'enc.16x16_block0.conv0.weight' ↔ enc_16x16_block0/conv0/kernel. NCSN++'s random Fourier
frequencies are a constant of the checkpoint and live in the 'buffers' collection.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SETTINGS = {
    'ddpmpp': dict(embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                   resample_filter=(1, 1)),
    'ncsnpp': dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   resample_filter=(1, 3, 3, 1)),
}


def _xavier(scale=1.0):
  """EDM's xavier_uniform init: fan_in = in·k², fan_out = out·k², weights times scale."""
  return nn.initializers.variance_scaling(scale ** 2, 'fan_avg', 'uniform')


def _resample_kernel(resample_filter, channels, up):
  """The depthwise 2-D filter f fᵀ / (Σf)² (×4 for up-sampling), HWIO with I = 1."""
  f = np.asarray(resample_filter, np.float32)
  k = np.outer(f, f) / f.sum() ** 2 * (4.0 if up else 1.0)
  return jnp.asarray(np.tile(k[:, :, None, None], (1, 1, 1, channels)))


def _depthwise(x, kernel, stride, padding, lhs_dilation=(1, 1)):
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(stride, stride), padding=padding,
      lhs_dilation=lhs_dilation, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


def downsample(x, resample_filter):
  """Depthwise filter then stride 2 (torch conv2d, padding (len f − 1)//2)."""
  pad = (len(resample_filter) - 1) // 2
  return _depthwise(x, _resample_kernel(resample_filter, x.shape[-1], False), 2,
                    [(pad, pad)] * 2)


def upsample(x, resample_filter):
  """torch's conv_transpose2d with stride 2: dilate by 2, pad k − 1 − p, flipped filter."""
  k, pad = len(resample_filter), (len(resample_filter) - 1) // 2
  kernel = _resample_kernel(resample_filter, x.shape[-1], True)[::-1, ::-1]
  return _depthwise(x, kernel, 1, [(k - 1 - pad, k - 1 - pad)] * 2, lhs_dilation=(2, 2))


class Conv2d(nn.Module):
  """EDM's Conv2d: optional up/down-sampling by a fixed filter, then a k×k convolution
  (k = 0: resampling only). `fused` down-sampling convolves first, then filters with
  stride 2, as EDM's fused_resample does (NCSN++'s residual path)."""
  out_channels: int
  kernel: int
  bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: tuple = (1, 1)
  fused: bool = False
  init_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32

  def _conv(self, x, pad):
    w = self.param('kernel', _xavier(self.init_scale),
                   (self.kernel, self.kernel, x.shape[-1], self.out_channels))
    return jax.lax.conv_general_dilated(
        x, w.astype(self.dtype), (1, 1), [(pad, pad)] * 2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    w_pad = self.kernel // 2
    if self.fused and self.down and self.kernel:
      f_pad = (len(self.resample_filter) - 1) // 2
      x = self._conv(x, w_pad + f_pad)
      x = _depthwise(x, _resample_kernel(self.resample_filter, x.shape[-1], False), 2,
                     [(0, 0)] * 2)
    else:
      if self.up:
        x = upsample(x, self.resample_filter)
      if self.down:
        x = downsample(x, self.resample_filter)
      if self.kernel:
        x = self._conv(x, w_pad)
    if self.kernel and self.bias:
      x = x + self.param('bias', nn.initializers.zeros, (self.out_channels,)).astype(x.dtype)
    return x


def group_norm(channels, eps, dtype, name):
  """EDM's GroupNorm: min(32, C // 4) groups."""
  return nn.GroupNorm(num_groups=min(32, channels // 4), epsilon=eps, dtype=dtype,
                      use_fast_variance=False, name=name)


class UNetBlock(nn.Module):
  """EDM's UNetBlock as SongUNet configures it (additive embedding, skip scale √½,
  1×1 resampling projection on the skip, single-head attention)."""
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  dropout: float = 0.0
  resample_filter: tuple = (1, 1)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train=False):
    skip_scale = np.sqrt(0.5)
    cin, cout = x.shape[-1], self.out_channels
    conv = lambda c, k, name, scale=1.0, **kw: Conv2d(
        c, k, resample_filter=self.resample_filter, init_scale=scale, dtype=self.dtype,
        name=name, **kw)
    orig = x
    x = conv(cout, 3, 'conv0', up=self.up, down=self.down)(
        nn.silu(group_norm(cin, 1e-6, self.dtype, 'norm0')(x)))
    params = nn.Dense(cout, dtype=self.dtype, name='affine',
                      kernel_init=_xavier())(emb)
    x = nn.silu(group_norm(cout, 1e-6, self.dtype, 'norm1')(x + params[:, None, None, :]))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = conv(cout, 3, 'conv1', scale=1e-5)(x)
    if cout != cin or self.up or self.down:
      orig = conv(cout, 1, 'skip', up=self.up, down=self.down)(orig)
    x = (x + orig) * skip_scale
    if self.attention:
      b, h, w, _ = x.shape
      qkv = conv(3 * cout, 1, 'qkv', scale=np.sqrt(0.2))(group_norm(cout, 1e-6, self.dtype,
                                                                   'norm2')(x))
      # PyTorch splits the 3C channels as (C, 3): q, k, v interleave per channel.
      q, k, v = jnp.moveaxis(qkv.reshape(b, h * w, 1, cout, 3), -1, 0)
      a = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32))
      x = conv(cout, 1, 'proj', scale=1e-5)(a.reshape(b, h, w, cout).astype(x.dtype)) + x
      x = x * skip_scale
    return x


def noise_features(c_noise, num_channels, embedding_type, freqs=None):
  """EDM's noise embedding with its sin/cos halves swapped, as SongUNet uses it:
  positional: [sin, cos](c·(1/10⁴)^(i/(C/2 − 1))); Fourier: [sin, cos](2π·c·φ_i)."""
  c_noise = jnp.asarray(c_noise, jnp.float32)
  if embedding_type == 'positional':
    half = num_channels // 2
    freqs = (1.0 / 10000) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
  else:
    freqs = 2 * np.pi * freqs
  args = c_noise[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class FourierFrequencies(nn.Module):
  """NCSN++'s random frequencies φ ~ N(0, 16²): a constant ('buffers'), never trained."""
  num: int

  @nn.compact
  def __call__(self):
    return self.variable('buffers', 'freqs', lambda: 16.0 * jax.random.normal(
        self.make_rng('params'), (self.num,))).value


class SongUNet(nn.Module):
  """F(x, c_noise_t, c_noise_s, class_labels, augment_labels): x [B, R, R, C] NHWC."""
  img_resolution: int = 32
  in_channels: int = 3
  out_channels: int = 3
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: tuple = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: tuple = (16,)
  dropout: float = 0.10
  embedding_type: str = 'positional'
  channel_mult_noise: int = 1
  encoder_type: str = 'standard'
  resample_filter: tuple = (1, 1)
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.embedding_type not in ('positional', 'fourier'):
      raise ValueError(f"embedding_type must be 'positional' or 'fourier', "
                       f'got {self.embedding_type!r}.')
    if self.encoder_type not in ('standard', 'residual'):
      raise ValueError(f"encoder_type must be 'standard' or 'residual', "
                       f'got {self.encoder_type!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, c_noise_t, c_noise_s=None, class_labels=None, augment_labels=None,
               train=False):
    noise_channels = self.model_channels * self.channel_mult_noise
    emb_channels = self.model_channels * self.channel_mult_emb
    dense = lambda n, name, **kw: nn.Dense(n, dtype=self.dtype, name=name,
                                          kernel_init=_xavier(), **kw)
    freqs = None
    if self.embedding_type == 'fourier':
      freqs = FourierFrequencies(noise_channels // 2, name='map_noise')()
    features = lambda c: noise_features(c, noise_channels, self.embedding_type, freqs)
    emb = features(c_noise_t)
    if c_noise_s is not None:
      emb = 0.5 * (emb + features(c_noise_s))
    if self.label_dim:
      labels = (jnp.zeros((x.shape[0], self.label_dim)) if class_labels is None
                else class_labels)
      emb = emb + dense(noise_channels, 'map_label')(labels * np.sqrt(self.label_dim))
    if self.augment_dim:
      augment = dense(noise_channels, 'map_augment', use_bias=False)
      if augment_labels is not None:
        emb = emb + augment(augment_labels)
      elif self.is_initializing():
        augment(jnp.zeros((x.shape[0], self.augment_dim)))
    emb = nn.silu(dense(emb_channels, 'map_layer0')(emb.astype(self.dtype)))
    emb = nn.silu(dense(emb_channels, 'map_layer1')(emb))

    block = lambda cout, name, **kw: UNetBlock(
        cout, dropout=self.dropout, resample_filter=self.resample_filter, dtype=self.dtype,
        name=name, **kw)
    x = x.astype(self.dtype)
    aux = x
    skips = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cout = self.model_channels
        x = Conv2d(cout, 3, dtype=self.dtype, name=f'enc_{res}x{res}_conv')(x)
      else:
        x = block(cout, f'enc_{res}x{res}_down', down=True)(x, emb, train)
        if self.encoder_type == 'residual':
          residual = Conv2d(cout, 3, down=True, fused=True, resample_filter=self.resample_filter,
                            dtype=self.dtype, name=f'enc_{res}x{res}_aux_residual')(aux)
          x = aux = (x + residual) / np.sqrt(2)
      skips.append(x)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        x = block(cout, f'enc_{res}x{res}_block{idx}', attention=res in self.attn_resolutions)(
            x, emb, train)
        skips.append(x)

    out = None
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        x = block(cout, f'dec_{res}x{res}_in0', attention=True)(x, emb, train)
        x = block(cout, f'dec_{res}x{res}_in1')(x, emb, train)
      else:
        x = block(cout, f'dec_{res}x{res}_up', up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        cout = self.model_channels * mult
        attention = idx == self.num_blocks and res in self.attn_resolutions
        x = block(cout, f'dec_{res}x{res}_block{idx}', attention=attention)(x, emb, train)
      if level == 0:
        h = group_norm(cout, 1e-6, self.dtype, f'dec_{res}x{res}_aux_norm')(x)
        out = Conv2d(self.out_channels, 3, init_scale=1e-5, dtype=self.dtype,
                     name=f'dec_{res}x{res}_aux_conv')(nn.silu(h))
    return out.astype(jnp.float32)


def from_settings(name, **kwargs):
  """'ddpmpp' or 'ncsnpp' (EDM's --arch), with overrides, e.g. EDM's CIFAR-10 model:
  from_settings('ddpmpp', model_channels=128, channel_mult=(2, 2, 2), augment_dim=9,
  dropout=0.13)."""
  if name not in SETTINGS:
    raise ValueError(f"Unknown SongUNet settings {name!r}: expected 'ddpmpp' or 'ncsnpp'.")
  return SongUNet(**{**SETTINGS[name], **kwargs})


def cifar10(arch='ddpmpp', **kwargs):
  """EDM's CIFAR-10 networks; 'ddpmpp' is edm-cifar10-32x32-uncond-vp.pkl's."""
  return from_settings(arch, **{**dict(img_resolution=32, model_channels=128,
                                       channel_mult=(2, 2, 2), augment_dim=9, dropout=0.13),
                                **kwargs})

