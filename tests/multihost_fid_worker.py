"""One of the two processes of tests/test_multihost.py's feature-statistics check:
`python tests/multihost_fid_worker.py PORT PROCESS_ID DIR` streams two [12, 5] batches of
features, each a global array whose rows are split over both processes' devices (the
whole first batch, the first 7 rows of the second), and prints this process's row count
and the joint (μ, Σ) as JSON. It also writes the same rows, as uint8 images [1, 5, 1]
(`pixels`), to DIR with sample_quality.write_images."""

import json
import sys

import jax
import numpy as np

BATCHES = [np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32),
           np.random.default_rng(1).normal(1.0, 2.0, size=(12, 5)).astype(np.float32)]
NUM_VALID = (12, 7)


def pixels(batch):
  return np.clip(40 * batch + 128, 0, 255).astype(np.uint8)[:, None, :, None]


def main(port, process_id, directory):
  jax.distributed.initialize(f'localhost:{port}', 2, process_id)
  # pylint: disable=import-outside-toplevel
  from secant_jax.evaluation import fid
  from secant_jax.evaluation import sample_quality
  from secant_jax.train import parallel
  sharding = parallel.batch_sharding(parallel.make_mesh(fsdp=2))
  stats = fid.FeatureStats(5)
  local = 12 // jax.process_count()
  for start, batch, num_valid in zip((0, NUM_VALID[0]), BATCHES, NUM_VALID):
    rows = slice(process_id * local, (process_id + 1) * local)
    stats.add(jax.make_array_from_process_local_data(sharding, batch[rows]), num_valid)
    sample_quality.write_images(jax.make_array_from_process_local_data(
        sharding, pixels(batch)[rows]), start, num_valid, directory)
  mu, sigma = stats.mu_sigma()
  print(json.dumps(dict(count=stats.count, mu=mu.tolist(), sigma=sigma.tolist())))


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
