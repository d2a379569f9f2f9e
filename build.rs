//! Builds the CUDA kernels (feature `cuda`).
//!
//! With nvcc (from `NVCC`, else `CUDA_PATH` / `CUDA_HOME` `/bin/nvcc`, else `PATH`):
//! `kernels/hyzo.cu` becomes ONE fatbin with SASS for sm_80, sm_86, sm_89, sm_90 and
//! compute_90 PTX (newer GPUs JIT it), compiled with warnings as errors; ptxas' resource
//! report is kept for `hyzo info`, and any spill or local-memory use fails the build (a
//! spill in these memory-bound kernels is a performance bug). Without nvcc (or with
//! `HYZO_NO_NVCC=1`): a warning, and the kernels reach run time as source only, compiled
//! with NVRTC on first use. The flattened source (headers inlined) is embedded either way.
//!
//! Output: `$OUT_DIR/hyzo_kernels.rs`, included by `src/backend/cuda/module.rs`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// SASS targets, then the PTX target, as `-gencode` values.
const ARCHS: [(&str, &str); 5] = [
    ("compute_80", "sm_80"),
    ("compute_86", "sm_86"),
    ("compute_89", "sm_89"),
    ("compute_90", "sm_90"),
    ("compute_90", "compute_90"),
];

/// Flags shared with `scripts/check-kernels` (keep them in step).
const NVCC_FLAGS: [&str; 6] = [
    "-std=c++17",
    "--fmad=false",
    "-Werror",
    "all-warnings",
    "-Xptxas",
    "-v,-warn-spills,-warn-lmem-usage,-Werror",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_PATH", "CUDA_HOME", "HYZO_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    build_host_kernels();
    let source = flatten(Path::new("kernels/hyzo.cu"));
    fs::write(out.join("hyzo_flat.cu"), &source).expect("write flattened source");

    let (fatbin, report, archs) = match find_nvcc() {
        Some(nvcc) if env::var_os("HYZO_NO_NVCC").is_none() => {
            let (report, nvcc_version) = compile(&nvcc, &out);
            let archs: Vec<String> = ARCHS.iter().map(|(_, c)| c.to_string()).collect();
            let report = format!("{nvcc_version}\n{}", summarize(&report));
            (true, report, archs)
        }
        _ => {
            println!(
                "cargo:warning=hyzo: nvcc not found (NVCC, CUDA_PATH, CUDA_HOME, PATH): the CUDA \
                 kernels will be compiled with NVRTC at first use"
            );
            (
                false,
                "no fatbin: built without nvcc; kernels are compiled with NVRTC at run time"
                    .to_string(),
                vec![],
            )
        }
    };
    let fatbin_expr = if fatbin {
        "Some(include_bytes!(concat!(env!(\"OUT_DIR\"), \"/hyzo.fatbin\")))"
    } else {
        "None"
    };
    let generated = format!(
        "/// The fatbin built by nvcc, when nvcc was found.\n\
         pub const FATBIN: Option<&[u8]> = {fatbin_expr};\n\
         /// The kernels' source with its headers inlined, for NVRTC.\n\
         pub const SOURCE: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/hyzo_flat.cu\"));\n\
         /// ptxas' register / spill report per kernel and architecture.\n\
         pub const BUILD_REPORT: &str = {report:?};\n\
         /// Architectures in the fatbin (`sm_*` SASS, `compute_*` PTX).\n\
         pub const ARCHITECTURES: &[&str] = &{archs:?};\n"
    );
    fs::write(out.join("hyzo_kernels.rs"), generated).expect("write hyzo_kernels.rs");
}

/// `kernels/hyzo.cu` with every `#include "local.h"` replaced by that file (once each), so
/// NVRTC needs no include path.
fn flatten(path: &Path) -> String {
    fn go(path: &Path, seen: &mut Vec<PathBuf>, out: &mut String) {
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        for line in text.lines() {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("#include \"") {
                let name = rest.split('"').next().unwrap();
                let inc = path.parent().unwrap().join(name);
                if !seen.contains(&inc) {
                    seen.push(inc.clone());
                    go(&inc, seen, out);
                }
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    let mut out = String::new();
    go(path, &mut Vec::new(), &mut out);
    out
}

/// The host build of the kernels (`kernels/hyzo_host.cpp`: `hyzo.cu` as C++ over a shim),
/// linked into the crate for the CUDA backend's emulated device. Always built, so a
/// machine without a GPU runs every kernel. `HYZO_HOST_KERNELS_ASAN=1` builds it with
/// AddressSanitizer (scripts/test-emulator-asan; the test binary must then link the ASan
/// runtime, which that script arranges).
fn build_host_kernels() {
    println!("cargo:rerun-if-env-changed=HYZO_HOST_KERNELS_ASAN");
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("kernels/hyzo_host.cpp")
        .include("kernels")
        .std("c++17")
        .opt_level(2)
        .flag("-fno-strict-aliasing")
        // The kernels' arithmetic is correctly rounded operation by operation: no FMA.
        .flag("-ffp-contract=off")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings(true);
    if env::var_os("HYZO_HOST_KERNELS_ASAN").is_some_and(|v| v != "0") {
        b.flag("-fsanitize=address").flag("-fno-omit-frame-pointer");
    }
    b.compile("hyzo_host_kernels");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    })
}

/// Runs nvcc; returns ptxas' report and nvcc's version line. Panics (fails the build) on
/// any error, warning or spill.
fn compile(nvcc: &Path, out: &Path) -> (String, String) {
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin").args(NVCC_FLAGS);
    for (virt, real) in ARCHS {
        cmd.arg(format!("-gencode=arch={virt},code={real}"));
    }
    cmd.arg("-o")
        .arg(out.join("hyzo.fatbin"))
        .arg("kernels/hyzo.cu");
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "hyzo: running {}: {e} (set HYZO_NO_NVCC=1 to use NVRTC)",
            nvcc.display()
        )
    });
    let report = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    fs::write(out.join("ptxas_report.txt"), &report).ok();
    let spilled = report.lines().any(|l| {
        (l.contains("bytes spill stores") && !l.contains(" 0 bytes spill stores"))
            || (l.contains("bytes stack frame") && !l.contains(" 0 bytes stack frame"))
    });
    if !output.status.success() || spilled {
        panic!(
            "hyzo: nvcc failed on kernels/hyzo.cu ({}){}:\n{report}",
            output.status,
            if spilled { ", registers spilled" } else { "" }
        );
    }
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.contains("release"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "nvcc (version unknown)".into());
    (report, version)
}

/// One line per kernel and architecture: registers, stack, spills, shared memory.
fn summarize(report: &str) -> String {
    let mut rows = Vec::new();
    let mut current = String::new();
    let mut props = String::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut it = rest.split('\'');
            let name = it.next().unwrap_or("");
            let arch = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("");
            current = format!("{arch:<7} {name:<26}");
        } else if line.contains("bytes stack frame") {
            props = line.trim().to_string();
        } else if let Some(rest) = line.split("Used ").nth(1) {
            if !current.is_empty() {
                rows.push(format!("{current} {} | {props}", rest.trim()));
                current.clear();
            }
        }
    }
    rows.join("\n")
}
