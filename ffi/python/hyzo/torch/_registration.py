"""Which tensors each param group registers with the library, at which global offsets, and
the C optimizers that hold them: one per param group with trainable parameters, its
"shard" of the model."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _lib
from ._lowrank import FactorLayout
from ._options import normalize_enums

DTYPES = {
    torch.float32: _lib.DTYPE_CODES["float32"],
    torch.float16: _lib.DTYPE_CODES["float16"],
    torch.bfloat16: _lib.DTYPE_CODES["bfloat16"],
}
# A tensor's own global offset (set_global_offset), kept on the tensor so that it travels
# with it into whichever param group holds it.
OFFSET_ATTR = "_hyzo_global_offset"


def set_global_offset(tensor: torch.Tensor, global_offset: int) -> torch.Tensor:
    """Marks ``tensor`` as holding elements ``global_offset .. + numel`` of the model's flat
    parameter vector (e.g. a rank's flat shard); returns the same tensor.

    Without a mark (and without a group ``global_offset``), trainable parameters get
    consecutive offsets in parameter order across all groups.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"set_global_offset: expected a tensor, got {type(tensor).__name__}")
    setattr(tensor, OFFSET_ATTR, _lib.u64("global_offset", global_offset))
    return tensor


def Shard(tensor: torch.Tensor, global_offset: int) -> torch.Tensor:  # noqa: N802
    """Alias of :func:`set_global_offset`: ``ZO([Shard(flat_shard, offset)], ...)``."""
    return set_global_offset(tensor, global_offset)


class TensorPlan(NamedTuple):
    """A trainable parameter as its group will register it."""

    param: torch.Tensor
    where: str  # how messages name it: "param group 0, parameter 2"
    offset: int  # its first element's global offset
    grad: Optional[torch.Tensor]  # the gradient buffer to register (None: no gradients)


class GroupPlan(NamedTuple):
    """What one param group registers: its trainable parameters, all on one device."""

    group_index: int
    device: torch.device
    tensors: List[TensorPlan]


class GroupShard:
    """One param group's C optimizer and the tensors it registered, in registration order
    (what the optimizer steps; the group's own list may change, this does not)."""

    def __init__(self, group_index: int, device: torch.device, c: _lib.COptimizer,
                 params: List[torch.Tensor], grads: List[Optional[torch.Tensor]]) -> None:
        self.group_index = group_index
        self.device = device
        self.c = c
        self.params = params
        self.grads = grads
        # Where each parameter's storage was at registration: the C optimizer writes there.
        self.ptrs = [p.data_ptr() for p in params]
        # Low-rank directions: where this group's factors lie (None: no shaped tensors).
        self.lowrank: Optional[FactorLayout] = None


def check_model_wide(groups: Sequence[Dict[str, Any]], keys: Sequence[str]) -> None:
    """Checks that every group has the same ``keys`` (their values were checked with each
    group): the protocol reads them from group 0."""
    for g in groups:
        normalize_enums(g)  # a group's options may have been rewritten since its check
    first = groups[0]
    for i, g in enumerate(groups):
        for k in keys:
            if g[k] != first[k]:
                raise ValueError(
                    f"param group {i}: {k}={g[k]!r} differs from group 0 ({first[k]!r}); "
                    f"{', '.join(keys)} must be the same in every group"
                )
        off = g.get("global_offset")
        if off is not None:
            _lib.u64(f"param group {i}: global_offset", off)


def check_param(p: Any, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
    if p.is_sparse or p.layout != torch.strided:
        raise ValueError(f"{where}: sparse tensors ({p.layout}) are not supported")
    if p.dtype not in DTYPES:
        raise TypeError(f"{where}: dtype {p.dtype} is not supported "
                        "(float32, float16, bfloat16)")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device {p.device} is not supported (cpu, cuda)")
    if not p.is_contiguous():
        raise ValueError(f"{where}: non-contiguous tensors are not supported (the "
                         "optimizer updates the storage in place; make it contiguous "
                         "before creating the optimizer)")
    if p.numel() == 0:
        raise ValueError(f"{where}: empty tensor")


def grad_buffer(p: torch.Tensor) -> torch.Tensor:
    """The tensor to register as ``p``'s gradient: ``p.grad`` when usable, else new zeros
    (not yet assigned to ``p.grad``)."""
    g = p.grad
    if (g is None or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device
            or not g.is_contiguous() or g.is_sparse):
        g = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return g


def plan(groups: Sequence[Dict[str, Any]], needs_grads: bool) -> List[GroupPlan]:
    """What each param group registers: its trainable parameters, their global offsets
    and gradient buffers; checks them, and that no two overlap (in memory or offsets).
    The groups' options were checked before (:func:`check_model_wide` and the optimizer's
    own checks)."""
    plans: List[GroupPlan] = []
    auto = 0
    for gi, g in enumerate(groups):
        trainable = [(pi, p) for pi, p in enumerate(g["params"]) if p.requires_grad]
        if not trainable:
            continue
        devices: List[torch.device] = []
        for pi, p in trainable:
            check_param(p, f"param group {gi}, parameter {pi}")
            if p.device not in devices:
                devices.append(p.device)
        if len(devices) > 1:
            raise ValueError(
                f"param group {gi}: parameters on several devices "
                f"({', '.join(map(str, devices))}); put the parameters of each device in "
                "their own param group"
            )
        group_off = g.get("global_offset")
        items: List[TensorPlan] = []
        for pi, p in trainable:
            tagged = getattr(p, OFFSET_ATTR, None)
            if tagged is not None:
                off = tagged
            elif group_off is not None:
                off = group_off
                group_off += p.numel()
            else:
                off = auto
                auto += p.numel()
            where = f"param group {gi}, parameter {pi}"
            if off + p.numel() >= 2**64:  # the end of its elements must be a u64 too
                raise ValueError(f"{where}: global offset {off} + {p.numel()} elements "
                                 "reaches 2**64")
            items.append(TensorPlan(p, where, off, grad_buffer(p) if needs_grads else None))
        plans.append(GroupPlan(gi, devices[0], items))
    _check_disjoint(plans)
    return plans


def register(plans: Sequence[GroupPlan], config: Callable[[int], _lib.hyzo_config],
             num_threads: Optional[int], lay_out: Callable[[GroupShard], None],
             assign_grads: bool) -> List[GroupShard]:
    """New C optimizers for ``plans`` (``config``: the C configuration of a group index;
    ``lay_out``: registers a new shard's low-rank shapes). Nothing is installed until every
    one was made: on failure those made are closed, and no ``.grad`` was touched; then, with
    ``assign_grads``, the registered gradient buffers become the parameters' ``.grad``."""
    shards: List[GroupShard] = []
    try:
        for gi, dev, items in plans:
            if dev.type == "cuda":
                c = _lib.COptimizer(config(gi), "cuda",
                                    dev.index if dev.index is not None
                                    else torch.cuda.current_device())
            else:
                c = _lib.COptimizer(config(gi), "cpu", num_threads=num_threads)
            shard = GroupShard(gi, dev, c, [it.param for it in items],
                               [it.grad for it in items])
            shards.append(shard)
            for it in items:
                # The C optimizer keeps the storage alive (a detached tensor shares it),
                # whatever happens to the Parameter, its groups or its .data.
                owners = [it.param.detach()] + ([it.grad] if it.grad is not None else [])
                c.add_tensor(it.param.data_ptr(), DTYPES[it.param.dtype], it.param.numel(),
                             it.offset, it.grad.data_ptr() if it.grad is not None else None,
                             DTYPES[it.param.dtype], owners=owners)
            lay_out(shard)
    except BaseException:
        for s in shards:
            s.c.close()
        raise
    if assign_grads:
        for s in shards:
            for p, gbuf in zip(s.params, s.grads):
                if gbuf is not None and p.grad is not gbuf:
                    p.grad = gbuf
    return shards


def _check_disjoint(plans: Sequence[GroupPlan]) -> None:
    """No two registered tensors (parameters and gradient buffers, across every group)
    share memory, and no two parameters share a global element: each C optimizer checks
    its own group, this checks across groups."""
    memory: Dict[Any, List[Tuple[int, int, str]]] = {}
    elements: List[Tuple[int, int, str]] = []
    for _, dev, items in plans:
        key = (dev.type, dev.index)
        for it in items:
            for t, what in ((it.param, it.where), (it.grad, f"the gradient of {it.where}")):
                if t is None:
                    continue
                start = t.data_ptr()
                memory.setdefault(key, []).append(
                    (start, start + t.numel() * t.element_size(), what))
            elements.append((it.offset, it.offset + it.param.numel(), it.where))
    for ranges in memory.values():
        _no_overlap(ranges, "memory")
    _no_overlap(elements, "global elements (offsets)")


def _no_overlap(ranges: List[Tuple[int, int, str]], what: str) -> None:
    ranges = sorted(ranges)
    for (a0, a1, aw), (b0, b1, bw) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise ValueError(f"{aw} and {bw} overlap in {what}: [{a0}, {a1}) and [{b0}, {b1}) "
                             "(param groups must hold distinct tensors and distinct offsets)")
