"""What is compared: the optimizers (every one through ``hyzo.torch``) and the three
controls that decide what the result may claim, and the unlearning run each goes through,
stopped at each forget target."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional

import torch
import torch.nn as nn

import hyzo.torch as hzt

from .model import accuracy, answer_logprob
from .world import World

if TYPE_CHECKING:  # the experiment imports this module
    from .experiment import Log, Setup

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
    # No run has weight decay (Hybrid's and ZO's default; FO's is AdamW's 1e-2): the
    # optimizers differ in their updates only.
    if name == ADAMW:
        return hzt.FO(params, rule="adamw", weight_decay=0.0, **common)
    if name == SIGNUM:
        return hzt.FO(params, rule="signum", weight_decay=0.0, **common)
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


def displaced(base: nn.Module, src: Optional[Snapshot], std: float, setup: "Setup",
              seed: int) -> nn.Module:
    """Controls (a) and (c): the model of ``src`` (None: the base) after ONE seeded Gaussian
    displacement of every weight with RMS ``std``, applied by hyzo's own perturbation pass
    (``perturb_``)."""
    m = copy.deepcopy(base)
    if src is not None:
        m.load_state_dict(src.state)
    opt = make_optimizer(ADAMW, m.parameters(), setup, seed)
    # One displacement, named by its own seed (not one of the hybrid's).
    opt.perturb_(std, seed=1_000_003 + seed)
    return m
