// comet/signal.cuh: device-side signals in symmetric memory (comet-comm).
//
// A signal is a 64-bit word in memory that every rank can reach (a symmetric buffer). A
// producer makes its prior writes visible and then *releases* an epoch value into the word
// at system scope (st.release.sys / red.release.sys); a consumer *acquires* it at system
// scope (ld.acquire.sys) and may then read the data. Words are never zeroed by the host
// between calls: each call uses the next epoch, and "reached" compares wrap-around safe
// (see comet_comm::epoch on the host side, which mirrors these functions exactly).
//
// Every wait is bounded by a %globaltimer budget. On expiry it records (code, rank, peer,
// signal, expected, seen) in a device error word, first failure wins, and returns false;
// later waits of the same kernel give up at once when the word is already set, so a dead
// peer costs one timeout, not one per wait. The host reads the word after the stream
// completes and turns it into comet_comm::Error::SignalTimeout naming the rank and signal.
//
// This header needs no other header, so NVRTC compiles it without the toolkit include path.
// Include it as "comet/signal.cuh" (comet_comm::sources::SIGNAL_HEADER_NAME).
#pragma once

typedef unsigned long long comet_u64;
typedef unsigned int comet_u32;

// Error word; host mirror: comet_comm::signal::DeviceErrorRecord (32 bytes).
struct comet_error_t {
    comet_u32 code;      // COMET_ERR_*; 0 = no error
    comet_u32 rank;      // rank that detected the error
    comet_u32 peer;      // rank expected to release the signal (COMET_NO_PEER if unknown)
    comet_u32 signal;    // index of the signal word
    comet_u64 expected;  // epoch waited for (capacity for COMET_ERR_CAPACITY)
    comet_u64 seen;      // last value read (rows requested for COMET_ERR_CAPACITY)
};

#define COMET_ERR_NONE 0u
#define COMET_ERR_SIGNAL_TIMEOUT 1u
#define COMET_ERR_CAPACITY 2u
#define COMET_NO_PEER 0xffffffffu

// seen has reached target iff (seen - target) mod 2^64, read as signed, is >= 0.
__device__ __forceinline__ bool comet_epoch_reached(comet_u64 seen, comet_u64 target) {
    return (long long)(seen - target) >= 0;
}

__device__ __forceinline__ comet_u64 comet_ld_acquire_sys(const comet_u64* p) {
    comet_u64 v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ comet_u64 comet_ld_relaxed_sys(const comet_u64* p) {
    comet_u64 v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void comet_st_release_sys(comet_u64* p, comet_u64 v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void comet_red_release_sys_add(comet_u64* p, comet_u64 v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Device-scope acquire-release fetch-add (block-completion counters on this GPU).
__device__ __forceinline__ comet_u64 comet_atom_add_acq_rel_gpu(comet_u64* p, comet_u64 v) {
    comet_u64 old;
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
    return old;
}

__device__ __forceinline__ comet_u64 comet_globaltimer_ns() {
    comet_u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ comet_u32 comet_error_code(const comet_error_t* err) {
    return *(volatile const comet_u32*)&err->code;
}

// Records an error; the first one wins. Any thread may call it.
__device__ __forceinline__ void comet_raise(comet_error_t* err, comet_u32 code, comet_u32 rank,
                                            comet_u32 peer, comet_u32 signal, comet_u64 expected,
                                            comet_u64 seen) {
    if (atomicCAS(&err->code, 0u, code) == 0u) {
        volatile comet_error_t* e = err;
        e->rank = rank;
        e->peer = peer;
        e->signal = signal;
        e->expected = expected;
        e->seen = seen;
        __threadfence_system();
    }
}

// Release-set: make this thread's prior writes (and those ordered before it, e.g. by a
// __syncthreads) visible at system scope, then publish `value`.
__device__ __forceinline__ void comet_signal_set(comet_u64* sig, comet_u64 value) {
    __threadfence_system();
    comet_st_release_sys(sig, value);
}

// Release-add: like comet_signal_set, for counters that several producers increment.
__device__ __forceinline__ void comet_signal_add(comet_u64* sig, comet_u64 value) {
    __threadfence_system();
    comet_red_release_sys_add(sig, value);
}

// Acquire-wait, one thread: spins until *sig has reached `target` (true), or until
// `timeout_ns` of %globaltimer have passed or another wait of this error word has failed
// (false, error recorded). After `true`, this thread sees every write released before the
// signal; share that with the block by a __syncthreads (comet_block_wait does).
__device__ __forceinline__ bool comet_wait(const comet_u64* sig, comet_u64 target,
                                           comet_u64 timeout_ns, comet_error_t* err,
                                           comet_u32 rank, comet_u32 peer, comet_u32 signal_id) {
    comet_u64 seen = comet_ld_acquire_sys(sig);
    if (comet_epoch_reached(seen, target)) return true;
    const comet_u64 t0 = comet_globaltimer_ns();
    comet_u32 spins = 0;
    for (;;) {
        seen = comet_ld_acquire_sys(sig);
        if (comet_epoch_reached(seen, target)) return true;
        if ((++spins & 63u) == 0u) {
            if (comet_error_code(err) != COMET_ERR_NONE) return false;
            const comet_u64 now = comet_globaltimer_ns();
            if (now - t0 > timeout_ns) {
                comet_raise(err, COMET_ERR_SIGNAL_TIMEOUT, rank, peer, signal_id, target, seen);
                return false;
            }
            if (spins > 4096u) __nanosleep(64);
        }
    }
}

// Acquire-wait for a whole block: thread 0 waits, the block learns the outcome. Every
// thread of the block must call it (it contains __syncthreads).
__device__ __forceinline__ bool comet_block_wait(const comet_u64* sig, comet_u64 target,
                                                 comet_u64 timeout_ns, comet_error_t* err,
                                                 comet_u32 rank, comet_u32 peer,
                                                 comet_u32 signal_id) {
    __shared__ int comet_block_wait_ok;
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
        comet_block_wait_ok = comet_wait(sig, target, timeout_ns, err, rank, peer, signal_id) ? 1 : 0;
    }
    __syncthreads();
    const bool ok = comet_block_wait_ok != 0;
    __syncthreads();
    return ok;
}

// Release-set for a whole block: every thread's prior writes, then thread 0 publishes.
// Every thread of the block must call it (it contains __syncthreads).
__device__ __forceinline__ void comet_block_signal_set(comet_u64* sig, comet_u64 value) {
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) comet_signal_set(sig, value);
}

// Release-add for a whole block (see comet_block_signal_set).
__device__ __forceinline__ void comet_block_signal_add(comet_u64* sig, comet_u64 value) {
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) comet_signal_add(sig, value);
}
