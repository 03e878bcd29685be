//! The CUDA C++ sources of this crate, embedded at build time.
//!
//! Every program gets all headers of this crate as in-memory NVRTC headers, so a `.cu` file
//! (here or in another crate) can `#include "comet/tile_engine.cuh"` and friends.

use std::borrow::Cow;

use crate::cache::Program;

/// `comet/common.cuh`: element types, conversions, vector helpers.
pub const COMMON_CUH: &str = include_str!("../cuda/common.cuh");
/// `comet/tile_engine.cuh`: the `mma.sync` tile engine (mainloop, epilogue, scheduler).
pub const TILE_ENGINE_CUH: &str = include_str!("../cuda/tile_engine.cuh");

/// The grouped GEMM kernels.
pub const GEMM_CU: &str = include_str!("../cuda/gemm.cu");
/// Router softmax + top-k (forward and backward).
pub const ROUTER_CU: &str = include_str!("../cuda/router.cu");
/// Routing plan on the device.
pub const ROUTING_CU: &str = include_str!("../cuda/routing.cu");
/// Row permute / gather / combine.
pub const ROWS_CU: &str = include_str!("../cuda/rows.cu");
/// Deterministic random fills.
pub const INIT_CU: &str = include_str!("../cuda/init.cu");
/// Element-wise activation forward/backward.
pub const ACTIVATION_CU: &str = include_str!("../cuda/activation.cu");

/// All headers of this crate, by include name.
pub fn headers() -> Vec<(Cow<'static, str>, Cow<'static, str>)> {
    vec![
        ("comet/common.cuh".into(), COMMON_CUH.into()),
        ("comet/tile_engine.cuh".into(), TILE_ENGINE_CUH.into()),
    ]
}

/// A program from an embedded source, with this crate's headers available.
pub fn program(name: &'static str, source: &'static str) -> Program {
    Program {
        name: name.into(),
        source: source.into(),
        headers: headers(),
    }
}

/// A program from a source written elsewhere (e.g. a fused kernel), with this crate's headers.
pub fn external_program(name: impl Into<String>, source: impl Into<String>) -> Program {
    Program {
        name: Cow::Owned(name.into()),
        source: Cow::Owned(source.into()),
        headers: headers(),
    }
}
