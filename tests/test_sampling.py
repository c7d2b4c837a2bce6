import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import paths
from secant_jax import sampling
from secant_jax.evaluation import oracle


def _mixture():
  return oracle.GaussianMixture([[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3], [0.3, 0.7])


def _exact_secant(mixture, path):
  """f(x, t, s) = (Φ_{t→s}(x) − x) / (s − t) for times shared by the batch."""
  def secant_fn(x, t, s, y, w):
    return (mixture.flow(x, t[0], s[0], path) - x) / (s[0] - t[0])
  return secant_fn


@pytest.mark.parametrize('path', [paths.Linear(), paths.EDM()], ids=['linear', 'edm'])
def test_exact_secant_sampler_reaches_the_reference_in_any_number_of_steps(path):
  mixture = _mixture()
  noise = jax.random.normal(jax.random.key(0), (64, 2))
  reference = sampling.reference_sample(lambda x, t: mixture.velocity(x, t, path), noise, path)
  for n in (1, 3):
    x = sampling.secant_sample(_exact_secant(mixture, path), noise, path, n, None, None)
    np.testing.assert_allclose(x, reference, atol=2e-4)


def _median_error(method, n, mixture, path, noise, reference):
  """Median per-sample distance: a sample on a mode boundary would dominate a mean."""
  x = sampling.ode_sample(lambda x, t: mixture.velocity(x, t, path), noise, path, n, method)
  return float(jnp.median(jnp.linalg.norm(x - reference, axis=-1)))


def test_euler_is_first_order_and_heun_second_order():
  mixture, path = _mixture(), paths.Linear()
  noise = jax.random.normal(jax.random.key(1), (256, 2))
  reference = sampling.reference_sample(lambda x, t: mixture.velocity(x, t, path), noise, path,
                                        rtol=1e-7, atol=1e-7)
  euler = [_median_error('euler', n, mixture, path, noise, reference) for n in (32, 64)]
  heun = [_median_error('heun', n, mixture, path, noise, reference) for n in (16, 32)]
  assert 1.7 < euler[0] / euler[1] < 2.3, euler
  assert 3.2 < heun[0] / heun[1] < 4.8, heun
  assert sampling.nfe('heun', 16) == 32 and sampling.nfe('euler', 32) == 32


def test_edm_heun_takes_its_last_step_with_euler_and_spends_odd_evaluations():
  """dx/dt = t: trapezoid steps are exact, an Euler step from t to t + h misses h²/2."""
  path, noise = paths.Linear(), jnp.zeros((2, 1))
  tangent = lambda x, t: jnp.broadcast_to(t[:, None], x.shape)
  heun = sampling.ode_sample(tangent, noise, path, 4, 'heun')
  edm = sampling.ode_sample(tangent, noise, path, 4, 'edm_heun')
  np.testing.assert_allclose(heun, 0.5, atol=1e-6)
  np.testing.assert_allclose(edm, 0.5 - 0.25 ** 2 / 2, atol=1e-6)
  assert sampling.nfe('edm_heun', 18) == 35
  assert [sampling.spent_evaluations(path, 'heun', n) for n in (1, 4, 7)] == [1, 4, 7]
  np.testing.assert_array_equal(sampling.solve_with_nfe(tangent, noise, path, 7, 'heun'), edm)
  np.testing.assert_array_equal(sampling.solve_with_nfe(tangent, noise, path, 8, 'heun'), heun)
  np.testing.assert_array_equal(sampling.solve_with_nfe(tangent, noise, path, 1, 'heun'),
                                sampling.ode_sample(tangent, noise, path, 1, 'euler'))


def _edm_algorithm_2(mixture, noise, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """Karras et al. (2022), Algorithm 2 with S_churn = 0, as EDM's generate.py runs it: in
  float64, on the mixture's exact denoiser E[x_data | x] (written out again in numpy)."""
  means, stds, weights = (np.asarray(a, np.float64)
                          for a in (mixture.means, mixture.stds, mixture.weights))

  def denoise(x, sigma):
    var = stds ** 2 + sigma ** 2
    centered = x[:, None, :] - means[None]
    log_p = np.log(weights) - 0.5 * x.shape[1] * np.log(var) - 0.5 * np.sum(
        centered ** 2, axis=-1) / var
    p = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum('bk,bkd->bd', p, means[None] + (stds ** 2 / var)[None, :, None] * centered)

  i = np.arange(num_steps)
  t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho)
                                                            - sigma_max ** (1 / rho))) ** rho
  t = np.append(t, 0.0)
  x = np.asarray(noise, np.float64) * t[0]
  for k in range(num_steps):
    d = (x - denoise(x, t[k])) / t[k]
    x_next = x + (t[k + 1] - t[k]) * d
    if k < num_steps - 1:
      d_next = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
      x_next = x + (t[k + 1] - t[k]) * 0.5 * (d + d_next)
    x = x_next
  return x


@pytest.mark.parametrize('evaluations,num_steps,spent', [(35, 18, 35), (7, 4, 7), (4, 2, 3),
                                                         (2, 1, 1)])
def test_heun_on_the_edm_path_is_edms_sampler(evaluations, num_steps, spent):
  """35 evaluations are EDM's 18 steps: 17 Heun steps from σ_max to σ_min on its ρ-grid,
  then one Euler step to σ = 0; an even count runs the sampler that spends one fewer. In
  float64 as EDM runs it (in float32 a few steps this large differ by up to 5e-3 where the
  mixture's posterior turns; the grid's times are float32 either way)."""
  mixture, path = _mixture(), paths.EDM()
  noise = jax.random.normal(jax.random.key(2), (64, 2))
  with jax.enable_x64(True):
    x = sampling.solve_with_nfe(lambda x, t: mixture.velocity(x, t, path),
                                noise.astype(jnp.float64), path, evaluations, 'heun')
  assert sampling.spent_evaluations(path, 'heun', evaluations) == spent
  assert sampling.spent_evaluations(path, 'euler', evaluations) == evaluations
  expected = _edm_algorithm_2(mixture, noise, num_steps)
  np.testing.assert_allclose(x, expected, rtol=0, atol=1e-4)


def test_reference_solve_of_exponential_decay():
  x0 = jnp.array([[1.0, -2.0]])
  x1 = sampling.reference_solve(lambda x, t: -x, x0, 0.0, 1.0)
  np.testing.assert_allclose(x1, x0 * np.exp(-1.0), rtol=1e-5)


def test_guidance_interval_sets_scale_one_outside():
  # f = w everywhere: on the linear grid x_N = x_0 + Σ_k (1/N)·w_k.
  secant_fn = lambda x, t, s, y, w: jnp.broadcast_to(w[:, None], x.shape)
  noise = jnp.zeros((2, 1))
  w = jnp.array([3.0, 5.0])
  x = sampling.secant_sample(secant_fn, noise, paths.Linear(), 4, None, w,
                             guidance_interval=(0.25, 0.75))
  np.testing.assert_allclose(x[:, 0], 0.25 * (1 + 2 * w + 1), rtol=1e-6)


def test_unknown_ode_method_is_named():
  with pytest.raises(ValueError, match=r"Unknown ODE method 'rk4'.*'euler', 'heun'"):
    sampling.ode_sample(lambda x, t: x, jnp.zeros((1, 2)), paths.Linear(), 2, 'rk4')
