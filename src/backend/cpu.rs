//! The CPU backend: the reference every other backend is checked against.
//!
//! Each pass is elementwise, so tensors are cut into fixed chunks processed in parallel by
//! rayon; the chunking only decides who computes an element, never what it is, and results
//! are identical for any thread count.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::{
    is_lowrank, Backend, DeviceQueue, Generator, PerturbPass, StateLayout, StateSink, StateSource,
    Term, UpdatePass,
};
use crate::config::StateSet;
use crate::direction::{DirectionId, LowRankShape, STOCHASTIC_ROUNDING_DIRECTION};
use crate::dtype::{DType, Element, Precision};
use crate::error::{invalid, Error, Result};
use crate::fill::{fill, fill_bits, lowrank_factors};
use crate::rules;
use crate::shard::{ParamShard, TensorSpec};

/// The most threads a CPU backend may start: beyond any machine's cores, and a bound on
/// what a mistyped count can spawn.
pub const MAX_THREADS: usize = 1024;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;
/// Elements generated at a time inside a chunk (buffers stay in L1/L2).
const SUB: usize = 1024;
/// Bytes converted at a time when the state is saved or loaded.
const IO_CHUNK: usize = 1 << 16;

/// The moments of one rule for one tensor (empty when the rule keeps none).
#[derive(Default, Debug, Clone)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Optimizer state of one tensor: the moments of each [`StateSet`], and `lo`.
#[derive(Default, Debug, Clone)]
struct TensorState {
    sets: [Moments; 2],
    lo: Vec<bf16>,
}

/// Runs passes on host memory with a rayon pool.
pub struct CpuBackend {
    pool: Option<rayon::ThreadPool>,
    /// The pool's threads, joined when the backend is dropped: rayon detaches its workers,
    /// which would outlive the optimizer (a C program destroying it and exiting would leave
    /// them running, and valgrind reports their memory).
    workers: Vec<std::thread::JoinHandle<()>>,
    state: Vec<TensorState>,
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        // Dropping the pool tells its idle workers to exit; then wait for them.
        drop(self.pool.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads())
            .finish()
    }
}

impl CpuBackend {
    /// A backend on `threads` threads (at most [`MAX_THREADS`]); 0 uses rayon's global pool
    /// (all cores).
    pub fn new(threads: usize) -> Result<Self> {
        if threads > MAX_THREADS {
            return invalid(format!(
                "threads: {threads} exceeds the maximum of {MAX_THREADS}"
            ));
        }
        let mut workers = Vec::new();
        let pool = if threads == 0 {
            None
        } else {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .spawn_handler(|thread| {
                        let mut b = std::thread::Builder::new();
                        if let Some(name) = thread.name() {
                            b = b.name(name.to_owned());
                        }
                        if let Some(size) = thread.stack_size() {
                            b = b.stack_size(size);
                        }
                        workers.push(b.spawn(|| thread.run())?);
                        Ok(())
                    })
                    .build()
                    .map_err(|e| Error::Internal(format!("thread pool: {e}")))?,
            )
        };
        Ok(Self {
            pool,
            workers,
            state: Vec::new(),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// One chunk of one tensor, with raw access to its memory; chunks never overlap.
#[derive(Clone, Copy)]
struct Work {
    tensor: usize,
    start: usize,
    len: usize,
}

fn work_items(tensors: &[TensorSpec]) -> Vec<Work> {
    let mut items = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let n = t.numel as usize;
        let mut s = 0;
        while s < n {
            let len = CHUNK.min(n - s);
            items.push(Work {
                tensor: i,
                start: s,
                len,
            });
            s += len;
        }
    }
    items
}

/// Raw pointers of a chunk's parameters, gradient and state, valid for `len` elements.
struct ChunkMem {
    tensor: usize,
    /// Local index of the chunk's first element in its tensor.
    local: usize,
    data: *mut u8,
    dtype: DType,
    grad: *const u8,
    grad_dtype: DType,
    m: *mut f32,
    v: *mut f32,
    lo: *mut bf16,
    global: u64,
    len: usize,
}

impl ChunkMem {
    /// The chunk `w` with the moments of `set`.
    ///
    /// # Safety
    /// `w` must lie inside tensor `w.tensor`, whose memory and state are live.
    unsafe fn new(t: &TensorSpec, s: &mut TensorState, set: StateSet, w: Work) -> Self {
        let at = |v: &mut Vec<f32>| {
            if v.is_empty() {
                std::ptr::null_mut()
            } else {
                v.as_mut_ptr().add(w.start)
            }
        };
        Self {
            tensor: w.tensor,
            local: w.start,
            data: (t.data as *mut u8).add(w.start * t.dtype.size()),
            dtype: t.dtype,
            grad: if t.grad == 0 {
                std::ptr::null()
            } else {
                (t.grad as *const u8).add(w.start * t.grad_dtype.size())
            },
            grad_dtype: t.grad_dtype,
            m: at(&mut s.sets[set as usize].m),
            v: at(&mut s.sets[set as usize].v),
            lo: if s.lo.is_empty() {
                std::ptr::null_mut()
            } else {
                s.lo.as_mut_ptr().add(w.start)
            },
            global: t.offset + w.start as u64,
            len: w.len,
        }
    }
}

// SAFETY: chunks are disjoint ranges of live buffers; each is touched by one thread.
unsafe impl Send for ChunkMem {}
// SAFETY: as above; a shared reference is only used by the one thread processing the chunk.
unsafe impl Sync for ChunkMem {}

/// Reads `n` parameters at `k` (plus `lo` in the compensated mode) as f32.
///
/// # Safety
/// `c` must be valid for `k + n` elements.
unsafe fn load<T: Element>(c: &ChunkMem, k: usize, out: &mut [f32], compensated: bool) {
    T::load_slice(
        std::slice::from_raw_parts((c.data as *const T).add(k), out.len()),
        out,
    );
    if compensated && !c.lo.is_null() {
        for (i, o) in out.iter_mut().enumerate() {
            *o += (*c.lo.add(k + i)).to_f32();
        }
    }
}

/// Reads `n` gradient entries at `k` as f32.
unsafe fn load_grad(c: &ChunkMem, k: usize, out: &mut [f32]) {
    unsafe fn widen<G: Element>(p: *const u8, k: usize, out: &mut [f32]) {
        G::load_slice(
            std::slice::from_raw_parts((p as *const G).add(k), out.len()),
            out,
        );
    }
    match c.grad_dtype {
        DType::F32 => widen::<f32>(c.grad, k, out),
        DType::F16 => widen::<f16>(c.grad, k, out),
        DType::BF16 => widen::<bf16>(c.grad, k, out),
    }
}

/// Writes `x` back at `k`: nearest, `hi + lo` (compensated), or stochastic with `bits`.
unsafe fn store<T: Element>(
    c: &ChunkMem,
    k: usize,
    x: &[f32],
    precision: Precision,
    bits: Option<&[u32]>,
) {
    let p = (c.data as *mut T).add(k);
    match (precision, bits) {
        (Precision::Stochastic, Some(r)) => {
            for (i, v) in x.iter().enumerate() {
                *p.add(i) = T::from_f32_stochastic(*v, r[i]);
            }
        }
        (Precision::Compensated, _) if !c.lo.is_null() => {
            for (i, v) in x.iter().enumerate() {
                let hi = T::from_f32(*v);
                *p.add(i) = hi;
                *c.lo.add(k + i) = bf16::from_f32(*v - hi.to_f32());
            }
        }
        _ => T::store_slice(x, std::slice::from_raw_parts_mut(p, x.len())),
    }
}

/// `acc += coeff * z` for each term, in order.
fn add_terms(gen: Generator, terms: &[Term], global: u64, acc: &mut [f32], z: &mut [f32]) {
    for t in terms {
        fill(
            gen.kind,
            DirectionId::new(gen.seed, gen.step, t.direction),
            global,
            z,
        );
        for (a, zi) in acc.iter_mut().zip(z.iter()) {
            *a += t.coeff * *zi;
        }
    }
}

/// What a perturbation pass makes of the chunk, block by block: `visit(k, x)` gets the
/// values of elements `k..k + x.len()` once the terms are added (f32, before rounding); the
/// walk stops, returning `false`, when `visit` does.
unsafe fn perturbed<T: Element>(
    c: &ChunkMem,
    pass: &PerturbPass,
    mut visit: impl FnMut(usize, &[f32]) -> bool,
) -> bool {
    let compensated = pass.precision == Precision::Compensated;
    let mut x = [0f32; SUB];
    let mut z = [0f32; SUB];
    let mut k = 0;
    while k < c.len {
        let n = SUB.min(c.len - k);
        load::<T>(c, k, &mut x[..n], compensated);
        add_terms(
            pass.gen,
            pass.terms,
            c.global + k as u64,
            &mut x[..n],
            &mut z[..n],
        );
        if !visit(k, &x[..n]) {
            return false;
        }
        k += n;
    }
    true
}

unsafe fn perturb_chunk<T: Element>(c: &ChunkMem, pass: &PerturbPass) {
    perturbed::<T>(c, pass, |k, x| {
        store::<T>(c, k, x, pass.precision, None);
        true
    });
}

/// The factors of the zeroth-order terms of an update on one low-rank tensor (spec §7), in
/// the order of the terms.
struct LowRankTerms {
    shape: LowRankShape,
    /// `A` of each term (`rows x rank`, row-major).
    a: Vec<Vec<f32>>,
    /// `Bᵀ` of each term (`rank x cols`, row-major): a row of `A Bᵀ` is then `rank` axpys
    /// over contiguous rows of `Bᵀ` (vectorized), where `B` itself would need a strided
    /// gather per entry.
    bt: Vec<Vec<f32>>,
}

impl LowRankTerms {
    fn new(gen: Generator, offset: u64, shape: LowRankShape, terms: &[Term]) -> Result<Self> {
        let n = usize::try_from(shape.factors_len())
            .map_err(|_| Error::OutOfMemory("low-rank factors".into()))?;
        let (r, cols) = (shape.rank as usize, shape.cols as usize);
        let a_len = shape.a_len() as usize;
        let mut a = Vec::with_capacity(terms.len());
        let mut bt = Vec::with_capacity(terms.len());
        let mut f = zeroed(n, 0f32, "low-rank factors")?;
        for t in terms {
            let id = DirectionId::new(gen.seed, gen.step, t.direction);
            lowrank_factors(id, offset, shape, &mut f);
            let b = &f[a_len..];
            let mut t_b = zeroed(n - a_len, 0f32, "low-rank factors")?;
            for j in 0..cols {
                for p in 0..r {
                    t_b[p * cols + j] = b[j * r + p];
                }
            }
            a.push(f[..a_len].to_vec());
            bt.push(t_b);
        }
        Ok(Self { shape, a, bt })
    }

    /// `z[e]` = entry `local + e` of the direction of term `k`: bit for bit
    /// [`LowRankShape::entry`] (the same f32 sum over `p` in order, from `0`, then the scale),
    /// computed a row segment at a time.
    fn fill(&self, k: usize, local: usize, z: &mut [f32]) {
        let (r, cols) = (self.shape.rank as usize, self.shape.cols as usize);
        let (a, bt) = (&self.a[k], &self.bt[k]);
        let scale = self.shape.scale();
        let (mut e, mut l) = (0, local);
        while e < z.len() {
            let (i, j0) = (l / cols, l % cols);
            let n = (cols - j0).min(z.len() - e);
            let out = &mut z[e..e + n];
            out.fill(0.0);
            for (p, &s) in a[i * r..(i + 1) * r].iter().enumerate() {
                let row = &bt[p * cols + j0..p * cols + j0 + n];
                for (o, &b) in out.iter_mut().zip(row) {
                    *o += s * b;
                }
            }
            for o in out.iter_mut() {
                *o *= scale;
            }
            e += n;
            l += n;
        }
    }
}

unsafe fn update_chunk<T: Element>(
    c: &ChunkMem,
    pass: &UpdatePass,
    lowrank: Option<&LowRankTerms>,
) {
    // One monomorphised loop per rule: no dispatch per element.
    match pass.rule.rule {
        0 => update_chunk_rule::<T, 0>(c, pass, lowrank),
        1 => update_chunk_rule::<T, 1>(c, pass, lowrank),
        2 => update_chunk_rule::<T, 2>(c, pass, lowrank),
        3 => update_chunk_rule::<T, 3>(c, pass, lowrank),
        4 => update_chunk_rule::<T, 4>(c, pass, lowrank),
        _ => update_chunk_rule::<T, 5>(c, pass, lowrank),
    }
}

unsafe fn update_chunk_rule<T: Element, const RULE: u32>(
    c: &ChunkMem,
    pass: &UpdatePass,
    lowrank: Option<&LowRankTerms>,
) {
    let compensated = pass.precision == Precision::Compensated;
    let gen = pass.gen;
    let mut x = [0f32; SUB];
    let mut g = [0f32; SUB];
    let mut z = [0f32; SUB];
    let mut z2 = [0f32; SUB];
    let mut grad = [0f32; SUB];
    let mut m = [0f32; SUB];
    let mut v = [0f32; SUB];
    let mut bits = [0u32; SUB];
    let mut k = 0;
    while k < c.len {
        let n = SUB.min(c.len - k);
        let global = c.global + k as u64;
        load::<T>(c, k, &mut x[..n], compensated);
        g[..n].fill(0.0);
        match lowrank {
            Some(lr) => {
                // Never perturbed, so there is nothing to restore (spec §7).
                for (i, t) in pass.zo.iter().enumerate() {
                    lr.fill(i, c.local + k, &mut z[..n]);
                    for (a, zi) in g[..n].iter_mut().zip(&z[..n]) {
                        *a += t.coeff * *zi;
                    }
                }
            }
            None => {
                if let Some(r) = pass.restore {
                    add_terms(gen, &[r], global, &mut x[..n], &mut z[..n]);
                }
                for t in pass.zo {
                    // The restored direction is also an estimate term: reuse it.
                    if pass.restore.is_some_and(|r| r.direction == t.direction) {
                        for (a, zi) in g[..n].iter_mut().zip(&z[..n]) {
                            *a += t.coeff * *zi;
                        }
                    } else {
                        let term = std::slice::from_ref(t);
                        add_terms(gen, term, global, &mut g[..n], &mut z2[..n]);
                    }
                }
            }
        }
        if let Some(alpha) = pass.grad_weight {
            load_grad(c, k, &mut grad[..n]);
            for i in 0..n {
                g[i] = alpha * grad[i] + (1.0 - alpha) * g[i];
            }
        }
        if !c.m.is_null() {
            m[..n].copy_from_slice(std::slice::from_raw_parts(c.m.add(k), n));
        }
        if !c.v.is_null() {
            v[..n].copy_from_slice(std::slice::from_raw_parts(c.v.add(k), n));
        }
        for i in 0..n {
            x[i] = rules::apply_rule::<RULE>(&pass.rule, x[i], g[i], &mut m[i], &mut v[i]);
        }
        if !c.m.is_null() {
            std::slice::from_raw_parts_mut(c.m.add(k), n).copy_from_slice(&m[..n]);
        }
        if !c.v.is_null() {
            std::slice::from_raw_parts_mut(c.v.add(k), n).copy_from_slice(&v[..n]);
        }
        let sr = if pass.precision == Precision::Stochastic {
            let id = DirectionId::new(gen.seed, gen.step, STOCHASTIC_ROUNDING_DIRECTION);
            fill_bits(id, global, &mut bits[..n]);
            Some(&bits[..n])
        } else {
            None
        };
        store::<T>(c, k, &x[..n], pass.precision, sr);
        k += n;
    }
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
        }
    };
}

/// Whether every gradient entry of the chunk is finite.
unsafe fn grads_finite_chunk(c: &ChunkMem) -> bool {
    let mut g = [0f32; SUB];
    let mut k = 0;
    while k < c.len {
        let n = SUB.min(c.len - k);
        load_grad(c, k, &mut g[..n]);
        if !g[..n].iter().all(|v| v.is_finite()) {
            return false;
        }
        k += n;
    }
    true
}

/// Whether `perturb_chunk` would write a non-finite value over a finite one.
unsafe fn perturb_overflows_chunk<T: Element>(c: &ChunkMem, pass: &PerturbPass) -> bool {
    let finite = |v: &f32| T::from_f32(*v).to_f32().is_finite();
    let mut old = [0f32; SUB];
    !perturbed::<T>(c, pass, |k, x| {
        if x.iter().all(finite) {
            return true;
        }
        // Rare: which of the non-finite values were finite before?
        let old = &mut old[..x.len()];
        load::<T>(c, k, old, pass.precision == Precision::Compensated);
        !old.iter().zip(x).any(|(b, v)| b.is_finite() && !finite(v))
    })
}

impl CpuBackend {
    /// The chunks of every tensor of `shard`, with the moments of `set`.
    fn chunks(&mut self, shard: &ParamShard, set: StateSet) -> Result<Vec<ChunkMem>> {
        let tensors = shard.tensors();
        if self.state.len() != tensors.len() {
            return Err(Error::Internal("state not allocated for this shard".into()));
        }
        let items = work_items(tensors);
        let mut chunks = Vec::with_capacity(items.len());
        for w in &items {
            // SAFETY: work items lie inside their tensors; state was sized to each tensor.
            chunks.push(unsafe {
                ChunkMem::new(&tensors[w.tensor], &mut self.state[w.tensor], set, *w)
            });
        }
        Ok(chunks)
    }

    fn for_each_chunk(
        &mut self,
        shard: &ParamShard,
        set: StateSet,
        f: impl Fn(&ChunkMem) + Sync,
    ) -> Result<()> {
        let chunks = self.chunks(shard, set)?;
        self.run(|| chunks.par_iter().for_each(&f));
        Ok(())
    }

    /// Whether `f` holds for some chunk (reading only).
    fn any_chunk(
        &mut self,
        shard: &ParamShard,
        f: impl Fn(&ChunkMem) -> bool + Sync,
    ) -> Result<bool> {
        let chunks = self.chunks(shard, StateSet::Main)?;
        Ok(self.run(|| chunks.par_iter().any(&f)))
    }
}

/// `n` copies of `zero`, or an out-of-memory error instead of an abort.
fn zeroed<T: Clone>(n: usize, zero: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::OutOfMemory(format!("{what} of {n} elements")))?;
    v.resize(n, zero);
    Ok(v)
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn allocate_state(&mut self, shard: &ParamShard, layout: StateLayout) -> Result<()> {
        let mut state = Vec::new();
        state
            .try_reserve_exact(shard.len())
            .map_err(|_| Error::OutOfMemory(format!("state of {} tensors", shard.len())))?;
        for t in shard.tensors() {
            let n = usize::try_from(t.numel)
                .map_err(|_| Error::OutOfMemory(format!("{} elements", t.numel)))?;
            let mut s = TensorState::default();
            for (set, buffers) in [layout.main_buffers, layout.fo_buffers]
                .into_iter()
                .enumerate()
            {
                if buffers >= 1 {
                    s.sets[set].m = zeroed(n, 0f32, "momentum buffer")?;
                }
                if buffers >= 2 {
                    s.sets[set].v = zeroed(n, 0f32, "second-moment buffer")?;
                }
            }
            if layout.residual && t.dtype != DType::F32 {
                s.lo = zeroed(n, bf16::ZERO, "compensation buffer")?;
            }
            state.push(s);
        }
        self.state = state;
        Ok(())
    }

    unsafe fn lowrank_factors(
        &mut self,
        shard: &ParamShard,
        gen: Generator,
        direction: u32,
        out: u64,
        len: u64,
    ) -> Result<()> {
        let out = std::slice::from_raw_parts_mut(out as *mut f32, len as usize);
        let id = DirectionId::new(gen.seed, gen.step, direction);
        let mut at = 0usize;
        for (i, shape) in shard.lowrank_tensors() {
            let n = shape.factors_len() as usize;
            lowrank_factors(id, shard.tensors()[i].offset, shape, &mut out[at..at + n]);
            at += n;
        }
        Ok(())
    }

    fn perturb(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<()> {
        // Low-rank tensors are perturbed by the forward pass (spec §7).
        let gen = pass.gen;
        // SAFETY: each chunk is a disjoint, live range (see for_each_chunk).
        self.for_each_chunk(shard, StateSet::Main, |c| unsafe {
            if !is_lowrank(&gen, shard, c.tensor) {
                by_dtype!(c.dtype, perturb_chunk, c, pass)
            }
        })
    }

    fn update(&mut self, shard: &ParamShard, pass: &UpdatePass) -> Result<()> {
        if pass.device_losses.is_some() {
            return invalid("the CPU backend takes losses from the host only");
        }
        crate::backend::check_update_tensors(shard, pass)?;
        let selected = |i: usize| pass.tensors.map_or(true, |m| m[i]);
        let mut lowrank = Vec::new();
        for (i, t) in shard.tensors().iter().enumerate() {
            lowrank.push(match shard.lowrank(i) {
                Some(shape) if is_lowrank(&pass.gen, shard, i) && selected(i) => {
                    Some(LowRankTerms::new(pass.gen, t.offset, shape, pass.zo)?)
                }
                _ => None,
            });
        }
        // SAFETY: as in perturb.
        self.for_each_chunk(shard, pass.state, |c| unsafe {
            if selected(c.tensor) {
                by_dtype!(c.dtype, update_chunk, c, pass, lowrank[c.tensor].as_ref())
            }
        })
    }

    fn grads_finite(
        &mut self,
        shard: &ParamShard,
        tensors: Option<&[bool]>,
    ) -> Result<Option<bool>> {
        if tensors.is_some_and(|m| m.len() != shard.len()) {
            return invalid(format!("tensors: flags for {} tensors", shard.len()));
        }
        let read = |i: usize| tensors.map_or(true, |m| m[i]);
        // SAFETY: as in perturb; a chunk without a gradient is not read.
        let bad = self.any_chunk(shard, |c| unsafe {
            read(c.tensor) && !c.grad.is_null() && !grads_finite_chunk(c)
        })?;
        Ok(Some(!bad))
    }

    fn perturb_stays_finite(&mut self, shard: &ParamShard, pass: &PerturbPass) -> Result<bool> {
        let gen = pass.gen;
        // SAFETY: as in perturb, reading only.
        let bad = self.any_chunk(shard, |c| unsafe {
            !is_lowrank(&gen, shard, c.tensor)
                && by_dtype!(c.dtype, perturb_overflows_chunk, c, pass)
        })?;
        Ok(!bad)
    }

    fn sq_norm(&mut self, shard: &ParamShard, gen: Generator, direction: u32) -> Result<f64> {
        let items = work_items(shard.tensors());
        let tensors = shard.tensors();
        let id = DirectionId::new(gen.seed, gen.step, direction);
        let partials: Vec<f64> = self.run(|| {
            items
                .par_iter()
                .map(|w| {
                    let mut z = [0f32; SUB];
                    let mut sum = 0f64;
                    let mut k = 0;
                    while k < w.len {
                        let n = SUB.min(w.len - k);
                        let global = tensors[w.tensor].offset + (w.start + k) as u64;
                        fill(gen.kind, id, global, &mut z[..n]);
                        sum += z[..n]
                            .iter()
                            .map(|v| (*v as f64) * (*v as f64))
                            .sum::<f64>();
                        k += n;
                    }
                    sum
                })
                .collect()
        });
        Ok(partials.iter().sum())
    }

    fn save_state(&mut self, sink: &mut StateSink) -> Result<()> {
        let mut scratch = Vec::with_capacity(IO_CHUNK);
        for s in &self.state {
            for v in s.sets.iter().flat_map(|set| [&set.m, &set.v]) {
                for part in v.chunks(IO_CHUNK / 4) {
                    scratch.clear();
                    scratch.extend(part.iter().flat_map(|x| x.to_le_bytes()));
                    sink(&scratch)?;
                }
            }
            for part in s.lo.chunks(IO_CHUNK / 2) {
                scratch.clear();
                scratch.extend(part.iter().flat_map(|x| x.to_bits().to_le_bytes()));
                sink(&scratch)?;
            }
        }
        Ok(())
    }

    fn load_state(&mut self, source: &mut StateSource) -> Result<()> {
        let mut scratch = vec![0u8; IO_CHUNK];
        for s in &mut self.state {
            for v in s.sets.iter_mut().flat_map(|set| [&mut set.m, &mut set.v]) {
                for part in v.chunks_mut(IO_CHUNK / 4) {
                    let bytes = &mut scratch[..4 * part.len()];
                    source(bytes)?;
                    for (x, b) in part.iter_mut().zip(bytes.chunks_exact(4)) {
                        *x = f32::from_le_bytes(b.try_into().unwrap());
                    }
                }
            }
            for part in s.lo.chunks_mut(IO_CHUNK / 2) {
                let bytes = &mut scratch[..2 * part.len()];
                source(bytes)?;
                for (x, b) in part.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = bf16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
            }
        }
        Ok(())
    }

    fn device(&mut self) -> Option<&mut dyn DeviceQueue> {
        None
    }
}
