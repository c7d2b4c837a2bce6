"""The teacher tangent that integration errors and teacher sample grids are measured with."""

import types

import jax.numpy as jnp
import numpy as np

from secant_jax import paths
from secant_jax.evaluation import reference_error


class _CountingNetwork:
  """v(x, t, y) = (y + 1)·x (the null class 3 gives 4·x); counts the examples it sees."""
  null_class = 3

  def __init__(self):
    self.examples = 0

  def inference_variables(self, variables):
    return variables

  def apply(self, variables, x, t, s, y, w):
    self.examples += x.shape[0]
    return variables['scale'] * (y[:, None] + 1.0) * x


def test_scale_one_is_the_conditional_tangent_in_one_pass_and_cfg_combines_two():
  task = types.SimpleNamespace(path=paths.Linear(), sigma_data=0.5)
  x, t, labels = jnp.ones((2, 1)), jnp.full((2,), 0.5), jnp.array([0, 1])
  network, variables = _CountingNetwork(), {'scale': 2.0}
  for scale in (None, 1.0):
    v = reference_error.teacher_tangent(network, variables, task, labels, scale)(x, t)
    np.testing.assert_allclose(v, [[2.0], [4.0]])
  assert network.examples == 4  # two calls, one pass of two examples each
  v = reference_error.teacher_tangent(network, variables, task, labels, 2.0)(x, t)
  # v_∅ + 2·(v_y − v_∅) with v_∅ = 8: labels 0 → 8 + 2·(2 − 8) = −4, 1 → 8 + 2·(4 − 8) = 0
  np.testing.assert_allclose(v, [[-4.0], [0.0]])
  assert network.examples == 8  # the guided call: conditional and null in one batch of 4
