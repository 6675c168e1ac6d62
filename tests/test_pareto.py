"""The Dice / compute front and its pick rules, as pure arithmetic (no Ray, no files)."""

import itertools
import math
import random

import pytest

from pgps_tune import space as sp
from pgps_tune.errors import PgpsError
from pgps_tune.pareto import PickRule, dominates, non_dominated, parse_pick, pick
from pgps_tune.results import pick_rule


def brute_front(points):
    """The front by definition: every finite point that no other point dominates."""
    ok = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return {i for i in ok if not any(points[j][0] >= points[i][0] and points[j][1] <= points[i][1]
                                     and points[j] != points[i] for j in ok)}


@pytest.mark.parametrize("seed", range(20))
def test_non_dominated_matches_the_definition_and_sorts_cheapest_first(seed):
    rng = random.Random(seed)
    # coarse values so that ties in one coordinate and equal points occur
    points = [(rng.randint(0, 6) / 6, rng.randint(0, 6) / 6) for _ in range(rng.randint(1, 12))]
    if seed % 3 == 0:
        points.append((math.nan, 0.1))  # an unscored trial takes no part
    front = non_dominated(points)
    assert set(front) == brute_front(points)
    costs = [points[i][1] for i in front]
    dices = [points[i][0] for i in front]
    assert costs == sorted(costs)
    # along a front, more compute buys strictly more Dice (equal points aside)
    for (c0, d0), (c1, d1) in itertools.pairwise(zip(costs, dices)):
        assert (c0, d0) == (c1, d1) or (c1 > c0 and d1 > d0)


def test_dominance_needs_one_strict_improvement():
    assert dominates((0.8, 0.5), (0.8, 0.6)) and dominates((0.9, 0.5), (0.8, 0.5))
    assert not dominates((0.8, 0.5), (0.8, 0.5)) and not dominates((0.9, 0.7), (0.8, 0.5))


FRONT = [(0.60, 0.10), (0.75, 0.30), (0.79, 0.50), (0.795, 0.80), (0.80, 1.00), (0.70, 0.90)]


@pytest.mark.parametrize("rule, expected", [
    ("max_dice", 4),
    ("cheapest_within=0.01", 2),     # 0.79 is within 0.01 of 0.80, 0.75 is not
    ("cheapest_within=0.05", 1),     # 0.75 is exactly 0.05 below: within
    ("cheapest_within=0", 4),
    ("cheapest_within=1", 0),
])
def test_cheapest_within_and_max_dice(rule, expected):
    assert pick(FRONT, parse_pick(rule)) == expected


def test_knee_is_where_the_front_bends_most():
    # scaled to [0, 1], the chord runs from (0, 0) to (1, 1); (0.30, 0.75) lies farthest above it
    assert pick(FRONT, parse_pick("knee")) == 1
    # a straight front has no bend: every point is on the chord, the tie goes to the higher Dice
    line = [(0.5, 0.1), (0.6, 0.2), (0.7, 0.3)]
    assert pick(line, parse_pick("knee")) == 2
    # one or two points: the higher Dice
    assert pick([(0.5, 0.1), (0.6, 0.9)], parse_pick("knee")) == 1
    assert pick([(math.nan, math.nan)], parse_pick("knee")) is None
    # one schedule trained three times (equal points), or twice beside another
    assert pick([(0.5, 0.2)] * 3, parse_pick("knee")) in (0, 1, 2)
    assert pick([(0.5, 0.2), (0.5, 0.2), (0.6, 0.4)], parse_pick("knee")) == 2


@pytest.mark.parametrize("text", ["kne", "cheapest_within", "cheapest_within=x", "cheapest_within=-0.1",
                                  "cheapest_within=nan", "cheapest_within=2", "knee=1", ""])
def test_bad_pick_rules_fail_in_one_line(text):
    with pytest.raises(PgpsError, match="--pick") as err:
        parse_pick(text)
    assert "\n" not in str(err.value)


def test_pick_applies_to_pareto_sweeps_only():
    meta = {"sweep": "s", "objective": {"type": "max_dice"}}
    assert pick_rule(meta) is None
    with pytest.raises(PgpsError, match="optimised max_dice; leave out --pick"):
        pick_rule(meta, "knee")
    pareto = {"sweep": "s", "objective": {"type": "pareto", "pick": "cheapest_within=0.02"}}
    assert pick_rule(pareto) == PickRule("cheapest_within", 0.02)
    assert pick_rule(pareto, "knee") == PickRule("knee")


def test_space_objective_pareto_and_its_pick_are_checked():
    space = sp.parse({"parameters": {"stages": 2}, "objective": {"type": "pareto"}})
    assert space.objective.pick == "knee"
    with pytest.raises(PgpsError, match=r"s.yaml: objective.pick 'elbow' unknown"):
        sp.parse({"parameters": {"stages": 2}, "objective": {"type": "pareto", "pick": "elbow"}}, "s.yaml")


def test_space_key_follows_what_makes_scores_comparable():
    base = {"parameters": {"stages": {"type": "int", "low": 1, "high": 3}}, "objective": {"type": "pareto"}}
    key = sp.parse(base).key()
    # the search settings and the pick rule change how trials are found or chosen, not what a score means
    assert sp.parse({**base, "search": {"num_samples": 3, "seed": 5}}).key() == key
    assert sp.parse({**base, "objective": {"type": "pareto", "pick": "max_dice"}}).key() == key
    assert sp.parse({**base, "budget": {"epochs": 7}}).key() != key
    assert sp.parse({**base, "objective": {"type": "max_dice"}}).key() != key
    assert sp.parse({**base, "parameters": {"stages": {"type": "int", "low": 1, "high": 4}}}).key() != key
