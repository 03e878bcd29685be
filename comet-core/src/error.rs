//! The crate's error type: one variant per broken rule, each naming the offending value and
//! the rule it breaks.

use thiserror::Error;

/// Everything that can go wrong in `comet-core`.
///
/// Every variant names the value that was rejected and the rule it broke, so the message alone
/// tells the caller what to change.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A size that must be at least 1 was 0.
    #[error("{name} = 0: {name} must be at least 1")]
    ZeroSize {
        /// Which size (`"hidden"`, `"ffn"`, `"experts"`, `"world"`, ...).
        name: &'static str,
    },

    /// `top_k` was 0.
    #[error("top_k = 0: each token must be routed to at least one expert (1 <= top_k <= experts)")]
    TopKZero,

    /// `top_k` was larger than the number of experts.
    #[error(
        "top_k = {top_k} exceeds experts = {experts}: top_k must satisfy 1 <= top_k <= experts"
    )]
    TopKExceedsExperts {
        /// The requested top-k.
        top_k: usize,
        /// The number of experts.
        experts: usize,
    },

    /// A product of sizes does not fit in `usize`.
    #[error("{what} overflows usize: the product of {dims:?} cannot be represented")]
    SizeOverflow {
        /// What the product describes (e.g. `"w0 elements experts*n0*hidden"`).
        what: &'static str,
        /// The factors.
        dims: Vec<usize>,
    },

    /// A tensor has more elements (rows·cols) than the kernels' 32-bit index type can address.
    #[error(
        "{what} has {elements} elements (rows*cols), more than the kernels' u32 index limit {limit}"
    )]
    ExceedsIndexType {
        /// Which tensor (e.g. `"w0[e] [n0, hidden]"`).
        what: &'static str,
        /// Its number of elements.
        elements: u128,
        /// The limit ([`crate::MAX_TENSOR_ELEMS`]).
        limit: u64,
    },

    /// `experts` is not a multiple of the expert-parallel degree.
    #[error(
        "experts = {experts} is not divisible by ep = {ep}: every rank must hold experts/ep experts"
    )]
    ExpertsNotDivisible {
        /// The number of experts.
        experts: usize,
        /// The expert-parallel degree (the world size for a routing plan).
        ep: usize,
    },

    /// `ffn` is not a multiple of the tensor-parallel degree.
    #[error(
        "ffn = {ffn} is not divisible by tp = {tp}: every tensor-parallel rank must hold ffn/tp columns"
    )]
    FfnNotDivisible {
        /// The expert FFN width.
        ffn: usize,
        /// The tensor-parallel degree.
        tp: usize,
    },

    /// `ep * tp` differs from the world size.
    #[error(
        "ep * tp = {ep} * {tp} does not equal world = {world}: the ranks must split exactly into ep x tp"
    )]
    WorldMismatch {
        /// The expert-parallel degree.
        ep: usize,
        /// The tensor-parallel degree.
        tp: usize,
        /// The world size.
        world: usize,
    },

    /// A rank index is not below the world size.
    #[error("rank {rank} is out of range: ranks are 0..{world}")]
    RankOutOfRange {
        /// The rank given.
        rank: usize,
        /// The world size.
        world: usize,
    },

    /// An expert id is not below the number of experts.
    #[error(
        "expert id {id} at rank {rank}, token {token}, slot {slot} is out of range: ids are 0..{experts}"
    )]
    ExpertIdOutOfRange {
        /// Source rank of the token.
        rank: usize,
        /// Token index on that rank.
        token: usize,
        /// Top-k slot.
        slot: usize,
        /// The id found.
        id: u32,
        /// The number of experts.
        experts: usize,
    },

    /// A token selects the same expert in two of its top-k slots.
    #[error(
        "expert id {id} appears twice for rank {rank}, token {token} (slots {first} and {second}): a token's top-k experts must be distinct"
    )]
    DuplicateExpert {
        /// Source rank of the token.
        rank: usize,
        /// Token index on that rank.
        token: usize,
        /// The repeated id.
        id: u32,
        /// First slot holding it.
        first: usize,
        /// Second slot holding it.
        second: usize,
    },

    /// An array has the wrong shape.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which array (and which axis rule).
        what: &'static str,
        /// The shape required (`usize::MAX` is never used; every entry is a concrete size).
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },

    /// A list has the wrong number of entries (e.g. one id array per rank).
    #[error("{what} has {got} entries, expected {expected}")]
    LengthMismatch {
        /// Which list.
        what: &'static str,
        /// The number required.
        expected: usize,
        /// The number given.
        got: usize,
    },

    /// A router logit is NaN or infinite, so softmax/top-k would be undefined.
    #[error("router logit for token {token}, expert {expert} is {value}: logits must be finite")]
    NonFiniteLogit {
        /// Token (row) index.
        token: usize,
        /// Expert (column) index.
        expert: usize,
        /// The value found, as f64.
        value: f64,
    },

    /// The operation does not support tensor parallelism (tp > 1) yet.
    #[error("tp = {tp}: {what} supports only tp = 1 (pure expert parallelism)")]
    TensorParallelUnsupported {
        /// What was asked.
        what: &'static str,
        /// The tensor-parallel degree given.
        tp: usize,
    },

    /// A byte buffer's length is not a multiple of the element size.
    #[error("byte buffer of {len} bytes is not a multiple of the {dtype} element size {size}")]
    ByteLength {
        /// The buffer length.
        len: usize,
        /// The dtype's name.
        dtype: &'static str,
        /// The dtype's size in bytes.
        size: usize,
    },

    /// A string names no known dtype.
    #[error("unknown dtype {value:?}: expected one of bf16, f16, f32")]
    ParseDType {
        /// The string given.
        value: String,
    },

    /// A string names no known activation.
    #[error("unknown activation {value:?}: expected swiglu or gelu")]
    ParseActivation {
        /// The string given.
        value: String,
    },

    /// A string names no known model preset.
    #[error(
        "unknown preset {value:?}: expected one of mixtral-8x7b, qwen2-moe-2.7b, phi-3.5-moe, deepseek-v3"
    )]
    ParsePreset {
        /// The string given.
        value: String,
    },
}

/// `Result` with this crate's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;
