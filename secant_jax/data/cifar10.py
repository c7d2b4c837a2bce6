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
  """tfds.data_source('cifar10') from config.data.dir (TFDS's default dir where empty:
  $TFDS_DATA_DIR, else ~/tensorflow_datasets). Random access needs the ArrayRecord files of
  `tfds build cifar10 --file_format=array_record`; plain `tfds build` writes TFRecord, which
  TFDS refuses here."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = data_config.get('dir') or None
  # for the error messages alone: a builder of the default dir reads its dataset info
  where = lambda: data_dir or f'TFDS\'s default dir {tfds.builder("cifar10").data_dir_root}'
  build = 'tfds build cifar10 --file_format=array_record' + (f' --data_dir={data_dir}'
                                                              if data_dir else '')
  if data_dir is not None and not epath.Path(data_dir).is_dir():
    raise FileNotFoundError(f'CIFAR-10 data dir {data_dir} does not exist; prepare it with '
                            f'`{build}` on a machine with internet access, or set '
                            'config.data.dir.')
  try:
    split = tfds.data_source('cifar10', split=data_config.get('split', 'train'),
                             data_dir=data_dir, download=False)
  except NotImplementedError as e:  # prepared, but in a format without random access
    raise ValueError(f'CIFAR-10 in {where()} is prepared as TFRecord (what plain `tfds build` '
                     'writes), which has no random access; prepare it again as ArrayRecord '
                     f'with `{build}`, after deleting its cifar10 directory or into another '
                     'data dir.') from e
  except Exception as e:  # TFDS raises several types for a missing dataset
    raise FileNotFoundError(f'CIFAR-10 is not prepared in {where()} ({type(e).__name__}); run '
                            f'`{build}` first.') from e
  return Cifar10Source(split)
