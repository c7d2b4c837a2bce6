"""A run's ingredients from its config sections: the path, the secant task and the
optimizer with its learning-rate schedule. Plain attribute access on the config, no data
stack, so benchmarks and notebooks build exactly what the trainer builds."""

import jax.numpy as jnp
import optax

from secant_jax import paths as paths_lib
from secant_jax.models import registry
from secant_jax.train import parallel
from secant_jax.train import step as step_lib


def make_path(path_config):
  if path_config.name == 'linear':
    return paths_lib.Linear()
  if path_config.name == 'edm':
    return paths_lib.EDM(path_config.sigma_min, path_config.sigma_max, path_config.rho,
                         path_config.schedule)
  raise ValueError(f"Unknown path {path_config.name!r}: expected 'linear' or 'edm'; set "
                   'config.path.name.')


def optional_tuple(value):
  """A tuple field that is None by default as the train step takes it: the tuple, or None
  for the config's None and for the () that --config.X='()' sets (ml_collections cannot
  set a tuple field to None from the command line)."""
  return tuple(value) if value else None


def guidance_range(secant_config):
  """config.secant.guidance as the train step takes it: (w_min, w_max) for embedded
  guidance, or None for none (`optional_tuple`)."""
  return optional_tuple(secant_config.guidance)


def make_network(config, mesh=None):
  """The secant network of config.model, with a guidance-scale input when config.secant
  embeds guidance, for programs that split its batch over `mesh` (`registry.build`)."""
  return registry.build(config.model, guided=guidance_range(config.secant) is not None,
                        mesh=mesh)


def make_task(config, network):
  """The SecantTask of `config` (a run's config.json as `common.load_run` reads it)."""
  s = config.secant
  return step_lib.SecantTask(
      variant=s.variant, path=make_path(config.path), num_steps=s.steps,
      null_class=network.null_class, label_dropout=s.label_dropout,
      guidance_range=guidance_range(s),
      stei_lambda=s.stei_lambda, stei_target=s.stei_target,
      sigma_data=config.path.sigma_data, loss_weighting=s.loss_weighting,
      diffusion_log_sigma=optional_tuple(s.diffusion_log_sigma))


def make_train_step(config, task, network, teacher, optimizer, mesh):
  """The trainer's train step for `task` (`step.make_train_step`), the student's and the
  teacher's applies gathering FSDP-sharded variables on `mesh` (`parallel.fsdp_apply`);
  `teacher` None for variants that need none. Refuses float16 compute, which would need
  loss scaling: the gradients of a mean loss are mostly below float16's smallest normal
  number (the median parameter gradient of SiT-S/2 at batch 8, in float32, is 7.8e-6)."""
  if registry.compute_dtype(config.model) == jnp.float16:
    raise ValueError("config.model.dtype='float16' does not train: without loss scaling, "
                     "which secant-jax does not implement, the gradients of a mean loss "
                     "fall below float16's smallest normal number (6.1e-5) and lose their "
                     "precision. Train in 'bfloat16' (TPUs, A100 and newer GPUs) or "
                     "'float32'.")
  gathering = lambda net: None if net is None else parallel.fsdp_apply(net.apply, mesh)
  return step_lib.make_train_step(task, gathering(network), gathering(teacher), optimizer,
                                  config.ema_decay, config.ema_warmup, config.microbatches)


def learning_rate_schedule(opt_config):
  warmup = opt_config.warmup_steps
  if not warmup:
    return optax.constant_schedule(opt_config.learning_rate)
  return optax.linear_schedule(0.0, opt_config.learning_rate, warmup)


def make_optimizer(opt_config):
  adamw = optax.adamw(learning_rate_schedule(opt_config), b1=opt_config.b1, b2=opt_config.b2,
                      eps=opt_config.eps, weight_decay=opt_config.weight_decay)
  if opt_config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), adamw)
  return adamw
