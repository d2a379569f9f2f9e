//! The host side of the device-counter mode (CUDA graphs replayed across steps), on the
//! CPU: a backend that keeps the counts "on the device" the way the CUDA backend does
//! (stores what `set_counters` says, advances step and the state's t after each update
//! pass) always agrees with the optimizer's own counts, through zeroth-order steps, a
//! host-side skip, first-order steps and a load; and `sync_counters` takes the counts a
//! replayed graph advanced. The same schedule then runs on the CUDA backend's own
//! device-counter mode (on the emulated device without a GPU): the counters kernel against
//! the CPU optimizer; graph replays: tests/gpu_parity.rs `graph_replays_across_steps`.

use std::sync::{Arc, Mutex};

use hyzo::backend::{
    Backend, DeviceQueue, Generator, PerturbPass, StateLayout, StateSink, StateSource, UpdatePass,
};
use hyzo::{Config, CpuBackend, Optimizer, ParamShard, Result, Rule};

type Counts = Arc<Mutex<Option<(u64, [u64; 2])>>>;

/// The CPU backend plus counts kept the way the CUDA backend's device-counter mode keeps
/// them.
struct Counting {
    cpu: CpuBackend,
    counts: Counts,
}

impl Backend for Counting {
    fn name(&self) -> String {
        "counting".into()
    }
    fn allocate_state(&mut self, shard: &ParamShard, layout: StateLayout) -> Result<()> {
        self.cpu.allocate_state(shard, layout)
    }
    fn perturb(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<()> {
        self.cpu.perturb(shard, pass)
    }
    fn update(&mut self, shard: &ParamShard, pass: &UpdatePass) -> Result<()> {
        self.cpu.update(shard, pass)?;
        let mut c = self.counts.lock().unwrap();
        let (step, t) = c.as_mut().expect("set_counters before the first update");
        // What the device reads for this pass: its step and t, as the host passes them.
        assert_eq!(pass.gen.step as u64, *step);
        assert_eq!(pass.t, t[pass.state as usize] + 1);
        *step += 1;
        t[pass.state as usize] += 1;
        Ok(())
    }
    fn sq_norm(&mut self, shard: &ParamShard, gen: Generator, direction: u32) -> Result<f64> {
        self.cpu.sq_norm(shard, gen, direction)
    }
    fn save_state(&mut self, sink: &mut StateSink) -> Result<()> {
        self.cpu.save_state(sink)
    }
    fn load_state(&mut self, source: &mut StateSource) -> Result<()> {
        self.cpu.load_state(source)
    }
    fn device(&mut self) -> Option<&mut dyn DeviceQueue> {
        Some(self)
    }
}

/// A device that keeps only the counts: the losses stay on the host in these tests.
impl DeviceQueue for Counting {
    fn record_device_loss(&mut self, _index: u32, _loss: u64) -> Result<()> {
        unreachable!("these tests feed losses from the host")
    }
    fn device_skipped(&mut self) -> Result<u64> {
        Ok(0)
    }
    fn reset_device_skipped(&mut self) -> Result<()> {
        Ok(())
    }
    unsafe fn set_stream(&mut self, _stream: u64) -> Result<()> {
        Ok(())
    }
    fn set_counters(&mut self, step: u64, updates: [u64; 2]) -> Result<()> {
        *self.counts.lock().unwrap() = Some((step, updates));
        Ok(())
    }
    fn device_counters(&mut self) -> Result<Option<(u64, [u64; 2])>> {
        Ok(*self.counts.lock().unwrap())
    }
}

#[test]
fn device_counts_follow_the_host_and_sync_back() {
    let mut data = vec![0.5f32; 300];
    let mut grad = vec![0.25f32; 300];
    let mut shard = ParamShard::new();
    shard.add_with_grad(&mut data, &mut grad, 7).unwrap();
    let config = Config {
        seed: 4,
        num_directions: 2,
        rule: Rule::AdaZo,
        fo_rule: Some(Rule::AdamW),
        ..Config::default()
    };
    let counts: Counts = Arc::default();
    let backend = Counting {
        cpu: CpuBackend::new(1).unwrap(),
        counts: counts.clone(),
    };
    let mut opt = Optimizer::with_backend(config, shard, Box::new(backend)).unwrap();
    let host = |opt: &mut Optimizer| (opt.steps(), [opt.updates().unwrap(), opt.fo_updates()]);
    let mut n = 0u32;
    let mut saved = None;
    for kind in ["zo", "zo", "skip", "fo", "zo", "skip", "fo", "fo", "zo"] {
        match kind {
            "fo" => assert!(!opt.fo_step().unwrap().skipped),
            _ => {
                let r = opt
                    .zo_step(|_| {
                        n += 1;
                        if kind == "skip" {
                            f32::INFINITY
                        } else {
                            (n % 5) as f32
                        }
                    })
                    .unwrap();
                assert_eq!(r.skipped, kind == "skip");
            }
        }
        assert_eq!(
            counts.lock().unwrap().unwrap(),
            host(&mut opt),
            "after {kind}"
        );
        if opt.steps() == 4 {
            saved = Some((opt.save_state().unwrap(), host(&mut opt)));
        }
    }
    assert_eq!(host(&mut opt), (9, [4, 3]));
    // A replayed graph ran 5 more zeroth-order steps on the "device".
    {
        let mut c = counts.lock().unwrap();
        let (step, t) = c.as_mut().unwrap();
        *step += 5;
        t[0] += 5;
    }
    opt.sync_counters().unwrap();
    assert_eq!(host(&mut opt), (14, [9, 3]));
    // A load sets the device's counts to the loaded ones.
    let (bytes, at) = saved.unwrap();
    opt.load_state(&bytes).unwrap();
    assert_eq!(host(&mut opt), at);
    assert_eq!(counts.lock().unwrap().unwrap(), at);
    // A CPU backend keeps no counts: sync_counters changes nothing.
    let mut d = vec![0f32; 16];
    let mut s = ParamShard::new();
    s.add(&mut d, 0).unwrap();
    let mut plain = Optimizer::new(Config::default(), s).unwrap();
    plain.zo_step(|_| 1.0).unwrap();
    plain.sync_counters().unwrap();
    assert_eq!(plain.steps(), 1);
}

/// The same schedule on the CUDA backend's own device-counter mode (the counters kernel and
/// the update kernels reading step and t from device memory; without a GPU, on the
/// emulated device): after every step the counts on the device equal the CPU optimizer's,
/// and so do the parameters, bit for bit; a load sets the device's counts.
#[cfg(feature = "cuda")]
#[test]
fn the_counters_kernel_follows_the_host() {
    use hyzo::backend::cuda::{choose_test_device, CudaBackend, CudaBuffer};
    use hyzo::{DType, Location, TensorSpec};

    if !choose_test_device() {
        return;
    }
    const N: usize = 300;
    let config = Config {
        seed: 4,
        lr: 1e-2,
        num_directions: 2,
        rule: Rule::AdaZo,
        fo_rule: Some(Rule::AdamW),
        ..Config::default()
    };
    let init: Vec<f32> = (0..N).map(|i| (i as f32 * 0.37).sin()).collect();
    let grads: Vec<f32> = (0..N).map(|i| (i as f32 * 0.11).cos() * 0.1).collect();
    let mut data = init.clone();
    let mut grad = grads.clone();
    let mut host_shard = ParamShard::new();
    host_shard.add_with_grad(&mut data, &mut grad, 7).unwrap();
    let mut cpu = Optimizer::with_backend(
        config.clone(),
        host_shard,
        Box::new(CpuBackend::new(1).unwrap()),
    )
    .unwrap();

    let dev = CudaBuffer::new(0, 2 * N * 4).unwrap();
    dev.upload_at(0, &init).unwrap();
    dev.upload_at(N * 4, &grads).unwrap();
    let mut dev_shard = ParamShard::with_location(Location::Cuda(0));
    // SAFETY: `dev` outlives the optimizer; nothing else writes it during a pass.
    unsafe {
        dev_shard
            .add_raw(TensorSpec {
                data: dev.ptr(),
                dtype: DType::F32,
                numel: N as u64,
                offset: 7,
                grad: dev.ptr() + (N * 4) as u64,
                grad_dtype: DType::F32,
            })
            .unwrap()
    };
    let mut backend = CudaBackend::new(0).unwrap();
    backend.set_exact(true);
    backend.set_device_counters(true);
    let mut gpu = Optimizer::with_backend(config, dev_shard, Box::new(backend)).unwrap();

    let counts = |opt: &mut Optimizer| (opt.steps(), opt.updates().unwrap(), opt.fo_updates());
    let on_device = |opt: &mut Optimizer| {
        opt.sync_counters().unwrap();
        counts(opt)
    };
    let mut saved = None;
    let mut n = 0u32;
    for kind in ["zo", "zo", "skip", "fo", "zo", "skip", "fo", "fo", "zo"] {
        if kind == "fo" {
            assert!(!cpu.fo_step().unwrap().skipped);
            assert!(!gpu.fo_step().unwrap().skipped);
        } else {
            let mut losses = Vec::new();
            for _ in 0..4 {
                n += 1;
                losses.push(if kind == "skip" && n % 4 == 2 {
                    f32::NAN
                } else {
                    (n % 5) as f32
                });
            }
            let (mut a, mut b) = (losses.iter(), losses.iter());
            let r = cpu.zo_step(|_| *a.next().unwrap()).unwrap();
            let g = gpu.zo_step(|_| *b.next().unwrap()).unwrap();
            assert_eq!(g.skipped, r.skipped);
            assert_eq!(g.loss.map(f32::to_bits), r.loss.map(f32::to_bits));
            assert_eq!(r.skipped, kind == "skip");
        }
        let host = counts(&mut cpu);
        assert_eq!(
            on_device(&mut gpu),
            host,
            "counts on the device after {kind}"
        );
        let mut out = vec![0f32; N];
        gpu.synchronize().unwrap();
        dev.download_at(0, &mut out).unwrap();
        let same = out
            .iter()
            .zip(&data_of(&cpu))
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "parameters after {kind} (step {})", host.0);
        if host.0 == 4 {
            saved = Some((gpu.save_state().unwrap(), host));
        }
    }
    assert_eq!(counts(&mut cpu), (9, 4, 3));
    let (bytes, at) = saved.unwrap();
    gpu.load_state(&bytes).unwrap();
    assert_eq!(on_device(&mut gpu), at, "counts on the device after a load");
}

#[cfg(feature = "cuda")]
fn data_of(opt: &Optimizer) -> Vec<f32> {
    let t = &opt.params().tensors()[0];
    // SAFETY: the host tensor registered above, N f32 values, not written during the read.
    unsafe { std::slice::from_raw_parts(t.data as *const f32, t.numel as usize) }.to_vec()
}
