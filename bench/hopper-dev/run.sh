#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: bash .gpu-hopper/run.sh
# Writes logs and JSON under $OUT (or ./out-hopper). Every step has its own time limit so a
# hang in one does not eat the others.
set -u
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
D=$(cd "$(dirname "$0")" && pwd)
O=${OUT:-$PWD/out-hopper}
mkdir -p "$O"
# cuBLAS 13: toolkit first, then python site-packages
for p in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib \
         /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cublas/lib; do
  [ -e "$p/libcublas.so.13" ] && export LD_LIBRARY_PATH="$p:${LD_LIBRARY_PATH:-}" && break
done
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$O/gpu.txt" 2>&1
cat "$O/gpu.txt"
STEPS=${STEPS:-"small rust full memcheck racecheck ncu"}
# VARIANTS=a,b,..: only those kernel variants in the harness steps
V=${VARIANTS:+--variants $VARIANTS}
export COMET_CACHE_DIR=/tmp/comet-cache
for s in $STEPS; do
  t0=$(date +%s)
  case $s in
    small) timeout 40 "$D/hopper_dev" --small $V > "$O/small.log" 2>&1; rc=$? ;;
    rust) timeout 60 "$D/comet_kernels_tests" --include-ignored --test-threads 1 --skip nvrtc_compiles sm90:: > "$O/rust.log" 2>&1; rc=$?
          timeout 40 compute-sanitizer --tool memcheck "$D/comet_kernels_tests" --include-ignored --test-threads 1 sm90::tests::bad_offsets sm90::tests::tile_order >> "$O/rust.log" 2>&1 || rc=$((rc+100)) ;;
    full) timeout ${FULL_LIMIT:-130} "$D/hopper_dev" $V ${ONLY:+--only $ONLY} ${TOKENS:+--tokens $TOKENS} --iters ${ITERS:-20} --json "$O/hopper-gemm.json" > "$O/full.log" 2>&1; rc=$? ;;
    memcheck) timeout 35 compute-sanitizer --tool memcheck --print-limit 20 "$D/hopper_dev" --small $V --only ${SAN_ONLY:-edge.} > "$O/memcheck.log" 2>&1; rc=$? ;;
    racecheck) timeout 40 compute-sanitizer --tool racecheck --print-limit 20 "$D/hopper_dev" --small $V --only ${RACE_ONLY:-.ragged} > "$O/racecheck.log" 2>&1; rc=$? ;;
    ncu) # cluster (+hint) vs single-CTA (+hint): Mixtral gemm1, DeepSeek gemm0
         M="--metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum"
         timeout 40 ncu --clock-control none --kernel-name regex:gg_kernel --launch-count 4 \
           --section SpeedOfLight $M "$D/hopper_dev" --only mixtral.gemm1 --no-timing > "$O/ncu.log" 2>&1; rc=$?
         timeout 40 ncu --clock-control none --kernel-name regex:gg_kernel --launch-count 4 \
           --section SpeedOfLight $M "$D/hopper_dev" --only deepseekv3.gemm0 --no-timing >> "$O/ncu.log" 2>&1 ;;
  esac
  echo "== step $s: rc=$rc, $(( $(date +%s) - t0 )) s"
  case $s in
    small) grep -E "FAIL|OK:|failing|error|Error" "$O/small.log" | head -30 ;;
    rust) grep -E "^test |test result|panicked|ERROR SUMMARY" "$O/rust.log" | head -40 ;;
    full) grep -E "FAIL|failing|error|Error|cuBLAS dense bf16" "$O/full.log" | head -20; sed -n '/^problem/,$p' "$O/full.log" ;;
    memcheck|racecheck) grep -E "ERROR SUMMARY|Hazard|Invalid|error" "$O/$s.log" | head -12 ;;
    ncu) grep -E "gg_kernel<|SM Frequency|Compute \(SM\) Throughput|L2 Cache Throughput|dram__bytes|lts__t_sector_hit|gpu__time_duration" "$O/ncu.log" | sed -E 's/ +/ /g' | cut -c1-110 | head -64 ;;
  esac
done
