"""hyzo.torch (ZO, Hybrid, FO) on CPU tensors, checked bit for bit against hyzo.Optimizer
(the Rust optimizer through the C ABI on numpy arrays) and against torch conventions."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import tempfile
from typing import List

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import hyzo  # noqa: E402
import hyzo.torch as ht  # noqa: E402
from conftest import bits  # noqa: E402
from fixtures.make_state_dicts import train as train_kind  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# helpers


def make_params(dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 2)]
    return [nn.Parameter(torch.randn(s, generator=g).to(d))
            for s, d in zip(itertools.cycle(shapes), dtypes)]


class Mirror:
    """numpy copies of torch tensors (for hyzo.Optimizer), with torch views sharing their
    memory, so the same torch loss function runs on both sides (identical losses)."""

    def __init__(self, tensors: List[torch.Tensor]) -> None:
        self.arrays, self.views = [], []
        for t in tensors:
            t = t.detach()
            if t.dtype == torch.bfloat16:
                a = t.view(torch.int16).numpy().copy().view(BF16)
                v = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                a = t.numpy().copy()
                v = torch.from_numpy(a)
            self.arrays.append(a)
            self.views.append(v.view(t.shape))
        self.grads = [np.zeros(a.shape, dtype=a.dtype) for a in self.arrays]
        self.grad_views = [Mirror._view(g, v.dtype).view(v.shape)
                           for g, v in zip(self.grads, self.views)]

    @staticmethod
    def _view(a: np.ndarray, dtype) -> torch.Tensor:
        if dtype == torch.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def fill_grads(self, loss_fn) -> None:
        """Writes d loss / d views into the numpy gradient arrays (same torch maths)."""
        leaves = [v.detach().clone().requires_grad_(True) for v in self.views]
        loss_fn(leaves).backward()
        for gv, leaf in zip(self.grad_views, leaves):
            gv.copy_(leaf.grad)


def quad_loss(ps: List[torch.Tensor]) -> torch.Tensor:
    total = None
    for i, p in enumerate(ps):
        term = ((p.float() - 0.3 * (i + 1)) ** 2).sum() * (1.0 + 0.5 * i)
        total = term if total is None else total + term
    return total


def assert_restored(ts: List[torch.Tensor], before: List[torch.Tensor]) -> None:
    """Restored after perturbations: equal up to the rounding of each pass (one ulp)."""
    for t, b in zip(ts, before):
        rtol = 1e-6 if t.dtype == torch.float32 else 1e-2
        np.testing.assert_allclose(t.detach().float().numpy(), b.float().numpy(), rtol=rtol,
                                   atol=0)


def assert_same(ts: List[torch.Tensor], arrays: List[np.ndarray]) -> None:
    for t, a in zip(ts, arrays):
        np.testing.assert_array_equal(bits(t), bits(a).reshape(tuple(t.shape)))


# --------------------------------------------------------------------------------------
# ZO against the numpy optimizer: every option


ZO_CASES = (
    [dict(rule=r) for r in ["sgd", "momentum", "sign", "signum", "adamw", "adazo"]]
    + [dict(directions=d, rule="adamw") for d in ["rademacher", "sphere"]]
    + [dict(estimator="one_sided", num_directions=3),
       dict(num_directions=2, weight_decay=0.1, betas=(0.8, 0.99)),
       dict(precision="stochastic"), dict(precision="compensated", rule="adamw")]
)


@pytest.mark.parametrize("opts", ZO_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_zo_matches_numpy_optimizer(opts):
    params = make_params()
    mirror = Mirror(params)
    kw = dict(lr=0.01, eps=1e-2, seed=123, **opts)
    opt = ht.ZO(params, **kw)
    ref = hyzo.Optimizer(mirror.arrays, **kw)
    for _ in range(5):
        got = opt.step(lambda: quad_loss(params))
        want = ref.step(lambda: float(quad_loss(mirror.views)))
        assert got.dtype == torch.float32 and got.dim() == 0
        assert float(got) == pytest.approx(want, rel=1e-6)
    assert_same(params, mirror.arrays)
    assert opt.steps == 5 and opt.skipped == 0


def test_param_groups_match_separate_optimizers():
    params = make_params()
    mirror = Mirror(params)
    opt = ht.ZO([{"params": params[:2], "lr": 0.05, "rule": "momentum"},
                 {"params": params[2:], "rule": "adamw", "weight_decay": 0.2}],
                lr=0.01, eps=1e-2, seed=9, num_directions=2)
    n01 = params[0].numel() + params[1].numel()
    common = dict(eps=1e-2, seed=9, num_directions=2)
    r0 = hyzo.Optimizer(mirror.arrays[:2], lr=0.05, rule="momentum", **common)
    r1 = hyzo.Optimizer([(mirror.arrays[2], n01)], lr=0.01, rule="adamw", weight_decay=0.2,
                        **common)
    for _ in range(4):
        opt.step(lambda: quad_loss(params))
        r0.begin()
        r1.begin()
        while True:
            loss = float(quad_loss(mirror.views))
            more0, more1 = r0.feed(loss), r1.feed(loss)
            assert more0 == more1
            if not more0:
                break
    assert_same(params, mirror.arrays)


def test_sharded_in_one_process_equals_unsharded():
    """Flat shards with explicit global offsets perturb like the unsharded vector."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(101, generator=g).requires_grad_()
    a, b = full[:40].detach().clone().requires_grad_(), full[40:].detach().clone().requires_grad_()
    kw = dict(lr=0.01, eps=1e-2, seed=4, rule="adamw", num_directions=2)
    o_full = ht.ZO([full], **kw)
    o_shard = ht.ZO([{"params": [b], "global_offset": 40}, {"params": [ht.Shard(a, 0)]}], **kw)
    target = torch.linspace(-1, 1, 101)
    for _ in range(5):
        o_full.step(lambda: ((full - target) ** 2).sum())
        o_shard.step(lambda: ((torch.cat([a, b]) - target) ** 2).sum())
    np.testing.assert_array_equal(bits(full), bits(torch.cat([a.detach(), b.detach()])))


def test_sphere_over_two_groups_uses_the_global_norm():
    params = make_params((torch.float32, torch.float32))
    mirror = Mirror(params)
    kw = dict(lr=0.01, eps=1e-2, seed=8, directions="sphere", num_directions=2)
    opt = ht.ZO([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], **kw)
    ref = hyzo.Optimizer(mirror.arrays, **kw)
    for _ in range(3):
        opt.step(lambda: quad_loss(params))
        ref.step(lambda: float(quad_loss(mirror.views)))
    for t, a in zip(params, mirror.arrays):
        np.testing.assert_allclose(t.detach().numpy(), a, rtol=1e-5, atol=1e-6)


def test_returned_loss():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    one = ht.ZO([p], lr=0.0, estimator="one_sided", num_directions=2, seed=0)
    seen = []

    def closure():
        loss = (p ** 2).sum()
        seen.append(float(loss))
        return loss

    out = one.step(closure)
    assert len(seen) == 3 and float(out) == seen[0] == 5.0
    seen.clear()
    two = ht.ZO([p], lr=0.0, num_directions=2, seed=0)
    out = two.step(closure)
    assert len(seen) == 4 and float(out) == pytest.approx(np.mean(seen), rel=1e-6)
    assert two.step(lambda: 3.0).item() == 3.0  # a float loss works too


# --------------------------------------------------------------------------------------
# Hybrid and FO against the numpy optimizer


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_hybrid_matches_numpy_optimizer(alpha):
    params = make_params()
    mirror = Mirror(params)
    kw = dict(lr=0.01, eps=1e-2, seed=77, rule="adamw", fo_steps=2, zo_steps=3,
              hybrid_alpha=alpha)
    opt = ht.Hybrid(params, **kw)
    ref = hyzo.Optimizer(mirror.arrays, grads=mirror.grads, **kw)
    phases = []
    for _ in range(10):
        phase = opt.next_phase()
        assert phase == ref.next_phase()
        phases.append(phase)
        opt.step(lambda: quad_loss(params))
        if phase == "fo" or alpha > 0:
            mirror.fill_grads(quad_loss)
        if phase == "fo":
            ref.fo_step()
        else:
            ref.step(lambda: float(quad_loss(mirror.views)))
        assert_same(params, mirror.arrays)
    assert phases == ["fo", "fo", "zo", "zo", "zo"] * 2
    # The registered gradient buffers are the parameters' .grad.
    for p in params:
        assert p.grad is not None and p.grad.dtype == p.dtype


@pytest.mark.parametrize("rule", ["adamw", "adazo", "sgd", "momentum", "sign", "signum"])
def test_fo_matches_numpy_optimizer(rule):
    params = make_params()
    mirror = Mirror(params)
    opt = ht.FO(params, lr=0.01, rule=rule, weight_decay=0.01)
    ref = hyzo.Optimizer(mirror.arrays, grads=mirror.grads, lr=0.01, rule=rule,
                         weight_decay=0.01, adam_eps=1e-8)
    for i in range(4):
        opt.zero_grad()
        quad_loss(params).backward()
        opt.step()
        mirror.fill_grads(quad_loss)
        ref.fo_step()
    assert_same(params, mirror.arrays)


def test_fo_closure_and_set_to_none_grads():
    """torch conventions: step(closure) with backward inside; model.zero_grad() (which sets
    .grad to None) between steps still works."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    opt = ht.FO(model.parameters(), lr=0.05)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(50):
        model.zero_grad(set_to_none=True)
        loss = opt.step(closure)
    assert float(loss.detach()) < first
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for p in model.parameters():
        assert p.grad is not None


def test_zero_grad_keeps_registered_buffers():
    params = make_params()
    opt = ht.Hybrid(params, fo_steps=1, zo_steps=1, seed=0)
    bufs = [p.grad for p in params]
    quad_loss(params).backward()
    opt.zero_grad()
    for p, b in zip(params, bufs):
        assert p.grad is b and not p.grad.any()


# --------------------------------------------------------------------------------------
# state_dict, schedulers


def _train(opt, params, steps, scheduler=None):
    for _ in range(steps):
        opt.step(lambda: quad_loss(params))
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("kind", ["zo", "hybrid", "fo"])
def test_state_dict_round_trip(kind):
    def make(params, seed):
        if kind == "zo":
            return ht.ZO(params, lr=0.01, eps=1e-2, rule="adamw", precision="compensated",
                         seed=seed, num_directions=2)
        if kind == "hybrid":
            return ht.Hybrid(params, lr=0.01, eps=1e-2, fo_steps=2, zo_steps=2, seed=seed,
                             precision="stochastic")
        return ht.FO(params, lr=0.01, rule="adamw")

    def train(opt, params, steps):
        train_kind(kind, opt, params, steps, quad_loss)

    pa = make_params()
    oa = make(pa, seed=1)
    sched = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    for _ in range(3):
        train(oa, pa, 1)
        sched.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in pa], "opt": oa.state_dict(),
                "sched": sched.state_dict()}, buf)
    for _ in range(5):
        train(oa, pa, 1)
        sched.step()

    buf.seek(0)
    saved = torch.load(buf)  # weights_only (the default): plain tensors and containers
    pb = [nn.Parameter(t.clone()) for t in saved["params"]]
    ob = make(pb, seed=999)  # the seed (and the rest) come from the state dict
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    ob.load_state_dict(saved["opt"])
    sb.load_state_dict(saved["sched"])
    assert ob.steps == 3
    for _ in range(5):
        train(ob, pb, 1)
        sb.step()
    for a, b in zip(pa, pb):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]


def test_state_dict_errors():
    params = make_params()
    opt = ht.ZO(params, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="hyzo"):
        opt.load_state_dict({"state": {}, "param_groups": opt.state_dict()["param_groups"]})
    opt.step(lambda: quad_loss(params))
    sd = opt.state_dict()
    sd["hyzo"]["shards"][0] = torch.zeros(10, dtype=torch.uint8)
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="state"):
        opt.load_state_dict(sd)
    # Nothing was half-applied.
    assert opt.steps == 1 and opt.param_groups[0]["lr"] == 0.1
    opt.step(lambda: quad_loss(params))
    with pytest.raises(ValueError):  # torch's own check: another number of groups
        opt.load_state_dict(ht.ZO([{"params": params[:1]}, {"params": params[1:]}],
                                  lr=0.1).state_dict())
    # Loading restores the hyperparameters too (as torch does): here the rule.
    other = ht.ZO(params, lr=0.1, seed=0, rule="adamw")
    opt.load_state_dict(other.state_dict())
    assert opt.param_groups[0]["rule"] == "adamw" and opt.steps == 0


def test_schedulers_push_lr():
    params = make_params((torch.float32,))
    mirror = Mirror(params)
    opt = ht.ZO(params, lr=0.1, eps=1e-2, seed=3)
    ref = hyzo.Optimizer(mirror.arrays, lr=0.1, eps=1e-2, seed=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for i in range(6):
        opt.step(lambda: quad_loss(params))
        ref.step(lambda: float(quad_loss(mirror.views)))
        sched.step()
        ref.set_lr(0.1 / (1 + i + 1))
    assert_same(params, mirror.arrays)
    # Other scheduler classes work on every optimizer.
    for make in (lambda ps: ht.Hybrid(ps, fo_steps=1, zo_steps=1, seed=0),
                 lambda ps: ht.FO(ps)):
        ps = make_params()
        o = make(ps)
        s = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=10)
        for _ in range(3):
            if isinstance(o, ht.FO):
                quad_loss(ps).backward()
                o.step()
            else:
                o.step(lambda: quad_loss(ps))
            s.step()
        assert o.param_groups[0]["lr"] != 0.01


# --------------------------------------------------------------------------------------
# failures inside a step


def test_closure_exception_aborts_and_restores():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = ht.ZO(params, lr=0.1, seed=0, num_directions=2)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("forward failed")
        return quad_loss(params)

    with pytest.raises(RuntimeError, match="forward failed"):
        opt.step(closure)
    assert_restored(params, before)
    assert opt.steps == 0
    opt.step(lambda: quad_loss(params))
    assert opt.steps == 1


def test_nan_loss_is_skipped():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = ht.ZO(params, lr=0.1, seed=0)
    opt.step(lambda: torch.tensor(float("nan")))
    assert_restored(params, before)
    assert opt.skipped == 1 and opt.steps == 1


# --------------------------------------------------------------------------------------
# training a small model


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(256, 8)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2]
    return model, lambda: nn.functional.mse_loss(model(x), y)


def value(closure) -> float:
    with torch.no_grad():
        return float(closure())


def test_zo_fine_tuning_reduces_loss():
    model, closure = _toy()
    start = value(closure)
    opt = ht.ZO(model.parameters(), lr=0.01, eps=1e-3, rule="adamw", num_directions=4,
                seed=0)
    for _ in range(300):
        opt.step(closure)
    assert value(closure) < 0.6 * start


def test_hybrid_fine_tuning_reduces_loss():
    model, closure = _toy()
    start = value(closure)
    # The paper's hybrid: AdamW first-order steps, AdaZO zeroth-order steps (each its own
    # state); AdaZO's normalized steps follow a noisy estimate, hence a smaller zo_lr.
    opt = ht.Hybrid(model.parameters(), lr=0.03, zo_lr=0.003, fo_steps=10, zo_steps=10, seed=0)
    for _ in range(100):
        opt.step(closure)
    assert value(closure) < 0.4 * start


def test_mixed_precision_model_trains():
    model, closure = _toy()
    model[0].to(torch.bfloat16)
    model[2].to(torch.float16)

    def loss():
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
        h = torch.tanh(model[0](x.to(torch.bfloat16)).float())
        out = model[2](h.to(torch.float16)).float()
        return ((out - torch.sin(x[:, :1] * 2)) ** 2).mean()

    start = value(loss)
    opt = ht.Hybrid(model.parameters(), lr=0.01, eps=1e-2, fo_steps=5, zo_steps=5, seed=0,
                    precision="compensated")
    for _ in range(60):
        opt.step(loss)
    assert value(loss) < 0.7 * start


# --------------------------------------------------------------------------------------
# data parallel (one process: the all-reduce path)


def test_process_group_of_one_matches_no_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}",
                                rank=0, world_size=1)
        try:
            pa, pb = make_params(), make_params()
            kw = dict(lr=0.01, eps=1e-2, rule="adamw", directions="sphere")
            oa = ht.ZO(pa, seed=5, **kw)
            ob = ht.ZO(pb, seed=5, process_group=dist.group.WORLD, **kw)
            oc = ht.ZO(make_params(), seed=None, process_group=True, **kw)  # broadcast seed
            assert isinstance(oc.param_groups[0]["seed"], int)
            for _ in range(3):
                oa.step(lambda: quad_loss(pa))
                ob.step(lambda: quad_loss(pb))
            for a, b in zip(pa, pb):
                np.testing.assert_array_equal(bits(a), bits(b))
        finally:
            dist.destroy_process_group()


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(42)
    s1 = ht.ZO(make_params(), lr=0.1).param_groups[0]["seed"]
    torch.manual_seed(42)
    s2 = ht.ZO(make_params(), lr=0.1).param_groups[0]["seed"]
    assert s1 == s2


# --------------------------------------------------------------------------------------
# errors at construction and misuse


def test_construction_errors():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="non-contiguous"):
        ht.ZO([p.detach().t().requires_grad_()], lr=0.1)
    with pytest.raises(ValueError, match="sparse"):
        ht.ZO([torch.randn(4, 4).to_sparse().requires_grad_()], lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        ht.ZO([torch.zeros(4, dtype=torch.float64, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="device"):
        ht.ZO([torch.zeros(4, device="meta", requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ht.ZO([p], lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ht.ZO([p], lr=0.1, eps=float("nan"))
    with pytest.raises(ValueError, match="rule"):
        ht.ZO([p], lr=0.1, rule="lion")
    with pytest.raises(ValueError, match="directions"):
        ht.ZO([p], lr=0.1, directions="uniform")
    with pytest.raises(ValueError, match="num_directions"):
        ht.ZO([p], lr=0.1, num_directions=0)
    with pytest.raises(ValueError, match="beta"):
        ht.Hybrid([p], betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="hybrid_alpha"):
        ht.Hybrid([p], hybrid_alpha=2.0)
    with pytest.raises(ValueError, match="eps"):
        ht.ZO([{"params": [p]}, {"params": [nn.Parameter(torch.ones(2))], "eps": 0.1}],
              lr=0.1)
    with pytest.raises(ValueError, match="global_offset"):
        ht.ZO([{"params": [p], "global_offset": -3}], lr=0.1)
    with pytest.raises(ValueError, match="overlap"):
        ht.ZO([ht.Shard(p, 0), ht.Shard(nn.Parameter(torch.ones(4)), 10)], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        ht.ZO([torch.zeros(0, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError):
        ht.ZO([p])  # lr is required for ZO


def test_step_misuse():
    params = make_params()
    opt = ht.ZO(params, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="loss"):
        opt.step(lambda: "nope")
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: torch.ones(3))
    assert opt.steps == 0
    opt.step(lambda: quad_loss(params))
    with pytest.raises(RuntimeError, match="after the first step"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
    params[0].data = params[0].data.clone()
    with pytest.raises(RuntimeError, match="moved"):
        opt.step(lambda: quad_loss(params))

    hy = ht.Hybrid(make_params(), fo_steps=1, zo_steps=1, seed=0)
    with pytest.raises(ValueError, match="schedule"):
        hy.step(lambda: quad_loss(params), phase="zo")
    with pytest.raises(TypeError, match="requires grad"):
        hy.step(lambda: torch.tensor(1.0))
    free = ht.Hybrid(make_params(), fo_steps=0, zo_steps=0, seed=0)
    with pytest.raises(ValueError, match="phase"):
        free.step(lambda: quad_loss(params))


def test_add_param_group_before_first_step():
    a, b = make_params((torch.float32,)), make_params((torch.float16,))
    opt = ht.ZO(a, lr=0.1, seed=0)
    opt.add_param_group({"params": b, "lr": 0.01})
    assert len(opt.param_groups) == 2
    opt.step(lambda: quad_loss(a + b))
    assert opt.steps == 1


def test_cannot_pickle():
    import copy

    opt = ht.ZO(make_params(), lr=0.1, seed=0)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(opt)


# --------------------------------------------------------------------------------------
# perturb_: one seeded displacement


def test_perturb_adds_the_named_direction_at_global_offsets():
    """perturb_ adds std * z(seed, step, direction) at each element's global index: the
    entries hyzo.directions gives (exactly, for Rademacher), the same bits for a vector
    split into two groups at offsets as for the unsharded one, whatever the optimizer."""
    g = torch.Generator().manual_seed(3)
    for kind in ("rademacher", "gaussian"):
        full = torch.randn(101, generator=g).requires_grad_()
        a = full[:40].detach().clone().requires_grad_()
        b = full[40:].detach().clone().requires_grad_()
        before = full.detach().clone()
        o_full = ht.ZO([full], lr=0.01, seed=4, rule="adamw", directions=kind)
        o_shard = ht.Hybrid([{"params": [b], "global_offset": 40}, {"params": [ht.Shard(a, 0)]}],
                            lr=0.01, seed=9, fo_steps=1, zo_steps=1, directions=kind)
        o_full.perturb_(0.5, seed=123, step=7, direction=2)
        o_shard.perturb_(0.5, 123, 7, 2)
        np.testing.assert_array_equal(bits(full), bits(torch.cat([a.detach(), b.detach()])))
        z = torch.from_numpy(hyzo.directions(kind, 123, 7, 2, 0, 101))
        if kind == "rademacher":  # 0.5 * (+-1) is exact: one rounding of the sum
            np.testing.assert_array_equal(bits(full), bits(before + 0.5 * z))
        else:
            torch.testing.assert_close(full.detach(), before + 0.5 * z, rtol=1e-6, atol=1e-6)
        # Another optimizer, another seed of its own: the same displacement (regenerable
        # from the name alone).
        again = before.clone().requires_grad_()
        other = (ht.FO([again], lr=0.1, seed=77) if kind == "gaussian" else
                 ht.ZO([again], lr=0.1, seed=77, directions=kind))
        other.perturb_(0.5, 123, 7, 2)
        np.testing.assert_array_equal(bits(again), bits(full))


def test_perturb_leaves_state_counts_and_frozen_parameters_alone():
    """No state, step count or schedule moves; a frozen parameter is not displaced; the
    next step is the one the schedule called for."""
    params = make_params()
    frozen = nn.Parameter(torch.ones(6), requires_grad=False)
    opt = ht.Hybrid(params + [frozen], lr=0.01, seed=5, fo_steps=1, zo_steps=2,
                    num_directions=2)
    for _ in range(2):
        opt.step(lambda: quad_loss(params))
    state = opt.state_dict()["hyzo"]["shards"][0].clone()
    counts = (opt.steps, opt.updates, opt.fo_updates, opt.next_phase())
    moved = [p.detach().clone() for p in params]
    opt.perturb_(0.1, seed=1)
    assert torch.equal(opt.state_dict()["hyzo"]["shards"][0], state)
    assert (opt.steps, opt.updates, opt.fo_updates, opt.next_phase()) == counts
    assert torch.equal(frozen, torch.ones(6))
    assert all(not torch.equal(p.detach(), m) for p, m in zip(params, moved))
    opt.perturb_(0.0, seed=1)  # std 0: no change
    opt.perturb_(torch.tensor(0.1), seed=2**64 - 1, step=2**32 - 1, direction=0)


def test_perturb_refuses_bad_arguments():
    p = make_params((torch.float32,))
    opt = ht.ZO(p, lr=0.1, seed=0)
    before = p[0].detach().clone()
    for kw, err in ((dict(std=float("nan"), seed=0), "finite"),
                    (dict(std=float("inf"), seed=0), "finite"),
                    (dict(std=1.0, seed=-1), "seed"),
                    (dict(std=1.0, seed=2**64), "seed"),
                    (dict(std=1.0, seed=0, step=2**32), "step"),
                    (dict(std=1.0, seed=0, direction=-1), "direction")):
        with pytest.raises(ValueError, match=err):
            opt.perturb_(**kw)
    with pytest.raises(ValueError, match="finite"):  # finite in Python, inf as a float32
        opt.perturb_(1e39, seed=0)
    assert torch.equal(p[0].detach(), before)


def test_the_public_names_are_hyzo_torchs():
    """The package exports exactly its public names, each as hyzo.torch's own (help(),
    pickles of the classes, messages), wherever its module is."""
    assert ht.__all__ == ["ZO", "Hybrid", "FO", "set_global_offset", "Shard"]
    for name in ht.__all__:
        assert getattr(ht, name).__module__ == "hyzo.torch", name
    for cls in (ht.ZO, ht.Hybrid, ht.FO):
        assert pickle.loads(pickle.dumps(cls)) is cls
        assert issubclass(cls, torch.optim.Optimizer)
