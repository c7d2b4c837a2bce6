"""One of the two processes of tests/test_multihost.py's comparison checks:
`python tests/multihost_compare_worker.py PORT PROCESS_ID DIR`

- progress: saves after 8 and 16 samples, except that process 1 stops before its save of
  16 (a preemption between the processes' writes); then loads it afresh;
- references: keeps a batch of 8 whose rows are split between the processes (2 devices
  each), then reads it back, and looks for a batch never kept.

Writes DIR/result_<PROCESS_ID>.json: how many samples it resumes after, the progress
array it got back, the reference batch it read and whether the other was found (a file:
Gloo's messages on the shared output can land mid-line)."""

import json
import os
import sys

import jax
import numpy as np


def main(port, process_id, directory):
  jax.distributed.initialize(f'localhost:{port}', 2, process_id)
  # pylint: disable=import-outside-toplevel
  from secant_jax.evaluation import progress
  from secant_jax.evaluation import references
  from secant_jax.train import parallel
  saves = progress.Progress(directory, {'num_samples': 20})
  for done in (8, 16)[:2 - process_id]:
    saves.save(done, {'rows': np.asarray([process_id, done])})
  done, arrays = progress.Progress(directory, {'num_samples': 20}).load()
  kept = references.References(os.path.join(directory, 'references'), {'num_samples': 20})
  local_rows = np.arange(4.0)[:, None] + 4 * process_id
  kept.write(0, jax.make_array_from_process_local_data(
      parallel.batch_sharding(parallel.make_mesh()), local_rows, (8, 1)))
  with open(os.path.join(directory, f'result_{process_id}.json'), 'w') as f:
    json.dump(dict(done=done, rows=arrays['rows'].tolist(),
                   reference=kept.read(0)[:, 0].tolist(), never_kept=kept.read(8)), f)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
