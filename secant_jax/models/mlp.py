"""A small MLP secant network for low-dimensional data (the oracle tests and benchmark)."""

import flax.linen as nn
import jax.numpy as jnp


def fourier_features(t, num_frequencies, max_frequency):
  """[sin, cos](2π·φ_i·t) for frequencies φ_i geometric in [1, max_frequency]: [B] → [B, 2F]."""
  freqs = jnp.exp(jnp.linspace(0.0, jnp.log(max_frequency), num_frequencies))
  angles = 2.0 * jnp.pi * t[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class SecantMLP(nn.Module):
  """F(x, t, s): x [B, D] with the Fourier features of both times, through SiLU layers."""

  out_dim: int
  width: int = 256
  depth: int = 3
  num_frequencies: int = 16
  max_frequency: float = 32.0

  @nn.compact
  def __call__(self, x, t, s):
    h = jnp.concatenate([
        x,
        fourier_features(t, self.num_frequencies, self.max_frequency),
        fourier_features(s, self.num_frequencies, self.max_frequency),
    ], axis=-1)
    for _ in range(self.depth):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(self.out_dim)(h)
