//! The crate's error type: one variant per broken rule, each naming the rejected value and
//! the limit it broke.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in `comet-sched`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A size that must be at least 1 was 0.
    #[error("{name} = 0: {name} must be at least 1")]
    ZeroSize {
        /// Which size (`"bm"`, `"bn"`, `"n"`, `"chunk rows"`, ...).
        name: &'static str,
    },

    /// A value that must be a multiple of another was not.
    #[error("{what} = {value} is not a multiple of {multiple_of}")]
    NotMultiple {
        /// What the value is (e.g. `"column group width"`).
        what: &'static str,
        /// The rejected value.
        value: usize,
        /// The value it must be a multiple of (e.g. the tile width `bn`).
        multiple_of: usize,
    },

    /// A value was above its limit.
    #[error("{what} = {value} exceeds its limit {limit}")]
    TooLarge {
        /// What the value is.
        what: &'static str,
        /// The rejected value.
        value: u128,
        /// The largest value allowed.
        limit: u128,
    },

    /// `n_comm` leaves no SM for the GEMM.
    #[error(
        "n_comm = {n_comm} communication blocks leave no GEMM block on {sms} SMs: n_comm must be < {sms}"
    )]
    NCommTooLarge {
        /// The requested number of communication blocks.
        n_comm: usize,
        /// SMs of the GPU.
        sms: usize,
    },

    /// A rank index was out of range.
    #[error("rank {rank} is out of range: ranks are 0..{world}")]
    RankOutOfRange {
        /// The rejected rank.
        rank: usize,
        /// The number of ranks.
        world: usize,
    },

    /// Two things that must agree in length or size did not.
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        /// What was compared (e.g. `"schedules (one per rank)"`).
        what: &'static str,
        /// The value required.
        expected: usize,
        /// The value given.
        got: usize,
    },

    /// A schedule refers to something that does not exist (a flag, a row, a tile).
    #[error("{what}: index {index} is out of range 0..{len}")]
    OutOfRange {
        /// What was indexed (e.g. `"flag of tile 7"`).
        what: String,
        /// The rejected index.
        index: usize,
        /// The number of valid entries.
        len: usize,
    },

    /// A schedule broke one of its invariants (see [`crate::layer0::Layer0Schedule::check`]).
    #[error("schedule invariant broken: {0}")]
    Invariant(String),

    /// A non-finite or negative model parameter.
    #[error("cost model parameter {name} = {value}: must be finite and > 0")]
    BadParameter {
        /// The parameter's name.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },

    /// A wait of the host executor ran past its deadline (a dependency never released).
    #[error("{what} timed out after {waited_ms} ms")]
    Timeout {
        /// Who waited for what.
        what: String,
        /// How long it waited.
        waited_ms: u128,
    },

    /// A thread of the host executor panicked (a bug in the executor, reported, not
    /// propagated).
    #[error("executor thread panicked: {0}")]
    ThreadPanicked(String),

    /// Reading or writing a tuning table failed.
    #[error("tuning table {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A tuning table was not valid JSON of the expected schema.
    #[error("tuning table {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },

    /// An error of `comet-core` (shapes, routing).
    #[error(transparent)]
    Core(#[from] comet_core::Error),
}

/// `Result` with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
