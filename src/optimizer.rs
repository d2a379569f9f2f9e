//! The optimizer: the steps of the spec over one shard, and the state it carries between
//! them. Which pass a zeroth-order step runs when is `protocol.rs`'s; this file runs them
//! (backends execute them) and keeps the protocol's `State`.

use crate::backend::cpu::CpuBackend;
use crate::backend::{
    Backend, DeviceLosses, Generator, PerturbPass, StateLayout, Term, UpdatePass,
};
use crate::config::{Config, Estimator, Phase, PhaseRule, StateSet};
use crate::direction::DirectionKind;
use crate::dtype::Precision;
use crate::error::{bad_state, invalid, Error, Result};
use crate::protocol::{self, Offset, Pass, State, ZoStep};
use crate::rules::RuleParams;
use crate::shard::{GradMut, ParamShard, TensorSpec};
use crate::state::{self, Counters};

/// What [`Optimizer::feed`] asks for next.
#[derive(Clone, Debug, PartialEq)]
pub enum Feed {
    /// The parameters hold the next perturbed point: run a forward pass and feed its loss.
    NeedsForward,
    /// The step is complete.
    Done(StepReport),
}

/// The outcome of a finished step: zeroth-order ([`Optimizer::feed`]), or first-order
/// ([`Optimizer::fo_step`]: `loss` `None`, no projected gradients).
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// A loss or a projected gradient was not finite (spec §4), or the gradient the step
    /// applies or mixes in held a NaN or an infinity ([`Config::skip_nonfinite_grads`]):
    /// parameters were restored and nothing was updated. Always `false` when the losses
    /// stayed on the device, where the device decides ([`Optimizer::skipped`] counts those
    /// skips).
    pub skipped: bool,
    /// The loss at the unperturbed point: `L_0` for the one-sided estimator, the mean of the
    /// `2q` perturbed losses for the two-sided one (equal to `f(θ)` up to `O(μ²)`). `None`
    /// when the losses stayed on the device.
    pub loss: Option<f32>,
    /// The projected gradients `g_d` (empty when the losses stayed on the device).
    pub projected_grads: Vec<f32>,
}

/// A zeroth-order / first-order / hybrid optimizer over one [`ParamShard`].
///
/// Steps are numbered from 0; step `n` uses directions `(seed, n, 0..q)`. Each rule state
/// (spec v2 §5: the main rule's, and the first-order rule's when there is one) has its own
/// bias-correction count `t`: the number of updates it received, the current one included
/// (a skipped step advances the step number, not `t`).
///
/// A backend pass of a zeroth-order step that fails leaves the parameters in an unknown
/// state: the optimizer is then poisoned ([`Optimizer::poisoned`]) and refuses every call
/// that returns a `Result` but [`Optimizer::load_state`] and [`Optimizer::load_state_file`],
/// whose success makes it usable again (write the parameters of the same checkpoint back
/// too). An [`Optimizer::abort`] whose restoring pass fails keeps the step for one retry.
pub struct Optimizer<'a> {
    config: Config,
    shard: ParamShard<'a>,
    backend: Box<dyn Backend + 'a>,
    /// Steps, updates of each state and host-side skips. `updates[Main]` counts attempted
    /// updates: those of steps that the device skipped are subtracted where they are known
    /// (on the device, and by [`Optimizer::updates`]).
    counters: Counters,
    prepared: bool,
    /// Where the zeroth-order step protocol stands.
    protocol: State,
}

impl std::fmt::Debug for Optimizer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .field("tensors", &self.shard.len())
            .field("step", &self.counters.step)
            .finish()
    }
}

impl<'a> Optimizer<'a> {
    /// An optimizer on the CPU backend, using every core.
    pub fn new(config: Config, shard: ParamShard<'a>) -> Result<Self> {
        Self::with_backend(config, shard, Box::new(CpuBackend::new(0)?))
    }

    /// An optimizer on the CPU backend with `threads` threads (0: every core).
    pub fn with_threads(config: Config, shard: ParamShard<'a>, threads: usize) -> Result<Self> {
        Self::with_backend(config, shard, Box::new(CpuBackend::new(threads)?))
    }

    /// An optimizer on a given backend; the shard's memory must be the backend's.
    pub fn with_backend(
        config: Config,
        shard: ParamShard<'a>,
        backend: Box<dyn Backend + 'a>,
    ) -> Result<Self> {
        config.validate()?;
        let mut shard = shard;
        shard.set_lowrank_rank(config.lowrank_rank());
        Ok(Self {
            config,
            shard,
            backend,
            counters: Counters::default(),
            prepared: false,
            protocol: State::Idle,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The backend's name.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// Changes the learning rate (for schedulers); allowed between steps. First-order steps
    /// follow it too unless `fo_lr` is set.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        self.set_config("set_lr", |c| c.lr = lr)
    }

    /// Changes the weight decay; allowed between steps.
    pub fn set_weight_decay(&mut self, weight_decay: f32) -> Result<()> {
        self.set_config("set_weight_decay", |c| c.weight_decay = weight_decay)
    }

    /// Changes the learning rate of first-order steps (`None`: follow `lr`).
    pub fn set_fo_lr(&mut self, lr: Option<f32>) -> Result<()> {
        self.set_config("set_fo_lr", |c| c.fo_lr = lr)
    }

    /// Changes the weight decay of first-order steps (`None`: follow `weight_decay`).
    pub fn set_fo_weight_decay(&mut self, weight_decay: Option<f32>) -> Result<()> {
        self.set_config("set_fo_weight_decay", |c| c.fo_weight_decay = weight_decay)
    }

    /// Applies `change` to a copy of the configuration and keeps it if it validates.
    fn set_config(&mut self, what: &str, change: impl FnOnce(&mut Config)) -> Result<()> {
        self.check_usable(what)?;
        let mut c = self.config.clone();
        change(&mut c);
        c.validate()?;
        self.config = c;
        Ok(())
    }

    /// The parameters (read them in the forward pass).
    pub fn params(&self) -> &ParamShard<'a> {
        &self.shard
    }

    /// The gradient of tensor `i`, to fill before [`Optimizer::fo_step`].
    pub fn grad_mut(&mut self, i: usize) -> Result<GradMut<'_>> {
        self.check_usable("grad_mut")?;
        self.shard.grad_mut(i)
    }

    /// Registers one more tensor; only before the first step.
    ///
    /// # Safety
    /// As [`ParamShard::add_raw`]: the memory stays valid and unaliased while the optimizer
    /// lives, in the shard's location.
    pub unsafe fn add_tensor_raw(&mut self, spec: TensorSpec) -> Result<usize> {
        self.check_usable("add_tensor")?;
        if self.prepared {
            return bad_state("add_tensor: tensors can only be added before the first step");
        }
        self.shard.add_raw(spec)
    }

    /// Gives tensor `i` a row-major 2-D shape `rows × cols`; only before the first step.
    /// Under low-rank directions (spec §7) it then takes `Z = A Bᵀ / sqrt(r)`, which the
    /// forward pass applies ([`Optimizer::forward_perturbation`], [`Optimizer::lowrank_factors`])
    /// and which no perturbation pass writes; other configurations ignore shapes.
    pub fn set_shape(&mut self, i: usize, rows: u64, cols: u64) -> Result<()> {
        self.check_usable("set_shape")?;
        if self.prepared {
            return bad_state("set_shape: shapes can only be given before the first step");
        }
        self.shard.set_shape(i, rows, cols)
    }

    /// Floats of one direction's low-rank factors (spec §7): `(rows + cols) · r_t` summed
    /// over the tensors with a low-rank direction, in the order of
    /// [`ParamShard::lowrank_tensors`]; 0 without low-rank directions.
    pub fn lowrank_factors_len(&self) -> u64 {
        self.shard
            .lowrank_tensors()
            .iter()
            .map(|(_, s)| s.factors_len())
            .sum()
    }

    /// The directions the factors and the forward perturbation refer to: the step in
    /// progress, or the next one.
    fn current_generator(&self) -> Generator {
        self.step().map_or_else(|| self.generator(), |s| s.gen)
    }

    fn check_lowrank_direction(&self, direction: u32) -> Result<()> {
        if self.config.direction != DirectionKind::LowRank {
            return bad_state("lowrank_factors: the optimizer does not use low-rank directions");
        }
        if direction >= self.config.num_directions {
            return invalid(format!(
                "direction: {direction} is not below num_directions = {}",
                self.config.num_directions
            ));
        }
        Ok(())
    }

    /// Writes the low-rank factors of `direction` of the current step (the step in progress,
    /// or the next one) to `out`, in the backend's memory (host for the CPU backend, device
    /// for CUDA, ordered on its stream): for each tensor with a low-rank direction, in
    /// order, `A` (rows × r_t) then `B` (cols × r_t), row-major, f32. The forward pass of a
    /// step adds `c (x B) Aᵀ · f32(1 / sqrt(r_t))` to a linear layer's output, `c` from
    /// [`Optimizer::forward_perturbation`].
    ///
    /// # Safety
    /// `out` must be valid for writes of `len` f32 in the backend's memory.
    pub unsafe fn lowrank_factors_raw(&mut self, direction: u32, out: u64, len: u64) -> Result<()> {
        self.check_usable("lowrank_factors")?;
        self.check_lowrank_direction(direction)?;
        let want = self.lowrank_factors_len();
        if len != want {
            return invalid(format!("len: {len} floats given, the factors take {want}"));
        }
        if len == 0 {
            return Ok(());
        }
        if out == 0 {
            return invalid("out: null pointer");
        }
        if out % 4 != 0 {
            return invalid(format!("out: address {out:#x} is not aligned to 4 bytes"));
        }
        let gen = self.current_generator();
        self.backend
            .lowrank_factors(&self.shard, gen, direction, out, len)
    }

    /// [`Optimizer::lowrank_factors_raw`] into a new host vector (host shards only).
    pub fn lowrank_factors(&mut self, direction: u32) -> Result<Vec<f32>> {
        self.check_usable("lowrank_factors")?;
        if self.shard.location() != crate::shard::Location::Host {
            return invalid("lowrank_factors: a device shard's factors go to device memory (lowrank_factors_raw)");
        }
        self.check_lowrank_direction(direction)?;
        let len = self.lowrank_factors_len();
        let n =
            usize::try_from(len).map_err(|_| crate::Error::OutOfMemory(format!("{len} floats")))?;
        let mut out = Vec::new();
        out.try_reserve_exact(n)
            .map_err(|_| crate::Error::OutOfMemory(format!("low-rank factors of {n} floats")))?;
        out.resize(n, 0f32);
        // SAFETY: `out` holds `len` f32 in host memory, the CPU backend's.
        unsafe { self.lowrank_factors_raw(direction, out.as_mut_ptr() as u64, len)? };
        Ok(out)
    }

    /// The perturbation `c Z_d` that the next forward pass carries, as `(d, c)`: what the
    /// forward must add for the tensors with a low-rank direction (spec §7), which no pass
    /// writes. `None` when it carries none (no step in progress; one-sided `L_0`).
    pub fn forward_perturbation(&self) -> Option<Term> {
        match &self.protocol {
            State::AwaitingLoss { step, eval } => {
                protocol::point(self.config.estimator, *eval).map(|offset| self.term(step, offset))
            }
            _ => None,
        }
    }

    /// Steps taken (first- and zeroth-order, skipped ones included).
    pub fn steps(&self) -> u64 {
        self.counters.step
    }

    /// Updates applied to the main rule's state (its `t`); reads the device's skip counter.
    pub fn updates(&mut self) -> Result<u64> {
        self.check_usable("updates")?;
        Ok(self.counters.updates[StateSet::Main as usize] - self.device_skipped()?)
    }

    /// Updates applied to the first-order rule's state (its `t`; 0 without `fo_rule`).
    pub fn fo_updates(&self) -> u64 {
        self.counters.updates[StateSet::FirstOrder as usize]
    }

    /// Steps skipped: zeroth-order ones whose losses or projected gradients were not finite
    /// (spec §4; reads the device counter), and steps whose gradient held a NaN or an
    /// infinity ([`Config::skip_nonfinite_grads`]).
    pub fn skipped(&mut self) -> Result<u64> {
        self.check_usable("skipped")?;
        Ok(self.counters.skipped + self.device_skipped()?)
    }

    /// Whether a zeroth-order step is in progress (also after an abort that failed to
    /// restore, until it is retried; not once the optimizer is poisoned).
    pub fn in_step(&self) -> bool {
        self.step().is_some()
    }

    /// The step in progress, if any.
    fn step(&self) -> Option<&ZoStep> {
        match &self.protocol {
            State::AwaitingLoss { step, .. } | State::UndoFailed { step, .. } => Some(step),
            State::Idle | State::Poisoned { .. } => None,
        }
    }

    /// Why the optimizer is poisoned, if it is: a pass of a zeroth-order step failed and
    /// left the parameters in an unknown state. Every call that returns a `Result` is then
    /// refused, except [`Optimizer::load_state`] and [`Optimizer::load_state_file`]: a
    /// successful load makes it usable again, and the caller writes the parameters of the
    /// same checkpoint back (with the safe API, whose shard borrows them: drop the
    /// optimizer, restore them, and load the state into a new one).
    pub fn poisoned(&self) -> Option<&str> {
        match &self.protocol {
            State::Poisoned { reason } => Some(reason),
            _ => None,
        }
    }

    /// Refuses the call `what` when the optimizer is poisoned, or when an abort failed to
    /// restore (only a retried abort or a load are accepted then).
    pub(crate) fn check_usable(&self, what: &str) -> Result<()> {
        match &self.protocol {
            State::Idle | State::AwaitingLoss { .. } => Ok(()),
            State::Poisoned { reason } => bad_state(format!(
                "{what}: refused, the optimizer is poisoned ({reason}); load a saved state \
                 (load_state) and write the parameters back"
            )),
            State::UndoFailed { error, .. } => bad_state(format!(
                "{what}: refused, abort failed to restore the parameters ({error}); call \
                 abort again to retry, or load a saved state and write the parameters back"
            )),
        }
    }

    /// Poisons the optimizer with the error `e` of a pass run by `what`, and returns `e`
    /// saying so.
    fn poison(&mut self, what: &str, e: Error) -> Error {
        let reason = format!("{what}: {}", e.message());
        self.protocol = State::Poisoned { reason };
        e.map_message(|m| {
            format!(
                "{m}; the parameters are in an unknown state and the optimizer is poisoned: \
                 load a saved state and write the parameters back"
            )
        })
    }

    /// The kind of the next step under the hybrid schedule, `None` without a schedule (the
    /// caller chooses each step's kind).
    pub fn next_phase(&self) -> Option<Phase> {
        self.config.scheduled_phase(self.counters.step)
    }

    fn check_phase(&self, want: Phase, what: &str) -> Result<()> {
        if self.in_step() {
            return bad_state(format!(
                "{what}: a zeroth-order step is in progress; feed its losses (or abort) first"
            ));
        }
        match self.next_phase() {
            Some(p) if p != want => bad_state(format!(
                "{what}: step {} of the hybrid schedule is {}",
                self.counters.step,
                match p {
                    Phase::FirstOrder => "first-order (call fo_step)",
                    Phase::ZerothOrder => "zeroth-order (call begin/feed or zo_step)",
                }
            )),
            _ => Ok(()),
        }
    }

    fn prepare(&mut self) -> Result<()> {
        if self.prepared {
            return Ok(());
        }
        if self.shard.is_empty() {
            return bad_state("no tensors: add at least one tensor before the first step");
        }
        self.backend
            .allocate_state(&self.shard, self.state_layout())?;
        // A backend that keeps the counts on the device (CUDA graphs) starts from ours.
        self.tell_device_counters()?;
        self.prepared = true;
        Ok(())
    }

    fn state_layout(&self) -> StateLayout {
        StateLayout {
            main_buffers: self.config.rule.state_buffers(),
            fo_buffers: self.config.fo_rule.map_or(0, |r| r.state_buffers()),
            residual: self.config.precision == Precision::Compensated,
        }
    }

    fn generator(&self) -> Generator {
        Generator {
            seed: self.config.seed,
            step: self.counters.step as u32,
            // Low-rank passes tell the backend to leave those tensors to the forward.
            kind: match self.config.direction {
                DirectionKind::LowRank => DirectionKind::LowRank,
                k => k.generated(),
            },
        }
    }

    /// The update pass of the rule of `phase` (its next `t`), with every other field empty.
    fn update_pass<'p>(&self, phase: Phase, gen: Generator) -> UpdatePass<'p> {
        let c = &self.config;
        let PhaseRule {
            rule,
            lr,
            weight_decay,
            state,
        } = c.phase_rule(phase);
        let t = self.counters.updates[state as usize] + 1;
        UpdatePass {
            gen,
            restore: None,
            zo: &[],
            grad_weight: None,
            rule: RuleParams::new(rule, lr, c.beta1, c.beta2, c.adam_eps, weight_decay, t),
            state,
            t,
            precision: c.precision,
            device_losses: None,
            tensors: None,
        }
    }

    /// This shard's `Σ z_d²` for each direction of the next step, for a sphere over a model
    /// split across processes: sum them over processes and pass the totals to
    /// [`Optimizer::begin_with_sq_norms`].
    pub fn local_sq_norms(&mut self) -> Result<Vec<f64>> {
        self.check_usable("local_sq_norms")?;
        self.prepare()?;
        let gen = self.generator();
        (0..self.config.num_directions)
            .map(|d| self.backend.sq_norm(&self.shard, gen, d))
            .collect()
    }

    /// Starts a zeroth-order step: perturbs for the first loss (two-sided), or leaves the
    /// parameters as they are for `L_0` (one-sided). Then alternate forward and
    /// [`Optimizer::feed`].
    pub fn begin(&mut self) -> Result<()> {
        self.check_usable("begin")?;
        self.begin_inner(None)
    }

    /// [`Optimizer::begin`] with the global squared norms of the sphere directions (one per
    /// direction), for a model split across processes.
    pub fn begin_with_sq_norms(&mut self, sq_norms: &[f64]) -> Result<()> {
        self.check_usable("begin")?;
        if self.config.direction != DirectionKind::Sphere {
            return invalid("sq_norms: only sphere directions take norms");
        }
        if sq_norms.len() != self.config.num_directions as usize {
            return invalid(format!(
                "sq_norms: {} values for {} directions",
                sq_norms.len(),
                self.config.num_directions
            ));
        }
        if let Some(v) = sq_norms.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return invalid(format!("sq_norms: must be finite and > 0, got {v}"));
        }
        self.begin_inner(Some(sq_norms))
    }

    fn begin_inner(&mut self, sq_norms: Option<&[f64]>) -> Result<()> {
        self.check_phase(Phase::ZerothOrder, "begin")?;
        if self.config.hybrid_alpha > 0.0 && !self.shard.has_grads() {
            return bad_state("hybrid_alpha > 0 mixes in gradients: every tensor needs one");
        }
        self.prepare()?;
        let q = self.config.num_directions as usize;
        let scales: Vec<f32> = if self.config.direction == DirectionKind::Sphere {
            let norms = match sq_norms {
                Some(n) => n.to_vec(),
                None => self.local_sq_norms()?,
            };
            let scales: Vec<f32> = norms.iter().map(|n| (1.0 / n.sqrt()) as f32).collect();
            // A norm so small that 1/||z|| overflows f32 would write Inf into every weight.
            if let Some(d) = scales.iter().position(|s| !s.is_finite()) {
                return invalid(format!(
                    "sq_norms: direction {d}'s squared norm {} is too small (1/sqrt overflows f32)",
                    norms[d]
                ));
            }
            scales
        } else {
            vec![1.0; q]
        };
        let step = ZoStep {
            gen: self.generator(),
            scales,
            losses: Vec::with_capacity(self.config.evaluations_per_step() as usize),
            on_device: None,
        };
        self.advance(step, 0, "begin").map(|_| ())
    }

    /// `multiple · μ s_d z_d` as a term.
    fn term(&self, step: &ZoStep, offset: Offset) -> Term {
        let d = offset.direction;
        Term {
            direction: d,
            coeff: offset.multiple as f32 * self.config.eps * step.scales[d as usize],
        }
    }

    /// Runs the pass that follows the `fed`-th loss of `step` (`protocol::pass_after`) and
    /// moves the protocol on: to the next evaluation, or back to idle once the update ran.
    /// A pass that fails poisons the optimizer: it may have written part of the parameters.
    fn advance(&mut self, step: ZoStep, fed: u32, what: &str) -> Result<Feed> {
        let c = &self.config;
        match protocol::pass_after(c.estimator, c.num_directions, fed) {
            Pass::Nothing => {}
            Pass::Perturb(offsets) => {
                let terms: Vec<Term> = offsets
                    .as_slice()
                    .iter()
                    .map(|&o| self.term(&step, o))
                    .collect();
                if let Err(e) = self.perturb(step.gen, &terms) {
                    return Err(self.poison(what, e));
                }
            }
            Pass::Update { restore } => {
                let restore = self.term(&step, restore);
                return match self.finish(&step, restore) {
                    Ok(report) => Ok(Feed::Done(report)),
                    Err(e) => Err(self.poison(what, e)),
                };
            }
        }
        self.protocol = State::AwaitingLoss { step, eval: fed };
        Ok(Feed::NeedsForward)
    }

    fn perturb(&mut self, gen: Generator, terms: &[Term]) -> Result<()> {
        let pass = PerturbPass {
            gen,
            terms,
            precision: self.config.precision,
        };
        self.backend.perturb(&self.shard, &pass)
    }

    /// Feeds the loss of the forward pass just run; tells whether another is needed.
    pub fn feed(&mut self, loss: f32) -> Result<Feed> {
        self.check_usable("feed")?;
        self.feed_inner(Some(loss), 0)
    }

    /// Feeds the loss from device memory (one f32 at `loss_on_device`) without synchronizing:
    /// the projected gradients and the finiteness check happen on the device. CUDA only.
    pub fn feed_device(&mut self, loss_on_device: u64) -> Result<Feed> {
        self.check_usable("feed")?;
        if loss_on_device == 0 {
            return invalid("loss_on_device: null pointer");
        }
        self.feed_inner(None, loss_on_device)
    }

    fn feed_inner(&mut self, host: Option<f32>, device: u64) -> Result<Feed> {
        let State::AwaitingLoss { step, eval } = &mut self.protocol else {
            return bad_state("feed: no zeroth-order step in progress; call begin first");
        };
        let (eval, on_device) = (*eval, host.is_none());
        if step.on_device.is_some_and(|d| d != on_device) {
            return bad_state(
                "feed: one step's losses must all come from the host or all from the device",
            );
        }
        // Recording the loss changes nothing yet: if it fails, the step waits for it still.
        match host {
            Some(loss) => step.losses.push(loss),
            None => match self.backend.device() {
                Some(queue) => queue.record_device_loss(eval, device)?,
                None => {
                    return invalid(format!(
                        "loss_on_device: the {} backend has no device memory",
                        self.backend.name()
                    ))
                }
            },
        }
        let State::AwaitingLoss { mut step, .. } =
            std::mem::replace(&mut self.protocol, State::Idle)
        else {
            unreachable!("the step was matched above")
        };
        step.on_device = Some(on_device);
        self.advance(step, eval + 1, "feed")
    }

    fn max_coefficient_sum(&self) -> f32 {
        crate::backend::max_coefficient_sum(self.config.direction, self.config.rank)
    }

    /// The projected gradients of a finished step from host losses.
    fn projected_grads(&self, losses: &[f32]) -> Vec<f32> {
        let mu = self.config.eps;
        let q = self.config.num_directions as usize;
        match self.config.estimator {
            Estimator::TwoSided => (0..q)
                .map(|d| (losses[2 * d] - losses[2 * d + 1]) / (2.0 * mu))
                .collect(),
            Estimator::OneSided => (0..q).map(|d| (losses[d + 1] - losses[0]) / mu).collect(),
        }
    }

    /// The last pass of a step (the update with `restore` fused in, or the restore alone
    /// when the step is skipped), and the counts that follow it.
    fn finish(&mut self, step: &ZoStep, restore: Term) -> Result<StepReport> {
        let on_device = step.on_device == Some(true);
        let q = self.config.num_directions;
        // The coefficient of direction d: g_d · (s_d / q). With device losses the kernel
        // forms the same product with g_d computed there.
        let coefficients = |g: Option<&[f32]>| -> Vec<Term> {
            (0..q as usize)
                .map(|d| {
                    let scale = step.scales[d] / q as f32;
                    Term {
                        direction: d as u32,
                        coeff: g.map_or(scale, |g| g[d] * scale),
                    }
                })
                .collect()
        };
        // Host losses: the loss, the skip decision and g_d are known here. Device losses:
        // the device computes g_d, checks finiteness and skips (see `DeviceLosses`).
        let (loss, g, zo) = if on_device {
            (None, None, coefficients(None))
        } else {
            let loss = match self.config.estimator {
                Estimator::TwoSided => {
                    (step.losses.iter().map(|l| *l as f64).sum::<f64>() / step.losses.len() as f64)
                        as f32
                }
                Estimator::OneSided => step.losses[0],
            };
            let g = self.projected_grads(&step.losses);
            let zo = coefficients(Some(&g));
            // Spec v2 §4: non-finite losses or projected gradients skip the step; so does an
            // estimate beyond MAX_ESTIMATE (it would write Inf or 1e30 into the weights or
            // Adam's moments, for good).
            let limit = self.max_coefficient_sum();
            let coefficient_sum = zo.iter().fold(0f32, |s, t| s + t.coeff.abs());
            let finite = step.losses.iter().all(|l| l.is_finite())
                && g.iter().all(|v| v.is_finite())
                && zo.iter().all(|t| t.coeff.is_finite())
                && coefficient_sum <= limit
                && self.mixed_grads_finite()?;
            if !finite {
                self.perturb(step.gen, &[restore])?;
                self.counters.skipped += 1;
                self.counters.step += 1;
                // No update pass ran to advance a device's counts.
                self.tell_device_counters()?;
                return Ok(StepReport {
                    skipped: true,
                    loss: Some(loss),
                    projected_grads: Vec::new(),
                });
            }
            (Some(loss), Some(g), zo)
        };
        let alpha = self.config.hybrid_alpha;
        let pass = UpdatePass {
            restore: Some(restore),
            zo: &zo,
            grad_weight: (alpha > 0.0).then_some(alpha),
            device_losses: on_device.then_some(DeviceLosses {
                estimator: self.config.estimator,
                eps: self.config.eps,
                max_coefficient_sum: self.max_coefficient_sum(),
            }),
            ..self.update_pass(Phase::ZerothOrder, step.gen)
        };
        self.backend.update(&self.shard, &pass)?;
        // With device losses this counts an attempt; the device subtracts its skips.
        self.counters.updates[pass.state as usize] += 1;
        self.counters.step += 1;
        Ok(StepReport {
            skipped: false,
            loss,
            projected_grads: g.unwrap_or_default(),
        })
    }

    /// Abandons a zeroth-order step in progress (e.g. the forward pass failed): restores the
    /// parameters, updates nothing, and does not count the step. No step in progress: a
    /// no-op.
    ///
    /// If the restoring pass fails, the step is kept and the error returned: every call but
    /// `abort` and a load is then refused, and `abort` runs the same pass again (right when
    /// the failed pass wrote nothing, as the CPU backend's failures never do). A second
    /// failure poisons the optimizer ([`Optimizer::poisoned`]).
    pub fn abort(&mut self) -> Result<()> {
        let (step, eval, first_error) = match std::mem::replace(&mut self.protocol, State::Idle) {
            State::Idle => return Ok(()),
            poisoned @ State::Poisoned { .. } => {
                self.protocol = poisoned;
                return self.check_usable("abort");
            }
            State::AwaitingLoss { step, eval } => (step, eval, None),
            State::UndoFailed { step, eval, error } => (step, eval, Some(error)),
        };
        let Some(offset) = protocol::point(self.config.estimator, eval) else {
            return Ok(()); // the one-sided L_0 is taken at θ: nothing to undo
        };
        let undo = self.term(&step, offset.negated());
        let Err(e) = self.perturb(step.gen, &[undo]) else {
            return Ok(());
        };
        match first_error {
            None => {
                let error = e.message().to_string();
                self.protocol = State::UndoFailed { step, eval, error };
                Err(e.map_message(|m| {
                    format!(
                        "{m}; abort could not restore the parameters and keeps the step: call \
                         abort again to retry, or load a saved state and write the parameters back"
                    )
                }))
            }
            Some(first) => Err(self.poison(
                &format!("abort (restoring failed twice; first: {first})"),
                e,
            )),
        }
    }

    /// A whole zeroth-order step: calls `loss` `2q` times (two-sided) or `q + 1` times
    /// (one-sided), each time on the parameters to evaluate. If `loss` fails, the step is
    /// aborted and the parameters restored.
    pub fn zo_step<F>(&mut self, mut loss: F) -> Result<StepReport>
    where
        F: FnMut(&ParamShard<'a>) -> f32,
    {
        self.begin()?;
        loop {
            let l = loss(&self.shard);
            match self.feed(l) {
                Ok(Feed::NeedsForward) => {}
                Ok(Feed::Done(r)) => return Ok(r),
                Err(e) => {
                    let _ = self.abort();
                    return Err(e);
                }
            }
        }
    }

    /// A first-order step on the registered gradients: the first-order rule with its own
    /// state when the configuration has one (spec v2 §5), the main rule otherwise.
    ///
    /// A gradient holding a NaN or an infinity skips the step, as `torch.amp.GradScaler`
    /// skips it (unless [`Config::skip_nonfinite_grads`] is off): weights, rule states and
    /// `t` stay as they are, the step counts (schedule, directions' names) and is counted in
    /// [`Optimizer::skipped`], and the report says `skipped` (its `loss` is `None`, its
    /// projected gradients empty).
    pub fn fo_step(&mut self) -> Result<StepReport> {
        self.check_usable("fo_step")?;
        self.fo_step_inner(None)
    }

    /// A first-order step on the tensors `update[i]` names, as `torch.optim` steps over the
    /// parameters that have a gradient: the others, their rule state and their `lo` stay
    /// exactly as they are (no moment decay, no weight decay). The step counts as one step
    /// of the schedule; the rule's `t` advances when at least one tensor is updated. Only
    /// the updated tensors need gradients, and only theirs are checked for NaN and infinity
    /// ([`Optimizer::fo_step`]).
    pub fn fo_step_masked(&mut self, update: &[bool]) -> Result<StepReport> {
        self.check_usable("fo_step")?;
        if update.len() != self.shard.len() {
            return invalid(format!(
                "update: {} flags for {} tensors",
                update.len(),
                self.shard.len()
            ));
        }
        self.fo_step_inner(Some(update))
    }

    fn fo_step_inner(&mut self, update: Option<&[bool]>) -> Result<StepReport> {
        self.check_phase(Phase::FirstOrder, "fo_step")?;
        let updated = |i: usize| update.map_or(true, |u| u[i]);
        if let Some(i) =
            (0..self.shard.len()).find(|&i| updated(i) && self.shard.tensors()[i].grad == 0)
        {
            return bad_state(format!(
                "fo_step: tensor {i} has no gradient; a first-order step needs one for every \
                 tensor it updates"
            ));
        }
        self.prepare()?;
        let report = |skipped| StepReport {
            skipped,
            loss: None,
            projected_grads: Vec::new(),
        };
        let nothing_to_update = update.is_some_and(|u| !u.contains(&true));
        let skip = !nothing_to_update
            && self.config.skip_nonfinite_grads
            && self.backend.grads_finite(&self.shard, update)? == Some(false);
        if nothing_to_update || skip {
            // Nothing applied; the step still counts (schedule, directions' names).
            self.counters.step += 1;
            self.counters.skipped += u64::from(skip);
            self.tell_device_counters()?;
            return Ok(report(skip));
        }
        let pass = UpdatePass {
            grad_weight: Some(1.0),
            tensors: update.filter(|u| u.contains(&false)),
            ..self.update_pass(Phase::FirstOrder, self.generator())
        };
        if let Err(e) = self.backend.update(&self.shard, &pass) {
            // The update may have written part of the parameters and moments.
            return Err(self.poison("fo_step", e));
        }
        self.counters.updates[pass.state as usize] += 1;
        self.counters.step += 1;
        Ok(report(false))
    }

    /// Skips the step the schedule calls for (first- or zeroth-order), as a step whose
    /// gradient or loss is not finite is skipped, for a caller that found it so elsewhere: on
    /// another shard or process of the model, whose optimizers must skip together to stay in
    /// lockstep (`torch.amp.GradScaler` skips the whole step the same way). Nothing changes but
    /// the counts: the step counts and is counted in [`Optimizer::skipped`]. Not during a
    /// zeroth-order step (abort it instead).
    pub fn skip_step(&mut self) -> Result<()> {
        self.check_usable("skip_step")?;
        self.check_not_in_step("skip_step")?;
        self.prepare()?;
        self.counters.step += 1;
        self.counters.skipped += 1;
        self.tell_device_counters()
    }

    /// Whether the gradient a zeroth-order update mixes in (`hybrid_alpha > 0`) is finite;
    /// `true` when none is mixed in, the check is off, or the backend does not check.
    fn mixed_grads_finite(&mut self) -> Result<bool> {
        if !(self.config.hybrid_alpha > 0.0 && self.config.skip_nonfinite_grads) {
            return Ok(true);
        }
        Ok(self.backend.grads_finite(&self.shard, None)? != Some(false))
    }

    /// Adds `scale · z` once, `z` the direction `(seed, step, direction)` of the configured
    /// kind (the sphere's unscaled Gaussian) over the global indices: a seeded displacement
    /// that any process holding any shard of the model regenerates exactly (a noise
    /// control, say). One perturbation pass, rounded like the others; the optimizer's state,
    /// counters and schedule do not change. Not during a zeroth-order step.
    ///
    /// A displacement that would make a finite parameter non-finite (past its dtype's range)
    /// is refused and changes nothing, as a step's own bound keeps Inf out of the weights. A
    /// scale small enough that it cannot ([`crate::DType::max_safe_increment`] over the largest
    /// `|z|`) is applied at once; a larger one is computed first over every parameter.
    pub fn displace(&mut self, seed: u64, step: u32, direction: u32, scale: f32) -> Result<()> {
        self.check_usable("displace")?;
        self.check_not_in_step("displace")?;
        if !scale.is_finite() {
            return invalid(format!("scale: must be finite, got {scale}"));
        }
        self.prepare()?;
        let kind = self.config.direction.generated();
        let pass = PerturbPass {
            gen: Generator { seed, step, kind },
            terms: &[Term {
                direction,
                coeff: scale,
            }],
            precision: self.config.precision,
        };
        let largest = scale.abs() * kind.max_abs();
        let safe = self
            .shard
            .tensors()
            .iter()
            .all(|t| largest <= t.dtype.max_safe_increment());
        if !safe && !self.backend.perturb_stays_finite(&self.shard, &pass)? {
            return invalid(format!(
                "scale: {scale} would make parameters non-finite (past their dtype's range); \
                 nothing was changed"
            ));
        }
        match self.backend.perturb(&self.shard, &pass) {
            Ok(()) => Ok(()),
            // The pass may have displaced part of the parameters.
            Err(e) => Err(self.poison("displace", e)),
        }
    }

    /// Runs later passes on the caller's CUDA stream (raw `CUstream`; 0: the default stream).
    ///
    /// # Safety
    /// `stream` must be a valid stream of the backend's device context (or 0) that outlives
    /// its use by this optimizer.
    pub unsafe fn set_stream(&mut self, stream: u64) -> Result<()> {
        self.check_usable("set_stream")?;
        match self.backend.device() {
            // SAFETY: the caller's promise, passed on.
            Some(queue) => unsafe { queue.set_stream(stream) },
            None => invalid(format!(
                "cuda_stream: the {} backend has no streams",
                self.backend.name()
            )),
        }
    }

    /// Tells a backend that keeps the counts on the device (CUDA graphs) the host's counts.
    fn tell_device_counters(&mut self) -> Result<()> {
        let (step, updates) = (self.counters.step, self.counters.updates);
        match self.backend.device() {
            Some(queue) => queue.set_counters(step, updates),
            None => Ok(()),
        }
    }

    /// Steps the device skipped for a non-finite recorded loss (0 without a device).
    fn device_skipped(&mut self) -> Result<u64> {
        match self.backend.device() {
            Some(queue) => queue.device_skipped(),
            None => Ok(0),
        }
    }

    /// Waits for every pass issued so far (a no-op on the CPU).
    pub fn synchronize(&mut self) -> Result<()> {
        self.check_usable("synchronize")?;
        self.backend.synchronize()
    }

    fn fingerprint(&self) -> u64 {
        state::fingerprint(&self.config, &self.shard)
    }

    /// Size in bytes of a saved state ([`Optimizer::save_state`]).
    pub fn state_size(&mut self) -> Result<u64> {
        self.check_usable("state_size")?;
        self.prepare()?;
        Ok(self.saved_size())
    }

    /// Bytes of a saved state (the state allocated).
    fn saved_size(&self) -> u64 {
        state::saved_size(self.state_layout().bytes(self.shard.tensors()))
    }

    fn check_not_in_step(&self, what: &str) -> Result<()> {
        if matches!(self.protocol, State::AwaitingLoss { .. }) {
            return bad_state(format!("{what}: a zeroth-order step is in progress"));
        }
        Ok(())
    }

    /// The counters as saved: device skips folded in.
    fn saved_counters(&mut self) -> Result<Counters> {
        let device = self.device_skipped()?;
        let mut c = self.counters;
        c.updates[StateSet::Main as usize] -= device;
        c.skipped += device;
        Ok(c)
    }

    /// Streams the optimizer state (step counts, buffers, checksum; the parameters are the
    /// caller's) to `out`, in [`Optimizer::state_size`] bytes. Memory used on the way is
    /// bounded whatever the state's size.
    pub fn save_state_to(&mut self, out: &mut dyn std::io::Write) -> Result<()> {
        self.check_usable("save_state")?;
        self.check_not_in_step("save_state")?;
        self.prepare()?;
        let counters = self.saved_counters()?;
        let body = self.state_layout().bytes(self.shard.tensors());
        let fingerprint = self.fingerprint();
        let backend = &mut self.backend;
        state::write(out, fingerprint, counters, body, &mut |sink| {
            backend.save_state(sink)
        })
    }

    /// The optimizer state as bytes ([`Optimizer::save_state_to`] into memory).
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        self.check_usable("save_state")?;
        let size = self.state_size()?;
        let mut out = state::buffer(size)?;
        self.save_state_to(&mut out)?;
        Ok(out)
    }

    /// Saves the state to the file `path`, atomically and durably: it is written to a new
    /// temporary file of a unique name beside it (created exclusively: never through a link
    /// planted there), synced, renamed over `path`, and the directory synced, so a crash never
    /// leaves a truncated state under `path` and concurrent saves to one path each leave a
    /// whole state.
    pub fn save_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        self.check_usable("save_state")?;
        self.check_not_in_step("save_state")?;
        state::write_file_atomically(path, |out| self.save_state_to(out))
    }

    /// Restores a state saved by an optimizer of the same configuration and tensors; the
    /// run then continues as the saved one would have. A state that is truncated,
    /// corrupted (checksum), of another configuration, or of an unknown format is refused
    /// and nothing changes. States of format 1 (hyzo 0.1, no checksum) load into
    /// optimizers without a first-order rule. The one call a poisoned optimizer accepts: a
    /// successful load makes it usable again ([`Optimizer::poisoned`]).
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.check_not_in_step("load_state")?;
        self.prepare()?;
        let saved = state::check(
            bytes,
            self.fingerprint(),
            self.state_layout().bytes(self.shard.tensors()),
            self.config.fo_rule.is_some(),
            &self.body_layout(),
        )?;
        let mut body = &bytes[saved.body_start..];
        self.backend.load_state(&mut |buf: &mut [u8]| {
            let (now, rest) = body.split_at(buf.len());
            buf.copy_from_slice(now);
            body = rest;
            Ok(())
        })?;
        self.finish_load(saved.counters)
    }

    /// [`Optimizer::load_state`] from the file `path`, which is read once, whole, into
    /// memory (the state's size; an out-of-memory error when that does not fit) and then
    /// checked and loaded: a file replaced, truncated or rewritten while it is read loads
    /// one state whole or is refused, changing nothing. Anything but a regular file (a FIFO,
    /// which would block, a device, a directory) is refused before it is read.
    pub fn load_state_file(&mut self, path: &std::path::Path) -> Result<()> {
        self.check_not_in_step("load_state")?;
        // Not state_size: a poisoned optimizer refuses it, and loads are its way back.
        self.prepare()?;
        let bytes = state::read_file(path, self.saved_size())?;
        self.load_state(&bytes)
    }

    /// What the saved body holds, buffer by buffer, for the checks of a load.
    fn body_layout(&self) -> state::BodyLayout<'_> {
        state::BodyLayout {
            tensors: self.shard.tensors(),
            rules: [Some(self.config.rule), self.config.fo_rule],
            residual: self.state_layout().residual,
        }
    }

    fn finish_load(&mut self, counters: Counters) -> Result<()> {
        // The device counter restarts from zero; the loaded counters hold every skip.
        if let Some(queue) = self.backend.device() {
            queue.reset_device_skipped()?;
        }
        self.counters = counters;
        self.tell_device_counters()?;
        // A poisoned optimizer (or one whose abort failed) is usable again: the caller
        // writes the parameters of the same checkpoint back.
        self.protocol = State::Idle;
        Ok(())
    }

    /// Takes the step and update counts from the device, where a backend keeps them (the
    /// CUDA backend's device-counter mode, `CudaBackend::set_device_counters`): after a
    /// captured step was replayed as a CUDA graph, the device ran steps the host did not
    /// count. Synchronizes; a no-op for other backends. Call it after replays, before
    /// anything that reads the counts (`steps`, `updates`, the hybrid schedule, saving).
    pub fn sync_counters(&mut self) -> Result<()> {
        self.check_usable("sync_counters")?;
        self.check_not_in_step("sync_counters")?;
        let counted = match self.backend.device() {
            Some(queue) => queue.device_counters()?,
            None => None,
        };
        if let Some((step, updates)) = counted {
            self.counters.step = step;
            self.counters.updates = updates;
        }
        Ok(())
    }
}
