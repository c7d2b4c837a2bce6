"""The trainer end to end: real steps on mock CIFAR-10 and tiny ArrayRecord latents, exact
resume across a process exit, SIGTERM, the one-line errors, and what a run reports of its
own speed (its images/s and MFU per log, a profiler trace of a few steps)."""

import collections
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from flax import traverse_util
from PIL import Image

from secant_jax import config as config_lib
from secant_jax import generate
from secant_jax import main as main_lib
from secant_jax import sampling
from secant_jax import stop_requests
from secant_jax import writers
from secant_jax.bench import flops
from secant_jax.convert import common
from secant_jax.data import latents
from secant_jax.data import pipeline
from secant_jax.evaluation import fid
from secant_jax.models import registry
from secant_jax.models import vae
from secant_jax.train import checkpoint
from secant_jax.train import loop
from secant_jax.train import recipe
from secant_jax.train import step_trace
from test_sample_quality import teacher_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = dict(family='dit', name='DiT-S/2', input_size=8, in_channels=4, num_classes=10,
                learn_sigma=True, dtype='float32', attention='', hidden_size=32, depth=1,
                num_heads=2)
# One resolution: the U-Net's layers are test_edm_unet's; here, the trainer on the σ-path.
TINY_UNET = dict(family='edm_unet', arch='ddpmpp', dtype='float32',
                 unet=dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=8,
                           channel_mult=(1,), num_blocks=1, attn_resolutions=(32,),
                           dropout=0.1))


def _config(model, data, variant, path='linear', steps=1, **overrides):
  c = config_lib.base_config()
  c.model.update(model)
  c.path.name = path
  c.secant = config_lib.secant_config(variant, 2, guidance=(1.0, 2.0) if model['family'] ==
                                      'dit' else None)
  c.data.update(data)
  c.batch_size = 8
  c.num_train_steps = steps
  c.log_every = 1
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


def _save_teacher(model, directory, seed=0):
  c = _config(model, {}, 'stee')
  network = registry.build(c.model, guided=False)
  common.save(network.init(jax.random.key(seed)), directory)
  return str(directory)


@pytest.fixture(scope='module')
def latent_dir(tmp_path_factory):
  """16 latents in the official per-sample .npy layout, imported to ArrayRecord."""
  root = tmp_path_factory.mktemp('latents')
  rng = np.random.default_rng(0)
  for d in ('features', 'labels'):
    os.makedirs(root / d)
  for i in range(16):
    np.save(root / 'features' / f'{i}.npy',
            rng.normal(scale=1 / 0.18215, size=(1, 4, 8, 8)).astype(np.float32))
    np.save(root / 'labels' / f'{i}.npy', np.array([i % 10]))
  assert latents.import_npy(root / 'features', root / 'labels', root / 'records',
                            shard_size=10) == 16
  return str(root / 'records')


def test_latent_import_keeps_raw_latents_and_scales_once(latent_dir, tmp_path):
  src = latents.source(_config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir),
                               'stee').data)
  assert len(src) == 16 and src[3]['x'].shape == (8, 8, 4) and int(src[3]['y']) == 3
  raw = np.load(os.path.join(os.path.dirname(latent_dir), 'features', '3.npy'))[0]
  np.testing.assert_allclose(src[3]['x'], raw.transpose(1, 2, 0) * 0.18215, rtol=1e-3,
                             atol=1e-4)


def test_latent_import_refuses_a_scale_flag_the_latents_contradict(latent_dir, tmp_path):
  """Raw latents imported as scaled, and scaled ones imported as raw, are refused with the
  flag to change; scaled ones imported as scaled hold the raw latents."""
  raw = os.path.join(os.path.dirname(latent_dir), 'features')
  labels = os.path.join(os.path.dirname(latent_dir), 'labels')
  with pytest.raises(ValueError, match=r'look raw: the first 16, read as ×0\.18215 '
                                       r'\(--already-scaled\), have std 3\d\.\d .*; drop '
                                       '--already-scaled'):
    latents.import_npy(raw, labels, tmp_path / 'wrong', already_scaled=True)
  os.makedirs(tmp_path / 'scaled')
  for i in range(16):
    np.save(tmp_path / 'scaled' / f'{i}.npy', np.load(os.path.join(raw, f'{i}.npy')) * 0.18215)
  with pytest.raises(ValueError, match=r'look already multiplied by 0\.18215: the first 16, '
                                       r'read as raw, have std [01]\.\d+ where .*; pass --already-scaled'):
    latents.import_npy(tmp_path / 'scaled', labels, tmp_path / 'wrong')
  assert not os.path.exists(tmp_path / 'wrong')
  assert latents.import_npy(tmp_path / 'scaled', labels, tmp_path / 'records',
                            already_scaled=True) == 16
  again = latents.source(_config(TINY_DIT, dict(name='imagenet_latents',
                                                dir=str(tmp_path / 'records')), 'stee').data)
  np.testing.assert_allclose(again[3]['x'], latents.source(_config(
      TINY_DIT, dict(name='imagenet_latents', dir=latent_dir), 'stee').data)[3]['x'],
                             rtol=1e-3, atol=1e-3)


def test_latent_import_takes_a_batch_per_file_as_the_official_train_py_reads_them(tmp_path):
  """Files of a batch each (<k>_<rank>.npy, [N, C, H, W] with N labels) become one record
  per latent, in natural name order (2_0 before 10_0) and row order; shards hold whole
  files, about --shard-size latents; a rerun keeps them and counts their records."""
  rng = np.random.default_rng(0)
  for d in ('features', 'labels', 'bad'):
    os.makedirs(tmp_path / d)
  sizes = {'10_0': 3, '2_0': 3, '2_1': 2}
  batches = {}
  for name, n in sizes.items():
    batches[name] = rng.normal(scale=1 / 0.18215, size=(n, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / 'features' / f'{name}.npy', batches[name])
    np.save(tmp_path / 'labels' / f'{name}.npy', rng.integers(0, 10, n))
  for _ in range(2):  # the second run keeps every shard
    assert latents.import_npy(tmp_path / 'features', tmp_path / 'labels', tmp_path / 'out',
                              shard_size=4) == 8
  assert latents.read_manifest(tmp_path / 'out') == {'records': 8, 'shards': [
      f'latents-0000{i}.array_record' for i in range(3)]}  # 4 // 3: one file each
  src = latents.source(_config(TINY_DIT, dict(name='imagenet_latents',
                                              dir=str(tmp_path / 'out')), 'stee').data)
  order = [(name, row) for name in ('2_0', '2_1', '10_0') for row in range(sizes[name])]
  for i, (name, row) in enumerate(order):
    np.testing.assert_allclose(src[i]['x'], batches[name][row].transpose(1, 2, 0) * 0.18215,
                               rtol=1e-3, atol=1e-3)
    assert src[i]['y'] == np.load(tmp_path / 'labels' / f'{name}.npy')[row]

  np.save(tmp_path / 'bad' / '2_0.npy', batches['2_0'][:2])
  with pytest.raises(ValueError, match=r'labels/2_0\.npy holds 3 labels where .*bad/2_0\.npy '
                                       r'holds 2 latents: a labels file holds one label per '
                                       'latent of its features file'):
    latents.import_npy(tmp_path / 'bad', tmp_path / 'labels', tmp_path / 'bad-out')
  np.save(tmp_path / 'bad' / '2_0.npy', batches['2_0'][None])
  with pytest.raises(ValueError, match=r'2_0\.npy holds an array of shape \[1, 3, 4, 8, 8\]: '
                                       r'the importer takes NCHW latents'):
    latents.import_npy(tmp_path / 'bad', tmp_path / 'labels', tmp_path / 'bad-out')


def test_latents_imported_to_a_bucket_train_as_from_a_disk(gcs_bucket, latent_dir, tmp_path,
                                                           monkeypatch):
  """A pod reads its latents from gs://… directly: imported there, the records and a
  two-step run's losses equal those from the local import. Each run closes its data
  iterator, whose read-ahead threads would otherwise read on after it (one reading when
  the bucket went away retried for minutes and held the process at exit)."""
  root = os.path.dirname(latent_dir)
  bucket = f'{gcs_bucket}/latents'
  for _ in range(2):  # the rerun keeps the shards and counts their records there
    assert latents.import_npy(os.path.join(root, 'features'), os.path.join(root, 'labels'),
                              bucket, shard_size=10) == 16
  assert sorted(p.name for p in epath.Path(bucket).iterdir()) == [
      'import.json', 'latents-00000.array_record', 'latents-00001.array_record',
      'manifest.json']
  local, remote = (latents.source(_config(TINY_DIT, dict(name='imagenet_latents', dir=d),
                                          'stee').data) for d in (latent_dir, bucket))
  assert len(remote) == 16
  for i in range(16):
    np.testing.assert_array_equal(remote[i]['x'], local[i]['x'])
    assert remote[i]['y'] == local[i]['y']
  iterators, build = [], pipeline.build
  monkeypatch.setattr(pipeline, 'build', lambda *a: iterators.append(build(*a)) or iterators[-1])
  runs = [loop.train_and_evaluate(_config(TINY_DIT, dict(name='imagenet_latents', dir=d),
                                          'stee', steps=2), tmp_path / name)[1]
          for d, name in ((latent_dir, 'local'), (bucket, 'bucket'))]
  assert [h['loss'] for h in runs[0]] == [h['loss'] for h in runs[1]]
  assert len(iterators) == 2
  for iterator, _ in iterators:
    with pytest.raises(ValueError):  # grain's closed iterator
      next(iterator)


def test_an_unfinished_or_altered_import_is_refused_not_trained_on_in_part(latent_dir,
                                                                          tmp_path):
  """An import stopped between shards is refused, and the same import run again writes
  only the missing shards; another import into the same directory writes all of its own."""
  root = os.path.dirname(latent_dir)
  labels = tmp_path / 'labels'
  labels.mkdir()
  for i in range(16):
    if i != 12:
      np.save(labels / f'{i}.npy', np.load(os.path.join(root, 'labels', f'{i}.npy')))
  with pytest.raises(FileNotFoundError, match=r'labels/12.npy is missing'):
    latents.import_npy(os.path.join(root, 'features'), labels, tmp_path / 'cut', shard_size=10)
  assert sorted(os.listdir(tmp_path / 'cut')) == ['import.json',
                                                  'latents-00000.array_record']  # no partial
  cut = _config(TINY_DIT, dict(name='imagenet_latents', dir=str(tmp_path / 'cut')), 'stee')
  with pytest.raises(FileNotFoundError, match=r'No finished latent import in .*cut'):
    latents.source(cut.data)

  np.save(labels / '12.npy', np.load(os.path.join(root, 'labels', '12.npy')))
  first_shard = tmp_path / 'cut' / 'latents-00000.array_record'
  mtime = os.stat(first_shard).st_mtime_ns
  assert latents.import_npy(os.path.join(root, 'features'), labels, tmp_path / 'cut',
                            shard_size=10) == 16  # the same import again: goes on
  assert os.stat(first_shard).st_mtime_ns == mtime
  whole = latents.source(_config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir),
                                 'stee').data)
  resumed = latents.source(cut.data)
  for i in range(16):
    np.testing.assert_array_equal(resumed[i]['x'], whole[i]['x'])
  latents.import_npy(os.path.join(root, 'features'), labels, tmp_path / 'cut', shard_size=8)
  assert os.stat(first_shard).st_mtime_ns != mtime  # another import: written anew
  assert latents.read_manifest(tmp_path / 'cut')['shards'] == [
      'latents-00000.array_record', 'latents-00001.array_record']
  assert len(latents.source(cut.data)) == 16
  altered = tmp_path / 'altered'
  shutil.copytree(latent_dir, altered)
  shutil.copy(altered / 'latents-00000.array_record', altered / 'latents-00001.array_record')
  with pytest.raises(ValueError, match=r'altered holds 20 latents where its manifest.json '
                                       r'lists 16: its shards changed after the import'):
    latents.source(_config(TINY_DIT, dict(name='imagenet_latents', dir=str(altered)),
                           'stee').data)


@pytest.mark.parametrize('variant', ['sdei', 'stei', 'sdee', 'stee'])
def test_one_step_on_imagenet_latents(variant, latent_dir, tmp_path):
  teacher = _save_teacher(TINY_DIT, tmp_path / 'teacher')
  c = _config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir), variant,
              init_checkpoint=teacher)
  state, history = loop.train_and_evaluate(c, tmp_path / 'run')
  assert int(state.step) == 1 and np.isfinite(history[0]['loss'])
  assert os.path.isdir(tmp_path / 'run' / 'ema') and os.path.isfile(tmp_path / 'run' /
                                                                    'config.json')


def test_logged_metrics_are_means_over_the_log_window(latent_dir, tmp_path):
  data = dict(name='imagenet_latents', dir=latent_dir)
  _, every = loop.train_and_evaluate(_config(TINY_DIT, data, 'stee', steps=5),
                                     tmp_path / 'every')
  _, windows = loop.train_and_evaluate(_config(TINY_DIT, data, 'stee', steps=5, log_every=3),
                                       tmp_path / 'windows')
  assert [h['step'] for h in windows] == [3, 5]
  for logged, steps in zip(windows, (every[:3], every[3:])):
    for key in ('loss', 'grad_norm'):
      assert logged[key] == pytest.approx(np.mean([h[key] for h in steps]), rel=1e-5)
  # the rate from the second log on (the first window holds the compile): STEE's four
  # forward-equivalents per image, over the 8 devices; no MFU where the peak is unknown
  network = registry.build(_config(TINY_DIT, data, 'stee').model, guided=False)
  flop_per_image = 4 * flops.dit_forward(network.module)
  assert 'images_per_second' not in every[0] and 'images_per_second' not in windows[0]
  for logged in every[1:] + windows[1:]:
    assert logged['images_per_second'] > 0 and 'mfu' not in logged
    assert logged['tflops_per_device'] == pytest.approx(
        logged['images_per_second'] * flop_per_image / jax.device_count() / 1e12)


# Two variants, one of each time sampling and of each target (the four variants' targets
# on the σ-path: test_secant_fixed_point; each variant's train step: test_train_step), STEE
# with its gradient accumulated over two microbatches, each with its own dropout: a U-Net
# run costs 20-30 s on CI's CPU.
@pytest.mark.parametrize('variant, microbatches', [('sdei', 1), ('stee', 2)])
def test_one_step_on_mock_cifar10_edm_path(variant, microbatches, tmp_path):
  teacher = _save_teacher(TINY_UNET, tmp_path / 'teacher')
  c = _config(TINY_UNET, dict(name='cifar10', random_flip=True), variant, path='edm',
              init_checkpoint=teacher, batch_size=8 * microbatches, microbatches=microbatches)
  with tfds.testing.mock_data(num_examples=16):
    state, history = loop.train_and_evaluate(c, tmp_path / 'run')
  assert int(state.step) == 1 and np.isfinite(history[0]['loss'])


def _digits_config(steps, **overrides):
  model = dict(TINY_DIT, in_channels=1)
  return _config(model, dict(name='digits'), 'stee', steps=steps, **overrides)


def _run_main(workdir, steps, extra=(), wrap=lambda argv: argv):
  return subprocess.Popen(wrap(
      [sys.executable, '-m', 'secant_jax.main', f'--config={REPO}/configs/demo.py',
       f'--workdir={workdir}', '--config.mode=train', f'--config.num_train_steps={steps}',
       '--config.log_every=1', '--config.batch_size=8', '--config.model.hidden_size=32',
       '--config.model.depth=1', '--config.model.num_heads=2', *extra]),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _demo_train_config(steps):
  from configs import demo  # pylint: disable=import-outside-toplevel
  c = demo.get_config()
  with c.unlocked():
    del c.demo
  c.mode = 'train'
  c.num_train_steps, c.log_every, c.batch_size = steps, 1, 8
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  return c


def _leaves(state):
  return traverse_util.flatten_dict(jax.device_get(state.params))


def test_demo_stages_and_evaluate_mode_agree(tmp_path):
  """The demo at test size end to end; then evaluate mode on its 2-step SDEI stage gives
  the numbers the demo's table has for it (its settings reach the one comparison)."""
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  from secant_jax import demo  # pylint: disable=import-outside-toplevel
  c = demo_config.get_config()
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  c.batch_size, c.log_every = 16, 5
  c.optimizer.warmup_steps = 0  # so that 10 steps move the networks away from their init
  c.demo.update(dict(teacher_steps=40, sdei_steps=5, stee_steps=5, sdei_step_counts=(1, 2),
                     eval_step_counts=(1, 2), num_eval=16))
  rows = main_lib.run(c, tmp_path)
  error = {(r['sampler'], r['nfe']): r['error'] for r in rows}
  assert list(error)[0] == ('teacher adaptive reference', None)
  assert set(error) - {list(error)[0]} == {
      (name, nfe) for name in ('teacher Euler', 'teacher Heun', 'secant SDEI', 'secant STEE')
      for nfe in (1, 2)}
  assert error['teacher Euler', 1] == error['teacher Heun', 1]  # one evaluation: Euler
  assert all(0 < v < 10 for v in list(error.values())[1:])
  for name in ('metrics.json', 'samples.png', 'samples/secant-sdei-2.png'):
    assert os.path.isfile(tmp_path / name)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'eval'))

  stage, stage_dir = demo.stage_config(c, str(tmp_path), 'sdei-2', 'sdei', 2, 5,
                                       init=str(tmp_path / 'teacher' / 'ema'),
                                       teacher=str(tmp_path / 'teacher' / 'ema'))
  stage.mode, stage.num_eval_samples = 'evaluate', 16
  # trained in float32, evaluated as configured in bfloat16: the integration error is
  # measured in float32 all the same (config.compare_in_float32), so it is the table's
  stage.model.dtype = 'bfloat16'
  stage.secant.sample_guidance_scale = c.demo.eval_scale
  result = main_lib.run(stage, stage_dir)
  assert result['steps'] == 2 and result['num_samples'] == 16
  # the same noise in the same sharded batch through the same comparison: the same digits
  assert result['secant'] == error['secant SDEI', 2]
  assert (result['teacher_euler'], result['teacher_heun'], result['teacher_heun_nfe']) == (
      error['teacher Euler', 2], error['teacher Heun', 2], 2)
  assert os.path.isfile(os.path.join(stage_dir, 'eval.json'))


def test_a_demo_rerun_trains_finished_stages_on_or_refuses_their_changes(tmp_path):
  """A rerun does not skip a finished stage: more steps train it on, another setting is
  refused, and a teacher trained further refuses the secant stages trained from it."""
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  c = demo_config.get_config()
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  c.batch_size, c.log_every = 8, 2
  c.demo.update(dict(teacher_steps=4, sdei_steps=2, stee_steps=2, sdei_step_counts=(1,),
                     eval_step_counts=(1,), num_eval=8))
  main_lib.run(c, tmp_path)
  c.demo.stee_steps = 4  # was: STEE's 2 steps kept, as if they were 4
  main_lib.run(c, tmp_path)
  assert [os.listdir(tmp_path / stage / 'checkpoints') for stage in
          ('teacher', 'sdei-1', 'stee')] == [['4'], ['2'], ['4']]
  c.demo.secant_learning_rate = 1e-3
  with pytest.raises(ValueError, match=r'sdei-1 trained up to step 2 with another config \(1 '
                                       r'settings differ from its config.json: '
                                       r'optimizer.learning_rate: 0.0002 → 0.001\)'):
    main_lib.run(c, tmp_path)
  c.demo.secant_learning_rate, c.demo.teacher_steps = 2e-4, 6
  with pytest.raises(ValueError, match=r'The teacher in .* has trained further, and the '
                                       r'secant stages sdei-1, stee there were trained from '
                                       r'its earlier weights: delete them'):
    main_lib.run(c, tmp_path)


def test_sigterm_in_a_demo_stage_stops_the_demo_there(tmp_path, monkeypatch):
  """The teacher stage stopped by SIGTERM ends the demo with stop_requests.Stopped (main's
  exit status 75), instead of starting a secant stage from a teacher that was never exported."""
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  c = demo_config.get_config()
  c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
  c.batch_size, c.demo.teacher_steps = 8, 40
  save_if_due = checkpoint.Checkpoints.save_if_due

  def sigterm_at_step_2(self, step, *args, **kwargs):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # to the handler the running stage installed
    return save_if_due(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpoints, 'save_if_due', sigterm_at_step_2)
  with pytest.raises(stop_requests.Stopped, match=r'Stopped on SIGTERM at step 2 of 40, with a '
                                               r'checkpoint in .*teacher/checkpoints'):
    main_lib.run(c, tmp_path)
  assert os.listdir(tmp_path) == ['teacher']
  assert os.listdir(tmp_path / 'teacher' / 'checkpoints') == ['2']


def test_exact_resume_across_a_process_exit(tmp_path):
  straight_state, straight = loop.train_and_evaluate(_demo_train_config(6), tmp_path / 'a')
  first = _run_main(tmp_path / 'b', 3)
  output, _ = first.communicate(timeout=600)
  assert first.returncode == 0, output[-3000:]
  resumed_state, resumed = loop.train_and_evaluate(_demo_train_config(6), tmp_path / 'b')
  assert [h['step'] for h in resumed] == [4, 5, 6]
  np.testing.assert_array_equal([h['loss'] for h in resumed],
                                [h['loss'] for h in straight[3:]])
  for path, value in _leaves(straight_state).items():
    np.testing.assert_array_equal(_leaves(resumed_state)[path], value, err_msg=str(path))


def test_a_resumed_run_reads_its_train_step_from_the_compilation_cache(tmp_path, monkeypatch):
  """config.compilation_cache_dir: the first run writes its compiled train step there, the
  run resumed in a new process (as after a preemption) loads it instead of compiling."""
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # tiny programs too
  monkeypatch.setenv('JAX_DEBUG_LOG_MODULES', 'jax._src.compiler')  # hits and misses logged
  cache = tmp_path / 'cache'
  outputs = []
  for steps in (1, 2):
    proc = _run_main(tmp_path / 'run', steps, [f'--config.compilation_cache_dir={cache}'])
    outputs.append(proc.communicate(timeout=600)[0])
    assert proc.returncode == 0, outputs[-1][-3000:]
  assert "CACHE MISS for 'jit_train_step'" in outputs[0]
  assert any(f.startswith('jit_train_step-') for f in os.listdir(cache))
  assert "cache hit for 'jit_train_step'" in outputs[1]
  assert "CACHE MISS for 'jit_train_step'" not in outputs[1]


# A program with a custom_partitioning primitive (as cuDNN's attention is) jitted over
# `devices` emulated CPU devices, called as it is or per device in shard_map (as
# dit.Attention calls it on a mesh), run with a persistent compilation cache.
_CUSTOM_PARTITIONED = '''
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
double = custom_partitioning(lambda x: 2 * x)
double.def_partition(
    partition=lambda mesh, args, result: (mesh, lambda x: 2 * x, args[0].sharding,
                                          (args[0].sharding,)),
    infer_sharding_from_operands=lambda mesh, args, result: args[0].sharding,
    sharding_rule='i j -> i j')
mesh = Mesh(np.array(jax.devices()[:int(sys.argv[1])]), ('d',))
if sys.argv[2] == 'shard_map':
  double = jax.shard_map(double, mesh=mesh, in_specs=P('d'), out_specs=P('d'))
x = jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, P('d')))
print(float(jax.jit(lambda x: double(x) + 1)(x).sum()))
'''


@pytest.mark.parametrize('devices, call, entries', [
    (1, 'plain', 1), (2, 'plain', 2), (2, 'shard_map', 1)])
def test_a_custom_partitioned_kernel_on_two_devices_is_cached_once_only_if_run_per_device(
    tmp_path, devices, call, entries):
  """Why dit.Attention runs cuDNN's kernel per device on a mesh: two processes running a
  program with a custom_partitioning primitive on 2 devices store two cache entries (each
  program holds its process's callback id), so a resumed run reads none back; on 1 device,
  or per device in shard_map, it is inlined and the second process reads the first's."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(tmp_path),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  for _ in range(2):
    out = subprocess.run([sys.executable, '-c', _CUSTOM_PARTITIONED, str(devices), call],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ['48.0']
  assert len([f for f in os.listdir(tmp_path) if f.startswith('jit__lambda-')]) == entries


def test_ctrl_c_stops_a_run_with_a_checkpoint_as_sigterm_does(tmp_path, from_a_terminal):
  """It raised KeyboardInterrupt wherever the step was: the steps since the last save were
  lost, and the exit status did not say that the run can go on."""
  proc = _run_main(tmp_path, 100000, ['--config.checkpoint_every=100000'], from_a_terminal)
  for line in proc.stdout:
    if 'loss' in line:
      break
  proc.send_signal(signal.SIGINT)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, output[-3000:]
  steps = [int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
  assert 'Ctrl-C: the run stops after this step, with a checkpoint.' in output
  assert (f'Stopped on Ctrl-C at step {steps[0]} of 100000, with a checkpoint in '
          f'{tmp_path}/checkpoints; the same command resumes the run.') in output
  assert 'KeyboardInterrupt' not in output


def test_sigterm_leaves_a_checkpoint_the_run_continues_from(tmp_path):
  proc = _run_main(tmp_path, 100000, ['--config.checkpoint_every=100000'])
  for line in proc.stdout:
    if 'loss' in line:  # the first logged step: training is under way
      break
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, output[-3000:]  # a scheduler's cue to run it again
  steps = [int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000
  assert (f'Stopped on SIGTERM at step {steps[0]} of 100000, with a checkpoint in '
          f'{tmp_path}/checkpoints; the same command resumes the run.') in output
  state, history = loop.train_and_evaluate(_demo_train_config(steps[0] + 2), tmp_path)
  assert int(state.step) == steps[0] + 2 and history[0]['step'] == steps[0] + 1
  wider = _demo_train_config(steps[0] + 4)
  wider.model.hidden_size = 64
  with pytest.raises(ValueError, match=r'settings differ from its config.json: '
                                       r'model.hidden_size: 32 → 64\)'):
    loop.train_and_evaluate(wider, tmp_path)
  wider.allow_config_change = True  # its arrays are checked all the same
  with pytest.raises(ValueError, match=r'checkpoint at step \d+ in .* does not fit the '
                                       r'configured run \(\d+ arrays differ: .*Resume with '
                                       'the config it was saved with'):
    loop.train_and_evaluate(wider, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['hidden_size'] == 32
  with pytest.raises(ValueError, match=rf'is at step {steps[0] + 2}, past num_train_steps=2: '
                                       rf'set num_train_steps to {steps[0] + 2} or more'):
    loop.train_and_evaluate(_demo_train_config(2), tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['num_train_steps'] == steps[0] + 2
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # each failed run gave it back


def test_a_resume_that_changes_what_is_trained_is_refused_unless_allowed(tmp_path):
  """Settings that decide the numbers trained (here the learning rate and the EMA decay)
  may not change silently on resume; how long the run goes on and how it logs may. Allowed,
  the change goes on and the config of the earlier steps is kept beside the new one."""
  loop.train_and_evaluate(_demo_train_config(2), tmp_path)
  changed = _demo_train_config(3)
  changed.optimizer.learning_rate, changed.ema_decay = 5e-4, 0.99
  with pytest.raises(ValueError, match=r'The run in .* trained up to step 2 with another '
                                       r'config \(2 settings differ from its config.json: '
                                       r'optimizer.learning_rate: 0.001 → 0.0005; '
                                       r'ema_decay: 0.995 → 0.99\)\. Resume with the config '
                                       r'.*--config.allow_config_change=True'):
    loop.train_and_evaluate(changed, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['num_train_steps'] == 2
  longer = _demo_train_config(3)
  longer.log_every, longer.checkpoint_every = 3, 7
  state, _ = loop.train_and_evaluate(longer, tmp_path)
  assert int(state.step) == 3 and not list(tmp_path.glob('config.step_*.json'))
  changed.num_train_steps, changed.allow_config_change = 4, True
  state, _ = loop.train_and_evaluate(changed, tmp_path)
  assert int(state.step) == 4
  before = json.loads((tmp_path / 'config.step_3.json').read_text())
  after = json.loads((tmp_path / 'config.json').read_text())
  assert (before['optimizer']['learning_rate'], after['optimizer']['learning_rate']) == (
      1e-3, 5e-4)


def test_a_resume_with_other_teacher_weights_at_the_same_path_is_refused_unless_allowed(
    tmp_path):
  """A run records which teacher weights it learns from; resumed after the teacher's
  checkpoint was replaced (a teacher trained on, converted again), it is refused, since
  its steps so far learnt from the other one; allowed, it goes on and records the new."""
  model = dict(TINY_DIT, in_channels=1)
  teacher = _save_teacher(model, tmp_path / 'teacher')
  c = _config(model, dict(name='digits'), 'sdei', init_checkpoint=teacher)
  loop.train_and_evaluate(c, tmp_path / 'run')
  record = json.loads((tmp_path / 'run' / loop.TEACHER_RECORD).read_text())
  c.num_train_steps = 2
  loop.train_and_evaluate(c, tmp_path / 'run')  # the same teacher: resumes
  assert json.loads((tmp_path / 'run' / loop.TEACHER_RECORD).read_text()) == record
  shutil.rmtree(teacher)
  _save_teacher(model, teacher, seed=1)
  c.num_train_steps = 3
  with pytest.raises(ValueError, match=r'The teacher weights in .*teacher are not those the '
                                       r'run in .*run learnt its 2 steps from \(its '
                                       r'teacher.json: those in .*teacher then; trained on or '
                                       r'converted again since\?\): resume with those weights, '
                                       r'start a new --workdir for these, or go on with them on '
                                       r'purpose with --config.allow_config_change=True\.'):
    loop.train_and_evaluate(c, tmp_path / 'run')
  c.allow_config_change = True
  state, _ = loop.train_and_evaluate(c, tmp_path / 'run')
  assert int(state.step) == 3
  assert json.loads((tmp_path / 'run' / loop.TEACHER_RECORD).read_text())['digest'] != (
      record['digest'])


def test_changed_settings_are_those_that_decide_the_training_and_both_configs_hold():
  saved = json.loads(config_lib.base_config().to_json_best_effort())
  current = json.loads(config_lib.base_config().to_json_best_effort())
  current['secant']['stei_lambda'] = 2.0  # decides the loss
  current['fsdp'], current['model']['remat'], current['data']['read_threads'] = 4, True, 64
  current['microbatches'] = 4  # the same gradient, a slice of the batch at a time
  current['secant']['guidance_interval'] = [0.3, 1.0]  # sampling only
  current['data']['added_in_a_later_version'] = 1
  del current['ema_warmup']  # a setting this version does not have
  current['model']['remat_policy'] = 'dots'  # not model.remat, which may change
  saved['model']['remat_policy'] = 'none'
  assert config_lib.changed_settings(saved, current) == [
      "model.remat_policy: 'none' → 'dots'", 'secant.stei_lambda: 1.0 → 2.0']


def _poison_batch(monkeypatch, number):
  """Makes the run's `number`-th batch (from 1) all NaN images."""
  batches = loop._global_batch  # pylint: disable=protected-access
  calls = []

  def poisoned(local, sharding):
    calls.append(None)
    if len(calls) == number:
      local = {**local, 'x': np.full_like(local['x'], np.nan)}
    return batches(local, sharding)

  monkeypatch.setattr(loop, '_global_batch', poisoned)


def test_a_non_finite_loss_keeps_the_checkpoint_and_scalars_written_before_it(tmp_path,
                                                                             monkeypatch):
  """The run stops with FloatingPointError at step 2, one step after its async save of step
  1: leaving the run commits that save (Orbax's step directory, not its temporary one),
  closes its writer (CLU's writes asynchronously: step 1's scalars could be lost with the
  process) and hands SIGTERM back."""
  closed = []
  create = writers.create

  def recording_closes(*args, **kwargs):
    writer = create(*args, **kwargs)
    close = writer.close
    writer.close = lambda: (closed.append(None), close())
    return writer

  _poison_batch(monkeypatch, 2)
  monkeypatch.setattr(writers, 'create', recording_closes)
  c = _demo_train_config(6)
  c.checkpoint_every = 1
  with pytest.raises(FloatingPointError, match='Non-finite loss or gradient norm in the 1 '
                                               'steps up to step 2'):
    loop.train_and_evaluate(c, tmp_path)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  assert len(closed) == 1
  logged = {}
  for name in os.listdir(tmp_path):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(str(tmp_path / name)):
        for value in event.summary.value:
          logged[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  assert [step for tag, step in logged if tag == 'loss'] == [1]
  assert np.isfinite(logged[('loss', 1)])


@pytest.mark.parametrize('sigterm_step', [None, 3])
def test_a_run_that_diverges_between_logs_keeps_its_last_finite_checkpoint(tmp_path,
                                                                           monkeypatch,
                                                                           sigterm_step):
  """Logs every 5 steps, saves every 2 keeping one; step 3's batch is NaN. The save due at
  step 4 (or the one a SIGTERM forces at step 3) finds the non-finite loss before the log
  does and ends the run without saving: step 2's checkpoint, the last of a finite state, is
  not replaced (it was, by one of NaN parameters, before the check)."""
  _poison_batch(monkeypatch, 3)
  save_if_due = checkpoint.Checkpoints.save_if_due

  def sigterm_at(self, step, *args, **kwargs):
    if step == sigterm_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return save_if_due(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpoints, 'save_if_due', sigterm_at)
  c = _demo_train_config(8)
  c.log_every, c.checkpoint_every, c.keep_checkpoints = 5, 2, 1
  stop = sigterm_step or 4
  with pytest.raises(FloatingPointError, match=f'Non-finite loss or gradient norm in the {stop} '
                     f'steps up to step {stop}: .*Its state is not saved; the latest checkpoint '
                     f'in {tmp_path}/checkpoints is from before these steps'):
    loop.train_and_evaluate(c, tmp_path)
  assert os.listdir(tmp_path / 'checkpoints') == ['2']
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_run_on_a_bucket_resumes_exactly(gcs_bucket, tmp_path, monkeypatch):
  """A pod's workdir is gs://…: config, scalars, checkpoints and the EMA export on an
  emulated bucket, and a second run resumes there and goes on exactly as an uninterrupted
  local run. (TensorBoard events go through TensorFlow's GCS file system, which cannot be
  pointed at an emulator, so the writer here is the JSON-lines one.)"""
  monkeypatch.setattr(writers, '_clu', lambda module: None)
  _, straight = loop.train_and_evaluate(_demo_train_config(4), tmp_path)
  workdir = f'{gcs_bucket}/run'
  loop.train_and_evaluate(_demo_train_config(2), workdir)
  state, resumed = loop.train_and_evaluate(_demo_train_config(4), workdir)
  assert [h['step'] for h in resumed] == [3, 4]
  np.testing.assert_array_equal([h['loss'] for h in resumed],
                                [h['loss'] for h in straight[2:]])
  assert {'config.json', 'checkpoints', 'ema', 'scalars.jsonl'} <= {
      p.name for p in epath.Path(workdir).iterdir()}
  assert [p.name for p in epath.Path(workdir, 'checkpoints').iterdir()] == ['4']
  logged = [json.loads(line)['step'] for line in
            epath.Path(workdir, 'scalars.jsonl').read_text().splitlines()]
  assert logged == [1, 2, 3, 4]  # both runs' lines: an object store has no append mode
  exported = traverse_util.flatten_dict(common.load_variables(f'{workdir}/ema'))
  for path, value in traverse_util.flatten_dict(jax.device_get(state.ema_params)).items():
    np.testing.assert_array_equal(exported[path], value, err_msg=str(path))


def test_errors_are_one_line_and_name_the_fix(tmp_path, latent_dir):
  missing_data = _config(TINY_DIT, dict(name='imagenet_latents', dir=str(tmp_path / 'none')),
                         'stee')
  with pytest.raises(FileNotFoundError, match=r'No finished latent import in .*none: '
                                              r'manifest.json, written last by the importer, '
                                              r'is missing .*; import the latents with'):
    loop.train_and_evaluate(missing_data, tmp_path / 'r1')
  missing_cifar = _config(TINY_UNET, dict(name='cifar10', dir=str(tmp_path / 'tfds')), 'stee',
                          path='edm')
  with pytest.raises(FileNotFoundError, match=r'CIFAR-10 data dir .*tfds does not exist; '
                                              r'prepare it with `tfds build cifar10 '
                                              r'--file_format=array_record --data_dir='):
    loop.train_and_evaluate(missing_cifar, tmp_path / 'r1')
  # what plain `tfds build cifar10` leaves (TFRecord): its info files are what TFDS reads
  tfrecord = tfds.builder('cifar10', data_dir=tmp_path / 'tfds', file_format='tfrecord')
  os.makedirs(tfrecord.data_dir)
  tfrecord.info.write_to_directory(tfrecord.data_dir)
  with pytest.raises(ValueError, match=r'CIFAR-10 in .*tfds is prepared as TFRecord .*; '
                                       r'prepare it again as ArrayRecord with `tfds build '
                                       r'cifar10 --file_format=array_record --data_dir='):
    loop.train_and_evaluate(missing_cifar, tmp_path / 'r1')
  no_teacher = _config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir), 'sdei',
                       init_checkpoint=str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match=r'Converted checkpoint .*absent does not exist'):
    loop.train_and_evaluate(no_teacher, tmp_path / 'r2')
  other = _save_teacher(dict(TINY_DIT, hidden_size=64), tmp_path / 'wide')
  mismatched = _config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir), 'sdei',
                       init_checkpoint=other)
  with pytest.raises(common.ConversionError, match=r'does not fit the configured model.*'
                                                   r'Shape mismatch'):
    loop.train_and_evaluate(mismatched, tmp_path / 'r3')
  with pytest.raises(ValueError, match=r"Unknown secant variant 'sdxx'"):
    _config(TINY_DIT, {}, 'sdxx')
  odd_batch = _config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir), 'stee',
                      batch_size=12)
  with pytest.raises(ValueError, match=r"Global batch size 12 is not a positive multiple "
                                       r"of the 8 devices; set the config's batch_size to"):
    loop.train_and_evaluate(odd_batch, tmp_path / 'r4')
  no_slices = _config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir), 'stee',
                      microbatches=0)
  with pytest.raises(ValueError, match=r'microbatches \(config.microbatches\) must be a '
                                       r'positive integer \(1: no gradient accumulation\), '
                                       r'got 0\.'):
    loop.train_and_evaluate(no_slices, tmp_path / 'r4')
  no_trace = _config(TINY_DIT, {}, 'stee', profile_steps=-1)
  with pytest.raises(ValueError, match=r'config.profile_steps must be a whole number of '
                                       r'steps, 0 or more, got -1; e.g. '):
    loop.train_and_evaluate(no_trace, tmp_path / 'r4')
  keeping_none = _config(TINY_DIT, {}, 'stee', keep_checkpoints=0)
  with pytest.raises(ValueError, match=r'config.keep_checkpoints is 0, must be at least 1 '
                                       r'\(the latest checkpoints kept; with 0, each would be '
                                       r'deleted as soon as it was written\)'):
    loop.train_and_evaluate(keeping_none, tmp_path / 'r6')
  assert not os.path.exists(tmp_path / 'r6')
  with pytest.raises(ValueError, match=r'config.num_sample_images is 0, must be at least 1 '
                                       r'\(the images of a sample grid and of sample mode\)'):
    main_lib.run(_config(TINY_DIT, {}, 'stee', mode='sample', num_sample_images=0),
                 tmp_path / 'r7')
  no_rows = _config(TINY_DIT, {}, 'stee', mode='compare')
  no_rows.compare.teacher_nfe = (1, 0)
  with pytest.raises(ValueError, match=r"config.compare.teacher_nfe is \(1, 0\), each must be "
                                       r"at least 1 \(the evaluations of a comparison's "
                                       r'teacher rows\)'):
    main_lib.run(no_rows, tmp_path / 'r7')
  assert not os.path.exists(tmp_path / 'r7')
  unguided = _config(TINY_DIT, {}, 'sdei')
  unguided.secant.guidance_interval = (0.8, 0.2)
  with pytest.raises(ValueError, match=r'guidance_interval \(config.secant.guidance_interval: '
                                       r'the unit times \[a, b\) of the guided steps\) must be '
                                       r'\(a, b\) with a <= b, got \(0.8, 0.2\)\.'):
    loop.train_and_evaluate(unguided, tmp_path / 'r8')
  assert not os.path.exists(tmp_path / 'r8')
  with pytest.raises(ValueError, match=r"Unknown mode 'eval'"):
    main_lib.run(_config(TINY_DIT, {}, 'stee', mode='eval'), tmp_path / 'r5')
  with pytest.raises(ValueError, match=r"Bad config argument 'step=4'"):
    config_lib.parse_arg('step=4', dict(variant='sdei', steps=4))
  with pytest.raises(ValueError, match=r"^Bad config argument 'steps=x': steps takes an "
                                       r'integer, e.g. steps=4.$'):  # was: "invalid literal"
    config_lib.parse_arg('variant=stee,steps=x', dict(variant='sdei', steps=4))
  assert config_lib.parse_arg('scale=2', dict(scale=1.0)) == dict(scale=2.0)


def test_cifar10_missing_from_tfds_default_dir_names_that_dir(tmp_path):
  """Where config.data.dir is empty, TFDS reads $TFDS_DATA_DIR (at its import, hence a
  subprocess): the error names that directory, not just 'the default'."""
  script = ('import ml_collections\n'
            'from secant_jax.data import cifar10\n'
            "cifar10.source(ml_collections.ConfigDict({'name': 'cifar10', 'dir': ''}))\n")
  done = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')},
                        check=False)
  assert done.returncode == 1
  assert (f"FileNotFoundError: CIFAR-10 is not prepared in TFDS's default dir "
          f"{tmp_path / 'tfds'} (KeyError); run `tfds build cifar10 "
          "--file_format=array_record` first.") in done.stderr


def test_labels_the_model_has_no_class_for_are_refused_before_they_train(tmp_path):
  fewer_classes = _digits_config(1)
  fewer_classes.model.num_classes = 5  # digits' labels are 0 to 9
  with pytest.raises(ValueError, match=r"^Dataset 'digits' gives the class label [5-9], and "
                                       r'the model has 5 classes, labels 0 to 4: set '
                                       r"config.model.num_classes to the data's number of "
                                       r'classes \(or 0 for an unconditional model\), or fix '
                                       r'config.data\.$'):
    loop.train_and_evaluate(fewer_classes, tmp_path)
  assert not glob.glob(str(tmp_path / 'checkpoints' / '*'))  # refused before step 1
  with pytest.raises(ValueError, match=r'gives the class label -1, and the model has 10'):
    loop.check_labels(np.array([3, -1, 9]), 10, 'digits')
  loop.check_labels(np.array([0, 9]), 10, 'digits')
  loop.check_labels(np.array([0, 9]), 0, 'digits')  # an unconditional model takes none


class _ImageWriter:

  def write_images(self, step, images):
    self.images = images


def test_a_teachers_samples_solve_its_ode_not_one_step(tmp_path):
  """One step of a flow teacher is the class mean; its grid and sample mode must show its
  ODE's solution."""
  c = _config(TINY_DIT, {}, 'diffusion', num_sample_images=4, teacher_sample_nfe=3)
  c.secant = config_lib.secant_config('diffusion', 1)
  network = registry.build(c.model, guided=False)
  task = recipe.make_task(c, network)
  variables = teacher_variables(network, 0)
  writer = _ImageWriter()
  loop.write_samples(c, network, task, variables, writer, 7)
  noise, labels = generate.fixed_noise_and_labels(c.seed, 4, network.image_shape, 10)
  tangent = lambda x, t: network.apply(variables, x, t, t, labels, None)[..., :4]
  expected = sampling.ode_sample(tangent, noise, task.path, 2, 'edm_heun')
  np.testing.assert_allclose(writer.images['samples'][0],
                             generate.image_grid(expected), atol=1e-5)
  common.save(variables, tmp_path / 'ema')
  c.mode, c.data.name = 'sample', 'cifar10'  # pixels: no decoder; was: one secant step
  main_lib.run(c, tmp_path)
  with np.load(tmp_path / 'samples.npz') as saved:
    np.testing.assert_allclose(saved['samples'], expected, atol=1e-5)


def test_sample_mode_writes_the_samples_and_their_grid(tmp_path):
  c = _digits_config(2, num_sample_images=6)
  loop.train_and_evaluate(c, tmp_path)
  c.mode = 'sample'
  path = main_lib.run(c, tmp_path)
  network = registry.build(c.model, guided=False)
  noise, labels = generate.fixed_noise_and_labels(c.seed, 6, network.image_shape, 10)
  with np.load(tmp_path / 'samples.npz') as f:
    samples = f['samples']
    np.testing.assert_array_equal(f['labels'], labels)
  assert samples.shape == noise.shape and not np.allclose(samples, noise)
  grid = (generate.image_grid(samples) * 255).round().astype(np.uint8)
  with Image.open(path) as image:
    assert image.mode == 'L'
    np.testing.assert_array_equal(np.asarray(image), grid[..., 0])


def test_sample_and_evaluate_mode_refuse_a_config_of_another_model(tmp_path, caplog):
  """A run's ema/ read under a config that differs in what the model is: an STEE run under
  the default SDEI arguments loaded (its guidance embedder filled in at init) and sampled
  without its CFG, with no error, as did one on another path."""
  c = _digits_config(1, num_sample_images=2)
  loop.train_and_evaluate(c, tmp_path)
  sdei = _digits_config(1, num_sample_images=2, mode='sample')
  sdei.secant = config_lib.secant_config('sdei', 4, guidance=(1.0, 2.0))
  with pytest.raises(ValueError, match=r"^Sample mode reads the model that the run in .* "
                                       r"trained, and the config differs from its config.json "
                                       r"in what that model is \(secant.variant: 'stee' → "
                                       r"'sdei'; secant.guidance: None → \[1.0, 2.0\]; "
                                       r"secant.label_dropout: 0.1 → 0.0\): it would sample as "
                                       r"another model. Give the --config the run trained with "
                                       r"\(variant 'stee', steps 2; .*config.json holds every "
                                       r"setting\), or read it so on purpose with "
                                       r"--config.allow_config_change=True.$"):
    main_lib.run(sdei, tmp_path)
  assert not os.path.exists(tmp_path / 'samples.npz')
  other_path = _digits_config(1, mode='evaluate')
  other_path.path.name = 'edm'
  with pytest.raises(ValueError, match=r"^Evaluate mode reads .*\(path.name: 'linear' → "
                                       r"'edm'\)"):
    main_lib.run(other_path, tmp_path)
  sampling_choices = _digits_config(1, num_sample_images=2, mode='sample')
  sampling_choices.secant.update(dict(steps=1, sample_cfg_scale=2.0,
                                     guidance_interval=(0.2, 1.0)))
  sampling_choices.model.dtype = 'bfloat16'
  with caplog.at_level('INFO'):
    main_lib.run(sampling_choices, tmp_path)
  assert 'samples the run in' in caplog.text and 'in 1 steps; it trained for 2.' in caplog.text
  sdei.allow_config_change = True
  main_lib.run(sdei, tmp_path)
  sdei_dir = tmp_path / 'sdei'  # distilled from the STEE run: a teacher of the same shape
  sdei.allow_config_change, sdei.mode = False, 'train'
  sdei.teacher_checkpoint = str(tmp_path / 'ema')
  loop.train_and_evaluate(sdei, sdei_dir)
  sdei.mode = 'sample'
  caplog.clear()
  main_lib.run(sdei, sdei_dir)  # at 1.5, inside [1, 2]
  assert 'extrapolates' not in caplog.text
  sdei.secant.sample_guidance_scale = 3.0
  main_lib.run(sdei, sdei_dir)
  assert (f'Sample mode samples the run in {sdei_dir} at the guidance scale 3, outside the '
          'range [1, 2] it trained on: its guidance input extrapolates. Set '
          'config.secant.sample_guidance_scale inside it') in caplog.text


def test_a_secant_run_is_measured_against_the_teacher_it_learnt_from(tmp_path, caplog):
  """Evaluate and compare mode refuse a teacher whose weights changed at the same path
  after a secant run learnt from it (its teacher.json, digested as its bf16 step held
  them), also an STEE run, whose steps use no teacher, started from it; they measured the
  run against the new teacher with no error. Compare mode warns of a guidance scale
  outside the range a run trained on, as sample mode does."""
  teacher = _digits_config(1, secant=config_lib.secant_config('diffusion', 1))
  teacher.model.dtype = 'bfloat16'
  loop.train_and_evaluate(teacher, tmp_path / 'teacher')
  sdei = _digits_config(1, secant=config_lib.secant_config('sdei', 2, guidance=(1.0, 2.0)),
                        num_eval_samples=2, teacher_checkpoint=str(tmp_path / 'teacher/ema'))
  sdei.model.dtype = 'bfloat16'
  loop.train_and_evaluate(sdei, tmp_path / 'sdei')
  sdei.mode = 'evaluate'
  stee = _digits_config(1, init_checkpoint=str(tmp_path / 'teacher/ema'))
  stee.model.dtype = 'bfloat16'
  loop.train_and_evaluate(stee, tmp_path / 'stee')
  record = lambda run: json.loads((tmp_path / run / loop.TEACHER_RECORD).read_text())
  assert record('stee') == record('sdei')  # the teacher as the steps compute with it
  compare = _digits_config(1, mode='compare')
  compare.compare.update(dict(teacher=str(tmp_path / 'teacher'), num_samples=8, batch_size=8,
                              secants=f'sdei={tmp_path / "sdei"}', teacher_nfe=(1,),
                              secant_steps=(1,)))
  measured = main_lib.run(sdei, tmp_path / 'sdei')['secant']
  rows = main_lib.run(compare, tmp_path / 'table')
  assert 'extrapolates' not in caplog.text  # at 1, inside [1, 2]
  compare.compare.guidance_scale = 3.0
  main_lib.run(compare, tmp_path / 'guided')
  assert (f'Compare mode samples the run in {tmp_path / "sdei"} at the guidance scale 3, '
          'outside the range [1, 2] it trained on: its guidance input extrapolates. Set '
          'config.compare.guidance_scale inside it') in caplog.text
  compare.compare.guidance_scale = 1.0
  common.save(teacher_variables(registry.build(teacher.model, guided=False), 3),
              tmp_path / 'teacher' / 'ema', overwrite=True)  # trained on, or converted again
  for config, workdir in ((sdei, tmp_path / 'sdei'), (compare, tmp_path / 'table')):
    with pytest.raises(ValueError, match=r'^The secant run in .*sdei learnt from other '
                                         r'teacher weights than these \(its teacher.json: '
                                         r'those in .*teacher/ema when it trained; trained on '
                                         r'or converted again since\?\): its error to this '
                                         r"teacher's solutions would not measure what it "
                                         r'learnt. Measure it against the teacher it learnt '
                                         r'from, or against this one on purpose with '
                                         r'--config.allow_config_change=True.$'):
      main_lib.run(config, workdir)
    config.allow_config_change = True
  compare.allow_config_change = False
  compare.compare.secants = f'stee={tmp_path / "stee"}'
  with pytest.raises(ValueError, match=r'^The secant run in .*stee learnt from other teacher '
                                       r'weights than these'):
    main_lib.run(compare, tmp_path / 'stee-table')
  compare.compare.secants, compare.allow_config_change = f'sdei={tmp_path / "sdei"}', True
  assert main_lib.run(sdei, tmp_path / 'sdei')['secant'] != measured
  assert main_lib.run(compare, tmp_path / 'table2') != rows


def test_sample_mode_on_latents_writes_the_decoders_images(tmp_path, latent_dir, caplog):
  """On latent data samples.npz keeps the latents and adds their SD-VAE images (uint8,
  quantised as the official sample_ddp.py saves them), which the PNG grid shows; without
  config.fid.vae only the latents are written, with a warning that names the setting. The
  training loop's sample grids need the decoder up front. The decoder divides by the
  data's latent_scale (here another VAE's 0.5, not SD-VAE's 0.18215)."""
  c = _config(TINY_DIT, dict(name='imagenet_latents', dir=latent_dir, latent_scale=0.5),
              'stee', num_sample_images=3)
  loop.train_and_evaluate(c, tmp_path)
  c.mode = 'sample'
  assert main_lib.run(c, tmp_path) is None
  assert not os.path.exists(tmp_path / 'samples.png')
  with np.load(tmp_path / 'samples.npz') as f:
    assert sorted(f) == ['labels', 'samples'] and f['samples'].shape == (3, 8, 8, 4)
    latents = f['samples']
  assert any('samples.png (and samples.npz\'s images) is not written: the samples are '
             "latents ('imagenet_latents'), and their images need the SD-VAE decoder; set "
             'config.fid.vae to' in r.getMessage() for r in caplog.records)

  decoder = vae.VAEDecoder()
  decoder_variables = decoder.init(jax.random.key(1), np.zeros((1, 8, 8, 4), np.float32))
  common.save(decoder_variables, tmp_path / 'sd-vae')
  c.fid.vae = str(tmp_path / 'sd-vae')
  path = main_lib.run(c, tmp_path)
  expected = np.asarray(fid.to_uint8(vae.VAEDecoder(latent_scale=0.5).apply(
      decoder_variables, latents)))
  with np.load(tmp_path / 'samples.npz') as f:
    np.testing.assert_array_equal(f['samples'], latents)
    assert f['images'].shape == (3, 64, 64, 3) and f['images'].dtype == np.uint8
    assert np.abs(f['images'].astype(int) - expected).max() <= 1
    assert len(np.unique(f['images'])) > 16  # a random decoder's image, not a constant
  with Image.open(path) as image:
    assert image.mode == 'RGB' and image.size == (128, 128)  # 2 × 2 grid of 64 × 64

  c.data.latent_scale = 0.18215  # SD-VAE's: the latents would decode 2.7 times too large
  with pytest.raises(ValueError, match=r'what that model is \(data.latent_scale: 0.5 → '
                                       r'0.18215\)'):
    main_lib.run(c, tmp_path)
  c.data.latent_scale = 0.5
  c.mode, c.fid.vae, c.sample_every = 'train', '', 1
  with pytest.raises(ValueError, match=r"^config.sample_every on latent data "
                                       r"\('imagenet_latents'\) needs the SD-VAE decoder: set "
                                       r'config.fid.vae to its weights'):
    loop.train_and_evaluate(c, tmp_path / 'grids')


def _trace_events(directory):
  """{event name: [its events' stats dicts]} of the one trace under `directory`."""
  found = glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(found) == 1, found
  events = collections.defaultdict(list)
  for plane in jax.profiler.ProfileData.from_file(found[0]).planes:
    for line in plane.lines:
      for event in line.events:
        events[event.name].append(dict(event.stats))
  return events


def test_profile_steps_trace_the_steps_after_the_skipped_ones(tmp_path):
  """config.profile_steps: a trace of steps 3, 4 and 5 of 6 (two skipped), each annotated
  with its number, holding those three executions of the train step and no other."""
  c = _demo_train_config(6)
  c.profile_skip_steps, c.profile_steps = 2, 3
  loop.train_and_evaluate(c, tmp_path)
  events = _trace_events(tmp_path)
  assert sorted(s['step_num'] for s in events['train']) == [3, 4, 5]
  runs = {s['run_id'] for stats in events.values() for s in stats
          if s.get('hlo_module') == 'jit_train_step'}
  assert len(runs) == 3


def test_a_trace_with_no_steps_skipped_starts_at_the_first_and_stops_after_its_last(
    tmp_path):
  """step_trace.StepTrace alone, around three steps of a jitted function: with no steps
  skipped the trace starts before the first, and it stops after two."""
  add = jax.jit(lambda x: x + 1)
  state = jax.numpy.zeros(4)
  with step_trace.StepTrace(tmp_path, 0, 2) as trace:
    for number in (1, 2, 3):
      with trace.step(number, state):
        state = add(state)
      trace.stepped(state)
  events = _trace_events(tmp_path)
  assert sorted(s['step_num'] for s in events['train']) == [1, 2]
  assert len({s['run_id'] for stats in events.values() for s in stats
              if s.get('hlo_module') == 'jit__lambda'}) == 2


@pytest.mark.parametrize('obstacle', ['a file at plugins/', 'another trace running'])
def test_a_trace_that_cannot_be_written_is_a_warning_not_the_end_of_the_run(obstacle,
                                                                            tmp_path, caplog):
  workdir = tmp_path / 'run'
  os.makedirs(workdir)
  c = _demo_train_config(4)
  c.profile_skip_steps, c.profile_steps = 1, 2
  if obstacle == 'a file at plugins/':
    (workdir / 'plugins').write_text('a file where the trace needs a directory')
    state, _ = loop.train_and_evaluate(c, workdir)
  else:
    with jax.profiler.trace(tmp_path / 'other'):
      state, _ = loop.train_and_evaluate(c, workdir)
  assert int(state.step) == 4
  assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(
      f'The profiler trace could not be written under {workdir} (')]
