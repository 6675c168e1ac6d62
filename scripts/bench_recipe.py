#!/usr/bin/env python
"""Recipe benchmark: the constant baseline's learning curve with and without augmentation.

Each variant is one ``pgps-tune train`` run with the recipe's defaults except the budget and the
augmentation preset, so the curve shows where the baseline stops improving and whether
augmentation pays at a budget a 2-core CPU trains in about half an hour.  Runs are kept in
``--out`` and reused (delete a run folder to train it again); the report gives the command of
each run, its Dice every ``--val-every`` epochs, its training time, and a curve figure.

    .venv/bin/python scripts/bench_recipe.py --report docs/bench_recipe.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.885  # the constant baseline's validation Dice asked for within 30 minutes of 2-core CPU training


def train(data: str, out: Path, preset: str, augment: str, epochs: int, ipe: int, val_every: int,
          threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "pgps_tune.cli", "train", "--data", data, "--out", str(out), "--preset", preset,
           "--augment", augment, "--epochs", str(epochs), "--iterations-per-epoch", str(ipe),
           "--val-every", str(val_every), "--threads", str(threads), "--quiet"]
    if not (out / "metrics.json").is_file() or not json.loads((out / "metrics.json").read_text())["completed"]:
        subprocess.run(cmd, check=True, cwd=ROOT)
    return cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--augment", nargs="+", default=["default", "none"], help="presets to compare")
    ap.add_argument("--preset", default="constant")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--iterations-per-epoch", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_recipe"))
    ap.add_argument("--report", help="write a Markdown report here (the figure beside it, in img/)")
    a = ap.parse_args()
    out = Path(a.out)
    runs = {}
    for aug in a.augment:
        run = out / f"{a.preset}-{aug}-e{a.epochs}x{a.iterations_per_epoch}"
        cmd = train(a.data, run, a.preset, aug, a.epochs, a.iterations_per_epoch, a.val_every, a.threads)
        runs[aug] = (cmd, json.loads((run / "metrics.json").read_text()))

    import torch

    lines = [
        "# Recipe benchmark: the constant baseline with and without augmentation", "",
        f"Command: `{' '.join(['.venv/bin/python', 'scripts/bench_recipe.py', *sys.argv[1:]])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; one run at a time, "
        f"{a.threads} threads. Each run is `pgps-tune train` with the recipe's defaults (UNet, AdamW, poly "
        f"learning rate over the run, batch 4, the data's plan) except the budget "
        f"({a.epochs} epochs x {a.iterations_per_epoch} iterations) and the augmentation preset:", "",
        *[f"- `{' '.join(['pgps-tune', *cmd[3:]])}`" for cmd, _ in runs.values()], "",
        "Validation Dice (mean of the two classes, sliding window at the final patch) and the training time "
        "when it was measured (validation time excluded):", "",
        "| epoch | iterations | " + " | ".join(f"{aug}: Dice | {aug}: train s" for aug in runs) + " |",
        "|---|---|" + "---|---|" * len(runs),
    ]
    histories = {aug: m["history"] for aug, (_, m) in runs.items()}
    for i, h in enumerate(next(iter(histories.values()))):
        cells = [f"{hs[i]['val_dice']:.4f} | {hs[i]['train_time_s']:.0f}" if i < len(hs) else " | "
                 for hs in histories.values()]
        lines.append(f"| {h['epoch']} | {h['iteration']} | " + " | ".join(cells) + " |")
    lines += ["", f"Target: Dice >= {TARGET} within 30 minutes (1800 s) of training:", ""]
    for aug, (_, m) in runs.items():
        hit = next((h for h in m["history"] if h["val_dice"] >= TARGET and h["train_time_s"] <= 1800), None)
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in m["val_dice_per_class"].items())
        lines.append(f"- {aug}: final Dice {m['val_dice']:.4f} ({per_class}), best {m['best_val_dice']:.4f}, "
                     f"training {m['train_time_s']:.0f} s: "
                     + (f"met at epoch {hit['epoch']} ({hit['train_time_s']:.0f} s)" if hit else "not met"))
    text = "\n".join(lines) + "\n"
    print(text)
    if a.report:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        report = Path(a.report)
        img = report.parent / "img" / "bench_recipe_curves.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        for aug, hs in histories.items():
            ax.plot([h["iteration"] for h in hs], [h["val_dice"] for h in hs], marker="o", ms=3,
                    label=f"augment {aug}")
        ax.axhline(TARGET, color="grey", ls="--", lw=1, label=f"target {TARGET}")
        ax.set(xlabel="iteration", ylabel="validation Dice", title=f"{a.preset} baseline, Hippocampus")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img, dpi=100)
        report.write_text(text + f"\n![learning curves](img/{img.name})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
