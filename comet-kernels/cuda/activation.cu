// Element-wise activations over the receive-layout rows, forward and backward.
// Rows processed: min(*rows_ptr, rows_cap) when rows_ptr is given (device count, e.g. the last
// expert offset), else rows_cap. F (the activation width) is a multiple of 8.
//   comet_swiglu_fwd: a[r, c] = silu(h[r, c]) * h[r, F + c]            h [rows, 2F], a [rows, F]
//   comet_gelu_fwd:   a[r, c] = gelu_erf(h[r, c])                      h, a [rows, F]
//   comet_swiglu_bwd: dh[r, c] = da * up * silu'(gate), dh[r, F + c] = da * silu(gate)
//   comet_gelu_bwd:   dh = da * gelu_erf'(h)
#include "comet/common.cuh"

using namespace comet;

struct ActParams {
  const void* h;
  const void* da;
  void* out;
  const int* rows_ptr;
  i64 rows_cap, f;
};

__device__ __forceinline__ i64 act_rows(const ActParams& p) {
  if (p.rows_ptr == nullptr) return p.rows_cap;
  const i64 r = *p.rows_ptr;
  return r < 0 ? 0 : (r < p.rows_cap ? r : p.rows_cap);
}

template <int MODE>  // 0 swiglu fwd, 1 gelu fwd, 2 swiglu bwd, 3 gelu bwd
__device__ __forceinline__ void act_body(const ActParams& p) {
  const i64 rows = act_rows(p);
  const i64 cpr = p.f / 8;  // chunks per row
  const i64 total = rows * cpr;
  const uint4* h = static_cast<const uint4*>(p.h);
  const uint4* da = static_cast<const uint4*>(p.da);
  uint4* out = static_cast<uint4*>(p.out);
  const bool glu = MODE == 0 || MODE == 2;
  const i64 hcpr = glu ? 2 * cpr : cpr;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = i / cpr, c = i % cpr;
    float x[8];
    unpack8(h[r * hcpr + c], x);
    if (MODE == 0) {
      float u[8], a[8];
      unpack8(h[r * hcpr + cpr + c], u);
#pragma unroll
      for (int q = 0; q < 8; ++q) a[q] = silu_f(x[q]) * u[q];
      out[r * cpr + c] = pack8(a);
    } else if (MODE == 1) {
      float a[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) a[q] = gelu_erf_f(x[q]);
      out[r * cpr + c] = pack8(a);
    } else if (MODE == 2) {
      float u[8], g[8], dg[8], du[8];
      unpack8(h[r * hcpr + cpr + c], u);
      unpack8(da[r * cpr + c], g);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float s = 1.0f / (1.0f + expf(-x[q]));
        const float silu = x[q] * s;
        dg[q] = g[q] * u[q] * s * (1.0f + x[q] * (1.0f - s));
        du[q] = g[q] * silu;
      }
      out[r * hcpr + c] = pack8(dg);
      out[r * hcpr + cpr + c] = pack8(du);
    } else {
      float g[8], d[8];
      unpack8(da[r * cpr + c], g);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float cdf = 0.5f * (1.0f + erff(x[q] * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * x[q] * x[q]);
        d[q] = g[q] * (cdf + x[q] * pdf);
      }
      out[r * cpr + c] = pack8(d);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) comet_swiglu_fwd(const ActParams p) { act_body<0>(p); }
extern "C" __global__ void __launch_bounds__(256) comet_gelu_fwd(const ActParams p) { act_body<1>(p); }
extern "C" __global__ void __launch_bounds__(256) comet_swiglu_bwd(const ActParams p) { act_body<2>(p); }
extern "C" __global__ void __launch_bounds__(256) comet_gelu_bwd(const ActParams p) { act_body<3>(p); }
