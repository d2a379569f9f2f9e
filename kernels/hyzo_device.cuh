/* Device primitives of hyzo: Philox4x32-10, the f32 Gaussian of src/direction.rs,
 * Rademacher bits, the stochastic-rounding stream, dtype conversions, the rounding modes of
 * src/dtype.rs and the update rules of src/rules.rs.
 *
 * Every floating-point operation that the Rust reference performs is written here as ONE
 * correctly rounded intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fsqrt_rn, __fdiv_rn), in
 * the same order, with the same constants (given as bit patterns), so that the compiler can
 * neither contract a multiply-add nor reassociate: a GPU result equals the CPU result bit
 * for bit. Integer steps (the range reductions) are the Rust ones verbatim.
 *
 * With HYZO_HOST_EMULATION defined, the same functions compile as plain C++ (each intrinsic
 * becomes the IEEE operation it names); tests/device_mirror.rs builds them with the host
 * compiler and checks them against the Rust functions, so the mirror is verified without a
 * GPU. */
#ifndef HYZO_DEVICE_CUH
#define HYZO_DEVICE_CUH

#include "hyzo_params.h"

#ifdef HYZO_HOST_EMULATION
#include <cmath>
#include <cstring>
#define HYZO_FN static inline
static inline float hyzo_u2f(hyzo_u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline hyzo_u32 hyzo_f2u(float f) { hyzo_u32 u; std::memcpy(&u, &f, 4); return u; }
static inline float fmul_(float a, float b) { volatile float r = a * b; return r; }
static inline float fadd_(float a, float b) { volatile float r = a + b; return r; }
static inline float fsub_(float a, float b) { volatile float r = a - b; return r; }
static inline float fsqrt_(float a) { return std::sqrt(a); }
static inline float u32_to_f(hyzo_u32 x) { return (float)x; }
static inline float i32_to_f(hyzo_i32 x) { return (float)x; }
static inline hyzo_u32 umulhi_(hyzo_u32 a, hyzo_u32 b) {
    return (hyzo_u32)(((hyzo_u64)a * (hyzo_u64)b) >> 32);
}
static inline float floor_(float x) { return std::floor(x); }
#else
#define HYZO_FN __device__ __forceinline__
#define hyzo_u2f(u) __uint_as_float(u)
#define hyzo_f2u(f) __float_as_uint(f)
#define fmul_(a, b) __fmul_rn((a), (b))
#define fadd_(a, b) __fadd_rn((a), (b))
#define fsub_(a, b) __fsub_rn((a), (b))
#define fsqrt_(a) __fsqrt_rn(a)
#define u32_to_f(x) __uint2float_rn(x)
#define i32_to_f(x) __int2float_rn(x)
#define umulhi_(a, b) __umulhi((a), (b))
#define floor_(x) floorf(x)

#endif

/* a / b correctly rounded (IEEE f32): __fdiv_rn on the device (its fast path is a few FMAs
 * around MUFU.RCP; extreme operands take a subroutine, which compiles with no stack or spill
 * on every target, checked by scripts/check-kernels), the IEEE division on the host. The
 * double-precision helpers are those of hyzo_bias_correction. */
#ifdef HYZO_HOST_EMULATION
static inline float fdiv_(float a, float b) { volatile float r = a / b; return r; }
#define hyzo_dmul_(a, b) ((a) * (b))
#else
#define fdiv_(a, b) __fdiv_rn((a), (b))
#define hyzo_dmul_(a, b) __dmul_rn((a), (b))
#endif

/* ------------------------------------------------------------------------------------ */
/* Philox4x32-10 (spec §1).                                                              */

struct HyzoWords {
    hyzo_u32 x0, x1, x2, x3;
};

HYZO_FN HyzoWords hyzo_philox(hyzo_u32 c0, hyzo_u32 c1, hyzo_u32 c2, hyzo_u32 c3, hyzo_u32 k0,
                              hyzo_u32 k1) {
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const hyzo_u32 hi0 = umulhi_(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const hyzo_u32 hi1 = umulhi_(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    HyzoWords w = {c0, c1, c2, c3};
    return w;
}

/* Block `b` of direction `(seed, step, direction)` (spec §2). */
HYZO_FN HyzoWords hyzo_block(hyzo_u64 seed, hyzo_u32 step, hyzo_u32 direction, hyzo_u64 b) {
    return hyzo_philox((hyzo_u32)b, (hyzo_u32)(b >> 32), step, direction, (hyzo_u32)seed,
                       (hyzo_u32)(seed >> 32));
}

/* The ten round keys of a seed, computed once per launch (they are uniform across the grid;
 * a kernel keeps them in uniform registers instead of bumping the key in every block). */
struct HyzoKeys {
    hyzo_u32 k0[10], k1[10];
};

HYZO_FN HyzoKeys hyzo_keys(hyzo_u64 seed) {
    HyzoKeys k;
    hyzo_u32 a = (hyzo_u32)seed, b = (hyzo_u32)(seed >> 32);
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
    for (int r = 0; r < 10; r++) {
        k.k0[r] = a;
        k.k1[r] = b;
        a += 0x9E3779B9u;
        b += 0xBB67AE85u;
    }
    return k;
}

/* hyzo_philox with precomputed round keys (the same words). */
HYZO_FN HyzoWords hyzo_philox_k(hyzo_u32 c0, hyzo_u32 c1, hyzo_u32 c2, hyzo_u32 c3,
                                const HyzoKeys& k) {
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
    for (int r = 0; r < 10; r++) {
        const hyzo_u32 hi0 = umulhi_(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const hyzo_u32 hi1 = umulhi_(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k.k0[r];
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k.k1[r];
        c3 = lo0;
    }
    HyzoWords w = {c0, c1, c2, c3};
    return w;
}

HYZO_FN HyzoWords hyzo_block_k(const HyzoKeys& k, hyzo_u32 step, hyzo_u32 direction, hyzo_u64 b) {
    return hyzo_philox_k((hyzo_u32)b, (hyzo_u32)(b >> 32), step, direction, k);
}

/* ------------------------------------------------------------------------------------ */
/* The f32 Gaussian of direction.rs (minus_two_ln_u, sin_cos_turn, gaussian_pair).       */

#define HYZO_K(bits) hyzo_u2f(bits)
#define HYZO_TWO_M33 0x2F000000u          /* 2^-33 */
#define HYZO_TWO_M32 0x2F800000u          /* 2^-32 */
#define HYZO_THIRD 0x3EAAAAABu            /* f32(1/3) */
#define HYZO_LN2_HI 0x3F318000u
#define HYZO_LN2_LO 0xB95E8083u
#define HYZO_TWO_PI_OVER_2_32 0x30C90FDBu
#define HYZO_SQRT_HALF 0x3F3504F3u
#define HYZO_P0 0x3D9021BBu /* 7.0376836e-2 */
#define HYZO_P1 0x3DEBD1B8u /* 1.1514610e-1 */
#define HYZO_P2 0x3DEF251Bu /* 1.1676999e-1 */
#define HYZO_P3 0x3DFE5D4Fu /* 1.2420141e-1 */
#define HYZO_P4 0x3E11E9BFu /* 1.4249323e-1 */
#define HYZO_P5 0x3E2AAE50u /* 1.6668058e-1 */
#define HYZO_P6 0x3E4CCEADu /* 2.0000715e-1 */
#define HYZO_P7 0x3E7FFFFCu /* 2.4999994e-1 */
#define HYZO_P8 0x3EAAAAAAu /* 3.3333331e-1 */
#define HYZO_S0 0xB94CA1F9u /* -1.9515296e-4 */
#define HYZO_S1 0x3C08839Eu /* 8.332161e-3 */
#define HYZO_S2 0x3E2AAAA3u /* 1.6666655e-1 */
#define HYZO_C0 0x37CCF5CEu /* 2.4433157e-5 */
#define HYZO_C1 0x3AB6061Au /* 1.3887316e-3 */
#define HYZO_C2 0x3D2AAAA5u /* 4.1666646e-2 */
#define HYZO_FIFTH 0x3E4CCCCDu /* f32(0.2) */
#define HYZO_TWO_M24 0x33800000u /* 2^-24 */

/* -2 ln u, u = (2x + 1) 2^-33: the series in t = 1 - u near 1, Cephes' logf elsewhere. */
HYZO_FN float hyzo_minus_two_ln_u(hyzo_u32 x) {
    const hyzo_u32 nx = ~x;
    const float t = fmul_(u32_to_f((nx << 1) | 1u), HYZO_K(HYZO_TWO_M33));
    const float series = fmul_(
        t, fadd_(1.0f,
                 fmul_(t, fadd_(0.5f, fmul_(t, fadd_(HYZO_K(HYZO_THIRD),
                                                     fmul_(t, fadd_(0.25f,
                                                                    fmul_(t, HYZO_K(HYZO_FIFTH))))))))));
    const float u = fadd_(fmul_(u32_to_f(x), HYZO_K(HYZO_TWO_M32)), HYZO_K(HYZO_TWO_M33));
    const hyzo_u32 bits = hyzo_f2u(u);
    const hyzo_u32 m_above = (bits & 0x007FFFFFu) | 0x3F000000u;
    const bool above = m_above > HYZO_SQRT_HALF;
    const hyzo_i32 e_raw = (hyzo_i32)(bits >> 23) - 126;
    const hyzo_u32 m_bits = above ? m_above : ((bits & 0x007FFFFFu) | 0x3F800000u);
    const hyzo_i32 e = above ? e_raw : e_raw - 1;
    const float f = fsub_(hyzo_u2f(m_bits), 1.0f);
    const float ef = i32_to_f(e);
    const float z = fmul_(f, f);
    float p = fsub_(fmul_(HYZO_K(HYZO_P0), f), HYZO_K(HYZO_P1));
    p = fadd_(fmul_(p, f), HYZO_K(HYZO_P2));
    p = fsub_(fmul_(p, f), HYZO_K(HYZO_P3));
    p = fadd_(fmul_(p, f), HYZO_K(HYZO_P4));
    p = fsub_(fmul_(p, f), HYZO_K(HYZO_P5));
    p = fadd_(fmul_(p, f), HYZO_K(HYZO_P6));
    p = fsub_(fmul_(p, f), HYZO_K(HYZO_P7));
    p = fadd_(fmul_(p, f), HYZO_K(HYZO_P8));
    float y = fmul_(fmul_(f, z), p);
    y = fadd_(y, fmul_(HYZO_K(HYZO_LN2_LO), ef));
    y = fsub_(y, fmul_(0.5f, z));
    const float ln_u = fadd_(fadd_(f, y), fmul_(HYZO_K(HYZO_LN2_HI), ef));
    const float minus_ln_u = nx < (1u << 27) ? series : -ln_u;
    return fmul_(2.0f, minus_ln_u);
}

/* (sin v, cos v), v = 2π (y + 1/2) 2^-32: exact integer reduction to a quadrant. */
HYZO_FN void hyzo_sin_cos_turn(hyzo_u32 y, float* sin_out, float* cos_out) {
    const hyzo_u32 k = (y >> 30) + ((y >> 29) & 1u);
    const hyzo_i32 n = (hyzo_i32)(y - (k << 30));
    const float a = fmul_(fadd_(i32_to_f(n), 0.5f), HYZO_K(HYZO_TWO_PI_OVER_2_32));
    const float z = fmul_(a, a);
    const float s = fadd_(
        a, fmul_(fmul_(a, z), fsub_(fmul_(fadd_(fmul_(HYZO_K(HYZO_S0), z), HYZO_K(HYZO_S1)), z),
                                    HYZO_K(HYZO_S2))));
    const float c = fadd_(
        fsub_(1.0f, fmul_(0.5f, z)),
        fmul_(fmul_(z, z), fadd_(fmul_(fsub_(fmul_(HYZO_K(HYZO_C0), z), HYZO_K(HYZO_C1)), z),
                                 HYZO_K(HYZO_C2))));
    const hyzo_u32 q = k & 3u;
    const float so = q == 0u ? s : q == 1u ? c : q == 2u ? -s : -c;
    const float co = q == 0u ? c : q == 1u ? -s : q == 2u ? -c : s;
    *sin_out = so;
    *cos_out = co;
}

/* The Box-Muller pair (ρ sin v, ρ cos v) of Philox words (x, y). */
HYZO_FN void hyzo_gaussian_pair(hyzo_u32 x, hyzo_u32 y, float* first, float* second) {
    const float rho = fsqrt_(hyzo_minus_two_ln_u(x));
    float s, c;
    hyzo_sin_cos_turn(y, &s, &c);
    *first = fmul_(rho, s);
    *second = fmul_(rho, c);
}

/* The fast Gaussian pair (the variant users get on the GPU; docs/interpretation.md bounds
 * its error at about 2e-5 (1 + |z|), under spec v2 §3's 1e-4 (1 + |z|)):
 *   -2 ln u = -2 ln2 · lg2.approx(u), u = x 2^-32 + 2^-33 rounded to f32, except near
 *   u = 1 (~x < 2^20, t = 1 - u < 2^-12), where it is 2t with t = (~x + ½) 2^-32 exact in
 *   integers (lg2.approx's absolute error would otherwise dominate a tiny ρ);
 *   ρ = sqrt.approx(-2 ln u);
 *   v - π = (y + ½) 2π 2^-32 - π in (-π, π], where sin.approx / cos.approx are documented,
 *   and (ρ sin v, ρ cos v) = (-ρ sin(v - π), -ρ cos(v - π)).
 * On the host (HYZO_HOST_EMULATION) each approximate instruction is replaced by the libm
 * function it approximates, so tests/device_mirror.rs checks the formula, not the MUFU. */
#define HYZO_FAST_NEAR_ONE (1u << 20)
#define HYZO_TWO_PI_OVER_2_32_F 1.46291807926715968e-9f /* 2π 2^-32 */
#define HYZO_HALF_STEP_MINUS_PI (-3.14159265358979323846f + 7.31459039633579840e-10f)
#define HYZO_MINUS_TWO_LN2 (-1.38629436111989061f)
#ifdef HYZO_HOST_EMULATION
static inline float lg2_approx_(float a) { return std::log2(a); }
static inline float sqrt_approx_(float a) { return std::sqrt(a); }
static inline void sincos_approx_(float a, float* s, float* c) {
    *s = std::sin(a);
    *c = std::cos(a);
}
static inline float ffma_(float a, float b, float c) { return std::fma(a, b, c); }
#else
HYZO_FN float lg2_approx_(float a) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
HYZO_FN float sqrt_approx_(float a) {
    float r;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
HYZO_FN void sincos_approx_(float a, float* s, float* c) {
    asm("sin.approx.ftz.f32 %0, %1;" : "=f"(*s) : "f"(a));
    asm("cos.approx.ftz.f32 %0, %1;" : "=f"(*c) : "f"(a));
}
#define ffma_(a, b, c) __fmaf_rn((a), (b), (c))
#endif

HYZO_FN void hyzo_gaussian_pair_fast(hyzo_u32 x, hyzo_u32 y, float* first, float* second) {
    const float u = ffma_(u32_to_f(x), HYZO_K(HYZO_TWO_M32), HYZO_K(HYZO_TWO_M33));
    const hyzo_u32 nx = ~x;
    const float two_t = ffma_(u32_to_f(nx), 4.656612873077392578125e-10f /* 2^-31 */,
                              HYZO_K(HYZO_TWO_M32));
    const float a = nx < HYZO_FAST_NEAR_ONE ? two_t : lg2_approx_(u) * HYZO_MINUS_TWO_LN2;
    const float rho = sqrt_approx_(a);
    const float w = ffma_(u32_to_f(y), HYZO_TWO_PI_OVER_2_32_F, HYZO_HALF_STEP_MINUS_PI);
    float s, c;
    sincos_approx_(w, &s, &c);
    *first = -rho * s;
    *second = -rho * c;
}

/* Entries 8g .. 8g+7 of a direction (g a group index): Gaussian from blocks 2g and 2g+1,
 * Rademacher from bits 8(g%4) .. 8(g%4)+7 of word (g%16)/4 of block g/16. FAST selects the
 * fast Gaussian pair (Rademacher entries are exact either way). */
template <bool FAST>
HYZO_FN void hyzo_direction8k(hyzo_u32 kind, const HyzoKeys& keys, hyzo_u32 step,
                              hyzo_u32 direction, hyzo_u64 g, float z[8]) {
    if (kind == HYZO_RADEMACHER) {
        const HyzoWords w = hyzo_block_k(keys, step, direction, g >> 4);
        const hyzo_u32 sel = (hyzo_u32)(g >> 2) & 3u;
        const hyzo_u32 word = sel == 0u ? w.x0 : sel == 1u ? w.x1 : sel == 2u ? w.x2 : w.x3;
        const hyzo_u32 bits = word >> (8u * ((hyzo_u32)g & 3u));
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
        for (int e = 0; e < 8; e++) z[e] = ((bits >> e) & 1u) ? -1.0f : 1.0f;
    } else {
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
        for (int h = 0; h < 2; h++) {
            const HyzoWords w = hyzo_block_k(keys, step, direction, 2 * g + (hyzo_u64)h);
            if (FAST) {
                hyzo_gaussian_pair_fast(w.x0, w.x1, &z[4 * h + 0], &z[4 * h + 1]);
                hyzo_gaussian_pair_fast(w.x2, w.x3, &z[4 * h + 2], &z[4 * h + 3]);
            } else {
                hyzo_gaussian_pair(w.x0, w.x1, &z[4 * h + 0], &z[4 * h + 1]);
                hyzo_gaussian_pair(w.x2, w.x3, &z[4 * h + 2], &z[4 * h + 3]);
            }
        }
    }
}

/* The exact entries of a direction from its seed (the host mirror's entry point). */
HYZO_FN void hyzo_direction8(hyzo_u32 kind, hyzo_u64 seed, hyzo_u32 step, hyzo_u32 direction,
                             hyzo_u64 g, float z[8]) {
    const HyzoKeys keys = hyzo_keys(seed);
    hyzo_direction8k<false>(kind, keys, step, direction, g, z);
}
/* The fast entries of a group (host mirror: libm for the approximate instructions). */
HYZO_FN void hyzo_direction8_fast(hyzo_u32 kind, hyzo_u64 seed, hyzo_u32 step,
                                  hyzo_u32 direction, hyzo_u64 g, float z[8]) {
    const HyzoKeys keys = hyzo_keys(seed);
    hyzo_direction8k<true>(kind, keys, step, direction, g, z);
}

/* Stochastic-rounding words of group g: element j gets word j % 4 of block j / 4 of the
 * reserved direction 0xFFFFFFFF of the same (seed, step). */
HYZO_FN void hyzo_rounding_words8k(const HyzoKeys& keys, hyzo_u32 step, hyzo_u64 g,
                                   hyzo_u32 r[8]) {
    const HyzoWords a = hyzo_block_k(keys, step, 0xFFFFFFFFu, 2 * g);
    const HyzoWords b = hyzo_block_k(keys, step, 0xFFFFFFFFu, 2 * g + 1);
    r[0] = a.x0; r[1] = a.x1; r[2] = a.x2; r[3] = a.x3;
    r[4] = b.x0; r[5] = b.x1; r[6] = b.x2; r[7] = b.x3;
}
HYZO_FN void hyzo_rounding_words8(hyzo_u64 seed, hyzo_u32 step, hyzo_u64 g, hyzo_u32 r[8]) {
    const HyzoKeys keys = hyzo_keys(seed);
    hyzo_rounding_words8k(keys, step, g, r);
}

/* ---- groups cut by address --------------------------------------------------------------
 * A tensor whose address and global offset disagree modulo 16 bytes is cut into groups by
 * address: a group is the 8 elements j0 .. j0+7 with j0 = 8h - d (d in 1..7 fixed by the
 * tensor), which straddle Philox blocks. The functions below give the same entries and words
 * as the group functions above (a direction entry is a function of j alone, spec §3), for
 * any j0, indices taken modulo 2^64 (a group may start before global index 0: its entries
 * there belong to no tensor).
 *
 * Gaussian: entries j0 .. j0+7 lie in the three blocks B + 0, 1, 2, B = j0 / 4, from lane
 * r = j0 % 4 of the first; as Box-Muller pairs (lanes 0-1, 2-3 of each block, pairs P0 ..
 * P5), they need the five pairs P(r/2) .. P(r/2 + 4) (four when r is even), then entries
 * (r % 2) .. (r % 2) + 7 of those ten. Rademacher: the 8 bits start at bit j0 % 32 of the
 * word holding j0 and may run into the word holding j0 + 7 (of the next block when j0 % 128
 * > 120). Stochastic rounding: words r .. r + 7 of the same three blocks. */

/* Which Philox blocks and lanes a group starting at j0 needs (the index arithmetic of the
 * address-cut groups, shared by the three streams). */
struct HyzoSpan {
    hyzo_u64 block[3]; /* (j0 + 4i) / 4 modulo 2^62: the blocks of lanes j0 .. j0+11 */
    bool half;         /* r >= 2: the first pair is P1 (lanes 2-3 of block[0]) */
    bool odd;          /* r odd: entry e is the (e+1)-th of the pairs' ten */
};

HYZO_FN HyzoSpan hyzo_span(hyzo_u64 j0) {
    HyzoSpan s;
    s.block[0] = j0 >> 2;
    s.block[1] = (j0 + 4) >> 2;
    s.block[2] = (j0 + 8) >> 2;
    const hyzo_u32 r = (hyzo_u32)j0 & 3u;
    s.half = r >= 2u;
    s.odd = (r & 1u) != 0u;
    return s;
}

/* The Rademacher span: the block and word of j0 and of j0 + 7, and the bit of j0. */
struct HyzoBitSpan {
    hyzo_u64 block_lo, block_hi;
    hyzo_u32 word_lo, word_hi, shift;
};

HYZO_FN HyzoBitSpan hyzo_bit_span(hyzo_u64 j0) {
    const hyzo_u64 j7 = j0 + 7;
    HyzoBitSpan s;
    s.block_lo = j0 >> 7;
    s.block_hi = j7 >> 7;
    s.word_lo = (hyzo_u32)(j0 >> 5) & 3u;
    s.word_hi = (hyzo_u32)(j7 >> 5) & 3u;
    s.shift = (hyzo_u32)j0 & 31u;
    return s;
}

HYZO_FN hyzo_u32 hyzo_word_of(const HyzoWords& w, hyzo_u32 sel) {
    return sel == 0u ? w.x0 : sel == 1u ? w.x1 : sel == 2u ? w.x2 : w.x3;
}

/* Twelve words (three blocks) -> the 8 starting at lane r (two select stages, no indexing
 * by a runtime value: the arrays stay in registers). */
HYZO_FN void hyzo_window8(const hyzo_u32 a[12], bool half, bool odd, hyzo_u32 out[8]) {
    hyzo_u32 b[10];
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
    for (int k = 0; k < 10; k++) b[k] = half ? a[k + 2] : a[k];
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
    for (int e = 0; e < 8; e++) out[e] = odd ? b[e + 1] : b[e];
}

/* Entries j0 .. j0+7 of a direction, for any j0 (the group functions' entries at the same
 * global indices, bit for bit). */
template <bool FAST>
HYZO_FN void hyzo_direction8_at_k(hyzo_u32 kind, const HyzoKeys& keys, hyzo_u32 step,
                                  hyzo_u32 direction, hyzo_u64 j0, float z[8]) {
    if (kind == HYZO_RADEMACHER) {
        const HyzoBitSpan s = hyzo_bit_span(j0);
        const HyzoWords a = hyzo_block_k(keys, step, direction, s.block_lo);
        const HyzoWords b = hyzo_block_k(keys, step, direction, s.block_hi);
        const hyzo_u64 both = ((hyzo_u64)hyzo_word_of(b, s.word_hi) << 32) | hyzo_word_of(a, s.word_lo);
        const hyzo_u32 bits = (hyzo_u32)(both >> s.shift);
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
        for (int e = 0; e < 8; e++) z[e] = ((bits >> e) & 1u) ? -1.0f : 1.0f;
    } else {
        const HyzoSpan s = hyzo_span(j0);
        const HyzoWords w0 = hyzo_block_k(keys, step, direction, s.block[0]);
        const HyzoWords w1 = hyzo_block_k(keys, step, direction, s.block[1]);
        const HyzoWords w2 = hyzo_block_k(keys, step, direction, s.block[2]);
        const hyzo_u32 a[12] = {w0.x0, w0.x1, w0.x2, w0.x3, w1.x0, w1.x1,
                                w1.x2, w1.x3, w2.x0, w2.x1, w2.x2, w2.x3};
        float p[10];
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
        for (int k = 0; k < 5; k++) {
            const hyzo_u32 x = s.half ? a[2 * k + 2] : a[2 * k];
            const hyzo_u32 y = s.half ? a[2 * k + 3] : a[2 * k + 1];
            if (FAST) hyzo_gaussian_pair_fast(x, y, &p[2 * k], &p[2 * k + 1]);
            else hyzo_gaussian_pair(x, y, &p[2 * k], &p[2 * k + 1]);
        }
#ifndef HYZO_HOST_EMULATION
#pragma unroll
#endif
        for (int e = 0; e < 8; e++) z[e] = s.odd ? p[e + 1] : p[e];
    }
}

/* Stochastic-rounding words of elements j0 .. j0+7, for any j0. */
HYZO_FN void hyzo_rounding_words8_at_k(const HyzoKeys& keys, hyzo_u32 step, hyzo_u64 j0,
                                       hyzo_u32 r[8]) {
    const HyzoSpan s = hyzo_span(j0);
    const HyzoWords w0 = hyzo_block_k(keys, step, 0xFFFFFFFFu, s.block[0]);
    const HyzoWords w1 = hyzo_block_k(keys, step, 0xFFFFFFFFu, s.block[1]);
    const HyzoWords w2 = hyzo_block_k(keys, step, 0xFFFFFFFFu, s.block[2]);
    const hyzo_u32 a[12] = {w0.x0, w0.x1, w0.x2, w0.x3, w1.x0, w1.x1,
                            w1.x2, w1.x3, w2.x0, w2.x1, w2.x2, w2.x3};
    hyzo_window8(a, s.half, s.odd, r);
}

/* Host mirror entry points: the same, from the seed; FAST selects the fast Gaussian. */
HYZO_FN void hyzo_direction8_at(hyzo_u32 kind, bool fast, hyzo_u64 seed, hyzo_u32 step,
                                hyzo_u32 direction, hyzo_u64 j0, float z[8]) {
    const HyzoKeys keys = hyzo_keys(seed);
    if (fast) hyzo_direction8_at_k<true>(kind, keys, step, direction, j0, z);
    else hyzo_direction8_at_k<false>(kind, keys, step, direction, j0, z);
}
HYZO_FN void hyzo_rounding_words8_at(hyzo_u64 seed, hyzo_u32 step, hyzo_u64 j0, hyzo_u32 r[8]) {
    const HyzoKeys keys = hyzo_keys(seed);
    hyzo_rounding_words8_at_k(keys, step, j0, r);
}


/* ------------------------------------------------------------------------------------ */
/* Element types: exact widening, round to nearest even (the `half` crate's conversions). */

HYZO_FN float hyzo_bf16_to_f32(unsigned short h) { return hyzo_u2f((hyzo_u32)h << 16); }

/* bf16 nearest even, NaN kept quiet with its payload's top bits as `half` does. */
HYZO_FN unsigned short hyzo_f32_to_bf16(float x) {
    const hyzo_u32 u = hyzo_f2u(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x0040u);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef HYZO_HOST_EMULATION
/* IEEE binary16 nearest even, in integers (host emulation only; the device uses cvt). */
static inline unsigned short hyzo_f32_to_f16(float x) {
    const hyzo_u32 u = hyzo_f2u(x);
    const hyzo_u32 sign = (u >> 16) & 0x8000u;
    const hyzo_u32 a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (unsigned short)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u); /* rounds past 65504 */
    if (a < 0x38800000u) {                                           /* f16 subnormal */
        const float scaled = hyzo_u2f(a) * 16777216.0f;             /* exact: |x| 2^24 */
        return (unsigned short)(sign | (hyzo_u32)std::nearbyint(scaled));
    }
    const hyzo_u32 r = a - 0x38000000u; /* rebias exponent by 112 */
    return (unsigned short)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
}
static inline float hyzo_f16_to_f32(unsigned short h) {
    const hyzo_u32 sign = ((hyzo_u32)h & 0x8000u) << 16;
    const hyzo_u32 e = ((hyzo_u32)h >> 10) & 0x1Fu, m = (hyzo_u32)h & 0x3FFu;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f; /* m 2^-24, exact */
        return hyzo_u2f(hyzo_f2u(v) | sign);
    }
    if (e == 31) return hyzo_u2f(sign | 0x7F800000u | (m << 13));
    return hyzo_u2f(sign | ((e + 112) << 23) | (m << 13));
}
#else
HYZO_FN unsigned short hyzo_f32_to_f16(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
HYZO_FN float hyzo_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

/* Round x to the 16-bit dtype and widen it back (`T::from_f32(x).to_f32()`). */
HYZO_FN float hyzo_round_nearest(hyzo_u32 dtype, float x) {
    if (dtype == HYZO_BF16) return hyzo_bf16_to_f32(hyzo_f32_to_bf16(x));
    if (dtype == HYZO_F16) return hyzo_f16_to_f32(hyzo_f32_to_f16(x));
    return x;
}

/* stochastic_round_bf16 of dtype.rs. */
HYZO_FN float hyzo_stochastic_bf16(float x, hyzo_u32 r) {
    const hyzo_u32 bits = hyzo_f2u(x);
    const hyzo_u32 mag = bits & 0x7FFFFFFFu;
    if (mag >= 0x7F800000u) return x;
    const hyzo_u32 dropped = mag & 0xFFFFu;
    const hyzo_u32 up = (r >> 16) < dropped ? 0x10000u : 0u;
    const hyzo_u32 out = (mag - dropped) + up;
    if (out >= 0x7F800000u) return hyzo_bf16_to_f32(hyzo_f32_to_bf16(x));
    return hyzo_u2f(out | (bits & 0x80000000u));
}

/* stochastic_round_f16 of dtype.rs: every step exact in f32. */
HYZO_FN float hyzo_stochastic_f16(float x, hyzo_u32 r) {
    const float ax = hyzo_u2f(hyzo_f2u(x) & 0x7FFFFFFFu);
    if (!(ax <= 65504.0f)) return hyzo_f16_to_f32(hyzo_f32_to_f16(x)); /* NaN or too big */
    hyzo_i32 e = (hyzo_i32)(hyzo_f2u(ax) >> 23) - 127;
    e = e < -14 ? -14 : e;
    const float inv_gap = hyzo_u2f((hyzo_u32)(10 - e + 127) << 23);
    const float gap = hyzo_u2f((hyzo_u32)(e - 10 + 127) << 23);
    const float scaled = fmul_(ax, inv_gap);
    const float whole = floor_(scaled);
    const float frac = fsub_(scaled, whole);
    const float u = fmul_(u32_to_f(r >> 8), HYZO_K(HYZO_TWO_M24));
    const float mag = fmul_(u < frac ? fadd_(whole, 1.0f) : whole, gap);
    return hyzo_u2f(hyzo_f2u(mag) | (hyzo_f2u(x) & 0x80000000u));
}

/* ------------------------------------------------------------------------------------ */
/* The update rules (rules.rs `apply`).                                                  */

HYZO_FN float hyzo_sign(float x) { return x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : fmul_(x, 0.0f); }

/* The rules of rules.rs `apply`, one function each; each returns the new value, unrounded,
 * and updates the element's state m, v. */
HYZO_FN float hyzo_rule_sgd(const HyzoRule& p, float theta, float g) {
    return fsub_(theta, fmul_(p.lr, fadd_(g, fmul_(p.weight_decay, theta))));
}
HYZO_FN float hyzo_rule_momentum(const HyzoRule& p, float theta, float g, float* m) {
    const float decay = fmul_(p.weight_decay, theta);
    *m = fadd_(fmul_(p.beta1, *m), g);
    return fsub_(theta, fmul_(p.lr, fadd_(*m, decay)));
}
HYZO_FN float hyzo_rule_sign(const HyzoRule& p, float theta, float g) {
    return fsub_(theta, fmul_(p.lr, fadd_(hyzo_sign(g), fmul_(p.weight_decay, theta))));
}
HYZO_FN float hyzo_rule_signum(const HyzoRule& p, float theta, float g, float* m) {
    const float decay = fmul_(p.weight_decay, theta);
    *m = fadd_(fmul_(p.beta1, *m), fmul_(fsub_(1.0f, p.beta1), g));
    return fsub_(theta, fmul_(p.lr, fadd_(hyzo_sign(*m), decay)));
}
/* AdamW (adazo = false) and AdaZO (second moment of the momentum). */
HYZO_FN float hyzo_rule_adam(const HyzoRule& p, bool adazo, float theta, float g, float* m,
                             float* v) {
    const float decay = fmul_(p.weight_decay, theta);
    *m = fadd_(fmul_(p.beta1, *m), fmul_(fsub_(1.0f, p.beta1), g));
    const float second = adazo ? *m : g;
    *v = fadd_(fmul_(p.beta2, *v), fmul_(fsub_(1.0f, p.beta2), fmul_(second, second)));
    const float m_hat = fdiv_(*m, p.bias_correction1);
    const float v_hat = fdiv_(*v, p.bias_correction2);
    const float step = fadd_(fdiv_(m_hat, fadd_(fsqrt_(v_hat), p.eps)), decay);
    return fsub_(theta, fmul_(p.lr, step));
}

/* One update of theta with estimate g (rules.rs `apply`). */
HYZO_FN float hyzo_apply_rule(const HyzoRule& p, float theta, float g, float* m, float* v) {
    switch (p.rule) {
        case HYZO_SGD: return hyzo_rule_sgd(p, theta, g);
        case HYZO_MOMENTUM: return hyzo_rule_momentum(p, theta, g, m);
        case HYZO_SIGN: return hyzo_rule_sign(p, theta, g);
        case HYZO_SIGNUM: return hyzo_rule_signum(p, theta, g, m);
        default: return hyzo_rule_adam(p, p.rule == HYZO_ADAZO, theta, g, m, v);
    }
}

/* 1 − β^t rounded to f32 (rules.rs `bias_correction`): β^t by square and multiply in f64,
 * each product one correctly rounded operation, so CPU and GPU agree to the bit. */
HYZO_FN float hyzo_bias_correction(float beta, hyzo_u64 t) {
    double base = (double)beta, power = 1.0;
    while (t != 0) {
        if (t & 1) power = hyzo_dmul_(power, base);
        t >>= 1;
        if (t != 0) base = hyzo_dmul_(base, base);
    }
#ifdef HYZO_HOST_EMULATION
    volatile double r = 1.0 - power;
    return (float)r;
#else
    return __double2float_rn(__dsub_rn(1.0, power));
#endif
}

/* The rule over 8 elements, the (uniform) choice of rule made once. */
HYZO_FN void hyzo_apply_rule8(const HyzoRule& p, float x[8], const float g[8], float m[8],
                              float v[8]) {
    switch (p.rule) {
        case HYZO_SGD:
            for (int e = 0; e < 8; e++) x[e] = hyzo_rule_sgd(p, x[e], g[e]);
            break;
        case HYZO_MOMENTUM:
            for (int e = 0; e < 8; e++) x[e] = hyzo_rule_momentum(p, x[e], g[e], &m[e]);
            break;
        case HYZO_SIGN:
            for (int e = 0; e < 8; e++) x[e] = hyzo_rule_sign(p, x[e], g[e]);
            break;
        case HYZO_SIGNUM:
            for (int e = 0; e < 8; e++) x[e] = hyzo_rule_signum(p, x[e], g[e], &m[e]);
            break;
        default: {
            const bool adazo = p.rule == HYZO_ADAZO;
            for (int e = 0; e < 8; e++) x[e] = hyzo_rule_adam(p, adazo, x[e], g[e], &m[e], &v[e]);
            break;
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* Low-rank directions (spec §7).                                                        */

/* Entry (i, k) of Z = A Bᵀ · scale from row i of A (`a`) and row k of B (`b`), `rank`
 * floats each: `LowRankShape::entry` of src/direction.rs, the f32 sum in order, every
 * operation rounded (no fused multiply-add), then the product with scale. The rows are
 * read through the read-only cache on the device (the factors are written by an earlier
 * launch). */
HYZO_FN float hyzo_lowrank_entry(const float* a, const float* b, hyzo_u32 rank, float scale) {
    float acc = 0.0f;
    for (hyzo_u32 p = 0; p < rank; p++) {
#ifdef HYZO_HOST_EMULATION
        acc = fadd_(acc, fmul_(a[p], b[p]));
#else
        acc = fadd_(acc, fmul_(__ldg(a + p), __ldg(b + p)));
#endif
    }
    return fmul_(acc, scale);
}

#endif /* HYZO_DEVICE_CUH */
