"""A sweep folder's identity: a copied or moved folder reads and writes only itself, a resume continues the
sweep it names (and refuses what would relabel or lose it), and the commands that write a sweep folder take
its lock.

One tiny finished sweep is run once for the module; each test works on copies of it (or on the bookkeeping
around Tune alone), never on the sweep itself, which every test checks is left as it was.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_tuner import BUDGET, error_line, write_space

from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.tuner import SWEEP_LOCK


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file (but the lock file, which names its latest holder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SWEEP_LOCK}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _session_ray):
    """(sweep folder, space file, sha256 of each of its files): a finished 2-trial TPE sweep, no references."""
    import ray

    from pgps_tune.tuner import start_ray

    root = tmp_path_factory.mktemp("finished")
    space = write_space(root / "s.yaml", parameters={"stages": {"type": "int", "low": 2, "high": 3},
                                                    "growth": {"type": "float", "low": 1.5, "high": 2.5},
                                                    "lr": {"value": BUDGET["lr"]}},
                        search={"num_samples": 2, "references": False}, asha={"enabled": False},
                        budget={**BUDGET, "iterations_per_epoch": 2, "val_every": 10, "synthetic_cases": 4})
    out = root / "orig"
    with pytest.MonkeyPatch.context() as mp:  # the test's own fixtures come after this one
        mp.setenv("PGPS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        if not ray.is_initialized():
            start_ray(None)
        assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet",
                     "--max-concurrent", "1", "--results-store", str(root / "store")]) == 0
    assert (out / "optuna.journal").stat().st_size > 0 and len(pq.read_table(out / "trials.parquet")) == 2
    return out, space, _hashes(out)


@pytest.fixture(autouse=True)
def _untouched(request, tmp_path, monkeypatch):
    """Every test leaves the module's sweep exactly as it was (a copy must never write into it)."""
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    yield
    if "finished" in request.fixturenames:
        out, _, hashes = request.getfixturevalue("finished")
        assert _hashes(out) == hashes


def _copy(finished, dest: Path) -> Path:
    shutil.copytree(finished[0], dest, symlinks=True)
    return dest


def _refused(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    return error_line(capsys.readouterr().err)


def _search_state(sweep: Path) -> Path:
    return max((sweep / "ray" / "orig-search").glob("experiment_state-*.json"))


# -- where a sweep's Tune storage is -------------------------------------------------------------------


def test_local_storage_is_the_folders_own_remote_and_external_storage_stay(tmp_path):
    from pgps_tune.results import shared_storage, tune_storage

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    meta = {"storage": None, "storage_path": f"{a}/ray", "folder": str(a)}
    assert tune_storage(a, meta) == (f"{a}/ray", None)
    path, note = tune_storage(b, meta)
    assert path == f"{b}/ray" and str(a) in note and len(note.splitlines()) == 1
    assert tune_storage(b, {"storage": None, "storage_path": f"{a}/ray"})[0] == f"{b}/ray"  # before "folder"
    inside = {"storage": "tune", "storage_path": f"{a}/tune", "folder": str(a)}  # a --storage inside the folder
    assert tune_storage(b, inside)[0] == f"{b}/tune"
    for storage, where in (("s3://bucket/ray", "bucket/ray"), (str(tmp_path / "ext"), str(tmp_path / "ext"))):
        meta = {"storage": storage, "storage_path": where, "folder": str(a)}
        assert tune_storage(b, meta) == (where, None)
        assert shared_storage(b, meta) is None  # a holds no sweep: b was moved, and is the only one
        (a / "sweep.json").write_text("{}")
        assert shared_storage(b, meta) == str(a) and shared_storage(a, meta) is None
        (a / "sweep.json").unlink()
    assert shared_storage(b, inside) is None


def test_a_copy_exports_its_own_trials_and_a_moved_sweep_exports(finished, tmp_path, capsys):
    copy = _copy(finished, tmp_path / "copy")
    # the copy's search experiment loses a trial: its export must show that, not the original's two
    state = _search_state(copy)
    data = json.loads(state.read_text())
    data["trial_data"] = data["trial_data"][:1]
    state.write_text(json.dumps(data))
    assert main(["export", "--experiment", str(copy), "--out", str(copy)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pgps-tune: note:")]
    assert len(notes) == 1 and f"{copy}/ray" in notes[0] and str(finished[0]) in notes[0]
    assert len(pq.read_table(copy / "trials.parquet")) == 1
    meta = json.loads((copy / "sweep.json").read_text())  # from now on it names its own storage (report reads it)
    assert meta["storage_path"] == f"{copy.resolve()}/ray" and meta["folder"] == str(copy.resolve())
    assert main(["export", "--experiment", str(copy), "--out", str(copy)]) == 0
    assert "note:" not in capsys.readouterr().err
    moved = tmp_path / "moved"
    _copy(finished, tmp_path / "to-move").rename(moved)
    assert main(["export", "--experiment", str(moved), "--out", str(tmp_path / "x")]) == 0
    assert pq.read_table(tmp_path / "x" / "trials.parquet") == pq.read_table(finished[0] / "trials.parquet")


def test_confirm_on_a_copy_trains_into_the_copy(finished, tmp_path, monkeypatch):
    # the bookkeeping around Tune: where the confirmation's experiment would go, and what sweep.json records
    import contextlib
    import signal

    from pgps_tune import tuner

    copy = _copy(finished, tmp_path / "copy")
    calls = []

    def run_phase(phase, opts, setup, fs, path, name, *args, **kwargs):
        calls.append((path, name))
        raise tuner.SweepInterrupted(signal.SIGINT)

    monkeypatch.setattr(tuner, "run_phase", run_phase)
    monkeypatch.setattr(tuner, "_ray_session", lambda opts, signals: contextlib.nullcontext())
    with pytest.raises(tuner.SweepInterrupted):
        tuner.confirm(tuner.ConfirmOptions(sweep=copy, seeds=2, quiet=True))
    assert calls == [(f"{copy}/ray", "orig-confirm")]
    meta = json.loads((copy / "sweep.json").read_text())
    assert meta["storage_path"] == f"{copy}/ray" and meta["folder"] == str(copy)
    assert meta["pending_confirm"]["key"] == "confirm"


# -- resume ----------------------------------------------------------------------------------------------


def test_a_restored_searcher_continues_the_journal_of_this_folder(tmp_path):
    import optuna

    from pgps_tune.tuner import DefineByRun, PrunedAwareOptunaSearch, study_storage

    space = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 3}}})
    a = tmp_path / "a"
    a.mkdir()
    search = PrunedAwareOptunaSearch(DefineByRun(space), metric="score", mode="max", study_name="s",
                                     sampler=optuna.samplers.TPESampler(seed=0), storage=study_storage(a))
    search.suggest("t1")
    search.suggest("t2")
    search.save(str(a / "searcher-state.pkl"))
    b = Path(shutil.copytree(a, tmp_path / "b"))
    before = (a / "optuna.journal").read_bytes()
    restored = PrunedAwareOptunaSearch(DefineByRun(space), metric="score", mode="max", study_name="s",
                                       sampler=optuna.samplers.TPESampler(seed=0), storage=study_storage(b))
    with PrunedAwareOptunaSearch.journal_of(b):
        restored.restore(str(b / "searcher-state.pkl"))
    assert PrunedAwareOptunaSearch.journal is None  # only while a phase runs
    restored.on_trial_complete("t1", {"score": 0.7, "completed": True})
    restored.suggest("t3")
    assert (a / "optuna.journal").read_bytes() == before  # the folder it was copied from is untouched
    study = optuna.load_study(study_name="s", storage=study_storage(b))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "RUNNING"]
    assert study.trials[0].value == 0.7


def test_resume_of_a_renamed_copy_continues_that_sweep_in_the_copy(finished, tmp_path, capsys, shared_ray):
    out, space, _ = finished
    copy = _copy(finished, tmp_path / "renamed")
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(copy), "--resume", "--quiet",
                 "--max-concurrent", "1"]) == 0
    assert "pgps-tune: note:" in capsys.readouterr().err
    meta, was = json.loads((copy / "sweep.json").read_text()), json.loads((out / "sweep.json").read_text())
    assert meta["sweep"] == "orig" and meta["experiments"] == was["experiments"] and meta["study"] == "orig"
    assert meta["finished"] is True and meta["storage_path"] == f"{copy.resolve()}/ray"
    assert sorted(p.name for p in (copy / "ray").iterdir()) == sorted(p.name for p in (out / "ray").iterdir())
    assert pq.read_table(copy / "trials.parquet") == pq.read_table(out / "trials.parquet")  # nothing retrained


def test_a_resume_that_differs_or_cannot_continue_is_refused_before_anything_changes(finished, tmp_path, capsys,
                                                                                     tiny_msd):
    out, space, _ = finished
    copy = _copy(finished, tmp_path / "c")
    tune = ["tune", "--space", space, "--data", "synthetic", "--out", copy, "--resume", "--quiet"]
    kept = _hashes(copy)
    line = _refused(capsys, [*tune, "--epochs", "12"])
    assert "other settings than it ran with (budget.epochs: 10 then, 12 now)" in line
    line = _refused(capsys, [*tune[:4], tiny_msd, *tune[5:]])
    assert f"the data (--data): synthetic then, {tiny_msd} now" in line
    line = _refused(capsys, [*tune, "--final-patch", "8", "8", "8"])
    assert "budget.final_patch: [16, 16, 16] then, [8, 8, 8] now" in line
    assert "--storage" in _refused(capsys, [*tune, "--storage", tmp_path / "elsewhere"])
    journal = copy / "optuna.journal"
    good = journal.read_bytes()
    for damaged, why in ((good[: len(good) // 2], "last line is cut short"), (good + b"\x93\xff garbage\n", "line")):
        journal.write_bytes(damaged)
        line = _refused(capsys, tune)
        assert f"the Optuna study {journal} is damaged" in line and why in line and "put back" in line
    journal.write_bytes(good)
    assert _hashes(copy) == kept  # sweep.json still says finished: the sweep still exports
    assert main(["export", "--experiment", str(copy), "--out", str(tmp_path / "e")]) == 0
    # an experiment state that parses but that Tune cannot read: Tune would start the phase over
    state = _search_state(copy)
    good = state.read_bytes()
    state.write_text("{}")
    assert "is not a Tune experiment state this version reads" in _refused(capsys, tune)
    state.write_bytes(good)
    assert _hashes(copy) == kept
    # the search's only experiment state cut short, no copy of it kept: Tune would start the phase over
    state.write_bytes(state.read_bytes()[:200])
    shutil.rmtree(copy / "ray" / "orig-search" / ".pgps-state")
    line = _refused(capsys, tune)
    assert f"{state} is cut short" in line and "cannot be resumed" in line and "saved before it" not in line
    assert state.stat().st_size == 200 and json.loads((copy / "sweep.json").read_text())["finished"] is True


# -- confirm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, got", [
    ({"train": ["case_000"], "val": ["case_001"]}, "a JSON object, not a list"),
    ([], "a list of 0"),
    ([{"train": ["case_000"], "val": ["case_001"]}], "a list of 1"),
    ([{"train": ["case_000"], "val": ["case_001"]}, ["case_002"]], "an entry that is not such a fold"),
])
def test_confirm_refuses_a_splits_file_that_is_not_folds_and_changes_nothing(finished, tmp_path, capsys, content,
                                                                              got):
    copy = _copy(finished, tmp_path / "c")
    kept = _hashes(copy)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps(content))
    line = _refused(capsys, ["confirm", copy, "--splits", splits])
    assert "must be a list of at least 2 cross-validation folds" in line and got in line, line
    assert _hashes(copy) == kept


def test_confirm_and_export_into_a_sweep_folder_in_use_are_refused_naming_the_holder(finished, tmp_path, capsys):
    copy = _copy(finished, tmp_path / "c")
    hold = ("import sys\nfrom pathlib import Path\nfrom pgps_tune.tuner import sweep_lock\n"
            "with sweep_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        kept = _hashes(copy)
        for argv in (["confirm", copy, "--seeds", "2"], ["export", "--experiment", copy, "--out", copy]):
            line = _refused(capsys, argv)
            assert f"{copy} is in use by another pgps-tune command (pgps-tune tune, pid {holder.pid} on " in line
        assert _hashes(copy) == kept
        # an export into another folder only reads the sweep
        assert main(["export", "--experiment", str(copy), "--out", str(tmp_path / "elsewhere")]) == 0
    finally:
        holder.kill()
        holder.wait()
