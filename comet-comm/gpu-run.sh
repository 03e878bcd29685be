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
} > "$OUT/env.txt" 2>&1
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local t0=$(date +%s%N)
  timeout --kill-after=5 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "$name rc=$rc ${ms}ms (limit ${t}s)" | tee -a "$OUT/summary.txt"
}
step gpu_threads 75 $B/gpu_tests --include-ignored --test-threads=1 threads_ local_
step gpu_procs 90 $B/gpu_tests --include-ignored --test-threads=1 procs_
step bench 60 $B/p2p_bench --commit @COMMIT@ --out "$OUT/p2p_bench.json"
step unit 20 $B/unit_tests --include-ignored --test-threads=4
step memcheck 35 compute-sanitizer --tool memcheck --print-limit 20 $B/gpu_tests --include-ignored --test-threads=1 --exact threads_peer_rw threads_a2av_vs_nccl
grep -hE "^test |test result|panicked|failed|Error" "$OUT"/unit.log "$OUT"/gpu_threads.log "$OUT"/gpu_procs.log | grep -v " ok$" | head -60
tail -30 "$OUT/bench.log"
tail -8 "$OUT/memcheck.log"
cat "$OUT/summary.txt"
