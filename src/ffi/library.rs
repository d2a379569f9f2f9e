//! Library-level functions: version, errors, CUDA availability, directions.

use super::*;

/// The library version (`"MAJOR.MINOR.PATCH"`), a static string.
#[no_mangle]
pub extern "C" fn hyzo_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread (`"function: what was wrong"`), or
/// `""` when none failed yet. Successful calls leave it alone. The pointer stays valid until
/// the next failing call on this thread (or the thread's exit); copy it to keep it.
#[no_mangle]
pub extern "C" fn hyzo_last_error() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|slot| slot.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
    .unwrap_or(c"".as_ptr())
}

/// A static name for a status (`"HYZO_ERR_BAD_STATE"`), `"unknown hyzo_status"` for other
/// values.
#[no_mangle]
pub extern "C" fn hyzo_status_string(status: RawStatus) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        0 => c"HYZO_OK",
        1 => c"HYZO_ERR_INVALID_ARGUMENT",
        2 => c"HYZO_ERR_BAD_STATE",
        3 => c"HYZO_ERR_NO_DEVICE",
        4 => c"HYZO_ERR_CUDA",
        5 => c"HYZO_ERR_OUT_OF_MEMORY",
        6 => c"HYZO_ERR_INTERNAL",
        7 => c"HYZO_ERR_IO",
        _ => c"unknown hyzo_status",
    };
    s.as_ptr()
}

/// 1 when this library was built with CUDA support and a CUDA driver with at least one
/// device is present, 0 otherwise.
#[no_mangle]
pub extern "C" fn hyzo_cuda_available() -> c_int {
    #[cfg(feature = "cuda")]
    {
        catch_unwind(|| c_int::from(crate::backend::cuda::is_available())).unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Writes entries `start .. start + count` of direction `(seed, step, direction)` into `out`
/// (`count` floats, 4-byte aligned): exactly the values the optimizers use (spec §3).
/// `HYZO_DIRECTION_SPHERE` writes the unscaled Gaussian: the sphere's scale `1/||z||`
/// depends on every element an optimizer holds, which a range does not know.
/// `HYZO_DIRECTION_LOWRANK` is refused: its entries depend on a tensor's shape (use
/// `hyzo_optimizer_lowrank_factors`). `count = 0` writes nothing (`out` must still be
/// non-NULL).
///
/// # Safety
/// `out` must be valid for writes of `count` floats.
#[no_mangle]
pub unsafe extern "C" fn hyzo_directions_fill(
    kind: RawDirection,
    seed: u64,
    step: u32,
    direction: u32,
    start: u64,
    count: u64,
    out: *mut f32,
) -> hyzo_status {
    guard("hyzo_directions_fill", || {
        let kind = direction_from(kind, "kind")?;
        if kind == DirectionKind::LowRank {
            return Err(invalid_arg(
                "kind: a low-rank direction depends on a tensor's shape; use hyzo_optimizer_lowrank_factors",
            ));
        }
        let out = out_arg(out, "out")?;
        if start.checked_add(count).is_none() {
            return Err(invalid_arg(format!(
                "count: start {start} + count {count} overflows u64"
            )));
        }
        // A slice of `count` floats must fit the address space.
        byte_len(count.saturating_mul(4), "count")?;
        let out = std::slice::from_raw_parts_mut(out as *mut f32, count as usize);
        crate::fill::fill_parallel(kind, DirectionId::new(seed, step, direction), start, out);
        Ok(())
    })
}
