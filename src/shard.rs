//! The parameters one optimizer holds: a set of tensors, each a slice of the model's flat
//! parameter vector at a global offset, with an optional gradient.

use std::marker::PhantomData;

use half::{bf16, f16};

use crate::dtype::{DType, Element};
use crate::error::{invalid, Result};

/// Where a shard's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Host memory.
    Host,
    /// Memory of the CUDA device with this ordinal.
    Cuda(i32),
}

/// One registered tensor: an address (host or device), its layout in the global index space,
/// and its gradient. Plain data; [`ParamShard`] validates it and keeps the borrow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Address of the first element.
    pub data: u64,
    /// Element type of the parameters.
    pub dtype: DType,
    /// Number of elements.
    pub numel: u64,
    /// Global index of the first element in the model's flat parameter vector.
    pub offset: u64,
    /// Address of the gradient (same length), 0 when there is none.
    pub grad: u64,
    /// Element type of the gradient.
    pub grad_dtype: DType,
}

impl TensorSpec {
    /// The global index range `[offset, offset + numel)`.
    pub fn global_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.numel
    }
}

/// A read-only view of a host tensor, in its stored type.
#[derive(Clone, Copy, Debug)]
pub enum TensorView<'s> {
    /// f32 values.
    F32(&'s [f32]),
    /// f16 values.
    F16(&'s [f16]),
    /// bf16 values.
    BF16(&'s [bf16]),
}

impl TensorView<'_> {
    /// The values widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            TensorView::F32(s) => s.to_vec(),
            TensorView::F16(s) => s.iter().map(|x| x.to_f32()).collect(),
            TensorView::BF16(s) => s.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// The tensors an optimizer updates. The lifetime `'a` keeps the borrowed slices alive and
/// unaliased for as long as the shard (and the optimizer that owns it) lives.
///
/// Validation on every `add`: no empty tensor, `offset + numel` fits in `u64`, no two tensors
/// share a global index or a byte of memory, pointers aligned for their types, a gradient has
/// the tensor's length.
#[derive(Debug)]
pub struct ParamShard<'a> {
    tensors: Vec<TensorSpec>,
    /// The 2-D shape `(rows, cols)` of each tensor that has one (spec §7).
    shapes: Vec<Option<(u64, u64)>>,
    /// The rank of low-rank directions (spec §7), 0 when the optimizer uses none: then no
    /// tensor has a low-rank direction, shape or not.
    rank: u32,
    location: Location,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl Default for ParamShard<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> ParamShard<'a> {
    /// An empty shard in host memory.
    pub fn new() -> Self {
        Self::with_location(Location::Host)
    }

    /// An empty shard whose tensors live at `location`.
    pub fn with_location(location: Location) -> Self {
        Self {
            tensors: Vec::new(),
            shapes: Vec::new(),
            rank: 0,
            location,
            _borrow: PhantomData,
        }
    }

    /// Where the tensors live.
    pub fn location(&self) -> Location {
        self.location
    }

    /// Adds a host tensor at global offset `offset`; returns its index.
    pub fn add<T: Element>(&mut self, data: &'a mut [T], offset: u64) -> Result<usize> {
        self.require_host()?;
        // SAFETY: the slice is borrowed mutably for 'a.
        unsafe {
            self.add_raw(TensorSpec {
                data: data.as_mut_ptr() as u64,
                dtype: T::DTYPE,
                numel: data.len() as u64,
                offset,
                grad: 0,
                grad_dtype: DType::F32,
            })
        }
    }

    /// Adds a host tensor with its gradient buffer; returns its index.
    pub fn add_with_grad<T: Element, G: Element>(
        &mut self,
        data: &'a mut [T],
        grad: &'a mut [G],
        offset: u64,
    ) -> Result<usize> {
        self.require_host()?;
        if grad.len() != data.len() {
            return invalid(format!(
                "grad: length {} differs from the tensor's {}",
                grad.len(),
                data.len()
            ));
        }
        // SAFETY: both slices are borrowed mutably for 'a.
        unsafe {
            self.add_raw(TensorSpec {
                data: data.as_mut_ptr() as u64,
                dtype: T::DTYPE,
                numel: data.len() as u64,
                offset,
                grad: grad.as_mut_ptr() as u64,
                grad_dtype: G::DTYPE,
            })
        }
    }

    /// Adds a tensor given by address.
    ///
    /// # Safety
    /// `spec.data` (and `spec.grad` when not 0) must point to `spec.numel` elements of their
    /// types in this shard's [`Location`], valid for reads and writes and not accessed by
    /// anything else while the optimizer runs a pass, for as long as the shard lives.
    pub unsafe fn add_raw(&mut self, spec: TensorSpec) -> Result<usize> {
        validate(&self.tensors, &spec)?;
        self.tensors.push(spec);
        self.shapes.push(None);
        Ok(self.tensors.len() - 1)
    }

    /// Gives tensor `i` the row-major 2-D shape `rows × cols` (`rows · cols = numel`): under
    /// low-rank directions (spec §7) it then gets `Z = A Bᵀ / sqrt(r)`, applied by the
    /// forward pass, instead of a written Gaussian.
    pub fn set_shape(&mut self, i: usize, rows: u64, cols: u64) -> Result<()> {
        let Some(t) = self.tensors.get(i) else {
            return invalid(format!(
                "tensor_index: {i} out of range ({} tensors)",
                self.len()
            ));
        };
        if rows == 0 || cols == 0 || rows.checked_mul(cols) != Some(t.numel) {
            return invalid(format!(
                "rows, cols: {rows} x {cols} is not a shape of tensor {i}'s {} elements",
                t.numel
            ));
        }
        self.shapes[i] = Some((rows, cols));
        Ok(())
    }

    /// The 2-D shape of tensor `i`, if it was given one.
    pub fn shape(&self, i: usize) -> Option<(u64, u64)> {
        self.shapes.get(i).copied().flatten()
    }

    /// Sets the rank of low-rank directions (0: none); the optimizer does, from its
    /// configuration.
    pub(crate) fn set_lowrank_rank(&mut self, rank: u32) {
        self.rank = rank;
    }

    /// The low-rank direction's shape on tensor `i`: `Some` when the optimizer uses
    /// low-rank directions and the tensor has a 2-D shape.
    pub fn lowrank(&self, i: usize) -> Option<crate::direction::LowRankShape> {
        if self.rank == 0 {
            return None;
        }
        self.shape(i)
            .map(|(rows, cols)| crate::direction::LowRankShape::new(rows, cols, self.rank))
    }

    /// The low-rank shapes of the tensors that have one, with their indices, in order: the
    /// order of the factors in [`crate::Optimizer::lowrank_factors`].
    pub fn lowrank_tensors(&self) -> Vec<(usize, crate::direction::LowRankShape)> {
        (0..self.len())
            .filter_map(|i| self.lowrank(i).map(|s| (i, s)))
            .collect()
    }

    /// The registered tensors.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor is registered.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of elements.
    pub fn numel(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel).sum()
    }

    /// Whether every tensor has a gradient.
    pub fn has_grads(&self) -> bool {
        self.tensors.iter().all(|t| t.grad != 0)
    }

    /// The values of host tensor `i`.
    pub fn values(&self, i: usize) -> Result<TensorView<'_>> {
        self.require_host()?;
        let Some(t) = self.tensors.get(i) else {
            return invalid(format!(
                "tensor index {i} out of range ({} tensors)",
                self.len()
            ));
        };
        // SAFETY: add/add_with_grad/add_raw guarantee a live host allocation of numel elements.
        Ok(unsafe { view(t.data, t.dtype, t.numel) })
    }

    /// The gradient of host tensor `i`, for writing before a first-order step.
    pub fn grad_mut(&mut self, i: usize) -> Result<GradMut<'_>> {
        self.require_host()?;
        let Some(t) = self.tensors.get(i) else {
            return invalid(format!(
                "tensor index {i} out of range ({} tensors)",
                self.len()
            ));
        };
        if t.grad == 0 {
            return invalid(format!("tensor {i} has no gradient"));
        }
        let n = t.numel as usize;
        // SAFETY: registered as a mutable borrow of n elements of grad_dtype.
        Ok(unsafe {
            match t.grad_dtype {
                DType::F32 => GradMut::F32(std::slice::from_raw_parts_mut(t.grad as *mut f32, n)),
                DType::F16 => GradMut::F16(std::slice::from_raw_parts_mut(t.grad as *mut f16, n)),
                DType::BF16 => {
                    GradMut::BF16(std::slice::from_raw_parts_mut(t.grad as *mut bf16, n))
                }
            }
        })
    }

    fn require_host(&self) -> Result<()> {
        match self.location {
            Location::Host => Ok(()),
            Location::Cuda(d) => invalid(format!(
                "the shard lives on CUDA device {d}; host access needs a host shard"
            )),
        }
    }
}

/// A writable gradient of a host tensor, in its stored type.
#[derive(Debug)]
pub enum GradMut<'s> {
    /// f32 gradient.
    F32(&'s mut [f32]),
    /// f16 gradient.
    F16(&'s mut [f16]),
    /// bf16 gradient.
    BF16(&'s mut [bf16]),
}

impl GradMut<'_> {
    /// Writes `values` (rounded to nearest in the gradient's type).
    pub fn copy_from_f32(&mut self, values: &[f32]) -> Result<()> {
        let n = match self {
            GradMut::F32(s) => s.len(),
            GradMut::F16(s) => s.len(),
            GradMut::BF16(s) => s.len(),
        };
        if values.len() != n {
            return invalid(format!(
                "gradient: {} values for {} elements",
                values.len(),
                n
            ));
        }
        match self {
            GradMut::F32(s) => s.copy_from_slice(values),
            GradMut::F16(s) => s
                .iter_mut()
                .zip(values)
                .for_each(|(o, v)| *o = f16::from_f32(*v)),
            GradMut::BF16(s) => s
                .iter_mut()
                .zip(values)
                .for_each(|(o, v)| *o = bf16::from_f32(*v)),
        }
        Ok(())
    }
}

/// # Safety
/// `data` must be a live host allocation of `numel` elements of `dtype`.
pub(crate) unsafe fn view<'s>(data: u64, dtype: DType, numel: u64) -> TensorView<'s> {
    let n = numel as usize;
    match dtype {
        DType::F32 => TensorView::F32(std::slice::from_raw_parts(data as *const f32, n)),
        DType::F16 => TensorView::F16(std::slice::from_raw_parts(data as *const f16, n)),
        DType::BF16 => TensorView::BF16(std::slice::from_raw_parts(data as *const bf16, n)),
    }
}

fn byte_range(addr: u64, numel: u64, dtype: DType) -> Option<std::ops::Range<u64>> {
    let len = numel.checked_mul(dtype.size() as u64)?;
    Some(addr..addr.checked_add(len)?)
}

fn overlaps(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Checks `spec` alone and against the tensors already registered.
pub(crate) fn validate(existing: &[TensorSpec], spec: &TensorSpec) -> Result<()> {
    if spec.data == 0 {
        return invalid("data: null pointer");
    }
    if spec.numel == 0 {
        return invalid("numel: a tensor needs at least one element");
    }
    if spec.offset.checked_add(spec.numel).is_none() {
        return invalid(format!(
            "global_offset: {} + numel {} overflows u64",
            spec.offset, spec.numel
        ));
    }
    let align = spec.dtype.size() as u64;
    if spec.data % align != 0 {
        return invalid(format!(
            "data: address {:#x} is not aligned to {} bytes for {:?}",
            spec.data, align, spec.dtype
        ));
    }
    if spec.grad != 0 && spec.grad % spec.grad_dtype.size() as u64 != 0 {
        return invalid(format!(
            "grad: address {:#x} is not aligned to {} bytes for {:?}",
            spec.grad,
            spec.grad_dtype.size(),
            spec.grad_dtype
        ));
    }
    let Some(bytes) = byte_range(spec.data, spec.numel, spec.dtype) else {
        return invalid("numel: the tensor's byte size overflows the address space");
    };
    let grad_bytes = if spec.grad != 0 {
        let Some(g) = byte_range(spec.grad, spec.numel, spec.grad_dtype) else {
            return invalid("numel: the gradient's byte size overflows the address space");
        };
        if overlaps(&g, &bytes) {
            return invalid("grad: the gradient overlaps the tensor's own memory");
        }
        Some(g)
    } else {
        None
    };
    for (i, t) in existing.iter().enumerate() {
        if overlaps(&t.global_range(), &spec.global_range()) {
            return invalid(format!(
                "global_offset: elements {}..{} overlap tensor {i} ({}..{})",
                spec.offset,
                spec.offset + spec.numel,
                t.offset,
                t.offset + t.numel
            ));
        }
        let mut theirs = vec![byte_range(t.data, t.numel, t.dtype).unwrap()];
        if t.grad != 0 {
            theirs.push(byte_range(t.grad, t.numel, t.grad_dtype).unwrap());
        }
        for r in &theirs {
            if overlaps(r, &bytes) || grad_bytes.as_ref().is_some_and(|g| overlaps(r, g)) {
                return invalid(format!("data: memory overlaps tensor {i}"));
            }
        }
    }
    Ok(())
}
