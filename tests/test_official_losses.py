"""The train step's losses against a PyTorch statement of the official code's
`Transport.training_losses` (poppuppy/secant_expectation, transport/transport.py), on the
same random-weight SiT student and teacher and the same draws.

Written here from what that code computes (our statement, not its text): with an embedded
scale ("online cfg") the student sees the true labels and w normalised as
(w − w_min)/(w_max − w_min), the teacher target is its two-pass CFG with null class
`num_classes` on all channels, and STEI's diffusion term sees the dropped labels at w = 1;
without, every call sees the dropped labels and the teacher is called plainly (as that
branch is written: as published, its SDEI and STEI call the teacher with arguments its
forward(x, t, y) does not take, so only STEE runs unguided there). Picard
estimates and targets carry no gradient; the loss is the mean over C, H, W, then over the
batch. What is compared: the loss, and the gradient of every bias of the student (whose
layout both frameworks share), through our DiT, our weight conversion, the step's
secant/teacher apply-functions and conditioning, and `secant.loss`. Where a checkout of
that code is named, tests/test_upstream_code.py runs its training_losses itself against
the same objective (`_ours`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from secant_jax import paths
from secant_jax import secant
from secant_jax.convert import common
from secant_jax.convert import sit as convert_sit
from secant_jax.models import dit
from secant_jax.train import step as step_lib

ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            num_classes=10)
NULL = 10
W_RANGE = (1.25, 3.0)  # w_min ≠ 1, so that w = 1 and w_min normalise differently
B = 6


def _draws(variant):
  rng = np.random.default_rng(1)
  shape = (B, ARCH['input_size'], ARCH['input_size'], ARCH['in_channels'])
  x1, x0 = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
  t = rng.uniform(0.0, 0.7, B).astype(np.float32)
  s = (t + rng.uniform(0.05, 0.25, B)).astype(np.float32)
  if variant in ('sdee', 'stee'):  # the inverse direction for half of them
    t[::2], s[::2] = s[::2].copy(), t[::2].copy()
  r = (t + rng.uniform(size=B) * (s - t)).astype(np.float32)
  tau = rng.uniform(size=B).astype(np.float32)
  y = rng.integers(0, NULL, B).astype(np.int32)
  y_drop = np.where(np.arange(B) % 3 == 0, NULL, y).astype(np.int32)
  w = rng.uniform(*W_RANGE, B).astype(np.float32)
  return x1, x0, secant.TimePairs(t, s, r, tau), y, y_drop, w


def _official_loss(variant, guided, student, teacher, x1, x0, times, y, y_drop, w):
  """The batch-mean loss as the official training_losses computes it (NCHW tensors)."""
  import torch
  tensor = lambda a: torch.from_numpy(np.asarray(a))
  x1, x0 = (tensor(a).permute(0, 3, 1, 2) for a in (x1, x0))
  t, s, r, tau, y, y_drop, w = (tensor(a) for a in (*times, y, y_drop, w))
  y, y_drop = y.long(), y_drop.long()
  e = lambda a: a.view(-1, 1, 1, 1)
  lo, hi = W_RANGE
  normalised = lambda ww: None if ww is None else (ww - lo) / (hi - lo)
  model = lambda x, a, b, yy, ww: student(x, a, b, yy, normalised(ww))
  labels, scale = (y, w) if guided else (y_drop, None)

  def teacher_target(x):
    if not guided:
      return teacher(x, r, None, y_drop)
    both = teacher(torch.cat([x, x]), torch.cat([r, r]), None,
                   torch.cat([y, torch.full_like(y, NULL)]))
    cond, uncond = both.chunk(2)
    return uncond + e(w) * (cond - uncond)

  mean_flat = lambda a: a.mean(dim=(1, 2, 3))
  at = lambda u: e(u) * x1 + (1 - e(u)) * x0
  if variant in ('sdei', 'stei'):
    xt = at(t)
    with torch.no_grad():
      target = teacher_target(xt + e(r - t) * model(xt, t, r, labels, scale))
    loss = mean_flat((model(xt, t, s, labels, scale) - target) ** 2)
    if variant == 'stei':
      v_tau = model(at(tau), tau, tau, y_drop, torch.ones_like(w) if guided else None)
      loss = loss + mean_flat((v_tau - (x1 - x0)) ** 2)
  else:
    xr = at(r)
    with torch.no_grad():
      xt_hat = xr + e(t - r) * model(xr, r, t, labels, scale)
      target = teacher_target(xr) if variant == 'sdee' else x1 - x0
    loss = mean_flat((model(xt_hat, t, s, labels, scale) - target) ** 2)
  return loss.mean()


def _ours(variant, guided, student_state, teacher_state, x1, x0, times, y, y_drop, w,
          arch=None, w_range=W_RANGE):
  """(loss, gradient) of the step's objective: its apply-functions and secant.loss, with
  the labels and scales the step gives each term (`step.term_conditioning`); `arch` the
  DiT's settings (default ARCH), its null class its num_classes."""
  arch = arch or ARCH
  inputs = (jnp.asarray(x1), jnp.asarray(times.t), jnp.asarray(times.s), jnp.asarray(y),
            jnp.asarray(w) if guided else None)
  model = dit.DiT(guidance_embed=guided, **arch)
  variables = convert_sit.convert(student_state, jax.eval_shape(model.init, jax.random.key(0),
                                                                *inputs))
  teacher = dit.DiT(two_times=False, **arch)
  teacher_variables = convert_sit.convert(teacher_state, jax.eval_shape(
      teacher.init, jax.random.key(0), inputs[0], inputs[1], None, inputs[3]))
  task = step_lib.SecantTask(variant, paths.Linear(), 4, model.null_class, label_dropout=0.1,
                             guidance_range=w_range if guided else None)
  apply = lambda module: lambda v, x, t, s, yy, ww, key: module.apply(v, x, t, s, yy, ww)
  teacher_fn = (step_lib.teacher_tangent(task, apply(teacher), teacher_variables)
                if task.needs_teacher else None)
  conditioning, unguided = step_lib.term_conditioning(y, y_drop, w if guided else None)

  def objective(params):
    secant_fn = step_lib.student_secant(task, apply(model), {'params': params}, None)
    per_example, _ = secant.loss(variant, secant_fn, teacher_fn, task.path, x1, x0, times,
                                 *conditioning, diffusion_conditioning=unguided)
    return per_example.mean()

  return jax.value_and_grad(objective)(variables['params'])


@pytest.mark.torch
@pytest.mark.parametrize('variant, guided', [('sdei', True), ('sdei', False), ('stei', True),
                                             ('stei', False), ('sdee', True), ('stee', False)])
def test_loss_and_gradient_match_the_official_training_losses(variant, guided):
  import torch_dit
  student = torch_dit.with_random_weights(0, guidance_embed=guided, **ARCH)
  teacher = torch_dit.with_random_weights(1, two_times=False, **ARCH)
  draws = _draws(variant)
  expected = _official_loss(variant, guided, student, teacher, *draws)
  expected.backward()
  state = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  loss, grads = _ours(variant, guided, state(student), state(teacher), *draws)
  print(f'{variant} guided={guided}: loss {float(loss):.6f}, official {expected.item():.6f}')
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
  assert_bias_gradients_match(grads, student)


def assert_bias_gradients_match(grads, student):
  """Our gradient (Flax params) of every bias of the student against PyTorch's .grad."""
  torch_grads = dict(student.named_parameters())
  biases = {common.torch_key(path[:-1]) + '.bias': g
            for path, g in traverse_util.flatten_dict(grads).items() if path[-1] == 'bias'}
  assert set(biases) == {k for k in torch_grads if k.endswith('.bias')}
  for key, grad in biases.items():
    np.testing.assert_allclose(np.asarray(grad), torch_grads[key].grad.numpy(), rtol=1e-3,
                               atol=1e-6, err_msg=key)
