"""hyzo.torch checkpoints: state dicts saved by older code still load and continue the run
bit for bit.

``fixtures/state_dicts_v1.pt`` was written by ``fixtures/make_state_dicts.py`` at commit
20f788c (``hyzo.torch`` a single module, ``FO``'s param groups holding the zeroth-order
radius under ``eps`` and Adam's epsilon under ``adam_eps``): for ZO, Hybrid and FO (two
param groups each, f32 and bf16 tensors, compensated and stochastic rounding), the
parameters after three steps, the state dict saved then (``torch.save``), and the
parameters after three more steps of that code. Loading the state dict into an optimizer
of today's code and taking the same three steps must give those parameters exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo.torch as ht  # noqa: E402

from conftest import bits  # noqa: E402
from fixtures.make_state_dicts import STEPS_AFTER, make, train  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "state_dicts_v1.pt")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved():
    return torch.load(FIXTURE)  # weights_only: plain tensors and containers


@pytest.mark.parametrize("kind", ["zo", "hybrid", "fo"])
def test_a_state_dict_of_the_single_module_loads_and_continues_bit_for_bit(saved, kind):
    entry = saved[kind]
    params = [nn.Parameter(t.clone()) for t in entry["params"]]
    opt = make(kind, params)
    opt.load_state_dict(entry["state_dict"])
    assert opt.steps == 3
    train(kind, opt, params, STEPS_AFTER)
    for p, want in zip(params, entry["after"]):
        np.testing.assert_array_equal(bits(p), bits(want))


def test_an_fo_state_dict_of_the_single_module_gets_torchs_group_keys(saved):
    """FO's groups held the unused smoothing radius as ``eps`` and Adam's epsilon as
    ``adam_eps``; loaded, they hold Adam's as ``eps``, as torch.optim.AdamW's do."""
    entry = saved["fo"]
    old = entry["state_dict"]["param_groups"]
    assert old[0]["eps"] == 1e-3 and old[0]["adam_eps"] == 1e-6  # how it was saved
    params = [nn.Parameter(t.clone()) for t in entry["params"]]
    opt = make("fo", params)
    opt.load_state_dict(entry["state_dict"])
    for g in opt.param_groups:
        assert g["eps"] == 1e-6 and "adam_eps" not in g and "directions" not in g


# --------------------------------------------------------------------------------------
# Checkpoints that must be refused, leaving the optimizer as it was


def _two_groups(kind):
    g = torch.Generator().manual_seed(1)
    ps = [nn.Parameter(torch.randn(n, generator=g)) for n in (5, 4)]
    groups = [{"params": ps[:1]}, {"params": ps[1:]}]
    if kind == "hybrid":
        return ps, ht.Hybrid(groups, lr=0.01, fo_steps=2, zo_steps=2, seed=3)
    return ps, ht.ZO(groups, lr=0.01, rule="adamw", seed=3)


def _frozen(opt):
    sd = opt.state_dict()
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            [bytes(t.numpy()) for t in sd["hyzo"]["shards"]])


@pytest.mark.parametrize("kind", ["zo", "hybrid"])
def test_shards_saved_at_different_steps_are_refused(kind):
    """Shard 0 from step 6, shard 1 from step 7: each state is valid, together they are
    no run (before, the Hybrid's loaded and its next step failed: "step 7 of the hybrid
    schedule is zeroth-order"; the ZO's loaded and went on with groups out of step)."""
    ps, opt = _two_groups(kind)
    for _ in range(6):
        opt.step(lambda: sum((p ** 2).sum() for p in ps))
    assert opt.steps == 6
    at6 = opt.state_dict()["hyzo"]["shards"][0].clone()
    opt.step(lambda: sum((p ** 2).sum() for p in ps))
    mixed = opt.state_dict()
    mixed["hyzo"]["shards"][0] = at6
    before = _frozen(opt)
    with pytest.raises(ValueError, match=r"shard 0 \(param group 0\): step 6.*shard 1 "
                       r"\(param group 1\): step 7.*all shards must agree on step, updates, "
                       "schedule position and seed"):
        opt.load_state_dict(mixed)
    assert _frozen(opt) == before and opt.steps == 7
    opt.step(lambda: sum((p ** 2).sum() for p in ps))  # still usable
    assert opt.steps == 8


def test_fo_shards_may_differ_a_group_without_gradients_is_not_stepped():
    """In FO the groups need not agree: a group whose parameters have no gradient is not
    stepped (as torch.optim skips them), so its counters lag, and such a state loads."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = ht.FO([{"params": [a]}, {"params": [b]}], lr=0.1)
    for _ in range(2):
        a.grad = torch.ones(3)
        opt.step()
    assert [s.c.stats()[0] for s in opt._shards] == [2, 0]
    opt.load_state_dict(opt.state_dict())
    assert opt.steps == 2


@pytest.mark.parametrize("fmt", [0, 2, None, "1"])
def test_a_state_dict_of_an_unknown_format_is_refused(fmt):
    ps, opt = _two_groups("zo")
    opt.step(lambda: sum((p ** 2).sum() for p in ps))
    sd = opt.state_dict()
    sd["hyzo"]["format"] = fmt
    sd["param_groups"][0]["lr"] = 0.5
    before = _frozen(opt)
    with pytest.raises(ValueError, match=f"format {fmt!r} .*reads format 1"):
        opt.load_state_dict(sd)
    assert _frozen(opt) == before
    sd["hyzo"] = [t for t in sd["hyzo"]["shards"]]
    with pytest.raises(ValueError, match="not hyzo's"):
        opt.load_state_dict(sd)
    assert _frozen(opt) == before
