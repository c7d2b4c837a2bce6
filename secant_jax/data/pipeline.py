"""The grain pipeline every dataset goes through, and the dispatcher from the config.

A source (random access, records {'x': NHWC float32 in the model's range, 'y': int32})
is cut to this process's share (process i takes records i, i + P, ...), shuffled anew
each epoch from the seed, repeated, augmented by a seeded random map and batched to the
per-process batch. The iterator's state ({'next_index': n}) goes into the checkpoint, so
a resumed run reads the same batches as a straight one.
"""

import grain
import jax
import numpy as np


def batches(source, batch_size, seed, augment=None):
  """A resumable iterator of {'x': [b, ...], 'y': [b]} process-local batches."""
  if len(source) < jax.process_count():
    raise ValueError(f'The dataset has {len(source)} records, fewer than the '
                     f'{jax.process_count()} processes reading it.')
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  ds = ds.shuffle(seed=seed).repeat()
  if augment is not None:
    ds = ds.random_map(augment, seed=seed + 1)
  return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


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


def build(data_config, batch_size, seed):
  """(iterator, record shape) of this process's batches of config.data."""
  records = source(data_config)
  augment = random_flip if data_config.get('random_flip', False) else None
  return batches(records, batch_size, seed, augment), records[0]['x'].shape
