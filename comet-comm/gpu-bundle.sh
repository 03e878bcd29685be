#!/bin/bash
# Builds comet-comm's release test binaries and p2p_bench into .gpu-comm/ with run.sh,
# for the GPU host (device tool: carry .gpu-comm, run `bash .gpu-comm/run.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-comm
rm -rf "$out" && mkdir -p "$out"
cargo test --release -p comet-comm --no-run --message-format=json 2>/dev/null | python3 -c '
import sys, json, shutil
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["package_id"].find("comet-comm") >= 0:
        name = {"gpu": "gpu_tests", "comet_comm": "unit_tests", "p2p_bench": "p2p_bench"}.get(m["target"]["name"])
        if name: shutil.copy(m["executable"], "'"$out"'/" + name); print(name, m["executable"])
'
cargo build --release -p comet-comm --example p2p_bench
cp target/release/examples/p2p_bench "$out/p2p_bench"
commit=$(git rev-parse --short HEAD)
sed "s/@COMMIT@/$commit/" comet-comm/gpu-run.sh > "$out/run.sh"
chmod +x "$out"/*
ls -la "$out"
