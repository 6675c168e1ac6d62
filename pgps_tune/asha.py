"""ASHA's rung arithmetic, in one place for the live scheduler and for replays.

Pure Python (no Ray): :class:`AshaSettings` is what a sweep hands to Ray's
``ASHAScheduler`` and records in ``sweep.json``; :func:`milestones` says at which
times ASHA compares trials (the same formula as Ray's first bracket), which the
exports use for ``rung_reached``; :func:`simulate_asha` replays ASHA's stopping
rule on recorded learning curves, so a sweep run without early stopping (or a
benchmark) can measure how often early stopping would have killed its winner.

The ``compressed`` fidelity (``asha.fidelity``) has its own arithmetic here:
:func:`fidelity_ladder` says which budget fraction each rung trains and how many
schedules it runs, and :func:`survivors` which of a rung's schedules go on, for the
tuner and for the benchmark's replays alike.  With ``asha.promote: main_effects`` the
ladder has two rungs (:func:`screening_ladder`) and what goes on to the full budget is
the top of :func:`main_effects_ranking`: an additive model of the parameters fitted to
the screening rung's scores, ranked over the whole space, not only the schedules screened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pgps_tune.errors import PgpsError

if TYPE_CHECKING:
    from pgps_tune.space import SearchSpace


TIME_ATTRS = ("baseline_iterations", "training_iteration", "epoch")  # the clocks ASHA can compare trials on


def milestones(grace: float, max_t: float, rf: float) -> list[float]:
    """The rungs of ASHA's first bracket, lowest first.

    >>> milestones(2, 8, 2)
    [2, 4, 8]
    """
    n = int(math.log(max_t / grace) / math.log(rf) + 1)
    return [grace * rf**k for k in range(n)]


def grace_period(fraction: float, max_t: float) -> int:
    """The first rung as a share of the run (at least 1, at most ``max_t``).

    >>> grace_period(0.15, 500), grace_period(0.01, 10), grace_period(1.0, 7)
    (75, 1, 7)
    """
    return min(max(1, round(fraction * max_t)), int(max_t))


@dataclass(frozen=True)
class AshaSettings:
    """The scheduler's settings: ``ASHAScheduler(metric=..., mode=..., **asdict(settings))``."""

    time_attr: str
    max_t: float
    grace_period: float
    reduction_factor: float
    brackets: int = 1

    @classmethod
    def from_space(cls, space: SearchSpace) -> AshaSettings:
        """``max_t`` is the whole run in the unit of ``asha.time_attr``; the grace period a share of it.

        A trial validates every ``val_every`` epochs and once more at its end, so it reports
        ``ceil(epochs / val_every)`` times: Tune stops a trial whose clock reaches ``max_t``, and a
        ``max_t`` short of its last report would stop every trial one validation before its end.
        """
        b, a = space.budget, space.asha
        max_t = {"baseline_iterations": b.epochs * b.iterations_per_epoch, "epoch": b.epochs,
                 "training_iteration": math.ceil(b.epochs / b.val_every)}[a.time_attr]
        return cls(a.time_attr, max_t, grace_period(a.grace_fraction, max_t), a.reduction_factor, a.brackets)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AshaSettings:
        """The settings a sweep recorded; ``ValueError`` (or ``KeyError``, ``TypeError``) for values no sweep
        writes: a clock Tune does not report, ``max_t`` or the grace period not positive and finite, a grace
        period past ``max_t``, a reduction factor of 1 or less, fewer than one bracket."""
        numbers = [d["max_t"], d["grace_period"], d["reduction_factor"], d.get("brackets", 1)]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            raise TypeError("asha settings must be numbers")
        s = cls(str(d["time_attr"]), float(d["max_t"]), float(d["grace_period"]),
                float(d["reduction_factor"]), int(d.get("brackets", 1)))
        if not (d["time_attr"] in TIME_ATTRS
                and math.isfinite(s.max_t) and 0 < s.grace_period <= s.max_t
                and math.isfinite(s.reduction_factor) and s.reduction_factor > 1 and s.brackets >= 1):
            raise ValueError(f"asha settings out of range: {s}")
        return s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def milestones(self) -> list[float]:
        return milestones(self.grace_period, self.max_t, self.reduction_factor)

    def rung_reached(self, t: float) -> int:
        """Index of the highest rung a trial that got to time ``t`` passed (-1: none).

        >>> AshaSettings("epoch", 8, 2, 2).rung_reached(5)
        1
        """
        return max((i for i, m in enumerate(self.milestones()) if t >= m), default=-1)


def simulate_asha(
    curves: dict[str, list[tuple[float, float]]], order: list[str], grace: float, max_t: float, rf: float
) -> set[str]:
    """The trials that ASHA would stop, replaying recorded ``(time, score)`` curves.

    Same rule as Ray's ASHA with one bracket: at the first report at or past a rung, a
    trial is stopped if its score is below the ``1 - 1/rf`` quantile of the scores already
    recorded at that rung.  Trials are replayed one after another in ``order`` (as with
    one trial at a time).

    >>> curves = {"a": [(2, 0.5), (8, 0.9)], "b": [(2, 0.1), (8, 0.2)]}
    >>> simulate_asha(curves, ["a", "b"], grace=2, max_t=8, rf=2)
    {'b'}
    """
    import numpy as np

    rungs = list(reversed(milestones(grace, max_t, rf)))  # highest first, as Ray checks them
    recorded: dict[float, dict[str, float]] = {m: {} for m in rungs}
    stopped = set()
    for tid in order:
        for t, score in curves[tid][:-1]:  # the end of a run is not an early stop
            if t >= max_t:
                break
            halt = False
            for m in rungs:
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


# -- the compressed fidelity: successive halving over budgets ----------------------------------------


@dataclass(frozen=True)
class Rung:
    """One rung of a compressed-fidelity ladder.

    Each schedule of the rung trains its whole curriculum with ``iterations_per_epoch``
    iterations per epoch instead of the budget's: every stage keeps its share of the
    epochs and the learning rate runs its whole curve, in ``fraction`` of the compute.
    """

    fraction: float  # of the full budget (after rounding to whole iterations per epoch)
    iterations_per_epoch: int
    trials: int


def _ladder_levels(kind: str, n0: int, eta: float, min_fraction: float, iterations_per_epoch: int) -> int:
    """Budget levels of a ladder whose lowest rung trains at least ``min_fraction`` (arguments checked).

    A ``min_fraction`` above ``1/eta`` leaves no level below the full budget: a compressed search
    would then train every schedule at the full budget, with nothing screened or stopped.
    """
    if n0 < 1 or eta <= 1 or not 0 < min_fraction <= 1 or iterations_per_epoch < 1:
        raise PgpsError(f"a {kind} ladder needs n0 >= 1, eta > 1, min_fraction in (0, 1] and iterations >= 1; "
                        f"got {n0}, {eta:g}, {min_fraction:g}, {iterations_per_epoch}")
    levels = int(math.floor(math.log(1 / min_fraction) / math.log(eta) + 1e-9)) + 1
    if levels < 2:
        raise PgpsError(f"asha.min_fraction {min_fraction:g} is above 1/asha.reduction_factor ({1 / eta:.4g}), so "
                        f"the {kind} ladder has no rung below the full budget and every schedule would train at the "
                        f"full budget; set min_fraction to at most {math.floor(1e4 / eta) / 1e4:g} or lower "
                        "reduction_factor")
    return levels


def _rung_iterations(iterations_per_epoch: int, eta: float, below_top: int) -> int:
    """Iterations per epoch of the rung ``below_top`` levels under the full budget (at least 1)."""
    return max(1, round(iterations_per_epoch * eta ** -below_top))


def fidelity_ladder(n0: int, eta: float, min_fraction: float, iterations_per_epoch: int) -> list[Rung]:
    """The rungs of successive halving over budgets, lowest first; the last one is the full budget.

    Rung ``r`` of ``R`` trains at ``eta**-(R-1-r)`` of the budget (the lowest at least
    ``min_fraction``) and keeps ``floor(n/eta)`` of its ``n`` schedules (at least one).  A rung
    that would train a single schedule below the full budget is left out: its choice was
    already made, so that schedule goes straight to the full budget.

    >>> [(round(r.fraction, 3), r.iterations_per_epoch, r.trials) for r in fidelity_ladder(27, 3, 1 / 9, 90)]
    [(0.111, 10, 27), (0.333, 30, 9), (1.0, 90, 3)]
    >>> [(round(r.fraction, 3), r.trials) for r in fidelity_ladder(4, 3, 0.1, 90)]
    [(0.111, 4), (1.0, 1)]
    """
    levels = _ladder_levels("fidelity", n0, eta, min_fraction, iterations_per_epoch)
    rungs, n = [], n0
    for r in range(levels):
        ipe = _rung_iterations(iterations_per_epoch, eta, levels - 1 - r)
        if rungs and ipe == rungs[-1].iterations_per_epoch:
            raise PgpsError(
                f"the fidelity ladder's rungs {r - 1} and {r} both train {ipe} of {iterations_per_epoch} iterations "
                "per epoch; raise asha.min_fraction or budget.iterations_per_epoch (tune --iterations-per-epoch)")
        rungs.append(Rung(ipe / iterations_per_epoch, ipe, n))
        n = max(1, int(math.floor(n / eta + 1e-9)))
    top = rungs[-1]
    return [r for r in rungs[:-1] if r.trials > 1] + [top]


def screening_ladder(n0: int, eta: float, min_fraction: float, iterations_per_epoch: int,
                     top: int = 0) -> list[Rung]:
    """The two rungs of ``asha.promote: main_effects``: ``n0`` schedules screened at the lowest
    fraction of :func:`fidelity_ladder`, then ``top`` (``asha.promote_top``; 0: ``floor(n0 / eta)``,
    at least one) at the full budget.

    >>> [(round(r.fraction, 3), r.iterations_per_epoch, r.trials) for r in screening_ladder(11, 3, 1 / 9, 25)]
    [(0.12, 3, 11), (1.0, 25, 3)]
    >>> [r.trials for r in screening_ladder(16, 3, 1 / 9, 25, top=3)]
    [16, 3]
    """
    levels = _ladder_levels("screening", n0, eta, min_fraction, iterations_per_epoch)
    ipe = _rung_iterations(iterations_per_epoch, eta, levels - 1)  # the lowest rung of fidelity_ladder
    if ipe >= iterations_per_epoch:
        raise PgpsError(f"the screening rung would train all {iterations_per_epoch} iterations per epoch; lower "
                        "asha.min_fraction or raise budget.iterations_per_epoch (tune --iterations-per-epoch)")
    return [Rung(ipe / iterations_per_epoch, ipe, n0),
            Rung(1.0, iterations_per_epoch, top or max(1, int(math.floor(n0 / eta + 1e-9))))]


def compressed_ladder(promote: str, n0: int, eta: float, min_fraction: float, iterations_per_epoch: int,
                      top: int = 0) -> list[Rung]:
    """The rungs of a compressed search: :func:`screening_ladder` (``top``: ``asha.promote_top``) for
    ``asha.promote: main_effects``, else :func:`fidelity_ladder` (successive halving by measured scores)."""
    if promote == "main_effects":
        return screening_ladder(n0, eta, min_fraction, iterations_per_epoch, top)
    return fidelity_ladder(n0, eta, min_fraction, iterations_per_epoch)


def _effects(parameters: Sequence[Any], c: dict[str, Any]) -> list[float]:
    """The additive model's features of schedule ``c``: an intercept, then each parameter's own terms."""
    x: list[float] = [1.0]
    for p in parameters:
        if p.kind == "fixed":
            continue
        present = p.name in c
        if p.when is not None:
            x.append(0.0 if present else 1.0)
        if p.kind == "categorical":
            x.extend(1.0 if present and c[p.name] == v else 0.0 for v in p.choices)
            continue
        lo, hi, v = float(p.low), float(p.high), float(c[p.name]) if present else None
        if p.log:
            lo, hi, v = math.log(lo), math.log(hi), None if v is None else math.log(v)
        z = 0.0 if v is None or hi == lo else 2 * (v - lo) / (hi - lo) - 1
        x.extend((z, z * z - 1 / 3) if present else (0.0, 0.0))
    return x


def main_effects_terms(parameters: Sequence[Any], candidates: Sequence[dict[str, Any]]) -> int:
    """How many effects :func:`main_effects_ranking` can tell apart over ``candidates``, the intercept included:
    the rank of their features.  Fewer screened schedules than this leave some effect unmeasured (the ridge
    penalty alone sets it), so a screening of fewer ranks the space by its prior, not by the screens.

    >>> from pgps_tune.space import Param
    >>> ps = [Param("mode", "categorical", choices=("a", "b", "c")), Param("n", "int", low=1, high=3)]
    >>> main_effects_terms(ps, [{"mode": m, "n": n} for m in "abc" for n in (1, 2, 3)])  # 1 + 2 + 2
    5
    """
    import numpy as np

    rows = {tuple(_effects(parameters, c)) for c in candidates}
    return int(np.linalg.matrix_rank(np.array(sorted(rows)))) if rows else 0


def main_effects_ranking(parameters: Sequence[Any], observed: Sequence[tuple[dict[str, Any], float]],
                         candidates: Sequence[dict[str, Any]], ridge: float = 1e-3) -> list[dict[str, Any]]:
    """``candidates`` ordered by an additive model of the parameters fitted to ``observed`` scores.

    Each parameter (a :class:`pgps_tune.space.Param`) adds its own effect, nothing depends on
    another: a categorical one an effect per choice, a numeric one a quadratic in its value
    (scaled to [-1, 1] over its range, on the log scale for ``log``), a conditional one also an
    effect for being absent.  Fitted by least squares with a small ridge penalty (the intercept is
    not penalised), so fewer observations than effects still give a ranking.  Why additive: a
    screening rung trains few schedules at a low fidelity, each score noisy and biased, but an
    effect is the mean over every schedule that shares the value, so it is estimated from many
    runs; a schedule never screened that combines the best values ranks high.  Observations
    without a finite score are left out; with fewer than two left there is nothing to fit
    (:class:`PgpsError`).  Ties keep the candidates' order.

    >>> from pgps_tune.space import Param
    >>> ps = [Param("mode", "categorical", choices=("a", "b")), Param("n", "int", low=1, high=3)]
    >>> obs = [({"mode": "a", "n": 1}, 0.5), ({"mode": "b", "n": 1}, 0.6), ({"mode": "a", "n": 3}, 0.7)]
    >>> cands = [{"mode": m, "n": n} for m in "ab" for n in (1, 2, 3)]
    >>> main_effects_ranking(ps, obs, cands)[0]  # never screened: b's effect plus n = 3's
    {'mode': 'b', 'n': 3}
    """
    import numpy as np

    fit = [(c, s) for c, s in observed if isinstance(s, int | float) and math.isfinite(s)]
    if len(fit) < 2:
        raise PgpsError(f"the main-effects model needs at least 2 scored schedules, got {len(fit)}")
    a = np.array([_effects(parameters, c) for c, _ in fit])
    y = np.array([s for _, s in fit], dtype=float)
    penalty = ridge * len(fit) * np.eye(a.shape[1])
    penalty[0, 0] = 0.0
    w = np.linalg.lstsq(a.T @ a + penalty, a.T @ y, rcond=None)[0]
    pred = np.array([_effects(parameters, c) for c in candidates]) @ w
    order = sorted(range(len(candidates)), key=lambda i: (-round(float(pred[i]), 12), i))
    return [candidates[i] for i in order]


def rung_budget(budget: dict[str, Any], rung: Rung, top: bool) -> dict[str, Any]:
    """A space's budget (as a dict) for one rung: its iterations per epoch; below the top, one validation.

    A low rung is scored by its final validation alone, so validations on the way only cost time.

    >>> rung_budget({"epochs": 8, "iterations_per_epoch": 90, "val_every": 2}, Rung(1 / 9, 10, 27), top=False)
    {'epochs': 8, 'iterations_per_epoch': 10, 'val_every': 8}
    """
    once = {} if top else {"val_every": budget["epochs"]}
    return {**budget, "iterations_per_epoch": rung.iterations_per_epoch, **once}


def ladder_compute(rungs: Sequence[Rung]) -> float:
    """The ladder's compute in full runs of the schedules it trains (before early failures).

    >>> ladder_compute(fidelity_ladder(27, 3, 1 / 9, 90))
    9.0
    """
    return round(sum(r.trials * r.fraction for r in rungs), 6)


def samples_for_compute(runs: float, eta: float, min_fraction: float, iterations_per_epoch: int) -> int:
    """The most schedules a ladder can start with and spend at most ``runs`` full runs (at least 1).

    >>> samples_for_compute(9, 3, 1 / 9, 90), samples_for_compute(0.1, 3, 1 / 9, 90)
    (27, 1)
    """
    n = 1
    while n < 100_000 and ladder_compute(fidelity_ladder(n + 1, eta, min_fraction, iterations_per_epoch)) <= runs:
        n += 1
    return n


def survivors(scores: Sequence[tuple[Hashable, float, float]], keep: int,
              same: Callable[[Hashable], Hashable] | None = None) -> list[Hashable]:
    """The ``keep`` best of ``(key, score, cost)``: highest score first, the cheaper on a tie.

    Entries without a finite score (failed runs) never survive; a key given twice (a sampler
    may suggest a schedule again) survives once, by its best score, and so do keys that
    ``same`` maps alike (two parameter sets that train one schedule: promoting both would
    spend the next rung's slot on the same run twice).

    >>> survivors([("a", 0.5, 1.0), ("b", 0.7, 1.0), ("c", 0.7, 0.4), ("d", float("nan"), 0.1), ("c", 0.1, 0.4)], 2)
    ['c', 'b']
    >>> survivors([("a", 0.5, 1.0), ("b", 0.7, 1.0), ("c", 0.6, 0.4)], 2, same={"a": 1, "b": 1, "c": 2}.get)
    ['b', 'c']
    """
    ok = sorted((s for s in scores if isinstance(s[1], int | float) and math.isfinite(s[1])),
                key=lambda s: (-s[1], s[2]))
    same = same or (lambda k: k)
    first = {}
    for k, _, _ in ok:
        first.setdefault(same(k), k)
    return list(first.values())[:keep]
