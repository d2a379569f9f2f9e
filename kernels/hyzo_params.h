/* The plain structs and constants shared by the kernels (kernels/hyzo.cu) and the Rust
 * backend. The Rust side is GENERATED from this file by bindgen, into
 * src/backend/cuda/abi_generated.rs (checked in; src/backend/cuda/abi.rs includes it), with
 * compile-time asserts of every field offset, struct size and alignment. After changing a
 * struct or a constant here, regenerate it (libclang: the pinned wheel in .venv, `make setup`):
 *
 *     HYZO_UPDATE_ABI=1 cargo test --no-default-features --test abi
 *
 * (without the `cuda` feature, so that the crate builds while the file is stale; the test
 * needs none of it).
 * `cargo test --test abi` (part of `make test`) fails while the generated file is stale.
 * Comments here become the Rust docs.
 *
 * No hand-written layout pins: they used to be here (static_assert of each offset, read back
 * by a Rust test), and both sides now derive every offset from these declarations. What the
 * pins added was nvcc's view checked against clang's (bindgen's); for these types (fixed-width
 * integers and floats, naturally aligned, no bit-fields or packing) CUDA lays out device
 * structs as the host compiler does, so that check cannot fail, and it cost a second list of
 * numbers to edit with every field.
 *
 * Self-contained on purpose (no system header): NVRTC compiles it without include paths. */
#ifndef HYZO_PARAMS_H
#define HYZO_PARAMS_H

typedef unsigned int hyzo_u32;
typedef int hyzo_i32;
typedef unsigned long long hyzo_u64;

/* Threads per block of every element kernel (the reductions' order depends on it, so it is
 * fixed here rather than chosen at launch). */
#define HYZO_THREADS 256
/* Elements per thread-step: a group of 8 consecutive GLOBAL indices starting at a multiple
 * of 8 (two Gaussian Philox blocks, one 16-byte vector of a 16-bit dtype). */
#define HYZO_GROUP 8
/* Groups per chunk; a block processes one chunk of one tensor at a time. */
#define HYZO_CHUNK_GROUPS 2048
/* (direction, coefficient) pairs carried in the launch parameters; more go through a
 * device array. */
#define HYZO_MAX_TERMS 8

/* Element types, as `DType` in src/dtype.rs. */
#define HYZO_F32 0u
#define HYZO_F16 1u
#define HYZO_BF16 2u
/* Direction kinds as generated (`DirectionKind`; the sphere is generated as Gaussian). */
#define HYZO_GAUSSIAN 0u
#define HYZO_RADEMACHER 1u
/* Precision modes, as `Precision`. */
#define HYZO_NEAREST 0u
#define HYZO_STOCHASTIC 1u
#define HYZO_COMPENSATED 2u
/* Rules, as `Rule` in src/rules.rs. */
#define HYZO_SGD 0u
#define HYZO_MOMENTUM 1u
#define HYZO_SIGN 2u
#define HYZO_SIGNUM 3u
#define HYZO_ADAMW 4u
#define HYZO_ADAZO 5u
/* State sets, as `StateSet` in src/config.rs. */
#define HYZO_STATE_MAIN 0u
#define HYZO_STATE_FIRST_ORDER 1u
/* Estimators, as `Estimator` in src/config.rs. */
#define HYZO_TWO_SIDED 0u
#define HYZO_ONE_SIDED 1u

/* One tensor of a shard: its memory, its place in the global index space, and where its
 * chunks start in the launch's chunk numbering. Addresses are 0 when absent. `m`, `v`
 * (f32, the main rule's state), `fo_m`, `fo_v` (f32, the first-order rule's state, spec v2
 * §5) and `lo` (bf16) are the addresses of local element 0. */
typedef struct HyzoTensor {
    hyzo_u64 data;
    hyzo_u64 grad;
    hyzo_u64 lo;
    hyzo_u64 m;
    hyzo_u64 v;
    hyzo_u64 fo_m;
    hyzo_u64 fo_v;
    hyzo_u64 numel;
    hyzo_u64 offset;
    hyzo_u64 first_chunk;
    hyzo_u32 dtype;
    hyzo_u32 grad_dtype;
    /* Low-rank directions (spec §7): rank 0 when the tensor has none. factor_offset: floats
     * from the start of one direction's factor block (HyzoPass.factor_base, block k for
     * zeroth-order term k) to this tensor's A (rows x rank, rows = numel / cols); B
     * (cols x rank) follows A. scale = f32(1 / sqrt(rank)) (LowRankShape::scale). */
    hyzo_u64 factor_offset;
    hyzo_u64 cols;
    hyzo_u32 rank;
    float scale;
} HyzoTensor;

/* `RuleParams` of src/rules.rs, field for field. */
typedef struct HyzoRule {
    hyzo_u32 rule;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bias_correction1;
    float bias_correction2;
} HyzoRule;

/* `Term` of src/backend/mod.rs. */
typedef struct HyzoTerm {
    hyzo_u32 direction;
    float coeff;
} HyzoTerm;

/* The launch parameters of the element kernels (perturb, update, fo_update, sq_norm). */
typedef struct HyzoPass {
    hyzo_u64 table;        /* device HyzoTensor[ntensors], sorted by first_chunk */
    hyzo_u64 terms;        /* device HyzoTerm[nterms], or 0: the inline terms */
    hyzo_u64 skip_flag;    /* device u32 written by hyzo_device_losses, or 0 */
    hyzo_u64 partials;     /* sq_norm: device f64 per chunk */
    hyzo_u64 seed;
    hyzo_u64 total_chunks;
    hyzo_u32 ntensors;
    hyzo_u32 step;
    hyzo_u32 kind;
    hyzo_u32 precision;
    hyzo_u32 nterms;       /* perturb terms, or zeroth-order terms of an update */
    hyzo_u32 has_restore;
    HyzoTerm restore;
    hyzo_i32 restore_slot; /* index of a term with the restore's direction, or -1 */
    hyzo_u32 has_grad;
    float grad_weight;
    hyzo_u32 direction;    /* sq_norm's direction */
    HyzoRule rule;
    HyzoTerm inline_terms[HYZO_MAX_TERMS];
    hyzo_u64 t;            /* update passes: the host's count of attempted updates of the state */
    hyzo_u64 skip_count;   /* device u64 of steps skipped on the device, or 0: when set, the
                              bias corrections are those of t - *skip_count */
    hyzo_u32 state_set;    /* HYZO_STATE_*: the m, v an update reads and writes */
    hyzo_u32 lowrank;      /* 1: the step's directions are low-rank (spec §7): perturb passes
                              skip the tensors with rank != 0, update passes rebuild their
                              Z from the factors at factor_base (no restore term) */
    hyzo_u64 counters;     /* device HyzoCounters, or 0: when set, a pass's step is the
                              counter's plus `step` (0 within a step), and an update's t
                              the counter's t[state_set] + 1 instead of `t` */
    hyzo_u64 factor_base;  /* device f32: the factors of zeroth-order term k at
                              k * factor_stride (update passes with lowrank) */
    hyzo_u64 factor_stride; /* floats per term's block */
    hyzo_u64 tensor_mask;  /* device u8[ntensors], or 0: when set, the pass skips every
                              tensor i with tensor_mask[i] == 0 (a first-order step over
                              the tensors that have a gradient, as torch.optim skips
                              parameters whose .grad is None) */
} HyzoPass;

/* One factor stream of one low-rank tensor (hyzo_lowrank_factors_*): floats
 * out .. out + count of each term's block get the Gaussian entries (spec §3) of the Philox
 * direction stream + d (d: the term's direction; stream: 0x80000000 for A, 0xC0000000 for
 * B) at global indices offset .. offset + count. Built once per shard by the host. */
typedef struct HyzoFactorJob {
    hyzo_u64 out;          /* floats from the start of a block */
    hyzo_u64 offset;       /* global index of entry 0 (the tensor's offset) */
    hyzo_u64 count;
    hyzo_u32 stream;       /* LOWRANK_A_STREAM or LOWRANK_B_STREAM */
    hyzo_u32 reserved;
} HyzoFactorJob;

/* The launch parameters of hyzo_lowrank_factors_*: every job for every term k, into block
 * k (out + 4 * k * stride bytes). */
typedef struct HyzoFactorPass {
    hyzo_u64 jobs;         /* device HyzoFactorJob[njobs] */
    hyzo_u64 counters;     /* device HyzoCounters, or 0 (the step as in HyzoPass) */
    hyzo_u64 seed;
    hyzo_u64 out;          /* device f32: block 0 */
    hyzo_u64 stride;       /* floats per block */
    hyzo_u64 terms;        /* device HyzoTerm[nterms], or 0: the inline terms (directions) */
    hyzo_u32 njobs;
    hyzo_u32 step;
    hyzo_u32 nterms;
    hyzo_u32 reserved;
    HyzoTerm inline_terms[HYZO_MAX_TERMS];
} HyzoFactorPass;

/* The step counters on the device (CudaBackend's device-counter mode, for CUDA graphs that
 * replay across steps): the host's `Counters` of src/state.rs. `step` names the directions
 * and the stochastic-rounding stream; t[set] counts the attempted updates of a state set,
 * so an update pass uses t[set] + 1 (minus the device's skip count for the main set, as
 * for HyzoPass.t). hyzo_advance_counters, launched after each update pass, advances them;
 * a device-side skip advances t[main] and the skip count together, so the t the bias
 * corrections use stays where it was. The host sets them (at the first step, after a load,
 * after a host-side skip) and reads them back after graph replays. */
typedef struct HyzoCounters {
    hyzo_u64 step;
    hyzo_u64 t[2];         /* indexed by HYZO_STATE_* */
} HyzoCounters;

/* The launch parameters of hyzo_device_losses: projected gradients from losses in device
 * memory, the finiteness check, and the skip counter. */
typedef struct HyzoLossPass {
    hyzo_u64 losses;       /* device f32[evaluations] */
    hyzo_u64 base;         /* device HyzoTerm[q] (coefficients s_d / q), or 0: inline */
    hyzo_u64 out;          /* device HyzoTerm[q]: coefficients g_d * base_d */
    hyzo_u64 skip_flag;    /* device u32: 1 when a loss is not finite */
    hyzo_u64 skip_count;   /* device u64: steps skipped so far */
    hyzo_u32 q;
    hyzo_u32 estimator;
    float eps;
    float max_coefficient_sum; /* skip when Σ_d |g_d base_d| (f32, in order) exceeds it */
    HyzoTerm inline_base[HYZO_MAX_TERMS];
} HyzoLossPass;

#endif /* HYZO_PARAMS_H */
