"""Low-level ctypes binding of the hyzo C ABI (``ffi/hyzo.h``).

Everything numerical happens in ``libhyzo``; this module only loads the library, declares
the signatures, converts the option strings of the Python API into the C enums and turns a
failed status into a Python exception carrying ``hyzo_last_error()``.

The library is searched, in order, at ``$HYZO_LIBRARY`` (an explicit override, for
development), next to this file (where ``pip install`` puts it), and in the ``target/release``
folder of the source tree this package sits in (an uninstalled checkout).

Threads: one C optimizer is used by one thread at a time (the C contract, ``ffi/hyzo.h``).
:class:`COptimizer` enforces it: a call while another thread is inside a call on the same
optimizer raises :class:`BadStateError` instead of racing in C (ctypes releases the GIL
during each call, so two threads can really be inside the library at once). Distinct
optimizers may be used from different threads concurrently.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "HyzoError",
    "InvalidArgumentError",
    "BadStateError",
    "NoDeviceError",
    "CudaError",
    "HyzoMemoryError",
    "InternalError",
    "HyzoIOError",
    "lib",
    "library_path",
    "make_config",
    "COptimizer",
    "DTYPE_CODES",
]

# ----------------------------------------------------------------------------------------
# Exceptions.


class HyzoError(RuntimeError):
    """A hyzo C call failed. ``status`` is the ``hyzo_status`` name, ``func`` the C call."""

    def __init__(self, message: str, status: str = "HYZO_ERR_INTERNAL", func: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.func = func


class InvalidArgumentError(HyzoError, ValueError):
    """``HYZO_ERR_INVALID_ARGUMENT``: an argument is out of its domain."""


class BadStateError(HyzoError):
    """``HYZO_ERR_BAD_STATE``: the call is not allowed now (protocol misuse)."""


class NoDeviceError(HyzoError):
    """``HYZO_ERR_NO_DEVICE``: no CUDA driver or device, or a build without CUDA."""


class CudaError(HyzoError):
    """``HYZO_ERR_CUDA``: a CUDA driver, NVRTC or kernel failure."""


class HyzoMemoryError(HyzoError, MemoryError):
    """``HYZO_ERR_OUT_OF_MEMORY``: an allocation failed."""


class InternalError(HyzoError):
    """``HYZO_ERR_INTERNAL``: a bug in hyzo; the optimizer involved is unusable."""


class HyzoIOError(HyzoError, OSError):
    """``HYZO_ERR_IO``: reading or writing a state file failed (the message has the path and
    the system's reason). An ``OSError`` too, so ``except OSError`` around file handling
    catches it."""


# Every hyzo_status but HYZO_OK: its name and the exception it raises.
_STATUS = {
    1: ("HYZO_ERR_INVALID_ARGUMENT", InvalidArgumentError),
    2: ("HYZO_ERR_BAD_STATE", BadStateError),
    3: ("HYZO_ERR_NO_DEVICE", NoDeviceError),
    4: ("HYZO_ERR_CUDA", CudaError),
    5: ("HYZO_ERR_OUT_OF_MEMORY", HyzoMemoryError),
    6: ("HYZO_ERR_INTERNAL", InternalError),
    7: ("HYZO_ERR_IO", HyzoIOError),
}

# ----------------------------------------------------------------------------------------
# Enums (values fixed by the header).

DTYPE_CODES: Dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}
DEVICE_CPU, DEVICE_CUDA = 0, 1
# Every hyzo_rule value, as in the header; "none" (HYZO_RULE_NONE) is only meaningful for
# hyzo_config.fo_rule, where Python spells it None.
RULES: Dict[str, int] = {"sgd": 0, "momentum": 1, "sign": 2, "signum": 3, "adamw": 4, "adazo": 5,
                         "none": 255}
RULE_NONE = RULES["none"]
# The rules a user can name.
UPDATE_RULES: Dict[str, int] = {k: v for k, v in RULES.items() if k != "none"}
# "lowrank" (spec v3 §7): 2-D tensors registered with a shape get A B^T / sqrt(r) directions
# added by the forward (hyzo.torch's hooks); the others get the Gaussian.
DIRECTIONS: Dict[str, int] = {"gaussian": 0, "rademacher": 1, "sphere": 2, "lowrank": 3}
ESTIMATORS: Dict[str, int] = {"two_sided": 0, "one_sided": 1}
PRECISIONS: Dict[str, int] = {"nearest": 0, "stochastic": 1, "compensated": 2}
PHASES: Dict[int, str] = {0: "fo", 1: "zo", 2: "any"}


def _enum(table: Dict[str, int], name: str, value: object) -> int:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {sorted(table)}, got {value!r}")
    key = value.lower().replace("-", "_")
    if key not in table:
        raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}")
    return table[key]


class hyzo_config(ctypes.Structure):
    """``hyzo_config`` (enums are C ``int``-sized)."""

    _fields_ = [
        ("seed", ctypes.c_uint64),
        ("lr", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("num_directions", ctypes.c_uint32),
        ("direction", ctypes.c_uint32),
        ("estimator", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("adam_eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("precision", ctypes.c_uint32),
        ("fo_steps", ctypes.c_uint32),
        ("zo_steps", ctypes.c_uint32),
        ("hybrid_alpha", ctypes.c_float),
        ("fo_rule", ctypes.c_uint32),
        ("fo_lr", ctypes.c_float),
        ("fo_weight_decay", ctypes.c_float),
        ("rank", ctypes.c_uint32),
        ("skip_nonfinite_grads", ctypes.c_uint32),
    ]


# ----------------------------------------------------------------------------------------
# Loading.


def _candidates() -> Sequence[Path]:
    here = Path(__file__).resolve().parent
    out = []
    env = os.environ.get("HYZO_LIBRARY")
    if env:
        out.append(Path(env))
    out.append(here / "libhyzo.so")
    # An uninstalled checkout: <repo>/ffi/python/hyzo/_lib.py -> <repo>/target/release.
    out.append(here.parents[2] / "target" / "release" / "libhyzo.so")
    return out


def _load() -> ctypes.CDLL:
    tried = []
    for path in _candidates():
        if path.is_file():
            return ctypes.CDLL(str(path))
        tried.append(str(path))
    raise ImportError(
        "hyzo: libhyzo.so not found (looked at "
        + ", ".join(tried)
        + "); install the package with `pip install ./ffi/python`, or set HYZO_LIBRARY"
    )


lib = _load()
library_path: str = lib._name

_c_opt = ctypes.c_void_p
_u32, _u64, _int, _f32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_float
_P = ctypes.POINTER


def _sig(name: str, restype, *argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_sig("hyzo_config_default", hyzo_config)
_sig("hyzo_version", ctypes.c_char_p)
_sig("hyzo_last_error", ctypes.c_char_p)
_sig("hyzo_cuda_available", _int)
_sig("hyzo_directions_fill", _u32, _u32, _u64, _u32, _u32, _u64, _u64, _P(_f32))
_sig("hyzo_optimizer_create", _u32, _P(hyzo_config), _u32, _int, _P(_c_opt))
_sig("hyzo_optimizer_create_cpu", _u32, _P(hyzo_config), _u32, _P(_c_opt))
_sig("hyzo_optimizer_destroy", None, _c_opt)
_sig("hyzo_optimizer_add_tensor", _u32, _c_opt, ctypes.c_void_p, _u32, _u64, _u64,
     ctypes.c_void_p, _u32)
_sig("hyzo_optimizer_set_stream", _u32, _c_opt, ctypes.c_void_p)
_sig("hyzo_optimizer_set_lr", _u32, _c_opt, _f32)
_sig("hyzo_optimizer_set_weight_decay", _u32, _c_opt, _f32)
_sig("hyzo_optimizer_set_fo_lr", _u32, _c_opt, _f32)
_sig("hyzo_optimizer_set_fo_weight_decay", _u32, _c_opt, _f32)
_sig("hyzo_optimizer_get_config", _u32, _c_opt, _P(hyzo_config))
_sig("hyzo_optimizer_num_tensors", _u32, _c_opt, _P(_u64))
_sig("hyzo_optimizer_set_shape", _u32, _c_opt, _u64, _u64, _u64)
_sig("hyzo_optimizer_lowrank_factors_len", _u32, _c_opt, _P(_u64))
_sig("hyzo_optimizer_lowrank_factors", _u32, _c_opt, _u32, _P(_f32), _u64)
_sig("hyzo_zo_forward_perturbation", _u32, _c_opt, _P(_u32), _P(_f32))
_sig("hyzo_zo_begin", _u32, _c_opt)
_sig("hyzo_zo_begin_with_sq_norms", _u32, _c_opt, _P(ctypes.c_double), _u32)
_sig("hyzo_optimizer_local_sq_norms", _u32, _c_opt, _P(ctypes.c_double), _u32)
_sig("hyzo_zo_feed", _u32, _c_opt, _f32, _P(_int))
_sig("hyzo_zo_feed_device", _u32, _c_opt, ctypes.c_void_p, _P(_int))
_sig("hyzo_zo_abort", _u32, _c_opt)
_sig("hyzo_optimizer_poisoned", _u32, _c_opt, _P(_int))
_sig("hyzo_zo_last_loss", _u32, _c_opt, _P(_f32), _P(_int))
_sig("hyzo_zo_last_projected_grads", _u32, _c_opt, _P(_f32), _u32)
_sig("hyzo_fo_step", _u32, _c_opt)
_sig("hyzo_fo_step_masked", _u32, _c_opt, _P(ctypes.c_uint8), _u64)
_sig("hyzo_optimizer_skip_step", _u32, _c_opt)
_sig("hyzo_next_phase", _u32, _c_opt, _P(_u32))
_sig("hyzo_optimizer_stats", _u32, _c_opt, _P(_u64), _P(_u64))
_sig("hyzo_optimizer_updates", _u32, _c_opt, _P(_u64), _P(_u64))
_sig("hyzo_optimizer_synchronize", _u32, _c_opt)
_sig("hyzo_optimizer_displace", _u32, _c_opt, _u64, _u32, _u32, _f32)
_sig("hyzo_optimizer_state_size", _u32, _c_opt, _P(_u64))
_sig("hyzo_optimizer_save_state", _u32, _c_opt, ctypes.c_void_p, _u64)
_sig("hyzo_optimizer_load_state", _u32, _c_opt, ctypes.c_void_p, _u64)
_sig("hyzo_optimizer_save_state_file", _u32, _c_opt, ctypes.c_char_p)
_sig("hyzo_optimizer_load_state_file", _u32, _c_opt, ctypes.c_char_p)


def last_error() -> str:
    """The message of the last failed hyzo call on this thread."""
    msg = lib.hyzo_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int, func: str) -> None:
    """Raises the exception matching a non-zero ``hyzo_status``."""
    if status == 0:
        return
    name, cls = _STATUS.get(status, (f"hyzo_status {status}", HyzoError))
    msg = last_error() or f"{func} failed"
    raise cls(f"{msg} [{name}]", status=name, func=func)


def version() -> str:
    """The version of the loaded libhyzo."""
    return lib.hyzo_version().decode()


def cuda_available() -> bool:
    """Whether libhyzo was built with CUDA and a CUDA driver with a device is present."""
    return bool(lib.hyzo_cuda_available())


# ----------------------------------------------------------------------------------------
# Integers and floats that cross ctypes. ctypes wraps an out-of-range Python int silently
# (2**64 + 5 becomes 5 as a uint64_t, 2**32 + 1 becomes 1 as a uint32_t), so every integer
# is range-checked here before it is converted.


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an ``int`` in ``[lo, hi)``; ``ValueError`` otherwise (bools refused)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name}: expected an integer in [{lo}, {_bound(hi)}), got {value!r}")
    v = value.__index__()  # type: ignore[attr-defined]
    if not lo <= v < hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {_bound(hi)}), got {v}")
    return v


def _bound(hi: int) -> str:
    return {2**32: "2**32", 2**64: "2**64", 2**31: "2**31"}.get(hi, str(hi))


def u32(name: str, value: object) -> int:
    return check_int(name, value, 0, 2**32)


def u64(name: str, value: object) -> int:
    return check_int(name, value, 0, 2**64)


def _float(name: str, v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {v!r}") from None


def _optional_float(name: str, v: object, follows: str) -> float:
    """An optional float of the C API: None becomes NaN, the C spelling of "not set". A NaN
    from the caller is refused rather than silently read as "not set"."""
    if v is None:
        return math.nan
    f = _float(name, v)
    if math.isnan(f):
        raise ValueError(f"{name}: NaN (pass None to follow {follows})")
    return f


# ----------------------------------------------------------------------------------------
# Configuration.


def rule_code(name: str, value: object) -> int:
    """The ``hyzo_rule`` of a rule name (sgd, momentum, sign, signum, adamw, adazo)."""
    return _enum(UPDATE_RULES, name, value)


def make_config(
    *,
    lr: float = 1e-3,
    eps: float = 1e-3,
    rule: str = "sgd",
    betas: Sequence[float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    weight_decay: float = 0.0,
    directions: str = "gaussian",
    num_directions: int = 1,
    estimator: str = "two_sided",
    precision: str = "nearest",
    seed: int = 0,
    fo_steps: int = 0,
    zo_steps: int = 0,
    hybrid_alpha: float = 0.0,
    fo_rule: Optional[str] = None,
    fo_lr: Optional[float] = None,
    fo_weight_decay: Optional[float] = None,
    rank: int = 1,
    skip_nonfinite_grads: bool = True,
) -> hyzo_config:
    """Builds a ``hyzo_config`` from Python options (strings for the enums).

    ``rule`` is the main rule: zeroth-order steps, and every step without ``fo_rule``.
    ``fo_rule`` (``None``: none, ``HYZO_RULE_NONE``) gives first-order steps a rule with a
    state of its own (spec v2 §5); ``fo_lr`` / ``fo_weight_decay`` (``None``: follow ``lr`` /
    ``weight_decay``) are the learning rate and weight decay of first-order steps.
    ``skip_nonfinite_grads`` (default): a step whose gradient holds a NaN or an infinity is
    skipped and counted, as ``torch.amp.GradScaler`` skips it; ``False``: applied as it is
    (torch.optim's behaviour).

    Types, enum names and integer ranges are checked here; value ranges (NaN, negative
    lr, ...) are checked by the library when an optimizer is created, with its own message.
    """
    cfg = lib.hyzo_config_default()
    seed = check_int("seed", seed, 0, 2**64)
    num_directions = u32("num_directions", num_directions)
    fo_steps = u32("fo_steps", fo_steps)
    zo_steps = u32("zo_steps", zo_steps)
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas: expected two floats, got {betas!r}") from None
    cfg.seed = seed
    cfg.lr = _float("lr", lr)
    cfg.eps = _float("eps", eps)
    cfg.num_directions = num_directions
    cfg.direction = _enum(DIRECTIONS, "directions", directions)
    cfg.estimator = _enum(ESTIMATORS, "estimator", estimator)
    cfg.rule = rule_code("rule", rule)
    cfg.beta1, cfg.beta2 = b1, b2
    cfg.adam_eps = _float("adam_eps", adam_eps)
    cfg.weight_decay = _float("weight_decay", weight_decay)
    cfg.precision = _enum(PRECISIONS, "precision", precision)
    cfg.fo_steps = fo_steps
    cfg.zo_steps = zo_steps
    cfg.hybrid_alpha = _float("hybrid_alpha", hybrid_alpha)
    cfg.fo_rule = RULE_NONE if fo_rule is None else rule_code("fo_rule", fo_rule)
    cfg.fo_lr = _optional_float("fo_lr", fo_lr, "lr")
    cfg.fo_weight_decay = _optional_float("fo_weight_decay", fo_weight_decay, "weight_decay")
    cfg.rank = u32("rank", rank)
    if skip_nonfinite_grads not in (True, False):
        raise ValueError(f"skip_nonfinite_grads: expected True or False, got "
                         f"{skip_nonfinite_grads!r}")
    cfg.skip_nonfinite_grads = 1 if skip_nonfinite_grads else 0
    return cfg


# Every option of make_config with its default: the one place Python's defaults live (the
# numpy Optimizer takes exactly these options; hyzo.torch's FO fixes the zeroth-order ones
# to them).
CONFIG_DEFAULTS: Dict[str, Any] = {
    name: p.default for name, p in inspect.signature(make_config).parameters.items()}


# ----------------------------------------------------------------------------------------
# One C optimizer.


def _path_arg(path: Any) -> bytes:
    """A file path for the C API: str, bytes or os.PathLike, without NUL bytes."""
    raw = os.fsencode(os.fspath(path))
    if b"\0" in raw:
        raise ValueError(f"path: contains a NUL byte: {path!r}")
    return raw


class COptimizer:
    """Owns one ``hyzo_optimizer*``; a thin method per C call.

    Tensors are registered by raw address, with the objects that own that memory
    (``owners=``): this object keeps a reference to each until the C optimizer is destroyed,
    so that no caller can free memory the library still writes (a C caller owns its buffers
    in the same way). Moving the memory (a reallocation) is the caller's to avoid.

    One thread at a time: a call made while another thread is inside a call on this object
    raises :class:`BadStateError` (the C library does not allow overlapping calls on one
    optimizer). The same thread may nest calls (the lock is re-entrant).
    """

    def __init__(self, cfg: hyzo_config, device: str = "cpu", ordinal: int = 0,
                 num_threads: Optional[int] = None) -> None:
        self._h = ctypes.c_void_p()
        self._lock = threading.RLock()
        # What owns the registered memory: released only once the C optimizer is gone.
        self._owners: List[Any] = []
        self.device = device
        self.num_directions = int(cfg.num_directions)
        if device == "cpu":
            if num_threads is None:
                check(lib.hyzo_optimizer_create(ctypes.byref(cfg), DEVICE_CPU, 0,
                                                ctypes.byref(self._h)), "hyzo_optimizer_create")
            else:
                n = u32("num_threads", num_threads)
                check(lib.hyzo_optimizer_create_cpu(ctypes.byref(cfg), n, ctypes.byref(self._h)),
                      "hyzo_optimizer_create_cpu")
        elif device == "cuda":
            ordinal = check_int("device ordinal", ordinal, 0, 2**31)
            check(lib.hyzo_optimizer_create(ctypes.byref(cfg), DEVICE_CUDA, ordinal,
                                            ctypes.byref(self._h)), "hyzo_optimizer_create")
        else:
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")

    @contextmanager
    def _use(self, func: str) -> Iterator[ctypes.c_void_p]:
        """The handle, held by this thread for the duration of one call."""
        if not self._lock.acquire(blocking=False):
            raise BadStateError(f"{func}: the optimizer is in use by another thread (one "
                                "optimizer: one thread at a time)",
                                status="HYZO_ERR_BAD_STATE", func=func)
        try:
            yield self.handle
        finally:
            self._lock.release()

    def _call(self, func: str, *args: Any) -> None:
        """``func(handle, *args)``, its status checked."""
        with self._use(func) as h:
            check(getattr(lib, func)(h, *args), func)

    # -- lifetime --
    def close(self) -> None:
        """Destroys the C optimizer (idempotent)."""
        lock = getattr(self, "_lock", None)
        if lock is not None and not lock.acquire(blocking=False):
            raise BadStateError("hyzo_optimizer_destroy: the optimizer is in use by another "
                                "thread", status="HYZO_ERR_BAD_STATE",
                                func="hyzo_optimizer_destroy")
        try:
            h, self._h = getattr(self, "_h", None), ctypes.c_void_p()
            if h:
                lib.hyzo_optimizer_destroy(h)
            self._owners = []
        finally:
            if lock is not None:
                lock.release()

    def __del__(self) -> None:  # pragma: no cover - exercised implicitly
        try:
            self.close()
        except Exception:
            pass

    @property
    def handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise ValueError("hyzo: this optimizer was closed")
        return self._h

    # -- setup --
    def add_tensor(self, data: int, dtype: int, numel: int, offset: int,
                   grad: Optional[int] = None, grad_dtype: int = 0, *,
                   owners: Sequence[Any] = ()) -> None:
        """Registers ``numel`` elements at ``data`` (and the gradient at ``grad``);
        ``owners``: the objects whose memory that is (an array, a tensor sharing the
        parameter's storage), kept alive as long as the C optimizer."""
        numel = u64("numel", numel)
        offset = u64("global_offset", offset)
        if offset + numel >= 2**64:  # the end of its elements must be a u64 too
            raise ValueError(f"global_offset: {offset} + {numel} elements reaches 2**64")
        self._call("hyzo_optimizer_add_tensor", ctypes.c_void_p(data), u32("dtype", dtype),
                   numel, offset, ctypes.c_void_p(grad or None), u32("grad_dtype", grad_dtype))
        self._owners.extend(owners)

    def set_stream(self, stream: int) -> None:
        self._call("hyzo_optimizer_set_stream", ctypes.c_void_p(stream or None))

    def set_lr(self, lr: float) -> None:
        self._call("hyzo_optimizer_set_lr", _float("lr", lr))

    def set_weight_decay(self, wd: float) -> None:
        self._call("hyzo_optimizer_set_weight_decay", _float("weight_decay", wd))

    def set_fo_lr(self, fo_lr: Optional[float]) -> None:
        """Learning rate of first-order steps; ``None``: follow ``lr``."""
        self._call("hyzo_optimizer_set_fo_lr", _optional_float("fo_lr", fo_lr, "lr"))

    def set_fo_weight_decay(self, wd: Optional[float]) -> None:
        """Weight decay of first-order steps; ``None``: follow ``weight_decay``."""
        self._call("hyzo_optimizer_set_fo_weight_decay",
                   _optional_float("fo_weight_decay", wd, "weight_decay"))

    def get_config(self) -> hyzo_config:
        cfg = hyzo_config()
        self._call("hyzo_optimizer_get_config", ctypes.byref(cfg))
        return cfg

    def num_tensors(self) -> int:
        n = _u64()
        self._call("hyzo_optimizer_num_tensors", ctypes.byref(n))
        return n.value

    def set_shape(self, index: int, rows: int, cols: int) -> None:
        """Registers tensor ``index`` (registration order, from 0) as a row-major ``rows x
        cols`` matrix: under ``directions="lowrank"`` it gets low-rank directions, added by
        the forward and never written by a perturbation pass. Before the first step."""
        self._call("hyzo_optimizer_set_shape", check_int("tensor index", index, 0, 2**63),
                   u64("rows", rows), u64("cols", cols))

    def lowrank_factors_len(self) -> int:
        """Floats per direction of :meth:`lowrank_factors`: the sum over shaped tensors of
        ``(rows + cols) * min(rank, rows, cols)``."""
        n = _u64()
        self._call("hyzo_optimizer_lowrank_factors_len", ctypes.byref(n))
        return n.value

    def lowrank_factors(self, direction: int, out_ptr: int, length: int) -> None:
        """Writes the factors of ``direction`` of the current (or next) step into ``length``
        f32 at ``out_ptr`` (the optimizer's memory: host or device; stream-ordered): per
        shaped tensor in registration order, ``A`` (rows x r) then ``B`` (cols x r)."""
        self._call("hyzo_optimizer_lowrank_factors", u32("direction", direction),
                   ctypes.cast(ctypes.c_void_p(out_ptr), _P(_f32)), u64("len", length))

    def forward_perturbation(self) -> Tuple[int, float]:
        """``(direction, coeff)``: the next forward adds ``coeff * Z_direction`` to the
        low-rank tensors (``coeff == 0``: nothing)."""
        d, c = _u32(), _f32()
        self._call("hyzo_zo_forward_perturbation", ctypes.byref(d), ctypes.byref(c))
        return d.value, c.value

    # -- steps --
    def begin(self, sq_norms: Optional[Sequence[float]] = None) -> None:
        if sq_norms is None:
            self._call("hyzo_zo_begin")
        else:
            n = u32("len(sq_norms)", len(sq_norms))
            arr = (ctypes.c_double * n)(*[float(x) for x in sq_norms])
            self._call("hyzo_zo_begin_with_sq_norms", arr, n)

    def local_sq_norms(self) -> list:
        q = self.num_directions
        arr = (ctypes.c_double * q)()
        self._call("hyzo_optimizer_local_sq_norms", arr, q)
        return list(arr)

    def feed(self, loss: float) -> bool:
        more = _int(0)
        self._call("hyzo_zo_feed", float(loss), ctypes.byref(more))
        return bool(more.value)

    def feed_device(self, ptr: int) -> bool:
        more = _int(0)
        self._call("hyzo_zo_feed_device", ctypes.c_void_p(ptr), ctypes.byref(more))
        return bool(more.value)

    def abort(self) -> None:
        self._call("hyzo_zo_abort")

    def last_loss(self) -> "tuple[float, bool]":
        loss, skipped = _f32(), _int()
        self._call("hyzo_zo_last_loss", ctypes.byref(loss), ctypes.byref(skipped))
        return loss.value, bool(skipped.value)

    def last_projected_grads(self) -> list:
        q = self.num_directions
        arr = (_f32 * q)()
        self._call("hyzo_zo_last_projected_grads", arr, q)
        return list(arr)

    def fo_step(self) -> None:
        self._call("hyzo_fo_step")

    def skip_step(self) -> None:
        """Skips the step the schedule calls for, counted as skipped (a non-finite gradient
        or loss found on another shard or process)."""
        self._call("hyzo_optimizer_skip_step")

    def fo_step_masked(self, update: Sequence[bool]) -> None:
        """A first-order step on the tensors with ``update[i]`` true only; the others and
        their state stay as they are."""
        flags = (ctypes.c_uint8 * max(len(update), 1))(*[1 if u else 0 for u in update])
        self._call("hyzo_fo_step_masked", flags, u64("len(update)", len(update)))

    def next_phase(self) -> str:
        out = _u32()
        self._call("hyzo_next_phase", ctypes.byref(out))
        return PHASES[out.value]

    def stats(self) -> "tuple[int, int]":
        steps, skipped = _u64(), _u64()
        self._call("hyzo_optimizer_stats", ctypes.byref(steps), ctypes.byref(skipped))
        return steps.value, skipped.value

    def updates(self) -> Tuple[int, int]:
        """``(updates, fo_updates)``: the ``t`` of the main rule's state and of the
        first-order rule's (0 without ``fo_rule``)."""
        u, fo = _u64(), _u64()
        self._call("hyzo_optimizer_updates", ctypes.byref(u), ctypes.byref(fo))
        return u.value, fo.value

    def synchronize(self) -> None:
        self._call("hyzo_optimizer_synchronize")

    def displace(self, seed: int, step: int, direction: int, scale: float) -> None:
        """Adds ``scale * z`` once to the parameters, ``z`` the direction ``(seed, step,
        direction)`` of the configured kind at each element's global index."""
        self._call("hyzo_optimizer_displace", u64("seed", seed), u32("step", step),
                   u32("direction", direction), _float("scale", scale))

    # -- state --
    def state_size(self) -> int:
        n = _u64()
        self._call("hyzo_optimizer_state_size", ctypes.byref(n))
        return n.value

    def save_state_into(self, address: int, size: int) -> None:
        """Writes the state into ``size`` writable bytes at ``address`` (at least
        :meth:`state_size`), with no intermediate copy."""
        self._call("hyzo_optimizer_save_state", ctypes.c_void_p(address), u64("len", size))

    def save_state(self) -> bytearray:
        """The state as a new ``bytearray`` (the library writes straight into it)."""
        with self._use("hyzo_optimizer_save_state"):  # size and contents of one moment
            n = self.state_size()
            buf = bytearray(n)
            if n:
                self.save_state_into(ctypes.addressof(ctypes.c_char.from_buffer(buf)), n)
            return buf

    def load_state_from(self, address: int, size: int) -> None:
        """Restores a state from ``size`` readable bytes at ``address``."""
        self._call("hyzo_optimizer_load_state", ctypes.c_void_p(address), u64("len", size))

    def load_state(self, data: Any) -> None:
        """Restores a state from a bytes-like object (bytes, bytearray, memoryview) or a
        uint8 array (numpy, or anything ``numpy.asarray`` takes: a CPU torch tensor), read
        in place when contiguous."""
        import numpy as np  # a dependency of the package; imported here to keep _lib light

        try:
            view = np.frombuffer(data, dtype=np.uint8)
        except (TypeError, ValueError, BufferError):
            try:
                view = np.asarray(data)
            except Exception:
                view = None
            if view is None or view.dtype != np.uint8:
                raise TypeError(f"state: expected a bytes-like object or a uint8 array, got "
                                f"{type(data).__name__}") from None
            view = np.ascontiguousarray(view.reshape(-1))
        # An empty buffer may have no address: give C a valid one with len 0 (refused there).
        if view.size == 0:
            view = np.zeros(1, dtype=np.uint8)[:0]
        self.load_state_from(view.ctypes.data, view.size)

    def save_state_file(self, path: Any) -> None:
        """Saves the state to the file ``path``, streaming and atomically (see the header)."""
        self._call("hyzo_optimizer_save_state_file", _path_arg(path))

    def load_state_file(self, path: Any) -> None:
        """Restores a state from the file ``path``; a bad file changes nothing."""
        self._call("hyzo_optimizer_load_state_file", _path_arg(path))


def directions_fill(kind: str, seed: int, step: int, direction: int, start: int, count: int,
                    out_ptr: int) -> None:
    """``hyzo_directions_fill`` into ``count`` floats at address ``out_ptr``."""
    check(lib.hyzo_directions_fill(_enum(DIRECTIONS, "kind", kind), u64("seed", seed),
                                   u32("step", step), u32("direction", direction),
                                   u64("start", start), u64("count", count),
                                   ctypes.cast(out_ptr, _P(_f32))),
          "hyzo_directions_fill")
