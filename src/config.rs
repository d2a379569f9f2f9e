//! The optimizer's configuration: every choice of the spec in one plain struct.

use crate::direction::{DirectionKind, FIRST_RESERVED_DIRECTION};
use crate::dtype::Precision;
use crate::error::{invalid, Result};
use crate::rules::Rule;

/// Which finite-difference estimator a zeroth-order step uses (spec §4).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Estimator {
    /// Central differences: `2q` loss evaluations, `2q + 1` passes.
    TwoSided = 0,
    /// Forward differences: `q + 1` loss evaluations, `q + 1` passes.
    OneSided = 1,
}

impl Estimator {
    /// Both estimators, in ABI order.
    pub const ALL: [Estimator; 2] = [Estimator::TwoSided, Estimator::OneSided];
}

/// The kind of a step.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// A first-order step on registered gradients.
    FirstOrder = 0,
    /// A zeroth-order step driven by loss evaluations.
    ZerothOrder = 1,
}

/// Optimizer configuration. [`Config::default`] is ZO-SGD with one Gaussian direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Seed naming every direction of the run (the Philox key).
    pub seed: u64,
    /// Learning rate `η`.
    pub lr: f32,
    /// Smoothing radius `μ` of the finite differences.
    pub eps: f32,
    /// Directions per zeroth-order step, `q ≥ 1`.
    pub num_directions: u32,
    /// Distribution of the directions.
    pub direction: DirectionKind,
    /// One- or two-sided differences.
    pub estimator: Estimator,
    /// Update rule.
    pub rule: Rule,
    /// `β1` (momentum, signum, AdamW, AdaZO).
    pub beta1: f32,
    /// `β2` (AdamW, AdaZO).
    pub beta2: f32,
    /// Adam's `ε`.
    pub adam_eps: f32,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f32,
    /// How parameters are rounded when written back.
    pub precision: Precision,
    /// First-order steps per block of the hybrid schedule (0 with `zo_steps = 0`: no schedule).
    pub fo_steps: u32,
    /// Zeroth-order steps per block of the hybrid schedule.
    pub zo_steps: u32,
    /// `α` of the mixed estimate `α ∇ + (1 − α) ĝ` used by zeroth-order steps; 0 uses the
    /// zeroth-order estimate alone, otherwise every tensor needs a gradient.
    pub hybrid_alpha: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 0,
            lr: 1e-3,
            eps: 1e-3,
            num_directions: 1,
            direction: DirectionKind::Gaussian,
            estimator: Estimator::TwoSided,
            rule: Rule::Sgd,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            precision: Precision::Nearest,
            fo_steps: 0,
            zo_steps: 0,
            hybrid_alpha: 0.0,
        }
    }
}

fn finite_nonneg(name: &str, v: f32) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        invalid(format!("{name}: must be finite and >= 0, got {v}"))
    }
}

impl Config {
    /// Checks every field; the message names the first one at fault.
    pub fn validate(&self) -> Result<()> {
        finite_nonneg("lr", self.lr)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return invalid(format!("eps: must be finite and > 0, got {}", self.eps));
        }
        if self.num_directions == 0 {
            return invalid("num_directions: must be at least 1");
        }
        if self.num_directions > FIRST_RESERVED_DIRECTION {
            return invalid(format!(
                "num_directions: {} reaches the reserved directions",
                self.num_directions
            ));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                return invalid(format!("{name}: must be in [0, 1), got {b}"));
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return invalid(format!(
                "adam_eps: must be finite and > 0, got {}",
                self.adam_eps
            ));
        }
        finite_nonneg("weight_decay", self.weight_decay)?;
        if !(self.hybrid_alpha.is_finite() && (0.0..=1.0).contains(&self.hybrid_alpha)) {
            return invalid(format!(
                "hybrid_alpha: must be in [0, 1], got {}",
                self.hybrid_alpha
            ));
        }
        Ok(())
    }

    /// Loss evaluations of one zeroth-order step.
    pub fn evaluations_per_step(&self) -> u32 {
        match self.estimator {
            Estimator::TwoSided => 2 * self.num_directions,
            Estimator::OneSided => self.num_directions + 1,
        }
    }

    /// The scheduled kind of step number `step` (0-based), `None` without a schedule.
    pub fn scheduled_phase(&self, step: u64) -> Option<Phase> {
        let cycle = self.fo_steps as u64 + self.zo_steps as u64;
        if cycle == 0 {
            return None;
        }
        Some(if step % cycle < self.fo_steps as u64 {
            Phase::FirstOrder
        } else {
            Phase::ZerothOrder
        })
    }
}
