"""hyzo: fused zeroth-order and hybrid FO/ZO optimizers (CPU and CUDA) for Python.

This package binds the C ABI of the Rust library ``libhyzo`` (shipped inside the package);
it implements no maths itself.

- :class:`hyzo.Optimizer`: an optimizer over numpy arrays (float32, float16, bfloat16 via
  ``ml_dtypes``), feed-style or closure-style.
- :func:`hyzo.directions`: the random directions of the spec, for cross-checks.
- :mod:`hyzo.torch`: ``ZO``, ``Hybrid`` and ``FO`` as ``torch.optim.Optimizer`` subclasses
  (imported on demand: ``import hyzo.torch``).

Threads: one optimizer is used by one thread at a time (a call while another thread is
inside a call on the same optimizer raises :class:`BadStateError`); distinct optimizers may
be used from different threads concurrently.
"""

from ._lib import (
    BadStateError,
    CudaError,
    HyzoError,
    HyzoIOError,
    HyzoMemoryError,
    InternalError,
    InvalidArgumentError,
    NoDeviceError,
    cuda_available,
    library_path,
)
from ._lib import version as library_version
from ._numpy import Optimizer, directions

__version__ = library_version()

__all__ = [
    "Optimizer",
    "directions",
    "cuda_available",
    "library_version",
    "library_path",
    "HyzoError",
    "InvalidArgumentError",
    "BadStateError",
    "NoDeviceError",
    "CudaError",
    "HyzoMemoryError",
    "HyzoIOError",
    "InternalError",
    "__version__",
]
