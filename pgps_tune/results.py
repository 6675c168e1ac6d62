"""Exports and the results store: trials.parquet, best_schedule.yaml, every sweep in one dataset.

``export_sweep`` reads a sweep's Tune experiments (local or s3:// / gs:// storage) and
writes ``trials.parquet`` (one row per trial) and ``best_schedule.yaml`` (a schedule
file that ``pgps-tune train --schedule`` accepts).  The results store is a Parquet
dataset partitioned by ``dataset`` and ``sweep``; :func:`best_schedule` answers "the
best schedule for dataset X" with one query.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pgps_tune import schedule as sch
from pgps_tune.errors import PgpsError, atomic_write, atomic_write_text

TRIALS = "trials.parquet"
BEST = "best_schedule.yaml"
COLUMNS = [
    "trial_id", "role", "status", "params", "final_dice", "best_dice", "score", "voxels_processed",
    "voxel_fraction", "schedule_voxel_fraction", "train_time_s", "wall_time_s", "baseline_iterations",
    "rung_reached", "stopped_early", "failed", "completed", "num_failures", "error", "n_stages",
    "schedule", "dice_per_class",
]


def default_store() -> Path:
    env = os.environ.get("PGPS_RESULTS_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "pgps-tune" / "results"


def _storage_fs(meta: dict[str, Any]):
    import pyarrow.fs as pafs

    if meta.get("storage") and "://" in meta["storage"]:
        fs, _ = pafs.FileSystem.from_uri(meta["storage"])
        return fs
    return None


def _rung(value: float, milestones: list[float]) -> int:
    """Index of the highest rung a trial reached (-1: none)."""
    return max((i for i, m in enumerate(milestones) if value >= m), default=-1)


def _error_text(trial) -> str:
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # the error file may be gone with the storage
        err = None
    if err is None:
        return "failed (no error recorded)"
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:500]


def collect_rows(meta: dict[str, Any], phases: tuple[str, ...] = ("references", "search")) -> list[dict[str, Any]]:
    """One row per trial of the sweep described by ``meta`` (its sweep.json)."""
    from ray.tune import ExperimentAnalysis

    from pgps_tune.space import objective_score
    from pgps_tune.tuner import rung_milestones

    milestones = rung_milestones(meta["asha"])
    time_attr = meta["asha"]["time_attr"]
    fs = _storage_fs(meta)
    rows = []
    for phase in phases:
        if phase not in meta["experiments"]:
            continue  # a sweep run with search.references: false has no references phase
        path = f"{meta['storage_path'].rstrip('/')}/{meta['experiments'][phase]}"
        try:
            analysis = ExperimentAnalysis(path, storage_filesystem=fs)
        except Exception as exc:
            raise PgpsError(f"cannot read the Tune experiment at {path} ({type(exc).__name__}); "
                            "was the sweep started? run 'pgps-tune tune' first") from None
        for trial in analysis.trials:
            r = trial.last_result or {}
            failed = trial.status == "ERROR"
            completed = bool(r.get("completed")) and not failed
            params = {k: v for k, v in (trial.config or {}).items()}
            per_class = {k[5:]: v for k, v in r.items() if k.startswith("dice_") and k != "dice_per_class"}
            rows.append({
                "trial_id": trial.trial_id,
                "role": r.get("role") or params.get("role", "search"),
                "status": "failed" if failed else ("completed" if completed else "stopped_early"),
                "params": json.dumps(params, sort_keys=True),
                "final_dice": float(r.get("val_dice", math.nan)),
                "best_dice": float(r.get("best_val_dice", r.get("val_dice", math.nan))),
                "score": float(r.get("score", math.nan)) if "target_dice" not in meta else (
                    # rescored with the target, which the reference trials ran without
                    objective_score(meta["objective"], float(r.get("val_dice", math.nan)),
                                    float(r.get("schedule_voxel_fraction", math.nan)), meta["target_dice"])),
                "voxels_processed": int(r.get("voxels_processed", 0)),
                "voxel_fraction": float(r.get("baseline_iterations", 0.0)) / max(1, meta["asha"]["max_t"])
                if time_attr == "baseline_iterations" else math.nan,
                "schedule_voxel_fraction": float(r.get("schedule_voxel_fraction", math.nan)),
                "train_time_s": float(r.get("train_time_s", math.nan)),
                "wall_time_s": float(r.get("time_total_s", math.nan)),
                "baseline_iterations": float(r.get("baseline_iterations", 0.0)),
                "rung_reached": _rung(float(r.get(time_attr, 0.0)), milestones),
                "stopped_early": not completed and not failed,
                "failed": failed,
                "completed": completed,
                "num_failures": int(trial.num_failures),
                "error": _error_text(trial) if failed else "",
                "n_stages": int(r.get("n_stages", 0)),
                "schedule": r.get("schedule", ""),
                "dice_per_class": json.dumps(per_class),
            })
    return rows


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema([
        ("trial_id", pa.string()), ("role", pa.string()), ("status", pa.string()), ("params", pa.string()),
        ("final_dice", pa.float64()), ("best_dice", pa.float64()), ("score", pa.float64()),
        ("voxels_processed", pa.int64()), ("voxel_fraction", pa.float64()),
        ("schedule_voxel_fraction", pa.float64()), ("train_time_s", pa.float64()), ("wall_time_s", pa.float64()),
        ("baseline_iterations", pa.float64()), ("rung_reached", pa.int64()), ("stopped_early", pa.bool_()),
        ("failed", pa.bool_()), ("completed", pa.bool_()), ("num_failures", pa.int64()), ("error", pa.string()),
        ("n_stages", pa.int64()), ("schedule", pa.string()), ("dice_per_class", pa.string()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def trainer_meta(params_json: str) -> dict[str, Any]:
    """The searched trainer settings of a trial (fg_ratio, lr), to travel with its schedule."""
    from pgps_tune.space import TRAINER_PARAMS

    params = json.loads(params_json or "{}")
    trainer = {k: params[k] for k in TRAINER_PARAMS if k in params}
    return {"trainer": trainer} if trainer else {}


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest objective score (ties: cheaper, then higher Dice)."""
    done = [r for r in rows if r["completed"] and r["schedule"] and not math.isnan(r["score"])]
    return max(done, key=lambda r: (r["score"], -r["schedule_voxel_fraction"], r["final_dice"]), default=None)


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    best = pick_best(rows)
    refs = {r["role"]: r for r in rows if r["role"] in ("baseline", "paper") and r["completed"]}
    summary: dict[str, Any] = {
        "dataset": meta["dataset"], "sweep": meta["sweep"], "objective": meta["objective"],
        "trials": len(rows), "completed": sum(r["completed"] for r in rows),
        "stopped_early": sum(r["stopped_early"] for r in rows), "failed": sum(r["failed"] for r in rows),
        "best": None,
    }
    if best is None:
        return summary
    summary["best"] = {k: best[k] for k in ("trial_id", "role", "params", "final_dice", "score",
                                            "schedule_voxel_fraction", "train_time_s", "n_stages")}
    for role, ref in refs.items():
        summary[f"gain_over_{role}"] = {
            "dice_points": 100 * (best["final_dice"] - ref["final_dice"]),
            "dice_relative_pct": 100 * (best["final_dice"] / ref["final_dice"] - 1) if ref["final_dice"] else None,
            "time_ratio": best["train_time_s"] / ref["train_time_s"] if ref["train_time_s"] else None,
            "voxel_ratio": best["schedule_voxel_fraction"] / ref["schedule_voxel_fraction"],
            f"{role}_dice": ref["final_dice"],
        }
    return summary


def read_meta(experiment: str | Path) -> dict[str, Any]:
    path = Path(experiment) / "sweep.json"
    if not path.is_file():
        raise PgpsError(f"{path} does not exist; give the --out folder of a 'pgps-tune tune' run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PgpsError(f"{path} is not valid JSON; it was damaged, rerun the sweep with --resume") from None


def export_sweep(experiment: str | Path, out: str | Path, results_store: str | Path | None = None) -> dict[str, Any]:
    """(Re)write trials.parquet and best_schedule.yaml, and add the sweep to the results store."""
    meta = read_meta(experiment)
    rows = collect_rows(meta)
    out = Path(out)
    table = _table(rows)
    atomic_write(out / TRIALS, lambda fh: pq.write_table(table, fh))
    summary = summarize(rows, meta)
    best = pick_best(rows)
    if best is not None:
        s = sch.Schedule.from_dict(json.loads(best["schedule"]), source=f"trial {best['trial_id']}")
        s = sch.Schedule(s.stages, s.final_patch, s.pools, s.baseline_batch_size, meta={
            **s.meta, **trainer_meta(best["params"]), "dataset": meta["dataset"],
            "objective": meta["objective"]["type"],
            "score": best["score"], "val_dice": best["final_dice"], "sweep": summary["sweep"],
            "trial_id": best["trial_id"], "space": meta["space"],
            **{k: v for k, v in summary.items() if k.startswith("gain_over_")},
        })
        s.save(out / BEST)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    store_sweep(table, meta, summary["sweep"], results_store)
    return summary


def store_sweep(table: pa.Table, meta: dict[str, Any], sweep: str, store: str | Path | None) -> Path:
    """Add (or replace) one sweep's rows in the store, partitioned by dataset and sweep."""
    root = Path(store) if store else default_store()
    n = table.num_rows
    table = table.append_column("objective", pa.array([meta["objective"]["type"]] * n))
    table = table.append_column("final_patch", pa.array([json.dumps(meta["final_patch"])] * n))
    table = table.append_column("dataset", pa.array([meta["dataset"]] * n))
    table = table.append_column("sweep", pa.array([sweep] * n))
    try:
        pads.write_dataset(
            table, root, format="parquet", partitioning=["dataset", "sweep"], partitioning_flavor="hive",
            existing_data_behavior="delete_matching", basename_template="part-{i}.parquet",
        )
    except OSError as exc:
        raise PgpsError(
            f"cannot write the results store {root} ({exc}); set PGPS_RESULTS_DIR or --results-store"
        ) from None
    return root


def load_store(store: str | Path | None = None) -> pa.Table:
    root = Path(store) if store else default_store()
    if not root.exists():
        raise PgpsError(f"results store {root} does not exist yet; run a sweep first")
    return pads.dataset(root, format="parquet", partitioning="hive").to_table()


def best_schedule(dataset: str, store: str | Path | None = None, objective: str = "max_dice") -> sch.Schedule:
    """The best completed schedule for ``dataset`` over every stored sweep with ``objective``."""
    import pyarrow.compute as pc

    t = load_store(store)
    mask = pc.and_(pc.and_(pc.equal(t["dataset"], dataset), pc.equal(t["objective"], objective)), t["completed"])
    rows = t.filter(mask).to_pylist()
    best = pick_best(rows)
    if best is None:
        known = sorted(set(t["dataset"].to_pylist()))
        raise PgpsError(f"no completed '{objective}' trials for dataset {dataset!r} in the store; known: {known}")
    s = sch.Schedule.from_dict(json.loads(best["schedule"]))
    return sch.Schedule(s.stages, s.final_patch, s.pools, s.baseline_batch_size, meta={
        **s.meta, **trainer_meta(best["params"]), "dataset": dataset, "objective": objective, "score": best["score"],
        "val_dice": best["final_dice"], "sweep": best["sweep"], "trial_id": best["trial_id"],
    })


def simulate_asha(
    curves: dict[str, list[tuple[float, float]]], order: list[str], grace: float, max_t: float, rf: float
) -> set[str]:
    """The trials that ASHA would stop, replaying recorded ``(time, score)`` curves.

    Same rule as Ray's ASHA with one bracket: at the first report at or past a rung, a
    trial is stopped if its score is below the ``1 - 1/rf`` quantile of the scores already
    recorded at that rung.  Trials are replayed one after another in ``order`` (as with
    one trial at a time), which lets a sweep run without early stopping measure how often
    early stopping would have killed its eventual winner.
    """
    import numpy as np

    n = int(math.log(max_t / grace) / math.log(rf) + 1)
    milestones = [grace * rf**k for k in reversed(range(n))]
    recorded: dict[float, dict[str, float]] = {m: {} for m in milestones}
    stopped = set()
    for tid in order:
        for t, score in curves[tid][:-1]:  # the end of a run is not an early stop
            if t >= max_t:
                break
            halt = False
            for m in milestones:
                if t < m or tid in recorded[m]:
                    continue
                seen = list(recorded[m].values())
                if seen and score < np.nanpercentile(seen, (1 - 1 / rf) * 100):
                    halt = True
                recorded[m][tid] = score
                break
            if halt:
                stopped.add(tid)
                break
    return stopped
