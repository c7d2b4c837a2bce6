"""Fréchet distance and Inception Score from streamed features, as torch-fidelity computes them.

Images in [−1, 1] are quantised as the official evaluation does, clamp(127.5·x + 128, 0,
255) → uint8 (truncating), before any feature network sees them. Feature statistics are
streamed: per process, running sums n, Σx and Σxxᵀ in float64 over batches of any size,
summed across processes at the end, then

    μ = Σx / n,    Σ = (Σxxᵀ − n·μμᵀ) / (n − 1)     (numpy's np.cov, ddof = 1)

and the Fréchet distance between (μ₁, Σ₁) and (μ₂, Σ₂) is

    ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2·Σᵢ √λᵢ(Σ₁Σ₂)

with λᵢ the eigenvalues of Σ₁Σ₂ (real parts of their complex square roots), which stays
finite when the covariances are near singular. The feature network is a parameter: FID
uses Inception's 2048-d pool features; any other extractor gives an "FD-<name>".
"""

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils


def to_uint8(images):
  """[−1, 1] float images → uint8, the official quantisation."""
  return jnp.clip(127.5 * images + 128.0, 0.0, 255.0).astype(jnp.uint8)


def _allgather_sum_float64(x):
  """Σ over processes of a float64 array, exactly enough: sent as float32 high and low
  parts (≈ 48 bits), summed in float64."""
  if jax.process_count() == 1:
    return x
  high = x.astype(np.float32)
  low = (x - high.astype(np.float64)).astype(np.float32)
  gathered = multihost_utils.process_allgather({'high': high, 'low': low})
  return (np.asarray(gathered['high'], np.float64).sum(0)
          + np.asarray(gathered['low'], np.float64).sum(0))


def _local_rows(features, num_valid):
  """The rows this process holds among the first `num_valid`: of a batch-sharded global
  jax.Array, each addressable shard once (replicas skipped); other inputs as they are."""
  if isinstance(features, jax.Array) and not features.is_fully_addressable:
    rows = {}
    for shard in features.addressable_shards:
      start = shard.index[0].start or 0
      rows[start] = np.asarray(shard.data)[:max(0, num_valid - start)]
    return np.concatenate([rows[k] for k in sorted(rows)])
  return np.asarray(features)[:num_valid]


class FeatureStats:
  """Running float64 sums of features [b, d], batch by batch, on the host. A batch may be
  a global jax.Array sharded over processes: each process adds the rows it holds."""

  def __init__(self, dim):
    self.count = 0
    self.total = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def add(self, features, num_valid=None):
    """Adds the rows of `features` (only the first `num_valid`, to trim a last batch)."""
    f = _local_rows(features, features.shape[0] if num_valid is None else num_valid)
    f = f.astype(np.float64)
    if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
      raise ValueError(f'Features must be [batch, {self.total.shape[0]}], got {f.shape}.')
    self.count += f.shape[0]
    self.total += f.sum(0)
    self.outer += f.T @ f

  def state(self):
    """This process's running sums as arrays, for `restore` in a resumed run."""
    return {'rows': np.asarray(self.count), 'total': self.total, 'outer': self.outer}

  def restore(self, state):
    self.count = int(state['rows'])
    self.total = np.array(state['total'], np.float64)
    self.outer = np.array(state['outer'], np.float64)

  def mu_sigma(self):
    """(μ, Σ) over every process's features."""
    count = float(_allgather_sum_float64(np.asarray([self.count], np.float64))[0])
    if count < 2:
      raise ValueError(f'Feature statistics need at least 2 samples, got {int(count)}.')
    total = _allgather_sum_float64(self.total)
    outer = _allgather_sum_float64(self.outer)
    mu = total / count
    return mu, (outer - count * np.outer(mu, mu)) / (count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2·tr √(Σ₁Σ₂), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'Statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma '
                     f'{sigma1.shape} vs {sigma2.shape}; were they made by the same feature '
                     'layer?')
  diff = mu1 - mu2
  eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
  tr_covmean = np.sum(np.sqrt(eigenvalues).real)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits, splits=10, shuffle_seed=2020):
  """(mean, std) over `splits` of exp E_x KL(p(y|x) ‖ p(y)), from the unbiased logits
  [N, classes], shuffled with numpy's RandomState(shuffle_seed) as torch-fidelity does
  (None: no shuffle)."""
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if shuffle_seed is not None:
    logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
  log_p = logits - logits.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    chunk = slice(i * n // splits, (i + 1) * n // splits)
    log_q = np.log(p[chunk].mean(0, keepdims=True))
    scores.append(np.exp((p[chunk] * (log_p[chunk] - log_q)).sum(1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def load_reference(path):
  """(μ, Σ) from a reference .npz with 'mu' and 'sigma' (ADM's and EDM's layouts)."""
  with epath.Path(path).open('rb') as file, np.load(file) as f:
    missing = [k for k in ('mu', 'sigma') if k not in f]
    if missing:
      raise ValueError(f'Reference statistics {path} lack {missing}; expected an .npz with '
                       f"'mu' [d] and 'sigma' [d, d] (its keys: {sorted(f.keys())}).")
    return f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
