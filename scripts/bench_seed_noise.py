#!/usr/bin/env python
"""Seed noise against the training budget (issue 13): do seeds move a schedule's Dice less when it trains longer?

The fidelity benchmark's ground truth (``scripts/bench_fidelity.py``, 48 schedules at a 400-iteration
budget, 3 training seeds, kept in ``docs/bench_fidelity_runs.jsonl``) shows seeds moving half the
schedules by more than a point, so a search that picks by one seed's Dice picks by noise among the
best few.  This benchmark takes the ``--top`` schedules of that ledger (by their mean full-budget Dice
over its seeds) and trains each again at ``--scale`` times the budget (the epochs scaled, so every
stage keeps its share of the run, and the learning rate decays over the longer run), for ``--seeds``
training seeds, then compares, at both budgets: each schedule's mean and standard deviation over
seeds, the pooled seed-to-seed standard deviation, Spearman's rho between seeds over the selected
schedules, and how far each seed's own pick (its best schedule by its Dice) lies from the best by
the other seeds' mean.  The schedules are selected at the short budget, so there they are the lucky
ones too (regression to the mean); the longer budget's figures are free of that.

Runs are jobs as in ``bench_fidelity.py`` (one thread each, ``--workers`` at a time), stored under
``--out/jobs`` and in ``--ledger`` (default ``docs/bench_seed_noise_runs.jsonl``), so a rerun trains
only what is missing and ``--no-train`` reruns the analysis from the ledger on any checkout.

    .venv/bin/python scripts/bench_seed_noise.py --report docs/bench_seed_noise.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fidelity import LEDGER as FIDELITY_LEDGER  # noqa: E402
from bench_fidelity import job_id, read_ledger, restore_jobs, train_jobs, write_ledger  # noqa: E402
from bench_search import WITHIN, key  # noqa: E402

LEDGER = ROOT / "docs" / "bench_seed_noise_runs.jsonl"


def spread(runs: dict[str, dict[int, float]], seeds: list[int]) -> dict[str, float]:
    """Pooled seed-to-seed sd, mean Spearman's rho over seed pairs, and the mean over seeds of how far
    each seed's own pick lies below the best schedule by the other seeds' mean (in Dice)."""
    from scipy.stats import spearmanr

    names = sorted(runs)
    pooled = float(np.sqrt(np.mean([np.var([runs[k][s] for s in seeds], ddof=1) for k in names])))
    rho = float(np.mean([spearmanr([runs[k][a] for k in names], [runs[k][b] for k in names])[0]
                         for a, b in itertools.combinations(seeds, 2)]))
    shortfalls, hits = [], 0
    for s in seeds:
        others = {k: float(np.mean([runs[k][o] for o in seeds if o != s])) for k in names}
        pick = max(names, key=lambda k: runs[k][s])
        shortfalls.append(max(others.values()) - others[pick])
        hits += shortfalls[-1] <= WITHIN
    return {"pooled_sd": pooled, "rho": rho, "pick_shortfall": float(np.mean(shortfalls)), "pick_hits": hits}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--fidelity-ledger", default=str(FIDELITY_LEDGER),
                    help="the fidelity benchmark's runs (default docs/bench_fidelity_runs.jsonl)")
    ap.add_argument("--top", type=int, default=6, help="schedules, the best by their mean full-budget Dice (default 6)")
    ap.add_argument("--scale", type=int, default=4, help="times the ledger's budget, in epochs (default 4)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds (default 3, as the ledger)")
    ap.add_argument("--workers", type=int, default=2, help="training runs at a time, one thread each (default 2)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_seed_noise"))
    ap.add_argument("--ledger", default=str(LEDGER), help="keep every run here too (default "
                                                          "docs/bench_seed_noise_runs.jsonl)")
    ap.add_argument("--no-train", action="store_true", help="only analyse the runs already stored")
    ap.add_argument("--report", help="also write a Markdown report here")
    a = ap.parse_args()
    for name, v, ok in (("--top", a.top, a.top >= 2), ("--scale", a.scale, a.scale >= 2),
                        ("--seeds", a.seeds, a.seeds >= 2), ("--workers", a.workers, a.workers >= 1)):
        if not ok:
            raise SystemExit(f"error: {name} {v} out of range (top >= 2, scale >= 2, seeds >= 2, workers >= 1)")
    from pgps_tune.errors import atomic_write_text

    if not Path(a.fidelity_ledger).is_file():
        raise SystemExit(f"error: no fidelity ledger at {a.fidelity_ledger}; run scripts/bench_fidelity.py first or "
                         "pass --fidelity-ledger")
    recorded = read_ledger(Path(a.fidelity_ledger))
    short: dict[str, dict[int, float]] = {}
    template: dict[str, dict] = {}
    for r in recorded.values():
        j = r["job"]
        if j["fraction"] >= 1:
            short.setdefault(key(j["params"]), {})[j["seed"]] = r["val_dice"]
            template.setdefault(key(j["params"]), j)
    seeds = list(range(a.seeds))
    complete = {k: v for k, v in short.items() if all(s in v for s in seeds)}
    if len(complete) < a.top:
        raise SystemExit(f"error: {a.fidelity_ledger} holds {len(complete)} schedules trained at seeds "
                         f"{seeds}; need --top {a.top}: run scripts/bench_fidelity.py --seeds {a.seeds} first, or "
                         "lower --top or --seeds")
    top = sorted(complete, key=lambda k: -np.mean(list(complete[k].values())))[: a.top]
    data = str(Path(a.data).resolve())
    out = Path(a.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in top:
        t = template[k]
        budget = {**t["budget"], "epochs": t["budget"]["epochs"] * a.scale}
        for s in seeds:
            job = {"data": data, "params": t["params"], "seed": s, "budget": {**budget, "seed": s},
                   "final_patch": t["final_patch"], "pools": t["pools"], "fraction": 1.0, "cost": t["cost"] * a.scale}
            job["result"] = str(out / "jobs" / f"{job_id(job)}.json")
            jobs.append(job)
    ledger = Path(a.ledger)
    mine = read_ledger(ledger)
    restore_jobs(jobs, mine)
    todo = [j for j in jobs if not Path(j["result"]).is_file()]
    print(f"# {len(top)} schedules x {a.seeds} seeds at {a.scale}x the budget: {len(jobs) - len(todo)} stored, "
          f"{len(todo)} to train on {a.workers} workers", flush=True)
    if todo and not a.no_train:
        train_jobs(sorted(todo, key=lambda j: -j["cost"]), a.workers, ledger, mine, jobs)
    write_ledger(ledger, mine, jobs)
    missing = [j for j in jobs if not Path(j["result"]).is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} of {len(jobs)} runs are not stored yet; run without --no-train")
    long: dict[str, dict[int, float]] = {}
    wall = []
    for j in jobs:
        r = json.loads(Path(j["result"]).read_text())
        long.setdefault(key(j["params"]), {})[j["seed"]] = r["val_dice"]
        wall.append(r.get("wall_s", 0.0))

    # -- report
    b = template[top[0]]["budget"]
    its = b["epochs"] * b["iterations_per_epoch"]
    res = {"short": spread({k: complete[k] for k in top}, seeds), "long": spread(long, seeds)}
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {a.workers} runs at a time, 1 thread each; "
        f"{sum(wall) / 60:.0f} minutes of runs in all",
        f"Schedules: the {a.top} best of {len(complete)} in {Path(a.fidelity_ledger).name} by their mean Dice over "
        f"seeds {', '.join(map(str, seeds))} at its budget ({b['epochs']} epochs x {b['iterations_per_epoch']} "
        f"iterations = {its}, batch {b['batch_size']}, {b['optimizer']} lr {b['lr']}, augmentation "
        f"{b['augment']}); trained again at {a.scale}x ({b['epochs'] * a.scale} epochs, {its * a.scale} iterations), "
        "the rest the same",
        "",
        f"| schedule | {its} iterations: Dice per seed | mean | sd | {its * a.scale} iterations: Dice per seed | "
        "mean | sd |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in top:
        row = []
        for runs in (complete[k], long[k]):
            v = [runs[s] for s in seeds]
            row += [" / ".join(f"{x:.4f}" for x in v), f"{np.mean(v):.4f}", f"{100 * np.std(v, ddof=1):.2f}"]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    lines += ["", "Sd in Dice points. Over the selected schedules:", "",
              f"| budget | pooled seed-to-seed sd (points) | Spearman's rho between seeds (mean over pairs) | "
              f"range of the means (points) | schedules within {100 * WITHIN:.1f} points of the best mean | "
              "each seed's own pick: below the best by the other seeds' mean (points, mean over seeds) | "
              f"picks within {100 * WITHIN:.1f} points |",
              "|---|---|---|---|---|---|---|"]
    for name, runs, n in (("short", {k: complete[k] for k in top}, its), ("long", long, its * a.scale)):
        means = {k: float(np.mean([runs[k][s] for s in seeds])) for k in top}
        r = res[name]
        lines.append(f"| {n} iterations | {100 * r['pooled_sd']:.2f} | {r['rho']:.2f} | "
                     f"{100 * (max(means.values()) - min(means.values())):.2f} | "
                     f"{sum(v >= max(means.values()) - WITHIN for v in means.values())} of {len(top)} | "
                     f"{100 * r['pick_shortfall']:.2f} | {r['pick_hits']} of {len(seeds)} |")
    lines.append("")
    report = "\n".join(lines)
    print(report)
    atomic_write_text(out / "summary.json", json.dumps({"args": vars(a), "short": complete, "long": long,
                                                        "schedules": top, "spread": res}, indent=1) + "\n")
    if a.report:
        cmd = shlex.join(["scripts/bench_seed_noise.py", *sys.argv[1:]])
        atomic_write_text(Path(a.report), f"# Seed noise against the budget\n\nCommand: `.venv/bin/python {cmd}`\n\n"
                                          f"{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
