"""The first-order optimizer :class:`FO` on hyzo's kernels."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from . import _gradients
from ._optimizer import HyzoOptimizer
from ._options import check_options


class FO(HyzoOptimizer):
    """First-order optimizer on hyzo's kernels (AdamW, AdaZO, SGD, momentum, sign, signum),
    a drop-in for ``torch.optim.AdamW``: compute ``loss.backward()`` as usual, then
    ``step()``; ``step(closure)`` follows torch (the closure zeroes the gradients, calls
    ``backward()`` and returns the loss).

    Args:
        params, lr, weight_decay, precision, num_threads: as :class:`ZO`.
        betas: ``(β1, β2)``.
        eps: Adam's ``ε`` (torch's meaning; there is no smoothing radius here).
        rule: ``"adamw"`` (default), ``"adazo"``, ``"sgd"``, ``"momentum"``, ``"sign"``,
            ``"signum"``.
        seed: seeds stochastic rounding (``precision="stochastic"``).

    Gradients: a parameter whose ``.grad`` is ``None`` at ``step()`` is skipped, as
    ``torch.optim.AdamW`` skips it: its values, its moments and its residual stay exactly as
    they were (no update, no weight decay, no decay of the moments). One difference
    remains: hyzo counts the bias-correction step ``t`` per param group, torch per
    parameter, so a parameter that receives its first gradient late is corrected with the
    group's ``t``. A group whose parameters all have ``.grad`` None is not stepped at all
    (nothing changes, as in torch). ``zero_grad()`` zeroes the gradient buffers in place (as torch's
    ``set_to_none=False``, so that ``backward()`` accumulates into the buffers hyzo holds,
    with no copy): a parameter the next loss does not reach then has a zero gradient and is
    updated with it, as ``torch.optim.AdamW`` does after ``zero_grad(set_to_none=False)``.
    Gradients set another way (``model.zero_grad()``, a new tensor in ``.grad``) are copied
    into hyzo's buffers at ``step()``.
    """

    _needs_grads = True
    _assign_grads_at_build = False

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rule: str = "adamw",
        precision: str = "nearest",
        seed: Optional[int] = None,
        *,
        num_threads: Optional[int] = None,
    ) -> None:
        defaults = check_options(lr=lr, eps=1e-3, rule=rule, betas=betas, weight_decay=weight_decay,
                             directions="gaussian", num_directions=1, estimator="two_sided",
                             precision=precision, seed=seed, adam_eps=eps, fo_steps=0,
                             zo_steps=0, hybrid_alpha=0.0)
        super().__init__(params, defaults, num_threads=num_threads)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """A first-order step on the parameters' ``.grad`` (``None``: skipped, see above)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare()
        for s in self._shards:
            missing = set(_gradients.collect(s, none_is_skip=True))
            if len(missing) == len(s.params):
                continue  # nothing to update in this group: it is not stepped at all
            if missing:
                # As torch.optim: no update, no moment decay, no weight decay for them.
                s.c.fo_step_masked([i not in missing for i in range(len(s.params))])
            else:
                s.c.fo_step()
        return loss
