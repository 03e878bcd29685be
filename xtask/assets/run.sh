#!/usr/bin/env bash
# comet-rs GPU bundle runner, written by `cargo xtask gpu-bundle` (source: xtask/assets/run.sh).
#
#   bash run.sh test     [--only SUBSTR] [FILTER]   every test binary, ignored GPU tests included
#   bash run.sh sanitize [--only SUBSTR] [FILTER]   GPU test binaries under compute-sanitizer
#                                                   memcheck, then racecheck
#   bash run.sh bench    [cargo xtask bench args]   the layer benchmark (all GPUs), then every
#                                                   benchmark example (examples/*)
#   bash run.sh all      [--only SUBSTR] [FILTER]   test, sanitize, bench
#   bash run.sh env                                 only print the environment report
#
# Options anywhere: --out DIR (default $OUT, else ./out/<time>), --pack / --no-pack (tar the
# logs into logs.tar.gz, leaving summary.txt and bench/ beside it; on by default when the
# output goes to $OUT, whose file count is limited), --step-timeout SECONDS (per step,
# default 300).
# Every step runs even after one fails; the exit status is non-zero if any failed, and a
# summary table is printed last (and written to summary.txt).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

cmd="${1:-}"
if [[ $# -gt 0 ]]; then shift; fi
case "$cmd" in
    test | sanitize | bench | all | env) ;;
    -h | --help | help | "") usage; exit 0 ;;
    *) echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac

OUTDIR=""
PACK=""
ONLY=""
STEP_TIMEOUT=300
REST=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUTDIR="${2:?--out needs a directory}"; shift 2 ;;
        --out=*) OUTDIR="${1#--out=}"; shift ;;
        --pack) PACK=1; shift ;;
        --no-pack) PACK=0; shift ;;
        --only) ONLY="${2:?--only needs a substring}"; shift 2 ;;
        --step-timeout) STEP_TIMEOUT="${2:?--step-timeout needs seconds}"; shift 2 ;;
        *) REST+=("$1"); shift ;;
    esac
done
if [[ -z "$OUTDIR" ]]; then
    if [[ -n "${OUT:-}" ]]; then
        OUTDIR="$OUT"
        PACK="${PACK:-1}"
    else
        OUTDIR="$HERE/out/$(date -u +%Y%m%dT%H%M%SZ)"
    fi
fi
PACK="${PACK:-0}"
mkdir -p "$OUTDIR/logs" || { echo "run.sh: cannot create $OUTDIR/logs" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOGS="$OUTDIR/logs"

# ---------------------------------------------------------------- environment (GPU-HOSTS.md)
# NVLink multicast must stay off on the shared hosts.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export COMET_CACHE_DIR="${COMET_CACHE_DIR:-$HERE/cache}"
# Tests that run the comet-bench binary find it here (the build machine's path is gone).
[[ -x "$HERE/bin/comet-bench" ]] && export COMET_BENCH_BIN="$HERE/bin/comet-bench"
mkdir -p "$COMET_CACHE_DIR" 2>/dev/null || true

# Python site-packages directories (for the NVIDIA wheels: NCCL, NVSHMEM, the toolkit).
site_dirs() {
    if command -v python3 >/dev/null 2>&1; then
        python3 - <<'PY' 2>/dev/null
import site, sys
dirs = list(getattr(site, "getsitepackages", lambda: [])())
try:
    dirs.append(site.getusersitepackages())
except Exception:
    pass
dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
print("\n".join(dict.fromkeys(dirs)))
PY
    fi
    local d
    # The H200 hosts keep torch and the NVIDIA wheels in /opt/torch/.venv (notes/device-probe.md).
    for d in /opt/*/.venv/lib/python3*/site-packages /opt/*/lib/python3*/site-packages \
        /usr/local/lib/python3*/dist-packages /usr/local/lib/python3*/site-packages \
        /usr/lib/python3/dist-packages /usr/lib/python3*/site-packages; do
        [[ -d "$d" ]] && echo "$d"
    done
}
mapfile -t SITE_DIRS < <(site_dirs | awk 'NF && !seen[$0]++')

# CUDA_HOME: the toolkit whose include/ holds cuda_bf16.h (NVRTC needs it and include/cccl).
find_cuda_home() {
    local cands=() c nvcc
    [[ -n "${CUDA_HOME:-}" ]] && cands+=("$CUDA_HOME")
    [[ -n "${CUDA_PATH:-}" ]] && cands+=("$CUDA_PATH")
    if nvcc="$(command -v nvcc 2>/dev/null)"; then
        cands+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
    fi
    cands+=(/usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12* /opt/cuda)
    for c in "${SITE_DIRS[@]}"; do cands+=("$c/nvidia/cu13" "$c/nvidia/cuda_runtime"); done
    for c in "${cands[@]}"; do
        if [[ -f "$c/include/cuda_bf16.h" ]]; then
            echo "$c"
            return 0
        fi
    done
    echo "none of: ${cands[*]}" >&2
    return 1
}
if CUDA_HOME_FOUND="$(find_cuda_home 2>"$LOGS/.cuda_home_err")"; then
    export CUDA_HOME="$CUDA_HOME_FOUND" CUDA_PATH="$CUDA_HOME_FOUND"
    CUDA_HOME_NOTE="$CUDA_HOME"
else
    CUDA_HOME_NOTE="NOT FOUND (NVRTC kernels cannot compile): tried $(cat "$LOGS/.cuda_home_err")"
fi
rm -f "$LOGS/.cuda_home_err"

# The newer NCCL from the Python wheel: cudarc only opens the name libnccl.so, so a directory
# holding a libnccl.so symlink to it goes first on LD_LIBRARY_PATH.
NCCL_NOTE="system default (no nvidia/nccl/lib/libnccl.so.2 in site-packages)"
for d in "${SITE_DIRS[@]}"; do
    lib="$d/nvidia/nccl/lib/libnccl.so.2"
    if [[ -f "$lib" ]]; then
        linkdir="$HERE/.env/nccl"
        mkdir -p "$linkdir" 2>/dev/null || linkdir="$(mktemp -d)"
        ln -sf "$lib" "$linkdir/libnccl.so"
        ln -sf "$lib" "$linkdir/libnccl.so.2"
        export LD_LIBRARY_PATH="$linkdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        NCCL_NOTE="$lib (via $linkdir/libnccl.so)"
        ver="$(ls -d "$d"/nvidia_nccl*.dist-info 2>/dev/null | head -n1)"
        [[ -n "$ver" ]] && NCCL_NOTE="$NCCL_NOTE, $(basename "$ver")"
        break
    fi
done

find_sanitizer() {
    local c
    if c="$(command -v compute-sanitizer 2>/dev/null)"; then echo "$c"; return 0; fi
    for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
        "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" \
        /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        [[ -x "$c" ]] && { echo "$c"; return 0; }
    done
    for d in "${SITE_DIRS[@]}"; do
        for c in "$d"/nvidia/*/bin/compute-sanitizer "$d"/nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer; do
            [[ -x "$c" ]] && { echo "$c"; return 0; }
        done
    done
    return 1
}

env_report() {
    echo "== comet-rs GPU bundle: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname 2>/dev/null || echo '?')"
    [[ -f "$HERE/MANIFEST.json" ]] && grep -E '"(commit|dirty|built_utc)"' "$HERE/MANIFEST.json" | sed 's/^ */   bundle /'
    echo "   command:        run.sh $cmd ${REST[*]:-}"
    echo "   output:         $OUTDIR (pack: $PACK)"
    echo "   CUDA_HOME:      $CUDA_HOME_NOTE"
    echo "   NCCL:           $NCCL_NOTE"
    echo "   LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "   COMET_CACHE_DIR=$COMET_CACHE_DIR"
    echo "   NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "== nvidia-smi"
        nvidia-smi 2>&1
        echo "== nvidia-smi topo -m"
        nvidia-smi topo -m 2>&1
    else
        echo "== nvidia-smi: not found on PATH"
    fi
}
env_report | tee "$OUTDIR/env.txt"

# ---------------------------------------------------------------- steps
STEP_NAMES=()
STEP_STATUS=()
STEP_SECS=()
STEP_NOTE=()
FAILED=0

have_timeout=0
command -v timeout >/dev/null 2>&1 && have_timeout=1

record() { # name status secs note
    STEP_NAMES+=("$1")
    STEP_STATUS+=("$2")
    STEP_SECS+=("$3")
    STEP_NOTE+=("$4")
    [[ "$2" == ok ]] || FAILED=1
    printf '[%-7s] %-48s %7ss  %s\n' "$2" "$1" "$3" "$4"
}

# run_step NAME LOG CMD...: run with a time limit, log everything, record the outcome.
run_step() {
    local name="$1" log="$2"
    shift 2
    local start end rc secs note status
    start=$(date +%s.%N)
    {
        echo "\$ $*"
        if ((have_timeout)); then
            (cd "$HERE" && timeout --kill-after=10 "$STEP_TIMEOUT" "$@")
        else
            (cd "$HERE" && "$@")
        fi
    } >"$log" 2>&1 </dev/null
    rc=$?
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    # libtest summaries: "test result: ok. 12 passed; 0 failed; 3 ignored; ..."
    note="$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } n++ }
                 END { if (n) printf "%d passed, %d failed", p, f }' "$log")"
    if grep -q "ERROR SUMMARY: [1-9]" "$log" 2>/dev/null; then
        note="$note${note:+; }$(grep -m1 -o 'ERROR SUMMARY: [0-9]* errors*' "$log")"
    elif grep -q "RACECHECK SUMMARY: [1-9]" "$log" 2>/dev/null; then
        note="$note${note:+; }$(grep -m1 -o 'RACECHECK SUMMARY: [0-9]* hazards*' "$log")"
    fi
    if [[ $rc -eq 0 ]]; then
        status=ok
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status=TIMEOUT
        note="$note${note:+; }over ${STEP_TIMEOUT}s"
    else
        status=FAILED
        note="$note${note:+; }exit $rc"
    fi
    note="$note${note:+; }log: ${log#"$OUTDIR"/}"
    record "$name" "$status" "$secs" "$note"
    if [[ "$status" != ok ]]; then
        echo "---- last lines of $log"
        tail -n 30 "$log"
        echo "----"
    fi
}

# Test binaries, optionally only those whose name contains --only, or only the GPU ones.
list_tests() { # [gpu]
    local f name
    for f in "$HERE"/tests/*; do
        [[ -f "$f" && -x "$f" ]] || continue
        name="$(basename "$f")"
        [[ -z "$ONLY" || "$name" == *"$ONLY"* ]] || continue
        if [[ "${1:-}" == gpu ]] && ! grep -qxF "$name" "$HERE/gpu-tests.txt" 2>/dev/null; then
            continue
        fi
        echo "$f"
    done
}

do_test() {
    local f name any=0
    while IFS= read -r f; do
        any=1
        name="$(basename "$f")"
        run_step "test $name" "$LOGS/test-$name.log" "$f" --include-ignored --test-threads=1 "${REST[@]}"
    done < <(list_tests)
    ((any)) || record "test" FAILED 0 "no test binaries in $HERE/tests match '${ONLY}'"
}

do_sanitize() {
    local san f name any=0
    if ! san="$(find_sanitizer)"; then
        record "sanitize" FAILED 0 "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin, site-packages)"
        return
    fi
    echo "compute-sanitizer: $san"
    while IFS= read -r f; do
        any=1
        name="$(basename "$f")"
        run_step "memcheck $name" "$LOGS/memcheck-$name.log" \
            "$san" --tool memcheck --error-exitcode 99 --print-limit 50 \
            "$f" --include-ignored --test-threads=1 "${REST[@]}"
        run_step "racecheck $name" "$LOGS/racecheck-$name.log" \
            "$san" --tool racecheck --error-exitcode 99 --print-limit 50 \
            "$f" --include-ignored --test-threads=1 "${REST[@]}"
    done < <(list_tests gpu)
    ((any)) || record "sanitize" FAILED 0 "no GPU test binaries (gpu-tests.txt) match '${ONLY}'"
}

do_bench() {
    local ex name
    mkdir -p "$OUTDIR/bench" "$LOGS/bench-ranks"
    if [[ -x "$HERE/bin/xtask" && -x "$HERE/bin/comet-bench" ]]; then
        run_step "bench layer" "$LOGS/bench-layer.log" \
            "$HERE/bin/xtask" bench --bin "$HERE/bin/comet-bench" --out "$OUTDIR/bench" \
            --scratch "$LOGS/bench-ranks" "$@"
    else
        record "bench layer" FAILED 0 "bin/xtask or bin/comet-bench missing from the bundle"
    fi
    for ex in "$HERE"/examples/*; do
        [[ -f "$ex" && -x "$ex" ]] || continue
        name="$(basename "$ex")"
        COMET_BENCH_OUT="$OUTDIR/bench" run_step "bench $name" "$LOGS/bench-$name.log" "$ex"
    done
}

case "$cmd" in
    env) ;;
    test) do_test ;;
    sanitize) do_sanitize ;;
    bench) do_bench "${REST[@]}" ;;
    all)
        do_test
        do_sanitize
        REST=()
        do_bench
        ;;
esac

# ---------------------------------------------------------------- summary
{
    echo
    echo "== summary: run.sh $cmd ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
    printf '%-8s %-48s %8s  %s\n' status step seconds note
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-8s %-48s %8s  %s\n' "${STEP_STATUS[$i]}" "${STEP_NAMES[$i]}" "${STEP_SECS[$i]}" "${STEP_NOTE[$i]}"
    done
    n_fail=0
    for s in "${STEP_STATUS[@]:-}"; do [[ -n "$s" && "$s" != ok ]] && n_fail=$((n_fail + 1)); done
    echo "== ${#STEP_NAMES[@]} step(s), $n_fail failed"
} | tee "$OUTDIR/summary.txt"

if [[ "$PACK" == 1 ]]; then
    # bench/ (results JSON and SVG) stays outside the archive.
    (cd "$OUTDIR" && tar czf logs.tar.gz logs env.txt && rm -rf logs env.txt) &&
        echo "logs packed into $OUTDIR/logs.tar.gz"
fi
exit "$FAILED"
