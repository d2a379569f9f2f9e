/* hyzo's kernels: one launch per pass over every tensor of a shard.
 *
 * Work layout (multi_tensor_apply style, but with a device-side table): the global index
 * space is cut into groups of 8 elements starting at multiples of 8, and each tensor's
 * groups into chunks of HYZO_CHUNK_GROUPS groups. The launch's chunks are numbered tensor
 * after tensor (HyzoTensor.first_chunk); a persistent grid walks them (block b takes chunks
 * b, b + gridDim.x, ...), finds the tensor of a chunk by binary search, and gives one group
 * to each thread at a time. Everything an element gets is a function of its global index
 * j alone (the counter of every random stream is keyed on j), so results do not depend on
 * the grid or block size; only sq_norm's summation order depends on the fixed constants
 * HYZO_THREADS and HYZO_CHUNK_GROUPS. No direction is ever stored: z is regenerated in
 * registers wherever it is needed.
 *
 * Memory: a group whose 8 elements all lie in the tensor and whose address is 16-byte
 * aligned is moved with 16-byte vector loads and stores (one for 16-bit types, two for
 * f32); the rest (tensor ends, misaligned tensors) go element by element.
 *
 * Arithmetic: src/backend/cpu.rs is the reference; each pass below says which of its
 * functions it mirrors. All float operations go through the correctly rounded intrinsics
 * of hyzo_device.cuh, so the results are the CPU's bit for bit. */
#include "hyzo_device.cuh"

typedef unsigned short hyzo_u16;

struct Tensor {
    hyzo_u64 data, grad, lo, m, v, numel, offset, first_chunk;
    hyzo_u32 dtype, grad_dtype;
};

/* A table entry, with the moments of state set `set` as m and v. */
__device__ __forceinline__ Tensor load_tensor(const HyzoTensor* t, hyzo_u32 set) {
    Tensor r;
    r.data = __ldg(&t->data);
    r.grad = __ldg(&t->grad);
    r.lo = __ldg(&t->lo);
    r.m = set == HYZO_STATE_FIRST_ORDER ? __ldg(&t->fo_m) : __ldg(&t->m);
    r.v = set == HYZO_STATE_FIRST_ORDER ? __ldg(&t->fo_v) : __ldg(&t->v);
    r.numel = __ldg(&t->numel);
    r.offset = __ldg(&t->offset);
    r.first_chunk = __ldg(&t->first_chunk);
    r.dtype = __ldg(&t->dtype);
    r.grad_dtype = __ldg(&t->grad_dtype);
    return r;
}

/* The tensor holding chunk c: the last entry whose first_chunk is <= c. */
__device__ __forceinline__ hyzo_u32 find_tensor(const HyzoTensor* table, hyzo_u32 n, hyzo_u64 c) {
    hyzo_u32 lo = 0, hi = n - 1;
    while (lo < hi) {
        const hyzo_u32 mid = (lo + hi + 1) >> 1;
        if (__ldg(&table[mid].first_chunk) <= c) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Where group g of a tensor sits in its memory. l0 = 8g - offset is the local index of the
 * group's first element, computed modulo 2^64 so that elements before the tensor wrap to
 * huge indices and fail the `< numel` test. */
struct Group {
    hyzo_u64 g, l0;
    bool full;
};

__device__ __forceinline__ Group make_group(const Tensor& t, hyzo_u64 g) {
    Group r;
    r.g = g;
    r.l0 = 8 * g - t.offset;
    r.full = r.l0 < t.numel && t.numel - r.l0 >= 8;
    return r;
}

__device__ __forceinline__ bool valid(const Tensor& t, const Group& gr, int e) {
    return gr.l0 + (hyzo_u64)e < t.numel;
}

/* ---- loads and stores of 8 elements ---------------------------------------------------- */

__device__ __forceinline__ void unpack16(hyzo_u32 dtype, hyzo_u32 w, float* a, float* b) {
    if (dtype == HYZO_BF16) {
        *a = hyzo_bf16_to_f32((hyzo_u16)(w & 0xFFFFu));
        *b = hyzo_bf16_to_f32((hyzo_u16)(w >> 16));
    } else {
        *a = hyzo_f16_to_f32((hyzo_u16)(w & 0xFFFFu));
        *b = hyzo_f16_to_f32((hyzo_u16)(w >> 16));
    }
}

/* Elements of type dtype at base (local element 0), widened to f32; 0 outside the tensor.
 * `nc` reads through the read-only cache (buffers no pass writes, e.g. gradients). */
template <bool NC>
__device__ __forceinline__ void load8(hyzo_u32 dtype, hyzo_u64 base, const Tensor& t,
                                      const Group& gr, float x[8]) {
    const hyzo_u64 size = dtype == HYZO_F32 ? 4 : 2;
    const hyzo_u64 addr = base + size * gr.l0;
    if (gr.full && (addr & 15) == 0) {
        if (dtype == HYZO_F32) {
            const float4* p = (const float4*)addr;
            const float4 a = NC ? __ldg(p) : p[0];
            const float4 b = NC ? __ldg(p + 1) : p[1];
            x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
            x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
        } else {
            const uint4* p = (const uint4*)addr;
            const uint4 w = NC ? __ldg(p) : p[0];
            unpack16(dtype, w.x, &x[0], &x[1]);
            unpack16(dtype, w.y, &x[2], &x[3]);
            unpack16(dtype, w.z, &x[4], &x[5]);
            unpack16(dtype, w.w, &x[6], &x[7]);
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        x[e] = 0.0f;
        if (!valid(t, gr, e)) continue;
        const hyzo_u64 a = addr + size * (hyzo_u64)e;
        if (dtype == HYZO_F32) {
            x[e] = NC ? __ldg((const float*)a) : *(const float*)a;
        } else {
            const hyzo_u16 h = NC ? __ldg((const hyzo_u16*)a) : *(const hyzo_u16*)a;
            x[e] = dtype == HYZO_BF16 ? hyzo_bf16_to_f32(h) : hyzo_f16_to_f32(h);
        }
    }
}

/* Stores f32 values (already on the dtype's grid for 16-bit types: `h` holds their bits). */
__device__ __forceinline__ void store8_f32(hyzo_u64 base, const Tensor& t, const Group& gr,
                                           const float x[8]) {
    const hyzo_u64 addr = base + 4 * gr.l0;
    if (gr.full && (addr & 15) == 0) {
        float4* p = (float4*)addr;
        p[0] = make_float4(x[0], x[1], x[2], x[3]);
        p[1] = make_float4(x[4], x[5], x[6], x[7]);
        return;
    }
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (valid(t, gr, e)) *(float*)(addr + 4 * (hyzo_u64)e) = x[e];
}

__device__ __forceinline__ void store8_u16(hyzo_u64 base, const Tensor& t, const Group& gr,
                                           const hyzo_u16 h[8]) {
    const hyzo_u64 addr = base + 2 * gr.l0;
    if (gr.full && (addr & 15) == 0) {
        uint4 w;
        w.x = (hyzo_u32)h[0] | ((hyzo_u32)h[1] << 16);
        w.y = (hyzo_u32)h[2] | ((hyzo_u32)h[3] << 16);
        w.z = (hyzo_u32)h[4] | ((hyzo_u32)h[5] << 16);
        w.w = (hyzo_u32)h[6] | ((hyzo_u32)h[7] << 16);
        *(uint4*)addr = w;
        return;
    }
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (valid(t, gr, e)) *(hyzo_u16*)(addr + 2 * (hyzo_u64)e) = h[e];
}

__device__ __forceinline__ hyzo_u16 to_bits16(hyzo_u32 dtype, float x) {
    return dtype == HYZO_BF16 ? hyzo_f32_to_bf16(x) : hyzo_f32_to_f16(x);
}

/* The parameter as f32: `load` of cpu.rs (hi, plus lo in the compensated mode). */
__device__ __forceinline__ void load_param(const Tensor& t, const Group& gr, bool compensated,
                                           float x[8]) {
    load8<false>(t.dtype, t.data, t, gr, x);
    if (compensated && t.lo != 0) {
        float lo[8];
        load8<false>(HYZO_BF16, t.lo, t, gr, lo);
#pragma unroll
        for (int e = 0; e < 8; e++) x[e] = fadd_(x[e], lo[e]);
    }
}

/* `store` of cpu.rs: stochastic with the rounding stream (update passes of the stochastic
 * mode), hi + lo (compensated mode, 16-bit tensors), otherwise nearest. */
__device__ __forceinline__ void store_param(const Tensor& t, const Group& gr, hyzo_u32 precision,
                                            bool stochastic_pass, hyzo_u64 seed, hyzo_u32 step,
                                            const float x[8]) {
    if (t.dtype == HYZO_F32) {
        store8_f32(t.data, t, gr, x); /* every mode stores f32 exactly */
        return;
    }
    hyzo_u16 h[8];
    if (stochastic_pass && precision == HYZO_STOCHASTIC) {
        hyzo_u32 r[8];
        hyzo_rounding_words8(seed, step, gr.g, r);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float s = t.dtype == HYZO_BF16 ? hyzo_stochastic_bf16(x[e], r[e])
                                                 : hyzo_stochastic_f16(x[e], r[e]);
            h[e] = to_bits16(t.dtype, s);
        }
    } else if (precision == HYZO_COMPENSATED && t.lo != 0) {
        hyzo_u16 l[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            h[e] = to_bits16(t.dtype, x[e]);
            const float hi = t.dtype == HYZO_BF16 ? hyzo_bf16_to_f32(h[e]) : hyzo_f16_to_f32(h[e]);
            l[e] = hyzo_f32_to_bf16(fsub_(x[e], hi));
        }
        store8_u16(t.lo, t, gr, l);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) h[e] = to_bits16(t.dtype, x[e]);
    }
    store8_u16(t.data, t, gr, h);
}

__device__ __forceinline__ HyzoTerm term_at(const HyzoPass& p, hyzo_u32 k) {
    if (p.terms != 0) {
        const HyzoTerm* d = (const HyzoTerm*)p.terms;
        HyzoTerm t;
        t.direction = __ldg(&d[k].direction);
        t.coeff = __ldg(&d[k].coeff);
        return t;
    }
    return p.inline_terms[k];
}

/* x += c z for one term (`add_terms` of cpu.rs). */
__device__ __forceinline__ void add_term(const HyzoPass& p, hyzo_u64 g, HyzoTerm term, float x[8]) {
    float z[8];
    hyzo_direction8(p.kind, p.seed, p.step, term.direction, g, z);
#pragma unroll
    for (int e = 0; e < 8; e++) x[e] = fadd_(x[e], fmul_(term.coeff, z[e]));
}

/* ---- the chunk walk --------------------------------------------------------------------- */

template <class Body>
__device__ __forceinline__ void for_each_chunk(const HyzoPass& p, Body& body) {
    const HyzoTensor* table = (const HyzoTensor*)p.table;
    for (hyzo_u64 c = blockIdx.x; c < p.total_chunks; c += gridDim.x) {
        const Tensor t = load_tensor(table + find_tensor(table, p.ntensors, c), p.state_set);
        const hyzo_u64 last = (t.offset + t.numel - 1) >> 3;
        const hyzo_u64 g0 = (t.offset >> 3) + (c - t.first_chunk) * HYZO_CHUNK_GROUPS;
        const hyzo_u64 g1 = min(g0 + (HYZO_CHUNK_GROUPS - 1), last);
        for (hyzo_u64 g = g0 + threadIdx.x; g <= g1; g += HYZO_THREADS) body.group(t, make_group(t, g));
        body.end_chunk(c);
    }
}

/* ---- perturb: θ ← θ + Σ_k c_k z_k, rounded once (`perturb_chunk`) ----------------------- */

struct PerturbBody {
    const HyzoPass& p;
    __device__ void group(const Tensor& t, const Group& gr) {
        const bool comp = p.precision == HYZO_COMPENSATED;
        float x[8];
        load_param(t, gr, comp, x);
        for (hyzo_u32 k = 0; k < p.nterms; k++) add_term(p, gr.g, term_at(p, k), x);
        store_param(t, gr, p.precision, false, p.seed, p.step, x);
    }
    __device__ void end_chunk(hyzo_u64) {}
};

extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2) hyzo_perturb(const __grid_constant__ HyzoPass p) {
    PerturbBody body{p};
    for_each_chunk(p, body);
}

/* ---- restore_and_update / fo_update (`update_chunk`) ------------------------------------
 * x = θ (+ lo) + c_r z_r; ĝ = Σ_d w_d z_d; ĝ = α ∇ + (1 − α) ĝ with a gradient;
 * θ ← rule(x, ĝ), m and v updated, rounded once (stochastically in that mode). The
 * restore's direction is generated once when it is also a zeroth-order term. When the
 * losses were checked on the device and one was not finite (*skip_flag), the pass only
 * restores, exactly like the host's restore-only perturb pass. */

template <bool ZO>
struct UpdateBody {
    const HyzoPass& p;
    bool skip;
    HyzoRule rule;
    __device__ void group(const Tensor& t, const Group& gr) {
        const bool comp = p.precision == HYZO_COMPENSATED;
        float x[8];
        load_param(t, gr, comp, x);
        if (ZO && skip) {
            if (p.has_restore) add_term(p, gr.g, p.restore, x);
            store_param(t, gr, p.precision, false, p.seed, p.step, x);
            return;
        }
        float g[8];
#pragma unroll
        for (int e = 0; e < 8; e++) g[e] = 0.0f;
        if (ZO) {
            if (p.has_restore && p.restore_slot < 0) add_term(p, gr.g, p.restore, x);
            for (hyzo_u32 k = 0; k < p.nterms; k++) {
                const HyzoTerm term = term_at(p, k);
                float z[8];
                hyzo_direction8(p.kind, p.seed, p.step, term.direction, gr.g, z);
#pragma unroll
                for (int e = 0; e < 8; e++) g[e] = fadd_(g[e], fmul_(term.coeff, z[e]));
                if (p.has_restore && (hyzo_i32)k == p.restore_slot) {
#pragma unroll
                    for (int e = 0; e < 8; e++) x[e] = fadd_(x[e], fmul_(p.restore.coeff, z[e]));
                }
            }
        }
        if (p.has_grad) {
            float gr8[8];
            load8<true>(t.grad_dtype, t.grad, t, gr, gr8);
            const float a = p.grad_weight, b = fsub_(1.0f, p.grad_weight);
#pragma unroll
            for (int e = 0; e < 8; e++) g[e] = fadd_(fmul_(a, gr8[e]), fmul_(b, g[e]));
        }
        float m[8], v[8];
        if (t.m != 0) load8<false>(HYZO_F32, t.m, t, gr, m);
        else
#pragma unroll
            for (int e = 0; e < 8; e++) m[e] = 0.0f;
        if (t.v != 0) load8<false>(HYZO_F32, t.v, t, gr, v);
        else
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = 0.0f;
        hyzo_apply_rule8(rule, x, g, m, v);
        if (t.m != 0) store8_f32(t.m, t, gr, m);
        if (t.v != 0) store8_f32(t.v, t, gr, v);
        store_param(t, gr, p.precision, true, p.seed, p.step, x);
    }
    __device__ void end_chunk(hyzo_u64) {}
};

__device__ __forceinline__ bool read_skip(const HyzoPass& p) {
    return p.skip_flag != 0 && *(const volatile hyzo_u32*)p.skip_flag != 0u;
}

/* The rule of an update pass. When steps may have been skipped on the device (skip_count
 * set), the host's t counts them and the bias corrections are redone here for the true t:
 * the host cannot know it without a synchronization. */
__device__ __forceinline__ HyzoRule update_rule(const HyzoPass& p) {
    HyzoRule r = p.rule;
    if (p.skip_count != 0 && (r.rule == HYZO_ADAMW || r.rule == HYZO_ADAZO)) {
        const hyzo_u64 t = p.t - *(const volatile hyzo_u64*)p.skip_count;
        r.bias_correction1 = hyzo_bias_correction(r.beta1, t);
        r.bias_correction2 = hyzo_bias_correction(r.beta2, t);
    }
    return r;
}

extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2) hyzo_restore_and_update(const __grid_constant__ HyzoPass p) {
    UpdateBody<true> body{p, read_skip(p), update_rule(p)};
    for_each_chunk(p, body);
}

extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2) hyzo_fo_update(const __grid_constant__ HyzoPass p) {
    UpdateBody<false> body{p, false, update_rule(p)};
    for_each_chunk(p, body);
}

/* ---- sq_norm: Σ z² per chunk in f64, then a fixed-order sum of the chunks ----------------
 * Thread k adds its groups' squares in order, the block combines its threads by a fixed
 * tree; hyzo_sq_norm_final sums the per-chunk partials with one block in a fixed order. The
 * result depends only on the compile-time constants, never on the grid. */

__device__ __forceinline__ double block_sum(double v, double* shared) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads(); /* the previous chunk's readers are done with `shared` */
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < HYZO_THREADS / 32; w++) total += shared[w];
    return total;
}

struct SqNormBody {
    const HyzoPass& p;
    double* shared;
    double acc;
    __device__ void group(const Tensor& t, const Group& gr) {
        float z[8];
        hyzo_direction8(p.kind, p.seed, p.step, p.direction, gr.g, z);
#pragma unroll
        for (int e = 0; e < 8; e++)
            if (valid(t, gr, e)) acc += (double)z[e] * (double)z[e];
    }
    __device__ void end_chunk(hyzo_u64 c) {
        const double total = block_sum(acc, shared);
        if (threadIdx.x == 0) ((double*)p.partials)[c] = total;
        acc = 0.0;
    }
};

extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2) hyzo_sq_norm(const __grid_constant__ HyzoPass p) {
    __shared__ double shared[HYZO_THREADS / 32];
    SqNormBody body{p, shared, 0.0};
    for_each_chunk(p, body);
}

/* Sums p.total_chunks partials into partials[total_chunks] (one block). */
extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2) hyzo_sq_norm_final(const __grid_constant__ HyzoPass p) {
    __shared__ double shared[HYZO_THREADS / 32];
    const double* partials = (const double*)p.partials;
    double acc = 0.0;
    for (hyzo_u64 c = threadIdx.x; c < p.total_chunks; c += HYZO_THREADS) acc += partials[c];
    const double total = block_sum(acc, shared);
    if (threadIdx.x == 0) ((double*)p.partials)[p.total_chunks] = total;
}

/* ---- device losses: g_d, the finiteness check and the skip counter -----------------------
 * Mirrors Optimizer::projected_grads: two-sided g_d = (L[2d] − L[2d+1]) / (2μ), one-sided
 * g_d = (L[d+1] − L[0]) / μ; the coefficient is g_d · base_d. A step with a non-finite
 * loss, g_d or coefficient (spec v2 §4) sets *skip_flag (the update pass then only
 * restores) and counts in *skip_count. */
extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2) hyzo_device_losses(const __grid_constant__ HyzoLossPass p) {
    const float* losses = (const float*)p.losses;
    const hyzo_u32 n = p.estimator == HYZO_TWO_SIDED ? 2 * p.q : p.q + 1;
    int bad = 0;
    for (hyzo_u32 i = threadIdx.x; i < n; i += HYZO_THREADS) bad |= !isfinite(losses[i]);
    HyzoTerm* out = (HyzoTerm*)p.out;
    for (hyzo_u32 d = threadIdx.x; d < p.q; d += HYZO_THREADS) {
        HyzoTerm base;
        if (p.base != 0) base = ((const HyzoTerm*)p.base)[d];
        else base = p.inline_base[d];
        const float gd = p.estimator == HYZO_TWO_SIDED
                             ? fdiv_(fsub_(losses[2 * d], losses[2 * d + 1]), fmul_(2.0f, p.eps))
                             : fdiv_(fsub_(losses[d + 1], losses[0]), p.eps);
        HyzoTerm t;
        t.direction = base.direction;
        t.coeff = fmul_(gd, base.coeff);
        bad |= !isfinite(gd) || !isfinite(t.coeff);
        out[d] = t;
    }
    const int any_bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
        *(hyzo_u32*)p.skip_flag = any_bad ? 1u : 0u;
        if (any_bad) *(hyzo_u64*)p.skip_count += 1;
    }
}
