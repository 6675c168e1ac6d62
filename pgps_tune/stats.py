"""The statistics of a confirmation: mean ± sd over repeats, and paired comparisons between schedules.

Pure numpy/scipy (no Ray, no torch).  A confirmation trains every schedule on the same seeds
(or the same cross-validation folds), so two schedules' results pair up: schedule A on seed 3
against schedule B on seed 3.  Pairing removes the part of the spread that a seed or a fold
gives both schedules alike, which on small data is most of it; the paired t-test (Student's,
two-sided, via :func:`scipy.stats.ttest_rel`) then asks whether the mean difference is
distinguishable from zero.  A schedule counts as *better* only when the whole 95% interval of
the difference lies above zero, which for this test is the same as p < 0.05 with a positive
mean.

>>> c = paired_comparison([0.80, 0.82, 0.85], [0.78, 0.79, 0.80])
>>> round(c.mean_diff, 4), c.n
(0.0333, 3)
>>> c.better
False
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ALPHA = 0.05  # the significance level and 1 - the interval's confidence


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof 1) of ``n`` repeats; sd is NaN for a single repeat."""

    n: int
    mean: float
    sd: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    """Mean ± sd of the finite values (NaNs, e.g. a failed trial's Dice, are left out).

    >>> s = spread([0.5, 0.7, float("nan")])
    >>> s.n, round(s.mean, 6), round(s.sd, 6)
    (2, 0.6, 0.141421)
    """
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Spread(0, math.nan, math.nan)
    return Spread(int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of A against B: mean of A - B, its 95% interval and the t-test's p-value."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def better(self) -> bool:
        """A is significantly better than B: the whole interval lies above zero."""
        return self.n >= 2 and self.ci_low > 0 and self.p_value < ALPHA

    @property
    def worse(self) -> bool:
        return self.n >= 2 and self.ci_high < 0 and self.p_value < ALPHA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "confidence": 1 - ALPHA, "test": "paired t-test (two-sided)",
                "significantly_better": self.better, "significantly_worse": self.worse}


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Compare paired results ``a[i]`` and ``b[i]`` (the same seed or fold); pairs with a NaN are dropped.

    With fewer than two pairs there is no spread to test against: the interval and p-value are NaN.
    Identical results (every difference 0) give p = 1; differences that are all the same non-zero
    number give the degenerate interval [d, d] and p = 0, as the t statistic is infinite.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan)
    x, y = (np.asarray(v, dtype=float) for v in zip(*pairs))
    diff = float((x - y).mean())
    if n < 2:
        return Paired(1, diff, math.nan, math.nan, math.nan)
    if np.all(x == y):
        return Paired(n, 0.0, 0.0, 0.0, 1.0)
    with warnings.catch_warnings():  # scipy warns on nearly identical data; the numbers are still its answer
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(x, y)
        ci = result.confidence_interval(1 - ALPHA)
    return Paired(n, diff, float(ci.low), float(ci.high), float(result.pvalue))


@dataclass(frozen=True)
class Within:
    """Whether A is within ``margin`` of B on paired repeats (a non-inferiority test): mean of A - B, its 95%
    interval (as :class:`Paired`), the one-sided paired t-test's p-value of A - B + margin > 0, and on how many
    of the ``n`` pairs A was within the margin."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    margin: float
    p_value: float
    pairs_within: int

    @property
    def within(self) -> bool:
        """A is within the margin of B: the whole 95% interval lies above -margin (the one-sided test at 2.5%)."""
        return self.n >= 2 and self.ci_low > -self.margin

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "confidence": 1 - ALPHA, "within": self.within,
                "test": "one-sided paired t-test of A - B + margin > 0 (within: the 95% interval above -margin)"}


def within_margin(a: Sequence[float], b: Sequence[float], margin: float) -> Within:
    """Test whether paired results ``a`` are within ``margin`` below ``b`` (``cheapest_within``'s question).

    Pairs with a NaN are dropped; with fewer than two there is no test (interval and p-value NaN).
    Differences that are all the same number give the interval [d, d] and p = 0 or 1.

    >>> w = within_margin([0.78, 0.70, 0.74], [0.80, 0.71, 0.75], 0.05)
    >>> w.within, w.pairs_within, round(w.mean_diff, 4), w.p_value < 0.025
    (True, 3, -0.0133, True)
    >>> within_margin([0.70, 0.74, 0.60], [0.80, 0.71, 0.75], 0.05).within
    False
    """
    from scipy import stats

    c = paired_comparison(a, b)
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    inside = sum(x - y >= -margin for x, y in pairs)
    if c.n < 2:
        return Within(c.n, c.mean_diff, c.ci_low, c.ci_high, margin, math.nan, inside)
    d = np.asarray([x - y for x, y in pairs], dtype=float)
    if np.all(d == d[0]):  # no spread: the t statistic is infinite (or 0/0), its answer certain
        p = 0.0 if c.mean_diff + margin > 0 else 1.0
    else:
        with warnings.catch_warnings():  # scipy warns on nearly identical data; the numbers are still its answer
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_1samp(d, -margin, alternative="greater").pvalue)
    return Within(c.n, c.mean_diff, c.ci_low, c.ci_high, margin, p, inside)
