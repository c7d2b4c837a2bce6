"""Integration error: few-step samples against the teacher's own ODE solution.

From the same noise and labels, the teacher's guided probability-flow ODE
dx/dt = v_w(x, t) (CFG at scale w: v_w = v_∅ + w·(v_y − v_∅)) is solved to tolerance 1e-6
by an adaptive solver; that is the answer a perfect integrator would give. A sampler's
error is the RMS distance to it over all pixels and samples,

    error = sqrt(mean((x_sampler − x_reference)²)),

which measures how well a secant model (or Euler/Heun at the same NFE) integrates the
teacher's ODE, separately from how good the teacher's samples are.
"""

import jax.numpy as jnp

from secant_jax import guidance
from secant_jax import sampling
from secant_jax.models import precond


def teacher_tangent(path, teacher_apply, null_class, labels, scale, sigma_data=0.5):
  """v(x, t): the teacher network's tangent, CFG-guided at `scale` ([B], or None for the
  plain conditional tangent), for fixed labels."""
  secant_fn = precond.secant_from_network(path, teacher_apply, sigma_data)
  conditional = lambda x, t, y: precond.tangent_from_secant(secant_fn)(x, t, y, None)
  if scale is None:
    return lambda x, t: conditional(x, t, labels)
  guided = guidance.classifier_free(conditional, null_class)
  return lambda x, t: guided(x, t, labels, scale)


def rms(x, reference):
  return float(jnp.sqrt(jnp.mean(jnp.square(x - reference))))


def teacher_solver_errors(tangent, noise, path, reference, nfe):
  """{'teacher_euler', 'teacher_heun'}: errors at `nfe` evaluations (Heun: nfe/2 steps;
  at one evaluation Heun is an Euler step)."""
  euler = sampling.ode_sample(tangent, noise, path, nfe, 'euler')
  heun = sampling.ode_sample(tangent, noise, path, nfe // 2, 'heun') if nfe >= 2 else euler
  return {'teacher_euler': rms(euler, reference), 'teacher_heun': rms(heun, reference)}
