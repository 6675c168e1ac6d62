"""Tracking: TensorBoard event files of train runs and sweep trials, and a sweep logged to MLflow.

Event files are read back with tensorboardX's own protobuf (TensorBoard itself is not needed).
The sweep test runs one tiny sweep (about 30-60 s) and checks everything a sweep writes for
people on it: Ray's event files, JSON-lines progress, the HTML report, and, where MLflow is
installed, the MLflow file store.
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
    for r in by_phase["search"]:
        assert r.info.status == "FINISHED"
        assert r.data.params["stages"] == "2" and 1.5 <= float(r.data.params["growth"]) <= 2.0
        dice = [m.value for m in client.get_metric_history(r.info.run_id, "val_dice")]
        assert len(dice) == 2  # one per validation (epochs 2 and 4)
        schedule = yaml.safe_load(Path(client.download_artifacts(r.info.run_id, "schedule.yaml",
                                                                 str(tmp_path))).read_text())
        assert len(schedule["stages"]) == int(r.data.metrics["n_stages"])
    sweep_run = by_phase["sweep"][0]
    best = yaml.safe_load((out / "best_schedule.yaml").read_text())
    logged = yaml.safe_load(Path(client.download_artifacts(sweep_run.info.run_id, "best_schedule.yaml",
                                                           str(tmp_path / "best"))).read_text())
    assert logged == best and sweep_run.data.tags["pgps.best_trial"] == best["meta"]["trial_id"]
    assert sweep_run.data.metrics["best_final_dice"] == pytest.approx(best["meta"]["val_dice"])


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
