"""Sweeps end to end on tiny synthetic data: ASHA, exports, store, bad input (interrupts, failures, S3 and
clusters: tests/test_tuner_recovery.py, which uses the helpers here).

Each live sweep costs tens of seconds, so one sweep carries several assertions.  Tests wait on
observed events (a report in an experiment folder, a state in Tune's experiment state), never on
fixed sleeps, and every wait has a generous limit that fails with a clear message.

Sweeps here (and in the other test files) run one trial at a time (``--max-concurrent 1``) unless
trials side by side are what a test is about: Tune reuses a trial's Ray actor for the next trial,
and each actor more starts a process that imports torch, MONAI and Ray Tune, about 10 CPU-seconds
on 2 cores, more than a tiny trial trains.  The suite is CPU-bound on 2 cores, so that is time.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_msd, ray_processes, sweep_meta

from pgps_tune import schedule as sch
from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.results import COLUMNS, best_schedule

BUDGET = {
    "epochs": 10, "iterations_per_epoch": 10, "batch_size": 2, "filters": [8, 16, 32], "optimizer": "adamw",
    "lr": 0.01, "val_every": 2, "synthetic_cases": 6, "synthetic_shape": [32, 32, 32],
    "final_patch": [16, 16, 16], "pools": [2, 2, 2], "max_failures": 1,
}
WAIT_S = 240  # the most any observed event may take on a loaded 2-core machine


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
        "confirm": {"enabled": False},  # tests/test_confirm.py runs the confirmation phase
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


def ray_sessions(ray_tmp: str) -> list[Path]:
    return list((Path(ray_tmp) / "ray").glob("session_2*"))


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
             limit: float = WAIT_S):
    """Poll ``condition`` until it holds; fail clearly if ``proc`` exits first or ``limit`` passes."""
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {limit:.0f} s:\n{tail}")
        time.sleep(0.2)


def run(cmd: list[str], env=None, timeout: float = 2 * WAIT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s; its output:\n{stderr[-3000:]}")


def cli(*argv, env=None, timeout: float = 2 * WAIT_S) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pgps_tune.cli", *map(str, argv)], env, timeout)


def start(cmd: list[str], log: Path, env=None) -> subprocess.Popen:
    """Start a command in its own process group (as a shell job is), its output to ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, start_new_session=True, stdout=fh, stderr=fh, env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the command did not exit within {timeout} s:\n{log.read_text()[-3000:]}")


def error_line(stderr: str) -> str:
    """The one ``pgps-tune: error:`` line (warnings from libraries may surround it), and no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("pgps-tune: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def strict_json(path: Path):
    """Parse as JSON that any parser accepts (no NaN or Infinity)."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "trials.parquet").to_pylist()


def reported_epochs(out: Path, phase: str = "search") -> dict[str, list[int]]:
    """Each trial's reported epochs, in order, from its result.json."""
    runs = {}
    for f in (out / "ray").glob(f"*-{phase}/run_trial_*/result.json"):
        text = f.read_text()
        complete = text.splitlines()[: text.count("\n")]  # Tune may be writing the last line
        runs[f.parent.name.split("_")[2]] = [json.loads(line)["epoch"] for line in complete]
    return runs


# -- a whole sweep in process ------------------------------------------------------------------


def test_sweep_end_to_end_asha_stops_a_bad_trial_and_exports(shared_ray, tmp_path, capsys):
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
    assert "Best: trial" in printed and f"report: {out / 'report.html'}" in printed
    for role in ("baseline", "paper"):  # each reference compared with, or being, the best
        assert f"Against the {role} reference" in printed or f"is the {role} reference itself" in printed
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
    summary, meta = strict_json(out / "summary.json"), strict_json(out / "sweep.json")
    assert summary["best"]["trial_id"] == best.meta["trial_id"] and meta["finished"] is True
    # the results store answers "best schedule for synthetic" in one query
    assert best_schedule("synthetic").stages == best.stages
    assert main(["best", "--dataset", "synthetic", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]
    # export on demand rewrites the same table
    again = tmp_path / "again"
    assert main(["export", "--experiment", str(out), "--out", str(again)]) == 0
    assert pq.read_table(again / "trials.parquet").to_pylist() == table
    # the best schedule trains as is
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(run), "--schedule", str(out / "best_schedule.yaml"),
                 "--epochs", "2", "--iterations-per-epoch", "1", "--filters", "4", "8", "16", "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["completed"]
    assert main(["schedule", "--from", str(out / "best_schedule.yaml"), "--format", "json"]) == 0


def test_random_search_skips_over_budget_trials_and_stops_at_the_compute_cap(shared_ray, tmp_path):
    import optuna

    # dice_under_budget at 0.55 of the baseline's voxels: 1 and 2 stages are over it (1.0 and 0.56), 3 under
    space_file = write_space(
        tmp_path / "s.yaml", objective={"type": "dice_under_budget", "voxel_budget": 0.55},
        search={"algorithm": "random", "num_samples": 12, "seed": 3, "references": False, "max_compute": 0.7},
        asha={"enabled": False},
    )
    out = tmp_path / "sweep"
    assert main(["tune", "--space", str(space_file), "--data", "synthetic", "--out", str(out),
                 "--max-concurrent", "1", "--quiet"]) == 0
    # the trials are Optuna's random sampler's suggestions, in order
    space = sp.load(space_file)
    study, define = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)), sp.DefineByRun(space)
    expected = []
    for _ in range(12):
        trial = study.ask()
        fixed = define(trial)
        expected.append({**trial.params, **fixed})
        study.tell(trial, 0.0)
    fractions = [sp.schedule_from_params(c, (16, 16, 16), (2, 2, 2), 2, 10).voxel_fraction() for c in expected]
    assert any(f > 0.55 for f in fractions) and any(f <= 0.55 for f in fractions)
    # the compute cap (0.7 baseline runs) is crossed in the first trial that brings the feasible total past it
    spent, n = 0.0, 0
    while spent < 0.7:
        spent += fractions[n] if fractions[n] <= 0.55 else 0.0
        n += 1
    assert n < 12
    table = rows(out)
    assert [json.loads(r["params"]) for r in table] == expected[:n]
    assert sum(r["baseline_iterations"] for r in table) >= 0.7 * 100
    assert table[-1]["status"] == "stopped_early"  # stopped by the cap, the others ran to their end
    for r, f in zip(table, fractions):
        assert r["schedule_voxel_fraction"] == pytest.approx(f)
        trial_dir = next((out / "ray").glob(f"*-search/run_trial_{r['trial_id']}_*"))
        if f > 0.55:  # over budget: refused before training
            assert r["completed"] and r["score"] == -1.0 and r["voxels_processed"] == 0
            assert not list(trial_dir.glob("checkpoint_*"))
        else:
            assert r["voxels_processed"] > 0 and r["score"] == r["final_dice"]
            assert list(trial_dir.glob("checkpoint_*"))


def test_searcher_is_told_pruned_for_asha_stops_and_fail_for_divergence():
    import optuna

    from pgps_tune.tuner import DefineByRun, PrunedAwareOptunaSearch

    space = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3},
                                     "growth": {"type": "float", "low": 1.2, "high": 2, "when": "stages > 1"}}})
    search = PrunedAwareOptunaSearch(DefineByRun(space), metric="score", mode="max",
                                     sampler=optuna.samplers.TPESampler(seed=0))
    ends = {"a": {"score": 0.5, "completed": False}, "b": {"score": 0.5, "completed": True},
            "c": {"diverged": True, "error": "diverged: the training loss is nan", "completed": False}}
    for tid, end in ends.items():
        search.suggest(tid)
        search.on_trial_result(tid, {"score": 0.5, "training_iteration": 1})
        if end.get("diverged"):  # the diverged report itself reaches the searcher first, with no score in it
            search.on_trial_result(tid, {**end, "training_iteration": 2})
        search.on_trial_complete(tid, {**end, "training_iteration": 2})
    states = [t.state for t in search._ot_study.trials]
    TS = optuna.trial.TrialState
    assert states == [TS.PRUNED, TS.COMPLETE, TS.FAIL]
    assert search._ot_study.trials[2].value is None


def test_compute_budget_counts_every_trials_latest_progress():
    from pgps_tune.tuner import ComputeBudget

    stop = ComputeBudget(100.0)
    assert not stop("a", {"baseline_iterations": 40.0}) and not stop.stop_all()
    assert not stop("b", {"baseline_iterations": 30.0}) and not stop.stop_all()
    stop("a", {"baseline_iterations": 60.0})  # a's progress replaces its earlier report: 60 + 30
    assert not stop.stop_all()
    stop("b", {"baseline_iterations": 40.0})
    assert stop.stop_all()


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,needle,ray_starts",
    [
        (["--cpus-per-trial", "64"], "--cpus-per-trial 64 but the cluster has", False),  # known before Ray starts
        (["--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5 but the cluster has 0 GPUs", True),
        (["--address", "127.0.0.1:1"], "no Ray cluster reachable at --address 127.0.0.1:1", False),
        (["--storage", "{tmp}/file/sub"], "cannot write to --storage", False),
        (["--num-samples", "0"], "--num-samples", False),
        (["--cpus-per-trial", "nan"], "--cpus-per-trial", False),
        (["--max-failures", "-1"], "--max-failures", False),
    ],
)
def test_bad_sweep_input_fails_at_once_with_one_line(tmp_path, ray_tmp, extra, needle, ray_starts):
    (tmp_path / "file").write_text("x")
    space = write_space(tmp_path / "s.yaml")
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o",
            *[e.format(tmp=tmp_path) for e in extra], env={"RAY_TMPDIR": ray_tmp}, timeout=120)
    assert r.returncode == 2 and needle in error_line(r.stderr), r.stderr[-1500:]
    # Ray started only where the check needs the cluster (and the local Ray it started is gone);
    # joining a cluster starts no Ray of its own
    assert bool(ray_sessions(ray_tmp)) == ray_starts
    wait_for(lambda: not ray_processes(ray_tmp), "exit of the local Ray the command started")


def test_an_address_nothing_listens_at_is_refused_without_waiting_for_ray():
    import socket

    from pgps_tune.tuner import _refused

    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused
        here, nobody = listening.getsockname()[1], closed.getsockname()[1]
        assert _refused(f"127.0.0.1:{here}") is None  # something answers: Ray decides whether it is a cluster
        assert _refused(f"127.0.0.1:{nobody}") == "connection refused"
        assert _refused(f"[::1]:{nobody}") in ("connection refused", None)  # None where IPv6 is off
    assert _refused("no-such-host.invalid:6379") == "unknown host no-such-host.invalid"
    for other in ("auto", "ray://127.0.0.1:1", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":6379"):
        assert _refused(other) is None, other  # forms Ray reads (or refuses) itself


def test_per_trial_resources_must_fit_on_one_node_of_the_cluster():
    # two 1-CPU nodes have 2 CPUs in all, yet a 2-CPU trial fits on neither: Tune left it pending for ever
    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import check_resources

    def refusal(cpus, gpus, nodes):
        with pytest.raises(PgpsError) as e:
            check_resources(cpus, gpus, nodes)
        return str(e.value)

    two = [{"CPU": 1.0}, {"CPU": 1.0}]
    check_resources(1, 0, two)
    check_resources(0.5, None, two)
    assert refusal(2, 0, two) == ("--cpus-per-trial 2 but no node of the cluster has 2 CPUs (a trial runs on one "
                                  "node; its 2 nodes have at most 1 CPU each); ask for at most 1")
    assert refusal(3, 0, two).startswith("--cpus-per-trial 3 but the cluster has 2 CPUs;")
    gpus = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert "has 2 GPUs (a trial runs on one node; its 2 nodes have at most 1 GPU each); ask for at most 1" in \
        refusal(1, 2, gpus)
    assert refusal(1, 0.5, two).startswith("--gpus-per-trial 0.5 but the cluster has 0 GPUs;")
    mixed = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}]  # each request fits a node, both together none
    check_resources(4, 1, mixed)
    check_resources(8, 0, mixed)
    assert refusal(8, 1, mixed) == ("--cpus-per-trial 8 with --gpus-per-trial 1: no node of the cluster has both "
                                    "(a trial runs on one node; those with 1 GPU have at most 4 CPUs); ask for at "
                                    "most 4 CPUs per trial")


def test_an_autoscaling_cluster_lets_trials_wait_for_a_node_type_it_starts(tmp_path, capsys):
    # a cluster whose GPU workers were scaled to zero refused '--gpus-per-trial 1' though its autoscaler would
    # start one: a node type the autoscaler reported (Ray's ClusterConfig in the GCS) now counts as a node
    from ray.core.generated import autoscaler_pb2 as pb

    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import check_resources, node_types_of

    config = pb.ClusterConfig(node_group_configs=[
        pb.NodeGroupConfig(name="head", resources={"CPU": 4}, min_count=1, max_count=1),
        pb.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=-1),  # -1: no limit
        pb.NodeGroupConfig(name="retired", resources={"CPU": 64, "GPU": 8}, max_count=0)])  # starts none
    types = node_types_of(config)
    assert [(t.name, t.resources, t.max_count) for t in types] == [
        ("head", {"CPU": 4.0}, 1), ("gpu", {"CPU": 8.0, "GPU": 1.0}, None)]
    assert node_types_of(None) == []
    head = [{"CPU": 4.0}]
    assert check_resources(4, 0, head, types) is False  # a live node fits: nothing to wait for, nothing said
    assert capsys.readouterr().err == ""
    assert check_resources(2, 1, head, types) is True
    assert capsys.readouterr().err == ("pgps-tune: note: no live node of the cluster fits --cpus-per-trial 2 with "
                                       "--gpus-per-trial 1: the trials wait for its autoscaler to start a node of "
                                       "type gpu (8 CPUs, 1 GPU)\n")
    for flags, cpus, gpus in (("--cpus-per-trial 2 with --gpus-per-trial 2", 2, 2), ("--cpus-per-trial 16", 16, 0)):
        with pytest.raises(PgpsError) as e:  # what fits no type, live or declared, still waits for ever
            check_resources(cpus, gpus, head, types, autoscaling=True)
        assert str(e.value) == (f"{flags}: no node of the cluster fits a trial, neither a live one (4 CPUs) nor "
                                "one of the types its autoscaler starts: head (4 CPUs, at most 1 node), gpu (8 CPUs, "
                                "1 GPU); ask for at most what one of them has")
    # Ray 2.60's own autoscalers report no types: --autoscaling lets the trials wait, and the refusal names it
    with pytest.raises(PgpsError, match=r"has 0 GPUs; .*; or, on a cluster whose autoscaler starts such nodes, "
                                        r"give --autoscaling$"):
        check_resources(2, 1, head, autoscaling=False)
    with pytest.raises(PgpsError) as e:  # a Ray of the sweep's own has no autoscaler to name
        check_resources(2, 1, head)
    assert "autoscal" not in str(e.value)
    assert check_resources(2, 1, head, autoscaling=True) is True
    assert "--autoscaling: the trials wait for the autoscaler to start one" in capsys.readouterr().err
    space = write_space(tmp_path / "s.yaml")
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(tmp_path / "o"),
                 "--autoscaling"]) == 2  # a Ray of the sweep's own has no autoscaler
    assert error_line(capsys.readouterr().err).startswith("pgps-tune: error: --autoscaling is for a Ray cluster ")
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(tmp_path / "o"),
                 "--pending-timeout", "60"]) == 2  # nor trials that wait for a node
    assert error_line(capsys.readouterr().err).startswith("pgps-tune: error: --pending-timeout is for a Ray cluster")
    assert not (tmp_path / "o").exists()


def test_trials_no_node_can_run_stop_the_phase_after_the_pending_timeout(monkeypatch):
    # a GPU node removed mid-sweep (or an autoscaler that never starts one) left the trials PENDING for ever,
    # with only Tune's and Ray's repeated warnings: the phase now stops, as on Ctrl-C, naming asked, had, fix
    from ray.tune.execution.tune_controller import TuneController

    from pgps_tune import tuner

    now, asked = [0.0], []
    cluster = {"nodes": [{"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}], "types": []}

    def live():
        asked.append(now[0])
        return cluster["nodes"], cluster["types"]

    watch = tuner.PendingWatch("search", 2, 1, 120.0, False, cluster=live, clock=lambda: now[0])
    for t, pending, running in ((0, 2, 0), (119, 2, 0), (150, 2, 1), (200, 0, 0), (300, 3, 0), (419, 3, 0)):
        now[0] = t
        assert watch(pending, running) is None  # running, none waiting, or not waited long enough
    assert asked == []
    now[0] = 420
    assert watch(3, 0) is None and asked == [420]  # the GPU node is up (busy with another job's trials): wait on
    now[0] = 425
    assert watch(3, 0) is None and asked == [420]  # asked again only after PENDING_PROBE_S
    cluster["nodes"] = cluster["nodes"][:1]  # the GPU node left
    now[0] = 430
    assert watch(3, 0) == watch.stuck == (
        "search: 3 trials waited 2m10s, none running, and no live node of the cluster can run one (has one that "
        "could left?): --gpus-per-trial 1 but the cluster has 0 GPUs; use --gpus-per-trial 0 or join a cluster with "
        "GPUs (--address); or bring back such a node, or give --autoscaling if the cluster starts nodes itself")
    now[0] = 431
    assert watch(0, 1) == watch.stuck  # once stuck, it stays so until the loop has stopped
    auto = tuner.PendingWatch("confirm", 16, 0, tuner.pending_limit(None, True), True, cluster=live,
                              clock=lambda: now[0])
    now[0] = 1000
    assert auto(1, 0) is None
    now[0] = 1000 + 900
    assert auto(1, 0) == ("confirm: 1 trial waited 15m00s, none running, for the autoscaler to start a node that "
                          "can run one, and none is up: --cpus-per-trial 16 but the cluster has 4 CPUs; ask for at "
                          "most that; or make the autoscaler able to start such a node (its node types and limits, "
                          "the cloud's quota), or let the trials wait longer (--pending-timeout SECONDS)")
    assert tuner.pending_limit(None, False) == 120 and tuner.pending_limit(30, True) == 30

    # in Tune's loop: the watch is asked after each step, and the loop ends (as on Ctrl-C) once it is stuck
    class Loop:
        steps = 0

        def __init__(self):
            self._pending_trials, self._running_trials = {"a", "b"}, set()

        def step(self):
            self.steps += 1
            now[0] += 5

        def is_finished(self):
            return False

    monkeypatch.setattr(TuneController, "step", Loop.step)
    monkeypatch.setattr(TuneController, "is_finished", Loop.is_finished)
    cluster["nodes"] = [{"CPU": 4.0}]
    now[0], loop = 0.0, Loop()
    watch = tuner.PendingWatch("search", 1, 1, 60.0, False, cluster=live, clock=lambda: now[0])
    with tuner._pending_watched(watch):
        while not TuneController.is_finished(loop):
            TuneController.step(loop)
    assert loop.steps == 13 and watch.stuck.startswith("search: 2 trials waited 1m00s, none running, and no live node ")
    assert TuneController.step is Loop.step and TuneController.is_finished is Loop.is_finished  # put back


def test_an_address_of_no_cluster_or_a_refused_token_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    from pgps_tune import tuner
    from pgps_tune.errors import PgpsError

    # a Ray Client or dashboard address, and 'local', were passed to Ray: "no Ray cluster reachable (ValueError)"
    space = write_space(tmp_path / "s.yaml")
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(tmp_path / "o"),
                 "--address", "ray://head:10001"]) == 2
    assert "is a Ray Client address" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
    for address, needle in (("http://head:8265", "not a Ray cluster's address"), ("local", "leave out --address")):
        with pytest.raises(PgpsError, match=needle):
            tuner.check_address(address)
    tuner.check_address("auto")
    tuner.check_address("10.0.0.1:6379")

    # a token refused (here: not sent) ended in "no Ray cluster reachable ..., copy its ~/.ray/auth_token", though
    # the token was there: Ray quotes the refusal only in the message of the error that ends its retries
    def refused(**kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback ...\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: ...")
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc

    monkeypatch.setattr(tuner, "_refused", lambda address: None)
    monkeypatch.setattr(tuner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(tuner.ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(PgpsError, match="sends it to a HOST:PORT address only with RAY_AUTH_MODE=token"):
        tuner.start_ray("10.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # sent, and refused: the token here is not the cluster's
    with pytest.raises(PgpsError, match=r"refused this machine's authentication token .*; copy the head's"):
        tuner.start_ray("10.0.0.1:6379")

    # --address auto dials RAY_ADDRESS where set: the line named "--address auto" and left that out
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # as exported for 'ray job submit'
    with pytest.raises(PgpsError, match=r"RAY_ADDRESS=http://head:8265 \(which --address auto reads\) is not a Ray "
                                        r"cluster's address .*, or unset RAY_ADDRESS for this command"):
        tuner.check_address("auto")
    tuner.check_address("10.0.0.1:6379")  # an address given is dialed as given
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as in a Ray Job's driver
    monkeypatch.delenv("RAY_AUTH_MODE")
    with pytest.raises(PgpsError, match=r"cluster at RAY_ADDRESS=10.0.0.1:6379 \(which --address auto reads\) "
                                        r"refused .* only with RAY_AUTH_MODE=token"):
        tuner.start_ray("auto")
    # without --address a Ray of its own starts, as before, and says that it does
    monkeypatch.setattr(tuner.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(tuner, "_end_at_once", lambda: None)
    capsys.readouterr()
    tuner.start_ray(None)
    assert "RAY_ADDRESS is set (10.0.0.1:6379, as in a Ray Job), but without --address" in capsys.readouterr().err


def test_a_node_that_cannot_see_the_storage_data_or_cache_is_refused_before_any_trial(shared_ray, tmp_path, capsys):
    # a path only on the driver's machine failed every trial placed on another node, after its retries (for a
    # local --storage, at the trial's first checkpoint): each node that fits a trial now checks, in a task of no CPUs
    import pyarrow.fs as pafs

    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import _unseen_here, check_cluster_paths

    store, data = tmp_path / "store", tmp_path / "data"
    store.mkdir()
    data.mkdir()
    (tmp_path / "file").write_text("x")
    assert _unseen_here({"data": str(data)}, {"cache": str(tmp_path / "new" / "cache")}) == []
    assert _unseen_here({"data": str(tmp_path / "gone")}, {"cache": str(tmp_path / "file" / "cache")}) == [
        "data", "cache"]
    check_cluster_paths(1, 0, None, str(store), str(data), str(tmp_path / "cache"))
    assert list(store.iterdir()) == []  # the storage's marker is gone again
    # a remote storage (here a stand-in) is read through its filesystem on the node: there, its credentials
    assert _unseen_here({}, {}, (pafs.LocalFileSystem(), str(tmp_path / "gone"))) == ["remote"]
    check_cluster_paths(1, 0, pafs.LocalFileSystem(), str(store), None, None)
    assert list(store.iterdir()) == []
    with pytest.raises(PgpsError) as e:
        check_cluster_paths(1, 0, None, str(store), str(tmp_path / "gone"), str(tmp_path / "file" / "cache"))
    assert str(e.value).startswith("node ") and (
        f"of the cluster would run trials but cannot see --data {tmp_path / 'gone'} or the preprocessing cache "
        f"{tmp_path / 'file' / 'cache'} (on this machine only?); put the dataset at the same path on every node; "
        "give a --cache-dir every node can write") in str(e.value), str(e.value)
    assert list(store.iterdir()) == []
    # on an autoscaling cluster the nodes started for the trials are not up to check: a note says what they need
    capsys.readouterr()
    check_cluster_paths(1, 0, None, str(store), str(data), None, autoscales=True)
    assert capsys.readouterr().err == (
        "pgps-tune: note: the nodes up now were checked, but the nodes the autoscaler starts for the trials cannot "
        f"be checked before they are up: each must see the Tune storage {store} and --data {data}, or its trials "
        "fail there\n")
    check_cluster_paths(1, 64, pafs.LocalFileSystem(), str(store), None, str(tmp_path / "cache"), autoscales=True)
    assert capsys.readouterr().err.startswith(
        "pgps-tune: note: no node that fits a trial is up yet, and the nodes the autoscaler starts for the trials "
        f"cannot be checked before they are up: each must see the Tune storage {store} and the preprocessing cache ")
    assert list(store.iterdir()) == []


def test_a_file_uri_storage_and_its_path_are_the_same_storage_on_resume(tmp_path):
    # a sweep started with --storage file:///shared/runs was refused on resume with --storage /shared/runs as
    # "differs from the storage this sweep's Tune experiments are in", and the other way round
    from pgps_tune.errors import PgpsError
    from pgps_tune.results import write_meta
    from pgps_tune.tuner import SweepOptions, _resumable, plain_storage

    storage, space = tmp_path / "runs", sp.load(write_space(tmp_path / "s.yaml"))
    for n, (then, now) in enumerate(((f"file://{storage}", str(storage)), (str(storage), f"file://{storage}/"))):
        out = tmp_path / f"sweep{n}"
        out.mkdir()
        write_meta(out, sweep_meta(out, storage=then, storage_path=str(storage)))
        opts = SweepOptions(space=space, data="synthetic", out=out, storage=plain_storage(now), resume=True)
        _resumable(opts)  # as tune --resume reads --storage
        assert opts.storage == str(storage)
    with pytest.raises(PgpsError, match="differs from the storage"):
        _resumable(SweepOptions(space=space, data="synthetic", out=out, storage=str(tmp_path / "other"), resume=True))


def test_a_local_ray_that_cannot_start_is_one_line_and_a_fault_of_ours_stays_internal(monkeypatch):
    """Ray's own start failures (its processes late on a loaded machine, a GCS that died, /tmp full) name
    the likely causes and --address; an error of the call itself is left to the internal-error report."""
    import errno

    from ray.exceptions import RaySystemError

    from pgps_tune import tuner
    from pgps_tune.errors import PgpsError

    monkeypatch.setattr(tuner.ray, "is_initialized", lambda: False)
    failures = [
        Exception("The current node timed out during startup. This could happen because some of the raylet "
                  "failed to startup or the GCS has become overloaded."),
        RuntimeError("Failed to start GCS.  Last 1 lines of error files:\n[E] boom\n."),
        TimeoutError("Timed out after 30 seconds while waiting for node to startup."),
        OSError(errno.ENOSPC, "No space left on device"),
        RaySystemError("raylet died"),
    ]
    for exc in failures:
        def init(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(tuner.ray, "init", init)
        with pytest.raises(PgpsError) as info:
            tuner.start_ray(None)
        text = str(info.value)
        assert text.startswith("cannot start a local Ray (") and "\n" not in text and "--address" in text, text
        assert (str(exc).splitlines() or [""])[0].split()[0] in text, text  # Ray's own first words say which
    for exc in (TypeError("init() got an unexpected keyword argument 'x'"), ValueError("bad"), NotImplementedError()):
        def init(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(tuner.ray, "init", init)
        with pytest.raises(type(exc)):
            tuner.start_ray(None)


def test_bad_space_and_schedule_parameter_fail_before_ray(tmp_path, ray_tmp):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {stages: {type: int, low: 3, high: 1}}\n")
    env = {"RAY_TMPDIR": ray_tmp}
    r = cli("tune", "--space", bad, "--data", "synthetic", "--out", tmp_path / "o", env=env)
    assert r.returncode == 2 and "empty range" in error_line(r.stderr)
    space = write_space(tmp_path / "s.yaml", budget={**BUDGET, "final_patch": [14, 16, 16], "pools": [2, 2, 2]})
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o2", env=env)
    assert r.returncode == 2 and "not divisible" in error_line(r.stderr)
    assert not ray_sessions(ray_tmp)


def test_a_dataset_no_trial_can_split_is_refused_before_any_trial(tmp_path, capsys):
    # each trial failed on the split and the sweep ended 'done' (exit 0) with 0 of its trials completed
    data = make_msd(tmp_path / "one", n=1)
    out = tmp_path / "o"
    assert main(["tune", "--space", str(write_space(tmp_path / "s.yaml")), "--data", str(data),
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgps-tune: error: dataset Tiny has 1 labelled case(s)") and "add labelled cases" in err
    assert not out.exists()


def test_a_new_sweep_refuses_to_replace_files_of_the_same_names(tmp_path, capsys):
    # a folder holding someone's report.html (or trials.parquet, ...) but no sweep had them replaced unasked
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("<p>my own page</p>")
    (out / "notes.txt").write_text("kept")  # other files are no reason to refuse
    assert main(["tune", "--space", str(write_space(tmp_path / "s.yaml")), "--data", "synthetic",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pgps-tune: error: {out} holds report.html but no sweep (sweep.json); a new sweep would replace "
                   "it: choose a new --out, or move it away")
    assert (out / "report.html").read_text() == "<p>my own page</p>" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt", "report.html"]


def test_references_that_cannot_fit_in_memory_are_refused_before_any_trial(tmp_path, capsys, monkeypatch):
    # train refused such a batch; a sweep ran it, and Ray's memory monitor killed the workers and ended the sweep
    # as an internal error
    import pgps_tune.trainer as trainer

    monkeypatch.setattr(trainer, "_memory_of", lambda device: (2**20, "RAM"))  # a machine with 1 MiB
    out = tmp_path / "o"
    assert main(["tune", "--space", str(write_space(tmp_path / "s.yaml")), "--data", "synthetic",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgps-tune: error: stage ") and "of RAM here; lower --batch-size" in err
    assert err.endswith("(this is the baseline reference)") and not out.exists()


def _sweep_meta(root: Path, **over) -> dict:
    return sweep_meta(root, name="x", **over)


@pytest.mark.parametrize("content,needle", [
    ("", "is not valid JSON"),
    ("{", "is not valid JSON"),
    ("[1, 2]", "is not a sweep description"),
    ('{"sweep": "x"}', "misses format_version"),
    ("MISSING_ASHA", "misses asha"),
    ("BAD_EXPERIMENTS", "malformed fields"),
    ("UNFINISHED", "is not finished"),
])
def test_damaged_sweep_json_is_refused_in_one_line(tmp_path, capsys, content, needle):
    exp = tmp_path / "sweep"
    exp.mkdir()
    meta = _sweep_meta(exp)
    (exp / "sweep.json").write_text({
        "MISSING_ASHA": json.dumps({k: v for k, v in meta.items() if k != "asha"}),
        "BAD_EXPERIMENTS": json.dumps({**meta, "experiments": {"search": "../../etc"}}),
        "UNFINISHED": json.dumps({**meta, "finished": False})}.get(content, content))
    commands = [["export", "--experiment", str(exp), "--out", str(tmp_path / "e")]]
    if content != "UNFINISHED":  # continuing an unfinished sweep is what --resume is for
        commands.append(["tune", "--space", str(write_space(tmp_path / "s.yaml")), "--data", "synthetic",
                         "--out", str(exp), "--resume"])
    for argv in commands:
        assert main(argv) == 2
        assert needle in error_line(capsys.readouterr().err)
    assert not (tmp_path / "e").exists()


def test_export_or_confirm_of_a_sweep_whose_driver_runs_names_the_driver(tmp_path, capsys):
    """An unfinished sweep that a tune still holds is not 'unfinished: resume it': export, confirm name the holder."""
    from pgps_tune.errors import folder_lock
    from pgps_tune.tuner import SWEEP_LOCK

    exp = tmp_path / "sweep"
    exp.mkdir()
    (exp / "sweep.json").write_text(json.dumps(_sweep_meta(exp, finished=False)))
    with folder_lock(exp, SWEEP_LOCK, "in use ({holder})", lambda: True, command="pgps-tune tune"):
        for argv in (["export", "--experiment", str(exp), "--out", str(exp)],
                     ["export", "--experiment", str(exp), "--out", str(tmp_path / "e")], ["confirm", str(exp)]):
            assert main(argv) == 2
            line = error_line(capsys.readouterr().err)
            assert "in use by another pgps-tune command (pgps-tune tune, pid" in line and "--resume" not in line
    assert main(["export", "--experiment", str(exp), "--out", str(exp)]) == 2  # the driver gone: resume it
    assert "is not finished" in error_line(capsys.readouterr().err)

def test_sweep_folders_are_read_as_data_never_as_code(tmp_path, capsys):
    import pickle

    from pgps_tune.tuner import ListSearcher

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    blob = pickle.dumps(Payload()).hex()
    exp = tmp_path / "sweep"
    state_dir = exp / "ray" / "x-search"
    state_dir.mkdir(parents=True)
    (exp / "sweep.json").write_text(json.dumps(_sweep_meta(exp)))
    trial = {"trial_id": "t1", "status": "TERMINATED", "config": {"stages": 1}, "relative_logdir": "run_trial_t1",
             "results": blob, "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob}}
    run = {"num_failures": 0, "error_filename": None, "last_result": {"val_dice": 0.5, "completed": True,
                                                                     "score": 0.5, "epoch": 10}}
    (state_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps(trial), json.dumps(run)]]}))
    assert main(["export", "--experiment", str(exp), "--out", str(tmp_path / "e")]) == 0
    assert [r["trial_id"] for r in rows(tmp_path / "e")] == ["t1"]
    # an error file named outside the trial's folder is refused, not read
    run["error_filename"], trial["status"] = "../../../etc/passwd", "ERROR"
    (state_dir / "experiment_state-2026-01-02_00-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps(trial), json.dumps(run)]]}))
    assert main(["export", "--experiment", str(exp), "--out", str(tmp_path / "e")]) == 2
    assert "is not a Tune experiment state this version reads" in error_line(capsys.readouterr().err)
    # the grid searcher's saved state is JSON: a pickle in its place is refused
    state = tmp_path / "searcher-state.pkl"
    state.write_bytes(pickle.dumps(Payload()))
    from pgps_tune.errors import PgpsError

    with pytest.raises(PgpsError, match="searcher state .* is damaged"):
        ListSearcher([]).restore(str(state))
    saved = ListSearcher([{"lr": 0.1}, {"lr": 0.2}])
    saved.suggest("a")
    saved.save(str(state))
    back = ListSearcher([])
    back.restore(str(state))
    assert back.suggest("a") == {"lr": 0.1} and back.suggest("b") == {"lr": 0.2} and back.suggest("c") == "FINISHED"
    assert not (tmp_path / "pwned").exists()


def test_results_store_with_foreign_files_is_refused_in_one_line(tmp_path, capsys):
    from pgps_tune.results import TrialRecord, export_sweep

    store = tmp_path / "store"
    s = sch.preset("paper", (16, 16, 16), (2, 2, 2), 2, 10, "resource", None)
    good = TrialRecord("a", "TERMINATED", {"stages": 2}, {"val_dice": 0.6, "score": 0.6, "completed": True,
                                                          "schedule": json.dumps(s.to_dict()), "epoch": 10,
                                                          "schedule_voxel_fraction": s.voxel_fraction()})
    diverged = TrialRecord("b", "TERMINATED", {"lr": 1e6}, {"diverged": True, "error": "diverged: loss nan"})
    summary = export_sweep(tmp_path / "e", _sweep_meta(tmp_path), [good, diverged], store)
    assert summary["failed"] == 1 and summary["best"]["trial_id"] == "a"
    assert main(["best", "--dataset", "synthetic", "--format", "json"]) == 0  # PGPS_RESULTS_DIR is the store
    assert json.loads(capsys.readouterr().out)["stages"] == s.to_dict()["stages"]
    part = next(store.glob("dataset=synthetic/sweep=x/*.parquet"))
    cases = {
        "notes.txt": ("not one of its tables", lambda p: p.write_text("hello")),
        "stray.parquet": ("not one of its tables", lambda p: shutil.copy(part, p)),
        "dataset=synthetic/sweep=y/part-0.parquet": ("is not readable Parquet", lambda p: p.write_bytes(b"PAR1")),
        "dataset=z/sweep=w/part-0.parquet": ("lacks columns", lambda p: pq.write_table(
            pq.read_table(part).select(["trial_id"]), p)),
    }

    def with_column(name: str, text: str) -> Callable[[Path], None]:  # a readable table, one JSON cell damaged
        table = pq.read_table(part)
        cells = pa.array([text] * len(table), pa.string())
        return lambda p: pq.write_table(table.set_column(table.schema.get_field_index(name), name, cells), p)

    for column, text, needle in [("params", "{", "params column is not valid JSON"),
                                 ("schedule", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                 ("dice_per_class", "[0.5]", "dice_per_class column is a JSON list")]:
        cases[f"dataset=synthetic/sweep={column}/part-0.parquet"] = (needle, with_column(column, text))
    for name, (needle, make) in cases.items():
        path = store / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        dataset = name.split("/")[0].removeprefix("dataset=") if name.startswith("dataset=") else "synthetic"
        if dataset != "synthetic":  # another dataset's damaged file is not read to answer for this one
            assert main(["best", "--dataset", "synthetic", "--format", "json"]) == 0
            capsys.readouterr()
        assert main(["best", "--dataset", dataset]) == 2
        err = error_line(capsys.readouterr().err)
        where = path.parent if "column" in needle or "nested" in needle else path
        assert needle in err and str(where) in err and ("move" in err), err
        path.unlink()
    assert main(["best", "--dataset", "synthetic", "--format", "json"]) == 0
    file_store = tmp_path / "file"
    file_store.write_text("x")
    assert main(["best", "--dataset", "synthetic", "--results-store", str(file_store)]) == 2
    assert "is a file" in error_line(capsys.readouterr().err)


def test_cheapest_within_scores_every_trial_against_the_baseline_target(shared_ray, tmp_path, capsys):
    space = write_space(tmp_path / "s.yaml", objective={"type": "cheapest_within", "tolerance": 0.5},
                        search={"num_samples": 2}, budget={**BUDGET, "iterations_per_epoch": 4})
    out = tmp_path / "cheap"
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet",
                 "--max-concurrent", "1"]) == 0
    meta = json.loads((out / "sweep.json").read_text())
    table = rows(out)
    baseline = next(r for r in table if r["role"] == "baseline")
    assert meta["target_dice"] == pytest.approx(baseline["final_dice"] - 0.5)
    for r in table:  # all on one scale: feasible trials score 1 - voxel fraction
        assert r["final_dice"] >= meta["target_dice"]
        assert r["score"] == pytest.approx(1 - r["schedule_voxel_fraction"])
    best = sch.load(out / "best_schedule.yaml")
    assert best.voxel_fraction() == pytest.approx(min(r["schedule_voxel_fraction"] for r in table))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (fractional-GPU trials)")
def test_two_trials_share_one_gpu_with_fractional_gpus(tmp_path):
    # written for GPU machines; on a CPU-only machine the resource check refuses --gpus-per-trial (tested above)
    space = write_space(tmp_path / "s.yaml", search={"num_samples": 2, "references": False},
                        asha={"enabled": False})
    out = tmp_path / "gpu"
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", out, "--quiet",
            "--gpus-per-trial", "0.5", "--cpus-per-trial", "1", "--max-concurrent", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(rows(out)) == 2 and all(x["completed"] for x in rows(out))
    spans = []
    for f in (out / "ray").glob("*-search/run_trial_*/result.json"):
        stamps = [json.loads(line)["timestamp"] for line in f.read_text().splitlines()]
        spans.append((min(stamps), max(stamps)))
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 <= a1, f"the two half-GPU trials never ran at the same time: {spans}"


def test_a_crafted_tune_state_is_refused_before_resume_unpickles_it(tmp_path, monkeypatch):
    import pickle

    from ray import cloudpickle
    from ray import tune as ray_tune
    from ray.exceptions import ActorDiedError

    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import TRUST_ENV, vet_tune_state

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    state = tmp_path / "exp"
    state.mkdir()
    # what a real state holds passes: Ray's and Optuna's classes, numpy's RNG, our searchers, JSON states
    (state / "tuner.pkl").write_bytes(pickle.dumps({"run": ray_tune.RunConfig(name="x"), "rng": __import__(
        "numpy").random.RandomState(0), "cfg": ray_tune.TuneConfig(num_samples=2)}))
    (state / "searcher-state-1.pkl").write_text('{"configs": [], "given": {}}')
    (state / ".unfinished-tmp-searcher-state.pkl").write_bytes(b"\x80\x05")  # Ray's torn temp file: never read
    # a trial whose worker a SIGTERM to the whole job (or the OOM killer) ended: Tune pickled its error
    (state / "run_trial_1").mkdir()
    (state / "run_trial_1" / "error.pkl").write_bytes(cloudpickle.dumps(ActorDiedError()))
    vet_tune_state(str(state))
    assert (state / "run_trial_1" / "error.pkl").exists()
    # a trial that raised: Tune pickles the exception with a class cloudpickle builds from code as it loads
    # (as would a crafted file); only Ray's result objects read it, and its text is in error.txt: set aside,
    # never loaded, instead of refusing the sweep
    from ray.exceptions import RayTaskError

    (state / "run_trial_2").mkdir()
    raised = RayTaskError("run_trial", "Traceback ...", RuntimeError("boom")).as_instanceof_cause()
    (state / "run_trial_2" / "error.pkl").write_bytes(cloudpickle.dumps(raised))
    (state / "run_trial_3").mkdir()
    (state / "run_trial_3" / "error.pkl").write_bytes(pickle.dumps(Payload()))
    vet_tune_state(str(state))
    assert not list(state.glob("run_trial_[23]/error.pkl")) and not (tmp_path / "pwned").exists()
    assert (state / "run_trial_2" / "error.pkl.set-aside").read_bytes() == cloudpickle.dumps(raised)
    (state / "error.pkl").write_bytes(pickle.dumps(Payload()))  # not a trial's: refused like any other pickle
    with pytest.raises(PgpsError, match="refused to resume: .*error.pkl asks for pathlib"):
        vet_tune_state(str(state))
    (state / "error.pkl").unlink()
    # a payload in tuner.pkl, or inside experiment_state JSON, is refused before anything runs
    for where in ("pkl", "json"):
        if where == "pkl":
            (state / "tuner.pkl").write_bytes(pickle.dumps(Payload()))
        else:
            (state / "tuner.pkl").write_bytes(pickle.dumps(ray_tune.RunConfig(name="x")))
            trial = {"storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Payload()).hex()}}
            (state / "experiment_state-1.json").write_text(json.dumps({"trial_data": [[json.dumps(trial), "{}"]]}))
        with pytest.raises(PgpsError, match="refused to resume: .* asks for pathlib") as err:
            vet_tune_state(str(state))
        assert len(str(err.value).splitlines()) == 1 and TRUST_ENV in str(err.value)
        assert not (tmp_path / "pwned").exists()
    # nesting cannot hide a payload, nor crash the check: a payload under 8 levels of JSON-in-strings and
    # 80 of lists is found; one under 150 levels (which Ray's parser reads) or a state nested past any
    # parser's depth cannot be inspected, and is refused in one line
    payload = {"storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Payload()).hex()}}
    trial = payload
    for _ in range(8):
        trial = {"t": json.dumps([trial])}
    for _ in range(80):
        trial = [trial]
    (state / "experiment_state-1.json").write_text(json.dumps({"trial_data": [[json.dumps(trial), "{}"]]}))
    with pytest.raises(PgpsError, match="refused to resume: .* asks for pathlib"):
        vet_tune_state(str(state))
    deep = json.dumps(json.loads("[" * 150 + json.dumps(payload) + "]" * 150))
    for text in (json.dumps({"trial_data": [[deep, "{}"]]}), "[" * 100_000 + "]" * 100_000):
        (state / "experiment_state-1.json").write_text(text)
        with pytest.raises(PgpsError, match=r"refused to resume: .* beyond what pgps-tune inspects \(nested too deep"
                           ) as err:
            vet_tune_state(str(state))
        assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()
    # nor can bulk: a payload beside more values than are parsed, or in a file larger than any state, is refused
    from pgps_tune import errors, tuner

    monkeypatch.setattr(errors, "MAX_JSON_VALUES", 1000)
    (state / "experiment_state-1.json").write_text(json.dumps({"trial_data": [[json.dumps(payload), "{}"]],
                                                               "pad": [0] * 1001}))
    with pytest.raises(PgpsError, match=r"refused to resume: .* inspects \(more than 1,000 values"):
        vet_tune_state(str(state))
    monkeypatch.setattr(tuner, "MAX_JSON_BYTES", 1 << 20)
    os.truncate(state / "experiment_state-1.json", 8 << 30)  # sparse: 8 GiB that take no disk
    with pytest.raises(PgpsError, match="refused to resume: .*experiment_state-1.json is larger than 1 MiB"):
        vet_tune_state(str(state))
    assert not (tmp_path / "pwned").exists()
    (state / "experiment_state-1.json").unlink()
    monkeypatch.setenv(TRUST_ENV, "1")  # the documented way past the check, for a sweep one trusts
    vet_tune_state(str(state))


def test_sigterm_after_the_local_ray_shut_down_still_reaches_the_sweep(monkeypatch):
    # ray.shutdown() sets SIGTERM back to the system's default behind Python's back: a SIGTERM during the export
    # that follows killed the driver without a word (exit -15) while signal.getsignal still named the handler
    import ctypes
    from types import SimpleNamespace

    from pgps_tune import tuner

    def caught() -> bool:  # whether the process itself catches SIGTERM now (the kernel's view, not Python's)
        mask = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("SigCgt"))
        return bool(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1)

    for key in ("TUNE_DISABLE_SIGINT_HANDLER", "TUNE_GLOBAL_CHECKPOINT_S", "RAY_AIR_NEW_OUTPUT",
                "TUNE_DISABLE_STRICT_METRIC_CHECKING"):
        monkeypatch.delenv(key, raising=False)  # set by the session; put back as they were after the test
    monkeypatch.setattr(tuner.ray, "is_initialized", lambda: False)  # a local Ray of the sweep's own, without Ray
    monkeypatch.setattr(tuner, "start_ray", lambda address: None)
    monkeypatch.setattr(tuner, "check_resources", lambda *args, **kw: None)
    monkeypatch.setattr(tuner.ray, "shutdown", lambda: ctypes.CDLL(None).signal(signal.SIGTERM, 0))  # as Ray's core
    opts = SimpleNamespace(address=None, cpus_per_trial=1, gpus_per_trial=0, autoscaling=False, pending_timeout=None)
    with tuner._stop_signals() as signals:
        with tuner._ray_session(opts, signals):
            pass
        assert caught()
        with pytest.raises(tuner.SweepInterrupted, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at once; the sleep is never finished


def test_a_local_ray_of_our_own_starts_with_sigterm_blocked(monkeypatch):
    # a SIGTERM to the whole job (timeout, Slurm, systemd) must not end the GCS under the driver stopping the
    # sweep: the processes ray.init starts inherit the mask it ran with; the driver's own mask is put back
    from pgps_tune import tuner

    during = []
    monkeypatch.setattr(tuner.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(tuner.ray, "init", lambda **kw: during.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    tuner.start_ray(None)
    assert during == [before | {signal.SIGTERM}]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_ray_shutdown_ends_a_process_that_blocks_sigterm_at_once(monkeypatch):
    # ray.shutdown() terminates each process it started and kills it only after a second: with SIGTERM blocked
    # (above) every sweep would end seconds later
    from types import SimpleNamespace

    from pgps_tune import tuner

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    monkeypatch.setattr(tuner.ray._private.worker, "_global_node",
                        SimpleNamespace(all_processes={"raylet": [SimpleNamespace(process=proc)]}))
    tuner._end_at_once()
    proc.terminate()  # what ray.shutdown() calls first
    assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL


def test_a_trial_takes_sigterm_back_for_what_it_starts(monkeypatch):
    # the Ray worker running a trial inherits the blocked SIGTERM (above); so would every process the trial
    # starts, masks survive exec: multiprocessing's Pool.terminate() (nnU-Net's export) then waited forever
    import threading

    import torch

    from pgps_tune import tuner

    class Started(Exception):
        pass

    seen = []

    def schedule_from_params(*args):
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        raise Started

    def trial():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as in a worker of a local Ray of ours
        with pytest.raises(Started):
            tuner.run_trial({}, setup)

    monkeypatch.setattr(tuner, "schedule_from_params", schedule_from_params)
    setup = {"budget": {"trainer": "nnunet", "epochs": 1, "batch_size": 2}, "final_patch": (16, 16, 16),
             "pools": (2, 2, 2), "cpus_per_trial": torch.get_num_threads()}
    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    assert len(seen) == 1 and signal.SIGTERM not in seen[0]


def test_state_files_cut_short_by_a_kill_are_put_back_before_resume(tmp_path):
    import pickle

    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import STATE_COPIES, keep_tune_state, repair_tune_state

    exp = tmp_path / "exp"
    exp.mkdir()
    tuner_pkl = pickle.dumps({"name": "search", "samples": list(range(50))})
    (exp / "tuner.pkl").write_bytes(tuner_pkl)
    (exp / "experiment_state-2026-01-01.json").write_text(json.dumps({"trial_data": [], "n": 1}))
    keep_tune_state(str(exp))
    assert repair_tune_state(str(exp)) == []  # nothing damaged, nothing touched
    # Ray's copy truncated tuner.pkl (empty, or cut mid-stream) and wrote a newer state it never finished
    for cut in (b"", tuner_pkl[: len(tuner_pkl) // 2]):
        (exp / "tuner.pkl").write_bytes(cut)
        (exp / "experiment_state-2026-01-02.json").write_text(
            '{"trial_data": [["{\\"a\\"' if cut else "[" * 100_000 + "]" * 100_000)  # torn, or crafted deep
        notes = repair_tune_state(str(exp))
        assert len(notes) == 2 and all(len(n.splitlines()) == 1 for n in notes)
        assert (exp / "tuner.pkl").read_bytes() == tuner_pkl
        assert sorted(p.name for p in exp.glob("experiment_state*.json")) == ["experiment_state-2026-01-01.json"]
        assert (exp / STATE_COPIES / "damaged-experiment_state-2026-01-02.json").exists()
    # a damaged pickle with no copy kept: one line, and the file is left as it was
    (exp / "searcher-state-x.pkl").write_bytes(pickle.dumps(list(range(99)))[:40])
    with pytest.raises(PgpsError, match="cut short .* new --out") as err:
        repair_tune_state(str(exp))
    assert len(str(err.value).splitlines()) == 1 and len((exp / "searcher-state-x.pkl").read_bytes()) == 40
    # the only experiment state torn, no copy of it: refused (Tune would start the phase over), left as it was
    only = tmp_path / "only"
    only.mkdir()
    (only / "tuner.pkl").write_bytes(tuner_pkl)
    (only / "experiment_state-2026-01-01.json").write_text('{"trial_data": [["{\\"a\\"')
    with pytest.raises(PgpsError, match="neither an intact copy nor another experiment state") as err:
        repair_tune_state(str(only))
    assert len(str(err.value).splitlines()) == 1 and "saved before" not in str(err.value)
    assert sorted(p.name for p in only.iterdir()) == ["experiment_state-2026-01-01.json", "tuner.pkl"]


def test_a_trial_worker_the_jobs_sigterm_ended_is_resumed_and_not_counted_as_a_failure(tmp_path):
    # a SIGTERM to the whole job (scancel, preemption) can end a trial's worker before the driver stops the
    # trial: Tune counts a failure (with max_failures 0 the trial is failed for good, and each preemption uses
    # one retry); a resume counts the failures again from error.txt, leaving those deaths out
    from pgps_tune.tuner import SIGTERM_DEATH, uncount_shutdown_deaths

    exp = tmp_path / "exp"
    died = f"The actor is dead because its worker process has died. ... Exit code: 1. {SIGTERM_DEATH}"
    trials = {"killed": ("ERROR", 1, [died]),  # name: (status, num_failures, the failures error.txt records)
              "again": ("PENDING", 2, ["RuntimeError: boom", died]),  # its own failure, then a preemption
              "raised": ("ERROR", 2, [died, "RuntimeError: boom"]),  # failed by its own error at the end
              "running": ("RUNNING", 0, [])}
    data = []
    for name, (status, failures, errors) in trials.items():
        (exp / name).mkdir(parents=True)
        (exp / name / "error.txt").write_text("".join(f"Failure # {i} (occurred at 2026-12-07_10-00-0{i})\n{e}\n"
                                                      for i, e in enumerate(errors, 1)))
        run = {"num_failures": failures, "error_filename": "error.txt" if errors else None}
        data.append([json.dumps({"trial_id": name, "status": status, "relative_logdir": name}), json.dumps(run)])
    state = exp / "experiment_state-2026-01-01.json"
    state.write_text(json.dumps({"trial_data": data, "runner_data": {"kept": 1}}))

    notes = uncount_shutdown_deaths(str(exp))
    saved = json.loads(state.read_text())
    assert {json.loads(t)["trial_id"]: (json.loads(t)["status"], json.loads(r)["num_failures"])
            for t, r in saved["trial_data"]} == {"killed": ("PENDING", 0), "again": ("PENDING", 1),
                                                 "raised": ("ERROR", 1), "running": ("RUNNING", 0)}
    assert saved["runner_data"] == {"kept": 1} and len(notes) == 3
    assert all(len(n.splitlines()) == 1 and "SIGTERM" in n for n in notes)
    assert ["resumed from its last checkpoint" in n for n in notes] == [True, False, False]
    assert uncount_shutdown_deaths(str(exp)) == []  # a second resume counts the same


def test_a_checkpoint_tune_deleted_before_its_snapshot_is_replaced_by_the_newer_one(tmp_path):
    # Tune (num_to_keep=1) deletes checkpoint_000003 on registering checkpoint_000004 and snapshots after;
    # a kill in between leaves a state naming checkpoint_000003 (as it happened in the interrupt test)
    import pickle

    import pyarrow.fs as pafs
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

    from pgps_tune.tuner import REPAIR_MARK, repair_trial_checkpoints

    exp = tmp_path / "exp"

    def state(trials):  # {name: (status, named checkpoint index)}: an experiment state as Tune writes it
        data = []
        for name, (status, index) in trials.items():
            manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
            manager.register_checkpoint(_TrainingResult(
                Checkpoint(str(exp / name / f"checkpoint_{index:06d}")), {"epoch": index}))
            run = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(manager).hex()}}
            data.append([json.dumps({"trial_id": name, "status": status, "relative_logdir": name}), json.dumps(run)])
        (exp / "experiment_state-2026-01-01.json").write_text(json.dumps({"trial_data": data}))

    def checkpoints(name):
        return {p.name: (p / "epoch").read_text() for p in sorted((exp / name).glob("checkpoint_*"))}

    for name, kept in {"a": (4, 5), "b": (3,), "done": (1,), "lost": ()}.items():
        for index in kept:  # a: 4 registered, 5 uploaded but not registered yet; b: as named
            (exp / name / f"checkpoint_{index:06d}").mkdir(parents=True)
            (exp / name / f"checkpoint_{index:06d}" / "epoch").write_text(str(index))
        (exp / name).mkdir(parents=True, exist_ok=True)
    state({"a": ("PENDING", 3), "b": ("RUNNING", 3), "done": ("TERMINATED", 0), "lost": ("PENDING", 2)})
    notes = repair_trial_checkpoints(str(exp))
    assert len(notes) == 2 and all(len(n.splitlines()) == 1 for n in notes)
    assert "checkpoint_000003" in notes[0] and "checkpoint_000004" in notes[0]  # the oldest newer one
    assert checkpoints("a") == {"checkpoint_000003": "4", "checkpoint_000005": "5"}
    assert checkpoints("b") == {"checkpoint_000003": "3"} and checkpoints("done") == {"checkpoint_000001": "1"}
    assert "no newer one" in notes[1] and "lost" in notes[1]  # nothing to put in place: said, left to Tune
    assert repair_trial_checkpoints(str(exp)) == notes[1:]  # a second resume finds nothing more to do

    # storage that cannot move folders (S3): copied, then the source deleted; a kill half-way through the
    # copy (target partial, source whole, the move written down) is finished by the next resume
    local = pafs.LocalFileSystem()

    class NoFolderMoves(pafs.FileSystemHandler):  # the local file system, but folders cannot be moved
        def __eq__(self, other):
            return isinstance(other, NoFolderMoves)

        def __ne__(self, other):
            return not isinstance(other, NoFolderMoves)

        def get_type_name(self):
            return "nofoldermoves"

        def normalize_path(self, path):
            return local.normalize_path(path)

        def get_file_info(self, paths):
            return local.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return local.get_file_info(selector)

        def create_dir(self, path, recursive):
            local.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            local.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise NotImplementedError

        def delete_file(self, path):
            local.delete_file(path)

        def move(self, src, dest):
            if local.get_file_info(src).type == pafs.FileType.Directory:
                raise NotImplementedError("folders cannot be moved here")
            local.move(src, dest)

        def copy_file(self, src, dest):
            local.copy_file(src, dest)

        def open_input_stream(self, path):
            return local.open_input_stream(path)

        def open_input_file(self, path):
            return local.open_input_file(path)

        def open_output_stream(self, path, metadata):
            return local.open_output_stream(path)

        def open_append_stream(self, path, metadata):
            return local.open_append_stream(path)

    fs = pafs.PyFileSystem(NoFolderMoves())
    state({"a": ("PENDING", 2)})
    repair_trial_checkpoints(str(exp), fs)
    assert checkpoints("a") == {"checkpoint_000002": "4", "checkpoint_000005": "5"}
    (exp / "a" / "checkpoint_000003").mkdir()  # a copy of checkpoint_000005 into place, cut short
    (exp / "a" / REPAIR_MARK).write_text(json.dumps({"source": str(exp / "a" / "checkpoint_000005"),
                                                     "target": str(exp / "a" / "checkpoint_000003")}))
    state({"a": ("PENDING", 3)})
    assert repair_trial_checkpoints(str(exp), fs) == []
    assert checkpoints("a") == {"checkpoint_000002": "4", "checkpoint_000003": "5"}
    assert not (exp / "a" / REPAIR_MARK).exists()


def test_ray_errors_it_recovers_from_are_logged_in_one_line(caplog):
    import logging

    from pgps_tune.tuner import OneLineRayErrors, _one_line_ray_errors

    _one_line_ray_errors()
    log = logging.getLogger(OneLineRayErrors.LOGGERS[0])
    try:
        raise FileNotFoundError(2, "Failed to open local file", "/tmp/x/.tmp_searcher_ckpt")
    except FileNotFoundError:
        log.error("Saving experiment state to storage failed with exception: ", exc_info=True)
    (record,) = [r for r in caplog.records if r.name == log.name]
    assert record.exc_info is None and "Traceback" not in caplog.text
    assert record.getMessage() == ("Saving experiment state to storage failed with exception: (FileNotFoundError: "
                                   "[Errno 2] Failed to open local file: '/tmp/x/.tmp_searcher_ckpt')")


def test_a_trial_restored_from_its_final_checkpoint_says_its_result_again_without_training(tmp_path, monkeypatch):
    # a kill in the second between a trial's last report and Tune's next snapshot: the resumed sweep restores
    # the trial as running, from its final checkpoint; it must end on its final result, not on an older one
    import types

    import ray
    from ray import tune

    from pgps_tune import tuner
    from pgps_tune.data import prepare

    budget = {**BUDGET, "epochs": 2, "iterations_per_epoch": 2, "val_every": 1, "filters": [4, 8, 16],
              "synthetic_cases": 4, "synthetic_shape": [16, 16, 16]}
    space = sp.load(write_space(tmp_path / "s.yaml", budget=budget))
    ds = prepare("synthetic", cache_root=tmp_path / "cache", synthetic_cases=4, synthetic_shape=[16, 16, 16])
    setup = tuner.trial_setup(space, "synthetic", ds.cache_dir, (16, 16, 16), (2, 2, 2), 1.0, 0.0)
    reports, restored = [], []

    def report(metrics, checkpoint=None):
        kept = tmp_path / f"checkpoint_{len(reports)}"
        checkpoint.to_directory(str(kept))
        reports.append((metrics, kept))

    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: restored[-1] if restored else None)
    config = {"stages": 2, "growth": 2.0, "mode": "resource"}
    tuner.run_trial(config, setup)
    assert [m["epoch"] for m, _ in reports] == [1, 2] and reports[-1][0]["completed"]
    final, kept = reports[-1]
    restored.append(tune.Checkpoint.from_directory(str(kept)))
    before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    tuner.run_trial(config, setup)
    assert len(reports) == 3 and reports[-1][0] == final  # the same result again, nothing trained
    again = reports[-1][1]
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == before


def test_trials_are_read_in_the_order_tune_created_them(tmp_path):
    # the state lists trials in the order they first reached a snapshot (several at once in set order)
    import pyarrow.fs as pafs

    from pgps_tune.tuner import read_experiment

    def entry(tid, tag):
        trial = {"trial_id": tid, "status": "TERMINATED", "config": {}, "relative_logdir": f"run_trial_{tid}",
                 **({"experiment_tag": tag} if tag else {})}
        return [json.dumps(trial), json.dumps({"num_failures": 0, "last_result": {}})]

    listed = [("c", "3_stages=2"), ("a", "1_stages=1"), ("j", "10_stages=1"), ("x", None), ("b", "2")]
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [entry(*e) for e in listed]}))
    assert [t.trial_id for t in read_experiment(pafs.LocalFileSystem(), str(tmp_path))] == ["a", "b", "c", "j", "x"]


def test_files_of_a_sweep_someone_sent_cannot_fill_the_memory(tmp_path, monkeypatch):
    # files of 8 GiB that take no disk (sparse): a trial's error file is read from its end, any other file
    # of the Tune state or the study is refused in one line past the size limit, having read no more than that
    import pyarrow.fs as pafs

    from pgps_tune import tuner
    from pgps_tune.errors import PgpsError

    monkeypatch.setattr(tuner, "MAX_JSON_BYTES", 1 << 20)
    trial = {"trial_id": "t1", "status": "ERROR", "config": {}, "relative_logdir": "t1"}
    state = tmp_path / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text(json.dumps({"trial_data": [[json.dumps(trial), json.dumps({"error_filename": "error.txt"})]]}))
    (tmp_path / "t1").mkdir()
    error = tmp_path / "t1" / "error.txt"
    error.write_bytes(b"Traceback (most recent call last):\nValueError: \x1b[31mbad\n")
    os.truncate(error, 8 << 30)
    with error.open("ab") as fh:  # the traceback's last line, after 8 GiB of zeros
        fh.write(b"\nValueError: \x1b[2Jbad input\n")
    fs = pafs.LocalFileSystem()
    assert tuner.read_experiment(fs, str(tmp_path))[0].error == "ValueError: ?[2Jbad input"
    os.truncate(state, 8 << 30)
    with pytest.raises(PgpsError, match="experiment_state.* is larger than 1 MiB.*move it out of the sweep folder"):
        tuner.read_experiment(fs, str(tmp_path))
    journal = tmp_path / tuner.STUDY_FILE
    journal.write_bytes(b'{"op_code": 0}\n')
    os.truncate(journal, 8 << 30)
    with pytest.raises(PgpsError, match="the Optuna study .* is larger than 1 MiB"):
        tuner.check_journal(tmp_path)
    journal.write_text('{"op_code": 0}\n' + "[" * 100_000 + "]" * 100_000 + "\n")  # too deep for json.loads
    with pytest.raises(PgpsError, match="line 2 is not a journal record"):
        tuner.check_journal(tmp_path)


def test_a_second_driver_on_a_sweep_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    from pgps_tune.tuner import SWEEP_LOCK

    out, space = tmp_path / "sweep", write_space(tmp_path / "s.yaml")
    hold = ("import sys\nfrom pathlib import Path\nfrom pgps_tune.tuner import sweep_lock\n"
            "with sweep_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for extra in ([], ["--resume"]):  # a new sweep on the same --out, a resume typed while it runs
            assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), *extra]) == 2
            line = error_line(capsys.readouterr().err)
            assert line.startswith(f"pgps-tune: error: {out} is in use by another pgps-tune command "
                                   f"(pgps-tune tune, pid {holder.pid} "
                                   f"on "), line
            assert "then continue with --resume" in line
        assert [p.name for p in out.iterdir()] == [SWEEP_LOCK]  # the refused drivers wrote nothing
    finally:
        holder.kill()  # kill -9: the kernel drops an flock however its holder ends
        holder.wait()
    # the lock file it left is no obstacle; a driver refused on its input (nothing started) removes it
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--resume"]) == 2
    assert "--resume given but" in error_line(capsys.readouterr().err)
    assert not (out / SWEEP_LOCK).exists()


def test_a_sweep_folder_on_a_file_system_without_locks_runs_with_a_warning(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    from pgps_tune.tuner import SWEEP_LOCK, sweep_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with sweep_lock(tmp_path / "nfs"):
        pass
    err = capsys.readouterr().err
    assert "warning: cannot lock" in err and "No locks available" in err and "run one at a time" in err
    assert not (tmp_path / "nfs" / SWEEP_LOCK).exists()  # no sweep.json written: the folder is left as found
