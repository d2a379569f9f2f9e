"""Every Python front end owns the memory it registered with the library (issue 29, 1): no
caller can free an array or a parameter's storage that a C optimizer still writes."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import hyzo


def quad_np(arrays) -> float:
    return float(sum(((a.astype(np.float64) - 0.3) ** 2).sum() for a in arrays))


def test_numpy_params_and_grads_are_read_only():
    a = np.full(4096, 0.5, np.float32)
    g = np.zeros(4096, np.float32)
    o = hyzo.Optimizer([a], grads=[g], lr=0.1, seed=1)
    assert o.params[0] is a and o.grads[0] is g
    with pytest.raises(AttributeError):
        o.params.clear()  # the reproduction: a tuple has no clear()
    with pytest.raises(AttributeError):
        o.params = []
    with pytest.raises(AttributeError):
        o.grads = None
    with pytest.raises(TypeError):
        o.params[0] = np.zeros(4096, np.float32)
    assert o.offsets == (0,)
    o.close()


def test_numpy_optimizer_keeps_the_registered_arrays_alive():
    """Even with every reference of the front end and the caller gone, the arrays live as
    long as the C optimizer: a new array allocated afterwards is never written."""
    o = hyzo.Optimizer([np.full(4096, 0.5, np.float32), np.full(1000, 0.5, np.float16)],
                       grads=[np.zeros(4096, np.float32), np.zeros(1000, np.float16)],
                       lr=0.1, seed=1)
    # Drop every reference the front end holds (attributes, whatever their names): only
    # the C optimizer's own remain.
    for k in [k for k, v in vars(o).items() if isinstance(v, (list, tuple))]:
        del o.__dict__[k]
    gc.collect()
    victims = [np.full(4096, 7.0, np.float32) for _ in range(64)]
    for _ in range(3):
        o.step(lambda: 1.0)
        o.fo_step()
    assert all((v == 7.0).all() for v in victims)
    o.close()


def test_numpy_close_releases_the_arrays():
    import weakref

    class Array(np.ndarray):
        pass

    a = np.full(64, 0.5, np.float32).view(Array)
    ref = weakref.ref(a)
    o = hyzo.Optimizer([a], lr=0.1, seed=1)
    del a
    for k in [k for k, v in vars(o).items() if isinstance(v, (list, tuple))]:
        del o.__dict__[k]
    gc.collect()
    assert ref() is not None  # owned by the C optimizer
    o.close()
    gc.collect()
    assert ref() is None


torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import hyzo.torch as ht  # noqa: E402


def quad(ps) -> torch.Tensor:
    return sum(((p.float() - 0.3) ** 2).sum() for p in ps)


@pytest.mark.parametrize("kind", ["zo", "hybrid", "fo"])
def test_torch_parameter_dropped_from_its_group_after_a_step_is_refused(kind):
    """A parameter removed from every group after the first step: the next step refuses
    (the C state is laid out for the registered set) instead of rebuilding the optimizers
    and losing their state, and the dropped storage is never freed under the library."""
    ps = [nn.Parameter(torch.full((4096,), 0.5)), nn.Parameter(torch.full((100,), 0.5))]
    if kind == "zo":
        opt = ht.ZO(ps, lr=0.01, seed=1)
    elif kind == "hybrid":
        opt = ht.Hybrid(ps, lr=0.01, seed=1, fo_steps=1, zo_steps=1)
    else:
        opt = ht.FO(ps, lr=0.01)

    def closure():
        if kind != "fo":
            return quad(ps)  # ZO and Hybrid run the forwards (and backward) themselves
        opt.zero_grad()
        loss = quad(ps)
        loss.backward()
        return loss

    opt.step(closure)
    steps = opt.steps
    opt.param_groups[0]["params"].remove(ps[0])
    dropped = ps.pop(0)
    ptr = dropped.data_ptr()
    del dropped
    gc.collect()
    victim = torch.full((4096,), 7.0)
    with pytest.raises(RuntimeError, match="parameters of the param groups changed"):
        opt.step(closure)
    assert opt.steps == steps
    assert (victim == 7.0).all()
    # The C optimizer still owns the dropped parameter's storage.
    assert any(o.data_ptr() == ptr for s in opt._shards for o in s.c._owners
               if isinstance(o, torch.Tensor))


def test_torch_reassigned_data_keeps_the_old_storage_alive():
    """``p.data = ...`` frees nothing the library holds: the old storage is owned by the C
    optimizer, and the next step (or perturb_) refuses with the reason."""
    p = nn.Parameter(torch.full((4096,), 0.5))
    opt = ht.ZO([p], lr=0.01, seed=1)
    opt.step(lambda: quad([p]))
    old = p.data_ptr()
    p.data = torch.zeros(4096)
    gc.collect()
    with pytest.raises(RuntimeError, match="storage moved"):
        opt.step(lambda: quad([p]))
    with pytest.raises(RuntimeError, match="storage moved"):
        opt.perturb_(0.1, seed=3)
    assert any(o.data_ptr() == old for s in opt._shards for o in s.c._owners
               if isinstance(o, torch.Tensor))
    assert (p == 0).all()
