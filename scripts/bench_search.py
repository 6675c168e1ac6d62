#!/usr/bin/env python
"""Search benchmark: ASHA + TPE vs ASHA + random vs Optuna alone vs a full-budget grid, at equal compute.

The space (``--space``, default ``search_spaces/bench_hippocampus.yaml``) is small
enough to train every schedule in it to the end: that grid is the ground truth.
Each search method then gets the same compute, ``--budget`` times the grid's
(compute = voxels processed, counted in baseline iterations, as ASHA counts it):

- ``asha_tpe`` / ``asha_random``: ``pgps-tune tune`` (Ray Tune, ASHA, Optuna's
  TPE or random sampler through Tune), 2 trials at a time, 1 CPU each;
- ``optuna_sha``: Optuna alone, no Ray: TPE with Optuna's successive-halving
  pruner at the same rungs, two worker processes sharing a journal-file study;
- ``grid``: every schedule, no early stopping (its compute defines 1.0);
- ``compressed_tpe`` / ``compressed_random`` (not run by default): ``pgps-tune tune`` with
  ``asha.fidelity: compressed``, the space's ladder (its compute is set by ``search.num_samples``).

Trials are deterministic on CPU (same seed, one thread), so a schedule that two
methods both train gets the same Dice; the report checks that.  Reported: best
completed Dice against compute (PNG), the compute each method needed to come
within 0.5 Dice points of the grid's best, how often early stopping stopped a
trial that would have won, and the same searches replayed on the grid's
recorded learning curves for many seeds (sequential, exact for these curves).

    .venv/bin/python scripts/bench_search.py --report docs/bench_search.md

``--quick`` runs a 4-schedule space at a tiny budget in under 5 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("grid", "asha_tpe", "asha_random", "optuna_sha", "compressed_tpe", "compressed_random")
DEFAULT_METHODS = METHODS[:4]  # compressed_*: the space's asha.min_fraction must fit its iterations per epoch
WITHIN = 0.005  # 0.5 Dice points


def key(params: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in sorted(params.items()) if k != "role"}, sort_keys=True)


# -- Ray methods (pgps-tune tune) --------------------------------------------------------------


def run_ray(method: str, space, data: str, out: Path, budget_runs: float, concurrent: int,
            mean_voxel_fraction: float = 1.0) -> list[dict[str, Any]]:
    from pgps_tune.asha import samples_for_compute
    from pgps_tune.space import Asha, Search
    from pgps_tune.tuner import SweepOptions, sweep

    if method == "grid":
        sp = dataclasses.replace(space, search=dataclasses.replace(space.search, algorithm="grid", max_compute=0.0),
                                 asha=dataclasses.replace(space.asha, enabled=False))
    else:  # asha_*: the partial fidelity at the compute budget; compressed_*: the space's ladder sets the compute
        fidelity, algo = method.split("_")
        fidelity = "partial" if fidelity == "asha" else fidelity
        sp = dataclasses.replace(space, search=Search(**{
            **dataclasses.asdict(space.search), "algorithm": algo,
            "max_compute": budget_runs if fidelity == "partial" else 0.0}),
            asha=Asha(**{**dataclasses.asdict(space.asha), "enabled": True, "fidelity": fidelity}))
    samples = None
    if method.startswith("compressed"):  # as many schedules as one ladder can train within the budget
        samples = samples_for_compute(budget_runs / mean_voxel_fraction, space.asha.reduction_factor,
                                      space.asha.min_fraction, space.budget.iterations_per_epoch)
    sp = dataclasses.replace(sp, confirm=dataclasses.replace(sp.confirm, enabled=False))  # the search alone
    t0 = time.time()
    sweep(SweepOptions(space=sp, data=data, out=out / method, cpus_per_trial=1.0, max_concurrent=concurrent,
                       results_store=str(out / "store"), quiet=True, num_samples=samples))
    return ray_events(out / method, t0)


def ray_events(sweep_dir: Path, t0: float) -> list[dict[str, Any]]:
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    events = []
    # the search phase, and with the compressed fidelity its later rungs (search-r1, ...); a run below the
    # full budget ranks schedules for the next rung but finds none: it counts as not completed
    for phase in (p for p in meta["experiments"] if p.startswith("search")):
        exp = Path(meta["storage_path"]) / meta["experiments"][phase]
        for result in sorted(exp.glob("*/result.json")):
            for line in result.read_text().splitlines():
                if not line.strip():
                    continue
                r = json.loads(line)
                fidelity = r.get("fidelity", 1.0)
                events.append({"trial": r["trial_id"], "t": r["timestamp"] - t0, "spent": r["baseline_iterations"],
                               "dice": r["val_dice"], "completed": bool(r["completed"]) and fidelity >= 1,
                               "final_stage": r["stage"] == r["n_stages"] - 1, "params": key(r["config"]),
                               "fidelity": fidelity})
    return sorted(events, key=lambda e: (e["t"], e["spent"]))


# -- Optuna alone -------------------------------------------------------------------------------


class BudgetSpent(Exception):
    """The study as a whole has used its compute."""


def optuna_worker(args: dict[str, Any]) -> None:
    import optuna
    import torch

    from pgps_tune.data import prepare, split
    from pgps_tune.space import DefineByRun, schedule_from_params
    from pgps_tune.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial cut by the budget is logged as failed
    space = args["space"]  # the space as run by the benchmark (a frozen dataclass, pickled to this process)
    space = dataclasses.replace(space, search=dataclasses.replace(space.search, algorithm="tpe",
                                                                  seed=space.search.seed + args["worker"]))
    b = space.budget
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(args["journal"]))
    study = optuna.load_study(study_name="bench", storage=storage, sampler=space.optuna_sampler(),
                              pruner=optuna.pruners.SuccessiveHalvingPruner(
                                  min_resource=args["grace"], reduction_factor=round(space.asha.reduction_factor)))
    ds = prepare(args["data"])
    train_cases, val_cases = split(ds, b.val_fraction, b.split_seed)
    define = DefineByRun(space)
    log = open(args["events"], "a")

    def spent() -> float:
        return sum(t.user_attrs.get("spent", 0.0) for t in study.get_trials(deepcopy=False))

    def objective(trial: optuna.Trial) -> float:
        config = {**define(trial), **trial.params}
        s = schedule_from_params(config, args["final_patch"], args["pools"], b.batch_size, b.epochs)
        cfg = TrainConfig.for_trial(dataclasses.asdict(b), config, device="cpu", threads=1)
        reported: set[int] = set()

        def report(r: dict[str, Any]) -> None:
            t = r["baseline_equivalent_iterations"]
            trial.set_user_attr("spent", t)
            final_stage = r["stage"] == len(s.stages) - 1
            log.write(json.dumps({"trial": f"w{args['worker']}-{trial.number}", "t": time.time() - args["t0"],
                                  "spent": t, "dice": r["val_dice"], "completed": r["completed"],
                                  "final_stage": final_stage, "params": key(config)}) + "\n")
            log.flush()
            if r["completed"]:
                return
            if spent() >= args["max_t"]:
                raise BudgetSpent
            if space.asha.judge == "final_stage" and not final_stage:
                return  # the same rule as ASHA in pgps-tune: judged only at the final patch
            step = int(round(t))
            if step in reported:
                return  # two reports rounding to one step (tiny first stages): Optuna keeps the first
            reported.add(step)
            trial.report(r["val_dice"], step=step)
            if trial.should_prune():
                raise optuna.TrialPruned

        m = Trainer(ds, train_cases, val_cases, s, cfg, Path(args["runs"]) / f"w{args['worker']}-{trial.number}",
                    callback=report).fit()
        return m["val_dice"]

    while spent() < args["max_t"]:
        study.optimize(objective, n_trials=1, catch=(BudgetSpent,))
    log.close()


def run_optuna(space, data: str, out: Path, max_t: float, workers: int, grace: int,
               final_patch, pools) -> list[dict[str, Any]]:
    import optuna

    d = out / "optuna_sha"
    d.mkdir(parents=True, exist_ok=True)
    journal, events = d / "study.journal", d / "events.jsonl"
    for f in (journal, events):
        f.unlink(missing_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    t0 = time.time()
    ctx = get_context("spawn")
    procs = [ctx.Process(target=optuna_worker, args=({
        "space": space, "worker": w, "journal": str(journal), "data": data,
        "events": str(events), "runs": str(d / "runs"), "max_t": max_t, "grace": grace, "t0": t0,
        "final_patch": tuple(final_patch), "pools": tuple(pools)},)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"error: an Optuna worker failed (exit codes {[p.exitcode for p in procs]})")
    return optuna_events(d)


def optuna_events(d: Path) -> list[dict[str, Any]]:
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(d / "study.journal")))
    study = optuna.load_study(study_name="bench", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    evs = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines() if x.strip()]
    for e in evs:
        e["state"] = states.get(int(e["trial"].split("-")[1]))
    return sorted(evs, key=lambda e: (e["t"], e["spent"]))


def reuse_events(out: Path, methods: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """The trials of an earlier run in ``out``: its events.json, else rebuilt from the sweeps' own records."""
    saved = out / "events.json"
    if saved.is_file():
        data = json.loads(saved.read_text())
        missing = sorted(set(methods) - set(data["events"]))
        if missing:
            raise SystemExit(f"error: {saved} has no trials of {missing}; run without --reuse")
        return {m: data["events"][m] for m in methods}, {m: data["wall"][m] for m in methods}
    try:
        prior = json.loads((out / "summary.json").read_text())["summary"]
        events = {}
        for m in methods:
            if m == "optuna_sha":
                events[m] = optuna_events(out / m)
            else:
                ev = ray_events(out / m, 0.0)
                t0 = min(e["t"] for e in ev)
                events[m] = [{**e, "t": e["t"] - t0} for e in ev]
        return events, {m: prior[m]["wall_s"] for m in methods}
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"error: no complete earlier run in {out} ({type(exc).__name__}: {exc}); "
                         "run without --reuse") from None


# -- analysis -------------------------------------------------------------------------------------


def trials_of(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        t = out.setdefault(e["trial"], {"params": e["params"], "curve": [], "completed": False, "final": math.nan,
                                        "fidelity": e.get("fidelity", 1.0)})
        t["curve"].append((e["spent"], e["dice"], e.get("final_stage", True)))
        if e["completed"]:
            t["completed"], t["final"] = True, e["dice"]
        t["last_t"] = e["t"]
    return out


def compute_curve(events: list[dict[str, Any]], total: float) -> list[tuple[float, float]]:
    """(compute spent / grid compute, best completed Dice so far) after every report."""
    spent: dict[str, float] = {}
    best, curve = -math.inf, []
    for e in events:
        spent[e["trial"]] = e["spent"]
        if e["completed"]:
            best = max(best, e["dice"])
        curve.append((sum(spent.values()) / total, best if best > -math.inf else math.nan))
    return curve


def compute_to_within(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((c for c, d in curve if not math.isnan(d) and d >= target), None)


def early_stops(events: list[dict[str, Any]], grid_final: dict[str, float], total: float,
                budget_t: float) -> dict[str, Any]:
    """Early-stopped trials, and how many would have beaten the method's pick (their grid Dice)."""
    trials = trials_of(events)
    best = max((t["final"] for t in trials.values() if t["completed"]), default=math.nan)
    # a trial cut when the whole budget ran out was not early-stopped
    spent: dict[str, float] = {}
    cut_at = None
    for e in events:
        spent[e["trial"]] = e["spent"]
        if cut_at is None and sum(spent.values()) >= budget_t:
            cut_at = e["t"]
    stopped = []
    for tid, t in trials.items():
        if t["completed"] or any(u["params"] == t["params"] and u["fidelity"] > t["fidelity"] for u in trials.values()):
            continue  # finished, or a compressed run that was promoted to a larger budget
        if cut_at is not None and t["last_t"] >= cut_at:
            continue
        if events and "state" in events[0]:
            if next(e["state"] for e in events if e["trial"] == tid) != "PRUNED":
                continue
        stopped.append(t)
    best_grid = max(grid_final.values())
    winners = [t for t in stopped if grid_final.get(t["params"], -1) > best]
    grid_winner = [t for t in stopped if grid_final.get(t["params"], -1) >= best_grid]
    return {"stopped": len(stopped), "would_have_beaten_pick": len(winners), "grid_best_stopped": len(grid_winner),
            "trials": len(trials), "completed": sum(t["completed"] for t in trials.values()), "pick": best}


@dataclasses.dataclass
class World:
    """One recorded ground truth that searches are replayed on, without training.

    ``curves``: every schedule's full-budget run, ``(baseline iterations, Dice, in final stage)``
    per validation, the last one its end; ``final``: its final Dice; ``low``: the compressed
    runs, ``fraction -> schedule -> (final Dice, baseline iterations)`` (empty when not measured).
    """

    curves: dict[str, list[tuple[float, float, bool]]]
    final: dict[str, float]
    low: dict[float, dict[str, tuple[float, float]]] = dataclasses.field(default_factory=dict)
    # what a search's pick is scored by (default: ``final``, the Dice the search itself saw), and how close
    # to the best of it counts as a hit
    truth: dict[str, float] | None = None
    within: float = WITHIN

    def true(self, k: str) -> float:
        return (self.truth or self.final)[k]

    @property
    def true_best(self) -> float:
        return max((self.truth or self.final).values())

    @property
    def total(self) -> float:
        """The grid's compute: every schedule trained to the end."""
        return sum(c[-1][0] for c in self.curves.values())

    @property
    def best(self) -> float:
        return max(self.final.values())

    def run(self, k: str, fraction: float) -> tuple[float, float]:
        """(final Dice, compute) of schedule ``k`` trained at ``fraction`` of the budget."""
        return (self.final[k], self.curves[k][-1][0]) if fraction >= 1 else self.low[fraction][k]


def replay_once(world: World, space, sampler: str, fidelity: str, seed: int, budget_t: float, grace: int | None = None,
                judge: str = "final_stage", rungs=None, pick: bool = False) -> tuple[float | None, bool | None]:
    """One search replayed one trial at a time: (compute to come within ``world.within`` (0.5 points) of the
    true best, as a share of the grid's, or None within ``budget_t``; whether early stopping stopped the
    best schedule, None if the search never tried it).

    ``pick``: score the search by what it would export, not by what it trained: it runs until ``budget_t``
    is spent, then picks, as :func:`pgps_tune.results.pick_best` does, its full-budget run with the best
    Dice the search saw (``world.final``; a tie: the cheaper run) among those that ended within
    ``budget_t``; the first value is the compute at which that run ended if the pick lies within the
    margin of the true best, else None.

    ``sampler``: ``grid`` (every schedule, in a seeded random order), ``random`` or ``tpe`` (Optuna's, as
    in a sweep); ``fidelity``: ``none`` (every trial to the end), ``partial`` (Optuna's successive-halving
    pruner at ``grace`` on the full runs' curves, validations shown as ``judge`` says) or ``compressed``
    (successive halving over budgets: ``rungs``, :func:`pgps_tune.asha.fidelity_ladder`, repeated while
    compute is left; the sampler learns from the lowest rung, as in a sweep) or ``main_effects`` (the
    compressed fidelity with ``asha.promote: main_effects``: ``rungs`` from
    :func:`pgps_tune.asha.screening_ladder`, the top of :func:`pgps_tune.asha.main_effects_ranking` over
    every schedule of the world at the full budget, repeated while compute is left).
    """
    import optuna

    from pgps_tune.asha import main_effects_ranking, survivors
    from pgps_tune.space import DefineByRun

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sp = dataclasses.replace(space, search=dataclasses.replace(
        space.search, algorithm="random" if sampler == "grid" else sampler, seed=seed))
    pruner = (optuna.pruners.SuccessiveHalvingPruner(  # Optuna's pruner takes a whole reduction factor
        min_resource=grace, reduction_factor=round(space.asha.reduction_factor))
              if fidelity == "partial" else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", sampler=sp.optuna_sampler(), pruner=pruner)
    searched = {p.name for p in space.parameters if p.kind != "fixed"}
    limit = math.inf
    if sampler == "grid":
        limit = len(world.final)
        for k in np.random.default_rng(seed).permutation(sorted(world.final)):
            study.enqueue_trial({n: v for n, v in json.loads(k).items() if n in searched})
    define, max_t = DefineByRun(sp), space.budget.epochs * space.budget.iterations_per_epoch
    winners = {k for k in world.final if world.true(k) >= world.true_best}
    state = {"spent": 0.0, "hit": None, "tried": False, "stopped": False, "asked": 0}
    ended: list[tuple[float, float, float, str]] = []  # pick: (Dice seen, -compute of the run, spent at its end, k)

    def finish(k: str) -> None:  # a full-budget run of k has ended
        state["tried"] |= k in winners
        if pick:
            if state["spent"] <= budget_t:
                ended.append((world.final[k], -world.curves[k][-1][0], state["spent"], k))
        elif state["hit"] is None and world.true(k) >= world.true_best - world.within:
            state["hit"] = state["spent"] / world.total

    def result() -> tuple[float | None, bool | None]:
        stopped = state["stopped"] if state["tried"] else None
        if not pick:
            return state["hit"], stopped
        if not ended:
            return None, stopped
        _, _, spent, k = max(ended, key=lambda e: e[:2])
        return (spent / world.total if world.true(k) >= world.true_best - world.within else None), stopped

    def objective(trial) -> float:
        state["asked"] += 1
        k = key({**define(trial), **trial.params})
        last, reported = 0.0, set()
        for t, d, final_stage in world.curves[k][:-1]:  # the last report is the end of the run
            state["spent"] += t - last
            last = t
            if fidelity != "partial" or (judge == "final_stage" and not final_stage) or int(round(t)) in reported:
                continue  # as the live workers: the first report of a step counts
            reported.add(int(round(t)))
            trial.report(d, step=int(round(t)))
            if trial.should_prune():
                state["tried"] |= k in winners
                state["stopped"] |= k in winners
                raise optuna.TrialPruned
        state["spent"] += world.curves[k][-1][0] - last
        finish(k)
        return world.final[k]

    def more() -> bool:
        return state["spent"] < budget_t and state["hit"] is None and state["asked"] < limit  # enqueued: not asked

    if fidelity not in ("compressed", "main_effects"):
        while more():
            study.optimize(objective, n_trials=1)
        return result()
    while more():  # one bracket of successive halving over budgets after another
        pool = []
        while len(pool) < rungs[0].trials and more():
            trial = study.ask()
            state["asked"] += 1
            k = key({**define(trial), **trial.params})
            d, c = world.run(k, rungs[0].fraction)
            state["spent"] += c
            study.tell(trial, d)
            pool.append((k, d, world.curves[k][-1][0] / max_t))
            if rungs[0].fraction >= 1:
                finish(k)
        if fidelity == "main_effects" and len(pool) >= 2:
            observed = [(json.loads(k), d) for k, d, _ in pool]
            candidates = [o for o, _ in observed] + [json.loads(k) for k in sorted(world.final)]
            ranked = [key(c) for c in main_effects_ranking(space.parameters, observed, candidates)]
            promote = list(dict.fromkeys(ranked))[: rungs[1].trials]
        for rung in rungs[1:]:
            keep = promote if fidelity == "main_effects" and len(pool) >= 2 else survivors(pool, rung.trials)
            if winners & {k for k, _, _ in pool} - set(keep):
                state["tried"] = state["stopped"] = True
            pool = []
            for k in keep:
                if state["spent"] >= budget_t or state["hit"] is not None:
                    break
                d, c = world.run(k, rung.fraction)
                state["spent"] += c
                pool.append((k, d, world.curves[k][-1][0] / max_t))
                if rung.fraction >= 1:
                    finish(k)
    return result()


def replay_stats(results: list[tuple[float | None, bool | None]], target: float = 0.30) -> dict[str, Any]:
    """Over seeds: how many came within 0.5 points, at what compute, and how often the best was stopped."""
    hits = [h for h, _ in results if h is not None]
    return {"seeds": len(results), "reached": len(hits), "median": float(np.median(hits)) if hits else None,
            "p25": float(np.percentile(hits, 25)) if hits else None,
            "p75": float(np.percentile(hits, 75)) if hits else None,
            "within_30pct": sum(h <= 0.30 for h in hits), "within_target": sum(h <= target for h in hits),
            "target": target, "runs_killing_grid_best": sum(bool(k) for _, k in results),
            "runs_trying_grid_best": sum(k is not None for _, k in results)}


def replay_search(grid_curves: dict[str, list[tuple[float, float, bool]]], grid_final: dict[str, float], space,
                  algo: str, grace: int | None, budget_t: float, seeds: int, judge: str) -> dict[str, Any]:
    """One search (TPE or random; with Optuna's successive halving at ``grace``, or none) replayed
    sequentially on the grid's recorded curves for ``seeds`` seeds: compute to come within 0.5 points.
    ``judge`` as asha.judge: final_stage shows the pruner only validations made at the final patch."""
    world = World(grid_curves, grid_final)
    return replay_stats([replay_once(world, space, algo, "partial" if grace else "none", seed, budget_t, grace, judge)
                         for seed in range(seeds)])


def asha_kill_rate(grid_curves: dict[str, list[tuple[float, float, bool]]], grid_final: dict[str, float], grace: int,
                   max_t: float, rf: float, judge: str, orders: int = 500) -> float:
    """ASHA's rule on the recorded curves, trials in random orders: how often is the grid's winner stopped?"""
    from pgps_tune.asha import simulate_asha

    grid_curves = {k: [(t, d) for t, d, fs in c[:-1] if fs or judge == "always"] + [c[-1][:2]]
                   for k, c in grid_curves.items()}
    rng = np.random.default_rng(0)
    best_grid = max(grid_final.values())
    winners = [k for k, v in grid_final.items() if v >= best_grid]
    names = sorted(grid_curves)
    killed = 0
    for _ in range(orders):
        stopped = simulate_asha(grid_curves, list(rng.permutation(names)), grace, max_t, rf)
        killed += any(w in stopped for w in winners)
    return killed / orders


def replays(grid_curves: dict[str, list[tuple[float, float]]], grid_final: dict[str, float], space,
            grace: int, max_t: float, budget_t: float, seeds: int, graces: list[float]) -> dict[str, Any]:
    """Sequential searches replayed on the grid's curves, at the space's grace and at other graces."""
    rf, judge = space.asha.reduction_factor, space.asha.judge
    out: dict[str, Any] = {
        name: replay_search(grid_curves, grid_final, space, algo, g, budget_t, seeds, judge)
        for name, algo, g in (("tpe_sha", "tpe", grace), ("random_sha", "random", grace), ("tpe", "tpe", None),
                              ("random", "random", None))
    }
    out["asha_replay"] = {"orders": 500, "winner_stopped": round(
        500 * asha_kill_rate(grid_curves, grid_final, grace, max_t, rf, judge))}
    out["graces"] = []
    for rule in ("final_stage", "always"):
        for frac in graces:
            g = max(1, round(frac * max_t))
            out["graces"].append({
                "judge": rule, "grace_fraction": frac, "grace": g,
                "asha_kill_rate": asha_kill_rate(grid_curves, grid_final, g, max_t, rf, rule),
                "tpe_sha": replay_search(grid_curves, grid_final, space, "tpe", g, budget_t, seeds, rule),
                "random_sha": replay_search(grid_curves, grid_final, space, "random", g, budget_t, seeds, rule),
            })
    return out


def plot(curves: dict[str, list[tuple[float, float]]], best_grid: float, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pgps_tune.errors import atomic_write

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"grid": "black", "asha_tpe": "tab:green", "asha_random": "tab:blue", "optuna_sha": "tab:orange",
              "compressed_tpe": "tab:red", "compressed_random": "tab:purple"}
    for name, c in curves.items():
        pts = [(x, y) for x, y in c if not math.isnan(y)]
        if pts:
            ax.step([x for x, _ in pts], [y for _, y in pts], where="post", label=name, color=colors.get(name),
                    lw=2, alpha=0.85)
    ax.axhspan(best_grid - WITHIN, best_grid, color="gray", alpha=0.2, label="within 0.5 points of grid best")
    ax.axvline(0.3, color="red", ls=":", label="30% of the grid's compute")
    ax.axvline(budget, color="gray", ls="--", lw=1, label="search budget")
    ax.set_xlabel("compute spent / full grid's compute (voxels processed)")
    ax.set_ylabel("best completed validation Dice")
    ax.set_title("best schedule found against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "bench_hippocampus.yaml"))
    ap.add_argument("--budget", type=float, default=0.5, help="each search's compute, as a fraction of the grid's")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help=f"of {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at a time per method (default 2)")
    ap.add_argument("--replay-seeds", type=int, default=100)
    ap.add_argument("--replay-graces", type=float, nargs="*", default=[0.111, 0.333],
                    help="ASHA grace fractions to replay on the grid's curves")
    ap.add_argument("--reuse", nargs="*", metavar="METHOD",
                    help="take these methods' trials from the earlier run in --out instead of training them "
                         "(no names: all of --methods); e.g. --reuse grid reruns only the searches")
    ap.add_argument("--epochs", type=int, help="override the space's budget.epochs")
    ap.add_argument("--iterations-per-epoch", type=int, help="override the space's budget.iterations_per_epoch")
    ap.add_argument("--val-every", type=int, help="override the space's budget.val_every")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_search"))
    ap.add_argument("--report", help="also write a Markdown report here (plot beside it)")
    ap.add_argument("--quick", action="store_true", help="4 schedules, tiny budget: under 5 minutes on 2 cores")
    a = ap.parse_args()
    if "grid" not in a.methods:
        raise SystemExit("error: the grid is the reference every method is scored against; keep it in --methods")
    unknown = sorted(set(a.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not 0 < a.budget <= 1:
        raise SystemExit(f"error: --budget {a.budget} must be in (0, 1] (a fraction of the grid's compute)")
    if a.quick:
        a.epochs, a.iterations_per_epoch, a.val_every = a.epochs or 16, a.iterations_per_epoch or 3, a.val_every or 4

    from pgps_tune.data import plan_patch, prepare
    from pgps_tune.errors import PgpsError, atomic_write_text
    from pgps_tune.space import Param, load, schedule_from_params

    try:
        space = load(a.space)
        ds = prepare(a.data, synthetic_cases=space.budget.synthetic_cases,
                     synthetic_shape=space.budget.synthetic_shape)
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    overrides = {k: v for k, v in (("epochs", a.epochs), ("iterations_per_epoch", a.iterations_per_epoch),
                                   ("val_every", a.val_every)) if v is not None}
    space = dataclasses.replace(space, budget=dataclasses.replace(space.budget, **overrides))
    if a.quick:  # 2 x 2 schedules
        params = tuple(Param("stages", "categorical", choices=(2, 3)) if p.name == "stages" else
                       Param("growth", "fixed", value=2.0) if p.name == "growth" else p for p in space.parameters)
        space = dataclasses.replace(space, parameters=params)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = space.budget
    plan = plan_patch(ds.median_shape, ds.spacing)
    final = tuple(b.final_patch) if b.final_patch else plan.final_patch
    pools = tuple(b.pools) if b.pools else plan.pools
    grid = space.grid()
    max_t = b.epochs * b.iterations_per_epoch
    grid_total_expected = sum(schedule_from_params(c, final, pools, b.batch_size, b.epochs).voxel_fraction()
                              for c in grid) * max_t
    budget_runs = a.budget * grid_total_expected / max_t
    from pgps_tune.asha import AshaSettings

    grace = AshaSettings.from_space(space).grace_period
    print(f"# {ds.name}: {len(grid)} schedules in the space, {b.epochs} epochs x {b.iterations_per_epoch} "
          f"iterations each; grid compute {grid_total_expected / max_t:.2f} baseline runs, each search gets "
          f"{budget_runs:.2f} ({a.budget:.0%})", flush=True)

    events, wall = {}, {}
    saved = out / "events.json"
    reuse = [] if a.reuse is None else (a.reuse or list(a.methods))
    unknown = sorted(set(reuse) - set(a.methods))
    if unknown:
        raise SystemExit(f"error: --reuse {unknown} not in --methods {a.methods}")
    if reuse:
        events, wall = reuse_events(out, reuse)
    if sum(m not in reuse and m != "optuna_sha" for m in a.methods) > 1:
        from pgps_tune.tuner import start_ray

        start_ray(None)  # one local Ray for every live sweep, none of them timed starting its own; kept by each
    for method in [m for m in a.methods if m not in reuse]:
        t0 = time.time()
        if method == "optuna_sha":
            events[method] = run_optuna(space, a.data if a.data == "synthetic" else str(Path(a.data).resolve()),
                                        out, budget_runs * max_t, a.concurrent, grace, final, pools)
        else:
            if (out / method).exists():
                import shutil

                shutil.rmtree(out / method)
            events[method] = run_ray(method, space, a.data, out, budget_runs, a.concurrent,
                                     grid_total_expected / max_t / len(grid))
        wall[method] = time.time() - t0
        tr = trials_of(events[method])
        print(f"  {method}: {len(tr)} trials, {sum(t['completed'] for t in tr.values())} completed, "
              f"{wall[method]:.0f} s", flush=True)

    atomic_write_text(saved, json.dumps({"events": events, "wall": wall}) + "\n")
    grid_trials = trials_of(events["grid"])
    grid_final = {t["params"]: t["final"] for t in grid_trials.values() if t["completed"]}
    grid_curves = {t["params"]: t["curve"] for t in grid_trials.values() if t["completed"]}
    if len(grid_final) < len(grid):
        raise SystemExit(f"error: only {len(grid_final)} of {len(grid)} grid trials completed; see {out / 'grid'}")
    total = sum(c[-1][0] for c in grid_curves.values())
    best_grid = max(grid_final.values())
    best_key = max(grid_final, key=grid_final.get)
    curves = {m: compute_curve(ev, total) for m, ev in events.items()}
    # determinism: a schedule trained by two methods must give the same Dice
    diffs = [abs(t["final"] - grid_final[t["params"]]) for m, ev in events.items() if m != "grid"
             for t in trials_of(ev).values() if t["completed"] and t["params"] in grid_final]
    rep = replays(grid_curves, grid_final, space, grace, max_t, a.budget * total, a.replay_seeds, a.replay_graces)

    ranked = sorted(grid_final.items(), key=lambda kv: -kv[1])
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {a.concurrent} trials at a time, 1 CPU each",
        f"Data: {ds.name}, split seed {b.split_seed} (val fraction {b.val_fraction}); final patch "
        f"{'x'.join(map(str, final))}; space {Path(a.space).name}{' (quick: 4 schedules)' if a.quick else ''}; "
        f"{b.epochs} epochs x {b.iterations_per_epoch} iterations per trial, batch {b.batch_size}, {b.optimizer} "
        f"lr {b.lr}, validation every {b.val_every} epochs",
        f"ASHA / successive halving: grace {grace} baseline iterations, reduction factor "
        f"{space.asha.reduction_factor:g}, max {max_t}; TPE: {space.search.startup_trials} random startup trials",
        f"Compute unit: voxels processed, as baseline iterations; the grid spent {total:.0f} "
        f"({total / max_t:.2f} baseline runs); each search's budget {a.budget:.0%} of that",
        "",
        "Grid (ground truth), every schedule trained to the end, final validation Dice:",
        "",
        "| rank | schedule | final Dice | voxel fraction |",
        "|---|---|---|---|",
    ]
    for i, (k, v) in enumerate(ranked, 1):
        vf = grid_curves[k][-1][0] / max_t  # the last report: the whole run's compute
        lines.append(f"| {i} | {k} | {v:.4f} | {vf:.3f} |")
    lines += ["", "| method | trials | completed | early-stopped | best Dice found | gap to grid best (points) | "
                  "compute to within 0.5 points | wall time s | stopped a would-be winner |",
              "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for m, ev in events.items():
        tr = trials_of(ev)
        found = max((t["final"] for t in tr.values() if t["completed"]), default=math.nan)
        need = compute_to_within(curves[m], best_grid - WITHIN)
        es = early_stops(ev, grid_final, total, a.budget * total) if m != "grid" else None
        summary[m] = {"trials": len(tr), "completed": sum(t["completed"] for t in tr.values()), "best": found,
                      "compute_to_within": need, "wall_s": wall[m], "early_stops": es}
        lines.append(
            f"| {m} | {len(tr)} | {summary[m]['completed']} | {es['stopped'] if es else 0} | {found:.4f} | "
            f"{100 * (found - best_grid):+.2f} | {f'{need:.0%}' if need is not None else 'not reached'} | "
            f"{wall[m]:.0f} | "
            + (f"{es['would_have_beaten_pick']} of {es['stopped']} (grid best stopped: {es['grid_best_stopped']})"
               if es else "-") + " |")
    lines += ["", f"Determinism: {len(diffs)} completed trials re-trained a grid schedule; largest Dice difference "
                  f"{max(diffs, default=0.0):.2e}", ""]
    lines += [f"Replayed on the grid's recorded curves, one trial at a time, {a.replay_seeds} seeds each, budget "
              f"{a.budget:.0%}: compute to come within 0.5 points of the grid best", "",
              "| search | reached | median | 25-75% | reached within 30% | seeds where the pruner stopped the grid "
              "winner |", "|---|---|---|---|---|---|"]
    for name, r in rep.items():
        if name in ("asha_replay", "graces"):
            continue
        med = f"{r['median']:.0%}" if r["median"] is not None else "-"
        iqr = f"{r['p25']:.0%}-{r['p75']:.0%}" if r["median"] is not None else "-"
        lines.append(f"| {name} | {r['reached']}/{r['seeds']} | {med} | {iqr} | {r['within_30pct']}/{r['seeds']} | "
                     f"{r['runs_killing_grid_best']}/{r['seeds']} |")
    ar = rep["asha_replay"]
    lines += ["", f"ASHA's rule replayed on the grid's curves in {ar['orders']} random trial orders: the grid's winner "
                  f"was stopped in {ar['winner_stopped']} ({ar['winner_stopped'] / ar['orders']:.0%})", ""]
    if rep["graces"]:
        lines += ["The same replays for both asha.judge rules (final_stage: a trial is judged only on validations "
                  "in its last stage; always: on every validation) and other grace periods (first rung, as a "
                  f"fraction of the budget; reduction factor {space.asha.reduction_factor:g}):", "",
                  "| judge | grace fraction | grace | ASHA stops the grid winner | TPE + SH reached | median compute | "
                  "random + SH reached | median compute |", "|---|---|---|---|---|---|---|---|"]
        for g in rep["graces"]:
            cells = []
            for m in ("tpe_sha", "random_sha"):
                r = g[m]
                cells += [f"{r['reached']}/{r['seeds']}", f"{r['median']:.0%}" if r["median"] is not None else "-"]
            lines.append(f"| {g['judge']} | {g['grace_fraction']:g} | {g['grace']} | {g['asha_kill_rate']:.0%} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    tpe = summary.get("asha_tpe")
    if tpe:
        need = tpe["compute_to_within"]
        ok = need is not None and need <= 0.30
        lines += ["Target:", "", f"- ASHA + TPE within 0.5 Dice points of the grid's best with <= 30% of its "
                                 f"compute: {f'{need:.0%}' if need is not None else 'not reached within the budget'}"
                                 f": {'met' if ok else 'MISSED'}", ""]
    report = "\n".join(lines)
    print(report)
    from pgps_tune import schedule as sch

    best_sched = schedule_from_params(json.loads(best_key), final, pools, b.batch_size, b.epochs)
    found_key = None
    if tpe and not math.isnan(tpe["best"]):
        found_key = max((t for t in trials_of(events["asha_tpe"]).values() if t["completed"]),
                        key=lambda t: t["final"])["params"]
        s = schedule_from_params(json.loads(found_key), final, pools, b.batch_size, b.epochs)
        sch.Schedule(s.stages, s.final_patch, s.pools, s.baseline_batch_size, meta={
            **s.meta, "dataset": ds.name, "source": "bench_search asha_tpe", "params": json.loads(found_key),
            "val_dice": tpe["best"]}).save(out / "best_schedule.yaml")
    best_sched.save(out / "grid_best_schedule.yaml")
    atomic_write_text(out / "summary.json", json.dumps({
        "summary": summary, "replays": rep, "grid": grid_final, "grid_best": best_key, "asha_tpe_pick": found_key,
        "curves": curves, "args": vars(a)}, indent=1) + "\n")
    if a.report:
        rp = Path(a.report)
        img = rp.parent / "img" / f"{rp.stem}_best_vs_compute.png"
        plot(curves, best_grid, a.budget, img)
        cmd = shlex.join(["scripts/bench_search.py", *sys.argv[1:]])
        atomic_write_text(rp, f"# Search benchmark\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n"
                              f"![best vs compute](img/{img.name})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
