"""Accelerators a program can be compiled for on a machine without one (deviceless AOT).

A target is named like the hardware: a GPU ('h100', 'h200'), a host with several
('8xh100'), or a Cloud TPU slice as gcloud names it ('v4-32', 'v5p-8', 'v5litepod-16' or
'v5e-16', 'v6e-8'). Compiling for it runs the same XLA passes, fusions and buffer
assignment as on the device, so the compiled program's memory per device can be read on a
CPU machine (for a TPU also whether it fits: XLA's TPU compiler refuses a program that
does not), and for a GPU its kernels and bytes moved (`bench.traffic`); nothing can be
run. GPU GEMM autotuning falls back to XLA's default configurations.

GPUs need JAX's CUDA plugin (`pip install -e '.[cuda]'`), TPUs libtpu (`pip install -e
'.[tpu]'`); neither needs the device. The GPU figures are those read off the lent machines
(SMs, L2, memory) and the datasheets (clock, bandwidth). A TPU slice is compiled for as
libtpu describes its topology: chips on a 2D (v5e, v6e) or 3D (v4, v5p) torus, 4 per host
(8 for an 8-chip v5e/v6e host), v4 and v5p chips as one megacore device each.
"""

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  device_kind: str  # as jax reports it on the device
  memory_bytes: int
  l2_bytes: int
  bandwidth: float  # bytes/s
  count: int = 1  # GPUs in the host

  def target_config(self):
    """XLA's GpuTargetConfig proto, as text."""
    return f'''
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: 1.98
  device_memory_size: {self.memory_bytes}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{self.device_kind}"
'''

  def devices(self):
    topology = _topology(self.device_kind, "JAX's CUDA plugin: pip install -e '.[cuda]'",
                         platform='cuda', target_config=self.target_config(),
                         topology=f'1x1x{self.count}')
    return topology.devices


GPUS = {
    'h100': GpuTarget('NVIDIA H100 80GB HBM3', 81559 * 2 ** 20, 50 * 2 ** 20, 3.35e12),
    'h200': GpuTarget('NVIDIA H200', 143771 * 2 ** 20, 60 * 2 ** 20, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  name: str  # libtpu's, in its topology names ('v5e:4x4')
  torus_dims: int  # 2 or 3
  cores_per_chip_in_name: int  # gcloud's v4-8 and v5p-8 count TensorCores: 4 chips
  memory_bytes: int  # HBM per chip available to a program, as XLA's out-of-memory error says


_V5E = TpuGeneration('v5e', 2, 1, int(15.75 * 2 ** 30))
TPUS = {
    'v4': TpuGeneration('v4', 3, 2, int(30.75 * 2 ** 30)),
    'v5p': TpuGeneration('v5p', 3, 2, int(95.74 * 2 ** 30)),
    'v5e': _V5E,
    'v5litepod': _V5E,
    'v6e': TpuGeneration('v6e', 2, 1, int(31.25 * 2 ** 30)),
}


def torus_shape(chips, dims):
  """The slice's chip grid as gcloud lays it out: from 2x2(x1), the smallest side doubles
  (the last of equal ones): v4-32 (16 chips) is 2x2x4, v5e-32 is 4x8, one chip 1x1."""
  if chips == 1 and dims == 2:
    return (1, 1)
  shape = [2, 2] + [1] * (dims - 2)
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f'{chips} chips: a slice has 1 (v5e, v6e) or a power of two >= 4.')
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, side in enumerate(shape) if side == smallest)
    shape[last] *= 2
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  generation: TpuGeneration
  shape: tuple

  @property
  def memory_bytes(self):
    return self.generation.memory_bytes

  def topology_name(self):
    return f'{self.generation.name}:' + 'x'.join(str(side) for side in self.shape)

  def chips_per_host(self):
    if self.shape in ((1, 1), (2, 4)):  # single-host slices of v5e/v6e
      return self.shape + (1,)
    return (2, 2, 1)

  def devices(self):
    megacore = {'chip_config_name': 'megacore'} if self.generation.torus_dims == 3 else {}
    topology = _topology(f'a TPU {self.topology_name()} slice',
                         "libtpu: pip install -e '.[tpu]'", platform='tpu',
                         topology_name=self.topology_name(),
                         chips_per_host_bounds=self.chips_per_host(), **megacore)
    return topology.devices


def get(name):
  """The target called `name`: a GpuTarget or a TpuTarget."""
  gpus = re.fullmatch(r'(?:([1-9]\d*)x)?(' + '|'.join(GPUS) + ')', name)
  if gpus:
    return dataclasses.replace(GPUS[gpus.group(2)], count=int(gpus.group(1) or 1))
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
  if match is None:
    raise ValueError(f'Unknown target {name!r}: expected a GPU ({", ".join(sorted(GPUS))}), '
                     'a host of N of them (8xh100) or a TPU slice as gcloud names it (v4-8, '
                     'v5p-32, v5e-16, v5litepod-16, v6e-8).')
  generation = TPUS[match.group(1)]
  count = int(match.group(2))
  chips, rest = divmod(count, generation.cores_per_chip_in_name)
  if rest:
    raise ValueError(f'No TPU slice {name!r}: its number counts TensorCores, '
                     f'{generation.cores_per_chip_in_name} per chip.')
  try:
    return TpuTarget(generation, torus_shape(chips, generation.torus_dims))
  except ValueError as error:
    raise ValueError(f'No TPU slice {name!r}: {error}') from error


def _topology(what, needs, **kwargs):
  # Only compiling: JAX runs on the CPU, so no plugin looks for a device to open (without
  # one the CUDA plugin would fail to start and not register). Too late once JAX has
  # started. libtpu takes a lock on /tmp/libtpu_lockfile per process unless allowed more.
  jax.config.update('jax_platforms', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    return topologies.get_topology_desc(**kwargs)
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(f'Compiling for {what} without one needs {needs} (no device '
                       f'needed). It said: {error}') from error

