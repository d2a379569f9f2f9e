//! `hyzo bench`: a quick throughput table of the passes on this machine, no Python needed.
//! The full suites are `cargo bench` (criterion) and `benches/compare/` (side by side with
//! PyTorch and numpy).

use std::time::Instant;

use clap::error::ErrorKind;
use clap::Args;
use half::bf16;
use hyzo::backend::{Backend, Generator, PerturbPass, StateLayout, Term, UpdatePass};
use hyzo::direction::{DirectionId, DirectionKind};
use hyzo::fill::fill;
use hyzo::rules::{Rule, RuleParams};
use hyzo::{CpuBackend, DType, ParamShard, Precision, StateSet, TensorSpec};
use rayon::prelude::*;

use crate::{usage_error, MAX_THREADS};

/// Bytes per element the bench holds at its peak: the bf16 parameters, their f32 gradient
/// and AdamW's two f32 state buffers (the f32 directions of the first passes are freed
/// before these are allocated).
const PEAK_BYTES_PER_ELEMENT: u64 = 2 + 4 + 2 * 4;

/// Most elements per pass: 2^30, whose buffers take 14 GiB at the peak. More measures
/// nothing new (throughput is flat well below it) and would not fit most machines.
const MAX_ELEMENTS: u64 = 1 << 30;

/// Most timed runs per pass (the median of more is no steadier).
const MAX_REPS: u32 = 1000;

/// Most thread counts one run measures (each repeats every pass).
const MAX_THREAD_COUNTS: usize = 16;

#[derive(Args)]
pub struct BenchArgs {
    /// Elements per pass, 1..=1073741824 (2^30). The buffers take 14 bytes per element at
    /// the peak (2^30: 14 GiB); a size this machine cannot hold is an error, not an abort
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1 << 24,
        value_parser = clap::value_parser!(u64).range(1..=MAX_ELEMENTS),
    )]
    elements: u64,
    /// Timed runs per pass, after one warm-up; the table shows their median. 1..=1000
    #[arg(
        long,
        value_name = "R",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REPS)),
    )]
    reps: u32,
    /// Thread counts to measure, comma-separated: at most 16 counts, each 1..=1024
    #[arg(
        long,
        value_name = "T,...",
        value_delimiter = ',',
        default_values_t = [1u16, 2],
        value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_THREADS)),
    )]
    threads: Vec<u16>,
}

/// Why `hyzo bench` stopped.
pub enum Error {
    /// A bad combination of flags, reported as clap reports its own (exit status 2).
    Usage(clap::Error),
    /// A valid request that failed, such as a buffer this machine cannot hold (exit status 1).
    Failed(String),
}

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
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

struct Row {
    what: String,
    threads: usize,
    secs: f64,
    elems: usize,
    bytes: usize,
}

/// `n` values from `value`, or an error saying what could not be allocated: the buffers
/// are sized by `--elements`, so running out of memory is the user's to fix, not an abort.
fn try_vec<T>(n: usize, what: &str, value: impl FnMut(usize) -> T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        let mib = (n as u64 * std::mem::size_of::<T>() as u64) >> 20;
        Error::Failed(format!(
            "cannot allocate {what}: {mib} MiB for --elements {n}; try a smaller --elements"
        ))
    })?;
    v.extend((0..n).map(value));
    Ok(v)
}

/// Bytes of physical memory, where the system says.
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads the system's configuration.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let pages = u64::try_from(pages).ok()?;
    let page_size = u64::try_from(page_size).ok()?;
    pages.checked_mul(page_size)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn physical_memory() -> Option<u64> {
    None
}

/// Refuses a size whose buffers exceed this machine's physical memory. An allocation that
/// large can still succeed (Linux overcommits), and the process would then be killed when
/// the pages are touched; this says so up front instead.
fn check_fits_in_memory(n: u64) -> Result<(), Error> {
    let need = n * PEAK_BYTES_PER_ELEMENT;
    match physical_memory() {
        Some(have) if need > have => Err(Error::Failed(format!(
            "--elements {n} needs {} MiB at the peak; this machine has {} MiB of memory",
            need >> 20,
            have >> 20
        ))),
        _ => Ok(()),
    }
}

pub fn run(args: &BenchArgs) -> Result<(), Error> {
    let failed = |e: &dyn std::fmt::Display| Error::Failed(e.to_string());
    if args.threads.len() > MAX_THREAD_COUNTS {
        return Err(Error::Usage(usage_error(
            Some("bench"),
            ErrorKind::TooManyValues,
            format!("--threads: at most {MAX_THREAD_COUNTS} thread counts"),
        )));
    }
    let thread_counts: Vec<usize> = args.threads.iter().map(|&t| usize::from(t)).collect();
    let reps = args.reps as usize;
    check_fits_in_memory(args.elements)?;
    // Fits: the range bound keeps it far below usize::MAX on a 64-bit target.
    let n = usize::try_from(args.elements).map_err(|_| {
        Error::Failed(format!(
            "--elements {}: too many for this platform",
            args.elements
        ))
    })?;
    let mut rows = Vec::new();
    let mut z = try_vec(n, "the f32 directions", |_| 0f32)?;
    for &threads in &thread_counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| failed(&e))?;
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
    let mut theta = try_vec(n, "the bf16 parameters", |i| {
        bf16::from_f32((i % 251) as f32 * 1e-3)
    })?;
    let mut grad = try_vec(n, "the f32 gradient", |i| (i % 13) as f32 * 1e-3)?;
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
            .map_err(|e| failed(&e))?;
    }
    let gen = Generator {
        seed: 1,
        step: 0,
        kind: DirectionKind::Gaussian,
    };
    for &threads in &thread_counts {
        let mut be = CpuBackend::new(threads).map_err(|e| failed(&e))?;
        let state = StateLayout {
            main_buffers: 2,
            ..StateLayout::default()
        };
        // The library reports a state it cannot allocate as OutOfMemory, not an abort.
        be.allocate_state(&shard, state)
            .map_err(|e| failed(&format_args!("{e}; try a smaller --elements")))?;
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
                state: StateSet::Main,
                t: 1,
                precision: Precision::Nearest,
                device_losses: None,
                tensors: None,
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
            state: StateSet::Main,
            t: 1,
            precision: Precision::Nearest,
            device_losses: None,
            tensors: None,
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
