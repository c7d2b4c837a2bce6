"""README's API block (under "## The API"), run as written, statement by statement, with its
placeholders bound to an analytic teacher: a Gaussian mixture's exact velocity. A call the
README shows that the code no longer takes fails here, and what each line computes is
checked against the equations it stands for."""

import ast
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from secant_jax import guidance
from secant_jax import paths
from secant_jax import secant
from secant_jax.evaluation import oracle

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def _api_block():
  with open(README, encoding='utf-8') as f:
    section = f.read().split('\n## The API\n', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def _run_recording_assignments(source, namespace):
  """Executes `source` in `namespace` one statement at a time; returns {name: [the value
  after each assignment to it, in order]}."""
  values = {}
  for statement in ast.parse(source).body:
    code = compile(ast.Module([statement], []), README, 'exec')
    exec(code, namespace)  # pylint: disable=exec-used
    if isinstance(statement, ast.Assign):
      names = [n.id for target in statement.targets for n in ast.walk(target)
               if isinstance(n, ast.Name)]
      for name in names:
        values.setdefault(name, []).append(namespace[name])
  return values


def test_the_readmes_api_block_runs_and_computes_what_it_says():
  mixture = oracle.GaussianMixture(means=[[-1.0, 0.5], [1.0, -0.5]], stds=[0.3, 0.2],
                                   weights=[0.4, 0.6])
  batch, num_steps, null_class = 16, 8, 2
  namespace = {}
  velocity = lambda x, t: mixture.velocity(x, t, namespace['path'])  # the path set last
  k_data, k_noise = jax.random.split(jax.random.key(1))
  # Labels the mixture does not read: CFG of two equal passes is the velocity at any w.
  teacher_fn = guidance.classifier_free(lambda x, t, y: velocity(x, t), null_class)
  namespace.update(
      key=jax.random.key(0), batch=batch, num_steps=num_steps, tangent_fn=velocity,
      teacher_fn=teacher_fn, secant_fn=lambda x, t, s, y, w: teacher_fn(x, t, y, w),
      x_data=mixture.sample(k_data, batch), noise=jax.random.normal(k_noise, (batch, 2)),
      y=jnp.zeros(batch, jnp.int32), w=jnp.full(batch, 1.5))
  values = _run_recording_assignments(_api_block(), namespace)

  assert [type(p) for p in values['path']] == [paths.Linear, paths.EDM]
  path, times = namespace['path'], namespace['times']
  assert isinstance(times, secant.TimePairs) and times.t.shape == (batch,)
  # SDEI with f(x, t, s) = v(x, t): ‖v(x_t, t) − v(x_t + (r − t)·v(x_t, t), r)‖², per pixel
  x_t = path.at(namespace['x_data'], namespace['noise'], times.t)
  v_t = velocity(x_t, times.t)
  x_r = x_t + (times.r - times.t)[:, None] * v_t
  expected = jnp.mean((v_t - velocity(x_r, times.r)) ** 2, axis=1)
  per_example, aux = namespace['per_example'], namespace['aux']
  np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-9)
  assert float(jnp.min(per_example)) > 0
  np.testing.assert_array_equal(aux['secant'], per_example)
  np.testing.assert_array_equal(aux['diffusion'], 0.0)
  # The secant sampler with f(x, t, s) = v(x, t) is Euler's method; Heun's, by hand:
  # x ← x + h/2·(v(x, t) + v(x + h·v(x, t), t + h)) over the path's grid from σ(t_0)·ε.
  x_euler = x_heun = path.prior(namespace['noise'])
  grid = path.grid(num_steps)
  for t, s in zip(grid[:-1], grid[1:]):
    at = lambda x, time: velocity(x, jnp.full(batch, time))
    x_euler = x_euler + (s - t) * at(x_euler, t)
    v = at(x_heun, t)
    x_heun = x_heun + 0.5 * (s - t) * (v + at(x_heun + (s - t) * v, s))
  secant_sample, heun_sample = values['x']
  np.testing.assert_allclose(secant_sample, x_euler, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(heun_sample, x_heun, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(x_heun - x_euler))) > 0.1  # the two checks tell them apart
