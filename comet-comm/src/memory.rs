//! Plain device allocations from `cuMemAlloc` (never the stream-ordered pool, whose memory
//! peers cannot touch) and small driver helpers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytemuck::Pod;
use cudarc::driver::{CudaContext, CudaStream, DriverError, sys};

use crate::error::{Error, Result};

/// Checks a raw driver result, naming the call on failure.
pub(crate) fn check(r: sys::CUresult, op: &'static str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda {
            op,
            source: DriverError(r),
        })
    }
}

/// Fails with [`Error::LibraryMissing`] when the CUDA driver library cannot be loaded
/// (cudarc would panic at the first call otherwise).
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate library names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::LibraryMissing {
            library: "libcuda",
            hint: "no NVIDIA driver found (libcuda.so.1 not loadable); this needs a CUDA GPU host"
                .into(),
        })
    }
}

/// Number of visible CUDA devices (an error, not a panic, without a driver).
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    let n = CudaContext::device_count()?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Waits for all work queued on `stream`, polling, for at most `timeout`.
/// `on_poll` runs between polls (e.g. to check NCCL's asynchronous error state).
pub(crate) fn wait_stream<F>(
    stream: &CudaStream,
    timeout: Duration,
    rank: usize,
    what: &str,
    mut on_poll: F,
) -> Result<()>
where
    F: FnMut() -> Result<()>,
{
    stream.context().bind_to_thread()?;
    let start = Instant::now();
    let mut sleep = Duration::from_micros(20);
    loop {
        // SAFETY: the stream handle is alive as long as `stream`.
        let r = unsafe { sys::cuStreamQuery(stream.cu_stream()) };
        match r {
            sys::CUresult::CUDA_SUCCESS => return Ok(()),
            sys::CUresult::CUDA_ERROR_NOT_READY => {}
            other => return check(other, "cuStreamQuery"),
        }
        on_poll()?;
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                rank,
                what: what.to_string(),
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(2));
    }
}

/// A device allocation from `cuMemAlloc_v2` on one context, freed on drop.
///
/// Unlike cudarc's pool allocations, such memory can be opened by peers (peer access or
/// CUDA IPC). All copies here are raw: no event tracking, the caller orders streams.
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is a plain device address plus its owning context (Send + Sync);
// device memory may be used from any thread that binds the context.
unsafe impl Send for DeviceBuffer {}
// SAFETY: see above; `&DeviceBuffer` only exposes the address and copies.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocates `bytes` (at least 256, so that every buffer has a distinct address).
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the context is current.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(256)) },
            "cuMemAlloc_v2",
        )?;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }

    /// Allocates room for `data` and uploads it (synchronously).
    pub fn from_slice<T: Pod>(stream: &CudaStream, data: &[T]) -> Result<Self> {
        let b = Self::new(stream.context(), std::mem::size_of_val(data))?;
        b.upload(stream, 0, data)?;
        stream.synchronize()?;
        Ok(b)
    }

    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes as requested.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Owning context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn range_check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(Error::invalid(
                "byte range",
                format!("{offset}..{}", offset.saturating_add(len)),
                format!("within a buffer of {} bytes", self.bytes),
            )),
        }
    }

    /// Copies `data` to `offset_bytes`, queued on `stream`. The host data is staged before
    /// the call returns (pageable memory), so it may be dropped afterwards.
    pub fn upload<T: Pod>(
        &self,
        stream: &CudaStream,
        offset_bytes: usize,
        data: &[T],
    ) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.range_check(offset_bytes, bytes.len())?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: the range was checked against the allocation; the host slice is valid
        // for `bytes.len()` bytes and pageable copies are staged before returning.
        check(
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    self.ptr + offset_bytes as u64,
                    bytes.as_ptr() as *const _,
                    bytes.len(),
                    stream.cu_stream(),
                )
            },
            "cuMemcpyHtoDAsync_v2",
        )?;
        // Pageable host memory: make the copy complete before `data` can go away.
        stream.synchronize()?;
        Ok(())
    }

    /// Copies `count` elements from `offset_bytes` to the host, after all work queued on
    /// `stream` before it.
    pub fn download<T: Pod>(
        &self,
        stream: &CudaStream,
        offset_bytes: usize,
        count: usize,
    ) -> Result<Vec<T>> {
        let len = count
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::invalid("count", count, "fits in usize bytes"))?;
        self.range_check(offset_bytes, len)?;
        let mut out = vec![T::zeroed(); count];
        if len == 0 {
            return Ok(out);
        }
        self.ctx.bind_to_thread()?;
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        // SAFETY: the range was checked; `dst` is valid for `len` bytes and we synchronise
        // the stream before it is read or dropped.
        check(
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    dst.as_mut_ptr() as *mut _,
                    self.ptr + offset_bytes as u64,
                    len,
                    stream.cu_stream(),
                )
            },
            "cuMemcpyDtoHAsync_v2",
        )?;
        stream.synchronize()?;
        Ok(out)
    }

    /// Sets every byte to `value`, queued on `stream` (e.g. 0xFF poisons bf16/f32 as NaN).
    pub fn fill_bytes(&self, stream: &CudaStream, value: u8) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the whole allocation is written; it is at least `bytes` long.
        check(
            unsafe { sys::cuMemsetD8Async(self.ptr, value, self.bytes, stream.cu_stream()) },
            "cuMemsetD8Async",
        )
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc_v2 in this context and is freed once.
            let r = unsafe { sys::cuMemFree_v2(self.ptr) };
            if r != sys::CUresult::CUDA_SUCCESS {
                tracing::warn!("cuMemFree_v2 failed: {r:?}");
            }
        }
    }
}
