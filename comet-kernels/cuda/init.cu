// Deterministic pseudo-random fill on the device (benchmarks and tests): element i of a
// tensor filled with (seed, std) is uniform on [-std*sqrt(3), std*sqrt(3)) (standard deviation
// `std`), from splitmix64(seed + i * golden ratio). `comet_kernels::init::uniform_value`
// computes the same values on the host.
#include "comet/common.cuh"

using namespace comet;

struct FillParams {
  void* dst;
  i64 n;
  u64 seed;
  double std_dev;
  i64 dtype;  // 0 bf16, 1 f16, 2 f32
};

__device__ __forceinline__ u64 splitmix64(u64 z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

extern "C" __global__ void __launch_bounds__(256) comet_fill_uniform(const FillParams p) {
  const float half_width = static_cast<float>(p.std_dev * 1.7320508075688772);
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const u64 h = splitmix64(p.seed + static_cast<u64>(i) * 0x9e3779b97f4a7c15ull);
    const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
    const float v = (2.0f * u - 1.0f) * half_width;
    if (p.dtype == 0) static_cast<__nv_bfloat16*>(p.dst)[i] = __float2bfloat16_rn(v);
    else if (p.dtype == 1) static_cast<__half*>(p.dst)[i] = __float2half_rn(v);
    else static_cast<float*>(p.dst)[i] = v;
  }
}
