// comet/common.cuh: element types, conversions and small helpers shared by all kernels.
//
// Element type: define COMET_F16 for half precision inputs, otherwise bf16. Accumulation is
// always fp32. Every kernel parameter block is a struct of 8-byte fields so its layout matches
// the #[repr(C)] Rust mirror exactly.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace comet {

typedef long long i64;
typedef unsigned long long u64;

#if defined(COMET_F16)
typedef __half elem_t;
typedef __half2 elem2_t;
#else
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
#endif

template <class A, class B> struct is_same { static constexpr bool value = false; };
template <class A> struct is_same<A, A> { static constexpr bool value = true; };

__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

// 8 elements <-> 16 bytes.
__device__ __forceinline__ void unpack8(const uint4 v, float (&f)[8]) {
  const elem_t* e = reinterpret_cast<const elem_t*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f32(e[i]);
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  elem_t* e = reinterpret_cast<elem_t*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = from_f32<elem_t>(f[i]);
  return v;
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + __expf(-g)); }
__device__ __forceinline__ float gelu_erf_f(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }

}  // namespace comet
