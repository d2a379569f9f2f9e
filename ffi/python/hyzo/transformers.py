"""Hugging Face ``transformers.Trainer`` with hyzo's optimizers: :class:`ZOTrainer` and
:class:`HybridTrainer` (``pip install hyzo[transformers]``).

Swap ``Trainer`` for one of them and pass ``zo_options``; everything else is the Trainer's::

    trainer = HybridTrainer(model=model, args=args, train_dataset=ds,
                            zo_options={"fo_steps": 10, "zo_steps": 10, "num_directions": 4})
    trainer.train()

- The optimizer is :class:`hyzo.torch.ZO` or :class:`hyzo.torch.Hybrid` over the trainable
  parameters (``requires_grad``, so PEFT/LoRA adapters alone), in the Trainer's two groups
  (weight decay on all but biases and norms). ``zo_options`` are passed to it as keyword
  arguments (``num_directions``, ``eps``, ``rule``, ``seed``, ``directions``, ``estimator``,
  ``precision``; for the hybrid ``fo_steps``, ``zo_steps``, ...); learning rate, weight
  decay, Adam's betas and epsilon, ``max_steps``, the scheduler and warm-up, logging, saving
  and ``resume_from_checkpoint`` come from ``TrainingArguments``. The seed of the directions
  defaults to ``args.seed``.
- Every forward pass computes its loss with ``self.compute_loss(model, inputs)``, so a
  subclass that overrides ``compute_loss`` (an unlearning objective) works unchanged.
- Zeroth-order steps run ``2q`` (two-sided) or ``q + 1`` (one-sided) forward passes under
  ``torch.no_grad()`` (no backward, no activations kept), with the model in eval mode:
  as in MeZO, a difference of two losses under different dropout masks would measure the
  masks, not the direction. First-order steps of the hybrid run one forward in train mode
  and a backward (through ``accelerate``), then clip to ``max_grad_norm``, then update.
- One optimizer step per Trainer step: ``max_steps`` counts hyzo steps (first- and
  zeroth-order). The checkpoint's ``optimizer.pt`` holds hyzo's state, and a resumed run
  continues bit-identically on the CPU.
- Data parallel (``torchrun``/``accelerate launch``): the loss of every zeroth-order forward
  is all-reduced (mean; one scalar) and first-order gradients are averaged by DDP, so every
  rank applies the same update.
- Low-rank directions (``zo_options={"directions": "lowrank", "rank": 4}``): the optimizer is
  attached to the model (:meth:`hyzo.torch.ZO.attach`) when the trainer creates it, so the
  weights of its ``nn.Linear``/``nn.Embedding`` modules are perturbed inside the forward;
  ``zo_options["lowrank_exclude"]`` (names or tensors) keeps some of them Gaussian (a
  weight the model's code reads directly, e.g. ``x @ self.embed.weight.T``).

Not supported, refused at construction with a message: ``gradient_accumulation_steps > 1``
(a zeroth-order step evaluates every perturbed point on one batch; raise
``per_device_train_batch_size`` instead: zeroth-order steps keep no activations),
``fp16=True`` (its gradient scaler has nothing to scale in a zeroth-order step; use
``bf16=True``, or a float16 model without ``fp16``), DeepSpeed and FSDP (they own the
optimizer and shard the parameters), and an optimizer passed in ``optimizers`` or
``optimizer_cls_and_kwargs`` (``args.optim`` is ignored).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import transformers

from . import torch as _hyzo_torch

__all__ = ["ZOTrainer", "HybridTrainer"]

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


class _StepsInTrainingStep:
    """Mixin over a hyzo optimizer, for the trainers.

    hyzo's ``step`` needs a closure (the loss at each perturbed point), so the trainers take
    the step inside ``training_step``; the Trainer's loop then calls ``optimizer.step()``
    without a closure, which only checks that ``training_step`` took one.
    """

    _took_step = False

    def step(self, closure=None, **kwargs):  # type: ignore[no-untyped-def]
        if closure is None:
            if not self._took_step:
                raise RuntimeError(
                    "hyzo.transformers: optimizer.step() without a closure, and no step was "
                    "taken by training_step (the trainers step inside training_step)")
            self._took_step = False
            return None
        loss = super().step(closure, **kwargs)  # type: ignore[misc]
        self._took_step = True
        return loss


class _TrainerZO(_StepsInTrainingStep, _hyzo_torch.ZO):
    pass


class _TrainerHybrid(_StepsInTrainingStep, _hyzo_torch.Hybrid):
    pass


class _HyzoTrainer(transformers.Trainer):
    """What :class:`ZOTrainer` and :class:`HybridTrainer` share (not public)."""

    _optimizer_class: type = _TrainerZO
    _public_optimizer: type = _hyzo_torch.ZO

    def __init__(self, *args: Any, zo_options: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        if zo_options is not None and not isinstance(zo_options, dict):
            raise TypeError(f"zo_options: expected a dict, got {type(zo_options).__name__}")
        self.zo_options: Dict[str, Any] = dict(zo_options or {})
        self._hyzo_optimizer: Optional[torch.optim.Optimizer] = None
        self._last_phase = "zo"
        self._last_grad_norm: Optional[float] = None
        super().__init__(*args, **kwargs)
        self._check_supported()
        self._check_zo_options()

    # ------------------------------------------------------------------------------------
    # Construction checks: fail before any data is loaded.

    def _check_supported(self) -> None:
        name = type(self).__name__
        args = self.args
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"{name}: gradient_accumulation_steps={args.gradient_accumulation_steps} is not "
                "supported (a zeroth-order step evaluates every perturbed point on one batch); "
                "raise per_device_train_batch_size instead: zeroth-order steps keep no activations")
        if args.fp16:
            raise ValueError(
                f"{name}: fp16=True is not supported (its gradient scaler has nothing to scale "
                "in a zeroth-order step); use bf16=True, or load the model in float16 without "
                "fp16=True (hyzo updates float16 parameters in place)")
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

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """hyzo's optimizer over the trainable parameters, in the Trainer's two groups (weight
        decay on all but biases and norms)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            no_decay = {"weight_decay": 0.0}
            if "zo_weight_decay" in inspect.signature(self._public_optimizer).parameters:
                no_decay["zo_weight_decay"] = 0.0  # biases and norms: no decay in any step
            groups = [
                {"params": [p for n, p in named if n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], **no_decay},
            ]
            groups = [g for g in groups if g["params"]]
            if not groups:
                raise ValueError(f"{type(self).__name__}: the model has no trainable "
                                 "parameters (requires_grad)")
            opt = self._optimizer_class(groups, **self._optimizer_kwargs())
            if opt.param_groups[0]["directions"] == "lowrank":
                # Before any step, and before a checkpoint's state is loaded into it.
                opt.attach(opt_model, exclude=self.zo_options.get("lowrank_exclude", ()))
            self.optimizer = opt
            self._hyzo_optimizer = self.optimizer
        return self.optimizer

    # ------------------------------------------------------------------------------------
    # A step.

    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """One hyzo step on this batch; returns its loss (detached)."""
        opt = self._hyzo_optimizer
        if opt is None:
            raise RuntimeError(f"{type(self).__name__}: training_step before create_optimizer")
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            first_order = torch.is_grad_enabled()  # hyzo runs zeroth-order passes under no_grad
            model.train(first_order)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()  # DataParallel: one loss per device
            if not first_order:
                return loss
            return self._backward_and_clip(model, loss)

        self._last_phase = self._phase_of_next_step(opt)
        try:
            loss = opt.step(closure)
        finally:
            model.train()
        return loss.detach().to(self.args.device)

    def _phase_of_next_step(self, opt: Any) -> str:
        return "zo"

    def _backward_and_clip(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """A first-order pass: backward through accelerate (DDP averages the gradients), then
        clipping to ``max_grad_norm``, which must come between the backward and the update
        hyzo applies once the closure returns. hyzo then calls ``backward()`` on what this
        returns: a detached copy of the loss, so that call adds nothing."""
        self.accelerator.backward(loss)
        self._last_grad_norm = None
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
            self._last_grad_norm = float(norm)
        return loss.detach().requires_grad_()

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        # The Trainer measures grad_norm after optimizer.step(): after a zeroth-order step no
        # parameter has a gradient (its 0 would read as a vanishing gradient), after a
        # first-order one the gradient is already clipped. Report the norm before clipping.
        if "grad_norm" in logs:
            if self._last_phase == "zo":
                del logs["grad_norm"]
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
