"""A preempted comparison resumes: stopped by SIGTERM in its first batch, it saves after
that batch and stops, and run again, it gives exactly the table of a run never stopped,
without redoing that batch; a workdir
holding another comparison's progress is refused by name. Kept reference solutions are
read back instead of solved, and another comparison's are refused by name. A config's own
converted teacher is compared without a training run, in float32 whatever its dtype, and
its weights replaced in place are not taken for the ones compared before."""

import os
import re
import signal
import types

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

from secant_jax import compare_mode
from secant_jax import paths
from secant_jax import sampling
from secant_jax import stop_requests
from secant_jax.convert import common
from secant_jax.evaluation import comparison
from secant_jax.evaluation import features
from secant_jax.evaluation import oracle
from secant_jax.evaluation import progress
from secant_jax.evaluation import references
from secant_jax.evaluation import sample_quality
from secant_jax.models import registry
from secant_jax.train import parallel

STAMP = {'compare': {'num_samples': 20, 'batch_size': 8}, 'seed': 0}


def _quality():
  """SampleQuality's interface around the identity as feature network (the 2-d samples are
  the features, the logits of an Inception Score and the images scored), the standard
  normal as reference."""
  quality = types.SimpleNamespace(
      network=features.FeatureNetwork('fd_identity', 2, None, None), variables=None,
      features_of=lambda variables, x: {'features': x, 'logits': x, 'pixels': x},
      reference=(np.zeros(2), np.eye(2)))
  quality.scores = lambda: sample_quality.Scores(quality)
  return quality


def _run(saves, kept=None):
  """A mixture's reference and Euler/Heun at 1 and 2 NFE, those at 2 with their steps'
  errors: 20 samples in batches of 8 (the last one partial), saved as `saves` says."""
  path = paths.Linear()
  mixture = oracle.GaussianMixture([[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3], [0.3, 0.7])
  tangent_of = lambda y: lambda x, t: mixture.velocity(x, t, path)
  task = types.SimpleNamespace(path=path)
  noise = np.asarray(jax.random.normal(jax.random.key(0), (20, 2)))
  return comparison.compare(comparison.teacher_samplers(task, tangent_of, (1, 2)), task,
                            tangent_of, noise, np.zeros(20, np.int32), 8,
                            parallel.make_mesh(), _quality(), saves, kept, step_nfes=(2,))


def test_a_preempted_comparison_resumes_to_the_same_table(tmp_path, progress_saves):
  rows, firsts = _run(None)
  assert set(rows[0]) == {'sampler', 'nfe', 'error', 'fd_identity', 'inception_score',
                          'inception_score_std'}
  assert [len(r['step_errors']) for r in rows if 'step_errors' in r] == [2, 1]  # Euler, Heun
  saved = progress_saves.done
  before = signal.getsignal(signal.SIGTERM)
  with progress.stop_requests_of_an_evaluation() as stop, pytest.raises(
      stop_requests.Stopped, match=rf'^Stopped on SIGTERM after 8 of 20 samples, with the '
                                   rf'progress saved in {re.escape(str(tmp_path))}; the same '
                                   r'command resumes it\.$'):
    _run(progress.Progress(str(tmp_path), STAMP, 3600.0, stop))  # saved for the stop alone
  assert signal.getsignal(signal.SIGTERM) is before  # given back
  resumed, resumed_firsts = _run(progress.Progress(str(tmp_path), STAMP))
  assert saved == [8, 16, 20]  # the resumed run started after the first batch
  assert resumed == rows
  assert sorted(firsts) == sorted(resumed_firsts) == [-1, 0, 1, 2, 3]
  for i, first in firsts.items():
    np.testing.assert_array_equal(resumed_firsts[i], first)
  assert progress.Progress(str(tmp_path), STAMP).saved() == [16, 20]  # the latest two

  assert _run(progress.Progress(str(tmp_path), STAMP))[0] == rows  # finished: only the table
  assert saved == [8, 16, 20]
  (tmp_path / 'hourly').mkdir()
  assert _run(progress.Progress(str(tmp_path / 'hourly'), STAMP, 3600.0))[0] == rows
  assert saved == [8, 16, 20, 20]  # none due before the end

  other = {'compare': {'num_samples': 40, 'batch_size': 8}, 'seed': 1}
  with pytest.raises(ValueError, match=r'progress.process_0.20.npz holds the progress of a '
                                       r'different evaluation \(it differs in '
                                       r'compare.num_samples, seed\): finish that one'):
    _run(progress.Progress(str(tmp_path), other))


def test_ctrl_c_stops_a_comparison_after_its_batch_with_its_progress_saved(
    tmp_path, progress_saves, set_sigint, capfd):
  """Ctrl-C raised KeyboardInterrupt wherever the batch was, losing the batches since the
  last save (every eval_save_seconds, 300 by default)."""
  set_sigint(signal.default_int_handler)
  progress_saves.signum = signal.SIGINT
  with progress.stop_requests_of_an_evaluation() as stop, pytest.raises(
      stop_requests.Stopped, match=r'^Stopped on Ctrl-C after 8 of 20 samples'):
    _run(progress.Progress(str(tmp_path), STAMP, 3600.0, stop))
  assert progress_saves.done == [8]
  assert ('Ctrl-C: the run stops after this batch, with its progress saved. Ctrl-C again: '
          'it stops now (its last save is kept).') in capfd.readouterr().err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_progress_loads_its_latest_whole_save(where, tmp_path, request):
  """Saves are whole (locally a temporary file renamed, on a bucket one upload), the two
  latest are kept, and a temporary file left by a stop mid-write is not taken for a save."""
  directory = (f"{request.getfixturevalue('gcs_bucket')}/table" if where == 'bucket'
               else str(tmp_path))
  saves = progress.Progress(directory, STAMP)
  assert saves.load() == (0, None)
  for done in (8, 16, 20):
    saves.save(done, {'squared': np.full(3, float(done))})
  epath.Path(directory, 'progress.process_0.28.npz.tmp').write_text('cut off')
  assert saves.saved() == [16, 20]
  done, arrays = progress.Progress(directory, STAMP).load()
  assert done == 20 and set(arrays) == {'squared'}
  np.testing.assert_array_equal(arrays['squared'], [20.0, 20.0, 20.0])


def test_kept_references_are_read_instead_of_solved(tmp_path, monkeypatch):
  rows, firsts = _run(None)
  stamp = {'teacher': '/runs/mixture', 'guidance_scale': 1.0, 'num_samples': 20}
  assert _run(None, kept=references.References(str(tmp_path), stamp))[0] == rows
  assert sorted(os.listdir(tmp_path)) == [f'reference.{s}.npz' for s in (0, 16, 8)]

  def unsolvable(*args):
    raise AssertionError('solved a reference that was kept')

  monkeypatch.setattr(sampling, 'reference_sample', unsolvable)
  read_rows, read_firsts = _run(None, kept=references.References(str(tmp_path), stamp))
  assert read_rows == rows
  np.testing.assert_array_equal(read_firsts[-1], firsts[-1])
  other = dict(stamp, guidance_scale=1.5)
  with pytest.raises(ValueError, match=r'reference.0.npz holds the reference solutions of '
                                       r'another comparison \(it differs in guidance_scale\): '
                                       r'pass another --config.compare.references'):
    _run(None, kept=references.References(str(tmp_path), other))
  with pytest.raises(AssertionError, match='solved a reference that was kept'):
    _run(None, kept=references.References(str(tmp_path / 'elsewhere'), stamp))


def test_the_configs_own_converted_teacher_is_compared_without_a_run(tmp_path):
  """ImageNet's and CIFAR-10's teachers are converted checkpoints, not training runs: with
  compare.teacher empty the table is of config.teacher_checkpoint, built as config.model."""
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  c = fashion_mnist.get_config('stage=compare,model=tiny')
  c.compare.update(dict(teacher='', secants='', teacher_nfe=(1, 2), num_samples=8,
                        batch_size=8))
  c.fid.fmnist = ''
  with pytest.raises(ValueError, match=r'The comparison needs a teacher: set '
                                       r'--config.compare.teacher .* or config.teacher_'):
    c.teacher_checkpoint = c.init_checkpoint = ''
    compare_mode.compare(c, tmp_path / 'none')
  teacher = registry.build(c.model, guided=False)
  rng = np.random.default_rng(0)  # off DiT's zero-initialised output layer: a non-zero tangent
  perturbed = lambda: jax.tree_util.tree_map(
      lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
      teacher.init(jax.random.key(0)))
  common.save(perturbed(), tmp_path / 'converted')
  c.teacher_checkpoint = str(tmp_path / 'converted')
  rows = compare_mode.compare(c, tmp_path / 'table')
  assert [(r['sampler'], r['nfe']) for r in rows] == [
      ('teacher adaptive reference', None), ('teacher Euler', 1), ('teacher Euler', 2),
      ('teacher Heun', 1), ('teacher Heun', 2)]
  assert all(np.isfinite(r['error']) for r in rows) and rows[2]['error'] > 0
  assert (tmp_path / 'table' / 'table.md').is_file()
  assert c.model.dtype == 'bfloat16'  # overridden: compare_in_float32
  c.model.dtype = 'float32'
  assert compare_mode.compare(c, tmp_path / 'float32') == rows
  c.compare.references = str(tmp_path / 'references')  # kept, and stamped with precision
  assert compare_mode.compare(c, tmp_path / 'kept') == rows
  c.model.dtype, c.compare_in_float32 = 'bfloat16', False
  with pytest.raises(ValueError, match=r'holds the reference solutions of another '
                                       r'comparison \(it differs in compare_in_float32, '
                                       r'matmul_precision\)'):
    compare_mode.compare(c, tmp_path / 'other')
  c.compare.references = ''
  in_bfloat16 = compare_mode.compare(c, tmp_path / 'bfloat16')
  assert [r['error'] for r in in_bfloat16][1:] != [r['error'] for r in rows][1:]
  common.save(perturbed(), tmp_path / 'converted', overwrite=True)  # replaced in place
  with pytest.raises(ValueError, match=r'holds the progress of a different evaluation '
                                       r'\(it differs in compare_in_float32, '
                                       r'matmul_precision, weights.teacher\)'):
    compare_mode.compare(c, tmp_path / 'table')


def test_grids_show_the_images_of_the_samples(tmp_path):
  """write_grids draws `images_of(samples)` (latents decoded, on ImageNet), each row's grid
  and the overview's first columns from the same images."""
  rows = [{'sampler': 'teacher Euler', 'nfe': 1}, {'sampler': 'secant stee', 'nfe': 4}]
  firsts = {0: np.full((3, 2, 2, 4), -1.0, np.float32),
            1: np.full((3, 2, 2, 4), 1.0, np.float32)}
  images_of = lambda latents: np.repeat(np.repeat(latents[..., :3], 4, 1), 4, 2) * 0.5
  overview = comparison.write_grids(rows, firsts, tmp_path, images_of, overview_columns=3,
                                     zoom=1)
  assert overview.shape == (16, 24, 3)  # 2 rows of 3 images of 8 × 8 pixels
  np.testing.assert_allclose(overview[:8], 0.25)
  np.testing.assert_allclose(overview[8:], 0.75)
  with Image.open(tmp_path / 'samples' / 'secant-stee-4.png') as image:
    assert image.mode == 'RGB' and image.size == (16, 16)  # 2 × 2 grid, one place empty
    np.testing.assert_array_equal(np.asarray(image)[:8, :16], 191)
