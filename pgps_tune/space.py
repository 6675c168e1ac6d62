"""Search-space files: what a sweep explores, what it optimises, and with which budget.

Pure Python (no Ray, no torch): a space file is parsed and validated here, and
every error names the file, the key and the fix.  The tuner turns a
:class:`SearchSpace` into Optuna suggestions and Ray Tune settings; the
trainable turns one sampled ``params`` dict into a schedule with
:func:`schedule_from_params`.

File format (YAML)::

    parameters:                      # what is searched
      stages: {type: int, low: 1, high: 6}
      growth: {type: float, low: 1.2, high: 2.5, log: true, when: "stages > 1"}
      length_ratio: {type: float, low: 0.5, high: 2.0, log: true}
      mode: {type: categorical, choices: [resource, performance, sqrt]}
      family: {type: categorical, choices: [staged, random]}
      fg_ratio: {value: 0.5}         # fixed
    objective: {type: max_dice}      # or cheapest_within (tolerance), dice_under_budget (voxel_budget), pareto
    search: {algorithm: tpe, num_samples: 24, seed: 0}   # tpe | random | grid | nsga2
    asha: {time_attr: baseline_iterations, grace_fraction: 0.15, reduction_factor: 3, brackets: 1}
    budget: {epochs: 30, iterations_per_epoch: 50, batch_size: 2, network: unet, ...}
    confirm: {enabled: true, top_k: 3, seeds: 3}      # or folds: 5; epochs: 60 for a longer budget
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgps_tune import schedule as sch
from pgps_tune.asha import TIME_ATTRS
from pgps_tune.config import (
    ADDED_LATER,
    AUGMENT_PRESETS,
    CPU_PRECISIONS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    NETWORKS,
    NO_DOWNSAMPLING,
    OPTIMIZERS,
    TOKEN_SIZES,
    TrainConfig,
    check_filters,
    check_network_widths,
    patch_multiple,
)
from pgps_tune.errors import PgpsError, did_you_mean, read_yaml
from pgps_tune.limits import LIMITS, Range, limit
from pgps_tune.pareto import parse_pick

if TYPE_CHECKING:
    import optuna

# parameters that build the schedule (the rest tune the trainer), with their kind of value
SCHEDULE_PARAMS = {
    "stages": "int", "growth": "float", "start_fraction": "float", "length_ratio": "float",
    "final_fraction": "float", "mode": "categorical", "batch_cap": "int",
    "family": "categorical", "growth_shape": "categorical", "lengths": "list",
}
# the values of each categorical parameter
CHOICES: dict[str, tuple[str, ...]] = {"mode": sch.MODES, "family": sch.FAMILIES, "growth_shape": sch.GROWTH_SHAPES}
TRAINER_PARAMS = {"fg_ratio": "float", "lr": "float"}
KNOWN_PARAMS = {**SCHEDULE_PARAMS, **TRAINER_PARAMS}
# what each parameter sets, and its value when the space leaves it out (docs/SPACES.md is built from this)
PARAM_DOCS = {
    "stages": "number of stages; 1 is the constant patch. Absent: 1",
    "growth": "the patch side grows by this factor per stage (aspect kept). A multi-stage trial needs growth "
              "or start_fraction",
    "start_fraction": "first patch side as a fraction of the final, instead of growth (growth wins if both are "
                      "searched)",
    "length_ratio": "each stage is this many times longer than the one before. Absent: 1.0",
    "final_fraction": "share of all epochs reserved for the final patch size. Absent: none reserved",
    "mode": "resource (constant batch), performance (the batch grows as the patch shrinks, about constant voxels "
            "per batch) or sqrt (the batch grows with the square root of the voxel ratio, in between). "
            "Absent: resource",
    "batch_cap": "performance and sqrt modes: largest batch. Absent: no cap",
    "family": "staged (the stages run in order) or random (every iteration draws one of the stages' patch sizes, "
              "odds by their lengths; validation at the final patch). Absent: staged",
    "growth_shape": "geometric (the side is multiplied by growth per stage) or linear (the same length added per "
                    "stage, between the same first and final sides). Absent: geometric",
    "lengths": "a fixed list, one length per stage: fractions summing to 1 or whole epochs summing to "
               "budget.epochs, instead of length_ratio and final_fraction (with searched stages, add "
               "`when: \"stages == N\"`). Absent: length_ratio",
    "fg_ratio": "trainer: share of foreground-centred patches. Absent: budget.fg_ratio",
    "lr": "trainer: learning rate. Absent: budget.lr",
}
OBJECTIVES = ("max_dice", "cheapest_within", "dice_under_budget", "pareto")
ALGORITHMS = ("tpe", "random", "grid", "nsga2")
JUDGES = ("final_stage", "always")
FIDELITIES = ("partial", "compressed")
PROMOTIONS = ("measured", "main_effects")
_WHEN = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*([A-Za-z0-9_.+\-]+)\s*$")
ORDERING = (">", ">=", "<", "<=")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # int | float | categorical | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: tuple[str, str, Any] | None = None  # (param, op, value)

    def active(self, params: dict[str, Any]) -> bool:
        """Whether this parameter exists given the values sampled so far."""
        if self.when is None:
            return True
        other, op, ref = self.when
        if other not in params:
            return False
        v = params[other]
        return {
            ">": v > ref, ">=": v >= ref, "<": v < ref, "<=": v <= ref, "==": v == ref, "!=": v != ref,
        }[op]

    def grid_values(self, points: int = 3) -> list[Any]:
        """Values a grid search walks: choices, or ``points`` spread over [low, high]."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            vals = sorted({round(self.low + (self.high - self.low) * i / max(1, points - 1)) for i in range(points)})
            return [int(v) for v in vals]
        if self.log:
            return [self.low * (self.high / self.low) ** (i / max(1, points - 1)) for i in range(points)]
        return [self.low + (self.high - self.low) * i / max(1, points - 1) for i in range(points)]


def _doc(default: Any, text: str) -> Any:
    """A dataclass field with its documentation (read by scripts/gen_docs.py for docs/SPACES.md)."""
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class Objective:
    type: str = _doc("max_dice", "what ASHA and Optuna maximise: `max_dice` (the validation Dice), "
                                 "`cheapest_within` (the fewest voxels within `tolerance` of the baseline's Dice) "
                                 "or `dice_under_budget` (the Dice of schedules within `voxel_budget`); "
                                 "`pareto` searches Dice and voxel fraction together (multi-objective, no ASHA) "
                                 "and exports the non-dominated schedules")
    tolerance: float = _doc(0.01, "cheapest_within: allowed Dice drop below the constant baseline's final Dice")
    voxel_budget: float = _doc(0.5, "dice_under_budget: largest voxel fraction of the baseline a searched "
                                    "schedule may use; over it a trial is not trained and scores -1")
    pick: str = _doc("knee", "pareto: the front schedule that becomes best_schedule.yaml: `knee`, `max_dice` or "
                             "`cheapest_within=T` (the cheapest within T Dice of the front's best); "
                             "`export --pick` overrides it")


@dataclass(frozen=True)
class Search:
    algorithm: str = _doc("tpe", "`tpe` (Optuna's TPE sampler, multi-objective for `pareto`), `random` (Optuna's "
                                 "random sampler), `grid` (every combination) or `nsga2` (Optuna's NSGA-II, "
                                 "population `startup_trials`; for `pareto`)")
    num_samples: int = _doc(16, "search trials (`tune --num-samples` overrides it; a grid runs the whole grid, "
                                  "except with `asha.promote: main_effects`: then this many of its schedules, drawn "
                                  "without repeats)")
    seed: int = _doc(0, "seed of the sampler")
    grid_points: int = _doc(3, "grid: values per numeric range (evenly spaced, geometric for `log`, rounded "
                               "for int)")
    startup_trials: int = _doc(10, "TPE: random trials before its model is used (Optuna's default 10); NSGA-II: "
                                   "its population size (at least 2); lower it for a short search")
    max_compute: float = _doc(0.0, "stop the search phase once its trials together processed the voxels of "
                                   "this many full baseline runs (0: no cap)")
    references: bool | tuple[str, ...] = _doc(
        True, "reference schedules trained first, to the end: `true` (the constant baseline and the paper schedule), "
              "`false`, or a list of `constant`, `paper`, `random` (random patch-size sampling over the paper's "
              "sizes), each optionally `:MODE` (e.g. `paper:sqrt`; otherwise the space's fixed mode, else "
              "resource); `cheapest_within` needs `constant`")


@dataclass(frozen=True)
class Asha:
    enabled: bool = _doc(True, "early-stop weak trials with ASHA (false: every trial runs to the end)")
    time_attr: str = _doc("baseline_iterations", "partial: ASHA's clock: `baseline_iterations` (voxels processed over "
                                                 "the baseline's voxels per iteration: equal compute), `epoch` "
                                                 "or `training_iteration` (validations)")
    grace_fraction: float = _doc(0.15, "partial: the first rung, as a share of the clock's maximum (the baseline's "
                                       "total iterations for `baseline_iterations`)")
    reduction_factor: float = _doc(3.0, "ASHA keeps the best 1/reduction_factor of the trials at each rung "
                                        "(compressed: of each rung's schedules, each rung training reduction_factor "
                                        "times the one below)")
    brackets: int = _doc(1, "partial: ASHA brackets")
    # final_stage: a trial is judged only on validations made in its last stage (at the final patch);
    # always: on every validation, also while it still trains on small patches
    judge: str = _doc("final_stage", "partial: `final_stage`: ASHA sees a trial's validations only from its last "
                                     "stage (the final patch) on; `always`: every validation")
    # partial: today's ASHA on partial runs of the full-budget curriculum; compressed: successive halving
    # over budgets, each low-fidelity run a whole curriculum compressed into a fraction of the budget
    fidelity: str = _doc("partial", "what a low-fidelity evaluation is. `partial`: the first part of a full-budget "
                                    "run, stopped by ASHA at rungs of `time_attr`; `compressed`: the whole schedule "
                                    "(every stage, the whole learning-rate curve) trained with fewer iterations per "
                                    "epoch, successive halving over budgets: the search's trials run at "
                                    "`min_fraction` of the budget, the best 1/`reduction_factor` run again from "
                                    "scratch at `reduction_factor` times that, up to the full budget (see "
                                    "docs/GUIDE.md)")
    min_fraction: float = _doc(0.111, "compressed: the least share of the budget a rung trains, at most "
                                      "1/reduction_factor (rungs at reduction_factor^-k of the budget, k = 0, 1, "
                                      "..., the lowest the last at or above min_fraction)")
    # measured: successive halving promotes a rung's best by their own scores; main_effects: one screening
    # rung, an additive model of the parameters fitted to it, and its top predictions over the whole space
    promote: str = _doc("measured", "compressed: what goes on to a higher budget. `measured`: the best "
                                    "1/`reduction_factor` of a rung by their own scores, rung after rung; "
                                    "`main_effects`: two rungs, `search.num_samples` schedules screened at "
                                    "`min_fraction`, then the 1/`reduction_factor` (or `promote_top`) that an additive "
                                    "model of the parameters fitted to their scores ranks best over the whole "
                                    "space (screened or not) at the full budget (see docs/GUIDE.md)")
    promote_top: int = _doc(0, "`promote: main_effects`: how many of the model's top schedules train at the full "
                               "budget (0: `search.num_samples` / `reduction_factor`, rounded down). Screening is "
                               "cheap and full runs are not: more screens per full run rank better for the same "
                               "compute (docs/BENCHMARKS.md section 9)")


@dataclass(frozen=True)
class Budget:
    """How each trial trains; trainer fields default to :class:`pgps_tune.config.TrainConfig`'s."""

    epochs: int = _doc(DEFAULT_EPOCHS, "epochs of every trial (the paper reference needs at least its stage "
                                       "count); `tune --epochs`")
    iterations_per_epoch: int = _doc(TrainConfig.iterations_per_epoch, "iterations per epoch; "
                                                                       "`tune --iterations-per-epoch`")
    batch_size: int = _doc(DEFAULT_BATCH_SIZE, "the constant baseline's batch size; `tune --batch-size`")
    network: str = _doc(TrainConfig.network, "one of " + ", ".join(f"`{n}`" for n in NETWORKS) + "; `tune --network`")
    token_size: int = _doc(TrainConfig.token_size, "unetr: token side; patch sides must be multiples of it")
    feature_size: int | None = _doc(TrainConfig.feature_size, "segresnet/swinunetr/unetr base width (null: MONAI's "
                                    "default, 8/24/16; swinunetr: a multiple of 12, segresnet: of 8); "
                                    "`tune --feature-size`")
    hidden_size: int = _doc(TrainConfig.hidden_size, "unetr transformer width (a multiple of 64, one attention head "
                            "per 64); `tune --hidden-size`")
    augment: str = _doc(TrainConfig.augment, "augmentation preset (" + ", ".join(f"`{n}`" for n in AUGMENT_PRESETS)
                        + "); `none`: plain crops")
    cpu_precision: str = _doc(TrainConfig.cpu_precision, "CPU training arithmetic: `bf16` (autocast where the CPU "
                              "has bf16 in hardware and the batch gains from it) or `fp32`; CUDA trials use fp16 "
                              "AMP either way; `tune --cpu-precision`")
    filters: tuple[int, ...] = _doc(TrainConfig.filters, "channels per level (the first pools+1 are used); "
                                                         "`tune --filters`")
    res_units: int = _doc(TrainConfig.res_units, "unet: residual units per level (2: twice the depth, about 1.2-1.5x "
                                                 "the time per iteration on a CPU); `tune --res-units`")
    optimizer: str = _doc(TrainConfig.optimizer, "`adamw` or `sgd`; `tune --optimizer`")
    lr: float | None = _doc(None, "learning rate (null: the optimizer's default); `tune --lr`")
    val_every: int = _doc(3, "epochs between validations, each one a report to Tune; `tune --val-every`")
    fg_ratio: float = _doc(TrainConfig.fg_ratio, "share of foreground-centred patches; `tune --fg-ratio`")
    val_fraction: float = _doc(0.2, "share of the cases held out for validation; `tune --val-fraction`")
    split_seed: int = _doc(0, "seed of the train/validation split; `tune --split-seed`")
    seed: int = _doc(TrainConfig.seed, "training seed; `tune --seed`")
    final_patch: tuple[int, int, int] | None = _doc(None, "[X, Y, Z] final patch (null: planned from the data); "
                                                          "`tune --final-patch`")
    pools: tuple[int, int, int] | None = _doc(None, "[X, Y, Z] stride-2 poolings (null: planned); `tune --pools`")
    synthetic_cases: int = _doc(24, "cases of the synthetic data (`--data synthetic`)")
    synthetic_shape: tuple[int, int, int] = _doc((48, 48, 48), "shape of each synthetic case")
    max_failures: int = _doc(1, "retries of a failed trial from its last checkpoint; `tune --max-failures`")
    trainer: str = _doc("pgps_tune", "who trains each trial: `pgps_tune` (this package's MONAI trainer) or `nnunet` "
                                     "(nnU-Net v2's own trainer on its preprocessed data, one fold, the trial's "
                                     "schedule; needs `tune --nnunet-plans` and the nnunet extra; network, optimizer, "
                                     "lr, augment, cpu_precision, filters, fg_ratio, seed and the split keys are then "
                                     "nnU-Net's own and not used; docs/NNUNET.md)")
    nnunet_fold: int = _doc(0, "trainer nnunet: the fold of nnU-Net's split every trial trains and is scored on")
    nnunet_val_iterations: int = _doc(10, "trainer nnunet: nnU-Net's pseudo-Dice iterations per epoch, the "
                                          "intermediate scores ASHA compares (nnU-Net's default: 50)")


@dataclass(frozen=True)
class Confirm:
    """The confirmation phase: the best searched schedules and both references retrained on repeats."""

    enabled: bool = _doc(True, "after the search, retrain the top schedules and both references on several seeds "
                               "(or folds) and choose the winner from those results; `tune --no-confirm`")
    top_k: int = _doc(3, "distinct searched schedules to confirm (the best completed ones by score); "
                         "`tune --confirm-top-k`")
    seeds: int = _doc(3, "training seeds per schedule (budget.seed + 1, + 2, ...: fresh seeds, not the search's); "
                         "`tune --confirm-seeds`")
    folds: int | None = _doc(None, "instead of seeds: cross-validation folds of a seeded split of the cases "
                                   "(null: seeds); `tune --confirm-folds`")
    splits: str | None = _doc(None, "instead of the seeded folds: a JSON file listing the folds, "
                                    '[{"train": [case ids], "val": [case ids]}, ...] (nnU-Net\'s '
                                    "splits_final.json); a relative path is read from the space file's folder; "
                                    "`tune --confirm-splits`")
    epochs: int | None = _doc(None, "epochs of each confirmation trial (null: budget.epochs); a longer budget "
                                    "checks that a short-budget winner still wins; `tune --confirm-epochs`")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    parameters: tuple[Param, ...]
    objective: Objective = field(default_factory=Objective)
    search: Search = field(default_factory=Search)
    asha: Asha = field(default_factory=Asha)
    budget: Budget = field(default_factory=Budget)
    source: str = "<space>"
    confirm: Confirm = field(default_factory=Confirm)

    def optuna_sampler(self):
        """The Optuna sampler the space asks for (TPE, NSGA-II or random, seeded)."""
        import optuna

        if self.search.algorithm == "tpe":
            return optuna.samplers.TPESampler(seed=self.search.seed, n_startup_trials=self.search.startup_trials)
        if self.search.algorithm == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=self.search.seed,
                                                 population_size=max(2, self.search.startup_trials))
        return optuna.samplers.RandomSampler(seed=self.search.seed)

    def key(self) -> str:
        """What makes two sweeps' scores comparable: parameters, objective and budget (not search or ASHA).

        ``tune --warm-start`` seeds a study only with stored trials of the same key.
        """
        budget = asdict(self.budget)
        if self.budget.trainer == "pgps_tune":  # keys of sweeps stored before these budget keys existed
            for k in ("trainer", "nnunet_fold", "nnunet_val_iterations"):
                budget.pop(k)
        for k, before in ADDED_LATER.items():  # sweeps stored before the key trained with its old value
            if budget.get(k) == before:
                budget.pop(k)
        what = {"parameters": [asdict(p) for p in self.parameters], "budget": budget,
                "objective": {k: v for k, v in asdict(self.objective).items() if k != "pick"}}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def param(self, name: str) -> Param | None:
        return next((p for p in self.parameters if p.name == name), None)

    def grid(self, points: int | None = None) -> list[dict[str, Any]]:
        """Every combination a grid search visits (inactive conditionals dropped, duplicates removed),
        with ``points`` values per numeric range (default ``search.grid_points``)."""
        combos: list[dict[str, Any]] = [{}]
        for p in self.parameters:
            nxt = []
            for c in combos:
                if p.active(c):
                    nxt.extend({**c, p.name: v} for v in p.grid_values(points or self.search.grid_points))
                else:
                    nxt.append(c)
            combos = nxt
        unique = {tuple(sorted(c.items())): c for c in combos}
        return list(unique.values())


def distinct_schedules(space: SearchSpace, most: int = 100_000) -> int | None:
    """How many distinct parameter sets the space can sample, inactive conditionals dropped; None where that is
    unbounded (a float range) or above ``most``.  A sweep never trains more distinct schedules than this, however
    many trials it runs (a sampler may suggest one again), so its plan counts no more.

    >>> distinct_schedules(parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3},
    ...                                          "mode": {"type": "categorical", "choices": ["resource", "sqrt"],
    ...                                                   "when": "stages > 1"}}}, "s.yaml"))
    5
    >>> distinct_schedules(parse({"parameters": {"growth": {"type": "float", "low": 1.2, "high": 2.0}}}, "s.yaml"))
    """
    def values(p: Param) -> list[Any]:
        if p.kind in ("fixed", "categorical"):
            return p.grid_values()
        assert p.low is not None and p.high is not None
        return list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))

    if any(p.kind == "float" for p in space.parameters):
        return None
    combos: list[dict[str, Any]] = [{}]
    for p in space.parameters:
        combos = [x for c in combos for x in ([{**c, p.name: v} for v in values(p)] if p.active(c) else [c])]
        if len(combos) > most:
            return None
    return len({tuple(sorted(c.items(), key=str)) for c in combos})


def grid_sample(space: SearchSpace, n: int) -> list[dict[str, Any]]:
    """``n`` schedules of the space's grid, none twice, in an order fixed by ``search.seed`` (the whole
    grid when ``n`` reaches its size): the screening design of ``algorithm: grid`` with
    ``asha.promote: main_effects``, a spread sample with no repeats for the additive model.

    >>> s = parse({"parameters": {"stages": {"type": "categorical", "choices": [1, 2, 3]}}}, "s.yaml")
    >>> len(grid_sample(s, 2)), sorted(c["stages"] for c in grid_sample(s, 5))
    (2, [1, 2, 3])
    """
    import random

    grid = space.grid()
    return random.Random(space.search.seed).sample(grid, min(n, len(grid)))


class DefineByRun:
    """Optuna define-by-run space: suggests only the parameters active given earlier ones.

    A module-level class (not a closure) so that Tune can pickle the searcher for resume; it is
    also the objective's space when Optuna runs without Ray.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.parameters = space.parameters

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for p in self.parameters:
            if not p.active(params):
                continue
            if p.kind == "fixed":
                params[p.name] = fixed[p.name] = p.value
            elif p.kind == "int":
                params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            elif p.kind == "float":
                params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
            else:
                params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        return fixed


# -- parsing ---------------------------------------------------------------------------


def _fields(cls) -> set[str]:
    return set(cls.__dataclass_fields__)


def _number(value: Any, key: str, section: str, src: str, range_key: str | None = None) -> Any:
    rng = limit(range_key or key, section)
    assert rng is not None, f"no range for {section}.{range_key or key} in pgps_tune.limits"
    return rng.check(value, f"{src}: {section}.{key}")


def _numbers(value: Any, key: str, section: str, src: str, length: int | None) -> tuple[int, ...]:
    """A list of integers (each in range), e.g. budget.filters or budget.final_patch."""
    item = {"final_patch": "patch_axis", "synthetic_shape": "synthetic_axis"}.get(key, key)
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or not 1 <= len(value) <= 10):
        n = f"{length}" if length else "1 to 10"
        raise PgpsError(f"{src}: {section}.{key} must be a list of {n} integers, got {value!r}")
    return tuple(_number(v, key, section, src, item) for v in value)


def _section(raw: dict[str, Any], key: str, cls, src: str):
    data = raw.get(key) or {}
    if not isinstance(data, dict):
        raise PgpsError(f"{src}: '{key}' must be a mapping")
    unknown = sorted(set(data) - _fields(cls), key=str)
    if unknown:
        raise PgpsError(f"{src}: unknown key(s) {unknown} in '{key}'{did_you_mean(unknown, _fields(cls))}; "
                        f"allowed: {sorted(_fields(cls))}")
    defaults = cls()
    out = {}
    for k, v in data.items():
        want = getattr(defaults, k)
        if v is None and want is None:
            pass  # null: the documented default (budget.final_patch: null is planned from the data)
        elif cls is Search and k == "references":
            v = _references(v, src)
        elif k in ("final_patch", "pools", "synthetic_shape") or isinstance(want, tuple):
            v = _numbers(v, k, key, src, None if k == "filters" else 3)
        elif isinstance(want, bool):
            if not isinstance(v, bool):
                raise PgpsError(f"{src}: {key}.{k} must be true or false, got {v!r}")
        elif isinstance(want, int | float) or limit(k, key) is not None:
            v = _number(v, k, key, src)
        elif (isinstance(want, str) or want is None) and not isinstance(v, str):
            raise PgpsError(f"{src}: {key}.{k} must be a string, got {v!r}")
        out[k] = v
    return cls(**out)


def _parse_when(text: Any, name: str, src: str) -> tuple[str, str, Any]:
    m = _WHEN.match(str(text))
    if not m:
        raise PgpsError(f"{src}: parameter '{name}': when {text!r} must look like \"stages > 1\"")
    other, op, ref = m.groups()
    try:
        value: Any = int(ref)
    except ValueError:
        try:
            value = float(ref)
        except ValueError:
            value = ref
    if isinstance(value, float) and not math.isfinite(value):
        raise PgpsError(f"{src}: parameter '{name}': when {text!r} compares with {ref!r}; give a finite number")
    return other, op, value


def _references(value: Any, src: str) -> bool | tuple[str, ...]:
    """``search.references``: true, false, or a list of ``PRESET`` / ``PRESET:MODE`` names (checked, no repeats)."""
    if isinstance(value, bool):
        return value
    names = (f"{', '.join(sch.PRESETS)}, each optionally :MODE (MODE one of {', '.join(sch.MODES)}; constant takes "
             "none)")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PgpsError(f"{src}: search.references must be true or false, or a list of {names}; got {value!r}")
    for v in value:
        preset, _, mode = v.partition(":")
        if preset not in sch.PRESETS or (mode and (mode not in sch.MODES or preset == "constant")):
            raise PgpsError(f"{src}: search.references entry {v!r} unknown; list {names}")
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise PgpsError(f"{src}: search.references lists {repeated} more than once; list each reference once")
    return tuple(value)


def _param_value(name: str, value: Any, what: str, src: str) -> Any:
    """Check one value a parameter can take (a fixed value or a choice) against its kind and range."""
    kind = KNOWN_PARAMS[name]
    if kind == "categorical":
        if value not in CHOICES[name]:
            raise PgpsError(f"{src}: parameter '{name}': {what} {value!r} unknown; use one of "
                            f"{', '.join(CHOICES[name])}")
        return value
    if kind == "list":  # lengths: each entry checked here, their count and sum once the stages are known
        if not isinstance(value, list) or not 1 <= len(value) <= LIMITS["stages"].high:
            raise PgpsError(f"{src}: parameter '{name}': {what} must be a list of 1 to {LIMITS['stages'].high:g} "
                            f"numbers, one per stage, got {value!r}")
        return tuple(LIMITS[name].check(v, f"{src}: parameter '{name}': entry {i}") for i, v in enumerate(value))
    rng = LIMITS[name]
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return rng.check(value, f"{src}: parameter '{name}': {what}")


def _parse_param(name: str, spec: Any, src: str) -> Param:
    if name not in KNOWN_PARAMS:
        raise PgpsError(f"{src}: unknown parameter '{name}'{did_you_mean(name, KNOWN_PARAMS)}; known: "
                        f"{sorted(KNOWN_PARAMS)}")
    if not isinstance(spec, dict):
        spec = {"value": spec}
    allowed = {"type", "low", "high", "log", "step", "choices", "value", "when"}
    unknown = sorted(set(spec) - allowed, key=str)
    if unknown:
        raise PgpsError(f"{src}: parameter '{name}' has unknown key(s) {unknown}{did_you_mean(unknown, allowed)}; "
                        f"allowed: {sorted(allowed)}")
    when = _parse_when(spec["when"], name, src) if "when" in spec else None
    kind = spec.get("type")
    # a key that does not apply would be ignored without a word: refuse it
    ignored = (set(spec) - {"value", "when"} if "value" in spec
               else set(spec) & {"low", "high", "log", "step"} if kind == "categorical"
               else {"choices"} & set(spec) if kind in ("int", "float") else set())
    if ignored:
        given = "a fixed 'value'" if "value" in spec else f"type {kind}"
        use = ("give either a fixed value or a type with its range or choices" if "value" in spec
               else "list the values in choices" if kind == "categorical"
               else "use type categorical to list values, or low/high for a range")
        raise PgpsError(f"{src}: parameter '{name}': {', '.join(repr(k) for k in sorted(ignored))} cannot be combined "
                        f"with {given}; {use}")
    if "value" in spec:
        return Param(name, "fixed", value=_param_value(name, spec["value"], "value", src), when=when)
    if KNOWN_PARAMS[name] == "list":
        raise PgpsError(f"{src}: parameter '{name}' takes a fixed list ({name}: [0.2, 0.3, 0.5]); to match a searched "
                        "stage count, give it a when condition such as \"stages == 3\"")
    if kind not in ("int", "float", "categorical"):
        raise PgpsError(f"{src}: parameter '{name}' needs type int, float or categorical (or a fixed value)")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise PgpsError(f"{src}: parameter '{name}': categorical needs a non-empty 'choices' list")
        values = [_param_value(name, c, "choice", src) for c in choices]
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:  # a repeat doubles that value's odds under random sampling and TPE's prior
            raise PgpsError(f"{src}: parameter '{name}': choices lists {repeated[0]!r} more than once; list each "
                            "value once")
        return Param(name, kind, choices=tuple(values), when=when)
    want = KNOWN_PARAMS[name]
    if want == "categorical" or (want == "int" and kind == "float"):
        takes = f"one of {', '.join(CHOICES[name])}" if want == "categorical" else "integers"
        raise PgpsError(f"{src}: parameter '{name}' takes {takes}; "
                        f"use type {'categorical' if want == 'categorical' else 'int'}, not {kind}")
    rng: Range = LIMITS[name]
    if kind == "int":
        rng = Range(rng.low, rng.high, integer=True, low_open=rng.low_open, high_open=rng.high_open)
    for what in ("low", "high"):
        if what not in spec:
            raise PgpsError(f"{src}: parameter '{name}' needs a numeric '{what}'")
        rng.check(spec[what], f"{src}: parameter '{name}': {what}")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise PgpsError(f"{src}: parameter '{name}' has an empty range [{low}, {high}]; make low < high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise PgpsError(f"{src}: parameter '{name}': log must be true or false, got {log!r}")
    if log and low <= 0:
        raise PgpsError(f"{src}: parameter '{name}' is log-scaled, so low must be > 0")
    step = spec.get("step")
    if step is not None:
        if log:
            raise PgpsError(f"{src}: parameter '{name}' has both log and step; Optuna allows only one of them")
        Range(0, high - low, integer=kind == "int", low_open=True).check(step, f"{src}: parameter '{name}': step")
        steps = (high - low) / step
        if abs(steps - round(steps)) > 1e-9 * max(1.0, steps):  # Optuna would move high without a word
            top = low + math.floor(steps + 1e-9) * step
            raise PgpsError(f"{src}: parameter '{name}': step {step} does not divide high - low = {high - low:g}; "
                            f"make high {top:g} (or {top + step:g}) so that it is on the steps from low")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)


def _check_when(p: Param, by_name: dict[str, Param], src: str) -> None:
    """Refuse a condition that can never be evaluated: a number compared with a mode, or an order on modes."""
    assert p.when is not None
    other, op, ref = p.when
    values = _values(by_name[other])
    numeric = [isinstance(v, int | float) for v in values]
    wrong = None
    if isinstance(ref, str):
        if op in ORDERING or any(numeric):
            wrong = f"compares '{other}' with {ref!r}, which is not a number"
        elif ref not in values:
            wrong = f"compares '{other}' with {ref!r}, which is not one of its values {list(values)}"
    elif not all(numeric):
        wrong = f"compares '{other}' (a mode) with the number {ref!r}"
    if wrong:
        raise PgpsError(f"{src}: parameter '{p.name}': when \"{other} {op} {ref}\" {wrong}; fix the condition")


def _values(p: Param) -> tuple[Any, ...]:
    """The values a parameter can take, for checking conditions: its fixed value, choices or range ends."""
    if p.kind == "fixed":
        return (p.value,)
    return p.choices if p.kind == "categorical" else (p.low, p.high)


def _dependency_order(params: list[Param], src: str) -> tuple[Param, ...]:
    """Order parameters so that each comes after the one its ``when`` reads (file order otherwise)."""
    by_name = {p.name: p for p in params}
    for p in params:
        if p.when and p.when[0] not in by_name:
            raise PgpsError(f"{src}: parameter '{p.name}' depends on '{p.when[0]}', which the space does not define")
        if p.when:
            _check_when(p, by_name, src)
    ordered: list[Param] = []
    pending = list(params)
    while pending:
        ready = [p for p in pending if not p.when or p.when[0] in {q.name for q in ordered}]
        if not ready:
            raise PgpsError(f"{src}: the 'when' conditions of {[p.name for p in pending]} form a cycle; remove one")
        ordered.extend(ready)
        pending = [p for p in pending if p not in ready]
    return tuple(ordered)


def parse(raw: Any, source: str = "<space>") -> SearchSpace:
    """Validate a space mapping (as loaded from YAML)."""
    src = source
    if not isinstance(raw, dict):
        raise PgpsError(f"{src}: a search space must be a mapping with 'parameters'")
    allowed = {"name", "description", "parameters", "objective", "search", "asha", "budget", "confirm"}
    unknown = sorted(set(raw) - allowed, key=str)
    if unknown:
        raise PgpsError(f"{src}: unknown key(s) {unknown}{did_you_mean(unknown, allowed)}; allowed: "
                        f"{sorted(allowed)}")
    for key in ("name", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise PgpsError(f"{src}: '{key}' must be a string, got {raw[key]!r}")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise PgpsError(f"{src}: 'parameters' must be a non-empty mapping")
    params = _dependency_order([_parse_param(str(k), v, src) for k, v in params_raw.items()], src)
    objective = _section(raw, "objective", Objective, src)
    search = _section(raw, "search", Search, src)
    asha = _section(raw, "asha", Asha, src)
    budget = _section(raw, "budget", Budget, src)
    confirm = _section(raw, "confirm", Confirm, src)
    if confirm.splits and not Path(confirm.splits).is_absolute() and Path(source).is_file():
        # a path in a file is read from that file's folder (as a flag's is from the current one), so a space
        # file and its splits file move together and a trial's own working folder never matters
        confirm = dataclasses.replace(confirm, splits=str(Path(source).resolve().parent / confirm.splits))
    if objective.type not in OBJECTIVES:
        raise PgpsError(f"{src}: objective.type {objective.type!r} unknown; use one of {', '.join(OBJECTIVES)}")
    parse_pick(objective.pick, f"{src}: objective.pick")
    _check_applies(raw, objective, src)
    if search.algorithm not in ALGORITHMS:
        raise PgpsError(f"{src}: search.algorithm {search.algorithm!r} unknown; use one of {', '.join(ALGORITHMS)}")
    if objective.type == "cheapest_within" and "constant" not in reference_names(search):
        raise PgpsError(f"{src}: objective cheapest_within needs the baseline's Dice; set search.references: true "
                        "(or list constant in it)")
    if asha.time_attr not in TIME_ATTRS:
        raise PgpsError(f"{src}: asha.time_attr {asha.time_attr!r} unknown; use one of {', '.join(TIME_ATTRS)}")
    if asha.judge not in JUDGES:
        raise PgpsError(f"{src}: asha.judge {asha.judge!r} unknown; use one of {', '.join(JUDGES)}")
    _check_fidelity(asha, search, objective, budget, src)
    _check_asha_applies(raw.get("asha") or {}, asha, src)
    if budget.optimizer not in OPTIMIZERS:
        raise PgpsError(f"{src}: budget.optimizer {budget.optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}")
    if budget.network not in NETWORKS:
        raise PgpsError(f"{src}: budget.network {budget.network!r} unknown; use one of {', '.join(NETWORKS)}")
    if budget.token_size not in TOKEN_SIZES:
        raise PgpsError(f"{src}: budget.token_size {budget.token_size} unknown; use one of "
                        f"{', '.join(map(str, TOKEN_SIZES))}")
    if budget.augment not in AUGMENT_PRESETS:
        raise PgpsError(f"{src}: budget.augment: unknown augmentation {budget.augment!r}; use one of "
                        f"{', '.join(AUGMENT_PRESETS)}")
    if budget.cpu_precision not in CPU_PRECISIONS:
        raise PgpsError(f"{src}: budget.cpu_precision {budget.cpu_precision!r} unknown; use one of "
                        f"{', '.join(CPU_PRECISIONS)}")
    check_budget_widths(budget, src)
    check_trainer(budget, confirm, src)
    return SearchSpace(
        name=str(raw.get("name") or Path(source).stem), parameters=params, objective=objective,
        search=search, asha=asha, budget=budget, source=source, confirm=confirm,
    )


# keys of a section that only one setting uses: given beside another, they would be ignored without a word
_APPLIES = {"objective": {"tolerance": "cheapest_within", "voxel_budget": "dice_under_budget", "pick": "pareto"}}


def _check_applies(raw: dict[str, Any], objective: Objective, src: str) -> None:
    """Refuse objective keys of another objective type, and a confirm section naming both seeds and folds."""
    given = raw.get("objective") or {}
    for key, kind in _APPLIES["objective"].items():
        if key in given and objective.type != kind:
            raise PgpsError(f"{src}: objective.{key} applies to objective type {kind} only, not {objective.type}; "
                            f"drop it (or set type: {kind})")
    confirm = raw.get("confirm") or {}
    other = [k for k in ("folds", "splits") if confirm.get(k) is not None]
    if confirm.get("seeds") is not None and other:
        raise PgpsError(f"{src}: confirm gives both seeds and {'/'.join(other)}; give seeds or folds/splits, not "
                        "both (the folds would win and seeds be ignored)")


# asha keys of ASHA's early stopping of partial runs: a compressed ladder's rungs are budgets (min_fraction,
# reduction_factor), so there each would be ignored without a word; and the key only the ladder reads
_PARTIAL_ONLY = ("time_attr", "grace_fraction", "brackets", "judge")
_COMPRESSED_ONLY = ("min_fraction",)


def _check_asha_applies(given: dict[str, Any], asha: Asha, src: str) -> None:
    """Refuse asha keys that the space's fidelity never reads, named with what to do (``promote`` and
    ``promote_top`` outside the ladder: :func:`_check_fidelity`).  A sweep.json stores ASHA's settings for
    every sweep (its exports read them), so an older compressed sweep resumes once its file drops these keys."""
    if asha.fidelity == "compressed":
        dead = [k for k in _PARTIAL_ONLY if k in given]
        if dead:
            keys = ", ".join(f"asha.{k}" for k in dead)
            raise PgpsError(f"{src}: {keys} appl{'y' if len(dead) > 1 else 'ies'} to ASHA's early stopping of partial "
                            "runs, not to a compressed ladder (its rungs are shares of the budget: min_fraction, "
                            f"reduction_factor); drop {'them' if len(dead) > 1 else 'it'} (or set fidelity: partial)")
    elif asha.fidelity == "partial":
        dead = [k for k in _COMPRESSED_ONLY if k in given]
        if dead:
            raise PgpsError(f"{src}: asha.{dead[0]} applies to a compressed ladder (asha.fidelity compressed) only; "
                            "ASHA's first rung is asha.grace_fraction; drop it (or set fidelity: compressed)")


TRAINERS = ("pgps_tune", "nnunet")


def check_splits_exists(splits: str | None, where: str, fix: str) -> None:
    """Refuse a confirmation splits file that does not exist, naming where its path came from (``where``: a space
    file's confirm.splits, a flag, a sweep's stored settings) and ``fix``, before any data are prepared."""
    if splits and not Path(splits).exists():
        rel = "" if Path(splits).is_absolute() else f" (read from the current folder, {Path.cwd()})"
        raise PgpsError(f"{where} names the splits file {splits}, which does not exist{rel}; {fix}")


def check_space_splits(space: SearchSpace) -> None:
    """:func:`check_splits_exists` for the space's ``confirm.splits`` (when the confirmation runs)."""
    if space.confirm.enabled and space.confirm.splits:
        check_splits_exists(space.confirm.splits, f"the space file {space.source} (confirm.splits)",
                            f"correct confirm.splits in {space.source} or create that file, or give "
                            "--confirm-splits FILE")


def check_trainer(budget: Budget, confirm: Confirm, src: str, what: str = "confirm.splits") -> None:
    """Refuse a ``budget.trainer`` (and its keys) that trials could not train with; ``what`` names where
    the confirmation's splits came from (the space file's key, or a command-line flag)."""
    if budget.trainer not in TRAINERS:
        raise PgpsError(f"{src}: budget.trainer {budget.trainer!r} unknown; use one of {', '.join(TRAINERS)}")
    check_nnunet_splits(budget.trainer, confirm.enabled and confirm.splits, f"{src}: {what}", what)


def check_nnunet_splits(trainer: str, splits: Any, where: str, what: str) -> None:
    """Refuse a confirmation on pgps-tune's case splits for trials that are nnU-Net trainings (they train
    nnU-Net's own folds: the splits file would be ignored)."""
    if trainer == "nnunet" and splits:
        raise PgpsError(f"{where} lists pgps-tune's case splits, but trainer nnunet confirms on nnU-Net's own "
                        f"folds (confirm.folds: N trains folds 0..N-1 of its splits_final.json); drop {what}")


def check_budget_widths(budget: Budget, src: str) -> None:
    """Refuse a feature or hidden size the budget's network cannot be built with (also after budget flags)."""
    try:
        check_network_widths(budget.network, budget.feature_size, budget.hidden_size,
                             ("budget.feature_size", "budget.hidden_size"))
    except PgpsError as exc:
        raise PgpsError(f"{src}: {exc}") from None


def _check_fidelity(asha: Asha, search: Search, objective: Objective, budget: Budget, src: str) -> None:
    """Refuse an ``asha.fidelity`` the sweep cannot run, and a compressed ladder it cannot climb."""
    if asha.fidelity not in FIDELITIES:
        raise PgpsError(f"{src}: asha.fidelity {asha.fidelity!r} unknown; use one of {', '.join(FIDELITIES)}")
    if asha.promote not in PROMOTIONS:
        raise PgpsError(f"{src}: asha.promote {asha.promote!r} unknown; use one of {', '.join(PROMOTIONS)}")
    if asha.promote != "measured" and asha.fidelity != "compressed":
        raise PgpsError(f"{src}: asha.promote {asha.promote} needs asha.fidelity compressed (partial runs are "
                        "promoted by ASHA's own rule); set fidelity: compressed or drop promote")
    if asha.promote_top and asha.promote != "main_effects":
        raise PgpsError(f"{src}: asha.promote_top {asha.promote_top} needs asha.promote main_effects (measured "
                        "promotion keeps 1/reduction_factor of each rung); set promote: main_effects or drop "
                        "promote_top")
    if asha.fidelity != "compressed":
        return
    why = ("asha.enabled is false (every trial at the full budget); set it true" if not asha.enabled else
           "search.max_compute caps compute, but the ladder (search.num_samples, asha.reduction_factor, "
           "asha.min_fraction) sets it; set max_compute: 0" if search.max_compute > 0 else
           "objective pareto keeps every front schedule, but the ladder keeps only the best scores; use another "
           "objective" if objective.type == "pareto" else None)
    if why:
        raise PgpsError(f"{src}: asha.fidelity compressed cannot run here: {why}, or use fidelity partial")
    check_ladder(asha, budget, src)


def check_ladder(asha: Asha, budget: Budget, src: str) -> None:
    """Refuse a compressed ladder with no rung below the full budget or with two rungs of one length, at the
    budget's iterations per epoch: when the file is read, and again once ``--iterations-per-epoch`` replaced
    them (before a sweep writes anything)."""
    from pgps_tune.asha import compressed_ladder

    if asha.fidelity != "compressed":
        return
    try:
        compressed_ladder(asha.promote, 1, asha.reduction_factor, asha.min_fraction, budget.iterations_per_epoch,
                          asha.promote_top)
    except PgpsError as exc:
        raise PgpsError(f"{src}: {exc}") from None


def shipped_spaces() -> dict[str, Path]:
    """The search spaces shipped with pgps-tune, by name.

    They are the repository's ``search_spaces/`` folder, which a wheel installs as the package
    data ``pgps_tune/search_spaces/`` (pyproject's package-dir mapping); a source checkout or an
    editable install, where that folder is not inside the package, reads it beside the package.
    """
    inside = Path(str(resources.files("pgps_tune"))) / "search_spaces"
    folder = inside if inside.is_dir() else Path(__file__).resolve().parents[1] / "search_spaces"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve(name_or_path: str) -> Path:
    """A space file: a path as given, or the shipped space of that name (``default``, ``smoke``, ...)."""
    p = Path(name_or_path)
    if p.exists() or p.suffix or len(p.parts) > 1:
        return p
    shipped = shipped_spaces()
    if name_or_path not in shipped:
        raise PgpsError(f"no space file {name_or_path!r} and no shipped space of that name; give a file, "
                        f"or one of: {', '.join(shipped) or '(none shipped: the installation is broken)'}")
    return shipped[name_or_path]


def load(path: str | Path) -> SearchSpace:
    hint = f"give a space file, or a shipped space: {', '.join(shipped_spaces())}"
    return parse(read_yaml(path, "space", hint), str(path))


def over_voxel_budget(objective: dict[str, Any], voxel_fraction: float) -> bool:
    """Whether a schedule of ``voxel_fraction`` is over a ``dice_under_budget`` objective's voxel budget (float
    rounding of the fraction aside); never for another objective."""
    return objective.get("type") == "dice_under_budget" and voxel_fraction > objective["voxel_budget"] + 1e-9


def objective_score(objective: dict[str, Any], dice: float, voxel_fraction: float,
                    target_dice: float | None) -> float:
    """The scalar that ASHA and Optuna maximise."""
    kind = objective["type"]
    if kind in ("max_dice", "pareto"):  # pareto: the Dice axis (compute is the other objective)
        return dice
    if kind == "dice_under_budget":
        return dice - 1.0 if over_voxel_budget(objective, voxel_fraction) else dice
    # cheapest_within: infeasible trials rank by how close they are to the target Dice,
    # feasible ones by how much compute they save (1 - voxel fraction)
    if target_dice is None:
        return dice
    return 1.0 - voxel_fraction if dice >= target_dice else dice - target_dice


# -- from sampled parameters to a schedule ------------------------------------------------


def schedule_from_params(
    params: dict[str, Any], final_patch: Sequence[int], pools: Sequence[int], batch_size: int, epochs: int,
    multiple_of: Sequence[int] | None = None,
) -> sch.Schedule:
    """The schedule a trial trains. ``preset`` (constant/paper/random) marks the reference trials.

    ``multiple_of``: the network's own patch rule (:func:`pgps_tune.config.patch_multiple`).
    """
    preset = params.get("preset")
    mode = params.get("mode", "resource")
    if preset in sch.PRESETS:
        return sch.preset(preset, final_patch, pools, batch_size, epochs, mode, params.get("batch_cap"), multiple_of)
    stages = int(params.get("stages", 1))
    growth = params.get("growth")
    start_fraction = params.get("start_fraction")
    if stages > 1 and growth is None and start_fraction is None:
        raise PgpsError("a multi-stage trial needs 'growth' or 'start_fraction' in the space")
    if growth is not None and start_fraction is not None:
        start_fraction = None  # growth wins when a space searches both
    return sch.parametric(
        final_patch, pools, batch_size, epochs, stages=stages,
        growth=growth if stages > 1 else None, start_fraction=start_fraction if stages > 1 else None,
        length_ratio=float(params.get("length_ratio", 1.0)), final_fraction=params.get("final_fraction"),
        mode=mode, batch_cap=params.get("batch_cap"), multiple_of=multiple_of, lengths=params.get("lengths"),
        growth_shape=params.get("growth_shape", "geometric"), family=params.get("family", "staged"),
    )


def reference_names(search: Search) -> tuple[str, ...]:
    """The references a sweep trains first: ``search.references`` as a list of names."""
    if isinstance(search.references, bool):
        return ("constant", "paper") if search.references else ()
    return search.references


def confirm_references(space: SearchSpace) -> tuple[str, ...]:
    """What a confirmation compares with: both references of the paper, and any other the space lists."""
    return tuple(dict.fromkeys(("constant", "paper", *reference_names(space.search))))


def reference_configs(space: SearchSpace, names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The reference trials (``names``, else the space's): by default the constant baseline and the paper
    schedule in the space's mode.

    A reference without ``:MODE`` takes the space's fixed mode (resource if the mode is searched).
    Roles: ``baseline`` for constant, ``paper`` for the paper schedule in that mode, else the name.
    """
    mode = space.param("mode")
    space_mode = mode.value if mode is not None and mode.kind == "fixed" else "resource"
    configs = []
    for name in reference_names(space.search) if names is None else names:
        preset, _, ref_mode = name.partition(":")
        if preset == "constant":
            configs.append({"role": "baseline", "preset": "constant"})
        else:
            configs.append({"role": "paper" if name == "paper" else name, "preset": preset,
                            "mode": ref_mode or space_mode})
    return configs


def _check_grid(parameters: tuple[Param, ...]) -> list[dict[str, Any]]:
    """The combinations :func:`check_space_against_plan` builds.

    Every combination of range ends and choices (a 2-point grid; a float's compared value too where a
    ``when`` reads it); and for each integer parameter that a ``when`` condition reads, every value of it
    (``lengths`` with ``when: "stages == 2"`` in a 1..4 range is only active at an interior value), crossed
    with the range ends of the parameters whose condition reads it and the first value of the others (the
    whole cross product of 100 stage counts would take a minute).  Trainer parameters that no condition reads
    do not shape the schedule: one value each.
    """
    reads: dict[str, list[Any]] = {}
    for p in parameters:
        if p.when is not None:
            reads.setdefault(p.when[0], []).append(p.when[2])

    def ends(p: Param) -> list[Any]:
        vals = p.grid_values(2)
        if p.name not in reads and p.name not in SCHEDULE_PARAMS:
            return vals[:1]
        if p.name in reads and p.kind == "float":
            vals += [r for r in reads[p.name] if isinstance(r, int | float) and p.low <= r <= p.high]  # type: ignore[operator]
        return vals

    def cross(values: dict[str, list[Any]]) -> list[dict[str, Any]]:
        combos: list[dict[str, Any]] = [{}]
        for p in parameters:
            combos = [x for c in combos
                      for x in ([{**c, p.name: v} for v in values[p.name]] if p.active(c) else [c])]
        return combos

    combos = cross({p.name: ends(p) for p in parameters})
    for q in parameters:
        if q.name in reads and q.kind == "int":
            assert q.low is not None and q.high is not None
            every = list(range(int(q.low), int(q.high) + 1, int(q.step or 1)))
            combos += cross({p.name: every if p is q else ends(p) if p.when and p.when[0] == q.name
                             else ends(p)[:1] for p in parameters})
    return list({tuple(sorted(c.items(), key=str)): c for c in combos}.values())


def check_space_against_plan(space: SearchSpace, final_patch, pools) -> None:
    """Refuse a space whose trial schedules or references the network cannot train, before any trial starts.

    Every combination of range ends and choices (a 2-point grid), with every value of an integer
    parameter that a ``when`` condition reads (:func:`_check_grid`), and both reference schedules must
    be valid for this plan, so a bad range fails here in one line, not in trial 17.
    """
    b = space.budget
    if not any(pools):
        raise PgpsError(f"{space.source}: {NO_DOWNSAMPLING}")
    check_filters(b.network, pools, b.filters, f"{space.source}: budget.filters")
    if b.res_units != 1 and b.network != "unet":
        raise PgpsError(f"{space.source}: budget.res_units shapes the unet network, not {b.network}; "
                        "leave it at 1 (or use network unet)")
    multiple_of = patch_multiple(b.network, pools, b.token_size)
    stages = space.param("stages")
    if stages is not None and stages.kind == "int" and stages.high is not None and stages.high > b.epochs:
        raise PgpsError(
            f"{space.source}: stages can reach {int(stages.high)} but budget.epochs is {b.epochs}; "
            f"give --epochs {int(stages.high)} or more (budget.epochs), or lower parameters.stages.high"
        )
    for combo in _check_grid(space.parameters):
        try:
            schedule_from_params(combo, final_patch, pools, b.batch_size, b.epochs, multiple_of)
        except PgpsError as exc:
            raise PgpsError(f"{space.source}: parameters {combo} give an invalid schedule: {exc}") from None
    confirming = space.confirm.enabled and space.objective.type != "pareto"  # a front is not confirmed
    confirm_epochs = space.confirm.epochs if confirming and space.confirm.epochs else b.epochs
    searched = {r["role"] for r in reference_configs(space)}
    refs = reference_configs(space)  # those the search phase trains first, then any only the confirmation adds
    refs += [r for r in reference_configs(space, confirm_references(space)) if confirming and r["role"] not in searched]
    for ref in refs:
        # the search phase trains its references at budget.epochs, the confirmation all of them at its own
        for epochs in sorted({confirm_epochs} | ({b.epochs} if ref["role"] in searched else set())):
            try:
                schedule_from_params(ref, final_patch, pools, b.batch_size, epochs, multiple_of)
            except PgpsError as exc:
                at = f" at confirm.epochs {epochs}" if epochs != b.epochs else ""
                fix = "" if ref["role"] in searched else (
                    " (the confirmation compares with it; set confirm.enabled false to skip the confirmation)")
                why = str(exc).replace("give --epochs", "give --confirm-epochs") if at else exc  # the flag at fault
                raise PgpsError(f"{space.source}: the {ref['role']} reference cannot be built{at}: {why}"
                                f"{fix}") from None
