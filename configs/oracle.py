"""Oracle benchmark: MLP secant models trained on analytic Gaussian-mixture data.

python -m secant_jax.bench.oracle --config=configs/oracle.py[:quick]
                                  [--config.train_steps=...]
"""

import ml_collections


def get_config(arg=None):
  """Full settings by default; 'quick' is the CPU-test size (fewer steps, linear path)."""
  config = ml_collections.ConfigDict()
  config.paths = ('linear', 'edm')
  config.variants = ('sdei', 'stee')
  config.steps = (1, 2, 4)
  config.train_steps = 4000
  config.batch_size = 512
  config.learning_rate = 2e-3
  config.width = 256
  config.depth = 3
  config.sigma_data = 0.7
  config.num_eval = 4096
  config.seed = 0
  if arg == 'quick':
    config.paths = ('linear',)
    config.train_steps = 1500
    config.batch_size = 256
    config.width = 128
    config.num_eval = 1024
  elif arg:
    raise ValueError(f"configs/oracle.py takes no argument or 'quick', got {arg!r}.")
  return config
