//! comet-comm's CUDA C++ sources, embedded at build time and compiled by comet-kernels'
//! NVRTC cache ([`comet_kernels::KernelCache`]: on-disk cubins keyed by source, headers,
//! options, NVRTC version and architecture).
//!
//! The signal header is exported as an in-memory NVRTC header so that device code anywhere
//! (e.g. a fused kernel in another crate) can `#include "comet/signal.cuh"`: add
//! [`headers`] to its [`Program`]'s headers.

use std::borrow::Cow;

use comet_kernels::Program;

/// Name under which device code includes the signal header: `#include "comet/signal.cuh"`.
pub const SIGNAL_HEADER_NAME: &str = "comet/signal.cuh";
/// The signal header's source (release/acquire signals with epochs and bounded waits).
pub const SIGNAL_HEADER: &str = include_str!("../cuda/signal.cuh");
/// Source of comet-comm's data-movement kernels.
pub const P2P_SOURCE: &str = include_str!("../cuda/p2p.cu");

/// The headers of this crate, by include name (to append to another program's headers).
pub fn headers() -> Vec<(Cow<'static, str>, Cow<'static, str>)> {
    vec![(SIGNAL_HEADER_NAME.into(), SIGNAL_HEADER.into())]
}

/// A program from an embedded source, with this crate's headers available.
pub fn program(name: &'static str, source: &'static str) -> Program {
    Program {
        name: name.into(),
        source: source.into(),
        headers: headers(),
    }
}

/// The data-movement program (`cuda/p2p.cu`) that [`crate::CommKernels`] loads.
pub fn p2p_program() -> Program {
    program("comet_comm_p2p.cu", P2P_SOURCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use comet_kernels::{Arch, Defines, KernelCache};

    #[test]
    fn signal_header_is_self_contained() {
        assert!(!SIGNAL_HEADER.contains("#include"));
        assert!(P2P_SOURCE.contains(&format!("#include \"{SIGNAL_HEADER_NAME}\"")));
        let p = p2p_program();
        assert_eq!(p.headers.len(), 1);
        assert_eq!(p.headers[0].0, SIGNAL_HEADER_NAME);
        assert_eq!(p.headers[0].1, SIGNAL_HEADER);
    }

    /// Fills the on-disk kernel cache (`COMET_CACHE_DIR`) with the sm_90a cubins of this
    /// crate's programs as its GPU tests name them, so a GPU host with the same NVRTC
    /// version and include path loads them instead of compiling.
    #[test]
    #[ignore = "needs NVRTC and the CUDA headers; writes COMET_CACHE_DIR"]
    fn warm_the_kernel_cache() {
        let cache = KernelCache::new(comet_kernels::cache::default_cache_dir());
        let selftest = program(
            "comet_comm_selftest.cu",
            include_str!("../cuda/selftest.cu"),
        );
        for p in [p2p_program(), selftest] {
            let (key, _) = cache.cubin(&p, &Defines::new(), Arch::SM90).unwrap();
            let dir = cache.dir().expect("a cache directory");
            assert!(dir.join(format!("{key}.cubin")).is_file(), "{}", p.name);
        }
    }

    /// Compiles the real sources when NVRTC is installed (no GPU needed).
    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so.13 on LD_LIBRARY_PATH)"]
    fn p2p_source_compiles_for_hopper_and_ampere() {
        let cache = KernelCache::new(None);
        let selftest = program("selftest.cu", include_str!("../cuda/selftest.cu"));
        for arch in [Arch::SM90, Arch::SM80] {
            for p in [p2p_program(), selftest.clone()] {
                let (_, cubin) = cache.cubin(&p, &Defines::new(), arch).unwrap();
                assert_eq!(
                    &cubin[..4],
                    b"\x7fELF",
                    "{} {}: not an ELF cubin",
                    p.name,
                    arch.target()
                );
            }
        }
        let bad = Program {
            name: "bad.cu".into(),
            source: "extern \"C\" __global__ void k() { nope(); }".into(),
            headers: headers(),
        };
        let err = Error::from(cache.cubin(&bad, &Defines::new(), Arch::SM90).unwrap_err());
        match err {
            Error::Kernels(k) => match *k {
                comet_kernels::Error::Compile { log, .. } => assert!(log.contains("nope"), "{log}"),
                other => panic!("expected a compile error, got {other:?}"),
            },
            other => panic!("expected a comet-kernels error, got {other:?}"),
        }
    }
}
