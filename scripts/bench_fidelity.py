#!/usr/bin/env python
"""Fidelity benchmark (issue 13): how well does each low-fidelity score rank curricula, and which search wins?

Every schedule of the space (``--space``, default ``search_spaces/bench_hippocampus_48.yaml``,
48 schedules) is trained, for each of ``--seeds`` training seeds, at every budget of the space's
compressed-fidelity ladder (``asha.min_fraction``, ``asha.reduction_factor``: by default 1/9, 1/3
and the full budget).  A compressed run is the whole curriculum with fewer iterations per epoch
(:func:`pgps_tune.asha.rung_budget`, as ``pgps-tune tune`` trains a rung); the full run records
its validation curve, from which the ``partial`` fidelity's scores are read (the Dice ASHA would
compare at the same compute: the first validation at or past the rung; ``final_stage``: the
first one there in the schedule's last stage; a run that ends before the rung: its final Dice).

Every run is one job, stored as ``--out/jobs/ID.json`` (ID: a hash of everything that makes the
run), so an interrupted benchmark continues where it stopped and a rerun with more seeds trains
only the new jobs.  Every stored result is also kept in ``--ledger`` (one JSON line per run, by
default ``docs/bench_fidelity_runs.jsonl``, committed), from which a fresh checkout restores the
jobs, so the analysis and the replays rerun without training anywhere.  Then, without training:

1. fidelity quality: Spearman's rank correlation between each fidelity's score at seed ``s``
   and the full-budget Dice at every other seed ``s' != s`` (so the full budget's own row is its
   seed-to-seed reproducibility, the ceiling for every other row): the mean over ordered seed
   pairs, their range, and a 95% bootstrap interval over schedules of that mean;
2. searches replayed on the recorded runs of the first seed (the ground truth: its full-budget
   grid), 100 sampler seeds each: grid, random and TPE, each without early stopping, with the
   partial fidelity (successive halving on the curves, its first rung at ``--grace-fraction`` of the
   budget), with the compressed one (successive halving over budgets) and with main-effects
   screening (``--screen-trials`` compressed runs, the
   additive model's top ``--promote-top`` at the full budget), and Optuna alone; the share of seeds
   that trained a schedule within 0.5 Dice points of the grid's best at no more than ``--target`` of
   the grid's compute, and how often early stopping stopped the grid's winner; then the same against
   other truths: the mean over seeds (also searched on each other seed's runs), and (with 3 or more
   seeds) each seed's runs searched and scored by the mean of the other seeds; and, at the 0.5-point
   margin, each search scored by its pick (``replay_once(..., pick=True)``: stopped at ``--target``
   of the grid's compute, its best full run by the Dice it saw, as an export picks).

    .venv/bin/python scripts/bench_fidelity.py --report docs/bench_fidelity.md

``--quick``: 6 schedules on synthetic data at a tiny budget, 2 seeds, 10 replay seeds (a minute or two).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import WITHIN, World, key, replay_once, replay_stats  # noqa: E402

SAMPLERS = ("grid", "random", "tpe")
FIDELITIES = ("none", "partial", "compressed", "main_effects")


# -- training jobs -------------------------------------------------------------------------------


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run (one torch thread), its result written to ``job['result']``."""
    import torch

    torch.set_num_threads(1)
    from pgps_tune.config import TrainConfig, patch_multiple
    from pgps_tune.data import prepare, split
    from pgps_tune.errors import atomic_write_text
    from pgps_tune.space import schedule_from_params
    from pgps_tune.trainer import Trainer

    b = job["budget"]
    ds = prepare(job["data"], synthetic_cases=b["synthetic_cases"], synthetic_shape=tuple(b["synthetic_shape"]))
    train_cases, val_cases = split(ds, b["val_fraction"], b["split_seed"])
    s = schedule_from_params(job["params"], job["final_patch"], job["pools"], b["batch_size"], b["epochs"],
                             patch_multiple(b["network"], job["pools"], b["token_size"]))
    cfg = TrainConfig.for_trial(b, job["params"], device="cpu", threads=1)
    curve: list[dict[str, Any]] = []

    def report(r: dict[str, Any]) -> None:
        curve.append({"t": r["baseline_equivalent_iterations"], "dice": r["val_dice"],
                      "final_stage": s.final_phase(r["stage"])})

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pgps-fidelity-") as run_dir:
        m = Trainer(ds, train_cases, val_cases, s, cfg, Path(run_dir) / "run", callback=report).fit()
    result = {"job": {k: v for k, v in job.items() if k != "result"}, "val_dice": m["val_dice"],
              "baseline_iterations": curve[-1]["t"], "train_time_s": m["train_time_s"],
              "wall_s": time.time() - started, "curve": curve}
    atomic_write_text(Path(job["result"]), json.dumps(result) + "\n")
    return result


def job_id(job: dict[str, Any]) -> str:
    """A hash of what makes the run; the data by its folder's name, so a ledger written on one machine
    serves a checkout whose data lives elsewhere."""
    ident = {k: job[k] for k in ("params", "seed", "budget", "final_patch", "pools")}
    ident["data"] = Path(job["data"]).name
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:16]


def restore_jobs(jobs: list[dict[str, Any]], recorded: dict[str, dict[str, Any]]) -> int:
    """Write each job's result file from ``recorded`` (a ledger's runs by ID) where it is missing; how many."""
    from pgps_tune.errors import atomic_write_text

    restored = 0
    for j in jobs:
        jid = Path(j["result"]).stem
        if jid in recorded and not Path(j["result"]).is_file():
            atomic_write_text(Path(j["result"]), json.dumps(
                {**recorded[jid], "job": {k: v for k, v in j.items() if k != "result"}}) + "\n")
            restored += 1
    return restored


def train_jobs(todo: list[dict[str, Any]], workers: int, ledger: Path | None, recorded: dict[str, dict[str, Any]],
               jobs: list[dict[str, Any]]) -> None:
    """Train ``todo`` in that order, ``workers`` runs at a time (one thread each), printing each result and
    keeping ``ledger`` (:func:`write_ledger` over ``jobs``) up to date after every run."""
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for n, r in enumerate(pool.map(run_job, todo), 1):
            j = r["job"]
            print(f"  [{n}/{len(todo)} {time.time() - t0:.0f}s] {key(j['params'])} seed {j['seed']} fraction "
                  f"{j['fraction']:.3g}: dice {r['val_dice']:.4f} ({r['wall_s']:.0f}s)", flush=True)
            write_ledger(ledger, recorded, jobs)


# -- fidelity scores ----------------------------------------------------------------------------------


LEDGER = ROOT / "docs" / "bench_fidelity_runs.jsonl"
RECORD_KEYS = {"id", "val_dice", "baseline_iterations", "curve"}  # what the analysis reads of a run


def read_ledger(ledger: Path | None) -> dict[str, dict[str, Any]]:
    """The runs recorded in ``ledger`` by job ID (empty without one)."""
    if ledger is None or not ledger.is_file():
        return {}
    recorded = {}
    for n, line in enumerate(ledger.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                if not isinstance(r, dict) or not RECORD_KEYS <= r.keys():
                    raise ValueError
                recorded[r.pop("id")] = r
            except ValueError:
                raise SystemExit(f"error: {ledger}, line {n}, is not a run record; restore the file from git "
                                 "or pass --no-ledger") from None
    return recorded


def write_ledger(ledger: Path | None, recorded: dict[str, dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
    """Rewrite ``ledger`` (atomically) with what it held plus every job stored now that it lacks, sorted by
    ID, if there is any; a job's data path is kept as the folder's name, as its ID counts it."""
    if ledger is None:
        return
    from pgps_tune.errors import atomic_write_text

    added = False
    for j in jobs:
        f = Path(j["result"])
        if f.stem not in recorded and f.is_file():
            r = json.loads(f.read_text())
            recorded[f.stem] = {**r, "job": {**r["job"], "data": Path(r["job"]["data"]).name}}
            added = True
    if not added:  # nothing new: leave the file as it is
        return
    atomic_write_text(ledger, "".join(json.dumps({"id": i, **recorded[i]}, sort_keys=True) + "\n"
                                      for i in sorted(recorded)))


def partial_score(curve: list[dict[str, Any]], t: float, judge: str) -> float:
    """The Dice ASHA compares at compute ``t``: the first validation at or past it (``final_stage``: the
    first there in the last stage); a run that ends before ``t`` (or before its last stage): its final Dice."""
    for c in curve:
        if c["t"] >= t and (judge == "always" or c["final_stage"]):
            return c["dice"]
    return curve[-1]["dice"]


def spearman_table(scores: dict[str, dict[int, dict[str, float]]], full: dict[int, dict[str, float]],
                   boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Per fidelity: Spearman's rho between its scores at seed s and the full Dice at seed s' != s (with one
    seed: at the same seed, whose noise the two then share).

    Mean over ordered seed pairs, min and max over them, and a 95% bootstrap interval of the mean
    (schedules resampled with replacement, the same resample for every pair).
    """
    from scipy.stats import spearmanr

    seeds = sorted(full)
    keys = sorted(full[seeds[0]])
    pairs = [(s, t) for s in seeds for t in seeds if s != t] or [(s, s) for s in seeds]
    rng = np.random.default_rng(0)
    out = {}
    for name, by_seed in scores.items():
        x = {s: np.array([by_seed[s][k] for k in keys]) for s in seeds}
        y = {s: np.array([full[s][k] for k in keys]) for s in seeds}

        def rho(idx, x=x, y=y) -> list[float]:
            return [float(spearmanr(x[s][idx], y[t][idx]).statistic) for s, t in pairs]

        per_pair = rho(np.arange(len(keys)))
        means = [np.nanmean(rho(rng.integers(0, len(keys), len(keys)))) for _ in range(boot)]
        out[name] = {"rho": float(np.mean(per_pair)), "min": float(np.min(per_pair)), "max": float(np.max(per_pair)),
                     "ci95": [float(np.nanpercentile(means, 2.5)), float(np.nanpercentile(means, 97.5))],
                     "pairs": len(pairs)}
    return out


def shorter_scores(ledger: str | None, grid: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    """``--shorter``: the full-budget runs that ``ledger`` holds of this grid's schedules, one score per
    schedule for each seed that has every one of ``keys``, named by the ledger's budget in iterations."""
    if ledger is None:
        return {}
    known = {key(p) for p in grid}
    by_seed: dict[tuple[int, int], dict[str, float]] = {}
    for r in read_ledger(Path(ledger)).values():
        j = r["job"]
        if j.get("fraction", 1.0) >= 1 and key(j["params"]) in known:
            its = j["budget"]["epochs"] * j["budget"]["iterations_per_epoch"]
            by_seed.setdefault((its, j["seed"]), {})[key(j["params"])] = r["val_dice"]
    out = {f"shorter budget ({its} iterations, seed {seed})": d for (its, seed), d in sorted(by_seed.items())
           if set(keys) <= d.keys()}
    if not out:
        raise SystemExit(f"error: --shorter {ledger} holds no seed with a full run of every schedule compared; "
                         "name the ledger of the same space at a shorter budget")
    return out


def quality_subset(jobs: list[dict[str, Any]], grid: list[dict[str, Any]], n_seeds: int) -> tuple[list[int], list[str]]:
    """The seeds and schedules the rank correlations use: every seed whose runs are all stored, plus the
    first part-stored seed (with the schedules it has at every fidelity) when 8 or more are complete, in
    which case only those schedules count at every seed."""
    stored: dict[int, dict[str, int]] = {}
    for j in jobs:
        if Path(j["result"]).is_file():
            per = stored.setdefault(j["seed"], {})
            per[key(j["params"])] = per.get(key(j["params"]), 0) + 1
    per_schedule = len(jobs) // (len(grid) * n_seeds)
    seeds, keys = [], sorted(key(p) for p in grid)
    for s in range(n_seeds):
        done = sorted(k for k, n in stored.get(s, {}).items() if n == per_schedule)
        if len(done) == len(grid):
            seeds.append(s)
        else:
            if len(done) >= 8:
                seeds.append(s)
                keys = done
            break
    return seeds, keys


def write_grid_events(folder: Path, full_runs: list[dict[str, Any]], workers: int) -> None:
    """The first seed's full runs as the grid of ``scripts/bench_search.py``, so that its live searches
    (``--out FOLDER --reuse grid --methods grid compressed_tpe ...``) are scored against them without
    training the grid again; one schedule after another, at its share of the runs' wall time."""
    from pgps_tune.errors import atomic_write_text

    events, start = [], 0.0
    for i, r in enumerate(full_runs):
        k, wall = key(r["job"]["params"]), r["wall_s"]
        for n, c in enumerate(r["curve"], 1):
            events.append({"trial": f"grid-{i}", "t": start + wall * n / len(r["curve"]), "spent": c["t"],
                           "dice": c["dice"], "completed": n == len(r["curve"]), "final_stage": c["final_stage"],
                           "params": k, "fidelity": 1.0})
        start += wall
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "events.json", json.dumps({"events": {"grid": events},
                                                          "wall": {"grid": start / workers}}) + "\n")


# -- main -------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "bench_hippocampus_48.yaml"))
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per schedule and fidelity (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="training runs at a time, one thread each (default 2)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_fidelity"))
    ap.add_argument("--report", help="also write a Markdown report here")
    ap.add_argument("--replay-seeds", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.5, help="replays: each search's compute cap, a share of the "
                                                              "grid's (default 0.5)")
    ap.add_argument("--target", type=float, default=0.15, help="replays: the compute share the target counts "
                                                               "within (default 0.15)")
    ap.add_argument("--sh-trials", type=int, help="replays: schedules in a compressed bracket's first rung for "
                                                  "random and TPE (default: the space's search.num_samples)")
    ap.add_argument("--screen-trials", type=int, default=16,
                    help="replays: schedules screened by the main-effects searches (default 16, as "
                         "bench_hippocampus_48_screen.yaml)")
    ap.add_argument("--promote-top", type=int, default=3,
                    help="replays: schedules the main-effects searches train at the full budget (asha.promote_top; "
                         "default 3: with 16 screened, about 13.5%% of the grid's compute on the 48-schedule "
                         "space; 0: screen trials / reduction factor)")
    ap.add_argument("--grace-fraction", type=float, default=0.111,
                    help="replays: the partial fidelity's first rung, a share of the full budget (default 0.111, "
                         "the ladders' lowest rung; a compressed space has no asha.grace_fraction)")
    ap.add_argument("--startup-trials", type=int, nargs="+", help="replays: also TPE with each of these "
                                                                    "numbers of random start-up trials")
    ap.add_argument("--shorter", help="also score, as a fidelity, the full runs of this ledger (the same schedules "
                                      "at a shorter budget, e.g. docs/bench_fidelity_runs.jsonl)")
    ap.add_argument("--no-train", action="store_true", help="only analyse the jobs already stored")
    ap.add_argument("--ledger", help="keep every stored run here too, one JSON line each, and restore jobs from it "
                                     "(default docs/bench_fidelity_runs.jsonl; none with --quick)")
    ap.add_argument("--no-ledger", action="store_true", help="neither read nor write a ledger")
    ap.add_argument("--quick", action="store_true", help="synthetic data, 6 schedules, tiny budget, 2 seeds")
    a = ap.parse_args()
    for name, v, ok in (("--seeds", a.seeds, a.seeds >= 1), ("--workers", a.workers, a.workers >= 1),
                        ("--replay-seeds", a.replay_seeds, a.replay_seeds >= 1),
                        ("--screen-trials", a.screen_trials, a.screen_trials >= 2),
                        ("--promote-top", a.promote_top, a.promote_top >= 0),
                        ("--budget", a.budget, 0 < a.budget <= 1), ("--target", a.target, 0 < a.target <= 1),
                        ("--grace-fraction", a.grace_fraction, 0 < a.grace_fraction <= 1),
                        ("--startup-trials", a.startup_trials, all(n >= 1 for n in a.startup_trials or ()))):
        if not ok:
            raise SystemExit(f"error: {name} {v} out of range (seeds >= 1, workers >= 1, start-up trials >= 1, "
                             "screen trials >= 2, promote top >= 0, shares in (0, 1])")

    if a.shorter and not Path(a.shorter).is_file():  # checked before hours of training, not after
        raise SystemExit(f"error: --shorter {a.shorter}: no such ledger; name a bench_fidelity runs file "
                         "(e.g. docs/bench_fidelity_runs.jsonl)")
    from pgps_tune.asha import fidelity_ladder, grace_period, ladder_compute, rung_budget, screening_ladder
    from pgps_tune.data import plan_patch, prepare
    from pgps_tune.errors import PgpsError, atomic_write_text
    from pgps_tune.space import Param, check_space_against_plan, load, schedule_from_params

    try:
        space = load(a.space)
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    if a.quick:
        a.data, a.seeds, a.replay_seeds = "synthetic", min(a.seeds, 2), min(a.replay_seeds, 10)
        a.screen_trials = min(a.screen_trials, 3)
        params = (Param("stages", "categorical", choices=(1, 2, 3)), Param("growth", "fixed", value=2.0),
                  Param("mode", "categorical", choices=("resource", "performance")))
        space = dataclasses.replace(space, parameters=params, search=dataclasses.replace(
            space.search, num_samples=3, startup_trials=2), budget=dataclasses.replace(
            space.budget, epochs=3, iterations_per_epoch=9, val_every=1, filters=(4, 8, 16), synthetic_cases=4,
            synthetic_shape=(24, 24, 24), final_patch=(16, 16, 16), pools=(2, 2, 2), batch_size=2))
    b = space.budget
    try:
        ds = prepare(a.data, synthetic_cases=b.synthetic_cases, synthetic_shape=b.synthetic_shape)
        plan = plan_patch(ds.median_shape, ds.spacing)
        final = tuple(b.final_patch) if b.final_patch else plan.final_patch
        pools = tuple(b.pools) if b.pools else plan.pools
        check_space_against_plan(space, final, pools)
        grid = space.grid()
        rungs = fidelity_ladder(len(grid), space.asha.reduction_factor, space.asha.min_fraction,
                                b.iterations_per_epoch)
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    data = a.data if a.data == "synthetic" else str(Path(a.data).resolve())
    out = Path(a.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    max_t = b.epochs * b.iterations_per_epoch
    jobs = []
    for params in grid:
        vf = schedule_from_params(params, final, pools, b.batch_size, b.epochs).voxel_fraction()
        for seed in range(a.seeds):
            for i, rung in enumerate(rungs):
                budget = rung_budget({**dataclasses.asdict(b), "seed": seed}, rung, top=i == len(rungs) - 1)
                job = {"data": data, "params": params, "seed": seed, "budget": budget, "final_patch": list(final),
                       "pools": list(pools), "fraction": rung.fraction, "cost": vf * rung.fraction}
                job["result"] = str(out / "jobs" / f"{job_id(job)}.json")
                jobs.append(job)
    ledger = None if a.no_ledger else Path(a.ledger) if a.ledger else None if a.quick else LEDGER
    recorded = read_ledger(ledger)
    restored = restore_jobs(jobs, recorded)
    if restored:
        print(f"# {restored} run{'s' if restored > 1 else ''} restored from {ledger}", flush=True)
    # Seed 0 first (the ground truth of the replays), costliest first so the workers finish together; then
    # the other seeds one whole schedule (every fidelity) at a time, in a fixed shuffled order, so that a
    # benchmark stopped part-way leaves a random subset of complete schedules for the rank correlations.
    order = {key(grid[i]): n for n, i in enumerate(np.random.default_rng(0).permutation(len(grid)).tolist())}
    todo = sorted((j for j in jobs if not Path(j["result"]).is_file()),
                  key=lambda j: (j["seed"], -j["cost"] if j["seed"] == 0 else order[key(j["params"])],
                                 -j["fraction"]))
    print(f"# {ds.name}: {len(grid)} schedules x {a.seeds} seeds x fidelities "
          f"{', '.join(f'{r.fraction:.3g}' for r in rungs)} = {len(jobs)} runs, {len(jobs) - len(todo)} stored, "
          f"{len(todo)} to train ({sum(j['cost'] for j in todo):.1f} baseline runs of {max_t} iterations) on "
          f"{a.workers} workers", flush=True)
    if todo and not a.no_train:
        train_jobs(todo, a.workers, ledger, recorded, jobs)
    write_ledger(ledger, recorded, jobs)
    missing = [j for j in jobs if not Path(j["result"]).is_file() and j["seed"] == 0]
    if missing:
        raise SystemExit(f"error: {len(missing)} of seed 0's {len(jobs) // a.seeds} runs are not stored yet; "
                         "run without --no-train")
    seeds, keys = quality_subset(jobs, grid, a.seeds)
    if len(seeds) < min(2, a.seeds):
        raise SystemExit("error: no schedule has every fidelity stored at a second seed yet; run without --no-train")
    results = [json.loads(Path(j["result"]).read_text()) for j in jobs if Path(j["result"]).is_file()]
    if len(keys) < len(grid):
        print(f"# fidelity quality on the {len(keys)} of {len(grid)} schedules stored at seeds "
              f"{', '.join(map(str, seeds))} (the benchmark stopped part-way); replays on all of seed 0's", flush=True)
    results = [r for r in results if r["job"]["seed"] in seeds]

    # -- fidelity quality
    full = {s: {} for s in seeds}
    scores: dict[str, dict[int, dict[str, float]]] = {}
    curves: dict[int, dict[str, list]] = {s: {} for s in seeds}
    low: dict[int, dict[float, dict[str, tuple[float, float]]]] = {s: {} for s in seeds}
    for r in results:
        j, k = r["job"], key(r["job"]["params"])
        if j["fraction"] >= 1:
            full[j["seed"]][k] = r["val_dice"]
            curves[j["seed"]][k] = [(c["t"], c["dice"], c["final_stage"]) for c in r["curve"]]
            for rung in rungs[:-1]:
                for judge in ("always", "final_stage"):
                    name = f"partial {rung.fraction:.3g} ({judge})"
                    scores.setdefault(name, {s: {} for s in seeds})[j["seed"]][k] = partial_score(
                        r["curve"], rung.fraction * max_t, judge)
        else:
            scores.setdefault(f"compressed {j['fraction']:.3g}", {s: {} for s in seeds})[j["seed"]][k] = r["val_dice"]
            low[j["seed"]].setdefault(j["fraction"], {})[k] = (r["val_dice"], r["baseline_iterations"])
    if len(seeds) > 1:  # with one seed this row would compare the full budget with itself
        scores["full budget (another seed)"] = full
    for name, by_seed in shorter_scores(a.shorter, grid, keys).items():  # another ledger's full runs
        scores[name] = {s: by_seed for s in seeds}
    quality = spearman_table({n: {s: {k: v[s][k] for k in keys} for s in seeds} for n, v in scores.items()},
                             {s: {k: full[s][k] for k in keys} for s in seeds})

    write_grid_events(out / "search", [r for r in results if r["job"]["seed"] == 0 and r["job"]["fraction"] >= 1],
                      a.workers)

    # -- replays on the first seed's runs
    world = World(curves[0], full[0], low[0])
    grace = grace_period(a.grace_fraction, max_t)
    n0 = a.sh_trials or space.search.num_samples
    ladders = {"grid": rungs, "random": fidelity_ladder(n0, space.asha.reduction_factor, space.asha.min_fraction,
                                                         b.iterations_per_epoch)}
    ladders["tpe"] = ladders["random"]
    screen = screening_ladder(a.screen_trials, space.asha.reduction_factor, space.asha.min_fraction,
                              b.iterations_per_epoch, a.promote_top)
    budget_t = a.budget * world.total
    # every search replayed: (sampler, fidelity, the space it reads its settings from); TPE also with each
    # --startup-trials count other than the space's (random start-up trials before TPE models the results)
    # and the ladder it climbs (none and partial read no ladder)
    def ladder(sampler: str, fid: str) -> list:
        return screen if fid == "main_effects" else ladders[sampler]

    searches = {f"{sampler} + {fid}": (sampler, fid, space, ladder(sampler, fid)) for sampler in SAMPLERS
                for fid in FIDELITIES}
    for n in a.startup_trials or ():
        if n != space.search.startup_trials:
            sp = dataclasses.replace(space, search=dataclasses.replace(space.search, startup_trials=n))
            searches.update({f"tpe (startup {n}) + {fid}": ("tpe", fid, sp, ladder("tpe", fid)) for fid in FIDELITIES})
    replays: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    for name, (sampler, fid, sp, rungs_of) in searches.items():
        replays[name] = replay_stats([
            replay_once(world, sp, sampler, fid, seed, budget_t, grace, space.asha.judge, rungs_of)
            for seed in range(a.replay_seeds)], a.target)
    # the same searches scored against other truths: a looser margin, and (where every schedule has a second
    # seed) the mean over seeds, so a pick is not judged by one seed's luck
    complete = [s for s in seeds if len(full[s]) == len(grid)]
    truths: dict[str, tuple[World, dict[str, float] | None, tuple[float, ...]]] = {
        "seed 0": (world, None, (WITHIN, 2 * WITHIN))}

    def column(tname: str, within: float) -> str:
        return f"{tname}, {100 * within:.1f} points"

    own: list[str] = []  # the pick's target columns: the mean over every seed, searched on each seed's runs
    if len(complete) >= 2:
        all_seeds = f"mean of seeds {', '.join(map(str, complete))}"
        mean_all = {k: float(np.mean([full[s][k] for s in complete])) for k in full[0]}
        truths[all_seeds] = (world, mean_all, (WITHIN, 2 * WITHIN))
        own.append(column(all_seeds, WITHIN))
        for s in complete[1:]:  # the same truth, searched on another seed's runs (its own noise inside the truth)
            tname = f"searched on seed {s}, {all_seeds}"
            truths[tname] = (World(curves[s], full[s], low[s]), mean_all, (WITHIN,))
            own.append(column(tname, WITHIN))
    if len(complete) >= 3:  # searched on one seed's runs, scored by the others' mean: independent noise
        for s in complete:
            rest = [o for o in complete if o != s]
            truths[f"searched on seed {s}, mean of seeds {', '.join(map(str, rest))}"] = (
                World(curves[s], full[s], low[s]), {k: float(np.mean([full[o][k] for o in rest])) for k in full[s]},
                (WITHIN,))
    robust: dict[str, dict[str, int]] = {}
    picked: dict[str, dict[str, int]] = {}  # the same at the 0.5-point margin, scored by the search's pick
    near: dict[str, int] = {}  # per column: schedules within the margin of that truth's best
    for tname, (base, truth, margins) in truths.items():
        for within in margins:
            w = dataclasses.replace(base, truth=truth, within=within)
            col = column(tname, within)
            near[col] = sum(w.true(k) >= w.true_best - within for k in w.final)
            robust[col] = {}
            if within == WITHIN:
                picked[col] = {}
            for name, (sampler, fid, sp, rungs_of) in searches.items():
                robust[col][name] = replay_stats([
                    replay_once(w, sp, sampler, fid, seed, a.budget * w.total, grace, space.asha.judge, rungs_of)
                    for seed in range(a.replay_seeds)], a.target)["within_target"]
                if within == WITHIN:  # stopped at the target's compute, then its pick
                    picked[col][name] = replay_stats([
                        replay_once(w, sp, sampler, fid, seed, a.target * w.total, grace, space.asha.judge,
                                    rungs_of, pick=True)
                        for seed in range(a.replay_seeds)], a.target)["within_target"]
    print(f"# replays: {time.time() - t0:.0f}s", flush=True)
    from bench_search import asha_kill_rate

    kill_orders = asha_kill_rate(world.curves, world.final, grace, max_t, space.asha.reduction_factor,
                                 space.asha.judge)
    # the compressed ladder over the whole grid is deterministic: does it keep each training seed's winner?
    ladder_stops = {s: bool(replay_once(World(curves[s], full[s], low[s]), space, "grid", "compressed", 0, math.inf,
                                        grace, space.asha.judge, rungs)[1]) for s in seeds if len(full[s]) == len(grid)}

    # -- report
    best_key = max(world.final, key=world.final.get)
    mean_vf = world.total / max_t / len(grid)
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {a.workers} runs at a time, 1 thread each",
        f"Data: {ds.name}, final patch {'x'.join(map(str, final))}, pools {list(pools)}; space "
        f"{Path(a.space).name}{' (quick: 6 schedules, tiny budget)' if a.quick else ''}: {len(grid)} schedules; "
        f"{b.epochs} epochs x {b.iterations_per_epoch} iterations at the full budget, batch {b.batch_size}, "
        f"{b.optimizer} lr {b.lr}, validation every {b.val_every} epochs; training seeds "
        f"{', '.join(map(str, seeds))} ({len(keys)} schedules at every seed; seed 0: all {len(grid)})",
        "Fidelities: compressed at " + ", ".join(f"{r.fraction:.3g} ({r.iterations_per_epoch} iterations/epoch)"
                                                 for r in rungs[:-1]) + "; partial at the same compute, read from "
        "the full runs' curves",
        "",
        "## Fidelity quality",
        "",
        ("Spearman's rho between each fidelity's score at one seed and the full-budget Dice at another seed (mean "
         "over ordered seed pairs; range over pairs; 95% bootstrap interval of the mean over schedules). The full "
         "budget's own row is its seed-to-seed reproducibility: no fidelity can rank better than it."
         if len(seeds) > 1 else
         "Spearman's rho between each fidelity's score and the full-budget Dice of seed 0 (one training seed: "
         "the compressed and partial scores share that seed's noise with the full Dice, so they may rank a "
         "little better than against a fresh seed; 95% bootstrap interval over schedules).")
        + (f" Rows `shorter budget`: the full runs of {Path(a.shorter).name} (the same schedules at a shorter "
           "budget, one row per seed recorded there) as a fidelity." if a.shorter else ""),
        "",
        "| fidelity | rho | range over seed pairs | 95% interval (bootstrap over schedules) |",
        "|---|---|---|---|",
    ]
    for name, q in quality.items():
        span = f"{q['min']:.3f} to {q['max']:.3f}" if q["pairs"] > 1 else "- (one seed)"
        lines.append(f"| {name} | {q['rho']:.3f} | {span} | {q['ci95'][0]:.3f} to {q['ci95'][1]:.3f} |")
    rung_text = " / ".join(f"{r.trials}x{r.fraction:.3g}" for r in ladders["random"])
    lines += [
        "",
        "## Searches replayed on the recorded runs (training seed 0)",
        "",
        f"Ground truth: the grid of seed 0, best {world.best:.4f} ({best_key}); grid compute {world.total:.0f} "
        f"baseline iterations ({world.total / max_t:.2f} baseline runs; mean voxel fraction {mean_vf:.3f}). "
        f"{a.replay_seeds} sampler seeds per search, one trial at a time, each capped at {a.budget:.0%} of the "
        f"grid's compute. Partial: Optuna's successive-halving pruner, grace {grace} baseline iterations, "
        f"reduction factor {space.asha.reduction_factor:g}, judge {space.asha.judge}. Compressed: brackets of "
        f"{rung_text} (grid: the whole grid, {' / '.join(f'{r.trials}x{r.fraction:.3g}' for r in rungs)}), "
        f"{ladder_compute(ladders['random']) * mean_vf / (world.total / max_t):.0%} of the grid's compute per "
        "bracket for an average schedule, repeated while compute is left. Main effects (compressed with "
        f"`asha.promote: main_effects`): {screen[0].trials} schedules screened at {screen[0].fraction:.3g}, an "
        f"additive model of the parameters fitted to their Dice, its top {screen[1].trials} of all "
        f"{len(grid)} schedules at the full budget, repeated while compute is left. Optuna alone (TPE + Optuna's "
        "successive-halving pruner) is the `tpe + partial` row: replayed one trial at a time, Ray's ASHA and "
        "Optuna's pruner apply the same rule.",
        "",
        f"| search | within 0.5 points at <= {a.target:.0%} of the grid's compute | reached (cap {a.budget:.0%}) | "
        "median compute | 25-75% | seeds where early stopping stopped the grid's winner (of seeds that tried it) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in replays.items():
        med = f"{r['median']:.0%}" if r["median"] is not None else "-"
        iqr = f"{r['p25']:.0%}-{r['p75']:.0%}" if r["median"] is not None else "-"
        stop = "-" if name.endswith("none") else f"{r['runs_killing_grid_best']}/{r['runs_trying_grid_best']}"
        lines.append(f"| {name} | {r['within_target']}/{r['seeds']} | {r['reached']}/{r['seeds']} | {med} | {iqr} | "
                     f"{stop} |")
    lines += ["", f"ASHA's rule (partial fidelity) on the full runs' curves in 500 random trial orders: the grid's "
                  f"winner was stopped in {kill_orders:.0%}. The compressed ladder over the whole grid stopped "
                  f"the grid's winner in {sum(ladder_stops.values())} of {len(ladder_stops)} training seeds "
                  "(each fully stored seed's own grid and winner).", ""]
    lines += [f"Scored against other truths (seeds, of {a.replay_seeds}, within the margin of the truth's best at "
              f"<= {a.target:.0%} of the grid's compute; in brackets: how many of the {len(grid)} schedules lie "
              "within that margin):", "",
              "| search | " + " | ".join(f"{c} ({near[c]})" for c in robust) + " |",
              "|---|" + "---|" * len(robust)]
    for name in replays:
        lines.append(f"| {name} | " + " | ".join(str(robust[c][name]) for c in robust) + " |")
    lines += ["", f"Scored by the search's pick (seeds, of {a.replay_seeds}): each search stopped at {a.target:.0%} of "
              "the grid's compute and picked, as an export does, its full-budget run with the best Dice it saw "
              "(a tie: the cheaper); a hit when that schedule lies within 0.5 points of the truth's best. The "
              "tables above count a search once it has trained such a schedule, whichever it would pick:", "",
              "| search | " + " | ".join(f"{c} ({near[c]})" for c in picked) + " |",
              "|---|" + "---|" * len(picked)]
    for name in replays:
        lines.append(f"| {name} | " + " | ".join(str(picked[c][name]) for c in picked) + " |")
    lines.append("")
    best = max(replays, key=lambda n: (replays[n]["within_target"], -(replays[n]["median"] or 9)))
    others = {n: replays[n]["within_target"] for n in ("random + none", "tpe + partial")}
    lines += ["## Target", "",
              f"- best search: {best}, within 0.5 points at <= {a.target:.0%} of the grid's compute in "
              f"{replays[best]['within_target']}/{a.replay_seeds} seeds (target: >= 80%; random search alone "
              f"{others['random + none']}, Optuna alone {others['tpe + partial']}); its early stopping stopped the "
              f"grid's winner in {replays[best]['runs_killing_grid_best']}/{a.replay_seeds} seeds (target <= 10%)"]
    seed0 = column("seed 0", WITHIN)
    top0 = max(replays, key=lambda n: picked[seed0][n])
    lines.append(f"- scored by its pick against seed 0's grid: best {top0}, {picked[seed0][top0]}/{a.replay_seeds} "
                 f"(random search alone {picked[seed0]['random + none']}, Optuna alone "
                 f"{picked[seed0]['tpe + partial']}); the shipped spaces' search (grid + main_effects) "
                 f"{picked[seed0]['grid + main_effects']}")
    if own:  # scored by its pick against the mean over seeds, searched on each seed's runs
        top = max(replays, key=lambda n: sum(picked[c][n] for c in own))
        lines.append(f"- scored by its pick against the mean of seeds {', '.join(map(str, complete))}, searched on "
                     f"each seed's runs in turn: best {top}, " + " / ".join(str(picked[c][top]) for c in own)
                     + " (random search alone " + " / ".join(str(picked[c]["random + none"]) for c in own)
                     + ", Optuna alone " + " / ".join(str(picked[c]["tpe + partial"]) for c in own) + ")")
    lines.append("")
    report = "\n".join(lines)
    print(report)
    atomic_write_text(out / "summary.json", json.dumps({
        "quality": quality, "replays": replays, "asha_kill_rate_orders": kill_orders, "best_search": best,
        "ladder_stops_winner": ladder_stops, "other_truths": robust, "picked": picked,
        "ground_truth": world.final, "args": vars(a), "within": WITHIN,
        "rungs": [dataclasses.asdict(r) for r in rungs]}, indent=1) + "\n")
    if a.report:
        cmd = shlex.join(["scripts/bench_fidelity.py", *sys.argv[1:]])
        atomic_write_text(Path(a.report), f"# Fidelity benchmark\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
