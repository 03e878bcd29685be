#!/usr/bin/env bash
# Builds the Hopper GEMM dev harness here (no GPU needed) and reports registers/spills and
# the HGMMA count of its kernels. Output: $OUT_DIR (default .gpu-hopper/) with the binary,
# run.sh and ptxas/SASS summaries.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
OUT_DIR=${OUT_DIR:-$ROOT/.gpu-hopper}
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
mkdir -p "$OUT_DIR"
"$NVCC" ${EXTRA_FLAGS:-} -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -lineinfo -Xptxas -v -I"$ROOT/comet-kernels/cuda" \
  -o "$OUT_DIR/hopper_dev" hopper_dev.cu -lcublas -L/usr/local/cuda/lib64 \
  -Xlinker -rpath=/usr/local/cuda/lib64 2> "$OUT_DIR/ptxas.txt" || {
  grep -v "ptxas info" "$OUT_DIR/ptxas.txt" | head -40 >&2
  echo "build.sh: nvcc failed (full output: $OUT_DIR/ptxas.txt)" >&2
  exit 1
}
grep -E "Used|spill|C75" "$OUT_DIR/ptxas.txt" | grep -B1 -A0 "" | head -100 > "$OUT_DIR/ptxas-summary.txt" || true
# SASS check (nvdisasm from the local toolkit or Triton's copy)
NVD=$(command -v nvdisasm || ls /opt/torchcpu/lib/python3.11/site-packages/triton/backends/nvidia/bin/nvdisasm 2>/dev/null || true)
if [ -n "$NVD" ]; then
  PATH=$PATH:$(dirname "$NVD") /usr/local/cuda/bin/cuobjdump --dump-sass "$OUT_DIR/hopper_dev" > /tmp/hopper-sass.txt 2>/dev/null || true
  echo "HGMMA instructions in SASS: $(grep -c HGMMA /tmp/hopper-sass.txt)"
  echo "local memory ops (LDL/STL): $(grep -cE '\bLDL|\bSTL' /tmp/hopper-sass.txt || true)"
fi
echo "ptxas warnings C75xx: $(grep -c C75 "$OUT_DIR/ptxas.txt" || true)"
grep -E "registers|spill" "$OUT_DIR/ptxas.txt" | sort | uniq -c
cp run.sh "$OUT_DIR/run.sh"
ls -la "$OUT_DIR"
