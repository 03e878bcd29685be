// Persistent tile scheduler over (expert, m-tile, n-tile) for grouped GEMMs whose per-expert
// row counts live on the device (no host synchronisation).
//
// Two problem kinds:
//  * row-grouped (forward, dgrad): expert e owns rows [off[e], off[e+1]) of A and of the
//    output; its m-tiles are ceil(rows_e / BM); every expert shares the same N and K.
//  * K-grouped (wgrad): expert e's reduction runs over its rows; each expert's output is a
//    dense [m_out, n_out] block at rows e * m_out; every expert has the same tile count.
//
// Canonical order: experts in order; inside an expert, bands of BAND m-tiles; inside a
// band, n-tiles in order with the band's m-tiles fastest. Concurrent CTAs then share both
// the A rows of a band and the B columns of an n-tile through L2. A caller may impose its
// own order by passing `order` (device array of canonical tile ids): processing slot i runs
// tile order[i]; ids outside [0, total) are skipped (no loads, no stores).
//
// Every role of a CTA (producer, consumers) walks the same sequence of slots
// blockIdx.x, blockIdx.x + gridDim.x, ... and decodes the same tiles, so no tile ids travel
// through shared memory.
#pragma once
#include "sm90/ptx.cuh"

namespace comet_sm90 {

/// One output tile.
struct Tile {
  int expert;
  int m_block;    ///< m-tile index inside the expert
  int n_block;    ///< n-tile index
  int row_begin;  ///< first output row (global) of the tile
  int rows;       ///< valid output rows in the tile, 1..BM
  int k_begin;    ///< K-grouped: first reduction row (global); else 0
  int k_len;      ///< reduction length of this tile (elements)
};

/// Error codes written to the kernel's error flag (first writer wins).
enum : int {
  ERR_NONE = 0,
  ERR_HOOK_TIMEOUT = 1,   ///< a per-tile wait hook gave up
  ERR_BAD_OFFSETS = 2,    ///< expert offsets decrease
  ERR_TOO_MANY_EXPERTS = 3,
  ERR_BAD_LAUNCH = 4,     ///< cluster kernel launched without its cluster dimension
};

__device__ __forceinline__ void report_error(int* flag, int code) {
  if (flag != nullptr) atomicCAS(flag, 0, code);
}

/// Swap-AB (Config::SWAP) token chunks: an expert of r > 0 rows is split into chunks of
/// swap_chunk_rows(r, max_n) rows (the last one shorter): at most max_n (Config::SWAP_N:
/// 256 or 272), a multiple of 16, and as near-equal as that allows (max_n 256: r = 257 ->
/// 144 + 113; r = 546 -> 192 + 192 + 162; max_n 272: r = 270 -> 270 in one chunk).
/// Mirrored by the Rust launcher (comet-kernels/src/sm90/config.rs): keep them in sync.
__host__ __device__ __forceinline__ int swap_chunk_rows(int r, int max_n = 256) {
  const int n0 = (r + max_n - 1) / max_n;
  const int c = ((r + n0 - 1) / n0 + 15) & ~15;
  return c < max_n ? c : max_n;
}
/// Token chunks of an expert with r rows (0 for r <= 0).
__host__ __device__ __forceinline__ int swap_chunks(int r, int max_n = 256) {
  if (r <= 0) return 0;
  const int c = swap_chunk_rows(r, max_n);
  return (r + c - 1) / c;
}

/// Shared-memory state of the scheduler: row offsets and m-tile prefix sums, E + 1 each.
/// SWAP: an expert's "m-tiles" are its token chunks (swap_chunks) and its n-tiles the weight
/// tiles; every chunk of an n-tile is visited before the next n-tile (no bands), so the
/// chunks that share a weight tile run at about the same time.
template <int BM, int BAND, bool KGROUPED, bool SWAP = false, int SWAP_N = 256>
struct GroupedScheduler {
  const int* s_off;   // [E + 1] row offsets (copied from global)
  const int* s_pref;  // [E + 1] exclusive prefix of m-tiles (SWAP: chunks) per expert
  const int* order;   // optional tile order (global)
  int num_experts;
  int n_tiles;        // n-tiles per expert
  int m_tiles_fixed;  // K-grouped: m-tiles per expert
  int m_out;          // K-grouped: output rows per expert
  int k;              // row-grouped: reduction length
  int total;          // total tiles

  /// Fills the shared arrays (all threads of the CTA call it; warp 0 works) and returns
  /// the scheduler. A __syncthreads() must follow before any decode.
  static __device__ __forceinline__ GroupedScheduler setup(int* smem_off, int* smem_pref,
                                                           const int* __restrict__ offsets,
                                                           int num_experts, int n_tiles,
                                                           int m_out, int k, int rows_cap,
                                                           const int* order, int* err) {
    GroupedScheduler s;
    s.s_off = smem_off;
    s.s_pref = smem_pref;
    s.order = order;
    s.num_experts = num_experts;
    s.n_tiles = n_tiles;
    s.m_out = m_out;
    s.k = k;
    s.m_tiles_fixed = KGROUPED ? (m_out + BM - 1) / BM : 0;
    const u32 warp = threadIdx.x / 32;
    const u32 lane = threadIdx.x % 32;
    if (warp == 0) {
      int carry = 0;
      for (int base = 0; base < num_experts; base += 32) {
        const int e = base + (int)lane;
        int mt = 0;
        if (e < num_experts) {
          // Offsets outside [0, rows_cap] or decreasing are an error; clamped, they can
          // never make a load or store leave the tensors.
          const int r0 = offsets[e];
          const int r1 = offsets[e + 1];
          const int o0 = min(max(r0, 0), rows_cap);
          const int o1 = min(max(r1, 0), rows_cap);
          smem_off[e] = o0;
          if (r0 != o0 || r1 != o1 || o1 < o0) report_error(err, ERR_BAD_OFFSETS);
          mt = SWAP ? swap_chunks(o1 - o0, SWAP_N) : o1 > o0 ? (o1 - o0 + BM - 1) / BM : 0;
        }
        int incl = mt;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int v = __shfl_up_sync(0xffffffffu, incl, d);
          if ((int)lane >= d) incl += v;
        }
        if (e < num_experts) smem_pref[e] = carry + incl - mt;
        carry += __shfl_sync(0xffffffffu, incl, 31);
      }
      if (lane == 0) {
        smem_pref[num_experts] = carry;
        smem_off[num_experts] = min(max(offsets[num_experts], 0), rows_cap);
      }
    }
    // `total` needs the prefix; computed after the barrier by `finish`.
    s.total = 0;
    return s;
  }

  /// Call after the __syncthreads() that follows setup().
  __device__ __forceinline__ void finish() {
    const int tot =
        KGROUPED ? num_experts * m_tiles_fixed * n_tiles : s_pref[num_experts] * n_tiles;
    total = __shfl_sync(0xffffffffu, tot, 0);
  }

  /// True if this CTA has a valid tile in a slot after `slot`.
  __device__ __forceinline__ bool has_tile_after(int slot) const {
    for (int s = slot + (int)gridDim.x; s < total; s += (int)gridDim.x) {
      const int c = order != nullptr ? order[s] : s;
      if (c >= 0 && c < total) return true;
    }
    return false;
  }

  /// Decodes processing slot `slot` (< total). Returns false if the slot is skipped.
  __device__ __forceinline__ bool tile(int slot, Tile& t) const {
    const int c = order != nullptr ? order[slot] : slot;
    if (c < 0 || c >= total) return false;
    int e, local, mt;
    if (KGROUPED) {
      const int per_e = m_tiles_fixed * n_tiles;
      e = c / per_e;
      local = c - e * per_e;
      mt = m_tiles_fixed;
    } else {
      // Last expert with s_pref[e] <= q (experts with no tiles are skipped naturally).
      const int q = c / n_tiles;
      int lo = 0, hi = num_experts;  // invariant: s_pref[lo] <= q < s_pref[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (s_pref[mid] <= q) lo = mid; else hi = mid;
      }
      e = lo;
      local = c - s_pref[e] * n_tiles;
      mt = s_pref[e + 1] - s_pref[e];
    }
    if (SWAP) {
      const int r = s_off[e + 1] - s_off[e];
      const int n = local / mt;
      const int m = local - n * mt;
      const int cs = swap_chunk_rows(r, SWAP_N);
      t.expert = e;
      t.m_block = m;
      t.n_block = n;
      t.row_begin = s_off[e] + m * cs;
      t.rows = min(cs, r - m * cs);  // >= 1 (swap_chunks)
      t.k_begin = 0;
      t.k_len = k;
      return true;
    }
    const int band = local / (BAND * n_tiles);
    const int r = local - band * BAND * n_tiles;
    const int g = min(BAND, mt - band * BAND);
    // The even part of the band goes n by n with m fastest (so pairs of consecutive tiles
    // share their weight tile); an odd band's last m-tile follows for all n.
    const int ge = g & ~1;
    int n, m;
    if (r < ge * n_tiles) {
      n = r / ge;
      m = band * BAND + (r - n * ge);
    } else {
      n = r - ge * n_tiles;
      m = band * BAND + g - 1;
    }
    t.expert = e;
    t.m_block = m;
    t.n_block = n;
    if (KGROUPED) {
      t.row_begin = e * m_out + m * BM;
      t.rows = min(BM, m_out - m * BM);
      t.k_begin = s_off[e];
      t.k_len = s_off[e + 1] - s_off[e];
      if (t.k_len < 0) t.k_len = 0;
    } else {
      t.row_begin = s_off[e] + m * BM;
      t.rows = min(BM, s_off[e + 1] - t.row_begin);  // >= 1: mt > 0 implies o1 > o0
      t.k_begin = 0;
      t.k_len = k;
    }
    return true;
  }
};

/// Broadcasts a decoded tile from lane 0 (all 32 lanes must be active). The values are
/// already identical in every lane; this tells the compiler they are warp-uniform, which
/// wgmma issued under conditions on them needs (else ptxas serialises it: C7520).
__device__ __forceinline__ void make_warp_uniform(Tile& t) {
  t.expert = __shfl_sync(0xffffffffu, t.expert, 0);
  t.m_block = __shfl_sync(0xffffffffu, t.m_block, 0);
  t.n_block = __shfl_sync(0xffffffffu, t.n_block, 0);
  t.row_begin = __shfl_sync(0xffffffffu, t.row_begin, 0);
  t.rows = __shfl_sync(0xffffffffu, t.rows, 0);
  t.k_begin = __shfl_sync(0xffffffffu, t.k_begin, 0);
  t.k_len = __shfl_sync(0xffffffffu, t.k_len, 0);
}

/// Per-tile wait hook that never waits (plain grouped GEMM).
struct NoWait {
  int unused;
  __device__ __forceinline__ bool wait(const Tile&) const { return true; }
};

/// Per-tile wait hook on device flags, one per (expert, m-tile): the tile waits until
/// flags[expert * max_m_tiles + m_block] - epoch >= 0 (wrapping compare), giving up after
/// timeout_ns; the kernel then reports ERR_HOOK_TIMEOUT and proceeds, so the host sees an
/// error instead of a hang.
struct FlagWait {
  const volatile unsigned int* flags;  ///< [num_experts * max_m_tiles]
  unsigned int epoch;                  ///< value a ready flag holds (or exceeds)
  int max_m_tiles;                     ///< flags per expert
  unsigned long long timeout_ns;
  __device__ __forceinline__ bool wait(const Tile& t) const {
    const volatile unsigned int* f = flags + (long long)t.expert * max_m_tiles + t.m_block;
    if ((int)(*f - epoch) >= 0) return true;
    const u64 start = global_timer_ns();
    while ((int)(*f - epoch) < 0) {
      if (global_timer_ns() - start > timeout_ns) return false;
      __nanosleep(64);
    }
    // Acquire: later TMA loads of the tile must see the data the flag guards.
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
    return true;
  }
};

}  // namespace comet_sm90
