"""The comparison's error of each step alone (evaluation.step_errors), on a Gaussian mixture
whose flow the reference solver gives: a sampler exact but for one Euler step has all of
its error in that step's column, equal to its row's error, and none in the others'; the
EDM sampler's last step, to σ = 0, is compared without a solve; a sampler whose path starts
later starts there, from the reference trajectory in its steps; a breakdown asked for a
count no row has is refused by name; a comparison saved before the option existed
resumes."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secant_jax import compare_mode
from secant_jax import config as config_lib
from secant_jax import paths
from secant_jax import sampling
from secant_jax.evaluation import comparison
from secant_jax.evaluation import oracle
from secant_jax.train import parallel

MIXTURE = oracle.GaussianMixture([[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3], [0.3, 0.7])


def _exact_but(path, num_steps, wrong):
  """Steps on the path's grid that follow the exact flow, but step `wrong`, Euler's."""
  tangent = lambda x, t: MIXTURE.velocity(x, t, path)
  euler = sampling.ode_steps(tangent, path, num_steps, 'euler')
  grid = euler.grid

  def step(x, k):
    exact = MIXTURE.flow(x, grid[k], grid[k + 1], path)
    return jnp.where(k == wrong, euler.step(x, k), exact)

  return sampling.Steps(grid, step)


def _compare(path, samplers, step_nfes, count=20, batch=8):  # the last batch partial
  tangent_of = lambda y: lambda x, t: MIXTURE.velocity(x, t, path)
  noise = np.asarray(jax.random.normal(jax.random.key(0), (count, 2)))
  rows, _ = comparison.compare(samplers, types.SimpleNamespace(path=path), tangent_of, noise,
                               np.zeros(count, np.int32), batch, parallel.make_mesh(),
                               step_nfes=step_nfes)
  return rows


@pytest.mark.parametrize('path', [paths.Linear(), paths.EDM()], ids=['linear', 'edm'])
def test_one_wrong_step_carries_the_whole_error(path):
  samplers = [comparison.Sampler(f'Euler at step {j}', 3, lambda y, j=j: _exact_but(path, 3, j))
              for j in range(3)]
  samplers.append(comparison.Sampler('not broken down', 2, lambda y: _exact_but(path, 2, 0)))
  rows = _compare(path, samplers, step_nfes=(3,))
  assert 'step_errors' not in rows[0] and 'step_errors' not in rows[4]
  for j, row in enumerate(rows[1:4]):
    np.testing.assert_allclose(row['step_grid'], path.grid(3), rtol=1e-6)
    errors = row['step_errors']
    assert row['error'] > 1e-4, row  # far above the solver's tolerance
    np.testing.assert_allclose(errors[j], row['error'], rtol=1e-3)
    assert max(np.delete(errors, j)) < 1e-2 * row['error'], row


def test_edm_samplers_last_step_to_sigma_zero_is_compared_directly():
  path = paths.EDM()
  tangent_of = lambda y: lambda x, t: MIXTURE.velocity(x, t, path)
  samplers = comparison.teacher_samplers(types.SimpleNamespace(path=path), tangent_of, (1, 4))
  rows = _compare(path, samplers, step_nfes=(1, 3))
  by_name = {(r['sampler'], r['nfe']): r for r in rows}
  euler, edm = by_name['teacher Euler', 1], by_name['teacher Heun', 3]
  # One step: nothing to solve (the step jitted alone rounds unlike the scan of all steps).
  np.testing.assert_allclose(euler['step_errors'], [euler['error']], rtol=1e-5)
  np.testing.assert_allclose(edm['step_grid'], [80.0, 0.002, 0.0], rtol=1e-6)
  # Step 2 starts from the reference itself: its error is D(x*; σ_min)'s distance to x*.
  noise = np.asarray(jax.random.normal(jax.random.key(0), (20, 2)))
  reference = sampling.reference_sample(tangent_of(None), noise, path)
  last = reference - 0.002 * MIXTURE.velocity(reference, jnp.full(20, 0.002), path)
  np.testing.assert_allclose(edm['step_errors'][1],
                             np.sqrt(np.mean(np.square(last - reference))), rtol=1e-4)
  assert 0 < edm['step_errors'][0] and 'step_errors' not in by_name['teacher Euler', 4]
  tables = comparison.format_step_tables(rows)
  assert '| sampler | NFE | 80 → 0.002 | 0.002 → 0 | all steps |' in tables
  assert '| sampler | NFE | 80 → 0.002 | all steps |' in tables


def test_a_sampler_whose_path_starts_later_starts_from_its_own_noise_level():
  """A secant model trained on the EDM path with σ_max 20 runs from 20·ε in the table (its
  error: how far the exact flow from there ends from the reference, solved from 80·ε), and
  its steps, taken from the reference trajectory at σ 20 on, carry none of that."""
  path, later = paths.EDM(), paths.EDM(sigma_max=20.0)
  exact_from_20 = comparison.Sampler('exact from 20', 3,
                                     lambda y: _exact_but(later, 3, wrong=-1))  # no step
  row = _compare(path, [exact_from_20], step_nfes=(3,))[1]
  noise = np.asarray(jax.random.normal(jax.random.key(0), (20, 2)))
  ends = [MIXTURE.flow(start * noise, start, 0.002, path) for start in (20.0, 80.0)]
  expected = np.sqrt(np.mean(np.square(ends[0] - ends[1])))
  assert expected > 1e-3  # far above the solver's tolerance
  np.testing.assert_allclose(row['error'], expected, rtol=1e-3)
  np.testing.assert_allclose(row['step_grid'], later.grid(3), rtol=1e-6)
  assert max(row['step_errors']) < 1e-2 * expected, row


def test_a_secant_run_on_another_kind_of_path_is_refused():
  teacher = config_lib.base_config()
  secant_run = config_lib.base_config()
  teacher.path.name, secant_run.path.name = 'edm', 'linear'
  with pytest.raises(ValueError, match=r"Secant run sdei \(runs/a\) was trained on the "
                                       r"'linear' path and the teacher on the 'edm' path: a "
                                       r"table compares samplers of the teacher's ODE"):
    compare_mode.check_same_path('sdei', 'runs/a', secant_run, teacher)
  secant_run.path.update(name='edm', sigma_max=20.0)
  compare_mode.check_same_path('sdei', 'runs/a', secant_run, teacher)


def test_a_breakdown_no_row_has_is_refused():
  samplers = [comparison.Sampler('teacher Heun', 3, None), comparison.Sampler('secant', 4, None)]
  compare_mode.check_step_errors((4, 3), samplers)
  with pytest.raises(ValueError, match=r'config.compare.step_errors has \[2\], which no row of '
                                       r'the table has in its NFE column \(the rows have '
                                       r'\[3, 4\]\): pick from those'):
    compare_mode.check_step_errors((2, 4), samplers)


def test_progress_stamped_before_the_option_existed_resumes():
  """Without step errors the stamp has only the settings it had before the option."""
  c = config_lib.base_config().compare
  assert sorted(compare_mode.stamped_settings(c)) == [
      'batch_size', 'guidance_scale', 'num_samples', 'secant_steps', 'secants', 'teacher',
      'teacher_nfe']
  c.step_errors = (4,)
  assert compare_mode.stamped_settings(c)['step_errors'] == (4,)
