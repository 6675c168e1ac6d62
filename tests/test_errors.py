"""Every bad input: one line naming the problem and the fix, non-zero exit, nothing corrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import make_msd, write_case

from pgps_tune.cli import main

TINY = ["--final-patch", "16", "16", "16", "--pools", "2", "2", "2", "--filters", "4", "8", "16",
        "--iterations-per-epoch", "1", "--quiet"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc, err, needle):
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle in err, err


def train(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--epochs", "10", *TINY, *extra]


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
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, tmp_path / "o", "--schedule", f)), "missing key")


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
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out)), "already holds a run")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format_version: 1\nstages: [[\n")
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out, "--resume", "--schedule", bad)), "not valid YAML")
    other = ["--preset", "constant", "--resume"]
    assert_one_line_error(*run_cli(capsys, *train(tiny_msd, out, *other)), "another schedule")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ctrl_c_keeps_the_last_checkpoint_good(tiny_msd, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pgps_tune.cli", "train", "--data", str(tiny_msd), "--out", str(out),
            "--epochs", "3000", "--val-every", "1000", *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    stopped = ck["state"]["iteration"]
    assert stopped > 0 and not any(p.name.endswith(".tmp") for p in out.iterdir())
    resumed = subprocess.run([*argv, "--resume", "--max-train-seconds", "0.01"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["iterations"] == stopped + 1
