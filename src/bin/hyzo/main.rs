//! `hyzo`: cross-check directions against the spec, and describe this build.

use std::io::Write;
use std::process::ExitCode;

use hyzo::direction::{fill, DirectionId, DirectionKind};

mod bench;

const USAGE: &str = "\
usage:
  hyzo directions --kind gaussian|rademacher --seed S --step T --direction D --start J --count N
      prints entries J..J+N of direction (S, T, D), one per line (Gaussian: 9 significant digits)
  hyzo info
      prints the version, the backends available and the kernel architectures embedded
  hyzo bench [--elements N] [--reps R]
      prints a quick throughput table of the passes on this machine";

/// Dies quietly on a closed pipe (`hyzo directions ... | head`), as command-line tools do,
/// instead of panicking in `println!`.
#[cfg(unix)]
fn default_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: restores the default disposition of one signal; no handler code runs.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn default_sigpipe() {}

fn main() -> ExitCode {
    default_sigpipe();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("directions") => directions(&args[1..]),
        Some("info") => info(),
        Some("bench") => bench::run(&args[1..]),
        Some("-h") | Some("--help") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("expected a command\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyzo: {e}");
            ExitCode::from(2)
        }
    }
}

/// `%.9g`: 9 significant digits, fixed or scientific by the exponent, trailing zeros cut.
fn format_9g(v: f32) -> String {
    let v = v as f64;
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let sci = format!("{v:.8e}");
    let (mantissa, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (-5..9).contains(&exp) {
        trim(format!("{v:.*}", (8 - exp) as usize))
    } else {
        format!(
            "{}e{}{:02}",
            trim(mantissa.to_string()),
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

fn directions(args: &[String]) -> Result<(), String> {
    let mut kind = None;
    let (mut seed, mut step, mut direction, mut start, mut count) = (None, None, None, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag}: missing value"))?
            .as_str();
        let num = |v: &str| -> Result<u64, String> {
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.map_err(|_| format!("{flag}: not an unsigned integer: {v}"))
        };
        let small = |v: &str| -> Result<u32, String> {
            u32::try_from(num(v)?).map_err(|_| format!("{flag}: {v} does not fit in 32 bits"))
        };
        match flag.as_str() {
            "--kind" => {
                kind = Some(match DirectionKind::parse(value) {
                    Some(DirectionKind::Sphere) => {
                        return Err(
                            "--kind: a sphere direction depends on the whole model's norm; \
                                    print its Gaussian with --kind gaussian"
                                .into(),
                        )
                    }
                    Some(k) => k,
                    None => return Err(format!("--kind: gaussian or rademacher, got {value}")),
                })
            }
            "--seed" => seed = Some(num(value)?),
            "--step" => step = Some(small(value)?),
            "--direction" => direction = Some(small(value)?),
            "--start" => start = Some(num(value)?),
            "--count" => count = Some(num(value)?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    let need = |name: &str| format!("--{name} is required\n{USAGE}");
    let kind = kind.ok_or_else(|| need("kind"))?;
    let id = DirectionId::new(
        seed.ok_or_else(|| need("seed"))?,
        step.ok_or_else(|| need("step"))?,
        direction.ok_or_else(|| need("direction"))?,
    );
    let start = start.unwrap_or(0);
    let count = count.ok_or_else(|| need("count"))?;
    if start.checked_add(count).is_none() {
        return Err(format!("--start {start} + --count {count} overflows u64"));
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut buf = vec![0f32; 1 << 16];
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(buf.len() as u64) as usize;
        fill(kind, id, start + done, &mut buf[..n]);
        for v in &buf[..n] {
            let line = match kind {
                DirectionKind::Rademacher => format!("{}", *v as i32),
                _ => format_9g(*v),
            };
            if writeln!(out, "{line}").is_err() {
                return Ok(()); // closed pipe: the reader has what it wanted
            }
        }
        done += n as u64;
    }
    out.flush().ok();
    Ok(())
}

fn info() -> Result<(), String> {
    println!("hyzo {}", hyzo::VERSION);
    println!("spec: perturbation spec version 1 (Philox4x32-10)");
    println!(
        "backend cpu: available, {} threads",
        rayon::current_num_threads()
    );
    hyzo_cuda_info();
    Ok(())
}

#[cfg(feature = "cuda")]
fn hyzo_cuda_info() {
    hyzo::backend::cuda::print_info();
}

#[cfg(not(feature = "cuda"))]
fn hyzo_cuda_info() {
    println!("backend cuda: not compiled (feature `cuda` off)");
}

#[cfg(test)]
mod tests {
    use super::format_9g;

    #[test]
    fn nine_significant_digits() {
        assert_eq!(format_9g(1.0), "1");
        assert_eq!(format_9g(-0.123_456_79), "-0.123456791");
        assert_eq!(format_9g(1.5e-7), "1.50000005e-07");
        assert_eq!(format_9g(2.25), "2.25");
    }
}
