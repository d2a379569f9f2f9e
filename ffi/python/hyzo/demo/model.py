"""The model: a small causal transformer over 5-token facts, what it is scored on, and its
pre-training until it reproduces every fact."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .world import World

if TYPE_CHECKING:  # the experiment imports this module
    from .experiment import Log


class TinyLM(nn.Module):
    """A causal transformer over 5-token facts."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 5):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        h = self.body(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def answer_logits(model: nn.Module, facts: torch.Tensor) -> torch.Tensor:
    """Logits for the value token, given BOS first last relation."""
    return model(facts[:, :4])[:, -1]


def lm_loss(model: nn.Module, facts: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the name, relation and value tokens."""
    logits = model(facts[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), facts[:, 1:].reshape(-1))


def accuracy(model: nn.Module, facts: torch.Tensor) -> float:
    """The fraction of facts whose value is the model's top answer (an exact ratio of
    counts, so that 6/60 <= 0.1 holds)."""
    with torch.no_grad():
        pred = answer_logits(model, facts).argmax(-1)
    return int((pred == facts[:, 4]).sum()) / len(facts)


def answer_loss(model: nn.Module, facts: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the value token: what unlearning and relearning act on."""
    return F.cross_entropy(answer_logits(model, facts), facts[:, 4])


def answer_logprob(model: nn.Module, facts: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(answer_logits(model, facts), -1).gather(1, facts[:, 4:5]).squeeze(1)


def pretrain(world: World, max_steps: int, seed: int, log: "Log") -> tuple:
    """AdamW on every token until every fact is reproduced, then as many steps again."""
    torch.manual_seed(seed)
    model = TinyLM(len(world.vocab)).to(world.facts.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    acc, stop, s = 0.0, max_steps, 0
    while s < stop:
        opt.zero_grad()
        loss = lm_loss(model, world.facts)
        loss.backward()
        opt.step()
        s += 1
        if s % 25 == 0:
            acc = accuracy(model, world.facts)
            log.tick(f"pretraining: step {s}, loss {loss.item():.3f}, accuracy {acc:.3f}")
            if acc == 1.0 and stop == max_steps:
                stop = min(max_steps, 2 * s)
    return model, accuracy(model, world.facts), s
