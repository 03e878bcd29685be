// Grouped GEMM over experts: one persistent kernel per specialisation of the tile engine.
// Specialised by the host through macros:
//   GEMM_BM, GEMM_BN, GEMM_BK, GEMM_WM, GEMM_WN, GEMM_STAGES, GEMM_MIN_BLOCKS  tile shape
//   GEMM_A_LAYOUT, GEMM_B_LAYOUT (0 = K-major, 1 = M/N-major), GEMM_GROUPED_K (0/1)
//   GEMM_EPI (0 none, 1 SwiGLU, 2 GeLU), GEMM_OUT_F32 (0/1), COMET_F16 (f16 inputs)
//   GEMM_SMEM_BYTES: the dynamic shared memory the host launches with (checked below).
#include "comet/tile_engine.cuh"

#if GEMM_OUT_F32
typedef float gemm_out_t;
#else
typedef comet::elem_t gemm_out_t;
#endif

typedef comet::TileEngine<GEMM_BM, GEMM_BN, GEMM_BK, GEMM_WM, GEMM_WN, GEMM_STAGES, GEMM_A_LAYOUT,
                          GEMM_B_LAYOUT, (GEMM_GROUPED_K != 0), GEMM_EPI, gemm_out_t>
    Engine;

static_assert(GEMM_SMEM_BYTES >= Engine::SMEM_BYTES,
              "host shared-memory formula disagrees with the engine");

extern "C" __global__ void __launch_bounds__(Engine::THREADS, GEMM_MIN_BLOCKS)
    comet_grouped_gemm(const comet::GemmParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int s_prefix[COMET_MAX_GROUPS + 1];
  __shared__ int s_total;
  Engine::run_persistent(p, smem, s_prefix, &s_total);
}
