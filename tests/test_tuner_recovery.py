"""Sweeps that must survive what goes wrong: interrupts and kills, failed and diverged trials, storage on
S3, and a cluster that loses the node of a trial.

Split from tests/test_tuner.py (whose helpers they use) so that the two halves run side by side under
pytest-xdist.  Each starts a Ray of its own: they kill it, inject failures through the environment of
its workers, or join a cluster.
"""

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ray_processes
from test_tuner import (  # noqa: F401 (_ray_shutdown and _store: test_tuner's autouse fixtures, here too)
    BUDGET,
    WAIT_S,
    _ray_shutdown,
    _store,
    cli,
    error_line,
    finish,
    reported_epochs,
    rows,
    run,
    start,
    strict_json,
    wait_for,
    write_space,
)

from pgps_tune.cli import main

FAILURE_HOOK = '''
"""Written by tests/test_tuner_recovery.py: fail chosen trials at an epoch (PGPS_TEST_FAILURES, JSON).

Trials, also on Ray workers, import this through PYTHONPATH; it wraps the trainer's report
callback once pgps_tune.trainer is imported.  {"epoch": E, "lr": {"<lr>": times}, "marks": DIR}:
a trainer with that learning rate raises at its first report at or past epoch E, ``times``
times in all (counted in DIR); "kill": "<lr>": after that, the process of that trainer kills
itself there with SIGKILL, as the kernel's OOM killer ends a worker.
"""
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

SPEC = json.loads(os.environ.get("PGPS_TEST_FAILURES") or "null")


def _patch(module):
    original = module.Trainer.__init__

    def __init__(self, ds, train_cases, val_cases, schedule, config, *args, callback=None, **kwargs):
        def failing(r):
            marks = Path(SPEC["marks"]) / str(config.lr)
            done = len(marks.read_text()) if marks.exists() else 0
            if r["epoch"] >= SPEC["epoch"] and done < SPEC["lr"].get(str(config.lr), 0):
                marks.write_text("x" * (done + 1))
                raise RuntimeError(f"injected failure at epoch {r['epoch']}")
            if r["epoch"] >= SPEC["epoch"] and str(config.lr) == SPEC.get("kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            callback(r)

        original(self, ds, train_cases, val_cases, schedule, config, *args, callback=failing, **kwargs)
        if str(config.lr) == SPEC.get("diverge"):  # every loss of this trial is NaN, as a diverging run's
            self.loss_fn = lambda out, label: out.float().mean() * float("nan")

    module.Trainer.__init__ = __init__


class _PatchTrainer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pgps_tune.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if SPEC:
    sys.meta_path.insert(0, _PatchTrainer())
'''


# -- interrupts and resume ----------------------------------------------------------------------


def _trial_states(out: Path) -> dict[str, tuple[str, dict]]:
    """{trial id: (Tune status, last result)} from the search phase's experiment state (read as JSON)."""
    import pyarrow.fs as pafs

    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import read_experiment

    exp = next((out / "ray").glob("*-search"), None)
    try:
        return {} if exp is None else {t.trial_id: (t.status, t.last_result)
                                       for t in read_experiment(pafs.LocalFileSystem(), str(exp))}
    except PgpsError:
        return {}  # not written yet


def _stopped_cleanly(proc, log: Path, ray_tmp: str, out: Path, rc: int) -> list[str]:
    """The interrupted command's resume line, after checking what an interrupt must leave."""
    assert finish(proc, log) == rc, log.read_text()[-3000:]
    lines = log.read_text().strip().splitlines()
    assert "Traceback" not in log.read_text() and "nothing was exported" in lines[-2], lines[-3:]
    resume = shlex.split(lines[-1])
    assert resume[-1] == "--resume" and str(out) in resume
    assert not any((out / f).exists() for f in ("trials.parquet", "best_schedule.yaml", "summary.json"))
    assert not (out.parent / "store").exists()  # nothing in the results store
    assert strict_json(out / "sweep.json")["finished"] is False
    wait_for(lambda: not ray_processes(ray_tmp), "exit of the local Ray the command started")
    return resume


def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(tmp_path, ray_tmp, monkeypatch):
    write_space(tmp_path / "s.yaml", search={"num_samples": 3, "references": False},
                asha={"enabled": False})
    out, log = tmp_path / "sweep", tmp_path / "driver.log"
    env = {"RAY_TMPDIR": ray_tmp}
    monkeypatch.chdir(tmp_path)  # relative paths in the command; the printed resume line must work from anywhere
    cmd = [sys.executable, "-m", "pgps_tune.cli", "tune", "--space", "s.yaml", "--data", "synthetic",
           "--out", "sweep", "--max-concurrent", "1", "--quiet"]

    def reports() -> int:
        return sum(map(len, reported_epochs(out).values()))

    # 1. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once a trial has reported
    proc = start(cmd, log, env)
    wait_for(lambda: reports() >= 1, "first report", proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    resume = _stopped_cleanly(proc, log, ray_tmp, out, 130)
    clean = reported_epochs(out)
    for epochs in clean.values():  # a clean stop neither lost nor repeated a report
        assert epochs == list(range(2, 2 * len(epochs) + 1, 2))
    # Tune deletes a trial's checkpoint when it registers the next and snapshots after: a kill between
    # the two leaves a state naming a checkpoint that is gone (as it happened to this test): made here
    # for a trial the state will resume, its named checkpoint found under the next number only
    import pyarrow.fs as pafs

    from pgps_tune.tuner import named_checkpoints

    exp = next((out / "ray").glob("*-search"))
    racing = sorted((tid, Path(trial_dir), name) for tid, status, trial_dir, name
                    in named_checkpoints(pafs.LocalFileSystem(), str(exp)) if status != "TERMINATED")
    assert racing, _trial_states(out)  # the first report came with a checkpoint
    tid, trial_dir, named = racing[0]
    for newer in trial_dir.glob("checkpoint_*"):  # uploads Tune had not registered when it stopped
        if newer.name > named:
            shutil.rmtree(newer)
    (trial_dir / named).rename(trial_dir / f"checkpoint_{int(named[11:]) + 1:06d}")
    # 2. kill -9 of the driver and its Ray between two known states: a trial finished in the experiment
    #    state, and another one running with a checkpoint
    proc = start(resume, log, env)
    n_clean = sum(map(len, clean.values()))

    def finished_and_running():  # in a state the resumed run wrote, not the one the interrupt left
        if reports() <= n_clean:
            return None
        states = _trial_states(out)
        done = {t for t, (status, _) in states.items() if status == "TERMINATED"}
        running = any(status == "RUNNING" and result.get("epoch") for status, result in states.values())
        return done if done and running else None

    finished = wait_for(finished_and_running, "a finished trial beside a running one", proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert f"trial {tid}: the experiment state names checkpoint {named}" in log.read_text(), log.read_text()[-3000:]
    killed = reported_epochs(out)
    known = set(_trial_states(out))  # the trials in the experiment snapshot the resume restores
    # 3. the printed command completes the sweep, here in a copy of its folder: the copy continues its own
    #    Tune state and Optuna study (the searcher's state names the original's journal), the original is
    #    left as it was
    def outlived() -> list[int]:  # the killed driver's Ray workers (retitled: found by their environment)
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and ray_tmp.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    for pid in outlived():  # a worker that outlived it goes on training its trial into the original folder
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not outlived(), "the end of the killed Ray's last processes")
    original, out = out, tmp_path / "copy"
    shutil.copytree(original, out, symlinks=True)
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file() and p.name != ".pgps-sweep.lock"}
    done = run([str(out) if a == str(original) else a for a in resume], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pgps-tune: note:" in done.stderr and f"{out}/ray" in done.stderr
    now = {p: p.read_bytes() for p in original.rglob("*") if p.is_file() and p.name != ".pgps-sweep.lock"}
    assert now == before, sorted((str(p), p.stat().st_mtime) for p in now if now.get(p) != before.get(p))
    table = rows(out)
    assert len(table) == 3 and len({r["trial_id"] for r in table}) == 3  # none lost, none duplicated
    assert all(r["completed"] for r in table), [(r["trial_id"], r["status"], r["error"]) for r in table]
    assert strict_json(out / "sweep.json")["finished"]
    after = reported_epochs(out)
    ids = {r["trial_id"] for r in table}
    # every trial the snapshot knew is in the table; a trial started in the instant between the driver's
    # last snapshot and the kill (its reports written by its worker, unknown to the snapshot) cannot be
    # restored: its partial run is dropped, and the search trains a new trial in its place
    assert ids <= set(after) and not (set(after) - ids) & known, (sorted(after), sorted(ids), sorted(known))
    after = {tid: epochs for tid, epochs in after.items() if tid in ids}
    for tid, epochs in after.items():
        assert epochs.count(2) == 1 and epochs[-1] == 10, f"trial {tid} restarted from scratch: {epochs}"
        assert epochs[: len(clean.get(tid, []))] == clean.get(tid, [])
        if tid in finished:
            assert epochs == killed[tid]  # a finished trial is not run again
    # the resumes continued the sweep's one Optuna study: each trial told once, with its final score
    import optuna

    from pgps_tune.tuner import study_storage

    study = optuna.load_study(study_name="sweep", storage=study_storage(out)).trials
    told = sorted(t.value for t in study if t.state == optuna.trial.TrialState.COMPLETE)
    assert told == sorted(r["score"] for r in table)
    # any other study trial was asked just before a kill and never trained: ended as FAIL
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study if t.value is None)


# -- failures ------------------------------------------------------------------------------------


def test_failed_and_diverged_trials(tmp_path):
    # a grid over the learning rate: 0.01 fails once at epoch 4, 0.012 fails there once and then its worker
    # dies there (SIGKILL, as the OOM killer's), 0.013 diverges
    # (its loss is made NaN by the hook: the learning rates a space may hold are too sane to diverge for sure).
    # The space allows no retry; --max-failures 1 allows one, from the last checkpoint.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILURE_HOOK)
    space = write_space(tmp_path / "s.yaml", parameters={"stages": {"value": 1}, "lr": {
        "type": "categorical", "choices": [0.01, 0.012, 0.013]}}, search={"algorithm": "grid", "references": False},
        asha={"enabled": False}, budget={**BUDGET, "max_failures": 0})
    out = tmp_path / "sweep"
    env = {"PGPS_TEST_FAILURES": json.dumps({"epoch": 4, "lr": {"0.01": 1, "0.012": 1}, "kill": "0.012",
                                             "diverge": "0.013", "marks": str(hook)}),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    r = cli("tune", "--space", space, "--data", "synthetic", "--out", out, "--max-failures", "1",
            "--max-concurrent", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 trials: 1 completed, 0 stopped early, 2 failed." in r.stdout
    by_lr = {json.loads(x["params"])["lr"]: x for x in rows(out)}
    once, dies, diverged = by_lr[0.01], by_lr[0.012], by_lr[0.013]
    assert once["completed"] and once["num_failures"] == 1
    # continued from the epoch-2 checkpoint, not from scratch
    assert reported_epochs(out)[once["trial_id"]] == [2, 4, 6, 8, 10]
    # a worker that died is a failed trial like any other (Tune's state once kept it RUNNING: 'not finished')
    assert dies["status"] == "failed" and dies["num_failures"] == 2
    assert "worker process has died" in dies["error"] and reported_epochs(out)[dies["trial_id"]] == [2]
    # divergence: failed at once with the reason, never retried, and no score for anyone to rank
    assert diverged["status"] == "failed" and diverged["failed"] and diverged["num_failures"] == 0
    assert diverged["error"].startswith("diverged:") and math.isnan(diverged["score"])
    assert "diverged" in r.stderr
    summary = strict_json(out / "summary.json")
    assert summary["failed"] == 2 and summary["best"]["trial_id"] == once["trial_id"]
    strict_json(out / "sweep.json")


# -- storage and clusters -------------------------------------------------------------------------


@pytest.fixture
def s3_server(tmp_path):
    """A local S3 (moto) on loopback, with one bucket."""
    import socket

    import pyarrow.fs as pafs

    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    # the free port is released before moto binds it, so another process can take it in between (moto then
    # exits at once): up to three ports are tried
    for attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fs = pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}",
                               scheme="http", region="us-east-1", allow_bucket_creation=True)

        def bucket_made(fs=fs, proc=proc):
            try:
                fs.create_dir("sweeps")
                return True
            except OSError:
                return proc.poll() is not None  # moto could not bind: try another port

        wait_for(bucket_made, "moto S3 server", None, limit=60)
        if proc.poll() is None:
            break
        assert attempt < 2, f"moto_server exited ({proc.returncode}) on three free ports"
    try:
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", env, fs
    finally:
        proc.kill()
        proc.wait()


def test_storage_on_s3_resume_and_export(tmp_path, s3_server, ray_tmp, monkeypatch, capsys):
    import pyarrow.fs as pafs

    query, env, fs = s3_server
    env = {**env, "RAY_TMPDIR": ray_tmp}
    space = write_space(tmp_path / "s.yaml", search={"num_samples": 1, "references": False},
                        asha={"enabled": False})
    out, log = tmp_path / "sweep", tmp_path / "driver.log"
    storage = f"s3://sweeps/runs?{query}"
    proc = start([sys.executable, "-m", "pgps_tune.cli", "tune", "--space", str(space), "--data", "synthetic",
                  "--out", str(out), "--quiet", "--storage", storage], log, env)

    def s3_reports():
        try:
            infos = fs.get_file_info(pafs.FileSelector("sweeps/runs/sweep-search", recursive=True))
        except OSError:
            return 0
        return sum(fs.open_input_stream(i.path).read().count(b"\n") for i in infos
                   if i.base_name == "result.json")

    wait_for(lambda: s3_reports() >= 1, "a report on S3", proc, log)
    proc.send_signal(signal.SIGTERM)  # to the driver alone, as a service manager sends it
    resume = _stopped_cleanly(proc, log, ray_tmp, out, 143)
    assert storage in resume
    done = run(resume, env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = rows(out)
    assert len(table) == 1 and table[0]["completed"]
    assert not (out / "ray").exists()  # everything Tune wrote is on S3
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector("sweeps/runs"))]
    assert names == ["sweep-search"]
    # resumed from the S3 checkpoint: each trial's first report is there once.  A report that reached
    # result.json after the last checkpoint the stopped driver recorded is made again by the resumed
    # trial (the same batches, so the same numbers): one restart at most, never from the beginning.
    for i in fs.get_file_info(pafs.FileSelector("sweeps/runs/sweep-search", recursive=True)):
        if i.base_name == "result.json":
            epochs = [json.loads(line)["epoch"] for line in fs.open_input_stream(i.path).read().splitlines()]
            restarts = [k for k in range(1, len(epochs)) if epochs[k] <= epochs[k - 1]]
            assert list(dict.fromkeys(epochs)) == [2, 4, 6, 8, 10] and epochs.count(2) == 1, epochs
            assert len(restarts) <= 1, epochs
    # export reads the experiment back from S3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["export", "--experiment", str(out), "--out", str(tmp_path / "again")]) == 0
    assert rows(tmp_path / "again") == table
    # a bucket that does not exist cannot be written: one line, before Ray starts
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(tmp_path / "o2"),
                 "--storage", f"s3://no-such-bucket/x?{query}"]) == 2
    assert "cannot write to --storage" in error_line(capsys.readouterr().err)


def test_joins_a_cluster_and_survives_losing_the_node_of_a_trial(tmp_path, monkeypatch):
    import ray
    from ray._private import ray_constants

    raylet = Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet"
    if not raylet.exists():
        pytest.skip(f"the Ray binaries are missing ({raylet})")
    if ray.is_initialized():
        ray.shutdown()
    # several nodes on one machine, all on the loopback address
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        workers = {n.node_id for n in cluster.worker_nodes}
        space = write_space(tmp_path / "s.yaml", search={"num_samples": 1, "references": False},
                            budget={**BUDGET, "iterations_per_epoch": 20}, asha={"enabled": False})
        out, log = tmp_path / "sweep", tmp_path / "driver.log"
        cmd = [sys.executable, "-m", "pgps_tune.cli", "tune", "--space", str(space), "--data", "synthetic",
               "--out", str(out), "--quiet", "--address", cluster.address]
        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        proc = start(cmd, log, env)
        def first_report():  # read once: result.json has read empty right after a report was seen (CI, 2026-12-06)
            for f in (out / "ray").glob("*-search/*/result.json"):
                text = f.read_text()
                if "\n" in text:
                    return f, json.loads(text.split("\n", 1)[0])
            return None

        result, first = wait_for(first_report, "a report", proc, log)
        assert first["epoch"] == 2
        lost = first["node_id"]
        assert lost in workers  # the trial runs on a worker node of this cluster
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == lost))
        # Ray has to notice the lost node before it restarts the trial: with two training processes
        # beside it on this 2-core machine, the driver once took longer than WAIT_S to exit
        rc = finish(proc, log, 2 * WAIT_S)
        if rc == -signal.SIGSEGV:
            # Ray's core worker in the driver has segfaulted on a lost node (once in about ten runs here, under
            # a second test's load, 2026-12-06; Ray's own worker fault-tolerance release test saw the same,
            # ray-project/ray#34508). What a user does then must work: the same command with --resume
            # finishes the sweep from the trial's last checkpoint; the node assertions below are for Ray's retry
            assert "Fatal Python error: Segmentation fault" in log.read_text()  # the driver said where it died
            done = run([*cmd, "--resume"], env)
            assert done.returncode == 0, done.stderr[-3000:]
            (trial,) = rows(out)
            assert trial["completed"] and json.loads(result.read_text().splitlines()[-1])["epoch"] == 10
            return
        assert rc == 0, log.read_text()[-3000:]
        reports = [json.loads(line) for line in result.read_text().splitlines()]
        assert [r["epoch"] for r in reports] == [2, 4, 6, 8, 10]  # resumed from its checkpoint elsewhere
        # reports made before the removal took effect come from the lost node (how many depends on
        # timing); every one after the first from elsewhere comes from the one node left, and the last is there
        nodes = [r["node_id"] for r in reports]
        moved = next((i for i, n in enumerate(nodes) if n != lost), None)
        assert moved is not None, f"every report came from the removed node: {nodes}"
        assert set(nodes[:moved]) == {lost} and set(nodes[moved:]) == workers - {lost}, nodes
        (trial,) = rows(out)
        assert trial["completed"] and trial["num_failures"] == 1
    finally:
        cluster.shutdown()


def test_a_signal_while_ray_starts_is_held_until_it_has_started():
    # raised inside ray.init, the interrupt left Ray's agents running after the command had ended
    from pgps_tune.tuner import SweepInterrupted, _stop_signals

    with pytest.raises(SweepInterrupted) as held, _stop_signals() as signals:
        with signals.held():
            os.kill(os.getpid(), signal.SIGINT)
            finished = True  # the block (ray.init) runs to its end
    assert finished and held.value.signum == signal.SIGINT
    with pytest.raises(SweepInterrupted) as second, _stop_signals() as signals:
        with signals.held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: the user insists, it ends the block at once
            pytest.fail("the second signal did not end the block")
    assert second.value.signum == signal.SIGTERM  # the first signal names the interruption


def test_a_second_ctrl_c_inside_rays_wait_is_an_interrupt_not_an_internal_error():
    # Ray's Cython wait polls for signals and turns what the handler raised into a SystemError: a second
    # Ctrl-C while Tune cleaned up its trials ended the sweep as an internal error (exit 1)
    from pgps_tune.tuner import SweepInterrupted, _stop_signals

    with pytest.raises(SweepInterrupted) as got, _stop_signals():
        try:
            raise SweepInterrupted(signal.SIGTERM)
        except SweepInterrupted:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set")  # noqa: B904
    assert got.value.signum == signal.SIGTERM
    with pytest.raises(SystemError, match="its own"), _stop_signals():  # a SystemError of its own stays one
        raise SystemError("its own")
