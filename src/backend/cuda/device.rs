//! The driver, one primary context and one loaded kernel module per device, cached for the
//! process (so NVRTC, when used, compiles once per device).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::{Error, Result};

use super::emulator::Emulator;

/// How a device is driven (the calls themselves: `driver.rs`).
pub(crate) enum Driver {
    /// A GPU: its primary context (shared with PyTorch and anyone else in the process).
    Cuda { ctx: sys::CUcontext },
    /// The host build of the kernels.
    Emulated(Emulator),
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/hyzo_kernels.rs"));
}
pub(crate) use embedded::{ARCHITECTURES, BUILD_REPORT, FATBIN, SOURCE};

/// Turns a driver status into hyzo's error, naming the call.
pub(crate) fn check(status: sys::CUresult, what: &str) -> Result<()> {
    if status == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves null).
    let name = unsafe {
        if sys::cuGetErrorString(status, &mut text) == sys::CUresult::CUDA_SUCCESS
            && !text.is_null()
        {
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        } else {
            format!("{status:?}")
        }
    };
    let msg = format!("{what}: {name} ({status:?})");
    Err(match status {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(msg),
        sys::CUresult::CUDA_ERROR_NO_DEVICE | sys::CUresult::CUDA_ERROR_INVALID_DEVICE => {
            Error::NoDevice(msg)
        }
        _ => Error::Cuda(msg),
    })
}

/// Loads libcuda and initializes the driver once; `Error::NoDevice` without a driver.
pub(crate) fn init_driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), Error>> = OnceLock::new();
    INIT.get_or_init(|| {
        // cudarc panics when it cannot load libcuda: look before touching it.
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        // SAFETY: the library is present.
        check(unsafe { sys::cuInit(0) }, "cuInit").map_err(|e| match e {
            Error::Cuda(m) => Error::NoDevice(m),
            e => e,
        })
    })
    .clone()
}

/// Number of CUDA devices (0 without a driver).
pub(crate) fn device_count() -> i32 {
    if super::emulator::emulator_enabled() {
        return 1;
    }
    if init_driver().is_err() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: the driver is initialized.
    if unsafe { sys::cuDeviceGetCount(&mut n) } != sys::CUresult::CUDA_SUCCESS {
        return 0;
    }
    n
}

/// One kernel of the module and its resident blocks per SM.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub func: sys::CUfunction,
    /// Its entry point's name (what the emulated device launches by).
    pub name: &'static str,
    pub blocks_per_sm: u32,
}

/// The element passes, as named in `kernels/hyzo.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    Perturb,
    RestoreAndUpdate,
    FoUpdate,
    SqNorm,
}

/// Which arithmetic a kernel uses for Gaussian entries (see `kernels/hyzo.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    /// The hardware units, within the spec's tolerance (what users get).
    Fast,
    /// The CPU's f32 algorithm, bit for bit (a test instrument).
    Exact,
}

/// The name of the kernel for a pass: `kind` 0 Gaussian / 1 Rademacher, `rule` the
/// `HYZO_*` number, `nterms` the perturbation's terms (1, 2 or any).
pub(crate) fn kernel_name(
    pass: Pass,
    variant: Variant,
    kind: u32,
    rule: u32,
    nterms: u32,
) -> String {
    let base = match pass {
        Pass::Perturb => "hyzo_perturb",
        Pass::RestoreAndUpdate => "hyzo_restore_and_update",
        Pass::FoUpdate => "hyzo_fo_update",
        Pass::SqNorm => "hyzo_sq_norm",
    };
    if variant == Variant::Exact {
        return format!("{base}_exact");
    }
    match pass {
        Pass::Perturb => {
            let n = match nterms {
                1 => "1".to_string(),
                2 => "2".to_string(),
                _ => "x".to_string(),
            };
            format!("{base}_f_k{kind}_n{n}")
        }
        Pass::RestoreAndUpdate => format!("{base}_f_k{kind}_r{rule}"),
        Pass::FoUpdate => format!("{base}_f_r{rule}"),
        Pass::SqNorm => format!("{base}_f_k{kind}"),
    }
}

/// Every kernel the module defines.
pub(crate) fn kernel_names() -> Vec<String> {
    let mut v = Vec::new();
    for pass in [
        Pass::Perturb,
        Pass::RestoreAndUpdate,
        Pass::FoUpdate,
        Pass::SqNorm,
    ] {
        v.push(kernel_name(pass, Variant::Exact, 0, 0, 0));
        for kind in 0..2 {
            for rule in 0..6 {
                for nterms in 0..3 {
                    let name = kernel_name(pass, Variant::Fast, kind, rule, nterms);
                    if !v.contains(&name) {
                        v.push(name);
                    }
                }
            }
        }
    }
    v.push("hyzo_sq_norm_final".into());
    v.push("hyzo_device_losses".into());
    v.push("hyzo_advance_counters".into());
    v.push(factor_kernel_name(Variant::Exact).into());
    v.push(factor_kernel_name(Variant::Fast).into());
    v
}

/// The low-rank factor kernel of a variant (spec §7).
pub(crate) fn factor_kernel_name(variant: Variant) -> &'static str {
    match variant {
        Variant::Exact => "hyzo_lowrank_factors_exact",
        Variant::Fast => "hyzo_lowrank_factors_f",
    }
}

/// The kernels of the module, by name.
pub(crate) struct Kernels {
    by_name: HashMap<String, Kernel>,
}

impl Kernels {
    /// The kernel called `name` (an internal error if the module lacks it).
    pub fn get(&self, name: &str) -> Result<Kernel> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::Internal(format!("kernel {name} not in the module")))
    }
}

/// A device: its primary context (shared with PyTorch and anyone else in the process),
/// the loaded module, and what launches need to know.
pub(crate) struct Device {
    pub ordinal: i32,
    pub driver: Driver,
    pub kernels: Kernels,
    pub sm_count: u32,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// How the module was obtained ("fatbin" or "nvrtc compute_XY").
    pub module_source: String,
}

// SAFETY: the raw handles are process-wide driver objects, valid from any thread once the
// context is made current (every use does so).
unsafe impl Send for Device {}
// SAFETY: as above; the struct is immutable after creation.
unsafe impl Sync for Device {}

impl Device {
    /// The device with this ordinal, opened on first use.
    /// With the emulator requested (`emulator.rs`), ordinal 0 is the emulated device.
    pub fn get(ordinal: i32) -> Result<Arc<Device>> {
        if super::emulator::emulator_enabled() {
            static EMULATED: OnceLock<Arc<Device>> = OnceLock::new();
            if ordinal != 0 {
                return Err(Error::NoDevice(format!(
                    "CUDA device {ordinal} does not exist (the emulated device is 0)"
                )));
            }
            return Ok(EMULATED.get_or_init(|| Arc::new(Self::emulated())).clone());
        }
        init_driver()?;
        static DEVICES: OnceLock<Mutex<HashMap<i32, Arc<Device>>>> = OnceLock::new();
        let mut map = DEVICES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| Error::Internal("device cache poisoned".into()))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(Self::open(ordinal)?);
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// The emulated device: the host build of the kernels (a test instrument).
    fn emulated() -> Device {
        let by_name = kernel_names()
            .into_iter()
            .map(|n| {
                let name: &'static str = Box::leak(n.clone().into_boxed_str());
                let k = Kernel {
                    func: std::ptr::null_mut(),
                    name,
                    blocks_per_sm: 2,
                };
                (n, k)
            })
            .collect();
        Device {
            ordinal: 0,
            driver: Driver::Emulated(Default::default()),
            kernels: Kernels { by_name },
            // A small persistent grid: every launch has two or more blocks, and a block
            // walks several chunks as soon as a shard has more than four.
            sm_count: 2,
            name: "hyzo host emulator (not a GPU: the kernels' host build, for tests)".into(),
            compute_capability: (0, 0),
            module_source: "host build (kernels/hyzo_host.cpp)".into(),
        }
    }

    fn open(ordinal: i32) -> Result<Device> {
        let count = device_count();
        if ordinal < 0 || ordinal >= count {
            return Err(Error::NoDevice(format!(
                "CUDA device {ordinal} does not exist ({count} devices)"
            )));
        }
        let mut dev = 0;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: plain driver queries on a valid ordinal. The primary context is retained
        // and never released: it lives as long as the process, like PyTorch's.
        unsafe {
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
        }
        let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
            let mut v = 0;
            // SAFETY: valid device and attribute.
            check(
                unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
                "cuDeviceGetAttribute",
            )?;
            Ok(v)
        };
        use sys::CUdevice_attribute::*;
        let cc = (
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let mut name_buf = [0i8; 256];
        // SAFETY: the buffer is 256 bytes.
        let name = unsafe {
            check(
                sys::cuDeviceGetName(name_buf.as_mut_ptr() as _, 256, dev),
                "cuDeviceGetName",
            )?;
            std::ffi::CStr::from_ptr(name_buf.as_ptr() as _)
                .to_string_lossy()
                .into_owned()
        };
        let (module, module_source) = load_module(cc)?;
        let func = |n: &str| -> Result<sys::CUfunction> {
            let mut f = std::ptr::null_mut();
            let c = CString::new(n).unwrap();
            // SAFETY: the module is loaded; the name is NUL-terminated.
            check(
                unsafe { sys::cuModuleGetFunction(&mut f, module, c.as_ptr()) },
                n,
            )?;
            Ok(f)
        };
        let mut by_name = HashMap::new();
        for name in kernel_names() {
            let func = func(&name)?;
            let mut n = 0;
            // SAFETY: valid function; no dynamic shared memory.
            check(
                unsafe {
                    sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        &mut n,
                        func,
                        super::abi::THREADS as i32,
                        0,
                    )
                },
                "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            )?;
            let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
            by_name.insert(
                name,
                Kernel {
                    func,
                    name: leaked,
                    blocks_per_sm: n.max(1) as u32,
                },
            );
        }
        let kernels = Kernels { by_name };
        Ok(Device {
            ordinal,
            driver: Driver::Cuda { ctx },
            kernels,
            sm_count,
            name,
            compute_capability: cc,
            module_source,
        })
    }
}

/// Loads the embedded fatbin, or compiles the embedded source with NVRTC for this device
/// when there is no fatbin or it has no code this device can run.
fn load_module(cc: (i32, i32)) -> Result<(sys::CUmodule, String)> {
    if let Some(fatbin) = FATBIN {
        // cuModuleLoadData needs the image aligned; copy it into an aligned buffer.
        let mut image = vec![0u64; fatbin.len().div_ceil(8)];
        // SAFETY: the destination holds at least fatbin.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                fatbin.as_ptr(),
                image.as_mut_ptr() as *mut u8,
                fatbin.len(),
            )
        };
        let mut module = std::ptr::null_mut();
        // SAFETY: a complete fatbin image produced by nvcc.
        let status = unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr() as *const c_void) };
        if status == sys::CUresult::CUDA_SUCCESS {
            return Ok((module, "fatbin".into()));
        }
        if status != sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU {
            check(status, "cuModuleLoadData (fatbin)")?;
        }
    }
    let arch = format!("compute_{}{}", cc.0, cc.1);
    let ptx = compile_ptx(&arch)?;
    let c = CString::new(ptx).map_err(|_| Error::Internal("NUL in PTX".into()))?;
    let mut module = std::ptr::null_mut();
    // SAFETY: NUL-terminated PTX text.
    check(
        unsafe { sys::cuModuleLoadData(&mut module, c.as_ptr() as *const c_void) },
        "cuModuleLoadData (PTX)",
    )?;
    Ok((module, format!("nvrtc {arch}")))
}

/// Compiles the embedded kernel source to PTX for `arch` (e.g. `compute_90`) with NVRTC,
/// with the options of the nvcc build (no contraction, C++17). Needs libnvrtc, not a GPU.
pub fn compile_ptx(arch: &str) -> Result<String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::NoDevice(
            "NVRTC (libnvrtc) not found: it is needed when hyzo was built without nvcc".into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        name: Some("hyzo.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| Error::Cuda(format!("NVRTC compile of the kernels for {arch}: {e:?}")))?;
    Ok(ptx.to_src())
}
