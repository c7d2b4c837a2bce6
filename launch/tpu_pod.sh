#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice): create it, install this checkout on every host,
# run the same command on every host, delete it.
#
#   TPU_NAME=secant ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_pod.sh create
#   TPU_NAME=secant ZONE=us-central2-b launch/tpu_pod.sh setup
#   TPU_NAME=secant ZONE=us-central2-b launch/tpu_pod.sh run \
#       --config=configs/imagenet_sit.py:variant=sdei,steps=4 --workdir=gs://BUCKET/sdei4
#   TPU_NAME=secant ZONE=us-central2-b launch/tpu_pod.sh delete
#
# `run` adds --config.distributed=True, so every host calls jax.distributed.initialize()
# (TPU topology is detected), reads its own data shard and joins the global arrays. The
# workdir must be visible to all hosts (gs://...). The command runs under nohup and logs
# to ~/secant-run.log on every host; preemption sends SIGTERM, on which the trainer saves
# a checkpoint (evaluate and compare mode their progress), and rerunning the same `run`
# resumes from it; with --config.compilation_cache_dir=gs://BUCKET/jax-cache it also reads
# back the programs the first launch compiled instead of compiling them again. `encode` runs
# `python -m secant_jax.data.encode ARGS --distributed` the same way (log
# ~/secant-encode.log; `logs encode` follows it): images to latents on every host, each
# writing its share of the shards to the shared --out; rerun, it keeps finished shards.
#
#   TPU_NAME=secant ZONE=us-central2-b launch/tpu_pod.sh encode --images gs://BUCKET/train \
#       --vae gs://BUCKET/sd-vae-ft-ema --out gs://BUCKET/imagenet256-latents
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-secant-jax}
HERE="$(cd "$(dirname "$0")/.." && pwd)"
# JAX needs Python >= 3.11; the TPU runtimes are Ubuntu 22.04, whose python3 is 3.10, so
# where python3 is older the venv gets a Python 3.11 that uv downloads.
MAKE_VENV="{ python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' && python3 -m venv .venv; } || \
    { python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --seed --python 3.11 .venv; }"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}
start_on_all_hosts() {  # module, its flag for several hosts, log name, the module's arguments
  local module=$1 flag=$2 log=$3
  shift 3
  on_all_hosts "cd $REMOTE_DIR && . .venv/bin/activate && nohup python -m $module \
      $(printf '%q ' "$@") $flag > ~/secant-$log.log 2>&1 &"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
    ;;
  setup)
    # The source as it is on disk, local edits and new files included, without what git
    # ignores (runs/, ckpt/, data/, .venv/): run inputs go to a bucket, not to every host.
    git -C "$HERE" rev-parse --git-dir > /dev/null 2>&1 || {
      echo "setup copies the files git tracks or would track, but $HERE is not a git" \
           "checkout: clone the repository and run setup from the clone" >&2; exit 2; }
    staging=$(mktemp -d)  # one per setup, so that setups of two TPUs at once do not clash
    trap 'rm -rf "$staging"' EXIT
    git -C "$HERE" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -e "$HERE/$f" ]]; then printf '%s\0' "$f"; fi; done |
      tar -C "$HERE" --null -T - -czf "$staging/secant-jax.tgz"
    gcloud compute tpus tpu-vm scp "$staging/secant-jax.tgz" "$TPU_NAME":~/ --zone="$ZONE" \
        --worker=all
    # A file that an earlier setup copied and this one does not (deleted or renamed here) is
    # removed there, so that no stale module is imported; what a host wrote itself stays.
    on_all_hosts "mkdir -p $REMOTE_DIR && cd $REMOTE_DIR && \
        tar -tzf ~/secant-jax.tgz | LC_ALL=C sort > .setup-files.new && \
        { [ ! -f .setup-files ] || LC_ALL=C comm -23 .setup-files .setup-files.new | \
          tr '\\n' '\\0' | xargs -0 -r rm -f --; } && \
        mv .setup-files.new .setup-files && tar -xzf ~/secant-jax.tgz && \
        rm -rf .venv && $MAKE_VENV && . .venv/bin/activate && \
        pip install -q -U pip && pip install -q -c constraints.txt -e '.[tpu]'"
    ;;
  run)
    shift
    start_on_all_hosts secant_jax.main --config.distributed=True run "$@"
    ;;
  encode)
    shift
    start_on_all_hosts secant_jax.data.encode --distributed encode "$@"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 \
        --command="tail -n 50 -f ~/secant-${2:-run}.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 create|setup|run ARGS|encode ARGS|logs [encode]|delete" >&2
    exit 2
    ;;
esac
