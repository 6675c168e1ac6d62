"""What a person (or a log parser) sees while a sweep or a run goes on, and the words of its summary.

Pure formatting and event handling, with stand-in trials: no Ray cluster, no training.
"""

import io
import json
import re
import types

import pyarrow as pa
import pytest

from pgps_tune import schedule as sch
from pgps_tune.cli import _data, _TrainProgress, main, progress_mode
from pgps_tune.report import LEARNED_DICE, summary_lines
from pgps_tune.results import SCHEMA, best_schedule, store_sweep
from pgps_tune.tuner import Progress, TrialClock, TrialLine, progress_table

# -- the sweep's progress -----------------------------------------------------------------------------


class Clock:
    """A stand-in for time.time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trial(tid: str, config: dict | None = None, last: dict | None = None):
    return types.SimpleNamespace(trial_id=tid, config=config or {"stages": 2}, last_result=last or {})


def _result(stage: int, dice: float, compute: float, fraction: float = 0.5) -> dict:
    return {"stage": stage, "n_stages": 3, "patch_x": 8 * (stage + 1), "patch_y": 16, "patch_z": 16,
            "val_dice": dice, "baseline_iterations": compute, "schedule_voxel_fraction": fraction, "score": dice}


@pytest.fixture
def clock(monkeypatch):
    import pgps_tune.tuner as tuner

    c = Clock()
    monkeypatch.setattr(tuner.time, "time", c)
    return c


def _drive(progress: Progress, clock: Clock) -> None:
    """Two trials of a 3-trial phase: one completes, one is still running; 100 baseline iterations a trial."""
    a, b = _trial("a"), _trial("b")
    progress.on_trial_start(0, [], a)
    progress.on_trial_start(0, [], b)
    clock.now += 10
    progress.on_trial_result(0, [], a, _result(0, 0.2, 20.0))
    progress.on_trial_result(0, [], b, _result(1, 0.4, 30.0))
    clock.now += 10
    a.last_result = {**_result(2, 0.6, 50.0), "completed": True}
    progress.on_trial_result(0, [], a, a.last_result)
    progress.on_trial_complete(0, [], a)


def test_json_lines_are_one_parseable_event_each_with_the_compute_clock(clock):
    out = io.StringIO()
    progress = Progress(total=3, phase="search", mode="json", trial_compute=100.0)
    progress.stream = out
    _drive(progress, clock)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "start", "result", "result", "result", "complete"]
    last = events[-1]
    assert last["trial"] == "a" and last["status"] == "completed" and last["val_dice"] == 0.6
    assert last["stage"] == 2 and last["stages"] == 3 and last["patch"] == "24x16x16"
    # done: a's 50 + b's 30; expected: a's 50, b at its fraction 0.5 of 100, the unstarted one at the mean 0.5
    assert last["compute_done"] == 80.0 and last["compute_expected"] == 150.0
    assert last["trials_done"] == 1 and last["trials_total"] == 3
    # a trial's speed is a's 30 iterations in the 10 s between its reports; the rest of its 20 s (20 - 50 / 3)
    # is a trial's overhead: b is due (20 left, 10 s since its report), the unstarted one takes 10/3 + 50/3 s
    assert last["elapsed_s"] == 20.0 and last["eta_s"] == pytest.approx(20.0)
    assert events[0]["eta_s"] is None  # no report yet: no speed, and null (strict JSON), not NaN
    assert events[2]["eta_s"] is None and events[3]["eta_s"] is None  # first reports: mostly start-up


def test_live_mode_redraws_one_table_in_place(clock):
    out = io.StringIO()
    progress = Progress(total=3, phase="search", mode="live", trial_compute=100.0, upper_bound=True)
    progress.stream = out
    _drive(progress, clock)
    frames = out.getvalue().split("\x1b[")
    final = out.getvalue().rsplit("\x1b[J", 1)[-1]
    assert len(frames) > 5  # every event after the first moved the cursor up over the old table
    lines = final.splitlines()
    assert lines[0].startswith("search: 1 of 3 trials done, compute 80 of ~150 baseline iterations, 20s elapsed")
    assert lines[0].endswith("at most 20s left")  # early stopping: an upper bound
    assert re.match(r"trial\s+phase\s+stage\s+patch\s+Dice\s+status", lines[1])
    assert re.match(r"b\s+search\s+2/3\s+16x16x16\s+0\.400\s+running", lines[2])  # running first
    assert re.match(r"a\s+search\s+3/3\s+24x16x16\s+0\.600\s+completed", lines[3])
    # between events the clock ticks on: Tune's steps redraw the table at most once a second
    drawn = out.getvalue()
    progress.on_step(0, [])
    assert out.getvalue() == drawn
    clock.now += 1
    progress.on_step(0, [])
    assert out.getvalue().rsplit("\x1b[J", 1)[-1].startswith("search: 1 of 3 trials done, compute 80 of ~150 "
                                                             "baseline iterations, 21s elapsed")


def test_plain_lines_and_quiet(clock):
    out = io.StringIO()
    progress = Progress(total=3, phase="references", mode="lines", trial_compute=100.0)
    progress.stream = out
    _drive(progress, clock)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and len(lines) == 3  # starts and ends only, no per-report noise
    assert lines[0].endswith("references: start a stages=2")
    assert lines[2].endswith("1/3 a completed: Dice 0.600 score 0.600 (20s left)")
    over = _trial("c", last={"completed": True, "infeasible": True, "score": -1.0, "val_dice": 0.0})
    progress.on_trial_start(0, [], over)
    progress.on_trial_complete(0, [], over)
    # b's 20 left at 3 a second were due by now: what is left is its end (no negative time)
    assert out.getvalue().splitlines()[-1].endswith("2/3 c over the voxel budget: not trained (0s left)")
    assert progress.trials["c"].status == "over budget"
    quiet = Progress(total=3, phase="search", mode="none", trial_compute=100.0)
    quiet.stream = out = io.StringIO()
    _drive(quiet, clock)
    assert out.getvalue() == ""


def test_a_resumed_progress_takes_the_resuming_commands_mode_and_rate(clock):
    import pickle

    progress = Progress(total=3, phase="search", mode="live", trial_compute=100.0)
    _drive(progress, clock)
    clock.now += 500
    with Progress.resuming("json"):
        back = pickle.loads(pickle.dumps(progress))
    assert back.mode == "json" and back.clock.trials == {} and back.t0 == clock.now
    # scoped to the resume: a sweep run after it in this process (a notebook, the tests) kept 'json'
    assert (Progress.resumed_mode, Progress.resumed_trials) == (None, ())
    later = Progress(total=1, phase="search", mode="lines", trial_compute=1.0)
    assert pickle.loads(pickle.dumps(later)).mode == "lines"
    with pytest.raises(KeyboardInterrupt), Progress.resuming("none", (TrialLine("a", "search"),)):
        raise KeyboardInterrupt  # a resume stopped while Tune restores
    assert (Progress.resumed_mode, Progress.resumed_trials) == (None, ())
    assert back.eta() is None  # no report since the resume: no rate yet
    b = _trial("b")
    back.on_trial_start(0, [], b)  # the trial goes on from its checkpoint (30 of its 50)
    clock.now += 10
    # its first report since the resume (Tune's counts say so): the compute in it was partly done before, so it
    # times neither a start-up nor a speed
    back.on_trial_result(0, [], b, {**_result(2, 0.5, 40.0), "training_iteration": 3, "iterations_since_restore": 1})
    assert back.eta() is None
    clock.now += 10
    back.on_trial_result(0, [], b, {**_result(2, 0.5, 45.0), "training_iteration": 4, "iterations_since_restore": 2})
    assert back.eta() == pytest.approx((150 - 95) / (5 / 10))


def test_eta_and_table_edge_cases():
    c = TrialClock()
    assert c.left({}, [30.0], now=5.0) is None  # nothing timed: no speed
    c.start("a", 5.0)
    c.report("a", 0.0, now=5.0)
    assert c.left({"a": 30.0}, [], now=5.0) is None  # a report of no compute: nothing to measure a speed by
    c.report("a", 10.0, now=10.0)
    assert c.left({"a": 0.0}, [], now=10.0) == 0.0 and c.left({"a": 30.0}, [], now=10.0) == 15.0
    assert c.left({"a": 30.0}, [], now=40.0) == 0.0  # overdue: its end is what is left, never negative time
    c.end("a", 12.0)  # 2 s after its last report: the overhead of a trial that ran 7 s, 5 of them training
    assert c.overhead(c.speed()) == 2.0 and c.left({}, [10.0, 10.0], now=12.0) == 14.0  # one at a time
    rows = [TrialLine(f"t{i}", "search", status="completed", dice=0.5) for i in range(15)]
    table = progress_table(rows, "h", max_rows=12)
    assert table.splitlines()[-1] == "... and 3 more trials" and len(table.splitlines()) == 1 + 1 + 12 + 1
    assert progress_table(rows[:13], "h", max_rows=12).splitlines()[-1] == "... and 1 more trial"


def test_progress_mode_picks_live_only_on_a_terminal():
    tty = types.SimpleNamespace(isatty=lambda: True)
    pipe = types.SimpleNamespace(isatty=lambda: False)
    assert progress_mode("auto", False, tty) == "live" and progress_mode("auto", False, pipe) == "lines"
    assert progress_mode("json", False, tty) == "json" and progress_mode("live", True, tty) == "none"


# -- the train command's progress ---------------------------------------------------------------------


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "epochs": 4, "stage": (epoch - 1) // 2, "stages": 2, "patch_size": [16, 16, 8],
            "train_loss": 0.5 / epoch, "train_time_s": 3.0 * epoch}


def _validation(epoch: int) -> dict:
    return {"epoch": epoch, "iteration": 2 * epoch, "stage": 1, "patch_size": [16, 16, 8], "train_loss": 0.3,
            "val_dice": float("nan") if epoch == 4 else 0.61234, "best_val_dice": 0.61234,
            "val_dice_per_class": {"a": 0.6}, "train_time_s": 6.0, "baseline_equivalent_iterations": 3.0,
            "completed": False, "lr": 0.01, "checkpoint_dir": "/x"}


@pytest.mark.parametrize("mode", ["live", "lines", "json", "none"])
def test_train_progress_modes(mode):
    out, clock = io.StringIO(), Clock()
    p = _TrainProgress(mode, out, clock)
    for e in range(1, 5):
        clock.now += 4  # seconds an epoch, validations included
        p.epoch(_epoch(e)) if mode != "none" else None
        if e % 2 == 0:
            p(_validation(e))
    p.close()
    text = out.getvalue()
    if mode == "json":
        events = [json.loads(line) for line in text.splitlines()]
        assert [e["event"] for e in events] == ["epoch", "epoch", "validation", "epoch", "epoch", "validation"]
        assert events[2]["val_dice"] == 0.6123 and events[5]["val_dice"] is None  # 4 digits; strict JSON
    elif mode == "lines":
        lines = text.splitlines()
        assert lines[0] == "epoch 1/4  stage 1/2 (16x16x8)  loss 0.5000  train 3.0s" and len(lines) == 6
        assert lines[2] == "  validation at epoch 2: Dice 0.6123 (best 0.6123)"
    elif mode == "live":
        frames = text.split("\r\x1b[K")
        assert len(frames) == 5 and text.endswith("\n") and text.count("\n") == 1
        assert frames[2].startswith("[##########..........] epoch 2/4") and frames[2].endswith("8s left")
        assert "Dice" not in frames[1] and "stage 2/2" in frames[3] and "Dice 0.612" in frames[3]
    else:
        assert text == ""


# -- the summary's words --------------------------------------------------------------------------------


def _summary(baseline_dice: float, best_dice: float, time_ratio: float) -> dict:
    return {
        "trials": 1, "completed": 1, "stopped_early": 0, "failed": 0,
        "best": {"trial_id": "t1", "role": "search", "final_dice": best_dice, "schedule_voxel_fraction": 0.3612,
                 "n_stages": 1},
        "gain_over_baseline": {"dice_points": 100 * (best_dice - baseline_dice), "time_ratio": time_ratio,
                               "voxel_ratio": 0.3612, "baseline_dice": baseline_dice},
    }


def test_a_baseline_that_has_not_learned_is_flagged_and_time_says_faster_or_slower():
    first, best, vs = summary_lines(_summary(0.2468, 0.6812, 1.38))
    assert first == "1 trial: 1 completed, 0 stopped early, 0 failed."
    assert best == "Best: trial t1 (search), validation Dice 0.681, 1 stage, 0.36x the constant baseline's voxels."
    assert vs.startswith("Against the baseline reference: Dice 0.681 vs 0.247 (+43.4 points), 1.38x its training "
                         "time (38% slower), 0.36x its voxels. Caution: the baseline reached only Dice 0.247 "
                         f"(below {LEARNED_DICE}), so it has not learned")
    assert "relative" not in vs and "%" not in vs.split("slower")[1]
    learned = summary_lines(_summary(0.81, 0.84, 0.72))
    assert learned[2] == ("Against the baseline reference: Dice 0.840 vs 0.810 (+3.0 points), 0.72x its training "
                          "time (28% faster), 0.36x its voxels.")
    assert not any("Caution" in line for line in learned)
    both_low = summary_lines(_summary(0.1, 0.3, 1.0))
    assert "the same training time" in both_low[2] and both_low[-1].startswith("Caution: even the best trial")


def test_schedule_table_counts_in_words():
    one = sch.constant((16, 16, 16), (2, 2, 2), 2, 1)
    assert one.table().splitlines()[-1].startswith("1 stage, 1 epoch, voxel fraction")
    two = sch.parametric((16, 16, 16), (2, 2, 2), 2, 4, stages=2, growth=2.0)
    assert two.table().splitlines()[-1].startswith("2 stages, 4 epochs,")


def test_best_matches_the_dataset_name_exactly_and_names_the_ones_that_differ_in_case(tmp_path, capsys):
    s = sch.constant((16, 16, 16), (2, 2, 2), 2, 2)
    row = {c: None for c in SCHEMA.names} | {
        "trial_id": "t1", "role": "search", "status": "completed", "params": "{}", "final_dice": 0.8, "score": 0.8,
        "schedule_voxel_fraction": 1.0, "completed": True, "stopped_early": False, "failed": False,
        "schedule": json.dumps(s.to_dict()), "n_stages": 1}
    meta = {"objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "dataset": "Hippo", "sweep": "sw"}
    store_sweep(pa.Table.from_pylist([row], schema=SCHEMA), meta, tmp_path, origin=tmp_path / "a")
    better = row | {"trial_id": "t2", "final_dice": 0.9, "score": 0.9}
    store_sweep(pa.Table.from_pylist([better], schema=SCHEMA), {**meta, "dataset": "hippo"}, tmp_path,
                origin=tmp_path / "b")
    # two datasets whose names differ only in case stay two datasets
    assert best_schedule("Hippo", tmp_path).meta["trial_id"] == "t1"
    assert best_schedule("hippo", tmp_path).meta["trial_id"] == "t2"
    assert main(["best", "--dataset", "HIPPO", "--results-store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no dataset 'HIPPO', but has 'Hippo', 'hippo'" in err and err.count("\n") == 1
    assert main(["best", "--dataset", "Prostate", "--results-store", str(tmp_path)]) == 2
    assert "known: ['Hippo', 'hippo']" in capsys.readouterr().err


def test_synthetic_data_is_named_in_any_case(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _data("Synthetic") == _data("SYNTHETIC") == "synthetic"
    (tmp_path / "Synthetic").mkdir()  # a folder of that name is a folder
    assert _data("Synthetic") != "synthetic"


def test_a_resumed_phase_counts_the_trials_that_had_ended(clock, monkeypatch):
    # Tune restores its callbacks from tuner.pkl, written when the phase started: the ended trials come from
    # the experiment's records, else a resumed phase said "1/3" again and priced ended trials as still to come
    import pickle

    from pgps_tune.results import TrialRecord
    from pgps_tune.tuner import ended_lines

    at_start = pickle.dumps(Progress(total=3, phase="search", mode="lines", trial_compute=100.0))
    records = [TrialRecord("a", "TERMINATED", last_result={**_result(2, 0.6, 50.0), "completed": True}),
               TrialRecord("b", "ERROR", last_result=_result(0, 0.1, 10.0, fraction=0.2)),
               TrialRecord("c", "RUNNING", last_result=_result(1, 0.3, 20.0))]  # restored: it reports again
    with Progress.resuming("lines", ended_lines(records, "search")):  # as the resuming command's restore does
        back = pickle.loads(at_start)
    assert {t: (x.status, x.compute, x.patch) for t, x in back.trials.items()} == {
        "a": ("completed", 50.0, "24x16x16"), "b": ("failed", 10.0, "8x16x16")}
    back.stream = out = io.StringIO()
    c = _trial("c")
    back.on_trial_start(0, [], c)
    c.last_result = {**_result(2, 0.5, 50.0), "completed": True}
    back.on_trial_result(0, [], c, c.last_result)
    back.on_trial_complete(0, [], c)
    assert out.getvalue().splitlines()[-1].endswith("3/3 c completed: Dice 0.500 score 0.500")
    assert back.compute_expected() == 50.0 + 10.0 + 50.0  # all three ended: nothing priced as to come


def test_a_resume_sets_the_restored_mode_for_its_restore_only(tmp_path, monkeypatch):
    # run_phase set Progress.resumed_mode for good: every Progress unpickled later in the process (the next sweep
    # of a notebook or of the test suite, restored by Tune) took the mode of the last command that ran a phase
    import contextlib
    import pickle

    from pgps_tune import tuner as tn

    at_start = pickle.dumps(Progress(total=1, phase="search", mode="live", trial_compute=1.0))
    restored = []

    class RestoringTuner:  # what run_phase asks of Tune, which unpickles the phase's callbacks from tuner.pkl
        can_restore = staticmethod(lambda path, storage_filesystem=None: True)

        @staticmethod
        def restore(path, **kwargs):
            restored.append(pickle.loads(at_start))
            return types.SimpleNamespace(fit=lambda: restored.append(pickle.loads(at_start)))

    monkeypatch.setattr(tn.tune, "Tuner", RestoringTuner)
    monkeypatch.setattr(tn.tune, "with_parameters", lambda f, **kwargs: f)
    monkeypatch.setattr(tn.tune, "with_resources", lambda f, resources: f)
    for name, value in (("repair_tune_state", []), ("repair_trial_checkpoints", []), ("vet_tune_state", None),
                        ("keep_tune_state", None), ("read_experiment", [])):
        monkeypatch.setattr(tn, name, lambda *args, value=value: value)
    monkeypatch.setattr(tn, "_restored_search_here", lambda *args: contextlib.nullcontext())
    opts = types.SimpleNamespace(quiet=False, progress="json", cpus_per_trial=1, gpus_per_trial=0, out=tmp_path,
                                 mlflow=None, autoscaling=False, pending_timeout=None)
    tn.run_phase("search", opts, {}, None, str(tmp_path), "s-search", None, 1, None)
    assert [p.mode for p in restored] == ["json", "live"]  # restored as this command asks; after it, as pickled
    assert (Progress.resumed_mode, Progress.resumed_trials) == (None, ())
