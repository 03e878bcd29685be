//! All-to-all-v over NVLink with device-side counts (no host synchronisation): one kernel
//! per call exchanges the counts, pushes every row into its destination's symmetric
//! receive buffer and waits for the peers' rows, with epoch signals and bounded waits.
//! See `comet_a2av_push` in `cuda/p2p.cu` for the protocol.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaStream, PushKernelArg};

use crate::comm::Communicator;
use crate::epoch::{EpochSeq, counter_target};
use crate::error::{Error, Result};
use crate::kernels::{A2AV_MAX_WORLD, COPY_THREADS, CommKernels, cfg};
use crate::memory::{DeviceBuffer, wait_stream};
use crate::signal::{ErrorWord, SignalPad};
use crate::symmetric::SymmetricBuffer;

/// Shape and limits of an [`AllToAllV`].
#[derive(Debug, Clone)]
pub struct A2avConfig {
    /// Bytes per row (a multiple of 16).
    pub row_bytes: usize,
    /// Most rows any rank sends in one call (its send buffer holds at least this many).
    pub send_capacity_rows: usize,
    /// Most rows any rank receives in one call (size of the symmetric receive buffer).
    pub recv_capacity_rows: usize,
    /// Budget of each device-side wait.
    pub timeout: Duration,
    /// Initial value of the signal words (tests start near `u64::MAX` to cross the wrap).
    pub epoch_base: u64,
    /// Grid size; `None` = every multiprocessor.
    pub blocks: Option<u32>,
}

impl A2avConfig {
    /// A configuration with a 10 s wait budget, epoch base 0 and a full-device grid.
    pub fn new(row_bytes: usize, send_capacity_rows: usize, recv_capacity_rows: usize) -> Self {
        A2avConfig {
            row_bytes,
            send_capacity_rows,
            recv_capacity_rows,
            timeout: Duration::from_secs(10),
            epoch_base: 0,
            blocks: None,
        }
    }
}

/// A reusable device-driven all-to-all-v among the ranks of a communicator. The receive
/// buffer is ordered by source rank (like NCCL's grouped send/recv all-to-all-v); the
/// counts and offsets land in [`AllToAllV::recv_layout`] on the device.
///
/// Peers write into this rank's receive buffer as soon as this rank starts the next call,
/// so consume it (in stream order before the next [`AllToAllV::launch`]) first.
#[derive(Debug)]
pub struct AllToAllV {
    kernels: Arc<CommKernels>,
    recv: SymmetricBuffer,
    meta: SymmetricBuffer,
    pad: SignalPad,
    tables: DeviceBuffer,
    layout: DeviceBuffer,
    err: ErrorWord,
    epochs: EpochSeq,
    done_total: u64,
    rank: usize,
    world: usize,
    cfg: A2avConfig,
}

impl AllToAllV {
    /// Collectively sets up buffers, signals and peer tables. Fails with
    /// [`Error::NoPeerAccess`] when some peer has no P2P path (use NCCL then).
    pub fn new(comm: &Communicator, kernels: Arc<CommKernels>, cfg: A2avConfig) -> Result<Self> {
        let world = comm.world_size();
        let rank = comm.rank();
        if world > A2AV_MAX_WORLD {
            return Err(Error::invalid(
                "world size",
                world,
                format!("<= {A2AV_MAX_WORLD} for the device all-to-all-v"),
            ));
        }
        if cfg.row_bytes == 0 || cfg.row_bytes % 16 != 0 {
            return Err(Error::invalid(
                "row_bytes",
                cfg.row_bytes,
                "a positive multiple of 16 bytes",
            ));
        }
        for (name, v) in [
            ("send_capacity_rows", cfg.send_capacity_rows),
            ("recv_capacity_rows", cfg.recv_capacity_rows),
        ] {
            if v == 0 || v >= u32::MAX as usize {
                return Err(Error::invalid(name, v, "1 ..= 2^32 - 2 rows"));
            }
        }
        if cfg.blocks == Some(0) {
            return Err(Error::invalid("blocks", 0, ">= 1"));
        }
        let recv_bytes = cfg
            .recv_capacity_rows
            .checked_mul(cfg.row_bytes)
            .ok_or_else(|| {
                Error::invalid(
                    "recv_capacity_rows",
                    cfg.recv_capacity_rows,
                    "capacity * row_bytes fits in usize",
                )
            })?;
        let recv = SymmetricBuffer::new(comm, recv_bytes)?;
        let meta = SymmetricBuffer::new(comm, 2 * world * world * 4)?;
        let pad = SignalPad::new(comm, 2 * world + 1, cfg.epoch_base)?;
        for b in [&recv, &meta, pad.buffer()] {
            if let Some(&peer) = b.unreachable_peers().first() {
                b.peer_ptr_or_err(peer)?;
            }
        }
        let mut table = recv.pointer_table();
        table.extend(meta.pointer_table());
        table.extend(pad.buffer().pointer_table());
        let stream = comm.stream();
        let tables = DeviceBuffer::from_slice(stream, &table)?;
        let layout = DeviceBuffer::new(comm.context(), (2 * world + 1) * 4)?;
        layout.fill_bytes(stream, 0)?;
        let err = ErrorWord::new(stream)?;
        comm.synchronize()?;
        Ok(AllToAllV {
            kernels,
            recv,
            meta,
            epochs: pad.epochs(),
            done_total: cfg.epoch_base,
            pad,
            tables,
            layout,
            err,
            rank,
            world,
            cfg,
        })
    }

    /// The symmetric receive buffer (rows by source rank, then in send order).
    pub fn recv_buffer(&self) -> &SymmetricBuffer {
        &self.recv
    }

    /// Device `u32[2W + 1]`: rows received from each source, then the exclusive offsets
    /// (rows) of each source's block and the total.
    pub fn recv_layout(&self) -> &DeviceBuffer {
        &self.layout
    }

    /// Host copy of the layout: (counts per source, offsets incl. total).
    pub fn read_recv_layout(&self, stream: &CudaStream) -> Result<(Vec<u32>, Vec<u32>)> {
        let v: Vec<u32> = self.layout.download(stream, 0, 2 * self.world + 1)?;
        Ok((v[..self.world].to_vec(), v[self.world..].to_vec()))
    }

    /// The configuration.
    pub fn config(&self) -> &A2avConfig {
        &self.cfg
    }

    /// The last epoch used.
    pub fn epoch(&self) -> u64 {
        self.epochs.current()
    }

    /// Queues one all-to-all-v on `stream`: `send` holds the rows grouped by destination in
    /// rank order (at least `send_capacity_rows` rows), `send_counts` is a device `u32[W]`
    /// of rows per destination. No host synchronisation; check with [`AllToAllV::finish`].
    pub fn launch(
        &mut self,
        stream: &CudaStream,
        send: &DeviceBuffer,
        send_counts: &DeviceBuffer,
    ) -> Result<()> {
        let need = self.cfg.send_capacity_rows * self.cfg.row_bytes;
        if send.len_bytes() < need {
            return Err(Error::invalid(
                "send buffer",
                format!("{} bytes", send.len_bytes()),
                format!(">= send_capacity_rows * row_bytes = {need} bytes"),
            ));
        }
        if send_counts.len_bytes() < 4 * self.world {
            return Err(Error::invalid(
                "send_counts",
                format!("{} bytes", send_counts.len_bytes()),
                format!(">= {} bytes (u32 per rank)", 4 * self.world),
            ));
        }
        // SAFETY: both buffers are live allocations of the checked sizes.
        unsafe { self.launch_raw(stream, send.ptr(), send_counts.ptr()) }
    }

    /// [`AllToAllV::launch`] on raw device addresses.
    ///
    /// # Safety
    /// `send` must hold `send_capacity_rows * row_bytes` bytes and `send_counts` `W` u32
    /// on this rank's device, 16-byte aligned, unchanged until the kernel completes.
    pub unsafe fn launch_raw(
        &mut self,
        stream: &CudaStream,
        send: u64,
        send_counts: u64,
    ) -> Result<()> {
        let _span = tracing::debug_span!("a2av_push", rank = self.rank).entered();
        if send % 16 != 0 {
            return Err(Error::invalid(
                "send address",
                format!("{send:#x}"),
                "16-byte aligned",
            ));
        }
        let grid = self
            .cfg
            .blocks
            .unwrap_or(self.kernels.max_a2av_blocks())
            .min(self.kernels.max_a2av_blocks())
            .max(1);
        let mut epochs = self.epochs;
        let epoch = epochs.next();
        let done_target = counter_target(self.done_total, 1, grid as u64);
        let tables = self.tables.ptr();
        let my_meta = self.meta.local_ptr();
        let my_sig = self.pad.buffer().local_ptr();
        let layout = self.layout.ptr();
        let err = self.err.ptr();
        let rank = self.rank as u32;
        let world = self.world as u32;
        let row_vecs = (self.cfg.row_bytes / 16) as u64;
        let send_cap = self.cfg.send_capacity_rows as u64;
        let recv_cap = self.cfg.recv_capacity_rows as u64;
        let timeout_ns = u64::try_from(self.cfg.timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut b = stream.launch_builder(self.kernels.a2av_function());
        b.arg(&send)
            .arg(&send_counts)
            .arg(&tables)
            .arg(&my_meta)
            .arg(&my_sig)
            .arg(&layout)
            .arg(&err)
            .arg(&rank)
            .arg(&world)
            .arg(&row_vecs)
            .arg(&send_cap)
            .arg(&recv_cap)
            .arg(&epoch)
            .arg(&done_target)
            .arg(&timeout_ns);
        // SAFETY: arguments match comet_a2av_push's signature; every table entry is a
        // mapped symmetric address (checked in `new`); `send`/`send_counts` per the caller.
        let launched = unsafe { b.launch(cfg(grid, COPY_THREADS)) };
        // A failed launch uses no epoch, so the ranks stay in step.
        launched?;
        self.epochs = epochs;
        self.done_total = done_target;
        Ok(())
    }

    /// Waits for the queued calls on `stream` (bounded by a few wait budgets) and turns a
    /// device error (a peer that never signalled, a capacity overflow) into an error.
    pub fn finish(&self, stream: &CudaStream) -> Result<()> {
        let bound = self.cfg.timeout * 4 + Duration::from_secs(5);
        wait_stream(stream, bound, self.rank, "the device all-to-all-v", || {
            Ok(())
        })?;
        self.err.take(stream)
    }
}
