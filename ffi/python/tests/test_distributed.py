"""The distributed example: 2 gloo processes, sharded ZO and hybrid training,
bit-identical to one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_distributed_example_is_bit_identical():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--world-size", "2", "--steps", "12"],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "bit-identical" in line]
    assert len(lines) == 2, proc.stdout
    assert "ranks in sync" in proc.stdout, proc.stdout
