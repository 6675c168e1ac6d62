"""Every bad input: one line naming the problem and the fix, non-zero exit, nothing corrupted."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import make_msd, write_case

from pgps_tune.cli import main
from pgps_tune.errors import PgpsError

TINY = ["--final-patch", "16", "16", "16", "--pools", "2", "2", "2", "--filters", "4", "8", "16",
        "--iterations-per-epoch", "1", "--quiet"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc, err, needle):
    """Exit 2 and one ``pgps-tune: error:`` line (libraries' warnings may stand beside it)."""
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pgps-tune: error:")]
    assert len(lines) == 1 and needle in lines[0], err


def train(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--epochs", "10", *TINY, *extra]


def train_file(data, out, schedule, *extra):
    """train with a schedule file: the file gives the patches, so TINY's --final-patch and --pools are left out."""
    return ["train", "--data", data, "--out", out, "--epochs", "10", *TINY[8:], "--schedule", schedule, *extra]


@pytest.fixture
def bad_root(tmp_path):
    return make_msd(tmp_path / "bad", n=3)


def _dataset_json(root):
    return json.loads((root / "dataset.json").read_text())


def test_missing_dataset_json(capsys, bad_root, tmp_path):
    (bad_root / "dataset.json").unlink()
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "dataset.json is missing")


def test_malformed_dataset_json(capsys, bad_root, tmp_path):
    (bad_root / "dataset.json").write_text("{not json")
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "not valid JSON")


def test_dataset_json_without_labels(capsys, bad_root, tmp_path):
    (bad_root / "dataset.json").write_text(json.dumps({"training": []}))
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "no 'labels'")


def test_shape_mismatch(capsys, bad_root, tmp_path):
    write_case(bad_root, "case_001", np.zeros((20, 24, 16)), np.zeros((20, 24, 15)))
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "!= label shape")


def test_label_values_not_in_dataset_json(capsys, bad_root, tmp_path):
    label = np.zeros((20, 24, 16))
    label[2:5, 2:5, 2:5] = 7
    write_case(bad_root, "case_002", np.zeros((20, 24, 16)), label)
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "label values [7]")


def test_empty_dataset(capsys, bad_root, tmp_path):
    d = _dataset_json(bad_root)
    d["training"] = []
    (bad_root / "dataset.json").write_text(json.dumps(d))
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "no labelled training cases")


def test_missing_case_file(capsys, bad_root, tmp_path):
    (bad_root / "imagesTr" / "case_000.nii.gz").unlink()
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "missing file")


def test_unreadable_nifti(capsys, bad_root, tmp_path):
    (bad_root / "imagesTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b garbage, not a NIfTI")
    assert_one_line_error(*run_cli(capsys, *train(bad_root, tmp_path / "o")), "cannot read NIfTI file")


def test_malformed_schedule_file(capsys, tiny_msd, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("stages: [ {patch_size: [8, 8\n")
    assert_one_line_error(*run_cli(capsys, "schedule", "--from", f), "not valid YAML")
    f.write_text("format_version: 1\nstages: 3\n")
    assert_one_line_error(*run_cli(capsys, *train_file(tiny_msd, tmp_path / "o", f)), "missing key")


def test_patch_not_divisible(capsys, tiny_msd, tmp_path):
    argv = ["train", "--data", tiny_msd, "--out", tmp_path / "o", "--epochs", "10",
            "--final-patch", "20", "24", "16", "--pools", "3", "3", "3", "--quiet"]
    assert_one_line_error(*run_cli(capsys, *argv), "not divisible by the network's downsampling 8x8x8")
    assert_one_line_error(
        *run_cli(capsys, "schedule", "--preset", "paper", "--final-patch", "40", "50", "40", "--pools", "3", "3", "3"),
        "not divisible",
    )


def test_unknown_network(capsys, tiny_msd, tmp_path):
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, tmp_path / "o", "--network", "vnet")),
                          "unknown network 'vnet'")


def test_resume_without_checkpoint(capsys, tiny_msd, tmp_path):
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, tmp_path / "o", "--resume")), "--resume given")


def test_unwritable_output_folder(capsys, tiny_msd, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, blocker / "run")), "cannot write")


def test_existing_run_is_not_overwritten_and_bad_input_corrupts_nothing(capsys, tiny_msd, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, *train(tiny_msd, out))[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # tensorboard/ too
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out)), "already holds a run")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format_version: 1\nstages: [[\n")
    assert_one_line_error(*run_cli(capsys, *train_file(tiny_msd, out, bad, "--resume")), "not valid YAML")
    other = ["--preset", "constant", "--resume"]
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out, *other)), "another schedule")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_one_train_per_run_folder_and_a_stopped_run_leaves_the_users_files_as_they_were(
        capsys, tiny_msd, tmp_path, monkeypatch):
    from pgps_tune.cli import TRAIN_LOCK
    from pgps_tune.errors import folder_lock
    from pgps_tune.trainer import Trainer

    out = tmp_path / "run"
    with folder_lock(out, TRAIN_LOCK, "held by the test", lambda: False):  # another train writing this folder
        assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out)), f"{out} is in use by another pgps-tune train")
    assert list(out.iterdir()) == []  # the refused command left nothing; the holder's lock file went with it
    # a schedule file kept in the run folder it names: a run stopped before its first checkpoint removes what
    # it wrote, and gives that file (which it had rewritten as the run's schedule.yaml) its content back
    assert run_cli(capsys, "schedule", "--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2",
                   "2", "--epochs", "10", "--out", out / "schedule.yaml")[0] == 0
    original = (out / "schedule.yaml").read_bytes()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_step", interrupted)
    rc, err = run_cli(capsys, "train", "--data", tiny_msd, "--out", out, "--schedule", out / "schedule.yaml",
                      *TINY[8:])
    assert rc == 130 and "before the first checkpoint" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["schedule.yaml"]
    assert (out / "schedule.yaml").read_bytes() == original
    monkeypatch.undo()
    (out / "metrics.json").write_text("{}")  # a run's files without its checkpoint
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out)), "holds a run's metrics.json but no checkpoint.pt")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, tmp_path / "dangling")),
                          "is a link to " + str(tmp_path / "nowhere") + ", which does not exist")


def _wait_for(what: str, ready, proc: subprocess.Popen, limit_s: float = 300) -> None:
    """Poll for an observed event; fail with ``what`` if the process ends first or it never comes."""
    deadline = time.monotonic() + limit_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-1500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit_s} s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_keeps_the_last_checkpoint_good(tiny_msd, tmp_path, sig, code, capsys):
    out = tmp_path / "run"
    checkpoint = out / "checkpoint.pt"
    argv = [sys.executable, "-m", "pgps_tune.cli", "train", "--data", str(tiny_msd), "--out", str(out),
            "--epochs", "3000", "--val-every", "1000", *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # interrupt between two known states: after a checkpoint was replaced by the next one, so the
    # run is past its first checkpoint and in the middle of training
    _wait_for("a first checkpoint", checkpoint.is_file, proc)
    first = checkpoint.stat().st_ino
    _wait_for("a second checkpoint", lambda: checkpoint.stat().st_ino != first, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    ck = torch.load(checkpoint, weights_only=False)
    stopped = ck["state"]["iteration"]
    assert stopped > 0 and not any(p.name.endswith(".tmp") for p in out.iterdir())
    if sig == signal.SIGTERM:
        return  # resuming is the same after either signal; the SIGINT case checks it
    assert main([*argv[3:], "--resume", "--max-train-seconds", "0.01", "--quiet"]) == 0  # in this process: no
    assert json.loads((out / "metrics.json").read_text())["iterations"] == stopped + 1  # second start-up
    assert f"train: stopped at --max-train-seconds 0.01 after iteration {stopped + 1} of " in capsys.readouterr().err


def test_a_stop_signal_during_a_write_waits_for_the_whole_file_then_reaches_the_commands_handler(tmp_path):
    from pgps_tune.errors import atomic_write

    target = tmp_path / "metrics.json"
    target.write_text("old")
    seen = []

    def handler(signum, frame):  # what the command's own handler finds when the signal reaches it
        seen.append((signal.Signals(signum).name, target.read_text(), sorted(p.name for p in tmp_path.iterdir())))

    def write(fh):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        fh.write(b"new")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        atomic_write(target, write)
    except KeyboardInterrupt:  # raised in place of the handler's turn: fail here, not end the test run
        seen.append("KeyboardInterrupt")
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    assert seen == [("SIGTERM", "new", ["metrics.json"]), ("SIGINT", "new", ["metrics.json"])]


def test_ctrl_c_during_the_first_checkpoint_or_after_the_last_says_what_resume_does(
        capsys, tiny_msd, tmp_path, monkeypatch):
    from pgps_tune import errors

    out = tmp_path / "run"
    replace = errors._replace

    def interrupted_replace(tmp, path):  # Ctrl-C while the first checkpoint is being put in place
        if path.name == "checkpoint.pt" and not path.exists():
            os.kill(os.getpid(), signal.SIGINT)
        replace(tmp, path)

    monkeypatch.setattr(errors, "_replace", interrupted_replace)
    argv = ["train", "--data", tiny_msd, "--out", out, "--epochs", "2", "--preset", "constant", *TINY]
    rc, err = run_cli(capsys, *argv)
    assert rc == 130 and "the checkpoint of iteration 1 in" in err and "--resume" in err, err
    monkeypatch.undo()

    def interrupted_curve(run):  # and once more when training has ended, as the learning curve is drawn
        raise KeyboardInterrupt

    monkeypatch.setattr("pgps_tune.report.write_run_curve", interrupted_curve)
    rc, err = run_cli(capsys, *argv, "--resume")
    assert rc == 130 and "after the run had finished" in err and "--resume" in err, err
    assert json.loads((out / "metrics.json").read_text())["completed"]
    monkeypatch.undo()
    assert run_cli(capsys, *argv, "--resume")[0] == 0 and (out / "learning_curve.png").is_file()


def test_alias_bombs_deep_nesting_and_huge_files_are_refused_at_once(capsys, tmp_path):
    from pgps_tune import schedule as sch
    from pgps_tune import space as sp

    bomb = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        bomb += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"  # 9^9 values once expanded
    cases = {
        "bomb.yaml": (bomb, "more than 100000 values once its aliases are expanded"),
        "loop.yaml": ("parameters: &p {stages: [*p]}\n", "an alias refers to a node that contains it"),
        "deep.yaml": ("[" * 100_000 + "]" * 100_000, "nested more than 50 levels deep"),
        "huge.yaml": ("parameters: {stages: 2}\n" + "# padding\n" * 200_000, "larger than 1 MiB"),
        "hex.yaml": ("parameters: {stages: 2}\nwhen: 0x1F\n", "line 2: 0x1F is a hex number"),  # YAML 1.1's 31
    }
    for name, (text, needle) in cases.items():
        f = tmp_path / name
        f.write_text(text)
        for load in (sp.load, sch.load):
            tracemalloc.start()  # refused before anything is expanded: memory, not time (a loaded machine is slow)
            try:
                with pytest.raises(PgpsError, match=needle):
                    load(f)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 64 * 2**20, (name, peak)
        assert_one_line_error(*run_cli(capsys, "schedule", "--from", f), needle)
    assert_one_line_error(*run_cli(capsys, "schedule", "--from", tmp_path), "is a folder; give a file")
    ok = tmp_path / "anchors.yaml"  # aliases that expand to little are fine
    ok.write_text("parameters:\n  stages: &two 2\n  batch_cap: *two\n")
    assert sp.load(ok).param("batch_cap").value == 2


def test_a_small_file_is_read_without_allocating_the_size_limit(tmp_path, monkeypatch):
    """Every JSON file the tool reads (dataset.json, prepared.json, a sweep's state) was read with one
    ``read(limit + 1)``: 256 MiB allocated per file, whatever its size. Reads now take a MiB at a time."""
    import tracemalloc

    from pgps_tune import errors

    small = tmp_path / "small.json"
    small.write_text(json.dumps({"labels": {"0": "background"}}))
    tracemalloc.start()
    try:
        assert errors.read_json(small, "test file", "fix it") == {"labels": {"0": "background"}}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB allocated to read {small.stat().st_size} bytes"
    monkeypatch.setattr(errors, "MAX_JSON_BYTES", 3 << 20)  # the limit still holds across chunks
    big = tmp_path / "big.json"
    big.write_text(json.dumps(["x" * 1000] * 3200))  # 3.1 MiB
    with pytest.raises(PgpsError, match="larger than 3 MiB"):
        errors.read_json(big, "test file", "fix it")
    big.write_text(json.dumps(["x" * 1000] * 3100))  # 2.96 MiB, spread over 3 reads
    assert len(errors.read_json(big, "test file", "fix it")) == 3100
    twice = tmp_path / "splits.json"  # which 'train' was meant? json.loads would keep the last without a word
    twice.write_text('{"train": ["case_000", "case_001"], "val": ["case_002"], "train": ["case_003"]}')
    with pytest.raises(PgpsError, match=r"splits file .*splits.json: the key 'train' appears twice in one object"):
        errors.read_json(twice, "splits file", "fix it")


def test_json_that_would_parse_to_far_more_memory_than_its_size_is_refused_before_it_is_parsed(tmp_path,
                                                                                            monkeypatch):
    # 256 MiB of "{},{},..." parses to 20 GiB of dicts: the values are counted first (commas in strings not)
    from pgps_tune import errors

    monkeypatch.setattr(errors, "MAX_JSON_VALUES", 1000)
    f = tmp_path / "dataset.json"
    f.write_text(json.dumps({"training": [0] * 1000}))
    with pytest.raises(PgpsError, match=r"dataset description .* is not valid JSON \(more than 1,000 values"):
        errors.read_json(f, "dataset description", "fix or re-download it")
    f.write_text(json.dumps({"name": ",[{" * 2000, "escaped": '\\",[' * 500, "training": [0] * 990}))
    assert len(errors.read_json(f, "dataset description", "fix it")["training"]) == 990


def test_files_are_read_only_as_far_as_the_limit_and_a_fifo_never_blocks(tmp_path):
    from pgps_tune.errors import NotRegular, TooLarge, read_file

    sparse = tmp_path / "metrics.json"
    sparse.write_text("{}")
    os.truncate(sparse, 8 << 30)  # 8 GiB that take no disk
    with pytest.raises(TooLarge, match="larger than 1 MiB"):
        read_file(sparse, 1 << 20)
    fifo = tmp_path / "result.json"
    os.mkfifo(fifo)  # nothing ever writes to it: opening it to read would wait forever
    with pytest.raises(NotRegular, match="not a regular file \\(a FIFO\\)"):
        read_file(fifo, 1 << 20)
    with pytest.raises(IsADirectoryError):
        read_file(tmp_path, 1 << 20)


def test_bad_numbers_in_files_are_refused_in_one_line(capsys, tmp_path):
    from pgps_tune import schedule as sch

    good = sch.constant((16, 16, 16), (2, 2, 2), 2, 5).to_dict()
    for change, needle in [({"baseline_batch_size": -1}, "baseline_batch_size must be an integer in [1, "),
                           ({"pools": [2, 2, 99]}, "pools per axis must be an integer in [0, 8], got 99")]:
        f = tmp_path / "s.json"
        f.write_text(json.dumps({**good, **change}))
        assert_one_line_error(*run_cli(capsys, "schedule", "--from", f), needle)
    f.write_text(json.dumps(good).replace('"epochs": 5', '"epochs": NaN'))
    assert_one_line_error(*run_cli(capsys, "schedule", "--from", f), "stage 0 epochs must be an integer")
    space = tmp_path / "space.yaml"
    space.write_text("parameters: {stages: {type: int, low: 1, high: 4, step: 0.5}}\n")
    assert_one_line_error(*run_cli(capsys, "tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o"),
                          "step must be an integer in (0, 3], got 0.5")
    space.write_text("parameters: {stages: 2}\nbudget: {epochs: .inf}\n")
    assert_one_line_error(*run_cli(capsys, "tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o"),
                          "budget.epochs must be an integer in [1, 1000000], got inf")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["schedule", "--preset", "paper", "--final-patch", "64", "64", "64", "--pools",
                                   "4", "4", "4", "--format", "json"], ["tune", "--help"]])
def test_output_to_a_reader_that_left_is_no_internal_error(argv):
    """`pgps-tune schedule ... | head -0`: the pipe closes before the output is written; the command ends as a
    shell command does on SIGPIPE (141), without a traceback or an 'internal error' line; so does the help
    (argparse ignores a failed write, and would exit 0)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pgps_tune.cli import main; sys.exit(main())",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err
