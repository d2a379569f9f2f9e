"""Step time and peak memory of zeroth-order steps on a small LLaMA-style model, forwards
included: MeZO's eager loop, hyzo with full-rank Gaussian directions, and hyzo with low-rank
directions (spec v3 §7, forward hooks) at rank 1 and 4.

The model is written in plain torch (token embedding, RMSNorm, causal attention with RoPE,
SwiGLU MLP, untied or ``--tied`` output embedding), trained on random tokens with the
next-token cross-entropy. Every contender runs two-sided SPSA with q = 1 (two forwards per
step) and plain SGD (``--rule adazo``: hyzo's rows use AdaZO, two moments per element;
MeZO's stays SGD); the table gives each step time over the two forwards of the same run:

- ``forwards only``: the two ``no_grad`` forwards of a step and nothing else (the floor);
- ``MeZO eager``: Malladi et al.'s loop: ``torch.manual_seed`` + ``torch.normal`` per tensor,
  ``p.data = p.data + scale * z * eps`` for +1, -2, +1, then the update pass regenerating
  ``z`` again (four passes over every parameter);
- ``hyzo gaussian``: ``hyzo.torch.ZO(directions="gaussian")`` (three fused passes);
- ``hyzo lowrank r=1`` / ``r=4``: ``ZO(directions="lowrank", rank=r)`` attached to the model:
  every Linear/Embedding weight is perturbed inside the forward (two thin products per
  module), the norms' weights by a written Gaussian, and the update is one pass.

Each contender runs in a fresh subprocess, one after the other (so that each peak memory is
its own): build the model, two forwards (the baseline memory), ``--warmup`` steps, then
``--steps`` timed steps; the median step time is reported. Peak memory is the peak RSS of
the process (``ru_maxrss``) on the CPU and ``torch.cuda.max_memory_allocated`` on a GPU,
reported in total and above the forwards-only baseline of the same process. On a shared
machine the wall time follows the other load; the CPU time of the process (every thread,
``time.process_time``) is printed next to it: with ``--threads 1`` it is the work of the
step whatever else runs (with more threads, waiting threads that spin count too).

Usage: ``python benches/lowrank/step_time.py [--device cpu|cuda] [--size small|medium|1b]
[--dtype float32|bfloat16] [--batch B] [--seq T] [--steps N] [--tied] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn
from torch.nn import functional as F

SIZES = {
    # name: (vocab, d_model, layers, heads, mlp)
    "small": (8000, 512, 4, 8, 1376),  # ~21M parameters (untied): a 2-core CPU
    "medium": (32000, 1024, 8, 16, 2816),  # ~170M
    "1b": (32000, 2048, 20, 16, 5504),  # ~1.1B: a GPU
}
CONTENDERS = ["forwards only", "MeZO eager", "hyzo gaussian", "hyzo lowrank r=1",
              "hyzo lowrank r=4"]


# ---------------------------------------------------------------------------------------
# The model.


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.gate = nn.Linear(d, mlp, bias=False)
        self.up = nn.Linear(d, mlp, bias=False)
        self.down = nn.Linear(mlp, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        a = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v,
                                           is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, mlp: int,
                 tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.head_dim = d // heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        half = self.head_dim // 2
        inv = 1.0 / (10000 ** (torch.arange(half, device=tokens.device).float() / half))
        ang = torch.arange(t, device=tokens.device).float()[:, None] * inv[None, :]
        x = self.embed(tokens)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------
# MeZO's eager loop (Malladi et al., 2023), q = 1.


def mezo_perturb(params: List[torch.Tensor], seed: int, scale: float, eps: float) -> None:
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device,
                         dtype=p.data.dtype)
        p.data = p.data + scale * z * eps


def mezo_step(params: List[torch.Tensor], loss: Callable[[], torch.Tensor], seed: int,
              eps: float, lr: float) -> None:
    mezo_perturb(params, seed, 1.0, eps)
    l1 = float(loss())
    mezo_perturb(params, seed, -2.0, eps)
    l2 = float(loss())
    mezo_perturb(params, seed, 1.0, eps)
    g = (l1 - l2) / (2 * eps)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device,
                         dtype=p.data.dtype)
        p.data = p.data - lr * g * z


# ---------------------------------------------------------------------------------------
# One contender, in its own process.


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_one(args: argparse.Namespace) -> Dict[str, Any]:
    import hyzo.torch as ht

    device, name = args.device, args.contender
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    vocab, d, layers, heads, mlp = SIZES[args.size]
    model = Llama(vocab, d, layers, heads, mlp, args.tied).to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss() -> torch.Tensor:
        with torch.no_grad():
            logits = model(x)
            return F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))

    loss()
    loss()
    # torch.optim's first optimizer imports torch._dynamo (~65 MiB here): part of the
    # baseline, not of whichever contender builds an optimizer first.
    torch.optim.SGD([nn.Parameter(torch.zeros(1, device=device))], lr=0.1)
    sync(device)
    base = peak_bytes(device)
    eps, lr = 1e-3, 1e-6
    step: Callable[[], Any]
    if name == "forwards only":
        def step() -> None:
            float(loss())
            float(loss())
    elif name == "MeZO eager":
        counter = [0]

        def step() -> None:
            counter[0] += 1
            mezo_step(params, loss, counter[0], eps, lr)
    else:
        if name == "hyzo gaussian":
            opt = ht.ZO(params, lr=lr, eps=eps, seed=0, rule=args.rule,
                        num_threads=args.threads)
        else:
            rank = int(name.rsplit("=", 1)[1])
            opt = ht.ZO(params, lr=lr, eps=eps, seed=0, rule=args.rule,
                        directions="lowrank", rank=rank, num_threads=args.threads)
            opt.attach(model)

        def step() -> None:
            opt.step(loss)
    times, cpu = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    final = float(loss())
    return {"contender": name, "median_s": statistics.median(times), "times_s": times,
            "median_cpu_s": statistics.median(cpu), "cpu_s": cpu,
            "peak_bytes": peak_bytes(device), "baseline_bytes": base,
            "params": sum(p.numel() for p in params), "final_loss": final}


# ---------------------------------------------------------------------------------------
# The driver.


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="parameter dtype (default: float32 on the CPU, bfloat16 on a GPU)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rule", default="sgd", choices=["sgd", "adazo"],
                    help="hyzo's update rule (MeZO eager is always SGD)")
    ap.add_argument("--tied", action="store_true", help="tie the output to the embedding")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of torch and of hyzo's CPU backend (default: every "
                    "logical CPU)")
    ap.add_argument("--only", action="append", choices=CONTENDERS,
                    help="run only these contenders (repeatable)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.contender is not None:
        print(json.dumps(run_one(args)))
        return

    vocab, d, layers, heads, mlp = SIZES[args.size]
    print(f"# {machine(args.device)}; torch {torch.__version__}; {args.size}: vocab {vocab}, "
          f"d {d}, {layers} layers, {heads} heads, MLP {mlp}, "
          f"{'tied' if args.tied else 'untied'}, {args.dtype}; batch {args.batch} x seq "
          f"{args.seq}; two-sided, q = 1, hyzo rule {args.rule}; median of {args.steps} steps after "
          f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for name in args.only or CONTENDERS:
        cmd = [sys.executable, os.path.abspath(__file__), "--contender", name]
        for k in ("device", "size", "dtype", "batch", "seq", "steps", "warmup", "threads",
                  "rule"):
            v = getattr(args, k)
            if v is not None:
                cmd += [f"--{k}", str(v)]
        if args.tied:
            cmd.append("--tied")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results.append(r)
        print(f"  {name}: {r['median_s'] * 1e3:.1f} ms, peak {r['peak_bytes'] / 2**20:.0f} MiB",
              flush=True)
    floor = next((r["median_s"] for r in results if r["contender"] == "forwards only"), None)
    mezo = next((r["median_s"] for r in results if r["contender"] == "MeZO eager"), None)
    mem = "peak RSS" if args.device == "cpu" else "peak allocated"
    print(f"\nparameters: {results[0]['params'] / 1e6:.1f}M\n")
    cpu_floor = next((r["median_cpu_s"] for r in results
                      if r["contender"] == "forwards only"), None)
    cpu_mezo = next((r["median_cpu_s"] for r in results if r["contender"] == "MeZO eager"), None)
    print(f"| contender | step ms (median) | / the forwards | over the forwards, ms | "
          f"MeZO / this | "
          f"CPU ms (median) | CPU over the forwards, ms | MeZO / this (CPU) | {mem}, MiB "
          "| above the forwards, MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        t, c = r["median_s"], r["median_cpu_s"]
        over = "" if floor is None else f"{(t - floor) * 1e3:.1f}"
        times = "" if floor is None else f"{t / floor:.2f}×"
        ratio = "" if mezo is None else f"{mezo / t:.2f}×"
        cover = "" if cpu_floor is None else f"{(c - cpu_floor) * 1e3:.1f}"
        cratio = "" if cpu_mezo is None else f"{cpu_mezo / c:.2f}×"
        print(f"| {r['contender']} | {t * 1e3:.1f} | {times} | {over} | {ratio} | {c * 1e3:.1f} | "
              f"{cover} | {cratio} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{(r['peak_bytes'] - r['baseline_bytes']) / 2**20:.0f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine(args.device), "args": vars(args),
                       "results": results}, f, indent=1)
    assert all(math.isfinite(r["final_loss"]) for r in results)


if __name__ == "__main__":
    main()
