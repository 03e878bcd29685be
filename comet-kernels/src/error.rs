//! The crate's error type.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `comet-kernels`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No CUDA toolkit include directory with `cuda_bf16.h` was found.
    #[error("CUDA toolkit headers (cuda_bf16.h) not found; tried: {tried}")]
    ToolkitNotFound {
        /// Every candidate that was tried, with the reason it was rejected.
        tried: String,
    },
    /// A CUDA library (driver, NVRTC, cuBLAS) could not be loaded.
    #[error("the CUDA library `{library}` could not be loaded (is it on the loader path?)")]
    LibraryMissing {
        /// Library name as cudarc looks it up.
        library: &'static str,
    },
    /// NVRTC rejected a kernel; `log` is NVRTC's program log.
    #[error("NVRTC failed to compile `{program}` for {arch} (options: {options}):\n{log}")]
    Compile {
        /// Program name.
        program: String,
        /// Target architecture, e.g. `sm_90a`.
        arch: String,
        /// Options passed to NVRTC, space separated.
        options: String,
        /// NVRTC's program log.
        log: String,
    },
    /// An NVRTC call other than compilation failed.
    #[error("NVRTC call {call} failed: {code}")]
    Nvrtc {
        /// Function name.
        call: &'static str,
        /// NVRTC result code.
        code: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// Reading or writing the on-disk kernel cache failed.
    #[error("kernel cache I/O on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A tensor had the wrong element type.
    #[error("{what}: dtype {got}, expected {expected}")]
    DType {
        /// Which argument.
        what: String,
        /// The dtype found.
        got: String,
        /// The dtype(s) allowed.
        expected: String,
    },
    /// A tensor had the wrong shape.
    #[error("{what}: shape {got:?}, expected {expected}")]
    Shape {
        /// Which argument.
        what: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape expected, in words.
        expected: String,
    },
    /// A size exceeded a limit of a kernel.
    #[error("{what} = {value} is out of range (limit {limit})")]
    Limit {
        /// What was measured.
        what: String,
        /// The value given.
        value: usize,
        /// The limit it breaks.
        limit: String,
    },
    /// A size is not a multiple of what a kernel needs.
    #[error("{what} = {value} must be a multiple of {multiple} ({why})")]
    Alignment {
        /// What was measured.
        what: String,
        /// The value given.
        value: usize,
        /// The multiple required.
        multiple: usize,
        /// Why.
        why: &'static str,
    },
    /// A host buffer had the wrong length for a transfer.
    #[error("{what}: host buffer has {got} elements, device tensor has {expected}")]
    HostLength {
        /// Which transfer.
        what: String,
        /// Host elements.
        got: usize,
        /// Device elements.
        expected: usize,
    },
    /// Tensors live on different devices/contexts.
    #[error("{what}: tensor belongs to device {got}, operation runs on device {expected}")]
    WrongDevice {
        /// Which argument.
        what: String,
        /// Ordinal of the tensor.
        got: usize,
        /// Ordinal of the operation.
        expected: usize,
    },
    /// A configuration rejected by comet-core.
    #[error(transparent)]
    Core(#[from] comet_core::Error),
    /// A device-side check reported problems (e.g. the routing plan's status word).
    #[error("{what}: the device reported {count} problem(s)")]
    DeviceStatus {
        /// Which kernel.
        what: String,
        /// Problems counted on the device.
        count: i64,
    },
    /// An invalid argument that fits no other variant.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl Error {
    /// Shorthand for a [`Error::Limit`].
    pub(crate) fn limit(what: impl Into<String>, value: usize, limit: impl Into<String>) -> Self {
        Error::Limit {
            what: what.into(),
            value,
            limit: limit.into(),
        }
    }

    /// Shorthand for a [`Error::Shape`].
    pub(crate) fn shape(
        what: impl Into<String>,
        got: &[usize],
        expected: impl Into<String>,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            got: got.to_vec(),
            expected: expected.into(),
        }
    }
}
