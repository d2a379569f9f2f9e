"""hyzo.torch.FO as a drop-in for torch.optim.AdamW: the same arguments, defaults and param
group keys, the earlier spelling of Adam's epsilon still read, and the same trajectory as
torch.optim.AdamW step for step on float32 parameters."""

from __future__ import annotations

import inspect
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo.torch as ht  # noqa: E402

torch.set_num_threads(1)

F32_ROUNDING = 2.0**-23


def test_arguments_and_defaults_are_adamws():
    ours = inspect.signature(ht.FO).parameters
    theirs = inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "betas", "eps", "weight_decay"):
        assert ours[name].default == theirs[name].default, name
    assert list(ours)[:5] == list(theirs)[:5]  # params, lr, betas, eps, weight_decay


def test_param_groups_hold_torchs_keys():
    p = nn.Parameter(torch.zeros(4))
    g = ht.FO([p], eps=1e-6).param_groups[0]
    assert g["eps"] == 1e-6 and g["weight_decay"] == 1e-2 and g["betas"] == (0.9, 0.999)
    assert "adam_eps" not in g and "directions" not in g and "num_directions" not in g
    ref = torch.optim.AdamW([nn.Parameter(torch.zeros(4))], eps=1e-6).param_groups[0]
    assert {k: g[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        k: ref[k] for k in ("lr", "betas", "eps", "weight_decay")}


def test_the_earlier_group_key_adam_eps_still_works_with_a_warning():
    p, q = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    with pytest.warns(DeprecationWarning, match="adam_eps"):
        opt = ht.FO([{"params": [p], "adam_eps": 1e-4}])
    assert opt.param_groups[0]["eps"] == 1e-4 and "adam_eps" not in opt.param_groups[0]
    with pytest.warns(DeprecationWarning, match="adam_eps"):
        opt.add_param_group({"params": [q], "adam_eps": 1e-5})
    assert opt.param_groups[1]["eps"] == 1e-5
    with pytest.raises(ValueError, match="adam_eps"):
        ht.FO([{"params": [nn.Parameter(torch.zeros(2))], "eps": 1e-6, "adam_eps": 1e-4}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns of nothing
        ht.FO([{"params": [nn.Parameter(torch.zeros(2))], "eps": 1e-6}])


@pytest.mark.parametrize("key, value", [("directions", "gaussian"), ("num_directions", 2),
                                        ("estimator", "one_sided"), ("hybrid_alpha", 0.5),
                                        ("fo_steps", 3), ("rank", 2)])
def test_options_of_zeroth_order_steps_are_refused(key, value):
    with pytest.raises(ValueError, match=f"{key}: options of zeroth-order steps"):
        ht.FO([{"params": [nn.Parameter(torch.zeros(2))], key: value}])


def _bound(k: int, largest: torch.Tensor, lr: float) -> torch.Tensor:
    """How far apart k steps of two roundings of the same update may drift: 8 float32
    roundings per step of the parameter (at the largest it has been) and of the step
    (measured: under 4)."""
    return 8 * k * F32_ROUNDING * (largest + lr)


def test_step_for_step_against_torch_adamw():
    """Two param groups with their own lr, betas, eps and weight decay, gradients over five
    orders of magnitude (where eps matters and where it does not), a change of lr and eps
    half way as a scheduler makes: after every step each parameter is within a few float32
    roundings per step of torch.optim.AdamW's. Not bit for bit: hyzo computes
    θ − η (m̂ / (√v̂ + ε) + λθ) in f32 (the bias corrections from f64), torch
    θ (1 − ηλ) − (η / (1 − β1^t)) m / (√v / √(1 − β2^t) + ε), the same update rounded in
    another order. A different update (ε added elsewhere, decay coupled, a wrong bias
    correction) moves a parameter by a fraction of lr per step, far outside the bound."""
    g = torch.Generator().manual_seed(3)
    shapes = [(32, 16), (300,), (7, 5)]
    start = [torch.randn(s, generator=g) for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start]

    def groups(ps):
        return [{"params": ps[:2]},
                {"params": ps[2:], "lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6,
                 "weight_decay": 0.1}]

    largest = [t.abs() for t in start]
    opt = ht.FO(groups(ours), lr=1e-3)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-3, foreach=False)
    for k in range(1, 61):
        if k == 31:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 3e-3
                o.param_groups[1]["eps"] = 1e-4
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** float(
                torch.randint(-4, 2, (1,), generator=g))
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for i, (p, q, gi) in enumerate(zip(ours, theirs, (0, 0, 1))):
            lr = ref.param_groups[gi]["lr"]
            largest[i] = torch.maximum(largest[i], q.detach().abs())
            gap = (p.detach() - q.detach()).abs()
            bound = _bound(k, largest[i], lr)
            assert bool((gap <= bound).all()), (k, i, float((gap / bound).max()))
