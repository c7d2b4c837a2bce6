"""The exact secant of an analytic flow is the fixed point of every variant's loss.

For the Gaussian-mixture oracle the secant is known exactly, f*(x, t, s) = (Φ_{t→s}(x) − x)
/ (s − t) with Φ the flow map. Fed f* (Picard estimates then exact), each variant's target
must average, over r uniform between t and s in path time, to f* itself:

    sdei, stei  E_r[v(Φ_{t→r}(x_t), r)]                                    = f*(x_t, t, s)
    sdee        E_r[v(x_r, r)],  x_r = Φ_{t→r}(x_t)                        = f*(x_t, t, s)
    stee        E_r[α'(r)·x_data + σ'(r)·ε],  (x_data, ε) ~ p(· | x_r)      = f*(x_t, t, s)

The residual f* − target is read off the gradient of the loss's secant term (so the
stop-gradients are part of what is checked) and must vanish within Monte-Carlo error, while
drawing r uniformly in unit time instead, on the EDM path, leaves a bias many errors wide.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import paths
from secant_jax import secant
from secant_jax.evaluation import oracle

B = 4096
MIXTURE = oracle.GaussianMixture([[1.0, 0.2], [-0.8, 0.6], [0.1, -1.0]],
                                 [0.15, 0.25, 0.1], [0.3, 0.4, 0.3])


def exact_flow(path, x, t, s):
  """Φ_{t→s}(x) per example (x [B, D], times [B])."""
  return jax.vmap(lambda x1, t1, s1: MIXTURE.flow(x1[None], t1, s1, path)[0])(x, t, s)


def exact_secant(path, x, t, s):
  """f*(x, t, s) per example (times [B]); the velocity where s = t."""
  same = t == s
  s_safe = jnp.where(same, t + 1e-3, s)
  quotient = (exact_flow(path, x, t, s_safe) - x) / (s_safe - t)[:, None]
  return jnp.where(same[:, None], MIXTURE.velocity(x, t, path), quotient)


def noiseless_inputs(path, x, t):
  """(x_data, ε = 0) that put the path at x at time t."""
  return x / path.alpha(t)[:, None], jnp.zeros_like(x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def residuals(variant, path, x_t, t0, s0, r, key):
  """Per-example f*(x_start, t, s) − target [B, D], from the gradient of the secant term."""
  t, s = jnp.full((B,), t0), jnp.full((B,), s0)
  x_t = jnp.broadcast_to(x_t, (B, MIXTURE.dim))
  if variant in ('sdei', 'stei'):
    x_data, noise = noiseless_inputs(path, x_t, t)
  else:
    x_r = exact_flow(path, x_t, t, r)
    if variant == 'sdee':
      x_data, noise = noiseless_inputs(path, x_r, r)
    else:
      x_data, noise = MIXTURE.posterior_sample(key, x_r, r, path)
  times = secant.TimePairs(t=t, s=s, r=r, tau=r)
  teacher = lambda x, tt, y, w: MIXTURE.velocity(x, tt, path)
  stei_target = 'self' if variant == 'stei' else 'teacher'

  def secant_term(delta):
    fn = lambda x, tt, ss, y, w: exact_secant(path, x, tt, ss) + delta
    _, aux = secant.loss(variant, fn, teacher, path, x_data, noise, times, None, None,
                         stei_target=stei_target)
    return jnp.sum(aux['secant'])

  return jax.grad(secant_term)(jnp.zeros((B, MIXTURE.dim))) * MIXTURE.dim / 2


def residuals_at(variant, path, u_t, u_s, r_uniform_in='path'):
  """Residuals for one point x_t (a draw from the path at t) and B draws of r uniform
  between t = time(u_t) and s = time(u_s), in path time (the method) or in unit time (the
  control)."""
  key_data, key_noise, key_r, key_post = jax.random.split(jax.random.key(0), 4)
  t0, s0 = path.time(u_t), path.time(u_s)
  v = jax.random.uniform(key_r, (B,))
  if r_uniform_in == 'path':
    r = t0 + v * (s0 - t0)
  else:
    r = path.time(u_t + v * (u_s - u_t))
  x_t = path.at(MIXTURE.sample(key_data, 1), jax.random.normal(key_noise, (1, MIXTURE.dim)),
                t0)
  return np.asarray(residuals(variant, path, x_t, t0, s0, r, key_post))


def bias_in_standard_errors(res):
  """|mean residual| per dimension over its Monte-Carlo standard error."""
  return np.abs(res.mean(0)) / (res.std(0) / np.sqrt(len(res)))


PATHS = {'linear': (paths.Linear(), 0.2, 0.7), 'edm': (paths.EDM(), 0.45, 0.8)}
CASES = ([pytest.param(variant, name, False, id=f'{variant}-{name}')
          for variant in ('sdei', 'stei', 'sdee', 'stee') for name in PATHS]
         + [pytest.param(variant, name, True, id=f'{variant}-{name}-backward')
            for variant in ('sdee', 'stee') for name in PATHS])


@pytest.mark.parametrize('variant,name,backward', CASES)
def test_targets_average_to_the_exact_secant(variant, name, backward):
  """Forward steps for all four variants; backward (s < t) for the endpoint variants, which
  train both directions (the interior variants only step forward)."""
  path, u_t, u_s = PATHS[name]
  if backward:
    u_t, u_s = u_s, u_t
  res = residuals_at(variant, path, u_t, u_s)
  # The target is not constant along the way (the flow is curved here) ...
  assert np.all(res.std(0) > 0.05)
  # ... yet its mean over r is the secant.
  assert np.all(bias_in_standard_errors(res) < 4.0), bias_in_standard_errors(res)


def test_r_uniform_in_unit_time_would_bias_the_edm_target():
  """The control: on the σ-path the secant averages dx/dσ over σ, so drawing r uniformly
  in unit time (weighting by dσ/du) moves the target's mean away from f*."""
  res = residuals_at('sdei', paths.EDM(), 0.45, 0.8, r_uniform_in='unit')
  assert np.max(bias_in_standard_errors(res)) > 20.0, bias_in_standard_errors(res)
