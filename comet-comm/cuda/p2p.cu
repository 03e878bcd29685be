// comet-comm peer data movement: push/pull of row blocks, signal kernels, all-to-all-v
// with device-side counts. Compiled at run time by NVRTC (comet_comm::kernels).
//
// Copies move 16-byte vectors (uint4): the host checks that every pointer, row length and
// row stride is a multiple of 16 bytes. Each thread keeps COMET_UNROLL independent 16-byte
// loads in flight before it stores them (what NVLink loads from a peer need to hide their
// latency), over a grid-stride loop, so any grid size covers any amount of data.
#include "comet/signal.cuh"

#ifndef COMET_UNROLL
#define COMET_UNROLL 8
#endif
#ifndef COMET_COPY_THREADS
#define COMET_COPY_THREADS 512
#endif
#define COMET_A2AV_MAX_WORLD 64

// Flat copy of n 16-byte vectors, the calling grid's share: thread `tid` of `nthreads`.
__device__ __forceinline__ void comet_copy_vec(const uint4* __restrict__ src,
                                               uint4* __restrict__ dst, comet_u64 n,
                                               comet_u64 tid, comet_u64 nthreads) {
    comet_u64 i = tid;
    const comet_u64 step = nthreads * COMET_UNROLL;
    for (; i + (COMET_UNROLL - 1) * nthreads < n; i += step) {
        uint4 v[COMET_UNROLL];
#pragma unroll
        for (int k = 0; k < COMET_UNROLL; ++k) v[k] = src[i + k * nthreads];
#pragma unroll
        for (int k = 0; k < COMET_UNROLL; ++k) dst[i + k * nthreads] = v[k];
    }
    for (; i < n; i += nthreads) dst[i] = src[i];
}

// Contiguous copy of n_vec 16-byte vectors: push (src local, dst on a peer) or pull
// (src on a peer, dst local).
extern "C" __global__ void __launch_bounds__(COMET_COPY_THREADS)
    comet_copy_flat(const uint4* __restrict__ src, uint4* __restrict__ dst, comet_u64 n_vec) {
    comet_copy_vec(src, dst, n_vec, (comet_u64)blockIdx.x * blockDim.x + threadIdx.x,
                   (comet_u64)gridDim.x * blockDim.x);
}

// Strided copy of `rows` rows of `row_vecs` vectors; strides in vectors. The host checks
// rows * row_vecs < 2^32 (then the index arithmetic stays in 32 bits).
extern "C" __global__ void __launch_bounds__(COMET_COPY_THREADS)
    comet_copy_rows(const uint4* __restrict__ src, comet_u64 src_stride, uint4* __restrict__ dst,
                    comet_u64 dst_stride, comet_u32 rows, comet_u32 row_vecs) {
    const comet_u32 n = rows * row_vecs;
    const comet_u32 nthreads = gridDim.x * blockDim.x;
    comet_u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    for (; i < n; i += nthreads * COMET_UNROLL) {
        uint4 v[COMET_UNROLL];
#pragma unroll
        for (int k = 0; k < COMET_UNROLL; ++k) {
            const comet_u32 j = i + k * nthreads;
            if (j < n) {
                const comet_u32 r = j / row_vecs, c = j - r * row_vecs;
                v[k] = src[(comet_u64)r * src_stride + c];
            }
        }
#pragma unroll
        for (int k = 0; k < COMET_UNROLL; ++k) {
            const comet_u32 j = i + k * nthreads;
            if (j < n) {
                const comet_u32 r = j / row_vecs, c = j - r * row_vecs;
                dst[(comet_u64)r * dst_stride + c] = v[k];
            }
        }
    }
}

// Host-launched signal operations (one thread).
extern "C" __global__ void comet_signal_set_kernel(comet_u64* sig, comet_u64 value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) comet_signal_set(sig, value);
}

extern "C" __global__ void comet_signal_add_kernel(comet_u64* sig, comet_u64 value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) comet_signal_add(sig, value);
}

// Waits until each of sigs[first .. first + count) has reached `target` (bounded).
extern "C" __global__ void comet_signal_wait_kernel(const comet_u64* sigs, comet_u32 first,
                                                    comet_u32 count, comet_u64 target,
                                                    comet_u64 timeout_ns, comet_error_t* err,
                                                    comet_u32 rank, comet_u32 peer) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    for (comet_u32 i = 0; i < count; ++i) {
        if (!comet_wait(sigs + first + i, target, timeout_ns, err, rank, peer, first + i)) return;
    }
}

// All-to-all-v over NVLink with device-side counts (no host synchronisation).
//
// Rank r sends send_counts[d] rows to each rank d; its send buffer holds them grouped by
// destination in rank order. Rank d receives into its symmetric receive buffer, ordered by
// source rank (the layout of NCCL's grouped send/recv all-to-all-v). recv_layout gets the
// received counts [W] then the exclusive offsets [W + 1] (rows).
//
// tables (device, 3W u64): [0, W) peers' receive buffers, [W, 2W) peers' count matrices
// ([2][W][W] u32, double-buffered by epoch parity), [2W, 3W) peers' signal pads.
// Signal pad of each rank: [0, W) counts-ready from source s, [W, 2W) data-done from
// source s, [2W] this rank's block-completion counter (local only).
//
// 1. Block 0 writes this rank's counts row into every rank's matrix and releases
//    counts-ready[rank] = epoch on each. That signal also means "my previous use of my
//    receive buffer is over" (this kernel runs after it in stream order), so peers may write.
// 2. Every block acquires counts-ready from all ranks, reads the matrix and checks every
//    row against send_capacity_rows and every column against recv_capacity_rows (both the
//    same on every rank), so an overflow stops all ranks alike and is an error on each.
// 3. Every block pushes its grid-stride share of each destination's segment (peers in
//    rotated order, self last) straight into the destination's receive buffer.
// 4. Each block fences and bumps the local completion counter; the block that brings it to
//    done_target (host-tracked running total) releases data-done[rank] = epoch on every
//    peer, then acquires data-done from every peer: when the kernel ends, the receive
//    buffer is complete.
extern "C" __global__ void __launch_bounds__(COMET_COPY_THREADS)
    comet_a2av_push(const uint4* __restrict__ send, const comet_u32* __restrict__ send_counts,
                    const comet_u64* __restrict__ tables, const comet_u32* my_meta,
                    comet_u64* __restrict__ my_sig, comet_u32* __restrict__ recv_layout,
                    comet_error_t* err, comet_u32 rank, comet_u32 world, comet_u64 row_vecs,
                    comet_u64 send_capacity_rows, comet_u64 recv_capacity_rows, comet_u64 epoch,
                    comet_u64 done_target, comet_u64 timeout_ns) {
    __shared__ comet_u64 s_src_off[COMET_A2AV_MAX_WORLD + 1];
    __shared__ comet_u64 s_dst_off[COMET_A2AV_MAX_WORLD];
    __shared__ comet_u64 s_rows[COMET_A2AV_MAX_WORLD];
    __shared__ int s_counts_ok;
    __shared__ int s_overflow;
    const comet_u32 W = world;
    const comet_u32 parity = (comet_u32)(epoch & 1ull);
    const comet_u64 mat_off = (comet_u64)parity * W * W;

    // 1. publish my counts row
    if (blockIdx.x == 0) {
        for (comet_u32 idx = threadIdx.x; idx < W * W; idx += blockDim.x) {
            const comet_u32 d = idx / W, j = idx - d * W;
            comet_u32* meta_d = (comet_u32*)tables[W + d];
            meta_d[mat_off + (comet_u64)rank * W + j] = send_counts[j];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence_system();
            for (comet_u32 d = 0; d < W; ++d) {
                comet_st_release_sys(((comet_u64*)tables[2 * W + d]) + rank, epoch);
            }
        }
    }

    // 2. acquire every rank's counts row
    if (threadIdx.x == 0) {
        int ok = 1;
        for (comet_u32 s = 0; s < W && ok; ++s) {
            ok = comet_wait(my_sig + s, epoch, timeout_ns, err, rank, s, s) ? 1 : 0;
        }
        s_counts_ok = ok;
        s_overflow = 0;
    }
    __syncthreads();
    const bool counts_ok = s_counts_ok != 0;
    const comet_u32* M = my_meta + mat_off;
    if (counts_ok) {
        // Thread t handles rank t: its row total (what t sends) and its column total (what
        // t receives), and this rank's offset inside t's receive buffer. Every rank checks
        // every row and column against the (symmetric) capacities, so an overflow is seen
        // by all ranks alike and no rank moves any data.
        for (comet_u32 t = threadIdx.x; t < W; t += blockDim.x) {
            comet_u64 before = 0, col = 0, row = 0;
            for (comet_u32 s = 0; s < W; ++s) {
                const comet_u64 c = M[(comet_u64)s * W + t];
                if (s < rank) before += c;
                col += c;
                row += M[(comet_u64)t * W + s];
            }
            s_dst_off[t] = before;
            s_rows[t] = M[(comet_u64)rank * W + t];
            if (col > recv_capacity_rows) {
                comet_raise(err, COMET_ERR_CAPACITY, rank, t, COMET_NO_PEER, recv_capacity_rows, col);
                atomicOr(&s_overflow, 1);
            }
            if (row > send_capacity_rows) {
                comet_raise(err, COMET_ERR_CAPACITY, rank, t, COMET_NO_PEER, send_capacity_rows, row);
                atomicOr(&s_overflow, 1);
            }
            if (blockIdx.x == 0 && t == rank) {
                // my receive layout: counts from each source, then exclusive offsets
                comet_u64 off = 0;
                for (comet_u32 s = 0; s < W; ++s) {
                    const comet_u32 c = M[(comet_u64)s * W + rank];
                    recv_layout[s] = c;
                    recv_layout[W + s] = (comet_u32)off;
                    off += c;
                }
                recv_layout[2 * W] = (comet_u32)off;
            }
        }
    }
    __syncthreads();
    if (counts_ok && threadIdx.x == 0) {
        comet_u64 off = 0;
        for (comet_u32 d = 0; d < W; ++d) {
            s_src_off[d] = off;
            off += s_rows[d];
        }
        s_src_off[W] = off;
    }
    __syncthreads();
    const bool go = counts_ok && s_overflow == 0;

    // 3. push rows
    if (go) {
        const comet_u64 tid = (comet_u64)blockIdx.x * blockDim.x + threadIdx.x;
        const comet_u64 nthreads = (comet_u64)gridDim.x * blockDim.x;
        for (comet_u32 i = 1; i <= W; ++i) {
            const comet_u32 d = (rank + i) % W;
            const comet_u64 n = s_rows[d] * row_vecs;
            if (n == 0) continue;
            const uint4* src = send + s_src_off[d] * row_vecs;
            uint4* dst = ((uint4*)tables[d]) + s_dst_off[d] * row_vecs;
            comet_copy_vec(src, dst, n, tid, nthreads);
        }
    }

    // 4. completion
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        const comet_u64 old = comet_atom_add_acq_rel_gpu(my_sig + 2 * W, 1ull);
        if (old + 1ull == done_target) {
            __threadfence_system();
            for (comet_u32 i = 1; i < W; ++i) {
                const comet_u32 d = (rank + i) % W;
                comet_st_release_sys(((comet_u64*)tables[2 * W + d]) + W + rank, epoch);
            }
            for (comet_u32 i = 1; i < W; ++i) {
                const comet_u32 s = (rank + W - i) % W;
                if (!comet_wait(my_sig + W + s, epoch, timeout_ns, err, rank, s, W + s)) break;
            }
        }
    }
}
