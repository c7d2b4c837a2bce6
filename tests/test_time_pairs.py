import jax
import numpy as np
import pytest

from secant_jax import paths
from secant_jax import secant

B = 20000


def _draw(variant, num_steps, path=paths.Linear(), seed=0):
  return secant.sample_time_pairs(jax.random.key(seed), B, variant, num_steps, path)


@pytest.mark.parametrize('variant', ['sdei', 'stei', 'sdee', 'stee'])
def test_step_length_is_below_one_step_and_r_is_between(variant):
  n = 4
  tp = _draw(variant, n)
  t, s, r = map(np.asarray, (tp.t, tp.s, tp.r))
  assert np.all((t >= 0) & (t <= 1) & (s >= 0) & (s <= 1))
  assert np.all(np.abs(s - t) <= 1 / n + 1e-6)
  assert np.all((r - np.minimum(t, s) >= -1e-6) & (np.maximum(t, s) - r >= -1e-6))
  # d is uniform on (0, 1/N): mean 1/(2N).
  np.testing.assert_allclose(np.abs(s - t).mean(), 1 / (2 * n), rtol=0.03)


def test_sdei_snaps_t_to_the_grid_and_stays_in_its_step():
  n = 4
  tp = _draw('sdei', n)
  t, s = np.asarray(tp.t), np.asarray(tp.s)
  k = t * n
  np.testing.assert_allclose(k, np.round(k), atol=1e-6)
  assert set(np.round(k).astype(int)) == {0, 1, 2, 3}
  assert np.all(s > t) and np.all(s <= (np.round(k) + 1) / n + 1e-6)


@pytest.mark.parametrize('variant', ['sdee', 'stee'])
def test_endpoint_variants_swap_half_the_time(variant):
  tp = _draw(variant, 2)
  backward = np.mean(np.asarray(tp.s) < np.asarray(tp.t))
  assert abs(backward - 0.5) < 4 * np.sqrt(0.25 / B)


@pytest.mark.parametrize('variant', ['sdei', 'stei'])
def test_interior_variants_never_swap(variant):
  tp = _draw(variant, 2)
  assert np.all(np.asarray(tp.s) > np.asarray(tp.t))


def test_interior_point_is_uniform_between_t_and_s():
  tp = _draw('stee', 1)
  u = (np.asarray(tp.r) - np.asarray(tp.t)) / (np.asarray(tp.s) - np.asarray(tp.t))
  assert np.all((u >= 0) & (u <= 1))
  np.testing.assert_allclose([u.mean(), u.var()], [0.5, 1 / 12], atol=0.01)


def test_edm_times_are_sigmas_and_r_is_uniform_in_sigma():
  path = paths.EDM()
  tp = _draw('stei', 8, path)
  t, s, r, tau = map(np.asarray, tp)
  for x in (t, s, r, tau):
    assert np.all((x >= 0.002 * (1 - 1e-5)) & (x <= 80.0 * (1 + 1e-6)))
  assert np.all(s < t)  # unit time runs noise → data, so σ falls
  u = (r - t) / (s - t)
  np.testing.assert_allclose([u.mean(), u.var()], [0.5, 1 / 12], atol=0.01)
  # τ is uniform in unit time: its median is σ(1/2).
  np.testing.assert_allclose(np.median(tau), float(path.time(0.5)), rtol=0.05)


@pytest.mark.parametrize('variant', ['stei', 'diffusion'])
def test_log_normal_tau_is_edms_and_leaves_the_secant_times_alone(variant):
  path = paths.EDM()
  key = jax.random.key(5)
  grid = secant.sample_time_pairs(key, B, variant, 4, path)
  edm = secant.sample_time_pairs(key, B, variant, 4, path, log_sigma=(-1.2, 1.2))
  log_tau = np.log(np.asarray(edm.tau))
  np.testing.assert_allclose([log_tau.mean(), log_tau.std()], [-1.2, 1.2], atol=0.03)
  # not clipped to [σ_min, σ_max], as EDM's are not: ln σ_min = −6.21 is the 42nd percentile
  # of N(−6, 1)
  low = secant.sample_time_pairs(key, B, variant, 4, path, log_sigma=(-6.0, 1.0))
  np.testing.assert_allclose(np.mean(np.asarray(low.tau) < path.sigma_min), 0.417, atol=0.02)
  for name in ('t', 's', 'r'):
    np.testing.assert_array_equal(getattr(grid, name), getattr(edm, name))


@pytest.mark.parametrize('variant, path, log_sigma, message', [
    ('diffusion', paths.EDM(), (-1.2,), r'must be \(P_mean, P_std\) with P_std > 0, as '
                                        r"EDM's \(-1.2, 1.2\), got \(-1.2,\)"),
    ('diffusion', paths.EDM(), (-1.2, 0.0), r'with P_std > 0, .* got \(-1.2, 0.0\)'),
    ('diffusion', paths.Linear(), (-1.2, 1.2), r"log-normal, which needs the EDM path "
                                               r"\(config.path.name='edm'\); the path is "
                                               r'Linear\(\)'),
    ('sdei', paths.EDM(), (-1.2, 1.2), r"variant 'sdei' has no diffusion term \(only "
                                       r"\('stei', 'diffusion'\) have one\): leave it unset"),
])
def test_a_log_normal_tau_that_cannot_apply_is_named(variant, path, log_sigma, message):
  with pytest.raises(ValueError, match=message):
    secant.sample_time_pairs(jax.random.key(0), 4, variant, 4, path, log_sigma)


def test_same_key_same_draws():
  a, b = _draw('sdee', 4, seed=3), _draw('sdee', 4, seed=3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match=r"Unknown secant variant 'sdxx'.*'sdei'"):
    _draw('sdxx', 4)
