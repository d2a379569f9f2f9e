//! The CUDA backend: the kernels of `kernels/hyzo.cu` driven through the driver API
//! (cudarc, loaded at run time, so the crate builds and runs without CUDA).
//!
//! - Memory: tensors of a shard with [`Location::Cuda`] are device addresses owned by the
//!   caller (never freed here); the optimizer state (`m`, `v`, `lo`) and a little scratch
//!   are owned by the backend. [`CudaBuffer`] is an owned device allocation for callers
//!   without a framework of their own (tests, benchmarks, the C API).
//! - Context and stream: the device's primary context (the one PyTorch uses, so pointers
//!   are shared), and either a stream of the backend's own or the caller's
//!   ([`CudaBackend::set_stream`]).
//! - One launch per pass: the shard's tensors sit in a device-side table, uploaded once by
//!   `allocate_state`; a pass only launches a kernel with a parameter struct.
//! - Sync-free steps: with [`DeviceQueue::record_device_loss`] the loss is copied on the stream
//!   into a device array; the update pass first runs `hyzo_device_losses` (projected
//!   gradients, finiteness, skip counter, all on the device). Nothing in `begin` / `feed` /
//!   update allocates, synchronizes or reads device memory from the host (for `q` up to
//!   8 terms, which travel in the launch parameters), so the whole step can be captured in
//!   a CUDA graph ([`CudaBackend::begin_capture`]).
//! - Graphs that replay across steps: in the device-counter mode
//!   ([`CudaBackend::set_device_counters`]) every pass reads the step number, and every
//!   update pass the bias-correction `t`, from a device struct (`HyzoCounters`) that a
//!   one-thread kernel advances after each update pass (also captured). One captured step
//!   then serves a whole training loop; [`crate::Optimizer::sync_counters`] brings the
//!   host's counts up to date after replays.
//! - Low-rank directions (spec §7): the table carries each low-rank tensor's shape, and a
//!   job table (built with the state, `ensure_lowrank`) names its two factor
//!   streams. An update pass of a low-rank step first writes the factors of its zeroth-order
//!   terms into a device scratch (`hyzo_lowrank_factors_*`, on the stream: nothing is
//!   staged from the host for up to 8 terms, so capture keeps working), then rebuilds `Z`
//!   from them; perturbation passes skip those tensors.

pub(crate) mod abi;
mod device;
mod driver;
mod emulator;

use std::ffi::c_void;
use std::sync::Arc;

use crate::backend::{
    Backend, DeviceQueue, Generator, PerturbPass, StateLayout, StateSink, StateSource, UpdatePass,
};
use crate::config::StateSet;
use crate::direction::{DirectionKind, LowRankShape, LOWRANK_A_STREAM, LOWRANK_B_STREAM};
use crate::dtype::{DType, Precision};
use crate::error::{invalid, Error, Result};
use crate::rules::{Rule, RuleParams};
use crate::shard::{Location, ParamShard, TensorSpec};

use abi::{
    HyzoCounters, HyzoFactorJob, HyzoFactorPass, HyzoLossPass, HyzoPass, HyzoTensor, HyzoTerm,
    CHUNK_GROUPS, GROUP, MAX_TERMS, THREADS,
};
use device::{factor_kernel_name, kernel_name, Device, Kernel, Pass, Variant};

pub use device::compile_ptx;
pub use emulator::{
    emulator_enabled, emulator_executed_kernels, emulator_kernels, emulator_set_extra_blocks,
    use_emulator,
};

/// Whether a CUDA driver and at least one device are present.
pub fn is_available() -> bool {
    device::device_count() > 0
}

/// For the CUDA test files: makes device 0 the GPU or, without one, the emulated device,
/// and says which on stdout. False (the test returns) only under `HYZO_GPU_ONLY=1`, which
/// the GPU kit sets: there a GPU hyzo cannot see must read as not run ("skipped: no CUDA
/// device"), never as a pass on the emulated device.
#[doc(hidden)]
pub fn choose_test_device() -> bool {
    if is_available() {
        return true;
    }
    if std::env::var_os("HYZO_GPU_ONLY").is_some_and(|v| v == "1") {
        println!("skipped: no CUDA device (HYZO_GPU_ONLY=1 refuses the emulated device)");
        return false;
    }
    use_emulator();
    println!("no CUDA device: running on the emulated device");
    true
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    device::device_count().max(0) as usize
}

/// ptxas' register and spill report of the embedded kernels, one line per kernel and
/// architecture (or a note that the kernels are compiled with NVRTC at run time).
pub fn build_report() -> &'static str {
    device::BUILD_REPORT
}

/// The architectures of the embedded fatbin: `sm_*` machine code, `compute_*` PTX. Empty
/// when hyzo was built without nvcc.
pub fn embedded_architectures() -> &'static [&'static str] {
    device::ARCHITECTURES
}

/// The names of every kernel the module defines (the exact and fast variants of each
/// pass and of the low-rank factors, `hyzo_sq_norm_final`, `hyzo_device_losses`,
/// `hyzo_advance_counters`).
pub fn kernel_names() -> Vec<String> {
    device::kernel_names()
}

/// The kernels' source as embedded for NVRTC (headers inlined).
pub fn kernel_source() -> &'static str {
    device::SOURCE
}

/// A short description of device `ordinal`: name, compute capability, SM count and how the
/// kernels were loaded (opens the device).
pub fn describe_device(ordinal: i32) -> Result<String> {
    let d = Device::get(ordinal)?;
    if d.is_emulated() {
        return Ok(format!("{} [EMULATED: HYZO_CUDA_EMULATOR]", d.name));
    }
    Ok(format!(
        "{} (sm_{}{}, {} SMs, kernels from {})",
        d.name, d.compute_capability.0, d.compute_capability.1, d.sm_count, d.module_source
    ))
}

/// Prints what `hyzo info` shows about CUDA: how the kernels were built (architectures,
/// ptxas' registers and spills per kernel) and the devices present.
pub fn print_info() {
    let archs = embedded_architectures();
    if archs.is_empty() {
        println!("backend cuda: kernels compiled with NVRTC at first use (built without nvcc)");
    } else {
        println!("backend cuda: embedded fatbin for {}", archs.join(", "));
    }
    println!("kernel build report:");
    for line in build_report().lines() {
        println!("  {line}");
    }
    let n = device_count();
    if n == 0 {
        println!("cuda devices: none (no driver or no GPU)");
    }
    for i in 0..n as i32 {
        match describe_device(i) {
            Ok(d) => println!("cuda:{i}: {d}"),
            Err(e) => println!("cuda:{i}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Owned device memory.

/// An owned device allocation of `bytes` bytes in the primary context of one device.
pub struct CudaBuffer {
    dev: Arc<Device>,
    ptr: u64,
    bytes: usize,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuffer({:#x}, {} bytes, cuda:{})",
            self.ptr, self.bytes, self.dev.ordinal
        )
    }
}

impl CudaBuffer {
    /// Allocates `bytes` (at least 1) uninitialized bytes on device `ordinal`, 256-aligned.
    pub fn new(ordinal: i32, bytes: usize) -> Result<Self> {
        let dev = Device::get(ordinal)?;
        Self::on(&dev, bytes)
    }

    fn on(dev: &Arc<Device>, bytes: usize) -> Result<Self> {
        let ptr = dev.alloc(bytes)?;
        Ok(Self {
            dev: dev.clone(),
            ptr,
            bytes,
        })
    }

    /// Allocates and copies `data` in (synchronously).
    pub fn from_slice<T: Copy>(ordinal: i32, data: &[T]) -> Result<Self> {
        let b = Self::new(ordinal, std::mem::size_of_val(data))?;
        b.upload(data)?;
        Ok(b)
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `data` to the start of the buffer, synchronously (after all work in the
    /// context's legacy default stream and streams that synchronize with it).
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<()> {
        self.upload_at(0, data)
    }

    /// Copies `data` to byte offset `at`, synchronously.
    pub fn upload_at<T: Copy>(&self, at: usize, data: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(data);
        if at.checked_add(n).map_or(true, |end| end > self.bytes) {
            return invalid(format!(
                "upload: {n} bytes at {at} exceed the buffer's {}",
                self.bytes
            ));
        }
        // SAFETY: bounds checked; the host slice is valid for n bytes.
        unsafe {
            self.dev.htod(
                self.ptr + at as u64,
                data.as_ptr() as *const c_void,
                n,
                None,
            )
        }
    }

    /// Copies the start of the buffer into `out`, synchronously.
    pub fn download<T: Copy>(&self, out: &mut [T]) -> Result<()> {
        self.download_at(0, out)
    }

    /// Copies from byte offset `at` into `out`, synchronously.
    pub fn download_at<T: Copy>(&self, at: usize, out: &mut [T]) -> Result<()> {
        let n = std::mem::size_of_val(out);
        if at.checked_add(n).map_or(true, |end| end > self.bytes) {
            return invalid(format!(
                "download: {n} bytes at {at} exceed the buffer's {}",
                self.bytes
            ));
        }
        // SAFETY: bounds checked; the host slice is valid for n bytes.
        unsafe {
            self.dev.dtoh(
                out.as_mut_ptr() as *mut c_void,
                self.ptr + at as u64,
                n,
                None,
            )
        }
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

// ---------------------------------------------------------------------------------------
// Streams and graphs.

/// The stream passes are issued on.
#[derive(Clone, Copy)]
enum Stream {
    /// Created (and destroyed) by the backend.
    Owned(u64),
    /// The caller's; never destroyed here.
    Borrowed(u64),
}

impl Stream {
    fn raw(self) -> u64 {
        match self {
            Stream::Owned(s) | Stream::Borrowed(s) => s,
        }
    }
}

/// An instantiated CUDA graph (a captured step), replayable on any stream of its device.
pub struct CudaGraph {
    dev: Arc<Device>,
    handles: driver::GraphHandles,
}

// SAFETY: graph handles are driver objects usable from any thread with the context bound.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Launches the graph on `stream` (a raw `CUstream`; 0 is the legacy default stream).
    pub fn launch_on(&self, stream: u64) -> Result<()> {
        self.dev.graph_launch(self.handles, stream)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        self.dev.graph_destroy(self.handles);
    }
}

// ---------------------------------------------------------------------------------------
// The backend.

/// The kinds of state buffer, in the order of the saved state (`Backend::save_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateBuffer {
    M = 0,
    V = 1,
    FoM = 2,
    FoV = 3,
    Lo = 4,
}

impl StateBuffer {
    const ALL: [StateBuffer; 5] = [Self::M, Self::V, Self::FoM, Self::FoV, Self::Lo];

    fn element_size(self) -> usize {
        if self == Self::Lo {
            2
        } else {
            4
        }
    }
}

/// Where one tensor's state lives inside the backend's state buffers (byte offsets, by
/// [`StateBuffer`]).
#[derive(Clone, Copy, Debug, Default)]
struct Segment([Option<usize>; 5]);

/// Bytes moved between host and device at a time when the state is saved or loaded.
const IO_CHUNK: usize = 16 << 20;

/// Scratch growth unit: the device-loss and coefficient arrays start with room for this
/// many directions.
const INITIAL_DIRECTIONS: usize = 64;

/// Runs the passes of a shard on one CUDA device.
pub struct CudaBackend {
    dev: Arc<Device>,
    stream: Stream,
    /// The shard as registered by `allocate_state` (to refuse a different one).
    specs: Vec<TensorSpec>,
    table: Option<CudaBuffer>,
    /// The table as uploaded (its low-rank fields are refreshed by `ensure_lowrank`).
    table_host: Vec<HyzoTensor>,
    total_chunks: u64,
    /// The low-rank tensors the job table and the table's low-rank fields were built for:
    /// (index, global offset, shape); `None` until built.
    lowrank_key: Option<Vec<(usize, u64, LowRankShape)>>,
    /// `HyzoFactorJob`s: A then B of each low-rank tensor (None without any).
    factor_jobs: Option<CudaBuffer>,
    njobs: u32,
    /// Floats of one direction's factors (`Optimizer::lowrank_factors_len`).
    factors_len: u64,
    /// Groups of 8 the factor kernel walks per direction (its grid size).
    factor_groups: u64,
    /// The factors of an update's zeroth-order terms (f32; grown as needed).
    factors: Option<CudaBuffer>,
    segments: Vec<Segment>,
    /// One device allocation per [`StateBuffer`] kind (None when no tensor keeps it).
    state: [Option<CudaBuffer>; 5],
    /// Losses recorded on the device, f32 each.
    losses: Option<CudaBuffer>,
    /// Terms uploaded by the host (more than MAX_TERMS) and base coefficients.
    terms_in: Option<CudaBuffer>,
    /// Coefficients computed by `hyzo_device_losses`.
    terms_out: Option<CudaBuffer>,
    /// One byte a tensor: the tensors an update pass with [`UpdatePass::tensors`] updates.
    tensor_mask: Option<CudaBuffer>,
    /// u32 skip flag at 0, u64 skip counter at 8, `HyzoCounters` at [`COUNTERS_AT`].
    flags: Option<CudaBuffer>,
    /// sq_norm's per-chunk partials, then the total.
    partials: Option<CudaBuffer>,
    capacity: usize,
    /// Run the exact kernels (the CPU's Gaussian bit for bit) instead of the fast ones.
    exact: bool,
    /// The device-counter mode ([`CudaBackend::set_device_counters`]).
    device_counters: bool,
    /// In that mode, the step the device's counter holds when the passes issued so far
    /// have run (as last set or read, plus the update passes issued since): a pass for
    /// another step (`displace`) carries its distance from it.
    host_step: u64,
}

/// Byte offset of the `HyzoCounters` in the flags buffer.
const COUNTERS_AT: u64 = 16;

// SAFETY: the stream handle is only used with the context bound; the backend is used by one
// thread at a time (&mut self).
unsafe impl Send for CudaBackend {}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev.ordinal)
            .field("tensors", &self.specs.len())
            .finish()
    }
}

impl CudaBackend {
    /// A backend on device `ordinal`, with a stream of its own (a blocking stream: it
    /// orders with the legacy default stream, so synchronous copies see its results).
    /// `Error::NoDevice` without a driver or device.
    pub fn new(ordinal: i32) -> Result<Self> {
        let dev = Device::get(ordinal)?;
        let s = dev.stream_create()?;
        Ok(Self {
            dev,
            stream: Stream::Owned(s),
            specs: Vec::new(),
            table: None,
            table_host: Vec::new(),
            total_chunks: 0,
            lowrank_key: None,
            factor_jobs: None,
            njobs: 0,
            factors_len: 0,
            factor_groups: 0,
            factors: None,
            segments: Vec::new(),
            state: Default::default(),
            losses: None,
            terms_in: None,
            tensor_mask: None,
            terms_out: None,
            flags: None,
            partials: None,
            capacity: 0,
            exact: std::env::var_os("HYZO_CUDA_EXACT").is_some_and(|v| v != "0"),
            device_counters: false,
            host_step: 0,
        })
    }

    /// Chooses the kernels' Gaussian arithmetic. The default is the fast variant (the GPU's
    /// transcendental units, within spec v2 §3's tolerance of the CPU); `true` selects the
    /// exact variant, which reproduces the CPU backend bit for bit (a test instrument, and
    /// what `HYZO_CUDA_EXACT=1` in the environment selects for every new backend).
    pub fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
    }

    /// Whether the exact kernels are selected ([`CudaBackend::set_exact`]).
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// Chooses where the step number and the bias-correction `t` come from. Off (the
    /// default), they travel in each launch's parameters, so a captured graph replays the
    /// captured step exactly (same directions, same `t`). On, every pass reads them from a
    /// device struct that each update pass advances (step + 1, and the `t` of its state
    /// set; a step skipped on the device leaves the bias corrections' `t` where it was),
    /// so a graph of one whole step, replayed N times, runs N consecutive steps, bit for bit
    /// those of N ordinary steps. The optimizer sets the struct from its own counts at the
    /// first step, after a load and after a host-side skip ([`DeviceQueue::set_counters`]), so
    /// choose the mode before handing the backend to an [`crate::Optimizer`]; after
    /// replays, [`crate::Optimizer::sync_counters`] reads the counts back.
    pub fn set_device_counters(&mut self, on: bool) {
        self.device_counters = on;
    }

    /// Whether the device-counter mode is on ([`CudaBackend::set_device_counters`]).
    pub fn device_counters_enabled(&self) -> bool {
        self.device_counters
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.dev.ordinal
    }

    /// The raw `CUstream` passes are issued on.
    pub fn stream(&self) -> u64 {
        self.stream.raw()
    }

    /// Issues all further passes on the caller's stream (e.g. PyTorch's current stream);
    /// the backend never destroys it. Work already issued on the previous stream is waited
    /// for first.
    ///
    /// # Safety
    /// `stream` must be a valid `CUstream` of this device's primary context (or 0, the
    /// legacy default stream) that outlives its use by this backend.
    pub unsafe fn set_stream(&mut self, stream: u64) -> Result<()> {
        self.synchronize()?;
        if let Stream::Owned(s) = self.stream {
            // Created by us, idle after the synchronize.
            self.dev.stream_destroy(s);
        }
        self.stream = Stream::Borrowed(stream);
        Ok(())
    }

    /// Starts capturing every pass issued on the backend's stream into a graph (global
    /// capture mode: no allocation or synchronization may happen until
    /// [`CudaBackend::end_capture`]).
    pub fn begin_capture(&mut self) -> Result<()> {
        self.dev.begin_capture(self.stream.raw())
    }

    /// Ends the capture begun by [`CudaBackend::begin_capture`] and instantiates the graph.
    pub fn end_capture(&mut self) -> Result<CudaGraph> {
        let handles = self.dev.end_capture(self.stream.raw())?;
        Ok(CudaGraph {
            dev: self.dev.clone(),
            handles,
        })
    }

    /// Launches a captured graph on the backend's stream.
    pub fn launch_graph(&mut self, graph: &CudaGraph) -> Result<()> {
        graph.launch_on(self.stream())
    }

    fn check_shard(&self, shard: &ParamShard) -> Result<()> {
        if shard.location() != Location::Cuda(self.dev.ordinal) {
            return invalid(format!(
                "the shard lives at {:?}; this backend runs on CUDA device {}",
                shard.location(),
                self.dev.ordinal
            ));
        }
        if self.table.is_none() || shard.tensors() != self.specs.as_slice() {
            return Err(Error::Internal(
                "the CUDA backend's state was allocated for another shard".into(),
            ));
        }
        Ok(())
    }

    /// The kernel of `pass` for this backend's variant and the pass's parameters.
    fn kernel(&self, pass: Pass, p: &HyzoPass) -> Result<Kernel> {
        let variant = if self.exact {
            Variant::Exact
        } else {
            Variant::Fast
        };
        self.dev
            .kernels
            .get(&kernel_name(pass, variant, p.kind, p.rule.rule, p.nterms))
    }

    /// A persistent grid: every chunk, at most the blocks resident on the device at once.
    fn grid(&self, k: Kernel) -> u32 {
        let resident = self.dev.sm_count as u64 * k.blocks_per_sm as u64;
        self.total_chunks.min(resident).clamp(1, u32::MAX as u64) as u32
    }

    /// After an update pass in the device-counter mode: advances the device's step and the
    /// `t` of the pass's state set (one thread, ordered on the stream after the pass).
    fn advance_counters(&mut self, p: &HyzoPass) -> Result<()> {
        if p.counters == 0 {
            return Ok(());
        }
        let k = self.dev.kernels.get("hyzo_advance_counters")?;
        self.launch(&k, 1, p)?;
        self.host_step += 1;
        Ok(())
    }

    /// Launches an element kernel over the shard's chunks.
    fn launch_pass(&self, pass: Pass, p: &HyzoPass) -> Result<()> {
        let k = self.kernel(pass, p)?;
        self.launch(&k, self.grid(k), p)
    }

    fn launch<P>(&self, k: &Kernel, grid: u32, params: &P) -> Result<()> {
        // SAFETY: `params` is the kernel's single by-value parameter, with its C layout
        // (abi.rs, pinned against the header); the driver copies it at launch.
        unsafe { self.dev.launch(k, grid, params, self.stream.raw()) }
    }

    fn base_pass(&self, gen: Generator, precision: Precision, rule: RuleParams) -> HyzoPass {
        let mut p = HyzoPass::empty(rule);
        p.table = self.table.as_ref().map_or(0, |t| t.ptr());
        p.total_chunks = self.total_chunks;
        p.ntensors = self.specs.len() as u32;
        p.seed = gen.seed;
        p.step = gen.step;
        p.kind = match gen.kind.generated() {
            DirectionKind::Rademacher => 1,
            _ => 0,
        };
        p.precision = precision as u32;
        if self.device_counters {
            p.counters = self.flags.as_ref().map_or(0, |f| f.ptr() + COUNTERS_AT);
            // The kernels use the counter's step plus this distance (0 within a step).
            p.step = gen.step.wrapping_sub(self.host_step as u32);
        }
        p
    }

    /// Makes sure the scratch arrays hold `n` directions (2n + 1 losses). Allocates only
    /// when they grow (never during a capture, once a step of that size has run).
    fn ensure_capacity(&mut self, n: usize) -> Result<()> {
        if n <= self.capacity && self.losses.is_some() {
            return Ok(());
        }
        let cap = n.max(INITIAL_DIRECTIONS).next_power_of_two();
        let losses = CudaBuffer::on(&self.dev, 4 * (2 * cap + 1))?;
        if let Some(old) = &self.losses {
            // Losses recorded so far in this step must survive the growth.
            self.stream_sync()?;
            // SAFETY: both buffers are live; the old one is the smaller.
            unsafe {
                self.dev.dtod(losses.ptr(), old.ptr(), old.bytes(), None)?;
            }
        }
        self.losses = Some(losses);
        self.terms_in = Some(CudaBuffer::on(&self.dev, 8 * cap)?);
        self.terms_out = Some(CudaBuffer::on(&self.dev, 8 * cap)?);
        self.capacity = cap;
        Ok(())
    }

    /// Calls `f(buffer, byte offset, scratch)` for each piece of at most `IO_CHUNK` bytes of
    /// the state, in the saved layout's order (`Backend::save_state`), with `scratch` sized
    /// to the piece: saving and loading walk the state the same way.
    fn for_each_state_piece(
        &self,
        mut f: impl FnMut(&CudaBuffer, usize, &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut scratch = Vec::new();
        for (t, s) in self.specs.iter().zip(&self.segments) {
            for b in StateBuffer::ALL {
                let (Some(buf), Some(at)) = (&self.state[b as usize], s.0[b as usize]) else {
                    continue;
                };
                let total = b.element_size() * t.numel as usize;
                let mut done = 0;
                while done < total {
                    let n = IO_CHUNK.min(total - done);
                    scratch.resize(n, 0u8);
                    f(buf, at + done, &mut scratch)?;
                    done += n;
                }
            }
        }
        Ok(())
    }

    fn stream_sync(&self) -> Result<()> {
        self.dev.stream_sync(self.stream.raw())
    }

    /// Builds the low-rank job table and the table's low-rank fields for `shard`'s shapes
    /// when they are not built yet or the shapes changed (synchronizes then). Called by
    /// `allocate_state`, after which the shapes are fixed (`Optimizer::set_shape` refuses
    /// once the state exists), so the passes need not call it; and by `lowrank_factors`,
    /// which may come first.
    fn ensure_lowrank(&mut self, shard: &ParamShard) -> Result<()> {
        let key: Vec<(usize, u64, LowRankShape)> = shard
            .lowrank_tensors()
            .into_iter()
            .map(|(i, s)| (i, shard.tensors()[i].offset, s))
            .collect();
        if self.lowrank_key.as_ref() == Some(&key) {
            return Ok(());
        }
        let mut jobs = Vec::with_capacity(2 * key.len());
        for t in &mut self.table_host {
            (t.factor_offset, t.cols, t.rank, t.scale) = (0, 0, 0, 0.0);
        }
        let mut at = 0u64;
        let mut groups = 0u64;
        for &(i, offset, s) in &key {
            for (out, count, stream) in [
                (at, s.a_len(), LOWRANK_A_STREAM),
                (at + s.a_len(), s.cols * s.rank, LOWRANK_B_STREAM),
            ] {
                jobs.push(HyzoFactorJob {
                    out,
                    offset,
                    count,
                    stream,
                    reserved: 0,
                });
                groups += count.div_ceil(GROUP) + 1;
            }
            if let Some(t) = self.table_host.get_mut(i) {
                t.factor_offset = at;
                t.cols = s.cols;
                t.rank = s.rank as u32;
                t.scale = s.scale();
            }
            at += s.factors_len();
        }
        self.dev.bind()?;
        // Passes in flight may read the table or the jobs.
        self.stream_sync()?;
        self.factor_jobs = if jobs.is_empty() {
            None
        } else {
            let b = CudaBuffer::on(&self.dev, std::mem::size_of_val(jobs.as_slice()))?;
            b.upload(&jobs)?;
            Some(b)
        };
        if let Some(t) = &self.table {
            t.upload(&self.table_host)?;
        }
        self.njobs = jobs.len() as u32;
        self.factors_len = at;
        self.factor_groups = groups;
        self.lowrank_key = Some(key);
        Ok(())
    }

    /// Launches the factor kernel: the factors of the directions of `terms` (their
    /// coefficients unused), term k's at `out + 4 k stride` bytes, each as
    /// [`Backend::lowrank_factors`] lays them out.
    fn launch_factors(
        &mut self,
        gen: Generator,
        terms: &[crate::backend::Term],
        out: u64,
        stride: u64,
    ) -> Result<()> {
        let (Some(jobs), false) = (self.factor_jobs.as_ref().map(|b| b.ptr()), terms.is_empty())
        else {
            return Ok(());
        };
        let mut fp = HyzoFactorPass {
            jobs,
            counters: 0,
            seed: gen.seed,
            out,
            stride,
            terms: 0,
            njobs: self.njobs,
            step: gen.step,
            nterms: terms.len() as u32,
            reserved: 0,
            inline_terms: [HyzoTerm::default(); MAX_TERMS],
        };
        if self.device_counters {
            if let Some(f) = &self.flags {
                fp.counters = f.ptr() + COUNTERS_AT;
                fp.step = gen.step.wrapping_sub(self.host_step as u32);
            }
        }
        fp.terms = self.stage_terms(terms, &mut fp.inline_terms)?;
        let variant = if self.exact {
            Variant::Exact
        } else {
            Variant::Fast
        };
        let k = self.dev.kernels.get(factor_kernel_name(variant))?;
        let resident = (self.dev.sm_count as u64 * k.blocks_per_sm as u64).max(1);
        let groups = self.factor_groups.saturating_mul(terms.len() as u64);
        let grid = groups.div_ceil(THREADS as u64).clamp(1, resident) as u32;
        self.dev.bind()?;
        self.launch(&k, grid, &fp)
    }

    /// Makes sure the factor scratch holds `floats` f32 (grows only; synchronizes before
    /// freeing a smaller one that passes in flight may still read).
    fn ensure_factors(&mut self, floats: u64) -> Result<u64> {
        let bytes = floats
            .checked_mul(4)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| Error::OutOfMemory(format!("low-rank factors of {floats} floats")))?;
        if let Some(f) = self.factors.as_ref().filter(|f| f.bytes() >= bytes) {
            return Ok(f.ptr());
        }
        if self.factors.is_some() {
            self.stream_sync()?;
            self.factors = None;
        }
        let f = CudaBuffer::on(&self.dev, bytes)?;
        let ptr = f.ptr();
        self.factors = Some(f);
        Ok(ptr)
    }

    /// Uploads the flags of the tensors a pass updates, in stream order (from pageable
    /// memory: like terms beyond MAX_TERMS, not capturable in a CUDA graph); returns the
    /// device address.
    fn stage_mask(&mut self, mask: &[bool]) -> Result<u64> {
        let bytes: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        if self
            .tensor_mask
            .as_ref()
            .map_or(true, |b| b.bytes() < bytes.len())
        {
            self.tensor_mask = Some(CudaBuffer::on(&self.dev, bytes.len().max(1))?);
        }
        let dst = self.tensor_mask.as_ref().unwrap().ptr();
        // SAFETY: the buffer holds at least `bytes.len()` bytes.
        unsafe { self.upload_async(dst, &bytes)? };
        Ok(dst)
    }

    /// Copies `src` to device address `dst` in stream order. From pageable memory the
    /// driver stages the copy before returning, so `src` may be dropped right after.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `size_of_val(src)` bytes.
    unsafe fn upload_async<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.dev.htod(
            dst,
            src.as_ptr() as *const c_void,
            std::mem::size_of_val(src),
            Some(self.stream.raw()),
        )
    }

    /// Puts `terms` in the launch parameters, or (more than MAX_TERMS) uploads them to the
    /// `terms_in` array; returns its address or 0.
    fn stage_terms(
        &mut self,
        terms: &[crate::backend::Term],
        p_inline: &mut [HyzoTerm; MAX_TERMS],
    ) -> Result<u64> {
        let converted: Vec<HyzoTerm> = terms
            .iter()
            .map(|t| HyzoTerm {
                direction: t.direction,
                coeff: t.coeff,
            })
            .collect();
        if converted.len() <= MAX_TERMS {
            p_inline[..converted.len()].copy_from_slice(&converted);
            return Ok(0);
        }
        self.ensure_capacity(converted.len())?;
        let dst = self.terms_in.as_ref().unwrap().ptr();
        // SAFETY: capacity ensured: the array holds `converted.len()` terms.
        unsafe { self.upload_async(dst, &converted)? };
        Ok(dst)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.stream_sync();
        if let Stream::Owned(s) = self.stream {
            // Created by us, idle after the synchronize.
            self.dev.stream_destroy(s);
        }
    }
}

/// The offset whose multiples of 8 the kernels cut a tensor's groups at (kernels/hyzo.cu
/// `data_shift`): `offset + d`, with `d` the shift in `[0, 16 / size)` that puts those
/// group starts on 16-byte boundaries of the data (0 for data aligned like its global
/// offset, for data not aligned to its element size, or when the shifted range would pass
/// 2^64).
fn vector_offset(t: &TensorSpec) -> u64 {
    let size = t.dtype.size() as u64;
    if t.data % size != 0 {
        return t.offset;
    }
    let d = (t.data / size).wrapping_sub(t.offset) & (16 / size - 1);
    match (t.offset + t.numel - 1).checked_add(d) {
        Some(_) => t.offset + d,
        None => t.offset,
    }
}

/// Bytes of `n` elements of 4 or 2 bytes placed so that element `i` of the tensor is
/// 16-byte aligned exactly when `offset + i` is a multiple of 8 (the kernels' vector
/// condition, `offset` the tensor's [`vector_offset`]: the state is then aligned like the
/// data): the segment starts `offset mod (16 / size)` elements past a 256-byte line.
fn place(cursor: &mut usize, numel: u64, offset: u64, size: usize) -> usize {
    let per16 = (16 / size) as u64;
    let start = cursor.div_ceil(256) * 256 + size * (offset % per16) as usize;
    *cursor = start + size * numel as usize;
    start
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{}", self.dev.ordinal)
    }

    fn allocate_state(&mut self, shard: &ParamShard, layout: StateLayout) -> Result<()> {
        if shard.location() != Location::Cuda(self.dev.ordinal) {
            return invalid(format!(
                "the shard lives at {:?}; this backend runs on CUDA device {}",
                shard.location(),
                self.dev.ordinal
            ));
        }
        if shard.is_empty() {
            return invalid("no tensors");
        }
        let tensors = shard.tensors();
        let mut segments = Vec::with_capacity(tensors.len());
        let mut cursors = [0usize; 5];
        for t in tensors {
            let kept = |b: StateBuffer| match b {
                StateBuffer::M => layout.main_buffers >= 1,
                StateBuffer::V => layout.main_buffers >= 2,
                StateBuffer::FoM => layout.fo_buffers >= 1,
                StateBuffer::FoV => layout.fo_buffers >= 2,
                StateBuffer::Lo => layout.residual && t.dtype != DType::F32,
            };
            let mut s = Segment::default();
            for b in StateBuffer::ALL {
                if kept(b) {
                    let at = place(
                        &mut cursors[b as usize],
                        t.numel,
                        vector_offset(t),
                        b.element_size(),
                    );
                    s.0[b as usize] = Some(at);
                }
            }
            segments.push(s);
        }
        self.dev.bind()?;
        let zeroed = |bytes: usize| -> Result<Option<CudaBuffer>> {
            if bytes == 0 {
                return Ok(None);
            }
            let b = CudaBuffer::on(&self.dev, bytes)?;
            // SAFETY: the buffer holds `bytes` bytes.
            unsafe { self.dev.memset(b.ptr(), 0, bytes)? };
            Ok(Some(b))
        };
        let mut state: [Option<CudaBuffer>; 5] = Default::default();
        for (buffer, bytes) in state.iter_mut().zip(cursors) {
            *buffer = zeroed(bytes)?;
        }
        let mut table = Vec::with_capacity(tensors.len());
        let mut chunk = 0u64;
        for (t, s) in tensors.iter().zip(&segments) {
            let first_group = t.offset / GROUP;
            let last_group = (t.offset + t.numel - 1) / GROUP;
            let chunks = (last_group - first_group + 1).div_ceil(CHUNK_GROUPS);
            let at = |b: StateBuffer| match (&state[b as usize], s.0[b as usize]) {
                (Some(buf), Some(o)) => buf.ptr() + o as u64,
                _ => 0,
            };
            table.push(HyzoTensor {
                data: t.data,
                grad: t.grad,
                lo: at(StateBuffer::Lo),
                m: at(StateBuffer::M),
                v: at(StateBuffer::V),
                fo_m: at(StateBuffer::FoM),
                fo_v: at(StateBuffer::FoV),
                numel: t.numel,
                offset: t.offset,
                first_chunk: chunk,
                dtype: t.dtype as u32,
                grad_dtype: t.grad_dtype as u32,
                // Filled by ensure_lowrank.
                factor_offset: 0,
                cols: 0,
                rank: 0,
                scale: 0.0,
            });
            chunk += chunks;
        }
        let table_buf = CudaBuffer::on(&self.dev, std::mem::size_of_val(table.as_slice()))?;
        table_buf.upload(&table)?;
        let flags = zeroed(COUNTERS_AT as usize + std::mem::size_of::<HyzoCounters>())?;
        let partials = CudaBuffer::on(&self.dev, 8 * (chunk as usize + 1))?;
        self.specs = tensors.to_vec();
        self.segments = segments;
        self.total_chunks = chunk;
        self.table = Some(table_buf);
        self.table_host = table;
        self.state = state;
        self.flags = flags;
        self.partials = Some(partials);
        self.ensure_capacity(INITIAL_DIRECTIONS)?;
        self.lowrank_key = None;
        self.ensure_lowrank(shard)
    }

    unsafe fn lowrank_factors(
        &mut self,
        shard: &ParamShard,
        gen: Generator,
        direction: u32,
        out: u64,
        len: u64,
    ) -> Result<()> {
        if shard.location() != Location::Cuda(self.dev.ordinal) {
            return invalid(format!(
                "the shard lives at {:?}; this backend runs on CUDA device {}",
                shard.location(),
                self.dev.ordinal
            ));
        }
        self.ensure_lowrank(shard)?;
        if len != self.factors_len {
            return Err(Error::Internal(format!(
                "lowrank_factors: {len} floats for factors of {}",
                self.factors_len
            )));
        }
        let term = crate::backend::Term {
            direction,
            coeff: 0.0,
        };
        self.launch_factors(gen, &[term], out, len)
    }

    fn perturb(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<()> {
        self.check_shard(shard)?;
        self.dev.bind()?;
        let mut p = self.base_pass(
            pass.gen,
            pass.precision,
            RuleParams::new(Rule::Sgd, 0.0, 0.0, 0.0, 1.0, 0.0, 1),
        );
        // Low-rank tensors are perturbed by the forward pass (spec §7).
        p.lowrank = (pass.gen.kind == DirectionKind::LowRank) as u32;
        p.nterms = pass.terms.len() as u32;
        p.terms = self.stage_terms(pass.terms, &mut p.inline_terms)?;
        self.launch_pass(Pass::Perturb, &p)
    }

    fn update(&mut self, shard: &ParamShard, pass: &UpdatePass) -> Result<()> {
        self.check_shard(shard)?;
        crate::backend::check_update_tensors(shard, pass)?;
        self.dev.bind()?;
        let mut p = self.base_pass(pass.gen, pass.precision, pass.rule);
        p.state_set = pass.state as u32;
        p.t = pass.t;
        if pass.state == StateSet::Main {
            // Only steps of the main state are ever skipped on the device.
            p.skip_count = self.flags.as_ref().map_or(0, |f| f.ptr() + 8);
        }
        if let Some(a) = pass.grad_weight {
            p.has_grad = 1;
            p.grad_weight = a;
        }
        if let Some(mask) = pass.tensors {
            p.tensor_mask = self.stage_mask(mask)?;
        }
        let fo_only = pass.restore.is_none() && pass.zo.is_empty() && pass.device_losses.is_none();
        if fo_only {
            self.launch_pass(Pass::FoUpdate, &p)?;
            return self.advance_counters(&p);
        }
        if let Some(r) = pass.restore {
            p.has_restore = 1;
            p.restore = HyzoTerm {
                direction: r.direction,
                coeff: r.coeff,
            };
            p.restore_slot = pass
                .zo
                .iter()
                .position(|t| t.direction == r.direction)
                .map_or(-1, |k| k as i32);
        }
        p.nterms = pass.zo.len() as u32;
        if pass.gen.kind == DirectionKind::LowRank {
            // Low-rank tensors: Z of each zeroth-order term from its factors, written first
            // (spec §7; no restore term).
            p.lowrank = 1;
            if self.njobs > 0 && !pass.zo.is_empty() {
                let stride = self.factors_len;
                let floats = stride.checked_mul(pass.zo.len() as u64).ok_or_else(|| {
                    Error::OutOfMemory("low-rank factors of every direction".into())
                })?;
                let base = self.ensure_factors(floats)?;
                self.launch_factors(pass.gen, pass.zo, base, stride)?;
                p.factor_base = base;
                p.factor_stride = stride;
            }
        }
        if let Some(dl) = pass.device_losses {
            let q = pass.zo.len();
            self.ensure_capacity(q)?;
            let mut lp = HyzoLossPass {
                losses: self.losses.as_ref().unwrap().ptr(),
                base: 0,
                out: self.terms_out.as_ref().unwrap().ptr(),
                skip_flag: self.flags.as_ref().unwrap().ptr(),
                skip_count: self.flags.as_ref().unwrap().ptr() + 8,
                q: q as u32,
                estimator: dl.estimator as u32,
                eps: dl.eps,
                max_coefficient_sum: dl.max_coefficient_sum,
                inline_base: [HyzoTerm::default(); MAX_TERMS],
            };
            lp.base = self.stage_terms(pass.zo, &mut lp.inline_base)?;
            self.launch(&self.dev.kernels.get("hyzo_device_losses")?, 1, &lp)?;
            p.terms = lp.out;
            p.skip_flag = lp.skip_flag;
        } else {
            p.terms = self.stage_terms(pass.zo, &mut p.inline_terms)?;
        }
        self.launch_pass(Pass::RestoreAndUpdate, &p)?;
        self.advance_counters(&p)
    }

    fn sq_norm(&mut self, shard: &ParamShard, gen: Generator, direction: u32) -> Result<f64> {
        self.check_shard(shard)?;
        self.dev.bind()?;
        let mut p = self.base_pass(
            gen,
            Precision::Nearest,
            RuleParams::new(Rule::Sgd, 0.0, 0.0, 0.0, 1.0, 0.0, 1),
        );
        p.direction = direction;
        p.partials = self.partials.as_ref().unwrap().ptr();
        self.launch_pass(Pass::SqNorm, &p)?;
        self.launch(&self.dev.kernels.get("hyzo_sq_norm_final")?, 1, &p)?;
        let mut total = 0f64;
        // SAFETY: partials holds total_chunks + 1 f64; the copy is ordered on the stream and
        // waited for before `total` is read.
        unsafe {
            self.dev.dtoh(
                &mut total as *mut f64 as *mut c_void,
                p.partials + 8 * self.total_chunks,
                8,
                Some(self.stream.raw()),
            )?;
        }
        self.stream_sync()?;
        Ok(total)
    }

    fn save_state(&mut self, sink: &mut StateSink) -> Result<()> {
        self.stream_sync()?;
        self.for_each_state_piece(|buf, at, scratch| {
            buf.download_at(at, scratch)?;
            sink(scratch)
        })
    }

    fn load_state(&mut self, source: &mut StateSource) -> Result<()> {
        self.stream_sync()?;
        self.for_each_state_piece(|buf, at, scratch| {
            source(scratch)?;
            buf.upload_at(at, scratch)
        })
    }

    fn device(&mut self) -> Option<&mut dyn DeviceQueue> {
        Some(self)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.stream_sync()
    }
}

impl DeviceQueue for CudaBackend {
    fn reset_device_skipped(&mut self) -> Result<()> {
        if let Some(flags) = &self.flags {
            self.stream_sync()?;
            flags.upload(&[0u64; 2])?;
        }
        Ok(())
    }

    fn record_device_loss(&mut self, index: u32, loss: u64) -> Result<()> {
        if self.table.is_none() {
            return Err(Error::Internal(
                "record_device_loss before allocate_state".into(),
            ));
        }
        if loss % 4 != 0 {
            return invalid(format!(
                "loss_on_device: address {loss:#x} is not 4-byte aligned"
            ));
        }
        self.ensure_capacity((index as usize).div_ceil(2) + 1)?;
        self.dev.bind()?;
        let dst = self.losses.as_ref().unwrap().ptr() + 4 * index as u64;
        // SAFETY: capacity ensured (2 cap + 1 losses); the source is the caller's device
        // f32. The copy is ordered on the stream after the forward pass that wrote it.
        unsafe { self.dev.dtod(dst, loss, 4, Some(self.stream.raw())) }
    }

    fn device_skipped(&mut self) -> Result<u64> {
        let Some(flags) = &self.flags else {
            return Ok(0);
        };
        self.stream_sync()?;
        let mut v = [0u64; 1];
        flags.download_at(8, &mut v)?;
        Ok(v[0])
    }

    fn set_counters(&mut self, step: u64, updates: [u64; 2]) -> Result<()> {
        let Some(flags) = self.flags.as_ref().filter(|_| self.device_counters) else {
            return Ok(());
        };
        let c = HyzoCounters { step, t: updates };
        self.host_step = step;
        self.dev.bind()?;
        // SAFETY: the flags buffer holds the counters at COUNTERS_AT; from pageable memory
        // the driver stages the copy before returning, ordered on the stream after the
        // passes issued so far.
        unsafe {
            self.dev.htod(
                flags.ptr() + COUNTERS_AT,
                &c as *const HyzoCounters as *const c_void,
                std::mem::size_of::<HyzoCounters>(),
                Some(self.stream.raw()),
            )
        }
    }

    unsafe fn set_stream(&mut self, stream: u64) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { CudaBackend::set_stream(self, stream) }
    }

    fn device_counters(&mut self) -> Result<Option<(u64, [u64; 2])>> {
        let Some(flags) = self.flags.as_ref().filter(|_| self.device_counters) else {
            return Ok(None);
        };
        self.stream_sync()?;
        let mut c = [HyzoCounters::default()];
        flags.download_at(COUNTERS_AT as usize, &mut c)?;
        self.host_step = c[0].step;
        Ok(Some((c[0].step, c[0].t)))
    }
}
