"""Shared helpers of the hyzo Python tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]


def cli_path() -> Optional[Path]:
    """The `hyzo` command-line tool of this checkout (or $HYZO_CLI), if built."""
    env = os.environ.get("HYZO_CLI")
    if env:
        return Path(env)
    p = REPO / "target" / "release" / "hyzo"
    return p if p.is_file() and os.access(p, os.X_OK) else None


def bits(a) -> np.ndarray:
    """The raw bits of a numpy array or torch tensor (for bit-identity checks)."""
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().contiguous()
            view = {torch.float32: torch.int32, torch.float16: torch.int16,
                    torch.bfloat16: torch.int16}[a.dtype]
            return a.view(view).numpy().copy()
    except ImportError:  # pragma: no cover
        pass
    a = np.ascontiguousarray(a)
    return a.view({4: np.int32, 2: np.int16}[a.dtype.itemsize]).copy()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
