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
