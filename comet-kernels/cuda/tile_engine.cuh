// comet/tile_engine.cuh: the portable tile engine of comet-rs (sm_80+, mma.sync m16n8k16).
//
// One engine serves every GEMM of the MoE layer: the plain grouped GEMM, and (by including this
// header) the fused COMET kernels and the Hopper path's fallback. It is made of
//   - a mainloop (`TileEngine::mainloop`): cp.async multistage pipeline into XOR-swizzled shared
//     memory (16-byte chunks, chunk ^ (row & 7), so ldmatrix and cp.async are conflict-free),
//     ldmatrix(.trans) fragment loads and mma.sync with fp32 accumulators;
//   - an epilogue (`TileEngine::epilogue`): accumulators -> shared memory (fp32) -> vectorised,
//     bounds-checked global stores, with the activation fused (SwiGLU or GeLU-erf), an optional
//     pre-activation store, optional per-row scaling and optional accumulation into C;
//   - a tile scheduler (`TileEngine::Schedule`) whose order is data: by default tiles are
//     enumerated group by group (M-tiles fastest, then N-tiles) from device-resident group
//     offsets, or taken from an explicit device tile list, so a fused kernel can impose its own
//     order. `run_tile` runs one tile; a caller may wait on its own condition before calling it.
//
// Problem modes (compile time):
//   grouped-M (GROUPED_K = false): group g owns rows [off[g], off[g+1]) of A and C;
//     C[r, n] = sum_k A[r, k] * B_g(k, n), B_g = b + g * b_group_stride.
//       A_LAYOUT = K_MAJOR : A[r, k] at a[r * lda + k]              (activations)
//       B_LAYOUT = K_MAJOR : B_g(k, n) at B_g[n * ldb + k]          (forward, W[N, K])
//       B_LAYOUT = MN_MAJOR: B_g(k, n) at B_g[k * ldb + n]          (dgrad, W[K_fwd=N.., ..])
//   grouped-K (GROUPED_K = true, wgrad): group g reduces over rows r in [off[g], off[g+1]);
//     C_g[m, n] = sum_r A(m, r) * B(r, n), C_g = c + g * c_group_stride, m < M, n < N;
//       A_LAYOUT = MN_MAJOR: A(m, r) at a[r * lda + m]              (dH rows)
//       B_LAYOUT = MN_MAJOR: B(r, n) at b[r * ldb + n]              (X rows)
//     groups with no rows produce zeros (or leave C unchanged when accumulating).
// SwiGLU (forward only): the weight has N = 2F rows, gate rows 0..F and up rows F..2F. An N-tile
// of BN columns loads BN/2 gate rows and the BN/2 matching up rows, so the epilogue pairs
// column c with column c + BN/2 and writes BN/2 output columns; no weight re-layout is needed.
// Limits checked on the host: contiguous dimensions and leading dimensions multiples of 8
// elements (16-byte cp.async), at most COMET_MAX_GROUPS groups.
#pragma once
#include "comet/common.cuh"

#ifndef COMET_MAX_GROUPS
#define COMET_MAX_GROUPS 1024
#endif

namespace comet {

enum OperandLayout { K_MAJOR = 0, MN_MAJOR = 1 };
enum Epilogue { EPI_NONE = 0, EPI_SWIGLU = 1, EPI_GELU = 2 };

// Kernel parameters; mirrored by `GemmParams` in comet-kernels/src/gemm.rs (all 8-byte fields).
struct GemmParams {
  const void* a;
  const void* b;
  void* c;
  void* aux;               // pre-activation output (elem_t), or null
  const float* row_scale;  // grouped-M: per-row factor on the output, or null
  const int* offsets;      // [groups + 1] row offsets on the device; null: one group of rows_cap
  const int4* tile_list;   // explicit tile order (group, m_tile, n_tile, unused), or null
  const int* tile_count;   // number of valid tile_list entries (device)
  i64 lda, ldb, ldc, ldaux;
  i64 b_group_stride;  // grouped-M: elements between the groups' B
  i64 c_group_stride;  // grouped-K: elements between the groups' C
  i64 groups;
  i64 rows_cap;    // rows allocated in A and C (grouped-M) or in A and B (grouped-K)
  i64 m;           // grouped-K: output rows per group
  i64 n;           // output columns before the activation (2F for SwiGLU)
  i64 k;           // grouped-M: reduction length
  i64 accumulate;  // C += result
  i64 vec_store;   // C and aux rows are 16-byte aligned: vector stores allowed
  i64 tile_list_len;  // entries allocated in tile_list (bounds *tile_count)
};

struct TileCoord {
  int group, m_tile, n_tile;
};

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // src-size 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
#if defined(COMET_F16)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Element offset of 16-byte chunk `ch` of row `row` in a swizzled tile with COLS columns.
template <int COLS>
__device__ __forceinline__ int swz(int row, int ch) {
  return row * COLS + (((ch & ~7) | ((ch ^ row) & 7)) << 3);
}

// Issues the cp.async copies of a ROWS x COLS tile. `row_ptr(i)` gives the global address of
// tile row i (column 0 of the operand, not of the tile) or null for a row outside the operand;
// columns [col0, col0 + COLS) are read where < col_end, zero-filled elsewhere.
template <int ROWS, int COLS, int THREADS, class RowPtr>
__device__ __forceinline__ void load_tile(unsigned s_base, const elem_t* fallback, int col0,
                                          int col_end, RowPtr row_ptr) {
  constexpr int CH = COLS / 8;
  constexpr int TOTAL = ROWS * CH;
  static_assert(TOTAL % THREADS == 0, "tile chunks must divide evenly among the threads");
#pragma unroll
  for (int it = 0; it < TOTAL / THREADS; ++it) {
    const int i = threadIdx.x + it * THREADS;
    const int row = i / CH, ch = i % CH;
    const int col = col0 + ch * 8;
    const elem_t* rp = row_ptr(row);
    const bool v = rp != nullptr && col < col_end;
    cp_async16(s_base + swz<COLS>(row, ch) * 2, v ? rp + col : fallback, v);
  }
}

template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_, int A_LAYOUT, int B_LAYOUT,
          bool GROUPED_K, int EPI, typename OutT>
struct TileEngine {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int WTM = BM / WM, WTN = BN / WN;
  static constexpr int MI = WTM / 16, NI = WTN / 8;
  static constexpr int A_ROWS = A_LAYOUT == K_MAJOR ? BM : BK;
  static constexpr int A_COLS = A_LAYOUT == K_MAJOR ? BK : BM;
  static constexpr int B_ROWS = B_LAYOUT == K_MAJOR ? BN : BK;
  static constexpr int B_COLS = B_LAYOUT == K_MAJOR ? BK : BN;
  static constexpr int A_ELEMS = BM * BK, B_ELEMS = BN * BK;
  static constexpr int PIPE_BYTES = STAGES * (A_ELEMS + B_ELEMS) * 2;
  static constexpr int SPITCH = BN + 8;  // fp32 staging row pitch (bank-conflict-free float2)
  static constexpr int EPI_BYTES = BM * SPITCH * 4;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static constexpr int OUT_COLS = EPI == EPI_SWIGLU ? BN / 2 : BN;  // output columns per tile

  static_assert(is_same<OutT, float>::value || is_same<OutT, elem_t>::value,
                "output is fp32 or the input element type");
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(A_COLS % 64 == 0 && B_COLS % 64 == 0, "swizzled rows need 64-element multiples");
  static_assert(BK % 16 == 0 && STAGES >= 2, "bad pipeline shape");
  static_assert(!GROUPED_K || (A_LAYOUT == MN_MAJOR && B_LAYOUT == MN_MAJOR),
                "grouped-K (wgrad) takes both operands row-indexed by the reduction");
  static_assert(GROUPED_K || A_LAYOUT == K_MAJOR, "grouped-M takes A rows K-contiguous");
  static_assert(EPI != EPI_SWIGLU || (!GROUPED_K && B_LAYOUT == K_MAJOR),
                "SwiGLU is fused into the forward GEMM only");

  // ---- scheduling -----------------------------------------------------------------------

  __device__ static int n_tiles(const GemmParams& p) {
    if (EPI == EPI_SWIGLU) {
      const int f = static_cast<int>(p.n / 2), half = BN / 2;
      return (f + half - 1) / half;
    }
    return static_cast<int>((p.n + BN - 1) / BN);
  }
  // Rows [begin, end) of group g, clamped to the allocation.
  __device__ static void group_rows(const GemmParams& p, int g, int& begin, int& end) {
    if (p.offsets == nullptr) {
      begin = 0;
      end = static_cast<int>(p.rows_cap);
      return;
    }
    const int cap = static_cast<int>(p.rows_cap);
    begin = min(max(p.offsets[g], 0), cap);
    end = min(max(p.offsets[g + 1], begin), cap);
  }
  __device__ static int m_tiles_of(const GemmParams& p, int g) {
    if (GROUPED_K) return static_cast<int>((p.m + BM - 1) / BM);
    int b, e;
    group_rows(p, g, b, e);
    return (e - b + BM - 1) / BM;
  }

  // Default schedule: tiles group by group, M-tiles fastest; or an explicit tile list.
  struct Schedule {
    int total;
    int nt;
    const int* prefix;  // shared memory, [groups + 1] tile prefix (grouped-M default order)

    // Must be called by all threads of the block. `s_prefix` holds COMET_MAX_GROUPS + 1 ints.
    __device__ void init(const GemmParams& p, int* s_prefix, int* s_total) {
      nt = n_tiles(p);
      prefix = s_prefix;
      const int groups = static_cast<int>(p.groups);
      if (p.tile_list != nullptr) {
        total = min(max(*p.tile_count, 0), static_cast<int>(p.tile_list_len));
        return;
      }
      if (GROUPED_K) {
        total = groups * m_tiles_of(p, 0) * nt;
        return;
      }
      if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const int per = (groups + 31) / 32;
        const int lo = min(lane * per, groups), hi = min(lo + per, groups);
        int sum = 0;
        for (int g = lo; g < hi; ++g) sum += m_tiles_of(p, g) * nt;
        int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        int run = incl - sum;
        for (int g = lo; g < hi; ++g) {
          s_prefix[g] = run;
          run += m_tiles_of(p, g) * nt;
        }
        if (lane == 31) {
          s_prefix[groups] = incl;
          *s_total = incl;
        }
      }
      __syncthreads();
      total = *s_total;
    }

    // Tile `idx` (< total); false if an explicit list names a tile outside the problem.
    __device__ bool decode(const GemmParams& p, int idx, TileCoord& t) const {
      const int groups = static_cast<int>(p.groups);
      if (p.tile_list != nullptr) {
        const int4 e = p.tile_list[idx];
        t.group = e.x;
        t.m_tile = e.y;
        t.n_tile = e.z;
        return e.x >= 0 && e.x < groups && e.y >= 0 && e.y < m_tiles_of(p, e.x) && e.z >= 0 &&
               e.z < nt;
      }
      if (GROUPED_K) {
        const int mt = m_tiles_of(p, 0);
        const int per = mt * nt;
        t.group = idx / per;
        const int local = idx - t.group * per;
        t.m_tile = local % mt;
        t.n_tile = local / mt;
        return true;
      }
      int lo = 0, hi = groups;  // prefix[lo] <= idx < prefix[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (prefix[mid] <= idx) lo = mid; else hi = mid;
      }
      const int local = idx - prefix[lo];
      const int mt = m_tiles_of(p, lo);
      t.group = lo;
      t.m_tile = local % mt;
      t.n_tile = local / mt;
      return true;
    }
  };

  // ---- mainloop -------------------------------------------------------------------------

  struct Ctx {
    int row_begin, row_end;  // grouped-M: A/C rows of the tile; grouped-K: reduction rows
    int m0, n0;              // grouped-K: output tile origin; grouped-M: n0 only
    int k_len;
    const elem_t* bg;
  };

  __device__ static Ctx make_ctx(const GemmParams& p, const TileCoord& t) {
    Ctx c;
    int b, e;
    group_rows(p, t.group, b, e);
    if (GROUPED_K) {
      c.row_begin = b;
      c.row_end = e;
      c.m0 = t.m_tile * BM;
      c.n0 = t.n_tile * BN;
      c.k_len = e - b;
      c.bg = static_cast<const elem_t*>(p.b);
    } else {
      c.row_begin = b + t.m_tile * BM;
      c.row_end = e;
      c.m0 = 0;
      c.n0 = t.n_tile * BN;
      c.k_len = static_cast<int>(p.k);
      c.bg = static_cast<const elem_t*>(p.b) + static_cast<i64>(t.group) * p.b_group_stride;
    }
    return c;
  }

  __device__ static void load_stage(const GemmParams& p, const Ctx& c, const TileCoord& t,
                                    unsigned s_stage, int kt) {
    const elem_t* a = static_cast<const elem_t*>(p.a);
    const unsigned sA = s_stage, sB = s_stage + A_ELEMS * 2;
    const int k0 = kt * BK;
    if (GROUPED_K) {
      const int r0 = c.row_begin + k0, r1 = c.row_end;
      const i64 lda = p.lda, ldb = p.ldb;
      load_tile<A_ROWS, A_COLS, THREADS>(sA, a, c.m0, static_cast<int>(p.m), [&](int i) {
        const int r = r0 + i;
        return r < r1 ? a + static_cast<i64>(r) * lda : static_cast<const elem_t*>(nullptr);
      });
      const elem_t* bb = c.bg;
      load_tile<B_ROWS, B_COLS, THREADS>(sB, bb, c.n0, static_cast<int>(p.n), [&](int i) {
        const int r = r0 + i;
        return r < r1 ? bb + static_cast<i64>(r) * ldb : static_cast<const elem_t*>(nullptr);
      });
      return;
    }
    const int kdim = c.k_len;
    {
      const int r0 = c.row_begin, r1 = c.row_end;
      const i64 lda = p.lda;
      load_tile<A_ROWS, A_COLS, THREADS>(sA, a, k0, kdim, [&](int i) {
        const int r = r0 + i;
        return r < r1 ? a + static_cast<i64>(r) * lda : static_cast<const elem_t*>(nullptr);
      });
    }
    const elem_t* bg = c.bg;
    const i64 ldb = p.ldb;
    if (B_LAYOUT == K_MAJOR) {
      if (EPI == EPI_SWIGLU) {
        const int f = static_cast<int>(p.n / 2), half = BN / 2, base = t.n_tile * half;
        load_tile<B_ROWS, B_COLS, THREADS>(sB, bg, k0, kdim, [&](int i) {
          const bool up = i >= half;
          const int j = base + (up ? i - half : i);
          return j < f ? bg + static_cast<i64>(up ? f + j : j) * ldb
                       : static_cast<const elem_t*>(nullptr);
        });
      } else {
        const int n0 = c.n0, nn = static_cast<int>(p.n);
        load_tile<B_ROWS, B_COLS, THREADS>(sB, bg, k0, kdim, [&](int i) {
          const int r = n0 + i;
          return r < nn ? bg + static_cast<i64>(r) * ldb : static_cast<const elem_t*>(nullptr);
        });
      }
    } else {
      load_tile<B_ROWS, B_COLS, THREADS>(sB, bg, c.n0, static_cast<int>(p.n), [&](int i) {
        const int r = k0 + i;
        return r < kdim ? bg + static_cast<i64>(r) * ldb : static_cast<const elem_t*>(nullptr);
      });
    }
  }

  __device__ static void compute_stage(float (&acc)[MI][NI][4], unsigned sA, unsigned sB,
                                       int wm0, int wn0, int lane) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[MI][4];
      unsigned bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if (A_LAYOUT == K_MAJOR) {
          const int row = wm0 + mi * 16 + (lane & 15);
          const int ch = (kk >> 3) + (lane >> 4);
          ldmatrix_x4(af[mi], sA + swz<A_COLS>(row, ch) * 2);
        } else {
          const int row = kk + (lane & 7) + ((lane >> 4) << 3);
          const int ch = ((wm0 + mi * 16) >> 3) + ((lane >> 3) & 1);
          ldmatrix_x4_trans(af[mi], sA + swz<A_COLS>(row, ch) * 2);
        }
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        unsigned r[4];
        if (B_LAYOUT == K_MAJOR) {
          const int row = wn0 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int ch = (kk >> 3) + ((lane >> 3) & 1);
          ldmatrix_x4(r, sB + swz<B_COLS>(row, ch) * 2);
        } else {
          const int row = kk + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int ch = ((wn0 + nj * 16) >> 3) + (lane >> 4);
          ldmatrix_x4_trans(r, sB + swz<B_COLS>(row, ch) * 2);
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }

  // Accumulates the tile's product into `acc` (zeroed here). Leaves shared memory free.
  __device__ static void mainloop(const GemmParams& p, const TileCoord& t, const Ctx& c,
                                  unsigned char* smem, float (&acc)[MI][NI][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm0 = (warp / WN) * WTM, wn0 = (warp % WN) * WTN;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;
    const int kt_count = (max(c.k_len, 0) + BK - 1) / BK;
    const unsigned s0 = smem_u32(smem);
    constexpr unsigned STAGE_BYTES = (A_ELEMS + B_ELEMS) * 2;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < kt_count) load_stage(p, c, t, s0 + s * STAGE_BYTES, s);
      cp_async_commit();
    }
    int read_stage = 0, write_stage = STAGES - 1;
    for (int kt = 0; kt < kt_count; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // k-tile kt visible to all; stage written below was read at kt - 1
      const int next = kt + STAGES - 1;
      if (next < kt_count) load_stage(p, c, t, s0 + write_stage * STAGE_BYTES, next);
      cp_async_commit();
      const unsigned sA = s0 + read_stage * STAGE_BYTES;
      compute_stage(acc, sA, sA + A_ELEMS * 2, wm0, wn0, lane);
      read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
      write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
    }
    cp_async_wait<0>();
    __syncthreads();
  }

  // ---- epilogue -------------------------------------------------------------------------

  __device__ static void store8(OutT* dst, const float (&v)[8], bool vec, int valid) {
    if (vec && valid >= 8) {
      if constexpr (sizeof(OutT) == 4) {
        reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        *reinterpret_cast<uint4*>(dst) = pack8(v);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < valid) dst[j] = from_f32<OutT>(v[j]);
    }
  }
  __device__ static void load8(const OutT* src, float (&v)[8], bool vec, int valid) {
    if (vec && valid >= 8) {
      if constexpr (sizeof(OutT) == 4) {
        const float4 x = reinterpret_cast<const float4*>(src)[0];
        const float4 y = reinterpret_cast<const float4*>(src)[1];
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
        v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
      } else {
        unpack8(*reinterpret_cast<const uint4*>(src), v);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = j < valid ? to_f32(src[j]) : 0.0f;
    }
  }
  __device__ static void store8_elem(elem_t* dst, const float (&v)[8], bool vec, int valid) {
    if (vec && valid >= 8) {
      *reinterpret_cast<uint4*>(dst) = pack8(v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < valid) dst[j] = from_f32<elem_t>(v[j]);
    }
  }

  // Writes the accumulators of tile `t` to global memory. Shared memory must be free on entry
  // (as `mainloop` leaves it) and is free again on return.
  __device__ static void epilogue(const GemmParams& p, const TileCoord& t, const Ctx& c,
                                  unsigned char* smem, const float (&acc)[MI][NI][4]) {
    float* st = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm0 = (warp / WN) * WTM, wn0 = (warp % WN) * WTN;
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int r = wm0 + mi * 16 + g, col = wn0 + ni * 8 + 2 * q;
        *reinterpret_cast<float2*>(&st[r * SPITCH + col]) =
            make_float2(acc[mi][ni][0], acc[mi][ni][1]);
        *reinterpret_cast<float2*>(&st[(r + 8) * SPITCH + col]) =
            make_float2(acc[mi][ni][2], acc[mi][ni][3]);
      }
    __syncthreads();

    const bool vec = p.vec_store != 0;
    const int out_cols = EPI == EPI_SWIGLU ? static_cast<int>(p.n / 2) : static_cast<int>(p.n);
    const int col_base = EPI == EPI_SWIGLU ? t.n_tile * (BN / 2) : c.n0;
    int row0, row_end;
    OutT* cbase;
    if (GROUPED_K) {
      row0 = c.m0;
      row_end = static_cast<int>(p.m);
      cbase = static_cast<OutT*>(p.c) + static_cast<i64>(t.group) * p.c_group_stride;
    } else {
      row0 = c.row_begin;
      row_end = c.row_end;
      cbase = static_cast<OutT*>(p.c);
    }
    elem_t* aux = static_cast<elem_t*>(p.aux);
    constexpr int CH = OUT_COLS / 8;
    for (int i = threadIdx.x; i < BM * CH; i += THREADS) {
      const int lr = i / CH, lc = (i % CH) * 8;
      const int row = row0 + lr, col = col_base + lc;
      if (row >= row_end || col >= out_cols) continue;
      const int valid = min(8, out_cols - col);
      float v[8];
      const float* srow = &st[lr * SPITCH + lc];
      if (EPI == EPI_SWIGLU) {
        float gate[8], up[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          gate[j] = srow[j];
          up[j] = srow[BN / 2 + j];
          v[j] = silu_f(gate[j]) * up[j];
        }
        if (aux != nullptr) {
          elem_t* arow = aux + static_cast<i64>(row) * p.ldaux;
          store8_elem(arow + col, gate, vec, valid);
          store8_elem(arow + out_cols + col, up, vec, valid);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = srow[j];
        if (aux != nullptr) store8_elem(aux + static_cast<i64>(row) * p.ldaux + col, v, vec, valid);
        if (EPI == EPI_GELU) {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = gelu_erf_f(v[j]);
        }
      }
      if (!GROUPED_K && p.row_scale != nullptr) {
        const float s = p.row_scale[row];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= s;
      }
      OutT* dst = cbase + static_cast<i64>(row) * p.ldc + col;
      if (p.accumulate) {
        float old[8];
        load8(dst, old, vec, valid);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] += old[j];
      }
      store8(dst, v, vec, valid);
    }
    __syncthreads();
  }

  // Runs one tile: mainloop + epilogue. All threads of the block must call it together.
  __device__ static void run_tile(const GemmParams& p, const TileCoord& t, unsigned char* smem) {
    const Ctx c = make_ctx(p, t);
    float acc[MI][NI][4];
    mainloop(p, t, c, smem, acc);
    epilogue(p, t, c, smem, acc);
  }

  // Persistent kernel body: every block walks the schedule with a grid-sized stride.
  __device__ static void run_persistent(const GemmParams& p, unsigned char* smem, int* s_prefix,
                                        int* s_total) {
    Schedule sched;
    sched.init(p, s_prefix, s_total);
    for (int idx = blockIdx.x; idx < sched.total; idx += gridDim.x) {
      TileCoord t;
      if (!sched.decode(p, idx, t)) continue;
      run_tile(p, t, smem);
    }
  }
};

}  // namespace comet
