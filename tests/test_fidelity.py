"""The compressed fidelity: its rung arithmetic, its space settings, and one tiny sweep through ``pgps-tune tune``."""

import dataclasses
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pgps_tune import schedule as sch
from pgps_tune import space as sp
from pgps_tune.asha import fidelity_ladder, ladder_compute, main_effects_ranking, screening_ladder, survivors
from pgps_tune.cli import main
from pgps_tune.errors import PgpsError
from pgps_tune.results import pick_best

# -- rung arithmetic ------------------------------------------------------------------------------


@pytest.mark.parametrize("n0,eta,min_fraction,ipe", [(27, 3, 1 / 9, 90), (48, 3, 0.1, 25), (10, 2, 0.2, 40),
                                                      (5, 4, 0.05, 100), (1, 3, 0.1, 30), (100, 1.5, 0.3, 50)])
def test_ladder_halves_towards_the_full_budget(n0, eta, min_fraction, ipe):
    rungs = fidelity_ladder(n0, eta, min_fraction, ipe)
    top = rungs[-1]
    assert top.fraction == 1.0 and top.iterations_per_epoch == ipe
    assert rungs[0].trials == n0
    for low, high in zip(rungs, rungs[1:]):
        assert low.fraction < high.fraction and low.iterations_per_epoch < high.iterations_per_epoch
        assert high.trials == max(1, math.floor(low.trials / eta ** round(math.log(high.fraction / low.fraction, eta))
                                                + 1e-9)) or high is top
        assert high.trials <= low.trials
    for r in rungs:
        assert r.fraction == r.iterations_per_epoch / ipe
        # the lowest rung is near min_fraction (whole iterations per epoch), never far below it
        assert r.fraction >= min_fraction * (1 - 0.5 / (min_fraction * ipe)) - 1e-9
    assert all(r.trials > 1 for r in rungs[:-1])  # a single schedule below the full budget chooses nothing
    assert ladder_compute(rungs) == pytest.approx(sum(r.trials * r.iterations_per_epoch / ipe for r in rungs))


def test_ladder_refuses_rungs_that_round_to_the_same_length():
    with pytest.raises(PgpsError, match="both train 1 of 3 iterations"):
        fidelity_ladder(9, 3, 1 / 9, 3)
    with pytest.raises(PgpsError, match="eta > 1"):
        fidelity_ladder(9, 1, 0.5, 10)


def test_survivors_are_the_best_scores_and_skip_failed_runs():
    scores = [("a", 0.2, 0.5), ("b", math.nan, 0.1), ("c", 0.9, 0.9), ("d", 0.9, 0.3), ("e", 0.5, 0.2)]
    assert survivors(scores, 3) == ["d", "c", "e"]
    assert survivors(scores, 10) == ["d", "c", "e", "a"]
    assert survivors([("x", math.inf, 0.1)], 1) == []
    assert survivors([("x", 0.1, 0.1), ("y", 0.3, 0.1), ("x", 0.5, 0.1)], 2) == ["x", "y"]  # x once, by its best

    # two parameter sets that train one schedule (growth means nothing to one stage) survive once
    assert survivors(scores, 2, same={"a": 1, "c": 1, "d": 2, "e": 3}.get) == ["d", "c"]
    assert survivors(scores, 2, same={"a": 1, "c": 2, "d": 2, "e": 3}.get) == ["d", "e"]


@pytest.mark.parametrize("promote", ["measured", "main_effects"])
def test_a_compressed_ladder_promotes_what_trains_once_and_a_resumed_older_ladder_as_it_began(
        tmp_path, monkeypatch, promote):
    """Rung 0 trained {stages 1, growth 2} and {stages 1, growth 3} (one constant schedule) best: both went on,
    so the full budget trained it twice.  A ladder begun before the rule still promotes by parameters, or its
    restored upper rung would be handed other schedules than it ran."""
    from types import SimpleNamespace

    from pgps_tune import tuner
    from pgps_tune.results import TrialRecord

    top = {"promote": promote, "promote_top": 2} if promote == "main_effects" else {}
    space = sp.parse({**_space(fidelity="compressed", reduction_factor=2, min_fraction=0.5, **top), "parameters": {
        "stages": {"type": "categorical", "choices": [1, 2]}, "growth": {"type": "categorical", "choices": [2.0, 3.0]}},
        "search": {"algorithm": "grid", "references": False}}, "s.yaml")
    setup = tuner.trial_setup(space, "synthetic", None, (16, 16, 16), (2, 2, 2), 1, 0)
    dice = {(1, 2.0): 0.8, (1, 3.0): 0.79, (2, 2.0): 0.7, (2, 3.0): 0.6}
    records = [TrialRecord(f"t{i}", "TERMINATED", {"stages": n, "growth": g}, {
        "val_dice": d, "score": d, "completed": True, "schedule_voxel_fraction": 1.0 / n,
        "schedule": sp.schedule_from_params({"stages": n, "growth": g}, (16, 16, 16), (2, 2, 2), 2, 6).to_json()})
        for i, ((n, g), d) in enumerate(dice.items())]
    handed = []
    monkeypatch.setattr(tuner, "run_phase", lambda phase, *a, **k: handed.append((phase, getattr(a[5], "configs",
                                                                                                 None))))
    monkeypatch.setattr(tuner, "read_trials", lambda meta, keys: records)

    def promoted(before=None):
        handed.clear()
        meta = {"sweep": "s", "experiments": {}, "objective": {"type": "max_dice"},
                "asha": tuner.AshaSettings.from_space(space).to_dict()}
        tuner.run_compressed(SimpleNamespace(space=space, out=tmp_path), None, meta, setup, None, 4, None, "", before)
        assert [p for p, _ in handed] == ["search", "search-r1"]
        return [(c["stages"], c["growth"]) for c in handed[1][1]], meta["fidelity"]["unique_by"]

    assert promoted() == ([(1, 2.0), (2, 2.0)], "training")
    older = {"fidelity": {k: v for k, v in tuner.ladder_meta(space, 4).items() if k != "unique_by"}}
    assert promoted(older) == ([(1, 2.0), (1, 3.0)], "params")
    assert promoted({"fidelity": tuner.ladder_meta(space, 4)})[1] == "training"


# -- the space file ---------------------------------------------------------------------------------


def _space(**asha) -> dict:
    return {"parameters": {"stages": {"type": "int", "low": 1, "high": 3}, "growth": {"value": 2.0}},
            "search": {"algorithm": "tpe", "num_samples": 9}, "asha": asha,
            "budget": {"epochs": 6, "iterations_per_epoch": 30}}


def test_space_parses_the_fidelity():
    space = sp.parse(_space(fidelity="compressed", min_fraction=0.2, reduction_factor=2), "s.yaml")
    assert space.asha.fidelity == "compressed" and space.asha.min_fraction == 0.2
    assert sp.parse(_space(), "s.yaml").asha.fidelity == "partial"


@pytest.mark.parametrize("asha,extra,match", [
    ({"fidelity": "extrapolated"}, {}, "asha.fidelity 'extrapolated' unknown; use one of partial, compressed"),
    ({"fidelity": 1}, {}, "asha.fidelity must be a string"),
    ({"fidelity": "compressed", "min_fraction": 0}, {}, r"asha.min_fraction must be a number in \(0, 1\)"),
    ({"fidelity": "compressed", "min_fraction": 1.0}, {}, r"asha.min_fraction must be a number in \(0, 1\)"),
    ({"fidelity": "compressed", "min_fraction": float("nan")}, {}, "asha.min_fraction must be"),
    ({"fidelity": "compressed", "min_fraction": 0.01}, {}, "raise asha.min_fraction or budget.iterations_per_epoch"),
    ({"fidelity": "compressed", "enabled": False}, {}, "asha.enabled is false"),
    ({"fidelity": "compressed"}, {"search": {"max_compute": 2.0}}, "set max_compute: 0"),
    ({"fidelity": "compressed"}, {"objective": {"type": "pareto"}}, "objective pareto"),
    ({"promote": "main_effects"}, {}, "asha.promote main_effects needs asha.fidelity compressed"),
    ({"fidelity": "compressed", "promote": "model"}, {}, "asha.promote 'model' unknown; use one of measured, "
                                                        "main_effects"),
    ({"fidelity": "compressed", "promote": "main_effects", "min_fraction": 0.99, "reduction_factor": 1.001}, {},
     "the screening rung would train all 30 iterations per epoch"),
    ({"fidelity": "compressed", "promote_top": 2}, {}, "asha.promote_top 2 needs asha.promote main_effects"),
    # min_fraction above 1/reduction_factor: no rung below the full budget, nothing screened or stopped
    ({"fidelity": "compressed", "reduction_factor": 10}, {}, r"min_fraction 0.111 is above 1/asha.reduction_factor "
                                                          r"\(0.1\).*set min_fraction to at most 0.1 or lower"),
    ({"fidelity": "compressed", "promote": "main_effects", "min_fraction": 0.5}, {}, "the screening ladder has no "
                                                                                    "rung below the full budget"),
    ({"fidelity": "compressed", "promote": "main_effects", "promote_top": -1}, {}, "asha.promote_top must be"),
    ({"fidelity": "compressed", "promote": "main_effects", "promote_top": 1.5}, {}, "asha.promote_top must be"),
    # keys the other fidelity reads would be ignored without a word
    ({"fidelity": "compressed", "grace_fraction": 0.111}, {}, "asha.grace_fraction applies to ASHA's early stopping "
                                                              "of partial runs, not to a compressed ladder.*drop it"),
    ({"fidelity": "compressed", "judge": "always", "time_attr": "epoch", "brackets": 1}, {},
     "asha.time_attr, asha.brackets, asha.judge apply to .*drop them"),
    ({"min_fraction": 0.2}, {}, "asha.min_fraction applies to a compressed ladder .* only.*set fidelity: compressed"),
])
def test_space_refuses_a_fidelity_it_cannot_run(asha, extra, match):
    raw = {**_space(**asha), **extra}
    with pytest.raises(PgpsError, match=match) as exc:
        sp.parse(raw, "s.yaml")
    assert str(exc.value).startswith("s.yaml: ") and "\n" not in str(exc.value)


def test_a_sweep_refuses_a_ladder_that_iterations_per_epoch_from_the_command_line_breaks(tmp_path):
    """The file's 30 iterations per epoch climb the ladder; --iterations-per-epoch 2 rounds two rungs to
    one length: refused by the options' check, before the sweep writes its folder."""
    from pgps_tune.tuner import SweepOptions

    space = sp.parse(_space(fidelity="compressed"), "s.yaml")
    SweepOptions(space=space, data="synthetic", out=tmp_path / "sweep").check()
    space = dataclasses.replace(space, budget=dataclasses.replace(space.budget, iterations_per_epoch=2))
    with pytest.raises(PgpsError, match=r"s.yaml: the fidelity ladder's rungs 0 and 1 both train 1 of 2 .*"
                                        "--iterations-per-epoch"):
        SweepOptions(space=space, data="synthetic", out=tmp_path / "sweep").check()
    assert not (tmp_path / "sweep").exists()


def test_main_effects_screening_of_fewer_schedules_than_effects_is_refused_with_the_least_that_works(tmp_path):
    """One screened schedule fits nothing (the sweep used to promote it unranked); two cannot tell apart the
    three effects of a 2 x 2 space (intercept, stage count, learning rate): the ridge would rank by its prior."""
    from pgps_tune.asha import main_effects_terms
    from pgps_tune.tuner import SweepOptions, screening_candidates

    raw = _tiny_space("m", {"algorithm": "random", "num_samples": 1}, {"promote": "main_effects",
                                                                      "reduction_factor": 4, "min_fraction": 0.25})
    space = sp.parse(raw, "s.yaml")
    assert main_effects_terms(space.parameters, screening_candidates(space, [])) == 3
    for n in (1, 2):
        with pytest.raises(PgpsError, match=rf"^s.yaml: asha.promote main_effects fits 3 effects .* screens {n} "
                                            r"schedules?, too few .*tune --num-samples\) 3 or more[^\n]*$"):
            SweepOptions(space=space, data="synthetic", out=tmp_path / "sweep", num_samples=n).check()
    SweepOptions(space=space, data="synthetic", out=tmp_path / "sweep", num_samples=3).check()
    grid = dataclasses.replace(space, search=dataclasses.replace(space.search, algorithm="grid"))
    assert SweepOptions(space=grid, data="synthetic", out=tmp_path / "sweep").search_samples() == 1
    SweepOptions(space=grid, data="synthetic", out=tmp_path / "sweep", num_samples=9).check()  # the 4 of the grid
    assert not (tmp_path / "sweep").exists()


def test_a_resume_names_the_search_settings_it_would_change():
    """The stored trials were compared at ASHA's rungs or trained at the ladder's budgets: a resume under
    other ones would label them with settings they did not run with."""
    from pgps_tune.asha import AshaSettings
    from pgps_tune.tuner import _search_changes, early_stopping, ladder_meta

    partial = sp.parse(_space(reduction_factor=3), "s.yaml")
    before = {"num_samples": 9, "asha": AshaSettings.from_space(partial).to_dict(), "early_stopping": True}
    assert _search_changes(before, partial, 9) == {}
    assert _search_changes({k: v for k, v in before.items() if k != "early_stopping"}, partial, 9) == {}  # older
    other = sp.parse(_space(reduction_factor=2), "s.yaml")
    assert _search_changes(before, other, 9) == {"asha reduction_factor": (3, 2)}
    off = sp.parse(_space(enabled=False), "s.yaml")
    assert _search_changes(before, off, 9) == {"ASHA early stopping": (True, False)}
    compressed = sp.parse(_space(fidelity="compressed"), "s.yaml")
    stored = {**before, "early_stopping": early_stopping(compressed), "fidelity": ladder_meta(compressed, 9)}
    assert _search_changes(stored, compressed, 9) == {}
    # a compressed sweep stored from a file that set ASHA's own keys (now refused) resumes once they are dropped
    older = {**stored, "asha": {**before["asha"], "time_attr": "epoch", "max_t": 6, "grace_period": 2}}
    assert _search_changes(older, compressed, 9) == {}
    changed = _search_changes(stored, compressed, 12)
    assert changed["search.num_samples (--num-samples)"] == (9, 12)
    assert list(changed.values())[-1] == ("9 at 0.1, 3 at 0.333, 1 at 1", "12 at 0.1, 4 at 0.333, 1 at 1")


def test_a_sweep_says_when_asha_can_stop_no_trial():
    from pgps_tune.tuner import asha_cannot_stop

    def space(asha: dict, **budget) -> sp.SearchSpace:
        raw = _space(**asha)
        return sp.parse({**raw, "budget": {**raw["budget"], **budget}}, "s.yaml")

    assert asha_cannot_stop(space({})) is None  # 6 epochs validated every 3 (the default), rungs before the end
    assert "lower val_every" in asha_cannot_stop(space({}, val_every=6))
    assert "lower grace_fraction" in asha_cannot_stop(space({"grace_fraction": 1.0}))
    assert asha_cannot_stop(space({"grace_fraction": 1.0, "enabled": False})) is None  # off: nothing promised


# -- one compressed sweep, end to end -------------------------------------------------------------------


# a 2 x 2 space (stage count x learning rate) on tiny synthetic data, 4 epochs x 8 iterations at the full budget
TINY_BUDGET = {"epochs": 4, "iterations_per_epoch": 8, "batch_size": 2, "filters": [4, 8, 16], "optimizer": "adamw",
               "lr": 0.01, "val_every": 1, "synthetic_cases": 4, "synthetic_shape": [24, 24, 24],
               "final_patch": [16, 16, 16], "pools": [2, 2, 2], "max_failures": 0}


def _tiny_space(name: str, search: dict, asha: dict) -> dict:
    return {"name": name, "parameters": {"stages": {"type": "categorical", "choices": [1, 2]},
                                         "lr": {"type": "categorical", "choices": [0.01, 1.0e-9]},
                                         "growth": {"value": 2.0}},
            "search": {**search, "references": False}, "asha": {"fidelity": "compressed", **asha},
            "confirm": {"enabled": False}, "budget": TINY_BUDGET}


def test_compressed_sweep_promotes_the_best_and_exports_only_the_full_budget(shared_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    budget = TINY_BUDGET
    raw = _tiny_space("c", {"algorithm": "grid"}, {"reduction_factor": 2, "min_fraction": 0.25})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    assert main(["tune", "--space", str(tmp_path / "s.yaml"), "--data", "synthetic", "--out", str(out),
                 "--max-concurrent", "1", "--quiet"]) == 0
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    rungs = fidelity_ladder(4, 2, 0.25, 8)
    assert [(r.fraction, r.trials) for r in rungs] == [(0.25, 4), (0.5, 2), (1.0, 1)]
    by_rung = {r.fraction: [row for row in rows if row["fidelity"] == r.fraction] for r in rungs}
    assert {f: len(v) for f, v in by_rung.items()} == {r.fraction: r.trials for r in rungs}
    for i, rung in enumerate(rungs):
        for row in by_rung[rung.fraction]:
            assert row["completed"] and row["rung_reached"] == i
            # compute is counted in full-budget baseline iterations: a rung costs its fraction of a full run
            assert row["baseline_iterations"] == pytest.approx(
                rung.fraction * row["schedule_voxel_fraction"] * budget["epochs"] * budget["iterations_per_epoch"],
                rel=1e-6)
            recipe = json.loads(row["schedule"])["recipe"]["train"]
            assert recipe["iterations_per_epoch"] == rung.iterations_per_epoch
        if i + 1 < len(rungs):  # the next rung trains exactly the best of this one again
            promoted = {row["params"] for row in by_rung[rungs[i + 1].fraction]}
            ranked = sorted(by_rung[rung.fraction], key=lambda row: (-row["score"], row["schedule_voxel_fraction"]))
            assert promoted == {row["params"] for row in ranked[:rungs[i + 1].trials]}
    (winner,) = by_rung[1.0]  # the winner is the one full-budget trial, whatever the low rungs scored
    best = sch.load(out / "best_schedule.yaml")
    assert best.meta["trial_id"] == winner["trial_id"]
    assert best.recipe.train.iterations_per_epoch == budget["iterations_per_epoch"]  # trains as the full run did
    meta = json.loads((out / "sweep.json").read_text())
    assert list(meta["experiments"]) == ["search", "search-r1", "search-r2"] and meta["finished"]
    assert Path(meta["storage_path"], meta["experiments"]["search-r2"]).is_dir()
    # resuming a ladder (every rung restored, the same schedules promoted): the main-effects test below


def test_main_effects_sweep_promotes_the_models_top_over_the_space(shared_ray, tmp_path, monkeypatch, capsys):
    # screening: 3 random schedules of a 2 x 2 space at a quarter of the budget; the full budget trains the
    # two (asha.promote_top; 3 / reduction factor 4 would give one) the additive model ranks first among every
    # schedule of the space, screened or not
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    raw = _tiny_space("m", {"algorithm": "random", "num_samples": 3},
                      {"promote": "main_effects", "promote_top": 2, "reduction_factor": 4, "min_fraction": 0.25})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    space = sp.load(tmp_path / "s.yaml")
    out = tmp_path / "sweep"
    args = ["tune", "--space", str(tmp_path / "s.yaml"), "--data", "synthetic", "--out", str(out), "--quiet",
            "--max-concurrent", "1"]
    assert main(args) == 0
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert [(r.fraction, r.trials) for r in screening_ladder(3, 4, 0.25, 8)] == [(0.25, 3), (1.0, 1)]
    low = [r for r in rows if r["fidelity"] == 0.25]
    full = [r for r in rows if r["fidelity"] == 1.0]
    assert len(low) == 3 and all(r["completed"] for r in low)
    observed = [(json.loads(r["params"]), r["score"]) for r in low]
    candidates = [{"growth": 2.0, "lr": lr, "stages": n} for n in (1, 2) for lr in (0.01, 1.0e-9)]
    top = main_effects_ranking(space.parameters, observed, candidates)[:2]
    assert sorted(json.dumps(json.loads(r["params"]), sort_keys=True) for r in full) == sorted(
        json.dumps(c, sort_keys=True) for c in top)
    best = pick_best(full)  # the higher score (a tie: the cheaper schedule; tiny runs can tie)
    assert best is not None and sch.load(out / "best_schedule.yaml").meta["trial_id"] == best["trial_id"]
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["fidelity"]["promote"] == "main_effects" and list(meta["experiments"]) == ["search", "search-r1"]
    # resuming restores both rungs' experiments; the stored rung gives the same model, so the same schedule
    # is promoted and nothing trains again
    assert main([*args, "--resume"]) == 0
    again = pq.read_table(out / "trials.parquet").to_pylist()
    assert sorted(again, key=lambda r: r["trial_id"]) == sorted(rows, key=lambda r: r["trial_id"])
    # another trial count would restore the 3 screened but promote by another ladder: refused, nothing written
    capsys.readouterr()
    before = (out / "sweep.json").read_bytes()
    assert main([*args, "--resume", "--num-samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "search.num_samples (--num-samples): 3 then, 4 now" in err and '"3 at 0.25, 2 at 1" then' in err
    assert len(err.splitlines()) == 1 and (out / "sweep.json").read_bytes() == before
    # promote needs the compressed ladder
    raw["asha"] = {"promote": "main_effects"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(PgpsError, match="needs asha.fidelity compressed"):
        sp.load(tmp_path / "bad.yaml")


def test_store_reads_files_without_fidelity_and_never_picks_a_low_fidelity_trial(tmp_path):
    import pyarrow as pa

    from pgps_tune.results import SCHEMA, best_schedule, load_store, store_sweep, stored_trials

    s = sch.preset("constant", (16, 16, 16), (2, 2, 2), 2, 4)
    row = {c: None for c in SCHEMA.names} | {"role": "search", "completed": True, "params": "{}",
                                              "schedule": json.dumps(s.to_dict()), "schedule_voxel_fraction": 1.0,
                                              "final_dice": 0.5, "n_stages": 1}
    rows = [row | {"trial_id": "low", "score": 0.9, "fidelity": 0.25}, row | {"trial_id": "full", "score": 0.5,
                                                                               "fidelity": 1.0}]
    meta = {"objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "dataset": "d", "sweep": "new",
            "space_key": "k"}
    store_sweep(pa.Table.from_pylist(rows, schema=SCHEMA), meta, tmp_path)
    old = tmp_path / "dataset=d" / "sweep=old"  # written before the fidelity column: full-budget trials
    old_rows = pa.Table.from_pylist([row | {"trial_id": "old", "score": 0.4}], schema=SCHEMA)
    store_sweep(old_rows, {**meta, "sweep": "old"}, tmp_path)
    pq.write_table(pq.read_table(old / "part-0.parquet").drop_columns(["fidelity"]), old / "part-0.parquet")
    t = load_store(tmp_path)
    assert dict(zip(t["trial_id"].to_pylist(), t["fidelity"].to_pylist())) == {"low": 0.25, "full": 1.0, "old": 1.0}
    assert best_schedule("d", tmp_path).meta["trial_id"] == "full"
    assert sorted(r["trial_id"] for r in stored_trials("d", "k", [16, 16, 16], tmp_path)) == ["full", "old"]


def test_cheapest_within_never_lets_a_low_rung_or_a_stopped_trial_be_within_tolerance_for_the_pick():
    """The target is the full-budget baseline's Dice less the tolerance: a compressed run at a quarter of the
    budget, or a trial ASHA stopped at a rung, may reach it and score as within, but only completed full-budget
    trials are picked or confirmed: here the baseline itself, and the one full-budget searched schedule."""
    from pgps_tune.results import confirm_candidates
    from pgps_tune.space import objective_score

    objective, target = {"type": "cheapest_within", "tolerance": 0.01}, 0.70

    def row(tid, role, dice, vf, fidelity=1.0, completed=True, schedule=None):
        return {"trial_id": tid, "phase": "search" if role == "search" else "references", "role": role,
                "params": json.dumps({"t": tid}), "completed": completed, "final_dice": dice, "fidelity": fidelity,
                "schedule_voxel_fraction": vf, "schedule": json.dumps(schedule or {"stages": tid}),
                "score": objective_score(objective, dice, vf, target)}

    rows = [row("base", "baseline", 0.71, 1.0), row("low", "search", 0.75, 0.3, fidelity=0.25),
            row("stopped", "search", 0.80, 0.2, completed=False), row("full", "search", 0.60, 0.3)]
    assert [r["score"] > 0 for r in rows] == [False, True, True, False]  # the low-fidelity ones look within
    assert pick_best(rows)["trial_id"] == "base"
    assert [r["trial_id"] for r in confirm_candidates(rows, 3, objective)] == ["full"]


# -- the benchmark's replays (scripts/bench_search.py) ------------------------------------------------------


def _script(name: str):
    """A benchmark script of scripts/ imported as a module (its own imports of its siblings included)."""
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _world(low_scores: list[float]):
    """Four schedules of a 2x2 space, each costing 100 baseline iterations at the full budget; schedule i's
    full Dice is 0.1 * i, its compressed (0.25, 25 iterations) Dice ``low_scores[i]``."""
    bs = _script("bench_search")
    keys = [bs.key({"stages": s, "mode": m}) for s in (1, 2) for m in ("resource", "performance")]
    curves = {k: [(50.0, 0.05, True), (100.0, 0.1 * i, True)] for i, k in enumerate(keys)}
    world = bs.World(curves, {k: 0.1 * i for i, k in enumerate(keys)},
                     {0.25: {k: (low_scores[i], 25.0) for i, k in enumerate(keys)}})
    space = sp.parse({"parameters": {"stages": {"type": "categorical", "choices": [1, 2]},
                                     "mode": {"type": "categorical", "choices": ["resource", "performance"]}},
                      "asha": {"fidelity": "compressed", "min_fraction": 0.25, "reduction_factor": 4},
                      "budget": {"epochs": 1, "iterations_per_epoch": 100}}, "s.yaml")
    return bs, world, space


def test_compressed_replay_spends_each_rung_and_stops_the_winner_when_low_fidelity_misranks():
    rungs = fidelity_ladder(4, 4, 0.25, 100)
    assert [(r.fraction, r.trials) for r in rungs] == [(0.25, 4), (1.0, 1)]
    # the low fidelity ranks as the full budget does: 4 x 25 + the winner's 100 = 200 of the grid's 400
    bs, world, space = _world([0.1, 0.2, 0.3, 0.4])
    for seed in range(3):
        assert bs.replay_once(world, space, "grid", "compressed", seed, 1000.0, rungs=rungs) == (0.5, False)
    # it ranks the winner last: the winner is stopped in every bracket, and within the cap never found
    bs, world, space = _world([0.4, 0.3, 0.2, 0.1])
    hit, stopped = bs.replay_once(world, space, "grid", "compressed", 0, 400.0, rungs=rungs)
    assert hit is None and stopped is True
    # without early stopping a grid finds the winner when its turn comes, at a multiple of one schedule's cost
    hit, stopped = bs.replay_once(world, space, "grid", "none", 0, 1000.0)
    assert hit in (0.25, 0.5, 0.75, 1.0) and stopped is False
    stats = bs.replay_stats([(0.1, False), (0.2, True), (None, None)], target=0.15)
    assert (stats["reached"], stats["within_target"], stats["runs_killing_grid_best"],
            stats["runs_trying_grid_best"]) == (2, 1, 1, 2)


def test_replay_scored_by_its_pick_counts_what_the_search_would_export_not_what_it_trained():
    import dataclasses

    bs, world, space = _world([0.1, 0.2, 0.3, 0.4])
    keys = sorted(world.final, key=world.final.get)  # measured Dice 0.0, 0.1, 0.2, 0.3
    # the truth prefers the third schedule; the search measures the fourth best, so it trains a hit but picks a miss
    w = dataclasses.replace(world, truth={k: v for k, v in zip(keys, (0.0, 0.0, 0.5, 0.3), strict=True)})
    for seed in range(3):
        assert bs.replay_once(w, space, "grid", "none", seed, 1000.0)[0] is not None
        assert bs.replay_once(w, space, "grid", "none", seed, 400.0, pick=True) == (None, False)
    # scored by its own runs, the pick is the best schedule: a hit at the compute where that run ended
    hits = {bs.replay_once(world, space, "grid", "none", seed, 400.0, pick=True)[0] for seed in range(6)}
    assert hits <= {0.25, 0.5, 0.75, 1.0} and None not in hits and len(hits) > 1
    # a run that ends past the compute cap is not a pick: none ends within 99 of 100 iterations
    assert bs.replay_once(world, space, "grid", "none", 0, 99.0, pick=True)[0] is None


def test_main_effects_replay_promotes_a_winner_it_never_screened():
    rungs = screening_ladder(3, 4, 0.25, 100)
    assert [(r.fraction, r.trials) for r in rungs] == [(0.25, 3), (1.0, 1)]
    # compressed Dice additive in the two parameters: any 3 screened schedules give the model, which ranks
    # the winner (2 stages, performance) first whether it was screened or not: 3 x 25 + 100 of the grid's 400
    bs, world, space = _world([0.1, 0.2, 0.2, 0.3])
    for seed in range(4):
        assert bs.replay_once(world, space, "grid", "main_effects", seed, 1000.0, rungs=rungs) == (0.4375, False)


def test_main_effects_ranking_finds_the_best_of_an_additive_score_over_a_conditional_space():
    import numpy as np

    space = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 4},
                                     "growth": {"type": "float", "low": 1.2, "high": 3.0, "log": True,
                                                "when": "stages > 1"},
                                     "mode": {"type": "categorical", "choices": ["resource", "performance"]},
                                     "batch_cap": {"value": 32}}}, "s.yaml")

    def score(c):  # growth best in the middle of its log range; stages and performance mode help
        bend = -0.2 * (math.log(c["growth"]) - math.log(math.sqrt(1.2 * 3.0))) ** 2 if "growth" in c else 0.0
        return 0.05 * c["stages"] + bend + 0.03 * (c["mode"] == "performance")

    candidates = space.grid(5)
    rng = np.random.default_rng(0)
    observed = [(c, score(c)) for c in (candidates[i] for i in rng.choice(len(candidates), 12, replace=False))]
    observed.append(({"stages": 2, "mode": "resource", "batch_cap": 32, "growth": 2.0}, math.nan))  # failed
    ranked = main_effects_ranking(space.parameters, observed, candidates)
    assert ranked[0] == max(candidates, key=score) and sorted(map(json.dumps, ranked)) == sorted(
        map(json.dumps, candidates))
    with pytest.raises(PgpsError, match="at least 2 scored schedules, got 1"):
        main_effects_ranking(space.parameters, observed[:1] + observed[-1:], candidates)


def test_benchmark_space_has_48_distinct_schedules_on_the_hippocampus_plan():
    s = sp.load(sp.resolve("bench_hippocampus_48"))
    final, pools = (40, 56, 40), (3, 3, 3)
    b = s.budget
    schedules = {sp.schedule_from_params(c, final, pools, b.batch_size, b.epochs).to_dict()["stages"].__repr__()
                 for c in s.grid()}
    assert len(s.grid()) == 48 and len(schedules) == 48
    assert {p.name for p in s.parameters if p.kind == "categorical"} == {"stages", "growth", "length_ratio", "mode"}
    assert s.asha.fidelity == "compressed"
    # the long ground truth: the same 48 curricula (16 epochs, so the same stage boundaries), 4x the iterations,
    # and a ladder of the 1/9 screen and the full budget only
    long = sp.load(sp.resolve("bench_hippocampus_48_1600"))
    assert long.grid() == s.grid() and long.budget.epochs == b.epochs
    assert long.budget.iterations_per_epoch == 4 * b.iterations_per_epoch
    assert {sp.schedule_from_params(c, final, pools, b.batch_size, b.epochs).to_dict()["stages"].__repr__()
            for c in long.grid()} == schedules
    assert [round(r.fraction, 2) for r in fidelity_ladder(48, long.asha.reduction_factor, long.asha.min_fraction,
                                                          long.budget.iterations_per_epoch)] == [0.11, 1.0]


def test_a_tpe_state_past_its_startup_trials_passes_the_resume_check(tmp_path):
    # a compressed sweep's study is past TPE's startup trials after one rung; its sampler then holds
    # Optuna's default_gamma, and resuming such a sweep must not be refused as untrusted
    import pickle

    import optuna

    from pgps_tune.tuner import vet_tune_state

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for directions in (["maximize"], ["maximize", "minimize"]):
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)
        study = optuna.create_study(sampler=sampler, directions=directions)
        n = len(directions)
        study.optimize(lambda t, n=n: [t.suggest_float("x", 0, 1)] * n, n_trials=4)
        (tmp_path / "searcher-state-1.pkl").write_bytes(pickle.dumps(sampler))
        vet_tune_state(str(tmp_path))


@pytest.mark.parametrize("runs,eta,min_fraction,ipe", [(7.2, 3, 0.111, 25), (2.0, 3, 0.111, 9), (30, 2, 0.1, 50),
                                                       (0.01, 3, 0.111, 25)])
def test_samples_for_compute_fills_the_budget(runs, eta, min_fraction, ipe):
    from pgps_tune.asha import samples_for_compute

    n = samples_for_compute(runs, eta, min_fraction, ipe)
    assert n >= 1
    assert n == 1 or ladder_compute(fidelity_ladder(n, eta, min_fraction, ipe)) <= runs
    assert ladder_compute(fidelity_ladder(n + 1, eta, min_fraction, ipe)) > runs


def test_seed_noise_spread_pools_seeds_and_scores_each_seeds_own_pick_by_the_others():
    import numpy as np

    spread = _script("bench_seed_noise").spread
    runs = {"a": {0: 0.80, 1: 0.82, 2: 0.81}, "b": {0: 0.79, 1: 0.78, 2: 0.80}, "c": {0: 0.70, 1: 0.71, 2: 0.72}}
    r = spread(runs, [0, 1, 2])  # each schedule's sd over seeds is 1 point; every seed orders them a > b > c
    assert np.isclose(r["pooled_sd"], 0.01) and np.isclose(r["rho"], 1.0)
    assert r["pick_hits"] == 3 and np.isclose(r["pick_shortfall"], 0.0)
    runs["a"], runs["b"] = {0: 0.80, 1: 0.84, 2: 0.84}, {0: 0.82, 1: 0.78, 2: 0.78}
    r = spread(runs, [0, 1, 2])  # seed 0 picks b, 6 points below a by seeds 1 and 2's mean; seeds 1 and 2 pick a
    assert r["pick_hits"] == 2 and np.isclose(r["pick_shortfall"], 0.06 / 3)


# -- scripts/bench_fidelity.py, at its smallest ---------------------------------------------------------------


def test_bench_fidelity_quick_trains_every_fidelity_once_and_reuses_its_jobs(tmp_path):
    import shutil
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_fidelity.py"

    def bench(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, str(script), "--quick", "--replay-seeds", "2", "--out", str(tmp_path / "o"),
                            "--ledger", str(tmp_path / "ledger.jsonl"), *args],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        return p

    bench("--report", str(tmp_path / "f.md"), "--startup-trials", "1", "--workers", "1")
    jobs = sorted((tmp_path / "o" / "jobs").glob("*.json"))
    assert len(jobs) == 6 * 2 * 3  # schedules x seeds x fidelities (1/9, 1/3, 1)
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {"compressed 0.111", "compressed 0.333", "partial 0.111 (always)", "partial 0.333 (final_stage)",
            "full budget (another seed)"} <= set(s["quality"])
    assert all(q["pairs"] == 2 and q["min"] <= q["rho"] <= q["max"] for q in s["quality"].values()
               if not math.isnan(q["rho"]))
    assert set(s["replays"]) == {f"{a} + {f}" for a in ("grid", "random", "tpe", "tpe (startup 1)")
                                 for f in ("none", "partial", "compressed", "main_effects")}
    assert all(r["seeds"] == 2 for r in s["replays"].values())
    assert "## Fidelity quality" in (tmp_path / "f.md").read_text()
    # scored by the pick too, also searched on seed 1's runs against the mean of both seeds
    assert set(s["picked"]) == {"seed 0, 0.5 points", "mean of seeds 0, 1, 0.5 points",
                                "searched on seed 1, mean of seeds 0, 1, 0.5 points"}
    assert all(set(c) == set(s["replays"]) and all(0 <= v <= 2 for v in c.values()) for c in s["picked"].values())
    assert "scored by its pick against the mean of seeds 0, 1" in (tmp_path / "f.md").read_text()
    grid = json.loads((tmp_path / "o" / "search" / "events.json").read_text())["events"]["grid"]
    assert sum(e["completed"] for e in grid) == 6  # the seed-0 grid, as bench_search.py --reuse grid reads it
    # an interrupted benchmark continues: only the missing run is trained again
    jobs[0].unlink()
    # (the ledger still holds it: drop it there too)
    ledger = tmp_path / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    assert len(lines) == 36 and all(json.loads(x)["job"]["data"] == "synthetic" for x in lines)
    ledger.write_text("".join(x + "\n" for x in lines if json.loads(x)["id"] != jobs[0].stem))
    assert "35 stored, 1 to train" in bench("--workers", "1").stdout
    assert len(list((tmp_path / "o" / "jobs").glob("*.json"))) == 36
    assert len(ledger.read_text().splitlines()) == 36
    # a fresh checkout (no jobs folder) rebuilds every run from the ledger and trains nothing
    shutil.rmtree(tmp_path / "o")
    out = bench("--no-train").stdout
    assert "36 runs restored" in out and "36 stored, 0 to train" in out
    # one training seed (a long-budget ground truth): quality against that seed, no seed-pair row; another
    # ledger's full runs as a fidelity (here the same budget's, so seed 0's row ranks exactly as the truth)
    bench("--no-train", "--seeds", "1", "--shorter", str(ledger), "--report", str(tmp_path / "one.md"))
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert "full budget (another seed)" not in s["quality"] and all(q["pairs"] == 1 for q in s["quality"].values())
    same = s["quality"]["shorter budget (27 iterations, seed 0)"]["rho"]
    assert "shorter budget (27 iterations, seed 1)" in s["quality"] and (math.isnan(same) or math.isclose(same, 1))
    assert set(s["picked"]) == {"seed 0, 0.5 points"}
    assert "scored by its pick against seed 0's grid" in (tmp_path / "one.md").read_text()
    # a damaged ledger is refused in one line
    read_ledger = _script("bench_fidelity").read_ledger
    for bad in ("not json", "[1]", '"x"', '{"id": "abc"}'):
        ledger.write_text(lines[1] + "\n" + bad + "\n")
        with pytest.raises(SystemExit, match="line 2, is not a run record"):
            read_ledger(ledger)
