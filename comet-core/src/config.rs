//! Layer shapes ([`MoeConfig`]) and how ranks split the layer ([`ParallelConfig`]), both
//! validated on construction.

use serde::{Deserialize, Serialize};

use crate::dtype::{Activation, DType};
use crate::error::{Error, Result};

/// Largest number of elements (rows·cols) of any single matrix a kernel indexes.
///
/// The GPU kernels index each 2-D matrix with `u32` element offsets: `x`/`y` `[rows, H]`,
/// `h` `[rows, n0]`, `a` `[rows, F]`, `w0[e]` `[n0, H]`, `w1[e]` `[H, F]`, `wr` `[E, H]`.
/// Offsets of one expert's matrix inside the stacked `[E, ..]` weight tensors are computed in
/// 64 bits, so the stacked tensors themselves may exceed this limit (DeepSeek-V3's `w0` does).
pub const MAX_TENSOR_ELEMS: usize = u32::MAX as usize;

/// Checks that `rows * cols` fits both `usize` and [`MAX_TENSOR_ELEMS`].
pub(crate) fn check_matrix(what: &'static str, rows: usize, cols: usize) -> Result<usize> {
    let elements = (rows as u128) * (cols as u128);
    if elements > MAX_TENSOR_ELEMS as u128 {
        return Err(Error::ExceedsIndexType {
            what,
            elements,
            limit: MAX_TENSOR_ELEMS as u64,
        });
    }
    // Fits in u32, hence in usize on every platform with usize >= 32 bits.
    usize::try_from(elements).map_err(|_| Error::SizeOverflow {
        what,
        dims: vec![rows, cols],
    })
}

/// Checks that the product of `dims` fits in `usize`.
pub(crate) fn checked_product(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::SizeOverflow {
            what,
            dims: dims.to_vec(),
        })
}

/// Shapes and numerics of one MoE layer.
///
/// Construct with [`MoeConfig::new`] (SwiGLU, bf16, no renormalisation) and adjust with the
/// `with_*` builders. Invariants, checked by `new`:
/// - `hidden`, `ffn`, `experts` ≥ 1 and `1 ≤ top_k ≤ experts`;
/// - every per-matrix element count fits [`MAX_TENSOR_ELEMS`]: `w0[e]` `[2·ffn, hidden]`
///   (checked for SwiGLU's `n0 = 2·ffn`, the larger of the two activations, so switching
///   activation can never break it) and `wr` `[experts, hidden]`;
/// - the stacked weights `experts · 2·ffn · hidden` fit in `usize`.
///
/// Token-dependent limits (`rows · max(hidden, n0)`) are checked by [`MoeConfig::check_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MoeConfigSpec", into = "MoeConfigSpec")]
pub struct MoeConfig {
    hidden: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    activation: Activation,
    dtype: DType,
    renormalize: bool,
}

/// The unvalidated, serialisable form of [`MoeConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct MoeConfigSpec {
    hidden: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    #[serde(default)]
    activation: Activation,
    #[serde(default)]
    dtype: DType,
    #[serde(default)]
    renormalize: bool,
}

impl TryFrom<MoeConfigSpec> for MoeConfig {
    type Error = Error;
    fn try_from(s: MoeConfigSpec) -> Result<Self> {
        Ok(MoeConfig::new(s.hidden, s.ffn, s.experts, s.top_k)?
            .with_activation(s.activation)
            .with_dtype(s.dtype)
            .with_renormalize(s.renormalize))
    }
}

impl From<MoeConfig> for MoeConfigSpec {
    fn from(c: MoeConfig) -> Self {
        MoeConfigSpec {
            hidden: c.hidden,
            ffn: c.ffn,
            experts: c.experts,
            top_k: c.top_k,
            activation: c.activation,
            dtype: c.dtype,
            renormalize: c.renormalize,
        }
    }
}

impl MoeConfig {
    /// A SwiGLU, bf16 layer without top-k renormalisation; see the type's invariants.
    ///
    /// # Errors
    /// [`Error::ZeroSize`], [`Error::TopKZero`], [`Error::TopKExceedsExperts`],
    /// [`Error::ExceedsIndexType`] or [`Error::SizeOverflow`], naming the value and the rule.
    pub fn new(hidden: usize, ffn: usize, experts: usize, top_k: usize) -> Result<Self> {
        for (name, v) in [("hidden", hidden), ("ffn", ffn), ("experts", experts)] {
            if v == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        if top_k == 0 {
            return Err(Error::TopKZero);
        }
        if top_k > experts {
            return Err(Error::TopKExceedsExperts { top_k, experts });
        }
        let n0_max = ffn.checked_mul(2).ok_or_else(|| Error::SizeOverflow {
            what: "n0 = 2*ffn",
            dims: vec![2, ffn],
        })?;
        check_matrix("w0[e] [2*ffn, hidden]", n0_max, hidden)?;
        check_matrix("w1[e] [hidden, ffn]", hidden, ffn)?;
        check_matrix("wr [experts, hidden]", experts, hidden)?;
        checked_product("w0 [experts, 2*ffn, hidden]", &[experts, n0_max, hidden])?;
        Ok(MoeConfig {
            hidden,
            ffn,
            experts,
            top_k,
            activation: Activation::SwiGlu,
            dtype: DType::BF16,
            renormalize: false,
        })
    }

    /// Builds without validation; only for shapes known to pass [`MoeConfig::new`].
    pub(crate) const fn new_unchecked(
        hidden: usize,
        ffn: usize,
        experts: usize,
        top_k: usize,
    ) -> Self {
        MoeConfig {
            hidden,
            ffn,
            experts,
            top_k,
            activation: Activation::SwiGlu,
            dtype: DType::BF16,
            renormalize: false,
        }
    }

    /// The same layer with another activation (changes [`MoeConfig::n0`]).
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// The same layer with another GPU element type.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The same layer with top-k weight renormalisation on or off.
    pub fn with_renormalize(mut self, renormalize: bool) -> Self {
        self.renormalize = renormalize;
        self
    }

    /// Model width `H`.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Expert FFN width `F`.
    pub fn ffn(&self) -> usize {
        self.ffn
    }

    /// Number of experts `E`.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Experts per token `k`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Expert activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// GPU element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the top-k weights are divided by their sum.
    pub fn renormalize(&self) -> bool {
        self.renormalize
    }

    /// Rows of `w0[e]`: `2·F` for SwiGLU, `F` for GeLU.
    pub fn n0(&self) -> usize {
        self.activation.n0_factor() * self.ffn
    }

    /// Expert GEMM FLOPs of a forward pass over `tokens` tokens:
    /// `2 · tokens · k · (H·n0 + F·H)` (router and activation not counted).
    pub fn flops_forward(&self, tokens: usize) -> f64 {
        let per_row = (self.hidden * self.n0()) as f64 + (self.ffn * self.hidden) as f64;
        2.0 * tokens as f64 * self.top_k as f64 * per_row
    }

    /// Expert GEMM FLOPs of a backward pass (input and weight gradients of both GEMMs):
    /// `2 ·` [`MoeConfig::flops_forward`].
    pub fn flops_backward(&self, tokens: usize) -> f64 {
        2.0 * self.flops_forward(tokens)
    }

    /// Checks that activation matrices of `rows` rows (`[rows, H]`, `[rows, n0]`) fit
    /// [`MAX_TENSOR_ELEMS`]. Call it with the token count of `x` and with the receive-buffer
    /// rows ([`crate::routing::RoutingPlan::max_recv_rows`]).
    ///
    /// # Errors
    /// [`Error::ExceedsIndexType`] naming the tensor.
    pub fn check_rows(&self, rows: usize) -> Result<()> {
        check_matrix("activations [rows, hidden]", rows, self.hidden)?;
        check_matrix("activations [rows, n0]", rows, self.n0())?;
        Ok(())
    }
}

/// How `world` ranks split one MoE layer: `ep` expert-parallel groups × `tp` tensor-parallel
/// ranks, `ep · tp = world`.
///
/// Rank numbering is expert-parallel-major: rank `r` is expert-parallel rank `r / tp` and
/// tensor-parallel rank `r % tp` (tensor-parallel peers are adjacent). Expert `e` lives on
/// expert-parallel rank `e / L`, `L = experts / ep`, as local expert `e % L`; with `tp > 1`
/// each of the `tp` ranks holds `ffn / tp` of its FFN columns (see
/// [`crate::reference::MoeWeights::local`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "ParallelSpec", into = "ParallelSpec")]
pub struct ParallelConfig {
    world: usize,
    ep: usize,
    tp: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct ParallelSpec {
    world: usize,
    ep: usize,
    tp: usize,
}

impl TryFrom<ParallelSpec> for ParallelConfig {
    type Error = Error;
    fn try_from(s: ParallelSpec) -> Result<Self> {
        ParallelConfig::new(s.world, s.ep, s.tp)
    }
}

impl From<ParallelConfig> for ParallelSpec {
    fn from(p: ParallelConfig) -> Self {
        ParallelSpec {
            world: p.world,
            ep: p.ep,
            tp: p.tp,
        }
    }
}

impl ParallelConfig {
    /// `world` ranks as `ep` expert-parallel × `tp` tensor-parallel.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] if any is 0; [`Error::WorldMismatch`] if `ep · tp ≠ world`.
    pub fn new(world: usize, ep: usize, tp: usize) -> Result<Self> {
        for (name, v) in [("world", world), ("ep", ep), ("tp", tp)] {
            if v == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        if ep.checked_mul(tp) != Some(world) {
            return Err(Error::WorldMismatch { ep, tp, world });
        }
        Ok(ParallelConfig { world, ep, tp })
    }

    /// Pure expert parallelism: `ep = world`, `tp = 1`.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] if `world` is 0.
    pub fn expert_parallel(world: usize) -> Result<Self> {
        ParallelConfig::new(world, world, 1)
    }

    /// Checks this split against a layer: `experts % ep == 0` and `ffn % tp == 0`.
    ///
    /// # Errors
    /// [`Error::ExpertsNotDivisible`] or [`Error::FfnNotDivisible`].
    pub fn validate_for(&self, cfg: &MoeConfig) -> Result<()> {
        if cfg.experts() % self.ep != 0 {
            return Err(Error::ExpertsNotDivisible {
                experts: cfg.experts(),
                ep: self.ep,
            });
        }
        if cfg.ffn() % self.tp != 0 {
            return Err(Error::FfnNotDivisible {
                ffn: cfg.ffn(),
                tp: self.tp,
            });
        }
        Ok(())
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Expert-parallel degree.
    pub fn ep(&self) -> usize {
        self.ep
    }

    /// Tensor-parallel degree.
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// Experts per expert-parallel rank, `L = experts / ep` (exact once
    /// [`ParallelConfig::validate_for`] passed; rounded down otherwise).
    pub fn local_experts(&self, cfg: &MoeConfig) -> usize {
        cfg.experts() / self.ep
    }

    /// FFN columns per tensor-parallel rank, `ffn / tp` (exact once
    /// [`ParallelConfig::validate_for`] passed).
    pub fn local_ffn(&self, cfg: &MoeConfig) -> usize {
        cfg.ffn() / self.tp
    }

    /// Expert-parallel rank of `rank`: `rank / tp`.
    pub fn ep_rank(&self, rank: usize) -> usize {
        rank / self.tp
    }

    /// Tensor-parallel rank of `rank`: `rank % tp`.
    pub fn tp_rank(&self, rank: usize) -> usize {
        rank % self.tp
    }

    /// Checks `rank < world`.
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`].
    pub fn check_rank(&self, rank: usize) -> Result<()> {
        if rank >= self.world {
            return Err(Error::RankOutOfRange {
                rank,
                world: self.world,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sets_defaults_and_derived_sizes() {
        let c = MoeConfig::new(64, 48, 8, 2).unwrap();
        assert_eq!(
            (c.hidden(), c.ffn(), c.experts(), c.top_k()),
            (64, 48, 8, 2)
        );
        assert_eq!(c.activation(), Activation::SwiGlu);
        assert_eq!(c.dtype(), DType::BF16);
        assert!(!c.renormalize());
        assert_eq!(c.n0(), 96);
        let g = c
            .with_activation(Activation::Gelu)
            .with_dtype(DType::F16)
            .with_renormalize(true);
        assert_eq!(g.n0(), 48);
        assert_eq!(g.dtype(), DType::F16);
        assert!(g.renormalize());
    }

    #[test]
    fn flops_match_formula() {
        let c = MoeConfig::new(4096, 14336, 8, 2).unwrap();
        let want = 2.0 * 8192.0 * 2.0 * (4096.0 * 28672.0 + 14336.0 * 4096.0);
        assert_eq!(c.flops_forward(8192), want);
        assert_eq!(c.flops_backward(8192), 2.0 * want);
        let g = c.with_activation(Activation::Gelu);
        assert_eq!(
            g.flops_forward(1),
            2.0 * 2.0 * (4096.0 * 14336.0 + 14336.0 * 4096.0)
        );
    }

    #[test]
    fn each_invalid_size_is_its_own_error() {
        assert_eq!(
            MoeConfig::new(0, 1, 1, 1),
            Err(Error::ZeroSize { name: "hidden" })
        );
        assert_eq!(
            MoeConfig::new(1, 0, 1, 1),
            Err(Error::ZeroSize { name: "ffn" })
        );
        assert_eq!(
            MoeConfig::new(1, 1, 0, 1),
            Err(Error::ZeroSize { name: "experts" })
        );
        assert_eq!(MoeConfig::new(1, 1, 4, 0), Err(Error::TopKZero));
        assert_eq!(
            MoeConfig::new(1, 1, 4, 5),
            Err(Error::TopKExceedsExperts {
                top_k: 5,
                experts: 4
            })
        );
        // 2*ffn*hidden = 2^33 > u32::MAX.
        let e = MoeConfig::new(1 << 16, 1 << 16, 8, 2).unwrap_err();
        assert!(
            matches!(e, Error::ExceedsIndexType { what, elements, .. }
                if what.starts_with("w0[e]") && elements == 1u128 << 33),
            "{e}"
        );
        // Router [E, H] too big while the expert matrices fit.
        let e = MoeConfig::new(1 << 20, 1, 1 << 12, 1).unwrap_err();
        assert!(
            matches!(e, Error::ExceedsIndexType { what, .. } if what.starts_with("wr")),
            "{e}"
        );
        // 2*ffn overflows usize.
        let e = MoeConfig::new(1, usize::MAX / 2 + 1, 1, 1).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { .. }), "{e}");
        let msg = MoeConfig::new(1, 1, 4, 5).unwrap_err().to_string();
        assert!(
            msg.contains("top_k = 5") && msg.contains("experts = 4"),
            "{msg}"
        );
    }

    #[test]
    fn largest_preset_shape_is_accepted() {
        // DeepSeek-V3: stacked w0 has 7.5e9 elements (> u32) but each w0[e] fits.
        let c = MoeConfig::new(7168, 2048, 256, 8).unwrap();
        assert!(c.experts() * c.n0() * c.hidden() > MAX_TENSOR_ELEMS);
        c.check_rows(8 * 8192 * 8).unwrap();
        let e = c.check_rows(1 << 20).unwrap_err();
        assert!(matches!(e, Error::ExceedsIndexType { .. }), "{e}");
    }

    #[test]
    fn serde_round_trip_validates() {
        let c = MoeConfig::new(32, 16, 4, 2)
            .unwrap()
            .with_activation(Activation::Gelu)
            .with_renormalize(true);
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"activation\":\"gelu\""), "{s}");
        assert_eq!(serde_json::from_str::<MoeConfig>(&s).unwrap(), c);
        let bad = r#"{"hidden":32,"ffn":16,"experts":4,"top_k":0}"#;
        let e = serde_json::from_str::<MoeConfig>(bad).unwrap_err();
        assert!(e.to_string().contains("top_k = 0"), "{e}");
        let p = ParallelConfig::new(4, 2, 2).unwrap();
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<ParallelConfig>(&s).unwrap(), p);
        let bad = r#"{"world":4,"ep":3,"tp":1}"#;
        assert!(serde_json::from_str::<ParallelConfig>(bad).is_err());
    }

    #[test]
    fn parallel_config_rules() {
        let p = ParallelConfig::new(8, 4, 2).unwrap();
        assert_eq!((p.world(), p.ep(), p.tp()), (8, 4, 2));
        assert_eq!((p.ep_rank(5), p.tp_rank(5)), (2, 1));
        assert_eq!(
            ParallelConfig::new(8, 3, 2),
            Err(Error::WorldMismatch {
                ep: 3,
                tp: 2,
                world: 8
            })
        );
        assert_eq!(
            ParallelConfig::new(0, 0, 1),
            Err(Error::ZeroSize { name: "world" })
        );
        assert_eq!(
            ParallelConfig::new(2, 2, 0),
            Err(Error::ZeroSize { name: "tp" })
        );
        assert_eq!(
            ParallelConfig::new(usize::MAX, usize::MAX, 2),
            Err(Error::WorldMismatch {
                ep: usize::MAX,
                tp: 2,
                world: usize::MAX
            })
        );
        let ep = ParallelConfig::expert_parallel(4).unwrap();
        assert_eq!((ep.ep(), ep.tp()), (4, 1));
        let cfg = MoeConfig::new(16, 12, 8, 2).unwrap();
        ep.validate_for(&cfg).unwrap();
        assert_eq!(ep.local_experts(&cfg), 2);
        assert_eq!(
            ParallelConfig::expert_parallel(3)
                .unwrap()
                .validate_for(&cfg),
            Err(Error::ExpertsNotDivisible { experts: 8, ep: 3 })
        );
        assert_eq!(
            ParallelConfig::new(10, 2, 5).unwrap().validate_for(&cfg),
            Err(Error::FfnNotDivisible { ffn: 12, tp: 5 })
        );
        assert_eq!(
            ep.check_rank(4),
            Err(Error::RankOutOfRange { rank: 4, world: 4 })
        );
        assert_eq!(ParallelConfig::new(6, 2, 3).unwrap().local_ffn(&cfg), 4);
    }
}
