from pathlib import Path

import pytest
import yaml

from pgps_tune import space as sp
from pgps_tune.errors import PgpsError

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("name", ["default", "performance", "resource", "smoke", "bench_hippocampus"])
def test_shipped_spaces_parse_and_fit_their_plans(name):
    s = sp.load(SPACES / f"{name}.yaml")
    assert s.name == name and s.parameters
    # smoke is sized for its own 32^3 synthetic data; the others for Hippocampus and 48^3 data
    plans = [((32, 32, 32), (3, 3, 3))] if name == "smoke" else [((40, 56, 40), (3, 3, 3)), ((48, 48, 48), (3, 3, 3))]
    if name == "bench_hippocampus":  # a 12-schedule grid with no references, TPE warming up after 4 trials
        assert len(s.grid()) == 12 and not s.search.references and s.search.startup_trials == 4
    for final, pools in plans:
        sp.check_space_against_plan(s, final, pools)
    if name == "smoke":  # its 10 epochs cannot hold the 15-stage paper schedule of Hippocampus
        with pytest.raises(PgpsError, match="paper reference cannot be built"):
            sp.check_space_against_plan(s, (40, 56, 40), (3, 3, 3))


def test_kinds_conditionals_and_fixed_values():
    s = sp.parse({
        "parameters": {
            "stages": {"type": "int", "low": 1, "high": 4},
            "growth": {"type": "float", "low": 1.2, "high": 2.0, "log": True, "when": "stages > 1"},
            "mode": {"type": "categorical", "choices": ["resource", "performance"]},
            "batch_cap": 16,
        }
    })
    growth = s.param("growth")
    assert growth.kind == "float" and growth.log and growth.when == ("stages", ">", 1)
    assert growth.active({"stages": 2}) and not growth.active({"stages": 1})
    assert s.param("batch_cap").kind == "fixed" and s.param("batch_cap").value == 16
    grid = s.grid()
    assert all("growth" not in g for g in grid if g["stages"] == 1)
    assert all("growth" in g for g in grid if g["stages"] > 1)
    assert len({tuple(sorted(g.items())) for g in grid}) == len(grid)
    assert s.objective.type == "max_dice" and s.search.algorithm == "tpe" and s.asha.time_attr == "baseline_iterations"


def test_schedule_from_params_covers_family_and_references():
    final, pools = (48, 48, 48), (3, 3, 3)
    one = sp.schedule_from_params({"stages": 1}, final, pools, 2, 10)
    assert len(one.stages) == 1
    three = sp.schedule_from_params({"stages": 3, "growth": 2.0, "mode": "performance", "batch_cap": 8},
                                    final, pools, 2, 12)
    assert [st.patch_size for st in three.stages] == [(16, 16, 16), (24, 24, 24), (48, 48, 48)]
    assert max(st.batch_size for st in three.stages) == 8
    paper = sp.schedule_from_params({"preset": "paper", "mode": "resource"}, final, pools, 2, 20)
    assert paper.meta["preset"] == "paper"


BAD = [
    ("not a mapping", "must be a mapping"),
    ({"parameters": {}}, "non-empty mapping"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4}}, "budgett": {}}, "unknown key(s) ['budgett']"),
    ({"parameters": {"stagez": {"type": "int", "low": 1, "high": 4}}}, "unknown parameter 'stagez'"),
    ({"parameters": {"stages": {"type": "int", "low": 4, "high": 4}}}, "empty range"),
    ({"parameters": {"growth": {"type": "float", "low": 2.5, "high": 1.2}}}, "empty range"),
    ({"parameters": {"stages": {"type": "int", "low": 1.5, "high": 4}}}, "must be integers"),
    ({"parameters": {"growth": {"type": "float", "low": 0, "high": 2, "log": True}}}, "low must be > 0"),
    ({"parameters": {"mode": {"type": "categorical", "choices": []}}}, "non-empty 'choices'"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["fast"]}}}, "mode 'fast' unknown"),
    ({"parameters": {"stages": {"type": "integer", "low": 1, "high": 4}}}, "needs type int, float or categorical"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4, "max": 3}}}, "unknown key(s) ['max']"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages >> 1"}}}, "must look like"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages > 1"}}},
     "which the space does not define"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages > 1"},
                     "stages": {"type": "int", "low": 1, "high": 3, "when": "growth > 1.5"}}}, "form a cycle"),
    ({"parameters": {"stages": 2}, "objective": {"type": "min_loss"}}, "objective.type 'min_loss' unknown"),
    ({"parameters": {"stages": 2}, "search": {"algorithm": "bohb"}}, "search.algorithm 'bohb' unknown"),
    ({"parameters": {"stages": 2}, "asha": {"time_attr": "seconds"}}, "asha.time_attr 'seconds' unknown"),
    ({"parameters": {"stages": 2}, "asha": {"reduction_factor": 1}}, "reduction_factor > 1"),
    ({"parameters": {"stages": 2}, "budget": {"epochs": "many"}}, "budget.epochs must be a number"),
    ({"parameters": {"stages": 2}, "budget": {"network": "vnet"}}, "budget.network 'vnet' unknown"),
    ({"parameters": {"stages": 2}, "budget": {"filters": "big"}}, "budget.filters must be a list"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "log": True, "step": 0.1}}},
     "both log and step"),
    ({"parameters": {"stages": 2}, "search": {"max_compute": -1}}, "max_compute must be >= 0"),
    ({"parameters": {"stages": 2}, "search": {"startup_trials": -2}}, "startup_trials must be >= 0"),
    ({"parameters": {"stages": 2}, "search": {"references": "no"}}, "search.references must be true or false"),
    ({"parameters": {"stages": 2}, "objective": {"type": "cheapest_within"}, "search": {"references": False}},
     "cheapest_within needs the baseline"),
]


@pytest.mark.parametrize("raw,needle", BAD)
def test_malformed_spaces_are_refused_with_reason(raw, needle):
    with pytest.raises(PgpsError) as info:
        sp.parse(raw, "x.yaml")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_optuna_sampler_follows_the_space():
    import optuna

    s = sp.parse({"parameters": {"stages": 2}, "search": {"algorithm": "tpe", "startup_trials": 3, "seed": 5}})
    sampler = s.optuna_sampler()
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 3
    assert isinstance(sp.parse({"parameters": {"stages": 2}, "search": {"algorithm": "random"}}).optuna_sampler(),
                      optuna.samplers.RandomSampler)


def test_conditions_are_resolved_whatever_the_key_order():
    s = sp.parse({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages > 1"},
                                 "stages": {"type": "int", "low": 1, "high": 3}}})
    assert [p.name for p in s.parameters] == ["stages", "growth"]


def test_space_file_errors(tmp_path):
    with pytest.raises(PgpsError, match="does not exist"):
        sp.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {stages: [1, 2\n")
    with pytest.raises(PgpsError, match="not valid YAML at line"):
        sp.load(bad)


def test_parameters_the_network_cannot_take_are_refused_before_any_trial(tmp_path):
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    raw["parameters"]["stages"] = {"type": "int", "low": 1, "high": 20}
    with pytest.raises(PgpsError, match="budget.epochs is 10"):
        sp.check_space_against_plan(sp.parse(raw), (48, 48, 48), (3, 3, 3))
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    with pytest.raises(PgpsError, match="not divisible"):
        sp.check_space_against_plan(sp.parse(raw), (44, 48, 48), (3, 3, 3))


def test_simulated_asha_matches_the_rule():
    from pgps_tune.asha import simulate_asha

    curves = {"a": [(2, 0.5), (4, 0.6), (8, 0.7)], "b": [(2, 0.4), (4, 0.8), (8, 0.9)],
              "c": [(2, 0.45), (4, 0.5), (8, 0.55)], "d": [(2, 0.6), (4, 0.1)]}
    # rungs at 2 and 4 (grace 2, rf 2, max_t 8): b is below a at rung 2, c below a at rung 2
    assert simulate_asha(curves, ["a", "b", "c"], grace=2, max_t=8, rf=2) == {"b", "c"}
    # the first trial at a rung is never stopped; later ones are compared with what came before,
    # stopped trials included (a is stopped at rung 4 by b's 0.8, then c by the median of 0.8 and 0.6)
    assert simulate_asha(curves, ["b", "a", "c"], grace=2, max_t=8, rf=2) == {"a", "c"}
    assert simulate_asha(curves, ["c", "b", "a"], grace=2, max_t=8, rf=2) == {"b"}
    # a run's last report is its end (a resource curriculum ends below max_t): never an early stop
    assert simulate_asha(curves, ["a", "b", "d"], grace=2, max_t=8, rf=2) == {"b"}


def test_objective_scores():
    from pgps_tune.space import objective_score

    assert objective_score({"type": "max_dice"}, 0.8, 0.3, None) == 0.8
    budget = {"type": "dice_under_budget", "voxel_budget": 0.5}
    assert objective_score(budget, 0.8, 0.4, None) == 0.8 and objective_score(budget, 0.8, 0.6, None) < 0
    cheap = {"type": "cheapest_within", "tolerance": 0.01}
    assert objective_score(cheap, 0.86, 0.3, target_dice=0.85) == pytest.approx(0.7)
    assert objective_score(cheap, 0.84, 0.3, target_dice=0.85) == pytest.approx(-0.01)
    # any feasible schedule beats any infeasible one, and cheaper feasible ones win
    assert objective_score(cheap, 0.851, 0.9, 0.85) > objective_score(cheap, 0.849, 0.1, 0.85)
    assert objective_score(cheap, 0.851, 0.2, 0.85) > objective_score(cheap, 0.9, 0.5, 0.85)


def test_a_reference_the_budget_cannot_build_is_refused():
    s = sp.parse({"parameters": {"stages": 1}, "budget": {"epochs": 5}})
    with pytest.raises(PgpsError, match="the paper reference cannot be built"):
        sp.check_space_against_plan(s, (48, 48, 48), (3, 3, 3))
