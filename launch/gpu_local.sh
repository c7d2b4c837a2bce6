#!/usr/bin/env bash
# One GPU node, one process driving all its GPUs (the mesh spans them; no distributed
# setup needed):
#
#   launch/gpu_local.sh --config=configs/imagenet_sit.py:variant=stee,steps=4 --workdir=runs/stee4
#
# CUDA_VISIBLE_DEVICES picks the GPUs. XLA may take 95% of each GPU's memory up front;
# the latency-hiding scheduler overlaps the data-parallel all-reduce with compute.
# SIGTERM (kill, a scheduler's preemption) saves a checkpoint; the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec python -m secant_jax.main "$@"
