//! Shared by the tests of checked-in generated files (`header.rs`, `abi.rs`).

use std::path::Path;

/// Compares the checked-in `relative` (under the crate root) with `fresh`, what its
/// generator produces now: rewrites it when `update_var` is `1`, otherwise panics at the
/// first differing line, saying how to regenerate (`regenerate`) and anything else that
/// explains a difference (`note`, may be empty).
pub fn check_generated(
    relative: &str,
    fresh: &str,
    update_var: &str,
    regenerate: &str,
    note: &str,
) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    if std::env::var_os(update_var).is_some_and(|v| v == "1") {
        std::fs::write(&path, fresh).unwrap_or_else(|e| panic!("write {relative}: {e}"));
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != fresh {
        let first = current
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| current.lines().count().min(fresh.lines().count()));
        let show = |s: &str| s.lines().nth(first).unwrap_or("<end of file>").to_string();
        panic!(
            "{relative} is stale: first difference at line {}:\n  checked in: {}\n  generated:  {}\n\
             {note}regenerate with: {regenerate}",
            first + 1,
            show(&current),
            show(fresh)
        );
    }
}
