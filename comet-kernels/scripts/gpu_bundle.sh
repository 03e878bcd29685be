#!/usr/bin/env bash
# Builds the comet-kernels GPU bundle into <repo>/.gpu-kernels (git-ignored by `/.gpu*`):
#   bin/      release test executables (GPU tests are #[ignore]d: run with --include-ignored)
#             and the gemm_bench example, symbols stripped;
#   cache/    cubins of every kernel specialisation, precompiled here for sm_90a (a GPU host
#             with the same toolkit path and NVRTC version loads them instead of compiling);
#   run.sh    runs everything on the GPU host and writes logs and JSON to a directory.
# Usage: comet-kernels/scripts/gpu_bundle.sh [repo root, default: the current git checkout]
set -euo pipefail
root="${1:-$(git rev-parse --show-toplevel)}"
out="$root/.gpu-kernels"
cd "$root"
rm -rf "$out/bin" "$out/run.sh" "$out/COMMIT"
mkdir -p "$out/bin" "$out/cache"
git rev-parse --short HEAD > "$out/COMMIT" 2>/dev/null || echo unknown > "$out/COMMIT"
if ! git diff --quiet -- comet-kernels 2>/dev/null; then echo "+dirty" >> "$out/COMMIT"; fi

cargo test --release -p comet-kernels --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
out = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        kind = m["target"]["kind"][0]
        if name == "nvrtc_compile":
            continue  # compile-only checks; run on the development machine
        dst = os.path.join(out, "bin", "test-" + (name if kind != "lib" else "lib"))
        shutil.copy(m["executable"], dst)
        print("bundled", dst)
' "$out"
cargo build --release -p comet-kernels --example gemm_bench --example sanitizer_canary
cp target/release/examples/gemm_bench target/release/examples/sanitizer_canary "$out/bin/"

# Warm the cubin cache with the same include path and NVRTC the GPU host uses.
env -u CUDA_HOME -u CUDA_PATH LD_LIBRARY_PATH=/usr/local/cuda/lib COMET_CACHE_DIR="$out/cache" \
  cargo test --release -p comet-kernels --test nvrtc_compile -- --ignored warm_cache --nocapture 2>&1 | grep -E "specialisations|test result"

cp comet-kernels/scripts/run.sh "$out/run.sh"
chmod +x "$out/run.sh"
du -sh "$out" "$out"/bin/* "$out/cache"
