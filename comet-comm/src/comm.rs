//! The NCCL communicator, in both process models.
//!
//! * One process driving N GPUs, one thread per rank: [`Communicator::init_local`] makes
//!   all N communicators at once (all-or-nothing, no thread can be left waiting for a rank
//!   that failed), and [`run_local`] runs a closure per rank on its own thread.
//! * One process per GPU, launched by torchrun or alike: [`Communicator::from_env`] reads
//!   the environment, runs the TCP rendezvous (rank 0 hands out the NCCL unique id) and
//!   joins the communicator.
//!
//! Either way the result is the same [`Communicator`]: it owns its `ncclComm_t`, a CUDA
//! context and a stream, and offers all-to-all(-v), grouped send/recv, all-gather,
//! all-reduce and a barrier. Waits on the host are bounded by the communicator's timeout;
//! on expiry the communicator is aborted and the call returns [`Error::Timeout`].

use std::ffi::CStr;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::sys as nccl;

use crate::env::DistEnv;
use crate::error::{Error, Result};
use crate::memory::{DeviceBuffer, device_count, ensure_driver, wait_stream};
use crate::rendezvous::{RendezvousConfig, rendezvous};

/// Default bound on host-side waits (rendezvous, barrier, synchronisation).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a caller waits for `ncclCommAbort` after a timeout before it gets its error
/// anyway (the abort goes on in the background; NCCL may need every rank to abort).
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// A raw communicator handle moved to the thread that aborts it.
struct AbortJob(nccl::ncclComm_t, Arc<CudaContext>);
// SAFETY: the handle is used by exactly one thread (the aborting one) after hand-over.
unsafe impl Send for AbortJob {}

/// How the ranks of a communicator were launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessModel {
    /// One process drives every GPU, one thread per rank.
    ThreadPerRank,
    /// One process per GPU (torchrun environment).
    ProcessPerRank,
}

/// Element types NCCL can move or reduce.
pub trait NcclElem: bytemuck::Pod + Send + Sync {
    /// NCCL's name for the type.
    const DTYPE: nccl::ncclDataType_t;
}

macro_rules! nccl_elem {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl NcclElem for $t {
            const DTYPE: nccl::ncclDataType_t = nccl::ncclDataType_t::$v;
        }
    )*};
}
nccl_elem!(
    i8 => ncclInt8, u8 => ncclUint8, i32 => ncclInt32, u32 => ncclUint32,
    i64 => ncclInt64, u64 => ncclUint64, f32 => ncclFloat32, f64 => ncclFloat64,
);

/// Reduction operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Product.
    Prod,
    /// Maximum.
    Max,
    /// Minimum.
    Min,
}

impl ReduceOp {
    fn raw(self) -> nccl::ncclRedOp_t {
        match self {
            ReduceOp::Sum => nccl::ncclRedOp_t::ncclSum,
            ReduceOp::Prod => nccl::ncclRedOp_t::ncclProd,
            ReduceOp::Max => nccl::ncclRedOp_t::ncclMax,
            ReduceOp::Min => nccl::ncclRedOp_t::ncclMin,
        }
    }
}

/// One point-to-point operation of a group (byte granularity).
#[derive(Debug, Clone, Copy)]
pub enum P2pOp<'a> {
    /// Send `bytes` from `buf[offset..]` to `peer`.
    Send {
        /// Source buffer.
        buf: &'a DeviceBuffer,
        /// Byte offset.
        offset: usize,
        /// Byte count.
        bytes: usize,
        /// Destination rank.
        peer: usize,
    },
    /// Receive `bytes` into `buf[offset..]` from `peer`.
    Recv {
        /// Destination buffer.
        buf: &'a DeviceBuffer,
        /// Byte offset.
        offset: usize,
        /// Byte count.
        bytes: usize,
        /// Source rank.
        peer: usize,
    },
}

/// NCCL's unique id (128 opaque bytes), made by one rank and shared with the others.
#[derive(Clone, Copy)]
pub struct UniqueId(nccl::ncclUniqueId);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId(..)")
    }
}

impl UniqueId {
    /// A fresh id (`ncclGetUniqueId`).
    pub fn new() -> Result<Self> {
        ensure_nccl()?;
        let mut id = nccl::ncclUniqueId { internal: [0; 128] };
        // SAFETY: valid out-pointer to a ncclUniqueId.
        nccl_check(
            unsafe { nccl::ncclGetUniqueId(&mut id) },
            "ncclGetUniqueId",
            std::ptr::null_mut(),
            usize::MAX,
        )?;
        Ok(UniqueId(id))
    }

    /// The id's bytes (to send to the other ranks).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    /// An id from bytes received from rank 0.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 128 {
            return Err(Error::Protocol(format!(
                "an NCCL unique id has 128 bytes, received {}",
                bytes.len()
            )));
        }
        let mut id = nccl::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(bytes) {
            *d = *s as std::ffi::c_char;
        }
        Ok(UniqueId(id))
    }
}

/// Fails with [`Error::LibraryMissing`] when libnccl cannot be loaded.
pub fn ensure_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate library names.
    if unsafe { nccl::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::LibraryMissing {
            library: "libnccl",
            hint: "put a directory with libnccl.so (NCCL 2.28) first on LD_LIBRARY_PATH".into(),
        })
    }
}

/// The loaded NCCL's version code (e.g. 22809 for 2.28.9).
pub fn nccl_version() -> Result<i32> {
    ensure_nccl()?;
    let mut v = 0;
    // SAFETY: valid out-pointer.
    nccl_check(
        unsafe { nccl::ncclGetVersion(&mut v) },
        "ncclGetVersion",
        std::ptr::null_mut(),
        usize::MAX,
    )?;
    Ok(v)
}

fn has_symbol(name: &[u8]) -> bool {
    ensure_nccl().is_ok()
        // SAFETY: looking a symbol up does not call it; the library stays loaded for the
        // life of the process (cudarc keeps it in a static).
        && unsafe { nccl::culib().get::<unsafe extern "C" fn()>(name).is_ok() }
}

fn cstr_or(p: *const std::ffi::c_char, fallback: &str) -> String {
    if p.is_null() {
        fallback.to_string()
    } else {
        // SAFETY: NCCL returns NUL-terminated strings it owns.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Turns an NCCL result into an error carrying the code, NCCL's message and its last error.
pub(crate) fn nccl_check(
    r: nccl::ncclResult_t,
    op: &'static str,
    comm: nccl::ncclComm_t,
    rank: usize,
) -> Result<()> {
    match r {
        nccl::ncclResult_t::ncclSuccess => Ok(()),
        code => {
            // SAFETY: both functions accept any code / a null or live communicator.
            let message = cstr_or(unsafe { nccl::ncclGetErrorString(code) }, "");
            let last_error = cstr_or(unsafe { nccl::ncclGetLastError(comm) }, "");
            Err(Error::Nccl {
                op,
                rank,
                code: code as u32,
                code_name: format!("{code:?}"),
                message,
                last_error,
            })
        }
    }
}

/// A rank's NCCL communicator with its CUDA context and stream.
pub struct Communicator {
    comm: nccl::ncclComm_t,
    rank: usize,
    world: usize,
    local_rank: usize,
    local_world: usize,
    model: ProcessModel,
    timeout: Duration,
    aborted: AtomicBool,
    /// Set when a wait expired: device work may still be stuck on the stream.
    stuck: AtomicBool,
    /// Freed on drop only when the stream drained (cuMemFree waits for the device).
    scratch: ManuallyDrop<DeviceBuffer>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

// SAFETY: an ncclComm_t may be used from any thread as long as calls on it are not
// concurrent; `Communicator` is Send but not Sync, so only one thread holds it at a time.
unsafe impl Send for Communicator {}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.ctx.ordinal())
            .field("model", &self.model)
            .finish()
    }
}

/// Options of the one-process-per-GPU bootstrap.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    /// Bound on the rendezvous and on later host-side waits.
    pub timeout: Duration,
    /// GPU ordinal to use; `None` = `LOCAL_RANK`.
    pub device: Option<usize>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            timeout: DEFAULT_TIMEOUT,
            device: None,
        }
    }
}

impl Communicator {
    /// One communicator per device of `devices` (rank i on `devices[i]`), made together in
    /// this thread with NCCL's group API. Move each to its own thread (or use [`run_local`]).
    pub fn init_local(devices: &[usize], timeout: Duration) -> Result<Vec<Communicator>> {
        ensure_driver()?;
        ensure_nccl()?;
        let world = devices.len();
        if world == 0 {
            return Err(Error::invalid("devices", "[]", "at least one device"));
        }
        let visible = device_count()?;
        let highest = devices.iter().copied().max().unwrap_or(0);
        if highest >= visible {
            return Err(Error::NotEnoughDevices {
                needed: highest + 1,
                found: visible,
            });
        }
        let ctxs = devices
            .iter()
            .map(|&d| CudaContext::new(d).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?;
        let id = UniqueId::new()?;
        let mut raw: Vec<nccl::ncclComm_t> = vec![std::ptr::null_mut(); world];
        let world_i =
            i32::try_from(world).map_err(|_| Error::invalid("devices", world, "< 2^31"))?;
        // SAFETY: group start/end bracket one ncclCommInitRank per rank, each with its own
        // context current and a valid out-pointer into `raw`.
        let group = unsafe { nccl::ncclGroupStart() };
        nccl_check(group, "ncclGroupStart", std::ptr::null_mut(), usize::MAX)?;
        let mut first_err = None;
        for (r, ctx) in ctxs.iter().enumerate() {
            if let Err(e) = ctx.bind_to_thread() {
                first_err.get_or_insert(Error::from(e));
                continue;
            }
            let res = unsafe { nccl::ncclCommInitRank(&mut raw[r], world_i, id.0, r as i32) };
            if let Err(e) = nccl_check(res, "ncclCommInitRank", std::ptr::null_mut(), r) {
                first_err.get_or_insert(e);
            }
        }
        // SAFETY: closes the group opened above.
        let end = unsafe { nccl::ncclGroupEnd() };
        let end = nccl_check(end, "ncclGroupEnd (init)", std::ptr::null_mut(), usize::MAX);
        if let Some(e) = first_err.or(end.err()) {
            for c in raw.iter().filter(|c| !c.is_null()) {
                // SAFETY: abort frees a communicator whatever its state.
                unsafe { nccl::ncclCommAbort(*c) };
            }
            return Err(e);
        }
        let mut out = Vec::with_capacity(world);
        for (r, (ctx, comm)) in ctxs.into_iter().zip(raw).enumerate() {
            out.push(Self::wrap(
                comm,
                ctx,
                r,
                world,
                r,
                world,
                ProcessModel::ThreadPerRank,
                timeout,
            )?);
        }
        Ok(out)
    }

    /// Joins the communicator described by the torchrun environment of this process.
    pub fn from_env(opts: &EnvOptions) -> Result<Communicator> {
        let env = DistEnv::from_process_env()?;
        Self::from_dist_env(&env, opts)
    }

    /// Joins the communicator described by `env` (see [`Communicator::from_env`]).
    pub fn from_dist_env(env: &DistEnv, opts: &EnvOptions) -> Result<Communicator> {
        ensure_driver()?;
        ensure_nccl()?;
        let device = opts.device.unwrap_or(env.local_rank);
        let visible = device_count()?;
        if device >= visible {
            return Err(Error::NotEnoughDevices {
                needed: device + 1,
                found: visible,
            });
        }
        let _span =
            tracing::info_span!("bootstrap", rank = env.rank, world = env.world_size).entered();
        let ctx = CudaContext::new(device)?;
        let cfg = RendezvousConfig::from_env(env, opts.timeout);
        let bytes = rendezvous(&cfg, || Ok(UniqueId::new()?.to_bytes()))?;
        let id = UniqueId::from_bytes(&bytes)?;
        ctx.bind_to_thread()?;
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        let world_i = i32::try_from(env.world_size)
            .map_err(|_| Error::invalid("WORLD_SIZE", env.world_size, "< 2^31"))?;
        // SAFETY: the context is current; valid out-pointer; every rank calls this with the
        // id rank 0 made, after the rendezvous confirmed that all ranks are alive.
        let r = unsafe { nccl::ncclCommInitRank(&mut comm, world_i, id.0, env.rank as i32) };
        nccl_check(r, "ncclCommInitRank", std::ptr::null_mut(), env.rank)?;
        Self::wrap(
            comm,
            ctx,
            env.rank,
            env.world_size,
            env.local_rank,
            env.local_world_size,
            ProcessModel::ProcessPerRank,
            opts.timeout,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn wrap(
        comm: nccl::ncclComm_t,
        ctx: Arc<CudaContext>,
        rank: usize,
        world: usize,
        local_rank: usize,
        local_world: usize,
        model: ProcessModel,
        timeout: Duration,
    ) -> Result<Communicator> {
        let made = ctx
            .bind_to_thread()
            .map_err(Error::from)
            .and_then(|_| ctx.new_stream().map_err(Error::from))
            .and_then(|stream| Ok((DeviceBuffer::new(&ctx, 256)?, stream)));
        match made {
            Ok((scratch, stream)) => Ok(Communicator {
                comm,
                rank,
                world,
                local_rank,
                local_world,
                model,
                timeout,
                aborted: AtomicBool::new(false),
                stuck: AtomicBool::new(false),
                scratch: ManuallyDrop::new(scratch),
                stream,
                ctx,
            }),
            Err(e) => {
                // SAFETY: the communicator is ours and not used afterwards.
                unsafe { nccl::ncclCommAbort(comm) };
                Err(e)
            }
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// Rank on this host.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Ranks on this host.
    pub fn local_world_size(&self) -> usize {
        self.local_world
    }
    /// How the ranks were launched.
    pub fn process_model(&self) -> ProcessModel {
        self.model
    }
    /// The bound on host-side waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Changes the bound on host-side waits.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    /// This rank's CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream the collectives run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The raw NCCL handle (valid while `self` lives; do not destroy it).
    pub fn raw(&self) -> nccl::ncclComm_t {
        self.comm
    }

    fn live(&self) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(Error::Aborted { rank: self.rank });
        }
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    fn check(&self, r: nccl::ncclResult_t, op: &'static str) -> Result<()> {
        nccl_check(r, op, self.comm, self.rank)
    }

    fn peer_i32(&self, peer: usize) -> Result<i32> {
        if peer >= self.world {
            return Err(Error::invalid(
                "peer",
                peer,
                format!("< world size {}", self.world),
            ));
        }
        Ok(peer as i32)
    }

    /// Aborts the communicator (once). The abort runs on a helper thread; the caller waits
    /// at most `grace` for it, so a peer that never aborts cannot hang the caller.
    fn abort(&self, grace: Duration) {
        if self.aborted.swap(true, Ordering::AcqRel) {
            return;
        }
        let job = AbortJob(self.comm, self.ctx.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("comet-nccl-abort-{}", self.rank))
            .spawn(move || {
                let job = job;
                let _ = job.1.bind_to_thread();
                // SAFETY: the handle is live and handed over to this thread alone.
                let r = unsafe { nccl::ncclCommAbort(job.0) };
                let _ = tx.send(r);
            });
        match spawned {
            Ok(_) => match rx.recv_timeout(grace) {
                Ok(nccl::ncclResult_t::ncclSuccess) => {}
                Ok(r) => tracing::warn!(rank = self.rank, "ncclCommAbort returned {r:?}"),
                Err(_) => {
                    self.stuck.store(true, Ordering::Release);
                    tracing::warn!(
                        rank = self.rank,
                        "ncclCommAbort still running after {grace:?}; left in the background"
                    )
                }
            },
            Err(_) => {
                // SAFETY: no helper thread: abort here (the handle is live).
                unsafe { nccl::ncclCommAbort(self.comm) };
            }
        }
    }

    /// Whether the communicator was aborted (after a timeout or an error).
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// NCCL's asynchronous error state (an error for a failed or aborted communicator).
    pub fn async_error(&self) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(Error::Aborted { rank: self.rank });
        }
        let mut st = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: valid communicator and out-pointer.
        self.check(
            unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut st) },
            "ncclCommGetAsyncError",
        )?;
        match st {
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => Ok(()),
            e => self.check(e, "asynchronous NCCL operation"),
        }
    }

    /// Waits (bounded by the timeout) until all work queued on `stream` is done, checking
    /// NCCL's asynchronous errors meanwhile. On timeout the communicator is aborted (on a
    /// helper thread, waited for at most a few seconds) and [`Error::Timeout`] returned.
    /// See [`Communicator::barrier_with_timeout`] for the one case NCCL itself blocks.
    pub fn wait(&self, stream: &CudaStream, what: &str) -> Result<()> {
        let r = wait_stream(stream, self.timeout, self.rank, what, || self.async_error());
        if r.is_err() {
            self.stuck.store(true, Ordering::Release);
            self.abort(ABORT_GRACE);
        }
        r
    }

    /// [`Communicator::wait`] on the communicator's own stream.
    pub fn synchronize(&self) -> Result<()> {
        self.wait(&self.stream, "the communicator stream")
    }

    /// All ranks reach this point before any leaves it (bounded by the communicator's
    /// timeout; aborts the communicator on expiry).
    pub fn barrier(&self) -> Result<()> {
        self.barrier_with_timeout(self.timeout)
    }

    /// [`Communicator::barrier`] with an explicit bound.
    ///
    /// The bound covers the barrier's completion on the stream. Known limit (seen on
    /// 2 × H200, NCCL 2.28.9): NCCL connects peers lazily by default
    /// (`NCCL_RUNTIME_CONNECT=1`), inside the host call of the first collective that needs
    /// the connection, and that call blocks until the peer takes part; a rank that never
    /// enters the *first* collective of a communicator therefore hangs its peers inside
    /// NCCL, before this bound applies. Launch with `NCCL_RUNTIME_CONNECT=0` (connect at
    /// init) where that matters.
    pub fn barrier_with_timeout(&self, timeout: Duration) -> Result<()> {
        let _span = tracing::debug_span!("barrier", rank = self.rank).entered();
        self.live()?;
        let p = self.scratch.ptr();
        // SAFETY: 1 u32 in the communicator's own scratch buffer, in and out in place.
        let r = unsafe {
            nccl::ncclAllReduce(
                p as *const _,
                p as *mut _,
                1,
                nccl::ncclDataType_t::ncclUint32,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as _,
            )
        };
        self.check(r, "ncclAllReduce (barrier)")?;
        let r = wait_stream(
            &self.stream,
            timeout,
            self.rank,
            "a barrier (a rank missing?)",
            || self.async_error(),
        );
        if r.is_err() {
            self.stuck.store(true, Ordering::Release);
            self.abort(ABORT_GRACE);
        }
        r
    }

    fn elems_check<T>(
        buf: &DeviceBuffer,
        offset_elems: usize,
        count: usize,
        name: &'static str,
    ) -> Result<u64> {
        let sz = std::mem::size_of::<T>();
        let end = offset_elems
            .checked_add(count)
            .and_then(|e| e.checked_mul(sz))
            .ok_or_else(|| Error::invalid(name, count, "fits in usize"))?;
        if end > buf.len_bytes() {
            return Err(Error::invalid(
                name,
                format!("{count} elements at element offset {offset_elems}"),
                format!("within {} bytes", buf.len_bytes()),
            ));
        }
        Ok(buf.ptr() + (offset_elems * sz) as u64)
    }

    /// Element-wise reduction of `count` elements of every rank's `send` into every rank's
    /// `recv` (may be the same buffer).
    pub fn all_reduce<T: NcclElem>(
        &self,
        send: &DeviceBuffer,
        recv: &DeviceBuffer,
        count: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let s = Self::elems_check::<T>(send, 0, count, "all_reduce send count")?;
        let r = Self::elems_check::<T>(recv, 0, count, "all_reduce recv count")?;
        // SAFETY: both ranges were checked against their allocations.
        unsafe { self.all_reduce_raw(s, r, count, T::DTYPE, op, &self.stream) }
    }

    /// [`Communicator::all_reduce`] on raw device pointers and a caller's stream.
    ///
    /// # Safety
    /// `send`/`recv` must be valid device ranges of `count` elements of `dtype` on this
    /// rank's device, alive until the operation completes on `stream`.
    pub unsafe fn all_reduce_raw(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: nccl::ncclDataType_t,
        op: ReduceOp,
        stream: &CudaStream,
    ) -> Result<()> {
        self.live()?;
        // SAFETY: forwarded from the caller.
        let r = unsafe {
            nccl::ncclAllReduce(
                send as *const _,
                recv as *mut _,
                count,
                dtype,
                op.raw(),
                self.comm,
                stream.cu_stream() as _,
            )
        };
        self.check(r, "ncclAllReduce")
    }

    /// Gathers `count` elements from every rank: rank r's block lands at `recv[r * count..]`.
    pub fn all_gather<T: NcclElem>(
        &self,
        send: &DeviceBuffer,
        recv: &DeviceBuffer,
        count: usize,
    ) -> Result<()> {
        let s = Self::elems_check::<T>(send, 0, count, "all_gather send count")?;
        let total = count.checked_mul(self.world).ok_or_else(|| {
            Error::invalid("all_gather count", count, "count * world fits in usize")
        })?;
        let r = Self::elems_check::<T>(recv, 0, total, "all_gather recv count")?;
        // SAFETY: both ranges were checked against their allocations.
        unsafe { self.all_gather_raw(s, r, count, T::DTYPE, &self.stream) }
    }

    /// [`Communicator::all_gather`] on raw pointers and a caller's stream.
    ///
    /// # Safety
    /// `send` must hold `count` and `recv` `count * world` elements of `dtype` on this
    /// rank's device, alive until the operation completes on `stream`.
    pub unsafe fn all_gather_raw(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: nccl::ncclDataType_t,
        stream: &CudaStream,
    ) -> Result<()> {
        self.live()?;
        // SAFETY: forwarded from the caller.
        let r = unsafe {
            nccl::ncclAllGather(
                send as *const _,
                recv as *mut _,
                count,
                dtype,
                self.comm,
                stream.cu_stream() as _,
            )
        };
        self.check(r, "ncclAllGather")
    }

    /// Gathers a small host byte string from every rank (through the device; bounded wait).
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = mine.len();
        if n == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let send = DeviceBuffer::new(&self.ctx, n)?;
        let recv = DeviceBuffer::new(&self.ctx, n * self.world)?;
        send.upload(&self.stream, 0, mine)?;
        self.all_gather::<u8>(&send, &recv, n)?;
        self.wait(
            &self.stream,
            "an all-gather of host bytes (a rank missing?)",
        )?;
        let all: Vec<u8> = recv.download(&self.stream, 0, n * self.world)?;
        Ok(all.chunks(n).take(self.world).map(|c| c.to_vec()).collect())
    }

    /// Whether the loaded NCCL has `ncclAlltoAll` (2.28+); otherwise all-to-all is
    /// grouped send/recv.
    pub fn has_native_all_to_all() -> bool {
        has_symbol(b"ncclAlltoAll\0")
    }

    /// Equal all-to-all: `count` elements from `send[d * count..]` to rank d, which stores
    /// them at `recv[self.rank * count..]`.
    pub fn all_to_all<T: NcclElem>(
        &self,
        send: &DeviceBuffer,
        recv: &DeviceBuffer,
        count: usize,
    ) -> Result<()> {
        let total = count.checked_mul(self.world).ok_or_else(|| {
            Error::invalid("all_to_all count", count, "count * world fits in usize")
        })?;
        let s = Self::elems_check::<T>(send, 0, total, "all_to_all send count")?;
        let r = Self::elems_check::<T>(recv, 0, total, "all_to_all recv count")?;
        // SAFETY: both ranges were checked against their allocations.
        unsafe { self.all_to_all_raw(s, r, count * std::mem::size_of::<T>(), &self.stream) }
    }

    /// Equal all-to-all of `bytes_per_peer` bytes on raw pointers (native `ncclAlltoAll`
    /// when the library has it, else grouped send/recv).
    ///
    /// # Safety
    /// `send` and `recv` must hold `bytes_per_peer * world` bytes on this rank's device,
    /// alive until the operation completes on `stream`.
    pub unsafe fn all_to_all_raw(
        &self,
        send: u64,
        recv: u64,
        bytes_per_peer: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        self.live()?;
        if Self::has_native_all_to_all() {
            // SAFETY: forwarded from the caller; the symbol exists (checked above).
            let r = unsafe {
                nccl::ncclAlltoAll(
                    send as *const _,
                    recv as *mut _,
                    bytes_per_peer,
                    nccl::ncclDataType_t::ncclUint8,
                    self.comm,
                    stream.cu_stream() as _,
                )
            };
            return self.check(r, "ncclAlltoAll");
        }
        let counts = vec![bytes_per_peer; self.world];
        let offs: Vec<usize> = (0..self.world).map(|i| i * bytes_per_peer).collect();
        // SAFETY: forwarded from the caller.
        unsafe { self.all_to_all_v_raw(send, &counts, &offs, recv, &counts, &offs, stream) }
    }

    /// All-to-all-v with host counts, in bytes: `send_counts[d]` bytes from
    /// `send + send_offsets[d]` to rank d, `recv_counts[s]` bytes from rank s into
    /// `recv + recv_offsets[s]` (grouped send/recv).
    ///
    /// # Safety
    /// Every range must lie inside live device allocations of this rank's device until the
    /// operation completes on `stream`; the counts must match the peers' (NCCL hangs or
    /// fails otherwise, which the bounded wait turns into an error).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_to_all_v_raw(
        &self,
        send: u64,
        send_counts: &[usize],
        send_offsets: &[usize],
        recv: u64,
        recv_counts: &[usize],
        recv_offsets: &[usize],
        stream: &CudaStream,
    ) -> Result<()> {
        self.live()?;
        for (name, v) in [
            ("send_counts", send_counts),
            ("send_offsets", send_offsets),
            ("recv_counts", recv_counts),
            ("recv_offsets", recv_offsets),
        ] {
            if v.len() != self.world {
                return Err(Error::invalid(
                    name,
                    format!("{} entries", v.len()),
                    format!("one per rank ({})", self.world),
                ));
            }
        }
        let _span = tracing::debug_span!("nccl_all_to_all_v", rank = self.rank).entered();
        let ops = (0..self.world)
            .flat_map(|i| {
                // rotate so that traffic spreads over the peers
                let p = (self.rank + i) % self.world;
                [
                    (
                        send + send_offsets[p] as u64,
                        send_counts[p],
                        p as i32,
                        true,
                    ),
                    (
                        recv + recv_offsets[p] as u64,
                        recv_counts[p],
                        p as i32,
                        false,
                    ),
                ]
            })
            .filter(|&(_, bytes, _, _)| bytes > 0);
        // SAFETY: ranges per the caller; every peer is below the world size.
        unsafe { self.grouped_send_recv(ops, stream) }
    }

    /// Issues `(device address, bytes, peer, is_send)` sends and receives of bytes in one NCCL
    /// group on `stream`. The group is always closed; the first failing call's error wins.
    ///
    /// # Safety
    /// Every range must lie inside live device allocations of this rank's device until the
    /// operations complete on `stream`, and every peer must be a rank of this communicator.
    unsafe fn grouped_send_recv(
        &self,
        ops: impl IntoIterator<Item = (u64, usize, i32, bool)>,
        stream: &CudaStream,
    ) -> Result<()> {
        let cs = stream.cu_stream() as nccl::cudaStream_t;
        // SAFETY: group start/end bracket the sends and receives; ranges per the caller.
        self.check(unsafe { nccl::ncclGroupStart() }, "ncclGroupStart")?;
        let mut first_err = None;
        for (ptr, bytes, peer, send) in ops {
            let (r, call) = if send {
                // SAFETY: a live range of `bytes` bytes (caller), a valid peer.
                let r = unsafe {
                    nccl::ncclSend(
                        ptr as *const _,
                        bytes,
                        nccl::ncclDataType_t::ncclUint8,
                        peer,
                        self.comm,
                        cs,
                    )
                };
                (r, "ncclSend")
            } else {
                // SAFETY: as above.
                let r = unsafe {
                    nccl::ncclRecv(
                        ptr as *mut _,
                        bytes,
                        nccl::ncclDataType_t::ncclUint8,
                        peer,
                        self.comm,
                        cs,
                    )
                };
                (r, "ncclRecv")
            };
            if let Err(e) = self.check(r, call) {
                first_err.get_or_insert(e);
            }
        }
        let end = self.check(unsafe { nccl::ncclGroupEnd() }, "ncclGroupEnd");
        match first_err {
            Some(e) => Err(e),
            None => end,
        }
    }

    /// All-to-all-v on [`DeviceBuffer`]s with element counts and offsets (bounds-checked).
    #[allow(clippy::too_many_arguments)]
    pub fn all_to_all_v<T: NcclElem>(
        &self,
        send: &DeviceBuffer,
        send_counts: &[usize],
        send_offsets: &[usize],
        recv: &DeviceBuffer,
        recv_counts: &[usize],
        recv_offsets: &[usize],
    ) -> Result<()> {
        let sz = std::mem::size_of::<T>();
        let to_bytes = |v: &[usize]| v.iter().map(|&x| x * sz).collect::<Vec<_>>();
        for (buf, counts, offs, name) in [
            (send, send_counts, send_offsets, "all_to_all_v send range"),
            (recv, recv_counts, recv_offsets, "all_to_all_v recv range"),
        ] {
            for (c, o) in counts.iter().zip(offs) {
                Self::elems_check::<T>(buf, *o, *c, name)?;
            }
        }
        // SAFETY: every range was checked against its allocation.
        unsafe {
            self.all_to_all_v_raw(
                send.ptr(),
                &to_bytes(send_counts),
                &to_bytes(send_offsets),
                recv.ptr(),
                &to_bytes(recv_counts),
                &to_bytes(recv_offsets),
                &self.stream,
            )
        }
    }

    /// A group of sends and receives, issued together (bounds-checked).
    pub fn group_p2p(&self, ops: &[P2pOp<'_>]) -> Result<()> {
        self.live()?;
        let mut checked = Vec::with_capacity(ops.len());
        for op in ops {
            let (buf, offset, bytes, peer, send) = match *op {
                P2pOp::Send {
                    buf,
                    offset,
                    bytes,
                    peer,
                } => (buf, offset, bytes, peer, true),
                P2pOp::Recv {
                    buf,
                    offset,
                    bytes,
                    peer,
                } => (buf, offset, bytes, peer, false),
            };
            let ptr = Self::elems_check::<u8>(buf, offset, bytes, "p2p byte range")?;
            checked.push((ptr, bytes, self.peer_i32(peer)?, send));
        }
        // SAFETY: every range was checked against its buffer and every peer against the world.
        unsafe { self.grouped_send_recv(checked, &self.stream) }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Let queued work finish (bounded), then release the communicator. Abort (not
        // destroy) never waits for peers' operations, and runs on a helper thread with a
        // bounded wait, so dropping cannot hang on a dead rank.
        if !self.is_aborted() {
            let drained = self.ctx.bind_to_thread().is_ok()
                && wait_stream(&self.stream, self.timeout, self.rank, "drop", || Ok(())).is_ok();
            if !drained {
                self.stuck.store(true, Ordering::Release);
            }
            self.abort(self.timeout.min(Duration::from_secs(10)));
        }
        if self.stuck.load(Ordering::Acquire) {
            // Device work may still be running on the stream: cuMemFree would wait for it.
            tracing::warn!(
                rank = self.rank,
                "communicator dropped after a timeout: its scratch buffer is leaked"
            );
        } else {
            // SAFETY: dropped exactly once, here; the stream drained and NCCL is gone.
            unsafe { ManuallyDrop::drop(&mut self.scratch) };
        }
    }
}

/// Options of [`run_local`].
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Device of each rank; `None` = ranks 0..world on devices 0..world.
    pub devices: Option<Vec<usize>>,
    /// Bound on host-side waits.
    pub timeout: Duration,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            devices: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One process, `world` GPUs: makes the communicators and runs `f` for each rank on its own
/// thread. Returns every rank's result in rank order, or the first rank's error (a panic
/// becomes [`Error::RankFailed`]).
pub fn run_local<R, F>(world: usize, opts: &LocalOptions, f: F) -> Result<Vec<R>>
where
    R: Send,
    F: Fn(Communicator) -> Result<R> + Sync,
{
    let devices: Vec<usize> = match &opts.devices {
        Some(d) => {
            if d.len() != world {
                return Err(Error::invalid(
                    "devices",
                    format!("{} entries", d.len()),
                    format!("one per rank ({world})"),
                ));
            }
            d.clone()
        }
        None => (0..world).collect(),
    };
    let comms = Communicator::init_local(&devices, opts.timeout)?;
    let f = &f;
    let results: Vec<Result<R>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let h = std::thread::Builder::new()
                    .name(format!("comet-rank-{rank}"))
                    .spawn_scoped(s, move || {
                        comm.context().bind_to_thread()?;
                        f(comm)
                    });
                (rank, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(rank, h)| match h {
                Err(e) => Err(Error::RankFailed {
                    rank,
                    message: format!("could not start its thread: {e}"),
                }),
                Ok(h) => h.join().unwrap_or_else(|p| {
                    let message = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into());
                    Err(Error::RankFailed { rank, message })
                }),
            })
            .collect()
    });
    results.into_iter().collect()
}
