#!/usr/bin/env python
"""Engine benchmark: constant vs paper-resource vs paper-performance, side by side.

All three schedules train the same network for the same epochs on the same
split, one after the other in this process, so their wall times are
comparable as ratios.  Reported per schedule: training wall time (validation
excluded) and its ratio to the constant baseline, voxel fraction, time/voxel
ratio, validation Dice (overall and per class), and the sampler's patch rate
against the rate at which the model consumed patches, per stage.

    .venv/bin/python scripts/bench_engine.py --report docs/bench_engine.md

``--quick`` shrinks everything to a run of about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from pgps_tune import schedule as sch
from pgps_tune.data import plan_patch, prepare, split
from pgps_tune.sampler import ProgressiveSampler
from pgps_tune.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def sampler_rate(sampler: ProgressiveSampler, stage: int, seconds: float = 0.5) -> float:
    """Patches per second the sampler cuts for one stage (one process, like training)."""
    ipe = sampler.iterations_per_epoch
    first = sampler.schedule.stage_starts()[stage] * ipe
    last = first + sampler.schedule.stages[stage].epochs * ipe
    sampler.batch(first)  # map the volumes once, as training does
    n, patches, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        patches += sampler.batch(first + n % (last - first))[0].shape[0]
        n += 1
    return patches / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--iterations-per-epoch", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--network", default="unet")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedules", nargs="+", default=["constant", "paper-resource", "paper-performance"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_engine"))
    ap.add_argument("--report", help="also write a Markdown report here")
    ap.add_argument("--quick", action="store_true", help="tiny budget, for a smoke check")
    a = ap.parse_args()
    if a.quick:
        a.epochs, a.iterations_per_epoch = 15, 4

    ds = prepare(a.data)
    plan = plan_patch(ds.median_shape, ds.spacing)
    train_cases, val_cases = split(ds, 0.2, seed=0)
    threads = torch.get_num_threads()
    print(f"# {ds.name}: {len(train_cases)} train / {len(val_cases)} val cases, final patch "
          f"{plan.final_patch}, pools {plan.pools}, {threads} torch threads", flush=True)

    results = {}
    for name in a.schedules:
        preset, _, mode = name.partition("-")
        s = sch.preset(preset, plan.final_patch, plan.pools, a.batch_size, a.epochs, mode or "resource")
        cfg = TrainConfig(
            network=a.network, optimizer=a.optimizer, lr=a.lr, iterations_per_epoch=a.iterations_per_epoch,
            seed=a.seed, val_every=max(1, a.epochs // 5), threads=threads,
        )
        out = Path(a.out) / name
        if (out / "checkpoint.pt").exists():
            (out / "checkpoint.pt").unlink()
        t = Trainer(ds, train_cases, val_cases, s, cfg, out)
        t0 = time.perf_counter()
        m = t.fit()
        elapsed = time.perf_counter() - t0
        rates = []
        for k, st in enumerate(m["stages"]):
            model_rate = st["iterations"] * st["batch_size"] / st["wall_time_s"]
            rates.append({"stage": k, "patch_size": st["patch_size"], "batch_size": st["batch_size"],
                          "model_patches_per_s": model_rate,
                          "sampler_patches_per_s": sampler_rate(t.sampler, k)})
        results[name] = {"metrics": {k: m[k] for k in (
            "val_dice", "val_dice_per_class", "best_val_dice", "train_time_s", "wall_time_s",
            "voxel_fraction", "voxels_processed", "iterations")},
            "curve": [(h["train_time_s"], h["val_dice"]) for h in m["history"]],
            "stages": len(s.stages), "sampler": rates, "elapsed_s": elapsed}
        print(f"{name}: dice {m['val_dice']:.4f}  train {m['train_time_s']:.1f}s  "
              f"voxels {m['voxel_fraction']:.3f}", flush=True)

    base = results.get("constant", next(iter(results.values())))["metrics"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {threads} threads; {time.strftime('%Y-%m-%d')}",
        f"Data: {ds.name}, {len(train_cases)} train / {len(val_cases)} val (seeded split 0), final patch "
        f"{'x'.join(map(str, plan.final_patch))}, pools {list(plan.pools)}",
        f"Budget: {a.epochs} epochs x {a.iterations_per_epoch} iterations, batch {a.batch_size}, {a.network}, "
        f"{a.optimizer} lr {a.lr}, seed {a.seed}",
        "",
        "| schedule | stages | val Dice | per class | train time s | time ratio | voxel fraction | "
        "time/voxels | min sampler/model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["metrics"]
        tr = m["train_time_s"] / base["train_time_s"]
        per = ", ".join(f"{k} {v:.3f}" for k, v in m["val_dice_per_class"].items())
        min_ratio = min(x["sampler_patches_per_s"] / x["model_patches_per_s"] for x in r["sampler"])
        lines.append(
            f"| {name} | {r['stages']} | {m['val_dice']:.4f} | {per} | {m['train_time_s']:.1f} | {tr:.3f} | "
            f"{m['voxel_fraction']:.3f} | {tr / m['voxel_fraction']:.3f} | {min_ratio:.1f}x |"
        )
    lines += ["", "Targets (computed from the rows above):", ""]
    if "paper-resource" in results and "constant" in results:
        m = results["paper-resource"]["metrics"]
        tr = m["train_time_s"] / base["train_time_s"]
        delta = m["val_dice"] - base["val_dice"]
        lines.append(f"- paper-resource time ratio {tr:.3f} (target <= 0.45): {'met' if tr <= 0.45 else 'MISSED'}")
        lines.append(f"- paper-resource Dice minus constant {delta:+.4f} (target >= -0.01): "
                     f"{'met' if delta >= -0.01 else 'MISSED'}")
        tv = tr / m["voxel_fraction"]
        lines.append(
            f"- paper-resource time/voxel ratio {tv:.3f} (target <= 1.15): {'met' if tv <= 1.15 else 'MISSED'}"
        )
    worst = min(
        x["sampler_patches_per_s"] / x["model_patches_per_s"] for r in results.values() for x in r["sampler"]
    )
    lines.append(
        f"- slowest sampler/model patch-rate ratio {worst:.1f}x (target >= 5x): {'met' if worst >= 5 else 'MISSED'}"
    )
    fast = [(n, r["metrics"]) for n, r in results.items() if r["metrics"]["train_time_s"] <= 300]
    best = max(fast, key=lambda x: x[1]["val_dice"], default=None)
    if best:
        ok = best[1]["val_dice"] >= 0.80
        lines.append(f"- best Dice within 300 s of training: {best[0]} {best[1]['val_dice']:.4f} in "
                     f"{best[1]['train_time_s']:.0f} s (target >= 0.80): {'met' if ok else 'MISSED'}")
    lines += ["", "Validation Dice over training time (s):", ""]
    for name, r in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{t:.0f}s {d:.3f}" for t, d in r["curve"]))
    lines += ["", "Sampler vs model, patches per second per stage:", ""]
    for name, r in results.items():
        cells = ", ".join(
            f"{'x'.join(map(str, x['patch_size']))}/b{x['batch_size']} "
            f"{x['sampler_patches_per_s']:.0f} vs {x['model_patches_per_s']:.0f}"
            for x in r["sampler"]
        )
        lines.append(f"- {name}: {cells}")
    report = "\n".join(lines)
    print(report)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    if a.report:
        cmd = shlex.join(["scripts/bench_engine.py", *sys.argv[1:]])
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(f"# Engine benchmark\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
