// Test kernels for comet-comm's GPU tests (not used by the library).
#include "comet/signal.cuh"

__device__ __forceinline__ comet_u32 comet_test_value(comet_u32 src_rank, comet_u64 epoch, comet_u32 i) {
    comet_u64 x = epoch * 0x9E3779B97F4A7C15ull ^ ((comet_u64)src_rank << 40) ^ (comet_u64)i;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (comet_u32)x;
}

// Signal-ordering stress between this rank and `peer`, `n_epochs` epochs from
// `first_epoch` on (wrapping), through a ring of `slots` (a power of two) slots of
// `slot_words` u32 in each rank's symmetric ring buffer.
//
// Block 0 produces: waits until the peer's consumer has acknowledged epoch e - slots (the
// slot is free), writes slot e % slots of the PEER's ring with values derived from
// (rank, e), then release-sets the peer's data signal of that slot to e.
// Block 1 consumes: acquire-waits its own data signal of slot e % slots to reach e, checks
// every word against (peer, e), then release-sets the ack word on the peer to e.
// Pad (u64): [0, slots) data signals, [slots] ack.
// mismatch: [0] count, [1] epoch (low 32 bits), [2] index, [3] got, [4] expected.
extern "C" __global__ void comet_test_signal_stress(comet_u32* peer_ring, const comet_u32* my_ring,
                                                    comet_u64* peer_pad, comet_u64* my_pad,
                                                    comet_u32 slots, comet_u32 slot_words,
                                                    comet_u64 first_epoch, comet_u32 n_epochs,
                                                    comet_u32 rank, comet_u32 peer,
                                                    comet_u64 timeout_ns, comet_error_t* err,
                                                    comet_u32* mismatch) {
    for (comet_u32 k = 0; k < n_epochs; ++k) {
        const comet_u64 e = first_epoch + k;
        const comet_u32 slot = (comet_u32)(e & (comet_u64)(slots - 1));
        if (blockIdx.x == 0) {
            if (!comet_block_wait(my_pad + slots, e - slots, timeout_ns, err, rank, peer, slots)) return;
            comet_u32* dst = peer_ring + (comet_u64)slot * slot_words;
            for (comet_u32 i = threadIdx.x; i < slot_words; i += blockDim.x) dst[i] = comet_test_value(rank, e, i);
            comet_block_signal_set(peer_pad + slot, e);
        } else {
            if (!comet_block_wait(my_pad + slot, e, timeout_ns, err, rank, peer, slot)) return;
            const comet_u32* src = my_ring + (comet_u64)slot * slot_words;
            for (comet_u32 i = threadIdx.x; i < slot_words; i += blockDim.x) {
                const comet_u32 want = comet_test_value(peer, e, i);
                const comet_u32 got = src[i];
                if (got != want) {
                    if (atomicAdd(mismatch, 1u) == 0u) {
                        mismatch[1] = (comet_u32)e;
                        mismatch[2] = i;
                        mismatch[3] = got;
                        mismatch[4] = want;
                    }
                }
            }
            comet_block_signal_set(peer_pad + slots, e);
        }
    }
}
