//! [`MoeLayer`]: construction, weights and gradients, and the per-call stream plumbing. The
//! passes themselves are in `forward.rs` and `backward.rs`.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use cudarc::driver::CudaEvent;
use cudarc::nccl::sys::ncclDataType_t;

use comet_comm::{Communicator, ReduceOp};
use comet_core::{MoeConfig, ParallelConfig};
use comet_kernels::buffer::DType;
use comet_kernels::forward::{download_f32, upload_f32};
use comet_kernels::{DeviceTensor, Gpu, init, router};

use crate::buffers::{ChunkBuffers, TokenBuffers, workspace_bytes};
use crate::error::{Error, Result};
use crate::grads::{DW0, DW1, DWR, GradsZero};
use crate::options::{GemmEngine, LayerOptions, Strategy};
use crate::plan::{CallPlan, Layout};
use crate::timing::PhaseTimer;

/// Length of the description the ranks compare at construction.
const DESCRIPTION_BYTES: usize = 256;

/// Initial weights of a layer.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// Row-major f32 host arrays, rounded to the layer's dtype on upload: the router
    /// `wr [E, H]` (the same on every rank) and this rank's experts only,
    /// `w0 [L, n0, H]` and `w1 [L, H, F]` (global experts `rank·L ..`).
    Host {
        /// `[E, H]`.
        wr: &'a [f32],
        /// `[L, n0, H]`.
        w0: &'a [f32],
        /// `[L, H, F]`.
        w1: &'a [f32],
    },
    /// Seeded uniform values filled on the device with the scale of
    /// `comet_core::reference::MoeWeights::random` (standard deviation `1/√H` for `wr` and
    /// `w0`, `1/√F` for `w1`); `wr` is the same on every rank and each expert's values depend
    /// on its global id only. For benchmarks (no host arrays, no upload).
    Random {
        /// Seed.
        seed: u64,
    },
}

/// The expert-parallel MoE layer of one rank.
///
/// Built from the layer's shape ([`MoeConfig`]), the parallel layout ([`ParallelConfig`],
/// pure expert parallelism: `ep = world`, `tp = 1`), this rank's [`Communicator`] (owned or
/// borrowed: any `C: Borrow<Communicator>`), the [`LayerOptions`] and the initial
/// [`Weights`]. It owns the router weight, this rank's `L = E / W` experts, their gradients
/// and every buffer a call needs (sized at construction for `max_tokens`).
///
/// Every rank calls the same methods in the same order: [`MoeLayer::forward`] (routing on
/// the device, the routing counts all-gathered, one host synchronisation to read them, then
/// the strategy's dispatch / experts / combine), then [`MoeLayer::backward`]. Work is
/// enqueued on the layer's compute stream ([`MoeLayer::gpu`]); inputs must be ready on it
/// (upload them through [`MoeLayer::gpu`], or synchronise first) and outputs are ready on it
/// when a call returns (the host is not synchronised: use [`MoeLayer::synchronize`]).
///
/// Works the same with one process per GPU ([`Communicator::from_env`]) and with one
/// process driving several GPUs ([`comet_comm::run_local`]).
pub struct MoeLayer<C: Borrow<Communicator> = Communicator> {
    pub(crate) comm: C,
    pub(crate) cfg: MoeConfig,
    pub(crate) par: ParallelConfig,
    pub(crate) opts: LayerOptions,
    pub(crate) lay: Layout,
    pub(crate) elem: DType,
    /// Compute stream (routing, experts, router backward; the caller's stream).
    pub(crate) gpu: Gpu,
    /// Communication stream (dispatch and combine); the compute stream for Sequential.
    pub(crate) side: Gpu,
    pub(crate) wr: DeviceTensor,
    pub(crate) w0: DeviceTensor,
    pub(crate) w1: DeviceTensor,
    /// f32 gradients (training): `[1, E, H]`, `[L, n0, H]`, `[L, H, F]` (indices
    /// `grads::{DWR, DW0, DW1}`). Zeroed lazily: see `grads_zero`.
    pub(crate) grads: Option<[DeviceTensor; 3]>,
    /// Which gradients are logically zero (set at construction and by
    /// [`MoeLayer::zero_grad`], no memset). Invariant: a logically zero gradient's buffer
    /// is stale and nothing reads it until a backward's first write overwrites all of it
    /// (accumulate off; later writes of that backward accumulate, and only a backward that
    /// returns `Ok` clears the flag of what it wrote) or a reader materialises it with a
    /// memset ([`MoeLayer::grads_to_host`], [`MoeLayer::all_reduce_router_grad`]). See
    /// `grads.rs`.
    pub(crate) grads_zero: GradsZero,
    pub(crate) tok: TokenBuffers,
    pub(crate) chunks: Vec<ChunkBuffers>,
    /// The last forward's exchange (what its backward replays).
    pub(crate) state: Option<CallPlan>,
    /// i32 `[1]` / `[W]`: the backward's input-status exchange.
    pub(crate) status: [DeviceTensor; 2],
    pub(crate) timer: PhaseTimer,
    /// Per chunk: dispatch done (side), experts done (compute); then fork and join.
    pub(crate) ev_dispatch: Vec<CudaEvent>,
    pub(crate) ev_experts: Vec<CudaEvent>,
    pub(crate) ev_fork: CudaEvent,
    pub(crate) ev_join: CudaEvent,
    /// Whether the last call ran an expert GEMM on the Hopper engine.
    pub(crate) hopper_used: bool,
    /// Whether the last call ran a training GEMM on the Hopper engine's training stores
    /// ([`LayerOptions::sm90_training_stores`]).
    pub(crate) hopper_stores_used: bool,
}

impl<C: Borrow<Communicator>> std::fmt::Debug for MoeLayer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeLayer")
            .field("rank", &self.lay.rank)
            .field("world", &self.lay.world)
            .field("config", &self.cfg)
            .field("options", &self.opts)
            .finish_non_exhaustive()
    }
}

fn expect_len(what: &'static str, v: &[f32], n: usize) -> Result<()> {
    if v.len() != n {
        return Err(Error::HostLength {
            what,
            got: v.len(),
            expected: n,
        });
    }
    Ok(())
}

fn aligned(what: &'static str, value: usize, why: &'static str) -> Result<()> {
    if value % 8 != 0 {
        return Err(Error::Alignment {
            what,
            value,
            multiple: 8,
            why,
        });
    }
    Ok(())
}

/// A description of a tensor for error messages.
pub(crate) fn describe(t: &DeviceTensor) -> String {
    format!("{} {:?}", t.dtype(), t.shape())
}

impl<C: Borrow<Communicator>> MoeLayer<C> {
    /// Builds this rank's layer (a collective: every rank of `comm` calls it with the same
    /// `cfg`, `par` and `opts`; the ranks compare them and fail together if they differ).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for `tp > 1` or an f32 layer; [`Error::WorldMismatch`] when the
    /// communicator's size is not `par.world()`; [`Error::Alignment`] unless `H` and `F` are
    /// multiples of 8 (and `E` too when training: the router-gradient GEMMs reduce over it);
    /// [`Error::ZeroChunks`], [`Error::ZeroTokens`], [`Error::TooManyChunks`],
    /// [`Error::SmReserve`] for bad options; [`Error::HostLength`] for host weights of the wrong size;
    /// [`Error::RankMismatch`] when another rank built a different layer; kernel-limit
    /// errors (experts ≤ 1024, top-k ≤ 64); device and NCCL errors.
    pub fn new(
        comm: C,
        cfg: MoeConfig,
        par: ParallelConfig,
        opts: LayerOptions,
        weights: Weights<'_>,
    ) -> Result<Self> {
        opts.validate()?;
        let c: &Communicator = comm.borrow();
        if par.tp() != 1 {
            return Err(Error::Unsupported {
                what: "tensor parallelism tp",
                value: par.tp().to_string(),
                supported: "tp = 1 (expert parallelism over all ranks)",
            });
        }
        if par.world() != c.world_size() {
            return Err(Error::WorldMismatch {
                communicator: c.world_size(),
                config: par.world(),
            });
        }
        par.validate_for(&cfg)?;
        let elem = DType::from(cfg.dtype());
        if !elem.is_half() {
            return Err(Error::Unsupported {
                what: "layer dtype",
                value: elem.to_string(),
                supported: "bf16 or f16 (the GEMM engines take 16-bit operands)",
            });
        }
        let (h, f, e, k) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.top_k());
        aligned("hidden", h, "16-byte rows in the GEMMs and row kernels")?;
        aligned("ffn", f, "16-byte rows in the GEMMs and activation kernels")?;
        if opts.training {
            aligned(
                "experts (training)",
                e,
                "the router-gradient GEMMs reduce over the experts in 16-byte steps",
            )?;
        }
        router::check_router(e, k)?;
        let lay = Layout::new(
            c.world_size(),
            c.rank(),
            e,
            k,
            opts.strategy.chunks(),
            opts.max_tokens,
        )?;
        if lay.local_experts() > comet_kernels::gemm::MAX_GROUPS {
            return Err(Error::Unsupported {
                what: "local experts per rank",
                value: lay.local_experts().to_string(),
                supported: "at most 1024 (the grouped GEMM's group limit)",
            });
        }
        cfg.check_rows(lay.recv_capacity())?;
        cfg.check_rows(lay.max_tokens)?;
        // Before the collective below, like the other option checks.
        let sms = c.context().attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        opts.gemm_sms(usize::try_from(sms).unwrap_or(0))?;
        let ours = format!(
            "H={h} F={f} E={e} k={k} act={} renorm={} dtype={} W={} strategy={} max_tokens={} training={} engine={} sm90_stores={}",
            cfg.activation(),
            cfg.renormalize(),
            cfg.dtype(),
            lay.world,
            opts.strategy,
            opts.max_tokens,
            opts.training,
            opts.engine,
            opts.sm90_training_stores
        );
        check_same_everywhere(c, &ours)?;

        let _span = tracing::info_span!(
            "moe_layer_new",
            rank = lay.rank,
            world = lay.world,
            workspace_mib = workspace_bytes(&cfg, elem, &lay, opts.training) >> 20
        )
        .entered();
        let ctx = c.context().clone();
        let gpu = Gpu::from_stream(ctx.new_stream()?)?;
        let side = match opts.strategy {
            Strategy::Sequential => gpu.clone(),
            Strategy::Pipelined { .. } => Gpu::from_stream(ctx.new_stream()?)?,
        };
        let l = lay.local_experts();
        let n0 = cfg.n0();
        let (wr, w0, w1) = match weights {
            Weights::Host { wr, w0, w1 } => {
                expect_len("router weight wr [E, H]", wr, e * h)?;
                expect_len("local expert weights w0 [L, n0, H]", w0, l * n0 * h)?;
                expect_len("local expert weights w1 [L, H, F]", w1, l * h * f)?;
                (
                    upload_f32(&gpu, elem, &[e, h], wr)?,
                    upload_f32(&gpu, elem, &[l, n0, h], w0)?,
                    upload_f32(&gpu, elem, &[l, h, f], w1)?,
                )
            }
            Weights::Random { seed } => random_weights(&gpu, &cfg, elem, &lay, seed)?,
        };
        // Logically zero (`grads_zero`): no memset, the first backward overwrites them.
        let grads = if opts.training {
            let z = |shape: &[usize]| DeviceTensor::alloc_raw(&gpu, DType::F32, shape);
            Some([z(&[1, e, h])?, z(&[l, n0, h])?, z(&[l, h, f])?])
        } else {
            None
        };
        let tok = TokenBuffers::new(&gpu, &cfg, elem, &lay, opts.training)?;
        let chunks = (0..lay.chunks)
            .map(|_| ChunkBuffers::new(&gpu, &cfg, elem, &lay, opts.training))
            .collect::<Result<Vec<_>>>()?;
        let status = [
            DeviceTensor::alloc_raw(&gpu, DType::I32, &[1])?,
            DeviceTensor::alloc_raw(&gpu, DType::I32, &[lay.world])?,
        ];
        let event = || ctx.new_event(None);
        let ev_dispatch = (0..lay.chunks)
            .map(|_| event())
            .collect::<std::result::Result<_, _>>()?;
        let ev_experts = (0..lay.chunks)
            .map(|_| event())
            .collect::<std::result::Result<_, _>>()?;
        gpu.synchronize()?;
        Ok(MoeLayer {
            comm,
            cfg,
            par,
            opts,
            lay,
            elem,
            gpu,
            side,
            wr,
            w0,
            w1,
            grads,
            grads_zero: GradsZero::default(),
            tok,
            chunks,
            state: None,
            status,
            timer: PhaseTimer::default(),
            ev_dispatch,
            ev_experts,
            ev_fork: event()?,
            ev_join: event()?,
            hopper_used: false,
            hopper_stores_used: false,
        })
    }

    /// The layer's shape.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }
    /// The parallel layout.
    pub fn parallel(&self) -> &ParallelConfig {
        &self.par
    }
    /// The options it was built with.
    pub fn options(&self) -> &LayerOptions {
        &self.opts
    }
    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.opts.strategy
    }
    /// This rank.
    pub fn rank(&self) -> usize {
        self.lay.rank
    }
    /// Ranks.
    pub fn world(&self) -> usize {
        self.lay.world
    }
    /// Local experts (`L = E / W`); this rank holds global experts `rank·L .. (rank+1)·L`.
    pub fn local_experts(&self) -> usize {
        self.lay.local_experts()
    }
    /// The buffer sizes.
    pub fn layout(&self) -> &Layout {
        &self.lay
    }
    /// Element type of weights, activations and `x`/`y`.
    pub fn dtype(&self) -> DType {
        self.elem
    }
    /// The device and compute stream: upload inputs and read outputs through it.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    /// The communicator.
    pub fn communicator(&self) -> &Communicator {
        self.comm.borrow()
    }
    /// Gives the communicator back.
    pub fn into_communicator(self) -> C {
        self.comm
    }
    /// Whether the last call ran expert GEMMs on the Hopper engine.
    pub fn used_hopper_engine(&self) -> bool {
        self.hopper_used
    }
    /// Whether the last call ran a training GEMM on the Hopper engine's training stores
    /// ([`LayerOptions::sm90_training_stores`], on by default): a training forward's GEMM0 with the fused
    /// pre-activation store, or a backward's expert weight gradients on the f32 accumulate
    /// store. Always `false` with the option off.
    pub fn used_hopper_stores(&self) -> bool {
        self.hopper_stores_used
    }
    /// Device memory of the call buffers, in bytes (weights and gradients not included).
    pub fn workspace_bytes(&self) -> u64 {
        workspace_bytes(&self.cfg, self.elem, &self.lay, self.opts.training)
    }
    /// Rows this rank sent to other ranks in the last forward (dispatch and combine), or
    /// `None` before the first.
    pub fn last_remote_rows(&self) -> Option<usize> {
        self.state.as_ref().map(|p| p.remote_rows(self.lay.rank))
    }
    /// Rows this rank's experts received in the last forward (all chunks), or `None` before
    /// the first: its expert GEMMs did `2 · rows · H · (n0 + F)` flops.
    pub fn last_received_rows(&self) -> Option<usize> {
        self.state
            .as_ref()
            .map(|p| p.chunks.iter().map(|c| c.recv_total).sum())
    }

    /// Tokens of each rank in the last forward.
    pub fn last_tokens(&self) -> Option<&[usize]> {
        self.state.as_ref().map(|p| p.tokens.as_slice())
    }

    /// Waits (bounded by the communicator's timeout) until everything enqueued so far is
    /// done; a timeout aborts the communicator and is an error.
    pub fn synchronize(&self) -> Result<()> {
        let c = self.communicator();
        c.wait(self.side.stream(), "the layer's communication stream")?;
        c.wait(self.gpu.stream(), "the layer's compute stream")?;
        Ok(())
    }

    /// Records per-phase CUDA events on later calls (see [`MoeLayer::take_phase_times`]).
    pub fn set_phase_timing(&mut self, on: bool) {
        self.timer.set_enabled(on);
    }

    /// Milliseconds per phase (`routing`, `dispatch`, `experts`, `combine`; backward:
    /// `bwd_dispatch`, `bwd_experts`, `bwd_combine`, `bwd_router`) summed over the calls
    /// since the last take. Each phase is timed on the stream it runs on; with the pipelined
    /// strategy the per-chunk intervals are summed and overlap.
    pub fn take_phase_times(&mut self) -> Result<BTreeMap<String, f64>> {
        self.synchronize()?;
        self.timer.take()
    }

    /// Fills every call buffer with NaN (floats) / -1 (integers), so that a test shows that
    /// everything a call reads it wrote first; and the gradients that are logically zero
    /// ([`MoeLayer::zero_grad`] with no backward since, or a new layer), whose buffers no
    /// call may read: the next backward overwrites them, a reader zeroes them. Gradients a
    /// backward has written since are left as they are.
    pub fn poison_workspace(&mut self) -> Result<()> {
        let gpu = self.gpu.clone();
        if let Some(g) = self.grads.as_mut() {
            for (i, t) in g.iter_mut().enumerate() {
                if self.grads_zero.is_zero(i) {
                    t.poison(&gpu)?;
                }
            }
        }
        for t in self.tok.all_mut() {
            t.poison(&gpu)?;
        }
        for c in &mut self.chunks {
            for t in c.all_mut() {
                t.poison(&gpu)?;
            }
        }
        Ok(())
    }

    /// Replaces the weights (host f32, as [`Weights::Host`]).
    pub fn load_weights(&mut self, wr: &[f32], w0: &[f32], w1: &[f32]) -> Result<()> {
        let (h, f, e, n0, l) = (
            self.cfg.hidden(),
            self.cfg.ffn(),
            self.cfg.experts(),
            self.cfg.n0(),
            self.lay.local_experts(),
        );
        expect_len("router weight wr [E, H]", wr, e * h)?;
        expect_len("local expert weights w0 [L, n0, H]", w0, l * n0 * h)?;
        expect_len("local expert weights w1 [L, H, F]", w1, l * h * f)?;
        self.synchronize()?;
        self.wr = upload_f32(&self.gpu, self.elem, &[e, h], wr)?;
        self.w0 = upload_f32(&self.gpu, self.elem, &[l, n0, h], w0)?;
        self.w1 = upload_f32(&self.gpu, self.elem, &[l, h, f], w1)?;
        self.state = None;
        Ok(())
    }

    /// The weights on the host as f32: `(wr [E·H], w0 [L·n0·H], w1 [L·H·F])`.
    pub fn weights_to_host(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.synchronize()?;
        Ok((
            download_f32(&self.gpu, &self.wr)?,
            download_f32(&self.gpu, &self.w0)?,
            download_f32(&self.gpu, &self.w1)?,
        ))
    }

    fn grads(&self) -> Result<&[DeviceTensor; 3]> {
        self.grads.as_ref().ok_or(Error::NoForwardState {
            why: "this layer was built with training = false (no gradients)",
        })
    }

    /// Sets the accumulated gradients to zero, lazily: O(1), nothing is enqueued. The
    /// gradients are marked logically zero; the next backward overwrites each of them with
    /// its first write instead of adding to it (no memset, and no read of the old values),
    /// and a reader ([`MoeLayer::grads_to_host`], [`MoeLayer::all_reduce_router_grad`])
    /// zeroes a gradient no backward has written since. A backward that fails leaves them
    /// logically zero. New layers start with zero gradients too.
    ///
    /// # Errors
    /// [`Error::NoForwardState`] for a layer built with `training = false`.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.grads()?;
        self.grads_zero.set_all();
        Ok(())
    }

    /// Zeroes (memset on the compute stream) those of the gradients `which` that are
    /// logically zero, so that their buffers hold the gradients; see `grads_zero`.
    fn materialise_grads(&mut self, which: &[usize]) -> Result<()> {
        let gpu = self.gpu.clone();
        let g = self.grads.as_mut().ok_or(Error::NoForwardState {
            why: "this layer was built with training = false (no gradients)",
        })?;
        for &i in which {
            if self.grads_zero.is_zero(i) {
                g[i].fill_bytes(&gpu, 0)?;
                self.grads_zero.materialised(i);
            }
        }
        Ok(())
    }

    /// Sums the router-weight gradient over all ranks (NCCL all-reduce, in place): the
    /// router weight is replicated, so its global gradient is the sum of the ranks'.
    /// A collective: every rank calls it. A logically zero router gradient
    /// ([`MoeLayer::zero_grad`] with no backward since) is zeroed on the device first.
    pub fn all_reduce_router_grad(&mut self) -> Result<()> {
        self.materialise_grads(&[DWR])?;
        let g = self.grads()?;
        let dwr = &g[0];
        // SAFETY: `dwr` holds E·H f32 on this rank's device and lives in `self` (the call
        // is stream-ordered on the compute stream, which every later use also follows).
        unsafe {
            self.communicator().all_reduce_raw(
                dwr.device_ptr(),
                dwr.device_ptr(),
                dwr.numel(),
                ncclDataType_t::ncclFloat32,
                ReduceOp::Sum,
                self.gpu.stream(),
            )?;
        }
        Ok(())
    }

    /// The accumulated gradients on the host as f32: `(dwr [E·H], dw0 [L·n0·H],
    /// dw1 [L·H·F])` (this rank's router gradient unless [`MoeLayer::all_reduce_router_grad`]
    /// summed it). Gradients that are logically zero ([`MoeLayer::zero_grad`] with no
    /// backward since) are zeroed on the device first, hence `&mut self`.
    pub fn grads_to_host(&mut self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.materialise_grads(&[DWR, DW0, DW1])?;
        let g = self.grads()?;
        self.synchronize()?;
        Ok((
            g[0].to_host(&self.gpu)?,
            g[1].to_host(&self.gpu)?,
            g[2].to_host(&self.gpu)?,
        ))
    }

    /// The last forward's routing on the host: `(ids [M·k] i32, weights [M·k] f32)`.
    pub fn routing_to_host(&self) -> Result<(Vec<i32>, Vec<f32>)> {
        let p = self.state.as_ref().ok_or(Error::NoForwardState {
            why: "no forward has run",
        })?;
        let m = p.tokens[self.lay.rank];
        self.synchronize()?;
        Ok((
            self.tok.ids.rows(0, m)?.to_host(&self.gpu)?,
            self.tok.weights.rows(0, m)?.to_host(&self.gpu)?,
        ))
    }

    /// The device routing plans' status words of the last forward (0 when the ids were
    /// valid), as an error naming the count otherwise.
    pub fn check_device_status(&self) -> Result<()> {
        self.synchronize()?;
        for c in &self.chunks {
            let s: Vec<i32> = c.plan.status.to_host(&self.gpu)?;
            let bad = s.get(1).copied().unwrap_or(0);
            if bad != 0 {
                return Err(Error::DeviceStatus {
                    what: "routing plan",
                    count: i64::from(bad),
                });
            }
        }
        Ok(())
    }

    /// Makes the communication stream wait for the compute stream (no-op for Sequential).
    pub(crate) fn fork(&self) -> Result<()> {
        if self.pipelined() {
            self.ev_fork.record(self.gpu.stream())?;
            self.side.stream().wait(&self.ev_fork)?;
        }
        Ok(())
    }

    /// Makes the compute stream wait for the communication stream (no-op for Sequential).
    pub(crate) fn join(&self) -> Result<()> {
        if self.pipelined() {
            self.ev_join.record(self.side.stream())?;
            self.gpu.stream().wait(&self.ev_join)?;
        }
        Ok(())
    }

    /// Event `ev` recorded on `from`'s stream, waited for by `to`'s (no-op for Sequential).
    pub(crate) fn handoff(&self, ev: &CudaEvent, from: &Gpu, to: &Gpu) -> Result<()> {
        if self.pipelined() {
            ev.record(from.stream())?;
            to.stream().wait(ev)?;
        }
        Ok(())
    }

    /// Makes the compute stream wait for chunk `i`'s dispatch (the event its `dispatch`
    /// recorded right after it; no-op for Sequential).
    pub(crate) fn wait_dispatch(&self, i: usize) -> Result<()> {
        if self.pipelined() {
            self.gpu.stream().wait(&self.ev_dispatch[i])?;
        }
        Ok(())
    }

    pub(crate) fn pipelined(&self) -> bool {
        matches!(self.opts.strategy, Strategy::Pipelined { .. })
    }

    pub(crate) fn engine(&self) -> GemmEngine {
        self.opts.engine
    }

    /// The Hopper-engine stores the training GEMMs may use
    /// ([`LayerOptions::sm90_training_stores`]).
    pub(crate) fn stores(&self) -> crate::gemm::Stores {
        crate::gemm::Stores::new(self.opts.sm90_training_stores)
    }

    /// SMs the expert GEMMs may use (`None`: all; see [`LayerOptions::gemm_sm_reserve`]).
    pub(crate) fn gemm_sms(&self) -> Result<Option<usize>> {
        self.opts.gemm_sms(self.gpu.sm_count() as usize)
    }

    /// Checks a `[M, H]` tensor of the layer's dtype; returns `M`.
    pub(crate) fn check_rows_tensor(
        &self,
        what: &'static str,
        t: &DeviceTensor,
        rows: Option<usize>,
    ) -> Result<usize> {
        let h = self.cfg.hidden();
        let ok_shape = match (t.shape(), rows) {
            ([_, w], None) => *w == h,
            ([m, w], Some(r)) => *w == h && *m == r,
            _ => false,
        };
        if t.dtype() != self.elem || !ok_shape || t.ordinal() != self.gpu.ordinal() {
            let rows = rows.map_or("tokens".to_string(), |r| r.to_string());
            return Err(Error::Input {
                what,
                got: format!("{} on device {}", describe(t), t.ordinal()),
                expected: format!(
                    "{} [{rows}, {h}] on device {}",
                    self.elem,
                    self.gpu.ordinal()
                ),
            });
        }
        Ok(t.shape()[0])
    }
}

/// All ranks describe their layer; any difference is an error on every rank.
fn check_same_everywhere(c: &Communicator, ours: &str) -> Result<()> {
    let mut mine = ours.as_bytes().to_vec();
    mine.resize(DESCRIPTION_BYTES, 0);
    let all = c.all_gather_bytes(&mine)?;
    for (r, theirs) in all.iter().enumerate() {
        if theirs != &mine {
            let end = theirs.iter().position(|&b| b == 0).unwrap_or(theirs.len());
            return Err(Error::RankMismatch {
                rank: r,
                theirs: String::from_utf8_lossy(&theirs[..end]).into_owned(),
                ours: ours.to_string(),
            });
        }
    }
    Ok(())
}

fn random_weights(
    gpu: &Gpu,
    cfg: &MoeConfig,
    elem: DType,
    lay: &Layout,
    seed: u64,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let (h, f, e, n0, l) = (
        cfg.hidden(),
        cfg.ffn(),
        cfg.experts(),
        cfg.n0(),
        lay.local_experts(),
    );
    let sh = 1.0 / (h as f64).sqrt();
    let sf = 1.0 / (f as f64).sqrt();
    let mut wr = DeviceTensor::alloc(gpu, elem, &[e, h])?;
    init::fill_uniform(gpu, &mut wr, seed, sh)?;
    let w0 = DeviceTensor::alloc(gpu, elem, &[l, n0, h])?;
    let w1 = DeviceTensor::alloc(gpu, elem, &[l, h, f])?;
    for q in 0..l {
        let g = (lay.rank * l + q) as u64;
        let s0 = seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(2 * g + 1));
        let s1 = seed ^ (0xc2b2_ae3d_27d4_eb4fu64.wrapping_mul(2 * g + 2));
        init::fill_uniform(gpu, &mut w0.rows(q, 1)?, s0, sh)?;
        init::fill_uniform(gpu, &mut w1.rows(q, 1)?, s1, sf)?;
    }
    Ok((wr, w0, w1))
}
