//! The header's enums against the core enums they name: one numbering, checked when the
//! crate is compiled.
//!
//! The C enums (`mod.rs`) keep literal values: cbindgen prints them as written and C callers
//! compile against them. The core enums keep theirs: the kernels (`kernels/hyzo_params.h`),
//! `RuleParams::rule` and the fingerprint of saved states use them. The two are tied here,
//! and a value crosses the ABI only through these ties, never by its position in a list:
//! - `c_*` gives every core variant its C name, an exhaustive `match`: a variant added to
//!   the core does not compile until the header names it;
//! - the `const` blocks below fail the build when a pair's values differ (renumber either
//!   side and the header, `_lib.py` and the header tests would still agree with each other
//!   while the core meant another variant) or when a core `ALL` is out of value order;
//! - `src/ffi/tests.rs` (`header_enums_are_the_core_enums`) reads `ffi/hyzo.h` and checks
//!   that each C enum has exactly the values of its core enum's `ALL`: no C value without a
//!   core variant, no core variant missing from `ALL`.

use super::*;

/// The C name of an element type.
pub(crate) const fn c_dtype(t: DType) -> hyzo_dtype {
    match t {
        DType::F32 => hyzo_dtype::HYZO_F32,
        DType::F16 => hyzo_dtype::HYZO_F16,
        DType::BF16 => hyzo_dtype::HYZO_BF16,
    }
}

/// The C name of a rule.
pub(crate) const fn c_rule(r: Rule) -> hyzo_rule {
    match r {
        Rule::Sgd => hyzo_rule::HYZO_RULE_SGD,
        Rule::Momentum => hyzo_rule::HYZO_RULE_MOMENTUM,
        Rule::Sign => hyzo_rule::HYZO_RULE_SIGN,
        Rule::Signum => hyzo_rule::HYZO_RULE_SIGNUM,
        Rule::AdamW => hyzo_rule::HYZO_RULE_ADAMW,
        Rule::AdaZo => hyzo_rule::HYZO_RULE_ADAZO,
    }
}

/// The C name of a direction kind.
pub(crate) const fn c_direction(k: DirectionKind) -> hyzo_direction {
    match k {
        DirectionKind::Gaussian => hyzo_direction::HYZO_DIRECTION_GAUSSIAN,
        DirectionKind::Rademacher => hyzo_direction::HYZO_DIRECTION_RADEMACHER,
        DirectionKind::Sphere => hyzo_direction::HYZO_DIRECTION_SPHERE,
        DirectionKind::LowRank => hyzo_direction::HYZO_DIRECTION_LOWRANK,
    }
}

/// The C name of an estimator.
pub(crate) const fn c_estimator(e: Estimator) -> hyzo_estimator {
    match e {
        Estimator::TwoSided => hyzo_estimator::HYZO_ESTIMATOR_TWO_SIDED,
        Estimator::OneSided => hyzo_estimator::HYZO_ESTIMATOR_ONE_SIDED,
    }
}

/// The C name of a precision mode.
pub(crate) const fn c_precision(p: Precision) -> hyzo_precision {
    match p {
        Precision::Nearest => hyzo_precision::HYZO_PRECISION_NEAREST,
        Precision::Stochastic => hyzo_precision::HYZO_PRECISION_STOCHASTIC,
        Precision::Compensated => hyzo_precision::HYZO_PRECISION_COMPENSATED,
    }
}

/// The C name of a step kind. Only reported (`hyzo_next_phase`), by name: the core's values
/// never cross the ABI, and `HYZO_PHASE_ANY` has no core variant.
pub(crate) const fn c_phase(p: Option<Phase>) -> hyzo_phase {
    match p {
        Some(Phase::FirstOrder) => hyzo_phase::HYZO_PHASE_FO,
        Some(Phase::ZerothOrder) => hyzo_phase::HYZO_PHASE_ZO,
        None => hyzo_phase::HYZO_PHASE_ANY,
    }
}

/// Fails the build unless every variant of `$all` has the value of its C name (`$c`), and
/// `$all` lists the variants in value order from 0 (so `ALL[v]` is the variant of value `v`,
/// as `DType::from_u32` and `RuleParams::rule` read it).
macro_rules! same_numbering {
    ($all:expr, $c:ident) => {
        const _: () = {
            let all = $all;
            let mut i = 0;
            while i < all.len() {
                assert!(
                    $c(all[i]) as u32 == all[i] as u32,
                    concat!(
                        stringify!($c),
                        ": the C enum and the core enum number a variant differently"
                    )
                );
                assert!(
                    all[i] as u32 == i as u32,
                    concat!(stringify!($all), " is not in value order from 0")
                );
                i += 1;
            }
        };
    };
}

same_numbering!(DType::ALL, c_dtype);
same_numbering!(Rule::ALL, c_rule);
same_numbering!(DirectionKind::ALL, c_direction);
same_numbering!(Estimator::ALL, c_estimator);
same_numbering!(Precision::ALL, c_precision);

/// The core variant whose C value is `v`, or an error naming the argument and the range.
fn from_c<T: Copy>(
    v: u32,
    all: &[T],
    c_value: impl Fn(T) -> u32,
    c_type: &str,
    name: &str,
) -> Result<T> {
    all.iter()
        .copied()
        .find(|&x| c_value(x) == v)
        .ok_or_else(|| {
            let max = all.iter().map(|&x| c_value(x)).max().unwrap_or(0);
            invalid_arg(format!("{name}: {v} is not a {c_type} (0..={max})"))
        })
}

pub(crate) fn dtype_from(v: RawDType, name: &str) -> Result<DType> {
    from_c(v, &DType::ALL, |t| c_dtype(t) as u32, "hyzo_dtype", name)
}

pub(crate) fn direction_from(v: RawDirection, name: &str) -> Result<DirectionKind> {
    from_c(
        v,
        &DirectionKind::ALL,
        |k| c_direction(k) as u32,
        "hyzo_direction",
        name,
    )
}

pub(crate) fn estimator_from(v: RawEstimator, name: &str) -> Result<Estimator> {
    from_c(
        v,
        &Estimator::ALL,
        |e| c_estimator(e) as u32,
        "hyzo_estimator",
        name,
    )
}

pub(crate) fn rule_from(v: RawRule, name: &str) -> Result<Rule> {
    from_c(v, &Rule::ALL, |r| c_rule(r) as u32, "hyzo_rule", name)
}

/// `fo_rule`: a rule, or `HYZO_RULE_NONE`.
pub(crate) fn fo_rule_from(v: RawRule, name: &str) -> Result<Option<Rule>> {
    if v == hyzo_rule::HYZO_RULE_NONE as u32 {
        return Ok(None);
    }
    rule_from(v, name)
        .map(Some)
        .map_err(|e| invalid_arg(format!("{} or HYZO_RULE_NONE", e.message())))
}

/// `fo_rule` as C passes it: `HYZO_RULE_NONE` for none.
pub(crate) fn fo_rule_to_c(r: Option<Rule>) -> RawRule {
    r.map_or(hyzo_rule::HYZO_RULE_NONE, c_rule) as u32
}

pub(crate) fn precision_from(v: RawPrecision, name: &str) -> Result<Precision> {
    from_c(
        v,
        &Precision::ALL,
        |p| c_precision(p) as u32,
        "hyzo_precision",
        name,
    )
}
