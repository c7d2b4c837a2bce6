"""The two interpolants (paths) between noise and data that the secant losses run on.

Both are affine in data and noise, x(t) = α(t)·x_data + σ(t)·ε, so one mechanism gives the
point at a time, the conditional tangent dx/dt = α'(t)·x_data + σ'(t)·ε, the step grid and
the prior. Times passed to a path are in the path's own time ("path time"); unit time
u ∈ [0, 1] runs from noise (u = 0) to data (u = 1) on both, and `time(u)` maps it.

| path   | path time        | α(t) | σ(t)  | time(u)                                             |
|--------|------------------|------|-------|-----------------------------------------------------|
| Linear | t ∈ [0, 1]       | t    | 1 − t | u                                                   |
| EDM    | σ ∈ [σmin, σmax] | 1    | σ     | (σmax^{1/ρ} + u(σmin^{1/ρ} − σmax^{1/ρ}))^ρ          |

The EDM path's time(u) above is Karras et al.'s ρ-schedule (`schedule='rho'`, EDM's own);
`schedule='linear'` spaces σ as the linear path spaces its time: σ = 1/τ − 1 with τ
uniform in u from 1/(1 + σmax) to 1/(1 + σmin) (x_data + σ·ε is the linear path's
x_τ = τ·x_data + (1 − τ)·ε divided by τ), so a grid of N steps meets the linear path's
k/N between the two ends.
"""

import abc
import dataclasses
from typing import ClassVar

import jax.numpy as jnp


def check_num_steps(num_steps, what='num_steps'):
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'{what} must be a positive integer, got {num_steps!r}.')


def expand_like(t, x):
  """Reshapes per-example times [B] (or a scalar) to broadcast against x [B, ...]."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class AffinePath(abc.ABC):
  """x(t) = α(t)·x_data + σ(t)·ε; subclasses define time, alpha, sigma and their slopes."""

  # Whether the teacher's Heun on this path is always EDM's sampler (Karras et al. 2022,
  # Algorithm 2, over `grid_to_data`), the sampler that users of EDM's models compare with,
  # which spends odd counts of evaluations; else N Heun steps over `grid` for 2N, and EDM's
  # form only for an odd count (sampling.solver_plan).
  heun_is_edm_sampler: ClassVar[bool] = False

  @abc.abstractmethod
  def time(self, u):
    """Unit time u ∈ [0, 1] (0 noise, 1 data) → path time."""

  @abc.abstractmethod
  def alpha(self, t):
    """Coefficient of the data, α(t)."""

  @abc.abstractmethod
  def sigma(self, t):
    """Coefficient of the noise, σ(t)."""

  @abc.abstractmethod
  def d_alpha(self, t):
    """α'(t)."""

  @abc.abstractmethod
  def d_sigma(self, t):
    """σ'(t)."""

  def at(self, x_data, noise, t):
    """The point on the path at time t: α(t)·x_data + σ(t)·ε."""
    return (expand_like(self.alpha(t), x_data) * x_data
            + expand_like(self.sigma(t), noise) * noise)

  def tangent(self, x_data, noise, t):
    """The conditional velocity dx/dt = α'(t)·x_data + σ'(t)·ε (the diffusion target)."""
    return (expand_like(self.d_alpha(t), x_data) * x_data
            + expand_like(self.d_sigma(t), noise) * noise)

  def grid(self, num_steps):
    """num_steps + 1 path times from noise to data, uniform in unit time."""
    check_num_steps(num_steps)
    return self.time(jnp.linspace(0.0, 1.0, int(num_steps) + 1))

  def grid_to_data(self, num_steps):
    """num_steps + 1 path times from noise to the path's data end: `grid`, which ends there.
    (The EDM path's grid ends at σ_min and its data at σ = 0; see `EDM.grid_to_data`.)"""
    return self.grid(num_steps)

  def prior(self, noise, t=None):
    """A sampler's starting point at path time t (default the path's start, time(0)):
    σ(t)·ε, the data term dropped."""
    return self.sigma(self.time(jnp.float32(0.0)) if t is None else t) * noise


@dataclasses.dataclass(frozen=True)
class Linear(AffinePath):
  """SiT's linear interpolant x_t = t·x_data + (1 − t)·ε; t = 0 is noise, t = 1 is data."""

  def time(self, u):
    return jnp.asarray(u, jnp.float32)

  def alpha(self, t):
    return t

  def sigma(self, t):
    return 1.0 - t

  def d_alpha(self, t):
    return jnp.ones_like(t)

  def d_sigma(self, t):
    return -jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class EDM(AffinePath):
  """EDM's variance-exploding path x = x_data + σ·ε, with time σ and Karras' ρ-schedule."""

  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  schedule: str = 'rho'
  heun_is_edm_sampler: ClassVar[bool] = True

  def __post_init__(self):
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError('EDM path needs 0 < sigma_min < sigma_max, got '
                       f'sigma_min={self.sigma_min}, sigma_max={self.sigma_max}.')
    if self.schedule not in ('rho', 'linear'):
      raise ValueError(f"Unknown σ schedule {self.schedule!r}: expected 'rho' (EDM's) or "
                       "'linear' (the linear path's times); set config.path.schedule.")

  def time(self, u):
    u = jnp.asarray(u, jnp.float32)
    if self.schedule == 'linear':  # (1 − τ)/τ, both interpolated, exact at the ends
      hi, lo = self.sigma_max, self.sigma_min
      return (((1 - u) * hi / (1 + hi) + u * lo / (1 + lo))
              / ((1 - u) / (1 + hi) + u / (1 + lo)))
    lo = self.sigma_min ** (1.0 / self.rho)
    hi = self.sigma_max ** (1.0 / self.rho)
    return (hi + u * (lo - hi)) ** self.rho

  def grid_to_data(self, num_steps):
    """EDM's discretization (Karras et al. 2022, eq. 5, with t_N = 0): the grid of
    num_steps − 1 steps from σ_max to σ_min, then σ = 0, where the data is. The tangent
    (x − D)/σ is not defined at σ = 0, so a solver's last step here is Euler's, which lands
    on D(x; σ_min)."""
    check_num_steps(num_steps)
    head = self.grid(num_steps - 1) if num_steps > 1 else self.time(jnp.zeros(1))
    return jnp.concatenate([head, jnp.zeros(1, head.dtype)])

  def alpha(self, t):
    return jnp.ones_like(t)

  def sigma(self, t):
    return t

  def d_alpha(self, t):
    return jnp.zeros_like(t)

  def d_sigma(self, t):
    return jnp.ones_like(t)
