#!/usr/bin/env bash
# One GPU node, one process driving all its GPUs (the mesh spans them; no distributed
# setup needed):
#
#   launch/gpu_local.sh --config=configs/imagenet_sit.py:variant=stee,steps=4 --workdir=runs/stee4 \
#       --config.model.split_qkv=True --config.model.attention=cudnn
#
# CUDA_VISIBLE_DEVICES picks the GPUs; launch/gpu_env.sh sets XLA's memory share and flags.
# SIGTERM (kill, a scheduler's preemption) or Ctrl-C saves a checkpoint (an evaluation: its
# progress) and exits with status 75; the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/gpu_env.sh
exec python -m secant_jax.main "$@"
