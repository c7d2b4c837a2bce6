"""scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes) for the demo: real
images that ship with a package. Pixels 0..16 → [−1, 1], shape [8, 8, 1]."""

import numpy as np


class DigitsSource:
  """Random-access records {'x': [8, 8, 1] float32, 'y': int32}."""

  def __init__(self):
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    self.images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    self.labels = digits.target.astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {'x': self.images[index], 'y': self.labels[index]}


def source(data_config):
  del data_config
  return DigitsSource()
