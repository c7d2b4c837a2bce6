"""Several hosts, as on a pod, emulated by two processes of two CPU devices each, joined by
jax.distributed (gloo collectives) through `--config.distributed=True` and
`config.cluster`. The trainer with parameters FSDP-sharded across both processes: SIGTERM
to one of them stops both at one step with one checkpoint (a comparison: at one batch, with
its progress saved); resumed, the run ends
bit-identical to a straight one, and resumed on one process of four devices instead, equal
to it up to the collectives' rounding. FID's feature statistics over batches whose rows
are split between the processes, and those rows' images; a comparison's saved progress,
resumed where both processes saved, and its kept reference solutions; images encoded to
latents by both processes, each writing its share of the shards. An error on one process
(training, encoding) ends both at once."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from secant_jax import config as config_lib
from secant_jax.convert import common
from secant_jax.data import pipeline
from secant_jax.train import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4  # in all, split evenly over the processes


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(argv, processes=2):
  """`argv(port, process index)` on each of `processes` processes, NUM_DEVICES CPU devices
  among them (as launch/tpu_pod.sh runs one command on every host)."""
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': os.environ['XLA_FLAGS'] +  # the suite's, these devices
         f' --xla_force_host_platform_device_count={NUM_DEVICES // processes}'}
  return [subprocess.Popen([sys.executable, *argv(port, i)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env)
          for i in range(processes)]


def _train(workdir, steps, processes=2, extra=()):
  cluster = lambda port, i: [
      '--config.distributed=True', f'--config.cluster.coordinator_address=localhost:{port}',
      f'--config.cluster.num_processes={processes}', f'--config.cluster.process_id={i}']
  return _launch(lambda port, i: [
      '-m', 'secant_jax.main', f'--config={REPO}/configs/demo.py', f'--workdir={workdir}',
      '--config.mode=train', f'--config.num_train_steps={steps}', '--config.log_every=1',
      '--config.batch_size=8', '--config.checkpoint_every=100000', '--config.sample_every=2',
      '--config.num_sample_images=4', f'--config.fsdp={NUM_DEVICES}',
      '--config.model.hidden_size=64', '--config.model.depth=1', '--config.model.num_heads=2',
      *extra, *(cluster(port, i) if processes > 1 else [])], processes)


def _finish(procs, stopped=False):
  """Each process's output, once all have exited 0, or, when SIGTERM `stopped` the run,
  process 0 with 75 (resume me) and the others 0."""
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, output) in enumerate(zip(procs, outputs)):
    assert p.returncode == (75 if stopped and i == 0 else 0), f'process {i}:\n{output[-3000:]}'
  return outputs


def _both_fail_at_once(procs):
  """Each process's output, once all have exited 1 within 150 s (processes that wait out
  JAX's 300 s shutdown barrier fail this; they are killed then)."""
  try:
    outputs = [p.communicate(timeout=150)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [1] * len(procs), '\n'.join(
      output[-2000:] for output in outputs)
  return outputs


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit())


def _ema(workdir):
  return traverse_util.flatten_dict(common.load_variables(os.path.join(workdir, 'ema')))


@pytest.mark.slow
def test_sigterm_to_one_host_stops_all_at_one_step_and_the_resumed_run_is_exact(tmp_path):
  """...also when it resumes on one process (a smaller slice, one GPU node): the data
  pipeline's global batches do not depend on the number of processes."""
  preempted, on_one = tmp_path / 'preempted', tmp_path / 'resumed-on-one-process'
  procs = _train(preempted, 100000)
  for line in procs[0].stdout:
    if 'loss=' in line:  # a logged step: both processes are training
      break
  procs[1].send_signal(signal.SIGTERM)
  _finish(procs, stopped=True)
  (stop,) = _checkpoint_steps(preempted)
  assert 0 < stop < 100000
  assert not os.path.exists(preempted / 'ema')  # exported only when the run completes
  shutil.copytree(preempted, on_one)

  _finish(_train(preempted, stop + 3))
  _finish(_train(on_one, stop + 3, processes=1))
  _finish(_train(tmp_path / 'straight', stop + 3))
  assert _checkpoint_steps(preempted) == _checkpoint_steps(tmp_path / 'straight') == [
      stop + 3]
  straight, resumed = _ema(tmp_path / 'straight'), _ema(preempted)
  assert len(straight) > 10 and straight.keys() == resumed.keys()
  for path, value in straight.items():
    np.testing.assert_array_equal(resumed[path], value, err_msg=str(path))
  for path, value in _ema(on_one).items():  # same program; collectives in one process
    np.testing.assert_allclose(value, straight[path], rtol=1e-6, atol=1e-7, err_msg=str(path))
  for workdir, launches in ((preempted, 2), (tmp_path / 'straight', 1)):  # process 0 writes
    events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
    assert len(events) == launches, events


@pytest.mark.slow
def test_an_error_on_one_process_ends_both_at_once(tmp_path):
  """With seed 29 and 9 classes, process 1's fourth slice of digits has a label (9) the
  model has none for, process 0's first ten slices not: process 1 raises at step 4, process
  0 waits for it in that step's collectives. Both end, status 1 (process 0's collective
  fails), where before they sat 5 minutes in JAX's shutdown barrier and then aborted."""
  c = config_lib.base_config()
  c.data.name = 'digits'
  maxima = [[next(it)['y'].max() for _ in range(10)]
            for it, _ in (pipeline.build(c.data, 8, 29, process=(p, 2)) for p in (0, 1))]
  assert max(maxima[0]) < 9 and max(maxima[1][:3]) < 9 <= maxima[1][3]  # what it relies on
  outputs = _both_fail_at_once(_train(tmp_path, 10, extra=['--config.seed=29',
                                                        '--config.model.num_classes=9']))
  assert ("ValueError: Dataset 'digits' gives the class label 9, and the model has 9 "
          'classes') in outputs[1]
  assert '[3] ' in outputs[0] and '[4] ' not in outputs[0]  # process 0 logged step 3 only


def test_unset_cluster_settings_are_left_to_jax_and_process_zero_is_set(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  cluster = config_lib.base_config().cluster
  parallel.initialize_distributed(cluster)
  cluster.update(dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=0))
  parallel.initialize_distributed(cluster)
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None),
                   dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=0)]


def test_feature_statistics_of_batches_split_over_processes_are_the_whole_batches(tmp_path):
  """FID's streamed sums when each process holds only its rows of every batch (and a last
  batch is trimmed): each process counts its own rows, μ and Σ are over all of them; the
  images of those rows are written once each, by the process that holds them."""
  import multihost_fid_worker as worker  # pylint: disable=import-outside-toplevel
  outputs = _finish(_launch(lambda port, i: ['tests/multihost_fid_worker.py', str(port),
                                             str(i), str(tmp_path)]))
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  assert [r['count'] for r in results] == [12, 7]  # rows 0-5, 6-11; then 0-5, 6
  features = np.concatenate([b[:n] for b, n in zip(worker.BATCHES, worker.NUM_VALID)]
                            ).astype(np.float64)
  for r in results:
    np.testing.assert_allclose(r['mu'], features.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r['sigma'], np.cov(features, rowvar=False), rtol=1e-6,
                               atol=1e-7)
  assert sorted(os.listdir(tmp_path)) == [f'{i:06d}.png' for i in range(19)]
  for i, expected in enumerate(worker.pixels(features.astype(np.float32))):
    with Image.open(tmp_path / f'{i:06d}.png') as image:
      np.testing.assert_array_equal(np.asarray(image), expected[..., 0])


def test_a_comparison_resumes_where_every_process_saved_and_shares_references(tmp_path):
  """Progress files are per process; when one process stopped before a save the other
  made, both resume after the last save they both have, each with its own arrays. A kept
  reference batch is the whole batch, its rows from both processes, read back by each."""
  _finish(_launch(lambda port, i: ['tests/multihost_compare_worker.py', str(port), str(i),
                                   str(tmp_path)]))
  results = [json.loads((tmp_path / f'result_{i}.json').read_text()) for i in range(2)]
  batch = [float(r) for r in range(8)]
  assert results == [{'done': 8, 'rows': [0, 8], 'reference': batch, 'never_kept': None},
                     {'done': 8, 'rows': [1, 8], 'reference': batch, 'never_kept': None}]
  assert os.listdir(tmp_path / 'references') == ['reference.0.npz']


def _encode_on_two(tmp_path, out):
  """`data.encode --distributed` of tmp_path/images with the VAE in tmp_path/vae, on two
  processes."""
  return _launch(lambda port, i: [
      '-m', 'secant_jax.data.encode', '--images', str(tmp_path / 'images'), '--vae',
      str(tmp_path / 'vae'), '--out', str(out), '--image-size', '16', '--shard-size', '1',
      '--batch-size', '2', '--distributed', f'--coordinator-address=localhost:{port}',
      '--num-processes=2', f'--process-id={i}'])


def test_images_encoded_on_two_processes_are_the_records_one_process_writes(tmp_path):
  """`data.encode --distributed`: process i writes the shards k with k mod 2 = i, process 0
  the manifest; the records are those of an encoding on one process. Stopped with a shard
  of process 1's missing, the same command writes that shard alone."""
  # pylint: disable=import-outside-toplevel,protected-access
  import test_encode  # its image folder, VAE and reading of records
  test_encode._image_folder(tmp_path / 'images')
  test_encode._vae_directory(tmp_path / 'vae')
  test_encode._encode(tmp_path, tmp_path / 'one', '--batch-size', '8', '--shard-size', '1')
  out = tmp_path / 'two'

  def encode_on_two():
    return _finish(_encode_on_two(tmp_path, out))

  outputs = encode_on_two()
  assert f'5 latents → {out} (raw;' in outputs[0] and 'latents →' not in outputs[1]
  assert 'process 0 of 2 writes shards [0, 2, 4] of 5' in outputs[0]
  assert 'process 1 of 2 writes shards [1, 3] of 5' in outputs[1]
  shards = [f'latents-{k:05d}.array_record' for k in range(5)]
  assert json.loads((out / 'manifest.json').read_text()) == {'records': 5, 'shards': shards}
  one, two = test_encode._records(tmp_path / 'one'), test_encode._records(out)
  assert two[1] == one[1] == [0, 0, 0, 1, 1]
  np.testing.assert_allclose(two[0], one[0], atol=2e-3)  # float16 records, other batches

  written = {name: os.stat(out / name).st_mtime_ns for name in shards}
  os.remove(out / shards[3])
  os.remove(out / 'manifest.json')
  outputs = encode_on_two()
  assert 'keeping the 4 shards' in outputs[0] and 'writes shards [] of 5' in outputs[0]
  assert 'process 1 of 2 writes shards [3] of 5' in outputs[1]
  assert {name: os.stat(out / name).st_mtime_ns == written[name] for name in shards} == {
      name: name != shards[3] for name in shards}
  np.testing.assert_array_equal(test_encode._records(out)[0], two[0])


def test_an_image_one_process_cannot_read_ends_both_at_once(tmp_path):
  """The second image, in shard 1 (process 1's), is not an image: process 1 raises, process
  0 then fails in its first collective. Both end, status 1, where before both aborted after
  5 minutes in JAX's shutdown barrier (measured: 302 s)."""
  # pylint: disable=import-outside-toplevel,protected-access
  import test_encode
  test_encode._image_folder(tmp_path / 'images')
  test_encode._vae_directory(tmp_path / 'vae')
  (tmp_path / 'images' / 'cat' / '2.jpg').write_bytes(b'not a jpeg')
  outputs = _both_fail_at_once(_encode_on_two(tmp_path, tmp_path / 'out'))
  assert 'process 1 of 2 writes shards [1, 3] of 5' in outputs[1]
  assert f"ValueError: {tmp_path / 'images' / 'cat' / '2.jpg'} could not be read as an " \
         'image' in outputs[1]


def _compare(workdir, teacher, num_samples):
  """Compare mode of `teacher` (a converted tiny Fashion-MNIST SiT) on two processes: its
  Euler and Heun at 1 NFE against its adaptive reference, in batches of 8."""
  return _launch(lambda port, i: [
      '-m', 'secant_jax.main', f'--config={REPO}/configs/fashion_mnist.py:stage=compare,'
      'model=tiny', f'--workdir={workdir}', f'--config.teacher_checkpoint={teacher}',
      '--config.compare.teacher=', '--config.compare.secants=', '--config.fid.fmnist=',
      "--config.compare.teacher_nfe=(1,)", f'--config.compare.num_samples={num_samples}',
      '--config.compare.batch_size=8', '--config.distributed=True',
      f'--config.cluster.coordinator_address=localhost:{port}',
      '--config.cluster.num_processes=2', f'--config.cluster.process_id={i}'])


@pytest.mark.slow
def test_sigterm_to_one_host_stops_a_comparison_at_one_batch_and_it_resumes(tmp_path):
  """Both save after the same batch (JAX's preemption sync, on the batch count) and stop,
  process 0 with 75; the same command resumes there. Before, nothing asked JAX's preemption
  notifier, which takes SIGTERM on several processes: the comparison ran on (here to its
  end, both status 0; on a pod to the hard kill that follows the notice, its batches since
  the last timed save, every eval_save_seconds, lost), and a Slurm job at its time limit
  was not queued again (launch/gpu_slurm.sh requeues on 75)."""
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  from secant_jax.models import registry  # pylint: disable=import-outside-toplevel
  network = registry.build(fashion_mnist.get_config('stage=compare,model=tiny').model,
                           guided=False)
  rng = np.random.default_rng(0)  # off the zero-initialised output layer: a non-zero tangent
  common.save(jax.tree_util.tree_map(
      lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
      network.init(jax.random.key(0))), tmp_path / 'teacher')
  procs = _compare(tmp_path / 'table', tmp_path / 'teacher', 800)
  for line in procs[0].stdout:
    if 'comparison: 8 / 800 samples' in line:  # both are past the first batch
      break
  procs[1].send_signal(signal.SIGTERM)
  outputs = _finish(procs, stopped=True)
  saves = sorted(f for f in os.listdir(tmp_path / 'table') if f.startswith('progress'))
  done = int(saves[0].split('.')[2])
  assert saves == [f'progress.process_{i}.{done}.npz' for i in range(2)]  # the same batch
  assert 8 < done < 800
  assert (f'Stopped on SIGTERM after {done} of 800 samples, with the progress saved in '
          f'{tmp_path}/table; the same command resumes it.') in outputs[0]
  outputs = _finish(_compare(tmp_path / 'table', tmp_path / 'teacher', 800))
  assert f'comparison: resumed after {done} / 800 samples' in outputs[0]
  assert (tmp_path / 'table' / 'table.md').is_file()


def _train_with_fid(workdir, classifier):
  """A tiny Fashion-MNIST teacher trained 2 steps on two processes, then an FD-FMNIST of
  800 samples (Heun at 2 NFE, batches of 8) as its training FID."""
  return _launch(lambda port, i: [
      '-m', 'secant_jax.main', f'--config={REPO}/configs/fashion_mnist.py:stage=teacher,'
      'model=tiny', f'--workdir={workdir}', '--config.num_train_steps=2',
      '--config.batch_size=8', '--config.log_every=1', '--config.sample_every=0',
      '--config.eval_every=2', '--config.teacher_sample_nfe=2', f'--config.fid.fmnist={classifier}',
      '--config.fid.train_num_samples=800', '--config.fid.batch_size=8',
      '--config.fid.num_reference_images=64', '--config.distributed=True',
      f'--config.cluster.coordinator_address=localhost:{port}',
      '--config.cluster.num_processes=2', f'--config.cluster.process_id={i}'])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='apt-get install dataset-fashion-mnist')
def test_sigterm_to_one_host_during_a_training_fid_stops_both_at_one_batch_and_it_resumes(
    tmp_path):
  """The FID's batches are save points of the run's preemption sync, numbered on from its
  steps': both processes save the FID's sums after the same batch and the checkpoint at its
  step, and stop; the same command finishes the FID from there, then ends the run. Before,
  the FID ran to its end first (at scale, past a preemption's notice)."""
  from secant_jax.evaluation import fmnist_features  # pylint: disable=import-outside-toplevel
  common.save(jax.tree_util.tree_map(np.asarray, fmnist_features.Classifier().init(
      jax.random.key(0), np.zeros((1, 32, 32, 1), np.uint8))), tmp_path / 'classifier')
  run = tmp_path / 'run'
  procs = _train_with_fid(run, tmp_path / 'classifier')
  for line in procs[0].stdout:
    if 'fd_fmnist samples: 80 / 800' in line:  # both are in the FID
      break
  procs[1].send_signal(signal.SIGTERM)
  outputs = _finish(procs, stopped=True)
  saves = sorted(os.listdir(run / 'fid_progress'))
  done = int(saves[0].split('.')[2])
  assert saves == [f'progress.process_{i}.{done}.npz' for i in range(2)]  # the same batch
  assert 80 <= done < 800 and _checkpoint_steps(run) == [2]
  assert 'Stopped on SIGTERM at step 2 of 2 during its FID' in outputs[0]
  assert not os.path.exists(run / 'ema')
  outputs = _finish(_train_with_fid(run, tmp_path / 'classifier'))
  assert f'fd_fmnist samples: resumed after {done} / 800' in outputs[0]
  assert 'fd_fmnist samples: 800 / 800' in outputs[0]
  assert os.listdir(run / 'fid_progress') == [] and os.path.isdir(run / 'ema')
