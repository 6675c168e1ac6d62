#!/usr/bin/env python
"""Curriculum benchmark: constant vs paper-resource vs paper-performance vs a searched schedule.

Every schedule trains the same network on the same fixed split for the same
epochs, at several seeds and at two budgets (a long one, where the constant
baseline has plateaued, and a short one).  Jobs run in worker processes (by
default 2 at a time, one torch thread each), longest first, so every job shares
the machine alike and wall times are comparable as ratios.  Reported per schedule and budget: validation Dice (mean
and spread over seeds, overall and per class), training wall time, voxels
processed, each as a ratio to the baseline of the same seed, with the paper's
figures beside them; two PNG plots (Dice against training time for every run;
patch size over training for every schedule).

    .venv/bin/python scripts/bench_curriculum.py --searched runs/bench_search/best_schedule.yaml \\
        --report docs/bench_curriculum.md

Each finished job is stored under ``--out/jobs`` (keyed by everything that
defines it) and reused by a later call with the same settings, so an
interrupted benchmark resumes; the report says when each job ran.
``--quick`` runs a reduced version in under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # Fischer et al.: mean over 15 tasks, relative to the constant-patch baseline
    "paper-resource": "Dice on par at 0.44x time",
    "paper-performance": "+1.28% relative Dice at 0.89x time",
}
FIXED = ("constant", "paper-resource", "paper-performance")


def parse_budget(text: str) -> tuple[int, int]:
    try:
        e, i = (int(x) for x in text.lower().split("x"))
        if e < 1 or i < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: budget {text!r} is not EPOCHSxITERATIONS (e.g. 16x100)") from None
    return e, i


def build_schedule(name: str, searched: str | None, final_patch, pools, batch: int, epochs: int,
                   multiple_of=None):
    from pgps_tune import schedule as sch

    if name == "searched":
        s = sch.load(searched)
        if tuple(s.final_patch) != tuple(final_patch):
            raise SystemExit(f"error: {searched} is for final patch {s.final_patch}, this data plans "
                             f"{list(final_patch)}; search on this dataset first")
        s = sch.rescale_epochs(s, epochs) if s.epochs != epochs else s
        if s.baseline_batch_size != batch:
            raise SystemExit(f"error: {searched} assumes baseline batch {s.baseline_batch_size}, the benchmark "
                             f"uses --batch-size {batch}; pass --batch-size {s.baseline_batch_size}")
        return s
    preset, _, mode = name.partition("-")
    return sch.preset(preset, final_patch, pools, batch, epochs, mode or "resource", multiple_of=multiple_of)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a fresh worker process (one torch thread)."""
    import torch

    threads = job.get("threads", 1)
    torch.set_num_threads(threads)
    from pgps_tune import schedule as sch
    from pgps_tune.data import prepare, split
    from pgps_tune.errors import atomic_write_text
    from pgps_tune.trainer import TrainConfig, Trainer

    ds = prepare(job["data"])
    train_cases, val_cases = split(ds, 0.2, seed=0)
    s = sch.Schedule.from_dict(job["schedule"])
    cfg = TrainConfig(network=job["network"], optimizer=job["optimizer"], lr=job["lr"],
                      iterations_per_epoch=job["ipe"], seed=job["seed"], val_every=job["val_every"], threads=threads,
                      fg_ratio=job.get("fg_ratio", 0.5), augment=job.get("augment", "default"),
                      token_size=job.get("token_size", 16), feature_size=job.get("feature_size"),
                      hidden_size=job.get("hidden_size", TrainConfig.hidden_size), device="cpu")
    out = Path(job["run_dir"])
    if (out / "checkpoint.pt").exists():
        (out / "checkpoint.pt").unlink()  # a half-finished job restarts from scratch
    started = time.time()
    m = Trainer(ds, train_cases, val_cases, s, cfg, out).fit()
    result = {"job": {k: v for k, v in job.items() if k != "schedule"}, "schedule": job["schedule"],
              "stages": [{k: st[k] for k in ("patch_size", "batch_size", "iterations", "voxels", "wall_time_s")}
                         for st in m["stages"]],
              "started": started, "finished": time.time(),
              **{k: m[k] for k in ("val_dice", "val_dice_per_class", "best_val_dice", "train_time_s",
                                   "wall_time_s", "voxel_fraction", "voxels_processed", "iterations")},
              "history": [{k: h[k] for k in ("epoch", "iteration", "val_dice", "val_dice_per_class",
                                              "train_time_s", "patch_size", "voxels_processed")}
                          for h in m["history"]]}
    atomic_write_text(Path(job["result"]), json.dumps(result, indent=1) + "\n")
    return result


def job_key(job: dict[str, Any]) -> str:
    ident = {k: job[k] for k in ("dataset", "schedule", "seed", "ipe", "network", "optimizer", "lr",
                                 "val_every", "batch", "augment")}
    for k, default in (("token_size", 16), ("feature_size", None), ("hidden_size", 768)):
        if job.get(k, default) != default:  # only when set, so jobs stored before these settings stay reused
            ident[k] = job[k]
    if job.get("threads", 1) != 1:  # timings differ with the thread count
        ident["threads"] = job["threads"]
    if job.get("fg_ratio", 0.5) != 0.5:
        ident["fg_ratio"] = job["fg_ratio"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def summarize(results: list[dict[str, Any]], schedules: list[str]) -> dict[str, Any]:
    """Per schedule: means and spreads over seeds, ratios to the same seed's baseline."""
    base = {r["job"]["seed"]: r for r in results if r["job"]["name"] == "constant"}
    out = {}
    for name in schedules:
        runs = sorted((r for r in results if r["job"]["name"] == name), key=lambda r: r["job"]["seed"])
        if not runs:
            continue
        dice = np.array([r["val_dice"] for r in runs])
        classes = sorted({c for r in runs for c in r["val_dice_per_class"]})
        paired = [(r, base[r["job"]["seed"]]) for r in runs if r["job"]["seed"] in base]
        time_ratio = [r["train_time_s"] / b["train_time_s"] for r, b in paired]
        # the same ratio with this run's time rescaled to the machine speed the baseline had, measured by
        # the final stage (the baseline's patch and batch in every schedule): removes drift between runs
        adjusted = [tr * final_stage_cost(b) / final_stage_cost(r) for tr, (r, b) in zip(time_ratio, paired)]
        rel = [100 * (r["val_dice"] / b["val_dice"] - 1) for r, b in paired]
        out[name] = {
            "seeds": [r["job"]["seed"] for r in runs], "dice": dice.tolist(), "dice_mean": float(dice.mean()),
            "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
            "per_class": {c: float(np.mean([r["val_dice_per_class"][c] for r in runs])) for c in classes},
            "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
            "time_ratio": float(np.mean(time_ratio)) if time_ratio else math.nan,
            "time_ratio_adjusted": float(np.mean(adjusted)) if adjusted else math.nan,
            "final_stage_ns_per_voxel": float(np.mean([final_stage_cost(r) for r in runs]) * 1e9),
            "voxel_fraction": float(np.mean([r["voxel_fraction"] for r in runs])),
            "dice_rel_pct": float(np.mean(rel)) if rel else math.nan,
            "dice_rel_pct_sd": float(np.std(rel, ddof=1)) if len(rel) > 1 else 0.0,
            "dice_points": float(100 * (dice.mean() - np.mean([b["val_dice"] for _, b in paired])))
            if paired else math.nan,
            "stages": len(runs[0]["schedule"]["stages"]),
            # the baseline's Dice after as much training time as this schedule took (same seed, interpolated)
            "baseline_dice_at_equal_time": float(np.mean([
                np.interp(r["train_time_s"], [0.0] + [h["train_time_s"] for h in b["history"]],
                          [0.0] + [h["val_dice"] for h in b["history"]]) for r, b in paired])) if paired else math.nan,
        }
    return out


def stages_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-stage iterations, voxels and wall time of a finished job."""
    if r.get("stages") is None:  # jobs stored before the stages were kept: read the run's metrics once
        r["stages"] = json.loads((Path(r["job"]["run_dir"]) / "metrics.json").read_text())["stages"]
    return r["stages"]


def final_stage_cost(r: dict[str, Any]) -> float:
    """Seconds per voxel of the final stage: the same computation in every schedule, so the machine's speed."""
    last = stages_of(r)[-1]
    return last["wall_time_s"] / last["voxels"]


def _window(runs: list[dict[str, Any]]) -> str:
    fmt = "%m-%d %H:%M"
    return (f"{time.strftime(fmt, time.gmtime(min(r['started'] for r in runs)))}-"
            f"{time.strftime('%H:%M', time.gmtime(max(r['finished'] for r in runs)))}")


def stage_costs(results: list[dict[str, Any]], schedules: list[str]) -> dict[str, list[tuple[str, int, float]]]:
    """Nanoseconds of training per voxel in each stage (patch, batch, cost), mean over seeds."""
    out = {}
    for name in schedules:
        runs = [r for r in results if r["job"]["name"] == name]
        stages = [stages_of(r) for r in runs]
        if not stages:
            continue
        out[name] = [("x".join(map(str, s0["patch_size"])), s0["batch_size"],
                      float(np.mean([run[k]["wall_time_s"] / max(1, run[k]["voxels"]) * 1e9 for run in stages])))
                     for k, s0 in enumerate(stages[0])]
    return out


def plateau(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline's learning curve (mean over seeds) and its gain over the last quarter of training."""
    runs = [r for r in results if r["job"]["name"] == "constant"]
    if not runs:
        return None
    n = min(len(r["history"]) for r in runs)
    epochs = [h["epoch"] for h in runs[0]["history"][:n]]
    mean = np.mean([[h["val_dice"] for h in r["history"][:n]] for r in runs], axis=0)
    last_epoch = epochs[-1]
    q = next(i for i, e in enumerate(epochs) if e >= 0.75 * last_epoch)
    return {"epochs": epochs, "dice": mean.tolist(), "gain_last_quarter_points": float(100 * (mean[-1] - mean[q])),
            "from_epoch": epochs[q]}


def table(summary: dict[str, Any], title: str) -> list[str]:
    lines = [f"**{title}**", "",
             "| schedule | stages | seeds | val Dice mean ± sd | per class | Dice vs baseline | "
             "baseline Dice at equal time | train time s | time ratio | time ratio, speed-adjusted | "
             "final stage ns/voxel | voxel ratio | time/voxel | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        per = ", ".join(f"{c} {v:.3f}" for c, v in s["per_class"].items())
        vs = "-" if name == "constant" else f"{s['dice_points']:+.2f} pts ({s['dice_rel_pct']:+.2f}% ± " \
                                             f"{s['dice_rel_pct_sd']:.2f})"
        lines.append(f"| {name} | {s['stages']} | {len(s['seeds'])} | {s['dice_mean']:.4f} ± {s['dice_sd']:.4f} | "
                     f"{per} | {vs} | {s['baseline_dice_at_equal_time']:.4f} | "
                     f"{s['train_time_s']:.0f} | {s['time_ratio']:.3f} | {s['time_ratio_adjusted']:.3f} | "
                     f"{s['final_stage_ns_per_voxel']:.0f} | {s['voxel_fraction']:.3f} | "
                     f"{s['time_ratio'] / s['voxel_fraction']:.3f} | "
                     f"{PAPER.get(name, '-')} |")
    return lines


def targets(summary: dict[str, Any]) -> list[str]:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines, base = ["(time ratios speed-adjusted, see the table)"], summary.get("constant")
    if base is None:
        return lines
    if "paper-resource" in summary:
        r = summary["paper-resource"]
        ok = r["dice_points"] >= -1.0 and r["time_ratio_adjusted"] <= 0.5
        lines.append(f"- paper-resource within 1 point of the baseline at <= 0.5x time: {r['dice_points']:+.2f} "
                     f"points at {r['time_ratio_adjusted']:.3f}x (raw {r['time_ratio']:.3f}x): {verdict(ok)}")
    if "paper-performance" in summary:
        r = summary["paper-performance"]
        ok = r["dice_points"] >= 0 and r["time_ratio_adjusted"] <= 0.9
        lines.append(f"- paper-performance Dice >= baseline at <= 0.9x time: {r['dice_points']:+.2f} points at "
                     f"{r['time_ratio_adjusted']:.3f}x (raw {r['time_ratio']:.3f}x): {verdict(ok)}")
    if "searched" in summary:
        r = summary["searched"]
        others = {n: s["dice_mean"] for n, s in summary.items() if n != "searched"}
        ok = all(r["dice_mean"] >= v for v in others.values())
        lines.append("- searched Dice >= every other schedule (mean over seeds): "
                     f"{r['dice_mean']:.4f} vs " + ", ".join(f"{n} {v:.4f}" for n, v in others.items())
                     + f": {verdict(ok)}")
    return lines


COLORS = {"constant": "black", "paper-resource": "tab:blue", "paper-performance": "tab:orange",
          "searched": "tab:green"}


def plot_curves(by_budget: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_budget), figsize=(6 * len(by_budget), 4.2), squeeze=False)
    for ax, (label, results) in zip(axes[0], by_budget.items()):
        seen = set()
        for r in sorted(results, key=lambda r: (r["job"]["name"], r["job"]["seed"])):
            name = r["job"]["name"]
            ax.plot([h["train_time_s"] for h in r["history"]], [h["val_dice"] for h in r["history"]],
                    marker=".", color=COLORS.get(name, "gray"), alpha=0.8,
                    label=None if name in seen else name)
            seen.add(name)
        ax.set_title(f"{label} budget: validation Dice vs training time")
        ax.set_xlabel("training wall time (s, one CPU thread)")
        ax.set_ylabel("validation Dice (mean of classes)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)


def plot_patches(schedules: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pgps_tune import schedule as sch

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"paper-resource": "--", "searched": "-", "constant": "-", "paper-performance": ":"}
    for name, d in schedules.items():
        s = sch.Schedule.from_dict(d)
        total = s.epochs
        xs, ys, bs = [], [], []
        for start, st in zip(s.stage_starts(), s.stages):
            vox = int(np.prod(st.patch_size)) / int(np.prod(s.final_patch))
            xs += [start / total, (start + st.epochs) / total]
            ys += [vox, vox]
            bs += [st.batch_size, st.batch_size]
        kw = {"color": COLORS.get(name, "gray"), "lw": 2, "alpha": 0.85, "ls": styles.get(name, "-")}
        ax.plot(xs, ys, label=f"{name} ({len(s.stages)} stages)", **kw)
        bx.plot(xs, bs, label=name, **kw)
    ax.set_ylabel("patch voxels / final patch voxels")
    ax.set_title("patch size over training")
    bx.set_ylabel("batch size")
    bx.set_title("batch size over training")
    for a in (ax, bx):
        a.set_xlabel("fraction of training (epochs)")
        a.set_yscale("log")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    from pgps_tune.errors import atomic_write

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def dry_run(schedules: dict[str, dict[str, Any]], cfg: Any, channels: int, num_classes: int,
            budgets: dict[str, tuple[int, int]]) -> int:
    """Build the network for every schedule, time one step at its first and last stage, estimate each job.

    The estimate scales the last stage's seconds per voxel by the schedule's voxels, so it ignores
    validation and the extra cost per voxel of tiny patches.
    """
    import torch

    from pgps_tune import schedule as sch
    from pgps_tune.network import network_for

    torch.set_num_threads(cfg.threads)
    total = 0.0
    for label, named in schedules.items():
        epochs, ipe = budgets[label]
        for name, d in named.items():
            s = sch.Schedule.from_dict(d)
            net = network_for(cfg, channels, num_classes, s)  # refuses a patch the network cannot take
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            times = []
            for st in (s.stages[0], s.stages[-1]):
                x = torch.randn(st.batch_size, channels, *st.patch_size)
                for _ in range(2):  # the second step is timed: the first pays one-off allocations
                    t = time.perf_counter()
                    opt.zero_grad()
                    net(x).float().mean().backward()
                    opt.step()
                    times.append(time.perf_counter() - t)
            last = s.stages[-1]
            per_voxel = times[3] / (last.batch_size * int(np.prod(last.patch_size)))
            est = per_voxel * s.voxel_fraction() * epochs * ipe * s.baseline_batch_size * int(np.prod(s.final_patch))
            total += est
            print(f"  {label} {name:18s} {len(s.stages):2d} stages, first {'x'.join(map(str, s.stages[0].patch_size))}"
                  f" b{s.stages[0].batch_size}: {times[1]:.2f} s/step, last {'x'.join(map(str, last.patch_size))} "
                  f"b{last.batch_size}: {times[3]:.2f} s/step; voxel ratio {s.voxel_fraction():.3f}; "
                  f"~{est:.0f} s of training (one thread)", flush=True)
    print(f"every schedule accepted; ~{total:.0f} s of training per seed in all (validation not included)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--long", help="EPOCHSxITERATIONS of the long budget (default 16x100; quick 16x5)")
    ap.add_argument("--short", help="EPOCHSxITERATIONS of the short budget (default 16x25; quick 16x2)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0 1)")
    ap.add_argument("--schedules", nargs="+", default=[*FIXED, "searched"])
    ap.add_argument("--searched", help="schedule file of the searched schedule (e.g. a sweep's best_schedule.yaml)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--network", default="unet")
    ap.add_argument("--token-size", type=int, default=16, help="unetr: token side (default 16)")
    ap.add_argument("--feature-size", type=int, help="segresnet/swinunetr/unetr base width (default: MONAI's)")
    ap.add_argument("--hidden-size", type=int, default=768, help="unetr: transformer width (default 768)")
    ap.add_argument("--final-patch", type=int, nargs=3, help="final patch (default: the data's plan)")
    ap.add_argument("--augment", default="default", help="augmentation preset (default: the recipe's, 'default')")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-every", type=int, help="epochs between validations (default 2; quick 4)")
    ap.add_argument("--workers", type=int, default=2, help="jobs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_curriculum"))
    ap.add_argument("--report", help="also write a Markdown report here (plots beside it)")
    ap.add_argument("--budgets", nargs="+", choices=("long", "short"), default=["long", "short"],
                    help="which budgets to run (default both)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check that the network takes every schedule's patches and time one training step at "
                         "each schedule's first and last stage; trains nothing")
    ap.add_argument("--quick", action="store_true", help="2 seeds, tiny budgets: under 5 minutes on 2 cores")
    a = ap.parse_args()
    defaults = {"long": "16x5", "short": "16x2", "seeds": [0, 1], "val_every": 4} if a.quick else \
        {"long": "16x100", "short": "16x25", "seeds": [0, 1, 2], "val_every": 2}
    for k, v in defaults.items():  # what is given explicitly wins, also with --quick
        if getattr(a, k) is None:
            setattr(a, k, v)
    if "searched" in a.schedules and not a.searched:
        print("note: no --searched schedule given; comparing the fixed schedules only", flush=True)
        a.schedules = [s for s in a.schedules if s != "searched"]
    unknown = [s for s in a.schedules if s not in (*FIXED, "searched")]
    if unknown:
        raise SystemExit(f"error: unknown schedule(s) {unknown}; choose from {[*FIXED, 'searched']}")
    if a.searched and not Path(a.searched).is_file():
        raise SystemExit(f"error: --searched {a.searched} does not exist; run scripts/bench_search.py first")
    budgets = {label: parse_budget(getattr(a, label)) for label in a.budgets}

    from pgps_tune.data import plan_patch, prepare, split
    from pgps_tune.errors import PgpsError

    try:
        ds = prepare(a.data)  # once here, so the workers only memory-map the cache
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    plan = plan_patch(ds.median_shape, ds.spacing)
    if a.final_patch:
        import dataclasses

        plan = dataclasses.replace(plan, final_patch=tuple(a.final_patch))
    from pgps_tune.config import TrainConfig, check_network_widths, patch_multiple

    try:
        multiple = patch_multiple(a.network, plan.pools, a.token_size)
        check_network_widths(a.network, a.feature_size, a.hidden_size, ("--feature-size", "--hidden-size"))
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    widths = {"feature_size": a.feature_size, "hidden_size": a.hidden_size}
    train_cases, val_cases = split(ds, 0.2, seed=0)
    out = Path(a.out)
    jobs, schedules = [], {}
    for label, (epochs, ipe) in budgets.items():
        for name in a.schedules:
            try:
                s = build_schedule(name, a.searched, plan.final_patch, plan.pools, a.batch_size, epochs, multiple)
            except PgpsError as exc:
                raise SystemExit(f"error: {name}: {exc}") from None
            schedules.setdefault(label, {})[name] = s.to_dict()
            trainer = (s.meta.get("trainer") or {}) if name == "searched" else {}  # settings searched with it
            for seed in a.seeds:
                job = {"dataset": ds.name, "data": str(Path(a.data).resolve()) if a.data != "synthetic" else a.data,
                       "budget": label, "name": name, "schedule": s.to_dict(), "seed": seed, "ipe": ipe,
                       "network": a.network, "optimizer": a.optimizer, "lr": float(trainer.get("lr", a.lr)),
                       "fg_ratio": float(trainer.get("fg_ratio", 0.5)), "batch": a.batch_size,
                       "val_every": a.val_every, "threads": a.threads, "augment": a.augment,
                       "token_size": a.token_size, **widths}
                key = job_key(job)
                job["cost"] = epochs * ipe * s.voxel_fraction()
                job["result"] = str(out / "jobs" / f"{label}-{name}-s{seed}-{key}.json")
                job["run_dir"] = str(out / "runs" / f"{label}-{name}-s{seed}-{key}")
                jobs.append(job)
    if a.dry_run:
        cfg = TrainConfig(network=a.network, token_size=a.token_size, threads=a.threads, device="cpu", **widths)
        return dry_run(schedules, cfg, ds.channels, ds.num_classes, budgets)
    todo = [j for j in jobs if not Path(j["result"]).is_file()]
    print(f"# {ds.name}: {len(train_cases)} train / {len(val_cases)} val cases (seeded split 0), final patch "
          f"{plan.final_patch}, pools {plan.pools}; {len(jobs)} jobs, {len(jobs) - len(todo)} reused, "
          f"{len(todo)} to run on {a.workers} workers", flush=True)
    # longest jobs first keeps both workers busy until the end
    todo.sort(key=lambda j: -j["cost"])
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn")) as pool:
        for r in pool.map(run_job, todo):
            j = r["job"]
            print(f"  {j['budget']:5s} {j['name']:18s} seed {j['seed']}: dice {r['val_dice']:.4f}  "
                  f"train {r['train_time_s']:.0f}s  voxels {r['voxel_fraction']:.3f}  "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    results = [json.loads(Path(j["result"]).read_text()) for j in jobs]

    import torch

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {a.workers} jobs at a "
        f"time, {a.threads} torch thread(s) each",
        f"Data: {ds.name}, {len(train_cases)} train / {len(val_cases)} val cases (seeded split 0), final patch "
        f"{'x'.join(map(str, plan.final_patch))}, pools {list(plan.pools)}",
        f"Training: batch {a.batch_size}, {a.network}"
        + (f" (token {a.token_size}, hidden {a.hidden_size})" if a.network == "unetr" else "")
        + (f", feature size {a.feature_size}" if a.feature_size else "")
        + f", augmentation {a.augment}, {a.optimizer} lr {a.lr}, poly LR over the run, "
        f"validation every {a.val_every} epochs; seeds {a.seeds}",
        f"Jobs run between {time.strftime('%Y-%m-%d %H:%M', time.gmtime(min(r['started'] for r in results)))} and "
        f"{time.strftime('%H:%M UTC', time.gmtime(max(r['finished'] for r in results)))}; by schedule: "
        + ", ".join(f"{n} {_window([r for r in results if r['job']['name'] == n])}" for n in a.schedules),
        "",
    ]
    if "searched" in a.schedules:
        s = build_schedule("searched", a.searched, plan.final_patch, plan.pools, a.batch_size,
                           budgets[a.budgets[0]][0])
        desc = ", ".join(f"{'x'.join(map(str, st.patch_size))} b{st.batch_size} x{st.epochs}" for st in s.stages)
        lines += [f"Searched schedule: {a.searched} (from {s.meta.get('sweep', s.meta.get('source', '?'))}, "
                  f"search-budget Dice {s.meta.get('val_dice', float('nan')):.4f}); stages: {desc}; "
                  f"trainer settings found with it: {s.meta.get('trainer') or 'none'}", ""]
    summaries = {}
    for label, (epochs, ipe) in budgets.items():
        rs = [r for r in results if r["job"]["budget"] == label]
        summaries[label] = summarize(rs, a.schedules)
        lines += table(summaries[label], f"{label.capitalize()} budget: {epochs} epochs x {ipe} iterations "
                                         f"({epochs * ipe} iterations)")
        lines += ["", "Targets:", "", *targets(summaries[label]), ""]
    pl = plateau([r for r in results if r["job"]["budget"] == "long"])
    if pl:
        lines += ["Constant baseline, long budget, validation Dice by epoch (mean over seeds): "
                  + ", ".join(f"{e}: {d:.4f}" for e, d in zip(pl["epochs"], pl["dice"])),
                  f"Gain from epoch {pl['from_epoch']} to the end (last quarter): "
                  f"{pl['gain_last_quarter_points']:+.2f} points", ""]
    costed = "long" if "long" in budgets else a.budgets[0]
    cost = stage_costs([r for r in results if r["job"]["budget"] == costed], a.schedules)
    if cost:
        lines += [f"{costed.capitalize()} budget, training time per voxel by stage (ns, mean over seeds), "
                  "first stage -> last:", ""]
        lines += [f"- {n}: " + ", ".join(f"{p} b{b} {c:.0f}" for p, b, c in v) for n, v in cost.items()]
        lines.append("")
    short = summaries.get("short", {})
    if short:
        first = {}
        for name in short:
            curves = [[(h["train_time_s"], h["val_dice"]) for h in r["history"]]
                      for r in results if r["job"]["budget"] == "short" and r["job"]["name"] == name]
            first[name] = float(np.mean([c[0][1] for c in curves]))
        lines += ["Short budget, mean Dice at each schedule's first validation: "
                  + ", ".join(f"{n} {v:.3f}" for n, v in first.items()), ""]
    report = "\n".join(lines)
    print(report)
    doc = {"args": vars(a), "summaries": summaries, "plateau": pl, "schedules": schedules}
    from pgps_tune.errors import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(doc, indent=1) + "\n")
    if a.report:
        rep = Path(a.report)
        img = rep.parent / "img"
        plot_curves({k: [r for r in results if r["job"]["budget"] == k] for k in budgets},
                    img / f"{rep.stem}_dice_vs_time.png")
        plot_patches(schedules[a.budgets[0]], img / f"{rep.stem}_patch_size.png")
        cmd = shlex.join(["scripts/bench_curriculum.py", *sys.argv[1:]])
        atomic_write_text(rep, f"# Curriculum benchmark\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n"
                               f"![Dice vs time](img/{rep.stem}_dice_vs_time.png)\n\n"
                               f"![patch size](img/{rep.stem}_patch_size.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
