import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import paths


def test_linear_at_and_tangent_match_sit_convention():
  path = paths.Linear()
  x, eps = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]])
  t = jnp.array([0.25])
  np.testing.assert_allclose(path.at(x, eps, t), [[0.25 * 2 + 0.75 * 0.5, -0.25 + 0.75 * 3]])
  np.testing.assert_allclose(path.tangent(x, eps, t), [[1.5, -4.0]])
  np.testing.assert_allclose(path.at(x, eps, jnp.array([0.0])), eps)
  np.testing.assert_allclose(path.at(x, eps, jnp.array([1.0])), x)


def test_edm_at_and_tangent():
  path = paths.EDM()
  x, eps = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]])
  sigma = jnp.array([4.0])
  np.testing.assert_allclose(path.at(x, eps, sigma), [[4.0, 11.0]])
  np.testing.assert_allclose(path.tangent(x, eps, sigma), eps)


@pytest.mark.parametrize('path', [paths.Linear(), paths.EDM()], ids=['linear', 'edm'])
def test_tangent_is_time_derivative_of_at(path):
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  eps = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  t = path.time(jnp.array([0.1, 0.5, 0.9]))
  _, dxdt = jax.jvp(lambda tt: path.at(x, eps, tt), (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(path.tangent(x, eps, t), dxdt, rtol=1e-5, atol=1e-5)


def test_edm_grid_endpoints_and_karras_schedule():
  path = paths.EDM(sigma_min=0.002, sigma_max=80.0, rho=7.0)
  grid = np.asarray(path.grid(18))
  assert grid.shape == (19,)
  np.testing.assert_allclose(grid[0], 80.0, rtol=1e-6)
  np.testing.assert_allclose(grid[-1], 0.002, rtol=1e-5)
  assert np.all(np.diff(grid) < 0)
  i = np.arange(19)
  karras = (80.0 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  np.testing.assert_allclose(grid, karras, rtol=1e-5)


def test_edm_linear_schedule_spaces_sigma_as_the_linear_path_its_time():
  """σ = 1/τ − 1 with τ uniform between the ends: where τ is a linear-path time k/N
  inside them, the grid point is that time's σ = (1 − τ)/τ (the two paths' points agree
  up to the factor τ)."""
  path = paths.EDM(sigma_min=0.002, sigma_max=80.0, schedule='linear')
  grid = np.asarray(path.grid(4))
  tau = 1 / 81 + np.arange(5) / 4 * (1 / 1.002 - 1 / 81)
  np.testing.assert_allclose(grid, 1 / tau - 1, rtol=1e-5)
  np.testing.assert_allclose(grid[[0, -1]], [80.0, 0.002], rtol=1e-5)
  x, eps = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]])
  sigma = grid[2]
  np.testing.assert_allclose(paths.Linear().at(x, eps, 1 / (1 + sigma)),
                             path.at(x, eps, sigma) / (1 + sigma), rtol=1e-6)


def test_linear_grid_is_uniform_from_noise_to_data():
  np.testing.assert_allclose(paths.Linear().grid(4), [0.0, 0.25, 0.5, 0.75, 1.0])


def test_prior_is_noise_at_unit_time_zero_or_where_asked():
  eps = jnp.ones((2, 3))
  np.testing.assert_allclose(paths.Linear().prior(eps), eps)
  np.testing.assert_allclose(paths.EDM(sigma_max=80.0).prior(eps), 80.0 * eps, rtol=1e-6)
  np.testing.assert_allclose(paths.EDM(sigma_max=80.0).prior(eps, 20.0), 20.0 * eps)
  np.testing.assert_allclose(paths.Linear().prior(eps, 0.25), 0.75 * eps)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match='num_steps must be a positive integer, got 0'):
    paths.Linear().grid(0)
  with pytest.raises(ValueError, match='0 < sigma_min < sigma_max'):
    paths.EDM(sigma_min=1.0, sigma_max=0.5)
  with pytest.raises(ValueError, match=r"Unknown σ schedule 'karras': expected 'rho' \(EDM's\) "
                                       r"or 'linear' .*; set config.path.schedule"):
    paths.EDM(schedule='karras')
