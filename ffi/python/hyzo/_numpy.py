"""numpy front end: :class:`Optimizer` over numpy arrays and :func:`directions`."""

from __future__ import annotations

import inspect
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _lib

__all__ = ["Optimizer", "directions", "dtype_code"]

try:  # bf16 through ml_dtypes (optional)
    import ml_dtypes as _ml_dtypes

    _BF16: Optional[np.dtype] = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BF16 = None


def dtype_code(dtype: np.dtype) -> int:
    """The ``hyzo_dtype`` of a numpy dtype (float32, float16, ml_dtypes.bfloat16)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return _lib.DTYPE_CODES["float32"]
    if dtype == np.float16:
        return _lib.DTYPE_CODES["float16"]
    if _BF16 is not None and dtype == _BF16:
        return _lib.DTYPE_CODES["bfloat16"]
    raise TypeError(
        f"hyzo: unsupported dtype {dtype} (expected float32, float16 or ml_dtypes.bfloat16)"
    )


def _check_array(a: Any, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what}: expected a numpy.ndarray, got {type(a).__name__}")
    dtype_code(a.dtype)
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: must be C-contiguous (use numpy.ascontiguousarray and keep "
                         "that array: the optimizer updates it in place)")
    if not a.flags.writeable:
        raise ValueError(f"{what}: must be writeable (it is updated in place)")
    if a.size == 0:
        raise ValueError(f"{what}: is empty")
    return a


def directions(kind: str, seed: int, step: int, direction: int, start: int,
               count: int) -> np.ndarray:
    """Entries ``start .. start + count`` of direction ``(seed, step, direction)`` (spec §3).

    Exactly the values the optimizers perturb with, as a float32 array. ``kind`` is
    ``"gaussian"``, ``"rademacher"`` or ``"sphere"`` (which gives the unscaled Gaussian: the
    sphere's ``1/||z||`` depends on every element an optimizer holds).
    """
    for name, v, hi in (("seed", seed, 2**64), ("step", step, 2**32),
                        ("direction", direction, 2**32), ("start", start, 2**64),
                        ("count", count, 2**64)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < hi:
            raise ValueError(f"{name}: expected an integer in [0, {hi}), got {v!r}")
    out = np.empty(int(count), dtype=np.float32)
    # A zero-length array may have no buffer: give C a valid pointer all the same.
    buf = out if count else np.empty(1, dtype=np.float32)
    _lib.directions_fill(kind, int(seed), int(step), int(direction), int(start), int(count),
                         buf.ctypes.data)
    return out


ParamSpec = Union[np.ndarray, Tuple[np.ndarray, int]]


class Optimizer:
    """A hyzo optimizer over numpy arrays, updated in place (CPU backend).

    Args:
        params: arrays (float32, float16, ``ml_dtypes.bfloat16``; C-contiguous, writeable) or
            ``(array, global_offset)`` pairs. Without offsets the arrays are laid one after
            the other in the model's flat parameter vector, from 0.
        grads: optional gradient arrays, one per param with the same number of elements
            (any supported dtype); needed for :meth:`fo_step` and ``hybrid_alpha > 0``. Write
            them in place before each first-order step.
        lr, eps, rule, betas, adam_eps, weight_decay, directions, num_directions, estimator,
        precision, seed, fo_steps, zo_steps, hybrid_alpha: the ``hyzo_config`` fields (see the
            README); enums as strings (``rule="adamw"``, ``directions="rademacher"``, ...).
            ``rule``, ``lr`` and ``weight_decay`` are those of zeroth-order steps, and of
            first-order steps too without ``fo_rule``.
        fo_rule: the rule of first-order steps (:meth:`fo_step`), with a state and a step
            count ``t`` of its own that zeroth-order steps never touch (spec v2 §5; the
            paper's hybrid: ``rule="adazo", fo_rule="adamw"``). ``None`` (the default):
            first-order steps apply ``rule`` to the one shared state (spec v1).
        fo_lr, fo_weight_decay: learning rate and weight decay of first-order steps
            (``None``: follow ``lr`` / ``weight_decay``, also when those change later).
        skip_nonfinite_grads: ``True`` (the default): a step whose gradient holds a NaN or
            an infinity (:meth:`fo_step`, or a zeroth-order step with ``hybrid_alpha > 0``)
            changes nothing and is counted in :attr:`skipped`, as ``torch.amp.GradScaler``
            skips it; ``False``: the rule applies it as it is (torch.optim's behaviour).
        num_threads: CPU threads of this optimizer (``None``: the shared pool over all cores;
            at most 1024).
        rank, shapes: low-rank directions (``directions="lowrank"``, spec §7): ``shapes``
            maps a param's index to its row-major ``(rows, cols)``; those arrays get
            ``Z = A Bᵀ / sqrt(min(rank, rows, cols))``, which the forward adds (see
            :meth:`forward_perturbation` and :meth:`lowrank_factors`) and no perturbation
            pass writes. The other arrays get the written Gaussian.

    Feed style::

        opt.begin()
        while True:
            if not opt.feed(loss_fn()):
                break

    Closure style: ``opt.step(loss_fn)``. The optimizer keeps its own reference to every
    array it registered (:attr:`params` and :attr:`grads` are read-only tuples of them) until
    :meth:`close`, so none can be freed while it may still write them; do not resize them
    in place.

    State: :meth:`state_dict` / :meth:`load_state_dict` in memory, :meth:`save_state` /
    :meth:`load_state` to and from a file (streamed by the library, written atomically).

    Threads: one thread at a time per optimizer (a call while another thread is inside a
    call on it raises :class:`hyzo.BadStateError`); distinct optimizers are independent.
    """

    def __init__(
        self,
        params: Iterable[ParamSpec],
        *,
        grads: Optional[Sequence[np.ndarray]] = None,
        num_threads: Optional[int] = None,
        shapes: Optional[Dict[int, Tuple[int, int]]] = None,
        **config: Any,
    ) -> None:
        # The configuration's options and their defaults are make_config's (_lib's one
        # place); the signature below shows them.
        unknown = sorted(set(config) - set(_lib.CONFIG_DEFAULTS))
        if unknown:
            raise TypeError(f"Optimizer: unexpected keyword argument(s) {unknown}; the "
                            f"options are {sorted(_lib.CONFIG_DEFAULTS)}")
        cfg = _lib.make_config(**config)
        specs: List[Tuple[np.ndarray, Optional[int]]] = []
        for i, p in enumerate(params):
            if isinstance(p, tuple):
                if len(p) != 2:
                    raise ValueError(f"params[{i}]: expected (array, global_offset)")
                arr, off = p
                off = _lib.u64(f"params[{i}]: global_offset", off)
                specs.append((_check_array(arr, f"params[{i}]"), off))
            else:
                specs.append((_check_array(p, f"params[{i}]"), None))
        if not specs:
            raise ValueError("params: no arrays given")
        if grads is not None:
            grads = list(grads)
            if len(grads) != len(specs):
                raise ValueError(f"grads: {len(grads)} arrays for {len(specs)} params")
            for i, (g, (a, _)) in enumerate(zip(grads, specs)):
                _check_array(g, f"grads[{i}]")
                if g.size != a.size:
                    raise ValueError(f"grads[{i}]: {g.size} elements, params[{i}] has {a.size}")
        self._c = _lib.COptimizer(cfg, "cpu", num_threads=num_threads)
        self._params: Tuple[np.ndarray, ...] = tuple(a for a, _ in specs)
        self._grads: Optional[Tuple[np.ndarray, ...]] = None if grads is None else tuple(grads)
        offsets: List[int] = []
        self.estimator = config.get("estimator", _lib.CONFIG_DEFAULTS["estimator"])
        self.num_directions = config.get("num_directions",
                                         _lib.CONFIG_DEFAULTS["num_directions"])
        auto = 0
        for i, (a, off) in enumerate(specs):
            if off is None:
                off = auto
                auto += a.size
            g = grads[i] if grads is not None else None
            self._c.add_tensor(a.ctypes.data, dtype_code(a.dtype), a.size, off,
                               g.ctypes.data if g is not None else None,
                               dtype_code(g.dtype) if g is not None else 0,
                               owners=(a,) if g is None else (a, g))
            offsets.append(off)
        self._offsets = tuple(offsets)
        for i, (rows, cols) in sorted((shapes or {}).items()):
            self._c.set_shape(i, rows, cols)

    # ---- what it registered (read-only: the library writes these arrays) ----
    @property
    def params(self) -> Tuple[np.ndarray, ...]:
        """The parameter arrays, in registration order."""
        return self._params

    @property
    def grads(self) -> Optional[Tuple[np.ndarray, ...]]:
        """The gradient arrays (``None`` without gradients)."""
        return self._grads

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Each array's global offset."""
        return self._offsets

    # ---- configuration ----
    @property
    def lr(self) -> float:
        """The current learning rate (of zeroth-order steps, and first-order ones unless
        ``fo_lr`` is set)."""
        return float(self._c.get_config().lr)

    @lr.setter
    def lr(self, value: float) -> None:
        self._c.set_lr(value)

    @property
    def fo_lr(self) -> Optional[float]:
        """The learning rate of first-order steps; ``None`` when it follows :attr:`lr`."""
        v = float(self._c.get_config().fo_lr)
        return None if math.isnan(v) else v

    @fo_lr.setter
    def fo_lr(self, value: Optional[float]) -> None:
        self._c.set_fo_lr(value)

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of later steps."""
        self._c.set_lr(lr)

    def set_weight_decay(self, weight_decay: float) -> None:
        """Sets the decoupled weight decay of later steps."""
        self._c.set_weight_decay(weight_decay)

    def set_fo_lr(self, fo_lr: Optional[float]) -> None:
        """Sets the learning rate of later first-order steps (``None``: follow ``lr``)."""
        self._c.set_fo_lr(fo_lr)

    def set_fo_weight_decay(self, fo_weight_decay: Optional[float]) -> None:
        """Sets the weight decay of later first-order steps (``None``: follow
        ``weight_decay``)."""
        self._c.set_fo_weight_decay(fo_weight_decay)

    def next_phase(self) -> str:
        """``"fo"``, ``"zo"`` (hybrid schedule) or ``"any"`` (no schedule)."""
        return self._c.next_phase()

    @property
    def steps(self) -> int:
        """Steps taken (skipped ones included)."""
        return self._c.stats()[0]

    @property
    def poisoned(self) -> bool:
        """Whether a failed pass (a backend error mid-step) left the arrays in an unknown
        state: every call but :meth:`load_state` / :meth:`load_state_dict` is then refused;
        load a saved state and write its arrays back."""
        return self._c.poisoned()

    @property
    def skipped(self) -> int:
        """Steps skipped: zeroth-order ones whose losses or projected gradients were not
        finite (spec v2 §4: the arrays were restored), and steps whose gradient held a NaN or
        an infinity (``skip_nonfinite_grads``); no state was updated."""
        return self._c.stats()[1]

    @property
    def updates(self) -> int:
        """Updates applied to the state of ``rule`` (its step count ``t``): zeroth-order
        steps not skipped, plus first-order steps when there is no ``fo_rule``."""
        return self._c.updates()[0]

    @property
    def fo_updates(self) -> int:
        """Updates applied to the state of ``fo_rule`` (its ``t``; 0 without ``fo_rule``)."""
        return self._c.updates()[1]

    # ---- low-rank directions ----
    def lowrank_factors(self, direction: int) -> np.ndarray:
        """The factors of ``direction`` of the current step (the step in progress, else the
        next one), f32: for each shaped array in index order, ``A`` (rows x r) then ``B``
        (cols x r), row-major."""
        out = np.zeros(self._c.lowrank_factors_len(), dtype=np.float32)
        self._c.lowrank_factors(direction, out.ctypes.data, out.size)
        return out

    def forward_perturbation(self) -> Tuple[int, float]:
        """``(d, c)``: the next forward adds ``c Z_d`` to the shaped arrays (``c == 0``:
        nothing; a linear layer ``y = x Wᵀ`` adds ``c (x B) Aᵀ / sqrt(r)``)."""
        return self._c.forward_perturbation()

    # ---- zeroth-order steps ----
    def begin(self, sq_norms: Optional[Sequence[float]] = None) -> None:
        """Starts a zeroth-order step; the arrays now hold the first point to evaluate.

        ``sq_norms`` (sphere directions over a model split across processes): the global
        ``Σ z_d²`` per direction, the sum over processes of :meth:`local_sq_norms`.
        """
        self._c.begin(sq_norms)

    def local_sq_norms(self) -> List[float]:
        """This optimizer's share of ``Σ z_d²`` for each direction of the next step."""
        return self._c.local_sq_norms()

    def feed(self, loss: float) -> bool:
        """Feeds the loss at the current point; True while another evaluation is needed."""
        return self._c.feed(float(loss))

    def abort(self) -> None:
        """Abandons the step in progress: the arrays are restored, nothing is updated."""
        self._c.abort()

    def step(self, closure: Callable[[], float]) -> float:
        """One zeroth-order step: calls ``closure()`` (which returns the loss) ``2q`` times
        (two-sided) or ``q + 1`` times (one-sided). Returns the loss at the unperturbed point
        (one-sided: ``L_0``; two-sided: the mean of the ``2q`` perturbed losses). If the
        closure raises, the arrays are restored and the exception propagates."""
        self._c.begin()
        losses = []
        try:
            while True:
                loss = float(closure())
                losses.append(loss)
                if not self._c.feed(loss):
                    break
        except BaseException:
            self._c.abort()
            raise
        if self.estimator.lower().replace("-", "_") == "one_sided":
            return losses[0]
        return float(np.mean(np.asarray(losses, dtype=np.float64)))

    def last_loss(self) -> Tuple[float, bool]:
        """``(loss, skipped)`` of the last finished zeroth-order step, as the library saw it."""
        return self._c.last_loss()

    def projected_grads(self) -> List[float]:
        """The projected gradients ``g_d`` of the last finished zeroth-order step."""
        return self._c.last_projected_grads()

    # ---- first-order steps ----
    def fo_step(self) -> bool:
        """A first-order step on the gradient arrays (write them first). Returns whether it
        was skipped: a gradient held a NaN or an infinity (``skip_nonfinite_grads``), and
        nothing but the step count changed."""
        skipped = self._c.stats()[1]
        self._c.fo_step()
        return self._c.stats()[1] != skipped

    # ---- state ----
    def state_dict(self) -> bytearray:
        """The optimizer state (step counts, the moments of each rule, residuals, a checksum;
        not the arrays) as a ``bytearray`` the library writes into directly (one copy of the
        state in memory)."""
        return self._c.save_state()

    def load_state_dict(self, state: Any) -> None:
        """Restores :meth:`state_dict` (any bytes-like object, read in place) of an optimizer
        with the same configuration and arrays. A truncated, corrupted or foreign state is
        refused (:class:`hyzo.InvalidArgumentError`) and nothing changes."""
        self._c.load_state(state)

    def save_state(self, path: Union[str, "os.PathLike[str]", bytes]) -> None:
        """Saves the state to the file ``path``: streamed by the library (memory use does not
        grow with the state) and atomic (``path`` never holds a partial state).
        :class:`hyzo.HyzoIOError` (an ``OSError``) when it cannot be written."""
        self._c.save_state_file(path)

    def load_state(self, path: Union[str, "os.PathLike[str]", bytes]) -> None:
        """Restores a state from the file ``path`` (saved by :meth:`save_state`, or the bytes
        of :meth:`state_dict`); as :meth:`load_state_dict`, a bad file changes nothing."""
        self._c.load_state_file(path)

    def close(self) -> None:
        """Frees the C optimizer (the arrays are untouched)."""
        self._c.close()

    def __enter__(self) -> "Optimizer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _show_config_options(init: Callable[..., None]) -> None:
    """Gives ``init`` (which takes the configuration as ``**config``) a signature that
    lists every option of :func:`_lib.make_config` with its default, for help() and
    editors, without writing the defaults a second time."""
    sig = inspect.signature(init)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(_lib.make_config).parameters.values()]
    init.__signature__ = sig.replace(parameters=own + options)  # type: ignore[attr-defined]


_show_config_options(Optimizer.__init__)
