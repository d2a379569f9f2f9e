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
 * f32); the rest (tensor ends, buffers aligned unlike the data) go element by element. A
 * tensor whose data address and global offset disagree modulo 16 bytes (every tensor after
 * an odd-sized one, say) is cut into groups by ADDRESS instead: 8 elements from a 16-byte
 * boundary, j0 = 8g - d (d its shift, fixed by the tensor), whose direction entries and
 * rounding words come from the (up to 3 Gaussian, 2 Rademacher) Philox blocks that cover
 * them (hyzo_direction8_at_k: the same values at the same j, spec §3), and scalar head and
 * tail groups. The backend places m, v, fo_m, fo_v and lo so that they are aligned like the
 * data (src/backend/cuda/mod.rs `vector_offset`); a gradient (user memory) aligned unlike
 * its data is read element by element, the rest of the group still vectorized. sq_norm
 * reads no memory and keeps the index-aligned groups.
 *
 * Arithmetic: src/backend/cpu.rs is the reference; each pass below says which of its
 * functions it mirrors. All float operations go through the correctly rounded intrinsics
 * of hyzo_device.cuh. Two variants of every pass:
 *  - fast (what users get): Gaussian entries from the hardware units (lg2/sqrt/sin/cos
 *    .approx, within spec v2 §3's tolerance: docs/interpretation.md), bf16/f16 rounding by
 *    cvt.rn.{bf16,f16}x2; everything else (Philox, Rademacher, rules, stochastic rounding)
 *    as the CPU computes it;
 *  - exact (a test instrument: HYZO_CUDA_EXACT=1 or CudaBackend::set_exact): the CPU's f32
 *    Gaussian operation for operation, so results equal the CPU's bit for bit.
 *
 * Specialization: each pass is ONE template (perturb_pass, update_pass, sq_norm_pass) over
 * a Spec: variant, direction kind, precision mode, rule and (perturb) term count as
 * compile-time constants, or -1 for "read from the launch parameters". The fast kernels
 * are instantiations with constants for the direction kind, the rule and (perturb) the
 * number of terms (the host picks one by name, see "the entry points" below and
 * src/backend/cuda/device.rs), and specialize the group loop per tensor dtype (one branch
 * per chunk); the precision mode stays a launch value (one uniform test per group: a
 * constant would triple the kernels and the build time). The exact kernels keep runtime
 * values (one kernel per pass).
 *
 * Low-rank directions (spec §7; HyzoPass.lowrank = 1 in the passes of a low-rank step): a
 * tensor with HyzoTensor.rank != 0 takes Z = A Bᵀ · scale, which the caller's forward pass
 * applies. The chunk walk tests it once per chunk (uniform, no per-element cost, not in the
 * group loop the SASS budget counts): perturb passes skip its chunks; restore_and_update
 * rebuilds ĝ = Σ_k w_k Z_k there with no restore term (`LowRankTerms` of cpu.rs), Z_k[i, c]
 * = hyzo_lowrank_entry (f32 dot product in order, no FMA) from the factors of term k, which
 * hyzo_lowrank_factors_{exact,f} wrote just before into a device scratch (block k at
 * factor_base + k · factor_stride floats; the same kernel serves Backend::lowrank_factors),
 * then the same mix, rule and stores as every tensor; a step skipped on the device leaves
 * such a tensor unwritten. fo_update and sq_norm run with lowrank = 0 (every tensor as
 * usual). The factors are the variant's Gaussian (the function the passes use), so each
 * variant agrees with itself bit for bit, and the exact one with the CPU. */
#include "hyzo_device.cuh"

typedef unsigned short hyzo_u16;

struct Tensor {
    /* voffset = offset + shift: the groups of a tensor are the 8-aligned runs of
     * j + shift (shift = 0: of the global index j itself). */
    hyzo_u64 data, grad, lo, m, v, numel, offset, voffset, first_chunk;
    hyzo_u32 dtype, grad_dtype, shift;
    /* Whether each buffer's groups are 16-byte aligned: the address of group g is
     * base + size (8g - voffset), and 8g·size is a multiple of 16, so this is a property of
     * the tensor (tested once per chunk), not of the group. */
    bool vec_data, vec_grad, vec_lo, vec_m, vec_v;
};

__device__ __forceinline__ bool vec_ok(hyzo_u64 base, hyzo_u64 size, hyzo_u64 offset) {
    return ((base - size * offset) & 15) == 0;
}

/* The shift that makes the data's groups 16-byte aligned: d in [0, 16 / size) with
 * base - size (offset + d) = 0 mod 16. 0 when the data is not element-aligned or when
 * offset + numel + d would pass 2^64. src/backend/cuda/mod.rs (`vector_offset`) computes
 * the same to place the state buffers. */
__device__ __forceinline__ hyzo_u32 data_shift(hyzo_u64 base, hyzo_u64 size, hyzo_u64 offset,
                                               hyzo_u64 numel) {
    if ((base & (size - 1)) != 0) return 0;
    const hyzo_u64 d = ((base / size) - offset) & (16 / size - 1);
    return offset + numel - 1 > ~0ull - d ? 0u : (hyzo_u32)d;
}

/* The vector tests of every buffer, for the tensor's groups (t.voffset). */
__device__ __forceinline__ void set_vec(Tensor& r) {
    r.vec_data = vec_ok(r.data, r.dtype == HYZO_F32 ? 4 : 2, r.voffset);
    r.vec_grad = vec_ok(r.grad, r.grad_dtype == HYZO_F32 ? 4 : 2, r.voffset);
    r.vec_lo = vec_ok(r.lo, 2, r.voffset);
    r.vec_m = vec_ok(r.m, 4, r.voffset);
    r.vec_v = vec_ok(r.v, 4, r.voffset);
}

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
    r.shift = 0;
    r.voffset = r.offset;
    set_vec(r);
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

/* Where group g of a tensor sits in its memory. l0 = 8g - voffset is the local index of the
 * group's first element, computed modulo 2^64 so that elements before the tensor wrap to
 * huge indices and fail the `< numel` test; j0 = 8g - shift is its global index (8g when
 * the tensor is not shifted). */
struct Group {
    hyzo_u64 g, l0, j0;
    bool full;
};

__device__ __forceinline__ Group make_group(const Tensor& t, hyzo_u64 g) {
    Group r;
    r.g = g;
    r.l0 = 8 * g - t.voffset;
    r.j0 = 8 * g - t.shift;
    r.full = r.l0 < t.numel && t.numel - r.l0 >= 8;
    return r;
}

__device__ __forceinline__ bool valid(const Tensor& t, const Group& gr, int e) {
    return gr.l0 + (hyzo_u64)e < t.numel;
}

/* ---- the specialization ---------------------------------------------------------------
 * V < 0: the value comes from the launch parameters; otherwise it is the constant V. PROBE
 * (only under HYZO_SASS_PROBE, for scripts/sass-budget) also fixes the hot path's launch
 * values: q = NTERMS terms, the restore's direction the last term's, no gradient (GRAD = 0)
 * or a bf16 one, a step not skipped, bf16 parameters. */
template <bool FAST, int KIND, int PREC, int RULE, int NTERMS = -1, int GRAD = -1, bool PROBE = false,
          bool PROBE_SHIFTED = false>
struct Spec {
    static constexpr bool fast = FAST;
    static constexpr bool probe = PROBE;
    /* (probe) every tensor takes the groups cut by address */
    static constexpr bool probe_shifted = PROBE_SHIFTED;
    /* Specialize the group loop per dtype (fast kernels; the exact ones stay small). */
    static constexpr bool by_dtype = FAST;
    __device__ static hyzo_u32 kind(const HyzoPass& p) { return KIND >= 0 ? (hyzo_u32)KIND : p.kind; }
    __device__ static hyzo_u32 precision(const HyzoPass& p) {
        return PREC >= 0 ? (hyzo_u32)PREC : p.precision;
    }
    __device__ static hyzo_u32 rule(const HyzoRule& r) { return RULE >= 0 ? (hyzo_u32)RULE : r.rule; }
    __device__ static hyzo_u32 nterms(const HyzoPass& p) {
        return NTERMS >= 0 ? (hyzo_u32)NTERMS : p.nterms;
    }
    __device__ static bool has_grad(const HyzoPass& p) { return GRAD >= 0 ? GRAD != 0 : p.has_grad != 0; }
    __device__ static bool has_restore(const HyzoPass& p) { return PROBE ? true : p.has_restore != 0; }
    __device__ static hyzo_i32 restore_slot(const HyzoPass& p) {
        return PROBE ? (hyzo_i32)NTERMS - 1 : p.restore_slot;
    }
    __device__ static hyzo_u32 grad_dtype(hyzo_u32 dt) { return PROBE ? HYZO_BF16 : dt; }
};

/* The element type of a loop specialized for DT (or the tensor's, DT < 0). */
template <int DT>
__device__ __forceinline__ hyzo_u32 dtype_of(const Tensor& t) {
    return DT >= 0 ? (hyzo_u32)DT : t.dtype;
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
__device__ __forceinline__ void load8(hyzo_u32 dtype, hyzo_u64 base, bool vec, const Tensor& t,
                                      const Group& gr, float x[8]) {
    const hyzo_u64 size = dtype == HYZO_F32 ? 4 : 2;
    const hyzo_u64 addr = base + size * gr.l0;
    if (gr.full && vec) {
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
__device__ __forceinline__ void store8_f32(hyzo_u64 base, bool vec, const Tensor& t, const Group& gr,
                                           const float x[8]) {
    const hyzo_u64 addr = base + 4 * gr.l0;
    if (gr.full && vec) {
        float4* p = (float4*)addr;
        p[0] = make_float4(x[0], x[1], x[2], x[3]);
        p[1] = make_float4(x[4], x[5], x[6], x[7]);
        return;
    }
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (valid(t, gr, e)) *(float*)(addr + 4 * (hyzo_u64)e) = x[e];
}

__device__ __forceinline__ void store8_u16(hyzo_u64 base, bool vec, const Tensor& t, const Group& gr,
                                           const hyzo_u16 h[8]) {
    const hyzo_u64 addr = base + 2 * gr.l0;
    if (gr.full && vec) {
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

/* Round to nearest, 8 values: the integer rounding of dtype.rs (exact variant: NaN payloads
 * kept as `half` keeps them), or the hardware's cvt.rn.{bf16,f16}x2.f32, two values per
 * instruction (fast variant: the same bits for every non-NaN value; a NaN becomes the
 * canonical NaN). */
template <bool FAST>
__device__ __forceinline__ void round8(hyzo_u32 dtype, const float x[8], hyzo_u16 h[8]) {
    if (FAST) {
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
            hyzo_u32 w;
#ifdef HYZO_HOST_BUILD /* kernels/hyzo_host.h: cvt.rn's bits, a NaN its canonical 0x7FFF */
            w = (hyzo_u32)(x[e] != x[e] ? 0x7FFFu : to_bits16(dtype, x[e])) |
                ((hyzo_u32)(x[e + 1] != x[e + 1] ? 0x7FFFu : to_bits16(dtype, x[e + 1])) << 16);
#else
            if (dtype == HYZO_BF16)
                asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(x[e + 1]), "f"(x[e]));
            else
                asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(x[e + 1]), "f"(x[e]));
#endif
            h[e] = (hyzo_u16)(w & 0xFFFFu);
            h[e + 1] = (hyzo_u16)(w >> 16);
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) h[e] = to_bits16(dtype, x[e]);
    }
}

/* The parameter as f32: `load` of cpu.rs (hi, plus lo in the compensated mode). */
__device__ __forceinline__ void load_param(const Tensor& t, hyzo_u32 dtype, const Group& gr,
                                           bool compensated, float x[8]) {
    load8<false>(dtype, t.data, t.vec_data, t, gr, x);
    if (compensated && t.lo != 0) {
        float lo[8];
        load8<false>(HYZO_BF16, t.lo, t.vec_lo, t, gr, lo);
#pragma unroll
        for (int e = 0; e < 8; e++) x[e] = fadd_(x[e], lo[e]);
    }
}

/* `store` of cpu.rs: stochastic with the rounding stream (update passes of the stochastic
 * mode), hi + lo (compensated mode, 16-bit tensors), otherwise nearest. */
template <bool FAST, bool SHIFT>
__device__ __forceinline__ void store_param(const Tensor& t, hyzo_u32 dtype, const Group& gr,
                                            hyzo_u32 precision, bool stochastic_pass,
                                            const HyzoKeys& keys, hyzo_u32 step, const float x[8]) {
    if (dtype == HYZO_F32) {
        store8_f32(t.data, t.vec_data, t, gr, x); /* every mode stores f32 exactly */
        return;
    }
    hyzo_u16 h[8];
    if (stochastic_pass && precision == HYZO_STOCHASTIC) {
        hyzo_u32 r[8];
        if (SHIFT) hyzo_rounding_words8_at_k(keys, step, gr.j0, r);
        else hyzo_rounding_words8k(keys, step, gr.g, r);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float s = dtype == HYZO_BF16 ? hyzo_stochastic_bf16(x[e], r[e])
                                               : hyzo_stochastic_f16(x[e], r[e]);
            h[e] = to_bits16(dtype, s);
        }
    } else if (precision == HYZO_COMPENSATED && t.lo != 0) {
        hyzo_u16 l[8];
        round8<FAST>(dtype, x, h);
        float rest[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float hi = dtype == HYZO_BF16 ? hyzo_bf16_to_f32(h[e]) : hyzo_f16_to_f32(h[e]);
            rest[e] = fsub_(x[e], hi);
        }
        round8<FAST>(HYZO_BF16, rest, l);
        store8_u16(t.lo, t.vec_lo, t, gr, l);
    } else {
        round8<FAST>(dtype, x, h);
    }
    store8_u16(t.data, t.vec_data, t, gr, h);
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

/* What every pass of a launch shares: the parameters, the round keys of the seed and the
 * step (the launch's, or in the device-counter mode the device counter's, HyzoPass.counters,
 * read once at kernel start; the probe kernels keep the launch value). */
struct Launch {
    const HyzoPass& p;
    HyzoKeys keys;
    hyzo_u32 step;
};

template <class S>
__device__ __forceinline__ hyzo_u32 launch_step(const HyzoPass& p) {
    /* In that mode p.step is the pass's distance from the counter's step: 0 for the passes
     * of a step, another value for a displacement at another step. */
    if (!S::probe && p.counters != 0)
        return (hyzo_u32)((const volatile HyzoCounters*)p.counters)->step + p.step;
    return p.step;
}

template <class S>
__device__ __forceinline__ Launch make_launch(const HyzoPass& p) {
    return Launch{p, hyzo_keys(p.seed), launch_step<S>(p)};
}

/* z of one direction for a group (the variant and kind of the Spec): the index-aligned
 * group gr.g, or (SHIFT) the 8 entries from gr.j0, which straddle Philox blocks. */
template <class S, bool SHIFT>
__device__ __forceinline__ void direction8(const Launch& L, hyzo_u32 direction, const Group& gr,
                                           float z[8]) {
    if (SHIFT) hyzo_direction8_at_k<S::fast>(S::kind(L.p), L.keys, L.step, direction, gr.j0, z);
    else hyzo_direction8k<S::fast>(S::kind(L.p), L.keys, L.step, direction, gr.g, z);
}

/* x += c z for one term (`add_terms` of cpu.rs). */
template <class S, bool SHIFT>
__device__ __forceinline__ void add_term(const Launch& L, const Group& gr, HyzoTerm term, float x[8]) {
    float z[8];
    direction8<S, SHIFT>(L, term.direction, gr, z);
#pragma unroll
    for (int e = 0; e < 8; e++) x[e] = fadd_(x[e], fmul_(term.coeff, z[e]));
}

/* ---- the chunk walk ---------------------------------------------------------------------
 * Each chunk's group loop is instantiated per dtype in the fast kernels (S::by_dtype): the
 * dtype test runs once per chunk, never per element.
 *
 * Groups cut by address (SHIFT): a tensor whose data address and global offset disagree
 * modulo 16 bytes (shift d != 0, e.g. every tensor after an odd-sized one) takes the groups
 * of j + d instead of j: group g holds elements j0 = 8g - d .. j0 + 7, whose data are one
 * aligned 16-byte vector (two for f32), and its entries come from the Philox blocks that
 * cover them (hyzo_direction8_at_k). The chunk numbering stays the host's (index-aligned
 * groups, HyzoTensor.first_chunk): chunk k of the tensor takes shifted groups
 * g0 + k·CHUNK .., and its last chunk also the one group the shift may add. One loop for
 * every dtype (the dtype is a uniform test per group there). sq_norm reads no memory and
 * keeps the index-aligned groups (its summation order is unchanged). */

template <class S, int DT, bool SHIFT, class Body>
__device__ __forceinline__ void chunk_groups(const Tensor& t0, hyzo_u64 g0, hyzo_u64 g1, Body& body) {
    Tensor t = t0;
    if (DT >= 0 && !SHIFT) t.vec_data = vec_ok(t.data, DT == (int)HYZO_F32 ? 4 : 2, t.offset);
    for (hyzo_u64 g = g0 + threadIdx.x; g <= g1; g += HYZO_THREADS)
        body.template group<DT, SHIFT>(t, make_group(t, g));
}

/* Chunk k of a shifted tensor (t.shift != 0); `last` is its last index-aligned group. */
template <class S, class Body>
__device__ __forceinline__ void shifted_chunk(Tensor& t, hyzo_u64 k, hyzo_u64 last, Body& body) {
    t.voffset = t.offset + t.shift;
    set_vec(t);
    const hyzo_u64 vlast = (t.voffset + t.numel - 1) >> 3;
    const hyzo_u64 v0 = (t.voffset >> 3) + k * HYZO_CHUNK_GROUPS;
    const bool tail = k == (last - (t.offset >> 3)) / HYZO_CHUNK_GROUPS;
    const hyzo_u64 v1 = tail ? vlast : min(v0 + (HYZO_CHUNK_GROUPS - 1), vlast);
    chunk_groups<S, -1, true>(t, v0, v1, body);
}

template <class S, class Body>
__device__ __forceinline__ void for_each_chunk(const HyzoPass& p, Body& body) {
    const HyzoTensor* table = (const HyzoTensor*)p.table;
    for (hyzo_u64 c = blockIdx.x; c < p.total_chunks; c += gridDim.x) {
        const hyzo_u32 ti = find_tensor(table, p.ntensors, c);
        if (!S::probe && p.tensor_mask != 0 && __ldg((const unsigned char*)p.tensor_mask + ti) == 0) {
            body.end_chunk(c); /* a tensor the pass leaves alone (uniform per chunk) */
            continue;
        }
        const HyzoTensor* entry = table + ti;
        Tensor t = load_tensor(entry, p.state_set);
        const hyzo_u64 last = (t.offset + t.numel - 1) >> 3;
        const hyzo_u64 k = c - t.first_chunk;
        const hyzo_u64 g0 = (t.offset >> 3) + k * HYZO_CHUNK_GROUPS;
        const hyzo_u64 g1 = min(g0 + (HYZO_CHUNK_GROUPS - 1), last);
        /* A low-rank tensor under low-rank directions (spec §7): a uniform test per chunk;
         * its chunks take the body's low-rank path (perturb: none), with the index-aligned
         * groups (the factors' reads dominate there, not the vector width). */
        if (p.lowrank != 0 && __ldg(&entry->rank) != 0) {
            body.lowrank_chunk(entry, t, g0, g1);
            body.end_chunk(c);
            continue;
        }
        if constexpr ((!S::probe || S::probe_shifted) && Body::by_address) {
            t.shift = data_shift(t.data, t.dtype == HYZO_F32 ? 4 : 2, t.offset, t.numel);
            if (S::probe_shifted || t.shift != 0) {
                shifted_chunk<S>(t, k, last, body);
                body.end_chunk(c);
                continue;
            }
        }
        if constexpr (S::probe) {
            chunk_groups<S, HYZO_BF16, false>(t, g0, g1, body);
        } else if constexpr (S::by_dtype) {
            if (t.dtype == HYZO_BF16) chunk_groups<S, HYZO_BF16, false>(t, g0, g1, body);
            else if (t.dtype == HYZO_F16) chunk_groups<S, HYZO_F16, false>(t, g0, g1, body);
            else chunk_groups<S, HYZO_F32, false>(t, g0, g1, body);
        } else {
            chunk_groups<S, -1, false>(t, g0, g1, body);
        }
        body.end_chunk(c);
    }
}

/* ---- perturb: θ ← θ + Σ_k c_k z_k, rounded once (`perturb_chunk`) ----------------------- */

template <class S>
struct PerturbBody {
    static constexpr bool by_address = true;
    const Launch& L;
    template <int DT, bool SHIFT>
    __device__ __forceinline__ void group(const Tensor& t, const Group& gr) {
        const HyzoPass& p = L.p;
        const hyzo_u32 dt = dtype_of<DT>(t);
        const hyzo_u32 prec = S::precision(p);
        float x[8];
        load_param(t, dt, gr, prec == HYZO_COMPENSATED, x);
        const hyzo_u32 n = S::nterms(p);
#pragma unroll 2
        for (hyzo_u32 k = 0; k < n; k++) add_term<S, SHIFT>(L, gr, term_at(p, k), x);
        store_param<S::fast, SHIFT>(t, dt, gr, prec, false, L.keys, L.step, x);
    }
    /* Low-rank tensors are perturbed by the forward pass (spec §7): never written here. */
    __device__ __forceinline__ void lowrank_chunk(const HyzoTensor*, const Tensor&, hyzo_u64, hyzo_u64) {}
    __device__ void end_chunk(hyzo_u64) {}
};

template <class S>
__device__ __forceinline__ void perturb_pass(const HyzoPass& p) {
    const Launch L = make_launch<S>(p);
    PerturbBody<S> body{L};
    for_each_chunk<S>(p, body);
}

/* ---- restore_and_update / fo_update (`update_chunk`) ------------------------------------
 * x = θ (+ lo) + c_r z_r; ĝ = Σ_d w_d z_d; ĝ = α ∇ + (1 − α) ĝ with a gradient;
 * θ ← rule(x, ĝ), m and v updated, rounded once (stochastically in that mode). The
 * restore's direction is generated once when it is also a zeroth-order term. When the
 * losses were checked on the device and one was not finite (*skip_flag), the pass only
 * restores, exactly like the host's restore-only perturb pass. Everything the group reads
 * (θ, lo, the gradient, m, v) is loaded before the directions are generated, so that the
 * loads' latency hides behind the generation. */

template <class S, bool ZO>
struct UpdateBody {
    static constexpr bool by_address = true;
    const Launch& L;
    bool skip;
    HyzoRule rule;

    /* Everything a group reads (θ, lo, the gradient, m, v), loaded first so that the loads'
     * latency hides behind the generation. */
    __device__ __forceinline__ void load(const Tensor& t, hyzo_u32 dt, const Group& gr, float x[8],
                                         float gr8[8], float m[8], float v[8]) {
        const HyzoPass& p = L.p;
        const hyzo_u32 r = S::rule(rule);
        const bool uses_m = r != HYZO_SGD && r != HYZO_SIGN;
        const bool uses_v = r == HYZO_ADAMW || r == HYZO_ADAZO;
        load_param(t, dt, gr, S::precision(p) == HYZO_COMPENSATED, x);
        if (S::has_grad(p)) load8<true>(S::grad_dtype(t.grad_dtype), t.grad, t.vec_grad, t, gr, gr8);
        if (uses_m && t.m != 0) load8<false>(HYZO_F32, t.m, t.vec_m, t, gr, m);
        else
#pragma unroll
            for (int e = 0; e < 8; e++) m[e] = 0.0f;
        if (uses_v && t.v != 0) load8<false>(HYZO_F32, t.v, t.vec_v, t, gr, v);
        else
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = 0.0f;
    }

    /* The mix with the gradient, the rule, the stores. */
    template <bool SHIFT>
    __device__ __forceinline__ void finish(const Tensor& t, hyzo_u32 dt, const Group& gr, float x[8],
                                           float g[8], const float gr8[8], float m[8], float v[8]) {
        const HyzoPass& p = L.p;
        const hyzo_u32 r = S::rule(rule);
        const bool uses_m = r != HYZO_SGD && r != HYZO_SIGN;
        const bool uses_v = r == HYZO_ADAMW || r == HYZO_ADAZO;
        if (S::has_grad(p)) {
            const float a = p.grad_weight, b = fsub_(1.0f, p.grad_weight);
            if (!ZO && a == 1.0f) {
                /* A first-order step (α = 1): 1·∇ is ∇ itself (a NaN stays a NaN), so only
                 * the addition of (1 − α)·0 is left. */
                const float b0 = fmul_(b, 0.0f);
#pragma unroll
                for (int e = 0; e < 8; e++) g[e] = fadd_(gr8[e], b0);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) g[e] = fadd_(fmul_(a, gr8[e]), fmul_(b, g[e]));
            }
        }
        HyzoRule rr = rule;
        rr.rule = r;
        hyzo_apply_rule8(rr, x, g, m, v);
        if (uses_m && t.m != 0) store8_f32(t.m, t.vec_m, t, gr, m);
        if (uses_v && t.v != 0) store8_f32(t.v, t.vec_v, t, gr, v);
        store_param<S::fast, SHIFT>(t, dt, gr, S::precision(p), true, L.keys, L.step, x);
    }

    template <int DT, bool SHIFT>
    __device__ __forceinline__ void group(const Tensor& t, const Group& gr) {
        const HyzoPass& p = L.p;
        const hyzo_u32 dt = dtype_of<DT>(t);
        float x[8], gr8[8], m[8], v[8];
        load(t, dt, gr, x, gr8, m, v);
        if (ZO && !S::probe && skip) {
            if (p.has_restore) add_term<S, SHIFT>(L, gr, p.restore, x);
            store_param<S::fast, SHIFT>(t, dt, gr, S::precision(p), false, L.keys, L.step, x);
            return;
        }
        float g[8];
#pragma unroll
        for (int e = 0; e < 8; e++) g[e] = 0.0f;
        if (ZO) {
            const bool restore = S::has_restore(p);
            const hyzo_i32 slot = S::restore_slot(p);
            if (restore && slot < 0) add_term<S, SHIFT>(L, gr, p.restore, x);
            const hyzo_u32 n = S::nterms(p);
            for (hyzo_u32 k = 0; k < n; k++) {
                const HyzoTerm term = term_at(p, k);
                float z[8];
                direction8<S, SHIFT>(L, term.direction, gr, z);
#pragma unroll
                for (int e = 0; e < 8; e++) g[e] = fadd_(g[e], fmul_(term.coeff, z[e]));
                if (restore && (hyzo_i32)k == slot) {
#pragma unroll
                    for (int e = 0; e < 8; e++) x[e] = fadd_(x[e], fmul_(p.restore.coeff, z[e]));
                }
            }
        }
        finish<SHIFT>(t, dt, gr, x, g, gr8, m, v);
    }

    /* A low-rank tensor (spec §7; `LowRankTerms` of cpu.rs): never perturbed, so no
     * restore; ĝ[e] = Σ_k w_k Z_k[e] in the order of the terms, Z_k rebuilt from the
     * factors of term k (block k at factor_base); a step skipped on the device leaves the
     * tensor unwritten. Element (i, c) of a group: (i, c) of its first element in the
     * tensor, computed once, then stepped. The dtype stays a launch value here (the dot
     * products dominate). */
    __device__ __forceinline__ void lowrank_chunk(const HyzoTensor* entry, const Tensor& t, hyzo_u64 g0,
                                                  hyzo_u64 g1) {
        if constexpr (!ZO || S::probe) {
            return; /* fo_update runs with p.lowrank = 0; the probes never get here */
        } else {
            if (skip) return;
            const HyzoPass& p = L.p;
            const hyzo_u64 cols = __ldg(&entry->cols);
            const hyzo_u32 rank = __ldg(&entry->rank);
            const float scale = __ldg(&entry->scale);
            const float* a0 = (const float*)p.factor_base + __ldg(&entry->factor_offset);
            const hyzo_u64 b_at = (t.numel / cols) * rank; /* B after A (rows x rank) */
            const hyzo_u32 n = S::nterms(p);
            for (hyzo_u64 gi = g0 + threadIdx.x; gi <= g1; gi += HYZO_THREADS) {
                const Group gr = make_group(t, gi);
                const hyzo_u32 dt = t.dtype;
                float x[8], gr8[8], m[8], v[8], g[8];
                load(t, dt, gr, x, gr8, m, v);
                /* The first element inside the tensor: 0, or past the wrapped l0. */
                const hyzo_u64 e0 = gr.l0 < t.numel ? 0 : (hyzo_u64)0 - gr.l0;
                const hyzo_u64 l = gr.l0 + e0;
                hyzo_u64 i = l / cols, c = l - i * cols;
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    g[e] = 0.0f;
                    if ((hyzo_u64)e < e0 || !valid(t, gr, e)) continue;
                    for (hyzo_u32 k = 0; k < n; k++) {
                        const HyzoTerm term = term_at(p, k);
                        const float* a = a0 + (hyzo_u64)k * p.factor_stride;
                        const float z = hyzo_lowrank_entry(a + i * rank, a + b_at + c * rank, rank, scale);
                        g[e] = fadd_(g[e], fmul_(term.coeff, z));
                    }
                    if (++c == cols) {
                        c = 0;
                        i++;
                    }
                }
                finish<false>(t, dt, gr, x, g, gr8, m, v);
            }
        }
    }
    __device__ void end_chunk(hyzo_u64) {}
};

__device__ __forceinline__ bool read_skip(const HyzoPass& p) {
    return p.skip_flag != 0 && *(const volatile hyzo_u32*)p.skip_flag != 0u;
}

/* The rule of an update pass. When steps may have been skipped on the device (skip_count
 * set), the host's t counts them and the bias corrections are redone here for the true t:
 * the host cannot know it without a synchronization. In the device-counter mode t is the
 * device's count of attempted updates of the state set, plus this one. */
template <class S>
__device__ __forceinline__ HyzoRule update_rule(const HyzoPass& p) {
    HyzoRule r = p.rule;
    const hyzo_u32 rule = S::rule(r);
    const bool counted = !S::probe && p.counters != 0;
    if (!S::probe && (p.skip_count != 0 || counted) && (rule == HYZO_ADAMW || rule == HYZO_ADAZO)) {
        hyzo_u64 t = counted ? ((const volatile HyzoCounters*)p.counters)->t[p.state_set & 1] + 1 : p.t;
        if (p.skip_count != 0) t -= *(const volatile hyzo_u64*)p.skip_count;
        r.bias_correction1 = hyzo_bias_correction(r.beta1, t);
        r.bias_correction2 = hyzo_bias_correction(r.beta2, t);
    }
    return r;
}

template <class S, bool ZO>
__device__ __forceinline__ void update_pass(const HyzoPass& p) {
    const Launch L = make_launch<S>(p);
    UpdateBody<S, ZO> body{L, ZO && !S::probe && read_skip(p), update_rule<S>(p)};
    for_each_chunk<S>(p, body);
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

template <class S>
struct SqNormBody {
    static constexpr bool by_address = false; /* index-aligned groups: the same order */
    const Launch& L;
    double* shared;
    double acc;
    template <int DT, bool SHIFT>
    __device__ __forceinline__ void group(const Tensor& t, const Group& gr) {
        float z[8];
        direction8<S, SHIFT>(L, L.p.direction, gr, z);
#pragma unroll
        for (int e = 0; e < 8; e++)
            if (valid(t, gr, e)) acc = __dadd_rn(acc, __dmul_rn((double)z[e], (double)z[e]));
    }
    /* Never called: sq_norm passes run with p.lowrank = 0 (the Gaussian of every tensor). */
    __device__ __forceinline__ void lowrank_chunk(const HyzoTensor*, const Tensor&, hyzo_u64, hyzo_u64) {}
    __device__ void end_chunk(hyzo_u64 c) {
        const double total = block_sum(acc, shared);
        if (threadIdx.x == 0) ((double*)L.p.partials)[c] = total;
        acc = 0.0;
    }
};

template <class S>
__device__ __forceinline__ void sq_norm_pass(const HyzoPass& p) {
    __shared__ double shared[HYZO_THREADS / 32];
    const Launch L = make_launch<S>(p);
    SqNormBody<S> body{L, shared, 0.0};
    for_each_chunk<S>(p, body);
}

/* ---- low-rank factors (spec §7): the Gaussian entries of the factor streams --------------
 * For each term k (its direction d) and each job: out[k * stride + job.out + i] = entry
 * job.offset + i of direction job.stream + d (i < job.count), the variant's Gaussian (the
 * same function the passes use, so a backend agrees with itself bit for bit). Groups of 8
 * global indices, as everywhere; a grid-stride loop over each job's groups. The step is
 * the launch's, or the device counter's plus p.step (as launch_step). */
template <bool FAST>
__device__ __forceinline__ void factor_pass(const HyzoFactorPass& p) {
    const HyzoKeys keys = hyzo_keys(p.seed);
    const hyzo_u32 step =
        p.counters != 0 ? (hyzo_u32)((const volatile HyzoCounters*)p.counters)->step + p.step : p.step;
    const HyzoFactorJob* jobs = (const HyzoFactorJob*)p.jobs;
    const hyzo_u64 threads = (hyzo_u64)gridDim.x * HYZO_THREADS;
    const hyzo_u64 tid = (hyzo_u64)blockIdx.x * HYZO_THREADS + threadIdx.x;
    for (hyzo_u32 k = 0; k < p.nterms; k++) {
        const hyzo_u32 d = p.terms != 0 ? __ldg(&((const HyzoTerm*)p.terms)[k].direction)
                                        : p.inline_terms[k].direction;
        float* block = (float*)p.out + (hyzo_u64)k * p.stride;
        for (hyzo_u32 j = 0; j < p.njobs; j++) {
            const hyzo_u64 count = __ldg(&jobs[j].count);
            if (count == 0) continue;
            const hyzo_u64 offset = __ldg(&jobs[j].offset);
            const hyzo_u32 direction = __ldg(&jobs[j].stream) + d;
            float* out = block + __ldg(&jobs[j].out);
            const hyzo_u64 g1 = (offset + count - 1) >> 3;
            for (hyzo_u64 g = (offset >> 3) + tid; g <= g1; g += threads) {
                float z[8];
                hyzo_direction8k<FAST>(HYZO_GAUSSIAN, keys, step, direction, g, z);
                const hyzo_u64 i0 = 8 * g - offset; /* wraps before the job's first entry */
#pragma unroll
                for (int e = 0; e < 8; e++)
                    if (i0 + (hyzo_u64)e < count) out[i0 + (hyzo_u64)e] = z[e];
            }
        }
    }
}

/* ---- the entry points -------------------------------------------------------------------
 * Exact kernels: hyzo_<pass>_exact, every value read at launch. Fast kernels, one per
 * combination that exists (chosen by name on the host, src/backend/cuda/device.rs):
 *   hyzo_perturb_f_k<kind>_n<1|2|x>   (x: any number of terms)
 *   hyzo_restore_and_update_f_k<kind>_r<rule>
 *   hyzo_fo_update_f_r<rule>
 *   hyzo_sq_norm_f_k<kind>
 * (kind: 0 Gaussian, 1 Rademacher; rule: the HYZO_* number), and the low-rank factors,
 * hyzo_lowrank_factors_exact / hyzo_lowrank_factors_f. */

#define HYZO_KERNEL extern "C" __global__ void __launch_bounds__(HYZO_THREADS, 2)
#define HYZO_ANY (-1)

#ifndef HYZO_SASS_PROBE

HYZO_KERNEL hyzo_perturb_exact(const __grid_constant__ HyzoPass p) {
    perturb_pass<Spec<false, HYZO_ANY, HYZO_ANY, HYZO_ANY>>(p);
}
HYZO_KERNEL hyzo_restore_and_update_exact(const __grid_constant__ HyzoPass p) {
    update_pass<Spec<false, HYZO_ANY, HYZO_ANY, HYZO_ANY>, true>(p);
}
HYZO_KERNEL hyzo_fo_update_exact(const __grid_constant__ HyzoPass p) {
    update_pass<Spec<false, HYZO_ANY, HYZO_ANY, HYZO_ANY, 0, 1>, false>(p);
}
HYZO_KERNEL hyzo_sq_norm_exact(const __grid_constant__ HyzoPass p) {
    sq_norm_pass<Spec<false, HYZO_ANY, HYZO_ANY, HYZO_ANY>>(p);
}
HYZO_KERNEL hyzo_lowrank_factors_exact(const __grid_constant__ HyzoFactorPass p) {
    factor_pass<false>(p);
}
HYZO_KERNEL hyzo_lowrank_factors_f(const __grid_constant__ HyzoFactorPass p) {
    factor_pass<true>(p);
}

#define HYZO_PERTURB_F(k, n, nn)                                                          \
    HYZO_KERNEL hyzo_perturb_f_k##k##_n##n(const __grid_constant__ HyzoPass p) {           \
        perturb_pass<Spec<true, k, HYZO_ANY, HYZO_ANY, nn>>(p);                             \
    }
#define HYZO_PERTURB_F_K(k) HYZO_PERTURB_F(k, 1, 1) HYZO_PERTURB_F(k, 2, 2) HYZO_PERTURB_F(k, x, HYZO_ANY)
HYZO_PERTURB_F_K(0)
HYZO_PERTURB_F_K(1)

#define HYZO_UPDATE_F(k, r)                                                                  \
    HYZO_KERNEL hyzo_restore_and_update_f_k##k##_r##r(const __grid_constant__ HyzoPass p) {  \
        update_pass<Spec<true, k, HYZO_ANY, r>, true>(p);                                    \
    }
#define HYZO_FO_UPDATE_F(r)                                                                  \
    HYZO_KERNEL hyzo_fo_update_f_r##r(const __grid_constant__ HyzoPass p) {                 \
        update_pass<Spec<true, HYZO_GAUSSIAN, HYZO_ANY, r, 0, 1>, false>(p);                 \
    }
#define HYZO_RULES(M, ...) \
    M(__VA_ARGS__ 0) M(__VA_ARGS__ 1) M(__VA_ARGS__ 2) M(__VA_ARGS__ 3) M(__VA_ARGS__ 4) M(__VA_ARGS__ 5)
HYZO_RULES(HYZO_UPDATE_F, 0,)
HYZO_RULES(HYZO_UPDATE_F, 1,)
HYZO_RULES(HYZO_FO_UPDATE_F)

HYZO_KERNEL hyzo_sq_norm_f_k0(const __grid_constant__ HyzoPass p) {
    sq_norm_pass<Spec<true, HYZO_GAUSSIAN, HYZO_NEAREST, HYZO_ANY>>(p);
}
HYZO_KERNEL hyzo_sq_norm_f_k1(const __grid_constant__ HyzoPass p) {
    sq_norm_pass<Spec<true, HYZO_RADEMACHER, HYZO_NEAREST, HYZO_ANY>>(p);
}

#else
/* The hot paths that scripts/sass-budget counts: the fast templates with bf16 parameters,
 * nearest rounding, Gaussian directions, q = 1 (restore-and-perturb: 2 terms), no
 * gradient (fo_update: a bf16 one), a step not skipped. */
template <int RULE, int NT, int GRAD>
using ProbeSpec = Spec<true, HYZO_GAUSSIAN, HYZO_NEAREST, RULE, NT, GRAD, true>;
HYZO_KERNEL hyzo_probe_perturb(const __grid_constant__ HyzoPass p) {
    perturb_pass<ProbeSpec<HYZO_ANY, 1, 0>>(p);
}
HYZO_KERNEL hyzo_probe_restore_perturb(const __grid_constant__ HyzoPass p) {
    perturb_pass<ProbeSpec<HYZO_ANY, 2, 0>>(p);
}
HYZO_KERNEL hyzo_probe_update_sgd(const __grid_constant__ HyzoPass p) {
    update_pass<ProbeSpec<HYZO_SGD, 1, 0>, true>(p);
}
HYZO_KERNEL hyzo_probe_update_adamw(const __grid_constant__ HyzoPass p) {
    update_pass<ProbeSpec<HYZO_ADAMW, 1, 0>, true>(p);
}
HYZO_KERNEL hyzo_probe_fo_update_adamw(const __grid_constant__ HyzoPass p) {
    update_pass<ProbeSpec<HYZO_ADAMW, 0, 1>, false>(p);
}
/* The same passes on groups cut by address (the shipped loop: the dtype read per group). */
template <int RULE, int NT, int GRAD>
using ShiftedSpec = Spec<true, HYZO_GAUSSIAN, HYZO_NEAREST, RULE, NT, GRAD, true, true>;
HYZO_KERNEL hyzo_probe_perturb_shifted(const __grid_constant__ HyzoPass p) {
    perturb_pass<ShiftedSpec<HYZO_ANY, 1, 0>>(p);
}
HYZO_KERNEL hyzo_probe_restore_perturb_shifted(const __grid_constant__ HyzoPass p) {
    perturb_pass<ShiftedSpec<HYZO_ANY, 2, 0>>(p);
}
HYZO_KERNEL hyzo_probe_update_sgd_shifted(const __grid_constant__ HyzoPass p) {
    update_pass<ShiftedSpec<HYZO_SGD, 1, 0>, true>(p);
}
HYZO_KERNEL hyzo_probe_update_adamw_shifted(const __grid_constant__ HyzoPass p) {
    update_pass<ShiftedSpec<HYZO_ADAMW, 1, 0>, true>(p);
}
HYZO_KERNEL hyzo_probe_fo_update_adamw_shifted(const __grid_constant__ HyzoPass p) {
    update_pass<ShiftedSpec<HYZO_ADAMW, 0, 1>, false>(p);
}
#endif

/* Sums p.total_chunks partials into partials[total_chunks] (one block). */
HYZO_KERNEL hyzo_sq_norm_final(const __grid_constant__ HyzoPass p) {
    __shared__ double shared[HYZO_THREADS / 32];
    const double* partials = (const double*)p.partials;
    double acc = 0.0;
    for (hyzo_u64 c = threadIdx.x; c < p.total_chunks; c += HYZO_THREADS) acc += partials[c];
    const double total = block_sum(acc, shared);
    if (threadIdx.x == 0) ((double*)p.partials)[p.total_chunks] = total;
}

/* ---- the device counters: one thread advances them after an update pass -----------------
 * Launched (and captured) after each update pass of the device-counter mode: step + 1 and
 * t[state_set] + 1. A step the device skipped (*skip_flag) still advances t[main], as the
 * host counts attempts: its skip count advanced too, so t − skip_count, the t of the bias
 * corrections, stays where it was. */
HYZO_KERNEL hyzo_advance_counters(const __grid_constant__ HyzoPass p) {
    if (threadIdx.x != 0 || blockIdx.x != 0 || p.counters == 0) return;
    HyzoCounters* c = (HyzoCounters*)p.counters;
    c->step += 1;
    c->t[p.state_set & 1] += 1;
}

/* ---- device losses: g_d, the finiteness check and the skip counter -----------------------
 * Mirrors Optimizer::projected_grads: two-sided g_d = (L[2d] − L[2d+1]) / (2μ), one-sided
 * g_d = (L[d+1] − L[0]) / μ; the coefficient is g_d · base_d. A step with a non-finite
 * loss, g_d or coefficient (spec v2 §4), or whose coefficients could make an estimate
 * beyond MAX_ESTIMATE (backend/mod.rs), sets *skip_flag (the update pass then only
 * restores) and counts in *skip_count. */
HYZO_KERNEL hyzo_device_losses(const __grid_constant__ HyzoLossPass p) {
    if (blockIdx.x != 0) return; /* one block: a second would count the skip again */
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
    int any_bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
        /* The estimate's bound (backend::max_coefficient_sum): the host's f32 sum, in order. */
        float sum = 0.0f;
        for (hyzo_u32 d = 0; d < p.q; d++) sum = fadd_(sum, fabsf(out[d].coeff));
        if (!(sum <= p.max_coefficient_sum)) any_bad = 1;
        *(hyzo_u32*)p.skip_flag = any_bad ? 1u : 0u;
        if (any_bad) *(hyzo_u64*)p.skip_count += 1;
    }
}
