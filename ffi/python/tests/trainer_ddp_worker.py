"""One rank of test_transformers.py's data-parallel test, launched by
``python -m torch.distributed.run --nproc_per_node 2 trainer_ddp_worker.py OUT_DIR``.

Trains a tiny Llama with HybridTrainer (first- and zeroth-order steps) on 2 CPU processes
(gloo); each rank writes its initial and final parameters (OUT_DIR/rank{r}.pt) and the loss
and phase of every step (OUT_DIR/rank{r}.json) for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hyzo.transformers import HybridTrainer


class RecordingHybridTrainer(HybridTrainer):
    def __init__(self, *args, **kwargs):
        self.steps = []
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        phase = self.optimizer.optimizer.next_phase()  # the hyzo optimizer inside accelerate's
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.steps.append((phase, float(loss)))
        return loss


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": x, "labels": x.clone()}
            for x in torch.randint(0, 64, (32, 12), generator=g)]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=2, max_steps=6,
        learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
    trainer = RecordingHybridTrainer(
        model=model, args=args, train_dataset=data,
        zo_options={"fo_steps": 1, "zo_steps": 2, "num_directions": 2, "rule": "adamw",
                    "num_threads": 1})
    trainer.train()
    rank = dist.get_rank()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"initial": initial, "final": final}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": dist.get_world_size(),
        "phases": [p for p, _ in trainer.steps],
        "losses": [loss for _, loss in trainer.steps],
    }))
    # accelerate made the process group; transformers 4.45's Trainer leaves it alive, and a
    # gloo group torn down by interpreter exit can abort the process ("terminate called
    # without an active exception", seen on the 2-core CI machine) after a run that passed.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
