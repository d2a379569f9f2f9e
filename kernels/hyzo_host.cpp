/* The host build of the kernels (see hyzo_host.h): kernels/hyzo.cu itself, compiled as
 * C++ after the shim, and the fiber scheduler that runs a launch block by block. Built by
 * build.rs with the cc crate into the hyzo crate; called by src/backend/cuda/emulator.rs. */
#define HYZO_HOST_BUILD
#include "hyzo_host.h"

#include "hyzo.cu"

#include <cstdio>
#include <cstdlib>
#include <ucontext.h>
#include <vector>

thread_local hyzo_dim3 threadIdx;
thread_local hyzo_dim3 blockIdx;
thread_local hyzo_dim3 blockDim;
thread_local hyzo_dim3 gridDim;

namespace {

enum class FiberState { Runnable, Blocked, Done };

struct Fiber {
    ucontext_t ctx;
    char* stack;
    FiberState state;
    int barrier; /* -1: the block's barrier; w >= 0: warp w's */
};

/* Fibers need room for the kernels' register arrays (and, under ASan, their redzones). */
constexpr size_t STACK_BYTES = 256 * 1024;

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    int current = -1;
    void (*kernel)(const void*) = nullptr;
    const void* params = nullptr;
    /* Barrier bookkeeping: arrivals at the block barrier and at each warp's. */
    int block_arrived = 0;
    int block_or = 0, block_or_result = 0;
    std::vector<int> warp_arrived;
    std::vector<double> warp_slot;
};

thread_local Block* g_block = nullptr;

void fiber_main() {
    Block* b = g_block;
    b->kernel(b->params);
    b->fibers[b->current].state = FiberState::Done;
    /* returns to uc_link: the scheduler */
}

int live_in(const Block* b, int lo, int hi) {
    int n = 0;
    for (int i = lo; i < hi; i++) n += b->fibers[i].state != FiberState::Done;
    return n;
}

/* Arrive at barrier `id` (-1 block, else a warp); returns once every live fiber of the
 * block (warp) has arrived. The last to arrive releases the others and runs on. */
void arrive(int id) {
    Block* b = g_block;
    const int me = b->current;
    const int n = (int)b->fibers.size();
    const int lo = id < 0 ? 0 : id * 32, hi = id < 0 ? n : (id * 32 + 32 < n ? id * 32 + 32 : n);
    int& arrived = id < 0 ? b->block_arrived : b->warp_arrived[id];
    arrived += 1;
    if (arrived == live_in(b, lo, hi)) {
        arrived = 0;
        for (int i = lo; i < hi; i++)
            if (b->fibers[i].state == FiberState::Blocked && b->fibers[i].barrier == id)
                b->fibers[i].state = FiberState::Runnable;
        return;
    }
    b->fibers[me].state = FiberState::Blocked;
    b->fibers[me].barrier = id;
    swapcontext(&b->fibers[me].ctx, &b->scheduler);
    /* resumed: the scheduler restored threadIdx */
}

thread_local std::vector<char*> g_stacks;

void run_block(Block& b, unsigned threads, bool highest_first) {
    if (g_stacks.size() < threads) {
        for (size_t i = g_stacks.size(); i < threads; i++) {
            char* s = (char*)std::malloc(STACK_BYTES);
            if (!s) {
                std::fprintf(stderr, "hyzo host kernels: out of memory for fiber stacks\n");
                std::abort();
            }
            g_stacks.push_back(s);
        }
    }
    b.fibers.assign(threads, Fiber{});
    b.warp_arrived.assign((threads + 31) / 32, 0);
    b.warp_slot.assign(threads, 0.0);
    b.block_arrived = 0;
    for (unsigned i = 0; i < threads; i++) {
        Fiber& f = b.fibers[i];
        f.stack = g_stacks[i];
        f.state = FiberState::Runnable;
        f.barrier = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        int next = -1;
        if (highest_first) {
            for (int i = (int)threads - 1; i >= 0; i--)
                if (b.fibers[i].state == FiberState::Runnable) { next = i; break; }
        } else {
            for (int i = 0; i < (int)threads; i++)
                if (b.fibers[i].state == FiberState::Runnable) { next = i; break; }
        }
        if (next < 0) {
            if (live_in(&b, 0, (int)threads) == 0) return;
            /* Some fibers wait at a barrier that the others exited without reaching: on a
             * GPU, a hang or undefined behaviour. */
            std::fprintf(stderr, "hyzo host kernels: deadlock at a barrier (block %u)\n", blockIdx.x);
            std::abort();
        }
        b.current = next;
        threadIdx = hyzo_dim3{(unsigned)next, 0, 0};
        swapcontext(&b.scheduler, &b.fibers[next].ctx);
    }
}

template <class P, void (*K)(P)>
void call(const void* params) {
    P p;
    std::memcpy(&p, params, sizeof p);
    K(p);
}

struct Entry {
    const char* name;
    void (*fn)(const void*);
    size_t param_bytes;
};

#define HYZO_ENTRY(name) {#name, call<HyzoPass, name>, sizeof(HyzoPass)}
#define HYZO_ENTRY_T(name, T) {#name, call<T, name>, sizeof(T)}
#define HYZO_ENTRY_R(M, pre) M(pre##0) M(pre##1) M(pre##2) M(pre##3) M(pre##4) M(pre##5)
#define HYZO_E(name) HYZO_ENTRY(name),

const Entry ENTRIES[] = {
    HYZO_ENTRY(hyzo_perturb_exact),
    HYZO_ENTRY(hyzo_restore_and_update_exact),
    HYZO_ENTRY(hyzo_fo_update_exact),
    HYZO_ENTRY(hyzo_sq_norm_exact),
    HYZO_ENTRY_T(hyzo_lowrank_factors_exact, HyzoFactorPass),
    HYZO_ENTRY_T(hyzo_lowrank_factors_f, HyzoFactorPass),
    HYZO_ENTRY(hyzo_perturb_f_k0_n1), HYZO_ENTRY(hyzo_perturb_f_k0_n2), HYZO_ENTRY(hyzo_perturb_f_k0_nx),
    HYZO_ENTRY(hyzo_perturb_f_k1_n1), HYZO_ENTRY(hyzo_perturb_f_k1_n2), HYZO_ENTRY(hyzo_perturb_f_k1_nx),
    HYZO_ENTRY_R(HYZO_E, hyzo_restore_and_update_f_k0_r)
    HYZO_ENTRY_R(HYZO_E, hyzo_restore_and_update_f_k1_r)
    HYZO_ENTRY_R(HYZO_E, hyzo_fo_update_f_r)
    HYZO_ENTRY(hyzo_sq_norm_f_k0),
    HYZO_ENTRY(hyzo_sq_norm_f_k1),
    HYZO_ENTRY(hyzo_sq_norm_final),
    HYZO_ENTRY(hyzo_advance_counters),
    HYZO_ENTRY_T(hyzo_device_losses, HyzoLossPass),
};

const Entry* find(const char* name) {
    for (const Entry& e : ENTRIES)
        if (std::strcmp(e.name, name) == 0) return &e;
    return nullptr;
}

} // namespace

void hyzo_host_block_barrier() { arrive(-1); }

int hyzo_host_block_barrier_or(int v) {
    Block* b = g_block;
    /* The first barrier collects the votes, the second keeps a fast fiber's next vote out
     * of this one's result. */
    b->block_or |= v != 0;
    arrive(-1);
    const int r = b->block_or;
    arrive(-1);
    b->block_or = 0;
    return r;
}

template <class T>
static T shfl_down(T v, unsigned delta) {
    Block* b = g_block;
    const unsigned me = threadIdx.x, lane = me & 31u, warp = me >> 5;
    double* slot = b->warp_slot.data();
    slot[me] = (double)v;
    arrive((int)warp);
    const T r = lane + delta < 32u && me + delta < b->fibers.size() ? (T)slot[me + delta] : v;
    arrive((int)warp); /* every lane has read before any lane writes its next value */
    return r;
}
double hyzo_host_shfl_down(double v, unsigned delta) { return shfl_down(v, delta); }
float hyzo_host_shfl_down(float v, unsigned delta) { return shfl_down(v, delta); }

/* The size of a kernel's parameter struct, 0 if there is no such kernel. */
extern "C" size_t hyzo_host_param_bytes(const char* name) {
    const Entry* e = find(name);
    return e ? e->param_bytes : 0;
}

/* The number of entry points and the name of entry `i` (for the coverage check). */
extern "C" size_t hyzo_host_kernel_count() { return sizeof ENTRIES / sizeof ENTRIES[0]; }
extern "C" const char* hyzo_host_kernel_name(size_t i) {
    return i < hyzo_host_kernel_count() ? ENTRIES[i].name : nullptr;
}

/* Runs kernel `name` over `grid` blocks of `threads` threads, its parameters at `params`.
 * Returns 0, or -1 for an unknown kernel. Blocks run one after another on this thread. */
extern "C" int hyzo_host_launch(const char* name, unsigned grid, unsigned threads, const void* params) {
    const Entry* e = find(name);
    if (!e) return -1;
    if (grid == 0 || threads == 0) return -2;
    Block b;
    b.kernel = e->fn;
    b.params = params;
    Block* saved = g_block;
    g_block = &b;
    gridDim = hyzo_dim3{grid, 1, 1};
    blockDim = hyzo_dim3{threads, 1, 1};
    for (unsigned x = 0; x < grid; x++) {
        blockIdx = hyzo_dim3{x, 0, 0};
        run_block(b, threads, (x & 1u) != 0);
    }
    g_block = saved;
    return 0;
}
