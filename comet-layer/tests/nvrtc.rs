//! The layer's own kernels (comet-kernels' `layer_ops.cu`) compile through NVRTC for sm_90a
//! and sm_80 (no GPU needed; the NVRTC library and CUDA headers are). Run with
//! `LD_LIBRARY_PATH=/usr/local/cuda/lib CUDA_HOME=/usr/local/cuda cargo test -p comet-layer
//! --test nvrtc -- --ignored`.

use comet_kernels::cache::{Arch, Defines, KernelCache, looks_like_cubin};
use comet_kernels::layer_ops;

#[test]
#[ignore = "needs NVRTC and the CUDA headers"]
fn layer_ops_compile_for_hopper_and_ampere() {
    let cache = KernelCache::new(None);
    for arch in [Arch::SM90, Arch::SM80] {
        let (_, cubin) = cache
            .cubin(&layer_ops::program(), &Defines::new(), arch)
            .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        assert!(looks_like_cubin(&cubin), "{arch:?}: not a cubin");
        let text = String::from_utf8_lossy(&cubin);
        for k in [
            "comet_scatter_i32",
            "comet_chunk_counts",
            "comet_unpack_counts",
        ] {
            assert!(text.contains(k), "{arch:?}: {k} missing from the cubin");
        }
    }
}
