//! The dense bf16 GEMM rate of the device, measured in the same run as the layer (the
//! compute floor of the report's ratios): cuBLAS `n × n × n`, bf16 in and out, fp32
//! accumulation, operands filled with random values, CUDA events, median of `iters` after
//! `warmup` untimed runs.

use std::ffi::c_void;

use cudarc::cublas::{CudaBlas, result as blas, sys};

use comet_kernels::buffer::DType;
use comet_kernels::{DeviceTensor, Gpu, init};

use crate::{Error, Result};

/// Median of a non-empty list (the mean of the middle two for an even count); `None` if empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn cublas(what: &str, r: std::result::Result<(), blas::CublasError>) -> Result<()> {
    r.map_err(|e| Error::Cublas(format!("{what}: {e:?}")))
}

/// TFLOP/s of an `n³` bf16 GEMM on `gpu` (median of `iters` timed runs after `warmup`).
pub fn dense_gemm_tflops(gpu: &Gpu, n: usize, warmup: usize, iters: usize) -> Result<f64> {
    if n == 0 || n % 8 != 0 || n > 32768 {
        return Err(Error::Arg {
            what: "--dense-n",
            value: n.to_string(),
            rule: "a multiple of 8 in 8..=32768".into(),
        });
    }
    let iters = iters.max(1);
    let mut mats = Vec::new();
    for seed in 0..3u64 {
        let mut t = DeviceTensor::alloc(gpu, DType::BF16, &[n, n])?;
        init::fill_uniform(gpu, &mut t, 0xdead_0000 + seed, 1.0)?;
        mats.push(t);
    }
    let stream = gpu.stream().clone();
    // cudarc panics when libcublas cannot be loaded: turn that into an error.
    let handle = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| CudaBlas::new(stream)))
        .map_err(|_| Error::Cublas("libcublas could not be loaded".into()))?
        .map_err(|e| Error::Cublas(format!("cublasCreate: {e:?}")))?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let ni = n as i32;
    let run = || -> Result<()> {
        // SAFETY: a, b, c are n×n bf16 device matrices of this context (allocated above and
        // alive until the function returns); alpha/beta are host f32 as CUBLAS_COMPUTE_32F
        // expects; the handle's stream is the one the matrices were filled on.
        cublas("cublasGemmEx", unsafe {
            blas::gemm_ex(
                *handle.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                ni,
                ni,
                &alpha as *const f32 as *const c_void,
                mats[0].device_ptr() as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                ni,
                mats[1].device_ptr() as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                ni,
                &beta as *const f32 as *const c_void,
                mats[2].device_ptr() as *mut c_void,
                sys::cudaDataType::CUDA_R_16BF,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    };
    for _ in 0..warmup {
        run()?;
    }
    let mut ms = Vec::with_capacity(iters);
    let (a, b) = (gpu.timing_event()?, gpu.timing_event()?);
    for _ in 0..iters {
        a.record(gpu.stream())?;
        run()?;
        b.record(gpu.stream())?;
        ms.push(f64::from(a.elapsed_ms(&b)?));
    }
    let t = median(&ms).unwrap_or(f64::NAN);
    Ok(2.0 * (n as f64).powi(3) / (t * 1e-3) / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
