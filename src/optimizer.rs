//! The step protocol of the spec (§4): which pass runs after which loss, and the state an
//! optimizer carries between steps. Backends execute the passes; this file decides them.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DeviceLosses, Generator, PerturbPass, Term, UpdatePass};
use crate::config::{Config, Estimator, Phase};
use crate::direction::DirectionKind;
use crate::dtype::Precision;
use crate::error::{bad_state, invalid, Result};
use crate::rules::RuleParams;
use crate::shard::{GradMut, ParamShard, TensorSpec};

/// What [`Optimizer::feed`] asks for next.
#[derive(Clone, Debug, PartialEq)]
pub enum Feed {
    /// The parameters hold the next perturbed point: run a forward pass and feed its loss.
    NeedsForward,
    /// The step is complete.
    Done(StepReport),
}

/// The outcome of a finished zeroth-order step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// A loss was not finite: parameters were restored and nothing was updated.
    pub skipped: bool,
    /// The loss at the unperturbed point: `L_0` for the one-sided estimator, the mean of the
    /// `2q` perturbed losses for the two-sided one (equal to `f(θ)` up to `O(μ²)`). `None`
    /// when the losses stayed on the device.
    pub loss: Option<f32>,
    /// The projected gradients `g_d` (empty when the losses stayed on the device).
    pub projected_grads: Vec<f32>,
}

/// A zeroth-order step in progress.
#[derive(Debug)]
struct ZoStep {
    gen: Generator,
    /// `s_d` of each direction (1 except for the sphere).
    scales: Vec<f32>,
    losses: Vec<f32>,
    fed: u32,
    on_device: Option<bool>,
    /// The perturbation the parameters carry now, to undo on abort.
    carried: Vec<Term>,
}

/// Magic bytes and version of the state format.
const STATE_MAGIC: &[u8; 8] = b"HYZOSTAT";
const STATE_FORMAT: u32 = 1;

/// A zeroth-order / first-order / hybrid optimizer over one [`ParamShard`].
///
/// Steps are numbered from 0; step `n` uses directions `(seed, n, 0..q)`, and the rule's
/// bias-correction count `t` is the number of updates applied including the current one
/// (a skipped step advances the step number, not `t`).
pub struct Optimizer<'a> {
    config: Config,
    shard: ParamShard<'a>,
    backend: Box<dyn Backend + 'a>,
    step: u64,
    updates: u64,
    skipped: u64,
    prepared: bool,
    zo: Option<ZoStep>,
}

impl std::fmt::Debug for Optimizer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .field("tensors", &self.shard.len())
            .field("step", &self.step)
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
        Ok(Self {
            config,
            shard,
            backend,
            step: 0,
            updates: 0,
            skipped: 0,
            prepared: false,
            zo: None,
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

    /// Changes the learning rate (for schedulers); allowed between steps.
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return invalid(format!("lr: must be finite and >= 0, got {lr}"));
        }
        self.config.lr = lr;
        Ok(())
    }

    /// Changes the weight decay; allowed between steps.
    pub fn set_weight_decay(&mut self, weight_decay: f32) -> Result<()> {
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return invalid(format!(
                "weight_decay: must be finite and >= 0, got {weight_decay}"
            ));
        }
        self.config.weight_decay = weight_decay;
        Ok(())
    }

    /// The parameters (read them in the forward pass).
    pub fn params(&self) -> &ParamShard<'a> {
        &self.shard
    }

    /// The gradient of tensor `i`, to fill before [`Optimizer::fo_step`].
    pub fn grad_mut(&mut self, i: usize) -> Result<GradMut<'_>> {
        self.shard.grad_mut(i)
    }

    /// Registers one more tensor; only before the first step.
    ///
    /// # Safety
    /// As [`ParamShard::add_raw`]: the memory stays valid and unaliased while the optimizer
    /// lives, in the shard's location.
    pub unsafe fn add_tensor_raw(&mut self, spec: TensorSpec) -> Result<usize> {
        if self.prepared {
            return bad_state("add_tensor: tensors can only be added before the first step");
        }
        self.shard.add_raw(spec)
    }

    /// Steps taken (first- and zeroth-order, skipped ones included).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Updates applied (the rules' `t`).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Zeroth-order steps skipped because a loss was not finite (reads the device counter).
    pub fn skipped(&mut self) -> Result<u64> {
        Ok(self.skipped + self.backend.device_skipped()?)
    }

    /// Whether a zeroth-order step is in progress.
    pub fn in_step(&self) -> bool {
        self.zo.is_some()
    }

    /// The kind of the next step under the hybrid schedule, `None` without a schedule (the
    /// caller chooses each step's kind).
    pub fn next_phase(&self) -> Option<Phase> {
        self.config.scheduled_phase(self.step)
    }

    fn check_phase(&self, want: Phase, what: &str) -> Result<()> {
        if self.zo.is_some() {
            return bad_state(format!(
                "{what}: a zeroth-order step is in progress; feed its losses (or abort) first"
            ));
        }
        match self.next_phase() {
            Some(p) if p != want => bad_state(format!(
                "{what}: step {} of the hybrid schedule is {}",
                self.step,
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
        let residual = self.config.precision == Precision::Compensated;
        self.backend
            .allocate_state(&self.shard, self.config.rule.state_buffers(), residual)?;
        self.prepared = true;
        Ok(())
    }

    fn generator(&self) -> Generator {
        Generator {
            seed: self.config.seed,
            step: self.step as u32,
            kind: self.config.direction.generated(),
        }
    }

    fn rule_params(&self, t: u64) -> RuleParams {
        let c = &self.config;
        RuleParams::new(
            c.rule,
            c.lr,
            c.beta1,
            c.beta2,
            c.adam_eps,
            c.weight_decay,
            t,
        )
    }

    /// This shard's `Σ z_d²` for each direction of the next step, for a sphere over a model
    /// split across processes: sum them over processes and pass the totals to
    /// [`Optimizer::begin_with_sq_norms`].
    pub fn local_sq_norms(&mut self) -> Result<Vec<f64>> {
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
        self.begin_inner(None)
    }

    /// [`Optimizer::begin`] with the global squared norms of the sphere directions (one per
    /// direction), for a model split across processes.
    pub fn begin_with_sq_norms(&mut self, sq_norms: &[f64]) -> Result<()> {
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
            norms.iter().map(|n| (1.0 / n.sqrt()) as f32).collect()
        } else {
            vec![1.0; q]
        };
        let mut step = ZoStep {
            gen: self.generator(),
            scales,
            losses: Vec::with_capacity(self.config.evaluations_per_step() as usize),
            fed: 0,
            on_device: None,
            carried: Vec::new(),
        };
        if self.config.estimator == Estimator::TwoSided {
            let terms = [self.term(&step, 0, 1.0)];
            self.perturb(&mut step, &terms)?;
        }
        self.zo = Some(step);
        Ok(())
    }

    /// `±μ s_d z_d` as a term.
    fn term(&self, step: &ZoStep, d: u32, sign: f32) -> Term {
        Term {
            direction: d,
            coeff: sign * self.config.eps * step.scales[d as usize],
        }
    }

    fn perturb(&mut self, step: &mut ZoStep, terms: &[Term]) -> Result<()> {
        let pass = PerturbPass {
            gen: step.gen,
            terms,
            precision: self.config.precision,
        };
        self.backend.perturb(&self.shard, &pass)?;
        // The parameters now carry the sum of the terms applied since the last restore;
        // a term that cancels a carried direction removes it.
        for t in terms {
            match step.carried.iter_mut().find(|c| c.direction == t.direction) {
                Some(c) => c.coeff += t.coeff,
                None => step.carried.push(*t),
            }
        }
        step.carried.retain(|c| c.coeff != 0.0);
        Ok(())
    }

    /// Feeds the loss of the forward pass just run; tells whether another is needed.
    pub fn feed(&mut self, loss: f32) -> Result<Feed> {
        self.feed_inner(Some(loss), 0)
    }

    /// Feeds the loss from device memory (one f32 at `loss_on_device`) without synchronizing:
    /// the projected gradients and the finiteness check happen on the device. CUDA only.
    pub fn feed_device(&mut self, loss_on_device: u64) -> Result<Feed> {
        if loss_on_device == 0 {
            return invalid("loss_on_device: null pointer");
        }
        self.feed_inner(None, loss_on_device)
    }

    fn feed_inner(&mut self, host: Option<f32>, device: u64) -> Result<Feed> {
        let Some(mut step) = self.zo.take() else {
            return bad_state("feed: no zeroth-order step in progress; call begin first");
        };
        let on_device = host.is_none();
        if step.on_device.is_some_and(|d| d != on_device) {
            self.zo = Some(step);
            return bad_state(
                "feed: one step's losses must all come from the host or all from the device",
            );
        }
        if on_device {
            if let Err(e) = self.backend.record_device_loss(step.fed, device) {
                self.zo = Some(step);
                return Err(e);
            }
        } else {
            step.losses.push(host.unwrap());
        }
        step.on_device = Some(on_device);
        let e = step.fed;
        step.fed += 1;
        let q = self.config.num_directions;
        let result = match self.config.estimator {
            Estimator::TwoSided => {
                let d = e / 2;
                if e % 2 == 0 {
                    let t = [self.term(&step, d, -2.0)];
                    self.perturb(&mut step, &t).map(|_| None)
                } else if d + 1 < q {
                    let t = [self.term(&step, d, 1.0), self.term(&step, d + 1, 1.0)];
                    self.perturb(&mut step, &t).map(|_| None)
                } else {
                    let restore = self.term(&step, d, 1.0);
                    self.finish(&step, restore).map(Some)
                }
            }
            Estimator::OneSided => {
                if e == 0 {
                    let t = [self.term(&step, 0, 1.0)];
                    self.perturb(&mut step, &t).map(|_| None)
                } else if e < q {
                    let t = [self.term(&step, e - 1, -1.0), self.term(&step, e, 1.0)];
                    self.perturb(&mut step, &t).map(|_| None)
                } else {
                    let restore = self.term(&step, q - 1, -1.0);
                    self.finish(&step, restore).map(Some)
                }
            }
        };
        match result {
            Ok(None) => {
                self.zo = Some(step);
                Ok(Feed::NeedsForward)
            }
            Ok(Some(report)) => {
                self.step += 1;
                Ok(Feed::Done(report))
            }
            Err(e) => {
                // A failed pass leaves the parameters in an unknown state: the step is over.
                Err(e)
            }
        }
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

    fn finish(&mut self, step: &ZoStep, restore: Term) -> Result<StepReport> {
        let on_device = step.on_device == Some(true);
        // Host losses: the loss, the skip decision and g_d are known here. Device losses:
        // the device computes g_d, checks finiteness and skips (see `DeviceLosses`).
        let (loss, g) = if on_device {
            (None, None)
        } else {
            let loss = match self.config.estimator {
                Estimator::TwoSided => {
                    (step.losses.iter().map(|l| *l as f64).sum::<f64>() / step.losses.len() as f64)
                        as f32
                }
                Estimator::OneSided => step.losses[0],
            };
            if step.losses.iter().any(|l| !l.is_finite()) {
                let pass = PerturbPass {
                    gen: step.gen,
                    terms: &[restore],
                    precision: self.config.precision,
                };
                self.backend.perturb(&self.shard, &pass)?;
                self.skipped += 1;
                return Ok(StepReport {
                    skipped: true,
                    loss: Some(loss),
                    projected_grads: Vec::new(),
                });
            }
            (Some(loss), Some(self.projected_grads(&step.losses)))
        };
        let q = self.config.num_directions;
        let zo: Vec<Term> = (0..q as usize)
            .map(|d| {
                let scale = step.scales[d] / q as f32;
                Term {
                    direction: d as u32,
                    // g_d · (s_d / q); on the device the kernel forms the same product.
                    coeff: g.as_ref().map_or(scale, |g| g[d] * scale),
                }
            })
            .collect();
        let alpha = self.config.hybrid_alpha;
        let pass = UpdatePass {
            gen: step.gen,
            restore: Some(restore),
            zo: &zo,
            grad_weight: (alpha > 0.0).then_some(alpha),
            rule: self.rule_params(self.updates + 1),
            precision: self.config.precision,
            device_losses: on_device.then_some(DeviceLosses {
                estimator: self.config.estimator,
                eps: self.config.eps,
            }),
        };
        self.backend.update(&self.shard, &pass)?;
        // With device losses, whether the device skipped is known only there: `t` counts
        // attempted updates.
        self.updates += 1;
        Ok(StepReport {
            skipped: false,
            loss,
            projected_grads: g.unwrap_or_default(),
        })
    }

    /// Abandons a zeroth-order step in progress (e.g. the forward pass failed): restores the
    /// parameters, updates nothing, and does not count the step.
    pub fn abort(&mut self) -> Result<()> {
        let Some(mut step) = self.zo.take() else {
            return Ok(());
        };
        let undo: Vec<Term> = step
            .carried
            .iter()
            .map(|t| Term {
                direction: t.direction,
                coeff: -t.coeff,
            })
            .collect();
        if !undo.is_empty() {
            self.perturb(&mut step, &undo)?;
        }
        Ok(())
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

    /// A first-order step on the registered gradients.
    pub fn fo_step(&mut self) -> Result<()> {
        self.check_phase(Phase::FirstOrder, "fo_step")?;
        if !self.shard.has_grads() {
            return bad_state("fo_step: every tensor needs a gradient for a first-order step");
        }
        self.prepare()?;
        let pass = UpdatePass {
            gen: self.generator(),
            restore: None,
            zo: &[],
            grad_weight: Some(1.0),
            rule: self.rule_params(self.updates + 1),
            precision: self.config.precision,
            device_losses: None,
        };
        self.backend.update(&self.shard, &pass)?;
        self.updates += 1;
        self.step += 1;
        Ok(())
    }

    /// Runs later passes on the caller's CUDA stream (raw `CUstream`; 0: the default stream).
    pub fn set_stream(&mut self, stream: u64) -> Result<()> {
        self.backend.set_stream(stream)
    }

    /// Waits for every pass issued so far (a no-op on the CPU).
    pub fn synchronize(&mut self) -> Result<()> {
        self.backend.synchronize()
    }

    fn fingerprint(&self) -> u64 {
        // FNV-1a over what fixes the state's layout and meaning.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(self.config.rule as u64);
        eat(self.config.precision as u64);
        eat(self.config.direction as u64);
        eat(self.config.estimator as u64);
        eat(self.config.num_directions as u64);
        eat(self.config.seed);
        eat(self.config.fo_steps as u64);
        eat(self.config.zo_steps as u64);
        for t in self.shard.tensors() {
            eat(t.dtype as u64);
            eat(t.numel);
            eat(t.offset);
        }
        h
    }

    const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8;

    /// Saves the optimizer state (step counts, buffers); the parameters are the caller's.
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        if self.zo.is_some() {
            return bad_state("save_state: a zeroth-order step is in progress");
        }
        self.prepare()?;
        let body = self.backend.save_state()?;
        let skipped = self.skipped()?;
        let mut out = Vec::with_capacity(Self::HEADER + body.len());
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_FORMAT.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32 ^ 0x5a5a_5a5a).to_le_bytes());
        out.extend_from_slice(&self.fingerprint().to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.updates.to_le_bytes());
        out.extend_from_slice(&skipped.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Size in bytes of [`Optimizer::save_state`]'s output.
    pub fn state_size(&mut self) -> Result<usize> {
        self.prepare()?;
        let buffers = self.config.rule.state_buffers() as u64;
        let residual = self.config.precision == Precision::Compensated;
        let body: u64 = self
            .shard
            .tensors()
            .iter()
            .map(|t| {
                4 * buffers * t.numel
                    + if residual && t.dtype != crate::dtype::DType::F32 {
                        2 * t.numel
                    } else {
                        0
                    }
            })
            .sum();
        Ok(Self::HEADER + body as usize)
    }

    /// Restores a state saved by an optimizer of the same configuration and tensors; the
    /// run then continues as the saved one would have.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        if self.zo.is_some() {
            return bad_state("load_state: a zeroth-order step is in progress");
        }
        if bytes.len() < Self::HEADER || &bytes[..8] != STATE_MAGIC {
            return invalid("state: not a hyzo optimizer state");
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        if u32_at(8) != STATE_FORMAT {
            return invalid(format!(
                "state: format version {} (this hyzo reads {STATE_FORMAT})",
                u32_at(8)
            ));
        }
        self.prepare()?;
        let expected = self.state_size()?;
        if bytes.len() != expected || (u32_at(12) ^ 0x5a5a_5a5a) as usize != expected - Self::HEADER
        {
            return invalid(format!(
                "state: {} bytes, this optimizer's state has {expected}",
                bytes.len()
            ));
        }
        if u64_at(16) != self.fingerprint() {
            return invalid(
                "state: saved by an optimizer of another configuration (rule, precision, \
                 directions, seed, schedule) or other tensors",
            );
        }
        self.backend.load_state(&bytes[Self::HEADER..])?;
        self.step = u64_at(24);
        self.updates = u64_at(32);
        // The device counter restarts from zero; keep the total in the host counter.
        let device = self.backend.device_skipped()?;
        self.skipped = u64_at(40).saturating_sub(device);
        Ok(())
    }
}
