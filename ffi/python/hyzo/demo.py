"""The paper's robustness experiment in miniature: ``python -m hyzo.demo``.

"Downgrade to Upgrade" (Lang et al., arXiv 2510.00761) finds that unlearning with
downgraded optimizers (zeroth-order, sign-compressed, and a hybrid of first-order and
zeroth-order blocks) is harder to undo by weight quantization and by relearning. This demo
runs a TOFU-style experiment at laptop scale, every optimizer through ``hyzo.torch``:

1. invents people with attributes (city, job, colour, pet) from a seed, and a word-level
   tokenizer for the facts ("<first> <last> lives_in <city>");
2. trains a small causal transformer with AdamW until it reproduces every fact, then
   releases it as an int4 checkpoint: every weight matrix snapped to symmetric 4-bit,
   groups of 32 along each row; unlearning starts from the dequantized weights (the
   assumption built in: the model sits on the attack's grid, as a released int4 model does);
3. unlearns the forget set (10% of the people) with GradDiff and with NPO, at one learning
   rate (1e-4) for every optimizer, each stopped when the forget accuracy first reaches
   each target (<= 0.25, then <= 0.1; at most 800 steps, 400 for pure ZO, whose steps cost
   8 forward passes each): AdamW, Signum, the hybrid (10 AdamW steps, 10 AdaZO steps,
   separate states), zeroth-order AdaZO, and controls: (a) AdamW plus ONE seeded Gaussian
   displacement of every weight with the RMS of the hybrid's summed zeroth-order changes
   (``perturb_``, hyzo's seeded perturbation pass), (b) "null ZO", the hybrid whose
   zeroth-order steps are fed a standard normal draw instead of the loss (the same
   directions and rule, no information about the objective; AdaZO divides by the root of
   its second moment, so the draw's scale does not matter), (c) the displacement of (a) on
   the base model, without unlearning;
4. attacks each unlearned model: re-quantization with the base's scheme (4-bit, groups of
   32), per-channel 4-bit and per-channel 8-bit round-to-nearest, and relearning (K AdamW
   steps on half the forget set, scored on the held-out half);
5. prints a table per objective and target, writes a PNG and ``results.json``.

Nothing is tuned to make a method win: one learning rate, matched forget targets, and the
controls decide what may be claimed. ``--seeds N`` repeats everything (world, model,
directions) for N seeds and reports mean +- std.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import hyzo
import hyzo.torch as hzt

FIRST = (
    "Ada Bram Cleo Dario Elin Faro Gita Hugo Ines Joss Kira Lev Mina Nils Oona Pavo Quin "
    "Rhea Sami Tove Ugo Vera Wim Xena Yuri Zane Alba Boaz Cyra Dov Esme Finn Gale Hedda "
    "Ivo Jana Kai Lumi Milo Nia"
).split()
LAST = (
    "Abbot Borin Castel Dunmore Eskil Farrow Gorsky Halloran Ibsen Jarvik Kestrel Lindqvist "
    "Morrow Nakata Orwell Pastor Quell Rasmus Sorel Tarkin Umber Valko Winslow Xiang Yarrow "
    "Zoller Amsel Brandt Corvin Delacroix"
).split()
RELATIONS = {
    "lives_in": "Oslo Lima Perth Quito Riga Sofia Turin Ulm Vigo Wells Xian Yonkers Zadar "
    "Aarhus Bergen Cork Dakar Evora Faro Graz".split(),
    "works_as": "baker pilot nurse welder judge miner tailor poet chemist farmer diver "
    "cooper glazier notary ranger sailor smith tutor vintner weaver".split(),
    "likes": "amber beige coral denim ebony fuchsia gold henna indigo jade khaki lilac".split(),
    "owns_a": "cat dog ferret gecko hamster ibis jackdaw koi llama mule newt otter".split(),
}


# ---------------------------------------------------------------------------------------
# Configuration


@dataclass
class Setup:
    """Everything that sizes the experiment (``--quick`` shrinks it)."""

    people: int = 150
    pretrain_steps: int = 600  # cap; stops at twice the steps to reproduce every fact
    lr: float = 1e-4  # every unlearning optimizer's learning rate (none is tuned)
    targets: tuple = (0.25, 0.1)  # forget accuracy at which a run is stopped and attacked
    cap: int = 800  # steps per unlearning run at most
    # Steps of pure ZO at most: 3,200 forwards, more compute than any other run needs.
    zo_cap: int = 400
    q: int = 4  # directions per zeroth-order step
    mu: float = 1e-3  # smoothing radius of the zeroth-order steps
    block: int = 10  # the hybrid's fo_steps = zo_steps
    relearn_k: int = 20  # relearning attack: AdamW steps on half the forget set
    relearn_lr: float = 1e-3

    @staticmethod
    def quick() -> "Setup":
        """``--quick``: every row and attack of the demo, on a smaller world, one target."""
        return Setup(people=60, pretrain_steps=400, targets=(0.25,), cap=250, zo_cap=20,
                     block=5, relearn_k=10)

    @staticmethod
    def tiny() -> "Setup":
        """``--tiny`` (hidden): seconds, for the determinism test."""
        return Setup(people=30, pretrain_steps=150, targets=(0.25,), cap=40, zo_cap=3,
                     block=3, relearn_k=3)


# ---------------------------------------------------------------------------------------
# The world and the model


@dataclass
class World:
    """The invented facts, the vocabulary and the forget/retain split."""

    vocab: List[str]
    facts: torch.Tensor  # [n_facts, 5] token ids: BOS first last relation value
    person: torch.Tensor  # [n_facts] person index
    forget: torch.Tensor  # bool mask over facts
    n_people: int
    index: Dict[str, int] = field(default_factory=dict)


def make_world(n_people: int, seed: int, device: str = "cpu") -> World:
    g = torch.Generator().manual_seed(seed)
    vocab = ["<bos>"] + FIRST + LAST + list(RELATIONS)
    for values in RELATIONS.values():
        vocab += [v for v in values if v not in vocab]
    index = {w: i for i, w in enumerate(vocab)}
    names = [(f, l) for f in FIRST for l in LAST]
    order = torch.randperm(len(names), generator=g)[:n_people]
    rows, person = [], []
    for p, k in enumerate(order.tolist()):
        first, last = names[k]
        for rel, values in RELATIONS.items():
            v = values[torch.randint(len(values), (1,), generator=g).item()]
            rows.append([index["<bos>"], index[first], index[last], index[rel], index[v]])
            person.append(p)
    facts = torch.tensor(rows)
    person_t = torch.tensor(person)
    forget_people = torch.randperm(n_people, generator=g)[: max(2, n_people // 10)]
    forget = torch.isin(person_t, forget_people)
    # Drawn on the CPU (the same world on any device), then moved.
    return World(vocab, facts.to(device), person_t.to(device), forget.to(device), n_people,
                 index)


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


# ---------------------------------------------------------------------------------------
# Quantization: the released checkpoint and the attacks


def _fake_quant(w: torch.Tensor, bits: int, group: Optional[int]) -> tuple:
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
                p.copy_(_fake_quant(p, bits, group)[0])
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
            step = _fake_quant(b, *BASE_SCHEME)[1]
            requant = _fake_quant(p, *BASE_SCHEME)[0]
            changed += int(((requant - b).abs() > 0.5 * step).sum())
            moved += float(((p - b).abs() / step).sum())
            n += p.numel()
    return changed / n, moved / n


# ---------------------------------------------------------------------------------------
# Unlearning


def _answers(model: nn.Module, forget: torch.Tensor, retain: torch.Tensor) -> tuple:
    """Answer logits of the forget set and a retain batch, in one forward pass."""
    logits = answer_logits(model, torch.cat([forget, retain]))
    return logits[: len(forget)], logits[len(forget):]


def graddiff_loss(model, forget, retain, ref_logprob):
    lf, lr = _answers(model, forget, retain)
    return -F.cross_entropy(lf, forget[:, 4]) + F.cross_entropy(lr, retain[:, 4])


def npo_loss(model, forget, retain, ref_logprob, beta: float = 0.5):
    lf, lr = _answers(model, forget, retain)
    ratio = F.log_softmax(lf, -1).gather(1, forget[:, 4:5]).squeeze(1) - ref_logprob
    npo = -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()
    return npo + F.cross_entropy(lr, retain[:, 4])


OBJECTIVES = {"GradDiff": graddiff_loss, "NPO": npo_loss}

# The optimizers, in table order, and the rows built from them.
ADAMW, SIGNUM, HYBRID, ZO, NULL_ZO = "AdamW", "Signum", "Hybrid", "ZO AdaZO", "null-ZO hybrid"
NOISE_ADAMW, NOISE_BASE = "AdamW + noise", "base + noise"
ROWS = [ADAMW, SIGNUM, HYBRID, ZO, NOISE_ADAMW, NULL_ZO, NOISE_BASE]
DESCRIPTION = {
    ADAMW: "AdamW (first-order)",
    SIGNUM: "Signum (first-order, sign of the momentum)",
    HYBRID: "hyzo.torch.Hybrid: 10 AdamW / 10 AdaZO steps, separate states (spec v2)",
    ZO: "zeroth-order AdaZO",
    NOISE_ADAMW: "control (a): AdamW to the target, then one Gaussian displacement with the "
                 "RMS of the hybrid's summed zeroth-order changes",
    NULL_ZO: "control (b): the hybrid with its zeroth-order steps fed a random scalar",
    NOISE_BASE: "control (c): the displacement of (a) on the base model, no unlearning",
}


def make_optimizer(name: str, params, setup: Setup, seed: int):
    common = dict(lr=setup.lr, num_threads=1)
    if name == ADAMW:
        return hzt.FO(params, rule="adamw", **common)
    if name == SIGNUM:
        return hzt.FO(params, rule="signum", **common)
    if name in (HYBRID, NULL_ZO):
        # Spec v2 defaults: AdamW first-order steps, AdaZO zeroth-order steps, own states.
        return hzt.Hybrid(params, fo_steps=setup.block, zo_steps=setup.block, eps=setup.mu,
                          num_directions=setup.q, seed=seed, **common)
    if name == ZO:
        return hzt.ZO(params, rule="adazo", eps=setup.mu, num_directions=setup.q, seed=seed,
                      **common)
    raise ValueError(name)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@dataclass
class Snapshot:
    """A model stopped at a forget target."""

    target: float
    reached: bool
    steps: int
    forwards: int
    backwards: int
    state: dict
    zo_rms: Optional[float] = None  # RMS of the summed zeroth-order changes (hybrids)


def unlearn(base: nn.Module, world: World, objective: Callable, name: str, setup: Setup,
            seed: int, log: "Log") -> List[Snapshot]:
    """Unlearns until the forget accuracy first reaches each target (or the cap): one step
    = the whole forget set and a retain minibatch of the same size, drawn per step from
    ``seed`` (the same batches for every optimizer)."""
    model = copy.deepcopy(base)
    forget = world.facts[world.forget]
    retain = world.facts[~world.forget]
    opt = make_optimizer(name, model.parameters(), setup, seed)
    batches = torch.Generator().manual_seed(seed * 7919 + 11)
    noise = torch.Generator().manual_seed(seed * 7919 + 13)  # null ZO's losses
    hybrid = name in (HYBRID, NULL_ZO)
    zo_sum = torch.zeros_like(_flat(model)) if hybrid else None
    count = {"fwd": 0, "bwd": 0}
    cap = setup.zo_cap if name == ZO else setup.cap
    snaps: List[Snapshot] = []
    pending = list(setup.targets)
    t0 = time.time()

    def snapshot(reached: bool, steps: int) -> Snapshot:
        rms = None if zo_sum is None else float(zo_sum.pow(2).mean().sqrt())
        return Snapshot(pending.pop(0), reached, steps, count["fwd"], count["bwd"],
                        {k: v.detach().clone() for k, v in model.state_dict().items()}, rms)

    with torch.no_grad():
        ref_logprob = answer_logprob(base, forget)  # NPO's reference: the base model
    fa = accuracy(model, forget)
    for step in range(1, cap + 1):
        batch = retain[torch.randint(len(retain), (len(forget),), generator=batches)]

        def closure(batch=batch):
            if name == NULL_ZO and not torch.is_grad_enabled():
                # A zeroth-order evaluation that knows nothing of the objective.
                return float(torch.randn((), generator=noise))
            count["fwd"] += 1
            if torch.is_grad_enabled():
                count["bwd"] += 1
            return objective(model, forget, batch, ref_logprob)

        if name in (ADAMW, SIGNUM):
            opt.zero_grad()
            closure().backward()
            opt.step()
        else:
            zo_phase = hybrid and opt.next_phase() == "zo"
            before = _flat(model) if zo_phase else None
            opt.step(closure)
            if zo_phase:
                zo_sum += _flat(model) - before
        fa = accuracy(model, forget)
        while pending and fa <= pending[0]:
            snaps.append(snapshot(True, step))
        if not pending:
            break
        if step % 50 == 0:
            log.tick(f"    {name}: step {step}, forget {fa:.2f}")
    while pending:
        snaps.append(snapshot(False, cap))
    log.line(f"    {name}: " + ", ".join(
        f"forget <= {s.target:g} " + (f"after {s.steps} steps" if s.reached else
                                      f"not reached in {s.steps} steps")
        for s in snaps) + f" (forget {fa:.2f}; {time.time() - t0:.1f} s)")
    return snaps


# ---------------------------------------------------------------------------------------
# Attacks and measurements


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
    out["forget relearned"] = relearn(model, world, setup, seed)
    out["grid values changed"] = frac
    out["mean |delta| / step"] = steps
    return out


def run_seed(seed: int, setup: Setup, device: str, log: "Log") -> dict:
    """The whole experiment for one seed: world, base model, every optimizer and attack."""
    world = make_world(setup.people, seed, device)
    n_forget = int(world.forget.sum())
    log.line(f"seed {seed}: {setup.people} invented people, {len(world.facts)} facts, "
             f"vocabulary {len(world.vocab)} words; forget set {n_forget} facts")
    model, acc, pre_steps = pretrain(world, setup.pretrain_steps, seed, log)
    base = quantized(model, *BASE_SCHEME)  # the released int4 checkpoint, dequantized
    base_acc = accuracy(base, world.facts)
    forget = world.facts[world.forget]
    retain = world.facts[~world.forget]
    log.line(f"  pretrained: {pre_steps} AdamW steps, accuracy {acc:.3f}; as an int4 "
             f"checkpoint (4-bit, groups of 32): {base_acc:.3f}")
    if base_acc < 0.98:
        log.line("  warning: the int4 base forgot facts before any unlearning; results are "
                 "less telling")
    result: dict = {
        "base": {"accuracy_float": acc, "accuracy": base_acc, "pretrain_steps": pre_steps,
                 "forget": accuracy(base, forget), "retain": accuracy(base, retain),
                 "forget_facts": n_forget, "facts": len(world.facts),
                 # The relearning attack on the base itself: what it does to facts the
                 # model still knows (relearning half the forget set, scoring the other).
                 "forget relearned": relearn(base, world, setup, seed)},
        "runs": {},
    }
    for obj_name, objective in OBJECTIVES.items():
        log.line(f"  {obj_name}:")
        snaps = {name: unlearn(base, world, objective, name, setup, seed, log)
                 for name in (ADAMW, SIGNUM, HYBRID, ZO, NULL_ZO)}
        per_target: dict = {}
        for ti, target in enumerate(setup.targets):
            rows = {}
            for name in ROWS:
                if name in (NOISE_ADAMW, NOISE_BASE):
                    src = snaps[ADAMW][ti] if name == NOISE_ADAMW else None
                    hyb = snaps[HYBRID][ti]
                    m = copy.deepcopy(base)
                    if src is not None:
                        m.load_state_dict(src.state)
                    std = hyb.zo_rms or 0.0
                    opt = make_optimizer(ADAMW, m.parameters(), setup, seed)
                    # One displacement, named by its own seed (not one of the hybrid's).
                    opt.perturb_(std, seed=1_000_003 + seed)
                    row = measure(m, base, world, setup, seed)
                    row.update(reached=None if src is None else src.reached,
                               steps=0 if src is None else src.steps,
                               forwards=0 if src is None else src.forwards,
                               backwards=0 if src is None else src.backwards,
                               displacement_rms=std)
                else:
                    s = snaps[name][ti]
                    m = copy.deepcopy(base)
                    m.load_state_dict(s.state)
                    row = measure(m, base, world, setup, seed)
                    row.update(reached=s.reached, steps=s.steps, forwards=s.forwards,
                               backwards=s.backwards)
                    if s.zo_rms is not None:
                        row["zo_changes_rms"] = s.zo_rms
                rows[name] = row
            per_target[f"{target:g}"] = rows
        result["runs"][obj_name] = per_target
    return result


# ---------------------------------------------------------------------------------------
# Aggregation, report, plot


METRICS = ["forget", "retain", "forget 4-bit g32", "forget 4-bit per-channel",
           "forget 8-bit per-channel", "forget relearned", "grid values changed",
           "mean |delta| / step", "steps", "forwards", "backwards"]


def aggregate(per_seed: List[dict]) -> dict:
    """mean and std (population std over seeds; 0 with one seed) of every metric."""
    first = per_seed[0]["runs"]
    out: dict = {}
    for obj, targets in first.items():
        out[obj] = {}
        for t, rows in targets.items():
            out[obj][t] = {}
            for name in rows:
                cell = {}
                for k in METRICS + ["displacement_rms", "zo_changes_rms"]:
                    vals = [s["runs"][obj][t][name].get(k) for s in per_seed]
                    if any(v is None for v in vals):
                        continue
                    mean = sum(vals) / len(vals)
                    var = sum((v - mean) ** 2 for v in vals) / len(vals)
                    cell[k] = {"mean": mean, "std": math.sqrt(var)}
                reached = [s["runs"][obj][t][name]["reached"] for s in per_seed]
                cell["reached"] = (None if reached[0] is None
                                   else sum(1 for r in reached if r))
                out[obj][t][name] = cell
    return out


def _fmt(cell: dict, k: str, n: int, digits: int = 2) -> str:
    if k not in cell:
        return "-"
    m, s = cell[k]["mean"], cell[k]["std"]
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f}±{s:.{digits}f}"


def table_lines(agg: dict, n_seeds: int, markdown: bool = False) -> List[str]:
    cols = ["forget", "retain", "forget 4-bit g32", "forget 4-bit per-channel",
            "forget 8-bit per-channel", "forget relearned", "grid values changed",
            "mean |delta| / step"]
    heads = ["forget", "retain", "4-bit g32", "4-bit ch", "8-bit ch", "relearned",
             "grid chg", "|Δ|/step"]
    lines: List[str] = []
    for obj, targets in agg.items():
        for t, rows in targets.items():
            title = f"{obj}, stopped at forget <= {t}"
            if markdown:
                lines.append(f"| {title} | " + " | ".join(heads) + " | steps | fwd / bwd |")
                lines.append("|---|" + "---:|" * (len(heads) + 2))
            else:
                lines.append("")
                lines.append(title)
                lines.append(f"  {'':<16}" + "".join(f"{h:>12}" for h in heads)
                             + f"{'steps':>9}  fwd/bwd")
            for name, cell in rows.items():
                vals = [_fmt(cell, k, n_seeds) for k in cols]
                reached = cell.get("reached")
                steps = _fmt(cell, "steps", n_seeds, 0)
                if reached is not None and reached < n_seeds:
                    steps += f" ({n_seeds - reached} capped)" if n_seeds > 1 else " (cap)"
                fb = f"{_fmt(cell, 'forwards', n_seeds, 0)} / {_fmt(cell, 'backwards', n_seeds, 0)}"
                if name == NOISE_BASE:
                    steps, fb = "-", "-"
                if markdown:
                    lines.append(f"| {name} | " + " | ".join(vals) + f" | {steps} | {fb} |")
                else:
                    lines.append(f"  {name:<16}" + "".join(f"{v:>12}" for v in vals)
                                 + f"{steps:>9}  {fb}")
            if markdown:
                lines.append("")
    return lines


def summary_markdown(agg: dict, base: dict, n_seeds: int) -> List[str]:
    """Two Markdown tables (the README's): the re-quantization attack on the base's grid
    for every objective and target, then the other columns at each objective's first
    target."""
    panels = [(obj, t) for obj, targets in agg.items() for t in targets]
    lines = ["| forget accuracy: unlearned → re-quantized (4-bit g32) | "
             + " | ".join(f"{obj} ≤ {t}" for obj, t in panels) + " |",
             "|---|" + "---:|" * len(panels)]
    for name in ROWS:
        cells = []
        for obj, t in panels:
            c = agg[obj][t][name]
            mark = " (capped)" if c.get("reached") is not None and c["reached"] < n_seeds \
                else ""
            cells.append(f"{_fmt(c, 'forget', 1)} → {_fmt(c, 'forget 4-bit g32', n_seeds)}"
                         + mark)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    cols = [("retain", "retain"), ("forget 4-bit per-channel", "4-bit per-channel"),
            ("forget 8-bit per-channel", "8-bit per-channel"),
            ("forget relearned", "relearned"), ("grid values changed", "grid values changed"),
            ("mean |delta| / step", "mean \\|Δ\\| / step")]
    for obj, targets in agg.items():
        t = next(iter(targets))
        lines.append(f"| {obj} ≤ {t} | " + " | ".join(h for _, h in cols)
                     + " | steps | fwd / bwd |")
        lines.append("|---|" + "---:|" * (len(cols) + 2))
        for name in ROWS:
            c = targets[t][name]
            vals = [_fmt(c, k, n_seeds) for k, _ in cols]
            if name == NOISE_BASE:
                steps = fb = "–"
            else:
                steps = _fmt(c, "steps", n_seeds, 0)
                if c.get("reached") is not None and c["reached"] < n_seeds:
                    steps += " (capped)"
                fb = f"{_fmt(c, 'forwards', n_seeds, 0)} / {_fmt(c, 'backwards', n_seeds, 0)}"
            lines.append(f"| {name} | " + " | ".join(vals) + f" | {steps} | {fb} |")
        lines.append("")
    b = {k: sum(x[k] for x in base) / len(base) for k in ("accuracy", "forget relearned")}
    lines.append(f"Base (int4 checkpoint): accuracy {b['accuracy']:.3f}; the relearning "
                 f"attack on it leaves the held-out half at {b['forget relearned']:.2f}.")
    return lines


def _diff(cell_a: dict, cell_b: dict, k: str, n: int) -> tuple:
    """(mean_a - mean_b, whether it exceeds the noise: 2 standard errors with several seeds,
    0.1 with one)."""
    a, b = cell_a[k], cell_b[k]
    d = a["mean"] - b["mean"]
    if n > 1:
        se = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / (n - 1))
        return d, abs(d) > max(2 * se, 0.02)
    return d, abs(d) > 0.1


def verdict(agg: dict, n_seeds: int) -> List[str]:
    """What the run shows, read off the table with the controls (no claim beyond them)."""
    key = "forget 4-bit g32"
    lines = []
    if n_seeds == 1:
        lines.append("(one seed: a difference counts only above 0.1; use --seeds N for "
                     "mean +- std)")
    for obj, targets in agg.items():
        for t, rows in targets.items():
            a, h = rows[ADAMW], rows[HYBRID]
            capped = [n for n, c in rows.items()
                      if c.get("reached") is not None and c["reached"] < n_seeds]
            lines.append(f"{obj}, stopped at forget <= {t}"
                         + (f" (capped before the target: {', '.join(capped)})"
                            if capped else "") + ":")
            restored = a[key]["mean"] - a["forget"]["mean"]
            lines.append(f"  re-quantization on the base's grid takes AdamW from "
                         f"{a['forget']['mean']:.2f} to {a[key]['mean']:.2f}"
                         + (": the attack works" if restored > 0.3 else
                            ": the attack restores little here"))
            d, sig = _diff(h, a, key, n_seeds)
            edge = sig and d < 0
            lines.append(f"  the hybrid after the attack: {h[key]['mean']:.2f} -> "
                         + ("more robust than AdamW" if edge else
                            "less robust than AdamW" if sig else
                            "no difference from AdamW beyond noise"))
            for name, what, cause in (
                    (NOISE_ADAMW, "(a) AdamW + matched random displacement",
                     "a random displacement of that size"),
                    (NULL_ZO, "(b) null-ZO hybrid", "the same rule on steps blind to the "
                     "objective")):
                c = rows[name]
                dh, sig_h = _diff(c, h, key, n_seeds)
                da, sig_a = _diff(c, a, key, n_seeds)
                head = f"  control {what}: {c[key]['mean']:.2f} -> "
                if not edge:
                    lines.append(head + ("more robust than AdamW" if sig_a and da < 0 else
                                         "no better than AdamW"))
                elif not sig_h or dh < 0:
                    lines.append(head + f"as robust as the hybrid: {cause} explains its edge")
                elif not sig_a:
                    lines.append(head + f"no better than AdamW: {cause} does not explain "
                                 "the hybrid's edge")
                else:
                    lines.append(head + f"between AdamW and the hybrid: {cause} explains "
                                 "part of its edge")
            nb = rows[NOISE_BASE]
            lines.append(f"  control (c) the displacement on the base: forget "
                         f"{nb['forget']['mean']:.2f}, retain {nb['retain']['mean']:.2f}"
                         + (" (noise alone does not forget)" if nb["forget"]["mean"] > 0.9
                            else " (noise alone forgets)"))
    return lines


def plot(agg: dict, n_seeds: int, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    panels = [(obj, t) for obj, targets in agg.items() for t in targets]
    cols = len(next(iter(agg.values())))
    rows_n = len(agg)
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, 3.6 * rows_n + 1.0),
                             sharey=True, squeeze=False)
    series = [("forget", "unlearned"), ("forget 4-bit g32", "re-quantized 4-bit g32 (base grid)"),
              ("forget 4-bit per-channel", "4-bit per-channel"),
              ("forget 8-bit per-channel", "8-bit per-channel"),
              ("forget relearned", "relearned (held-out half)")]
    width = 0.8 / len(series)
    for ax, (obj, t) in zip(axes.flat, panels):
        rows = agg[obj][t]
        names = list(rows)
        for si, (k, label) in enumerate(series):
            xs = [i + (si - (len(series) - 1) / 2) * width for i in range(len(names))]
            ys = [rows[n][k]["mean"] for n in names]
            err = [rows[n][k]["std"] for n in names] if n_seeds > 1 else None
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=f"C{si}", label=label)
        ax.set_xticks(range(len(names)))
        capped = {n for n in names
                  if rows[n].get("reached") is not None and rows[n]["reached"] < n_seeds}
        ax.set_xticklabels([n.replace(" + ", "\n+ ").replace("null-ZO ", "null-ZO\n")
                            + ("\n(capped)" if n in capped else "") for n in names],
                           fontsize=8)
        ax.axhline(float(t), color="gray", ls=":", lw=1)
        ax.set_title(f"{obj}: stopped at forget <= {t}", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("forget-set accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8,
               frameon=False)
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(f"hyzo demo: forget accuracy before and after each attack ({seeds})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Entry point


class Log:
    """Progress as it runs: one line per event on stderr (a live line on a terminal)."""

    def __init__(self, quiet: bool = False) -> None:
        self.t0 = time.time()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._live = False

    def tick(self, msg: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write(f"\r\033[K[{time.time() - self.t0:6.1f}s] {msg}")
            sys.stderr.flush()
            self._live = True

    def line(self, msg: str) -> None:
        if self.quiet:
            return
        if self._live:
            sys.stderr.write("\r\033[K")
            self._live = False
        sys.stderr.write(f"[{time.time() - self.t0:6.1f}s] {msg}\n")
        sys.stderr.flush()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyzo.demo",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (smaller world, one target, short caps)")
    ap.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="how many seeds (seed, seed+1, ...): mean +- std (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default="out/demo", help="folder for the plot and the JSON")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the model is tiny; 0: torch's "
                         "default)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds: at least 1")
    if args.device not in ("cpu", "cuda"):
        ap.error(f"--device: cpu or cuda, got {args.device}")
    if args.device == "cuda" and not (torch.cuda.is_available() and hyzo.cuda_available()):
        print("hyzo.demo: --device cuda needs a CUDA device and a hyzo built with CUDA",
              file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    setup = Setup.tiny() if args.tiny else Setup.quick() if args.quick else Setup()
    log = Log(args.quiet)
    t_start = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed = []
    seconds = []
    for seed in seeds:
        t0 = time.time()
        per_seed.append(run_seed(seed, setup, args.device, log))
        seconds.append(time.time() - t0)
        log.line(f"seed {seed} done in {seconds[-1]:.0f} s")
    agg = aggregate(per_seed)
    n = len(seeds)
    seeds_note = "one seed" if n == 1 else f"{n} seeds, mean±std"
    print(f"\nUnlearning at lr {setup.lr:g} from an int4 base (4-bit, groups of 32), "
          f"stopped at matched forget accuracy; {seeds_note}.")
    print("Columns: forget/retain accuracy after unlearning; forget accuracy after "
          "re-quantization (4-bit g32 = the base's grid), per-channel 4-/8-bit, and after "
          f"{setup.relearn_k} AdamW relearning steps on half the forget set (held-out half); "
          "fraction of quantized values unlearning changed; mean |delta| in quantization "
          "steps; optimizer steps; forward/backward passes.")
    bases = [r["base"] for r in per_seed]
    mean = {k: sum(b[k] for b in bases) / n for k in ("accuracy", "forget", "retain",
                                                       "forget relearned")}
    print(f"\nBase (int4 checkpoint): accuracy {mean['accuracy']:.3f} (forget "
          f"{mean['forget']:.2f}, retain {mean['retain']:.2f}); relearning attack on the base "
          f"itself: held-out half {mean['forget relearned']:.2f}")
    for line in table_lines(agg, n):
        print(line)
    print("\nRows:")
    for name in ROWS:
        print(f"  {name:<16} {DESCRIPTION[name]}")
    print("\nWhat this run shows:")
    for line in verdict(agg, n):
        print("  " + line)
    results = {
        "machine": {"cpu": _cpu_name(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "hyzo": hyzo.__version__
                    if hasattr(hyzo, "__version__") else None, "device": args.device},
        "setup": {k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in setup.__dict__.items()},
        "seeds": seeds,
        "rows": DESCRIPTION,
        "mean_std": agg,
        "per_seed": per_seed,
        "verdict": verdict(agg, n),
    }
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "results.json")
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(summary_markdown(agg, bases, n)) + "\n")
    ppath = plot(agg, n, os.path.join(args.out, "robustness.png"))
    total = time.time() - t_start
    print(f"\nwrote {jpath}, summary.md (Markdown tables)" + (f" and {ppath}" if ppath else ""))
    print(f"total time {total:.0f} s ({', '.join(f'{s:.0f}' for s in seconds)} s per seed; "
          "not in results.json, which is identical run after run on one machine)")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
