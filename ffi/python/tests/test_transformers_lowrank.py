"""hyzo.transformers with low-rank directions: the trainers attach the optimizer's forward
hooks to the model themselves (tiny Llama models from configs, on the CPU)."""

from __future__ import annotations

from typing import Any, List

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hyzo.transformers import ZOTrainer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from conftest import bits  # noqa: E402
from test_transformers import (  # noqa: E402
    assert_changed,
    lm_loss,
    token_dataset,
    tiny_llama,
    training_args,
    VOCAB,
)

LOWRANK = {"directions": "lowrank", "rank": 2}


def test_zo_trainer_attaches_and_never_writes_the_hooked_weights(tmp_path):
    model = tiny_llama()
    watched = model.model.layers[0].self_attn.q_proj.weight
    norm = model.model.layers[0].input_layernorm.weight

    class Watching(ZOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.seen: List[Any] = []
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen.append((bits(watched), bits(norm)))
            return lm_loss(model, inputs, num_items_in_batch)

    trainer = Watching(model=model, args=training_args(tmp_path, max_steps=3),
                       train_dataset=token_dataset(),
                       zo_options={**LOWRANK, "num_directions": 2, "rule": "adazo"})
    trainer.train()
    opt = trainer._hyzo_optimizer
    names = opt.lowrank_parameters
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("norm" in n for n in names)
    assert len(trainer.seen) == 3 * 4
    for step in range(3):
        forwards = trainer.seen[4 * step:4 * step + 4]
        # the q_proj weight is the same in the 4 forwards of a step; the norm (Gaussian) not
        assert all((w == forwards[0][0]).all() for w, _ in forwards)
        assert any((n != forwards[0][1]).any() for _, n in forwards)
    assert_changed(model, tiny_llama())


def test_tied_embeddings_and_exclude(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer = ZOTrainer(model=model, args=training_args(tmp_path, max_steps=2),
                        train_dataset=token_dataset(),
                        zo_options={**LOWRANK, "lowrank_exclude": ["model.layers.0.mlp"]})
    trainer.train()
    names = trainer._hyzo_optimizer.lowrank_parameters
    assert "model.embed_tokens.weight" in names  # tied: one weight, hooked in both modules
    assert not any(".mlp." in n for n in names)
    assert len(model.lm_head._forward_hooks) == len(model.model.embed_tokens._forward_hooks) == 1


def test_lowrank_exclude_is_a_trainer_option(tmp_path):
    with pytest.raises(ValueError, match="unknown zo_options key 'lowrank_exclud'"):
        ZOTrainer(model=tiny_llama(), args=training_args(tmp_path),
                  train_dataset=token_dataset(), zo_options={"lowrank_exclud": []})


def test_lora_adapters_get_low_rank_directions(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: bits(p) for n, p in model.named_parameters()}
    trainer = ZOTrainer(model=model, train_dataset=token_dataset(),
                        args=training_args(tmp_path, max_steps=3, learning_rate=1e-2),
                        zo_options={**LOWRANK, "num_directions": 2, "rule": "adamw"})
    trainer.train()
    names = trainer._hyzo_optimizer.lowrank_parameters
    # the adapters' A and B are nn.Linear modules: every trainable weight is hooked
    assert len(names) == 4 * 2 and all("lora_" in n for n in names)
    for n, p in model.named_parameters():
        assert ((bits(p) == before[n]).all()) != ("lora_" in n), n
