// Compile-time configuration of the Hopper tile engine and the kernel argument block.
#pragma once
#include "sm90/ptx.cuh"

namespace comet_sm90 {

/// Operand layouts.
enum : int {
  /// out[rows, N] = A[rows, K] · B[e][N, K]ᵀ  (forward; both operands K-major)
  MODE_FWD = 0,
  /// out[rows, Kout] = A[rows, N] · B[e][N, Kout]  (dgrad; B is N-major, transposed in wgmma)
  MODE_DGRAD = 1,
  /// out[e][M, N] = A[rows_e, M]ᵀ · B[rows_e, N]  (wgrad; reduction over expert e's rows)
  MODE_WGRAD = 2,
};

/// Epilogue activations (forward only).
enum : int {
  EPI_NONE = 0,
  /// out[:, j] = silu(acc[:, j]) * acc[:, F + j]; B rows 0..F are the gate, F..2F the up
  /// projection; the tile loads matching gate and up rows, so out has F columns.
  EPI_SWIGLU = 1,
  /// out = gelu_erf(acc)
  EPI_GELU = 2,
};

/// Tile configuration.
///  BN:       accumulator columns per tile (128 or 256).
///  PINGPONG: false = cooperative (both consumer warpgroups share each 128-row tile, 64
///            rows each); true = ping-pong (each consumer warpgroup owns alternate tiles, all
///            128 rows, so one warpgroup's epilogue overlaps the other's mainloop; BN <= 128).
///  STAGES:   depth of the shared-memory ring.
///  BAND:     m-tiles per raster band (L2 reuse of A across n-tiles).
///  CLUSTER:  1, or 2 = pairs of CTAs (a cluster) take pairs of consecutive tiles; when both
///            tiles use the same weight tile (same expert and n-tile) each CTA loads half of
///            it and multicasts it to both (half the B traffic from L2, and the pair reads the
///            weights from DRAM once, in lock-step). Launch with cluster dimension (2, 1, 1).
///  L2HINT:   0 = default L2 policy for all loads; 1 = A (activations, re-read across
///            n-tiles) evict_last and B (weights, streamed) evict_first.
///  OUT_F32:  the output is f32 (stored straight from the accumulator fragments with 8-byte
///            vector stores; OUT_F16 must be false); else the input's 16-bit type.
///  ACCUM:    out += result (OUT_F32 only); a tile with an empty reduction (wgrad: an expert
///            without rows) leaves its output untouched.
///  AUX:      also store the pre-activation (forward with SwiGLU or GeLU, 16-bit output) to
///            g.aux, g.ldaux elements per row: SwiGLU gate in columns [0, n_out), up in
///            [n_out, 2 n_out); GeLU the accumulator itself. Unscaled by row_scale.
///  TSTORE:   weight gradients only (128x256 or 128x128 tiles, cooperative or ping-pong, no
///            cluster): the epilogue writes each warpgroup's rows (cooperative: 64, ping-pong:
///            the tile's 128) in passes of 64 rows into a 128-byte-swizzled staging tile
///            and one thread hands it to the TMA unit (g.c: a 3D map over [E][m_out][ldo]
///            that clips rows at m_out and columns at n_out), with ACCUM as a reduce-add in
///            L2; the consumers go on to the next tile's mainloop while the store drains.
///            A pass holds 64 rows, all columns (f32 128x256: half of them; see TS_PASSES).
///  BM:       rows per tile: 128, or 256 (cooperative only, BN = 128): each consumer
///            warpgroup then owns 128 rows (two m64 blocks), so an expert of up to 256 rows
///            is one m-tile and each weight tile is read once for it.
///  SWAP:     swap-AB (forward and dgrad; cooperative, BN = 256, single CTA, 16-bit output):
///            the weights are wgmma's A (128 weight rows per tile, 64 per consumer
///            warpgroup) and the tokens its B, so the tokens of an expert are split into
///            near-equal chunks of at most 256 rows, each a multiple of 16 (see
///            swap_chunk_rows), and each tile issues wgmma with N = its chunk rounded up to
///            16: an expert of 257 rows costs 2 x 144 columns instead of 3 x 128 rows. The
///            epilogue transposes through the staging tile. SwiGLU tiles load gate and up
///            rows interleaved by 8 (one 5D box, see GroupedGemmArgs), so a thread holds
///            both halves of its outputs; such a tile has 64 output columns, else 128.
///  SWAP_N:   SWAP only: the largest token chunk, 256 or 272. With 272 an expert of up to
///            272 rows is one chunk (wgmma N = 256 plus a second N = 16 wgmma on the same
///            weight rows), so each of its weight tiles is read once; the ring's token part
///            grows to 272 rows (4 stages still fit: 226 KB with 256 experts) and tokens
///            256..271 come through g.c (the token map again, with a box of 16 rows).
template <int MODE_, int BN_, bool PINGPONG_, int STAGES_, int EPI_, bool IN_F16_ = false,
          bool OUT_F16_ = false, int BAND_ = 16, int CLUSTER_ = 1, int L2HINT_ = 0,
          bool OUT_F32_ = false, bool ACCUM_ = false, bool AUX_ = false, int BM_ = 128,
          bool TSTORE_ = false, bool SWAP_ = false, int SWAP_N_ = 256>
struct Config {
  static constexpr int MODE = MODE_;
  static constexpr int BM = BM_;
  static constexpr int BN = BN_;
  static constexpr int BK = 64;
  static constexpr bool PINGPONG = PINGPONG_;
  static constexpr int STAGES = STAGES_;
  static constexpr int EPI = EPI_;
  static constexpr bool IN_F16 = IN_F16_;
  static constexpr bool OUT_F16 = OUT_F16_;
  static constexpr int BAND = BAND_;
  static constexpr int CLUSTER = CLUSTER_;
  static constexpr int L2HINT = L2HINT_;
  static constexpr bool OUT_F32 = OUT_F32_;
  static constexpr bool ACCUM = ACCUM_;
  static constexpr bool AUX = AUX_;
  static constexpr bool TSTORE = TSTORE_;
  static constexpr bool SWAP = SWAP_;
  /// SWAP: largest token chunk (wgmma N, summed over the k16 step's wgmma instructions).
  static constexpr int SWAP_N = SWAP_N_;
  /// SWAP: f32 accumulators per thread (SWAP_N / 2).
  static constexpr int SWAP_ACC = SWAP_N / 2;
  static constexpr bool KGROUPED = MODE == MODE_WGRAD;
  // wgmma's A stored M-major in shared memory: wgrad's A; swap-AB dgrad's weights
  static constexpr bool A_MN = SWAP ? MODE == MODE_DGRAD : MODE == MODE_WGRAD;
  // wgmma's B stored N-major: dgrad's weights and wgrad's B (swap-AB: tokens, K-major)
  static constexpr bool B_MN = !SWAP && MODE != MODE_FWD;

  static constexpr int THREADS = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int MW = PINGPONG ? 2 : BM / 128;  // m64 blocks per consumer warpgroup
  /// Rows of a tile each consumer warpgroup owns in the cooperative schedule.
  static constexpr int WG_ROWS = BM / 2;
  static constexpr int ACC_N = BN / 2;         // f32 accumulators per thread per m64 block
  /// Output columns per tile (SWAP: per weight tile of 128 accumulator rows).
  static constexpr int OUT_BN =
      SWAP ? (EPI == EPI_SWIGLU ? 64 : 128) : (EPI == EPI_SWIGLU ? BN / 2 : BN);
  /// SWAP: output columns of a consumer warpgroup's 64 accumulator rows.
  static constexpr int SWAP_WG_COLS = EPI == EPI_SWIGLU ? 32 : 64;
  /// SWAP: token rows per TMA box of the activation operand (tokens 0..255 of a chunk; with
  /// SWAP_N = 272 tokens 256..271 are one box of 16 rows through g.c).
  static constexpr int SWAP_BOX_ROWS = 32;
  // Arrivals that free a stage: one per consuming warp; with clusters, the consuming warps of
  // both CTAs (every stage, shared or not: see grouped_gemm_cluster_roles).
  static constexpr int EMPTY_ARRIVALS = CLUSTER == 2 ? 16 : PINGPONG ? 4 : 8;

  static constexpr int A_STAGE_BYTES = BM * BK * 2;
  static constexpr int B_STAGE_BYTES = (SWAP ? SWAP_N : BN) * BK * 2;
  static constexpr int STAGE_BYTES = A_STAGE_BYTES + B_STAGE_BYTES;
  static constexpr int EPI_PITCH = (64 + 8) * 2;  // bytes per staged row (padded: no bank conflicts)
  /// TSTORE: staging per warpgroup, in boxes of 64 rows x 128 bytes (TS_BOX_COLS columns):
  /// 32 KiB, or 16 KiB where the ring leaves no room for that (ping-pong with 6 stages).
  static constexpr int TS_WG_BYTES =
      (STAGES * STAGE_BYTES + 2 * 32768 + 4096 <= 232448 - 1024) ? 32768 : 16384;
  static constexpr int TS_BOX_COLS = OUT_F32 ? 32 : 64;
  /// TSTORE: m64 blocks a warpgroup stores per tile (ping-pong: the tile's MW; else its one).
  static constexpr int TS_BLOCKS = PINGPONG ? MW : 1;
  /// TSTORE: bytes of one m64 block's output rows.
  static constexpr int TS_SLAB_BYTES = 64 * OUT_BN * (OUT_F32 ? 4 : 2);
  /// TSTORE: staging fills per m64 block (column parts).
  static constexpr int TS_PASSES = TS_SLAB_BYTES > TS_WG_BYTES ? TS_SLAB_BYTES / TS_WG_BYTES : 1;
  static constexpr int EPI_WG_BYTES = TSTORE ? TS_WG_BYTES : 64 * EPI_PITCH;

  // Shared-memory layout, relative to a 1024-byte aligned base.
  static constexpr int OFF_A = 0;
  static constexpr int OFF_B = OFF_A + STAGES * A_STAGE_BYTES;
  static constexpr int OFF_EPI = OFF_B + STAGES * B_STAGE_BYTES;
  static constexpr int OFF_BAR = OFF_EPI + 2 * EPI_WG_BYTES;
  static constexpr int OFF_SCHED = OFF_BAR + 16 * STAGES;
  /// Dynamic shared memory to request for `num_experts` experts (1 KiB alignment slack).
  static constexpr int smem_bytes(int num_experts) {
    return 1024 + OFF_SCHED + 8 * (num_experts + 1);
  }

  static_assert(BN == 128 || BN == 256, "BN must be 128 or 256");
  static_assert(BM == 128 || (BM == 256 && !PINGPONG && BN == 128),
                "BM is 128, or 256 with the cooperative schedule and BN = 128 (registers)");
  static_assert(!PINGPONG || BN <= 128, "ping-pong keeps 128 rows per warpgroup: BN <= 128");
  static_assert(EPI == EPI_NONE || MODE == MODE_FWD, "activations are forward-only");
  static_assert(OUT_BN % 64 == 0, "epilogue works in 64-column chunks");
  static_assert(CLUSTER == 1 || (CLUSTER == 2 && !PINGPONG && !KGROUPED),
                "clusters: cooperative forward/dgrad only (equal k-blocks per tile)");
  static_assert(!OUT_F32 || !OUT_F16, "f32 output: OUT_F16 must be false");
  static_assert(!ACCUM || OUT_F32, "accumulation needs the f32 output");
  static_assert(!AUX || (MODE == MODE_FWD && EPI != EPI_NONE && !OUT_F32),
                "pre-activation store: forward with an activation, 16-bit output");
  static_assert(!TSTORE || (MODE == MODE_WGRAD && CLUSTER == 1 && BM == 128),
                "TMA-store epilogue: weight gradients, single CTA, BM = 128");
  static_assert(!SWAP || (MODE != MODE_WGRAD && BN == 256 && BM == 128 && !PINGPONG &&
                          CLUSTER == 1 && !OUT_F32 && !TSTORE),
                "swap-AB: forward/dgrad, cooperative 128 x 256, single CTA, 16-bit output");
  static_assert(SWAP_N == 256 || (SWAP && SWAP_N == 272), "SWAP_N: 256, or 272 with SWAP");
  static_assert(!TSTORE || TS_SLAB_BYTES <= TS_WG_BYTES || TS_SLAB_BYTES == TS_PASSES * TS_WG_BYTES,
                "TMA-store staging holds a whole number of passes of 64 rows");
};

/// Kernel argument block (mirrored by the Rust launcher: keep the layout in sync).
/// Forward:  a = 2D map over A [rows, K], box {64, 128};
///           b = 4D map over B viewed as [E][P][Nh][K] (P = 2 halves for SwiGLU, else 1),
///               dims {K, Nh, P, E}, box {64, BN/2, 1, 1}.
/// Dgrad:    a = 2D map over A [rows, N], box {64, 128};
///           b = 3D map over B [E][N][Kout], dims {Kout, N, E}, box {64, 64, 1}.
/// SWAP:     a = as above with box {64, SWAP_BOX_ROWS} (token chunks; SWAP_N = 272: c = the
///               same map with box {64, 16}, for tokens 256..271); b = forward: box
///               {64, 128, 1, 1}; SwiGLU: a 5D map over B viewed as [E][Nh/8][P][8][K]
///               (Nh a multiple of 8), dims {K, 8, P, Nh/8, E}, box {64, 8, 2, 8, 1}
///               (8 groups of 8 gate rows then the same 8 up rows); dgrad: as above.
/// Wgrad:    a = 2D map over A [rows, M] (M = m_out), box {64, 64};
///           b = 2D map over B [rows, N] (N = n_out), box {64, 64};
///           out = [E][m_out][ldo].
/// All maps: bf16/f16, 128-byte swizzle, zero fill out of bounds.
struct GroupedGemmArgs {
  TmaDesc a;
  TmaDesc b;
  TmaDesc c;                   ///< Config::TSTORE: 3D map over out [E][m_out][ldo], dims
                               ///< {n_out, m_out, E}, box {TS_BOX_COLS, 64, 1}, 128-byte
                               ///< swizzle; SWAP with SWAP_N = 272: the map `a` with box
                               ///< {64, 16}; else unused
  void* out;                   ///< output rows, ldo elements apart (16-byte aligned)
  const int* expert_offsets;   ///< [E + 1] row offsets (device), non-decreasing
  const float* row_scale;      ///< optional [rows] factor per output row (forward/dgrad)
  const int* tile_order;       ///< optional processing order (canonical tile ids)
  int* error_flag;             ///< optional; receives the first ERR_* code
  int num_experts;
  int n_out;                   ///< output columns
  int ldo;                     ///< output row stride in elements (multiple of 8)
  int k;                       ///< reduction length (forward/dgrad)
  int m_out;                   ///< wgrad: output rows per expert
  int rows_cap;                ///< rows of A / out (forward, dgrad) or of A and B (wgrad);
                               ///< device offsets are clamped to it (ERR_BAD_OFFSETS)
  void* aux;                   ///< Config::AUX: pre-activation rows (input dtype, 16-byte
                               ///< aligned), ldaux elements apart; else unused
  int ldaux;                   ///< multiple of 8
  int reserved0;
};
// Layout the Rust mirror (comet-kernels/src/sm90/launch.rs) relies on.
static_assert(sizeof(TmaDesc) == 128 && alignof(TmaDesc) == 128, "TmaDesc layout");
static_assert(sizeof(GroupedGemmArgs) == 512, "GroupedGemmArgs layout");
// (field offsets: c 256, out 384, expert_offsets 392, row_scale 400, tile_order 408,
//  error_flag 416, num_experts 424, n_out 428, ldo 432, k 436, m_out 440, rows_cap 444,
//  aux 448, ldaux 456)

}  // namespace comet_sm90
