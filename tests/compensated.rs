//! Compensated precision (spec §6): how far perturb-then-restore moves the represented value
//! `hi + lo`, against the bound of docs/interpretation.md ("Compensated mode"), and the
//! counting argument that no arrangement of 32 bits per element restores it exactly.

use half::{bf16, f16};
use hyzo::direction::{direction_at, DirectionId, DirectionKind};
use hyzo::{Config, Element, Estimator, Feed, Optimizer, ParamShard, Precision, Rule};

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Spacing of the stored dtype at magnitude `m` (its subnormal spacing below the normal range).
fn ulp(bf16_dtype: bool, m: f64) -> f64 {
    let (min_exp, fraction_bits) = if bf16_dtype { (-126, 7) } else { (-14, 10) };
    let e = if m > 0.0 {
        (m.log2().floor() as i32).max(min_exp)
    } else {
        min_exp
    };
    2f64.powi(e - fraction_bits)
}

/// The bound of docs/interpretation.md on `|Δ(hi + lo)|` after `passes` passes whose terms
/// cancel, for an element whose magnitude stays below `m` during them.
fn restore_bound(bf16_dtype: bool, m: f64, passes: u32) -> f64 {
    passes as f64 * (2f64.powi(-9) * ulp(bf16_dtype, m) + 2f64.powi(-21) * m + 2f64.powi(-134))
}

/// How a step is interrupted.
#[derive(Clone, Copy, Debug)]
enum Interrupt {
    /// `abort()` after this many losses.
    AbortAfter(u32),
    /// The loss at this position is NaN: the step completes skipped.
    NanAt(u32),
}

/// The values `hi + lo` of the optimizer's one tensor (`lo` read from its saved state: the
/// body ends with it, before the checksum).
fn represented(opt: &mut Optimizer, n: usize) -> Vec<f64> {
    let state = opt.save_state().unwrap();
    let lo = &state[state.len() - 4 - 2 * n..state.len() - 4];
    let hi = opt.params().values(0).unwrap().to_f32_vec();
    hi.iter()
        .zip(lo.chunks_exact(2))
        .map(|(h, l)| *h as f64 + bf16::from_bits(u16::from_le_bytes([l[0], l[1]])).to_f32() as f64)
        .collect()
}

struct Outcome {
    /// Elements whose `hi + lo` changed.
    changed: usize,
    /// Elements whose stored `hi` changed.
    hi_changed: usize,
    /// The largest `|Δ(hi + lo)|` over the bound.
    worst_ratio: f64,
}

/// Two full steps, then a third interrupted as `interrupt` says; checks every element's
/// `hi + lo` against the bound.
fn run<T: Element>(cfg: &Config, interrupt: Interrupt) -> Outcome {
    let n = 2048;
    let mut r = lcg(cfg.seed);
    // Weights of every size, down to well below the perturbation (where binades coarsen).
    let init: Vec<T> = (0..n)
        .map(|i| T::from_f32(r() * [1.0, 3e-2, 1e-3, 1e-5][i % 4]))
        .collect();
    let mut p = init;
    let mut shard = ParamShard::new();
    shard.add(&mut p, 0).unwrap();
    let mut opt = Optimizer::with_threads(cfg.clone(), shard, 1).unwrap();
    let evals = cfg.evaluations_per_step();
    for _ in 0..2 {
        opt.begin().unwrap();
        for _ in 0..evals {
            opt.feed(1.0 + 0.5 * r()).unwrap();
        }
    }
    let before = represented(&mut opt, n);
    let hi_before = opt.params().values(0).unwrap().to_f32_vec();
    opt.begin().unwrap();
    let two_sided = cfg.estimator == Estimator::TwoSided;
    let passes = match interrupt {
        Interrupt::AbortAfter(e) => {
            for _ in 0..e {
                assert_eq!(opt.feed(1.0 + 0.5 * r()).unwrap(), Feed::NeedsForward);
            }
            opt.abort().unwrap();
            // begin's pass (two-sided), one per loss fed but L_0 (one-sided), the undo.
            match (two_sided, e) {
                (true, e) => e + 2,
                (false, 0) => 0,
                (false, e) => e + 1,
            }
        }
        Interrupt::NanAt(k) => {
            for e in 0..evals {
                let loss = if e == k { f32::NAN } else { 1.0 + 0.5 * r() };
                if let Feed::Done(report) = opt.feed(loss).unwrap() {
                    assert!(report.skipped);
                }
            }
            assert_eq!(opt.skipped().unwrap(), 1);
            // Every pass of the step, the last one restoring only.
            if two_sided {
                evals + 1
            } else {
                evals
            }
        }
    };
    let after = represented(&mut opt, n);
    let hi_after = opt.params().values(0).unwrap().to_f32_vec();
    let bf16_dtype = T::DTYPE == hyzo::DType::BF16;
    let mut out = Outcome {
        changed: 0,
        hi_changed: 0,
        worst_ratio: 0.0,
    };
    for j in 0..n {
        // The largest magnitude the element reaches during the step: |hi + lo| plus the
        // largest perturbation carried, with room for the passes' own errors.
        let carried = (0..cfg.num_directions)
            .map(|d| {
                let z = direction_at(
                    DirectionKind::Gaussian,
                    DirectionId::new(cfg.seed, 2, d),
                    j as u64,
                );
                (cfg.eps * z).abs() as f64
            })
            .fold(0f64, f64::max);
        let m = (before[j].abs() + carried) * (1.0 + 2f64.powi(-10));
        let bound = restore_bound(bf16_dtype, m, passes);
        let delta = (after[j] - before[j]).abs();
        assert!(
            delta <= bound,
            "{:?} {interrupt:?} {:?} {:?} q={} element {j}: hi + lo {} -> {} (|Δ| {delta:e} > bound {bound:e})",
            T::DTYPE, cfg.rule, cfg.estimator, cfg.num_directions, before[j], after[j]
        );
        out.changed += usize::from(delta != 0.0);
        out.hi_changed += usize::from(hi_after[j].to_bits() != hi_before[j].to_bits());
        out.worst_ratio = out.worst_ratio.max(delta / bound);
    }
    out
}

/// Every combination of the issue (f16 and bf16, SGD and AdamW, two- and one-sided, q = 1
/// and 3), interrupted at every position by `abort()` or by a NaN loss: `hi + lo` moves by
/// at most the documented bound, and `hi` by at most what that allows.
#[test]
fn interrupted_steps_restore_hi_plus_lo_within_the_bound() {
    let (mut cases, mut inexact, mut hi_moved, mut worst) = (0, 0, 0, 0f64);
    for bf16_dtype in [false, true] {
        for rule in [Rule::Sgd, Rule::AdamW] {
            for estimator in Estimator::ALL {
                for q in [1u32, 3] {
                    let cfg = Config {
                        lr: if rule == Rule::Sgd { 1e-2 } else { 1e-3 },
                        eps: 1e-3,
                        num_directions: q,
                        estimator,
                        rule,
                        precision: Precision::Compensated,
                        seed: 7 + q as u64,
                        ..Config::default()
                    };
                    let evals = cfg.evaluations_per_step();
                    let interrupts = (0..evals)
                        .map(Interrupt::AbortAfter)
                        .chain((0..evals).map(Interrupt::NanAt));
                    for interrupt in interrupts {
                        let o = if bf16_dtype {
                            run::<bf16>(&cfg, interrupt)
                        } else {
                            run::<f16>(&cfg, interrupt)
                        };
                        cases += 1;
                        inexact += usize::from(o.changed > 0);
                        hi_moved += usize::from(o.hi_changed > 0);
                        worst = worst.max(o.worst_ratio);
                    }
                }
            }
        }
    }
    println!(
        "{cases} interrupted steps: hi + lo changed in {inexact}, hi in {hi_moved}; \
         worst |Δ(hi + lo)| / bound = {worst:.3}"
    );
    assert_eq!(cases, 112);
}

/// The counting argument of docs/interpretation.md, executed: for f16 and a perturbation
/// `Δ = 3e-3` (μ = 1e-3, z = 3), the states `(hi, lo)` that a pass writes with the same
/// `hi' = round(fl(hi + lo) + Δ)` (the value the forward must read) hold more than 2^16
/// distinct values `hi + lo`. A pass leaves 16 bits (`lo'`) to tell them apart, so two of
/// them are written identically whatever `lo'` holds, and no restore (a function of
/// `hi'`, `lo'` and `Δ`) returns both: with 32 bits per element, exactness is impossible.
#[test]
fn no_32_bit_arrangement_restores_exactly() {
    let delta = 1e-3f32 * 3.0;
    let target = f16::from_f32(delta);
    let window = 2.0 * f16::from_bits(target.to_bits() + 1).to_f32() - 2.0 * target.to_f32();
    let mut values = std::collections::HashSet::new();
    for hi_bits in 0..=u16::MAX {
        let hi = f16::from_bits(hi_bits);
        // NaN is not within the window either.
        if hi.to_f32().abs().partial_cmp(&window) != Some(std::cmp::Ordering::Less) {
            continue;
        }
        for lo_bits in 0..=u16::MAX {
            let lo = bf16::from_bits(lo_bits);
            if !lo.to_f32().is_finite() {
                continue;
            }
            // A state some pass writes: x rounds to (hi, lo).
            let x = hi.to_f32() + lo.to_f32();
            if f16::from_f32(x) != hi || bf16::from_f32(x - hi.to_f32()).to_bits() != lo_bits {
                continue;
            }
            if f16::from_f32(x + delta) == target {
                values.insert((x + 0.0).to_bits());
            }
        }
    }
    println!(
        "f16, Δ = {delta}: {} distinct hi + lo are written with hi' = {}",
        values.len(),
        target
    );
    assert!(values.len() > 2 << 16, "{}", values.len());
}
