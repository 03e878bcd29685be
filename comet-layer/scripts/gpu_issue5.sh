#!/usr/bin/env bash
# Issue 5 on a GPU host with 2 GPUs, in one go, from the repository root with the bundle of
# `cargo xtask gpu-bundle` in .gpu (BUNDLE=dir to use another):
#   1. tests:  comet-layer's GPU tests (1 and 2 GPUs, threads and processes; y, dx, dW0, dW1,
#              dWr against comet-core's EP reference), its NVRTC/plan tests, and comet-bench's
#              CLI tests (a tiny `comet-bench run` on one GPU);
#   2. check:  bench/torch_reference.py gen (Mixtral shape, IO_TOKENS tokens per rank, 2 ranks)
#              -> ref f32 on the GPU -> comet-bench check -> compare (bench/INTEROP.md);
#   3. bench:  xtask bench --gpus 2 --backward (comet-bench run per rank with the torchrun
#              environment: four presets, TOKENS per rank, sequential and pipelined, forward
#              and forward + backward) -> table, results JSON + SVG;
#   4. torch:  torch.distributed.run bench/torch_reference.py bench --backward per preset, then
#              one combined table (comet-rs strategies beside PyTorch).
# Every step has a time limit (the whole run stays under LIMIT seconds, default 515) and a
# failing step does not stop the next. Writes at most 7 files to $OUT: summary.txt, tests.log,
# check.log, bench.log, torch.log, env.txt, results.tar.gz (results JSON/SVG, rank reports and
# logs, interop comparison JSON).
set -u
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

ROOT="$(pwd)"
G="$ROOT/${BUNDLE:-.gpu}"
OUT="${OUT:-$ROOT/out-issue5}"
PY="${PY:-/opt/torch/.venv/bin/python3}"
LIMIT="${LIMIT:-515}"
TOKENS="${TOKENS:-8192}"
IO_TOKENS="${IO_TOKENS:-256}"
PRESETS="${PRESETS:-mixtral-8x7b qwen2-moe-2.7b phi-3.5-moe deepseek-v3}"
mkdir -p "$OUT"
W="$(mktemp -d "${TMPDIR:-/tmp}/comet-issue5.XXXXXX")"
RES="$W/results"
mkdir -p "$RES"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

export COMET_CACHE_DIR="${COMET_CACHE_DIR:-$G/cache}"
export COMET_BENCH_BIN="$G/bin/comet-bench"
mkdir -p "$COMET_CACHE_DIR"
# CUDA_HOME stays as the host has it (unset on the H200 hosts): NVRTC then finds
# /usr/local/cuda/include by itself, the include path the bundle's warmed cubin cache
# (.gpu/cache, comet-layer's warm_the_kernel_cache) was keyed with.
# The newer NCCL of the Python wheel (cudarc opens libnccl.so): a symlink directory first.
for d in /opt/torch/.venv/lib/python3*/site-packages; do
    lib="$d/nvidia/nccl/lib/libnccl.so.2"
    if [[ -f "$lib" ]]; then
        mkdir -p "$W/nccl" && ln -sf "$lib" "$W/nccl/libnccl.so" && ln -sf "$lib" "$W/nccl/libnccl.so.2"
        export LD_LIBRARY_PATH="$W/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        break
    fi
done
COMET_GIT_COMMIT="$(sed -n 's/.*"commit": *"\([0-9a-f]*\)".*/\1/p' "$G/MANIFEST.json" 2>/dev/null | head -n1)"
export COMET_GIT_COMMIT
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  bundle commit: ${COMET_GIT_COMMIT:-?}"
    echo "CUDA_HOME=${CUDA_HOME:-unset} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} COMET_CACHE_DIR=$COMET_CACHE_DIR"
    echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
    nvidia-smi -L 2>&1
    nvidia-smi topo -m 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} >"$OUT/env.txt"

# step NAME BUDGET_S LOG CMD...: run with a limit of min(BUDGET, what is left - 20 s), append
# the output to LOG, record the outcome in the summary.
step() {
    local name="$1" budget="$2" log="$3"
    shift 3
    local left=$((LIMIT - SECONDS - 20))
    ((budget > left)) && budget=$left
    if ((budget < 5)); then
        echo "SKIPPED  $name (no time left)" | tee -a "$SUMMARY"
        return 1
    fi
    local t0=$SECONDS
    echo "=== $name (limit ${budget}s): $*" >>"$log"
    timeout --kill-after=5 "$budget" "$@" >>"$log" 2>&1 </dev/null
    local rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status=TIMEOUT
    ((rc != 0 && rc != 124 && rc != 137)) && status=FAILED
    local note
    note="$(grep -E '^test result:' "$log" | tail -n1)"
    printf '%-8s %-40s %4ss rc=%s %s\n' "$status" "$name" "$((SECONDS - t0))" "$rc" "$note" | tee -a "$SUMMARY"
    echo "=== $name: rc=$rc after $((SECONDS - t0)) s" >>"$log"
    return "$rc"
}

# 1. tests
T="$OUT/tests.log"
step "comet-layer gpu tests" 230 "$T" "$G/tests/comet-layer.test.gpu" --include-ignored --test-threads=1
step "comet-layer lib (plans, NVRTC)" 40 "$T" "$G/tests/comet-layer.lib.comet_layer" --include-ignored --test-threads=1 --skip warm_the_kernel_cache
step "comet-layer nvrtc" 20 "$T" "$G/tests/comet-layer.test.nvrtc" --include-ignored
step "comet-bench cli (tiny GPU run)" 40 "$T" "$G/tests/comet-bench.test.gpu_cli" --include-ignored --test-threads=1
grep -E '^case |^test .* (ok|FAILED)|panicked|relative L2' "$T" | tail -n 80 >"$RES/tests-summary.txt"

# 2. check against PyTorch (Mixtral shape)
C="$OUT/check.log"
IO="$W/io"
if step "interop gen (mixtral, $IO_TOKENS tok/rank)" 60 "$C" "$PY" bench/torch_reference.py gen \
    --out "$IO/in" --preset mixtral --tokens "$IO_TOKENS" --world 2 --seed 5 --zero-tokens 2 --device cuda &&
    step "interop ref f32 (torch, cuda)" 60 "$C" "$PY" bench/torch_reference.py ref \
        --inputs "$IO/in" --out "$IO/torch-f32" --device cuda --dtype f32 &&
    step "comet-bench check" 90 "$C" "$G/bin/comet-bench" check --inputs "$IO/in" --out "$IO/rust"; then
    step "interop compare rust vs torch f32" 60 "$C" "$PY" bench/torch_reference.py compare \
        --a "$IO/rust" --b "$IO/torch-f32" --json "$RES/interop-rust-vs-torch-f32.json"
fi
rm -rf "$IO"

# 3. comet-rs benchmark through cargo xtask bench's GPU path
B="$OUT/bench.log"
step "xtask bench --gpus 2 --backward" 150 "$B" "$G/bin/xtask" bench --bin "$G/bin/comet-bench" \
    --gpus 2 --backward --tokens "$TOKENS" --out "$RES/comet" --scratch "$RES/ranks" --timeout-s 145

# 4. the PyTorch EP layer, then one table with both
P="$OUT/torch.log"
for p in $PRESETS; do
    step "torch bench $p" 60 "$P" "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
        bench/torch_reference.py bench --preset "$p" --tokens "$TOKENS" --backward --iters 20 \
        --json "$RES/torch-$p-m$TOKENS.json"
done
ranks=("$RES"/ranks/rank*.json)
torch=("$RES"/torch-*.json)
step "combined table" 30 "$B" "$G/bin/comet-bench" report --out "$RES/combined" \
    "${ranks[@]}" "${torch[@]}"

echo "total: $SECONDS s" | tee -a "$SUMMARY"
cp "$SUMMARY" "$RES/"
tar czf "$OUT/results.tar.gz" -C "$W" results 2>>"$SUMMARY"
rm -rf "$W"
grep -qE '^(FAILED|TIMEOUT|SKIPPED)' "$SUMMARY" && exit 1
exit 0
