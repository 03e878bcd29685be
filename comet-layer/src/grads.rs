//! Lazily zeroed weight gradients: which of the layer's f32 gradients are *logically* zero
//! ([`GradsZero`]) and, per backward, which ones that backward has written ([`Writes`]).
//!
//! `MoeLayer::zero_grad` does not memset the gradients (DeepSeek-V3: ~30 GB of `dW0` + `dW1`
//! per rank, ~10 ms of memset, after which every backward would read and write all of it
//! again to accumulate). It only marks them logically zero; the first weight-gradient GEMM
//! of each tensor in the next backward then *overwrites* it (f32 `C = result`, accumulate
//! off) and the later ones in that backward (the pipelined strategy's chunks 1..) add to it.
//! An overwrite writes every element of the tensor, experts without rows included — both
//! engines store zeros for a group with an empty reduction when not accumulating:
//! - the Hopper engine (`comet_kernels::sm90`, f32 out, `ACCUM` off): the K-grouped
//!   scheduler gives every expert all its output tiles whatever its rows
//!   (`num_experts · m_tiles · n_tiles`, `cuda/sm90/scheduler.cuh`); a tile with `k_len = 0`
//!   runs no k-block and zeroes its accumulators (`consumer_mainloop`, `mainloop.cuh`), and
//!   `epilogue_store_f32` (`epilogue.cuh`) skips the store only with `ACCUM`, so it stores
//!   the zeros;
//! - the portable engine (`comet_kernels::gemm`, `Engine::Portable`, f32 C): grouped-K
//!   schedules `groups · m_tiles · n_tiles` tiles (`Schedule::init`, `cuda/tile_engine.cuh`),
//!   `mainloop` zeroes `acc` and runs `ceil(k_len / BK) = 0` k-tiles for an empty group, and
//!   the epilogue stores every in-bounds element (reading the old value only when
//!   accumulating): zeros, as the engine's header says ("groups with no rows produce zeros
//!   (or leave C unchanged when accumulating)"). The router gradient (one group over all
//!   tokens) is a full store too.
//!
//! So no engine needs a fallback to memset + accumulate. Readers of the gradients (the host
//! copy, the router-gradient all-reduce) materialise a logically zero tensor first (a memset),
//! so the device buffers are only ever read when they hold the gradients.

/// Index of the router-weight gradient `dWr [1, E, H]` in `MoeLayer::grads`.
pub(crate) const DWR: usize = 0;
/// Index of `dW0 [L, n0, H]`.
pub(crate) const DW0: usize = 1;
/// Index of `dW1 [L, H, F]`.
pub(crate) const DW1: usize = 2;

/// Which of the three gradients (`dWr`, `dW0`, `dW1`) are logically zero.
///
/// Invariant: where `is_zero(i)`, gradient `i` is zero whatever its device buffer holds
/// (stale values of earlier backwards, partial writes of a failed one, or uninitialised
/// memory after construction); nothing may read that buffer before it is either
/// overwritten entirely by a backward (see [`Writes::accumulate`]) or materialised with a
/// memset (then [`GradsZero::materialised`]). Where not, the buffer holds the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GradsZero {
    zero: [bool; 3],
}

impl Default for GradsZero {
    /// All logically zero (a new layer).
    fn default() -> Self {
        GradsZero { zero: [true; 3] }
    }
}

impl GradsZero {
    /// Marks every gradient logically zero (`zero_grad`: O(1), no memset).
    pub(crate) fn set_all(&mut self) {
        self.zero = [true; 3];
    }

    /// Whether gradient `i` is logically zero (its buffer is stale).
    pub(crate) fn is_zero(&self, i: usize) -> bool {
        self.zero[i]
    }

    /// Gradient `i`'s buffer was set to zero (a memset enqueued before any reader): it
    /// holds the gradient again.
    pub(crate) fn materialised(&mut self, i: usize) {
        self.zero[i] = false;
    }

    /// The bookkeeping of a backward starting now.
    pub(crate) fn begin(&self) -> Writes {
        Writes {
            overwrite: self.zero,
            written: [false; 3],
        }
    }

    /// A backward finished without error: what it wrote holds the gradient. Never called
    /// for a failed backward, so a tensor it wrote while logically zero stays logically zero
    /// (the next backward overwrites it again, a reader zeroes it); a tensor it did not
    /// write keeps its state (a rank that received no rows leaves `dW0`, `dW1` logically
    /// zero rather than memsetting them).
    pub(crate) fn commit(&mut self, w: &Writes) {
        for i in 0..3 {
            if w.written[i] {
                self.zero[i] = false;
            }
        }
    }
}

/// The gradient writes of one backward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Writes {
    /// Logically zero when the backward began: its first write overwrites.
    overwrite: [bool; 3],
    written: [bool; 3],
}

impl Writes {
    /// Whether the GEMM about to write gradient `i` must accumulate (`false`: it overwrites
    /// the whole tensor, its first write in this backward of a logically zero tensor), and
    /// records the write.
    pub(crate) fn accumulate(&mut self, i: usize) -> bool {
        let acc = !self.overwrite[i] || self.written[i];
        self.written[i] = true;
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_layer_is_logically_zero_and_its_first_backward_overwrites_once() {
        let mut z = GradsZero::default();
        assert!((0..3).all(|i| z.is_zero(i)));
        let mut w = z.begin();
        // Pipelined, 3 chunks: dW1 and dW0 per chunk, then dWr once.
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push((w.accumulate(DW1), w.accumulate(DW0)));
        }
        assert_eq!(seen, vec![(false, false), (true, true), (true, true)]);
        assert!(!w.accumulate(DWR));
        z.commit(&w);
        assert!((0..3).all(|i| !z.is_zero(i)));
        // The next backward without zero_grad accumulates everywhere.
        let mut w = z.begin();
        assert!(w.accumulate(DW1) && w.accumulate(DW0) && w.accumulate(DWR));
        z.commit(&w);
        assert!((0..3).all(|i| !z.is_zero(i)));
    }

    #[test]
    fn zero_grad_makes_the_next_backward_overwrite_again() {
        let mut z = GradsZero::default();
        let mut w = z.begin();
        w.accumulate(DW0);
        z.commit(&w);
        assert!(!z.is_zero(DW0) && z.is_zero(DW1) && z.is_zero(DWR));
        z.set_all();
        assert!((0..3).all(|i| z.is_zero(i)));
        let mut w = z.begin();
        assert!(!w.accumulate(DW0));
        assert!(w.accumulate(DW0));
    }

    #[test]
    fn a_chunk_without_rows_leaves_the_overwrite_to_the_next_one() {
        // Chunk 0 received no rows (no expert GEMM), chunk 1 did: its write overwrites.
        let mut z = GradsZero::default();
        let mut w = z.begin();
        assert!(!w.accumulate(DW1));
        assert!(!w.accumulate(DW0));
        assert!(w.accumulate(DW1));
        z.commit(&w);
        assert!(!z.is_zero(DW1));
    }

    #[test]
    fn tensors_a_successful_backward_did_not_write_stay_logically_zero() {
        // A rank that received no rows in any chunk writes only dWr.
        let mut z = GradsZero::default();
        let mut w = z.begin();
        assert!(!w.accumulate(DWR));
        z.commit(&w);
        assert!(!z.is_zero(DWR));
        assert!(z.is_zero(DW0) && z.is_zero(DW1));
        // Its next backward, with rows, overwrites dW0 and dW1 and accumulates dWr.
        let mut w = z.begin();
        assert!(!w.accumulate(DW1) && !w.accumulate(DW0) && w.accumulate(DWR));
    }

    #[test]
    fn a_failed_backward_leaves_the_gradients_logically_zero() {
        let mut z = GradsZero::default();
        // It wrote dW1 and dW0 of chunk 0 (partial results), then failed: no commit.
        {
            let mut w = z.begin();
            assert!(!w.accumulate(DW1));
            assert!(!w.accumulate(DW0));
        }
        assert!((0..3).all(|i| z.is_zero(i)));
        // The next backward overwrites every tensor again, the ones the failed one wrote too.
        let mut w = z.begin();
        assert!(!w.accumulate(DW1) && !w.accumulate(DW0) && !w.accumulate(DWR));
        z.commit(&w);
        assert!((0..3).all(|i| !z.is_zero(i)));
        // A failed backward while accumulating changes no state either (it accumulates).
        {
            let mut w = z.begin();
            assert!(w.accumulate(DW1));
        }
        assert!((0..3).all(|i| !z.is_zero(i)));
    }

    #[test]
    fn a_materialised_tensor_accumulates() {
        let mut z = GradsZero::default();
        z.materialised(DWR);
        assert!(!z.is_zero(DWR) && z.is_zero(DW0));
        let mut w = z.begin();
        assert!(w.accumulate(DWR));
        assert!(!w.accumulate(DW0));
    }
}
