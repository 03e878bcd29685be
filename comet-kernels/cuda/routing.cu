// The routing plan on the device, with no host synchronisation (comet-core's definitions).
//
// comet_expert_counts: counts[e] = number of local slots (t, j) with ids[t, j] = e.
// comet_routing_plan:  from the [W, E] counts matrix of all ranks and this rank's ids:
//   expert_offsets[L + 1]   receive-layout row offset of each local expert on this rank;
//   seg_offsets[L * W + 1]  offset of segment (l, i), i.e. local expert l from source rank
//                           s = (rank + i) mod W (rotated order, the local rank first);
//   send_offsets[E + 1]     this rank's send layout: rows by destination rank, then local
//                           expert, then token = by global expert id, then token;
//   send_rank_counts[W], recv_rank_counts[W]  rows sent to / received from each rank;
//   scatter_rank/scatter_row[M k]  slot (t, j) -> (destination rank, row in its receive layout);
//   send_row[M k]           slot -> row in this rank's send layout;
//   status[0]               number of problems: ids out of range, and experts whose local count
//                           disagrees with row `rank` of the counts matrix (0 when all is well).
// Rows of one (expert, source) segment are ordered by token index (a stable counting sort,
// done with warp match + per-warp counts in one block of 1024 threads).
#include "comet/common.cuh"

using namespace comet;

struct CountParams {
  const int* ids;
  int* counts;
  int* status;
  i64 slots, experts;
};

__device__ __forceinline__ int block_sum(int v, int* s_scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s_scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += s_scratch[w];
  return total;
}

// One block. Dynamic shared memory: E ints.
extern "C" __global__ void __launch_bounds__(1024) comet_expert_counts(const CountParams p) {
  extern __shared__ int s_counts[];
  __shared__ int s_scratch[32];
  const int E = static_cast<int>(p.experts);
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_counts[e] = 0;
  __syncthreads();
  int bad = 0;
  for (i64 i = threadIdx.x; i < p.slots; i += blockDim.x) {
    const int e = p.ids[i];
    if (e >= 0 && e < E) atomicAdd(&s_counts[e], 1); else ++bad;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) p.counts[e] = s_counts[e];
  bad = block_sum(bad, s_scratch);
  if (threadIdx.x == 0) p.status[0] = bad;
}

struct PlanParams {
  const int* counts;  // [W, E]
  const int* ids;     // [slots]
  int* expert_offsets;
  int* seg_offsets;
  int* send_offsets;
  int* send_rank_counts;
  int* recv_rank_counts;
  int* scatter_rank;
  int* scatter_row;
  int* send_row;
  int* status;
  i64 slots, experts, world, rank;
};

// One block of 1024 threads. Dynamic shared memory: (32 + 4) * E ints.
extern "C" __global__ void __launch_bounds__(1024) comet_routing_plan(const PlanParams p) {
  extern __shared__ int smem[];
  __shared__ int s_scratch[32];
  const int E = static_cast<int>(p.experts), W = static_cast<int>(p.world);
  const int L = E / W, d = static_cast<int>(p.rank);
  const int nthreads = blockDim.x, nwarps = nthreads >> 5;
  int* s_wc = smem;                  // [32][E] per-warp counts of the current chunk
  int* s_tot = s_wc + 32 * E;        // [E] rows of expert e over all sources
  int* s_base = s_tot + E;           // [E] local slots of expert e seen so far
  int* s_recv = s_base + E;          // [E] receive row of (expert e, source d) on e's rank
  int* s_send = s_recv + E;          // [E] send offset of expert e on this rank
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int x = tid; x < 32 * E; x += nthreads) s_wc[x] = 0;
  for (int e = tid; e < E; e += nthreads) {
    int t = 0;
    for (int s = 0; s < W; ++s) t += p.counts[s * E + e];
    s_tot[e] = t;
    s_base[e] = 0;
  }
  __syncthreads();
  for (int e = tid; e < E; e += nthreads) {
    const int r = e / L, l = e % L;
    int b = 0;
    for (int q = 0; q < l; ++q) b += s_tot[r * L + q];
    const int id = (d - r + W) % W;  // position of source d in r's rotated order
    for (int i = 0; i < id; ++i) b += p.counts[((r + i) % W) * E + e];
    s_recv[e] = b;
  }
  if (tid == 0) {
    int run = 0;
    for (int e = 0; e < E; ++e) {
      s_send[e] = run;
      p.send_offsets[e] = run;
      run += p.counts[d * E + e];
    }
    p.send_offsets[E] = run;
  } else if (tid == 32) {
    int run = 0;
    for (int l = 0; l < L; ++l) {
      p.expert_offsets[l] = run;
      for (int i = 0; i < W; ++i) {
        p.seg_offsets[l * W + i] = run;
        run += p.counts[((d + i) % W) * E + d * L + l];
      }
    }
    p.expert_offsets[L] = run;
    p.seg_offsets[L * W] = run;
  }
  for (int r = tid; r < W; r += nthreads) {
    int sent = 0, recv = 0;
    for (int l = 0; l < L; ++l) {
      sent += p.counts[d * E + r * L + l];
      recv += p.counts[r * E + d * L + l];
    }
    p.send_rank_counts[r] = sent;
    p.recv_rank_counts[r] = recv;
  }
  __syncthreads();

  int bad = 0;
  const int slots = static_cast<int>(p.slots);
  for (int c0 = 0; c0 < slots; c0 += nthreads) {
    const int i = c0 + tid;
    const int e = i < slots ? p.ids[i] : -1;
    const bool valid = e >= 0 && e < E;
    const unsigned peers = __match_any_sync(0xffffffffu, valid ? e : -1);
    const unsigned lt = peers & ((1u << lane) - 1u);
    if (valid && lt == 0) s_wc[warp * E + e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int before = 0;
      for (int w = 0; w < warp; ++w) before += s_wc[w * E + e];
      const int rank_in_expert = s_base[e] + before + __popc(lt);
      p.send_row[i] = s_send[e] + rank_in_expert;
      p.scatter_rank[i] = e / L;
      p.scatter_row[i] = s_recv[e] + rank_in_expert;
    } else if (i < slots) {
      p.send_row[i] = -1;
      p.scatter_rank[i] = -1;
      p.scatter_row[i] = -1;
      ++bad;
    }
    __syncthreads();
    for (int x = tid; x < E; x += nthreads) {
      int sum = 0;
      for (int w = 0; w < nwarps; ++w) {
        sum += s_wc[w * E + x];
        s_wc[w * E + x] = 0;
      }
      s_base[x] += sum;
    }
    __syncthreads();
  }
  for (int e = tid; e < E; e += nthreads)
    if (s_base[e] != p.counts[d * E + e]) ++bad;
  bad = block_sum(bad, s_scratch);
  if (tid == 0) p.status[0] = bad;
}
