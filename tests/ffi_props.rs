//! Random sequences of C calls, valid and invalid, through the `extern "C"` functions.
//!
//! Checked after every call: nothing panics (a panic would fail the test: the guards turn
//! them into `HYZO_ERR_INTERNAL`, which is itself a failure here), every failure has a status
//! and a non-empty message naming the function, and the parameters are bit-identical to
//! those of a reference [`Optimizer`] driven with only the calls that succeeded. A counting
//! allocator checks that creating, using (and misusing) and destroying optimizers leaks
//! nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_int, c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Mutex;

use half::{bf16, f16};
use proptest::prelude::*;

use hyzo::ffi::*;
use hyzo::{
    Config, DType, DirectionKind, Estimator, Feed, Optimizer, ParamShard, Precision, Rule,
    TensorSpec,
};

// ---------------------------------------------------------------------------------------
// Live heap bytes of the process.

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let q = System.realloc(p, l, n);
        if !q.is_null() {
            LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this file share the allocator's counter: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------
// Parameters: three tensors (f32, f16, bf16), each with an f32 gradient, owned by the test.

const SIZES: [usize; 3] = [37, 130, 64];

struct Buffers {
    a: Vec<f32>,
    b: Vec<f16>,
    c: Vec<bf16>,
    grads: [Vec<f32>; 3],
}

impl Buffers {
    fn new() -> Self {
        let init = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * 0.37 + k).sin()).collect();
        let a: Vec<f32> = init(SIZES[0], 0.1);
        let b: Vec<f32> = init(SIZES[1], 0.2);
        let c: Vec<f32> = init(SIZES[2], 0.3);
        Self {
            a: a.clone(),
            b: b.iter().map(|&x| f16::from_f32(x)).collect(),
            c: c.iter().map(|&x| bf16::from_f32(x)).collect(),
            grads: [
                init(SIZES[0], 1.0),
                init(SIZES[1], 2.0),
                init(SIZES[2], 3.0),
            ],
        }
    }

    /// Address and dtype of tensor `k`, and of its gradient.
    fn ptr(&mut self, k: usize) -> (*mut c_void, DType, *mut c_void) {
        let g = self.grads[k].as_mut_ptr().cast();
        match k {
            0 => (self.a.as_mut_ptr().cast(), DType::F32, g),
            1 => (self.b.as_mut_ptr().cast(), DType::F16, g),
            _ => (self.c.as_mut_ptr().cast(), DType::BF16, g),
        }
    }

    /// Every parameter's bits, for exact comparison.
    fn bits(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.a.iter().map(|x| x.to_bits()).collect();
        v.extend(self.b.iter().map(|x| x.to_bits() as u32));
        v.extend(self.c.iter().map(|x| x.to_bits() as u32));
        v
    }

    /// A loss depending on every parameter.
    fn loss(&self) -> f32 {
        let a = self.a.iter().copied();
        let b = self.b.iter().map(|x| x.to_f32());
        let c = self.c.iter().map(|x| x.to_f32());
        a.chain(b).chain(c).map(|x| (x - 0.25) * (x - 0.25)).sum()
    }
}

// ---------------------------------------------------------------------------------------
// The calls.

#[derive(Clone, Debug)]
enum Op {
    /// Register tensor `which` at `offset`, with or without its gradient (may legitimately
    /// fail: overlaps, after the first step).
    Add {
        which: usize,
        offset: u64,
        grad: bool,
    },
    /// Invalid registrations: must fail.
    AddNull,
    AddZero(usize),
    AddBadDtype(u32),
    AddMisaligned(usize),
    SetLr(f32),
    SetWd(f32),
    Begin,
    /// Feed the loss at the current parameters, or NaN.
    Feed {
        nan: bool,
    },
    FeedNullFlag,
    /// A whole zeroth-order step (begin, then feed until done), NaN at one evaluation.
    ZoStep {
        nan_at: Option<u8>,
    },
    FeedDevice,
    Abort,
    FoStep,
    NextPhase,
    Stats,
    StateSize,
    /// Save, flip one byte (or none), load back.
    SaveLoad {
        flip: Option<(usize, u8)>,
    },
    SaveTooSmall,
    LoadGarbage(Vec<u8>),
    NullOpt,
    SetStream,
    Fill(u32),
    /// Element 0 of gradient `which` set to a NaN or an infinity, or back to a finite value.
    PoisonGrad {
        which: usize,
        value: f32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let lr = prop_oneof![
        Just(f32::NAN),
        Just(-0.5f32),
        Just(f32::INFINITY),
        (0.0f32..0.1),
    ];
    prop_oneof![
        // Offsets 0 and 20 overlap every tensor at 0; the others are disjoint.
        6 => (0usize..3, prop_oneof![Just(0u64), Just(1000), Just(2000), Just(20)], any::<bool>())
            .prop_map(|(which, offset, grad)| Op::Add { which, offset, grad }),
        1 => Just(Op::AddNull),
        1 => (0usize..3).prop_map(Op::AddZero),
        1 => (3u32..1000).prop_map(Op::AddBadDtype),
        1 => (0usize..3).prop_map(Op::AddMisaligned),
        2 => lr.clone().prop_map(Op::SetLr),
        1 => lr.prop_map(Op::SetWd),
        6 => Just(Op::Begin),
        12 => any::<u8>().prop_map(|b| Op::Feed { nan: b < 8 }),
        8 => proptest::option::weighted(0.2, 0u8..8).prop_map(|nan_at| Op::ZoStep { nan_at }),
        1 => Just(Op::FeedNullFlag),
        1 => Just(Op::FeedDevice),
        2 => Just(Op::Abort),
        3 => Just(Op::FoStep),
        1 => Just(Op::NextPhase),
        1 => Just(Op::Stats),
        1 => Just(Op::StateSize),
        2 => proptest::option::of((any::<usize>(), 1u8..=255)).prop_map(|flip| Op::SaveLoad { flip }),
        1 => Just(Op::SaveTooSmall),
        1 => proptest::collection::vec(any::<u8>(), 0..128).prop_map(Op::LoadGarbage),
        1 => Just(Op::NullOpt),
        1 => Just(Op::SetStream),
        2 => (0usize..3, prop_oneof![Just(f32::NAN), Just(f32::NEG_INFINITY), Just(0.5f32)])
            .prop_map(|(which, value)| Op::PoisonGrad { which, value }),
        1 => (0u32..5).prop_map(Op::Fill),
    ]
}

fn config() -> impl Strategy<Value = hyzo_config> {
    (
        any::<u64>(),
        0usize..6,
        0u32..3,
        0u32..2,
        0u32..3,
        1u32..4,
        prop_oneof![Just((0u32, 0u32)), Just((1, 2)), Just((2, 1))],
        prop_oneof![Just(0.0f32), Just(0.5)],
        prop_oneof![Just(0.0f32), Just(0.01)],
        // fo_rule: none, or a rule of its own (spec v2 §5) with or without its own lr.
        prop_oneof![Just(None), (0u32..6, any::<bool>()).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(seed, rule, dir, est, prec, q, (fo, zo), alpha, wd, fo_rule, skip)| {
                let mut c = hyzo_config_default();
                c.seed = seed;
                c.lr = 0.01;
                c.eps = 1e-2;
                c.rule = rule as u32;
                c.direction = dir;
                c.estimator = est;
                c.precision = prec;
                c.num_directions = q;
                c.fo_steps = fo;
                c.zo_steps = zo;
                c.hybrid_alpha = alpha;
                c.weight_decay = wd;
                c.skip_nonfinite_grads = u32::from(skip);
                if let Some((r, own_lr)) = fo_rule {
                    c.fo_rule = r;
                    if own_lr {
                        c.fo_lr = 0.02;
                    }
                }
                c
            },
        )
}

fn core_config(c: &hyzo_config) -> Config {
    Config {
        seed: c.seed,
        lr: c.lr,
        eps: c.eps,
        num_directions: c.num_directions,
        direction: [
            DirectionKind::Gaussian,
            DirectionKind::Rademacher,
            DirectionKind::Sphere,
            DirectionKind::LowRank,
        ][c.direction as usize],
        estimator: [Estimator::TwoSided, Estimator::OneSided][c.estimator as usize],
        rule: Rule::ALL[c.rule as usize],
        beta1: c.beta1,
        beta2: c.beta2,
        adam_eps: c.adam_eps,
        weight_decay: c.weight_decay,
        precision: [
            Precision::Nearest,
            Precision::Stochastic,
            Precision::Compensated,
        ][c.precision as usize],
        fo_steps: c.fo_steps,
        zo_steps: c.zo_steps,
        hybrid_alpha: c.hybrid_alpha,
        fo_rule: Rule::ALL.get(c.fo_rule as usize).copied(),
        fo_lr: (!c.fo_lr.is_nan()).then_some(c.fo_lr),
        fo_weight_decay: (!c.fo_weight_decay.is_nan()).then_some(c.fo_weight_decay),
        rank: c.rank,
        skip_nonfinite_grads: c.skip_nonfinite_grads != 0,
    }
}

fn message() -> String {
    // SAFETY: NUL-terminated, valid until the next failure on this thread.
    unsafe { CStr::from_ptr(hyzo_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A failed call: a real status, a message naming the function.
#[track_caller]
fn check_failure(s: hyzo_status, func: &str) {
    assert_ne!(s, hyzo_status::HYZO_OK);
    assert_ne!(s, hyzo_status::HYZO_ERR_INTERNAL, "{}", message());
    let m = message();
    assert!(
        m.starts_with(func) && m.len() > func.len() + 2,
        "{func}: message {m:?}"
    );
}

/// Runs one sequence; returns nothing, panics on a broken property.
fn run(cfg: hyzo_config, ops: &[Op]) {
    let mut pa = Buffers::new();
    let mut pb = Buffers::new();
    let mut a: *mut hyzo_optimizer = null_mut();
    // SAFETY (whole function): the buffers outlive both optimizers, which are destroyed or
    // dropped at the end; pointers passed are valid or deliberately invalid in ways the
    // ABI rejects before dereferencing (NULL, misaligned, out-of-range).
    unsafe {
        assert_eq!(
            hyzo_optimizer_create(&cfg, 0, 0, &mut a),
            hyzo_status::HYZO_OK
        );
        let mut b = Optimizer::new(core_config(&cfg), ParamShard::new()).unwrap();
        for op in ops {
            match op {
                Op::Add {
                    which,
                    offset,
                    grad,
                } => {
                    let (p, dt, g) = pa.ptr(*which);
                    let g = if *grad { g } else { null_mut() };
                    let n = SIZES[*which] as u64;
                    let s = hyzo_optimizer_add_tensor(a, p, dt as u32, n, *offset, g, 0);
                    if s == hyzo_status::HYZO_OK {
                        let (p, dt, g) = pb.ptr(*which);
                        let spec = TensorSpec {
                            data: p as u64,
                            dtype: dt,
                            numel: n,
                            offset: *offset,
                            grad: if *grad { g as u64 } else { 0 },
                            grad_dtype: DType::F32,
                        };
                        b.add_tensor_raw(spec).unwrap();
                    } else {
                        check_failure(s, "hyzo_optimizer_add_tensor");
                    }
                }
                Op::AddNull => {
                    let s = hyzo_optimizer_add_tensor(a, null_mut(), 0, 4, 9000, null_mut(), 0);
                    check_failure(s, "hyzo_optimizer_add_tensor");
                }
                Op::AddZero(k) => {
                    let (p, dt, _) = pa.ptr(*k);
                    let s = hyzo_optimizer_add_tensor(a, p, dt as u32, 0, 9000, null_mut(), 0);
                    check_failure(s, "hyzo_optimizer_add_tensor");
                }
                Op::AddBadDtype(d) => {
                    let (p, _, g) = pa.ptr(0);
                    let s = hyzo_optimizer_add_tensor(a, p, *d, 4, 9000, null_mut(), 0);
                    check_failure(s, "hyzo_optimizer_add_tensor");
                    let s = hyzo_optimizer_add_tensor(a, p, 0, 4, 9000, g, *d);
                    check_failure(s, "hyzo_optimizer_add_tensor");
                }
                Op::AddMisaligned(k) => {
                    let (p, dt, _) = pa.ptr(*k);
                    let p = (p as *mut u8).add(1).cast();
                    let s = hyzo_optimizer_add_tensor(a, p, dt as u32, 4, 9000, null_mut(), 0);
                    check_failure(s, "hyzo_optimizer_add_tensor");
                }
                Op::SetLr(lr) => {
                    let s = hyzo_optimizer_set_lr(a, *lr);
                    if s == hyzo_status::HYZO_OK {
                        b.set_lr(*lr).unwrap();
                    } else {
                        assert!(!(lr.is_finite() && *lr >= 0.0));
                        check_failure(s, "hyzo_optimizer_set_lr");
                    }
                }
                Op::SetWd(wd) => {
                    let s = hyzo_optimizer_set_weight_decay(a, *wd);
                    if s == hyzo_status::HYZO_OK {
                        b.set_weight_decay(*wd).unwrap();
                    } else {
                        check_failure(s, "hyzo_optimizer_set_weight_decay");
                    }
                }
                Op::Begin => {
                    let s = hyzo_zo_begin(a);
                    if s == hyzo_status::HYZO_OK {
                        b.begin().unwrap();
                    } else {
                        check_failure(s, "hyzo_zo_begin");
                        assert!(b.begin().is_err(), "the reference accepts begin");
                    }
                }
                Op::Feed { nan } => {
                    let loss = if *nan { f32::NAN } else { pa.loss() };
                    let mut more: c_int = 7;
                    let s = hyzo_zo_feed(a, loss, &mut more);
                    if s == hyzo_status::HYZO_OK {
                        match b.feed(loss).unwrap() {
                            Feed::NeedsForward => assert_eq!(more, 1),
                            Feed::Done(r) => {
                                assert_eq!(more, 0);
                                let (mut l, mut sk) = (0f32, 0);
                                let s = hyzo_zo_last_loss(a, &mut l, &mut sk);
                                assert_eq!(s, hyzo_status::HYZO_OK);
                                assert_eq!(l.to_bits(), r.loss.unwrap().to_bits());
                                assert_eq!(sk != 0, r.skipped);
                            }
                        }
                    } else {
                        assert_eq!(more, 0);
                        check_failure(s, "hyzo_zo_feed");
                    }
                }
                Op::ZoStep { nan_at } => {
                    let s = hyzo_zo_begin(a);
                    if s != hyzo_status::HYZO_OK {
                        check_failure(s, "hyzo_zo_begin");
                        continue;
                    }
                    b.begin().unwrap();
                    let (mut more, mut e) = (1, 0u8);
                    while more != 0 {
                        let loss = if Some(e) == *nan_at {
                            f32::NAN
                        } else {
                            pa.loss()
                        };
                        let s = hyzo_zo_feed(a, loss, &mut more);
                        assert_eq!(s, hyzo_status::HYZO_OK, "{}", message());
                        let done = matches!(b.feed(loss).unwrap(), Feed::Done(_));
                        assert_eq!(more == 0, done);
                        assert_eq!(pa.bits(), pb.bits(), "parameters diverged inside {op:?}");
                        e += 1;
                    }
                }
                Op::FeedNullFlag => {
                    check_failure(hyzo_zo_feed(a, 1.0, null_mut()), "hyzo_zo_feed");
                }
                Op::FeedDevice => {
                    let (x, mut more) = (1f32, 0);
                    check_failure(hyzo_zo_feed_device(a, &x, &mut more), "hyzo_zo_feed_device");
                }
                Op::Abort => {
                    let s = hyzo_zo_abort(a);
                    assert_eq!(s, hyzo_status::HYZO_OK, "{}", message());
                    b.abort().unwrap();
                }
                Op::FoStep => {
                    let s = hyzo_fo_step(a);
                    if s == hyzo_status::HYZO_OK {
                        b.fo_step().unwrap();
                    } else {
                        check_failure(s, "hyzo_fo_step");
                    }
                }
                Op::NextPhase => {
                    let mut p = 9u32;
                    assert_eq!(hyzo_next_phase(a, &mut p), hyzo_status::HYZO_OK);
                    let want = match b.next_phase() {
                        Some(hyzo::Phase::FirstOrder) => 0,
                        Some(hyzo::Phase::ZerothOrder) => 1,
                        None => 2,
                    };
                    assert_eq!(p, want);
                    check_failure(hyzo_next_phase(a, null_mut()), "hyzo_next_phase");
                }
                Op::Stats => {
                    let (mut st, mut sk) = (0, 0);
                    assert_eq!(
                        hyzo_optimizer_stats(a, &mut st, &mut sk),
                        hyzo_status::HYZO_OK
                    );
                    assert_eq!((st, sk), (b.steps(), b.skipped().unwrap()));
                }
                Op::StateSize => {
                    let mut n = 0;
                    let s = hyzo_optimizer_state_size(a, &mut n);
                    if s == hyzo_status::HYZO_OK {
                        assert_eq!(n, b.state_size().unwrap());
                    } else {
                        check_failure(s, "hyzo_optimizer_state_size");
                    }
                }
                Op::SaveLoad { flip } => {
                    let mut n = 0;
                    if hyzo_optimizer_state_size(a, &mut n) != hyzo_status::HYZO_OK {
                        check_failure(hyzo_status::HYZO_ERR_BAD_STATE, "hyzo_optimizer_state_size");
                        continue;
                    }
                    let mut buf = vec![0u8; n as usize];
                    let s = hyzo_optimizer_save_state(a, buf.as_mut_ptr().cast(), n);
                    if s != hyzo_status::HYZO_OK {
                        check_failure(s, "hyzo_optimizer_save_state");
                        continue;
                    }
                    if let Some((at, x)) = flip {
                        let i = at % buf.len();
                        buf[i] ^= x;
                    }
                    let s = hyzo_optimizer_load_state(a, buf.as_ptr().cast(), n);
                    if s == hyzo_status::HYZO_OK {
                        b.load_state(&buf).unwrap();
                    } else {
                        check_failure(s, "hyzo_optimizer_load_state");
                    }
                }
                Op::SaveTooSmall => {
                    let mut buf = [0u8; 8];
                    let s = hyzo_optimizer_save_state(a, buf.as_mut_ptr().cast(), 8);
                    check_failure(s, "hyzo_optimizer_save_state");
                    check_failure(
                        hyzo_optimizer_save_state(a, null_mut(), 0),
                        "hyzo_optimizer_save_state",
                    );
                }
                Op::LoadGarbage(bytes) => {
                    let s = hyzo_optimizer_load_state(a, bytes.as_ptr().cast(), bytes.len() as u64);
                    check_failure(s, "hyzo_optimizer_load_state");
                    let s = hyzo_optimizer_load_state(a, null(), bytes.len() as u64);
                    check_failure(s, "hyzo_optimizer_load_state");
                }
                Op::NullOpt => {
                    check_failure(hyzo_zo_begin(null_mut()), "hyzo_zo_begin");
                    check_failure(hyzo_fo_step(null_mut()), "hyzo_fo_step");
                    check_failure(
                        hyzo_optimizer_set_lr(null_mut(), 0.1),
                        "hyzo_optimizer_set_lr",
                    );
                    let mut more = 0;
                    check_failure(hyzo_zo_feed(null_mut(), 0.0, &mut more), "hyzo_zo_feed");
                    hyzo_optimizer_destroy(null_mut());
                }
                Op::SetStream => {
                    let s = hyzo_optimizer_set_stream(a, 64usize as *mut c_void);
                    check_failure(s, "hyzo_optimizer_set_stream");
                }
                Op::PoisonGrad { which, value } => {
                    pa.grads[*which][0] = *value;
                    pb.grads[*which][0] = *value;
                }
                Op::Fill(kind) => {
                    let mut out = [0f32; 9];
                    let s = hyzo_directions_fill(*kind, 1, 2, 3, 4, 9, out.as_mut_ptr());
                    if *kind < 3 {
                        assert_eq!(s, hyzo_status::HYZO_OK);
                    } else {
                        check_failure(s, "hyzo_directions_fill");
                    }
                }
            }
            assert_eq!(pa.bits(), pb.bits(), "parameters diverged after {op:?}");
            let grad_bits = |b: &Buffers| -> Vec<Vec<u32>> {
                b.grads
                    .iter()
                    .map(|g| g.iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            assert_eq!(
                grad_bits(&pa),
                grad_bits(&pb),
                "gradients changed after {op:?}"
            );
        }
        assert_eq!(hyzo_zo_abort(a), hyzo_status::HYZO_OK);
        b.abort().unwrap();
        assert_eq!(
            pa.bits(),
            pb.bits(),
            "parameters diverged after the final abort"
        );
        let (mut st, mut sk) = (0, 0);
        assert_eq!(
            hyzo_optimizer_stats(a, &mut st, &mut sk),
            hyzo_status::HYZO_OK
        );
        assert_eq!((st, sk), (b.steps(), b.skipped().unwrap()));
        hyzo_optimizer_destroy(a);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_call_sequences(
        cfg in config(),
        // Most runs register tensors first, so that the steps after them do something.
        adds in proptest::collection::vec((0usize..3, proptest::bool::weighted(0.85)), 0..4),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Op> = adds
            .into_iter()
            .map(|(which, grad)| Op::Add { which, offset: 1000 * which as u64, grad })
            .collect();
        all.extend(ops);
        run(cfg, &all);
    }
}

/// Creating, using, misusing and destroying optimizers leaves no heap memory behind: the
/// live bytes after many rounds stay where they were after the first few (which warm up the
/// thread pool and the thread's error slot).
#[test]
fn no_leaks() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let round = || {
        let mut cfg = hyzo_config_default();
        cfg.rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
        cfg.precision = hyzo_precision::HYZO_PRECISION_COMPENSATED as u32;
        cfg.num_directions = 2;
        let mut p = vec![bf16::from_f32(0.5); 8192];
        let mut g = vec![0f32; 8192];
        // SAFETY: the buffers outlive the optimizer.
        unsafe {
            let mut o = null_mut();
            assert_eq!(
                hyzo_optimizer_create(&cfg, 0, 0, &mut o),
                hyzo_status::HYZO_OK
            );
            let s = hyzo_optimizer_add_tensor(
                o,
                p.as_mut_ptr().cast(),
                2,
                8192,
                0,
                g.as_mut_ptr().cast(),
                0,
            );
            assert_eq!(s, hyzo_status::HYZO_OK);
            assert_ne!(hyzo_optimizer_set_lr(o, f32::NAN), hyzo_status::HYZO_OK);
            assert_eq!(hyzo_zo_begin(o), hyzo_status::HYZO_OK);
            let mut more = 1;
            while more != 0 {
                assert_eq!(hyzo_zo_feed(o, 1.0, &mut more), hyzo_status::HYZO_OK);
            }
            assert_eq!(hyzo_fo_step(o), hyzo_status::HYZO_OK);
            let mut n = 0;
            assert_eq!(hyzo_optimizer_state_size(o, &mut n), hyzo_status::HYZO_OK);
            let mut buf = vec![0u8; n as usize];
            assert_eq!(
                hyzo_optimizer_save_state(o, buf.as_mut_ptr().cast(), n),
                hyzo_status::HYZO_OK
            );
            assert_eq!(
                hyzo_optimizer_load_state(o, buf.as_ptr().cast(), n),
                hyzo_status::HYZO_OK
            );
            assert_ne!(
                hyzo_optimizer_load_state(o, buf.as_ptr().cast(), n - 1),
                hyzo_status::HYZO_OK
            );
            assert_eq!(hyzo_zo_begin(o), hyzo_status::HYZO_OK);
            // Destroyed mid-step: the state still goes.
            hyzo_optimizer_destroy(o);
            let mut bad = hyzo_config_default();
            bad.num_directions = 0;
            assert_ne!(
                hyzo_optimizer_create(&bad, 0, 0, &mut o),
                hyzo_status::HYZO_OK
            );
        }
    };
    for _ in 0..10 {
        round();
    }
    // The counter is the process's: the test harness may allocate meanwhile (it keeps the
    // output of the test that just finished), once. A leak grows in every attempt.
    let mut growths = Vec::new();
    for _ in 0..3 {
        let warm = LIVE.load(Ordering::SeqCst);
        for _ in 0..200 {
            round();
        }
        let growth = LIVE.load(Ordering::SeqCst) - warm;
        // One leaked optimizer holds > 80 KiB of state here; 200 would be > 16 MiB.
        if growth < 64 * 1024 {
            return;
        }
        growths.push(growth);
    }
    panic!("live heap grew by {growths:?} bytes over each of three runs of 200 rounds");
}
