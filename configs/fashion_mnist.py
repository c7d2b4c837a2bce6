"""Fashion-MNIST (real 32×32 grey images, `apt-get install dataset-fashion-mnist`): the
paper's table in miniature.

    # 1. a class-conditional flow-matching teacher from scratch
    python -m secant_jax.main --config=configs/fashion_mnist.py:stage=teacher --workdir=runs/fmnist-teacher
    # 2. secant models from it, exactly as on ImageNet (only the config differs)
    python -m secant_jax.main --config=configs/fashion_mnist.py:stage=secant,variant=sdei,steps=4 --workdir=runs/fmnist-sdei
    python -m secant_jax.main --config=configs/fashion_mnist.py:stage=secant,variant=stee,steps=4 --workdir=runs/fmnist-stee
    # 3. the domain feature network for FD-FMNIST, then the table
    python -m secant_jax.evaluation.fmnist_features --out ckpt/fmnist-features
    python -m secant_jax.main --config=configs/fashion_mnist.py:stage=compare --workdir=runs/fmnist-table

Arguments: stage (teacher | secant | compare), variant and steps (the secant stage's only),
model, teacher (the teacher's run directory). The secant runs the table compares are
--config.compare.secants. Models:

- 'SiT-S/2' or any DiT/SiT name ('tiny' for CPU tests): the flow-matching SiT on the
  linear path; distillation (SDEI/SDEE) embeds the guidance scale w ~ U(1, 2).
- 'unet' ('unet-tiny' for CPU tests): EDM's DDPM++ SongUNet, class-conditional by EDM's
  one-hot labels, on the σ-path with EDM's preconditioning (σ_data = 0.66, the std of the
  padded training images), its teacher trained with EDM's loss (log-normal σ, the
  network output's ℓ2). It has no guidance input, so distillation learns the
  conditional teacher (w = 1) and STEE samples with classic CFG.

Give the same model to all three stages of one table.
"""

from secant_jax import config as config_lib
from secant_jax.models import dit

STAGES = ('teacher', 'secant', 'compare')
TINY = dict(hidden_size=64, depth=2, num_heads=4)
UNETS = {  # SongUNet sizes for 32×32 grey images
    'unet': dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2,
                 attn_resolutions=(16,)),
    'unet-tiny': dict(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                      attn_resolutions=(16,)),
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dict(stage='teacher', variant='sdei', steps=4,
                                        model='SiT-S/2', teacher='runs/fmnist-teacher'))
  if args['stage'] not in STAGES:
    raise ValueError(f"Unknown stage {args['stage']!r}: expected one of {STAGES}, e.g. "
                     'configs/fashion_mnist.py:stage=secant,variant=sdei,steps=4.')
  ignored = sorted(config_lib.given_keys(arg) & {'variant', 'steps'})
  if ignored and args['stage'] != 'secant':
    raise ValueError(f"Config arguments {', '.join(ignored)}: stage={args['stage']} does not "
                     'read them (they choose the secant model that stage=secant trains; '
                     'stage=compare compares the runs in --config.compare.secants). Drop '
                     'them, or give stage=secant.')
  c = config_lib.base_config()
  unet = args['model'] in UNETS
  if unet:
    c.model.family = 'edm_unet'
    c.model.arch = 'ddpmpp'
    c.model.unet = dict(img_resolution=32, in_channels=1, out_channels=1, dropout=0.1,
                        **UNETS[args['model']])
    c.model.num_classes = 10
    c.model.dtype = 'bfloat16'
    c.path.name = 'edm'
    c.path.sigma_data = 0.66
  else:
    tiny = args['model'] == 'tiny'
    if not tiny:
      _check_dit_name(args['model'])
    c.model = config_lib.dit_model('DiT-S/4' if tiny else args['model'], input_size=32,
                                   in_channels=1, num_classes=10, learn_sigma=False,
                                   **(TINY if tiny else {}))
    c.path.name = 'linear'
  c.data.name = 'fashion_mnist'
  c.data.dir = ''  # '' = /usr/share/datasets/fashion-mnist
  c.data.split = 'train'
  c.fid.features = 'fmnist'
  c.fid.fmnist = 'ckpt/fmnist-features'
  c.fid.reference_split = 'test'
  c.fid.batch_size = 500
  c.fid.num_samples = 10_000
  c.fid.train_num_samples = 2_000
  c.batch_size = 256
  c.log_every = 100
  c.checkpoint_every = 2000
  c.sample_every = 2000
  # EMA warm-up in both stages (train.step.ema_decay_at): no share of the initialisation,
  # random weights for the teacher, the teacher's for a secant stage, which at EMA 0.999
  # without it would keep 37% of the teacher in its EMA after 1000 steps.
  c.ema_warmup = True
  teacher_ema = args['teacher'] + '/ema'
  if args['stage'] == 'teacher':
    c.secant = config_lib.secant_config('diffusion', 1)
    if unet:  # EDM's training loss: ln σ ~ N(−1.2, 1.2²), the network output's ℓ2
      c.secant.loss_weighting = 'edm'
      c.secant.diffusion_log_sigma = (-1.2, 1.2)
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 1000
    c.ema_decay = 0.999
    c.num_train_steps = 30_000
  else:
    c.secant = config_lib.secant_config(args['variant'], args['steps'],
                                        guidance=None if unet else (1.0, 2.0))
    c.init_checkpoint = teacher_ema
    c.teacher_checkpoint = teacher_ema
    c.optimizer.learning_rate = 1e-4
    c.ema_decay = 0.999
    c.num_train_steps = 10_000
  if args['stage'] == 'compare':
    c.mode = 'compare'
    c.compare.update(dict(teacher=args['teacher'], batch_size=500,
                          secants='sdei=runs/fmnist-sdei,stee=runs/fmnist-stee'))
  return c


def _check_dit_name(name):
  """A DiT/SiT size name, or an error that also names this config's other models."""
  try:
    dit.parse_name(name)
  except ValueError as error:
    raise ValueError(f"{error} configs/fashion_mnist.py also takes model=tiny, or the "
                     f"U-Nets {', '.join(f'model={k}' for k in UNETS)}.") from None
