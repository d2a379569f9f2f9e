//! CPU throughput of the passes: direction generation, perturb, restore_and_update per rule,
//! fo_update; per dtype and precision mode; 1 and 2 threads. Reported in elements/s.
//!
//! `cargo bench --bench cpu` (set `HYZO_BENCH_SIZES=1,16,64` for sizes in Mi elements).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use hyzo::backend::{Backend, Generator, PerturbPass, StateLayout, Term, UpdatePass};
use hyzo::direction::{DirectionId, DirectionKind};
use hyzo::fill::fill;
use hyzo::rules::{Rule, RuleParams};
use hyzo::{CpuBackend, DType, ParamShard, Precision, StateSet};
use rayon::prelude::*;

fn sizes() -> Vec<usize> {
    std::env::var("HYZO_BENCH_SIZES")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .expect("HYZO_BENCH_SIZES: Mi elements")
                << 20
        })
        .collect()
}

fn generation(c: &mut Criterion) {
    let mut g = c.benchmark_group("generate");
    g.sample_size(10);
    for n in sizes() {
        let mut out = vec![0f32; n];
        g.throughput(Throughput::Elements(n as u64));
        for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
            for threads in [1usize, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let id = format!("{kind:?}/{threads}t");
                g.bench_with_input(BenchmarkId::new(id, n), &n, |b, _| {
                    b.iter(|| {
                        pool.install(|| {
                            out.par_chunks_mut(1 << 14).enumerate().for_each(|(i, c)| {
                                fill(kind, DirectionId::new(1, 2, 3), (i << 14) as u64, c)
                            })
                        })
                    })
                });
            }
        }
    }
    g.finish();
}

fn shard_of(dtype: DType, n: usize) -> (Vec<u8>, Vec<f32>) {
    let bytes = vec![0u8; n * dtype.size()];
    (bytes, vec![0.001f32; n])
}

fn passes(c: &mut Criterion) {
    let mut g = c.benchmark_group("pass");
    g.sample_size(10);
    for n in sizes() {
        g.throughput(Throughput::Elements(n as u64));
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let (mut data, mut grad) = shard_of(dtype, n);
            // Random-ish starting values (not zeros).
            match dtype {
                DType::BF16 => {
                    bytemuck_fill::<bf16>(&mut data, |i| bf16::from_f32((i % 97) as f32 * 0.01))
                }
                DType::F16 => {
                    bytemuck_fill::<f16>(&mut data, |i| f16::from_f32((i % 97) as f32 * 0.01))
                }
                DType::F32 => bytemuck_fill::<f32>(&mut data, |i| (i % 97) as f32 * 0.01),
            }
            let mut shard = ParamShard::new();
            // SAFETY: data and grad outlive the shard and are not otherwise touched.
            unsafe {
                shard
                    .add_raw(hyzo::TensorSpec {
                        data: data.as_mut_ptr() as u64,
                        dtype,
                        numel: n as u64,
                        offset: 0,
                        grad: grad.as_mut_ptr() as u64,
                        grad_dtype: DType::F32,
                    })
                    .unwrap();
            }
            let gen = Generator {
                seed: 5,
                step: 0,
                kind: DirectionKind::Gaussian,
            };
            for threads in [1usize, 2] {
                let precisions: &[Precision] = if dtype == DType::BF16 {
                    &[
                        Precision::Nearest,
                        Precision::Stochastic,
                        Precision::Compensated,
                    ]
                } else {
                    &[Precision::Nearest]
                };
                for &precision in precisions {
                    let mut be = CpuBackend::new(threads).unwrap();
                    let state = StateLayout {
                        main_buffers: 2,
                        fo_buffers: 2,
                        residual: precision == Precision::Compensated,
                    };
                    be.allocate_state(&shard, state).unwrap();
                    let tag = format!("{dtype:?}/{precision:?}/{threads}t");
                    let one = [Term {
                        direction: 0,
                        coeff: 1e-3,
                    }];
                    g.bench_with_input(
                        BenchmarkId::new(format!("perturb/{tag}"), n),
                        &n,
                        |b, _| {
                            b.iter(|| {
                                be.perturb(
                                    &shard,
                                    &PerturbPass {
                                        gen,
                                        terms: &one,
                                        precision,
                                    },
                                )
                                .unwrap()
                            })
                        },
                    );
                    if precision != Precision::Nearest || threads == 1 && dtype != DType::BF16 {
                        continue;
                    }
                    for rule in [Rule::Sgd, Rule::AdamW] {
                        let zo = [Term {
                            direction: 0,
                            coeff: 0.5,
                        }];
                        let pass = UpdatePass {
                            gen,
                            restore: Some(Term {
                                direction: 0,
                                coeff: 1e-3,
                            }),
                            zo: &zo,
                            grad_weight: None,
                            rule: RuleParams::new(rule, 1e-6, 0.9, 0.999, 1e-8, 0.0, 1),
                            state: StateSet::Main,
                            t: 1,
                            precision,
                            device_losses: None,
                            tensors: None,
                        };
                        g.bench_with_input(
                            BenchmarkId::new(format!("restore_and_update/{rule:?}/{tag}"), n),
                            &n,
                            |b, _| b.iter(|| be.update(&shard, &pass).unwrap()),
                        );
                    }
                    let fo = UpdatePass {
                        gen,
                        restore: None,
                        zo: &[],
                        grad_weight: Some(1.0),
                        rule: RuleParams::new(Rule::AdamW, 1e-6, 0.9, 0.999, 1e-8, 0.0, 1),
                        state: StateSet::FirstOrder,
                        t: 1,
                        precision,
                        device_losses: None,
                        tensors: None,
                    };
                    g.bench_with_input(
                        BenchmarkId::new(format!("fo_update/AdamW/{tag}"), n),
                        &n,
                        |b, _| b.iter(|| be.update(&shard, &fo).unwrap()),
                    );
                }
            }
            drop(shard);
            let _ = &mut grad;
        }
    }
    g.finish();
}

fn bytemuck_fill<T: Copy>(bytes: &mut [u8], f: impl Fn(usize) -> T) {
    let n = bytes.len() / std::mem::size_of::<T>();
    // SAFETY: the buffer holds n elements of T's size; T is a plain number type; u8 buffers
    // from Vec are aligned enough for 2- and 4-byte types on every platform we target
    // (checked by add_raw's alignment validation).
    let s = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, n) };
    for (i, v) in s.iter_mut().enumerate() {
        *v = f(i);
    }
}

criterion_group!(benches, generation, passes);
criterion_main!(benches);
