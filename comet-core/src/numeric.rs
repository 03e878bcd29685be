//! Numeric helpers for tests and benches: error metrics, bf16/f16 rounding and encoding,
//! seeded random tensors.

use half::{bf16, f16};
use ndarray::{Array, Dimension, ShapeBuilder};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::real::Real;

/// Relative L2 error `‖a − b‖₂ / ‖b‖₂` of `a` against the reference `b`, in f64.
///
/// Returns NaN if the lengths differ or any element is NaN (so `err <= tol` fails), ∞ if
/// `a` or `b` holds an infinity or `b` is all zeros while `a` is not, and 0 for two
/// all-zero (or empty) slices. The GPU tests' bar is `rel_l2 <= 1e-2` for bf16.
pub fn rel_l2<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y): (f64, f64) = (x.into(), y.into());
        if x.is_nan() || y.is_nan() {
            return f64::NAN;
        }
        if x.is_infinite() || y.is_infinite() {
            return f64::INFINITY;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}

/// Largest `|a[i] − b[i]|`; NaN if the lengths differ or any element is NaN.
pub fn max_abs_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let mut m = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x.into() - y.into()).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        m = m.max(d);
    }
    m
}

/// Number of NaN or infinite elements.
pub fn count_non_finite<A: Copy + Into<f64>>(a: &[A]) -> usize {
    a.iter().filter(|&&x| !x.into().is_finite()).count()
}

/// `v` rounded to the nearest bf16 (ties to even) and widened back to f32.
pub fn round_bf16(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// `v` rounded to the nearest f16 (ties to even) and widened back to f32.
pub fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// `v` rounded to `dtype` and widened back to f32 (identity for f32).
pub fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => round_bf16(v),
        DType::F16 => round_f16(v),
        DType::F32 => v,
    }
}

/// f32 → bf16, round to nearest even.
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// bf16 → f32 (exact).
pub fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// f32 → f16, round to nearest even.
pub fn to_f16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

/// f16 → f32 (exact).
pub fn from_f16(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Encodes f32 values as little-endian `dtype` bytes (what a device upload of that dtype
/// expects), rounding to nearest even.
pub fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * dtype.size_bytes());
    for &x in v {
        match dtype {
            DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    out
}

/// Decodes little-endian `dtype` bytes to f32 (exact).
///
/// # Errors
/// [`Error::ByteLength`] if `bytes.len()` is not a multiple of the element size.
pub fn decode(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let size = dtype.size_bytes();
    if bytes.len() % size != 0 {
        return Err(Error::ByteLength {
            len: bytes.len(),
            dtype: dtype.name(),
            size,
        });
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| match (dtype, c) {
            (DType::BF16, &[a, b]) => bf16::from_le_bytes([a, b]).to_f32(),
            (DType::F16, &[a, b]) => f16::from_le_bytes([a, b]).to_f32(),
            (DType::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
            // chunks_exact(size) yields exactly `size` bytes for this dtype.
            _ => f32::NAN,
        })
        .collect())
}

/// A tensor of i.i.d. normal values with standard deviation `std`, in row-major order from
/// a ChaCha12 stream seeded with `seed` (the same seed gives the same values for a given
/// `rand`/`rand_distr` version; f32 and f64 tensors of one seed hold the same draws, rounded).
pub fn random_array<T: Real, Sh: ShapeBuilder>(shape: Sh, std: f64, seed: u64) -> Array<T, Sh::Dim>
where
    Sh::Dim: Dimension,
{
    let mut rng = StdRng::seed_from_u64(seed);
    Array::from_shape_simple_fn(shape, || {
        let z: f64 = rng.sample(StandardNormal);
        T::from_f64(z * std)
    })
}

/// Standard-normal f32 tensor of `shape` (e.g. `(m, h)`), deterministic in `seed`.
pub fn random_normal<Sh: ShapeBuilder>(shape: Sh, seed: u64) -> Array<f32, Sh::Dim>
where
    Sh::Dim: Dimension,
{
    random_array(shape, 1.0, seed)
}

/// Standard-normal f64 tensor of `shape`, the same draws as [`random_normal`] for `seed`.
pub fn random_normal_f64<Sh: ShapeBuilder>(shape: Sh, seed: u64) -> Array<f64, Sh::Dim>
where
    Sh::Dim: Dimension,
{
    random_array(shape, 1.0, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_values_and_edge_cases() {
        assert_eq!(rel_l2(&[3.0f32, 4.0], &[3.0f32, 4.0]), 0.0);
        let e = rel_l2(&[3.0f32, 4.0], &[0.0f32, 5.0]);
        assert!((e - (9.0f64 + 1.0).sqrt() / 5.0).abs() < 1e-15);
        assert!(rel_l2(&[1.0f32], &[1.0f32, 2.0]).is_nan());
        assert!(rel_l2(&[f32::NAN], &[1.0f32]).is_nan());
        assert_eq!(rel_l2(&[f32::INFINITY], &[1.0f32]), f64::INFINITY);
        assert_eq!(rel_l2(&[1.0f32], &[0.0f32]), f64::INFINITY);
        assert_eq!(rel_l2::<f32, f32>(&[], &[]), 0.0);
        assert_eq!(rel_l2(&[bf16::from_f32(1.0)], &[1.0f64]), 0.0);
    }

    #[test]
    fn max_abs_and_non_finite() {
        assert_eq!(max_abs_diff(&[1.0f32, 5.0], &[1.5f64, 4.0]), 1.0);
        assert!(max_abs_diff(&[f32::NAN], &[0.0f32]).is_nan());
        assert_eq!(count_non_finite(&[1.0f32, f32::NAN, f32::INFINITY, 0.0]), 2);
    }

    #[test]
    fn rounding_to_half_types() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-9)), 1.0 + 2f32.powi(-7));
        assert_eq!(round_f16(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(round_to(DType::F32, 0.1), 0.1);
        let v = [0.1f32, -2.5, 3.0e4];
        assert_eq!(from_bf16(&to_bf16(&v)), v.map(round_bf16).to_vec());
        assert_eq!(from_f16(&to_f16(&v)), v.map(round_f16).to_vec());
    }

    #[test]
    fn encode_decode_round_trip() {
        let v = [0.1f32, -2.5, 7.0, 1.0e-3];
        for d in DType::ALL {
            let b = encode(d, &v);
            assert_eq!(b.len(), v.len() * d.size_bytes());
            let back = decode(d, &b).unwrap();
            let want: Vec<f32> = v.iter().map(|&x| round_to(d, x)).collect();
            assert_eq!(back, want);
        }
        assert_eq!(
            decode(DType::F32, &[0; 6]),
            Err(Error::ByteLength {
                len: 6,
                dtype: "f32",
                size: 4
            })
        );
    }

    #[test]
    fn random_tensors_are_seeded_and_normal() {
        let a = random_normal((64, 32), 5);
        let b = random_normal((64, 32), 5);
        let c = random_normal((64, 32), 6);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let d = random_normal_f64((64, 32), 5);
        assert_eq!(d.mapv(|v| v as f32), a);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!((var - 1.0).abs() < 0.1, "var {var}");
        let s: ndarray::Array3<f64> = random_array((2, 3, 4), 0.5, 1);
        assert_eq!(s.dim(), (2, 3, 4));
    }
}
