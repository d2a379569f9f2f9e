//! Low-rank directions (spec §7): tensor shapes, the factors, and the perturbation the
//! caller's forward pass applies.

use super::*;

/// Gives tensor `tensor_index` (0-based, in registration order) a row-major 2-D shape
/// `rows × cols` (`rows · cols` must equal its `numel`). Under `HYZO_DIRECTION_LOWRANK`
/// the tensor then takes the low-rank direction `Z = A Bᵀ / sqrt(r_t)`,
/// `r_t = min(rank, rows, cols)`, which no pass writes during a step: the caller's forward
/// adds `c (x B) Aᵀ / sqrt(r_t)` to a linear layer's output (`hyzo_zo_forward_perturbation`,
/// `hyzo_optimizer_lowrank_factors`), and the update pass writes the tensor once. Other
/// direction kinds ignore shapes. Only before the optimizer's state is allocated (as
/// `hyzo_optimizer_add_tensor`).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_shape(
    opt: *mut hyzo_optimizer,
    tensor_index: u64,
    rows: u64,
    cols: u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_shape", opt, |o| {
        // An index beyond usize is beyond the tensors too: the shard names it out of range.
        let index = usize::try_from(tensor_index).unwrap_or(usize::MAX);
        o.inner.set_shape(index, rows, cols)
    })
}

/// Writes to `*len` the floats of one direction's low-rank factors: `(rows + cols) · r_t`
/// summed over the tensors with a shape, 0 without low-rank directions.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_lowrank_factors_len(
    opt: *const hyzo_optimizer,
    len: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_lowrank_factors_len", opt as *mut _, |o| {
        let len = out_arg(len, "len")?;
        *len = o.inner.lowrank_factors_len();
        Ok(())
    })
}

/// Writes the low-rank factors of direction `direction` (below `num_directions`) of the
/// current step (the step in progress, or else the next one) to `out`, `len` f32
/// (`hyzo_optimizer_lowrank_factors_len`) in the optimizer's memory (host for a CPU
/// optimizer, device memory for a CUDA one, written in order on its stream without
/// synchronizing): for each tensor with a shape, in registration order, `A` (rows × r_t)
/// then `B` (cols × r_t), row-major.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` valid for writes of `len` f32 in the
/// optimizer's memory.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_lowrank_factors(
    opt: *mut hyzo_optimizer,
    direction: u32,
    out: *mut f32,
    len: u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_lowrank_factors", opt, |o| {
        o.inner.lowrank_factors_raw(direction, out as u64, len)
    })
}

/// The perturbation `c Z_d` the next forward pass must add for the tensors with a low-rank
/// direction: writes `d` to `*direction` and `c` to `*coeff` (`c = 0` when that forward
/// carries none: no step in progress, or the one-sided `L_0`). Two-sided steps give `+eps`
/// for `L⁺_d` and `−eps` for `L⁻_d`; one-sided ones `+eps` for `L_d`.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `direction` and `coeff` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_forward_perturbation(
    opt: *const hyzo_optimizer,
    direction: *mut u32,
    coeff: *mut f32,
) -> hyzo_status {
    with_opt("hyzo_zo_forward_perturbation", opt as *mut _, |o| {
        let direction = out_arg(direction, "direction")?;
        let coeff = out_arg(coeff, "coeff")?;
        let t = o.inner.forward_perturbation();
        *direction = t.map_or(0, |t| t.direction);
        *coeff = t.map_or(0.0, |t| t.coeff);
        Ok(())
    })
}
