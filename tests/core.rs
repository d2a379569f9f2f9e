//! The spec on the CPU: directions, shards, the step protocol, rules and precision modes,
//! checked against naive scalar formulas.

use half::{bf16, f16};
use hyzo::direction::{direction_at, fill_scalar, DirectionId, DirectionKind};
use hyzo::fill::fill;
use hyzo::rules::{self, Rule, RuleParams};
use hyzo::{
    Config, DType, Element, Error, Estimator, Feed, Optimizer, ParamShard, Phase, Precision,
};
use proptest::prelude::*;

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn losses(seed: u64, n: usize) -> Vec<f32> {
    let mut r = lcg(seed);
    (0..n).map(|_| 1.0 + r()).collect()
}

/// Runs `steps` ZO steps fed with synthetic losses; returns the parameters.
fn run_zo<T: Element>(
    cfg: &Config,
    init: &[T],
    offset: u64,
    steps: usize,
    threads: usize,
) -> Vec<T> {
    let mut p = init.to_vec();
    {
        let mut shard = ParamShard::new();
        shard.add(&mut p, offset).unwrap();
        let mut opt = Optimizer::with_threads(cfg.clone(), shard, threads).unwrap();
        let per = cfg.evaluations_per_step() as usize;
        for s in 0..steps {
            let ls = losses(s as u64, per);
            opt.begin().unwrap();
            for (i, l) in ls.iter().enumerate() {
                let f = opt.feed(*l).unwrap();
                assert_eq!(f == Feed::NeedsForward, i + 1 < per);
            }
        }
    }
    p
}

fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

#[test]
fn subranges_equal_the_full_vector() {
    for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
        let id = DirectionId::new(0x0123_4567_89ab_cdef, 11, 2);
        let base = (1u64 << 32) - 300;
        let mut full = vec![0f32; 5000];
        fill(kind, id, base, &mut full);
        let mut r = lcg(7);
        for _ in 0..200 {
            let a = ((r() + 1.0) * 2400.0) as usize;
            let n = ((r() + 1.0) * 1200.0) as usize;
            let n = n.min(5000 - a);
            let mut part = vec![0f32; n];
            fill(kind, id, base + a as u64, &mut part);
            assert_eq!(
                bits(&part),
                bits(&full[a..a + n]),
                "{kind:?} [{a}, {})",
                a + n
            );
        }
        let mut scalar = vec![0f32; 5000];
        fill_scalar(kind, id, base, &mut scalar);
        assert_eq!(bits(&scalar), bits(&full));
    }
}

#[test]
fn shards_perturb_like_the_whole_model() {
    let n = 10_007usize;
    let base = (1u64 << 32) + 5;
    let mut r = lcg(3);
    let init: Vec<bf16> = (0..n).map(|_| bf16::from_f32(r())).collect();
    for (kind, estimator, q, rule) in [
        (DirectionKind::Gaussian, Estimator::TwoSided, 3, Rule::AdamW),
        (
            DirectionKind::Rademacher,
            Estimator::OneSided,
            2,
            Rule::Signum,
        ),
        (DirectionKind::Sphere, Estimator::TwoSided, 2, Rule::Sgd),
    ] {
        let cfg = Config {
            seed: 99,
            lr: 1e-2,
            num_directions: q,
            direction: kind,
            estimator,
            rule,
            precision: Precision::Compensated,
            ..Config::default()
        };
        let whole = run_zo(&cfg, &init, base, 4, 2);
        // Random cuts into shards held by one optimizer, at their global offsets.
        let mut cuts = vec![0, 1, 130, 131, 4096, 7001, n];
        cuts.sort();
        cuts.dedup();
        let mut pieces: Vec<Vec<bf16>> =
            cuts.windows(2).map(|w| init[w[0]..w[1]].to_vec()).collect();
        {
            let mut shard = ParamShard::new();
            // Register out of order: order must not matter.
            let mut order: Vec<usize> = (0..pieces.len()).collect();
            order.reverse();
            let mut refs: Vec<Option<&mut Vec<bf16>>> = pieces.iter_mut().map(Some).collect();
            for i in order {
                let v = refs[i].take().unwrap();
                shard.add(v.as_mut_slice(), base + cuts[i] as u64).unwrap();
            }
            let mut opt = Optimizer::with_threads(cfg.clone(), shard, 3).unwrap();
            let per = cfg.evaluations_per_step() as usize;
            for s in 0..4 {
                let ls = losses(s as u64, per);
                opt.begin().unwrap();
                for l in ls {
                    opt.feed(l).unwrap();
                }
            }
        }
        let joined: Vec<bf16> = pieces.concat();
        assert_eq!(bits(&joined), bits(&whole), "{kind:?} {estimator:?}");
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut r = lcg(5);
    let init: Vec<f16> = (0..100_003).map(|_| f16::from_f32(r())).collect();
    let cfg = Config {
        num_directions: 2,
        rule: Rule::AdaZo,
        precision: Precision::Stochastic,
        lr: 1e-3,
        ..Config::default()
    };
    let one = run_zo(&cfg, &init, 17, 3, 1);
    for t in [2, 3, 8] {
        assert_eq!(
            bits(&run_zo(&cfg, &init, 17, 3, t)),
            bits(&one),
            "{t} threads"
        );
    }
}

/// The spec's pass sequence, written naively per element with the scalar generator.
fn naive_zo_step(
    cfg: &Config,
    theta: &mut [f32],
    offset: u64,
    step: u32,
    ls: &[f32],
    state: &mut [(f32, f32)],
    t: u64,
) {
    let q = cfg.num_directions;
    let kind = cfg.direction;
    let z = |d: u32, j: u64| direction_at(kind, DirectionId::new(cfg.seed, step, d), j);
    let mu = cfg.eps;
    let g: Vec<f32> = match cfg.estimator {
        Estimator::TwoSided => (0..q as usize)
            .map(|d| (ls[2 * d] - ls[2 * d + 1]) / (2.0 * mu))
            .collect(),
        Estimator::OneSided => (0..q as usize).map(|d| (ls[d + 1] - ls[0]) / mu).collect(),
    };
    let p = RuleParams::new(
        cfg.rule,
        cfg.lr,
        cfg.beta1,
        cfg.beta2,
        cfg.adam_eps,
        cfg.weight_decay,
        t,
    );
    for (i, th) in theta.iter_mut().enumerate() {
        let j = offset + i as u64;
        let mut x = *th;
        // Perturbation passes, each rounded (f32 here: exact op sequence).
        match cfg.estimator {
            Estimator::TwoSided => {
                x += mu * z(0, j);
                for d in 0..q {
                    x += -2.0 * mu * z(d, j);
                    if d + 1 < q {
                        x += mu * z(d, j);
                        x += mu * z(d + 1, j);
                    }
                }
                x += mu * z(q - 1, j);
            }
            Estimator::OneSided => {
                x += mu * z(0, j);
                for d in 1..q {
                    x += -mu * z(d - 1, j);
                    x += mu * z(d, j);
                }
                x += -mu * z(q - 1, j);
            }
        }
        let mut gh = 0f32;
        for d in 0..q {
            gh += g[d as usize] / q as f32 * z(d, j);
        }
        let (m, v) = &mut state[i];
        *th = rules::apply(&p, x, gh, m, v);
    }
}

#[test]
fn q_directions_equal_the_naive_estimator() {
    for rule in Rule::ALL {
        for (estimator, q) in [
            (Estimator::TwoSided, 1),
            (Estimator::TwoSided, 4),
            (Estimator::OneSided, 3),
        ] {
            for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
                let cfg = Config {
                    seed: 1234,
                    lr: 0.01,
                    eps: 0.01,
                    num_directions: q,
                    direction: kind,
                    estimator,
                    rule,
                    weight_decay: 0.1,
                    ..Config::default()
                };
                let mut r = lcg(rule as u64);
                let init: Vec<f32> = (0..777).map(|_| r()).collect();
                let got = run_zo(&cfg, &init, 1 << 33, 3, 2);
                let mut want = init.clone();
                let mut state = vec![(0f32, 0f32); init.len()];
                for s in 0..3u32 {
                    let ls = losses(s as u64, cfg.evaluations_per_step() as usize);
                    naive_zo_step(&cfg, &mut want, 1 << 33, s, &ls, &mut state, s as u64 + 1);
                }
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                        "{rule:?} {estimator:?} q={q} {kind:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Naive spec formulas of §5 in f64, for comparison with `rules::apply`.
fn rule_f64(
    rule: Rule,
    p: &RuleParams,
    t: u64,
    theta: f64,
    g: f64,
    m: &mut f64,
    v: &mut f64,
) -> f64 {
    let (b1, b2, lr, wd, eps) = (
        p.beta1 as f64,
        p.beta2 as f64,
        p.lr as f64,
        p.weight_decay as f64,
        p.eps as f64,
    );
    let sign = |x: f64| {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    match rule {
        Rule::Sgd => theta - lr * (g + wd * theta),
        Rule::Momentum => {
            *m = b1 * *m + g;
            theta - lr * (*m + wd * theta)
        }
        Rule::Sign => theta - lr * (sign(g) + wd * theta),
        Rule::Signum => {
            *m = b1 * *m + (1.0 - b1) * g;
            theta - lr * (sign(*m) + wd * theta)
        }
        Rule::AdamW | Rule::AdaZo => {
            *m = b1 * *m + (1.0 - b1) * g;
            let s = if rule == Rule::AdamW { g } else { *m };
            *v = b2 * *v + (1.0 - b2) * s * s;
            let mh = *m / (1.0 - b1.powi(t as i32));
            let vh = *v / (1.0 - b2.powi(t as i32));
            theta - lr * (mh / (vh.sqrt() + eps) + wd * theta)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_rule_matches_its_formula(
        rule_i in 0usize..6,
        theta in -4.0f32..4.0,
        grads in proptest::collection::vec(-10.0f32..10.0, 1..6),
        lr in 0.0f32..0.1,
        wd in 0.0f32..0.5,
    ) {
        let rule = Rule::ALL[rule_i];
        let (mut m, mut v, mut m64, mut v64) = (0f32, 0f32, 0f64, 0f64);
        let (mut th, mut th64) = (theta, theta as f64);
        for (i, g) in grads.iter().enumerate() {
            let t = i as u64 + 1;
            let p = RuleParams::new(rule, lr, 0.9, 0.99, 1e-8, wd, t);
            th = rules::apply(&p, th, *g, &mut m, &mut v);
            th64 = rule_f64(rule, &p, t, th64, *g as f64, &mut m64, &mut v64);
        }
        prop_assert!((th as f64 - th64).abs() <= 1e-5 * (1.0 + th64.abs()), "{:?}: {} vs {}", rule, th, th64);
    }

    #[test]
    fn fo_step_applies_the_rule_for_every_dtype(
        rule_i in 0usize..6,
        dtype_i in 0usize..3,
        grad_dtype_i in 0usize..3,
        n in 1usize..300,
        offset in 0u64..(1u64 << 40),
        seed in any::<u64>(),
    ) {
        let rule = Rule::ALL[rule_i];
        let cfg = Config { rule, lr: 0.05, weight_decay: 0.01, seed, ..Config::default() };
        let mut r = lcg(seed);
        let vals: Vec<f32> = (0..n).map(|_| r()).collect();
        let gvals: Vec<f32> = (0..n).map(|_| r()).collect();
        fn go<T: Element, G: Element>(cfg: &Config, vals: &[f32], gvals: &[f32], offset: u64) -> (Vec<f32>, Vec<f32>) {
            let mut p: Vec<T> = vals.iter().map(|v| T::from_f32(*v)).collect();
            let mut g: Vec<G> = gvals.iter().map(|v| G::from_f32(*v)).collect();
            let start: Vec<f32> = p.iter().map(|x| x.to_f32()).collect();
            let gf: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
            {
                let mut shard = ParamShard::new();
                shard.add_with_grad(&mut p, &mut g, offset).unwrap();
                let mut opt = Optimizer::new(cfg.clone(), shard).unwrap();
                opt.fo_step().unwrap();
                opt.fo_step().unwrap();
            }
            let mut want = Vec::new();
            let mut state = (0f32, 0f32);
            for (i, x0) in start.iter().enumerate() {
                let mut x = *x0;
                state = (0.0, 0.0);
                for t in 1..=2 {
                    let rp = RuleParams::new(cfg.rule, cfg.lr, cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.weight_decay, t);
                    x = T::from_f32(rules::apply(&rp, x, gf[i], &mut state.0, &mut state.1)).to_f32();
                }
                want.push(x);
            }
            let _ = state;
            (p.iter().map(|x| x.to_f32()).collect(), want)
        }
        let (got, want) = match (DType::from_u32(dtype_i as u32).unwrap(), DType::from_u32(grad_dtype_i as u32).unwrap()) {
            (DType::F32, DType::F32) => go::<f32, f32>(&cfg, &vals, &gvals, offset),
            (DType::F32, DType::F16) => go::<f32, f16>(&cfg, &vals, &gvals, offset),
            (DType::F32, DType::BF16) => go::<f32, bf16>(&cfg, &vals, &gvals, offset),
            (DType::F16, DType::F32) => go::<f16, f32>(&cfg, &vals, &gvals, offset),
            (DType::F16, DType::F16) => go::<f16, f16>(&cfg, &vals, &gvals, offset),
            (DType::F16, DType::BF16) => go::<f16, bf16>(&cfg, &vals, &gvals, offset),
            (DType::BF16, DType::F32) => go::<bf16, f32>(&cfg, &vals, &gvals, offset),
            (DType::BF16, DType::F16) => go::<bf16, f16>(&cfg, &vals, &gvals, offset),
            (DType::BF16, DType::BF16) => go::<bf16, bf16>(&cfg, &vals, &gvals, offset),
        };
        prop_assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn perturb_then_restore_stays_within_the_precision_bound(
        dtype_i in 0usize..3,
        prec_i in 0usize..3,
        q in 1u32..4,
        n in 1usize..2000,
        offset in 0u64..(1u64 << 36),
        seed in any::<u64>(),
        mu_exp in -4i32..-1,
    ) {
        let precision = [Precision::Nearest, Precision::Stochastic, Precision::Compensated][prec_i];
        // lr = 0: the update pass only restores (rule applied with η = 0).
        let cfg = Config { lr: 0.0, eps: 10f32.powi(mu_exp), num_directions: q, precision, seed, ..Config::default() };
        let mut r = lcg(seed ^ 1);
        let vals: Vec<f32> = (0..n).map(|_| r() * 3.0).collect();
        fn go<T: Element>(cfg: &Config, vals: &[f32], offset: u64) -> (Vec<f32>, Vec<f32>) {
            let init: Vec<T> = vals.iter().map(|v| T::from_f32(*v)).collect();
            let out = run_zo(cfg, &init, offset, 1, 2);
            (init.iter().map(|x| x.to_f32()).collect(), out.iter().map(|x| x.to_f32()).collect())
        }
        let dtype = DType::from_u32(dtype_i as u32).unwrap();
        let mu = cfg.eps;
        let max_z: Vec<f32> = (0..n as u64)
            .map(|i| (0..q).map(|d| direction_at(DirectionKind::Gaussian, DirectionId::new(seed, 0, d), offset + i).abs()).fold(0f32, f32::max))
            .collect();
        let (before, after) = match dtype {
            DType::F32 => go::<f32>(&cfg, &vals, offset),
            DType::F16 => go::<f16>(&cfg, &vals, offset),
            DType::BF16 => go::<bf16>(&cfg, &vals, offset),
        };
        // Nearest: each of the 2q + 1 passes rounds by at most half an ulp of the perturbed
        // value, |θ| + 2μ max|z| at most. Compensated: hi + lo returns to within 2^-9 ulp per
        // pass plus f32 rounding (tests/compensated.rs checks that bound), so the stored value
        // is within about half an ulp of the start's own (an ulp here).
        let ulp_bits = match dtype { DType::F32 => 23, DType::F16 => 10, DType::BF16 => 7 };
        let passes = (2 * q + 1) as f32;
        for ((b, a), zmax) in before.iter().zip(&after).zip(&max_z) {
            let ulp = |v: f32| v.max(6.2e-5) * 2f32.powi(1 - ulp_bits);
            // f32 tensors keep no `lo`: compensated rounds them like nearest.
            let bound = match precision {
                Precision::Compensated if dtype != DType::F32 => ulp(b.abs().max(a.abs())),
                _ => passes * 0.5 * ulp(b.abs() + 2.0 * mu * zmax),
            } + 1e-6 * b.abs();
            prop_assert!((a - b).abs() <= bound, "{:?} {:?}: {} -> {}", dtype, precision, b, a);
        }
    }
}

/// Drift in ulps of bf16 weights after `steps` ZO steps with lr = 0.
fn drift(precision: Precision, steps: usize) -> (f64, f64) {
    let n = 4096;
    let mut r = lcg(11);
    let init: Vec<bf16> = (0..n).map(|_| bf16::from_f32(r())).collect();
    let cfg = Config {
        lr: 0.0,
        eps: 1e-2,
        precision,
        ..Config::default()
    };
    let out = run_zo(&cfg, &init, 0, steps, 2);
    let (mut sq, mut max) = (0f64, 0f64);
    for (a, b) in init.iter().zip(&out) {
        let ulp = 2f64.powi((a.to_f32().abs() as f64).log2().floor() as i32 - 7);
        let d = (b.to_f32() as f64 - a.to_f32() as f64).abs() / ulp;
        sq += d * d;
        max = max.max(d);
    }
    ((sq / n as f64).sqrt(), max)
}

#[test]
fn compensated_bf16_does_not_drift_over_1000_steps() {
    let (rms_n, max_n) = drift(Precision::Nearest, 1000);
    let (rms_c, max_c) = drift(Precision::Compensated, 1000);
    println!("drift after 1000 ZO steps, lr = 0, bf16, mu = 1e-2:");
    println!("  nearest:     RMS {rms_n:.3} ulp, max {max_n:.1} ulp");
    println!("  compensated: RMS {rms_c:.3} ulp, max {max_c:.1} ulp");
    assert!(rms_c < 0.25, "compensated RMS drift {rms_c} ulp");
    assert!(rms_n > rms_c, "nearest should drift more than compensated");
}

fn quadratic_loss(p: &ParamShard, target: &[f32]) -> f32 {
    let v = p.values(0).unwrap().to_f32_vec();
    v.iter()
        .zip(target)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        / v.len() as f32
}

#[test]
fn zo_sgd_and_hybrid_reduce_a_quadratic() {
    let n = 64;
    let mut r = lcg(21);
    let target: Vec<f32> = (0..n).map(|_| r()).collect();
    for (fo, zo) in [(0u32, 0u32), (5, 5)] {
        let mut p = vec![0f32; n];
        let mut g = vec![0f32; n];
        let mut shard = ParamShard::new();
        shard.add_with_grad(&mut p, &mut g, 0).unwrap();
        let cfg = Config {
            lr: 0.05,
            eps: 1e-3,
            num_directions: 4,
            fo_steps: fo,
            zo_steps: zo,
            rule: Rule::Sgd,
            ..Config::default()
        };
        let mut opt = Optimizer::new(cfg, shard).unwrap();
        let start = quadratic_loss(opt.params(), &target);
        for _ in 0..300 {
            match opt.next_phase() {
                Some(Phase::FirstOrder) => {
                    let v = opt.params().values(0).unwrap().to_f32_vec();
                    let grad: Vec<f32> = v
                        .iter()
                        .zip(&target)
                        .map(|(a, b)| 2.0 * (a - b) / n as f32)
                        .collect();
                    opt.grad_mut(0).unwrap().copy_from_f32(&grad).unwrap();
                    opt.fo_step().unwrap();
                }
                _ => {
                    opt.zo_step(|p| quadratic_loss(p, &target)).unwrap();
                }
            }
        }
        let end = quadratic_loss(opt.params(), &target);
        assert!(end < 0.5 * start, "fo={fo} zo={zo}: {start} -> {end}");
    }
}

#[test]
fn zo_adazo_trains_logistic_regression() {
    let (n, d) = (200usize, 8usize);
    let mut r = lcg(31);
    let w_true: Vec<f32> = (0..d).map(|_| 2.0 * r()).collect();
    let xs: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| r()).collect()).collect();
    let ys: Vec<f32> = xs
        .iter()
        .map(|x| {
            if x.iter().zip(&w_true).map(|(a, b)| a * b).sum::<f32>() > 0.0 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let loss = |p: &ParamShard| {
        let w = p.values(0).unwrap().to_f32_vec();
        xs.iter()
            .zip(&ys)
            .map(|(x, y)| {
                let s: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
                (1.0 + (-s).exp()).ln() + (1.0 - y) * s
            })
            .sum::<f32>()
            / n as f32
    };
    let mut w = vec![bf16::ZERO; d];
    let cfg = Config {
        lr: 0.02,
        eps: 1e-2,
        num_directions: 2,
        rule: Rule::AdaZo,
        precision: Precision::Compensated,
        ..Config::default()
    };
    let mut shard = ParamShard::new();
    shard.add(&mut w, 0).unwrap();
    let mut opt = Optimizer::new(cfg, shard).unwrap();
    let start = loss(opt.params());
    for _ in 0..300 {
        opt.zo_step(loss).unwrap();
    }
    let end = loss(opt.params());
    assert!(end < 0.7 * start, "{start} -> {end}");
}

#[test]
fn non_finite_losses_skip_and_restore() {
    let mut r = lcg(41);
    let init: Vec<bf16> = (0..1000).map(|_| bf16::from_f32(r())).collect();
    let mut p = init.clone();
    let mut shard = ParamShard::new();
    shard.add(&mut p, 0).unwrap();
    let cfg = Config {
        lr: 0.1,
        eps: 1e-3,
        precision: Precision::Compensated,
        rule: Rule::AdamW,
        ..Config::default()
    };
    let mut opt = Optimizer::new(cfg, shard).unwrap();
    let rep = opt.zo_step(|_| f32::NAN).unwrap();
    assert!(rep.skipped);
    assert_eq!(opt.skipped().unwrap(), 1);
    assert_eq!(opt.steps(), 1);
    assert_eq!(opt.updates().unwrap(), 0);
    let rep = opt.zo_step(|_| 1.0).unwrap();
    assert!(!rep.skipped);
    drop(opt);
    let _ = init;
}

#[test]
fn protocol_misuse_is_an_error_and_harmless() {
    let mut p = vec![0.5f32; 100];
    let mut shard = ParamShard::new();
    shard.add(&mut p, 0).unwrap();
    let cfg = Config {
        num_directions: 2,
        fo_steps: 1,
        zo_steps: 2,
        ..Config::default()
    };
    let mut opt = Optimizer::new(cfg, shard).unwrap();
    assert!(matches!(opt.feed(1.0), Err(Error::BadState(_))));
    // Step 0 is first-order under the schedule, and there is no gradient.
    assert!(matches!(opt.begin(), Err(Error::BadState(_))));
    assert!(matches!(opt.fo_step(), Err(Error::BadState(_))));
    let mut q = vec![0.5f32; 100];
    let mut shard = ParamShard::new();
    shard.add(&mut q, 0).unwrap();
    let mut opt = Optimizer::new(
        Config {
            num_directions: 2,
            ..Config::default()
        },
        shard,
    )
    .unwrap();
    opt.begin().unwrap();
    assert!(matches!(opt.begin(), Err(Error::BadState(_))));
    assert!(matches!(opt.fo_step(), Err(Error::BadState(_))));
    assert!(matches!(opt.save_state(), Err(Error::BadState(_))));
    assert_eq!(opt.feed(1.0).unwrap(), Feed::NeedsForward);
    opt.abort().unwrap();
    assert!(!opt.in_step());
    assert!(matches!(opt.feed(1.0), Err(Error::BadState(_))));
    assert!(matches!(opt.feed_device(0), Err(Error::InvalidArgument(_))));
    drop(opt);
    // Abort restored the parameters (f32: within rounding of 0.5 ± μz).
    assert!(q.iter().all(|v| (v - 0.5).abs() < 1e-6), "{:?}", &q[..4]);
}

#[test]
fn bad_arguments_are_rejected() {
    let bad = [
        Config {
            lr: f32::NAN,
            ..Config::default()
        },
        Config {
            lr: -1.0,
            ..Config::default()
        },
        Config {
            eps: 0.0,
            ..Config::default()
        },
        Config {
            num_directions: 0,
            ..Config::default()
        },
        Config {
            beta1: 1.0,
            ..Config::default()
        },
        Config {
            hybrid_alpha: 2.0,
            ..Config::default()
        },
    ];
    for cfg in bad {
        assert!(matches!(
            Optimizer::new(cfg, ParamShard::new()),
            Err(Error::InvalidArgument(_))
        ));
    }
    let mut a = vec![0f32; 10];
    let mut b = vec![0f32; 10];
    let mut e: Vec<f32> = vec![];
    let mut shard = ParamShard::new();
    shard.add(&mut a, 100).unwrap();
    assert!(
        matches!(shard.add(&mut b, 105), Err(Error::InvalidArgument(m)) if m.contains("overlap"))
    );
    assert!(matches!(
        shard.add(&mut e, 0),
        Err(Error::InvalidArgument(_))
    ));
    let mut c = vec![0f32; 10];
    assert!(matches!(
        shard.add(&mut c, u64::MAX - 3),
        Err(Error::InvalidArgument(_))
    ));
    let mut opt = Optimizer::new(Config::default(), ParamShard::new()).unwrap();
    assert!(matches!(opt.begin(), Err(Error::BadState(_))));
    assert!(opt.set_lr(f32::INFINITY).is_err());
}

#[test]
fn saved_state_resumes_bit_identically() {
    let mut r = lcg(51);
    let init: Vec<bf16> = (0..3000).map(|_| bf16::from_f32(r())).collect();
    let cfg = Config {
        lr: 1e-2,
        rule: Rule::AdamW,
        precision: Precision::Compensated,
        num_directions: 2,
        fo_steps: 2,
        zo_steps: 3,
        ..Config::default()
    };
    let grads: Vec<f32> = (0..3000).map(|_| r()).collect();
    let drive = |opt: &mut Optimizer, from: u64, to: u64| {
        for s in from..to {
            match opt.next_phase().unwrap() {
                Phase::FirstOrder => {
                    let g: Vec<f32> = grads.iter().map(|v| v * (s as f32 + 1.0)).collect();
                    opt.grad_mut(0).unwrap().copy_from_f32(&g).unwrap();
                    opt.fo_step().unwrap();
                }
                Phase::ZerothOrder => {
                    opt.begin().unwrap();
                    for l in losses(s, 4) {
                        opt.feed(l).unwrap();
                    }
                }
            }
        }
    };
    // Straight run of 12 steps.
    let mut p1 = init.clone();
    let mut g1 = vec![0f32; 3000];
    {
        let mut shard = ParamShard::new();
        shard.add_with_grad(&mut p1, &mut g1, 7).unwrap();
        let mut opt = Optimizer::new(cfg.clone(), shard).unwrap();
        drive(&mut opt, 0, 12);
    }
    // 5 steps, save, a fresh optimizer loads and runs 7 more.
    let mut p2 = init.clone();
    let mut g2 = vec![0f32; 3000];
    let saved = {
        let mut shard = ParamShard::new();
        shard.add_with_grad(&mut p2, &mut g2, 7).unwrap();
        let mut opt = Optimizer::new(cfg.clone(), shard).unwrap();
        drive(&mut opt, 0, 5);
        let s = opt.save_state().unwrap();
        assert_eq!(s.len() as u64, opt.state_size().unwrap());
        s
    };
    {
        let mut shard = ParamShard::new();
        shard.add_with_grad(&mut p2, &mut g2, 7).unwrap();
        let mut opt = Optimizer::new(cfg.clone(), shard).unwrap();
        opt.load_state(&saved).unwrap();
        assert_eq!(opt.steps(), 5);
        drive(&mut opt, 5, 12);
    }
    assert_eq!(bits(&p1), bits(&p2));
    // A state from another configuration is refused.
    let mut p3 = init.clone();
    let mut shard = ParamShard::new();
    shard.add(&mut p3, 7).unwrap();
    let mut opt = Optimizer::new(
        Config {
            rule: Rule::Sgd,
            ..cfg.clone()
        },
        shard,
    )
    .unwrap();
    assert!(matches!(
        opt.load_state(&saved),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        opt.load_state(b"garbage"),
        Err(Error::InvalidArgument(_))
    ));
}

/// A CPU optimizer with threads of its own leaves none running once dropped.
#[cfg(target_os = "linux")]
#[test]
fn dropping_an_optimizer_joins_its_threads() {
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }
    // Other tests of this binary run threads too: retry until a quiet moment shows it.
    let mut last = (0, 0, 0);
    for _ in 0..20 {
        let before = threads();
        let mut x = vec![0f32; 1 << 16];
        let mut shard = ParamShard::new();
        shard.add(&mut x, 0).unwrap();
        let mut opt = Optimizer::with_threads(Config::default(), shard, 7).unwrap();
        opt.zo_step(|_| 1.0).unwrap();
        let during = threads();
        drop(opt);
        let after = threads();
        if during >= before + 7 && after == before {
            return;
        }
        last = (before, during, after);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("threads before / during / after: {last:?}");
}
