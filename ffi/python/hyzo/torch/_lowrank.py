"""Low-rank directions (spec §7) through forward hooks: which weights of a model get them,
where their factors lie, and the hooks that add ``c · Z_d`` to the outputs of the modules
that own them during the forwards of a zeroth-order step (the weights are never written by
a perturbation pass)."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, NamedTuple, Optional,
                    Set, Tuple, Union)

import torch
from torch import nn

from .. import _lib

if TYPE_CHECKING:  # the registration imports this module, not the other way
    from ._registration import GroupShard

# The term a hook adds during one forward: (A_d, B_d, coeff * c_r).
Term = Tuple[torch.Tensor, torch.Tensor, float]


class FactorTensor(NamedTuple):
    """A shaped tensor of a group: where its factors lie in one direction's floats."""

    param_id: int
    rows: int
    cols: int
    rank: int  # r_t = min(r, rows, cols)
    offset: int  # of A_d, followed by B_d


class FactorLayout:
    """The factors of one group's low-rank weights in one direction's floats (spec order: A
    then B per tensor, in registration order), and the buffer that holds every direction's
    factors during a step (made at the first step, then reused)."""

    def __init__(self, tensors: List[FactorTensor], length: int) -> None:
        self.tensors = tensors
        self.length = length
        self.buffer: Optional[torch.Tensor] = None  # (q, length) f32, on the shard's device
        # Per direction d: (id of the parameter, A_d view, B_d view, c_r) per shaped tensor.
        self.views: List[List[Tuple[int, torch.Tensor, torch.Tensor, float]]] = []


class Hooks:
    """What :meth:`attach` set up: the 2-D weights registered with a shape (id of the
    parameter -> (rows, cols)) and their names, the forward hooks, and during a
    zeroth-order forward the term each hook adds (id of the parameter -> term)."""

    def __init__(self) -> None:
        self.shapes: Dict[int, Tuple[int, int]] = {}
        self.names: Dict[int, str] = {}
        self.handles: List[Any] = []
        self.attached = False
        self.live: Dict[int, Term] = {}

    def install(self, hooked: List[Tuple[nn.Module, torch.Tensor]]) -> None:
        """Replaces the hooks by one per (module, weight) of ``hooked``."""
        self.remove()
        ref = weakref.ref(self)  # the hooks must not keep the optimizer alive
        for m, p in hooked:
            term = _embedding_term if isinstance(m, nn.Embedding) else _linear_term
            self.handles.append(
                m.register_forward_hook(_hook(ref, p, term), with_kwargs=True))
        self.attached = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def choose(model: nn.Module, held: Dict[int, torch.Tensor],
           exclude: Iterable[Union[str, torch.Tensor]]
           ) -> Tuple[Dict[int, Tuple[int, int]], Dict[int, str],
                      List[Tuple[nn.Module, torch.Tensor]]]:
    """The weights of ``held`` (id -> trainable parameter) that get low-rank directions in
    ``model`` (see :meth:`ZO.attach`): their shapes, their names, and the (module, weight)
    pairs to hook. Warns about weights some of whose owners cannot be hooked."""
    excl_ids: Set[int] = set()
    excl_names: Set[str] = set()
    for e in ([exclude] if isinstance(exclude, (str, torch.Tensor)) else exclude):
        if isinstance(e, torch.Tensor):
            excl_ids.add(id(e))
        elif isinstance(e, str):
            excl_names.add(e)
        else:
            raise TypeError(f"attach: exclude takes names and tensors, got {e!r}")
    inside_mha = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            inside_mha.update(id(sub) for sub in m.modules() if sub is not m)
    # Every module that owns a held parameter directly, and whether it can be hooked.
    owners: Dict[int, List[Tuple[str, nn.Module, bool]]] = {}
    used = set()
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is None or id(p) not in held:
                continue
            full = f"{mname}.{attr}" if mname else attr
            for e in excl_names:
                if full == e or full.startswith(e + "."):
                    excl_ids.add(id(p))
                    used.add(e)
            owners.setdefault(id(p), []).append(
                (full, m, attr == "weight" and id(m) not in inside_mha and _hookable(m)))
    unknown = sorted(excl_names - used)
    if unknown:
        raise ValueError(f"attach: exclude names no parameter the optimizer holds in the "
                         f"model: {unknown} (names as in model.named_parameters() or "
                         "named_modules())")
    shapes: Dict[int, Tuple[int, int]] = {}
    names: Dict[int, str] = {}
    hooked: List[Tuple[nn.Module, torch.Tensor]] = []
    mixed: List[str] = []
    for pid, own in owners.items():
        p = held[pid]
        if p.dim() != 2 or pid in excl_ids or not any(h for _, _, h in own):
            continue
        if not all(h for _, _, h in own):
            mixed.append(f"{own[0][0]} (also owned by "
                         + ", ".join(f"{n} ({type(m).__name__})" for n, m, h in own if not h)
                         + ")")
            continue
        shapes[pid] = (int(p.shape[0]), int(p.shape[1]))
        names[pid] = own[0][0]
        hooked.extend((m, p) for _, m, _ in own)
    if mixed:
        warnings.warn("hyzo attach: weights also used by modules that cannot be hooked "
                      "keep the written Gaussian direction: " + "; ".join(mixed),
                      stacklevel=3)
    return shapes, names, hooked


def lay_out(shard: "GroupShard", shapes: Dict[int, Tuple[int, int]], rank: int) -> None:
    """Registers the shapes :func:`choose` gave the tensors of a new C optimizer, and lays
    out their factors in a direction's floats (spec order: A then B per tensor)."""
    tensors: List[FactorTensor] = []
    off = 0
    for i, p in enumerate(shard.params):
        shape = shapes.get(id(p))
        if shape is None:
            continue
        rows, cols = shape
        shard.c.set_shape(i, rows, cols)
        rt = min(rank, rows, cols)
        tensors.append(FactorTensor(id(p), rows, cols, rt, off))
        off += (rows + cols) * rt
    if not tensors:
        return
    n = shard.c.lowrank_factors_len()
    if n != off:  # pragma: no cover - the library and this layout disagree
        raise _lib.InternalError(f"hyzo: lowrank_factors_len is {n}, expected {off}")
    shard.lowrank = FactorLayout(tensors, off)


def fill_factors(shards: Iterable["GroupShard"], q: int) -> None:
    """After begin: the factors of every direction of this step, one buffer per shard
    (views per weight and direction)."""
    for s in shards:
        lay = s.lowrank
        if lay is None:
            continue
        if lay.buffer is None:
            lay.buffer = torch.empty((q, lay.length), dtype=torch.float32, device=s.device)
            lay.views = []
            for d in range(q):
                row = lay.buffer[d]
                views = []
                for pid, rows, cols, rt, off in lay.tensors:
                    a = row[off:off + rows * rt].view(rows, rt)
                    b = row[off + rows * rt:off + (rows + cols) * rt].view(cols, rt)
                    cr = float(torch.tensor(1.0 / math.sqrt(rt), dtype=torch.float32))
                    views.append((pid, a, b, cr))
                lay.views.append(views)
        for d in range(q):
            s.c.lowrank_factors(d, lay.buffer[d].data_ptr(), lay.length)


def arm(shards: Iterable["GroupShard"]) -> Dict[int, Term]:
    """Before a forward of the step: the term ``coeff * Z_d`` each hook adds."""
    live: Dict[int, Term] = {}
    for s in shards:
        if s.lowrank is None:
            continue
        d, coeff = s.c.forward_perturbation()
        if coeff == 0.0:
            continue
        for pid, a, b, cr in s.lowrank.views[d]:
            live[pid] = (a, b, float(coeff) * cr)
    return live


# ----------------------------------------------------------------------------------------
# The hooks.


def _hookable(m: nn.Module) -> bool:
    """An ``nn.Linear`` or ``nn.Embedding`` (no ``max_norm``, which rewrites rows) whose
    forward is torch's own: the output is ``x Wᵀ (+ b)`` or ``W[idx]``."""
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    if isinstance(m, nn.Embedding):
        return type(m).forward is nn.Embedding.forward and m.max_norm is None
    return False


def _input(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _add_product(output: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor,
                 m: float) -> torch.Tensor:
    """``output + m · left @ right_t`` (``left``: N x r, ``right_t``: r x features, ``output``
    N x features once flattened), the sum in f32 and rounded once to the output's dtype: one
    ``addmm`` (the thin product fused with the addition), in place where nothing can need
    the old value (no autograd, a contiguous f32 output)."""
    features = output.shape[-1]
    if output.dtype == torch.float32 and output.is_contiguous() and not torch.is_grad_enabled():
        output.view(-1, features).addmm_(left, right_t, alpha=m)
        return output
    out32 = output.reshape(-1, features).to(torch.float32)
    return torch.addmm(out32, left, right_t, alpha=m).to(output.dtype).view(output.shape)


def _linear_term(x: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's term ``(x B_d) A_dᵀ``, as its two thin factors."""
    return torch.matmul(x.reshape(-1, x.shape[-1]).to(torch.float32), b), a.t()


def _embedding_term(idx: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A lookup's term ``A_d[idx] B_dᵀ``, as its two thin factors."""
    return torch.nn.functional.embedding(idx.reshape(-1), a), b.t()


def _hook(ref: Any, weight: torch.Tensor,
          term: Callable[..., Tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., Any]:
    """``output += m · term`` (``m = coeff · c_r``) during a zeroth-order forward."""
    pid = id(weight)

    def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
             output: torch.Tensor) -> Optional[torch.Tensor]:
        hooks = ref()
        live = None if hooks is None else hooks.live.get(pid)
        if live is None or module.weight is not weight:
            return None
        a, b, m = live
        left, right_t = term(_input(args, kwargs), a, b)
        return _add_product(output, left, right_t, m)

    return hook
