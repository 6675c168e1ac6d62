"""The whole sweep's ETA: what each phase plans before it starts, and the clock that prices what is left.

Pure arithmetic and stand-in trials: no Ray cluster, no training.
"""

import io
import json
import types

import pytest

from pgps_tune import space as spaces
from pgps_tune.tuner import (
    ConfirmSettings,
    PhasePlan,
    Progress,
    SweepEta,
    SweepOptions,
    _callbacks,
    confirm_plan,
    full_budget_schedules,
    plan_event,
    plan_text,
    resumed_lines,
    search_plans,
)

BUDGET = {"epochs": 10, "iterations_per_epoch": 9, "batch_size": 2, "final_patch": [16, 16, 16], "pools": [3, 3, 3]}


def _space(**sections) -> spaces.SearchSpace:
    raw = {"name": "s", "parameters": {"stages": {"value": 2}, "growth": {"type": "float", "low": 1.5, "high": 2.0}},
           "budget": BUDGET, **sections}
    return spaces.parse(raw, "s.yaml")


def test_asha_or_a_compute_cap_makes_the_search_an_upper_bound():
    (asha,) = search_plans(_space(), num_samples=12)
    assert (asha.phase, asha.trials, asha.trial_compute, asha.bound) == ("search", 12, 90.0, True)
    assert asha.compute(0.5) == 12 * 0.5 * 90  # every trial priced as if ASHA let it run to the end
    (capped,) = search_plans(_space(asha={"enabled": False}, search={"max_compute": 3}), num_samples=12)
    assert capped.bound and capped.compute(1.0) == 3 * 90 and capped.compute(0.1) == pytest.approx(12 * 0.1 * 90)
    (whole,) = search_plans(_space(asha={"enabled": False}), num_samples=12)
    assert not whole.bound and whole.compute(1.0) == 12 * 90
    (pareto,) = search_plans(_space(objective={"type": "pareto"}), num_samples=12)
    assert not pareto.bound  # a pareto sweep turns ASHA off


def test_a_compressed_ladder_plans_each_rung_at_its_own_budget():
    plans = search_plans(_space(asha={"fidelity": "compressed", "reduction_factor": 3, "min_fraction": 1 / 9}),
                         num_samples=27)
    # 27 schedules at 1 of 9 iterations per epoch, the best 9 at 3 of 9, the best 3 at the full budget
    assert [(p.phase, p.trials, p.trial_compute, p.bound) for p in plans] == [
        ("search", 27, 10.0, False), ("search-r1", 9, 30.0, False), ("search-r2", 3, 90.0, False)]
    assert sum(p.compute(1.0) for p in plans) == 27 * 10 + 9 * 30 + 3 * 90


def test_plans_count_no_more_schedules_than_the_space_has_or_the_model_ranks():
    """A 2-schedule space: a rung above the first, main-effects promotion and the confirmation train each schedule
    once, so promote_top 5, a ladder's 3 survivors or top_k 3 plan 2 (the first rung runs all its trials: a
    sampler may suggest a schedule again)."""
    two = {"stages": {"type": "categorical", "choices": [1, 2]}, "growth": {"value": 2.0}}

    def plans(asha: dict, n: int) -> list:
        space = spaces.parse({"name": "s", "parameters": two, "budget": BUDGET,
                              "asha": {"fidelity": "compressed", "min_fraction": 0.25, **asha}}, "s.yaml")
        return search_plans(space, n), space

    (screen, top), space = plans({"promote": "main_effects", "promote_top": 5, "reduction_factor": 4}, 3)
    assert (screen.trials, top.trials) == (3, 2)
    ladder, space = plans({"reduction_factor": 2}, 9)
    assert [p.trials for p in ladder] == [9, 2, 2]  # 9 at 0.25, 4 -> 2 at 0.5, 2 at the full budget
    assert full_budget_schedules(space, ladder) == 2
    confirm = confirm_plan(ConfirmSettings(top_k=3, epochs=10, seeds=2), 9, [1.0, 0.4], searched=2)
    assert confirm.trials == 2 * (2 + 2)
    # once the sweep knows fewer come (one promoted, one candidate), the phases still to come plan that many
    eta = SweepEta([*ladder, confirm])
    eta.at_most(["search-r2", "confirm"], 1)
    assert [p.trials for p in eta.plans] == [9, 2, 1, 2 * (2 + 1)]
    # a space with a float range has no such bound; a partial search plans all its trials
    assert full_budget_schedules(_space(), search_plans(_space(), 12)) == 12


def test_the_confirmation_plans_candidates_and_references_on_every_repeat():
    plan = confirm_plan(ConfirmSettings(top_k=2, epochs=20, seeds=3), iterations_per_epoch=9, references=[1.0, 0.4])
    assert (plan.phase, plan.trials, plan.trial_compute) == ("confirm", 3 * (2 + 2), 180.0)
    # the references' cost is known; the two candidates per seed are priced at the searched mean
    assert plan.compute(0.5) == pytest.approx((3 * (1.0 + 0.4) + 3 * 2 * 0.5) * 180)
    folds = confirm_plan(ConfirmSettings(top_k=1, epochs=20, folds=5), 9, [1.0, 0.4])
    assert folds.trials == 5 * 3 and not folds.bound


def test_the_sweeps_eta_counts_each_trials_start_up_the_concurrency_and_the_pauses_between_phases():
    """Measured on MSD Hippocampus (the quick space, 2 at once): a rate of compute from the first report on left
    out every later trial's start-up and the pauses between phases, and promised half the time the sweep took."""
    eta = SweepEta([PhasePlan("references", 2, 100.0, known=(1.0, 1.0)), PhasePlan("search", 2, 100.0),
                    PhasePlan("confirm", 3, 100.0, known=(0.5,) * 3)])
    assert eta.eta("references", {}, [100.0, 100.0], False, 0.0) == (None, False, 550.0)  # nothing timed yet
    for trial in ("a", "b"):  # two at once, 15 s to a first report of 20 iterations, then 2 a second
        eta.started("references", trial, 0.0)
        eta.clock.report(f"references/{trial}", 20.0, 15.0)
        eta.clock.report(f"references/{trial}", 60.0, 35.0)
    # the references' 20 s left, then the search's 2 trials side by side (5 s of start-up + 50 s each), then
    # the confirmation's 3 (5 + 25 s each) two at a time
    assert eta.eta("references", {"a": 40.0, "b": 40.0}, [], False, 35.0) == (20 + 55 + 2 * 30, False, 430.0)
    for trial in ("a", "b"):
        eta.clock.report(f"references/{trial}", 100.0, 55.0)
        eta.ended("references", trial, 55.0)
    eta.started("search", "s", 65.0)  # 10 s between the phases: each phase to come starts as late
    assert eta.eta("search", {"s": 100.0}, [100.0], False, 65.0)[0] == 55 + 10 + 2 * 30
    assert eta.left("a phase not in the plan", 10.0, True) == (10.0, True)  # nothing planned after it


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import pgps_tune.tuner as tuner

    c = Clock()
    monkeypatch.setattr(tuner.time, "time", c)
    monkeypatch.setattr(Progress, "sweep_eta", None)  # restored after the test: a class attribute
    return c


def _trial(tid: str, last: dict | None = None):
    return types.SimpleNamespace(trial_id=tid, config={}, last_result=last or {})


def _result(compute: float, fraction: float, role: str, completed: bool = False) -> dict:
    return {"stage": 0, "n_stages": 1, "val_dice": 0.5, "score": 0.5, "baseline_iterations": compute,
            "schedule_voxel_fraction": fraction, "role": role, "completed": completed}


def _complete(progress: Progress, trial, result: dict) -> None:
    """What Tune calls when a trial ends: its last result, then its completion."""
    trial.last_result = result
    progress.on_trial_result(0, [], trial, result)
    progress.on_trial_complete(0, [], trial)


def test_progress_states_the_whole_sweeps_eta_across_phases(clock):
    plans = [PhasePlan("references", 2, 100.0, known=(1.0, 0.4)), PhasePlan("search", 4, 100.0, bound=True),
             confirm_plan(ConfirmSettings(top_k=1, epochs=20, seeds=2), 10, [1.0, 0.4])]
    Progress.sweep_eta = SweepEta(plans)
    out = io.StringIO()
    refs = Progress(total=2, phase="references", mode="json", trial_compute=100.0)
    refs.stream = out
    b = _trial("b")
    refs.on_trial_start(0, [], b)
    clock.now += 10
    refs.on_trial_result(0, [], b, _result(50.0, 1.0, "baseline"))
    event = json.loads(out.getvalue().splitlines()[-1])
    # left: the references' 120 (the baseline's other half, the paper schedule priced at the plan's mean 0.7),
    # the search's 4 x 100 (no searched schedule seen: the baseline's cost), the confirmation's
    # 2 seeds x (1.0 + 0.4 + 1 candidate at 1.0) x 200
    left = (50 + 0.7 * 100) + 4 * 100 + 2 * 2.4 * 200
    assert event["sweep_compute_left"] == pytest.approx(left)
    # a first report times the start-up, not a speed: its compute over the 10 s since the start would take
    # the start-up for training
    assert event["sweep_eta_s"] is None and event["eta_s"] is None and event["sweep_eta_upper_bound"] is True
    clock.now += 10
    refs.on_trial_result(0, [], b, _result(75.0, 1.0, "baseline"))
    event = json.loads(out.getvalue().splitlines()[-1])
    # 25 iterations in the 10 s since, one at a time; its first report took no longer (no start-up to add)
    assert event["sweep_eta_s"] == pytest.approx((left - 25) / 2.5)
    assert event["eta_s"] == pytest.approx((25 + 0.7 * 100) / 2.5)

    # the search starts: no rate of its own yet, but the sweep's clock has one
    p = _trial("p")
    refs.on_trial_start(0, [], p)
    clock.now += 10
    _complete(refs, b, _result(100.0, 1.0, "baseline", completed=True))
    _complete(refs, p, _result(40.0, 0.4, "paper", completed=True))
    search = Progress(total=4, phase="search", mode="live", trial_compute=100.0, upper_bound=True)
    search.stream = out = io.StringIO()
    s1 = _trial("s1")
    search.on_trial_start(0, [], s1)
    header = out.getvalue().splitlines()[0]
    # 2 trials have run at once: the search's 4 x 40 s (at the baseline's cost) 2 at a time, then the
    # confirmation's 6 x 64 s: 272 s
    assert header.endswith("0s elapsed, ETA ?; sweep ETA <= 4m32s"), header
    # once a searched schedule reports its cost (0.5), the search and the confirmation's candidate take it
    clock.now += 10
    search.on_trial_result(0, [], s1, _result(25.0, 0.5, "search"))
    assert search.sweep()[2] == pytest.approx((4 * 0.5 * 100 - 25) + 2 * (1.4 + 0.5) * 200)
    # the phase's first report: no speed of its own yet; the sweep's: s1's 10 s left and 3 x 20 s, 2 at a time
    # (40 s), the confirmation's 6 x (760 / 6 / 2.5) s, 2 at a time (152)
    assert search.header().endswith("ETA ?; sweep ETA <= 3m12s"), search.header()
    clock.now += 10
    search.on_trial_result(0, [], s1, _result(50.0, 0.5, "search"))
    assert search.header().endswith("at most 1m00s left; sweep ETA <= 3m12s"), search.header()


def test_the_last_phase_says_its_eta_is_expected_not_a_bound(clock):
    Progress.sweep_eta = SweepEta([confirm_plan(ConfirmSettings(top_k=1, epochs=2, seeds=1), 10, [1.0, 0.4])])
    out = io.StringIO()
    confirm = Progress(total=3, phase="confirm", mode="lines", trial_compute=20.0)
    confirm.stream = out
    a = _trial("a")
    confirm.on_trial_start(0, [], a)
    clock.now += 5
    confirm.on_trial_result(0, [], a, _result(10.0, 1.0, "baseline"))
    clock.now += 5
    _complete(confirm, a, _result(20.0, 1.0, "baseline", completed=True))
    # two trials left at the plan's mean fraction (1.0 + 0.4 + 1.0) / 3 of 20 iterations, at 2 a second
    last = out.getvalue().splitlines()[-1]
    assert last.endswith("1/3 a completed: Dice 0.500 score 0.500 (16s left; sweep ETA ~16s)"), last
    for tid in ("b", "c"):
        x = _trial(tid)
        confirm.on_trial_start(0, [], x)
        _complete(confirm, x, _result(20.0, 0.4, "paper", completed=True))
    assert out.getvalue().splitlines()[-1].endswith("3/3 c completed: Dice 0.500 score 0.500")  # nothing left


def test_a_phase_prices_its_trials_at_its_own_budget(clock, tmp_path):
    space = _space(asha={"fidelity": "compressed", "reduction_factor": 3, "min_fraction": 1 / 9})
    opts = SweepOptions(space=space, data="synthetic", out=tmp_path / "sweep")
    Progress.sweep_eta = SweepEta(search_plans(space, 27))
    assert [_callbacks(phase, opts, "x", 9, None, None)[0].trial_compute for phase in ("search", "search-r1")] \
        == [10.0, 30.0]  # 10 epochs at 1 and at 3 of 9 iterations per epoch, not the full budget's 90
    Progress.sweep_eta = None
    assert _callbacks("search", opts, "x", 9, None, None)[0].trial_compute == 90.0


def _experiment(folder, trials: list[tuple[str, str, dict]]) -> None:
    """A Tune experiment state of ``trials`` (id, status, last result), as Tune writes it (JSON in JSON)."""
    folder.mkdir(parents=True)
    data = [[json.dumps({"trial_id": tid, "status": status, "config": {}, "experiment_tag": f"{n + 1}_x"}),
             json.dumps({"last_result": last, "num_failures": 0})] for n, (tid, status, last) in enumerate(trials)]
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))


def test_the_plan_of_a_resumed_sweep_says_what_is_left_and_what_was_done(tmp_path):
    def did(compute, fraction, **last):
        return {"baseline_iterations": compute, "schedule_voxel_fraction": fraction, **last}

    _experiment(tmp_path / "s-references", [("r1", "TERMINATED", did(100.0, 1.0, completed=True)),
                                            ("r2", "TERMINATED", did(40.0, 0.4, completed=True))])
    _experiment(tmp_path / "s-search", [("a", "TERMINATED", did(50.0, 0.5, completed=True)),
                                        ("b", "ERROR", did(20.0, 1.0)), ("c", "RUNNING", did(30.0, 0.5))])
    before = {"sweep": "s", "experiments": {"references": "s-references", "search": "s-search"},
              "pending_confirm": {"key": "confirm"}}  # a confirmation Tune has not started yet
    plans = [PhasePlan("references", 2, 100.0, known=(1.0, 0.4)), PhasePlan("search", 4, 100.0),
             PhasePlan("confirm", 2, 50.0)]
    done = resumed_lines(before, plans, None, str(tmp_path))
    # left: c's rest (0.5 x 100 - 30) and one search trial not started (the baseline's 100), the confirmation (100)
    text = plan_text(plans, done)
    assert text.startswith("pgps-tune: plan: left of the resumed sweep: references 0 of 2 trials, search 2 of 4 "
                           "trials, confirm 2 trials: about 220 baseline-equivalent iterations (done before the "
                           "resume: 4 trials ended, 240 iterations trained)"), text
    event = plan_event(plans, done)
    assert [(p["trials"], p["trials_done"], p["compute_done"], p["compute_left"]) for p in event["phases"]] == [
        (2, 2, 140.0, 0.0), (4, 2, 100.0, 120.0), (2, 0, 0.0, 100.0)]
    assert (event["compute"], event["compute_done"], event["compute_left"]) == (640.0, 240.0, 220.0)
    # a new sweep's plan is the whole sweep's, as before
    assert plan_text(plans).startswith("pgps-tune: plan: references 2 trials, search 4 trials, confirm 2 trials: "
                                       "about 640 baseline-equivalent iterations (searched")
    assert "compute_done" not in plan_event(plans)
