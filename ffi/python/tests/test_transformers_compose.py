"""hyzo.transformers composed with unlearning Trainers as their frameworks write them:
the 3-argument compute_loss, a create_optimizer that selects parameters, training_step
overrides, stateful objectives, gradient accumulation, bf16 and the `optim` string (tiny
Llama models from configs, on the CPU; run against the oldest and newest supported
transformers by scripts/test-python)."""

from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hyzo.torch as ht  # noqa: E402
from hyzo.transformers import HybridTrainer, HyzoForward, ZOTrainer  # noqa: E402
from transformers import Trainer  # noqa: E402

from conftest import bits  # noqa: E402
from test_transformers import (  # noqa: E402
    allow_trainer_rng_state,
    assert_changed,
    assert_same_parameters,
    tiny_llama,
    token_dataset,
    training_args,
)

KINDS = {
    "zo": (ZOTrainer, {"num_directions": 2, "rule": "adazo"}),
    "hybrid": (HybridTrainer, {"fo_steps": 1, "zo_steps": 1, "num_directions": 2}),
}


class ThreeArgumentLoss(Trainer):
    """An objective as TOFU, MUSE and open-unlearning write it: no num_items_in_batch."""

    def compute_loss(self, model, inputs, return_outputs=False):
        outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"])
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class KeywordsLoss(Trainer):
    """An objective that takes whatever the Trainer passes (``**kwargs``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.seen: List[Dict[str, Any]] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self.seen.append(dict(kwargs))
        return model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss


def changed_tensors(model: torch.nn.Module) -> List[str]:
    fresh = dict(tiny_llama().named_parameters())
    return [n for n, p in model.named_parameters() if (bits(p) != bits(fresh[n])).any()]


# ----------------------------------------------------------------------------------------
# compute_loss as transformers calls it.


@pytest.mark.parametrize("kind", KINDS)
def test_three_argument_compute_loss_trains_and_resumes_with_accumulation(
        tmp_path, monkeypatch, kind):
    allow_trainer_rng_state(monkeypatch)
    base, zo_options = KINDS[kind]

    class Composed(base, ThreeArgumentLoss):  # type: ignore[misc, valid-type]
        pass

    def run(out: Any, resume: Any = None) -> torch.nn.Module:
        model = tiny_llama()
        Composed(model=model, train_dataset=token_dataset(), zo_options=zo_options,
                 args=training_args(out, per_device_train_batch_size=1, max_steps=4,
                                    gradient_accumulation_steps=4, save_steps=2,
                                    save_strategy="steps")).train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "out" / "checkpoint-2"))
    assert_same_parameters(whole, resumed)
    assert_changed(whole, tiny_llama())


def test_compute_loss_with_keywords_gets_num_items_in_batch(tmp_path):
    class Composed(ZOTrainer, KeywordsLoss):
        pass

    trainer = Composed(model=tiny_llama(), train_dataset=token_dataset(),
                       args=training_args(tmp_path, max_steps=1),
                       zo_options={"num_directions": 1})
    trainer.train()
    assert len(trainer.seen) == 2
    assert all(list(kw) == ["num_items_in_batch"] for kw in trainer.seen)


# ----------------------------------------------------------------------------------------
# create_optimizer: the subclass chooses the parameters.


class SelectsParameters(ThreeArgumentLoss):
    """open-unlearning's RMU pattern: train only the parameters matching a regex."""

    trainable_params_regex = [r"model\.layers\.1\.mlp\.down_proj\.weight"]

    def create_optimizer(self):
        for p in self.model.parameters():
            p.requires_grad = False
        for n, p in self.model.named_parameters():
            if any(re.fullmatch(r, n) for r in self.trainable_params_regex):
                p.requires_grad = True
        super().create_optimizer()
        for p in self.model.parameters():
            p.requires_grad = True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hyzo_first", [True, False], ids=["hyzo-first", "hyzo-last"])
def test_a_subclass_create_optimizer_chooses_the_parameters(tmp_path, kind, hyzo_first):
    base, zo_options = KINDS[kind]
    bases = (base, SelectsParameters) if hyzo_first else (SelectsParameters, base)
    composed = type("Composed", bases, {})
    model = tiny_llama()
    trainer = composed(model=model, train_dataset=token_dataset(), zo_options=zo_options,
                       args=training_args(tmp_path, max_steps=2, learning_rate=1e-2))
    trainer.train()
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(model.model.layers[1].mlp.down_proj.weight)]
    assert changed_tensors(model) == ["model.layers.1.mlp.down_proj.weight"]


def test_a_create_optimizer_that_builds_its_own_is_refused(tmp_path):
    class OwnOptimizer(Trainer):
        def create_optimizer(self):
            self.optimizer = torch.optim.AdamW(self.model.parameters())
            return self.optimizer

    class Composed(OwnOptimizer, ZOTrainer):
        pass

    trainer = Composed(model=tiny_llama(), train_dataset=token_dataset(),
                       args=training_args(tmp_path, max_steps=1))
    with pytest.raises(TypeError, match="create_optimizer set a AdamW, not hyzo's optimizer"):
        trainer.train()


# ----------------------------------------------------------------------------------------
# training_step overrides.


def test_training_step_that_hyzo_would_bypass_is_refused(tmp_path):
    class OwnStep(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return super().training_step(model, inputs, num_items_in_batch)

    class Composed(HybridTrainer, OwnStep):
        pass

    with pytest.raises(TypeError, match="OwnStep.training_step would be bypassed"):
        Composed(model=tiny_llama(), train_dataset=token_dataset(), args=training_args(tmp_path))


def test_training_step_that_wraps_hyzo_composes_and_one_that_skips_it_fails_clearly(tmp_path):
    class Wrapping(ZOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.wrapped = 0
            super().__init__(*args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.wrapped += 1
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Wrapping(model=tiny_llama(), train_dataset=token_dataset(),
                       args=training_args(tmp_path, max_steps=2),
                       zo_options={"num_directions": 1})
    trainer.train()
    assert trainer.wrapped == 2 and trainer.state.global_step == 2

    class Skipping(ZOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return torch.zeros(())

    trainer = Skipping(model=tiny_llama(), train_dataset=token_dataset(),
                       args=training_args(tmp_path, max_steps=1))
    with pytest.raises(RuntimeError, match="must call super\\(\\).training_step"):
        trainer.train()


# ----------------------------------------------------------------------------------------
# One training step: what compute_loss sees, and what is logged.


class Stateful(ThreeArgumentLoss):
    """Records ``hyzo_forward`` and logs on every call, as PDU does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.forwards: List[Any] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False):
        loss = super().compute_loss(model, inputs)
        self.forwards.append(getattr(self, "hyzo_forward", None))  # None in a plain Trainer
        self.log({"component": float(loss), "calls": len(self.forwards)})
        return loss


@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
def test_compute_loss_knows_which_forward_of_the_step_it_is(tmp_path, estimator):
    class Composed(HybridTrainer, Stateful):
        pass

    trainer = Composed(model=tiny_llama(), train_dataset=token_dataset(),
                       args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2),
                       zo_options={"fo_steps": 1, "zo_steps": 1, "num_directions": 2,
                                   "estimator": estimator})
    trainer.train()
    assert trainer.hyzo_forward is None
    fo = [HyzoForward("fo", 0, 1, i, 2, perturbed=False, backward=True) for i in range(2)]
    points = [True] * 4 if estimator == "two_sided" else [False, True, True]
    zo = [HyzoForward("zo", j, len(points), i, 2, perturbed=p, backward=False)
          for j, p in enumerate(points) for i in range(2)]
    assert trainer.forwards == fo + zo
    assert [f.first for f in trainer.forwards].count(True) == 2
    assert [f.last for f in zo] == [False] * (len(zo) - 1) + [True]

    # One log per step from compute_loss's calls (their mean), beside the Trainer's loss.
    logged = [h for h in trainer.state.log_history if "component" in h]
    assert [h["step"] for h in logged] == [0, 1]  # logged during steps 1 and 2
    assert logged[0]["calls"] == 1.5  # the mean of calls 1 and 2
    assert logged[1]["calls"] == (3 + 2 + 2 * len(points)) / 2
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2


# ----------------------------------------------------------------------------------------
# Gradient accumulation.


class Recording(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.batches: List[torch.Tensor] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batches.append(inputs["input_ids"].clone())
        kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(**inputs, **kw).loss


@pytest.mark.parametrize("kind, zo_options", [
    ("zo", {"num_directions": 2, "rule": "sgd"}),
    ("hybrid", {"fo_steps": 2, "zo_steps": 2, "num_directions": 2, "fo_rule": "sgd",
                "zo_rule": "sgd"}),
])
def test_k_micro_batches_take_the_step_of_one_batch_k_times_larger(tmp_path, kind, zo_options):
    base = {"zo": ZOTrainer, "hybrid": HybridTrainer}[kind]
    steps, k, b = 4, 4, 2

    def run(batch: int, accumulation: int) -> Any:
        cls = type("Composed", (base, Recording), {})
        model = tiny_llama()
        trainer = cls(model=model, train_dataset=token_dataset(32), zo_options=zo_options,
                      args=training_args(tmp_path / f"{batch}x{accumulation}", max_steps=steps,
                                         per_device_train_batch_size=batch,
                                         gradient_accumulation_steps=accumulation,
                                         lr_scheduler_type="linear", learning_rate=1e-2))
        trainer.train()
        return model, trainer

    micro, t_micro = run(b, k)
    whole, t_whole = run(k * b, 1)
    assert t_micro.state.global_step == t_whole.state.global_step == steps
    # The same examples per step: every point of a zeroth-order step on all k micro-batches
    # (2qk forwards), a first-order step on each once.
    forwards = [1] * 2 + [4] * 2 if kind == "hybrid" else [4] * 4
    assert len(t_micro.batches) == k * sum(forwards) and len(t_whole.batches) == sum(forwards)
    i = 0
    for point in t_whole.batches:
        assert torch.equal(torch.cat(t_micro.batches[i:i + k]), point)
        i += k
    # Equal up to the order of the loss summation (a mean of k means against one mean): a
    # rounding difference δ of a loss moves a zeroth-order step's projected gradient by
    # δ / 2μ. Measured: 1.8e-4 (ZO) and 8.7e-5 (hybrid) of the parameters' movement.
    moved = max(float((p - q).abs().max())
                for p, q in zip(whole.parameters(), tiny_llama().parameters()))
    apart = max(float((p - q).abs().max()) for p, q in zip(whole.parameters(), micro.parameters()))
    print(f"{kind}: max |micro - whole| = {apart:.3g}, max |whole - start| = {moved:.3g}")
    assert moved > 1e-3
    assert apart <= 1e-3 * moved, (apart, moved)
    assert [h["loss"] for h in t_micro.state.log_history if "loss" in h] == pytest.approx(
        [h["loss"] for h in t_whole.state.log_history if "loss" in h], rel=1e-5)


# ----------------------------------------------------------------------------------------
# Precision and the optimizer string.


def test_bf16_runs_the_forwards_under_autocast_and_keeps_the_weights(tmp_path):
    try:
        args = training_args(tmp_path, max_steps=2, bf16=True)
    except (ValueError, RuntimeError) as e:
        pytest.skip(f"TrainingArguments(bf16=True) is refused here: {e}")
    model = tiny_llama()
    dtypes: List[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: dtypes.append(o.dtype))
    trainer = HybridTrainer(model=model, args=args, train_dataset=token_dataset(),
                            zo_options={"fo_steps": 1, "zo_steps": 1, "num_directions": 1})
    trainer.train()
    assert dtypes == [torch.bfloat16] * 3  # one first-order forward, two zeroth-order ones
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_changed(model, tiny_llama())


def test_an_optim_string_is_replaced_with_one_warning(tmp_path):
    args = training_args(tmp_path, max_steps=1, optim="paged_adamw_32bit")
    with pytest.warns(UserWarning) as caught:
        trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
    replaced = [w for w in caught if "replaced by hyzo's optimizer" in str(w.message)]
    assert len(replaced) == 1 and "paged_adamw_32bit" in str(replaced[0].message)
    trainer.train()  # no bitsandbytes needed: hyzo's optimizer, not the paged AdamW
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), ht.ZO)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*replaced by hyzo's optimizer")
        ZOTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=token_dataset())
