"""Hugging Face ``transformers.Trainer`` with hyzo's optimizers: :class:`ZOTrainer` and
:class:`HybridTrainer` (``pip install hyzo[transformers]``; transformers 4.45 to 5.x).

Swap ``Trainer`` for one of them and pass ``zo_options``; everything else is the Trainer's::

    trainer = HybridTrainer(model=model, args=args, train_dataset=ds,
                            zo_options={"fo_steps": 10, "zo_steps": 10, "num_directions": 4})
    trainer.train()

- The optimizer is :class:`hyzo.torch.ZO` or :class:`hyzo.torch.Hybrid`, built by the
  Trainer's own ``create_optimizer`` over the parameters and param groups it chooses (the
  trainable ones, ``requires_grad``, so PEFT/LoRA adapters alone; weight decay on all but
  biases and norms). A subclass's ``create_optimizer`` that selects parameters and calls
  ``super().create_optimizer()`` (open-unlearning's RMU) is honoured, whatever the order of
  the bases. ``zo_options`` are passed to the optimizer as keyword arguments
  (``num_directions``, ``eps``, ``rule``, ``seed``, ``directions``, ``estimator``,
  ``precision``; for the hybrid ``fo_steps``, ``zo_steps``, ...); learning rate, weight
  decay, Adam's betas and epsilon, ``max_steps``, the scheduler and warm-up, logging, saving
  and ``resume_from_checkpoint`` come from ``TrainingArguments``. The seed of the directions
  defaults to ``args.seed``. ``args.optim`` (e.g. ``"paged_adamw_32bit"``) is replaced by
  hyzo's optimizer, with a warning at construction.
- Every forward pass computes its loss with ``self.compute_loss(model, inputs)``, so a
  subclass that overrides ``compute_loss`` (an unlearning objective) works unchanged;
  ``num_items_in_batch`` is passed only to an override that accepts it (a parameter of that
  name, or ``**kwargs``), so the 3-argument ``compute_loss(self, model, inputs,
  return_outputs=False)`` of TOFU, MUSE and open-unlearning works.
- Zeroth-order steps run ``2q`` (two-sided) or ``q + 1`` (one-sided) evaluations under
  ``torch.no_grad()`` (no backward, no activations kept), with the model in eval mode:
  as in MeZO, a difference of two losses under different dropout masks would measure the
  masks, not the direction. First-order steps of the hybrid run the forward in train mode
  and a backward (through ``accelerate``), then clip to ``max_grad_norm``, then update.
- Gradient accumulation (``gradient_accumulation_steps = k``): one optimizer step per ``k``
  micro-batches, as the Trainer counts them (``global_step``, ``max_steps``, the scheduler
  and checkpoints count optimizer steps). A zeroth-order step evaluates every point on all
  ``k`` micro-batches, one after the other, and takes their loss as the Trainer's
  accumulated loss (the mean, or the sum of losses already normalized by
  ``num_items_in_batch``): ``2qk`` forwards, still no activations kept. A first-order step
  accumulates the ``k`` gradients as the Trainer does. The micro-batches of a step are held
  (their inputs only) until the last one arrives.
- The ``2q`` evaluations of a zeroth-order step are one training step: the Trainer logs one
  loss per step, and ``self.log`` calls made by ``compute_loss`` during a step are collected
  and logged once at its end (numbers: their mean). A ``compute_loss`` that keeps state (a
  dual variable, a running statistic) reads ``self.hyzo_forward`` (:class:`HyzoForward`):
  which forward of the step this is (``phase``, ``evaluation`` of ``evaluations``,
  ``micro_batch`` of ``micro_batches``, ``perturbed``, ``first``, ``last``); it is ``None``
  outside hyzo's steps (as in a plain Trainer). Update state on ``last``, so that every
  point of a zeroth-order step sees the same objective.
- ``bf16=True``: the forwards run under autocast (accelerate's), as in the Trainer; the
  weights keep their dtype and hyzo's own precision modes (``zo_options["precision"]``) for
  float16/bfloat16 weights.
- ``training_step``: hyzo's takes the optimizer step inside it (a zeroth-order step needs
  the loss at several points). An override in a class before the trainer in the method
  order that calls ``super().training_step(...)`` wraps the whole step and composes; one in
  a base class after it (``class X(HybridTrainer, Base)``, with ``Base.training_step``)
  would be bypassed, and is refused at construction.
- Checkpoints: ``optimizer.pt`` holds hyzo's state, and a resumed run continues
  bit-identically on the CPU (with gradient accumulation too).
- Data parallel (``torchrun``/``accelerate launch``): the loss of every zeroth-order
  evaluation is all-reduced (mean; one scalar) and first-order gradients are averaged by
  DDP (once per step, at the last micro-batch), so every rank applies the same update.
- Low-rank directions (``zo_options={"directions": "lowrank", "rank": 4}``): the optimizer is
  attached to the model (:meth:`hyzo.torch.ZO.attach`) when the trainer creates it, so the
  weights of its ``nn.Linear``/``nn.Embedding`` modules are perturbed inside the forward;
  ``zo_options["lowrank_exclude"]`` (names or tensors) keeps some of them Gaussian (a
  weight the model's code reads directly, e.g. ``x @ self.embed.weight.T``).

Not supported, refused at construction with a message: ``fp16=True`` (its gradient scaler
unscales the gradients and skips updates inside ``optimizer.step()``, after hyzo has
updated; use ``bf16=True``, or a float16 model without ``fp16``), DeepSpeed and FSDP (they
own the optimizer and shard the parameters), an optimizer passed in ``optimizers`` or
``optimizer_cls_and_kwargs``, and a ``training_step`` that hyzo's would bypass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import transformers

from . import torch as _hyzo_torch

__all__ = ["ZOTrainer", "HybridTrainer", "HyzoForward"]

# Optimizer arguments the trainers set themselves, and where a user sets them instead.
_SET_BY_TRAINER = {
    "params": "the model's trainable parameters (requires_grad)",
    "lr": "TrainingArguments(learning_rate=...)",
    "weight_decay": "TrainingArguments(weight_decay=...)",
    "betas": "TrainingArguments(adam_beta1=..., adam_beta2=...)",
    "adam_eps": "TrainingArguments(adam_epsilon=...)",
    "process_group": "the launcher (torchrun / accelerate launch): the world group",
}
# zo_options the trainers take themselves (not optimizer arguments).
_TRAINER_OPTIONS = ("lowrank_exclude",)


@dataclasses.dataclass(frozen=True)
class HyzoForward:
    """The forward pass in progress within a hyzo step: ``trainer.hyzo_forward`` while hyzo's
    trainers call ``compute_loss``, ``None`` otherwise.

    Attributes:
        phase: ``"fo"`` or ``"zo"``, the kind of the step.
        evaluation: index of the point evaluated, ``0 <= evaluation < evaluations``. A
            first-order step has one (``evaluations == 1``); a zeroth-order step ``2q``
            (two-sided: ``x + μz_1, x − μz_1, ...``) or ``q + 1`` (one-sided: ``x`` first),
            after one first-order pass at ``x`` when ``hybrid_alpha > 0``.
        evaluations: the number of points of the step.
        micro_batch: index of the micro-batch (gradient accumulation),
            ``0 <= micro_batch < micro_batches``; every point is evaluated on all of them.
        micro_batches: micro-batches of the step (``gradient_accumulation_steps``, fewer at
            the end of an epoch).
        perturbed: the parameters are at a perturbed point ``x ± μz`` (not their values).
        backward: a backward pass follows this forward (first-order).
    """

    phase: str
    evaluation: int
    evaluations: int
    micro_batch: int
    micro_batches: int
    perturbed: bool
    backward: bool

    @property
    def first(self) -> bool:
        """The step's first forward."""
        return self.evaluation == 0 and self.micro_batch == 0

    @property
    def last(self) -> bool:
        """The step's last forward: where state kept across steps is updated, once."""
        return (self.evaluation == self.evaluations - 1
                and self.micro_batch == self.micro_batches - 1)


class _StepsInTrainingStep:
    """Mixin over a hyzo optimizer, for the trainers.

    hyzo's ``step`` needs a closure (the loss at each perturbed point), so the trainers take
    the step inside ``training_step``; the Trainer's loop then calls ``optimizer.step()``
    without a closure, which only checks that ``training_step`` took one. The Trainer's
    ``create_optimizer`` constructs it with its param groups (some possibly empty).
    """

    _took_step = False
    # Takes the step of micro-batches held by the trainer, when the Trainer ends an
    # accumulation window without telling training_step (transformers < 4.46, an epoch
    # shorter than the window).
    _late_step: Optional[Callable[[], None]] = None
    # Keys a param group without weight decay sets to 0 too (no decay in any step).
    _no_decay_keys: Tuple[str, ...] = ()

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = list(params)
        if params and all(isinstance(g, dict) for g in params):
            params = [dict(g, params=list(g["params"])) for g in params]
            params = [g for g in params if g["params"]]
            for g in params:
                if g.get("weight_decay", None) == 0.0:
                    for k in self._no_decay_keys:
                        g.setdefault(k, 0.0)
            if not params:
                raise ValueError("hyzo.transformers: the model has no trainable parameters "
                                 "(requires_grad) for the optimizer")
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]

    def step(self, closure=None, **kwargs):  # type: ignore[no-untyped-def]
        if closure is None:
            if not self._took_step and self._late_step is not None:
                self._late_step()
            if not self._took_step:
                raise RuntimeError(
                    "hyzo.transformers: optimizer.step() without a closure, and training_step "
                    "took no step: the trainers step inside training_step, so a training_step "
                    "override must call super().training_step(model, inputs, ...) (put the "
                    "objective in compute_loss)")
            self._took_step = False
            return None
        loss = super().step(closure, **kwargs)  # type: ignore[misc]
        self._took_step = True
        return loss


class _TrainerZO(_StepsInTrainingStep, _hyzo_torch.ZO):
    pass


class _TrainerHybrid(_StepsInTrainingStep, _hyzo_torch.Hybrid):
    _no_decay_keys = ("zo_weight_decay",)


def _accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def _merge_logs(logs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One log of a step's ``self.log`` calls: each number the mean of its values, anything
    else its last value."""
    merged: Dict[str, Any] = {}
    for key in dict.fromkeys(k for d in logs for k in d):
        values = [d[key] for d in logs if key in d]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values) / len(values)
        else:
            merged[key] = values[-1]
    return merged


class _HyzoTrainer(transformers.Trainer):
    """What :class:`ZOTrainer` and :class:`HybridTrainer` share (not public)."""

    _optimizer_class: type = _TrainerZO
    _public_optimizer: type = _hyzo_torch.ZO
    hyzo_forward: Optional[HyzoForward] = None

    def __init__(self, *args: Any, zo_options: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        if zo_options is not None and not isinstance(zo_options, dict):
            raise TypeError(f"zo_options: expected a dict, got {type(zo_options).__name__}")
        self.zo_options: Dict[str, Any] = dict(zo_options or {})
        self._hyzo_optimizer: Optional[torch.optim.Optimizer] = None
        self._last_phase = "zo"
        self._last_grad_norm: Optional[float] = None
        # The micro-batches of the accumulation window in progress (prepared inputs), and the
        # model and num_items_in_batch the Trainer passed with them.
        self._window: List[Dict[str, Any]] = []
        self._window_model: Any = None
        self._window_num_items: Any = None
        # self.log calls during a step, logged once at its end.
        self._logs_in_step: Optional[List[Dict[str, Any]]] = None
        super().__init__(*args, **kwargs)
        self._check_supported()
        self._check_overrides()
        self._check_zo_options()
        self._warn_if_optim_is_set()
        self._passes_num_items = _accepts_keyword(self.compute_loss, "num_items_in_batch")

    # ------------------------------------------------------------------------------------
    # Construction checks: fail before any data is loaded.

    def _check_supported(self) -> None:
        name = type(self).__name__
        args = self.args
        if args.fp16:
            raise ValueError(
                f"{name}: fp16=True is not supported: its gradient scaler unscales the "
                "gradients and skips the update inside optimizer.step(), but hyzo updates "
                "inside training_step (a zeroth-order step needs the loss at several points), "
                "so the scaled gradients would be applied; use bf16=True (autocast, no scaler), "
                "or load the model in float16 without fp16=True (hyzo updates float16 "
                "parameters in place; zo_options['precision'] sets the rounding)")
        if self.is_deepspeed_enabled:
            raise ValueError(f"{name}: DeepSpeed is not supported (it owns the optimizer and "
                             "partitions the parameters); use plain data parallelism")
        if self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            raise ValueError(f"{name}: FSDP is not supported by the trainers (hyzo.torch takes "
                             "FSDP-style flat shards with their global offsets directly)")
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ValueError(f"{name}: the optimizer is hyzo's; do not pass `optimizers` "
                             "(set the learning rate and scheduler in TrainingArguments)")
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ValueError(f"{name}: the optimizer is hyzo's; do not pass "
                             "`optimizer_cls_and_kwargs`")

    def _check_overrides(self) -> None:
        """Refuses a ``training_step`` that hyzo's would bypass: one defined in a class after
        hyzo's trainer in the method resolution order (a base listed after it)."""
        mro = type(self).__mro__
        for cls in mro[mro.index(_HyzoTrainer) + 1:]:
            if cls in (transformers.Trainer, object):
                continue
            if "training_step" in vars(cls):
                hyzo = next(c for c in mro if c.__module__ == __name__)
                raise TypeError(
                    f"{type(self).__name__}: {cls.__qualname__}.training_step would be bypassed: "
                    f"{hyzo.__name__} comes before {cls.__qualname__} in the bases and takes the "
                    "optimizer step inside its own training_step (a zeroth-order step "
                    "evaluates the loss at several points, through compute_loss). Put the "
                    "objective in compute_loss; a training_step that only wraps the step and "
                    f"calls super().training_step(...) works in a class listed before "
                    f"{hyzo.__name__}")

    def _check_zo_options(self) -> None:
        """Names are checked against the optimizer's signature, values by building one on a
        throwaway tensor, so a typo fails here rather than after the data is loaded."""
        name = type(self).__name__
        accepted = [p for p in inspect.signature(self._public_optimizer).parameters
                    if p not in _SET_BY_TRAINER] + list(_TRAINER_OPTIONS)
        for key in self.zo_options:
            if key in _SET_BY_TRAINER:
                raise ValueError(f"{name}: zo_options[{key!r}] is set by the trainer; use "
                                 f"{_SET_BY_TRAINER[key]}")
            if key not in accepted:
                raise ValueError(f"{name}: unknown zo_options key {key!r}; accepted: "
                                 f"{', '.join(accepted)}")
        self._check_probe(self._optimizer_class([torch.zeros(1)],
                                                **self._optimizer_kwargs(probe=True)))

    def _check_probe(self, probe: Any) -> None:
        pass

    def _warn_if_optim_is_set(self) -> None:
        args = self.args
        field = {f.name: f for f in dataclasses.fields(type(args))}.get("optim")
        default = getattr(field, "default", None)
        optim = getattr(args.optim, "value", args.optim)
        if optim != getattr(default, "value", default) or getattr(args, "optim_args", None):
            opt = self._public_optimizer
            warnings.warn(
                f"{type(self).__name__}: TrainingArguments(optim={optim!r}"
                f"{', optim_args=...' if getattr(args, 'optim_args', None) else ''}) is "
                f"replaced by hyzo's optimizer ({opt.__module__}.{opt.__name__}), which takes "
                "learning_rate, weight_decay, adam_beta1, adam_beta2 and adam_epsilon from "
                "TrainingArguments and the rest from zo_options", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------
    # The optimizer.

    def _optimizer_kwargs(self, probe: bool = False) -> Dict[str, Any]:
        args = self.args
        kw: Dict[str, Any] = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "adam_eps": args.adam_epsilon,
            # Not torch's generator: drawing from it would shift dropout and data order.
            "seed": args.seed,
        }
        kw.update({k: v for k, v in self.zo_options.items() if k not in _TRAINER_OPTIONS})
        if not probe and self._data_parallel():
            kw["process_group"] = dist.group.WORLD
        return kw

    def _data_parallel(self) -> bool:
        return (self.accelerator.num_processes > 1 and dist.is_available()
                and dist.is_initialized())

    def get_optimizer_cls_and_kwargs(self, args: Any, model: Any = None  # type: ignore[override]
                                     ) -> Tuple[type, Dict[str, Any]]:
        """hyzo's optimizer class and its arguments, whatever ``args.optim`` says: the
        Trainer's ``create_optimizer`` (and a subclass's that calls it) builds it over the
        param groups it chose."""
        return self._optimizer_class, self._optimizer_kwargs()

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """hyzo's optimizer, built by the Trainer's ``create_optimizer`` over its param groups
        (the trainable parameters; weight decay on all but biases and norms), through any
        ``create_optimizer`` of a subclass or base that chooses the parameters first."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            # transformers < 4.46 (and subclasses written for it) take no model argument.
            if model is None:
                super().create_optimizer()
            else:
                super().create_optimizer(model)  # type: ignore[call-arg]
            opt = self.optimizer
            self._refuse_foreign(opt)
            if opt.param_groups[0]["directions"] == "lowrank":
                # Before any step, and before a checkpoint's state is loaded into it.
                opt.attach(opt_model, exclude=self.zo_options.get("lowrank_exclude", ()))
            opt._late_step = self._take_late_step
            self._hyzo_optimizer = opt
        return self.optimizer  # type: ignore[return-value]

    def _refuse_foreign(self, opt: Any) -> None:
        if not isinstance(opt, self._optimizer_class):
            raise TypeError(
                f"{type(self).__name__}: create_optimizer set a {type(opt).__name__}, not "
                "hyzo's optimizer; a create_optimizer override should choose the parameters "
                "(requires_grad) and call super().create_optimizer(), which builds hyzo's "
                "over them")

    # ------------------------------------------------------------------------------------
    # A step.

    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Holds the micro-batch; at the last one of the accumulation window, takes one hyzo
        step on all of them and returns its loss (detached; zero for the others, so that the
        Trainer's sum over the window is the step's loss)."""
        if self._hyzo_optimizer is None:
            if self.optimizer is None:
                raise RuntimeError(f"{type(self).__name__}: training_step before "
                                   "create_optimizer")
            # A create_optimizer override that did not call super().create_optimizer().
            self._refuse_foreign(getattr(self.optimizer, "optimizer", self.optimizer))
        self._window.append(self._prepare_inputs(inputs))
        self._window_model, self._window_num_items = model, num_items_in_batch
        # The Trainer (accelerate before transformers 4.46) sets sync_gradients at the last
        # micro-batch of a window, also for a shorter window at the end of an epoch.
        if (len(self._window) < self.args.gradient_accumulation_steps
                and not self.accelerator.sync_gradients):
            return torch.zeros((), device=self.args.device)
        return self._take_step()

    def _take_late_step(self) -> None:
        if self._window:
            self._take_step()

    def _take_step(self) -> torch.Tensor:
        micro, self._window = self._window, []
        model, num_items = self._window_model, self._window_num_items
        self._window_model = self._window_num_items = None
        opt = self._hyzo_optimizer
        phase = self._phase_of_next_step(opt)
        self._last_phase = phase
        plan = self._points_of_step(opt, phase)
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            j, calls = calls, calls + 1
            backward = torch.is_grad_enabled()  # hyzo runs zeroth-order passes under no_grad
            perturbed = plan[j] if j < len(plan) else not backward
            model.train(backward)
            total: Optional[torch.Tensor] = None
            for i, inputs in enumerate(micro):
                self.hyzo_forward = HyzoForward(phase, j, len(plan), i, len(micro),
                                                perturbed, backward)
                try:
                    with self.compute_loss_context_manager():
                        loss = self._compute_loss(model, inputs, num_items)
                finally:
                    self.hyzo_forward = None
                if self.args.n_gpu > 1:
                    loss = loss.mean()  # DataParallel: one loss per device
                part = self._accumulated(loss, num_items, len(micro))
                if backward:
                    self._backward(model, loss, part, last=i == len(micro) - 1)
                    part = part.detach()
                total = part if total is None else total + part
            assert total is not None
            return self._clip(model, total) if backward else total

        self._logs_in_step = []
        try:
            loss = opt.step(closure)
        finally:
            model.train()
            logs, self._logs_in_step = self._logs_in_step, None
        if logs:
            self.log(_merge_logs(logs))
        return loss.detach().to(self.args.device)

    def _compute_loss(self, model: torch.nn.Module, inputs: Dict[str, Any],
                      num_items: Any) -> torch.Tensor:
        """``compute_loss`` as transformers calls it: ``num_items_in_batch`` only where the
        override takes it (open-unlearning's, TOFU's and MUSE's take three arguments)."""
        if self._passes_num_items:
            return self.compute_loss(model, inputs, num_items_in_batch=num_items)
        return self.compute_loss(model, inputs)

    def _accumulated(self, loss: torch.Tensor, num_items: Any, n: int) -> torch.Tensor:
        """A micro-batch's share of the step's loss, as the Trainer's ``training_step``
        scales it: divided by the micro-batches of the window, unless ``compute_loss``
        already normalized it by ``num_items_in_batch`` (the window's item count)."""
        if n == 1:
            return loss
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self._passes_num_items and num_items is not None
                      and (getattr(self, "model_accepts_loss_kwargs", False)
                           or getattr(self, "compute_loss_func", None) is not None))
        return loss if scaled else loss / n

    def _backward(self, model: torch.nn.Module, loss: torch.Tensor, part: torch.Tensor,
                  last: bool) -> None:
        """Backward of one micro-batch through accelerate; DDP averages the gradients at the
        last micro-batch only. Before transformers 4.46 accelerate itself divides by the
        accumulation steps (the Trainer gave it them), so it gets the unscaled loss."""
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
        with sync:
            self.accelerator.backward(
                loss if self.accelerator.gradient_accumulation_steps > 1 else part)

    def _points_of_step(self, opt: Any, phase: str) -> List[bool]:
        """For each closure call of the next step, whether it evaluates a perturbed point."""
        if phase == "fo":
            return [False]
        g = opt.param_groups[0]
        q = int(g["num_directions"])
        points = [False] if float(g.get("hybrid_alpha") or 0.0) > 0 else []
        if g["estimator"] == "one_sided":
            return points + [False] + [True] * q
        return points + [True] * (2 * q)

    def _phase_of_next_step(self, opt: Any) -> str:
        return "zo"

    def _clip(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """Clips the accumulated gradients to ``max_grad_norm``, which must come between the
        backward passes and the update hyzo applies once the closure returns. hyzo then calls
        ``backward()`` on what this returns: a detached copy of the loss, which adds nothing."""
        max_norm = self.args.max_grad_norm
        # Without clipping the norm is still measured (for the log; every transformers logs
        # it from 4.46 on): a bound of inf scales the gradients by exactly 1.
        clip_to = max_norm if max_norm is not None and max_norm > 0 else float("inf")
        self._last_grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), clip_to))
        return loss.detach().requires_grad_()

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._logs_in_step is not None:  # a compute_loss logging during a step
            self._logs_in_step.append(dict(logs))
            return
        # The Trainer measures grad_norm after optimizer.step(): after a zeroth-order step no
        # parameter has a gradient (its 0 would read as a vanishing gradient), after a
        # first-order one the gradient is already clipped. Report the norm before clipping.
        if "loss" in logs or "grad_norm" in logs:  # a log of training steps
            if self._last_phase == "zo":
                logs.pop("grad_norm", None)
            elif self._last_grad_norm is not None:
                logs["grad_norm"] = self._last_grad_norm
        super().log(logs, *args, **kwargs)


class ZOTrainer(_HyzoTrainer):
    """``transformers.Trainer`` whose steps are zeroth-order steps of :class:`hyzo.torch.ZO`.

    ``ZOTrainer(model, args, ..., zo_options={...})``: everything ``Trainer`` takes, plus
    ``zo_options``, keyword arguments of :class:`hyzo.torch.ZO` (``num_directions``, ``eps``,
    ``rule`` (default ``"sgd"``), ``seed`` (default ``args.seed``), ``directions``,
    ``rank``, ``estimator``, ``precision``, ``num_threads``; and ``lowrank_exclude``, the
    weights :meth:`hyzo.torch.ZO.attach` leaves Gaussian). See the module documentation.
    """

    _optimizer_class = _TrainerZO
    _public_optimizer = _hyzo_torch.ZO


class HybridTrainer(_HyzoTrainer):
    """``transformers.Trainer`` whose steps follow the schedule of :class:`hyzo.torch.Hybrid`:
    blocks of ``fo_steps`` first-order steps (forward, backward, clipping, update) and
    ``zo_steps`` zeroth-order steps (forwards only).

    ``HybridTrainer(model, args, ..., zo_options={...})``: everything ``Trainer`` takes,
    plus ``zo_options``, keyword arguments of :class:`hyzo.torch.Hybrid` (``fo_steps``,
    ``zo_steps``, ``rule``, ``num_directions``, ``eps``, ``seed``, ``directions``,
    ``estimator``, ``precision``, ``hybrid_alpha``, and whatever else it accepts). See the
    module documentation.
    """

    _optimizer_class = _TrainerHybrid
    _public_optimizer = _hyzo_torch.Hybrid

    def _check_probe(self, probe: Any) -> None:
        if probe.next_phase() == "any":
            raise ValueError(f"{type(self).__name__}: zo_options fo_steps = zo_steps = 0 (no "
                             "schedule) is not supported: the trainer follows the hybrid "
                             "schedule; set both > 0")

    def _phase_of_next_step(self, opt: Any) -> str:
        return opt.next_phase()
