#!/usr/bin/env python
"""Recipe benchmark: learning curves of the constant baseline and the paper schedule at one budget.

With and without augmentation, at the recipe's network width or another (``--filters``).

Each run is one ``pgps-tune train`` with the recipe's defaults except the schedule, the budget and
the augmentation preset, so the curves show where the baseline stops improving, whether
augmentation pays, and whether paper-performance keeps its gain once the patches are augmented.
A run whose augmentation mirrors is also scored with test-time mirroring (``pgps-tune evaluate
--mirror``, cached in the run folder as ``evaluate_mirror.json``).  Runs are kept in ``--out`` and
reused (delete a run folder to train it again); the report gives each run's command, its Dice every
``--val-every`` epochs, its training time, and a curve figure::

    .venv/bin/python scripts/bench_recipe.py --schedules constant paper:performance --augment default none \\
        --epochs 200 --iterations-per-epoch 100 --val-every 10 --report docs/bench_recipe.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from pgps_tune.errors import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.885  # the constant baseline's validation Dice asked for within 30 minutes of 2-core CPU training
TARGET_S = 1800.0


def _schedule_args(schedule: str) -> list[str]:
    preset, _, mode = schedule.partition(":")
    return ["--preset", preset, *(["--mode", mode] if mode else [])]


def _name(schedule: str, aug: str, epochs: int, ipe: int, filters: list[int] | None = None) -> str:
    width = f"-f{'-'.join(map(str, filters))}" if filters else ""
    return f"{schedule.replace(':', '-')}-{aug}-e{epochs}x{ipe}{width}"


def train(data: str, out: Path, schedule: str, augment: str, epochs: int, ipe: int, val_every: int,
          threads: int, filters: list[int] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pgps_tune.cli", "train", "--data", data, "--out", str(out),
           *_schedule_args(schedule), "--augment", augment, "--epochs", str(epochs), "--iterations-per-epoch",
           str(ipe), "--val-every", str(val_every), "--threads", str(threads), "--quiet",
           *(["--filters", *map(str, filters)] if filters else [])]
    if not (out / "metrics.json").is_file() or not json.loads((out / "metrics.json").read_text())["completed"]:
        subprocess.run(cmd, check=True, cwd=ROOT)
    return cmd


def mirrored(data: str, run: Path, threads: int) -> dict[str, Any]:
    """The run's validation Dice with test-time mirroring (computed once, then read from the run folder)."""
    cache = run / "evaluate_mirror.json"
    if not cache.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        res = subprocess.run([sys.executable, "-m", "pgps_tune.cli", "evaluate", "--data", data, "--run", str(run),
                              "--mirror"], check=True, cwd=ROOT, capture_output=True, text=True, env=env)
        atomic_write_text(cache, res.stdout)
    return json.loads(cache.read_text())


def _plateau(history: list[dict[str, Any]], within: float = 0.005) -> dict[str, Any]:
    """The first validation within ``within`` of the run's best Dice: where the curve stops improving."""
    best = max(h["val_dice"] for h in history)
    return next(h for h in history if h["val_dice"] >= best - within)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--schedules", nargs="+", default=["constant"],
                    help="built-in schedules, each PRESET or PRESET:MODE (e.g. constant paper:performance)")
    ap.add_argument("--augment", nargs="+", default=["default", "none"], help="presets to compare")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--iterations-per-epoch", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--filters", type=int, nargs="+",
                    help="the network's channels per level (default: the recipe's); runs are kept apart by width")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_recipe"))
    ap.add_argument("--report", help="write a Markdown report here (the figure beside it, in img/)")
    a = ap.parse_args()
    from pgps_tune.config import augment_preset

    out = Path(a.out)
    runs: dict[tuple[str, str], tuple[list[str], dict[str, Any], dict[str, Any] | None]] = {}
    for schedule in a.schedules:
        for aug in a.augment:
            run = out / _name(schedule, aug, a.epochs, a.iterations_per_epoch, a.filters)
            cmd = train(a.data, run, schedule, aug, a.epochs, a.iterations_per_epoch, a.val_every, a.threads,
                        a.filters)
            mirror = mirrored(a.data, run, a.threads) if augment_preset(aug).p_mirror > 0 else None
            runs[schedule, aug] = (cmd, json.loads((run / "metrics.json").read_text()), mirror)

    import torch

    first = next(iter(runs.values()))[1]
    lines = [
        "# Recipe benchmark: constant and paper schedules with and without augmentation", "",
        f"Command: `.venv/bin/python {shlex.join(['scripts/bench_recipe.py', *sys.argv[1:]])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; one run at a time, "
        f"{a.threads} threads. Each run is `pgps-tune train` with the recipe's defaults ({first['config']['network']}, "
        f"{first['config']['optimizer']}, poly learning rate over the run, baseline batch "
        f"{first['schedule']['baseline_batch_size']}, the data's plan) except the schedule, the budget "
        f"({a.epochs} epochs x {a.iterations_per_epoch} iterations) and the augmentation preset"
        + (f", and the network's widths (`--filters {' '.join(map(str, a.filters))}`)" if a.filters else "") + ":", "",
        *[f"- `{' '.join(['pgps-tune', *cmd[3:]])}`" for cmd, _, _ in runs.values()], "",
        "Validation Dice (mean of the two classes, sliding window at the final patch, no mirroring) and the "
        "training time when it was measured (validation time excluded):", "",
        "| epoch | iterations | " + " | ".join(f"{s}, {g}: Dice | s" for s, g in runs) + " |",
        "|---|---|" + "---|---|" * len(runs),
    ]
    histories = {k: m["history"] for k, (_, m, _) in runs.items()}
    longest = max(histories.values(), key=len)
    for i, h in enumerate(longest):
        cells = [f"{hs[i]['val_dice']:.4f} | {hs[i]['train_time_s']:.0f}" if i < len(hs) else " | "
                 for hs in histories.values()]
        lines.append(f"| {h['epoch']} | {h['iteration']} | " + " | ".join(cells) + " |")
    lines += ["", "Summary (plateau: the first validation within 0.5 points of the run's best; mirrored: "
              "`pgps-tune evaluate --mirror` on the same validation cases, for runs trained with mirroring):", "",
              "| schedule | augmentation | final Dice | per class | best | plateau from iteration | mirrored Dice "
              "| training s | voxel fraction |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (schedule, aug), (_, m, mir) in runs.items():
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in m["val_dice_per_class"].items())
        plateau = _plateau(m["history"])
        mir_s = "-" if mir is None else f"{mir['dice']:.4f}"
        lines.append(f"| {schedule} | {aug} | {m['val_dice']:.4f} | {per_class} | {m['best_val_dice']:.4f} | "
                     f"{plateau['iteration']} | {mir_s} | {m['train_time_s']:.0f} | {m['voxel_fraction']:.3f} |")
    base = {aug: m for (s, aug), (_, m, _) in runs.items() if s == "constant"}
    others = [(s, aug, m) for (s, aug), (_, m, _) in runs.items() if s != "constant" and aug in base]
    if others:
        lines += ["", "Against the constant baseline with the same augmentation (final Dice, training time):", ""]
        for s, aug, m in others:
            b = base[aug]
            lines.append(f"- {s}, augmentation {aug}: {100 * (m['val_dice'] - b['val_dice']):+.2f} points "
                         f"({m['val_dice']:.4f} against {b['val_dice']:.4f}) in "
                         f"{m['train_time_s'] / b['train_time_s']:.2f}x the time")
    lines += ["", f"Target: the constant baseline reaches Dice >= {TARGET} within 30 minutes ({TARGET_S:.0f} s) "
              "of training:", ""]
    for (schedule, aug), (_, m, mir) in runs.items():
        if schedule != "constant":
            continue
        hit = next((h for h in m["history"] if h["val_dice"] >= TARGET and h["train_time_s"] <= TARGET_S), None)
        note = (f"met at epoch {hit['epoch']} ({hit['train_time_s']:.0f} s)" if hit else "not met")
        if mir is not None and m["train_time_s"] <= TARGET_S:
            note += (f"; with test-time mirroring {mir['dice']:.4f} after {m['train_time_s']:.0f} s: "
                     + ("met" if mir["dice"] >= TARGET else "not met"))
        lines.append(f"- augmentation {aug}: final Dice {m['val_dice']:.4f}, training {m['train_time_s']:.0f} s: "
                     + note)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.report:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        report = Path(a.report)
        img = report.parent / "img" / f"{report.stem}_curves.png"
        fig, ax = plt.subplots(figsize=(7, 4))
        for (schedule, aug), hs in histories.items():
            ax.plot([h["iteration"] for h in hs], [h["val_dice"] for h in hs], marker="o", ms=3,
                    ls="-" if aug != "none" else "--", label=f"{schedule}, augment {aug}")
        ax.axhline(TARGET, color="grey", ls=":", lw=1, label=f"target {TARGET}")
        ax.set(xlabel="iteration", ylabel="validation Dice", title="Hippocampus, recipe defaults",
               ylim=(0.7, 0.9))
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(img, lambda fh: fig.savefig(fh, format="png", dpi=100))
        atomic_write_text(report, text + f"\n![learning curves](img/{img.name})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
