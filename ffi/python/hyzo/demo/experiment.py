"""The experiment of one seed, what sizes it, and its progress log."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass

from .attacks import BASE_SCHEME, measure, quantized, relearn
from .controls import (ADAMW, HYBRID, NOISE_ADAMW, NOISE_BASE, NULL_ZO, ROWS, SIGNUM, ZO,
                       displaced, unlearn)
from .model import accuracy, pretrain
from .objectives import OBJECTIVES
from .world import make_world


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
                    std = snaps[HYBRID][ti].zo_rms or 0.0
                    m = displaced(base, src, std, setup, seed)
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
