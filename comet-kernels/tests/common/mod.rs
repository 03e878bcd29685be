//! Helpers shared by the GPU tests: device, fresh seeds, host data, f64 references, checks.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use comet_kernels::Gpu;
use comet_kernels::buffer::{DType, DeviceTensor};
use comet_kernels::forward::{download_f32, upload_f32};
use ndarray::{Array2, ArrayView2};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Device 0 (panics with a clear message when no GPU is usable).
pub fn gpu() -> Gpu {
    Gpu::new(0).expect("these tests need a CUDA GPU (device 0)")
}

/// A seed that differs between runs and between calls; printed so a failure can be replayed
/// with `COMET_TEST_SEED`.
pub fn fresh_seed(what: &str) -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = match std::env::var("COMET_TEST_SEED") {
        Ok(s) => s.parse().expect("COMET_TEST_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    let seed = base.wrapping_add(
        COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9),
    );
    eprintln!("[seed] {what}: {seed}");
    seed
}

/// Rounds to the element type (bf16/f16), so host references see exactly the device inputs.
pub fn round(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// `n` uniform values with standard deviation `std`, rounded to `dtype`.
pub fn random_vec(n: usize, std: f32, dtype: DType, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = std * 3f32.sqrt();
    (0..n)
        .map(|_| round(dtype, rng.random_range(-w..w)))
        .collect()
}

/// Uploads host f32 values as `dtype`.
pub fn upload(gpu: &Gpu, dtype: DType, shape: &[usize], v: &[f32]) -> DeviceTensor {
    upload_f32(gpu, dtype, shape, v).expect("upload")
}

/// Downloads as f32.
pub fn download(gpu: &Gpu, t: &DeviceTensor) -> Vec<f32> {
    download_f32(gpu, t).expect("download")
}

/// Uploads i32 data.
pub fn upload_i32(gpu: &Gpu, shape: &[usize], v: &[i32]) -> DeviceTensor {
    DeviceTensor::from_host(gpu, shape, v).expect("upload i32")
}

/// A poisoned (NaN / -1) tensor.
pub fn poisoned(gpu: &Gpu, dtype: DType, shape: &[usize]) -> DeviceTensor {
    let mut t = DeviceTensor::alloc(gpu, dtype, shape).expect("alloc");
    t.poison(gpu).expect("poison");
    t
}

/// Group offsets `[G + 1]` from row counts.
pub fn offsets_of(counts: &[usize]) -> Vec<i32> {
    let mut o = vec![0i32];
    for &c in counts {
        o.push(o.last().copied().unwrap_or(0) + c as i32);
    }
    o
}

/// `[rows, cols]` view of a slice as an f64 array.
pub fn arr(v: &[f32], rows: usize, cols: usize) -> Array2<f64> {
    Array2::from_shape_fn((rows, cols), |(r, c)| f64::from(v[r * cols + c]))
}

/// `a · bᵀ` in f64.
pub fn matmul_nt(a: ArrayView2<f64>, b: ArrayView2<f64>) -> Array2<f64> {
    a.dot(&b.t())
}

/// Relative L2 error and non-finite count of `got` against `want` over the same elements.
pub fn check_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let nan = got.iter().filter(|v| !v.is_finite()).count();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (f64::from(g) - w).powi(2);
        den += w * w;
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    eprintln!(
        "[check] {what}: rel_l2 = {rel:.3e}, non-finite = {nan}, n = {}",
        got.len()
    );
    assert_eq!(nan, 0, "{what}: {nan} non-finite values (unwritten or NaN)");
    assert!(rel <= tol, "{what}: rel_l2 {rel:.3e} > {tol:.1e}");
}

/// Asserts every value is NaN (rows a kernel must not have written).
pub fn check_untouched(what: &str, got: &[f32]) {
    let written = got.iter().filter(|v| !v.is_nan()).count();
    assert_eq!(
        written, 0,
        "{what}: {written} elements written outside the valid rows"
    );
}

pub fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// Distinct random expert ids per token, `[m, k]`.
pub fn random_ids(m: usize, k: usize, e: usize, seed: u64) -> Vec<i32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mut chosen: Vec<i32> = Vec::with_capacity(k);
        while chosen.len() < k {
            let c = rng.random_range(0..e as i32);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        out.extend(chosen);
    }
    out
}
