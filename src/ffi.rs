//! The C ABI (`ffi/hyzo.h` is generated from this file by cbindgen; see `tests/header.rs`).
//!
//! Every entry point is written out by hand (no macros) so that its validation reads next to
//! its documentation. The shape of each is the same:
//! - all work runs inside [`std::panic::catch_unwind`]: a panic becomes
//!   `HYZO_ERR_INTERNAL`, never an unwind across the C frame (and an optimizer that panicked
//!   is marked poisoned, since its state may be half-updated);
//! - arguments are checked before anything changes, so a failed call leaves the optimizer and
//!   the parameters as they were (exceptions are documented: a failed pass of a backend ends
//!   the step);
//! - enum arguments arrive as plain `u32` (C may pass any integer, and a Rust enum holding an
//!   undeclared value is undefined behaviour); cbindgen prints them under their C enum names
//!   (`[export.rename]` in `cbindgen.toml`), which have the size of `int` on every supported
//!   ABI;
//! - a failure stores a message in a thread-local buffer read by `hyzo_last_error`.

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

// ---------------------------------------------------------------------------------------
// Enums. The Rust enums exist for the header (and for Rust callers' readability); the entry
// points take and store the `Raw*` integer aliases, which the header names like the enums.

/// Outcome of a call. Every failure also sets the thread's message (`hyzo_last_error`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum hyzo_status {
    /// Success.
    HYZO_OK = 0,
    /// An argument is out of its domain (NULL, NaN, out-of-range enum, overlap, misaligned).
    HYZO_ERR_INVALID_ARGUMENT = 1,
    /// The call is not allowed now (protocol misuse: wrong phase, no step in progress, ...).
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
}

const MAGIC: u64 = u64::from_le_bytes(*b"hyzo-opt");

// ---------------------------------------------------------------------------------------
// Errors and guards.

thread_local! {
    // A CString, not a String: `hyzo_last_error` hands out a pointer into it.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn status_of(e: &Error) -> hyzo_status {
    match e {
        Error::InvalidArgument(_) => hyzo_status::HYZO_ERR_INVALID_ARGUMENT,
        Error::BadState(_) => hyzo_status::HYZO_ERR_BAD_STATE,
        Error::NoDevice(_) => hyzo_status::HYZO_ERR_NO_DEVICE,
        Error::Cuda(_) => hyzo_status::HYZO_ERR_CUDA,
        Error::OutOfMemory(_) => hyzo_status::HYZO_ERR_OUT_OF_MEMORY,
        Error::Io(_) => hyzo_status::HYZO_ERR_IO,
        Error::Internal(_) => hyzo_status::HYZO_ERR_INTERNAL,
    }
}

/// Stores `func: message` as the thread's last error and returns the status of `e`.
fn fail(func: &str, e: &Error) -> hyzo_status {
    let text = format!("{func}: {}", e.message()).replace('\0', "\\0");
    // No interior NUL is left, so `new` cannot fail; keep a fixed text if it somehow does.
    let c = CString::new(text).unwrap_or_else(|_| c"hyzo: error message unavailable".into());
    // `try_with`: during thread teardown the slot may be gone; the status still tells.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
    status_of(e)
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    };
    // Dropping a payload runs foreign code (its Drop); keep a panic there inside too.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
    format!("internal error (panic): {msg}")
}

/// Runs `f`, turning its error or panic into a status and the thread's message.
fn guard(func: &str, f: impl FnOnce() -> Result<()>) -> hyzo_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => hyzo_status::HYZO_OK,
        Ok(Err(e)) => fail(func, &e),
        Err(p) => fail(func, &Error::Internal(panic_message(p))),
    }
}

fn invalid_arg(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Checks an optimizer handle and runs `f` on it; a panic inside `f` poisons the optimizer.
///
/// # Safety
/// `opt` is NULL or a pointer returned by `hyzo_optimizer_create` not yet destroyed, used
/// by no other thread during the call.
unsafe fn with_opt(
    func: &str,
    opt: *mut hyzo_optimizer,
    f: impl FnOnce(&mut hyzo_optimizer) -> Result<()>,
) -> hyzo_status {
    guard(func, || {
        let o = opt_mut(opt)?;
        if o.poisoned {
            return Err(Error::Internal(
                "opt: an earlier internal error left this optimizer inconsistent; destroy it"
                    .into(),
            ));
        }
        match catch_unwind(AssertUnwindSafe(|| f(&mut *o))) {
            Ok(r) => r,
            Err(p) => {
                o.poisoned = true;
                Err(Error::Internal(panic_message(p)))
            }
        }
    })
}

/// # Safety
/// As `with_opt`.
unsafe fn opt_mut<'a>(opt: *mut hyzo_optimizer) -> Result<&'a mut hyzo_optimizer> {
    if opt.is_null() {
        return Err(invalid_arg("opt: null pointer"));
    }
    if opt as usize % std::mem::align_of::<hyzo_optimizer>() != 0 {
        return Err(invalid_arg("opt: misaligned pointer, not a hyzo_optimizer"));
    }
    let o = &mut *opt;
    if o.magic != MAGIC {
        return Err(invalid_arg(
            "opt: not a live hyzo_optimizer (destroyed, or another object)",
        ));
    }
    Ok(o)
}

/// A writable reference to an output argument, checked for NULL and alignment.
///
/// # Safety
/// `p` is NULL or valid for writes of a `T`.
unsafe fn out_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    if p.is_null() {
        return Err(invalid_arg(format!("{name}: null pointer")));
    }
    if p as usize % std::mem::align_of::<T>() != 0 {
        return Err(invalid_arg(format!(
            "{name}: address {:#x} is not aligned to {} bytes",
            p as usize,
            std::mem::align_of::<T>()
        )));
    }
    Ok(&mut *p)
}

/// A byte length from C as a `usize` no larger than `isize::MAX` (slices need that).
fn byte_len(len: u64, name: &str) -> Result<usize> {
    usize::try_from(len)
        .ok()
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid_arg(format!("{name}: {len} exceeds the address space")))
}

/// A C enum value as the core enum, or an error naming the argument and the valid range.
fn enum_from<T>(v: u32, all: &[T], c_type: &str, name: &str) -> Result<T>
where
    T: Copy,
{
    all.get(v as usize).copied().ok_or_else(|| {
        invalid_arg(format!(
            "{name}: {v} is not a {c_type} (0..={})",
            all.len() - 1
        ))
    })
}

fn dtype_from(v: RawDType, name: &str) -> Result<DType> {
    enum_from(v, &DType::ALL, "hyzo_dtype", name)
}

fn direction_from(v: RawDirection, name: &str) -> Result<DirectionKind> {
    enum_from(v, &DirectionKind::ALL, "hyzo_direction", name)
}

fn estimator_from(v: RawEstimator, name: &str) -> Result<Estimator> {
    enum_from(v, &Estimator::ALL, "hyzo_estimator", name)
}

fn rule_from(v: RawRule, name: &str) -> Result<Rule> {
    enum_from(v, &Rule::ALL, "hyzo_rule", name)
}

/// `fo_rule`: a rule, or `HYZO_RULE_NONE`.
fn fo_rule_from(v: RawRule, name: &str) -> Result<Option<Rule>> {
    if v == hyzo_rule::HYZO_RULE_NONE as u32 {
        return Ok(None);
    }
    rule_from(v, name)
        .map(Some)
        .map_err(|e| invalid_arg(format!("{} or HYZO_RULE_NONE", e.message())))
}

/// An optional f32 of the C API: NaN means "not set".
fn unset_if_nan(v: f32) -> Option<f32> {
    (!v.is_nan()).then_some(v)
}

fn precision_from(v: RawPrecision, name: &str) -> Result<Precision> {
    enum_from(v, &Precision::ALL, "hyzo_precision", name)
}

/// The core configuration of a C one; every field checked, the message naming it.
fn config_from_c(c: &hyzo_config) -> Result<Config> {
    let config = Config {
        seed: c.seed,
        lr: c.lr,
        eps: c.eps,
        num_directions: c.num_directions,
        direction: direction_from(c.direction, "cfg->direction")?,
        estimator: estimator_from(c.estimator, "cfg->estimator")?,
        rule: rule_from(c.rule, "cfg->rule")?,
        beta1: c.beta1,
        beta2: c.beta2,
        adam_eps: c.adam_eps,
        weight_decay: c.weight_decay,
        precision: precision_from(c.precision, "cfg->precision")?,
        fo_steps: c.fo_steps,
        zo_steps: c.zo_steps,
        hybrid_alpha: c.hybrid_alpha,
        fo_rule: fo_rule_from(c.fo_rule, "cfg->fo_rule")?,
        fo_lr: unset_if_nan(c.fo_lr),
        fo_weight_decay: unset_if_nan(c.fo_weight_decay),
    };
    // The core names the field; prefix it with the argument.
    config.validate().map_err(|e| match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("cfg->{m}")),
        other => other,
    })?;
    Ok(config)
}

fn config_to_c(c: &Config) -> hyzo_config {
    hyzo_config {
        seed: c.seed,
        lr: c.lr,
        eps: c.eps,
        num_directions: c.num_directions,
        direction: c.direction as u32,
        estimator: c.estimator as u32,
        rule: c.rule as u32,
        beta1: c.beta1,
        beta2: c.beta2,
        adam_eps: c.adam_eps,
        weight_decay: c.weight_decay,
        precision: c.precision as u32,
        fo_steps: c.fo_steps,
        zo_steps: c.zo_steps,
        hybrid_alpha: c.hybrid_alpha,
        fo_rule: c
            .fo_rule
            .map_or(hyzo_rule::HYZO_RULE_NONE as u32, |r| r as u32),
        fo_lr: c.fo_lr.unwrap_or(f32::NAN),
        fo_weight_decay: c.fo_weight_decay.unwrap_or(f32::NAN),
    }
}

/// # Safety
/// `cfg` is NULL or points to a readable `hyzo_config`.
unsafe fn read_config(cfg: *const hyzo_config) -> Result<Config> {
    if cfg.is_null() {
        return Err(invalid_arg("cfg: null pointer"));
    }
    if cfg as usize % std::mem::align_of::<hyzo_config>() != 0 {
        return Err(invalid_arg("cfg: misaligned pointer"));
    }
    config_from_c(&*cfg)
}

fn new_handle(inner: Optimizer<'static>) -> *mut hyzo_optimizer {
    Box::into_raw(Box::new(hyzo_optimizer {
        magic: MAGIC,
        inner,
        last: None,
        poisoned: false,
    }))
}

#[cfg(feature = "cuda")]
fn cuda_optimizer(config: Config, ordinal: c_int) -> Result<Optimizer<'static>> {
    let backend = crate::backend::cuda::CudaBackend::new(ordinal)?;
    Optimizer::with_backend(
        config,
        ParamShard::with_location(Location::Cuda(ordinal)),
        Box::new(backend),
    )
}

#[cfg(not(feature = "cuda"))]
fn cuda_optimizer(_config: Config, _ordinal: c_int) -> Result<Optimizer<'static>> {
    Err(Error::NoDevice(
        "device: this libhyzo was built without CUDA support".into(),
    ))
}

// ---------------------------------------------------------------------------------------
// Library-level functions.

/// The defaults: ZO-SGD, one Gaussian direction, two-sided, `lr = eps = 1e-3`, seed 0,
/// `beta1 = 0.9`, `beta2 = 0.999`, `adam_eps = 1e-8`, no weight decay, nearest rounding,
/// no hybrid schedule, `hybrid_alpha = 0`, no first-order rule of its own
/// (`fo_rule = HYZO_RULE_NONE`, `fo_lr = fo_weight_decay = NaN`: as `lr`, `weight_decay`).
#[no_mangle]
pub extern "C" fn hyzo_config_default() -> hyzo_config {
    catch_unwind(|| config_to_c(&Config::default())).unwrap_or(hyzo_config {
        // Unreachable in practice; a configuration every create call rejects.
        seed: 0,
        lr: f32::NAN,
        eps: f32::NAN,
        num_directions: 0,
        direction: 0,
        estimator: 0,
        rule: 0,
        beta1: 0.0,
        beta2: 0.0,
        adam_eps: 0.0,
        weight_decay: 0.0,
        precision: 0,
        fo_steps: 0,
        zo_steps: 0,
        hybrid_alpha: 0.0,
        fo_rule: hyzo_rule::HYZO_RULE_NONE as u32,
        fo_lr: f32::NAN,
        fo_weight_decay: f32::NAN,
    })
}

/// The library version (`"MAJOR.MINOR.PATCH"`), a static string.
#[no_mangle]
pub extern "C" fn hyzo_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread (`"function: what was wrong"`), or
/// `""` when none failed yet. Successful calls leave it alone. The pointer stays valid until
/// the next failing call on this thread (or the thread's exit); copy it to keep it.
#[no_mangle]
pub extern "C" fn hyzo_last_error() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|slot| slot.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
    .unwrap_or(c"".as_ptr())
}

/// A static name for a status (`"HYZO_ERR_BAD_STATE"`), `"unknown hyzo_status"` for other
/// values.
#[no_mangle]
pub extern "C" fn hyzo_status_string(status: RawStatus) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        0 => c"HYZO_OK",
        1 => c"HYZO_ERR_INVALID_ARGUMENT",
        2 => c"HYZO_ERR_BAD_STATE",
        3 => c"HYZO_ERR_NO_DEVICE",
        4 => c"HYZO_ERR_CUDA",
        5 => c"HYZO_ERR_OUT_OF_MEMORY",
        6 => c"HYZO_ERR_INTERNAL",
        7 => c"HYZO_ERR_IO",
        _ => c"unknown hyzo_status",
    };
    s.as_ptr()
}

/// 1 when this library was built with CUDA support and a CUDA driver with at least one
/// device is present, 0 otherwise.
#[no_mangle]
pub extern "C" fn hyzo_cuda_available() -> c_int {
    #[cfg(feature = "cuda")]
    {
        catch_unwind(|| c_int::from(crate::backend::cuda::is_available())).unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Writes entries `start .. start + count` of direction `(seed, step, direction)` into `out`
/// (`count` floats, 4-byte aligned): exactly the values the optimizers use (spec §3).
/// `HYZO_DIRECTION_SPHERE` writes the unscaled Gaussian: the sphere's scale `1/||z||`
/// depends on every element an optimizer holds, which a range does not know. `count = 0`
/// writes nothing (`out` must still be non-NULL).
///
/// # Safety
/// `out` must be valid for writes of `count` floats.
#[no_mangle]
pub unsafe extern "C" fn hyzo_directions_fill(
    kind: RawDirection,
    seed: u64,
    step: u32,
    direction: u32,
    start: u64,
    count: u64,
    out: *mut f32,
) -> hyzo_status {
    guard("hyzo_directions_fill", || {
        let kind = direction_from(kind, "kind")?;
        let out = out_arg(out, "out")?;
        if start.checked_add(count).is_none() {
            return Err(invalid_arg(format!(
                "count: start {start} + count {count} overflows u64"
            )));
        }
        // A slice of `count` floats must fit the address space.
        byte_len(count.saturating_mul(4), "count")?;
        let out = std::slice::from_raw_parts_mut(out as *mut f32, count as usize);
        crate::direction::fill_parallel(kind, DirectionId::new(seed, step, direction), start, out);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Creating and configuring an optimizer.

/// Creates an optimizer with the configuration `*cfg` (copied) whose tensors live on
/// `device`. For `HYZO_DEVICE_CPU`, `device_ordinal` is ignored and passes use every core
/// (see `hyzo_optimizer_create_cpu` to choose); for `HYZO_DEVICE_CUDA` it names the
/// device (>= 0). On success `*out` is the new optimizer, to free with
/// `hyzo_optimizer_destroy`; on failure `*out` is set to NULL.
///
/// # Safety
/// `cfg` must point to a `hyzo_config`, `out` to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_create(
    cfg: *const hyzo_config,
    device: RawDevice,
    device_ordinal: c_int,
    out: *mut *mut hyzo_optimizer,
) -> hyzo_status {
    guard("hyzo_optimizer_create", || {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let config = read_config(cfg)?;
        let inner = match device {
            0 => Optimizer::new(config, ParamShard::new())?,
            1 => {
                if device_ordinal < 0 {
                    return Err(invalid_arg(format!(
                        "device_ordinal: {device_ordinal} is negative"
                    )));
                }
                cuda_optimizer(config, device_ordinal)?
            }
            v => {
                return Err(invalid_arg(format!(
                    "device: {v} is not a hyzo_device (0..=1)"
                )))
            }
        };
        *out = new_handle(inner);
        Ok(())
    })
}

/// Creates a CPU optimizer whose passes run on `num_threads` threads of its own (at most
/// 1024; 0: the process-wide pool over every core). Otherwise as `hyzo_optimizer_create`.
/// Results do not depend on the number of threads.
///
/// # Safety
/// As `hyzo_optimizer_create`.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_create_cpu(
    cfg: *const hyzo_config,
    num_threads: u32,
    out: *mut *mut hyzo_optimizer,
) -> hyzo_status {
    guard("hyzo_optimizer_create_cpu", || {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let config = read_config(cfg)?;
        let inner = Optimizer::with_threads(config, ParamShard::new(), num_threads as usize)?;
        *out = new_handle(inner);
        Ok(())
    })
}

/// Frees an optimizer and its state (NULL: no-op). The registered tensors are not touched,
/// so a zeroth-order step still in progress leaves them perturbed: call `hyzo_zo_abort`
/// first to restore them.
///
/// # Safety
/// `opt` must be NULL or an optimizer from `hyzo_optimizer_create` not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_destroy(opt: *mut hyzo_optimizer) {
    let _ = guard("hyzo_optimizer_destroy", || {
        if opt.is_null() {
            return Ok(());
        }
        // Validate before freeing: freeing a foreign pointer would corrupt the C heap.
        let o = opt_mut(opt)?;
        o.magic = 0;
        drop(Box::from_raw(opt));
        Ok(())
    });
}

/// Registers a tensor of `numel` elements of `dtype` at `data`, holding elements
/// `global_offset .. global_offset + numel` of the model's flat parameter vector, with an
/// optional gradient `grad` of `numel` elements of `grad_dtype` (NULL: none; needed for
/// first-order and hybrid steps). Memory is host memory for a CPU optimizer and device memory
/// of the optimizer's device for a CUDA one.
///
/// Fails (and registers nothing) on: a NULL `data`, `numel = 0`, an out-of-range dtype
/// (`grad_dtype` is checked even when `grad` is NULL), a pointer misaligned for its dtype,
/// memory or global elements overlapping a registered tensor or its gradient, and any call
/// after the optimizer's state was allocated (by the first step, `hyzo_optimizer_state_size`,
/// save/load or `hyzo_optimizer_local_sq_norms`).
///
/// # Safety
/// `data` (and `grad` when not NULL) must stay valid for reads and writes of `numel` elements
/// until the optimizer is destroyed, and must not be written by anything else while an
/// optimizer call runs.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_add_tensor(
    opt: *mut hyzo_optimizer,
    data: *mut c_void,
    dtype: RawDType,
    numel: u64,
    global_offset: u64,
    grad: *mut c_void,
    grad_dtype: RawDType,
) -> hyzo_status {
    with_opt("hyzo_optimizer_add_tensor", opt, |o| {
        let spec = TensorSpec {
            data: data as u64,
            dtype: dtype_from(dtype, "dtype")?,
            numel,
            offset: global_offset,
            grad: grad as u64,
            grad_dtype: dtype_from(grad_dtype, "grad_dtype")?,
        };
        // The byte range must exist in this address space (the shard checks u64 overflow).
        byte_len(numel.saturating_mul(spec.dtype.size() as u64), "numel")?;
        if !grad.is_null() {
            byte_len(numel.saturating_mul(spec.grad_dtype.size() as u64), "numel")?;
        }
        o.inner.add_tensor_raw(spec)?;
        Ok(())
    })
}

/// Makes later passes of a CUDA optimizer run on `cuda_stream` (a `CUstream` /
/// `cudaStream_t`; NULL: the default stream). On a CPU optimizer NULL is accepted (and does
/// nothing) and any other stream is an error.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `cuda_stream` a stream of the optimizer's device
/// that outlives its use.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_stream(
    opt: *mut hyzo_optimizer,
    cuda_stream: *mut c_void,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_stream", opt, |o| {
        if cuda_stream.is_null() && o.inner.params().location() == Location::Host {
            return Ok(());
        }
        o.inner.set_stream(cuda_stream as u64)
    })
}

/// Sets the learning rate of later steps (finite, >= 0); for schedulers, between steps.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_lr(opt: *mut hyzo_optimizer, lr: f32) -> hyzo_status {
    with_opt("hyzo_optimizer_set_lr", opt, |o| o.inner.set_lr(lr))
}

/// Sets the decoupled weight decay of later steps (finite, >= 0).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_weight_decay(
    opt: *mut hyzo_optimizer,
    weight_decay: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_weight_decay", opt, |o| {
        o.inner.set_weight_decay(weight_decay)
    })
}

/// Sets the learning rate of first-order steps (finite, >= 0), or NaN: follow `lr` again.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_fo_lr(
    opt: *mut hyzo_optimizer,
    fo_lr: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_fo_lr", opt, |o| {
        o.inner.set_fo_lr(unset_if_nan(fo_lr))
    })
}

/// Sets the weight decay of first-order steps (finite, >= 0), or NaN: follow
/// `weight_decay` again.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_fo_weight_decay(
    opt: *mut hyzo_optimizer,
    fo_weight_decay: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_fo_weight_decay", opt, |o| {
        o.inner.set_fo_weight_decay(unset_if_nan(fo_weight_decay))
    })
}

/// Writes the optimizer's current configuration (with the latest lr and weight decay).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_get_config(
    opt: *const hyzo_optimizer,
    out: *mut hyzo_config,
) -> hyzo_status {
    with_opt("hyzo_optimizer_get_config", opt as *mut _, |o| {
        let out = out_arg(out, "out")?;
        *out = config_to_c(o.inner.config());
        Ok(())
    })
}

/// Writes the number of registered tensors.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_num_tensors(
    opt: *const hyzo_optimizer,
    out: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_num_tensors", opt as *mut _, |o| {
        let out = out_arg(out, "out")?;
        *out = o.inner.params().len() as u64;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Steps.

/// Starts a zeroth-order step: the parameters now hold the first point to evaluate. Then run
/// a forward pass and call `hyzo_zo_feed` with its loss until `*needs_more` is 0:
/// `hyzo_zo_begin(o); do { loss = forward(); hyzo_zo_feed(o, loss, &more); } while (more);`
///
/// Fails with `HYZO_ERR_BAD_STATE` when a step is in progress, when the hybrid schedule
/// calls for a first-order step, when no tensor is registered, or when `hybrid_alpha > 0`
/// and a tensor has no gradient.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_begin(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_zo_begin", opt, |o| o.inner.begin())
}

/// `hyzo_zo_begin` for sphere directions over a model split across processes:
/// `sq_norms[d]` is the global `Σ z_d²` of direction `d` (the sum over processes of
/// `hyzo_optimizer_local_sq_norms`); `len` must be `num_directions`, values finite > 0.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `sq_norms` valid for `len` doubles.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_begin_with_sq_norms(
    opt: *mut hyzo_optimizer,
    sq_norms: *const f64,
    len: u32,
) -> hyzo_status {
    with_opt("hyzo_zo_begin_with_sq_norms", opt, |o| {
        out_arg(sq_norms as *mut f64, "sq_norms")?;
        let norms = std::slice::from_raw_parts(sq_norms, len as usize);
        o.inner.begin_with_sq_norms(norms)
    })
}

/// This optimizer's share `Σ z_d²` of each direction of the next step (`len` must be
/// `num_directions`), for `hyzo_zo_begin_with_sq_norms`. Allocates the optimizer state.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` valid for `len` doubles.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_local_sq_norms(
    opt: *mut hyzo_optimizer,
    out: *mut f64,
    len: u32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_local_sq_norms", opt, |o| {
        out_arg(out, "out")?;
        let q = o.inner.config().num_directions;
        if len != q {
            return Err(invalid_arg(format!(
                "len: {len}, expected num_directions = {q}"
            )));
        }
        if o.inner.in_step() {
            return Err(Error::BadState(
                "a zeroth-order step is in progress: its norms are fixed".into(),
            ));
        }
        let norms = o.inner.local_sq_norms()?;
        std::slice::from_raw_parts_mut(out, len as usize).copy_from_slice(&norms);
        Ok(())
    })
}

/// Feeds the loss of the forward pass just run. `*needs_more` becomes 1 when the parameters
/// hold the next point to evaluate, 0 when the step is complete (the parameters are updated)
/// or when the call fails. A non-finite loss is accepted: the step then completes with the
/// parameters restored and nothing updated (counted as skipped).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `needs_more` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_feed(
    opt: *mut hyzo_optimizer,
    loss: f32,
    needs_more: *mut c_int,
) -> hyzo_status {
    // Clear the flag first: a caller looping on it without checking the status stops.
    if !needs_more.is_null() && needs_more as usize % std::mem::align_of::<c_int>() == 0 {
        *needs_more = 0;
    }
    with_opt("hyzo_zo_feed", opt, |o| {
        let more = out_arg(needs_more, "needs_more")?;
        match o.inner.feed(loss)? {
            Feed::NeedsForward => *more = 1,
            Feed::Done(report) => {
                o.last = Some(report);
                *more = 0;
            }
        }
        Ok(())
    })
}

/// `hyzo_zo_feed` with the loss read from device memory (one float on the optimizer's
/// device, written by the forward pass on the optimizer's stream), without synchronizing.
/// CUDA optimizers only; all losses of a step come from the host or all from the device.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `loss_on_device` a device address that stays
/// valid until the step's last pass ran; `needs_more` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_feed_device(
    opt: *mut hyzo_optimizer,
    loss_on_device: *const f32,
    needs_more: *mut c_int,
) -> hyzo_status {
    if !needs_more.is_null() && needs_more as usize % std::mem::align_of::<c_int>() == 0 {
        *needs_more = 0;
    }
    with_opt("hyzo_zo_feed_device", opt, |o| {
        let more = out_arg(needs_more, "needs_more")?;
        if loss_on_device.is_null() {
            return Err(invalid_arg("loss_on_device: null pointer"));
        }
        if loss_on_device as usize % 4 != 0 {
            return Err(invalid_arg("loss_on_device: not aligned to 4 bytes"));
        }
        match o.inner.feed_device(loss_on_device as u64)? {
            Feed::NeedsForward => *more = 1,
            Feed::Done(report) => {
                o.last = Some(report);
                *more = 0;
            }
        }
        Ok(())
    })
}

/// Abandons the zeroth-order step in progress (e.g. the forward pass failed): the parameters
/// are restored, nothing is updated, the step is not counted. No step in progress: no-op.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_abort(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_zo_abort", opt, |o| o.inner.abort())
}

/// The last finished zeroth-order step: `*loss` is its loss at the unperturbed point (the
/// mean of the `2q` losses for the two-sided estimator, `L_0` for the one-sided; NaN when the
/// losses were fed from the device), `*skipped` is 1 when a loss was not finite and nothing
/// was updated. `HYZO_ERR_BAD_STATE` when no zeroth-order step finished since the optimizer
/// was created or its state loaded.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `loss` and `skipped` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_last_loss(
    opt: *const hyzo_optimizer,
    loss: *mut f32,
    skipped: *mut c_int,
) -> hyzo_status {
    with_opt("hyzo_zo_last_loss", opt as *mut _, |o| {
        let loss = out_arg(loss, "loss")?;
        let skipped = out_arg(skipped, "skipped")?;
        let Some(r) = &o.last else {
            return Err(Error::BadState(
                "no zeroth-order step has finished yet".into(),
            ));
        };
        *loss = r.loss.unwrap_or(f32::NAN);
        *skipped = c_int::from(r.skipped);
        Ok(())
    })
}

/// The projected gradients `g_d` of the last finished zeroth-order step (`len` must be
/// `num_directions`). `HYZO_ERR_BAD_STATE` when there is none: no step finished, the step
/// was skipped, or its losses were fed from the device.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` valid for `len` floats.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_last_projected_grads(
    opt: *const hyzo_optimizer,
    out: *mut f32,
    len: u32,
) -> hyzo_status {
    with_opt("hyzo_zo_last_projected_grads", opt as *mut _, |o| {
        out_arg(out, "out")?;
        let q = o.inner.config().num_directions;
        if len != q {
            return Err(invalid_arg(format!(
                "len: {len}, expected num_directions = {q}"
            )));
        }
        let g = match &o.last {
            Some(r) if r.projected_grads.len() == len as usize => &r.projected_grads,
            _ => {
                return Err(Error::BadState(
                    "no projected gradients: no step finished, it was skipped, or its losses \
                     stayed on the device"
                        .into(),
                ))
            }
        };
        std::slice::from_raw_parts_mut(out, len as usize).copy_from_slice(g);
        Ok(())
    })
}

/// A first-order step on the registered gradients (write them before the call). Every
/// tensor needs a gradient; `HYZO_ERR_BAD_STATE` during a zeroth-order step or when the
/// hybrid schedule calls for a zeroth-order step.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_fo_step(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_fo_step", opt, |o| o.inner.fo_step())
}

/// The kind of the next step under the hybrid schedule (`HYZO_PHASE_ANY` without one).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_next_phase(
    opt: *const hyzo_optimizer,
    out: *mut RawPhase,
) -> hyzo_status {
    with_opt("hyzo_next_phase", opt as *mut _, |o| {
        let out = out_arg(out, "out")?;
        *out = match o.inner.next_phase() {
            Some(Phase::FirstOrder) => hyzo_phase::HYZO_PHASE_FO,
            Some(Phase::ZerothOrder) => hyzo_phase::HYZO_PHASE_ZO,
            None => hyzo_phase::HYZO_PHASE_ANY,
        } as u32;
        Ok(())
    })
}

/// Steps taken (first- and zeroth-order, skipped ones included) and zeroth-order steps
/// skipped because a loss was not finite. On CUDA this synchronizes the optimizer's stream.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `steps` and `skipped` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_stats(
    opt: *const hyzo_optimizer,
    steps: *mut u64,
    skipped: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_stats", opt as *mut _, |o| {
        let steps = out_arg(steps, "steps")?;
        let skipped = out_arg(skipped, "skipped")?;
        let s = o.inner.skipped()?;
        *steps = o.inner.steps();
        *skipped = s;
        Ok(())
    })
}

/// The updates applied to each rule state: `updates` to the main rule's (its `t`),
/// `fo_updates` to the first-order rule's (0 without `fo_rule`). On CUDA this
/// synchronizes the optimizer's stream (steps skipped on the device are not updates).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `updates` and `fo_updates` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_updates(
    opt: *const hyzo_optimizer,
    updates: *mut u64,
    fo_updates: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_updates", opt as *mut _, |o| {
        let updates = out_arg(updates, "updates")?;
        let fo_updates = out_arg(fo_updates, "fo_updates")?;
        let u = o.inner.updates()?;
        *updates = u;
        *fo_updates = o.inner.fo_updates();
        Ok(())
    })
}

/// Waits until every pass issued so far has finished (a no-op on the CPU).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_synchronize(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_optimizer_synchronize", opt, |o| o.inner.synchronize())
}

// ---------------------------------------------------------------------------------------
// State.

/// Size in bytes of the saved state. Allocates the optimizer state, so no tensor can be
/// added afterwards; `HYZO_ERR_BAD_STATE` when no tensor is registered.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `bytes` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_state_size(
    opt: *const hyzo_optimizer,
    bytes: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_state_size", opt as *mut _, |o| {
        let bytes = out_arg(bytes, "bytes")?;
        *bytes = o.inner.state_size()?;
        Ok(())
    })
}

/// Saves the optimizer state (step counts, moment buffers of each rule, residuals and a
/// CRC32C checksum; not the parameters, which are the caller's) into `buf`: exactly
/// `hyzo_optimizer_state_size` bytes are written, `len` must be at least that. Not during a
/// zeroth-order step. On CUDA this synchronizes. The state is written straight into `buf`
/// (no second copy in memory).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `buf` valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_save_state(
    opt: *const hyzo_optimizer,
    buf: *mut c_void,
    len: u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_save_state", opt as *mut _, |o| {
        if buf.is_null() {
            return Err(invalid_arg("buf: null pointer"));
        }
        let len = byte_len(len, "len")?;
        if o.inner.in_step() {
            return Err(Error::BadState("a zeroth-order step is in progress".into()));
        }
        let need = o.inner.state_size()?;
        if (len as u64) < need {
            return Err(invalid_arg(format!(
                "len: {len} bytes, the state needs {need}"
            )));
        }
        let mut out = std::slice::from_raw_parts_mut(buf as *mut u8, need as usize);
        o.inner.save_state_to(&mut out)
    })
}

/// A path argument: a non-NULL, NUL-terminated string.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
unsafe fn path_arg<'a>(path: *const c_char) -> Result<&'a std::path::Path> {
    if path.is_null() {
        return Err(invalid_arg("path: null pointer"));
    }
    let s = std::ffi::CStr::from_ptr(path);
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(
            s.to_bytes(),
        )))
    }
    #[cfg(not(unix))]
    {
        s.to_str()
            .map(std::path::Path::new)
            .map_err(|_| invalid_arg("path: not UTF-8"))
    }
}

/// Saves the optimizer state, as `hyzo_optimizer_save_state`, to the file `path`, streaming
/// (memory use does not grow with the state) and atomically: the file is written beside
/// `path` and renamed over it once complete, so `path` never holds a partial state.
/// `HYZO_ERR_IO` when the file cannot be written.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `path` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_save_state_file(
    opt: *const hyzo_optimizer,
    path: *const c_char,
) -> hyzo_status {
    with_opt("hyzo_optimizer_save_state_file", opt as *mut _, |o| {
        let path = path_arg(path)?;
        o.inner.save_state_file(path)
    })
}

/// Restores a state saved by `hyzo_optimizer_save_state` of an optimizer with the same
/// configuration (rule, fo_rule, precision, directions, seed, schedule) and the same tensors
/// (dtypes, sizes, offsets), from this or another device; the run then continues
/// bit-identically (restore the parameters too). `len` must be the exact size. A state that
/// is truncated, corrupted (checksum), of another configuration or size, or of an unknown
/// format version is rejected and nothing changes. States of hyzo 0.1 (format 1) load into
/// optimizers without `fo_rule`. Not during a zeroth-order step.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `buf` valid for reads of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_load_state(
    opt: *mut hyzo_optimizer,
    buf: *const c_void,
    len: u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_load_state", opt, |o| {
        if buf.is_null() {
            return Err(invalid_arg("buf: null pointer"));
        }
        let len = byte_len(len, "len")?;
        let bytes = std::slice::from_raw_parts(buf as *const u8, len);
        o.inner.load_state(bytes)?;
        o.last = None;
        Ok(())
    })
}

/// Restores a state from the file `path`, as `hyzo_optimizer_load_state`. The file is read
/// twice, streaming: once to check it whole, then to load it. `HYZO_ERR_IO` when it cannot
/// be read.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `path` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_load_state_file(
    opt: *mut hyzo_optimizer,
    path: *const c_char,
) -> hyzo_status {
    with_opt("hyzo_optimizer_load_state_file", opt, |o| {
        let path = path_arg(path)?;
        o.inner.load_state_file(path)?;
        o.last = None;
        Ok(())
    })
}

#[cfg(test)]
mod tests;
