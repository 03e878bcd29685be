#!/bin/bash
# Runs on the GPU host from the repository root: bash .gpu-comm/run.sh (logs under $OUT).
set -u
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
B=.gpu-comm
OUT=${OUT:-/tmp/comet-comm-out}
mkdir -p "$OUT"
# NCCL 2.28.9 from the Python site-packages, through a libnccl.so symlink (cudarc's name).
NCCL_LIB=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib 2>/dev/null | head -1)
if [ -n "$NCCL_LIB" ]; then
  mkdir -p /tmp/nccl228 && ln -sf "$NCCL_LIB/libnccl.so.2" /tmp/nccl228/libnccl.so
  export LD_LIBRARY_PATH=/tmp/nccl228:${LD_LIBRARY_PATH:-}
fi
export PATH=/usr/local/cuda/bin:$PATH
{
  echo "commit @COMMIT@"; date -u; nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,memory.used --format=csv
  nvidia-smi topo -m; echo "NCCL_LIB=$NCCL_LIB"
} > "$OUT/summary.txt" 2>&1
step() { # log name timeout cmd... (at most 8 files come back: logs are shared)
  local log=$1 name=$2 t=$3; shift 3
  local t0=$(date +%s%N)
  echo "######## $name" >> "$OUT/$log.log"
  timeout --kill-after=5 "$t" "$@" >> "$OUT/$log.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "$name rc=$rc ${ms}ms (limit ${t}s)" | tee -a "$OUT/summary.txt"
}
T="--include-ignored --test-threads=1 --nocapture"
step tests gpu_threads 60 $B/gpu_tests $T threads_collectives threads_peer_rw threads_signal_stress threads_a2av_vs_nccl threads_timeout local_
step tests gpu_procs 75 $B/gpu_tests $T procs_collectives procs_peer_rw procs_signal_stress procs_a2av_vs_nccl procs_timeout
step bench bench 25 $B/p2p_bench --commit @COMMIT@ --out "$OUT/p2p_bench.json"
step tests unit 10 $B/unit_tests --include-ignored --test-threads=4
COMET_COMM_TEST_ITERS=4 step sanitizer memcheck 45 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 $B/gpu_tests $T --exact threads_peer_rw threads_a2av_vs_nccl
COMET_COMM_TEST_ITERS=4 step sanitizer racecheck 25 compute-sanitizer --tool racecheck --print-limit 20 $B/gpu_tests $T --exact threads_a2av_vs_nccl
for f in tests sanitizer; do
  echo "== $f"; grep -hE "^test |test result|panicked|ERROR SUMMARY|done in|rank [01]:" "$OUT/$f.log" | head -30
done
tail -25 "$OUT/bench.log"
cat "$OUT/summary.txt"
