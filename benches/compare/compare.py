"""Side-by-side comparison of hyzo with what users run today, in one process.

Each figure is the median of several repetitions, every contender measured in the same run
on the same tensors:

- a full ZO step without the forward passes (two-sided, q = 1 and q = 4) over the tensor
  shapes of a LLaMA-style model: hyzo against MeZO's eager PyTorch loop (per-tensor
  ``torch.normal`` with the seed trick, 3q perturbation passes and q update passes), the same
  loop under ``torch.compile``, and on the CPU numpy (``Generator(Philox)``, float32);
- Gaussian generation: hyzo against ``torch.Tensor.normal_``, ``torch.randn`` and numpy;
- first-order updates: hyzo AdamW and sign against ``torch.optim.AdamW`` (``foreach=True`` on
  the CPU, ``fused=True`` on the GPU);
- on a GPU, the ceiling: a device-to-device copy in the same run, and each figure's fraction
  of it.

Each figure is printed as soon as it is measured, and ``--json`` is rewritten after each one,
so a run stopped at a time limit (scripts/gpu-check caps it) keeps what it measured; the
``torch.compile`` rows come last, since their compilation is the one long, unpredictable
part.

Usage: ``python benches/compare/compare.py [--device cpu|cuda] [--size small|medium|1b]
[--reps N] [--json out.json] [--no-compile]``. It prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import hyzo
import hyzo.torch as hzt

SIZES = {
    # name: (vocab, d_model, layers, mlp)
    "small": (8000, 512, 4, 1376),  # ~20M parameters: this 2-core machine
    "medium": (32000, 1024, 8, 2816),  # ~170M
    "1b": (32000, 2048, 20, 5504),  # ~1.1B: an H100
}


def llama_shapes(size: str) -> list[tuple[int, ...]]:
    vocab, d, layers, mlp = SIZES[size]
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (mlp, d), (mlp, d), (d, mlp)]
    shapes += [(d,), (vocab, d)]
    return shapes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps: int, device: str, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------
# MeZO's eager loop (Malladi et al., 2023), generalised to q directions.


def mezo_perturb(params, seed: int, scale: float, eps: float) -> None:
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * z * eps


def mezo_update(params, seed: int, grad: float, lr: float) -> None:
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * grad * z


def mezo_step(params, q: int, eps: float, lr: float, step: int, perturb=mezo_perturb, update=mezo_update):
    seeds = [step * 1000 + d for d in range(q)]
    for s in seeds:
        perturb(params, s, 1.0, eps)
        perturb(params, s, -2.0, eps)
        perturb(params, s, 1.0, eps)
    for s in seeds:
        update(params, s, 0.1 / q, lr)


def compiled_mezo():
    """The MeZO loop with its per-parameter bodies under ``torch.compile``: two graphs in
    all. The step sizes enter as 0-d tensors on the parameters' device: a Python float
    argument is a constant of the traced graph, so each value (scale 1 and -2, grad 0.1/q)
    would compile a graph of its own."""

    @torch.compile(dynamic=False)
    def perturb_all(ps, alpha: torch.Tensor):
        for p in ps:
            p.add_(torch.randn_like(p) * alpha)

    @torch.compile(dynamic=False)
    def update_all(ps, alpha: torch.Tensor):
        for p in ps:
            p.sub_(torch.randn_like(p) * alpha)

    scalars: dict = {}

    def scalar(x: float, device) -> torch.Tensor:
        # Made once per value: a fresh torch.tensor per call would copy to the device.
        key = (x, str(device))
        if key not in scalars:
            scalars[key] = torch.tensor(x, dtype=torch.float32, device=device)
        return scalars[key]

    def perturb(ps, seed, scale, eps):
        torch.manual_seed(seed)
        with torch.no_grad():
            perturb_all(ps, scalar(scale * eps, ps[0].device))

    def update(ps, seed, grad, lr):
        torch.manual_seed(seed)
        with torch.no_grad():
            update_all(ps, scalar(lr * grad, ps[0].device))

    return perturb, update


def numpy_step(arrays, q: int, eps: float, lr: float, step: int) -> None:
    def gen(seed):
        return np.random.Generator(np.random.Philox(seed))

    for d in range(q):
        for scale in (1.0, -2.0, 1.0):
            g = gen(step * 1000 + d)
            for a in arrays:
                a += np.float32(scale * eps) * g.standard_normal(a.shape, dtype=np.float32)
    for d in range(q):
        g = gen(step * 1000 + d)
        for a in arrays:
            a -= np.float32(lr * 0.1 / q) * g.standard_normal(a.shape, dtype=np.float32)


def make_params(shapes, device, dtype, seed=0):
    """Seeded random parameters, drawn on ``device`` itself: the 1b size drawn on the host
    takes 6-9 s of CPU per set, eight sets per run, while a lent GPU waits."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        (torch.randn(s, generator=g, device=device) * 0.02).to(dtype).requires_grad_(True)
        for s in shapes
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default=None, choices=list(SIZES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and hyzo (0: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    size = args.size or ("small" if dev == "cpu" else "1b")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    shapes = llama_shapes(size)
    numel = sum(int(np.prod(s)) for s in shapes)
    dtype = torch.bfloat16
    machine = {
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "hyzo": hyzo.__version__,
        "python": platform.python_version(),
    }
    if dev == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        machine["driver"] = _driver()
    print(f"hyzo compare: {dev}, {size} LLaMA-style shapes ({len(shapes)} tensors, "
          f"{numel / 1e6:.1f}M parameters, bf16), median of {args.reps}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    rows: list[dict] = []
    out = {"machine": machine, "device": dev, "size": size, "parameters": numel,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows,
           "complete": False}

    def write_json():
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=2)
            os.replace(tmp, args.json)

    def record(group, name, secs, elems, bytes_moved=None, **extra):
        row = {"group": group, "name": name, "seconds": secs, "elements_per_s": elems / secs}
        if bytes_moved is not None:
            row["gb_per_s"] = bytes_moved / secs / 1e9
        row.update(extra)
        rows.append(row)
        print(f"  {group}: {name}: {secs * 1e3:.2f} ms", flush=True)
        write_json()
        return row

    # --- Ceiling (GPU): device-to-device copy of the parameters' bytes.
    if dev == "cuda":
        src = torch.empty(numel, dtype=dtype, device=dev).normal_()
        dst = torch.empty_like(src)
        secs = timeit(lambda: dst.copy_(src), args.reps, dev)
        record("ceiling", "device-to-device copy", secs, numel, 2 * numel * 2)

    # --- One perturbation pass (+eps z) over every tensor, bf16.
    if dev == "cpu":
        import ml_dtypes

        group = "perturb pass, bf16"
        arrays = [np.asarray(torch.randn(s) * 0.02, dtype=ml_dtypes.bfloat16) for s in shapes]
        opt = hyzo.Optimizer(arrays, lr=0.0, eps=1e-3, seed=1)
        # begin() is the first pass of a two-sided step, abort() the pass that undoes it.
        secs = timeit(lambda: (opt.begin(), opt.abort()), args.reps, dev)
        record(group, "hyzo", secs / 2, numel, 4 * numel)
        opt.close()
        del arrays
        params = make_params(shapes, dev, dtype)
        secs = timeit(lambda: mezo_perturb(params, 7, 1.0, 1e-3), args.reps, dev)
        record(group, "MeZO eager (PyTorch)", secs, numel)
        del params

    # --- Full ZO step without forwards.
    for q in (1, 4):
        group = f"ZO step, two-sided, q={q}"
        params = make_params(shapes, dev, dtype)
        opt = hzt.ZO(params, lr=1e-6, eps=1e-3, num_directions=q, seed=1)
        loss = torch.zeros((), device=dev)
        secs = timeit(lambda: opt.step(lambda: loss), args.reps, dev)
        passes = 2 * q + 1
        record(group, "hyzo", secs, numel, passes * 4 * numel)
        del opt, params
        params = make_params(shapes, dev, dtype)
        counter = iter(range(10**9))
        secs = timeit(lambda: mezo_step(params, q, 1e-3, 1e-6, next(counter)), args.reps, dev)
        record(group, "MeZO eager (PyTorch)", secs, numel)
        del params
        if dev == "cpu":
            arrays = [np.asarray(torch.randn(s) * 0.02, dtype=np.float32) for s in shapes]
            secs = timeit(lambda: numpy_step(arrays, q, 1e-3, 1e-6, next(counter)), max(1, args.reps // 2), dev)
            record(group, "numpy Generator(Philox), float32", secs, numel)
            del arrays

    # --- Gaussian generation.
    group = "Gaussian generation (float32)"
    n = numel
    buf = torch.empty(n, dtype=torch.float32, device=dev)
    if dev == "cpu":
        secs = timeit(lambda: hyzo.directions("gaussian", 1, 0, 0, 0, n), args.reps, dev)
        record(group, "hyzo.directions", secs, n)
        g = np.random.Generator(np.random.Philox(1))
        secs = timeit(lambda: g.standard_normal(n, dtype=np.float32), args.reps, dev)
        record(group, "numpy Generator(Philox)", secs, n)
    else:
        ones = make_params([(n,)], dev, torch.float32)
        opt = hzt.ZO(ones, lr=0.0, eps=1.0, seed=3)
        # One perturbation pass of an f32 tensor: generation plus 8 bytes per element.
        secs = timeit(lambda: (opt.zero_grad(), opt.step(lambda: torch.zeros((), device=dev))), args.reps, dev)
        record(group, "hyzo (3 passes of a q=1 step, f32)", secs / 3, n)
        del opt, ones
    secs = timeit(lambda: buf.normal_(), args.reps, dev)
    record(group, "torch.Tensor.normal_", secs, n)
    secs = timeit(lambda: torch.randn(n, device=dev), args.reps, dev)
    record(group, "torch.randn", secs, n)
    del buf

    # --- First-order updates.
    group = "first-order update, bf16 params"
    for rule in ("adamw", "sign"):
        params = make_params(shapes, dev, dtype)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = hzt.FO(params, lr=1e-6, rule=rule)
        secs = timeit(lambda: opt.step(), args.reps, dev)
        record(group, f"hyzo FO {rule}", secs, numel)
        del opt, params
    params = make_params(shapes, dev, dtype)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kw = {"fused": True} if dev == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-6, **kw)
    secs = timeit(lambda: opt.step(), args.reps, dev)
    record(group, f"torch.optim.AdamW({next(iter(kw))}=True)", secs, numel)
    del opt, params

    # --- The MeZO loop under torch.compile, last (see the module's documentation).
    if not args.no_compile:
        perturb, update = compiled_mezo()
        counter = iter(range(10**9))
        for q in (1, 4):
            params = make_params(shapes, dev, dtype)
            try:
                t = time.perf_counter()
                secs = timeit(lambda: mezo_step(params, q, 1e-3, 1e-6, next(counter), perturb, update),
                              args.reps, dev, warmup=2)
                # Wall time of the warm-up calls: the compilation, the first time.
                warmup = time.perf_counter() - t - args.reps * secs
                record(f"ZO step, two-sided, q={q}", "MeZO under torch.compile", secs, numel,
                       warmup_seconds=warmup)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  torch.compile failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                break
            finally:
                del params
        print(f"  torch.compile: {_graph_count()} graphs compiled", flush=True)

    _print(rows, dev)
    out["complete"] = True
    write_json()
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _graph_count() -> str:
    """Graphs compiled by torch.compile in this process (as its counters say), or '?'."""
    try:
        from torch._dynamo.utils import counters

        return str(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - an internal API: best effort
        return "?"


def _print(rows, dev):
    print()
    print(f"{'group':<34} {'contender':<36} {'ms':>9} {'Melem/s':>10} {'GB/s':>8} {'vs hyzo':>8}")
    ceiling = next((r for r in rows if r["group"] == "ceiling"), None)
    # Grouped in the order groups first appear (the torch.compile rows are measured last).
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["group"], i)
    for r in sorted(rows, key=lambda r: first[r["group"]]):
        same = [x for x in rows if x["group"] == r["group"] and x["name"].startswith("hyzo")]
        ratio = ""
        if same and not r["name"].startswith("hyzo"):
            ratio = f"{r['seconds'] / same[0]['seconds']:.2f}x"
        gb = f"{r['gb_per_s']:.1f}" if "gb_per_s" in r else ""
        if ceiling and "gb_per_s" in r and r is not ceiling:
            gb += f" ({r['gb_per_s'] / ceiling['gb_per_s']:.0%})"
        print(f"{r['group']:<34} {r['name']:<36} {r['seconds'] * 1e3:>9.2f} "
              f"{r['elements_per_s'] / 1e6:>10.1f} {gb:>8} {ratio:>8}")
    print("\n'vs hyzo': the contender's time over hyzo's in the same group (above 1: hyzo is faster).")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _driver() -> str:
    try:
        import subprocess

        return subprocess.check_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True,
            timeout=20,
        ).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
