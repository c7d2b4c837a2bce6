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


@pytest.mark.parametrize('python_version, venv_calls', [
    ('3.10', ['python3 -m pip install -q --user uv', 'uv venv -q --seed --python 3.11 .venv']),
    ('3.11', ['python3 -m venv .venv'])])
def test_tpu_setup_makes_a_python_3_11_venv_on_every_host(tmp_path, python_version,
                                                          venv_calls):
  """The TPU runtimes' python3 is 3.10, which JAX no longer supports: there the venv's
  Python comes from uv; the package is installed with the tested versions."""
  home, log = tmp_path / 'host', tmp_path / 'calls'
  home.mkdir()
  _stand_in(tmp_path, 'gcloud', f'''echo "gcloud $*" >> {log}
for a in "$@"; do case "$a" in --command=*) cmd="${{a#--command=}}";; esac; done
case " $* " in *" scp "*) cp "$5" {home}/;; *" ssh "*) cd {home} && bash -c "$cmd";; esac
''')
  _stand_in(tmp_path, 'make-venv', f'''mkdir -p .venv/bin
echo 'pip() {{ echo "pip $*" >> {log}; }}' > .venv/bin/activate
''')
  _stand_in(tmp_path, 'uv-stand-in', f'echo "uv $*" >> {log}; make-venv\n')
  _stand_in(tmp_path, 'python3', f'''case "$*" in
  *version_info*) exit {int(python_version == '3.10')};;
  "-m venv .venv") echo "python3 $*" >> {log}; make-venv;;
  *) echo "python3 $*" >> {log}; mkdir -p ~/.local/bin; cp {tmp_path}/uv-stand-in ~/.local/bin/uv;;
esac
''')
  result = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', 'tpu_pod.sh'), 'setup'], capture_output=True,
      text=True, env={**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}',
                      'HOME': str(home), 'TPU_NAME': 'secant', 'ZONE': 'us-central2-b'})
  assert result.returncode == 0, result.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith('gcloud compute tpus tpu-vm scp /tmp/secant-jax.tgz secant:~/')
  assert calls[1].startswith('gcloud compute tpus tpu-vm ssh secant --zone=us-central2-b '
                             '--worker=all --command=')
  assert calls[2:] == venv_calls + ['pip install -q -U pip',
                                    "pip install -q -c constraints.txt -e .[tpu]"]
  assert (home / 'secant-jax' / 'constraints.txt').is_file()
