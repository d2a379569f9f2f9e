//! The device primitives of `kernels/hyzo_device.cuh`, compiled for the host (the header's
//! `HYZO_HOST_EMULATION` mode: each intrinsic becomes the IEEE operation it names), checked
//! bit for bit against the Rust reference: Philox, the Gaussian and Rademacher entries, the
//! stochastic-rounding words (for the index-aligned groups and for groups cut by address,
//! which straddle Philox blocks), the rounding modes, the conversions, the rules, the
//! division and the low-rank entry. This pins the kernels' arithmetic without a GPU;
//! `gpu_parity.rs` then checks the kernels themselves on one. Skipped (with a message) when no
//! C++ compiler is found, unless `HYZO_REQUIRE_CXX` is set (by `make test`): then it fails.

use std::io::Write;
use std::process::{Command, Stdio};

use half::{bf16, f16};
use hyzo::direction::{direction_at, gaussian_pair, DirectionId, DirectionKind};
use hyzo::dtype::{stochastic_round_bf16, stochastic_round_f16};
use hyzo::philox::philox4x32_10;
use hyzo::rules::{apply, Rule, RuleParams};
use rand::{Rng, SeedableRng};

/// The host driver, built once for all tests (they run in parallel and would otherwise
/// rewrite the executable while another runs it); `None` (and a message) without a C++
/// compiler.
fn driver() -> Option<std::path::PathBuf> {
    static DRIVER: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DRIVER.get_or_init(build_driver).clone()
}

fn build_driver() -> Option<std::path::PathBuf> {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hyzo_device_mirror");
    let root = env!("CARGO_MANIFEST_DIR");
    for cxx in [
        std::env::var("CXX").unwrap_or_default().as_str(),
        "c++",
        "g++",
        "clang++",
    ] {
        if cxx.is_empty() {
            continue;
        }
        let status = Command::new(cxx)
            .args([
                "-O2",
                "-std=c++17",
                "-ffp-contract=off",
                "-Wall",
                "-Wextra",
                "-Werror",
            ])
            .arg(format!("-I{root}/kernels"))
            .arg(format!("{root}/tests/device_mirror/main.cpp"))
            .arg("-o")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => return Some(out),
            Ok(s) => panic!("{cxx} failed to compile the host mirror ({s})"),
            Err(_) => continue,
        }
    }
    let msg = "no C++ compiler (CXX, c++, g++, clang++) for the host mirror of the device code";
    if std::env::var_os("HYZO_REQUIRE_CXX").is_some_and(|v| !v.is_empty() && v != "0") {
        // make test sets it: there a missing compiler must fail, not pass by skipping.
        panic!("{msg}; HYZO_REQUIRE_CXX is set, so this is an error");
    }
    println!("skipped: {msg}");
    None
}

/// Runs the driver on `input`; returns its output lines.
fn run(exe: &std::path::Path, input: &str) -> Vec<Vec<u64>> {
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the host mirror");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "host mirror failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|w| u64::from_str_radix(w, 16).unwrap())
                .collect()
        })
        .collect()
}

fn special_words() -> Vec<u32> {
    let mut v = vec![
        0u32,
        1,
        2,
        3,
        0x7FFF_FFFF,
        0x8000_0000,
        u32::MAX,
        u32::MAX - 1,
    ];
    for s in [27u32, 29, 30] {
        v.extend([
            (1 << s) - 1,
            1 << s,
            (1 << s) + 1,
            u32::MAX - (1 << s),
            u32::MAX - (1 << s) + 1,
        ]);
    }
    v.extend([
        3 << 29,
        0xC000_0000,
        0xE000_0000,
        0xDFFF_FFFF,
        0xA000_0000,
        0x9FFF_FFFF,
    ]);
    v
}

/// 2000 random counters and keys through the driver's Philox command `cmd` (`P`: the
/// plain generator, `K`: with precomputed round keys), against the Rust generator.
fn philox_matches(exe: &std::path::Path, cmd: &str, rng: &mut rand::rngs::StdRng) {
    let mut input = String::new();
    let mut cases = Vec::new();
    for _ in 0..2000 {
        let c: [u32; 4] = rng.gen();
        let k: [u32; 2] = rng.gen();
        input += &format!(
            "{cmd} {:x} {:x} {:x} {:x} {:x} {:x}\n",
            c[0], c[1], c[2], c[3], k[0], k[1]
        );
        cases.push((c, k));
    }
    let out = run(exe, &input);
    for ((c, k), o) in cases.iter().zip(&out) {
        let want = philox4x32_10(*c, *k);
        assert_eq!(
            o.iter().map(|w| *w as u32).collect::<Vec<_>>(),
            want.to_vec()
        );
    }
}

/// Every pair of the special words.
fn special_pairs() -> Vec<(u32, u32)> {
    let specials = special_words();
    specials
        .iter()
        .flat_map(|&x| specials.iter().map(move |&y| (x, y)))
        .collect()
}

#[test]
fn philox_and_gaussian_pairs_match_bit_for_bit() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    philox_matches(&exe, "P", &mut rng);
    let mut pairs = special_pairs();
    for _ in 0..300_000 {
        pairs.push((rng.gen(), rng.gen()));
    }
    let input: String = pairs
        .iter()
        .map(|(x, y)| format!("G {x:x} {y:x}\n"))
        .collect();
    let out = run(&exe, &input);
    assert_eq!(out.len(), pairs.len());
    for ((x, y), o) in pairs.iter().zip(&out) {
        let (a, b) = gaussian_pair(*x, *y);
        assert_eq!(
            (o[0] as u32, o[1] as u32),
            (a.to_bits(), b.to_bits()),
            "x={x:#x} y={y:#x}"
        );
    }
}

/// Philox with precomputed round keys gives the same words; the fast Gaussian's formula
/// (each approximate instruction replaced by the libm function it approximates: the
/// reduction, the near-1 branch and the half-turn shift are what is checked here; the
/// instructions' own errors are bounded in docs/interpretation.md) stays within 2e-5 (1 + |z|)
/// of the f64 Box-Muller, well inside spec v2 §3's 1e-4 (1 + |z|).
#[test]
fn precomputed_keys_and_fast_gaussian_formula() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    philox_matches(&exe, "K", &mut rng);
    let mut pairs = special_pairs();
    // Around the near-1 threshold (~x = 2^20) and the last words.
    for d in 0..64u32 {
        for x in [u32::MAX - (1 << 20) - 32 + d, u32::MAX - d, d] {
            pairs.push((x, rng.gen()));
        }
    }
    for _ in 0..300_000 {
        pairs.push((rng.gen(), rng.gen()));
    }
    let input: String = pairs
        .iter()
        .map(|(x, y)| format!("F {x:x} {y:x}\n"))
        .collect();
    let out = run(&exe, &input);
    let mut worst = 0f64;
    for ((x, y), o) in pairs.iter().zip(&out) {
        let u = (2.0 * *x as f64 + 1.0) * 2f64.powi(-33);
        let v = 2.0 * std::f64::consts::PI * ((2.0 * *y as f64 + 1.0) * 2f64.powi(-33));
        let rho = (-2.0 * u.ln()).sqrt();
        for (got, want) in [
            (f32::from_bits(o[0] as u32), rho * v.sin()),
            (f32::from_bits(o[1] as u32), rho * v.cos()),
        ] {
            let err = (got as f64 - want).abs() / (1.0 + want.abs());
            worst = worst.max(err);
            assert!(err < 2e-5, "x={x:#x} y={y:#x}: {got} vs {want}");
        }
    }
    println!("fast Gaussian formula (libm for the MUFU): worst {worst:.2e} (1 + |z|)");
}

#[test]
fn direction_groups_and_rounding_words_match() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut input = String::new();
    let mut cases = Vec::new();
    for i in 0..20_000u64 {
        let kind = (i % 2) as u32;
        let seed: u64 = rng.gen();
        let step: u32 = rng.gen_range(0..1000);
        let dir: u32 = rng.gen_range(0..8);
        let g: u64 = if i % 3 == 0 {
            rng.gen_range(0..1 << 40)
        } else {
            rng.gen_range(0..100)
        };
        input +=
            &format!("D {kind:x} {seed:x} {step:x} {dir:x} {g:x}\nW {seed:x} {step:x} {g:x}\n");
        cases.push((kind, seed, step, dir, g));
    }
    let out = run(&exe, &input);
    for (i, (kind, seed, step, dir, g)) in cases.iter().enumerate() {
        let k = if *kind == 1 {
            DirectionKind::Rademacher
        } else {
            DirectionKind::Gaussian
        };
        let id = DirectionId::new(*seed, *step, *dir);
        let sr = DirectionId::new(*seed, *step, hyzo::direction::STOCHASTIC_ROUNDING_DIRECTION);
        for e in 0..8u64 {
            let j = 8 * g + e;
            assert_eq!(
                out[2 * i][e as usize] as u32,
                direction_at(k, id, j).to_bits(),
                "{k:?} j={j}"
            );
            assert_eq!(
                out[2 * i + 1][e as usize] as u32,
                sr.block(j / 4)[(j % 4) as usize],
                "word j={j}"
            );
        }
    }
}

/// Group starts for the address-cut groups: every residue mod 8 and 128 near the block
/// boundaries of both streams, lo32(block) wrapping (j = 2^34, 2^39), j0 near 2^32 and
/// near 2^64 (the group then wraps to index 0), and random starts.
fn group_starts(rng: &mut rand::rngs::StdRng) -> Vec<u64> {
    let mut v: Vec<u64> = (0..300).collect();
    for base in [
        1u64 << 32,
        1 << 34,
        1 << 39,
        1 << 40,
        1 << 62,
        1 << 63,
        0u64.wrapping_sub(1 << 32),
    ] {
        v.extend((0..40u64).map(|d| base.wrapping_sub(20).wrapping_add(d)));
    }
    v.extend((0..20u64).map(|d| u64::MAX - d));
    for _ in 0..3000 {
        v.push(match rng.gen_range(0..3) {
            0 => rng.gen_range(0..1 << 20),
            1 => rng.gen_range(0..1 << 42),
            _ => rng.gen(),
        });
    }
    v
}

/// The index arithmetic of the address-cut groups (kernels/hyzo_device.cuh `hyzo_span`,
/// `hyzo_bit_span`): which Philox blocks and lanes the 8 elements j0 .. j0+7 need.
#[test]
fn address_cut_group_spans() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let starts = group_starts(&mut rng);
    let input: String = starts.iter().map(|j0| format!("N {j0:x}\n")).collect();
    let out = run(&exe, &input);
    assert_eq!(out.len(), starts.len());
    for (j0, o) in starts.iter().zip(&out) {
        let j = |e: u64| j0.wrapping_add(e);
        let r = j0 % 4;
        let want = [
            j(0) / 4,
            j(4) / 4,
            j(8) / 4,
            (r >= 2) as u64,
            r % 2,
            j(0) / 128,
            j(7) / 128,
            (j(0) % 128) / 32,
            (j(7) % 128) / 32,
            j(0) % 32,
        ];
        assert_eq!(o.as_slice(), want.as_slice(), "j0={j0:#x}");
        // Every entry j0 + e is lane (r + e) of the span's blocks (Gaussian and rounding
        // words), bit (shift + e) of the two words (Rademacher).
        for e in 0..8u64 {
            assert_eq!(want[((r + e) / 4) as usize], j(e) / 4, "j0={j0:#x} e={e}");
            let (block, word) = if j0 % 32 + e < 32 {
                (want[5], want[7])
            } else {
                (want[6], want[8])
            };
            assert_eq!((block, word), (j(e) / 128, (j(e) % 128) / 32));
            assert_eq!((want[9] + e) % 32, j(e) % 32);
        }
    }
}

/// The entries of the address-cut groups (8 elements from any j0, straddling Philox
/// blocks) equal the reference's entries at the same global indices: exact Gaussian and
/// Rademacher against `direction_at`, the rounding words against the reserved stream, and
/// the fast Gaussian against the fast entries of the index-aligned groups (the same host
/// emulation of the approximate instructions: an element's fast entry is a function of j
/// alone, however the kernels cut groups).
#[test]
fn address_cut_groups_match_direction_at() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let starts = group_starts(&mut rng);
    let mut input = String::new();
    let mut cases = Vec::new();
    for (i, &j0) in starts.iter().enumerate() {
        let kind = (i % 2) as u32;
        let seed: u64 = if i % 7 == 0 { u64::MAX } else { rng.gen() };
        let step: u32 = if i % 11 == 0 {
            u32::MAX
        } else {
            rng.gen_range(0..1000)
        };
        let dir: u32 = rng.gen_range(0..8);
        let (ga, gb) = (j0 / 8, j0.wrapping_add(7) / 8);
        for k in [kind, 1 - kind] {
            input += &format!("J {k:x} 0 {seed:x} {step:x} {dir:x} {j0:x}\n");
            input += &format!("J {k:x} 1 {seed:x} {step:x} {dir:x} {j0:x}\n");
            input += &format!("DF {k:x} {seed:x} {step:x} {dir:x} {ga:x}\n");
            input += &format!("DF {k:x} {seed:x} {step:x} {dir:x} {gb:x}\n");
        }
        input += &format!("X {seed:x} {step:x} {j0:x}\n");
        cases.push((kind, seed, step, dir, j0));
    }
    let out = run(&exe, &input);
    assert_eq!(out.len(), 9 * cases.len());
    for (i, (kind, seed, step, dir, j0)) in cases.iter().enumerate() {
        let id = DirectionId::new(*seed, *step, *dir);
        let sr = DirectionId::new(*seed, *step, hyzo::direction::STOCHASTIC_ROUNDING_DIRECTION);
        let o = &out[9 * i..9 * i + 9];
        for (n, k) in [*kind, 1 - *kind].into_iter().enumerate() {
            let dk = if k == 1 {
                DirectionKind::Rademacher
            } else {
                DirectionKind::Gaussian
            };
            let (exact, fast, fa, fb) = (&o[4 * n], &o[4 * n + 1], &o[4 * n + 2], &o[4 * n + 3]);
            for e in 0..8u64 {
                let j = j0.wrapping_add(e);
                assert_eq!(
                    exact[e as usize] as u32,
                    direction_at(dk, id, j).to_bits(),
                    "{dk:?} exact j0={j0:#x} e={e}"
                );
                let aligned = if j / 8 == j0 / 8 { fa } else { fb };
                assert_eq!(
                    fast[e as usize],
                    aligned[(j % 8) as usize],
                    "{dk:?} fast j0={j0:#x} e={e}"
                );
            }
        }
        for e in 0..8u64 {
            let j = j0.wrapping_add(e);
            assert_eq!(
                o[8][e as usize] as u32,
                sr.block(j / 4)[(j % 4) as usize],
                "rounding word j0={j0:#x} e={e}"
            );
        }
    }
}

fn interesting_floats(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    let mut v = vec![
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.0,
        65520.0,
        65536.0,
        -70000.0,
        6.0e-8,
        5.9e-8,
        2.9e-8,
        1e-40,
        -1e-45,
        3.0e38,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 300.0,
        6.1035e-5,
        6.1e-5,
        3.3895e38,
        3.39e38,
    ];
    for _ in 0..n {
        let x = match rng.gen_range(0..4) {
            0 => f32::from_bits(rng.gen::<u32>() & 0x7F7F_FFFF | (rng.gen::<u32>() & 0x8000_0000)),
            1 => rng.gen_range(-4.0f32..4.0),
            2 => rng.gen_range(-1e-4f32..1e-4),
            _ => rng.gen_range(-70000.0f32..70000.0),
        };
        v.push(x);
    }
    v
}

#[test]
fn rounding_and_conversions_match() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let xs = interesting_floats(&mut rng, 100_000);
    let rs: Vec<u32> = (0..xs.len()).map(|_| rng.gen()).collect();
    let mut input = String::new();
    for (x, r) in xs.iter().zip(&rs) {
        input += &format!("S {:x} {r:x}\nC {:x}\n", x.to_bits(), x.to_bits());
    }
    let out = run(&exe, &input);
    for (i, (x, r)) in xs.iter().zip(&rs).enumerate() {
        let s = &out[2 * i];
        assert_eq!(
            s[0] as u32,
            stochastic_round_bf16(*x, *r).to_bits(),
            "bf16 sr x={x:e} r={r:#x}"
        );
        assert_eq!(
            s[1] as u32,
            stochastic_round_f16(*x, *r).to_bits(),
            "f16 sr x={x:e} r={r:#x}"
        );
        let c = &out[2 * i + 1];
        assert_eq!(c[0] as u16, bf16::from_f32(*x).to_bits(), "bf16 x={x:e}");
        assert_eq!(c[1] as u16, f16::from_f32(*x).to_bits(), "f16 x={x:e}");
        assert_eq!(c[2] as u32, bf16::from_f32(*x).to_f32().to_bits());
        assert_eq!(c[3] as u32, f16::from_f32(*x).to_f32().to_bits());
    }
}

#[test]
fn division_is_ieee() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut pairs = Vec::new();
    let xs = interesting_floats(&mut rng, 300);
    for &a in &xs {
        for &b in xs.iter().step_by(3) {
            pairs.push((a, b));
        }
    }
    for _ in 0..200_000 {
        // Any bit patterns, subnormals included (NaN compared as "is NaN").
        pairs.push((f32::from_bits(rng.gen()), f32::from_bits(rng.gen())));
        // Quotients near the subnormal range and exact midpoints there.
        let b = f32::from_bits(rng.gen_range(0x3F80_0000..0x4080_0000));
        let a = f32::from_bits(rng.gen_range(0..0x0100_0000));
        pairs.push((a, b));
        pairs.push((a * b, b));
    }
    let input: String = pairs
        .iter()
        .map(|(a, b)| format!("V {:x} {:x}\n", a.to_bits(), b.to_bits()))
        .collect();
    let out = run(&exe, &input);
    for ((a, b), o) in pairs.iter().zip(&out) {
        let want = a / b;
        let got = f32::from_bits(o[0] as u32);
        if want.is_nan() {
            assert!(got.is_nan(), "{a:e} / {b:e}: {got:e}");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{a:e} / {b:e}: {got:e} vs {want:e}"
            );
        }
    }
}

/// The kernels redo `1 − β^t` on the device when steps were skipped there (spec v2 §4).
#[test]
fn bias_corrections_match() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut cases: Vec<(f32, u64)> = Vec::new();
    for beta in [
        0.0f32,
        0.5,
        0.9,
        0.95,
        0.99,
        0.999,
        0.9999,
        1.0 - f32::EPSILON,
    ] {
        for t in [1u64, 2, 3, 7, 10, 100, 1000, 123_457, 1 << 31, u64::MAX] {
            cases.push((beta, t));
        }
    }
    for _ in 0..5000 {
        cases.push((rng.gen_range(0.0f32..1.0), rng.gen_range(1..1u64 << 40)));
    }
    let input: String = cases
        .iter()
        .map(|(b, t)| format!("B {:x} {t:x}\n", b.to_bits()))
        .collect();
    let out = run(&exe, &input);
    for ((beta, t), o) in cases.iter().zip(&out) {
        assert_eq!(
            o[0] as u32,
            hyzo::rules::bias_correction(*beta, *t).to_bits(),
            "1 - {beta}^{t}"
        );
    }
}

#[test]
fn rules_match() {
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut input = String::new();
    let mut cases = Vec::new();
    for i in 0..60_000usize {
        let rule = Rule::ALL[i % 6];
        let t = rng.gen_range(1..2000);
        let p = RuleParams::new(
            rule,
            rng.gen_range(0.0..0.1),
            rng.gen_range(0.0..0.999),
            rng.gen_range(0.9..0.99999),
            [1e-8, 1e-6, 1e-3][i % 3],
            if i % 4 == 0 {
                0.0
            } else {
                rng.gen_range(0.0..0.1)
            },
            t,
        );
        let g = if i % 17 == 0 {
            0.0
        } else {
            rng.gen_range(-10.0f32..10.0) * 10f32.powi(rng.gen_range(-6..3))
        };
        let theta = rng.gen_range(-3.0f32..3.0);
        let m = rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-8..1));
        let v = rng.gen_range(0.0f32..1.0) * 10f32.powi(rng.gen_range(-12..1));
        let b = |x: f32| x.to_bits();
        input += &format!(
            "U {:x} {:x} {:x} {:x} {:x} {:x} {:x} {:x} {:x} {:x} {:x} {:x}\n",
            p.rule,
            b(p.lr),
            b(p.beta1),
            b(p.beta2),
            b(p.eps),
            b(p.weight_decay),
            b(p.bias_correction1),
            b(p.bias_correction2),
            b(theta),
            b(g),
            b(m),
            b(v)
        );
        cases.push((p, theta, g, m, v));
    }
    let out = run(&exe, &input);
    for ((p, theta, g, m, v), o) in cases.iter().zip(&out) {
        let (mut m2, mut v2) = (*m, *v);
        let x = apply(p, *theta, *g, &mut m2, &mut v2);
        assert_eq!(
            (o[0] as u32, o[1] as u32, o[2] as u32),
            (x.to_bits(), m2.to_bits(), v2.to_bits()),
            "{:?} theta={theta} g={g} m={m} v={v}",
            p.rule()
        );
    }
}

/// The low-rank entry (spec §7: `A[i] · B[k]` summed in order in f32, each operation
/// rounded, times `f32(1 / sqrt(r))`) equals `LowRankShape::entry` bit for bit, for random
/// factors (Gaussian-like values and a few extreme ones) and ranks 1..8, 64 and 1024.
#[test]
fn lowrank_entries_match() {
    use hyzo::direction::LowRankShape;
    let Some(exe) = driver() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let mut input = String::new();
    let mut cases = Vec::new();
    let ranks: Vec<u64> = (1..=8).chain([64, 1024]).collect();
    for &r in &ranks {
        let n = if r >= 64 { 20 } else { 2000 };
        for _ in 0..n {
            let value = |rng: &mut rand::rngs::StdRng| -> f32 {
                match rng.gen_range(0..40) {
                    0 => {
                        let v = interesting_floats(rng, 8);
                        v[rng.gen_range(0..v.len())]
                    }
                    _ => {
                        let z = DirectionId::new(rng.gen(), rng.gen(), rng.gen_range(0..16));
                        direction_at(DirectionKind::Gaussian, z, rng.gen_range(0..1u64 << 40))
                    }
                }
            };
            let a: Vec<f32> = (0..r).map(|_| value(&mut rng)).collect();
            let b: Vec<f32> = (0..r).map(|_| value(&mut rng)).collect();
            let scale = LowRankShape::new(r, r, r as u32).scale();
            input += &format!("L {r:x} {:x}", scale.to_bits());
            for x in a.iter().chain(&b) {
                input += &format!(" {:x}", x.to_bits());
            }
            input += "\n";
            cases.push((a, b, scale));
        }
    }
    let out = run(&exe, &input);
    assert_eq!(out.len(), cases.len());
    for ((a, b, scale), o) in cases.iter().zip(&out) {
        let want = LowRankShape::entry(a, b, *scale);
        assert_eq!(
            o[0] as u32,
            want.to_bits(),
            "rank {} scale {scale}: {want}",
            a.len()
        );
    }
}
