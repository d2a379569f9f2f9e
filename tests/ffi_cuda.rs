//! The C ABI on a CUDA device (the emulated one without a GPU): a CUDA optimizer driven through the
//! `extern "C"` functions follows a CPU one driven the same way (host and device losses,
//! a hybrid schedule, bf16 and f32 tensors), its saved state loads into the CPU optimizer,
//! and bad calls are rejected.
#![cfg(feature = "cuda")]

use std::ffi::{c_int, CStr};
use std::ptr::null_mut;

use half::bf16;
use hyzo::backend::cuda::CudaBuffer;
use hyzo::ffi::*;

const N0: usize = 1000; // f32
const N1: usize = 777; // bf16

fn msg() -> String {
    // SAFETY: NUL-terminated, valid until the next failure on this thread.
    unsafe { CStr::from_ptr(hyzo_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn ok(s: hyzo_status) {
    assert_eq!(s, hyzo_status::HYZO_OK, "{}", msg());
}

fn loss(a: &[f32], b: &[bf16]) -> f32 {
    let xs = a.iter().copied().chain(b.iter().map(|x| x.to_f32()));
    xs.enumerate()
        .map(|(i, x)| {
            let d = x - (i as f32 * 0.01).sin();
            d * d
        })
        .sum()
}

#[test]
fn cuda_follows_cpu_through_the_abi() {
    // Without a GPU, device 0 becomes the emulated device (the host build of the kernels):
    // the same C ABI path, so a gap like set_stream fails here without a GPU.
    if !hyzo::backend::cuda::choose_test_device() {
        return;
    }
    assert_eq!(hyzo_cuda_available(), 1);
    // The exact kernels (read by every new CUDA backend): the ABI path then equals the CPU
    // bit for bit. The fast kernels' Gaussian is only within 1e-4 relative of the CPU's
    // (spec v2 §3), which compounds over steps through the losses; gpu_parity checks it.
    std::env::set_var("HYZO_CUDA_EXACT", "1");
    let mut cfg = hyzo_config_default();
    cfg.seed = 31;
    cfg.rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
    cfg.lr = 0.01;
    cfg.eps = 1e-2;
    cfg.num_directions = 2;
    cfg.precision = hyzo_precision::HYZO_PRECISION_STOCHASTIC as u32;
    cfg.fo_steps = 1;
    cfg.zo_steps = 2;

    let mut a: Vec<f32> = (0..N0).map(|i| (i as f32 * 0.37).cos() * 0.5).collect();
    let mut b: Vec<bf16> = (0..N1)
        .map(|i| bf16::from_f32((i as f32 * 0.11).sin()))
        .collect();
    let mut ga: Vec<f32> = (0..N0).map(|i| (i as f32 * 0.05).sin() * 0.1).collect();
    let mut gb: Vec<f32> = (0..N1).map(|i| (i as f32 * 0.07).cos() * 0.1).collect();
    let da = CudaBuffer::from_slice(0, &a).unwrap();
    let db = CudaBuffer::from_slice(0, &b).unwrap();
    let dga = CudaBuffer::from_slice(0, &ga).unwrap();
    let dgb = CudaBuffer::from_slice(0, &gb).unwrap();

    // SAFETY: host and device buffers outlive both optimizers.
    unsafe {
        let (mut c, mut g) = (null_mut(), null_mut());
        ok(hyzo_optimizer_create(&cfg, 0, 0, &mut c));
        ok(hyzo_optimizer_create(&cfg, 1, 0, &mut g));
        ok(hyzo_optimizer_set_stream(g, null_mut()));
        ok(hyzo_optimizer_add_tensor(
            c,
            a.as_mut_ptr().cast(),
            0,
            N0 as u64,
            0,
            ga.as_mut_ptr().cast(),
            0,
        ));
        ok(hyzo_optimizer_add_tensor(
            c,
            b.as_mut_ptr().cast(),
            2,
            N1 as u64,
            N0 as u64,
            gb.as_mut_ptr().cast(),
            0,
        ));
        // Misaligned device pointer: rejected.
        let s = hyzo_optimizer_add_tensor(g, (da.ptr() + 1) as *mut _, 0, 4, 5000, null_mut(), 0);
        assert_eq!(s, hyzo_status::HYZO_ERR_INVALID_ARGUMENT);
        ok(hyzo_optimizer_add_tensor(
            g,
            da.ptr() as *mut _,
            0,
            N0 as u64,
            0,
            dga.ptr() as *mut _,
            0,
        ));
        ok(hyzo_optimizer_add_tensor(
            g,
            db.ptr() as *mut _,
            2,
            N1 as u64,
            N0 as u64,
            dgb.ptr() as *mut _,
            0,
        ));

        let (mut ha, mut hb) = (vec![0f32; N0], vec![bf16::ZERO; N1]);
        let mut worst = 0f32;
        let mut worst_bf16 = 0f32;
        let mut mismatched = 0usize;
        let first = loss(&a, &b);
        for step in 0..30 {
            let mut phase = 0u32;
            ok(hyzo_next_phase(c, &mut phase));
            let mut pg = 9u32;
            ok(hyzo_next_phase(g, &mut pg));
            assert_eq!(phase, pg);
            if phase == hyzo_phase::HYZO_PHASE_FO as u32 {
                ok(hyzo_fo_step(c));
                ok(hyzo_fo_step(g));
            } else {
                let device_losses = step >= 15;
                ok(hyzo_zo_begin(c));
                ok(hyzo_zo_begin(g));
                let (mut mc, mut mg) = (1 as c_int, 1 as c_int);
                let mut keep = Vec::new();
                while mc != 0 {
                    ok(hyzo_zo_feed(c, loss(&a, &b), &mut mc));
                    da.download(&mut ha).unwrap();
                    db.download(&mut hb).unwrap();
                    let l = loss(&ha, &hb);
                    if device_losses {
                        let lb = CudaBuffer::from_slice(0, &[l]).unwrap();
                        ok(hyzo_zo_feed_device(g, lb.ptr() as *const f32, &mut mg));
                        keep.push(lb);
                    } else {
                        ok(hyzo_zo_feed(g, l, &mut mg));
                    }
                    assert_eq!(mc, mg);
                }
                ok(hyzo_optimizer_synchronize(g));
                drop(keep);
            }
            da.download(&mut ha).unwrap();
            db.download(&mut hb).unwrap();
            for (x, y) in a.iter().zip(&ha) {
                mismatched += usize::from(x.to_bits() != y.to_bits());
                worst = worst.max((x - y).abs() / (1.0 + x.abs()));
            }
            for (x, y) in b.iter().zip(&hb) {
                mismatched += usize::from(x.to_bits() != y.to_bits());
                worst_bf16 =
                    worst_bf16.max((x.to_f32() - y.to_f32()).abs() / (1.0 + x.to_f32().abs()));
            }
        }
        let last = loss(&a, &b);
        eprintln!(
            "cuda vs cpu through the ABI: loss {first} -> {last}; {mismatched} element-steps \
             differ in bits, worst scaled difference {worst:e} (f32), {worst_bf16:e} (bf16)"
        );
        assert!(last < first);
        assert_eq!(
            mismatched, 0,
            "CUDA diverged from the CPU: worst {worst} (f32), {worst_bf16} (bf16)"
        );

        let (mut sc, mut kc, mut sg, mut kg) = (0, 0, 0, 0);
        ok(hyzo_optimizer_stats(c, &mut sc, &mut kc));
        ok(hyzo_optimizer_stats(g, &mut sg, &mut kg));
        assert_eq!((sc, kc), (sg, kg));

        // A device state loads into the CPU optimizer (the format is backend-independent).
        let mut n = 0;
        ok(hyzo_optimizer_state_size(g, &mut n));
        let mut buf = vec![0u8; n as usize];
        ok(hyzo_optimizer_save_state(g, buf.as_mut_ptr().cast(), n));
        ok(hyzo_optimizer_load_state(c, buf.as_ptr().cast(), n));

        // Bad calls on a CUDA optimizer.
        let mut more = 1;
        let s = hyzo_zo_feed_device(g, std::ptr::null(), &mut more);
        assert_eq!(s, hyzo_status::HYZO_ERR_INVALID_ARGUMENT, "{}", msg());
        assert_eq!(more, 0);
        let s = hyzo_optimizer_set_lr(g, f32::NAN);
        assert_eq!(s, hyzo_status::HYZO_ERR_INVALID_ARGUMENT);
        let mut o = null_mut();
        let s = hyzo_optimizer_create(&cfg, 1, 1000, &mut o);
        assert_ne!(s, hyzo_status::HYZO_OK);
        eprintln!(
            "device 1000: {}: {}",
            CStr::from_ptr(hyzo_status_string(s as u32)).to_string_lossy(),
            msg()
        );
        assert!(o.is_null());

        hyzo_optimizer_destroy(g);
        hyzo_optimizer_destroy(c);
    }
}
