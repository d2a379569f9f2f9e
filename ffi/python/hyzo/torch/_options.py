"""The options of a param group: which must be one for the whole model, how they are
normalized and type-checked here, and how they become a group's C configuration (whose
values the library checks)."""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

import torch

from .. import _lib

# Options that define the perturbation, its schedule and its seed: one value for the whole
# model, because every group's C optimizer perturbs its shard with the same directions and
# steps in lockstep with the others (the protocol reads them from group 0).
MODEL_WIDE_KEYS = ("eps", "directions", "num_directions", "estimator", "seed", "fo_steps",
                   "zo_steps", "rank")
# Options naming an enum value, normalized to lower case with underscores.
ENUM_KEYS = ("rule", "fo_rule", "zo_rule", "directions", "estimator", "precision")


class RuleSettings(NamedTuple):
    """The rule fields of a group's C configuration: the main (zeroth-order) rule with its
    learning rate and weight decay, and the first-order rule's (None: not set)."""

    rule: str
    lr: float
    weight_decay: float
    fo_rule: Optional[str] = None
    fo_lr: Optional[float] = None
    fo_weight_decay: Optional[float] = None


def enum_name(v: str) -> str:
    return v.lower().replace("-", "_")


def normalize_enums(g: Dict[str, Any]) -> None:
    """Spells a group's enum options as the library names them (``"Two-Sided"`` ->
    ``"two_sided"``), so that groups compare equal however their options were written."""
    for k in ENUM_KEYS:
        if isinstance(g.get(k), str):
            g[k] = enum_name(g[k])


def check_options(**kw: Any) -> Dict[str, Any]:
    """Normalizes the options (enum names lower-case) and checks their types early; the
    optimizer checks the values with the library."""
    for k in ENUM_KEYS:
        if k not in kw or (k == "fo_rule" and kw[k] is None):
            continue
        if not isinstance(kw[k], str):
            raise TypeError(f"{k}: expected a string, got {kw[k]!r}")
        kw[k] = enum_name(str(kw[k]))
        if k.endswith("rule"):
            _lib.rule_code(k, kw[k])  # an unknown rule is reported under its own name
    try:
        kw["betas"] = tuple(float(b) for b in kw["betas"])
    except (TypeError, ValueError):
        raise ValueError(f"betas: expected two floats, got {kw['betas']!r}") from None
    if len(kw["betas"]) != 2:
        raise ValueError(f"betas: expected two floats, got {kw['betas']!r}")
    if kw["seed"] is not None:
        kw["seed"] = _lib.check_int("seed", kw["seed"], 0, 2**64)
    kw["rank"] = _lib.check_int("rank", kw.get("rank", 1), 1, 1025)
    kw["global_offset"] = None
    return kw


def optional_nonneg(name: str, v: Any) -> Optional[float]:
    """None, or a finite float >= 0."""
    if v is None:
        return None
    f = as_float(v)
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"{name}: expected a finite float >= 0 or None, got {v!r}")
    return f


def zo_lr_ratio(zo_lr: Any, lr: Any, name: str) -> Optional[float]:
    """``zo_lr / lr``, the ratio zeroth-order steps keep to the group's lr (so that a
    scheduler scaling ``lr`` scales both)."""
    zo = optional_nonneg(name, zo_lr)
    if zo is None:
        return None
    base = as_float(lr)
    if zo == 0:
        return 0.0
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"{name}: {zo} cannot be kept as a ratio to lr = {lr!r}; give lr > 0 "
                         "(zeroth-order steps use lr * zo_lr / lr_at_construction)")
    return zo / base


def as_float(v: Any) -> float:
    """A float option, which torch lets be a 0-d tensor (a scheduler's ``lr``)."""
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


def config_of(g: Dict[str, Any], r: RuleSettings) -> _lib.hyzo_config:
    """The C configuration of param group ``g`` with rule settings ``r``."""
    seed = g.get("seed")
    return _lib.make_config(
        lr=r.lr, eps=g["eps"], rule=r.rule, betas=g["betas"], adam_eps=g["adam_eps"],
        weight_decay=r.weight_decay, directions=g["directions"],
        num_directions=g["num_directions"], estimator=g["estimator"],
        precision=g["precision"], seed=0 if seed is None else seed, fo_steps=g["fo_steps"],
        zo_steps=g["zo_steps"], hybrid_alpha=g["hybrid_alpha"], fo_rule=r.fo_rule,
        fo_lr=r.fo_lr, fo_weight_decay=r.fo_weight_decay, rank=g.get("rank", 1))
