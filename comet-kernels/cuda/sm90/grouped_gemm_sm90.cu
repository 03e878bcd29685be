// NVRTC entry point of the Hopper grouped GEMM (comet-kernels/src/sm90): one kernel,
// specialised by macros that the Rust launcher defines from its Sm90Config.
#include "sm90/grouped_gemm.cuh"

#if !defined(SM90_MODE) || !defined(SM90_BN) || !defined(SM90_PINGPONG) || \
    !defined(SM90_STAGES) || !defined(SM90_EPI) || !defined(SM90_IN_F16) ||  \
    !defined(SM90_OUT_F16) || !defined(SM90_BAND) || !defined(SM90_CLUSTER)
#error "the SM90_* specialisation macros must all be defined"
#endif
#ifndef SM90_L2HINT
#define SM90_L2HINT 0
#endif
// Epilogue variants (absent = the 16-bit overwriting store of the input dtype).
#ifndef SM90_OUT_F32
#define SM90_OUT_F32 0
#endif
#ifndef SM90_ACCUM
#define SM90_ACCUM 0
#endif
#ifndef SM90_AUX
#define SM90_AUX 0
#endif
// Rows per tile (absent = 128; 256: cooperative, BN = 128).
#ifndef SM90_BM
#define SM90_BM 128
#endif
// Weight gradients: the TMA-store epilogue (absent = 0: stores from registers).
#ifndef SM90_TSTORE
#define SM90_TSTORE 0
#endif

// Swap-AB: tokens on wgmma's N (absent = 0).
#ifndef SM90_SWAP
#define SM90_SWAP 0
#endif
#ifndef SM90_SWAP_N
#define SM90_SWAP_N 256
#endif

typedef comet_sm90::Config<SM90_MODE, SM90_BN, SM90_PINGPONG != 0, SM90_STAGES, SM90_EPI,
                           SM90_IN_F16 != 0, SM90_OUT_F16 != 0, SM90_BAND, SM90_CLUSTER,
                           SM90_L2HINT, SM90_OUT_F32 != 0, SM90_ACCUM != 0, SM90_AUX != 0,
                           SM90_BM, SM90_TSTORE != 0, SM90_SWAP != 0, SM90_SWAP_N>
    comet_sm90_config;

#ifdef SM90_SMEM_ONE_EXPERT
// The launcher computes shared memory with its own mirror of Config::smem_bytes.
static_assert(comet_sm90_config::smem_bytes(1) == SM90_SMEM_ONE_EXPERT,
              "Rust smem formula out of sync with Config::smem_bytes");
#endif

extern "C" __global__ void __launch_bounds__(384, 1)
    comet_sm90_grouped_gemm(const __grid_constant__ comet_sm90::GroupedGemmArgs g,
                            const __grid_constant__ comet_sm90::NoWait hook) {
  comet_sm90::grouped_gemm<comet_sm90_config>(g, hook);
}
