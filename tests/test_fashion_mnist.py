"""Fashion-MNIST: the IDX reader, the real Debian files, and the paper's table in
miniature at CPU size (teacher → SDEI and STEE secant models → classifier → table)."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import traverse_util

from secant_jax import compare_mode
from secant_jax import main as main_lib
from secant_jax import sampling
from secant_jax import secant
from secant_jax.convert import common
from secant_jax.data import fashion_mnist
from secant_jax.evaluation import fmnist_features
from secant_jax.models import precond
from secant_jax.train import loop
from secant_jax.train import recipe
from secant_jax.train import step as step_lib

REAL = fashion_mnist.DEFAULT_DIR
needs_real_data = pytest.mark.skipif(
    not os.path.isdir(REAL), reason='apt-get install dataset-fashion-mnist')


def _write_idx(path, array, gzipped):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
  data = header + array.astype(np.uint8).tobytes()
  epath.Path(path + ('.gz' if gzipped else '')).write_bytes(gzip.compress(data) if gzipped
                                                            else data)


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_idx_files_gzipped_or_not_become_padded_records(where, tmp_path, request):
  root = str(tmp_path) if where == 'local' else request.getfixturevalue('gcs_bucket')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  _write_idx(f'{root}/train-images-idx3-ubyte', images, gzipped=True)
  _write_idx(f'{root}/train-labels-idx1-ubyte', np.arange(5), gzipped=False)
  source = fashion_mnist.FashionMnistSource(root, 'train')
  assert len(source) == 5
  record = source[3]
  assert record['x'].shape == (32, 32, 1) and record['y'] == 3
  np.testing.assert_allclose(record['x'][2:30, 2:30, 0], images[3] / 127.5 - 1.0, atol=1e-6)
  assert np.all(record['x'][:2] == -1.0) and np.all(record['x'][:, 30:] == -1.0)


def test_idx_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r't10k-images-idx3-ubyte\(.gz\) does not exist;'
                                              r' install it with `apt-get install '
                                              r'dataset-fashion-mnist`'):
    fashion_mnist.load(str(tmp_path), 'test')
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(b'\x89PNG\r\n')
  with pytest.raises(ValueError, match=r'is not an IDX file of uint8'):
    fashion_mnist.read_idx(str(tmp_path / 'train-images-idx3-ubyte'))
  with pytest.raises(ValueError, match=r"Unknown Fashion-MNIST split 'val'"):
    fashion_mnist.load(str(tmp_path), 'val')


def test_the_classifiers_counts_are_refused_below_one(tmp_path, capsys):
  for flag in ('--epochs', '--batch_size'):  # was: IndexError, ZeroDivisionError after the load
    with pytest.raises(SystemExit):
      fmnist_features.main(['--out', str(tmp_path), flag, '0'])
    assert f"argument {flag}: expected a positive integer, got '0'" in capsys.readouterr().err


@needs_real_data
def test_the_debian_files():
  for split, count in (('train', 60_000), ('test', 10_000)):
    images, labels = fashion_mnist.load(REAL, split)
    assert images.shape == (count, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [count // 10] * 10)


def _stage_config(stage, workdir, model='tiny', **kwargs):
  from configs import fashion_mnist as fmnist_config  # pylint: disable=import-outside-toplevel
  c = fmnist_config.get_config(f'stage={stage},model={model},teacher={workdir / "teacher"},'
                               + ','.join(f'{k}={v}' for k, v in kwargs.items()))
  c.model.dtype = 'float32'
  c.batch_size, c.log_every, c.sample_every = 16, 5, 0
  c.optimizer.warmup_steps = 0
  return c


def _distance(a, b):
  """The L2 distance of two networks' parameters, over those both have (a secant model
  with embedded guidance adds its scale's embedder to the teacher's)."""
  a, b = (traverse_util.flatten_dict(v['params']) for v in (a, b))
  return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k])) ** 2)
                           for k in a.keys() & b.keys())))


def _falls(history):
  losses = [h['loss'] for h in history]
  return np.mean(losses[-2:]) < np.mean(losses[:2]), losses


@needs_real_data
def test_teacher_secant_stages_and_the_table_on_cpu(tmp_path):
  teacher = _stage_config('teacher', tmp_path)
  teacher.num_train_steps, teacher.optimizer.learning_rate = 60, 1e-3
  _, history = loop.train_and_evaluate(teacher, tmp_path / 'teacher')
  falls, losses = _falls(history)
  assert falls, losses
  for variant in ('sdei', 'stee'):
    c = _stage_config('secant', tmp_path, variant=variant, steps=2)
    c.num_train_steps, c.optimizer.learning_rate, c.log_every = 60, 1e-3, 10
    state, history = loop.train_and_evaluate(c, tmp_path / variant)
    falls, losses = _falls(history)
    assert falls, (variant, losses)
    # The EMA is warmed up: it follows the trained weights, not the teacher's it started
    # from (at decay 0.999 without warm-up, 94% of it would still be the teacher's).
    teacher_weights = common.load_variables(tmp_path / 'teacher' / 'ema')
    to_trained, teacher_to_trained = (_distance(v, state.params)
                                      for v in (state.ema_params, teacher_weights))
    assert to_trained < 0.25 * teacher_to_trained, (variant, to_trained, teacher_to_trained)

  train_images, train_labels = fashion_mnist.load(REAL, 'train')
  test_images, test_labels = fashion_mnist.load(REAL, 'test')
  variables, accuracies = fmnist_features.train(
      (train_images[:4096], train_labels[:4096]), (test_images[:1000], test_labels[:1000]),
      steps=64, batch_size=32, log=lambda _: None)
  assert accuracies[-1] > 0.6, accuracies  # 10 classes: chance is 0.1
  common.save(variables, tmp_path / 'classifier')

  c = _stage_config('compare', tmp_path)
  c.fid.update(dict(fmnist=str(tmp_path / 'classifier'), batch_size=8,
                    num_reference_images=64))
  c.compare.update(dict(secants=f'sdei={tmp_path / "sdei"},stee={tmp_path / "stee"}',
                        teacher_nfe=(1, 2, 3), secant_steps=(1,), num_samples=12,
                        batch_size=8))
  c.eval_save_seconds = 0.0
  rows = main_lib.run(c, tmp_path / 'table')
  assert [(r['sampler'], r['nfe']) for r in rows] == [
      ('teacher adaptive reference', None),
      ('teacher Euler', 1), ('teacher Euler', 2), ('teacher Euler', 3),
      ('teacher Heun', 1), ('teacher Heun', 2), ('teacher Heun', 3),
      ('secant sdei', 1), ('secant sdei', 2), ('secant stee', 1), ('secant stee', 2)]
  # (the 2-step rows: each run is also sampled with the step count it was trained for)
  assert rows[0]['error'] == 0.0 and all(r['error'] > 0 for r in rows[1:])
  assert rows[1]['error'] == rows[4]['error']  # Heun at one evaluation is an Euler step
  assert all(np.isfinite(r['fd_fmnist']) and r['fd_fmnist'] > 0 for r in rows)
  with open(tmp_path / 'table' / 'table.json') as f:
    assert json.load(f)['rows'] == rows
  table = (tmp_path / 'table' / 'table.md').read_text()
  assert '| sampler | NFE | error to reference | FD-FMNIST |' in table and 'FID' not in table
  assert len(os.listdir(tmp_path / 'table' / 'samples')) == len(rows)
  assert os.path.isfile(tmp_path / 'table' / 'fd_fmnist_reference_test.npz')
  assert sorted(f for f in os.listdir(tmp_path / 'table') if f.startswith('progress')) == [
      'progress.process_0.12.npz', 'progress.process_0.8.npz']
  mtime = os.path.getmtime(tmp_path / 'table' / 'progress.process_0.12.npz')
  assert main_lib.run(c, tmp_path / 'table') == rows  # the config's stamp read back: resumed
  assert os.path.getmtime(tmp_path / 'table' / 'progress.process_0.12.npz') == mtime
  retrained = jax.tree_util.tree_map(lambda p: p * 1.01,
                                     common.load_variables(tmp_path / 'sdei' / 'ema'))
  common.save(retrained, tmp_path / 'sdei' / 'ema', overwrite=True)
  with pytest.raises(ValueError, match=r'progress.process_0.12.npz holds the progress of a '
                                       r'different evaluation \(it differs in '
                                       r'weights.secant sdei\)'):
    main_lib.run(c, tmp_path / 'table')


def _fixed_sdei_losses(config, network, teacher_variables, variables_list, count=256):
  """SDEI's loss of each of `variables_list` on the first `count` test images with fixed
  noise, times and labels; one compilation, on one device (the trainer's state is
  replicated over the suite's eight CPU devices, on which a jitted loss runs eight times)."""
  records = fashion_mnist.FashionMnistSource(REAL, 'test')
  x = np.stack([records[i]['x'] for i in range(count)])
  labels = np.asarray([records[i]['y'] for i in range(count)], np.int32)
  task = recipe.make_task(config, network)
  teacher_fn = step_lib.teacher_tangent(task, network.apply, jax.device_get(teacher_variables))
  k_time, k_noise = jax.random.split(jax.random.key(100))
  times = secant.sample_time_pairs(k_time, count, 'sdei', task.num_steps, task.path)
  noise = jax.random.normal(k_noise, x.shape)

  @jax.jit
  def loss(variables):
    secant_fn = precond.secant_from_network(
        task.path, lambda *a: network.apply(variables, *a), task.sigma_data)
    per_example, _ = secant.loss('sdei', secant_fn, teacher_fn, task.path, x, noise, times,
                                 labels, None)
    return jnp.mean(per_example)

  return [float(loss(jax.device_get(variables))) for variables in variables_list]


@needs_real_data
def test_edm_unet_teacher_and_secant_on_the_sigma_path(tmp_path, monkeypatch):
  teacher = _stage_config('teacher', tmp_path, model='unet-tiny')
  assert (teacher.model.family, teacher.path.name, teacher.model.num_classes) == (
      'edm_unet', 'edm', 10)
  teacher.num_train_steps, teacher.optimizer.learning_rate = 40, 1e-3
  _, history = loop.train_and_evaluate(teacher, tmp_path / 'teacher')
  falls, losses = _falls(history)
  assert falls, losses
  # Distillation from the conditional σ-path teacher. Its logged loss over a few dozen
  # steps is dominated by which σ each batch draws (no trend in 120 steps), so the fall is
  # measured on fixed test images, noises and times (measured 0.0107 → 0.0070).
  c = _stage_config('secant', tmp_path, model='unet-tiny', variant='sdei', steps=2)
  assert c.secant.guidance is None  # the U-Net has no guidance input
  c.num_train_steps, c.optimizer.learning_rate, c.log_every = 20, 3e-4, 10
  state, history = loop.train_and_evaluate(c, tmp_path / 'sdei')
  assert [h['step'] for h in history] == [10, 20]
  network, teacher_variables = loop.teacher_of(c, jax.random.key(0))
  before, after = _fixed_sdei_losses(c, network, teacher_variables,
                                     (teacher_variables, state.params))
  print(f"U-Net SDEI fixed-set loss {before:.4f} -> {after:.4f}")
  assert after < 0.8 * before, (before, after)

  c = _stage_config('compare', tmp_path, model='unet-tiny')
  c.fid.fmnist = ''  # no FD column: the DiT test above covers it
  c.compare.update(dict(secants=f'sdei={tmp_path / "sdei"}', teacher_nfe=(2,),
                        secant_steps=(1, 2), num_samples=8, batch_size=8, step_errors=(2,),
                        references=str(tmp_path / 'references')))
  rows = main_lib.run(c, tmp_path / 'table')
  assert [(r['sampler'], r['nfe']) for r in rows] == [
      ('teacher adaptive reference', None), ('teacher Euler', 2), ('teacher Heun', 1),
      ('secant sdei', 1), ('secant sdei', 2)]
  assert all(np.isfinite(r['error']) and r['error'] > 0 for r in rows[1:])
  assert [i for i, r in enumerate(rows) if 'step_errors' in r] == [1, 4]
  assert all(len(r['step_errors']) == 2 and min(r['step_errors']) > 0 for r in rows[1::3])
  table = (tmp_path / 'table' / 'table.md').read_text()
  assert '| sampler | NFE | 80 → 2.52 | 2.52 → 0.002 | all steps |' in table, table
  # The secant rows alone, elsewhere, against the kept reference: nothing solved again.
  monkeypatch.setattr(sampling, 'reference_sample', lambda *a: pytest.fail('solved again'))
  c.compare.teacher_nfe = ()
  c.compare.step_errors = ()
  main_columns = lambda rows: [{k: r[k] for k in ('sampler', 'nfe', 'error')} for r in rows]
  assert main_lib.run(c, tmp_path / 'secants-only') == main_columns([rows[0]] + rows[3:])


def test_compare_errors_name_the_fix(tmp_path):
  c = _stage_config('compare', tmp_path)
  with pytest.raises(FileNotFoundError, match=r'teacher has no config.json: pass the '
                                              r'--workdir of a training run'):
    main_lib.run(c, tmp_path / 'table')
  from configs import fashion_mnist as fmnist_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"Unknown stage 'distil'"):
    fmnist_config.get_config('stage=distil')
  with pytest.raises(ValueError, match=r"Unknown model name 'UNet': .* configs/fashion_mnist.py "
                                       r'also takes model=tiny, or the U-Nets model=unet, '
                                       r'model=unet-tiny.$'):  # was: only the DiT names
    fmnist_config.get_config('model=UNet')
  with pytest.raises(ValueError, match=r'^Config arguments steps, variant: stage=teacher does '
                                       r'not read them \(they choose the secant model that '
                                       r'stage=secant trains; .*\)\. Drop them, or give '
                                       r'stage=secant.$'):  # was: a teacher, trained silently
    fmnist_config.get_config('variant=stee,steps=2')
  with pytest.raises(ValueError, match=r'^Config arguments variant: stage=compare does not'):
    fmnist_config.get_config('stage=compare,variant=stee')
  assert fmnist_config.get_config('stage=secant,variant=stee,steps=2').secant.steps == 2
  with pytest.raises(ValueError, match=r'FD-FMNIST needs the Fashion-MNIST classifier'):
    fmnist_features.feature_network('')
  from configs import cifar10_edm  # pylint: disable=import-outside-toplevel
  c = cifar10_edm.get_config()  # compare mode is any config's: the teacher its own, converted
  c.mode = 'compare'
  with pytest.raises(FileNotFoundError, match=r'Converted checkpoint .*ckpt/edm-ddpmpp does '
                                              r'not exist; make it with'):
    main_lib.run(c, tmp_path / 'cifar-table')


def test_compare_runs_parse_and_unfinished_runs_are_named(tmp_path):
  assert compare_mode.parse_runs('sdei=runs/a,stee=runs/b,') == [('sdei', 'runs/a'),
                                                                 ('stee', 'runs/b')]
  with pytest.raises(ValueError, match=r"Bad secant run 'runs/a' in config.compare.secants: "
                                       r'expected name=run_dir'):
    compare_mode.parse_runs('runs/a')
  (tmp_path / 'config.json').write_text('{"seed": 3}')
  with pytest.raises(FileNotFoundError, match=r'ema does not exist: the run in .* has not '
                                              r'finished'):
    common.load_run(str(tmp_path))
