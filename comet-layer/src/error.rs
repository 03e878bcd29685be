//! The crate's error type: one variant per rule, each naming the rejected value and the limit.

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `comet-layer`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration rejected by comet-core.
    #[error(transparent)]
    Core(#[from] comet_core::Error),
    /// A kernel launch or device-buffer error.
    #[error(transparent)]
    Kernels(#[from] comet_kernels::Error),
    /// A communication error (NCCL, bootstrap, a timed-out wait).
    #[error(transparent)]
    Comm(#[from] comet_comm::Error),
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    /// Something this layer does not support (yet), e.g. tensor parallelism.
    #[error("{what} = {value} is not supported: {supported}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is supported.
        supported: &'static str,
    },
    /// [`crate::LayerOptions::gemm_sm_reserve`] leaves the expert GEMMs no SM.
    #[error(
        "gemm_sm_reserve = {reserve} leaves no SM for the expert GEMMs (limit: fewer than the device's {sms} SMs)"
    )]
    SmReserve {
        /// The reserve asked for.
        reserve: usize,
        /// SMs of the device.
        sms: usize,
    },
    /// The communicator's world size differs from the parallel configuration's.
    #[error(
        "the communicator has {communicator} ranks but the parallel config has world = {config}"
    )]
    WorldMismatch {
        /// Ranks of the communicator.
        communicator: usize,
        /// `ParallelConfig::world()`.
        config: usize,
    },
    /// The ranks built layers that differ (shape, strategy, capacity or engine).
    #[error("rank {rank} built a different layer: {theirs} (this rank: {ours})")]
    RankMismatch {
        /// The first rank that differs.
        rank: usize,
        /// Its description.
        theirs: String,
        /// This rank's description.
        ours: String,
    },
    /// A strategy string that names no strategy.
    #[error(
        "unknown strategy {value:?}: expected sequential, pipelined or pipelined:N (N >= 1 chunks)"
    )]
    ParseStrategy {
        /// The string given.
        value: String,
    },
    /// A GEMM-engine string that names no engine.
    #[error("unknown GEMM engine {value:?}: expected auto, mma or sm90")]
    ParseEngine {
        /// The string given.
        value: String,
    },
    /// A `COMET_SM90_STORES` value that is neither on nor off.
    #[error("COMET_SM90_STORES = {value:?} is not supported: expected 1 or 0 (on/off)")]
    ParseSm90Stores {
        /// The string given.
        value: String,
    },
    /// `Pipelined { chunks: 0 }`.
    #[error("chunks = 0: a pipelined layer needs at least 1 chunk")]
    ZeroChunks,
    /// More chunks than tokens in a call (a chunk would be empty).
    #[error(
        "chunks = {chunks} exceeds the {tokens} tokens of this call: every chunk needs a token"
    )]
    TooManyChunks {
        /// Chunks of the strategy.
        chunks: usize,
        /// Tokens given.
        tokens: usize,
    },
    /// `max_tokens = 0` at construction, or a call with no tokens.
    #[error("{what} = 0: at least 1 token is needed")]
    ZeroTokens {
        /// `"max_tokens"` or `"tokens of x"`.
        what: &'static str,
    },
    /// A call with more tokens than the buffers were sized for.
    #[error("{tokens} tokens exceed the layer's capacity max_tokens = {max_tokens}")]
    TooManyTokens {
        /// Tokens given.
        tokens: usize,
        /// The capacity chosen at construction.
        max_tokens: usize,
    },
    /// A tensor argument with the wrong dtype or shape.
    #[error("{what}: got {got}, expected {expected}")]
    Input {
        /// Which argument.
        what: &'static str,
        /// What was given (dtype and shape).
        got: String,
        /// What is required.
        expected: String,
    },
    /// A host array with the wrong number of elements.
    #[error("{what}: {got} elements, expected {expected}")]
    HostLength {
        /// Which array.
        what: &'static str,
        /// Elements given.
        got: usize,
        /// Elements required.
        expected: usize,
    },
    /// A size that is not a multiple of what the kernels need.
    #[error("{what} = {value} must be a multiple of {multiple} ({why})")]
    Alignment {
        /// What was measured.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The multiple required.
        multiple: usize,
        /// Why.
        why: &'static str,
    },
    /// Another rank rejected its input of this call; every rank returns an error for it
    /// (so none is left waiting on a collective).
    #[error("rank {rank} rejected its input of this layer call: {reason}")]
    PeerRejected {
        /// The rank whose input was invalid.
        rank: usize,
        /// Why, as that rank reported it.
        reason: String,
    },
    /// `backward` without a preceding `forward`, or after a forward that kept no state.
    #[error("backward needs a forward of a training layer first: {why}")]
    NoForwardState {
        /// What is missing.
        why: &'static str,
    },
    /// The all-gathered routing counts are inconsistent (a bug or a corrupted exchange).
    #[error("routing counts exchange: {what} = {value}, limit {limit}")]
    Counts {
        /// What was checked.
        what: String,
        /// The value found.
        value: usize,
        /// The bound it breaks.
        limit: usize,
    },
    /// The device reported problems (e.g. the routing plan's status word).
    #[error("{what}: the device reported {count} problem(s)")]
    DeviceStatus {
        /// Which check.
        what: &'static str,
        /// Problems counted.
        count: i64,
    },
}
