/*
 * hyzo quickstart in C99: a small least-squares problem min_x mean((A x - b)^2) whose 24
 * parameters live in three tensors (f32, bf16, f16) of one flat vector, optimized on the
 * CPU by
 *   1. ZO-SGD (zeroth order: loss evaluations only),
 *   2. a hybrid schedule (1 first-order step with the exact gradient, then 3 ZO steps),
 * with the optimizer state saved and restored in the middle of run 2 (the resumed run
 * must repeat the original bit for bit). Exits non-zero when a loss does not go down, the
 * resume differs, or a call fails unexpectedly.
 *
 * Build: cc -std=c99 quickstart.c $(pkg-config --cflags --libs hyzo) -lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hyzo.h"

#define ROWS 32
#define N0 8 /* f32 elements  0.. 8 */
#define N1 8 /* bf16 elements 8..16 */
#define N2 8 /* f16 elements 16..24 */
#define COLS (N0 + N1 + N2)

/* Abort with the library's message on an unexpected failure. */
#define CHECK(call)                                                                   \
    do {                                                                              \
        hyzo_status s_ = (call);                                                      \
        if (s_ != HYZO_OK) {                                                          \
            fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #call,  \
                    hyzo_status_string(s_), hyzo_last_error());                       \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

/* ---- f16 / bf16 conversions (C99 has no such types; stored as uint16_t) ---- */

static float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }
static uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even (finite inputs) */
    return (uint16_t)(u >> 16);
}

static float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) return (sign ? -1.0f : 1.0f) * ldexpf((float)man, -24);
    if (exp == 31) return bits_to_float(sign | 0x7F800000u | (man << 13));
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
static uint16_t float_to_f16(float f) { /* round to nearest even, normal range only */
    uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xFFu) - 127 + 15;
    uint32_t man = u & 0x7FFFFFu;
    if (exp <= 0) return (uint16_t)sign; /* flush tiny values: enough here */
    if (exp >= 31) return (uint16_t)(sign | 0x7C00u);
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13), rest = man & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)h;
}

/* ---- the problem ---- */

static float A[ROWS][COLS], b[ROWS];

/* The parameters and their gradients (f32 gradients for every tensor). */
static float x0[N0];
static uint16_t x1[N1]; /* bf16 */
static uint16_t x2[N2]; /* f16 */
static float g0[N0], g1[N1], g2[N2];

static void params(float *x) {
    int i;
    for (i = 0; i < N0; i++) x[i] = x0[i];
    for (i = 0; i < N1; i++) x[N0 + i] = bf16_to_float(x1[i]);
    for (i = 0; i < N2; i++) x[N0 + N1 + i] = f16_to_float(x2[i]);
}

/* The forward pass: mean squared residual at the current parameters. */
static float loss(void) {
    float x[COLS];
    double sum = 0.0;
    int r, c;
    params(x);
    for (r = 0; r < ROWS; r++) {
        double res = -b[r];
        for (c = 0; c < COLS; c++) res += (double)A[r][c] * x[c];
        sum += res * res;
    }
    return (float)(sum / ROWS);
}

/* The exact gradient, written into the registered gradient buffers. */
static void gradient(void) {
    float x[COLS], g[COLS];
    int r, c;
    params(x);
    for (c = 0; c < COLS; c++) g[c] = 0.0f;
    for (r = 0; r < ROWS; r++) {
        double res = -b[r];
        for (c = 0; c < COLS; c++) res += (double)A[r][c] * x[c];
        for (c = 0; c < COLS; c++) g[c] += (float)(2.0 * res * A[r][c] / ROWS);
    }
    memcpy(g0, g, sizeof g0);
    memcpy(g1, g + N0, sizeof g1);
    memcpy(g2, g + N0 + N1, sizeof g2);
}

static uint32_t lcg = 12345u;
static float uniform(void) { /* in [-1, 1) */
    lcg = lcg * 1664525u + 1013904223u;
    return (float)(lcg >> 8) / 8388608.0f - 1.0f;
}

static void reset_problem(void) {
    float xt[COLS];
    int r, c;
    lcg = 12345u;
    for (c = 0; c < COLS; c++) xt[c] = uniform();
    for (r = 0; r < ROWS; r++) {
        b[r] = 0.0f;
        for (c = 0; c < COLS; c++) {
            A[r][c] = uniform() / 3.0f;
            b[r] += A[r][c] * xt[c];
        }
    }
    for (c = 0; c < N0; c++) x0[c] = 0.0f;
    for (c = 0; c < N1; c++) x1[c] = float_to_bf16(0.0f);
    for (c = 0; c < N2; c++) x2[c] = float_to_f16(0.0f);
}

static hyzo_optimizer *make(const hyzo_config *cfg) {
    hyzo_optimizer *opt = NULL;
    CHECK(hyzo_optimizer_create(cfg, HYZO_DEVICE_CPU, 0, &opt));
    /* Global offsets place the three tensors side by side in one flat vector. */
    CHECK(hyzo_optimizer_add_tensor(opt, x0, HYZO_F32, N0, 0, g0, HYZO_F32));
    CHECK(hyzo_optimizer_add_tensor(opt, x1, HYZO_BF16, N1, N0, g1, HYZO_F32));
    CHECK(hyzo_optimizer_add_tensor(opt, x2, HYZO_F16, N2, N0 + N1, g2, HYZO_F32));
    return opt;
}

/* One zeroth-order step: evaluate the loss at every point the optimizer asks for. */
static void zo_step(hyzo_optimizer *opt) {
    int more = 0;
    CHECK(hyzo_zo_begin(opt));
    do {
        CHECK(hyzo_zo_feed(opt, loss(), &more));
    } while (more);
}

/* One step of whichever kind the hybrid schedule calls for. */
static void hybrid_step(hyzo_optimizer *opt) {
    hyzo_phase phase;
    CHECK(hyzo_next_phase(opt, &phase));
    if (phase == HYZO_PHASE_FO) {
        gradient();
        CHECK(hyzo_fo_step(opt));
    } else {
        zo_step(opt);
    }
}

static int zo_sgd(void) {
    hyzo_config cfg = hyzo_config_default();
    hyzo_optimizer *opt;
    float first, last, l;
    int skipped, step;
    uint64_t steps, nskipped;

    reset_problem();
    cfg.seed = 2024;
    cfg.lr = 0.02f;
    cfg.eps = 1e-2f;
    cfg.num_directions = 4;
    opt = make(&cfg);
    first = loss();
    for (step = 0; step < 400; step++) {
        zo_step(opt);
        if (step % 100 == 0) {
            CHECK(hyzo_zo_last_loss(opt, &l, &skipped));
            printf("  zo-sgd step %3d  loss %.5f\n", step, l);
        }
    }
    last = loss();
    CHECK(hyzo_optimizer_stats(opt, &steps, &nskipped));
    printf("zo-sgd: loss %.5f -> %.5f in %llu steps (%llu skipped)\n", first, last,
           (unsigned long long)steps, (unsigned long long)nskipped);
    hyzo_optimizer_destroy(opt);
    return last < 0.5f * first;
}

static int hybrid(void) {
    hyzo_config cfg = hyzo_config_default();
    hyzo_optimizer *opt;
    float first, last;
    float s0[N0], r0[N0];
    uint16_t s1[N1], s2[N2], r1[N1], r2[N2];
    uint64_t size;
    unsigned char *state;
    int step, same;

    reset_problem();
    cfg.seed = 7;
    /* The paper's hybrid (spec v2 §5): AdamW for first-order steps, AdaZO for zeroth-order
     * steps, each with a state of its own. */
    cfg.rule = HYZO_RULE_ADAZO;
    cfg.fo_rule = HYZO_RULE_ADAMW;
    cfg.lr = 0.02f;
    cfg.eps = 1e-2f;
    cfg.num_directions = 2;
    cfg.precision = HYZO_PRECISION_STOCHASTIC;
    cfg.fo_steps = 1;
    cfg.zo_steps = 3;
    opt = make(&cfg);
    first = loss();
    for (step = 0; step < 100; step++) hybrid_step(opt);

    /* Save the optimizer state (and keep the parameters, which are ours). */
    CHECK(hyzo_optimizer_state_size(opt, &size));
    state = malloc((size_t)size);
    if (!state) return 0;
    CHECK(hyzo_optimizer_save_state(opt, state, size));
    memcpy(s0, x0, sizeof x0); memcpy(s1, x1, sizeof x1); memcpy(s2, x2, sizeof x2);

    for (step = 0; step < 100; step++) hybrid_step(opt);
    last = loss();
    memcpy(r0, x0, sizeof x0); memcpy(r1, x1, sizeof x1); memcpy(r2, x2, sizeof x2);

    /* Restore both and run the same 100 steps again: the same bits must come out. */
    CHECK(hyzo_optimizer_load_state(opt, state, size));
    memcpy(x0, s0, sizeof x0); memcpy(x1, s1, sizeof x1); memcpy(x2, s2, sizeof x2);
    for (step = 0; step < 100; step++) hybrid_step(opt);
    same = !memcmp(r0, x0, sizeof x0) && !memcmp(r1, x1, sizeof x1) &&
           !memcmp(r2, x2, sizeof x2);
    printf("hybrid adamw/adazo (1 FO : 3 ZO): loss %.5f -> %.5f; resumed run %s\n", first, last,
           same ? "identical" : "DIFFERS");

    /* A state saved by another optimizer (other seed, other tensors) is refused. */
    {
        hyzo_config other = cfg;
        hyzo_optimizer *o2;
        hyzo_status s;
        other.seed = 8;
        CHECK(hyzo_optimizer_create(&other, HYZO_DEVICE_CPU, 0, &o2));
        CHECK(hyzo_optimizer_add_tensor(o2, r0, HYZO_F32, N0, 0, NULL, HYZO_F32));
        s = hyzo_optimizer_load_state(o2, state, size);
        printf("loading it into another optimizer: %s: %s\n", hyzo_status_string(s),
               hyzo_last_error());
        hyzo_optimizer_destroy(o2);
        if (s == HYZO_OK) same = 0;
    }
    free(state);
    hyzo_optimizer_destroy(opt);
    return same && last < 0.5f * first;
}

static int errors(void) {
    hyzo_config cfg = hyzo_config_default();
    hyzo_optimizer *opt;
    int ok = 1, more = 1;
    float misaligned_storage[4];

    CHECK(hyzo_optimizer_create(&cfg, HYZO_DEVICE_CPU, 0, &opt));
    /* Each bad call returns a status and names what was wrong. */
    ok &= hyzo_optimizer_set_lr(opt, NAN) == HYZO_ERR_INVALID_ARGUMENT;
    printf("bad lr:        %s\n", hyzo_last_error());
    ok &= hyzo_zo_begin(opt) == HYZO_ERR_BAD_STATE;
    printf("no tensors:    %s\n", hyzo_last_error());
    ok &= hyzo_optimizer_add_tensor(opt, (char *)misaligned_storage + 1, HYZO_F32, 2, 0, NULL,
                                    HYZO_F32) == HYZO_ERR_INVALID_ARGUMENT;
    printf("misaligned:    %s\n", hyzo_last_error());
    ok &= hyzo_optimizer_add_tensor(opt, misaligned_storage, (hyzo_dtype)7, 2, 0, NULL,
                                    HYZO_F32) == HYZO_ERR_INVALID_ARGUMENT;
    printf("bad dtype:     %s\n", hyzo_last_error());
    ok &= hyzo_zo_feed(opt, 1.0f, &more) == HYZO_ERR_BAD_STATE && more == 0;
    printf("feed w/o step: %s\n", hyzo_last_error());
    hyzo_optimizer_destroy(opt);
    return ok;
}

int main(void) {
    int ok = 1;
    printf("hyzo %s (CUDA available: %d)\n", hyzo_version(), hyzo_cuda_available());
    if (!zo_sgd()) { fprintf(stderr, "FAIL: ZO-SGD did not halve the loss\n"); ok = 0; }
    if (!hybrid()) { fprintf(stderr, "FAIL: hybrid run or resume\n"); ok = 0; }
    if (!errors()) { fprintf(stderr, "FAIL: a bad call was not rejected\n"); ok = 0; }
    puts(ok ? "quickstart: OK" : "quickstart: FAILED");
    return ok ? 0 : 1;
}
