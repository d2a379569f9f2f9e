//! The schedule against spec §4, and the protocol's states through [`Optimizer`] with a
//! backend that fails on a chosen pass (shared with the C ABI's tests, `src/ffi/tests.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{
    Backend, DeviceQueue, PerturbPass, StateLayout, StateSink, StateSource, UpdatePass,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::optimizer::{Feed, Optimizer};
use crate::rules::Rule;
use crate::shard::{ParamShard, TensorSpec};
use crate::DType;

const ESTIMATORS: [Estimator; 2] = [Estimator::TwoSided, Estimator::OneSided];

fn o(direction: u32, multiple: i8) -> Offset {
    Offset {
        direction,
        multiple,
    }
}

/// Spec §4's passes, transcribed line by line: index `fed` holds the pass that runs once
/// `fed` losses were fed.
fn spec_passes(estimator: Estimator, q: u32) -> Vec<Pass> {
    let mut out = Vec::new();
    match estimator {
        Estimator::TwoSided => {
            // pass 0: θ ← θ + μ s_0 z_0, then L⁺_0.
            out.push(Pass::Perturb(Offsets::one(o(0, 1))));
            for d in 0..q {
                // after L⁺_d: θ ← θ − 2μ s_d z_d, then L⁻_d.
                out.push(Pass::Perturb(Offsets::one(o(d, -2))));
                out.push(if d < q - 1 {
                    // after L⁻_d, d < q − 1: θ ← θ + μ s_d z_d + μ s_{d+1} z_{d+1}.
                    Pass::Perturb(Offsets::two(o(d, 1), o(d + 1, 1)))
                } else {
                    // after L⁻_{q−1}: θ ← U(θ + μ s_{q−1} z_{q−1}, ĝ).
                    Pass::Update { restore: o(d, 1) }
                });
            }
        }
        Estimator::OneSided => {
            // L_0 = f(θ) first.
            out.push(Pass::Nothing);
            for d in 0..q {
                // θ ← θ + μ s_d z_d, fused with the restore of d − 1.
                out.push(Pass::Perturb(if d == 0 {
                    Offsets::one(o(0, 1))
                } else {
                    Offsets::two(o(d - 1, -1), o(d, 1))
                }));
            }
            // The last restore is fused into the update pass.
            out.push(Pass::Update {
                restore: o(q - 1, -1),
            });
        }
    }
    out
}

#[test]
fn the_schedule_is_spec_4s() {
    for estimator in ESTIMATORS {
        for q in 1..=4 {
            let schedule: Vec<Pass> = (0..=evaluations(estimator, q))
                .map(|fed| pass_after(estimator, q, fed))
                .collect();
            assert_eq!(
                schedule,
                spec_passes(estimator, q),
                "{estimator:?}, q = {q}"
            );
            let passes = schedule.iter().filter(|p| **p != Pass::Nothing).count();
            let want = match estimator {
                Estimator::TwoSided => 2 * q + 1,
                Estimator::OneSided => q + 1,
            };
            assert_eq!(passes as u32, want, "{estimator:?}, q = {q}: passes");
            assert!(
                matches!(schedule.last(), Some(Pass::Update { .. })),
                "{estimator:?}, q = {q}: the last restore is fused with the update"
            );
        }
    }
}

/// Running the schedule on a symbolic θ (the multiple of each `μ s_d z_d` it carries): each
/// loss is taken at [`point`] of its evaluation, and the update starts from θ itself.
#[test]
fn every_loss_is_taken_at_its_point_and_the_update_at_theta() {
    for estimator in ESTIMATORS {
        for q in 1..=4 {
            let mut carried: BTreeMap<u32, i8> = BTreeMap::new();
            let mut apply = |offsets: &[Offset]| {
                for x in offsets {
                    *carried.entry(x.direction).or_default() += x.multiple;
                }
                carried.retain(|_, m| *m != 0);
                carried.clone()
            };
            let evals = evaluations(estimator, q);
            for fed in 0..=evals {
                let now = match pass_after(estimator, q, fed) {
                    Pass::Nothing => apply(&[]),
                    Pass::Perturb(offsets) => {
                        assert!(offsets.as_slice().len() <= 2);
                        apply(offsets.as_slice())
                    }
                    Pass::Update { restore } => {
                        assert_eq!(fed, evals, "{estimator:?}, q = {q}: an early update");
                        let at = apply(&[restore]);
                        assert!(at.is_empty(), "{estimator:?}, q = {q}: updated at {at:?}");
                        continue;
                    }
                };
                let want: BTreeMap<u32, i8> = point(estimator, fed)
                    .map(|p| (p.direction, p.multiple))
                    .into_iter()
                    .collect();
                assert_eq!(now, want, "{estimator:?}, q = {q}: evaluation {fed}");
            }
        }
    }
}

#[test]
fn evaluations_match_the_projected_gradients_layout() {
    // Two-sided g_d = (L[2d] − L[2d+1]) / 2μ, one-sided g_d = (L[d+1] − L[0]) / μ.
    for q in 1..=4 {
        for d in 0..q {
            assert_eq!(point(Estimator::TwoSided, 2 * d), Some(o(d, 1)));
            assert_eq!(point(Estimator::TwoSided, 2 * d + 1), Some(o(d, -1)));
            assert_eq!(point(Estimator::OneSided, d + 1), Some(o(d, 1)));
        }
        assert_eq!(point(Estimator::OneSided, 0), None);
        assert_eq!(evaluations(Estimator::TwoSided, q), 2 * q);
        assert_eq!(evaluations(Estimator::OneSided, q), q + 1);
    }
}

// ---------------------------------------------------------------------------------------
// A backend that fails on chosen passes.

/// Which passes fail, and how many ran: shared between a test and its backend.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Passes (perturbation and update) run so far, failed ones included.
    pub passes: u64,
    /// The numbers (0-based, over the optimizer's life) of the passes that fail.
    pub fail: Vec<u64>,
}

/// The CPU backend, except that the passes `Plan::fail` names fail before writing anything,
/// with an [`Error::Cuda`] naming the pass (as a device launch that failed would).
pub(crate) struct FailingBackend {
    inner: CpuBackend,
    plan: Arc<Mutex<Plan>>,
}

impl FailingBackend {
    pub(crate) fn new() -> (Self, Arc<Mutex<Plan>>) {
        let plan = Arc::new(Mutex::new(Plan::default()));
        let backend = Self {
            inner: CpuBackend::new(1).expect("a CPU backend"),
            plan: plan.clone(),
        };
        (backend, plan)
    }

    fn pass(&mut self, kind: &str) -> Result<()> {
        let mut plan = self.plan.lock().unwrap();
        let n = plan.passes;
        plan.passes += 1;
        if plan.fail.contains(&n) {
            return Err(Error::Cuda(format!(
                "injected failure of pass {n} ({kind})"
            )));
        }
        Ok(())
    }
}

impl Backend for FailingBackend {
    fn name(&self) -> String {
        "failing-cpu".into()
    }
    fn allocate_state(&mut self, shard: &ParamShard, layout: StateLayout) -> Result<()> {
        self.inner.allocate_state(shard, layout)
    }
    fn perturb(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<()> {
        self.pass("perturb")?;
        self.inner.perturb(shard, pass)
    }
    fn update(&mut self, shard: &ParamShard, pass: &UpdatePass) -> Result<()> {
        self.pass("update")?;
        self.inner.update(shard, pass)
    }
    fn sq_norm(&mut self, shard: &ParamShard, gen: Generator, direction: u32) -> Result<f64> {
        self.inner.sq_norm(shard, gen, direction)
    }
    fn save_state(&mut self, sink: &mut StateSink) -> Result<()> {
        self.inner.save_state(sink)
    }
    fn load_state(&mut self, source: &mut StateSource) -> Result<()> {
        self.inner.load_state(source)
    }
    fn device(&mut self) -> Option<&mut dyn DeviceQueue> {
        None
    }
}

/// The configurations the failure tests run: AdamW (a state that a stray update would
/// change), both estimators, one and three directions.
pub(crate) fn failure_configs() -> Vec<Config> {
    let mut out = Vec::new();
    for estimator in ESTIMATORS {
        for q in [1, 3] {
            out.push(Config {
                seed: 7,
                lr: 1e-2,
                num_directions: q,
                estimator,
                rule: Rule::AdamW,
                ..Config::default()
            });
        }
    }
    out
}

/// The loss the tests feed: `Σ (θ − 1)²`.
pub(crate) fn loss_of(values: &[f32]) -> f32 {
    values.iter().map(|x| (x - 1.0) * (x - 1.0)).sum()
}

pub(crate) const N: usize = 37;

pub(crate) fn initial_params() -> Vec<f32> {
    (0..N).map(|i| (i as f32 * 0.37).sin()).collect()
}

/// An optimizer over parameters it does not borrow (as the C ABI registers them), so that a
/// test can write them back while it lives.
struct Rig {
    opt: Optimizer<'static>,
    plan: Arc<Mutex<Plan>>,
    /// The parameters' memory; read and written only through `ptr` while `opt` lives.
    _memory: Box<[f32]>,
    ptr: *mut f32,
    /// A gradient of 0.5 everywhere, for first-order steps (zeroth-order steps ignore it:
    /// `hybrid_alpha` is 0).
    _grad: Box<[f32]>,
}

impl Rig {
    fn new(config: &Config) -> Self {
        let mut memory = initial_params().into_boxed_slice();
        let ptr = memory.as_mut_ptr();
        let grad = vec![0.5f32; N].into_boxed_slice();
        let (backend, plan) = FailingBackend::new();
        let mut opt =
            Optimizer::with_backend(config.clone(), ParamShard::new(), Box::new(backend)).unwrap();
        // SAFETY: `memory` outlives `opt` (fields drop in order) and is touched only
        // through `ptr`, never during a call.
        unsafe {
            opt.add_tensor_raw(TensorSpec {
                data: ptr as u64,
                dtype: DType::F32,
                numel: N as u64,
                offset: 0,
                grad: grad.as_ptr() as u64,
                grad_dtype: DType::F32,
            })
            .unwrap();
        }
        Self {
            opt,
            plan,
            _memory: memory,
            ptr,
            _grad: grad,
        }
    }

    fn params(&self) -> Vec<f32> {
        // SAFETY: see `new`; no call is running.
        unsafe { std::slice::from_raw_parts(self.ptr, N) }.to_vec()
    }

    fn write_params(&mut self, values: &[f32]) {
        // SAFETY: see `new`; no call is running.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, N) }.copy_from_slice(values);
    }

    fn passes(&self) -> u64 {
        self.plan.lock().unwrap().passes
    }

    fn fail(&self, passes: &[u64]) {
        self.plan.lock().unwrap().fail = passes.to_vec();
    }

    /// A whole step on the real loss.
    fn step(&mut self) -> Result<()> {
        self.opt.begin()?;
        loop {
            let l = loss_of(&self.params());
            if let Feed::Done(_) = self.opt.feed(l)? {
                return Ok(());
            }
        }
    }
}

fn passes_per_step(c: &Config) -> u64 {
    (0..=c.evaluations_per_step())
        .filter(|&fed| pass_after(c.estimator, c.num_directions, fed) != Pass::Nothing)
        .count() as u64
}

/// Every call that returns a `Result`, but the loads: each must be refused with `BadState`
/// naming the refusal, and change nothing.
fn assert_refuses_everything(opt: &mut Optimizer, needle: &str) {
    let mut calls: Vec<(&str, Result<()>)> = vec![
        ("begin", opt.begin()),
        ("feed", opt.feed(1.0).map(|_| ())),
        ("feed_device", opt.feed_device(8).map(|_| ())),
        ("fo_step", opt.fo_step().map(|_| ())),
        ("fo_step_masked", opt.fo_step_masked(&[true]).map(|_| ())),
        ("displace", opt.displace(1, 2, 0, 0.5)),
        ("skip_step", opt.skip_step()),
        ("set_lr", opt.set_lr(0.5)),
        ("set_weight_decay", opt.set_weight_decay(0.5)),
        ("set_fo_lr", opt.set_fo_lr(Some(0.5))),
        ("set_fo_weight_decay", opt.set_fo_weight_decay(None)),
        ("grad_mut", opt.grad_mut(0).map(|_| ())),
        ("set_shape", opt.set_shape(0, 1, N as u64)),
        ("lowrank_factors", opt.lowrank_factors(0).map(|_| ())),
        ("local_sq_norms", opt.local_sq_norms().map(|_| ())),
        ("begin_with_sq_norms", opt.begin_with_sq_norms(&[1.0])),
        ("updates", opt.updates().map(|_| ())),
        ("skipped", opt.skipped().map(|_| ())),
        // SAFETY: 0, the default stream (refused before it is used).
        ("set_stream", unsafe { opt.set_stream(0) }),
        ("synchronize", opt.synchronize()),
        ("state_size", opt.state_size().map(|_| ())),
        ("save_state", opt.save_state().map(|_| ())),
        ("save_state_to", opt.save_state_to(&mut Vec::new())),
        (
            "save_state_file",
            opt.save_state_file(std::path::Path::new("/nonexistent/x")),
        ),
        ("sync_counters", opt.sync_counters()),
        ("zo_step", opt.zo_step(|_| 1.0).map(|_| ())),
    ];
    // SAFETY: refused before the spec is looked at.
    let add = unsafe {
        opt.add_tensor_raw(TensorSpec {
            data: 64,
            dtype: DType::F32,
            numel: 1,
            offset: 1 << 40,
            grad: 0,
            grad_dtype: DType::F32,
        })
    };
    calls.push(("add_tensor_raw", add.map(|_| ())));
    for (name, r) in calls {
        match r {
            Err(Error::BadState(m)) => assert!(
                m.contains("refused") && m.contains(needle),
                "{name}: {m:?} lacks {needle:?}"
            ),
            other => panic!("{name}: {other:?}, expected a refusal"),
        }
    }
}

/// For every configuration and every pass `k` of a step: the call that runs it fails with
/// the backend's error saying the optimizer is poisoned; everything but a load is refused
/// with the reason; a load (and the parameters written back) makes it continue exactly as
/// an optimizer that never failed.
#[test]
fn a_failed_pass_poisons_until_a_load() {
    for config in failure_configs() {
        let per_step = passes_per_step(&config);
        // The reference: two steps, a checkpoint, then one more step.
        let mut reference = Rig::new(&config);
        reference.step().unwrap();
        reference.step().unwrap();
        let checkpoint = (reference.params(), reference.opt.save_state().unwrap());
        reference.step().unwrap();
        let after = (reference.params(), reference.opt.save_state().unwrap());
        for k in 0..per_step {
            let what = format!(
                "{:?} q = {}, pass {k}",
                config.estimator, config.num_directions
            );
            let mut rig = Rig::new(&config);
            rig.fail(&[2 * per_step + k]);
            rig.step().unwrap();
            rig.step().unwrap();
            assert_eq!(rig.opt.save_state().unwrap(), checkpoint.1, "{what}");
            let err = rig.step().unwrap_err();
            let Error::Cuda(m) = &err else {
                panic!("{what}: {err:?}")
            };
            assert!(
                m.contains(&format!("injected failure of pass {}", 2 * per_step + k))
                    && m.contains("poisoned"),
                "{what}: {m}"
            );
            let reason = rig.opt.poisoned().expect("poisoned").to_string();
            assert!(reason.contains("injected"), "{what}: {reason}");
            let call = if config.estimator == Estimator::TwoSided && k == 0 {
                "begin"
            } else {
                "feed"
            };
            assert!(reason.starts_with(call), "{what}: {reason}");
            assert!(!rig.opt.in_step(), "{what}");
            assert_eq!(rig.opt.forward_perturbation(), None, "{what}");
            let passes = rig.passes();
            assert_refuses_everything(&mut rig.opt, "poisoned");
            assert_eq!(rig.opt.abort(), rig.opt.check_usable("abort"), "{what}");
            assert_eq!(rig.passes(), passes, "{what}: a refused call ran a pass");
            assert!(rig.opt.poisoned().is_some(), "{what}");
            // A state that does not load leaves it poisoned.
            assert!(rig.opt.load_state(&checkpoint.1[..10]).is_err(), "{what}");
            assert!(rig.opt.poisoned().is_some(), "{what}");
            rig.write_params(&checkpoint.0);
            rig.opt.load_state(&checkpoint.1).unwrap();
            assert_eq!(rig.opt.poisoned(), None, "{what}");
            rig.step().unwrap();
            assert_eq!(rig.params(), after.0, "{what}: parameters after recovery");
            assert_eq!(rig.opt.save_state().unwrap(), after.1, "{what}: state");
        }
    }
}

/// The passes outside the zeroth-order protocol that write parameters (a first-order
/// update, a displacement) poison the optimizer when they fail, as the protocol's do: they
/// may have written part of the parameters.
#[test]
fn a_failed_first_order_step_or_displacement_poisons() {
    let config = &failure_configs()[0];
    for (what, pass) in [("fo_step", 0), ("displace", 0)] {
        let mut rig = Rig::new(config);
        let start = (rig.params(), rig.opt.save_state().unwrap());
        rig.fail(&[pass]);
        let err = match what {
            "fo_step" => rig.opt.fo_step().map(drop).unwrap_err(),
            _ => rig.opt.displace(3, 0, 0, 0.25).unwrap_err(),
        };
        assert!(err.message().contains("poisoned"), "{what}: {err:?}");
        let reason = rig.opt.poisoned().expect("poisoned").to_string();
        assert!(reason.starts_with(what), "{what}: {reason}");
        assert_refuses_everything(&mut rig.opt, "poisoned");
        rig.write_params(&start.0);
        rig.opt.load_state(&start.1).unwrap();
        rig.opt.fo_step().unwrap();
        assert!(
            rig.params() != start.0,
            "{what}: a first-order step after recovery"
        );
    }
}

/// A step skipped for a non-finite value found elsewhere changes nothing but the counts, and
/// keeps the optimizer in lockstep with one that skipped a step of its own (a NaN loss).
#[test]
fn a_skipped_step_counts_as_a_nan_loss_does() {
    for config in failure_configs() {
        let mut skipped = Rig::new(&config);
        let mut nan = Rig::new(&config);
        for rig in [&mut skipped, &mut nan] {
            rig.step().unwrap();
        }
        let before = skipped.params();
        skipped.opt.skip_step().unwrap();
        nan.opt.begin().unwrap();
        while let Feed::NeedsForward = nan.opt.feed(f32::NAN).unwrap() {}
        assert_eq!(skipped.params(), before, "skip_step changed the parameters");
        assert_eq!(skipped.opt.skipped().unwrap(), 1);
        // The same counts and state: the NaN step's restore rounded its parameters (which
        // the state does not hold); the skipped step ran no pass.
        assert_eq!(
            skipped.opt.save_state().unwrap(),
            nan.opt.save_state().unwrap(),
            "states after the skips"
        );
        skipped.step().unwrap();
        assert!(skipped.params() != before, "the step after a skip updates");
        skipped.opt.begin().unwrap();
        let err = skipped.opt.skip_step().unwrap_err();
        assert!(err.message().contains("in progress"), "{err:?}");
    }
}

#[test]
fn a_load_from_a_file_also_recovers() {
    let config = &failure_configs()[0];
    let path = std::env::temp_dir().join(format!("hyzo-protocol-{}.state", std::process::id()));
    let mut rig = Rig::new(config);
    rig.step().unwrap();
    let params = rig.params();
    rig.opt.save_state_file(&path).unwrap();
    rig.fail(&[rig.passes() + 1]);
    assert!(matches!(rig.step(), Err(Error::Cuda(_))));
    assert!(rig.opt.poisoned().is_some());
    rig.write_params(&params);
    rig.opt.load_state_file(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(rig.opt.poisoned(), None);
    rig.step().unwrap();
}

/// Feeds `eval` losses of a new step.
fn feed_until(rig: &mut Rig, eval: u32) {
    rig.opt.begin().unwrap();
    for _ in 0..eval {
        let l = loss_of(&rig.params());
        assert_eq!(rig.opt.feed(l).unwrap(), Feed::NeedsForward);
    }
}

/// `abort` after each evaluation of a step, its undo failing once: the step is kept, every
/// call but `abort` (and a load) is refused, and the retried `abort` leaves the parameters and
/// the state exactly as an abort that never failed. Failing twice poisons.
#[test]
fn a_failed_abort_keeps_the_step_for_one_retry() {
    for config in failure_configs() {
        for eval in 0..config.evaluations_per_step() {
            let what = format!(
                "{:?} q = {}, eval {eval}",
                config.estimator, config.num_directions
            );
            let mut reference = Rig::new(&config);
            reference.step().unwrap();
            feed_until(&mut reference, eval);
            reference.opt.abort().unwrap();
            let aborted = (reference.params(), reference.opt.save_state().unwrap());

            // The undo fails once, then succeeds.
            let mut rig = Rig::new(&config);
            rig.step().unwrap();
            feed_until(&mut rig, eval);
            let undo = rig.passes();
            rig.fail(&[undo]);
            let r = rig.opt.abort();
            if point(config.estimator, eval).is_none() {
                // The one-sided L_0 is taken at θ: abort runs no pass.
                r.unwrap();
                assert_eq!(rig.passes(), undo, "{what}");
                assert!(!rig.opt.in_step(), "{what}");
                continue;
            }
            let Err(Error::Cuda(m)) = r else {
                panic!("{what}: {r:?}")
            };
            assert!(m.contains("abort again"), "{what}: {m}");
            assert!(rig.opt.in_step(), "{what}: the step is kept");
            assert_eq!(rig.opt.poisoned(), None, "{what}");
            assert_refuses_everything(&mut rig.opt, "abort failed");
            assert_eq!(rig.passes(), undo + 1, "{what}: a refused call ran a pass");
            rig.opt.abort().unwrap();
            assert!(!rig.opt.in_step(), "{what}");
            assert_eq!(rig.params(), aborted.0, "{what}: parameters");
            assert_eq!(rig.opt.save_state().unwrap(), aborted.1, "{what}: state");
            rig.step().unwrap();
            reference.step().unwrap();
            assert_eq!(rig.params(), reference.params(), "{what}: the next step");

            // The undo fails twice: poisoned, until a load.
            let mut rig = Rig::new(&config);
            rig.step().unwrap();
            let checkpoint = (rig.params(), rig.opt.save_state().unwrap());
            feed_until(&mut rig, eval);
            let undo = rig.passes();
            rig.fail(&[undo, undo + 1]);
            assert!(matches!(rig.opt.abort(), Err(Error::Cuda(_))), "{what}");
            let Err(Error::Cuda(m)) = rig.opt.abort() else {
                panic!("{what}: the second abort")
            };
            assert!(m.contains("poisoned"), "{what}: {m}");
            let reason = rig.opt.poisoned().expect("poisoned");
            assert!(
                reason.contains("failed twice") && reason.contains(&format!("pass {undo}")),
                "{what}: {reason}"
            );
            assert!(!rig.opt.in_step(), "{what}");
            assert!(matches!(rig.opt.abort(), Err(Error::BadState(_))), "{what}");
            assert_refuses_everything(&mut rig.opt, "poisoned");
            rig.write_params(&checkpoint.0);
            rig.opt.load_state(&checkpoint.1).unwrap();
            rig.step().unwrap();
        }
    }
}

/// An abort whose undo failed is retried by a load as well: the step is dropped.
#[test]
fn a_load_also_ends_a_failed_abort() {
    let config = &failure_configs()[0];
    let mut rig = Rig::new(config);
    rig.step().unwrap();
    let checkpoint = (rig.params(), rig.opt.save_state().unwrap());
    feed_until(&mut rig, 1);
    rig.fail(&[rig.passes()]);
    assert!(rig.opt.abort().is_err());
    assert!(rig.opt.in_step());
    rig.write_params(&checkpoint.0);
    rig.opt.load_state(&checkpoint.1).unwrap();
    assert!(!rig.opt.in_step());
    rig.step().unwrap();
}

/// A step's losses recorded without a pass failing keep the step (nothing changed): a
/// device loss refused by the CPU backend, or a feed of the wrong kind.
#[test]
fn a_refused_loss_keeps_the_step() {
    let config = &failure_configs()[0];
    let mut rig = Rig::new(config);
    rig.opt.begin().unwrap();
    assert!(matches!(
        rig.opt.feed_device(8),
        Err(Error::InvalidArgument(_))
    ));
    assert!(rig.opt.in_step());
    assert_eq!(rig.opt.poisoned(), None);
    let l = loss_of(&rig.params());
    assert_eq!(rig.opt.feed(l).unwrap(), Feed::NeedsForward);
    rig.opt.abort().unwrap();
}
