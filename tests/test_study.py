"""A sweep's Optuna study: a journal in the sweep folder that a resume continues and a warm start seeds.

One tiny Pareto sweep carries the assertions of the front's exports, the persistent study and
the warm start (a second sweep of the same space seeded from the store the first one filled).
"""

import json
import math

import optuna
import pyarrow.parquet as pq
import pytest
from test_tuner import BUDGET, error_line, write_space

from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.pareto import non_dominated, parse_pick, pick
from pgps_tune.tuner import STUDY_FILE, WARM_ATTR, study_storage

TINY = {**BUDGET, "iterations_per_epoch": 2, "val_every": 5}  # 10 epochs: the paper schedule has 10 stages


def study_trials(out):
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["study_file"] == STUDY_FILE
    return optuna.load_study(study_name=meta["study"], storage=study_storage(out)).get_trials()


def test_pareto_sweep_exports_its_front_and_keeps_one_study_across_resume_and_warm_start(
        shared_ray, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    space = write_space(tmp_path / "s.yaml", objective={"type": "pareto"}, budget=TINY,
                        search={"num_samples": 3, "startup_trials": 2, "references": False})
    out = tmp_path / "sweep"
    cmd = ["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--max-concurrent", "1", "--quiet"]
    assert main(cmd) == 0
    printed = capsys.readouterr()
    assert "ASHA early stopping is off" in printed.err and "Pareto front:" in printed.out

    # the study in the sweep folder holds every search trial once, told both objectives
    trials = study_trials(out)
    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == len(table) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(tuple(t.values) for t in trials) == sorted(
        (r["final_dice"], r["schedule_voxel_fraction"]) for r in table)
    assert all(r["completed"] for r in table)  # no ASHA: every trial ran to its end

    # the front: the non-dominated completed trials, each exported as a schedule file
    points = [(r["final_dice"], r["schedule_voxel_fraction"]) for r in table]
    front = pq.read_table(out / "pareto.parquet").to_pylist()
    assert [r["trial_id"] for r in front] == [table[i]["trial_id"] for i in non_dominated(points)]
    assert sorted(p.name for p in (out / "pareto").iterdir()) == sorted(f"{r['trial_id']}.yaml" for r in front)
    for r in front:
        s = sch.load(out / r["file"])
        assert s.to_dict()["stages"] == json.loads(r["schedule"])["stages"]
        assert s.meta["val_dice"] == r["final_dice"] and s.meta["voxel_fraction"] == r["schedule_voxel_fraction"]
    knee = table[pick(points, parse_pick("knee"))]["trial_id"]  # the space's default rule
    assert [r["trial_id"] for r in front if r["picked"]] == [knee]
    assert sch.load(out / "best_schedule.yaml").meta["trial_id"] == knee

    # export --pick chooses another front schedule as the best
    again = tmp_path / "again"
    assert main(["export", "--experiment", str(out), "--out", str(again), "--pick", "cheapest_within=0.01"]) == 0
    cheapest = table[pick(points, parse_pick("cheapest_within=0.01"))]["trial_id"]
    assert sch.load(again / "best_schedule.yaml").meta["trial_id"] == cheapest
    assert json.loads((again / "summary.json").read_text())["pareto"]["pick"] == "cheapest_within=0.01"
    assert main(["export", "--experiment", str(out), "--out", str(again), "--pick", "cheapest"]) == 2
    assert "--pick 'cheapest' unknown" in error_line(capsys.readouterr().err)

    # tune --resume of the finished sweep continues the same study: nothing asked again, nothing lost
    assert main([*cmd, "--resume"]) == 0
    assert [(t.number, t.values) for t in study_trials(out)] == [(t.number, t.values) for t in trials]

    # a second sweep of the same space, warm-started from the store the first one joined
    capsys.readouterr()
    second = tmp_path / "second"
    warm = ["tune", "--space", str(space), "--data", "synthetic", "--out", str(second), "--num-samples", "1",
            "--quiet", "--warm-start"]
    assert main(warm) == 0
    assert "warm start: 3 earlier trials of synthetic added to the study (0 already in it), from sweep(s) sweep" \
        in capsys.readouterr().err
    seeded = study_trials(second)
    added = [t for t in seeded if WARM_ATTR in t.user_attrs]
    assert sorted(t.user_attrs[WARM_ATTR] for t in added) == sorted(f"sweep/{r['trial_id']}" for r in table)
    assert sorted(tuple(t.values) for t in added) == sorted(points)
    assert len(seeded) == 4 and seeded[-1].state == optuna.trial.TrialState.COMPLETE  # then its own trial

    # a store without trials of this space and budget: one line, before anything runs
    third = tmp_path / "third"
    assert main([*warm[:6], str(third), "--warm-start", "--epochs", "11"]) == 2
    assert "--warm-start: the results store" in error_line(capsys.readouterr().err)
    assert not third.exists()


def test_warm_start_adds_each_stored_trial_once_and_refuses_one_that_does_not_fit(tmp_path):
    from pgps_tune import space as sp
    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import warm_start

    space = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3},
                                     "growth": {"type": "float", "low": 1.5, "high": 2.5, "when": "stages > 1"},
                                     "mode": {"value": "resource"}}})
    rows = [{"sweep": "old", "trial_id": "t1", "params": json.dumps({"stages": 1, "mode": "resource"}),
             "score": 0.5, "final_dice": 0.5, "schedule_voxel_fraction": 1.0},
            {"sweep": "old", "trial_id": "t2", "params": json.dumps({"stages": 2, "growth": 2.0, "mode": "resource"}),
             "score": 0.6, "final_dice": 0.6, "schedule_voxel_fraction": 0.6}]
    study = optuna.create_study(direction="maximize", storage=study_storage(tmp_path), study_name="s")
    assert warm_start(study, space, rows) == 2
    assert warm_start(study, space, rows) == 0  # a resumed sweep runs the same command again
    assert [(t.params, t.value) for t in study.trials] == [({"stages": 1}, 0.5), ({"stages": 2, "growth": 2.0}, 0.6)]
    assert study.best_trial.user_attrs[WARM_ATTR] == "old/t2"
    outside = {**rows[1], "trial_id": "t3", "params": json.dumps({"stages": 5, "growth": 2.0})}
    with pytest.raises(PgpsError, match="stored trial old/t3 does not fit this space"):
        warm_start(study, space, [outside])


@pytest.mark.parametrize("objective", ["pareto", "score"])
def test_a_finished_trial_told_again_after_a_resume_is_told_once(tmp_path, objective):
    from pgps_tune import space as sp
    from pgps_tune.tuner import DefineByRun, PrunedAwareOptunaSearch

    space = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3}},
                      **({"objective": {"type": "pareto"}} if objective == "pareto" else {})})
    if objective == "pareto":
        metric, mode = ["val_dice", "schedule_voxel_fraction"], ["max", "min"]
    else:  # one objective: intermediate reports go to Optuna too, and a finished trial refuses them
        metric, mode = "score", "max"

    def result(dice, fraction, epoch, **more):
        return {"val_dice": dice, "schedule_voxel_fraction": fraction, "score": dice, "training_iteration": epoch,
                **more}

    def searcher():
        return PrunedAwareOptunaSearch(DefineByRun(space), metric=metric, mode=mode, study_name="s",
                                       storage=study_storage(tmp_path), sampler=optuna.samplers.RandomSampler(0))

    first = searcher()
    for tid in ("a", "b"):
        first.suggest(tid)
    first.on_trial_result("a", result(0.5, 0.4, 1))
    first.save(str(tmp_path / "state.pkl"))  # the state a kill leaves: both trials asked, none finished
    first.on_trial_result("a", result(0.7, 0.4, 2))
    first.on_trial_complete("a", result(0.7, 0.4, 2, completed=True))
    first.suggest("c")  # asked after the state was saved: Tune will not know it
    resumed = searcher()
    resumed.restore(str(tmp_path / "state.pkl"))
    # Tune reruns "a" from its checkpoint (its reports and end told again) and finishes "b"
    resumed.on_trial_result("a", result(0.71, 0.4, 2))
    resumed.on_trial_complete("a", result(0.71, 0.4, 2, completed=True))
    resumed.on_trial_result("b", result(0.6, 0.2, 1))
    resumed.on_trial_complete("b", result(0.6, 0.2, 1, completed=True))
    trials = optuna.load_study(study_name="s", storage=study_storage(tmp_path)).get_trials()
    states = optuna.trial.TrialState
    one = objective == "score"
    assert [(t.state, t.values) for t in trials] == [
        (states.COMPLETE, [0.7] if one else [0.7, 0.4]), (states.COMPLETE, [0.6] if one else [0.6, 0.2]),
        (states.FAIL, None)]
    assert [t.intermediate_values for t in trials] == ([{1: 0.5, 2: 0.7}, {1: 0.6}, {}] if one else [{}] * 3)
    assert not any(math.isnan(v) for t in trials if t.values for v in t.values)


def test_a_store_written_before_space_keys_still_reads_and_warm_starts_from_the_new_rows(tmp_path):
    import pyarrow as pa

    from pgps_tune.errors import PgpsError
    from pgps_tune.results import SCHEMA, load_store, store_sweep, stored_trials

    row = {c: None for c in SCHEMA.names} | {"trial_id": "t", "role": "search", "completed": True, "score": 0.5,
                                              "params": "{}"}
    meta = {"objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "dataset": "d", "sweep": "new",
            "space_key": "k1"}
    store_sweep(pa.Table.from_pylist([row], schema=SCHEMA), meta, tmp_path)
    old = tmp_path / "dataset=d" / "sweep=old"  # a file of an earlier version: no space_key column
    store_sweep(pa.Table.from_pylist([row], schema=SCHEMA), {**meta, "sweep": "old"}, tmp_path)
    table = pq.read_table(old / "part-0.parquet")
    pq.write_table(table.drop_columns(["space_key"]), old / "part-0.parquet")
    t = load_store(tmp_path)
    assert sorted(zip(t["sweep"].to_pylist(), t["space_key"].to_pylist())) == [("new", "k1"), ("old", "")]
    assert [r["sweep"] for r in stored_trials("d", "k1", [16, 16, 16], tmp_path)] == ["new"]
    with pytest.raises(PgpsError, match="--warm-start: the results store .* no completed trials of dataset 'd'"):
        stored_trials("d", "k1", [32, 32, 32], tmp_path)
    with pytest.raises(PgpsError, match="--warm-start: results store .* does not exist"):
        stored_trials("d", "k1", [16, 16, 16], tmp_path / "none")


def test_warm_start_leaves_out_the_sweeps_own_rows_by_origin_whatever_name_the_store_gave_them(tmp_path, capsys):
    import pyarrow as pa

    from pgps_tune.results import ORIGIN, SCHEMA, store_sweep, stored_trials
    from pgps_tune.tuner import FOLDER_KEY, own_origins

    def row(tid):
        return {c: None for c in SCHEMA.names} | {"trial_id": tid, "role": "search", "completed": True,
                                                  "score": 0.5, "params": "{}"}

    meta = {"objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "dataset": "d", "sweep": "demo",
            "space_key": "k"}
    store = tmp_path / "store"
    other, mine = tmp_path / "projA" / "demo", tmp_path / "projB" / "demo"
    store_sweep(pa.Table.from_pylist([row("a1")], schema=SCHEMA), meta, store, other)
    store_sweep(pa.Table.from_pylist([row("b1")], schema=SCHEMA), meta, store, mine)  # stored as demo-HASH
    assert "is stored as 'demo-" in capsys.readouterr().err
    found = stored_trials("d", "k", [16, 16, 16], store, exclude_sweep="demo", exclude_origins=own_origins(mine, None))
    assert [r["trial_id"] for r in found] == ["a1"]  # not its own b1 under demo-HASH; the other 'demo' is kept
    moved = tmp_path / "moved" / "demo"  # a moved copy resumes: the rows stored from where it was written are its own
    found = stored_trials("d", "k", [16, 16, 16], store, exclude_sweep="demo",
                          exclude_origins=own_origins(moved, {FOLDER_KEY: str(mine.resolve())}))
    assert [r["trial_id"] for r in found] == ["a1"]
    part = store / "dataset=d" / "sweep=demo" / "part-0.parquet"  # rows stored before origins: told by name
    pq.write_table(pq.read_table(part).drop_columns([ORIGIN]), part)
    found = stored_trials("d", "k", [16, 16, 16], store, exclude_sweep="other",
                          exclude_origins=own_origins(mine, None))
    assert [r["trial_id"] for r in found] == ["a1"]
    with pytest.raises(Exception, match="no completed trials"):
        stored_trials("d", "k", [16, 16, 16], store, exclude_sweep="demo", exclude_origins=own_origins(mine, None))


def test_warm_start_takes_searched_trials_once_not_confirmation_repeats(tmp_path, capsys):
    # a confirmed candidate's repeats (role search, other seeds, maybe 'confirm --epochs 12') are not search scores
    import pyarrow as pa

    from pgps_tune.results import SCHEMA, store_sweep, stored_trials

    def row(tid, phase, params):
        return {c: None for c in SCHEMA.names} | {"trial_id": tid, "phase": phase, "role": "search",
                                                  "completed": True, "score": 0.5, "params": json.dumps(params)}

    rows = [row("s1", "search", {"stages": 2}), row("c1", "confirm", {"stages": 2, "seed": 1, "epochs": 12}),
            row("old", None, {"stages": 3})]  # a row stored before the phase column
    meta = {"objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "dataset": "d", "sweep": "a",
            "space_key": "k"}
    store_sweep(pa.Table.from_pylist(rows, schema=SCHEMA), meta, tmp_path, tmp_path / "a")
    assert sorted(r["trial_id"] for r in stored_trials("d", "k", [16, 16, 16], tmp_path)) == ["old", "s1"]
    # a copy of the sweep folder, confirmed or exported from where it lies, is stored beside it as a-HASH
    store_sweep(pa.Table.from_pylist(rows, schema=SCHEMA), meta, tmp_path, tmp_path / "copy")
    assert sorted(r["trial_id"] for r in stored_trials("d", "k", [16, 16, 16], tmp_path)) == ["old", "s1"]
