//! The routing plan on the device (comet-core's definitions), computed without host
//! synchronisation from this rank's top-k ids and the `[W, E]` counts matrix of all ranks.
//!
//! Single GPU: [`RoutingPlan::build_local`] (counts, then the plan with `W = 1`).
//! Expert parallel: [`RoutingPlan::count`] gives this rank's counts `[E]`; the communicator
//! all-gathers them into `[W, E]`; [`RoutingPlan::build`] then derives the layouts.

use crate::buffer::{DType, DeviceTensor};
use crate::cache::Defines;
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::sources;

/// Most experts the plan kernel handles (its shared memory grows with `36 · E` ints).
pub const MAX_PLAN_EXPERTS: usize = 1024;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CountParams {
    ids: u64,
    counts: u64,
    status: u64,
    slots: i64,
    experts: i64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PlanParams {
    counts: u64,
    ids: u64,
    expert_offsets: u64,
    seg_offsets: u64,
    send_offsets: u64,
    send_rank_counts: u64,
    recv_rank_counts: u64,
    scatter_rank: u64,
    scatter_row: u64,
    send_row: u64,
    status: u64,
    slots: i64,
    experts: i64,
    world: i64,
    rank: i64,
}

/// Checks the plan's sizes.
pub fn check_plan(
    tokens: usize,
    top_k: usize,
    experts: usize,
    world: usize,
    rank: usize,
) -> Result<()> {
    if experts == 0 || experts > MAX_PLAN_EXPERTS {
        return Err(Error::limit(
            "experts",
            experts,
            format!("1..={MAX_PLAN_EXPERTS}"),
        ));
    }
    if world == 0 || experts % world != 0 {
        return Err(Error::Alignment {
            what: "experts".into(),
            value: experts,
            multiple: world.max(1),
            why: "experts are split evenly over the ranks",
        });
    }
    if rank >= world {
        return Err(Error::limit("rank", rank, format!("< world size {world}")));
    }
    if top_k == 0 || top_k > experts {
        return Err(Error::limit("top_k", top_k, format!("1..={experts}")));
    }
    let slots = tokens.saturating_mul(top_k);
    if slots > i32::MAX as usize {
        return Err(Error::limit(
            "tokens * top_k",
            slots,
            format!("{}", i32::MAX),
        ));
    }
    Ok(())
}

/// Shared memory of the plan kernel for `experts`.
pub fn plan_smem_bytes(experts: usize) -> usize {
    36 * experts * 4
}

/// Device buffers of a routing plan (all i32).
#[derive(Debug)]
pub struct RoutingPlan {
    /// Tokens on this rank.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Experts in total.
    pub experts: usize,
    /// Ranks.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// This rank's slot counts per expert, `[E]`.
    pub counts: DeviceTensor,
    /// Receive-layout offsets of the local experts, `[L + 1]` (the grouped GEMM's offsets).
    pub expert_offsets: DeviceTensor,
    /// Receive-layout offsets of segment (local expert l, source (rank + i) mod W), `[L·W + 1]`.
    pub seg_offsets: DeviceTensor,
    /// Send-layout offsets by global expert, `[E + 1]`.
    pub send_offsets: DeviceTensor,
    /// Rows sent to each rank, `[W]`.
    pub send_rank_counts: DeviceTensor,
    /// Rows received from each rank, `[W]`.
    pub recv_rank_counts: DeviceTensor,
    /// Destination rank of each slot, `[M, k]`.
    pub scatter_rank: DeviceTensor,
    /// Row of each slot in its destination's receive layout, `[M, k]`.
    pub scatter_row: DeviceTensor,
    /// Row of each slot in this rank's send layout, `[M, k]`.
    pub send_row: DeviceTensor,
    /// `[2]`: problems found by the count kernel and by the plan kernel (0 = none).
    pub status: DeviceTensor,
}

impl RoutingPlan {
    /// The layout tensors: every buffer but `counts` and `status` (expert, segment and send
    /// offsets, per-rank row counts, per-slot ranks and rows), e.g. to poison them.
    pub fn layout_mut(&mut self) -> [&mut DeviceTensor; 8] {
        [
            &mut self.expert_offsets,
            &mut self.seg_offsets,
            &mut self.send_offsets,
            &mut self.send_rank_counts,
            &mut self.recv_rank_counts,
            &mut self.scatter_rank,
            &mut self.scatter_row,
            &mut self.send_row,
        ]
    }

    /// Allocates the plan's buffers.
    pub fn new(
        gpu: &Gpu,
        tokens: usize,
        top_k: usize,
        experts: usize,
        world: usize,
        rank: usize,
    ) -> Result<Self> {
        check_plan(tokens, top_k, experts, world, rank)?;
        let l = experts / world;
        let i32t = |shape: &[usize]| DeviceTensor::alloc(gpu, DType::I32, shape);
        Ok(RoutingPlan {
            tokens,
            top_k,
            experts,
            world,
            rank,
            counts: i32t(&[experts])?,
            expert_offsets: i32t(&[l + 1])?,
            seg_offsets: i32t(&[l * world + 1])?,
            send_offsets: i32t(&[experts + 1])?,
            send_rank_counts: i32t(&[world])?,
            recv_rank_counts: i32t(&[world])?,
            scatter_rank: i32t(&[tokens, top_k])?,
            scatter_row: i32t(&[tokens, top_k])?,
            send_row: i32t(&[tokens, top_k])?,
            status: DeviceTensor::zeros(gpu, DType::I32, &[2])?,
        })
    }

    /// Local experts per rank.
    pub fn local_experts(&self) -> usize {
        self.experts / self.world
    }

    fn check_ids(&self, ids: &DeviceTensor) -> Result<()> {
        if ids.dtype() != DType::I32 || ids.shape() != [self.tokens, self.top_k] {
            return Err(Error::shape(
                "ids",
                ids.shape(),
                format!("i32 [{}, {}]", self.tokens, self.top_k),
            ));
        }
        Ok(())
    }

    /// This rank's counts per expert from `ids [M, k]` into `self.counts`.
    pub fn count(&mut self, gpu: &Gpu, ids: &DeviceTensor) -> Result<()> {
        self.check_ids(ids)?;
        let f = gpu.function(
            &sources::program("routing.cu", sources::ROUTING_CU),
            &Defines::new(),
            "comet_expert_counts",
        )?;
        let params = CountParams {
            ids: ids.device_ptr(),
            counts: self.counts.device_ptr(),
            status: self.status.device_ptr(),
            slots: (self.tokens * self.top_k) as i64,
            experts: self.experts as i64,
        };
        // SAFETY: mirrors CountParams of routing.cu; ids [M, k], counts [E], status [2].
        unsafe { gpu.launch(&f, 1, 1024, (self.experts * 4) as u32, &params) }
    }

    /// The plan from the all-ranks counts matrix `[W, E]` and this rank's `ids [M, k]`.
    pub fn build(
        &mut self,
        gpu: &Gpu,
        counts_matrix: &DeviceTensor,
        ids: &DeviceTensor,
    ) -> Result<()> {
        self.check_ids(ids)?;
        if counts_matrix.dtype() != DType::I32
            || counts_matrix.shape() != [self.world, self.experts]
        {
            return Err(Error::shape(
                "counts matrix",
                counts_matrix.shape(),
                format!("i32 [{}, {}]", self.world, self.experts),
            ));
        }
        self.launch_plan(gpu, counts_matrix.device_ptr(), ids)
    }

    /// Single GPU (`W = 1`): counts, then the plan from them.
    pub fn build_local(&mut self, gpu: &Gpu, ids: &DeviceTensor) -> Result<()> {
        if self.world != 1 {
            return Err(Error::Invalid(format!(
                "build_local needs world size 1, this plan has {}",
                self.world
            )));
        }
        self.count(gpu, ids)?;
        let counts = self.counts.device_ptr();
        self.launch_plan(gpu, counts, ids)
    }

    fn launch_plan(&mut self, gpu: &Gpu, counts: u64, ids: &DeviceTensor) -> Result<()> {
        let f = gpu.function(
            &sources::program("routing.cu", sources::ROUTING_CU),
            &Defines::new(),
            "comet_routing_plan",
        )?;
        let params = PlanParams {
            counts,
            ids: ids.device_ptr(),
            expert_offsets: self.expert_offsets.device_ptr(),
            seg_offsets: self.seg_offsets.device_ptr(),
            send_offsets: self.send_offsets.device_ptr(),
            send_rank_counts: self.send_rank_counts.device_ptr(),
            recv_rank_counts: self.recv_rank_counts.device_ptr(),
            scatter_rank: self.scatter_rank.device_ptr(),
            scatter_row: self.scatter_row.device_ptr(),
            send_row: self.send_row.device_ptr(),
            status: self.status.device_ptr() + 4,
            slots: (self.tokens * self.top_k) as i64,
            experts: self.experts as i64,
            world: self.world as i64,
            rank: self.rank as i64,
        };
        let _span =
            tracing::trace_span!("routing_plan", experts = self.experts, world = self.world)
                .entered();
        // SAFETY: mirrors PlanParams of routing.cu; every buffer was allocated by `new` with
        // the sizes the kernel writes; the counts pointer is a [W, E] i32 matrix.
        unsafe { gpu.launch(&f, 1, 1024, plan_smem_bytes(self.experts) as u32, &params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_limits() {
        check_plan(8192, 8, 256, 2, 1).unwrap();
        check_plan(10, 1, 8, 1, 0).unwrap();
        assert!(matches!(
            check_plan(10, 2, 6, 4, 0),
            Err(Error::Alignment {
                value: 6,
                multiple: 4,
                ..
            })
        ));
        assert!(matches!(
            check_plan(10, 2, 8, 2, 2),
            Err(Error::Limit { value: 2, .. })
        ));
        assert!(matches!(
            check_plan(10, 9, 8, 1, 0),
            Err(Error::Limit { value: 9, .. })
        ));
        assert!(matches!(
            check_plan(10, 2, 2048, 1, 0),
            Err(Error::Limit { value: 2048, .. })
        ));
        assert!(matches!(
            check_plan(usize::MAX / 2, 4, 8, 1, 0),
            Err(Error::Limit { .. })
        ));
    }

    #[test]
    fn plan_smem_fits_hopper() {
        assert!(plan_smem_bytes(MAX_PLAN_EXPERTS) <= 227 * 1024);
        assert_eq!(plan_smem_bytes(256), 36 * 256 * 4);
    }
}
