//! Row movement by index with 16-byte vector accesses: permute (dispatch), gather
//! (unpermute), the top-k weighted combine, and per-slot row dot products (router backward).
//! Rows have `H` elements, `H` a multiple of 8. An index outside the indexed tensor skips the
//! row (the routing plan marks such slots -1 and counts them in its status).

use crate::buffer::{DType, DeviceTensor};
use crate::cache::Defines;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::sources;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RowsParams {
    src: u64,
    dst: u64,
    index: u64,
    weights: u64,
    other: u64,
    tokens: i64,
    k: i64,
    hidden: i64,
    src_rows: i64,
    dst_rows: i64,
}

fn rows_of(what: &str, t: &DeviceTensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, h] if t.dtype().is_half() => {
            if h % 8 != 0 {
                return Err(Error::Alignment {
                    what: format!("{what} row length"),
                    value: *h,
                    multiple: 8,
                    why: "16-byte vector accesses",
                });
            }
            Ok((*r, *h))
        }
        s => Err(Error::shape(what, s, "bf16/f16 [rows, H]")),
    }
}

fn index_of(what: &str, t: &DeviceTensor, tokens: usize, k: Option<usize>) -> Result<usize> {
    let ok_dtype = t.dtype() == DType::I32;
    match (t.shape(), k) {
        ([m, kk], Some(k)) if ok_dtype && *m == tokens && *kk == k => Ok(k),
        ([m, kk], None) if ok_dtype && *m == tokens => Ok(*kk),
        ([m], Some(1)) | ([m], None) if ok_dtype && *m == tokens => Ok(1),
        (s, _) => Err(Error::shape(what, s, format!("i32 [{tokens}, k]"))),
    }
}

fn f32_like(what: &str, t: &DeviceTensor, shape: &[usize]) -> Result<()> {
    if t.dtype() != DType::F32 || t.numel() != shape.iter().product::<usize>() {
        return Err(Error::shape(what, t.shape(), format!("f32 {shape:?}")));
    }
    Ok(())
}

fn launch(gpu: &Gpu, elem: DType, name: &str, grid: usize, p: &RowsParams) -> Result<()> {
    let mut d = Defines::new();
    if elem == DType::F16 {
        d.insert("COMET_F16".into(), String::new());
    }
    let f = gpu.function(&sources::program("rows.cu", sources::ROWS_CU), &d, name)?;
    let grid = grid.clamp(1, 65535 * 8);
    // SAFETY: mirrors RowsParams of rows.cu; callers checked shapes; indices are bounds
    // checked in the kernel against src_rows/dst_rows.
    unsafe { gpu.launch(&f, grid as u32, 256, 0, p) }
}

/// Dispatch: `dst[index[t, j]] = src[t]`, times `scale[t, j]` when given.
pub fn permute_rows(
    gpu: &Gpu,
    src: &DeviceTensor,
    index: &DeviceTensor,
    scale: Option<&DeviceTensor>,
    dst: &mut DeviceTensor,
) -> Result<()> {
    let (m, h) = rows_of("permute source", src)?;
    let (r, hd) = rows_of("permute destination", dst)?;
    if hd != h || dst.dtype() != src.dtype() {
        return Err(Error::shape(
            "permute destination",
            dst.shape(),
            format!("{} [rows, {h}]", src.dtype()),
        ));
    }
    let k = index_of("permute index", index, m, None)?;
    if let Some(s) = scale {
        f32_like("permute scale", s, &[m, k])?;
    }
    let p = RowsParams {
        src: src.device_ptr(),
        dst: dst.device_ptr(),
        index: index.device_ptr(),
        weights: scale.map_or(0, |s| s.device_ptr()),
        tokens: m as i64,
        k: k as i64,
        hidden: h as i64,
        dst_rows: r as i64,
        ..Default::default()
    };
    launch(gpu, src.dtype(), "comet_permute_rows", m, &p)
}

/// Unpermute: `dst[i] = src[index[i]]` for every row `i` of `dst`.
pub fn gather_rows(
    gpu: &Gpu,
    src: &DeviceTensor,
    index: &DeviceTensor,
    dst: &mut DeviceTensor,
) -> Result<()> {
    let (r, h) = rows_of("gather source", src)?;
    let (n, hd) = rows_of("gather destination", dst)?;
    if hd != h || dst.dtype() != src.dtype() {
        return Err(Error::shape(
            "gather destination",
            dst.shape(),
            format!("{} [rows, {h}]", src.dtype()),
        ));
    }
    if index.dtype() != DType::I32 || index.numel() != n {
        return Err(Error::shape(
            "gather index",
            index.shape(),
            format!("i32 with {n} entries"),
        ));
    }
    let p = RowsParams {
        src: src.device_ptr(),
        dst: dst.device_ptr(),
        index: index.device_ptr(),
        tokens: n as i64,
        k: 1,
        hidden: h as i64,
        src_rows: r as i64,
        ..Default::default()
    };
    launch(gpu, src.dtype(), "comet_gather_rows", n, &p)
}

/// Combine: `dst[t] = Σ_j weights[t, j] · src[index[t, j]]` in slot order, fp32 accumulation
/// (`weights = None` sums with weight 1, the backward of a permute).
pub fn combine_rows(
    gpu: &Gpu,
    src: &DeviceTensor,
    index: &DeviceTensor,
    weights: Option<&DeviceTensor>,
    dst: &mut DeviceTensor,
) -> Result<()> {
    let (r, h) = rows_of("combine source", src)?;
    let (m, hd) = rows_of("combine destination", dst)?;
    if hd != h || dst.dtype() != src.dtype() {
        return Err(Error::shape(
            "combine destination",
            dst.shape(),
            format!("{} [tokens, {h}]", src.dtype()),
        ));
    }
    let k = index_of("combine index", index, m, None)?;
    if let Some(w) = weights {
        f32_like("combine weights", w, &[m, k])?;
    }
    let p = RowsParams {
        src: src.device_ptr(),
        dst: dst.device_ptr(),
        index: index.device_ptr(),
        weights: weights.map_or(0, |w| w.device_ptr()),
        tokens: m as i64,
        k: k as i64,
        hidden: h as i64,
        src_rows: r as i64,
        ..Default::default()
    };
    launch(gpu, src.dtype(), "comet_combine_rows", m, &p)
}

/// Per-slot dot products `out[t, j] = ⟨a[t], src[index[t, j]]⟩` (fp32), e.g. the routing
/// weight gradient `⟨dy[t], o_j(t)⟩`.
pub fn row_dots(
    gpu: &Gpu,
    a: &DeviceTensor,
    src: &DeviceTensor,
    index: &DeviceTensor,
    out: &mut DeviceTensor,
) -> Result<()> {
    let (m, h) = rows_of("row_dots tokens", a)?;
    let (r, hs) = rows_of("row_dots rows", src)?;
    if hs != h || a.dtype() != src.dtype() {
        return Err(Error::shape(
            "row_dots rows",
            src.shape(),
            format!("{} [rows, {h}]", a.dtype()),
        ));
    }
    let k = index_of("row_dots index", index, m, None)?;
    f32_like("row_dots output", out, &[m, k])?;
    let p = RowsParams {
        src: src.device_ptr(),
        dst: out.device_ptr(),
        index: index.device_ptr(),
        other: a.device_ptr(),
        tokens: m as i64,
        k: k as i64,
        hidden: h as i64,
        src_rows: r as i64,
        ..Default::default()
    };
    launch(gpu, a.dtype(), "comet_row_dots", (m * k).div_ceil(8), &p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn params_size() {
        assert_eq!(std::mem::size_of::<super::RowsParams>(), 10 * 8);
    }
}
