"""EDM DDPM++ (VP) on CIFAR-10, σ-path: --config=configs/cifar10_edm.py:variant=stee,steps=10

Start from the converted EDM teacher (python -m secant_jax.convert.edm --in
edm-cifar10-32x32-uncond-vp.pkl --out ckpt/edm-ddpmpp). classes=10 uses EDM's
class-conditional network instead (edm-cifar10-32x32-cond-vp.pkl, converted to
ckpt/edm-ddpmpp-cond). CIFAR-10 comes from TFDS (data.dir).
"""

from secant_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dict(variant='stee', steps=10, classes=0))
  if args['classes'] not in (0, 10):
    raise ValueError(f"classes must be 0 (unconditional) or 10 (EDM's conditional CIFAR-10 "
                     f"network), got {args['classes']}.")
  c = config_lib.base_config()
  c.model.family = 'edm_unet'
  c.model.arch = 'ddpmpp'
  c.model.dtype = 'float32'
  # EDM trains in true float32 (its training loop turns TF32 off for convolutions and
  # matmuls); JAX's default would use TF32 on NVIDIA GPUs and a bf16 pass on TPUs.
  c.matmul_precision = 'float32'
  c.model.num_classes = args['classes']
  c.model.unet = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128,
                      channel_mult=(2, 2, 2), augment_dim=9, dropout=0.13)
  c.path.name = 'edm'
  c.path.sigma_data = 0.5
  # EDM's networks were trained without a null label: neither embedded nor classic guidance.
  c.secant = config_lib.secant_config(args['variant'], args['steps'], guidance=None,
                                      label_dropout=0.0)
  c.init_checkpoint = 'ckpt/edm-ddpmpp' + ('-cond' if args['classes'] else '')
  c.optimizer.learning_rate = 1e-4
  c.ema_decay = 0.9999
  c.batch_size = 512
  c.num_train_steps = 50_000
  c.checkpoint_every = 2000
  c.sample_every = 5000
  c.data.name = 'cifar10'
  c.data.dir = ''  # '' = TFDS's default data dir
  c.data.random_flip = True
  return c
