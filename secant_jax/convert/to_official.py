"""A training run's EMA weights → a checkpoint for the official code
(`poppuppy/secant_expectation`), for its sample_ddp.py to sample and score.

    python -m secant_jax.convert.to_official --run RUN --out FILE.pt [--overwrite]

The file holds 'ema', the state dict of its models.py DiT (`common.to_state_dict` with the
fixed pos_embed added), which is what its sample_ddp.py reads from a train.py checkpoint,
and, for a secant run, 'args': the train.py arguments that say what was trained (model,
image_size, num_classes, loss_type, num_steps, online_cfg), which `convert.sit` reads
back. Its train.py saves them as an argparse.Namespace, which torch.load refuses under
its default weights_only=True since torch 2.6; here they are a dict, so the file loads in
any version. Its sample_ddp.py loads a state dict with strict=False, so a key named
otherwise than its model's would stay at its random initialisation without a word; these
names load strictly into its DiT (tests/test_upstream_code.py) and the reference DiT of
the tests. Neither the raw weights ('model') nor the optimizer state are exported, so its
train.py cannot resume from the file.
"""

import argparse
import os
import re

from etils import epath
from flax import traverse_util

from secant_jax import files
from secant_jax.convert import common
from secant_jax.models import dit
from secant_jax.train import recipe

OFFICIAL_VARIANTS = ('sdei', 'stei', 'sdee', 'stee')
OFFICIAL_IMAGE_SIZES = (256, 512)  # sample_ddp.py's --image-size choices


def official_name(config):
  """'SiT-XL/2' → 'DiT-XL/2', as its models.py names the same network."""
  return re.sub(r'^SiT-', 'DiT-', config.model.name)


def official_online_cfg(guidance_range):
  """Its --online-cfg for our embedded scale range: 'lo-hi', one value where lo = hi (its
  model then embeds 0, as our range (w, w) normalises every scale to 0), None without."""
  if guidance_range is None:
    return None
  lo, hi = guidance_range
  return f'{lo}' if lo == hi else f'{lo}-{hi}'


def official_args(config):
  """The train.py arguments of the model `config` trains, as a dict; None for a teacher
  (variant 'diffusion'), which train.py does not train."""
  if config.secant.variant not in OFFICIAL_VARIANTS:
    return None
  return dict(model=official_name(config), image_size=config.model.input_size * 8,
              num_classes=config.model.num_classes, loss_type=config.secant.variant,
              num_steps=config.secant.steps,
              online_cfg=official_online_cfg(recipe.guidance_range(config.secant)))


def official_mismatches(config):
  """What keeps its sample_ddp.py from building this model, one line each."""
  m = config.model
  depth, hidden, heads, _ = dit.parse_name(m.name)
  named = dict(depth=depth, hidden_size=hidden, num_heads=heads)
  resized = {k: m[k] for k in named if k in m and m[k] != named[k]}
  lines = []
  if resized:
    lines.append(f'its {official_name(config)} has {named}, this model {resized}')
  if m.in_channels != 4:
    lines.append(f'it samples 4-channel latents, this model takes {m.in_channels} channels')
  if not m.get('learn_sigma', True):
    lines.append('its DiT learns sigma (2 × 4 output channels), this model does not '
                 '(model.learn_sigma=False)')
  if m.num_classes != 1000 and recipe.guidance_range(config.secant) is None:
    lines.append(f'its classic CFG takes label 1000 for the null class, this model\'s null '
                 f'class is {m.num_classes}')
  if m.input_size * 8 not in OFFICIAL_IMAGE_SIZES:
    lines.append(f'its --image-size is one of {OFFICIAL_IMAGE_SIZES}, this model\'s latents '
                 f'are {m.input_size}² ({m.input_size * 8} px)')
  return lines


def sample_command(config, out):
  """The command of its sample_ddp.py that samples the exported model as our sample mode
  does (same steps, scale and guidance interval)."""
  s = config.secant
  scale_range = recipe.guidance_range(s)
  flags = [f'--model {official_name(config)}', f'--ckpt {out}',
           f'--image-size {config.model.input_size * 8}', f'--num-sampling-steps {s.steps}']
  if config.model.num_classes != 1000:
    flags.append(f'--num-classes {config.model.num_classes}')
  if scale_range is None:
    flags += ['--no-embed-cfg', f'--cfg-scale {s.sample_cfg_scale}']
  else:
    flags += ['--embed-cfg', f'--online-cfg {official_online_cfg(scale_range)}',
              f'--cfg-scale {s.sample_guidance_scale}']
  lo, hi = s.guidance_interval
  flags.append(f'--cfg-interval {lo},{hi}')
  return 'torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py ' + ' '.join(flags)


def export(run_dir):
  """(config, state dict {key: float32 array}, train.py arguments or None) of the finished
  run in `run_dir`: its EMA weights as the official models.py names and lays them out."""
  config, ema_dir = common.load_run(run_dir)
  if config.model.family != 'dit':
    raise ValueError(f'{run_dir} trained a {config.model.family!r} network (config.model.'
                     "family); the official secant code's model is SiT's DiT, so only runs "
                     "of family 'dit' export to its format.")
  network = recipe.make_network(config)
  try:
    variables = common.fit(traverse_util.flatten_dict(common.load_variables(ema_dir)),
                           network.abstract_variables())
  except common.ConversionError as e:
    raise common.ConversionError(f'{ema_dir} does not hold the model of {run_dir}/'
                                 f'config.json: {e}') from None
  state_dict = common.to_state_dict(variables)
  module = network.module
  grid = module.input_size // module.patch_size
  state_dict['pos_embed'] = dit.sincos_position_embedding(module.hidden_size, grid)[None]
  return config, state_dict, official_args(config)


def write(out, state_dict, train_args):
  """Writes {'ema': state dict as torch tensors[, 'args': train_args]} to `out` (.pt, local
  or gs://), whole or not at all."""
  torch = common.import_torch(f'Writing {out}')
  checkpoint = {'ema': {k: torch.from_numpy(v) for k, v in state_dict.items()}}
  if train_args is not None:
    checkpoint['args'] = train_args
  with files.written_whole(out) as staged:
    torch.save(checkpoint, staged)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--run', required=True, help='the --workdir of a finished training run')
  parser.add_argument('--out', required=True, help='the .pt file to write')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args(argv)
  out = files.absolute(args.out)
  if os.path.splitext(out)[1] != '.pt':
    raise SystemExit(f'--out {out}: expected a .pt file, the format its sample_ddp.py loads.')
  if epath.Path(out).exists() and not args.overwrite:
    raise SystemExit(f'--out {out} exists; pass --overwrite to replace it, or another path.')
  config, state_dict, train_args = export(args.run)
  write(out, state_dict, train_args)
  count = sum(v.size for k, v in state_dict.items() if k != 'pos_embed')
  print(f'{official_name(config)}: {count:,} parameters → {out}')
  mismatches = official_mismatches(config)
  if mismatches:
    print('Its sample_ddp.py cannot build this model as published: ' + '; '.join(mismatches)
          + '.')
  if train_args is None:
    print(f'A {config.secant.variant!r} run, not a secant model: no training arguments '
          'written; its models.py loads the weights.')
    return
  print('Sample and score it in a checkout of poppuppy/secant_expectation with\n  '
        + sample_command(config, out))
  if recipe.guidance_range(config.secant) is None and config.secant.sample_cfg_scale > 1:
    print('With --cfg-scale > 1 and --no-embed-cfg its forward_with_cfg adds the output of '
          'a guidance embedder this model does not have, left at its random '
          'initialisation; its samples then differ from ours (--cfg-scale 1 does not).')


if __name__ == '__main__':
  main()
