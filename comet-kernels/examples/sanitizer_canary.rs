//! A deliberately broken kernel, to prove that compute-sanitizer instruments the NVRTC-compiled
//! modules this crate loads: run it under `compute-sanitizer --tool memcheck`, which must
//! report invalid global writes (the GPU bundle's run.sh does, and records the count). Without
//! the sanitizer it exits 0 (the stray writes land inside the allocation's padding).

use comet_kernels::buffer::{DType, DeviceTensor};
use comet_kernels::cache::Defines;
use comet_kernels::{Gpu, sources};

const SRC: &str = r#"
extern "C" __global__ void comet_canary_oob(float* p, long long n) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i < 4) p[n + i] = 1.0f;  // out of bounds on purpose
}
"#;

#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    p: u64,
    n: i64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new(0)?;
    let n = 1000usize;
    let t = DeviceTensor::alloc_raw(&gpu, DType::F32, &[n])?;
    let f = gpu.function(
        &sources::external_program("canary.cu", SRC),
        &Defines::new(),
        "comet_canary_oob",
    )?;
    let params = Params {
        p: t.device_ptr(),
        n: n as i64,
    };
    let mut args = [&params as *const Params as *mut std::ffi::c_void];
    // SAFETY: intentionally unsafe: the kernel writes 16 bytes past a 4000-byte cuMemAlloc
    // allocation (inside the driver's allocation granularity), which is what the sanitizer
    // must catch. Parameters match the kernel's signature.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            (1, 1, 1),
            (32, 1, 1),
            0,
            gpu.stream().cu_stream(),
            &mut args,
        )?;
    }
    gpu.synchronize()?;
    println!("canary kernel ran");
    Ok(())
}
