#!/usr/bin/env bash
# The PyTorch side of issue 5 on a GPU host, in one go (bench/INTEROP.md, "On the GPU host").
#
#   bash bench/torch/run_gpu.sh                      # on the H200 host, results under $OUT
#   COMET_BENCH=.gpu-x/comet-bench bash bench/torch/run_gpu.sh   # + comet-bench check vs torch
#
# Steps (each logged to $OUT/torch-run.log; a failing step does not stop the others, the exit
# code is 1 if any failed):
#   1. interop: gen a Mixtral-shaped input dir (IO_TOKENS tokens per rank, world NPROC), the
#      f32 reference on the GPU, the bf16 reference compared against it, and (if COMET_BENCH
#      is set) `comet-bench check` compared against the f32 reference;
#   2. the PyTorch EP layer: for the four presets, torchrun bench --backward (with --check;
#      DeepSeek-V3 is checked separately with 32 experts, its full f32 check does not fit).
#
# Knobs (environment): PY, OUT, NPROC (2), TOKENS (8192), IO_TOKENS (256), DEVICE (cuda; cpu
# runs the same steps with gloo, for a dry run), OVERRIDE (extra shape flags appended to every
# command, e.g. "--hidden 64 --ffn 32" for a CPU dry run), PRESETS, ITERS (20), STEPS
# ("interop bench": either or both).
set -u
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$HERE/../torch_reference.py"
PY="${PY:-/opt/torch/.venv/bin/python3}"
OUT="${OUT:-$PWD/torch-out}"
NPROC="${NPROC:-2}"
TOKENS="${TOKENS:-8192}"
IO_TOKENS="${IO_TOKENS:-256}"
DEVICE="${DEVICE:-cuda}"
OVERRIDE="${OVERRIDE:-}"
PRESETS="${PRESETS:-mixtral qwen2-moe phi3.5-moe deepseek-v3}"
ITERS="${ITERS:-20}"
STEPS="${STEPS:-interop bench}"
IO="${IO:-${TMPDIR:-/tmp}/comet-interop}"

mkdir -p "$OUT"
LOG="$OUT/torch-run.log"
: >"$LOG"
FAILED=0

step() { # step NAME CMD...: run, tee to the log, remember failures
  local name="$1"
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then FAILED=1; fi
  return "$rc"
}

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
# shellcheck disable=SC2086 # OVERRIDE is a list of flags
{
  echo "host: $(hostname)  date: $(date -u +%FT%TZ)  nproc: $NPROC  device: $DEVICE"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
  command -v nvidia-smi >/dev/null && nvidia-smi -L
} 2>&1 | tee -a "$LOG"

# 1. interop
rm -rf "$IO"
# shellcheck disable=SC2086
if [[ " $STEPS " == *" interop "* ]] && step gen "$PY" "$SCRIPT" gen --out "$IO/in" --preset mixtral --tokens "$IO_TOKENS" --world "$NPROC" \
  --seed 5 --zero-tokens 2 --device "$DEVICE" $OVERRIDE; then
  step ref-f32 "$PY" "$SCRIPT" ref --inputs "$IO/in" --out "$IO/torch-f32" --device "$DEVICE" --dtype f32
  step ref-bf16 "$PY" "$SCRIPT" ref --inputs "$IO/in" --out "$IO/torch-bf16" --device "$DEVICE" --dtype bf16
  step compare-torch-bf16 "$PY" "$SCRIPT" compare --a "$IO/torch-bf16" --b "$IO/torch-f32" \
    --json "$OUT/interop-torch-bf16-vs-f32.json"
  if [ -n "${COMET_BENCH:-}" ]; then
    step comet-check "$COMET_BENCH" check --inputs "$IO/in" --out "$IO/rust"
    step compare-rust "$PY" "$SCRIPT" compare --a "$IO/rust" --b "$IO/torch-f32" \
      --json "$OUT/interop-rust-vs-torch.json"
  fi
fi

# 2. the PyTorch expert-parallel layer
[[ " $STEPS " == *" bench "* ]] || PRESETS=""
for P in $PRESETS; do
  J="$OUT/torch-$P-w$NPROC-m$TOKENS.json"
  # shellcheck disable=SC2086
  if [ "$P" = "deepseek-v3" ] || [ "$P" = "dsv3" ]; then
    step "check-$P" "${TORCHRUN[@]}" "$SCRIPT" bench --device "$DEVICE" --preset "$P" --check-only \
      --experts 32 --json "$OUT/torch-$P-check-e32.json" $OVERRIDE
    step "bench-$P" "${TORCHRUN[@]}" "$SCRIPT" bench --device "$DEVICE" --preset "$P" --tokens "$TOKENS" \
      --backward --iters "$ITERS" --json "$J" $OVERRIDE
  else
    step "bench-$P" "${TORCHRUN[@]}" "$SCRIPT" bench --device "$DEVICE" --preset "$P" --tokens "$TOKENS" \
      --backward --check --iters "$ITERS" --json "$J" $OVERRIDE
  fi
done

rm -rf "$IO"
echo "torch run: $([ $FAILED -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED), results in $OUT" | tee -a "$LOG"
exit $FAILED
