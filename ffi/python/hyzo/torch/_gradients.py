"""Gradients of first-order steps: the buffers registered with the library hold them, so
backward() accumulates into memory the C optimizer reads, with no copy; gradients that
arrive another way (``.grad`` replaced or set to None) are copied in at the step."""

from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch

from ._registration import GroupShard


def zero(shards: Sequence[GroupShard]) -> None:
    """Zeroes every registered gradient buffer in place."""
    for s in shards:
        for gbuf in s.grads:
            if gbuf is not None:
                gbuf.zero_()


def collect(s: GroupShard, none_is_skip: bool) -> List[int]:
    """Makes the registered buffers of shard ``s`` hold the gradients (``p.grad`` may have
    been set to None or replaced, e.g. by ``model.zero_grad()``): copies when needed.
    Returns the indices of parameters whose ``.grad`` is None: with ``none_is_skip`` they
    are left None (to be skipped), otherwise they get a zero gradient."""
    missing: List[int] = []
    with torch.no_grad():
        for i, (p, gbuf) in enumerate(zip(s.params, s.grads)):
            if gbuf is None:
                continue
            g = p.grad
            if g is gbuf:
                continue
            if g is None:
                gbuf.zero_()
                if none_is_skip:
                    missing.append(i)
                    continue
            elif g.is_sparse:
                gbuf.copy_(g.to_dense())
            elif g.data_ptr() != gbuf.data_ptr():
                gbuf.copy_(g)
            p.grad = gbuf
    return missing


def compute(shards: Sequence[GroupShard], closure: Callable[[], Any]) -> torch.Tensor:
    """Zeroes the gradients, runs the closure with grad enabled and ``backward()``."""
    if closure is None:
        raise ValueError("step: a first-order step of Hybrid needs a closure that returns "
                         "the loss (the optimizer calls backward() itself)")
    zero(shards)
    with torch.enable_grad():
        loss = closure()
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise TypeError("closure: a first-order step needs the loss as a tensor that "
                            "requires grad (computed from the parameters)")
        loss.backward()
    for s in shards:
        collect(s, none_is_skip=False)
    return loss.detach()
