//! The error type of comet-bench.

use std::path::PathBuf;

/// Everything that can go wrong in comet-bench.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration or reference error from comet-core.
    #[error(transparent)]
    Core(#[from] comet_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// `--tokens 0`.
    #[error("tokens must be at least 1, got {0}")]
    ZeroTokens(usize),
    /// A shrink factor that does not divide the preset's sizes.
    #[error(
        "shrink factor {shrink} must be >= 1 and divide hidden {hidden} and ffn {ffn} of the preset"
    )]
    BadShrink {
        /// The factor given.
        shrink: usize,
        /// The preset's hidden size.
        hidden: usize,
        /// The preset's ffn size.
        ffn: usize,
    },
    /// A simulated world size that does not divide the expert count, or exceeds the tokens.
    #[error(
        "simulated world {world} must be >= 1, divide the {experts} experts and not exceed the {tokens} tokens"
    )]
    BadWorld {
        /// The world size given.
        world: usize,
        /// The number of experts.
        experts: usize,
        /// The number of tokens.
        tokens: usize,
    },
    /// A rank report with another schema (or version) than this build reads.
    #[error("{path}: schema {found:?}, expected {expected:?}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// The schema it declares.
        found: String,
        /// The schema this build reads.
        expected: &'static str,
    },
    /// A rank report whose rank is not below its world size.
    #[error("{path}: rank {rank} is out of range for world size {world}")]
    RankOutOfRange {
        /// The file.
        path: PathBuf,
        /// The rank it declares.
        rank: usize,
        /// Its world size.
        world: usize,
    },
    /// Rank reports from runs of different world sizes.
    #[error("{path}: world size {found}, but earlier reports have {expected}")]
    WorldMismatch {
        /// The file.
        path: PathBuf,
        /// Its world size.
        found: usize,
        /// The world size of the reports before it.
        expected: usize,
    },
    /// Two reports give the same rank's result for one case.
    #[error("{path}: rank {rank} reports case {case} a second time")]
    DuplicateRank {
        /// The file with the second copy.
        path: PathBuf,
        /// The rank.
        rank: usize,
        /// The case (preset, strategy, tokens, ...).
        case: String,
    },
    /// Two baseline records give the same case.
    #[error("{path}: case {case} was already given by another input")]
    DuplicateCase {
        /// The file with the second copy.
        path: PathBuf,
        /// The case.
        case: String,
    },
    /// A case that some ranks did not report.
    #[error("case {case}: no result from rank(s) {missing:?} of world size {world}")]
    MissingRanks {
        /// The case.
        case: String,
        /// The ranks without a result.
        missing: Vec<usize>,
        /// The world size.
        world: usize,
    },
    /// A time that is not a finite positive number of milliseconds.
    #[error("{path}: case {case}: median_ms {value} is not a finite positive time")]
    BadTime {
        /// The file.
        path: PathBuf,
        /// The case.
        case: String,
        /// The value found.
        value: f64,
    },
    /// No rank reports, or reports without any case.
    #[error("no benchmark results to report")]
    NoResults,
    /// Drawing the SVG chart failed.
    #[error("chart: {0}")]
    Chart(String),
    /// The MoE layer failed (GPU benchmark, check).
    #[error(transparent)]
    Layer(#[from] comet_layer::Error),
    /// A kernel or device-buffer error.
    #[error(transparent)]
    Kernels(#[from] comet_kernels::Error),
    /// A communication or bootstrap error.
    #[error(transparent)]
    Comm(#[from] comet_comm::Error),
    /// A CUDA driver error.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// cuBLAS could not be loaded or failed.
    #[error("cuBLAS: {0}")]
    Cublas(String),
    /// A command-line value that breaks a rule.
    #[error("{what} = {value}: {rule}")]
    Arg {
        /// The option.
        what: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// An interop file (bench/INTEROP.md) that is missing, unreadable or breaks a rule.
    #[error("{path}: {message}")]
    Interop {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the value and the rule.
        message: String,
    },
    /// Fewer CUDA devices than ranks.
    #[error("{needed} CUDA device(s) needed ({why}), {found} found")]
    Gpus {
        /// Devices needed.
        needed: usize,
        /// Devices found.
        found: usize,
        /// What needs them.
        why: String,
    },
}

/// Result with comet-bench's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
