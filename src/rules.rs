//! The update rules of the spec (§5), one function per rule, applied elementwise by every
//! backend. The CUDA kernels mirror [`apply`] operation for operation (IEEE f32, no fused
//! multiply-add), so CPU and GPU agree to the bit given the same inputs.

/// An update rule. The values are those of the C ABI's `hyzo_rule` and of the kernels'
/// `HYZO_SGD`..., tied in `src/ffi/enums.rs` (at compile time) and `src/backend/cuda/abi.rs`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `θ ← θ − η (ĝ + λ θ)`
    Sgd = 0,
    /// `m ← β1 m + ĝ`; `θ ← θ − η (m + λ θ)`
    Momentum = 1,
    /// `θ ← θ − η (sign(ĝ) + λ θ)`
    Sign = 2,
    /// `m ← β1 m + (1 − β1) ĝ`; `θ ← θ − η (sign(m) + λ θ)`
    Signum = 3,
    /// Adam with decoupled weight decay.
    AdamW = 4,
    /// AdamW whose second moment tracks the momentum: `v ← β2 v + (1 − β2) m²`.
    AdaZo = 5,
}

impl Rule {
    /// All rules, in ABI order.
    pub const ALL: [Rule; 6] = [
        Rule::Sgd,
        Rule::Momentum,
        Rule::Sign,
        Rule::Signum,
        Rule::AdamW,
        Rule::AdaZo,
    ];

    /// How many fp32 state buffers (`m`, then `v`) the rule keeps per element.
    pub fn state_buffers(self) -> usize {
        match self {
            Rule::Sgd | Rule::Sign => 0,
            Rule::Momentum | Rule::Signum => 1,
            Rule::AdamW | Rule::AdaZo => 2,
        }
    }

    /// Parses `sgd`, `momentum`, `sign`, `signum`, `adamw` or `adazo`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sgd" => Rule::Sgd,
            "momentum" => Rule::Momentum,
            "sign" => Rule::Sign,
            "signum" => Rule::Signum,
            "adamw" => Rule::AdamW,
            "adazo" => Rule::AdaZo,
            _ => return None,
        })
    }
}

/// Everything a rule needs for one update, with the bias corrections of step `t` computed
/// once on the host. Shared with the kernels (`kernels/hyzo_params.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RuleParams {
    /// [`Rule`] as its ABI value.
    pub rule: u32,
    /// Learning rate `η`.
    pub lr: f32,
    /// `β1`.
    pub beta1: f32,
    /// `β2`.
    pub beta2: f32,
    /// Adam's `ε`.
    pub eps: f32,
    /// Weight decay `λ`.
    pub weight_decay: f32,
    /// `1 − β1^t`.
    pub bias_correction1: f32,
    /// `1 − β2^t`.
    pub bias_correction2: f32,
}

impl RuleParams {
    /// The parameters of update number `t` (1-based).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rule: Rule,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        t: u64,
    ) -> Self {
        Self {
            rule: rule as u32,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            bias_correction1: bias_correction(beta1, t),
            bias_correction2: bias_correction(beta2, t),
        }
    }

    /// The rule.
    pub fn rule(&self) -> Rule {
        Rule::ALL[self.rule as usize]
    }
}

/// `1 − β^t` rounded to f32, with `β^t` by binary exponentiation in f64 (square and
/// multiply from the low bit). Spelled out rather than `powi` so that the CUDA kernels,
/// which compute it on the device when `t` lives there (`hyzo_bias_correction`), get the
/// same bits; any `t` up to `u64::MAX` is defined.
pub fn bias_correction(beta: f32, t: u64) -> f32 {
    let mut base = beta as f64;
    let mut power = 1.0f64;
    let mut e = t;
    while e != 0 {
        if e & 1 == 1 {
            power *= base;
        }
        e >>= 1;
        if e != 0 {
            base *= base;
        }
    }
    (1.0 - power) as f32
}

/// `sign(x)` with `sign(0) = 0` (and NaN propagated).
#[inline(always)]
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x * 0.0
    }
}

/// Applies one update to the parameter value `theta` with estimate `g`; `m` and `v` are the
/// element's state (ignored by rules that keep none). Returns the new value, unrounded.
#[inline(always)]
pub fn apply(p: &RuleParams, theta: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
    match p.rule {
        0 => apply_rule::<0>(p, theta, g, m, v),
        1 => apply_rule::<1>(p, theta, g, m, v),
        2 => apply_rule::<2>(p, theta, g, m, v),
        3 => apply_rule::<3>(p, theta, g, m, v),
        4 => apply_rule::<4>(p, theta, g, m, v),
        _ => apply_rule::<5>(p, theta, g, m, v),
    }
}

/// [`apply`] for the rule with ABI value `RULE`, fixed at compile time so that a loop over
/// elements has no per-element dispatch (and vectorises); `p.rule` is not read.
#[inline(always)]
pub fn apply_rule<const RULE: u32>(
    p: &RuleParams,
    theta: f32,
    g: f32,
    m: &mut f32,
    v: &mut f32,
) -> f32 {
    let decay = p.weight_decay * theta;
    let step = match RULE {
        0 => g + decay,
        1 => {
            *m = p.beta1 * *m + g;
            *m + decay
        }
        2 => sign(g) + decay,
        3 => {
            *m = p.beta1 * *m + (1.0 - p.beta1) * g;
            sign(*m) + decay
        }
        _ => {
            *m = p.beta1 * *m + (1.0 - p.beta1) * g;
            let second = if RULE == Rule::AdamW as u32 { g } else { *m };
            *v = p.beta2 * *v + (1.0 - p.beta2) * (second * second);
            let m_hat = *m / p.bias_correction1;
            let v_hat = *v / p.bias_correction2;
            m_hat / (v_hat.sqrt() + p.eps) + decay
        }
    };
    theta - p.lr * step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let p = RuleParams::new(Rule::AdamW, 0.1, 0.9, 0.999, 1e-8, 0.0, 1);
        let (mut m, mut v) = (0.0, 0.0);
        let out = apply(&p, 1.0, 3.0, &mut m, &mut v);
        assert!((out - 0.9).abs() < 1e-6, "{out}");
    }

    #[test]
    fn bias_correction_matches_the_f64_power() {
        for (beta, t) in [
            (0.9f32, 1u64),
            (0.999, 10),
            (0.999, 1000),
            (0.9, 0),
            (0.5, 64),
        ] {
            let want = (1.0 - (beta as f64).powf(t as f64)) as f32;
            let got = bias_correction(beta, t);
            assert!(
                (got - want).abs() <= f32::EPSILON * want.abs(),
                "{beta}^{t}: {got} vs {want}"
            );
        }
        assert_eq!(bias_correction(0.9, 0), 0.0);
        assert_eq!(bias_correction(0.999, u64::MAX), 1.0);
    }

    #[test]
    fn sign_of_zero_is_zero() {
        assert_eq!(sign(0.0), 0.0);
        assert_eq!(sign(-2.0), -1.0);
        assert!(sign(f32::NAN).is_nan());
    }
}
