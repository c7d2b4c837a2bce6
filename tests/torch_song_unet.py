"""A PyTorch SongUNet (EDM's DDPM++/NCSN++) for parity tests, with EDM's module layout
and state-dict keys, wrapped like EDMPrecond (keys under 'model.'), plus the secant's
second noise level: the noise features of σ_s are averaged with those of σ_t. NCHW."""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Module):
  def __init__(self, fin, fout, bias=True):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(fout, fin) / np.sqrt(fin))
    self.bias = nn.Parameter(0.1 * torch.randn(fout)) if bias else None

  def forward(self, x):
    x = x @ self.weight.t()
    return x + self.bias if self.bias is not None else x


class Conv2d(nn.Module):
  def __init__(self, cin, cout, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
               fused_resample=False):
    super().__init__()
    self.cin, self.cout, self.up, self.down, self.fused = cin, cout, up, down, fused_resample
    fan = cin * kernel * kernel
    self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / np.sqrt(fan)) if kernel else None
    self.bias = nn.Parameter(0.1 * torch.randn(cout)) if kernel and bias else None
    f = torch.as_tensor(resample_filter, dtype=torch.float32)
    f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
    self.register_buffer('resample_filter', f if up or down else None)

  def forward(self, x):
    w, b, f = self.weight, self.bias, self.resample_filter
    w_pad = w.shape[-1] // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if self.fused and self.down and w is not None:
      x = F.conv2d(x, w, padding=w_pad + f_pad)
      x = F.conv2d(x, f.tile([self.cout, 1, 1, 1]), groups=self.cout, stride=2)
    else:
      if self.up:
        x = F.conv_transpose2d(x, f.mul(4).tile([self.cin, 1, 1, 1]), groups=self.cin, stride=2,
                               padding=f_pad)
      if self.down:
        x = F.conv2d(x, f.tile([self.cin, 1, 1, 1]), groups=self.cin, stride=2, padding=f_pad)
      if w is not None:
        x = F.conv2d(x, w, padding=w_pad)
    return x + b.reshape(1, -1, 1, 1) if b is not None else x


class GroupNorm(nn.Module):
  def __init__(self, channels, eps=1e-5):
    super().__init__()
    self.groups, self.eps = min(32, channels // 4), eps
    self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
    self.bias = nn.Parameter(0.1 * torch.randn(channels))

  def forward(self, x):
    return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class UNetBlock(nn.Module):
  def __init__(self, cin, cout, emb, up=False, down=False, attention=False, resample_filter=(1, 1)):
    super().__init__()
    self.cin, self.cout, self.attention = cin, cout, attention
    self.skip_scale = np.sqrt(0.5)
    self.norm0 = GroupNorm(cin, eps=1e-6)
    self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=resample_filter)
    self.affine = Linear(emb, cout)
    self.norm1 = GroupNorm(cout, eps=1e-6)
    self.conv1 = Conv2d(cout, cout, 3)
    self.skip = (Conv2d(cin, cout, 1, up=up, down=down, resample_filter=resample_filter)
                 if cout != cin or up or down else None)
    if attention:
      self.norm2 = GroupNorm(cout, eps=1e-6)
      self.qkv = Conv2d(cout, cout * 3, 1)
      self.proj = Conv2d(cout, cout, 1)

  def forward(self, x, emb):
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    x = F.silu(self.norm1(x + self.affine(emb).unsqueeze(2).unsqueeze(3)))
    x = self.conv1(x)
    x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
    if self.attention:
      q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0], x.shape[1], 3, -1).unbind(2)
      w = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1])).softmax(dim=2)
      a = torch.einsum('nqk,nck->ncq', w, v)
      x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
    return x


class FourierEmbedding(nn.Module):
  """Holds NCSN++'s random frequencies as the buffer 'map_noise.freqs', as EDM does."""

  def __init__(self, channels, scale=16):
    super().__init__()
    self.register_buffer('freqs', torch.randn(channels // 2) * scale)


class SongUNet(nn.Module):
  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
               model_channels=128,
               channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,),
               embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
               resample_filter=(1, 1)):
    super().__init__()
    emb_ch = model_channels * channel_mult_emb
    self.noise_ch = model_channels * channel_mult_noise
    self.embedding_type = embedding_type
    self.map_noise = FourierEmbedding(self.noise_ch) if embedding_type == 'fourier' else None
    self.map_label = Linear(label_dim, self.noise_ch) if label_dim else None
    self.map_augment = Linear(augment_dim, self.noise_ch, bias=False) if augment_dim else None
    self.map_layer0 = Linear(self.noise_ch, emb_ch)
    self.map_layer1 = Linear(emb_ch, emb_ch)
    kw = dict(emb=emb_ch, resample_filter=resample_filter)
    self.enc = nn.ModuleDict()
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels
        self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, 3)
      else:
        self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **kw)
        if encoder_type == 'residual':
          self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, 3, down=True,
                                                          resample_filter=resample_filter,
                                                          fused_resample=True)
          caux = cout
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **kw)
    skips = [b.cout for name, b in self.enc.items() if 'aux' not in name]
    self.dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **kw)
        self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **kw)
      else:
        self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **kw)
      for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), model_channels * mult
        self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(
            cin, cout, attention=idx == num_blocks and res in attn_resolutions, **kw)
      if level == 0:
        self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
        self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, 3)

  def features(self, c):
    if self.embedding_type == 'positional':
      half = self.noise_ch // 2
      freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
    else:
      freqs = 2 * np.pi * self.map_noise.freqs
    x = c.ger(freqs)
    emb = torch.cat([x.cos(), x.sin()], dim=1)
    return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)

  def forward(self, x, noise_t, noise_s, class_labels=None):
    emb = (self.features(noise_t) + self.features(noise_s)) / 2
    if self.map_label is not None:
      emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.weight.shape[1]))
    emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
    skips, aux = [], x
    for name, block in self.enc.items():
      if 'aux_residual' in name:
        x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
      else:
        x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        skips.append(x)
    tmp = None
    for name, block in self.dec.items():
      if 'aux_norm' in name:
        tmp = block(x)
      elif 'aux_conv' in name:
        return block(F.silu(tmp))
      else:
        if x.shape[1] != block.cin:
          x = torch.cat([x, skips.pop()], dim=1)
        x = block(x, emb)
    raise AssertionError('decoder has no output head')


class Precond(nn.Module):
  """EDMPrecond's layout (the U-Net under 'model.') and its secant: f = (x − D)/σ_t."""

  def __init__(self, sigma_data=0.5, **unet_kwargs):
    super().__init__()
    self.sigma_data = sigma_data
    self.model = SongUNet(**unet_kwargs)

  def forward(self, x, sigma_t, sigma_s, class_labels=None):
    sd = self.sigma_data
    st = sigma_t.reshape(-1, 1, 1, 1)
    c_skip = sd ** 2 / (st ** 2 + sd ** 2)
    c_out = st * sd / (st ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + st ** 2).sqrt()
    out = self.model(c_in * x, sigma_t.log() / 4, sigma_s.log() / 4, class_labels)
    return (x - (c_skip * x + c_out * out)) / st
