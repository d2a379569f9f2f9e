"""hyzo.transformers: ZOTrainer and HybridTrainer on tiny Llama models built from configs
(random weights, nothing downloaded), on the CPU."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hyzo.torch as ht  # noqa: E402
import transformers.trainer_pt_utils  # noqa: E402
from hyzo.transformers import HybridTrainer, ZOTrainer  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from conftest import bits  # noqa: E402

HERE = Path(__file__).resolve().parent
VOCAB, SEQ = 64, 12


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def token_dataset(n: int = 16, seed: int = 1) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x.clone()}
            for x in torch.randint(0, VOCAB, (n, SEQ), generator=g)]


def training_args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    base: Dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def lm_loss(model: torch.nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any) -> Any:
    """The loss both the trainers (through compute_loss) and the hand-written loops use
    (transformers < 4.46 counts no items, and its models take no num_items_in_batch)."""
    if num_items_in_batch is None:
        return model(**inputs).loss
    return model(**inputs, num_items_in_batch=num_items_in_batch).loss


def recording(base: type) -> type:
    """``base`` with a compute_loss override that records every forward pass."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.calls: List[Dict[str, Any]] = []
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = lm_loss(model, inputs, num_items_in_batch)
            self.calls.append({
                "inputs": {k: v.clone() for k, v in inputs.items()},
                "num_items": num_items_in_batch,
                "grad_enabled": torch.is_grad_enabled(),
                "requires_grad": loss.requires_grad,
                "training": model.training,
                "lr": self.optimizer.param_groups[0]["lr"],
            })
            return loss

    return Recording


def grouped_like_trainer(trainer: Any, model: torch.nn.Module) -> List[Dict[str, Any]]:
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay],
               "weight_decay": trainer.args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def replay(opt: Any, model: torch.nn.Module, calls: List[Dict[str, Any]], steps: int,
           evaluations: int) -> None:
    """Drives ``opt`` by hand on the batches and learning rates the trainer used:
    ``evaluations`` forward passes per zeroth-order step, one per first-order step."""
    i = 0
    for _ in range(steps):
        call = calls[i]
        for g in opt.param_groups:
            g["lr"] = call["lr"]
        phase = opt.next_phase() if isinstance(opt, ht.Hybrid) else "zo"
        i += evaluations if phase == "zo" else 1

        def closure(call=call):
            model.train(torch.is_grad_enabled())
            return lm_loss(model, call["inputs"], call["num_items"])

        opt.step(closure)
    assert i == len(calls)


def allow_trainer_rng_state(monkeypatch: Any) -> None:
    """transformers without ``trainer_pt_utils.safe_globals`` (4.45 among them) loads its
    checkpoint's RNG state (numpy arrays) with torch.load's default, which torch 2.6 made
    weights_only=True: the Trainer itself cannot resume there unless the environment lifts
    that default for the calls that do not set it."""
    if not hasattr(transformers.trainer_pt_utils, "safe_globals"):
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (bits(p) == bits(q)).all(), name


def assert_changed(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert any((bits(p) != bits(q)).any() for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------------
# The step: what runs, and that it is hyzo.torch's step.


def test_zo_trainer_steps_as_hyzo_torch_zo_without_backward(tmp_path):
    zo_options = {"rule": "adazo", "num_directions": 2, "eps": 1e-3}
    model = tiny_llama()
    trainer = recording(ZOTrainer)(model=model, args=training_args(tmp_path, weight_decay=0.1),
                                   train_dataset=token_dataset(), zo_options=zo_options)
    trainer.train()

    # 2q forwards per step, under no_grad, in eval mode; no gradient anywhere.
    assert len(trainer.calls) == 4 * 4
    assert not any(c["grad_enabled"] or c["requires_grad"] or c["training"]
                   for c in trainer.calls)
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # back in train mode after the step

    by_hand = tiny_llama()
    opt = ht.ZO(grouped_like_trainer(trainer, by_hand), lr=1e-3, seed=0, **zo_options)
    replay(opt, by_hand, trainer.calls, steps=4, evaluations=4)
    assert_same_parameters(model, by_hand)
    assert_changed(model, tiny_llama())


def test_hybrid_trainer_follows_the_schedule(tmp_path):
    zo_options = {"fo_steps": 2, "zo_steps": 2, "num_directions": 2}  # Hybrid's rules
    model = tiny_llama()
    trainer = recording(HybridTrainer)(model=model, args=training_args(tmp_path, max_steps=6),
                                       train_dataset=token_dataset(), zo_options=zo_options)
    trainer.train()

    # FO, FO, ZO (4 forwards), ZO (4 forwards), FO, FO: first-order passes with grad in train
    # mode, zeroth-order ones without, in eval mode.
    kinds = [(c["grad_enabled"], c["requires_grad"], c["training"]) for c in trainer.calls]
    fo, zo = (True, True, True), (False, False, False)
    assert kinds == [fo, fo] + [zo] * 8 + [fo, fo]
    # grad_norm is logged after first-order steps only: a zeroth-order step has no gradient.
    logged = ["grad_norm" in h for h in trainer.state.log_history if "loss" in h]
    assert logged == [True, True, False, False, True, True]

    by_hand = tiny_llama()
    opt = ht.Hybrid(grouped_like_trainer(trainer, by_hand), lr=1e-3, seed=0, **zo_options)
    replay(opt, by_hand, trainer.calls, steps=6, evaluations=4)
    assert_same_parameters(model, by_hand)


def test_hybrid_trainer_clips_first_order_gradients(tmp_path):
    # One first-order SGD step with lr 1: the parameters move by the gradient clipped to
    # max_grad_norm, so the step's norm is max_grad_norm when clipping applies.
    def step_norm(max_grad_norm: float) -> "tuple[float, float]":
        model = tiny_llama()
        trainer = HybridTrainer(
            model=model, train_dataset=token_dataset(),
            args=training_args(tmp_path, max_steps=1, learning_rate=1.0,
                               max_grad_norm=max_grad_norm),
            zo_options={"fo_steps": 1, "zo_steps": 1, "rule": "sgd"})
        trainer.train()
        sq = sum(float(((p.detach().double() - q.detach().double()) ** 2).sum())
                 for p, q in zip(model.parameters(), tiny_llama().parameters()))
        return sq ** 0.5, trainer.state.log_history[0]["grad_norm"]

    clipped, logged = step_norm(1e-3)
    unclipped, _ = step_norm(0.0)
    assert clipped == pytest.approx(1e-3, rel=1e-3)
    assert unclipped > 1e-1
    # The log reports the norm before clipping: the unclipped step's.
    assert logged == pytest.approx(unclipped, rel=1e-3)


def test_scheduler_and_warmup_set_the_learning_rate_of_each_step(tmp_path):
    lr, steps, warmup = 1e-2, 6, 2
    model = tiny_llama()
    trainer = recording(ZOTrainer)(
        model=model, train_dataset=token_dataset(),
        args=training_args(tmp_path, max_steps=steps, learning_rate=lr,
                           lr_scheduler_type="linear", warmup_steps=warmup),
        zo_options={"num_directions": 1, "rule": "sgd"})
    trainer.train()
    lrs = [c["lr"] for c in trainer.calls[::2]]
    expected = [lr * k / warmup if k < warmup else lr * (steps - k) / (steps - warmup)
                for k in range(steps)]
    assert lrs == pytest.approx(expected)
    # hyzo stepped with those rates: a hand-driven ZO given them ends bit-identical, one
    # left at the base rate does not.
    by_hand = tiny_llama()
    opt = ht.ZO(grouped_like_trainer(trainer, by_hand), lr=lr, seed=0, num_directions=1)
    replay(opt, by_hand, trainer.calls, steps=steps, evaluations=2)
    assert_same_parameters(model, by_hand)
    constant = tiny_llama()
    opt = ht.ZO(grouped_like_trainer(trainer, constant), lr=lr, seed=0, num_directions=1)
    replay(opt, constant, [dict(c, lr=lr) for c in trainer.calls], steps=steps,
           evaluations=2)
    assert_changed(model, constant)


def test_only_trainable_parameters_are_optimized_with_the_trainers_decay_groups(tmp_path):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    trainer = ZOTrainer(model=model, train_dataset=token_dataset(),
                        args=training_args(tmp_path, max_steps=2, weight_decay=0.05),
                        zo_options={"num_directions": 1})
    trainer.train()
    opt = trainer.optimizer
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.model.embed_tokens.weight) not in held
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert not any("norm" in names[id(p)] for p in decay["params"])
    fresh = tiny_llama()
    assert (bits(model.model.embed_tokens.weight) == bits(fresh.model.embed_tokens.weight)).all()
    assert_changed(model, fresh)


def test_lora_adapters_alone_are_trained(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ZOTrainer(model=model, train_dataset=token_dataset(),
                        args=training_args(tmp_path, max_steps=3, learning_rate=1e-2),
                        zo_options={"num_directions": 2, "rule": "adamw"})
    trainer.train()
    held = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert held == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    for n, p in model.named_parameters():
        same = bool((bits(p) == bits(before[n])).all())
        if "lora_" in n:
            assert not same, f"{n} did not change"
        else:
            assert same, f"{n} (frozen) changed"


# ----------------------------------------------------------------------------------------
# Checkpoints.


@pytest.mark.parametrize("directions, accumulation", [
    ({}, 1), ({"directions": "lowrank", "rank": 2}, 1), ({}, 4)],
    ids=["gaussian", "lowrank", "gaussian-accumulate4"])
@pytest.mark.parametrize("kind", ["zo", "hybrid"])
def test_resume_from_checkpoint_continues_bit_identically(tmp_path, monkeypatch, kind, directions,
                                                          accumulation):
    # Low-rank directions: the trainer attaches the hooks before the checkpoint is loaded,
    # whose fingerprint holds the shapes. Gradient accumulation: the Trainer skips the
    # micro-batches of the steps taken (4 per step); hyzo holds none across a checkpoint.
    allow_trainer_rng_state(monkeypatch)
    cls, zo_options = {
        "zo": (ZOTrainer, {"rule": "adazo", "num_directions": 2}),
        "hybrid": (HybridTrainer, {"fo_steps": 2, "zo_steps": 2, "rule": "adamw"}),
    }[kind]
    zo_options = {**zo_options, **directions}

    def run(out: Path, resume: Any = None) -> LlamaForCausalLM:
        model = tiny_llama()
        args = training_args(out, max_steps=6, save_steps=3, save_strategy="steps",
                             lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01,
                             per_device_train_batch_size=4 // accumulation,
                             gradient_accumulation_steps=accumulation)
        cls(model=model, args=args, train_dataset=token_dataset(),
            zo_options=zo_options).train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["hyzo"]["shards"], "optimizer.pt lacks hyzo's state"
    assert saved["param_groups"][0]["directions"] == directions.get("directions", "gaussian")
    assert saved["param_groups"][0]["rank"] == directions.get("rank", 1)
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    assert_same_parameters(whole, resumed)
    assert_changed(whole, tiny_llama())


# ----------------------------------------------------------------------------------------
# Options and what is refused.


def test_zo_options_are_checked_at_construction(tmp_path):
    def make(cls: type = ZOTrainer, args: Any = None, **kw: Any) -> Any:
        return cls(model=tiny_llama(), train_dataset=token_dataset(),
                   args=args or training_args(tmp_path), **kw)

    with pytest.raises(ValueError, match="unknown zo_options key 'num_direction'.*num_directions"):
        make(zo_options={"num_direction": 4})
    with pytest.raises(ValueError, match="zo_options\\['lr'\\].*learning_rate"):
        make(zo_options={"lr": 1e-3})
    with pytest.raises(ValueError, match="fo_steps"):
        make(zo_options={"fo_steps": 2})  # a Hybrid option, not a ZO one
    with pytest.raises(ValueError, match="rule"):
        make(zo_options={"rule": "adam"})
    with pytest.raises(ValueError, match="fo_steps = zo_steps = 0"):
        make(HybridTrainer, zo_options={"fo_steps": 0, "zo_steps": 0})
    model = tiny_llama()
    with pytest.raises(ValueError, match="optimizers"):
        ZOTrainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(),
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_fp16_mixed_precision_is_refused(tmp_path):
    try:
        args = training_args(tmp_path, fp16=True)
    except (ValueError, RuntimeError) as e:  # transformers refuses fp16 without a GPU itself
        pytest.skip(f"TrainingArguments(fp16=True) is refused here: {e}")
    with pytest.raises(ValueError, match="fp16"):
        ZOTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())


# Issue 11 gives Hybrid separate first- and zeroth-order rules; these run once it does.
_HYBRID_HAS_SPLIT_RULES = "fo_rule" in inspect.signature(ht.Hybrid).parameters


@pytest.mark.skipif(not _HYBRID_HAS_SPLIT_RULES,
                    reason="hyzo.torch.Hybrid has no fo_rule/zo_rule/zo_lr yet (issue 11)")
def test_hybrid_trainer_passes_split_rules_and_zo_lr_through(tmp_path):
    def run(zo_lr: float) -> Any:
        zo_options = {"fo_steps": 1, "zo_steps": 2, "fo_rule": "adamw", "zo_rule": "adazo",
                      "zo_lr": zo_lr, "num_directions": 2}
        model = tiny_llama()
        trainer = recording(HybridTrainer)(model=model, args=training_args(tmp_path),
                                           train_dataset=token_dataset(), zo_options=zo_options)
        trainer.train()
        by_hand = tiny_llama()
        opt = ht.Hybrid(grouped_like_trainer(trainer, by_hand), lr=1e-3, seed=0, **zo_options)
        replay(opt, by_hand, trainer.calls, steps=4, evaluations=4)
        assert_same_parameters(model, by_hand)
        return model

    assert_changed(run(1e-4), run(1e-2))


# ----------------------------------------------------------------------------------------
# Data parallel: 2 CPU processes (gloo) under torch.distributed.run.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stay_identical_with_all_reduced_losses(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(HERE / "trainer_ddp_worker.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert logs[0]["world_size"] == logs[1]["world_size"] == 2
    # Every rank holds the same parameters, which moved from the initial ones.
    for name, p in ranks[0]["final"].items():
        assert (bits(p) == bits(ranks[1]["final"][name])).all(), name
    assert any((bits(p) != bits(ranks[0]["initial"][n])).any()
               for n, p in ranks[0]["final"].items())
    # The ranks saw different batches (first-order losses differ), yet every zeroth-order
    # step's loss is the same on both: each forward's loss was all-reduced.
    phases = logs[0]["phases"]
    assert phases == logs[1]["phases"] and {"fo", "zo"} <= set(phases)
    for k, phase in enumerate(phases):
        same = logs[0]["losses"][k] == logs[1]["losses"][k]
        assert same == (phase == "zo"), (k, phase, logs[0]["losses"][k], logs[1]["losses"][k])


# ----------------------------------------------------------------------------------------
# The example.


def test_unlearn_trainer_example_forgets(tmp_path):
    example = HERE.parent / "examples" / "unlearn_trainer.py"
    proc = subprocess.run([sys.executable, str(example), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    methods = json.loads((tmp_path / "result.json").read_text())["methods"]
    assert set(methods) == {"HybridGradDiff", "HybridNPO", "HybridPrimalDual"}
    for name, result in methods.items():
        assert result["steps"] == 10, name  # optimizer steps of 4 micro-batches each
        forget_rise = result["after"]["forget_loss"] - result["before"]["forget_loss"]
        retain_rise = result["after"]["retain_loss"] - result["before"]["retain_loss"]
        assert forget_rise > 0.5 and forget_rise > 2 * retain_rise, (name, result)
    # The dual variable moved once per step (not once per forward: 2q·4 in a zeroth-order
    # step), and was logged once per step.
    pdu = methods["HybridPrimalDual"]
    assert pdu["dual_updates"] == 10 and len(pdu["logged_retain_weight"]) == 10
    assert pdu["logged_retain_weight"][0] == 1.0 and pdu["retain_weight"] != 1.0
