// Epilogue: f32 accumulators -> optional activation (SwiGLU / GeLU) -> optional per-row
// scale -> bf16/f16, staged through a padded shared-memory tile of 64 rows x 64 columns per
// warpgroup, then written with 16-byte stores. Rows past the tile's valid rows (an expert's
// end) and columns past n_out are never written.
//
// Variants (Config): OUT_F32 stores f32 straight from the accumulator fragments (each quad
// of lanes writes 32 contiguous bytes of a row with 8-byte stores: whole sectors, no
// staging) and, with ACCUM, adds the values already there; AUX also stores the
// pre-activation through the same staging tile.
#pragma once
#include "sm90/config.cuh"
#include "sm90/scheduler.cuh"

namespace comet_sm90 {

/// silu(g) = g / (1 + e^-g) with the fast division (MUFU.RCP + FMUL): the IEEE `/` put a
/// range check and a slow-path call per element into the epilogue (64 per tile and thread).
/// For g < -88, e^-g is inf and the quotient 0, the limit.
__device__ __forceinline__ float silu_f(float g) { return __fdividef(g, 1.0f + __expf(-g)); }
__device__ __forceinline__ float gelu_erf_f(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

template <class C>
__device__ __forceinline__ u32 pack_out(float lo, float hi) {
  return C::OUT_F16 ? pack_f16x2(lo, hi) : pack_bf16x2(lo, hi);
}

/// The pre-activation in the input's 16-bit type.
template <class C>
__device__ __forceinline__ u32 pack_in(float lo, float hi) {
  return C::IN_F16 ? pack_f16x2(lo, hi) : pack_bf16x2(lo, hi);
}

/// Where a thread's accumulator fragment sits in an m64 wgmma block: rows r_lo and r_lo + 8
/// (both equal to lane / 4 modulo 8), columns cpair, cpair + 1 of every 8-column group.
struct FragPos {
  int r_lo;
  int cpair;
};
__device__ __forceinline__ FragPos frag_pos(int wtid) {
  const int warp = wtid / 32;
  const int lane = wtid % 32;
  return FragPos{16 * warp + lane / 4, 2 * (lane % 4)};
}

/// Accumulator `i` of an m64 block after the epilogue's activation (SwiGLU pairs it with the
/// up projection ACC_N / 2 further on).
template <class C>
__device__ __forceinline__ float activated(const float (&a)[C::ACC_N], int i) {
  float x = a[i];
  if (C::EPI == EPI_SWIGLU) x = silu_f(x) * a[i + C::ACC_N / 2];
  if (C::EPI == EPI_GELU) x = gelu_erf_f(x);
  return x;
}

/// Row scales of a thread's two fragment rows (1 without g.row_scale or past rows_blk).
__device__ __forceinline__ void row_scales(const GroupedGemmArgs& g, int grow0, int r_lo,
                                           int rows_blk, float& s0, float& s1) {
  s0 = 1.0f;
  s1 = 1.0f;
  if (g.row_scale != nullptr) {
    if (r_lo < rows_blk) s0 = g.row_scale[grow0 + r_lo];
    if (r_lo + 8 < rows_blk) s1 = g.row_scale[grow0 + r_lo + 8];
  }
}

/// Staging -> global for one 64-column chunk of 16-bit values: 64 rows x 8 chunks of 16
/// bytes, 4 per thread, a row per 8 lanes (CHUNKS = 4: 32 columns, 2 per thread). (The main
/// store in epilogue_store keeps its own copy of this loop: routing it through here changes
/// the SASS of the default kernels, which are the ones measured on the H200s.) Output column
/// gcol0 + c (c < 8 CHUNKS) of row grow0 + r lands at
/// base[(grow0 + r) * ld + col_offset + gcol0 + c]; rows r >= rows_blk and columns
/// gcol0 + c >= n_out are skipped.
template <class C, int CHUNKS = 8>
__device__ __forceinline__ void staged_to_global(u32 stage, char* base, int ld, int col_offset,
                                                 int n_out, int grow0, int rows_blk, int gcol0,
                                                 int wtid) {
  static_assert(CHUNKS == 8 || CHUNKS == 4, "64 or 32 staged columns");
#pragma unroll
  for (int it = 0; it < CHUNKS / 2; ++it) {
    const int id = wtid + 128 * it;
    const int row = id / CHUNKS;
    const int c16 = id % CHUNKS;
    const int gcol = gcol0 + c16 * 8;
    if (row < rows_blk && gcol < n_out) {
      u32 x0, x1, x2, x3;
      ld_shared_v4(stage + row * C::EPI_PITCH + c16 * 16, x0, x1, x2, x3);
      char* dst = base + ((long long)(grow0 + row) * ld + col_offset + gcol) * 2;
      if (gcol + 8 <= n_out) {
        st_global_v4(dst, x0, x1, x2, x3);
      } else {
        // Ragged right edge (n_out not a multiple of 8): element stores.
        const int n = n_out - gcol;
#pragma unroll
        for (int e = 0; e < 7; ++e) {
          if (e < n) {
            const u32 w = e < 2 ? x0 : e < 4 ? x1 : e < 6 ? x2 : x3;
            const unsigned short h = (unsigned short)(w >> (16 * (e % 2)));
            asm volatile("st.global.b16 [%0], %1;" ::"l"(dst + 2 * e), "h"(h) : "memory");
          }
        }
      }
    }
  }
}

/// f32 output (Config::OUT_F32): fragment pairs (2 consecutive columns) go straight to
/// global memory with 8-byte stores (n_out and ldo are multiples of 8, out is 16-byte
/// aligned, so a pair never straddles n_out and every store is aligned). With ACCUM the
/// chunk's previous values are loaded first (all loads in flight together), then added.
template <class C>
__device__ __forceinline__ void epilogue_store_f32(const float (&acc)[C::MW][C::ACC_N],
                                                   const GroupedGemmArgs& g, const Tile& t,
                                                   int row0, int rows_wg, int wtid) {
  if (C::ACCUM && t.k_len == 0) return;  // nothing to add: the output stays bit for bit
  const FragPos f = frag_pos(wtid);
  const int r_lo = f.r_lo;
  const int cpair = f.cpair;
  float* out = reinterpret_cast<float*>(g.out);
  const int col_tile = t.n_block * C::OUT_BN;
#pragma unroll
  for (int mb = 0; mb < C::MW; ++mb) {
    const int rows_blk = rows_wg - 64 * mb;
    if (rows_blk <= 0) break;
    const int grow0 = row0 + 64 * mb;
    float s0, s1;
    row_scales(g, grow0, r_lo, rows_blk, s0, s1);
    const bool ok0 = r_lo < rows_blk;
    const bool ok1 = r_lo + 8 < rows_blk;
    float* p0 = out + (long long)(grow0 + r_lo) * g.ldo;
    float* p1 = out + (long long)(grow0 + r_lo + 8) * g.ldo;
#pragma unroll
    for (int chunk = 0; chunk < C::OUT_BN / 64; ++chunk) {
      float2 old0[8], old1[8];
      if (C::ACCUM) {
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int col = col_tile + chunk * 64 + 8 * jj + cpair;
          old0[jj] = make_float2(0.f, 0.f);
          old1[jj] = make_float2(0.f, 0.f);
          if (col < g.n_out) {
            if (ok0) old0[jj] = *reinterpret_cast<const float2*>(p0 + col);
            if (ok1) old1[jj] = *reinterpret_cast<const float2*>(p1 + col);
          }
        }
      }
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int j = chunk * 8 + jj;  // 8-column group in the accumulator
        const int col = col_tile + chunk * 64 + 8 * jj + cpair;
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = activated<C>(acc[mb], 4 * j + q);
        float2 w0 = make_float2(v[0] * s0, v[1] * s0);
        float2 w1 = make_float2(v[2] * s1, v[3] * s1);
        if (C::ACCUM) {
          w0.x += old0[jj].x;
          w0.y += old0[jj].y;
          w1.x += old1[jj].x;
          w1.y += old1[jj].y;
        }
        if (col < g.n_out) {
          if (ok0) *reinterpret_cast<float2*>(p0 + col) = w0;
          if (ok1) *reinterpret_cast<float2*>(p1 + col) = w1;
        }
      }
    }
  }
}

/// Config::AUX: stages the pre-activation of accumulator half `half` (0: SwiGLU gate / GeLU
/// input, 1: SwiGLU up) of one 64-column chunk and stores it to g.aux. Ends with the
/// staging tile free again.
template <class C>
__device__ __forceinline__ void store_aux_chunk(const float (&a)[C::ACC_N],
                                                const GroupedGemmArgs& g, int chunk, int half,
                                                int grow0, int rows_blk, int col_tile,
                                                u32 stage, int wtid, int bar_id) {
  const FragPos f = frag_pos(wtid);
  const int r_lo = f.r_lo;
  const int cpair = f.cpair;
  const int off = half * (C::ACC_N / 2);
#pragma unroll
  for (int jj = 0; jj < 8; ++jj) {
    const int j = chunk * 8 + jj;
    const int col = 8 * jj + cpair;
    st_shared_u32(stage + r_lo * C::EPI_PITCH + col * 2,
                  pack_in<C>(a[4 * j + off], a[4 * j + 1 + off]));
    st_shared_u32(stage + (r_lo + 8) * C::EPI_PITCH + col * 2,
                  pack_in<C>(a[4 * j + 2 + off], a[4 * j + 3 + off]));
  }
  named_barrier_sync(bar_id, 128);
  staged_to_global<C>(stage, reinterpret_cast<char*>(g.aux), g.ldaux, half * g.n_out, g.n_out,
                      grow0, rows_blk, col_tile + chunk * 64, wtid);
  named_barrier_sync(bar_id, 128);
}

/// Config::TSTORE (weight gradients): writes this warpgroup's rows of tile t (cooperative:
/// its 64 rows, `cw`; ping-pong: the tile's m64 blocks) pass by pass into its staging tile
/// (`stage`, TS_WG_BYTES, 1024-aligned) in the 128-byte swizzle of g.c's boxes; after each
/// pass thread 0 of the warpgroup issues the TMA stores (reduce-adds with ACCUM), and the
/// warpgroup moves on: the next fill of the staging tile first waits until the TMA unit has
/// read it. Rows past m_out and columns past n_out are clipped by the map. ACCUM with an
/// empty reduction stores nothing (the output stays bit for bit); without ACCUM it stores
/// the zeros of the accumulator.
template <class C>
__device__ __forceinline__ void epilogue_tma_store(const float (&acc)[C::MW][C::ACC_N],
                                                   const GroupedGemmArgs& g, const Tile& t,
                                                   int cw, u32 stage, int wtid, int bar_id) {
  if (C::ACCUM && t.k_len == 0) return;
  constexpr int PASS_COLS = C::OUT_BN / C::TS_PASSES;
  constexpr int GROUPS = PASS_COLS / 8;  // 8-column fragment groups per pass
  constexpr int BOXES = PASS_COLS / C::TS_BOX_COLS;
  const int lane = wtid % 32;
  const int r_lo = frag_pos(wtid).r_lo;
  const u32 swz = (u32)(lane / 4);  // r_lo and r_lo + 8 modulo 8: the 128-byte swizzle's row
#pragma unroll
  for (int mb = 0; mb < C::TS_BLOCKS; ++mb) {
    // the block's first row in the expert's output block (uniform over the warpgroup)
    const int row_in_e = t.m_block * C::BM + 64 * (C::PINGPONG ? mb : cw);
    if (row_in_e >= g.m_out) break;
#pragma unroll
    for (int pass = 0; pass < C::TS_PASSES; ++pass) {
      if (wtid == 0) bulk_wait_group_read<0>();  // the previous store has left the staging tile
      named_barrier_sync(bar_id, 128);
#pragma unroll
      for (int jj = 0; jj < GROUPS; ++jj) {
        const float* v = &acc[mb][4 * (pass * GROUPS + jj)];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const u32 row = stage + (u32)(r_lo + 8 * h) * 128u;
          if (C::OUT_F32) {
            // 32 columns (128 bytes) per box row; the pair sits at byte 32 (jj % 4) + 8 (lane % 4)
            const u32 chunk = (u32)(2 * (jj % 4) + (lane % 4) / 2);
            st_shared_v2f(row + (u32)(jj / 4) * 8192u + ((chunk ^ swz) * 16u) + 8u * (lane % 2),
                          v[2 * h], v[2 * h + 1]);
          } else {
            // 64 columns per box row; the pair sits at byte 16 (jj % 8) + 4 (lane % 4)
            const u32 chunk = (u32)(jj % 8);
            st_shared_u32(row + (u32)(jj / 8) * 8192u + ((chunk ^ swz) * 16u) + 4u * (lane % 4),
                          pack_out<C>(v[2 * h], v[2 * h + 1]));
          }
        }
      }
      fence_proxy_async_smem();  // the generic-proxy writes, visible to the TMA unit
      named_barrier_sync(bar_id, 128);
      if (wtid == 0) {
#pragma unroll
        for (int b = 0; b < BOXES; ++b) {
          const int col = t.n_block * C::OUT_BN + pass * PASS_COLS + b * C::TS_BOX_COLS;
          if (col < g.n_out) {
            if (C::ACCUM) {
              tma_store_add_3d(&g.c, stage + (u32)b * 8192u, col, row_in_e, t.expert);
            } else {
              tma_store_3d(&g.c, stage + (u32)b * 8192u, col, row_in_e, t.expert);
            }
          }
        }
        bulk_commit_group();
      }
    }
  }
}

/// Writes this warpgroup's part of tile t.
///  acc:      MW m64 blocks of accumulators (fragment layout, see wgmma.cuh)
///  row0:     global output row of this warpgroup's first row
///  rows_wg:  valid rows from row0 (<= 64 * MW; <= 0 writes nothing)
///  stage:    this warpgroup's staging buffer (C::EPI_WG_BYTES of shared memory)
///  wtid:     thread index in the warpgroup; bar_id: the warpgroup's named barrier
template <class C>
__device__ __forceinline__ void epilogue_store(const float (&acc)[C::MW][C::ACC_N],
                                               const GroupedGemmArgs& g, const Tile& t,
                                               int row0, int rows_wg, u32 stage, int wtid,
                                               int bar_id) {
  if (C::OUT_F32) {
    epilogue_store_f32<C>(acc, g, t, row0, rows_wg, wtid);
    return;
  }
  const FragPos f = frag_pos(wtid);
  const int r_lo = f.r_lo;
  const int cpair = f.cpair;
  char* out = reinterpret_cast<char*>(g.out);
  const int col_tile = t.n_block * C::OUT_BN;
#pragma unroll
  for (int mb = 0; mb < C::MW; ++mb) {
    const int rows_blk = rows_wg - 64 * mb;
    if (rows_blk <= 0) break;
    const int grow0 = row0 + 64 * mb;
    float s0, s1;
    row_scales(g, grow0, r_lo, rows_blk, s0, s1);
#pragma unroll
    for (int chunk = 0; chunk < C::OUT_BN / 64; ++chunk) {
      if (C::AUX) {
        store_aux_chunk<C>(acc[mb], g, chunk, 0, grow0, rows_blk, col_tile, stage, wtid, bar_id);
        if (C::EPI == EPI_SWIGLU) {
          store_aux_chunk<C>(acc[mb], g, chunk, 1, grow0, rows_blk, col_tile, stage, wtid,
                             bar_id);
        }
      }
      // 1. fragment -> staging (bf16x2 per store; 144-byte pitch: conflict-free)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int j = chunk * 8 + jj;  // 8-column group in the accumulator
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = activated<C>(acc[mb], 4 * j + q);
        const int col = 8 * jj + cpair;
        st_shared_u32(stage + r_lo * C::EPI_PITCH + col * 2, pack_out<C>(v[0] * s0, v[1] * s0));
        st_shared_u32(stage + (r_lo + 8) * C::EPI_PITCH + col * 2,
                      pack_out<C>(v[2] * s1, v[3] * s1));
      }
      named_barrier_sync(bar_id, 128);
      // 2. staging -> global: 64 rows x 8 chunks of 16 bytes, 4 per thread, a row per 8 lanes
#pragma unroll
      for (int it = 0; it < 4; ++it) {
        const int id = wtid + 128 * it;
        const int row = id / 8;
        const int c16 = id % 8;
        const int gcol = col_tile + chunk * 64 + c16 * 8;
        if (row < rows_blk && gcol < g.n_out) {
          u32 x0, x1, x2, x3;
          ld_shared_v4(stage + row * C::EPI_PITCH + c16 * 16, x0, x1, x2, x3);
          char* dst = out + ((long long)(grow0 + row) * g.ldo + gcol) * 2;
          if (gcol + 8 <= g.n_out) {
            st_global_v4(dst, x0, x1, x2, x3);
          } else {
            // Ragged right edge (n_out not a multiple of 8): element stores.
            const int n = g.n_out - gcol;
#pragma unroll
            for (int e = 0; e < 7; ++e) {
              if (e < n) {
                const u32 w = e < 2 ? x0 : e < 4 ? x1 : e < 6 ? x2 : x3;
                const unsigned short h = (unsigned short)(w >> (16 * (e % 2)));
                asm volatile("st.global.b16 [%0], %1;" ::"l"(dst + 2 * e), "h"(h) : "memory");
              }
            }
          }
        }
      }
      named_barrier_sync(bar_id, 128);
    }
  }
}

/// Config::SWAP: writes warpgroup `cw`'s part of a swap-AB tile. Its accumulator rows are
/// output columns (SwiGLU: gate and up of the same 8 columns alternate every 8 rows, see
/// load_stage) and its columns are the chunk's tokens, so each pass of 64 tokens goes
/// fragment -> staging [token][column] (stmatrix .trans: 8 x 8 blocks transposed on the way)
/// -> global (16-byte stores per row), first the pre-activation parts (AUX), then the
/// output. Tokens past the chunk and columns past n_out are never written.
template <class C>
__device__ __forceinline__ void epilogue_swap(const float (&acc)[C::SWAP_ACC],
                                              const GroupedGemmArgs& g, const Tile& t, int cw,
                                              u32 stage, int wtid, int bar_id) {
  constexpr bool GLU = C::EPI == EPI_SWIGLU;
  constexpr int WG_COLS = C::SWAP_WG_COLS;
  constexpr int PARTS = C::AUX ? (GLU ? 3 : 2) : 1;  // aux gate/pre, aux up, output
  const int warp = wtid / 32;
  const int lane = wtid % 32;
  const int tok = 2 * (lane % 4);  // first of the thread's token pair in an 8-token group
  // stmatrix row address of this lane: matrix k = lane / 8, row lane % 8 of it
  const int mk = lane / 8;
  const int mrow = lane % 8;
  const int col0 = t.n_block * C::OUT_BN + cw * WG_COLS;  // global column of WG column 0
  char* out = reinterpret_cast<char*>(g.out);
  char* aux = reinterpret_cast<char*>(g.aux);
#pragma unroll
  for (int pass = 0; pass < (C::SWAP_N + 63) / 64; ++pass) {
    const int rows_blk = t.rows - 64 * pass;
    if (rows_blk <= 0) break;
    const int grow0 = t.row_begin + 64 * pass;
#pragma unroll
    for (int part = 0; part < PARTS; ++part) {
      const bool is_out = part == PARTS - 1;
      // packed (token n, token n + 1) pairs of 8-token group jj: SwiGLU one per group
      // (column 8 warp + lane / 4), else two (columns 16 warp + lane / 4 and + 8)
      u32 pk[GLU ? 8 : 16];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int n = 8 * jj + tok;  // token in the pass
        // (SWAP_N = 272: the last pass holds only 16 tokens; the groups past them are zero.
        // The loops are unrolled, so `in` and the indices are compile-time constants.)
        const int base = 4 * (8 * pass + jj);
        const bool in = base < C::SWAP_ACC;
        float a[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) a[q] = in ? acc[in ? base + q : 0] : 0.f;
        float s0 = 1.0f, s1 = 1.0f;
        if (is_out && g.row_scale != nullptr) {
          if (n < rows_blk) s0 = g.row_scale[grow0 + n];
          if (n + 1 < rows_blk) s1 = g.row_scale[grow0 + n + 1];
        }
        if (GLU) {
          if (!is_out) {  // aux: gate (part 0) or up (part 1), unscaled
            pk[jj] = part == 0 ? pack_in<C>(a[0], a[1]) : pack_in<C>(a[2], a[3]);
          } else {
            pk[jj] = pack_out<C>(silu_f(a[0]) * a[2] * s0, silu_f(a[1]) * a[3] * s1);
          }
        } else if (!is_out) {  // GeLU input, unscaled
          pk[2 * jj] = pack_in<C>(a[0], a[1]);
          pk[2 * jj + 1] = pack_in<C>(a[2], a[3]);
        } else {
          float v[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) v[q] = C::EPI == EPI_GELU ? gelu_erf_f(a[q]) : a[q];
          pk[2 * jj] = pack_out<C>(v[0] * s0, v[1] * s1);
          pk[2 * jj + 1] = pack_out<C>(v[2] * s0, v[3] * s1);
        }
      }
      if (GLU) {
        // matrix k of call h: tokens 8 (4h + k) .. + 8, columns 8 warp .. + 8
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int token = 8 * (4 * h + mk) + mrow;
          stmatrix_x4_trans(stage + (u32)(token * C::EPI_PITCH + 16 * warp), pk[4 * h],
                            pk[4 * h + 1], pk[4 * h + 2], pk[4 * h + 3]);
        }
      } else {
        // matrix k of call h: tokens 8 (2h + k / 2) .., columns 16 warp + 8 (k % 2) ..
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const int token = 8 * (2 * h + mk / 2) + mrow;
          stmatrix_x4_trans(stage + (u32)(token * C::EPI_PITCH + 2 * (16 * warp + 8 * (mk % 2))),
                            pk[4 * h], pk[4 * h + 1], pk[4 * h + 2], pk[4 * h + 3]);
        }
      }
      named_barrier_sync(bar_id, 128);
      char* base = is_out ? out : aux;
      const int ld = is_out ? g.ldo : g.ldaux;
      const int col_offset = (!is_out && part == 1) ? g.n_out : 0;
      staged_to_global<C, WG_COLS / 8>(stage, base, ld, col_offset, g.n_out, grow0, rows_blk,
                                       col0, wtid);
      named_barrier_sync(bar_id, 128);
    }
  }
}

}  // namespace comet_sm90
