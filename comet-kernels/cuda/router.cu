// Router softmax + top-k (forward) and its backward, one warp per token.
// Specialised by ROUTER_EPL = ceil(E / 32) (experts held per lane).
//
// Forward, per token t (comet-core's definition): p = softmax(logits[t]) with the maximum
// subtracted, in fp32; the k largest p are chosen, ties to the lower expert id, slots ordered
// by descending p (ties: lower id first); weight = p, or p / sum(selected p) when renormalised.
// Backward: given dL/dweight[t, j], dL/dlogits[t] = p * (dp - <dp, p>), where dp is non-zero
// only on the selected experts (through the renormalisation when it is on).
#include "comet/common.cuh"

#ifndef ROUTER_EPL
#define ROUTER_EPL 1
#endif

using namespace comet;

struct RouterParams {
  const float* logits;  // [tokens, E]
  float* probs;         // [tokens, E] or null
  int* ids;             // [tokens, k]
  float* weights;       // [tokens, k]
  i64 tokens, experts, k, renormalize;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void __launch_bounds__(256) comet_router_topk(const RouterParams p) {
  const int warps = blockDim.x >> 5;
  const i64 t = static_cast<i64>(blockIdx.x) * warps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(p.experts), K = static_cast<int>(p.k);
  const float* row = p.logits + t * E;
  float v[ROUTER_EPL];
  float m = neg_inf();
#pragma unroll
  for (int j = 0; j < ROUTER_EPL; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? row[e] : neg_inf();
    m = fmaxf(m, v[j]);
  }
  m = warp_max(m);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < ROUTER_EPL; ++j) {
    const int e = lane + 32 * j;
    v[j] = e < E ? expf(v[j] - m) : 0.0f;
    s += v[j];
  }
  s = warp_sum(s);
  const float inv = 1.0f / s;
#pragma unroll
  for (int j = 0; j < ROUTER_EPL; ++j) {
    const int e = lane + 32 * j;
    v[j] = v[j] * inv;
    if (p.probs != nullptr && e < E) p.probs[t * E + e] = v[j];
  }
  unsigned taken = 0;  // bit j: expert lane + 32 j already chosen
  float chosen_sum = 0.0f;
  float my_w = 0.0f;   // lane j < K keeps slot j's weight
  int my_id = 0;
  for (int slot = 0; slot < K; ++slot) {
    float best = -1.0f;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < ROUTER_EPL; ++j) {
      const int e = lane + 32 * j;
      if (e < E && !(taken & (1u << j)) && (v[j] > best || (v[j] == best && e < best_e))) {
        best = v[j];
        best_e = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
    if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);
    chosen_sum += best;
    if (lane == (slot & 31)) {
      my_w = best;
      my_id = best_e;
    }
    if ((slot & 31) == 31 || slot == K - 1) {
      // Flush a group of up to 32 slots (weights are renormalised below when K <= 32).
      const int first = slot & ~31;
      if (lane <= (slot & 31)) {
        p.ids[t * K + first + lane] = my_id;
        p.weights[t * K + first + lane] = my_w;
      }
    }
  }
  if (p.renormalize) {
    __syncwarp();
    const float inv_sum = 1.0f / chosen_sum;
    for (int j = lane; j < K; j += 32) p.weights[t * K + j] *= inv_sum;
  }
}

struct RouterBwdParams {
  const float* probs;     // [tokens, E]
  const int* ids;         // [tokens, k]
  const float* dweights;  // [tokens, k]
  float* dlogits;         // [tokens, E]
  void* dlogits_elem;     // [tokens, E] elem_t copy, or null
  i64 tokens, experts, k, renormalize;
};

extern "C" __global__ void __launch_bounds__(256) comet_router_backward(const RouterBwdParams p) {
  const int warps = blockDim.x >> 5;
  const i64 t = static_cast<i64>(blockIdx.x) * warps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(p.experts), K = static_cast<int>(p.k);
  float pr[ROUTER_EPL], dp[ROUTER_EPL];
#pragma unroll
  for (int j = 0; j < ROUTER_EPL; ++j) {
    const int e = lane + 32 * j;
    pr[j] = e < E ? p.probs[t * E + e] : 0.0f;
    dp[j] = 0.0f;
  }
  // Renormalisation: w_j = p_j / S  =>  dp_{e_j} = dw_j / S - sum_i dw_i p_{e_i} / S^2.
  float S = 0.0f, dot = 0.0f;
  for (int j = 0; j < K; ++j) {
    const int e = p.ids[t * K + j];
    const float pe = (e >= 0 && e < E) ? p.probs[t * E + e] : 0.0f;
    S += pe;
    dot += p.dweights[t * K + j] * pe;
  }
  for (int j = 0; j < K; ++j) {
    const int e = p.ids[t * K + j];
    if (e < 0 || e >= E) continue;
    float g = p.dweights[t * K + j];
    if (p.renormalize) g = g / S - dot / (S * S);
#pragma unroll
    for (int q = 0; q < ROUTER_EPL; ++q)
      if (lane + 32 * q == e) dp[q] += g;
  }
  float inner = 0.0f;
#pragma unroll
  for (int j = 0; j < ROUTER_EPL; ++j) inner += dp[j] * pr[j];
  inner = warp_sum(inner);
#pragma unroll
  for (int j = 0; j < ROUTER_EPL; ++j) {
    const int e = lane + 32 * j;
    if (e < E) {
      const float d = pr[j] * (dp[j] - inner);
      p.dlogits[t * E + e] = d;
      if (p.dlogits_elem != nullptr) static_cast<elem_t*>(p.dlogits_elem)[t * E + e] = from_f32<elem_t>(d);
    }
  }
}
