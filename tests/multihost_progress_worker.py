"""One of the two processes of tests/test_multihost.py's resume check:
`python tests/multihost_progress_worker.py PORT PROCESS_ID DIR` saves progress after 8 and
16 samples, except that process 1 stops before its save of 16 (a preemption between the
processes' writes); then loads it afresh and writes DIR/result_<PROCESS_ID>.json: how
many samples it resumes after and the array it got back (a file: Gloo's messages on the
shared output can land mid-line)."""

import json
import os
import sys

import jax
import numpy as np


def main(port, process_id, directory):
  jax.distributed.initialize(f'localhost:{port}', 2, process_id)
  from secant_jax.evaluation import progress  # pylint: disable=import-outside-toplevel
  saves = progress.Progress(directory, {'num_samples': 20})
  for done in (8, 16)[:2 - process_id]:
    saves.save(done, {'rows': np.asarray([process_id, done])})
  done, arrays = progress.Progress(directory, {'num_samples': 20}).load()
  with open(os.path.join(directory, f'result_{process_id}.json'), 'w') as f:
    json.dump(dict(done=done, rows=arrays['rows'].tolist()), f)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
