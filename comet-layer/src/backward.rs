//! The backward pass, the mirror image of the forward: per chunk the routing-weight gradient
//! and the weighted `dy` rows dispatched to the experts (layer 1's backward), the expert
//! backward (dgrad through `w1`, `dW1`, activation backward, `dW0`, dgrad through `w0`), the
//! `dx` rows combined back (layer 0's backward); then the router backward.

use std::borrow::Borrow;

use cudarc::nccl::sys::ncclDataType_t;

use comet_comm::Communicator;
use comet_kernels::gemm::{self as kgemm, GemmArgs};
use comet_kernels::{DeviceTensor, router};

use crate::error::{Error, Result};
use crate::forward::Pass;
use crate::gemm;
use crate::grads::{DW0, DW1, DWR, Writes};
use crate::layer::MoeLayer;
use crate::options::GemmEngine;
use crate::plan::{ChunkExchange, Reject};

impl<C: Borrow<Communicator>> MoeLayer<C> {
    /// `dx` for the upstream gradient `dy [M, H]` of the last forward (same `M`),
    /// allocating `dx`. See [`MoeLayer::backward_into`].
    pub fn backward(&mut self, dy: &DeviceTensor) -> Result<DeviceTensor> {
        let m = match dy.shape() {
            [m, _] => *m,
            _ => 0,
        };
        let mut dx = DeviceTensor::alloc(&self.gpu, self.elem, &[m, self.cfg.hidden()])?;
        self.backward_into(dy, &mut dx)?;
        Ok(dx)
    }

    /// `dx [M, H]` (expert path plus router path) for `dy [M, H]`, and the gradients of the
    /// loss `Σ y ⊙ dy` added to the accumulated `dW0`, `dW1` and this rank's router-weight
    /// gradient (see [`MoeLayer::grads_to_host`], [`MoeLayer::zero_grad`]). After
    /// `zero_grad` (or on a new layer) the gradients are not read: each one's first
    /// weight-gradient GEMM in this backward overwrites it, the later ones (the pipelined
    /// strategy's chunks) add to it. A collective: every rank calls it after its forward.
    /// The ranks first exchange whether their inputs are valid, so a rejected input fails
    /// the call on every rank. On an error the gradients are unspecified, except after
    /// `zero_grad`: then they stay zero (the next backward overwrites them again).
    ///
    /// # Errors
    /// [`Error::NoForwardState`] without a preceding forward of a training layer;
    /// [`Error::Input`] for `dy`/`dx` of the wrong dtype, shape or device;
    /// [`Error::PeerRejected`] when another rank's were; communication errors and timeouts.
    pub fn backward_into(&mut self, dy: &DeviceTensor, dx: &mut DeviceTensor) -> Result<()> {
        let _span = tracing::info_span!(
            "moe_backward",
            rank = self.lay.rank,
            strategy = %self.opts.strategy
        )
        .entered();
        let local = self.check_backward_inputs(dy, dx);
        self.exchange_status(local)?;
        let plan = self.state.clone().ok_or(Error::NoForwardState {
            why: "no forward has run since the layer was built or its weights loaded",
        })?;
        self.hopper_used = false;
        self.hopper_stores_used = false;
        let dweights_all = self
            .tok
            .dweights
            .as_ref()
            .ok_or(Error::NoForwardState {
                why: "this layer was built with training = false",
            })?
            .rows(0, self.lay.max_tokens)?;
        // Which gradients this backward has written: a logically zero one is overwritten by
        // its first write. Committed only once the whole backward has succeeded.
        let mut writes = self.grads_zero.begin();
        self.fork()?;
        let n = plan.chunks.len();
        self.dispatch(Pass::Backward, 0, &plan.chunks[0], dy, Some(&dweights_all))?;
        for i in 0..n {
            let (side, gpu) = (self.side.clone(), self.gpu.clone());
            self.wait_dispatch(i)?;
            self.experts_backward(i, &plan.chunks[i], &mut writes)?;
            if i + 1 < n {
                self.dispatch(
                    Pass::Backward,
                    i + 1,
                    &plan.chunks[i + 1],
                    dy,
                    Some(&dweights_all),
                )?;
            }
            self.handoff(&self.ev_experts[i], &gpu, &side)?;
            self.combine(Pass::Backward, i, &plan.chunks[i], dx)?;
        }
        self.join()?;
        self.router_backward(plan.tokens[self.lay.rank], dx, &mut writes)?;
        self.grads_zero.commit(&writes);
        Ok(())
    }

    fn check_backward_inputs(&self, dy: &DeviceTensor, dx: &DeviceTensor) -> Result<()> {
        if !self.opts.training {
            return Err(Error::NoForwardState {
                why: "this layer was built with training = false",
            });
        }
        let Some(plan) = self.state.as_ref() else {
            return Err(Error::NoForwardState {
                why: "no forward has run since the layer was built or its weights loaded",
            });
        };
        let m = plan.tokens[self.lay.rank];
        self.check_rows_tensor("dy", dy, Some(m))?;
        self.check_rows_tensor("dx", dx, Some(m))?;
        Ok(())
    }

    /// All ranks learn whether every rank's backward inputs are valid (a 4-byte all-gather
    /// and one bounded host wait), so that no rank starts exchanging rows with a rank that
    /// will not.
    fn exchange_status(&mut self, local: Result<()>) -> Result<()> {
        let code = match &local {
            Ok(()) => 0,
            Err(e) => Reject::of(e) as i32,
        };
        let gpu = self.gpu.clone();
        self.status[0].copy_from_host(&gpu, &[code])?;
        let comm: &Communicator = self.comm.borrow();
        // SAFETY: status[0] holds 1 and status[1] W i32 on this rank's device, owned by the
        // layer.
        unsafe {
            comm.all_gather_raw(
                self.status[0].device_ptr(),
                self.status[1].device_ptr(),
                1,
                ncclDataType_t::ncclInt32,
                gpu.stream(),
            )?;
        }
        comm.wait(
            gpu.stream(),
            "the input-status all-gather of a backward (every rank must call it)",
        )?;
        let all: Vec<i32> = self.status[1].to_host(&gpu)?;
        local?;
        if let Some((r, &c)) = all.iter().enumerate().find(|(_, c)| **c != 0) {
            return Err(Error::PeerRejected {
                rank: r,
                reason: Reject::describe(c, 0),
            });
        }
        Ok(())
    }

    /// Chunk `i`'s expert backward on the compute stream. The weight gradients overwrite
    /// or accumulate as `writes` says (chunks that received no rows write nothing, so the
    /// overwrite falls to the first chunk with rows).
    fn experts_backward(
        &mut self,
        i: usize,
        ch: &ChunkExchange,
        writes: &mut Writes,
    ) -> Result<()> {
        let _s = tracing::debug_span!("bwd_experts", chunk = i).entered();
        let gpu = self.gpu.clone();
        let t = self.timer.start(&gpu)?;
        let rt = ch.recv_total;
        let (engine, act, sms) = (self.engine(), self.cfg.activation(), self.gemm_sms()?);
        let stores = self.stores();
        let b = &self.chunks[i];
        let missing = || Error::NoForwardState {
            why: "this layer was built with training = false",
        };
        let grads = self.grads.as_mut().ok_or_else(missing)?;
        if rt > 0 {
            let offsets = &b.plan.expert_offsets;
            let d_out = b.o.rows(0, rt)?;
            let a = b.a.rows(0, rt)?;
            let recv = b.recv.rows(0, rt)?;
            let h = b.h.as_ref().ok_or_else(missing)?.rows(0, rt)?;
            let mut da = b.da.as_ref().ok_or_else(missing)?.rows(0, rt)?;
            let mut dh = b.dh.as_ref().ok_or_else(missing)?.rows(0, rt)?;
            let [_, dw0, dw1] = grads;
            let hop1 = gemm::dgrad(&gpu, engine, &d_out, &self.w1, offsets, &mut da, sms)?;
            let (o, e) = (Some(offsets), engine);
            let acc1 = writes.accumulate(DW1);
            let w1 = gemm::wgrad(&gpu, e, stores, &d_out, &a, o, dw1, acc1, sms)?;
            gemm::activation_backward(&gpu, act, &h, &da, &mut dh)?;
            let acc0 = writes.accumulate(DW0);
            let w0 = gemm::wgrad(&gpu, e, stores, &dh, &recv, o, dw0, acc0, sms)?;
            let mut dx_rows = b.o.rows(0, rt)?;
            let hop0 = gemm::dgrad(&gpu, engine, &dh, &self.w0, offsets, &mut dx_rows, sms)?;
            self.hopper_used |= hop0 || hop1 || w0 || w1;
            self.hopper_stores_used |= w0 || w1;
        }
        self.timer.stop("bwd_experts", &gpu, t)?;
        Ok(())
    }

    /// `dlogits` from the routing-weight gradient (through renormalisation and softmax),
    /// then `dx += dlogits · wr` and `dWr += dlogitsᵀ · x` (this rank's part; `dWr = …` when
    /// `writes` says it overwrites).
    fn router_backward(
        &mut self,
        m: usize,
        dx: &mut DeviceTensor,
        writes: &mut Writes,
    ) -> Result<()> {
        let _s = tracing::debug_span!("bwd_router").entered();
        let gpu = self.gpu.clone();
        let t = self.timer.start(&gpu)?;
        let missing = || Error::NoForwardState {
            why: "this layer was built with training = false",
        };
        let tok = &self.tok;
        let probs = tok.probs.rows(0, m)?;
        let ids = tok.ids.rows(0, m)?;
        let dweights = tok.dweights.as_ref().ok_or_else(missing)?.rows(0, m)?;
        let mut dlogits = tok.dlogits.as_ref().ok_or_else(missing)?.rows(0, m)?;
        let mut dlogits_elem = tok.dlogits_elem.as_ref().ok_or_else(missing)?.rows(0, m)?;
        let x = tok.x_saved.as_ref().ok_or_else(missing)?.rows(0, m)?;
        router::router_backward(
            &gpu,
            &probs,
            &ids,
            &dweights,
            self.cfg.renormalize(),
            &mut dlogits,
            Some(&mut dlogits_elem),
        )?;
        kgemm::grouped_gemm(
            &gpu,
            GemmArgs::dgrad(&dlogits_elem, &self.wr, None, dx)
                .accumulate(true)
                .engine(kgemm::Engine::Portable),
        )?;
        let grads = self.grads.as_mut().ok_or_else(missing)?;
        // After the join: nothing runs beside the router backward, so no SM cap.
        // One group: the mma.sync engine whatever the options (the Hopper engine needs
        // device offsets).
        let (e, st) = (GemmEngine::MmaSync, gemm::Stores::Portable);
        let acc = writes.accumulate(DWR);
        let dwr = &mut grads[DWR];
        gemm::wgrad(&gpu, e, st, &dlogits_elem, &x, None, dwr, acc, None)?;
        self.timer.stop("bwd_router", &gpu, t)?;
        Ok(())
    }
}
