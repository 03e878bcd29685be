// Row movement by index, 16-byte vector accesses (rows of H elements, H a multiple of 8).
//   comet_permute_rows:  dst[index[t k + j]] = src[t] (* scale[t k + j])   (dispatch)
//   comet_gather_rows:   dst[i] = src[index[i]]                             (unpermute)
//   comet_combine_rows:  dst[t] = sum_j w[t k + j] * src[index[t k + j]]    (slot order, fp32)
//   comet_row_dots:      out[t k + j] = <a[t], src[index[t k + j]]>         (router backward)
// An index outside [0, rows of the indexed tensor) skips that row/slot (the routing plan marks
// such slots -1 and reports them in its status word).
#include "comet/common.cuh"

using namespace comet;

struct RowsParams {
  const void* src;
  void* dst;
  const int* index;
  const float* weights;  // scale / combine weights, or null (= 1)
  const void* other;     // comet_row_dots: the per-token rows a[t]
  i64 tokens;            // permute/combine/dots: tokens; gather: output rows
  i64 k;                 // slots per token
  i64 hidden;            // elements per row
  i64 src_rows;          // rows of src (gather/combine/dots bound)
  i64 dst_rows;          // rows of dst (permute bound)
};

extern "C" __global__ void __launch_bounds__(256) comet_permute_rows(const RowsParams p) {
  const int chunks = static_cast<int>(p.hidden / 8), K = static_cast<int>(p.k);
  const uint4* src = static_cast<const uint4*>(p.src);
  uint4* dst = static_cast<uint4*>(p.dst);
  for (i64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      const uint4 v = src[t * chunks + c];
      for (int j = 0; j < K; ++j) {
        const int r = p.index[t * K + j];
        if (r < 0 || r >= p.dst_rows) continue;
        if (p.weights != nullptr) {
          float f[8];
          unpack8(v, f);
          const float s = p.weights[t * K + j];
#pragma unroll
          for (int q = 0; q < 8; ++q) f[q] *= s;
          dst[static_cast<i64>(r) * chunks + c] = pack8(f);
        } else {
          dst[static_cast<i64>(r) * chunks + c] = v;
        }
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) comet_gather_rows(const RowsParams p) {
  const int chunks = static_cast<int>(p.hidden / 8);
  const uint4* src = static_cast<const uint4*>(p.src);
  uint4* dst = static_cast<uint4*>(p.dst);
  for (i64 i = blockIdx.x; i < p.tokens; i += gridDim.x) {
    const int r = p.index[i];
    if (r < 0 || r >= p.src_rows) continue;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x)
      dst[i * chunks + c] = src[static_cast<i64>(r) * chunks + c];
  }
}

extern "C" __global__ void __launch_bounds__(256) comet_combine_rows(const RowsParams p) {
  const int chunks = static_cast<int>(p.hidden / 8), K = static_cast<int>(p.k);
  const uint4* src = static_cast<const uint4*>(p.src);
  uint4* dst = static_cast<uint4*>(p.dst);
  for (i64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int j = 0; j < K; ++j) {
        const int r = p.index[t * K + j];
        if (r < 0 || r >= p.src_rows) continue;
        const float w = p.weights != nullptr ? p.weights[t * K + j] : 1.0f;
        float f[8];
        unpack8(src[static_cast<i64>(r) * chunks + c], f);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(w, f[q], acc[q]);
      }
      dst[t * chunks + c] = pack8(acc);
    }
  }
}

// One warp per slot.
extern "C" __global__ void __launch_bounds__(256) comet_row_dots(const RowsParams p) {
  const int chunks = static_cast<int>(p.hidden / 8), K = static_cast<int>(p.k);
  const uint4* src = static_cast<const uint4*>(p.src);
  const uint4* a = static_cast<const uint4*>(p.other);
  float* out = reinterpret_cast<float*>(p.dst);
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const i64 slots = p.tokens * K;
  for (i64 s = static_cast<i64>(blockIdx.x) * warps + (threadIdx.x >> 5); s < slots;
       s += static_cast<i64>(gridDim.x) * warps) {
    const i64 t = s / K;
    const int r = p.index[s];
    float acc = 0.0f;
    if (r >= 0 && r < p.src_rows) {
      for (int c = lane; c < chunks; c += 32) {
        float x[8], y[8];
        unpack8(a[t * chunks + c], x);
        unpack8(src[static_cast<i64>(r) * chunks + c], y);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc = fmaf(x[q], y[q], acc);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[s] = acc;
  }
}
