"""Tracking: TensorBoard event files of train runs and sweep trials, and a sweep logged to MLflow.

Event files are read back with tensorboardX's own protobuf (TensorBoard itself is not needed).
The sweep test runs one tiny sweep (about 30-60 s) and a confirmation of it, and checks everything
a sweep writes for people on it: Ray's event files, JSON-lines progress, the HTML report, and,
where MLflow is installed, the MLflow file store.
"""

import json
import struct
from pathlib import Path

import pytest
import yaml

from pgps_tune.cli import main


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every TensorBoard event file under ``folder``."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for f in files:
        data, at = f.read_bytes(), 0
        while at < len(data):  # TFRecord framing: length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_a_train_run_writes_tensorboard_scalars_per_validation(tiny_msd, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_msd), "--out", str(run), "--preset", "parametric", "--stages", "2",
                 "--epochs", "4", "--iterations-per-epoch", "1", "--filters", "4", "8", "16", "--val-every", "2",
                 "--progress", "json"]) == 0
    progress = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [p["event"] for p in progress] == ["epoch", "epoch", "validation", "epoch", "epoch", "validation"]
    scalars = read_scalars(run / "tensorboard")
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [step for step, _ in scalars["val/dice"]] == [h["epoch"] for h in history] == [2, 4]
    assert [v for _, v in scalars["val/dice"]] == pytest.approx([h["val_dice"] for h in history], abs=1e-6)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["train_loss"] for h in history], rel=1e-6)
    assert [v for _, v in scalars["schedule/stage"]] == [h["stage"] for h in history] == [0, 1]
    for axis, i in zip("xyz", range(3)):
        assert [v for _, v in scalars[f"schedule/patch_{axis}"]] == [h["patch_size"][i] for h in history]
    assert {"val/dice_a", "val/dice_b", "val/best_dice", "lr", "compute/baseline_iterations"} <= set(scalars)


def test_a_run_stopped_before_its_first_validation_leaves_no_event_file(tiny_msd, tmp_path, capsys):
    run = tmp_path / "run"
    # refused before training: nothing may be left, also no tensorboard folder
    assert main(["train", "--data", str(tiny_msd), "--out", str(run), "--epochs", "2", "--batch-size", "99999",
                 "--quiet"]) == 2
    assert not run.exists()


TINY = {
    "name": "tiny",
    "parameters": {"stages": {"value": 2}, "growth": {"type": "float", "low": 1.5, "high": 2.0},
                   "mode": {"value": "resource"}},
    "objective": {"type": "max_dice"},
    "search": {"algorithm": "random", "num_samples": 2, "seed": 0, "references": False},
    "asha": {"enabled": False}, "confirm": {"enabled": False},
    "budget": {"epochs": 4, "iterations_per_epoch": 1, "batch_size": 2, "filters": [4, 8, 16, 32],
               "optimizer": "adamw", "lr": 0.01, "val_every": 2, "synthetic_cases": 4,
               "synthetic_shape": [24, 24, 24], "final_patch": [16, 16, 16], "pools": [3, 3, 3]},
}


def test_a_sweep_writes_events_progress_report_and_mlflow(shared_ray, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses a file store without it
    try:
        import mlflow  # noqa: F401
        have_mlflow = True
    except ImportError:
        have_mlflow = False
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "sweep"
    store = tmp_path / "mlruns"
    argv = ["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--max-concurrent", "1",
            "--progress", "json"] + (["--mlflow", store.as_uri()] if have_mlflow else [])
    assert main(argv) == 0
    printed = capsys.readouterr()
    # progress: one JSON object per line on stderr, every trial started and completed
    events = [json.loads(line) for line in printed.err.splitlines() if line.startswith('{"event"')]
    trials = json.loads((out / "summary.json").read_text())["trials"]
    # first the sweep's plan: no references, no confirmation, no ASHA: 2 trials of 4 x 1 iterations, expected
    plan, events = events[0], events[1:]
    assert plan["event"] == "plan" and plan["phases"] == [
        {"phase": "search", "trials": 2, "compute": 2 * 4 * 1.0, "upper_bound": False}]
    assert sum(e["event"] == "start" for e in events) == sum(e["event"] == "complete" for e in events) == trials == 2
    assert all(e["stage"] in (0, 1) and e["stages"] == 2 for e in events if e["event"] == "result")
    assert {e["phase"] for e in events} == {"search"}
    # the whole sweep's ETA on every event, expected (not a bound); nothing left once the last trial ended
    assert all(e["sweep_eta_upper_bound"] is False and e["sweep_compute_left"] >= 0 for e in events)
    assert events[-1]["event"] == "complete" and events[-1]["sweep_compute_left"] == 0
    assert events[-1]["sweep_eta_s"] == 0
    # the report is written and named in the last lines
    assert (out / "report.html").is_file() and printed.out.rstrip().endswith(f"report: {out / 'report.html'}")
    # Ray's own TensorBoard logger writes every trial's reports, patch sides included
    trial_dirs = [d for d in (out / "ray").glob("*/run_trial_*") if d.is_dir()]
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        results = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        scalars = read_scalars(d)
        assert [v for _, v in scalars["ray/tune/val_dice"]] == pytest.approx([r["val_dice"] for r in results])
        assert [v for _, v in scalars["ray/tune/patch_x"]] == [r["patch_x"] for r in results]
        assert {"ray/tune/stage", "ray/tune/train_loss", "ray/tune/baseline_iterations"} <= set(scalars)
    if not have_mlflow:
        pytest.skip("mlflow is not installed (pip install 'pgps-tune[mlflow]'): the --mlflow half is not checked")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    by_phase = {}
    for r in runs:
        by_phase.setdefault(r.data.tags["pgps.phase"], []).append(r)
    assert len(by_phase["search"]) == 2 and len(by_phase["sweep"]) == 1 and len(runs) == 3
    rows = {row["trial_id"]: row for row in json.loads(main_output(["trials", str(out), "--format", "json"],
                                                                      capsys))}
    for r in by_phase["search"]:
        assert r.info.status == "FINISHED"
        assert r.data.params["stages"] == "2" and 1.5 <= float(r.data.params["growth"]) <= 2.0
        # the schedule and the trainer settings as params; tags that name the trial as trials.parquet does
        assert r.data.params["schedule"].endswith("16x16x16 batch 2 for 2 epochs")
        assert r.data.params["train.seed"] == "0" and r.data.params["train.augment"] == "default"
        tags = r.data.tags
        assert tags["pgps.sweep_dir"] == tags["pgps.sweep_location"] == str(out.resolve())
        assert tags["pgps.role"] == "search"
        assert r.info.run_name == f"sweep/search/{tags['pgps.trial_id']}"
        assert tags["pgps.status"] == rows[tags["pgps.trial_id"]]["status"] == "completed"
        history = client.get_metric_history(r.info.run_id, "val_dice")
        assert [m.step for m in history] == [2, 4]  # one per validation, stepped by epoch
        schedule = yaml.safe_load(Path(client.download_artifacts(r.info.run_id, "schedule.yaml",
                                                                 str(tmp_path))).read_text())
        assert len(schedule["stages"]) == int(r.data.metrics["n_stages"])
    sweep_run = by_phase["sweep"][0]
    assert json.loads((out / "sweep.json").read_text())["mlflow_tags"] == {  # what a moved sweep's runs keep
        "pgps.sweep": "sweep", "pgps.sweep_dir": str(out.resolve())}
    best = yaml.safe_load((out / "best_schedule.yaml").read_text())
    logged = yaml.safe_load(Path(client.download_artifacts(sweep_run.info.run_id, "best_schedule.yaml",
                                                           str(tmp_path / "best"))).read_text())
    assert logged == best and sweep_run.data.tags["pgps.best_trial"] == best["meta"]["trial_id"]
    assert sweep_run.data.metrics["best_final_dice"] == pytest.approx(best["meta"]["val_dice"])
    assert sweep_run.data.params["budget.epochs"] == "4" and sweep_run.data.params["budget.filters"] == "[4, 8, 16, 32]"
    # moved and resumed: every run of the sweep says where it is now, none is repeated, the folder it started in
    # (which names it in the experiment) is kept
    moved = tmp_path / "moved" / "sweep"
    moved.parent.mkdir()
    out.rename(moved)
    assert main([*argv[:6], str(moved), *argv[7:], "--resume"]) == 0, capsys.readouterr().err
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3 and {r.data.tags["pgps.sweep_dir"] for r in runs} == {str(out.resolve())}
    assert {r.data.tags["pgps.sweep_location"] for r in runs} == {str(moved.resolve())}
    # confirmed there (the smallest confirmation: one schedule and the two references on two seeds): its trials
    # join the sweep's experiment, named and tagged as the search's, and the sweep's own run takes the verdict
    # (confirm logged nothing to MLflow)
    assert main(["confirm", str(moved), "--top-k", "1", "--seeds", "2", "--max-concurrent", "1", "--quiet",
                 "--mlflow", store.as_uri()]) == 0, capsys.readouterr().err
    capsys.readouterr()
    runs = client.search_runs([experiment.experiment_id])
    confirm_runs = [r for r in runs if r.data.tags["pgps.phase"] == "confirm"]
    confirm_ids = {row["trial_id"] for row in json.loads(main_output(["trials", str(moved), "--format", "json",
                                                                       "--phase", "confirm"], capsys))}
    assert len(runs) == 9 and {r.data.tags["pgps.trial_id"] for r in confirm_runs} == confirm_ids
    from pgps_tune.tuner import TRIAL_METRICS, TUNE_METRICS

    allowed = {*TRIAL_METRICS, *TUNE_METRICS.values()}
    for r in confirm_runs:
        tags = r.data.tags
        assert r.info.run_name == f"sweep/confirm/{tags['pgps.trial_id']}" and r.info.status == "FINISHED"
        assert tags["pgps.sweep_dir"] == str(out.resolve()) and tags["pgps.sweep_location"] == str(moved.resolve())
        assert tags["pgps.status"] == "completed" and "val_dice" in r.data.metrics
        assert {k for k in r.data.metrics if not k.startswith("dice_")} <= allowed
    confirmation = json.loads((moved / "summary.json").read_text())["confirmation"]
    (again,) = [r for r in runs if r.data.tags["pgps.phase"] == "sweep"]
    assert again.info.run_id == sweep_run.info.run_id and again.data.metrics["best_repeats"] == 2
    assert again.data.tags["pgps.confirmed_winner"] == confirmation["winner"]
    assert again.data.tags["pgps.confirmation_verdict"] == confirmation["verdict"]
    assert again.data.metrics["gain_over_baseline_dice_points"] == pytest.approx(
        100 * confirmation["schedules"][confirmation["winner"]]["vs"]["baseline"]["mean_diff"])


def main_output(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_mlflow_missing_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    out = tmp_path / "sweep"
    assert main(["demo", "--out", str(out), "--mlflow", (tmp_path / "m").as_uri()]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pgps-tune: error: --mlflow needs MLflow, which is not installed here; "
                   "pip install 'pgps-tune[mlflow]'")
    assert not out.exists()


def test_the_mlflow_callback_is_made_on_first_use_and_unpickles_through_the_resume_check(tmp_path):
    # made lazily (importing Ray's MLflow integration imports MLflow), yet a pickled Tune state names it
    # as pgps_tune.tuner.MLflowTrials: the resume check's unpickler must find that very class
    import io
    import pickle
    import subprocess
    import sys

    pytest.importorskip("mlflow")
    from pgps_tune import tuner

    cold = subprocess.run([sys.executable, "-c", "import sys, pgps_tune.tuner; print('mlflow' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert cold.stdout.strip() == "False", cold.stderr[-2000:]  # importing the tuner imports no MLflow
    callback = tuner.MLflowTrials(f"sqlite:///{tmp_path / 'm.db'}", experiment_name="e", tags={"a": "b"})
    assert type(callback) is tuner.MLflowTrials is tuner._mlflow_trials_class()
    back = tuner._VettingUnpickler(io.BytesIO(pickle.dumps(callback))).load()
    assert type(back) is tuner.MLflowTrials and back.tags == {"a": "b"} and back.mlflow_util is not None
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        tuner.Nothing  # noqa: B018


def test_an_unreachable_tracking_server_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # MLflow retries an HTTP request for minutes: a sweep started anyway crashed only once Tune set up its logger
    import socket

    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sweep"
    assert main(["tune", "--space", "smoke", "--data", "synthetic", "--out", str(out),
                 "--mlflow", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pgps-tune: error: --mlflow http://127.0.0.1:{port}: ") and "\n" not in err
    assert "Connection refused" in err and "start the tracking server" in err
    assert not out.exists()


def test_a_tracking_server_that_fails_mid_sweep_costs_the_logging_not_the_sweep(capsys, monkeypatch):
    # Tune lets an exception of a callback end fit(): the whole sweep ended as an internal error
    pytest.importorskip("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from pgps_tune import tuner

    def gone(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(MLflowLoggerCallback, "setup", lambda self, *a, **k: setattr(self, "_trial_runs", {}))
    for name in ("log_trial_start", "log_trial_result", "log_trial_end"):
        monkeypatch.setattr(MLflowLoggerCallback, name, gone)
    monkeypatch.setattr(tuner._mlflow_trials_class(), "_client", gone)
    callback = tuner.MLflowTrials("http://127.0.0.1:1", experiment_name="e")
    callback.setup()
    callback.log_trial_start("trial_1")
    callback.log_trial_result(1, "trial_1", {"val_dice": 0.5})
    callback.log_trial_end("trial_1")
    err = capsys.readouterr().err
    assert err.count("pgps-tune: note: MLflow logging failed") == 1, err  # said once, then no more tries
    assert "the tracking server went away" in err and "the sweep goes on" in err
    monkeypatch.setattr(MLflowLoggerCallback, "setup", gone)
    callback.setup()  # the next phase tries again; a server down from the start costs one note too
    callback.log_trial_start("trial_2")
    assert capsys.readouterr().err.count("MLflow logging failed (setting up") == 1


class FakeTrial:
    """What the MLflow callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config, self.last_result = trial_id, config, {}

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


SCHEDULE = {"format_version": 1, "final_patch": [16, 16, 16], "pools": [3, 3, 3], "baseline_batch_size": 2,
            "stages": [{"patch_size": [8, 8, 8], "batch_size": 2, "epochs": 2},
                       {"patch_size": [16, 16, 16], "batch_size": 2, "epochs": 2}]}


def test_an_interrupted_trial_goes_on_in_its_mlflow_run_and_a_diverged_one_is_failed(tmp_path, monkeypatch):
    # a resume opened a second run for each trial it continued, and left the first one RUNNING for good, and
    # logged again what the trial reported again since its checkpoint; a run of a trial started after Tune's last
    # snapshot by a driver killed outright stayed RUNNING for good; a trial that diverged was a FINISHED run; one
    # odd label name cost the whole sweep its MLflow logging
    import pickle

    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from pgps_tune import tuner

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    callback = tuner.MLflowTrials(uri, experiment_name="sweep", tags={"pgps.sweep": "sweep", "pgps.phase": "search"})
    saved = pickle.dumps(callback)  # Tune's state, as a resume unpickles it
    callback.setup()
    trial = FakeTrial("a1", {"growth": 1.5})
    callback.log_trial_start(trial)
    first = {"schedule": json.dumps(SCHEDULE), "val_dice": 0.25, "epoch": 2, "completed": False,
             "dice_tumour (core)": 0.5, "config": {"growth": 1.5}, "time_total_s": 3.0}
    callback.log_trial_result(1, trial, first)
    callback.on_experiment_end([trial])  # the interrupt: Tune ends the experiment
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert run.info.status == "KILLED" and run.info.run_name == "sweep/search/a1"  # not Ray's run_trial_a1
    killed = pickle.loads(saved)  # kill -9 of a driver that had started a trial the resume will not know
    killed.setup()
    killed.log_trial_start(FakeTrial("a9", {"growth": 2.0}))
    lost = client.search_runs([run.info.experiment_id], filter_string="tags.trial_name = 'run_trial_a9'")[0].info

    resumed = pickle.loads(saved)
    resumed.setup()
    trial = FakeTrial("a1", {"growth": 1.5})  # Tune's restored trial
    resumed.log_trial_start(trial)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    resumed.log_trial_result(1, trial, first)  # said again: the run held it already (a kill before Tune's snapshot)
    trial.last_result = {**first, "val_dice": 0.0, "epoch": 4, "diverged": True, "error": "the loss is not finite"}
    resumed.log_trial_result(2, trial, trial.last_result)
    resumed.log_trial_end(trial)
    assert client.get_run(lost.run_id).info.status == "RUNNING"
    resumed.on_experiment_end([trial])
    assert client.get_run(lost.run_id).info.status == "KILLED"  # the phase ended: a run of no trial of it
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["pgps.status"] == "failed"
    assert run.info.run_name == "sweep/search/a1"  # the same run, its name kept
    assert run.data.tags["pgps.error"] == "the loss is not finite" and run.data.tags["pgps.trial_id"] == "a1"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_dice")] == [(2, 0.25), (4, 0.0)]
    assert run.data.metrics["dice_tumour _core_"] == 0.5 and "config/growth" not in run.data.metrics
    assert run.data.params["schedule"] == "8x8x8 batch 2 for 2 epochs; 16x16x16 batch 2 for 2 epochs"


def test_a_resumed_phase_logs_its_trials_to_the_mlflow_the_resuming_command_gives(tmp_path, capsys):
    # Tune restores the callbacks a phase started with: a confirmation started without --mlflow and resumed with it
    # logged none of its trials (the sweep's own run took their verdict all the same), and one resumed with another
    # URI logged them where it started, the sweep's own run here
    from types import SimpleNamespace

    pytest.importorskip("mlflow")
    from ray import tune

    from pgps_tune import tuner

    def trainable(config):
        pass

    first, other = (tmp_path / "first").as_uri(), (tmp_path / "other").as_uri()

    def resumed(started: list, mlflow: str | None, ended: int = 1) -> list:
        tune.Tuner(trainable, run_config=tune.RunConfig(name="s-confirm", storage_path=str(tmp_path / "ray"),
                                                        callbacks=started))  # writes tuner.pkl, as a phase's start
        restored = tune.Tuner.restore(str(tmp_path / "ray" / "s-confirm"), trainable=trainable)
        opts = SimpleNamespace(mlflow=mlflow, mlflow_experiment="s", mlflow_tags={"pgps.sweep": "s"}, out=tmp_path)
        tuner._log_restored_phase_here(restored, "confirm", opts, ended)
        return restored._local_tuner.get_run_config().callbacks

    progress = tuner.Progress(6, "confirm", "none", trial_compute=1.0)
    logger = tuner.MLflowTrials(first, experiment_name="s", tags={"pgps.sweep": "s", "pgps.phase": "confirm"})
    # started without MLflow: the trials to come log here; the one that ended is said to have no run
    kept, added = resumed([progress], first)
    assert isinstance(kept, tuner.Progress) and isinstance(added, tuner.MLflowTrials)
    assert added.tracking_uri == first and added.experiment_name == "s"
    assert added.tags == {"pgps.sweep": "s", "pgps.phase": "confirm"}
    assert capsys.readouterr().err.strip() == (f"pgps-tune: note: confirm: 1 trial of this phase ended while it "
                                               f"logged without --mlflow, so it has no run in {first}; the rest "
                                               "log there")
    # the same URI: the logger it started with goes on; without --mlflow too (as documented)
    for mlflow in (first, None):
        (_, same) = resumed([progress, logger], mlflow)
        assert same.tracking_uri == first and same.tags == logger.tags
    assert capsys.readouterr().err == ""
    # another URI: the trials to come log there, none twice
    (_, moved) = resumed([progress, logger], other, ended=0)
    assert moved.tracking_uri == other and capsys.readouterr().err == ""
    (_, moved) = resumed([progress, logger], other, ended=3)
    assert f"3 trials of this phase ended while it logged to {first}, so they have no run in {other}" in (
        capsys.readouterr().err)


def test_the_sweeps_own_mlflow_run_is_updated_not_repeated_and_a_deleted_experiment_refused(tmp_path, capsys,
                                                                                          monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from pgps_tune import tuner

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    meta = {"started": 0, "dataset": "synthetic", "trial_setup": {"budget": {"epochs": 4, "filters": [4, 8]}}}
    summary = {"best": {"trial_id": "a1", "final_dice": 0.5}}
    first = tuner.log_sweep_to_mlflow(uri, "sweep", out, summary, meta)  # a finished sweep exported again
    assert tuner.log_sweep_to_mlflow(uri, "sweep", out, {"best": {"trial_id": "a1", "final_dice": 0.5}}, meta) == first
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params == {"budget.epochs": "4", "budget.filters": "[4, 8]", "dataset": "synthetic"}
    assert run.data.tags["pgps.sweep_dir"] == str(out.resolve()) and run.info.status == "FINISHED"
    # a sweep of that name once more, its experiment deleted meanwhile: MLflow would take none of its runs
    client.delete_experiment(experiment.experiment_id)
    assert main(["tune", "--space", "smoke", "--data", "synthetic", "--out", str(tmp_path / "again" / "sweep"),
                 "--mlflow", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pgps-tune: error: --mlflow {uri}: the sweep's experiment 'sweep'") and "\n" not in err
    assert f"restore it in MLflow (experiment id {experiment.experiment_id})" in err
    assert not (tmp_path / "again").exists()


def test_a_moved_sweep_tags_its_mlflow_runs_as_it_started_and_names_trial_runs_by_sweep_and_phase(tmp_path,
                                                                                                   monkeypatch):
    # trial runs were all named run_trial_ID (Ray's), alike for every sweep of an experiment; after a sweep
    # folder was moved and resumed, its own run was tagged (and looked up) with the new folder, its trials
    # kept the old one, and a second sweep run was opened
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from pgps_tune import tuner

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    first, moved = tmp_path / "first" / "lr-sweep", tmp_path / "moved" / "lr-sweep-2"
    first.mkdir(parents=True)
    tags = tuner.mlflow_sweep_tags(first)
    assert tags == {"pgps.sweep": "lr-sweep", "pgps.sweep_dir": str(first.resolve())}
    meta = {"sweep": "lr-sweep", "folder": str(first.resolve()), "started": 0}
    assert tuner.mlflow_sweep_tags(moved, meta) == tags  # a sweep.json from before they were kept
    meta[tuner.MLFLOW_TAGS] = tags
    assert tuner.mlflow_sweep_tags(moved, {**meta, "folder": str(moved)}) == tags
    callback = tuner.MLflowTrials(uri, experiment_name="e", tags={**tags, "pgps.phase": "references"})
    callback.setup()
    callback.log_trial_start(FakeTrial("b0_00000", {}))
    run_id = tuner.log_sweep_to_mlflow(uri, "e", first, {}, meta)
    other = tuner.MLflowTrials(uri, experiment_name="e", tags={"pgps.sweep": "lr-sweep", "pgps.sweep_dir": "/else",
                                                               "pgps.phase": "search"})
    other.setup()
    other.log_trial_start(FakeTrial("c0_00000", {}))  # another sweep of that name, in another folder
    first.rename(tmp_path / "gone")
    moved.mkdir(parents=True)
    # the resume: every run of the sweep says where it is now (tags: MLflow keeps params as first logged), and
    # the runs of its restored phases and new ones say so from their start; the folder it started in names it
    assert tuner.relocate_mlflow_runs(uri, "e", moved, {**meta, "folder": str(moved)}) == 2
    monkeypatch.setattr(type(callback), "location", str(moved.resolve()))
    callback.log_trial_start(FakeTrial("b1_00000", {}))
    assert tuner.log_sweep_to_mlflow(uri, "e", moved, {}, {**meta, "folder": str(moved)}) == run_id
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id], "tags.`pgps.sweep_dir` != '/else'")
    assert sorted(r.info.run_name for r in runs) == ["lr-sweep (sweep)", "lr-sweep/references/b0_00000",
                                                     "lr-sweep/references/b1_00000"]
    assert all(r.data.tags["pgps.sweep_dir"] == str(first.resolve()) for r in runs)
    assert all(r.data.tags["pgps.sweep_location"] == str(moved.resolve()) for r in runs)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id], "tags.`pgps.sweep_dir` = '/else'")
    assert run.data.tags["pgps.sweep_location"] == "/else"
    long = tuner.trial_run_name({"pgps.sweep": "s" * 300, "pgps.phase": "search"}, "a1_00003")
    assert len(long) == tuner.MLFLOW_RUN_NAME_MAX and long.endswith("s/search/a1_00003")


def test_a_trials_mlflow_metrics_are_what_it_reports_not_tunes_bookkeeping():
    # every MLflow run of a trial charted Tune's own keys too (pid, timestamp, done, training_iteration, ...)
    from pgps_tune import tuner
    from pgps_tune.schedule import Schedule

    trained = {"val_dice": 0.5, "best_val_dice": 0.6, "epoch": 4, "stage": 1, "train_loss": 0.3, "train_time_s": 2.0,
               "patch_size": [16, 16, 16], "voxels_processed": 100, "baseline_equivalent_iterations": 2.0,
               "completed": True, "val_dice_per_class": {"tumour (core)": 0.4}}
    base = {"schedule": json.dumps(SCHEDULE), "n_stages": 2, "schedule_voxel_fraction": 0.5, "role": "search",
            "fidelity": 0.5, "rung": 1, "node_id": "abc"}
    reported = tuner._metrics(trained, base, {"objective": {"type": "max_dice"}, "asha_judge": "always"},
                              Schedule.from_dict(SCHEDULE))
    numbers = {k for k, v in reported.items() if isinstance(v, int | float)}
    tune_keys = {"pid": 7, "timestamp": 1.7e9, "done": False, "training_iteration": 2, "time_this_iter_s": 0.5,
                 "time_total_s": 9.5, "iterations_since_restore": 2, "should_checkpoint": True, "date": "today",
                 "config": {"growth": 1.5}, "some_future_ray_key": 1}
    logged = tuner.trial_metrics({**reported, **tune_keys})
    # every number a trial reports is logged (a report key added later must join TRIAL_METRICS), Tune's are not
    assert set(logged) == {tuner.metric_key(k) for k in numbers} | {"wall_time_s"}
    assert logged["dice_tumour _core_"] == 0.4 and logged["wall_time_s"] == 9.5 and logged["val_dice"] == 0.5
    failed = {"diverged": True, "error": "the loss is not finite", "completed": False, "epoch": 3,
              "voxels_processed": 5, "baseline_iterations": 1.0, "infeasible": False}
    assert set(tuner.trial_metrics({**failed, **tune_keys})) == set(failed) - {"error"} | {"wall_time_s"}


def test_a_sweep_logs_to_one_mlflow_experiment_whatever_the_environment_names(tmp_path, capsys, monkeypatch):
    # with MLFLOW_EXPERIMENT_ID set, Ray put the trials' runs into that experiment and the sweep's own run into
    # the one named after the folder; MLFLOW_EXPERIMENT_NAME was ignored (and refused nothing)
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from pgps_tune import tuner

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())  # --mlflow wins over it
    client = MlflowClient(uri)
    team = client.create_experiment("team")
    out = tmp_path / "sweep"
    out.mkdir()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", team)
    experiment = tuner._check_mlflow(uri, out, resume=False)
    assert experiment == "team"
    for name in (experiment, "sweep"):  # the callback logs where it is told, MLFLOW_EXPERIMENT_ID or not
        callback = tuner.MLflowTrials(uri, experiment_name=name, tags={"pgps.phase": "search"})
        callback.setup()
        callback.log_trial_start(FakeTrial(name, {"growth": 1.5}))
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                    filter_string=f"tags.`pgps.trial_id` = '{name}'")
        assert run.info.run_name == f"search/{name}"
    tuner.log_sweep_to_mlflow(uri, experiment, out, {}, {"started": 0})
    assert sorted(r.info.run_name for r in client.search_runs([team])) == ["search/team", "sweep (sweep)"]
    assert not elsewhere.exists()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")  # both, naming one experiment: fine
    assert tuner._check_mlflow(uri, out, resume=False) == "team"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "project")  # made on first use, as MLflow does
    assert tuner._check_mlflow(uri, out, resume=False) == "project"
    # a resume stays in the experiment its sweep started in, and says so where the environment names another
    monkeypatch.setattr(tuner, "read_meta", lambda folder: {"sweep": "sweep", tuner.MLFLOW_EXPERIMENT: "team"})
    (out / "sweep.json").write_text("{}")
    assert tuner._check_mlflow(uri, out, resume=True) == "team"
    assert capsys.readouterr().err.strip() == ("pgps-tune: note: this sweep logs to the MLflow experiment 'team', "
                                               "where it started, not to 'project' (MLFLOW_EXPERIMENT_NAME)")
    monkeypatch.setattr(tuner, "read_meta", lambda folder: {"sweep": "sweep", tuner.MLFLOW_EXPERIMENT: None})
    assert tuner._check_mlflow(uri, out, resume=True) == "project"  # it started without MLflow
    for env, said in ((("999", None), "MLFLOW_EXPERIMENT_ID 999: --mlflow URI has no experiment of that id; "),
                      ((team, "project"), "MLFLOW_EXPERIMENT_NAME 'project' and MLFLOW_EXPERIMENT_ID TEAM name two "
                                          "MLflow experiments, and a sweep logs to one; unset one of them")):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", env[0])
        if env[1] is None:
            monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
        else:
            monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", env[1])
        new = tmp_path / "new" / "sweep"
        assert main(["tune", "--space", "smoke", "--data", "synthetic", "--out", str(new), "--mlflow", uri]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pgps-tune: error: " + said.replace("URI", uri).replace("TEAM", team)), err
        assert "\n" not in err and not new.parent.exists()
