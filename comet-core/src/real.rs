//! [`Real`]: the floating-point types the CPU reference runs in (f32 and f64).

use std::fmt::{Debug, Display};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// A floating-point element type of the CPU reference: `f32` (compared against the GPU) or
/// `f64` (finite-difference gradient checks).
///
/// The reference stores every tensor in `T`; dot products accumulate in f64 and are rounded
/// once to `T`. Softmax and top-k run in `T` arithmetic (see [`crate::routing::top_k`]).
pub trait Real:
    Copy
    + Debug
    + Display
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + Send
    + Sync
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// Rounds an f64 to `Self` (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// `e^self` in `Self` precision.
    fn exp(self) -> Self;
    /// Neither NaN nor infinite.
    fn is_finite(self) -> bool;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Real>(v: f64) -> f64 {
        T::from_f64(v).to_f64()
    }

    #[test]
    fn conversions_round_as_documented() {
        assert_eq!(round_trip::<f64>(0.1), 0.1);
        assert_eq!(round_trip::<f32>(0.1), f64::from(0.1f32));
        assert_ne!(round_trip::<f32>(0.1), 0.1);
        assert_eq!(<f32 as Real>::exp(0.0), 1.0);
        assert!(!<f64 as Real>::is_finite(f64::NAN));
        assert_eq!(<f32 as Real>::NAME, "f32");
    }
}
