"""Gradients of first-order steps: the buffers registered with the library hold them, so
backward() accumulates into memory the C optimizer reads, with no copy; gradients that
arrive another way (``.grad`` replaced or set to None) are copied in at the step."""

from __future__ import annotations

from typing import Any, Callable, Collection, List, Optional, Sequence

import torch
import torch.distributed as dist

from ._protocol import collective_device
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


def all_finite(shards: Sequence[GroupShard], pg: Any,
               missing: Optional[Sequence[Collection[int]]] = None) -> bool:
    """Whether every gradient the step would apply (all registered ones but the indices in
    ``missing[k]`` of shard ``k``) is finite, over every shard and, with a process group,
    every rank: one decision for the whole model, as ``torch.amp.GradScaler`` makes one per
    step, so that the shards skip together and stay in lockstep. (Each C optimizer's own
    check sees its shard only.) One synchronization with the host."""
    flags: List[torch.Tensor] = []
    for k, s in enumerate(shards):
        skip = missing[k] if missing is not None else ()
        grads = [g for i, g in enumerate(s.grads) if g is not None and i not in skip]
        if grads:
            # The max-norm is NaN or Inf exactly when some element is; no n-sized temporary.
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))])
            flags.append(torch.isfinite(norms).all().cpu())
    bad = torch.tensor([0 if all(bool(f) for f in flags) else 1], dtype=torch.int32)
    if pg is not None:
        r = bad.to(collective_device(pg))
        dist.all_reduce(r, op=dist.ReduceOp.MAX, group=pg)
        bad = r.cpu()
    return int(bad.item()) == 0
