//! The hybrid of spec v2 §5 (separate first- and zeroth-order rule states), the skip rule
//! of §4 for projected gradients, and the state format that carries both states.

use hyzo::shard::GradMut;
use hyzo::{Config, DirectionKind, Optimizer, ParamShard, Phase, Rule};

const N: usize = 1000;
const HEADER: usize = 64;

/// `Σ (x_i − 0.01 i)² / n`: smooth, with a gradient of every sign.
fn loss(shard: &ParamShard) -> f32 {
    let x = shard.values(0).unwrap().to_f32_vec();
    (x.iter()
        .enumerate()
        .map(|(i, v)| {
            let d = *v as f64 - 0.01 * (i % 100) as f64;
            d * d
        })
        .sum::<f64>()
        / x.len() as f64) as f32
}

/// A gradient that depends on the step only, so that two optimizers at different points
/// see the same one.
fn set_grad(opt: &mut Optimizer, step: u64) {
    let GradMut::F32(g) = opt.grad_mut(0).unwrap() else {
        unreachable!()
    };
    for (i, v) in g.iter_mut().enumerate() {
        *v = ((i as f32 * 0.37 + step as f32).sin() + 0.3) * 0.1;
    }
}

fn step(opt: &mut Optimizer, phase: Phase) {
    match phase {
        Phase::FirstOrder => {
            let s = opt.steps();
            set_grad(opt, s);
            opt.fo_step().unwrap();
        }
        Phase::ZerothOrder => {
            let r = opt.zo_step(loss).unwrap();
            assert!(!r.skipped);
        }
    }
}

/// The main rule's and the first-order rule's state bytes (one f32 tensor of N elements,
/// two buffers each, as `Backend::save_state` lays them out).
fn states(opt: &mut Optimizer) -> (Vec<u8>, Vec<u8>) {
    let s = opt.save_state().unwrap();
    let body = &s[HEADER..s.len() - 4];
    assert_eq!(body.len(), 16 * N);
    (body[..8 * N].to_vec(), body[8 * N..].to_vec())
}

fn params(opt: &Optimizer) -> Vec<f32> {
    opt.params().values(0).unwrap().to_f32_vec()
}

fn optimizer<'a>(config: Config, x: &'a mut [f32], g: &'a mut [f32]) -> Optimizer<'a> {
    let mut shard = ParamShard::new();
    shard.add_with_grad(x, g, 0).unwrap();
    Optimizer::with_threads(config, shard, 2).unwrap()
}

fn paper_hybrid(fo_steps: u32, zo_steps: u32) -> Config {
    Config {
        lr: 1e-3,
        eps: 1e-3,
        seed: 11,
        ..Config::hybrid(fo_steps, zo_steps)
    }
}

#[test]
fn each_kind_of_step_touches_only_its_own_state() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(paper_hybrid(2, 3), &mut x, &mut g);
    let (mut main, mut fo) = states(&mut opt);
    for n in 0..15u64 {
        let phase = opt.next_phase().unwrap();
        step(&mut opt, phase);
        let (main_now, fo_now) = states(&mut opt);
        match phase {
            Phase::FirstOrder => {
                assert_eq!(
                    main_now, main,
                    "step {n}: a first-order step wrote the ZO state"
                );
                assert_ne!(
                    fo_now, fo,
                    "step {n}: a first-order step left its state alone"
                );
            }
            Phase::ZerothOrder => {
                assert_eq!(
                    fo_now, fo,
                    "step {n}: a zeroth-order step wrote the FO state"
                );
                assert_ne!(
                    main_now, main,
                    "step {n}: a zeroth-order step left its state alone"
                );
            }
        }
        (main, fo) = (main_now, fo_now);
    }
    // 15 steps of 2 FO + 3 ZO: 6 first-order, 9 zeroth-order updates, each its own t.
    assert_eq!(opt.fo_updates(), 6);
    assert_eq!(opt.updates().unwrap(), 9);
    assert_eq!(opt.steps(), 15);
}

/// The same sequence of first-order steps, with and without zeroth-order blocks between
/// them: the first-order state ends bit-identical, and each first-order step moves the
/// weights as far (same gradient, same t).
#[test]
fn first_order_steps_do_not_feel_the_zeroth_order_blocks() {
    let (mut x1, mut g1) = (vec![0.5f32; N], vec![0f32; N]);
    let (mut x2, mut g2) = (vec![0.5f32; N], vec![0f32; N]);
    let mut hybrid = optimizer(paper_hybrid(1, 4), &mut x1, &mut g1);
    let mut fo_only = optimizer(paper_hybrid(0, 0), &mut x2, &mut g2);
    let mut moves = Vec::new();
    for k in 0..3u64 {
        while hybrid.next_phase() == Some(Phase::ZerothOrder) {
            step(&mut hybrid, Phase::ZerothOrder);
        }
        // The same gradient for both: that of the k-th first-order step.
        let (before_h, before_f) = (params(&hybrid), params(&fo_only));
        set_grad(&mut hybrid, k);
        hybrid.fo_step().unwrap();
        set_grad(&mut fo_only, k);
        fo_only.fo_step().unwrap();
        let (after_h, after_f) = (params(&hybrid), params(&fo_only));
        assert_eq!(
            states(&mut hybrid).1,
            states(&mut fo_only).1,
            "FO state after FO step {k}"
        );
        for i in 0..N {
            let (dh, df) = (after_h[i] - before_h[i], after_f[i] - before_f[i]);
            // Equal up to the rounding of the two different weights they were added to.
            let ulp = f32::EPSILON * before_h[i].abs().max(before_f[i].abs());
            assert!(
                (dh - df).abs() <= 2.0 * ulp,
                "FO step {k}, element {i}: {dh} vs {df}"
            );
        }
        moves.push(mean_abs_move(&before_h, &after_h));
    }
    // Adam's steps on a consistent gradient move by about lr.
    for (k, m) in moves.iter().enumerate() {
        assert!(*m > 0.5e-3 && *m < 1.5e-3, "FO step {k} moved {m}");
    }
}

fn mean_abs_move(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// Why spec v2 separated the states: with one shared Adam state (v1), the zeroth-order
/// estimate (about sqrt(d/q) times a gradient per coordinate) inflates the second moment,
/// and the first-order steps after a zeroth-order block shrink.
#[test]
fn a_shared_state_starves_the_first_order_steps() {
    let run = |fo_rule: Option<Rule>| {
        let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
        let config = Config {
            rule: Rule::AdamW,
            fo_rule,
            ..paper_hybrid(1, 10)
        };
        let mut opt = optimizer(config, &mut x, &mut g);
        for _ in 0..11 {
            let p = opt.next_phase().unwrap();
            step(&mut opt, p);
        }
        let before = params(&opt);
        step(&mut opt, Phase::FirstOrder);
        mean_abs_move(&before, &params(&opt))
    };
    let shared = run(None);
    let separate = run(Some(Rule::AdamW));
    assert!(
        shared < 0.5 * separate,
        "shared state {shared:e} vs separate {separate:e}"
    );
}

#[test]
fn first_order_learning_rate_and_decay_are_their_own() {
    let (mut x, mut g) = (vec![1.0f32; N], vec![0f32; N]);
    let config = Config {
        rule: Rule::Sgd,
        lr: 0.0,
        fo_rule: Some(Rule::Sgd),
        fo_lr: Some(0.5),
        fo_weight_decay: Some(0.25),
        ..Config::default()
    };
    let mut opt = optimizer(config, &mut x, &mut g);
    let before = params(&opt);
    step(&mut opt, Phase::ZerothOrder); // lr 0: only the perturbations' rounding
    let after_zo = params(&opt);
    for (a, b) in before.iter().zip(&after_zo) {
        assert!((a - b).abs() <= 2.0 * f32::EPSILON, "{a} {b}");
    }
    let s = opt.steps();
    set_grad(&mut opt, s);
    let grad = match opt.grad_mut(0).unwrap() {
        GradMut::F32(g) => g.to_vec(),
        _ => unreachable!(),
    };
    opt.fo_step().unwrap();
    for ((x0, x1), g) in after_zo.iter().zip(params(&opt)).zip(grad) {
        let want = x0 - 0.5 * (g + 0.25 * x0);
        assert!((x1 - want).abs() <= 4.0 * f32::EPSILON, "{x1} vs {want}");
    }
    // Schedulers change them between steps, and NaN-free bounds are checked.
    opt.set_fo_lr(Some(0.1)).unwrap();
    assert!(opt.set_fo_lr(Some(f32::NAN)).is_err());
    assert!(opt.set_fo_weight_decay(Some(-1.0)).is_err());
    assert_eq!(opt.config().fo_lr, Some(0.1));
}

#[test]
fn stateless_rules_allocate_nothing() {
    let (mut x, mut g) = (vec![0f32; N], vec![0f32; N]);
    let config = Config {
        rule: Rule::Sign,
        fo_rule: Some(Rule::Sgd),
        ..Config::default()
    };
    let mut opt = optimizer(config, &mut x, &mut g);
    assert_eq!(opt.state_size().unwrap(), (HEADER + 4) as u64);
    let (mut x, mut g) = (vec![0f32; N], vec![0f32; N]);
    let mut paper = optimizer(paper_hybrid(1, 1), &mut x, &mut g);
    // AdamW + AdaZO: four fp32 buffers, 16 bytes per parameter.
    assert_eq!(paper.state_size().unwrap(), (HEADER + 4 + 16 * N) as u64);
}

/// Runs one zeroth-order step whose evaluations return `losses` in turn, and checks that it
/// was skipped: the rule states did not move (only the counters in the header did) and the
/// weights came back within the rounding of the passes (nearest f32, spec v2 §4).
fn assert_step_skipped(opt: &mut Optimizer, losses: &[f32]) {
    let before = params(opt);
    let state = opt.save_state().unwrap();
    let mut next = losses.iter().cycle();
    let report = opt.zo_step(|_| *next.next().unwrap()).unwrap();
    assert!(report.skipped, "losses {losses:?}");
    let after = opt.save_state().unwrap();
    assert_eq!(
        after[HEADER..after.len() - 4],
        state[HEADER..state.len() - 4]
    );
    assert!(params(opt)
        .iter()
        .zip(&before)
        .all(|(a, b)| (a - b).abs() <= 2.0 * f32::EPSILON * b.abs()));
}

/// Spec v2 §4: finite losses whose projected gradient is not finite (a tiny eps) skip the
/// step like a non-finite loss; nothing is written into the weights.
#[test]
fn a_non_finite_projected_gradient_skips_the_step() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let config = Config {
        eps: 1e-45,
        ..paper_hybrid(0, 0)
    };
    let mut opt = optimizer(config, &mut x, &mut g);
    // Finite losses, (L+ − L−) / 2μ = −1 / 2.8e-45 = −inf.
    assert_step_skipped(&mut opt, &[1.0, 2.0]);
    assert_eq!(opt.skipped().unwrap(), 1);
    assert_eq!(opt.updates().unwrap(), 0);
    assert_eq!(opt.steps(), 1);
}

#[test]
fn sphere_norms_too_small_for_f32_are_refused() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let config = Config {
        direction: DirectionKind::Sphere,
        ..Config::default()
    };
    let mut opt = optimizer(config, &mut x, &mut g);
    let before = params(&opt);
    let e = opt.begin_with_sq_norms(&[4.9e-324]).unwrap_err();
    assert!(e.message().contains("too small"), "{e}");
    assert!(!opt.in_step());
    assert_eq!(params(&opt), before);
}

/// Run `steps` scheduled steps.
fn run(opt: &mut Optimizer, steps: usize) {
    for _ in 0..steps {
        let p = opt.next_phase().unwrap();
        step(opt, p);
    }
}

#[test]
fn save_and_load_carry_both_states_and_resume_bit_identically() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(paper_hybrid(2, 2), &mut x, &mut g);
    run(&mut opt, 5);
    let saved = opt.save_state().unwrap();
    let at_save = params(&opt);
    run(&mut opt, 6);
    let want = params(&opt);
    let (want_main, want_fo) = states(&mut opt);
    drop(opt);

    let (mut x2, mut g2) = (at_save, vec![0f32; N]);
    let mut resumed = optimizer(paper_hybrid(2, 2), &mut x2, &mut g2);
    resumed.load_state(&saved).unwrap();
    assert_eq!(resumed.steps(), 5);
    assert_eq!(resumed.fo_updates(), 3);
    assert_eq!(resumed.updates().unwrap(), 2);
    run(&mut resumed, 6);
    assert_eq!(params(&resumed), want);
    assert_eq!(states(&mut resumed), (want_main, want_fo));
}

#[test]
fn corrupted_truncated_or_foreign_states_change_nothing() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(paper_hybrid(1, 1), &mut x, &mut g);
    run(&mut opt, 3);
    let good = opt.save_state().unwrap();
    run(&mut opt, 2);
    let current = opt.save_state().unwrap();
    let check_unchanged = |opt: &mut Optimizer| {
        assert_eq!(opt.save_state().unwrap(), current);
    };
    // Every bit of the header and trailer, and a sample of the body.
    let bits: Vec<usize> = (0..8 * HEADER)
        .chain((8 * HEADER..8 * (good.len() - 4)).step_by(997))
        .chain(8 * (good.len() - 4)..8 * good.len())
        .collect();
    for bit in bits {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let e = opt.load_state(&bad).unwrap_err();
        assert!(e.message().starts_with("state:"), "bit {bit}: {e}");
    }
    check_unchanged(&mut opt);
    for len in [0, 7, 16, HEADER, good.len() - 1] {
        assert!(opt.load_state(&good[..len]).is_err(), "truncated to {len}");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(opt.load_state(&longer).is_err());
    let mut future = good.clone();
    future[8] = 3;
    let e = opt.load_state(&future).unwrap_err();
    assert!(e.message().contains("format version 3"), "{e}");
    check_unchanged(&mut opt);
    // Another first-order rule: another fingerprint.
    let (mut x2, mut g2) = (vec![0.5f32; N], vec![0f32; N]);
    let other = Config {
        fo_rule: Some(Rule::Signum),
        ..paper_hybrid(1, 1)
    };
    let mut o2 = optimizer(other, &mut x2, &mut g2);
    assert!(o2.load_state(&good).is_err());
    opt.load_state(&good).unwrap();
}

/// A state of hyzo 0.1 (format 1: one shared state, no checksum) loads into an optimizer
/// without a first-order rule, and is refused with the reason by one that has one.
#[test]
fn format_1_states_load_where_they_mean_the_same() {
    let config = Config {
        rule: Rule::AdamW,
        fo_steps: 1,
        zo_steps: 2,
        ..paper_hybrid(1, 2)
    };
    let single = Config {
        fo_rule: None,
        ..config.clone()
    };
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(single.clone(), &mut x, &mut g);
    run(&mut opt, 4);
    let v2 = opt.save_state().unwrap();
    let body = &v2[HEADER..v2.len() - 4];
    let u64_at = |i: usize| u64::from_le_bytes(v2[i..i + 8].try_into().unwrap());
    let mut v1 = Vec::new();
    v1.extend_from_slice(b"HYZOSTAT");
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&(body.len() as u32 ^ 0x5a5a_5a5a).to_le_bytes());
    for at in [16, 24, 32, 48] {
        v1.extend_from_slice(&u64_at(at).to_le_bytes()); // fingerprint, step, updates, skipped
    }
    v1.extend_from_slice(body);
    let at_save = params(&opt);
    run(&mut opt, 3);
    let want = params(&opt);
    drop(opt);

    let (mut x2, mut g2) = (at_save.clone(), vec![0f32; N]);
    let mut resumed = optimizer(single, &mut x2, &mut g2);
    resumed.load_state(&v1).unwrap();
    run(&mut resumed, 3);
    assert_eq!(params(&resumed), want);

    let (mut x3, mut g3) = (at_save, vec![0f32; N]);
    let mut hybrid = optimizer(config, &mut x3, &mut g3);
    let e = hybrid.load_state(&v1).unwrap_err();
    assert!(e.message().contains("format 1"), "{e}");
}

#[test]
fn state_files_are_written_atomically_and_checked_before_loading() {
    let dir = std::env::temp_dir().join(format!("hyzo-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.state");
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(paper_hybrid(1, 1), &mut x, &mut g);
    run(&mut opt, 3);
    opt.save_state_file(&path).unwrap();
    let in_memory = opt.save_state().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), in_memory);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left"
    );
    run(&mut opt, 2);
    let current = opt.save_state().unwrap();
    // A damaged file changes nothing.
    let mut bad = in_memory.clone();
    bad[HEADER + 5] ^= 0x10;
    let bad_path = dir.join("bad.state");
    std::fs::write(&bad_path, &bad).unwrap();
    let e = opt.load_state_file(&bad_path).unwrap_err();
    assert!(e.message().contains("checksum"), "{e}");
    std::fs::write(&bad_path, &in_memory[..in_memory.len() / 2]).unwrap();
    assert!(opt.load_state_file(&bad_path).is_err());
    assert_eq!(opt.save_state().unwrap(), current);
    let e = opt.load_state_file(&dir.join("missing")).unwrap_err();
    assert!(matches!(e, hyzo::Error::Io(_)), "{e:?}");
    // A directory that does not exist: an I/O error, nothing written.
    assert!(matches!(
        opt.save_state_file(&dir.join("no/such/dir/x")),
        Err(hyzo::Error::Io(_))
    ));
    opt.load_state_file(&path).unwrap();
    assert_eq!(opt.save_state().unwrap(), in_memory);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A seeded displacement: `scale · z(seed, step, d)` at the global indices, whatever the
/// sharding, and nothing else changes.
#[test]
fn displace_adds_a_regenerable_direction_once() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut whole = optimizer(paper_hybrid(1, 1), &mut x, &mut g);
    let state = whole.save_state().unwrap();
    whole.displace(77, 3, 1, 0.01).unwrap();
    assert_eq!(
        whole.save_state().unwrap(),
        state,
        "state and counters unchanged"
    );
    let got = params(&whole);
    let mut z = vec![0f32; N];
    hyzo::fill::fill(
        DirectionKind::Gaussian,
        hyzo::DirectionId::new(77, 3, 1),
        0,
        &mut z,
    );
    for i in 0..N {
        assert_eq!(got[i], 0.5 + 0.01 * z[i], "element {i}");
    }
    // Two shards (offsets 0 and 600) displace exactly like the whole.
    let (mut a, mut b) = (vec![0.5f32; 600], vec![0.5f32; N - 600]);
    let mut shard = ParamShard::new();
    shard.add(&mut a, 0).unwrap();
    let mut first = Optimizer::new(Config::default(), shard).unwrap();
    first.displace(77, 3, 1, 0.01).unwrap();
    let mut shard = ParamShard::new();
    shard.add(&mut b, 600).unwrap();
    let mut second = Optimizer::new(Config::default(), shard).unwrap();
    second.displace(77, 3, 1, 0.01).unwrap();
    drop((first, second));
    assert_eq!([a, b].concat(), got);
    assert!(whole.displace(1, 0, 0, f32::NAN).is_err());
}

/// Finite losses so far apart that the estimate would be ~1e38: Adam's second moment would
/// become Inf for good (and SGD would write 1e34 into the weights). Skipped like a
/// non-finite one; a large but sane estimate is applied.
#[test]
fn an_estimate_beyond_the_bound_skips_the_step() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let config = Config {
        rule: Rule::AdamW,
        ..paper_hybrid(0, 0)
    };
    let mut opt = optimizer(config, &mut x, &mut g);
    let before = params(&opt);
    assert_step_skipped(&mut opt, &[1e35, 0.0]);
    // (L+ − L−) / 2μ = 5e9: large, sane, applied.
    let mut losses = [1e7f32, 0.0].into_iter();
    let report = opt.zo_step(|_| losses.next().unwrap()).unwrap();
    assert!(!report.skipped);
    assert_ne!(params(&opt), before);
    assert!(params(&opt).iter().all(|v| v.is_finite()));
}

/// Puts `bad` into element `at` of the gradient.
fn poison_grad(opt: &mut Optimizer, at: usize, bad: f32) {
    let GradMut::F32(g) = opt.grad_mut(0).unwrap() else {
        unreachable!()
    };
    g[at] = bad;
}

/// A first-order step whose gradient holds a NaN or an infinity is skipped, as
/// `torch.amp.GradScaler` skips it: weights and both rule states unchanged, the first-order
/// `t` unchanged, the step counted as skipped; the schedule moves on.
#[test]
fn a_non_finite_gradient_skips_the_first_order_step() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
        let mut opt = optimizer(paper_hybrid(2, 1), &mut x, &mut g);
        step(&mut opt, Phase::FirstOrder);
        let (before, states_before) = (params(&opt), states(&mut opt));
        set_grad(&mut opt, 1);
        poison_grad(&mut opt, 123, bad);
        opt.fo_step().unwrap();
        assert_eq!(params(&opt), before, "{bad}: weights changed");
        assert_eq!(
            states(&mut opt),
            states_before,
            "{bad}: a rule state changed"
        );
        assert_eq!(
            (opt.steps(), opt.skipped().unwrap(), opt.fo_updates()),
            (2, 1, 1)
        );
        assert_eq!(opt.next_phase(), Some(Phase::ZerothOrder));
        // The first-order t did not move: the next good step is the second update.
        step(&mut opt, Phase::ZerothOrder);
        step(&mut opt, Phase::FirstOrder);
        assert_eq!(opt.fo_updates(), 2);
        assert!(params(&opt).iter().all(|v| v.is_finite()));
    }
}

/// A zeroth-order step mixing in a gradient (`α∇ + (1 − α)ĝ`) that holds a NaN is skipped
/// like one with a NaN loss: the same restore, nothing updated.
#[test]
fn a_non_finite_gradient_skips_the_mixed_step() {
    let config = Config {
        hybrid_alpha: 0.5,
        rule: Rule::AdamW,
        ..paper_hybrid(0, 0)
    };
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(config.clone(), &mut x, &mut g);
    set_grad(&mut opt, 0);
    poison_grad(&mut opt, 7, f32::NAN);
    let state = opt.save_state().unwrap();
    let report = opt.zo_step(loss).unwrap();
    assert!(report.skipped);
    let after = opt.save_state().unwrap();
    assert_eq!(
        after[HEADER..after.len() - 4],
        state[HEADER..state.len() - 4]
    );
    assert_eq!((opt.skipped().unwrap(), opt.updates().unwrap()), (1, 0));
    // The weights are where a step skipped for its loss leaves them.
    let (mut y, mut h) = (vec![0.5f32; N], vec![0f32; N]);
    let mut nan_loss = optimizer(config, &mut y, &mut h);
    set_grad(&mut nan_loss, 0);
    assert!(nan_loss.zo_step(|_| f32::NAN).unwrap().skipped);
    assert_eq!(params(&opt), params(&nan_loss));
}

/// `skip_nonfinite_grads: false` is torch.optim's behaviour: the rule applies the gradient
/// as it is, NaN included, and nothing is counted as skipped.
#[test]
fn skipping_non_finite_gradients_can_be_turned_off() {
    let config = Config {
        skip_nonfinite_grads: false,
        ..paper_hybrid(0, 0)
    };
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(config, &mut x, &mut g);
    set_grad(&mut opt, 0);
    poison_grad(&mut opt, 5, f32::NAN);
    let report = opt.fo_step().unwrap();
    assert!(!report.skipped);
    assert!(params(&opt)[5].is_nan());
    assert_eq!((opt.skipped().unwrap(), opt.fo_updates()), (0, 1));
    // The default skips, and says so.
    let (mut y, mut h) = (vec![0.5f32; N], vec![0f32; N]);
    let mut skipping = optimizer(paper_hybrid(0, 0), &mut y, &mut h);
    set_grad(&mut skipping, 0);
    poison_grad(&mut skipping, 5, f32::INFINITY);
    assert!(skipping.fo_step().unwrap().skipped);
}

/// A masked first-order step reads only the gradients of the tensors it updates: a NaN in
/// the gradient of a tensor left out does not skip it.
#[test]
fn a_masked_step_checks_only_the_gradients_it_reads() {
    let (mut a, mut ga) = (vec![0.5f32; 64], vec![0.1f32; 64]);
    let (mut b, mut gb) = (vec![0.5f32; 64], vec![f32::NAN; 64]);
    let mut shard = ParamShard::new();
    shard.add_with_grad(&mut a, &mut ga, 0).unwrap();
    shard.add_with_grad(&mut b, &mut gb, 64).unwrap();
    let mut opt = Optimizer::with_threads(paper_hybrid(0, 0), shard, 1).unwrap();
    assert!(!opt.fo_step_masked(&[true, false]).unwrap().skipped);
    assert!(opt.fo_step_masked(&[true, true]).unwrap().skipped);
    assert_eq!(opt.skipped().unwrap(), 1);
    drop(opt);
    assert!(a.iter().all(|v| *v < 0.5) && b.iter().all(|v| *v == 0.5));
}

/// A finite displacement so large that it would make parameters non-finite is refused and
/// changes nothing (as the step's own overflow rule keeps Inf out of the weights); a large
/// one that stays finite is applied.
#[test]
fn a_displacement_that_would_overflow_is_refused() {
    let (mut x, mut g) = (vec![0.5f32; N], vec![0f32; N]);
    let mut opt = optimizer(paper_hybrid(1, 1), &mut x, &mut g);
    let state = opt.save_state().unwrap();
    let e = opt.displace(1, 0, 0, 3e38).unwrap_err();
    assert!(e.message().contains("non-finite"), "{e}");
    assert_eq!(params(&opt), vec![0.5; N]);
    assert_eq!(opt.save_state().unwrap(), state);
    opt.displace(1, 0, 0, 1e37).unwrap();
    assert!(params(&opt).iter().all(|v| v.is_finite()));
    // f16 overflows past 65504: a scale of 3e4 reaches it where |z| > 2.2, 1e3 never does.
    let mut h = vec![half::f16::from_f32(0.5); N];
    let mut shard = ParamShard::new();
    shard.add(&mut h, 0).unwrap();
    let config = Config {
        precision: hyzo::Precision::Compensated,
        ..Config::default()
    };
    let mut half_opt = Optimizer::with_threads(config, shard, 1).unwrap();
    let state = half_opt.save_state().unwrap();
    assert!(half_opt.displace(1, 0, 0, 3e4).is_err());
    assert_eq!(half_opt.save_state().unwrap(), state, "lo unchanged");
    half_opt.displace(1, 0, 0, 1e3).unwrap();
    drop(half_opt);
    assert!(h.iter().all(|v| v.is_finite()) && h.iter().any(|v| v.to_f32().abs() > 1000.0));
}
