//! The emulated CUDA device: the host build of the kernels (`kernels/hyzo_host.cpp`, the
//! same `kernels/hyzo.cu` compiled as C++ over a fiber shim) behind the driver calls the
//! backend makes. A TEST INSTRUMENT, so that every line of the CUDA backend's planning and
//! every kernel runs on a machine without a GPU; never a fast path (it runs each CUDA thread
//! as a fiber, one block after another) and never chosen on its own: only
//! [`use_emulator`] or `HYZO_CUDA_EMULATOR=1` in the environment, before the first CUDA
//! call of the process, make ordinal 0 the emulated device (`hyzo info` says so).
//!
//! Semantics kept from the driver: device addresses are host addresses of allocations made
//! here (uninitialized memory is filled with 0xFF bytes, a NaN in every float type, so a
//! read of memory never written shows); a stream executes its work in issue order (here at
//! once, so every stream is synchronous); a capture records the launches and copies issued
//! on the capturing stream WITHOUT running them, and launching the graph replays them; a
//! synchronization inside a capture is an error, as in CUDA's global capture mode.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

extern "C" {
    fn hyzo_host_launch(name: *const c_char, grid: u32, threads: u32, params: *const c_void)
        -> i32;
    fn hyzo_host_param_bytes(name: *const c_char) -> usize;
    fn hyzo_host_kernel_count() -> usize;
    fn hyzo_host_kernel_name(i: usize) -> *const c_char;
}

static REQUESTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static EXTRA_BLOCKS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs every one-block launch issued from this thread with `n` more blocks (0: as
/// planned). A test of the kernels' own grid guards: a one-block kernel must give the same
/// result however many blocks it is launched with, as the element passes do by design.
#[doc(hidden)]
pub fn emulator_set_extra_blocks(n: u32) {
    EXTRA_BLOCKS.with(|c| c.set(n));
}

/// Makes CUDA device 0 the emulated device for the rest of the process (tests without a
/// GPU). Call it before anything opens a CUDA device.
pub fn use_emulator() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether the emulated device stands in for CUDA device 0 (`use_emulator` or
/// `HYZO_CUDA_EMULATOR=1`).
pub fn emulator_enabled() -> bool {
    REQUESTED.load(Ordering::SeqCst)
        || std::env::var_os("HYZO_CUDA_EMULATOR").is_some_and(|v| v != "0" && !v.is_empty())
}

/// Every kernel entry point of the host build, by name.
pub fn emulator_kernels() -> Vec<String> {
    // SAFETY: plain queries of a static table of NUL-terminated names.
    unsafe {
        (0..hyzo_host_kernel_count())
            .map(|i| {
                CStr::from_ptr(hyzo_host_kernel_name(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

fn executed() -> &'static Mutex<BTreeSet<String>> {
    static EXECUTED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    EXECUTED.get_or_init(Default::default)
}

/// The kernels the emulated device has executed in this process (the coverage record).
pub fn emulator_executed_kernels() -> Vec<String> {
    executed()
        .lock()
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default()
}

/// Appends a kernel's first execution in this process to the file named by
/// `HYZO_EMULATOR_COVERAGE` (make test collects it over the test binaries;
/// tests/kernel_coverage.rs fails if a kernel the backend can launch is missing).
fn record_coverage(name: &str) {
    use std::io::Write;
    if let Some(path) = std::env::var_os("HYZO_EMULATOR_COVERAGE") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One short line per write: appends from parallel processes stay whole lines.
            let _ = f.write_all(format!("{name}\n").as_bytes());
        }
    }
}

/// One piece of work recorded by a capture.
enum Op {
    Launch {
        name: &'static str,
        grid: u32,
        params: Vec<u8>,
    },
    Copy {
        dst: u64,
        src: u64,
        bytes: usize,
    },
    /// A host-to-device copy from pageable memory: the driver stages the source when the
    /// copy is issued, so a captured one replays the bytes of that moment.
    Upload {
        dst: u64,
        data: Vec<u8>,
    },
    Memset {
        dst: u64,
        byte: u8,
        bytes: usize,
    },
}

#[derive(Default)]
struct State {
    /// Live allocations: address -> layout.
    allocations: HashMap<u64, std::alloc::Layout>,
    next_stream: u64,
    /// Streams being captured, with what they recorded.
    capturing: HashMap<u64, Vec<Op>>,
    graphs: HashMap<u64, Vec<Op>>,
    next_graph: u64,
}

/// The emulated device's driver.
#[derive(Default)]
pub(crate) struct Emulator {
    state: Mutex<State>,
}

impl Emulator {
    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("emulator state poisoned".into()))
    }

    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| Error::Internal(format!("emulator alloc: {e}")))?;
        // SAFETY: a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::OutOfMemory(format!(
                "emulated device: {bytes} bytes"
            )));
        }
        // SAFETY: freshly allocated, `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(p, 0xFF, layout.size()) };
        self.state()?.allocations.insert(p as u64, layout);
        Ok(p as u64)
    }

    pub fn free(&self, ptr: u64) {
        if let Ok(mut s) = self.state() {
            if let Some(layout) = s.allocations.remove(&ptr) {
                // SAFETY: allocated by `alloc` with this layout, freed once.
                unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
            }
        }
    }

    /// Runs `op` now, or records it when `stream` is capturing.
    fn issue(&self, stream: Option<u64>, op: Op) -> Result<()> {
        {
            let mut s = self.state()?;
            if let Some(rec) = stream.and_then(|st| s.capturing.get_mut(&st)) {
                rec.push(op);
                return Ok(());
            }
        }
        run(&op)
    }

    /// Copies `bytes` from address `src` to address `dst` (host or emulated device memory:
    /// they are the same address space); on `stream` (None: a synchronous copy).
    pub fn copy(&self, dst: u64, src: u64, bytes: usize, stream: Option<u64>) -> Result<()> {
        if stream.is_none() {
            self.refuse_if_capturing()?;
        }
        self.issue(stream, Op::Copy { dst, src, bytes })
    }

    /// Host to device: as [`Emulator::copy`], the source read when the copy is issued.
    ///
    /// # Safety
    /// `src` is valid for `bytes` bytes.
    pub unsafe fn upload(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        stream: Option<u64>,
    ) -> Result<()> {
        if stream.is_none() {
            self.refuse_if_capturing()?;
        }
        let data = std::slice::from_raw_parts(src as *const u8, bytes).to_vec();
        self.issue(stream, Op::Upload { dst, data })
    }

    pub fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.refuse_if_capturing()?;
        self.issue(None, Op::Memset { dst, byte, bytes })
    }

    /// A synchronous operation while a capture is open: CUDA's global capture mode fails it.
    fn refuse_if_capturing(&self) -> Result<()> {
        if !self.state()?.capturing.is_empty() {
            return Err(Error::Cuda(
                "emulated device: a synchronous operation during a stream capture \
                 (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn launch(&self, name: &'static str, grid: u32, params: &[u8], stream: u64) -> Result<()> {
        let c = CString::new(name).map_err(|e| Error::Internal(e.to_string()))?;
        // SAFETY: a NUL-terminated name.
        let want = unsafe { hyzo_host_param_bytes(c.as_ptr()) };
        if want == 0 {
            return Err(Error::Internal(format!(
                "kernel {name} not in the host build"
            )));
        }
        if want != params.len() {
            return Err(Error::Internal(format!(
                "kernel {name}: {} parameter bytes, the host build takes {want}",
                params.len()
            )));
        }
        self.issue(
            Some(stream),
            Op::Launch {
                name,
                grid,
                params: params.to_vec(),
            },
        )
    }

    pub fn stream_create(&self) -> Result<u64> {
        let mut s = self.state()?;
        s.next_stream += 1;
        // Distinct non-zero handles, far from any real pointer a caller might pass.
        Ok(0xE3E0_0000_0000 + s.next_stream)
    }

    pub fn stream_sync(&self, stream: u64) -> Result<()> {
        if self.state()?.capturing.contains_key(&stream) {
            return Err(Error::Cuda(
                "emulated device: cuStreamSynchronize on a capturing stream".into(),
            ));
        }
        Ok(())
    }

    pub fn begin_capture(&self, stream: u64) -> Result<()> {
        let mut s = self.state()?;
        if s.capturing.contains_key(&stream) {
            return Err(Error::Cuda(
                "emulated device: the stream is already capturing".into(),
            ));
        }
        s.capturing.insert(stream, Vec::new());
        Ok(())
    }

    /// Ends the capture; returns the graph's handle.
    pub fn end_capture(&self, stream: u64) -> Result<u64> {
        let mut s = self.state()?;
        let ops = s
            .capturing
            .remove(&stream)
            .ok_or_else(|| Error::Cuda("emulated device: the stream is not capturing".into()))?;
        s.next_graph += 1;
        let id = s.next_graph;
        s.graphs.insert(id, ops);
        Ok(id)
    }

    /// Replays a graph's work, in its order (on `stream`: nested in a capture, recorded).
    pub fn graph_launch(&self, graph: u64, stream: u64) -> Result<()> {
        let ops: Vec<Op> = {
            let s = self.state()?;
            let g = s
                .graphs
                .get(&graph)
                .ok_or_else(|| Error::Cuda("emulated device: no such graph".into()))?;
            g.iter().map(Op::clone_op).collect()
        };
        for op in ops {
            self.issue(Some(stream), op)?;
        }
        Ok(())
    }

    pub fn graph_destroy(&self, graph: u64) {
        if let Ok(mut s) = self.state() {
            s.graphs.remove(&graph);
        }
    }
}

impl Op {
    fn clone_op(&self) -> Op {
        match self {
            Op::Launch { name, grid, params } => Op::Launch {
                name,
                grid: *grid,
                params: params.clone(),
            },
            Op::Copy { dst, src, bytes } => Op::Copy {
                dst: *dst,
                src: *src,
                bytes: *bytes,
            },
            Op::Upload { dst, data } => Op::Upload {
                dst: *dst,
                data: data.clone(),
            },
            Op::Memset { dst, byte, bytes } => Op::Memset {
                dst: *dst,
                byte: *byte,
                bytes: *bytes,
            },
        }
    }
}

fn run(op: &Op) -> Result<()> {
    match op {
        Op::Launch { name, grid, params } => {
            let c = CString::new(*name).map_err(|e| Error::Internal(e.to_string()))?;
            let grid = if *grid == 1 {
                1 + EXTRA_BLOCKS.with(|c| c.get())
            } else {
                *grid
            };
            // SAFETY: the parameter bytes have the kernel's struct size (checked at issue);
            // every address in them is one the backend got from this emulator or a caller.
            let rc = unsafe {
                hyzo_host_launch(
                    c.as_ptr(),
                    grid,
                    super::abi::THREADS,
                    params.as_ptr() as *const c_void,
                )
            };
            if rc != 0 {
                return Err(Error::Internal(format!(
                    "emulated launch of {name} (grid {grid}) failed: {rc}"
                )));
            }
            if let Ok(mut e) = executed().lock() {
                if e.insert(name.to_string()) {
                    record_coverage(name);
                }
            }
            Ok(())
        }
        Op::Copy { dst, src, bytes } => {
            // SAFETY: both ranges are the caller's (bounds checked by the backend); the
            // backend never copies between overlapping ranges.
            unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
            Ok(())
        }
        Op::Upload { dst, data } => {
            // SAFETY: as for copies.
            unsafe { std::ptr::copy(data.as_ptr(), *dst as *mut u8, data.len()) };
            Ok(())
        }
        Op::Memset { dst, byte, bytes } => {
            // SAFETY: as for copies.
            unsafe { std::ptr::write_bytes(*dst as *mut u8, *byte, *bytes) };
            Ok(())
        }
    }
}
