"""FID and Inception Score end to end on CPU: evaluate mode on the demo config with a
randomly initialised Inception (no weights ship), the reference computed once and cached;
an evaluation stopped by SIGTERM saves, and resumes to the result of one never stopped."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from secant_jax import evaluate_mode
from secant_jax import generate
from secant_jax import main as main_lib
from secant_jax import sampling
from secant_jax import stop_requests
from secant_jax.convert import common
from secant_jax.evaluation import fid
from secant_jax.evaluation import progress
from secant_jax.evaluation import reference_error
from secant_jax.evaluation import sample_quality
from secant_jax.models import inception
from secant_jax.models import registry
from secant_jax.train import loop
from secant_jax.train import parallel
from secant_jax.train import periodic_fid
from secant_jax.train import recipe


def _demo_evaluate_config(inception_dir):
  from configs import demo  # pylint: disable=import-outside-toplevel
  c = demo.get_config()
  with c.unlocked():
    del c.demo
  c.mode = 'evaluate'
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  c.fid.update(dict(inception=str(inception_dir), num_reference_images=16, num_samples=12,
                    batch_size=8))
  return c


def _save_inception(directory, seed):
  common.save(jax.tree_util.tree_map(np.asarray, jax.jit(inception.InceptionV3().init)(
      jax.random.key(seed), jnp.zeros((1, 8, 8, 3), jnp.uint8))), directory, overwrite=True)
  return directory


def _images(directory):
  names = sorted(os.listdir(directory))
  assert names == [f'{i:06d}.png' for i in range(len(names))]
  return np.stack([np.asarray(Image.open(os.path.join(directory, n))) for n in names])


def teacher_variables(network, seed):
  """Variables of a teacher whose tangent is not zero: a DiT starts at adaLN-zero (output 0),
  whose ODE is the identity, so its Heun solve and one step would be the same image."""
  params = traverse_util.flatten_dict(network.init(jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict(
      {k: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()})


def _first_batch(c, ema_dir):
  """The first 8 FID samples of evaluate mode (batch 0: key fold_in(key(seed + 2), 0)) as
  uint8 images [8, H, W], for a teacher run by Heun at config.teacher_sample_nfe
  evaluations, and its one secant step (what a teacher's samples must not be)."""
  network = recipe.make_network(c)
  task = recipe.make_task(c, network)
  variables = loop.load_into(network, ema_dir, jax.random.key(0))
  k_noise, k_label = jax.random.split(jax.random.fold_in(jax.random.key(c.seed + 2), 0))
  noise = jax.random.normal(k_noise, (8, *network.image_shape))
  labels = jax.random.randint(k_label, (8,), 0, c.model.num_classes)
  tangent = reference_error.teacher_tangent(network, variables, task, labels, None)
  solved = sampling.solve_with_nfe(tangent, noise, task.path, c.teacher_sample_nfe, 'heun')
  one_step = generate.sample(network, task, variables, c.secant, noise, labels)
  return [np.asarray(fid.to_uint8(x))[..., 0] for x in (solved, one_step)]


def test_evaluate_mode_computes_fid_and_inception_score(tmp_path, progress_saves,
                                                        monkeypatch):
  c = _demo_evaluate_config(_save_inception(tmp_path / 'inception', 0))
  c.eval_save_seconds = 0.0
  c.fid.image_dir = str(tmp_path / 'images')
  network = registry.build(c.model, guided=False)
  common.save(teacher_variables(network, 1), tmp_path / 'run' / 'ema')
  saved = progress_saves.done
  with pytest.raises(stop_requests.Stopped, match=r'Stopped on SIGTERM after 8 of 12 samples'):
    main_lib.run(c, tmp_path / 'run')
  assert sorted(os.listdir(tmp_path / 'run' / 'eval')) == ['progress.process_0.8.npz']
  assert sorted(os.listdir(tmp_path / 'images')) == [f'{i:06d}.png' for i in range(8)]
  common.save(teacher_variables(network, 2), tmp_path / 'run' / 'ema', overwrite=True)
  c.teacher_checkpoint = 'teacher'  # refused before the integration error is computed
  monkeypatch.setattr(evaluate_mode, 'integration_error', lambda *a: pytest.fail('computed'))
  with pytest.raises(ValueError, match=r'progress.process_0.8.npz holds the progress of a '
                                       r'different evaluation \(it differs in weights\): '
                                       r'finish that one with its settings, or delete'):
    main_lib.run(c, tmp_path / 'run')
  c.teacher_checkpoint = ''
  common.save(teacher_variables(network, 1), tmp_path / 'run' / 'ema', overwrite=True)
  c.matmul_precision = 'bfloat16'  # other products, other samples: not mixed with these
  with pytest.raises(ValueError, match=r'different evaluation \(it differs in '
                                       r'matmul_precision\)'):
    main_lib.run(c, tmp_path / 'run')
  c.matmul_precision = ''
  resumed = main_lib.run(c, tmp_path / 'run')
  assert saved == [8, 12]  # resumed after the first batch
  assert not any(f.startswith('progress') for f in os.listdir(tmp_path / 'run' / 'eval'))
  resumed_images = _images(tmp_path / 'images')
  result = main_lib.run(c, tmp_path / 'run')  # its saves deleted: evaluated afresh
  assert saved == [8, 12, 8, 12] and resumed == result
  images = _images(tmp_path / 'images')
  assert images.shape == (12, 8, 8)  # the digits' grey 8 × 8 images
  assert len({image.tobytes() for image in images}) == 12  # so an image in the wrong file shows
  np.testing.assert_array_equal(resumed_images, images)
  solved, one_step = _first_batch(c, tmp_path / 'run' / 'ema')
  np.testing.assert_allclose(images[:8], solved, atol=1)
  assert np.abs(images[:8].astype(int) - one_step).max() > 8  # the teacher's ODE, not a step
  assert np.isfinite(result['fid']) and result['fid'] > 0
  assert 1.0 <= result['inception_score'] <= 1008 and result['num_fid_samples'] == 12
  assert result['teacher_sample_nfe'] == 35  # the demo's config trains its teacher
  with open(tmp_path / 'run' / 'eval.json') as f:
    assert json.load(f)['fid'] == result['fid']
  with np.load(tmp_path / 'run' / sample_quality.REFERENCE_FILE.format(
      metric='fid', split='train')) as ref:
    assert ref['mu'].shape == (2048,) and ref['sigma'].shape == (2048, 2048)
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(tmp_path / 'run' / 'eval'))
  c.fid.num_samples = 8  # into the same folder: its last four images are the 12's
  with pytest.raises(ValueError, match=r'images holds 4 image file\(s\) not among the '
                                       r'8 samples of this evaluation \(000000.png to '
                                       r'000007.png\), the first 000008.png: .* Delete them, '
                                       r'or set config.fid.image_dir to an empty folder'):
    main_lib.run(c, tmp_path / 'run')


def test_an_evaluation_stopped_in_its_integration_error_resumes_to_the_same_result(
    tmp_path, progress_saves):
  c = _demo_evaluate_config('')  # no FID: the integration error alone
  network = registry.build(c.model, guided=False)
  common.save(teacher_variables(network, 1), tmp_path / 'teacher')
  for run in ('run', 'straight'):
    common.save(teacher_variables(network, 1), tmp_path / run / 'ema')
  c.update(dict(teacher_checkpoint=str(tmp_path / 'teacher'), num_eval_samples=16,
                eval_save_seconds=3600.0))  # saved for the stop alone
  c.compare.batch_size = 8
  saves = tmp_path / 'run' / 'eval' / 'integration_error'
  with pytest.raises(stop_requests.Stopped, match=re.escape(
      f'Stopped on SIGTERM after 8 of 16 samples, with the progress saved in {saves}; the '
      'same command resumes it.')):
    main_lib.run(c, tmp_path / 'run')
  assert os.listdir(saves) == ['progress.process_0.8.npz']
  resumed = main_lib.run(c, tmp_path / 'run')
  assert progress_saves.done == [8, 16] and os.listdir(saves) == []
  straight = main_lib.run(c, tmp_path / 'straight')
  assert resumed == straight and resumed['num_samples'] == 16
  assert 0 < resumed['teacher_heun'] == resumed['teacher_euler'] < 10  # 1 NFE: Euler's step


@pytest.mark.parametrize('name', ['000012.png', '12.png', '0000003.png', 'sample.jpg',
                                  'grid.JPEG', '000003.PNG'])
def test_image_dir_refuses_any_image_an_evaluator_would_count_that_is_not_ours(tmp_path,
                                                                               name):
  (tmp_path / 'deep').mkdir()
  for keep in ['000000.png', '000011.png', 'notes.txt', 'eval.json', 'deep/000099.png']:
    (tmp_path / keep).write_bytes(b'')
  sample_quality.check_image_dir(tmp_path, 12)  # torch-fidelity skips all of these
  (tmp_path / name).write_bytes(b'')
  with pytest.raises(ValueError, match=rf'holds 1 image file\(s\) not among the 12 '
                                       rf'samples of this evaluation \(000000.png to '
                                       rf'000011.png\), the first {name}: '):
    sample_quality.check_image_dir(tmp_path, 12)


def test_fid_without_inception_weights_says_what_to_set(tmp_path):
  c = _demo_evaluate_config('')
  with pytest.raises(ValueError, match=r'Nothing to evaluate: set config.fid.inception'):
    main_lib.run(c, tmp_path)
  c.eval_every = 1
  c.mode = 'train'
  with pytest.raises(ValueError, match=r'FID needs the Inception weights: set '
                                       r'config.fid.inception to weights-inception-2015'):
    main_lib.run(c, tmp_path)


def test_the_cached_reference_is_of_this_feature_network_and_these_images(tmp_path,
                                                                          monkeypatch):
  c = _demo_evaluate_config(_save_inception(tmp_path / 'inception', 0))
  mesh = parallel.make_mesh(1)
  c.fid.num_reference_images = 8
  eight = sample_quality.SampleQuality(c, tmp_path, mesh).reference
  c.fid.num_reference_images = 16  # was: the cache of the 8 images, used as if of 16
  sixteen = sample_quality.SampleQuality(c, tmp_path, mesh).reference
  assert not np.allclose(eight[0], sixteen[0])
  computed = sample_quality.SampleQuality._accumulate
  monkeypatch.setattr(sample_quality.SampleQuality, '_accumulate',
                      lambda *a, **k: pytest.fail('computed, not read from the cache'))
  cached = sample_quality.SampleQuality(c, tmp_path, mesh).reference
  np.testing.assert_array_equal(cached[1], sixteen[1])
  monkeypatch.setattr(sample_quality.SampleQuality, '_accumulate', computed)
  _save_inception(tmp_path / 'inception', 1)  # a retrained network, the same path
  other = sample_quality.SampleQuality(c, tmp_path, mesh).reference
  assert not np.allclose(other[0], sixteen[0])
  np.testing.assert_array_equal(fid.load_reference(tmp_path / sample_quality.REFERENCE_FILE.format(
      metric='fid', split='train'))[0], other[0])  # still a reference others can read
  np.savez(tmp_path / 'small.npz', mu=np.zeros(5), sigma=np.eye(5))
  c.fid.reference = str(tmp_path / 'small.npz')
  with pytest.raises(ValueError, match=r'small.npz are of features of shape mu \(5,\), sigma '
                                       r'\(5, 5\); the feature network \(fid\) gives 2048 '
                                       r'features: set config.fid.reference to statistics of '
                                       r"its features, or to '' to compute them"):
    sample_quality.SampleQuality(c, tmp_path, mesh)


def _demo_train_config(classifier_dir, eval_every):
  """The demo's teacher stage, tiny, 4 steps, with a 12-sample Fréchet distance every
  `eval_every` steps, of the features of a random Fashion-MNIST classifier built for the
  digits' 8 × 8 images (`_save_classifier`), which compiles in a fraction of Inception's
  time."""
  c = _demo_evaluate_config('')
  c.mode = 'train'
  c.update(dict(num_train_steps=4, eval_every=eval_every, batch_size=8, log_every=1))
  c.fid.update(dict(features='fmnist', fmnist=str(classifier_dir), train_num_samples=12))
  return c


def _save_classifier(directory):
  from secant_jax.evaluation import fmnist_features  # pylint: disable=import-outside-toplevel
  common.save(jax.tree_util.tree_map(np.asarray, fmnist_features.Classifier().init(
      jax.random.key(0), np.zeros((1, 8, 8, 1), np.uint8))), directory)
  return directory


@pytest.fixture
def fids_written(monkeypatch):
  """[(step, the FID's result or None where a stop cut it short)] of every training FID."""
  written = []
  call = periodic_fid.PeriodicFid.__call__

  def record(self, network, task, variables, step, stop):
    written.append((step, call(self, network, task, variables, step, stop)))
    return written[-1][1]

  monkeypatch.setattr(periodic_fid.PeriodicFid, '__call__', record)
  return written


@pytest.fixture
def grids_written(monkeypatch):
  """[(step, progress.weights_digest of the EMA weights drawn)] of every training grid."""
  written = []
  draw = loop.write_samples

  def record(config, network, task, variables, writer, step, decoder=None):
    written.append((step, progress.weights_digest(variables)))
    draw(config, network, task, variables, writer, step, decoder)

  monkeypatch.setattr(loop, 'write_samples', record)
  return written


def test_a_stop_during_a_training_fid_saves_it_and_the_resumed_run_finishes_it(
    tmp_path, progress_saves, fids_written, grids_written):
  """...and then draws that step's sample grid, which the stop skipped."""
  c = _demo_train_config(_save_classifier(tmp_path / 'classifier'), 2)
  c.sample_every, c.num_sample_images = 2, 4
  fid_dir, ckpt_dir = tmp_path / 'run' / periodic_fid.DIRECTORY, tmp_path / 'run' / 'checkpoints'
  for step in (2, 4):  # SIGTERM in the FID at step 2, then in the FID at the last step
    progress_saves.sent = False  # it comes in the batch that ends at 8 samples
    with pytest.raises(stop_requests.Stopped, match=re.escape(
        f'Stopped on SIGTERM at step {step} of 4 during its FID, with a checkpoint in '
        f"{ckpt_dir} and the FID's samples so far in {fid_dir}; the same command resumes "
        'the run, finishing that FID first.')):
      main_lib.run(c, tmp_path / 'run')
    assert fids_written[-1] == (step, None) and progress_saves.done[-1] == 8
    assert os.listdir(fid_dir) == ['progress.process_0.8.npz']
    assert os.listdir(ckpt_dir) == [str(step)]
    assert [s for s, _ in grids_written] == [2] * (step == 4)  # the cut step's grid waits
  assert not (tmp_path / 'run' / 'ema').exists()  # the run is not over
  main_lib.run(c, tmp_path / 'run')
  assert [step for step, _ in fids_written] == [2, 2, 4, 4]
  assert progress_saves.done == [8, 12, 8, 12]  # each resumed after the 8 samples saved
  assert os.listdir(fid_dir) == [] and (tmp_path / 'run' / 'ema').exists()
  resumed, resumed_grids = [fids_written[1], fids_written[3]], list(grids_written)
  fids_written.clear()
  grids_written.clear()
  main_lib.run(c, tmp_path / 'straight')
  assert fids_written == resumed  # what a run never stopped writes, to the last digit
  assert grids_written == resumed_grids and [s for s, _ in resumed_grids] == [2, 4]
  assert all(np.isfinite(scores['fd_fmnist']) for _, scores in resumed)


def test_a_training_fid_resumes_only_from_saves_of_its_own_step(tmp_path, monkeypatch):
  monkeypatch.setattr(sample_quality, 'SampleQuality', lambda *args: None)  # not called
  fid = periodic_fid.PeriodicFid(_demo_train_config('', 2), tmp_path, parallel.make_mesh(1))
  assert not fid.left_unfinished(2)  # a run that no stop cut short
  fid._progress(4, None).save(8, {'count': np.asarray(8)})  # its checkpoint never committed
  assert not fid.left_unfinished(2) and os.listdir(fid.directory) == []
  fid._progress(2, None).save(4, {'count': np.asarray(4)})
  assert fid.left_unfinished(2) and os.listdir(fid.directory) == ['progress.process_0.4.npz']
