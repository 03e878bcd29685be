"""H200 probe (torch on the device host): DRAM write / copy / read bandwidth and cuBLAS on the
DeepSeek-V3 weight-gradient shape (4096 x 7168 outputs, reduction K = 256 .. 8192).

Run on the GPU host: /opt/torch/.venv/bin/python bench/hopper-dev/bw_probe.py
Results of session 4: bench/results/2026-11-30-s4-hopper-experiments-h200.json ("probe").
"""
import torch


def ms_per_call(f, iters=10):
    f()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


n = 15_000_000_000 // 2  # 15 GB of bf16: DeepSeek-V3's dW0 at 8192 tokens
x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
ms = ms_per_call(lambda: x.fill_(1.0))
print(f"fill 15 GB: {ms:.3f} ms -> {15 / ms:.2f} TB/s write")
y = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
z = x[: n // 2]
ms = ms_per_call(lambda: y.copy_(z))
print(f"copy 7.5 GB: {ms:.3f} ms -> {15 / ms:.2f} TB/s (read+write)")
ms = ms_per_call(lambda: y.sum())
print(f"read 7.5 GB (sum): {ms:.3f} ms -> {7.5 / ms:.2f} TB/s")
del x, y, z
for k in (256, 512, 1024, 2048, 8192):
    a = torch.randn(4096, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, 7168, dtype=torch.bfloat16, device="cuda")
    ms = ms_per_call(lambda: a @ b, 50)
    out_gb = 4096 * 7168 * 2 / 1e9
    print(
        f"gemm 4096x7168xK={k}: {ms * 1e3:.1f} us {2 * 4096 * 7168 * k / ms / 1e9:.0f} TFLOP/s, "
        f"out write {out_gb / ms:.2f} TB/s"
    )
# 16 experts' weight gradients at once (256 rows each), as one batched GEMM
a = torch.randn(16, 4096, 256, dtype=torch.bfloat16, device="cuda")
b = torch.randn(16, 256, 7168, dtype=torch.bfloat16, device="cuda")
ms = ms_per_call(lambda: torch.bmm(a, b), 20)
print(
    f"bmm 16x4096x7168x256: {ms:.3f} ms {2 * 16 * 4096 * 7168 * 256 / ms / 1e9:.0f} TFLOP/s, "
    f"write {16 * 4096 * 7168 * 2 / 1e9 / ms:.2f} TB/s"
)
