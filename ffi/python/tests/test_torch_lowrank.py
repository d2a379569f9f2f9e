"""hyzo.torch with low-rank directions (spec v3 §7): ``directions="lowrank"``, the forward
hooks of ``attach()``, on the CPU.

The reference for the term a hook adds is spec §7 itself: the factors regenerated with
``hyzo.directions`` (Gaussian streams ``0x80000000 + d`` and ``0xC0000000 + d`` at the
tensor's global offset), ``Z = A Bᵀ · f32(1/sqrt(r_t))``, and the module evaluated at the
written weight ``W + c Z`` in f32."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import hyzo  # noqa: E402
import hyzo.torch as ht  # noqa: E402
from conftest import bits  # noqa: E402

torch.set_num_threads(1)

A_STREAM, B_STREAM = 0x80000000, 0xC0000000


def offsets(params) -> Dict[int, int]:
    """The default global offsets: trainable parameters in order, from 0."""
    out, off = {}, 0
    for p in params:
        out[id(p)] = off
        off += p.numel()
    return out


def z_of(seed: int, step: int, d: int, offset: int, rows: int, cols: int,
         rank: int) -> torch.Tensor:
    """``Z_d`` of a ``rows x cols`` tensor at ``offset`` (spec §7), in f32."""
    rt = min(rank, rows, cols)
    a = hyzo.directions("gaussian", seed, step, A_STREAM + d, offset, rows * rt)
    b = hyzo.directions("gaussian", seed, step, B_STREAM + d, offset, cols * rt)
    a = torch.from_numpy(a).view(rows, rt)
    b = torch.from_numpy(b).view(cols, rt)
    cr = float(np.float32(1.0 / math.sqrt(rt)))
    return (a @ b.t()) * cr


def perturbation(opt) -> Tuple[int, float]:
    """(direction, coeff) of the forward about to run (every shard runs in lockstep)."""
    return opt._shards[0].c.forward_perturbation()


def mlp(seed: int = 0, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def regression(model: nn.Module):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2]
    return lambda: F.mse_loss(model(x), y)


def value(closure) -> float:
    with torch.no_grad():
        return float(closure())


# --------------------------------------------------------------------------------------
# The term each hook adds is the forward at the written weight W + c Z.


class Tiny(nn.Module):
    """An embedding, a Linear with bias, one without, and a Linear whose rank is capped by
    its shape (3 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 5)
        self.narrow = nn.Linear(5, 3, bias=False)
        self.head = nn.Linear(3, 2)

    def forward(self, idx: torch.Tensor) -> Dict[str, torch.Tensor]:
        e = self.emb(idx)
        h = self.fc(e)
        n = self.narrow(torch.tanh(h))
        return {"emb": e, "fc": h, "narrow": n, "head": self.head(n)}


@pytest.mark.parametrize("rank", [1, 4, 64])
@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
def test_hook_equals_the_forward_at_the_written_weight(rank, estimator):
    torch.manual_seed(0)
    model = Tiny()
    params = list(model.parameters())
    offs = offsets(params)
    seed, q = 7, 2
    opt = ht.ZO(params, lr=1e-2, eps=0.05, directions="lowrank", rank=rank,
                num_directions=q, estimator=estimator, seed=seed)
    names = opt.attach(model)
    assert sorted(names) == ["emb.weight", "fc.weight", "head.weight", "narrow.weight"]
    idx = torch.randint(0, 11, (4, 3))
    seen: List[float] = []

    def closure():
        d, c = perturbation(opt)
        seen.append(c)
        out = model(idx)
        # The reference: every module evaluated at W + c Z_d (its input as the hooked model
        # computed it), the biases as the optimizer wrote them.
        step = opt.steps

        def w(m: nn.Module) -> torch.Tensor:
            p = m.weight
            z = z_of(seed, step, d, offs[id(p)], p.shape[0], p.shape[1], rank)
            return p.float() + c * z

        ref = {"emb": F.embedding(idx, w(model.emb)),
               "fc": F.linear(out["emb"], w(model.fc), model.fc.bias),
               "narrow": F.linear(torch.tanh(out["fc"]), w(model.narrow)),
               "head": F.linear(out["narrow"], w(model.head), model.head.bias)}
        for k, r in ref.items():
            torch.testing.assert_close(out[k], r, rtol=1e-5, atol=1e-5, msg=k)
        return out["head"].pow(2).mean()

    for _ in range(2):
        seen.clear()
        opt.step(closure)
        eps = 0.05
        if estimator == "two_sided":
            assert seen == pytest.approx([eps, -eps] * q)
        else:
            assert seen == pytest.approx([0.0] + [eps] * q)


def test_tied_weight_gets_the_term_in_each_module():
    torch.manual_seed(0)
    emb = nn.Embedding(9, 4)
    head = nn.Linear(4, 9, bias=False)
    head.weight = emb.weight  # tied, as language models tie input and output embeddings
    model = nn.Sequential(emb, head)
    opt = ht.ZO(model.parameters(), lr=1e-2, eps=0.1, directions="lowrank", rank=2, seed=3)
    assert opt.attach(model) == ["0.weight"]
    idx = torch.arange(9).view(3, 3)

    def closure():
        d, c = perturbation(opt)
        out = model(idx)
        w = emb.weight + c * z_of(3, opt.steps, d, 0, 9, 4, 2)
        torch.testing.assert_close(out, F.linear(F.embedding(idx, w), w), rtol=1e-5,
                                   atol=1e-5)
        return out.logsumexp(-1).mean()

    opt.step(closure)


def test_bf16_module_adds_the_term_in_f32():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    opt = ht.ZO(lin.parameters(), lr=1e-2, eps=0.1, directions="lowrank", rank=4, seed=5)
    opt.attach(lin)
    x = torch.randn(5, 16).to(torch.bfloat16)

    def closure():
        d, c = perturbation(opt)
        out = lin(x)
        assert out.dtype == torch.bfloat16
        z = z_of(5, opt.steps, d, 0, 8, 16, 4)
        plain = F.linear(x, lin.weight, lin.bias).float()
        ref = (plain + c * (x.float() @ z.t())).to(torch.bfloat16)
        torch.testing.assert_close(out, ref, rtol=0, atol=0.02)
        return out.float().pow(2).mean()

    opt.step(closure)


# --------------------------------------------------------------------------------------
# The weights are never written during a step; once by the update.


@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
def test_weights_unchanged_during_every_forward_and_changed_once_after(estimator):
    model = mlp()
    w = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = ht.ZO(model.parameters(), lr=1e-2, directions="lowrank", rank=2, num_directions=3,
                estimator=estimator, seed=0)
    opt.attach(model)
    loss = regression(model)
    for _ in range(3):
        before = [bits(p) for p in w]
        bias_before = [bits(b) for b in biases]
        bias_moved = []

        def closure():
            for p, b in zip(w, before):
                assert (bits(p) == b).all(), "a low-rank weight was written during the step"
            bias_moved.append(any((bits(b) != b0).any() for b, b0 in zip(biases, bias_before)))
            return loss()

        opt.step(closure)
        # The biases carry the written Gaussian (every forward of a two-sided step; every
        # one but L_0 one-sided); the weights moved once, by the update.
        assert bias_moved == ([True] * 6 if estimator == "two_sided" else [False] + [True] * 3)
        assert all((bits(p) != b).any() for p, b in zip(w, before))


def test_forwards_outside_a_step_see_the_true_weights():
    model = mlp()
    x = torch.randn(4, 8)
    opt = ht.ZO(model.parameters(), lr=1e-2, directions="lowrank", rank=2, seed=0)
    opt.attach(model)
    opt.step(regression(model))
    with torch.no_grad():
        plain = F.linear(torch.tanh(F.linear(x, model[0].weight, model[0].bias)),
                         model[2].weight, model[2].bias)
        assert (bits(model(x)) == bits(plain)).all()
    # and with autograd on (a first-order use of the same model)
    assert (bits(model(x).detach()) == bits(plain)).all()


def test_perturb_writes_the_gaussian_on_every_tensor():
    # A displacement is written: the low-rank weights take the Gaussian of spec §3 at their
    # global indices, like every other tensor.
    model = mlp()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = ht.ZO(params, lr=1e-2, directions="lowrank", rank=2, seed=0)
    opt.attach(model)
    opt.perturb_(0.5, seed=9, step=3, direction=1)
    for p, b in zip(params, before):
        off = offsets(params)[id(p)]
        z = torch.from_numpy(hyzo.directions("gaussian", 9, 3, 1, off, p.numel())).view_as(p)
        assert torch.equal(p.detach(), b + 0.5 * z)


# --------------------------------------------------------------------------------------
# Training.


@pytest.mark.parametrize("rank", [1, 4])
def test_mlp_regression_trains(rank):
    model = mlp()
    closure = regression(model)
    start = value(closure)
    opt = ht.ZO(model.parameters(), lr=0.01, eps=1e-3, rule="adamw", num_directions=4,
                directions="lowrank", rank=rank, seed=0)
    opt.attach(model)
    for _ in range(300):
        opt.step(closure)
    assert value(closure) < 0.6 * start


def test_hybrid_with_lowrank_directions():
    model = mlp()
    closure = regression(model)
    start = value(closure)
    opt = ht.Hybrid(model.parameters(), lr=0.03, zo_lr=0.003, fo_steps=5, zo_steps=5,
                    directions="lowrank", rank=2, num_directions=2, seed=0)
    opt.attach(model)
    x = torch.randn(3, 8)
    w = [model[0].weight, model[2].weight]
    for _ in range(60):
        phase = opt.next_phase()
        before = [bits(p) for p in w]

        def checked():
            if phase == "fo":
                # first-order steps see the true weights: no hook adds anything
                assert torch.is_grad_enabled()
                with torch.no_grad():
                    plain = F.linear(torch.tanh(F.linear(x, w[0], model[0].bias)), w[1],
                                     model[2].bias)
                    assert (bits(model(x)) == bits(plain)).all()
            else:
                assert all((bits(p) == b).all() for p, b in zip(w, before))
            return closure()

        opt.step(checked)
    assert opt.updates == 30 and opt.fo_updates == 30
    assert value(closure) < 0.5 * start


# --------------------------------------------------------------------------------------
# State, detach, what is left Gaussian, errors.


def test_state_dict_round_trip_continues_bit_identically():
    def make(model):
        opt = ht.ZO(model.parameters(), lr=0.01, rule="adazo", num_directions=2,
                    directions="lowrank", rank=3, seed=11)
        opt.attach(model)
        return opt

    a = mlp()
    opt_a = make(a)
    loss_a = regression(a)
    for _ in range(3):
        opt_a.step(loss_a)
    sd = opt_a.state_dict()
    assert sd["param_groups"][0]["directions"] == "lowrank"
    assert sd["param_groups"][0]["rank"] == 3
    b = mlp()
    b.load_state_dict(a.state_dict())
    unattached = ht.ZO(b.parameters(), lr=0.01, rule="adazo", num_directions=2,
                       directions="lowrank", rank=3, seed=11)
    with pytest.raises(RuntimeError, match="attach\\(model\\) before loading"):
        unattached.load_state_dict(sd)
    opt_b = make(b)
    opt_b.load_state_dict(sd)
    loss_b = regression(b)
    for _ in range(3):
        opt_a.step(loss_a)
        opt_b.step(loss_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert (bits(p) == bits(q)).all()


def test_detach_removes_the_hooks():
    model = mlp()
    opt = ht.ZO(model.parameters(), lr=0.01, directions="lowrank", seed=0)
    opt.attach(model)
    opt.step(regression(model))
    opt.detach()
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    with pytest.raises(RuntimeError, match="attach"):
        opt.step(regression(model))
    # the same model again: allowed after the first step (same shapes)
    opt.attach(model)
    opt.step(regression(model))
    assert len(model[0]._forward_hooks) == 1  # attach replaces, never doubles


def test_only_hookable_uses_are_low_rank():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.capped = nn.Embedding(6, 4, max_norm=1.0)
            self.attn = nn.MultiheadAttention(4, 2)
            self.conv = nn.Conv1d(4, 4, 1)
            self.conv.weight = nn.Parameter(torch.randn(4, 4, 1))

    model = Odd()
    shared = nn.Linear(4, 4)
    model.other = nn.Bilinear(4, 4, 4)
    model.other.weight = nn.Parameter(torch.randn(4, 4, 4))
    model.shared = shared
    model.user = nn.PReLU(4)
    model.user.weight = shared.weight  # a Linear's weight also owned by another module
    opt = ht.ZO([p for p in model.parameters()], lr=0.01, directions="lowrank", seed=0)
    with pytest.warns(UserWarning, match="shared.weight.*PReLU"):
        names = opt.attach(model)
    # the MHA's out_proj is read by the MHA itself; max_norm embeddings rewrite rows
    assert names == ["fc.weight"]
    with pytest.warns(UserWarning, match="shared.weight"):
        assert opt.attach(model, exclude=["fc"]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.attach(model, exclude=[model.fc.weight, "shared.weight"]) == []


def test_errors():
    model = mlp()
    with pytest.raises(ValueError, match="rank"):
        ht.ZO(model.parameters(), lr=0.01, directions="lowrank", rank=0)
    with pytest.raises(ValueError, match="rank"):
        ht.ZO(model.parameters(), lr=0.01, directions="lowrank", rank=1025)
    with pytest.raises(ValueError, match="attach"):
        ht.ZO(model.parameters(), lr=0.01).attach(model)
    opt = ht.ZO(model.parameters(), lr=0.01, directions="lowrank", seed=0)
    with pytest.raises(TypeError, match="Module"):
        opt.attach([model[0]])
    with pytest.raises(ValueError, match="exclude names no parameter.*'2.wieght'"):
        opt.attach(model, exclude=["2.wieght"])
    with pytest.raises(RuntimeError, match="attach\\(model\\) before the first step"):
        opt.step(regression(model))
    hybrid = ht.Hybrid(model.parameters(), directions="lowrank", seed=0)
    with pytest.raises(RuntimeError, match="attach"):
        hybrid.step(regression(model))  # a first-order step too: shapes come first
    opt.attach(model)
    opt.step(regression(model))
    # after the first step, another set of weights cannot be registered
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.attach(model, exclude=["0"])
    opt.step(regression(model))  # the earlier hooks still work
