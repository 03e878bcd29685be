//! comet-comm: the transport of comet-rs.
//!
//! * [`env`] and [`rendezvous`]: the torchrun environment and rank 0's TCP rendezvous
//!   (one process per GPU), with deadlines everywhere.
//! * [`comm`]: [`Communicator`], an NCCL communicator in either process model (one process
//!   per GPU, or one process with a thread per GPU), with all-to-all(-v), grouped
//!   send/recv, all-gather, all-reduce and a bounded barrier.
//! * [`symmetric`]: equal-sized `cuMemAlloc` regions on every rank with peer pointers
//!   (peer access in one process, CUDA IPC across processes).
//! * [`signal`] and [`epoch`]: device signals with epochs and bounded waits that end in a
//!   host error naming the rank and the signal; the device side is `cuda/signal.cuh`
//!   ([`sources::SIGNAL_HEADER`], [`sources::headers`]) for the fused kernels to include;
//!   comet-comm's kernels compile through comet-kernels' NVRTC cache ([`sources`]).
//! * [`kernels`] and [`a2av`]: push/pull of row blocks over NVLink and an all-to-all-v with
//!   device-side counts.
//! * [`launch`]: one process per rank on this host with the torchrun environment (what the
//!   multi-process tests run), plain Rust.
//!
//! Everything that touches CUDA or NCCL loads the libraries at run time and returns
//! [`Error::LibraryMissing`] where they are absent (NVRTC: [`Error::Kernels`]), so the crate builds and its CPU tests run
//! on a machine without CUDA.
#![warn(missing_docs)]

pub mod a2av;
pub mod comm;
pub mod env;
pub mod epoch;
pub mod error;
pub mod kernels;
pub mod launch;
pub mod memory;
pub mod rendezvous;
pub mod signal;
pub mod sources;
pub mod symmetric;

pub use a2av::{A2avConfig, AllToAllV};
pub use comm::{
    Communicator, EnvOptions, LocalOptions, NcclElem, P2pOp, ProcessModel, ReduceOp, UniqueId,
    run_local,
};
pub use env::DistEnv;
pub use error::{Error, Result};
pub use kernels::{CommKernels, RowCopy};
pub use memory::DeviceBuffer;
pub use signal::{ErrorWord, SignalPad};
pub use symmetric::{PeerPath, SymmetricBuffer};
