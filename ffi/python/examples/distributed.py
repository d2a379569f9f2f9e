"""Sharded zeroth-order and hybrid training with torch.distributed, checked bit for bit.

A small MLP's parameters are flattened into one vector and split across the ranks
(FSDP-style flat shards, deliberately uneven). Each rank registers only its shard, with the
shard's global offset in the flat vector, so hyzo perturbs it exactly as the unsharded model
would be perturbed; every forward all-gathers the shards, and the loss is all-reduced by the
optimizer (``process_group``). The final parameters must be bit-identical to a
single-process run of the same optimizer on the unsharded ``nn.Module``.

A third run is plain data parallel: every rank holds the whole model wrapped in
``DistributedDataParallel`` and half of the batch; the hybrid optimizer all-reduces each
zeroth-order loss and DDP averages the first-order gradients. The ranks must end
bit-identical to each other, and equal to the full-batch single-process run up to float
rounding (a mean of two half-batch means is not bitwise the full-batch mean).

Run: ``python ffi/python/examples/distributed.py [--world-size 2] [--steps 30]``
(gloo backend, CPU, processes started with torch.multiprocessing). Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

import hyzo.torch as ht

SEED = 1234
LR = 0.05


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def make_data() -> "tuple[torch.Tensor, torch.Tensor]":
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 6, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, 6)).unsqueeze(1)
    return x, y


def make_optimizer(kind: str, params, process_group=None) -> torch.optim.Optimizer:
    if kind == "zo":
        return ht.ZO(params, lr=LR, eps=1e-3, rule="sgd", num_directions=2, seed=SEED,
                     process_group=process_group, num_threads=1)
    # The paper's hybrid: AdamW first-order and AdaZO zeroth-order steps, each with its own
    # state (on every rank, for that rank's shard), at their own learning rates.
    return ht.Hybrid(params, lr=0.01, zo_lr=0.001, fo_steps=3, zo_steps=3, eps=1e-3,
                     seed=SEED, process_group=process_group, num_threads=1)


def single_process(kind: str, steps: int) -> torch.Tensor:
    """The reference: the unsharded model, its own parameters, one process."""
    torch.set_num_threads(1)
    model = make_model()
    x, y = make_data()
    opt = make_optimizer(kind, model.parameters())
    closure = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    for _ in range(steps):
        opt.step(closure)
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def shard_bounds(n: int, world: int) -> List[int]:
    """Uneven split points of ``n`` elements (rank r holds [b[r], b[r+1]))."""
    b = [0]
    for r in range(world):
        b.append(b[-1] + (n - b[-1]) // (world - r) + (1 if r == 0 and world > 1 else 0))
    b[-1] = n
    return b


class GatherFlat(torch.autograd.Function):
    """All-gathers the flat shards into the full vector. Every rank computes the same loss
    on the same data, so the gradient of the full vector is identical on every rank and a
    rank's gradient is just its slice (no reduction: bit-identical to one process)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, bounds: List[int]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        ctx.lo, ctx.hi = bounds[rank], bounds[rank + 1]
        width = max(bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1))
        padded = torch.zeros(width, dtype=shard.dtype)
        padded[: shard.numel()] = shard.detach()
        parts = [torch.empty_like(padded) for _ in range(len(bounds) - 1)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: bounds[i + 1] - bounds[i]] for i, p in enumerate(parts)])

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):  # type: ignore[override]
        return grad_full[ctx.lo: ctx.hi].clone(), None


def unflatten(model: nn.Module, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[i: i + p.numel()].view_as(p)
        i += p.numel()
    return out


def data_parallel(rank: int, world: int, steps: int, out_dir: str) -> None:
    """DDP model, a slice of the batch per rank, losses averaged by the optimizer."""
    model = nn.parallel.DistributedDataParallel(make_model())
    x, y = make_data()
    n = x.shape[0] // world
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    opt = make_optimizer("hybrid", model.parameters(), process_group=dist.group.WORLD)
    for _ in range(steps):
        opt.step(lambda: nn.functional.mse_loss(model(xs), ys))
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    torch.save(flat, os.path.join(out_dir, f"dp-{rank}.pt"))


def sharded(rank: int, world: int, kind: str, steps: int, out_dir: str) -> None:
    """A flat shard per rank, its global offset given to the optimizer."""
    template = make_model()
    full = nn.utils.parameters_to_vector(template.parameters()).detach()
    bounds = shard_bounds(full.numel(), world)
    lo, hi = bounds[rank], bounds[rank + 1]
    shard = full[lo:hi].clone().requires_grad_(True)
    x, y = make_data()
    # The shard knows its place in the flat parameter vector of the whole model.
    opt = make_optimizer(kind, [{"params": [shard], "global_offset": lo}],
                         process_group=dist.group.WORLD)

    def closure() -> torch.Tensor:
        params = unflatten(template, GatherFlat.apply(shard, bounds))
        return nn.functional.mse_loss(functional_call(template, params, (x,)), y)

    for _ in range(steps):
        opt.step(closure)
    torch.save(shard.detach().clone(), os.path.join(out_dir, f"{kind}-{rank}.pt"))


def worker(rank: int, world: int, init_file: str, kind: str, steps: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A rank that fails makes the others time out instead of waiting forever.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        if kind == "dp":
            data_parallel(rank, world, steps, out_dir)
        else:
            sharded(rank, world, kind, steps, out_dir)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise  # the process fails, and mp.spawn reports it
    # Success, every result on disk: leave the group, then exit without interpreter
    # finalization, where gloo's worker threads can abort a process torn down around them
    # (a torch shutdown race, not a training failure).
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def distributed(kind: str, steps: int, world: int) -> List[torch.Tensor]:
    """Each rank's saved tensor."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(worker, args=(world, init_file, kind, steps, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"{kind}-{r}.pt")) for r in range(world)]


def main(argv: "List[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-data-parallel", action="store_true",
                    help="skip the DDP run (only the bit-identical sharded runs)")
    args = ap.parse_args(argv)
    ok = True
    start = nn.utils.parameters_to_vector(make_model().parameters()).detach()
    for kind in ("zo", "hybrid"):
        ref = single_process(kind, args.steps)
        got = torch.cat(distributed(kind, args.steps, args.world_size))
        same = torch.equal(ref.view(torch.int32), got.view(torch.int32))
        moved = (ref - start).abs().max().item()
        diff = (ref - got).abs().max().item()
        print(f"sharded {kind:6s}: {args.world_size} ranks vs 1 process, {args.steps} steps: "
              f"{'bit-identical' if same else 'MISMATCH'} (max |diff| {diff:.3g}, "
              f"parameters moved by up to {moved:.3g})")
        ok &= same and moved > 0
    if not args.no_data_parallel:
        ref = single_process("hybrid", args.steps)
        ranks = distributed("dp", args.steps, args.world_size)
        in_sync = all(torch.equal(r.view(torch.int32), ranks[0].view(torch.int32))
                      for r in ranks)
        diff = (ranks[0] - ref).abs().max().item()
        close = diff < 1e-4
        print(f"data-parallel hybrid (DDP): ranks {'in sync' if in_sync else 'DIVERGED'}, "
              f"max |diff| to the full-batch run {diff:.3g} "
              f"({'ok' if close else 'TOO LARGE'}: float rounding only)")
        ok &= in_sync and close
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
