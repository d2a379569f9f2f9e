//! What the CUDA backend asks of a device (allocate, copy, launch, stream, graph), with two
//! implementations: the CUDA driver through cudarc, and the emulated device
//! (`emulator.rs`: the host build of the same kernels, for tests without a GPU). Everything
//! the backend plans (tables, placements, launch parameters, counters, skips) lives in
//! `mod.rs` and runs unchanged on either; only these calls differ.
//!
//! Streams and graphs are raw handles as `u64` (a `CUstream` / `CUgraphExec`, or the
//! emulator's); `stream: None` in a copy means a synchronous copy.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::device::{check, Device, Driver, Kernel};
use crate::error::Result;

/// An instantiated graph: (graph, exec) for CUDA, (id, 0) for the emulator.
pub(crate) type GraphHandles = (u64, u64);

impl Device {
    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.driver, Driver::Emulated(_))
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        match &self.driver {
            // SAFETY: the context is retained for the life of the process.
            Driver::Cuda { ctx } => check(unsafe { sys::cuCtxSetCurrent(*ctx) }, "cuCtxSetCurrent"),
            Driver::Emulated(_) => Ok(()),
        }
    }

    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                let mut ptr = 0;
                // SAFETY: the context is current.
                check(
                    unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) },
                    "cuMemAlloc",
                )?;
                Ok(ptr)
            }
            Driver::Emulated(e) => e.alloc(bytes),
        }
    }

    pub fn free(&self, ptr: u64) {
        match &self.driver {
            Driver::Cuda { .. } => {
                if self.bind().is_ok() {
                    // SAFETY: allocated by cuMemAlloc in this context and freed once.
                    unsafe { sys::cuMemFree_v2(ptr) };
                }
            }
            Driver::Emulated(e) => e.free(ptr),
        }
    }

    /// Host to device.
    ///
    /// # Safety
    /// `src` is valid for `bytes` bytes (until the copy has run, for a stream copy) and the
    /// device range is allocated.
    pub unsafe fn htod(
        &self,
        dst: u64,
        src: *const c_void,
        bytes: usize,
        stream: Option<u64>,
    ) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                match stream {
                    None => check(sys::cuMemcpyHtoD_v2(dst, src, bytes), "cuMemcpyHtoD"),
                    Some(s) => check(
                        sys::cuMemcpyHtoDAsync_v2(dst, src, bytes, s as sys::CUstream),
                        "cuMemcpyHtoDAsync",
                    ),
                }
            }
            Driver::Emulated(e) => e.upload(dst, src as u64, bytes, stream),
        }
    }

    /// Device to host.
    ///
    /// # Safety
    /// As [`Device::htod`], the other way round.
    pub unsafe fn dtoh(
        &self,
        dst: *mut c_void,
        src: u64,
        bytes: usize,
        stream: Option<u64>,
    ) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                match stream {
                    None => check(sys::cuMemcpyDtoH_v2(dst, src, bytes), "cuMemcpyDtoH"),
                    Some(s) => check(
                        sys::cuMemcpyDtoHAsync_v2(dst, src, bytes, s as sys::CUstream),
                        "cuMemcpyDtoHAsync",
                    ),
                }
            }
            Driver::Emulated(e) => e.copy(dst as u64, src, bytes, stream),
        }
    }

    /// Device to device.
    ///
    /// # Safety
    /// Both ranges are allocated device memory.
    pub unsafe fn dtod(&self, dst: u64, src: u64, bytes: usize, stream: Option<u64>) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                match stream {
                    None => check(sys::cuMemcpyDtoD_v2(dst, src, bytes), "cuMemcpyDtoD"),
                    Some(s) => check(
                        sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, s as sys::CUstream),
                        "cuMemcpyDtoDAsync",
                    ),
                }
            }
            Driver::Emulated(e) => e.copy(dst, src, bytes, stream),
        }
    }

    /// Sets `bytes` bytes at `dst` to `byte`, synchronously.
    ///
    /// # Safety
    /// The range is allocated device memory.
    pub unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                check(sys::cuMemsetD8_v2(dst, byte, bytes), "cuMemsetD8")
            }
            Driver::Emulated(e) => e.memset(dst, byte, bytes),
        }
    }

    /// Launches kernel `k` over `grid` blocks of `THREADS` threads with its single by-value
    /// parameter `params`, on `stream`.
    ///
    /// # Safety
    /// `P` is the kernel's parameter struct (its C layout, abi.rs), and every address in it
    /// is valid for what the kernel does with it.
    pub unsafe fn launch<P>(&self, k: &Kernel, grid: u32, params: &P, stream: u64) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                let mut args = [params as *const P as *mut c_void];
                check(
                    sys::cuLaunchKernel(
                        k.func,
                        grid,
                        1,
                        1,
                        super::abi::THREADS,
                        1,
                        1,
                        0,
                        stream as sys::CUstream,
                        args.as_mut_ptr(),
                        std::ptr::null_mut(),
                    ),
                    "cuLaunchKernel",
                )
            }
            Driver::Emulated(e) => {
                let bytes = std::slice::from_raw_parts(
                    params as *const P as *const u8,
                    std::mem::size_of::<P>(),
                );
                e.launch(k.name, grid, bytes, stream)
            }
        }
    }

    pub fn stream_create(&self) -> Result<u64> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                let mut s = std::ptr::null_mut();
                // SAFETY: the context is current; flags 0 = CU_STREAM_DEFAULT.
                check(unsafe { sys::cuStreamCreate(&mut s, 0) }, "cuStreamCreate")?;
                Ok(s as u64)
            }
            Driver::Emulated(e) => e.stream_create(),
        }
    }

    pub fn stream_destroy(&self, stream: u64) {
        if let Driver::Cuda { .. } = &self.driver {
            if self.bind().is_ok() {
                // SAFETY: a stream created by `stream_create`, destroyed once.
                unsafe { sys::cuStreamDestroy_v2(stream as sys::CUstream) };
            }
        }
    }

    pub fn stream_sync(&self, stream: u64) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                // SAFETY: a valid stream of this context.
                check(
                    unsafe { sys::cuStreamSynchronize(stream as sys::CUstream) },
                    "cuStreamSynchronize",
                )
            }
            Driver::Emulated(e) => e.stream_sync(stream),
        }
    }

    pub fn begin_capture(&self, stream: u64) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                // SAFETY: a valid stream of this context.
                check(
                    unsafe {
                        sys::cuStreamBeginCapture_v2(
                            stream as sys::CUstream,
                            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
                        )
                    },
                    "cuStreamBeginCapture",
                )
            }
            Driver::Emulated(e) => e.begin_capture(stream),
        }
    }

    /// Ends a capture and instantiates its graph.
    pub fn end_capture(&self, stream: u64) -> Result<GraphHandles> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                let mut graph = std::ptr::null_mut();
                let mut exec = std::ptr::null_mut();
                // SAFETY: the stream is capturing; the graph is instantiated once.
                unsafe {
                    check(
                        sys::cuStreamEndCapture(stream as sys::CUstream, &mut graph),
                        "cuStreamEndCapture",
                    )?;
                    if let Err(e) = check(
                        sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0),
                        "cuGraphInstantiate",
                    ) {
                        sys::cuGraphDestroy(graph);
                        return Err(e);
                    }
                }
                Ok((graph as u64, exec as u64))
            }
            Driver::Emulated(e) => Ok((e.end_capture(stream)?, 0)),
        }
    }

    pub fn graph_launch(&self, g: GraphHandles, stream: u64) -> Result<()> {
        match &self.driver {
            Driver::Cuda { .. } => {
                self.bind()?;
                // SAFETY: a valid executable graph; the stream belongs to the same context.
                check(
                    unsafe { sys::cuGraphLaunch(g.1 as sys::CUgraphExec, stream as sys::CUstream) },
                    "cuGraphLaunch",
                )
            }
            Driver::Emulated(e) => e.graph_launch(g.0, stream),
        }
    }

    pub fn graph_destroy(&self, g: GraphHandles) {
        match &self.driver {
            Driver::Cuda { .. } => {
                if self.bind().is_ok() {
                    // SAFETY: created by `end_capture`, destroyed once.
                    unsafe {
                        sys::cuGraphExecDestroy(g.1 as sys::CUgraphExec);
                        sys::cuGraphDestroy(g.0 as sys::CUgraph);
                    }
                }
            }
            Driver::Emulated(e) => e.graph_destroy(g.0),
        }
    }
}
