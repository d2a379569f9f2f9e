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
    """The saved shard states of a ``"hyzo"`` entry, of a format this code reads."""
    if hz is None:
        raise ValueError("load_state_dict: not a hyzo optimizer state dict (no 'hyzo' key)")
    if not isinstance(hz, dict) or "shards" not in hz:
        raise ValueError("load_state_dict: the 'hyzo' entry is not hyzo's (expected a dict "
                         "with 'format' and 'shards')")
    if hz.get("format") != FORMAT:
        raise ValueError(f"load_state_dict: the hyzo state dict has format "
                         f"{hz.get('format')!r} (saved by hyzo {hz.get('library_version')}); "
                         f"this hyzo ({_lib.version()}) reads format {FORMAT}")
    return hz["shards"]


def check_lockstep(shards: Sequence[GroupShard]) -> None:
    """Refuses loaded shards that disagree on their counters: in a run whose groups step
    together they always agree, so a disagreement means states of several saves (shard 0
    from step 6, shard 1 from step 7), which would fail or silently desynchronize the
    schedule at the next step."""
    counters = [(s.c.stats(), s.c.updates()) for s in shards]
    if all(c == counters[0] for c in counters):
        return
    described = "; ".join(
        f"shard {i} (param group {s.group_index}): step {st}, updates {up}/{fo}, skipped {sk}"
        for i, (s, ((st, sk), (up, fo))) in enumerate(zip(shards, counters)))
    raise ValueError("load_state_dict: the saved shards disagree (" + described + "); all "
                     "shards must agree on step, updates, schedule position and seed (is the "
                     "checkpoint mixed from several saves?)")


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
