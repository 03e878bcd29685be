//! Deterministic pseudo-random fills on the device, for benchmarks and tests (no host data).
//!
//! Element `i` of a tensor filled with `(seed, std)` is uniform on `[-√3·std, √3·std)`
//! (standard deviation `std`); [`uniform_value`] computes the same number on the host.

use crate::buffer::{DType, DeviceTensor};
use crate::cache::Defines;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::sources;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FillParams {
    dst: u64,
    n: i64,
    seed: u64,
    std_dev: f64,
    dtype: i64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The f32 value (before rounding to the tensor's dtype) of element `i` of a fill.
pub fn uniform_value(seed: u64, i: u64, std: f64) -> f32 {
    let h = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let u = (h >> 40) as f32 * (1.0 / 16_777_216.0);
    let half_width = (std * 1.732_050_807_568_877_2) as f32;
    (2.0 * u - 1.0) * half_width
}

/// Fills `t` (bf16, f16 or f32) with uniform values of standard deviation `std`.
pub fn fill_uniform(gpu: &Gpu, t: &mut DeviceTensor, seed: u64, std: f64) -> Result<()> {
    let dtype = match t.dtype() {
        DType::BF16 => 0,
        DType::F16 => 1,
        DType::F32 => 2,
        other => {
            return Err(Error::DType {
                what: "fill_uniform".into(),
                got: other.to_string(),
                expected: "bf16, f16 or f32".into(),
            });
        }
    };
    t.check_device(gpu, "fill_uniform")?;
    let n = t.numel();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(
        &sources::program("init.cu", sources::INIT_CU),
        &Defines::new(),
        "comet_fill_uniform",
    )?;
    let p = FillParams {
        dst: t.device_ptr(),
        n: n as i64,
        seed,
        std_dev: std,
        dtype,
    };
    let grid = n.div_ceil(256).clamp(1, gpu.sm_count() as usize * 32);
    // SAFETY: mirrors FillParams of init.cu; the kernel writes exactly `n` elements of the
    // tensor's dtype.
    unsafe { gpu.launch(&f, grid as u32, 256, 0, &p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_are_uniform_with_the_right_spread() {
        let n = 100_000u64;
        let v: Vec<f64> = (0..n)
            .map(|i| f64::from(uniform_value(7, i, 2.0)))
            .collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.03, "std {}", var.sqrt());
        assert!(v.iter().all(|x| x.abs() <= 2.0 * 1.7320508 + 1e-6));
        assert_ne!(
            uniform_value(7, 0, 1.0),
            uniform_value(8, 0, 1.0),
            "seed matters"
        );
    }
}
