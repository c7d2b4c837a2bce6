"""`generate.sample` against a PyTorch statement of the official sampler's loop
(poppuppy/secant_expectation, sample_ddp.py), on the same random-weight SiT secant model,
noise and labels.

Written here from what that loop computes (our statement, not its text): N steps
x ← x + (1/N)·f(x, k/N, (k+1)/N) from the noise, the scale w used at steps whose k/N lies
in the interval [a, b) and 1 elsewhere. With an embedded scale (`--embed-cfg`), f is the
model given w normalised as (w − w_min)/(w_max − w_min); run as its test.sh runs it (no
`--online-cfg`, whose one-value default makes the model multiply the scale by 0), the
model is given 0 whatever w is. Without (`forward_with_cfg`), f is the two-pass CFG
u + w·(c − u) on all channels, the unconditional pass with null class `num_classes`; at
`--cfg-scale 1`, the plain conditional model.
"""

import shlex

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from secant_jax import generate
from secant_jax import main as main_lib
from secant_jax import paths
from secant_jax.convert import sit as convert_sit
from secant_jax.models import dit
from secant_jax.models import registry
from secant_jax.train import step as step_lib
from test_official_losses import ARCH, NULL, W_RANGE  # the same tiny SiT and scale range

B, STEPS = 5, 4
INTERVAL = (0.25, 0.75)  # steps 1 and 2 of 4 guided: both ends of [a, b) are exercised

# name: (embedded scale range or None, label dropout, sample scale, interval, official f)
CASES = {
    'embedded': (W_RANGE, 0.0, 2.0, INTERVAL, 'embedded'),
    'embedded as test.sh': ((1.0, 2.5), 0.0, 1.0, (0.0, 1.0), 'embedded at 0'),
    'classic cfg': (None, 0.1, 1.75, INTERVAL, 'cfg'),
    'conditional': (None, 0.0, 1.0, (0.0, 1.0), 'conditional'),
}


def _official_samples(model, noise, labels, steps, scale, interval, kind, scale_range,
                      null=NULL):
  """The official loop's samples [B, H, W, C] from `noise` [B, H, W, C]."""
  import torch
  z = torch.from_numpy(np.array(noise)).permute(0, 3, 1, 2)
  y = torch.from_numpy(np.array(labels)).long()
  batch = z.shape[0]
  h = 1.0 / steps
  one = h * torch.ones(batch)
  with torch.no_grad():
    for k in range(steps):
      t, s = k * one, (k + 1) * one
      w = scale if interval[0] <= k / steps < interval[1] else 1.0
      if kind == 'embedded':
        lo, hi = scale_range
        f = model(z, t, s, y, (w - lo) / (hi - lo) * torch.ones(batch))
      elif kind == 'embedded at 0':
        f = model(z, t, s, y, torch.zeros(batch))
      elif kind == 'cfg':
        both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([s, s]),
                     torch.cat([y, torch.full_like(y, null)]))
        cond, uncond = both.chunk(2)
        f = uncond + w * (cond - uncond)
      else:
        f = model(z, t, s, y)
      z = z + h * f
  return z.permute(0, 2, 3, 1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize('case', CASES)
def test_samples_match_the_official_sampler(case):
  import torch_dit
  scale_range, label_dropout, scale, interval, kind = CASES[case]
  guided = scale_range is not None
  model = torch_dit.with_random_weights(2, guidance_embed=guided, **ARCH)
  rng = np.random.default_rng(3)
  noise = rng.normal(size=(B, 8, 8, 4)).astype(np.float32)
  labels = rng.integers(0, NULL, B).astype(np.int32)
  expected = _official_samples(model, noise, labels, STEPS, scale, interval, kind, scale_range)

  network = registry.Network(dit.DiT(guidance_embed=guided, **ARCH), guided, (8, 8, 4), NULL)
  variables = convert_sit.convert({k: v.numpy() for k, v in model.state_dict().items()},
                                  network.abstract_variables())
  task = step_lib.SecantTask('sdei', paths.Linear(), STEPS, NULL, label_dropout=label_dropout,
                             guidance_range=scale_range)
  sampling = ml_collections.ConfigDict(dict(sample_guidance_scale=scale,
                                            sample_cfg_scale=scale, guidance_interval=interval))
  ours = generate.sample(network, task, variables, sampling, jnp.asarray(noise),
                         jnp.asarray(labels))
  print(f'{case}: max |ours − official| {np.abs(np.asarray(ours) - expected).max():.2e}, '
        f'max |x| {np.abs(expected).max():.2f}')
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_a_converted_official_checkpoint_samples_as_its_sampler_does(tmp_path, capsys):
  """A train.py checkpoint (DiT-S/8 at 128 px, STEI, --online-cfg 1-2.5, 2 steps)
  converted with no flag but its paths, then sampled by `python -m secant_jax.main` with
  the flags the converter prints (the model's size among them), at the scale it gives for
  its test.sh, equals the official loop from the same noise as test.sh runs it."""
  import argparse
  import torch
  import torch_dit
  from test_config import parse_main_flags
  arch = dict(input_size=16, patch_size=8, hidden_size=384, depth=12, num_heads=6,
              num_classes=1000)
  model = torch_dit.with_random_weights(4, guidance_embed=True, **arch)
  torch.save({'model': model.state_dict(), 'ema': model.state_dict(),
              'args': argparse.Namespace(loss_type='stei', num_steps=2, online_cfg='1-2.5',
                                         model='DiT-S/8', image_size=128)},
             tmp_path / '0010000.pt')
  run = tmp_path / 'run'
  convert_sit.main(['--in', str(tmp_path / '0010000.pt'), '--out', str(run / 'ema')])
  printed = capsys.readouterr().out.splitlines()
  command = next(line for line in printed if 'python -m secant_jax.main' in line)
  test_sh = printed[-1].split('add ')[-1]
  flags = shlex.split(command.split('python -m secant_jax.main ')[1].replace(
      '--workdir=RUN --config.mode=evaluate', '--config.mode=sample'))
  assert '--config.model.name=DiT-S/8' in flags and '--config.model.input_size=16' in flags
  c = parse_main_flags(*flags, test_sh, '--config.model.dtype=float32',
                       '--config.num_sample_images=3')
  main_lib.run(c, run)
  ours = np.load(run / 'samples.npz')
  noise, labels = generate.fixed_noise_and_labels(c.seed, 3, (16, 16, 4), 1000)
  np.testing.assert_array_equal(ours['labels'], labels)
  expected = _official_samples(model, noise, labels, 2, 1.0, (0.0, 1.0), 'embedded at 0',
                               None, null=1000)
  print(f'max |ours − official| {np.abs(ours["samples"] - expected).max():.2e}')
  np.testing.assert_allclose(ours['samples'], expected, rtol=1e-5, atol=1e-5)
