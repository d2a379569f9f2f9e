// Host driver for tests/device_mirror.rs: the device primitives of kernels/hyzo_device.cuh
// compiled as plain C++ (HYZO_HOST_EMULATION), answering one command per input line with
// the bit patterns of the results. All numbers are hexadecimal.
#define HYZO_HOST_EMULATION
#include "hyzo_device.cuh"

#include <cstdio>
#include <cstring>

static hyzo_u32 bits(float f) { return hyzo_f2u(f); }
static float flt(hyzo_u32 u) { return hyzo_u2f(u); }

int main() {
    char cmd[8];
    while (std::scanf("%7s", cmd) == 1) {
        if (!std::strcmp(cmd, "P")) {  // philox c0 c1 c2 c3 k0 k1
            hyzo_u32 c[4], k[2];
            std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]);
            HyzoWords w = hyzo_philox(c[0], c[1], c[2], c[3], k[0], k[1]);
            std::printf("%x %x %x %x\n", w.x0, w.x1, w.x2, w.x3);
        } else if (!std::strcmp(cmd, "G")) {  // gaussian pair x y
            hyzo_u32 x, y;
            std::scanf("%x %x", &x, &y);
            float a, b;
            hyzo_gaussian_pair(x, y, &a, &b);
            std::printf("%x %x\n", bits(a), bits(b));
        } else if (!std::strcmp(cmd, "F")) {  // fast gaussian pair x y (libm for the MUFU)
            hyzo_u32 x, y;
            std::scanf("%x %x", &x, &y);
            float a, b;
            hyzo_gaussian_pair_fast(x, y, &a, &b);
            std::printf("%x %x\n", bits(a), bits(b));
        } else if (!std::strcmp(cmd, "K")) {  // philox with precomputed keys, as P
            hyzo_u32 c[4], k[2];
            std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]);
            const HyzoKeys keys = hyzo_keys((hyzo_u64)k[0] | ((hyzo_u64)k[1] << 32));
            HyzoWords w = hyzo_philox_k(c[0], c[1], c[2], c[3], keys);
            std::printf("%x %x %x %x\n", w.x0, w.x1, w.x2, w.x3);
        } else if (!std::strcmp(cmd, "D")) {  // direction8 kind seed step dir g
            hyzo_u32 kind, step, dir;
            hyzo_u64 seed, g;
            std::scanf("%x %llx %x %x %llx", &kind, &seed, &step, &dir, &g);
            float z[8];
            hyzo_direction8(kind, seed, step, dir, g, z);
            for (int e = 0; e < 8; e++) std::printf("%x%c", bits(z[e]), e == 7 ? '\n' : ' ');
        } else if (!std::strcmp(cmd, "DF")) {  // fast direction8 kind seed step dir g
            hyzo_u32 kind, step, dir;
            hyzo_u64 seed, g;
            std::scanf("%x %llx %x %x %llx", &kind, &seed, &step, &dir, &g);
            float z[8];
            hyzo_direction8_fast(kind, seed, step, dir, g, z);
            for (int e = 0; e < 8; e++) std::printf("%x%c", bits(z[e]), e == 7 ? '\n' : ' ');
        } else if (!std::strcmp(cmd, "J")) {  // entries j0..j0+7: kind fast seed step dir j0
            hyzo_u32 kind, fast, step, dir;
            hyzo_u64 seed, j0;
            std::scanf("%x %x %llx %x %x %llx", &kind, &fast, &seed, &step, &dir, &j0);
            float z[8];
            hyzo_direction8_at(kind, fast != 0, seed, step, dir, j0, z);
            for (int e = 0; e < 8; e++) std::printf("%x%c", bits(z[e]), e == 7 ? '\n' : ' ');
        } else if (!std::strcmp(cmd, "X")) {  // rounding words of j0..j0+7: seed step j0
            hyzo_u32 step;
            hyzo_u64 seed, j0;
            std::scanf("%llx %x %llx", &seed, &step, &j0);
            hyzo_u32 r[8];
            hyzo_rounding_words8_at(seed, step, j0, r);
            for (int e = 0; e < 8; e++) std::printf("%x%c", r[e], e == 7 ? '\n' : ' ');
        } else if (!std::strcmp(cmd, "N")) {  // span of j0: blocks, half, odd, bit span
            hyzo_u64 j0;
            std::scanf("%llx", &j0);
            const HyzoSpan s = hyzo_span(j0);
            const HyzoBitSpan b = hyzo_bit_span(j0);
            std::printf("%llx %llx %llx %x %x %llx %llx %x %x %x\n", s.block[0], s.block[1],
                        s.block[2], (unsigned)s.half, (unsigned)s.odd, b.block_lo, b.block_hi,
                        b.word_lo, b.word_hi, b.shift);
        } else if (!std::strcmp(cmd, "W")) {  // rounding words seed step g
            hyzo_u32 step;
            hyzo_u64 seed, g;
            std::scanf("%llx %x %llx", &seed, &step, &g);
            hyzo_u32 r[8];
            hyzo_rounding_words8(seed, step, g, r);
            for (int e = 0; e < 8; e++) std::printf("%x%c", r[e], e == 7 ? '\n' : ' ');
        } else if (!std::strcmp(cmd, "S")) {  // stochastic x r -> bf16 f16 (as f32 bits)
            hyzo_u32 x, r;
            std::scanf("%x %x", &x, &r);
            std::printf("%x %x\n", bits(hyzo_stochastic_bf16(flt(x), r)),
                        bits(hyzo_stochastic_f16(flt(x), r)));
        } else if (!std::strcmp(cmd, "C")) {  // conversions x -> bf16 bits, f16 bits, widened
            hyzo_u32 x;
            std::scanf("%x", &x);
            unsigned short b = hyzo_f32_to_bf16(flt(x)), h = hyzo_f32_to_f16(flt(x));
            std::printf("%x %x %x %x\n", b, h, bits(hyzo_bf16_to_f32(b)), bits(hyzo_f16_to_f32(h)));
        } else if (!std::strcmp(cmd, "U")) {  // rule: rule lr b1 b2 eps wd bc1 bc2 theta g m v
            HyzoRule p;
            hyzo_u32 f[11];
            std::scanf("%x %x %x %x %x %x %x %x %x %x %x %x", &p.rule, &f[0], &f[1], &f[2], &f[3],
                       &f[4], &f[5], &f[6], &f[7], &f[8], &f[9], &f[10]);
            p.lr = flt(f[0]); p.beta1 = flt(f[1]); p.beta2 = flt(f[2]); p.eps = flt(f[3]);
            p.weight_decay = flt(f[4]); p.bias_correction1 = flt(f[5]);
            p.bias_correction2 = flt(f[6]);
            float m = flt(f[9]), v = flt(f[10]);
            const float x = hyzo_apply_rule(p, flt(f[7]), flt(f[8]), &m, &v);
            float x8[8], g8[8], m8[8], v8[8];
            for (int e = 0; e < 8; e++) { x8[e] = flt(f[7]); g8[e] = flt(f[8]); m8[e] = flt(f[9]); v8[e] = flt(f[10]); }
            hyzo_apply_rule8(p, x8, g8, m8, v8);
            if (bits(x8[7]) != bits(x) || bits(m8[7]) != bits(m) || bits(v8[7]) != bits(v)) {
                std::printf("apply_rule8 differs from apply_rule\n");
                return 1;
            }
            std::printf("%x %x %x\n", bits(x), bits(m), bits(v));
        } else if (!std::strcmp(cmd, "B")) {  // bias correction beta t
            hyzo_u32 beta;
            hyzo_u64 t;
            std::scanf("%x %llx", &beta, &t);
            std::printf("%x\n", bits(hyzo_bias_correction(flt(beta), t)));
        } else if (!std::strcmp(cmd, "V")) {  // division a b
            hyzo_u32 a, b;
            std::scanf("%x %x", &a, &b);
            std::printf("%x\n", bits(fdiv_(flt(a), flt(b))));
        } else if (!std::strcmp(cmd, "L")) {  // low-rank entry: rank scale a[rank] b[rank]
            hyzo_u32 rank, scale;
            static float a[1024], b[1024];
            if (std::scanf("%x %x", &rank, &scale) != 2 || rank > 1024) {
                std::printf("bad low-rank entry\n");
                return 1;
            }
            for (hyzo_u32 p = 0; p < 2 * rank; p++) {
                hyzo_u32 w;
                std::scanf("%x", &w);
                (p < rank ? a[p] : b[p - rank]) = flt(w);
            }
            std::printf("%x\n", bits(hyzo_lowrank_entry(a, b, rank, flt(scale))));
        } else {
            std::printf("unknown command %s\n", cmd);
            return 1;
        }
    }
    return 0;
}
