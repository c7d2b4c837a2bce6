"""Integration error on an analytic teacher: secant N steps vs the teacher's Euler and Heun
at the same number of network evaluations (NFE), on both paths.

    python -m secant_jax.bench.oracle [--config=configs/oracle.py[:quick]]

The data is a 2-D Gaussian mixture (8 modes on the unit circle, std 0.1), whose velocity
is exact (`evaluation.oracle`). For each path, variant and N a small MLP secant model
(`models.mlp`) is trained for N-step sampling: SDEI distils the exact velocity, STEE
trains from mixture samples alone. Errors are RMS distances, from the same noise, to the
adaptive reference solution of the exact ODE. Heun at 1 NFE is a single Euler step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from ml_collections import config_flags

from secant_jax import paths as paths_lib
from secant_jax import sampling
from secant_jax import secant
from secant_jax.evaluation import oracle
from secant_jax.evaluation import reference_error
from secant_jax.models import mlp
from secant_jax.models import precond

PATHS = {'linear': paths_lib.Linear, 'edm': paths_lib.EDM}


def ring_mixture(num_modes=8, radius=1.0, std=0.1):
  angles = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  return oracle.GaussianMixture(means, np.full(num_modes, std), np.ones(num_modes))


def train_secant(mixture, path, variant, num_steps, config, key):
  """Trains an MLP secant model for `num_steps`-step sampling; returns (secant_fn, losses)."""
  model = mlp.SecantMLP(out_dim=mixture.dim, width=config.width, depth=config.depth)

  def secant_fn_of(params):
    net_fn = lambda x, t, s, y, w: model.apply(params, x, t, s)
    return precond.secant_from_network(path, net_fn, config.sigma_data)

  def teacher_fn(x, t, y, w):
    return mixture.velocity(x, t, path)

  k_init, k_train = jax.random.split(key)
  params = model.init(k_init, jnp.zeros((1, mixture.dim)), jnp.zeros((1,)), jnp.zeros((1,)))
  optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.train_steps))

  def train_step(carry, step):
    params, opt_state = carry
    k_data, k_noise, k_time = jax.random.split(jax.random.fold_in(k_train, step), 3)
    x_data = mixture.sample(k_data, config.batch_size)
    noise = jax.random.normal(k_noise, x_data.shape)
    times = secant.sample_time_pairs(k_time, config.batch_size, variant, num_steps, path)

    def objective(p):
      per_example, _ = secant.loss(variant, secant_fn_of(p), teacher_fn, path, x_data,
                                   noise, times, None, None)
      return jnp.mean(per_example)

    value, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), value

  @jax.jit
  def train(params):
    return jax.lax.scan(train_step, (params, optimizer.init(params)),
                        jnp.arange(config.train_steps))

  (params, _), losses = train(params)
  return secant_fn_of(params), np.asarray(losses)


def fidelity_table(config):
  """Rows of {path, variant, nfe, secant, euler, heun, heun_nfe, first_loss, last_loss}."""
  mixture = ring_mixture()
  key = jax.random.key(config.seed)
  rows = []
  for path_name in config.paths:
    path = PATHS[path_name]()
    noise = jax.random.normal(jax.random.fold_in(key, 1), (config.num_eval, mixture.dim))
    reference = sampling.reference_sample(lambda x, t: mixture.velocity(x, t, path),
                                          noise, path)
    for variant in config.variants:
      for num_steps in config.steps:
        train_key = jax.random.fold_in(jax.random.fold_in(key, 2), num_steps)
        secant_fn, losses = train_secant(mixture, path, variant, num_steps, config, train_key)
        sample = sampling.secant_sample(secant_fn, noise, path, num_steps, None, None)
        teacher = reference_error.teacher_solver_errors(
            lambda x, t: mixture.velocity(x, t, path), noise, path, reference, num_steps)
        window = max(len(losses) // 10, 1)
        rows.append(dict(path=path_name, variant=variant, nfe=num_steps,
                         secant=reference_error.rms(sample, reference),
                         euler=teacher['teacher_euler'], heun=teacher['teacher_heun'],
                         heun_nfe=teacher['teacher_heun_nfe'],
                         first_loss=float(losses[:window].mean()),
                         last_loss=float(losses[-window:].mean())))
  return rows


def _spent(row):
  """' (3 NFE)' where Heun spent fewer evaluations than the row's NFE (EDM's sampler)."""
  return '' if row['heun_nfe'] == row['nfe'] else f" ({row['heun_nfe']} NFE)"


def format_table(rows):
  lines = ['| path | variant | NFE | secant | teacher Euler | teacher Heun | loss first→last 10% |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['path']} | {r['variant']} | {r['nfe']} | {r['secant']:.4f} | "
                 f"{r['euler']:.4f} | {r['heun']:.4f}{_spent(r)} | "
                 f"{r['first_loss']:.4f}→{r['last_loss']:.4f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  print(format_table(fidelity_table(flags.FLAGS.config)))


def define_flags(flag_values=flags.FLAGS, sys_argv=None):
  """Defines --config (default configs/oracle.py) in `flag_values`, its --config.key=value
  overrides read from `sys_argv` (default sys.argv)."""
  config_flags.DEFINE_config_file('config', 'configs/oracle.py', 'Oracle benchmark settings.',
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)


if __name__ == '__main__':  # flags defined here only, so importing this module defines none
  define_flags()
  app.run(main)
