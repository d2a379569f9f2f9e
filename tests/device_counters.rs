//! The host side of the device-counter mode (CUDA graphs replayed across steps), on the
//! CPU: a backend that keeps the counts "on the device" the way the CUDA backend does
//! (stores what `set_counters` says, advances step and the state's t after each update
//! pass) always agrees with the optimizer's own counts, through zeroth-order steps, a
//! host-side skip, first-order steps and a load; and `sync_counters` takes the counts a
//! replayed graph advanced. The GPU side: tests/gpu_parity.rs `graph_replays_across_steps`.

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
