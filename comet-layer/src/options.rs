//! How a layer runs: the [`Strategy`], the GEMM engine and the buffer capacity
//! ([`LayerOptions`]).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Chunks of [`Strategy::Pipelined`] when a string says just `pipelined`.
pub const DEFAULT_CHUNKS: usize = 4;

/// A value to try for [`LayerOptions::gemm_sm_reserve`] on an H200 (132 SMs). NCCL's
/// all-to-all-v over NVLink between 2 GPUs runs on the order of 8–16 channels, one block per
/// channel, so 16 SMs let a whole chunk's exchange run beside the GEMMs while they keep ~88%
/// of the SMs. Measured on 2 × H200 at 8192 tokens per rank it does not pay off
/// (`bench/results/2026-11-29-s2-layer-stores-reserve-h200x2.json`). Forward Pipelined(4)
/// with 0 → 16 SMs reserved, in ms:
/// - Mixtral 10.44 → 10.88;
/// - Qwen2-MoE 2.53 → 2.44;
/// - Phi-3.5 5.38 → 5.49;
/// - DeepSeek-V3 20.66 → 19.27.
///
/// Pipelined stays slower than Sequential either way, so the default stays 0. Sweep it with
/// `comet-bench run --gemm-sm-reserve N`.
pub const SUGGESTED_GEMM_SM_RESERVE: usize = 16;

/// How communication and computation are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Routing, dispatch (NCCL all-to-all-v), expert GEMMs, combine (all-to-all-v back), one
    /// after another on one stream: the Megatron-style reference point.
    Sequential,
    /// Tokens split into `chunks` chunks; while chunk `i`'s experts run on the compute
    /// stream, chunk `i + 1`'s dispatch and chunk `i − 1`'s combine run on a communication
    /// stream (events between them): the Tutel/FasterMoE-style coarse-grained overlap.
    Pipelined {
        /// Number of token chunks (≥ 1, ≤ the tokens of every call).
        chunks: usize,
    },
}

impl Strategy {
    /// Token chunks: 1 for [`Strategy::Sequential`].
    pub fn chunks(&self) -> usize {
        match self {
            Strategy::Sequential => 1,
            Strategy::Pipelined { chunks } => *chunks,
        }
    }

    /// The name used in reports: `sequential` or `pipelined`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Sequential => "sequential",
            Strategy::Pipelined { .. } => "pipelined",
        }
    }

    /// Checks the strategy on its own (chunks ≥ 1).
    pub fn validate(&self) -> Result<()> {
        if self.chunks() == 0 {
            return Err(Error::ZeroChunks);
        }
        Ok(())
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Sequential => f.write_str("sequential"),
            Strategy::Pipelined { chunks } => write!(f, "pipelined:{chunks}"),
        }
    }
}

impl FromStr for Strategy {
    type Err = Error;

    /// `sequential`, `pipelined` ([`DEFAULT_CHUNKS`] chunks) or `pipelined:N` (also `-N`).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || Error::ParseStrategy {
            value: s.to_string(),
        };
        if t == "sequential" || t == "seq" {
            return Ok(Strategy::Sequential);
        }
        if t == "pipelined" {
            return Ok(Strategy::Pipelined {
                chunks: DEFAULT_CHUNKS,
            });
        }
        let rest = t
            .strip_prefix("pipelined:")
            .or_else(|| t.strip_prefix("pipelined-"))
            .ok_or_else(bad)?;
        let chunks: usize = rest.parse().map_err(|_| bad())?;
        if chunks == 0 {
            return Err(Error::ZeroChunks);
        }
        Ok(Strategy::Pipelined { chunks })
    }
}

/// Which grouped-GEMM engine runs the expert GEMMs (forward and data gradients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GemmEngine {
    /// The Hopper engine (TMA + wgmma) where the device is sm_90 and the problem fits it,
    /// else the portable `mma.sync` engine.
    #[default]
    Auto,
    /// Always the portable `mma.sync` engine.
    MmaSync,
    /// Always the Hopper engine (an error on other devices or unsupported shapes).
    Sm90,
}

impl GemmEngine {
    /// The environment variable [`LayerOptions::new`] reads (`auto`, `mma`, `sm90`).
    pub const ENV: &'static str = "COMET_GEMM_ENGINE";

    /// The engine `COMET_GEMM_ENGINE` names, or [`GemmEngine::Auto`] when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(GemmEngine::Auto),
        }
    }

    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            GemmEngine::Auto => "auto",
            GemmEngine::MmaSync => "mma",
            GemmEngine::Sm90 => "sm90",
        }
    }
}

impl fmt::Display for GemmEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GemmEngine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(GemmEngine::Auto),
            "mma" | "mma.sync" | "mma_sync" | "mmasync" => Ok(GemmEngine::MmaSync),
            "sm90" | "hopper" | "wgmma" => Ok(GemmEngine::Sm90),
            _ => Err(Error::ParseEngine {
                value: s.to_string(),
            }),
        }
    }
}

/// Options of [`crate::MoeLayer::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOptions {
    /// The strategy.
    pub strategy: Strategy,
    /// Most tokens any rank passes to one call: every device buffer is sized for it at
    /// construction (receive buffers for the worst case `W · max_tokens · min(k, L)` rows), so
    /// calls allocate nothing. Every rank must use the same value.
    pub max_tokens: usize,
    /// Keep what backward needs (a copy of `x`, the pre-activation) and allocate the backward
    /// buffers and the gradients. `false` gives an inference layer (`backward` is an error).
    pub training: bool,
    /// GEMM engine of the expert GEMMs.
    pub engine: GemmEngine,
    /// SMs that the expert GEMMs of [`Strategy::Pipelined`] leave free (their persistent
    /// grids are capped at `SMs − reserve` SMs' worth of blocks), so that the communication
    /// stream's kernels (NCCL, permutes) run beside them instead of waiting for a GEMM to
    /// drain. 0 (the default) = every SM, as before; [`Strategy::Sequential`] ignores it
    /// (nothing runs beside its GEMMs). Must be below the device's SM count
    /// ([`crate::Error::SmReserve`]). See [`SUGGESTED_GEMM_SM_RESERVE`].
    pub gemm_sm_reserve: usize,
    /// The Hopper engine's training stores, on by default. When the Hopper engine takes a
    /// layer's GEMMs (the same rule as [`LayerOptions::engine`]: `auto` on sm_90 where the
    /// problem fits, or `sm90`), the expert weight gradients run on its f32 store
    /// (`dW[g] += aᵀ·b`, or `dW[g] = aᵀ·b` for a backward's first write after
    /// [`crate::MoeLayer::zero_grad`]) and a training forward's GEMM0 stores the pre-activation and the
    /// activation in one kernel. On 2×H200 the Hopper engine's accumulating weight gradient
    /// beats the `mma.sync` one on every preset (e.g. Mixtral 503 vs 288 TFLOP/s; gemm_bench
    /// 2026-11-29 session 2 call A, `bench/results/`). `false` (`COMET_SM90_STORES=0` or
    /// `.sm90_training_stores(false)`) keeps the weight gradients on the `mma.sync` engine
    /// and GEMM0 on a pre-activation store plus a separate activation kernel. Default from
    /// `COMET_SM90_STORES` (`1` or `0`, on when unset; see
    /// [`LayerOptions::SM90_STORES_ENV`]). The router's weight gradient (one group) always
    /// runs on `mma.sync`; without the Hopper engine the option changes nothing.
    pub sm90_training_stores: bool,
}

impl LayerOptions {
    /// Options with `strategy` and capacity `max_tokens`, training on, engine from
    /// `COMET_GEMM_ENGINE` (default auto), the Hopper engine's training stores from
    /// `COMET_SM90_STORES` (default on); an unparsable value is reported by
    /// [`crate::MoeLayer::new`].
    pub fn new(strategy: Strategy, max_tokens: usize) -> Self {
        LayerOptions {
            strategy,
            max_tokens,
            training: true,
            engine: GemmEngine::from_env().unwrap_or(GemmEngine::Auto),
            gemm_sm_reserve: 0,
            sm90_training_stores: Self::sm90_stores_from_env().unwrap_or(true),
        }
    }

    /// The environment variable [`LayerOptions::new`] reads for
    /// [`LayerOptions::sm90_training_stores`]: `1` (on) or `0` (off); `on`/`off` and
    /// `true`/`false` are accepted too.
    pub const SM90_STORES_ENV: &'static str = "COMET_SM90_STORES";

    /// The value `COMET_SM90_STORES` names, or `true` (the default, stores on) when it is
    /// unset.
    ///
    /// # Errors
    /// [`Error::ParseSm90Stores`] for a value that is not `1` or `0`.
    pub fn sm90_stores_from_env() -> Result<bool> {
        match std::env::var(Self::SM90_STORES_ENV) {
            Ok(v) => Self::parse_sm90_stores(&v),
            Err(_) => Ok(true),
        }
    }

    /// Parses a `COMET_SM90_STORES` value: `1`, `on`, `true` (on) or `0`, `off`, `false`
    /// (off), case and surrounding blanks ignored.
    ///
    /// # Errors
    /// [`Error::ParseSm90Stores`] naming the value otherwise.
    pub fn parse_sm90_stores(s: &str) -> Result<bool> {
        match s.trim().to_ascii_lowercase().as_str() {
            "1" | "on" | "true" => Ok(true),
            "0" | "off" | "false" => Ok(false),
            _ => Err(Error::ParseSm90Stores {
                value: s.to_string(),
            }),
        }
    }

    /// The same options with the Hopper engine's training stores on (the default) or off
    /// (`false`: the weight gradients on `mma.sync`). See
    /// [`LayerOptions::sm90_training_stores`].
    pub fn sm90_training_stores(mut self, on: bool) -> Self {
        self.sm90_training_stores = on;
        self
    }

    /// The same options with `sms` SMs left free by the pipelined expert GEMMs.
    pub fn gemm_sm_reserve(mut self, sms: usize) -> Self {
        self.gemm_sm_reserve = sms;
        self
    }

    /// SMs the expert GEMMs may use on a device with `sm_count` SMs: `None` (all, the
    /// engines' own grid) unless the strategy is pipelined and a reserve is set.
    ///
    /// # Errors
    /// [`Error::SmReserve`] when the reserve leaves no SM.
    pub fn gemm_sms(&self, sm_count: usize) -> Result<Option<usize>> {
        if self.gemm_sm_reserve == 0 || self.strategy == Strategy::Sequential {
            return Ok(None);
        }
        if self.gemm_sm_reserve >= sm_count {
            return Err(Error::SmReserve {
                reserve: self.gemm_sm_reserve,
                sms: sm_count,
            });
        }
        Ok(Some(sm_count - self.gemm_sm_reserve))
    }

    /// The same options with another engine.
    pub fn engine(mut self, engine: GemmEngine) -> Self {
        self.engine = engine;
        self
    }

    /// The same options with training on or off.
    pub fn training(mut self, on: bool) -> Self {
        self.training = on;
        self
    }

    /// Checks the options on their own.
    pub fn validate(&self) -> Result<()> {
        self.strategy.validate()?;
        if self.max_tokens == 0 {
            return Err(Error::ZeroTokens { what: "max_tokens" });
        }
        if self.strategy.chunks() > self.max_tokens {
            return Err(Error::TooManyChunks {
                chunks: self.strategy.chunks(),
                tokens: self.max_tokens,
            });
        }
        if std::env::var(GemmEngine::ENV).is_ok() {
            GemmEngine::from_env()?;
        }
        if std::env::var(Self::SM90_STORES_ENV).is_ok() {
            Self::sm90_stores_from_env()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_and_print() {
        assert_eq!(
            "sequential".parse::<Strategy>().unwrap(),
            Strategy::Sequential
        );
        assert_eq!(
            " Sequential ".parse::<Strategy>().unwrap(),
            Strategy::Sequential
        );
        assert_eq!(
            "pipelined".parse::<Strategy>().unwrap(),
            Strategy::Pipelined {
                chunks: DEFAULT_CHUNKS
            }
        );
        assert_eq!(
            "pipelined:3".parse::<Strategy>().unwrap(),
            Strategy::Pipelined { chunks: 3 }
        );
        assert_eq!(
            "pipelined-8".parse::<Strategy>().unwrap(),
            Strategy::Pipelined { chunks: 8 }
        );
        for s in [Strategy::Sequential, Strategy::Pipelined { chunks: 5 }] {
            assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
        }
        assert!(matches!(
            "pipelined:0".parse::<Strategy>(),
            Err(Error::ZeroChunks)
        ));
        for bad in ["comet", "pipelined:x", "pipelined:", "pipe:2", ""] {
            let e = bad.parse::<Strategy>().unwrap_err();
            assert!(
                matches!(&e, Error::ParseStrategy { value } if value == bad),
                "{bad}: {e}"
            );
        }
        assert_eq!(Strategy::Sequential.chunks(), 1);
        assert_eq!(Strategy::Pipelined { chunks: 4 }.name(), "pipelined");
    }

    #[test]
    fn engines_parse() {
        assert_eq!("auto".parse::<GemmEngine>().unwrap(), GemmEngine::Auto);
        assert_eq!("MMA".parse::<GemmEngine>().unwrap(), GemmEngine::MmaSync);
        assert_eq!("sm90".parse::<GemmEngine>().unwrap(), GemmEngine::Sm90);
        let e = "tensorcore".parse::<GemmEngine>().unwrap_err();
        assert!(e.to_string().contains("tensorcore"), "{e}");
        for g in [GemmEngine::Auto, GemmEngine::MmaSync, GemmEngine::Sm90] {
            assert_eq!(g.name().parse::<GemmEngine>().unwrap(), g);
        }
    }

    #[test]
    fn options_are_validated() {
        let ok = LayerOptions::new(Strategy::Pipelined { chunks: 4 }, 16).engine(GemmEngine::Auto);
        assert!(ok.training);
        ok.validate().unwrap();
        assert!(matches!(
            LayerOptions::new(Strategy::Sequential, 0).validate(),
            Err(Error::ZeroTokens { what: "max_tokens" })
        ));
        assert!(matches!(
            LayerOptions::new(Strategy::Pipelined { chunks: 0 }, 8).validate(),
            Err(Error::ZeroChunks)
        ));
        let e = LayerOptions::new(Strategy::Pipelined { chunks: 9 }, 8)
            .validate()
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooManyChunks {
                    chunks: 9,
                    tokens: 8
                }
            ),
            "{e}"
        );
        assert!(
            !LayerOptions::new(Strategy::Sequential, 4)
                .training(false)
                .training
        );
    }

    #[test]
    fn sm90_stores_option_and_env_values_parse() {
        let o = LayerOptions::new(Strategy::Sequential, 16);
        // The default is whatever COMET_SM90_STORES says (on when unset: the child-process
        // test in tests/sm90_stores_env.rs checks the unset case); the builder wins.
        let from_env = LayerOptions::sm90_stores_from_env().unwrap_or(true);
        assert_eq!(o.sm90_training_stores, from_env);
        if std::env::var(LayerOptions::SM90_STORES_ENV).is_err() {
            assert!(o.sm90_training_stores, "on when COMET_SM90_STORES is unset");
        }
        assert!(o.clone().sm90_training_stores(true).sm90_training_stores);
        assert!(!o.clone().sm90_training_stores(false).sm90_training_stores);
        assert_ne!(
            o.clone().sm90_training_stores(true),
            o.clone().sm90_training_stores(false)
        );
        for on in ["1", "on", " ON ", "true"] {
            assert!(LayerOptions::parse_sm90_stores(on).unwrap(), "{on}");
        }
        for off in ["0", "off", "False\n"] {
            assert!(!LayerOptions::parse_sm90_stores(off).unwrap(), "{off}");
        }
        for bad in ["", "2", "yes", "sm90"] {
            let e = LayerOptions::parse_sm90_stores(bad).unwrap_err();
            assert!(
                matches!(&e, Error::ParseSm90Stores { value } if value == bad),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("COMET_SM90_STORES"), "{e}");
        }
        assert_eq!(LayerOptions::SM90_STORES_ENV, "COMET_SM90_STORES");
    }

    #[test]
    fn sm_reserve_applies_to_pipelined_only_and_leaves_an_sm() {
        let pipe = LayerOptions::new(Strategy::Pipelined { chunks: 2 }, 16);
        assert_eq!(pipe.gemm_sm_reserve, 0, "default: every SM");
        assert_eq!(pipe.gemm_sms(132).unwrap(), None);
        let pipe = pipe.gemm_sm_reserve(SUGGESTED_GEMM_SM_RESERVE);
        assert_eq!(pipe.gemm_sms(132).unwrap(), Some(116));
        assert_eq!(
            pipe.clone().gemm_sm_reserve(131).gemm_sms(132).unwrap(),
            Some(1)
        );
        let e = pipe.clone().gemm_sm_reserve(132).gemm_sms(132).unwrap_err();
        assert!(
            matches!(
                e,
                Error::SmReserve {
                    reserve: 132,
                    sms: 132
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("132"), "{e}");
        let seq = LayerOptions::new(Strategy::Sequential, 16).gemm_sm_reserve(500);
        assert_eq!(seq.gemm_sms(132).unwrap(), None, "sequential ignores it");
    }
}
