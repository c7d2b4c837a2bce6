"""Throughput of the trainer's real train step and sampler, random weights, synthetic inputs.

    python -m secant_jax.bench.throughput --model SiT-XL/2 --variant sdei --batch 64 [--steps 20]
    python -m secant_jax.bench.throughput --model SiT-XL/2 --sample --num-steps 4 --batch 256
    python -m secant_jax.bench.throughput --config cifar10_edm --variant stee --batch 512

Settings come from configs/imagenet_sit.py (optimizer, EMA, guidance range, label dropout,
bf16 compute), or with --config cifar10_edm from EDM's DDPM++ config (--model ncsnpp for
the other SongUNet), with the model, batch and the flags below overriding them; the step is
`train.recipe.make_train_step` jitted over all devices by `train.parallel`, exactly as the
trainer runs it, and sampling is `generate.sample`. Compiles once, runs --warmup untimed
iterations, then times --steps with one device sync at the end. Prints img/s, time per
step, peak device memory, achieved TFLOP/s (from `bench.flops`) and MFU against the
device's dense bf16 peak (--peak-tflops for devices it does not know), the memory the
compiled program asks for and the seconds it took to compile (compile_s; with
JAX_COMPILATION_CACHE_DIR set, a second run reads it from there). --profile N then
compiles the program again with each kernel launched on its own
(`bench.profile.COMPILER_OPTIONS`), traces N calls of it and prints device time per kind
of kernel, per layer and the top HLO instructions (`bench.profile`).
Every run also counts the compiled program's static memory traffic (`bench.traffic`) and
prints the two floors of a call: FLOPs over the peak rate, bytes over the bandwidth;
--traffic adds the bytes per kind of kernel and per layer. --target h100|h200, a host of
several (8xh100) or a TPU slice (v4-32, v5e-16, ...) compiles for that accelerator on a
machine without it (`bench.targets`) and prints the floors, the traffic and the compiled
memory next to the device's instead of timing; a program that does not fit ends the run
with XLA's verdict and what to change. Needs no data stack: jax, flax, optax,
ml_collections and diffrax (the samplers' adaptive solver), not TensorFlow, CLU, grain,
torch, scikit-learn or PIL (tests/test_throughput.py runs it with those refused).
"""

import argparse
import importlib.util
import os
import time
from typing import Any, Callable, NamedTuple

import jax

from secant_jax import arguments
from secant_jax import config as config_lib
from secant_jax import generate
from secant_jax.bench import flops as flops_lib
from secant_jax.bench import profile as profile_lib
from secant_jax.bench import targets
from secant_jax.bench import traffic as traffic_lib
from secant_jax.models import registry
from secant_jax.train import memory as memory_lib
from secant_jax.train import parallel
from secant_jax.train import recipe
from secant_jax.train import state as state_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs')
CONFIGS = ('imagenet_sit', 'cifar10_edm')
UNET_ARCHS = ('ddpmpp', 'ncsnpp')
# (flag, its args attribute, why a SongUNet has no use for it)
DIT_ONLY_FLAGS = (
    ('--split-qkv', 'split_qkv', 'whose attention has no fused qkv product to split'),
    ('--residual-dtype', 'residual_dtype', 'which computes everything in --dtype'))


def load_config(args):
  """The --config's settings with the benchmark's flags applied; --model is a DiT/SiT name
  for imagenet_sit and a SongUNet architecture for cifar10_edm."""
  spec = importlib.util.spec_from_file_location(
      args.config, os.path.join(CONFIG_DIR, f'{args.config}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'variant={args.variant},steps={args.num_steps}')
  if config.model.family == 'edm_unet':
    if args.model and args.model not in UNET_ARCHS:
      raise SystemExit(f'--model {args.model} is not a SongUNet: --config {args.config} '
                       f'takes --model {" or ".join(UNET_ARCHS)}.')
    for flag, name, why in DIT_ONLY_FLAGS:
      if getattr(args, name):
        raise SystemExit(f'{flag} is a DiT option; --config {args.config} is a SongUNet, '
                         f'{why}: drop the flag.')
    config.model.arch = args.model or config.model.arch
  else:
    config.model.name = args.model or config.model.name
  config.model.dtype = args.dtype or config.model.dtype
  if args.matmul_precision is not None:
    config.matmul_precision = args.matmul_precision
  if args.residual_dtype:
    config.model.residual_dtype = args.residual_dtype
  config.model.attention = args.attention
  config.model.remat = args.remat
  config.model.split_qkv = args.split_qkv
  config.batch_size = args.batch
  config.microbatches = args.microbatches
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


def _device_memory_gib(target):
  """Memory of one device: the target's, or what a program may use on a real one
  (`train.memory.device_bytes`: on a CPU its share of the host's)."""
  if target is not None:
    return target.memory_bytes / memory_lib.GIB
  available, _ = memory_lib.device_bytes(jax.local_devices()[0])
  return None if available is None else available / memory_lib.GIB


def _compiled_memory_gib(compiled):
  """Device memory the compiled program needs per device (`train.memory.compiled_bytes`)."""
  needed = memory_lib.compiled_bytes(compiled)
  return None if needed is None else needed['total'] / memory_lib.GIB


def _synthetic_batch(network, spec):
  """Random latents and labels of the abstract batch `spec`, on its devices."""
  k_x, k_y = jax.random.split(jax.random.key(1))
  make = jax.jit(lambda: {
      'x': jax.random.normal(k_x, spec['x'].shape, spec['x'].dtype),
      'y': jax.random.randint(k_y, spec['y'].shape, 0, network.null_class)},
                 out_shardings={key: value.sharding for key, value in spec.items()})
  return make()


def _shaped(tree, shardings):
  """Abstract arrays (ShapeDtypeStructs) of a pytree, placed by `shardings`."""
  return jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      tree, shardings)


class Program(NamedTuple):
  """A program compiled from abstract inputs; start() makes its inputs on the mesh's
  devices and returns run(), which makes one call and returns what to block on."""
  compiled: Any  # jax.stages.Compiled
  start: Callable[[], Callable[[], Any]]
  network: registry.Network
  forward_equivalents: int  # per image, a backward counting as two


def _on_one_device(make, sharding):
  """make()'s arrays, computed on one device and then placed with `sharding`. Compiled for
  the whole mesh instead, the network's initialisation would call cuDNN's attention on a
  batch of one there, which JAX partitions through a callback that keeps the program out of
  the persistent compilation cache (models/registry.build); the trainer initialises so."""
  return jax.device_put(jax.jit(make)(), sharding)


def bench_train(config, args, mesh, compiler_options=None):
  """The real train step on random weights and a synthetic batch, as a Program compiled
  with XLA's `compiler_options` (None: the defaults)."""
  network = recipe.make_network(config, mesh)
  task = recipe.make_task(config, network)
  optimizer = recipe.make_optimizer(config.optimizer)
  teacher = (registry.build(config.model, guided=False, mesh=mesh) if task.needs_teacher
             else None)
  train_step = recipe.make_train_step(config, task, network, teacher, optimizer, mesh)
  k_init, k_teacher, k_state = jax.random.split(jax.random.key(0), 3)
  create = lambda: state_lib.create(network.init(k_init), optimizer, k_state)
  abstract_state = jax.eval_shape(create)
  state_sharding = parallel.tree_sharding(abstract_state, mesh, config.fsdp > 1)
  teacher_sharding, teacher_spec = parallel.replicated(mesh), None
  make_teacher = lambda key: teacher.inference_variables(teacher.init(key))  # as loop.teacher_of
  if teacher is not None:
    abstract_teacher = jax.eval_shape(make_teacher, k_teacher)
    teacher_sharding = parallel.tree_sharding(abstract_teacher, mesh, config.fsdp > 1)
    teacher_spec = _shaped(abstract_teacher, teacher_sharding)
  batch_spec = parallel.batch_spec(config.batch_size, network.image_shape, mesh)
  step_fn = parallel.jit_train_step(train_step, state_sharding, teacher_sharding, mesh)
  compiled = step_fn.lower(_shaped(abstract_state, state_sharding), teacher_spec,
                           batch_spec).compile(compiler_options)

  def start():  # made on one device and placed, as the trainer does (_on_one_device)
    state = _on_one_device(create, state_sharding)
    teacher_variables = None if teacher is None else _on_one_device(
        lambda: make_teacher(k_teacher), teacher_sharding)
    batch = _synthetic_batch(network, batch_spec)
    holder = [state]

    def one_step():
      holder[0], metrics = compiled(holder[0], teacher_variables, batch)
      return metrics

    return one_step

  return Program(compiled, start, network, flops_lib.train_forward_equivalents(task))


def bench_sample(config, args, mesh, compiler_options=None):
  """N-step secant sampling of a batch, as a Program (see bench_train)."""
  network = recipe.make_network(config, mesh)
  task = recipe.make_task(config, network)
  replicated = parallel.replicated(mesh)
  sample = jax.jit(lambda v, noise, y: generate.sample(network, task, v, config.secant,
                                                       noise, y, args.num_steps))
  abstract = network.abstract_variables()
  batch_spec = parallel.batch_spec(config.batch_size, network.image_shape, mesh)
  compiled = sample.lower(_shaped(abstract, parallel.tree_sharding(abstract, mesh)),
                          batch_spec['x'], batch_spec['y']).compile(compiler_options)

  def start():
    variables = _on_one_device(lambda: network.init(jax.random.key(0)), replicated)
    batch = _synthetic_batch(network, batch_spec)
    return lambda: compiled(variables, batch['x'], batch['y'])

  classic_cfg = task.guidance_range is None and task.label_dropout > 0
  return Program(compiled, start, network,
                 flops_lib.sample_forward_equivalents(args.num_steps, classic_cfg))


def report(config, args, program, memory, device_kind, device_count, compile_seconds,
           seconds=None):
  """The printed fields, as a dict (also returned for tests). `memory` is the compiled
  program's `traffic.summarize` (None on TPUs); `compile_seconds` what building, tracing,
  lowering and compiling it took (or reading it from JAX_COMPILATION_CACHE_DIR's cache);
  `seconds` per call when it was timed."""
  flop_per_image = program.forward_equivalents * flops_lib.network_forward(program.network)
  peak = (args.peak_tflops * 1e12 if args.peak_tflops
          else flops_lib.peak_flops(device_kind))
  peak_total = None if peak is None else peak * device_count
  bandwidth = flops_lib.peak_bandwidth(device_kind)
  what = 'sample' if args.sample else 'train'
  fields = {'what': f'{what} {args.variant} {model_name(config)}',
            'device': f'{device_count} x {device_kind}', 'batch': args.batch,
            'matmul_precision': config.get('matmul_precision') or 'default',
            'compile_s': compile_seconds}
  if seconds is not None:
    achieved = flop_per_image * args.batch / seconds
    fields.update({
        'images_per_second': args.batch / seconds, 'step_ms': 1e3 * seconds,
        'peak_memory_gib': _peak_memory_gib(), 'achieved_tflops': achieved / 1e12,
        'mfu': None if peak_total is None else achieved / peak_total})
  fields.update({
      'tflop_per_image': flop_per_image / 1e12,
      'flop_floor_ms': (None if peak_total is None
                        else 1e3 * flop_per_image * args.batch / peak_total),
      'compiled_memory_gib': _compiled_memory_gib(program.compiled),
      'device_memory_gib': _device_memory_gib(args.target),
      'static_memory_gb': None if memory is None else memory['bytes'] / 1e9,  # per device
      'memory_floor_ms': (None if memory is None or bandwidth is None
                          else 1e3 * memory['bytes'] / bandwidth)})
  return fields


def model_name(config):
  """The benchmarked network as a person names it: 'SiT-XL/2', 'EDM ddpmpp'."""
  if config.model.family == 'edm_unet':
    return f'EDM {config.model.arch}'
  return config.model.name


def _does_not_fit(config, args, mesh, why):
  """The message that ends a run whose program does not fit in a device's memory."""
  return (f'{model_name(config)} {"sampling" if args.sample else args.variant}, '
          f'batch {args.batch}, does not fit on {mesh.size} x '
          f'{mesh.devices.flat[0].device_kind}: {why}\n'
          'Less memory per device: --remat (recompute activations), --microbatches N '
          '(accumulate the gradient over N slices of the batch), --fsdp N (shard parameters '
          'and optimizer state over N devices) or a smaller --batch.')


def _compile(config, args, mesh, compiler_options=None):
  """bench_sample's or bench_train's Program; one that XLA refuses for want of device
  memory (its TPU compiler checks) ends the run with what to change."""
  try:
    return (bench_sample if args.sample else bench_train)(config, args, mesh,
                                                          compiler_options)
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    raise SystemExit(_does_not_fit(config, args, mesh, error)) from error


def _target(name):
  """--target's type: the `bench.targets` accelerator called `name`."""
  try:
    return targets.get(name)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from error


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='imagenet_sit', choices=CONFIGS)
  parser.add_argument('--model', default='', help='a DiT/SiT name (imagenet_sit; default '
                      f'SiT-XL/2) or {"/".join(UNET_ARCHS)} (cifar10_edm; default ddpmpp)')
  parser.add_argument('--variant', default='sdei',
                      choices=('sdei', 'stei', 'sdee', 'stee', 'diffusion'))
  parser.add_argument('--batch', type=arguments.positive_int, default=64)
  parser.add_argument('--steps', type=arguments.positive_int, default=20, help='timed iterations')
  parser.add_argument('--warmup', type=arguments.non_negative_int, default=3)
  parser.add_argument('--sample', action='store_true', help='time sampling, not training')
  parser.add_argument('--num-steps', type=arguments.positive_int, default=4, help='sampling steps')
  parser.add_argument('--dtype', default='', help="compute dtype; default the config's "
                      '(bfloat16 for imagenet_sit, float32 for cifar10_edm)')
  parser.add_argument('--residual-dtype', default='', choices=('', 'float32', 'bfloat16'),
                      help="DiT: the residual stream's and conditioning's dtype; default "
                      "the config's (float32, as PyTorch's autocast)")
  parser.add_argument('--matmul-precision', default=None, choices=config_lib.MATMUL_PRECISIONS,
                      help="of float32 products; default the config's (float32 for "
                      "cifar10_edm, as EDM trains; '' for JAX's default)")
  parser.add_argument('--attention', default='', help="'' (XLA's choice), 'cudnn', 'xla'")
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--microbatches', type=arguments.positive_int, default=1,
                      help='train: accumulate the gradient over this many slices of the batch')
  parser.add_argument('--split-qkv', action='store_true', help='DiT: q, k and v as three '
                      'products of the qkv kernel, not one product and a split copy')
  parser.add_argument('--fsdp', type=arguments.positive_int, default=1)
  parser.add_argument('--peak-tflops', type=float, default=0.0)
  parser.add_argument('--profile', type=arguments.non_negative_int, default=0, metavar='N',
                      help='after timing, trace N calls and print where device time goes')
  parser.add_argument('--profile-dir', default='', help='where the trace goes (default: a '
                      'temporary directory); open it with TensorBoard/XProf')
  parser.add_argument('--traffic', action='store_true', help='print the compiled program\'s '
                      'static memory traffic by kind of kernel and by layer (bench.traffic)')
  parser.add_argument('--target', default=None, type=_target,
                      help='compile for this accelerator on a machine without it and print '
                      'the compiled memory, static traffic and floors instead of timing: '
                      'h100, h200, a host of several such as 8xh100 (needs pip install -e '
                      '.[cuda]) or a TPU slice such as v4-32, v5p-8, v5e-16, v6e-8 (needs '
                      'pip install -e .[tpu])')
  args = parser.parse_args(argv)
  if args.target is not None and args.profile:
    parser.error('--profile times kernels on a device; --target only compiles. Drop one.')
  return args


def main(argv=None):
  args = parse_args(argv)
  config = load_config(args)
  with config_lib.matmul_precision(config):  # as the trainer computes
    return _benchmark(config, args)


def print_fields(fields):
  """One `name: value` line per field, floats to 4 significant digits, None as n/a."""
  for key, value in fields.items():
    text = 'n/a' if value is None else (f'{value:.4g}' if isinstance(value, float) else value)
    print(f'{key:>20}: {text}')


def _benchmark(config, args):
  mesh = parallel.make_mesh(config.fsdp,
                            None if args.target is None else args.target.devices())
  parallel.check_batch_size(config.batch_size, mesh, '--batch',
                            1 if args.sample else config.microbatches)
  device_kind = mesh.devices.flat[0].device_kind
  started = time.perf_counter()
  program = _compile(config, args, mesh)
  compile_seconds = time.perf_counter() - started
  hlo_text = program.compiled.as_text()
  # A TPU program stages its operands through on-chip memory (VMEM) with asynchronous
  # copies that the count does not model: its bytes would be wrong, so none are given.
  on_tpu = mesh.devices.flat[0].platform == 'tpu'
  memory = None if on_tpu else traffic_lib.summarize(hlo_text)
  seconds = None
  if args.target is None:
    run = program.start()
    seconds = _timed(run, args.warmup, args.steps)
  fields = report(config, args, program, memory, device_kind, mesh.size, compile_seconds,
                  seconds)
  print_fields(fields)
  if args.traffic or args.target is not None:
    if on_tpu:
      print('static memory traffic: not counted on TPUs (operands pass through on-chip VMEM)')
    else:
      print('\n'.join(traffic_lib.format_summary(memory,
                                                 flops_lib.peak_bandwidth(device_kind))))
      fields['traffic'] = memory
  needed, available = fields['compiled_memory_gib'], fields['device_memory_gib']
  if args.target is not None and needed is not None and needed > available:
    # XLA's TPU compiler refuses temporaries beyond the chip's memory but not temporaries
    # that fit only without the arguments (train state, batch) they share the chip with.
    raise SystemExit(_does_not_fit(config, args, mesh,
                                   f'it needs {needed:.2f} GiB per device, '
                                   f'the device has {available:.2f} GiB'))
  if args.profile:
    del run  # the timed program's train state goes before the profiled one's is made
    profiled = _compile(config, args, mesh, profile_lib.COMPILER_OPTIONS)
    result = profile_lib.breakdown(profiled.start(), profiled.compiled.as_text(), args.profile,
                                   args.profile_dir or None)
    print('\n'.join(profile_lib.format_breakdown(result, fields['step_ms'])))
    fields['profile'] = result
  return fields


if __name__ == '__main__':
  main()
