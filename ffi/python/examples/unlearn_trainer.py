"""Unlearning Trainers as open-unlearning, TOFU and MUSE write them, run with hyzo's
optimizers by a class that puts ``HybridTrainer`` (or ``ZOTrainer``) in front of them.

The trainers below are written the way those frameworks write theirs (this file's own
code): a ``transformers.Trainer`` subclass whose objective is a 3-argument
``compute_loss(self, model, inputs, return_outputs=False)``, on batches that pair a
``"forget"`` and a ``"retain"`` example (so ``remove_unused_columns=False``), with method
arguments (``gamma``, ``alpha``, ``beta``) taken by ``__init__``. They are registered in a
registry as open-unlearning registers its trainers, and the hybrid ones beside them::

    class HybridGradDiff(HybridTrainer, GradDiff): pass
    register(HybridGradDiff)

so a config selects one by name and passes ``zo_options`` with the method's arguments.
``PrimalDual`` is a GradDiff whose retain weight is a dual variable (PDU-style): it keeps
state across steps, so it reads ``self.hyzo_forward`` to update it once per step.

Here the model is a tiny Llama with random weights, first fine-tuned with a plain Trainer
(AdamW) until it has learned the forget and retain sequences, which is where unlearning
starts; a real run loads its model with ``AutoModelForCausalLM.from_pretrained``.

    python ffi/python/examples/unlearn_trainer.py            # ~2 min on 2 cores
    python ffi/python/examples/unlearn_trainer.py --lora     # LoRA adapters only (peft)
    python ffi/python/examples/unlearn_trainer.py --quick    # a smoke run (the test's)

Prints the forget and retain losses before and after unlearning with each method and
writes them to OUT/result.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hyzo.transformers import HybridTrainer, ZOTrainer

VOCAB, SEQ = 128, 16


# ----------------------------------------------------------------------------------------
# The framework's side: trainers, a registry, a collator for paired batches.


def sequence_nll(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence negative log-likelihood of the labels (-100: not counted)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels.clamp(min=0),
                          reduction="none")
    return (nll * (labels != -100)).sum(dim=1)


class GradDiff(Trainer):
    """Gradient difference: ``-gamma · L(forget) + alpha · L(retain)``."""

    def __init__(self, *args: Any, gamma: float = 1.0, alpha: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gamma, self.alpha = gamma, alpha

    def retain_loss(self, model, retain):
        return model(**retain).loss

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = model(**inputs["forget"])
        loss = -self.gamma * forget.loss + self.alpha * self.retain_loss(model, inputs["retain"])
        return (loss, forget) if return_outputs else loss


class NPO(GradDiff):
    """Negative preference optimization against the frozen starting model, plus the retain
    loss: ``-(2/β) · mean log σ(-β (log p_θ - log p_ref)(forget)) + α · L(retain)``."""

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = inputs["forget"]
        with torch.no_grad():
            ref_nll = sequence_nll(self.ref_model, forget)
        log_ratio = ref_nll - sequence_nll(model, forget)  # log p_θ - log p_ref
        npo = -2.0 / self.beta * F.logsigmoid(-self.beta * log_ratio).mean()
        loss = self.gamma * npo + self.alpha * self.retain_loss(model, inputs["retain"])
        return (loss, None) if return_outputs else loss


class PrimalDual(GradDiff):
    """GradDiff whose retain weight ``alpha`` is a dual variable for ``L(retain) <= eps``:
    after each step, ``alpha += dual_lr · (L(retain) - eps)`` (at least 0), with ``L(retain)``
    the mean over the step's forwards. Under hyzo a step runs several forwards (2q points of
    a zeroth-order step, times the micro-batches): the update waits for the last one, so every
    point sees the same objective. In a plain Trainer (``hyzo_forward`` None) it updates on
    every call, as PDU does."""

    def __init__(self, *args: Any, retain_eps: float = 0.5, dual_lr: float = 0.5,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retain_eps, self.dual_lr = retain_eps, dual_lr
        self.dual_updates = 0
        self._retain_seen: List[float] = []

    def retain_loss(self, model, retain):
        loss = super().retain_loss(model, retain)
        self._retain_seen.append(float(loss.detach()))
        forward = getattr(self, "hyzo_forward", None)
        if forward is None or forward.last:
            mean = sum(self._retain_seen) / len(self._retain_seen)
            self.log({"retain_loss": mean, "retain_weight": self.alpha})
            self.alpha = max(0.0, self.alpha + self.dual_lr * (mean - self.retain_eps))
            self.dual_updates += 1
            self._retain_seen.clear()
        return loss


TRAINER_REGISTRY: Dict[str, type] = {}


def register(trainer_class: type) -> type:
    TRAINER_REGISTRY[trainer_class.__name__] = trainer_class
    return trainer_class


for _method in (GradDiff, NPO, PrimalDual):
    register(_method)
    # hyzo's, registered beside theirs: the same objective, hyzo's steps.
    register(type(f"Hybrid{_method.__name__}", (HybridTrainer, _method), {}))
    register(type(f"ZO{_method.__name__}", (ZOTrainer, _method), {}))


def collate_pairs(features: List[Dict[str, Dict[str, torch.Tensor]]]) -> Dict[str, Any]:
    """Stacks ``{"forget": {...}, "retain": {...}}`` examples into paired batches."""
    return {part: {k: torch.stack([f[part][k] for f in features]) for k in features[0][part]}
            for part in features[0]}


def load_trainer(handler: str, method_args: Dict[str, Any], **kwargs: Any) -> Trainer:
    """A trainer by its registered name; ``method_args`` (``zo_options`` among them for
    hyzo's) go to its constructor, as open-unlearning's config does."""
    return TRAINER_REGISTRY[handler](**kwargs, **method_args)


# ----------------------------------------------------------------------------------------
# A run: learn both sets, then unlearn the forget set with each method.


def sequences(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def example(x: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


def mean_loss(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=data, labels=data).loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--lora", action="store_true", help="unlearn through LoRA adapters (peft)")
    ap.add_argument("--methods", default="HybridGradDiff,HybridNPO,HybridPrimalDual",
                    help="registered trainers to run, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("out/unlearn_trainer"))
    opts = ap.parse_args()
    torch.manual_seed(0)
    forget, retain = sequences(8, seed=1), sequences(32, seed=2)

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))
    common = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                  seed=0, logging_steps=1)

    # 1. The starting point: a model that knows both sets (plain Trainer, AdamW).
    learn = [{"input_ids": x, "labels": x} for x in torch.cat([forget, retain])]
    Trainer(model=model, train_dataset=learn, args=TrainingArguments(
        output_dir=str(opts.out / "learn"), per_device_train_batch_size=8,
        max_steps=60 if opts.quick else 300, learning_rate=5e-3 if opts.quick else 3e-3,
        **common)).train()
    start = model.state_dict()
    before = {"forget_loss": mean_loss(model, forget), "retain_loss": mean_loss(model, retain)}

    # 2. Unlearning: each batch pairs a forget example with a retain example; batch 2 ×
    # gradient accumulation 4 (open-unlearning's default accumulation).
    pairs = [{"forget": example(forget[i % len(forget)]), "retain": example(retain[i])}
             for i in range(len(retain))]
    results: Dict[str, Any] = {}
    for handler in opts.methods.split(","):
        model.load_state_dict(start)
        unlearn_model: Any = model
        if opts.lora:
            import peft

            unlearn_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        began = time.perf_counter()
        trainer = load_trainer(
            handler, model=unlearn_model, train_dataset=pairs, data_collator=collate_pairs,
            args=TrainingArguments(
                output_dir=str(opts.out / handler), per_device_train_batch_size=2,
                gradient_accumulation_steps=4, max_steps=10 if opts.quick else 40,
                learning_rate=3e-3 if opts.lora else 1e-3, lr_scheduler_type="constant",
                remove_unused_columns=False, **common),
            method_args={
                "gamma": 1.0, "alpha": 1.0,
                # The paper's hybrid (AdamW first-order, AdaZO zeroth-order, separate
                # states); zeroth-order steps at a tenth of the rate keep the retain set.
                "zo_options": {"fo_steps": 5, "zo_steps": 5, "num_directions": 4,
                               "zo_lr": 1e-4},
            })
        trainer.train()
        after = {"forget_loss": mean_loss(unlearn_model, forget),
                 "retain_loss": mean_loss(unlearn_model, retain)}
        results[handler] = {
            "before": before, "after": after, "steps": trainer.state.global_step,
            "seconds": time.perf_counter() - began,
            "logged_retain_weight": [h["retain_weight"] for h in trainer.state.log_history
                                     if "retain_weight" in h],
            "dual_updates": getattr(trainer, "dual_updates", None),
            "retain_weight": trainer.alpha,
        }

    print(f"{'':18}{'forget loss':>12}{'retain loss':>12}{'steps':>7}")
    print(f"{'before':18}{before['forget_loss']:12.3f}{before['retain_loss']:12.3f}")
    for handler, r in results.items():
        print(f"{handler:18}{r['after']['forget_loss']:12.3f}{r['after']['retain_loss']:12.3f}"
              f"{r['steps']:7d}")
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "result.json").write_text(json.dumps(
        {"methods": results, "lora": opts.lora}, indent=2))


if __name__ == "__main__":
    main()
