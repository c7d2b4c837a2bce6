"""Integration error: few-step samples against the teacher's own ODE solution.

From the same noise and labels, the teacher's guided probability-flow ODE
dx/dt = v_w(x, t) (CFG at scale w: v_w = v_∅ + w·(v_y − v_∅)) is solved to tolerance 1e-6
by an adaptive solver; that is the answer a perfect integrator would give. A sampler's
error is the RMS distance to it over all pixels and samples,

    error = sqrt(mean((x_sampler − x_reference)²)),

which measures how well a secant model (or Euler/Heun at the same NFE) integrates the
teacher's ODE, separately from how good the teacher's samples are.

Measured in float32 (config.compare_in_float32, the default): every network involved
computes in float32 with float32 products. An adaptive solver keeps its error estimate,
the difference of two orders' steps, under 1e-6; with bfloat16 outputs (about three
significant digits) or TF32 products that difference is the rounding, a tangent no step
is small enough for, so the solve takes many times the steps, and the rounding, not the
solvers, sets the error of the best ones.
"""

import jax
import jax.numpy as jnp

from secant_jax import guidance
from secant_jax import sampling
from secant_jax.models import precond


def precision(config):
  """The precision of float32 products (config.MATMUL_PRECISIONS) that integration errors
  under `config` are measured at: 'float32' when config.compare_in_float32, else the run's
  config.matmul_precision."""
  return 'float32' if config.get('compare_in_float32', True) else config.matmul_precision


def precision_scope(config):
  """The context integration errors under `config` are traced in:
  jax.default_matmul_precision at `precision(config)` ('' leaves JAX's default)."""
  return jax.default_matmul_precision(precision(config) or None)


def measured_config(run_config, float32):
  """`run_config` as an integration error builds its network: with `float32`
  (config.compare_in_float32 of the measuring run) a copy in float32 throughout
  (model.dtype, the DiT's model.residual_dtype, and XLA's attention for cuDNN's, which
  computes in float16 and bfloat16 only), else `run_config` as it is."""
  if not float32:
    return run_config
  run_config = run_config.copy_and_resolve_references()
  run_config.model.dtype = 'float32'
  if 'residual_dtype' in run_config.model:
    run_config.model.residual_dtype = 'float32'
  if run_config.model.get('attention') == 'cudnn':
    run_config.model.attention = 'xla'
  return run_config


def teacher_tangent(network, variables, task, labels, scale):
  """v(x, t): the tangent of the teacher `network` (a models.registry.Network) with
  `variables`, on task's path, for fixed labels, CFG-guided at the float `scale`; None or 1
  (v_∅ + 1·(v_y − v_∅) = v_y) is the plain conditional tangent, one network pass instead of
  two."""
  variables = network.inference_variables(variables)
  secant_fn = precond.secant_from_network(
      task.path, lambda *a: network.apply(variables, *a), task.sigma_data)
  conditional = lambda x, t, y: precond.tangent_from_secant(secant_fn)(x, t, y, None)
  if scale is None or scale == 1.0:
    return lambda x, t: conditional(x, t, labels)
  guided = guidance.classifier_free(conditional, network.null_class)
  w = jnp.full(labels.shape, scale, jnp.float32)
  return lambda x, t: guided(x, t, labels, w)


def rms(x, reference):
  return float(jnp.sqrt(jnp.mean(jnp.square(x - reference))))


def squared_distance(x, reference, keep):
  """Σ (x − reference)² over the first `keep` samples: what a batch adds to an RMS error
  (a last partial batch is filled up with samples that are not counted)."""
  return float(jnp.sum(jnp.square(x[:keep] - reference[:keep])))


def teacher_solver_errors(tangent, noise, path, reference, nfe):
  """{'teacher_euler', 'teacher_heun', 'teacher_heun_nfe'}: errors at `nfe` evaluations,
  and the evaluations Heun spent (sampling.solver_plan: one fewer for an even count on the
  EDM path, where Heun is EDM's sampler)."""
  euler = sampling.solve_with_nfe(tangent, noise, path, nfe, 'euler')
  heun = sampling.solve_with_nfe(tangent, noise, path, nfe, 'heun')
  return {'teacher_euler': rms(euler, reference), 'teacher_heun': rms(heun, reference),
          'teacher_heun_nfe': sampling.spent_evaluations(path, 'heun', nfe)}
