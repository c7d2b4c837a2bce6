"""Analytic FLOP counts (2 per multiply-add, matmuls only) of the DiT and of the secant
train step and sampler built on it, and the peak bf16 FLOP/s and memory bandwidth of known
accelerators.

DiT forward per image, N = (H/p)² tokens of width D, L blocks:

    L·(2·N·D·3D + 4·N²·D + 2·N·D² + 4·r·N·D² + 12·D²)      qkv, attention, proj, MLP, adaLN
    + 2·N·p²C·D + 2·N·D·p²C_out + 4·D² + 2·(256·D + D²)·E  patchify, final, time embedders

(E time-like embedders: t, s and the guidance scale). SiT-XL/2 at 256²: 237.3 GFLOP.
The backward pass costs twice the forward. Other networks (EDM's U-Net) are counted by
XLA's cost analysis of their forward pass, which on the DiT counts the formula's matmuls
and the elementwise ops it leaves out: 0.3% more for SiT-XL/2 in fp32 (237.9 GFLOP),
1.2% for DiT-S/2 in bf16.
"""

import jax
import jax.numpy as jnp

from secant_jax.models import dit

# Forward-equivalents of one train step per image: the student's forward + backward (3),
# plus the stop-gradient Picard estimate (1), plus the target: the teacher (2 passes with
# CFG, else 1) or STEI's own tangent (1, stei_target='self'), plus STEI's diffusion term (3).
_STUDENT, _PICARD = 3, 1

PEAK_BF16_FLOPS = (  # (substring of jax's device_kind, dense bf16 FLOP/s)
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
    ('TPU v6', 918e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5', 459e12),
    ('TPU v4', 275e12))

PEAK_BANDWIDTH = (  # (substring of jax's device_kind, memory bandwidth in bytes/s)
    ('H200', 4.8e12), ('H100 PCIe', 2.0e12), ('H100', 3.35e12), ('A100', 2.0e12),
    ('TPU v6', 1.64e12), ('TPU v5 lite', 0.82e12), ('TPU v5e', 0.82e12),
    ('TPU v5', 2.76e12), ('TPU v4', 1.2e12))


def dit_forward(module):
  """FLOPs of one forward pass of a `models.dit.DiT` on one image."""
  n = (module.input_size // module.patch_size) ** 2
  d = module.hidden_size
  p2c = module.patch_size ** 2 * module.in_channels
  out = p2c * (2 if module.learn_sigma else 1)
  block = (2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d
           + 4 * module.mlp_ratio * n * d * d + 12 * d * d)
  embedders = 1 + int(module.two_times) + int(module.guidance_embed)
  return (module.depth * block + 2 * n * p2c * d + 2 * n * d * out + 4 * d * d
          + 2 * (256 * d + d * d) * embedders)


def network_forward(network):
  """FLOPs of one forward pass of a `models.registry.Network` on one image: `dit_forward`
  for a DiT, `counted_forward` otherwise."""
  if isinstance(network.module, dit.DiT):
    return dit_forward(network.module)
  return counted_forward(network)


def counted_forward(network):
  """FLOPs of one forward pass on one image as XLA's cost analysis counts the lowered
  program (every op, not only matmuls and convolutions)."""
  one = lambda dtype, *shape: jax.ShapeDtypeStruct((1, *shape), dtype)
  forward = jax.jit(lambda v, x, t, y: network.apply(v, x, t, t, y,
                                                    t if network.guided else None))
  lowered = forward.lower(network.abstract_variables(), one(jnp.float32, *network.image_shape),
                          one(jnp.float32), one(jnp.int32))
  return float(lowered.cost_analysis()['flops'])


def train_forward_equivalents(task):
  """Forward passes one train step costs per image, counting a backward as two."""
  if task.variant == 'diffusion':
    return _STUDENT
  if task.needs_teacher:
    target = 2 if task.guidance_range is not None else 1
  else:
    target = int(task.variant == 'stei')  # its own tangent f_θ⁻(x̂_r, r, r); STEE: data
  diffusion = _STUDENT if task.variant == 'stei' and task.stei_lambda else 0
  return _STUDENT + _PICARD + target + diffusion


def sample_forward_equivalents(num_steps, classic_cfg):
  """Forward passes per image of secant sampling: one per step, two with two-pass CFG."""
  return num_steps * (2 if classic_cfg else 1)


def _lookup(table, device_kind):
  return next((value for name, value in table if name.lower() in device_kind.lower()), None)


def peak_flops(device_kind):
  """Dense bf16 peak FLOP/s of the device, or None when unknown (e.g. CPUs)."""
  return _lookup(PEAK_BF16_FLOPS, device_kind)


def peak_bandwidth(device_kind):
  """Memory bandwidth of the device in bytes/s, or None when unknown (e.g. CPUs)."""
  return _lookup(PEAK_BANDWIDTH, device_kind)
