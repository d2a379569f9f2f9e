//! The optimizer's configuration: every choice of the spec in one plain struct.

use crate::direction::{DirectionKind, FIRST_RESERVED_DIRECTION, LOWRANK_MAX_DIRECTIONS, MAX_RANK};

/// The most directions a zeroth-order step may use (`num_directions`): far more than any
/// use of ZO (q is 1 to 64 in practice), and small enough that a step's per-direction
/// bookkeeping is a few hundred kilobytes.
pub const MAX_DIRECTIONS: u32 = 1 << 16;
const _: () = assert!(MAX_DIRECTIONS < FIRST_RESERVED_DIRECTION);
const _: () = assert!(MAX_DIRECTIONS <= LOWRANK_MAX_DIRECTIONS);
use crate::dtype::Precision;
use crate::error::{invalid, Result};
use crate::rules::Rule;

/// Which finite-difference estimator a zeroth-order step uses (spec §4). The values are those
/// of the C ABI's `hyzo_estimator`, tied at compile time in `src/ffi/enums.rs`.
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

    /// Loss evaluations of one step with `q` directions: `2q` two-sided, `q + 1` one-sided.
    /// (Here, with the estimator, so that the configuration does not depend on the step
    /// protocol, which depends on it.)
    pub const fn evaluations(self, q: u32) -> u32 {
        match self {
            Estimator::TwoSided => 2 * q,
            Estimator::OneSided => q + 1,
        }
    }
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

/// Which of an optimizer's two rule states an update reads and writes (spec v2 §5).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateSet {
    /// The state of [`Config::rule`]: zeroth-order steps, and every step without `fo_rule`.
    Main = 0,
    /// The state of [`Config::fo_rule`]: first-order steps of an optimizer that has one.
    FirstOrder = 1,
}

/// What one kind of step applies: see [`Config::phase_rule`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhaseRule {
    /// The rule.
    pub rule: Rule,
    /// Its learning rate.
    pub lr: f32,
    /// Its decoupled weight decay.
    pub weight_decay: f32,
    /// The state it updates.
    pub state: StateSet,
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
    /// Directions per zeroth-order step, `1 ≤ q ≤` [`MAX_DIRECTIONS`].
    pub num_directions: u32,
    /// Distribution of the directions.
    pub direction: DirectionKind,
    /// One- or two-sided differences.
    pub estimator: Estimator,
    /// Update rule of zeroth-order steps, and of every step when `fo_rule` is `None`.
    pub rule: Rule,
    /// First-order rule with a state of its own (spec §5): first-order steps apply it and
    /// never touch `rule`'s state, zeroth-order steps never touch its state. `None`: one
    /// rule and one state for every step (spec v1).
    pub fo_rule: Option<Rule>,
    /// Learning rate of first-order steps; `None`: `lr`.
    pub fo_lr: Option<f32>,
    /// Weight decay of first-order steps; `None`: `weight_decay`.
    pub fo_weight_decay: Option<f32>,
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
    /// Rank `r` of low-rank directions (spec §7), `1 ≤ r ≤` [`MAX_RANK`]; used only with
    /// [`DirectionKind::LowRank`].
    pub rank: u32,
    /// Skip a step whose gradient holds a NaN or an infinity (default): a first-order step,
    /// or a zeroth-order step mixing the gradient in (`hybrid_alpha > 0`), then changes no
    /// weight, state or `t`, and counts as skipped, as `torch.amp.GradScaler` skips it and
    /// as spec §4 skips zeroth-order steps. `false`: the rule applies the gradient as it is,
    /// NaN included (`torch.optim`'s behaviour). The CUDA backend does not check yet: there
    /// gradients are applied as they are, whatever this says.
    pub skip_nonfinite_grads: bool,
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
            fo_rule: None,
            fo_lr: None,
            fo_weight_decay: None,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            precision: Precision::Nearest,
            fo_steps: 0,
            zo_steps: 0,
            hybrid_alpha: 0.0,
            rank: 1,
            skip_nonfinite_grads: true,
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
        if self.num_directions > MAX_DIRECTIONS {
            return invalid(format!(
                "num_directions: {} exceeds the maximum of {MAX_DIRECTIONS}",
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
        if let Some(lr) = self.fo_lr {
            finite_nonneg("fo_lr", lr)?;
        }
        if let Some(wd) = self.fo_weight_decay {
            finite_nonneg("fo_weight_decay", wd)?;
        }
        if !(self.hybrid_alpha.is_finite() && (0.0..=1.0).contains(&self.hybrid_alpha)) {
            return invalid(format!(
                "hybrid_alpha: must be in [0, 1], got {}",
                self.hybrid_alpha
            ));
        }
        if self.direction == DirectionKind::LowRank && !(1..=MAX_RANK).contains(&self.rank) {
            return invalid(format!(
                "rank: must be in 1..={MAX_RANK} with low-rank directions, got {}",
                self.rank
            ));
        }
        Ok(())
    }

    /// The rank the shard's tensors get (0 without low-rank directions).
    pub fn lowrank_rank(&self) -> u32 {
        if self.direction == DirectionKind::LowRank {
            self.rank
        } else {
            0
        }
    }

    /// The paper's hybrid (spec v2 §5): AdamW for first-order steps and AdaZO for
    /// zeroth-order steps, each with its own state, in blocks of `fo_steps` and `zo_steps`.
    pub fn hybrid(fo_steps: u32, zo_steps: u32) -> Self {
        Self {
            rule: Rule::AdaZo,
            fo_rule: Some(Rule::AdamW),
            fo_steps,
            zo_steps,
            ..Self::default()
        }
    }

    /// The rule, learning rate, weight decay and state of a step of kind `phase`.
    pub fn phase_rule(&self, phase: Phase) -> PhaseRule {
        match phase {
            // The first-order rule with its own state when there is one; the main rule and
            // its state otherwise. The learning rate and decay overrides apply either way.
            Phase::FirstOrder => PhaseRule {
                rule: self.fo_rule.unwrap_or(self.rule),
                lr: self.fo_lr.unwrap_or(self.lr),
                weight_decay: self.fo_weight_decay.unwrap_or(self.weight_decay),
                state: if self.fo_rule.is_some() {
                    StateSet::FirstOrder
                } else {
                    StateSet::Main
                },
            },
            Phase::ZerothOrder => PhaseRule {
                rule: self.rule,
                lr: self.lr,
                weight_decay: self.weight_decay,
                state: StateSet::Main,
            },
        }
    }

    /// Loss evaluations of one zeroth-order step.
    pub fn evaluations_per_step(&self) -> u32 {
        self.estimator.evaluations(self.num_directions)
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
