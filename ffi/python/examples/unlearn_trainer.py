"""GradDiff unlearning with ``hyzo.transformers.HybridTrainer``, as a user would start.

Unlearning code (TOFU, MUSE, WMDP, open-unlearning) puts the objective in a
``transformers.Trainer`` subclass that overrides ``compute_loss``; ``GradDiff`` below is one:
a batch pairs forget and retain examples, and the loss is ``-L(forget) + w * L(retain)``.
Running it with hyzo's hybrid optimizer changes no line of it: a class puts
``HybridTrainer`` in front of it (``HybridGradDiff``), and ``zo_options`` sets the schedule.

Here the model is a tiny Llama with random weights, first fine-tuned with a plain Trainer
(AdamW) until it has learned the forget and retain sequences, which is where unlearning
starts; a real run loads its model with ``AutoModelForCausalLM.from_pretrained``.

    python ffi/python/examples/unlearn_trainer.py            # ~1 min on 2 cores
    python ffi/python/examples/unlearn_trainer.py --lora     # LoRA adapters only (peft)
    python ffi/python/examples/unlearn_trainer.py --quick    # a smoke run (the test's)

Prints the forget and retain losses before and after unlearning and writes them to
OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hyzo.transformers import HybridTrainer

VOCAB, SEQ = 128, 16


class GradDiff(Trainer):
    """Gradient difference: ascend on the forget batch, descend on the retain batch."""

    def __init__(self, *args: Any, retain_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retain_weight = retain_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = model(input_ids=inputs["forget_input_ids"], labels=inputs["forget_input_ids"])
        retain = model(input_ids=inputs["retain_input_ids"], labels=inputs["retain_input_ids"])
        loss = -forget.loss + self.retain_weight * retain.loss
        return (loss, forget) if return_outputs else loss


class HybridGradDiff(HybridTrainer, GradDiff):
    """GradDiff's objective, hyzo's hybrid steps (first-order blocks, zeroth-order blocks)."""


def sequences(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def mean_loss(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=data, labels=data).loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--lora", action="store_true", help="unlearn through LoRA adapters (peft)")
    ap.add_argument("--out", type=Path, default=Path("out/unlearn_trainer"))
    opts = ap.parse_args()
    torch.manual_seed(0)
    forget, retain = sequences(8, seed=1), sequences(32, seed=2)

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))
    common = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                  seed=0, logging_steps=10_000)

    # 1. The starting point: a model that knows both sets (plain Trainer, AdamW).
    learn = [{"input_ids": x, "labels": x} for x in torch.cat([forget, retain])]
    Trainer(model=model, train_dataset=learn, args=TrainingArguments(
        output_dir=str(opts.out / "learn"), per_device_train_batch_size=8,
        max_steps=60 if opts.quick else 300, learning_rate=5e-3 if opts.quick else 3e-3,
        **common)).train()
    before = {"forget_loss": mean_loss(model, forget), "retain_loss": mean_loss(model, retain)}

    if opts.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))

    # 2. Unlearning: GradDiff batches pair a forget example with a retain example.
    pairs = [{"forget_input_ids": forget[i % len(forget)], "retain_input_ids": retain[i]}
             for i in range(len(retain))]
    start = time.perf_counter()
    trainer = HybridGradDiff(
        model=model, train_dataset=pairs, retain_weight=1.0,
        args=TrainingArguments(
            output_dir=str(opts.out / "unlearn"), per_device_train_batch_size=8,
            max_steps=10 if opts.quick else 40, learning_rate=3e-3 if opts.lora else 1e-3,
            lr_scheduler_type="constant", remove_unused_columns=False, **common),
        # The paper's hybrid (AdamW first-order, AdaZO zeroth-order, separate states);
        # zeroth-order steps at a tenth of the rate keep the retain set.
        zo_options={"fo_steps": 5, "zo_steps": 5, "num_directions": 4, "zo_lr": 1e-4})
    trainer.train()
    seconds = time.perf_counter() - start
    after = {"forget_loss": mean_loss(model, forget), "retain_loss": mean_loss(model, retain)}

    rows: List[Dict[str, Any]] = [{"": "before", **before}, {"": "after", **after}]
    print(f"GradDiff with HybridTrainer ({trainer.state.global_step} steps, {seconds:.1f} s)")
    print(f"{'':8}{'forget loss':>12}{'retain loss':>12}")
    for r in rows:
        print(f"{r['']:8}{r['forget_loss']:12.3f}{r['retain_loss']:12.3f}")
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "result.json").write_text(json.dumps(
        {"before": before, "after": after, "steps": trainer.state.global_step,
         "seconds": seconds, "lora": opts.lora}, indent=2))


if __name__ == "__main__":
    main()
