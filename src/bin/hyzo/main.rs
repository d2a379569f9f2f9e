//! `hyzo`: cross-check directions against the spec, and describe this build.
//!
//! Exit status: 0 on success, 2 for a usage error (a bad flag or value: clap's convention),
//! 1 when a valid request fails (a buffer that cannot be allocated, a backend error).

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use hyzo::direction::{DirectionId, DirectionKind};
use hyzo::fill::fill;

mod bench;

/// Most entries one `hyzo directions` prints: 2^32, about 50 GB of text. The output is
/// streamed through a fixed buffer, so this bounds the run time of a mistyped count (hours
/// for an extra digit or two), not memory.
const MAX_COUNT: u64 = 1 << 32;

/// Most worker threads any thread pool of this process may have (bench's `--threads`, and
/// rayon's global pool through `RAYON_NUM_THREADS`). Each is an OS thread with its own
/// stack; beyond a few per core they only add contention, and a count like 2^32 − 1 would
/// spend minutes spawning threads before failing.
const MAX_THREADS: u16 = 1024;

#[derive(Parser)]
#[command(
    name = "hyzo",
    version,
    about = "Cross-check hyzo's perturbation directions against the spec, and describe this build",
    after_help = "Exit status: 0 on success, 2 for a usage error, 1 when a valid request fails."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print entries J..J+N of direction (S, T, D), one per line (Gaussian: 9 significant digits)
    Directions(DirectionsArgs),
    /// Print the version, the backends available and the kernel architectures embedded
    Info,
    /// Print a quick throughput table of the passes on this machine (CPU backend)
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct DirectionsArgs {
    /// Distribution of the entries. A sphere direction depends on the whole model's norm:
    /// print its Gaussian instead
    #[arg(long, value_name = "gaussian|rademacher", value_parser = parse_kind)]
    kind: DirectionKind,
    /// Seed S (decimal, or hex with 0x; 64 bits)
    #[arg(long, value_name = "S", value_parser = parse_u64)]
    seed: u64,
    /// Optimizer step T (decimal, or hex with 0x; 32 bits)
    #[arg(long, value_name = "T", value_parser = parse_u32)]
    step: u32,
    /// Direction index D within the step (decimal, or hex with 0x; 32 bits)
    #[arg(long, value_name = "D", value_parser = parse_u32)]
    direction: u32,
    /// Global index J of the first entry (decimal, or hex with 0x; 64 bits)
    #[arg(long, value_name = "J", default_value = "0", value_parser = parse_u64)]
    start: u64,
    /// Number of entries N, 0..=4294967296 (2^32)
    #[arg(long, value_name = "N", value_parser = parse_count)]
    count: u64,
}

/// A usage error found after parsing, formatted like clap's own, with the usage line of
/// `subcommand` (or of `hyzo` itself when it is `None`).
fn usage_error(
    subcommand: Option<&str>,
    kind: ErrorKind,
    message: impl std::fmt::Display,
) -> clap::Error {
    let mut command = Cli::command();
    // Building gives each subcommand its full name (`hyzo bench`) for the usage line.
    command.build();
    match subcommand.and_then(|name| command.find_subcommand_mut(name)) {
        Some(sub) => sub.error(kind, message),
        None => command.error(kind, message),
    }
}

fn parse_kind(s: &str) -> Result<DirectionKind, String> {
    match DirectionKind::parse(s) {
        Some(DirectionKind::Sphere) => Err("a sphere direction depends on the whole model's \
                                            norm; print its Gaussian with --kind gaussian"
            .into()),
        Some(DirectionKind::LowRank) => Err("a low-rank direction depends on a tensor's shape;                                              its factors are Gaussian streams 0x80000000 + d                                              and 0xC0000000 + d (spec §7): print those with                                              --kind gaussian"
            .into()),
        Some(kind) => Ok(kind),
        None => Err("expected gaussian or rademacher".into()),
    }
}

/// An unsigned integer, decimal or `0x` hex (seeds are often written in hex).
fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| "not an unsigned integer (decimal, or hex with 0x)".into())
}

fn parse_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_u64(s)?).map_err(|_| "does not fit in 32 bits".into())
}

fn parse_count(s: &str) -> Result<u64, String> {
    let count = parse_u64(s)?;
    if count > MAX_COUNT {
        return Err(format!("at most {MAX_COUNT} (2^32) entries per run"));
    }
    Ok(count)
}

/// Dies quietly on a closed pipe (`hyzo directions ... | head`), as command-line tools do,
/// instead of panicking in `println!` (Rust starts programs with SIGPIPE ignored).
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: restores the default disposition of one signal; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn default_sigpipe() {}

/// Rejects a `RAYON_NUM_THREADS` above [`MAX_THREADS`] before anything starts rayon's global
/// pool (`hyzo info` counts its threads), which would otherwise try to spawn them all.
fn check_rayon_num_threads() -> Result<(), clap::Error> {
    let Some(value) = std::env::var_os("RAYON_NUM_THREADS") else {
        return Ok(());
    };
    // Rayon ignores a value that is not a number; so do we.
    match value.to_str().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(n) if n > u64::from(MAX_THREADS) => Err(usage_error(
            None,
            ErrorKind::ValueValidation,
            format!("RAYON_NUM_THREADS={n}: at most {MAX_THREADS} threads"),
        )),
        _ => Ok(()),
    }
}

/// Prints a clap error as `hyzo: <message>` (the prefix every message of this tool has) and
/// gives its exit status. Help and version are printed as clap prints them: to stdout with
/// status 0 when asked for, to stderr with status 2 for a bare `hyzo`.
fn report_clap_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // A failed print (closed stdout) has nothing better to report to.
            e.print().ok();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            let text = e.render().to_string();
            eprint!("hyzo: {}", text.strip_prefix("error: ").unwrap_or(&text));
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    let cli = match Cli::try_parse().and_then(|cli| check_rayon_num_threads().map(|()| cli)) {
        Ok(cli) => cli,
        Err(e) => return report_clap_error(e),
    };
    let result = match cli.command {
        Command::Directions(args) => directions(&args).map_err(report_clap_error),
        Command::Info => {
            info();
            Ok(())
        }
        Command::Bench(args) => bench::run(&args).map_err(|e| match e {
            bench::Error::Usage(e) => report_clap_error(e),
            bench::Error::Failed(message) => {
                eprintln!("hyzo: {message}");
                ExitCode::FAILURE
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
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

fn directions(args: &DirectionsArgs) -> Result<(), clap::Error> {
    let &DirectionsArgs {
        kind,
        seed,
        step,
        direction,
        start,
        count,
    } = args;
    if start.checked_add(count).is_none() {
        return Err(usage_error(
            Some("directions"),
            ErrorKind::ArgumentConflict,
            format!("--start {start} + --count {count} overflows u64"),
        ));
    }
    let id = DirectionId::new(seed, step, direction);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // A fixed buffer whatever the count: the output is streamed.
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

fn info() {
    println!("hyzo {}", hyzo::VERSION);
    println!("spec: perturbation spec version 2 (Philox4x32-10)");
    println!(
        "backend cpu: available, {} threads",
        rayon::current_num_threads()
    );
    hyzo_cuda_info();
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
    use super::{format_9g, Cli};
    use clap::CommandFactory;

    #[test]
    fn nine_significant_digits() {
        assert_eq!(format_9g(1.0), "1");
        assert_eq!(format_9g(-0.123_456_79), "-0.123456791");
        assert_eq!(format_9g(1.5e-7), "1.50000005e-07");
        assert_eq!(format_9g(2.25), "2.25");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
