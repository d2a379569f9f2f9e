"""The zeroth-order optimizer :class:`ZO`."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ._optimizer import HyzoOptimizer
from ._options import as_float


class ZO(HyzoOptimizer):
    """Zeroth-order optimizer: ``step(closure)`` estimates the gradient from loss values.

    Args:
        params: parameters or param groups (dicts with ``params`` and per-group options).
            Parameters with ``requires_grad=False`` are left alone.
        lr: learning rate.
        eps: smoothing radius ``μ`` of the finite differences.
        rule: update rule: ``"sgd"``, ``"momentum"``, ``"sign"``, ``"signum"``, ``"adamw"``,
            ``"adazo"``.
        betas: ``(β1, β2)`` of momentum / signum / AdamW / AdaZO.
        weight_decay: decoupled weight decay ``λ``.
        directions: ``"gaussian"``, ``"rademacher"``, ``"sphere"`` or ``"lowrank"`` (spec
            v3 §7: the 2-D weights of the ``nn.Linear``/``nn.Embedding`` modules of the model
            given to :meth:`attach` get rank-``rank`` directions ``A Bᵀ / sqrt(r)``, added by
            forward hooks and never written during a step; every other tensor gets the
            written Gaussian). Needs ``opt.attach(model)`` before the first step.
        num_directions: directions ``q`` per step (at most 65536).
        estimator: ``"two_sided"`` (``2q`` evaluations) or ``"one_sided"`` (``q + 1``).
        precision: rounding of f16/bf16 parameters: ``"nearest"``, ``"stochastic"``,
            ``"compensated"``.
        seed: the seed naming every direction of the run; ``None`` draws one from torch's
            default generator (broadcast from rank 0 with a process group).
        process_group: all-reduce (mean) each loss over this group (``True``: the world).
        adam_eps: Adam's ``ε``.
        num_threads: threads of the CPU backend per C optimizer (``None``: all cores; at
            most 1024).
        rank: rank ``r`` of ``directions="lowrank"`` (1 to 1024; a weight with fewer rows or
            columns takes ``min(r, rows, cols)``).

    ``step(closure)`` calls ``closure()`` ``2q`` (two-sided) or ``q + 1`` (one-sided) times
    under ``torch.no_grad()`` and returns a detached 0-d tensor: the loss at the unperturbed
    point for the one-sided estimator, the mean of the ``2q`` perturbed losses for the
    two-sided one (which equals the unperturbed loss up to ``O(μ²)``). If the closure raises,
    the step is abandoned (parameters restored) and the exception propagates. A step whose
    losses or projected gradients are not finite updates nothing (parameters restored, state
    untouched) and counts in :attr:`skipped`.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        eps: float = 1e-3,
        rule: str = "sgd",
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        directions: str = "gaussian",
        num_directions: int = 1,
        estimator: str = "two_sided",
        precision: str = "nearest",
        seed: Optional[int] = None,
        process_group: Any = None,
        *,
        adam_eps: float = 1e-8,
        num_threads: Optional[int] = None,
        rank: int = 1,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, rule=rule, betas=betas, weight_decay=weight_decay,
                        directions=directions, num_directions=num_directions,
                        estimator=estimator, precision=precision, seed=seed,
                        adam_eps=adam_eps, fo_steps=0, zo_steps=0, hybrid_alpha=0.0,
                        rank=rank)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads)

    def _check_own_options(self, g: Dict[str, Any], prefix: str) -> None:
        if as_float(g["hybrid_alpha"]) != 0:
            raise ValueError(f"{prefix}hybrid_alpha={g['hybrid_alpha']!r} mixes a gradient "
                             "into zeroth-order steps; ZO computes none (use Hybrid)")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step (see the class documentation)."""
        self._prepare()
        return self._zo_step(closure)  # type: ignore[arg-type]
