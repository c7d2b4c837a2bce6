"""Fréchet distance, streaming statistics and Inception Score against torch-fidelity,
pytorch-fid's formula and one-shot numpy."""

import jax
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from secant_jax.evaluation import fid
from secant_jax.train import parallel


def _statistics(rng, n, d, shift=0.0):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift
  return x.mean(0), np.cov(x, rowvar=False)


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's calculate_frechet_distance: scipy's sqrtm, offset if not finite."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize('n', [500, 40])  # 40 < d: rank-deficient, near-singular covariances
def test_frechet_distance_matches_pytorch_fid_formula(n):
  rng = np.random.default_rng(0)
  mu1, sigma1 = _statistics(rng, n, 64)
  mu2, sigma2 = _statistics(rng, n, 64, shift=0.2)
  ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert ours == pytest.approx(_pytorch_fid_formula(mu1, sigma1, mu2, sigma2), rel=1e-6)
  scale = np.trace(sigma1)  # the size of the terms that cancel; the rank-deficient
  # product puts sqrt(eps)-sized roots on its zero eigenvalues
  assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-7 * scale)


@pytest.mark.torch
@pytest.mark.parametrize('n', [500, 40])
def test_frechet_distance_and_inception_score_match_torch_fidelity(n):
  torch = pytest.importorskip('torch')
  metric_fid = pytest.importorskip('torch_fidelity.metric_fid')
  metric_isc = pytest.importorskip('torch_fidelity.metric_isc')
  rng = np.random.default_rng(1)
  mu1, sigma1 = _statistics(rng, n, 64)
  mu2, sigma2 = _statistics(rng, n, 64, shift=0.2)
  expected = metric_fid.fid_statistics_to_metric({'mu': mu1, 'sigma': sigma1},
                                                 {'mu': mu2, 'sigma': sigma2}, False)
  assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
      expected['frechet_inception_distance'], rel=1e-6)
  logits = rng.normal(size=(n * 5, 1008)).astype(np.float32) * 3
  expected = metric_isc.isc_features_to_metric(torch.from_numpy(logits))
  mean, std = fid.inception_score(logits)
  assert mean == pytest.approx(expected['inception_score_mean'], rel=1e-9)
  assert std == pytest.approx(expected['inception_score_std'], rel=1e-6)


def test_streaming_statistics_over_uneven_sharded_batches_equal_one_shot_numpy():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(120, 16)).astype(np.float32) * 2.0 + 5.0
  mesh = parallel.make_mesh()
  sharding = NamedSharding(mesh, P(('data', 'fsdp')))
  stats = fid.FeatureStats(16)
  start = 0
  for size in (8, 40, 16, 56):  # uneven batches, each split over the 8 devices
    batch = jax.device_put(features[start:start + size], sharding)
    assert len(batch.addressable_shards) == 8
    stats.add(batch)
    start += size
  mu, sigma = stats.mu_sigma()
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False),
                             rtol=1e-9, atol=1e-12)


def test_uint8_quantisation_is_the_official_one():
  x = np.array([-1.5, -1.0, -0.0039, 0.0, 0.5, 0.99, 1.0, 2.0], np.float32)
  # clamp(127.5·x + 128, 0, 255) then truncation: 127.5·(−0.0039) + 128 = 127.50 → 127
  np.testing.assert_array_equal(fid.to_uint8(x), [0, 0, 127, 128, 191, 254, 255, 255])


def test_reference_statistics_errors_name_the_keys(tmp_path):
  np.savez(tmp_path / 'ref.npz', mu=np.zeros(4))
  with pytest.raises(ValueError, match=r"lack \['sigma'\]; expected an .npz with 'mu'"):
    fid.load_reference(tmp_path / 'ref.npz')
  np.savez(tmp_path / 'ok.npz', mu=np.zeros(4), sigma=np.eye(4))
  mu, sigma = fid.load_reference(tmp_path / 'ok.npz')
  assert mu.dtype == np.float64 and sigma.shape == (4, 4)
