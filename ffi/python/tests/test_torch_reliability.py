"""hyzo.torch under misuse and at scale (issue 13): a failure to begin in a later param
group, overlapping groups, frozen parameters, integers that would wrap through ctypes,
state_dict() memory, and one optimizer used from two threads."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo  # noqa: E402
import hyzo.torch as ht  # noqa: E402
from conftest import bits  # noqa: E402

torch.set_num_threads(1)


def param(n: int, seed: int = 0, dtype=torch.float32) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(n, generator=g).to(dtype))


def quad(ps) -> torch.Tensor:
    return sum(((p.float() - 0.3) ** 2).sum() for p in ps)


def assert_restored(ps, before) -> None:
    """Restored after a perturbation: equal up to the rounding of each pass (spec v2 §4)."""
    for p, b in zip(ps, before):
        np.testing.assert_allclose(p.detach().float().numpy(), b.float().numpy(), rtol=1e-6,
                                   atol=0)


# --------------------------------------------------------------------------------------
# a failure to begin in group k > 0


class _FailingBegin:
    """Wraps a shard's C optimizer: its next ``begin`` raises (as a CUDA error would)."""

    def __init__(self, c) -> None:
        self.c = c
        self.fail = True

    def __getattr__(self, name):
        return getattr(self.c, name)

    def begin(self, *args):
        if self.fail:
            self.fail = False
            raise hyzo.CudaError("injected: kernel launch failed", status="HYZO_ERR_CUDA")
        return self.c.begin(*args)


@pytest.mark.parametrize("directions", ["gaussian", "sphere"])
def test_failed_begin_in_a_later_group_undoes_the_earlier_ones(directions):
    ps = [param(30, 0), param(20, 1, torch.bfloat16), param(10, 2)]
    before = [p.detach().clone() for p in ps]
    opt = ht.ZO([{"params": [ps[0]]}, {"params": [ps[1]]}, {"params": [ps[2]]}], lr=0.1,
                eps=1e-2, seed=0, num_directions=2, directions=directions)
    opt._shards[2].c = _FailingBegin(opt._shards[2].c)
    with pytest.raises(hyzo.CudaError, match="injected"):
        opt.step(lambda: quad(ps))
    assert_restored(ps, before)
    # Not wedged: the state can be saved, and the next step runs in every group.
    sd = opt.state_dict()
    assert opt.steps == 0 and len(sd["hyzo"]["shards"]) == 3
    opt.step(lambda: quad(ps))
    assert opt.steps == 1 and all(s.c.stats()[0] == 1 for s in opt._shards)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(ps, before))


def test_failed_first_order_step_is_not_a_wedge():
    """Hybrid: a group whose begin fails because the schedule disagrees is reported, and
    nothing is left perturbed."""
    ps = [param(12, 0), param(8, 1)]
    opt = ht.Hybrid([{"params": [ps[0]]}, {"params": [ps[1]]}], fo_steps=1, zo_steps=1,
                    seed=0)
    opt.step(lambda: quad(ps))  # first-order
    before = [p.detach().clone() for p in ps]
    opt._shards[1].c = _FailingBegin(opt._shards[1].c)
    with pytest.raises(hyzo.CudaError):
        opt.step(lambda: quad(ps))
    assert_restored(ps, before)
    assert opt.next_phase() == "zo"
    opt.step(lambda: quad(ps))
    assert opt.steps == 2


def test_zo_refuses_hybrid_alpha():
    with pytest.raises(ValueError, match="hybrid_alpha"):
        ht.ZO([{"params": [param(4)]}, {"params": [param(4, 1)], "hybrid_alpha": 0.5}],
              lr=0.1)


# --------------------------------------------------------------------------------------
# overlapping param groups


def test_groups_overlapping_in_memory_are_refused():
    base = torch.zeros(10)
    a, b = base[:6].requires_grad_(), base[4:].requires_grad_()
    with pytest.raises(ValueError, match="overlap in memory"):
        ht.ZO([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt = ht.ZO([a], lr=0.1, seed=0)
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    opt.step(lambda: quad([a]))
    # Disjoint views of one storage are fine.
    base2 = torch.zeros(10)
    ht.ZO([{"params": [base2[:5].requires_grad_()]}, {"params": [base2[5:].requires_grad_()]}],
          lr=0.1)


def test_groups_overlapping_in_global_offsets_are_refused():
    x, y = param(10, 0), param(10, 1)
    with pytest.raises(ValueError, match="overlap in global elements"):
        ht.ZO([{"params": [x], "global_offset": 0}, {"params": [y], "global_offset": 5}],
              lr=0.1)
    with pytest.raises(ValueError, match="overlap in global elements"):
        ht.ZO([{"params": [x]}, {"params": [ht.Shard(param(10, 2), 9)]}], lr=0.1)
    opt = ht.ZO([x], lr=0.1, seed=0)
    with pytest.raises(ValueError, match="overlap"):
        opt.add_param_group({"params": [y], "global_offset": 3})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [y], "global_offset": 10})
    opt.step(lambda: quad([x, y]))


# --------------------------------------------------------------------------------------
# frozen parameters


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    return x, torch.sin(x[:, :1])


@pytest.mark.parametrize("kind", ["zo", "hybrid", "fo"])
def test_frozen_parameters_are_never_touched(kind):
    model = _model()
    x, y = _data()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen_bits = bits(frozen)
    seen = []

    def loss():
        seen.append(torch.equal(frozen.detach(), model[0].weight.detach())
                    and (bits(frozen) == frozen_bits).all())
        return nn.functional.mse_loss(model(x), y)

    trainable_before = [bits(p) for p in model.parameters() if p.requires_grad]
    if kind == "zo":
        opt = ht.ZO(model.parameters(), lr=0.05, weight_decay=0.1, rule="adamw", seed=0)
        for _ in range(3):
            opt.step(loss)
    elif kind == "hybrid":
        opt = ht.Hybrid(model.parameters(), fo_steps=2, zo_steps=2, lr=0.05, weight_decay=0.1,
                        seed=0)
        for _ in range(4):
            opt.step(loss)
        assert frozen.grad is None  # no gradient buffer for it either
    else:
        opt = ht.FO(model.parameters(), lr=0.05, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss().backward()
            opt.step()
    assert all(seen)  # never perturbed, in any forward
    np.testing.assert_array_equal(bits(frozen), frozen_bits)
    after = [bits(p) for p in model.parameters() if p.requires_grad]
    assert all((a != b).any() for a, b in zip(after, trainable_before))


def test_frozen_parameters_take_no_offsets():
    """ZO over model.parameters() with a frozen layer perturbs exactly as ZO over the
    trainable parameters only."""
    ma, mb = _model(), _model()
    x, y = _data()
    for m in (ma, mb):
        m[0].bias.requires_grad_(False)
    oa = ht.ZO(ma.parameters(), lr=0.05, seed=3, num_directions=2)
    ob = ht.ZO([p for p in mb.parameters() if p.requires_grad], lr=0.05, seed=3,
               num_directions=2)
    for _ in range(4):
        oa.step(lambda: nn.functional.mse_loss(ma(x), y))
        ob.step(lambda: nn.functional.mse_loss(mb(x), y))
    for a, b in zip(ma.parameters(), mb.parameters()):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_freezing_before_the_first_step_is_followed_after_it_refused():
    model = _model()
    x, y = _data()
    opt = ht.ZO(model.parameters(), lr=0.05, seed=0)
    model[2].requires_grad_(False)  # before the first step: re-registered
    frozen = [bits(p) for p in model[2].parameters()]
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert all((bits(p) == f).all() for p, f in zip(model[2].parameters(), frozen))
    model[2].requires_grad_(True)
    with pytest.raises(RuntimeError, match="unfrozen"):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))


def test_no_trainable_parameter_is_refused_at_the_step():
    t = torch.zeros(4)  # a plain tensor: requires_grad=False
    opt = ht.ZO([t], lr=0.1, seed=0)  # as torch.optim: constructing is allowed
    with pytest.raises(ValueError, match="requires_grad"):
        opt.step(lambda: t.sum())
    assert ht.Hybrid([torch.zeros(1)], fo_steps=2, zo_steps=1).next_phase() == "fo"
    with pytest.raises(ValueError, match="lr"):  # values are still checked at construction
        ht.ZO([t], lr=-1.0)


def test_fo_skips_parameters_without_grad_like_adamw():
    """A parameter whose .grad is None is not changed (no weight decay either) and its
    moments do not move, as torch.optim.AdamW; a group with no gradient at all is not
    stepped."""
    a, b = param(16, 0), param(16, 1)
    ta, tb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    opt = ht.FO([a, b], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([ta, tb], lr=0.01, weight_decay=0.1)

    def b_moments():
        # The saved state: a 64-byte header, then m and v of a, then of b (f32, 16 each).
        return opt.state_dict()["hyzo"]["shards"][0][64 + 128:64 + 256].clone()

    for step in range(3):
        for p, t in ((a, ta), (b, tb)):
            p.grad = None
            t.grad = None
        # Step 0 reaches both parameters, the later ones only a.
        quad([a, b] if step == 0 else [a]).backward()
        quad([ta, tb] if step == 0 else [ta]).backward()
        b_before, moments_before = bits(b), b_moments()
        opt.step()
        ref.step()
        np.testing.assert_allclose(a.detach().numpy(), ta.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(b.detach().numpy(), tb.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
        if step > 0:
            np.testing.assert_array_equal(bits(b), b_before)
            assert torch.equal(b_moments(), moments_before) and moments_before.any()
            assert b.grad is None  # still None, as torch leaves it
    # Every .grad None: nothing changes at all, state included.
    state = opt.state_dict()["hyzo"]["shards"][0].clone()
    a.grad = b.grad = None
    snapshot = [bits(a), bits(b)]
    opt.step()
    assert torch.equal(opt.state_dict()["hyzo"]["shards"][0], state) and opt.steps == 3
    assert all((bits(p) == s).all() for p, s in zip((a, b), snapshot))


def test_fo_leaves_grad_none_before_the_first_backward():
    p = param(8)
    ht.FO([p], lr=0.1)
    assert p.grad is None


# --------------------------------------------------------------------------------------
# integers that cross ctypes


def test_integers_that_would_wrap_through_ctypes_are_refused():
    # What the checks prevent: ctypes converts modulo 2**width, silently.
    assert ctypes.c_uint32(2**32 + 1).value == 1 and ctypes.c_uint64(2**64 + 5).value == 5
    p = param(10)
    with pytest.raises(ValueError, match="num_threads"):
        ht.ZO([p], lr=0.1, num_threads=2**32 + 1)
    with pytest.raises(ValueError, match="num_threads"):
        ht.ZO([p], lr=0.1, num_threads=-1)
    with pytest.raises(hyzo.InvalidArgumentError, match="threads"):
        ht.ZO([p], lr=0.1, num_threads=5000)  # in range for ctypes, over the library's 1024
    with pytest.raises(ValueError, match="global_offset"):
        ht.set_global_offset(param(3), 2**64)
    with pytest.raises(ValueError, match="global_offset"):
        ht.ZO([{"params": [p], "global_offset": 2**64 + 5}], lr=0.1)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        ht.ZO([{"params": [p], "global_offset": 2**64 - 3}], lr=0.1)
    with pytest.raises(ValueError, match="seed"):
        ht.ZO([p], lr=0.1, seed=2**64)
    with pytest.raises(ValueError, match="num_directions"):
        ht.ZO([p], lr=0.1, num_directions=2**32 + 1)
    with pytest.raises(ValueError, match="fo_steps"):
        ht.Hybrid([p], fo_steps=2**32)
    with pytest.raises(ValueError, match="global_offset"):
        hyzo.Optimizer([(np.zeros(4, np.float32), 2**64 + 1)])
    with pytest.raises(ValueError, match="num_threads"):
        hyzo.Optimizer([np.zeros(4, np.float32)], num_threads=2**32 + 1)
    with pytest.raises(ValueError, match="numel|global_offset"):
        hyzo._lib.COptimizer(hyzo._lib.make_config()).add_tensor(1024, 0, 4, -1)
    # The largest offsets still work.
    opt = ht.ZO([{"params": [p], "global_offset": 2**64 - 11}], lr=0.1, seed=0)
    opt.step(lambda: quad([p]))


# --------------------------------------------------------------------------------------
# state_dict() memory


_MEMORY_PROBE = textwrap.dedent("""
    import re, sys
    import torch
    import hyzo.torch as ht

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.set_num_threads(1)
    n = int(sys.argv[1])
    p = torch.nn.Parameter(torch.randn(n))
    opt = ht.FO([p], lr=1e-3, num_threads=1)
    p.grad = torch.randn(n)
    opt.step()                                   # the state (8 bytes per parameter) exists
    size = opt._shards[0].c.state_size()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    base = kib("VmRSS")
    sd = opt.state_dict()
    print(size, (kib("VmHWM") - base) * 1024)
""")


def test_state_dict_holds_one_copy_of_the_state(tmp_path):
    """state_dict() peaks at the size of the state (the library writes into the tensor it
    returns), where it used to peak at 3x (a ctypes buffer, its bytes, a bytearray)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    script = tmp_path / "probe.py"
    script.write_text(_MEMORY_PROBE)
    out = subprocess.run([sys.executable, str(script), str(10_000_000)], check=True,
                         capture_output=True, text=True).stdout.split()
    size, peak = int(out[0]), int(out[1])
    assert size > 80_000_000
    assert peak < 1.3 * size, f"state_dict() peaked at {peak / size:.2f}x the state"


# --------------------------------------------------------------------------------------
# threads


def _held_elsewhere(lock):
    """Holds ``lock`` on another thread until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    return release, t


def test_one_optimizer_is_used_by_one_thread_at_a_time():
    p = param(10)
    opt = ht.ZO([p], lr=0.1, seed=0)
    release, t = _held_elsewhere(opt._shards[0].c._lock)  # another thread is inside a call
    try:
        with pytest.raises(hyzo.BadStateError, match="another thread"):
            opt.step(lambda: quad([p]))
        with pytest.raises(hyzo.BadStateError, match="another thread"):
            opt.state_dict()
    finally:
        release.set()
        t.join()
    assert opt.steps == 0
    opt.step(lambda: quad([p]))  # and usable again once that thread is done

    x = np.zeros(4, np.float32)
    nopt = hyzo.Optimizer([x], seed=0)
    release, t = _held_elsewhere(nopt._c._lock)
    try:
        with pytest.raises(hyzo.BadStateError, match="another thread"):
            nopt.step(lambda: float((x ** 2).sum()))
    finally:
        release.set()
        t.join()


def test_distinct_optimizers_run_on_distinct_threads():
    ps = [param(5000, i) for i in range(4)]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    opts = [ht.ZO([p], lr=0.01, rule="adamw", seed=i) for i, p in enumerate(ps)]
    errors = []

    def run(i):
        try:
            for _ in range(20):
                opts[i].step(lambda: quad([ps[i]]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, r in enumerate(ref):
        o = ht.ZO([r], lr=0.01, rule="adamw", seed=i)
        for _ in range(20):
            o.step(lambda: quad([r]))
        np.testing.assert_array_equal(bits(ps[i]), bits(r))
