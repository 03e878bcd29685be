//! comet-kernels: the CUDA C++ kernels of comet-rs, compiled at run time by NVRTC and
//! launched through typed Rust wrappers.
//!
//! - [`toolkit`]: finds the CUDA headers NVRTC needs.
//! - [`cache`]: NVRTC → CUBIN, the on-disk cubin cache, loaded modules per context.
//! - [`sources`]: the embedded `.cu`/`.cuh` sources (the tile engine header is public so
//!   fused kernels elsewhere can include it).
//! - [`device`], [`buffer`]: device handle, typed device tensors, raw `cuMemAlloc` buffers.
//! - [`router`], [`routing`], [`rows`], [`gemm`], [`activation`], [`layer_ops`]: the kernels.
//! - [`operands`]: operand descriptions and the shape checks both GEMM engines share.
//! - [`forward`]: a single-GPU MoE forward composed from them.
//!
//! Nothing here loads a CUDA library until a [`Gpu`] is opened or a kernel is compiled, so
//! the crate builds and its CPU tests run on machines without CUDA.

#![warn(missing_docs)]

pub mod activation;
pub mod buffer;
pub mod cache;
pub mod device;
pub mod error;
pub mod forward;
pub mod gemm;
pub mod init;
pub mod layer_ops;
pub mod operands;
pub mod router;
pub mod routing;
pub mod rows;
pub mod sm90;
pub mod sources;
pub mod toolkit;

pub use buffer::{DType, DeviceTensor, Element, RawDeviceBuffer};
pub use cache::{Arch, Defines, KernelCache, Program};
pub use device::Gpu;
pub use error::{Error, Result};
pub use forward::MoeForward;
pub use gemm::{Epilogue, GemmArgs, GemmKind, TileShape, grouped_gemm};
