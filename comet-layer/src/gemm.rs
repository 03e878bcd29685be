//! The layer's grouped GEMMs on the chosen engine: the Hopper engine (`comet_kernels::sm90`)
//! where the device is sm_90 and the problem fits it, else the portable `mma.sync` engine
//! (`comet_kernels::gemm` with `Engine::Portable`: this module makes the choice itself, so
//! that [`GemmEngine::MmaSync`] really runs `mma.sync`). With
//! `LayerOptions::sm90_training_stores` (the default) the expert weight gradients run on the
//! Hopper engine's f32 store (accumulating, or overwriting for a backward's first write of
//! a lazily zeroed gradient) and a training forward's GEMM0 on its fused
//! pre-activation store wherever the Hopper engine takes the problem; with the option off
//! the weight gradients run on the `mma.sync` engine (fp32 output, likewise) and the
//! Hopper engine's GEMM0 stores the pre-activation before a separate activation kernel:
//! [`Stores`].
//!
//! Every expert GEMM takes `sms`: `None` runs the engine's full persistent grid; `Some(n)`
//! caps it at `n` SMs' worth of blocks (see `LayerOptions::gemm_sm_reserve`), so kernels on
//! the communication stream find free SMs.

use comet_core::Activation;
use comet_kernels::activation::{self, Activation as Act};
use comet_kernels::cache::Arch;
use comet_kernels::gemm::{self, Engine, Epilogue, GemmArgs, GemmKind, TileShape};
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

/// `g` capped at `sms` SMs (whole clusters within them; see `Sm90Gemm::within_ctas`).
fn cap_sm90(g: Sm90Gemm<'_>, sms: Option<usize>) -> Sm90Gemm<'_> {
    match sms {
        Some(n) => g.within_ctas(n),
        None => g,
    }
}

/// `args` of the portable engine capped at `sms` SMs: `sms` times the blocks per SM of the
/// tile shape it runs (the default shape for `c`, as [`gemm::grouped_gemm`] chooses it).
fn cap_portable<'a>(
    gpu: &Gpu,
    args: GemmArgs<'a>,
    kind: GemmKind,
    epi: Epilogue,
    c_cols: usize,
    sms: Option<usize>,
) -> GemmArgs<'a> {
    match sms {
        Some(n) => {
            let out_cols = if epi == Epilogue::SwiGlu {
                2 * c_cols
            } else {
                c_cols
            };
            let tile = TileShape::choose(kind, epi, out_cols, gpu.smem_optin());
            args.max_blocks(n * tile.min_blocks as usize)
        }
        None => args,
    }
}

fn cols(t: &DeviceTensor) -> usize {
    t.shape().last().copied().unwrap_or(0)
}

/// Which Hopper-engine stores the training GEMMs may use (`LayerOptions::sm90_training_stores`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Stores {
    /// Weight gradients on `mma.sync`; GEMM0 with the pre-activation on the Hopper engine as
    /// a GEMM storing `h` plus a separate activation kernel (the option off).
    Portable,
    /// Weight gradients on the Hopper engine's f32 store (accumulating or overwriting) and GEMM0 with its fused
    /// pre-activation store, wherever the Hopper engine takes the problem (the default).
    #[default]
    Sm90,
}

impl Stores {
    /// The stores of an option value.
    pub(crate) fn new(sm90_training_stores: bool) -> Self {
        if sm90_training_stores {
            Stores::Sm90
        } else {
            Stores::Portable
        }
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
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    gpu: &Gpu,
    choice: GemmEngine,
    a: &DeviceTensor,
    w: &DeviceTensor,
    offsets: &DeviceTensor,
    c: &mut DeviceTensor,
    act: Option<Activation>,
    sms: Option<usize>,
) -> Result<bool> {
    let epi = act.map_or(Epilogue::None, epilogue);
    let c_cols = cols(c);
    let g = cap_sm90(Sm90Gemm::forward(a, w, offsets, c).epilogue(epi), sms);
    if hopper(gpu, choice, &g)? {
        sm90::grouped_gemm(gpu, g)?;
        return Ok(true);
    }
    let args = GemmArgs::forward(a, w, Some(offsets), c)
        .epilogue(epi)
        .engine(Engine::Portable);
    gemm::grouped_gemm(
        gpu,
        cap_portable(gpu, args, GemmKind::Forward, epi, c_cols, sms),
    )?;
    Ok(false)
}

/// GEMM0 of a training forward: the pre-activation `h = a · w[g]ᵀ` is kept and
/// `out = act(h)`. The `mma.sync` engine fuses both stores; the Hopper engine fuses them
/// too with [`Stores::Sm90`], else it stores `h` and a separate kernel applies the
/// activation. Returns whether the Hopper engine ran it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_keep_pre(
    gpu: &Gpu,
    choice: GemmEngine,
    stores: Stores,
    a: &DeviceTensor,
    w: &DeviceTensor,
    offsets: &DeviceTensor,
    h: &mut DeviceTensor,
    out: &mut DeviceTensor,
    act: Activation,
    sms: Option<usize>,
) -> Result<bool> {
    let (epi, out_cols) = (epilogue(act), cols(out));
    if stores == Stores::Sm90 {
        let g = cap_sm90(
            Sm90Gemm::forward(a, w, offsets, out).epilogue(epi).aux(h),
            sms,
        );
        if hopper(gpu, choice, &g)? {
            let _s = tracing::trace_span!("gemm0_fused_pre_activation_sm90").entered();
            sm90::grouped_gemm(gpu, g)?;
            return Ok(true);
        }
    } else {
        let g = cap_sm90(Sm90Gemm::forward(a, w, offsets, h), sms);
        if hopper(gpu, choice, &g)? {
            sm90::grouped_gemm(gpu, g)?;
            activation::activation_forward(gpu, kernel_act(act), h, out, None)?;
            return Ok(true);
        }
    }
    let args = GemmArgs::forward(a, w, Some(offsets), out)
        .epilogue(epi)
        .aux(h)
        .engine(Engine::Portable);
    gemm::grouped_gemm(
        gpu,
        cap_portable(gpu, args, GemmKind::Forward, epi, out_cols, sms),
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
    sms: Option<usize>,
) -> Result<bool> {
    let c_cols = cols(c);
    let g = cap_sm90(Sm90Gemm::dgrad(a, w, offsets, c), sms);
    if hopper(gpu, choice, &g)? {
        sm90::grouped_gemm(gpu, g)?;
        return Ok(true);
    }
    let args = GemmArgs::dgrad(a, w, Some(offsets), c).engine(Engine::Portable);
    gemm::grouped_gemm(
        gpu,
        cap_portable(gpu, args, GemmKind::Dgrad, Epilogue::None, c_cols, sms),
    )?;
    Ok(false)
}

/// `dw[g] += a[rows of g]ᵀ · b[rows of g]` into an fp32 `dw [G, N, K]`, or with
/// `accumulate = false` `dw[g] = …` (every element of `dw` written: experts without rows get
/// zeros on both engines, see `grads.rs`; with `accumulate` they keep their gradient).
/// `offsets = None`: one group, always on the `mma.sync` engine (the Hopper engine needs
/// device offsets). With [`Stores::Sm90`] and grouped rows, the Hopper engine's f32 store
/// (accumulating or not) runs it where `choice` gives it the problem (see [`forward`]);
/// otherwise the `mma.sync` engine. Returns whether the Hopper engine ran it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn wgrad(
    gpu: &Gpu,
    choice: GemmEngine,
    stores: Stores,
    a: &DeviceTensor,
    b: &DeviceTensor,
    offsets: Option<&DeviceTensor>,
    dw: &mut DeviceTensor,
    accumulate: bool,
    sms: Option<usize>,
) -> Result<bool> {
    let c_cols = cols(dw);
    if let (Stores::Sm90, Some(offsets)) = (stores, offsets) {
        let g = cap_sm90(
            Sm90Gemm::wgrad(a, b, offsets, dw).accumulate(accumulate),
            sms,
        );
        if hopper(gpu, choice, &g)? {
            let _s = tracing::trace_span!("wgrad_sm90", accumulate).entered();
            sm90::grouped_gemm(gpu, g)?;
            return Ok(true);
        }
    }
    let args = GemmArgs::wgrad(a, b, offsets, dw)
        .accumulate(accumulate)
        .engine(Engine::Portable);
    gemm::grouped_gemm(
        gpu,
        cap_portable(gpu, args, GemmKind::Wgrad, Epilogue::None, c_cols, sms),
    )?;
    Ok(false)
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

#[cfg(test)]
mod tests {
    //! Every GEMM the layer issues passes the engines' validation for the presets (full size
    //! and the GPU tests' shrunk ones) and the test shapes, at several row counts; the Hopper
    //! engine takes the forward and data-gradient GEMMs of the full presets (what the
    //! benchmark runs). CPU only: plan validation needs no device.
    use comet_core::{MoeConfig, Preset};
    use comet_kernels::buffer::DType;
    use comet_kernels::gemm::{self, Epilogue, GemmDesc, GemmKind, Meta, TileShape};
    use comet_kernels::sm90::{self, Sm90Config, Sm90Desc, Sm90Store};

    const OPTIN: u32 = 232_448;

    struct G {
        name: &'static str,
        kind: GemmKind,
        a: Vec<usize>,
        b: Vec<usize>,
        grouped: bool,
        c: Vec<usize>,
        c_f32: bool,
        epi: Epilogue,
        aux: Option<Vec<usize>>,
    }

    /// The layer's GEMMs for `rows` received rows over `l` local experts and `m` tokens.
    fn layer_gemms(cfg: &MoeConfig, l: usize, rows: usize, m: usize) -> Vec<G> {
        let (h, f, n0, e) = (cfg.hidden(), cfg.ffn(), cfg.n0(), cfg.experts());
        let epi = super::epilogue(cfg.activation());
        let g = |name, kind, a: &[usize], b: &[usize], grouped, c: &[usize], c_f32, epi, aux| G {
            name,
            kind,
            a: a.to_vec(),
            b: b.to_vec(),
            grouped,
            c: c.to_vec(),
            c_f32,
            epi,
            aux,
        };
        use GemmKind::*;
        vec![
            g(
                "router logits",
                Forward,
                &[m, h],
                &[e, h],
                false,
                &[m, e],
                true,
                Epilogue::None,
                None,
            ),
            g(
                "gemm0 fused",
                Forward,
                &[rows, h],
                &[l, n0, h],
                true,
                &[rows, f],
                false,
                epi,
                None,
            ),
            g(
                "gemm0 fused + h",
                Forward,
                &[rows, h],
                &[l, n0, h],
                true,
                &[rows, f],
                false,
                epi,
                Some(vec![rows, n0]),
            ),
            g(
                "gemm0 to h",
                Forward,
                &[rows, h],
                &[l, n0, h],
                true,
                &[rows, n0],
                false,
                Epilogue::None,
                None,
            ),
            g(
                "gemm1",
                Forward,
                &[rows, f],
                &[l, h, f],
                true,
                &[rows, h],
                false,
                Epilogue::None,
                None,
            ),
            g(
                "dgrad1",
                Dgrad,
                &[rows, h],
                &[l, h, f],
                true,
                &[rows, f],
                false,
                Epilogue::None,
                None,
            ),
            g(
                "wgrad1",
                Wgrad,
                &[rows, h],
                &[rows, f],
                true,
                &[l, h, f],
                true,
                Epilogue::None,
                None,
            ),
            g(
                "wgrad0",
                Wgrad,
                &[rows, n0],
                &[rows, h],
                true,
                &[l, n0, h],
                true,
                Epilogue::None,
                None,
            ),
            g(
                "dgrad0",
                Dgrad,
                &[rows, n0],
                &[l, n0, h],
                true,
                &[rows, h],
                false,
                Epilogue::None,
                None,
            ),
            g(
                "router dgrad",
                Dgrad,
                &[m, e],
                &[e, h],
                false,
                &[m, h],
                false,
                Epilogue::None,
                None,
            ),
            g(
                "router wgrad",
                Wgrad,
                &[m, e],
                &[m, h],
                false,
                &[1, e, h],
                true,
                Epilogue::None,
                None,
            ),
        ]
    }

    fn mma_desc(g: &G, l: usize) -> GemmDesc {
        let out_cols = *g.c.last().unwrap_or(&0);
        GemmDesc {
            kind: g.kind,
            a: Meta::new(DType::BF16, &g.a),
            b: Meta::new(DType::BF16, &g.b),
            offsets: g.grouped.then(|| Meta::new(DType::I32, &[l + 1])),
            c: Meta::new(if g.c_f32 { DType::F32 } else { DType::BF16 }, &g.c),
            epilogue: g.epi,
            aux: g.aux.as_ref().map(|s| Meta::new(DType::BF16, s)),
            row_scale: None,
            tile_list_len: None,
            tile: TileShape::choose(g.kind, g.epi, out_cols, OPTIN),
        }
    }

    /// The Hopper engine's description of a grouped GEMM as the layer issues it (weight
    /// gradients: f32, accumulating; GEMM0 with `h`: the fused pre-activation store).
    fn sm90_desc(g: &G, l: usize) -> Sm90Desc {
        sm90_desc_acc(g, l, g.kind == GemmKind::Wgrad)
    }

    /// [`sm90_desc`] with the weight gradient's accumulate flag given (`false`: the first
    /// write of a lazily zeroed gradient).
    fn sm90_desc_acc(g: &G, l: usize, accumulate: bool) -> Sm90Desc {
        let rows = g.a[0];
        Sm90Desc {
            kind: g.kind,
            a: Meta::new(DType::BF16, &g.a),
            b: Meta::new(DType::BF16, &g.b),
            offsets: Meta::new(DType::I32, &[l + 1]),
            c: Meta::new(if g.c_f32 { DType::F32 } else { DType::BF16 }, &g.c),
            accumulate,
            aux: g.aux.as_ref().map(|s| Meta::new(DType::BF16, s)),
            epilogue: g.epi,
            row_scale: None,
            tile_order: None,
            error_flag: None,
            config: Sm90Config::choose_for(
                g.kind,
                g.epi,
                l,
                rows,
                Sm90Store {
                    f32_out: g.c_f32,
                    accumulate,
                    aux: g.aux.is_some(),
                },
            ),
            max_ctas: None,
        }
    }

    fn configs() -> Vec<(String, MoeConfig, usize)> {
        let mut v = Vec::new();
        for p in Preset::all() {
            let c = p.config();
            for w in [1, 2] {
                v.push((format!("{} W={w}", p.name()), c, w));
                let s = MoeConfig::new(c.hidden() / 16, c.ffn() / 16, c.experts(), c.top_k())
                    .unwrap()
                    .with_activation(c.activation());
                v.push((format!("{} /16 W={w}", p.name()), s, w));
            }
        }
        for (h, f, e, k) in [(128, 64, 16, 1), (128, 64, 16, 8), (64, 32, 8, 2)] {
            v.push((
                format!("custom {h} {f} {e} {k}"),
                MoeConfig::new(h, f, e, k).unwrap(),
                2,
            ));
        }
        let gelu = MoeConfig::new(192, 136, 8, 2)
            .unwrap()
            .with_activation(comet_core::Activation::Gelu);
        v.push(("gelu 192 136".into(), gelu, 2));
        v
    }

    #[test]
    fn every_layer_gemm_passes_the_mma_engine_validation() {
        for (name, cfg, w) in configs() {
            let l = cfg.experts() / w;
            for (rows, m) in [(1, 1), (77, 93), (16384, 8192)] {
                for g in layer_gemms(&cfg, l, rows, m) {
                    gemm::plan(&mma_desc(&g, l))
                        .unwrap_or_else(|e| panic!("{name}, rows {rows}: {}: {e}", g.name));
                }
            }
        }
    }

    #[test]
    fn the_hopper_engine_takes_the_full_presets_forward_and_dgrad_gemms() {
        for p in Preset::all() {
            let cfg = p.config();
            let l = cfg.experts() / 2;
            let rows = 2 * 8192 * cfg.top_k().min(l);
            for g in layer_gemms(&cfg, l, rows, 8192) {
                if !g.grouped || g.kind == GemmKind::Wgrad || g.aux.is_some() {
                    continue;
                }
                sm90::plan(&sm90_desc(&g, l), OPTIN as usize)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", p.name(), g.name));
            }
        }
    }

    /// With `sm90_training_stores`, the Hopper engine takes every grouped weight gradient
    /// (f32, accumulating and overwriting: the first write of a lazily zeroed gradient) and
    /// the training GEMM0 with its pre-activation output of the presets
    /// (full size and the GPU tests' shrunk ones) and the GPU tests' shapes, at several row
    /// counts: the `sm90_stores` GPU tests run the Hopper stores, not a fallback.
    #[test]
    fn the_hopper_engine_takes_the_sm90_stores_training_gemms() {
        let mut taken = 0;
        for (name, cfg, w) in configs() {
            let l = cfg.experts() / w;
            for (rows, m) in [(1, 1), (77, 93), (16384, 8192)] {
                for g in layer_gemms(&cfg, l, rows, m) {
                    if !g.grouped || (g.kind != GemmKind::Wgrad && g.aux.is_none()) {
                        continue;
                    }
                    let wgrad = g.kind == GemmKind::Wgrad;
                    let accs: &[bool] = if wgrad { &[true, false] } else { &[false] };
                    for &acc in accs {
                        let d = sm90_desc_acc(&g, l, acc);
                        let p = sm90::plan(&d, OPTIN as usize).unwrap_or_else(|e| {
                            panic!("{name}, rows {rows}: {} acc {acc}: {e}", g.name)
                        });
                        assert_eq!(
                            (p.store.f32_out, p.store.accumulate, p.store.aux),
                            (wgrad, acc, g.aux.is_some()),
                            "{name}: {}",
                            g.name
                        );
                        // The SM cap of a pipelined layer (a single CTA at the extreme).
                        for cap in [d.config.cluster, 116] {
                            let mut capped = d.clone();
                            capped.max_ctas = Some(cap);
                            sm90::plan(&capped, OPTIN as usize).unwrap_or_else(|e| {
                                panic!("{name}: {} acc {acc} cap {cap}: {e}", g.name)
                            });
                        }
                        taken += 1;
                    }
                }
            }
        }
        assert!(taken >= 3 * 3 * 20 * 5 / 3, "{taken}");
    }

    /// The specialisations the layer compiles on an H200 (the full presets on 2 GPUs, both
    /// engines) go through NVRTC for sm_90a. Run with `LD_LIBRARY_PATH=/usr/local/cuda/lib
    /// CUDA_HOME=/usr/local/cuda cargo test -p comet-layer --lib -- --ignored`.
    #[test]
    #[ignore = "needs NVRTC and the CUDA headers"]
    fn the_layers_kernel_specialisations_compile() {
        use comet_kernels::cache::{Arch, KernelCache};
        use std::collections::BTreeSet;
        let cache = KernelCache::new(None);
        let mut seen = BTreeSet::new();
        for p in Preset::all() {
            let cfg = p.config();
            let l = cfg.experts() / 2;
            let rows = 2 * 8192 * cfg.top_k().min(l);
            for g in layer_gemms(&cfg, l, rows, 8192) {
                let plan = gemm::plan(&mma_desc(&g, l)).unwrap();
                let key = format!("mma {:?}", plan.defines);
                if seen.insert(key.clone()) {
                    cache
                        .cubin(&gemm::program(), &plan.defines, Arch::SM90)
                        .unwrap_or_else(|e| panic!("{key}: {e}"));
                }
                if g.grouped {
                    // Weight gradients: accumulating, and overwriting (lazy zero_grad).
                    let accs: &[bool] = match g.kind {
                        GemmKind::Wgrad => &[true, false],
                        _ => &[false],
                    };
                    for &acc in accs {
                        let plan = sm90::plan(&sm90_desc_acc(&g, l, acc), OPTIN as usize).unwrap();
                        let key = format!("sm90 {:?}", plan.defines);
                        if seen.insert(key.clone()) {
                            cache
                                .cubin(&sm90::program(), &plan.defines, Arch::SM90)
                                .unwrap_or_else(|e| panic!("{key}: {e}"));
                        }
                    }
                }
            }
        }
        assert!(seen.len() >= 6, "{seen:?}");
    }

    /// Fills the disk kernel cache (`COMET_CACHE_DIR`) with every specialisation the GPU
    /// tests, `comet-bench run` on the presets and `comet-bench check` compile on an H200, so
    /// a GPU host with the same NVRTC major.minor and include path loads them instead of
    /// compiling (a mismatch only means compiling there). Run after `cargo xtask gpu-bundle`:
    /// `env -u CUDA_HOME -u CUDA_PATH LD_LIBRARY_PATH=/usr/local/cuda/lib
    /// COMET_CACHE_DIR=$PWD/.gpu/cache cargo test --release -p comet-layer --lib --
    /// --ignored warm_the_kernel_cache --nocapture`.
    #[test]
    #[ignore = "needs NVRTC and the CUDA headers; writes COMET_CACHE_DIR"]
    fn warm_the_kernel_cache() {
        use comet_kernels::cache::{Arch, Defines, KernelCache, default_cache_dir};
        use comet_kernels::{layer_ops, sources};
        use std::collections::BTreeSet;
        let dir = default_cache_dir();
        let cache = KernelCache::new(dir.clone());
        let t0 = std::time::Instant::now();
        let mut jobs: Vec<(comet_kernels::cache::Program, Defines)> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut add = |p: comet_kernels::cache::Program, d: Defines| {
            if seen.insert(format!("{} {d:?}", p.name)) {
                jobs.push((p, d));
            }
        };
        let mut cfgs = configs();
        for p in Preset::all() {
            cfgs.push((p.name().to_string(), p.config(), 2));
        }
        for (_, cfg, w) in &cfgs {
            let l = cfg.experts() / w;
            // Rows per expert on both sides of the Hopper engine's L2-hint threshold.
            for (rows, m) in [(64, 64), (2048 * l, 8192), (16384, 8192)] {
                for g in layer_gemms(cfg, l, rows, m) {
                    add(
                        gemm::program(),
                        gemm::plan(&mma_desc(&g, l)).unwrap().defines,
                    );
                    if g.grouped {
                        // Weight gradients: accumulating, and overwriting (lazy zero_grad).
                        for acc in [true, false] {
                            let d = sm90_desc_acc(&g, l, acc && g.kind == GemmKind::Wgrad);
                            if let Ok(p) = sm90::plan(&d, OPTIN as usize) {
                                add(sm90::program(), p.defines);
                            }
                        }
                    }
                }
                // The inference forward's fused GEMM0 on the Hopper engine.
                let mut g = layer_gemms(cfg, l, rows, m).remove(1);
                g.aux = None;
                if let Ok(p) = sm90::plan(&sm90_desc(&g, l), OPTIN as usize) {
                    add(sm90::program(), p.defines);
                }
            }
            let mut d = Defines::new();
            d.insert("ROUTER_EPL".into(), cfg.experts().div_ceil(32).to_string());
            add(sources::program("router.cu", sources::ROUTER_CU), d);
        }
        for (name, src) in [
            ("routing.cu", sources::ROUTING_CU),
            ("rows.cu", sources::ROWS_CU),
            ("activation.cu", sources::ACTIVATION_CU),
            ("init.cu", sources::INIT_CU),
        ] {
            add(sources::program(name, src), Defines::new());
        }
        add(layer_ops::program(), Defines::new());
        for (p, d) in &jobs {
            cache
                .cubin(p, d, Arch::SM90)
                .unwrap_or_else(|e| panic!("{} {d:?}: {e}", p.name));
        }
        eprintln!(
            "{} specialisations in {:.1} s into {dir:?}",
            jobs.len(),
            t0.elapsed().as_secs_f64()
        );
        assert!(jobs.len() >= 20, "{}", jobs.len());
    }
}
