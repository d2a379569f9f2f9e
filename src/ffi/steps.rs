//! Zeroth- and first-order steps, and what they report.

use super::*;

/// Starts a zeroth-order step: the parameters now hold the first point to evaluate. Then run
/// a forward pass and call `hyzo_zo_feed` with its loss until `*needs_more` is 0:
/// `hyzo_zo_begin(o); do { loss = forward(); hyzo_zo_feed(o, loss, &more); } while (more);`
///
/// Fails with `HYZO_ERR_BAD_STATE` when a step is in progress, when the hybrid schedule
/// calls for a first-order step, when no tensor is registered, or when `hybrid_alpha > 0`
/// and a tensor has no gradient.
/// A perturbation pass that fails leaves the parameters in an unknown state and poisons the
/// optimizer (`hyzo_optimizer_poisoned`).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_begin(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_zo_begin", opt, |o| o.inner.begin())
}

/// `hyzo_zo_begin` for sphere directions over a model split across processes:
/// `sq_norms[d]` is the global `Σ z_d²` of direction `d` (the sum over processes of
/// `hyzo_optimizer_local_sq_norms`); `len` must be `num_directions`, values finite > 0.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `sq_norms` valid for `len` doubles.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_begin_with_sq_norms(
    opt: *mut hyzo_optimizer,
    sq_norms: *const f64,
    len: u32,
) -> hyzo_status {
    with_opt("hyzo_zo_begin_with_sq_norms", opt, |o| {
        out_arg(sq_norms as *mut f64, "sq_norms")?;
        let norms = std::slice::from_raw_parts(sq_norms, len as usize);
        o.inner.begin_with_sq_norms(norms)
    })
}

/// This optimizer's share `Σ z_d²` of each direction of the next step (`len` must be
/// `num_directions`), for `hyzo_zo_begin_with_sq_norms`. Allocates the optimizer state.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` valid for `len` doubles.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_local_sq_norms(
    opt: *mut hyzo_optimizer,
    out: *mut f64,
    len: u32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_local_sq_norms", opt, |o| {
        out_arg(out, "out")?;
        let q = o.inner.config().num_directions;
        if len != q {
            return Err(invalid_arg(format!(
                "len: {len}, expected num_directions = {q}"
            )));
        }
        if o.inner.in_step() {
            return Err(Error::BadState(
                "a zeroth-order step is in progress: its norms are fixed".into(),
            ));
        }
        let norms = o.inner.local_sq_norms()?;
        std::slice::from_raw_parts_mut(out, len as usize).copy_from_slice(&norms);
        Ok(())
    })
}

/// Feeds the loss of the forward pass just run. `*needs_more` becomes 1 when the parameters
/// hold the next point to evaluate, 0 when the step is complete (the parameters are updated)
/// or when the call fails. A non-finite loss is accepted: when a loss or a projected
/// gradient of the step is not finite (spec §4), or the gradient it mixes in
/// (`hybrid_alpha > 0`) holds a NaN or an infinity (`cfg.skip_nonfinite_grads`), the step
/// completes with the parameters restored (each element within one rounding of its stored
/// dtype per pass; in compensated mode `hi + lo` within `2^-9` of an ulp per pass plus f32
/// rounding, see `HYZO_PRECISION_COMPENSATED`) and no rule state or `t` changed; it counts
/// as skipped. A pass that fails (the next perturbation, or the update) leaves the
/// parameters in an unknown state and poisons the optimizer (`hyzo_optimizer_poisoned`).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `needs_more` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_feed(
    opt: *mut hyzo_optimizer,
    loss: f32,
    needs_more: *mut c_int,
) -> hyzo_status {
    // Clear the flag first: a caller looping on it without checking the status stops.
    if !needs_more.is_null() && needs_more as usize % std::mem::align_of::<c_int>() == 0 {
        *needs_more = 0;
    }
    with_opt("hyzo_zo_feed", opt, |o| {
        let more = out_arg(needs_more, "needs_more")?;
        match o.inner.feed(loss)? {
            Feed::NeedsForward => *more = 1,
            Feed::Done(report) => {
                o.last = Some(report);
                *more = 0;
            }
        }
        Ok(())
    })
}

/// `hyzo_zo_feed` with the loss read from device memory (one float on the optimizer's
/// device, written by the forward pass on the optimizer's stream), without synchronizing.
/// CUDA optimizers only; all losses of a step come from the host or all from the device.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `loss_on_device` a device address that stays
/// valid until the step's last pass ran; `needs_more` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_feed_device(
    opt: *mut hyzo_optimizer,
    loss_on_device: *const f32,
    needs_more: *mut c_int,
) -> hyzo_status {
    if !needs_more.is_null() && needs_more as usize % std::mem::align_of::<c_int>() == 0 {
        *needs_more = 0;
    }
    with_opt("hyzo_zo_feed_device", opt, |o| {
        let more = out_arg(needs_more, "needs_more")?;
        if loss_on_device.is_null() {
            return Err(invalid_arg("loss_on_device: null pointer"));
        }
        if loss_on_device as usize % 4 != 0 {
            return Err(invalid_arg("loss_on_device: not aligned to 4 bytes"));
        }
        match o.inner.feed_device(loss_on_device as u64)? {
            Feed::NeedsForward => *more = 1,
            Feed::Done(report) => {
                o.last = Some(report);
                *more = 0;
            }
        }
        Ok(())
    })
}

/// Abandons the zeroth-order step in progress (e.g. the forward pass failed): the parameters
/// are restored (within the rounding of the stored dtype per pass; in compensated mode
/// `hi + lo` within `2^-9` of an ulp per pass plus f32 rounding, see
/// `HYZO_PRECISION_COMPENSATED`), nothing is updated, the step is not counted. No step in
/// progress: no-op.
///
/// When the restoring pass fails, the step is kept and its error returned: every call but
/// `hyzo_zo_abort` and the loads is then refused (`HYZO_ERR_BAD_STATE`), and calling
/// `hyzo_zo_abort` again retries the pass; a second failure poisons the optimizer
/// (`hyzo_optimizer_poisoned`).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_abort(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_recovering_opt("hyzo_zo_abort", opt, |o| o.inner.abort())
}

/// Writes 1 to `*poisoned` when the optimizer is poisoned, 0 otherwise. A pass of a
/// zeroth-order step that failed (in `hyzo_zo_begin`, `hyzo_zo_feed(_device)` or a second failed
/// `hyzo_zo_abort`) leaves the parameters in an unknown state, and poisons the optimizer:
/// every call is then refused with `HYZO_ERR_BAD_STATE` and the reason in
/// `hyzo_last_error()`, except this one, `hyzo_optimizer_load_state`,
/// `hyzo_optimizer_load_state_file` (a successful load makes it usable again; write the
/// parameters of the same checkpoint back) and `hyzo_optimizer_destroy`. An internal error
/// (`HYZO_ERR_INTERNAL`) poisons it too, for good: only destroy is accepted then.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `poisoned` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_poisoned(
    opt: *const hyzo_optimizer,
    poisoned: *mut c_int,
) -> hyzo_status {
    guard("hyzo_optimizer_poisoned", || {
        let out = out_arg(poisoned, "poisoned")?;
        let mut claim = claim(opt as *mut hyzo_optimizer)?;
        let o = claim.get();
        *out = c_int::from(o.poisoned || o.inner.poisoned().is_some());
        Ok(())
    })
}

/// The last finished zeroth-order step: `*loss` is its loss at the unperturbed point (the
/// mean of the `2q` losses for the two-sided estimator, `L_0` for the one-sided; NaN when the
/// losses were fed from the device), `*skipped` is 1 when a loss or a projected gradient was
/// not finite and nothing was updated. `HYZO_ERR_BAD_STATE` when no zeroth-order step finished since the optimizer
/// was created or its state loaded.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `loss` and `skipped` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_last_loss(
    opt: *const hyzo_optimizer,
    loss: *mut f32,
    skipped: *mut c_int,
) -> hyzo_status {
    with_opt("hyzo_zo_last_loss", opt as *mut _, |o| {
        let loss = out_arg(loss, "loss")?;
        let skipped = out_arg(skipped, "skipped")?;
        let Some(r) = &o.last else {
            return Err(Error::BadState(
                "no zeroth-order step has finished yet".into(),
            ));
        };
        *loss = r.loss.unwrap_or(f32::NAN);
        *skipped = c_int::from(r.skipped);
        Ok(())
    })
}

/// The projected gradients `g_d` of the last finished zeroth-order step (`len` must be
/// `num_directions`). `HYZO_ERR_BAD_STATE` when there is none: no step finished, the step
/// was skipped, or its losses were fed from the device.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` valid for `len` floats.
#[no_mangle]
pub unsafe extern "C" fn hyzo_zo_last_projected_grads(
    opt: *const hyzo_optimizer,
    out: *mut f32,
    len: u32,
) -> hyzo_status {
    with_opt("hyzo_zo_last_projected_grads", opt as *mut _, |o| {
        out_arg(out, "out")?;
        let q = o.inner.config().num_directions;
        if len != q {
            return Err(invalid_arg(format!(
                "len: {len}, expected num_directions = {q}"
            )));
        }
        let g = match &o.last {
            Some(r) if r.projected_grads.len() == len as usize => &r.projected_grads,
            _ => {
                return Err(Error::BadState(
                    "no projected gradients: no step finished, it was skipped, or its losses \
                     stayed on the device"
                        .into(),
                ))
            }
        };
        std::slice::from_raw_parts_mut(out, len as usize).copy_from_slice(g);
        Ok(())
    })
}

/// A first-order step on the registered gradients (write them before the call). Every
/// tensor needs a gradient; `HYZO_ERR_BAD_STATE` during a zeroth-order step or when the
/// hybrid schedule calls for a zeroth-order step. A gradient holding a NaN or an infinity
/// skips the step (`HYZO_OK`; unless `cfg.skip_nonfinite_grads = 0`): nothing changes but
/// the step count, and `hyzo_optimizer_stats` counts it as skipped. (The CUDA backend does
/// not check yet: there the rule applies gradients as they are.)
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_fo_step(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_fo_step", opt, |o| o.inner.fo_step().map(drop))
}

/// Skips the step the schedule calls for, first- or zeroth-order, as a step with a
/// non-finite gradient or loss is skipped: for a caller that found one on another shard or
/// process of the model, whose optimizers must skip together to stay in lockstep. Nothing
/// changes but the step count, and `hyzo_optimizer_stats` counts it as skipped.
/// `HYZO_ERR_BAD_STATE` during a zeroth-order step (abort it instead).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_skip_step(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_optimizer_skip_step", opt, |o| o.inner.skip_step())
}

/// A first-order step on the tensors with `update[i] != 0` only (`len` must be the number
/// of tensors), as `torch.optim` steps over the parameters that have a gradient: the others,
/// their rule state and their residual stay exactly as they are. Only the updated tensors
/// need gradients. The step counts as one (hybrid schedule, step number); the rule's `t`
/// advances when at least one tensor is updated. On CUDA the flags are copied in stream
/// order from host memory (such a step cannot be captured in a CUDA graph; `hyzo_fo_step`
/// can). Only the updated tensors' gradients are checked for NaN and infinity
/// (`hyzo_fo_step`).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `update` valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hyzo_fo_step_masked(
    opt: *mut hyzo_optimizer,
    update: *const u8,
    len: u64,
) -> hyzo_status {
    with_opt("hyzo_fo_step_masked", opt, |o| {
        out_arg(update as *mut u8, "update")?;
        let n = o.inner.params().len();
        if len != n as u64 {
            return Err(invalid_arg(format!("len: {len} flags for {n} tensors")));
        }
        let flags: Vec<bool> = std::slice::from_raw_parts(update, n)
            .iter()
            .map(|&b| b != 0)
            .collect();
        o.inner.fo_step_masked(&flags).map(drop)
    })
}

/// The kind of the next step under the hybrid schedule (`HYZO_PHASE_ANY` without one).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_next_phase(
    opt: *const hyzo_optimizer,
    out: *mut RawPhase,
) -> hyzo_status {
    with_opt("hyzo_next_phase", opt as *mut _, |o| {
        let out = out_arg(out, "out")?;
        *out = c_phase(o.inner.next_phase()) as u32;
        Ok(())
    })
}

/// Steps taken (first- and zeroth-order, skipped ones included) and steps skipped: because
/// a loss or a projected gradient was not finite (spec §4), or a gradient held a NaN or an
/// infinity (`cfg.skip_nonfinite_grads`). On CUDA this
/// synchronizes the optimizer's stream.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `steps` and `skipped` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_stats(
    opt: *const hyzo_optimizer,
    steps: *mut u64,
    skipped: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_stats", opt as *mut _, |o| {
        let steps = out_arg(steps, "steps")?;
        let skipped = out_arg(skipped, "skipped")?;
        let s = o.inner.skipped()?;
        *steps = o.inner.steps();
        *skipped = s;
        Ok(())
    })
}

/// The updates applied to each rule state: `updates` to the main rule's (its `t`),
/// `fo_updates` to the first-order rule's (0 without `fo_rule`). On CUDA this
/// synchronizes the optimizer's stream (steps skipped on the device are not updates).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `updates` and `fo_updates` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_updates(
    opt: *const hyzo_optimizer,
    updates: *mut u64,
    fo_updates: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_updates", opt as *mut _, |o| {
        let updates = out_arg(updates, "updates")?;
        let fo_updates = out_arg(fo_updates, "fo_updates")?;
        let u = o.inner.updates()?;
        *updates = u;
        *fo_updates = o.inner.fo_updates();
        Ok(())
    })
}

/// Waits until every pass issued so far has finished (a no-op on the CPU).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_synchronize(opt: *mut hyzo_optimizer) -> hyzo_status {
    with_opt("hyzo_optimizer_synchronize", opt, |o| o.inner.synchronize())
}

/// Adds `scale · z` once to the parameters, `z` the direction `(seed, step, direction)` of
/// the configured kind (`HYZO_DIRECTION_SPHERE`: the unscaled Gaussian) at each element's
/// global index: a seeded displacement that every process regenerates exactly for its own
/// shard (e.g. a noise control in an experiment). One perturbation pass; no state, counter
/// or schedule changes. `HYZO_ERR_BAD_STATE` during a zeroth-order step. A displacement that
/// would make a finite parameter non-finite (past its dtype's range) is refused
/// (`HYZO_ERR_INVALID_ARGUMENT`) and changes nothing; on CUDA, where that check is not
/// implemented yet, so is any whose `|scale| · max|z|` exceeds 8 on an f16 tensor or 2^100
/// (`max|z|` = 6.77 Gaussian, 1 Rademacher).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_displace(
    opt: *mut hyzo_optimizer,
    seed: u64,
    step: u32,
    direction: u32,
    scale: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_displace", opt, |o| {
        o.inner.displace(seed, step, direction, scale)
    })
}
