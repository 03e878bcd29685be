#!/usr/bin/env bash
# Final GPU check of comet-rs on a host with 2 GPUs, in one go, from the repository root, with
# the bundle of `cargo xtask gpu-bundle` in .gpu (BUNDLE=dir for another) and its kernel cache
# warmed on the build machine (see "Warming" below).
#
# Runs every GPU test binary of comet-kernels, comet-comm and comet-layer with
# --include-ignored --test-threads=1, each through the bundle's run.sh (its environment:
# NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1, the newer NCCL
# of the Python wheel first on LD_LIBRARY_PATH, COMET_CACHE_DIR=<bundle>/cache), most
# important first, each under a time limit capped by what is left of LIMIT seconds (default
# 480) for the whole. Left out: compute-sanitizer runs, the tests that only fill the kernel
# cache (warm_*), and comet-kernels' nvrtc_compile binary (NVRTC only; run on the build
# machine). If less than FORWARD_FULL_S seconds (default 80) are left when gpu_forward starts,
# its two largest presets (DeepSeek-V3, Mixtral) are skipped, and the summary says so.
#
# STEPS="kernels-lib kernels-gpu_gemm ..." runs only the named steps (the kernels steps need
# one GPU; comm-gpu and layer-gpu need two).
#
# Writes to $OUT (default ./out-final), 3 files: summary.txt (the table, one line per step as
# it finishes, also printed last),
# cache.txt (cubins in the cache before/after: new ones were compiled here, i.e. cache misses),
# logs.tar.gz (every step's test log, run.sh output and environment report).
#
# Warming (build machine, after `cargo xtask gpu-bundle`; the cache key holds the NVRTC
# version and the -I paths, so the toolkit must be found at /usr/local/cuda with CUDA_HOME and
# CUDA_PATH unset, as on the H200 hosts):
#   W="env -u CUDA_HOME -u CUDA_PATH LD_LIBRARY_PATH=/usr/local/cuda/lib COMET_CACHE_DIR=$PWD/.gpu/cache"
#   $W cargo test --release -p comet-layer --lib -- --ignored --exact gemm::tests::warm_the_kernel_cache
#   $W cargo test --release -p comet-comm --lib -- --ignored --exact sources::tests::warm_the_kernel_cache
#   $W cargo test --release -p comet-kernels --test nvrtc_compile -- --ignored --exact warm_cache
#   tar czf .gpu/cache.tar.gz -C .gpu/cache . && rm -r .gpu/cache     (38 MiB of cubins -> ~10)
# This script hands run.sh CUDA_HOME=/usr/local/cuda when that toolkit exists (which gives the
# same -I paths as an unset CUDA_HOME); run.sh would otherwise export the root of an `nvcc`
# on PATH (e.g. /usr/local/cuda-13.0), whose -I paths make other keys: every kernel would be
# compiled again here.
set -u

ROOT="$(pwd)"
G="$(cd "$ROOT/${BUNDLE:-.gpu}" 2>/dev/null && pwd)" || {
    echo "gpu-final.sh: no bundle at $ROOT/${BUNDLE:-.gpu}" >&2
    exit 2
}
OUT="${OUT:-$ROOT/out-final}"
LIMIT="${LIMIT:-480}"
FORWARD_FULL_S="${FORWARD_FULL_S:-80}"
mkdir -p "$OUT"
W="$(mktemp -d "${TMPDIR:-/tmp}/comet-final.XXXXXX")"
# Written as the steps finish, so a run cut short still leaves its table.
SUMMARY="$OUT/summary.txt"
CACHE="${COMET_CACHE_DIR:-$G/cache}"
export COMET_CACHE_DIR="$CACHE"
mkdir -p "$CACHE"
# The warmed cache may travel packed (cubins shrink about 4x): unpack it first.
if [[ -f "$G/cache.tar.gz" ]]; then
    tar xzf "$G/cache.tar.gz" -C "$CACHE" || echo "gpu-final.sh: could not unpack $G/cache.tar.gz" >&2
fi

CUDA_ENV=()
if [[ -f /usr/local/cuda/include/cuda_bf16.h ]]; then
    CUDA_ENV=(CUDA_HOME=/usr/local/cuda CUDA_PATH=/usr/local/cuda)
fi

ls "$CACHE" 2>/dev/null | sort >"$W/cache-before.txt"
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname 2>/dev/null || echo ?)"
    grep -E '"(commit|dirty)"' "$G/MANIFEST.json" 2>/dev/null | tr -d ' ,' | sed 's/^/bundle /'
    echo "limit ${LIMIT}s; ${CUDA_ENV[*]:-CUDA_HOME as the host has it}; COMET_CACHE_DIR=$CACHE ($(wc -l <"$W/cache-before.txt") cubins)"
    printf '%-8s %-34s %6s  %s\n' status step seconds "tests / note"
} >"$SUMMARY"

FAILED=0
# step NAME BINARY BUDGET_S [TEST ARGS...]: the binary through run.sh with a limit of
# min(BUDGET, what is left - 15 s); one line in the summary.
step() {
    local name="$1" bin="$2" budget="$3"
    shift 3
    # STEPS="name ...": only those steps (e.g. the one-GPU ones when no 2-GPU host is lent).
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    local left=$((LIMIT - SECONDS - 15))
    ((budget > left)) && budget=$left
    local status note secs rc log t0=$SECONDS
    if [[ ! -x "$G/tests/$bin" ]]; then
        status=MISSING note="$bin is not in the bundle"
    elif ((budget < 5)); then
        status=SKIPPED note="no time left"
    else
        timeout --kill-after=5 $((budget + 20)) env "${CUDA_ENV[@]}" bash "$G/run.sh" test \
            --only "$bin" --out "$W/$name" --no-pack --step-timeout "$budget" "$@" \
            >"$W/$name.run.log" 2>&1 </dev/null
        rc=$?
        log="$W/$name/logs/test-$bin.log"
        # The binary's own summary is its last "test result:" line (a failing worker's output,
        # quoted in a panic message, holds others).
        note="$(grep '^test result:' "$log" 2>/dev/null | tail -n 1 | awk '{ for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p = $i; if ($(i+1) ~ /^failed/) f = $i; if ($(i+1) ~ /^filtered/) s = $i } n++ }
                     END { if (n) printf "%d passed, %d failed, %d filtered out", p, f, s; else printf "no test summary" }')"
        if ((rc == 0)); then
            status=ok
        elif grep -q '^TIMEOUT' "$W/$name/summary.txt" 2>/dev/null || ((rc == 124 || rc == 137)); then
            status=TIMEOUT note="$note; over ${budget}s"
        else
            status=FAILED note="$note; exit $rc"
        fi
        (($#)) && note="$note; args: $*"
    fi
    secs=$((SECONDS - t0))
    [[ "$status" == ok ]] || FAILED=1
    printf '%-8s %-34s %6s  %s\n' "$status" "$name" "$secs" "$note" | tee -a "$SUMMARY"
    if [[ "$status" != ok && -n "${log:-}" && -f "$log" ]]; then
        grep -E '^test .* FAILED|panicked at|^---- ' "$log" | head -n 12 | sed 's/^/           /' >>"$SUMMARY"
    fi
    return 0
}

# Most important first: the paths the clean-up touched, then the rest.
step comm-gpu comet-comm.test.gpu 60
step layer-gpu comet-layer.test.gpu 200
step kernels-gpu_gemm comet-kernels.test.gpu_gemm 40
if ((LIMIT - SECONDS - 15 >= FORWARD_FULL_S)); then
    step kernels-gpu_forward comet-kernels.test.gpu_forward 75
else
    step kernels-gpu_forward comet-kernels.test.gpu_forward 75 \
        --skip preset_deepseek_v3 --skip preset_mixtral
fi
step kernels-lib comet-kernels.lib.comet_kernels 240
step kernels-gpu_kernels comet-kernels.test.gpu_kernels 15
step comm-lib comet-comm.lib.comet_comm 15 --skip warm_the_kernel_cache
step layer-lib comet-layer.lib.comet_layer 20 --skip warm_the_kernel_cache
step layer-nvrtc comet-layer.test.nvrtc 10

ls "$CACHE" 2>/dev/null | sort >"$W/cache-after.txt"
{
    echo "cubins in $CACHE: $(wc -l <"$W/cache-before.txt") before, $(wc -l <"$W/cache-after.txt") after"
    echo "compiled on this host (not found in the warmed cache):"
    comm -13 "$W/cache-before.txt" "$W/cache-after.txt"
} >"$OUT/cache.txt"
new=$(comm -13 "$W/cache-before.txt" "$W/cache-after.txt" | wc -l)
{
    echo "total ${SECONDS}s; cache: $new cubin(s) compiled here (cache.txt)"
    if ((FAILED)); then echo "== SOME STEPS FAILED"; else echo "== ALL STEPS OK"; fi
} >>"$SUMMARY"
tar czf "$OUT/logs.tar.gz" -C "$W" . 2>/dev/null
rm -rf "$W"
echo
cat "$OUT/summary.txt"
exit "$FAILED"
