"""The step protocol across param groups: every group's C optimizer begins a zeroth-order
step, is fed each loss and ends it together (or is aborted together), so that the model is
perturbed and updated as one; with a process group, each loss is all-reduced first."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import _lib
from . import _lowrank
from ._registration import GroupShard


def collective_device(pg: Any) -> torch.device:
    """The device collectives of ``pg`` take tensors on (cuda for NCCL, cpu otherwise)."""
    try:
        backend = dist.get_backend(pg)
    except Exception:  # pragma: no cover
        backend = "gloo"
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def draw_seed(pg: Any) -> int:
    """A seed from torch's default generator (so ``torch.manual_seed`` fixes it); with a
    process group, rank 0's seed is broadcast so every rank perturbs alike."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if pg is not None:
        t = seed.to(collective_device(pg))
        dist.broadcast(t, src=dist.get_global_rank(pg, 0)
                       if pg is not dist.group.WORLD else 0, group=pg)
        seed = t.cpu()
    return int(seed.item())


def loss_tensor(loss: Any, pg: Any) -> torch.Tensor:
    """The closure's loss as a 0-d float32 tensor, all-reduced (mean) over ``pg``."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"closure: the loss must be a scalar, got shape "
                             f"{tuple(loss.shape)}")
        t = loss.detach().reshape(()).to(torch.float32)
    elif isinstance(loss, (float, int)):
        t = torch.tensor(float(loss), dtype=torch.float32)
    else:
        raise TypeError(f"closure: must return the loss (a tensor or float), got "
                        f"{type(loss).__name__}")
    if pg is not None:
        r = t.to(collective_device(pg), copy=True)
        dist.all_reduce(r, op=dist.ReduceOp.SUM, group=pg)
        r /= dist.get_world_size(pg)
        t = r if r.device == t.device else r.to(t.device)
    return t.contiguous()


def feed(shards: Sequence[GroupShard], loss: torch.Tensor) -> bool:
    """Feeds one loss to every shard (a device pointer where the loss is on the shard's
    GPU: no host synchronization); whether another evaluation is needed."""
    flags = []
    host: Optional[float] = None
    for s in shards:
        if s.device.type == "cuda" and loss.device == s.device:
            flags.append(s.c.feed_device(loss.data_ptr()))
        else:
            if host is None:
                host = float(loss.item())
            flags.append(s.c.feed(host))
    if any(f != flags[0] for f in flags):  # pragma: no cover - the shards run in lockstep
        raise _lib.InternalError("hyzo: shards disagree on the protocol of a step")
    return flags[0]


def abort(shards: Sequence[GroupShard]) -> None:
    """Abandons the step in progress in ``shards`` (parameters restored); best effort:
    one failing abort does not keep the others from restoring."""
    for s in shards:
        try:
            s.c.abort()
        except _lib.HyzoError:
            pass


def begin(shards: Sequence[GroupShard], directions: str, q: int, pg: Any) -> None:
    """Begins a zeroth-order step in every shard, or in none: if one cannot begin, the ones
    already begun are aborted (their parameters restored) before the error propagates, so
    no group is left perturbed and the optimizer stays usable. A sphere direction is
    normalized over the whole model: the squared norms of every shard (and rank) are
    summed first."""
    norms: Optional[List[float]] = None
    if directions == "sphere":
        total = torch.zeros(q, dtype=torch.float64)
        for s in shards:
            total += torch.tensor(s.c.local_sq_norms(), dtype=torch.float64)
        if pg is not None:
            r = total.to(collective_device(pg))
            dist.all_reduce(r, op=dist.ReduceOp.SUM, group=pg)
            total = r.cpu()
        norms = total.tolist()
    begun: List[GroupShard] = []
    try:
        for s in shards:
            s.c.begin(norms)
            begun.append(s)
    except BaseException:
        abort(begun)
        raise


def zo_step(shards: Sequence[GroupShard], closure: Callable[[], Any], g0: dict, pg: Any,
            hooks: _lowrank.Hooks) -> torch.Tensor:
    """One zeroth-order step over every shard (the closure under no_grad), with the
    model-wide options of group ``g0``; on any error the step is abandoned in every shard
    before it propagates."""
    if closure is None:
        raise ValueError("step: a zeroth-order step needs a closure that returns the loss")
    begin(shards, g0["directions"], int(g0["num_directions"]), pg)
    losses: List[torch.Tensor] = []
    lowrank = any(s.lowrank is not None for s in shards)
    try:
        if lowrank:
            _lowrank.fill_factors(shards, int(g0["num_directions"]))
        more = True
        while more:
            if lowrank:
                hooks.live = _lowrank.arm(shards)
            try:
                with torch.no_grad():
                    loss = closure()
            finally:
                hooks.live = {}
            t = loss_tensor(loss, pg)
            losses.append(t)
            more = feed(shards, t)
    except BaseException:
        abort(shards)
        raise
    if g0["estimator"] == "one_sided":
        return losses[0]
    return torch.stack(losses).mean()
