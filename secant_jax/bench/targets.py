"""GPUs a program can be compiled for on a machine without one (deviceless AOT).

JAX's CUDA plugin compiles for a GPU described by a target config: the same XLA passes,
fusions and kernel choices as on the device, except that GEMM autotuning falls back to
XLA's default configurations. The compiled HLO then shows, on a CPU machine, which kernels
the step launches and how many bytes they move (`bench.traffic`); nothing can be run.
Needs `pip install -e '.[cuda]'` (the plugin), no GPU. The figures are those read off the
lent machines (SMs, L2, memory) and the datasheets (clock, bandwidth).
"""

import dataclasses

import jax
from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  device_kind: str  # as jax reports it on the device
  memory_bytes: int
  l2_bytes: int
  bandwidth: float  # bytes/s

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


TARGETS = {
    'h100': GpuTarget('NVIDIA H100 80GB HBM3', 81559 * 2 ** 20, 50 * 2 ** 20, 3.35e12),
    'h200': GpuTarget('NVIDIA H200', 143771 * 2 ** 20, 60 * 2 ** 20, 4.8e12),
}


def devices(name):
  """One abstract device of the named target, to build a mesh from and compile for; its
  device_kind is the target's."""
  if name not in TARGETS:
    raise ValueError(f'Unknown target {name!r}: expected one of {sorted(TARGETS)}.')
  # Only compiling: JAX runs on the CPU, so the plugin does not look for a GPU to open
  # (without one it would fail to start and not register). Too late once JAX has started.
  jax.config.update('jax_platforms', 'cpu')
  try:
    topology = topologies.get_topology_desc(platform='cuda',
                                            target_config=TARGETS[name].target_config(),
                                            topology='1x1x1')
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(
        f'Compiling for {name} without a GPU needs JAX\'s CUDA plugin: pip install -e '
        f"'.[cuda]' (no GPU needed). The plugin said: {error}") from error
  return topology.devices
