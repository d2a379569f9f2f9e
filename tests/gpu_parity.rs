//! The CUDA backend against the CPU backend (the reference), on the same inputs.
//!
//! Mismatch bound: **none** — parameters and state must agree bit for bit. The kernels run
//! the CPU's f32 algorithm operation for operation with correctly rounded operations (no
//! contraction, IEEE division and square root; `tests/device_mirror.rs` checks that mirror
//! on the host), the same conversions (round to nearest even) and the same random words, so
//! there is no source of difference to tolerate. The only tolerance is sq_norm's (a sum in
//! f64 in another order: relative 1e-12). A failure prints the fraction of elements that
//! differ, the largest difference in ulps and the first few cases.
//!
//! Without a CUDA device every test runs on the emulated device (the host build of the same
//! kernels, `src/backend/cuda/emulator.rs`); with one, on the GPU.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use hyzo::backend::cuda::{
    choose_test_device, emulator_enabled, emulator_set_extra_blocks, CudaBackend, CudaBuffer,
};
use hyzo::backend::{Backend, Generator, PerturbPass, StateLayout, Term, UpdatePass};
use hyzo::rules::{Rule, RuleParams};
use hyzo::{
    Config, CpuBackend, DType, DirectionKind, Estimator, Feed, Location, Optimizer, ParamShard,
    Precision, StateSet, TensorSpec,
};
use rand::{Rng, SeedableRng};

/// A backend running the exact kernels (the CPU's Gaussian bit for bit): the bit-exact
/// tests below use it; `fast_kernels_within_tolerance` checks the default fast ones.
fn exact_backend() -> CudaBackend {
    let mut b = CudaBackend::new(0).unwrap();
    b.set_exact(true);
    b
}

/// Chooses the device: the GPU, or without one the emulated device; false under the GPU
/// kit's `HYZO_GPU_ONLY=1` without a GPU (see `choose_test_device`).
fn gpu() -> bool {
    choose_test_device()
}

/// One tensor of a test layout.
#[derive(Clone, Copy, Debug)]
struct Spec {
    dtype: DType,
    grad: Option<DType>,
    numel: u64,
    offset: u64,
    /// Bytes added to a 256-aligned device address (a multiple of the element size).
    misalign: u64,
    /// The gradient's (None: `misalign`).
    grad_misalign: Option<u64>,
}

/// The same tensors in host memory (for the CPU backend) and device memory (for CUDA).
struct Twin {
    specs: Vec<Spec>,
    host: Vec<Vec<u32>>,
    host_grads: Vec<Vec<u32>>,
    dev: CudaBuffer,
    dev_at: Vec<(u64, u64)>,
}

fn random_bytes(rng: &mut rand::rngs::StdRng, dtype: DType, n: usize, scale: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        let x: f32 = rng.gen_range(-scale..scale);
        match dtype {
            DType::F32 => out.extend(x.to_le_bytes()),
            DType::F16 => out.extend(f16::from_f32(x).to_le_bytes()),
            DType::BF16 => out.extend(bf16::from_f32(x).to_le_bytes()),
        }
    }
    out
}

fn words(bytes: &[u8]) -> Vec<u32> {
    let mut w = vec![0u32; bytes.len().div_ceil(4)];
    // SAFETY: w holds at least bytes.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), w.as_mut_ptr() as *mut u8, bytes.len())
    };
    w
}

impl Twin {
    fn new(specs: Vec<Spec>, seed: u64) -> Twin {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut cursor = 0u64;
        let mut dev_at = Vec::new();
        let mut host = Vec::new();
        let mut host_grads = Vec::new();
        let mut uploads = Vec::new();
        for s in &specs {
            let data = random_bytes(&mut rng, s.dtype, s.numel as usize, 2.0);
            let d = cursor.div_ceil(256) * 256 + s.misalign;
            cursor = d + data.len() as u64;
            let g = if let Some(gd) = s.grad {
                let gb = random_bytes(&mut rng, gd, s.numel as usize, 1.0);
                // Aligned like the data as far as the gradient's own alignment allows (a
                // 2-byte shift of f16 data cannot be an f32 gradient's: the shard refuses it).
                let like_data = s.misalign - s.misalign % gd.size() as u64;
                let g = cursor.div_ceil(256) * 256 + s.grad_misalign.unwrap_or(like_data);
                cursor = g + gb.len() as u64;
                uploads.push((g, gb.clone()));
                host_grads.push(words(&gb));
                g
            } else {
                host_grads.push(Vec::new());
                u64::MAX
            };
            uploads.push((d, data.clone()));
            host.push(words(&data));
            dev_at.push((d, g));
        }
        let dev = CudaBuffer::new(0, cursor as usize + 256).unwrap();
        for (at, bytes) in uploads {
            dev.upload_at(at as usize, &bytes).unwrap();
        }
        Twin {
            specs,
            host,
            host_grads,
            dev,
            dev_at,
        }
    }

    fn host_shard(&mut self) -> ParamShard<'static> {
        let mut shard = ParamShard::new();
        for (i, s) in self.specs.iter().enumerate() {
            let spec = TensorSpec {
                data: self.host[i].as_mut_ptr() as u64,
                dtype: s.dtype,
                numel: s.numel,
                offset: s.offset,
                grad: if s.grad.is_some() {
                    self.host_grads[i].as_mut_ptr() as u64
                } else {
                    0
                },
                grad_dtype: s.grad.unwrap_or(DType::F32),
            };
            // SAFETY: the vectors live as long as the Twin, which outlives every shard in
            // these tests; nothing else touches them during a pass.
            unsafe { shard.add_raw(spec).unwrap() };
        }
        shard
    }

    fn dev_shard(&self) -> ParamShard<'static> {
        let mut shard = ParamShard::with_location(Location::Cuda(0));
        for (s, (d, g)) in self.specs.iter().zip(&self.dev_at) {
            let spec = TensorSpec {
                data: self.dev.ptr() + d,
                dtype: s.dtype,
                numel: s.numel,
                offset: s.offset,
                grad: if s.grad.is_some() {
                    self.dev.ptr() + g
                } else {
                    0
                },
                grad_dtype: s.grad.unwrap_or(DType::F32),
            };
            // SAFETY: device memory owned by the Twin, alive for the test.
            unsafe { shard.add_raw(spec).unwrap() };
        }
        shard
    }

    /// Compares every parameter bit for bit; panics with statistics on a difference.
    fn assert_same(&self, what: &str) {
        let mut differ = 0u64;
        let mut total = 0u64;
        let mut worst = 0i64;
        let mut first = Vec::new();
        for (i, s) in self.specs.iter().enumerate() {
            let size = s.dtype.size();
            let mut dev = vec![0u8; s.numel as usize * size];
            self.dev
                .download_at(self.dev_at[i].0 as usize, &mut dev)
                .unwrap();
            // SAFETY: host storage holds numel * size bytes.
            let host = unsafe {
                std::slice::from_raw_parts(self.host[i].as_ptr() as *const u8, dev.len())
            };
            for e in 0..s.numel as usize {
                let (a, b) = (
                    &host[e * size..(e + 1) * size],
                    &dev[e * size..(e + 1) * size],
                );
                total += 1;
                if a != b {
                    differ += 1;
                    let bits =
                        |x: &[u8]| x.iter().rev().fold(0i64, |acc, v| (acc << 8) | *v as i64);
                    worst = worst.max((bits(a) - bits(b)).abs());
                    if first.len() < 5 {
                        first.push(format!(
                            "tensor {i} ({:?}) element {e}: cpu {a:02x?} gpu {b:02x?}",
                            s.dtype
                        ));
                    }
                }
            }
        }
        assert!(
            differ == 0,
            "{what}: {differ} of {total} elements differ ({:.2e}), up to {worst} ulp; {}",
            differ as f64 / total as f64,
            first.join("; ")
        );
    }
}

fn layouts(rng: &mut rand::rngs::StdRng) -> Vec<Vec<Spec>> {
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    let mut out = Vec::new();
    // Many small tensors, odd lengths, offsets not multiples of 4 or 128, some misaligned.
    let mut v = Vec::new();
    let mut off = 3u64;
    for i in 0..40 {
        let dtype = dtypes[i % 3];
        let numel = [1u64, 2, 3, 5, 7, 8, 9, 15, 17, 127, 129, 1000, 4099][rng.gen_range(0..13)];
        let misalign = if i % 5 == 0 {
            dtype.size() as u64 * rng.gen_range(1..4)
        } else {
            0
        };
        v.push(Spec {
            dtype,
            grad: Some(dtypes[(i / 3) % 3]),
            numel,
            offset: off,
            misalign,
            grad_misalign: None,
        });
        off += numel + rng.gen_range(0..9);
    }
    out.push(v);
    out.push(address_cut_layout(0, |_, _| None));
    // Offsets above 2^32, a tensor spanning several chunks, and one with an odd start.
    out.push(vec![
        Spec {
            dtype: DType::BF16,
            grad: Some(DType::F32),
            numel: 70_001,
            offset: (1 << 32) + 5,
            misalign: 0,
            grad_misalign: None,
        },
        Spec {
            dtype: DType::F16,
            grad: Some(DType::BF16),
            numel: 33_333,
            offset: (1 << 33) + 130,
            misalign: 2,
            grad_misalign: None,
        },
        Spec {
            dtype: DType::F32,
            grad: Some(DType::F16),
            numel: 40_000,
            offset: (3 << 40) + 1,
            misalign: 4,
            grad_misalign: None,
        },
    ]);
    out
}

/// Tensors after odd-sized ones (256-aligned data at offsets that are not multiples of 8:
/// every group misaligned by index, so the kernels cut them by address), every dtype and
/// gradient dtype, lengths below 8, around 8 and across chunks (32768 elements: the shift
/// adds a group to the last chunk), offsets near 2^32, every fourth gradient aligned
/// unlike its data; `misalign(i, spec)` places tensor i's data (None: 256-aligned).
fn address_cut_layout(base: u64, misalign: impl Fn(usize, &Spec) -> Option<u64>) -> Vec<Spec> {
    let dtypes = [DType::BF16, DType::F16, DType::F32];
    let lengths = [
        1001u64, 5000, 7, 13, 32768, 4099, 1, 2, 3, 9, 17, 16, 24, 70_001, 31, 33,
    ];
    let mut v = Vec::new();
    let mut off = base;
    for (i, &numel) in lengths.iter().enumerate() {
        let dtype = dtypes[i % 3];
        let grad = dtypes[(i / 3 + i) % 3];
        let mut s = Spec {
            dtype,
            grad: Some(grad),
            numel,
            offset: off,
            misalign: 0,
            grad_misalign: None,
        };
        if i % 4 == 3 {
            // A gradient aligned unlike its data: read element by element.
            s.grad_misalign = Some(grad.size() as u64 * (1 + i as u64 % 3));
        }
        if let Some(m) = misalign(i, &s) {
            s.misalign = m;
        }
        v.push(s);
        off += numel + [0u64, 1, 3][i % 3];
        if i == 9 {
            off += (1 << 32) - 5;
        }
    }
    v
}

fn configs() -> Vec<(Precision, DirectionKind, Rule)> {
    let mut v = Vec::new();
    let precisions = [
        Precision::Nearest,
        Precision::Stochastic,
        Precision::Compensated,
    ];
    let kinds = [DirectionKind::Gaussian, DirectionKind::Rademacher];
    for (i, p) in precisions.iter().enumerate() {
        for (k, kind) in kinds.iter().enumerate() {
            for (r, rule) in Rule::ALL.iter().enumerate() {
                if (i + k + r) % 2 == 0 || *rule == Rule::AdamW {
                    v.push((*p, *kind, *rule));
                }
            }
        }
    }
    v
}

/// Every pass of the backend interface, on both backends, compared after each pass.
#[test]
fn kernels_match_cpu_on_random_shards() {
    if !gpu() {
        return;
    }
    // HYZO_PARITY_QUICK=1 (used under compute-sanitizer) keeps a few configurations.
    let quick = std::env::var_os("HYZO_PARITY_QUICK").is_some();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (li, layout) in layouts(&mut rng).into_iter().enumerate() {
        let take = if quick { 4 } else { usize::MAX };
        for (ci, (precision, kind, rule)) in configs().into_iter().enumerate().take(take) {
            let mut twin = Twin::new(layout.clone(), (li * 100 + ci) as u64);
            let host = twin.host_shard();
            let dev = twin.dev_shard();
            let mut cpu = CpuBackend::new(2).unwrap();
            let mut gpu = exact_backend();
            // Both rule states (spec v2 §5): zeroth-order updates use the main one, the
            // first-order updates below the other.
            let state = StateLayout {
                main_buffers: rule.state_buffers(),
                fo_buffers: rule.state_buffers(),
                residual: precision == Precision::Compensated,
            };
            cpu.allocate_state(&host, state).unwrap();
            gpu.allocate_state(&dev, state).unwrap();
            let tag = format!("layout {li}, {precision:?} {kind:?} {rule:?}");
            for step in 0..3u32 {
                let gen = Generator {
                    seed: 0xC0FF_EE00 + ci as u64,
                    step,
                    kind,
                };
                let q = [1usize, 2, 3, 4, 10][(step as usize + ci) % 5];
                let mu = 1e-2f32;
                // Two perturbation passes, with one and two terms.
                for terms in [
                    vec![Term {
                        direction: 0,
                        coeff: mu,
                    }],
                    vec![
                        Term {
                            direction: 0,
                            coeff: -mu,
                        },
                        Term {
                            direction: (q as u32).min(3),
                            coeff: mu,
                        },
                    ],
                ] {
                    let pass = PerturbPass {
                        gen,
                        terms: &terms,
                        precision,
                    };
                    cpu.perturb(&host, &pass).unwrap();
                    gpu.perturb(&dev, &pass).unwrap();
                    gpu.synchronize().unwrap();
                    twin.assert_same(&format!("{tag}: perturb step {step}"));
                }
                // The update: restore of the last direction fused with the rule.
                let zo: Vec<Term> = (0..q as u32)
                    .map(|d| Term {
                        direction: d,
                        coeff: rng.gen_range(-1.0..1.0),
                    })
                    .collect();
                let rule_params =
                    RuleParams::new(rule, 1e-2, 0.9, 0.999, 1e-8, 1e-3, step as u64 + 1);
                let grad_weight = [None, Some(0.25f32), Some(1.0)][(step as usize + ci) % 3];
                let pass = UpdatePass {
                    gen,
                    restore: Some(Term {
                        direction: (q as u32).min(3),
                        coeff: -mu,
                    }),
                    zo: &zo,
                    grad_weight,
                    rule: rule_params,
                    state: StateSet::Main,
                    t: step as u64 + 1,
                    precision,
                    device_losses: None,
                    tensors: None,
                };
                cpu.update(&host, &pass).unwrap();
                gpu.update(&dev, &pass).unwrap();
                gpu.synchronize().unwrap();
                twin.assert_same(&format!(
                    "{tag}: update step {step} q {q} grad {grad_weight:?}"
                ));
                // A first-order update.
                let pass = UpdatePass {
                    restore: None,
                    zo: &[],
                    grad_weight: Some(1.0),
                    state: StateSet::FirstOrder,
                    ..pass
                };
                cpu.update(&host, &pass).unwrap();
                gpu.update(&dev, &pass).unwrap();
                twin.assert_same(&format!("{tag}: fo update step {step}"));
                assert_eq!(
                    saved_state(&mut cpu),
                    saved_state(&mut gpu),
                    "{tag}: state after step {step}"
                );
            }
            // sq_norm: an f64 sum in another order.
            let gen = Generator {
                seed: 99,
                step: 1,
                kind,
            };
            let a = cpu.sq_norm(&host, gen, 2).unwrap();
            let b = gpu.sq_norm(&dev, gen, 2).unwrap();
            assert!(
                (a - b).abs() <= 1e-12 * a.abs(),
                "{tag}: sq_norm {a} vs {b}"
            );
            // Deterministic: the same value again.
            assert_eq!(b.to_bits(), gpu.sq_norm(&dev, gen, 2).unwrap().to_bits());
            // State round trip through the backend-independent layout.
            let saved = saved_state(&mut gpu);
            let mut rest = saved.as_slice();
            gpu.load_state(&mut |buf: &mut [u8]| {
                let (now, later) = rest.split_at(buf.len());
                buf.copy_from_slice(now);
                rest = later;
                Ok(())
            })
            .unwrap();
            assert!(rest.is_empty());
            assert_eq!(saved_state(&mut gpu), saved);
        }
    }
}

/// One large tensor (several thousand chunks) on both backends.
#[test]
fn huge_tensor_matches_cpu() {
    if !gpu() {
        return;
    }
    let spec = Spec {
        dtype: DType::BF16,
        grad: None,
        // Several thousand chunks on a GPU; on the emulator (a fiber per CUDA thread) 2^20 + 3,
        // still some dozens of chunks, a tail and more chunks than blocks.
        numel: if emulator_enabled() {
            (1 << 20) + 3
        } else {
            (1 << 26) + 3
        },
        offset: (1 << 34) + 6,
        misalign: 0,
        grad_misalign: None,
    };
    let mut twin = Twin::new(vec![spec], 11);
    let host = twin.host_shard();
    let dev = twin.dev_shard();
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut gpu = exact_backend();
    let state = StateLayout {
        main_buffers: 2,
        ..StateLayout::default()
    };
    cpu.allocate_state(&host, state).unwrap();
    gpu.allocate_state(&dev, state).unwrap();
    let gen = Generator {
        seed: 5,
        step: 3,
        kind: DirectionKind::Gaussian,
    };
    let terms = [Term {
        direction: 0,
        coeff: 1e-3,
    }];
    let pass = PerturbPass {
        gen,
        terms: &terms,
        precision: Precision::Nearest,
    };
    cpu.perturb(&host, &pass).unwrap();
    gpu.perturb(&dev, &pass).unwrap();
    twin.assert_same("huge perturb");
    let zo = [Term {
        direction: 0,
        coeff: 0.3,
    }];
    let pass = UpdatePass {
        gen,
        restore: Some(Term {
            direction: 0,
            coeff: -1e-3,
        }),
        zo: &zo,
        grad_weight: None,
        rule: RuleParams::new(Rule::AdamW, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1),
        state: StateSet::Main,
        t: 1,
        precision: Precision::Stochastic,
        device_losses: None,
        tensors: None,
    };
    cpu.update(&host, &pass).unwrap();
    gpu.update(&dev, &pass).unwrap();
    twin.assert_same("huge update");
    assert_eq!(saved_state(&mut cpu), saved_state(&mut gpu));
}

/// A backend's state as `Backend::save_state` streams it.
fn saved_state(backend: &mut dyn Backend) -> Vec<u8> {
    let mut out = Vec::new();
    backend
        .save_state(&mut |bytes: &[u8]| {
            out.extend_from_slice(bytes);
            Ok(())
        })
        .unwrap();
    out
}

fn loss_of(values: &[f32]) -> f32 {
    // A smooth, non-trivial loss: Σ (x_i − 0.1 i)² / n in f64.
    let n = values.len() as f64;
    (values
        .iter()
        .enumerate()
        .map(|(i, x)| (*x as f64 - 0.001 * i as f64).powi(2))
        .sum::<f64>()
        / n) as f32
}

fn host_values(twin: &Twin) -> Vec<f32> {
    let mut all = Vec::new();
    for (i, s) in twin.specs.iter().enumerate() {
        let n = s.numel as usize;
        let p = twin.host[i].as_ptr();
        // SAFETY: host storage of n elements of the dtype.
        unsafe {
            match s.dtype {
                DType::F32 => all.extend_from_slice(std::slice::from_raw_parts(p as *const f32, n)),
                DType::F16 => all.extend(
                    std::slice::from_raw_parts(p as *const f16, n)
                        .iter()
                        .map(|x| x.to_f32()),
                ),
                DType::BF16 => all.extend(
                    std::slice::from_raw_parts(p as *const bf16, n)
                        .iter()
                        .map(|x| x.to_f32()),
                ),
            }
        }
    }
    all
}

fn device_values(twin: &Twin) -> Vec<f32> {
    let mut all = Vec::new();
    for (i, s) in twin.specs.iter().enumerate() {
        let n = s.numel as usize;
        let mut b = vec![0u8; n * s.dtype.size()];
        twin.dev
            .download_at(twin.dev_at[i].0 as usize, &mut b)
            .unwrap();
        for e in 0..n {
            all.push(match s.dtype {
                DType::F32 => f32::from_le_bytes(b[4 * e..4 * e + 4].try_into().unwrap()),
                DType::F16 => f16::from_le_bytes([b[2 * e], b[2 * e + 1]]).to_f32(),
                DType::BF16 => bf16::from_le_bytes([b[2 * e], b[2 * e + 1]]).to_f32(),
            });
        }
    }
    all
}

fn small_layout() -> Vec<Spec> {
    vec![
        Spec {
            dtype: DType::BF16,
            grad: Some(DType::BF16),
            numel: 3001,
            offset: 7,
            misalign: 0,
            grad_misalign: None,
        },
        Spec {
            dtype: DType::F16,
            grad: Some(DType::F32),
            numel: 129,
            offset: 5000,
            misalign: 2,
            grad_misalign: None,
        },
        Spec {
            dtype: DType::F32,
            grad: Some(DType::F16),
            numel: 1000,
            offset: (1 << 32) + 1,
            misalign: 0,
            grad_misalign: None,
        },
    ]
}

/// Device bytes of every parameter of a twin.
fn device_bytes(twin: &Twin) -> Vec<Vec<u8>> {
    twin.specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut b = vec![0u8; s.numel as usize * s.dtype.size()];
            twin.dev
                .download_at(twin.dev_at[i].0 as usize, &mut b)
                .unwrap();
            b
        })
        .collect()
}

/// Groups cut by address (tensors whose data address and global offset disagree modulo 16
/// bytes, kernels/hyzo.cu "Memory") give the bits of index-aligned groups: the same layout
/// placed twice, once with every tensor's data aligned like its offset (index-aligned
/// groups, gradients too) and once 256-aligned after odd-sized tensors (shifted groups,
/// some gradients aligned unlike their data), through the same passes, fast and exact
/// kernels, every precision mode (stochastic rounding included) and direction kind:
/// parameters and state equal bit for bit.
#[test]
fn address_cut_groups_equal_index_aligned_groups() {
    if !gpu() {
        return;
    }
    let shifted_layout = address_cut_layout(3, |_, _| None);
    let aligned_layout: Vec<Spec> = shifted_layout
        .iter()
        .map(|s| {
            let size = s.dtype.size() as u64;
            let gsize = s.grad.unwrap().size() as u64;
            Spec {
                misalign: size * (s.offset % (16 / size)),
                grad_misalign: Some(gsize * (s.offset % (16 / gsize))),
                ..*s
            }
        })
        .collect();
    let shifted_count = shifted_layout
        .iter()
        .filter(|s| s.offset % (16 / s.dtype.size() as u64) != 0)
        .count();
    assert!(shifted_count >= 10, "the layout must shift most tensors");
    let precisions = [
        Precision::Nearest,
        Precision::Stochastic,
        Precision::Compensated,
    ];
    for exact in [false, true] {
        for precision in precisions {
            for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
                for rule in [Rule::AdamW, Rule::Momentum] {
                    let tag = format!("exact {exact} {precision:?} {kind:?} {rule:?}");
                    let twins = [
                        Twin::new(aligned_layout.clone(), 41),
                        Twin::new(shifted_layout.clone(), 41),
                    ];
                    let mut backends = [CudaBackend::new(0).unwrap(), CudaBackend::new(0).unwrap()];
                    let shards: Vec<ParamShard<'static>> =
                        twins.iter().map(|t| t.dev_shard()).collect();
                    let state = StateLayout {
                        main_buffers: rule.state_buffers(),
                        fo_buffers: 2,
                        residual: precision == Precision::Compensated,
                    };
                    for (b, sh) in backends.iter_mut().zip(&shards) {
                        b.set_exact(exact);
                        b.allocate_state(sh, state).unwrap();
                    }
                    for step in 0..2u32 {
                        let gen = Generator {
                            seed: 0x5EED_0000 + step as u64,
                            step,
                            kind,
                        };
                        let mu = 1e-2f32;
                        let one = [Term {
                            direction: 0,
                            coeff: mu,
                        }];
                        let two = [
                            Term {
                                direction: 0,
                                coeff: -2.0 * mu,
                            },
                            Term {
                                direction: 1,
                                coeff: mu,
                            },
                        ];
                        let many: Vec<Term> = (0..10)
                            .map(|d| Term {
                                direction: d,
                                coeff: 0.1 * d as f32 - 0.3,
                            })
                            .collect();
                        let zo = [
                            Term {
                                direction: 0,
                                coeff: 0.5,
                            },
                            Term {
                                direction: 1,
                                coeff: -0.25,
                            },
                        ];
                        for (b, sh) in backends.iter_mut().zip(&shards) {
                            for terms in [&one[..], &two[..], &many[..]] {
                                let pass = PerturbPass {
                                    gen,
                                    terms,
                                    precision,
                                };
                                b.perturb(sh, &pass).unwrap();
                            }
                            let pass = UpdatePass {
                                gen,
                                restore: Some(Term {
                                    direction: 1,
                                    coeff: -mu,
                                }),
                                zo: &zo,
                                grad_weight: [None, Some(0.25f32)][step as usize],
                                rule: RuleParams::new(rule, 1e-2, 0.9, 0.999, 1e-8, 1e-3, 1),
                                state: StateSet::Main,
                                t: step as u64 + 1,
                                precision,
                                device_losses: None,
                                tensors: None,
                            };
                            b.update(sh, &pass).unwrap();
                            let fo = UpdatePass {
                                restore: None,
                                zo: &[],
                                grad_weight: Some(1.0),
                                rule: RuleParams::new(Rule::AdamW, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1),
                                state: StateSet::FirstOrder,
                                ..pass
                            };
                            b.update(sh, &fo).unwrap();
                            b.synchronize().unwrap();
                        }
                        let (a, s) = (device_bytes(&twins[0]), device_bytes(&twins[1]));
                        for (i, (x, y)) in a.iter().zip(&s).enumerate() {
                            let first = x.iter().zip(y).position(|(p, q)| p != q);
                            assert!(
                                first.is_none(),
                                "{tag} step {step}: tensor {i} ({:?}, offset {}) differs at byte {first:?}",
                                twins[1].specs[i].dtype,
                                twins[1].specs[i].offset
                            );
                        }
                        let [ba, bs] = &mut backends;
                        assert!(
                            saved_state(ba) == saved_state(bs),
                            "{tag} step {step}: state differs"
                        );
                        // sq_norm keeps the index-aligned groups: the same sum.
                        let (na, ns) = (
                            ba.sq_norm(&shards[0], gen, 1).unwrap(),
                            bs.sq_norm(&shards[1], gen, 1).unwrap(),
                        );
                        assert_eq!(na.to_bits(), ns.to_bits(), "{tag}: sq_norm");
                    }
                }
            }
        }
    }
}

/// Whole optimizer steps (the step protocol of optimizer.rs) on both backends: two- and
/// one-sided, q = 1..4, every direction kind (the sphere included), hybrid schedules.
#[test]
fn optimizer_steps_match_cpu() {
    if !gpu() {
        return;
    }
    let mut case = 0;
    for estimator in [Estimator::TwoSided, Estimator::OneSided] {
        for q in 1..=4u32 {
            for direction in [
                DirectionKind::Gaussian,
                DirectionKind::Rademacher,
                DirectionKind::Sphere,
            ] {
                case += 1;
                let rule = Rule::ALL[case % 6];
                let precision = [
                    Precision::Nearest,
                    Precision::Stochastic,
                    Precision::Compensated,
                ][case % 3];
                let hybrid = case % 4 == 0;
                let config = Config {
                    seed: 1234 + case as u64,
                    lr: 1e-2,
                    eps: 1e-2,
                    num_directions: q,
                    direction,
                    estimator,
                    rule,
                    weight_decay: 1e-3,
                    precision,
                    fo_steps: if hybrid { 1 } else { 0 },
                    zo_steps: if hybrid { 2 } else { 0 },
                    hybrid_alpha: if case % 5 == 0 { 0.5 } else { 0.0 },
                    ..Config::default()
                };
                let mut twin = Twin::new(small_layout(), case as u64);
                let host = twin.host_shard();
                let dev = twin.dev_shard();
                let twin_ptr: *const Twin = &twin;
                let mut cpu = Optimizer::with_backend(
                    config.clone(),
                    host,
                    Box::new(CpuBackend::new(2).unwrap()),
                )
                .unwrap();
                let mut gpu =
                    Optimizer::with_backend(config.clone(), dev, Box::new(exact_backend()))
                        .unwrap();
                for s in 0..5 {
                    if cpu.next_phase() == Some(hyzo::Phase::FirstOrder) {
                        cpu.fo_step().unwrap();
                        gpu.fo_step().unwrap();
                    } else {
                        // SAFETY: the twin outlives both optimizers; the loss only reads.
                        let a = cpu
                            .zo_step(|_| loss_of(&host_values(unsafe { &*twin_ptr })))
                            .unwrap();
                        let b = gpu
                            .zo_step(|_| loss_of(&device_values(unsafe { &*twin_ptr })))
                            .unwrap();
                        assert_eq!(a, b, "case {case} step {s}: reports");
                    }
                    twin.assert_same(&format!("case {case} {config:?} step {s}"));
                }
                assert_eq!(
                    cpu.save_state().unwrap(),
                    gpu.save_state().unwrap(),
                    "case {case}: state"
                );
            }
        }
    }
}

/// Runs one zeroth-order step feeding losses from device memory; `nan_at` poisons one.
fn device_loss_step(opt: &mut Optimizer, twin: &Twin, loss_buf: &CudaBuffer, nan_at: Option<u32>) {
    opt.begin().unwrap();
    let mut e = 0;
    loop {
        opt.synchronize().unwrap();
        let l = if nan_at == Some(e) {
            f32::NAN
        } else {
            loss_of(&device_values(twin))
        };
        let slot = (e % 8) as usize * 4;
        loss_buf.upload_at(slot, &[l]).unwrap();
        e += 1;
        match opt.feed_device(loss_buf.ptr() + slot as u64).unwrap() {
            Feed::NeedsForward => {}
            Feed::Done(r) => {
                assert!(r.loss.is_none());
                return;
            }
        }
    }
}

/// Losses fed from device memory (projected gradients and the finiteness check on the
/// device) give the host path's result; a NaN loss skips the step on the device.
#[test]
fn device_losses_match_host_losses() {
    if !gpu() {
        return;
    }
    // q = 1, 2, 4: the device's g_d · (1/q) equals the host's g_d / q exactly.
    for (case, q) in [1u32, 2, 4].into_iter().enumerate() {
        for estimator in [Estimator::TwoSided, Estimator::OneSided] {
            let config = Config {
                seed: 77,
                lr: 1e-2,
                eps: 1e-2,
                num_directions: q,
                estimator,
                rule: Rule::AdamW,
                precision: Precision::Compensated,
                ..Config::default()
            };
            let mut twin = Twin::new(small_layout(), 500 + case as u64);
            let host = twin.host_shard();
            let dev = twin.dev_shard();
            let twin_ptr: *const Twin = &twin;
            let loss_buf = CudaBuffer::new(0, 64).unwrap();
            let mut cpu = Optimizer::with_backend(
                config.clone(),
                host,
                Box::new(CpuBackend::new(2).unwrap()),
            )
            .unwrap();
            let mut gpu =
                Optimizer::with_backend(config.clone(), dev, Box::new(exact_backend())).unwrap();
            for s in 0..3 {
                cpu.zo_step(|_| {
                    // SAFETY: the twin outlives the optimizers.
                    loss_of(&host_values(unsafe { &*twin_ptr }))
                })
                .unwrap();
                // SAFETY: as above.
                device_loss_step(&mut gpu, unsafe { &*twin_ptr }, &loss_buf, None);
                twin.assert_same(&format!("device losses q {q} {estimator:?} step {s}"));
            }
            assert_eq!(cpu.save_state().unwrap(), gpu.save_state().unwrap());
        }
    }
}

/// A skipped step on the device restores exactly like the host's skipped step.
#[test]
fn device_skip_restores_like_the_host() {
    if !gpu() {
        return;
    }
    for precision in [
        Precision::Nearest,
        Precision::Stochastic,
        Precision::Compensated,
    ] {
        let config = Config {
            seed: 3,
            num_directions: 2,
            rule: Rule::Momentum,
            precision,
            ..Config::default()
        };
        let mut twin = Twin::new(small_layout(), 900);
        let host = twin.host_shard();
        let dev = twin.dev_shard();
        let twin_ptr: *const Twin = &twin;
        let loss_buf = CudaBuffer::new(0, 64).unwrap();
        let mut cpu =
            Optimizer::with_backend(config.clone(), host, Box::new(CpuBackend::new(2).unwrap()))
                .unwrap();
        let mut gpu =
            Optimizer::with_backend(config.clone(), dev, Box::new(exact_backend())).unwrap();
        let mut e = 0;
        let report = cpu
            .zo_step(|_| {
                e += 1;
                if e == 2 {
                    f32::INFINITY
                } else {
                    1.0
                }
            })
            .unwrap();
        assert!(report.skipped);
        // On the emulator the one-block kernels (device losses, counters) run on 3 blocks:
        // their grid guards keep the skip counted once (hyzo_device_losses once had none).
        if emulator_enabled() {
            emulator_set_extra_blocks(2);
        }
        // SAFETY: the twin outlives the optimizers.
        device_loss_step(&mut gpu, unsafe { &*twin_ptr }, &loss_buf, Some(1));
        emulator_set_extra_blocks(0);
        assert_eq!(gpu.skipped().unwrap(), 1, "the device skip counted once");
        twin.assert_same(&format!("skipped step, {precision:?}"));
        assert_eq!(
            cpu.save_state().unwrap()[48..],
            gpu.save_state().unwrap()[48..]
        );
    }
}

/// A whole zeroth-order step with device losses, captured in a CUDA graph and replayed,
/// gives exactly the eager step's result.
#[test]
fn graph_replay_equals_eager() {
    if !gpu() {
        return;
    }
    let config = Config {
        seed: 21,
        num_directions: 3,
        rule: Rule::AdamW,
        precision: Precision::Stochastic,
        ..Config::default()
    };
    let layout = vec![Spec {
        dtype: DType::F32,
        grad: None,
        numel: 10_007,
        offset: 3,
        misalign: 0,
        grad_misalign: None,
    }];
    let run = |capture: bool| -> Vec<u8> {
        let twin = Twin::new(layout.clone(), 42);
        let dev = twin.dev_shard();
        let backend = CudaBackend::new(0).unwrap();
        let stream = backend.stream();
        let mut opt = Optimizer::with_backend(config.clone(), dev, Box::new(backend)).unwrap();
        // Warm-up: allocate state and scratch outside the capture (an eager step on the
        // zeroed losses would change parameters, so only prepare through local_sq_norms).
        opt.local_sq_norms().unwrap();
        // The "forward pass": the loss is parameter 0, copied on the stream by the driver.
        let loss_src = twin.dev.ptr() + twin.dev_at[0].0;
        let step = |opt: &mut Optimizer| {
            opt.begin().unwrap();
            while let Feed::NeedsForward = opt.feed_device(loss_src).unwrap() {}
        };
        if capture {
            let mut be = CudaBackend::new(0).unwrap();
            // SAFETY: capture on the optimizer's stream through a second handle that borrows it.
            unsafe { be.set_stream(stream).unwrap() };
            be.begin_capture().unwrap();
            step(&mut opt);
            let graph = be.end_capture().unwrap();
            graph.launch_on(stream).unwrap();
        } else {
            step(&mut opt);
        }
        opt.synchronize().unwrap();
        let mut out = vec![0u8; 4 * 10_007];
        twin.dev
            .download_at(twin.dev_at[0].0 as usize, &mut out)
            .unwrap();
        out.extend(opt.save_state().unwrap());
        out
    };
    let eager = run(false);
    let replay = run(true);
    assert!(eager == replay, "graph replay differs from the eager step");
}

/// The device-counter mode: one zeroth-order step (device losses) captured once and
/// replayed N times equals N ordinary steps bit for bit (parameters, both moments, the
/// counters), with a step skipped on the device in the middle (its losses infinite: the
/// step number advances, the bias corrections' t does not), and a displacement at another
/// step after the replays (its step travels as a distance from the device's).
#[test]
fn graph_replays_across_steps() {
    if !gpu() {
        return;
    }
    const N: usize = 7;
    const SKIP: usize = 3;
    let config = Config {
        seed: 33,
        lr: 1e-2,
        eps: 1e-2,
        num_directions: 2,
        rule: Rule::AdamW,
        precision: Precision::Stochastic,
        ..Config::default()
    };
    let layout = vec![
        Spec {
            dtype: DType::BF16,
            grad: None,
            numel: 5_003,
            offset: 3,
            misalign: 0,
            grad_misalign: None,
        },
        Spec {
            dtype: DType::F32,
            grad: None,
            numel: 777,
            offset: 5_006,
            misalign: 4,
            grad_misalign: None,
        },
    ];
    let run = |graph: bool| -> (Vec<u8>, [u64; 3]) {
        let twin = Twin::new(layout.clone(), 8);
        let dev = twin.dev_shard();
        let mut backend = CudaBackend::new(0).unwrap();
        backend.set_device_counters(graph);
        let stream = backend.stream();
        let mut opt = Optimizer::with_backend(config.clone(), dev, Box::new(backend)).unwrap();
        opt.local_sq_norms().unwrap();
        // The "forward pass": the loss is the f32 tensor's element 0, copied on the stream.
        let loss_at = twin.dev_at[1].0 as usize;
        let loss_src = twin.dev.ptr() + loss_at as u64;
        let step = |opt: &mut Optimizer| {
            opt.begin().unwrap();
            while let Feed::NeedsForward = opt.feed_device(loss_src).unwrap() {}
        };
        // Step SKIP sees an infinite loss (the same host writes around it in both runs).
        let mut saved = [0f32];
        let mut poison = |opt: &mut Optimizer, on: bool| {
            opt.synchronize().unwrap();
            if on {
                twin.dev.download_at(loss_at, &mut saved).unwrap();
                twin.dev.upload_at(loss_at, &[f32::INFINITY]).unwrap();
            } else {
                twin.dev.upload_at(loss_at, &saved).unwrap();
            }
        };
        if graph {
            let mut be = CudaBackend::new(0).unwrap();
            // SAFETY: capture on the optimizer's stream through a second handle.
            unsafe { be.set_stream(stream).unwrap() };
            be.begin_capture().unwrap();
            step(&mut opt);
            let g = be.end_capture().unwrap();
            for i in 0..N {
                if i == SKIP {
                    poison(&mut opt, true);
                }
                g.launch_on(stream).unwrap();
                if i == SKIP {
                    poison(&mut opt, false);
                }
            }
            opt.sync_counters().unwrap();
        } else {
            for i in 0..N {
                if i == SKIP {
                    poison(&mut opt, true);
                }
                step(&mut opt);
                if i == SKIP {
                    poison(&mut opt, false);
                }
            }
            opt.sync_counters().unwrap(); // a no-op without device counters
        }
        opt.displace(5, 2, 1, 0.25).unwrap();
        opt.synchronize().unwrap();
        let mut out = vec![0u8; twin.dev.bytes()];
        twin.dev.download(&mut out).unwrap();
        out.extend(opt.save_state().unwrap());
        let counts = [opt.steps(), opt.updates().unwrap(), opt.skipped().unwrap()];
        (out, counts)
    };
    let (eager, eager_counts) = run(false);
    let (replay, replay_counts) = run(true);
    assert_eq!(eager_counts, [N as u64, N as u64 - 1, 1]);
    assert_eq!(replay_counts, eager_counts);
    assert!(
        eager == replay,
        "N graph replays differ from N ordinary steps"
    );
}

/// `Optimizer::set_stream` reaches the CUDA backend (it once got the `Backend` trait's
/// default, "this backend has no streams", so every CUDA optimizer refused a stream: fixed
/// on main by `DeviceQueue`, issue 27; this test runs it on the device), and
/// steps on the borrowed stream equal the CPU's.
#[test]
fn optimizer_set_stream_reaches_the_backend() {
    if !gpu() {
        return;
    }
    let mut twin = Twin::new(small_layout(), 8);
    let host = twin.host_shard();
    let dev = twin.dev_shard();
    let twin_ptr: *const Twin = &twin;
    let owner = CudaBackend::new(0).unwrap();
    let config = Config::default();
    let mut cpu =
        Optimizer::with_backend(config.clone(), host, Box::new(CpuBackend::new(1).unwrap()))
            .unwrap();
    let mut gpu = Optimizer::with_backend(config, dev, Box::new(exact_backend())).unwrap();
    // SAFETY: `owner`'s stream outlives its use (the default stream is set back first).
    unsafe { gpu.set_stream(owner.stream()) }.expect("Optimizer::set_stream on a CUDA optimizer");
    for s in 0..2 {
        // SAFETY: the twin outlives both optimizers; the loss only reads.
        let a = cpu
            .zo_step(|_| loss_of(&host_values(unsafe { &*twin_ptr })))
            .unwrap();
        let b = gpu
            .zo_step(|_| loss_of(&device_values(unsafe { &*twin_ptr })))
            .unwrap();
        assert_eq!(a, b, "step {s}: reports");
        twin.assert_same(&format!("set_stream step {s}"));
    }
    // Back to the default stream before `owner`'s stream goes.
    // SAFETY: 0, the legacy default stream.
    unsafe { gpu.set_stream(0) }.unwrap();
    drop(gpu);
    drop(owner);
}

/// The backend on the caller's stream and memory: nothing borrowed is freed, and passes
/// run in the caller's stream order.
#[test]
fn borrowed_stream_runs_passes() {
    if !gpu() {
        return;
    }
    let mut twin = Twin::new(small_layout(), 3);
    let host = twin.host_shard();
    let dev = twin.dev_shard();
    let owner = CudaBackend::new(0).unwrap();
    let mut gpu = exact_backend();
    // SAFETY: `owner`'s stream outlives `gpu` (dropped first).
    unsafe { gpu.set_stream(owner.stream()).unwrap() };
    let mut cpu = CpuBackend::new(1).unwrap();
    cpu.allocate_state(&host, StateLayout::default()).unwrap();
    gpu.allocate_state(&dev, StateLayout::default()).unwrap();
    let terms = [Term {
        direction: 1,
        coeff: 0.5,
    }];
    let pass = PerturbPass {
        gen: Generator {
            seed: 1,
            step: 2,
            kind: DirectionKind::Gaussian,
        },
        terms: &terms,
        precision: Precision::Nearest,
    };
    cpu.perturb(&host, &pass).unwrap();
    gpu.perturb(&dev, &pass).unwrap();
    gpu.synchronize().unwrap();
    twin.assert_same("borrowed stream");
    drop(gpu);
    drop(owner);
}

/// The fast kernels (the default): Gaussian entries within spec v2 §3's tolerance of the
/// CPU's, and 16-bit parameters within one ulp of the CPU's on at most 1e-3 of the elements
/// (where the tolerance straddles a rounding boundary; docs/interpretation.md).
#[test]
fn fast_kernels_within_tolerance() {
    if !gpu() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let layout = layouts(&mut rng).pop().unwrap();
    for coeff in [1.0f32, 1e-2] {
        let mut twin = Twin::new(layout.clone(), 77);
        let before = host_values(&twin);
        let host = twin.host_shard();
        let dev = twin.dev_shard();
        let mut cpu = CpuBackend::new(2).unwrap();
        let mut gpu = CudaBackend::new(0).unwrap();
        gpu.set_exact(false);
        cpu.allocate_state(&host, StateLayout::default()).unwrap();
        gpu.allocate_state(&dev, StateLayout::default()).unwrap();
        let terms = [Term {
            direction: 1,
            coeff,
        }];
        let pass = PerturbPass {
            gen: Generator {
                seed: 5,
                step: 9,
                kind: DirectionKind::Gaussian,
            },
            terms: &terms,
            precision: Precision::Nearest,
        };
        cpu.perturb(&host, &pass).unwrap();
        gpu.perturb(&dev, &pass).unwrap();
        gpu.synchronize().unwrap();
        let (a, b) = (host_values(&twin), device_values(&twin));
        let (mut i, mut differ, mut total) = (0usize, 0u64, 0u64);
        for s in &twin.specs {
            for _ in 0..s.numel {
                let z = (a[i] - before[i]) / coeff;
                if s.dtype == DType::F32 {
                    // f32 keeps the perturbation: the entries themselves are compared.
                    let err = (a[i] - b[i]).abs() / coeff;
                    let bound = 1e-4 * (1.0 + z.abs()) + 4.0 * f32::EPSILON * a[i].abs() / coeff;
                    assert!(
                        err <= bound,
                        "element {i}: cpu {} gpu {} (z {z})",
                        a[i],
                        b[i]
                    );
                } else if a[i] != b[i] {
                    let ulp = if s.dtype == DType::BF16 {
                        2f32.powi(-7)
                    } else {
                        2f32.powi(-10)
                    };
                    let scale = 2f32.powi(a[i].abs().max(1e-30).log2().floor() as i32);
                    // One ulp of the result, plus the entry's own tolerance carried into it:
                    // where x + c·z nearly cancels, that is many ulps of a small result.
                    let carried = coeff * 1e-4 * (1.0 + z.abs());
                    assert!(
                        (a[i] - b[i]).abs() <= ulp * scale * 1.01 + carried,
                        "element {i}: cpu {} gpu {}",
                        a[i],
                        b[i]
                    );
                    differ += 1;
                }
                total += 1;
                i += 1;
            }
        }
        assert!(
            differ as f64 <= 1e-3 * total as f64,
            "coeff {coeff}: {differ} of {total} 16-bit elements differ by an ulp"
        );
    }
}

/// Without a driver or with a wrong ordinal the backend reports `NoDevice`, never panics.
#[test]
fn missing_device_is_an_error() {
    gpu();
    let ordinal = 1 << 20;
    match CudaBackend::new(ordinal) {
        Err(hyzo::Error::NoDevice(msg)) => println!("as expected: {msg}"),
        other => panic!("expected NoDevice, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Low-rank directions (spec §7).

/// A shard for low-rank steps: 2-D bf16 and f32 tensors (cols not a multiple of 8, a rank
/// above min(rows, cols), odd global offsets, one spanning two chunks above 2^32, one
/// misaligned) and 1-D tensors, which take the written Gaussian. `(spec, shape)`.
fn lowrank_layout() -> Vec<(Spec, Option<(u64, u64)>)> {
    let spec = |dtype, numel, offset, misalign| Spec {
        dtype,
        grad: None,
        numel,
        offset,
        misalign,
        grad_misalign: None,
    };
    vec![
        (spec(DType::BF16, 37 * 29, 7, 0), Some((37, 29))),
        (spec(DType::F32, 129, 2000, 0), None),
        // rank 4 > min(3, 5): r_t = 3.
        (spec(DType::F32, 15, 3001, 0), Some((3, 5))),
        (spec(DType::BF16, 17, 4000, 2), None),
        (spec(DType::F32, 64 * 24, 5003, 4), Some((64, 24))),
        (
            spec(DType::BF16, 200 * 100, (1 << 32) + 3, 0),
            Some((200, 100)),
        ),
    ]
}

const LOWRANK_RANK: u32 = 4;

fn lowrank_config(rule: Rule, precision: Precision) -> Config {
    Config {
        seed: 0x10_4a4b,
        lr: 1e-2,
        eps: 1e-2,
        num_directions: 2,
        direction: DirectionKind::LowRank,
        rank: LOWRANK_RANK,
        estimator: Estimator::TwoSided,
        rule,
        weight_decay: 1e-3,
        precision,
        ..Config::default()
    }
}

/// The CPU and the CUDA optimizer over one low-rank twin (shapes given to both).
fn lowrank_pair<'a>(
    config: &Config,
    twin: &mut Twin,
    gpu_backend: CudaBackend,
) -> (Optimizer<'a>, Optimizer<'a>) {
    let host = twin.host_shard();
    let dev = twin.dev_shard();
    let mut cpu =
        Optimizer::with_backend(config.clone(), host, Box::new(CpuBackend::new(2).unwrap()))
            .unwrap();
    let mut gpu = Optimizer::with_backend(config.clone(), dev, Box::new(gpu_backend)).unwrap();
    for (i, (_, shape)) in lowrank_layout().iter().enumerate() {
        if let Some((rows, cols)) = shape {
            cpu.set_shape(i, *rows, *cols).unwrap();
            gpu.set_shape(i, *rows, *cols).unwrap();
        }
    }
    (cpu, gpu)
}

/// One direction's factors from an optimizer: host memory for the CPU, through a device
/// buffer for CUDA.
fn factors_of(opt: &mut Optimizer, direction: u32, device: bool) -> Vec<f32> {
    if !device {
        return opt.lowrank_factors(direction).unwrap();
    }
    let len = opt.lowrank_factors_len();
    let buf = CudaBuffer::new(0, 4 * len as usize).unwrap();
    // SAFETY: the buffer holds len f32 on the optimizer's device.
    unsafe { opt.lowrank_factors_raw(direction, buf.ptr(), len).unwrap() };
    opt.synchronize().unwrap();
    let mut out = vec![0f32; len as usize];
    buf.download(&mut out).unwrap();
    out
}

/// The loss of the forward pass: the stored values plus `c Z_d` on the low-rank tensors
/// (spec §7), `Z_d` rebuilt from the optimizer's own factors.
fn lowrank_loss(opt: &mut Optimizer, values: Vec<f32>, device: bool) -> f32 {
    let mut values = values;
    if let Some(t) = opt.forward_perturbation() {
        let factors = factors_of(opt, t.direction, device);
        let (mut start, mut at) = (0usize, 0usize);
        for (s, shape) in lowrank_layout() {
            if let Some((rows, cols)) = shape {
                let sh = hyzo::direction::LowRankShape::new(rows, cols, LOWRANK_RANK);
                let r = sh.rank as usize;
                let (a, b) =
                    factors[at..at + sh.factors_len() as usize].split_at(sh.a_len() as usize);
                for i in 0..rows as usize {
                    for k in 0..cols as usize {
                        let z = hyzo::direction::LowRankShape::entry(
                            &a[i * r..(i + 1) * r],
                            &b[k * r..(k + 1) * r],
                            sh.scale(),
                        );
                        values[start + i * cols as usize + k] += t.coeff * z;
                    }
                }
                at += sh.factors_len() as usize;
            }
            start += s.numel as usize;
        }
    }
    loss_of(&values)
}

/// The values of the low-rank tensors (device side).
fn lowrank_tensor_values(twin: &Twin) -> Vec<f32> {
    let all = device_values(twin);
    let mut out = Vec::new();
    let mut start = 0usize;
    for (s, shape) in lowrank_layout() {
        if shape.is_some() {
            out.extend_from_slice(&all[start..start + s.numel as usize]);
        }
        start += s.numel as usize;
    }
    out
}

/// One low-rank step by hand (begin, forward, feed): losses from the host, or from device
/// memory through `loss_buf`. On the device side, checks that no pass writes the low-rank
/// tensors before the update.
fn lowrank_step(opt: &mut Optimizer, twin: &Twin, device: bool, loss_buf: Option<&CudaBuffer>) {
    let frozen = device.then(|| lowrank_tensor_values(twin));
    opt.begin().unwrap();
    let mut e = 0u32;
    loop {
        opt.synchronize().unwrap();
        if let Some(f) = &frozen {
            assert_eq!(
                &lowrank_tensor_values(twin),
                f,
                "a perturbation pass wrote a low-rank tensor (evaluation {e})"
            );
        }
        let values = if device {
            device_values(twin)
        } else {
            host_values(twin)
        };
        let l = lowrank_loss(opt, values, device);
        let feed = match loss_buf {
            Some(buf) => {
                let slot = (e % 8) as usize * 4;
                buf.upload_at(slot, &[l]).unwrap();
                opt.feed_device(buf.ptr() + slot as u64).unwrap()
            }
            None => opt.feed(l).unwrap(),
        };
        e += 1;
        if let Feed::Done(_) = feed {
            return;
        }
    }
}

fn lowrank_twin(seed: u64) -> Twin {
    Twin::new(lowrank_layout().into_iter().map(|(s, _)| s).collect(), seed)
}

/// Exact kernels: low-rank steps (SGD and AdamW, two-sided, q = 2; losses from the host and
/// from device memory) equal the CPU's bit for bit, parameters and state; the factors too;
/// and no perturbation pass writes a low-rank tensor.
#[test]
fn lowrank_steps_match_cpu() {
    if !gpu() {
        return;
    }
    for (case, (rule, precision)) in [
        (Rule::Sgd, Precision::Nearest),
        (Rule::AdamW, Precision::Nearest),
        (Rule::AdamW, Precision::Stochastic),
        (Rule::Sgd, Precision::Compensated),
    ]
    .into_iter()
    .enumerate()
    {
        for device_losses in [false, true] {
            let config = lowrank_config(rule, precision);
            let mut twin = lowrank_twin(900 + case as u64);
            let twin_ptr: *const Twin = &twin;
            let (mut cpu, mut gpu) = lowrank_pair(&config, &mut twin, exact_backend());
            let loss_buf = CudaBuffer::new(0, 64).unwrap();
            for s in 0..4 {
                // The factors of the step to come, then the step.
                for d in 0..config.num_directions {
                    let (a, b) = (
                        factors_of(&mut cpu, d, false),
                        factors_of(&mut gpu, d, true),
                    );
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{rule:?} step {s} direction {d}: factors differ"
                    );
                }
                // SAFETY: the twin outlives both optimizers; the loss only reads.
                lowrank_step(&mut cpu, unsafe { &*twin_ptr }, false, None);
                lowrank_step(
                    &mut gpu,
                    unsafe { &*twin_ptr },
                    true,
                    device_losses.then_some(&loss_buf),
                );
                twin.assert_same(&format!(
                    "low-rank {rule:?} {precision:?} device losses {device_losses} step {s}"
                ));
            }
            assert_eq!(
                cpu.save_state().unwrap(),
                gpu.save_state().unwrap(),
                "low-rank {rule:?}: state"
            );
        }
    }
}

/// Fast kernels: the factors within spec §3's tolerance of the CPU's, and a few low-rank
/// steps within a small tolerance of the CPU's parameters.
#[test]
fn lowrank_fast_kernels_within_tolerance() {
    if !gpu() {
        return;
    }
    for rule in [Rule::Sgd, Rule::AdamW] {
        let config = lowrank_config(rule, Precision::Nearest);
        let mut twin = lowrank_twin(950);
        let twin_ptr: *const Twin = &twin;
        let mut fast = CudaBackend::new(0).unwrap();
        fast.set_exact(false);
        let (mut cpu, mut gpu) = lowrank_pair(&config, &mut twin, fast);
        for s in 0..3 {
            for d in 0..config.num_directions {
                let (a, b) = (
                    factors_of(&mut cpu, d, false),
                    factors_of(&mut gpu, d, true),
                );
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                        "{rule:?} step {s} direction {d} factor {i}: cpu {x} gpu {y}"
                    );
                }
            }
            // SAFETY: the twin outlives both optimizers; the loss only reads.
            lowrank_step(&mut cpu, unsafe { &*twin_ptr }, false, None);
            lowrank_step(&mut gpu, unsafe { &*twin_ptr }, true, None);
            let (a, b) = (host_values(&twin), device_values(&twin));
            let mut i = 0;
            for (spec, _) in lowrank_layout() {
                let ulp = match spec.dtype {
                    DType::BF16 => 2f32.powi(-7),
                    DType::F16 => 2f32.powi(-10),
                    DType::F32 => f32::EPSILON,
                };
                for _ in 0..spec.numel {
                    let bound = 1e-3 * (1.0 + a[i].abs()) + 2.0 * ulp * a[i].abs();
                    assert!(
                        (a[i] - b[i]).abs() <= bound,
                        "{rule:?} step {s} element {i}: cpu {} gpu {}",
                        a[i],
                        b[i]
                    );
                    i += 1;
                }
            }
        }
    }
}

/// Every fast update kernel (each direction kind and rule, and the first-order update of
/// each rule) against the CPU: bit for bit where the fast variant computes as the CPU does
/// (Rademacher directions, first-order updates: no Gaussian), within the Gaussian's
/// tolerance otherwise. With `kernels_match_cpu_on_random_shards` (the exact kernels) and
/// the fast perturbation and sq_norm tests, every entry point runs (tests/kernel_coverage.rs
/// checks it on the emulated device).
#[test]
fn every_fast_update_kernel_matches_cpu() {
    if !gpu() {
        return;
    }
    let layout = vec![Spec {
        dtype: DType::F32,
        grad: Some(DType::F32),
        numel: 4_099,
        offset: 13,
        misalign: 0,
        grad_misalign: None,
    }];
    for kind in [DirectionKind::Gaussian, DirectionKind::Rademacher] {
        for (r, rule) in Rule::ALL.iter().enumerate() {
            for fo in [false, true] {
                let mut twin = Twin::new(layout.clone(), 40 + r as u64);
                let host = twin.host_shard();
                let dev = twin.dev_shard();
                let mut cpu = CpuBackend::new(1).unwrap();
                let mut gpu = CudaBackend::new(0).unwrap();
                gpu.set_exact(false);
                let state = StateLayout {
                    main_buffers: 2,
                    ..StateLayout::default()
                };
                cpu.allocate_state(&host, state).unwrap();
                gpu.allocate_state(&dev, state).unwrap();
                let gen = Generator {
                    seed: 9,
                    step: 4,
                    kind,
                };
                let zo = [Term {
                    direction: 0,
                    coeff: 0.25,
                }];
                let pass = UpdatePass {
                    gen,
                    restore: if fo {
                        None
                    } else {
                        Some(Term {
                            direction: 0,
                            coeff: -1e-3,
                        })
                    },
                    zo: if fo { &[] } else { &zo },
                    grad_weight: if fo { Some(1.0) } else { None },
                    rule: RuleParams::new(*rule, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1),
                    state: StateSet::Main,
                    t: 1,
                    precision: Precision::Nearest,
                    device_losses: None,
                    tensors: None,
                };
                cpu.update(&host, &pass).unwrap();
                gpu.update(&dev, &pass).unwrap();
                gpu.synchronize().unwrap();
                let what = format!("fast update {kind:?} {rule:?} fo {fo}");
                if fo || kind == DirectionKind::Rademacher {
                    twin.assert_same(&what);
                } else {
                    let (a, b) = (host_values(&twin), device_values(&twin));
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        // The rules scale an estimate within 1e-4 relative of the CPU's by
                        // at most lr (1e-2, Adam's normalized step included) per element.
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                            "{what}: element {i}: cpu {x} gpu {y}"
                        );
                    }
                }
            }
        }
    }
}
