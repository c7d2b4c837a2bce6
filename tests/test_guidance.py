import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import guidance


def test_drop_labels_rate_and_null_class():
  labels = jnp.arange(20000) % 10
  dropped = np.asarray(guidance.drop_labels(jax.random.key(0), labels, 0.1, 10))
  changed = dropped != np.asarray(labels)
  assert np.all(dropped[changed] == 10)
  assert abs(changed.mean() - 0.1) < 4 * np.sqrt(0.09 / 20000)
  np.testing.assert_array_equal(guidance.drop_labels(jax.random.key(0), labels, 0.0, 10),
                                labels)
  with pytest.raises(ValueError, match='label drop probability must be in'):
    guidance.drop_labels(jax.random.key(0), labels, 1.5, 10)


def test_combine_is_cfg():
  v_c, v_u = jnp.ones((2, 3)) * 3.0, jnp.ones((2, 3))
  np.testing.assert_allclose(guidance.combine(v_c, v_u, jnp.array([1.0, 2.5])),
                             [[3.0] * 3, [6.0] * 3])
  np.testing.assert_allclose(guidance.combine(v_c, v_u, 0.0), v_u)


def test_classifier_free_batches_both_passes_and_combines():
  calls = []

  def fn(x, t, s, y):
    calls.append(x.shape[0])
    return x * t[:, None] + s[:, None] + y[:, None].astype(x.dtype)

  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  t, s = jnp.array([0.5, 2.0]), jnp.array([0.1, 0.2])
  y, w = jnp.array([3, 7]), jnp.array([2.0, 1.5])
  out = guidance.classifier_free(fn, null_class=10)(x, t, s, y, w)
  cond = fn(x, t, s, y)
  uncond = fn(x, t, s, jnp.full_like(y, 10))
  np.testing.assert_allclose(out, uncond + w[:, None] * (cond - uncond), rtol=1e-6)
  assert calls[0] == 4  # one call on the doubled batch


def test_scale_sampling_and_normalisation():
  w = np.asarray(guidance.sample_scale(jax.random.key(0), 10000, 1.0, 2.5))
  assert w.min() >= 1.0 and w.max() <= 2.5
  np.testing.assert_allclose(w.mean(), 1.75, atol=0.02)
  norm = np.asarray(guidance.normalize_scale(jnp.array([1.0, 1.75, 2.5]), 1.0, 2.5))
  np.testing.assert_allclose(norm, [0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match=r'guidance range must be \(w_min, w_max\) with w_min <= w_max, got \(3.0, 1.0\)'):
    guidance.sample_scale(jax.random.key(0), 4, 3.0, 1.0)


def test_interval_scale_guides_only_inside():
  w = jnp.array([2.0, 3.0])
  np.testing.assert_allclose(guidance.interval_scale(w, 0.2, (0.3, 0.8)), [1.0, 1.0])
  np.testing.assert_allclose(guidance.interval_scale(w, 0.3, (0.3, 0.8)), [2.0, 3.0])
  np.testing.assert_allclose(guidance.interval_scale(w, 0.8, (0.3, 0.8)), [1.0, 1.0])
