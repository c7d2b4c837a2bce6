"""The whole method in minutes on a CPU: python -m secant_jax.main --config=configs/demo.py
--workdir=/tmp/secant-demo

1. trains a small class-conditional SiT teacher on scikit-learn's digits (flow matching
   with label dropout, so it supports CFG);
2. distils it with SDEI (embedded CFG), one secant model per step count 1, 2, 4, and
   trains STEE from the teacher's weights (one model, jumps of any length);
3. samples 1, 2 and 4 steps from the same noise and measures the error to the teacher's
   adaptive reference ODE solution, next to the teacher's Euler and Heun at equal NFE;
   writes metrics.json, samples.png and TensorBoard events.
"""

import ml_collections

from secant_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dict(scale=1.0))
  c = config_lib.base_config()
  c.mode = 'demo'
  c.model = config_lib.dit_model('DiT-S/2', input_size=8, in_channels=1, num_classes=10,
                                 learn_sigma=False, dtype='float32', hidden_size=64, depth=4,
                                 num_heads=4)
  c.path.name = 'linear'
  c.secant = config_lib.secant_config('diffusion', 1)  # mode=train alone: the teacher stage
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.ema_decay = 0.995  # short stages: an EMA of ~200 steps, not of the initial weights
  c.batch_size = 64
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1
  c.num_sample_images = 40
  c.data.name = 'digits'
  c.demo = ml_collections.ConfigDict(dict(
      teacher_steps=4000, sdei_steps=1000, stee_steps=2000, secant_learning_rate=2e-4,
      sdei_step_counts=(1, 2, 4), eval_step_counts=(1, 2, 4), num_eval=500,
      eval_scale=args['scale'], guidance=(1.0, 2.0)))
  return c
