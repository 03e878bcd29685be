//! Element-wise activations over receive-layout rows (forward and backward), for paths that do
//! not fuse them into the GEMM epilogue. The row count can be a device value (e.g. the last
//! expert offset), so no host synchronisation is needed.

use crate::buffer::{DType, DeviceTensor};
use crate::cache::Defines;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::sources;

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `silu(gate) ⊙ up` on `h = [gate | up]` (`2F` wide).
    SwiGlu,
    /// `gelu_erf(h)`.
    Gelu,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ActParams {
    h: u64,
    da: u64,
    out: u64,
    rows_ptr: u64,
    rows_cap: i64,
    f: i64,
}

fn check(what: &str, t: &DeviceTensor, elem: DType, shape: [usize; 2]) -> Result<()> {
    if t.dtype() != elem || t.shape() != shape {
        return Err(Error::shape(what, t.shape(), format!("{elem} {shape:?}")));
    }
    Ok(())
}

fn run(
    gpu: &Gpu,
    act: Activation,
    backward: bool,
    h: &DeviceTensor,
    da: Option<&DeviceTensor>,
    out: &mut DeviceTensor,
    rows: Option<&DeviceTensor>,
) -> Result<()> {
    let (cap, hw) = match h.shape() {
        [r, w] if h.dtype().is_half() => (*r, *w),
        s => {
            return Err(Error::shape(
                "h (pre-activation)",
                s,
                "bf16/f16 [rows, width]",
            ));
        }
    };
    let elem = h.dtype();
    let f = if act == Activation::SwiGlu {
        if hw % 2 != 0 {
            return Err(Error::Alignment {
                what: "SwiGLU width (2F)".into(),
                value: hw,
                multiple: 2,
                why: "gate and up halves",
            });
        }
        hw / 2
    } else {
        hw
    };
    if f % 8 != 0 {
        return Err(Error::Alignment {
            what: "activation width F".into(),
            value: f,
            multiple: 8,
            why: "16-byte vector accesses",
        });
    }
    if backward {
        let da = da.ok_or_else(|| Error::Invalid("backward needs da".into()))?;
        check("da", da, elem, [cap, f])?;
        check("dh", out, elem, [cap, hw])?;
    } else {
        check("a (activation)", out, elem, [cap, f])?;
    }
    if let Some(r) = rows {
        if r.dtype() != DType::I32 || r.numel() != 1 {
            return Err(Error::shape("row count", r.shape(), "i32 [1]"));
        }
    }
    let name = match (act, backward) {
        (Activation::SwiGlu, false) => "comet_swiglu_fwd",
        (Activation::Gelu, false) => "comet_gelu_fwd",
        (Activation::SwiGlu, true) => "comet_swiglu_bwd",
        (Activation::Gelu, true) => "comet_gelu_bwd",
    };
    let mut d = Defines::new();
    if elem == DType::F16 {
        d.insert("COMET_F16".into(), String::new());
    }
    let func = gpu.function(
        &sources::program("activation.cu", sources::ACTIVATION_CU),
        &d,
        name,
    )?;
    let p = ActParams {
        h: h.device_ptr(),
        da: da.map_or(0, |t| t.device_ptr()),
        out: out.device_ptr(),
        rows_ptr: rows.map_or(0, |t| t.device_ptr()),
        rows_cap: cap as i64,
        f: f as i64,
    };
    let chunks = cap * f / 8;
    let grid = chunks.div_ceil(256).clamp(1, gpu.sm_count() as usize * 16);
    // SAFETY: mirrors ActParams of activation.cu; shapes checked above; the kernel clamps the
    // device row count to rows_cap.
    unsafe { gpu.launch(&func, grid as u32, 256, 0, &p) }
}

/// `a = act(h)` over the first `rows` (device i32 `[1]`, else all) rows.
pub fn activation_forward(
    gpu: &Gpu,
    act: Activation,
    h: &DeviceTensor,
    a: &mut DeviceTensor,
    rows: Option<&DeviceTensor>,
) -> Result<()> {
    run(gpu, act, false, h, None, a, rows)
}

/// `dh = act'(h) · da` over the first `rows` rows.
pub fn activation_backward(
    gpu: &Gpu,
    act: Activation,
    h: &DeviceTensor,
    da: &DeviceTensor,
    dh: &mut DeviceTensor,
    rows: Option<&DeviceTensor>,
) -> Result<()> {
    run(gpu, act, true, h, Some(da), dh, rows)
}
