//! The layer's device buffers, allocated once at construction for the worst case of
//! [`Layout`] (no allocation per call). Calls use views of them (`DeviceTensor::rows`), which
//! allocate nothing.

use comet_core::MoeConfig;
use comet_kernels::buffer::DType;
use comet_kernels::routing::RoutingPlan;
use comet_kernels::{DeviceTensor, Gpu};

use crate::error::Result;
use crate::plan::Layout;

/// Token-side buffers (rows = tokens of this rank, capacity `max_tokens`).
#[derive(Debug)]
pub(crate) struct TokenBuffers {
    /// f32 `[max_tokens, E]` router logits.
    pub logits: DeviceTensor,
    /// f32 `[max_tokens, E]` softmax probabilities (the router backward needs them).
    pub probs: DeviceTensor,
    /// i32 `[max_tokens, k]` top-k ids.
    pub ids: DeviceTensor,
    /// f32 `[max_tokens, k]` routing weights.
    pub weights: DeviceTensor,
    /// i32 `[chunks · E + 2]` this rank's header.
    pub header: DeviceTensor,
    /// i32 `[W, chunks · E + 2]` every rank's header.
    pub headers: DeviceTensor,
    /// i32 `[chunks, W, E]` count matrices (what the routing plans read).
    pub count_mats: DeviceTensor,
    /// Training only: `[max_tokens, H]` copy of the forward's `x` (router weight gradient).
    pub x_saved: Option<DeviceTensor>,
    /// Training only: f32 `[max_tokens, k]` gradient of the routing weights.
    pub dweights: Option<DeviceTensor>,
    /// Training only: f32 `[max_tokens, E]` gradient of the logits.
    pub dlogits: Option<DeviceTensor>,
    /// Training only: `[max_tokens, E]` the same in the element type (for the GEMMs).
    pub dlogits_elem: Option<DeviceTensor>,
}

/// One chunk's buffers. Send side: `send_capacity` rows; receive side: `recv_capacity`.
#[derive(Debug)]
pub(crate) struct ChunkBuffers {
    /// The device routing plan of the chunk (allocated for `chunk_capacity` tokens; its
    /// `tokens` field is set per call).
    pub plan: RoutingPlan,
    /// `[send_cap, H]`: rows in the send layout (x or weighted dy out; dx rows back).
    pub send: DeviceTensor,
    /// i32 `[send_cap]`: receive row at the destination of each send row.
    pub send_index: DeviceTensor,
    /// `[send_cap, H]`: expert outputs back in the send layout (kept for the backward).
    pub back: DeviceTensor,
    /// i32 `[recv_cap]`: receive row of each staging row.
    pub recv_index: DeviceTensor,
    /// `[recv_cap, H]`: NCCL landing buffer, by source rank.
    pub stage: DeviceTensor,
    /// `[recv_cap, H]`: token rows in the receive layout (GEMM0 input; dW0 needs it).
    pub recv: DeviceTensor,
    /// Training only: `[recv_cap, n0]` pre-activation.
    pub h: Option<DeviceTensor>,
    /// `[recv_cap, F]`: activation (GEMM1 input; dW1 needs it).
    pub a: DeviceTensor,
    /// `[recv_cap, H]`: GEMM1 output; in the backward the output gradient, then `dx` rows.
    pub o: DeviceTensor,
    /// Training only: `[recv_cap, n0]` pre-activation gradient.
    pub dh: Option<DeviceTensor>,
    /// Training only: `[recv_cap, F]` activation gradient.
    pub da: Option<DeviceTensor>,
}

fn raw(gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
    Ok(DeviceTensor::alloc_raw(gpu, dtype, shape)?)
}

fn opt(on: bool, gpu: &Gpu, dtype: DType, shape: &[usize]) -> Result<Option<DeviceTensor>> {
    if on {
        Ok(Some(raw(gpu, dtype, shape)?))
    } else {
        Ok(None)
    }
}

impl TokenBuffers {
    pub(crate) fn new(
        gpu: &Gpu,
        cfg: &MoeConfig,
        elem: DType,
        lay: &Layout,
        training: bool,
    ) -> Result<Self> {
        let (m, e, k, h) = (lay.max_tokens, cfg.experts(), cfg.top_k(), cfg.hidden());
        Ok(TokenBuffers {
            logits: raw(gpu, DType::F32, &[m, e])?,
            probs: raw(gpu, DType::F32, &[m, e])?,
            ids: raw(gpu, DType::I32, &[m, k])?,
            weights: raw(gpu, DType::F32, &[m, k])?,
            header: raw(gpu, DType::I32, &[lay.header_len()])?,
            headers: raw(gpu, DType::I32, &[lay.world, lay.header_len()])?,
            count_mats: raw(gpu, DType::I32, &[lay.chunks, lay.world, e])?,
            x_saved: opt(training, gpu, elem, &[m, h])?,
            dweights: opt(training, gpu, DType::F32, &[m, k])?,
            dlogits: opt(training, gpu, DType::F32, &[m, e])?,
            dlogits_elem: opt(training, gpu, elem, &[m, e])?,
        })
    }

    pub(crate) fn all_mut(&mut self) -> Vec<&mut DeviceTensor> {
        let mut v = vec![
            &mut self.logits,
            &mut self.probs,
            &mut self.ids,
            &mut self.weights,
            &mut self.header,
            &mut self.headers,
            &mut self.count_mats,
        ];
        for t in [
            &mut self.x_saved,
            &mut self.dweights,
            &mut self.dlogits,
            &mut self.dlogits_elem,
        ]
        .into_iter()
        .flatten()
        {
            v.push(t);
        }
        v
    }
}

impl ChunkBuffers {
    pub(crate) fn new(
        gpu: &Gpu,
        cfg: &MoeConfig,
        elem: DType,
        lay: &Layout,
        training: bool,
    ) -> Result<Self> {
        let (h, f, n0) = (cfg.hidden(), cfg.ffn(), cfg.n0());
        let (sc, rc) = (lay.send_capacity(), lay.recv_capacity());
        Ok(ChunkBuffers {
            plan: RoutingPlan::new(
                gpu,
                lay.chunk_capacity(),
                lay.top_k,
                lay.experts,
                lay.world,
                lay.rank,
            )?,
            send: raw(gpu, elem, &[sc, h])?,
            send_index: raw(gpu, DType::I32, &[sc])?,
            back: raw(gpu, elem, &[sc, h])?,
            recv_index: raw(gpu, DType::I32, &[rc])?,
            stage: raw(gpu, elem, &[rc, h])?,
            recv: raw(gpu, elem, &[rc, h])?,
            h: opt(training, gpu, elem, &[rc, n0])?,
            a: raw(gpu, elem, &[rc, f])?,
            o: raw(gpu, elem, &[rc, h])?,
            dh: opt(training, gpu, elem, &[rc, n0])?,
            da: opt(training, gpu, elem, &[rc, f])?,
        })
    }

    pub(crate) fn all_mut(&mut self) -> Vec<&mut DeviceTensor> {
        let mut v: Vec<&mut DeviceTensor> = self.plan.layout_mut().into();
        v.extend([
            &mut self.send,
            &mut self.send_index,
            &mut self.back,
            &mut self.recv_index,
            &mut self.stage,
            &mut self.recv,
            &mut self.a,
            &mut self.o,
        ]);
        for t in [&mut self.h, &mut self.dh, &mut self.da]
            .into_iter()
            .flatten()
        {
            v.push(t);
        }
        v
    }
}

/// Bytes of device memory the buffers of `lay` take (for error messages and reports).
pub(crate) fn workspace_bytes(cfg: &MoeConfig, elem: DType, lay: &Layout, training: bool) -> u64 {
    let (m, e, k, h, f, n0) = (
        lay.max_tokens as u64,
        cfg.experts() as u64,
        cfg.top_k() as u64,
        cfg.hidden() as u64,
        cfg.ffn() as u64,
        cfg.n0() as u64,
    );
    let es = elem.size() as u64;
    let t = u64::from(training);
    let tokens = m * e * 8 + m * k * 8 + t * (m * h * es + m * k * 4 + m * e * (4 + es));
    let (sc, rc) = (lay.send_capacity() as u64, lay.recv_capacity() as u64);
    let chunk = sc * (2 * h * es + 4)
        + rc * (4 + 3 * h * es + f * es)
        + t * rc * (2 * n0 * es + f * es)
        + (lay.chunk_capacity() as u64) * k * 12;
    tokens + lay.chunks as u64 * chunk
}
