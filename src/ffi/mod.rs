//! The C ABI (`ffi/hyzo.h` is generated from this file by cbindgen; see `tests/header.rs`).
//!
//! Every entry point is written out by hand (no macros) so that its validation reads next to
//! its documentation. The shape of each is the same:
//! - all work runs inside [`std::panic::catch_unwind`]: a panic becomes
//!   `HYZO_ERR_INTERNAL`, never an unwind across the C frame (and an optimizer that panicked
//!   is marked poisoned, since its state may be half-updated);
//! - arguments are checked before anything changes, so a failed call leaves the optimizer and
//!   the parameters as they were (exceptions are documented: a failed pass of a zeroth-order
//!   step poisons the optimizer, `hyzo_optimizer_poisoned`);
//! - enum arguments arrive as plain `u32` (C may pass any integer, and a Rust enum holding an
//!   undeclared value is undefined behaviour); cbindgen prints them under their C enum names
//!   (`[export.rename]` in `cbindgen.toml`), which have the size of `int` on every supported
//!   ABI;
//! - a failure stores a message in a thread-local buffer read by `hyzo_last_error`.

//!
//! One file per concern: `guard.rs` (errors, the panic guard, argument checks), `enums.rs`
//! (the C enums tied to the core's, and their conversions), `library.rs` (library-level
//! functions), `config.rs` (the configuration), `optimizer.rs` (creating and configuring an
//! optimizer), `steps.rs` (zeroth- and first-order steps), `state.rs` (saving and loading).
//! The types of the ABI are here.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::config::{Config, Estimator, Phase};
use crate::direction::{DirectionId, DirectionKind};
use crate::dtype::{DType, Precision};
use crate::error::{Error, Result};
use crate::optimizer::{Feed, Optimizer, StepReport};
use crate::rules::Rule;
use crate::shard::{Location, ParamShard, TensorSpec};

mod config;
mod enums;
mod guard;
mod library;
mod lowrank;
mod optimizer;
mod state;
mod steps;

pub use config::*;
use enums::*;
use guard::*;
pub use library::*;
pub use lowrank::*;
pub use optimizer::*;
pub use state::*;
pub use steps::*;

// ---------------------------------------------------------------------------------------
// Enums. The Rust enums exist for the header (and for Rust callers' readability); the entry
// points take and store the `Raw*` integer aliases, which the header names like the enums.
// Each value is tied to the core enum's in `enums.rs`, at compile time.

/// Outcome of a call. Every failure also sets the thread's message (`hyzo_last_error`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_status {
    /// Success.
    HYZO_OK = 0,
    /// An argument is out of its domain (NULL, NaN, out-of-range enum, overlap, misaligned).
    HYZO_ERR_INVALID_ARGUMENT = 1,
    /// The call is not allowed now (protocol misuse: wrong phase, no step in progress, ...;
    /// or the optimizer is poisoned, see `hyzo_optimizer_poisoned`).
    HYZO_ERR_BAD_STATE = 2,
    /// No CUDA driver, no such device, or a build without CUDA.
    HYZO_ERR_NO_DEVICE = 3,
    /// A CUDA driver, NVRTC or kernel failure.
    HYZO_ERR_CUDA = 4,
    /// An allocation failed.
    HYZO_ERR_OUT_OF_MEMORY = 5,
    /// A bug in hyzo (a caught panic); the optimizer involved is unusable afterwards.
    HYZO_ERR_INTERNAL = 6,
    /// Reading or writing a file failed (the message has the path and the system's reason).
    HYZO_ERR_IO = 7,
}

/// Element type of a parameter or gradient tensor.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_dtype {
    /// IEEE binary32 (4-byte aligned).
    HYZO_F32 = 0,
    /// IEEE binary16 (2-byte aligned).
    HYZO_F16 = 1,
    /// bfloat16 (2-byte aligned).
    HYZO_BF16 = 2,
}

/// Where an optimizer's tensors live.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_device {
    /// Host memory; passes run on a CPU thread pool.
    HYZO_DEVICE_CPU = 0,
    /// Memory of one CUDA device; passes run as kernels on the optimizer's stream.
    HYZO_DEVICE_CUDA = 1,
}

/// Update rule (spec §5).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_rule {
    /// `θ ← θ − η (ĝ + λ θ)`.
    HYZO_RULE_SGD = 0,
    /// Heavy-ball momentum: `m ← β1 m + ĝ`, `θ ← θ − η (m + λ θ)`.
    HYZO_RULE_MOMENTUM = 1,
    /// `θ ← θ − η (sign(ĝ) + λ θ)`.
    HYZO_RULE_SIGN = 2,
    /// Sign of an exponential moving average of `ĝ`.
    HYZO_RULE_SIGNUM = 3,
    /// Adam with decoupled weight decay.
    HYZO_RULE_ADAMW = 4,
    /// AdamW whose second moment tracks the momentum.
    HYZO_RULE_ADAZO = 5,
    /// Only for `hyzo_config.fo_rule`: no first-order rule of its own (first-order steps
    /// apply `rule` to its state, as in spec version 1).
    HYZO_RULE_NONE = 255,
}

/// Distribution of the random directions (spec §3).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_direction {
    /// Standard normal entries.
    HYZO_DIRECTION_GAUSSIAN = 0,
    /// ±1 entries.
    HYZO_DIRECTION_RADEMACHER = 1,
    /// Gaussian scaled to unit norm over every element of the optimizer.
    HYZO_DIRECTION_SPHERE = 2,
    /// Low-rank `Z = A Bᵀ / sqrt(r)` on tensors given a 2-D shape
    /// (`hyzo_optimizer_set_shape`), applied by the caller's forward pass and never written
    /// during a step (spec §7); the Gaussian on every other tensor.
    HYZO_DIRECTION_LOWRANK = 3,
}

/// Finite-difference estimator of a zeroth-order step (spec §4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_estimator {
    /// Central differences: `2q` loss evaluations per step.
    HYZO_ESTIMATOR_TWO_SIDED = 0,
    /// Forward differences: `q + 1` loss evaluations per step.
    HYZO_ESTIMATOR_ONE_SIDED = 1,
}

/// How f16/bf16 parameters are rounded when written back (spec §6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_precision {
    /// Round to nearest even on every pass.
    HYZO_PRECISION_NEAREST = 0,
    /// Stochastic rounding on updates, nearest on perturbations.
    HYZO_PRECISION_STOCHASTIC = 1,
    /// `hi + lo` with a bf16 residual kept by the optimizer (exact perturb/restore).
    HYZO_PRECISION_COMPENSATED = 2,
}

/// Kind of a step, as reported by `hyzo_next_phase`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_phase {
    /// A first-order step (`hyzo_fo_step`).
    HYZO_PHASE_FO = 0,
    /// A zeroth-order step (`hyzo_zo_begin` / `hyzo_zo_feed`).
    HYZO_PHASE_ZO = 1,
    /// No hybrid schedule (`fo_steps = zo_steps = 0`): the caller picks either kind.
    HYZO_PHASE_ANY = 2,
}

/// A `hyzo_status` as an integer (printed as `hyzo_status` in the header).
pub type RawStatus = u32;
/// A `hyzo_dtype` as an integer (printed as `hyzo_dtype` in the header).
pub type RawDType = u32;
/// A `hyzo_device` as an integer (printed as `hyzo_device` in the header).
pub type RawDevice = u32;
/// A `hyzo_rule` as an integer (printed as `hyzo_rule` in the header).
pub type RawRule = u32;
/// A `hyzo_direction` as an integer (printed as `hyzo_direction` in the header).
pub type RawDirection = u32;
/// A `hyzo_estimator` as an integer (printed as `hyzo_estimator` in the header).
pub type RawEstimator = u32;
/// A `hyzo_precision` as an integer (printed as `hyzo_precision` in the header).
pub type RawPrecision = u32;
/// A `hyzo_phase` as an integer (printed as `hyzo_phase` in the header).
pub type RawPhase = u32;

/// The optimizer configuration. Start from `hyzo_config_default` and change what you need;
/// `hyzo_optimizer_create` checks every field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct hyzo_config {
    /// Seed naming every direction of the run.
    pub seed: u64,
    /// Learning rate `η` (finite, >= 0).
    pub lr: f32,
    /// Smoothing radius `μ` of the finite differences (finite, > 0).
    pub eps: f32,
    /// Directions per zeroth-order step, `q >= 1`.
    pub num_directions: u32,
    /// Distribution of the directions.
    pub direction: RawDirection,
    /// One- or two-sided differences.
    pub estimator: RawEstimator,
    /// Update rule.
    pub rule: RawRule,
    /// `β1` in [0, 1) (momentum, signum, AdamW, AdaZO).
    pub beta1: f32,
    /// `β2` in [0, 1) (AdamW, AdaZO).
    pub beta2: f32,
    /// Adam's `ε` (finite, > 0).
    pub adam_eps: f32,
    /// Decoupled weight decay `λ` (finite, >= 0).
    pub weight_decay: f32,
    /// Rounding of f16/bf16 parameters.
    pub precision: RawPrecision,
    /// First-order steps per block of the hybrid schedule (both 0: no schedule).
    pub fo_steps: u32,
    /// Zeroth-order steps per block of the hybrid schedule.
    pub zo_steps: u32,
    /// `α` in [0, 1] of the mixed estimate `α ∇ + (1 − α) ĝ` of zeroth-order steps; > 0
    /// needs a gradient on every tensor.
    pub hybrid_alpha: f32,
    /// Rule of first-order steps, with a state of its own that zeroth-order steps never
    /// touch (spec v2 §5; the paper's hybrid: `HYZO_RULE_ADAMW` here, `HYZO_RULE_ADAZO` in
    /// `rule`). `HYZO_RULE_NONE` (the default): first-order steps apply `rule` to the one
    /// shared state. Separate AdamW + AdaZO states cost 16 bytes per parameter.
    pub fo_rule: RawRule,
    /// Learning rate of first-order steps (finite, >= 0), or NaN (the default): `lr`.
    pub fo_lr: f32,
    /// Weight decay of first-order steps (finite, >= 0), or NaN (the default):
    /// `weight_decay`.
    pub fo_weight_decay: f32,
    /// Rank `r` of `HYZO_DIRECTION_LOWRANK` directions, 1..=1024 (default 1; ignored by
    /// the other kinds). A `rows × cols` tensor gets rank `min(r, rows, cols)`.
    pub rank: u32,
}

/// An optimizer over a set of registered tensors (opaque). Create it with
/// `hyzo_optimizer_create`, free it with `hyzo_optimizer_destroy`.
pub struct hyzo_optimizer {
    /// `MAGIC` while alive: catches a pointer to something else, or to a destroyed optimizer
    /// whose memory was not reused yet.
    magic: u64,
    inner: Optimizer<'static>,
    /// The report of the last finished zeroth-order step.
    last: Option<StepReport>,
    /// Set when a panic escaped the core while this optimizer was being changed.
    poisoned: bool,
    /// Held for the length of every call (`guard::claim`): a second thread calling into the
    /// same optimizer meanwhile gets `HYZO_ERR_BAD_STATE` instead of a data race.
    in_use: std::sync::atomic::AtomicBool,
}

const MAGIC: u64 = u64::from_le_bytes(*b"hyzo-opt");

#[cfg(test)]
mod tests;
