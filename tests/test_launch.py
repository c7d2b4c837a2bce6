"""The launch scripts' own logic, with stand-ins for the cluster's commands on PATH."""

import os
import re
import shutil
import signal
import subprocess
import time

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
  (tmp_path / 'launch').mkdir()  # the submit directory is the user's checkout
  for script in ('gpu_env.sh', 'memory_fraction.sh'):
    shutil.copy(os.path.join(REPO, 'launch', script), tmp_path / 'launch')
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


def _without_memory_fraction(environ):
  """`environ` without either name of JAX's GPU memory share, as a caller who set none."""
  return {k: v for k, v in environ.items()
          if k not in ('XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_MEM_FRACTION')}


# What a process reads of its memory share: XLA_CLIENT_MEM_FRACTION, then the old name.
_MEMORY_FRACTIONS = '${XLA_CLIENT_MEM_FRACTION:--} ${XLA_PYTHON_CLIENT_MEM_FRACTION:--}'


@pytest.mark.parametrize('caller, fractions', [
    ({}, ['0.95', '-']), ({'XLA_CLIENT_MEM_FRACTION': '0.5'}, ['0.5', '-']),
    ({'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.6'}, ['-', '0.6'])])
@pytest.mark.parametrize('script', ['gpu_local.sh', 'gpu_slurm.sh'])
def test_gpu_launchers_run_with_cublas_gemms_and_the_callers_flags_last(tmp_path, script,
                                                                       caller, fractions):
  """Both GPU launchers give the trainer the XLA flags of launch/gpu_env.sh, then the
  caller's (XLA takes the last setting of a flag, so the caller's wins), and 95% of each
  GPU's memory unless the caller gave a share under either name (jaxlib refuses both)."""
  log = tmp_path / 'calls'
  trainer = f'echo "{_MEMORY_FRACTIONS} $XLA_FLAGS" >> {log}\n'
  _stand_in(tmp_path, 'python', trainer)
  _stand_in(tmp_path, 'srun', trainer)
  subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--workdir=runs/x'],
                 check=True, env={**_without_memory_fraction(os.environ), **caller,
                                  'PATH': f'{tmp_path}:{os.environ["PATH"]}',
                                  'SLURM_SUBMIT_DIR': REPO,
                                  'XLA_FLAGS': '--xla_gpu_enable_triton_gemm=true'})
  assert log.read_text().split() == [
      *fractions, '--xla_gpu_enable_latency_hiding_scheduler=true',
      '--xla_gpu_enable_triton_gemm=false', '--xla_gpu_enable_triton_gemm=true']


def _checkout(tmp_path):
  """A git checkout holding the TPU launcher and the constraints, as a user's clone does."""
  checkout = tmp_path / 'checkout'
  (checkout / 'launch').mkdir(parents=True)
  for name in ('launch/tpu_pod.sh', 'constraints.txt', '.gitignore'):
    shutil.copy(os.path.join(REPO, name), checkout / name)
  git = lambda *args: subprocess.run(['git', '-C', str(checkout), *args], check=True,
                                     capture_output=True)
  git('init', '-q')
  git('add', '.')
  return checkout, git


def _tpu_setup(tmp_path, checkout, python_version='3.11'):
  """`tpu_pod.sh setup` from `checkout` onto one stand-in host (gcloud's scp copies to its
  home, ssh runs the command there); returns the host's home, the calls and the result."""
  home, log = tmp_path / 'host', tmp_path / 'calls'
  home.mkdir(exist_ok=True)  # a second setup: the same host
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
      ['bash', str(checkout / 'launch' / 'tpu_pod.sh'), 'setup'], capture_output=True,
      text=True, env={**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}',
                      'HOME': str(home), 'TPU_NAME': 'secant', 'ZONE': 'us-central2-b'})
  calls = log.read_text().splitlines() if log.exists() else []
  return home, calls, result


@pytest.mark.parametrize('python_version, venv_calls', [
    ('3.10', ['python3 -m pip install -q --user uv', 'uv venv -q --seed --python 3.11 .venv']),
    ('3.11', ['python3 -m venv .venv'])])
def test_tpu_setup_makes_a_python_3_11_venv_on_every_host(tmp_path, python_version,
                                                          venv_calls):
  """The TPU runtimes' python3 is 3.10, which JAX no longer supports: there the venv's
  Python comes from uv; the package is installed with the tested versions."""
  home, calls, result = _tpu_setup(tmp_path, _checkout(tmp_path)[0], python_version)
  assert result.returncode == 0, result.stderr
  assert re.match(r'gcloud compute tpus tpu-vm scp /\S+/secant-jax.tgz secant:~/ ', calls[0])
  assert calls[1].startswith('gcloud compute tpus tpu-vm ssh secant --zone=us-central2-b '
                             '--worker=all --command=')
  assert calls[2:] == venv_calls + ['pip install -q -U pip',
                                    "pip install -q -c constraints.txt -e .[tpu]"]
  assert (home / 'secant-jax' / 'constraints.txt').is_file()


def test_tpu_setup_copies_the_source_as_on_disk_but_not_run_files(tmp_path):
  """Local edits and new source files reach the hosts; a tracked file deleted on disk does
  not break the copy; what git ignores (runs/, ckpt/, data/: README's examples keep
  checkpoints and ImageNet's 10 GB of latents there) stays behind."""
  checkout, git = _checkout(tmp_path)
  (checkout / 'gone.py').write_text('')
  git('add', 'gone.py')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '-m', 'tracked')
  (checkout / 'gone.py').unlink()
  (checkout / 'constraints.txt').write_text('jax==0.0.0  # edited\n')
  (checkout / 'new_module.py').write_text('')
  for run_file in ('runs/sdei4/checkpoints/1/x', 'ckpt/sit-xl2/x', 'data/latents/x'):
    (checkout / run_file).parent.mkdir(parents=True)
    (checkout / run_file).write_text('')
  home, _, result = _tpu_setup(tmp_path, checkout)
  assert result.returncode == 0, result.stderr
  copied = sorted(str(p.relative_to(home / 'secant-jax'))
                  for p in (home / 'secant-jax').rglob('*') if '.venv' not in p.parts)  # made there
  assert copied == ['.gitignore', '.setup-files', 'constraints.txt', 'launch',
                    'launch/tpu_pod.sh', 'new_module.py']
  assert (home / 'secant-jax' / 'constraints.txt').read_text() == 'jax==0.0.0  # edited\n'


def test_a_second_tpu_setup_removes_the_files_the_checkout_no_longer_has(tmp_path):
  """A module deleted or renamed in the checkout goes from the hosts (else the stale copy
  stays importable); files a host wrote itself (a run's outputs) stay."""
  checkout, _ = _checkout(tmp_path)
  for name in ('old_name.py', 'pkg/gone.py', 'pkg/kept.py'):
    (checkout / name).parent.mkdir(exist_ok=True)
    (checkout / name).write_text('')
  home, _, result = _tpu_setup(tmp_path, checkout)
  assert result.returncode == 0, result.stderr
  remote = home / 'secant-jax'
  (remote / 'runs' / 'sdei4').mkdir(parents=True)
  (remote / 'runs' / 'sdei4' / 'config.json').write_text('{}')
  (checkout / 'old_name.py').rename(checkout / 'new_name.py')
  (checkout / 'pkg' / 'gone.py').unlink()
  _, _, result = _tpu_setup(tmp_path, checkout)
  assert result.returncode == 0, result.stderr
  assert sorted(str(p.relative_to(remote)) for p in remote.rglob('*.py')) == [
      'new_name.py', 'pkg/kept.py']
  assert (remote / 'runs' / 'sdei4' / 'config.json').read_text() == '{}'


def test_tpu_setup_outside_a_git_checkout_says_to_clone(tmp_path):
  checkout, _ = _checkout(tmp_path)
  shutil.rmtree(checkout / '.git')
  _, calls, result = _tpu_setup(tmp_path, checkout)
  assert result.returncode == 2 and calls == []
  assert 'is not a git checkout: clone the repository and run setup from the clone' in (
      result.stderr)


@pytest.mark.parametrize('verb, module, flag, log', [
    ('run', 'secant_jax.main', '--config.distributed=True', 'secant-run.log'),
    ('encode', 'secant_jax.data.encode', '--distributed', 'secant-encode.log')])
def test_tpu_run_and_encode_start_the_module_on_every_host_as_one_of_several(
    tmp_path, verb, module, flag, log):
  """The arguments arrive as given (quoted through ssh), then the flag that makes the
  process one of several hosts; the output goes to the verb's log in the host's home."""
  home = tmp_path / 'host'
  (home / 'secant-jax' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'secant-jax' / '.venv' / 'bin' / 'activate').write_text('')
  _stand_in(tmp_path, 'gcloud', f'''echo "gcloud $*" >> {tmp_path / 'calls'}
for a in "$@"; do case "$a" in --command=*) cmd="${{a#--command=}}";; esac; done
cd {home} && bash -c "$cmd"
''')
  _stand_in(tmp_path, 'python', 'printf "[%s]" "$@"; echo\n')
  subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_pod.sh'), verb, '--out',
                  'gs://b/my latents', "--note=it's"], check=True,
                 env={**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}',
                      'HOME': str(home), 'TPU_NAME': 'secant', 'ZONE': 'us-central2-b'})
  assert (tmp_path / 'calls').read_text().startswith(
      'gcloud compute tpus tpu-vm ssh secant --zone=us-central2-b --worker=all --command=')
  for _ in range(100):  # the module runs under nohup, in the background
    if (home / log).exists() and (home / log).read_text().endswith('\n'):
      break
    time.sleep(0.05)
  assert (home / log).read_text() == (
      f"[-m][{module}][--out][gs://b/my latents][--note=it's][{flag}]\n")


def _fashion_mnist_calls(tmp_path, check=True, **env):
  """The commands launch/fashion_mnist.sh runs (with the memory fractions each process
  gets under JAX's two names for it), a stand-in for python that makes the outputs each
  stage is checked by (a training stage: its checkpoint of num_train_steps, 10 unless
  set)."""
  tmp_path.mkdir(exist_ok=True)
  log = tmp_path / 'calls'
  _stand_in(tmp_path, 'python', f'''echo "{_MEMORY_FRACTIONS} $*" >> {log}
previous= workdir= steps=10
for arg in "$@"; do
  case "$arg" in
    --workdir=*) workdir=${{arg#--workdir=}};;
    --config.num_train_steps=*) steps=${{arg#--config.num_train_steps=}};;
  esac
  [ "$previous" = --out ] && mkdir -p "$arg" && touch "$arg/accuracy.json"
  previous=$arg
done
[ -n "$workdir" ] && mkdir -p "$workdir/ema" "$workdir/checkpoints/$steps"
exit 0
''')
  process = subprocess.run(['bash', os.path.join(REPO, 'launch', 'fashion_mnist.sh'),
                            str(tmp_path / 'runs')], check=check, capture_output=True,
                           text=True, env={**_without_memory_fraction(os.environ),
                                           'PYTHON': str(tmp_path / 'python'), **env})
  if not check:
    return process
  calls = log.read_text().splitlines()
  log.unlink()
  stage = lambda call: ('classifier' if 'fmnist_features' in call else
                        re.search(r'--workdir=\S*/runs/(\w+)', call).group(1))
  return [(' '.join(call.split()[:2]), stage(call)) for call in calls]


def test_fashion_mnist_script_runs_stages_two_at_a_time_or_one_and_checks_finished_ones(
    tmp_path):
  """Two processes at a time, each allowed 45% of a GPU's memory (JAX would take 75%
  each); with PARALLEL=0 one at a time (a TPU VM's chips are one process's); with the
  caller's memory fraction, under either name, and not the default beside it; the same
  command again runs the training stages (which check their settings and train on where
  asked for more steps) and the table (which resumes), not the finished classifier; a
  teacher that trains on refuses the secant stages trained from it."""
  calls = _fashion_mnist_calls(tmp_path / 'a')
  stages = [stage for _, stage in calls]
  assert sorted(stages) == ['classifier', 'sdei', 'stee', 'table', 'teacher']
  assert stages[-1] == 'table' and stages.index('teacher') < min(stages.index('sdei'),
                                                                 stages.index('stee'))
  assert {fraction for fraction, _ in calls} == {'0.45 -'}
  again = [stage for _, stage in _fashion_mnist_calls(tmp_path / 'a')]
  assert again[0] == 'teacher' and sorted(again[1:3]) == ['sdei', 'stee'] and again[3:] == [
      'table']
  refused = _fashion_mnist_calls(tmp_path / 'a', check=False, TEACHER_TRAIN_STEPS='12')
  assert refused.returncode == 1 and refused.stderr == (
      f"The teacher in {tmp_path / 'a' / 'runs'}/teacher has trained further, and "
      f"{tmp_path / 'a' / 'runs'}/sdei was trained from its earlier weights: delete it to "
      'train it from this teacher, or use a new RUNS_DIR.\n')
  assert _fashion_mnist_calls(tmp_path / 'b', PARALLEL='0') == [
      ('- -', 'classifier'), ('- -', 'teacher'), ('- -', 'sdei'), ('- -', 'stee'),
      ('- -', 'table')]
  assert {fraction for fraction, _ in _fashion_mnist_calls(
      tmp_path / 'c', XLA_CLIENT_MEM_FRACTION='0.3')} == {'0.3 -'}
  assert {fraction for fraction, _ in _fashion_mnist_calls(
      tmp_path / 'd', XLA_PYTHON_CLIENT_MEM_FRACTION='0.3')} == {'- 0.3'}


def _stage_stand_in(tmp_path, waiting, failing=''):
  """A python for launch/fashion_mnist.sh whose stages in `waiting` run until SIGTERM (then
  log 'stopped STAGE' and exit 75, as a training run stopped on SIGTERM does), the stage
  `failing` exits 1, and the others finish at once; each logs 'started STAGE PID'."""
  log = tmp_path / 'stages'
  _stand_in(tmp_path, 'python', f'''stage=classifier
for arg in "$@"; do case "$arg" in --workdir=*/runs/*) stage=${{arg##*/}};; esac; done
echo "started $stage $$" >> {log}
case " {' '.join(waiting)} " in
  *" $stage "*)
    trap 'kill $pause; echo "stopped $stage" >> {log}; exit 75' TERM
    sleep 60 & pause=$!
    wait $pause;;
esac
[ "$stage" = "{failing}" ] && exit 1
[ "$stage" = teacher ] && mkdir -p {tmp_path}/runs/teacher/checkpoints/10
exit 0
''')
  return log


def _started(log, stages, timeout=30):
  """{stage: pid} once every stage in `stages` has logged that it started."""
  for _ in range(timeout * 20):
    lines = log.read_text().splitlines() if log.exists() else []
    started = {l.split()[1]: int(l.split()[2]) for l in lines if l.startswith('started')}
    if set(stages) <= set(started):
      return started
    time.sleep(0.05)
  raise AssertionError(f'{stages} did not all start: {lines}')


@pytest.mark.parametrize('waiting', [('classifier', 'teacher'), ('classifier', 'sdei', 'stee')])
def test_ctrl_c_stops_every_running_stage_as_a_preemption_does(tmp_path, waiting,
                                                               from_a_terminal):
  """A terminal's Ctrl-C (SIGINT to the script's process group) during the teacher, or
  during the two secant stages: each stage still running gets SIGTERM (it saves and stops)
  and the script waits for them. Stages in the background ignored SIGINT, and trained on
  after the script had ended."""
  log = _stage_stand_in(tmp_path, waiting)
  script = subprocess.Popen(from_a_terminal(['bash', os.path.join(REPO, 'launch',
                                                                  'fashion_mnist.sh'),
                                             str(tmp_path / 'runs')]),
                            start_new_session=True,
                            env={**os.environ, 'PYTHON': str(tmp_path / 'python')})
  pids = _started(log, waiting)
  os.killpg(script.pid, signal.SIGINT)
  assert script.wait(timeout=30) == 130
  assert sorted(l for l in log.read_text().splitlines() if l.startswith('stopped')) == [
      f'stopped {stage}' for stage in sorted(waiting)]
  for pid in pids.values():
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_a_failed_stage_stops_the_stages_beside_it(tmp_path):
  log = _stage_stand_in(tmp_path, ('classifier',), failing='teacher')
  process = subprocess.run(['bash', os.path.join(REPO, 'launch', 'fashion_mnist.sh'),
                            str(tmp_path / 'runs')], timeout=30,
                           env={**os.environ, 'PYTHON': str(tmp_path / 'python')})
  assert process.returncode == 1
  lines = log.read_text().splitlines()
  assert [l.split()[:2] for l in lines if l.startswith('started')] in (
      [['started', 'classifier'], ['started', 'teacher']],
      [['started', 'teacher'], ['started', 'classifier']])
  assert 'stopped classifier' in lines
