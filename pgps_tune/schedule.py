"""What a patch-size curriculum *is*: stages, presets, voxel accounting, files.

Pure Python on purpose (no torch, no Ray): every other part of pgps-tune asks
this module questions ("which stage is epoch e in?", "what does this cost in
voxels?"), and it is cheap to test exhaustively.

A schedule is an ordered list of :class:`Stage` (patch size per axis, batch
size, length in epochs) plus the final (inference) patch size, the number of
stride-2 poolings per axis of the network (which fixes what patch sizes the
network can take), and the baseline batch size that voxel fractions are
measured against.

Two families share that form.  ``staged`` (the curriculum): the stages run one
after the other.  ``random`` (random patch-size sampling, the PGPS authors'
follow-up): every iteration draws its stage at random, stage ``k`` with
probability ``epochs_k / epochs``, so the stage list is the set of sizes and
their shares; voxel accounting, memory and every check then read the same
stage list (voxels are the expectation).  Validation is at the final patch in
both.  Batch modes: ``resource`` (constant batch), ``performance`` (about
constant voxels per batch) and ``sqrt`` (the batch grows with the square root
of the voxel ratio, between the two).

>>> s = paper((128, 128, 128), pools=(5, 5, 5), batch_size=2, epochs=1000,
...           mode="performance")
>>> [st.batch_size for st in s.stages]
[128, 64, 32, 16, 10, 7, 4, 3, 2, 2]
>>> round(paper((128,) * 3, (5,) * 3, 2, 1000, "resource").voxel_fraction(), 3)
0.344
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pgps_tune.config import NO_DOWNSAMPLING, Recipe
from pgps_tune.errors import PgpsError, atomic_write_text, did_you_mean, read_yaml, strict_json, yaml_text
from pgps_tune.limits import LIMITS

FORMAT_VERSION = 1
NNUNET_FILE_FORMAT = "pgps-tune-nnunet"  # what 'export --nnunet' writes for nnU-Net's trainer: not a schedule file
Mode = Literal["resource", "performance"]
MODES: tuple[str, ...] = ("resource", "performance", "sqrt")
FAMILIES: tuple[str, ...] = ("staged", "random")
GROWTH_SHAPES: tuple[str, ...] = ("geometric", "linear")
PRESETS: tuple[str, ...] = ("constant", "paper", "random")
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Stage:
    """One stage of a curriculum: train ``epochs`` epochs on ``patch_size`` patches."""

    patch_size: Triple
    batch_size: int
    epochs: int

    def __post_init__(self) -> None:
        # a list from a caller (or a file) becomes the tuple every comparison expects: [32, 32, 32] and
        # (32, 32, 32) are one patch, and a frozen value stays hashable
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch_size)


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages ending at the final patch size.

    ``meta`` carries provenance (preset, mode, dataset, score, ...) through
    files unchanged; it never changes what is trained.  ``sampling`` is the
    family: ``staged`` or ``random`` (see the module docstring).  ``recipe`` (a sweep's
    exports carry one) is how the schedule was trained where it was scored:
    ``pgps-tune train --schedule`` trains with it unless a flag says otherwise.
    """

    stages: tuple[Stage, ...]
    final_patch: Triple
    pools: Triple
    baseline_batch_size: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    sampling: str = "staged"
    recipe: Recipe | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # lists given from Python are the same schedule as the tuples a file load makes (and compare equal
        # to them); ``meta=None`` is no provenance
        for name in ("stages", "final_patch", "pools"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.meta is None:
            object.__setattr__(self, "meta", {})
        validate(self)

    # -- questions the sampler and trainer ask ---------------------------------
    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def stage_starts(self) -> list[int]:
        """First epoch of every stage."""
        starts, e = [], 0
        for st in self.stages:
            starts.append(e)
            e += st.epochs
        return starts

    def stage_index_at(self, epoch: float) -> int:
        """Index of the stage that trains epoch ``epoch`` (0-based).

        A fractional epoch (``2.5``: half way through epoch 2) is in the stage of its whole epoch, so a
        caller that counts progress in fractions of epochs asks directly.  Outside ``0 <= epoch < epochs``
        (the last epoch is ``epochs - 1``) there is no stage: :class:`ValueError` naming the range.

        >>> s = paper((32, 32, 32), (3, 3, 3), batch_size=2, epochs=20)
        >>> s.stage_index_at(0), s.stage_index_at(2.5), s.stage_index_at(19)
        (0, 1, 9)
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int | float) and not hasattr(epoch, "__index__"):
            raise ValueError(f"epoch must be a number, got {epoch!r}")
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} outside the schedule's 0..{self.epochs - 1}")
        for i, start in reversed(list(enumerate(self.stage_starts()))):
            if epoch >= start:
                return i
        raise AssertionError("unreachable")

    def stage_at(self, epoch: float) -> Stage:
        """The stage that trains epoch ``epoch`` (0-based; see :meth:`stage_index_at`)."""
        return self.stages[self.stage_index_at(epoch)]

    def stage_index_of_iteration(self, iteration: int, iterations_per_epoch: int, seed: int) -> int:
        """Index of the stage that trains ``iteration`` (0-based): where the patch size changes.

        Staged: the stage of its epoch.  Random: a draw from ``(seed, iteration)`` alone
        (stage ``k`` with probability ``epochs_k / epochs``), so any worker, a resumed run
        and a rerun get the same patch for the same iteration.
        """
        for value, what in ((iteration, "iteration"), (iterations_per_epoch, "iterations_per_epoch")):
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise ValueError(f"{what} must be an integer, got {value!r}")
        if iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
        epoch = iteration // iterations_per_epoch
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"iteration {iteration} outside the schedule's 0..{self.epochs * iterations_per_epoch - 1}"
                             f" ({self.epochs} epochs of {iterations_per_epoch} iterations)")
        if self.sampling == "random":
            # a string seed goes through SHA-512: the same draw on every platform and Python version
            epoch = random.Random(f"pgps-random-patch:{seed}:{iteration}").randrange(self.epochs)
        return self.stage_index_at(epoch)

    def final_phase(self, stage: int) -> bool:
        """Whether training in ``stage`` already has the run's final mix of patch sizes.

        Staged: only the last stage trains at the final patch; random: every iteration
        draws from the same mix, so a validation at any point compares like with like.
        """
        return self.sampling == "random" or stage == len(self.stages) - 1

    # -- voxel accounting ------------------------------------------------------
    def voxels(self) -> int:
        """Voxels fed to the network over the whole run, per iteration of an epoch."""
        return sum(s.epochs * s.batch_size * s.patch_voxels for s in self.stages)

    def baseline_voxels(self) -> int:
        """Voxels of the constant-patch baseline at the same epochs, per iteration of an epoch."""
        return self.epochs * self.baseline_batch_size * math.prod(self.final_patch)

    def voxel_fraction(self) -> float:
        """Voxels processed as a fraction of the constant baseline's."""
        return self.voxels() / self.baseline_voxels()

    # -- files -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``sampling`` is written only for the random family, so staged files stay as they were."""
        return {
            "format_version": FORMAT_VERSION,
            "final_patch": list(self.final_patch),
            "pools": list(self.pools),
            "baseline_batch_size": self.baseline_batch_size,
            **({"sampling": self.sampling} if self.sampling != "staged" else {}),
            "stages": [
                {"patch_size": list(s.patch_size), "batch_size": s.batch_size, "epochs": s.epochs}
                for s in self.stages
            ],
            **({"recipe": self.recipe.to_dict()} if self.recipe is not None else {}),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> Schedule:
        return _from_dict(data, source)

    def to_json(self) -> str:
        """JSON every parser reads: a NaN in ``meta`` (a score no repeat could give) is written as null."""
        return strict_json(self.to_dict(), indent=2) + "\n"

    def to_yaml(self) -> str:
        return yaml_text(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Write JSON for ``.json``, YAML otherwise (atomically).

        A symbolic link is written through: its target gets the schedule and the link stays.
        """
        path = Path(path)
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_yaml()
        return atomic_write_text(Path(os.path.realpath(path)) if path.is_symlink() else path, text)

    def table(self) -> str:
        """Human-readable table of the stages (random sampling: epochs are expected shares)."""
        rows = ["stage  patch            batch  epochs  voxels/batch  share_of_voxels"]
        total = self.voxels() or 1
        for i, s in enumerate(self.stages):
            patch = "x".join(str(p) for p in s.patch_size)
            vox = s.batch_size * s.patch_voxels
            rows.append(
                f"{i:>5}  {patch:<15}  {s.batch_size:>5}  {s.epochs:>6}  {vox:>12}  "
                f"{s.epochs * vox / total:>15.3f}"
            )
        drawn = ", each iteration draws its stage at random (odds by epochs)" if self.sampling == "random" else ""
        rows.append(
            f"{plural(len(self.stages), 'stage')}, {plural(self.epochs, 'epoch')}{drawn}, voxel fraction "
            f"{self.voxel_fraction():.3f} of the constant baseline"
        )
        return "\n".join(rows)


def plural(n: float, noun: str, many: str | None = None) -> str:
    """``n`` and the noun in the right number (the schedule table, the CLI and the report all count).

    >>> plural(1, "trial"), plural(2, "trial"), plural(0, "trial"), plural(3, "stage", "stages")
    ('1 trial', '2 trials', '0 trials', '3 stages')
    >>> plural(1.0, "CPU"), plural(0.5, "GPU")
    ('1 CPU', '0.5 GPUs')
    """
    return f"{f'{n:g}' if isinstance(n, float) else n} {noun if n == 1 else many or noun + 's'}"


# -- memory ------------------------------------------------------------------

# Activation values the network keeps for the backward pass, per channel and voxel of each level:
# a little under what torch 2.13 holds in fp32 (measured, forward + backward on the CPU: 4 to 5.5
# for MONAI's UNet with one residual unit, 16 for DynUNet), so an estimate over the machine's
# memory is surely too much.
SAVED_ACTIVATIONS = {"unet": 4, "dynunet": 12}
# each residual unit past the first (MONAI's num_res_units, --res-units): what autograd saves per channel and
# voxel grew by 0.3-0.7 values per unit over one unit's 2.0-2.6 (saved-tensor hooks, 16^3 to 40x56x40), so 1
# keeps the estimate under the measured cost
SAVED_PER_EXTRA_RES_UNIT = {"unet": 1}


def training_memory(
    s: Schedule, filters: Sequence[int], network: str = "unet", bytes_per_value: int = 4, res_units: int = 1
) -> tuple[int, int]:
    """Estimated activation bytes of the hungriest stage of ``s``, and that stage's index.

    Why: a batch far too large for the machine should be refused in one line before a run
    starts, not end in an out-of-memory kill.  Level ``l`` of the network holds
    ``filters[l]`` channels at the patch size halved once per pooling so far on each axis.
    ``bytes_per_value`` is 4 in fp32, 2 under CUDA mixed precision; ``res_units`` is the UNet's
    residual units per level.
    """
    if network not in SAVED_ACTIVATIONS:
        raise PgpsError(f"no memory model for network {network!r}; use one of {', '.join(SAVED_ACTIVATIONS)}")
    if not filters:
        raise PgpsError("filters must give at least one channel count (the first level's)")
    levels = max(s.pools) + 1
    per_stage = [
        st.batch_size * sum(
            channels * math.prod(p // 2 ** min(level, k) for p, k in zip(st.patch_size, s.pools))
            for level, channels in enumerate(filters[:levels])
        )
        for st in s.stages
    ]
    worst = max(range(len(per_stage)), key=per_stage.__getitem__)
    values = SAVED_ACTIVATIONS[network] + SAVED_PER_EXTRA_RES_UNIT.get(network, 0) * (max(1, res_units) - 1)
    return per_stage[worst] * values * bytes_per_value, worst


# -- validation --------------------------------------------------------------


def divisors(pools: Sequence[int], multiple_of: Sequence[int] | None = None) -> Triple:
    """What every patch axis must be divisible by: 2**pools per axis.

    ``multiple_of`` (optional, per axis) is a network's own rule as plain data, e.g.
    32 for SwinUNETR or the token size for UNETR; the result is then the least common
    multiple of both, which is also the smallest legal patch side.
    """
    div = [2**p for p in pools]
    if multiple_of is not None:
        div = [math.lcm(d, int(m)) for d, m in zip(div, multiple_of)]
    return tuple(div)  # type: ignore[return-value]


def check_patch(
    patch: Sequence[int], pools: Sequence[int], what: str = "patch", multiple_of: Sequence[int] | None = None
) -> None:
    """Refuse a patch the network cannot take."""
    div = divisors(pools, multiple_of)
    bad = [a for a in range(3) if patch[a] < div[a] or patch[a] % div[a]]
    if bad:
        need = "x".join(str(d) for d in div)
        raise PgpsError(
            f"{what} {'x'.join(map(str, patch))} is not divisible by the network's downsampling "
            f"{need} on axis {', '.join(map(str, bad))}; use multiples of {need} per axis"
            + (f" (the smallest legal patch is {need})" if multiple_of is not None else "")
        )


def validate(s: Schedule) -> None:
    """Raise :class:`PgpsError` naming what is wrong with a schedule."""
    if len(s.final_patch) != 3 or len(s.pools) != 3:
        raise PgpsError("final_patch and pools need 3 values each (x y z)")
    for p in s.pools:
        LIMITS["pools"].check(p, "pools per axis")
    if not any(s.pools):
        raise PgpsError(NO_DOWNSAMPLING)
    for p in s.final_patch:
        LIMITS["patch_axis"].check(p, "final_patch axis")
    LIMITS["batch_size"].check(s.baseline_batch_size, "baseline_batch_size")
    if not s.stages:
        raise PgpsError("a schedule needs at least one stage")
    for i, st in enumerate(s.stages):
        if not isinstance(st, Stage):
            raise PgpsError(f"stage {i} is a {type(st).__name__}, not a Stage; give Stage(patch_size, batch_size, "
                            "epochs), or read plain data with Schedule.from_dict")
    if len(s.stages) > LIMITS["stages"].high:
        raise PgpsError(f"a schedule has at most {LIMITS['stages'].high:g} stages, got {len(s.stages)}")
    check_patch(s.final_patch, s.pools, "final patch")
    total = 0
    for i, st in enumerate(s.stages):
        if len(st.patch_size) != 3:
            raise PgpsError(f"stage {i}: patch_size needs 3 values (x y z)")
        if st.epochs < 1:
            raise PgpsError(f"stage {i}: epochs must be >= 1, got {st.epochs}; give more epochs or fewer stages")
        LIMITS["batch_size"].check(st.batch_size, f"stage {i} batch_size")
        LIMITS["epochs"].check(st.epochs, f"stage {i} epochs")
        total += st.epochs
        check_patch(st.patch_size, s.pools, f"stage {i} patch")
        if any(p > f for p, f in zip(st.patch_size, s.final_patch)):
            raise PgpsError(
                f"stage {i} patch {list(st.patch_size)} is larger than the final patch "
                f"{list(s.final_patch)}; stages must fit inside the final patch"
            )
    LIMITS["epochs"].check(total, "the schedule's total epochs")
    if s.sampling not in FAMILIES:
        raise PgpsError(f"sampling {s.sampling!r} unknown; use one of {', '.join(FAMILIES)}")
    if s.stages[-1].patch_size != s.final_patch:
        raise PgpsError(
            f"the last stage trains {list(s.stages[-1].patch_size)} but the final patch is "
            f"{list(s.final_patch)}; end the schedule with a stage at the final patch size"
        )


def _ints(value: Any, n: int | None, what: str) -> list[int]:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise PgpsError(f"{what} must be a list of {n or 'some'} integers, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PgpsError(f"{what} must hold integers, got {value!r}" + _as_written(value))
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PgpsError(f"{what} must be an integer, got {value!r}" + _as_written(value))
    return value


def _as_written(value: Any) -> str:
    """The fix for a whole number written as a float (``2.0``): files hold sizes and epochs as integers."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, float)), None)
    return f"; write {int(value)}" if isinstance(value, float) and value.is_integer() else ""


def _plain_data(value: Any, where: str) -> None:
    """Refuse what JSON cannot hold as it is (a date, bytes, a number as a key): a schedule's ``meta`` is written
    back as YAML and JSON, so it must be plain data that both round-trip exactly."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise PgpsError(f"{at}: key {k!r} is a {type(k).__name__}; keys must be strings (quote it)")
                stack.append((item, f"{at}.{k}"))
        elif isinstance(v, list | tuple):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(v))
        elif not (v is None or isinstance(v, str | bool | int | float)):  # a NaN score stays as .nan
            raise PgpsError(f"{at}: {v!r} is not plain data (a {type(v).__name__}); give a string, number, "
                            "true/false, null, list or mapping")


def _from_dict(data: Any, source: str) -> Schedule:
    if not isinstance(data, dict):
        raise PgpsError(f"{source}: expected a mapping with 'stages', got {type(data).__name__}")
    if data.get("format") == NNUNET_FILE_FORMAT:
        raise PgpsError(f"{source} is an nnU-Net schedule file (nnU-Net's axis order, for 'pgps-tune nnunet-train' "
                        "or PGPS_TUNE_SCHEDULE); give a pgps-tune schedule such as the sweep's best_schedule.yaml")
    if "format_version" not in data:
        raise PgpsError(f"{source}: missing key 'format_version'; a schedule file starts with 'format_version: "
                        f"{FORMAT_VERSION}' (the format this pgps-tune reads)")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not true, not 1.0
        raise PgpsError(
            f"{source}: format_version {version!r} is not supported; this pgps-tune reads "
            f"format_version {FORMAT_VERSION} (regenerate it with 'pgps-tune schedule')"
        )
    known = ["format_version", "final_patch", "pools", "baseline_batch_size", "sampling", "stages", "recipe",
             "meta"]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise PgpsError(f"{source}: unknown key(s) {unknown}{did_you_mean(unknown, known)}; allowed: "
                        f"{sorted(known)}")
    for key in ("final_patch", "pools", "baseline_batch_size", "stages"):
        if key not in data:
            raise PgpsError(f"{source}: missing key '{key}'")
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list):
        raise PgpsError(f"{source}: 'stages' must be a list of stages")
    stages = []
    stage_keys = ["patch_size", "batch_size", "epochs"]
    for i, st in enumerate(raw_stages):
        if not isinstance(st, dict):
            raise PgpsError(f"{source}: stage {i} must be a mapping of patch_size, batch_size and epochs, got "
                            f"{st!r}")
        for key in sorted(set(st) - set(stage_keys), key=str):
            raise PgpsError(f"{source}: stage {i}: unknown key {key!r}{did_you_mean(key, stage_keys)}; a stage has "
                            "patch_size, batch_size and epochs")
        for key in stage_keys:
            if key not in st:
                raise PgpsError(f"{source}: stage {i} lacks '{key}'; a stage has patch_size, batch_size and epochs")
        stages.append(
            Stage(
                tuple(_ints(st["patch_size"], 3, f"{source}: stage {i} patch_size")),  # type: ignore[arg-type]
                _int(st["batch_size"], f"{source}: stage {i} batch_size"),
                _int(st["epochs"], f"{source}: stage {i} epochs"),
            )
        )
    meta = {} if data.get("meta") is None else data["meta"]
    if not isinstance(meta, dict):
        raise PgpsError(f"{source}: 'meta' must be a mapping, got {meta!r}")
    _plain_data(meta, f"{source}: meta")
    recipe = Recipe.parse(data["recipe"], f"{source}: recipe") if data.get("recipe") is not None else None
    # read before the try below, whose errors get the source in front: these name it already
    final_patch = tuple(_ints(data["final_patch"], 3, f"{source}: final_patch"))
    pools = tuple(_ints(data["pools"], 3, f"{source}: pools"))
    baseline_batch_size = _int(data["baseline_batch_size"], f"{source}: baseline_batch_size")
    try:
        return Schedule(
            stages=tuple(stages),
            final_patch=final_patch,  # type: ignore[arg-type]
            pools=pools,  # type: ignore[arg-type]
            baseline_batch_size=baseline_batch_size,
            meta=meta, recipe=recipe,
            sampling=data.get("sampling", "staged"),
        )
    except PgpsError as exc:
        raise PgpsError(f"{source}: {exc}") from None


def load(path: str | Path) -> Schedule:
    """Read a schedule file (YAML or JSON; JSON is valid YAML)."""
    data = read_yaml(path, "schedule", "check the path, or write one with 'pgps-tune schedule --out'")
    return Schedule.from_dict(data, source=str(path))


# -- builders ------------------------------------------------------------------


def _performance_batch(batch_size: int, final: Triple, patch: Triple, cap: int | None) -> int:
    """Largest batch whose voxels stay at or below the baseline's (and the cap)."""
    b = max(1, (batch_size * math.prod(final)) // math.prod(patch))
    return min(b, cap) if cap else b


def _sqrt_batch(batch_size: int, final: Triple, patch: Triple, cap: int | None) -> int:
    """``floor(batch * sqrt(final voxels / patch voxels))``, in exact integers (and the cap).

    Between the two paper modes: a stage with 1/4 of the final patch's voxels gets twice
    the batch (performance mode: four times; resource mode: the same).
    """
    b = max(1, math.isqrt(batch_size * batch_size * math.prod(final) // math.prod(patch)))
    return min(b, cap) if cap else b


def _batches(
    patches: Sequence[Triple], final: Triple, batch_size: int, mode: str, cap: int | None
) -> list[int]:
    if mode not in MODES:
        raise PgpsError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if cap is not None:
        LIMITS["batch_cap"].check(cap, "batch_cap")
    if mode == "resource":
        return [batch_size] * len(patches)
    rule = _performance_batch if mode == "performance" else _sqrt_batch
    return [rule(batch_size, final, p, cap) for p in patches]


def _as_triple(v: Sequence[int], what: str) -> Triple:
    """Three whole numbers (ints, or floats such as 32.0): 32.5 is refused, never cut to 32."""
    try:
        values = tuple(v) if not isinstance(v, str | bytes) else None  # a numpy array or any iterable
    except TypeError:
        values = None
    if values is None or len(values) != 3:
        raise PgpsError(f"{what} needs 3 values (x y z), got {v!r}")
    whole = [not isinstance(x, bool) and (hasattr(x, "__index__") or isinstance(x, float) and x.is_integer())
             for x in values]
    if not all(whole):
        raise PgpsError(f"{what} needs 3 whole numbers (x y z), got {list(values)}")
    return tuple(int(x) for x in values)  # type: ignore[return-value]


def _epochs(epochs: Any) -> int:
    """The run's total epochs, checked before any stage is cut from it (a stage's error would name the stage)."""
    return int(LIMITS["epochs"].check(epochs, "epochs"))


def constant(
    final_patch: Sequence[int], pools: Sequence[int], batch_size: int, epochs: int,
    multiple_of: Sequence[int] | None = None,
) -> Schedule:
    """The baseline: one stage at the final patch size."""
    final, pools_, epochs = _as_triple(final_patch, "final patch"), _as_triple(pools, "pools"), _epochs(epochs)
    if multiple_of is not None:
        check_patch(final, pools_, "final patch", multiple_of)
    return Schedule(
        (Stage(final, batch_size, epochs),), final, pools_, batch_size,
        meta={"preset": "constant"},
    )


def paper_patches(
    final_patch: Sequence[int], pools: Sequence[int], multiple_of: Sequence[int] | None = None
) -> list[Triple]:
    """The paper's patch sequence: grow one axis by one increment per stage.

    Start at one increment (2**pools, or its lcm with ``multiple_of``) per axis; each
    stage grows the axis whose next size is smallest (ties: lowest axis), until every
    axis is final.
    """
    final, inc = _as_triple(final_patch, "final patch"), divisors(pools, multiple_of)
    check_patch(final, pools, "final patch", multiple_of)
    cur = list(inc)
    patches = [tuple(cur)]
    while any(c < f for c, f in zip(cur, final)):
        _, axis = min((cur[a] + inc[a], a) for a in range(3) if cur[a] < final[a])
        cur[axis] += inc[axis]
        patches.append(tuple(cur))
    return patches  # type: ignore[return-value]


def paper(
    final_patch: Sequence[int],
    pools: Sequence[int],
    batch_size: int,
    epochs: int,
    mode: str = "resource",
    batch_cap: int | None = None,
    multiple_of: Sequence[int] | None = None,
) -> Schedule:
    """The paper's automatic curriculum (Fischer et al., 2024), exactly.

    Every stage gets ``epochs // S`` epochs and the last gets the rest.
    ``batch_cap`` (performance and sqrt modes) is an extension; the paper has none.
    ``multiple_of``: a network's own patch rule (see :func:`divisors`); the first
    stage is then that network's smallest legal patch.
    """
    final, pools_, epochs = _as_triple(final_patch, "final patch"), _as_triple(pools, "pools"), _epochs(epochs)
    patches = paper_patches(final, pools_, multiple_of)
    n = len(patches)
    if epochs < n:
        raise PgpsError(
            f"the paper schedule for final patch {list(final)} has {n} stages and needs at "
            f"least {n} epochs, got {epochs}; give --epochs >= {n}"
        )
    lengths = [epochs // n] * (n - 1) + [epochs - (epochs // n) * (n - 1)]
    batches = _batches(patches, final, batch_size, mode, batch_cap)
    return Schedule(
        tuple(Stage(p, b, e) for p, b, e in zip(patches, batches, lengths)),
        final, pools_, batch_size, meta={"preset": "paper", "mode": mode},
    )


def randomize(s: Schedule) -> Schedule:
    """The random-sampling twin of ``s``: the same sizes, batches and shares, drawn per iteration."""
    return replace(s, sampling="random", meta={**s.meta, "family": "random"})


def random_sampling(
    final_patch: Sequence[int],
    pools: Sequence[int],
    batch_size: int,
    epochs: int,
    mode: str = "resource",
    batch_cap: int | None = None,
    multiple_of: Sequence[int] | None = None,
) -> Schedule:
    """Random patch-size sampling over the paper's sizes (the PGPS authors' follow-up).

    Every iteration draws one of the sizes the paper's curriculum visits, from one
    increment per axis to the final patch, with (near) equal odds: the paper's stage
    lengths are the odds.  Batches follow ``mode`` per size, as in the paper.
    """
    s = paper(final_patch, pools, batch_size, epochs, mode, batch_cap, multiple_of)
    return replace(randomize(s), meta={**s.meta, "preset": "random", "family": "random"})


def stage_lengths(epochs: int, stages: int, lengths: Sequence[float]) -> list[int]:
    """Epochs per stage from an explicit ``lengths`` list: fractions summing to 1, or epochs summing to ``epochs``.

    >>> stage_lengths(10, 3, [0.2, 0.3, 0.5])
    [2, 3, 5]
    >>> stage_lengths(10, 2, [4, 6])
    [4, 6]
    """
    if isinstance(lengths, str | bytes) or not isinstance(lengths, Sequence):
        raise PgpsError(f"lengths must be a list of numbers, one per stage, got {lengths!r}")
    values = [LIMITS["lengths"].check(v, f"lengths entry {i}") for i, v in enumerate(lengths)]
    if len(values) != stages:
        raise PgpsError(f"lengths has {len(values)} entries but the schedule has {stages} stages; give one length "
                        "per stage")
    total = sum(values)
    if all(v.is_integer() for v in values) and total == epochs:
        return [int(v) for v in values]
    if abs(total - 1.0) <= 1e-6:
        return allocate_epochs(epochs, values)
    raise PgpsError(f"lengths {list(lengths)} sum to {total:g}; give fractions that sum to 1 or whole epochs that "
                    f"sum to the {epochs} epochs of the run")


def allocate_epochs(epochs: int, weights: Sequence[float]) -> list[int]:
    """Split ``epochs`` into integer lengths proportional to ``weights``, each >= 1, summing to ``epochs``.

    Each stage gets the floor of its exact share (at least 1); the epochs left over go to
    the largest remainders (ties: the later stage), and epochs owed by stages lifted to 1
    are taken back from the stages furthest above their share.  So lengths stay within one
    epoch of ``epochs * w / sum(w)`` unless the minimum of 1 forces otherwise, and
    multiplying ``epochs`` by an integer multiplies integer lengths exactly.
    """
    n = len(weights)
    if n == 0 or not all(math.isfinite(w) and w > 0 for w in weights):
        raise PgpsError("stage weights must be positive")
    if epochs < n:
        raise PgpsError(f"{n} stages need at least {n} epochs, got {epochs}; give more epochs")
    total = sum(weights)
    exact = [epochs * w / total for w in weights]
    lengths = [max(1, math.floor(x)) for x in exact]
    while sum(lengths) > epochs:
        i = max((i for i in range(n) if lengths[i] > 1), key=lambda i: (lengths[i] - exact[i], -i))
        lengths[i] -= 1
    while sum(lengths) < epochs:
        i = max(range(n), key=lambda i: (exact[i] - lengths[i], i))
        lengths[i] += 1
    return lengths


def parametric(
    final_patch: Sequence[int],
    pools: Sequence[int],
    batch_size: int,
    epochs: int,
    *,
    stages: int,
    growth: float | None = None,
    start_fraction: float | None = None,
    length_ratio: float = 1.0,
    final_fraction: float | None = None,
    mode: str = "resource",
    batch_cap: int | None = None,
    multiple_of: Sequence[int] | None = None,
    lengths: Sequence[float] | None = None,
    growth_shape: str = "geometric",
    family: str = "staged",
) -> Schedule:
    """The searchable family.

    Patch side lengths grow towards the final patch from a first side of
    ``final / growth**(S-1)`` per axis (aspect ratio kept): ``geometric`` growth
    multiplies the side by ``growth`` per stage, ``linear`` growth adds the same
    length per stage between the same first and last sides; each is snapped to the
    network's divisibility.  Give either ``growth`` (> 1) or ``start_fraction``
    (first stage's side as a fraction of the final, in (0, 1]).

    Lengths: stage ``k`` weighs ``length_ratio**k`` (1 = equal, > 1 = later stages
    longer), with ``final_fraction`` of all epochs reserved for the last stage if given;
    or ``lengths`` gives every stage's share (see :func:`stage_lengths`).
    Stages that snap to the same patch are merged (their epochs added), so the
    stage count of the result can be lower than asked; ``meta`` records both.
    ``family``: ``staged``, or ``random`` to draw these stages per iteration (:func:`randomize`).
    """
    final, pools_, epochs = _as_triple(final_patch, "final patch"), _as_triple(pools, "pools"), _epochs(epochs)
    check_patch(final, pools_, "final patch", multiple_of)
    LIMITS["stages"].check(stages, "stages")
    LIMITS["length_ratio"].check(length_ratio, "length_ratio")
    if stages > 1:
        if (growth is None) == (start_fraction is None):
            raise PgpsError("give exactly one of growth or start_fraction for a multi-stage schedule")
        if start_fraction is not None:
            growth = LIMITS["start_fraction"].check(start_fraction, "start_fraction") ** (-1.0 / (stages - 1))
        else:
            LIMITS["growth"].check(growth, "growth")
    if growth_shape not in GROWTH_SHAPES:
        raise PgpsError(f"growth_shape {growth_shape!r} unknown; use one of {', '.join(GROWTH_SHAPES)}")
    if family not in FAMILIES:
        raise PgpsError(f"family {family!r} unknown; use one of {', '.join(FAMILIES)}")
    inc = divisors(pools_, multiple_of)

    def snap(side: float, a: int) -> int:
        return int(min(final[a], max(inc[a], round(side / inc[a]) * inc[a])))

    patches: list[Triple] = []
    for k in range(stages):
        if growth_shape == "linear":
            start = [f / (growth or 1.0) ** (stages - 1) for f in final]
            sides = [s0 + (f - s0) * k / max(1, stages - 1) for s0, f in zip(start, final)]
        else:
            sides = [f / (growth or 1.0) ** (stages - 1 - k) for f in final]
        patches.append(tuple(snap(sides[a], a) for a in range(3)))  # type: ignore[arg-type]

    if lengths is not None:
        if final_fraction is not None or length_ratio != 1.0:
            raise PgpsError("give lengths, or length_ratio and final_fraction, not both")
        stage_epochs = stage_lengths(epochs, stages, lengths)
    elif final_fraction is not None and stages > 1:
        LIMITS["final_fraction"].check(final_fraction, "final_fraction")
        last = min(epochs - (stages - 1), max(1, round(epochs * final_fraction)))
        stage_epochs = allocate_epochs(epochs - last, [length_ratio**k for k in range(stages - 1)])
        stage_epochs.append(last)
    else:
        stage_epochs = allocate_epochs(epochs, [length_ratio**k for k in range(stages)])

    merged: list[list[Any]] = []
    for p, e in zip(patches, stage_epochs):
        if merged and merged[-1][0] == p:
            merged[-1][1] += e
        else:
            merged.append([p, e])
    batches = _batches([m[0] for m in merged], final, batch_size, mode, batch_cap)
    s = Schedule(
        tuple(Stage(p, b, e) for (p, e), b in zip(merged, batches)),
        final, pools_, batch_size,
        meta={
            "preset": "parametric", "mode": mode, "stages_requested": stages,
            "growth": growth, "length_ratio": length_ratio, "final_fraction": final_fraction,
            **({"growth_shape": growth_shape} if growth_shape != "geometric" else {}),
            **({"lengths": list(lengths)} if lengths is not None else {}),
        },
    )
    return randomize(s) if family == "random" else s


def preset(
    name: str,
    final_patch: Sequence[int],
    pools: Sequence[int],
    batch_size: int,
    epochs: int,
    mode: str = "resource",
    batch_cap: int | None = None,
    multiple_of: Sequence[int] | None = None,
) -> Schedule:
    """Build a named preset: ``constant``, ``paper`` or ``random`` (``multiple_of``: see :func:`divisors`)."""
    if name == "constant":
        return constant(final_patch, pools, batch_size, epochs, multiple_of)
    if name == "paper":
        return paper(final_patch, pools, batch_size, epochs, mode, batch_cap, multiple_of)
    if name == "random":
        return random_sampling(final_patch, pools, batch_size, epochs, mode, batch_cap, multiple_of)
    raise PgpsError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")


def rescale_epochs(s: Schedule, epochs: int) -> Schedule:
    """The same curriculum stretched or shrunk to ``epochs`` epochs in total."""
    weights = [st.epochs for st in s.stages]
    lengths = allocate_epochs(_epochs(epochs), weights)
    return replace(s, stages=tuple(Stage(st.patch_size, st.batch_size, e) for st, e in zip(s.stages, lengths)),
                   meta=dict(s.meta))
