//! Small integer kernels of the expert-parallel layer's NCCL baselines (`cuda/layer_ops.cu`):
//! an index scatter, per-chunk expert counts with a header, and the unpacking of the
//! all-gathered headers into the count matrices the routing plan reads.

use crate::buffer::{DType, DeviceTensor};
use crate::cache::Defines;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::sources;

/// The CUDA source.
pub const LAYER_OPS_CU: &str = include_str!("../cuda/layer_ops.cu");

/// Number of header entries after the counts in [`chunk_counts`]'s output.
pub const HEADER_EXTRA: usize = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ScatterParams {
    index: u64,
    values: u64,
    dst: u64,
    n: i64,
    dst_len: i64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ChunkCountParams {
    ids: u64,
    out: u64,
    tokens: i64,
    k: i64,
    experts: i64,
    chunks: i64,
    extra0: i64,
    extra1: i64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct UnpackParams {
    input: u64,
    out: u64,
    world: i64,
    stride: i64,
    chunks: i64,
    experts: i64,
}

/// The program holding these kernels.
pub fn program() -> crate::cache::Program {
    sources::program("layer_ops.cu", LAYER_OPS_CU)
}

fn i32_tensor(what: &str, t: &DeviceTensor, numel: usize) -> Result<()> {
    if t.dtype() != DType::I32 || t.numel() != numel {
        return Err(Error::shape(
            what,
            t.shape(),
            format!("i32 with {numel} entries"),
        ));
    }
    Ok(())
}

fn fits_i32(what: &str, v: usize) -> Result<()> {
    if v > i32::MAX as usize {
        return Err(Error::limit(what, v, i32::MAX.to_string()));
    }
    Ok(())
}

/// The first token of chunk `c` when `tokens` are split into `chunks` (the split
/// [`chunk_counts`] uses: chunk `c` is `bound(c) .. bound(c + 1)`).
pub fn chunk_bound(tokens: usize, chunks: usize, c: usize) -> usize {
    if chunks == 0 {
        return 0;
    }
    ((c as u128 * tokens as u128) / chunks as u128) as usize
}

/// `dst[index[i]] = values[i]` for every entry `i` of `index`; entries whose index is outside
/// `dst` are skipped. All i32; `values` has as many entries as `index`.
pub fn scatter_i32(
    gpu: &Gpu,
    index: &DeviceTensor,
    values: &DeviceTensor,
    dst: &mut DeviceTensor,
) -> Result<()> {
    let n = index.numel();
    i32_tensor("scatter index", index, n)?;
    i32_tensor("scatter values", values, n)?;
    i32_tensor("scatter destination", dst, dst.numel())?;
    for (what, t) in [("scatter index", index), ("scatter values", values)] {
        t.check_device(gpu, what)?;
    }
    dst.check_device(gpu, "scatter destination")?;
    fits_i32("scatter destination entries", dst.numel())?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&program(), &Defines::new(), "comet_scatter_i32")?;
    let p = ScatterParams {
        index: index.device_ptr(),
        values: values.device_ptr(),
        dst: dst.device_ptr(),
        n: n as i64,
        dst_len: dst.numel() as i64,
    };
    let grid = n.div_ceil(256).clamp(1, gpu.sm_count() as usize * 8);
    // SAFETY: mirrors ScatterParams of layer_ops.cu; `index` and `values` hold `n` i32, the
    // kernel bounds every store by `dst_len`, the number of i32 in `dst`.
    unsafe { gpu.launch(&f, grid as u32, 256, 0, &p) }
}

/// Per-chunk expert counts of `ids [M, k]` (i32; ids outside `0..experts` are not counted)
/// into `out` (i32, `chunks · experts + 2` entries): `out[c·E + e]` counts the slots of
/// tokens [`chunk_bound`]`(M, chunks, c) .. chunk_bound(M, chunks, c + 1)` routed to `e`;
/// the last two entries are `extra`.
pub fn chunk_counts(
    gpu: &Gpu,
    ids: &DeviceTensor,
    experts: usize,
    chunks: usize,
    extra: [i32; HEADER_EXTRA],
    out: &mut DeviceTensor,
) -> Result<()> {
    let (m, k) = match ids.shape() {
        [m, k] if ids.dtype() == DType::I32 => (*m, *k),
        s => return Err(Error::shape("ids", s, "i32 [tokens, k]")),
    };
    if experts == 0 || experts > crate::routing::MAX_PLAN_EXPERTS {
        return Err(Error::limit(
            "experts",
            experts,
            format!("1..={}", crate::routing::MAX_PLAN_EXPERTS),
        ));
    }
    if chunks == 0 || chunks > 65535 {
        return Err(Error::limit("chunks", chunks, "1..=65535"));
    }
    let need = chunks
        .checked_mul(experts)
        .and_then(|v| v.checked_add(HEADER_EXTRA))
        .ok_or_else(|| Error::limit("chunks * experts", usize::MAX, "overflow"))?;
    i32_tensor("chunk counts", out, need)?;
    fits_i32("tokens * k", m.saturating_mul(k))?;
    ids.check_device(gpu, "ids")?;
    out.check_device(gpu, "chunk counts")?;
    let f = gpu.function(&program(), &Defines::new(), "comet_chunk_counts")?;
    let p = ChunkCountParams {
        ids: ids.device_ptr(),
        out: out.device_ptr(),
        tokens: m as i64,
        k: k as i64,
        experts: experts as i64,
        chunks: chunks as i64,
        extra0: i64::from(extra[0]),
        extra1: i64::from(extra[1]),
    };
    // SAFETY: mirrors ChunkCountParams; ids holds M·k i32, out chunks·E + 2 (checked above);
    // the dynamic shared memory holds E ints.
    unsafe { gpu.launch(&f, chunks as u32, 1024, (experts * 4) as u32, &p) }
}

/// The all-gathered headers `input [world, stride]` (each rank's [`chunk_counts`] output,
/// `stride = chunks · experts + 2`) into `out [chunks, world, experts]`.
pub fn unpack_counts(
    gpu: &Gpu,
    input: &DeviceTensor,
    world: usize,
    chunks: usize,
    experts: usize,
    out: &mut DeviceTensor,
) -> Result<()> {
    let stride = chunks
        .checked_mul(experts)
        .and_then(|v| v.checked_add(HEADER_EXTRA))
        .ok_or_else(|| Error::limit("chunks * experts", usize::MAX, "overflow"))?;
    let total_in = world
        .checked_mul(stride)
        .ok_or_else(|| Error::limit("world * stride", usize::MAX, "overflow"))?;
    i32_tensor("gathered headers", input, total_in)?;
    i32_tensor("count matrices", out, chunks * world * experts)?;
    fits_i32("gathered header entries", total_in)?;
    input.check_device(gpu, "gathered headers")?;
    out.check_device(gpu, "count matrices")?;
    let n = chunks * world * experts;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&program(), &Defines::new(), "comet_unpack_counts")?;
    let p = UnpackParams {
        input: input.device_ptr(),
        out: out.device_ptr(),
        world: world as i64,
        stride: stride as i64,
        chunks: chunks as i64,
        experts: experts as i64,
    };
    let grid = n.div_ceil(256).clamp(1, gpu.sm_count() as usize * 8);
    // SAFETY: mirrors UnpackParams; `input` holds world·stride and `out` chunks·world·E i32
    // (checked above), and every index the kernel forms is below those counts.
    unsafe { gpu.launch(&f, grid as u32, 256, 0, &p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_all_8_byte_fields() {
        assert_eq!(std::mem::size_of::<ScatterParams>(), 5 * 8);
        assert_eq!(std::mem::size_of::<ChunkCountParams>(), 8 * 8);
        assert_eq!(std::mem::size_of::<UnpackParams>(), 6 * 8);
    }

    #[test]
    fn chunk_bounds_split_evenly_and_cover_every_token() {
        for tokens in [1usize, 2, 7, 100, 8192] {
            for chunks in 1..=tokens.min(9) {
                let b: Vec<usize> = (0..=chunks)
                    .map(|c| chunk_bound(tokens, chunks, c))
                    .collect();
                assert_eq!(b[0], 0);
                assert_eq!(b[chunks], tokens);
                let sizes: Vec<usize> = b.windows(2).map(|w| w[1] - w[0]).collect();
                let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
                assert!(lo >= 1 && hi - lo <= 1, "{tokens}/{chunks}: {sizes:?}");
                assert!(hi <= tokens.div_ceil(chunks));
            }
        }
        assert_eq!(chunk_bound(10, 0, 3), 0);
    }
}
