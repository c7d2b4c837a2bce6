"""One train step, pure: (state, teacher variables, batch) → (state, metrics).

The step draws everything from the state's key folded with the step: time pairs (t, s, r,
τ), noise, label dropout (classifier-free training) and guidance scales (embedded CFG);
builds the secant from the network and the guided teacher tangent; takes the loss of the
configured variant, its gradient taken over the whole batch at once or accumulated over
microbatches; applies the optimizer and the EMA. It knows the variant only as data: the
loss dispatches on it.

Labels are dropped in the terms trained without guidance. Without embedded guidance that
is every term (STEE, a teacher, an unguided STEI). With it, the secant term's target is
the teacher's CFG at the student's w and sees the true labels, and STEI's diffusion term,
whose target is the unguided conditional tangent, is trained at w = 1 with dropped labels:
the official code's STEI with its guidance embedding.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secant_jax import guidance
from secant_jax import paths as paths_lib
from secant_jax import secant
from secant_jax.models import precond


@dataclasses.dataclass(frozen=True)
class SecantTask:
  """What is trained: variant, path and step count, and how labels and guidance enter.

  label_dropout: probability of the null label in the terms trained without guidance
    (CFG training; STEE's and STEI's 0.1).
  guidance_range: (w_min, w_max) for embedded CFG (SDEI, STEI, SDEE): w ~ U(w_min, w_max)
    is the teacher's CFG scale and, normalised to [0, 1], the student's input; None: no
    guidance (the teacher is called with the labels only).
  diffusion_log_sigma: (P_mean, P_std) draws the diffusion term's σ as EDM does, ln σ ~
    N(P_mean, P_std²) (EDM path; `secant.sample_time_pairs`); None: the path's grid.
  """
  variant: str
  path: paths_lib.AffinePath
  num_steps: int
  null_class: int
  label_dropout: float = 0.0
  guidance_range: tuple[float, float] | None = None
  stei_lambda: float = 1.0
  stei_target: str = 'teacher'
  sigma_data: float = 0.5
  loss_weighting: str = 'uniform'
  diffusion_log_sigma: tuple[float, float] | None = None

  def __post_init__(self):
    """Checks the settings when the task is made (the trainer makes it from the config
    before loading a teacher or data), so that a bad value fails at once, naming its key
    (`weight_fn` checks loss_weighting)."""
    secant.check_variant(self.variant)
    paths_lib.check_num_steps(self.num_steps, 'num_steps (config.secant.steps)')
    guidance.check_drop_prob(self.label_dropout, 'label_dropout (config.secant.label_dropout)')
    self.weight_fn()
    secant.check_log_sigma(self.diffusion_log_sigma, self.variant, self.path,
                           'diffusion_log_sigma (config.secant.diffusion_log_sigma)')
    if self.guidance_range is not None:
      guidance.check_ordered_pair(self.guidance_range, 'guidance_range (config.secant.guidance)')
    if self.variant == 'stei':
      secant.check_stei_target(self.stei_target, 'stei_target (config.secant.stei_target)')
      if self.stei_target == 'self' and self.guidance_range is not None:
        raise ValueError(
            "stei_target='self' trains without a teacher, so nothing gives the CFG target an "
            f'embedded guidance scale needs, but guidance_range is {self.guidance_range}: set '
            "none with --config.secant.guidance='()' (STEI then drops labels and samples with "
            'classic CFG).')

  def weight_fn(self):
    """The loss's per-example weight of path time (`precond.loss_weight_fn`)."""
    return precond.loss_weight_fn(self.path, self.loss_weighting, self.sigma_data,
                                  'loss_weighting (config.secant.loss_weighting)')

  @property
  def needs_teacher(self):
    return self.variant in ('sdei', 'sdee') or (self.variant == 'stei'
                                                 and self.stei_target == 'teacher')


# apply_fn(variables, x, t, s, y, w, dropout_key) → network output; t, s are what the
# network is conditioned on (the preconditioning maps path times to them).
ApplyFn = Callable


def _named(scope, fn):
  """fn traced under jax.named_scope(scope): a profile (`bench.profile.scope`) then tells the
  student's layers from the teacher's, which are the same modules."""
  def named(*args):
    with jax.named_scope(scope):
      return fn(*args)
  return named


def student_secant(task, apply_fn, variables, dropout_key):
  """secant_fn(x, t, s, y, w) of the trained network; with embedded guidance it takes the
  CFG scale w and feeds the network w normalised to [0, 1] by the task's range."""
  net = _named('student', lambda x, t, s, y, w: apply_fn(variables, x, t, s, y, w,
                                                         dropout_key))
  secant_fn = precond.secant_from_network(task.path, net, task.sigma_data)
  if task.guidance_range is None:
    return secant_fn
  return lambda x, t, s, y, w: secant_fn(x, t, s, y,
                                         guidance.normalize_scale(w, *task.guidance_range))


def teacher_tangent(task, teacher_apply, teacher_variables):
  """teacher_fn(x, t, y, w): the teacher's tangent, with two-pass CFG at scale w when the
  task is guided (conditional and null labels in one batched call)."""
  net = _named('teacher', lambda x, t, s, y, w: teacher_apply(teacher_variables, x, t, s, y,
                                                               None, None))
  tangent = precond.tangent_from_secant(
      precond.secant_from_network(task.path, net, task.sigma_data))
  if task.guidance_range is None:
    return tangent
  conditional = lambda x, t, y: tangent(x, t, y, None)
  return guidance.classifier_free(conditional, task.null_class)


def term_conditioning(labels, dropped, scale):
  """(the secant term's Conditioning, the diffusion term's) from the true labels, the
  labels after dropout and the embedded guidance scales (None: none embedded). Without a
  scale every term sees the dropped labels; with one, the secant term, whose target is
  the teacher's CFG at w, sees the true labels and w, and the diffusion term, whose target
  is unguided, the dropped labels at w = 1."""
  if scale is None:
    return secant.Conditioning(dropped, None), secant.Conditioning(dropped, None)
  return secant.Conditioning(labels, scale), secant.Conditioning(dropped, jnp.ones_like(scale))


def ema_decay_at(step, decay, warmup):
  """The EMA decay of update number `step` (0-based): `decay`, or with warmup
  min(decay, (1 + step)/(10 + step)), so that a run from random weights does not keep
  decay^steps of its initialisation in the EMA (0.999^2000 = 13.5%)."""
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_initial_share(decay, warmup, steps):
  """The weight the EMA gives the parameters it started from after `steps` updates,
  prod_{k < steps} ema_decay_at(k, decay, warmup): decay^steps without warm-up (0.999 over
  1000 steps: 37%), vanishing with it (the first factor is 0.1)."""
  if not warmup:
    return float(decay) ** steps
  decays = np.asarray(ema_decay_at(np.arange(steps), decay, warmup), np.float64)
  return float(np.prod(decays))


def check_microbatches(microbatches):
  """Refuses a microbatch count that is not a positive integer (1: no accumulation)."""
  if not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError('microbatches (config.microbatches) must be a positive integer (1: no '
                     f'gradient accumulation), got {microbatches!r}.')


def accumulated_gradients(objective, params, inputs, key, microbatches):
  """value_and_grad of objective(params, inputs, key) → (loss, aux), a mean over the
  examples of `inputs` (arrays with the batch on their leading axis), taken over
  `microbatches` equal slices of them one after another and averaged (gradient
  accumulation: one slice's activations in memory at a time), so equal to the whole
  batch's up to rounding. Slice i holds examples i, i + m, i + 2m, ... (m = microbatches),
  so that each device's share of a batch split over devices splits without moving data;
  its dropout draws come from fold_in(key, i). One microbatch: the whole batch with `key`."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, inputs, key)
  slices = jax.tree_util.tree_map(
      lambda a: jnp.swapaxes(a.reshape(-1, microbatches, *a.shape[1:]), 0, 1), inputs)

  def add(total, indexed):
    index, inputs_i = indexed
    value = grad_fn(params, inputs_i, jax.random.fold_in(key, index))
    return jax.tree_util.tree_map(jnp.add, total, value), None

  shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda a: a[0], slices), key)
  zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  total, _ = jax.lax.scan(add, zeros, (jnp.arange(microbatches), slices))
  return jax.tree_util.tree_map(lambda a: a / microbatches, total)


def make_train_step(task: SecantTask, apply_fn: ApplyFn, teacher_apply: ApplyFn | None,
                    optimizer: optax.GradientTransformation, ema_decay: float,
                    ema_warmup: bool = False, microbatches: int = 1):
  """The pure train step for `task`; jit it with `parallel.jit_train_step`. The EMA decays
  by `ema_decay_at(step, ema_decay, ema_warmup)`. The gradient of the batch is accumulated
  over `microbatches` slices of it (`accumulated_gradients`)."""
  if task.needs_teacher and teacher_apply is None:
    raise ValueError(f'Variant {task.variant!r} needs a teacher: set the config\'s teacher '
                     'checkpoint.')
  check_microbatches(microbatches)

  def train_step(state, teacher_variables, batch):
    x_data, labels = batch['x'], batch['y']
    size = x_data.shape[0]
    k_time, k_noise, k_drop, k_scale, k_dropout = jax.random.split(
        jax.random.fold_in(state.key, state.step), 5)
    times = secant.sample_time_pairs(k_time, size, task.variant, task.num_steps, task.path,
                                     task.diffusion_log_sigma)
    noise = jax.random.normal(k_noise, x_data.shape, jnp.float32)
    dropped = labels
    if task.label_dropout:
      dropped = guidance.drop_labels(k_drop, labels, task.label_dropout, task.null_class)
    scale = None
    if task.guidance_range is not None:
      scale = guidance.sample_scale(k_scale, size, *task.guidance_range)
    conditioning, unguided = term_conditioning(labels, dropped, scale)
    teacher_fn = (teacher_tangent(task, teacher_apply, teacher_variables)
                  if task.needs_teacher else None)

    def objective(trainable, inputs, dropout_key):
      x_data, noise, times, conditioning, unguided = inputs
      variables = {**state.params, 'params': trainable}
      secant_fn = student_secant(task, apply_fn, variables, dropout_key)
      frozen_secant_fn = student_secant(task, apply_fn, jax.lax.stop_gradient(variables),
                                        dropout_key)
      per_example, aux = secant.loss(task.variant, secant_fn, teacher_fn, task.path, x_data,
                                     noise, times, *conditioning,
                                     stei_lambda=task.stei_lambda, stei_target=task.stei_target,
                                     diffusion_conditioning=unguided,
                                     weight_fn=task.weight_fn(),
                                     frozen_secant_fn=frozen_secant_fn)
      return jnp.mean(per_example), {k: jnp.mean(v) for k, v in aux.items()}

    if size % microbatches:
      raise ValueError(f'The batch of {size} examples does not split into {microbatches} '
                       'equal microbatches (config.microbatches); set config.batch_size to a '
                       f'multiple of {microbatches}.')
    (loss, terms), grads = accumulated_gradients(
        objective, state.params['params'], (x_data, noise, times, conditioning, unguided),
        k_dropout, microbatches)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params['params'])
    params = {**state.params, 'params': optax.apply_updates(state.params['params'], updates)}
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                 state.ema_params, params)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               **{f'loss_{k}': v for k, v in terms.items()}}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step
