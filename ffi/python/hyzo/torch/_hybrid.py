"""The hybrid first-/zeroth-order optimizer :class:`Hybrid` (spec v2 §5)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ._optimizer import HyzoOptimizer
from ._options import RuleSettings, as_float, optional_nonneg, zo_lr_ratio


class DefaultRule(str):
    """A rule argument the caller left at its default (the paper's rule), which
    :class:`Hybrid` tells from the same name passed explicitly: ``rule=`` excludes an
    explicit ``fo_rule``/``zo_rule``, not a default one."""


_PAPER_FO_RULE = DefaultRule("adamw")
_PAPER_ZO_RULE = DefaultRule("adazo")


class Hybrid(HyzoOptimizer):
    """Hybrid first-/zeroth-order optimizer: blocks of ``fo_steps`` first-order steps and
    ``zo_steps`` zeroth-order steps, starting with first-order (spec v2 §5).

    By default this is the seed paper's optimizer: first-order steps apply AdamW
    (``fo_rule``) and zeroth-order steps AdaZO (``zo_rule``), each with a state and a step
    count ``t`` of its own that the other kind of step never reads or writes. (A shared
    state, spec v1, lets the zeroth-order estimate inflate the first-order second moment and
    starve the first-order steps.) Separate AdamW and AdaZO states take 16 bytes per
    parameter; a stateless zeroth-order rule (``zo_rule="sgd"`` or ``"sign"``) saves 8 of
    them.

    Args:
        params, fo_steps, zo_steps: the parameters (or param groups) and the schedule.
        lr: the group learning rate: of first-order steps, and of zeroth-order steps unless
            ``zo_lr`` is given. Schedulers change it as for any torch optimizer.
        fo_rule: rule of first-order steps, ``"adamw"`` by default (any rule of :class:`ZO`),
            or ``None``: no first-order rule of its own, every step applies ``zo_rule`` to
            one shared state (spec v1's hybrid).
        zo_rule: rule of zeroth-order steps, ``"adazo"`` by default.
        zo_lr: learning rate of zeroth-order steps (``None``: ``lr``). It keeps its ratio to
            ``lr``: the group stores ``zo_lr_ratio = zo_lr / lr`` and zeroth-order steps use
            ``group["lr"] * group["zo_lr_ratio"]``, so a scheduler (or you) changing
            ``group["lr"]`` scales both learning rates alike. A param group may give its own
            ``zo_lr`` (a ratio to its own ``lr``) or ``zo_lr_ratio``.
        weight_decay: decoupled weight decay of first-order steps, and of zeroth-order steps
            unless ``zo_weight_decay`` is given (``None``: ``weight_decay``). Decoupled
            decay is multiplied by each step's learning rate, so it follows schedulers too.
        rule: shorthand for ``fo_rule=None, zo_rule=rule``: one rule and one shared state
            for every step (how ``Hybrid`` was spelled before spec v2); exclusive with
            ``fo_rule``/``zo_rule``.
        betas, adam_eps: shared by both rules.
        hybrid_alpha: ``α`` of the mixed estimate ``α ∇ + (1 − α) ĝ`` of zeroth-order steps
            (an update of ``zo_rule``'s state); with ``α > 0`` every zeroth-order step first
            computes a gradient at the unperturbed point (one extra forward and backward).
        eps, directions, num_directions, estimator, precision, seed, process_group,
            num_threads, rank: as :class:`ZO` (``directions="lowrank"``: call
            :meth:`attach` before the first step; first-order steps see the true weights).
        skip_nonfinite_grads: as :class:`FO`, for first-order steps and the gradient a
            zeroth-order step mixes in (``hybrid_alpha > 0``; checked before its forwards,
            so that a skipped step perturbs nothing).

    ``step(closure)``: in a first-order step, zeroes the gradients, runs ``closure()`` with
    grad enabled, calls ``loss.backward()`` itself (DDP averages the gradients as usual) and
    updates; in a zeroth-order step it behaves as :meth:`ZO.step`. Returns the loss (a
    detached 0-d tensor). ``fo_steps = zo_steps = 0`` means no schedule: pass
    ``phase="fo"`` or ``"zo"`` to every ``step``. Gradient buffers are allocated at
    construction (``p.grad``, zeroed) and registered with the C optimizer; ``zero_grad``
    zeroes them in place; a trainable parameter the loss does not reach gets a zero
    gradient. :attr:`updates` and :attr:`fo_updates` are the step counts ``t`` of the
    zeroth- and first-order states.

    Param group keys: ``lr``, ``fo_rule``, ``zo_rule``, ``zo_lr_ratio``, ``weight_decay``,
    ``zo_weight_decay``, ``betas``, ``adam_eps``, ``precision``, ``hybrid_alpha``,
    ``global_offset``, and the shared ones of :class:`ZO`.
    """

    _needs_grads = True

    def __init__(
        self,
        params: Any,
        fo_steps: int = 20,
        zo_steps: int = 20,
        lr: float = 1e-3,
        eps: float = 1e-3,
        rule: Optional[str] = None,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        directions: str = "gaussian",
        num_directions: int = 1,
        estimator: str = "two_sided",
        precision: str = "nearest",
        seed: Optional[int] = None,
        process_group: Any = None,
        hybrid_alpha: float = 0.0,
        *,
        fo_rule: Optional[str] = _PAPER_FO_RULE,
        zo_rule: str = _PAPER_ZO_RULE,
        zo_lr: Optional[float] = None,
        zo_weight_decay: Optional[float] = None,
        adam_eps: float = 1e-8,
        num_threads: Optional[int] = None,
        rank: int = 1,
        skip_nonfinite_grads: bool = True,
    ) -> None:
        if rule is not None:
            if fo_rule is not _PAPER_FO_RULE or zo_rule is not _PAPER_ZO_RULE:
                raise ValueError("Hybrid: pass either rule (one rule and one shared state for "
                                 "every step) or fo_rule/zo_rule, not both")
            fo_rule, zo_rule = None, rule
        defaults = dict(lr=lr, eps=eps, fo_rule=fo_rule, zo_rule=zo_rule, betas=betas,
                        weight_decay=weight_decay, directions=directions,
                        num_directions=num_directions, estimator=estimator,
                        precision=precision, seed=seed, adam_eps=adam_eps,
                        fo_steps=fo_steps, zo_steps=zo_steps, hybrid_alpha=hybrid_alpha,
                        zo_lr_ratio=zo_lr_ratio(zo_lr, lr, "zo_lr"),
                        zo_weight_decay=zo_weight_decay, rank=rank)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads, skip_nonfinite_grads=skip_nonfinite_grads)

    def _normalize_group(self, group: Dict[str, Any], loaded: bool = False) -> None:
        """A group's ``rule`` becomes ``zo_rule`` with ``fo_rule=None``, its ``zo_lr`` the
        ratio ``zo_lr_ratio`` to its ``lr``; a loaded group of the single-rule Hybrid (before
        spec v2) gets the keys it lacks."""
        super()._normalize_group(group, loaded)
        where = "param group"
        if "rule" in group:
            if "fo_rule" in group or "zo_rule" in group:
                raise ValueError(f"{where}: pass either 'rule' (one shared state) or "
                                 "'fo_rule'/'zo_rule', not both")
            group["zo_rule"] = group.pop("rule")
            group["fo_rule"] = None
        if "zo_lr" in group:
            if "zo_lr_ratio" in group:
                raise ValueError(f"{where}: pass either 'zo_lr' or 'zo_lr_ratio', not both")
            lr = group.get("lr", self.defaults.get("lr"))
            group["zo_lr_ratio"] = zo_lr_ratio(group.pop("zo_lr"), lr, f"{where}: zo_lr")
        if loaded:
            group.setdefault("zo_lr_ratio", None)
            group.setdefault("zo_weight_decay", None)

    def _check_own_options(self, g: Dict[str, Any], prefix: str) -> None:
        for k in ("zo_lr_ratio", "zo_weight_decay"):
            g[k] = optional_nonneg(f"{prefix}{k}", g.get(k))

    def _rule_settings(self, g: Dict[str, Any]) -> RuleSettings:
        # The C optimizer's main rule is the zeroth-order one; fo_lr / fo_weight_decay are
        # always set (they equal lr / weight_decay unless zo_lr / zo_weight_decay differ).
        lr = as_float(g["lr"])
        ratio = g.get("zo_lr_ratio")
        wd = as_float(g["weight_decay"])
        zo_wd = g.get("zo_weight_decay")
        return RuleSettings(rule=g["zo_rule"], lr=lr if ratio is None else lr * float(ratio),
                            weight_decay=wd if zo_wd is None else float(zo_wd),
                            fo_rule=g["fo_rule"], fo_lr=lr, fo_weight_decay=wd)

    def next_phase(self) -> str:
        """``"fo"`` or ``"zo"``: the kind of the next step (``"any"`` without schedule)."""
        self._sync_trainable()
        if not self._shards:  # nothing trainable (yet): the schedule's first step
            g = self.param_groups[0]
            return "any" if g["fo_steps"] == g["zo_steps"] == 0 else (
                "fo" if g["fo_steps"] > 0 else "zo")
        return self._shards[0].c.next_phase()

    def step(self, closure: Optional[Callable[[], Any]] = None,  # type: ignore[override]
             phase: Optional[str] = None) -> torch.Tensor:
        """One step of the kind the schedule calls for (or ``phase``: ``"fo"``/``"zo"``)."""
        self._prepare()
        scheduled = self.next_phase()
        if phase is None:
            if scheduled == "any":
                raise ValueError("step: no hybrid schedule (fo_steps = zo_steps = 0): pass "
                                 "phase='fo' or phase='zo'")
            phase = scheduled
        if phase not in ("fo", "zo"):
            raise ValueError(f"phase: expected 'fo' or 'zo', got {phase!r}")
        if scheduled != "any" and phase != scheduled:
            raise ValueError(f"phase: the hybrid schedule calls for a {scheduled!r} step")
        if phase == "fo":
            loss = self._compute_grads(closure)  # type: ignore[arg-type]
            if not self._skips_nonfinite(self._shards):
                for s in self._shards:
                    s.c.fo_step()
            return loss
        if any(as_float(g["hybrid_alpha"]) > 0 for g in self.param_groups):
            loss = self._compute_grads(closure)  # type: ignore[arg-type]
            # Checked before the forwards: a skipped step perturbs nothing.
            if self._skips_nonfinite(self._shards):
                return loss
        with torch.no_grad():
            return self._zo_step(closure)  # type: ignore[arg-type]
