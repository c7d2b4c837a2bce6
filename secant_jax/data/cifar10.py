"""CIFAR-10 from TFDS's random-access data source: uint8 → [−1, 1], NHWC [32, 32, 3]."""

import numpy as np
from etils import epath


class Cifar10Source:
  """Wraps tfds.data_source('cifar10') records into {'x', 'y'}."""

  def __init__(self, tfds_source):
    self._source = tfds_source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    return {'x': record['image'].astype(np.float32) / 127.5 - 1.0,
            'y': np.int32(record['label'])}


def source(data_config):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = data_config.get('dir') or None
  if data_dir is not None and not epath.Path(data_dir).is_dir():
    raise FileNotFoundError(f'CIFAR-10 data dir {data_dir} does not exist; prepare it with '
                            f'`tfds build cifar10 --data_dir={data_dir}` on a machine with '
                            'internet access, or set config.data.dir.')
  try:
    split = tfds.data_source('cifar10', split=data_config.get('split', 'train'),
                             data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types for a missing dataset
    raise FileNotFoundError(f'CIFAR-10 is not prepared in {data_dir or "the TFDS default dir"}'
                            f' ({type(e).__name__}); run `tfds build cifar10'
                            f'{" --data_dir=" + data_dir if data_dir else ""}` first.') from e
  return Cifar10Source(split)
