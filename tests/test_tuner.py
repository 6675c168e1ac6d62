"""Sweeps end to end on tiny synthetic data: ASHA, exports, store, resume, failures, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pgps_tune import schedule as sch
from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.results import COLUMNS, best_schedule

BUDGET = {
    "epochs": 10, "iterations_per_epoch": 10, "batch_size": 2, "filters": [8, 16, 32], "optimizer": "adamw",
    "lr": 0.01, "val_every": 2, "synthetic_cases": 6, "synthetic_shape": [32, 32, 32],
    "final_patch": [16, 16, 16], "pools": [2, 2, 2], "max_failures": 1,
}


def write_space(path: Path, **over) -> Path:
    raw = {
        "name": "t",
        "parameters": {
            "stages": {"type": "int", "low": 1, "high": 3},
            "growth": {"type": "float", "low": 1.5, "high": 2.5, "when": "stages > 1"},
            "mode": {"value": "resource"},
        },
        "objective": {"type": "max_dice"},
        "search": {"algorithm": "tpe", "num_samples": 3, "seed": 0},
        "asha": {"time_attr": "baseline_iterations", "grace_fraction": 0.2, "reduction_factor": 2},
        "budget": dict(BUDGET),
    }
    for k, v in over.items():
        raw[k] = v if not isinstance(v, dict) or k == "parameters" else {**raw.get(k, {}), **v}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _store(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))


@pytest.fixture(scope="module", autouse=True)
def _ray_shutdown():
    yield
    import ray

    ray.shutdown()


def cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pgps_tune.cli", *map(str, argv)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "trials.parquet").to_pylist()


def test_sweep_end_to_end_asha_stops_a_bad_trial_and_exports(tmp_path, capsys):
    # a grid walked in order with one trial at a hopeless learning rate, one at a good one:
    # ASHA (1 trial at a time) must stop the hopeless one at its first rung
    space = write_space(
        tmp_path / "s.yaml",
        parameters={"stages": {"value": 1}, "lr": {"type": "categorical", "choices": [0.01, 1.0e-9]}},
        search={"algorithm": "grid"},
    )
    out = tmp_path / "sweep"
    rc = main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--max-concurrent", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "vs baseline" in printed and "vs paper" in printed
    t = pq.read_table(out / "trials.parquet")
    assert t.column_names == COLUMNS and t.num_rows == 4
    table = t.to_pylist()
    assert [r["role"] for r in table] == ["baseline", "paper", "search", "search"]
    hopeless = next(r for r in table if json.loads(r["params"]).get("lr") == 1.0e-9)
    assert hopeless["stopped_early"] and hopeless["status"] == "stopped_early" and hopeless["rung_reached"] == 0
    # asha.judge final_stage: the value ASHA compares is reported only from a trial's last stage on
    reports = [json.loads(line) for f in (out / "ray").glob("*-references/*/result.json")
               for line in f.read_text().splitlines()]
    multi = [r for r in reports if r["n_stages"] > 1]
    assert multi and any(r["stage"] < r["n_stages"] - 1 for r in multi)
    assert all(("rung_score" in r) == (r["stage"] == r["n_stages"] - 1) for r in reports)
    assert sum(r["completed"] for r in table) == 3
    for r in table:
        assert r["voxels_processed"] > 0 and r["train_time_s"] > 0 and 0 <= r["final_dice"] <= 1
    best = sch.load(out / "best_schedule.yaml")
    assert best.meta["dataset"] == "synthetic" and best.meta["objective"] == "max_dice"
    assert best.meta["score"] == max(r["score"] for r in table if r["completed"])
    assert "gain_over_baseline" in best.meta and "gain_over_paper" in best.meta
    # the results store answers "best schedule for synthetic" in one query
    assert best_schedule("synthetic").stages == best.stages
    assert main(["best", "--dataset", "synthetic", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]
    # export on demand rewrites the same table
    again = tmp_path / "again"
    assert main(["export", "--experiment", str(out), "--out", str(again)]) == 0
    assert pq.read_table(again / "trials.parquet").num_rows == 4
    # the best schedule trains as is
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(run), "--schedule", str(out / "best_schedule.yaml"),
                 "--epochs", "2", "--iterations-per-epoch", "1", "--filters", "4", "8", "16", "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["completed"]
    assert main(["schedule", "--from", str(out / "best_schedule.yaml"), "--format", "json"]) == 0


def test_asha_stopped_trials_reach_optuna_as_pruned():
    import optuna

    from pgps_tune.tuner import DefineByRun, PrunedAwareOptunaSearch

    space = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3},
                                     "growth": {"type": "float", "low": 1.2, "high": 2, "when": "stages > 1"}}})
    search = PrunedAwareOptunaSearch(DefineByRun(space), metric="score", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=0))
    for tid, done in (("a", False), ("b", True)):
        search.suggest(tid)
        search.on_trial_result(tid, {"score": 0.5, "training_iteration": 1})
        search.on_trial_complete(tid, {"score": 0.5, "completed": done, "training_iteration": 1})
    states = [t.state for t in search._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]


def _progress_epochs(out: Path) -> dict[str, list[int]]:
    runs = {}
    for f in (out / "ray").glob("*-search/run_trial_*/result.json"):
        runs[f.parent.name.split("_")[2]] = [json.loads(line)["epoch"] for line in f.read_text().splitlines()]
    return runs


def test_resume_after_the_driver_is_killed(tmp_path):
    space = write_space(tmp_path / "s.yaml", search={"num_samples": 4},
                        budget={**BUDGET, "iterations_per_epoch": 60}, asha={"grace_fraction": 1.0})
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "pgps_tune.cli", "tune", "--space", str(space), "--data", "synthetic",
            "--out", str(out), "--max-concurrent", "2", "--quiet"]
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, start_new_session=True, stdout=fh, stderr=fh)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and sum(map(len, _progress_epochs(out).values())) < 3:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    before = _progress_epochs(out)
    assert before, f"no search trial reported before the kill: {log.read_text()[-2000:]}"
    assert not (out / "trials.parquet").exists()
    done = cli(*argv[3:], "--resume", timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    table = rows(out)
    search = [r for r in table if r["role"] == "search"]
    assert len(search) == 4 and len({r["trial_id"] for r in search}) == 4  # none lost, none duplicated
    assert all(r["completed"] for r in table)
    after = _progress_epochs(out)
    for tid, epochs in after.items():
        assert epochs == sorted(set(epochs)), f"trial {tid} restarted from scratch: {epochs}"
        if tid in before:
            assert epochs[: len(before[tid])] == before[tid]


def test_failing_trial_is_retried_from_its_checkpoint_then_recorded(tmp_path):
    space = write_space(tmp_path / "s.yaml", search={"num_samples": 1})
    once = tmp_path / "once"
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", once, "--quiet",
            env={"PGPS_INJECT_FAILURE": "4:once"})
    assert r.returncode == 0, r.stderr[-2000:]
    table = rows(once)
    assert all(x["completed"] and x["num_failures"] == 1 for x in table)
    for epochs in _progress_epochs(once).values():
        assert epochs == [2, 4, 6, 8, 10]  # continued from the epoch-2 checkpoint, not from scratch
    always = tmp_path / "always"
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", always, "--quiet",
            env={"PGPS_INJECT_FAILURE": "4"})
    assert r.returncode == 0, r.stderr[-2000:]
    table = rows(always)
    assert all(x["failed"] and x["status"] == "failed" for x in table)
    assert all(x["num_failures"] == 2 and "injected failure at epoch 4" in x["error"] for x in table)
    assert "0 completed" in r.stdout and not (always / "best_schedule.yaml").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--cpus-per-trial", "64"], "--cpus-per-trial 64 but the cluster has"),
        (["--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5 but the cluster has 0 GPUs"),
        (["--address", "127.0.0.1:1"], "no Ray cluster reachable at --address 127.0.0.1:1"),
        (["--storage", "{tmp}/file/sub"], "cannot write to --storage"),
    ],
)
def test_bad_sweep_input_fails_at_once_with_one_line(tmp_path, extra, needle):
    (tmp_path / "file").write_text("x")
    space = write_space(tmp_path / "s.yaml")
    t0 = time.time()
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o",
            *[e.format(tmp=tmp_path) for e in extra], timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_bad_space_and_schedule_parameter_fail_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {stages: {type: int, low: 3, high: 1}}\n")
    r = cli("tune", "--space", bad, "--data", "synthetic", "--out", tmp_path / "o")
    assert r.returncode == 2 and "empty range" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    space = write_space(tmp_path / "s.yaml", budget={**BUDGET, "final_patch": [14, 16, 16], "pools": [2, 2, 2]})
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o2")
    assert r.returncode == 2 and "not divisible" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def s3_server(tmp_path):
    """A local S3 (moto) on loopback, with one bucket."""
    import socket

    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bindir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    fs = pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}",
                           scheme="http", region="us-east-1", allow_bucket_creation=True)
    deadline = time.time() + 30
    while True:
        try:
            fs.create_dir("sweeps")
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)
    yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", env, fs
    proc.kill()
    proc.wait()


def test_storage_on_s3(tmp_path, s3_server):
    query, env, fs = s3_server
    space = write_space(tmp_path / "s.yaml", search={"num_samples": 1})
    out = tmp_path / "sweep"
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", out, "--quiet",
            "--storage", f"s3://sweeps/runs?{query}", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(rows(out)) == 3 and all(x["completed"] for x in rows(out))
    import pyarrow.fs as pafs

    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector("sweeps/runs"))]
    assert sorted(names) == ["sweep-references", "sweep-search"]
    # a bucket that does not exist cannot be written: one line, at once
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o2",
            "--storage", f"s3://no-such-bucket/x?{query}", env=env, timeout=120)
    assert r.returncode == 2 and "cannot write to --storage" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cheapest_within_scores_every_trial_against_the_baseline_target(tmp_path, capsys):
    space = write_space(tmp_path / "s.yaml", objective={"type": "cheapest_within", "tolerance": 0.5},
                        search={"num_samples": 2})
    out = tmp_path / "cheap"
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "sweep.json").read_text())
    table = rows(out)
    baseline = next(r for r in table if r["role"] == "baseline")
    assert meta["target_dice"] == pytest.approx(baseline["final_dice"] - 0.5)
    for r in table:  # all on one scale: feasible trials score 1 - voxel fraction
        assert r["final_dice"] >= meta["target_dice"]
        assert r["score"] == pytest.approx(1 - r["schedule_voxel_fraction"])
    best = sch.load(out / "best_schedule.yaml")
    assert best.voxel_fraction() == pytest.approx(min(r["schedule_voxel_fraction"] for r in table))


def test_joins_an_existing_ray_cluster(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ip = subprocess.run([sys.executable, "-c", "from ray._private.services import get_node_ip_address as g;"
                             "print(g())"], capture_output=True, text=True).stdout.strip()
        space = write_space(tmp_path / "s.yaml", search={"num_samples": 1})
        out = tmp_path / "sweep"
        deadline = time.time() + 60
        while True:
            r = cli("tune", "--space", space, "--data", "synthetic", "--out", out, "--quiet",
                    "--address", f"{ip}:{port}", env={"RAY_AUTH_MODE": "disabled"})
            if r.returncode == 0 or time.time() > deadline or "no Ray cluster" not in r.stderr:
                break
            time.sleep(2)  # the head may still be starting
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(rows(out)) == 3 and all(x["completed"] for x in rows(out))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_compute_budget_counts_every_trials_latest_progress():
    from pgps_tune.tuner import ComputeBudget

    stop = ComputeBudget(100.0)
    assert not stop("a", {"baseline_iterations": 40.0}) and not stop.stop_all()
    assert not stop("b", {"baseline_iterations": 30.0}) and not stop.stop_all()
    stop("a", {"baseline_iterations": 60.0})  # a's progress replaces its earlier report: 60 + 30
    assert not stop.stop_all()
    stop("b", {"baseline_iterations": 40.0})
    assert stop.stop_all()
