"""hyzo.torch.Hybrid with separate first- and zeroth-order states (spec v2 §5, issue 11),
seen from Python: the defaults, the separation of the two states in the saved state, the
size of a first-order step after a zeroth-order block, zo_lr under schedulers, the skip on
non-finite projected gradients (§4), and state round trips between torch and numpy."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo  # noqa: E402
import hyzo.torch as ht  # noqa: E402
from conftest import bits  # noqa: E402

torch.set_num_threads(1)

# Saved-state layout (src/state.rs, format 2): a 64-byte header, then per tensor the
# buffers of the main (zeroth-order) rule, then those of the first-order rule, then the
# bf16 residual; a 4-byte CRC32C at the end. Header fields used here:
HEADER = 64
STEP, UPDATES, FO_UPDATES = 24, 32, 40


def counters(state: bytes) -> "tuple[int, int, int]":
    """(step, updates of the main rule's state, updates of the first-order rule's)."""
    return tuple(struct.unpack_from("<Q", state, off)[0]  # type: ignore[return-value]
                 for off in (STEP, UPDATES, FO_UPDATES))


def split_state(state: bytes, n: int) -> "tuple[bytes, bytes]":
    """(main rule's m and v, first-order rule's m and v) of a state over ONE float32 tensor
    of ``n`` elements with two-buffer rules on both sides (AdaZO, AdamW)."""
    assert len(state) == HEADER + 16 * n + 4, len(state)
    return state[HEADER:HEADER + 8 * n], state[HEADER + 8 * n:HEADER + 16 * n]


def shard_state(opt) -> bytes:
    return opt.state_dict()["hyzo"]["shards"][0].numpy().tobytes()


def param(n: int = 64, seed: int = 0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(n, generator=g))


def quad(p: torch.Tensor) -> torch.Tensor:
    return ((p - 0.5) ** 2).sum()


# --------------------------------------------------------------------------------------
# defaults and spelling


def test_defaults_are_the_papers_hybrid():
    p = param()
    opt = ht.Hybrid([p], seed=0)
    g = opt.param_groups[0]
    assert (g["fo_rule"], g["zo_rule"]) == ("adamw", "adazo")
    assert g["zo_lr_ratio"] is None and g["zo_weight_decay"] is None
    cfg = opt._shards[0].c.get_config()
    assert (cfg.rule, cfg.fo_rule) == (hyzo._lib.RULES["adazo"], hyzo._lib.RULES["adamw"])
    # Two states of two fp32 buffers each: 16 bytes per parameter.
    assert opt._shards[0].c.state_size() == HEADER + 16 * p.numel() + 4


def test_rule_is_the_single_shared_state():
    pa, pb = param(), param()
    a = ht.Hybrid([pa], fo_steps=2, zo_steps=2, lr=0.01, rule="adamw", seed=3)
    b = ht.Hybrid([pb], fo_steps=2, zo_steps=2, lr=0.01, fo_rule=None, zo_rule="adamw", seed=3)
    assert a.param_groups[0]["fo_rule"] is None and a.param_groups[0]["zo_rule"] == "adamw"
    for _ in range(8):
        a.step(lambda: quad(pa))
        b.step(lambda: quad(pb))
    np.testing.assert_array_equal(bits(pa), bits(pb))
    assert a._shards[0].c.state_size() == HEADER + 8 * pa.numel() + 4  # one AdamW state
    assert (a.updates, a.fo_updates) == (8, 0)
    with pytest.raises(ValueError, match="either rule"):
        ht.Hybrid([param()], rule="adamw", fo_rule="adamw")
    with pytest.raises(ValueError, match="either rule"):
        ht.Hybrid([param()], rule="adamw", zo_rule="adazo")
    # A param group may say 'rule' too: one shared state for that group.
    c = ht.Hybrid([{"params": [param()], "rule": "sgd"}, {"params": [param(8, 1)]}], seed=0)
    assert [(g["fo_rule"], g["zo_rule"]) for g in c.param_groups] == [(None, "sgd"),
                                                                     ("adamw", "adazo")]


def test_option_errors():
    p = param()
    with pytest.raises(ValueError, match="zo_rule"):
        ht.Hybrid([p], zo_rule="lion")
    with pytest.raises(ValueError, match="fo_rule"):
        ht.Hybrid([p], fo_rule="none")
    with pytest.raises(ValueError, match="zo_lr"):
        ht.Hybrid([p], zo_lr=-1.0)
    with pytest.raises(ValueError, match="zo_lr"):
        ht.Hybrid([p], lr=0.0, zo_lr=1e-3)  # no ratio to lr = 0
    with pytest.raises(ValueError, match="zo_weight_decay"):
        ht.Hybrid([p], zo_weight_decay=float("nan"))
    with pytest.raises(ValueError, match="zo_lr_ratio"):
        ht.Hybrid([{"params": [p], "zo_lr": 1e-3, "zo_lr_ratio": 0.5}])


# --------------------------------------------------------------------------------------
# the two states


def test_each_phase_leaves_the_other_state_untouched():
    """In the saved state, a zeroth-order block leaves the first-order state's bytes as
    they were, and a first-order block the zeroth-order state's; the counters say which
    state each step updated."""
    p = param(50)
    n = p.numel()
    opt = ht.Hybrid([p], fo_steps=2, zo_steps=3, lr=0.01, eps=1e-2, seed=1,
                    weight_decay=0.1)
    for _ in range(2):
        opt.step(lambda: quad(p))
    s1 = shard_state(opt)
    zo1, fo1 = split_state(s1, n)
    assert counters(s1) == (2, 0, 2) and not any(zo1) and any(fo1)
    for _ in range(3):
        opt.step(lambda: quad(p))
    s2 = shard_state(opt)
    zo2, fo2 = split_state(s2, n)
    assert counters(s2) == (5, 3, 2)
    assert fo2 == fo1 and zo2 != zo1
    for _ in range(2):
        opt.step(lambda: quad(p))
    s3 = shard_state(opt)
    zo3, fo3 = split_state(s3, n)
    assert counters(s3) == (7, 3, 4)
    assert zo3 == zo2 and fo3 != fo2
    assert (opt.updates, opt.fo_updates, opt.steps) == (3, 4, 7)


def _first_order_step_after(zo_block: bool, fo_rule, zo_rule: str) -> np.ndarray:
    """The change of one first-order step (gradient c, after two first-order steps with
    the same gradient), with or without a zeroth-order block before it."""
    p = param(200, seed=4)
    c = torch.linspace(-1, 1, 200)
    opt = ht.Hybrid([p], fo_steps=0, zo_steps=0, lr=1e-3, eps=1e-3, fo_rule=fo_rule,
                    zo_rule=zo_rule, seed=2)
    fo_loss = lambda: (p * c).sum()  # noqa: E731 - gradient c wherever p is
    zo_loss = lambda: 100 * ((p - 3) ** 2).sum()  # noqa: E731 - large estimates
    opt.step(fo_loss, phase="fo")
    opt.step(fo_loss, phase="fo")
    if zo_block:
        for _ in range(5):
            opt.step(zo_loss, phase="zo")
    before = p.detach().double().clone()
    opt.step(fo_loss, phase="fo")
    return (p.detach().double() - before).numpy()


def test_first_order_step_after_a_zeroth_order_block_is_unchanged():
    """Separate states: a first-order step moves the weights as far after a zeroth-order
    block as without it (same gradient, same t). With one shared state the block inflates
    the second moment and shrinks the step: the comparison can fail."""
    with_block = _first_order_step_after(True, "adamw", "adazo")
    without = _first_order_step_after(False, "adamw", "adazo")
    # Equal up to the rounding of the f32 parameters the steps are measured on.
    np.testing.assert_allclose(with_block, without, rtol=1e-3, atol=1e-7)
    assert np.abs(without).mean() == pytest.approx(1e-3, rel=0.05)  # AdamW: ~lr per step
    shared_with = _first_order_step_after(True, None, "adamw")
    shared_without = _first_order_step_after(False, None, "adamw")
    np.testing.assert_allclose(shared_without, without, rtol=1e-3, atol=1e-7)
    assert np.abs(shared_with).mean() < 0.5 * np.abs(shared_without).mean()


# --------------------------------------------------------------------------------------
# against the numpy optimizer (the C ABI), learning rates, schedulers


def _pair(lr: float, zo_lr: float, wd: float, zo_wd: float):
    p = param(40, seed=7)
    arr = p.detach().numpy().copy()
    grad = np.zeros_like(arr)
    view = torch.from_numpy(arr)
    opt = ht.Hybrid([p], fo_steps=2, zo_steps=2, lr=lr, zo_lr=zo_lr, weight_decay=wd,
                    zo_weight_decay=zo_wd, eps=1e-2, num_directions=2, seed=11)
    ref = hyzo.Optimizer([arr], grads=[grad], rule="adazo", fo_rule="adamw",
                         lr=lr * (zo_lr / lr), fo_lr=lr, weight_decay=zo_wd,
                         fo_weight_decay=wd, eps=1e-2, num_directions=2, seed=11,
                         fo_steps=2, zo_steps=2)
    return p, opt, arr, grad, view, ref


def _ref_step(ref, arr, grad, view) -> None:
    if ref.next_phase() == "fo":
        leaf = view.detach().clone().requires_grad_(True)
        quad(leaf).backward()
        grad[:] = leaf.grad.numpy()
        ref.fo_step()
    else:
        ref.step(lambda: float(quad(view)))


def test_matches_numpy_optimizer_with_fo_rule():
    p, opt, arr, grad, view, ref = _pair(lr=0.02, zo_lr=0.004, wd=0.1, zo_wd=0.01)
    for _ in range(9):
        opt.step(lambda: quad(p))
        _ref_step(ref, arr, grad, view)
        np.testing.assert_array_equal(bits(p), bits(arr))
    assert (opt.updates, opt.fo_updates) == (ref.updates, ref.fo_updates) == (4, 5)
    # The saved states are the same bytes: torch's is the C optimizer's, as numpy sees it.
    assert shard_state(opt) == bytes(ref.state_dict())


def test_schedulers_scale_zo_lr_with_lr():
    """zo_lr keeps its ratio to lr: a scheduler scaling group['lr'] scales both."""
    p, opt, arr, grad, view, ref = _pair(lr=0.05, zo_lr=0.01, wd=0.0, zo_wd=0.0)
    assert opt.param_groups[0]["zo_lr_ratio"] == pytest.approx(0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for i in range(8):
        opt.step(lambda: quad(p))
        _ref_step(ref, arr, grad, view)
        sched.step()
        lr = 0.05 * 0.5 ** (i + 1)
        ref.set_fo_lr(lr)
        ref.set_lr(lr * opt.param_groups[0]["zo_lr_ratio"])
    np.testing.assert_array_equal(bits(p), bits(arr))
    assert opt.param_groups[0]["zo_lr_ratio"] == pytest.approx(0.2)


def test_param_group_zo_lr_is_a_ratio_to_its_own_lr():
    a, b = param(10, 1), param(10, 2)
    opt = ht.Hybrid([{"params": [a], "lr": 0.1, "zo_lr": 0.01}, {"params": [b]}], lr=0.02,
                    zo_lr=0.01, seed=0)
    assert [g["zo_lr_ratio"] for g in opt.param_groups] == [pytest.approx(0.1),
                                                            pytest.approx(0.5)]
    assert "zo_lr" not in opt.param_groups[0]
    cfgs = [s.c for s in opt._shards]
    opt._prepare()
    assert [c.get_config().lr for c in cfgs] == [pytest.approx(0.01), pytest.approx(0.01)]
    assert [c.get_config().fo_lr for c in cfgs] == [pytest.approx(0.1), pytest.approx(0.02)]


# --------------------------------------------------------------------------------------
# spec v2 §4: non-finite projected gradients


@pytest.mark.parametrize("kind", ["zo", "hybrid"])
def test_non_finite_projected_gradient_is_skipped(kind):
    """Finite losses, eps so small that g_d = (L+ - L-) / 2 eps overflows: the step is
    skipped (without the rule every weight would become Inf or NaN)."""
    p = param(30)
    before = bits(p)
    if kind == "zo":
        opt = ht.ZO([p], lr=0.1, eps=1e-40, rule="adamw", seed=0)
    else:
        opt = ht.Hybrid([p], fo_steps=0, zo_steps=0, lr=0.1, eps=1e-40, seed=0)
    losses = iter([1.0, 2.0])
    opt.step(lambda: next(losses), **({} if kind == "zo" else {"phase": "zo"}))
    assert opt.skipped == 1 and opt.steps == 1 and opt.updates == 0
    # eps = 1e-40 does not move a float32 weight of magnitude ~1: restored bit for bit.
    np.testing.assert_array_equal(bits(p), before)
    state = shard_state(opt)
    assert counters(state)[1:] == (0, 0) and not any(state[HEADER:-4])
    # Finite estimates update as usual.
    opt.step(lambda: quad(p), **({} if kind == "zo" else {"phase": "zo"}))
    assert opt.skipped == 1 and opt.updates == 1


# --------------------------------------------------------------------------------------
# state dicts


def test_state_dict_round_trip_with_both_states_and_a_scheduler():
    def make(params, seed):
        return ht.Hybrid(params, fo_steps=2, zo_steps=3, lr=0.02, zo_lr=0.005, eps=1e-2,
                         weight_decay=0.05, seed=seed, num_directions=2)

    def run(opt, sched, params, steps):
        for _ in range(steps):
            opt.step(lambda: sum(quad(q) for q in params))
            sched.step()

    pa = [param(33, 1), param(17, 2)]
    oa = make(pa, seed=5)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    run(oa, sa, pa, 4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in pa], "opt": oa.state_dict(),
                "sched": sa.state_dict()}, buf)
    run(oa, sa, pa, 7)

    buf.seek(0)
    saved = torch.load(buf)
    pb = [nn.Parameter(t.clone()) for t in saved["params"]]
    ob = make(pb, seed=999)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    ob.load_state_dict(saved["opt"])
    sb.load_state_dict(saved["sched"])
    assert (ob.steps, ob.updates, ob.fo_updates) == (4, 2, 2)
    run(ob, sb, pb, 7)
    for a, b in zip(pa, pb):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert shard_state(oa) == shard_state(ob)


def test_state_dict_of_the_single_rule_hybrid_still_loads():
    """A state dict of the Hybrid before spec v2 (groups with 'rule', one shared state)
    loads and continues as that optimizer did."""
    pa = [param(20)]
    oa = ht.Hybrid(pa, fo_steps=1, zo_steps=1, rule="adamw", seed=4)
    for _ in range(3):
        oa.step(lambda: quad(pa[0]))
    sd = oa.state_dict()
    for g in sd["param_groups"]:  # the old spelling of the groups
        g["rule"] = g.pop("zo_rule")
        for k in ("fo_rule", "zo_lr_ratio", "zo_weight_decay"):
            del g[k]
    pb = [nn.Parameter(pa[0].detach().clone())]
    ob = ht.Hybrid(pb, fo_steps=1, zo_steps=1, seed=0)  # the new default: two states
    ob.load_state_dict(sd)
    g = ob.param_groups[0]
    assert (g["fo_rule"], g["zo_rule"], g["zo_lr_ratio"]) == (None, "adamw", None)
    for _ in range(4):
        oa.step(lambda: quad(pa[0]))
        ob.step(lambda: quad(pb[0]))
    np.testing.assert_array_equal(bits(pa[0]), bits(pb[0]))


def test_torch_and_numpy_states_load_into_each_other():
    """C/Python round trip: the state torch saved continues in the numpy optimizer (the C
    ABI directly) bit for bit, and back."""
    p, opt, arr, grad, view, ref = _pair(lr=0.02, zo_lr=0.01, wd=0.0, zo_wd=0.0)
    for _ in range(5):
        opt.step(lambda: quad(p))
        _ref_step(ref, arr, grad, view)
    torch_state = opt.state_dict()
    # numpy continues from torch's state, torch from numpy's.
    ref.load_state_dict(torch_state["hyzo"]["shards"][0])
    torch_state["hyzo"]["shards"][0] = bytes(ref.state_dict())
    opt.load_state_dict(torch_state)
    for _ in range(5):
        opt.step(lambda: quad(p))
        _ref_step(ref, arr, grad, view)
    np.testing.assert_array_equal(bits(p), bits(arr))


def test_state_dict_refuses_a_corrupted_state_and_changes_nothing():
    p = param(16)
    opt = ht.Hybrid([p], fo_steps=1, zo_steps=1, seed=0)
    for _ in range(3):
        opt.step(lambda: quad(p))
    sd = opt.state_dict()
    good = sd["hyzo"]["shards"][0].clone()
    bad = good.clone()
    bad[HEADER + 5] ^= 1  # one bit of a moment buffer: the checksum catches it
    sd["hyzo"]["shards"][0] = bad
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises(hyzo.InvalidArgumentError):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-3
    assert torch.equal(opt.state_dict()["hyzo"]["shards"][0], good)
    sd["hyzo"]["shards"][0] = good[:-1]  # truncated
    with pytest.raises(hyzo.InvalidArgumentError):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state_dict()["hyzo"]["shards"][0], good)
