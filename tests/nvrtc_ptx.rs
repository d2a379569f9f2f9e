//! The NVRTC path: the kernel source embedded in the library (headers inlined, as build.rs
//! embeds it) compiles to PTX with libnvrtc, for the oldest and the newest architecture
//! hyzo targets. Needs libnvrtc (e.g. the pinned wheel via `scripts/cuda-env`), not a GPU;
//! without it the test says it was skipped, unless `HYZO_REQUIRE_NVRTC=1` (set by
//! `scripts/check-kernels`) makes that a failure.
#![cfg(feature = "cuda")]

use hyzo::backend::cuda::{compile_ptx, kernel_source};

const KERNELS: [&str; 6] = [
    "hyzo_perturb",
    "hyzo_restore_and_update",
    "hyzo_fo_update",
    "hyzo_sq_norm",
    "hyzo_sq_norm_final",
    "hyzo_device_losses",
];

#[test]
fn embedded_source_compiles_to_ptx_with_nvrtc() {
    assert!(
        !kernel_source().contains("#include \""),
        "the embedded source must be flat"
    );
    for arch in ["compute_80", "compute_90"] {
        let ptx = match compile_ptx(arch) {
            Ok(p) => p,
            Err(hyzo::Error::NoDevice(msg)) if std::env::var_os("HYZO_REQUIRE_NVRTC").is_none() => {
                println!("skipped: {msg}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        for k in KERNELS {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{arch}: no entry {k}"
            );
        }
        assert!(!ptx.contains(".local"), "{arch}: the PTX uses local memory");
        println!(
            "NVRTC {arch}: {} bytes of PTX, {} kernels",
            ptx.len(),
            KERNELS.len()
        );
    }
}
