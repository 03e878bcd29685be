//! Host side of the device signals: the device error word and signal pads in symmetric
//! memory. The device side is `cuda/signal.cuh` ([`crate::sources::SIGNAL_HEADER`]).

use cudarc::driver::CudaStream;

use crate::comm::Communicator;
use crate::epoch::EpochSeq;
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::symmetric::SymmetricBuffer;

/// `comet_error_t::code`: no error.
pub const ERR_NONE: u32 = 0;
/// `comet_error_t::code`: a bounded wait expired.
pub const ERR_SIGNAL_TIMEOUT: u32 = 1;
/// `comet_error_t::code`: rows beyond a buffer's capacity.
pub const ERR_CAPACITY: u32 = 2;
/// `comet_error_t::peer` when the releasing rank is unknown.
pub const NO_PEER: u32 = u32::MAX;

/// Host mirror of `comet_error_t` (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DeviceErrorRecord {
    /// `ERR_*` code; 0 = none.
    pub code: u32,
    /// Rank that detected it.
    pub rank: u32,
    /// Rank expected to release the signal, or [`NO_PEER`].
    pub peer: u32,
    /// Signal index.
    pub signal: u32,
    /// Epoch waited for (capacity for [`ERR_CAPACITY`]).
    pub expected: u64,
    /// Last value seen (rows requested for [`ERR_CAPACITY`]).
    pub seen: u64,
}

impl DeviceErrorRecord {
    /// The error this record stands for (`Ok` when `code` is 0).
    pub fn to_result(&self) -> Result<()> {
        let rank = self.rank as usize;
        let peer = (self.peer != NO_PEER).then_some(self.peer as usize);
        match self.code {
            ERR_NONE => Ok(()),
            ERR_SIGNAL_TIMEOUT => Err(Error::SignalTimeout {
                rank,
                peer,
                signal: self.signal,
                expected: self.expected,
                seen: self.seen,
            }),
            ERR_CAPACITY => Err(Error::CapacityExceeded {
                rank,
                peer: peer.unwrap_or(rank),
                requested: self.seen,
                capacity: self.expected,
            }),
            code => Err(Error::UnknownDeviceError { rank, code }),
        }
    }
}

/// A device error word (one `comet_error_t`) that kernels fill on a failed wait.
#[derive(Debug)]
pub struct ErrorWord {
    buf: DeviceBuffer,
}

impl ErrorWord {
    /// A cleared error word on `stream`'s device.
    pub fn new(stream: &CudaStream) -> Result<Self> {
        let buf = DeviceBuffer::new(stream.context(), std::mem::size_of::<DeviceErrorRecord>())?;
        buf.upload(stream, 0, &[DeviceErrorRecord::zeroed_record()])?;
        Ok(ErrorWord { buf })
    }

    /// Device address (pass as `comet_error_t*`).
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// Reads the word after the work queued on `stream` (the caller makes sure that work is
    /// finished or will finish: every device wait is bounded). A set word is cleared and
    /// returned as its error.
    pub fn take(&self, stream: &CudaStream) -> Result<()> {
        let rec: Vec<DeviceErrorRecord> = self.buf.download(stream, 0, 1)?;
        let rec = rec
            .first()
            .copied()
            .unwrap_or_else(DeviceErrorRecord::zeroed_record);
        if rec.code != ERR_NONE {
            self.buf
                .upload(stream, 0, &[DeviceErrorRecord::zeroed_record()])?;
        }
        rec.to_result()
    }
}

impl DeviceErrorRecord {
    fn zeroed_record() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

/// `n` signal words (`u64`) per rank in symmetric memory, initialised once to an epoch base
/// and never zeroed again; see [`crate::epoch`].
#[derive(Debug)]
pub struct SignalPad {
    buf: SymmetricBuffer,
    n: usize,
    base: u64,
}

impl SignalPad {
    /// Collectively allocates `n` signals per rank, all set to `base`. Ends with a barrier.
    pub fn new(comm: &Communicator, n: usize, base: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid("signals", 0, ">= 1"));
        }
        let bytes = n
            .checked_mul(8)
            .ok_or_else(|| Error::invalid("signals", n, "n * 8 fits in usize"))?;
        // round up to 16 bytes so that neighbours of 16-byte accesses never share it
        let buf = SymmetricBuffer::new(comm, bytes.div_ceil(16) * 16)?;
        buf.fill_local_u64(comm.stream(), base)?;
        comm.barrier()?;
        Ok(SignalPad { buf, n, base })
    }

    /// Signals per rank.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Never true (a pad has at least one signal).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    /// The initial value of every word.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// A fresh epoch sequence starting at this pad's base.
    pub fn epochs(&self) -> EpochSeq {
        EpochSeq::new(self.base)
    }
    /// The underlying symmetric buffer.
    pub fn buffer(&self) -> &SymmetricBuffer {
        &self.buf
    }

    fn id_check(&self, id: usize) -> Result<u64> {
        if id >= self.n {
            return Err(Error::invalid(
                "signal id",
                id,
                format!("< {} signals", self.n),
            ));
        }
        Ok(8 * id as u64)
    }

    /// Address of this rank's signal `id`.
    pub fn local_ptr(&self, id: usize) -> Result<u64> {
        Ok(self.buf.local_ptr() + self.id_check(id)?)
    }

    /// Address of `peer`'s signal `id` as seen from this rank.
    pub fn peer_ptr(&self, peer: usize, id: usize) -> Result<u64> {
        let off = self.id_check(id)?;
        Ok(self.buf.peer_ptr_or_err(peer)? + off)
    }

    /// Reads this rank's signals (host copy, after the work queued on `stream`).
    pub fn read_local(&self, stream: &CudaStream) -> Result<Vec<u64>> {
        self.buf.local().download(stream, 0, self.n)
    }
}
