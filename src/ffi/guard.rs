//! Errors, the panic guard and argument checks shared by every entry point.

use super::*;

thread_local! {
    // A CString, not a String: `hyzo_last_error` hands out a pointer into it.
    pub(crate) static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn status_of(e: &Error) -> hyzo_status {
    match e {
        Error::InvalidArgument(_) => hyzo_status::HYZO_ERR_INVALID_ARGUMENT,
        Error::BadState(_) => hyzo_status::HYZO_ERR_BAD_STATE,
        Error::NoDevice(_) => hyzo_status::HYZO_ERR_NO_DEVICE,
        Error::Cuda(_) => hyzo_status::HYZO_ERR_CUDA,
        Error::OutOfMemory(_) => hyzo_status::HYZO_ERR_OUT_OF_MEMORY,
        Error::Io(_) => hyzo_status::HYZO_ERR_IO,
        Error::Internal(_) => hyzo_status::HYZO_ERR_INTERNAL,
    }
}

/// Stores `func: message` as the thread's last error and returns the status of `e`.
pub(crate) fn fail(func: &str, e: &Error) -> hyzo_status {
    let text = format!("{func}: {}", e.message()).replace('\0', "\\0");
    // No interior NUL is left, so `new` cannot fail; keep a fixed text if it somehow does.
    let c = CString::new(text).unwrap_or_else(|_| c"hyzo: error message unavailable".into());
    // `try_with`: during thread teardown the slot may be gone; the status still tells.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
    status_of(e)
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    };
    // Dropping a payload runs foreign code (its Drop); keep a panic there inside too.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
    format!("internal error (panic): {msg}")
}

/// Runs `f`, turning its error or panic into a status and the thread's message.
pub(crate) fn guard(func: &str, f: impl FnOnce() -> Result<()>) -> hyzo_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => hyzo_status::HYZO_OK,
        Ok(Err(e)) => fail(func, &e),
        Err(p) => fail(func, &Error::Internal(panic_message(p))),
    }
}

pub(crate) fn invalid_arg(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Checks an optimizer handle and runs `f` on it; a panic inside `f` poisons the optimizer.
/// An optimizer that a failed pass poisoned (or whose abort failed to restore) is refused:
/// see [`with_recovering_opt`] for the calls it accepts.
///
/// # Safety
/// `opt` is NULL or a pointer returned by `hyzo_optimizer_create` not yet destroyed, used
/// by no other thread during the call.
pub(crate) unsafe fn with_opt(
    func: &str,
    opt: *mut hyzo_optimizer,
    f: impl FnOnce(&mut hyzo_optimizer) -> Result<()>,
) -> hyzo_status {
    with_opt_checked(func, opt, true, f)
}

/// [`with_opt`] for the calls that recover an optimizer a failed pass poisoned (the loads)
/// or whose abort failed (`hyzo_zo_abort` again): the core decides what they accept.
///
/// # Safety
/// As [`with_opt`].
pub(crate) unsafe fn with_recovering_opt(
    func: &str,
    opt: *mut hyzo_optimizer,
    f: impl FnOnce(&mut hyzo_optimizer) -> Result<()>,
) -> hyzo_status {
    with_opt_checked(func, opt, false, f)
}

/// # Safety
/// As [`with_opt`].
unsafe fn with_opt_checked(
    func: &str,
    opt: *mut hyzo_optimizer,
    refuse_poisoned: bool,
    f: impl FnOnce(&mut hyzo_optimizer) -> Result<()>,
) -> hyzo_status {
    guard(func, || {
        let mut claim = claim(opt)?;
        let o = claim.get();
        if o.poisoned {
            return Err(Error::Internal(
                "opt: an earlier internal error left this optimizer inconsistent; destroy it"
                    .into(),
            ));
        }
        if refuse_poisoned {
            o.inner.check_usable("opt")?;
        }
        match catch_unwind(AssertUnwindSafe(|| f(&mut *o))) {
            Ok(r) => r,
            Err(p) => {
                o.poisoned = true;
                Err(Error::Internal(panic_message(p)))
            }
        }
    })
}

/// Exclusive use of a live optimizer for the length of one call; released when dropped.
pub(crate) struct Claim<'a> {
    opt: *mut hyzo_optimizer,
    _lifetime: std::marker::PhantomData<&'a mut hyzo_optimizer>,
}

impl Claim<'_> {
    pub(crate) fn get(&mut self) -> &mut hyzo_optimizer {
        // SAFETY: `claim` checked the pointer, and this thread holds the in-use flag.
        unsafe { &mut *self.opt }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // SAFETY: the optimizer is alive (destroy forgets its claim before freeing); the
        // flag is reached through the raw pointer, not through a reference to the whole.
        let flag = unsafe { &*std::ptr::addr_of!((*self.opt).in_use) };
        flag.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Checks an optimizer handle and takes its in-use flag: a call that finds it taken (the
/// optimizer is in use by another thread) fails with `BadState` and touches nothing. Costs
/// one uncontended atomic exchange per call.
///
/// # Safety
/// `opt` is NULL or a pointer returned by `hyzo_optimizer_create` not yet destroyed.
pub(crate) unsafe fn claim<'a>(opt: *mut hyzo_optimizer) -> Result<Claim<'a>> {
    if opt.is_null() {
        return Err(invalid_arg("opt: null pointer"));
    }
    if opt as usize % std::mem::align_of::<hyzo_optimizer>() != 0 {
        return Err(invalid_arg("opt: misaligned pointer, not a hyzo_optimizer"));
    }
    // Field by field through the raw pointer: another thread may hold `&mut` to the
    // optimizer, and only its atomic flag may be shared.
    if std::ptr::addr_of!((*opt).magic).read() != MAGIC {
        return Err(invalid_arg(
            "opt: not a live hyzo_optimizer (destroyed, or another object)",
        ));
    }
    let flag = &*std::ptr::addr_of!((*opt).in_use);
    use std::sync::atomic::Ordering;
    if flag
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Err(Error::BadState(
            "opt: in use by another thread (an optimizer serves one call at a time)".into(),
        ));
    }
    Ok(Claim {
        opt,
        _lifetime: std::marker::PhantomData,
    })
}

/// A writable reference to an output argument, checked for NULL and alignment.
///
/// # Safety
/// `p` is NULL or valid for writes of a `T`.
pub(crate) unsafe fn out_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    if p.is_null() {
        return Err(invalid_arg(format!("{name}: null pointer")));
    }
    if p as usize % std::mem::align_of::<T>() != 0 {
        return Err(invalid_arg(format!(
            "{name}: address {:#x} is not aligned to {} bytes",
            p as usize,
            std::mem::align_of::<T>()
        )));
    }
    Ok(&mut *p)
}

/// A byte length from C as a `usize` no larger than `isize::MAX` (slices need that).
pub(crate) fn byte_len(len: u64, name: &str) -> Result<usize> {
    usize::try_from(len)
        .ok()
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid_arg(format!("{name}: {len} exceeds the address space")))
}

/// An optional f32 of the C API: NaN means "not set".
pub(crate) fn unset_if_nan(v: f32) -> Option<f32> {
    (!v.is_nan()).then_some(v)
}

/// A path argument: a non-NULL, NUL-terminated string.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
pub(crate) unsafe fn path_arg<'a>(path: *const c_char) -> Result<&'a std::path::Path> {
    if path.is_null() {
        return Err(invalid_arg("path: null pointer"));
    }
    let s = std::ffi::CStr::from_ptr(path);
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(
            s.to_bytes(),
        )))
    }
    #[cfg(not(unix))]
    {
        s.to_str()
            .map(std::path::Path::new)
            .map_err(|_| invalid_arg("path: not UTF-8"))
    }
}
