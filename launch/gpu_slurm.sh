#!/usr/bin/env bash
# Multi-node GPUs under Slurm: one process per node, each driving its node's GPUs.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh --config=configs/imagenet_sit.py:variant=sdei,steps=8 \
#       --workdir=/shared/runs/sdei8 --config.model.split_qkv=True --config.model.attention=cudnn
#
# jax.distributed.initialize() (--config.distributed=True) reads the coordinator, process
# count and rank from Slurm's environment. The workdir must be on a file system all nodes
# see. Slurm sends SIGTERM before the time limit (--signal below) or on preemption; the
# trainer saves a checkpoint (evaluate and compare mode their progress) and exits with
# status 75, on which this script queues the job
# again (`--requeue` alone covers node failure and preemption, not the time limit), and
# the requeued job resumes from that checkpoint (with --config.compilation_cache_dir on the
# shared file system it also reads back the programs compiled before, instead of compiling
# them again). A finished run exits 0 and is not requeued.
#SBATCH --job-name=secant-jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=secant-%j.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source launch/gpu_env.sh
status=0
srun --kill-on-bad-exit=1 python -m secant_jax.main "$@" --config.distributed=True || status=$?
if [ "$status" -eq 75 ]; then
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$status"
