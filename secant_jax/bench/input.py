"""How fast a config's input pipeline gives batches, without the model: the half of a step
the throughput benchmark (bench.throughput, synthetic batches) leaves out.

    python -m secant_jax.bench.input --config=configs/imagenet_sit.py --config.data.dir=gs://BUCKET/latents

Builds the pipeline as the trainer does (config.data, config.batch_size, config.seed),
reads --warmup batches (its threads start, its files open, the first reads of a bucket
return), then times --batches more and prints what one process reads: batches/s (the
train steps per second it can feed), images/s and MB/s. Each process of a multi-host run
reads batch_size / processes images per step: --processes P times process 0's share of a
P-process run, from one machine. Where batches/s is below the train step's rate, try
other config.data.read_threads (many where reads wait on a bucket; `data.pipeline`).
"""

import contextlib
import time

import numpy as np
from absl import app
from absl import flags

from secant_jax import main as main_lib
from secant_jax.bench import throughput
from secant_jax.data import pipeline


def define_flags(flag_values=flags.FLAGS, sys_argv=None):
  """Defines --config (with its --config.key=value overrides, read from `sys_argv`),
  --batches, --warmup and --processes in `flag_values`."""
  main_lib.define_config_flag(flag_values, sys_argv)
  flags.DEFINE_integer('batches', 100, 'Batches timed.', lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer('warmup', 10, 'Batches read before the timing starts.', lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_integer('processes', 1, "Time process 0's share of a run of this many "
                       'processes (one per host).', lower_bound=1, flag_values=flag_values)
  flags.mark_flags_as_required(['config'], flag_values=flag_values)


def measure(config, batches, warmup=10, processes=1):
  """What process 0 of `processes` reads of config's pipeline: its batch, record shape,
  batches/s, images/s and MB/s over `batches` batches after `warmup`."""
  data_iter, record_shape = pipeline.build(config.data, config.batch_size, config.seed,
                                           process=(0, processes))
  with contextlib.closing(data_iter):
    for _ in range(warmup):
      next(data_iter)
    started, size = time.perf_counter(), 0
    for _ in range(batches):
      size += sum(np.asarray(value).nbytes for value in next(data_iter).values())
    seconds = time.perf_counter() - started
  batch = config.batch_size // processes
  return {'dataset': config.data.name, 'batch': batch, 'record_shape': tuple(record_shape),
          'read_threads': pipeline.read_threads(config.data),
          'batches_per_second': batches / seconds,
          'images_per_second': batches * batch / seconds,
          'megabytes_per_second': size / seconds / 1e6}


def main(argv):
  del argv
  values = flags.FLAGS
  throughput.print_fields(measure(values.config, values.batches, values.warmup,
                                  values.processes))


if __name__ == '__main__':  # flags defined here only, so importing this module defines none
  define_flags()
  app.run(main, flags_parser=main_lib.parse_flags_or_exit)
