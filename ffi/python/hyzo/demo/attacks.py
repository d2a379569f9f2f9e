"""The released checkpoint and the attacks on an unlearned model: re-quantization (the
base's own int4 scheme, per-channel 4- and 8-bit), loading in 4 and 8 bits as bitsandbytes
does (NF4, FP4, LLM.int8), relearning, and what each run is measured on."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from .._quantization import SCHEMES
from .model import accuracy, answer_loss
from .world import World

if TYPE_CHECKING:  # the experiment imports this module
    from .experiment import Setup


def fake_quant(w: torch.Tensor, bits: int, group: Optional[int]) -> tuple:
    """Symmetric round-to-nearest of a matrix, one scale per row (``group`` None) or per
    ``group`` consecutive elements of a row: (dequantized values, per-element step)."""
    levels = 2 ** (bits - 1) - 1
    rows, cols = w.shape
    g = cols if group is None else group
    if cols % g:
        raise ValueError(f"quantization: a row of {cols} is not a multiple of groups of {g}")
    x = w.reshape(rows, cols // g, g)
    scale = x.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / levels
    deq = torch.round(x / scale).clamp(-levels, levels) * scale
    return deq.reshape(rows, cols), scale.expand_as(x).reshape(rows, cols)


ATTACKS = {  # name -> (bits, group)
    "4-bit g32": (4, 32),
    "4-bit per-channel": (4, None),
    "8-bit per-channel": (8, None),
}
BASE_SCHEME = (4, 32)


def quantized(model: nn.Module, bits: int, group: Optional[int]) -> nn.Module:
    """A copy with every weight matrix fake-quantized (biases, norms: left in float)."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                p.copy_(fake_quant(p, bits, group)[0])
    return q


# name -> quantize-dequantize of one weight: what a user gets from transformers'
# ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4" | "fp4"))`` (blocks of 64) or ``load_in_8bit=True``.
BNB_ATTACKS = {name: SCHEMES[name] for name in ("bnb nf4", "bnb fp4", "bnb int8")}


def bnb_weights(model: nn.Module) -> dict:
    """The weights that loading in 4 or 8 bits quantizes (name -> parameter), as
    transformers' bitsandbytes integration chooses them with its default
    ``llm_int8_skip_modules=None``: the Linear layers, except the output head (the module of
    the last parameter, and the output embeddings: ``get_keys_to_not_convert``); embeddings,
    norms and biases stay in float. The attention's q/k/v projections, separate
    ``nn.Linear`` layers in a Hugging Face model, are ``nn.MultiheadAttention``'s stacked
    ``in_proj_weight`` here (docs/interpretation.md, "bitsandbytes' loading as an attack")."""
    last = list(model.named_parameters())[-1][0].rpartition(".")[0]
    out = {}
    for name, module in model.named_modules():
        if name == last or name.startswith(last + "."):
            continue
        if isinstance(module, nn.Linear):
            out[f"{name}.weight"] = module.weight
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out[f"{name}.in_proj_weight"] = module.in_proj_weight
    return out


def bnb_quantized(model: nn.Module, attack: str) -> nn.Module:
    """A copy loaded as bitsandbytes would (``attack``: a key of ``BNB_ATTACKS``): the
    weights of ``bnb_weights`` quantized and dequantized, everything else unchanged."""
    scheme = BNB_ATTACKS[attack]
    q = copy.deepcopy(model)
    with torch.no_grad():
        for w in bnb_weights(q).values():
            w.copy_(scheme(w))
    return q


def grid_change(model: nn.Module, base: nn.Module) -> tuple:
    """How far unlearning moved the weight matrices on the base's grid (4-bit, g32): the
    fraction of quantized values that changed (re-quantized value more than half a step from
    the base's) and the mean |delta| in quantization steps."""
    changed, moved, n = 0, 0.0, 0
    with torch.no_grad():
        for p, b in zip(model.parameters(), base.parameters()):
            if p.dim() != 2:
                continue
            step = fake_quant(b, *BASE_SCHEME)[1]
            requant = fake_quant(p, *BASE_SCHEME)[0]
            changed += int(((requant - b).abs() > 0.5 * step).sum())
            moved += float(((p - b).abs() / step).sum())
            n += p.numel()
    return changed / n, moved / n


def relearn(model: nn.Module, world: World, setup: Setup, seed: int) -> float:
    """Forget accuracy on the held-out half after K AdamW steps on the other half."""
    forget_ids = torch.nonzero(world.forget).squeeze(1)
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    perm = forget_ids[torch.randperm(len(forget_ids), generator=g).to(forget_ids.device)]
    half = len(perm) // 2
    train, held = world.facts[perm[:half]], world.facts[perm[half:]]
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=setup.relearn_lr, weight_decay=0.0)
    for _ in range(setup.relearn_k):
        opt.zero_grad()
        answer_loss(m, train).backward()
        opt.step()
    return accuracy(m, held)


def measure(model: nn.Module, base: nn.Module, world: World, setup: Setup,
            seed: int) -> dict:
    forget = world.facts[world.forget]
    retain = world.facts[~world.forget]
    frac, steps = grid_change(model, base)
    out = {"forget": accuracy(model, forget), "retain": accuracy(model, retain)}
    for attack, (bits, group) in ATTACKS.items():
        qm = quantized(model, bits, group)
        out[f"forget {attack}"] = accuracy(qm, forget)
        out[f"retain {attack}"] = accuracy(qm, retain)
    for attack in BNB_ATTACKS:
        qm = bnb_quantized(model, attack)
        out[f"forget {attack}"] = accuracy(qm, forget)
        out[f"retain {attack}"] = accuracy(qm, retain)
    out["forget relearned"] = relearn(model, world, setup, seed)
    out["grid values changed"] = frac
    out["mean |delta| / step"] = steps
    return out
