import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import paths
from secant_jax.evaluation import oracle
from secant_jax.models import precond

PATHS = [paths.Linear(), paths.EDM()]


def _mixture():
  return oracle.GaussianMixture([[1.0, 0.0, 0.5], [-1.0, 0.5, 0.0], [0.0, -1.0, 1.0]],
                                [0.2, 0.3, 0.5], [0.2, 0.5, 0.3])


def _log_density(mixture, x, t, path):
  """log p_t(x) of one point x [D] at scalar time t, written directly."""
  a, s = path.alpha(t), path.sigma(t)
  var = a ** 2 * mixture.stds ** 2 + s ** 2
  d = mixture.dim
  sq = jnp.sum((x[None] - a * mixture.means) ** 2, axis=-1)
  return jax.scipy.special.logsumexp(
      jnp.log(mixture.weights) - 0.5 * d * jnp.log(2 * jnp.pi * var) - 0.5 * sq / var)


@pytest.mark.parametrize('path', PATHS, ids=['linear', 'edm'])
def test_velocity_matches_tweedie_from_the_score(path):
  """E[ε | x] = −σ ∇log p_t(x), E[x_data | x] = (x − σ E[ε | x]) / α, v = α'E[x_data] + σ'E[ε]."""
  mixture = _mixture()
  x = jax.random.normal(jax.random.key(0), (16, 3))
  for u in (0.1, 0.5, 0.9):
    t = path.time(u)
    score = jax.vmap(jax.grad(lambda z: _log_density(mixture, z, t, path)))(x)
    e_noise = -path.sigma(t) * score
    e_data = (x - path.sigma(t) * e_noise) / path.alpha(t)
    expected = path.d_alpha(t) * e_data + path.d_sigma(t) * e_noise
    got = mixture.velocity(x, jnp.full((16,), t), path)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def test_flow_of_one_gaussian_is_the_affine_map():
  """Single N(μ, s²I) on the linear path: x_s = sμ + √(var_s/var_t)(x_t − tμ)."""
  mu, std = np.array([1.0, -2.0]), 0.5
  mixture = oracle.GaussianMixture([mu], [std], [1.0])
  path = paths.Linear()
  x = jax.random.normal(jax.random.key(0), (8, 2))
  t, s = 0.2, 0.9
  var = lambda u: u ** 2 * std ** 2 + (1 - u) ** 2
  expected = s * mu + np.sqrt(var(s) / var(t)) * (np.asarray(x) - t * mu)
  np.testing.assert_allclose(mixture.flow(x, t, s, path), expected, rtol=1e-4, atol=1e-4)


def test_samples_have_the_mixture_moments():
  mixture = _mixture()
  x = np.asarray(mixture.sample(jax.random.key(0), 200000))
  mean = np.asarray(mixture.weights @ mixture.means)
  np.testing.assert_allclose(x.mean(0), mean, atol=0.01)


@pytest.mark.parametrize('path', PATHS, ids=['linear', 'edm'])
def test_posterior_draws_are_consistent_with_the_joint(path):
  """(x_data, ε) ~ p(· | x) puts the path back at x, averages to the velocity at x, and, with
  x drawn from the joint, has the joint's moments (which a wrong posterior spread breaks)."""
  mixture = _mixture()
  k_data, k_noise, k_post, k_one = jax.random.split(jax.random.key(1), 4)
  n = 200000
  t = jnp.full((n,), path.time(0.6))
  x_data = mixture.sample(k_data, n)
  noise = jax.random.normal(k_noise, x_data.shape)
  x = path.at(x_data, noise, t)
  post_data, post_noise = mixture.posterior_sample(k_post, x, t, path)
  np.testing.assert_allclose(path.at(post_data, post_noise, t), x, atol=1e-4)
  for a, b in ((post_data, x_data), (post_noise, noise)):
    np.testing.assert_allclose(jnp.mean(a, 0), jnp.mean(b, 0), atol=0.01)
    np.testing.assert_allclose(jnp.mean(a ** 2, 0), jnp.mean(b ** 2, 0), rtol=0.02)
    np.testing.assert_allclose(jnp.mean(a * x, 0), jnp.mean(b * x, 0), rtol=0.02, atol=0.01)
  # One x, many draws: the conditional tangent averages to the velocity.
  x1 = jnp.broadcast_to(x[:1], (n, mixture.dim))
  d, e = mixture.posterior_sample(k_one, x1, t, path)
  np.testing.assert_allclose(jnp.mean(path.tangent(d, e, t), 0),
                             mixture.velocity(x[:1], t[:1], path)[0], atol=0.01)


def test_bad_mixture_is_named():
  with pytest.raises(ValueError, match=r'stds and weights must be \[K\] = \[2\]'):
    oracle.GaussianMixture([[0.0], [1.0]], [1.0], [1.0, 1.0])


def test_edm_preconditioned_secant_at_s_equals_t_is_the_ode_derivative():
  """Feed the preconditioning the exact network F = (D − c_skip·x)/c_out of the oracle's
  denoiser D: then f(x, σ, σ) = (x − D)/σ is the mixture's exact velocity."""
  mixture, path, sigma_data = _mixture(), paths.EDM(), 0.5
  sigma_of_c_noise = lambda c: jnp.exp(4.0 * c)

  def exact_net(x_in, c_noise_t, c_noise_s, y, w):
    sigma = sigma_of_c_noise(c_noise_t)
    c_skip, c_out, c_in, _ = precond.edm_coefficients(sigma, sigma_data)
    x = x_in / c_in[:, None]
    denoised = x - sigma[:, None] * mixture.velocity(x, sigma, path)
    return (denoised - c_skip[:, None] * x) / c_out[:, None]

  secant_fn = precond.secant_from_network(path, exact_net, sigma_data)
  tangent_fn = precond.tangent_from_secant(secant_fn)
  x = 3.0 * jax.random.normal(jax.random.key(0), (16, 3))
  sigma = jnp.geomspace(0.01, 60.0, 16)
  np.testing.assert_allclose(tangent_fn(x, sigma, None, None),
                             mixture.velocity(x, sigma, path), rtol=2e-3, atol=2e-4)


def test_edm_secant_step_is_a_ddim_step():
  """x_s = x_t + (σ_s − σ_t)(x_t − D)/σ_t = (σ_s/σ_t)·x_t + (1 − σ_s/σ_t)·D."""
  from secant_jax import secant
  sigma_data = 0.5
  net = lambda x, ct, cs, y, w: jnp.tanh(x) + ct[:, None] - 0.3 * cs[:, None]
  secant_fn = precond.secant_from_network(paths.EDM(), net, sigma_data)
  x = jax.random.normal(jax.random.key(1), (4, 3)) * 5
  t, s = jnp.array([10.0, 5.0, 1.0, 0.5]), jnp.array([2.0, 0.1, 0.9, 0.01])
  c_skip, c_out, c_in, c_t = precond.edm_coefficients(t, sigma_data)
  c_s = precond.edm_coefficients(s, sigma_data)[3]
  denoised = c_skip[:, None] * x + c_out[:, None] * net(c_in[:, None] * x, c_t, c_s, None, None)
  ratio = (s / t)[:, None]
  np.testing.assert_allclose(secant.secant_step(secant_fn, x, t, s, None, None),
                             ratio * x + (1 - ratio) * denoised, rtol=1e-5, atol=1e-5)


def test_linear_secant_is_the_network_and_unknown_paths_are_refused():
  net = lambda x, t, s, y, w: x
  assert precond.secant_from_network(paths.Linear(), net) is net
  with pytest.raises(TypeError, match='No preconditioning for path'):
    precond.secant_from_network(object(), net)
