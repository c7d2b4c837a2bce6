"""The train state: everything a resumed run needs, as one pytree of arrays."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params/ema_params: network variables ('params' and constants such
  as 'buffers'); opt_state: optax state of params['params']; rng: raw key data (uint32),
  folded with the step inside the train step so a resumed run repeats the same draws."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array

  @property
  def key(self):
    return jax.random.wrap_key_data(self.rng)


def create(variables, optimizer: optax.GradientTransformation, key):
  """A fresh state at step 0 with EMA = the initial (e.g. teacher-converted) variables."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables,
                    ema_params=jax.tree_util.tree_map(jnp.array, variables),
                    opt_state=optimizer.init(variables['params']),
                    rng=jax.random.key_data(key))
