//! Router: logits (`x · wrᵀ` through the GEMM engine, fp32 out), softmax + top-k (+ renorm),
//! and the router backward (`dlogits` from the gradient of the routing weights).

use crate::buffer::{DType, DeviceTensor};
use crate::cache::Defines;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::gemm::{self, GemmArgs};
use crate::sources;

/// Most experts the router kernels handle (32 per lane of a warp).
pub const MAX_EXPERTS: usize = 1024;
/// Most experts per token.
pub const MAX_TOP_K: usize = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RouterParams {
    logits: u64,
    probs: u64,
    ids: u64,
    weights: u64,
    tokens: i64,
    experts: i64,
    k: i64,
    renormalize: i64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RouterBwdParams {
    probs: u64,
    ids: u64,
    dweights: u64,
    dlogits: u64,
    dlogits_elem: u64,
    tokens: i64,
    experts: i64,
    k: i64,
    renormalize: i64,
}

/// Checks the router sizes: `1 ≤ k ≤ min(E, MAX_TOP_K)`, `E ≤ MAX_EXPERTS`.
pub fn check_router(experts: usize, top_k: usize) -> Result<()> {
    if experts == 0 || experts > MAX_EXPERTS {
        return Err(Error::limit(
            "experts",
            experts,
            format!("1..={MAX_EXPERTS}"),
        ));
    }
    if top_k == 0 || top_k > experts.min(MAX_TOP_K) {
        return Err(Error::limit(
            "top_k",
            top_k,
            format!("1..={}", experts.min(MAX_TOP_K)),
        ));
    }
    Ok(())
}

fn defines(experts: usize, elem: DType) -> Defines {
    let mut d = Defines::new();
    d.insert("ROUTER_EPL".into(), experts.div_ceil(32).to_string());
    if elem == DType::F16 {
        d.insert("COMET_F16".into(), String::new());
    }
    d
}

fn expect(what: &str, t: &DeviceTensor, dtype: DType, shape: &[usize]) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DType {
            what: what.into(),
            got: t.dtype().to_string(),
            expected: dtype.to_string(),
        });
    }
    if t.shape() != shape {
        return Err(Error::shape(what, t.shape(), format!("{shape:?}")));
    }
    Ok(())
}

/// `logits[M, E] (f32) = x[M, H] · wr[E, H]ᵀ` (fp32 accumulation).
pub fn router_logits(
    gpu: &Gpu,
    x: &DeviceTensor,
    wr: &DeviceTensor,
    logits: &mut DeviceTensor,
) -> Result<()> {
    gemm::grouped_gemm(gpu, GemmArgs::forward(x, wr, None, logits))
}

/// Softmax + top-k of `logits [M, E]` f32: `ids [M, k]` i32, `weights [M, k]` f32 and, if
/// given, `probs [M, E]` f32 (kept for the backward).
pub fn softmax_topk(
    gpu: &Gpu,
    logits: &DeviceTensor,
    top_k: usize,
    renormalize: bool,
    probs: Option<&mut DeviceTensor>,
    ids: &mut DeviceTensor,
    weights: &mut DeviceTensor,
) -> Result<()> {
    let (m, e) = match logits.shape() {
        [m, e] if logits.dtype() == DType::F32 => (*m, *e),
        _ => {
            return Err(Error::shape(
                "logits",
                logits.shape(),
                "f32 [tokens, experts]",
            ));
        }
    };
    check_router(e, top_k)?;
    expect("ids", ids, DType::I32, &[m, top_k])?;
    expect("weights", weights, DType::F32, &[m, top_k])?;
    if let Some(p) = probs.as_deref() {
        expect("probs", p, DType::F32, &[m, e])?;
    }
    let f = gpu.function(
        &sources::program("router.cu", sources::ROUTER_CU),
        &defines(e, DType::BF16),
        "comet_router_topk",
    )?;
    let params = RouterParams {
        logits: logits.device_ptr(),
        probs: probs.map_or(0, |p| p.device_ptr()),
        ids: ids.device_ptr(),
        weights: weights.device_ptr(),
        tokens: m as i64,
        experts: e as i64,
        k: top_k as i64,
        renormalize: i64::from(renormalize),
    };
    let grid = m.div_ceil(8);
    // SAFETY: mirrors RouterParams of router.cu; shapes checked above (one warp per token).
    unsafe { gpu.launch(&f, grid as u32, 256, 0, &params) }
}

/// Router backward: `dlogits [M, E]` f32 (and optionally a bf16/f16 copy for the GEMMs
/// `dwr = dlogitsᵀ · x`, `dx += dlogits · wr`) from `probs`, `ids` and `dweights [M, k]`.
#[allow(clippy::too_many_arguments)]
pub fn router_backward(
    gpu: &Gpu,
    probs: &DeviceTensor,
    ids: &DeviceTensor,
    dweights: &DeviceTensor,
    renormalize: bool,
    dlogits: &mut DeviceTensor,
    dlogits_elem: Option<&mut DeviceTensor>,
) -> Result<()> {
    let (m, e) = match probs.shape() {
        [m, e] if probs.dtype() == DType::F32 => (*m, *e),
        _ => {
            return Err(Error::shape(
                "probs",
                probs.shape(),
                "f32 [tokens, experts]",
            ));
        }
    };
    let k = ids.shape().get(1).copied().unwrap_or(0);
    check_router(e, k)?;
    expect("ids", ids, DType::I32, &[m, k])?;
    expect("dweights", dweights, DType::F32, &[m, k])?;
    expect("dlogits", dlogits, DType::F32, &[m, e])?;
    let mut elem = DType::BF16;
    if let Some(d) = dlogits_elem.as_deref() {
        if !d.dtype().is_half() || d.shape() != [m, e] {
            return Err(Error::shape(
                "dlogits_elem",
                d.shape(),
                format!("bf16/f16 [{m}, {e}]"),
            ));
        }
        elem = d.dtype();
    }
    let f = gpu.function(
        &sources::program("router.cu", sources::ROUTER_CU),
        &defines(e, elem),
        "comet_router_backward",
    )?;
    let params = RouterBwdParams {
        probs: probs.device_ptr(),
        ids: ids.device_ptr(),
        dweights: dweights.device_ptr(),
        dlogits: dlogits.device_ptr(),
        dlogits_elem: dlogits_elem.map_or(0, |d| d.device_ptr()),
        tokens: m as i64,
        experts: e as i64,
        k: k as i64,
        renormalize: i64::from(renormalize),
    };
    // SAFETY: mirrors RouterBwdParams of router.cu; shapes checked above.
    unsafe { gpu.launch(&f, m.div_ceil(8) as u32, 256, 0, &params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_limits() {
        check_router(8, 2).unwrap();
        check_router(256, 8).unwrap();
        check_router(1024, 64).unwrap();
        assert!(matches!(check_router(0, 1), Err(Error::Limit { .. })));
        assert!(matches!(
            check_router(2048, 2),
            Err(Error::Limit { value: 2048, .. })
        ));
        assert!(matches!(
            check_router(8, 9),
            Err(Error::Limit { value: 9, .. })
        ));
        assert!(matches!(
            check_router(8, 0),
            Err(Error::Limit { value: 0, .. })
        ));
        let msg = check_router(4, 5).unwrap_err().to_string();
        assert!(msg.contains("top_k = 5") && msg.contains("1..=4"), "{msg}");
    }

    #[test]
    fn experts_per_lane() {
        assert_eq!(defines(8, DType::BF16)["ROUTER_EPL"], "1");
        assert_eq!(defines(33, DType::BF16)["ROUTER_EPL"], "2");
        assert_eq!(defines(256, DType::F16)["ROUTER_EPL"], "8");
        assert!(defines(256, DType::F16).contains_key("COMET_F16"));
    }
}
