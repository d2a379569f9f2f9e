"""The CUDA path of hyzo.torch: parameters on the GPU, passes on torch's current stream,
losses handed over as device pointers. Skipped (with the reason shown) without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo  # noqa: E402
import hyzo.torch as ht  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("CUDA tests: torch.cuda.is_available() is False (no GPU or a CPU-only torch)",
                allow_module_level=True)
if not hyzo.cuda_available():
    pytest.skip("CUDA tests: libhyzo reports no CUDA device (hyzo_cuda_available() == 0)",
                allow_module_level=True)


def _params(device, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(n, generator=g).to(dt).to(device))
            for n, dt in zip((1000, 513, 77), dtypes)]


def _loss(ps):
    total = 0.0
    for i, p in enumerate(ps):
        total = total + ((p.float() - 0.1 * (i + 1)) ** 2).sum()
    return total


@pytest.mark.parametrize("opts", [dict(rule="sgd"), dict(rule="adamw", num_directions=2),
                                  dict(directions="rademacher", rule="momentum"),
                                  dict(estimator="one_sided", rule="adamw"),
                                  dict(precision="compensated", rule="adamw")])
def test_zo_cuda_matches_cpu(opts):
    """Same run on the GPU (on a side stream) and the CPU: equal within the spec's
    tolerance of the fp32 Gaussian (and exactly for rademacher)."""
    kw = dict(lr=0.01, eps=1e-2, seed=5, **opts)
    pc, pg = _params("cpu"), _params("cuda")
    oc, og = ht.ZO(pc, **kw), ht.ZO(pg, **kw)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for p in pg:  # the parameters were written on the default stream
            p.record_stream(stream)
        stream.wait_stream(torch.cuda.default_stream())
        og.step(lambda: _loss(pg))  # first step: may compile kernels, allocate state
        # No host synchronization from the Python side: losses stay on the device.
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                lg = og.step(lambda: _loss(pg))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for _ in range(5):
        lc = oc.step(lambda: _loss(pc))
    torch.cuda.synchronize()
    assert lg.device.type == "cuda"
    assert float(lg) == pytest.approx(float(lc), rel=1e-3)
    for a, b in zip(pc, pg):
        tol = 1e-3 if a.dtype == torch.float32 else 2e-2
        np.testing.assert_allclose(b.detach().float().cpu().numpy(),
                                   a.detach().float().numpy(), rtol=tol, atol=tol)


def test_hybrid_cuda_trains_and_round_trips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1)).cuda()
    model[0].to(torch.bfloat16)
    x = torch.randn(512, 16, device="cuda")
    y = torch.sin(x[:, :1])

    def closure():
        h = model[1](model[0](x.to(torch.bfloat16)).float())
        return nn.functional.mse_loss(model[2](h), y)

    opt = ht.Hybrid(model.parameters(), lr=0.01, eps=1e-2, fo_steps=5, zo_steps=5, seed=0,
                    precision="compensated")
    with torch.no_grad():
        start = float(closure())
    for _ in range(40):
        opt.step(closure)
    with torch.no_grad():
        assert float(closure()) < 0.7 * start
    sd = opt.state_dict()
    snapshot = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.step(closure)
    after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot):
            p.copy_(s)
    opt.load_state_dict(sd)
    for _ in range(3):
        opt.step(closure)
    for p, a in zip(model.parameters(), after):
        assert torch.equal(p.detach(), a)


@pytest.mark.parametrize("rank", [1, 4])
def test_lowrank_cuda_matches_cpu(rank):
    """Low-rank directions (spec §7) on the GPU: the hooks add the term, the weights keep
    their bits during every forward, and the run equals the CPU's within tolerance."""
    def make(device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 40), nn.Tanh(),
                              nn.Linear(40, 1)).to(device)
        idx = torch.arange(64, device=device) % 50
        y = torch.sin(torch.arange(64, device=device, dtype=torch.float32))[:, None]
        opt = ht.ZO(model.parameters(), lr=0.01, eps=1e-2, seed=3, rule="adamw",
                    num_directions=2, directions="lowrank", rank=rank)
        assert len(opt.attach(model)) == 3
        return model, (lambda: nn.functional.mse_loss(model(idx), y)), opt

    (mc, fc, oc), (mg, fg, og) = make("cpu"), make("cuda")
    for _ in range(4):
        oc.step(fc)
        before = [p.detach().clone() for p in (mg[0].weight, mg[1].weight, mg[3].weight)]

        def watched():
            for b, p in zip(before, (mg[0].weight, mg[1].weight, mg[3].weight)):
                assert torch.equal(p.detach(), b)
            return fg()
        og.step(watched)
    torch.cuda.synchronize()
    for a, b in zip(mc.parameters(), mg.parameters()):
        np.testing.assert_allclose(b.detach().cpu().numpy(), a.detach().numpy(),
                                   rtol=1e-3, atol=1e-3)


def test_fo_on_cuda_skips_parameters_without_grad():
    """The masked first-order step on the GPU: a parameter whose .grad is None keeps its
    bits, and the run matches the CPU's (where the moments are checked too)."""
    pc, pg = _params("cpu"), _params("cuda")
    oc, og = ht.FO(pc, lr=0.01, weight_decay=0.1), ht.FO(pg, lr=0.01, weight_decay=0.1)
    for step in range(3):
        for ps, opt in ((pc, oc), (pg, og)):
            for p in ps:
                p.grad = None
            reached = ps if step == 0 else ps[:2]  # the last one only at step 0
            _loss(reached).backward()
            before = ps[2].detach().clone()
            opt.step()
            if step > 0:
                assert torch.equal(ps[2].detach(), before)
    torch.cuda.synchronize()
    for a, b in zip(pc, pg):
        tol = 1e-3 if a.dtype == torch.float32 else 2e-2
        np.testing.assert_allclose(b.detach().float().cpu().numpy(),
                                   a.detach().float().numpy(), rtol=tol, atol=tol)


def test_closure_exception_on_cuda_restores():
    ps = _params("cuda", (torch.float32,))
    before = [p.detach().clone() for p in ps]
    opt = ht.ZO(ps, lr=0.1, seed=0, num_directions=2)
    n = []

    def closure():
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("boom")
        return _loss(ps)

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    torch.cuda.synchronize()
    for p, b in zip(ps, before):
        torch.testing.assert_close(p.detach(), b, rtol=1e-6, atol=0)
    assert opt.steps == 0


def test_two_devices_in_one_group_is_an_error():
    with pytest.raises(ValueError, match="several devices"):
        ht.ZO([torch.zeros(4, requires_grad=True),
               torch.zeros(4, device="cuda", requires_grad=True)], lr=0.1)
