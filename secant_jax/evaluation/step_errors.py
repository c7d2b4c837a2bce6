"""Where a fixed-grid sampler's error comes from: the error at the end that each of its
steps makes alone.

Step k of a sampler (sampling.Steps) takes x from grid time t_k to t_{k+1}. Started from
the reference trajectory's own point x*(t_k) (the teacher's ODE solved to tolerance from
the same noise), it lands off the trajectory by its local error; solving the teacher's ODE
to tolerance from there (Φ, sampling.reference_solve) carries that error to where samples
are compared:

    e_k = RMS(Φ_{t_{k+1} → end}(step(x*(t_k), k)) − x*(end)),

over pixels and samples, like the comparison's error column. The last step lands at the
end and is compared there directly (on the EDM path its end is σ = 0, the reference's
σ_min, as in that column). To first order in the local errors a sampler's error is the
sum of its steps' propagated errors as vectors, so the e_k say which step, i.e. which
range of noise levels, the error comes from; they need not add up to it in RMS, as the
errors of different steps can cancel or add.

Per batch, the trajectory costs about one reference solve per grid (samplers with the same
grid share it), and each step's Φ the part of one from t_{k+1} on: up to N − 1 reference
solves per sampler of N steps, nearly that on the EDM path's ρ-schedule, whose adaptive
solves spend most of their steps at small σ.
"""

import jax
import numpy as np

from secant_jax import sampling
from secant_jax.evaluation import reference_error


class StepErrors:
  """Sums of each step's squared propagated error for the samplers at `indices` of
  `samplers` (evaluation.comparison.Sampler), added batch by batch (`add`) with the
  batch's reference solution. `tangent_of` (labels → v(x, t)) is the teacher's, `path`
  its path; every solve and step is jitted once, with outputs in `sharding`."""

  def __init__(self, samplers, indices, tangent_of, path, sharding, labels):
    self.indices = tuple(indices)
    self.start, self.end = np.asarray(path.grid(1))
    self.grids = {i: np.asarray(samplers[i].steps(labels).grid) for i in self.indices}
    self.squared = {i: np.zeros(len(self.grids[i]) - 1) for i in self.indices}
    self._solve = jax.jit(
        lambda x, y, t0, t1: sampling.reference_solve(tangent_of(y), x, t0, t1),
        out_shardings=sharding)
    self._steps = {i: jax.jit(lambda x, y, k, s=samplers[i]: s.steps(y).step(x, k),
                              out_shardings=sharding) for i in self.indices}
    self._prior = path.prior

  def _trajectory(self, grid, noise, labels):
    """[x*(t_0), ..., x*(t_{N−1})]: the reference trajectory at the grid's times but the
    last, each solved on from the one before (the first from the path's start, where a
    secant model's own path starts later)."""
    x = self._prior(noise)
    points = [x if grid[0] == self.start else self._solve(x, labels, self.start, grid[0])]
    for k in range(1, len(grid) - 1):
      points.append(self._solve(points[-1], labels, grid[k - 1], grid[k]))
    return points

  def add(self, noise, labels, reference, keep):
    """Adds the first `keep` samples' squared errors of each step (the batch's
    `reference` solution solved from `noise`)."""
    trajectories = {}
    for i in self.indices:
      grid = self.grids[i]
      if grid.tobytes() not in trajectories:
        trajectories[grid.tobytes()] = self._trajectory(grid, noise, labels)
      points = trajectories[grid.tobytes()]
      for k in range(len(grid) - 1):
        x = self._steps[i](points[k], labels, k)
        if k < len(grid) - 2:
          x = self._solve(x, labels, grid[k + 1], self.end)
        self.squared[i][k] += reference_error.squared_distance(x, reference, keep)

  def state(self):
    return {f'step_squared{i}': e for i, e in self.squared.items()}

  def restore(self, state):
    self.squared = {i: np.array(state[f'step_squared{i}'], np.float64) for i in self.indices}

  def result(self, i, per_value):
    """Sampler i's {'step_errors': [e_k], 'step_grid': [t_k]} over `per_value` values."""
    return {'step_errors': [float(np.sqrt(e / per_value)) for e in self.squared[i]],
            'step_grid': [float(t) for t in self.grids[i]]}

