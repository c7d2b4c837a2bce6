"""The grain pipeline every dataset goes through, and the dispatcher from the config.

A source (random access, records {'x': NHWC float32 in the model's range, 'y': int32})
is shuffled anew each epoch from the seed, repeated and augmented by a random map seeded
per position: one global stream of records, the same for any number of processes. Global
batch k is positions kB … kB + B − 1 of it, and process p of P reads only its slice, the
b = B/P records from kB + pb, as local batch number kP + p of the stream cut into
b-record batches. So one host or sixteen see the same global batches, and the iterator's
state ({'next_index': k}, the same on every process) resumes a run exactly, also on a
different number of processes.
"""

import grain
import jax
import numpy as np


# config.data.read_threads = 0 reads with these many threads per process. A record in a
# bucket is one request: reads wait on its latency, which threads overlap (16 at 20 ms: 800
# records/s). From a disk or memory, reading a record is Python's work, which threads do not
# parallelise and slow down by contending for the GIL: one thread read 3.4× (Fashion-MNIST)
# and 1.8× (latents) the batches/s of 16 on the 2-core CPU machine (`bench.input`).
BUCKET_READ_THREADS, DISK_READ_THREADS = 16, 1


def read_threads(data_config):
  """config.data.read_threads, or for 0 the default for where config.data.dir is."""
  if data_config.read_threads:
    return data_config.read_threads
  return BUCKET_READ_THREADS if '://' in (data_config.get('dir') or '') else DISK_READ_THREADS


def batches(source, global_batch, seed, augment=None, read_threads=1, process=None):
  """A resumable iterator of this process's slices {'x': [b, ...], 'y': [b]} of the global
  batches (b = global_batch / process count), read ahead by `read_threads` threads (the
  batches do not depend on how many). `process` = (index, count) reads another's slices
  (default JAX's process: (jax.process_index(), jax.process_count()))."""
  index, processes = process or (jax.process_index(), jax.process_count())
  if global_batch % processes:
    raise ValueError(f'Global batch size {global_batch} does not divide over the '
                     f'{processes} processes; set the config\'s batch_size to a multiple '
                     f'of {processes}.')
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  if augment is not None:
    ds = ds.random_map(augment, seed=seed + 1)
  ds = ds.batch(global_batch // processes, drop_remainder=True)
  return iter(ds[index::processes].to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads)))


def random_flip(record, rng: np.random.Generator):
  """Horizontal flip with probability ½ (NHWC records: axis 1 is the width)."""
  if rng.random() < 0.5:
    record = {**record, 'x': record['x'][:, ::-1]}
  return record


def source(data_config):
  """The random-access source of config.data.name (digits, cifar10, fashion_mnist,
  imagenet_latents)."""
  from secant_jax.data import (  # pylint: disable=import-outside-toplevel
      cifar10, digits, fashion_mnist, latents)
  builders = {'digits': digits.source, 'cifar10': cifar10.source,
              'fashion_mnist': fashion_mnist.source, 'imagenet_latents': latents.source}
  if data_config.name not in builders:
    raise ValueError(f'Unknown dataset {data_config.name!r}: expected one of '
                     f'{sorted(builders)}; set config.data.name.')
  return builders[data_config.name](data_config)


def build(data_config, global_batch, seed, process=None):
  """(iterator, record shape) of this process's slices of config.data's global batches
  (`process` as in `batches`)."""
  records = source(data_config)
  augment = random_flip if data_config.get('random_flip', False) else None
  return (batches(records, global_batch, seed, augment, read_threads(data_config), process),
          records[0]['x'].shape)
