"""The first-order optimizer :class:`FO` on hyzo's kernels."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .. import _lib
from . import _gradients
from ._optimizer import HyzoOptimizer
from ._options import RuleSettings, as_float, config_of, enum_name

# The options of zeroth-order steps, which FO has none of: its C configuration takes the
# library's defaults for them, and its param groups do not hold them ("eps" is Adam's, as
# in torch.optim.AdamW). The zeroth-order "eps" (the smoothing radius) is the same default.
_ZEROTH_ORDER = ("directions", "num_directions", "estimator", "fo_steps", "zo_steps",
                 "hybrid_alpha", "rank")


class FO(HyzoOptimizer):
    """First-order optimizer on hyzo's kernels (AdamW, AdaZO, SGD, momentum, sign, signum),
    a drop-in for ``torch.optim.AdamW``: the same arguments, defaults and param group keys
    (``lr``, ``betas``, ``eps``, ``weight_decay``); compute ``loss.backward()`` as usual,
    then ``step()``; ``step(closure)`` follows torch (the closure zeroes the gradients,
    calls ``backward()`` and returns the loss).

    Args:
        params, precision, num_threads: as :class:`ZO`.
        lr: learning rate (``1e-3``, as AdamW).
        betas: ``(β1, β2)`` (``(0.9, 0.999)``, as AdamW).
        eps: Adam's ``ε``, added to the root of the second moment (``1e-8``, as AdamW).
        weight_decay: decoupled weight decay ``λ``, multiplied by the learning rate
            (``1e-2``, AdamW's default), for every rule.
        rule: ``"adamw"`` (default), ``"adazo"``, ``"sgd"``, ``"momentum"``, ``"sign"``,
            ``"signum"``.
        seed: seeds stochastic rounding (``precision="stochastic"``).
        skip_nonfinite_grads: ``True`` (default): a step whose gradients hold a NaN or an
            infinity anywhere in the model is skipped, as ``torch.amp.GradScaler`` skips it:
            no parameter or state changes, :attr:`skipped` counts it. One decision for every
            param group and every rank of ``process_group``, so that the shards stay in
            lockstep; it costs one pass over the gradients and one host synchronization per
            step. ``False``: the rule applies the gradients as they are, as ``torch.optim``.
        process_group: with sharded parameters (FSDP), the ranks that decide together
            whether a step is skipped (``None``: this process alone).

    Param group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``rule``,
    ``precision``, ``global_offset``, ``seed`` (one for every group). The group key
    ``adam_eps`` of earlier versions (Adam's ``ε`` while ``eps`` named an unused smoothing
    radius) is still read, as ``eps``, with a :class:`DeprecationWarning`; state dicts saved
    then load unchanged. Options of zeroth-order steps (``directions``, ``num_directions``,
    ``estimator``, ``fo_steps``, ``zo_steps``, ``hybrid_alpha``, ``rank``) are refused.

    Against ``torch.optim.AdamW`` on float32 parameters: the same update, rounded in
    another order (hyzo: ``θ − η (m̂ / (√v̂ + ε) + λ θ)`` in f32, with ``1 − β^t`` from f64;
    torch: ``θ (1 − ηλ)``, then ``θ − (η / (1 − β1^t)) m / (√v / √(1 − β2^t) + ε)``), so
    the parameters agree to a few float32 roundings per step, not bit for bit (tested).

    Gradients: a parameter whose ``.grad`` is ``None`` at ``step()`` is skipped, as
    ``torch.optim.AdamW`` skips it: its values, its moments and its residual stay exactly as
    they were (no update, no weight decay, no decay of the moments). One difference
    remains: hyzo counts the bias-correction step ``t`` per param group, torch per
    parameter, so a parameter that receives its first gradient late is corrected with the
    group's ``t``. A group whose parameters all have ``.grad`` None is not stepped at all
    (nothing changes, as in torch). ``zero_grad()`` zeroes the gradient buffers in place (as
    torch's ``set_to_none=False``, so that ``backward()`` accumulates into the buffers hyzo
    holds, with no copy): a parameter the next loss does not reach then has a zero gradient
    and is updated with it, as ``torch.optim.AdamW`` does after
    ``zero_grad(set_to_none=False)``. Gradients set another way (``model.zero_grad()``, a
    new tensor in ``.grad``) are copied into hyzo's buffers at ``step()``.
    """

    _needs_grads = True
    _assign_grads_at_build = False
    _model_wide_keys = ("seed",)
    # A group whose parameters all lack a gradient is not stepped: groups may differ.
    _lockstep = False

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rule: str = "adamw",
        precision: str = "nearest",
        seed: Optional[int] = None,
        *,
        num_threads: Optional[int] = None,
        skip_nonfinite_grads: bool = True,
        process_group: Any = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rule=rule,
                        precision=precision, seed=seed)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads, skip_nonfinite_grads=skip_nonfinite_grads)

    def _normalize_group(self, group: Dict[str, Any], loaded: bool = False) -> None:
        """``adam_eps`` becomes ``eps``: with a DeprecationWarning in a group given now; in
        a loaded group of an earlier version (which held the unused smoothing radius under
        ``eps`` and the options of zeroth-order steps at the library's defaults), silently,
        and the zeroth-order options are dropped."""
        if "adam_eps" in group:
            if loaded:
                group.pop("eps", None)  # the smoothing radius, which FO never used
                for k in _ZEROTH_ORDER:
                    if k not in group:
                        continue
                    v, fixed = group.pop(k), _lib.CONFIG_DEFAULTS[k]
                    if (enum_name(v) if isinstance(v, str) else v) != fixed:
                        raise ValueError(
                            f"load_state_dict: param group: {k}={v!r}, an option of "
                            f"zeroth-order steps, which FO has none of (expected {fixed!r})")
            else:
                if "eps" in group:
                    raise ValueError("param group: pass 'eps' (Adam's epsilon), not both it "
                                     "and 'adam_eps' (its earlier name)")
                warnings.warn("hyzo.torch.FO: the param group key 'adam_eps' is now 'eps' "
                              "(Adam's epsilon, as in torch.optim.AdamW)", DeprecationWarning,
                              stacklevel=3)
            group["eps"] = group.pop("adam_eps")

    def _check_own_options(self, g: Dict[str, Any], prefix: str) -> None:
        given = [k for k in _ZEROTH_ORDER if k in g]
        if given:
            raise ValueError(f"{prefix}{', '.join(given)}: options of zeroth-order steps, which "
                             "FO has none of")

    def _rule_settings(self, g: Dict[str, Any]) -> RuleSettings:
        return RuleSettings(rule=g["rule"], lr=as_float(g["lr"]),
                            weight_decay=as_float(g["weight_decay"]))

    def _config_of(self, g: Dict[str, Any]) -> _lib.hyzo_config:
        # The group's eps is Adam's; the zeroth-order fields keep the library's defaults.
        fixed = {k: _lib.CONFIG_DEFAULTS[k] for k in _ZEROTH_ORDER + ("eps",)}
        return config_of({**g, **fixed, "adam_eps": g["eps"]}, self._rule_settings(g))

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """A first-order step on the parameters' ``.grad`` (``None``: skipped, see above)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare()
        stepped, missing_of = [], []
        for s in self._shards:
            missing = set(_gradients.collect(s, none_is_skip=True))
            if len(missing) == len(s.params):
                continue  # nothing to update in this group: it is not stepped at all
            stepped.append(s)
            missing_of.append(missing)
        if self._skips_nonfinite(stepped, missing_of):
            return loss
        for s, missing in zip(stepped, missing_of):
            if missing:
                # As torch.optim: no update, no moment decay, no weight decay for them.
                s.c.fo_step_masked([i not in missing for i in range(len(s.params))])
            else:
                s.c.fo_step()
        return loss
