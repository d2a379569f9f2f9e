//! `hyzo bench`: a quick throughput table of the passes on this machine, no Python needed.
//! The full suites are `cargo bench` (criterion) and `benches/compare/` (side by side with
//! PyTorch and numpy).

use std::time::Instant;

use half::bf16;
use hyzo::backend::{Backend, Generator, PerturbPass, Term, UpdatePass};
use hyzo::direction::{fill, DirectionId, DirectionKind};
use hyzo::rules::{Rule, RuleParams};
use hyzo::{CpuBackend, DType, ParamShard, Precision, TensorSpec};
use rayon::prelude::*;

/// Median seconds of `reps` runs of `f` after one warm-up.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[reps / 2]
}

struct Row {
    what: String,
    threads: usize,
    secs: f64,
    elems: usize,
    bytes: usize,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut n: usize = 1 << 24;
    let mut reps = 5;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag}: missing value"))?;
        match flag.as_str() {
            "--elements" => n = v.parse().map_err(|_| format!("--elements: {v}"))?,
            "--reps" => reps = v.parse().map_err(|_| format!("--reps: {v}"))?,
            _ => {
                return Err(format!(
                    "unknown flag {flag} (bench takes --elements N --reps R)"
                ))
            }
        }
    }
    if n == 0 || reps == 0 {
        return Err("--elements and --reps must be positive".into());
    }
    let mut rows = Vec::new();
    let mut z = vec![0f32; n];
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| e.to_string())?;
        for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
            let secs = median_secs(reps, || {
                pool.install(|| {
                    z.par_chunks_mut(1 << 14).enumerate().for_each(|(i, c)| {
                        fill(kind, DirectionId::new(1, 0, 0), (i << 14) as u64, c)
                    })
                })
            });
            rows.push(Row {
                what: format!("generate {kind:?} (f32 out)"),
                threads,
                secs,
                elems: n,
                bytes: 4 * n,
            });
        }
    }
    drop(z);
    let mut theta: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32((i % 251) as f32 * 1e-3))
        .collect();
    let mut grad: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 1e-3).collect();
    let mut shard = ParamShard::new();
    // SAFETY: theta and grad outlive the shard and are not touched while it lives.
    unsafe {
        shard
            .add_raw(TensorSpec {
                data: theta.as_mut_ptr() as u64,
                dtype: DType::BF16,
                numel: n as u64,
                offset: 0,
                grad: grad.as_mut_ptr() as u64,
                grad_dtype: DType::F32,
            })
            .map_err(|e| e.to_string())?;
    }
    let gen = Generator {
        seed: 1,
        step: 0,
        kind: DirectionKind::Gaussian,
    };
    for threads in [1usize, 2] {
        let mut be = CpuBackend::new(threads).map_err(|e| e.to_string())?;
        be.allocate_state(&shard, 2, false)
            .map_err(|e| e.to_string())?;
        let one = [Term {
            direction: 0,
            coeff: 1e-3,
        }];
        let two = [
            Term {
                direction: 0,
                coeff: 1e-3,
            },
            Term {
                direction: 1,
                coeff: 1e-3,
            },
        ];
        for (what, terms) in [
            ("perturb bf16, 1 direction", &one[..]),
            ("perturb bf16, restore+perturb", &two[..]),
        ] {
            let secs = median_secs(reps, || {
                be.perturb(
                    &shard,
                    &PerturbPass {
                        gen,
                        terms,
                        precision: Precision::Nearest,
                    },
                )
                .unwrap()
            });
            rows.push(Row {
                what: what.into(),
                threads,
                secs,
                elems: n,
                bytes: 4 * n,
            });
        }
        for (rule, state_bytes) in [(Rule::Sgd, 0), (Rule::AdamW, 16)] {
            let zo = [Term {
                direction: 0,
                coeff: 0.1,
            }];
            let pass = UpdatePass {
                gen,
                restore: Some(one[0]),
                zo: &zo,
                grad_weight: None,
                rule: RuleParams::new(rule, 1e-6, 0.9, 0.999, 1e-8, 0.0, 1),
                precision: Precision::Nearest,
                device_losses: None,
            };
            let secs = median_secs(reps, || be.update(&shard, &pass).unwrap());
            rows.push(Row {
                what: format!("restore_and_update {rule:?} bf16"),
                threads,
                secs,
                elems: n,
                bytes: (4 + state_bytes) * n,
            });
        }
        let fo = UpdatePass {
            gen,
            restore: None,
            zo: &[],
            grad_weight: Some(1.0),
            rule: RuleParams::new(Rule::AdamW, 1e-6, 0.9, 0.999, 1e-8, 0.0, 1),
            precision: Precision::Nearest,
            device_losses: None,
        };
        let secs = median_secs(reps, || be.update(&shard, &fo).unwrap());
        rows.push(Row {
            what: "fo_update AdamW bf16 (f32 grad)".into(),
            threads,
            secs,
            elems: n,
            bytes: 24 * n,
        });
    }
    drop(shard);
    println!(
        "hyzo bench: CPU backend, {n} elements, median of {reps} ({} logical CPUs)",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!(
        "{:<36} {:>7} {:>10} {:>12} {:>9}",
        "pass", "threads", "ms", "Melem/s", "GB/s"
    );
    for r in &rows {
        println!(
            "{:<36} {:>7} {:>10.2} {:>12.1} {:>9.2}",
            r.what,
            r.threads,
            r.secs * 1e3,
            r.elems as f64 / r.secs / 1e6,
            r.bytes as f64 / r.secs / 1e9
        );
    }
    Ok(())
}
