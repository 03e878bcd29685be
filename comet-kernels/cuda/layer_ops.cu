// Small integer kernels of the expert-parallel layer (comet-layer's NCCL baselines).
//
//   comet_scatter_i32:    dst[index[i]] = values[i] for i < n; an index outside [0, dst_len)
//                         skips the entry (e.g. the routing plan's -1 for an invalid slot).
//   comet_chunk_counts:   per token chunk c (tokens c*M/C .. (c+1)*M/C, the split every rank
//                         uses) the number of slots routed to each expert,
//                         out[c*E + e]; then out[C*E + i] = extra[i] for i < 2 (one block
//                         writes them): the header the ranks all-gather before a layer call.
//   comet_unpack_counts:  the all-gathered headers [W][stride] into per-chunk count matrices
//                         out[c][s][e] = in[s*stride + c*E + e] (what the routing plan reads).
#include "comet/common.cuh"

using namespace comet;

struct ScatterParams {
  const int* index;
  const int* values;
  int* dst;
  i64 n;
  i64 dst_len;
};

extern "C" __global__ void __launch_bounds__(256) comet_scatter_i32(const ScatterParams p) {
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const int r = p.index[i];
    if (r >= 0 && r < p.dst_len) p.dst[r] = p.values[i];
  }
}

struct ChunkCountParams {
  const int* ids;  // [tokens, k]
  int* out;        // [chunks * experts + 2]
  i64 tokens, k, experts, chunks, extra0, extra1;
};

// One block per chunk. Dynamic shared memory: experts ints.
extern "C" __global__ void __launch_bounds__(1024) comet_chunk_counts(const ChunkCountParams p) {
  extern __shared__ int s_counts[];
  const int E = static_cast<int>(p.experts);
  const i64 c = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_counts[e] = 0;
  __syncthreads();
  const i64 t0 = c * p.tokens / p.chunks, t1 = (c + 1) * p.tokens / p.chunks;
  for (i64 i = t0 * p.k + threadIdx.x; i < t1 * p.k; i += blockDim.x) {
    const int e = p.ids[i];
    if (e >= 0 && e < E) atomicAdd(&s_counts[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) p.out[c * E + e] = s_counts[e];
  if (c == 0 && threadIdx.x == 0) {
    p.out[p.chunks * E] = static_cast<int>(p.extra0);
    p.out[p.chunks * E + 1] = static_cast<int>(p.extra1);
  }
}

struct UnpackParams {
  const int* in;  // [world, stride]
  int* out;       // [chunks, world, experts]
  i64 world, stride, chunks, experts;
};

extern "C" __global__ void __launch_bounds__(256) comet_unpack_counts(const UnpackParams p) {
  const i64 n = p.chunks * p.world * p.experts;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 e = i % p.experts, s = (i / p.experts) % p.world, c = i / (p.experts * p.world);
    p.out[i] = p.in[s * p.stride + c * p.experts + e];
  }
}
