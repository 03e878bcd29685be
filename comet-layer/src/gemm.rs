//! The layer's grouped GEMMs on the chosen engine: the Hopper engine (`comet_kernels::sm90`)
//! where the device is sm_90 and the problem fits it, else the portable `mma.sync` engine
//! (`comet_kernels::gemm`). Weight gradients always run on the `mma.sync` engine, which
//! accumulates into fp32 (the Hopper engine stores the input dtype and does not accumulate).

use comet_core::Activation;
use comet_kernels::activation::{self, Activation as Act};
use comet_kernels::cache::Arch;
use comet_kernels::gemm::{self, Epilogue, GemmArgs};
use comet_kernels::sm90::{self, Sm90Gemm};
use comet_kernels::{DeviceTensor, Gpu};

use crate::error::{Error, Result};
use crate::options::GemmEngine;

/// The fused epilogue of an activation.
pub(crate) fn epilogue(act: Activation) -> Epilogue {
    match act {
        Activation::SwiGlu => Epilogue::SwiGlu,
        Activation::Gelu => Epilogue::Gelu,
    }
}

fn kernel_act(act: Activation) -> Act {
    match act {
        Activation::SwiGlu => Act::SwiGlu,
        Activation::Gelu => Act::Gelu,
    }
}

/// Whether the Hopper engine runs a GEMM described by `g` under `choice`.
fn hopper(gpu: &Gpu, choice: GemmEngine, g: &Sm90Gemm<'_>) -> Result<bool> {
    let smem = gpu.smem_optin() as usize;
    match choice {
        GemmEngine::MmaSync => Ok(false),
        GemmEngine::Auto => Ok(gpu.arch() == Arch::SM90 && sm90::supports(&g.desc(), smem)),
        GemmEngine::Sm90 => {
            if gpu.arch() != Arch::SM90 {
                return Err(Error::Unsupported {
                    what: "GEMM engine sm90 on compute capability",
                    value: format!("{}.{}", gpu.arch().major, gpu.arch().minor),
                    supported: "9.0 only (use auto or mma)",
                });
            }
            // The plan's error says why the engine cannot take this problem.
            sm90::plan(&g.desc(), smem)?;
            Ok(true)
        }
    }
}

/// `c[rows, N'] = a[rows, K] · w[g]ᵀ` per expert, with the activation fused when `act` is
/// given (`N' = N/2` for SwiGLU). Returns whether the Hopper engine ran it.
pub(crate) fn forward(
    gpu: &Gpu,
    choice: GemmEngine,
    a: &DeviceTensor,
    w: &DeviceTensor,
    offsets: &DeviceTensor,
    c: &mut DeviceTensor,
    act: Option<Activation>,
) -> Result<bool> {
    let epi = act.map_or(Epilogue::None, epilogue);
    let g = Sm90Gemm::forward(a, w, offsets, c).epilogue(epi);
    if hopper(gpu, choice, &g)? {
        sm90::grouped_gemm(gpu, g)?;
        return Ok(true);
    }
    gemm::grouped_gemm(gpu, GemmArgs::forward(a, w, Some(offsets), c).epilogue(epi))?;
    Ok(false)
}

/// GEMM0 of a training forward: the pre-activation `h = a · w[g]ᵀ` is kept and
/// `out = act(h)`. The `mma.sync` engine fuses both stores; the Hopper engine (no
/// pre-activation output) stores `h` and a separate kernel applies the activation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_keep_pre(
    gpu: &Gpu,
    choice: GemmEngine,
    a: &DeviceTensor,
    w: &DeviceTensor,
    offsets: &DeviceTensor,
    h: &mut DeviceTensor,
    out: &mut DeviceTensor,
    act: Activation,
) -> Result<bool> {
    let g = Sm90Gemm::forward(a, w, offsets, h);
    if hopper(gpu, choice, &g)? {
        sm90::grouped_gemm(gpu, g)?;
        activation::activation_forward(gpu, kernel_act(act), h, out, None)?;
        return Ok(true);
    }
    gemm::grouped_gemm(
        gpu,
        GemmArgs::forward(a, w, Some(offsets), out)
            .epilogue(epilogue(act))
            .aux(h),
    )?;
    Ok(false)
}

/// `c[rows, K] = a[rows, N] · w[g]` per expert (a data gradient).
pub(crate) fn dgrad(
    gpu: &Gpu,
    choice: GemmEngine,
    a: &DeviceTensor,
    w: &DeviceTensor,
    offsets: &DeviceTensor,
    c: &mut DeviceTensor,
) -> Result<bool> {
    let g = Sm90Gemm::dgrad(a, w, offsets, c);
    if hopper(gpu, choice, &g)? {
        sm90::grouped_gemm(gpu, g)?;
        return Ok(true);
    }
    gemm::grouped_gemm(gpu, GemmArgs::dgrad(a, w, Some(offsets), c))?;
    Ok(false)
}

/// `dw[g] += a[rows of g]ᵀ · b[rows of g]` into an fp32 `dw [G, N, K]` (`mma.sync` engine;
/// experts without rows leave their gradient unchanged). `offsets = None`: one group.
pub(crate) fn wgrad_accumulate(
    gpu: &Gpu,
    a: &DeviceTensor,
    b: &DeviceTensor,
    offsets: Option<&DeviceTensor>,
    dw: &mut DeviceTensor,
) -> Result<()> {
    gemm::grouped_gemm(gpu, GemmArgs::wgrad(a, b, offsets, dw).accumulate(true))?;
    Ok(())
}

/// The activation backward `dh = act'(h) · da` over all rows of `h`.
pub(crate) fn activation_backward(
    gpu: &Gpu,
    act: Activation,
    h: &DeviceTensor,
    da: &DeviceTensor,
    dh: &mut DeviceTensor,
) -> Result<()> {
    activation::activation_backward(gpu, kernel_act(act), h, da, dh, None)?;
    Ok(())
}
