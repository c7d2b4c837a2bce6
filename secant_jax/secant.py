"""The secant losses (Liu & Yue, NeurIPS 2025) as pure functions of arrays and apply-functions.

A secant model f_θ(x_t, t, s) is the average of the probability-flow tangents from t to s,

    f(x_t, t, s) = 1/(s − t) ∫_t^s v(x_r, r) dr = E_{r ~ U(t, s)} v(x_r, r),
    x_s = x_t + (s − t)·f(x_t, t, s),      f(x_t, t, t) = v(x_t, t).

Monte Carlo over r turns this into an ℓ2 loss against one tangent at an interior r; the
point the tangent needs is estimated by the model itself, as in Picard iteration:

| variant | sampled | Picard estimate (θ⁻)           | target (stop-gradient)                   |
|---------|---------|--------------------------------|------------------------------------------|
| sdei    | x_t     | x̂_r = x_t + (r−t)·f(x_t, t, r) | teacher v(x̂_r, r)                        |
| stei    | x_t     | same                           | teacher v(x̂_r, r), or f(x̂_r, r, r) ('self'); + λ·diffusion |
| sdee    | x_r     | x̂_t = x_r + (t−r)·f(x_r, r, t) | teacher v(x_r, r)                        |
| stee    | x_r     | same                           | conditional tangent at r                 |

and the loss is ‖f_θ(x_t or x̂_t, t, s) − target‖², mean over features, per example.
'diffusion' is the plain flow-matching loss ‖f_θ(x_τ, τ, τ) − tangent(τ)‖².

Apply-functions: `secant_fn(x, t, s, y, w)` is the trainable secant and
`teacher_fn(x, t, y, w)` the (guided) teacher tangent; times are per-example [B] in the
path's own time. Nothing here knows which network, path or framework is behind them.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from secant_jax import paths as paths_lib

VARIANTS = ('sdei', 'stei', 'sdee', 'stee', 'diffusion')
STEI_TARGETS = ('teacher', 'self')
DIFFUSION_VARIANTS = ('stei', 'diffusion')  # the variants with a diffusion term at τ


class TimePairs(NamedTuple):
  """Per-example times [B] in path time: secant start t, end s, interior r, diffusion τ."""
  t: jax.Array
  s: jax.Array
  r: jax.Array
  tau: jax.Array


class Conditioning(NamedTuple):
  """What a term's network calls are conditioned on: labels y [B] and guidance scales w
  [B] (None for a network without a guidance input)."""
  y: jax.Array
  w: jax.Array | None


def check_variant(variant):
  if variant not in VARIANTS:
    raise ValueError(f'Unknown secant variant {variant!r}: expected one of {VARIANTS}; '
                     'set the config\'s variant to one of them.')


def check_log_sigma(log_sigma, variant, path, what='log_sigma'):
  """Refuses a log-normal τ (`sample_time_pairs`' log_sigma) that is not (P_mean, P_std)
  with P_std > 0, is given off the EDM path, or to a variant without a diffusion term."""
  if log_sigma is None:
    return
  if len(log_sigma) != 2 or not log_sigma[1] > 0:
    raise ValueError(f'{what} must be (P_mean, P_std) with P_std > 0, as EDM\'s (-1.2, 1.2), '
                     f'got {tuple(log_sigma)!r}.')
  if not isinstance(path, paths_lib.EDM):
    raise ValueError(f'{what} draws the diffusion term\'s σ log-normal, which needs the EDM '
                     f"path (config.path.name='edm'); the path is {path!r}. Leave it unset.")
  if variant not in DIFFUSION_VARIANTS:
    raise ValueError(f'{what} is {tuple(log_sigma)!r}, but variant {variant!r} has no '
                     f'diffusion term (only {DIFFUSION_VARIANTS} have one): leave it unset.')


def sample_time_pairs(key, batch_size, variant, num_steps, path, log_sigma=None):
  """Draws (t, s, r, τ) for a model meant for `num_steps` sampling steps.

  In unit time: d ~ U(0, 1/N), t ~ U(0, 1 − d), s = t + d. 'sdei' snaps t down to the grid
  k/N (s stays within the step that starts at t); 'sdee'/'stee' swap t and s with
  probability ½, so the model also learns the inverse direction; τ ~ U(0, 1). t, s and τ are
  then mapped to path time, and r = t + u·(s − t), u ~ U(0, 1), is drawn in path time, so
  that the average over r is the average of dx/d(path time) that the secant is.

  log_sigma = (P_mean, P_std) (EDM path) draws the diffusion term's τ instead as EDM draws
  the σ it trains its denoiser at (Karras et al. 2022, Table 1: (−1.2, 1.2)):
  ln τ ~ N(P_mean, P_std²), not clipped to [σ_min, σ_max].
  """
  check_variant(variant)
  paths_lib.check_num_steps(num_steps)
  check_log_sigma(log_sigma, variant, path)
  k_d, k_t, k_swap, k_r, k_tau = jax.random.split(key, 5)
  shape = (batch_size,)
  d = jax.random.uniform(k_d, shape) / num_steps
  t = jax.random.uniform(k_t, shape) * (1.0 - d)
  if variant == 'sdei':
    t = jnp.floor(t * num_steps) / num_steps
  s = t + d
  if variant in ('sdee', 'stee'):
    swap = jax.random.bernoulli(k_swap, 0.5, shape)
    t, s = jnp.where(swap, s, t), jnp.where(swap, t, s)
  t, s = path.time(t), path.time(s)
  r = t + jax.random.uniform(k_r, shape) * (s - t)
  if log_sigma is None:
    tau = path.time(jax.random.uniform(k_tau, shape))
  else:
    tau = jnp.exp(log_sigma[0] + log_sigma[1] * jax.random.normal(k_tau, shape))
  return TimePairs(t=t, s=s, r=r, tau=tau)


def secant_step(secant_fn, x, t, s, y, w):
  """One jump along the secant: x_s = x_t + (s − t)·f(x_t, t, s)."""
  f = secant_fn(x, t, s, y, w)
  return x + paths_lib.expand_like(s - t, x) * f.astype(x.dtype)


def picard_estimate(secant_fn, x, t, s, y, w):
  """The model's own stop-gradient estimate of x_s from x_t (x̂_r for the interior
  variants with (t, s) = (t, r); x̂_t for the endpoint variants with (t, s) = (r, t))."""
  return jax.lax.stop_gradient(secant_step(secant_fn, x, t, s, y, w))


def mean_squared_error(prediction, target):
  """Per-example mean over all non-batch axes of (prediction − target)², in float32."""
  diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


@dataclasses.dataclass(frozen=True)
class _Spec:
  estimate: str  # 'interior': sample x_t, estimate x̂_r; 'endpoint': sample x_r, estimate x̂_t
  target: str  # 'teacher' | 'self' | 'data' (the conditional tangent at r)
  diffusion_weight: float


def check_stei_target(stei_target, what='stei_target'):
  if stei_target not in STEI_TARGETS:
    raise ValueError(f'{what} must be one of {STEI_TARGETS}, got {stei_target!r}.')


def _spec(variant, stei_lambda, stei_target):
  if variant == 'stei':
    check_stei_target(stei_target)
  return {
      'sdei': _Spec('interior', 'teacher', 0.0),
      'stei': _Spec('interior', stei_target, stei_lambda),
      'sdee': _Spec('endpoint', 'teacher', 0.0),
      'stee': _Spec('endpoint', 'data', 0.0),
  }[variant]


def diffusion_loss(secant_fn, path, x_data, noise, tau, y, w):
  """Flow matching on the diagonal: ‖f_θ(x_τ, τ, τ) − (α'(τ)·x_data + σ'(τ)·ε)‖²."""
  x_tau = path.at(x_data, noise, tau)
  return mean_squared_error(secant_fn(x_tau, tau, tau, y, w),
                            path.tangent(x_data, noise, tau))


def loss(variant, secant_fn, teacher_fn, path, x_data, noise, times, y, w, *,
         stei_lambda=1.0, stei_target='teacher', diffusion_conditioning=None,
         weight_fn=None, frozen_secant_fn=None):
  """The per-example loss [B] of one variant, and its terms in `aux`.

  All randomness is in the inputs (noise ε, `times` from `sample_time_pairs`, labels y,
  already dropped for CFG where a term is trained unguided, guidance scales w), so the
  same numbers give the same loss in any implementation. For 'stei' the diffusion term
  reuses ε at time τ. Stop-gradients sit on the Picard estimate and on the target;
  gradients reach θ only through f_θ(·, t, s).

  The diffusion term (of 'stei' and 'diffusion') is conditioned on
  `diffusion_conditioning`, default Conditioning(y, w). Its target, the conditional
  tangent, is the unguided one, so a student with embedded guidance trains it at w = 1,
  with labels dropped for CFG, while its secant term sees the true labels and the
  teacher's CFG at w (as the official code's STEI does; `train.step` sets this up).

  `weight_fn(times [B]) → [B]` weights each term per example by the time its trained
  network call starts from (the secant term's t, the diffusion term's τ); None weights 1
  (`precond.loss_weight_fn`).

  `frozen_secant_fn` is f_θ⁻: the same secant with stop-gradient on its parameters, for
  the calls that only make a target (the Picard estimate, STEI's 'self' target). None uses
  secant_fn, whose outputs there are under stop-gradient anyway: the same values and
  gradients. Given, those calls are evaluated without being differentiated at all, which a
  network may compute differently (`models.dit.layer_norm`).

  Returns:
    (loss [B] float32, aux) with aux = {'secant': [B], 'diffusion': [B]} (the terms
    without weight_fn or stei_lambda; a term a variant does not have is zeros).
  """
  weight = weight_fn or (lambda _: 1.0)
  check_variant(variant)
  diffusion_y, diffusion_w = diffusion_conditioning or Conditioning(y, w)
  if variant == 'diffusion':
    term = diffusion_loss(secant_fn, path, x_data, noise, times.tau, diffusion_y, diffusion_w)
    return weight(times.tau) * term, {'secant': jnp.zeros_like(term), 'diffusion': term}
  spec = _spec(variant, stei_lambda, stei_target)
  if spec.target == 'teacher' and teacher_fn is None:
    raise ValueError(f'Secant variant {variant!r} needs teacher_fn (the guided teacher '
                     'tangent), got None; pass one, or use stei with '
                     "stei_target='self' or stee, which need no teacher.")
  t, s, r = times.t, times.s, times.r
  frozen_secant_fn = frozen_secant_fn or secant_fn
  if spec.estimate == 'interior':
    x_start = path.at(x_data, noise, t)
    x_r = picard_estimate(frozen_secant_fn, x_start, t, r, y, w)
  else:
    x_r = path.at(x_data, noise, r)
    x_start = picard_estimate(frozen_secant_fn, x_r, r, t, y, w)
  if spec.target == 'teacher':
    target = teacher_fn(x_r, r, y, w)
  elif spec.target == 'self':
    target = frozen_secant_fn(x_r, r, r, y, w)
  else:
    target = path.tangent(x_data, noise, r)
  secant_term = mean_squared_error(secant_fn(x_start, t, s, y, w),
                                   jax.lax.stop_gradient(target))
  if spec.diffusion_weight:
    diffusion_term = diffusion_loss(secant_fn, path, x_data, noise, times.tau, diffusion_y,
                                    diffusion_w)
  else:
    diffusion_term = jnp.zeros_like(secant_term)
  total = (weight(t) * secant_term
           + spec.diffusion_weight * weight(times.tau) * diffusion_term)
  return total, {'secant': secant_term, 'diffusion': diffusion_term}
