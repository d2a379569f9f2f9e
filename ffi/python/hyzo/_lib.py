"""Low-level ctypes binding of the hyzo C ABI (``ffi/hyzo.h``).

Everything numerical happens in ``libhyzo``; this module only loads the library, declares
the signatures, converts the option strings of the Python API into the C enums and turns a
failed status into a Python exception carrying ``hyzo_last_error()``.

The library is searched, in order, at ``$HYZO_LIBRARY`` (an explicit override, for
development), next to this file (where ``pip install`` puts it), and in the ``target/release``
folder of the source tree this package sits in (an uninstalled checkout).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

__all__ = [
    "HyzoError",
    "InvalidArgumentError",
    "BadStateError",
    "NoDeviceError",
    "CudaError",
    "HyzoMemoryError",
    "InternalError",
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


_STATUS = {
    1: ("HYZO_ERR_INVALID_ARGUMENT", InvalidArgumentError),
    2: ("HYZO_ERR_BAD_STATE", BadStateError),
    3: ("HYZO_ERR_NO_DEVICE", NoDeviceError),
    4: ("HYZO_ERR_CUDA", CudaError),
    5: ("HYZO_ERR_OUT_OF_MEMORY", HyzoMemoryError),
    6: ("HYZO_ERR_INTERNAL", InternalError),
}

# ----------------------------------------------------------------------------------------
# Enums (values fixed by the header).

DTYPE_CODES: Dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}
DEVICE_CPU, DEVICE_CUDA = 0, 1
RULES: Dict[str, int] = {"sgd": 0, "momentum": 1, "sign": 2, "signum": 3, "adamw": 4, "adazo": 5}
DIRECTIONS: Dict[str, int] = {"gaussian": 0, "rademacher": 1, "sphere": 2}
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
_sig("hyzo_optimizer_get_config", _u32, _c_opt, _P(hyzo_config))
_sig("hyzo_optimizer_num_tensors", _u32, _c_opt, _P(_u64))
_sig("hyzo_zo_begin", _u32, _c_opt)
_sig("hyzo_zo_begin_with_sq_norms", _u32, _c_opt, _P(ctypes.c_double), _u32)
_sig("hyzo_optimizer_local_sq_norms", _u32, _c_opt, _P(ctypes.c_double), _u32)
_sig("hyzo_zo_feed", _u32, _c_opt, _f32, _P(_int))
_sig("hyzo_zo_feed_device", _u32, _c_opt, ctypes.c_void_p, _P(_int))
_sig("hyzo_zo_abort", _u32, _c_opt)
_sig("hyzo_zo_last_loss", _u32, _c_opt, _P(_f32), _P(_int))
_sig("hyzo_zo_last_projected_grads", _u32, _c_opt, _P(_f32), _u32)
_sig("hyzo_fo_step", _u32, _c_opt)
_sig("hyzo_next_phase", _u32, _c_opt, _P(_u32))
_sig("hyzo_optimizer_stats", _u32, _c_opt, _P(_u64), _P(_u64))
_sig("hyzo_optimizer_synchronize", _u32, _c_opt)
_sig("hyzo_optimizer_state_size", _u32, _c_opt, _P(_u64))
_sig("hyzo_optimizer_save_state", _u32, _c_opt, ctypes.c_void_p, _u64)
_sig("hyzo_optimizer_load_state", _u32, _c_opt, ctypes.c_void_p, _u64)


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
# Configuration.


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
) -> hyzo_config:
    """Builds a ``hyzo_config`` from Python options (strings for the enums).

    Types and enum names are checked here; value ranges (NaN, negative lr, ...) are checked
    by the library when an optimizer is created, with its own message.
    """
    cfg = lib.hyzo_config_default()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    for name, v in (("num_directions", num_directions), ("fo_steps", fo_steps),
                    ("zo_steps", zo_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
            raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
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
    cfg.rule = _enum(RULES, "rule", rule)
    cfg.beta1, cfg.beta2 = b1, b2
    cfg.adam_eps = _float("adam_eps", adam_eps)
    cfg.weight_decay = _float("weight_decay", weight_decay)
    cfg.precision = _enum(PRECISIONS, "precision", precision)
    cfg.fo_steps = fo_steps
    cfg.zo_steps = zo_steps
    cfg.hybrid_alpha = _float("hybrid_alpha", hybrid_alpha)
    return cfg


def _float(name: str, v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {v!r}") from None


# ----------------------------------------------------------------------------------------
# One C optimizer.


class COptimizer:
    """Owns one ``hyzo_optimizer*``; a thin method per C call.

    Tensors are registered by raw address: the caller keeps the memory alive (and in place)
    for the lifetime of this object.
    """

    def __init__(self, cfg: hyzo_config, device: str = "cpu", ordinal: int = 0,
                 num_threads: Optional[int] = None) -> None:
        self._h = ctypes.c_void_p()
        self.device = device
        self.num_directions = int(cfg.num_directions)
        if device == "cpu":
            if num_threads is None:
                check(lib.hyzo_optimizer_create(ctypes.byref(cfg), DEVICE_CPU, 0,
                                                ctypes.byref(self._h)), "hyzo_optimizer_create")
            else:
                if not isinstance(num_threads, int) or num_threads < 0:
                    raise ValueError(f"num_threads: expected an int >= 0, got {num_threads!r}")
                check(lib.hyzo_optimizer_create_cpu(ctypes.byref(cfg), num_threads,
                                                    ctypes.byref(self._h)),
                      "hyzo_optimizer_create_cpu")
        elif device == "cuda":
            check(lib.hyzo_optimizer_create(ctypes.byref(cfg), DEVICE_CUDA, int(ordinal),
                                            ctypes.byref(self._h)), "hyzo_optimizer_create")
        else:
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")

    # -- lifetime --
    def close(self) -> None:
        """Destroys the C optimizer (idempotent)."""
        h, self._h = getattr(self, "_h", None), ctypes.c_void_p()
        if h:
            lib.hyzo_optimizer_destroy(h)

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
                   grad: Optional[int] = None, grad_dtype: int = 0) -> None:
        check(lib.hyzo_optimizer_add_tensor(self.handle, ctypes.c_void_p(data), dtype, numel,
                                            offset, ctypes.c_void_p(grad or None), grad_dtype),
              "hyzo_optimizer_add_tensor")

    def set_stream(self, stream: int) -> None:
        check(lib.hyzo_optimizer_set_stream(self.handle, ctypes.c_void_p(stream or None)),
              "hyzo_optimizer_set_stream")

    def set_lr(self, lr: float) -> None:
        check(lib.hyzo_optimizer_set_lr(self.handle, float(lr)), "hyzo_optimizer_set_lr")

    def set_weight_decay(self, wd: float) -> None:
        check(lib.hyzo_optimizer_set_weight_decay(self.handle, float(wd)),
              "hyzo_optimizer_set_weight_decay")

    def get_config(self) -> hyzo_config:
        cfg = hyzo_config()
        check(lib.hyzo_optimizer_get_config(self.handle, ctypes.byref(cfg)),
              "hyzo_optimizer_get_config")
        return cfg

    def num_tensors(self) -> int:
        n = _u64()
        check(lib.hyzo_optimizer_num_tensors(self.handle, ctypes.byref(n)),
              "hyzo_optimizer_num_tensors")
        return n.value

    # -- steps --
    def begin(self, sq_norms: Optional[Sequence[float]] = None) -> None:
        if sq_norms is None:
            check(lib.hyzo_zo_begin(self.handle), "hyzo_zo_begin")
        else:
            arr = (ctypes.c_double * len(sq_norms))(*[float(x) for x in sq_norms])
            check(lib.hyzo_zo_begin_with_sq_norms(self.handle, arr, len(sq_norms)),
                  "hyzo_zo_begin_with_sq_norms")

    def local_sq_norms(self) -> list:
        q = self.num_directions
        arr = (ctypes.c_double * q)()
        check(lib.hyzo_optimizer_local_sq_norms(self.handle, arr, q),
              "hyzo_optimizer_local_sq_norms")
        return list(arr)

    def feed(self, loss: float) -> bool:
        more = _int(0)
        check(lib.hyzo_zo_feed(self.handle, float(loss), ctypes.byref(more)), "hyzo_zo_feed")
        return bool(more.value)

    def feed_device(self, ptr: int) -> bool:
        more = _int(0)
        check(lib.hyzo_zo_feed_device(self.handle, ctypes.c_void_p(ptr), ctypes.byref(more)),
              "hyzo_zo_feed_device")
        return bool(more.value)

    def abort(self) -> None:
        check(lib.hyzo_zo_abort(self.handle), "hyzo_zo_abort")

    def last_loss(self) -> "tuple[float, bool]":
        loss, skipped = _f32(), _int()
        check(lib.hyzo_zo_last_loss(self.handle, ctypes.byref(loss), ctypes.byref(skipped)),
              "hyzo_zo_last_loss")
        return loss.value, bool(skipped.value)

    def last_projected_grads(self) -> list:
        q = self.num_directions
        arr = (_f32 * q)()
        check(lib.hyzo_zo_last_projected_grads(self.handle, arr, q),
              "hyzo_zo_last_projected_grads")
        return list(arr)

    def fo_step(self) -> None:
        check(lib.hyzo_fo_step(self.handle), "hyzo_fo_step")

    def next_phase(self) -> str:
        out = _u32()
        check(lib.hyzo_next_phase(self.handle, ctypes.byref(out)), "hyzo_next_phase")
        return PHASES[out.value]

    def stats(self) -> "tuple[int, int]":
        steps, skipped = _u64(), _u64()
        check(lib.hyzo_optimizer_stats(self.handle, ctypes.byref(steps), ctypes.byref(skipped)),
              "hyzo_optimizer_stats")
        return steps.value, skipped.value

    def synchronize(self) -> None:
        check(lib.hyzo_optimizer_synchronize(self.handle), "hyzo_optimizer_synchronize")

    # -- state --
    def state_size(self) -> int:
        n = _u64()
        check(lib.hyzo_optimizer_state_size(self.handle, ctypes.byref(n)),
              "hyzo_optimizer_state_size")
        return n.value

    def save_state(self) -> bytes:
        n = self.state_size()
        buf = ctypes.create_string_buffer(n)
        check(lib.hyzo_optimizer_save_state(self.handle, buf, n), "hyzo_optimizer_save_state")
        return buf.raw

    def load_state(self, data: bytes) -> None:
        data = bytes(data)
        check(lib.hyzo_optimizer_load_state(self.handle, data, len(data)),
              "hyzo_optimizer_load_state")


def directions_fill(kind: str, seed: int, step: int, direction: int, start: int, count: int,
                    out_ptr: int) -> None:
    """``hyzo_directions_fill`` into ``count`` floats at address ``out_ptr``."""
    check(lib.hyzo_directions_fill(_enum(DIRECTIONS, "kind", kind), seed, step, direction, start,
                                   count, ctypes.cast(out_ptr, _P(_f32))),
          "hyzo_directions_fill")
