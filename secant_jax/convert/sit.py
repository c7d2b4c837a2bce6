"""SiT/DiT checkpoints (and the secant checkpoints' model/ema dicts) → Flax DiT variables.

    python -m secant_jax.convert.sit --in SiT-XL-2-256.pt --out DIR [--model SiT-XL/2]
        [--guidance-embed] [--key ema|model] [--one-time]

A teacher checkpoint has no s_embedder: it is copied from the t_embedder, so the secant
model starts as the teacher (f(x, t, t) = v(x, t)). Without a cfg_embedder in the file,
the guidance embedder starts from its initialisation, whose last layer is zero; a file
with one converts to a guided model without --guidance-embed. A checkpoint of the official
train.py also holds its training arguments: the flags that train and sample the same
model here are printed (`official_run_flags`).
The fixed pos_embed is checked against the sin-cos table the Flax model computes.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from secant_jax.convert import common
from secant_jax.models import dit


# How a teacher's variables fill a secant DiT: the s-embedder starts as the t-embedder,
# the guidance embedder from its initialisation (last layer zero).
TEACHER_TO_SECANT = dict(keep_from_template=('cfg_embedder',),
                         copy_missing={'s_embedder': 't_embedder'})


def convert(state_dict, template):
  """State dict → variables shaped as `template` (values needed for a new cfg_embedder)."""
  state_dict = dict(state_dict)
  pos = state_dict.pop('pos_embed', None)
  if pos is not None:
    hidden, tokens = pos.shape[-1], pos.shape[-2]
    grid = int(round(tokens ** 0.5))
    expected = dit.sincos_position_embedding(hidden, grid)
    if pos.reshape(-1, hidden).shape != expected.shape or not np.allclose(
        pos.reshape(-1, hidden), expected, atol=1e-4):
      raise common.ConversionError(
          f"Key 'pos_embed' {tuple(pos.shape)} is not DiT's fixed {grid}x{grid} sin-cos "
          'table; this converter expects a DiT/SiT checkpoint.')
  return common.convert(state_dict, template, **TEACHER_TO_SECANT)


def build(model_name, *, input_size, in_channels, num_classes, learn_sigma, guidance_embed,
          one_time):
  return dit.from_name(model_name, input_size=input_size, in_channels=in_channels,
                       num_classes=num_classes, learn_sigma=learn_sigma,
                       guidance_embed=guidance_embed, two_times=not one_time)


def init_variables(model, seed=0):
  """Real initial variables (the values a new cfg_embedder starts from)."""
  b, size, ch = 1, model.input_size, model.in_channels
  z = jnp.zeros((b,))
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((b, size, size, ch)), z,
                             z if model.two_times else None, jnp.zeros((b,), jnp.int32),
                             z if model.guidance_embed else None)


# What `official_run_flags` reads of the official train.py's arguments.
OFFICIAL_ARGS = ('loss_type', 'num_steps', 'online_cfg')


def official_model(train_args):
  """(model name, latent size) that the official train.py trained (`train_args`: the
  argparse.Namespace its checkpoints hold as 'args'): its --model and --image-size / 8;
  SiT-XL/2 at 32 (256 px) where `train_args` is None or lacks them."""
  return (getattr(train_args, 'model', 'SiT-XL/2'),
          getattr(train_args, 'image_size', 256) // 8)


def official_guidance_range(train_args):
  """(w_min, w_max) of the embedded guidance that the official train.py trained with
  (`train_args`, as for `official_model`), or None: its --online-cfg 'lo-hi' draws
  w ~ U(lo, hi); one value w is the fixed scale w, which its model multiplies by 0 before
  embedding, as our range (w, w) normalises every scale to 0."""
  if train_args.online_cfg is None:
    return None
  bounds = tuple(float(v) for v in train_args.online_cfg.split('-'))
  return bounds * 2 if len(bounds) == 1 else bounds


def official_run_flags(train_args):
  """The flags of `python -m secant_jax.main` for the model that the official train.py
  trained with `train_args`: variant, steps and `official_guidance_range` (without
  guidance, labels dropped with p = 0.1 in every term), and the model's size and latent
  size where they are not the config's SiT-XL/2 at 256 px."""
  flags = [f'--config=configs/imagenet_sit.py:variant={train_args.loss_type},'
           f'steps={train_args.num_steps}']
  model, input_size = official_model(train_args)
  if dit.parse_name(model) != dit.parse_name('SiT-XL/2'):
    flags.append(f'--config.model.name={model}')
  if input_size != 32:
    flags.append(f'--config.model.input_size={input_size}')
  scale_range = official_guidance_range(train_args)
  if scale_range is None:
    return flags + ["--config.secant.guidance='()'", '--config.secant.label_dropout=0.1']
  return flags + [f"--config.secant.guidance='({scale_range[0]}, {scale_range[1]})'"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--in', dest='input', required=True, help='.pt/.pth/.safetensors/.npz')
  parser.add_argument('--out', required=True, help='Orbax checkpoint directory to write')
  parser.add_argument('--model', default=None,
                      help="default: an official checkpoint's own, else 'SiT-XL/2'")
  parser.add_argument('--input-size', type=int, default=None,
                      help="latent size, image size / 8; default: an official checkpoint's "
                      'own, else 32')
  parser.add_argument('--in-channels', type=int, default=4)
  parser.add_argument('--num-classes', type=int, default=1000)
  parser.add_argument('--no-learn-sigma', action='store_true')
  parser.add_argument('--guidance-embed', action='store_true',
                      help='add the embedded-CFG input (distillation variants)')
  parser.add_argument('--one-time', action='store_true',
                      help='the plain one-time teacher (no s_embedder)')
  parser.add_argument('--key', default=None, help="state dict inside the file ('ema'/'model')")
  args = parser.parse_args(argv)
  checkpoint = common.read_checkpoint(args.input)
  state_dict = common.state_dict(checkpoint, args.key, args.input)
  train_args = checkpoint.get('args')  # a Namespace from its train.py, a dict from ours
  if isinstance(train_args, dict) and set(OFFICIAL_ARGS) <= set(train_args):
    train_args = argparse.Namespace(**train_args)
  if not isinstance(train_args, argparse.Namespace):
    train_args = None
  official_name, official_size = official_model(train_args)
  model_name = args.model or official_name
  input_size = args.input_size or official_size
  guided = args.guidance_embed or any(k.startswith('cfg_embedder.') for k in state_dict)
  model = build(model_name, input_size=input_size, in_channels=args.in_channels,
                num_classes=args.num_classes, learn_sigma=not args.no_learn_sigma,
                guidance_embed=guided, one_time=args.one_time)
  variables = convert(state_dict, init_variables(model))
  common.save(variables, args.out)
  print(f'{model_name}{" with guidance input" if guided else ""}: '
        f'{common.parameter_count(variables):,} parameters → {args.out}')
  if train_args is not None:
    print('Trained by the official train.py; with --out RUN/ema, sample or evaluate it '
          'with\n  python -m secant_jax.main ' + ' '.join(official_run_flags(train_args))
          + ' --workdir=RUN --config.mode=evaluate')
    scale_range = official_guidance_range(train_args)
    if scale_range is None:
      print('Its sample_ddp.py samples a model without embedded guidance (two-pass CFG) in '
            'float32, outside autocast; to sample as it does, add --config.model.dtype=float32')
    else:
      print('Its test.sh, as published, gives the model the normalised scale 0 at every '
            'step; to sample as it does, add '
            f'--config.secant.sample_guidance_scale={scale_range[0]}')


if __name__ == '__main__':
  main()
