"""Classifier-free guidance: label dropout, the CFG combination, embedded guidance scales
and the guidance interval. Pure functions of arrays and apply-functions."""

import jax
import jax.numpy as jnp

from secant_jax import paths as paths_lib


def check_drop_prob(drop_prob, what='label drop probability'):
  if not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f'{what} must be in [0, 1], got {drop_prob}.')


def check_ordered_pair(pair, what='guidance range', names=('w_min', 'w_max')):
  """Refuses a `pair` that is not two values, the first at most the second."""
  low, high = names
  if len(pair) != 2 or not pair[0] <= pair[1]:
    raise ValueError(f'{what} must be ({low}, {high}) with {low} <= {high}, got {tuple(pair)}.')


def drop_labels(key, labels, drop_prob, null_class):
  """Replaces each label by `null_class` with probability `drop_prob` (CFG training)."""
  check_drop_prob(drop_prob)
  drop = jax.random.bernoulli(key, drop_prob, labels.shape)
  return jnp.where(drop, jnp.asarray(null_class, labels.dtype), labels)


def combine(v_cond, v_uncond, scale):
  """CFG: v_u + w·(v_c − v_u), with w a scalar or per-example [B]."""
  return v_uncond + paths_lib.expand_like(scale, v_cond) * (v_cond - v_uncond)


def classifier_free(fn, null_class):
  """Turns fn(x, *times, y) into g(x, *times, y, w) = CFG at scale w, in one batched call.

  The conditional and unconditional passes run as one call on the doubled batch
  [x; x] with labels [y; null], so a network sees one large batch instead of two small ones.
  Works for a teacher tangent fn(x, t, y) and for a secant fn(x, t, s, y) alike.
  """

  def guided(x, *args):
    *times, y, w = args
    batch = x.shape[0]
    both = fn(jnp.concatenate([x, x]),
              *[jnp.concatenate([t, t]) for t in times],
              jnp.concatenate([y, jnp.full_like(y, null_class)]))
    return combine(both[:batch], both[batch:], w)

  return guided


def sample_scale(key, batch_size, scale_min, scale_max):
  """Per-example guidance scales w ~ U(w_min, w_max) for embedded-guidance distillation."""
  check_ordered_pair((scale_min, scale_max))
  return jax.random.uniform(key, (batch_size,), minval=scale_min, maxval=scale_max)


def normalize_scale(scale, scale_min, scale_max):
  """Maps w ∈ [w_min, w_max] to [0, 1], the model's guidance-embedding input."""
  if scale_max == scale_min:
    return jnp.zeros_like(scale)
  return (scale - scale_min) / (scale_max - scale_min)


def interval_scale(scale, unit_time, interval):
  """The scale to use at unit time u: w inside [a, b), 1 (no guidance) outside."""
  lo, hi = interval
  inside = (unit_time >= lo) & (unit_time < hi)
  return jnp.where(inside, scale, jnp.ones_like(scale))
