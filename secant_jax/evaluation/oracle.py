"""An analytic teacher: isotropic Gaussian-mixture data, whose probability-flow velocity is
closed form on any affine path x = α(t)·x_data + σ(t)·ε.

For component k (mean μ_k, std s_k, weight π_k), x | k ~ N(α μ_k, (α² s_k² + σ²) I), and

    E[x_data | x, k] = μ_k + α s_k² / (α² s_k² + σ²) · (x − α μ_k),
    E[ε | x, k]      =       σ     / (α² s_k² + σ²) · (x − α μ_k),
    v(x, t) = Σ_k p(k | x) · (α'·E[x_data | x, k] + σ'·E[ε | x, k]),

with p(k | x) ∝ π_k N(x; α μ_k, (α² s_k² + σ²) I); given x and k, x_data is Gaussian
around that mean with variance s_k² σ² / (α² s_k² + σ²), so the posterior can be sampled
too. The exact flow map comes from the adaptive reference solver on this velocity.
"""

import jax
import jax.numpy as jnp

from secant_jax import sampling


class GaussianMixture:
  """Mixture of isotropic Gaussians in D dimensions: means [K, D], stds [K], weights [K]."""

  def __init__(self, means, stds, weights):
    self.means = jnp.asarray(means, jnp.float32)
    self.stds = jnp.asarray(stds, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if self.means.ndim != 2:
      raise ValueError(f'means must be [K, D], got shape {self.means.shape}.')
    num = self.means.shape[0]
    if self.stds.shape != (num,) or weights.shape != (num,):
      raise ValueError(f'stds and weights must be [K] = [{num}], got {self.stds.shape} '
                       f'and {weights.shape}.')
    if bool(jnp.any(self.stds <= 0)) or bool(jnp.any(weights < 0)):
      raise ValueError('stds must be positive and weights non-negative.')
    self.weights = weights / jnp.sum(weights)

  @property
  def dim(self):
    return self.means.shape[1]

  def sample(self, key, n):
    """n draws [n, D] from the mixture."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
    eps = jax.random.normal(k_noise, (n, self.dim))
    return self.means[comp] + self.stds[comp, None] * eps

  def _posterior(self, x, t, path):
    """Per component k, at x [B, D] and path times t [B]: log p(k | x) + const [B, K],
    E[x_data | x, k] and E[ε | x, k] [B, K, D], and the std of x_data | x, k [B, K]."""
    alpha, sigma = path.alpha(t)[:, None], path.sigma(t)[:, None]
    var = alpha ** 2 * self.stds[None, :] ** 2 + sigma ** 2  # [B, K]
    centered = x[:, None, :] - alpha[:, :, None] * self.means[None]  # [B, K, D]
    log_p = (jnp.log(self.weights)[None] - 0.5 * self.dim * jnp.log(var)
             - 0.5 * jnp.sum(centered ** 2, axis=-1) / var)
    mean_data = self.means[None] + (alpha * self.stds[None] ** 2 / var)[..., None] * centered
    mean_noise = (sigma / var)[..., None] * centered
    std_data = self.stds[None] * sigma / jnp.sqrt(var)
    return log_p, mean_data, mean_noise, std_data

  def velocity(self, x, t, path):
    """The probability-flow velocity dx/dt at x [B, D], path times t [B]."""
    log_p, mean_data, mean_noise, _ = self._posterior(x, t, path)
    d_alpha, d_sigma = path.d_alpha(t)[:, None], path.d_sigma(t)[:, None]
    v_k = d_alpha[..., None] * mean_data + d_sigma[..., None] * mean_noise
    return jnp.einsum('bk,bkd->bd', jax.nn.softmax(log_p, axis=-1), v_k)

  def posterior_sample(self, key, x, t, path):
    """One draw of (x_data, ε) given x = α(t)·x_data + σ(t)·ε, per row of x [B, D] (σ(t) > 0):
    a component k ~ p(k | x), x_data ~ N(E[x_data | x, k], s_k²σ²/(α²s_k² + σ²)·I), and
    ε = (x − α·x_data)/σ. Averages of any f(x_data, ε) over these draws are E[f | x]."""
    log_p, mean_data, _, std_data = self._posterior(x, t, path)
    k_comp, k_data = jax.random.split(key)
    comp = jax.random.categorical(k_comp, log_p)[:, None]  # [B, 1]
    mean = jnp.take_along_axis(mean_data, comp[..., None], axis=1)[:, 0]
    std = jnp.take_along_axis(std_data, comp, axis=1)
    x_data = mean + std * jax.random.normal(k_data, x.shape)
    alpha, sigma = path.alpha(t)[:, None], path.sigma(t)[:, None]
    return x_data, (x - alpha * x_data) / sigma

  def flow(self, x, t, s, path, **solver_options):
    """The exact flow map x_t ↦ x_s (scalar times t, s) by the adaptive reference solver."""
    return sampling.reference_solve(lambda z, r: self.velocity(z, r, path), x, t, s,
                                    **solver_options)
