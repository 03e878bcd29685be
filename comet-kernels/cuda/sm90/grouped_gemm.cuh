// Persistent, warp-specialised grouped GEMM for Hopper (sm_90a): TMA + wgmma.
//
// Block: 384 threads = producer warpgroup (one thread issues TMA; 40 registers) + two
// consumer warpgroups (wgmma + epilogue; 232 registers). Grid: one CTA per SM (persistent);
// tiles come from GroupedScheduler, whose order may be supplied as data and whose producer
// waits on Hook::wait(tile) before loading a tile.
//
// Usage from a kernel (nvcc or NVRTC):
//   extern "C" __global__ void __launch_bounds__(384, 1)
//   my_kernel(const __grid_constant__ comet_sm90::GroupedGemmArgs g,
//             const __grid_constant__ comet_sm90::NoWait hook) {
//     comet_sm90::grouped_gemm<MyConfig>(g, hook);
//   }
// launched with C::smem_bytes(num_experts) bytes of dynamic shared memory.
#pragma once
#include "sm90/config.cuh"
#include "sm90/epilogue.cuh"
#include "sm90/mainloop.cuh"
#include "sm90/scheduler.cuh"

namespace comet_sm90 {

/// Cooperative schedule: m64 blocks of a warpgroup's WG_ROWS rows that hold valid rows
/// (`rows_wg` of them from its first row; <= 0: none).
template <class C>
__device__ __forceinline__ int active_mblocks(int rows_wg) {
  return rows_wg <= 0 ? 0 : min(C::MW, (rows_wg + 63) / 64);
}

/// Roles of a CTA in a 2-CTA cluster (see Config::CLUSTER). Every thread returns here.
template <class C, class Hook, class Sched>
__device__ __forceinline__ void grouped_gemm_cluster_roles(const GroupedGemmArgs& g,
                                                           const Hook& hook,
                                                           const Sched& sched,
                                                           const Ring<C>& ring, u32 base) {
  const int rank = (int)cluster_ctarank();
  const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) producer_loop_cluster<C>(g, sched, ring, hook, rank);
    return;
  }
  setmaxnreg_inc<232>();
  const int cw = wg - 1;
  const int wtid = threadIdx.x - 128 * wg;
  const int ctid = threadIdx.x - 128;
  const u32 stage = base + C::OFF_EPI + cw * C::EPI_WG_BYTES;
  const u32 peer = (u32)(rank ^ 1);
  RingPos pos{0, 0};
  const int npairs = (sched.total + 1) / 2;
  for (int u = (int)cluster_id_x(); u < npairs; u += (int)cluster_count_x()) {
    TilePair pr = decode_pair(sched, u, rank);
    const bool own = __shfl_sync(0xffffffffu, (int)pr.own_valid, 0) != 0;
    const bool any = own || __shfl_sync(0xffffffffu, (int)pr.peer_valid, 0) != 0;
    if (!any) continue;
    const bool shared_b = __shfl_sync(0xffffffffu, (int)pr.shared_b, 0) != 0;
    Tile t = pr.own;
    make_warp_uniform(t);
    if (!own) t.k_len = __shfl_sync(0xffffffffu, pr.kbs, 0) * C::BK;  // run the pair's stages
    const int rows_wg = own ? t.rows - C::WG_ROWS * cw : 0;
    float acc[C::MW][C::ACC_N];
    // Stages are always released to both CTAs, shared or not: a peer's multicast into a
    // stage must wait until this CTA is done with that stage's previous contents too.
    (void)shared_b;
    consumer_mainloop<C>(acc, ring, pos, t, C::MW * cw, active_mblocks<C>(rows_wg), ctid, 3,
                         256, RELEASE_PAIR, peer);
    if (own) {
      epilogue_store<C>(acc, g, t, t.row_begin + C::WG_ROWS * cw, rows_wg, stage, wtid, 1 + cw);
    }
  }
}

template <class C, class Hook>
__device__ __forceinline__ void grouped_gemm(const GroupedGemmArgs& g, const Hook& hook) {
  if (C::CLUSTER > 1 && cluster_size() != (u32)C::CLUSTER) {
    if (threadIdx.x == 0) report_error(g.error_flag, ERR_BAD_LAUNCH);
    return;  // uniform over the grid: nothing was touched yet
  }
  extern __shared__ unsigned char comet_sm90_smem[];
  const u32 raw = smem_addr(comet_sm90_smem);
  const u32 base = (raw + 1023u) & ~1023u;
  unsigned char* gbase = comet_sm90_smem + (base - raw);
  int* s_off = reinterpret_cast<int*>(gbase + C::OFF_SCHED);
  int* s_pref = s_off + (g.num_experts + 1);
  const Ring<C> ring{base};
  using Sched = GroupedScheduler<C::BM, C::BAND, C::KGROUPED, C::SWAP, C::SWAP_N>;

  if (threadIdx.x == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(ring.full(s), 1);
      mbar_init(ring.empty(s), C::EMPTY_ARRIVALS);
    }
    mbar_init_fence();
  }
  if (threadIdx.x == 32) {
    tma_prefetch_desc(&g.a);
    tma_prefetch_desc(&g.b);
    if (C::TSTORE || (C::SWAP && C::SWAP_N > 256)) tma_prefetch_desc(&g.c);
  }
  const int n_tiles = (g.n_out + C::OUT_BN - 1) / C::OUT_BN;
  Sched sched = Sched::setup(s_off, s_pref, g.expert_offsets, g.num_experts, n_tiles, g.m_out,
                             g.k, g.rows_cap, g.tile_order, g.error_flag);
  __syncthreads();
  sched.finish();
  if (C::CLUSTER == 2) {
    // The peer's barriers must be initialised before any multicast or remote arrival.
    cluster_sync();
    grouped_gemm_cluster_roles<C>(g, hook, sched, ring, base);
    // No CTA may exit while its peer can still arrive on its barriers.
    cluster_sync();
    return;
  }

  // Broadcast from lane 0 so the compiler knows the role is warp-uniform (wgmma in a
  // possibly divergent path gets serialised: ptxas C7520).
  const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) producer_loop<C>(g, sched, ring, hook);
    return;
  }
  setmaxnreg_inc<232>();
  const int cw = wg - 1;                 // consumer warpgroup 0 / 1
  const int wtid = threadIdx.x - 128 * wg;  // thread in the warpgroup
  const int ctid = threadIdx.x - 128;       // thread among both consumer warpgroups
  const u32 stage = base + C::OFF_EPI + cw * C::EPI_WG_BYTES;
  RingPos pos{0, 0};
  int seq = 0;
  for (int slot = blockIdx.x; slot < sched.total; slot += gridDim.x) {
    Tile t;
    const bool valid = __shfl_sync(0xffffffffu, (int)sched.tile(slot, t), 0) != 0;
    if (!valid) continue;
    make_warp_uniform(t);
    if (C::PINGPONG) {
      const bool mine = (seq & 1) == cw;
      ++seq;
      if (!mine) {  // the other warpgroup's tile: skip its stages
        pos.template advance<C::STAGES>((t.k_len + C::BK - 1) / C::BK);
        continue;
      }
      // Mainloops alternate strictly (ordering barriers 4: wg0 -> wg1, 5: wg1 -> wg0), so a
      // warpgroup starts waiting on its tile's stages only after the other one has passed
      // all waits of the previous tile: no wait is ever more than one phase ahead (parity
      // waits would pass spuriously otherwise). Its epilogue then overlaps the other's math.
      if (cw == 1 || seq > 1) named_barrier_sync(cw == 0 ? 5 : 4, 256);
      float acc[C::MW][C::ACC_N];
      const int active = t.rows > 64 ? 2 : 1;
      consumer_mainloop<C>(acc, ring, pos, t, 0, active, wtid, 1 + cw, 128);
      if (sched.has_tile_after(slot)) named_barrier_arrive(cw == 0 ? 4 : 5, 256);
      if constexpr (C::TSTORE) {
        epilogue_tma_store<C>(acc, g, t, cw, stage, wtid, 1 + cw);
      } else {
        epilogue_store<C>(acc, g, t, t.row_begin, t.rows, stage, wtid, 1 + cw);
      }
    } else if constexpr (C::SWAP) {
      float acc[C::SWAP_ACC];
      swap_mainloop<C>(acc, ring, pos, t, cw);
      epilogue_swap<C>(acc, g, t, cw, stage, wtid, 1 + cw);
    } else {
      float acc[C::MW][C::ACC_N];
      const int rows_wg = t.rows - C::WG_ROWS * cw;
      consumer_mainloop<C>(acc, ring, pos, t, C::MW * cw, active_mblocks<C>(rows_wg), ctid, 3,
                           256);
      if constexpr (C::TSTORE) {
        epilogue_tma_store<C>(acc, g, t, cw, stage, wtid, 1 + cw);
      } else {
        epilogue_store<C>(acc, g, t, t.row_begin + C::WG_ROWS * cw, rows_wg, stage, wtid,
                          1 + cw);
      }
    }
  }
  if constexpr (C::TSTORE) {
    // The staging tiles live in this CTA's shared memory: every store must be done with them
    // (and written) before the CTA exits.
    if (wtid == 0) bulk_wait_group<0>();
  }
}

}  // namespace comet_sm90
