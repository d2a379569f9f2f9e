//! `hyzo directions` agrees with the spec's exact formulas, for any seed, step, direction and
//! range; every command has help; bad or out-of-range input is rejected with a message that
//! names the flag, and a size the machine cannot hold is an error, never an abort.

use hyzo::direction::{gaussian_exact, rademacher_at, DirectionId};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

/// Runs `hyzo` with `args`.
fn hyzo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hyzo"))
        .args(args)
        .output()
        .unwrap()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hyzo"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn directions_agree_with_the_spec() {
    for &(seed, step, dir, start, count) in &[
        (0u64, 0u32, 0u32, 0u64, 300u64),
        (42, 7, 3, (1 << 32) - 5, 77),
        (u64::MAX, u32::MAX, 0xFFFF_FEFF, (1 << 40) + 3, 33),
    ] {
        let id = DirectionId::new(seed, step, dir);
        let args = |kind: &'static str| {
            vec![
                "directions".to_string(),
                "--kind".into(),
                kind.into(),
                "--seed".into(),
                seed.to_string(),
                "--step".into(),
                step.to_string(),
                "--direction".into(),
                dir.to_string(),
                "--start".into(),
                start.to_string(),
                "--count".into(),
                count.to_string(),
            ]
        };
        let a = args("gaussian");
        let (ok, out, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
        let vals: Vec<f64> = out.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(vals.len() as u64, count);
        for (i, v) in vals.iter().enumerate() {
            let exact = gaussian_exact(id, start + i as u64);
            // The spec's tolerance for an f32 implementation.
            assert!(
                (v - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                "{v} vs {exact}"
            );
        }
        let a = args("rademacher");
        let (ok, out, _) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok);
        for (i, l) in out.lines().enumerate() {
            assert_eq!(
                l.parse::<f32>().unwrap(),
                rademacher_at(id, start + i as u64)
            );
        }
    }
}

#[test]
fn bad_input_gets_a_message_and_a_failure_code() {
    for args in [
        vec![
            "directions",
            "--kind",
            "uniform",
            "--seed",
            "1",
            "--step",
            "0",
            "--direction",
            "0",
            "--count",
            "3",
        ],
        vec![
            "directions",
            "--kind",
            "gaussian",
            "--seed",
            "-1",
            "--step",
            "0",
            "--direction",
            "0",
            "--count",
            "3",
        ],
        vec![
            "directions",
            "--kind",
            "gaussian",
            "--seed",
            "1",
            "--step",
            "4294967296",
            "--direction",
            "0",
            "--count",
            "3",
        ],
        vec!["directions", "--kind", "gaussian", "--seed", "1"],
        vec!["bogus"],
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(err.starts_with("hyzo: "), "{err}");
    }
    let (ok, out, _) = run(&["info"]);
    assert!(ok);
    assert!(out.contains("backend cpu"));
}

#[test]
fn every_command_has_help() {
    for (args, expect) in [
        (
            &["--help"][..],
            &["directions", "info", "bench", "Exit status"][..],
        ),
        (&["help", "bench"], &["--elements", "--reps", "--threads"]),
        (
            &["directions", "--help"],
            &["--kind", "--seed", "--start", "--count", "4294967296"],
        ),
        (&["info", "--help"], &["version"]),
        (
            &["bench", "--help"],
            &["1073741824", "14 GiB", "1..=1000", "1..=1024"],
        ),
    ] {
        let out = hyzo(args);
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        for word in expect {
            assert!(stdout.contains(word), "{args:?}: no {word:?} in\n{stdout}");
        }
    }
    // A bare `hyzo` is a usage error that shows the help.
    let out = hyzo(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("Usage: hyzo <COMMAND>"));
    let out = hyzo(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains(hyzo::VERSION));
}

/// Each usage error exits with status 2 and a one-line reason that names the flag.
#[test]
fn out_of_range_values_are_rejected_naming_the_flag() {
    let directions = |flag: &'static str, value: &'static str| {
        let mut args = vec![
            "directions",
            "--kind",
            "gaussian",
            "--seed",
            "1",
            "--step",
            "0",
            "--direction",
            "0",
            "--count",
            "3",
        ];
        match args.iter().position(|a| *a == flag) {
            Some(i) => args[i + 1] = value,
            None => args.extend([flag, value]),
        }
        args
    };
    for (args, flag) in [
        (directions("--count", "4294967297"), "--count"),
        (directions("--count", "18446744073709551615"), "--count"),
        (directions("--count", "99999999999999999999"), "--count"),
        (directions("--kind", "sphere"), "--kind"),
        (directions("--kind", "lowrank"), "--kind"),
        (directions("--direction", "0x100000000"), "--direction"),
        (directions("--start", "18446744073709551614"), "--count"),
        (vec!["bench", "--elements", "0"], "--elements"),
        (vec!["bench", "--elements", "1073741825"], "--elements"),
        (vec!["bench", "--elements", "1099511627776"], "--elements"),
        (vec!["bench", "--reps", "0"], "--reps"),
        (vec!["bench", "--reps", "1001"], "--reps"),
        (vec!["bench", "--reps", "4294967296"], "--reps"),
        (vec!["bench", "--threads", "0"], "--threads"),
        (vec!["bench", "--threads", "1025"], "--threads"),
        (vec!["bench", "--threads", "4294967295"], "--threads"),
        (vec!["bench", "--threads", "1,2,4294967295"], "--threads"),
        (
            vec!["bench", "--threads", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"],
            "--threads",
        ),
        (vec!["bench", "--bogus", "1"], "--bogus"),
    ] {
        let out = hyzo(&args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("hyzo: "), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: no {flag} in {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// RAYON_NUM_THREADS sizes rayon's global pool, which `hyzo info` starts: a huge value is
/// rejected before any thread is spawned.
#[test]
fn a_huge_rayon_thread_count_is_rejected() {
    let out = Command::new(env!("CARGO_BIN_EXE_hyzo"))
        .arg("info")
        .env("RAYON_NUM_THREADS", "4294967295")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("hyzo: ") && err.contains("RAYON_NUM_THREADS"),
        "{err}"
    );
}

#[test]
fn a_small_bench_runs() {
    let out = hyzo(&[
        "bench",
        "--elements",
        "4096",
        "--reps",
        "1",
        "--threads",
        "1,3",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4096 elements, median of 1"), "{stdout}");
    for pass in ["generate Gaussian", "perturb bf16", "fo_update AdamW"] {
        for threads in [1, 3] {
            let row = stdout.lines().find(|l| {
                l.starts_with(pass) && l.split_whitespace().any(|w| w == threads.to_string())
            });
            assert!(
                row.is_some(),
                "no {pass} row for {threads} threads in\n{stdout}"
            );
        }
    }
}

/// A size within the bounds that this process cannot allocate (its address space is capped
/// at 512 MiB; the first buffer of 2^28 elements takes 1 GiB) is an error message and exit
/// status 1, not an allocator abort (a signal).
#[cfg(target_os = "linux")] // `ulimit -v`
#[test]
fn a_buffer_that_cannot_be_allocated_is_an_error() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 524288 && exec "$0" bench --elements 268435456 --reps 1 --threads 1"#)
        .arg(env!("CARGO_BIN_EXE_hyzo"))
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}: {err}", out.status);
    assert!(
        err.starts_with("hyzo: ") && err.contains("--elements"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// `hyzo directions ... | head` ends quietly when the reader closes the pipe, even for the
/// largest count.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hyzo"))
        .args([
            "directions",
            "--kind",
            "rademacher",
            "--seed",
            "7",
            "--step",
            "0",
            "--direction",
            "0",
            "--count",
            "4294967296",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first == "1\n" || first == "-1\n", "{first:?}");
    // The reader is dropped: hyzo's next write fails, and it stops.
    let out = child.wait_with_output().unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
