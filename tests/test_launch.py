"""The launch scripts' own logic, with stand-ins for the cluster's commands on PATH."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stand_in(directory, name, body):
  path = directory / name
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(0o755)


@pytest.mark.parametrize('trainer_status, requeue_status, requeued, script_status',
                         [(75, 0, True, 0), (75, 1, True, 75), (0, 0, False, 0),
                          (1, 0, False, 1)])
def test_slurm_requeues_a_run_stopped_before_its_last_step(tmp_path, trainer_status,
                                                           requeue_status, requeued,
                                                           script_status):
  """Exit status 75 (the trainer saved and stopped on the time limit's SIGTERM) queues the
  job again, and the job ends 75 where that fails; a finished run (0) and a failed one (1)
  are not requeued."""
  log = tmp_path / 'calls'
  _stand_in(tmp_path, 'srun', f'echo "srun $*" >> {log}; exit {trainer_status}\n')
  _stand_in(tmp_path, 'scontrol', f'echo "scontrol $*" >> {log}; exit {requeue_status}\n')
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', 'gpu_slurm.sh'), '--config=configs/x.py',
       '--workdir=/shared/run'], capture_output=True, text=True, cwd=tmp_path,
      env={**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '123',
           'SLURM_SUBMIT_DIR': str(tmp_path)})
  assert result.returncode == script_status, result.stderr
  calls = log.read_text().splitlines()
  assert calls[0] == ('srun --kill-on-bad-exit=1 python -m secant_jax.main '
                      '--config=configs/x.py --workdir=/shared/run --config.distributed=True')
  assert calls[1:] == (['scontrol requeue 123'] if requeued else [])
