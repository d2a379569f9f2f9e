"""Non-finite gradients in hyzo.torch (issue 29): a first-order step, or a zeroth-order step
mixing in a gradient, whose gradient holds a NaN or an infinity anywhere in the model is
skipped by every param group (and every rank) together, as torch.amp.GradScaler skips the
whole step; ``skip_nonfinite_grads=False`` applies it as torch.optim does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import hyzo.torch as ht  # noqa: E402


def two_groups():
    g = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(40, generator=g))
    b = nn.Parameter(torch.randn(24, generator=g))
    return a, b


def set_grads(a, b, bad=None):
    a.grad = torch.full_like(a, 0.25)
    b.grad = torch.full_like(b, -0.5)
    if bad is not None:
        b.grad[5] = bad


def snapshot(opt, *ps):
    return [p.detach().clone() for p in ps], opt.state_dict()


def assert_same(before, opt, *ps):
    values, state = before
    for v, p in zip(values, ps):
        assert torch.equal(v, p.detach())
    now = opt.state_dict()
    assert [g["params"] for g in now["param_groups"]] == [
        g["params"] for g in state["param_groups"]]
    for k in state["state"]:
        for name, t in state["state"][k].items():
            if isinstance(t, torch.Tensor) and name != "step":
                assert torch.equal(t, now["state"][k][name]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fo_skips_every_group_when_one_gradient_is_not_finite(bad):
    a, b = two_groups()
    opt = ht.FO([{"params": [a]}, {"params": [b], "lr": 1e-2}], lr=1e-3, seed=0)
    set_grads(a, b)
    opt.step()
    before = snapshot(opt, a, b)
    # Only group 1 holds the bad value: group 0 must skip too, or the groups' counts part.
    set_grads(a, b, bad)
    opt.step()
    assert_same(before, opt, a, b)
    assert (opt.steps, opt.skipped, opt.updates) == (2, 1, 1)
    # The next finite step is the second step of a run without the bad one, bit for bit.
    ref_a, ref_b = two_groups()
    ref = ht.FO([{"params": [ref_a]}, {"params": [ref_b], "lr": 1e-2}], lr=1e-3, seed=0)
    set_grads(ref_a, ref_b)
    ref.step()
    for o, x, y in ((opt, a, b), (ref, ref_a, ref_b)):
        set_grads(x, y)
        o.step()
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
    # The counts agree across the groups, so the state dict loads (mixed counts are refused).
    fresh = ht.FO([{"params": [a]}, {"params": [b], "lr": 1e-2}], lr=1e-3, seed=0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped == 1


def test_fo_a_missing_gradient_is_not_checked_and_its_group_not_counted():
    a, b = two_groups()
    opt = ht.FO([{"params": [a]}, {"params": [b]}], seed=0)
    set_grads(a, b)
    b.grad = None
    opt.step()
    assert opt.skipped == 0 and not torch.equal(a.detach(), two_groups()[0].detach())


def test_fo_without_the_skip_applies_the_gradient_as_torch_does():
    a, b = two_groups()
    opt = ht.FO([a, b], seed=0, skip_nonfinite_grads=False)
    ref_a, ref_b = (nn.Parameter(p.detach().clone()) for p in (a, b))
    ref = torch.optim.AdamW([ref_a, ref_b])
    for o, x, y in ((opt, a, b), (ref, ref_a, ref_b)):
        set_grads(x, y, float("nan"))
        o.step()
    assert torch.isnan(b[5]) and torch.isnan(ref_b[5])
    assert opt.skipped == 0
    with pytest.raises(ValueError, match="skip_nonfinite_grads"):
        ht.FO([a], skip_nonfinite_grads="yes")


def hybrid(a, b, **kw):
    return ht.Hybrid([{"params": [a]}, {"params": [b]}], fo_steps=1, zo_steps=1, lr=1e-3,
                     seed=5, **kw)


def closure_with(a, b, bad):
    def closure():
        loss = (a ** 2).sum() + (b ** 2).sum()
        if bad:
            # sqrt at 0: the loss stays finite, b[5]'s gradient is infinite.
            loss = loss + torch.sqrt(b[5] - b[5].detach())
        return loss
    return closure


@pytest.mark.parametrize("hybrid_alpha", [0.0, 0.5])
def test_hybrid_skips_first_order_and_mixed_steps_together(hybrid_alpha):
    a, b = two_groups()
    opt = hybrid(a, b, hybrid_alpha=hybrid_alpha)
    before = snapshot(opt, a, b)
    opt.step(closure_with(a, b, bad=True))  # first-order
    assert_same(before, opt, a, b)
    assert opt.skipped == 1
    before = snapshot(opt, a, b)
    opt.step(closure_with(a, b, bad=True))  # zeroth-order
    if hybrid_alpha > 0:
        # Checked before the forwards: not even a restore's rounding changed a parameter.
        assert_same(before, opt, a, b)
        assert (opt.steps, opt.skipped) == (2, 2)
    else:
        # A zeroth-order step without a gradient mixed in does not look at the gradient.
        assert (opt.steps, opt.skipped) == (2, 1)
    opt.step(closure_with(a, b, bad=False))
    assert opt.steps == 3 and torch.isfinite(a).all() and torch.isfinite(b).all()


def test_hybrid_without_the_skip_writes_the_nan():
    a, b = two_groups()
    opt = hybrid(a, b, skip_nonfinite_grads=False)
    opt.step(closure_with(a, b, bad=True))
    assert not torch.isfinite(b[5]) and opt.skipped == 0


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch import nn
    import hyzo.torch as ht
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    # Rank r holds the shard [16 r, 16 r + 16) of one tensor, as FSDP's Shard(0) would.
    x = nn.Parameter(torch.arange(16 * rank, 16 * rank + 16, dtype=torch.float32) / 10)
    opt = ht.FO([{"params": [x], "global_offset": 16 * rank}], seed=0, process_group=True)
    x.grad = torch.ones_like(x)
    if rank == 1:
        x.grad[3] = float("nan")
    before = x.detach().clone()
    opt.step()
    x.grad = torch.ones_like(x)
    opt.step()
    print(f"rank {rank}: steps {opt.steps} skipped {opt.skipped} updates {opt.updates} "
          f"changed {not torch.equal(before, x.detach())}", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ranks_skip_together(tmp_path):
    """Rank 1's shard holds the NaN; rank 0's gradient is finite: both skip the step (one
    decision for the process group), so both have taken one update after two steps."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    lines = sorted(o.strip() for o, _ in outs)
    assert lines == [f"rank {r}: steps 2 skipped 1 updates 1 changed True"
                     for r in range(2)], lines
