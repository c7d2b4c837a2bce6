"""Throughput of the trainer's real train step and sampler, random weights, synthetic latents.

    python -m secant_jax.bench.throughput --model SiT-XL/2 --variant sdei --batch 64 [--steps 20]
    python -m secant_jax.bench.throughput --model SiT-XL/2 --sample --num-steps 4 --batch 256

Settings come from configs/imagenet_sit.py (optimizer, EMA, guidance range, label dropout,
bf16 compute) with the model, batch and the flags below overriding them; the step is
`train.step.make_train_step` jitted over all devices by `train.parallel`, exactly as the
trainer runs it, and sampling is `generate.sample`. Compiles once, runs --warmup untimed
iterations, then times --steps with one device sync at the end. Prints img/s, time per
step, peak device memory, achieved TFLOP/s (from `bench.flops`) and MFU against the
device's dense bf16 peak (--peak-tflops for devices it does not know). --profile N then
traces N more calls and prints device time per kind of kernel and the top HLO
instructions (`bench.profile`). Needs no data stack: jax, flax, optax and ml_collections.
"""

import argparse
import importlib.util
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from secant_jax import generate
from secant_jax.bench import flops as flops_lib
from secant_jax.bench import profile as profile_lib
from secant_jax.models import registry
from secant_jax.train import parallel
from secant_jax.train import recipe
from secant_jax.train import state as state_lib
from secant_jax.train import step as step_lib

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'imagenet_sit.py')


def load_config(args):
  spec = importlib.util.spec_from_file_location('imagenet_sit', CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'variant={args.variant},steps={args.num_steps}')
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.attention = args.attention
  config.model.remat = args.remat
  config.batch_size = args.batch
  config.fsdp = args.fsdp
  return config


def _timed(fn, warmup, iterations):
  """Seconds per call of fn() after `warmup` calls; fn returns what to block on."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(iterations - 1):
    fn()
  jax.block_until_ready(fn())
  return (time.perf_counter() - start) / iterations


def _peak_memory_gib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2 ** 30


def _synthetic_batch(network, batch, mesh):
  k_x, k_y = jax.random.split(jax.random.key(1))
  sharding = parallel.batch_sharding(mesh)
  make = jax.jit(lambda: {
      'x': jax.random.normal(k_x, (batch, *network.image_shape), jnp.float32),
      'y': jax.random.randint(k_y, (batch,), 0, network.null_class)},
                 out_shardings={'x': sharding, 'y': sharding})
  return make()


class Program(NamedTuple):
  """A compiled program ready to time: run() makes one call and returns what to block on."""
  run: Callable[[], Any]
  compiled: Any  # jax.stages.Compiled
  network: registry.Network
  forward_equivalents: int  # per image, a backward counting as two


def bench_train(config, args, mesh):
  """The real train step on random weights and a synthetic batch, as a Program."""
  network = registry.build(config.model, guided=config.secant.guidance is not None)
  task = recipe.make_task(config, network)
  optimizer = recipe.make_optimizer(config.optimizer)
  teacher = registry.build(config.model, guided=False) if task.needs_teacher else None
  train_step = step_lib.make_train_step(task, network.apply,
                                        None if teacher is None else teacher.apply,
                                        optimizer, config.ema_decay,
                                        config.ema_warmup)
  k_init, k_teacher, k_state = jax.random.split(jax.random.key(0), 3)
  create = lambda: state_lib.create(network.init(k_init), optimizer, k_state)
  state_sharding = parallel.tree_sharding(jax.eval_shape(create), mesh, config.fsdp > 1)
  state = jax.jit(create, out_shardings=state_sharding)()
  teacher_variables, teacher_sharding = None, parallel.replicated(mesh)
  if teacher is not None:
    teacher_sharding = parallel.tree_sharding(teacher.abstract_variables(), mesh,
                                              config.fsdp > 1)
    teacher_variables = jax.jit(teacher.init, out_shardings=teacher_sharding)(k_teacher)
  batch = _synthetic_batch(network, config.batch_size, mesh)
  step_fn = parallel.jit_train_step(train_step, state_sharding, teacher_sharding, mesh)
  step_fn = step_fn.lower(state, teacher_variables, batch).compile()
  holder = [state]

  def one_step():
    holder[0], metrics = step_fn(holder[0], teacher_variables, batch)
    return metrics

  return Program(one_step, step_fn, network, flops_lib.train_forward_equivalents(task))


def bench_sample(config, args, mesh):
  """N-step secant sampling of a batch, as a Program."""
  network = registry.build(config.model, guided=config.secant.guidance is not None)
  task = recipe.make_task(config, network)
  variables = jax.jit(network.init, out_shardings=parallel.replicated(mesh))(
      jax.random.key(0))
  batch = _synthetic_batch(network, config.batch_size, mesh)
  sample = jax.jit(lambda v, noise, y: generate.sample(network, task, v, config.secant,
                                                       noise, y, args.num_steps))
  sample = sample.lower(variables, batch['x'], batch['y']).compile()
  classic_cfg = task.guidance_range is None and task.label_dropout > 0
  return Program(lambda: sample(variables, batch['x'], batch['y']), sample, network,
                 flops_lib.sample_forward_equivalents(args.num_steps, classic_cfg))


def report(args, seconds, network, forward_equivalents):
  """The printed fields, as a dict (also returned for tests)."""
  flop_per_image = forward_equivalents * flops_lib.dit_forward(network.module)
  images_per_second = args.batch / seconds
  achieved = flop_per_image * images_per_second
  device = jax.devices()[0]
  peak = (args.peak_tflops * 1e12 if args.peak_tflops
          else flops_lib.peak_flops(device.device_kind))
  peak_total = None if peak is None else peak * jax.device_count()
  return {
      'what': ('sample' if args.sample else 'train') + f' {args.variant} {args.model}',
      'device': f'{jax.device_count()} x {device.device_kind}',
      'batch': args.batch, 'images_per_second': images_per_second,
      'step_ms': 1e3 * seconds, 'peak_memory_gib': _peak_memory_gib(),
      'tflop_per_image': flop_per_image / 1e12, 'achieved_tflops': achieved / 1e12,
      'mfu': None if peak_total is None else achieved / peak_total}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='SiT-XL/2')
  parser.add_argument('--variant', default='sdei',
                      choices=('sdei', 'stei', 'sdee', 'stee', 'diffusion'))
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20, help='timed iterations')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--sample', action='store_true', help='time sampling, not training')
  parser.add_argument('--num-steps', type=int, default=4, help='sampling steps')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--attention', default='', help="'' (XLA's choice), 'cudnn', 'xla'")
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--fsdp', type=int, default=1)
  parser.add_argument('--peak-tflops', type=float, default=0.0)
  parser.add_argument('--profile', type=int, default=0, metavar='N',
                      help='after timing, trace N calls and print where device time goes')
  parser.add_argument('--profile-dir', default='', help='where the trace goes (default: a '
                      'temporary directory); open it with TensorBoard/XProf')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  config = load_config(args)
  mesh = parallel.make_mesh(config.fsdp)
  parallel.check_batch_size(config.batch_size, mesh)
  program = (bench_sample if args.sample else bench_train)(config, args, mesh)
  seconds = _timed(program.run, args.warmup, args.steps)
  fields = report(args, seconds, program.network, program.forward_equivalents)
  for key, value in fields.items():
    text = 'n/a' if value is None else (f'{value:.4g}' if isinstance(value, float) else value)
    print(f'{key:>18}: {text}')
  if args.profile:
    result = profile_lib.breakdown(program.run, program.compiled.as_text(), args.profile,
                                   args.profile_dir or None)
    print('\n'.join(profile_lib.format_breakdown(result, fields['step_ms'])))
    fields['profile'] = result
  return fields


if __name__ == '__main__':
  main()
