"""The allowed range of every number a user gives: command-line flags, space files, schedule files.

Pure Python.  One table, so that ``--epochs`` and ``budget.epochs`` accept the same values
and every refusal reads the same way: the name, the bad value and the range, on one line.
Bounds are wide: they refuse what cannot mean anything (a negative count, a NaN, an infinite
bound) or what would only hang or exhaust the machine (a billion samples), never a setting
someone could want.

>>> LIMITS["epochs"].check(30, "--epochs")
30
>>> LIMITS["lr"].check(float("nan"), "--lr")
Traceback (most recent call last):
...
pgps_tune.errors.PgpsError: --lr must be a number in (0, 10], got nan
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pgps_tune.errors import PgpsError


@dataclass(frozen=True)
class Range:
    """A closed (or half-open) interval of finite numbers, optionally integers only."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def __str__(self) -> str:
        what = "an integer" if self.integer else "a number"
        low, high = (str(int(x)) if float(x).is_integer() else f"{x:g}" for x in (self.low, self.high))
        return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, value: Any, what: str) -> int | float:
        """``value`` if it is in range (a float for non-integer ranges); else a one-line :class:`PgpsError`."""
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and self.integer:
            ok = isinstance(value, int)
        if ok:
            ok = (
                math.isfinite(value)
                and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high)
            )
        if not ok:
            raise PgpsError(f"{what} must be {self}, got {value!r}")
        return value if self.integer else float(value)

    def parse(self, text: str, what: str) -> int | float:
        """Parse a command-line string, then :meth:`check` it."""
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            raise PgpsError(f"{what} must be {self}, got {text!r}") from None
        return self.check(value, what)


def _int(low: float, high: float) -> Range:
    return Range(low, high, integer=True)


SEED = _int(0, 2**32 - 1)  # numpy's seeds
# Keys are flag and file names (dashes as underscores); a file key "section.key" wins over "key".
LIMITS: dict[str, Range] = {
    # schedules
    "epochs": _int(1, 1_000_000),
    "batch_size": _int(1, 1_000_000),  # a batch that fits is checked against memory before training
    "batch_cap": _int(1, 1_000_000),
    "patch_axis": _int(1, 4096),
    "pools": _int(0, 8),
    "stages": _int(1, 100),
    "growth": Range(1, 16),
    "start_fraction": Range(0, 1, low_open=True),
    "length_ratio": Range(0.01, 100),
    "final_fraction": Range(0, 1, low_open=True, high_open=True),
    "lengths": Range(0, 1_000_000, low_open=True),  # each entry: a fraction of the run or whole epochs
    # training
    "iterations_per_epoch": _int(1, 10_000_000),
    "lr": Range(0, 10, low_open=True),
    "fg_ratio": Range(0, 1),
    "val_fraction": Range(0, 1, low_open=True, high_open=True),
    "val_every": _int(1, 1_000_000),
    "seed": SEED,
    "split_seed": SEED,
    "filters": _int(1, 4096),
    "res_units": _int(1, 4),  # MONAI UNet's residual units per level
    "feature_size": _int(1, 4096),  # base widths; what each network takes is checked beside them
    "hidden_size": _int(1, 65536),
    "token_size": _int(1, 64),  # unetr: the supported sizes are checked by name beside it
    "threads": _int(1, 1024),
    "workers": _int(0, 256),
    "max_train_seconds": Range(0, 1e9, low_open=True),
    "weight_decay": Range(0, 1),
    "momentum": Range(0, 1, high_open=True),
    "volumes_per_batch": _int(1, 1_000_000),
    "sw_batch_size": _int(1, 4096),
    "sw_overlap": Range(0, 1, high_open=True),
    "voxel_budget": _int(8**3, 2**30),  # the planner's voxels per patch; 8^3 allows one pooling
    "synthetic_cases": _int(2, 10_000),
    "synthetic_axis": _int(8, 512),
    # sweeps
    "num_samples": _int(1, 100_000),
    "max_concurrent": _int(1, 10_000),
    "cpus_per_trial": Range(0, 1024, low_open=True),
    "gpus_per_trial": Range(0, 64),
    "max_failures": _int(0, 1000),
    "pending_timeout": Range(0, 1e9, low_open=True),  # seconds
    "nnunet_fold": _int(0, 1000),
    "nnunet_val_iterations": _int(1, 1_000_000),
    "grid_points": _int(1, 100),
    "startup_trials": _int(0, 100_000),
    "max_compute": Range(0, 1_000_000),
    "grace_fraction": Range(0, 1, low_open=True),
    "min_fraction": Range(0, 1, low_open=True, high_open=True),  # asha.fidelity compressed: the lowest rung
    "reduction_factor": Range(1, 100, low_open=True),
    "brackets": _int(1, 10),
    "promote_top": _int(0, 100_000),  # asha.promote main_effects: schedules at the full budget (0: n / eta)
    "tolerance": Range(0, 1),
    "objective.voxel_budget": Range(0, 1, low_open=True),  # a voxel fraction, not the planner's budget
    "top_k": _int(1, 1000),
    "seeds": _int(2, 1000),  # a paired test needs two pairs
    "folds": _int(2, 1000),
    "limit": _int(0, 10_000_000),  # trials --limit: rows printed (0: every row)
}


def limit(key: str, section: str | None = None) -> Range | None:
    """The range of ``key`` (in ``section`` of a space file, if given), or None for a non-numeric key."""
    return LIMITS.get(f"{section}.{key}") if section and f"{section}.{key}" in LIMITS else LIMITS.get(key)
