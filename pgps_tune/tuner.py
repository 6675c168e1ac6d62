"""Schedule search with Ray Tune, ASHA and Optuna. The only module that imports Ray.

A sweep has two phases, each a Tune experiment under the storage location:

1. ``references``: the constant baseline and the paper schedule, trained to the
   end (no early stopping), so every sweep states its gain over both and the
   ``cheapest_within`` objective knows the baseline's Dice.
2. ``search``: ``num_samples`` trials sampled from the space by Optuna (TPE or
   random) or walked as a grid, early-stopped by ASHA.

ASHA's clock is ``baseline_iterations`` by default: voxels processed divided by
the baseline's voxels per iteration.  A curriculum on small patches therefore
reaches a rung only after it has spent as much compute as the baseline had
at that rung, and every validation is at the final patch size, so rungs
compare trials at equal compute on the same task.  By default (``asha.judge:
final_stage``) ASHA only sees validations made once a trial trains at the final
patch: before that, a curriculum's Dice at the final patch says little about
where it ends (measured in docs/BENCHMARKS.md), so a trial is first judged at
the first rung it passes in its last stage.  Trials that ASHA stops are told
to Optuna as PRUNED, so TPE does not learn from truncated runs as if they had
finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pgps_tune.config import patch_multiple
from pgps_tune.errors import PgpsError, atomic_write_text
from pgps_tune.space import (
    DefineByRun,
    SearchSpace,
    check_space_against_plan,
    objective_score,
    reference_configs,
    schedule_from_params,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

PHASES = ("references", "search")
SWEEP_FILE = "sweep.json"
FAULT_ENV = "PGPS_INJECT_FAILURE"  # testing aid: "EPOCH" or "EPOCH:once"


@dataclass
class SweepOptions:
    space: SearchSpace
    data: str
    out: Path
    num_samples: int | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None
    storage: str | None = None
    resume: bool = False
    cache_root: str | None = None
    results_store: str | None = None
    quiet: bool = False
    max_failures: int | None = None  # retries of a failed trial; default: the space's budget.max_failures


# -- the trial --------------------------------------------------------------------------


def _maybe_inject_failure(epoch: int, marker: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, _, once = spec.partition(":")
    if epoch >= int(at) and not (once and marker.exists()):
        marker.touch()
        raise RuntimeError(f"injected failure at epoch {epoch} ({FAULT_ENV}={spec})")


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: build the schedule from ``config`` and train it, reporting each validation."""
    import torch

    from pgps_tune.data import prepare, split
    from pgps_tune.trainer import TrainConfig, Trainer

    b = setup["budget"]
    torch.set_num_threads(max(1, int(setup["cpus_per_trial"])))
    ds = prepare(setup["data"], cache_root=setup["cache_root"], synthetic_cases=b["synthetic_cases"],
                 synthetic_shape=b["synthetic_shape"])
    s = schedule_from_params(config, setup["final_patch"], setup["pools"], b["batch_size"], b["epochs"],
                             patch_multiple(b["network"], setup["pools"], b["token_size"]))
    trial_dir = Path(tune.get_context().get_trial_dir())
    run_dir = trial_dir / "run"
    checkpoint = tune.get_checkpoint()
    if run_dir.exists():
        shutil.rmtree(run_dir)  # only the last reported checkpoint counts
    if checkpoint:
        checkpoint.to_directory(str(run_dir))
    objective = setup["objective"]
    voxel_fraction = s.voxel_fraction()
    base = {"schedule": json.dumps(s.to_dict()), "n_stages": len(s.stages),
            "schedule_voxel_fraction": voxel_fraction, "role": config.get("role", "search")}
    if (objective["type"] == "dice_under_budget" and config.get("role", "search") == "search"
            and voxel_fraction > objective["voxel_budget"] + 1e-9):
        # over the voxel budget: known before training, so do not spend compute on it
        tune.report({**base, "score": -1.0, "val_dice": 0.0, "completed": True, "infeasible": True,
                     "baseline_iterations": 0.0, "epoch": 0})
        return
    cfg = TrainConfig.for_trial(b, config, device="cuda" if setup["gpus_per_trial"] > 0 else "cpu",
                                threads=max(1, int(setup["cpus_per_trial"])))
    train_cases, val_cases = split(ds, b["val_fraction"], b["split_seed"])

    def report(r: dict[str, Any]) -> None:
        _maybe_inject_failure(r["epoch"], trial_dir / ".failed_once")
        score = objective_score(objective, r["val_dice"], voxel_fraction, setup.get("target_dice"))
        judged = setup.get("asha_judge", "final_stage") == "always" or r["stage"] == len(s.stages) - 1
        metrics = {
            **base,
            "score": score,
            # what ASHA compares: absent until the trial trains at the final patch (asha.judge: final_stage)
            **({"rung_score": score} if judged else {}),
            "val_dice": r["val_dice"], "best_val_dice": r["best_val_dice"], "epoch": r["epoch"],
            "stage": r["stage"], "train_loss": r["train_loss"], "train_time_s": r["train_time_s"],
            "voxels_processed": r["voxels_processed"],
            "baseline_iterations": r["baseline_equivalent_iterations"],
            "completed": r["completed"],
            **{f"dice_{k}": v for k, v in r["val_dice_per_class"].items()},
        }
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

    trainer = Trainer(ds, train_cases, val_cases, s, cfg, run_dir, callback=report)
    trainer.fit(resume=(run_dir / "checkpoint.pt").is_file())


# -- search algorithms ------------------------------------------------------------------


class PrunedAwareOptunaSearch(OptunaSearch):
    """Tells Optuna PRUNED for trials that ASHA stopped, instead of COMPLETE."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and not result.get("completed", False) and trial_id in self._ot_trials:
            if trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


class ListSearcher(Searcher):
    """Suggests a fixed list of configurations in order (the references, a grid)."""

    def __init__(self, configs: list[dict[str, Any]], metric: str = "score", mode: str = "max") -> None:
        super().__init__(metric=metric, mode=mode)
        self.configs = configs
        self.given: dict[str, int] = {}

    def suggest(self, trial_id: str):
        if trial_id not in self.given:
            if len(self.given) >= len(self.configs):
                return Searcher.FINISHED
            self.given[trial_id] = len(self.given)
        return dict(self.configs[self.given[trial_id]])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"configs": self.configs, "given": self.given}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.configs, self.given = state["configs"], state["given"]


def asha_settings(space: SearchSpace) -> dict[str, Any]:
    b, a = space.budget, space.asha
    max_t = {"baseline_iterations": b.epochs * b.iterations_per_epoch, "epoch": b.epochs,
             "training_iteration": max(1, b.epochs // b.val_every)}[a.time_attr]
    grace = max(1, round(a.grace_fraction * max_t))
    return {"time_attr": a.time_attr, "max_t": max_t, "grace_period": min(grace, max_t),
            "reduction_factor": a.reduction_factor, "brackets": a.brackets}


def rung_milestones(settings: dict[str, Any]) -> list[float]:
    """The rungs ASHA's first bracket compares trials at (same formula as Ray's)."""
    import math

    g, m, rf = settings["grace_period"], settings["max_t"], settings["reduction_factor"]
    n = int(math.log(m / g) / math.log(rf) + 1)
    return [g * rf**k for k in range(n)]


# -- cluster, storage ------------------------------------------------------------------------


@contextlib.contextmanager
def _stderr_silenced():
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        with _stderr_silenced():  # Ray's C++ client logs each failed connection attempt
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ...
                failure = exc
            else:
                return
        raise PgpsError(
            f"no Ray cluster reachable at --address {address} ({type(failure).__name__}); start one with "
            "'ray start --head', copy its ~/.ray/auth_token to this machine, or leave out --address"
        )
    ray.init(  # "local": a new Ray of our own, even where another one runs on this machine
        address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level=logging.ERROR,
        object_store_memory=128 * 1024**2, log_to_driver=False,
    )


def check_resources(cpus: float, gpus: float, max_concurrent: int | None) -> None:
    import ray

    have = ray.cluster_resources()
    have_cpu, have_gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus <= 0:
        raise PgpsError("--cpus-per-trial must be > 0")
    if cpus > have_cpu:
        raise PgpsError(f"--cpus-per-trial {cpus:g} but the cluster has {have_cpu:g} CPUs; ask for at most that")
    if gpus > have_gpu:
        raise PgpsError(
            f"--gpus-per-trial {gpus:g} but the cluster has {have_gpu:g} GPUs; "
            "use --gpus-per-trial 0 or join a cluster with GPUs (--address)"
        )
    if max_concurrent is not None and max_concurrent < 1:
        raise PgpsError("--max-concurrent must be >= 1")


def resolve_storage(storage: str | None, out: Path):
    """(pyarrow filesystem or None, storage path) for Tune; checks that it can be written."""
    import pyarrow.fs as pafs

    if storage is None:
        path = (out / "ray").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return None, str(path)
    try:
        if "://" in storage:
            fs, path = pafs.FileSystem.from_uri(storage)
        else:
            fs, path = pafs.LocalFileSystem(), str(Path(storage).resolve())
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.pgps_write_test"
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:
        raise PgpsError(
            f"cannot write to --storage {storage} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "give a writable local path or s3:// / gs:// URI with credentials in the environment"
        ) from None
    return (None if isinstance(fs, pafs.LocalFileSystem) else fs), path


# -- progress ----------------------------------------------------------------------------------


class Progress(tune.Callback):
    """One line per trial start and end on stderr, instead of Tune's large tables."""

    def __init__(self, total: int, phase: str, quiet: bool) -> None:
        self.total, self.phase, self.quiet = total, phase, quiet
        self.done = 0
        self.t0 = time.time()

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.t0:6.0f}s] {self.phase}: {text}", file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"start {trial.trial_id} {_short(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        how = "completed" if r.get("completed") else "stopped early"
        self._line(f"{self.done}/{self.total} {trial.trial_id} {how}: dice {r.get('val_dice', float('nan')):.4f} "
                   f"score {r.get('score', float('nan')):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self._line(f"{self.done}/{self.total} {trial.trial_id} FAILED (see trials.parquet 'error')")


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


# -- the sweep ----------------------------------------------------------------------------------


def trial_setup(space: SearchSpace, data: str, cache_dir: Path, final_patch, pools, cpus: float,
                gpus: float) -> dict[str, Any]:
    """What every trial of a sweep shares (plain data, passed to trials through the object store)."""
    return {
        "data": str(data), "cache_root": str(Path(cache_dir).parent), "budget": asdict(space.budget),
        "final_patch": tuple(final_patch), "pools": tuple(pools), "objective": asdict(space.objective),
        "cpus_per_trial": cpus, "gpus_per_trial": gpus, "asha_judge": space.asha.judge,
    }


class ComputeBudget(tune.Stopper):
    """Stop the whole phase once its trials together processed ``max_t`` baseline iterations' worth of voxels."""

    def __init__(self, max_t: float) -> None:
        self.max_t = max_t
        self.spent: dict[str, float] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.spent[trial_id] = float(result.get("baseline_iterations", 0.0))
        return False

    def stop_all(self) -> bool:
        return sum(self.spent.values()) >= self.max_t


def _run_phase(phase: str, opts: SweepOptions, setup: dict[str, Any], storage_fs, storage_path: str,
               name: str, searcher, num_samples: int, scheduler, stopper=None) -> None:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    path = f"{storage_path.rstrip('/')}/{name}"
    restorable = tune.Tuner.can_restore(path, storage_filesystem=storage_fs)
    if restorable:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                max_concurrent_trials=opts.max_concurrent, reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs, verbose=0, stop=stopper,
                failure_config=tune.FailureConfig(
                    max_failures=opts.space.budget.max_failures if opts.max_failures is None else opts.max_failures
                ),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[Progress(num_samples, phase, opts.quiet)],
            ),
        )
    tuner.fit()


def sweep(opts: SweepOptions) -> dict[str, Any]:
    """Run (or resume) a whole sweep; write the exports; return the summary."""
    from pgps_tune.data import plan_patch, prepare
    from pgps_tune.results import export_sweep

    space, b = opts.space, opts.space.budget
    out = opts.out
    meta_path = out / SWEEP_FILE
    if meta_path.exists() and not opts.resume:
        raise PgpsError(f"{out} already holds a sweep; add --resume to continue it, or choose a new --out")
    if opts.resume and not meta_path.exists():
        raise PgpsError(f"--resume given but {meta_path} does not exist; run without --resume to start")
    if opts.data != "synthetic":
        opts.data = str(Path(opts.data).resolve())  # trials run in their own folders, maybe on other nodes
    if opts.cache_root:
        opts.cache_root = str(Path(opts.cache_root).resolve())
    ds = prepare(opts.data, cache_root=opts.cache_root, synthetic_cases=b.synthetic_cases,
                 synthetic_shape=b.synthetic_shape)  # once per sweep; trials memory-map this cache
    plan = plan_patch(ds.median_shape, ds.spacing)
    final = tuple(b.final_patch) if b.final_patch else plan.final_patch
    pools = tuple(b.pools) if b.pools else plan.pools
    check_space_against_plan(space, final, pools)
    storage_fs, storage_path = resolve_storage(opts.storage, out)
    num_samples = opts.num_samples or space.search.num_samples
    if space.search.algorithm == "grid":
        num_samples = len(space.grid())
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # keep the experiment snapshot current
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # ASHA's rung_score is absent from a trial's reports until it trains at the final patch
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    start_ray(opts.address)
    check_resources(opts.cpus_per_trial, opts.gpus_per_trial, opts.max_concurrent)

    name = out.resolve().name
    meta = {
        "format_version": 1, "sweep": name, "space": space.source, "space_name": space.name, "dataset": ds.name,
        "data": str(opts.data), "cache_dir": str(ds.cache_dir), "final_patch": list(final), "pools": list(pools),
        "storage": opts.storage, "storage_path": storage_path,
        "experiments": {p: f"{name}-{p}" for p in PHASES if p == "search" or space.search.references},
        "num_samples": num_samples,
        "objective": asdict(space.objective), "asha": asha_settings(space),
        "cpus_per_trial": opts.cpus_per_trial, "gpus_per_trial": opts.gpus_per_trial,
        "started": meta_path.exists() and json.loads(meta_path.read_text()).get("started") or time.time(),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    setup = trial_setup(space, opts.data, ds.cache_dir, final, pools, opts.cpus_per_trial, opts.gpus_per_trial)
    refs = reference_configs(space)
    if space.search.references:
        _run_phase("references", opts, setup, storage_fs, storage_path, meta["experiments"]["references"],
                   ListSearcher(refs), len(refs), None)
    if space.objective.type == "cheapest_within":
        from pgps_tune.results import collect_rows

        baseline = next(r for r in collect_rows(meta, phases=("references",)) if r["role"] == "baseline")
        setup["target_dice"] = baseline["final_dice"] - space.objective.tolerance
        meta["target_dice"] = setup["target_dice"]
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")

    from ray.tune.schedulers import ASHAScheduler

    scheduler = (ASHAScheduler(metric="rung_score", mode="max", **asha_settings(space)) if space.asha.enabled
                 else None)
    if space.search.algorithm == "grid":
        searcher = ListSearcher(space.grid())
    else:
        sampler = space.optuna_sampler()
        searcher = PrunedAwareOptunaSearch(DefineByRun(space), metric="score", mode="max", sampler=sampler)
    stopper = None
    if space.search.max_compute > 0:
        stopper = ComputeBudget(space.search.max_compute * b.epochs * b.iterations_per_epoch)
    _run_phase("search", opts, setup, storage_fs, storage_path, meta["experiments"]["search"],
               searcher, num_samples, scheduler, stopper)
    return export_sweep(out, out, results_store=opts.results_store)
