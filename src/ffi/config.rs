//! The C configuration struct and its conversion to the core `Config`.

use super::*;

/// The core configuration of a C one; every field checked, the message naming it.
pub(crate) fn config_from_c(c: &hyzo_config) -> Result<Config> {
    let config = Config {
        seed: c.seed,
        lr: c.lr,
        eps: c.eps,
        num_directions: c.num_directions,
        direction: direction_from(c.direction, "cfg->direction")?,
        estimator: estimator_from(c.estimator, "cfg->estimator")?,
        rule: rule_from(c.rule, "cfg->rule")?,
        beta1: c.beta1,
        beta2: c.beta2,
        adam_eps: c.adam_eps,
        weight_decay: c.weight_decay,
        precision: precision_from(c.precision, "cfg->precision")?,
        fo_steps: c.fo_steps,
        zo_steps: c.zo_steps,
        hybrid_alpha: c.hybrid_alpha,
        fo_rule: fo_rule_from(c.fo_rule, "cfg->fo_rule")?,
        fo_lr: unset_if_nan(c.fo_lr),
        fo_weight_decay: unset_if_nan(c.fo_weight_decay),
        rank: c.rank,
    };
    // The core names the field; prefix it with the argument.
    config.validate().map_err(|e| match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("cfg->{m}")),
        other => other,
    })?;
    Ok(config)
}

pub(crate) fn config_to_c(c: &Config) -> hyzo_config {
    hyzo_config {
        seed: c.seed,
        lr: c.lr,
        eps: c.eps,
        num_directions: c.num_directions,
        direction: c_direction(c.direction) as u32,
        estimator: c_estimator(c.estimator) as u32,
        rule: c_rule(c.rule) as u32,
        beta1: c.beta1,
        beta2: c.beta2,
        adam_eps: c.adam_eps,
        weight_decay: c.weight_decay,
        precision: c_precision(c.precision) as u32,
        fo_steps: c.fo_steps,
        zo_steps: c.zo_steps,
        hybrid_alpha: c.hybrid_alpha,
        fo_rule: fo_rule_to_c(c.fo_rule),
        fo_lr: c.fo_lr.unwrap_or(f32::NAN),
        fo_weight_decay: c.fo_weight_decay.unwrap_or(f32::NAN),
        rank: c.rank,
    }
}

/// # Safety
/// `cfg` is NULL or points to a readable `hyzo_config`.
pub(crate) unsafe fn read_config(cfg: *const hyzo_config) -> Result<Config> {
    if cfg.is_null() {
        return Err(invalid_arg("cfg: null pointer"));
    }
    if cfg as usize % std::mem::align_of::<hyzo_config>() != 0 {
        return Err(invalid_arg("cfg: misaligned pointer"));
    }
    config_from_c(&*cfg)
}

/// The defaults: ZO-SGD, one Gaussian direction, two-sided, `lr = eps = 1e-3`, seed 0,
/// `beta1 = 0.9`, `beta2 = 0.999`, `adam_eps = 1e-8`, no weight decay, nearest rounding,
/// no hybrid schedule, `hybrid_alpha = 0`, no first-order rule of its own
/// (`fo_rule = HYZO_RULE_NONE`, `fo_lr = fo_weight_decay = NaN`: as `lr`, `weight_decay`).
#[no_mangle]
pub extern "C" fn hyzo_config_default() -> hyzo_config {
    catch_unwind(|| config_to_c(&Config::default())).unwrap_or(hyzo_config {
        // Unreachable in practice; a configuration every create call rejects.
        seed: 0,
        lr: f32::NAN,
        eps: f32::NAN,
        num_directions: 0,
        direction: 0,
        estimator: 0,
        rule: 0,
        beta1: 0.0,
        beta2: 0.0,
        adam_eps: 0.0,
        weight_decay: 0.0,
        precision: 0,
        fo_steps: 0,
        zo_steps: 0,
        hybrid_alpha: 0.0,
        fo_rule: hyzo_rule::HYZO_RULE_NONE as u32,
        fo_lr: f32::NAN,
        fo_weight_decay: f32::NAN,
        rank: 0,
    })
}
