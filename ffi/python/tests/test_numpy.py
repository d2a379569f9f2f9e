"""hyzo.Optimizer over numpy arrays and hyzo.directions."""

from __future__ import annotations

import inspect
import subprocess

import ml_dtypes
import numpy as np
import pytest

import hyzo
from conftest import bits, cli_path
from hyzo import _lib

BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------------------
# directions


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("seed,step,direction,start,count",
                         [(1, 0, 0, 0, 16), (0xDEADBEEFCAFE, 7, 3, 1000003, 37),
                          (2**64 - 1, 2**32 - 1, 5, 2**40 + 1, 9)])
def test_directions_match_cli(kind, seed, step, direction, start, count):
    cli = cli_path()
    if cli is None:
        pytest.skip("target/release/hyzo (the CLI) is not built")
    out = subprocess.run(
        [str(cli), "directions", "--kind", kind, "--seed", str(seed), "--step", str(step),
         "--direction", str(direction), "--start", str(start), "--count", str(count)],
        check=True, capture_output=True, text=True).stdout.split()
    expected = np.array([float(v) for v in out], dtype=np.float32)
    got = hyzo.directions(kind, seed, step, direction, start, count)
    assert got.dtype == np.float32 and got.shape == (count,)
    np.testing.assert_array_equal(got, expected)


def test_directions_properties():
    z = hyzo.directions("gaussian", 42, 0, 0, 0, 200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    r = hyzo.directions("rademacher", 42, 0, 0, 0, 10_000)
    assert set(np.unique(r)) == {-1.0, 1.0}
    # Entries are named by their global index: a window equals the slice of a larger one.
    big = hyzo.directions("gaussian", 5, 3, 1, 0, 1000)
    np.testing.assert_array_equal(hyzo.directions("gaussian", 5, 3, 1, 123, 77), big[123:200])
    # Sphere gives the unscaled Gaussian.
    np.testing.assert_array_equal(hyzo.directions("sphere", 5, 3, 1, 0, 1000), big)
    # Different steps / directions / seeds differ.
    assert not np.array_equal(hyzo.directions("gaussian", 5, 4, 1, 0, 1000), big)
    assert not np.array_equal(hyzo.directions("gaussian", 5, 3, 2, 0, 1000), big)
    assert hyzo.directions("gaussian", 1, 0, 0, 0, 0).shape == (0,)


def test_directions_errors():
    with pytest.raises(ValueError, match="kind"):
        hyzo.directions("uniform", 0, 0, 0, 0, 4)
    with pytest.raises(ValueError, match="seed"):
        hyzo.directions("gaussian", -1, 0, 0, 0, 4)
    with pytest.raises(ValueError, match="step"):
        hyzo.directions("gaussian", 0, 2**32, 0, 0, 4)
    with pytest.raises(ValueError, match="count"):
        hyzo.directions("gaussian", 0, 0, 0, 2**64 - 2, 4)


# --------------------------------------------------------------------------------------
# the maths, checked against the spec from the directions (two tolerances: fp32 passes)


def quad(x):
    return float(np.sum(np.asarray(x, dtype=np.float64) ** 2))


@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
@pytest.mark.parametrize("q", [1, 3])
def test_zo_sgd_step_matches_spec(estimator, q, rng):
    x0 = rng.standard_normal(50).astype(np.float32)
    x = x0.copy()
    lr, mu, seed = 0.01, 1e-2, 99
    opt = hyzo.Optimizer([x], lr=lr, eps=mu, seed=seed, num_directions=q, estimator=estimator)
    seen = []

    def loss():
        seen.append(x.copy())
        return quad(x)

    ret = opt.step(loss)
    assert len(seen) == (2 * q if estimator == "two_sided" else q + 1)
    zs = [hyzo.directions("gaussian", seed, 0, d, 0, 50).astype(np.float64) for d in range(q)]
    ghat = np.zeros(50)
    if estimator == "two_sided":
        for d, z in enumerate(zs):
            np.testing.assert_allclose(seen[2 * d], x0 + mu * z, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(seen[2 * d + 1], x0 - mu * z, rtol=1e-5, atol=1e-6)
            g = (quad(seen[2 * d]) - quad(seen[2 * d + 1])) / (2 * mu)
            ghat += g * z / q
        assert ret == pytest.approx(np.mean([quad(s) for s in seen]))
    else:
        np.testing.assert_array_equal(seen[0], x0)
        for d, z in enumerate(zs):
            np.testing.assert_allclose(seen[d + 1], x0 + mu * z, rtol=1e-5, atol=1e-6)
            g = (quad(seen[d + 1]) - quad(seen[0])) / mu
            ghat += g * z / q
        assert ret == quad(x0)
    np.testing.assert_allclose(x, x0 - lr * ghat, rtol=1e-4, atol=1e-5)
    assert opt.steps == 1 and opt.skipped == 0
    assert len(opt.projected_grads()) == q


def test_feed_style_equals_closure_style(rng):
    x0 = rng.standard_normal(300).astype(np.float32)
    a, b = x0.copy(), x0.copy()
    kw = dict(lr=0.05, eps=1e-3, seed=7, rule="adamw", num_directions=2)
    oa, ob = hyzo.Optimizer([a], **kw), hyzo.Optimizer([b], **kw)
    for _ in range(5):
        oa.step(lambda: quad(a))
        ob.begin()
        while ob.feed(quad(b)):
            pass
    np.testing.assert_array_equal(bits(a), bits(b))
    assert ob.last_loss()[1] is False


def test_loss_goes_down_all_rules(rng):
    for rule in ["sgd", "momentum", "sign", "signum", "adamw", "adazo"]:
        x = rng.standard_normal(20).astype(np.float32)
        start = quad(x)
        lr = {"sgd": 0.02, "momentum": 0.005, "sign": 0.01, "signum": 0.01, "adamw": 0.05,
              "adazo": 0.05}[rule]
        opt = hyzo.Optimizer([x], lr=lr, seed=1, rule=rule, num_directions=4)
        for _ in range(200):
            opt.step(lambda: quad(x))
        assert quad(x) < 0.5 * start, rule


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("precision", ["nearest", "stochastic", "compensated"])
def test_dtypes_and_precisions(dtype, precision, rng):
    x = rng.standard_normal(64).astype(dtype)
    start = quad(x)
    # eps well above the bf16 ulp: with "nearest" a smaller perturbation rounds away.
    opt = hyzo.Optimizer([x], lr=0.02, eps=0.05, seed=3, precision=precision, num_directions=2)
    for _ in range(100):
        opt.step(lambda: quad(x))
    assert x.dtype == dtype
    assert quad(x) < 0.5 * start


def test_offsets_equal_concatenation(rng):
    full0 = rng.standard_normal(100).astype(np.float32)
    full = full0.copy()
    parts = [full0[:30].copy(), full0[30:].copy()]
    kw = dict(lr=0.01, seed=11, rule="momentum", directions="rademacher")
    of = hyzo.Optimizer([full], **kw)
    # Explicit offsets, given out of order, equal the automatic layout.
    op = hyzo.Optimizer([(parts[1], 30), (parts[0], 0)], **kw)
    for _ in range(4):
        of.step(lambda: quad(full))
        op.step(lambda: quad(parts[0]) + quad(parts[1]))
    np.testing.assert_array_equal(bits(full), bits(np.concatenate(parts)))


def test_sphere_directions(rng):
    x = rng.standard_normal(40).astype(np.float32)
    opt = hyzo.Optimizer([x], lr=0.01, eps=1e-2, seed=2, directions="sphere")
    x0 = x.copy()
    seen = []
    opt.step(lambda: seen.append(x.copy()) or quad(x))
    z = hyzo.directions("gaussian", 2, 0, 0, 0, 40).astype(np.float64)
    u = z / np.linalg.norm(z)
    np.testing.assert_allclose(seen[0], x0 + 1e-2 * u, rtol=1e-5, atol=1e-6)
    norms = opt.local_sq_norms()
    assert len(norms) == 1 and norms[0] > 0


def test_state_round_trip(rng):
    x0 = rng.standard_normal(77).astype(BF16)
    kw = dict(lr=0.01, seed=5, rule="adamw", precision="compensated", num_directions=2)
    a = x0.copy()
    oa = hyzo.Optimizer([a], **kw)
    for _ in range(3):
        oa.step(lambda: quad(a))
    saved_x, saved_state = a.copy(), oa.state_dict()
    for _ in range(4):
        oa.step(lambda: quad(a))
    b = saved_x.copy()
    ob = hyzo.Optimizer([b], **kw)
    ob.load_state_dict(saved_state)
    assert ob.steps == 3
    for _ in range(4):
        ob.step(lambda: quad(b))
    np.testing.assert_array_equal(bits(a), bits(b))
    # Another configuration refuses the state.
    oc = hyzo.Optimizer([saved_x.copy()], **{**kw, "seed": 6})
    with pytest.raises(hyzo.InvalidArgumentError, match="configuration"):
        oc.load_state_dict(saved_state)
    with pytest.raises(ValueError):
        oc.load_state_dict(b"garbage")


def test_first_order_and_hybrid(rng):
    x = rng.standard_normal(16).astype(np.float32)
    g = np.zeros(16, dtype=np.float32)
    opt = hyzo.Optimizer([x], grads=[g], lr=0.1, rule="sgd", fo_steps=2, zo_steps=1, seed=0)
    phases = []
    for _ in range(6):
        phase = opt.next_phase()
        phases.append(phase)
        if phase == "fo":
            g[:] = 2 * x
            before = x.copy()
            opt.fo_step()
            np.testing.assert_allclose(x, before - 0.1 * 2 * before, rtol=1e-6)
        else:
            opt.step(lambda: quad(x))
    assert phases == ["fo", "fo", "zo", "fo", "fo", "zo"]
    opt.fo_step()
    opt.fo_step()
    assert opt.next_phase() == "zo"
    with pytest.raises(hyzo.BadStateError):
        opt.fo_step()  # the schedule calls for a zeroth-order step


def test_nan_loss_skips(rng):
    x0 = rng.standard_normal(8).astype(np.float32)
    x = x0.copy()
    opt = hyzo.Optimizer([x], lr=0.1, seed=0)
    opt.step(lambda: float("nan"))
    np.testing.assert_array_equal(bits(x), bits(x0))
    assert opt.skipped == 1 and opt.steps == 1
    assert opt.last_loss()[1] is True


def test_closure_exception_restores(rng):
    x0 = rng.standard_normal(8).astype(np.float32)
    x = x0.copy()
    opt = hyzo.Optimizer([x], lr=0.1, seed=0)
    calls = []

    def bad():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return quad(x)

    with pytest.raises(KeyError):
        opt.step(bad)
    np.testing.assert_array_equal(bits(x), bits(x0))
    assert opt.steps == 0
    opt.step(lambda: quad(x))  # usable afterwards
    assert opt.steps == 1


def test_set_lr():
    x = np.ones(4, dtype=np.float32)
    opt = hyzo.Optimizer([x], lr=0.1)
    opt.lr = 0.5
    assert opt.lr == 0.5
    with pytest.raises(ValueError, match="lr"):
        opt.set_lr(float("nan"))
    opt.set_weight_decay(0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.set_weight_decay(-1)


def test_errors():
    x = np.ones(8, dtype=np.float32)
    with pytest.raises(TypeError, match="dtype"):
        hyzo.Optimizer([np.ones(4, dtype=np.float64)])
    with pytest.raises(TypeError, match="numpy"):
        hyzo.Optimizer([[1.0, 2.0]])
    with pytest.raises(ValueError, match="contiguous"):
        hyzo.Optimizer([np.ones((4, 4), dtype=np.float32)[:, 1]])
    ro = np.ones(4, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        hyzo.Optimizer([ro])
    with pytest.raises(ValueError, match="rule"):
        hyzo.Optimizer([x], rule="lion")
    with pytest.raises(ValueError, match="eps"):
        hyzo.Optimizer([x], eps=0.0)
    with pytest.raises(ValueError, match="num_directions"):
        hyzo.Optimizer([x], num_directions=0)
    with pytest.raises(ValueError, match="overlap"):
        hyzo.Optimizer([(x, 0), (np.ones(4, dtype=np.float32), 4)])
    with pytest.raises(ValueError, match="grads"):
        hyzo.Optimizer([x], grads=[np.ones(3, dtype=np.float32)])
    opt = hyzo.Optimizer([x])
    with pytest.raises(hyzo.BadStateError):
        opt.feed(1.0)  # no step in progress
    with pytest.raises(hyzo.HyzoError):
        opt.fo_step()  # no gradients registered
    opt.begin()
    with pytest.raises(hyzo.BadStateError):
        opt.begin()
    opt.abort()
    opt.close()
    with pytest.raises(ValueError, match="closed"):
        opt.begin()
    # The error message names the C function and the status.
    try:
        hyzo.Optimizer([x], lr=-1.0)
    except hyzo.InvalidArgumentError as e:
        assert "lr" in str(e) and e.status == "HYZO_ERR_INVALID_ARGUMENT"


def test_library_info():
    assert hyzo.__version__.count(".") == 2
    assert hyzo.library_path.endswith("libhyzo.so")
    assert isinstance(hyzo.cuda_available(), bool)


# --------------------------------------------------------------------------------------
# a first-order rule of its own (spec v2 §5)


def test_fo_rule_has_its_own_state_and_lr(rng):
    """With fo_rule, first-order steps run their rule on their own state with fo_lr: with
    no zeroth-order step in between they equal a single-rule optimizer at that lr."""
    x0 = rng.standard_normal(50).astype(np.float32)
    a, b = x0.copy(), x0.copy()
    ga, gb = np.zeros_like(a), np.zeros_like(b)
    oa = hyzo.Optimizer([a], grads=[ga], rule="adazo", lr=1.0, fo_rule="adamw", fo_lr=0.01,
                        fo_weight_decay=0.1, weight_decay=5.0)
    ob = hyzo.Optimizer([b], grads=[gb], rule="adamw", lr=0.01, weight_decay=0.1)
    for _ in range(4):
        ga[:] = 2 * a
        gb[:] = 2 * b
        oa.fo_step()
        ob.fo_step()
    np.testing.assert_array_equal(bits(a), bits(b))
    assert (oa.updates, oa.fo_updates) == (0, 4) and (ob.updates, ob.fo_updates) == (4, 0)
    assert oa.fo_lr == pytest.approx(0.01) and ob.fo_lr is None
    # A zeroth-order step updates the other state only.
    oa.step(lambda: quad(a))
    assert (oa.updates, oa.fo_updates, oa.steps) == (1, 4, 5)
    # fo_lr None: first-order steps follow lr again.
    oa.set_fo_lr(None)
    assert oa.fo_lr is None
    oa.fo_lr = 0.5
    assert oa.fo_lr == 0.5
    oa.set_fo_weight_decay(None)
    with pytest.raises(ValueError, match="fo_lr"):
        oa.set_fo_lr(float("nan"))  # NaN is not a spelling of "follow lr" in Python
    with pytest.raises(ValueError, match="fo_lr"):
        oa.set_fo_lr(-1.0)
    with pytest.raises(ValueError, match="fo_rule"):
        hyzo.Optimizer([x0.copy()], fo_rule="lion")
    with pytest.raises(ValueError, match="fo_weight_decay"):
        hyzo.Optimizer([x0.copy()], fo_rule="adamw", fo_weight_decay=float("nan"))


def test_fo_rule_state_round_trip_through_files(rng, tmp_path):
    """save_state/load_state (files, streamed by the library) and state_dict (memory) hold
    the same bytes, and either resumes the run bit for bit."""
    x0 = rng.standard_normal(300).astype(BF16)
    kw = dict(rule="adazo", fo_rule="adamw", lr=0.01, fo_lr=0.02, fo_steps=2, zo_steps=2,
              seed=8, precision="compensated", num_directions=2)

    def run(opt, x, g, steps):
        for _ in range(steps):
            if opt.next_phase() == "fo":
                g[:] = (2 * x.astype(np.float32)).astype(g.dtype)
                opt.fo_step()
            else:
                opt.step(lambda: quad(x))

    a, ga = x0.copy(), np.zeros(300, np.float32)
    oa = hyzo.Optimizer([a], grads=[ga], **kw)
    run(oa, a, ga, 5)
    path = tmp_path / "state.hyzo"
    oa.save_state(path)
    saved_x, saved = a.copy(), oa.state_dict()
    assert isinstance(saved, bytearray) and path.read_bytes() == bytes(saved)
    run(oa, a, ga, 6)

    for load in ("file", "bytes", "memoryview"):
        b, gb = saved_x.copy(), np.zeros(300, np.float32)
        ob = hyzo.Optimizer([b], grads=[gb], **kw)
        if load == "file":
            ob.load_state(str(path))
        elif load == "bytes":
            ob.load_state_dict(bytes(saved))
        else:
            ob.load_state_dict(memoryview(np.frombuffer(bytes(saved), np.uint8)))
        assert (ob.steps, ob.updates, ob.fo_updates) == (5, 2, 3)
        run(ob, b, gb, 6)
        np.testing.assert_array_equal(bits(a), bits(b))


def test_bad_state_files_change_nothing(rng, tmp_path):
    x = rng.standard_normal(20).astype(np.float32)
    g = np.zeros_like(x)
    opt = hyzo.Optimizer([x], grads=[g], rule="adazo", fo_rule="adamw", seed=0)
    g[:] = 1
    opt.fo_step()
    opt.step(lambda: quad(x))
    good = bytes(opt.state_dict())
    with pytest.raises(hyzo.HyzoIOError) as e:
        opt.load_state(tmp_path / "missing")
    assert isinstance(e.value, OSError) and "missing" in str(e.value)
    with pytest.raises(OSError):
        opt.save_state(tmp_path / "no-such-dir" / "state")
    corrupt = bytearray(good)
    corrupt[70] ^= 0x10
    (tmp_path / "corrupt").write_bytes(bytes(corrupt))
    (tmp_path / "short").write_bytes(good[:-9])
    other = hyzo.Optimizer([x.copy()], grads=[g.copy()], rule="adamw", seed=0)  # no fo_rule
    g[:] = 1
    other.fo_step()
    other.save_state(tmp_path / "foreign")
    for name in ("corrupt", "short", "foreign"):
        with pytest.raises(hyzo.InvalidArgumentError):
            opt.load_state(tmp_path / name)
        assert bytes(opt.state_dict()) == good, name
    with pytest.raises(ValueError, match="NUL"):
        opt.save_state("bad\0name")
    with pytest.raises(TypeError, match="bytes-like"):
        opt.load_state_dict(12345)
    # A failed save never leaves a partial file where the state goes (written beside it,
    # then renamed).
    assert not (tmp_path / "no-such-dir").exists()


def test_displace_binding_adds_scale_times_the_direction(rng):
    """hyzo_optimizer_displace through the binding: x + scale * z at the global indices."""
    x0 = rng.standard_normal(40).astype(np.float32)
    x = x0.copy()
    opt = hyzo.Optimizer([(x, 1000)], directions="rademacher")
    opt._c.displace(seed=9, step=3, direction=1, scale=0.25)
    z = hyzo.directions("rademacher", 9, 3, 1, 1000, 40)
    np.testing.assert_array_equal(x, x0 + np.float32(0.25) * z)
    assert opt.steps == 0
    with pytest.raises(ValueError, match="step"):
        opt._c.displace(seed=9, step=2**32, direction=0, scale=1.0)


def test_lowrank_directions_train_a_matrix_never_written_mid_step():
    # y = W x: the forward adds c (x B) Aᵀ / sqrt(r) (spec §7); W keeps its bits until the
    # update, the bias (no shape) takes the written Gaussian.
    rng = np.random.default_rng(3)
    rows, cols, rank = 6, 5, 2
    target = rng.standard_normal((rows, cols)).astype(np.float32)
    xs = rng.standard_normal((32, cols)).astype(np.float32)
    w = np.zeros((rows, cols), dtype=np.float32)
    b = np.zeros(rows, dtype=np.float32)
    opt = hyzo.Optimizer([w, b], lr=0.02, eps=1e-2, num_directions=2, seed=5,
                         directions="lowrank", rank=rank, shapes={0: (rows, cols)})
    cr = np.float32(1.0 / np.sqrt(rank))

    def loss():
        d, c = opt.forward_perturbation()
        y = xs @ w.T + b
        if c != 0.0:
            f = opt.lowrank_factors(d)
            a, bf = f[:rows * rank].reshape(rows, rank), f[rows * rank:].reshape(cols, rank)
            y = y + c * cr * ((xs @ bf) @ a.T)
        return float(np.mean((y - xs @ target.T) ** 2))

    start = float(np.mean((xs @ target.T) ** 2))
    for _ in range(150):
        before = w.copy()
        opt.begin()
        while True:
            assert np.array_equal(w, before)
            if not opt.feed(loss()):
                break
    assert opt.lowrank_factors(0).size == (rows + cols) * rank
    end = float(np.mean((xs @ w.T + b - xs @ target.T) ** 2))
    assert end < 0.5 * start, (start, end)
    with pytest.raises(hyzo.InvalidArgumentError):
        hyzo.Optimizer([np.zeros(6, np.float32)], directions="lowrank", shapes={0: (4, 2)})


def test_non_finite_gradients_skip_unless_turned_off(rng):
    """Issue 29: a first-order step (or a mixed zeroth-order one) whose gradient holds a NaN
    or an infinity changes nothing and is counted, as torch.amp.GradScaler skips it;
    ``skip_nonfinite_grads=False`` applies it as torch.optim does."""
    x0 = rng.standard_normal(16).astype(np.float32)
    x, g = x0.copy(), np.full(16, 0.5, np.float32)
    g[3] = np.inf
    opt = hyzo.Optimizer([x], grads=[g], lr=0.1, rule="adamw", seed=0)
    assert opt.fo_step() is True
    np.testing.assert_array_equal(bits(x), bits(x0))
    assert (opt.steps, opt.skipped, opt.updates) == (1, 1, 0)
    g[3] = 0.5
    assert opt.fo_step() is False
    assert np.all(x < x0)
    mixed = hyzo.Optimizer([x0.copy()], grads=[np.full(16, np.nan, np.float32)], lr=0.1,
                           hybrid_alpha=0.5, seed=0)
    mixed.step(lambda: 1.0)
    assert mixed.last_loss()[1] is True and mixed.skipped == 1
    y = x0.copy()
    torch_like = hyzo.Optimizer([y], grads=[g], lr=0.1, seed=0, skip_nonfinite_grads=False)
    g[3] = np.nan
    assert torch_like.fo_step() is False
    assert np.isnan(y[3]) and torch_like.skipped == 0
    with pytest.raises(ValueError, match="skip_nonfinite_grads"):
        hyzo.Optimizer([x0.copy()], skip_nonfinite_grads="no")


def test_displacement_that_would_overflow_is_refused(rng):
    x0 = rng.standard_normal(64).astype(np.float32)
    x = x0.copy()
    opt = hyzo.Optimizer([x])
    with pytest.raises(hyzo.InvalidArgumentError, match="non-finite"):
        opt._c.displace(seed=1, step=0, direction=0, scale=3e38)
    np.testing.assert_array_equal(bits(x), bits(x0))


def test_state_files_with_impossible_moments_or_not_regular_are_refused(rng, tmp_path):
    import os
    import struct

    x = rng.standard_normal(10).astype(np.float32)
    opt = hyzo.Optimizer([x], rule="adamw", seed=0)
    opt.step(lambda: quad(x))
    good = bytearray(opt.state_dict())
    bad = bytearray(good)
    bad[64 + 40:64 + 44] = struct.pack("<f", -1.0)  # v[0] (body: m, v of 10 elements)
    bad[-4:] = struct.pack("<I", _crc32c(bytes(bad[:-4])))
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(hyzo.InvalidArgumentError, match="second moment"):
        opt.load_state(tmp_path / "bad")
    with pytest.raises(hyzo.InvalidArgumentError, match="second moment"):
        opt.load_state_dict(bad)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(hyzo.HyzoIOError, match="not a regular file"):
        opt.load_state(tmp_path / "fifo")
    assert opt.state_dict() == good
    # Refused loads poison nothing (only a failed pass does).
    assert opt.poisoned is False


def _crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected), bit by bit."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_options_and_defaults_are_the_configurations():
    """hyzo.Optimizer takes exactly make_config's options, with its defaults (written once,
    in _lib); an unknown one is refused by name, and leaving every option out configures
    the optimizer as spelling every default does."""
    sig = inspect.signature(hyzo.Optimizer).parameters
    for name, default in _lib.CONFIG_DEFAULTS.items():
        assert sig[name].default == default and sig[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert set(sig) == {"params", "grads", "num_threads", "shapes"} | set(_lib.CONFIG_DEFAULTS)
    x = np.zeros(8, dtype=np.float32)
    with pytest.raises(TypeError, match="'lrr'"):
        hyzo.Optimizer([x], lrr=0.1)
    a, b = np.full(8, 0.5, np.float32), np.full(8, 0.5, np.float32)
    plain, spelled = hyzo.Optimizer([a]), hyzo.Optimizer([b], **_lib.CONFIG_DEFAULTS)
    for o, v in ((plain, a), (spelled, b)):
        o.step(lambda v=v: float((v ** 2).sum()))
    assert bytes(plain.state_dict()) == bytes(spelled.state_dict())
    np.testing.assert_array_equal(a, b)
