#!/usr/bin/env bash
# Unpack a CUDA 13.0 toolkit from PyPI wheels so kernels compile (nvcc, NVRTC) and disassemble
# (cuobjdump) on a development machine with no GPU. Not needed for CI.
set -euo pipefail
root=${1:-/opt/cudapip}
mkdir -p "$root/wh" "$root/x"
python3 -m pip download -q --no-deps -d "$root/wh" \
  "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cublas==13.0.*" "nvidia-cuda-cuobjdump==13.2.86" "nvidia-nccl-cu13"
for f in "$root"/wh/*.whl; do unzip -q -o "$f" -d "$root/x"; done
cu="$root/x/nvidia/cu13"
(cd "$cu/lib" && for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "lib$l.so"; done)
ln -sfn lib "$cu/lib64"
ln -sf libnccl.so.2 "$root/x/nvidia/nccl/lib/libnccl.so"
ln -sfn "$cu" /usr/local/cuda
echo "CUDA 13.0 toolkit at /usr/local/cuda; use LD_LIBRARY_PATH=/usr/local/cuda/lib for NVRTC"
