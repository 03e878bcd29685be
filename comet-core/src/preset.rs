//! The paper's model shapes (DESIGN.md, "Benchmarks").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::MoeConfig;
use crate::error::{Error, Result};

/// A model's MoE layer shape: (hidden, ffn, experts, top-k), SwiGLU, bf16.
///
/// The shapes are exact. Routing is always comet-rs's softmax top-k
/// ([`crate::routing::top_k`]); [`Preset::config`] sets renormalisation the way the model
/// normalises its top-k weights (Mixtral, Phi-3.5-MoE and DeepSeek-V3 do, Qwen2-MoE does
/// not), but Phi-3.5's sparsemixer and DeepSeek-V3's sigmoid group routing are not modelled.
/// Custom shapes: build a [`MoeConfig`] directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Mixtral-8x7B: hidden 4096, ffn 14336, 8 experts, top-2.
    Mixtral8x7B,
    /// Qwen2-MoE-2.7B (Qwen1.5-MoE-A2.7B): hidden 2048, ffn 1408, 64 experts, top-4.
    Qwen2Moe2_7B,
    /// Phi-3.5-MoE: hidden 4096, ffn 6400, 16 experts, top-2.
    Phi35Moe,
    /// DeepSeek-V3 (routed experts): hidden 7168, ffn 2048, 256 experts, top-8.
    DeepSeekV3,
}

const ALL: [Preset; 4] = [
    Preset::Mixtral8x7B,
    Preset::Qwen2Moe2_7B,
    Preset::Phi35Moe,
    Preset::DeepSeekV3,
];

impl Preset {
    /// Every preset, in the order of DESIGN.md.
    pub fn all() -> &'static [Preset] {
        &ALL
    }

    /// Canonical name: `mixtral-8x7b`, `qwen2-moe-2.7b`, `phi-3.5-moe`, `deepseek-v3`.
    pub fn name(&self) -> &'static str {
        match self {
            Preset::Mixtral8x7B => "mixtral-8x7b",
            Preset::Qwen2Moe2_7B => "qwen2-moe-2.7b",
            Preset::Phi35Moe => "phi-3.5-moe",
            Preset::DeepSeekV3 => "deepseek-v3",
        }
    }

    /// `(hidden, ffn, experts, top_k)`.
    pub const fn shape(&self) -> (usize, usize, usize, usize) {
        match self {
            Preset::Mixtral8x7B => (4096, 14336, 8, 2),
            Preset::Qwen2Moe2_7B => (2048, 1408, 64, 4),
            Preset::Phi35Moe => (4096, 6400, 16, 2),
            Preset::DeepSeekV3 => (7168, 2048, 256, 8),
        }
    }

    /// Whether the model renormalises its top-k weights.
    pub const fn renormalize(&self) -> bool {
        !matches!(self, Preset::Qwen2Moe2_7B)
    }

    /// The layer config: [`Preset::shape`], SwiGLU, bf16, [`Preset::renormalize`].
    pub fn config(&self) -> MoeConfig {
        let (h, f, e, k) = self.shape();
        // The preset shapes are constants that pass `MoeConfig::new` (tested below).
        MoeConfig::new_unchecked(h, f, e, k).with_renormalize(self.renormalize())
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;

    /// Case-insensitive; punctuation is ignored, so `mixtral`, `Mixtral-8x7B`, `qwen2-moe`,
    /// `qwen2_moe_2.7b`, `phi3.5-moe`, `phi-3.5-moe`, `deepseek-v3` and `dsv3` all parse.
    fn from_str(s: &str) -> Result<Self> {
        let key: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match key.as_str() {
            "mixtral" | "mixtral8x7b" => Ok(Preset::Mixtral8x7B),
            "qwen" | "qwen2" | "qwen2moe" | "qwen2moe27b" | "qwen15moe" | "qwen15moea27b" => {
                Ok(Preset::Qwen2Moe2_7B)
            }
            "phi" | "phi35" | "phi35moe" | "phimoe" => Ok(Preset::Phi35Moe),
            "deepseek" | "deepseekv3" | "dsv3" => Ok(Preset::DeepSeekV3),
            _ => Err(Error::ParsePreset {
                value: s.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_design() {
        let got: Vec<_> = Preset::all()
            .iter()
            .map(|p| {
                let c = p.config();
                (c.hidden(), c.ffn(), c.experts(), c.top_k())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (4096, 14336, 8, 2),
                (2048, 1408, 64, 4),
                (4096, 6400, 16, 2),
                (7168, 2048, 256, 8)
            ]
        );
        for p in Preset::all() {
            let (h, f, e, k) = p.shape();
            let checked = MoeConfig::new(h, f, e, k).unwrap();
            assert_eq!(checked.with_renormalize(p.renormalize()), p.config());
        }
        assert!(!Preset::Qwen2Moe2_7B.config().renormalize());
        assert!(Preset::Mixtral8x7B.config().renormalize());
    }

    #[test]
    fn names_and_aliases_parse() {
        for p in Preset::all() {
            assert_eq!(p.name().parse::<Preset>().unwrap(), *p);
            assert_eq!(p.to_string().parse::<Preset>().unwrap(), *p);
        }
        for (s, p) in [
            ("mixtral", Preset::Mixtral8x7B),
            ("Mixtral-8x7B", Preset::Mixtral8x7B),
            ("qwen2-moe", Preset::Qwen2Moe2_7B),
            ("qwen2_moe_2.7b", Preset::Qwen2Moe2_7B),
            ("phi3.5-moe", Preset::Phi35Moe),
            ("deepseek-v3", Preset::DeepSeekV3),
            ("DSV3", Preset::DeepSeekV3),
        ] {
            assert_eq!(s.parse::<Preset>().unwrap(), p, "{s}");
        }
        assert_eq!(
            "llama".parse::<Preset>(),
            Err(Error::ParsePreset {
                value: "llama".into()
            })
        );
    }
}
