#!/usr/bin/env bash
# The README's throughput table in one command: each of its rows (secant_jax.bench.throughput)
# once with XLA's default GEMMs and once with --xla_gpu_enable_triton_gemm=false (cuBLASLt,
# which fuses bias and GELU into its GEMMs' epilogues), each in its own process; with
# QKV="fused split" also each with q, k and v as three products (--split-qkv); with
# GEMMS=fusion-v2 (ROWS=sample only: train steps compile for too long) with Triton GEMMs
# that take in LayerNorm, modulation and GELU (--xla_gpu_experimental_gemm_fusion_v2).
#
#   launch/throughput_table.sh runs/throughput
#
# writes runs/throughput/<row>-<gemms>-<qkv>.txt (each run's whole output) and
# runs/throughput/table.md (img/s, step time, MFU, peak memory, the compiled program's
# static bytes and memory and its compile seconds, per row, GEMM and qkv setting; with
# EXTRA="--target h100" on a machine without a GPU, only the last three: the README's
# second table).
# A run that fails is a row that says so and points at its output; the others go on.
# Settings (environment): MODEL (SiT-XL/2), ATTENTION (cudnn), ROWS (sdei stee sample
# remat accumulate: STEE at batch 256 with --remat, or over 4 microbatches), GEMMS (triton
# cublas), QKV (fused; "fused split" for both), EXTRA (more benchmark flags, appended, so
# they override: "--profile 3", "--target h100", or "--batch 2 --steps 1" to try the script
# on a CPU), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: launch/throughput_table.sh OUT_DIR}
python=${PYTHON:-python3}
mkdir -p "$out"

row_flags() {
  case $1 in
    sdei) echo --variant sdei --batch 64 ;;
    stee) echo --variant stee --batch 64 ;;
    sample) echo --sample --variant sdei --num-steps 4 --batch 256 ;;
    remat) echo --variant stee --batch 256 --remat --steps 5 ;;
    accumulate) echo --variant stee --batch 256 --microbatches 4 --steps 5 ;;
    *) echo "unknown row '$1' in ROWS; expected any of: sdei stee sample remat accumulate" >&2
       return 1 ;;
  esac
}
gemm_flags() {
  case $1 in
    triton) echo "" ;;
    cublas) echo --xla_gpu_enable_triton_gemm=false ;;
    fusion-v2) echo --xla_gpu_experimental_gemm_fusion_v2=true ;;
    *) echo "unknown setting '$1' in GEMMS; expected any of: triton cublas fusion-v2" >&2
       return 1 ;;
  esac
}
qkv_flags() {
  case $1 in
    fused) echo "" ;;
    split) echo --split-qkv ;;
    *) echo "unknown setting '$1' in QKV; expected fused and/or split" >&2; return 1 ;;
  esac
}
field() { awk -v key="$1" -F': *' '$1 ~ "^ *" key "$" {print $2}' "$2"; }

rows=${ROWS:-sdei stee sample remat accumulate}
gemm_settings=${GEMMS:-triton cublas}
qkv_settings=${QKV:-fused}
# Every setting is checked before the first run, so a typo costs no benchmark time.
for row in $rows; do row_flags "$row" > /dev/null; done
for gemms in $gemm_settings; do gemm_flags "$gemms" > /dev/null; done
for qkv in $qkv_settings; do qkv_flags "$qkv" > /dev/null; done

table=$out/table.md
{
  echo "| run | GEMMs | qkv | img/s | step ms | MFU | peak memory GiB | bytes moved GB" \
    "| compiled memory GiB | compile s | command |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
} > "$table"
for row in $rows; do
  flags="--model ${MODEL:-SiT-XL/2} $(row_flags "$row") --attention ${ATTENTION:-cudnn}"
  for gemms in $gemm_settings; do
    xla=$(gemm_flags "$gemms")
    xla=$(echo ${XLA_FLAGS:-} $xla)  # the caller's XLA flags and this setting's, if any
    xla_env=(-u XLA_FLAGS)
    [ -n "$xla" ] && xla_env=(XLA_FLAGS="$xla")
    for qkv in $qkv_settings; do
      qkv_flag=$(qkv_flags "$qkv")
      run_flags=$(echo $flags $qkv_flag ${EXTRA:-})
      log=$out/$row-$gemms-$qkv.txt
      echo "== $row, $gemms GEMMs, $qkv qkv"
      # shellcheck disable=SC2086
      if env "${xla_env[@]}" "$python" -m secant_jax.bench.throughput $run_flags \
          > "$log" 2>&1; then
        cells=""
        for key in images_per_second step_ms mfu peak_memory_gib static_memory_gb \
            compiled_memory_gib compile_s; do
          cells+=" $(field "$key" "$log") |"
        done
        echo "| $row | $gemms | $qkv |$cells" \
          "\`${xla:+XLA_FLAGS=\"$xla\" }python -m secant_jax.bench.throughput $run_flags\` |" \
          >> "$table"
      else
        echo "| $row | $gemms | $qkv | failed: see $log | | | | | | | |" >> "$table"
        tail -3 "$log" >&2
      fi
    done
  done
done
cat "$table"
