//! Saving and loading the optimizer state (in memory and in files).

use super::*;

/// Size in bytes of the saved state. Allocates the optimizer state, so no tensor can be
/// added afterwards; `HYZO_ERR_BAD_STATE` when no tensor is registered.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `bytes` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_state_size(
    opt: *const hyzo_optimizer,
    bytes: *mut u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_state_size", opt as *mut _, |o| {
        let bytes = out_arg(bytes, "bytes")?;
        *bytes = o.inner.state_size()?;
        Ok(())
    })
}

/// Saves the optimizer state (step counts, moment buffers of each rule, residuals and a
/// CRC32C checksum; not the parameters, which are the caller's) into `buf`: exactly
/// `hyzo_optimizer_state_size` bytes are written, `len` must be at least that. Not during a
/// zeroth-order step. On CUDA this synchronizes. The state is written straight into `buf`
/// (no second copy in memory).
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `buf` valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_save_state(
    opt: *const hyzo_optimizer,
    buf: *mut c_void,
    len: u64,
) -> hyzo_status {
    with_opt("hyzo_optimizer_save_state", opt as *mut _, |o| {
        if buf.is_null() {
            return Err(invalid_arg("buf: null pointer"));
        }
        let len = byte_len(len, "len")?;
        if o.inner.in_step() {
            return Err(Error::BadState("a zeroth-order step is in progress".into()));
        }
        let need = o.inner.state_size()?;
        if (len as u64) < need {
            return Err(invalid_arg(format!(
                "len: {len} bytes, the state needs {need}"
            )));
        }
        let mut out = std::slice::from_raw_parts_mut(buf as *mut u8, need as usize);
        o.inner.save_state_to(&mut out)
    })
}

/// Saves the optimizer state, as `hyzo_optimizer_save_state`, to the file `path`, streaming
/// (memory use does not grow with the state) and atomically: the file is written beside
/// `path` and renamed over it once complete, so `path` never holds a partial state.
/// `HYZO_ERR_IO` when the file cannot be written.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `path` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_save_state_file(
    opt: *const hyzo_optimizer,
    path: *const c_char,
) -> hyzo_status {
    with_opt("hyzo_optimizer_save_state_file", opt as *mut _, |o| {
        let path = path_arg(path)?;
        o.inner.save_state_file(path)
    })
}

/// Restores a state saved by `hyzo_optimizer_save_state` of an optimizer with the same
/// configuration (rule, fo_rule, precision, directions, seed, schedule) and the same tensors
/// (dtypes, sizes, offsets), from this or another device; the run then continues
/// bit-identically (restore the parameters too). `len` must be the exact size. A state that
/// is truncated, corrupted (checksum), of another configuration or size, or of an unknown
/// format version is rejected and nothing changes. States of hyzo 0.1 (format 1) load into
/// optimizers without `fo_rule`. Not during a zeroth-order step.
///
/// The one call (with `hyzo_optimizer_load_state_file`, and destroy) that an optimizer
/// poisoned by a failed pass accepts (`hyzo_optimizer_poisoned`): once a load succeeds it
/// is usable again, and the caller writes the parameters of the same checkpoint back into
/// the registered memory. A load that fails leaves it poisoned.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `buf` valid for reads of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_load_state(
    opt: *mut hyzo_optimizer,
    buf: *const c_void,
    len: u64,
) -> hyzo_status {
    with_recovering_opt("hyzo_optimizer_load_state", opt, |o| {
        if buf.is_null() {
            return Err(invalid_arg("buf: null pointer"));
        }
        let len = byte_len(len, "len")?;
        let bytes = std::slice::from_raw_parts(buf as *const u8, len);
        o.inner.load_state(bytes)?;
        o.last = None;
        Ok(())
    })
}

/// Restores a state from the file `path`, as `hyzo_optimizer_load_state`. The file is read
/// twice, streaming: once to check it whole, then to load it. `HYZO_ERR_IO` when it cannot
/// be read.
///
/// # Safety
/// `opt` must be NULL or a live optimizer; `path` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn hyzo_optimizer_load_state_file(
    opt: *mut hyzo_optimizer,
    path: *const c_char,
) -> hyzo_status {
    with_recovering_opt("hyzo_optimizer_load_state_file", opt, |o| {
        let path = path_arg(path)?;
        o.inner.load_state_file(path)?;
        o.last = None;
        Ok(())
    })
}
