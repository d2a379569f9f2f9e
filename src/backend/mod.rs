//! Backends: where the passes over a shard run. The optimizer (`optimizer.rs`) decides what
//! each pass does; a backend only executes it, elementwise, exactly as `cpu.rs` spells out.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::direction::DirectionKind;
use crate::dtype::Precision;
use crate::error::Result;
use crate::rules::RuleParams;
use crate::shard::ParamShard;

/// Names the directions of one step: `(seed, step, ·)` and the kind generated (Gaussian or
/// Rademacher; a sphere direction is a Gaussian whose scale is folded into coefficients).
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
    /// Rounding of the stored parameters.
    pub precision: Precision,
    /// When set, the losses of this step were recorded on the device
    /// ([`Backend::record_device_loss`]): each `zo` coefficient is `s_d / q` and the backend
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
}

/// Executes passes over a shard's tensors and keeps their optimizer state.
pub trait Backend: Send {
    /// Short name (`cpu`, `cuda:0`).
    fn name(&self) -> String;
    /// Allocates zeroed state for `shard`: `buffers` fp32 buffers per element (m, then v),
    /// and, when `residual`, the bf16 `lo` of every f16/bf16 tensor. Called once, before the
    /// first pass.
    fn allocate_state(&mut self, shard: &ParamShard, buffers: usize, residual: bool) -> Result<()>;
    /// Runs a perturbation pass.
    fn perturb(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<()>;
    /// Runs an update pass.
    fn update(&mut self, shard: &ParamShard, pass: &UpdatePass) -> Result<()>;
    /// `Σ_j z[j]²` over every element of the shard, for one direction (accumulated in f64,
    /// in an order that does not depend on threads or launch geometry).
    fn sq_norm(&mut self, shard: &ParamShard, gen: Generator, direction: u32) -> Result<f64>;
    /// The state as bytes, backend-independent: for each tensor in order, `m`, `v` (f32 LE,
    /// those the rule keeps), then `lo` (bf16 LE, when kept).
    fn save_state(&mut self) -> Result<Vec<u8>>;
    /// Replaces the state with bytes of [`Backend::save_state`]'s layout (length checked by the
    /// caller).
    fn load_state(&mut self, bytes: &[u8]) -> Result<()>;
    /// Records, without synchronizing, the loss of evaluation `index` of the current step,
    /// read from the device address `loss` (one f32) when the next pass runs.
    fn record_device_loss(&mut self, index: u32, loss: u64) -> Result<()> {
        let _ = (index, loss);
        crate::error::invalid("loss_on_device: this backend has no device memory")
    }
    /// Steps skipped on the device because a recorded loss was not finite (synchronizes).
    fn device_skipped(&mut self) -> Result<u64> {
        Ok(0)
    }
    /// Makes later passes run on the caller's stream (a `CUstream`, 0 for the default).
    fn set_stream(&mut self, stream: u64) -> Result<()> {
        let _ = stream;
        crate::error::invalid("cuda_stream: this backend has no streams")
    }
    /// Waits until every pass issued so far has finished.
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
}
