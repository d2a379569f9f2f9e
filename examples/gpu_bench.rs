//! GPU bandwidth benchmark of the passes (run by `scripts/gpu-check` on the device machine).
//!
//! One bf16 tensor of 2^30 elements (`HYZO_BENCH_LOG2N` to change), one launch per pass:
//! `perturb` (1 Gaussian term), `restore_and_update` with SGD and AdamW (q = 1), and
//! `fo_update` (SGD on a bf16 gradient). Each is timed with CUDA events (2 warm-ups, median
//! of 10), and its bandwidth counts the bytes it must read and write (parameters, state,
//! gradient; directions are generated, never loaded). The reference is a device-to-device
//! copy of the parameter buffer measured in the same run (bytes read + written). Prints a
//! table last. Without a device it prints "skipped: no CUDA device".

use cudarc::driver::{result, sys};
use hyzo::backend::cuda::{describe_device, is_available, CudaBackend, CudaBuffer};
use hyzo::backend::{Backend, Generator, PerturbPass, StateLayout, Term, UpdatePass};
use hyzo::rules::{Rule, RuleParams};
use hyzo::StateSet;
use hyzo::{DType, DirectionKind, Location, ParamShard, Precision, TensorSpec};

const WARMUP: usize = 2;
const REPEAT: usize = 10;

/// Median milliseconds of `f` over REPEAT timed runs on `stream`.
fn time_ms(stream: sys::CUstream, mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let mut times = Vec::new();
    // SAFETY: events of the current context, recorded on a valid stream, destroyed once.
    unsafe {
        let start = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap();
        let end = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).unwrap();
        for _ in 0..REPEAT {
            result::event::record(start, stream).unwrap();
            f();
            result::event::record(end, stream).unwrap();
            result::event::synchronize(end).unwrap();
            times.push(result::event::elapsed(start, end).unwrap() as f64);
        }
        result::event::destroy(start).unwrap();
        result::event::destroy(end).unwrap();
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[REPEAT / 2]
}

/// An update pass with the benchmark's constants.
fn update_pass(
    gen: Generator,
    rule: Rule,
    zo: &[Term],
    grad_weight: Option<f32>,
    restore: bool,
) -> UpdatePass<'_> {
    UpdatePass {
        gen,
        restore: restore.then_some(Term {
            direction: 0,
            coeff: -1e-3,
        }),
        zo,
        grad_weight,
        rule: RuleParams::new(rule, 1e-6, 0.9, 0.999, 1e-8, 0.0, 1),
        state: StateSet::Main,
        t: 1,
        precision: Precision::Nearest,
        tensors: None,
        device_losses: None,
    }
}

fn main() {
    if !is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let log2n: u32 = std::env::var("HYZO_BENCH_LOG2N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let n = 1u64 << log2n;
    println!("device: {}", describe_device(0).unwrap());
    let params = CudaBuffer::new(0, 2 * n as usize).expect("parameters");
    let grads = CudaBuffer::new(0, 2 * n as usize).expect("gradients");
    let copy_dst = CudaBuffer::new(0, 2 * n as usize).expect("copy target");
    let shard = || {
        let mut s = ParamShard::with_location(Location::Cuda(0));
        // SAFETY: device buffers alive for the whole benchmark.
        unsafe {
            s.add_raw(TensorSpec {
                data: params.ptr(),
                dtype: DType::BF16,
                numel: n,
                offset: 0,
                grad: grads.ptr(),
                grad_dtype: DType::BF16,
            })
            .unwrap();
        }
        s
    };
    let gen = Generator {
        seed: 1,
        step: 0,
        kind: DirectionKind::Gaussian,
    };
    let mut rows: Vec<(String, f64, f64)> = Vec::new();

    // Parameters and gradients: Gaussian values (never time on zeros), written by a pass.
    let mut sgd = CudaBackend::new(0).unwrap();
    let stream = sgd.stream() as sys::CUstream;
    let s = shard();
    sgd.allocate_state(&s, StateLayout::default()).unwrap();
    // SAFETY: device buffers of 2n bytes.
    unsafe {
        sys::cuMemsetD8_v2(params.ptr(), 0, 2 * n as usize);
        sys::cuMemsetD8_v2(grads.ptr(), 0, 2 * n as usize);
    }
    let init = [Term {
        direction: 7,
        coeff: 1.0,
    }];
    sgd.perturb(
        &s,
        &PerturbPass {
            gen,
            terms: &init,
            precision: Precision::Nearest,
        },
    )
    .unwrap();
    {
        // The gradient gets a Gaussian too, through a second shard whose data is the grads.
        let mut g = ParamShard::with_location(Location::Cuda(0));
        // SAFETY: as above.
        unsafe {
            g.add_raw(TensorSpec {
                data: grads.ptr(),
                dtype: DType::BF16,
                numel: n,
                offset: 0,
                grad: 0,
                grad_dtype: DType::F32,
            })
            .unwrap();
        }
        let mut b = CudaBackend::new(0).unwrap();
        b.allocate_state(&g, StateLayout::default()).unwrap();
        b.perturb(
            &g,
            &PerturbPass {
                gen,
                terms: &init,
                precision: Precision::Nearest,
            },
        )
        .unwrap();
        b.synchronize().unwrap();
    }
    sgd.synchronize().unwrap();

    let copy_ms = time_ms(stream, || {
        // SAFETY: both buffers hold 2n bytes.
        unsafe {
            result::memcpy_dtod_async(copy_dst.ptr(), params.ptr(), 2 * n as usize, stream).unwrap()
        };
    });
    rows.push(("copy (cuMemcpyDtoD)".into(), 4.0, copy_ms));

    // perturb: +μz then −μz alternately, so the values stay put.
    let mut sign = 1.0f32;
    let ms = time_ms(stream, || {
        let t = [Term {
            direction: 0,
            coeff: sign * 1e-3,
        }];
        sign = -sign;
        sgd.perturb(
            &s,
            &PerturbPass {
                gen,
                terms: &t,
                precision: Precision::Nearest,
            },
        )
        .unwrap();
    });
    rows.push(("perturb (1 term)".into(), 4.0, ms));
    let ms = time_ms(stream, || {
        let t = [
            Term {
                direction: 0,
                coeff: 1e-3,
            },
            Term {
                direction: 1,
                coeff: -1e-3,
            },
        ];
        sgd.perturb(
            &s,
            &PerturbPass {
                gen,
                terms: &t,
                precision: Precision::Nearest,
            },
        )
        .unwrap();
    });
    rows.push(("perturb (2 terms)".into(), 4.0, ms));

    let zo = [Term {
        direction: 0,
        coeff: 0.1,
    }];
    let ms = time_ms(stream, || {
        sgd.update(&s, &update_pass(gen, Rule::Sgd, &zo, None, true))
            .unwrap()
    });
    rows.push(("restore_and_update SGD q=1".into(), 4.0, ms));
    let ms = time_ms(stream, || {
        sgd.update(&s, &update_pass(gen, Rule::Sgd, &[], Some(1.0), false))
            .unwrap()
    });
    rows.push(("fo_update SGD (bf16 grad)".into(), 6.0, ms));
    drop(sgd);

    let mut adam = CudaBackend::new(0).unwrap();
    let s = shard();
    adam.allocate_state(
        &s,
        StateLayout {
            main_buffers: 2,
            ..StateLayout::default()
        },
    )
    .unwrap();
    let stream = adam.stream() as sys::CUstream;
    let ms = time_ms(stream, || {
        adam.update(&s, &update_pass(gen, Rule::AdamW, &zo, None, true))
            .unwrap()
    });
    rows.push(("restore_and_update AdamW q=1".into(), 20.0, ms));
    let ms = time_ms(stream, || {
        adam.update(&s, &update_pass(gen, Rule::AdaZo, &zo, None, true))
            .unwrap()
    });
    rows.push(("restore_and_update AdaZO q=1".into(), 20.0, ms));
    let ms = time_ms(stream, || {
        adam.update(&s, &update_pass(gen, Rule::AdamW, &[], Some(1.0), false))
            .unwrap()
    });
    rows.push(("fo_update AdamW (bf16 grad)".into(), 22.0, ms));
    adam.synchronize().unwrap();

    let copy_gbs = 4.0 * n as f64 / (copy_ms * 1e6);
    println!();
    println!("n = 2^{log2n} bf16 elements; median of {REPEAT} after {WARMUP} warm-ups; GB/s = bytes read + written");
    println!(
        "{:<32} {:>8} {:>10} {:>9} {:>8}",
        "pass", "B/elem", "ms", "GB/s", "% copy"
    );
    for (name, bpe, ms) in &rows {
        let gbs = bpe * n as f64 / (ms * 1e6);
        println!(
            "{name:<32} {bpe:>8.0} {ms:>10.3} {gbs:>9.1} {:>7.1}%",
            100.0 * gbs / copy_gbs
        );
    }
    println!("targets: perturb >= 90%, restore_and_update SGD >= 85%, AdamW/AdaZO >= 80% of copy");
}
