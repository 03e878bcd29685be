//! Device memory: [`DeviceTensor`] (dtype + shape over device memory, with host transfers) and
//! [`RawDeviceBuffer`] (plain `cuMemAlloc_v2` memory, for buffers peers will touch).
//!
//! Tensors come in two kinds of storage:
//! - pool memory from cudarc's stream-ordered allocator ([`DeviceTensor::alloc`]): fast to
//!   allocate, freed in stream order on the stream it was allocated on. Peers must not touch
//!   it (a peer kernel writing pool memory faulted on the H200 hosts; see GPU-HOSTS.md).
//! - raw `cuMemAlloc_v2` memory ([`DeviceTensor::alloc_raw`]): what comet-comm wraps for
//!   symmetric/peer buffers and CUDA IPC.
//!
//! Kernels receive raw device pointers; ordering between streams is the caller's business (all
//! operations of this crate run on one [`Gpu`] handle's stream, in order).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, DevicePtr, result as drv, sys::CUdeviceptr};
use half::{bf16, f16};

use crate::device::Gpu;
use crate::error::{Error, Result};

/// Element type of a device tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// 32-bit unsigned.
    U32,
    /// 32-bit signed.
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
        }
    }
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }
    /// Whether this is a 16-bit float type the GEMM engine takes as input.
    pub fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<comet_core::DType> for DType {
    fn from(d: comet_core::DType) -> Self {
        match d {
            comet_core::DType::BF16 => DType::BF16,
            comet_core::DType::F16 => DType::F16,
            comet_core::DType::F32 => DType::F32,
        }
    }
}

/// Host element types that map to a [`DType`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The matching device dtype.
    const DTYPE: DType;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}

/// Number of elements of `shape`, or an error on overflow.
pub fn numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d).ok_or_else(|| {
            Error::limit(
                "tensor elements",
                usize::MAX,
                format!("shape {shape:?} overflows"),
            )
        })
    })
}

/// Device memory from `cuMemAlloc_v2`, freed with `cuMemFree_v2` on drop.
///
/// This is the memory peers may map or write (through CUDA IPC or peer access): unlike the
/// stream-ordered pool, it needs no pool access grants.
#[derive(Debug)]
pub struct RawDeviceBuffer {
    ptr: CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is a plain device address plus its owning context (itself Send + Sync);
// no host-side aliasing exists.
unsafe impl Send for RawDeviceBuffer {}
// SAFETY: as above; shared references only read the address.
unsafe impl Sync for RawDeviceBuffer {}

impl RawDeviceBuffer {
    /// Allocates `bytes` bytes (uninitialised) in `ctx`.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread()?;
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: the context is current; the returned pointer is owned by this buffer.
            unsafe { drv::malloc_sync(bytes)? }
        };
        Ok(RawDeviceBuffer {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }
    /// Device address.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Owning context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Drop for RawDeviceBuffer {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from cuMemAlloc_v2 in this context and is freed exactly once.
        // cuMemFree waits for outstanding work using the memory to finish.
        if let Err(e) = unsafe { drv::free_sync(self.ptr) } {
            tracing::warn!(error = %e, "cuMemFree failed");
        }
    }
}

#[derive(Debug)]
enum Storage {
    // Held for its Drop (stream-ordered free); kernels use the cached raw address.
    #[allow(dead_code)]
    Pool(CudaSlice<u8>),
    Raw(RawDeviceBuffer),
}

/// A typed, shaped, row-major tensor in device memory.
///
/// [`DeviceTensor::view`] and [`DeviceTensor::rows`] make further tensors over part of the
/// same allocation (they share it: the memory is freed when the last of them is dropped).
#[derive(Debug)]
pub struct DeviceTensor {
    storage: Arc<Storage>,
    ptr: CUdeviceptr,
    dtype: DType,
    shape: Vec<usize>,
    ordinal: usize,
}

impl DeviceTensor {
    /// Uninitialised tensor from the stream-ordered pool of `gpu`'s stream.
    pub fn alloc(gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<Self> {
        let bytes = numel(shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::limit("tensor bytes", usize::MAX, "overflow"))?;
        // SAFETY: the memory is uninitialised; callers poison, zero or overwrite it before
        // reading (every kernel of this crate writes what it claims to write).
        let slice = unsafe { gpu.stream().alloc::<u8>(bytes.max(1))? };
        let ptr = {
            let (p, _sync) = slice.device_ptr(gpu.stream());
            p
        };
        Ok(DeviceTensor {
            storage: Arc::new(Storage::Pool(slice)),
            ptr,
            dtype,
            shape: shape.to_vec(),
            ordinal: gpu.ordinal(),
        })
    }

    /// Uninitialised tensor in `cuMemAlloc_v2` memory (for buffers peers touch).
    pub fn alloc_raw(gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<Self> {
        let bytes = numel(shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::limit("tensor bytes", usize::MAX, "overflow"))?;
        let raw = RawDeviceBuffer::new(gpu.context(), bytes)?;
        let ptr = raw.device_ptr();
        Ok(DeviceTensor {
            storage: Arc::new(Storage::Raw(raw)),
            ptr,
            dtype,
            shape: shape.to_vec(),
            ordinal: gpu.ordinal(),
        })
    }

    /// Wraps an existing raw buffer (e.g. one comet-comm allocated) as a tensor.
    pub fn from_raw(raw: RawDeviceBuffer, dtype: DType, shape: &[usize]) -> Result<Self> {
        let need = numel(shape)? * dtype.size();
        if need > raw.bytes() {
            return Err(Error::limit(
                "tensor bytes",
                need,
                format!("{} bytes in the raw buffer", raw.bytes()),
            ));
        }
        let ptr = raw.device_ptr();
        let ordinal = raw.context().ordinal();
        Ok(DeviceTensor {
            storage: Arc::new(Storage::Raw(raw)),
            ptr,
            dtype,
            shape: shape.to_vec(),
            ordinal,
        })
    }

    /// Zero-filled tensor (pool memory).
    pub fn zeros(gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<Self> {
        let mut t = Self::alloc(gpu, dtype, shape)?;
        t.fill_bytes(gpu, 0)?;
        Ok(t)
    }

    /// Tensor holding `data` (pool memory).
    pub fn from_host<T: Element>(gpu: &Gpu, shape: &[usize], data: &[T]) -> Result<Self> {
        let mut t = Self::alloc(gpu, T::DTYPE, shape)?;
        t.copy_from_host(gpu, data)?;
        Ok(t)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Device address of element 0.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Whether the memory is `cuMemAlloc_v2` memory (peer-safe).
    pub fn is_raw(&self) -> bool {
        matches!(*self.storage, Storage::Raw(_))
    }
    /// The raw buffer behind the tensor, when it is `cuMemAlloc_v2` memory.
    pub fn raw_buffer(&self) -> Option<&RawDeviceBuffer> {
        match &*self.storage {
            Storage::Raw(r) => Some(r),
            Storage::Pool(_) => None,
        }
    }

    /// A tensor of `dtype`-sized elements and `shape` over this tensor's memory, starting
    /// `offset` elements (of this tensor's dtype) in. It shares the allocation (which stays
    /// alive while any view of it does); writes through either are seen by both, in stream
    /// order. The range must lie inside this tensor and start 4-byte aligned.
    pub fn view(&self, offset: usize, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
        let start = offset
            .checked_mul(self.dtype.size())
            .ok_or_else(|| Error::limit("view offset", offset, "overflow"))?;
        let bytes = numel(shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::limit("view bytes", usize::MAX, "overflow"))?;
        let end = start
            .checked_add(bytes)
            .ok_or_else(|| Error::limit("view end", usize::MAX, "overflow"))?;
        if end > self.bytes() {
            return Err(Error::limit(
                "view end byte",
                end,
                format!(
                    "{} bytes in the tensor {:?} {}",
                    self.bytes(),
                    self.shape,
                    self.dtype
                ),
            ));
        }
        if start % 4 != 0 {
            return Err(Error::Alignment {
                what: "view start byte".into(),
                value: start,
                multiple: 4,
                why: "element accesses of 32-bit kernels",
            });
        }
        Ok(DeviceTensor {
            storage: self.storage.clone(),
            ptr: self.ptr + start as u64,
            dtype,
            shape: shape.to_vec(),
            ordinal: self.ordinal,
        })
    }

    /// Rows `start .. start + count` (along the first axis) as a tensor sharing this one's
    /// memory (see [`DeviceTensor::view`]).
    pub fn rows(&self, start: usize, count: usize) -> Result<DeviceTensor> {
        let Some((&rows, rest)) = self.shape.split_first() else {
            return Err(Error::shape("rows of a scalar", &self.shape, "rank >= 1"));
        };
        if start.checked_add(count).is_none_or(|end| end > rows) {
            return Err(Error::limit(
                "row range end",
                start.saturating_add(count),
                format!("{rows} rows"),
            ));
        }
        let row_elems = numel(rest)?;
        let mut shape = vec![count];
        shape.extend_from_slice(rest);
        self.view(start * row_elems, self.dtype, &shape)
    }

    /// Changes the shape (same number of elements).
    pub fn reshape(&mut self, shape: &[usize]) -> Result<()> {
        if numel(shape)? != self.numel() {
            return Err(Error::shape(
                "reshape",
                shape,
                format!("{} elements", self.numel()),
            ));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// Copies `data` into the tensor (enqueued on `gpu`'s stream; `data` may be dropped on
    /// return: pageable copies are staged before the call returns).
    pub fn copy_from_host<T: Element>(&mut self, gpu: &Gpu, data: &[T]) -> Result<()> {
        self.check_host::<T>(gpu, "copy_from_host", data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        gpu.context().bind_to_thread()?;
        // SAFETY: the tensor holds exactly `data.len()` elements of T's size (checked above).
        unsafe { drv::memcpy_htod_async(self.ptr, data, gpu.stream().cu_stream())? };
        Ok(())
    }

    /// Copies the tensor to the host (synchronises `gpu`'s stream).
    pub fn to_host<T: Element>(&self, gpu: &Gpu) -> Result<Vec<T>> {
        self.check_host::<T>(gpu, "to_host", self.numel())?;
        let mut out = vec![T::zeroed(); self.numel()];
        if out.is_empty() {
            return Ok(out);
        }
        gpu.context().bind_to_thread()?;
        // SAFETY: `out` holds exactly as many elements as the tensor (checked above); the
        // stream is synchronised before `out` is read or dropped.
        unsafe { drv::memcpy_dtoh_async(&mut out, self.ptr, gpu.stream().cu_stream())? };
        gpu.synchronize()?;
        Ok(out)
    }

    /// Copies elements `start..start + len` to the host (synchronises `gpu`'s stream).
    pub fn to_host_range<T: Element>(&self, gpu: &Gpu, start: usize, len: usize) -> Result<Vec<T>> {
        self.check_device(gpu, "to_host_range")?;
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                what: "to_host_range".into(),
                got: T::DTYPE.to_string(),
                expected: self.dtype.to_string(),
            });
        }
        let end = start.saturating_add(len);
        if end > self.numel() {
            return Err(Error::limit(
                "to_host_range end",
                end,
                format!("{} elements", self.numel()),
            ));
        }
        let mut out = vec![T::zeroed(); len];
        if len == 0 {
            return Ok(out);
        }
        gpu.context().bind_to_thread()?;
        let src = self.ptr + (start * self.dtype.size()) as u64;
        // SAFETY: `start + len <= numel` was checked, so the source range is inside the
        // allocation; `out` holds `len` elements; the stream is synchronised before return.
        unsafe { drv::memcpy_dtoh_async(&mut out, src, gpu.stream().cu_stream())? };
        gpu.synchronize()?;
        Ok(out)
    }

    /// Sets every byte to `value` (enqueued). `0xFF` poisons floats with NaN.
    pub fn fill_bytes(&mut self, gpu: &Gpu, value: u8) -> Result<()> {
        self.check_device(gpu, "fill_bytes")?;
        if self.bytes() == 0 {
            return Ok(());
        }
        gpu.context().bind_to_thread()?;
        // SAFETY: the range is exactly this tensor's allocation.
        unsafe { drv::memset_d8_async(self.ptr, value, self.bytes(), gpu.stream().cu_stream())? };
        Ok(())
    }

    /// Fills with NaN (float dtypes) / -1 (integers), to catch unwritten outputs.
    pub fn poison(&mut self, gpu: &Gpu) -> Result<()> {
        self.fill_bytes(gpu, 0xFF)
    }

    /// Copies another tensor's contents (same dtype and element count) device-to-device.
    pub fn copy_from(&mut self, gpu: &Gpu, src: &DeviceTensor) -> Result<()> {
        self.check_device(gpu, "copy_from")?;
        src.check_device(gpu, "copy_from source")?;
        if src.dtype != self.dtype || src.numel() != self.numel() {
            return Err(Error::shape(
                "copy_from source",
                src.shape(),
                format!("{:?} {}", self.shape, self.dtype),
            ));
        }
        if self.bytes() == 0 {
            return Ok(());
        }
        gpu.context().bind_to_thread()?;
        // SAFETY: both ranges are whole allocations of equal size.
        unsafe {
            drv::memcpy_dtod_async(self.ptr, src.ptr, self.bytes(), gpu.stream().cu_stream())?
        };
        Ok(())
    }

    pub(crate) fn check_device(&self, gpu: &Gpu, what: &str) -> Result<()> {
        if self.ordinal != gpu.ordinal() {
            return Err(Error::WrongDevice {
                what: what.to_string(),
                got: self.ordinal,
                expected: gpu.ordinal(),
            });
        }
        Ok(())
    }

    fn check_host<T: Element>(&self, gpu: &Gpu, what: &str, len: usize) -> Result<()> {
        self.check_device(gpu, what)?;
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                what: what.to_string(),
                got: T::DTYPE.to_string(),
                expected: self.dtype.to_string(),
            });
        }
        if len != self.numel() {
            return Err(Error::HostLength {
                what: what.to_string(),
                got: len,
                expected: self.numel(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_sizes_and_names() {
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(DType::F16.size(), 2);
        assert_eq!(DType::F32.size(), 4);
        assert_eq!(DType::I32.size(), 4);
        assert_eq!(DType::U32.name(), "u32");
        assert!(DType::BF16.is_half() && DType::F16.is_half() && !DType::F32.is_half());
        assert_eq!(<bf16 as Element>::DTYPE, DType::BF16);
        assert_eq!(<i32 as Element>::DTYPE, DType::I32);
    }

    #[test]
    fn numel_checks_overflow() {
        assert_eq!(numel(&[2, 3, 4]).unwrap(), 24);
        assert_eq!(numel(&[]).unwrap(), 1);
        assert_eq!(numel(&[5, 0]).unwrap(), 0);
        assert!(matches!(numel(&[usize::MAX, 2]), Err(Error::Limit { .. })));
    }
}
