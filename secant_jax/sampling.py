"""Samplers: the secant N-step sampler, and the teacher's ODE solvers (Euler, Heun and an
adaptive high-accuracy reference solve used to measure integration error).

All start from the path's prior at unit time 0 and walk the path's grid to unit time 1.
"""

import diffrax
import jax
import jax.numpy as jnp

from secant_jax import guidance
from secant_jax import secant

ODE_METHODS = ('euler', 'heun', 'edm_heun')


def secant_sample(secant_fn, noise, path, num_steps, y, w, guidance_interval=(0.0, 1.0)):
  """x ← x + (t_{k+1} − t_k)·f(x, t_k, t_{k+1}), k = 0..N−1, on the path's grid.

  `w` (scalar or [B], or None for an unguided model) is passed to secant_fn at steps
  whose unit time k/N lies in `guidance_interval` = [a, b), and 1 elsewhere.
  """
  grid = path.grid(num_steps)
  batch = noise.shape[0]

  def step(x, k):
    t = jnp.full((batch,), grid[k])
    s = jnp.full((batch,), grid[k + 1])
    w_k = None if w is None else guidance.interval_scale(
        jnp.asarray(w, jnp.float32), k / num_steps, guidance_interval)
    return secant.secant_step(secant_fn, x, t, s, y, w_k), None

  x, _ = jax.lax.scan(step, path.prior(noise), jnp.arange(num_steps))
  return x


def ode_sample(tangent_fn, noise, path, num_steps, method):
  """Solves dx/dt = tangent_fn(x, t) over the path's grid with Euler (N evaluations),
  Heun's second-order method (2N: Euler predictor, trapezoidal corrector) or EDM's Heun
  (2N − 1: the last step is Euler's, so the tangent is never evaluated at the grid's end)."""
  if method not in ODE_METHODS:
    raise ValueError(f'Unknown ODE method {method!r}: expected one of {ODE_METHODS}.')
  grid = path.grid(num_steps)
  batch = noise.shape[0]

  def step(x, k):
    t = jnp.full((batch,), grid[k])
    s = jnp.full((batch,), grid[k + 1])
    h = grid[k + 1] - grid[k]
    v = tangent_fn(x, t)
    x_euler = x + h * v
    if method == 'euler':
      return x_euler, None
    heun = lambda: x + 0.5 * h * (v + tangent_fn(x_euler, s))
    if method == 'heun':
      return heun(), None
    return jax.lax.cond(k == num_steps - 1, lambda: x_euler, heun), None

  x, _ = jax.lax.scan(step, path.prior(noise), jnp.arange(num_steps))
  return x


def nfe(method, num_steps):
  """Network evaluations that `ode_sample` spends for `num_steps` steps."""
  return {'euler': num_steps, 'heun': 2 * num_steps, 'edm_heun': 2 * num_steps - 1}[method]


def solve_with_nfe(tangent_fn, noise, path, evaluations, method):
  """`ode_sample` with exactly `evaluations` tangent evaluations: Euler takes that many
  steps; Heun takes evaluations/2 steps, or (evaluations + 1)/2 steps of EDM's Heun when
  the count is odd (35 = EDM's 18 steps); one evaluation is one Euler step."""
  if method == 'euler' or evaluations == 1:
    return ode_sample(tangent_fn, noise, path, evaluations, 'euler')
  if evaluations % 2 == 0:
    return ode_sample(tangent_fn, noise, path, evaluations // 2, 'heun')
  return ode_sample(tangent_fn, noise, path, (evaluations + 1) // 2, 'edm_heun')


def reference_solve(tangent_fn, x, t0, t1, *, rtol=1e-6, atol=1e-6, max_steps=16384):
  """The ODE's solution at t1 from x at t0 by an adaptive 5th-order solver (Tsit5 with a
  PID step-size controller): the "exact" answer that integration errors are measured to."""
  batch = x.shape[0]

  def vector_field(t, y, args):
    del args
    return tangent_fn(y, jnp.full((batch,), t, dtype=y.dtype))

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=t0, t1=t1, dt0=None, y0=x,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps, saveat=diffrax.SaveAt(t1=True))
  return solution.ys[-1]


def reference_sample(tangent_fn, noise, path, **solver_options):
  """The reference solve from the prior at unit time 0 to unit time 1."""
  grid = path.grid(1)
  return reference_solve(tangent_fn, path.prior(noise), grid[0], grid[1], **solver_options)
