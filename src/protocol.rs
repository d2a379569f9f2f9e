//! The zeroth-order step protocol (spec §4) as a state machine.
//!
//! Which pass runs when is a pure function of the estimator, `q` and the number of losses
//! fed ([`pass_after`]), and so is the point the parameters hold while a loss is awaited
//! ([`point`]); `optimizer.rs` runs the passes and moves between the `State`s:
//!
//! ```text
//! Idle                  begin                           AwaitingLoss { eval: 0 }
//! AwaitingLoss { e }    feed (a perturbation pass)      AwaitingLoss { eval: e + 1 }
//! AwaitingLoss { E−1 }  feed (the update pass)          Idle
//! AwaitingLoss { e }    abort (its undo pass runs)      Idle
//! AwaitingLoss { e }    abort (its undo pass fails)     UndoFailed
//! UndoFailed            abort (the undo runs)           Idle
//! UndoFailed            abort (the undo fails again)    Poisoned
//! Idle, AwaitingLoss    begin or feed (a pass fails)    Poisoned
//! UndoFailed, Poisoned  a load that succeeds            Idle
//! ```
//!
//! `E` is [`evaluations`]. A pass that fails leaves the parameters in an unknown state (a
//! device may have written part of them): the optimizer is `Poisoned` and refuses every
//! call but a load of a saved state, which makes it `Idle` again. Only `abort`'s undo gets
//! one retry (`UndoFailed`): repeating it is what the caller asks for (see
//! docs/interpretation.md, "The step protocol's states").

use crate::backend::Generator;
use crate::config::Estimator;

/// `multiple · μ s_d z_d`, `d = direction`: what one pass adds for one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offset {
    /// The direction `d` within the step.
    pub direction: u32,
    /// `+1` or `−1` (a point on one side of θ, or its undoing), `−2` (from one side to the
    /// other).
    pub multiple: i8,
}

impl Offset {
    const fn new(direction: u32, multiple: i8) -> Self {
        Self {
            direction,
            multiple,
        }
    }

    /// The offset that cancels this one.
    pub const fn negated(self) -> Self {
        Self::new(self.direction, -self.multiple)
    }
}

/// The offsets of one perturbation pass, applied in this order (accumulated in f32 and
/// rounded once): one, or a restore fused with the next perturbation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    items: [Offset; 2],
    len: usize,
}

impl Offsets {
    const fn one(a: Offset) -> Self {
        Self {
            items: [a, a],
            len: 1,
        }
    }

    const fn two(a: Offset, b: Offset) -> Self {
        Self {
            items: [a, b],
            len: 2,
        }
    }

    /// The offsets, in the order the pass applies them.
    pub fn as_slice(&self) -> &[Offset] {
        &self.items[..self.len]
    }
}

/// The pass that runs once a number of losses of a step was fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// None: the parameters already hold the next point (the one-sided `L_0`, at `begin`).
    Nothing,
    /// One perturbation pass; then the forward pass of the next evaluation.
    Perturb(Offsets),
    /// The update pass, with the last restore fused in; the step is complete.
    Update {
        /// The restore, applied before the rule.
        restore: Offset,
    },
}

/// Loss evaluations of one step: `2q` two-sided, `q + 1` one-sided
/// ([`Estimator::evaluations`]).
pub const fn evaluations(estimator: Estimator, q: u32) -> u32 {
    estimator.evaluations(q)
}

/// The point evaluation `eval` of a step is run at, as its offset from θ: two-sided,
/// `+z_d` then `−z_d` for each `d`; one-sided, θ itself (`None`) for `L_0`, then `+z_d`.
pub const fn point(estimator: Estimator, eval: u32) -> Option<Offset> {
    match estimator {
        Estimator::TwoSided => Some(Offset::new(eval / 2, if eval % 2 == 0 { 1 } else { -1 })),
        Estimator::OneSided => {
            if eval == 0 {
                None
            } else {
                Some(Offset::new(eval - 1, 1))
            }
        }
    }
}

/// The pass that runs once `fed` losses of a step with `q` directions were fed: `fed = 0`
/// at `begin`, `fed =` [`evaluations`] after the last loss (the update). Spec §4: each
/// pass takes the parameters from [`point`]`(fed − 1)` to [`point`]`(fed)`, in one pass;
/// the last one back to θ, fused with the update. `2q + 1` passes two-sided, `q + 1`
/// one-sided.
///
/// # Panics
/// When `q = 0` or `fed` is beyond the last loss.
pub const fn pass_after(estimator: Estimator, q: u32, fed: u32) -> Pass {
    let last = evaluations(estimator, q);
    assert!(q >= 1 && fed <= last, "pass_after: no such point of a step");
    match (estimator, fed) {
        // The one-sided L_0 is taken at θ: begin perturbs nothing.
        (Estimator::OneSided, 0) => Pass::Nothing,
        (Estimator::TwoSided, 0) => Pass::Perturb(Offsets::one(Offset::new(0, 1))),
        _ => {
            let Some(from) = point(estimator, fed - 1) else {
                // After L_0 (one-sided): to the first direction.
                return Pass::Perturb(Offsets::one(Offset::new(0, 1)));
            };
            if fed == last {
                return Pass::Update {
                    restore: from.negated(),
                };
            }
            let Some(to) = point(estimator, fed) else {
                unreachable!()
            };
            if to.direction == from.direction {
                // +z_d to −z_d: one offset of −2.
                Pass::Perturb(Offsets::one(Offset::new(
                    to.direction,
                    to.multiple - from.multiple,
                )))
            } else {
                // The restore of d first, then the next direction (spec §4's order).
                Pass::Perturb(Offsets::two(from.negated(), to))
            }
        }
    }
}

/// A zeroth-order step in progress: what it needs besides its position.
#[derive(Debug)]
pub(crate) struct ZoStep {
    /// The step's directions.
    pub gen: Generator,
    /// `s_d` of each direction (1 except for the sphere).
    pub scales: Vec<f32>,
    /// The losses fed from the host.
    pub losses: Vec<f32>,
    /// Where its losses come from, once the first was fed.
    pub on_device: Option<bool>,
}

/// Where an optimizer stands in the protocol.
#[derive(Debug)]
pub(crate) enum State {
    /// No step in progress; the parameters are the caller's θ.
    Idle,
    /// A step in progress: the parameters hold [`point`]`(eval)`, the point of evaluation
    /// `eval`, whose loss the next feed brings.
    AwaitingLoss {
        /// The step.
        step: ZoStep,
        /// The evaluation awaited (the number of losses fed so far).
        eval: u32,
    },
    /// `abort`'s undo pass failed: the step is kept so that `abort` can retry it, once.
    /// Nothing else but a load is accepted.
    UndoFailed {
        /// The step.
        step: ZoStep,
        /// The evaluation it was awaiting.
        eval: u32,
        /// What the failed undo said.
        error: String,
    },
    /// A pass failed and left the parameters in an unknown state: only a load of a saved
    /// state (with the parameters written back by the caller) makes the optimizer usable.
    Poisoned {
        /// The call and the error that poisoned it.
        reason: String,
    },
}

#[cfg(test)]
pub(crate) mod tests;
