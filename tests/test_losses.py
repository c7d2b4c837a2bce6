"""Each loss computed by hand in numpy on tiny arrays, with a secant model linear in its
parameters θ = (a, b, c): f_θ(x, t, s, y, w) = a·x + b·t + c·s + 0.1·y + 0.2·w."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import paths
from secant_jax import secant
from secant_jax.models import precond

THETA = np.array([0.7, -0.3, 0.4], np.float32)
B = 3


def f_np(theta, x, t, s, y, w):
  a, b, c = theta
  return a * x + (b * t + c * s + 0.1 * y + 0.2 * w)[:, None, None]


def teacher_np(x, t, y, w):
  return 2.0 * x + (t + 0.5 * w - 0.05 * y)[:, None, None]


def make_secant_fn(theta):
  return lambda x, t, s, y, w: f_np(theta, x, t, s, y, w)


def teacher_fn(x, t, y, w):
  return teacher_np(x, t, y, w)


def mse_np(a, b):
  return ((a - b) ** 2).mean(axis=(1, 2))


def inputs(path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, 2, 3)).astype(np.float32)
  eps = rng.normal(size=(B, 2, 3)).astype(np.float32)
  unit = np.array([[0.1, 0.35, 0.2, 0.6], [0.5, 0.7, 0.55, 0.3], [0.8, 0.6, 0.7, 0.9]],
                  np.float32)
  t, s, r, tau = (np.asarray(path.time(unit[:, i])) for i in range(4))
  # r strictly between t and s, in path time.
  r = t + np.array([0.3, 0.6, 0.9], np.float32) * (s - t)
  times = secant.TimePairs(t=t, s=s, r=r, tau=tau)
  y = np.array([1.0, 4.0, 7.0], np.float32)
  w = np.array([1.5, 2.0, 1.0], np.float32)
  return x, eps, times, y, w


def at_np(path, x, eps, t):
  return np.asarray(path.at(x, eps, t))


def by_hand(variant, path, x, eps, times, y, w, stei_lambda=1.0, stei_target='teacher'):
  """(x_start, target, diffusion pieces) of the loss, written out from the paper's table."""
  t, s, r, tau = times
  bc = lambda z: z[:, None, None]
  f = lambda *a: f_np(THETA, *a)
  if variant in ('sdei', 'stei'):
    x_start = at_np(path, x, eps, t)
    x_r = x_start + bc(r - t) * f(x_start, t, r, y, w)
    if stei_target == 'self' and variant == 'stei':
      target = f(x_r, r, r, y, w)
    else:
      target = teacher_np(x_r, r, y, w)
  else:
    x_r = at_np(path, x, eps, r)
    x_start = x_r + bc(t - r) * f(x_r, r, t, y, w)
    target = teacher_np(x_r, r, y, w) if variant == 'sdee' else np.asarray(
        path.tangent(x, eps, r))
  return x_start, target


PATHS = [paths.Linear(), paths.EDM()]


@pytest.mark.parametrize('path', PATHS, ids=['linear', 'edm'])
@pytest.mark.parametrize('variant', ['sdei', 'sdee', 'stee'])
def test_loss_value_and_gradient_by_hand(variant, path):
  x, eps, times, y, w = inputs(path)
  x_start, target = by_hand(variant, path, x, eps, times, y, w)
  expected = mse_np(f_np(THETA, x_start, times.t, times.s, y, w), target)

  def total(theta):
    per_example, aux = secant.loss(variant, make_secant_fn(theta), teacher_fn, path, x, eps,
                                   times, y, w)
    return per_example.mean(), (per_example, aux)

  grads, (per_example, aux) = jax.grad(total, has_aux=True)(jnp.asarray(THETA))
  np.testing.assert_allclose(per_example, expected, rtol=2e-5)
  np.testing.assert_allclose(aux['secant'], expected, rtol=2e-5)
  np.testing.assert_array_equal(aux['diffusion'], 0.0)
  # Gradients only through f_θ(x_start, t, s): Picard estimate and target are constants.
  frozen = jax.grad(lambda th: mse_np(f_np(th, x_start, times.t, times.s, y, w),
                                      target).mean())(jnp.asarray(THETA))
  np.testing.assert_allclose(grads, frozen, rtol=2e-5)


@pytest.mark.parametrize('variant, stei_target', [('sdei', 'teacher'), ('stee', 'teacher'),
                                                  ('stei', 'self')])
def test_the_frozen_secant_makes_the_estimate_and_self_target_and_takes_no_gradient(
    variant, stei_target):
  """frozen_secant_fn = f_θ⁻ (θ under stop-gradient) changes neither value nor gradient; a
  different frozen secant (here zero) moves the estimate and the self target as by hand."""
  path = paths.Linear()
  x, eps, times, y, w = inputs(path)
  t, s, r = times.t, times.s, times.r

  def total(theta, frozen_secant_fn):
    per_example, aux = secant.loss(variant, make_secant_fn(theta), teacher_fn, path, x, eps,
                                   times, y, w, stei_target=stei_target,
                                   frozen_secant_fn=frozen_secant_fn)
    return per_example.mean(), aux['secant']

  theta = jnp.asarray(THETA)
  stopped = lambda th: make_secant_fn(jax.lax.stop_gradient(th))
  (value, _), grads = jax.value_and_grad(lambda th: total(th, stopped(th)), has_aux=True)(
      theta)
  (plain, _), plain_grads = jax.value_and_grad(lambda th: total(th, None), has_aux=True)(
      theta)
  np.testing.assert_array_equal(value, plain)
  np.testing.assert_array_equal(grads, plain_grads)
  zero = lambda x_, *_: jnp.zeros_like(x_)
  _, secant_term = total(theta, zero)
  if variant == 'stee':  # x̂_t = x_r + (t − r)·0
    x_start, target = at_np(path, x, eps, r), np.asarray(path.tangent(x, eps, r))
  else:  # x̂_r = x_t + (r − t)·0, and the self target f_θ⁻(x̂_r, r, r) = 0
    x_start = at_np(path, x, eps, t)
    target = 0.0 if variant == 'stei' else teacher_np(x_start, r, y, w)
  np.testing.assert_allclose(secant_term, mse_np(f_np(THETA, x_start, t, s, y, w), target),
                             rtol=2e-5)


@pytest.mark.parametrize('path', PATHS, ids=['linear', 'edm'])
@pytest.mark.parametrize('stei_target', ['teacher', 'self'])
@pytest.mark.parametrize('unguided_diffusion', [False, True], ids=['same-y-w', 'null-y-w1'])
def test_stei_adds_weighted_diffusion_loss(path, stei_target, unguided_diffusion):
  """With `diffusion_conditioning` (null labels, w = 1) only the diffusion term sees it."""
  x, eps, times, y, w = inputs(path)
  lam = 0.5
  x_start, target = by_hand('stei', path, x, eps, times, y, w, stei_target=stei_target)
  x_tau = at_np(path, x, eps, times.tau)
  v_tau = np.asarray(path.tangent(x, eps, times.tau))
  y_d, w_d = (np.full(B, 10.0, np.float32), np.ones(B, np.float32)) if unguided_diffusion else (
      y, w)
  secant_term = mse_np(f_np(THETA, x_start, times.t, times.s, y, w), target)
  diffusion_term = mse_np(f_np(THETA, x_tau, times.tau, times.tau, y_d, w_d), v_tau)
  teacher = teacher_fn if stei_target == 'teacher' else None
  conditioning = secant.Conditioning(y_d, w_d) if unguided_diffusion else None

  def total(theta):
    per_example, aux = secant.loss('stei', make_secant_fn(theta), teacher, path, x, eps,
                                   times, y, w, stei_lambda=lam, stei_target=stei_target,
                                   diffusion_conditioning=conditioning)
    return per_example.mean(), (per_example, aux)

  grads, (per_example, aux) = jax.grad(total, has_aux=True)(jnp.asarray(THETA))
  np.testing.assert_allclose(per_example, secant_term + lam * diffusion_term, rtol=2e-5)
  np.testing.assert_allclose(aux['secant'], secant_term, rtol=2e-5)
  np.testing.assert_allclose(aux['diffusion'], diffusion_term, rtol=2e-5)
  frozen = jax.grad(lambda th: (
      mse_np(f_np(th, x_start, times.t, times.s, y, w), target)
      + lam * mse_np(f_np(th, x_tau, times.tau, times.tau, y_d, w_d), v_tau)).mean())(
          jnp.asarray(THETA))
  np.testing.assert_allclose(grads, frozen, rtol=2e-5)


def test_diffusion_variant_is_flow_matching_at_tau():
  path = paths.Linear()
  x, eps, times, y, w = inputs(path)
  x_tau = at_np(path, x, eps, times.tau)
  expected = mse_np(f_np(THETA, x_tau, times.tau, times.tau, y, w), x - eps)
  per_example, aux = secant.loss('diffusion', make_secant_fn(THETA), None, path, x, eps,
                                 times, y, w)
  np.testing.assert_allclose(per_example, expected, rtol=2e-5)
  np.testing.assert_allclose(aux['diffusion'], expected, rtol=2e-5)


@pytest.mark.parametrize('variant', ['stei', 'stee', 'diffusion'])
def test_weight_fn_weights_each_term_at_its_start_time(variant):
  """The secant term by its t, STEI's and the diffusion variant's term by τ; aux keeps
  the unweighted terms."""
  path = paths.EDM()
  x, eps, times, y, w = inputs(path)
  weight_fn = lambda t: 1.0 + t ** 2
  plain, aux = secant.loss(variant, make_secant_fn(THETA), teacher_fn, path, x, eps, times, y,
                           w, stei_lambda=0.5)
  weighted, weighted_aux = secant.loss(variant, make_secant_fn(THETA), teacher_fn, path, x,
                                       eps, times, y, w, stei_lambda=0.5, weight_fn=weight_fn)
  expected = (weight_fn(times.t) * aux['secant']
              + (1.0 if variant == 'diffusion' else 0.5) * weight_fn(times.tau) * aux['diffusion'])
  np.testing.assert_allclose(weighted, expected, rtol=2e-6)
  assert not np.allclose(weighted, plain)
  for term in ('secant', 'diffusion'):
    np.testing.assert_array_equal(weighted_aux[term], aux[term])


def test_edm_weighting_is_the_squared_error_of_the_network_output():
  """w(σ)·‖f₁ − f₂‖² = ‖F₁ − F₂‖² for two networks' outputs F through EDM's
  preconditioning, from σ_min to σ_max: the loss EDM trains its denoiser with."""
  path, sigma_data = paths.EDM(), 0.66
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 4, 4, 2)).astype(np.float32)
  outputs = [rng.normal(size=x.shape).astype(np.float32) for _ in range(2)]
  sigma = np.array([0.002, 0.1, 1.0, 17.5, 80.0], np.float32)
  s = 0.5 * sigma
  secants = [precond.secant_from_network(path, lambda *a, out=out: jnp.asarray(out),
                                         sigma_data)(x, sigma, s, None, None)
             for out in outputs]
  weight = precond.loss_weight_fn(path, 'edm', sigma_data)(sigma)
  np.testing.assert_allclose(weight * secant.mean_squared_error(*secants),
                             secant.mean_squared_error(*outputs), rtol=1e-4)
  assert precond.loss_weight_fn(path, 'uniform', sigma_data) is None


def test_loss_is_float32_for_bf16_models():
  path = paths.Linear()
  x, eps, times, y, w = inputs(path)
  bf16_fn = lambda *a: f_np(THETA, *a).astype(jnp.bfloat16)
  per_example, _ = secant.loss('stee', bf16_fn, None, path, x, eps, times, y, w)
  assert per_example.dtype == jnp.float32


def test_exact_secant_of_a_linear_ode_has_zero_distillation_loss():
  """For v(x, t) = c (constant field) every secant is c: the loss vanishes exactly."""
  path = paths.Linear()
  x, eps, times, y, w = inputs(path)
  const = lambda x, *rest: jnp.full_like(x, 0.3)
  for variant in ('sdei', 'sdee'):
    per_example, _ = secant.loss(variant, const, lambda x, t, y, w: jnp.full_like(x, 0.3),
                                 path, x, eps, times, y, w)
    np.testing.assert_allclose(per_example, 0.0, atol=1e-12)


def test_errors_name_the_problem():
  path = paths.Linear()
  x, eps, times, y, w = inputs(path)
  fn = make_secant_fn(THETA)
  with pytest.raises(ValueError, match=r"variant 'sdei' needs teacher_fn .* got None"):
    secant.loss('sdei', fn, None, path, x, eps, times, y, w)
  with pytest.raises(ValueError, match=r"Unknown secant variant 'SDEI'"):
    secant.loss('SDEI', fn, teacher_fn, path, x, eps, times, y, w)
  with pytest.raises(ValueError, match=r"stei_target must be one of \('teacher', 'self'\)"):
    secant.loss('stei', fn, teacher_fn, path, x, eps, times, y, w, stei_target='ema')
