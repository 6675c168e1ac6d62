"""Exports and the results store: trials.parquet, best_schedule.yaml, every sweep in one dataset.

Pure pyarrow and YAML (no Ray): the tuner reads a sweep's Tune experiments into
plain :class:`TrialRecord` s, and this module turns them into ``trials.parquet``
(one row per trial), ``best_schedule.yaml`` (a schedule file that ``pgps-tune
train --schedule`` accepts) and ``summary.json``.  The results store is a Parquet
dataset partitioned by ``dataset`` and ``sweep``; :func:`best_schedule` answers
"the best schedule for dataset X" with one query.

Everything read back here (``sweep.json``, the store, the trials' last results) is
parsed as data: JSON and Parquet only, checked, and refused in one line when it is
not what a sweep writes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pgps_tune import schedule as sch
from pgps_tune.asha import AshaSettings
from pgps_tune.errors import PgpsError, atomic_write, atomic_write_text, strict_json

SWEEP_FILE = "sweep.json"
TRIALS = "trials.parquet"
BEST = "best_schedule.yaml"
SUMMARY = "summary.json"
SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("role", pa.string()), ("status", pa.string()), ("params", pa.string()),
    ("final_dice", pa.float64()), ("best_dice", pa.float64()), ("score", pa.float64()),
    ("voxels_processed", pa.int64()), ("voxel_fraction", pa.float64()),
    ("schedule_voxel_fraction", pa.float64()), ("train_time_s", pa.float64()), ("wall_time_s", pa.float64()),
    ("baseline_iterations", pa.float64()), ("rung_reached", pa.int64()), ("stopped_early", pa.bool_()),
    ("failed", pa.bool_()), ("completed", pa.bool_()), ("num_failures", pa.int64()), ("error", pa.string()),
    ("n_stages", pa.int64()), ("schedule", pa.string()), ("dice_per_class", pa.string()),
])
COLUMNS = SCHEMA.names
STORE_COLUMNS = (*COLUMNS, "objective", "final_patch")  # plus the partition keys dataset and sweep
META_KEYS = ("format_version", "sweep", "dataset", "space", "storage_path", "experiments", "objective", "asha",
             "final_patch", "finished")
FINISHED_STATUSES = ("TERMINATED", "ERROR")  # Tune's end states; anything else is an unfinished trial


def default_store() -> Path:
    env = os.environ.get("PGPS_RESULTS_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "pgps-tune" / "results"


# -- sweep.json ------------------------------------------------------------------------------


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(out / SWEEP_FILE, strict_json(meta) + "\n")


def read_meta(experiment: str | Path) -> dict[str, Any]:
    """A sweep's ``sweep.json``, checked to hold what the exports need."""
    path = Path(experiment) / SWEEP_FILE
    hint = "give the --out folder of a 'pgps-tune tune' run"
    if not path.is_file():
        raise PgpsError(f"{path} does not exist; {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PgpsError(f"{path} is not valid JSON ({type(exc).__name__}); it was damaged: {hint}, or rerun "
                        "the sweep into a new --out") from None
    if not isinstance(meta, dict):
        raise PgpsError(f"{path} is not a sweep description (a JSON object); {hint}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise PgpsError(f"{path} misses {', '.join(missing)}; it was damaged or written by another program: {hint}")
    try:
        AshaSettings.from_dict(meta["asha"])
        experiments = meta["experiments"]
        assert isinstance(experiments, dict) and "search" in experiments
        assert all(isinstance(v, str) and v and "/" not in v for v in experiments.values())
        assert isinstance(meta["objective"], dict) and isinstance(meta["objective"].get("type"), str)
        assert isinstance(meta["storage_path"], str) and isinstance(meta["dataset"], str)
        assert isinstance(meta["sweep"], str) and meta["sweep"]
    except (AssertionError, KeyError, TypeError, ValueError):
        raise PgpsError(f"{path} has malformed fields; it was damaged: {hint}") from None
    return meta


# -- trials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """One Tune trial as plain data, as the tuner reads it from an experiment folder."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict[str, Any] = field(default_factory=dict)
    last_result: dict[str, Any] = field(default_factory=dict)
    num_failures: int = 0
    error: str = ""  # the last line of the trial's error, if it failed


def _float(r: dict[str, Any], key: str, default: float = math.nan) -> float:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def trial_rows(records: list[TrialRecord], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial (the columns of ``trials.parquet``)."""
    from pgps_tune.space import objective_score

    asha = AshaSettings.from_dict(meta["asha"])
    rows = []
    for t in records:
        r = t.last_result
        diverged = bool(r.get("diverged"))
        failed = t.status == "ERROR" or diverged
        completed = t.status == "TERMINATED" and bool(r.get("completed")) and not failed
        status = "failed" if failed else "completed" if completed else (
            "stopped_early" if t.status == "TERMINATED" else "unfinished")
        score = _float(r, "score")
        if "target_dice" in meta and not failed:  # rescored with the target, which the references ran without
            score = objective_score(meta["objective"], _float(r, "val_dice"), _float(r, "schedule_voxel_fraction"),
                                    meta["target_dice"])
        per_class = {k[5:]: v for k, v in r.items() if k.startswith("dice_")}
        rows.append({
            "trial_id": t.trial_id,
            "role": str(r.get("role") or t.config.get("role", "search")),
            "status": status,
            "params": json.dumps(t.config, sort_keys=True),
            "final_dice": _float(r, "val_dice"),
            "best_dice": _float(r, "best_val_dice", _float(r, "val_dice")),
            "score": score,
            "voxels_processed": int(_float(r, "voxels_processed", 0)),
            "voxel_fraction": _float(r, "baseline_iterations", 0.0) / max(1.0, asha.max_t)
            if asha.time_attr == "baseline_iterations" else math.nan,
            "schedule_voxel_fraction": _float(r, "schedule_voxel_fraction"),
            "train_time_s": _float(r, "train_time_s"),
            "wall_time_s": _float(r, "time_total_s"),
            "baseline_iterations": _float(r, "baseline_iterations", 0.0),
            "rung_reached": asha.rung_reached(_float(r, asha.time_attr, 0.0)),
            "stopped_early": status == "stopped_early",
            "failed": failed,
            "completed": completed,
            "num_failures": t.num_failures,
            "error": str(r.get("error", "diverged")) if diverged else (t.error or "failed (no error recorded)")
            if failed else "",
            "n_stages": int(_float(r, "n_stages", 0)),
            "schedule": str(r.get("schedule", "")),
            "dice_per_class": strict_json(per_class, indent=None),
        })
    return rows


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


def _schedule_of(row: dict[str, Any], where: str) -> sch.Schedule:
    try:
        data = json.loads(row["schedule"])
    except json.JSONDecodeError:
        raise PgpsError(f"trial {row['trial_id']} in {where} holds a damaged schedule; rerun that sweep") from None
    return sch.Schedule.from_dict(data, source=f"trial {row['trial_id']} in {where}")


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


def require_finished(meta: dict[str, Any], records: list[TrialRecord] = ()) -> None:
    """Refuse to export a sweep that an interrupt (or a crash) left unfinished."""
    unfinished = [t.trial_id for t in records if t.status not in FINISHED_STATUSES]
    if not meta["finished"] or unfinished:
        raise PgpsError(f"sweep {meta['sweep']} is not finished "
                        f"({sch.plural(len(unfinished), 'trial')} known unfinished); "
                        "complete it with the same 'pgps-tune tune' command plus --resume, then export")


def export_sweep(out: str | Path, meta: dict[str, Any], records: list[TrialRecord],
                 results_store: str | Path | None = None) -> dict[str, Any]:
    """(Re)write trials.parquet, best_schedule.yaml and summary.json, and add the sweep to the results store.

    Only a finished sweep is exported: an interrupted one would be stored as if its unfinished
    trials were its result.
    """
    require_finished(meta, records)
    rows = trial_rows(records, meta)
    out = Path(out)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    atomic_write(out / TRIALS, lambda fh: pq.write_table(table, fh))
    summary = summarize(rows, meta)
    best = pick_best(rows)
    if best is not None:
        s = _schedule_of(best, meta["sweep"])
        s = sch.Schedule(s.stages, s.final_patch, s.pools, s.baseline_batch_size, meta={
            **s.meta, **trainer_meta(best["params"]), "dataset": meta["dataset"],
            "objective": meta["objective"]["type"],
            "score": best["score"], "val_dice": best["final_dice"], "sweep": summary["sweep"],
            "trial_id": best["trial_id"], "space": meta["space"],
            **{k: v for k, v in summary.items() if k.startswith("gain_over_")},
        })
        s.save(out / BEST)
    else:
        (out / BEST).unlink(missing_ok=True)  # a re-export must not leave an older sweep's winner
    atomic_write_text(out / SUMMARY, strict_json(summary) + "\n")
    store_sweep(table, meta, results_store)
    return summary


# -- the results store -------------------------------------------------------------------------


def store_sweep(table: pa.Table, meta: dict[str, Any], store: str | Path | None) -> Path:
    """Add (or replace) one sweep's rows in the store, partitioned by dataset and sweep."""
    root = Path(store) if store else default_store()
    n = table.num_rows
    table = table.append_column("objective", pa.array([meta["objective"]["type"]] * n, pa.string()))
    table = table.append_column("final_patch", pa.array([json.dumps(meta["final_patch"])] * n, pa.string()))
    table = table.append_column("dataset", pa.array([meta["dataset"]] * n, pa.string()))
    table = table.append_column("sweep", pa.array([meta["sweep"]] * n, pa.string()))
    try:
        pads.write_dataset(
            table, root, format="parquet", partitioning=["dataset", "sweep"], partitioning_flavor="hive",
            existing_data_behavior="delete_matching", basename_template="part-{i}.parquet",
        )
    except (OSError, pa.ArrowException) as exc:
        raise PgpsError(
            f"cannot write the results store {root} ({str(exc).splitlines()[0][:200]}); "
            "set PGPS_RESULTS_DIR or --results-store to a writable folder"
        ) from None
    return root


def _store_files(root: Path) -> list[Path]:
    """The store's Parquet files; anything else in it is refused, naming the file."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if name.startswith((".", "_")):
                continue  # hidden and temporary files, as pyarrow itself skips them
            path = Path(dirpath) / name
            layout = (len(rel) == 2 and rel[0].startswith("dataset=") and rel[1].startswith("sweep=")
                      and name.endswith(".parquet"))
            if not layout:
                raise PgpsError(f"results store {root} holds {path}, which is not one of its tables "
                                "(dataset=NAME/sweep=NAME/part-N.parquet); move that file out of the store")
            files.append(path)
    return files


def load_store(store: str | Path | None = None) -> pa.Table:
    """Every stored trial, with its ``dataset`` and ``sweep``."""
    root = Path(store) if store else default_store()
    if not root.exists():
        raise PgpsError(f"results store {root} does not exist yet; run a sweep first")
    if not root.is_dir():
        raise PgpsError(f"results store {root} is a file; give the store's folder (--results-store or "
                        "PGPS_RESULTS_DIR)")
    files = _store_files(root)
    if not files:
        raise PgpsError(f"results store {root} holds no sweeps yet; run a sweep first")
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (OSError, pa.ArrowException) as exc:
            raise PgpsError(f"results store file {f} is not readable Parquet ({str(exc).splitlines()[0][:120]}); "
                            "move it out of the store, or rerun 'pgps-tune export' for its sweep") from None
        missing = [c for c in STORE_COLUMNS if c not in names]
        if missing:
            raise PgpsError(f"results store file {f} lacks columns {missing}; it was not written by pgps-tune: "
                            "move it out of the store")
    part = pads.partitioning(pa.schema([("dataset", pa.string()), ("sweep", pa.string())]), flavor="hive")
    try:
        return pads.dataset([str(f) for f in files], format="parquet", partitioning=part,
                            partition_base_dir=str(root)).to_table(columns=[*STORE_COLUMNS, "dataset", "sweep"])
    except (OSError, pa.ArrowException) as exc:
        raise PgpsError(f"results store {root} cannot be read ({str(exc).splitlines()[0][:160]}); move files "
                        "that pgps-tune did not write out of it") from None


def best_schedule(dataset: str, store: str | Path | None = None, objective: str = "max_dice") -> sch.Schedule:
    """The best completed schedule for ``dataset`` over every stored sweep with ``objective``."""
    import pyarrow.compute as pc

    t = load_store(store)
    same = pc.equal(pc.utf8_lower(t["dataset"]), dataset.lower())  # "hippocampus" finds "Hippocampus"
    mask = pc.and_(pc.and_(same, pc.equal(t["objective"], objective)), t["completed"])
    rows = t.filter(mask).to_pylist()
    best = pick_best(rows)
    if best is None:
        known = sorted(set(t["dataset"].to_pylist()))
        raise PgpsError(f"no completed '{objective}' trials for dataset {dataset!r} in the store; known: {known}")
    dataset = best["dataset"]  # as the sweep stored it
    s = _schedule_of(best, f"sweep {best['sweep']} of the results store")
    return sch.Schedule(s.stages, s.final_patch, s.pools, s.baseline_batch_size, meta={
        **s.meta, **trainer_meta(best["params"]), "dataset": dataset, "objective": objective, "score": best["score"],
        "val_dice": best["final_dice"], "sweep": best["sweep"], "trial_id": best["trial_id"],
    })
