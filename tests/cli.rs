//! `hyzo directions` agrees with the spec's exact formulas, for any seed, step, direction and
//! range, and rejects bad input with a message.

use hyzo::direction::{gaussian_exact, rademacher_at, DirectionId};
use std::process::Command;

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
