//! Creating, configuring and destroying an optimizer.

use super::*;

pub(crate) fn new_handle(inner: Optimizer<'static>) -> *mut hyzo_optimizer {
    Box::into_raw(Box::new(hyzo_optimizer {
        magic: MAGIC,
        inner,
        last: None,
        poisoned: false,
        in_use: std::sync::atomic::AtomicBool::new(false),
    }))
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_optimizer(config: Config, ordinal: c_int) -> Result<Optimizer<'static>> {
    let backend = crate::backend::cuda::CudaBackend::new(ordinal)?;
    Optimizer::with_backend(
        config,
        ParamShard::with_location(Location::Cuda(ordinal)),
        Box::new(backend),
    )
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_optimizer(_config: Config, _ordinal: c_int) -> Result<Optimizer<'static>> {
    Err(Error::NoDevice(
        "device: this libhyzo was built without CUDA support".into(),
    ))
}

/// Creates an optimizer with the configuration `*cfg` (copied) whose tensors live on
/// `device`. For `HYZO_DEVICE_CPU`, `device_ordinal` is ignored and passes use every core
/// (see `hyzo_optimizer_create_cpu` to choose); for `HYZO_DEVICE_CUDA` it names the
/// device (>= 0). On success `*out` is the new optimizer, to free with
/// `hyzo_optimizer_destroy`; on failure `*out` is set to NULL.
///
/// # Safety
/// `cfg` must point to a `hyzo_config`, `out` to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_create(
    cfg: *const hyzo_config,
    device: RawDevice,
    device_ordinal: c_int,
    out: *mut *mut hyzo_optimizer,
) -> hyzo_status {
    guard("hyzo_optimizer_create", || {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let config = read_config(cfg)?;
        let inner = match device {
            0 => Optimizer::new(config, ParamShard::new())?,
            1 => {
                if device_ordinal < 0 {
                    return Err(invalid_arg(format!(
                        "device_ordinal: {device_ordinal} is negative"
                    )));
                }
                cuda_optimizer(config, device_ordinal)?
            }
            v => {
                return Err(invalid_arg(format!(
                    "device: {v} is not a hyzo_device (0..=1)"
                )))
            }
        };
        *out = new_handle(inner);
        Ok(())
    })
}

/// Creates a CPU optimizer whose passes run on `num_threads` threads of its own (at most
/// 1024; 0: the process-wide pool over every core). Otherwise as `hyzo_optimizer_create`.
/// Results do not depend on the number of threads.
///
/// # Safety
/// As `hyzo_optimizer_create`.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_create_cpu(
    cfg: *const hyzo_config,
    num_threads: u32,
    out: *mut *mut hyzo_optimizer,
) -> hyzo_status {
    guard("hyzo_optimizer_create_cpu", || {
        let out = out_arg(out, "out")?;
        *out = std::ptr::null_mut();
        let config = read_config(cfg)?;
        let inner = Optimizer::with_threads(config, ParamShard::new(), num_threads as usize)?;
        *out = new_handle(inner);
        Ok(())
    })
}

/// Frees an optimizer and its state (NULL: no-op). The registered tensors are not touched,
/// so a zeroth-order step still in progress leaves them perturbed: call `hyzo_zo_abort`
/// first to restore them. An optimizer that another thread is using at that moment is not
/// freed (`hyzo_last_error` says so): destroy it once that call has returned.
///
/// # Safety
/// `opt` must be NULL or an optimizer from `hyzo_optimizer_create` not yet destroyed.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_destroy(opt: *mut hyzo_optimizer) {
    let _ = guard("hyzo_optimizer_destroy", || {
        if opt.is_null() {
            return Ok(());
        }
        // Validate before freeing: freeing a foreign pointer would corrupt the C heap; and
        // an optimizer another thread is using stays alive (the call is refused).
        let mut claim = claim(opt)?;
        claim.get().magic = 0;
        // The claim's flag lives inside the optimizer: release nothing after freeing it.
        std::mem::forget(claim);
        drop(Box::from_raw(opt));
        Ok(())
    });
}

/// Registers a tensor of `numel` elements of `dtype` at `data`, holding elements
/// `global_offset .. global_offset + numel` of the model's flat parameter vector, with an
/// optional gradient `grad` of `numel` elements of `grad_dtype` (NULL: none; needed for
/// first-order and hybrid steps). Memory is host memory for a CPU optimizer and device memory
/// of the optimizer's device for a CUDA one.
///
/// Fails (and registers nothing) on: a NULL `data`, `numel = 0`, an out-of-range dtype
/// (`grad_dtype` is checked even when `grad` is NULL), a pointer misaligned for its dtype,
/// memory or global elements overlapping a registered tensor or its gradient, and any call
/// after the optimizer's state was allocated (by the first step, `hyzo_optimizer_state_size`,
/// save/load or `hyzo_optimizer_local_sq_norms`).
///
/// # Safety
/// `data` (and `grad` when not NULL) must stay valid for reads and writes of `numel` elements
/// until the optimizer is destroyed, and must not be written by anything else while an
/// optimizer call runs.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_add_tensor(
    opt: *mut hyzo_optimizer,
    data: *mut c_void,
    dtype: RawDType,
    numel: u64,
    global_offset: u64,
    grad: *mut c_void,
    grad_dtype: RawDType,
) -> hyzo_status {
    with_opt("hyzo_optimizer_add_tensor", opt, |o| {
        let spec = TensorSpec {
            data: data as u64,
            dtype: dtype_from(dtype, "dtype")?,
            numel,
            offset: global_offset,
            grad: grad as u64,
            grad_dtype: dtype_from(grad_dtype, "grad_dtype")?,
        };
        // The byte range must exist in this address space (the shard checks u64 overflow).
        byte_len(numel.saturating_mul(spec.dtype.size() as u64), "numel")?;
        if !grad.is_null() {
            byte_len(numel.saturating_mul(spec.grad_dtype.size() as u64), "numel")?;
        }
        o.inner.add_tensor_raw(spec)?;
        Ok(())
    })
}

/// Makes later passes of a CUDA optimizer run on `cuda_stream` (a `CUstream` /
/// `cudaStream_t`; NULL: the default stream). On a CPU optimizer NULL is accepted (and does
/// nothing) and any other stream is an error.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `cuda_stream` a stream of the optimizer's device
/// that outlives its use.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_stream(
    opt: *mut hyzo_optimizer,
    cuda_stream: *mut c_void,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_stream", opt, |o| {
        if cuda_stream.is_null() && o.inner.params().location() == Location::Host {
            return Ok(());
        }
        // SAFETY: the header's contract: a valid stream of the device's primary context.
        unsafe { o.inner.set_stream(cuda_stream as u64) }
    })
}

/// Sets the learning rate of later steps (finite, >= 0); for schedulers, between steps.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_lr(opt: *mut hyzo_optimizer, lr: f32) -> hyzo_status {
    with_opt("hyzo_optimizer_set_lr", opt, |o| o.inner.set_lr(lr))
}

/// Sets the decoupled weight decay of later steps (finite, >= 0).
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_weight_decay(
    opt: *mut hyzo_optimizer,
    weight_decay: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_weight_decay", opt, |o| {
        o.inner.set_weight_decay(weight_decay)
    })
}

/// Sets the learning rate of first-order steps (finite, >= 0), or NaN: follow `lr` again.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_fo_lr(
    opt: *mut hyzo_optimizer,
    fo_lr: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_fo_lr", opt, |o| {
        o.inner.set_fo_lr(unset_if_nan(fo_lr))
    })
}

/// Sets the weight decay of first-order steps (finite, >= 0), or NaN: follow
/// `weight_decay` again.
///
/// # Safety
/// `opt` must be NULL or a live optimizer.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_set_fo_weight_decay(
    opt: *mut hyzo_optimizer,
    fo_weight_decay: f32,
) -> hyzo_status {
    with_opt("hyzo_optimizer_set_fo_weight_decay", opt, |o| {
        o.inner.set_fo_weight_decay(unset_if_nan(fo_weight_decay))
    })
}

/// Writes the optimizer's current configuration (with the latest lr and weight decay).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_get_config(
    opt: *const hyzo_optimizer,
    out: *mut hyzo_config,
) -> hyzo_status {
    with_opt("hyzo_optimizer_get_config", opt as *mut _, |o| {
        let out = out_arg(out, "out")?;
        *out = config_to_c(o.inner.config());
        Ok(())
    })
}

/// Writes the number of registered tensors.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_num_tensors(
    opt: *const hyzo_optimizer,
    out: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_num_tensors", opt as *mut _, |o| {
        let out = out_arg(out, "out")?;
        *out = o.inner.params().len() as u64;
        Ok(())
    })
}
