//! First-order steps over some tensors (`fo_step_masked`): the tensors left out, their rule
//! state and their residual stay as they were, as `torch.optim` leaves parameters whose
//! `.grad` is None.

use half::bf16;
use hyzo::{Config, Optimizer, ParamShard, Precision, Rule};

const N: usize = 300;

fn config() -> Config {
    Config {
        seed: 3,
        lr: 0.01,
        rule: Rule::AdamW,
        weight_decay: 0.1,
        precision: Precision::Compensated,
        ..Config::default()
    }
}

/// The gradient of tensor `i` at `step`.
fn grad(i: usize, step: u64) -> Vec<f32> {
    (0..N)
        .map(|k| ((k as f32 * 0.1 + i as f32 + step as f32).sin()) * 0.5)
        .collect()
}

fn set_grads(opt: &mut Optimizer, step: u64) {
    for i in 0..opt.params().len() {
        opt.grad_mut(i)
            .unwrap()
            .copy_from_f32(&grad(i, step))
            .unwrap();
    }
}

fn values(opt: &Optimizer, i: usize) -> Vec<u32> {
    opt.params()
        .values(i)
        .unwrap()
        .to_f32_vec()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The state bytes of tensor `i` of `n` bf16 tensors of N elements: m, v (f32) and lo
/// (bf16), as `Backend::save_state` lays them out, after the 64-byte header.
fn tensor_state(opt: &mut Optimizer, i: usize) -> Vec<u8> {
    let s = opt.save_state().unwrap();
    let per = N * (4 + 4 + 2);
    s[64 + i * per..64 + (i + 1) * per].to_vec()
}

#[test]
fn left_out_tensors_and_their_state_do_not_move() {
    let mut data: Vec<Vec<bf16>> = (0..2)
        .map(|i| {
            (0..N)
                .map(|k| bf16::from_f32((k + i) as f32 * 0.01))
                .collect()
        })
        .collect();
    let mut grads = vec![vec![0f32; N]; 2];
    let mut shard = ParamShard::new();
    for (i, (d, g)) in data.iter_mut().zip(grads.iter_mut()).enumerate() {
        shard
            .add_with_grad(d.as_mut_slice(), g.as_mut_slice(), (i * N) as u64)
            .unwrap();
    }
    let mut opt = Optimizer::with_threads(config(), shard, 2).unwrap();

    // The same first tensor alone, stepped every time: the reference for tensor 0.
    let mut alone_data: Vec<bf16> = (0..N).map(|k| bf16::from_f32(k as f32 * 0.01)).collect();
    let mut alone_grad = vec![0f32; N];
    let mut shard = ParamShard::new();
    shard
        .add_with_grad(alone_data.as_mut_slice(), alone_grad.as_mut_slice(), 0)
        .unwrap();
    let mut alone = Optimizer::with_threads(config(), shard, 1).unwrap();

    for step in 0..4u64 {
        set_grads(&mut opt, step);
        set_grads(&mut alone, step);
        let before = (values(&opt, 1), tensor_state(&mut opt, 1));
        let update = [true, step == 0];
        opt.fo_step_masked(&update).unwrap();
        alone.fo_step().unwrap();
        if step > 0 {
            assert_eq!(
                values(&opt, 1),
                before.0,
                "step {step}: tensor 1 was written"
            );
            assert_eq!(
                tensor_state(&mut opt, 1),
                before.1,
                "step {step}: its state moved"
            );
        }
        assert_eq!(values(&opt, 0), values(&alone, 0), "step {step}: tensor 0");
        assert_eq!(tensor_state(&mut opt, 0), tensor_state(&mut alone, 0));
    }
    assert_eq!((opt.steps(), opt.updates().unwrap()), (4, 4));

    // Nothing selected: nothing written, the step counted, t unchanged.
    let before = opt.save_state().unwrap();
    let params = (values(&opt, 0), values(&opt, 1));
    opt.fo_step_masked(&[false, false]).unwrap();
    assert_eq!((values(&opt, 0), values(&opt, 1)), params);
    let after = opt.save_state().unwrap();
    assert_eq!(before[64..before.len() - 4], after[64..after.len() - 4]);
    assert_eq!((opt.steps(), opt.updates().unwrap()), (5, 4));
}

#[test]
fn only_the_updated_tensors_need_gradients() {
    let mut a = vec![0.5f32; N];
    let mut ga = vec![0.1f32; N];
    let mut b = vec![0.25f32; N];
    let mut shard = ParamShard::new();
    shard.add_with_grad(&mut a, &mut ga, 0).unwrap();
    shard.add(&mut b, N as u64).unwrap();
    let mut opt = Optimizer::new(
        Config {
            rule: Rule::Sgd,
            ..config()
        },
        shard,
    )
    .unwrap();
    let e = opt.fo_step().unwrap_err().to_string();
    assert!(e.contains("tensor 1 has no gradient"), "{e}");
    let e = opt.fo_step_masked(&[false, true]).unwrap_err().to_string();
    assert!(e.contains("tensor 1 has no gradient"), "{e}");
    let e = opt.fo_step_masked(&[true]).unwrap_err().to_string();
    assert!(e.contains("1 flags for 2 tensors"), "{e}");
    assert_eq!(opt.steps(), 0);
    opt.fo_step_masked(&[true, false]).unwrap();
    assert_eq!(opt.steps(), 1);
    assert_ne!(opt.params().values(0).unwrap().to_f32_vec()[0], 0.5);
    assert_eq!(opt.params().values(1).unwrap().to_f32_vec(), vec![0.25; N]);
}

#[test]
fn the_c_abi_takes_a_flag_per_tensor() {
    use hyzo::ffi::*;
    let mut a = vec![0.5f32; N];
    let mut ga = vec![0.1f32; N];
    let mut b = vec![0.25f32; N];
    let mut opt = std::ptr::null_mut();
    let ok = hyzo_status::HYZO_OK;
    let f32 = hyzo_dtype::HYZO_F32 as u32;
    unsafe {
        let cfg = hyzo_config_default();
        assert_eq!(hyzo_optimizer_create_cpu(&cfg, 1, &mut opt), ok);
        let s = hyzo_optimizer_add_tensor(
            opt,
            a.as_mut_ptr().cast(),
            f32,
            N as u64,
            0,
            ga.as_mut_ptr().cast(),
            f32,
        );
        assert_eq!(s, ok);
        let s = hyzo_optimizer_add_tensor(
            opt,
            b.as_mut_ptr().cast(),
            f32,
            N as u64,
            N as u64,
            std::ptr::null_mut(),
            f32,
        );
        assert_eq!(s, ok);
        assert_eq!(hyzo_fo_step(opt), hyzo_status::HYZO_ERR_BAD_STATE);
        let flags = [1u8, 0];
        let bad = hyzo_status::HYZO_ERR_INVALID_ARGUMENT;
        assert_eq!(hyzo_fo_step_masked(opt, flags.as_ptr(), 1), bad);
        assert_eq!(hyzo_fo_step_masked(opt, std::ptr::null(), 2), bad);
        assert_eq!(hyzo_fo_step_masked(opt, flags.as_ptr(), 2), ok);
        hyzo_optimizer_destroy(opt);
    }
    assert!(a.iter().all(|v| *v < 0.5));
    assert!(b.iter().all(|v| *v == 0.25));
}
