"""A PyTorch DiT/SiT with two times, written for parity tests: the state-dict keys and
shapes of the DiT/SiT checkpoints (x_embedder.proj, pos_embed, t_embedder.mlp.{0,2},
y_embedder.embedding_table, blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}) plus the secant
checkpoints' s_embedder and cfg_embedder. NCHW, as in PyTorch."""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def frequency_embedding(t, dim=256, max_period=10000):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_table(dim, grid):
  """DiT's table: meshgrid(w, h) puts the column index in the first half."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  w_idx, h_idx = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  return np.concatenate([one_d(dim // 2, w_idx), one_d(dim // 2, h_idx)], axis=1)


class TimestepEmbedder(nn.Module):
  def __init__(self, hidden):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

  def forward(self, t):
    return self.mlp(frequency_embedding(t))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, hidden):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, hidden)

  def forward(self, y):
    return self.embedding_table(y)


class PatchEmbed(nn.Module):
  def __init__(self, patch, in_ch, hidden):
    super().__init__()
    self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
  def __init__(self, hidden, heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden, heads)
    self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

  def forward(self, x, c):
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
  def __init__(self, hidden, patch, out_ch):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden, patch * patch * out_ch)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class SecantDiT(nn.Module):
  """two_times=False, guidance_embed=False gives the plain SiT/DiT teacher's keys."""

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, num_classes=1000, learn_sigma=True, two_times=True,
               guidance_embed=False):
    super().__init__()
    self.patch, self.in_channels = patch_size, in_channels
    self.out_channels = in_channels * 2 if learn_sigma else in_channels
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.s_embedder = TimestepEmbedder(hidden_size) if two_times else None
    self.cfg_embedder = TimestepEmbedder(hidden_size) if guidance_embed else None
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    grid = input_size // patch_size
    self.pos_embed = nn.Parameter(
        torch.from_numpy(position_table(hidden_size, grid)).float()[None], requires_grad=False)
    self.blocks = nn.ModuleList([Block(hidden_size, num_heads) for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def forward(self, x, t, s=None, y=None, w=None):
    h = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t)
    if self.s_embedder is not None:
      c = (c + self.s_embedder(s)) / 2
    c = c + self.y_embedder(y)
    if self.cfg_embedder is not None:
      c = c + self.cfg_embedder(w)
    for block in self.blocks:
      h = block(h, c)
    h = self.final_layer(h, c)
    n, p, ch = h.shape[0], self.patch, self.out_channels
    g = int(h.shape[1] ** 0.5)
    h = torch.einsum('nhwpqc->nchpwq', h.reshape(n, g, g, p, p, ch)).reshape(n, ch, g * p, g * p)
    return h[:, :self.in_channels]


def with_random_weights(seed, unit_gain=False, **kwargs):
  """SecantDiT(**kwargs) with random weights (`randomize`)."""
  return randomize(SecantDiT(**kwargs), seed, unit_gain)


def randomize(model, seed, unit_gain=False):
  """`model` (any torch module: ours, or the upstream code's) with every parameter but a
  fixed pos_embed drawn from N(0, 0.05²) (matrices) or N(0, 0.1²) (vectors), so that no
  layer starts at zero (adaLN-Zero, zero-initialised heads). `unit_gain`: matrices from
  N(0, 1/fan_in) instead, so that a deep, wide model's activations neither grow nor vanish
  from block to block (at SiT-XL/2's width 0.05 is 1.7/√fan_in)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != 'pos_embed':
        matrix_std = p[0].numel() ** -0.5 if unit_gain else 0.05
        p.normal_(0.0, matrix_std if p.ndim > 1 else 0.1)
  return model
