"""The Dice / compute trade-off: non-dominated schedules and the rules that pick one of them.

Pure Python (no Ray, no pyarrow): a sweep with ``objective: {type: pareto}`` searches
validation Dice (higher is better) and compute, the schedule's voxels over the constant
baseline's (lower is better), together.  Its answer is a front of schedules none of which is
both better and cheaper than another; a *pick rule* turns the front into the one schedule that
``best_schedule.yaml`` carries:

- ``max_dice``: the front's highest Dice (its most expensive end);
- ``cheapest_within=T``: the cheapest schedule whose Dice is within ``T`` of the front's best;
- ``knee``: where the front bends most, the point farthest from the straight line between the
  front's two ends, with Dice and compute each scaled to [0, 1] over the front.

>>> pts = [(0.80, 1.0), (0.79, 0.5), (0.70, 0.2), (0.60, 0.6)]
>>> non_dominated(pts)
[2, 1, 0]
>>> pick(pts, parse_pick("cheapest_within=0.01"))
1
>>> pick(pts, parse_pick("knee"))
1
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pgps_tune.errors import PgpsError

PICK_RULES = ("knee", "max_dice", "cheapest_within=T")


@dataclass(frozen=True)
class PickRule:
    kind: str  # knee | max_dice | cheapest_within
    tolerance: float = 0.0

    def __str__(self) -> str:
        return f"cheapest_within={self.tolerance:g}" if self.kind == "cheapest_within" else self.kind


def parse_pick(text: str, where: str = "--pick") -> PickRule:
    """``knee``, ``max_dice`` or ``cheapest_within=T`` (T a Dice difference in [0, 1])."""
    kind, _, value = str(text).strip().partition("=")
    if kind in ("knee", "max_dice") and not value:
        return PickRule(kind)
    if kind == "cheapest_within":
        try:
            tolerance = float(value)
        except ValueError:
            tolerance = math.nan
        if math.isfinite(tolerance) and 0 <= tolerance <= 1:
            return PickRule(kind, tolerance)
        raise PgpsError(f"{where} {text!r}: cheapest_within needs a Dice tolerance in [0, 1], e.g. "
                        "cheapest_within=0.01")
    raise PgpsError(f"{where} {text!r} unknown; use one of {', '.join(PICK_RULES)}")


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether (dice, cost) ``a`` is at least as good as ``b`` in both and better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the (dice, cost) points no other point dominates, cheapest first.

    Points with a non-finite coordinate take no part (a failed or unscored trial).  Equal
    points do not dominate each other, so both stay.
    """
    # one pass over the points by cost (n log n: a store's tens of thousands of trials compared pairwise took
    # minutes): a point is on the front when it has its cost's highest Dice and beats every cheaper point's
    ok = sorted((i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)),
                key=lambda i: (points[i][1], -points[i][0], i))
    front, cheaper = [], -math.inf  # the highest Dice of the points cheaper than the current cost
    for _, same_cost in itertools.groupby(ok, key=lambda i: points[i][1]):
        group = list(same_cost)
        top = points[group[0]][0]
        if top > cheaper:
            front += [i for i in group if points[i][0] == top]
            cheaper = top
    return front


def pick(points: Sequence[Sequence[float]], rule: PickRule) -> int | None:
    """Index of the front point that ``rule`` chooses (None when no point is finite)."""
    front = non_dominated(points)
    if not front:
        return None
    best_dice = max(points[i][0] for i in front)
    if rule.kind == "max_dice":
        return next(i for i in reversed(front) if points[i][0] == best_dice)
    if rule.kind == "cheapest_within":
        return next(i for i in front if points[i][0] >= best_dice - rule.tolerance - 1e-12)
    return _knee(points, front)


def _knee(points: Sequence[Sequence[float]], front: list[int]) -> int:
    """The front point farthest from the chord between its ends; with no interior point, the highest Dice."""
    if len(front) < 3:
        return front[-1]
    dices, costs = [points[i][0] for i in front], [points[i][1] for i in front]
    d_lo, d_span = min(dices), (max(dices) - min(dices)) or 1.0
    c_lo, c_span = min(costs), (max(costs) - min(costs)) or 1.0
    xy = [((c - c_lo) / c_span, (d - d_lo) / d_span) for d, c in zip(dices, costs)]
    (x0, y0), (x1, y1) = xy[0], xy[-1]
    norm = math.hypot(x1 - x0, y1 - y0)
    if norm == 0:  # the ends are equal, so every point is: the front is one point, trained several times
        return front[-1]

    def distance(k: int) -> float:
        x, y = xy[k]
        return abs((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / norm

    best = max(range(len(front)), key=lambda k: (round(distance(k), 9), dices[k]))  # rounding: exact ties
    return front[best]
