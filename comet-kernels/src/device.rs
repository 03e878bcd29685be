//! [`Gpu`]: a CUDA context, the stream kernels are launched on, and the kernel cache.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream, result as drv};

use crate::cache::{self, Arch, Defines, KernelCache, Program};
use crate::error::{Error, Result};

/// A device handle: context, launch stream, architecture facts and the kernel cache.
///
/// Cloning is cheap. [`Gpu::with_stream`] gives the same device with another stream; every
/// operation of this crate is enqueued on the handle's stream, in order, without host
/// synchronisation (unless it returns host data).
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    sm_count: u32,
    smem_optin: u32,
    cache: Arc<KernelCache>,
}

impl Gpu {
    /// Opens device `ordinal` (primary context) with a new non-blocking stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        cache::ensure_driver()?;
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Self::from_stream(stream)
    }

    /// Wraps an existing stream (its context is the device).
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let arch = Arch::of(&ctx)?;
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as u32;
        Ok(Gpu {
            ctx,
            stream,
            arch,
            sm_count,
            smem_optin,
            cache: KernelCache::global(),
        })
    }

    /// The same device and cache, launching on `stream` (which must belong to this context).
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Invalid(
                "with_stream: the stream belongs to another context".to_string(),
            ));
        }
        Ok(Gpu {
            stream,
            ..self.clone()
        })
    }

    /// Uses `cache` instead of the process-wide kernel cache.
    pub fn with_cache(mut self, cache: Arc<KernelCache>) -> Self {
        self.cache = cache;
        self
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream operations are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    /// Compute capability.
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// Largest dynamic shared memory a block may opt in to, in bytes.
    pub fn smem_optin(&self) -> u32 {
        self.smem_optin
    }
    /// The kernel cache.
    pub fn cache(&self) -> &Arc<KernelCache> {
        &self.cache
    }
    /// Device name.
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// Blocks until all work enqueued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// A timing event (timing enabled).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        Ok(self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// Kernel `name` of `program` specialised by `defines`, compiled for this device.
    pub fn function(
        &self,
        program: &Program,
        defines: &Defines,
        name: &str,
    ) -> Result<CudaFunction> {
        self.cache.function(&self.ctx, program, defines, name)
    }

    /// Launches `f` with one parameter block `params` (a `#[repr(C)]` mirror of the kernel's
    /// parameter struct) on this handle's stream.
    ///
    /// # Safety
    /// `P` must have exactly the layout of the kernel's single parameter, and every device
    /// pointer inside it must be valid for the accesses the kernel makes with the sizes given
    /// (the typed launchers of this crate check this before calling).
    pub(crate) unsafe fn launch<P: Copy>(
        &self,
        f: &CudaFunction,
        grid: u32,
        block: u32,
        smem: u32,
        params: &P,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        if smem > self.smem_optin {
            return Err(Error::limit(
                "dynamic shared memory bytes",
                smem as usize,
                format!("{} on this device", self.smem_optin),
            ));
        }
        self.ctx.bind_to_thread()?;
        if smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        let mut args: [*mut c_void; 1] = [params as *const P as *mut c_void];
        // SAFETY: the caller guarantees the parameter layout and pointer validity; `args`
        // outlives the call (the driver copies parameters at launch).
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                (grid, 1, 1),
                (block, 1, 1),
                smem,
                self.stream.cu_stream(),
                &mut args,
            )?;
        }
        Ok(())
    }
}
