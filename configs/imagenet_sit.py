"""SiT-XL/2 on ImageNet-256 VAE latents: --config=configs/imagenet_sit.py:variant=sdei,steps=4

Start from the converted teacher (python -m secant_jax.convert.sit --in SiT-XL-2-256.pt
--out ckpt/sit-xl2); set data.dir to the imported latents (python -m secant_jax.data.latents),
or to those of ImageNet's images encoded here (python -m secant_jax.data.encode).
"""

from secant_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dict(variant='sdei', steps=4))
  c = config_lib.base_config()
  c.model = config_lib.dit_model('SiT-XL/2', input_size=32, in_channels=4, num_classes=1000,
                                 learn_sigma=True)
  # Float32 products at TF32, as the official train.py and sample_ddp.py allow it: the bf16
  # products of the networks are unchanged (the train step compiles to the same bytes for
  # an H100, 0.04% more FLOPs for a TPU); the float32 ones, the SD-VAE decoder's for FID,
  # compute as TF32 on GPUs (as with '') and in three bf16 passes on TPUs, not one.
  c.matmul_precision = 'tensorfloat32'
  c.path.name = 'linear'
  c.secant = config_lib.secant_config(args['variant'], args['steps'], guidance=(1.0, 2.5))
  c.init_checkpoint = 'ckpt/sit-xl2'
  c.optimizer.learning_rate = 1e-5
  c.optimizer.weight_decay = 0.0
  c.ema_decay = 0.9999
  c.batch_size = 256
  c.num_train_steps = 100_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.data.name = 'imagenet_latents'
  c.data.dir = 'data/imagenet256-latents'
  c.data.latent_scale = 0.18215
  return c
