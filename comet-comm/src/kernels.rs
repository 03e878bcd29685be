//! Data-movement and signal kernels (`cuda/p2p.cu`): loading and typed launchers.

use std::sync::Arc;
use std::time::Duration;

use comet_kernels::{Arch, Defines, KernelCache};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg, sys};

use crate::error::{Error, Result};
use crate::memory::{DeviceBuffer, check};
use crate::signal::{ErrorWord, SignalPad};
use crate::sources::p2p_program;
use crate::symmetric::SymmetricBuffer;

/// Threads per block of the copy kernels (`COMET_COPY_THREADS`).
pub const COPY_THREADS: u32 = 512;
/// 16-byte vectors each thread keeps in flight (`COMET_UNROLL`).
pub const UNROLL: u32 = 8;
/// Largest world the device all-to-all-v supports (`COMET_A2AV_MAX_WORLD`).
pub const A2AV_MAX_WORLD: usize = 64;

/// A copy of `rows` rows of `row_bytes` bytes, each side at a byte offset with a byte
/// stride between rows. Everything must be a multiple of 16 bytes (16-byte accesses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCopy {
    /// Rows to copy.
    pub rows: usize,
    /// Bytes per row.
    pub row_bytes: usize,
    /// Byte offset of the first source row.
    pub src_offset: usize,
    /// Bytes from one source row to the next.
    pub src_stride: usize,
    /// Byte offset of the first destination row.
    pub dst_offset: usize,
    /// Bytes from one destination row to the next.
    pub dst_stride: usize,
}

impl RowCopy {
    /// Rows packed back to back on both sides.
    pub fn contiguous(rows: usize, row_bytes: usize, src_offset: usize, dst_offset: usize) -> Self {
        RowCopy {
            rows,
            row_bytes,
            src_offset,
            src_stride: row_bytes,
            dst_offset,
            dst_stride: row_bytes,
        }
    }

    /// Bytes spanned on a side with this stride and offset (0 rows: 0).
    fn extent(&self, offset: usize, stride: usize) -> Option<usize> {
        if self.rows == 0 {
            return Some(offset);
        }
        (self.rows - 1)
            .checked_mul(stride)?
            .checked_add(self.row_bytes)?
            .checked_add(offset)
    }

    /// Checks alignment and bounds against buffers of `src_len` and `dst_len` bytes and
    /// says which kernel runs it.
    pub fn plan(&self, src_len: usize, dst_len: usize) -> Result<CopyPlan> {
        for (name, v) in [
            ("row_bytes", self.row_bytes),
            ("src_offset", self.src_offset),
            ("src_stride", self.src_stride),
            ("dst_offset", self.dst_offset),
            ("dst_stride", self.dst_stride),
        ] {
            if v % 16 != 0 {
                return Err(Error::invalid(
                    name,
                    v,
                    "a multiple of 16 bytes (16-byte accesses)",
                ));
            }
        }
        if self.rows == 0 || self.row_bytes == 0 {
            return Ok(CopyPlan::Empty);
        }
        if self.src_stride < self.row_bytes {
            return Err(Error::invalid(
                "src_stride",
                self.src_stride,
                format!(">= row_bytes ({})", self.row_bytes),
            ));
        }
        if self.dst_stride < self.row_bytes {
            return Err(Error::invalid(
                "dst_stride",
                self.dst_stride,
                format!(">= row_bytes ({})", self.row_bytes),
            ));
        }
        for (name, ext, len) in [
            (
                "source rows",
                self.extent(self.src_offset, self.src_stride),
                src_len,
            ),
            (
                "destination rows",
                self.extent(self.dst_offset, self.dst_stride),
                dst_len,
            ),
        ] {
            match ext {
                Some(e) if e <= len => {}
                _ => {
                    return Err(Error::invalid(
                        name,
                        format!("{} rows of {} bytes", self.rows, self.row_bytes),
                        format!("inside the buffer's {len} bytes"),
                    ));
                }
            }
        }
        let row_vecs = (self.row_bytes / 16) as u64;
        if self.src_stride == self.row_bytes && self.dst_stride == self.row_bytes {
            return Ok(CopyPlan::Flat {
                n_vec: row_vecs * self.rows as u64,
            });
        }
        let total = row_vecs
            .checked_mul(self.rows as u64)
            .filter(|t| *t < (1u64 << 32))
            .ok_or_else(|| {
                Error::invalid(
                    "strided copy",
                    format!("{} rows x {} bytes", self.rows, self.row_bytes),
                    "fewer than 2^32 16-byte vectors (64 GiB) per call",
                )
            })?;
        Ok(CopyPlan::Rows {
            rows: self.rows as u32,
            row_vecs: row_vecs as u32,
            src_stride_vecs: (self.src_stride / 16) as u64,
            dst_stride_vecs: (self.dst_stride / 16) as u64,
            total_vecs: total,
        })
    }
}

/// Which copy kernel runs a [`RowCopy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPlan {
    /// Nothing to copy.
    Empty,
    /// Both sides contiguous: one flat vector copy.
    Flat {
        /// 16-byte vectors.
        n_vec: u64,
    },
    /// Strided rows.
    Rows {
        /// Rows.
        rows: u32,
        /// Vectors per row.
        row_vecs: u32,
        /// Source stride in vectors.
        src_stride_vecs: u64,
        /// Destination stride in vectors.
        dst_stride_vecs: u64,
        /// rows * row_vecs.
        total_vecs: u64,
    },
}

/// comet-comm's kernels loaded into one context.
#[derive(Debug)]
pub struct CommKernels {
    copy_flat: CudaFunction,
    copy_rows: CudaFunction,
    signal_set: CudaFunction,
    signal_add: CudaFunction,
    signal_wait: CudaFunction,
    a2av: CudaFunction,
    sm_count: u32,
    copy_blocks_per_sm: u32,
    a2av_blocks_per_sm: u32,
    arch: String,
    ctx: Arc<CudaContext>,
}

impl CommKernels {
    /// Compiles (NVRTC through comet-kernels' process-wide [`KernelCache`], cached on disk)
    /// and loads the kernels for `ctx`'s device.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Arc<Self>> {
        ctx.bind_to_thread()?;
        let arch = Arch::of(ctx)?.target();
        let (_, module) = KernelCache::global().module(ctx, &p2p_program(), &Defines::new())?;
        let f = |name: &str| module.load_function(name).map_err(Error::from);
        let copy_flat = f("comet_copy_flat")?;
        let a2av = f("comet_a2av_push")?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as u32;
        let occ = |func: &CudaFunction| -> Result<u32> {
            let mut n = 0;
            // SAFETY: a loaded function handle; valid out-pointer.
            check(
                unsafe {
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        &mut n,
                        func.cu_function(),
                        COPY_THREADS as i32,
                        0,
                    )
                },
                "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            )?;
            Ok(n.max(1) as u32)
        };
        let copy_blocks_per_sm = occ(&copy_flat)?;
        let a2av_blocks_per_sm = occ(&a2av)?;
        Ok(Arc::new(CommKernels {
            copy_flat,
            copy_rows: f("comet_copy_rows")?,
            signal_set: f("comet_signal_set_kernel")?,
            signal_add: f("comet_signal_add_kernel")?,
            signal_wait: f("comet_signal_wait_kernel")?,
            a2av,
            sm_count,
            copy_blocks_per_sm,
            a2av_blocks_per_sm,
            arch,
            ctx: ctx.clone(),
        }))
    }

    /// Multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// The architecture the kernels were built for (e.g. `sm_90a`).
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// Blocks of a full-device copy grid (multiprocessors × resident blocks each).
    pub fn max_copy_blocks(&self) -> u32 {
        self.sm_count * self.copy_blocks_per_sm
    }
    /// Largest co-resident grid of the all-to-all-v kernel.
    pub fn max_a2av_blocks(&self) -> u32 {
        self.sm_count * self.a2av_blocks_per_sm
    }
    /// The context the kernels live in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn a2av_function(&self) -> &CudaFunction {
        &self.a2av
    }

    fn grid_for(&self, total_vecs: u64, blocks: Option<u32>) -> Result<u32> {
        if let Some(b) = blocks
            && b == 0
        {
            return Err(Error::invalid("blocks", 0, ">= 1"));
        }
        let per_block = (COPY_THREADS * UNROLL) as u64;
        let needed = total_vecs.div_ceil(per_block).max(1);
        let cap = blocks.unwrap_or(self.max_copy_blocks()) as u64;
        Ok(needed.min(cap) as u32)
    }

    /// Copies rows between raw device addresses (16-byte accesses, grid-stride, `UNROLL`
    /// loads in flight per thread). `blocks`: grid size (default: the whole device).
    ///
    /// # Safety
    /// `src` and `dst` must be addresses this context may access (local, or a peer's
    /// region mapped by a [`SymmetricBuffer`]) spanning `src_len` / `dst_len` bytes, alive
    /// and not written by anyone else until the copy completes on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn copy_raw(
        &self,
        stream: &CudaStream,
        src: u64,
        src_len: usize,
        dst: u64,
        dst_len: usize,
        c: &RowCopy,
        blocks: Option<u32>,
    ) -> Result<()> {
        if src % 16 != 0 || dst % 16 != 0 {
            return Err(Error::invalid(
                "base address",
                format!("{src:#x} / {dst:#x}"),
                "16-byte aligned",
            ));
        }
        let plan = c.plan(src_len, dst_len)?;
        let s = src + c.src_offset as u64;
        let d = dst + c.dst_offset as u64;
        match plan {
            CopyPlan::Empty => Ok(()),
            CopyPlan::Flat { n_vec } => {
                let grid = self.grid_for(n_vec, blocks)?;
                let mut b = stream.launch_builder(&self.copy_flat);
                b.arg(&s).arg(&d).arg(&n_vec);
                // SAFETY: kernel signature (const uint4*, uint4*, u64); ranges checked above
                // and valid per the caller.
                unsafe { b.launch(cfg(grid, COPY_THREADS)) }?;
                Ok(())
            }
            CopyPlan::Rows {
                rows,
                row_vecs,
                src_stride_vecs,
                dst_stride_vecs,
                total_vecs,
            } => {
                let grid = self.grid_for(total_vecs, blocks)?;
                let mut b = stream.launch_builder(&self.copy_rows);
                b.arg(&s)
                    .arg(&src_stride_vecs)
                    .arg(&d)
                    .arg(&dst_stride_vecs)
                    .arg(&rows)
                    .arg(&row_vecs);
                // SAFETY: kernel signature (const uint4*, u64, uint4*, u64, u32, u32); ranges
                // checked above and valid per the caller.
                unsafe { b.launch(cfg(grid, COPY_THREADS)) }?;
                Ok(())
            }
        }
    }

    /// Push: rows of this rank's `src` into `peer`'s region of `dst` (NVLink stores).
    pub fn push_rows(
        &self,
        stream: &CudaStream,
        src: &DeviceBuffer,
        dst: &SymmetricBuffer,
        peer: usize,
        c: &RowCopy,
        blocks: Option<u32>,
    ) -> Result<()> {
        let _span = tracing::trace_span!("push_rows", peer, rows = c.rows).entered();
        let dst_ptr = dst.peer_ptr_or_err(peer)?;
        // SAFETY: `src` is a live local allocation, `dst_ptr` a mapped symmetric region of
        // the stated size; bounds are checked by `copy_raw`.
        unsafe {
            self.copy_raw(
                stream,
                src.ptr(),
                src.len_bytes(),
                dst_ptr,
                dst.len_bytes(),
                c,
                blocks,
            )
        }
    }

    /// Pull: rows of `peer`'s region of `src` into this rank's `dst` (NVLink loads).
    pub fn pull_rows(
        &self,
        stream: &CudaStream,
        src: &SymmetricBuffer,
        peer: usize,
        dst: &DeviceBuffer,
        c: &RowCopy,
        blocks: Option<u32>,
    ) -> Result<()> {
        let _span = tracing::trace_span!("pull_rows", peer, rows = c.rows).entered();
        let src_ptr = src.peer_ptr_or_err(peer)?;
        // SAFETY: as in push_rows, with the roles swapped.
        unsafe {
            self.copy_raw(
                stream,
                src_ptr,
                src.len_bytes(),
                dst.ptr(),
                dst.len_bytes(),
                c,
                blocks,
            )
        }
    }

    /// Queues a release-set of `peer`'s signal `id` to `value` (after the prior work of
    /// `stream`).
    pub fn signal_set(
        &self,
        stream: &CudaStream,
        pad: &SignalPad,
        peer: usize,
        id: usize,
        value: u64,
    ) -> Result<()> {
        self.signal_op(&self.signal_set, stream, pad, peer, id, value)
    }

    /// Queues a release-add of `value` to `peer`'s signal `id`.
    pub fn signal_add(
        &self,
        stream: &CudaStream,
        pad: &SignalPad,
        peer: usize,
        id: usize,
        value: u64,
    ) -> Result<()> {
        self.signal_op(&self.signal_add, stream, pad, peer, id, value)
    }

    /// Queues `f` (`comet_signal_set_kernel` or `comet_signal_add_kernel`) on `peer`'s
    /// signal `id` with `value`.
    fn signal_op(
        &self,
        f: &CudaFunction,
        stream: &CudaStream,
        pad: &SignalPad,
        peer: usize,
        id: usize,
        value: u64,
    ) -> Result<()> {
        let p = pad.peer_ptr(peer, id)?;
        let mut b = stream.launch_builder(f);
        b.arg(&p).arg(&value);
        // SAFETY: `p` is a mapped signal word; both kernels' signature is (u64*, u64).
        unsafe { b.launch(cfg(1, 32)) }?;
        Ok(())
    }

    /// Queues a bounded acquire-wait: this rank's signals `first..first + count` must each
    /// reach `target` within `timeout`, else `err` records (rank, peer, signal, target, seen)
    /// and later work on `stream` runs anyway (check `err` with [`ErrorWord::take`]).
    #[allow(clippy::too_many_arguments)]
    pub fn signal_wait(
        &self,
        stream: &CudaStream,
        pad: &SignalPad,
        first: usize,
        count: usize,
        target: u64,
        timeout: Duration,
        err: &ErrorWord,
        rank: usize,
        peer: Option<usize>,
    ) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let last = first
            .checked_add(count - 1)
            .ok_or_else(|| Error::invalid("signal range", first, "first + count fits"))?;
        pad.local_ptr(last)?;
        let base = pad.local_ptr(0)?;
        let first32 = u32::try_from(first).map_err(|_| Error::invalid("first", first, "< 2^32"))?;
        let count32 = u32::try_from(count).map_err(|_| Error::invalid("count", count, "< 2^32"))?;
        let timeout_ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let e = err.ptr();
        let rank32 = rank as u32;
        let peer32 = peer.map_or(crate::signal::NO_PEER, |p| p as u32);
        let mut b = stream.launch_builder(&self.signal_wait);
        b.arg(&base)
            .arg(&first32)
            .arg(&count32)
            .arg(&target)
            .arg(&timeout_ns)
            .arg(&e)
            .arg(&rank32)
            .arg(&peer32);
        // SAFETY: signature (const u64*, u32, u32, u64, u64, comet_error_t*, u32, u32);
        // the signal range was checked against the pad.
        unsafe { b.launch(cfg(1, 32)) }?;
        Ok(())
    }
}

pub(crate) fn cfg(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_copies_are_flat() {
        let c = RowCopy::contiguous(10, 64, 0, 128);
        assert_eq!(c.plan(640, 768).unwrap(), CopyPlan::Flat { n_vec: 40 });
    }

    #[test]
    fn strided_copies_use_the_row_kernel() {
        let c = RowCopy {
            rows: 3,
            row_bytes: 32,
            src_offset: 16,
            src_stride: 48,
            dst_offset: 0,
            dst_stride: 32,
        };
        // source spans 16 + 2*48 + 32 = 144 bytes
        assert_eq!(
            c.plan(144, 96).unwrap(),
            CopyPlan::Rows {
                rows: 3,
                row_vecs: 2,
                src_stride_vecs: 3,
                dst_stride_vecs: 2,
                total_vecs: 6
            }
        );
        assert!(c.plan(143, 96).is_err(), "one byte short on the source");
        assert!(
            c.plan(144, 95).is_err(),
            "one byte short on the destination"
        );
    }

    #[test]
    fn misaligned_sizes_are_refused_with_their_name() {
        let mut c = RowCopy::contiguous(4, 30, 0, 0);
        match c.plan(1 << 20, 1 << 20) {
            Err(Error::InvalidArgument { name, value, .. }) => {
                assert_eq!(name, "row_bytes");
                assert_eq!(value, "30");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        c = RowCopy::contiguous(4, 32, 8, 0);
        assert!(matches!(
            c.plan(1 << 20, 1 << 20),
            Err(Error::InvalidArgument {
                name: "src_offset",
                ..
            })
        ));
        c = RowCopy {
            src_stride: 16,
            ..RowCopy::contiguous(4, 32, 0, 0)
        };
        assert!(matches!(
            c.plan(1 << 20, 1 << 20),
            Err(Error::InvalidArgument {
                name: "src_stride",
                ..
            })
        ));
    }

    #[test]
    fn empty_and_overflowing_copies() {
        assert_eq!(
            RowCopy::contiguous(0, 64, 0, 0).plan(0, 0).unwrap(),
            CopyPlan::Empty
        );
        let huge = RowCopy::contiguous(usize::MAX / 8, 64, 0, 0);
        assert!(huge.plan(usize::MAX, usize::MAX).is_err());
        let big_strided = RowCopy {
            rows: 1 << 22,
            row_bytes: 1 << 14,
            src_offset: 0,
            src_stride: 1 << 15,
            dst_offset: 0,
            dst_stride: 1 << 14,
        };
        assert!(matches!(
            big_strided.plan(usize::MAX, usize::MAX),
            Err(Error::InvalidArgument {
                name: "strided copy",
                ..
            })
        ));
    }
}
