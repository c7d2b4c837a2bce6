"""One of the two processes of tests/test_multihost.py's feature-statistics check:
`python tests/multihost_fid_worker.py PORT PROCESS_ID` streams two [12, 5] batches of
features, each a global array whose rows are split over both processes' devices (the
whole first batch, the first 7 rows of the second), and prints this process's row count
and the joint (μ, Σ) as JSON."""

import json
import sys

import jax
import numpy as np

BATCHES = [np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32),
           np.random.default_rng(1).normal(1.0, 2.0, size=(12, 5)).astype(np.float32)]
NUM_VALID = (12, 7)


def main(port, process_id):
  jax.distributed.initialize(f'localhost:{port}', 2, process_id)
  from secant_jax.evaluation import fid  # pylint: disable=import-outside-toplevel
  from secant_jax.train import parallel  # pylint: disable=import-outside-toplevel
  sharding = parallel.batch_sharding(parallel.make_mesh(fsdp=2))
  stats = fid.FeatureStats(5)
  local = 12 // jax.process_count()
  for batch, num_valid in zip(BATCHES, NUM_VALID):
    rows = batch[process_id * local:(process_id + 1) * local]
    stats.add(jax.make_array_from_process_local_data(sharding, rows), num_valid)
  mu, sigma = stats.mu_sigma()
  print(json.dumps(dict(count=stats.count, mu=mu.tolist(), sigma=sigma.tolist())))


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]))
