"""The options of a param group: which must be one for the whole model, how they are
normalized and type-checked here, and how they become a group's C configuration (whose
values the library checks)."""

from __future__ import annotations

import math
import numbers
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


# Float options, which torch lets be a number or a 0-d tensor (a scheduler's ``lr``).
FLOAT_KEYS = ("lr", "eps", "weight_decay", "adam_eps", "hybrid_alpha")
# Integer options and their ranges [lo, hi).
INT_KEYS = {"num_directions": (0, 2**32), "fo_steps": (0, 2**32), "zo_steps": (0, 2**32),
            "rank": (1, 1025)}


def check_group(g: Dict[str, Any], where: str = "") -> None:
    """Normalizes the options of ``g`` in place (enum names as the library spells them,
    ``betas`` a tuple) and checks their types and integer ranges: the one check of a param
    group's own options, run on the constructor's defaults, on every added group and on
    every loaded one. ``where`` prefixes the messages ("param group 1"). The optimizer
    then checks the values with the library."""
    p = f"{where}: " if where else ""
    for k in ENUM_KEYS:
        if k not in g or (k == "fo_rule" and g[k] is None):
            continue
        if not isinstance(g[k], str):
            raise TypeError(f"{p}{k}: expected a string, got {g[k]!r}")
        g[k] = enum_name(g[k])
        if k.endswith("rule"):
            _lib.rule_code(f"{p}{k}", g[k])  # an unknown rule is reported under its own name
    for k in FLOAT_KEYS:
        if k in g:
            check_float(f"{p}{k}", g[k])
    if "betas" in g:
        try:
            betas = tuple(float(b) for b in g["betas"])
        except (TypeError, ValueError):
            betas = ()
        if len(betas) != 2 or isinstance(g["betas"], (str, bytes)):
            raise ValueError(f"{p}betas: expected two floats, got {g['betas']!r}")
        g["betas"] = betas
    if g.get("seed") is not None:
        g["seed"] = _lib.check_int(f"{p}seed", g["seed"], 0, 2**64)
    for k, (lo, hi) in INT_KEYS.items():
        if k in g:
            g[k] = _lib.check_int(f"{p}{k}", g[k], lo, hi)
    if g.get("global_offset") is not None:
        g["global_offset"] = _lib.u64(f"{p}global_offset", g["global_offset"])


def check_float(name: str, v: Any) -> None:
    """A real number or a 0-d floating tensor (not a string, a bool or None)."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and v.is_floating_point():
            return
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        return
    raise TypeError(f"{name}: expected a float, got {v!r}")


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
        fo_lr=r.fo_lr, fo_weight_decay=r.fo_weight_decay, rank=g.get("rank", 1),
        # The front end decides for the whole model (every shard and rank skip together,
        # _gradients.all_finite); a C optimizer's own check would see its shard only.
        skip_nonfinite_grads=False)
