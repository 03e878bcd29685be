//! The crate's error type.

use std::time::Duration;

use cudarc::driver::DriverError;

/// Result alias used throughout comet-comm.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in comet-comm: bootstrap, NCCL, CUDA, device signals.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A torchrun variable needed by the one-process-per-GPU bootstrap is not set.
    #[error(
        "environment variable {name} is not set (the one-process-per-GPU bootstrap needs RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
    )]
    MissingEnv {
        /// The variable's name.
        name: &'static str,
    },
    /// A torchrun variable is set but cannot be used.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable's name.
        name: &'static str,
        /// Its value as found.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The variables are each valid but contradict each other.
    #[error("inconsistent launch environment: {0}")]
    InconsistentEnv(String),
    /// A rank could not connect to rank 0's rendezvous server in time.
    #[error(
        "could not reach the rendezvous master at {addr} within {waited:?} (last error: {last_error})"
    )]
    MasterUnreachable {
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// How long this rank kept trying.
        waited: Duration,
        /// The last connection error seen.
        last_error: String,
    },
    /// Rank 0 waited for the other ranks in vain.
    #[error("rendezvous timed out after {waited:?}: {} of {world} ranks never arrived (missing ranks: {missing:?})", missing.len())]
    RendezvousTimeout {
        /// How long rank 0 waited.
        waited: Duration,
        /// World size.
        world: usize,
        /// The ranks that never joined.
        missing: Vec<usize>,
    },
    /// A rank joined with a different `WORLD_SIZE` than rank 0.
    #[error(
        "world-size mismatch: rank {rank} has WORLD_SIZE={got}, rank 0 has WORLD_SIZE={expected}"
    )]
    WorldSizeMismatch {
        /// The rank that disagreed.
        rank: usize,
        /// Rank 0's world size.
        expected: usize,
        /// The other rank's world size.
        got: usize,
    },
    /// Two processes claimed the same rank, or a rank outside the world joined.
    #[error("rank {rank} cannot join a world of {world}: {reason}")]
    BadRank {
        /// The rank claimed.
        rank: usize,
        /// World size.
        world: usize,
        /// Why it was refused.
        reason: String,
    },
    /// Rank 0 refused this rank (the message says why).
    #[error("rendezvous rejected by rank 0: {0}")]
    RendezvousRejected(String),
    /// A peer spoke something that is not the rendezvous protocol.
    #[error("rendezvous protocol error: {0}")]
    Protocol(String),
    /// An I/O error of the rendezvous.
    #[error("I/O error during {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A waited-for event did not happen in time.
    #[error("rank {rank}: timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// The waiting rank.
        rank: usize,
        /// What it was waiting for.
        what: String,
        /// How long it waited.
        waited: Duration,
    },
    /// A shared library could not be loaded.
    #[error("{library} could not be loaded: {hint}")]
    LibraryMissing {
        /// Library name.
        library: &'static str,
        /// What to do about it.
        hint: String,
    },
    /// A library symbol that is needed is missing (e.g. an older NCCL).
    #[error("symbol {symbol} is missing from {library}")]
    MissingSymbol {
        /// Library name.
        library: &'static str,
        /// Symbol name.
        symbol: &'static str,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver call {op} failed: {source}")]
    Cuda {
        /// The call or operation.
        op: &'static str,
        /// cudarc's error (carries the CUresult).
        #[source]
        source: DriverError,
    },
    /// A CUDA driver call through cudarc's safe API failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// An NCCL call failed.
    #[error(
        "NCCL {op} failed on rank {rank}: {code_name} ({code}): {message}; ncclGetLastError: {last_error}"
    )]
    Nccl {
        /// The NCCL call.
        op: &'static str,
        /// Rank of the communicator (or `usize::MAX` before one exists).
        rank: usize,
        /// Numeric `ncclResult_t`.
        code: u32,
        /// Its enum name.
        code_name: String,
        /// `ncclGetErrorString(code)`.
        message: String,
        /// `ncclGetLastError(comm)`.
        last_error: String,
    },
    /// Compiling or loading comet-comm's device code through comet-kernels' NVRTC cache
    /// failed: NVRTC or the toolkit headers missing, a compile error (with NVRTC's log), a
    /// module that does not load. Boxed to keep this enum small; `?` converts a
    /// `comet_kernels::Error` into it.
    #[error("device code of comet-comm: {0}")]
    Kernels(#[source] Box<comet_kernels::Error>),
    /// A device-side bounded wait expired: a peer never released the signal.
    #[error("signal timeout on rank {rank}: signal {signal} (released by {}) never reached epoch {expected}; last value seen {seen}", peer.map_or_else(|| "an unknown rank".to_string(), |p| format!("rank {p}")))]
    SignalTimeout {
        /// The rank that waited.
        rank: usize,
        /// The rank that should have released the signal, if known.
        peer: Option<usize>,
        /// The signal's index.
        signal: u32,
        /// The epoch waited for.
        expected: u64,
        /// The last value read.
        seen: u64,
    },
    /// A device kernel found more rows than a buffer holds.
    #[error(
        "capacity exceeded on rank {rank} (towards rank {peer}): {requested} rows requested, capacity {capacity} rows"
    )]
    CapacityExceeded {
        /// The rank that detected it.
        rank: usize,
        /// The rank whose buffer would overflow.
        peer: usize,
        /// Rows requested.
        requested: u64,
        /// Rows available.
        capacity: u64,
    },
    /// The device error word held a code this crate does not know.
    #[error("unknown device error code {code} on rank {rank}")]
    UnknownDeviceError {
        /// The rank.
        rank: usize,
        /// The code.
        code: u32,
    },
    /// An argument is out of range.
    #[error("invalid argument {name} = {value}: {limit}")]
    InvalidArgument {
        /// Argument name.
        name: &'static str,
        /// Its value.
        value: String,
        /// The limit it breaks.
        limit: String,
    },
    /// Fewer CUDA devices than ranks that need one.
    #[error("{needed} CUDA devices needed, {found} visible")]
    NotEnoughDevices {
        /// Devices needed.
        needed: usize,
        /// Devices visible.
        found: usize,
    },
    /// Ranks asked for symmetric buffers of different sizes.
    #[error(
        "symmetric allocation mismatch: rank {rank} asked for {got} bytes, rank {reference_rank} for {expected} bytes"
    )]
    SymmetricMismatch {
        /// The disagreeing rank.
        rank: usize,
        /// The reference rank.
        reference_rank: usize,
        /// The reference size.
        expected: u64,
        /// The disagreeing size.
        got: u64,
    },
    /// A peer's memory is not reachable by loads/stores from this rank.
    #[error("rank {rank} has no peer-to-peer access to rank {peer}: {reason}")]
    NoPeerAccess {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// Why.
        reason: String,
    },
    /// The communicator was aborted after an earlier failure and cannot be used.
    #[error("the communicator of rank {rank} was aborted after an earlier failure")]
    Aborted {
        /// The rank.
        rank: usize,
    },
    /// A rank's thread failed or panicked in the one-process model.
    #[error("rank {rank} failed: {message}")]
    RankFailed {
        /// The rank.
        rank: usize,
        /// What happened.
        message: String,
    },
}

impl From<comet_kernels::Error> for Error {
    fn from(e: comet_kernels::Error) -> Self {
        Error::Kernels(Box::new(e))
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        name: &'static str,
        value: impl std::fmt::Display,
        limit: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            name,
            value: value.to_string(),
            limit: limit.into(),
        }
    }
}
