//! Backends: where the passes over a shard run. The optimizer (`optimizer.rs`) decides what
//! each pass does; a backend only executes it, elementwise, exactly as `cpu.rs` spells out.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::config::StateSet;
use crate::direction::DirectionKind;
use crate::dtype::Precision;
use crate::error::Result;
use crate::rules::RuleParams;
use crate::shard::ParamShard;

/// Names the directions of one step: `(seed, step, ·)` and the kind generated (Gaussian or
/// Rademacher; a sphere direction is a Gaussian whose scale is folded into coefficients), or
/// `LowRank` (spec §7): the tensors with a [`ParamShard::lowrank`] shape get `Z = A Bᵀ / sqrt(r)`,
/// which perturbation passes leave to the forward (they skip those tensors) and update passes
/// rebuild without a restore; every other tensor gets the Gaussian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generator {
    /// Run seed.
    pub seed: u64,
    /// Step of the directions.
    pub step: u32,
    /// Kind generated.
    pub kind: DirectionKind,
}

/// One `(direction, coefficient)` pair: contributes `coeff · z_direction[j]` at element `j`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Term {
    /// Direction index within the step.
    pub direction: u32,
    /// Coefficient (the sphere's `s_d` already folded in).
    pub coeff: f32,
}

/// A perturbation pass: `θ ← θ + Σ_k c_k z_k`, accumulated in f32 in the order of `terms`,
/// rounded once (nearest; `hi + lo` in the compensated mode).
#[derive(Clone, Copy, Debug)]
pub struct PerturbPass<'a> {
    /// Directions of the step.
    pub gen: Generator,
    /// The terms, applied in order.
    pub terms: &'a [Term],
    /// Rounding of the stored parameters.
    pub precision: Precision,
}

/// An update pass: `x = θ + restore`, `ĝ = Σ_d w_d z_d` (order of `zo`), mixed with the
/// gradient when `grad_weight = Some(α)` as `α ∇ + (1 − α) ĝ` (α = 1: ∇ alone), then
/// `θ ← rule(x, ĝ)`, rounded once (stochastically in the stochastic mode).
#[derive(Clone, Copy, Debug)]
pub struct UpdatePass<'a> {
    /// Directions of the step; also names the stochastic-rounding stream.
    pub gen: Generator,
    /// The last restore, fused into this pass.
    pub restore: Option<Term>,
    /// Zeroth-order weights `w_d = g_d s_d / q`.
    pub zo: &'a [Term],
    /// Weight of the registered gradient, if it takes part.
    pub grad_weight: Option<f32>,
    /// The rule and its constants for this update.
    pub rule: RuleParams,
    /// The rule state this update reads and writes.
    pub state: StateSet,
    /// The `t` of `rule`'s bias corrections as the host counts it: updates of `state`
    /// attempted so far, this one included, host-skipped steps excluded. A backend that
    /// skips steps on the device subtracts its own skips of `StateSet::Main` from it.
    pub t: u64,
    /// Rounding of the stored parameters.
    pub precision: Precision,
    /// The tensors this pass updates, by index (`None`: every one). The others, their rule
    /// state and their `lo` are left exactly as they are: a first-order step over the
    /// tensors that have a gradient, as `torch.optim` skips parameters without one.
    pub tensors: Option<&'a [bool]>,
    /// When set, the losses of this step were recorded on the device
    /// ([`DeviceQueue::record_device_loss`]): each `zo` coefficient is `s_d / q` and the backend
    /// multiplies it by `g_d` computed on the device; if any loss is not finite the pass only
    /// restores (no rule, state untouched) and the device's skip counter is incremented.
    pub device_losses: Option<DeviceLosses>,
}

/// How to turn the losses recorded on the device into projected gradients `g_d`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceLosses {
    /// Two-sided: `g_d = (L[2d] − L[2d+1]) / (2μ)`; one-sided: `g_d = (L[d+1] − L[0]) / μ`.
    pub estimator: crate::config::Estimator,
    /// The smoothing radius `μ`.
    pub eps: f32,
    /// The step is skipped when `Σ_d |g_d · base_d|` (f32, in order of `d`) exceeds this:
    /// [`max_coefficient_sum`].
    pub max_coefficient_sum: f32,
}

/// The largest estimate a zeroth-order update applies, per element: `|ĝ| ≤ 2^60`. Squared
/// (Adam's second moments) that stays far from f32's overflow; no real projected gradient
/// comes near it, while a loss difference of 1e35 over a small μ would write a moment of
/// Inf that never decays, or weights of 1e30.
pub const MAX_ESTIMATE: f32 = (1u64 << 60) as f32;

/// The bound on `Σ_d |w_d|` (the coefficients of the estimate) that keeps `|ĝ| ≤`
/// [`MAX_ESTIMATE`] for directions of `kind`; host and device compare the same f32 sum with
/// this same value.
pub fn max_coefficient_sum(kind: crate::direction::DirectionKind, rank: u32) -> f32 {
    MAX_ESTIMATE / kind.max_abs_with_rank(rank)
}

/// Checks the tensors an update pass names ([`UpdatePass::tensors`]: one flag a tensor)
/// and that every tensor it updates has a gradient when the pass uses them.
pub fn check_update_tensors(shard: &ParamShard, pass: &UpdatePass) -> Result<()> {
    if let Some(mask) = pass.tensors {
        if mask.len() != shard.len() {
            return crate::error::invalid(format!(
                "tensors: {} flags for {} tensors",
                mask.len(),
                shard.len()
            ));
        }
    }
    let updated = |i: usize| pass.tensors.map_or(true, |m| m[i]);
    if pass.grad_weight.is_some() {
        if let Some(i) = (0..shard.len()).find(|&i| updated(i) && shard.tensors()[i].grad == 0) {
            return crate::error::invalid(format!(
                "grad: tensor {i} has none, and this step uses the gradients of the tensors it updates"
            ));
        }
    }
    Ok(())
}

/// Whether tensor `i` of `shard` takes the low-rank direction in passes of `gen`.
pub fn is_lowrank(gen: &Generator, shard: &ParamShard, i: usize) -> bool {
    gen.kind == crate::direction::DirectionKind::LowRank && shard.lowrank(i).is_some()
}

/// The state buffers a backend keeps per element (spec v2 §5: one set per rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StateLayout {
    /// fp32 buffers (`m`, then `v`) of the main rule.
    pub main_buffers: usize,
    /// fp32 buffers of the first-order rule (0 without one).
    pub fo_buffers: usize,
    /// Whether f16/bf16 tensors keep a bf16 `lo` (compensated precision).
    pub residual: bool,
}

impl StateLayout {
    /// Bytes of the saved state of `tensors` (see [`Backend::save_state`]).
    pub fn bytes(&self, tensors: &[crate::shard::TensorSpec]) -> u64 {
        let per_f32 = 4 * (self.main_buffers + self.fo_buffers) as u64;
        tensors
            .iter()
            .map(|t| {
                let lo = self.residual && t.dtype != crate::dtype::DType::F32;
                t.numel * (per_f32 + if lo { 2 } else { 0 })
            })
            .sum()
    }
}

/// Receives a saved state piece by piece, in order.
pub type StateSink<'a> = dyn FnMut(&[u8]) -> Result<()> + 'a;
/// Fills each buffer it is given with the next bytes of a saved state.
pub type StateSource<'a> = dyn FnMut(&mut [u8]) -> Result<()> + 'a;

/// Executes passes over a shard's tensors and keeps their optimizer state.
pub trait Backend: Send {
    /// Short name (`cpu`, `cuda:0`).
    fn name(&self) -> String;
    /// Allocates zeroed state for `shard` as `layout` says. Called once, before the first
    /// pass; a failed allocation is an error (`OutOfMemory`), never an abort.
    fn allocate_state(&mut self, shard: &ParamShard, layout: StateLayout) -> Result<()>;
    /// Writes the low-rank factors (spec §7) of `direction` of `gen`'s step to `out`, an
    /// address in the backend's memory holding `len` f32: for each tensor of
    /// [`ParamShard::lowrank_tensors`] in order, `A` (rows × rank) then `B` (cols × rank),
    /// row-major. `len` is the sum of their [`crate::direction::LowRankShape::factors_len`];
    /// the caller has checked it.
    ///
    /// # Safety
    /// `out` must be valid for writes of `len` f32 in the backend's memory.
    unsafe fn lowrank_factors(
        &mut self,
        shard: &ParamShard,
        gen: Generator,
        direction: u32,
        out: u64,
        len: u64,
    ) -> Result<()> {
        let _ = (shard, gen, direction, out, len);
        crate::error::invalid(format!(
            "low-rank directions: not supported by the {} backend",
            self.name()
        ))
    }
    /// Runs a perturbation pass.
    fn perturb(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<()>;
    /// Runs an update pass.
    fn update(&mut self, shard: &ParamShard, pass: &UpdatePass) -> Result<()>;
    /// Whether every gradient entry of the tensors `tensors` names (`None`: every tensor) is
    /// finite, read as an update pass reads them (`Config::skip_nonfinite_grads`); `None`
    /// from a backend that does not check yet, whose steps then apply gradients as they are.
    fn grads_finite(
        &mut self,
        shard: &ParamShard,
        tensors: Option<&[bool]>,
    ) -> Result<Option<bool>> {
        let _ = (shard, tensors);
        Ok(None)
    }
    /// Whether [`Backend::perturb`] of `pass` would leave every finite parameter finite once
    /// rounded to its dtype; computes what it would write, writes nothing.
    fn perturb_stays_finite(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<bool> {
        let _ = (shard, pass);
        crate::error::invalid(format!(
            "scale: a displacement this large could overflow a parameter, and the {} backend \
             does not check every parameter for that yet (|scale| · max|z| up to 8 for f16 \
             tensors, 2^100 otherwise, needs no check)",
            self.name()
        ))
    }
    /// `Σ_j z[j]²` over every element of the shard, for one direction (accumulated in f64,
    /// in an order that does not depend on threads or launch geometry).
    fn sq_norm(&mut self, shard: &ParamShard, gen: Generator, direction: u32) -> Result<f64>;
    /// Streams the state to `sink`, backend-independent: for each tensor in order, the main
    /// rule's `m`, `v`, the first-order rule's `m`, `v` (f32 LE, those the layout keeps),
    /// then `lo` (bf16 LE, when kept); [`StateLayout::bytes`] in all. Memory used on the
    /// way is bounded, whatever the state's size.
    fn save_state(&mut self, sink: &mut StateSink) -> Result<()>;
    /// Replaces the state with [`Backend::save_state`]'s layout read from `source` (which
    /// the caller has checked: its length and checksum).
    fn load_state(&mut self, source: &mut StateSource) -> Result<()>;
    /// The device side of this backend (streams; losses, skips and counters kept in device
    /// memory), or `None` for a backend that runs on the host. Required, not defaulted: a
    /// backend with a device that forgot a hook would otherwise answer "no streams" at run
    /// time, as the CUDA backend once did for `set_stream`.
    fn device(&mut self) -> Option<&mut dyn DeviceQueue>;
    /// Waits until every pass issued so far has finished.
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What a backend with device memory and streams does besides its passes: asked for through
/// [`Backend::device`], so each hook is a required method of the backend that has them.
pub trait DeviceQueue {
    /// Records, without synchronizing, the loss of evaluation `index` of the current step,
    /// read from the device address `loss` (one f32) when the next pass runs.
    fn record_device_loss(&mut self, index: u32, loss: u64) -> Result<()>;
    /// Steps skipped on the device because a recorded loss was not finite (synchronizes).
    fn device_skipped(&mut self) -> Result<u64>;
    /// Sets the device's skip counter to zero (after a load: the loaded state carries the
    /// count of skips in its own field).
    fn reset_device_skipped(&mut self) -> Result<()>;
    /// The optimizer's step and update counts (`updates[StateSet as usize]`: attempted
    /// updates of each state), told whenever the host sets them outside an update pass: at
    /// the first step, after a load, after a host-side skip. A backend that keeps them on
    /// the device (the CUDA backend's device-counter mode, for CUDA graphs replayed across
    /// steps) stores them; otherwise it ignores them.
    fn set_counters(&mut self, step: u64, updates: [u64; 2]) -> Result<()>;
    /// The step and update counts as the device advanced them (synchronizes), or `None`
    /// when the backend does not keep them (see [`DeviceQueue::set_counters`]).
    fn device_counters(&mut self) -> Result<Option<(u64, [u64; 2])>>;
    /// Makes later passes run on the caller's stream (a `CUstream`, 0 for the default).
    ///
    /// # Safety
    /// `stream` must be a valid stream of the backend's context (or 0) that outlives its
    /// use by the backend.
    unsafe fn set_stream(&mut self, stream: u64) -> Result<()>;
}
