"""PyTorch optimizers backed by libhyzo: :class:`ZO`, :class:`Hybrid` and :class:`FO`.

They follow ``torch.optim`` conventions (param groups, ``step(closure)``, ``zero_grad``,
``state_dict``/``load_state_dict``, ``torch.optim.lr_scheduler``), and update the parameters
in place, with no copies:

- CPU tensors run on hyzo's CPU backend, CUDA tensors on its GPU backend, on torch's
  current stream (losses are handed over as device pointers: no host synchronization);
- float32, float16 and bfloat16 parameters can be mixed in one model;
- each param group becomes one C optimizer (its "shard"); every parameter element has a
  *global offset* in the model's flat parameter vector (by default: parameters in order
  across all groups, from 0), which names the random direction entries it is perturbed
  with. A flat shard of a model split across processes (FSDP-style) is given its offset
  with the group key ``global_offset`` or :func:`set_global_offset`, so every rank perturbs
  its slice exactly as the unsharded model would be perturbed;
- with ``process_group``, the loss of every forward pass is all-reduced (mean) over the
  group: one scalar per forward, no gradient traffic for zeroth-order steps.

The closure of :class:`ZO` and :class:`Hybrid` only computes and returns the loss; the
optimizer runs it under ``torch.no_grad()`` for zeroth-order evaluations, and with grad
enabled followed by ``loss.backward()`` (called by the optimizer) for first-order steps.
:class:`FO` is a drop-in ``torch.optim.AdamW``-style optimizer: the user calls
``backward()`` as usual, then ``step()``.

Options per group: ``lr``, ``weight_decay``, ``rule``, ``betas``, ``adam_eps``,
``precision``, ``hybrid_alpha``, ``global_offset``. Options shared by all groups (they
define the perturbation, which must be one for the whole model): ``eps``, ``directions``,
``num_directions``, ``estimator``, ``seed``, ``fo_steps``, ``zo_steps``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import _lib

__all__ = ["ZO", "Hybrid", "FO", "set_global_offset", "Shard"]

_DTYPES = {
    torch.float32: _lib.DTYPE_CODES["float32"],
    torch.float16: _lib.DTYPE_CODES["float16"],
    torch.bfloat16: _lib.DTYPE_CODES["bfloat16"],
}

# Options that define the perturbation: one value for the whole optimizer.
_GLOBAL_KEYS = ("eps", "directions", "num_directions", "estimator", "seed", "fo_steps",
                "zo_steps")
_OFFSET_ATTR = "_hyzo_global_offset"


def set_global_offset(tensor: torch.Tensor, global_offset: int) -> torch.Tensor:
    """Marks ``tensor`` as holding elements ``global_offset .. + numel`` of the model's flat
    parameter vector (e.g. a rank's flat shard); returns the same tensor.

    Without a mark (and without a group ``global_offset``), parameters get consecutive
    offsets in parameter order across all groups.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"set_global_offset: expected a tensor, got {type(tensor).__name__}")
    if isinstance(global_offset, bool) or not isinstance(global_offset, int) or global_offset < 0:
        raise ValueError(f"global_offset: expected an int >= 0, got {global_offset!r}")
    setattr(tensor, _OFFSET_ATTR, int(global_offset))
    return tensor


def Shard(tensor: torch.Tensor, global_offset: int) -> torch.Tensor:  # noqa: N802
    """Alias of :func:`set_global_offset`: ``ZO([Shard(flat_shard, offset)], ...)``."""
    return set_global_offset(tensor, global_offset)


class _ShardState:
    """One C optimizer: the tensors of one param group (on one device)."""

    def __init__(self, group_index: int, device: torch.device, c: _lib.COptimizer,
                 params: List[torch.Tensor], grads: List[Optional[torch.Tensor]],
                 ptrs: List[int]) -> None:
        self.group_index = group_index
        self.device = device
        self.c = c
        self.params = params
        self.grads = grads
        self.ptrs = ptrs


class _HyzoOptimizer(torch.optim.Optimizer):
    """Common machinery of :class:`ZO`, :class:`Hybrid` and :class:`FO` (not public)."""

    _needs_grads = False  # register gradient buffers with the C optimizers

    def __init__(self, params: Any, defaults: Dict[str, Any], *,
                 process_group: Any = None, num_threads: Optional[int] = None) -> None:
        if process_group is True:
            process_group = dist.group.WORLD
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group: torch.distributed is not initialized")
        self._pg = process_group
        self._num_threads = num_threads
        self._shards: List[_ShardState] = []
        self._built = False
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
        super().add_param_group(param_group)
        if getattr(self, "_built", False):
            self._build()

    def _check_groups(self) -> None:
        for g in self.param_groups:
            for k in ("rule", "directions", "estimator", "precision"):
                if isinstance(g[k], str):
                    g[k] = g[k].lower().replace("-", "_")
        first = self.param_groups[0]
        for i, g in enumerate(self.param_groups):
            for k in _GLOBAL_KEYS:
                if g[k] != first[k]:
                    raise ValueError(
                        f"param group {i}: {k}={g[k]!r} differs from group 0 ({first[k]!r}); "
                        f"{', '.join(_GLOBAL_KEYS)} must be the same in every group"
                    )
            off = g.get("global_offset")
            if off is not None and (isinstance(off, bool) or not isinstance(off, int)
                                    or off < 0):
                raise ValueError(f"param group {i}: global_offset must be an int >= 0, "
                                 f"got {off!r}")

    @staticmethod
    def _check_param(p: Any, gi: int, pi: int) -> None:
        where = f"param group {gi}, parameter {pi}"
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
        return _lib.make_config(
            lr=_as_float(g["lr"]), eps=g["eps"], rule=g["rule"], betas=g["betas"],
            adam_eps=g["adam_eps"], weight_decay=g["weight_decay"],
            directions=g["directions"], num_directions=g["num_directions"],
            estimator=g["estimator"], precision=g["precision"], seed=int(g["seed"]),
            fo_steps=g["fo_steps"], zo_steps=g["zo_steps"], hybrid_alpha=g["hybrid_alpha"])

    def _build(self) -> None:
        """(Re)creates one C optimizer per param group and registers its tensors."""
        shards = self._make_shards()
        old, self._shards = self._shards, shards
        for s in old:
            s.c.close()
        self._built = True

    def _make_shards(self) -> List[_ShardState]:
        """New C optimizers for the current param groups (nothing installed yet)."""
        self._check_groups()
        shards: List[_ShardState] = []
        auto = 0
        for gi, g in enumerate(self.param_groups):
            params = g["params"]
            if not params:
                continue
            devices = []
            for pi, p in enumerate(params):
                self._check_param(p, gi, pi)
                if p.device not in devices:
                    devices.append(p.device)
            if len(devices) > 1:
                raise ValueError(
                    f"param group {gi}: parameters on several devices ({', '.join(map(str, devices))}); "
                    "put the parameters of each device in their own param group"
                )
            dev = devices[0]
            if dev.type == "cuda":
                c = _lib.COptimizer(self._config_of(g), "cuda",
                                    dev.index if dev.index is not None
                                    else torch.cuda.current_device())
            else:
                c = _lib.COptimizer(self._config_of(g), "cpu", num_threads=self._num_threads)
            group_off = g.get("global_offset")
            grads: List[Optional[torch.Tensor]] = []
            ptrs: List[int] = []
            for p in params:
                tagged = getattr(p, _OFFSET_ATTR, None)
                if tagged is not None:
                    off = tagged
                elif group_off is not None:
                    off = group_off
                    group_off += p.numel()
                else:
                    off = auto
                    auto += p.numel()
                gbuf = self._grad_buffer(p) if self._needs_grads else None
                c.add_tensor(p.data_ptr(), _DTYPES[p.dtype], p.numel(), off,
                             gbuf.data_ptr() if gbuf is not None else None,
                             _DTYPES[p.dtype])
                grads.append(gbuf)
                ptrs.append(p.data_ptr())
            shards.append(_ShardState(gi, dev, c, list(params), grads, ptrs))
        if not shards:
            raise ValueError("hyzo: the optimizer got no parameters")
        return shards

    @staticmethod
    def _grad_buffer(p: torch.Tensor) -> torch.Tensor:
        """The tensor registered as ``p``'s gradient: ``p.grad`` when usable, else zeros."""
        g = p.grad
        if (g is None or g.dtype != p.dtype or g.shape != p.shape or g.device != p.device
                or not g.is_contiguous() or g.is_sparse):
            g = torch.zeros_like(p, memory_format=torch.contiguous_format)
            p.grad = g
        return g

    # ------------------------------------------------------------------------------------
    # Helpers of a step.

    def _steps_taken(self) -> int:
        return self._shards[0].c.stats()[0] if self._shards else 0

    def _prepare(self) -> None:
        """Checks the parameters are still in place; pushes lr/weight decay and streams."""
        for s in self._shards:
            for p, ptr in zip(s.params, s.ptrs):
                if p.data_ptr() != ptr:
                    raise RuntimeError(
                        "hyzo: a parameter's storage moved since the optimizer was created "
                        "(e.g. model.to()/.half()/.cuda() or a reassigned .data); create the "
                        "optimizer after moving the model"
                    )
            g = self.param_groups[s.group_index]
            s.c.set_lr(_as_float(g["lr"]))
            s.c.set_weight_decay(_as_float(g["weight_decay"]))
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

    def _zo_step(self, closure: Callable[[], Any]) -> torch.Tensor:
        """One zeroth-order step over every shard (closure under no_grad)."""
        if closure is None:
            raise ValueError("step: a zeroth-order step needs a closure that returns the loss")
        g0 = self.param_groups[0]
        if g0["directions"] == "sphere":
            q = int(g0["num_directions"])
            norms = torch.zeros(q, dtype=torch.float64)
            for s in self._shards:
                norms += torch.tensor(s.c.local_sq_norms(), dtype=torch.float64)
            if self._pg is not None:
                r = norms.to(_collective_device(self._pg))
                dist.all_reduce(r, op=dist.ReduceOp.SUM, group=self._pg)
                norms = r.cpu()
            for s in self._shards:
                s.c.begin(norms.tolist())
        else:
            for s in self._shards:
                s.c.begin()
        losses: List[torch.Tensor] = []
        try:
            more = True
            while more:
                with torch.no_grad():
                    loss = closure()
                t = self._loss_tensor(loss)
                losses.append(t)
                more = self._feed(t)
        except BaseException:
            for s in self._shards:
                try:
                    s.c.abort()
                except _lib.HyzoError:
                    pass
            raise
        if g0["estimator"] == "one_sided":
            return losses[0]
        return torch.stack(losses).mean()

    def _zero_own_grads(self) -> None:
        for s in self._shards:
            for gbuf in s.grads:
                if gbuf is not None:
                    gbuf.zero_()

    def _collect_grads(self) -> None:
        """Makes the registered buffers hold the gradients (``p.grad`` may have been set to
        None or replaced, e.g. by ``model.zero_grad()``): copies when needed."""
        with torch.no_grad():
            for s in self._shards:
                for p, gbuf in zip(s.params, s.grads):
                    if gbuf is None:
                        continue
                    g = p.grad
                    if g is gbuf:
                        continue
                    if g is None:
                        gbuf.zero_()
                    elif g.is_sparse:
                        gbuf.copy_(g.to_dense())
                    elif g.data_ptr() != gbuf.data_ptr():
                        gbuf.copy_(g)
                    p.grad = gbuf

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
        self._collect_grads()
        return loss.detach()

    def _fo_all(self) -> None:
        for s in self._shards:
            s.c.fo_step()

    # ------------------------------------------------------------------------------------
    # torch.optim API.

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients. The buffers registered with hyzo (Hybrid, FO) are zeroed
        in place whatever ``set_to_none`` says: the C optimizer holds their addresses."""
        if not self._needs_grads:
            super().zero_grad(set_to_none=set_to_none)
            return
        self._zero_own_grads()
        for s in self._shards:
            for p, gbuf in zip(s.params, s.grads):
                if gbuf is not None and p.grad is not gbuf:
                    p.grad = gbuf

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict (param groups, with lr, seed, ...) plus the C state of every
        shard as a uint8 tensor under ``"hyzo"``: a resumed run continues bit-identically
        (restore the parameters too)."""
        sd = super().state_dict()
        sd["hyzo"] = {
            "format": 1,
            "library_version": _lib.version(),
            "shards": [torch.frombuffer(bytearray(s.c.save_state()), dtype=torch.uint8)
                       for s in self._shards],
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (the optimizer must have the same param groups)."""
        state_dict = dict(state_dict)
        hz = state_dict.pop("hyzo", None)
        if hz is None:
            raise ValueError("load_state_dict: not a hyzo optimizer state dict (no 'hyzo' key)")
        bufs = hz["shards"]
        saved_groups = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        # The configuration (seed, rule, ...) comes from the loaded param groups, as torch
        # restores hyperparameters; on any failure the optimizer stays as it was.
        shards: List[_ShardState] = []
        try:
            shards = self._make_shards()
            if len(bufs) != len(shards):
                raise ValueError(f"load_state_dict: {len(bufs)} saved shards, this optimizer "
                                 f"has {len(shards)}")
            for s, b in zip(shards, bufs):
                if isinstance(b, torch.Tensor):
                    b = b.detach().cpu().contiguous().numpy().tobytes()
                s.c.load_state(bytes(b))
        except BaseException:
            for s in shards:
                s.c.close()
            self.param_groups[:] = saved_groups
            raise
        old, self._shards = self._shards, shards
        for s in old:
            s.c.close()

    @property
    def steps(self) -> int:
        """Steps taken (first- and zeroth-order, skipped ones included)."""
        return self._steps_taken()

    @property
    def skipped(self) -> int:
        """Zeroth-order steps skipped because a loss was not finite."""
        return self._shards[0].c.stats()[1]

    def __getstate__(self) -> Dict[str, Any]:
        raise TypeError("hyzo optimizers cannot be pickled or deep-copied; use state_dict()")


class ZO(_HyzoOptimizer):
    """Zeroth-order optimizer: ``step(closure)`` estimates the gradient from loss values.

    Args:
        params: parameters or param groups (dicts with ``params`` and per-group options).
        lr: learning rate.
        eps: smoothing radius ``μ`` of the finite differences.
        rule: update rule: ``"sgd"``, ``"momentum"``, ``"sign"``, ``"signum"``, ``"adamw"``,
            ``"adazo"``.
        betas: ``(β1, β2)`` of momentum / signum / AdamW / AdaZO.
        weight_decay: decoupled weight decay ``λ``.
        directions: ``"gaussian"``, ``"rademacher"`` or ``"sphere"``.
        num_directions: directions ``q`` per step.
        estimator: ``"two_sided"`` (``2q`` evaluations) or ``"one_sided"`` (``q + 1``).
        precision: rounding of f16/bf16 parameters: ``"nearest"``, ``"stochastic"``,
            ``"compensated"``.
        seed: the seed naming every direction of the run; ``None`` draws one from torch's
            default generator (broadcast from rank 0 with a process group).
        process_group: all-reduce (mean) each loss over this group (``True``: the world).
        adam_eps: Adam's ``ε``.
        num_threads: threads of the CPU backend per C optimizer (``None``: all cores).

    ``step(closure)`` calls ``closure()`` ``2q`` (two-sided) or ``q + 1`` (one-sided) times
    under ``torch.no_grad()`` and returns a detached 0-d tensor: the loss at the unperturbed
    point for the one-sided estimator, the mean of the ``2q`` perturbed losses for the
    two-sided one (which equals the unperturbed loss up to ``O(μ²)``). If the closure raises,
    the step is abandoned (parameters restored) and the exception propagates. A step with a
    non-finite loss updates nothing and counts in :attr:`skipped`.
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
    ) -> None:
        defaults = _defaults(lr=lr, eps=eps, rule=rule, betas=betas, weight_decay=weight_decay,
                             directions=directions, num_directions=num_directions,
                             estimator=estimator, precision=precision, seed=seed,
                             adam_eps=adam_eps, fo_steps=0, zo_steps=0, hybrid_alpha=0.0)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step (see the class documentation)."""
        self._prepare()
        return self._zo_step(closure)  # type: ignore[arg-type]


class Hybrid(_HyzoOptimizer):
    """Hybrid first-/zeroth-order optimizer (blocks of ``fo_steps`` first-order steps and
    ``zo_steps`` zeroth-order steps, starting with first-order, sharing state).

    Arguments: ``Hybrid(params, fo_steps=20, zo_steps=20, lr=1e-3, ...)``, then the same
    as :class:`ZO` (default ``rule="adamw"``), plus ``hybrid_alpha`` (``α`` of the mixed estimate
    ``α ∇ + (1 − α) ĝ`` used by zeroth-order steps; with ``α > 0`` every zeroth-order step
    first computes a gradient at the unperturbed point: one extra forward and backward).

    ``step(closure)``: in a first-order step, zeroes the gradients, runs ``closure()`` with
    grad enabled, calls ``loss.backward()`` itself (DDP averages the gradients as usual) and
    updates; in a zeroth-order step it behaves as :meth:`ZO.step`. Returns the loss (a
    detached 0-d tensor). ``fo_steps = zo_steps = 0`` means no schedule: pass
    ``phase="fo"`` or ``"zo"`` to every ``step``. Gradient buffers are allocated at
    construction (``p.grad``, zeroed) and registered with the C optimizer; ``zero_grad``
    zeroes them in place.
    """

    _needs_grads = True

    def __init__(
        self,
        params: Any,
        fo_steps: int = 20,
        zo_steps: int = 20,
        lr: float = 1e-3,
        eps: float = 1e-3,
        rule: str = "adamw",
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
        adam_eps: float = 1e-8,
        num_threads: Optional[int] = None,
    ) -> None:
        defaults = _defaults(lr=lr, eps=eps, rule=rule, betas=betas, weight_decay=weight_decay,
                             directions=directions, num_directions=num_directions,
                             estimator=estimator, precision=precision, seed=seed,
                             adam_eps=adam_eps, fo_steps=fo_steps, zo_steps=zo_steps,
                             hybrid_alpha=hybrid_alpha)
        super().__init__(params, defaults, process_group=process_group,
                         num_threads=num_threads)

    def next_phase(self) -> str:
        """``"fo"`` or ``"zo"``: the kind of the next step (``"any"`` without schedule)."""
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
            self._fo_all()
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
    """

    _needs_grads = True

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
        """A first-order step on the parameters' ``.grad`` (missing gradients count as 0)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare()
        self._collect_grads()
        self._fo_all()
        return loss


# ----------------------------------------------------------------------------------------


def _defaults(**kw: Any) -> Dict[str, Any]:
    """Normalizes the options (enum names lower-case) and checks their types early."""
    for k in ("rule", "directions", "estimator", "precision"):
        if not isinstance(kw[k], str):
            raise TypeError(f"{k}: expected a string, got {kw[k]!r}")
        kw[k] = kw[k].lower().replace("-", "_")
    kw["betas"] = tuple(float(b) for b in kw["betas"])
    if len(kw["betas"]) != 2:
        raise ValueError(f"betas: expected two floats, got {kw['betas']!r}")
    if kw["seed"] is not None:
        s = kw["seed"]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
            raise ValueError(f"seed: expected an integer in [0, 2**64) or None, got {s!r}")
    kw["global_offset"] = None
    # Validate values with the library now, for a clear error at construction.
    _lib.make_config(**{k: (_as_float(v) if k == "lr" else v) for k, v in kw.items()
                        if k not in ("global_offset",) and not (k == "seed" and v is None)})
    return kw


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
