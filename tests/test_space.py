import re
from pathlib import Path

import pytest
import yaml

from pgps_tune import space as sp
from pgps_tune.errors import PgpsError

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SHIPPED = sorted(p.stem for p in SPACES.glob("*.yaml"))


def test_every_file_in_search_spaces_is_shipped():
    assert len(SHIPPED) >= 6 and "hippocampus_performance" in SHIPPED
    assert sorted(sp.shipped_spaces()) == SHIPPED
    assert sp.resolve("smoke") == sp.shipped_spaces()["smoke"]
    with pytest.raises(PgpsError, match=re.escape(f"no shipped space of that name; give a file, or one of: "
                                                  f"{', '.join(SHIPPED)}")):
        sp.resolve("smok")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_parse_and_fit_their_plans(name):
    s = sp.load(sp.resolve(name))
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
    ({"parameters": {"stages": {"type": "int", "low": 1.5, "high": 4}}},
     "parameter 'stages': low must be an integer in [1, 100], got 1.5"),
    ({"parameters": {"fg_ratio": {"type": "float", "low": 0, "high": 0.9, "log": True}}}, "low must be > 0"),
    ({"parameters": {"mode": {"type": "categorical", "choices": []}}}, "non-empty 'choices'"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["fast"]}}}, "choice 'fast' unknown"),
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
    ({"parameters": {"stages": 2}, "asha": {"reduction_factor": 1}},
     "asha.reduction_factor must be a number in (1, 100]"),
    ({"parameters": {"stages": 2}, "budget": {"epochs": "many"}}, "budget.epochs must be an integer in"),
    ({"parameters": {"stages": 2}, "budget": {"network": "vnet"}}, "budget.network 'vnet' unknown"),
    ({"parameters": {"stages": 2}, "budget": {"filters": "big"}}, "budget.filters must be a list"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "log": True, "step": 0.1}}},
     "both log and step"),
    ({"parameters": {"stages": 2}, "search": {"max_compute": -1}}, "search.max_compute must be a number in [0, "),
    ({"parameters": {"stages": 2}, "search": {"startup_trials": -2}}, "search.startup_trials must be an integer"),
    ({"parameters": {"stages": 2}, "search": {"references": "no"}}, "search.references must be true or false"),
    ({"parameters": {"stages": 2}, "search": {"references": ["paper", "papr"]}},
     "search.references entry 'papr' unknown; list constant, paper, random, each optionally :MODE"),
    ({"parameters": {"stages": 2}, "search": {"references": ["paper:fast"]}}, "entry 'paper:fast' unknown"),
    ({"parameters": {"stages": 2}, "search": {"references": ["constant:sqrt"]}},
     "entry 'constant:sqrt' unknown; list constant, paper, random"),
    ({"parameters": {"stages": 2}, "search": {"references": ["random", "random"]}},
     "search.references lists ['random'] more than once"),
    ({"parameters": {"stages": 2}, "search": {"references": [1]}}, "search.references must be true or false"),
    ({"parameters": {"stages": 2}, "objective": {"type": "cheapest_within"}, "search": {"references": ["paper"]}},
     "cheapest_within needs the baseline"),
    ({"parameters": {"family": {"type": "categorical", "choices": ["staged", "shuffled"]}}},
     "parameter 'family': choice 'shuffled' unknown; use one of staged, random"),
    ({"parameters": {"growth_shape": "cubic"}}, "parameter 'growth_shape': value 'cubic' unknown; use one of "
                                                 "geometric, linear"),
    ({"parameters": {"mode": "sqrtt"}}, "value 'sqrtt' unknown; use one of resource, performance, sqrt"),
    ({"parameters": {"family": {"type": "float", "low": 0, "high": 1}}}, "takes one of staged, random"),
    ({"parameters": {"lengths": [0.5, -0.5]}}, "parameter 'lengths': entry 1 must be a number in (0, 1000000]"),
    ({"parameters": {"lengths": []}}, "parameter 'lengths': value must be a list of 1 to 100 numbers"),
    ({"parameters": {"lengths": 0.5}}, "parameter 'lengths': value must be a list"),
    ({"parameters": {"lengths": {"type": "categorical", "choices": [[1, 2]]}}}, "'lengths' takes a fixed list"),
    ({"parameters": {"stages": 2}, "objective": {"type": "cheapest_within"}, "search": {"references": False}},
     "cheapest_within needs the baseline"),
    # every number: a step that an int parameter cannot take, infinite or NaN bounds, values out of range
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4, "step": 0.5}}},
     "parameter 'stages': step must be an integer in (0, 3], got 0.5"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "step": 5}}}, "step must be a number in (0, "),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "step": -0.1}}}, "step must be"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": float("inf")}}},
     "parameter 'growth': high must be a number in [1, 16], got inf"),
    ({"parameters": {"growth": {"type": "float", "low": float("nan"), "high": 2}}}, "low must be a number"),
    ({"parameters": {"stages": {"type": "int", "low": -3, "high": 4}}}, "low must be an integer in [1, 100]"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 10**9}}}, "high must be an integer in [1, 100]"),
    ({"parameters": {"stages": {"type": "float", "low": 1, "high": 4}}}, "takes integers; use type int"),
    ({"parameters": {"mode": {"type": "int", "low": 1, "high": 4}}},
     "takes one of resource, performance, sqrt; use type categorical"),
    ({"parameters": {"stages": {"type": "int", "low": 1}}}, "needs a numeric 'high'"),
    ({"parameters": {"fg_ratio": {"type": "float", "low": 0.2, "high": 1.5}}}, "high must be a number in [0, 1]"),
    ({"parameters": {"lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}}, "low must be a number in (0, 10]"),
    ({"parameters": {"batch_cap": 0}}, "parameter 'batch_cap': value must be an integer in [1, 1000000], got 0"),
    ({"parameters": {"final_fraction": 1.0}}, "value must be a number in (0, 1)"),
    ({"parameters": {"stages": {"type": "categorical", "choices": [2, 3.5]}}}, "choice must be an integer"),
    ({"parameters": {"lr": {"type": "categorical", "choices": [0.01, float("nan")]}}}, "choice must be a number"),
    ({"parameters": {"stages": {"value": "three"}}}, "value must be an integer"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4, "log": "yes"}}}, "log must be true or false"),
    # conditions that compare with a non-number, or a mode with a number
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4},
                     "growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages > abc"}}},
     "when \"stages > abc\" compares 'stages' with 'abc', which is not a number"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4},
                     "growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages == abc"}}}, "not a number"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4},
                     "growth": {"type": "float", "low": 1.1, "high": 2, "when": "stages > 1e999"}}},
     "give a finite number"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["resource", "performance"]},
                     "batch_cap": {"type": "int", "low": 4, "high": 8, "when": "mode > 2"}}},
     "(a mode) with the number"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["resource", "performance"]},
                     "batch_cap": {"type": "int", "low": 4, "high": 8, "when": "mode >= performance"}}},
     "which is not a number"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["resource", "performance"]},
                     "batch_cap": {"type": "int", "low": 4, "high": 8, "when": "mode == fast"}}},
     "which is not one of its values ['resource', 'performance']"),
    # every numeric key of every section
    ({"parameters": {"stages": 2}, "budget": {"epochs": 0}}, "budget.epochs must be an integer in [1, 1000000], got 0"),
    ({"parameters": {"stages": 2}, "budget": {"epochs": 2.5}}, "budget.epochs must be an integer"),
    ({"parameters": {"stages": 2}, "budget": {"iterations_per_epoch": -1}}, "budget.iterations_per_epoch must be"),
    ({"parameters": {"stages": 2}, "budget": {"batch_size": 10**9}}, "budget.batch_size must be an integer in [1, "),
    ({"parameters": {"stages": 2}, "budget": {"lr": float("nan")}}, "budget.lr must be a number in (0, 10], got nan"),
    ({"parameters": {"stages": 2}, "budget": {"lr": "fast"}}, "budget.lr must be a number"),
    ({"parameters": {"stages": 2}, "budget": {"val_every": 0}}, "budget.val_every must be"),
    ({"parameters": {"stages": 2}, "budget": {"fg_ratio": 2}}, "budget.fg_ratio must be a number in [0, 1]"),
    ({"parameters": {"stages": 2}, "budget": {"val_fraction": 1}}, "budget.val_fraction must be a number in (0, 1)"),
    ({"parameters": {"stages": 2}, "budget": {"seed": -1}}, "budget.seed must be an integer in [0, "),
    ({"parameters": {"stages": 2}, "budget": {"split_seed": True}}, "budget.split_seed must be an integer"),
    ({"parameters": {"stages": 2}, "budget": {"final_patch": [40, 56]}}, "budget.final_patch must be a list of 3"),
    ({"parameters": {"stages": 2}, "budget": {"final_patch": [40, 56, -8]}}, "budget.final_patch must be an integer"),
    ({"parameters": {"stages": 2}, "budget": {"pools": [3, 3, 9]}}, "budget.pools must be an integer in [0, 8]"),
    ({"parameters": {"stages": 2}, "budget": {"filters": [8, 0]}}, "budget.filters must be an integer in [1, 4096]"),
    ({"parameters": {"stages": 2}, "budget": {"filters": []}}, "budget.filters must be a list of 1 to 10 integers"),
    ({"parameters": {"stages": 2}, "budget": {"synthetic_cases": 1}}, "budget.synthetic_cases must be"),
    ({"parameters": {"stages": 2}, "budget": {"synthetic_shape": [32, 32, 10**5]}}, "budget.synthetic_shape must be"),
    ({"parameters": {"stages": 2}, "budget": {"max_failures": -1}}, "budget.max_failures must be"),
    ({"parameters": {"stages": 2}, "budget": {"trainer": "nnUNet"}}, "budget.trainer 'nnUNet' unknown; use one of"),
    ({"parameters": {"stages": 2}, "budget": {"nnunet_fold": -1}}, "budget.nnunet_fold must be an integer in [0, "),
    ({"parameters": {"stages": 2}, "budget": {"nnunet_val_iterations": 0}}, "budget.nnunet_val_iterations must be"),
    ({"parameters": {"stages": 2}, "budget": {"trainer": "nnunet"}, "confirm": {"splits": "s.json"}},
     "trainer nnunet confirms on nnU-Net's own folds"),
    ({"parameters": {"stages": 2}, "search": {"num_samples": 0}}, "search.num_samples must be an integer in [1, "),
    ({"parameters": {"stages": 2}, "search": {"num_samples": 10**12}}, "search.num_samples must be"),
    ({"parameters": {"stages": 2}, "search": {"seed": -5}}, "search.seed must be"),
    ({"parameters": {"stages": 2}, "search": {"grid_points": 0}}, "search.grid_points must be"),
    ({"parameters": {"stages": 2}, "search": {"max_compute": float("inf")}}, "search.max_compute must be"),
    ({"parameters": {"stages": 2}, "asha": {"grace_fraction": 0}}, "asha.grace_fraction must be a number in (0, 1]"),
    ({"parameters": {"stages": 2}, "asha": {"reduction_factor": float("nan")}}, "asha.reduction_factor must be"),
    ({"parameters": {"stages": 2}, "asha": {"brackets": 0}}, "asha.brackets must be an integer in [1, 10]"),
    ({"parameters": {"stages": 2}, "objective": {"tolerance": -0.1}}, "objective.tolerance must be"),
    ({"parameters": {"stages": 2}, "objective": {"voxel_budget": 0}},
     "objective.voxel_budget must be a number in (0, 1]"),
    # keys that do not apply would be ignored: refused, naming them
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4, "value": 2}}},
     "parameter 'stages': 'high', 'low', 'type' cannot be combined with a fixed 'value'"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["resource"], "low": 1, "high": 3}}},
     "parameter 'mode': 'high', 'low' cannot be combined with type categorical"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4, "choices": [2]}}},
     "parameter 'stages': 'choices' cannot be combined with type int"),
    ({"parameters": {"growth": {"type": "float", "low": 1.1, "high": 2, "choices": [1.5]}}},
     "'choices' cannot be combined with type float"),
    ({"parameters": {"mode": {"type": "categorical", "choices": ["resource", "resource", "performance"]}}},
     "parameter 'mode': choices lists 'resource' more than once"),
    ({"parameters": {"stages": {"type": "categorical", "choices": [2, 3, 2.0]}}}, "choices lists 2 more than once"),
    ({"parameters": {"stages": {"type": "int", "low": 1, "high": 4, "step": 2}}},
     "step 2 does not divide high - low = 3; make high 3 (or 5)"),
    ({"parameters": {"growth": {"type": "float", "low": 1.0, "high": 2.0, "step": 0.3}}},
     "step 0.3 does not divide high - low = 1; make high 1.9 (or 2.2)"),
    ({"parameters": {"stages": 2}, "objective": {"type": "max_dice", "pick": "max_dice"}},
     "objective.pick applies to objective type pareto only, not max_dice"),
    ({"parameters": {"stages": 2}, "objective": {"type": "max_dice", "tolerance": 0.02}},
     "objective.tolerance applies to objective type cheapest_within only"),
    ({"parameters": {"stages": 2}, "objective": {"type": "pareto", "voxel_budget": 0.5}},
     "objective.voxel_budget applies to objective type dice_under_budget only"),
    ({"parameters": {"stages": 2}, "confirm": {"top_k": 1, "seeds": 2, "folds": 3}},
     "confirm gives both seeds and folds; give seeds or folds/splits, not both"),
    ({"parameters": {"stages": 2}, "confirm": {"seeds": 2, "splits": "s.json"}}, "both seeds and splits"),
    ({"parameters": {"stages": 2}, "name": [1, 2]}, "'name' must be a string, got [1, 2]"),
    ({"parameters": {"stages": 2}, "budegt": {}}, "unknown key(s) ['budegt'] (did you mean 'budget'?)"),
    ({"parameters": {"stages": 2, "growht": 2.0}}, "unknown parameter 'growht' (did you mean 'growth'?)"),
    ({"parameters": {"stages": 2}, 5: "x", "foo": "y"}, "unknown key(s) [5, 'foo']"),
]


def test_null_keeps_the_documented_default():
    s = sp.parse({"parameters": {"stages": 2}, "budget": {"final_patch": None, "pools": None, "lr": None},
                  "confirm": {"folds": None, "splits": None, "epochs": None, "seeds": 2}})
    assert (s.budget.final_patch, s.budget.pools, s.budget.lr, s.confirm.seeds) == (None, None, None, 2)


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


def test_more_stages_than_epochs_names_the_flag_that_fixes_it():
    # the fix named only the space file's keys: a demo (a shipped space) or a tune --epochs N needs --epochs
    s = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 4}},
                  "search": {"references": []}, "budget": {"epochs": 2}})
    with pytest.raises(PgpsError, match=r"stages can reach 4 but budget.epochs is 2; give --epochs 4 or more"):
        sp.check_space_against_plan(s, (16, 16, 16), (2, 2, 2))


def test_every_number_of_a_space_has_a_range():
    from pgps_tune.limits import LIMITS, limit

    for section, cls in (("objective", sp.Objective), ("search", sp.Search), ("asha", sp.Asha),
                         ("budget", sp.Budget)):
        for name, f in cls.__dataclass_fields__.items():
            if "int" in str(f.type) or "float" in str(f.type):
                item = {"final_patch": "patch_axis", "synthetic_shape": "synthetic_axis"}.get(name, name)
                assert limit(item, section) is not None, f"{section}.{name}"
    assert all(name in LIMITS for name, kind in sp.KNOWN_PARAMS.items() if kind != "categorical")


def test_families_as_search_options():
    s = sp.parse({"parameters": {
        "stages": 3, "growth": 2.0,
        "family": {"type": "categorical", "choices": ["staged", "random"]},
        "growth_shape": {"type": "categorical", "choices": ["geometric", "linear"]},
        "mode": {"type": "categorical", "choices": ["resource", "sqrt"]},
        "lengths": [0.25, 0.25, 0.5],
    }, "budget": {"epochs": 8}, "search": {"references": False}, "confirm": {"enabled": False}})
    grid = s.grid()
    assert len(grid) == 8  # 2 families x 2 shapes x 2 modes
    built = {(g["family"], g["growth_shape"], g["mode"]):
             sp.schedule_from_params(g, (64, 64, 64), (3, 3, 3), 2, 8) for g in grid}
    for (family, shape, mode), sched in built.items():
        assert sched.sampling == family and [st.epochs for st in sched.stages] == [2, 2, 4]
        assert [st.patch_size[0] for st in sched.stages] == ([16, 32, 64] if shape == "geometric" else [16, 40, 64])
        assert (sched.stages[0].batch_size > 2) == (mode == "sqrt")
    sp.check_space_against_plan(s, (64, 64, 64), (3, 3, 3))


def test_lengths_that_do_not_fit_the_stages_or_budget_are_refused_before_any_trial():
    counted = sp.parse({"parameters": {"stages": {"type": "int", "low": 2, "high": 3}, "growth": 2.0,
                                       "lengths": [0.5, 0.5]}, "budget": {"epochs": 8}})
    with pytest.raises(PgpsError, match="lengths has 2 entries but the schedule has 3 stages") as info:
        sp.check_space_against_plan(counted, (64, 64, 64), (3, 3, 3))
    assert "\n" not in str(info.value)
    # whole epochs that no longer sum to the budget
    epochs = sp.parse({"parameters": {"stages": 2, "growth": 2.0, "lengths": [3, 3]}, "budget": {"epochs": 8}})
    with pytest.raises(PgpsError, match="sum to 6; give fractions that sum to 1 or whole epochs that sum to the 8"):
        sp.check_space_against_plan(epochs, (64, 64, 64), (3, 3, 3))
    # a list paired with its stage count through a condition is built only there
    paired = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3}, "growth": 2.0,
                                      "lengths": {"value": [0.2, 0.3, 0.5], "when": "stages == 3"}},
                       "budget": {"epochs": 10}, "search": {"references": False}, "confirm": {"enabled": False}})
    assert all(("lengths" in g) == (g["stages"] == 3) for g in paired.grid())
    sp.check_space_against_plan(paired, (64, 64, 64), (3, 3, 3))


def test_references_can_name_families_and_modes():
    default = sp.parse({"parameters": {"stages": 2, "mode": "sqrt"}})
    assert sp.reference_configs(default) == [{"role": "baseline", "preset": "constant"},
                                            {"role": "paper", "preset": "paper", "mode": "sqrt"}]
    assert sp.reference_configs(sp.parse({"parameters": {"stages": 2}, "search": {"references": False}})) == []
    listed = sp.parse({"parameters": {"stages": 2, "growth": 2.0}, "budget": {"epochs": 30},
                       "search": {"references": ["constant", "random", "paper:sqrt", "random:performance"]}})
    refs = sp.reference_configs(listed)
    assert [r["role"] for r in refs] == ["baseline", "random", "paper:sqrt", "random:performance"]
    built = [sp.schedule_from_params(r, (40, 56, 40), (3, 3, 3), 2, 30) for r in refs]
    assert [b.sampling for b in built] == ["staged", "random", "staged", "random"]
    assert built[3].meta["mode"] == "performance" and built[1].meta["mode"] == "resource"
    sp.check_space_against_plan(listed, (40, 56, 40), (3, 3, 3))
    short = sp.parse({"parameters": {"stages": 1}, "budget": {"epochs": 5}, "search": {"references": ["random"]}})
    with pytest.raises(PgpsError, match="the random reference cannot be built"):
        sp.check_space_against_plan(short, (40, 56, 40), (3, 3, 3))


def test_a_confirmation_needs_both_references_buildable_before_any_trial():
    raw = {"parameters": {"stages": 2, "growth": 2.0}, "budget": {"epochs": 8}, "search": {"references": False}}
    with pytest.raises(PgpsError, match="paper reference cannot be built.*confirm.enabled false") as info:
        sp.check_space_against_plan(sp.parse(raw), (64, 64, 64), (3, 3, 3))
    assert "\n" not in str(info.value)
    sp.check_space_against_plan(sp.parse({**raw, "confirm": {"enabled": False}}), (64, 64, 64), (3, 3, 3))
