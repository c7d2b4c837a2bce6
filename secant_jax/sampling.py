"""Samplers: the secant N-step sampler, and the teacher's ODE solvers (Euler, Heun and an
adaptive high-accuracy reference solve used to measure integration error).

All start from the path's prior at their grid's first time (the path's start, unit time 0,
unless a secant model's own path starts elsewhere) and walk their grid to the data end.
"""

import dataclasses
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from secant_jax import guidance
from secant_jax import secant

ODE_METHODS = ('euler', 'heun', 'edm_heun')


@dataclasses.dataclass(frozen=True)
class Steps:
  """A fixed-grid sampler as its steps: x_{k+1} = step(x_k, k) takes the sample from
  grid[k] to grid[k + 1], k = 0..N−1, starting from the path's prior at grid[0]
  (`run_steps`), σ(grid[0])·ε. Step by step, it is what evaluation.step_errors takes apart."""
  grid: jax.Array  # [N + 1] path times
  step: Callable  # (x [B, ...], k) → x at grid[k + 1]

  @property
  def num_steps(self):
    return self.grid.shape[0] - 1


def run_steps(steps, noise, path):
  """The sample of `steps` (a Steps) from `noise`, started at the steps' first grid time."""
  start = path.prior(noise, steps.grid[0])
  x, _ = jax.lax.scan(lambda x, k: (steps.step(x, k), None), start, jnp.arange(steps.num_steps))
  return x


def secant_steps(secant_fn, path, num_steps, y, w, guidance_interval=(0.0, 1.0)):
  """The secant N-step sampler's Steps: x ← x + (t_{k+1} − t_k)·f(x, t_k, t_{k+1}) on the
  path's grid.

  `w` (scalar or [B], or None for an unguided model) is passed to secant_fn at steps
  whose unit time k/N lies in `guidance_interval` = [a, b), and 1 elsewhere.
  """
  grid = path.grid(num_steps)

  def step(x, k):
    batch = x.shape[0]
    t = jnp.full((batch,), grid[k])
    s = jnp.full((batch,), grid[k + 1])
    w_k = None if w is None else guidance.interval_scale(
        jnp.asarray(w, jnp.float32), k / num_steps, guidance_interval)
    return secant.secant_step(secant_fn, x, t, s, y, w_k)

  return Steps(grid, step)


def secant_sample(secant_fn, noise, path, num_steps, y, w, guidance_interval=(0.0, 1.0)):
  """The secant N-step sampler's sample from `noise` (`secant_steps`)."""
  return run_steps(secant_steps(secant_fn, path, num_steps, y, w, guidance_interval), noise,
                   path)


def ode_steps(tangent_fn, path, num_steps, method):
  """Steps of a solver of dx/dt = tangent_fn(x, t) over the path's grid: Euler (N
  evaluations), Heun's second-order method (2N: Euler predictor, trapezoidal corrector), or
  EDM's sampler (Karras et al. 2022, Algorithm 2 without churn; 2N − 1): Heun over
  `path.grid_to_data`, whose last step is Euler's, so the tangent is never evaluated at
  the data end. On the EDM path that ends at σ = 0 (the grid of N − 1 steps to σ_min, then
  D(x; σ_min)), as EDM's own sampler does; on the linear path at t = 1, after N steps."""
  if method not in ODE_METHODS:
    raise ValueError(f'Unknown ODE method {method!r}: expected one of {ODE_METHODS}.')
  grid = path.grid_to_data(num_steps) if method == 'edm_heun' else path.grid(num_steps)

  def step(x, k):
    batch = x.shape[0]
    t = jnp.full((batch,), grid[k])
    s = jnp.full((batch,), grid[k + 1])
    h = grid[k + 1] - grid[k]
    v = tangent_fn(x, t)
    x_euler = x + h * v
    if method == 'euler':
      return x_euler
    heun = lambda: x + 0.5 * h * (v + tangent_fn(x_euler, s))
    if method == 'heun':
      return heun()
    return jax.lax.cond(k == num_steps - 1, lambda: x_euler, heun)

  return Steps(grid, step)


def ode_sample(tangent_fn, noise, path, num_steps, method):
  """The solver's sample from `noise` (`ode_steps`)."""
  return run_steps(ode_steps(tangent_fn, path, num_steps, method), noise, path)


def nfe(method, num_steps):
  """Network evaluations that `ode_sample` spends for `num_steps` steps."""
  return {'euler': num_steps, 'heun': 2 * num_steps, 'edm_heun': 2 * num_steps - 1}[method]


def solver_plan(path, method, evaluations):
  """(ode_sample method, steps) for a solver given `evaluations`: Euler takes that many
  steps; one evaluation is one Euler step. Heun takes evaluations/2 steps when the count is
  even, unless the path's Heun is EDM's sampler (`path.heun_is_edm_sampler`), and EDM's
  sampler otherwise: (evaluations + 1)/2 steps for 2·steps − 1 evaluations, so on the EDM
  path an even count spends one fewer (4 → EDM's 2 steps, 3 evaluations), and 35 is EDM's
  18 steps."""
  if method == 'euler' or evaluations == 1:
    return 'euler', evaluations
  if evaluations % 2 == 0 and not path.heun_is_edm_sampler:
    return 'heun', evaluations // 2
  return 'edm_heun', (evaluations + 1) // 2


def spent_evaluations(path, method, evaluations):
  """The evaluations `solve_with_nfe` spends when given `evaluations` (see `solver_plan`)."""
  return nfe(*solver_plan(path, method, evaluations))


def steps_with_nfe(tangent_fn, path, evaluations, method):
  """`ode_steps` with `evaluations` tangent evaluations, spent as `solver_plan` says."""
  ode_method, num_steps = solver_plan(path, method, evaluations)
  return ode_steps(tangent_fn, path, num_steps, ode_method)


def solve_with_nfe(tangent_fn, noise, path, evaluations, method):
  """The sample of `steps_with_nfe` from `noise`."""
  return run_steps(steps_with_nfe(tangent_fn, path, evaluations, method), noise, path)


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
