//! The launch structs of `kernels/hyzo_params.h`, mirrored field for field. The test below
//! reads the header's `HYZO_LAYOUT` / `HYZO_SIZE` pins (which the CUDA compilers check
//! with `static_assert`) and compares them with `offset_of!` / `size_of`, so the two sides
//! cannot drift apart unnoticed.

use crate::rules::RuleParams;

/// Threads per block of every element kernel (`HYZO_THREADS`).
pub const THREADS: u32 = 256;
/// Elements per group (`HYZO_GROUP`): 8 consecutive global indices from a multiple of 8.
pub const GROUP: u64 = 8;
/// Groups per chunk (`HYZO_CHUNK_GROUPS`).
pub const CHUNK_GROUPS: u64 = 2048;
/// Terms carried inline in the launch parameters (`HYZO_MAX_TERMS`).
pub const MAX_TERMS: usize = 8;

/// `HyzoTensor`: one tensor of the device-side table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HyzoTensor {
    pub data: u64,
    pub grad: u64,
    pub lo: u64,
    pub m: u64,
    pub v: u64,
    pub fo_m: u64,
    pub fo_v: u64,
    pub numel: u64,
    pub offset: u64,
    pub first_chunk: u64,
    pub dtype: u32,
    pub grad_dtype: u32,
    pub factor_offset: u64,
    pub cols: u64,
    pub rank: u32,
    pub scale: f32,
}

/// `HyzoTerm`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HyzoTerm {
    pub direction: u32,
    pub coeff: f32,
}

/// `HyzoPass`: the parameters of the element kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HyzoPass {
    pub table: u64,
    pub terms: u64,
    pub skip_flag: u64,
    pub partials: u64,
    pub seed: u64,
    pub total_chunks: u64,
    pub ntensors: u32,
    pub step: u32,
    pub kind: u32,
    pub precision: u32,
    pub nterms: u32,
    pub has_restore: u32,
    pub restore: HyzoTerm,
    pub restore_slot: i32,
    pub has_grad: u32,
    pub grad_weight: f32,
    pub direction: u32,
    /// `HyzoRule` is `RuleParams` itself (both `#[repr(C)]`, pinned by the test).
    pub rule: RuleParams,
    pub inline_terms: [HyzoTerm; MAX_TERMS],
    pub t: u64,
    pub skip_count: u64,
    pub state_set: u32,
    pub lowrank: u32,
    pub counters: u64,
    pub factor_base: u64,
    pub factor_stride: u64,
}

/// `HyzoCounters`: the step counters of the device-counter mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HyzoCounters {
    pub step: u64,
    pub t: [u64; 2],
}

/// `HyzoLossPass`: the parameters of `hyzo_device_losses`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HyzoLossPass {
    pub losses: u64,
    pub base: u64,
    pub out: u64,
    pub skip_flag: u64,
    pub skip_count: u64,
    pub q: u32,
    pub estimator: u32,
    pub eps: f32,
    pub max_coefficient_sum: f32,
    pub inline_base: [HyzoTerm; MAX_TERMS],
}

/// `HyzoFactorJob`: one factor stream of one low-rank tensor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HyzoFactorJob {
    pub out: u64,
    pub offset: u64,
    pub count: u64,
    pub stream: u32,
    pub reserved: u32,
}

/// `HyzoFactorPass`: the parameters of `hyzo_lowrank_factors_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HyzoFactorPass {
    pub jobs: u64,
    pub counters: u64,
    pub seed: u64,
    pub out: u64,
    pub stride: u64,
    pub terms: u64,
    pub njobs: u32,
    pub step: u32,
    pub nterms: u32,
    pub reserved: u32,
    pub inline_terms: [HyzoTerm; MAX_TERMS],
}

impl HyzoPass {
    /// All fields zero, no restore (`restore_slot = -1`).
    pub fn empty(rule: RuleParams) -> Self {
        Self {
            table: 0,
            terms: 0,
            skip_flag: 0,
            partials: 0,
            seed: 0,
            total_chunks: 0,
            ntensors: 0,
            step: 0,
            kind: 0,
            precision: 0,
            nterms: 0,
            has_restore: 0,
            restore: HyzoTerm::default(),
            restore_slot: -1,
            has_grad: 0,
            grad_weight: 0.0,
            direction: 0,
            rule,
            inline_terms: [HyzoTerm::default(); MAX_TERMS],
            t: 0,
            skip_count: 0,
            state_set: 0,
            lowrank: 0,
            counters: 0,
            factor_base: 0,
            factor_stride: 0,
        }
    }
}

/// The header itself, for the layout test.
#[cfg(test)]
pub const HEADER: &str = include_str!("../../../kernels/hyzo_params.h");

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    fn rust_layout() -> Vec<(&'static str, &'static str, usize)> {
        macro_rules! f {
            ($t:ident, $($f:ident),*) => {
                vec![$((stringify!($t), stringify!($f), offset_of!($t, $f))),*]
            };
        }
        let mut v = Vec::new();
        v.extend(f!(
            HyzoTensor,
            data,
            grad,
            lo,
            m,
            v,
            fo_m,
            fo_v,
            numel,
            offset,
            first_chunk,
            dtype,
            grad_dtype,
            factor_offset,
            cols,
            rank,
            scale
        ));
        type HyzoRule = RuleParams;
        v.extend(f!(
            HyzoRule,
            rule,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            bias_correction1,
            bias_correction2
        ));
        v.extend(f!(HyzoTerm, direction, coeff));
        v.extend(f!(
            HyzoPass,
            table,
            terms,
            skip_flag,
            partials,
            seed,
            total_chunks,
            ntensors,
            step,
            kind,
            precision,
            nterms,
            has_restore,
            restore,
            restore_slot,
            has_grad,
            grad_weight,
            direction,
            rule,
            inline_terms,
            t,
            skip_count,
            state_set,
            lowrank,
            counters,
            factor_base,
            factor_stride
        ));
        v.extend(f!(HyzoFactorJob, out, offset, count, stream, reserved));
        v.extend(f!(
            HyzoFactorPass,
            jobs,
            counters,
            seed,
            out,
            stride,
            terms,
            njobs,
            step,
            nterms,
            reserved,
            inline_terms
        ));
        v.extend(f!(HyzoCounters, step, t));
        v.extend(f!(
            HyzoLossPass,
            losses,
            base,
            out,
            skip_flag,
            skip_count,
            q,
            estimator,
            eps,
            max_coefficient_sum,
            inline_base
        ));
        v
    }

    fn rust_size(name: &str) -> usize {
        match name {
            "HyzoTensor" => size_of::<HyzoTensor>(),
            "HyzoRule" => size_of::<RuleParams>(),
            "HyzoTerm" => size_of::<HyzoTerm>(),
            "HyzoPass" => size_of::<HyzoPass>(),
            "HyzoLossPass" => size_of::<HyzoLossPass>(),
            "HyzoCounters" => size_of::<HyzoCounters>(),
            "HyzoFactorJob" => size_of::<HyzoFactorJob>(),
            "HyzoFactorPass" => size_of::<HyzoFactorPass>(),
            other => panic!("unknown struct {other}"),
        }
    }

    fn args<'a>(line: &'a str, macro_name: &str) -> Option<Vec<&'a str>> {
        let rest = line.trim().strip_prefix(macro_name)?.strip_prefix('(')?;
        let inner = rest.split(')').next()?;
        Some(inner.split(',').map(str::trim).collect())
    }

    fn define(name: &str) -> u64 {
        HEADER
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .and_then(|v| {
                v.split_whitespace()
                    .next()?
                    .trim_end_matches('u')
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("#define {name} not found"))
    }

    #[test]
    fn abi_layout_matches_the_header() {
        let rust = rust_layout();
        let mut fields = 0;
        let mut sizes = 0;
        for line in HEADER.lines() {
            if line.contains("#define") {
                continue;
            }
            if let Some(a) = args(line, "HYZO_LAYOUT") {
                let off: usize = a[2].parse().unwrap();
                let r = rust.iter().find(|(t, f, _)| *t == a[0] && *f == a[1]);
                let (_, _, rust_off) =
                    r.unwrap_or_else(|| panic!("{}.{} missing in abi.rs", a[0], a[1]));
                assert_eq!(*rust_off, off, "{}.{}", a[0], a[1]);
                fields += 1;
            } else if let Some(a) = args(line, "HYZO_SIZE") {
                assert_eq!(
                    rust_size(a[0]),
                    a[1].parse::<usize>().unwrap(),
                    "sizeof {}",
                    a[0]
                );
                sizes += 1;
            }
        }
        assert_eq!(
            fields,
            rust.len(),
            "every Rust field is pinned in the header"
        );
        assert_eq!(sizes, 8);
    }

    #[test]
    fn constants_match_the_header() {
        assert_eq!(define("HYZO_THREADS"), THREADS as u64);
        assert_eq!(define("HYZO_GROUP"), GROUP);
        assert_eq!(define("HYZO_CHUNK_GROUPS"), CHUNK_GROUPS);
        assert_eq!(define("HYZO_MAX_TERMS"), MAX_TERMS as u64);
        assert_eq!(define("HYZO_BF16"), crate::dtype::DType::BF16 as u64);
        assert_eq!(define("HYZO_F16"), crate::dtype::DType::F16 as u64);
        assert_eq!(
            define("HYZO_RADEMACHER"),
            crate::direction::DirectionKind::Rademacher as u64
        );
        assert_eq!(
            define("HYZO_COMPENSATED"),
            crate::dtype::Precision::Compensated as u64
        );
        assert_eq!(
            define("HYZO_STATE_FIRST_ORDER"),
            crate::config::StateSet::FirstOrder as u64
        );
        assert_eq!(
            define("HYZO_STOCHASTIC"),
            crate::dtype::Precision::Stochastic as u64
        );
        assert_eq!(define("HYZO_ADAZO"), crate::rules::Rule::AdaZo as u64);
        assert_eq!(define("HYZO_SIGNUM"), crate::rules::Rule::Signum as u64);
        assert_eq!(
            define("HYZO_ONE_SIDED"),
            crate::config::Estimator::OneSided as u64
        );
    }
}
