"""PyTorch optimizers backed by libhyzo: :class:`ZO`, :class:`Hybrid` and :class:`FO`.

They follow ``torch.optim`` conventions (param groups, ``step(closure)``, ``zero_grad``,
``state_dict``/``load_state_dict``, ``torch.optim.lr_scheduler``), and update the parameters
in place, with no copies:

- CPU tensors run on hyzo's CPU backend, CUDA tensors on its GPU backend, on torch's
  current stream (losses are handed over as device pointers: no host synchronization);
- float32, float16 and bfloat16 parameters can be mixed in one model;
- each param group becomes one C optimizer (its "shard"); every parameter element has a
  *global offset* in the model's flat parameter vector (by default: the trainable
  parameters in order across all groups, from 0), which names the random direction entries
  it is perturbed with. A flat shard of a model split across processes (FSDP-style) is
  given its offset with the group key ``global_offset`` or :func:`set_global_offset`, so
  every rank perturbs its slice exactly as the unsharded model would be perturbed. Param
  groups may not overlap, in memory or in global offsets;
- with ``process_group``, the loss of every forward pass is all-reduced (mean) over the
  group: one scalar per forward, no gradient traffic for zeroth-order steps.

Frozen parameters are left alone, as in ``torch.optim``: a parameter with
``requires_grad=False`` is never perturbed nor updated (nor validated) by any of the three
optimizers, and takes no room in the default global offsets (so passing
``model.parameters()`` perturbs the trainable ones exactly as passing only those would).
The set of trainable parameters is read at construction; it may change until the first step
(the optimizer then registers the new set), not after. In :class:`FO`, a parameter whose
``.grad`` is ``None`` at ``step()`` is skipped as ``torch.optim.AdamW`` skips it: not
updated, no weight decay, its moments untouched.

The closure of :class:`ZO` and :class:`Hybrid` only computes and returns the loss; the
optimizer runs it under ``torch.no_grad()`` for zeroth-order evaluations, and with grad
enabled followed by ``loss.backward()`` (called by the optimizer) for first-order steps.
:class:`FO` is a drop-in ``torch.optim.AdamW``-style optimizer: the user calls
``backward()`` as usual, then ``step()``.

Options per group: ``lr``, ``weight_decay``, ``rule`` (``fo_rule``, ``zo_rule``,
``zo_lr_ratio``, ``zo_weight_decay`` in :class:`Hybrid`), ``betas``, ``adam_eps``,
``precision``, ``hybrid_alpha``, ``global_offset``. Options shared by all groups (they
define the perturbation, which must be one for the whole model): ``eps``, ``directions``,
``num_directions``, ``estimator``, ``seed``, ``fo_steps``, ``zo_steps``, ``rank``.

Low-rank directions (``directions="lowrank", rank=r``, spec v3 §7): ``opt.attach(model)``
registers the 2-D weights of the model's ``nn.Linear`` and ``nn.Embedding`` modules that the
optimizer holds as matrices and puts a forward hook on those modules; during the forwards
of a zeroth-order step each hook adds ``c · x B_d A_dᵀ / sqrt(r)`` (``c · A_d[idx] B_dᵀ /
sqrt(r)`` for a lookup) to the module's output, in f32, so those weights stay bit for bit
unchanged until the update writes them once. The other parameters take the written
Gaussian. Only weights whose every use is a hooked module's forward may be low-rank (see
:meth:`ZO.attach`; ``exclude`` opts weights out).

Threads: an optimizer is used by one thread at a time (a call into the library while
another thread is inside one on the same optimizer raises :class:`hyzo.BadStateError`);
distinct optimizers may step concurrently on different threads.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import _lib

__all__ = ["ZO", "Hybrid", "FO", "set_global_offset", "Shard"]

_DTYPES = {
    torch.float32: _lib.DTYPE_CODES["float32"],
    torch.float16: _lib.DTYPE_CODES["float16"],
    torch.bfloat16: _lib.DTYPE_CODES["bfloat16"],
}

# Options that define the perturbation: one value for the whole optimizer.
_GLOBAL_KEYS = ("eps", "directions", "num_directions", "estimator", "seed", "fo_steps",
                "zo_steps", "rank")
# Options naming an enum value, normalized to lower case with underscores.
_ENUM_KEYS = ("rule", "fo_rule", "zo_rule", "directions", "estimator", "precision")
_OFFSET_ATTR = "_hyzo_global_offset"


def set_global_offset(tensor: torch.Tensor, global_offset: int) -> torch.Tensor:
    """Marks ``tensor`` as holding elements ``global_offset .. + numel`` of the model's flat
    parameter vector (e.g. a rank's flat shard); returns the same tensor.

    Without a mark (and without a group ``global_offset``), trainable parameters get
    consecutive offsets in parameter order across all groups.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"set_global_offset: expected a tensor, got {type(tensor).__name__}")
    setattr(tensor, _OFFSET_ATTR, _lib.u64("global_offset", global_offset))
    return tensor


def Shard(tensor: torch.Tensor, global_offset: int) -> torch.Tensor:  # noqa: N802
    """Alias of :func:`set_global_offset`: ``ZO([Shard(flat_shard, offset)], ...)``."""
    return set_global_offset(tensor, global_offset)


class _ShardState:
    """One C optimizer: the trainable tensors of one param group (on one device)."""

    def __init__(self, group_index: int, device: torch.device, c: _lib.COptimizer,
                 params: List[torch.Tensor], grads: List[Optional[torch.Tensor]],
                 ptrs: List[int]) -> None:
        self.group_index = group_index
        self.device = device
        self.c = c
        self.params = params
        self.grads = grads
        self.ptrs = ptrs
        # Low-rank directions: the shaped tensors, in registration order, as (id of the
        # parameter, rows, cols, r_t, offset of its factors in a direction's floats).
        self.lr_layout: List[Tuple[int, int, int, int, int]] = []
        self.lr_len = 0
        self.lr_buf: Optional[torch.Tensor] = None  # (q, lr_len) f32, on the shard's device
        # Per direction d: (id of the parameter, A_d view, B_d view, c_r) per shaped tensor.
        self.lr_views: List[List[Tuple[int, torch.Tensor, torch.Tensor, float]]] = []


class _Planned:
    """A parameter about to be registered: where it lives and which elements it holds."""

    def __init__(self, p: torch.Tensor, where: str, offset: int,
                 grad: Optional[torch.Tensor]) -> None:
        self.p = p
        self.where = where
        self.offset = offset
        self.grad = grad


class _HyzoOptimizer(torch.optim.Optimizer):
    """Common machinery of :class:`ZO`, :class:`Hybrid` and :class:`FO` (not public)."""

    _needs_grads = False  # register gradient buffers with the C optimizers
    # Make the registered buffer the parameter's .grad at construction (Hybrid, which runs
    # backward itself). FO leaves a None .grad as it is: None means "skip this parameter".
    _assign_grads_at_build = True

    def __init__(self, params: Any, defaults: Dict[str, Any], *,
                 process_group: Any = None, num_threads: Optional[int] = None) -> None:
        if process_group is True:
            process_group = dist.group.WORLD
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group: torch.distributed is not initialized")
        if num_threads is not None:
            # Checked here, not only at the first C optimizer: a group may create it later.
            _lib.check_int("num_threads", num_threads, 0, 2**32)
        self._pg = process_group
        self._num_threads = num_threads
        self._shards: List[_ShardState] = []
        self._trainable: List[List[Tuple[int, bool]]] = []
        self._built = False
        # Low-rank directions (spec v3 §7): the 2-D weights registered with a shape (id of
        # the parameter -> (rows, cols)), the forward hooks of attach(), and during a
        # zeroth-order forward the term each hook adds (id -> (A_d, B_d, coeff * c_r)).
        self._lr_shapes: Dict[int, Tuple[int, int]] = {}
        self._lr_names: Dict[int, str] = {}
        self._lr_handles: List[Any] = []
        self._lr_attached = False
        self._lr_live: Dict[int, Tuple[torch.Tensor, torch.Tensor, float]] = {}
        for k in _ENUM_KEYS:
            if k in defaults and isinstance(defaults[k], str):
                defaults[k] = _enum_name(defaults[k])
        # Validate the values with the library now (a throwaway C optimizer), for a clear
        # error at construction even when no group has a trainable parameter yet.
        _lib.COptimizer(self._config_of(defaults), "cpu").close()
        if defaults.get("seed") is None:
            defaults["seed"] = self._draw_seed()
        super().__init__(params, defaults)
        self._build()

    # ------------------------------------------------------------------------------------
    # Construction.

    def _draw_seed(self) -> int:
        """A seed from torch's default generator (so ``torch.manual_seed`` fixes it); with
        a process group, rank 0's seed is broadcast so every rank perturbs alike."""
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if self._pg is not None:
            dev = _collective_device(self._pg)
            t = seed.to(dev)
            dist.broadcast(t, src=dist.get_global_rank(self._pg, 0)
                           if self._pg is not dist.group.WORLD else 0, group=self._pg)
            seed = t.cpu()
        return int(seed.item())

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a param group (only before the first step: the C optimizers are rebuilt)."""
        if getattr(self, "_built", False) and self._steps_taken() > 0:
            raise RuntimeError("hyzo: param groups cannot be added after the first step")
        if isinstance(param_group, dict):
            self._normalize_group(param_group)
        super().add_param_group(param_group)
        if getattr(self, "_built", False):
            try:
                self._build()
            except BaseException:
                self.param_groups.pop()
                raise

    def _normalize_group(self, group: Dict[str, Any], loaded: bool = False) -> None:
        """Rewrites a param group's own keys into the stored form (see :class:`Hybrid`);
        ``loaded``: a group of a loaded state dict, possibly from an older version."""

    def _rule_settings(self, g: Dict[str, Any]) -> Dict[str, Any]:
        """The rule fields of the C configuration of group ``g``: ``rule``, ``lr`` and
        ``weight_decay`` of the main (zeroth-order) rule; ``fo_rule``, ``fo_lr`` and
        ``fo_weight_decay`` of the first-order one (None: not set)."""
        return dict(rule=g["rule"], lr=_as_float(g["lr"]),
                    weight_decay=_as_float(g["weight_decay"]), fo_rule=None, fo_lr=None,
                    fo_weight_decay=None)

    def _check_groups(self) -> None:
        for g in self.param_groups:
            for k in _ENUM_KEYS:
                if isinstance(g.get(k), str):
                    g[k] = _enum_name(g[k])
        first = self.param_groups[0]
        for i, g in enumerate(self.param_groups):
            for k in _GLOBAL_KEYS:
                if g[k] != first[k]:
                    raise ValueError(
                        f"param group {i}: {k}={g[k]!r} differs from group 0 ({first[k]!r}); "
                        f"{', '.join(_GLOBAL_KEYS)} must be the same in every group"
                    )
            off = g.get("global_offset")
            if off is not None:
                _lib.u64(f"param group {i}: global_offset", off)

    @staticmethod
    def _check_param(p: Any, where: str) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor, got {type(p).__name__}")
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"{where}: sparse tensors ({p.layout}) are not supported")
        if p.dtype not in _DTYPES:
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

    def _config_of(self, g: Dict[str, Any]) -> _lib.hyzo_config:
        r = self._rule_settings(g)
        seed = g.get("seed")
        return _lib.make_config(
            lr=r["lr"], eps=g["eps"], rule=r["rule"], betas=g["betas"],
            adam_eps=g["adam_eps"], weight_decay=r["weight_decay"],
            directions=g["directions"], num_directions=g["num_directions"],
            estimator=g["estimator"], precision=g["precision"],
            seed=0 if seed is None else seed, fo_steps=g["fo_steps"], zo_steps=g["zo_steps"],
            hybrid_alpha=g["hybrid_alpha"], fo_rule=r["fo_rule"], fo_lr=r["fo_lr"],
            fo_weight_decay=r["fo_weight_decay"], rank=g.get("rank", 1))

    def _build(self) -> None:
        """(Re)creates one C optimizer per param group and registers its tensors."""
        shards = self._make_shards()
        old, self._shards = self._shards, shards
        self._trainable = self._trainable_flags()
        for s in old:
            s.c.close()
        self._built = True

    def _trainable_flags(self) -> List[List[Tuple[int, bool]]]:
        """Per group, each parameter's identity and whether it is trainable: what the C
        optimizers were built for (the shards hold the registered parameters, so their ids
        stay theirs)."""
        return [[(id(p), bool(p.requires_grad)) for p in g["params"]]
                for g in self.param_groups]

    def _plan(self) -> List[Tuple[int, torch.device, List[_Planned]]]:
        """What each param group registers: its trainable parameters, their global offsets
        and gradient buffers; checks them, and that no two overlap (in memory or offsets)."""
        self._check_groups()
        plan: List[Tuple[int, torch.device, List[_Planned]]] = []
        auto = 0
        for gi, g in enumerate(self.param_groups):
            trainable = [(pi, p) for pi, p in enumerate(g["params"]) if p.requires_grad]
            if not trainable:
                continue
            devices: List[torch.device] = []
            for pi, p in trainable:
                self._check_param(p, f"param group {gi}, parameter {pi}")
                if p.device not in devices:
                    devices.append(p.device)
            if len(devices) > 1:
                raise ValueError(
                    f"param group {gi}: parameters on several devices "
                    f"({', '.join(map(str, devices))}); put the parameters of each device in "
                    "their own param group"
                )
            group_off = g.get("global_offset")
            items: List[_Planned] = []
            for pi, p in trainable:
                tagged = getattr(p, _OFFSET_ATTR, None)
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
                gbuf = self._grad_buffer(p) if self._needs_grads else None
                items.append(_Planned(p, where, off, gbuf))
            plan.append((gi, devices[0], items))
        _check_disjoint(plan)
        return plan

    def _make_shards(self) -> List[_ShardState]:
        """New C optimizers for the current param groups (nothing installed yet; the
        parameters' ``.grad`` are set only once every C optimizer was made)."""
        plan = self._plan()
        shards: List[_ShardState] = []
        try:
            for gi, dev, items in plan:
                g = self.param_groups[gi]
                if dev.type == "cuda":
                    c = _lib.COptimizer(self._config_of(g), "cuda",
                                        dev.index if dev.index is not None
                                        else torch.cuda.current_device())
                else:
                    c = _lib.COptimizer(self._config_of(g), "cpu",
                                        num_threads=self._num_threads)
                shard = _ShardState(gi, dev, c, [it.p for it in items],
                                    [it.grad for it in items], [it.p.data_ptr() for it in items])
                shards.append(shard)
                for it in items:
                    # The C optimizer keeps the storage alive (a detached tensor shares it),
                    # whatever happens to the Parameter, its groups or its .data.
                    owners = [it.p.detach()] + ([it.grad] if it.grad is not None else [])
                    c.add_tensor(it.p.data_ptr(), _DTYPES[it.p.dtype], it.p.numel(), it.offset,
                                 it.grad.data_ptr() if it.grad is not None else None,
                                 _DTYPES[it.p.dtype], owners=owners)
                self._register_shapes(shard, g)
        except BaseException:
            for s in shards:
                s.c.close()
            raise
        if self._assign_grads_at_build:
            for s in shards:
                for p, gbuf in zip(s.params, s.grads):
                    if gbuf is not None and p.grad is not gbuf:
                        p.grad = gbuf
        return shards

    @staticmethod
    def _grad_buffer(p: torch.Tensor) -> torch.Tensor:
        """The tensor to register as ``p``'s gradient: ``p.grad`` when usable, else new
        zeros (not yet assigned to ``p.grad``)."""
        g = p.grad
        if (g is None or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device
                or not g.is_contiguous() or g.is_sparse):
            g = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return g

    # ------------------------------------------------------------------------------------
    # Helpers of a step.

    def _steps_taken(self) -> int:
        return max((s.c.stats()[0] for s in self._shards), default=0)

    def _require_shards(self) -> None:
        if not self._shards:
            raise ValueError(
                "hyzo: no trainable parameters: every parameter has requires_grad=False "
                "(frozen parameters are left alone, as in torch.optim). A zeroth-order "
                "optimizer needs no autograd: its closure runs under torch.no_grad(), so "
                "keep requires_grad=True on the parameters to optimize (for plain tensors: "
                "tensor.requires_grad_())")

    def _sync_trainable(self) -> None:
        """Re-registers the parameters if some were frozen or unfrozen before the first
        step; refuses after it (the C state is laid out for the registered set)."""
        flags = self._trainable_flags()
        if flags == self._trainable:
            return
        if self._steps_taken() > 0:
            for gi, (now, then) in enumerate(zip(flags, self._trainable)):
                for pi, ((pid, a), (qid, b)) in enumerate(zip(now, then)):
                    if pid == qid and a != b:
                        raise RuntimeError(
                            f"hyzo: param group {gi}, parameter {pi} was "
                            f"{'unfrozen' if a else 'frozen'} (requires_grad={a}) after the "
                            "first step; hyzo registers the trainable parameters once (its "
                            "state is laid out for them): freeze or unfreeze before the "
                            "first step, or create a new optimizer")
            raise RuntimeError(
                "hyzo: the parameters of the param groups changed after the first step (a "
                "parameter was removed, replaced or added); hyzo registers them once (its "
                "state is laid out for them): create a new optimizer for the new set")
        self._build()

    def _prepare(self) -> None:
        """Checks the parameters are still in place; pushes lr/weight decay and streams."""
        self._sync_trainable()
        self._require_shards()
        if self._uses_lowrank() and not self._lr_attached:
            raise RuntimeError(
                "hyzo: directions='lowrank' adds the perturbation of the 2-D weights inside "
                "the forward pass, through forward hooks: call opt.attach(model) before the "
                "first step (hyzo.transformers' trainers do it themselves)")
        for s in self._shards:
            for p, ptr in zip(s.params, s.ptrs):
                if p.data_ptr() != ptr:
                    raise RuntimeError(
                        "hyzo: a parameter's storage moved since the optimizer was created "
                        "(e.g. model.to()/.half()/.cuda() or a reassigned .data); create the "
                        "optimizer after moving the model"
                    )
            r = self._rule_settings(self.param_groups[s.group_index])
            s.c.set_lr(r["lr"])
            s.c.set_weight_decay(r["weight_decay"])
            s.c.set_fo_lr(r["fo_lr"])
            s.c.set_fo_weight_decay(r["fo_weight_decay"])
            if s.device.type == "cuda":
                s.c.set_stream(torch.cuda.current_stream(s.device).cuda_stream)

    def _loss_tensor(self, loss: Any) -> torch.Tensor:
        """The closure's loss as a 0-d float32 tensor, all-reduced (mean) over the group."""
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
        if self._pg is not None:
            dev = _collective_device(self._pg)
            r = t.to(dev, copy=True)
            dist.all_reduce(r, op=dist.ReduceOp.SUM, group=self._pg)
            r /= dist.get_world_size(self._pg)
            t = r if r.device == t.device else r.to(t.device)
        return t.contiguous()

    def _feed(self, loss: torch.Tensor) -> bool:
        """Feeds one loss to every shard; whether another evaluation is needed."""
        flags = []
        host: Optional[float] = None
        for s in self._shards:
            if s.device.type == "cuda" and loss.device == s.device:
                flags.append(s.c.feed_device(loss.data_ptr()))
            else:
                if host is None:
                    host = float(loss.item())
                flags.append(s.c.feed(host))
        if any(f != flags[0] for f in flags):  # pragma: no cover - the shards run in lockstep
            raise _lib.InternalError("hyzo: shards disagree on the protocol of a step")
        return flags[0]

    def _abort_all(self, shards: Sequence[_ShardState]) -> None:
        """Abandons the step in progress in ``shards`` (parameters restored); best effort:
        one failing abort does not keep the others from restoring."""
        for s in shards:
            try:
                s.c.abort()
            except _lib.HyzoError:
                pass

    def _begin_all(self) -> None:
        """Begins a zeroth-order step in every shard, or in none: if one cannot begin, the
        ones already begun are aborted (their parameters restored) before the error
        propagates, so no group is left perturbed and the optimizer stays usable."""
        g0 = self.param_groups[0]
        norms: Optional[List[float]] = None
        if g0["directions"] == "sphere":
            q = int(g0["num_directions"])
            total = torch.zeros(q, dtype=torch.float64)
            for s in self._shards:
                total += torch.tensor(s.c.local_sq_norms(), dtype=torch.float64)
            if self._pg is not None:
                r = total.to(_collective_device(self._pg))
                dist.all_reduce(r, op=dist.ReduceOp.SUM, group=self._pg)
                total = r.cpu()
            norms = total.tolist()
        begun: List[_ShardState] = []
        try:
            for s in self._shards:
                s.c.begin(norms)
                begun.append(s)
        except BaseException:
            self._abort_all(begun)
            raise

    def _zo_step(self, closure: Callable[[], Any]) -> torch.Tensor:
        """One zeroth-order step over every shard (closure under no_grad)."""
        if closure is None:
            raise ValueError("step: a zeroth-order step needs a closure that returns the loss")
        self._begin_all()
        losses: List[torch.Tensor] = []
        lowrank = any(s.lr_layout for s in self._shards)
        try:
            if lowrank:
                self._lowrank_factors()
            more = True
            while more:
                if lowrank:
                    self._lowrank_arm()
                try:
                    with torch.no_grad():
                        loss = closure()
                finally:
                    self._lr_live = {}
                t = self._loss_tensor(loss)
                losses.append(t)
                more = self._feed(t)
        except BaseException:
            self._abort_all(self._shards)
            raise
        if self.param_groups[0]["estimator"] == "one_sided":
            return losses[0]
        return torch.stack(losses).mean()

    def _zero_own_grads(self) -> None:
        for s in self._shards:
            for gbuf in s.grads:
                if gbuf is not None:
                    gbuf.zero_()

    def _collect_grads(self, s: _ShardState, none_is_skip: bool) -> List[int]:
        """Makes the registered buffers of shard ``s`` hold the gradients (``p.grad`` may
        have been set to None or replaced, e.g. by ``model.zero_grad()``): copies when
        needed. Returns the indices of parameters whose ``.grad`` is None: with
        ``none_is_skip`` they are left None (to be skipped), otherwise they get a zero
        gradient."""
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

    def _compute_grads(self, closure: Callable[[], Any]) -> torch.Tensor:
        """Zeroes the gradients, runs the closure with grad enabled and ``backward()``."""
        if closure is None:
            raise ValueError("step: a first-order step of Hybrid needs a closure that returns "
                             "the loss (the optimizer calls backward() itself)")
        self._zero_own_grads()
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise TypeError("closure: a first-order step needs the loss as a tensor that "
                                "requires grad (computed from the parameters)")
            loss.backward()
        for s in self._shards:
            self._collect_grads(s, none_is_skip=False)
        return loss.detach()

    # ------------------------------------------------------------------------------------
    # Low-rank directions (spec v3 §7): forward hooks on nn.Linear / nn.Embedding.

    def _uses_lowrank(self) -> bool:
        return self.param_groups[0].get("directions") == "lowrank"

    def _register_shapes(self, shard: _ShardState, g: Dict[str, Any]) -> None:
        """Registers the shapes attach() chose for the tensors of a new C optimizer, and
        lays out their factors in a direction's floats (spec order: A then B per tensor)."""
        if g.get("directions") != "lowrank" or not self._lr_shapes:
            return
        rank = int(g.get("rank", 1))
        off = 0
        for i, p in enumerate(shard.params):
            shape = self._lr_shapes.get(id(p))
            if shape is None:
                continue
            rows, cols = shape
            shard.c.set_shape(i, rows, cols)
            rt = min(rank, rows, cols)
            shard.lr_layout.append((id(p), rows, cols, rt, off))
            off += (rows + cols) * rt
        shard.lr_len = off
        if shard.lr_layout:
            n = shard.c.lowrank_factors_len()
            if n != off:  # pragma: no cover - the library and this layout disagree
                raise _lib.InternalError(f"hyzo: lowrank_factors_len is {n}, expected {off}")

    def _lowrank_factors(self) -> None:
        """After begin: the factors of every direction of this step, one buffer per shard
        (allocated at the first step, then reused; views per weight and direction)."""
        q = int(self.param_groups[0]["num_directions"])
        for s in self._shards:
            if not s.lr_layout:
                continue
            if s.lr_buf is None:
                s.lr_buf = torch.empty((q, s.lr_len), dtype=torch.float32, device=s.device)
                s.lr_views = []
                for d in range(q):
                    row = s.lr_buf[d]
                    views = []
                    for pid, rows, cols, rt, off in s.lr_layout:
                        a = row[off:off + rows * rt].view(rows, rt)
                        b = row[off + rows * rt:off + (rows + cols) * rt].view(cols, rt)
                        cr = float(torch.tensor(1.0 / math.sqrt(rt), dtype=torch.float32))
                        views.append((pid, a, b, cr))
                    s.lr_views.append(views)
            for d in range(q):
                s.c.lowrank_factors(d, s.lr_buf[d].data_ptr(), s.lr_len)

    def _lowrank_arm(self) -> None:
        """Before a forward of the step: the term ``coeff * Z_d`` each hook adds."""
        live: Dict[int, Tuple[torch.Tensor, torch.Tensor, float]] = {}
        for s in self._shards:
            if not s.lr_layout:
                continue
            d, coeff = s.c.forward_perturbation()
            if coeff == 0.0:
                continue
            for pid, a, b, cr in s.lr_views[d]:
                live[pid] = (a, b, float(coeff) * cr)
        self._lr_live = live

    def attach(self, model: nn.Module,
               exclude: Iterable[Union[str, torch.Tensor]] = ()) -> List[str]:
        """Hooks ``model`` for ``directions="lowrank"``; call it before the first step.

        Every 2-D weight this optimizer holds whose every owner in ``model`` is an
        ``nn.Linear`` (its ``weight``) or an ``nn.Embedding`` without ``max_norm`` gets
        low-rank directions: it is registered with its shape and a forward hook on each
        owner adds ``c · x B_d A_dᵀ / sqrt(r_t)`` (Linear) or ``c · A_d[idx] B_dᵀ /
        sqrt(r_t)`` (Embedding) to the module's output during the forwards of a
        zeroth-order step, so the weight is never written by a perturbation pass. A weight
        shared by several such modules (tied embeddings) gets the term in each. Everything
        else the optimizer holds (biases, norms, other modules' weights) keeps the written
        Gaussian direction. Outside a zeroth-order step's forwards the hooks add nothing.

        Limits: a hooked weight must reach the loss only through its modules' forwards. A
        weight also owned by another kind of module, or by a Linear inside
        ``nn.MultiheadAttention`` (which reads the weight itself), is left Gaussian with a
        warning; a weight read directly by the model's code (``x @ self.emb.weight.T``)
        cannot be detected: list it in ``exclude``, by name (a parameter's name as in
        ``model.named_parameters()``, or a module's, which excludes every weight under it;
        a name that matches nothing is refused) or as the tensor itself.

        Returns the names of the weights given low-rank directions. Calling it again
        replaces the hooks (after the first step only with the same set of weights, whose
        shapes the library already holds); :meth:`detach` removes them.
        """
        if not self._uses_lowrank():
            raise ValueError(f"attach: the optimizer uses directions="
                             f"{self.param_groups[0]['directions']!r}; attach() is for "
                             "directions='lowrank'")
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach: expected a torch.nn.Module, got {type(model).__name__}")
        held = {id(p): p for g in self.param_groups for p in g["params"] if p.requires_grad}
        excl_ids, excl_names = set(), set()
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
                          stacklevel=2)
        if shapes != self._lr_shapes:
            if self._steps_taken() > 0:
                raise RuntimeError(
                    "attach: the optimizer has taken steps with another set of low-rank "
                    "weights (shapes are registered once, before the first step); attach "
                    "the model before the first step, or create a new optimizer")
            self._lr_shapes = shapes
            self._build()  # new C optimizers, with the shapes registered
        self._lr_names = names
        self._remove_hooks()
        ref = weakref.ref(self)
        for m, p in hooked:
            term = _embedding_term if isinstance(m, nn.Embedding) else _linear_term
            self._lr_handles.append(
                m.register_forward_hook(_lowrank_hook(ref, p, term), with_kwargs=True))
        self._lr_attached = True
        return [names[pid] for pid in shapes]

    def detach(self) -> None:
        """Removes the forward hooks of :meth:`attach` (steps then refuse until the model
        is attached again; the registered shapes stay)."""
        self._remove_hooks()
        self._lr_attached = False

    def _remove_hooks(self) -> None:
        for h in self._lr_handles:
            h.remove()
        self._lr_handles = []

    @property
    def lowrank_parameters(self) -> List[str]:
        """Names (from the attached model) of the weights that get low-rank directions."""
        return list(self._lr_names.values())

    # ------------------------------------------------------------------------------------
    # torch.optim API.

    @torch.no_grad()
    def perturb_(self, std: float, seed: int, step: int = 0, direction: int = 0) -> None:
        """Adds ``std * z`` once to every trainable parameter, ``z`` the direction ``(seed,
        step, direction)`` of the optimizer's kind (``directions``; ``"sphere"`` gives its
        unscaled Gaussian, ``"lowrank"`` the Gaussian on every tensor, the low-rank weights
        included: a displacement is written) at each element's global offset: a seeded displacement that any
        process regenerates exactly for the shard it holds (``hyzo.directions`` gives the
        same ``z`` on the CPU; CUDA's fast Gaussian is within spec §3's tolerance of it),
        e.g. the noise control of an experiment.

        One perturbation pass per param group, written back with the group's ``precision``
        (as a perturbation pass: nearest for ``"stochastic"``); the optimizer's state, step
        counts and schedule do not change, and no collective runs. The seed is the caller's,
        independent of the optimizer's ``seed``: the same ``(seed, step, direction)`` as a
        zeroth-order step would repeat that step's direction. ``std`` must be finite;
        ``step`` and ``direction`` are u32 (directions ``0xFFFFFF00`` and above are the
        library's own streams, spec §2)."""
        std = _as_float(std)
        if not math.isfinite(std):
            raise ValueError(f"perturb_: std must be finite, got {std!r}")
        seed = _lib.u64("seed", seed)
        step = _lib.u32("step", step)
        direction = _lib.u32("direction", direction)
        self._prepare()
        for s in self._shards:
            s.c.displace(seed, step, direction, std)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients. The buffers registered with hyzo (Hybrid, FO) are zeroed
        in place whatever ``set_to_none`` says (torch's ``set_to_none=False``): the C
        optimizer holds their addresses, and backward then accumulates into them with no
        copy. Frozen parameters are handled as torch does."""
        if not self._needs_grads:
            super().zero_grad(set_to_none=set_to_none)
            return
        self._zero_own_grads()
        registered = set()
        for s in self._shards:
            for p, gbuf in zip(s.params, s.grads):
                registered.add(id(p))
                if gbuf is not None and p.grad is not gbuf:
                    p.grad = gbuf
        # Parameters hyzo does not hold (frozen): torch's own rule.
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    if id(p) in registered or p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict (param groups, with lr, seed, ...) plus the C state of every
        shard (both rule states of a :class:`Hybrid`) as a uint8 tensor under ``"hyzo"``:
        a resumed run continues bit-identically (restore the parameters too).

        Each state is written by the library straight into its tensor: one copy of the
        optimizer state in memory, however large."""
        sd = super().state_dict()
        bufs = []
        for s in self._shards:
            n = s.c.state_size()
            t = torch.empty(n, dtype=torch.uint8)
            s.c.save_state_into(t.data_ptr(), n)
            bufs.append(t)
        sd["hyzo"] = {
            "format": 1,
            "library_version": _lib.version(),
            "shards": bufs,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (the optimizer must have the same param groups, with
        the same trainable parameters). The saved states are read in place (uint8 CPU
        tensors, e.g. from ``torch.load(..., mmap=True)``, or bytes-like objects). A state
        that does not fit (another configuration, corrupted, truncated) is refused and the
        optimizer stays as it was."""
        state_dict = dict(state_dict)
        hz = state_dict.pop("hyzo", None)
        if hz is None:
            raise ValueError("load_state_dict: not a hyzo optimizer state dict (no 'hyzo' key)")
        bufs = hz["shards"]
        groups = state_dict.get("param_groups") or [{}]
        if groups[0].get("directions") == "lowrank" and not self._lr_attached:
            raise RuntimeError("load_state_dict: a state of low-rank directions (its shapes are "
                               "part of it): call opt.attach(model) before loading it")
        saved_groups = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        # The configuration (seed, rule, ...) comes from the loaded param groups, as torch
        # restores hyperparameters; on any failure the optimizer stays as it was.
        shards: List[_ShardState] = []
        try:
            for g in self.param_groups:
                g.setdefault("rank", 1)  # a state dict from before low-rank directions
                self._normalize_group(g, loaded=True)
            shards = self._make_shards()
            if len(bufs) != len(shards):
                raise ValueError(f"load_state_dict: {len(bufs)} saved shards, this optimizer "
                                 f"has {len(shards)}")
            for s, b in zip(shards, bufs):
                if isinstance(b, torch.Tensor):
                    b = b.detach()
                    if b.device.type != "cpu":
                        b = b.cpu()
                    b = b.contiguous().view(torch.uint8).reshape(-1)
                    s.c.load_state_from(b.data_ptr(), b.numel())
                else:
                    s.c.load_state(b)
        except BaseException:
            for s in shards:
                s.c.close()
            self.param_groups[:] = saved_groups
            raise
        old, self._shards = self._shards, shards
        self._trainable = self._trainable_flags()
        for s in old:
            s.c.close()

    @property
    def steps(self) -> int:
        """Steps taken (first- and zeroth-order, skipped ones included)."""
        return self._steps_taken()

    @property
    def skipped(self) -> int:
        """Zeroth-order steps skipped because a loss or a projected gradient was not finite
        (spec v2 §4: parameters restored, no state updated)."""
        return max((s.c.stats()[1] for s in self._shards), default=0)

    @property
    def updates(self) -> int:
        """Updates applied to the state of the main rule (its step count ``t``): ``rule``
        of :class:`ZO` and :class:`FO`; ``zo_rule`` of :class:`Hybrid` (every step's rule
        when ``fo_rule=None``). Of the first group with trainable parameters."""
        return self._shards[0].c.updates()[0] if self._shards else 0

    @property
    def fo_updates(self) -> int:
        """Updates applied to the state of :class:`Hybrid`'s ``fo_rule`` (its ``t``; 0
        without one). Of the first group with trainable parameters."""
        return self._shards[0].c.updates()[1] if self._shards else 0

    def __getstate__(self) -> Dict[str, Any]:
        raise TypeError("hyzo optimizers cannot be pickled or deep-copied; use state_dict()")


# ----------------------------------------------------------------------------------------
# Forward hooks of low-rank directions.


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


def _lowrank_hook(ref: Any, weight: torch.Tensor,
                  term: Callable[..., Tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., Any]:
    """``output += m · term`` (``m = coeff · c_r``) during a zeroth-order forward."""
    pid = id(weight)

    def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
             output: torch.Tensor) -> Optional[torch.Tensor]:
        opt = ref()
        live = None if opt is None else opt._lr_live.get(pid)
        if live is None or module.weight is not weight:
            return None
        a, b, m = live
        left, right_t = term(_input(args, kwargs), a, b)
        return _add_product(output, left, right_t, m)

    return hook


def _check_disjoint(plan: Sequence[Tuple[int, torch.device, List[_Planned]]]) -> None:
    """No two registered tensors (parameters and gradient buffers, across every group)
    share memory, and no two parameters share a global element: each C optimizer checks
    its own group, this checks across groups."""
    memory: Dict[Any, List[Tuple[int, int, str]]] = {}
    elements: List[Tuple[int, int, str]] = []
    for _, dev, items in plan:
        key = (dev.type, dev.index)
        for it in items:
            for t, what in ((it.p, it.where), (it.grad, f"the gradient of {it.where}")):
                if t is None:
                    continue
                start = t.data_ptr()
                memory.setdefault(key, []).append(
                    (start, start + t.numel() * t.element_size(), what))
            elements.append((it.offset, it.offset + it.p.numel(), it.where))
    for ranges in memory.values():
        _no_overlap(ranges, "memory")
    _no_overlap(elements, "global elements (offsets)")


def _no_overlap(ranges: List[Tuple[int, int, str]], what: str) -> None:
    ranges = sorted(ranges)
    for (a0, a1, aw), (b0, b1, bw) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise ValueError(f"{aw} and {bw} overlap in {what}: [{a0}, {a1}) and [{b0}, {b1}) "
                             "(param groups must hold distinct tensors and distinct offsets)")


class ZO(_HyzoOptimizer):
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
        defaults = _defaults(lr=lr, eps=eps, rule=rule, betas=betas, weight_decay=weight_decay,
                             directions=directions, num_directions=num_directions,
                             estimator=estimator, precision=precision, seed=seed,
                             adam_eps=adam_eps, fo_steps=0, zo_steps=0, hybrid_alpha=0.0,
                             rank=rank)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads)

    def _check_groups(self) -> None:
        super()._check_groups()
        for i, g in enumerate(self.param_groups):
            if _as_float(g["hybrid_alpha"]) != 0:
                raise ValueError(f"param group {i}: hybrid_alpha={g['hybrid_alpha']!r} mixes a "
                                 "gradient into zeroth-order steps; ZO computes none (use "
                                 "Hybrid)")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step (see the class documentation)."""
        self._prepare()
        return self._zo_step(closure)  # type: ignore[arg-type]


class _PaperDefault(str):
    """A default rule name that :class:`Hybrid` can tell from the same name passed
    explicitly (``rule=`` excludes an explicit ``fo_rule``/``zo_rule``)."""


_FO_DEFAULT = _PaperDefault("adamw")
_ZO_DEFAULT = _PaperDefault("adazo")


class Hybrid(_HyzoOptimizer):
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
        fo_rule: Optional[str] = _FO_DEFAULT,
        zo_rule: str = _ZO_DEFAULT,
        zo_lr: Optional[float] = None,
        zo_weight_decay: Optional[float] = None,
        adam_eps: float = 1e-8,
        num_threads: Optional[int] = None,
        rank: int = 1,
    ) -> None:
        if rule is not None:
            if fo_rule is not _FO_DEFAULT or zo_rule is not _ZO_DEFAULT:
                raise ValueError("Hybrid: pass either rule (one rule and one shared state for "
                                 "every step) or fo_rule/zo_rule, not both")
            fo_rule, zo_rule = None, rule
        defaults = _defaults(lr=lr, eps=eps, fo_rule=fo_rule, zo_rule=zo_rule, betas=betas,
                             weight_decay=weight_decay, directions=directions,
                             num_directions=num_directions, estimator=estimator,
                             precision=precision, seed=seed, adam_eps=adam_eps,
                             fo_steps=fo_steps, zo_steps=zo_steps, hybrid_alpha=hybrid_alpha,
                             zo_lr_ratio=_zo_lr_ratio(zo_lr, lr, "zo_lr"),
                             zo_weight_decay=_optional_nonneg("zo_weight_decay",
                                                              zo_weight_decay),
                             rank=rank)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads)

    def _normalize_group(self, group: Dict[str, Any], loaded: bool = False) -> None:
        """A group's ``rule`` becomes ``zo_rule`` with ``fo_rule=None``, its ``zo_lr`` the
        ratio ``zo_lr_ratio`` to its ``lr``; a loaded group of the single-rule Hybrid (before
        spec v2) gets the keys it lacks."""
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
            group["zo_lr_ratio"] = _zo_lr_ratio(group.pop("zo_lr"), lr, f"{where}: zo_lr")
        elif "zo_lr_ratio" in group and group["zo_lr_ratio"] is not None:
            group["zo_lr_ratio"] = _optional_nonneg(f"{where}: zo_lr_ratio",
                                                    group["zo_lr_ratio"])
        if "zo_weight_decay" in group:
            group["zo_weight_decay"] = _optional_nonneg(f"{where}: zo_weight_decay",
                                                        group["zo_weight_decay"])
        if loaded:
            group.setdefault("zo_lr_ratio", None)
            group.setdefault("zo_weight_decay", None)

    def _rule_settings(self, g: Dict[str, Any]) -> Dict[str, Any]:
        # The C optimizer's main rule is the zeroth-order one; fo_lr / fo_weight_decay are
        # always set (they equal lr / weight_decay unless zo_lr / zo_weight_decay differ).
        lr = _as_float(g["lr"])
        ratio = g.get("zo_lr_ratio")
        wd = _as_float(g["weight_decay"])
        zo_wd = g.get("zo_weight_decay")
        return dict(rule=g["zo_rule"], lr=lr if ratio is None else lr * float(ratio),
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
            for s in self._shards:
                s.c.fo_step()
            return loss
        if any(_as_float(g["hybrid_alpha"]) > 0 for g in self.param_groups):
            self._compute_grads(closure)  # type: ignore[arg-type]
        with torch.no_grad():
            return self._zo_step(closure)  # type: ignore[arg-type]


class FO(_HyzoOptimizer):
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
        defaults = _defaults(lr=lr, eps=1e-3, rule=rule, betas=betas, weight_decay=weight_decay,
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
            missing = set(self._collect_grads(s, none_is_skip=True))
            if len(missing) == len(s.params):
                continue  # nothing to update in this group: it is not stepped at all
            if missing:
                # As torch.optim: no update, no moment decay, no weight decay for them.
                s.c.fo_step_masked([i not in missing for i in range(len(s.params))])
            else:
                s.c.fo_step()
        return loss


# ----------------------------------------------------------------------------------------


def _enum_name(v: str) -> str:
    return v.lower().replace("-", "_")


def _defaults(**kw: Any) -> Dict[str, Any]:
    """Normalizes the options (enum names lower-case) and checks their types early; the
    optimizer checks the values with the library."""
    for k in _ENUM_KEYS:
        if k not in kw or (k == "fo_rule" and kw[k] is None):
            continue
        if not isinstance(kw[k], str):
            raise TypeError(f"{k}: expected a string, got {kw[k]!r}")
        kw[k] = _enum_name(str(kw[k]))
        if k.endswith("rule"):
            _lib.rule_code(k, kw[k])  # an unknown rule is reported under its own name
    try:
        kw["betas"] = tuple(float(b) for b in kw["betas"])
    except (TypeError, ValueError):
        raise ValueError(f"betas: expected two floats, got {kw['betas']!r}") from None
    if len(kw["betas"]) != 2:
        raise ValueError(f"betas: expected two floats, got {kw['betas']!r}")
    if kw["seed"] is not None:
        kw["seed"] = _lib.check_int("seed", kw["seed"], 0, 2**64)
    kw["rank"] = _lib.check_int("rank", kw.get("rank", 1), 1, 1025)
    kw["global_offset"] = None
    return kw


def _optional_nonneg(name: str, v: Any) -> Optional[float]:
    """None, or a finite float >= 0."""
    if v is None:
        return None
    f = _as_float(v)
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"{name}: expected a finite float >= 0 or None, got {v!r}")
    return f


def _zo_lr_ratio(zo_lr: Any, lr: Any, name: str) -> Optional[float]:
    """``zo_lr / lr``, the ratio zeroth-order steps keep to the group's lr."""
    zo = _optional_nonneg(name, zo_lr)
    if zo is None:
        return None
    base = _as_float(lr)
    if zo == 0:
        return 0.0
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"{name}: {zo} cannot be kept as a ratio to lr = {lr!r}; give lr > 0 "
                         "(zeroth-order steps use lr * zo_lr / lr_at_construction)")
    return zo / base


def _as_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


def _collective_device(pg: Any) -> torch.device:
    """The device collectives of ``pg`` take tensors on (cuda for NCCL, cpu otherwise)."""
    try:
        backend = dist.get_backend(pg)
    except Exception:  # pragma: no cover
        backend = "gloo"
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
