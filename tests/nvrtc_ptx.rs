//! The NVRTC path: the kernel source embedded in the library (headers inlined, as build.rs
//! embeds it) compiles to PTX with libnvrtc, for the oldest and the newest architecture
//! hyzo targets. Needs libnvrtc (e.g. the pinned wheel via `scripts/cuda-env`), not a GPU;
//! without it the test says it was skipped, unless `HYZO_REQUIRE_NVRTC=1` (set by
//! `scripts/check-kernels`) makes that a failure.
#![cfg(feature = "cuda")]

use hyzo::backend::cuda::{compile_ptx, kernel_names, kernel_source};

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
        let kernels = kernel_names();
        for k in &kernels {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{arch}: no entry {k}"
            );
        }
        assert!(!ptx.contains(".local"), "{arch}: the PTX uses local memory");
        // The same code as the nvcc build: IEEE division (div.rn, not the f64 emulation),
        // the fast Gaussian's approximate instructions and the packed bf16 rounding.
        for needle in [
            "div.rn.f32",
            "lg2.approx.ftz.f32",
            "sqrt.approx.ftz.f32",
            "sin.approx.ftz.f32",
            "cos.approx.ftz.f32",
            "cvt.rn.bf16x2.f32",
        ] {
            assert!(ptx.contains(needle), "{arch}: no {needle} in the PTX");
        }
        assert!(
            !ptx.contains("rcp.approx.ftz.f64"),
            "{arch}: f64 division left"
        );
        println!(
            "NVRTC {arch}: {} bytes of PTX, {} kernels",
            ptx.len(),
            kernels.len()
        );
    }
}
