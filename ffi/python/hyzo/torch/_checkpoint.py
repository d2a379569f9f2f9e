"""hyzo's part of a ``state_dict``: every shard's C state (both rule states of a Hybrid),
written by the library straight into a uint8 tensor and read back in place, so that a
checkpoint holds one copy of the optimizer state however large."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from .. import _lib
from ._registration import GroupShard

# The layout of the "hyzo" entry of a state dict: {"format", "library_version", "shards"}.
FORMAT = 1


def pack(shards: Sequence[GroupShard]) -> Dict[str, Any]:
    """The ``"hyzo"`` entry of a state dict: each shard's state as a uint8 tensor."""
    bufs = []
    for s in shards:
        n = s.c.state_size()
        t = torch.empty(n, dtype=torch.uint8)
        s.c.save_state_into(t.data_ptr(), n)
        bufs.append(t)
    return {"format": FORMAT, "library_version": _lib.version(), "shards": bufs}


def unpack(hz: Any) -> List[Any]:
    """The saved shard states of a ``"hyzo"`` entry."""
    if hz is None:
        raise ValueError("load_state_dict: not a hyzo optimizer state dict (no 'hyzo' key)")
    return hz["shards"]


def load(shards: Sequence[GroupShard], bufs: Sequence[Any]) -> None:
    """Loads one saved state into each (new) shard; the library refuses a state of another
    configuration, corrupted or truncated."""
    if len(bufs) != len(shards):
        raise ValueError(f"load_state_dict: {len(bufs)} saved shards, this optimizer "
                         f"has {len(shards)}")
    for s, b in zip(shards, bufs):
        if isinstance(b, torch.Tensor):
            b = b.detach()
            if b.device.type != "cpu":
                b = b.cpu()
            b = b.contiguous().view(torch.uint8).reshape(-1)
            s.c.load_state_from(b.data_ptr(), b.numel())
        else:
            s.c.load_state(b)
