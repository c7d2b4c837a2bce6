"""Device memory: what a compiled program needs per device, what a device has, and the
refusal of a train step that cannot fit, made after its compile with the numbers and the
settings that shrink it. Run, such a step fails in its first step with XLA's out-of-memory
error, which on a CPU reads "INTERNAL: Error dispatching computation: " many times over
before the bytes it could not allocate (99 times for the Fashion-MNIST teacher)."""

import os

import jax

GIB = 2 ** 30


def compiled_bytes(compiled):
  """{'arguments', 'outputs', 'temporaries', 'total'}: bytes per device that a compiled
  program needs by XLA's buffer assignment, outputs counted where not aliased to (donated)
  arguments; None where XLA does not say."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  parts = {'arguments': stats.argument_size_in_bytes,
           'outputs': stats.output_size_in_bytes - stats.alias_size_in_bytes,
           'temporaries': stats.temp_size_in_bytes}
  return {**parts, 'total': sum(parts.values())}


def device_bytes(device):
  """(bytes, what they are) a program on `device` may use: its allocator's limit on an
  accelerator; on a CPU the host's physical memory shared by its local CPU devices (each
  holds its own temporaries); (None, None) where neither is known."""
  limit = (device.memory_stats() or {}).get('bytes_limit')
  if limit is not None:
    return limit, f'{device.device_kind} allows'
  if device.platform == 'cpu':
    cpus = sum(d.platform == 'cpu' for d in jax.local_devices())
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return host // cpus, (f"the host's {size_text(host)} give each of its {cpus} CPU "
                          'devices' if cpus > 1 else "the host's memory holds")
  return None, None


def size_text(n):
  """`n` bytes in the largest binary unit that leaves at least 1 of it, 3 significant
  digits: '40.7 GiB', '500 MiB', '4.2 KiB', '12 B'."""
  for unit, scale in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.3g} {unit}'
  return f'{n} B'


def check_train_step_fits(compiled, config, device):
  """Raises where the compiled train step needs more memory per device than `device` has,
  naming the settings of `config` that lower it."""
  needed = compiled_bytes(compiled)
  available, what = device_bytes(device)
  if needed is None or available is None or needed['total'] <= available:
    return
  fixes = ['lower config.batch_size', 'split each batch with config.microbatches=N '
           '(gradient accumulation)']
  if config.model.family == 'dit' and not config.model.get('remat', False):
    fixes.append('recompute activations with config.model.remat=True')
  if jax.device_count() > 1:
    fixes.append('shard parameters and optimizer state with config.fsdp=N')
  size = {k: size_text(v) for k, v in needed.items()}
  raise MemoryError(
      f'The train step needs {size["total"]} per device (XLA\'s buffer assignment: '
      f'arguments {size["arguments"]}, outputs beside them {size["outputs"]}, temporaries '
      f'{size["temporaries"]}), and {what} {size_text(available)}: {", or ".join(fixes)}.')
