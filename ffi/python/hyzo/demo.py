"""The paper's robustness experiment in miniature: ``python -m hyzo.demo``.

"Downgrade to Upgrade" (Lang et al., arXiv 2510.00761) finds that unlearning with
downgraded optimizers (zeroth-order, sign-compressed, and a hybrid of first-order and
zeroth-order blocks) is harder to undo by weight quantization and by relearning. This demo
runs a TOFU-style experiment at laptop scale, every optimizer through ``hyzo.torch``:

1. invents a few hundred people with attributes (city, job, colour, pet) from a seed, and a
   word-level tokenizer for the facts ("<first> <last> lives_in <city>");
2. trains a small causal transformer with AdamW until it reproduces the facts;
3. unlearns the forget set (10% of the people) with GradDiff and with NPO, each with AdamW,
   Signum, zeroth-order AdaZO and the hybrid; every run gets the same number of optimizer
   steps, and each optimizer's learning rate is chosen on the forget/retain trade-off only;
4. attacks each unlearned model: 8-bit and 4-bit round-to-nearest quantization per output
   channel, and relearning (K AdamW steps on half the forget set, evaluated on the other
   half and on all of it);
5. prints a table per method, writes a PNG plot and a JSON file of all figures.

The result is what it is: the demo does not tune the attacks or the optimizers to make any
method win, and it prints plainly whether ZO or hybrid came out more robust at this scale.
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


@dataclass
class World:
    """The invented facts, the vocabulary and the forget/retain split."""

    vocab: list[str]
    facts: torch.Tensor  # [n_facts, 5] token ids: BOS first last relation value
    person: torch.Tensor  # [n_facts] person index
    forget: torch.Tensor  # bool mask over facts
    n_people: int
    index: dict[str, int] = field(default_factory=dict)


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
    with torch.no_grad():
        pred = answer_logits(model, facts).argmax(-1)
    return (pred == facts[:, 4]).float().mean().item()


def answer_loss(model: nn.Module, facts: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the value token: what unlearning and relearning act on."""
    return F.cross_entropy(answer_logits(model, facts), facts[:, 4])


def answer_logprob(model: nn.Module, facts: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(answer_logits(model, facts), -1).gather(1, facts[:, 4:5]).squeeze(1)


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.n, self.t0 = total, label, 0, time.time()
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, k: int = 1, note: str = "") -> None:
        self.n += k
        if self.enabled:
            w = 30
            full = int(w * self.n / max(1, self.total))
            bar = "#" * full + "." * (w - full)
            el = time.time() - self.t0
            sys.stderr.write(f"\r{self.label:<28} [{bar}] {self.n}/{self.total} {el:5.1f}s {note}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
        else:
            print(f"{self.label}: done in {time.time() - self.t0:.1f}s", file=sys.stderr)


def pretrain(world: World, max_steps: int, seed: int) -> tuple[TinyLM, float, int]:
    """AdamW on every token until every fact is reproduced, then as many steps again."""
    torch.manual_seed(seed)
    model = TinyLM(len(world.vocab)).to(world.facts.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    bar = Progress(max_steps, "pretraining (AdamW)")
    acc, stop, s = 0.0, max_steps, 0
    while s < stop:
        opt.zero_grad()
        loss = lm_loss(model, world.facts)
        loss.backward()
        opt.step()
        s += 1
        if s % 25 == 0:
            acc = accuracy(model, world.facts)
            bar.update(25, f"loss {loss.item():.3f} acc {acc:.3f}")
            if acc == 1.0 and stop == max_steps:
                stop = min(max_steps, 2 * s)
    bar.close()
    return model, accuracy(model, world.facts), s


# ---------------------------------------------------------------------------------------
# Unlearning objectives


def graddiff_loss(model, ref, forget, retain):
    return -answer_loss(model, forget) + answer_loss(model, retain)


def npo_loss(model, ref, forget, retain, beta: float = 0.5):
    with torch.no_grad():
        ref_lp = answer_logprob(ref, forget)
    ratio = answer_logprob(model, forget) - ref_lp
    npo = -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()
    return npo + answer_loss(model, retain)


OBJECTIVES = {"GradDiff": graddiff_loss, "NPO": npo_loss}


@dataclass
class OptimizerSpec:
    name: str
    lrs: list[float]
    make: object  # (params, lr) -> optimizer
    kind: str  # "fo", "zo" or "hybrid"


def optimizer_specs(q: int, seed: int, block: int) -> list[OptimizerSpec]:
    return [
        OptimizerSpec(
            "AdamW (FO)",
            [1e-4, 3e-4, 1e-3],
            lambda p, lr: hzt.FO(p, lr=lr, rule="adamw"),
            "fo",
        ),
        OptimizerSpec(
            "Signum (FO, sign)",
            [1e-4, 3e-4, 1e-3],
            lambda p, lr: hzt.FO(p, lr=lr, rule="signum"),
            "fo",
        ),
        OptimizerSpec(
            f"ZO AdaZO (q={q})",
            [1e-4, 3e-4, 1e-3, 3e-3],
            lambda p, lr: hzt.ZO(
                p, lr=lr, eps=1e-3, rule="adazo", num_directions=q, seed=seed
            ),
            "zo",
        ),
        OptimizerSpec(
            f"Hybrid AdamW {block}FO/{block}ZO",
            [1e-4, 3e-4, 1e-3, 3e-3],
            lambda p, lr: hzt.Hybrid(
                p,
                lr=lr,
                eps=1e-3,
                rule="adamw",
                fo_steps=block,
                zo_steps=block,
                num_directions=q,
                seed=seed,
            ),
            "hybrid",
        ),
    ]


@dataclass
class Budget:
    steps: int = 0
    forwards: int = 0
    backwards: int = 0
    seconds: float = 0.0


def unlearn(base, world, objective, spec: OptimizerSpec, lr: float, steps: int, seed: int):
    """`steps` optimizer steps on the whole forget set and a retain minibatch of the same size
    (drawn per step from `seed`, the same batches for every optimizer)."""
    model = copy.deepcopy(base)
    ref = base
    forget = world.facts[world.forget]
    retain = world.facts[~world.forget]
    opt = spec.make(model.parameters(), lr)
    budget = Budget()
    batches = torch.Generator().manual_seed(seed)
    t0 = time.time()

    for _ in range(steps):
        retain_batch = retain[torch.randint(len(retain), (len(forget),), generator=batches)]

        def closure(batch=retain_batch):
            budget.forwards += 1
            loss = objective(model, ref, forget, batch)
            if torch.is_grad_enabled():
                budget.backwards += 1
            return loss

        if spec.kind == "fo":
            opt.zero_grad()
            loss = closure()
            loss.backward()
            opt.step()
        else:
            opt.zero_grad()
            opt.step(closure)
        budget.steps += 1
    budget.seconds = time.time() - t0
    return model, budget


def quantize(model: nn.Module, bits: int) -> nn.Module:
    """Round-to-nearest, symmetric, per output channel, on every weight matrix."""
    q = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
                p.copy_(torch.round(p / scale).clamp(-levels, levels) * scale)
    return q


def relearn_curve(model, world, ks: list[int], lr: float, seed: int):
    """Forget accuracy after K AdamW steps on half the forget set: (held-out half, all)."""
    forget_ids = torch.nonzero(world.forget).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    perm = forget_ids[torch.randperm(len(forget_ids), generator=g)]
    half = len(perm) // 2
    train_ids, held_ids = perm[:half], perm[half:]
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    held, all_forget = world.facts[held_ids], world.facts[forget_ids]
    curve = []
    done = 0
    for k in sorted(ks):
        while done < k:
            opt.zero_grad()
            answer_loss(m, world.facts[train_ids]).backward()
            opt.step()
            done += 1
        curve.append((k, accuracy(m, held), accuracy(m, all_forget)))
    return curve


def select_lr(base, world, objective, spec, steps, floor, seed):
    """The learning rate with the best forget/retain trade-off (no attack is looked at)."""
    best = None
    for lr in spec.lrs:
        model, budget = unlearn(base, world, objective, spec, lr, steps, seed)
        fa = accuracy(model, world.facts[world.forget])
        ra = accuracy(model, world.facts[~world.forget])
        # Forget as much as possible while keeping most of the retain accuracy.
        score = (1.0 - fa) + 2.0 * min(ra, floor) + 0.1 * ra
        if best is None or score > best[0]:
            best = (score, lr, model, budget, fa, ra)
    return best[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyzo.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/demo", help="folder for the plot and the JSON")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the model is tiny; 0: all)")
    args = ap.parse_args(argv)
    t_start = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device not in ("cpu", "cuda"):
        ap.error(f"--device: cpu or cuda, got {args.device}")
    if args.device == "cuda" and not (torch.cuda.is_available() and hyzo.cuda_available()):
        print("hyzo.demo: --device cuda needs a CUDA device and a hyzo built with CUDA",
              file=sys.stderr)
        return 2
    quick = args.quick
    n_people = 60 if quick else 150
    pre_steps = 300 if quick else 600
    steps = 30 if quick else 80
    ks = [0, 10, 30] if quick else [0, 10, 25, 50, 100, 200]
    q = 4
    world = make_world(n_people, args.seed, args.device)
    n_forget = int(world.forget.sum())
    print(f"world: {n_people} invented people, {len(world.facts)} facts, vocabulary "
          f"{len(world.vocab)} words; forget set {n_forget} facts "
          f"({world.forget.float().mean():.0%} of the people)")
    base, acc, pre_done = pretrain(world, pre_steps, args.seed)
    fa0 = accuracy(base, world.facts[world.forget])
    ra0 = accuracy(base, world.facts[~world.forget])
    print(f"pretrained: {pre_done} AdamW steps, accuracy {acc:.3f} (forget {fa0:.3f}, "
          f"retain {ra0:.3f})")
    if acc < 0.9:
        print("warning: the model did not memorise the facts well; results are less telling")
    specs = optimizer_specs(q, args.seed, block=5 if quick else 10)
    if quick:
        for s in specs:
            s.lrs = s.lrs[1:2]
    results: dict = {
        "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "config": {"people": n_people, "facts": len(world.facts), "forget_facts": n_forget,
                   "unlearning_steps": steps, "num_directions": q, "relearn_ks": ks,
                   "quick": quick, "seed": args.seed},
        "pretrained": {"accuracy": acc, "forget": fa0, "retain": ra0, "steps": pre_done},
        "methods": {},
    }
    total_runs = len(OBJECTIVES) * len(specs)
    bar = Progress(total_runs, "unlearning + attacks")
    for obj_name, objective in OBJECTIVES.items():
        rows = {}
        for spec in specs:
            lr, model, budget, fa, ra = select_lr(base, world, objective, spec, steps, 0.8 * ra0,
                                                  args.seed)
            q8 = quantize(model, 8)
            q4 = quantize(model, 4)
            curve = relearn_curve(model, world, ks, lr=1e-3, seed=args.seed)
            rows[spec.name] = {
                "lr": lr,
                "forget_acc": fa,
                "retain_acc": ra,
                "forget_acc_q8": accuracy(q8, world.facts[world.forget]),
                "retain_acc_q8": accuracy(q8, world.facts[~world.forget]),
                "forget_acc_q4": accuracy(q4, world.facts[world.forget]),
                "retain_acc_q4": accuracy(q4, world.facts[~world.forget]),
                "relearn": [{"k": k, "held_out": h, "all": a} for k, h, a in curve],
                "budget": budget.__dict__,
            }
            bar.update(1, f"{obj_name} / {spec.name}")
        results["methods"][obj_name] = rows
    bar.close()
    results["seconds"] = time.time() - t_start
    _print_tables(results, ks)
    _verdict(results, ks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot = _plot(results, os.path.join(args.out, "relearning.png"))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + (f" and {plot}" if plot else ""))
    print(f"total time {results['seconds']:.0f} s")
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


def _print_tables(results: dict, ks: list[int]) -> None:
    pre = results["pretrained"]
    for obj, rows in results["methods"].items():
        print(f"\n{obj}  (before unlearning: forget {pre['forget']:.2f}, retain {pre['retain']:.2f};"
              f" {results['config']['unlearning_steps']} optimizer steps each)")
        kcols = "".join(f"  {'K=' + str(k):<9}" for k in ks if k > 0)
        print(f"  {'optimizer':<26} {'lr':>7}  forget retain   q8 fgt  q4 fgt {kcols}  fwd/bwd    time")
        for name, r in rows.items():
            rel = "".join(f"  {e['held_out']:.2f}/{e['all']:.2f}" for e in r["relearn"] if e["k"] > 0)
            b = r["budget"]
            print(f"  {name:<26} {r['lr']:>7.0e}  {r['forget_acc']:.2f}   {r['retain_acc']:.2f}"
                  f"     {r['forget_acc_q8']:.2f}    {r['forget_acc_q4']:.2f} {rel}"
                  f"  {b['forwards']}/{b['backwards']}  {b['seconds']:5.1f}s")
    print("\n  forget/retain: answer accuracy after unlearning; q8/q4 fgt: forget accuracy after"
          " 8-/4-bit quantization;\n  K=...: forget accuracy after K AdamW relearning steps on"
          " half of the forget set, as held-out half / whole forget set.")


def _verdict(results: dict, ks: list[int]) -> None:
    """Says plainly which optimizer family resisted the attacks better, at this scale."""
    print("\nrobustness at this scale (mean over GradDiff and NPO; lower forget accuracy after"
          " an attack is more robust):")
    names = list(next(iter(results["methods"].values())).keys())
    summary = {}
    for name in names:
        rows = [results["methods"][o][name] for o in results["methods"]]
        q4 = sum(r["forget_acc_q4"] for r in rows) / len(rows)
        kmax = max(ks)
        rel = sum(next(e["all"] for e in r["relearn"] if e["k"] == kmax) for r in rows) / len(rows)
        base = sum(r["forget_acc"] for r in rows) / len(rows)
        kept = sum(r["retain_acc"] for r in rows) / len(rows)
        summary[name] = (base, q4, rel, kept)
        print(f"  {name:<26} forget {base:.2f}  retain {kept:.2f}   after 4-bit {q4:.2f}"
              f"   after K={kmax} relearning {rel:.2f}")
    fo = [v for n, v in summary.items() if n.startswith("AdamW")][0]
    for n, v in summary.items():
        if n.startswith("ZO") or n.startswith("Hybrid"):
            better_q = v[1] < fo[1] - 0.02
            better_r = v[2] < fo[2] - 0.02
            worse_unlearn = v[0] > fo[0] + 0.05
            verdict = ("more robust than AdamW to " + " and ".join(
                w for w, b in (("quantization", better_q), ("relearning", better_r)) if b)
                if better_q or better_r else "not more robust than AdamW")
            caveats = []
            if worse_unlearn:
                caveats.append("it also forgot less before any attack")
            if v[3] < fo[3] - 0.1:
                caveats.append(f"it kept less of the retain set ({v[3]:.2f} against {fo[3]:.2f})")
            if caveats:
                verdict += " (" + "; ".join(caveats) + ")"
            print(f"  -> {n}: {verdict}")
    results["summary"] = {n: {"forget": v[0], "forget_q4": v[1], "forget_relearn": v[2],
                              "retain": v[3]} for n, v in summary.items()}


def _plot(results: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    objs = list(results["methods"])
    fig, axes = plt.subplots(1, len(objs), figsize=(6 * len(objs), 4.2), sharey=True)
    for ax, obj in zip(axes, objs):
        for i, (name, r) in enumerate(results["methods"][obj].items()):
            ks = [e["k"] for e in r["relearn"]]
            color = f"C{i}"
            ax.plot(ks, [e["held_out"] for e in r["relearn"]], marker="o", color=color,
                    label=f"{name}: held-out half")
            ax.plot(ks, [e["all"] for e in r["relearn"]], ls="--", color=color, alpha=0.6,
                    label=f"{name}: whole forget set")
        ax.axhline(results["pretrained"]["forget"], color="gray", ls=":", lw=1,
                   label="before unlearning")
        ax.set_title(f"{obj}: relearning attack")
        ax.set_xlabel("relearning steps K (AdamW on half the forget set)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forget-set accuracy")
    axes[-1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle("hyzo demo: forget accuracy under relearning, per unlearning optimizer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
