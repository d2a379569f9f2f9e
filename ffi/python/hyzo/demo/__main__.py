"""``python -m hyzo.demo``: the command line (see the package documentation)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

import hyzo
import hyzo.demo

from .attacks import BNB_ATTACKS
from .controls import DESCRIPTION, ROWS
from .experiment import Log, Setup, run_seed
from .report import aggregate, plot, summary_markdown, table_lines, verdict


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyzo.demo",
                                 description=hyzo.demo.__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (smaller world, one target, short caps)")
    ap.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="how many seeds (seed, seed+1, ...): mean +- std (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default="out/demo", help="folder for the plot and the JSON")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the model is tiny; 0: torch's "
                         "default)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds: at least 1")
    if args.device not in ("cpu", "cuda"):
        ap.error(f"--device: cpu or cuda, got {args.device}")
    if args.device == "cuda" and not (torch.cuda.is_available() and hyzo.cuda_available()):
        print("hyzo.demo: --device cuda needs a CUDA device and a hyzo built with CUDA",
              file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    setup = Setup.tiny() if args.tiny else Setup.quick() if args.quick else Setup()
    log = Log(args.quiet)
    t_start = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed = []
    seconds = []
    for seed in seeds:
        t0 = time.time()
        per_seed.append(run_seed(seed, setup, args.device, log))
        seconds.append(time.time() - t0)
        log.line(f"seed {seed} done in {seconds[-1]:.0f} s")
    agg = aggregate(per_seed)
    n = len(seeds)
    seeds_note = "one seed" if n == 1 else f"{n} seeds, mean±std"
    print(f"\nUnlearning at lr {setup.lr:g} from an int4 base (4-bit, groups of 32), "
          f"stopped at matched forget accuracy; {seeds_note}.")
    print("Columns: forget/retain accuracy after unlearning; forget accuracy after "
          "re-quantization (4-bit g32 = the base's grid), per-channel 4-/8-bit, loaded as "
          "bitsandbytes does (nf4, fp4: 4-bit, blocks of 64; int8: LLM.int8), and after "
          f"{setup.relearn_k} AdamW relearning steps on half the forget set (held-out half); "
          "fraction of quantized values unlearning changed; mean |delta| in quantization "
          "steps; optimizer steps; forward/backward passes.")
    bases = [r["base"] for r in per_seed]
    mean = {k: sum(b[k] for b in bases) / n for k in ("accuracy", "forget", "retain",
                                                       "forget relearned")}
    print(f"\nBase (int4 checkpoint): accuracy {mean['accuracy']:.3f} (forget "
          f"{mean['forget']:.2f}, retain {mean['retain']:.2f}); relearning attack on the base "
          f"itself: held-out half {mean['forget relearned']:.2f}")
    for line in table_lines(agg, n):
        print(line)
    print("\nRows:")
    for name in ROWS:
        print(f"  {name:<16} {DESCRIPTION[name]}")
    print("\nWhat this run shows:")
    for line in verdict(agg, n):
        print("  " + line)
    bnb_verdicts = {attack: verdict(agg, n, attack, f"loading as {attack}")
                    for attack in BNB_ATTACKS}
    for attack, lines in bnb_verdicts.items():
        print(f"\nUnder bitsandbytes' loading, {attack}:")
        for line in lines[1 if n == 1 else 0:]:  # the one-seed note, printed above
            print("  " + line)
    results = {
        "machine": {"cpu": _cpu_name(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "hyzo": hyzo.__version__
                    if hasattr(hyzo, "__version__") else None, "device": args.device},
        "setup": {k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in setup.__dict__.items()},
        "seeds": seeds,
        "rows": DESCRIPTION,
        "mean_std": agg,
        "per_seed": per_seed,
        "verdict": verdict(agg, n),
        "verdict bitsandbytes": bnb_verdicts,
    }
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "results.json")
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(summary_markdown(agg, bases, n)) + "\n")
    ppath = plot(agg, n, os.path.join(args.out, "robustness.png"))
    total = time.time() - t_start
    print(f"\nwrote {jpath}, summary.md (Markdown tables)" + (f" and {ppath}" if ppath else ""))
    print(f"total time {total:.0f} s ({', '.join(f'{s:.0f}' for s in seconds)} s per seed; "
          "not in results.json, which is identical run after run on one machine)")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
