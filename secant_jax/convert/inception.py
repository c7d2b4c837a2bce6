"""torch-fidelity's FID Inception weights → Flax `models.inception.InceptionV3` variables.

    python -m secant_jax.convert.inception --in weights-inception-2015-12-05-6726825d.pth --out ckpt/inception

The weights file is the 2015 TensorFlow graph converted by torch-fidelity (the same
network pytorch-fid and the official secant evaluation use). Nothing is downloaded at run
time: fetch it once from WEIGHTS_URL. BatchNorm running statistics go to 'batch_stats';
'num_batches_tracked' counters are dropped.
"""

import jax.numpy as jnp

from secant_jax.convert import common
from secant_jax.models import inception

WEIGHTS_URL = ('https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
               'weights-inception-2015-12-05-6726825d.pth')
_BN_STATS = {'running_mean': 'mean', 'running_var': 'var'}


def template():
  return common.abstract_variables(inception.InceptionV3(), jnp.zeros((1, 8, 8, 3), jnp.uint8))


def convert(state_dict):
  """torch-fidelity's state dict → InceptionV3 variables ({'params', 'batch_stats'})."""
  renamed = {}
  for key, value in state_dict.items():
    *module, leaf = key.split('.')
    if leaf == 'num_batches_tracked':
      continue
    renamed['.'.join([*module, _BN_STATS.get(leaf, leaf)])] = value
  return common.convert(renamed, template())


def load(path):
  """InceptionV3 variables from a converted directory or the .pth weights file itself."""
  return common.load_or_convert(path, convert, 'Inception', WEIGHTS_URL + " (torch-fidelity's "
                                'FID Inception)', 'config.fid.inception')


def main(argv=None):
  common.weights_cli(__doc__.split('\n\n')[0], convert, 'InceptionV3', WEIGHTS_URL, argv)


if __name__ == '__main__':
  main()
