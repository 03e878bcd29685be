#!/usr/bin/env bash
# Runs the comet-kernels GPU bundle on a GPU host: all GPU tests (include-ignored), memcheck
# and racecheck on the small tests (on the second GPU when there is one, alongside), then the
# GEMM benchmark alone. Writes to OUTDIR (default ./out): tests.log, sanitizer.log, bench.log,
# gemm-bench.json, summary.txt.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export COMET_CACHE_DIR="$here/cache"
export RUST_BACKTRACE=1
sum="$out/summary.txt"
: > "$sum"
log() { echo "$*" | tee -a "$sum"; }
log "commit $(cat "$here/COMMIT" | tr '\n' ' ') date $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$sum"
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
san_dev=0; [ "$ngpu" -ge 2 ] && san_dev=1
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
T_TESTS=${T_TESTS:-160}
T_BENCH=${T_BENCH:-90}

start=$SECONDS
# Phase 1: the three GPU test binaries in parallel (each --test-threads=1) on GPU 0, and the
# sanitizers on the small tests on GPU 1 (GPU 0 with one GPU).
: > "$out/tests.log"
pids=()
for t in "$here"/bin/test-*; do
  n=$(basename "$t")
  # The lib's sm90 module (the Hopper engine) has its own bundle and runs.
  ( timeout "$T_TESTS" "$t" --include-ignored --test-threads=1 --nocapture --skip sm90:: > "$out/$n.tmp" 2>&1; echo "rc=$?" >> "$out/$n.tmp" ) &
  pids+=($!)
done
# The sanitizer block as a whole is bounded by T_TESTS too (killed at the deadline).
san_end=$((SECONDS + T_TESTS))
san() { local left=$((san_end - SECONDS)); [ "$left" -gt 5 ] || { echo "(skipped: no time left)"; return; }; timeout "$left" "$sanitizer" "$@"; echo "rc=$?"; }
(
  export CUDA_VISIBLE_DEVICES=$san_dev
  {
    echo "== memcheck canary (a deliberate out-of-bounds write: must be reported)"
    san --tool memcheck --error-exitcode 9 "$here/bin/sanitizer_canary"
    echo "== memcheck test-gpu_kernels (all)"
    san --tool memcheck --leak-check no --error-exitcode 9 "$here/bin/test-gpu_kernels" --include-ignored --test-threads=1
    echo "== memcheck test-gpu_gemm small/edge tests"
    san --tool memcheck --error-exitcode 9 "$here/bin/test-gpu_gemm" --include-ignored --test-threads=1 small_layouts tile_list bad_device_offsets single_group_without
    echo "== racecheck test-gpu_gemm small_layouts"
    san --tool racecheck --error-exitcode 9 "$here/bin/test-gpu_gemm" --include-ignored --test-threads=1 small_layouts
    echo "== memcheck test-gpu_forward repeated_calls"
    san --tool memcheck --error-exitcode 9 "$here/bin/test-gpu_forward" --include-ignored --test-threads=1 repeated_calls
  } > "$out/sanitizer.log" 2>&1
) &
san_pid=$!
for p in "${pids[@]}"; do wait "$p"; done
for t in "$here"/bin/test-*; do
  n=$(basename "$t")
  { echo "===== $n"; cat "$out/$n.tmp"; } >> "$out/tests.log"
  log "$n: $(grep -E '^test result' "$out/$n.tmp" | tail -1) $(tail -1 "$out/$n.tmp")"
  rm -f "$out/$n.tmp"
done
log "tests done at $((SECONDS - start)) s"
wait "$san_pid"
log "sanitizers: $(grep -E '^(rc=|== |=========  *(ERROR SUMMARY|RACECHECK SUMMARY))' "$out/sanitizer.log" | tr '\n' ' ')"
log "sanitizers done at $((SECONDS - start)) s"

# Phase 2: the benchmark, alone on GPU 0.
CUDA_VISIBLE_DEVICES=0 timeout "$T_BENCH" "$here/bin/gemm_bench" --out "$out/gemm-bench.json" \
  --commit "$(head -1 "$here/COMMIT")" --date "$(date -u +%FT%TZ)" > "$out/bench.log" 2>&1
log "bench rc=$? at $((SECONDS - start)) s"
tail -30 "$out/bench.log" | tee -a "$sum"
