//! Element types of the GPU paths ([`DType`]) and expert activations ([`Activation`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element type of activations and weights on the GPU. Accumulation is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// bfloat16 (8-bit exponent, 7-bit mantissa). The default.
    #[default]
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl DType {
    /// All dtypes, in declaration order.
    pub const ALL: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

    /// Bytes per element: 2, 2 or 4.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Short lowercase name: `"bf16"`, `"f16"` or `"f32"` (what [`FromStr`] and `Display` use).
    pub const fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }

    /// The CUDA C++ type name (`__nv_bfloat16`, `__half`, `float`).
    pub const fn cuda_name(self) -> &'static str {
        match self {
            DType::BF16 => "__nv_bfloat16",
            DType::F16 => "__half",
            DType::F32 => "float",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Accepts (case-insensitively) `bf16`/`bfloat16`, `f16`/`fp16`/`half`/`float16`,
    /// `f32`/`fp32`/`float`/`float32`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "fp16" | "half" | "float16" => Ok(DType::F16),
            "f32" | "fp32" | "float" | "float32" => Ok(DType::F32),
            _ => Err(Error::ParseDType {
                value: s.to_owned(),
            }),
        }
    }
}

/// The expert FFN's activation (ARCHITECTURE.md, "Expert FFN").
///
/// - `SwiGlu`: `w0[e]` has `2F` rows, gate `0..F` then up `F..2F`;
///   `a = silu(h[..F]) ⊙ h[F..]`, `silu(g) = g / (1 + e^{-g})`.
/// - `Gelu`: `w0[e]` has `F` rows; `a = gelu(h) = h · Φ(h) = ½ h (1 + erf(h/√2))`
///   (PyTorch's default exact-erf form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Gated SiLU (Mixtral, Qwen2-MoE, Phi-3.5-MoE, DeepSeek-V3). The default.
    #[default]
    SwiGlu,
    /// Exact (erf) GeLU.
    Gelu,
}

impl Activation {
    /// All activations, in declaration order.
    pub const ALL: [Activation; 2] = [Activation::SwiGlu, Activation::Gelu];

    /// Rows of `w0[e]` per FFN column: 2 for SwiGLU (gate and up), 1 for GeLU.
    pub const fn n0_factor(self) -> usize {
        match self {
            Activation::SwiGlu => 2,
            Activation::Gelu => 1,
        }
    }

    /// Lowercase name: `"swiglu"` or `"gelu"`.
    pub const fn name(self) -> &'static str {
        match self {
            Activation::SwiGlu => "swiglu",
            Activation::Gelu => "gelu",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activation {
    type Err = Error;

    /// Accepts (case-insensitively) `swiglu`/`silu`/`swish-glu` and `gelu`/`gelu-erf`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "swiglu" | "silu" | "swish-glu" | "swish_glu" => Ok(Activation::SwiGlu),
            "gelu" | "gelu-erf" | "gelu_erf" => Ok(Activation::Gelu),
            _ => Err(Error::ParseActivation {
                value: s.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_sizes_and_names_round_trip() {
        assert_eq!(DType::BF16.size_bytes(), 2);
        assert_eq!(DType::F16.size_bytes(), 2);
        assert_eq!(DType::F32.size_bytes(), 4);
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            assert_eq!(d.to_string(), d.name());
            assert_eq!(d.name().to_uppercase().parse::<DType>().unwrap(), d);
        }
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("half".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("fp32".parse::<DType>().unwrap(), DType::F32);
    }

    #[test]
    fn dtype_parse_error_names_value() {
        let e = "f8".parse::<DType>().unwrap_err();
        assert_eq!(e, Error::ParseDType { value: "f8".into() });
        assert!(e.to_string().contains("\"f8\""));
    }

    #[test]
    fn activation_factor_and_parse() {
        assert_eq!(Activation::SwiGlu.n0_factor(), 2);
        assert_eq!(Activation::Gelu.n0_factor(), 1);
        for a in Activation::ALL {
            assert_eq!(a.name().parse::<Activation>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert!(matches!(
            "relu".parse::<Activation>(),
            Err(Error::ParseActivation { .. })
        ));
    }
}
