"""Network output → secant f(x, t, s) for each path; the teacher tangent is its diagonal.

SiT (Linear path): the network predicts the velocity-like secant directly, f = net(x, t, s).
EDM path (times are σ): the network is preconditioned as in EDM,

    D_θ = c_skip(σ_t)·x + c_out(σ_t)·F(c_in(σ_t)·x, c_noise(σ_t), c_noise(σ_s)),
    f = (x − D_θ) / σ_t,

with c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ¼ ln σ.
Then x_s = (σ_s/σ_t)·x_t + (1 − σ_s/σ_t)·D_θ is a DDIM step, and at s = t the secant is EDM's
ODE derivative (x − D)/σ. The preconditioning runs in float32 whatever the network's dtype.

`net_fn(x, t_cond, s_cond, y, w)` is the network's apply-function.
"""

import jax.numpy as jnp

from secant_jax import paths as paths_lib


def edm_coefficients(sigma, sigma_data):
  """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning at noise level σ."""
  sigma = jnp.asarray(sigma, jnp.float32)
  norm = sigma ** 2 + sigma_data ** 2
  return (sigma_data ** 2 / norm, sigma * sigma_data / jnp.sqrt(norm),
          1.0 / jnp.sqrt(norm), 0.25 * jnp.log(sigma))


def secant_from_network(path, net_fn, sigma_data=0.5):
  """The secant apply-function secant_fn(x, t, s, y, w) that `path` needs from `net_fn`."""
  if isinstance(path, paths_lib.Linear):
    return net_fn
  if not isinstance(path, paths_lib.EDM):
    raise TypeError(f'No preconditioning for path {path!r}; expected Linear or EDM.')

  def secant_fn(x, t, s, y, w):
    x = x.astype(jnp.float32)
    c_skip, c_out, c_in, c_noise_t = edm_coefficients(t, sigma_data)
    c_noise_s = edm_coefficients(s, sigma_data)[3]
    out = net_fn(paths_lib.expand_like(c_in, x) * x, c_noise_t, c_noise_s, y, w)
    denoised = (paths_lib.expand_like(c_skip, x) * x
                + paths_lib.expand_like(c_out, x) * out.astype(jnp.float32))
    return (x - denoised) / paths_lib.expand_like(jnp.asarray(t, jnp.float32), x)

  return secant_fn


LOSS_WEIGHTINGS = ('uniform', 'edm')


def loss_weight_fn(path, weighting, sigma_data=0.5, what='loss_weighting'):
  """The per-example loss weight as a function of path time (`secant.loss`'s weight_fn).

  'uniform': None, every example weighs 1 in the secant's own units (dx/dt, dx/dσ).
  'edm' (EDM path only): (σ² + σ_data²)/σ_data². There f = (x − D_θ)/σ and
  D_θ = c_skip·x + c_out·F, so an error ΔF of the network's output is an error
  (c_out(σ)/σ)·ΔF = σ_data/√(σ² + σ_data²)·ΔF of the secant, and this weight makes the
  loss ‖ΔF‖²: EDM's own λ(σ)·‖ΔD‖², λ = (σ² + σ_data²)/(σ·σ_data)². Uniform in f, a term
  at σ_max = 80 weighs σ_data²/(80² + σ_data²) ≈ 7e-5 (σ_data 0.66) of one near σ = 0.
  """
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f'{what} must be one of {LOSS_WEIGHTINGS}, got {weighting!r}.')
  if weighting == 'uniform':
    return None
  if not isinstance(path, paths_lib.EDM):
    raise ValueError(f"{what}='edm' weights the network output of EDM's preconditioning, "
                     f'which only the EDM path has; the path is {path!r}. Use '
                     "'uniform', or the EDM path (config.path.name='edm').")
  return lambda sigma: (jnp.square(sigma) + sigma_data ** 2) / sigma_data ** 2


def tangent_from_secant(secant_fn):
  """The tangent v(x, t, y, w) = f(x, t, t, y, w): the teacher is the secant model at s = t."""
  return lambda x, t, y, w: secant_fn(x, t, t, y, w)
