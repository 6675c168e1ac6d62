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
the first rung it passes in its last stage (random patch-size sampling trains the
same mix throughout: judged from the first rung).  Trials that ASHA stops are told
to Optuna as PRUNED, so TPE does not learn from truncated runs as if they had
finished; a trial whose loss diverges ends at once, failed, and is told as FAIL.

With ``asha.fidelity: compressed`` the search phase is successive halving over
budgets instead (:func:`run_compressed`): one Tune experiment per rung, each
schedule trained whole with fewer iterations per epoch, the best promoted.

Ctrl-C or SIGTERM stops a sweep cleanly: Tune stops the trials and saves the
experiment state, the sweep raises :class:`SweepInterrupted`, nothing is
exported, and ``--resume`` continues every unfinished trial from its last
checkpoint.  The trials' results are read back as plain JSON (never unpickled)
into :class:`pgps_tune.results.TrialRecord` s; ``results`` turns them into exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import heapq
import io
import json
import logging
import math
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pgps_tune.asha import (
    AshaSettings,
    Rung,
    compressed_ladder,
    main_effects_ranking,
    main_effects_terms,
    rung_budget,
    survivors,
)
from pgps_tune.config import ADDED_LATER, patch_multiple
from pgps_tune.errors import (
    MAX_JSON_BYTES,
    DivergedError,
    JsonTooBig,
    PgpsError,
    TooLarge,
    brief,
    folder_lock,
    loads_json,
    read_at_most,
    read_file,
    stop_signals_held,
)
from pgps_tune.nnunet import NnunetPlan, SweepDataset, tuned_on
from pgps_tune.results import (
    BEST,
    FOLDER_KEY,
    META_FORMAT,
    PARETO,
    PHASES,
    PICK,
    SUMMARY,
    SWEEP_FILE,
    SWEEP_LOCK,
    TRIALS,
    TrialRecord,
    check_store_writable,
    confirm_candidates,
    confirmation_flags,
    export_sweep,
    full_fidelity,
    pick_rule,
    read_meta,
    require_finished,
    shared_storage,
    stored_trials,
    training_key,
    trial_rows,
    trial_status,
    tune_storage,
    write_meta,
)
from pgps_tune.results import describe_confirmation as _describe
from pgps_tune.schedule import plural
from pgps_tune.space import (
    DefineByRun,
    SearchSpace,
    check_ladder,
    check_nnunet_splits,
    check_space_against_plan,
    check_space_splits,
    check_splits_exists,
    confirm_references,
    distinct_schedules,
    grid_sample,
    objective_score,
    over_voxel_budget,
    reference_configs,
    schedule_from_params,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

FORMAT_VERSION = META_FORMAT  # sweep.json: bumped in results, whose read_meta refuses a newer one


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
    autoscaling: bool = False  # the cluster starts nodes when trials wait: no live node need fit a trial
    pending_timeout: float | None = None  # seconds trials may wait with no node that fits one (PENDING_TIMEOUT_S)
    storage: str | None = None
    resume: bool = False
    cache_root: str | None = None
    results_store: str | None = None
    quiet: bool = False
    max_failures: int | None = None  # retries of a failed trial; default: the space's budget.max_failures
    warm_start: bool = False  # seed the study with stored trials of the same dataset and space
    progress: str = "lines"  # Progress.MODES: live (refreshing table), lines, json, none (quiet wins)
    mlflow: str | None = None  # MLflow tracking URI: every trial is logged there too
    # the MLflow experiment of the whole sweep (check() settles it: the environment's, or the sweep's name)
    mlflow_experiment: str | None = field(default=None, init=False, compare=False)
    # the tags of all its MLflow runs, as sweep.json keeps them (set when its phases start; see mlflow_sweep_tags)
    mlflow_tags: dict[str, str] | None = field(default=None, init=False, compare=False)
    # the nnU-Net plans (path, dataset id or name, or as read already): budget.trainer nnunet trains on it
    nnunet_plans: str | NnunetPlan | None = None
    nnunet_configuration: str = "3d_fullres"
    _nnunet: SweepDataset | None = field(default=None, init=False, repr=False, compare=False)

    def check(self) -> None:
        """Refuse meaningless numbers before anything starts."""
        if not (math.isfinite(self.cpus_per_trial) and self.cpus_per_trial > 0):
            raise PgpsError(f"--cpus-per-trial must be a finite number > 0, got {self.cpus_per_trial:g}")
        if not (math.isfinite(self.gpus_per_trial) and self.gpus_per_trial >= 0):
            raise PgpsError(f"--gpus-per-trial must be a finite number >= 0, got {self.gpus_per_trial:g}")
        if self.pending_timeout is not None and not (math.isfinite(self.pending_timeout) and self.pending_timeout > 0):
            raise PgpsError(f"--pending-timeout must be a finite number of seconds > 0, got {self.pending_timeout:g}")
        if self.address:
            check_address(self.address)
        elif self.autoscaling:
            raise PgpsError("--autoscaling is for a Ray cluster whose autoscaler starts nodes when trials wait; give "
                            "it with --address, or leave it out")
        elif self.pending_timeout is not None:  # a Ray of the sweep's own always has a node that fits a trial
            raise PgpsError("--pending-timeout is for a Ray cluster, where trials may wait for a node that can run "
                            "them; give it with --address, or leave it out")
        for flag, v, least in (("--num-samples", self.num_samples, 1), ("--max-concurrent", self.max_concurrent, 1),
                               ("--max-failures", self.max_failures, 0)):
            if v is not None and v < least:
                raise PgpsError(f"{flag} must be >= {least}, got {v}")
        if self.warm_start and self.space.search.algorithm == "grid":
            raise PgpsError("--warm-start seeds Optuna's sampler, but this space walks a grid; leave out --warm-start "
                            "or use search.algorithm tpe, random or nsga2")
        if self.warm_start and self.space.asha.fidelity == "compressed":
            raise PgpsError("--warm-start adds full-budget scores to a study that, with asha.fidelity compressed, "
                            "ranks low-fidelity runs; leave out --warm-start or use asha.fidelity partial")
        check_space_splits(self.space)
        check_ladder(self.space.asha, self.space.budget, str(self.space.source))  # after --iterations-per-epoch
        check_screening(self.space, self.search_samples())  # after --num-samples
        if self.mlflow is not None:
            self.mlflow_experiment = _check_mlflow(self.mlflow, self.out, self.resume)
        if self.space.budget.trainer == "nnunet":
            if not self.nnunet_plans:
                raise PgpsError("budget.trainer nnunet trains on nnU-Net's preprocessed data; give --nnunet-plans "
                                "PLANS (the dataset's nnUNetPlans.json, or its id or name) and --configuration")
            self.nnunet_check()

    def search_samples(self) -> int:
        """The search phase's trials: ``--num-samples``, else ``search.num_samples``; a grid walks all of itself,
        and main-effects screening draws at most all of it."""
        space = self.space
        n = self.num_samples or space.search.num_samples
        if space.search.algorithm != "grid":
            return n
        n_grid = len(space.grid())
        return min(n, n_grid) if space.asha.promote == "main_effects" else n_grid

    def nnunet_check(self) -> SweepDataset:
        """Refuse, before Ray starts, an nnU-Net sweep whose plans, preprocessed data or folds are missing;
        returns its :class:`pgps_tune.nnunet.SweepDataset`."""
        from pgps_tune import nnunet

        if self._nnunet is not None:  # checked (and the plans read) once per sweep
            return self._nnunet
        ds = nnunet.sweep_dataset(self.nnunet_plans, self.nnunet_configuration)
        b, c, n = self.space.budget, self.space.confirm, ds.folds
        if b.nnunet_fold >= n:
            raise PgpsError(f"budget.nnunet_fold {b.nnunet_fold}: nnU-Net's split of {ds.plan.dataset} has folds 0 "
                            f"to {n - 1}; pick one of them")
        if c.enabled and c.folds and c.folds > n:
            raise PgpsError(f"confirm.folds {c.folds}: nnU-Net's split of {ds.plan.dataset} has {n} folds; confirm "
                            f"on at most {n} (or on seeds)")
        self._nnunet = ds
        return ds


# MLflow retries a request to an HTTP tracking server 7 times with a doubling wait (about 4 minutes) and waits
# 120 s for each answer: a server that is down would stall a sweep that long at each call.  Where the environment
# does not say otherwise, a sweep gives up sooner; the sweep never depends on the tracking server.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MLFLOW_EXPERIMENT = "mlflow_experiment"  # sweep.json: the MLflow experiment of all the sweep's runs
MLFLOW_TAGS = "mlflow_tags"  # sweep.json: the tags that name the sweep on all its MLflow runs
MLFLOW_LOCATION = "pgps.sweep_location"  # the tag of every run of a sweep that says where its folder is now
MLFLOW_RUN_NAME_MAX = 250  # characters of a run name MLflow's SQL stores keep


def _mlflow_http_defaults() -> None:
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _check_mlflow(uri: str, out: Path, resume: bool) -> str:
    """The MLflow experiment the sweep in ``out`` logs to, all its runs: the one it started in (kept in
    sweep.json), else the one ``MLFLOW_EXPERIMENT_NAME`` or ``MLFLOW_EXPERIMENT_ID`` names (as MLflow reads
    them), else the sweep's name.  Refused, in one line and before any work: an --mlflow URI that MLflow is
    missing for, will not open, or cannot reach (one request to its store shows it answers), environment
    variables that name no experiment or two, and a deleted experiment, which MLflow keeps and lets no run
    into, nor one of the same name."""
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise PgpsError("--mlflow needs MLflow, which is not installed here; pip install 'pgps-tune[mlflow]'") from None
    _mlflow_http_defaults()
    before = read_meta(out) if resume and (out / SWEEP_FILE).is_file() else {}
    kept = kept_experiment(before)
    env_name, env_id = os.environ.get("MLFLOW_EXPERIMENT_NAME") or None, os.environ.get("MLFLOW_EXPERIMENT_ID") or None
    client = MlflowClient(tracking_uri=uri)
    named = kept or env_name or before.get("sweep") or out.resolve().name
    try:
        found = client.get_experiment_by_name(named)
    except Exception as exc:  # MlflowException, requests' errors and the errors of store plugins
        first = _mlflow_cause(exc)
        hint = ("; for a file store set MLFLOW_ALLOW_FILE_STORE=true, or use sqlite:///PATH/mlflow.db"
                if "file" in first.lower() else "")
        raise PgpsError(f"--mlflow {uri}: MLflow cannot use it ({first}); start the tracking server, or give a "
                        f"tracking URI it reaches, e.g. sqlite:///PATH/mlflow.db or http://HOST:PORT{hint}") from None
    wanted, by_id = env_name, None
    if env_id:
        try:
            by_id = client.get_experiment(env_id)
        except MlflowException:  # the store answered the request above: it has no such experiment
            if not kept:
                raise PgpsError(f"MLFLOW_EXPERIMENT_ID {env_id}: --mlflow {uri} has no experiment of that id; "
                                "unset it, or set it to an experiment's id there (or MLFLOW_EXPERIMENT_NAME to a "
                                "name)") from None
        if env_name and not kept and (by_id is None or by_id.name != env_name):
            raise PgpsError(f"MLFLOW_EXPERIMENT_NAME {env_name!r} and MLFLOW_EXPERIMENT_ID {env_id} name two MLflow "
                            "experiments, and a sweep logs to one; unset one of them")
        wanted = wanted or (by_id.name if by_id else None)
    experiment = named if kept or not by_id else by_id.name
    if wanted and kept and wanted != kept:
        print(f"pgps-tune: note: this sweep logs to the MLflow experiment {kept!r}, where it started, not to "
              f"{wanted!r} ({'MLFLOW_EXPERIMENT_NAME' if env_name else 'MLFLOW_EXPERIMENT_ID'})", file=sys.stderr,
              flush=True)
    found = found if experiment == named else by_id
    if found is not None and found.lifecycle_stage == "deleted":
        why, other = (("where the sweep started", "") if kept else
                      ("MLFLOW_EXPERIMENT_NAME", ", or set MLFLOW_EXPERIMENT_NAME otherwise") if env_name else
                      (f"MLFLOW_EXPERIMENT_ID {env_id}", ", or set MLFLOW_EXPERIMENT_ID otherwise") if env_id else
                      ("named after its folder", ", or name the sweep folder otherwise"))
        raise PgpsError(f"--mlflow {uri}: the sweep's experiment {experiment!r} ({why}) was deleted and MLflow "
                        f"takes no runs into it; restore it in MLflow (experiment id {found.experiment_id}) or "
                        f"remove it for good (mlflow gc){other}")
    return experiment


def kept_experiment(before: dict[str, Any]) -> str | None:
    """The MLflow experiment of the sweep whose sweep.json is ``before``: null if it never logged to MLflow;
    its name if it started before sweep.json said (Ray's logger in its Tune state logs there)."""
    return before.get(MLFLOW_EXPERIMENT, before.get("sweep"))


def mlflow_tracked(opts: SweepOptions, meta: dict[str, Any], before: dict[str, Any] | None) -> None:
    """Keep in ``meta`` (the sweep.json to write) the MLflow experiment and the tags of all the sweep's runs, for
    its resumes and confirmations (its Tune state goes on logging there), and give them to ``opts``; where the
    sweep ran before (``before``: its sweep.json then), maybe elsewhere, its runs say where it is now."""
    meta[MLFLOW_EXPERIMENT] = opts.mlflow_experiment or kept_experiment(before or {})
    meta[MLFLOW_TAGS] = opts.mlflow_tags = mlflow_sweep_tags(opts.out, before)  # a moved sweep's keep theirs
    if opts.mlflow and before:
        try:
            relocate_mlflow_runs(opts.mlflow, opts.mlflow_experiment, opts.out, meta)
        except Exception as exc:  # the tracking server never stops the sweep
            _mlflow_failed("tagging the sweep's runs with its folder", exc)


def mlflow_experiment_id(client, name: str) -> str:
    """The id of the MLflow experiment ``name``, made where it is new."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def _mlflow_cause(exc: BaseException) -> str:
    """The first sentence of an MLflow error, on one line; for an HTTP request, what the connection got (its
    message quotes the whole retry report)."""
    text = " ".join(str(exc).split())
    if errno := re.search(r"\[Errno -?\d+\] [^'\"()]+", text):
        return f"{text.split(' failed ')[0]}: {errno.group(0).strip()}"[:200]
    return text.split(". ")[0].split(" [SQL:")[0][:200]


def _mlflow_failed(what: str, exc: BaseException,
                   then: str = "the sweep goes on without it and keeps its own results in its folder") -> None:
    print(f"pgps-tune: note: MLflow logging failed ({what}: {_mlflow_cause(exc)}); {then}", file=sys.stderr,
          flush=True)


class SweepInterrupted(Exception):
    """SIGINT or SIGTERM stopped the sweep; its state is saved and ``--resume`` continues it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exporting = False  # the trials were done: it came while the exports were written


# -- the trial --------------------------------------------------------------------------


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: build the schedule from ``config`` and train it, reporting each validation.

    The trainer works in a scratch folder of its own, outside the trial folder that Tune
    uploads as artifacts: each report hands Tune a copy of it as the checkpoint, and a
    restarted trial rebuilds it from the last one.
    """
    import torch

    from pgps_tune.data import prepare

    # A local Ray of ours starts with SIGTERM blocked (start_ray) and this worker inherited the mask; so
    # would what the trial starts (masks survive fork and exec), and multiprocessing's Pool.terminate()
    # (nnU-Net's export pool) would wait on workers its SIGTERM never reaches.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    b = setup["budget"]
    torch.set_num_threads(max(1, int(setup["cpus_per_trial"])))
    nnunet_trainer = b["trainer"] == "nnunet"
    ds = None if nnunet_trainer else prepare(setup["data"], cache_root=setup["cache_root"],
                                             synthetic_cases=b["synthetic_cases"], synthetic_shape=b["synthetic_shape"])
    epochs = int(config.get("epochs", b["epochs"]))  # a confirmation may train longer than the search
    try:
        s = schedule_from_params(config, setup["final_patch"], setup["pools"], b["batch_size"], epochs,
                                 None if nnunet_trainer else patch_multiple(b["network"], setup["pools"],
                                                                            b["token_size"]))
    except PgpsError as exc:
        # the same parameters give the same invalid schedule on a retry: end the trial here, failed (as diverged)
        tune.report({"diverged": True, "error": f"invalid schedule: {exc}", "completed": False, "epoch": 0,
                     "role": config.get("role", "search"), "voxels_processed": 0, "baseline_iterations": 0.0})
        return
    objective = setup["objective"]
    voxel_fraction = s.voxel_fraction()
    role = config.get("role", "search")
    base = {"schedule": json.dumps(s.to_dict()), "n_stages": len(s.stages),
            "schedule_voxel_fraction": voxel_fraction, "role": role,
            **({"fidelity": setup["fidelity"], "rung": setup["rung"]} if "fidelity" in setup else {})}
    if role == "search" and over_voxel_budget(objective, voxel_fraction):
        # over the voxel budget: known before training, so do not spend compute on it
        tune.report({**base, "score": -1.0, "val_dice": 0.0, "completed": True, "infeasible": True,
                     "baseline_iterations": 0.0, "epoch": 0})
        return
    with tempfile.TemporaryDirectory(prefix="pgps-trial-") as scratch:
        if nnunet_trainer:
            _train_nnunet(config, setup, s, base, Path(scratch) / "run")
        else:
            _train(config, setup, ds, s, base, Path(scratch) / "run")


# The numbers a trial reports (run_trial, _metrics, the failed and infeasible reports), and dice_<class>: what a
# trial's MLflow run logs of each report.  Tune adds its own bookkeeping to every result (pid, timestamp, done,
# training_iteration, time_this_iter_s, ...); of that only the trial's wall time, named as in trials.parquet.
TRIAL_METRICS = frozenset({
    "score", "rung_score", "val_dice", "best_val_dice", "epoch", "stage", "train_loss", "train_time_s",
    "patch_x", "patch_y", "patch_z", "voxels_processed", "baseline_iterations", "completed", "n_stages",
    "schedule_voxel_fraction", "fidelity", "rung", "diverged", "infeasible"})
TUNE_METRICS = {"time_total_s": "wall_time_s"}


def _metrics(r: dict[str, Any], base: dict[str, Any], setup: dict[str, Any], s) -> dict[str, Any]:
    """What a trial reports to Tune for one trainer result (pgps-tune's trainer or nnU-Net's)."""
    objective = setup["objective"]
    score = objective_score(objective, r["val_dice"], base["schedule_voxel_fraction"], setup.get("target_dice"))
    judged = setup["asha_judge"] == "always" or s.final_phase(r["stage"])
    return {
        **base,
        "score": score,
        # what ASHA compares: absent until the trial trains at the final patch (asha.judge: final_stage)
        **({"rung_score": score} if judged else {}),
        "val_dice": r["val_dice"], "best_val_dice": r["best_val_dice"], "epoch": r["epoch"],
        "stage": r["stage"], "train_loss": r["train_loss"], "train_time_s": r["train_time_s"],
        **{f"patch_{axis}": side for axis, side in zip("xyz", r["patch_size"])},  # the stage's patch sides
        "voxels_processed": r["voxels_processed"],
        "baseline_iterations": r["baseline_equivalent_iterations"],
        "completed": r["completed"],
        **{f"dice_{k}": v for k, v in r["val_dice_per_class"].items()},
    }


def _train_nnunet(config: dict[str, Any], setup: dict[str, Any], s, base: dict[str, Any], run_dir: Path) -> None:
    """A trial of ``budget.trainer: nnunet``: the schedule trained by nnU-Net's own trainer on one of its folds.

    nnU-Net's preprocessing, augmentation, network, loss and validation; the budget's epochs and
    iterations.  Intermediate reports carry nnU-Net's pseudo Dice (its validation iterations, at the
    final patch), the last one the Dice of its sliding-window validation of the fold.  A confirmation
    repeat on a fold trains that fold of nnU-Net's own split; one on a seed is another run
    (nnU-Net's training is not seeded).  The trial's checkpoint is nnU-Net's fold folder, attached
    to a report whenever nnU-Net wrote a new checkpoint (every stage boundary), so a retried trial
    continues from the last stage it finished.
    """
    from pgps_tune import nnunet

    b, nn = setup["budget"], setup["nnunet"]
    base = {**base, "node_id": ray.get_runtime_context().get_node_id(), "trainer": "nnunet"}
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        checkpoint.to_directory(str(run_dir))
    resume = checkpoint is not None and any(run_dir.rglob("checkpoint_*.pth"))
    fold = int(config["fold"]) if "fold" in config else int(b["nnunet_fold"])
    # the exported schedule says where it was tuned (it carries no pgps-tune recipe: nnU-Net trained it)
    trained = {**nn, "fold": fold, "iterations_per_epoch": int(b["iterations_per_epoch"])}
    base["schedule"] = json.dumps(dataclasses.replace(s, meta={**s.meta, "nnunet_trainer": trained}).to_dict())
    seen: dict[Path, float] = {p: p.stat().st_mtime for p in run_dir.rglob("checkpoint_*.pth")}

    def report(r: dict[str, Any]) -> None:
        now = {p: p.stat().st_mtime for p in run_dir.rglob("checkpoint_*.pth")}
        fresh = r["completed"] or any(seen.get(p) != m for p, m in now.items())
        seen.clear()
        seen.update(now)
        metrics = _metrics(r, base, setup, s)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(run_dir)) if fresh else None)

    nnunet.train_trial(nn["plans"], nn["configuration"], fold, s, run_dir, report,
                       epochs=s.epochs, iterations_per_epoch=int(b["iterations_per_epoch"]),
                       val_iterations_per_epoch=int(b["nnunet_val_iterations"]), report_every=int(b["val_every"]),
                       device="cuda" if setup["gpus_per_trial"] > 0 else "cpu",
                       processes=max(0, int(setup["cpus_per_trial"]) - 1), resume=resume)


TUNE_MEMORY_FIX = "lower --batch-size (or the space's budget.batch_size, or its batch_cap parameter)"


def _train(config: dict[str, Any], setup: dict[str, Any], ds, s, base: dict[str, Any], run_dir: Path) -> None:
    from pgps_tune.config import DataIdentity, Recipe, TrainConfig
    from pgps_tune.data import fold_split, split
    from pgps_tune.trainer import Trainer, check_batch_memory

    b = setup["budget"]
    base = {**base, "node_id": ray.get_runtime_context().get_node_id()}  # which machine ran it, for cluster faults
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        checkpoint.to_directory(str(run_dir))
    cfg = TrainConfig.for_trial(b, config, device="cuda" if setup["gpus_per_trial"] > 0 else "cpu",
                                threads=max(1, int(setup["cpus_per_trial"])))
    if "seed" in config:  # a confirmation repeat on its own seed
        cfg = dataclasses.replace(cfg, seed=int(config["seed"]))
    if "fold" in config:  # a confirmation repeat on its own cross-validation fold
        train_cases, val_cases = fold_split(ds, config["folds"], config["fold"], b["split_seed"], config.get("splits"))
    else:
        train_cases, val_cases = split(ds, b["val_fraction"], b["split_seed"])
    # the schedule reported carries the recipe it trains with, so its exports can train it again (a fold
    # repeat records the sweep's own split: a recipe names a split by its seed, not by a fold)
    recipe = Recipe(cfg, DataIdentity.of(ds, setup["data"], b["val_fraction"], b["split_seed"],
                                         b["synthetic_cases"], b["synthetic_shape"]))
    base = {**base, "schedule": json.dumps(dataclasses.replace(s, recipe=recipe).to_dict())}

    def report(r: dict[str, Any]) -> None:
        tune.report(_metrics(r, base, setup, s), checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

    check_batch_memory(s, cfg, TUNE_MEMORY_FIX)  # a failed trial that says why, not Ray's out-of-memory kill
    made = []
    trainer = Trainer(ds, train_cases, val_cases, s, cfg, run_dir, callback=lambda r: (made.append(1), report(r)))
    try:
        trainer.fit(resume=checkpoint is not None)
        last = trainer.state.history[-1] if trainer.state.history else None
        if not made and last is not None and last["completed"]:
            # restored from its final checkpoint (the driver died before it saw the last report):
            # say the final result again, or Tune would end the trial on an older, unfinished one
            report({**last, "best_val_dice": trainer.state.best_val_dice})
    except DivergedError as exc:
        # a retry from the last checkpoint would diverge again: end the trial here, failed, without a score
        tune.report({**base, "diverged": True, "error": str(exc), "completed": False,
                     "epoch": trainer.state.iteration // cfg.iterations_per_epoch,
                     "voxels_processed": trainer.voxels_processed,
                     "baseline_iterations": trainer.voxels_processed * s.epochs / s.baseline_voxels()})


# -- search algorithms ------------------------------------------------------------------


# -- vetting a Tune state before it is restored ----------------------------------------------------

# Tuner.restore unpickles the experiment's tuner.pkl, the searcher's state and the pickled parts of
# experiment_state-*.json.  Before it does, every pickle there is loaded once with an unpickler that
# only hands out classes of these packages (constructing one of them runs no code from the file) and
# the few functions Ray, Optuna and numpy really pickle; anything else (os.system, eval, ...) refuses
# the sweep.  The same idea as torch.load(weights_only=True) for checkpoints.
_TRUSTED_CLASS_ROOTS = ("ray", "optuna", "pgps_tune", "numpy", "pyarrow", "collections", "datetime", "uuid", "enum")
# ray.exceptions: the error.pkl Tune writes for a trial whose worker died (ActorDiedError: a SIGTERM to the
# whole job, the OOM killer, a lost node), which a resume must not refuse
_TRUSTED_RAY = ("ray.tune", "ray.train", "ray.air", "ray.exceptions")
_TRUSTED_FUNCTIONS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"), ("optuna.samplers._tpe.sampler", "default_weights"),
    # TPE keeps these in its state once past its startup trials
    ("optuna.samplers._tpe.sampler", "default_gamma"),
    ("optuna.samplers._tpe.sampler", "default_gamma_multiobjective"),
    ("ray.train._internal.storage", "_upload_to_fs_path"), ("copyreg", "_reconstructor"),
}
TRUST_ENV = "PGPS_TRUST_SWEEP"


class _Untrusted(Exception):
    """A pickle asked for a global outside the allow-list."""


class _VettingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        trusted_function = (module, name) in _TRUSTED_FUNCTIONS or (
            module.startswith("pyarrow.") and name.rsplit(".", 1)[-1] in ("_reconstruct", "_from_uri"))
        root_ok = module.split(".")[0] in _TRUSTED_CLASS_ROOTS and (
            not module.startswith("ray") or module.startswith(_TRUSTED_RAY))
        if trusted_function or root_ok:
            obj = super().find_class(module, name)
            if trusted_function or isinstance(obj, type):
                return obj
        raise _Untrusted(f"{module}.{name}")


def _pickles_in_json(value: Any) -> list[bytes]:
    """The pickled payloads (Ray's CLOUDPICKLE_FALLBACK) inside a JSON value, JSON-in-strings included.

    Iterative: the value comes from a file of a shared sweep folder, and its nesting (strings of
    JSON inside JSON included) must not be able to exhaust the stack.  A string too deeply nested or too
    large to inspect raises :class:`JsonTooBig` (Ray's own parser may still read it, and what it holds)."""
    found: list[bytes] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if v.get("_type") == "CLOUDPICKLE_FALLBACK" and isinstance(v.get("value"), str):
                found.append(bytes.fromhex(v["value"]))
            else:
                stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str) and v.lstrip()[:1] in ("{", "["):
            try:
                stack.append(loads_json(v))
            except JsonTooBig:
                raise
            except ValueError:
                pass  # not JSON: a plain string
    return found


def vet_tune_state(path: str, storage_fs=None) -> None:
    """Refuse (one line) a Tune experiment whose pickles ask for anything but data-like classes.

    ``PGPS_TRUST_SWEEP=1`` skips the check, for a sweep you trust whose state holds something
    this allow-list does not know.

    A failed trial's ``error.pkl`` holds the exception it raised, pickled with a class cloudpickle
    builds as it loads (``RayTaskError(RuntimeError)``: code, not data), so no allow-list can pass
    it; only Ray's result objects read it, and the error's text stays in ``error.txt`` beside it
    (what pgps-tune reports).  Such a file is set aside as ``error.pkl.set-aside`` instead of
    refusing the sweep: Tune then gives the text.
    """
    import pyarrow.fs as pafs

    if os.environ.get(TRUST_ENV) == "1":
        return
    fs = storage_fs or pafs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise PgpsError(f"cannot read the Tune state at {path} ({exc}); check --storage") from None
    for info in infos:
        name = info.base_name
        if info.type != pafs.FileType.File or name.startswith(".") or not (
                name.endswith(".pkl") or fnmatch.fnmatch(name, "experiment_state*.json")):
            continue  # hidden files are Ray's unfinished writes, which it never reads back
        try:
            with fs.open_input_stream(info.path) as fh:
                data = read_at_most(fh, MAX_JSON_BYTES)
        except TooLarge as exc:
            raise PgpsError(
                f"refused to resume: {info.path} is {exc}, more than a Tune state of pgps-tune holds, so what it "
                f"would unpickle cannot be checked; resume only sweeps you trust (set {TRUST_ENV}=1 to skip this "
                "check)") from None
        if name.endswith(".pkl"):
            blobs = [] if data.lstrip()[:1] in (b"{", b"[") else [data]  # our searchers save JSON there
        else:
            try:
                blobs = _pickles_in_json(loads_json(data))
            except JsonTooBig as exc:
                raise PgpsError(
                    f"refused to resume: {info.path} holds JSON beyond what pgps-tune inspects ({exc}), which a "
                    "Tune state of pgps-tune never does, so what it would unpickle cannot be checked; resume only "
                    f"sweeps you trust (set {TRUST_ENV}=1 to skip this check)") from None
            except ValueError:
                continue  # Tune cannot read it either, and JSON runs no code
        for blob in blobs:
            try:
                _VettingUnpickler(io.BytesIO(blob)).load()
            except _Untrusted as exc:
                if name == TRIAL_ERROR_PICKLE and info.path.rstrip("/").count("/") > path.rstrip("/").count("/") + 1:
                    _set_aside(fs, info.path)  # a trial's pickled error (see above): Tune reads error.txt then
                    break
                raise PgpsError(
                    f"refused to resume: {info.path} asks for {exc} when unpickled, which a Tune state of "
                    f"pgps-tune never holds; resume only sweeps you trust (set {TRUST_ENV}=1 to skip this check)"
                ) from None
            except Exception:  # damaged or version-specific, but nothing outside the allow-list was asked for
                continue


TRIAL_ERROR_PICKLE = "error.pkl"  # Tune's pickled copy of a failed trial's exception, in the trial's folder


def _set_aside(fs, file: str) -> None:
    """Rename a trial's ``error.pkl`` so that nothing unpickles it (:func:`vet_tune_state`)."""
    try:
        fs.move(file, f"{file}.set-aside")
    except OSError as exc:
        raise PgpsError(f"cannot set aside {file} ({brief(exc)}), the pickled error of a failed trial that a "
                        "resume must not load; make the sweep's folder writable, or delete that file") from None


# -- keeping the Tune state intact across kills -----------------------------------------------------

# Ray copies its state files (tuner.pkl, experiment_state-*.json, searcher state) from a staging
# folder to the experiment folder again and again, truncating each before writing it: a kill -9 or
# node loss mid-copy leaves a file Tuner.restore cannot read.  Every start keeps an intact copy of
# each state file in .pgps-state/ (Ray lists the folder non-recursively and never sees it), and a
# resume puts a damaged file back from that copy, or sets a damaged newest experiment state aside
# so that Ray resumes from the one before it.
STATE_COPIES = ".pgps-state"


def _state_file_infos(fs, path: str) -> list:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".") and (
        i.base_name.endswith(".pkl") or fnmatch.fnmatch(i.base_name, "experiment_state*.json"))]


def _intact(name: str, data: bytes) -> bool:
    """Whether a state file reads to its end: JSON that parses, or a pickle that reaches STOP (nothing is run)."""
    import pickletools

    if not data.strip():
        return False
    if name.endswith(".json") or data.lstrip()[:1] in (b"{", b"["):
        try:
            loads_json(data)
            return True
        except ValueError:
            return False
    try:
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:  # "pickle exhausted before seeing STOP" and other cut-short forms
        return False


def _read_bytes(fs, path: str) -> bytes | None:
    """The bytes of a state file of a sweep (:func:`_read_stream`), None where it cannot be read (gone, a folder)."""
    try:
        return _read_stream(fs, path)
    except (OSError, FileNotFoundError):
        return None


def _write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """``path`` on ``fs`` through a temporary file beside it, which neither a stop signal nor a failed write
    leaves behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with stop_signals_held():
        try:
            with fs.open_output_stream(tmp) as fh:
                fh.write(data)
            fs.move(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise


def repair_tune_state(path: str, storage_fs=None) -> list[str]:
    """Put back damaged state files of the Tune experiment at ``path``; return one note per repair.

    Raises :class:`PgpsError` when a damaged file has no intact copy and cannot be set aside.
    """
    import pyarrow.fs as pafs

    fs = storage_fs or pafs.LocalFileSystem()
    copies = f"{path.rstrip('/')}/{STATE_COPIES}"
    notes, damaged, states = [], [], []
    for info in _state_file_infos(fs, path):
        data = _read_bytes(fs, info.path)
        if data is not None and _intact(info.base_name, data):
            states.append(info.base_name)
            continue
        copy = _read_bytes(fs, f"{copies}/{info.base_name}")
        if copy is not None and _intact(info.base_name, copy):
            _write_bytes_atomic(fs, info.path, copy)
            states.append(info.base_name)
            notes.append(f"{info.base_name} was cut short (a kill mid-write); "
                         "put back the intact copy kept at the last start")
        elif fnmatch.fnmatch(info.base_name, "experiment_state*.json"):
            damaged.append(info)
        else:
            raise PgpsError(f"the Tune state file {info.path} is cut short (a kill mid-write) and no intact copy "
                            f"is kept; the sweep cannot be resumed: start it again with a new --out")
    intact = _newest_state(states)
    if damaged and intact is None:
        # Tune would find no experiment state and start the phase over, forgetting its trials
        raise PgpsError(f"the Tune experiment state {damaged[0].path} is cut short (a kill mid-write), and neither "
                        "an intact copy nor another experiment state is kept, so this phase cannot be resumed "
                        "(Tune would start it over); the files were left as they are: start the sweep again with a "
                        "new --out (a finished sweep's exports are still valid)")
    for info in damaged:
        fs.create_dir(copies, recursive=True)
        fs.move(info.path, f"{copies}/damaged-{info.base_name}")
        notes.append(f"{info.base_name} was cut short (a kill mid-write) and set aside in {STATE_COPIES}/; resuming "
                     f"from {intact}, the newest intact experiment state (trials since then continue from their "
                     "last checkpoints)")
    return notes


# Tune deletes a trial's older checkpoint (CheckpointConfig(num_to_keep=1)) the moment it registers a
# newer one, and writes the experiment state only afterwards (at once if forced, else on its period).
# A kill in between leaves a state whose trial points at a checkpoint that is gone, and Tune then fails
# that trial on resume ("Could not recover from checkpoint").  The newer checkpoint is still there: it
# is the oldest surviving one after the missing one (Tune never deletes the one it registered last;
# uploads it has not registered yet have higher numbers), so a resume puts it in the missing one's place.
REPAIR_MARK = ".pgps-checkpoint-move.json"


def _checkpoint_index(name: str) -> int | None:
    """N of a Tune checkpoint folder named ``checkpoint_NNNNNN``; None for any other name."""
    return int(name[11:]) if name.startswith("checkpoint_") and name[11:].isdigit() else None


def _checkpoint_dirs(fs, trial_dir: str) -> dict[int, str]:
    """{index: path} of the ``checkpoint_NNNNNN`` folders in a trial folder."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    return {n: i.path for i in infos
            if i.type == pafs.FileType.Directory and (n := _checkpoint_index(i.base_name)) is not None}


def _move_checkpoint(fs, trial_dir: str, source: str, target: str) -> None:
    """Move a checkpoint folder; where the storage cannot move folders (S3), copy then delete, after
    writing down the move so that a kill half-way is finished by the next resume."""
    import pyarrow.fs as pafs

    mark = f"{trial_dir}/{REPAIR_MARK}"
    _write_bytes_atomic(fs, mark, json.dumps({"source": source, "target": target}).encode())
    if fs.get_file_info(target).type != pafs.FileType.NotFound:
        fs.delete_dir(target)  # what a copy cut short left
    try:
        fs.move(source, target)
    except (OSError, NotImplementedError):  # pyarrow's ArrowNotImplementedError is a NotImplementedError
        fs.create_dir(target, recursive=True)
        pafs.copy_files(source, target, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(source)
    fs.delete_file(mark)


def _newest_state(names: list[str]) -> str | None:
    """The newest ``experiment_state-*.json`` among a folder's file names (Tune stamps them with the time)."""
    return max(fnmatch.filter(names, "experiment_state-*.json"), default=None)


def named_checkpoints(fs, path: str) -> list[tuple[str, str, str, str]]:
    """(trial id, Tune status, trial folder, checkpoint folder name) of each trial whose newest experiment
    state names a checkpoint, the state's pickles loaded by the vetting unpickler (Ray's data classes only)."""
    newest = _newest_state([i.base_name for i in _state_file_infos(fs, path)])
    try:
        trial_data = loads_json(_read_text(fs, f"{path}/{newest}"))["trial_data"] if newest else []
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []  # Tune cannot read it either and says so
    named = []
    for trial_json, run_json in trial_data:
        try:
            t, run = loads_json(trial_json), loads_json(run_json)
            trial_dir = f"{path.rstrip('/')}/{_plain_name(t['relative_logdir'])}"
            blobs = _pickles_in_json(run.get("checkpoint_manager"))
            manager = _VettingUnpickler(io.BytesIO(blobs[0])).load() if blobs else None
            name = _plain_name(manager.latest_checkpoint_result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
        except _Untrusted:
            raise
        except Exception:  # no checkpoint yet, or a state this Ray writes differently: nothing named
            continue
        named.append((str(t.get("trial_id")), str(t.get("status")), trial_dir, name))
    return named


def repair_trial_checkpoints(path: str, storage_fs=None) -> list[str]:
    """Give each trial a resume would restore the checkpoint its experiment state names; one note per repair.

    A trial whose named checkpoint is gone gets the oldest newer one in its place.  A move cut short
    by a kill is finished first.
    """
    import pyarrow.fs as pafs

    fs = storage_fs or pafs.LocalFileSystem()
    notes = []
    for trial_id, status, trial_dir, name in named_checkpoints(fs, path):
        mark = _read_bytes(fs, f"{trial_dir}/{REPAIR_MARK}")
        if mark is not None:  # a move cut short: finish it while its source is there
            try:
                move = loads_json(mark)
                source, target = move["source"], move["target"]
            except (ValueError, KeyError, TypeError):
                source = target = None
            if source and target and fs.get_file_info(source).type == pafs.FileType.Directory:
                _move_checkpoint(fs, trial_dir, source, target)
            else:
                fs.delete_file(f"{trial_dir}/{REPAIR_MARK}")
        index = _checkpoint_index(name)
        if status in ("TERMINATED", "ERROR") or index is None:
            continue  # a resume does not restore finished or errored trials
        target = f"{trial_dir}/{name}"
        if fs.get_file_info(target).type == pafs.FileType.Directory:
            continue
        newer = {i: p for i, p in _checkpoint_dirs(fs, trial_dir).items() if i > index}
        if not newer:
            notes.append(f"trial {trial_id}: its checkpoint {name} is gone and no newer one is kept; "
                         "Tune will fail that trial (rerun it with a new --out if you need it)")
            continue
        source = newer[min(newer)]
        _move_checkpoint(fs, trial_dir, source, target)
        notes.append(f"trial {trial_id}: the experiment state names checkpoint {name}, which Tune had "
                     f"deleted after saving a newer one (a kill between the two); continuing from that newer "
                     f"one ({source.rsplit('/', 1)[-1]})")
    return notes


# A SIGTERM to the whole job (Slurm's scancel, preemption or time limit) also reaches the trials' workers
# (run_trial takes it back for them).  A worker it ends before the driver has stopped its trial is a
# trial failure to Tune, counted against max_failures: with max_failures 0 (or after as many preemptions
# as it allows) the trial is recorded as failed, with Ray's "The process receives a SIGTERM." as its error,
# and a resume leaves it so.  Tune appends each failure it counts to the trial's error.txt, so a resume
# counts again from there, leaving out the deaths by SIGTERM: the trial did not fail, the job stopped.
SIGTERM_DEATH = "The process receives a SIGTERM."  # Ray's words (ray._private.worker) for a worker ended so
_FAILURE_HEAD = re.compile(r"^Failure # \d+ \(occurred at ", re.MULTILINE)


def uncount_shutdown_deaths(path: str, storage_fs=None) -> list[str]:
    """Give back the failures a job's SIGTERM caused to each trial of the experiment at ``path`` (see above):
    one that failed by it is resumed from its last checkpoint, and none of them counts against its
    max_failures any more; one note per trial changed.  The newest experiment state is rewritten atomically."""
    import pyarrow.fs as pafs

    fs = storage_fs or pafs.LocalFileSystem()
    newest = _newest_state([i.base_name for i in _state_file_infos(fs, path)])
    if newest is None:
        return []
    state_path = f"{path.rstrip('/')}/{newest}"
    try:
        state = loads_json(_read_text(fs, state_path))
        trial_data = state["trial_data"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []  # Tune cannot read it either, and says so
    notes = []
    for pair in trial_data:
        try:
            trial, run = loads_json(pair[0]), loads_json(pair[1])
            failures = int(run.get("num_failures") or 0)
            errors = f"{path.rstrip('/')}/{_plain_name(trial['relative_logdir'])}/{_plain_name(run['error_filename'])}"
            if not failures or fs.get_file_info(errors).type != pafs.FileType.File:
                continue
            entries = _FAILURE_HEAD.split(_read_text(fs, errors))[1:]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
            continue  # a trial this Ray records differently: left to Tune
        deaths = sum(SIGTERM_DEATH in e for e in entries)
        if not deaths:
            continue
        run["num_failures"] = min(failures, len(entries) - deaths)
        resumed = trial.get("status") == "ERROR" and SIGTERM_DEATH in entries[-1]
        if resumed:
            trial["status"] = "PENDING"  # what Tune sets a trial it resumes to; it restores the last checkpoint
        if run["num_failures"] == failures and not resumed:
            continue
        pair[0], pair[1] = json.dumps(trial), json.dumps(run)
        notes.append(f"trial {trial.get('trial_id')}: its worker was ended by a SIGTERM to the job, not by an error of "
                     "its own; " + ("it is resumed from its last checkpoint, and " if resumed else "")
                     + f"{failures - run['num_failures']} such end(s) no longer count against its max_failures")
    if notes:
        _write_bytes_atomic(fs, state_path, json.dumps(state).encode())
    return notes


def keep_tune_state(path: str, storage_fs=None) -> None:
    """Keep an intact copy of each of the experiment's state files in .pgps-state/ (written atomically)."""
    import pyarrow.fs as pafs

    fs = storage_fs or pafs.LocalFileSystem()
    copies = f"{path.rstrip('/')}/{STATE_COPIES}"
    fs.create_dir(copies, recursive=True)
    for info in _state_file_infos(fs, path):
        data = _read_bytes(fs, info.path)
        if data is not None and _intact(info.base_name, data):
            _write_bytes_atomic(fs, f"{copies}/{info.base_name}", data)


class PrunedAwareOptunaSearch(OptunaSearch):
    """Tells Optuna PRUNED for trials that ASHA stopped and FAIL for diverged ones, never a truncated score.

    With the sweep's journal as storage, a restored searcher continues the same study: trials
    finished before the interrupt stay, and a trial told twice (finished in the journal, rerun
    by Tune from an older state) is told once.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # a diverged trial's last report carries no score to tell; a finished one takes no more reports
        if result.get("diverged") or trial_id in self._completed_trials:
            return
        with warnings.catch_warnings():  # a trial resumed from its checkpoint reports its last steps again
            warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step=")
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        r, states = result or {}, optuna.trial.TrialState
        values = None
        if error or r.get("diverged"):
            state = states.FAIL
        elif not r.get("completed", False):
            state = states.PRUNED
        else:
            state = states.COMPLETE
            values = [r.get(m) for m in self.metric] if isinstance(self.metric, list) else r.get(self.metric)
        self._ot_study.tell(self._ot_trials[trial_id], values, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    # The journal of the sweep folder this command works on.  A restored searcher holds the journal it was
    # pickled with (an absolute path: that of the folder the sweep ran in, which a copied or moved folder
    # is not), so :meth:`restore` binds it to this one before it asks or tells anything.
    journal: str | None = None

    @classmethod
    @contextlib.contextmanager
    def journal_of(cls, out: Path):
        """Searchers restored in the block continue the study of the sweep folder ``out``."""
        cls.journal = str(Path(out).resolve() / STUDY_FILE)
        try:
            yield
        finally:
            cls.journal = None

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self.journal is not None and self._storage is not None:
            self._bind_journal(self.journal)
        # a trial asked after this state was saved (a kill in between) stays RUNNING in the journal, and Tune
        # asks anew for it: end it as FAIL, so the study holds no trial that never trained as if it still ran
        asked = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in asked:
                self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        # a trial told after this state was saved is finished in the journal while Tune reruns it from an older
        # checkpoint: Optuna refuses any report to it (UpdateFinishedTrialError), so it counts as told already
        finished = {t.number for t in self._ot_study.get_trials(deepcopy=False) if t.state.is_finished()}
        self._completed_trials.update(tid for tid, t in self._ot_trials.items() if t.number in finished)

    def _bind_journal(self, journal: str) -> None:
        """Continue the study in ``journal``: its storage, its study, and the asked trials' handles on it."""
        if getattr(getattr(self._storage, "_backend", None), "_file_path", None) == journal:
            return
        self._storage = journal_storage(journal)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler)
        for t in self._ot_trials.values():
            t.study, t.storage = self._ot_study, self._storage


# -- the sweep's Optuna study -------------------------------------------------------------------

# The search phase's study lives in SWEEP_DIR/optuna.journal (Optuna's JournalStorage, a file of
# JSON lines, one per operation): optuna-dashboard opens it, a resumed sweep continues it, and
# --warm-start adds the stored trials of earlier sweeps of the same space to it before the first ask.
STUDY_FILE = "optuna.journal"
WARM_ATTR = "warm_start_from"  # user attribute of an added trial: "SWEEP/TRIAL_ID", so it is added once


def journal_storage(path: str) -> optuna.storages.JournalStorage:
    """Optuna's journal storage in the file ``path`` (created empty if absent)."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def study_storage(out: Path) -> optuna.storages.JournalStorage:
    """The journal storage of the sweep in ``out`` (created empty if absent)."""
    return journal_storage(str(Path(out).resolve() / STUDY_FILE))


def check_journal(out: Path) -> None:
    """Refuse, in one line, a sweep whose optuna.journal Optuna could not continue (absent is fine: a new study).

    Optuna reads past a last line cut short by a kill, but its next record is appended to that line, and the
    journal no longer reads at all; a line that is not JSON stops every read.
    """
    path = Path(out) / STUDY_FILE
    if not path.exists():
        return
    try:
        data = read_file(path, MAX_JSON_BYTES)
    except OSError as exc:
        raise PgpsError(f"cannot read the Optuna study {path} ({exc.strerror or type(exc).__name__}); make it a "
                        "readable file") from None
    except TooLarge as exc:
        raise PgpsError(f"the Optuna study {path} is {exc}, more than a study of pgps-tune's sizes holds (a "
                        "damaged or crafted file); put back an intact copy of it, or, if the search phase had "
                        "finished, move it aside (the resume then starts an empty study)") from None
    problem = "its last line is cut short" if data and not data.endswith(b"\n") else None
    for n, line in enumerate(data.splitlines() if problem is None else (), 1):
        try:
            ok = isinstance(loads_json(line), dict)
        except ValueError:  # UnicodeDecodeError and JSON too deep or too large included
            ok = False
        if not ok:
            problem = f"line {n} is not a journal record"
            break
    if problem:
        raise PgpsError(f"the Optuna study {path} is damaged ({problem}), so the search cannot continue from it; "
                        "put back an intact copy of it, or, if the search phase had finished, move it aside "
                        "(the resume then starts an empty study)")


def objective_metrics(space: SearchSpace) -> tuple[str | list[str], str | list[str]]:
    """What Optuna optimises, as (metric, mode) for OptunaSearch: two objectives for ``pareto``."""
    if space.objective.type == "pareto":
        return ["val_dice", "schedule_voxel_fraction"], ["max", "min"]
    return "score", "max"


def optuna_distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """The distribution of each searched (not fixed) parameter, as :class:`DefineByRun` suggests it."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in space.parameters:
        if p.kind == "int":
            dists[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log,
                                                                 step=int(p.step or 1))
        elif p.kind == "float":
            dists[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.kind == "categorical":
            dists[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
    return dists


def warm_start(study: optuna.Study, space: SearchSpace, rows: list[dict[str, Any]]) -> int:
    """Add stored completed trials (results-store rows) to ``study`` as COMPLETE; return how many were new.

    Each is added once (marked with its sweep and trial id), so a resumed sweep adds none again.
    """
    known = {t.user_attrs.get(WARM_ATTR) for t in study.get_trials(deepcopy=False)}
    dists = optuna_distributions(space)
    metric, _ = objective_metrics(space)
    added = 0
    for r in rows:
        origin = f"{r['sweep']}/{r['trial_id']}"
        if origin in known:
            continue
        values = [r["final_dice"], r["schedule_voxel_fraction"]] if isinstance(metric, list) else [r["score"]]
        try:
            params = {k: v for k, v in json.loads(r["params"]).items() if k in dists}
            if not all(isinstance(v, float | int) and math.isfinite(v) for v in values):
                raise ValueError(f"objective values {values}")
            trial = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                              values=values, user_attrs={WARM_ATTR: origin})
        except (ValueError, TypeError, AttributeError) as exc:
            raise PgpsError(f"--warm-start: stored trial {origin} does not fit this space ({brief(exc)}); "
                            f"re-export sweep {r['sweep']} or leave out --warm-start") from None
        study.add_trial(trial)
        added += 1
    return added


def own_origins(out: Path, before: dict[str, Any] | None) -> list[str]:
    """The store origins of a sweep's own rows: its folder, and for a copied or moved sweep the folder its
    sweep.json was written in (``before``: that sweep.json, on a resume).  ``--warm-start`` leaves them out."""
    return sorted({str(Path(out).resolve()), *([before[FOLDER_KEY]] if (before or {}).get(FOLDER_KEY) else [])})


def optuna_searcher(opts: SweepOptions, meta: dict[str, Any], before: dict[str, Any] | None = None
                    ) -> PrunedAwareOptunaSearch:
    """The search phase's Optuna searcher, on the sweep's journal study (warm-started if asked, never from the
    sweep's own stored rows: see :func:`own_origins`)."""
    space = opts.space
    metric, mode = objective_metrics(space)
    storage = study_storage(opts.out)
    directions = [{"max": "maximize", "min": "minimize"}[m] for m in (mode if isinstance(mode, list) else [mode])]
    study = optuna.create_study(storage=storage, study_name=meta["study"], directions=directions,
                                load_if_exists=True)
    if opts.warm_start:
        rows = stored_trials(meta["dataset"], meta["space_key"], meta["final_patch"], opts.results_store,
                             exclude_sweep=meta["sweep"], exclude_origins=own_origins(opts.out, before),
                             tuned=meta.get("nnunet"))
        added = warm_start(study, space, rows)
        sweeps = sorted({r["sweep"] for r in rows})
        print(f"pgps-tune: warm start: {added} earlier trials of {meta['dataset']} added to the study "
              f"({len(rows) - added} already in it), from sweep(s) {', '.join(sweeps)}", file=sys.stderr, flush=True)
    return PrunedAwareOptunaSearch(DefineByRun(space), metric=metric, mode=mode, sampler=space.optuna_sampler(),
                                   study_name=meta["study"], storage=storage)


class ListSearcher(Searcher):
    """Suggests a fixed list of configurations in order (the references, a grid).

    Its state is saved as JSON (Tune names the file ``searcher-state-*.pkl``), so restoring
    a sweep folder runs no code from it.
    """

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
        Path(checkpoint_path).write_text(json.dumps({"configs": self.configs, "given": self.given}))

    def restore(self, checkpoint_path: str) -> None:
        try:
            state = loads_json(read_file(checkpoint_path, MAX_JSON_BYTES))
            configs, given = state["configs"], state["given"]
            assert isinstance(configs, list) and all(isinstance(c, dict) for c in configs)
            assert isinstance(given, dict) and all(isinstance(i, int) and 0 <= i < len(configs)
                                                   for i in given.values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
            raise PgpsError(f"searcher state {checkpoint_path} is damaged (not the JSON a sweep writes); "
                            "start the sweep again in a new --out") from None
        self.configs, self.given = configs, {str(k): v for k, v in given.items()}


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


def _refused(address: str) -> str | None:
    """Why a ``HOST:PORT`` address cannot be a Ray cluster right now (nothing listens there, or the host
    name does not resolve), or None: it accepts a connection, does not answer in time, or is another
    form (``auto``, ``ray://...``), all left to Ray."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror:
        return f"unknown host {host}"
    except OSError:  # a timeout, an unreachable network: Ray's own attempts decide
        return None


def start_ray(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray of our own (unless Ray is already initialized)."""
    if ray.is_initialized():
        return
    if address:
        dialed, shown = _dialed(address)
        why = _refused(dialed)  # Ray itself retries a refused address for several seconds before giving up
        if why is None:
            with _stderr_silenced():  # Ray's C++ client logs each failed connection attempt
                try:
                    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
                except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ...
                    if _token_refused(exc):
                        raise PgpsError(_token_advice(address)) from None
                    why = type(exc).__name__
                else:
                    return
        raise PgpsError(
            f"no Ray cluster reachable at {shown} ({why}); start one with "
            "'ray start --head', copy its ~/.ray/auth_token to this machine, or leave out --address"
        )
    if (env := os.environ.get("RAY_ADDRESS", "").strip()) and "://" not in env and env != "local":
        print(f"pgps-tune: note: RAY_ADDRESS is set ({env}, as in a Ray Job), but without --address this command "
              "starts a Ray of its own on this machine; give --address auto to run the trials on that cluster",
              file=sys.stderr, flush=True)
    # A SIGTERM to the whole job (timeout, Slurm's scancel or time limit, systemd) reaches every process
    # of it.  Ray blocks SIGINT in the processes ray.init starts (they inherit the mask of the thread that
    # starts them), not SIGTERM: a GCS ended so leaves the driver's stop of the sweep waiting on it for
    # 60 s, then Ray's client ends the process (exit 1, no resume line).  Blocked, they last until the
    # driver has stopped the sweep.  The mask also reaches the workers the raylet starts: run_trial
    # unblocks SIGTERM for the trial and what it starts.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        ray.init(  # "local": a new Ray of our own, even where another one runs on this machine
            address="local", num_cpus=local_cpus(), include_dashboard=False, logging_level=logging.ERROR,
            object_store_memory=128 * 1024**2, log_to_driver=False,
        )
    except Exception as exc:
        if not _start_failure(exc):
            raise
        first = brief(exc)
        raise PgpsError(
            f"cannot start a local Ray ({first}); the machine may be overloaded, or short of memory, shared "
            "memory (/dev/shm) or space in the temporary folder (/tmp): free some and run the same command "
            "again, or join a running cluster with --address"
        ) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _end_at_once()


def _dialed(address: str) -> tuple[str, str]:
    """(the address Ray dials for ``--address address``, how to name it): ``auto`` dials RAY_ADDRESS where
    that is set (a Ray Job's driver has it; 'ray job submit' users often export a dashboard's http:// URL)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if address == "auto" and env:
        return env, f"RAY_ADDRESS={env} (which --address auto reads)"
    return address, f"--address {address}"


def check_address(address: str) -> None:
    """Refuse an ``--address`` that names no Ray cluster to join: a Ray Client (``ray://``) or dashboard
    (``http://``) address, or ``local`` (a new Ray, not a cluster); for ``auto``, the RAY_ADDRESS it reads."""
    dialed, shown = _dialed(address)
    fix = ("give --address with the head's HOST:PORT (port 6379 by default), or unset RAY_ADDRESS for this command"
           if dialed != address else "give auto or the head's HOST:PORT (port 6379 by default)")
    if dialed.startswith("ray://"):
        raise PgpsError(f"{shown} is a Ray Client address, which pgps-tune cannot use (its driver writes the sweep "
                        f"folder and reads the Tune storage itself); run pgps-tune on a node of the cluster and {fix}")
    if "://" in dialed:
        raise PgpsError(f"{shown} is not a Ray cluster's address (a dashboard's http:// address is for "
                        f"'ray job submit'); {fix}")
    if dialed.strip().lower() == "local":
        raise PgpsError(f"{shown} starts a new Ray rather than joining a cluster; leave out --address for a Ray "
                        f"of the sweep's own{'' if dialed == address else ', or unset RAY_ADDRESS'}")


def _token_refused(exc: BaseException) -> bool:
    """Whether joining a cluster failed on Ray's token authentication (its AuthenticationError, raised or, after
    Ray's retries, only quoted in the message of the error that ends them)."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _token_advice(address: str) -> str:
    """The one line for a cluster at ``address`` (``--address``) that refused this machine's token: Ray sends
    one to an explicit HOST:PORT only with ``RAY_AUTH_MODE=token`` (``auto`` turns it on where a token file
    exists, unless it dials RAY_ADDRESS)."""
    dialed, shown = _dialed(address)
    if dialed != "auto" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        fix = ("Ray sends it to a HOST:PORT address only with RAY_AUTH_MODE=token: set that in the environment, "
               "with the head's ~/.ray/auth_token copied to this machine")
    else:
        fix = "copy the head's ~/.ray/auth_token to this machine (or point RAY_AUTH_TOKEN_PATH at it)"
    return (f"the Ray cluster at {shown} refused this machine's authentication token (missing, wrong "
            f"or not sent); {fix}, and run the command again")


def _start_failure(exc: Exception) -> bool:
    """Whether ``exc`` from a local ``ray.init`` is Ray failing to start, not a fault of ours or of Ray's code:
    its processes not up in time (Ray raises a plain Exception for that), a GCS that failed (RuntimeError),
    the system refusing (OSError: no space in /tmp, too many processes, a timeout) or Ray's own errors."""
    from ray.exceptions import RayError

    if isinstance(exc, (NotImplementedError, RecursionError)):
        return False
    return type(exc) is Exception or isinstance(exc, (RuntimeError, OSError, RayError))


def _end_at_once() -> None:
    """Let ray.shutdown() end the processes of our local Ray with SIGKILL at once.

    It sends each a SIGTERM and waits a second before SIGKILL; with SIGTERM blocked in them that
    second is always spent, about 4 s at the end of every sweep.  Ray's own record of the processes
    it started (``Node.all_processes``, private): where a later Ray moved it, shutting down just takes
    those seconds again.
    """
    try:
        started = ray._private.worker._global_node.all_processes
    except AttributeError:
        return
    for infos in started.values():
        for info in infos:
            info.process.terminate = info.process.kill


def local_cpus() -> int:
    """The CPUs a local Ray of ours gets (:func:`start_ray`): those this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass
class NodeType:
    """A type of node the cluster's autoscaler may start: its name, its resources, and how many at most
    (None: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int | None = None

    def shape(self) -> str:
        most = "" if self.max_count is None else f", at most {plural(self.max_count, 'node')}"
        return f"{self.name} ({_shape(self.resources)}{most})"


def _shape(resources: dict[str, float]) -> str:
    """A node's CPUs and GPUs, as a refusal names them: ``4 CPUs, 1 GPU``."""
    return ", ".join(plural(float(resources.get(k, 0.0)), k) for k in ("CPU", "GPU") if k == "CPU" or resources.get(k))


def node_types_of(config) -> list[NodeType]:
    """The node types of an autoscaler's ``ClusterConfig`` (Ray's protobuf) that it may start one of (a
    ``max_count`` of -1: no limit); [] for None."""
    if config is None:
        return []
    return [NodeType(g.name or "unnamed", {k: float(v) for k, v in g.resources.items()},
                     None if g.max_count < 0 else g.max_count)
            for g in config.node_group_configs if g.max_count != 0 and g.resources]


def declared_node_types() -> list[NodeType]:
    """The node types the cluster's autoscaler told the GCS it may start (Ray Data and Ray Train read them
    there too); [] where none did.  Ray 2.60's own autoscalers (v1 and v2, KubeRay's included) never report
    them (ray-project/ray#63012): such a cluster's scaling is only known from ``--autoscaling``."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except AttributeError:  # a later Ray moved this private reader: the types are unknown, as without a report
        return []
    return node_types_of(config)


def _needs(cpus: float, gpus: float | None) -> tuple[dict[str, float], str]:
    """One trial's request as Ray's node resources name it, and as the flags that asked for it."""
    need = {"CPU": cpus} if gpus is None else {"CPU": cpus, "GPU": gpus}
    return need, " with ".join(f"{flag} {need[k]:g}" for k, flag in (("CPU", "--cpus-per-trial"),
                                                                      ("GPU", "--gpus-per-trial")) if need.get(k))


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in need.items())


def resources_refusal(cpus: float, gpus: float | None, nodes: list[dict[str, float]],
                      node_types: tuple[NodeType, ...] | list[NodeType] = (), hint: str = "") -> str | None:
    """Why no node of ``nodes`` (live nodes' resources) nor of ``node_types`` (those the autoscaler declared)
    can run one trial: what was asked, what the cluster has, and the fix (``hint`` added to it); None where
    one can."""
    need, asked = _needs(cpus, gpus)
    if any(_fits(need, node) for node in nodes) or any(_fits(need, t.resources) for t in node_types):
        return None
    if node_types:
        live = "; ".join(dict.fromkeys(_shape(node) for node in nodes)) or "none"
        return (f"{asked}: no node of the cluster fits a trial, neither a live one ({live}) nor one of the types "
                f"its autoscaler starts: {', '.join(t.shape() for t in node_types)}; ask for at most what one of "
                "them has")
    for key, flag in (("CPU", "--cpus-per-trial"), ("GPU", "--gpus-per-trial")):
        if key not in need:
            continue
        total = float(sum(node.get(key, 0.0) for node in nodes))
        most = float(max((node.get(key, 0.0) for node in nodes), default=0.0))
        if need[key] > total:
            fix = ("ask for at most that" if key == "CPU" else
                   "use --gpus-per-trial 0 or join a cluster with GPUs (--address)")
            return f"{flag} {need[key]:g} but the cluster has {plural(total, key)}; {fix}{hint}"
        if need[key] > most:
            return (f"{flag} {need[key]:g} but no node of the cluster has {plural(need[key], key)} (a trial runs on "
                    f"one node; its {len(nodes)} nodes have at most {plural(most, key)} each); ask for at most "
                    f"{most:g}{hint}")
    fit = float(max(node.get("CPU", 0.0) for node in nodes if node.get("GPU", 0.0) >= need["GPU"]))
    return (f"--cpus-per-trial {cpus:g} with --gpus-per-trial {gpus:g}: no node of the cluster has both (a trial "
            f"runs on one node; those with {plural(need['GPU'], 'GPU')} have at most {plural(fit, 'CPU')}); ask for "
            f"at most {fit:g} CPUs per trial{hint}")


def check_resources(cpus: float, gpus: float | None, nodes: list[dict[str, float]] | None = None,
                    node_types: tuple[NodeType, ...] | list[NodeType] = (), autoscaling: bool | None = None,
                    pending_timeout: float | None = None) -> bool:
    """Refuse per-trial resources that no node of the cluster can give one trial (``nodes``: each live node's
    resources, Ray's by default; ``gpus`` None: the CPUs alone).  A trial runs on one node: two 1-CPU nodes
    cannot run a trial of 2 CPUs, and Tune would leave it pending for ever without a word.

    On an autoscaling cluster the node may not be up yet: a trial that fits one of ``node_types`` (those its
    autoscaler declared) waits for it; one that fits none of them is refused too.  Where the autoscaler
    declared none, ``autoscaling`` (None: a Ray of our own; else whether ``--autoscaling`` was given) lets
    the trials wait all the same, at most ``pending_timeout`` seconds (:class:`PendingWatch`).  Both say so in
    a note; True where the trials wait for a node to start."""
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need, asked = _needs(cpus, gpus)
    if any(_fits(need, node) for node in nodes):
        return False
    if startable := [t for t in node_types if _fits(need, t.resources)]:
        print(f"pgps-tune: note: no live node of the cluster fits {asked}: the trials wait for its autoscaler to "
              f"start a node of type {' or '.join(t.shape() for t in startable)}", file=sys.stderr, flush=True)
        return True
    if autoscaling and not node_types:
        from pgps_tune.report import duration

        print(f"pgps-tune: note: no live node of the cluster fits {asked}; --autoscaling: the trials wait for the "
              f"autoscaler to start one (if none is up within {duration(pending_limit(pending_timeout, True))}, the "
              "sweep stops and --resume continues it; --pending-timeout SECONDS sets that)", file=sys.stderr,
              flush=True)
        return True
    hint = ("; or, on a cluster whose autoscaler starts such nodes, give --autoscaling"
            if autoscaling is not None and not node_types else "")
    raise PgpsError(resources_refusal(cpus, gpus, nodes, node_types, hint))


# -- trials no node can run -----------------------------------------------------------------------
# Tune leaves a trial that no node fits PENDING for ever, saying only now and then that the cluster may lack
# resources; Ray 2.60's autoscalers do not tell a driver that a request is infeasible either (v2's status lists
# every demand as pending, feasible or not; v1 only logs "No available node types can fulfill resource request").
# So a phase watches its own trials: once they have waited --pending-timeout seconds, none running, it compares
# one trial's request with the cluster's live nodes (and the node types its autoscaler declared) every
# PENDING_PROBE_S seconds, and stops as an interrupt stops it (state saved, --resume continues) where none fits.
# A node that fits but is busy (another job's trials) means wait on.  Defaults: a node that left (a GPU worker
# removed or lost) may rejoin within a couple of minutes, and Ray notices a dead node after about 30 s; an
# autoscaler may take ten minutes to start a cloud GPU node (an image pulled, drivers loaded).
PENDING_TIMEOUT_S = {False: 120.0, True: 900.0}  # by --autoscaling
PENDING_PROBE_S = 10.0


def pending_limit(pending_timeout: float | None, autoscaling: bool) -> float:
    """The seconds trials may wait with no node that fits one: ``--pending-timeout``, else the default."""
    return PENDING_TIMEOUT_S[bool(autoscaling)] if pending_timeout is None else float(pending_timeout)


class TrialsUnplaced(PgpsError):
    """A phase stopped as an interrupt stops it (its Tune state saved, ``--resume`` continues it): its trials
    waited longer than the limit and no node of the cluster can run one (:class:`PendingWatch`)."""


def _live_cluster() -> tuple[list[dict[str, float]], list[NodeType]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")], declared_node_types()


class PendingWatch:
    """Whether a phase's trials wait for a node that never comes (see above).

    Called with the phase's pending and running trial counts after each step of Tune's loop; returns (and keeps
    in ``stuck``) the one-line reason to stop, else None.  ``cluster`` gives the live nodes' resources and the
    declared node types; ``clock`` the time in seconds (both replaceable in tests).
    """

    def __init__(self, phase: str, cpus: float, gpus: float, limit: float, autoscaling: bool,
                 cluster=_live_cluster, clock=time.monotonic) -> None:
        self.phase, self.cpus, self.gpus, self.limit, self.autoscaling = phase, cpus, gpus, limit, autoscaling
        self.cluster, self.clock = cluster, clock
        self.since: float | None = None  # since when trials wait with none running
        self.probed = -math.inf
        self.stuck: str | None = None

    def __call__(self, pending: int, running: int) -> str | None:
        from pgps_tune.report import duration

        if self.stuck:
            return self.stuck
        now = self.clock()
        if not pending or running:
            self.since = None
            return None
        self.since = now if self.since is None else self.since
        if now - self.since < self.limit or now - self.probed < PENDING_PROBE_S:
            return None
        self.probed = now
        nodes, types = self.cluster()
        if (refusal := resources_refusal(self.cpus, self.gpus, nodes, types)) is None:
            return None
        waited = f"{plural(pending, 'trial')} waited {duration(now - self.since)}"
        if self.autoscaling:
            self.stuck = (f"{self.phase}: {waited}, none running, for the autoscaler to start a node that can run "
                          f"one, and none is up: {refusal}; or make the autoscaler able to start such a node (its "
                          "node types and limits, the cloud's quota), or let the trials wait longer (--pending-timeout "
                          "SECONDS)")
        else:
            self.stuck = (f"{self.phase}: {waited}, none running, and no live node of the cluster can run one (has "
                          f"one that could left?): {refusal}; or bring back such a node, or give --autoscaling if "
                          "the cluster starts nodes itself")
        return self.stuck


@contextlib.contextmanager
def _pending_watched(watch: PendingWatch):
    """For the block, Tune's loop asks ``watch`` after each step and, once it finds the trials stuck, ends as
    it ends on an interrupt: the trials left pending stay so in the experiment state it saves last."""
    from ray.tune.execution.tune_controller import TuneController

    if not all(hasattr(TuneController, f) for f in ("step", "is_finished")):
        yield  # another Tune: its own behaviour (stuck trials wait until the sweep is stopped)
        return
    step, is_finished = TuneController.step, TuneController.is_finished

    def watched_step(self) -> None:
        step(self)
        pending, running = getattr(self, "_pending_trials", None), getattr(self, "_running_trials", None)
        if pending is not None and running is not None:  # else another Tune's loop: not watched
            watch(len(pending), len(running))

    def watched_is_finished(self) -> bool:
        return watch.stuck is not None or is_finished(self)  # the loop's test: it stops there, as on Ctrl-C

    TuneController.step, TuneController.is_finished = watched_step, watched_is_finished
    try:
        yield
    finally:
        TuneController.step, TuneController.is_finished = step, is_finished


def _unseen_here(paths: dict[str, str], creatable: dict[str, str], remote: tuple | None = None) -> list[str]:
    """On a node of the cluster: the keys of ``paths`` that do not exist here, and of ``creatable`` folders
    that neither exist nor can be made here (the nearest existing folder above is not writable); with
    ``remote`` (a pyarrow filesystem and a file's path in it), "remote" where that file cannot be seen."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    unseen = [key for key, path in paths.items() if not os.path.exists(path)]
    if remote is not None:
        try:
            if remote[0].get_file_info(remote[1]).type == pafs.FileType.NotFound:
                unseen.append("remote")
        except (OSError, pa.ArrowException):  # no credentials, no network, no such bucket, ...
            unseen.append("remote")
    for key, path in creatable.items():
        above = next(p for p in (Path(path), *Path(path).parents) if p.exists())
        if not (above == Path(path) and above.is_dir()) and not os.access(above, os.W_OK | os.X_OK):
            unseen.append(key)
    return unseen


# what a node that runs trials must see, and how to make it so
_UNSEEN_FIX = {"storage": "keep the Tune storage where every node reaches it: a shared (NFS) path, or s3:// or gs:// "
                          "(tune --storage)",
               "remote": "give every node the storage's credentials and network (AWS_*, GOOGLE_APPLICATION_"
                         "CREDENTIALS: in the environment where 'ray start' runs there)",
               "data": "put the dataset at the same path on every node",
               "plans": "put the nnU-Net data at the same paths on every node",
               "cache": "give a --cache-dir every node can write (shared, or the same local path on each)"}
NODE_CHECK_S = 60.0  # a node's check starts a Ray worker there: seconds, unless the node is overloaded


def check_cluster_paths(cpus: float, gpus: float, storage_fs, storage_path: str, data: str | None,
                        cache_root: str | None, plans: str | None = None, autoscales: bool = False) -> None:
    """Refuse, before any trial starts, a cluster with a node that would run trials but cannot see what they
    read and write: the Tune storage (the trials write their results and checkpoints there, and Tune does
    not sync them to the driver: a file the driver writes there must be visible, in a local path or, with
    the node's own credentials, in a remote one), the dataset (``data``; None: synthetic or nnU-Net's), the
    nnU-Net plans, or the preprocessing cache's folder (``cache_root``: made where missing).  What only the
    driver's machine has otherwise fails every trial placed elsewhere, after retries, with Ray's or the
    loader's own error.  Each node that fits a trial checks itself in a task of no CPUs; on a cluster that
    ``autoscales``, those its autoscaler starts later cannot be checked now, which a note says."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths: dict[str, str] = {}
    labels = {"storage": f"the Tune storage {storage_path}", "remote": f"the Tune storage {storage_path}",
              "data": f"--data {data}", "plans": f"the nnU-Net plans {plans}",
              "cache": f"the preprocessing cache {cache_root}"}
    fs = storage_fs or pafs.LocalFileSystem()  # a file the driver writes there, which every node must see
    marker = f"{storage_path.rstrip('/')}/.pgps-node-check-{os.getpid()}-{time.time_ns()}"
    try:
        fs.create_dir(storage_path.rstrip("/"), recursive=True)
        with fs.open_output_stream(marker):
            pass
    except (OSError, pa.ArrowException) as exc:
        raise PgpsError(f"cannot write to the Tune storage {storage_path} ({brief(exc)}); make it writable, "
                        "or give another --storage") from None
    remote = None if storage_fs is None else (storage_fs, marker)
    if storage_fs is None:
        paths["storage"] = marker
    if data is not None and data != "synthetic":
        paths["data"] = data
    if plans is not None:
        paths["plans"] = plans
    creatable = {"cache": cache_root} if cache_root else {}
    blind: list[tuple[str, list[str]]] = []
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= cpus
                 and n["Resources"].get("GPU", 0.0) >= gpus]
        probe = ray.remote(num_cpus=0, max_retries=0)(_unseen_here)
        asked = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(paths, creatable, remote): n["NodeManagerAddress"] for n in nodes}
        done, late = ray.wait(list(asked), num_returns=len(asked), timeout=NODE_CHECK_S) if asked else ([], [])
        for ref in done:
            try:
                if unseen := ray.get(ref):
                    blind.append((asked[ref], unseen))
            except Exception as exc:  # the node died meanwhile, its worker could not start, ...
                print(f"pgps-tune: note: node {asked[ref]} could not check what its trials need "
                      f"({type(exc).__name__}: {brief(exc)})", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(OSError, pa.ArrowException):
            fs.delete_file(marker)
    for ref in late:
        ray.cancel(ref, force=True)
    if late:
        print(f"pgps-tune: note: {plural(len(late), 'node')} of the cluster did not say within {NODE_CHECK_S:g} s "
              "whether they see the sweep's storage, data and cache; a trial there fails if they do not",
              file=sys.stderr, flush=True)
    if blind:
        where, unseen = blind[0]
        more = f" (and {plural(len(blind) - 1, 'other node')})" if len(blind) > 1 else ""
        raise PgpsError(f"node {where}{more} of the cluster would run trials but cannot see "
                        f"{' or '.join(labels[k] for k in unseen)} (on this machine only?); "
                        f"{'; '.join(_UNSEEN_FIX[k] for k in unseen)}, then run the command again")
    if autoscales:
        now = "the nodes up now were checked, but" if nodes else "no node that fits a trial is up yet, and"
        needed = [labels["remote" if remote else "storage"],
                  *(labels[k] for k in (*paths, *creatable) if k != "storage")]
        print(f"pgps-tune: note: {now} the nodes the autoscaler starts for the trials cannot be checked before they "
              f"are up: each must see {' and '.join(needed)}, or its trials fail there", file=sys.stderr, flush=True)


def _filesystem(storage: str | None, storage_path: str):
    """(pyarrow filesystem, path) of a sweep's Tune storage."""
    import pyarrow.fs as pafs

    if storage and "://" in storage:
        import pyarrow as pa

        try:
            return pafs.FileSystem.from_uri(storage)[0], storage_path
        except (OSError, pa.ArrowException) as exc:  # offline, no credentials, an unknown bucket or scheme
            raise PgpsError(f"cannot reach the sweep's --storage {storage} ({brief(exc)}); "
                            "check the network and the storage's credentials in the environment (AWS_*, "
                            "GOOGLE_APPLICATION_CREDENTIALS), then run the command again") from None
    return pafs.LocalFileSystem(), storage_path


def plain_storage(storage: str) -> str:
    """``storage`` with a ``file://`` URI of this machine as the absolute path it names: pyarrow writes both
    alike, and a sweep records, compares and relocates a local storage by its path.

    >>> plain_storage("file:///shared/runs"), plain_storage("s3://bucket/runs"), plain_storage("/shared/runs/")
    ('/shared/runs', 's3://bucket/runs', '/shared/runs')
    """
    from urllib.parse import unquote, urlsplit

    if "://" not in storage:
        return str(Path(storage).resolve())
    url = urlsplit(storage)
    if url.scheme != "file" or url.netloc not in ("", "localhost") or url.query:
        return storage
    return str(Path(unquote(url.path)).resolve())


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
            f"cannot write to --storage {storage} ({type(exc).__name__}: {brief(exc)}); "
            "give a writable local path or s3:// / gs:// URI with credentials in the environment"
        ) from None
    return (None if isinstance(fs, pafs.LocalFileSystem) else fs), path


# -- reading experiments back -----------------------------------------------------------------


def _read_stream(fs, path: str) -> bytes:
    """The bytes of a file of a sweep's Tune state; one over :data:`MAX_JSON_BYTES` (a damaged or crafted file,
    a sparse one of a few bytes on disk) is refused in one line before it fills the memory."""
    with fs.open_input_stream(path) as fh:
        try:
            return read_at_most(fh, MAX_JSON_BYTES)
        except TooLarge as exc:
            raise PgpsError(f"{path} is {exc}, more than pgps-tune reads of a sweep's Tune state (Tune's "
                            "experiment state takes about 26 KB a trial: ~10,000 trials); if the sweep has fewer "
                            "trials, the file is damaged or was not written by Tune: move it out of the sweep "
                            "folder; if it has that many, split the search into sweeps of fewer trials") from None


def _read_text(fs, path: str) -> str:
    return _read_stream(fs, path).decode("utf-8")


def _last_line(fs, path: str) -> str:
    """The last line of a trial's error file that is not blank (read from its last 64 KiB only: the file is
    a traceback, and its last line the error), at most 500 characters, each control character (a terminal's
    escape code among them) shown as ``?``."""
    with fs.open_input_file(path) as fh:
        fh.seek(max(0, fh.size() - (64 << 10)))
        lines = [line for line in fh.read().decode("utf-8", errors="replace").splitlines() if line.strip()]
    return "".join(c if c.isprintable() else "?" for c in (lines[-1] if lines else "failed (empty error file)")[:500])


def _plain_name(value: Any) -> str:
    """A file or folder name read from an experiment state: one path component, nothing else."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ValueError(f"unexpected file name {value!r}")
    return value


def read_experiment(fs, path: str) -> list[TrialRecord]:
    """The trials of one Tune experiment, from its newest ``experiment_state-*.json``.

    Parsed as plain JSON: Tune embeds pickled objects in that file (hex strings), which are
    left as strings, so reading a sweep folder runs no code from it.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
    except (OSError, pa.ArrowException) as exc:
        raise PgpsError(f"cannot list the Tune experiment at {path} ({brief(exc)}); "
                        "check the sweep's --storage, the network and the storage's credentials") from None
    newest = _newest_state(names)
    if newest is None:
        raise PgpsError(f"no Tune experiment state in {path}; the sweep's Tune results are gone from there (its "
                        "ray/ folder or --storage was removed, or moved): put them back to export again; "
                        "trials.parquet and summary.json of an earlier export are unchanged")
    state_path = f"{path}/{newest}"
    records = []
    try:
        for trial_json, run_json in loads_json(_read_text(fs, state_path))["trial_data"]:
            t, run = loads_json(trial_json), loads_json(run_json)
            error = ""
            if run.get("error_filename"):
                error = _last_line(fs, f"{path}/{_plain_name(t['relative_logdir'])}/"
                                       f"{_plain_name(run['error_filename'])}")
            config, last = t["config"], run.get("last_result") or {}
            if not isinstance(config, dict) or not isinstance(last, dict):
                raise TypeError("config and last_result must be objects")
            records.append((_creation_number(t.get("experiment_tag")), len(records),
                            TrialRecord(_plain_name(t["trial_id"]), str(t["status"]), config, last,
                                        int(run.get("num_failures", 0)), error)))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PgpsError(f"{state_path} is not a Tune experiment state this version reads ({type(exc).__name__}: "
                        f"{brief(exc)}); it was damaged, or written by another Ray version: restore it from a "
                        "backup, or use the trials.parquet and summary.json of the last export, which are unchanged"
                        ) from None
    # in the order Tune created them: the state lists trials in the order they first reached a snapshot,
    # and several created between two snapshots come in the order of a Python set
    return [record for *_, record in sorted(records)]


def _creation_number(tag: Any) -> float:
    """The number Tune gave a trial when it created it (1, 2, ...: its experiment tag starts with it)."""
    head = tag.split("_", 1)[0] if isinstance(tag, str) else ""
    return int(head) if head.isdigit() else math.inf


def phase_of(experiment_key: str) -> str:
    """The phase of an entry of sweep.json's ``experiments``: each confirmation run (confirm, confirm-2, ...)
    is a Tune experiment of its own, all of the phase ``confirm``; so is each rung of a compressed search
    (search, search-r1, ...), all of the phase ``search``."""
    if experiment_key.startswith("confirm"):
        return "confirm"
    return "search" if experiment_key.startswith("search") else experiment_key


def read_trials(meta: dict[str, Any], phases: tuple[str, ...] = PHASES,
                keys: tuple[str, ...] | None = None) -> list[TrialRecord]:
    """Every trial of the sweep described by ``meta`` (its sweep.json), phase by phase (``keys``: only
    those entries of its ``experiments``)."""
    fs, root = _filesystem(meta.get("storage"), meta["storage_path"])
    return [dataclasses.replace(record, phase=phase_of(key)) for phase in phases
            for key, name in meta["experiments"].items() if phase_of(key) == phase and (keys is None or key in keys)
            for record in read_experiment(fs, f"{root.rstrip('/')}/{name}")]


def export(experiment: str | Path, out: str | Path, results_store: str | Path | None = None,
           pick: str | None = None) -> dict[str, Any]:
    """Export a finished sweep folder: read its trials, write its tables, add it to the store.

    ``pick``: for a ``pareto`` sweep, the rule that chooses its best schedule from the front; exported into
    the sweep folder, it is recorded in sweep.json (:data:`pgps_tune.results.PICK`), so that later exports
    (``tune --resume`` too) keep to it.
    """
    folder = Path(experiment)
    into_sweep = Path(out).resolve() == folder.resolve()  # writing the sweep folder: not beside a tune or confirm
    with sweep_lock(folder, "export") if into_sweep else contextlib.nullcontext():
        meta = sweep_meta(folder)
        require_finished(meta)
        summary = export_sweep(out, meta, read_trials(meta), results_store, pick, origin=experiment)
        update = {}
        if into_sweep and read_meta(folder)["storage_path"] != meta["storage_path"]:
            # a copied or moved folder: its sweep.json names its own storage from now on (report reads it too)
            update[FOLDER_KEY] = str(folder.resolve())
        if into_sweep and pick is not None and meta.get(PICK) != str(rule := pick_rule(meta, pick)):
            update[PICK] = str(rule)
        if update:
            write_meta(folder, {**meta, **update})
        return summary


# -- tracking --------------------------------------------------------------------------------


def metric_key(key: str) -> str:
    """``key`` as MLflow takes a metric's name: a label named ``tumour (core)`` gives ``dice_tumour _core_``
    (MLflow refuses the whole report for one name with other characters than letters, digits, ``_-. :/``)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of one Tune result of a trial, as its MLflow run logs them: pgps-tune's own numbers
    (:data:`TRIAL_METRICS`, the per-class Dice), not Tune's bookkeeping."""
    metrics = {}
    for key, value in result.items():
        name = TUNE_METRICS.get(key, key if key in TRIAL_METRICS or key.startswith("dice_") else None)
        if name is not None and isinstance(value, int | float):
            metrics[metric_key(name)] = float(value)
    return metrics


def schedule_params(schedule: dict[str, Any]) -> dict[str, str]:
    """A trial's schedule as MLflow params: its stages in one readable line, and the trainer settings and data of
    its recipe (seed, augmentation, optimiser, ...) as ``train.KEY`` and ``data.KEY``, so that runs of sweeps with
    other budgets compare in MLflow's run table."""
    from pgps_tune.schedule import Schedule

    s = Schedule.from_dict(schedule)
    stages = "; ".join(f"{'x'.join(map(str, st.patch_size))} batch {st.batch_size} for {plural(st.epochs, 'epoch')}"
                       for st in s.stages)
    params = {"schedule": stages + (" (each iteration draws its stage)" if s.sampling == "random" else "")}
    recipe = schedule.get("recipe") or {}
    for part in ("train", "data"):
        for key, value in (recipe.get(part) or {}).items():
            params[f"{part}.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return params


@functools.cache
def _mlflow_trials_class() -> type:
    """Ray's MLflow logger (a run per trial, its config as params), with what a sweep's user looks for in MLflow.

    Each report is logged in one request as metrics stepped by the trial's epoch; the first also logs
    the schedule (``schedule.yaml``, and :func:`schedule_params`).  Tags name the trial, its role and, at
    its end, its status as trials.parquet says it (a trial that diverged is a FAILED run).  An
    interrupted sweep leaves its open runs KILLED, and ``--resume`` continues each trial in the run it
    started in (found by its trial name and the sweep's tags), instead of opening a second one.

    Made on first use: importing Ray's MLflow integration imports MLflow, about a second of every
    driver's and trial process's start where MLflow is installed, and most sweeps do not log to it.
    Module attribute ``MLflowTrials`` (see ``__getattr__``), so Ray's pickled Tune state, which
    names the class, finds it again on resume.  It pickles as its settings only (a resume vets and
    unpickles that state): the MLflow module and the run ids are made again when a resumed sweep sets
    it up.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowTrials(MLflowLoggerCallback):
        # where the sweep's folder is now (set while a phase runs, _mlflow_location): a class attribute, never pickled,
        # since Tune restores a resumed phase's callback as it was when the phase started, maybe elsewhere
        location: str | None = None

        def _guarded(self, what: str, call: Any, *args: Any) -> None:
            """Log through ``call``; the first failure (the tracking server gone, a full disk) is said in one
            note line and ends this phase's MLflow logging: the tracking server never stops the sweep."""
            if getattr(self, "_failed", False):
                return
            try:
                call(*args)
            except Exception as exc:  # whatever the tracking store raises, the sweep's own results go on
                self._failed = True
                _mlflow_failed(what, exc)

        def setup(self, *args, **kwargs):
            self._failed = False
            self._schedules_logged: set[str] = set()
            self._ended: set[str] = set()
            self._logged_until: dict[str, int] = {}  # a reopened run: the last step it holds (_earlier_run)
            self._guarded("setting up", lambda: self._setup(*args, **kwargs))

        def _setup(self, *args, **kwargs) -> None:
            super().setup(*args, **kwargs)
            # the sweep's experiment (SweepOptions.mlflow_experiment), by name: Ray's setup would take one
            # MLFLOW_EXPERIMENT_ID names first, and the sweep's own run and the rest of its trials go to this one
            self.mlflow_util.experiment_id = mlflow_experiment_id(self._client(), self.experiment_name)

        def log_trial_start(self, trial):
            self._guarded(f"trial {trial}", self._start, trial)

        def log_trial_result(self, iteration: int, trial, result: dict):
            self._guarded(f"trial {trial}", self._log_result, iteration, trial, result)

        def log_trial_end(self, trial, failed: bool = False):
            self._guarded(f"trial {trial}", self._end, trial, failed)

        def on_experiment_end(self, trials, **info):
            """Tune ends the experiment (also when a signal stopped it): runs of trials still going are KILLED,
            not left RUNNING; a resume reopens them."""
            for trial, run_id in list(getattr(self, "_trial_runs", {}).items()):
                if run_id not in self._ended:
                    self._guarded(f"trial {trial}", self._client().set_terminated, run_id, "KILLED")
            if self.mlflow_util.experiment_id is not None:  # set up: the phase ran
                self._guarded("ending the runs of trials Tune lost", self._end_lost_runs)

        def _end_lost_runs(self) -> None:
            """KILLED: the phase's runs still RUNNING that are none of this driver's: a driver killed outright (kill
            -9, a power cut) leaves its runs RUNNING, and a trial it started after Tune's last snapshot is unknown to
            the resume, which trains its config as a new trial in a new run; the first stayed RUNNING for good.
            (One command at a time runs a sweep folder, :func:`sweep_lock`: no other driver's runs are going.)"""
            client, mine = self._client(), set(getattr(self, "_trial_runs", {}).values())
            phase = self.tags.get("pgps.phase", "")
            query = "attributes.status = 'RUNNING'" + (f" and tags.`pgps.phase` = '{phase}'" if "'" not in phase
                                                       else "")
            # all found first: ending a run takes it out of the query's later pages
            for run in list(tagged_runs(client, self.mlflow_util.experiment_id, query, self.tags)):
                if run.info.run_id not in mine:
                    client.set_terminated(run.info.run_id, "KILLED")

        def _client(self):
            return self.mlflow_util._get_client()

        def _start(self, trial) -> None:
            from mlflow.entities import RunTag

            client = self._client()
            if trial not in self._trial_runs:
                if (run_id := self._earlier_run(trial)) is not None:
                    client.update_run(run_id, status="RUNNING")  # a resumed sweep: the trial goes on in its own run
                    # what it reports again since its checkpoint (a kill between a report and Tune's snapshot:
                    # all of a finished trial's last one) the run holds already: logged once, not twice
                    self._logged_until[run_id] = max((m.step for m in client.get_metric_history(
                        run_id, TUNE_METRICS["time_total_s"])), default=-1)
                else:  # Ray's would be named run_trial_ID, alike for every sweep in the experiment
                    run_id = self.mlflow_util.start_run(tags={**self.tags, "trial_name": str(trial)},
                                                        run_name=trial_run_name(self.tags, trial.trial_id)).info.run_id
                self._trial_runs[trial] = run_id
            super().log_trial_start(trial)
            run_id = self._trial_runs[trial]
            self._ended.discard(run_id)
            tags = [RunTag("pgps.trial_id", str(trial.trial_id)),
                    RunTag("pgps.role", str(trial.config.get("role", "search")))]
            if where := type(self).location or self.tags.get("pgps.sweep_dir"):
                tags.append(RunTag(MLFLOW_LOCATION, where))
            client.log_batch(run_id, tags=tags)

        def _earlier_run(self, trial) -> str | None:
            """The run this sweep opened for ``trial`` before it was interrupted, if any."""
            run = next(tagged_runs(self._client(), self.mlflow_util.experiment_id, f"tags.trial_name = '{trial}'",
                                   self.tags), None)
            return run.info.run_id if run else None

        def _log_result(self, iteration: int, trial, result: dict) -> None:
            from mlflow.entities import Metric, Param

            run_id = self._trial_runs[trial]
            step = result["epoch"] if type(result.get("epoch")) is int else iteration
            at = int(time.time() * 1000)
            metrics = [Metric(k, v, at, step) for k, v in trial_metrics(result).items()
                       if step > self._logged_until.get(run_id, -1)]
            params = []
            if isinstance(result.get("schedule"), str) and run_id not in self._schedules_logged:
                from pgps_tune.schedule import Schedule

                schedule = json.loads(result["schedule"])
                self._client().log_text(run_id, Schedule.from_dict(schedule).to_yaml(), "schedule.yaml")
                params = [Param(k, str(v)) for k, v in schedule_params(schedule).items()]
                self._schedules_logged.add(run_id)
            for i in range(0, max(len(metrics), len(params)), 100):  # MLflow takes at most 100 params a batch
                self._client().log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])

        def _end(self, trial, failed: bool) -> None:
            from mlflow.entities import RunTag

            last = trial.last_result or {}
            status = trial_status("ERROR" if failed else "TERMINATED", last)
            run_id = self._trial_runs[trial]
            tags = [RunTag("pgps.status", status)]
            if status == "failed":
                tags.append(RunTag("pgps.error", str(last.get("error") or trial.error_msg or "diverged")[:5000]))
            self._client().log_batch(run_id, tags=tags)
            super().log_trial_end(trial, failed or status == "failed")
            self._ended.add(run_id)

        def __getstate__(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items()
                    if k not in ("mlflow_util", "_trial_runs", "_schedules_logged", "_failed", "_ended",
                                 "_logged_until")}

        def __setstate__(self, state: dict[str, Any]) -> None:
            from ray.air._internal.mlflow import _MLflowLoggerUtil

            self.__dict__.update(state, mlflow_util=_MLflowLoggerUtil())

    MLflowTrials.__module__, MLflowTrials.__qualname__ = __name__, "MLflowTrials"
    return MLflowTrials


def __getattr__(name: str) -> Any:
    if name == "MLflowTrials":
        return _mlflow_trials_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mlflow_sweep_tags(out: Path, meta: dict[str, Any] | None = None) -> dict[str, str]:
    """The tags every MLflow run of the sweep in ``out`` carries: its name, which names the experiment too, and
    the folder it started in, which tells two sweeps of one name (in other places) apart.

    Set once, when the sweep starts, and kept in its sweep.json ``meta``: Tune's restored state goes on
    tagging the trials of a moved sweep with them, so its new phases and its own run take them too (a
    sweep.json from before they were kept: its name and the folder it last ran in)."""
    if not meta:
        return {"pgps.sweep": out.resolve().name, "pgps.sweep_dir": str(out.resolve())}
    if isinstance(meta.get(MLFLOW_TAGS), dict):
        return {str(k): str(v) for k, v in meta[MLFLOW_TAGS].items()}
    return {"pgps.sweep": str(meta.get("sweep") or out.resolve().name),
            "pgps.sweep_dir": str(meta.get(FOLDER_KEY) or out.resolve())}


def trial_run_name(tags: dict[str, str], trial_id: str) -> str:
    """A trial's MLflow run name, ``SWEEP/PHASE/TRIAL_ID`` from its run's tags, so that the trials of several
    sweeps in one experiment tell apart in MLflow's run list (the sweep's name shortened where the whole
    would pass what MLflow keeps).  A resumed trial keeps the run, and so the name, it started with."""
    tail = "/".join(str(part) for part in (tags.get("pgps.phase"), trial_id) if part)
    sweep = tags.get("pgps.sweep")
    return f"{sweep[:MLFLOW_RUN_NAME_MAX - len(tail) - 1]}/{tail}" if sweep else tail


def relocate_mlflow_runs(uri: str, experiment: str, out: Path, meta: dict[str, Any]) -> int:
    """Tag every MLflow run of the sweep in ``out`` (its trials' of every phase, and its own) with where its
    folder is now (:data:`MLFLOW_LOCATION`): a sweep moved and resumed keeps the tags it started with, which
    name it (see :func:`mlflow_sweep_tags`), and its runs say where it went.  Tags, since MLflow keeps a run's
    params as first logged.  Returns how many runs it changed."""
    from mlflow import MlflowClient

    client, tags, where = MlflowClient(tracking_uri=uri), mlflow_sweep_tags(out, meta), str(out.resolve())
    experiment_id = mlflow_experiment_id(client, experiment)
    name = tags.get("pgps.sweep", "")
    query = f"tags.`pgps.sweep` = '{name}'" if "'" not in name else ""  # else: every run, matched below
    changed = 0
    for run in tagged_runs(client, experiment_id, query, tags):
        if run.data.tags.get(MLFLOW_LOCATION) != where:
            client.set_tag(run.info.run_id, MLFLOW_LOCATION, where)
            changed += 1
    return changed


def tagged_runs(client, experiment_id: str, query: str, tags: dict[str, str]) -> Iterator[Any]:
    """The runs of the MLflow experiment that ``query`` (MLflow's filter string) finds and that carry every one of
    ``tags`` (the sweep's, which name it), page after page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        yield from (run for run in page if all(run.data.tags.get(k) == v for k, v in tags.items()))
        token = page.token
        if not token:
            return


def log_sweep_to_mlflow(uri: str, experiment: str, out: Path, summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """One MLflow run for the whole sweep, in its trials' ``experiment``: its budget as params (``budget.KEY``), the
    best trial's numbers and its gains over the references as metrics (a confirmed winner's: means over the
    repeats), the confirmation's verdict as tags, and best_schedule.yaml, summary.json and trials.parquet as
    artifacts.  A sweep exported again (``--resume`` of a finished sweep, ``confirm``) updates its run, its
    params as first logged.  Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from pgps_tune.results import BEST, SUMMARY, TRIALS

    client = MlflowClient(tracking_uri=uri)
    tags = {**mlflow_sweep_tags(out, meta), "pgps.phase": "sweep"}
    experiment_id = mlflow_experiment_id(client, experiment)
    since = int(float(meta.get("started", 0)) * 1000)  # a run of an earlier sweep in this folder is not this one's
    earlier = [r for r in tagged_runs(client, experiment_id, "tags.`pgps.phase` = 'sweep'", tags)
               if r.info.start_time >= since]
    run_id = earlier[0].info.run_id if earlier else client.create_run(
        experiment_id, run_name=f"{tags['pgps.sweep']} (sweep)", tags=tags).info.run_id
    best, at = summary.get("best") or {}, int(time.time() * 1000)
    numbers = {**{f"best_{k}": best.get(k) for k in ("final_dice", "score", "schedule_voxel_fraction",
                                                     "train_time_s", "n_stages", "dice_sd", "repeats")},
               **{f"{key}_{k}": gain.get(k) for key, gain in summary.items() if key.startswith("gain_over_")
                  and isinstance(gain, dict) for k in ("dice_points", "p_value")}}
    metrics = [Metric(metric_key(k), float(v), at, 0) for k, v in numbers.items()
               if isinstance(v, int | float) and math.isfinite(v)]
    tags = [RunTag(MLFLOW_LOCATION, str(out.resolve())), *([RunTag("pgps.best_trial", str(best["trial_id"]))]
                                                           if best else [])]
    if isinstance(conf := summary.get("confirmation"), dict):  # its verdict, as the last confirmation gave it
        tags += [RunTag("pgps.confirmed_winner", str(conf.get("winner") or "none")),
                 RunTag("pgps.objective_met", str(bool(conf.get("objective_met"))).lower()),
                 RunTag("pgps.confirmation_verdict", str(conf.get("verdict", ""))[:5000])]
    budget = (meta.get("trial_setup") or {}).get("budget") or {}
    params = [] if earlier else [  # logged once: MLflow refuses a param that changes
        *(Param(f"budget.{k}", v if isinstance(v, str) else json.dumps(v)) for k, v in budget.items()),
        *(Param(k, str(meta[k])) for k in ("space_name", "dataset") if meta.get(k) is not None)]
    for i in range(0, max(len(params), 1), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, metrics=metrics if i == 0 else [], params=params[i:i + 100],
                         tags=tags if i == 0 else [])
    for f in (BEST, SUMMARY, TRIALS):
        if (out / f).is_file():
            client.log_artifact(run_id, str(out / f))
    client.set_terminated(run_id)
    return run_id


# -- progress ----------------------------------------------------------------------------------


@dataclass
class TrialLine:
    """What the progress table shows of one trial."""

    trial: str
    phase: str
    stage: int | None = None  # 0-based
    stages: int | None = None
    patch: str = ""
    dice: float = math.nan
    status: str = "running"
    compute: float = 0.0  # baseline-equivalent iterations done
    fraction: float | None = None  # the schedule's voxel fraction: its whole run costs this much of the baseline's

    def take(self, result: dict[str, Any]) -> None:
        """Update from one of the trial's reports."""
        if isinstance(result.get("stage"), int):
            self.stage, self.stages = result["stage"], result.get("n_stages")
        if all(f"patch_{a}" in result for a in "xyz"):
            self.patch = "x".join(str(result[f"patch_{a}"]) for a in "xyz")
        self.dice = float(result.get("val_dice", self.dice))
        self.compute = float(result.get("baseline_iterations", self.compute))
        if result.get("schedule_voxel_fraction") is not None:
            self.fraction = float(result["schedule_voxel_fraction"])


def ended_status(last: dict[str, Any]) -> str:
    """How a trial that ended reads in the progress, from its last report."""
    return ("failed" if last.get("diverged") else "over budget" if last.get("infeasible")
            else "completed" if last.get("completed") else "stopped early")


@dataclass
class _Timing:
    """One trial's clock readings: its start, and its first and last reports as (time, compute)."""

    start: float | None  # None: its start was not seen, or its first report went on from a checkpoint
    base: float = 0.0  # its compute when it started
    first: tuple[float, float] | None = None
    last: tuple[float, float] | None = None
    end: float | None = None


def makespan(busy: list[float], trials: list[float], slots: int) -> float:
    """Seconds until ``trials`` (each its seconds) have run, ``slots`` at a time, after the running trials'
    ``busy`` seconds left: each waits for the first free slot.

    >>> makespan([], [10.0] * 5, 2), makespan([4.0], [10.0, 10.0], 2), makespan([3.0], [], 1)
    (30.0, 14.0, 3.0)
    """
    free = sorted(busy) + [0.0] * max(0, slots - len(busy))
    heapq.heapify(free)
    for seconds in trials:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free, default=0.0)


class TrialClock:
    """How long trials take, measured from their own timings in this process: a trial's speed (baseline-
    equivalent iterations a second, at the concurrency the sweep runs) between its first and last reports,
    its overhead (the rest of its wall time: the worker's start, imports, loading the cached data, building
    the network, the first validation, the last checkpoint), and how many trials run at once.

    Trials of seconds to a minute spend much of their time outside training: a rate of compute over the
    time since the first report left that out (a quick sweep on MSD Hippocampus, 2 trials at once, promised
    72 s at the end of its search, with 186 s to go).

    >>> c = TrialClock()
    >>> c.start("a", 0.0); c.report("a", 10.0, 20.0)  # 20 s to the first report of 10 iterations
    >>> c.speed() is None
    True
    >>> c.report("a", 30.0, 30.0)  # then 20 iterations in 10 s: 2 a second, 15 s of start-up
    >>> c.speed(), c.overhead(c.speed())
    (2.0, 15.0)
    """

    def __init__(self) -> None:
        self.trials: dict[str, _Timing] = {}
        self.started_at: dict[str, float] = {}  # every trial's start, kept when a first report from a checkpoint

    def start(self, trial: str, now: float, compute: float = 0.0) -> None:
        self.trials[trial] = _Timing(now, compute)
        self.started_at[trial] = now

    def report(self, trial: str, compute: float, now: float, restored: bool = False) -> None:
        """``compute`` done by ``trial`` in all at ``now``; ``restored``: its first report since it went on
        from a checkpoint (its compute before is unknown: no start-up to measure)."""
        t = self.trials.setdefault(trial, _Timing(None))
        if t.first is None:
            t.first, t.start = (now, compute), None if restored else t.start
        t.last = (now, compute)

    def end(self, trial: str, now: float) -> None:
        if trial in self.trials:
            self.trials[trial].end = now

    @property
    def slots(self) -> int:
        """The most trials seen running at once: a trial that ends frees its slot for one that starts at the same
        time, whichever Tune tells first.

        >>> c = TrialClock()
        >>> c.start("a", 0.0); c.start("b", 5.0); c.start("c", 10.0); c.end("a", 10.0); c.end("b", 12.0)
        >>> c.slots
        2
        """
        changes = sorted([(t, 1) for t in self.started_at.values()]
                         + [(t.end, -1) for k, t in self.trials.items() if t.end is not None and k in self.started_at])
        running = most = 0
        for _, change in changes:
            running += change
            most = max(most, running)
        return most

    def speed(self) -> float | None:
        """Baseline-equivalent iterations a second of one trial; None before a trial has reported twice (a first
        report's compute over the time since its start is mostly start-up: taken as a speed, a paper schedule's
        first report on MSD Hippocampus priced the sweep at 12 hours, with 10 minutes to go)."""
        pairs = [(t.last[1] - t.first[1], t.last[0] - t.first[0]) for t in self.trials.values()
                 if t.first and t.last[0] > t.first[0]]
        compute, seconds = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        return compute / seconds if compute > 0 and seconds > 0 else None

    def overhead(self, speed: float) -> float:
        """Seconds of a trial's wall time that are not training at ``speed``: the mean over the trials that
        ended (start to end), else over those that reported (start to first report)."""
        ended = [(t.end - t.start, t.last[1] - t.base) for t in self.trials.values()
                 if t.start is not None and t.end is not None and t.last]
        seen = ended or [(t.first[0] - t.start, t.first[1] - t.base) for t in self.trials.values()
                         if t.start is not None and t.first]
        return sum(max(0.0, wall - compute / speed) for wall, compute in seen) / len(seen) if seen else 0.0

    def left(self, running: dict[str, float], new: list[float], now: float, slots: int | None = None
             ) -> float | None:
        """Seconds until the ``running`` trials (compute each has left) and ``new`` ones (the compute of each)
        are done, ``slots`` (else as many as seen) at a time; None before a trial has reported twice (0 with
        nothing left)."""
        speed = self.speed()
        if speed is None:
            return None if running or new else 0.0
        overhead = self.overhead(speed)
        busy = []
        for trial, compute in running.items():
            t = self.trials.get(trial)
            if t is not None and t.last is not None:
                busy.append(max(0.0, compute / speed - (now - t.last[0])))
            else:  # not reported yet: its start-up as well
                since = now - t.start if t is not None and t.start is not None else 0.0
                busy.append(max(0.0, overhead + compute / speed - since))
        return makespan(busy, [overhead + c / speed for c in new], max(slots or self.slots, len(running), 1))


@dataclass(frozen=True)
class PhasePlan:
    """What a phase will train, known before it starts, priced in baseline-equivalent iterations.

    ``known`` holds the voxel fractions of the trials whose schedules are fixed in advance (the
    references); the phase's other trials are searched schedules, priced at the mean fraction of
    those seen so far (the baseline's, 1, before any).  ``bound``: ASHA may stop trials early, or
    a compute cap end the phase, so the price is an upper bound, not the expected compute.
    """

    phase: str
    trials: int
    trial_compute: float  # a constant baseline's whole run at this phase's budget: epochs x iterations per epoch
    known: tuple[float, ...] = ()
    cap: float | None = None
    bound: bool = False
    per_schedule: int = 1  # trials per searched schedule (the confirmation's repeats)

    def at_most(self, schedules: int) -> PhasePlan:
        """The plan with at most ``schedules`` searched schedules, once fewer are known to come.

        >>> PhasePlan("confirm", 15, 100.0, known=(1.0, 0.4) * 3, per_schedule=3).at_most(1).trials
        9
        """
        searched = self.trials - len(self.known)
        return replace(self, trials=len(self.known) + min(searched, max(0, schedules) * self.per_schedule))

    def mean_fraction(self, searched: float) -> float:
        """The mean voxel fraction of the phase's trials, its searched schedules taken at ``searched``.

        >>> PhasePlan("references", 2, 100.0, known=(1.0, 0.4)).mean_fraction(0.5)
        0.7
        """
        unseen = max(0, self.trials - len(self.known))
        return (sum(self.known) + unseen * searched) / self.trials if self.trials else searched

    def compute(self, searched: float) -> float:
        """Baseline-equivalent iterations the phase will take, with searched schedules at fraction ``searched``.

        >>> PhasePlan("search", 10, 100.0, cap=300.0, bound=True).compute(0.5)
        300.0
        """
        total = self.trials * self.mean_fraction(searched) * self.trial_compute
        return min(total, self.cap) if self.cap else total

    def resumed(self, lines: tuple[TrialLine, ...]) -> tuple[int, float, float]:
        """What a resumed phase has done and has left, from its trials before the resume (``lines``): the
        trials that ended, the compute all of them did, and the compute left (each unfinished trial's rest,
        and the trials not started yet, searched schedules at the baseline's cost, as :meth:`compute`).

        >>> PhasePlan("search", 3, 100.0).resumed((TrialLine("a", "search", status="completed", compute=100.0),
        ...                                        TrialLine("b", "search", compute=30.0, fraction=0.5)))
        (1, 130.0, 120.0)
        """
        running = [t for t in lines if t.status == "running"]
        done = sum(t.compute for t in lines)
        left = (sum(max(0.0, (t.fraction or 1.0) * self.trial_compute - t.compute) for t in running)
                + max(0, self.trials - len(lines)) * self.mean_fraction(1.0) * self.trial_compute)
        return len(lines) - len(running), done, min(left, max(0.0, self.cap - done)) if self.cap else left


def search_plans(space: SearchSpace, num_samples: int) -> list[PhasePlan]:
    """The search phase as planned: one phase, or with ``asha.fidelity: compressed`` one per rung.

    With ASHA (partial fidelity) every trial is priced as if it ran to the end, and a compute cap
    caps the phase: an upper bound.  A compressed ladder's rungs are its plan: each rung's schedules
    at that rung's iterations per epoch (fewer only if trials fail).  A rung above the first trains
    each schedule once, so never more than the space has (:func:`pgps_tune.space.distinct_schedules`),
    and main-effects promotion never more than the model ranks (the screened and the grid).
    """
    b, a = space.budget, space.asha
    full = float(b.epochs * b.iterations_per_epoch)
    if a.fidelity == "compressed":
        rungs = compressed_ladder(a.promote, num_samples, a.reduction_factor, a.min_fraction, b.iterations_per_epoch,
                                  a.promote_top)
        most = [n for n in (distinct_schedules(space),) if n is not None]
        if a.promote == "main_effects":
            most.append(num_samples + len(screening_candidates(space, [])))
        return [PhasePlan("search" if r == 0 else f"search-r{r}", min([rung.trials, *most]) if r else rung.trials,
                          float(b.epochs * rung.iterations_per_epoch)) for r, rung in enumerate(rungs)]
    cap = space.search.max_compute * full if space.search.max_compute > 0 else None
    return [PhasePlan("search", num_samples, full, cap=cap, bound=early_stopping(space) or cap is not None)]


def early_stopping(space: SearchSpace) -> bool:
    """Whether ASHA stops the search phase's trials: ``asha.enabled``, but never in a ``pareto`` sweep (it ranks
    trials mid-run by one number) nor in a compressed ladder (whose rungs are runs of their own)."""
    return space.asha.enabled and space.objective.type != "pareto" and space.asha.fidelity != "compressed"


def asha_cannot_stop(space: SearchSpace) -> str | None:
    """Why ASHA, though on, can stop no trial before its end (None: it can): one validation per trial, or
    no rung before the end of the clock.  The sweep says so rather than promise early stopping.

    >>> from pgps_tune.space import parse
    >>> asha_cannot_stop(parse({"parameters": {"stages": 1}, "budget": {"epochs": 4, "val_every": 4}}, "s"))[:37]
    'each trial validates once, at its end'
    """
    b, settings = space.budget, AshaSettings.from_space(space)
    if not early_stopping(space):
        return None
    if b.val_every >= b.epochs:
        return (f"each trial validates once, at its end (budget.val_every {b.val_every} >= epochs {b.epochs}), so "
                "ASHA has no score before it; lower val_every (tune --val-every) to early-stop")
    if not any(m < settings.max_t for m in settings.milestones()):
        return (f"ASHA's first rung is the end of a trial (asha.grace_fraction {space.asha.grace_fraction:g} of "
                f"{settings.max_t:g} {settings.time_attr}); lower grace_fraction to early-stop")
    return None


def confirm_plan(settings: ConfirmSettings, iterations_per_epoch: int, references: list[float],
                 searched: int | None = None) -> PhasePlan:
    """The confirmation as planned: the top-k searched schedules (at most ``searched``, the distinct ones the
    search can complete at the full budget) and the ``references`` (their voxel fractions at the
    confirmation's epochs) on every repeat, at the confirmation's budget.  Fewer distinct schedules may
    complete, and an extension trains only what is new: then it takes less."""
    repeats = settings.folds or settings.seeds or 0
    plan = PhasePlan("confirm", repeats * (settings.top_k + len(references)),
                     float(settings.epochs * iterations_per_epoch), known=tuple(references) * repeats,
                     per_schedule=repeats)
    return plan if searched is None else plan.at_most(searched)


def full_budget_schedules(space: SearchSpace, plans: list[PhasePlan]) -> int:
    """The most distinct searched schedules the search ``plans`` train at the full budget: its last rung's
    (or its one phase's) trials, never more than the space has."""
    last = [p for p in plans if p.phase.startswith("search")][-1].trials
    return min(last, distinct_schedules(space) or last)


class SweepEta:
    """The whole sweep's ETA, from the trials' own timings.

    Left to do: what the running phase still expects (its :class:`Progress` knows) plus what every
    phase after it plans (:class:`PhasePlan`), each trial at the speed and with the overhead the
    sweep's trials have shown in this process (:class:`TrialClock`), as many at once as have run at
    once, and each phase after its start-up (the time from a phase's last trial to the next one's
    first, measured between the phases seen).
    It is an upper bound ("<=") while a phase to come may stop early, else the expected time ("~").
    """

    def __init__(self, plans: list[PhasePlan]) -> None:
        self.plans = list(plans)
        self.clock = TrialClock()  # every phase's trials, in this process, as "phase/trial"
        self.searched: dict[tuple[str, str], float] = {}  # (phase, trial): voxel fraction of a searched schedule
        self.phase_gaps: list[float] = []  # seconds from one phase's last trial to the next one's first
        self.last_phase: tuple[str, float] | None = None  # the phase whose trial ended last, and when

    def plan(self, phase: str) -> PhasePlan | None:
        return next((p for p in self.plans if p.phase == phase), None)

    def at_most(self, phases: list[str], schedules: int) -> None:
        """Plan at most ``schedules`` searched schedules for each of ``phases`` still to come (a rung's
        promotions, the confirmation's candidates), once the sweep knows that no more will come."""
        self.plans = [p.at_most(schedules) if p.phase in phases else p for p in self.plans]

    def searched_fraction(self) -> float:
        """The mean voxel fraction of the searched schedules seen; the baseline's (1) before any."""
        return sum(self.searched.values()) / len(self.searched) if self.searched else 1.0

    def started(self, phase: str, trial: str, now: float, compute: float = 0.0) -> None:
        """A trial of ``phase`` started: the first of a phase after another also measures a phase's start-up."""
        if self.last_phase is not None and self.last_phase[0] != phase:
            self.phase_gaps.append(max(0.0, now - self.last_phase[1]))
        self.last_phase = None
        self.clock.start(f"{phase}/{trial}", now, compute)

    def ended(self, phase: str, trial: str, now: float) -> None:
        self.clock.end(f"{phase}/{trial}", now)
        self.last_phase = (phase, now)

    def left(self, phase: str, phase_left: float, phase_bound: bool) -> tuple[float, bool]:
        """Compute left in the sweep while ``phase`` runs with ``phase_left`` to go, and whether it is a bound.

        >>> eta = SweepEta([PhasePlan("references", 2, 100.0, known=(1.0, 0.5)), PhasePlan("search", 4, 100.0,
        ...                 bound=True), PhasePlan("confirm", 6, 200.0, known=(1.0, 0.5) * 2)])
        >>> eta.left("references", 50.0, False)  # search at the baseline's fraction: nothing searched seen yet
        (1450.0, True)
        >>> eta.searched[("search", "t1")] = 0.5
        >>> eta.left("search", 120.0, True), eta.left("confirm", 30.0, False)
        ((920.0, True), (30.0, False))
        """
        later = self.plans[[p.phase for p in self.plans].index(phase) + 1:] if self.plan(phase) else []
        searched = self.searched_fraction()
        return (phase_left + sum(p.compute(searched) for p in later),
                phase_bound or any(p.bound for p in later))

    def eta(self, phase: str, running: dict[str, float], new: list[float], phase_bound: bool,
            now: float) -> tuple[float | None, bool, float]:
        """Seconds left in the whole sweep (None: no trial has reported twice yet), whether that is an upper
        bound, and the compute left, while ``phase`` has its ``running`` trials (the compute each has left) and
        ``new`` ones (the compute of each) to go.

        >>> eta = SweepEta([PhasePlan("search", 3, 100.0), PhasePlan("confirm", 4, 100.0, known=(0.5,) * 4)])
        >>> eta.started("search", "a", 0.0); eta.clock.report("search/a", 10.0, 20.0)
        >>> eta.clock.report("search/a", 30.0, 30.0)  # 2 iterations a second, 15 s of start-up
        >>> eta.eta("search", {"a": 70.0}, [100.0, 100.0], False, 30.0)  # 35 s, 2 x 65 s, 4 x 40 s
        (325.0, False, 470.0)
        """
        left, bound = self.left(phase, sum(running.values()) + sum(new), phase_bound)
        seconds = self.clock.left({f"{phase}/{k}": v for k, v in running.items()}, new, now)
        speed = self.clock.speed()
        at = [p.phase for p in self.plans].index(phase) + 1 if self.plan(phase) else len(self.plans)
        later = [p for p in self.plans[at:] if p.trials]
        if seconds is None or not later:
            return seconds, bound, left
        if speed is None:
            return None, bound, left
        overhead, gap = self.clock.overhead(speed), sum(self.phase_gaps) / max(1, len(self.phase_gaps))
        for p in later:
            seconds += gap + makespan([], [overhead + p.compute(self.searched_fraction()) / p.trials / speed]
                                      * p.trials, max(1, self.clock.slots))
        return seconds, bound, left


def eta_text(seconds: float | None, bound: bool) -> str:
    """The sweep's ETA for people: "<=" for an upper bound, "~" for an expectation.

    >>> eta_text(725, True), eta_text(725, False), eta_text(None, True)
    ('ETA <= 12m05s', 'ETA ~12m05s', 'ETA ?')
    """
    from pgps_tune.report import duration

    return "ETA ?" if seconds is None else f"ETA {'<= ' if bound else '~'}{duration(seconds)}"


def progress_table(lines: list[TrialLine], header: str, max_rows: int = 12) -> str:
    """The live table: a header line, then one row per trial (running ones first), at most ``max_rows``.

    >>> print(progress_table([TrialLine("t1", "search", 1, 3, "24x24x16", 0.61234),
    ...                       TrialLine("t2", "search", status="completed", dice=0.7)], "search: 1 of 2 done"))
    search: 1 of 2 done
    trial  phase   stage  patch     Dice   status
    t1     search  2/3    24x24x16  0.612  running
    t2     search  -      -         0.700  completed
    """
    order = sorted(lines, key=lambda t: t.status != "running")
    shown = order[:max_rows]
    cells = [["trial", "phase", "stage", "patch", "Dice", "status"]] + [
        [t.trial, t.phase, f"{t.stage + 1}/{t.stages}" if t.stage is not None and t.stages else "-", t.patch or "-",
         f"{t.dice:.3f}" if math.isfinite(t.dice) else "-", t.status] for t in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    rows = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    if len(order) > len(shown):
        rows.append(f"... and {plural(len(order) - len(shown), 'more trial')}")
    return "\n".join([header, *rows])


class Progress(tune.Callback):
    """A sweep phase's progress on stderr: a refreshing table (live), plain lines, JSON lines, or nothing.

    The phase's ETA prices what each trial still needs in baseline-equivalent iterations (each trial's
    schedule costs its voxel fraction of ``trial_compute``; a trial that has not reported its fraction
    yet is taken at the phase plan's mean, else at the mean seen so far in the phase, else at the
    baseline's) at the speed and with the overhead of the phase's trials (in this process), as many at
    once as have run at once (:class:`TrialClock`).  With early stopping, or a compute cap, the
    expectation is an upper bound and the ETA says "at most".
    While a sweep runs, :attr:`sweep_eta` adds the ETA of the whole sweep (this phase and the ones
    planned after it, :class:`SweepEta`).
    """

    MODES = ("live", "lines", "json", "none")
    # set only while a resume restores its Tune state (:meth:`resuming`): the resuming command's mode, and the
    # restored experiment's ended trials (:func:`ended_lines`): Tune restores its callbacks as they were when
    # the phase started, so without them a resumed phase counted "1/10" again and priced ended trials as to come
    resumed_mode: str | None = None
    resumed_trials: tuple[TrialLine, ...] = ()
    sweep_eta: SweepEta | None = None  # the running sweep's plan and clock (a class attribute: never pickled)

    def __init__(self, total: int, phase: str, mode: str, trial_compute: float, cap: float | None = None,
                 upper_bound: bool = False) -> None:
        self.total, self.phase, self.mode = total, phase, mode
        self.trial_compute, self.cap, self.upper_bound = trial_compute, cap, upper_bound
        self.trials: dict[str, TrialLine] = {}
        self.stream: Any = None  # None: sys.stderr at the time of writing
        self._restart()

    def _restart(self) -> None:
        self.t0, self.drawn, self.last_draw = time.time(), 0, 0.0
        self.clock = TrialClock()  # a resumed sweep measures its trials from the resume on

    @classmethod
    @contextlib.contextmanager
    def resuming(cls, mode: str, ended: tuple[TrialLine, ...] = ()):
        """For the block (``Tuner.restore``, which unpickles the phase's Progress from tuner.pkl), a restored
        Progress takes this command's ``mode`` and the ``ended`` trials; after it, none does, so a later sweep in
        this process (a notebook, a test suite) is not shown as this one was."""
        saved = cls.resumed_mode, cls.resumed_trials
        cls.resumed_mode, cls.resumed_trials = mode, ended
        try:
            yield
        finally:
            cls.resumed_mode, cls.resumed_trials = saved

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if Progress.resumed_mode is not None:
            self.mode = Progress.resumed_mode
        for line in Progress.resumed_trials:
            self.trials.setdefault(line.trial, replace(line))
        self._restart()  # a resumed sweep measures its rate from the resume

    # -- the numbers
    def compute_done(self) -> float:
        return sum(t.compute for t in self.trials.values())

    def _mean(self) -> float:
        """The voxel fraction of a trial whose schedule has not reported its own."""
        known = [t.fraction for t in self.trials.values() if t.fraction is not None]
        plan = Progress.sweep_eta.plan(self.phase) if Progress.sweep_eta else None
        return (plan.mean_fraction(Progress.sweep_eta.searched_fraction()) if plan  # the references' are known
                else sum(known) / len(known) if known else 1.0)

    def _expected(self, t: TrialLine, mean: float | None = None) -> float:
        """The compute ``t`` takes in all: what it did once ended, else its whole run's."""
        if t.status != "running":
            return t.compute
        return (t.fraction or (self._mean() if mean is None else mean)) * self.trial_compute

    def compute_expected(self) -> float:
        mean = self._mean()
        expected = sum(self._expected(t, mean) for t in self.trials.values())
        expected += max(0, self.total - len(self.trials)) * mean * self.trial_compute
        return min(expected, self.cap) if self.cap else expected

    def work_left(self) -> tuple[dict[str, float], list[float]]:
        """The compute each running trial has left, and that of each trial still to start (a cap shares
        what it leaves among them)."""
        expected = self.compute_expected()
        running = {k: max(0.0, self._expected(t) - t.compute) for k, t in self.trials.items() if t.status == "running"}
        rest = max(0.0, expected - self.compute_done() - sum(running.values()))
        unstarted = max(0, self.total - len(self.trials))
        return running, [rest / unstarted] * unstarted if unstarted and rest > 0 else []

    def eta(self) -> float | None:
        return self.clock.left(*self.work_left(), time.time())

    def sweep(self) -> tuple[float | None, bool, float] | None:
        """The whole sweep's ETA (seconds or None, upper bound?) and compute left; None outside a sweep."""
        if Progress.sweep_eta is None:
            return None
        return Progress.sweep_eta.eta(self.phase, *self.work_left(), self.upper_bound, time.time())

    def header(self) -> str:
        from pgps_tune.report import duration

        finished = sum(t.status != "running" for t in self.trials.values())
        eta = self.eta()
        left = "ETA ?" if eta is None else f"{'at most ' if self.upper_bound else ''}{duration(eta)} left"
        sweep = self.sweep()
        return (f"{self.phase}: {finished} of {plural(self.total, 'trial')} done, "
                f"compute {self.compute_done():.0f} of ~{self.compute_expected():.0f} baseline iterations, "
                f"{duration(time.time() - self.t0)} elapsed, {left}"
                + (f"; sweep {eta_text(*sweep[:2])}" if sweep else ""))

    # -- writing
    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text)
        stream.flush()

    def _event(self, event: str, t: TrialLine, text: str, **extra: Any) -> None:
        from pgps_tune.errors import strict_json

        if self.mode == "json":
            sweep = self.sweep() or (None, None, None)
            self._write(strict_json({
                "event": event, "phase": self.phase, "trial": t.trial, "status": t.status,
                "stage": t.stage, "stages": t.stages, "patch": t.patch or None, "val_dice": t.dice, **extra,
                "trials_done": sum(x.status != "running" for x in self.trials.values()), "trials_total": self.total,
                "compute_done": self.compute_done(), "compute_expected": self.compute_expected(),
                "elapsed_s": time.time() - self.t0, "eta_s": self.eta(),
                "sweep_eta_s": sweep[0], "sweep_eta_upper_bound": sweep[1], "sweep_compute_left": sweep[2],
            }, indent=None) + "\n")
        elif self.mode == "live":
            self._draw()
        elif self.mode == "lines" and text:
            self._write(f"[{time.time() - self.t0:6.0f}s] {self.phase}: {text}\n")

    def _draw(self) -> None:
        """Redraw the live table over the one drawn before."""
        table = progress_table(list(self.trials.values()), self.header())
        clear = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
        self._write(clear + table + "\n")
        self.drawn, self.last_draw = table.count("\n") + 1, time.time()

    def _line(self, trial) -> TrialLine:
        return self.trials.setdefault(trial.trial_id, TrialLine(trial.trial_id, self.phase))

    def _clock(self, t: TrialLine, result: dict[str, Any]) -> None:
        """Time ``t``'s report on the phase's clock and the sweep's; tell the sweep what a searched schedule
        costs.  A first report that went on from a checkpoint (a resume, a retry) did compute before it."""
        now = time.time()
        restored = result.get("training_iteration", 1) > result.get("iterations_since_restore", 1)
        self.clock.report(t.trial, t.compute, now, restored)
        if Progress.sweep_eta is None:
            return
        Progress.sweep_eta.clock.report(f"{self.phase}/{t.trial}", t.compute, now, restored)
        if result.get("role", "search") == "search" and t.fraction is not None and self.phase != "confirm":
            Progress.sweep_eta.searched[(self.phase, t.trial)] = t.fraction

    def _ended(self, t: TrialLine) -> None:
        now = time.time()
        self.clock.end(t.trial, now)
        if Progress.sweep_eta is not None:
            Progress.sweep_eta.ended(self.phase, t.trial, now)

    # -- Tune's hooks
    def on_step(self, iteration, trials, **info):
        if self.mode == "live" and self.trials and time.time() - self.last_draw >= 1.0:  # the clock ticks on
            self._draw()

    def on_trial_start(self, iteration, trials, trial, **info):
        t = self._line(trial)
        t.status = "running"
        self.clock.start(t.trial, time.time(), t.compute)
        if Progress.sweep_eta is not None:
            Progress.sweep_eta.started(self.phase, t.trial, time.time(), t.compute)
        self._event("start", t, f"start {trial.trial_id} {_short(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self._line(trial)
        t.take(result)
        self._clock(t, result)
        self._event("result", t, "", score=result.get("score"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        t = self._line(trial)
        r = trial.last_result or {}
        t.status = ended_status(r)
        self._ended(t)
        done = sum(x.status != "running" for x in self.trials.values())
        what = (f"FAILED: {r.get('error', 'diverged')}" if r.get("diverged") else
                "over the voxel budget: not trained" if r.get("infeasible") else
                f"{t.status}: Dice {r.get('val_dice', math.nan):.3f} score {r.get('score', math.nan):.3f}")
        from pgps_tune.report import duration

        eta, sweep = self.eta(), self.sweep()
        left = []
        if eta is not None and done < self.total:
            left.append(f"{'at most ' if self.upper_bound else ''}{duration(eta)} left")
        if sweep is not None and sweep[2] > 0:  # the sweep's last trial says nothing is left by ending
            left.append(f"sweep {eta_text(*sweep[:2])}")
        self._event("complete", t, f"{done}/{self.total} {trial.trial_id} {what}"
                    + (f" ({'; '.join(left)})" if left else ""), score=r.get("score"))

    def on_trial_error(self, iteration, trials, trial, **info):
        t = self._line(trial)
        t.status = "failed"
        self._ended(t)
        done = sum(x.status != "running" for x in self.trials.values())
        self._event("error", t, f"{done}/{self.total} {trial.trial_id} FAILED (see trials.parquet 'error')")


def ended_lines(records: list[TrialRecord], phase: str) -> tuple[TrialLine, ...]:
    """What the progress of a resumed ``phase`` knows of its trials that had ended (Tune's records)."""
    lines = []
    for r in records:
        if r.status in ("TERMINATED", "ERROR"):
            line = TrialLine(r.trial_id, phase)
            line.take(r.last_result)
            line.status = "failed" if r.status == "ERROR" else ended_status(r.last_result)
            lines.append(line)
    return tuple(lines)


def resumed_lines(before: dict[str, Any], plans: list[PhasePlan], storage_fs,
                  storage_path: str) -> dict[str, tuple[TrialLine, ...]]:
    """The trials each phase of ``plans`` ran before a resume of the sweep ``before`` (its sweep.json) continues
    it, ended or not: every Tune experiment of the phase (a confirmation's runs, the one it left pending)."""
    import pyarrow.fs as pafs

    fs = storage_fs or pafs.LocalFileSystem()
    names = dict(before["experiments"])
    if (pending := before.get("pending_confirm")) is not None:
        names[pending["key"]] = f"{before['sweep']}-{pending['key']}"
    found: dict[str, tuple[TrialLine, ...]] = {}
    for plan in plans:
        lines: list[TrialLine] = []
        for key, name in names.items():
            path = f"{storage_path.rstrip('/')}/{name}"
            if key != plan.phase and not (plan.phase == "confirm" and phase_of(key) == "confirm"):
                continue
            if not _newest_state([i.base_name for i in _state_file_infos(fs, path)]):
                continue  # never started
            try:
                records = read_experiment(fs, path)
            except PgpsError:  # the phase's own resume repairs its state, or refuses it in one line
                continue  # meanwhile the plan counts the phase whole
            lines += ended_lines(records, plan.phase)
            for r in records:
                if r.status not in ("TERMINATED", "ERROR"):
                    lines.append(TrialLine(r.trial_id, plan.phase))
                    lines[-1].take(r.last_result)
        found[plan.phase] = tuple(lines)
    return found


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


# -- signals ----------------------------------------------------------------------------------


class _StopSignals:
    """SIGINT and SIGTERM end the sweep cleanly.

    Inside Tune's ``fit()`` the first one goes to Tune's own stop handler (the one Tune puts
    on SIGUSR1: stop the trials, save the experiment state, return), and the sweep raises
    :class:`SweepInterrupted` once ``fit()`` has returned.  Elsewhere, or on a second
    signal, :class:`SweepInterrupted` is raised at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.caught: int | None = None
        self.tune_handler_before: Any = None
        self.in_fit = False
        self.holding = False
        self.active = threading.current_thread() is threading.main_thread()  # only it can take signals

    def handle(self, signum: int, frame) -> None:
        first = self.caught is None
        self.caught = self.caught or signum
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if self.in_fit and first and callable(tune_stop) and tune_stop is not self.tune_handler_before:
            tune_stop(signum, frame)
        elif not (self.holding and first):
            raise SweepInterrupted(self.caught)

    @contextlib.contextmanager
    def held(self):
        """Hold the first signal until the block ends, then raise :class:`SweepInterrupted`: an exception
        inside ``ray.init`` leaves the processes it had started running, out of ``ray.shutdown``'s reach.
        A second signal still ends the block at once."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.caught:
            raise SweepInterrupted(self.caught)

    def install(self) -> None:
        """(Re)take the signals: Ray's core library puts a crash handler on SIGTERM when it connects."""
        if self.active:
            for s in self.SIGNALS:
                signal.signal(s, self.handle)

    @contextlib.contextmanager
    def fitting(self):
        self.tune_handler_before, self.in_fit = signal.getsignal(signal.SIGUSR1), True
        try:
            yield
        finally:
            self.in_fit = False
        if self.caught:
            raise SweepInterrupted(self.caught)


def _interruption(exc: BaseException) -> BaseException | None:
    """The interrupt behind ``exc``: Ray's Cython functions that check for signals turn the exception a
    signal handler raised in them into a ``SystemError`` ("returned a result with an exception set")."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, SweepInterrupted | KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def _stop_signals():
    signals = _StopSignals()
    if not signals.active:
        yield signals  # the caller's own signal handling applies
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's would swallow the interrupt: ours forwards it
    previous = {s: signal.getsignal(s) for s in signals.SIGNALS}
    signals.install()
    try:
        yield signals
    except KeyboardInterrupt:  # a Ctrl-C that reached Python's own handler (one another library put back)
        raise SweepInterrupted(signal.SIGINT) from None
    except SystemError as exc:  # a signal handled inside Ray's Cython code (its wait polls for signals)
        if (stop := _interruption(exc)) is None:
            raise
        raise SweepInterrupted(stop.signum if isinstance(stop, SweepInterrupted) else signal.SIGINT) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- the sweep ----------------------------------------------------------------------------------


def trial_setup(space: SearchSpace, data: str, cache_dir: Path | None, final_patch, pools, cpus: float,
                gpus: float) -> dict[str, Any]:
    """What every trial of a sweep shares (plain data, passed to trials through the object store);
    ``cache_dir`` None: the trials train nnU-Net's preprocessed data, not pgps-tune's cache."""
    return {
        "data": str(data), "cache_root": str(Path(cache_dir).parent) if cache_dir else None,
        "budget": asdict(space.budget), "final_patch": tuple(final_patch), "pools": tuple(pools),
        "objective": asdict(space.objective), "cpus_per_trial": cpus, "gpus_per_trial": gpus,
        "asha_judge": space.asha.judge,
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


def _callbacks(phase: str, opts: SweepOptions, name: str, num_samples: int, scheduler, stopper) -> list:
    """The phase's Tune callbacks: progress, and MLflow where asked for.

    TensorBoard needs none of ours: Ray's default TBXLoggerCallback already writes every reported
    metric (Dice, loss, stage, patch sides, compute) to event files in each trial's folder.
    """
    b = opts.space.budget
    plan = Progress.sweep_eta.plan(phase) if Progress.sweep_eta else None  # a rung's or the confirmation's budget
    callbacks: list = [Progress(num_samples, phase, "none" if opts.quiet else opts.progress,
                                trial_compute=plan.trial_compute if plan else b.epochs * b.iterations_per_epoch,
                                cap=stopper.max_t if isinstance(stopper, ComputeBudget) else None,
                                upper_bound=scheduler is not None or isinstance(stopper, ComputeBudget))]
    if opts.mlflow:
        callbacks.append(_mlflow_callback(phase, opts))
    return callbacks


def _mlflow_callback(phase: str, opts: SweepOptions):
    """The phase's MLflow logger: into ``opts.mlflow``, the sweep's experiment, under its tags."""
    return _mlflow_trials_class()(opts.mlflow, experiment_name=opts.mlflow_experiment,
                                  tags={**(opts.mlflow_tags or mlflow_sweep_tags(opts.out)), "pgps.phase": phase})


def _log_restored_phase_here(tuner, phase: str, opts: SweepOptions, ended: int) -> None:
    """A restored phase logs its trials to the MLflow of the command that resumes it, where it gives --mlflow.

    Tune restores the callbacks a phase started with: a phase started without --mlflow and resumed with
    it logged none of its trials (while the sweep's own run took the verdict over them), and one resumed
    with another URI logged its trials where it started and the sweep's own run here.  Without --mlflow
    the phase goes on logging where it started: its runs left KILLED end as its trials do.  The ``ended``
    trials of a phase that logged elsewhere (or nowhere) are said to have no run here.
    """
    if not opts.mlflow:
        return
    local = getattr(tuner, "_local_tuner", None)  # Ray 2.60's; the RunConfig unpickled from tuner.pkl, fit()'s
    if local is None or not hasattr(local, "get_run_config"):
        print(f"pgps-tune: note: {phase}: this Ray restores the phase's MLflow logging as it started, which "
              f"pgps-tune cannot switch to {opts.mlflow}", file=sys.stderr, flush=True)
        return
    config = local.get_run_config()
    trials = _mlflow_trials_class()
    logged = [c.tracking_uri for c in config.callbacks or [] if isinstance(c, trials)]
    if opts.mlflow in logged:
        return
    config.callbacks = [*(c for c in config.callbacks or [] if not isinstance(c, trials)),
                        _mlflow_callback(phase, opts)]
    if ended:
        where = f"to {logged[0]}" if logged else "without --mlflow"
        print(f"pgps-tune: note: {phase}: {plural(ended, 'trial')} of this phase ended while it logged {where}, "
              f"so {'it has' if ended == 1 else 'they have'} no run in {opts.mlflow}; the rest log there",
              file=sys.stderr, flush=True)


def run_phase(phase: str, opts: SweepOptions, setup: dict[str, Any], storage_fs, storage_path: str,
              name: str, searcher, num_samples: int, scheduler, stopper=None,
              signals: _StopSignals | None = None) -> None:
    """Run (or continue) one Tune experiment; raises :class:`SweepInterrupted` if a signal stopped it, and
    :class:`TrialsUnplaced` if its trials waited for a node that can run them for longer than the limit."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        for note in repair_tune_state(path, storage_fs):
            print(f"pgps-tune: {phase}: {note}", file=sys.stderr, flush=True)
        vet_tune_state(path, storage_fs)  # Tuner.restore unpickles: refuse a state that asks for more than data
        for note in [*repair_trial_checkpoints(path, storage_fs), *uncount_shutdown_deaths(path, storage_fs)]:
            print(f"pgps-tune: {phase}: {note}", file=sys.stderr, flush=True)
        keep_tune_state(path, storage_fs)
        import pyarrow.fs as pafs

        records = read_experiment(storage_fs or pafs.LocalFileSystem(), path)
        ended = ended_lines(records, phase)
        with Progress.resuming("none" if opts.quiet else opts.progress, ended):  # the restored Progress follows this
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=storage_fs)
        _log_restored_phase_here(tuner, phase, opts, len(ended))
        if Progress.sweep_eta is not None and phase != "confirm":  # what the searched schedules cost, as _clock
            roles = {r.trial_id: r.last_result.get("role", "search") for r in records}
            for line in ended:
                if roles[line.trial] == "search" and line.fraction is not None:
                    Progress.sweep_eta.searched[(phase, line.trial)] = line.fraction
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
                callbacks=_callbacks(phase, opts, name, num_samples, scheduler, stopper),
            ),
        )
        keep_tune_state(path, storage_fs)  # the constructor wrote tuner.pkl
    watch = PendingWatch(phase, opts.cpus_per_trial, opts.gpus_per_trial,
                         pending_limit(opts.pending_timeout, opts.autoscaling), opts.autoscaling)
    # what Tune restores (in fit) continues this folder's study and Tune storage
    with (signals.fitting() if signals else contextlib.nullcontext(), PrunedAwareOptunaSearch.journal_of(opts.out),
          _restored_search_here(storage_fs, storage_path, name), _dead_workers_recorded(), _mlflow_location(opts),
          _pending_watched(watch)):
        tuner.fit()
    if watch.stuck:
        raise TrialsUnplaced(watch.stuck)


@contextlib.contextmanager
def _mlflow_location(opts: SweepOptions):
    """While the phase runs, its MLflow runs (a restored phase's too) say where the sweep's folder is now; after
    it, no other sweep in this process (a notebook, a test suite) is said to be there."""
    if not opts.mlflow:
        yield
        return
    trials = _mlflow_trials_class()
    trials.location = str(opts.out.resolve())
    try:
        yield
    finally:
        trials.location = None


@contextlib.contextmanager
def _restored_search_here(storage_fs, storage_path: str, name: str):
    """For the block, a search Tune restores creates its new trials in this run's storage.

    Tune's SearchGenerator saves its Experiment, whose storage is an absolute path, and a restore puts it
    back as saved: Tune rebases the trials it restores onto the storage it was restored from (a moved
    experiment), but every trial the search creates after a resume would be written into the folder a
    copied or moved sweep came from.  Scoped to the phase, as Tune's own state is.
    """
    import pyarrow.fs as pafs
    from ray.tune.search.search_generator import SearchGenerator

    saved = SearchGenerator.set_state

    def set_state(self, state: dict) -> None:
        saved(self, state)
        storage = getattr(self._experiment, "storage", None)
        if storage is not None:
            storage.storage_filesystem = storage_fs or pafs.LocalFileSystem()
            storage.storage_fs_path = storage_path
            storage.experiment_dir_name = name

    SearchGenerator.set_state = set_state
    try:
        yield
    finally:
        SearchGenerator.set_state = saved


@contextlib.contextmanager
def _dead_workers_recorded():
    """For the block, a trial whose worker process died (the OOM killer, a kill -9, a crash) reaches the
    experiment state as Tune ended it: failed, or pending for its retry.

    Tune writes a trial into its experiment state only when something marks it for that; the stop of a
    failed trial does so only while the trial still has its actor.  When the worker dies, Tune drops the
    actor first (its actor failed), then handles the task's failure: the trial ends ERROR in memory but
    stays RUNNING, without its error, in every state written after, so the phase ended with a trial it
    called unfinished and only a resume ended it.  Scoped to the phase, as Tune's own state is.
    """
    from ray.tune.execution.tune_controller import TuneController

    if not all(hasattr(TuneController, f) for f in ("_schedule_trial_stop", "_mark_trial_to_checkpoint")):
        yield  # another Tune: its own behaviour (a trial it left RUNNING ends the sweep "not finished")
        return
    saved = TuneController._schedule_trial_stop

    def _schedule_trial_stop(self, trial, exception=None) -> None:
        saved(self, trial, exception=exception)
        self._mark_trial_to_checkpoint(trial)

    TuneController._schedule_trial_stop = _schedule_trial_stop
    try:
        yield
    finally:
        TuneController._schedule_trial_stop = saved


# One driver at a time runs a sweep folder: a second `tune` (a resume typed while the first still
# runs, a new sweep on the same --out) would write the same Tune state, study and exports.


def sweep_lock(out: Path, command: str = "tune") -> contextlib.AbstractContextManager[None]:
    """Hold ``out/.pgps-sweep.lock`` for the block, or refuse in one line while another driver holds it
    (:func:`pgps_tune.errors.folder_lock`); a sweep that wrote no ``sweep.json`` (refused on its inputs)
    removes the file, leaving its folder as it was.  ``tune``, ``confirm`` and ``export`` into the sweep
    folder take it: each writes the folder's sweep.json, Tune experiments or exports."""
    then = "continue with --resume" if command == "tune" else f"run '{command}' again"
    unwritable = "give a writable --out" if command != "confirm" else (  # confirm has no --out: the folder is it
        f"make {out} writable, or copy the sweep folder somewhere writable and confirm the copy")
    return folder_lock(out, SWEEP_LOCK, f"{out} is in use by another pgps-tune command ({{holder}}); wait for it to "
                       f"end or stop it (Ctrl-C), then {then}", lambda: (out / SWEEP_FILE).exists(),
                       command=f"pgps-tune {command}", unwritable=unwritable)


def sweep(opts: SweepOptions) -> dict[str, Any]:
    """Run (or resume) a whole sweep; write the exports; return the summary.

    Raises :class:`SweepInterrupted` on SIGINT/SIGTERM, and :class:`TrialsUnplaced` where no node of the
    cluster can run the waiting trials (:class:`PendingWatch`), with nothing exported and the sweep
    resumable; the local Ray this call started is shut down however it ends.  A second sweep on the same
    folder while this one runs is refused (:func:`sweep_lock`).
    """
    opts.check()
    with sweep_lock(opts.out):
        return _sweep(opts)


def _sweep(opts: SweepOptions) -> dict[str, Any]:
    from pgps_tune.data import plan_patch, prepare, split
    from pgps_tune.report import REPORT

    space, b = opts.space, opts.space.budget
    out = opts.out
    meta_path = out / SWEEP_FILE
    if meta_path.exists() and not opts.resume:
        raise PgpsError(f"{out} already holds a sweep; add --resume to continue it, or choose a new --out")
    if opts.resume and not meta_path.exists():
        raise PgpsError(f"--resume given but {meta_path} does not exist; run without --resume to start")
    if not opts.resume and (theirs := [f for f in (BEST, SUMMARY, TRIALS, PARETO, STUDY_FILE, REPORT)
                                       if (out / f).exists()]):
        raise PgpsError(f"{out} holds {', '.join(theirs)} but no sweep ({SWEEP_FILE}); a new sweep would replace "
                        f"{'it' if len(theirs) == 1 else 'them'}: choose a new --out, or move "
                        f"{'it' if len(theirs) == 1 else 'them'} away")
    check_store_writable(opts.results_store)  # the sweep's rows go there at the end: known now, not after hours
    if opts.data != "synthetic":
        opts.data = str(Path(opts.data).resolve())  # trials run in their own folders, maybe on other nodes
    if opts.cache_root:
        opts.cache_root = str(Path(opts.cache_root).resolve())
    if opts.storage:
        opts.storage = plain_storage(opts.storage)
    before = _resumable(opts) if opts.resume else None
    started = before.get("started", time.time()) if before else time.time()
    with _stop_signals() as signals:
        if b.trainer == "nnunet":  # the trials train nnU-Net's preprocessed data: pgps-tune's loader never reads it
            ds = opts.nnunet_check()
            final, pools = _nnunet_patch(opts, ds)
        else:
            ds = prepare(opts.data, cache_root=opts.cache_root, synthetic_cases=b.synthetic_cases,
                         synthetic_shape=b.synthetic_shape)  # once per sweep; trials memory-map this cache
            plan = plan_patch(ds.median_shape, ds.spacing)
            final = tuple(b.final_patch) if b.final_patch else plan.final_patch
            pools = tuple(b.pools) if b.pools else plan.pools
        if before:
            _same_sweep(before, {"final_patch": list(final), "pools": list(pools)})
        check_space_against_plan(space, final, pools)
        if b.trainer != "nnunet":
            split(ds, b.val_fraction, b.split_seed)  # a dataset every trial would fail on is refused before any starts
            if not opts.address:  # the trials run here: references that cannot fit, too
                _check_reference_memory(space, trial_setup(space, opts.data, ds.cache_dir, final, pools,
                                                           opts.cpus_per_trial, opts.gpus_per_trial))
        if opts.warm_start:  # a store with nothing to add is refused before Ray starts
            stored_trials(ds.name, space.key(), list(final), opts.results_store,
                          exclude_sweep=before["sweep"] if before else out.resolve().name,
                          exclude_origins=own_origins(out, before),
                          tuned=tuned_on(ds.plan, b.trainer) if b.trainer == "nnunet" else None)
        storage_fs, storage_path = resolve_storage(opts.storage, out)
        if before:  # what Tune would restore is checked before sweep.json says the sweep is unfinished again
            for name in before["experiments"].values():
                _check_tune_state(f"{storage_path.rstrip('/')}/{name}", storage_fs, name)
        num_samples = opts.search_samples()
        if before:  # the trials already run were compared (partial) or trained (compressed) under these
            _same_sweep(before, {}, _search_changes(before, space, num_samples))
        settings = ConfirmSettings.from_space(space, ds) if space.confirm.enabled else None
        if settings is not None and space.objective.type == "pareto":
            settings = None  # one confirmed winner by one score does not fit a front of many
            print("pgps-tune: confirmation skipped: a pareto sweep exports a front, not one winner to confirm "
                  "(confirm a front schedule with 'pgps-tune train --schedule pareto/TRIAL.yaml --seed N')",
                  file=sys.stderr, flush=True)
        if settings is not None and before:
            settings = resumed_confirmation(before, settings)  # never shrinks what 'pgps-tune confirm' added
        with _ray_session(opts, signals) as autoscales:
            if opts.address:  # the trials may run on other machines: what they need must be there too
                nnunet_trainer = b.trainer == "nnunet"
                check_cluster_paths(opts.cpus_per_trial, opts.gpus_per_trial, storage_fs, storage_path,
                                    None if nnunet_trainer else opts.data,
                                    None if nnunet_trainer else str(Path(ds.cache_dir).parent),
                                    str(ds.plan.source) if nnunet_trainer else None, autoscales)
            meta = _run_phases(opts, signals, ds, final, pools, storage_fs, storage_path, num_samples, started,
                               settings, before)
        try:
            summary = export_sweep(out, meta, read_trials(meta), opts.results_store)
        except SweepInterrupted as exc:
            exc.exporting = True
            raise
        _log_sweep_run(opts, summary, meta)
        return summary


def _log_sweep_run(opts: SweepOptions, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    """The sweep's own MLflow run (:func:`log_sweep_to_mlflow`), after its export, where it logs to MLflow."""
    if opts.mlflow:
        try:
            log_sweep_to_mlflow(opts.mlflow, opts.mlflow_experiment, opts.out, summary, meta)
        except Exception as exc:  # the sweep is exported: the tracking server cannot undo that
            _mlflow_failed("the sweep's own run", exc, f"the sweep is exported in {opts.out} all the same")


def _nnunet_patch(opts: SweepOptions, ds) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The final patch and pools of a sweep whose trials train nnU-Net: its plans'.  ``--data`` is not read
    (the trials train the plans' preprocessed dataset): one naming another nnU-Net dataset is refused, any
    other is named in a note."""
    from pgps_tune.nnunet import unread_data

    plan, b = ds.plan, opts.space.budget
    if (note := unread_data(opts.data, plan, "the trials train")) is not None:
        print(f"pgps-tune: note: {note}", file=sys.stderr, flush=True)
    for key, theirs in (("final_patch", plan.final_patch), ("pools", plan.pools)):
        ours = getattr(b, key)
        if ours and tuple(ours) != tuple(theirs):
            raise PgpsError(f"budget.{key} {list(ours)} differs from {list(theirs)} of the nnU-Net plans "
                            f"{plan.source}; drop budget.{key} (the plans set it)")
    return tuple(plan.final_patch), tuple(plan.pools)


def sweep_meta(folder: str | Path) -> dict[str, Any]:
    """The sweep.json of the sweep in ``folder``, its Tune storage as it is on this machine
    (:func:`pgps_tune.results.tune_storage`: a copied or moved folder's own), saying so in one note line
    when that differs from the recorded one."""
    meta = read_meta(folder)
    meta["storage_path"], note = tune_storage(folder, meta)
    if note:
        print(f"pgps-tune: note: {note}", file=sys.stderr, flush=True)
    return meta


def _writable_here(folder: Path, meta: dict[str, Any], command: str) -> None:
    """Refuse to write Tune experiments for a copy of a sweep whose storage (outside the folder) the copy
    shares with the folder it was copied from: both would run and read the same experiments."""
    origin = shared_storage(folder, meta)
    if origin:
        raise PgpsError(f"{folder} is a copy of the sweep in {origin} and shares its Tune storage "
                        f"{meta['storage_path']}; '{command}' here would write into that sweep's experiments: "
                        f"run it on {origin}, or move the folder instead of copying it")


def _resumable(opts: SweepOptions) -> dict[str, Any]:
    """The sweep.json of the sweep ``tune --resume`` continues, once the command is known to continue that
    sweep: the same space (parameters, objective, budget), data and storage, and a study Optuna can read.
    Its storage becomes ``opts.storage`` where none was given.  Nothing is written."""
    before = sweep_meta(opts.out)
    _writable_here(opts.out, before, "tune --resume")
    setup = before.get("trial_setup")
    stored = setup.get("budget") if isinstance(setup, dict) else None
    stored = stored if isinstance(stored, dict) else {}  # written before sweep.json kept the budget
    budget = asdict(opts.space.budget)
    changed = [k for k in budget if k in stored and json.dumps(stored[k]) != json.dumps(budget[k])]
    _same_sweep(before, {"space_key": opts.space.key(), "data": str(opts.data)},
                {f"budget.{k}": (stored[k], budget[k]) for k in changed})
    stored, path = before.get("storage"), before["storage_path"]
    remote = "://" in plain_storage(stored) if stored else False  # a file:// storage is a local path
    if opts.storage is None:
        if stored is not None:
            opts.storage = stored if remote else path
    elif plain_storage(opts.storage) != (stored if remote else path):
        raise PgpsError(f"--storage {opts.storage} differs from the storage this sweep's Tune experiments are in "
                        f"({stored if remote else path}); resume with that --storage, or leave --storage out")
    if "study" in before:
        check_journal(opts.out)
    return before


# what a resumed sweep must share with the one it continues: the trials it ran are scored under these
_SAME = {"data": "the data (--data)", "final_patch": "the final patch", "pools": "the pools"}


def _same_sweep(before: dict[str, Any], now: dict[str, Any], budget: dict[str, tuple] | None = None) -> None:
    """Refuse, in one line naming what differs, a resume that would continue the stored sweep with other
    settings (``budget``: the budget keys that differ, as (then, now))."""
    differ = {f"{_SAME[k]}: {before[k]} then, {v} now" for k, v in now.items()
              if k != "space_key" and k in before and before[k] != v}
    what = [f"{k}: {json.dumps(then)} then, {json.dumps(v)} now" for k, (then, v) in (budget or {}).items()]
    if "space_key" in now and before.get("space_key") not in (None, now["space_key"]) and not what:
        what = ["the space's parameters or objective"]
    what += sorted(differ)
    if what:
        what = "; ".join(what)
        raise PgpsError(f"--resume would continue sweep {before['sweep']} with other settings than it ran with "
                        f"({what}); give the same space and flags as it started with, or start a new sweep "
                        "with a new --out")


def ladder_meta(space: SearchSpace, num_samples: int) -> dict[str, Any] | None:
    """What sweep.json records of a compressed ladder (``fidelity``): its rungs' budgets and trial counts."""
    a = space.asha
    if a.fidelity != "compressed":
        return None
    rungs = compressed_ladder(a.promote, num_samples, a.reduction_factor, a.min_fraction,
                              space.budget.iterations_per_epoch, a.promote_top)
    return {"type": "compressed", "promote": a.promote, "rungs": [dataclasses.asdict(r) for r in rungs],
            UNIQUE_BY: "training"}


# what a compressed ladder promotes once: "training", one trial per schedule trained (results.training_key);
# "params" (a sweep.json without the key), one per parameter set, as ladders did before
UNIQUE_BY = "unique_by"


def _search_changes(before: dict[str, Any], space: SearchSpace, num_samples: int) -> dict[str, tuple]:
    """The search settings a resume would change, as (then, now): the trial count, ASHA's settings (the rungs
    the stored trials were compared at) and a compressed ladder (the budgets its rungs trained at).  A sweep.json
    that predates a key is not compared on it."""
    changes: dict[str, tuple] = {}
    if isinstance(before.get("num_samples"), int) and before["num_samples"] != num_samples:
        changes["search.num_samples (--num-samples)"] = (before["num_samples"], num_samples)
    if isinstance(before.get("early_stopping"), bool) and before["early_stopping"] != early_stopping(space):
        changes["ASHA early stopping"] = (before["early_stopping"], early_stopping(space))
    stored, now = before.get("asha"), AshaSettings.from_space(space).to_dict()
    if isinstance(stored, dict) and early_stopping(space):
        changes.update({f"asha {k}": (stored[k], v) for k, v in now.items() if k in stored and stored[k] != v})

    def rungs(ladder: Any) -> str:
        if not isinstance(ladder, dict):
            return "none (partial fidelity)"
        return ", ".join(f"{r.get('trials')} at {r.get('fraction', 0):.3g}" for r in ladder.get("rungs", []))

    if "asha" in before and rungs(before.get("fidelity")) != rungs(ladder := ladder_meta(space, num_samples)):
        changes["the compressed ladder's rungs (trials at a share of the budget)"] = (
            rungs(before.get("fidelity")), rungs(ladder))
    return changes


def _check_tune_state(path: str, storage_fs, phase: str) -> None:
    """Repair (or refuse) a Tune experiment a resume will restore, before anything is rewritten."""
    if not tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        return
    import pyarrow.fs as pafs

    for note in repair_tune_state(path, storage_fs):
        print(f"pgps-tune: {phase}: {note}", file=sys.stderr, flush=True)
    vet_tune_state(path, storage_fs)
    fs = storage_fs or pafs.LocalFileSystem()
    if _newest_state([i.base_name for i in _state_file_infos(fs, path)]):
        read_experiment(fs, path)  # one Tune could not read would make it start the phase over


class OneLineRayErrors(logging.Filter):
    """Ray logs some failures it recovers from with a whole traceback (e.g. a state upload that lost a
    race with one of its own temporary files, retried at the next sync): keep them to one line."""

    LOGGERS = ("ray.tune.execution.experiment_state", "ray.tune.execution.tune_controller",
               "ray.train._internal.syncer", "ray.train._internal.storage")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            first = (str(exc).splitlines() or [""])[0][:200]
            record.msg, record.args = f"{record.getMessage().strip()} ({type(exc).__name__}: {first})", None
            record.exc_info, record.exc_text = None, None
        return True


def _one_line_ray_errors() -> None:
    for name in OneLineRayErrors.LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, OneLineRayErrors) for f in log.filters):
            log.addFilter(OneLineRayErrors())


# How stale Tune's experiment snapshot may get, in seconds (its own default, "auto", is 10 s or more).
# With CheckpointConfig(num_to_keep=1) Tune snapshots after every trial checkpoint anyway; the period
# covers what comes without one (a trial ending, stopped by ASHA, started).  What a kill can lose in
# that window is recovered on resume: a trial restored from its final checkpoint says its result
# again (_train), a trial asked but unknown to the snapshot is ended as FAIL in the study
# (PrunedAwareOptunaSearch.restore).  0 (every step of Tune's loop, ~10 per second) rewrites the
# whole state that often: 53% of a 300-trial sweep's wall time, 31% at 1 s (BENCHMARKS section 10).
SNAPSHOT_PERIOD_S = "1"


@contextlib.contextmanager
def _ray_session(opts: SweepOptions, signals: _StopSignals):
    """Tune's environment, and Ray started (or joined) for the block; a local Ray of ours goes however it ends."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_PERIOD_S)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # ASHA's rung_score is absent from a trial's reports until it trains at the final patch
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    own_ray = not ray.is_initialized()  # a caller's Ray stays
    _one_line_ray_errors()
    if own_ray and not opts.address:  # the local Ray about to start has this machine's CPUs: no need to start it
        check_resources(opts.cpus_per_trial, None, [{"CPU": float(local_cpus())}])
    try:
        with signals.held():
            start_ray(opts.address)
        signals.install()
        types = declared_node_types() if opts.address else []
        if check_resources(opts.cpus_per_trial, opts.gpus_per_trial, node_types=types,
                           autoscaling=opts.autoscaling if opts.address else None,
                           pending_timeout=opts.pending_timeout) and not opts.max_concurrent:
            print("pgps-tune: note: without --max-concurrent, Tune asks for one waiting trial at a time, so the "
                  "autoscaler starts their nodes one after another; --max-concurrent N asks for N at once",
                  file=sys.stderr, flush=True)
        yield bool(opts.address and (opts.autoscaling or types))
    finally:
        if own_ray:
            ray.shutdown()
            # shutting down sets SIGTERM back to the system's default (the process would die without a word
            # while Python still names its handler): take the signals back for the export that follows
            signals.install()


def _run_phases(opts: SweepOptions, signals: _StopSignals, ds, final, pools, storage_fs, storage_path: str,
                num_samples: int, started: float, confirm: ConfirmSettings | None,
                before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the phases; ``before``: the sweep.json of the sweep a resume continues (its name, Tune experiments
    and study are kept, whatever the folder is called now)."""
    space, b = opts.space, opts.space.budget
    nnunet_trainer = b.trainer == "nnunet"  # ds: nnU-Net's preprocessed dataset (a SweepDataset), no cache
    name = before["sweep"] if before else opts.out.resolve().name
    kept = before["experiments"] if before else {}
    meta = {
        "format_version": FORMAT_VERSION, "sweep": name, "space": space.source, "space_name": space.name,
        "dataset": ds.name, "data": str(opts.data), **({} if nnunet_trainer else {"cache_dir": str(ds.cache_dir)}),
        "final_patch": list(final), "pools": list(pools), "storage": opts.storage, "storage_path": storage_path,
        FOLDER_KEY: str(opts.out.resolve()),
        "experiments": {p: kept.get(p, f"{name}-{p}") for p in ("references", "search")
                        if p == "search" or space.search.references},
        "num_samples": num_samples, "objective": asdict(space.objective),
        "asha": AshaSettings.from_space(space).to_dict(), "early_stopping": early_stopping(space),
        "cpus_per_trial": opts.cpus_per_trial, "gpus_per_trial": opts.gpus_per_trial,
        "started": started, "finished": False, "space_key": space.key(),
        **({"study": (before or {}).get("study", name), "study_file": STUDY_FILE}
           if space.search.algorithm != "grid" else {}),
    }
    mlflow_tracked(opts, meta, before)
    setup = trial_setup(space, opts.data, None if nnunet_trainer else ds.cache_dir, final, pools,
                        opts.cpus_per_trial, opts.gpus_per_trial)
    if nnunet_trainer:
        plan = ds.plan
        setup["nnunet"] = {"plans": str(plan.source), "configuration": plan.configuration}
        meta["nnunet"] = {**tuned_on(plan, b.trainer), "fold": b.nnunet_fold}
    elif (plan := _tuned_plan(opts)) is not None:  # what export --nnunet compares the plans it writes for with
        meta["nnunet"] = tuned_on(plan, b.trainer)
    elif isinstance((before or {}).get("nnunet"), dict):  # resumed without --nnunet-plans, on the same budget
        meta["nnunet"] = before["nnunet"]
    # what 'pgps-tune confirm' needs; a confirmation always compares with both references of the paper
    meta.update(trial_setup=setup, reference_configs=reference_configs(space, confirm_references(space)))
    if before:
        _keep_confirmations(meta, before, confirm)
        if PICK in before:  # the rule an 'export --pick' chose for this sweep's front
            meta[PICK] = before[PICK]
    write_meta(opts.out, meta)
    plans = search_plans(space, num_samples)
    refs = reference_configs(space) if space.search.references else []
    if refs:
        plans.insert(0, PhasePlan("references", len(refs), float(b.epochs * b.iterations_per_epoch),
                                  known=tuple(_fractions(refs, setup, b.epochs))))
    if confirm is not None:
        plans.append(confirm_plan(confirm, b.iterations_per_epoch,
                                  _fractions(meta["reference_configs"], setup, confirm.epochs),
                                  full_budget_schedules(space, plans)))
    with _sweep_clock(plans, opts, done=resumed_lines(before, plans, storage_fs, storage_path) if before else None):
        _phases(opts, signals, meta, setup, storage_fs, storage_path, num_samples, confirm, refs, before)
    meta["finished"] = True
    write_meta(opts.out, meta)
    return meta


def _tuned_plan(opts: SweepOptions) -> NnunetPlan | None:
    """The nnU-Net plan whose patch, poolings and batch size the budget trains (``tune --nnunet-plans`` with
    pgps-tune's trainer: :func:`pgps_tune.nnunet.plan_space`), None for a sweep on pgps-tune's own plan."""
    plan, b = opts.nnunet_plans, opts.space.budget
    if not isinstance(plan, NnunetPlan):
        return None
    trains = (tuple(b.final_patch or ()), tuple(b.pools or ()), b.batch_size)
    return plan if (plan.final_patch, plan.pools, plan.batch_size) == trains else None


def _phases(opts: SweepOptions, signals: _StopSignals, meta: dict[str, Any], setup: dict[str, Any], storage_fs,
            storage_path: str, num_samples: int, confirm: ConfirmSettings | None, refs: list[dict[str, Any]],
            before: dict[str, Any] | None = None) -> None:
    """The sweep's phases in order: references (``refs``), search (one rung after another if compressed),
    confirmation; ``before``: the sweep.json a resume continues."""
    space, b = opts.space, opts.space.budget
    if refs:
        run_phase("references", opts, setup, storage_fs, storage_path, meta["experiments"]["references"],
                  ListSearcher(refs), len(refs), None, signals=signals)
    if space.objective.type == "cheapest_within":
        rows = trial_rows(read_trials(meta, phases=("references",)), meta)
        baseline = next((r for r in rows if r["role"] == "baseline" and r["completed"]), None)
        if baseline is None:
            raise PgpsError("the constant baseline reference did not complete (see its error in "
                            f"{storage_path}), so cheapest_within has no target Dice; fix that and rerun")
        setup["target_dice"] = meta["target_dice"] = baseline["final_dice"] - space.objective.tolerance
        write_meta(opts.out, meta)

    from ray.tune.schedulers import ASHAScheduler

    pareto = space.objective.type == "pareto"
    if pareto and space.asha.enabled:
        print("pgps-tune: objective pareto: ASHA early stopping is off (it ranks trials mid-run by one number, and "
              "would stop cheap schedules the front needs; see docs/GUIDE.md)", file=sys.stderr, flush=True)
    if (why := asha_cannot_stop(space)) is not None:
        print(f"pgps-tune: note: no trial will be stopped early: {why}", file=sys.stderr, flush=True)
    scheduler = (ASHAScheduler(metric="rung_score", mode="max", **AshaSettings.from_space(space).to_dict())
                 if early_stopping(space) else None)
    if space.search.algorithm == "grid":
        searcher = ListSearcher(grid_sample(space, num_samples) if space.asha.promote == "main_effects"
                                else space.grid())
    else:
        searcher = optuna_searcher(opts, meta, before)
    stopper = None
    if space.search.max_compute > 0:
        stopper = ComputeBudget(space.search.max_compute * b.epochs * b.iterations_per_epoch)
    if space.asha.fidelity == "compressed":
        run_compressed(opts, signals, meta, setup, searcher, num_samples, storage_fs, storage_path, before)
    else:
        run_phase("search", opts, setup, storage_fs, storage_path, meta["experiments"]["search"],
                  searcher, num_samples, scheduler, stopper, signals=signals)
    if confirm is not None:
        run_confirmation(opts, meta, confirm, storage_fs, signals)


def _check_reference_memory(space: SearchSpace, setup: dict[str, Any]) -> None:
    """Refuse, before any trial, references whose largest batch cannot fit this machine: every trial of theirs
    would be killed for memory (:func:`pgps_tune.trainer.check_batch_memory`)."""
    import torch

    from pgps_tune.config import TrainConfig
    from pgps_tune.trainer import check_batch_memory

    b = setup["budget"]
    multiple_of = patch_multiple(b["network"], setup["pools"], b["token_size"])
    device = "cuda" if setup["gpus_per_trial"] > 0 else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return  # no GPU here to measure: the cluster's resources are checked once Ray runs (check_resources)
    for config in reference_configs(space) if space.search.references else []:
        s = schedule_from_params(config, setup["final_patch"], setup["pools"], b["batch_size"], b["epochs"],
                                 multiple_of)
        check_batch_memory(s, TrainConfig.for_trial(b, config, device=device, threads=1),
                           f"{TUNE_MEMORY_FIX} (this is the {config.get('role', 'reference')} reference)")


def _fractions(configs: list[dict[str, Any]], setup: dict[str, Any], epochs: int) -> list[float]:
    """The voxel fractions of fixed schedules (the references) at ``epochs``: their cost, known before they run."""
    b = setup["budget"]
    multiple_of = patch_multiple(b["network"], setup["pools"], b["token_size"])
    return [schedule_from_params(c, setup["final_patch"], setup["pools"], b["batch_size"], epochs,
                                 multiple_of).voxel_fraction() for c in configs]


def plan_text(plans: list[PhasePlan], done: dict[str, tuple[TrialLine, ...]] | None = None) -> str:
    """The plan line; ``done``: the trials each phase ran before a resume (:func:`resumed_lines`), and the
    line then says what is left, and what was done.

    >>> plans = [PhasePlan("search", 3, 100.0), PhasePlan("confirm", 2, 50.0)]
    >>> plan_text(plans)[:60]
    'pgps-tune: plan: search 3 trials, confirm 2 trials: about 40'
    >>> text = plan_text(plans, {"search": (TrialLine("a", "search", status="completed", compute=100.0),)})
    >>> text[17:text.index(": about")]
    'left of the resumed sweep: search 2 of 3 trials, confirm 2 trials'
    >>> text[text.index("about"):text.index(" (searched")]
    'about 300 baseline-equivalent iterations (done before the resume: 1 trial ended, 100 iterations trained)'
    """
    bound = any(p.bound for p in plans)
    if done is None:
        what = ", ".join(f"{p.phase} {plural(p.trials, 'trial')}" for p in plans)
        total, before = sum(p.compute(1.0) for p in plans), ""
    else:
        resumed = [p.resumed(done.get(p.phase, ())) for p in plans]
        what = "left of the resumed sweep: " + ", ".join(
            f"{p.phase} {p.trials - ended} of {plural(p.trials, 'trial')}" if ended else
            f"{p.phase} {plural(p.trials, 'trial')}" for p, (ended, _, _) in zip(plans, resumed))
        total = sum(left for *_, left in resumed)
        before = (f" (done before the resume: {plural(sum(ended for ended, _, _ in resumed), 'trial')} ended, "
                  f"{sum(did for _, did, _ in resumed):.0f} iterations trained)")
    return (f"pgps-tune: plan: {what}: {'at most' if bound else 'about'} {total:.0f} baseline-equivalent iterations"
            f"{before} (searched schedules at the baseline's cost until they report theirs); the ETA comes from the "
            "trials' own timings, start-up included, once a trial has reported twice")


def plan_event(plans: list[PhasePlan], done: dict[str, tuple[TrialLine, ...]] | None = None) -> dict[str, Any]:
    """The JSON ``plan`` event: each phase's trials and compute; after a resume (``done``, as :func:`plan_text`)
    also what each has done and has left."""
    phases = [{"phase": p.phase, "trials": p.trials, "compute": p.compute(1.0), "upper_bound": p.bound}
              for p in plans]
    event = {"event": "plan", "phases": phases, "compute": sum(p.compute(1.0) for p in plans),
             "upper_bound": any(p.bound for p in plans)}
    if done is not None:
        for phase, plan in zip(phases, plans):
            ended, did, left = plan.resumed(done.get(plan.phase, ()))
            phase.update(trials_done=ended, compute_done=did, compute_left=left)
        event.update(compute_done=sum(p["compute_done"] for p in phases),
                     compute_left=sum(p["compute_left"] for p in phases))
    return event


@contextlib.contextmanager
def _sweep_clock(plans: list[PhasePlan], opts: SweepOptions, announce: bool = True,
                 done: dict[str, tuple[TrialLine, ...]] | None = None):
    """The sweep's ETA for the phases ``plans`` lists, shown by every phase's :class:`Progress`; its plan is
    announced first, as a line (or a JSON ``plan`` event); ``done``: what a resumed sweep ran before
    (:func:`resumed_lines`)."""
    from pgps_tune.errors import strict_json

    mode = "none" if opts.quiet or not announce else opts.progress
    if mode == "json":
        print(strict_json(plan_event(plans, done), indent=None), file=sys.stderr, flush=True)
    elif mode != "none":
        print(plan_text(plans, done), file=sys.stderr, flush=True)
    Progress.sweep_eta = SweepEta(plans)
    try:
        yield
    finally:
        Progress.sweep_eta = None


# -- confirmation -----------------------------------------------------------------------------------

# The search picks its best from one training per schedule; on small data the seed-to-seed spread
# is as large as the gaps between schedules.  The confirmation retrains the best few distinct
# searched schedules and both references on the same fresh seeds (or the same cross-validation
# folds), without early stopping, and results.confirmation_summary pairs them up.  Each run is a
# Tune experiment of its own (confirm, confirm-2, ...), listed in sweep.json's experiments once
# finished; while it runs, sweep.json's pending_confirm names it, so a resumed sweep or a rerun of
# 'pgps-tune confirm' restores it, and an extension trains only the trials no earlier run did.


@dataclass(frozen=True)
class ConfirmSettings:
    """One confirmation: how many schedules, on which repeats (seeds or folds), at which budget."""

    top_k: int
    epochs: int
    seeds: int | None = None  # repeats on seeds budget.seed + 1 ... + seeds (fresh: not the search's seed)
    folds: int | None = None  # or on cross-validation folds (a seeded split, or the splits file)
    splits: str | None = None

    @classmethod
    def from_space(cls, space: SearchSpace, ds) -> ConfirmSettings:
        """The space's confirm section (epochs null: the search's), checked against the dataset."""
        c = space.confirm
        check_space_splits(space)
        return cls.checked(c.top_k, c.epochs or space.budget.epochs, c.seeds, c.folds, c.splits, ds,
                           space.budget.split_seed, source=f"{space.source}: confirm")

    @classmethod
    def checked(cls, top_k: int, epochs: int, seeds: int | None, folds: int | None, splits: str | None, ds,
                split_seed: int, source: str) -> ConfirmSettings:
        """Settings whose folds all exist for dataset ``ds`` (else a one-line error before any trial starts);
        ``ds`` a :class:`pgps_tune.nnunet.SweepDataset`: nnU-Net's folds of it."""
        from pgps_tune.data import FOLDS, fold_split, read_splits

        if splits:
            splits = str(Path(splits).resolve())  # trials read it from their own folders
            entries = read_splits(splits, FOLDS)
            if not isinstance(entries, list) or len(entries) < 2 or not all(
                    isinstance(e, dict) and all(isinstance(e.get(k), list) for k in ("train", "val"))
                    for e in entries):
                got = (f"a list of {len(entries)}" if isinstance(entries, list) and len(entries) < 2 else
                       "a list with an entry that is not such a fold" if isinstance(entries, list) else
                       "a JSON object, not a list" if isinstance(entries, dict) else "not a list")
                raise PgpsError(f"{source}: the splits file {splits} must be a list of at least 2 cross-validation "
                                'folds [{"train": [case ids], "val": [case ids]}, ...] (as nnU-Net\'s '
                                f"splits_final.json); it is {got}")
            n = len(entries)
            if folds is not None and folds != n:
                raise PgpsError(f"{source}: folds is {folds} but the splits file {splits} lists {n}; "
                                "give one of them, or make them agree")
            folds = n
        if folds is not None:
            if folds < 2:
                raise PgpsError(f"{source}: {folds} folds asked for; cross-validation needs at least 2")
            if isinstance(ds, SweepDataset):  # its trials train nnU-Net's folds (a splits file is refused earlier)
                ds.check_folds(folds, source)
                return cls(top_k, epochs, folds=folds)
            if not splits and folds > len(ds):
                raise PgpsError(f"{source}: {folds} folds asked for, but dataset {ds.name} has {len(ds)} cases; "
                                f"use 2 to {len(ds)} folds")
            for fold in range(folds):
                fold_split(ds, folds, fold, split_seed, splits)
            return cls(top_k, epochs, folds=folds, splits=splits)
        return cls(top_k, epochs, seeds=seeds)

    @property
    def repeat(self) -> str:
        return "fold" if self.folds else "seed"

    def repeats(self, budget_seed: int) -> list[dict[str, Any]]:
        """What each repeat adds to a schedule's config."""
        if self.folds:
            return [{"fold": i, "folds": self.folds, **({"splits": self.splits} if self.splits else {})}
                    for i in range(self.folds)]
        return [{"seed": (budget_seed + 1 + i) % 2**32} for i in range(self.seeds or 0)]

    def configs(self, candidates: list[dict[str, Any]], references: list[dict[str, Any]],
                budget_seed: int) -> list[dict[str, Any]]:
        """Every confirmation trial: each candidate and reference on each repeat, at this budget."""
        schedules = [(r["role"], {**r}) for r in references]
        schedules += [(c["trial_id"], {**json.loads(c["params"]), "role": "search"}) for c in candidates]
        return [{**config, "candidate": name, "epochs": self.epochs, **rep}
                for rep in self.repeats(budget_seed) for name, config in schedules]


def _keep_confirmations(meta: dict[str, Any], before: dict[str, Any], confirm: ConfirmSettings | None) -> None:
    """On --resume: keep the confirmation runs the sweep.json before held (the phases rewrite the rest)."""
    for key, name in before.get("experiments", {}).items():
        if phase_of(key) == "confirm":
            meta["experiments"][key] = name
    for key in ("confirmation", "pending_confirm"):
        if key in before:
            meta[key] = before[key]
    pending = before.get("pending_confirm")
    if pending and confirm is not None and pending["settings"] != asdict(confirm):
        raise PgpsError(f"this sweep's confirmation ({_describe(pending['settings'])}) was interrupted; resume it "
                        "with the confirm settings it started with, then run 'pgps-tune confirm' for others")


# A confirmation's evidence only grows.  Two confirmations *pool* when their trials are repeats of one
# experiment: the same epochs and the same kind of repeat (seeds, or the same folds of the same split);
# then the one that runs is their union (the larger top_k, the more seeds), so no later step (tune
# --resume with the space's settings, confirm with fewer seeds or a smaller top-k) drops repeats an
# earlier confirm added.  Confirmations that do not pool are different experiments: 'confirm' may
# replace the exported one (its trials stay in trials.parquet, sweep.json lists it under
# confirmation.replaced), a resume refuses to.


def held_confirmation(meta: dict[str, Any]) -> ConfirmSettings | None:
    """The sweep's confirmation settings: an interrupted one's, else the last finished one's (None: none)."""
    held = (meta.get("pending_confirm") or meta.get("confirmation") or {}).get("settings")
    return ConfirmSettings(**held) if isinstance(held, dict) else None


def _earlier(meta: dict[str, Any]) -> list[ConfirmSettings]:
    """Every confirmation the sweep ran or started: its own, and the ones another replaced."""
    replaced = (meta.get("confirmation") or {}).get("replaced", [])
    return [s for s in [held_confirmation(meta)] + [ConfirmSettings(**r) for r in replaced] if s is not None]


def _pools(a: ConfirmSettings, b: ConfirmSettings) -> bool:
    return (a.epochs, a.folds, a.splits, a.seeds is None) == (b.epochs, b.folds, b.splits, b.seeds is None)


def _union(earlier: list[ConfirmSettings], asked: ConfirmSettings) -> ConfirmSettings:
    """``asked``, grown to keep every schedule and repeat of the ``earlier`` confirmations it pools with."""
    for held in (h for h in earlier if _pools(h, asked)):
        asked = dataclasses.replace(asked, top_k=max(held.top_k, asked.top_k),
                                    seeds=max(held.seeds, asked.seeds) if asked.seeds is not None else None)
    return asked


def resumed_confirmation(before: dict[str, Any], asked: ConfirmSettings) -> ConfirmSettings:
    """On ``tune --resume``: the confirmation to run, given the space's (``asked``) and the sweep's own.

    The sweep's own (which 'pgps-tune confirm' may have extended) is kept where it pools with the
    space's, grown by whatever the space asks beyond it; one that does not pool is refused in one
    line, before anything is written: resuming must not replace a verdict."""
    held = held_confirmation(before)
    if held is None:
        return asked
    if not _pools(held, asked):
        raise PgpsError(f"sweep {before['sweep']}'s confirmation ({_describe(asdict(held))}) differs from the one "
                        f"the space asks for ({_describe(asdict(asked))}); --resume would replace its verdict: "
                        f"resume with {confirmation_flags(asdict(held), tune=True)}, or with "
                        "--no-confirm to keep it as it is (change a finished sweep's confirmation with 'pgps-tune "
                        "confirm')")
    merged = _union(_earlier(before), asked)
    if merged != asked:
        print(f"pgps-tune: note: keeping sweep {before['sweep']}'s confirmation ({_describe(asdict(merged))}), "
              f"which extends the space's ({_describe(asdict(asked))})", file=sys.stderr, flush=True)
    return merged


def reference_keys(meta: dict[str, Any]) -> list[str]:
    """What the references a confirmation trains train at the search's budget (:func:`training_key`): a searched
    schedule that trains one of them is no candidate, whether or not the sweep trained the references first."""
    return [config_key(meta["trial_setup"], c) for c in meta["reference_configs"]]


def config_key(setup: dict[str, Any], config: dict[str, Any]) -> str:
    """What a trial of ``config`` trains under ``setup`` (:func:`training_key`), without training it."""
    b = setup["budget"]
    multiple_of = None if b.get("trainer") == "nnunet" else patch_multiple(b["network"], setup["pools"],
                                                                            b["token_size"])
    return training_key(schedule_from_params(config, setup["final_patch"], setup["pools"], b["batch_size"],
                                             b["epochs"], multiple_of).to_dict(), config, b)


def _pooled_repeat(config: dict[str, Any], settings: ConfirmSettings) -> bool:
    """Whether confirmation trial ``config`` is a repeat of the experiment ``settings`` asks for (:func:`_pools`)."""
    if config.get("epochs") != settings.epochs:
        return False
    if settings.seeds is not None:
        return "seed" in config
    return "fold" in config and (config.get("folds"), config.get("splits")) == (settings.folds, settings.splits)


def confirmed_before(meta: dict[str, Any], rows: list[dict[str, Any]], settings: ConfirmSettings) -> set[str]:
    """The searched trials that earlier runs of this confirmation (those it pools with, interrupted, finished or
    replaced) confirmed: they stay its candidates, whatever rule picked them."""
    configs = [*(meta.get("pending_confirm") or {}).get("configs", []),
               *(meta.get("confirmation") or {}).get("configs", []),
               *(json.loads(r["params"]) for r in rows if r["phase"] == "confirm")]
    return {c["candidate"] for c in configs
            if isinstance(c, dict) and c.get("role") == "search" and _pooled_repeat(c, settings)}


def run_confirmation(opts: SweepOptions, meta: dict[str, Any], settings: ConfirmSettings, storage_fs,
                     signals: _StopSignals | None) -> None:
    """Run (or continue, or extend) the confirmation ``settings`` asks for; record it in sweep.json."""
    settings = _union(_earlier(meta), settings)  # never fewer schedules or seeds than it has
    rows = trial_rows(read_trials(meta), meta)
    b = meta["trial_setup"]["budget"]
    candidates = confirm_candidates(rows, settings.top_k, meta["objective"], reference_keys(meta), b,
                                    held=confirmed_before(meta, rows, settings))
    configs = settings.configs(candidates, meta["reference_configs"], meta["trial_setup"]["budget"]["seed"])
    if Progress.sweep_eta is not None:  # the search's distinct completed schedules may be fewer than top_k
        Progress.sweep_eta.at_most(["confirm"], len(candidates))
    pending = meta.get("pending_confirm")
    if pending and pending["settings"] != asdict(settings):
        raise PgpsError(f"an earlier confirmation ({_describe(pending['settings'])}) was interrupted; finish it "
                        "first by giving the same settings again")
    if not candidates and not pending:
        done = sum(r["phase"] == "search" and r["role"] == "search" and r["completed"] and full_fidelity(r)
                   for r in rows)
        why = ("no searched schedule completed" if not done else
               f"the {plural(done, 'completed searched trial')} trained only the references' schedules"
               + (" or schedules over the voxel budget" if meta["objective"]["type"] == "dice_under_budget" else ""))
        print(f"pgps-tune: confirm: {why}, so there is nothing to confirm", file=sys.stderr)
    if candidates and not pending:
        ran = {r["params"] for r in rows if r["phase"] == "confirm"}  # an extension trains only what is new
        todo = [c for c in configs if json.dumps(c, sort_keys=True) not in ran]
        runs = [k for k in meta["experiments"] if phase_of(k) == "confirm"]
        if todo:
            pending = {"key": "confirm" if not runs else f"confirm-{len(runs) + 1}", "settings": asdict(settings),
                       "configs": todo}
            meta["pending_confirm"] = pending
            write_meta(opts.out, meta)
    if pending:
        name = f"{meta['sweep']}-{pending['key']}"
        setup = {**meta["trial_setup"], "cpus_per_trial": opts.cpus_per_trial, "gpus_per_trial": opts.gpus_per_trial}
        run_phase("confirm", opts, setup, storage_fs, meta["storage_path"], name,
                  ListSearcher(pending["configs"]), len(pending["configs"]), None, signals=signals)
        meta["experiments"][pending["key"]] = name
    meta.pop("pending_confirm", None)
    last = meta.get("confirmation") or {}
    replaced = [r for r in last.get("replaced", [])  # what pools with this run is in it again
                if not _pools(ConfirmSettings(**r), settings)]
    if isinstance(last.get("settings"), dict) and not _pools(ConfirmSettings(**last["settings"]), settings):
        replaced.append(last["settings"])
    meta["confirmation"] = {"settings": asdict(settings), "repeat": settings.repeat, "epochs": settings.epochs,
                            "top_k": settings.top_k, "configs": configs if candidates else [],
                            "experiments": [k for k in meta["experiments"] if phase_of(k) == "confirm"],
                            **({"replaced": replaced} if replaced else {})}
    write_meta(opts.out, meta)


@dataclass
class ConfirmOptions:
    """``pgps-tune confirm``: a finished sweep's folder and the settings given (None: as before, or the defaults)."""

    sweep: Path
    top_k: int | None = None
    seeds: int | None = None
    folds: int | None = None
    splits: str | None = None
    epochs: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    max_failures: int | None = None
    address: str | None = None
    autoscaling: bool = False  # as SweepOptions.autoscaling
    pending_timeout: float | None = None  # as SweepOptions.pending_timeout
    results_store: str | None = None
    quiet: bool = False
    progress: str = "lines"  # as SweepOptions.progress
    mlflow: str | None = None  # as SweepOptions.mlflow: into the sweep's experiment


def confirm(c: ConfirmOptions) -> dict[str, Any]:
    """Run or extend the confirmation of a finished sweep (e.g. at a longer budget); re-export it; the summary.

    Holds the sweep folder's lock (:func:`sweep_lock`): no tune, confirm or export into it runs beside it.
    """
    with sweep_lock(Path(c.sweep), "confirm"):
        return _confirm(c)


def _confirm(c: ConfirmOptions) -> dict[str, Any]:
    from pgps_tune.data import prepare
    from pgps_tune.space import Budget, Confirm

    meta = sweep_meta(c.sweep)
    require_finished(meta)
    _writable_here(Path(c.sweep), meta, "confirm")
    before_meta = dict(meta)  # as it ran last: where, and under which MLflow tags
    meta[FOLDER_KEY] = str(Path(c.sweep).resolve())  # the storage just resolved is this folder's
    if meta["objective"]["type"] == "pareto":
        raise PgpsError(f"sweep {meta['sweep']} has a pareto objective: it exports a front, not one winner to "
                        "confirm; retrain a front schedule with 'pgps-tune train --schedule pareto/TRIAL.yaml'")
    if "trial_setup" not in meta or "reference_configs" not in meta:
        raise PgpsError(f"sweep {meta['sweep']} was written by a pgps-tune without confirmation (its sweep.json "
                        "lacks the trial setup); run the sweep again with this version")
    if c.seeds is not None and (c.folds is not None or c.splits):
        raise PgpsError("give --seeds or --confirm-folds/--splits, not both: a confirmation repeats on one of them")
    setup = meta["trial_setup"]
    b = setup["budget"]
    before = meta.get("confirmation", {}).get("settings") or {**asdict(Confirm()), "epochs": None}
    if c.seeds is not None:
        before = {**before, "folds": None, "splits": None}
    elif c.folds is not None or c.splits:
        before = {**before, "seeds": None, "folds": None, "splits": None}
    check_nnunet_splits(b.get("trainer", "pgps_tune"), c.splits, f"--splits (sweep {meta['sweep']} trains nnU-Net)",
                        "--splits")
    check_splits_exists(c.splits, "--splits", "give the path of an existing splits file")
    check_splits_exists(before["splits"], f"the sweep's stored confirmation settings ({Path(c.sweep) / SWEEP_FILE})",
                        "put that file back, or give --splits FILE or --seeds N")
    if "nnunet" in setup:  # its trials train nnU-Net's preprocessed data: pgps-tune's loader never reads it
        from pgps_tune.nnunet import sweep_dataset

        ds = sweep_dataset(setup["nnunet"]["plans"], setup["nnunet"]["configuration"])
    else:
        ds = prepare(setup["data"], cache_root=setup["cache_root"], synthetic_cases=b["synthetic_cases"],
                     synthetic_shape=tuple(b["synthetic_shape"]))
    settings = ConfirmSettings.checked(
        c.top_k or before["top_k"], c.epochs or before["epochs"] or b["epochs"],
        c.seeds or before["seeds"] or Confirm.seeds, c.folds or before["folds"], c.splits or before["splits"],
        ds, b["split_seed"], source="confirm")
    held, kept = held_confirmation(meta), _union(_earlier(meta), settings)
    if kept != settings:
        print(f"pgps-tune: note: confirming {_describe(asdict(kept))}: the sweep's confirmations already hold "
              f"those schedules and repeats, and a confirmation never drops any (asked: {_describe(asdict(settings))})",
              file=sys.stderr, flush=True)
        settings = kept
    if held is not None and not _pools(held, settings) and "pending_confirm" not in meta:
        print(f"pgps-tune: note: this confirmation ({_describe(asdict(settings))}) replaces the sweep's "
              f"({_describe(asdict(held))}) in its exports; those trials stay in trials.parquet, and 'pgps-tune "
              f"confirm {c.sweep} {confirmation_flags(asdict(held))}' brings it back without training",
              file=sys.stderr, flush=True)
    budget = Budget(**{k: v for k, v in {**ADDED_LATER, **b}.items() if k in Budget.__dataclass_fields__})
    opts = SweepOptions(
        space=SearchSpace(meta.get("space_name", meta["sweep"]), (), budget=budget, source=meta["space"]),
        data=setup["data"], out=Path(c.sweep), max_concurrent=c.max_concurrent,
        cpus_per_trial=c.cpus_per_trial or meta.get("cpus_per_trial", 1.0),
        gpus_per_trial=meta.get("gpus_per_trial", 0.0) if c.gpus_per_trial is None else c.gpus_per_trial,
        address=c.address, autoscaling=c.autoscaling, pending_timeout=c.pending_timeout, storage=meta.get("storage"),
        resume=True,
        results_store=c.results_store, quiet=c.quiet,
        progress=c.progress, max_failures=c.max_failures, mlflow=c.mlflow,
        **({"nnunet_plans": ds.plan, "nnunet_configuration": setup["nnunet"]["configuration"]}
           if "nnunet" in setup else {}),
    )
    opts.check()
    mlflow_tracked(opts, meta, before_meta)  # its trials' runs and its own join the sweep's, in its experiment
    fs, _ = _filesystem(meta.get("storage"), meta["storage_path"])
    import pyarrow.fs as pafs

    storage_fs = None if isinstance(fs, pafs.LocalFileSystem) else fs
    # the confirmation's budget prices its trials; no plan line: an extension trains only what is new
    plan = confirm_plan(settings, b["iterations_per_epoch"],
                        _fractions(meta["reference_configs"], setup, settings.epochs))
    with _stop_signals() as signals, _ray_session(opts, signals) as autoscales, \
            _sweep_clock([plan], opts, announce=False):
        if opts.address:  # as in a sweep: the trials may run on other machines
            nnunet_trainer = "nnunet" in setup
            check_cluster_paths(opts.cpus_per_trial, opts.gpus_per_trial, storage_fs, meta["storage_path"],
                                None if nnunet_trainer else setup["data"], setup.get("cache_root"),
                                setup["nnunet"]["plans"] if nnunet_trainer else None, autoscales)
        run_confirmation(opts, meta, settings, storage_fs, signals)
    summary = export_sweep(c.sweep, meta, read_trials(meta), c.results_store)
    _log_sweep_run(opts, summary, meta)
    return summary


def screening_candidates(space: SearchSpace, observed: list[tuple[dict[str, Any], float]],
                         points: int = 5) -> list[dict[str, Any]]:
    """What ``asha.promote: main_effects`` ranks: the screened schedules, then the space's grid with
    ``points`` values per numeric range (at least ``search.grid_points``), each schedule once."""
    seen: dict[str, dict[str, Any]] = {}
    for c in [c for c, _ in observed] + space.grid(max(points, space.search.grid_points)):
        seen.setdefault(json.dumps(c, sort_keys=True), c)
    return list(seen.values())


def check_screening(space: SearchSpace, num_samples: int) -> None:
    """Refuse main-effects screening of fewer schedules than the model has effects to measure
    (:func:`pgps_tune.asha.main_effects_terms` over :func:`screening_candidates`): with fewer, the ridge
    penalty, not the screens, would rank some of the space; with one, nothing is fitted at all."""
    if space.asha.fidelity != "compressed" or space.asha.promote != "main_effects":
        return
    need = max(2, main_effects_terms(space.parameters, screening_candidates(space, [])))
    if num_samples >= need:
        return
    grid = space.search.algorithm == "grid" and len(space.grid()) < need
    fix = (f"the grid holds only {plural(len(space.grid()), 'schedule')}: raise search.grid_points" if grid else
           f"give search.num_samples (tune --num-samples) {need} or more")
    raise PgpsError(f"{space.source}: asha.promote main_effects fits {need} effects of the parameters to the "
                    f"screened scores, but the search screens {plural(num_samples, 'schedule')}, too few to measure "
                    f"them; {fix}, or use promote: measured")


def run_compressed(opts: SweepOptions, signals: _StopSignals, meta: dict[str, Any], setup: dict[str, Any], searcher,
                   num_samples: int, storage_fs, storage_path: str, before: dict[str, Any] | None = None) -> None:
    """The search phase with ``asha.fidelity: compressed``: successive halving over budgets.

    Rung 0 is the search itself (``searcher``: Optuna or the grid, ``num_samples`` trials),
    each trial its whole curriculum trained with a fraction of the iterations per epoch; every
    later rung trains the best of the one below again from scratch at a larger fraction (a
    :class:`ListSearcher`), the last at the full budget, which alone can give the exported winner.
    Restarting, not continuing, is the point: a compressed run ends with its learning rate at
    zero and its curriculum finished, so it cannot be extended into a longer one that is still
    a complete curriculum.  Each rung is a Tune experiment of its own (``search``, ``search-r1``,
    ...), resumed like any phase; a rung's survivors are read back from the one below, so a
    resumed sweep promotes the same trials.  Parameter sets that train alike (:func:`training_key`)
    are promoted once; a ladder ``before`` (the sweep.json a resume continues) began without that
    rule (no ``fidelity.unique_by``) keeps promoting by parameters, as its upper rungs did.

    With ``asha.promote: main_effects`` there are two rungs (:func:`screening_ladder`): the search
    screens ``num_samples`` schedules at the lowest fraction, and the full budget trains the top of
    :func:`main_effects_ranking` over the space's candidates (:func:`screening_candidates`), which
    may be schedules the screening never trained.  The model is fitted to the stored rung, so a
    resumed sweep promotes the same schedules.
    """
    space = opts.space
    model = space.asha.promote == "main_effects"
    meta["fidelity"] = ladder_meta(space, num_samples)
    if isinstance(ladder := (before or {}).get("fidelity"), dict):  # a resume promotes as the sweep began to
        meta["fidelity"][UNIQUE_BY] = ladder.get(UNIQUE_BY, "params")
    by_training = meta["fidelity"][UNIQUE_BY] == "training"
    rungs = [Rung(**r) for r in meta["fidelity"]["rungs"]]
    configs: list[dict[str, Any]] = []
    for r, rung in enumerate(rungs):
        phase = "search" if r == 0 else f"search-r{r}"
        meta["experiments"][phase] = f"{meta['sweep']}-{phase}"
        write_meta(opts.out, meta)
        top = r == len(rungs) - 1
        rung_setup = {**setup, "budget": rung_budget(setup["budget"], rung, top), "fidelity": rung.fraction, "rung": r}
        run_phase(phase, opts, rung_setup, storage_fs, storage_path, meta["experiments"][phase],
                  searcher if r == 0 else ListSearcher(configs), num_samples if r == 0 else len(configs), None,
                  signals=signals)
        if top:
            return
        rows = trial_rows(read_trials(meta, keys=(phase,)), meta)
        scored = [(row["params"], row["score"] if row["completed"] else math.nan, row["schedule_voxel_fraction"])
                  for row in rows]
        if model and sum(1 for _, score, _ in scored if math.isfinite(score)) >= 2:
            observed = [(json.loads(k), score) for k, score, _ in scored]
            ranked = main_effects_ranking(space.parameters, observed, screening_candidates(space, observed))
            if by_training:  # the model's top, each schedule once
                first: dict[str, dict[str, Any]] = {}
                for c in ranked:
                    first.setdefault(config_key(setup, c), c)
                ranked = list(first.values())
            configs = ranked[: rungs[r + 1].trials]
            screened = sum(c in (o for o, _ in observed) for c in configs)
            print(f"pgps-tune: {phase}: the main-effects model fitted to {len(scored)} screened schedules promotes "
                  f"{len(configs)} to the full budget ({screened} of them screened)", file=sys.stderr, flush=True)
        else:
            if model:
                print(f"pgps-tune: {phase}: fewer than 2 screened schedules completed, too few to fit the "
                      "main-effects model: the best measured go on instead", file=sys.stderr, flush=True)
            trains = {row["params"]: training_key(json.loads(row["schedule"] or "null"),
                                                  json.loads(row["params"] or "{}"), setup["budget"])
                      for row in rows} if by_training else None
            configs = [json.loads(k) for k in survivors(scored, rungs[r + 1].trials, trains and trains.get)]
        if Progress.sweep_eta is not None:  # the rungs above and the confirmation plan no more than go on
            Progress.sweep_eta.at_most([f"search-r{k}" for k in range(r + 1, len(rungs))] + ["confirm"],
                                       len(configs))
        if not configs:
            print(f"pgps-tune: {phase}: no trial of this rung completed, so none runs at the full budget",
                  file=sys.stderr, flush=True)
            return
