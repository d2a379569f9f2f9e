//! Validation of each entry point: every bad argument gives its status and a message naming
//! it, and leaves the optimizer usable.

use super::*;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

use hyzo_status::*;

fn last_error() -> String {
    // SAFETY: hyzo_last_error returns a NUL-terminated string valid until the next failure.
    unsafe { CStr::from_ptr(hyzo_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// Asserts `status` is `want` and the thread's message mentions `needle`.
#[track_caller]
fn expect(status: hyzo_status, want: hyzo_status, needle: &str) {
    assert_eq!(status, want, "message: {}", last_error());
    let msg = last_error();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

#[track_caller]
fn ok(status: hyzo_status) {
    assert_eq!(status, HYZO_OK, "message: {}", last_error());
}

fn cpu(cfg: &hyzo_config) -> *mut hyzo_optimizer {
    let mut o = null_mut();
    // SAFETY: valid pointers.
    ok(unsafe { hyzo_optimizer_create_cpu(cfg, 1, &mut o) });
    o
}

/// A CPU optimizer over `data` (f32) with gradient `grad`.
fn with_tensor(cfg: &hyzo_config, data: &mut [f32], grad: &mut [f32]) -> *mut hyzo_optimizer {
    let o = cpu(cfg);
    // SAFETY: the buffers outlive the optimizer in every test.
    ok(unsafe {
        hyzo_optimizer_add_tensor(
            o,
            data.as_mut_ptr().cast(),
            0,
            data.len() as u64,
            0,
            grad.as_mut_ptr().cast(),
            0,
        )
    });
    o
}

fn zo_step(o: *mut hyzo_optimizer, data: &[f32]) {
    // SAFETY: live optimizer.
    unsafe {
        ok(hyzo_zo_begin(o));
        let mut more = 1;
        while more != 0 {
            let loss: f32 = data.iter().map(|x| (x - 1.0) * (x - 1.0)).sum();
            ok(hyzo_zo_feed(o, loss, &mut more));
        }
    }
}

#[test]
fn library_functions() {
    let c = hyzo_config_default();
    assert_eq!(config_from_c(&c).unwrap(), Config::default());
    // SAFETY: static strings.
    let v = unsafe { CStr::from_ptr(hyzo_version()) };
    assert_eq!(v.to_str().unwrap(), crate::VERSION);
    let s = unsafe { CStr::from_ptr(hyzo_status_string(2)) };
    assert_eq!(s.to_str().unwrap(), "HYZO_ERR_BAD_STATE");
    let s = unsafe { CStr::from_ptr(hyzo_status_string(99)) };
    assert_eq!(s.to_str().unwrap(), "unknown hyzo_status");
    assert!(matches!(hyzo_cuda_available(), 0 | 1));
}

#[test]
fn last_error_is_per_thread_and_kept_on_success() {
    std::thread::spawn(|| {
        assert_eq!(last_error(), "");
        // SAFETY: NULL is rejected.
        expect(
            unsafe { hyzo_zo_begin(null_mut()) },
            HYZO_ERR_INVALID_ARGUMENT,
            "opt",
        );
        let before = last_error();
        assert!(before.starts_with("hyzo_zo_begin: "), "{before}");
        let _ = hyzo_config_default();
        let o = cpu(&hyzo_config_default());
        // SAFETY: live optimizer, valid pointer.
        ok(unsafe { hyzo_optimizer_set_lr(o, 0.5) });
        assert_eq!(last_error(), before);
        std::thread::spawn(|| assert_eq!(last_error(), ""))
            .join()
            .unwrap();
        unsafe { hyzo_optimizer_destroy(o) };
    })
    .join()
    .unwrap();
}

/// A change to a configuration.
type Edit = fn(&mut hyzo_config);

#[test]
fn create_validates_everything() {
    let good = hyzo_config_default();
    let mut o: *mut hyzo_optimizer = 1usize as *mut _;
    unsafe {
        expect(
            hyzo_optimizer_create(null(), 0, 0, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "cfg",
        );
        assert!(o.is_null(), "out is NULL after a failure");
        expect(
            hyzo_optimizer_create(&good, 0, 0, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        expect(
            hyzo_optimizer_create(&good, 7, 0, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "device",
        );
        expect(
            hyzo_optimizer_create(&good, 1, -1, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "device_ordinal",
        );
        expect(
            hyzo_optimizer_create_cpu(null(), 0, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "cfg",
        );
        let misaligned = (&good as *const hyzo_config as *const u8).add(1) as *const hyzo_config;
        expect(
            hyzo_optimizer_create(misaligned, 0, 0, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "cfg",
        );
        let cases: [(Edit, &str); 17] = [
            (|c| c.lr = f32::NAN, "cfg->lr"),
            (|c| c.lr = -1.0, "cfg->lr"),
            (|c| c.eps = 0.0, "cfg->eps"),
            (|c| c.eps = f32::NAN, "cfg->eps"),
            (|c| c.num_directions = 0, "cfg->num_directions"),
            (|c| c.direction = 4, "cfg->direction"),
            (
                |c| {
                    c.direction = 3;
                    c.rank = 0;
                },
                "cfg->rank",
            ),
            (
                |c| {
                    c.direction = 3;
                    c.rank = 1025;
                },
                "cfg->rank",
            ),
            (|c| c.estimator = 2, "cfg->estimator"),
            (|c| c.rule = 6, "cfg->rule"),
            (|c| c.rule = u32::MAX, "cfg->rule"),
            (|c| c.precision = 3, "cfg->precision"),
            (|c| c.beta1 = 1.0, "cfg->beta1"),
            (|c| c.beta2 = -0.1, "cfg->beta2"),
            (|c| c.adam_eps = 0.0, "cfg->adam_eps"),
            (|c| c.weight_decay = f32::INFINITY, "cfg->weight_decay"),
            (|c| c.hybrid_alpha = 1.5, "cfg->hybrid_alpha"),
        ];
        for (edit, name) in cases {
            let mut c = good;
            edit(&mut c);
            o = 1usize as *mut _;
            expect(
                hyzo_optimizer_create(&c, 0, 0, &mut o),
                HYZO_ERR_INVALID_ARGUMENT,
                name,
            );
            assert!(o.is_null());
            expect(
                hyzo_optimizer_create_cpu(&c, 1, &mut o),
                HYZO_ERR_INVALID_ARGUMENT,
                name,
            );
        }
        ok(hyzo_optimizer_create(&good, 0, -5, &mut o));
        hyzo_optimizer_destroy(o);
        hyzo_optimizer_destroy(null_mut());
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_no_device() {
    let mut o = null_mut();
    // SAFETY: valid pointers.
    let s = unsafe { hyzo_optimizer_create(&hyzo_config_default(), 1, 0, &mut o) };
    expect(s, HYZO_ERR_NO_DEVICE, "CUDA");
    assert_eq!(hyzo_cuda_available(), 0);
}

#[test]
fn handles_are_checked() {
    let mut c = hyzo_config_default();
    let fake = &mut c as *mut hyzo_config as *mut hyzo_optimizer;
    unsafe {
        expect(
            hyzo_zo_begin(fake),
            HYZO_ERR_INVALID_ARGUMENT,
            "not a live hyzo_optimizer",
        );
        expect(
            hyzo_zo_begin(3usize as *mut hyzo_optimizer),
            HYZO_ERR_INVALID_ARGUMENT,
            "misaligned",
        );
        // destroy of a foreign pointer is refused (and does not free it).
        hyzo_optimizer_destroy(fake);
        assert!(last_error().contains("hyzo_optimizer_destroy"));
    }
}

#[test]
fn add_tensor_validates_and_registers_nothing_on_failure() {
    let cfg = hyzo_config_default();
    let o = cpu(&cfg);
    let mut a = vec![0f32; 8];
    let mut g = vec![0f32; 8];
    let mut h = vec![half::bf16::ZERO; 8];
    let pa = a.as_mut_ptr() as *mut c_void;
    let pg = g.as_mut_ptr() as *mut c_void;
    let ph = h.as_mut_ptr() as *mut c_void;
    unsafe {
        let add = |p, dt, n, off, g, gdt| hyzo_optimizer_add_tensor(o, p, dt, n, off, g, gdt);
        expect(
            add(null_mut(), 0, 8, 0, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "data",
        );
        expect(
            add(pa, 3, 8, 0, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "dtype",
        );
        expect(
            add(pa, 0, 8, 0, null_mut(), 9),
            HYZO_ERR_INVALID_ARGUMENT,
            "grad_dtype",
        );
        expect(
            add(pa, 0, 0, 0, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "numel",
        );
        expect(
            add(pa, 0, u64::MAX, 0, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "numel",
        );
        expect(
            add(pa, 0, 8, u64::MAX - 3, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "global_offset",
        );
        let mis = (pa as *mut u8).add(2) as *mut c_void;
        expect(
            add(mis, 0, 4, 0, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "aligned",
        );
        let mis_h = (ph as *mut u8).add(1) as *mut c_void;
        expect(
            add(mis_h, 2, 4, 0, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "aligned",
        );
        let mis_g = (pg as *mut u8).add(1) as *mut c_void;
        expect(
            add(pa, 0, 4, 0, mis_g, 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "grad",
        );
        expect(add(pa, 0, 8, 0, pa, 0), HYZO_ERR_INVALID_ARGUMENT, "grad");
        let mut n = 99;
        ok(hyzo_optimizer_num_tensors(o, &mut n));
        assert_eq!(n, 0, "failed adds registered nothing");

        ok(add(pa, 0, 8, 0, pg, 0));
        // Overlapping memory (even through another dtype), overlapping global elements.
        expect(
            add(pa, 2, 4, 100, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "overlaps",
        );
        expect(
            add(ph, 2, 8, 4, null_mut(), 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "global_offset",
        );
        expect(
            add(ph, 2, 8, 100, pg, 0),
            HYZO_ERR_INVALID_ARGUMENT,
            "overlaps",
        );
        ok(add(ph, 2, 8, 8, null_mut(), 0));
        ok(hyzo_optimizer_num_tensors(o, &mut n));
        assert_eq!(n, 2);
        expect(
            hyzo_optimizer_num_tensors(o, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );

        // After the first step: no more tensors.
        zo_step(o, &a);
        let mut b = vec![0f32; 4];
        expect(
            add(b.as_mut_ptr().cast(), 0, 4, 100, null_mut(), 0),
            HYZO_ERR_BAD_STATE,
            "before the first step",
        );
        hyzo_optimizer_destroy(o);
    }
}

#[test]
fn setters_validate() {
    let o = cpu(&hyzo_config_default());
    unsafe {
        for bad in [f32::NAN, -1.0, f32::INFINITY] {
            expect(
                hyzo_optimizer_set_lr(o, bad),
                HYZO_ERR_INVALID_ARGUMENT,
                "lr",
            );
            expect(
                hyzo_optimizer_set_weight_decay(o, bad),
                HYZO_ERR_INVALID_ARGUMENT,
                "weight_decay",
            );
        }
        expect(
            hyzo_optimizer_set_lr(null_mut(), 0.1),
            HYZO_ERR_INVALID_ARGUMENT,
            "opt",
        );
        ok(hyzo_optimizer_set_lr(o, 0.25));
        ok(hyzo_optimizer_set_weight_decay(o, 0.01));
        let mut c = std::mem::zeroed::<hyzo_config>();
        ok(hyzo_optimizer_get_config(o, &mut c));
        assert_eq!((c.lr, c.weight_decay), (0.25, 0.01));
        expect(
            hyzo_optimizer_get_config(o, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        // The CPU has no streams; NULL (the default stream) is accepted.
        ok(hyzo_optimizer_set_stream(o, null_mut()));
        expect(
            hyzo_optimizer_set_stream(o, 8usize as *mut c_void),
            HYZO_ERR_INVALID_ARGUMENT,
            "stream",
        );
        ok(hyzo_optimizer_synchronize(o));
        hyzo_optimizer_destroy(o);
    }
}

#[test]
fn zo_protocol_misuse() {
    let mut a = vec![0.5f32; 16];
    let mut g = vec![0f32; 16];
    let empty = cpu(&hyzo_config_default());
    let o = with_tensor(&hyzo_config_default(), &mut a, &mut g);
    unsafe {
        expect(hyzo_zo_begin(empty), HYZO_ERR_BAD_STATE, "no tensors");
        let mut more = 1;
        expect(hyzo_zo_feed(o, 1.0, &mut more), HYZO_ERR_BAD_STATE, "begin");
        assert_eq!(more, 0, "needs_more cleared on failure");
        ok(hyzo_zo_begin(o));
        expect(hyzo_zo_begin(o), HYZO_ERR_BAD_STATE, "in progress");
        expect(hyzo_fo_step(o), HYZO_ERR_BAD_STATE, "in progress");
        let mut buf = vec![0u8; 4096];
        expect(
            hyzo_optimizer_save_state(o, buf.as_mut_ptr().cast(), 4096),
            HYZO_ERR_BAD_STATE,
            "in progress",
        );
        expect(
            hyzo_optimizer_load_state(o, buf.as_ptr().cast(), 4096),
            HYZO_ERR_BAD_STATE,
            "in progress",
        );
        expect(
            hyzo_zo_feed(o, 1.0, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "needs_more",
        );
        expect(
            hyzo_zo_feed(o, 1.0, (&mut more as *mut c_int as *mut u8).add(1).cast()),
            HYZO_ERR_INVALID_ARGUMENT,
            "needs_more",
        );
        let mut f = 0f32;
        expect(
            hyzo_zo_feed_device(o, null(), &mut more),
            HYZO_ERR_INVALID_ARGUMENT,
            "loss_on_device",
        );
        expect(
            hyzo_zo_feed_device(o, &f, &mut more),
            HYZO_ERR_INVALID_ARGUMENT,
            "device",
        );
        let mut skipped = 0;
        expect(
            hyzo_zo_last_loss(o, &mut f, &mut skipped),
            HYZO_ERR_BAD_STATE,
            "no zeroth-order step",
        );
        // Abort restores the parameters (up to f32 rounding of perturb + restore).
        ok(hyzo_zo_abort(o));
        ok(hyzo_zo_abort(o));
        assert!(a.iter().all(|&x| (x - 0.5).abs() < 1e-6), "{a:?}");
        zo_step(o, &a);
        ok(hyzo_zo_last_loss(o, &mut f, &mut skipped));
        assert_eq!(skipped, 0);
        assert!(f.is_finite());
        let mut gd = [0f32; 1];
        ok(hyzo_zo_last_projected_grads(o, gd.as_mut_ptr(), 1));
        expect(
            hyzo_zo_last_projected_grads(o, gd.as_mut_ptr(), 2),
            HYZO_ERR_INVALID_ARGUMENT,
            "len",
        );
        expect(
            hyzo_zo_last_projected_grads(o, null_mut(), 1),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        expect(
            hyzo_zo_last_loss(o, null_mut(), &mut skipped),
            HYZO_ERR_INVALID_ARGUMENT,
            "loss",
        );
        expect(
            hyzo_zo_last_loss(o, &mut f, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "skipped",
        );

        // A NaN loss skips the step: counted, parameters restored, nothing updated.
        let before = a.clone();
        ok(hyzo_zo_begin(o));
        let mut first = true;
        more = 1;
        while more != 0 {
            ok(hyzo_zo_feed(
                o,
                if first { f32::NAN } else { 1.0 },
                &mut more,
            ));
            first = false;
        }
        assert!(a.iter().zip(&before).all(|(x, y)| (x - y).abs() < 1e-6));
        ok(hyzo_zo_last_loss(o, &mut f, &mut skipped));
        assert_eq!(skipped, 1);
        expect(
            hyzo_zo_last_projected_grads(o, gd.as_mut_ptr(), 1),
            HYZO_ERR_BAD_STATE,
            "skipped",
        );
        let (mut steps, mut sk) = (0, 0);
        ok(hyzo_optimizer_stats(o, &mut steps, &mut sk));
        assert_eq!((steps, sk), (2, 1));
        expect(
            hyzo_optimizer_stats(o, null_mut(), &mut sk),
            HYZO_ERR_INVALID_ARGUMENT,
            "steps",
        );
        expect(
            hyzo_optimizer_stats(o, &mut steps, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "skipped",
        );
        // A step skipped for a non-finite value found elsewhere: counted, nothing written.
        let before = a.clone();
        ok(hyzo_optimizer_skip_step(o));
        ok(hyzo_optimizer_stats(o, &mut steps, &mut sk));
        assert_eq!((steps, sk), (3, 2));
        assert_eq!(a, before);
        ok(hyzo_zo_begin(o));
        expect(
            hyzo_optimizer_skip_step(o),
            HYZO_ERR_BAD_STATE,
            "in progress",
        );
        ok(hyzo_zo_abort(o));
        expect(
            hyzo_optimizer_skip_step(null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "hyzo_optimizer_skip_step",
        );
        hyzo_optimizer_destroy(o);
        hyzo_optimizer_destroy(empty);
    }
}

#[test]
fn hybrid_schedule_and_phases() {
    let mut cfg = hyzo_config_default();
    cfg.fo_steps = 1;
    cfg.zo_steps = 2;
    let mut a = vec![0.5f32; 16];
    let mut g = vec![0.1f32; 16];
    let o = with_tensor(&cfg, &mut a, &mut g);
    let plain = cpu(&hyzo_config_default());
    unsafe {
        let mut p = 99u32;
        ok(hyzo_next_phase(plain, &mut p));
        assert_eq!(p, hyzo_phase::HYZO_PHASE_ANY as u32);
        ok(hyzo_next_phase(o, &mut p));
        assert_eq!(p, hyzo_phase::HYZO_PHASE_FO as u32);
        expect(
            hyzo_next_phase(o, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        expect(hyzo_zo_begin(o), HYZO_ERR_BAD_STATE, "first-order");
        ok(hyzo_fo_step(o));
        ok(hyzo_next_phase(o, &mut p));
        assert_eq!(p, hyzo_phase::HYZO_PHASE_ZO as u32);
        expect(hyzo_fo_step(o), HYZO_ERR_BAD_STATE, "zeroth-order");
        zo_step(o, &a);
        zo_step(o, &a);
        ok(hyzo_next_phase(o, &mut p));
        assert_eq!(p, hyzo_phase::HYZO_PHASE_FO as u32);
        hyzo_optimizer_destroy(o);
        hyzo_optimizer_destroy(plain);
    }
    // A first-order step (and hybrid_alpha > 0) needs gradients on every tensor.
    let mut b = vec![0f32; 4];
    let mut cfg = hyzo_config_default();
    cfg.hybrid_alpha = 0.5;
    let o = cpu(&cfg);
    unsafe {
        ok(hyzo_optimizer_add_tensor(
            o,
            b.as_mut_ptr().cast(),
            0,
            4,
            0,
            null_mut(),
            0,
        ));
        expect(hyzo_fo_step(o), HYZO_ERR_BAD_STATE, "gradient");
        expect(hyzo_zo_begin(o), HYZO_ERR_BAD_STATE, "gradient");
        hyzo_optimizer_destroy(o);
    }
}

#[test]
fn state_round_trip_and_rejections() {
    let mut cfg = hyzo_config_default();
    cfg.rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
    cfg.lr = 0.01;
    let mut a = vec![0.5f32; 40];
    let mut g = vec![0f32; 40];
    let o = with_tensor(&cfg, &mut a, &mut g);
    unsafe {
        zo_step(o, &a);
        let mut size = 0;
        ok(hyzo_optimizer_state_size(o, &mut size));
        expect(
            hyzo_optimizer_state_size(o, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "bytes",
        );
        let mut buf = vec![0u8; size as usize + 8];
        expect(
            hyzo_optimizer_save_state(o, null_mut(), size),
            HYZO_ERR_INVALID_ARGUMENT,
            "buf",
        );
        expect(
            hyzo_optimizer_save_state(o, buf.as_mut_ptr().cast(), size - 1),
            HYZO_ERR_INVALID_ARGUMENT,
            "len",
        );
        ok(hyzo_optimizer_save_state(
            o,
            buf.as_mut_ptr().cast(),
            size + 8,
        ));
        let saved_params = a.clone();
        let saved = buf[..size as usize].to_vec();
        zo_step(o, &a);
        zo_step(o, &a);
        let after_two = a.clone();

        // Garbage, truncated, other-version and other-config buffers: rejected, no change.
        expect(
            hyzo_optimizer_load_state(o, null(), size),
            HYZO_ERR_INVALID_ARGUMENT,
            "buf",
        );
        expect(
            hyzo_optimizer_load_state(o, saved.as_ptr().cast(), size - 1),
            HYZO_ERR_INVALID_ARGUMENT,
            "state",
        );
        expect(
            hyzo_optimizer_load_state(o, saved.as_ptr().cast(), 3),
            HYZO_ERR_INVALID_ARGUMENT,
            "state",
        );
        let mut other = saved.clone();
        other[8] ^= 1;
        expect(
            hyzo_optimizer_load_state(o, other.as_ptr().cast(), size),
            HYZO_ERR_INVALID_ARGUMENT,
            "version",
        );
        let mut other = saved.clone();
        other[16] ^= 1;
        expect(
            hyzo_optimizer_load_state(o, other.as_ptr().cast(), size),
            HYZO_ERR_INVALID_ARGUMENT,
            "configuration",
        );
        let (mut steps, mut sk) = (0, 0);
        ok(hyzo_optimizer_stats(o, &mut steps, &mut sk));
        assert_eq!(steps, 3);

        // Restore state and parameters: the run continues bit-identically.
        ok(hyzo_optimizer_load_state(o, saved.as_ptr().cast(), size));
        let mut f = 0f32;
        let mut s = 0;
        expect(
            hyzo_zo_last_loss(o, &mut f, &mut s),
            HYZO_ERR_BAD_STATE,
            "no zeroth-order",
        );
        a.copy_from_slice(&saved_params);
        zo_step(o, &a);
        zo_step(o, &a);
        assert_eq!(a, after_two);

        // A state of another configuration.
        let mut cfg2 = cfg;
        cfg2.seed = 7;
        let mut a2 = vec![0.5f32; 40];
        let mut g2 = vec![0f32; 40];
        let o2 = with_tensor(&cfg2, &mut a2, &mut g2);
        expect(
            hyzo_optimizer_load_state(o2, saved.as_ptr().cast(), size),
            HYZO_ERR_INVALID_ARGUMENT,
            "configuration",
        );
        hyzo_optimizer_destroy(o2);
        hyzo_optimizer_destroy(o);
    }
    let empty = cpu(&hyzo_config_default());
    unsafe {
        let mut size = 0;
        expect(
            hyzo_optimizer_state_size(empty, &mut size),
            HYZO_ERR_BAD_STATE,
            "no tensors",
        );
        hyzo_optimizer_destroy(empty);
    }
}

#[test]
fn sphere_norms() {
    let mut cfg = hyzo_config_default();
    cfg.direction = hyzo_direction::HYZO_DIRECTION_SPHERE as u32;
    cfg.num_directions = 2;
    let mut a = vec![0.5f32; 64];
    let mut g = vec![0f32; 64];
    let o = with_tensor(&cfg, &mut a, &mut g);
    unsafe {
        let mut n = [0f64; 2];
        expect(
            hyzo_optimizer_local_sq_norms(o, n.as_mut_ptr(), 1),
            HYZO_ERR_INVALID_ARGUMENT,
            "len",
        );
        expect(
            hyzo_optimizer_local_sq_norms(o, null_mut(), 2),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        ok(hyzo_optimizer_local_sq_norms(o, n.as_mut_ptr(), 2));
        assert!(n.iter().all(|v| *v > 0.0));
        expect(
            hyzo_zo_begin_with_sq_norms(o, null(), 2),
            HYZO_ERR_INVALID_ARGUMENT,
            "sq_norms",
        );
        expect(
            hyzo_zo_begin_with_sq_norms(o, n.as_ptr(), 1),
            HYZO_ERR_INVALID_ARGUMENT,
            "sq_norms",
        );
        let bad = [f64::NAN, 1.0];
        expect(
            hyzo_zo_begin_with_sq_norms(o, bad.as_ptr(), 2),
            HYZO_ERR_INVALID_ARGUMENT,
            "sq_norms",
        );
        ok(hyzo_zo_begin_with_sq_norms(o, n.as_ptr(), 2));
        expect(
            hyzo_optimizer_local_sq_norms(o, n.as_mut_ptr(), 2),
            HYZO_ERR_BAD_STATE,
            "in progress",
        );
        ok(hyzo_zo_abort(o));
        hyzo_optimizer_destroy(o);
    }
}

#[test]
fn directions_fill_matches_the_core() {
    let mut out = vec![0f32; 37];
    unsafe {
        for kind in [
            DirectionKind::Gaussian,
            DirectionKind::Rademacher,
            DirectionKind::Sphere,
        ] {
            ok(hyzo_directions_fill(
                kind as u32,
                11,
                3,
                2,
                5,
                37,
                out.as_mut_ptr(),
            ));
            let mut want = vec![0f32; 37];
            crate::direction::fill_scalar(kind, DirectionId::new(11, 3, 2), 5, &mut want);
            assert_eq!(out, want);
        }
        for kind in [3, 4] {
            expect(
                hyzo_directions_fill(kind, 0, 0, 0, 0, 1, out.as_mut_ptr()),
                HYZO_ERR_INVALID_ARGUMENT,
                "kind",
            );
        }
        expect(
            hyzo_directions_fill(0, 0, 0, 0, 0, 1, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        let mis = (out.as_mut_ptr() as *mut u8).add(1) as *mut f32;
        expect(
            hyzo_directions_fill(0, 0, 0, 0, 0, 1, mis),
            HYZO_ERR_INVALID_ARGUMENT,
            "out",
        );
        expect(
            hyzo_directions_fill(0, 0, 0, 0, u64::MAX, 2, out.as_mut_ptr()),
            HYZO_ERR_INVALID_ARGUMENT,
            "count",
        );
        expect(
            hyzo_directions_fill(0, 0, 0, 0, 0, u64::MAX / 2, out.as_mut_ptr()),
            HYZO_ERR_INVALID_ARGUMENT,
            "count",
        );
        ok(hyzo_directions_fill(0, 0, 0, 0, 0, 0, out.as_mut_ptr()));
    }
}

#[test]
fn a_panic_becomes_internal_and_poisons() {
    let o = cpu(&hyzo_config_default());
    unsafe {
        let s = with_opt("test", o, |_| panic!("boom"));
        expect(s, HYZO_ERR_INTERNAL, "boom");
        expect(
            hyzo_optimizer_set_lr(o, 0.1),
            HYZO_ERR_INTERNAL,
            "destroy it",
        );
        hyzo_optimizer_destroy(o);
    }
    expect(
        guard("g", || panic!("{}", 5)),
        HYZO_ERR_INTERNAL,
        "panic): 5",
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_device_is_no_device() {
    if hyzo_cuda_available() != 0 {
        return; // tests/ffi_cuda.rs covers the device
    }
    let mut o = 1usize as *mut hyzo_optimizer;
    // SAFETY: valid pointers.
    let s = unsafe { hyzo_optimizer_create(&hyzo_config_default(), 1, 0, &mut o) };
    assert_eq!(s, HYZO_ERR_NO_DEVICE, "{}", last_error());
    assert!(o.is_null());
}

#[test]
fn separate_first_order_rule_through_c() {
    let d = hyzo_config_default();
    assert_eq!(d.fo_rule, hyzo_rule::HYZO_RULE_NONE as u32);
    assert!(d.fo_lr.is_nan() && d.fo_weight_decay.is_nan());
    let mut bad = d;
    bad.fo_rule = 6;
    let mut o = null_mut();
    // SAFETY: valid pointers throughout.
    unsafe {
        expect(
            hyzo_optimizer_create_cpu(&bad, 1, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "cfg->fo_rule: 6 is not a hyzo_rule (0..=5) or HYZO_RULE_NONE",
        );
        bad.fo_rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
        bad.fo_lr = -1.0;
        expect(
            hyzo_optimizer_create_cpu(&bad, 1, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "cfg->fo_lr",
        );
        expect(
            hyzo_optimizer_create_cpu(&d, 1025, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "threads: 1025 exceeds the maximum of 1024",
        );
    }
    // The paper's hybrid: AdamW first-order, AdaZO zeroth-order, one step of each.
    let mut cfg = d;
    cfg.rule = hyzo_rule::HYZO_RULE_ADAZO as u32;
    cfg.fo_rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
    cfg.fo_steps = 1;
    cfg.zo_steps = 1;
    let mut a = vec![0.5f32; 64];
    let mut g = vec![0.1f32; 64];
    let o = with_tensor(&cfg, &mut a, &mut g);
    unsafe {
        let mut got = hyzo_config_default();
        ok(hyzo_optimizer_get_config(o, &mut got));
        assert_eq!(got.fo_rule, hyzo_rule::HYZO_RULE_ADAMW as u32);
        assert!(got.fo_lr.is_nan());
        ok(hyzo_optimizer_set_fo_lr(o, 0.5));
        ok(hyzo_optimizer_get_config(o, &mut got));
        assert_eq!(got.fo_lr, 0.5);
        ok(hyzo_optimizer_set_fo_lr(o, f32::NAN));
        expect(
            hyzo_optimizer_set_fo_weight_decay(o, f32::INFINITY),
            HYZO_ERR_INVALID_ARGUMENT,
            "fo_weight_decay",
        );
        ok(hyzo_fo_step(o));
        zo_step(o, &a);
        ok(hyzo_fo_step(o));
        let (mut u, mut fo) = (0, 0);
        ok(hyzo_optimizer_updates(o, &mut u, &mut fo));
        assert_eq!((u, fo), (1, 2));
        expect(
            hyzo_optimizer_updates(o, null_mut(), &mut fo),
            HYZO_ERR_INVALID_ARGUMENT,
            "updates",
        );
        // 16 bytes per parameter (four fp32 buffers), a 64-byte header and a checksum.
        let mut size = 0;
        ok(hyzo_optimizer_state_size(o, &mut size));
        assert_eq!(size, 64 + 16 * 64 + 4);
        hyzo_optimizer_destroy(o);
    }
}

#[test]
fn state_files_through_c() {
    let dir = std::env::temp_dir().join(format!("hyzo-ffi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = CString::new(dir.join("s").to_str().unwrap()).unwrap();
    let missing = CString::new(dir.join("no/such/file").to_str().unwrap()).unwrap();
    let mut cfg = hyzo_config_default();
    cfg.rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
    let mut a = vec![0.5f32; 100];
    let mut g = vec![0f32; 100];
    let o = with_tensor(&cfg, &mut a, &mut g);
    unsafe {
        zo_step(o, &a);
        ok(hyzo_optimizer_save_state_file(o, path.as_ptr()));
        let mut size = 0;
        ok(hyzo_optimizer_state_size(o, &mut size));
        let mut buf = vec![0u8; size as usize];
        ok(hyzo_optimizer_save_state(o, buf.as_mut_ptr().cast(), size));
        assert_eq!(std::fs::read(dir.join("s")).unwrap(), buf);
        let saved = a.clone();
        zo_step(o, &a);
        let after = a.clone();
        expect(
            hyzo_optimizer_load_state_file(o, missing.as_ptr()),
            HYZO_ERR_IO,
            "no/such/file",
        );
        expect(
            hyzo_optimizer_save_state_file(o, missing.as_ptr()),
            HYZO_ERR_IO,
            "no/such/file",
        );
        expect(
            hyzo_optimizer_load_state_file(o, null()),
            HYZO_ERR_INVALID_ARGUMENT,
            "path",
        );
        ok(hyzo_optimizer_load_state_file(o, path.as_ptr()));
        a.copy_from_slice(&saved);
        zo_step(o, &a);
        assert_eq!(a, after);
        hyzo_optimizer_destroy(o);
        let s = CStr::from_ptr(hyzo_status_string(7));
        assert_eq!(s.to_str().unwrap(), "HYZO_ERR_IO");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A call on an optimizer that another thread is using is refused, not a data race.
#[test]
fn one_optimizer_serves_one_call_at_a_time() {
    let mut a = vec![0.5f32; 16];
    let mut g = vec![0f32; 16];
    let o = with_tensor(&hyzo_config_default(), &mut a, &mut g);
    let busy = |o: *mut hyzo_optimizer| {
        // SAFETY: live optimizer; the flag is what another thread's call would hold.
        unsafe { &*std::ptr::addr_of!((*o).in_use) }
    };
    busy(o).store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut steps, mut skipped) = (0, 0);
    unsafe {
        expect(
            hyzo_optimizer_stats(o, &mut steps, &mut skipped),
            HYZO_ERR_BAD_STATE,
            "in use by another thread",
        );
        hyzo_optimizer_destroy(o); // refused: the optimizer stays alive
        assert!(last_error().contains("in use by another thread"));
        busy(o).store(false, std::sync::atomic::Ordering::SeqCst);
        ok(hyzo_optimizer_stats(o, &mut steps, &mut skipped));
    }
    // Two threads hammering one optimizer: every call either runs or is refused.
    let addr = o as usize;
    let workers: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let o = addr as *mut hyzo_optimizer;
                let mut refused = 0;
                for _ in 0..2000 {
                    let (mut s, mut k) = (0, 0);
                    // SAFETY: the optimizer outlives the threads.
                    match unsafe { hyzo_optimizer_stats(o, &mut s, &mut k) } {
                        HYZO_OK => {}
                        HYZO_ERR_BAD_STATE => refused += 1,
                        other => panic!("{other:?}: {}", last_error()),
                    }
                }
                refused
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    unsafe { hyzo_optimizer_destroy(o) };
}

/// Issue 29 through the C ABI: a first-order step on a NaN gradient is skipped and counted
/// (or applied with `skip_nonfinite_grads = 0`, any other value refused), a displacement
/// that would overflow is refused, and a state file holding a negative second moment, or a
/// FIFO, is refused with nothing changed.
#[test]
fn reliability_through_c() {
    let mut cfg = hyzo_config_default();
    assert_eq!(cfg.skip_nonfinite_grads, 1);
    cfg.skip_nonfinite_grads = 2;
    let mut o = null_mut();
    unsafe {
        expect(
            hyzo_optimizer_create_cpu(&cfg, 1, &mut o),
            HYZO_ERR_INVALID_ARGUMENT,
            "cfg->skip_nonfinite_grads",
        );
    }
    cfg.rule = hyzo_rule::HYZO_RULE_ADAMW as u32;
    for skip in [1, 0] {
        cfg.skip_nonfinite_grads = skip;
        let mut a = vec![0.5f32; 100];
        let mut g = vec![0.1f32; 100];
        g[42] = f32::NAN;
        let o = with_tensor(&cfg, &mut a, &mut g);
        let (mut steps, mut skipped) = (0, 0);
        unsafe {
            ok(hyzo_fo_step(o));
            ok(hyzo_optimizer_stats(o, &mut steps, &mut skipped));
            let mut c = hyzo_config_default();
            ok(hyzo_optimizer_get_config(o, &mut c));
            assert_eq!(c.skip_nonfinite_grads, skip);
            hyzo_optimizer_destroy(o);
        }
        assert_eq!(steps, 1);
        if skip == 1 {
            assert_eq!(skipped, 1);
            assert!(a.iter().all(|v| *v == 0.5));
        } else {
            assert_eq!(skipped, 0);
            assert!(a[42].is_nan() && a[0] < 0.5);
        }
    }
    let mut a = vec![0.5f32; 100];
    let mut g = vec![0f32; 100];
    let o = with_tensor(&cfg, &mut a, &mut g);
    let dir = std::env::temp_dir().join(format!("hyzo-ffi-reliability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    unsafe {
        expect(
            hyzo_optimizer_displace(o, 1, 0, 0, 3e38),
            HYZO_ERR_INVALID_ARGUMENT,
            "non-finite",
        );
        assert!(a.iter().all(|v| *v == 0.5));
        zo_step(o, &a);
        let mut size = 0;
        ok(hyzo_optimizer_state_size(o, &mut size));
        let mut state = vec![0u8; size as usize];
        ok(hyzo_optimizer_save_state(
            o,
            state.as_mut_ptr().cast(),
            size,
        ));
        // v[0] = −1 (body: m then v of 100 elements), checksum recomputed.
        let mut bad = state.clone();
        bad[64 + 400..64 + 404].copy_from_slice(&(-1f32).to_le_bytes());
        let n = bad.len() - 4;
        let crc = crc32c::crc32c(&bad[..n]);
        bad[n..].copy_from_slice(&crc.to_le_bytes());
        let file = dir.join("bad");
        std::fs::write(&file, &bad).unwrap();
        let path = CString::new(file.to_str().unwrap()).unwrap();
        expect(
            hyzo_optimizer_load_state_file(o, path.as_ptr()),
            HYZO_ERR_INVALID_ARGUMENT,
            "second moment",
        );
        expect(
            hyzo_optimizer_load_state(o, bad.as_ptr().cast(), size),
            HYZO_ERR_INVALID_ARGUMENT,
            "second moment",
        );
        #[cfg(unix)]
        {
            let fifo = CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
            assert_eq!(libc::mkfifo(fifo.as_ptr(), 0o600), 0);
            expect(
                hyzo_optimizer_load_state_file(o, fifo.as_ptr()),
                HYZO_ERR_IO,
                "not a regular file",
            );
        }
        let mut now = vec![0u8; size as usize];
        ok(hyzo_optimizer_save_state(o, now.as_mut_ptr().cast(), size));
        assert_eq!(now, state, "nothing changed");
        hyzo_optimizer_destroy(o);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The values of the C enum `name` as `ffi/hyzo.h` declares them: `(constant, value)`.
fn header_enum(name: &str) -> Vec<(String, u32)> {
    let header = include_str!("../../ffi/hyzo.h");
    let end = header
        .find(&format!("}} {name};"))
        .unwrap_or_else(|| panic!("ffi/hyzo.h declares no enum {name}"));
    let start = header[..end]
        .rfind("typedef enum {")
        .expect("an enum's start");
    header[start..end]
        .lines()
        .filter_map(|l| {
            let (constant, value) = l.trim().strip_suffix(',')?.split_once(" = ")?;
            Some((
                constant.to_string(),
                value.parse().expect("a decimal value"),
            ))
        })
        .collect()
}

/// The C enums of the header have exactly the values of the core enums, each under the
/// name `enums.rs` gives it: no C value without a core variant (it would be refused), no
/// core variant left out of `ALL` (it could not be chosen from C). The values themselves
/// are tied at compile time (`enums.rs`).
#[test]
fn header_enums_are_the_core_enums() {
    fn names<T: Copy, C: std::fmt::Debug>(
        all: &[T],
        c: impl Fn(T) -> C,
        v: impl Fn(T) -> u32,
    ) -> Vec<(String, u32)> {
        all.iter().map(|&x| (format!("{:?}", c(x)), v(x))).collect()
    }
    let mut rules = names(&Rule::ALL, c_rule, |r| r as u32);
    rules.push(("HYZO_RULE_NONE".into(), hyzo_rule::HYZO_RULE_NONE as u32));
    let cases = [
        ("hyzo_dtype", names(&DType::ALL, c_dtype, |t| t as u32)),
        ("hyzo_rule", rules),
        (
            "hyzo_direction",
            names(&DirectionKind::ALL, c_direction, |k| k as u32),
        ),
        (
            "hyzo_estimator",
            names(&Estimator::ALL, c_estimator, |e| e as u32),
        ),
        (
            "hyzo_precision",
            names(&Precision::ALL, c_precision, |p| p as u32),
        ),
    ];
    for (name, core) in cases {
        assert_eq!(
            header_enum(name),
            core,
            "{name}: ffi/hyzo.h against the core"
        );
    }
    // Every value of the header is accepted through the configuration, and read back.
    for (field, values) in [
        ("direction", header_enum("hyzo_direction")),
        ("estimator", header_enum("hyzo_estimator")),
        ("rule", header_enum("hyzo_rule")),
        ("precision", header_enum("hyzo_precision")),
    ] {
        for (constant, v) in values {
            let mut c = hyzo_config_default();
            match field {
                "direction" => c.direction = v,
                "estimator" => c.estimator = v,
                "precision" => c.precision = v,
                _ if constant == "HYZO_RULE_NONE" => c.fo_rule = v,
                _ => c.rule = v,
            }
            let core = config_from_c(&c).unwrap_or_else(|e| panic!("{constant}: {e:?}"));
            // Debug, not ==: the unset fo_lr and fo_weight_decay are NaN.
            assert_eq!(
                format!("{:?}", config_to_c(&core)),
                format!("{c:?}"),
                "{constant}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The step protocol's failures through the C ABI, with the backend of protocol/tests.rs
// that fails on chosen passes.

use crate::protocol::tests::{
    failure_configs, initial_params, loss_of, FailingBackend, Plan, N as FAILING_N,
};
use std::sync::{Arc, Mutex};

/// A handle over `data` whose backend fails the passes its plan names.
fn failing_handle(cfg: &Config, data: &mut [f32]) -> (*mut hyzo_optimizer, Arc<Mutex<Plan>>) {
    let (backend, plan) = FailingBackend::new();
    let inner = Optimizer::with_backend(cfg.clone(), ParamShard::new(), Box::new(backend));
    let o = new_handle(inner.unwrap());
    // SAFETY: `data` outlives the handle in every test.
    ok(unsafe {
        hyzo_optimizer_add_tensor(
            o,
            data.as_mut_ptr().cast(),
            0,
            data.len() as u64,
            0,
            null_mut(),
            0,
        )
    });
    (o, plan)
}

/// A whole zeroth-order step through C; the first status that is not `HYZO_OK`.
fn c_step(o: *mut hyzo_optimizer, data: &[f32]) -> hyzo_status {
    // SAFETY: live optimizer.
    unsafe {
        let s = hyzo_zo_begin(o);
        if s != HYZO_OK {
            return s;
        }
        let mut more = 1;
        while more != 0 {
            let s = hyzo_zo_feed(o, loss_of(data), &mut more);
            if s != HYZO_OK {
                return s;
            }
        }
    }
    HYZO_OK
}

fn c_save(o: *mut hyzo_optimizer) -> Vec<u8> {
    let mut size = 0u64;
    // SAFETY: live optimizer, buffers of the sizes given.
    unsafe {
        ok(hyzo_optimizer_state_size(o, &mut size));
        let mut buf = vec![0u8; size as usize];
        ok(hyzo_optimizer_save_state(o, buf.as_mut_ptr().cast(), size));
        buf
    }
}

fn c_poisoned(o: *mut hyzo_optimizer) -> bool {
    let mut p = 7;
    // SAFETY: live optimizer, writable int.
    ok(unsafe { hyzo_optimizer_poisoned(o, &mut p) });
    assert!(p == 0 || p == 1);
    p == 1
}

/// The entry points a poisoned optimizer still accepts: they are the protocol's way out.
const RECOVERING: [&str; 5] = [
    "hyzo_optimizer_destroy",
    "hyzo_optimizer_poisoned",
    "hyzo_optimizer_load_state",
    "hyzo_optimizer_load_state_file",
    "hyzo_zo_abort",
];

/// Calls every entry point of the header that takes an optimizer, but [`RECOVERING`], with
/// valid arguments: each must be refused with `HYZO_ERR_BAD_STATE`, its name and `needle` in
/// the message. The list is checked against `ffi/hyzo.h`, so a new entry point is not missed.
fn assert_c_refuses_everything(o: *mut hyzo_optimizer, needle: &str) {
    let (mut u64a, mut u64b, mut u32a, mut f, mut i) = (0u64, 0u64, 0u32, 0f32, 0 as c_int);
    let mut cfg = hyzo_config_default();
    let mut floats = [0f32; 64];
    let mut doubles = [1f64; 4];
    let mut bytes = [0u8; 4096];
    let mut extra = [0f32; 4];
    let path = c"/nonexistent/hyzo.state";
    let mut called: Vec<&str> = Vec::new();
    let mut refused = |name: &'static str, status: hyzo_status| {
        assert_eq!(status, HYZO_ERR_BAD_STATE, "{name}: {}", last_error());
        let m = last_error();
        assert!(
            m.starts_with(&format!("{name}: ")) && m.contains("refused") && m.contains(needle),
            "{name}: {m:?} lacks {needle:?}"
        );
        called.push(name);
    };
    // SAFETY: live optimizer, valid pointers of the sizes given.
    unsafe {
        refused(
            "hyzo_optimizer_set_shape",
            hyzo_optimizer_set_shape(o, 0, 1, FAILING_N as u64),
        );
        refused(
            "hyzo_optimizer_lowrank_factors_len",
            hyzo_optimizer_lowrank_factors_len(o, &mut u64a),
        );
        refused(
            "hyzo_optimizer_lowrank_factors",
            hyzo_optimizer_lowrank_factors(o, 0, floats.as_mut_ptr(), 0),
        );
        refused(
            "hyzo_zo_forward_perturbation",
            hyzo_zo_forward_perturbation(o, &mut u32a, &mut f),
        );
        refused(
            "hyzo_optimizer_add_tensor",
            hyzo_optimizer_add_tensor(o, extra.as_mut_ptr().cast(), 0, 4, 1 << 40, null_mut(), 0),
        );
        refused(
            "hyzo_optimizer_set_stream",
            hyzo_optimizer_set_stream(o, null_mut()),
        );
        refused("hyzo_optimizer_set_lr", hyzo_optimizer_set_lr(o, 0.5));
        refused(
            "hyzo_optimizer_set_weight_decay",
            hyzo_optimizer_set_weight_decay(o, 0.5),
        );
        refused("hyzo_optimizer_set_fo_lr", hyzo_optimizer_set_fo_lr(o, 0.5));
        refused(
            "hyzo_optimizer_set_fo_weight_decay",
            hyzo_optimizer_set_fo_weight_decay(o, 0.5),
        );
        refused(
            "hyzo_optimizer_get_config",
            hyzo_optimizer_get_config(o, &mut cfg),
        );
        refused(
            "hyzo_optimizer_num_tensors",
            hyzo_optimizer_num_tensors(o, &mut u64a),
        );
        refused(
            "hyzo_optimizer_state_size",
            hyzo_optimizer_state_size(o, &mut u64a),
        );
        refused(
            "hyzo_optimizer_save_state",
            hyzo_optimizer_save_state(o, bytes.as_mut_ptr().cast(), 4096),
        );
        refused(
            "hyzo_optimizer_save_state_file",
            hyzo_optimizer_save_state_file(o, path.as_ptr()),
        );
        refused("hyzo_zo_begin", hyzo_zo_begin(o));
        refused(
            "hyzo_zo_begin_with_sq_norms",
            hyzo_zo_begin_with_sq_norms(o, doubles.as_ptr(), 1),
        );
        refused(
            "hyzo_optimizer_local_sq_norms",
            hyzo_optimizer_local_sq_norms(o, doubles.as_mut_ptr(), 1),
        );
        refused("hyzo_zo_feed", hyzo_zo_feed(o, 1.0, &mut i));
        refused("hyzo_zo_feed_device", hyzo_zo_feed_device(o, &f, &mut i));
        refused("hyzo_zo_last_loss", hyzo_zo_last_loss(o, &mut f, &mut i));
        refused(
            "hyzo_zo_last_projected_grads",
            hyzo_zo_last_projected_grads(o, floats.as_mut_ptr(), 1),
        );
        refused("hyzo_fo_step", hyzo_fo_step(o));
        refused(
            "hyzo_fo_step_masked",
            hyzo_fo_step_masked(o, [1u8].as_ptr(), 1),
        );
        refused("hyzo_next_phase", hyzo_next_phase(o, &mut u32a));
        refused(
            "hyzo_optimizer_stats",
            hyzo_optimizer_stats(o, &mut u64a, &mut u64b),
        );
        refused(
            "hyzo_optimizer_updates",
            hyzo_optimizer_updates(o, &mut u64a, &mut u64b),
        );
        refused("hyzo_optimizer_synchronize", hyzo_optimizer_synchronize(o));
        refused(
            "hyzo_optimizer_displace",
            hyzo_optimizer_displace(o, 1, 2, 0, 0.5),
        );
        refused("hyzo_optimizer_skip_step", hyzo_optimizer_skip_step(o));
    }
    let header = include_str!("../../ffi/hyzo.h");
    let mut taking_opt: Vec<&str> = header
        .lines()
        .filter(|l| l.contains("hyzo_optimizer *opt"))
        .filter_map(|l| l.split('(').next()?.split_whitespace().last())
        .filter(|name| !RECOVERING.contains(name))
        .collect();
    taking_opt.sort_unstable();
    called.sort_unstable();
    assert_eq!(
        called, taking_opt,
        "the entry points of ffi/hyzo.h that take an optimizer"
    );
}

/// For every configuration and every pass `k` of a step, through C: the call that runs it
/// returns the backend's status with a message saying the optimizer is poisoned;
/// `hyzo_optimizer_poisoned` says so; every other call is refused with the reason; a load
/// (and the parameters written back) makes it continue as an optimizer that never failed.
#[test]
fn a_failed_pass_poisons_through_c() {
    for cfg in failure_configs() {
        let per_step = (0..=cfg.evaluations_per_step())
            .filter(|&fed| {
                crate::protocol::pass_after(cfg.estimator, cfg.num_directions, fed)
                    != crate::protocol::Pass::Nothing
            })
            .count() as u64;
        let mut ref_data = initial_params();
        let (reference, _) = failing_handle(&cfg, &mut ref_data);
        ok(c_step(reference, &ref_data));
        ok(c_step(reference, &ref_data));
        for k in 0..per_step {
            let what = format!("{:?} q = {}, pass {k}", cfg.estimator, cfg.num_directions);
            let mut data = initial_params();
            let (o, plan) = failing_handle(&cfg, &mut data);
            plan.lock().unwrap().fail = vec![per_step + k];
            ok(c_step(o, &data));
            let checkpoint = (data.clone(), c_save(o));
            assert!(!c_poisoned(o), "{what}");
            let s = c_step(o, &data);
            assert_eq!(s, HYZO_ERR_CUDA, "{what}: {}", last_error());
            let m = last_error();
            let call = if cfg.estimator == Estimator::TwoSided && k == 0 {
                "hyzo_zo_begin: "
            } else {
                "hyzo_zo_feed: "
            };
            assert!(
                m.starts_with(call) && m.contains("injected failure") && m.contains("poisoned"),
                "{what}: {m}"
            );
            assert!(c_poisoned(o), "{what}");
            let passes = plan.lock().unwrap().passes;
            assert_c_refuses_everything(o, "poisoned");
            // SAFETY: live optimizer; buffers of the lengths given.
            unsafe {
                expect(hyzo_zo_abort(o), HYZO_ERR_BAD_STATE, "poisoned");
                let bad = &checkpoint.1[..checkpoint.1.len() - 1];
                let s = hyzo_optimizer_load_state(o, bad.as_ptr().cast(), bad.len() as u64);
                assert_ne!(s, HYZO_OK, "{what}: a truncated state loaded");
                assert!(c_poisoned(o), "{what}: a failed load un-poisoned");
                assert_eq!(
                    plan.lock().unwrap().passes,
                    passes,
                    "{what}: a refused call ran a pass"
                );
                data.copy_from_slice(&checkpoint.0);
                ok(hyzo_optimizer_load_state(
                    o,
                    checkpoint.1.as_ptr().cast(),
                    checkpoint.1.len() as u64,
                ));
            }
            assert!(!c_poisoned(o), "{what}");
            ok(c_step(o, &data));
            assert_eq!(data, ref_data, "{what}: parameters after recovery");
            assert_eq!(c_save(o), c_save(reference), "{what}: state after recovery");
            // SAFETY: live optimizer.
            unsafe { hyzo_optimizer_destroy(o) };
        }
        // SAFETY: live optimizer.
        unsafe { hyzo_optimizer_destroy(reference) };
    }
}

/// `hyzo_zo_abort` whose restoring pass fails, through C: the step is kept, every call but
/// abort and the loads is refused, the second abort restores exactly as one that never
/// failed; a second failure poisons.
#[test]
fn a_failed_abort_through_c() {
    for cfg in failure_configs() {
        for eval in 0..cfg.evaluations_per_step() {
            if crate::protocol::point(cfg.estimator, eval).is_none() {
                continue; // no pass to fail (protocol/tests.rs checks that abort runs none)
            }
            let what = format!(
                "{:?} q = {}, eval {eval}",
                cfg.estimator, cfg.num_directions
            );
            let feed_until = |o: *mut hyzo_optimizer, data: &[f32]| unsafe {
                ok(hyzo_zo_begin(o));
                for _ in 0..eval {
                    let mut more = 0;
                    ok(hyzo_zo_feed(o, loss_of(data), &mut more));
                    assert_eq!(more, 1);
                }
            };
            let mut ref_data = initial_params();
            let (reference, _) = failing_handle(&cfg, &mut ref_data);
            feed_until(reference, &ref_data);
            // SAFETY: live optimizers.
            unsafe {
                ok(hyzo_zo_abort(reference));

                let mut data = initial_params();
                let (o, plan) = failing_handle(&cfg, &mut data);
                feed_until(o, &data);
                let undo = plan.lock().unwrap().passes;
                plan.lock().unwrap().fail = vec![undo];
                expect(hyzo_zo_abort(o), HYZO_ERR_CUDA, "abort again");
                assert!(!c_poisoned(o), "{what}");
                assert_c_refuses_everything(o, "abort failed");
                ok(hyzo_zo_abort(o));
                assert_eq!(data, ref_data, "{what}: restored");
                assert_eq!(c_save(o), c_save(reference), "{what}: state");
                ok(c_step(o, &data));

                // Failing twice: poisoned.
                feed_until(o, &data);
                let undo = plan.lock().unwrap().passes;
                plan.lock().unwrap().fail = vec![undo, undo + 1];
                expect(hyzo_zo_abort(o), HYZO_ERR_CUDA, "abort again");
                expect(hyzo_zo_abort(o), HYZO_ERR_CUDA, "poisoned");
                assert!(c_poisoned(o), "{what}");
                assert_c_refuses_everything(o, "failed twice");
                hyzo_optimizer_destroy(o);
                hyzo_optimizer_destroy(reference);
            }
        }
    }
}

/// An internal error (a caught panic) poisons for good, and `hyzo_optimizer_poisoned` says
/// so: even a load is refused.
#[test]
fn a_panic_poisons_for_good() {
    let mut data = initial_params();
    let (o, _) = failing_handle(&failure_configs()[0], &mut data);
    let state = c_save(o);
    unsafe {
        expect(
            with_opt("test", o, |_| panic!("boom")),
            HYZO_ERR_INTERNAL,
            "boom",
        );
        assert!(c_poisoned(o));
        expect(
            hyzo_optimizer_load_state(o, state.as_ptr().cast(), state.len() as u64),
            HYZO_ERR_INTERNAL,
            "destroy it",
        );
        expect(
            hyzo_optimizer_poisoned(o, null_mut()),
            HYZO_ERR_INVALID_ARGUMENT,
            "poisoned",
        );
        hyzo_optimizer_destroy(o);
    }
}
