"""Fashion-MNIST from its IDX files (Debian's `dataset-fashion-mnist` installs them under
/usr/share/datasets/fashion-mnist/): 28×28 grey images padded to 32×32 with background,
uint8 → [−1, 1], NHWC [32, 32, 1]; labels 0..9 (the model's null class 10 is CFG's).

IDX layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then
each dimension as a big-endian int32, then the data. Files may be gzipped, and may lie in
a bucket (config.data.dir=gs://…).
"""

import gzip

import numpy as np
from etils import epath

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
PAD = 2  # 28 + 2·2 = 32: patch sizes 2, 4, 8 divide it


def read_idx(path):
  """The uint8 array in an IDX file (`path` or `path`.gz)."""
  for candidate in (path, path + '.gz'):
    if epath.Path(candidate).exists():
      data = epath.Path(candidate).read_bytes()
      data = gzip.decompress(data) if candidate.endswith('.gz') else data
      break
  else:
    raise FileNotFoundError(f'Fashion-MNIST file {path}(.gz) does not exist; install it with '
                            '`apt-get install dataset-fashion-mnist` or set config.data.dir '
                            'to a directory holding the four IDX files.')
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path} is not an IDX file of uint8 (magic {data[:4].hex()}, expected '
                     '0000 08 followed by the number of dimensions).')
  ndim = data[3]
  shape = tuple(np.frombuffer(data, '>i4', ndim, offset=4))
  values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if values.size != np.prod(shape):
    raise ValueError(f'{path} is truncated: header says {shape}, found {values.size} values.')
  return values.reshape(shape)


def load(directory, split):
  """(images [N, 32, 32, 1] uint8, labels [N] int32) of `split` ('train' or 'test')."""
  if split not in FILES:
    raise ValueError(f'Unknown Fashion-MNIST split {split!r}: expected one of '
                     f'{sorted(FILES)}; set config.data.split.')
  image_file, label_file = (str(epath.Path(directory) / name) for name in FILES[split])
  images = read_idx(image_file)
  labels = read_idx(label_file).astype(np.int32)
  if images.ndim != 3 or len(images) != len(labels):
    raise ValueError(f'{image_file} holds {images.shape}, {label_file} {labels.shape}: '
                     'expected [N, 28, 28] images and N labels.')
  images = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
  return images[..., None], labels


class FashionMnistSource:
  """Random-access records {'x': [32, 32, 1] float32 in [−1, 1], 'y': int32}."""

  def __init__(self, directory=DEFAULT_DIR, split='train'):
    self.images, self.labels = load(directory, split)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {'x': self.images[index].astype(np.float32) / 127.5 - 1.0, 'y': self.labels[index]}


def source(data_config):
  return FashionMnistSource(data_config.get('dir') or DEFAULT_DIR,
                            data_config.get('split', 'train'))
