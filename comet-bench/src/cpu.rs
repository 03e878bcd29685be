//! The CPU reference run behind `comet-bench cpu-reference` (and `cargo xtask bench` on a
//! machine without a GPU): the f32 reference MoE forward of `comet_core::reference` on a
//! preset, optionally shrunk, with seeded random weights and tokens; timed, with a norm and
//! checksum of `y`; optionally checked against the expert-parallel reference over W
//! simulated ranks.

use crate::{Error, Result};
use comet_core::reference::{MoeWeights, ep_forward, forward};
use comet_core::{MoeConfig, ParallelConfig, Preset, numeric};
use ndarray::{Array2, s};
use serde::Serialize;
use std::time::Instant;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuRequest {
    /// Preset name (anything [`Preset`]'s `FromStr` accepts).
    pub preset: String,
    /// Number of tokens.
    pub tokens: usize,
    /// Divide hidden and ffn by this factor (1 = the preset's exact shape).
    pub shrink: usize,
    /// Also run the expert-parallel reference over this many simulated ranks.
    pub world: Option<usize>,
    /// Seed of weights (`seed`) and tokens (`seed + 1`).
    pub seed: u64,
}

/// What ran, and what came out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuRun {
    /// Canonical preset name.
    pub preset: String,
    /// Shrink factor applied to hidden and ffn.
    pub shrink: usize,
    /// Hidden size run.
    pub hidden: usize,
    /// FFN size run.
    pub ffn: usize,
    /// Experts.
    pub experts: usize,
    /// Top-k.
    pub top_k: usize,
    /// Activation, e.g. "SwiGLU".
    pub activation: String,
    /// Whether top-k weights are renormalised.
    pub renormalize: bool,
    /// Tokens.
    pub tokens: usize,
    /// Seed.
    pub seed: u64,
    /// Wall time of the forward pass, ms.
    pub forward_ms: f64,
    /// Expert-GEMM FLOPs of the forward pass.
    pub flops: f64,
    /// ‖y‖₂.
    pub y_l2: f64,
    /// Σ y (a checksum: same seed, same value).
    pub y_sum: f64,
    /// Number of non-finite elements of y (0 expected).
    pub y_non_finite: usize,
    /// Expert-parallel check, if asked.
    pub ep: Option<EpCheck>,
}

/// The expert-parallel reference against the single-rank one on the same tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpCheck {
    /// Simulated ranks.
    pub world: usize,
    /// Wall time of the EP forward, ms.
    pub forward_ms: f64,
    /// Relative L2 difference of y (EP vs single rank).
    pub rel_l2: f64,
}

/// The preset's config with hidden and ffn divided by `shrink` (experts, top-k, activation
/// and renormalisation kept).
pub fn shrunk(preset: Preset, shrink: usize) -> Result<MoeConfig> {
    let base = preset.config();
    let (h, f) = (base.hidden(), base.ffn());
    if shrink == 0 || h % shrink != 0 || f % shrink != 0 {
        return Err(Error::BadShrink {
            shrink,
            hidden: h,
            ffn: f,
        });
    }
    Ok(
        MoeConfig::new(h / shrink, f / shrink, base.experts(), base.top_k())?
            .with_activation(base.activation())
            .with_dtype(base.dtype())
            .with_renormalize(base.renormalize()),
    )
}

/// Run the reference forward (and the EP check if asked).
pub fn run(req: &CpuRequest) -> Result<CpuRun> {
    let preset: Preset = req.preset.parse()?;
    if req.tokens == 0 {
        return Err(Error::ZeroTokens(req.tokens));
    }
    let cfg = shrunk(preset, req.shrink)?;
    cfg.check_rows(req.tokens)?;
    let w = MoeWeights::<f32>::random(&cfg, req.seed);
    let x: Array2<f32> = numeric::random_normal((req.tokens, cfg.hidden()), req.seed + 1);

    let start = Instant::now();
    let fwd = forward(&cfg, &w, x.view())?;
    let forward_ms = start.elapsed().as_secs_f64() * 1e3;
    let y: Vec<f32> = fwd.y.iter().copied().collect();
    let y_l2 = y.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let y_sum = y.iter().map(|v| f64::from(*v)).sum::<f64>();
    let y_non_finite = numeric::count_non_finite(&y);

    let ep = match req.world {
        None => None,
        Some(world) => {
            if world == 0 || cfg.experts() % world != 0 || world > req.tokens {
                return Err(Error::BadWorld {
                    world,
                    experts: cfg.experts(),
                    tokens: req.tokens,
                });
            }
            let par = ParallelConfig::expert_parallel(world)?;
            // Split the tokens into `world` near-equal contiguous parts.
            let xs: Vec<Array2<f32>> = (0..world)
                .map(|r| {
                    let lo = r * req.tokens / world;
                    let hi = (r + 1) * req.tokens / world;
                    x.slice(s![lo..hi, ..]).to_owned()
                })
                .collect();
            let start = Instant::now();
            let epf = ep_forward(&cfg, &par, &w, &xs)?;
            let ep_ms = start.elapsed().as_secs_f64() * 1e3;
            let ys: Vec<_> = epf.ranks.iter().map(|r| r.y.view()).collect();
            let a: Vec<f32> = ys.iter().flat_map(|y| y.iter().copied()).collect();
            Some(EpCheck {
                world,
                forward_ms: ep_ms,
                rel_l2: numeric::rel_l2(&a, &y),
            })
        }
    };

    Ok(CpuRun {
        preset: preset.name().to_string(),
        shrink: req.shrink,
        hidden: cfg.hidden(),
        ffn: cfg.ffn(),
        experts: cfg.experts(),
        top_k: cfg.top_k(),
        activation: cfg.activation().to_string(),
        renormalize: cfg.renormalize(),
        tokens: req.tokens,
        seed: req.seed,
        forward_ms,
        flops: cfg.flops_forward(req.tokens),
        y_l2,
        y_sum,
        y_non_finite,
        ep,
    })
}

impl CpuRun {
    /// A few lines saying what ran and what came out.
    pub fn describe(&self) -> String {
        let shrink = if self.shrink == 1 {
            String::new()
        } else {
            format!(" with hidden and ffn divided by {}", self.shrink)
        };
        let mut s = format!(
            "cpu-reference: {}{shrink}: hidden {}, ffn {}, {} experts, top-{}, {}, \
             renormalize {}, f32 (f64 accumulation)\n  tokens {}, seed {}: forward {:.1} ms \
             ({:.2} GFLOP expert GEMMs, {:.2} GFLOP/s)\n  y: [{}, {}], ||y||_2 = {:.6e}, \
             sum(y) = {:.6e}, non-finite {}",
            self.preset,
            self.hidden,
            self.ffn,
            self.experts,
            self.top_k,
            self.activation,
            self.renormalize,
            self.tokens,
            self.seed,
            self.forward_ms,
            self.flops / 1e9,
            self.flops / 1e6 / self.forward_ms.max(1e-9),
            self.tokens,
            self.hidden,
            self.y_l2,
            self.y_sum,
            self.y_non_finite,
        );
        if let Some(ep) = &self.ep {
            s.push_str(&format!(
                "\n  expert-parallel reference over {} simulated ranks: {:.1} ms, \
                 relative L2 difference to single-rank y = {:.3e}",
                ep.world, ep.forward_ms, ep.rel_l2
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(preset: &str, tokens: usize, shrink: usize, world: Option<usize>) -> CpuRequest {
        CpuRequest {
            preset: preset.into(),
            tokens,
            shrink,
            world,
            seed: 7,
        }
    }

    #[test]
    fn shrunk_presets_keep_experts_and_top_k() {
        let c = shrunk(Preset::Mixtral8x7B, 16).unwrap();
        assert_eq!(
            (c.hidden(), c.ffn(), c.experts(), c.top_k()),
            (256, 896, 8, 2)
        );
        let c = shrunk(Preset::DeepSeekV3, 16).unwrap();
        assert_eq!(
            (c.hidden(), c.ffn(), c.experts(), c.top_k()),
            (448, 128, 256, 8)
        );
        assert!(matches!(
            shrunk(Preset::Qwen2Moe2_7B, 3).unwrap_err(),
            Error::BadShrink {
                shrink: 3,
                hidden: 2048,
                ffn: 1408
            }
        ));
        assert!(matches!(
            shrunk(Preset::Phi35Moe, 0),
            Err(Error::BadShrink { .. })
        ));
    }

    #[test]
    fn runs_are_deterministic_and_finite() {
        let a = run(&req("qwen2-moe", 24, 32, None)).unwrap();
        let b = run(&req("qwen2-moe", 24, 32, None)).unwrap();
        assert_eq!((a.hidden, a.ffn, a.experts, a.top_k), (64, 44, 64, 4));
        assert_eq!(a.y_sum, b.y_sum);
        assert_eq!(a.y_l2, b.y_l2);
        assert_eq!(a.y_non_finite, 0);
        assert!(a.y_l2 > 0.0);
        let c = run(&CpuRequest {
            seed: 8,
            ..req("qwen2-moe", 24, 32, None)
        })
        .unwrap();
        assert_ne!(a.y_sum, c.y_sum, "another seed must give another y");
        let text = a.describe();
        assert!(
            text.contains("qwen2-moe-2.7b with hidden and ffn divided by 32"),
            "{text}"
        );
        assert!(text.contains("tokens 24"), "{text}");
    }

    #[test]
    fn the_ep_reference_agrees_with_the_single_rank_one() {
        let r = run(&req("mixtral", 20, 64, Some(4))).unwrap();
        let ep = r.ep.unwrap();
        assert_eq!(ep.world, 4);
        assert!(ep.rel_l2 < 1e-6, "rel_l2 {}", ep.rel_l2);
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(matches!(
            run(&req("mixtral", 0, 64, None)),
            Err(Error::ZeroTokens(0))
        ));
        assert!(matches!(
            run(&req("gpt-5", 8, 64, None)),
            Err(Error::Core(_))
        ));
        assert!(matches!(
            run(&req("mixtral", 8, 64, Some(3))),
            Err(Error::BadWorld {
                world: 3,
                experts: 8,
                tokens: 8
            })
        ));
    }
}
