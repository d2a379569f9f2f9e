//! State files attacked as files: a planted link, concurrent savers, a file replaced or
//! truncated while it is loaded, a FIFO, and well-formed states holding moments no run
//! produces (checksum recomputed).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyzo::{Config, Optimizer, ParamShard, Precision, Rule};

const N: usize = 1 << 16;
const HEADER: usize = 64;

/// A fresh directory of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hyzo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(rule: Rule) -> Config {
    Config {
        rule,
        lr: 1e-2,
        precision: Precision::Compensated,
        seed: 5,
        ..Config::default()
    }
}

fn optimizer(x: &mut [half::bf16], rule: Rule) -> Optimizer<'_> {
    let mut shard = ParamShard::new();
    shard.add(x, 0).unwrap();
    Optimizer::with_threads(config(rule), shard, 1).unwrap()
}

/// The state of an AdamW optimizer after `steps` steps.
fn state_after(steps: usize) -> Vec<u8> {
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    let mut loss = 1.0;
    for _ in 0..steps {
        opt.zo_step(|_| {
            loss *= 0.9;
            loss
        })
        .unwrap();
    }
    opt.save_state().unwrap()
}

fn with_crc(mut state: Vec<u8>) -> Vec<u8> {
    let n = state.len() - 4;
    let crc = crc32c::crc32c(&state[..n]);
    state[n..].copy_from_slice(&crc.to_le_bytes());
    state
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A link planted where a predictable temporary name would be: the save must not write
/// through it.
#[cfg(unix)]
#[test]
fn a_planted_link_is_not_followed() {
    let dir = scratch("link");
    let path = dir.join("opt.state");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let predictable = dir.join(format!("opt.state.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &predictable).unwrap();
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    opt.save_state_file(&path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&path).unwrap(), opt.save_state().unwrap());
    assert_eq!(
        files_in(&dir),
        [
            "opt.state",
            &format!("opt.state.tmp-{}", std::process::id()),
            "victim"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two optimizers of one process saving to one path at once: every save succeeds and the
/// file left is one of the two states, whole.
#[test]
fn concurrent_saves_to_one_path_leave_a_state_that_loads() {
    let dir = scratch("concurrent");
    let path = dir.join("opt.state");
    let states = [state_after(1), state_after(2)];
    let saver = |i: usize| {
        let path = path.clone();
        let state = states[i].clone();
        std::thread::spawn(move || {
            let mut x = vec![half::bf16::from_f32(0.5); N];
            let mut opt = optimizer(&mut x, Rule::AdamW);
            opt.load_state(&state).unwrap();
            for _ in 0..40 {
                opt.save_state_file(&path).unwrap();
            }
        })
    };
    let (a, b) = (saver(0), saver(1));
    a.join().unwrap();
    b.join().unwrap();
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    opt.load_state_file(&path).unwrap();
    let loaded = opt.save_state().unwrap();
    assert!(loaded == states[0] || loaded == states[1]);
    assert_eq!(files_in(&dir), ["opt.state"], "no temporary file left");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `change` in a loop on another thread while `load` runs, until it has seen what it
/// needs (it returns `false`) or 20,000 rounds have run.
fn while_changing(change: impl Fn() + Send + 'static, mut load: impl FnMut() -> bool) {
    let stop = Arc::new(AtomicBool::new(false));
    let changer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                change();
            }
        })
    };
    for _ in 0..20_000 {
        if !load() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    changer.join().unwrap();
}

/// The file is replaced (renamed over) by another valid state again and again while it is
/// loaded: each load takes one state whole, never the counters of one and the body of
/// the other.
#[test]
fn a_file_replaced_while_loading_loads_one_state_whole() {
    let dir = scratch("replaced");
    let path = dir.join("opt.state");
    let states = [state_after(1), state_after(3)];
    for (i, s) in states.iter().enumerate() {
        std::fs::write(dir.join(format!("s{i}")), s).unwrap();
    }
    std::fs::write(&path, &states[0]).unwrap();
    let (d, p) = (dir.clone(), path.clone());
    let flip = AtomicBool::new(false);
    let change = move || {
        // A hard link of each copy renamed over the path: an atomic replacement.
        let i = usize::from(flip.fetch_xor(true, Ordering::Relaxed));
        let tmp = d.join(format!("link{i}"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::hard_link(d.join(format!("s{i}")), &tmp).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    };
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    let mut loads = [0usize; 2];
    while_changing(change, || {
        opt.load_state_file(&path).unwrap();
        let loaded = opt.save_state().unwrap();
        let which = states.iter().position(|s| *s == loaded);
        assert!(which.is_some(), "a load mixed two states");
        loads[which.unwrap()] += 1;
        loads.iter().any(|n| *n < 200)
    });
    println!("loads of each state: {loads:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The file is truncated and rewritten in place again and again while it is loaded: a load
/// either takes the state whole or fails having changed nothing.
#[test]
fn a_file_truncated_while_loading_loads_whole_or_changes_nothing() {
    let dir = scratch("truncated");
    let path = dir.join("opt.state");
    let (before, saved) = (state_after(1), state_after(3));
    std::fs::write(&path, &saved).unwrap();
    let (p, s) = (path.clone(), saved.clone());
    let change = move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(s.len() as u64 / 3).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        f.write_all(&s).unwrap();
        // Whole most of the time, so that some loads check a whole file and then read on.
        std::thread::sleep(std::time::Duration::from_micros(100));
    };
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    let (mut ok, mut refused) = (0, 0);
    while_changing(change, || {
        opt.load_state(&before).unwrap();
        match opt.load_state_file(&path) {
            Ok(()) => {
                assert!(
                    opt.save_state().unwrap() == saved,
                    "a load took a damaged state"
                );
                ok += 1;
            }
            Err(_) => {
                assert!(
                    opt.save_state().unwrap() == before,
                    "a failed load changed the state"
                );
                refused += 1;
            }
        }
        ok < 500 || refused < 500
    });
    println!("{ok} loads, {refused} refused");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Loading from a FIFO (or anything but a regular file) is refused at once instead of
/// waiting for a writer forever.
#[cfg(unix)]
#[test]
fn a_fifo_is_refused_without_blocking() {
    let dir = scratch("fifo");
    let fifo = dir.join("opt.state");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let mut x = vec![half::bf16::from_f32(0.5); N];
        let mut opt = optimizer(&mut x, Rule::AdamW);
        let result = opt.load_state_file(&path).map_err(|e| e.to_string());
        let _ = tx.send(result);
    });
    // Generous: the refusal is immediate; a blocked open never answers.
    let result = rx.recv_timeout(std::time::Duration::from_secs(30));
    let e = result
        .expect("load_state_file blocked on a FIFO")
        .unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    assert!(opt
        .load_state_file(&dir)
        .unwrap_err()
        .to_string()
        .contains("not a regular file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `f32` `v` at element `i` of the one tensor's state: body = m, v, lo.
fn put_f32(state: &mut [u8], at: usize, v: f32) {
    state[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Well-formed states (checksum recomputed) whose moments no run produces are refused,
/// in memory and from a file, and nothing changes: a negative second moment (AdamW's `v`
/// of −1 makes every parameter NaN two steps later), non-finite moments or residuals.
#[test]
fn moments_no_run_produces_are_refused() {
    let dir = scratch("moments");
    let path = dir.join("opt.state");
    let good = state_after(2);
    let (m, v, lo) = (HEADER, HEADER + 4 * N, HEADER + 8 * N);
    let mut x = vec![half::bf16::from_f32(0.5); N];
    let mut opt = optimizer(&mut x, Rule::AdamW);
    let current = opt.save_state().unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (what, at, value) in [
        ("second moment", v + 4 * 17, -1.0f32),
        ("second moment", v, -1e-30),
        ("second moment", v + 4 * (N - 1), f32::INFINITY),
        ("first moment", m + 4 * 3, f32::NAN),
        ("first moment", m, f32::NEG_INFINITY),
    ] {
        let mut s = good.clone();
        put_f32(&mut s, at, value);
        cases.push((what, with_crc(s)));
    }
    let mut s = good.clone();
    s[lo + 2 * 5..lo + 2 * 6].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
    cases.push(("residual", with_crc(s)));
    for (what, bad) in &cases {
        let e = opt.load_state(bad).unwrap_err();
        assert!(e.message().contains(what), "{what}: {e}");
        std::fs::write(&path, bad).unwrap();
        let e = opt.load_state_file(&path).unwrap_err();
        assert!(e.message().contains(what), "{what}: {e}");
        assert_eq!(opt.save_state().unwrap(), current);
    }
    // −0 is a second moment a run can hold; a negative momentum is ordinary.
    let mut s = good.clone();
    put_f32(&mut s, v + 8, -0.0);
    opt.load_state(&with_crc(s)).unwrap();
    let mut y = vec![half::bf16::from_f32(0.5); N];
    let mut momentum = optimizer(&mut y, Rule::Momentum);
    let mut s = momentum.save_state().unwrap();
    put_f32(&mut s, HEADER, -3.0);
    momentum.load_state(&with_crc(s)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
