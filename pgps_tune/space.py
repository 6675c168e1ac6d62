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
      mode: {type: categorical, choices: [resource, performance]}
      fg_ratio: {value: 0.5}         # fixed
    objective: {type: max_dice}      # or cheapest_within (tolerance), dice_under_budget (voxel_budget)
    search: {algorithm: tpe, num_samples: 24, seed: 0}   # tpe | random | grid
    asha: {time_attr: baseline_iterations, grace_fraction: 0.15, reduction_factor: 3, brackets: 1}
    budget: {epochs: 30, iterations_per_epoch: 50, batch_size: 2, network: unet, ...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgps_tune import schedule as sch
from pgps_tune.config import (
    AUGMENT_PRESETS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    NETWORKS,
    OPTIMIZERS,
    TOKEN_SIZES,
    TrainConfig,
    patch_multiple,
)
from pgps_tune.errors import PgpsError, read_yaml

if TYPE_CHECKING:
    import optuna

# parameters that build the schedule (the rest tune the trainer)
SCHEDULE_PARAMS = {
    "stages": "int", "growth": "float", "start_fraction": "float", "length_ratio": "float",
    "final_fraction": "float", "mode": "categorical", "batch_cap": "int",
}
TRAINER_PARAMS = {"fg_ratio": "float", "lr": "float"}
KNOWN_PARAMS = {**SCHEDULE_PARAMS, **TRAINER_PARAMS}
OBJECTIVES = ("max_dice", "cheapest_within", "dice_under_budget")
ALGORITHMS = ("tpe", "random", "grid")
JUDGES = ("final_stage", "always")
TIME_ATTRS = ("baseline_iterations", "training_iteration", "epoch")
_WHEN = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|!=|>|<)\s*([A-Za-z0-9_.\-]+)\s*$")


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


@dataclass(frozen=True)
class Objective:
    type: str = "max_dice"
    tolerance: float = 0.01  # cheapest_within: allowed Dice drop below the baseline
    voxel_budget: float = 0.5  # dice_under_budget: largest voxel fraction allowed


@dataclass(frozen=True)
class Search:
    algorithm: str = "tpe"
    num_samples: int = 16
    seed: int = 0
    grid_points: int = 3
    startup_trials: int = 10  # TPE: random trials before the model is used (Optuna's default)
    max_compute: float = 0.0  # stop the search phase after this many baseline runs' worth of voxels (0: no cap)
    references: bool = True  # train the constant and paper references first


@dataclass(frozen=True)
class Asha:
    enabled: bool = True
    time_attr: str = "baseline_iterations"
    grace_fraction: float = 0.15  # of the baseline's total iterations
    reduction_factor: float = 3.0
    brackets: int = 1
    # final_stage: a trial is judged only on validations made in its last stage (at the final patch);
    # always: on every validation, also while it still trains on small patches
    judge: str = "final_stage"


@dataclass(frozen=True)
class Budget:
    """How each trial trains; trainer fields default to :class:`pgps_tune.config.TrainConfig`'s."""

    epochs: int = DEFAULT_EPOCHS
    iterations_per_epoch: int = TrainConfig.iterations_per_epoch
    batch_size: int = DEFAULT_BATCH_SIZE
    network: str = TrainConfig.network
    token_size: int = TrainConfig.token_size  # unetr
    augment: str = TrainConfig.augment  # a preset name, or "none"
    filters: tuple[int, ...] = TrainConfig.filters
    optimizer: str = TrainConfig.optimizer
    lr: float | None = None  # None: the optimizer's default learning rate
    val_every: int = 3
    fg_ratio: float = TrainConfig.fg_ratio
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = TrainConfig.seed
    final_patch: tuple[int, int, int] | None = None
    pools: tuple[int, int, int] | None = None
    synthetic_cases: int = 24
    synthetic_shape: tuple[int, int, int] = (48, 48, 48)
    max_failures: int = 1


@dataclass(frozen=True)
class SearchSpace:
    name: str
    parameters: tuple[Param, ...]
    objective: Objective = field(default_factory=Objective)
    search: Search = field(default_factory=Search)
    asha: Asha = field(default_factory=Asha)
    budget: Budget = field(default_factory=Budget)
    source: str = "<space>"

    def optuna_sampler(self):
        """The Optuna sampler the space asks for (TPE or random, seeded)."""
        import optuna

        if self.search.algorithm == "tpe":
            return optuna.samplers.TPESampler(seed=self.search.seed, n_startup_trials=self.search.startup_trials)
        return optuna.samplers.RandomSampler(seed=self.search.seed)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.parameters if p.name == name), None)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination a grid search visits (inactive conditionals dropped, duplicates removed)."""
        combos: list[dict[str, Any]] = [{}]
        for p in self.parameters:
            nxt = []
            for c in combos:
                if p.active(c):
                    nxt.extend({**c, p.name: v} for v in p.grid_values(self.search.grid_points))
                else:
                    nxt.append(c)
            combos = nxt
        unique = {tuple(sorted(c.items())): c for c in combos}
        return list(unique.values())


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


def _section(raw: dict[str, Any], key: str, cls, src: str):
    data = raw.get(key) or {}
    if not isinstance(data, dict):
        raise PgpsError(f"{src}: '{key}' must be a mapping")
    unknown = sorted(set(data) - _fields(cls))
    if unknown:
        raise PgpsError(f"{src}: unknown key(s) {unknown} in '{key}'; allowed: {sorted(_fields(cls))}")
    defaults = cls()
    out = {}
    for k, v in data.items():
        want = getattr(defaults, k)
        if k == "lr":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PgpsError(f"{src}: {key}.{k} must be a number, got {v!r}")
            v = float(v)
        elif isinstance(want, tuple) or k in ("final_patch", "pools"):
            if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
                raise PgpsError(f"{src}: {key}.{k} must be a list of integers, got {v!r}")
            v = tuple(v)
        elif isinstance(want, bool):
            if not isinstance(v, bool):
                raise PgpsError(f"{src}: {key}.{k} must be true or false, got {v!r}")
        elif isinstance(want, (int, float)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise PgpsError(f"{src}: {key}.{k} must be a number, got {v!r}")
            if isinstance(want, int) and not isinstance(v, int):
                raise PgpsError(f"{src}: {key}.{k} must be an integer, got {v!r}")
        elif isinstance(want, str) and not isinstance(v, str):
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
    return other, op, value


def _parse_param(name: str, spec: Any, src: str) -> Param:
    if name not in KNOWN_PARAMS:
        raise PgpsError(f"{src}: unknown parameter '{name}'; known: {sorted(KNOWN_PARAMS)}")
    if not isinstance(spec, dict):
        spec = {"value": spec}
    allowed = {"type", "low", "high", "log", "step", "choices", "value", "when"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise PgpsError(f"{src}: parameter '{name}' has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    when = _parse_when(spec["when"], name, src) if "when" in spec else None
    if "value" in spec:
        return Param(name, "fixed", value=spec["value"], when=when)
    kind = spec.get("type")
    if kind not in ("int", "float", "categorical"):
        raise PgpsError(f"{src}: parameter '{name}' needs type int, float or categorical (or a fixed value)")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise PgpsError(f"{src}: parameter '{name}': categorical needs a non-empty 'choices' list")
        return Param(name, kind, choices=tuple(choices), when=when)
    low, high = spec.get("low"), spec.get("high")
    for what, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PgpsError(f"{src}: parameter '{name}' needs a numeric '{what}'")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise PgpsError(f"{src}: parameter '{name}' is int, so low and high must be integers")
    if not low < high:
        raise PgpsError(f"{src}: parameter '{name}' has an empty range [{low}, {high}]; make low < high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise PgpsError(f"{src}: parameter '{name}' is log-scaled, so low must be > 0")
    step = spec.get("step")
    if step is not None:
        if log:
            raise PgpsError(f"{src}: parameter '{name}' has both log and step; Optuna allows only one of them")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise PgpsError(f"{src}: parameter '{name}': step must be a positive number")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)


def _dependency_order(params: list[Param], src: str) -> tuple[Param, ...]:
    """Order parameters so that each comes after the one its ``when`` reads (file order otherwise)."""
    names = {p.name for p in params}
    for p in params:
        if p.when and p.when[0] not in names:
            raise PgpsError(f"{src}: parameter '{p.name}' depends on '{p.when[0]}', which the space does not define")
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
    allowed = {"name", "description", "parameters", "objective", "search", "asha", "budget"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PgpsError(f"{src}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise PgpsError(f"{src}: 'parameters' must be a non-empty mapping")
    params = _dependency_order([_parse_param(str(k), v, src) for k, v in params_raw.items()], src)
    objective = _section(raw, "objective", Objective, src)
    search = _section(raw, "search", Search, src)
    asha = _section(raw, "asha", Asha, src)
    budget = _section(raw, "budget", Budget, src)
    if objective.type not in OBJECTIVES:
        raise PgpsError(f"{src}: objective.type {objective.type!r} unknown; use one of {', '.join(OBJECTIVES)}")
    if search.algorithm not in ALGORITHMS:
        raise PgpsError(f"{src}: search.algorithm {search.algorithm!r} unknown; use one of {', '.join(ALGORITHMS)}")
    if search.num_samples < 1:
        raise PgpsError(f"{src}: search.num_samples must be >= 1")
    if search.startup_trials < 0:
        raise PgpsError(f"{src}: search.startup_trials must be >= 0")
    if search.max_compute < 0:
        raise PgpsError(f"{src}: search.max_compute must be >= 0 (baseline runs' worth of compute; 0 = no cap)")
    if not search.references and objective.type == "cheapest_within":
        raise PgpsError(f"{src}: objective cheapest_within needs the baseline's Dice; set search.references: true")
    if asha.time_attr not in TIME_ATTRS:
        raise PgpsError(f"{src}: asha.time_attr {asha.time_attr!r} unknown; use one of {', '.join(TIME_ATTRS)}")
    if asha.judge not in JUDGES:
        raise PgpsError(f"{src}: asha.judge {asha.judge!r} unknown; use one of {', '.join(JUDGES)}")
    if not 0 < asha.grace_fraction <= 1 or asha.reduction_factor <= 1 or asha.brackets < 1:
        raise PgpsError(f"{src}: asha needs 0 < grace_fraction <= 1, reduction_factor > 1, brackets >= 1")
    if budget.epochs < 1 or budget.iterations_per_epoch < 1 or budget.batch_size < 1 or budget.val_every < 1:
        raise PgpsError(f"{src}: budget epochs, iterations_per_epoch, batch_size and val_every must be >= 1")
    if budget.optimizer not in OPTIMIZERS:
        raise PgpsError(f"{src}: budget.optimizer {budget.optimizer!r} unknown; use one of {', '.join(OPTIMIZERS)}")
    if budget.network not in NETWORKS:
        raise PgpsError(f"{src}: budget.network {budget.network!r} unknown; use one of {', '.join(NETWORKS)}")
    if budget.token_size not in TOKEN_SIZES:
        raise PgpsError(f"{src}: budget.token_size {budget.token_size} unknown; use one of "
                        f"{', '.join(map(str, TOKEN_SIZES))}")
    if budget.augment not in AUGMENT_PRESETS:
        raise PgpsError(f"{src}: budget.augment {budget.augment!r} unknown; use one of {', '.join(AUGMENT_PRESETS)}")
    mode = next((p for p in params if p.name == "mode"), None)
    if mode:
        for m in mode.choices if mode.kind == "categorical" else (mode.value,):
            if m not in sch.MODES:
                raise PgpsError(f"{src}: mode {m!r} unknown; use resource or performance")
    return SearchSpace(
        name=str(raw.get("name") or Path(source).stem), parameters=params, objective=objective,
        search=search, asha=asha, budget=budget, source=source,
    )


def load(path: str | Path) -> SearchSpace:
    raw = read_yaml(path, "space", "see search_spaces/ for examples")
    return parse(raw, str(path))


def objective_score(objective: dict[str, Any], dice: float, voxel_fraction: float,
                    target_dice: float | None) -> float:
    """The scalar that ASHA and Optuna maximise."""
    kind = objective["type"]
    if kind == "max_dice":
        return dice
    if kind == "dice_under_budget":
        return dice if voxel_fraction <= objective["voxel_budget"] + 1e-9 else dice - 1.0
    # cheapest_within: infeasible trials rank by how close they are to the target Dice,
    # feasible ones by how much compute they save (1 - voxel fraction)
    if target_dice is None:
        return dice
    return 1.0 - voxel_fraction if dice >= target_dice else dice - target_dice


# -- from sampled parameters to a schedule ------------------------------------------------


def schedule_from_params(
    params: dict[str, Any], final_patch, pools, batch_size: int, epochs: int, multiple_of=None
) -> sch.Schedule:
    """The schedule a trial trains. ``preset`` (constant/paper) marks the reference trials.

    ``multiple_of``: the network's own patch rule (:func:`pgps_tune.config.patch_multiple`).
    """
    preset = params.get("preset")
    mode = params.get("mode", "resource")
    if preset in ("constant", "paper"):
        return sch.preset(preset, final_patch, pools, batch_size, epochs, mode, params.get("batch_cap"), multiple_of)
    stages = int(params.get("stages", 1))
    growth = params.get("growth")
    start_fraction = params.get("start_fraction")
    if stages > 1 and growth is None and start_fraction is None:
        raise PgpsError("a multi-stage trial needs 'growth' or 'start_fraction' in the space")
    if growth is not None and start_fraction is not None:
        start_fraction = None  # growth wins when a space searches both
    s = sch.parametric(
        final_patch, pools, batch_size, epochs, stages=stages,
        growth=growth if stages > 1 else None, start_fraction=start_fraction if stages > 1 else None,
        length_ratio=float(params.get("length_ratio", 1.0)), final_fraction=params.get("final_fraction"),
        mode=mode, batch_cap=params.get("batch_cap"), multiple_of=multiple_of,
    )
    return s


def reference_configs(space: SearchSpace) -> list[dict[str, Any]]:
    """The constant baseline and the paper schedule in the space's mode (resource if searched)."""
    mode = space.param("mode")
    paper_mode = mode.value if mode is not None and mode.kind == "fixed" else "resource"
    return [
        {"role": "baseline", "preset": "constant"},
        {"role": "paper", "preset": "paper", "mode": paper_mode},
    ]


def check_space_against_plan(space: SearchSpace, final_patch, pools) -> None:
    """Refuse a space whose corners or references the network cannot train, before any trial starts.

    Every combination of range ends and choices (a 2-point grid) and both reference
    schedules must be valid for this plan, so a bad range fails here in one line,
    not in trial 17.
    """
    b = space.budget
    multiple_of = patch_multiple(b.network, pools, b.token_size)
    stages = space.param("stages")
    if stages is not None and stages.kind == "int" and stages.high is not None and stages.high > b.epochs:
        raise PgpsError(
            f"{space.source}: stages can reach {int(stages.high)} but budget.epochs is {b.epochs}; "
            "lower parameters.stages.high or raise budget.epochs"
        )
    corners = SearchSpace(space.name, space.parameters, space.objective,
                          Search(space.search.algorithm, 1, space.search.seed, grid_points=2),
                          space.asha, b, space.source).grid()
    for combo in corners:
        try:
            schedule_from_params(combo, final_patch, pools, b.batch_size, b.epochs, multiple_of)
        except PgpsError as exc:
            raise PgpsError(f"{space.source}: parameters {combo} give an invalid schedule: {exc}") from None
    for ref in reference_configs(space):
        try:
            schedule_from_params(ref, final_patch, pools, b.batch_size, b.epochs, multiple_of)
        except PgpsError as exc:
            raise PgpsError(f"{space.source}: the {ref['role']} reference cannot be built: {exc}") from None
