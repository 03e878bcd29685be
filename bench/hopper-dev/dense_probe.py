"""cuBLAS (through torch) on four dense shapes of the presets, 3 launches each. Run it under ncu
to see which kernels cuBLAS picks (bench/results/logs/s4/s4-12-ncu-cublas-dense.log).

  ncu --kernel-name regex:'gemm|xmma|cutlass|sm90|nvjet' --launch-count 12 --metrics ... \
      /opt/torch/.venv/bin/python bench/hopper-dev/dense_probe.py
"""
import torch
shapes = {"qwen.gemm1": (32768, 2048, 1408), "qwen.dgrad1": (32768, 1408, 2048),
          "deepseek.gemm0": (65536, 4096, 7168), "mixtral.gemm0": (16384, 28672, 4096)}
for name, (m, n, k) in shapes.items():
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        c = a @ b.t()
    torch.cuda.synchronize()
    print(name, m, n, k, flush=True)
