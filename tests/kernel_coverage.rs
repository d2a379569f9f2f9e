//! Every kernel entry point the CUDA backend can launch has executed: the emulated device
//! (src/backend/cuda/emulator.rs) appends each kernel's first execution in a process to the
//! file `HYZO_EMULATOR_COVERAGE` names, and `make test` runs the emulated test binaries
//! (gpu_parity, ffi_cuda, device_counters) with it before this one. Without the variable
//! (a plain `cargo test`) there is nothing to check and the test says so.
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;

#[test]
fn every_launched_kernel_was_executed() {
    let Some(path) = std::env::var_os("HYZO_EMULATOR_COVERAGE") else {
        println!("HYZO_EMULATOR_COVERAGE not set: no coverage to check (make test sets it)");
        return;
    };
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.to_string_lossy()));
    let executed: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // The backend's own list of what it launches (device.rs), which the host build must
    // define too.
    let shipped = hyzo::backend::cuda::kernel_names();
    let host: BTreeSet<String> = hyzo::backend::cuda::emulator_kernels()
        .into_iter()
        .collect();
    for k in &shipped {
        assert!(
            host.contains(k),
            "kernel {k} is missing from the host build"
        );
    }
    println!(
        "kernels executed on the emulated device ({}):",
        executed.len()
    );
    for k in &executed {
        println!("  {k}");
    }
    let missing: Vec<&String> = shipped
        .iter()
        .filter(|k| !executed.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} kernels the backend launches never executed: {missing:?}",
        missing.len(),
        shipped.len()
    );
}
