#!/usr/bin/env python
"""Tuner benchmark: Ray's overhead per trial, trials per hour, and ASHA's bias on curricula.

The same N configurations, sampled at random from a space (default: the smoke space,
on its synthetic data), are trained three ways in one run:

1. bare: one after another in this process, with the trainer alone (no Ray);
2. Tune, 1 trial at a time with all CPUs, no early stopping;
3. Tune, 2 trials at a time with half the CPUs each, no early stopping.

Ray's overhead is (Tune wall time - bare wall time) per trial, reported both with the
one-time cluster start and without it (steady state).  Then ASHA is replayed on the
recorded learning curves of run 2 (both time attributes, many arrival orders) to
measure how often early stopping would have killed the eventual winner.

    .venv/bin/python scripts/bench_tuner.py --report docs/bench_tuner.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]


def sample_configs(space, n: int, seed: int) -> list[dict]:
    from pgps_tune.tuner import DefineByRun

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define = DefineByRun(space)
    configs = []
    for _ in range(n):
        trial = study.ask()
        fixed = define(trial)
        configs.append({**trial.params, **fixed})
        study.tell(trial, 0.0)
    return configs


def bare_runs(space, ds, configs, final, pools, threads: int, work: Path) -> list[float]:
    """Each configuration trained by the trainer alone, as a trial would, timed end to end."""
    import torch

    from pgps_tune.data import prepare, split
    from pgps_tune.space import schedule_from_params
    from pgps_tune.trainer import TrainConfig, Trainer

    b = space.budget
    times = []
    for i, params in enumerate(configs):
        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        data = prepare("synthetic" if ds.name == "synthetic" else ds.cache_dir, cache_root=ds.cache_dir.parent,
                       synthetic_cases=b.synthetic_cases, synthetic_shape=b.synthetic_shape)
        s = schedule_from_params(params, final, pools, b.batch_size, b.epochs)
        cfg = TrainConfig.for_trial(asdict(b), params, device="cpu", threads=threads)
        tr, va = split(data, b.val_fraction, b.split_seed)
        Trainer(data, tr, va, s, cfg, work / f"bare{i}").fit()
        times.append(time.perf_counter() - t0)
    return times


def tune_run(space, opts_kw, setup, configs, storage: Path, name: str) -> tuple[float, float]:
    """(wall time including Ray's start, wall time of the trials alone)."""
    import ray

    from pgps_tune.tuner import ListSearcher, SweepOptions, run_phase, start_ray

    t0 = time.perf_counter()
    start_ray(None)
    t1 = time.perf_counter()
    opts = SweepOptions(space=space, data="synthetic", out=storage, quiet=True, **opts_kw)
    run_phase("bench", opts, setup, None, str(storage), name, ListSearcher(configs), len(configs), None)
    t2 = time.perf_counter()
    ray.shutdown()
    return t2 - t0, t2 - t1


def curves_of(storage: Path, name: str) -> dict[str, dict]:
    out = {}
    for f in sorted((storage / name).glob("run_trial_*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        out[f.parent.name.split("_")[2]] = {
            "n_stages": rows[-1]["n_stages"],
            "baseline_iterations": [(r["baseline_iterations"], r["score"]) for r in rows],
            "epoch": [(r["epoch"], r["score"]) for r in rows],
            "final": rows[-1]["score"],
            "completed": rows[-1]["completed"],
        }
    return out


def asha_bias(curves: dict[str, dict], space, orders: int, seed: int) -> list[dict]:
    from pgps_tune.asha import grace_period, simulate_asha

    b, a = space.budget, space.asha
    winner = max(curves, key=lambda t: curves[t]["final"])
    top3 = sorted(curves, key=lambda t: -curves[t]["final"])[:3]
    rng = random.Random(seed)
    results = []
    for attr, max_t in (("baseline_iterations", b.epochs * b.iterations_per_epoch), ("epoch", b.epochs)):
        grace = grace_period(a.grace_fraction, max_t)
        killed = top_killed = 0
        stops = {"curriculum": 0, "single-stage": 0}
        ids = list(curves)
        for _ in range(orders):
            rng.shuffle(ids)
            stopped = simulate_asha({t: curves[t][attr] for t in ids}, ids, grace, max_t, a.reduction_factor)
            killed += winner in stopped
            top_killed += any(t in stopped for t in top3)
            for t in stopped:
                stops["curriculum" if curves[t]["n_stages"] > 1 else "single-stage"] += 1
        n_cur = sum(c["n_stages"] > 1 for c in curves.values())
        results.append({
            "time_attr": attr, "grace": grace, "max_t": max_t, "rf": a.reduction_factor,
            "winner_killed": killed / orders, "top3_killed": top_killed / orders,
            "mean_stopped": sum(stops.values()) / orders,
            "stop_rate_curriculum": stops["curriculum"] / orders / max(1, n_cur),
            "stop_rate_single_stage": stops["single-stage"] / orders / max(1, len(curves) - n_cur),
        })
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "smoke.yaml"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--orders", type=int, default=500, help="arrival orders replayed for the ASHA measurement")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report")
    ap.add_argument("--quick", action="store_true", help="3 trials, for a smoke check")
    a = ap.parse_args()
    if a.quick:
        a.trials, a.orders = 3, 50

    from pgps_tune import space as sp
    from pgps_tune.data import plan_patch, prepare
    from pgps_tune.tuner import trial_setup

    space = sp.load(a.space)
    b = space.budget
    ds = prepare("synthetic", synthetic_cases=b.synthetic_cases, synthetic_shape=b.synthetic_shape)
    plan = plan_patch(ds.median_shape, ds.spacing)
    final, pools = (tuple(b.final_patch) if b.final_patch else plan.final_patch), (
        tuple(b.pools) if b.pools else plan.pools)
    configs = sample_configs(space, a.trials, a.seed)
    cpus = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="pgps-bench-tuner-"))
    try:
        bare = bare_runs(space, ds, configs, final, pools, cpus, work)
        print(f"bare: {sum(bare):.1f}s for {len(bare)} trials", flush=True)
        runs = {}
        for k in (1, 2):
            per = cpus / k
            setup = trial_setup(space, "synthetic", ds.cache_dir, final, pools, per, 0.0)
            total, trials_only = tune_run(space, {"max_concurrent": k, "cpus_per_trial": per}, setup, configs,
                                          work / "ray", f"c{k}")
            runs[k] = {"total": total, "trials": trials_only}
            print(f"tune x{k}: {total:.1f}s ({trials_only:.1f}s after the cluster start)", flush=True)
        curves = curves_of(work / "ray", "c1")
        bias = asha_bias(curves, space, a.orders, a.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n, bare_total = len(configs), sum(bare)
    mean_trial = bare_total / n
    over_all = (runs[1]["total"] - bare_total) / n
    over_steady = (runs[1]["trials"] - bare_total) / n
    lines = [
        f"Machine: {platform.machine()}, {cpus} cores; {time.strftime('%Y-%m-%d')}; space {Path(a.space).name}, "
        f"{n} configurations sampled at random (seed {a.seed}), synthetic data",
        "",
        "| run | wall s | per trial s | trials per hour |",
        "|---|---|---|---|",
        f"| bare trainer, sequential | {bare_total:.1f} | {mean_trial:.2f} | {3600 * n / bare_total:.0f} |",
    ]
    for k, r in runs.items():
        lines.append(f"| Ray Tune, {k} concurrent ({cpus / k:g} CPU each) | {r['total']:.1f} | {r['total'] / n:.2f} | "
                     f"{3600 * n / r['total']:.0f} |")
    ok = over_steady / mean_trial <= 0.05
    lines += [
        "",
        f"Ray overhead per trial (1 concurrent, vs bare): {over_all:.2f} s = {100 * over_all / mean_trial:.1f}% of a "
        f"trial with the cluster start spread over the {n} trials; {over_steady:.2f} s = "
        f"{100 * over_steady / mean_trial:.1f}% without it (steady state: scheduling, report, checkpoint). "
        f"Target <= 5% steady state: {'met' if ok else 'MISSED'}.",
        "",
        "ASHA replayed on the recorded curves of the 1-concurrent run "
        f"({a.orders} random arrival orders; winner = best final score):",
        "",
        "| time attribute | grace | max_t | winner stopped | a top-3 trial stopped | trials stopped | "
        "stop rate curricula | stop rate single-stage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bias:
        lines.append(f"| {r['time_attr']} | {r['grace']} | {r['max_t']} | {100 * r['winner_killed']:.0f}% | "
                     f"{100 * r['top3_killed']:.0f}% | {r['mean_stopped']:.1f} of {n} | "
                     f"{100 * r['stop_rate_curriculum']:.0f}% | {100 * r['stop_rate_single_stage']:.0f}% |")
    ranked = sorted(curves.items(), key=lambda x: -x[1]["final"])
    lines += ["", "Final scores: " + ", ".join(f"{t} ({c['n_stages']} stages) {c['final']:.3f}" for t, c in ranked)]
    report = "\n".join(lines)
    print(report)
    if a.report:
        cmd = shlex.join(["scripts/bench_tuner.py", *sys.argv[1:]])
        Path(a.report).write_text(f"# Tuner benchmark\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
