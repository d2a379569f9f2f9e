"""hyzo.torch param groups: one check for a group wherever it comes from (the constructor,
add_param_group, a loaded state dict), the options that must be one for the whole model
refused when groups differ, and every other option acting on its own group only."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo.torch as ht  # noqa: E402
from conftest import bits  # noqa: E402
from fixtures.make_state_dicts import train as train_kind  # noqa: E402

torch.set_num_threads(1)


def params(n=(6, 4)):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(k, generator=g)) for k in n]


def quad(ps):
    return sum(((p.float() - 0.3) ** 2).sum() for p in ps)


def make(kind, groups, **kw):
    if kind == "zo":
        return ht.ZO(groups, lr=0.01, seed=1, **kw)
    if kind == "hybrid":
        return ht.Hybrid(groups, lr=0.01, fo_steps=2, zo_steps=2, seed=1, **kw)
    return ht.FO(groups, lr=0.01, seed=1, **kw)


def train(kind, opt, ps, steps=4):
    train_kind(kind, opt, ps, steps, quad)


def snapshot(opt):
    """What load_state_dict must leave alone when it refuses."""
    sd = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return groups, [bytes(t.numpy()) for t in sd["hyzo"]["shards"]], opt.steps


def _reason(e: BaseException) -> str:
    """The message without where it was raised ("load_state_dict: param group 0: ")."""
    return re.sub(r"^(load_state_dict: )?(param group \d+: )?", "", str(e))


# (kind, key, bad value): what the constructor refuses in a group, each to be refused
# alike in a loaded state dict.
BAD = [
    ("zo", "hybrid_alpha", 0.5),  # mixes a gradient that ZO does not compute
    ("zo", "rank", 2000),  # beyond the library's largest rank
    ("zo", "rank", 0),
    ("zo", "num_directions", -1),
    ("zo", "lr", "0.1"),  # a string is not a float
    ("zo", "betas", (0.9,)),
    ("zo", "betas", "xy"),
    ("zo", "rule", "bogus"),
    ("zo", "rule", 3),
    ("zo", "precision", "coarse"),
    ("zo", "seed", -1),
    ("zo", "global_offset", -1),
    ("zo", "eps", -1.0),  # the library's own value checks
    ("zo", "weight_decay", math.nan),
    ("zo", "adam_eps", 0.0),
    ("hybrid", "zo_lr_ratio", -1.0),
    ("hybrid", "zo_weight_decay", -1.0),
    ("hybrid", "fo_rule", "bogus"),
    ("hybrid", "hybrid_alpha", 2.0),
    ("fo", "directions", "gaussian"),  # FO has no option of zeroth-order steps
    ("fo", "eps", -1.0),
    ("fo", "weight_decay", -1.0),
]


@pytest.mark.parametrize("kind, key, bad", BAD, ids=[f"{k}-{n}-{v!r}" for k, n, v in BAD])
def test_a_loaded_group_is_checked_as_the_constructor_checks_it(kind, key, bad):
    with pytest.raises((TypeError, ValueError)) as made:
        make(kind, [{"params": params(), key: bad}])
    ps = params()
    opt = make(kind, ps)
    train(kind, opt, ps, 1)
    before = snapshot(opt)
    sd = opt.state_dict()
    sd["param_groups"][0][key] = bad
    with pytest.raises(type(made.value)) as loaded:
        opt.load_state_dict(sd)
    assert _reason(loaded.value) == _reason(made.value)
    assert str(loaded.value).startswith("load_state_dict: param group 0: ")
    assert snapshot(opt) == before  # nothing changed
    train(kind, opt, ps, 1)  # and the optimizer still works


@pytest.mark.parametrize("kind", ["zo", "hybrid", "fo"])
def test_a_group_without_trainable_parameters_is_checked_too(kind):
    """Such a group gets no C optimizer (so no check by the library's creation): it is
    checked all the same, at construction and on load."""
    frozen = [nn.Parameter(torch.zeros(3), requires_grad=False)]
    with pytest.raises(ValueError, match="lr"):
        make(kind, [{"params": params()}, {"params": frozen, "lr": -1.0}])
    opt = make(kind, [{"params": params()}, {"params": frozen}])
    before = snapshot(opt)
    sd = opt.state_dict()
    sd["param_groups"][1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(sd)
    assert snapshot(opt) == before


def test_add_param_group_runs_the_same_check():
    opt = ht.ZO(params(), lr=0.01, seed=1)
    with pytest.raises(ValueError, match="param group 1: rank"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rank": 2000})
    assert len(opt.param_groups) == 1


# --------------------------------------------------------------------------------------
# Options that are one for the whole model (read from group 0 by the step protocol)

# key -> (kind, a valid value other than the default)
MODEL_WIDE = {
    "eps": ("zo", 2e-3),
    "directions": ("zo", "rademacher"),
    "num_directions": ("zo", 2),
    "estimator": ("zo", "one_sided"),
    "seed": ("zo", 5),
    "fo_steps": ("hybrid", 3),
    "zo_steps": ("hybrid", 3),
    "rank": ("zo", 2),
}


def test_every_model_wide_option_is_tested():
    assert set(MODEL_WIDE) == set(ht.ZO._model_wide_keys) == set(ht.Hybrid._model_wide_keys)
    assert ht.FO._model_wide_keys == ("seed",)


@pytest.mark.parametrize("key", sorted(MODEL_WIDE))
def test_a_model_wide_option_that_differs_between_groups_is_refused(key):
    kind, value = MODEL_WIDE[key]
    a, b = params()
    with pytest.raises(ValueError, match=f"param group 1: {key}=.* differs from group 0"):
        make(kind, [{"params": [a]}, {"params": [b], key: value}])
    opt = make(kind, [{"params": [a]}, {"params": [b]}])
    before = snapshot(opt)
    sd = opt.state_dict()
    sd["param_groups"][1][key] = value
    with pytest.raises(ValueError, match=f"param group 1: {key}=.* differs from group 0"):
        opt.load_state_dict(sd)
    assert snapshot(opt) == before
    # The same value in every group is accepted.
    make(kind, [{"params": [a], key: value}, {"params": [b], key: value}])


# --------------------------------------------------------------------------------------
# Options of one group

# kind -> {key: (value, extra options of both runs)}: each value differs from the default
# enough to change a run (checked), with the options that make it matter.
PER_GROUP = {
    "zo": {"lr": (0.05, {}), "weight_decay": (0.1, {}), "rule": ("sgd", {"rule": "adamw"}),
           "betas": ((0.5, 0.9), {"rule": "adamw"}), "adam_eps": (0.1, {"rule": "adamw"}),
           "precision": ("stochastic", {}), "global_offset": (1000, {})},
    "hybrid": {"lr": (0.05, {}), "weight_decay": (0.1, {}), "fo_rule": ("sgd", {}),
               "zo_rule": ("sign", {}), "zo_lr_ratio": (3.0, {}),
               "zo_weight_decay": (0.2, {}), "betas": ((0.5, 0.9), {}),
               "adam_eps": (0.1, {}), "precision": ("stochastic", {}),
               "hybrid_alpha": (0.5, {}), "global_offset": (1000, {})},
    "fo": {"lr": (0.05, {}), "weight_decay": (3.0, {}), "rule": ("sgd", {}),
           "betas": ((0.5, 0.9), {}), "eps": (0.1, {}), "precision": ("stochastic", {}),
           "global_offset": (1000, {"precision": "stochastic"})},
}


# Options a kind of optimizer holds at one value only (tested above with the other bad ones).
FIXED = {"zo": {"hybrid_alpha"}, "hybrid": set(), "fo": set()}


@pytest.mark.parametrize("kind", sorted(PER_GROUP))
def test_every_option_of_a_group_is_model_wide_or_tested_per_group(kind):
    opt = make(kind, params())
    keys = set(opt.param_groups[0]) - {"params"}
    assert keys == set(type(opt)._model_wide_keys) | set(PER_GROUP[kind]) | FIXED[kind]


CASES = [(kind, key) for kind in sorted(PER_GROUP) for key in sorted(PER_GROUP[kind])]


@pytest.mark.parametrize("kind, key", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_an_option_of_group_1_acts_on_group_1_alone(kind, key):
    """Group 1 with ``key`` set, next to a group 0 with the defaults, takes exactly the
    steps of an optimizer of group 1's parameters alone with that setting (the loss reads
    group 1's parameters only, at the same global offsets, in bf16 so that the rounding
    mode shows), and not those of the default: the option is group 1's, not group 0's."""
    value, extra = PER_GROUP[kind][key]

    def group1():
        return [nn.Parameter(t.to(torch.bfloat16)) for t in params((5, 3))]

    def alone(setting):
        ps = group1()
        # Group 0 holds elements 0..6 in the run of both.
        opt = make(kind, [{"params": ps, "global_offset": 6, **setting}], **extra)
        train(kind, opt, ps)
        return ps

    zero, ps = params((6,)), group1()
    both = make(kind, [{"params": zero}, {"params": ps, key: value}], **extra)
    train(kind, both, ps)
    want, default = alone({key: value}), alone({})
    for p, q in zip(ps, want):
        np.testing.assert_array_equal(bits(p), bits(q))
    assert any(not np.array_equal(bits(p), bits(q)) for p, q in zip(ps, default))
