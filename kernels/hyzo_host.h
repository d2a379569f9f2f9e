/* The host build of kernels/hyzo.cu: what the CUDA source needs from the CUDA toolkit,
 * supplied in plain C++17 so the same kernels run on a machine without a GPU (the CUDA
 * backend's emulated device, src/backend/cuda/emulator.rs). A test instrument, never a
 * fast path.
 *
 * Threads of a block run as FIBERS (ucontext), one per CUDA thread, on the launching OS
 * thread; a block runs until every fiber has returned. `__syncthreads` and the warp shuffles
 * are real barriers: a fiber that arrives waits (yields) until every live fiber of its block
 * (warp) has arrived, so a missing barrier shows as a wrong result rather than being hidden
 * by a sequential loop. The scheduler always resumes the lowest-numbered runnable fiber in
 * even blocks and the highest-numbered one in odd blocks: each thread of a racing pair gets
 * to run ahead of the other in some block of any grid of two or more blocks.
 *
 * Shared memory: `__shared__` variables become `static thread_local`, one instance per OS
 * thread, i.e. per block being run (blocks of a launch run one after another). */
#ifndef HYZO_HOST_H
#define HYZO_HOST_H

#ifndef HYZO_HOST_EMULATION
#define HYZO_HOST_EMULATION
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

struct hyzo_dim3 {
    unsigned x, y, z;
};
typedef hyzo_dim3 dim3;
typedef hyzo_dim3 uint3;

/* The emulated thread's coordinates, set by the scheduler before it resumes a fiber. */
extern thread_local hyzo_dim3 threadIdx;
extern thread_local hyzo_dim3 blockIdx;
extern thread_local hyzo_dim3 blockDim;
extern thread_local hyzo_dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

template <class T>
static inline T __ldg(const T* p) {
    return *p;
}

using std::isfinite;

/* CUDA's overloaded min (the kernels use it on hyzo_u64). */
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }

/* Correctly rounded double operations: IEEE on the host (volatile: no contraction). */
static inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
static inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }

/* Barriers over the fibers of the running block (hyzo_host.cpp). */
void hyzo_host_block_barrier();
int hyzo_host_block_barrier_or(int v);
double hyzo_host_shfl_down(double v, unsigned delta);
float hyzo_host_shfl_down(float v, unsigned delta);

static inline void __syncthreads() { hyzo_host_block_barrier(); }
static inline int __syncthreads_or(int v) { return hyzo_host_block_barrier_or(v); }
/* Only full-warp masks occur in the kernels: every lane takes part. */
template <class T>
static inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    return hyzo_host_shfl_down(v, delta);
}

#endif /* HYZO_HOST_H */
