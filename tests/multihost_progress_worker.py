"""One of the two processes of tests/test_multihost.py's resume check:
`python tests/multihost_progress_worker.py PORT PROCESS_ID DIR` saves progress after 8 and
16 samples, except that process 1 stops before its save of 16 (a preemption between the
processes' writes); then loads it afresh and prints, as JSON, how many samples it resumes
after and the array it got back."""

import json
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
  print(json.dumps(dict(done=done, rows=arrays['rows'].tolist())))


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
