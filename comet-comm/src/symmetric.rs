//! Symmetric buffers: one equal-sized `cuMemAlloc` region per rank, with pointers to every
//! peer's region.
//!
//! Made collectively: each rank allocates, then the ranks all-gather a record (process id,
//! a per-process nonce, PCI bus id, base address, context handle, CUDA IPC handle) through
//! the communicator. For each peer:
//! * same process (one thread per rank): peer access is enabled from this rank's context
//!   to the peer's (`cuCtxEnablePeerAccess`; every rank does it, so both ways) and the
//!   peer's own address is used;
//! * another process: the peer's IPC handle is opened (`cuIpcOpenMemHandle`);
//! * no P2P path (`cuDeviceCanAccessPeer` = 0, or the peer's GPU is not visible here): the
//!   peer is listed by [`SymmetricBuffer::unreachable_peers`] and [`SymmetricBuffer::peer_ptr`]
//!   gives `None`, so the caller can fall back to NCCL for that pair.
//!
//! Drop order: the IPC mappings of peers' memory are closed first, then this rank's own
//! allocation is freed, then the context reference is released. Peers may still be using
//! this rank's memory when it is dropped: call [`SymmetricBuffer::free`] (a barrier, then
//! drop) when that can be the case.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaStream, sys};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::memory::{DeviceBuffer, check};

const RECORD_MAGIC: u32 = 0x434d_5359; // "CMSY"
const RECORD_LEN: usize = 192;

/// How this rank reaches a peer's region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPath {
    /// The region is this rank's own.
    Local,
    /// Same process, peer access enabled between the two contexts.
    PeerAccess,
    /// Another process, through a CUDA IPC mapping.
    Ipc,
    /// No load/store path; the reason says why.
    Unreachable(String),
}

/// This process's identity: (pid, random nonce), so that ranks can tell whether a peer
/// lives in the same process (same address space) even across hosts.
fn process_identity() -> (u32, u64) {
    static NONCE: OnceLock<u64> = OnceLock::new();
    let nonce = *NONCE.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        h.finish()
    });
    (std::process::id(), nonce)
}

#[derive(Debug, Clone)]
struct Record {
    rank: u32,
    pid: u32,
    nonce: u64,
    bytes: u64,
    base: u64,
    ctx: u64,
    pci: [u8; 32],
    ipc_ok: bool,
    ipc: [u8; 64],
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(RECORD_LEN);
        b.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.rank.to_le_bytes());
        b.extend_from_slice(&self.pid.to_le_bytes());
        b.extend_from_slice(&u32::from(self.ipc_ok).to_le_bytes());
        for v in [self.nonce, self.bytes, self.base, self.ctx] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.pci);
        b.extend_from_slice(&self.ipc);
        b.resize(RECORD_LEN, 0);
        b
    }

    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != RECORD_LEN {
            return Err(Error::Protocol(format!(
                "symmetric record of {} bytes, expected {RECORD_LEN}",
                b.len()
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(0) != RECORD_MAGIC {
            return Err(Error::Protocol(
                "symmetric record with a bad magic number".into(),
            ));
        }
        let mut pci = [0u8; 32];
        pci.copy_from_slice(&b[48..80]);
        let mut ipc = [0u8; 64];
        ipc.copy_from_slice(&b[80..144]);
        Ok(Record {
            rank: u32_at(4),
            pid: u32_at(8),
            ipc_ok: u32_at(12) != 0,
            nonce: u64_at(16),
            bytes: u64_at(24),
            base: u64_at(32),
            ctx: u64_at(40),
            pci,
            ipc,
        })
    }

    fn pci_str(&self) -> String {
        let end = self
            .pci
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(self.pci.len());
        String::from_utf8_lossy(&self.pci[..end]).into_owned()
    }
}

/// PCI bus id of a device (e.g. `0000:18:00.0`).
fn pci_bus_id(dev: sys::CUdevice) -> Result<[u8; 32]> {
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: buffer of the stated length.
    check(
        unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), 32, dev) },
        "cuDeviceGetPCIBusId",
    )?;
    let mut out = [0u8; 32];
    for (o, c) in out.iter_mut().zip(buf) {
        *o = c as u8;
    }
    out[31] = 0;
    Ok(out)
}

/// Equal-sized regions on every rank with peer pointers. See the module docs.
#[derive(Debug)]
pub struct SymmetricBuffer {
    rank: usize,
    bytes: usize,
    /// Address of each rank's region as seen from this rank (`None`: unreachable).
    ptrs: Vec<Option<u64>>,
    paths: Vec<PeerPath>,
    /// IPC mappings to close on drop (before `local` is freed).
    ipc_mapped: Vec<u64>,
    local: DeviceBuffer,
    ctx: Arc<CudaContext>,
}

// SAFETY: addresses and a context; device memory can be used from any thread that binds it.
unsafe impl Send for SymmetricBuffer {}
// SAFETY: `&SymmetricBuffer` exposes addresses and copies only.
unsafe impl Sync for SymmetricBuffer {}

impl SymmetricBuffer {
    /// Collectively allocates `bytes` on every rank (every rank must pass the same size)
    /// and maps the peers' regions. Ends with a barrier, so peers may be used at once.
    pub fn new(comm: &Communicator, bytes: usize) -> Result<Self> {
        let _span = tracing::debug_span!("symmetric_alloc", rank = comm.rank(), bytes).entered();
        if bytes == 0 {
            return Err(Error::invalid("bytes", 0, "> 0"));
        }
        let ctx = comm.context().clone();
        ctx.bind_to_thread()?;
        let local = DeviceBuffer::new(&ctx, bytes)?;
        let my_dev = ctx.cu_device();
        let (pid, nonce) = process_identity();
        let mut ipc = [0u8; 64];
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `local` is a cuMemAlloc base address in the current context.
        let ipc_ok = unsafe { sys::cuIpcGetMemHandle(&mut handle, local.ptr()) }
            == sys::CUresult::CUDA_SUCCESS;
        for (o, c) in ipc.iter_mut().zip(handle.reserved) {
            *o = c as u8;
        }
        let mine = Record {
            rank: comm.rank() as u32,
            pid,
            nonce,
            bytes: bytes as u64,
            base: local.ptr(),
            ctx: ctx.cu_ctx() as u64,
            pci: pci_bus_id(my_dev)?,
            ipc_ok,
            ipc,
        };
        let all = comm.all_gather_bytes(&mine.encode())?;
        let records = all
            .iter()
            .map(|b| Record::decode(b))
            .collect::<Result<Vec<_>>>()?;
        for (r, rec) in records.iter().enumerate() {
            if rec.bytes != bytes as u64 {
                return Err(Error::SymmetricMismatch {
                    rank: r,
                    reference_rank: comm.rank(),
                    expected: bytes as u64,
                    got: rec.bytes,
                });
            }
            if rec.rank as usize != r {
                return Err(Error::Protocol(format!(
                    "symmetric record {r} claims rank {}",
                    rec.rank
                )));
            }
        }
        let mut buf = SymmetricBuffer {
            rank: comm.rank(),
            bytes,
            ptrs: vec![None; records.len()],
            paths: vec![PeerPath::Unreachable("not mapped".into()); records.len()],
            ipc_mapped: Vec::new(),
            local,
            ctx: ctx.clone(),
        };
        for (r, rec) in records.iter().enumerate() {
            let (ptr, path) = if r == comm.rank() {
                (Some(buf.local.ptr()), PeerPath::Local)
            } else {
                buf.map_peer(rec, my_dev, pid, nonce)?
            };
            buf.ptrs[r] = ptr;
            buf.paths[r] = path;
        }
        for (r, p) in buf.paths.iter().enumerate() {
            if let PeerPath::Unreachable(why) = p {
                tracing::warn!(rank = comm.rank(), peer = r, "no P2P path: {why}");
            }
        }
        comm.barrier()?;
        Ok(buf)
    }

    fn map_peer(
        &mut self,
        rec: &Record,
        my_dev: sys::CUdevice,
        pid: u32,
        nonce: u64,
    ) -> Result<(Option<u64>, PeerPath)> {
        let pci = rec.pci_str();
        let mut cpci = rec.pci;
        cpci[31] = 0;
        let mut peer_dev: sys::CUdevice = 0;
        // SAFETY: NUL-terminated bus id string; valid out-pointer.
        let found = unsafe {
            sys::cuDeviceGetByPCIBusId(&mut peer_dev, cpci.as_ptr() as *const std::ffi::c_char)
        };
        if found != sys::CUresult::CUDA_SUCCESS {
            return Ok((
                None,
                PeerPath::Unreachable(format!(
                    "the peer's GPU {pci} is not visible in this process (CUDA_VISIBLE_DEVICES?)"
                )),
            ));
        }
        if peer_dev != my_dev {
            let mut can = 0;
            // SAFETY: two valid device handles, valid out-pointer.
            check(
                unsafe { sys::cuDeviceCanAccessPeer(&mut can, my_dev, peer_dev) },
                "cuDeviceCanAccessPeer",
            )?;
            if can == 0 {
                return Ok((
                    None,
                    PeerPath::Unreachable(format!(
                        "cuDeviceCanAccessPeer says no P2P to GPU {pci}"
                    )),
                ));
            }
        }
        self.ctx.bind_to_thread()?;
        if rec.pid == pid && rec.nonce == nonce {
            // Same process: the peer's address is valid here once peer access is on.
            if peer_dev != my_dev {
                // SAFETY: the record's context handle belongs to this process (same pid and
                // nonce) and the peer's communicator, which keeps it alive, is in use.
                let r = unsafe { sys::cuCtxEnablePeerAccess(rec.ctx as sys::CUcontext, 0) };
                if r != sys::CUresult::CUDA_SUCCESS
                    && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
                {
                    check(r, "cuCtxEnablePeerAccess")?;
                }
            }
            return Ok((Some(rec.base), PeerPath::PeerAccess));
        }
        if !rec.ipc_ok {
            return Ok((
                None,
                PeerPath::Unreachable("the peer could not export a CUDA IPC handle".into()),
            ));
        }
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        for (h, b) in handle.reserved.iter_mut().zip(rec.ipc) {
            *h = b as std::ffi::c_char;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the handle was exported by another process for a live allocation (it is
        // kept until that rank's barrier-protected free); valid out-pointer.
        check(
            unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &mut ptr,
                    handle,
                    sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            },
            "cuIpcOpenMemHandle",
        )?;
        self.ipc_mapped.push(ptr);
        Ok((Some(ptr), PeerPath::Ipc))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Size of each rank's region in bytes.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.ptrs.len()
    }
    /// This rank's own region.
    pub fn local(&self) -> &DeviceBuffer {
        &self.local
    }
    /// Address of this rank's own region.
    pub fn local_ptr(&self) -> u64 {
        self.local.ptr()
    }
    /// Address of `peer`'s region as seen from this rank, or `None` without a P2P path.
    pub fn peer_ptr(&self, peer: usize) -> Option<u64> {
        self.ptrs.get(peer).copied().flatten()
    }
    /// Like [`SymmetricBuffer::peer_ptr`], as an error naming the reason.
    pub fn peer_ptr_or_err(&self, peer: usize) -> Result<u64> {
        match (self.ptrs.get(peer), self.paths.get(peer)) {
            (Some(Some(p)), _) => Ok(*p),
            (Some(None), Some(PeerPath::Unreachable(why))) => Err(Error::NoPeerAccess {
                rank: self.rank,
                peer,
                reason: why.clone(),
            }),
            _ => Err(Error::invalid(
                "peer",
                peer,
                format!("< world size {}", self.ptrs.len()),
            )),
        }
    }
    /// How each rank's region is reached.
    pub fn paths(&self) -> &[PeerPath] {
        &self.paths
    }
    /// Ranks whose region this rank cannot load from or store to.
    pub fn unreachable_peers(&self) -> Vec<usize> {
        self.ptrs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_none())
            .map(|(r, _)| r)
            .collect()
    }
    /// Every rank's address in rank order (0 for unreachable ones), e.g. for a device table.
    pub fn pointer_table(&self) -> Vec<u64> {
        self.ptrs.iter().map(|p| p.unwrap_or(0)).collect()
    }

    /// Checks that `[offset, offset + len)` lies inside a region.
    pub fn range_check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(Error::invalid(
                "symmetric byte range",
                format!("{offset}..{}", offset.saturating_add(len)),
                format!("within {} bytes", self.bytes),
            )),
        }
    }

    /// Fills this rank's own region with the repeated `u64` `value` (synchronous).
    pub fn fill_local_u64(&self, stream: &CudaStream, value: u64) -> Result<()> {
        let n = self.bytes / 8;
        self.local.upload(stream, 0, &vec![value; n])
    }

    /// Barrier, then drop: no peer can still be reading or writing this rank's region.
    pub fn free(self, comm: &Communicator) -> Result<()> {
        comm.synchronize()?;
        comm.barrier()?;
        drop(self);
        Ok(())
    }
}

impl Drop for SymmetricBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        for p in self.ipc_mapped.drain(..) {
            // SAFETY: `p` was returned by cuIpcOpenMemHandle in this context, closed once.
            let r = unsafe { sys::cuIpcCloseMemHandle(p) };
            if r != sys::CUresult::CUDA_SUCCESS {
                tracing::warn!("cuIpcCloseMemHandle failed: {r:?}");
            }
        }
        // `local` (cuMemFree) and then `ctx` drop after this, in field order.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let mut pci = [0u8; 32];
        pci[..12].copy_from_slice(b"0000:18:00.0");
        let r = Record {
            rank: 3,
            pid: 4242,
            nonce: 0xdead_beef_1234_5678,
            bytes: 1 << 30,
            base: 0x7f00_0000_0000,
            ctx: 0x5555_0000,
            pci,
            ipc_ok: true,
            ipc: [7u8; 64],
        };
        let b = r.encode();
        assert_eq!(b.len(), RECORD_LEN);
        let d = Record::decode(&b).unwrap();
        assert_eq!(
            (d.rank, d.pid, d.nonce, d.bytes, d.base, d.ctx, d.ipc_ok),
            (3, 4242, r.nonce, 1 << 30, r.base, r.ctx, true)
        );
        assert_eq!(d.pci_str(), "0000:18:00.0");
        assert_eq!(d.ipc, [7u8; 64]);
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(Record::decode(&bad), Err(Error::Protocol(_))));
        assert!(matches!(Record::decode(&b[..10]), Err(Error::Protocol(_))));
    }

    #[test]
    fn process_identity_is_stable() {
        assert_eq!(process_identity(), process_identity());
        assert_eq!(process_identity().0, std::process::id());
    }
}
