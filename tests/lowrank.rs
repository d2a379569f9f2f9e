//! Low-rank directions (spec §7): the factors' definition, the passes that leave low-rank
//! tensors to the forward, the update that rebuilds `Z`, sharding, training, bad input and
//! the C ABI.

use hyzo::direction::{
    direction_at, lowrank_exact, DirectionId, LowRankShape, LOWRANK_A_STREAM, LOWRANK_B_STREAM,
};
use hyzo::{Config, DirectionKind, Estimator, Feed, Optimizer, ParamShard, Rule};

/// A tensor of the test model: its global offset and its shape (`None`: a 1-D tensor).
#[derive(Clone, Copy)]
struct Layout {
    offset: u64,
    rows: u64,
    cols: u64,
    shaped: bool,
}

impl Layout {
    fn numel(&self) -> usize {
        (self.rows * self.cols) as usize
    }
}

fn lowrank_config(rank: u32, q: u32) -> Config {
    Config {
        seed: 0x5eed_1234,
        lr: 0.01,
        eps: 1e-2,
        num_directions: q,
        direction: DirectionKind::LowRank,
        rank,
        ..Config::default()
    }
}

/// An optimizer over `data` (one buffer per layout entry), shapes given where `shaped`.
fn optimizer<'a>(config: Config, layouts: &[Layout], data: &'a mut [Vec<f32>]) -> Optimizer<'a> {
    let mut shard = ParamShard::new();
    for (l, d) in layouts.iter().zip(data.iter_mut()) {
        shard.add(d.as_mut_slice(), l.offset).unwrap();
    }
    let mut opt = Optimizer::with_threads(config, shard, 2).unwrap();
    for (i, l) in layouts.iter().enumerate() {
        if l.shaped {
            opt.set_shape(i, l.rows, l.cols).unwrap();
        }
    }
    opt
}

/// The weights the forward pass sees: the stored values plus `c Z_d` on the low-rank
/// tensors, `Z_d` rebuilt from the optimizer's factors by the spec's formula.
fn effective(opt: &mut Optimizer, layouts: &[Layout]) -> Vec<Vec<f32>> {
    let mut w: Vec<Vec<f32>> = (0..layouts.len())
        .map(|i| opt.params().values(i).unwrap().to_f32_vec())
        .collect();
    let Some(t) = opt.forward_perturbation() else {
        return w;
    };
    if opt.config().direction != DirectionKind::LowRank {
        return w;
    }
    let factors = opt.lowrank_factors(t.direction).unwrap();
    let rank = opt.config().rank;
    let mut at = 0;
    for (w, l) in w.iter_mut().zip(layouts).filter(|(_, l)| l.shaped) {
        let s = LowRankShape::new(l.rows, l.cols, rank);
        let (a, b) = factors[at..at + s.factors_len() as usize].split_at(s.a_len() as usize);
        let r = s.rank as usize;
        for i in 0..l.rows as usize {
            for k in 0..l.cols as usize {
                let z =
                    LowRankShape::entry(&a[i * r..(i + 1) * r], &b[k * r..(k + 1) * r], s.scale());
                w[i * l.cols as usize + k] += t.coeff * z;
            }
        }
        at += s.factors_len() as usize;
    }
    w
}

/// A least-squares loss of a one-layer model `y = W x + b` (W: 6 × 5 at index 0, b at 1,
/// plus an unused 3 × 4 matrix at index 2 so that every kind of tensor is present).
fn regression_loss(w: &[Vec<f32>]) -> f32 {
    let mut sum = 0f64;
    for n in 0..16 {
        let x: Vec<f64> = (0..5).map(|k| ((n * 5 + k) as f64 * 0.7).sin()).collect();
        for i in 0..6 {
            let target: f64 = (0..5)
                .map(|k| x[k] * ((i + 2 * k) as f64 * 0.3).cos())
                .sum::<f64>()
                + 0.1 * i as f64;
            let y: f64 =
                (0..5).map(|k| w[0][i * 5 + k] as f64 * x[k]).sum::<f64>() + w[1][i] as f64;
            sum += (y - target) * (y - target);
        }
    }
    let decay: f64 = w[2].iter().map(|v| (*v as f64 - 0.5).powi(2)).sum();
    (sum / 96.0 + decay / 12.0) as f32
}

fn model() -> Vec<Layout> {
    vec![
        Layout {
            offset: 100,
            rows: 6,
            cols: 5,
            shaped: true,
        },
        Layout {
            offset: 130,
            rows: 6,
            cols: 1,
            shaped: false,
        },
        Layout {
            offset: 1000,
            rows: 3,
            cols: 4,
            shaped: true,
        },
    ]
}

fn model_data(layouts: &[Layout]) -> Vec<Vec<f32>> {
    layouts
        .iter()
        .map(|l| {
            (0..l.numel())
                .map(|i| ((i as f32) * 0.13).cos() * 0.1)
                .collect()
        })
        .collect()
}

/// One zeroth-order step driven by `loss` on the effective weights; returns the losses
/// and checks, at every forward, that the low-rank tensors hold their stored bits.
fn zo_step(opt: &mut Optimizer, layouts: &[Layout], loss: fn(&[Vec<f32>]) -> f32) -> Vec<f32> {
    let before: Vec<Vec<f32>> = (0..layouts.len())
        .map(|i| opt.params().values(i).unwrap().to_f32_vec())
        .collect();
    opt.begin().unwrap();
    let mut losses = Vec::new();
    loop {
        for (i, l) in layouts.iter().enumerate() {
            if l.shaped && opt.config().direction == DirectionKind::LowRank {
                let now = opt.params().values(i).unwrap().to_f32_vec();
                assert_eq!(
                    bits(&now),
                    bits(&before[i]),
                    "tensor {i} was written during a step"
                );
            }
        }
        let l = loss(&effective(opt, layouts));
        losses.push(l);
        if let Feed::Done(r) = opt.feed(l).unwrap() {
            assert!(!r.skipped);
            return losses;
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn factors_are_the_specs_gaussian_streams() {
    let layouts = model();
    let mut data = model_data(&layouts);
    let mut opt = optimizer(lowrank_config(4, 3), &layouts, &mut data);
    // rank 4 on the 6 × 5 matrix, min(4, 3, 4) = 3 on the 3 × 4 one.
    let shapes = [LowRankShape::new(6, 5, 4), LowRankShape::new(3, 4, 4)];
    assert_eq!(shapes[1].rank, 3);
    let len: u64 = shapes.iter().map(|s| s.factors_len()).sum();
    assert_eq!(opt.lowrank_factors_len(), len);
    for d in 0..3 {
        let f = opt.lowrank_factors(d).unwrap();
        assert_eq!(f.len() as u64, len);
        let mut at = 0usize;
        for (s, l) in shapes.iter().zip([layouts[0], layouts[2]]) {
            let r = s.rank;
            // A (rows × r) then B (cols × r): row i's entries are stream entries o + i·r + p.
            for (what, stream, first, n) in [
                ("A", LOWRANK_A_STREAM, 0, s.rows),
                ("B", LOWRANK_B_STREAM, s.a_len(), s.cols),
            ] {
                let id = DirectionId::new(0x5eed_1234, 0, stream + d);
                for i in 0..n {
                    for p in 0..r {
                        let j = l.offset + i * r + p;
                        assert!(
                            j < l.offset + s.rows * s.cols,
                            "{what} index outside the tensor"
                        );
                        assert_eq!(
                            f[at + (first + i * r + p) as usize],
                            direction_at(DirectionKind::Gaussian, id, j)
                        );
                    }
                }
            }
            // Entries within the spec's tolerance of the exact (f64) value.
            let rr = r as usize;
            let (fa, fb) = f[at..at + s.factors_len() as usize].split_at(s.a_len() as usize);
            for i in 0..s.rows {
                for k in 0..s.cols {
                    let (ra, rb) = (&fa[i as usize * rr..][..rr], &fb[k as usize * rr..][..rr]);
                    let z = LowRankShape::entry(ra, rb, s.scale()) as f64;
                    let exact =
                        lowrank_exact(DirectionId::new(0x5eed_1234, 0, d), l.offset, *s, i, k);
                    let tol: f64 = 2e-4
                        * s.scale() as f64
                        * ra.iter()
                            .zip(rb)
                            .map(|(x, y)| (1.0 + x.abs() as f64) * (1.0 + y.abs() as f64))
                            .sum::<f64>();
                    assert!((z - exact).abs() <= tol, "Z[{i},{k}] = {z}, exact {exact}");
                }
            }
            at += s.factors_len() as usize;
        }
    }
}

#[test]
fn entries_have_unit_variance() {
    // Z = A Bᵀ / sqrt(r): each entry a sum of r products of independent normals, scaled.
    // The sample variance over n × n entries is the mean of a² times the mean of b² (rank
    // 1), whose spread is about sqrt(2/n) each: n = 1024 puts the bounds 4 sd away.
    const N: u64 = 1024;
    for rank in [1u32, 4] {
        let s = LowRankShape::new(N, N, rank);
        let l = Layout {
            offset: 3,
            rows: N,
            cols: N,
            shaped: true,
        };
        let mut data = vec![vec![0f32; (N * N) as usize]];
        let mut opt = optimizer(lowrank_config(rank, 1), &[l], &mut data);
        let f = opt.lowrank_factors(0).unwrap();
        let (a, b) = f.split_at(s.a_len() as usize);
        let r = s.rank as usize;
        let mut sum2 = 0f64;
        for i in 0..N as usize {
            for k in 0..N as usize {
                let z =
                    LowRankShape::entry(&a[i * r..(i + 1) * r], &b[k * r..(k + 1) * r], s.scale());
                sum2 += (z as f64).powi(2);
            }
        }
        let var = sum2 / (N * N) as f64;
        assert!((0.75..1.25).contains(&var), "rank {rank}: variance {var}");
    }
}

#[test]
fn the_forward_carries_the_protocols_terms() {
    let layouts = model();
    for (estimator, want) in [
        (
            Estimator::TwoSided,
            vec![
                Some((0, 1.0)),
                Some((0, -1.0)),
                Some((1, 1.0)),
                Some((1, -1.0)),
            ],
        ),
        (
            Estimator::OneSided,
            vec![None, Some((0, 1.0)), Some((1, 1.0))],
        ),
    ] {
        let mut data = model_data(&layouts);
        let config = Config {
            estimator,
            ..lowrank_config(2, 2)
        };
        let mut opt = optimizer(config, &layouts, &mut data);
        assert_eq!(opt.forward_perturbation(), None);
        opt.begin().unwrap();
        let mut seen = Vec::new();
        loop {
            seen.push(
                opt.forward_perturbation()
                    .map(|t| (t.direction, t.coeff / 1e-2)),
            );
            if let Feed::Done(_) = opt.feed(1.0 + seen.len() as f32 * 1e-3).unwrap() {
                break;
            }
        }
        assert_eq!(seen, want, "{estimator:?}");
        assert_eq!(opt.forward_perturbation(), None);
    }
}

#[test]
fn passes_write_only_the_tensors_without_a_low_rank_direction() {
    // The bias (1-D) is perturbed exactly as a Gaussian optimizer perturbs it; the matrices
    // are not written until the update, which writes each of them once.
    let layouts = model();
    let mut data = model_data(&layouts);
    let mut gdata = model_data(&layouts);
    let mut lr = optimizer(lowrank_config(2, 2), &layouts, &mut data);
    let gauss_layouts: Vec<Layout> = layouts
        .iter()
        .map(|l| Layout {
            shaped: false,
            ..*l
        })
        .collect();
    let gconfig = Config {
        direction: DirectionKind::Gaussian,
        ..lowrank_config(2, 2)
    };
    let mut gs = optimizer(gconfig, &gauss_layouts, &mut gdata);
    lr.begin().unwrap();
    gs.begin().unwrap();
    for e in 0..4 {
        assert_eq!(
            bits(&lr.params().values(1).unwrap().to_f32_vec()),
            bits(&gs.params().values(1).unwrap().to_f32_vec()),
            "bias at evaluation {e}"
        );
        let l = 1.0 + e as f32 * 0.01;
        lr.feed(l).unwrap();
        gs.feed(l).unwrap();
    }
    // Same projected gradients: the bias gets the same Gaussian update; the matrices differ.
    assert_eq!(
        bits(&lr.params().values(1).unwrap().to_f32_vec()),
        bits(&gs.params().values(1).unwrap().to_f32_vec())
    );
    assert_ne!(
        bits(&lr.params().values(0).unwrap().to_f32_vec()),
        bits(&gs.params().values(0).unwrap().to_f32_vec())
    );
}

#[test]
fn the_update_applies_the_rebuilt_estimate() {
    let layouts = model();
    for rule in [Rule::Sgd, Rule::AdamW] {
        let mut data = model_data(&layouts);
        let w0 = data.clone();
        let config = Config {
            rule,
            ..lowrank_config(3, 2)
        };
        let mut opt = optimizer(config.clone(), &layouts, &mut data);
        let factors: Vec<Vec<f32>> = (0..2).map(|d| opt.lowrank_factors(d).unwrap()).collect();
        let losses = zo_step(&mut opt, &layouts, regression_loss);
        let g: Vec<f32> = (0..2)
            .map(|d| (losses[2 * d] - losses[2 * d + 1]) / (2.0 * 1e-2))
            .collect();
        let s = LowRankShape::new(6, 5, 3);
        let r = s.rank as usize;
        let rp = hyzo::rules::RuleParams::new(
            rule,
            config.lr,
            config.beta1,
            config.beta2,
            config.adam_eps,
            0.0,
            1,
        );
        let now = opt.params().values(0).unwrap().to_f32_vec();
        for i in 0..6 {
            for k in 0..5 {
                let mut est = 0f32;
                for (d, f) in factors.iter().enumerate() {
                    let (a, b) = f[..s.factors_len() as usize].split_at(s.a_len() as usize);
                    let z = LowRankShape::entry(
                        &a[i * r..(i + 1) * r],
                        &b[k * r..(k + 1) * r],
                        s.scale(),
                    );
                    est += g[d] / 2.0 * z;
                }
                let (mut m, mut v) = (0f32, 0f32);
                let want = hyzo::rules::apply(&rp, w0[0][i * 5 + k], est, &mut m, &mut v);
                assert_eq!(
                    now[i * 5 + k].to_bits(),
                    want.to_bits(),
                    "{rule:?} W[{i},{k}]"
                );
            }
        }
    }
}

#[test]
fn a_model_split_by_tensors_steps_like_the_whole() {
    let layouts = model();
    let mut whole_data = model_data(&layouts);
    let mut part_data = model_data(&layouts);
    let config = Config {
        rule: Rule::AdaZo,
        ..lowrank_config(2, 2)
    };
    let mut whole = optimizer(config.clone(), &layouts, &mut whole_data);
    // Part one holds tensors 0 and 1, part two tensor 2; each registers its own shapes.
    let (first, second) = part_data.split_at_mut(2);
    let mut p1 = optimizer(config.clone(), &layouts[..2], first);
    let mut p2 = optimizer(config, &layouts[2..], second);
    for _ in 0..5 {
        zo_step(&mut whole, &layouts, regression_loss);
        // The parts see the same effective model: the union of their views.
        p1.begin().unwrap();
        p2.begin().unwrap();
        loop {
            let mut w = effective(&mut p1, &layouts[..2]);
            w.extend(effective(&mut p2, &layouts[2..]));
            let l = regression_loss(&w);
            let a = p1.feed(l).unwrap();
            let b = p2.feed(l).unwrap();
            assert_eq!(a, b);
            if matches!(a, Feed::Done(_)) {
                break;
            }
        }
    }
    for i in 0..3 {
        let part = if i < 2 {
            p1.params().values(i)
        } else {
            p2.params().values(i - 2)
        };
        assert_eq!(
            bits(&whole.params().values(i).unwrap().to_f32_vec()),
            bits(&part.unwrap().to_f32_vec()),
            "tensor {i}"
        );
    }
}

#[test]
fn small_models_train_with_rank_1_and_4() {
    let layouts = model();
    for rank in [1u32, 4] {
        let mut data = model_data(&layouts);
        let config = Config {
            rule: Rule::Sgd,
            lr: 0.02,
            num_directions: 4,
            ..lowrank_config(rank, 4)
        };
        let mut opt = optimizer(config, &layouts, &mut data);
        let start = regression_loss(&effective(&mut opt, &layouts));
        for _ in 0..300 {
            zo_step(&mut opt, &layouts, regression_loss);
        }
        let end = regression_loss(&effective(&mut opt, &layouts));
        assert!(end < 0.5 * start, "rank {rank}: loss {start} -> {end}");
    }
}

#[test]
fn a_skipped_step_leaves_the_matrices_alone() {
    let layouts = model();
    let mut data = model_data(&layouts);
    let before = data.clone();
    let mut opt = optimizer(lowrank_config(2, 1), &layouts, &mut data);
    opt.begin().unwrap();
    opt.feed(1.0).unwrap();
    let Feed::Done(r) = opt.feed(f32::NAN).unwrap() else {
        panic!("q = 1 takes two losses")
    };
    assert!(r.skipped);
    for i in [0, 2] {
        assert_eq!(
            bits(&opt.params().values(i).unwrap().to_f32_vec()),
            bits(&before[i])
        );
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let layouts = model();
    let mut data = model_data(&layouts);
    let bad = Config {
        rank: 0,
        ..lowrank_config(1, 1)
    };
    let mut shard = ParamShard::new();
    shard.add(data[0].as_mut_slice(), 0).unwrap();
    let e = Optimizer::new(bad, shard).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
    let too_big = Config {
        rank: 1025,
        ..lowrank_config(1, 1)
    };
    assert!(Optimizer::new(too_big, ParamShard::new()).is_err());

    let mut opt = optimizer(lowrank_config(2, 2), &layouts, &mut data);
    for (i, rows, cols) in [
        (0usize, 5u64, 5u64),
        (0, 0, 30),
        (0, 30, 0),
        (7, 1, 1),
        (0, u64::MAX, 2),
    ] {
        assert!(opt.set_shape(i, rows, cols).is_err(), "{i} {rows}x{cols}");
    }
    let len = opt.lowrank_factors_len();
    assert!(opt.lowrank_factors(2).is_err(), "direction beyond q");
    let mut buf = vec![0f32; len as usize + 1];
    // SAFETY: a host buffer of len + 1 floats.
    let e = unsafe { opt.lowrank_factors_raw(0, buf.as_mut_ptr() as u64, len + 1) };
    assert!(e.is_err());
    assert!(buf.iter().all(|v| *v == 0.0));
    zo_step(&mut opt, &layouts, regression_loss);
    let e = opt.set_shape(0, 6, 5).unwrap_err().to_string();
    assert!(e.contains("before the first step"), "{e}");

    // Factors need low-rank directions; shapes are ignored otherwise.
    let mut gdata = model_data(&layouts);
    let gconfig = Config {
        direction: DirectionKind::Gaussian,
        ..lowrank_config(1, 1)
    };
    let mut g = optimizer(gconfig, &layouts, &mut gdata);
    assert_eq!(g.lowrank_factors_len(), 0);
    assert!(g.lowrank_factors(0).is_err());
}

#[test]
fn a_saved_state_knows_its_shapes() {
    let layouts = model();
    let mut data = model_data(&layouts);
    let config = Config {
        rule: Rule::AdamW,
        ..lowrank_config(2, 1)
    };
    let mut opt = optimizer(config.clone(), &layouts, &mut data);
    zo_step(&mut opt, &layouts, regression_loss);
    let saved = opt.save_state().unwrap();
    // The same tensors with another shape (or rank) name other directions: refused.
    let mut other = layouts.clone();
    other[0].rows = 3;
    other[0].cols = 10;
    let mut odata = model_data(&layouts);
    let mut o = optimizer(config.clone(), &other, &mut odata);
    assert!(o.load_state(&saved).is_err());
    let mut rdata = model_data(&layouts);
    let mut r = optimizer(
        Config {
            rank: 3,
            ..config.clone()
        },
        &layouts,
        &mut rdata,
    );
    assert!(r.load_state(&saved).is_err());
    let mut sdata = model_data(&layouts);
    let mut same = optimizer(config, &layouts, &mut sdata);
    same.load_state(&saved).unwrap();
    assert_eq!(same.steps(), 1);
}

#[test]
fn the_c_abi_registers_shapes_and_hands_out_factors() {
    use hyzo::ffi::*;
    let layouts = model();
    let mut data = model_data(&layouts);
    let mut cfg = hyzo_config_default();
    assert_eq!(cfg.rank, 1);
    cfg.direction = hyzo_direction::HYZO_DIRECTION_LOWRANK as u32;
    cfg.rank = 2;
    cfg.num_directions = 2;
    cfg.seed = 0x5eed_1234;
    cfg.eps = 1e-2;
    cfg.lr = 0.01;
    let mut opt = std::ptr::null_mut();
    let ok = hyzo_status::HYZO_OK;
    unsafe {
        assert_eq!(hyzo_optimizer_create_cpu(&cfg, 2, &mut opt), ok);
        for (l, d) in layouts.iter().zip(data.iter_mut()) {
            let s = hyzo_optimizer_add_tensor(
                opt,
                d.as_mut_ptr().cast(),
                hyzo_dtype::HYZO_F32 as u32,
                d.len() as u64,
                l.offset,
                std::ptr::null_mut(),
                hyzo_dtype::HYZO_F32 as u32,
            );
            assert_eq!(s, ok);
        }
        assert_eq!(hyzo_optimizer_set_shape(opt, 0, 6, 5), ok);
        assert_eq!(hyzo_optimizer_set_shape(opt, 2, 3, 4), ok);
        for (i, rows, cols) in [(1, 4, 4), (3, 1, 1), (u64::MAX, 6, 5)] {
            let s = hyzo_optimizer_set_shape(opt, i, rows, cols);
            assert_eq!(
                s,
                hyzo_status::HYZO_ERR_INVALID_ARGUMENT,
                "{i} {rows}x{cols}"
            );
        }
        let mut len = 0u64;
        assert_eq!(hyzo_optimizer_lowrank_factors_len(opt, &mut len), ok);
        assert_eq!(len, (6 + 5) * 2 + (3 + 4) * 2);
        let mut f = vec![0f32; len as usize];
        assert_eq!(
            hyzo_optimizer_lowrank_factors(opt, 1, f.as_mut_ptr(), len),
            ok
        );
        let want = direction_at(
            DirectionKind::Gaussian,
            DirectionId::new(0x5eed_1234, 0, LOWRANK_A_STREAM + 1),
            100,
        );
        assert_eq!(f[0], want);
        assert_eq!(
            hyzo_optimizer_lowrank_factors(opt, 1, f.as_mut_ptr(), len - 1),
            hyzo_status::HYZO_ERR_INVALID_ARGUMENT
        );
        let (mut d, mut c) = (7u32, 7f32);
        assert_eq!(hyzo_zo_forward_perturbation(opt, &mut d, &mut c), ok);
        assert_eq!((d, c), (0, 0.0));
        assert_eq!(hyzo_zo_begin(opt), ok);
        assert_eq!(hyzo_zo_forward_perturbation(opt, &mut d, &mut c), ok);
        assert_eq!((d, c), (0, 1e-2));
        let mut more = 0;
        assert_eq!(hyzo_zo_feed(opt, 1.0, &mut more), ok);
        assert_eq!(hyzo_zo_forward_perturbation(opt, &mut d, &mut c), ok);
        assert_eq!((d, c), (0, -1e-2));
        assert_eq!(
            hyzo_zo_forward_perturbation(opt, std::ptr::null_mut(), &mut c),
            hyzo_status::HYZO_ERR_INVALID_ARGUMENT
        );
        assert_eq!(hyzo_zo_abort(opt), ok);
        hyzo_optimizer_destroy(opt);
    }
}
