"""What :class:`ZO`, :class:`Hybrid` and :class:`FO` share: a ``torch.optim.Optimizer``
whose param groups are each one C optimizer (see the package documentation)."""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import _lib
from . import _checkpoint, _gradients, _lowrank, _protocol
from ._options import MODEL_WIDE_KEYS, RuleSettings, as_float, check_group, config_of
from ._registration import GroupPlan, GroupShard, check_model_wide, plan, register


class HyzoOptimizer(torch.optim.Optimizer):
    """Common machinery of :class:`ZO`, :class:`Hybrid` and :class:`FO` (not public)."""

    _needs_grads = False  # register gradient buffers with the C optimizers
    # Make the registered buffer the parameter's .grad at construction (Hybrid, which runs
    # backward itself). FO leaves a None .grad as it is: None means "skip this parameter".
    _assign_grads_at_build = True
    # The options every param group must share (see _options.MODEL_WIDE_KEYS).
    _model_wide_keys: Tuple[str, ...] = MODEL_WIDE_KEYS
    # Whether every group's C optimizer steps whenever the others do (ZO, Hybrid), so that
    # all of them always agree on their counters; FO skips a group without gradients.
    _lockstep = True

    def __init__(self, params: Any, defaults: Dict[str, Any], *,
                 process_group: Any = None, num_threads: Optional[int] = None,
                 skip_nonfinite_grads: bool = True) -> None:
        if skip_nonfinite_grads not in (True, False):
            raise ValueError(f"skip_nonfinite_grads: expected True or False, got "
                             f"{skip_nonfinite_grads!r}")
        self._skip_nonfinite_grads = bool(skip_nonfinite_grads)
        if process_group is True:
            process_group = dist.group.WORLD
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("process_group: torch.distributed is not initialized")
        if num_threads is not None:
            # Checked here, not only at the first C optimizer: a group may create it later.
            _lib.check_int("num_threads", num_threads, 0, 2**32)
        self._pg = process_group
        self._num_threads = num_threads
        self._shards: List[GroupShard] = []
        # Per group, each parameter's identity and whether it was trainable when the C
        # optimizers were built (the shards hold the registered parameters themselves).
        self._trainable: List[List[Tuple[int, bool]]] = []
        self._built = False
        self._lowrank = _lowrank.Hooks()
        defaults.setdefault("global_offset", None)
        self._check_group(defaults)
        if defaults.get("seed") is None:
            defaults["seed"] = _protocol.draw_seed(self._pg)
        super().__init__(params, defaults)
        self._build()

    # ------------------------------------------------------------------------------------
    # Construction: what the subclasses specialize.

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a param group (only before the first step: the C optimizers are rebuilt)."""
        if getattr(self, "_built", False) and self._steps_taken() > 0:
            raise RuntimeError("hyzo: param groups cannot be added after the first step")
        if isinstance(param_group, dict):
            self._normalize_group(param_group)
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
            if getattr(self, "_built", False):
                self._build()
        except BaseException:
            self.param_groups.pop()
            raise

    def _normalize_group(self, group: Dict[str, Any], loaded: bool = False) -> None:
        """Rewrites a param group's own keys into the stored form (see :class:`Hybrid`);
        ``loaded``: a group of a loaded state dict, possibly from an older version."""
        if loaded:
            group.setdefault("rank", 1)  # a state dict from before low-rank directions

    def _rule_settings(self, g: Dict[str, Any]) -> RuleSettings:
        """The rule fields of group ``g``'s C configuration."""
        return RuleSettings(rule=g["rule"], lr=as_float(g["lr"]),
                            weight_decay=as_float(g["weight_decay"]))

    def _check_group(self, g: Dict[str, Any], where: str = "") -> None:
        """The one check of a param group (or of the defaults, ``where`` empty), whether
        it comes from the constructor, :meth:`add_param_group` or a loaded state dict:
        its options' types, the optimizer's own rules, then their values, by the library
        (a throwaway C optimizer: the same checks as the group's own, also for a group
        without trainable parameters, which gets none)."""
        prefix = f"{where}: " if where else ""
        check_group(g, where)
        self._check_own_options(g, prefix)
        try:
            _lib.COptimizer(self._config_of(g), "cpu").close()
        except _lib.HyzoError as e:
            raise type(e)(prefix + str(e), e.status, e.func) from None
        except (TypeError, ValueError) as e:  # make_config's checks of what is left
            raise type(e)(prefix + str(e)) from None

    def _check_own_options(self, g: Dict[str, Any], prefix: str) -> None:
        """What this kind of optimizer refuses in a group (``prefix`` starts messages)."""

    def _check_groups(self) -> None:
        """Checks what the param groups must share before they are registered."""
        check_model_wide(self.param_groups, self._model_wide_keys)

    def _config_of(self, g: Dict[str, Any]) -> _lib.hyzo_config:
        return config_of(g, self._rule_settings(g))

    # ------------------------------------------------------------------------------------
    # Registration.

    def _plan(self) -> List[GroupPlan]:
        self._check_groups()
        return plan(self.param_groups, self._needs_grads)

    def _make_shards(self) -> List[GroupShard]:
        """New C optimizers for the current param groups (nothing installed yet)."""
        return register(self._plan(), lambda gi: self._config_of(self.param_groups[gi]),
                        self._num_threads, self._lay_out_lowrank, self._assign_grads_at_build)

    def _install(self, shards: List[GroupShard]) -> None:
        """Makes ``shards`` the optimizer's, closing the ones they replace."""
        old, self._shards = self._shards, shards
        self._trainable = self._trainable_flags()
        for s in old:
            s.c.close()
        self._built = True

    def _build(self) -> None:
        """(Re)creates one C optimizer per param group and registers its tensors."""
        self._install(self._make_shards())

    def _trainable_flags(self) -> List[List[Tuple[int, bool]]]:
        return [[(id(p), bool(p.requires_grad)) for p in g["params"]]
                for g in self.param_groups]

    def _steps_taken(self) -> int:
        return max((s.c.stats()[0] for s in self._shards), default=0)

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

    # ------------------------------------------------------------------------------------
    # Before and during a step.

    def _prepare(self) -> None:
        """Checks the parameters are still in place; pushes lr/weight decay and streams."""
        self._sync_trainable()
        if not self._shards:
            raise ValueError(
                "hyzo: no trainable parameters: every parameter has requires_grad=False "
                "(frozen parameters are left alone, as in torch.optim). A zeroth-order "
                "optimizer needs no autograd: its closure runs under torch.no_grad(), so "
                "keep requires_grad=True on the parameters to optimize (for plain tensors: "
                "tensor.requires_grad_())")
        if self._uses_lowrank() and not self._lowrank.attached:
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
            s.c.set_lr(r.lr)
            s.c.set_weight_decay(r.weight_decay)
            s.c.set_fo_lr(r.fo_lr)
            s.c.set_fo_weight_decay(r.fo_weight_decay)
            if s.device.type == "cuda":
                s.c.set_stream(torch.cuda.current_stream(s.device).cuda_stream)

    def _zo_step(self, closure: Any) -> torch.Tensor:
        return _protocol.zo_step(self._shards, closure, self.param_groups[0], self._pg,
                                 self._lowrank)

    def _compute_grads(self, closure: Any) -> torch.Tensor:
        return _gradients.compute(self._shards, closure)

    def _skips_nonfinite(self, shards: Sequence[GroupShard],
                         missing: Optional[Sequence[Collection[int]]] = None) -> bool:
        """With ``skip_nonfinite_grads``: whether a gradient of the step is NaN or infinite
        anywhere in the model (every shard, every rank of the process group); if so, every
        shard skips the step (counted in :attr:`skipped`, nothing else changes)."""
        if not self._skip_nonfinite_grads or _gradients.all_finite(shards, self._pg, missing):
            return False
        for s in shards:
            s.c.skip_step()
        return True

    # ------------------------------------------------------------------------------------
    # Low-rank directions (spec §7): forward hooks on nn.Linear / nn.Embedding.

    def _uses_lowrank(self) -> bool:
        return self.param_groups[0].get("directions") == "lowrank"

    def _lay_out_lowrank(self, shard: GroupShard) -> None:
        g = self.param_groups[shard.group_index]
        if g.get("directions") == "lowrank" and self._lowrank.shapes:
            _lowrank.lay_out(shard, self._lowrank.shapes, int(g.get("rank", 1)))

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
                             f"{self.param_groups[0].get('directions')!r}; attach() is for "
                             "directions='lowrank'")
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach: expected a torch.nn.Module, got {type(model).__name__}")
        held = {id(p): p for g in self.param_groups for p in g["params"] if p.requires_grad}
        shapes, names, hooked = _lowrank.choose(model, held, exclude)
        if shapes != self._lowrank.shapes:
            if self._steps_taken() > 0:
                raise RuntimeError(
                    "attach: the optimizer has taken steps with another set of low-rank "
                    "weights (shapes are registered once, before the first step); attach "
                    "the model before the first step, or create a new optimizer")
            self._lowrank.shapes = shapes
            self._build()  # new C optimizers, with the shapes registered
        self._lowrank.names = names
        self._lowrank.install(hooked)
        return [names[pid] for pid in shapes]

    def detach(self) -> None:
        """Removes the forward hooks of :meth:`attach` (steps then refuse until the model
        is attached again; the registered shapes stay)."""
        self._lowrank.remove()
        self._lowrank.attached = False

    @property
    def lowrank_parameters(self) -> List[str]:
        """Names (from the attached model) of the weights that get low-rank directions."""
        return list(self._lowrank.names.values())

    # ------------------------------------------------------------------------------------
    # torch.optim API.

    @torch.no_grad()
    def perturb_(self, std: float, seed: int, step: int = 0, direction: int = 0) -> None:
        """Adds ``std * z`` once to every trainable parameter, ``z`` the direction ``(seed,
        step, direction)`` of the optimizer's kind (``directions``; ``"sphere"`` gives its
        unscaled Gaussian, ``"lowrank"`` the Gaussian on every tensor, the low-rank weights
        included: a displacement is written) at each element's global offset: a seeded
        displacement that any process regenerates exactly for the shard it holds
        (``hyzo.directions`` gives the same ``z`` on the CPU; CUDA's fast Gaussian is within
        spec §3's tolerance of it), e.g. the noise control of an experiment.

        One perturbation pass per param group, written back with the group's ``precision``
        (as a perturbation pass: nearest for ``"stochastic"``); the optimizer's state, step
        counts and schedule do not change, and no collective runs. The seed is the caller's,
        independent of the optimizer's ``seed``: the same ``(seed, step, direction)`` as a
        zeroth-order step would repeat that step's direction. ``std`` must be finite;
        ``step`` and ``direction`` are u32 (directions ``0xFFFFFF00`` and above are the
        library's own streams, spec §2)."""
        std = as_float(std)
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
        _gradients.zero(self._shards)
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
        sd["hyzo"] = _checkpoint.pack(self._shards)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (the optimizer must have the same param groups, with
        the same trainable parameters). The saved states are read in place (uint8 CPU
        tensors, e.g. from ``torch.load(..., mmap=True)``, or bytes-like objects).

        Refused, with the optimizer left as it was: a state dict of an unknown format, a
        loaded param group that the constructor would refuse (the same checks run), a state
        that does not fit (another configuration, corrupted, truncated), and shards that
        disagree on step, updates or skipped steps (a checkpoint mixed from several saves;
        not :class:`FO`, whose groups without gradients are not stepped). The seed and
        the schedule are the groups' (they must be one for all) and each state must match
        them."""
        state_dict = dict(state_dict)
        bufs = _checkpoint.unpack(state_dict.pop("hyzo", None))
        groups = state_dict.get("param_groups") or [{}]
        if groups[0].get("directions") == "lowrank" and not self._lowrank.attached:
            raise RuntimeError("load_state_dict: a state of low-rank directions (its shapes are "
                               "part of it): call opt.attach(model) before loading it")
        saved_groups = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        # The configuration (seed, rule, ...) comes from the loaded param groups, as torch
        # restores hyperparameters; on any failure the optimizer stays as it was.
        shards: List[GroupShard] = []
        try:
            for i, g in enumerate(self.param_groups):
                self._normalize_group(g, loaded=True)
                self._check_group(g, f"load_state_dict: param group {i}")
            shards = self._make_shards()
            _checkpoint.load(shards, bufs)
            if self._lockstep:
                _checkpoint.check_lockstep(shards)
        except BaseException:
            for s in shards:
                s.c.close()
            self.param_groups[:] = saved_groups
            raise
        self._install(shards)

    @property
    def steps(self) -> int:
        """Steps taken (first- and zeroth-order, skipped ones included)."""
        return self._steps_taken()

    @property
    def skipped(self) -> int:
        """Steps skipped: zeroth-order ones because a loss or a projected gradient was not
        finite (spec v2 §4: parameters restored, no state updated), and, with
        ``skip_nonfinite_grads``, steps whose gradient was NaN or infinite somewhere in the
        model (nothing changed)."""
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
