//! [`MoeForward`]: the single-GPU MoE layer forward (all experts local), composed from the
//! kernels of this crate, with the weights uploaded once.
//!
//! `x [M, H]` → router logits (GEMM engine, fp32) → softmax top-k → routing plan (device) →
//! permute into expert-sorted rows → GEMM0 with the activation fused in its epilogue →
//! GEMM1 → top-k weighted combine (slot order) → `y [M, H]`. No host synchronisation.

use comet_core::{Activation, MoeConfig};
use half::{bf16, f16};

use crate::buffer::{DType, DeviceTensor, Element};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::gemm::{self, Epilogue, GemmArgs, TileShape};
use crate::router;
use crate::routing::RoutingPlan;
use crate::rows;

/// Device buffers for one token count.
#[derive(Debug)]
struct Workspace {
    tokens: usize,
    logits: DeviceTensor,
    probs: DeviceTensor,
    ids: DeviceTensor,
    weights: DeviceTensor,
    plan: RoutingPlan,
    x_rows: DeviceTensor,
    h: Option<DeviceTensor>,
    a: DeviceTensor,
    o: DeviceTensor,
}

/// Single-GPU MoE forward with device-resident weights.
#[derive(Debug)]
pub struct MoeForward {
    cfg: MoeConfig,
    elem: DType,
    wr: DeviceTensor,
    w0: DeviceTensor,
    w1: DeviceTensor,
    keep_h: bool,
    tile: Option<TileShape>,
    ws: Option<Workspace>,
}

fn upload_as<T: Element>(
    gpu: &Gpu,
    shape: &[usize],
    v: &[f32],
    conv: impl Fn(f32) -> T,
) -> Result<DeviceTensor> {
    let data: Vec<T> = v.iter().map(|&x| conv(x)).collect();
    DeviceTensor::from_host(gpu, shape, &data)
}

/// Uploads f32 host data as `dtype` (bf16/f16 are rounded to nearest even).
pub fn upload_f32(gpu: &Gpu, dtype: DType, shape: &[usize], v: &[f32]) -> Result<DeviceTensor> {
    match dtype {
        DType::BF16 => upload_as(gpu, shape, v, bf16::from_f32),
        DType::F16 => upload_as(gpu, shape, v, f16::from_f32),
        DType::F32 => DeviceTensor::from_host(gpu, shape, v),
        other => Err(Error::DType {
            what: "upload_f32".into(),
            got: other.to_string(),
            expected: "bf16, f16 or f32".into(),
        }),
    }
}

/// Downloads a bf16/f16/f32 tensor as f32.
pub fn download_f32(gpu: &Gpu, t: &DeviceTensor) -> Result<Vec<f32>> {
    Ok(match t.dtype() {
        DType::BF16 => t.to_host::<bf16>(gpu)?.into_iter().map(f32::from).collect(),
        DType::F16 => t.to_host::<f16>(gpu)?.into_iter().map(f32::from).collect(),
        DType::F32 => t.to_host::<f32>(gpu)?,
        other => {
            return Err(Error::DType {
                what: "download_f32".into(),
                got: other.to_string(),
                expected: "bf16, f16 or f32".into(),
            });
        }
    })
}

/// The element type and `[hidden, ffn, experts, n0]` of `cfg`, checked against what the
/// forward's kernels support (bf16/f16, the router's limits, 16-byte rows).
fn check_config(cfg: &MoeConfig) -> Result<(DType, [usize; 4])> {
    let elem = DType::from(cfg.dtype());
    if !elem.is_half() {
        return Err(Error::DType {
            what: "MoeForward element type".into(),
            got: elem.to_string(),
            expected: "bf16 or f16".into(),
        });
    }
    let (h, f, e, n0) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.n0());
    router::check_router(e, cfg.top_k())?;
    for (what, v) in [("hidden", h), ("ffn", f)] {
        if v % 8 != 0 {
            return Err(Error::Alignment {
                what: what.into(),
                value: v,
                multiple: 8,
                why: "16-byte rows in the GEMMs and row kernels",
            });
        }
    }
    Ok((elem, [h, f, e, n0]))
}

impl MoeForward {
    /// Uploads the weights (row-major f32 host data, rounded to `cfg.dtype()`):
    /// `wr [E, H]`, `w0 [E, n0, H]`, `w1 [E, H, F]`.
    pub fn new(gpu: &Gpu, cfg: &MoeConfig, wr: &[f32], w0: &[f32], w1: &[f32]) -> Result<Self> {
        let (elem, [h, f, e, n0]) = check_config(cfg)?;
        let check = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::HostLength {
                    what: what.to_string(),
                    got,
                    expected: want,
                })
            }
        };
        check("wr [E, H]", wr.len(), e * h)?;
        check("w0 [E, n0, H]", w0.len(), e * n0 * h)?;
        check("w1 [E, H, F]", w1.len(), e * h * f)?;
        Self::from_device(
            cfg,
            upload_f32(gpu, elem, &[e, h], wr)?,
            upload_f32(gpu, elem, &[e, n0, h], w0)?,
            upload_f32(gpu, elem, &[e, h, f], w1)?,
        )
    }

    /// Takes weights already on the device: `wr [E, H]`, `w0 [E, n0, H]`, `w1 [E, H, F]` of
    /// `cfg.dtype()`.
    pub fn from_device(
        cfg: &MoeConfig,
        wr: DeviceTensor,
        w0: DeviceTensor,
        w1: DeviceTensor,
    ) -> Result<Self> {
        let (elem, [h, f, e, n0]) = check_config(cfg)?;
        for (what, t, shape) in [
            ("wr", &wr, vec![e, h]),
            ("w0", &w0, vec![e, n0, h]),
            ("w1", &w1, vec![e, h, f]),
        ] {
            if t.dtype() != elem || t.shape() != shape.as_slice() {
                return Err(Error::shape(what, t.shape(), format!("{elem} {shape:?}")));
            }
        }
        Ok(MoeForward {
            cfg: *cfg,
            elem,
            wr,
            w0,
            w1,
            keep_h: false,
            tile: None,
            ws: None,
        })
    }

    /// The device weights `(wr, w0, w1)`.
    pub fn weights(&self) -> (&DeviceTensor, &DeviceTensor, &DeviceTensor) {
        (&self.wr, &self.w0, &self.w1)
    }

    /// Also keep the pre-activation `h` (as the backward needs it).
    pub fn keep_preactivation(mut self, on: bool) -> Self {
        self.keep_h = on;
        self.ws = None;
        self
    }

    /// Forces a GEMM tile shape (default: [`TileShape::choose`]).
    pub fn with_tile(mut self, tile: TileShape) -> Self {
        self.tile = Some(tile);
        self
    }

    /// The layer config.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    fn workspace(&mut self, gpu: &Gpu, m: usize) -> Result<&mut Workspace> {
        if self.ws.as_ref().map(|w| w.tokens) != Some(m) {
            self.ws = None;
            let (h, f, e, k, n0) = (
                self.cfg.hidden(),
                self.cfg.ffn(),
                self.cfg.experts(),
                self.cfg.top_k(),
                self.cfg.n0(),
            );
            self.cfg.check_rows(m * k)?;
            let rows = m * k;
            let f32t = |s: &[usize]| DeviceTensor::alloc(gpu, DType::F32, s);
            self.ws = Some(Workspace {
                tokens: m,
                logits: f32t(&[m, e])?,
                probs: f32t(&[m, e])?,
                ids: DeviceTensor::alloc(gpu, DType::I32, &[m, k])?,
                weights: f32t(&[m, k])?,
                plan: RoutingPlan::new(gpu, m, k, e, 1, 0)?,
                x_rows: DeviceTensor::alloc(gpu, self.elem, &[rows, h])?,
                h: if self.keep_h {
                    Some(DeviceTensor::alloc(gpu, self.elem, &[rows, n0])?)
                } else {
                    None
                },
                a: DeviceTensor::alloc(gpu, self.elem, &[rows, f])?,
                o: DeviceTensor::alloc(gpu, self.elem, &[rows, h])?,
            });
        }
        self.ws
            .as_mut()
            .ok_or_else(|| Error::Invalid("workspace missing".into()))
    }

    fn check_x(&self, x: &DeviceTensor) -> Result<usize> {
        match x.shape() {
            [m, h] if *h == self.cfg.hidden() && x.dtype() == self.elem && *m > 0 => Ok(*m),
            s => Err(Error::shape(
                "x",
                s,
                format!("{} [tokens > 0, {}]", self.elem, self.cfg.hidden()),
            )),
        }
    }

    /// `y = MoE(x)` for `x [M, H]`; routing by this layer's router.
    pub fn forward(&mut self, gpu: &Gpu, x: &DeviceTensor) -> Result<DeviceTensor> {
        let m = self.check_x(x)?;
        let mut y = DeviceTensor::alloc(gpu, self.elem, &[m, self.cfg.hidden()])?;
        self.forward_into(gpu, x, &mut y)?;
        Ok(y)
    }

    /// [`MoeForward::forward`] into a given `y [M, H]`.
    pub fn forward_into(
        &mut self,
        gpu: &Gpu,
        x: &DeviceTensor,
        y: &mut DeviceTensor,
    ) -> Result<()> {
        let m = self.check_x(x)?;
        self.check_y(y, m)?;
        let (k, renorm) = (self.cfg.top_k(), self.cfg.renormalize());
        let _span = tracing::info_span!("moe_forward", tokens = m).entered();
        self.workspace(gpu, m)?;
        let wr = &self.wr;
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Invalid("workspace missing".into()))?;
        {
            let _s = tracing::debug_span!("router").entered();
            router::router_logits(gpu, x, wr, &mut ws.logits)?;
            router::softmax_topk(
                gpu,
                &ws.logits,
                k,
                renorm,
                Some(&mut ws.probs),
                &mut ws.ids,
                &mut ws.weights,
            )?;
        }
        self.experts(gpu, x, y)
    }

    /// `y` with a given routing: `ids [M, k]` (i32, distinct per token, `< E`) and
    /// `weights [M, k]` (f32) on the device (e.g. to compare against a reference that routes
    /// identically). The router is not run.
    pub fn forward_routed(
        &mut self,
        gpu: &Gpu,
        x: &DeviceTensor,
        ids: &DeviceTensor,
        weights: &DeviceTensor,
    ) -> Result<DeviceTensor> {
        let m = self.check_x(x)?;
        let mut y = DeviceTensor::alloc(gpu, self.elem, &[m, self.cfg.hidden()])?;
        self.forward_routed_into(gpu, x, ids, weights, &mut y)?;
        Ok(y)
    }

    /// [`MoeForward::forward_routed`] into a given `y [M, H]`.
    pub fn forward_routed_into(
        &mut self,
        gpu: &Gpu,
        x: &DeviceTensor,
        ids: &DeviceTensor,
        weights: &DeviceTensor,
        y: &mut DeviceTensor,
    ) -> Result<()> {
        let m = self.check_x(x)?;
        self.check_y(y, m)?;
        let k = self.cfg.top_k();
        if ids.dtype() != DType::I32 || ids.shape() != [m, k] {
            return Err(Error::shape("ids", ids.shape(), format!("i32 [{m}, {k}]")));
        }
        if weights.dtype() != DType::F32 || weights.shape() != [m, k] {
            return Err(Error::shape(
                "weights",
                weights.shape(),
                format!("f32 [{m}, {k}]"),
            ));
        }
        let _span = tracing::info_span!("moe_forward_routed", tokens = m).entered();
        let ws = self.workspace(gpu, m)?;
        ws.ids.copy_from(gpu, ids)?;
        ws.weights.copy_from(gpu, weights)?;
        self.experts(gpu, x, y)
    }

    fn check_y(&self, y: &DeviceTensor, m: usize) -> Result<()> {
        if y.dtype() != self.elem || y.shape() != [m, self.cfg.hidden()] {
            return Err(Error::shape(
                "y",
                y.shape(),
                format!("{} [{m}, {}]", self.elem, self.cfg.hidden()),
            ));
        }
        Ok(())
    }

    /// Allocates the workspace for `tokens` and fills it with NaN / -1 (tests use this to show
    /// that every intermediate a forward reads was written by it).
    pub fn poison_workspace(&mut self, gpu: &Gpu, tokens: usize) -> Result<()> {
        let ws = self.workspace(gpu, tokens)?;
        for t in [
            &mut ws.logits,
            &mut ws.probs,
            &mut ws.ids,
            &mut ws.weights,
            &mut ws.x_rows,
            &mut ws.a,
            &mut ws.o,
        ] {
            t.poison(gpu)?;
        }
        if let Some(h) = ws.h.as_mut() {
            h.poison(gpu)?;
        }
        let p = &mut ws.plan;
        p.counts.poison(gpu)?;
        for t in p.layout_mut() {
            t.poison(gpu)?;
        }
        p.status.poison(gpu)?;
        Ok(())
    }

    fn experts(&mut self, gpu: &Gpu, x: &DeviceTensor, y: &mut DeviceTensor) -> Result<()> {
        let act = self.cfg.activation();
        let tile = self.tile;
        let (w0, w1) = (&self.w0, &self.w1);
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Invalid("workspace missing".into()))?;
        {
            let _s = tracing::debug_span!("routing_plan").entered();
            ws.plan.build_local(gpu, &ws.ids)?;
        }
        {
            let _s = tracing::debug_span!("dispatch").entered();
            rows::permute_rows(gpu, x, &ws.plan.scatter_row, None, &mut ws.x_rows)?;
        }
        {
            let _s = tracing::debug_span!("experts").entered();
            let epi = match act {
                Activation::SwiGlu => Epilogue::SwiGlu,
                Activation::Gelu => Epilogue::Gelu,
            };
            let offsets = &ws.plan.expert_offsets;
            let mut g0 = GemmArgs::forward(&ws.x_rows, w0, Some(offsets), &mut ws.a).epilogue(epi);
            if let Some(h) = ws.h.as_mut() {
                g0 = g0.aux(h);
            }
            if let Some(t) = tile {
                g0 = g0.tile(t);
            }
            gemm::grouped_gemm(gpu, g0)?;
            let mut g1 = GemmArgs::forward(&ws.a, w1, Some(offsets), &mut ws.o);
            if let Some(t) = tile {
                g1 = g1.tile(t);
            }
            gemm::grouped_gemm(gpu, g1)?;
        }
        {
            let _s = tracing::debug_span!("combine").entered();
            rows::combine_rows(gpu, &ws.o, &ws.plan.scatter_row, Some(&ws.weights), y)?;
        }
        Ok(())
    }

    /// The last call's routing on the host: `(ids [M·k], weights [M·k], probs [M·E])`
    /// (probs only after [`MoeForward::forward`]).
    pub fn routing_to_host(&self, gpu: &Gpu) -> Result<(Vec<i32>, Vec<f32>, Vec<f32>)> {
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Invalid("no forward has run yet".into()))?;
        Ok((
            ws.ids.to_host(gpu)?,
            ws.weights.to_host(gpu)?,
            ws.probs.to_host(gpu)?,
        ))
    }

    /// The last call's fp32 router logits `[M·E]` on the host.
    pub fn logits_to_host(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Invalid("no forward has run yet".into()))?;
        ws.logits.to_host(gpu)
    }

    /// The routing plan's device status words (0, 0 when the ids were valid).
    pub fn plan_status(&self, gpu: &Gpu) -> Result<Vec<i32>> {
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Invalid("no forward has run yet".into()))?;
        ws.plan.status.to_host(gpu)
    }

    /// The last call's pre-activation `h [M·k, n0]` in receive (expert-sorted) order, when kept.
    pub fn preactivation(&self) -> Option<&DeviceTensor> {
        self.ws.as_ref().and_then(|w| w.h.as_ref())
    }

    /// The last call's routing plan.
    pub fn plan(&self) -> Option<&RoutingPlan> {
        self.ws.as_ref().map(|w| &w.plan)
    }
}
