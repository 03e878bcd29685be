//! The forward pass: routing and the counts exchange, then per chunk dispatch, experts and
//! combine (see `plan.rs` for the layouts).

use std::borrow::Borrow;

use cudarc::nccl::sys::ncclDataType_t;

use comet_comm::Communicator;
use comet_kernels::{DeviceTensor, layer_ops, router, rows};

use crate::error::{Error, Result};
use crate::gemm;
use crate::layer::MoeLayer;
use crate::plan::{self, CallPlan, ChunkExchange, Reject};

/// Which tensors a dispatch moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Forward,
    Backward,
}

fn bytes(v: &[usize], unit: usize) -> Vec<usize> {
    v.iter().map(|&n| n * unit).collect()
}

/// NCCL all-to-all-v of rows: this rank's blocks `send_rows`/`send_offsets` (in rows of
/// `row_bytes`) to each rank, the peers' blocks into `recv_rows`/`recv_offsets`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn all_to_all_rows(
    comm: &Communicator,
    stream: &cudarc::driver::CudaStream,
    send: &DeviceTensor,
    send_rows: &[usize],
    send_offsets: &[usize],
    recv: &DeviceTensor,
    recv_rows: &[usize],
    recv_offsets: &[usize],
    row_bytes: usize,
) -> Result<()> {
    let fits = |t: &DeviceTensor, rows: &[usize], offs: &[usize], what: &'static str| {
        let end = rows
            .iter()
            .zip(offs)
            .map(|(n, o)| (n + o) * row_bytes)
            .max()
            .unwrap_or(0);
        if end > t.bytes() {
            return Err(Error::Counts {
                what: format!("{what} bytes of an all-to-all-v"),
                value: end,
                limit: t.bytes(),
            });
        }
        Ok(())
    };
    fits(send, send_rows, send_offsets, "send")?;
    fits(recv, recv_rows, recv_offsets, "receive")?;
    // SAFETY: every block lies inside `send` / `recv` (checked above), device memory of this
    // rank that the layer keeps alive for its lifetime (the NCCL operation is stream-ordered
    // before any later reuse); the counts agree with the peers' because every rank derives
    // them from the same all-gathered headers.
    unsafe {
        comm.all_to_all_v_raw(
            send.device_ptr(),
            &bytes(send_rows, row_bytes),
            &bytes(send_offsets, row_bytes),
            recv.device_ptr(),
            &bytes(recv_rows, row_bytes),
            &bytes(recv_offsets, row_bytes),
            stream,
        )?;
    }
    Ok(())
}

impl<C: Borrow<Communicator>> MoeLayer<C> {
    /// `y = MoE(x)` for this rank's tokens `x [M, H]` (`1 ≤ M ≤ max_tokens`, `M ≥ chunks`),
    /// allocating `y`. See [`MoeLayer::forward_into`].
    pub fn forward(&mut self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let m = match x.shape() {
            [m, _] => *m,
            _ => 0,
        };
        let mut y = DeviceTensor::alloc(&self.gpu, self.elem, &[m, self.cfg.hidden()])?;
        self.forward_into(x, &mut y)?;
        Ok(y)
    }

    /// `y = MoE(x)` into `y [M, H]`. A collective: every rank calls it (token counts may
    /// differ between ranks). Keeps what [`MoeLayer::backward`] needs when training.
    ///
    /// # Errors
    /// [`Error::Input`] for `x`/`y` of the wrong dtype, shape or device;
    /// [`Error::ZeroTokens`], [`Error::TooManyTokens`], [`Error::TooManyChunks`]; when another
    /// rank's input was rejected, [`Error::PeerRejected`] naming it (every rank fails the
    /// call, none is left waiting); communication errors and timeouts.
    pub fn forward_into(&mut self, x: &DeviceTensor, y: &mut DeviceTensor) -> Result<()> {
        let _span = tracing::info_span!(
            "moe_forward",
            rank = self.lay.rank,
            strategy = %self.opts.strategy
        )
        .entered();
        self.state = None;
        self.hopper_used = false;
        self.hopper_stores_used = false;
        let local = self.check_forward_inputs(x, y);
        let plan = self.route(x, local)?;
        if let Some(saved) = self.tok.x_saved.as_ref() {
            let m = plan.tokens[self.lay.rank];
            saved.rows(0, m)?.copy_from(&self.gpu, x)?;
        }
        self.fork()?;
        let n = plan.chunks.len();
        self.dispatch(Pass::Forward, 0, &plan.chunks[0], x, None)?;
        for i in 0..n {
            let (side, gpu) = (self.side.clone(), self.gpu.clone());
            self.wait_dispatch(i)?;
            self.experts_forward(i, &plan.chunks[i])?;
            if i + 1 < n {
                self.dispatch(Pass::Forward, i + 1, &plan.chunks[i + 1], x, None)?;
            }
            self.handoff(&self.ev_experts[i], &gpu, &side)?;
            self.combine(Pass::Forward, i, &plan.chunks[i], y)?;
        }
        self.join()?;
        self.state = Some(plan);
        Ok(())
    }

    fn check_forward_inputs(&self, x: &DeviceTensor, y: &DeviceTensor) -> Result<usize> {
        let m = self.check_rows_tensor("x", x, None)?;
        self.lay.check_tokens(m)?;
        self.check_rows_tensor("y", y, Some(m))?;
        Ok(m)
    }

    /// Routing on the device, the header all-gather (the one host synchronisation of a
    /// call), and the device routing plan of every chunk. Returns the call's exchange plan,
    /// or this rank's own error first, else the first rejecting peer's.
    fn route(&mut self, x: &DeviceTensor, local: Result<usize>) -> Result<CallPlan> {
        let _s = tracing::debug_span!("routing").entered();
        let t = self.timer.start(&self.gpu)?;
        let e = self.cfg.experts();
        let gpu = self.gpu.clone();
        // A rank whose input or routing kernels fail still takes part in the header
        // exchange (with a non-zero status), so no peer is left waiting in it.
        let routed = match &local {
            Ok(m) => self.route_local(&gpu, x, *m),
            Err(_) => Ok(()),
        };
        let status = match (&local, &routed) {
            (Err(err), _) => Some(Reject::of(err)),
            (Ok(_), Err(_)) => Some(Reject::Device),
            _ => None,
        };
        if let Some(status) = status {
            // Zero counts, this rank's token count (for the peers' messages), the status.
            let mut h = vec![0i32; self.lay.header_len()];
            let n = h.len();
            let rows = x.shape().first().copied().unwrap_or(0);
            h[n - 2] = i32::try_from(rows).unwrap_or(i32::MAX);
            h[n - 1] = status as i32;
            self.tok.header.copy_from_host(&gpu, &h)?;
        }
        let comm: &Communicator = self.comm.borrow();
        // SAFETY: `header` holds header_len and `headers` W·header_len i32 on this rank's
        // device (allocated by `TokenBuffers::new` for this layout), alive with the layer.
        unsafe {
            comm.all_gather_raw(
                self.tok.header.device_ptr(),
                self.tok.headers.device_ptr(),
                self.lay.header_len(),
                ncclDataType_t::ncclInt32,
                gpu.stream(),
            )?;
        }
        comm.wait(
            gpu.stream(),
            "the routing-count all-gather of a forward (every rank must call it)",
        )?;
        let gathered: Vec<i32> = self.tok.headers.to_host(&gpu)?;
        local?;
        routed?;
        let plan = plan::plan_call(&self.lay, &gathered)?;
        let (w, c) = (self.lay.world, self.lay.chunks);
        layer_ops::unpack_counts(&gpu, &self.tok.headers, w, c, e, &mut self.tok.count_mats)?;
        for (i, ch) in plan.chunks.iter().enumerate() {
            let b = &mut self.chunks[i];
            b.plan.tokens = ch.tokens.len();
            let ids = self.tok.ids.rows(ch.tokens.start, ch.tokens.len())?;
            let mat =
                self.tok
                    .count_mats
                    .view(i * w * e, comet_kernels::buffer::DType::I32, &[w, e])?;
            b.plan.build(&gpu, &mat, &ids)?;
        }
        self.timer.stop("routing", &gpu, t)?;
        Ok(plan)
    }

    /// The router and the per-chunk counts of this rank's `m` tokens (into the header).
    fn route_local(&mut self, gpu: &comet_kernels::Gpu, x: &DeviceTensor, m: usize) -> Result<()> {
        let (e, k) = (self.cfg.experts(), self.cfg.top_k());
        let tok = &mut self.tok;
        let mut logits = tok.logits.rows(0, m)?;
        let mut probs = tok.probs.rows(0, m)?;
        let mut ids = tok.ids.rows(0, m)?;
        let mut weights = tok.weights.rows(0, m)?;
        router::router_logits(gpu, x, &self.wr, &mut logits)?;
        router::softmax_topk(
            gpu,
            &logits,
            k,
            self.cfg.renormalize(),
            Some(&mut probs),
            &mut ids,
            &mut weights,
        )?;
        layer_ops::chunk_counts(
            gpu,
            &ids,
            e,
            self.lay.chunks,
            [m as i32, 0],
            &mut tok.header,
        )?;
        Ok(())
    }

    /// Chunk `i`'s rows to the experts' ranks, on the communication stream: send-layout
    /// permute (forward: `x`; backward: `w · dy`, after the routing-weight gradient
    /// `⟨dy, o⟩`), the all-to-all-v, and the permute into the receive layout (forward: the
    /// GEMM0 input; backward: the output gradient, in `o`). Records `ev_dispatch[i]`.
    pub(crate) fn dispatch(
        &mut self,
        pass: Pass,
        i: usize,
        ch: &ChunkExchange,
        src: &DeviceTensor,
        dweights: Option<&DeviceTensor>,
    ) -> Result<()> {
        let _s = tracing::debug_span!("dispatch", chunk = i).entered();
        let gpu = self.side.clone();
        let t = self.timer.start(&gpu)?;
        let k = self.cfg.top_k();
        let (mc, slots) = (ch.tokens.len(), ch.tokens.len() * k);
        let row_bytes = self.cfg.hidden() * self.elem.size();
        let src_c = src.rows(ch.tokens.start, mc)?;
        let b = &mut self.chunks[i];
        let send_row = b.plan.send_row.rows(0, mc)?;
        let mut send = b.send.rows(0, slots)?;
        match pass {
            Pass::Forward => {
                rows::permute_rows(&gpu, &src_c, &send_row, None, &mut send)?;
                let scatter_row = b.plan.scatter_row.rows(0, mc)?;
                let mut send_index = b.send_index.rows(0, slots)?;
                layer_ops::scatter_i32(&gpu, &send_row, &scatter_row, &mut send_index)?;
            }
            Pass::Backward => {
                let weights = self.tok.weights.rows(ch.tokens.start, mc)?;
                if let Some(dw) = dweights {
                    let mut dw_c = dw.rows(ch.tokens.start, mc)?;
                    let back = b.back.rows(0, slots)?;
                    rows::row_dots(&gpu, &src_c, &back, &send_row, &mut dw_c)?;
                }
                rows::permute_rows(&gpu, &src_c, &send_row, Some(&weights), &mut send)?;
            }
        }
        let comm: &Communicator = self.comm.borrow();
        all_to_all_rows(
            comm,
            gpu.stream(),
            &b.send,
            &ch.send_rows,
            &ch.send_offsets,
            &b.stage,
            &ch.recv_rows,
            &ch.recv_offsets,
            row_bytes,
        )?;
        if pass == Pass::Forward {
            all_to_all_rows(
                comm,
                gpu.stream(),
                &b.send_index,
                &ch.send_rows,
                &ch.send_offsets,
                &b.recv_index,
                &ch.recv_rows,
                &ch.recv_offsets,
                4,
            )?;
        }
        let rt = ch.recv_total;
        if rt > 0 {
            let stage = b.stage.rows(0, rt)?;
            let index = b.recv_index.rows(0, rt)?;
            let mut dst = match pass {
                Pass::Forward => b.recv.rows(0, rt)?,
                Pass::Backward => b.o.rows(0, rt)?,
            };
            rows::permute_rows(&gpu, &stage, &index, None, &mut dst)?;
        }
        let name = match pass {
            Pass::Forward => "dispatch",
            Pass::Backward => "bwd_dispatch",
        };
        self.timer.stop(name, &gpu, t)?;
        if self.pipelined() {
            self.ev_dispatch[i].record(gpu.stream())?;
        }
        Ok(())
    }

    /// Chunk `i`'s expert FFN on the compute stream: GEMM0 (+ activation) and GEMM1 over
    /// its received rows.
    fn experts_forward(&mut self, i: usize, ch: &ChunkExchange) -> Result<()> {
        let _s = tracing::debug_span!("experts", chunk = i).entered();
        let gpu = self.gpu.clone();
        let t = self.timer.start(&gpu)?;
        let rt = ch.recv_total;
        let (engine, act, sms) = (self.engine(), self.cfg.activation(), self.gemm_sms()?);
        let b = &self.chunks[i];
        if rt > 0 {
            let offsets = &b.plan.expert_offsets;
            let recv = b.recv.rows(0, rt)?;
            let mut a = b.a.rows(0, rt)?;
            let mut o = b.o.rows(0, rt)?;
            let keep_pre = b.h.is_some();
            let hop0 = match b.h.as_ref() {
                Some(h) => {
                    let mut h = h.rows(0, rt)?;
                    gemm::forward_keep_pre(
                        &gpu,
                        engine,
                        self.stores(),
                        &recv,
                        &self.w0,
                        offsets,
                        &mut h,
                        &mut a,
                        act,
                        sms,
                    )?
                }
                None => gemm::forward(
                    &gpu,
                    engine,
                    &recv,
                    &self.w0,
                    offsets,
                    &mut a,
                    Some(act),
                    sms,
                )?,
            };
            let hop1 = gemm::forward(&gpu, engine, &a, &self.w1, offsets, &mut o, None, sms)?;
            self.hopper_used |= hop0 || hop1;
            self.hopper_stores_used |= hop0 && keep_pre && self.stores() == gemm::Stores::Sm90;
        }
        self.timer.stop("experts", &gpu, t)?;
        Ok(())
    }

    /// Chunk `i`'s expert outputs back to their tokens, on the communication stream: gather
    /// into staging order, the reverse all-to-all-v into the send layout, and the slot-order
    /// combine into `out` (forward: `y`, weighted; backward: `dx`, unweighted).
    pub(crate) fn combine(
        &mut self,
        pass: Pass,
        i: usize,
        ch: &ChunkExchange,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        let _s = tracing::debug_span!("combine", chunk = i).entered();
        let gpu = self.side.clone();
        let t = self.timer.start(&gpu)?;
        let k = self.cfg.top_k();
        let (mc, slots) = (ch.tokens.len(), ch.tokens.len() * k);
        let row_bytes = self.cfg.hidden() * self.elem.size();
        let b = &self.chunks[i];
        let rt = ch.recv_total;
        if rt > 0 {
            let o = b.o.rows(0, rt)?;
            let index = b.recv_index.rows(0, rt)?;
            let mut stage = b.stage.rows(0, rt)?;
            rows::gather_rows(&gpu, &o, &index, &mut stage)?;
        }
        let land = match pass {
            Pass::Forward => &b.back,
            Pass::Backward => &b.send,
        };
        all_to_all_rows(
            self.comm.borrow(),
            gpu.stream(),
            &b.stage,
            &ch.recv_rows,
            &ch.recv_offsets,
            land,
            &ch.send_rows,
            &ch.send_offsets,
            row_bytes,
        )?;
        let src = land.rows(0, slots)?;
        let send_row = b.plan.send_row.rows(0, mc)?;
        let mut out_c = out.rows(ch.tokens.start, mc)?;
        let (weights, name) = match pass {
            Pass::Forward => (Some(self.tok.weights.rows(ch.tokens.start, mc)?), "combine"),
            Pass::Backward => (None, "bwd_combine"),
        };
        rows::combine_rows(&gpu, &src, &send_row, weights.as_ref(), &mut out_c)?;
        self.timer.stop(name, &gpu, t)?;
        Ok(())
    }
}
