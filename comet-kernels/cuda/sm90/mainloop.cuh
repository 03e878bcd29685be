// Warp-specialised mainloop: one producer thread issues TMA loads into a STAGES-deep ring of
// shared-memory stages (full/empty mbarrier pairs); consumer warpgroups issue wgmma on them.
//
// Ring protocol (per stage s, phase bit toggling each time the ring wraps):
//   producer: wait empty[s] (parity ^ 1) -> arrive.expect_tx full[s] -> TMA loads on full[s]
//   consumer: wait full[s] (parity) -> wgmma -> after the wgmma reading s completed, lane 0
//             of every consuming warp arrives on empty[s].
// Every role walks the same tile sequence and each tile consumes ceil(k_len / 64) stages, so
// ring positions agree without any other communication.
#pragma once
#include "sm90/config.cuh"
#include "sm90/scheduler.cuh"
#include "sm90/wgmma.cuh"

namespace comet_sm90 {

/// Position in the ring.
struct RingPos {
  int stage;
  u32 phase;
  template <int STAGES>
  __device__ __forceinline__ void advance(int n) {
    const int s = stage + n;
    const int wraps = s / STAGES;
    stage = s - wraps * STAGES;
    phase ^= (u32)(wraps & 1);
  }
};

/// Shared-memory addresses of the ring.
template <class C>
struct Ring {
  u32 base;  // 1024-aligned
  __device__ __forceinline__ u32 a(int s) const { return base + C::OFF_A + s * C::A_STAGE_BYTES; }
  __device__ __forceinline__ u32 b(int s) const { return base + C::OFF_B + s * C::B_STAGE_BYTES; }
  __device__ __forceinline__ u32 full(int s) const { return base + C::OFF_BAR + 8 * s; }
  __device__ __forceinline__ u32 empty(int s) const {
    return base + C::OFF_BAR + 8 * C::STAGES + 8 * s;
  }
};

template <int POLICY>
__device__ __forceinline__ u64 make_policy() {
  if (POLICY == 1) return l2_policy_evict_first();
  if (POLICY == 2) return l2_policy_evict_last();
  u64 p;
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
  return p;
}

/// Issues the TMA loads of k-block `kb` of tile `t` into stage `s` (one thread).
/// `mc`: the weight tile is shared with the peer CTA of a 2-CTA cluster; this CTA loads only
/// its half (`rank`) and multicasts it to both (the peer loads the other half).
template <class C>
__device__ __forceinline__ void load_stage(const GroupedGemmArgs& g, const Ring<C>& ring,
                                           int s, const Tile& t, int kb, u64 pol_a, u64 pol_b,
                                           bool mc = false, int rank = 0) {
  const u32 bar = ring.full(s);
  const u32 sa = ring.a(s);
  const u32 sb = ring.b(s);
  if (C::SWAP) {
    // wgmma's A: 128 weight rows; B: the chunk's tokens in boxes of SWAP_BOX_ROWS rows (the
    // rows past the chunk that wgmma's N rounds up to are loaded too, and never stored).
    const int kc = kb * C::BK;
    const int rows0 = t.rows < 256 ? t.rows : 256;  // tokens in SWAP_BOX_ROWS boxes
    const int boxes = (rows0 + C::SWAP_BOX_ROWS - 1) / C::SWAP_BOX_ROWS;
    const bool tail16 = C::SWAP_N > 256 && t.rows > 256;  // tokens 256..271 (g.c)
    mbar_arrive_expect_tx(bar, C::A_STAGE_BYTES + boxes * C::SWAP_BOX_ROWS * C::BK * 2 +
                                   (tail16 ? 16 * C::BK * 2 : 0));
    if (C::MODE == MODE_FWD && C::EPI == EPI_SWIGLU) {
      // 8 groups of {8 gate rows, the same 8 up rows}, 2 KiB each, in one box {64, 8, 2, 8, 1}
      // of the 5D view {K, 8, part, Nh / 8, E}
      tma_load_5d(sa, &g.b, bar, kc, 0, 0, t.n_block * 8, t.expert, pol_b);
    } else if (C::MODE == MODE_FWD) {
      tma_load_4d(sa, &g.b, bar, kc, t.n_block * 128, 0, t.expert, pol_b);  // box {64, 128}
    } else {
      // dgrad: B [e][N][Kout] M-major, two boxes of 64 Kout columns x 64 reduction rows
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        tma_load_3d(sa + j * 8192, &g.b, bar, t.n_block * 128 + 64 * j, kc, t.expert, pol_b);
      }
    }
    for (int i = 0; i < boxes; ++i) {
      tma_load_2d(sb + i * (C::SWAP_BOX_ROWS * 128), &g.a, bar, kc,
                  t.row_begin + C::SWAP_BOX_ROWS * i, pol_a);
    }
    if (tail16) tma_load_2d(sb + 256 * 128, &g.c, bar, kc, t.row_begin + 256, pol_a);
    return;
  }
  mbar_arrive_expect_tx(bar, C::STAGE_BYTES);
  if (C::MODE == MODE_FWD) {
    const int kc = kb * C::BK;
#pragma unroll
    for (int j = 0; j < C::BM / 128; ++j) {  // A boxes of 128 rows
      tma_load_2d(sa + j * 16384, &g.a, bar, kc, t.row_begin + 128 * j, pol_a);
    }
    constexpr int BH = C::BN / 2;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // half h: SwiGLU = gate (part 0) / up (part 1) rows of the n-tile; else rows h*BH..
      const int row = C::EPI == EPI_SWIGLU ? t.n_block * BH : t.n_block * C::BN + h * BH;
      const int part = C::EPI == EPI_SWIGLU ? h : 0;
      if (!mc) {
        tma_load_4d(sb + h * BH * 128, &g.b, bar, kc, row, part, t.expert, pol_b);
      } else if (h == rank) {
        tma_load_4d_mc(sb + h * BH * 128, &g.b, bar, kc, row, part, t.expert, 3, pol_b);
      }
    }
  } else if (C::MODE == MODE_DGRAD) {
    const int kc = kb * C::BK;
#pragma unroll
    for (int j = 0; j < C::BM / 128; ++j) {
      tma_load_2d(sa + j * 16384, &g.a, bar, kc, t.row_begin + 128 * j, pol_a);
    }
    constexpr int NB = C::BN / 64;  // 64-column blocks of B
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (!mc) {
        tma_load_3d(sb + j * 8192, &g.b, bar, t.n_block * C::BN + 64 * j, kc, t.expert, pol_b);
      } else if (j / (NB / 2) == rank) {
        tma_load_3d_mc(sb + j * 8192, &g.b, bar, t.n_block * C::BN + 64 * j, kc, t.expert, 3,
                       pol_b);
      }
    }
  } else {  // MODE_WGRAD: reduction over rows k_begin + kb*64 ..
    const int kr = t.k_begin + kb * C::BK;
    const int m0 = t.m_block * C::BM;
#pragma unroll
    for (int j = 0; j < C::BM / 64; ++j) {
      tma_load_2d(sa + j * 8192, &g.a, bar, m0 + 64 * j, kr, pol_a);
    }
#pragma unroll
    for (int j = 0; j < C::BN / 64; ++j) {
      tma_load_2d(sb + j * 8192, &g.b, bar, t.n_block * C::BN + 64 * j, kr, pol_b);
    }
  }
}

/// Producer: one thread walks this CTA's tiles and fills the ring.
/// `Hook::wait(tile)` runs before a tile's first load (false = timed out: the error flag is
/// set and the tile proceeds, so consumers never hang).
template <class C, class Sched, class Hook>
__device__ __forceinline__ void producer_loop(const GroupedGemmArgs& g, const Sched& sched,
                                              const Ring<C>& ring, const Hook& hook) {
  const u64 pol_a = make_policy<C::L2HINT == 1 ? 2 : 0>();
  const u64 pol_b = make_policy<C::L2HINT == 1 ? 1 : 0>();
  RingPos pos{0, 0};
  for (int slot = blockIdx.x; slot < sched.total; slot += gridDim.x) {
    Tile t;
    if (!sched.tile(slot, t)) continue;
    if (!hook.wait(t)) report_error(g.error_flag, ERR_HOOK_TIMEOUT);
    const int kbs = (t.k_len + C::BK - 1) / C::BK;
    for (int kb = 0; kb < kbs; ++kb) {
      mbar_wait(ring.empty(pos.stage), pos.phase ^ 1u);
      load_stage<C>(g, ring, pos.stage, t, kb, pol_a, pol_b);
      pos.template advance<C::STAGES>(1);
    }
  }
}

/// A pair of consecutive tile slots taken by the two CTAs of a cluster.
struct TilePair {
  Tile own;         ///< this CTA's tile (valid if own_valid)
  bool own_valid;
  bool peer_valid;
  bool shared_b;    ///< both valid with the same expert and n-tile: B is multicast
  int kbs;          ///< k-blocks of the pair (equal for both tiles when both are valid)
};

template <class Sched>
__device__ __forceinline__ TilePair decode_pair(const Sched& sched, int u, int rank) {
  Tile t0, t1;
  const bool v0 = sched.tile(2 * u, t0);
  const bool v1 = 2 * u + 1 < sched.total && sched.tile(2 * u + 1, t1);
  TilePair p;
  p.own = rank == 0 ? t0 : t1;
  p.own_valid = rank == 0 ? v0 : v1;
  p.peer_valid = rank == 0 ? v1 : v0;
  p.shared_b = v0 && v1 && t0.expert == t1.expert && t0.n_block == t1.n_block;
  const int k0 = v0 ? t0.k_len : 0;
  const int k1 = v1 ? t1.k_len : 0;
  p.kbs = (max(k0, k1) + 63) / 64;
  return p;
}

/// Producer of a 2-CTA cluster. Both CTAs walk the same pairs; each fills its ring for its own
/// tile (multicasting its half of a shared weight tile). A CTA whose slot of the pair is
/// empty while the peer's is not runs the pair's k-blocks without loads, so that the ring
/// positions of both CTAs stay equal (a multicast lands at the same stage in both).
template <class C, class Sched, class Hook>
__device__ __forceinline__ void producer_loop_cluster(const GroupedGemmArgs& g,
                                                      const Sched& sched, const Ring<C>& ring,
                                                      const Hook& hook, int rank) {
  const u64 pol_a = make_policy<C::L2HINT == 1 ? 2 : 0>();
  const u64 pol_b = make_policy<C::L2HINT == 1 ? 1 : 0>();
  RingPos pos{0, 0};
  const int npairs = (sched.total + 1) / 2;
  for (int u = (int)cluster_id_x(); u < npairs; u += (int)cluster_count_x()) {
    const TilePair pr = decode_pair(sched, u, rank);
    if (!pr.own_valid && !pr.peer_valid) continue;
    if (pr.own_valid && !hook.wait(pr.own)) report_error(g.error_flag, ERR_HOOK_TIMEOUT);
    for (int kb = 0; kb < pr.kbs; ++kb) {
      mbar_wait(ring.empty(pos.stage), pos.phase ^ 1u);
      if (pr.own_valid) {
        load_stage<C>(g, ring, pos.stage, pr.own, kb, pol_a, pol_b, pr.shared_b, rank);
      } else {
        mbar_arrive(ring.full(pos.stage));  // empty stage: completes the phase, no bytes
      }
      pos.template advance<C::STAGES>(1);
    }
  }
}

/// wgmma descriptors of stage s for m64 block `ablk` of A and all of B, k16 step kk.
template <class C>
__device__ __forceinline__ u64 desc_a(const Ring<C>& ring, int s, int ablk, int kk) {
  const u32 addr = ring.a(s) + ablk * 8192;
  if (C::A_MN) return smem_desc_mnmajor_sw128(addr + kk * 2048, 8192, 1024);
  return smem_desc_kmajor_sw128(addr + kk * 32);
}
template <class C>
__device__ __forceinline__ u64 desc_b(const Ring<C>& ring, int s, int kk) {
  const u32 addr = ring.b(s);
  if (C::B_MN) return smem_desc_mnmajor_sw128(addr + kk * 2048, 8192, 1024);
  return smem_desc_kmajor_sw128(addr + kk * 32);
}

/// K-grouped tail: rows >= valid of stage s hold another expert's data (or TMA's zero fill).
/// The tail k-block issues only the k16 steps that hold valid rows (see kgrouped_steps), so
/// only the rows from `valid` up to the next multiple of 16 are zeroed, in both operands
/// (generic stores, then a proxy fence so wgmma sees them). Called by every thread that
/// consumes the stage; `nthreads` of them, `tid` in [0, nthreads).
template <class C>
__device__ __forceinline__ void zero_tail_rows(const Ring<C>& ring, int s, int valid, int tid,
                                               int nthreads) {
  constexpr int ABLK = C::BM / 64;        // A's 8 KiB blocks
  constexpr int BLOCKS = ABLK + C::BN / 64;  // 8 KiB blocks of 64 rows x 128 bytes
  const int rows = ((valid + 15) & ~15) - valid;
  const int chunks = BLOCKS * rows * 8;  // 16-byte chunks to clear
  for (int i = tid; i < chunks; i += nthreads) {
    const int blk = i / (rows * 8);
    const int rem = i - blk * rows * 8;
    const int row = valid + rem / 8;
    const int c16 = rem % 8;
    const u32 addr = (blk < ABLK ? ring.a(s) + blk * 8192 : ring.b(s) + (blk - ABLK) * 8192) +
                     row * 128 + c16 * 16;
    asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};" ::"r"(addr), "r"(0) : "memory");
  }
  fence_proxy_async_smem();
}

/// k16 steps of a k-block with `valid` reduction rows left (K-grouped: fewer in an expert's
/// tail k-block; else always BK / 16).
template <class C>
__device__ __forceinline__ int kgrouped_steps(int valid) {
  return C::KGROUPED && valid < C::BK ? (valid + 15) / 16 : C::BK / 16;
}

/// Issues the wgmma of one k-block for MB m64 blocks (A blocks ablk0..) and its first NK k16
/// steps, commits them and waits for the previous k-block's group.
template <class C, int MB, int NK>
__device__ __forceinline__ void mma_kblock(float (&acc)[C::MW][C::ACC_N], const Ring<C>& ring,
                                           int s, int ablk0, int kb) {
  wgmma_fence();
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      Wgmma<C::BN, C::IN_F16, C::A_MN ? 1 : 0, C::B_MN ? 1 : 0>::mma(
          acc[mb], desc_a<C>(ring, s, ablk0 + mb, kk), desc_b<C>(ring, s, kk), (kb | kk) != 0);
    }
  }
  wgmma_commit();
  wgmma_wait<1>();
}

/// mma_kblock with a warp-uniform step count `nk` in 1..BK/16 (each case holds its own
/// fence ... wait, so that no wgmma sits behind a branch after its fence: ptxas C7519).
template <class C, int MB>
__device__ __forceinline__ void mma_kblock_steps(float (&acc)[C::MW][C::ACC_N],
                                                 const Ring<C>& ring, int s, int ablk0, int kb,
                                                 int nk) {
  static_assert(C::BK == 64, "four k16 steps per k-block");
  if (!C::KGROUPED || nk >= 4) {
    mma_kblock<C, MB, 4>(acc, ring, s, ablk0, kb);
  } else if (nk == 3) {
    mma_kblock<C, MB, 3>(acc, ring, s, ablk0, kb);
  } else if (nk == 2) {
    mma_kblock<C, MB, 2>(acc, ring, s, ablk0, kb);
  } else {
    mma_kblock<C, MB, 1>(acc, ring, s, ablk0, kb);
  }
}

/// Consumer mainloop for one tile: accumulates acc[mb] (m64 block mb of this warpgroup's
/// rows) over the tile's k-blocks. `ablk0` is the first A block this warpgroup reads,
/// `mblocks_active` how many of its MW m64 blocks hold valid rows (0 = wait/release only).
/// `bar_id`/`bar_threads`: the named barrier among the threads consuming a stage (used by
/// the K-grouped tail).
/// How a consuming warp frees a stage.
enum : int {
  RELEASE_LOCAL = 0,  ///< one arrival on this CTA's empty barrier
  RELEASE_PAIR = 1,   ///< 2-CTA cluster: one here, one on the peer CTA's barrier
};

template <class C>
__device__ __forceinline__ void release_stage(const Ring<C>& ring, int s, int mode, u32 peer) {
  if (mode == RELEASE_LOCAL) {
    mbar_arrive(ring.empty(s));
  } else {
    mbar_arrive(ring.empty(s));
    mbar_arrive_remote(ring.empty(s), peer);
  }
}

template <class C>
__device__ __forceinline__ void consumer_mainloop(float (&acc)[C::MW][C::ACC_N],
                                                  const Ring<C>& ring, RingPos& pos,
                                                  const Tile& t, int ablk0, int mblocks_active,
                                                  int ctid, int bar_id, int bar_threads,
                                                  int release_mode = RELEASE_LOCAL,
                                                  u32 peer = 0) {
  const int kbs = (t.k_len + C::BK - 1) / C::BK;
  const u32 lane = threadIdx.x % 32;
  int prev = 0;
  for (int kb = 0; kb < kbs; ++kb) {
    mbar_wait(ring.full(pos.stage), pos.phase);
    const int valid = t.k_len - kb * C::BK;  // reduction rows left (K-grouped tail: < BK)
    if (C::KGROUPED && valid < C::BK && (valid & 15) != 0) {
      zero_tail_rows<C>(ring, pos.stage, valid, ctid, bar_threads);
      named_barrier_sync(bar_id, bar_threads);
    }
    const int nk = kgrouped_steps<C>(valid);
    if (mblocks_active >= C::MW) {
      mma_kblock_steps<C, C::MW>(acc, ring, pos.stage, ablk0, kb, nk);
    } else if (C::MW > 1 && mblocks_active >= 1) {  // ping-pong tile with <= 64 valid rows
      mma_kblock_steps<C, 1>(acc, ring, pos.stage, ablk0, kb, nk);
    }
    if (kb > 0 && lane == 0) release_stage<C>(ring, prev, release_mode, peer);
    prev = pos.stage;
    pos.template advance<C::STAGES>(1);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int mb = 0; mb < C::MW; ++mb) {
#pragma unroll
    for (int i = 0; i < C::ACC_N; ++i) reg_fence(acc[mb][i]);
  }
  if (kbs > 0 && lane == 0) release_stage<C>(ring, prev, release_mode, peer);
  if (kbs == 0) {  // empty reduction (expert with no rows): the product is zero
#pragma unroll
    for (int mb = 0; mb < C::MW; ++mb) {
#pragma unroll
      for (int i = 0; i < C::ACC_N; ++i) acc[mb][i] = 0.f;
    }
  }
}

/// Swap-AB consumer mainloop with wgmma N = N_ (the tile's chunk rounded up to 16): the
/// warpgroup's 64 weight rows (A block `ablk`) times the chunk's tokens. Past N = 256 (only
/// Config::SWAP_N = 272) each k16 step issues a second wgmma for tokens 256 .. N_ on the
/// same weight rows, into acc[128 ..]. acc[N_/2 ..] are left as they are (columns past the
/// chunk, never stored).
template <class C, int N_>
__device__ __forceinline__ void swap_mainloop_n(float (&acc)[C::SWAP_ACC], const Ring<C>& ring,
                                                RingPos& pos, int kbs, int ablk) {
  constexpr int N1 = N_ < 256 ? N_ : 256;  // first wgmma: tokens 0 .. N1
  constexpr int N2 = N_ - N1;              // second wgmma: tokens 256 .. N_ (or none)
  static_assert(N_ % 16 == 0 && N_ <= C::SWAP_N, "swap-AB wgmma N");
  float(&d)[N1 / 2] = *reinterpret_cast<float(*)[N1 / 2]>(&acc[0]);
  // (N2 = 0: an alias of d that is never used)
  float(&d2)[N2 > 0 ? N2 / 2 : 1] =
      *reinterpret_cast<float(*)[N2 > 0 ? N2 / 2 : 1]>(&acc[N2 > 0 ? 128 : 0]);
  const u32 lane = threadIdx.x % 32;
  int prev = 0;
  for (int kb = 0; kb < kbs; ++kb) {
    mbar_wait(ring.full(pos.stage), pos.phase);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C::BK / 16; ++kk) {
      const u64 da = desc_a<C>(ring, pos.stage, ablk, kk);
      Wgmma<N1, C::IN_F16, C::A_MN ? 1 : 0, 0>::mma(d, da, desc_b<C>(ring, pos.stage, kk),
                                                    (kb | kk) != 0);
      if constexpr (N2 > 0) {
        // tokens 256..: 256 rows x 128 bytes further into the stage's token part (a whole
        // number of 1024-byte swizzle atoms, so the same descriptor form applies)
        Wgmma<N2, C::IN_F16, C::A_MN ? 1 : 0, 0>::mma(
            d2, da, smem_desc_kmajor_sw128(ring.b(pos.stage) + 256 * 128 + kk * 32),
            (kb | kk) != 0);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();
    if (kb > 0 && lane == 0) release_stage<C>(ring, prev, RELEASE_LOCAL, 0);
    prev = pos.stage;
    pos.template advance<C::STAGES>(1);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < N1 / 2; ++i) reg_fence(d[i]);
  if constexpr (N2 > 0) {
#pragma unroll
    for (int i = 0; i < N2 / 2; ++i) reg_fence(d2[i]);
  }
  if (kbs > 0 && lane == 0) release_stage<C>(ring, prev, RELEASE_LOCAL, 0);
  if (kbs == 0) {  // K = 0: the product is zero
#pragma unroll
    for (int i = 0; i < N_ / 2; ++i) acc[i] = 0.f;
  }
}

/// Swap-AB consumer mainloop for tile t: dispatches on the chunk's wgmma N (a multiple of
/// 16; one instantiation each, so the branch is taken once per tile and is warp-uniform).
template <class C>
__device__ __forceinline__ void swap_mainloop(float (&acc)[C::SWAP_ACC], const Ring<C>& ring,
                                              RingPos& pos, const Tile& t, int cw) {
  const int kbs = (t.k_len + C::BK - 1) / C::BK;
  switch ((t.rows + 15) / 16) {
#define COMET_SWAP_CASE(I) \
  case I:                  \
    swap_mainloop_n<C, 16 * I>(acc, ring, pos, kbs, cw); \
    break;
    COMET_SWAP_CASE(1) COMET_SWAP_CASE(2) COMET_SWAP_CASE(3) COMET_SWAP_CASE(4)
    COMET_SWAP_CASE(5) COMET_SWAP_CASE(6) COMET_SWAP_CASE(7) COMET_SWAP_CASE(8)
    COMET_SWAP_CASE(9) COMET_SWAP_CASE(10) COMET_SWAP_CASE(11) COMET_SWAP_CASE(12)
    COMET_SWAP_CASE(13) COMET_SWAP_CASE(14) COMET_SWAP_CASE(15)
#undef COMET_SWAP_CASE
    case 16:
      swap_mainloop_n<C, 256>(acc, ring, pos, kbs, cw);
      break;
    default:  // 17: only with SWAP_N = 272 (chunks never pass SWAP_N)
      swap_mainloop_n<C, C::SWAP_N>(acc, ring, pos, kbs, cw);
      break;
  }
}

}  // namespace comet_sm90
