"""The report: mean and std over seeds, the tables, the verdict read off them with the
controls, and the plot."""

from __future__ import annotations

import math
import sys
from typing import List, Optional

from .attacks import BNB_ATTACKS
from .controls import ADAMW, HYBRID, NOISE_ADAMW, NOISE_BASE, NULL_ZO, ROWS

METRICS = ["forget", "retain", "forget 4-bit g32", "forget 4-bit per-channel",
           "forget 8-bit per-channel", "forget relearned", "grid values changed",
           "mean |delta| / step", "steps", "forwards", "backwards"]
# bitsandbytes' loading: forget and retain accuracy after each.
BNB_METRICS = [f"{what} {attack}" for attack in BNB_ATTACKS for what in ("forget", "retain")]
BNB_HEADS = {attack: attack.removeprefix("bnb ") for attack in BNB_ATTACKS}


def aggregate(per_seed: List[dict]) -> dict:
    """mean and std (population std over seeds; 0 with one seed) of every metric."""
    first = per_seed[0]["runs"]
    out: dict = {}
    for obj, targets in first.items():
        out[obj] = {}
        for t, rows in targets.items():
            out[obj][t] = {}
            for name in rows:
                cell = {}
                for k in METRICS + ["displacement_rms", "zo_changes_rms"] + BNB_METRICS:
                    vals = [s["runs"][obj][t][name].get(k) for s in per_seed]
                    if any(v is None for v in vals):
                        continue
                    mean = sum(vals) / len(vals)
                    var = sum((v - mean) ** 2 for v in vals) / len(vals)
                    cell[k] = {"mean": mean, "std": math.sqrt(var)}
                reached = [s["runs"][obj][t][name]["reached"] for s in per_seed]
                cell["reached"] = (None if reached[0] is None
                                   else sum(1 for r in reached if r))
                out[obj][t][name] = cell
    return out


def _fmt(cell: dict, k: str, n: int, digits: int = 2) -> str:
    if k not in cell:
        return "-"
    m, s = cell[k]["mean"], cell[k]["std"]
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f}±{s:.{digits}f}"


def table_lines(agg: dict, n_seeds: int, markdown: bool = False) -> List[str]:
    cols = ["forget", "retain", "forget 4-bit g32", "forget 4-bit per-channel",
            "forget 8-bit per-channel"] + [f"forget {a}" for a in BNB_ATTACKS] + [
            "forget relearned", "grid values changed", "mean |delta| / step"]
    heads = ["forget", "retain", "4-bit g32", "4-bit ch", "8-bit ch"] + [
        f"bnb {h}" for h in BNB_HEADS.values()] + ["relearned", "grid chg", "|Δ|/step"]
    lines: List[str] = []
    for obj, targets in agg.items():
        for t, rows in targets.items():
            title = f"{obj}, stopped at forget <= {t}"
            if markdown:
                lines.append(f"| {title} | " + " | ".join(heads) + " | steps | fwd / bwd |")
                lines.append("|---|" + "---:|" * (len(heads) + 2))
            else:
                lines.append("")
                lines.append(title)
                lines.append(f"  {'':<16}" + "".join(f"{h:>12}" for h in heads)
                             + f"{'steps':>9}  fwd/bwd")
            for name, cell in rows.items():
                vals = [_fmt(cell, k, n_seeds) for k in cols]
                reached = cell.get("reached")
                steps = _fmt(cell, "steps", n_seeds, 0)
                if reached is not None and reached < n_seeds:
                    steps += f" ({n_seeds - reached} capped)" if n_seeds > 1 else " (cap)"
                fb = f"{_fmt(cell, 'forwards', n_seeds, 0)} / {_fmt(cell, 'backwards', n_seeds, 0)}"
                if name == NOISE_BASE:
                    steps, fb = "-", "-"
                if markdown:
                    lines.append(f"| {name} | " + " | ".join(vals) + f" | {steps} | {fb} |")
                else:
                    lines.append(f"  {name:<16}" + "".join(f"{v:>12}" for v in vals)
                                 + f"{steps:>9}  {fb}")
            if markdown:
                lines.append("")
    return lines


def summary_markdown(agg: dict, base: dict, n_seeds: int) -> List[str]:
    """The README's Markdown tables: the re-quantization attack on the base's grid for every
    objective and target, bitsandbytes' loading (forget, then retain accuracy) for every
    objective and target, then the other columns at each objective's first target."""
    panels = [(obj, t) for obj, targets in agg.items() for t in targets]
    lines = ["| forget accuracy: unlearned → re-quantized (4-bit g32) | "
             + " | ".join(f"{obj} ≤ {t}" for obj, t in panels) + " |",
             "|---|" + "---:|" * len(panels)]
    for name in ROWS:
        cells = []
        for obj, t in panels:
            c = agg[obj][t][name]
            mark = " (capped)" if c.get("reached") is not None and c["reached"] < n_seeds \
                else ""
            cells.append(f"{_fmt(c, 'forget', 1)} → {_fmt(c, 'forget 4-bit g32', n_seeds)}"
                         + mark)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(_bnb_markdown(agg, panels, n_seeds))
    cols = [("retain", "retain"), ("forget 4-bit per-channel", "4-bit per-channel"),
            ("forget 8-bit per-channel", "8-bit per-channel"),
            ("forget relearned", "relearned"), ("grid values changed", "grid values changed"),
            ("mean |delta| / step", "mean \\|Δ\\| / step")]
    for obj, targets in agg.items():
        t = next(iter(targets))
        lines.append(f"| {obj} ≤ {t} | " + " | ".join(h for _, h in cols)
                     + " | steps | fwd / bwd |")
        lines.append("|---|" + "---:|" * (len(cols) + 2))
        for name in ROWS:
            c = targets[t][name]
            vals = [_fmt(c, k, n_seeds) for k, _ in cols]
            if name == NOISE_BASE:
                steps = fb = "–"
            else:
                steps = _fmt(c, "steps", n_seeds, 0)
                if c.get("reached") is not None and c["reached"] < n_seeds:
                    steps += " (capped)"
                fb = f"{_fmt(c, 'forwards', n_seeds, 0)} / {_fmt(c, 'backwards', n_seeds, 0)}"
            lines.append(f"| {name} | " + " | ".join(vals) + f" | {steps} | {fb} |")
        lines.append("")
    b = {k: sum(x[k] for x in base) / len(base) for k in ("accuracy", "forget relearned")}
    lines.append(f"Base (int4 checkpoint): accuracy {b['accuracy']:.3f}; the relearning "
                 f"attack on it leaves the held-out half at {b['forget relearned']:.2f}.")
    return lines


def _bnb_markdown(agg: dict, panels: list, n_seeds: int) -> List[str]:
    """The bitsandbytes attacks for every objective and target: the forget accuracy after
    each, then the retain accuracy after each."""
    heads = " / ".join(BNB_HEADS.values())
    lines: List[str] = []
    for what in ("forget", "retain"):
        lines.append(f"| {what} accuracy after bitsandbytes' loading: {heads} | "
                     + " | ".join(f"{obj} ≤ {t}" for obj, t in panels) + " |")
        lines.append("|---|" + "---:|" * len(panels))
        for name in ROWS:
            cells = [" / ".join(_fmt(agg[obj][t][name], f"{what} {a}", n_seeds)
                                for a in BNB_ATTACKS) for obj, t in panels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _diff(cell_a: dict, cell_b: dict, k: str, n: int) -> tuple:
    """(mean_a - mean_b, whether it exceeds the noise: 2 standard errors with several seeds,
    0.1 with one)."""
    a, b = cell_a[k], cell_b[k]
    d = a["mean"] - b["mean"]
    if n > 1:
        se = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / (n - 1))
        return d, abs(d) > max(2 * se, 0.02)
    return d, abs(d) > 0.1


def verdict(agg: dict, n_seeds: int, attack: str = "4-bit g32",
            attack_text: str = "re-quantization on the base's grid") -> List[str]:
    """What the run shows under ``attack`` (a column of the table, ``attack_text`` in the
    text), read off the table with the controls (no claim beyond them)."""
    key = f"forget {attack}"
    lines = []
    if n_seeds == 1:
        lines.append("(one seed: a difference counts only above 0.1; use --seeds N for "
                     "mean +- std)")
    for obj, targets in agg.items():
        for t, rows in targets.items():
            a, h = rows[ADAMW], rows[HYBRID]
            capped = [n for n, c in rows.items()
                      if c.get("reached") is not None and c["reached"] < n_seeds]
            lines.append(f"{obj}, stopped at forget <= {t}"
                         + (f" (capped before the target: {', '.join(capped)})"
                            if capped else "") + ":")
            restored = a[key]["mean"] - a["forget"]["mean"]
            lines.append(f"  {attack_text} takes AdamW from "
                         f"{a['forget']['mean']:.2f} to {a[key]['mean']:.2f}"
                         + (": the attack works" if restored > 0.3 else
                            ": the attack restores little here"))
            d, sig = _diff(h, a, key, n_seeds)
            edge = sig and d < 0
            lines.append(f"  the hybrid after the attack: {h[key]['mean']:.2f} -> "
                         + ("more robust than AdamW" if edge else
                            "less robust than AdamW" if sig else
                            "no difference from AdamW beyond noise"))
            for name, what, cause in (
                    (NOISE_ADAMW, "(a) AdamW + matched random displacement",
                     "a random displacement of that size"),
                    (NULL_ZO, "(b) null-ZO hybrid", "the same rule on steps blind to the "
                     "objective")):
                c = rows[name]
                dh, sig_h = _diff(c, h, key, n_seeds)
                da, sig_a = _diff(c, a, key, n_seeds)
                head = f"  control {what}: {c[key]['mean']:.2f} -> "
                if not edge:
                    lines.append(head + ("more robust than AdamW" if sig_a and da < 0 else
                                         "no better than AdamW"))
                elif not sig_h or dh < 0:
                    lines.append(head + f"as robust as the hybrid: {cause} explains its edge")
                elif not sig_a:
                    lines.append(head + f"no better than AdamW: {cause} does not explain "
                                 "the hybrid's edge")
                else:
                    lines.append(head + f"between AdamW and the hybrid: {cause} explains "
                                 "part of its edge")
            nb = rows[NOISE_BASE]
            lines.append(f"  control (c) the displacement on the base: forget "
                         f"{nb['forget']['mean']:.2f}, retain {nb['retain']['mean']:.2f}"
                         + (" (noise alone does not forget)" if nb["forget"]["mean"] > 0.9
                            else " (noise alone forgets)"))
    return lines


def plot(agg: dict, n_seeds: int, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    panels = [(obj, t) for obj, targets in agg.items() for t in targets]
    cols = len(next(iter(agg.values())))
    rows_n = len(agg)
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, 3.6 * rows_n + 1.0),
                             sharey=True, squeeze=False)
    series = [("forget", "unlearned"), ("forget 4-bit g32", "re-quantized 4-bit g32 (base grid)"),
              ("forget 4-bit per-channel", "4-bit per-channel"),
              ("forget 8-bit per-channel", "8-bit per-channel")] + [
              (f"forget {a}", a) for a in BNB_ATTACKS] + [
              ("forget relearned", "relearned (held-out half)")]
    width = 0.8 / len(series)
    for ax, (obj, t) in zip(axes.flat, panels):
        rows = agg[obj][t]
        names = list(rows)
        for si, (k, label) in enumerate(series):
            xs = [i + (si - (len(series) - 1) / 2) * width for i in range(len(names))]
            ys = [rows[n][k]["mean"] for n in names]
            err = [rows[n][k]["std"] for n in names] if n_seeds > 1 else None
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=f"C{si}", label=label)
        ax.set_xticks(range(len(names)))
        capped = {n for n in names
                  if rows[n].get("reached") is not None and rows[n]["reached"] < n_seeds}
        ax.set_xticklabels([n.replace(" + ", "\n+ ").replace("null-ZO ", "null-ZO\n")
                            + ("\n(capped)" if n in capped else "") for n in names],
                           fontsize=8)
        ax.axhline(float(t), color="gray", ls=":", lw=1)
        ax.set_title(f"{obj}: stopped at forget <= {t}", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("forget-set accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    # One legend row per four series a panel column holds.
    ncol = min(len(series), 4 * cols)
    legend_rows = -(-len(series) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(f"hyzo demo: forget accuracy before and after each attack ({seeds})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * legend_rows, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
