#!/usr/bin/env bash
# The Fashion-MNIST table end to end on one machine (configs/fashion_mnist.py): a
# flow-matching teacher, SDEI and STEE secant models from it (the two in parallel), the
# FD-FMNIST classifier (in parallel with the teacher), then the comparison table.
#
#   launch/fashion_mnist.sh runs/fmnist
#
# writes runs/fmnist/{teacher,sdei,stee,features,table,references}: table/table.md is the
# table, references/ the teacher's reference solutions, which a later table of the same
# teacher reads instead of solving again. An interrupted stage resumes from its last
# checkpoint (the table: after its last saved batch), so the same command continues after
# a preemption; a finished training stage is restored and checked against its settings
# (more steps train it on, other settings are refused), and a teacher that trains on
# refuses the secant stages trained from its earlier weights. Settings (environment):
#   MODEL (SiT-S/2; unet for EDM's U-Net on the σ-path), STEPS (secant steps, 4),
#   DATA_DIR (the IDX files; Debian's default),
#   TEACHER_TRAIN_STEPS, SECANT_TRAIN_STEPS, NUM_SAMPLES (the config's unless set),
#   EPOCHS (classifier, 8), TEACHER_FLAGS / SECANT_FLAGS / COMPARE_FLAGS (more
#   --config.* flags for that stage), PYTHON (python3),
#   PARALLEL (1: two stages at a time as above, each process allowed 45% of a GPU's memory
#   unless XLA_CLIENT_MEM_FRACTION says otherwise, where JAX would take 75% each;
#   0: one stage at a time, as on a TPU VM, whose chips one process holds).
# Ctrl-C, SIGTERM to this script, or a stage that fails stop every stage still running as a
# preemption does (SIGTERM: a training stage saves a checkpoint and exits, the table its
# progress), and the script
# waits for them, so that none trains on unseen beside the next run of the same command.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?usage: launch/fashion_mnist.sh RUNS_DIR}
python=${PYTHON:-python3}
config=configs/fashion_mnist.py
args="model=${MODEL:-SiT-S/2},teacher=$runs/teacher"
common=()
[ -n "${DATA_DIR:-}" ] && common+=(--config.data.dir="$DATA_DIR")
optional() { [ -n "$2" ] && echo "--config.$1=$2"; return 0; }
parallel=${PARALLEL:-1}
source launch/memory_fraction.sh
[ "$parallel" = 1 ] && default_memory_fraction 0.45
# Each stage is a function that ends in exec, run as a background job that ignores SIGINT
# (a terminal's Ctrl-C reaches the whole process group), so that this script alone decides
# how the stages stop: on its exit, SIGTERM to those still running, then it waits for them.
stop_stages() {
  local running
  running=$(jobs -pr)
  [ -n "$running" ] || return 0
  # shellcheck disable=SC2086
  kill -TERM $running 2>/dev/null || true
  # shellcheck disable=SC2086
  wait $running 2>/dev/null || true
}
trap stop_stages EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
pids=()
launch() { (trap '' INT; "$@") & }
now() { launch "$@"; wait $!; }  # waited for where a trap can interrupt the wait
beside() {  # "$@" beside the next stage, or now with PARALLEL=0
  if [ "$parallel" = 1 ]; then launch "$@"; pids+=($!); else now "$@"; fi
}

latest_checkpoint() {  # stage name → its latest checkpoint's step, or nothing
  ls "$runs/$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true
}
train() {  # stage name, config argument tail, train steps, stage flags
  # shellcheck disable=SC2086
  exec "$python" -m secant_jax.main --config="$config:$2,$args" --workdir="$runs/$1" \
    "${common[@]}" $(optional num_train_steps "$3") $4
}
classifier() {
  exec "$python" -m secant_jax.evaluation.fmnist_features --out "$runs/features" \
    --epochs "${EPOCHS:-8}" ${DATA_DIR:+--data_dir "$DATA_DIR"}
}
table() {
  # shellcheck disable=SC2086
  exec "$python" -m secant_jax.main --config="$config:stage=compare,$args" \
    --workdir="$runs/table" "${common[@]}" --config.fid.fmnist="$runs/features" \
    --config.compare.secants="sdei=$runs/sdei,stee=$runs/stee" \
    --config.compare.references="$runs/references" \
    $(optional compare.num_samples "${NUM_SAMPLES:-}") ${COMPARE_FLAGS:-}
}

if [ ! -f "$runs/features/accuracy.json" ]; then
  rm -rf "$runs/features"
  beside classifier
fi
teacher_before=$(latest_checkpoint teacher)
now train teacher stage=teacher "${TEACHER_TRAIN_STEPS:-}" "${TEACHER_FLAGS:-}"
if [ "$(latest_checkpoint teacher)" != "$teacher_before" ]; then
  for variant in sdei stee; do
    if [ -d "$runs/$variant" ]; then
      echo "The teacher in $runs/teacher has trained further, and $runs/$variant was" \
        "trained from its earlier weights: delete it to train it from this teacher, or" \
        "use a new RUNS_DIR." >&2
      exit 1
    fi
  done
fi
for variant in sdei stee; do
  beside train "$variant" "stage=secant,variant=$variant,steps=${STEPS:-4}" \
    "${SECANT_TRAIN_STEPS:-}" "${SECANT_FLAGS:-}"
done
for pid in "${pids[@]}"; do wait "$pid"; done
now table
