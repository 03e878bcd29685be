// Hopper (sm_90a) PTX wrappers: mbarrier, TMA bulk tensor copies, wgmma fences and
// shared-memory descriptors, proxy fences, register reallocation, named barriers.
//
// Device code only, no headers: compiles with nvcc and with NVRTC
// (`--gpu-architecture=sm_90a -default-device`). Instruction forms follow the PTX ISA 8.x
// sections on mbarrier, cp.async.bulk.tensor and wgmma.
#pragma once

namespace comet_sm90 {

typedef unsigned int u32;
typedef unsigned long long u64;

/// Opaque 128-byte TMA descriptor (CUtensorMap) as encoded on the host by
/// cuTensorMapEncodeTiled. Passed by value inside a `__grid_constant__` kernel parameter so
/// that its address lies in parameter space, as TMA requires. 128-byte aligned like CUDA 13's
/// CUtensorMap (TMA itself needs 64).
struct alignas(128) TmaDesc {
  u64 opaque[16];
};

/// Shared-space address (32 bits) of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm volatile("{\n.reg .u64 t;\ncvta.to.shared.u64 t, %1;\ncvt.u32.u64 %0, t;\n}\n"
               : "=r"(r)
               : "l"(p));
  return r;
}

__device__ __forceinline__ u32 lane_id() {
  u32 r;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(r));
  return r;
}

__device__ __forceinline__ u64 global_timer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------------------------------
// mbarrier
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

/// Makes mbarrier initialisation visible to the other threads and to the async proxy (TMA).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

/// Arrives once and adds `tx_bytes` to the transaction count of the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 tx_bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
               "r"(tx_bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

/// Arrives `count` times at once.
__device__ __forceinline__ void mbar_arrive_cnt(u32 bar, u32 count) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

/// Arrives on the mbarrier at the same shared-memory offset in CTA `cta_rank` of the cluster.
/// Default (.release.cta) semantics: the arrival only says "my wgmma reads of this stage are
/// done" (already waited for), it publishes no data. `.release.cluster` would put a
/// MEMBAR.ALL.GPU before every arrival (it did: the clustered kernel ran 30% slower).
__device__ __forceinline__ void mbar_arrive_remote(u32 bar, u32 cta_rank) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
      "r"(cta_rank)
      : "memory");
}

/// One probe: true once the phase with the given parity has completed.
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
  u32 done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

/// Deadlock guard for waits between the warps of one CTA (these never wait on anything
/// outside the CTA, so only a bug can make them exceed it). Waits on other GPUs or on other
/// CTAs go through a hook with its own timeout that reports an error instead.
#ifndef COMET_SM90_WATCHDOG_NS
#define COMET_SM90_WATCHDOG_NS 20000000000ull
#endif

/// Waits until the phase with the given parity has completed. Traps after the watchdog
/// time so that a broken pipeline becomes a launch error on the host, not a hang.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  if (mbar_try_wait(bar, parity)) return;
  u64 start = global_timer_ns();
  u32 spins = 0;
  while (!mbar_try_wait(bar, parity)) {
    if ((++spins & 1023u) == 0 && global_timer_ns() - start > COMET_SM90_WATCHDOG_NS) {
      asm volatile("trap;");
    }
  }
}

// ---------------------------------------------------------------------------------------
// TMA (cp.async.bulk.tensor), global -> shared, completion on an mbarrier
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* desc) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(desc) : "memory");
}

/// L2 eviction-priority policies for the cache_hint forms.
__device__ __forceinline__ u64 l2_policy_evict_first() {
  u64 p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ u64 l2_policy_evict_last() {
  u64 p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}

__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                            int c1, u64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(dst),
      "l"(desc), "r"(bar), "r"(c0), "r"(c1), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                            int c1, int c2, u64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5}], [%2], %6;" ::"r"(dst),
      "l"(desc), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                            int c1, int c2, int c3, u64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6}], [%2], %7;" ::"r"(dst),
      "l"(desc), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void tma_load_5d(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                            int c1, int c2, int c3, int c4, u64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6, %7}], [%2], %8;" ::"r"(dst),
      "l"(desc), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "l"(policy)
      : "memory");
}

/// TMA stores (shared -> global, bulk-group completion): the box at `src` (laid out as the
/// map's swizzle says) goes to the tensor at {c0, c1, c2}; parts outside the tensor are not
/// written. `_add` adds it to the values there instead (done by the TMA unit in L2).
__device__ __forceinline__ void tma_store_3d(const TmaDesc* desc, u32 src, int c0, int c1,
                                             int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];"
               ::"l"(desc), "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void tma_store_add_3d(const TmaDesc* desc, u32 src, int c0, int c1,
                                                 int c2) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4}], [%1];" ::"l"(desc),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
/// Closes the bulk group of the TMA stores issued so far by this thread.
__device__ __forceinline__ void bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
/// Waits until at most N of this thread's bulk groups still read their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
/// Waits until at most N of this thread's bulk groups are still incomplete (writes done).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

/// Multicast forms: the box lands at the same shared-memory offset, and completes bytes on
/// the mbarrier at the same offset, in every CTA of the cluster whose bit is set in cta_mask.
__device__ __forceinline__ void tma_load_3d_mc(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                               int c1, int c2, unsigned short cta_mask,
                                               u64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::"
      "cluster.L2::cache_hint [%0], [%1, {%3, %4, %5}], [%2], %6, %7;" ::"r"(dst),
      "l"(desc), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void tma_load_4d_mc(u32 dst, const TmaDesc* desc, u32 bar, int c0,
                                               int c1, int c2, int c3, unsigned short cta_mask,
                                               u64 policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::"
      "cluster.L2::cache_hint [%0], [%1, {%3, %4, %5, %6}], [%2], %7, %8;" ::"r"(dst),
      "l"(desc), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "h"(cta_mask), "l"(policy)
      : "memory");
}

// ---------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ u32 cluster_ctarank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ u32 cluster_id_x() {
  u32 r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ u32 cluster_count_x() {
  u32 r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ u32 cluster_size() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}
/// All non-exited threads of the cluster arrive and wait (release/acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// ---------------------------------------------------------------------------------------
// wgmma helpers
// ---------------------------------------------------------------------------------------

/// Orders this warpgroup's prior register and shared-memory accesses before the wgmma
/// instructions that follow.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
/// Waits until at most N committed wgmma groups of this warp are still pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/// Tells the compiler the register may have changed (wgmma writes accumulators
/// asynchronously); keeps reads of accumulators after the wait that completes them.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

/// Shared-memory matrix descriptor for a K-major operand tile stored with the 128-byte
/// swizzle (the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and a 64-element bf16
/// box row): rows of 128 bytes, 8-row atoms of 1024 bytes.
///   bits  0-13 start address >> 4
///   bits 16-29 leading-dimension byte offset >> 4 (unused for swizzled K-major; 1)
///   bits 32-45 stride-dimension byte offset >> 4 (1024 bytes between 8-row groups)
///   bits 49-51 base offset (0: tiles are 1024-byte aligned)
///   bits 62-63 swizzle mode (1 = 128B)
/// Advancing K by 16 elements inside the 128-byte row adds 32 bytes (2 units) to the start.
__device__ __forceinline__ u64 smem_desc_kmajor_sw128(u32 smem_byte_addr) {
  u64 d = 0;
  d |= (u64)((smem_byte_addr & 0x3FFFFu) >> 4);
  d |= (u64)1 << 16;
  d |= (u64)(1024 >> 4) << 32;
  d |= (u64)1 << 62;
  return d;
}

/// Descriptor for an MN-major operand (the reduction dimension is the strided one) stored
/// with the 128-byte swizzle: each 128-byte row holds 64 consecutive N (or M) elements of one
/// k; 8 k-rows form a 1024-byte atom. For one m64nNk16 instruction (16 k = two atoms along
/// k), the leading byte offset is the distance between 64-element column blocks along N and
/// the stride byte offset the distance between the two 8-k atoms.
__device__ __forceinline__ u64 smem_desc_mnmajor_sw128(u32 smem_byte_addr, u32 lbo_bytes,
                                                       u32 sbo_bytes) {
  u64 d = 0;
  d |= (u64)((smem_byte_addr & 0x3FFFFu) >> 4);
  d |= (u64)((lbo_bytes >> 4) & 0x3FFFu) << 16;
  d |= (u64)((sbo_bytes >> 4) & 0x3FFFu) << 32;
  d |= (u64)1 << 62;
  return d;
}

// ---------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------

/// Makes this thread's generic-proxy shared-memory writes visible to the async proxy.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

/// Named barrier over `count` threads (a multiple of 32); id 0 is __syncthreads().
__device__ __forceinline__ void named_barrier_sync(u32 id, u32 count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

/// Arrives on a named barrier without waiting (producer side of an ordering barrier).
__device__ __forceinline__ void named_barrier_arrive(u32 id, u32 count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

template <u32 REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REGS));
}
template <u32 REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REGS));
}

/// Packs two floats into bf16x2 / f16x2 (round to nearest even); `lo` lands at the lower
/// address.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

/// Four 8x8 16-bit matrices from fragments to shared memory, transposed: register k of
/// lane i holds elements (i / 4, 2 (i % 4) + {0, 1}) of matrix k; they land at row
/// 2 (i % 4) + {0, 1}, element i / 4 of the matrix whose 8 row addresses (16 bytes each,
/// 16-byte aligned) lanes 8k .. 8k + 7 give.
__device__ __forceinline__ void stmatrix_x4_trans(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(
                   addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ void st_shared_u32(u32 addr, u32 v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void ld_shared_v4(u32 addr, u32& a, u32& b, u32& c, u32& d) {
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(a), "=r"(b), "=r"(c), "=r"(d)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void st_shared_v2f(u32 addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void st_global_v4(void* p, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

}  // namespace comet_sm90
