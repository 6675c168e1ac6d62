"""Hand-written schedule and space files: one YAML reading for all of them (YAML 1.2 core scalars, each key
once, plain data, one document), only regular files, and every key checked where it applies. No Ray, no training."""

import datetime
import os
import re
import signal
import socket
import stat

import pytest
import yaml

from pgps_tune import schedule as sch
from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.errors import PgpsError, atomic_write_text, read_json, read_yaml

SCHEDULE = """format_version: 1
final_patch: [32, 32, 32]
pools: [3, 3, 3]
baseline_batch_size: 2
stages:
- patch_size: [16, 16, 16]
  batch_size: 2
  epochs: 5
- {patch_size: [32, 32, 32], batch_size: 2, epochs: 5}
"""


def refused(capsys, argv, needle):
    """Exit 2 with ``needle`` in one ``pgps-tune: error:`` line, no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pgps-tune: error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and needle in lines[0], err
    return lines[0]


def test_a_key_given_twice_is_refused_at_any_depth_naming_key_and_lines(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(SCHEDULE.replace("  epochs: 5\n", "  epochs: 5\n  epochs: 1\n", 1))
    refused(capsys, ["schedule", "--from", f], "line 9: key 'epochs' appears twice (also at line 8); keep one")
    j = tmp_path / "s.json"  # JSON schedule files are read by the same rules
    j.write_text('{"format_version": 1, "format_version": 1}')
    refused(capsys, ["schedule", "--from", j], "key 'format_version' appears twice")
    (tmp_path / "joined.yaml").write_text(SCHEDULE + SCHEDULE)  # cat a.yaml b.yaml > joined.yaml
    refused(capsys, ["schedule", "--from", tmp_path / "joined.yaml"], "line 10: key 'format_version' appears twice")
    space = tmp_path / "space.yaml"
    space.write_text("parameters: {stages: 2}\nbudget:\n  epochs: 10\n  lr: 0.01\n  epochs: 1000\n")
    with pytest.raises(PgpsError, match="line 5: key 'epochs' appears twice"):
        sp.load(space)
    space.write_text("parameters: {stages: 2, batch_cap: {1: a, true: b}}\n")  # equal keys to Python: 1 == True
    with pytest.raises(PgpsError, match="key True appears twice"):
        sp.load(space)


def test_scalars_are_read_as_yaml_1_2_core(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("a: 010\nb: 1e-4\nc: off\nd: 2024-01-31\ne: yes\nf: 3E-3\ng: -.inf\nh: ~\ni: True\nj: '0x10'\n")
    assert read_yaml(f, "space", "") == {"a": 10, "b": 1e-4, "c": "off", "d": "2024-01-31", "e": "yes",
                                         "f": 3e-3, "g": float("-inf"), "h": None, "i": True, "j": "0x10"}
    for text, needle in [("0x10", "0x10 is a hex number, which YAML 1.1 and 1.2 read differently (YAML 1.1: 16)"),
                         ("1:30", "1:30 is a base-60 number, which YAML 1.1 and 1.2 read differently (YAML 1.1: 90)"),
                         ("1_000", "1_000 is a digit-grouped number"), ("0o17", "0o17 is an octal number"),
                         ("!!int 0x10", "'0x10' is not a plain decimal integer")]:
        f.write_text(f"parameters:\n  stages: {text}\n")
        with pytest.raises(PgpsError, match=re.escape(f"line 2: {needle}")):
            sp.load(f)
    # what YAML 1.1 got wrong now reaches the checks as written
    f.write_text("parameters: {stages: 2}\nbudget: {augment: off, lr: 1e-4}\n")
    with pytest.raises(PgpsError, match="budget.augment: unknown augmentation 'off'"):
        sp.load(f)
    f.write_text("parameters:\n  lr: {type: float, low: 1e-4, high: 1e-2, log: true}\nbudget: {epochs: 010}\n")
    s = sp.load(f)
    assert (s.param("lr").low, s.param("lr").high, s.budget.epochs) == (1e-4, 1e-2, 10)


@pytest.mark.parametrize("text,needle", [
    ("# pasted \x1b[32mgreen\x1b[0m\n" + SCHEDULE, "holds a control character (0x1b) at line 1, column 10; remove it"),
    ("format_version: 1\x00\n", "holds a control character (0x00) at line 1, column 18"),
    (SCHEDULE + "---\n" + SCHEDULE, "holds more than one YAML document (another starts at line 10)"),
    (SCHEDULE + "meta: !!python/object/apply:os.system [echo hi]\n", "line 10: the tag !!python/object/apply:os.system"
                                                                     " is not read"),
    (SCHEDULE + "meta: {blob: !!binary aGVsbG8=}\n", "line 10: the tag !!binary is not read"),
    (SCHEDULE + "meta: {when: !!timestamp 2024-01-31}\n", "the tag !!timestamp is not read"),
    (SCHEDULE + "? [a, b]\n: x\n", "line 10: a key is a list; keys must be plain names"),
    ("# only a comment\n", "is empty (or holds only comments)"),
    (SCHEDULE + "meta:\n  <<: {a: 1}\n", "line 11: merge keys (<<) are YAML 1.1 and not read"),
    (SCHEDULE + "5: x\nfoo: y\n", "unknown key(s) [5, 'foo']"),  # keys of mixed types
    (SCHEDULE.replace("  epochs: 5\n", "  epoch: 5\n", 1), "stage 0: unknown key 'epoch' (did you mean 'epochs'?)"),
    (SCHEDULE.replace("  batch_size: 2\n", "", 1), "stage 0 lacks 'batch_size'"),
    (SCHEDULE.replace("  epochs: 5\n", "  epochs: 5\n  1: x\n  zz: y\n", 1), "stage 0: unknown key 1"),
    (SCHEDULE.replace("format_version: 1", "format_version: true"), "format_version True is not supported"),
    (SCHEDULE.replace("format_version: 1", "format_version: 1.0"), "format_version 1.0 is not supported"),
    (SCHEDULE + "meta: 0\n", "'meta' must be a mapping, got 0"),
    (SCHEDULE + "meta: {1: x}\n", "meta: key 1 is a int; keys must be strings"),
])
def test_malformed_schedule_files_are_refused_in_one_line(tmp_path, capsys, text, needle):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    refused(capsys, ["schedule", "--from", f], needle)


def test_keys_of_mixed_types_never_crash_the_unknown_key_messages(tmp_path, capsys):
    space = "parameters:\n  stages: {type: int, low: 1, high: 4}\n"
    for extra, needle in [("5: x\nfoo: y\n", "unknown key(s) [5, 'foo']"),
                          ("budget: {1: a, zz: b}\n", "unknown key(s) [1, 'zz'] in 'budget'"),
                          ("confirm: {1: a, seed: b}\n", "('seed': did you mean 'seeds'?)")]:
        (tmp_path / "s.yaml").write_text(space + extra)
        refused(capsys, ["tune", "--space", tmp_path / "s.yaml", "--data", "synthetic", "--out", tmp_path / "o"],
                needle)
    (tmp_path / "s.yaml").write_text(space.replace("high: 4}", "high: 4, 1: a, zz: b}"))
    refused(capsys, ["tune", "--space", tmp_path / "s.yaml", "--data", "synthetic", "--out", tmp_path / "o"],
            "parameter 'stages' has unknown key(s) [1, 'zz']")
    assert not (tmp_path / "o").exists()
    recipe = {"version": 1, "train": {1: "a", "zz": "b"}, "data": {}}
    with pytest.raises(PgpsError, match=r"recipe.train: unknown key\(s\) \[1, 'zz'\]"):
        sch.Schedule.from_dict({**yaml.safe_load(SCHEDULE), "recipe": recipe}, "s.yaml")


def test_only_regular_files_are_read_and_a_fifo_never_blocks(tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    def blocked(signum, frame):  # a reader that opened the FIFO would wait for a writer forever: fail instead
        raise AssertionError("a FIFO was opened for reading and blocked")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)  # a watchdog against hanging, not a speed limit
    try:
        refused(capsys, ["schedule", "--from", fifo], "is not a regular file (a FIFO); give a file")
        refused(capsys, ["tune", "--space", fifo, "--data", "synthetic", "--out", tmp_path / "o"],
                "not a regular file")
        with pytest.raises(PgpsError, match="splits file .* is not a regular file"):
            read_json(fifo, "splits file", "fix it")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    refused(capsys, ["schedule", "--from", "/dev/zero"], "is not a regular file (a device)")
    sock = socket.socket(socket.AF_UNIX)
    try:
        monkeypatch.chdir(tmp_path)  # a socket's path must be short
        sock.bind("sock")
        refused(capsys, ["schedule", "--from", "sock"], "is not a regular file")
    finally:
        sock.close()


def test_meta_and_recipe_values_keep_plain_json_types(tmp_path, capsys):
    data = yaml.safe_load(SCHEDULE)
    with pytest.raises(PgpsError, match=r"meta.made: datetime.date\(2024, 1, 31\) is not plain data"):
        sch.Schedule.from_dict({**data, "meta": {"made": datetime.date(2024, 1, 31)}})
    f = tmp_path / "s.yaml"  # a date or a text that looks like a number stays text, in YAML and JSON alike
    f.write_text(SCHEDULE + "meta: {made: 2024-01-31, note: '1e-4', code: '09'}\n")
    assert main(["schedule", "--from", str(f), "--out", str(tmp_path / "s.json")]) == 0
    assert main(["schedule", "--from", str(tmp_path / "s.json"), "--out", str(tmp_path / "back.yaml")]) == 0
    assert sch.load(tmp_path / "back.yaml").meta == {"made": "2024-01-31", "note": "1e-4", "code": "09"}
    f.write_text(SCHEDULE + "meta: {score: .nan}\n")  # a NaN score: .nan in YAML, null in (strict) JSON
    assert main(["schedule", "--from", str(f), "--out", str(tmp_path / "nan.json")]) == 0
    assert sch.load(tmp_path / "nan.json").meta == {"score": None}
    best = {"version": 1, "data": {"dataset": "synthetic", "source": "synthetic", "val_fraction": 0.2, "split_seed": 0}}
    for train, needle in [({"token_size": 16.0}, "unknown token size 16.0"), ({"network": True}, "unknown network")]:
        with pytest.raises(PgpsError, match=needle):
            sch.Schedule.from_dict({**data, "recipe": {**best, "train": train}})
    with pytest.raises(PgpsError, match="recipe.version True is not supported"):
        sch.Schedule.from_dict({**data, "recipe": {**best, "version": True, "train": {}}})
    with pytest.raises(PgpsError, match="spacing must be a list of 3 positive numbers"):
        sch.Schedule.from_dict({**data, "recipe": {**best, "train": {}, "data": {**best["data"], "spacing": [1, 1]}}})
    ok = sch.Schedule.from_dict({**data, "recipe": {**best, "train": {"token_size": 16}}})
    assert ok.recipe.train.token_size == 16


def test_schedule_out_writes_through_a_link_and_epochs_names_the_flag(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(SCHEDULE)
    target, link = tmp_path / "target.yaml", tmp_path / "link.yaml"
    target.write_text("old\n")
    link.symlink_to(target)
    assert main(["schedule", "--from", str(f), "--out", str(link)]) == 0
    assert link.is_symlink() and sch.load(target).stages == sch.load(f).stages
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    refused(capsys, ["schedule", "--from", f, "--epochs", "1"],
            "--epochs 1 cannot rescale")
    # a FIFO (or a device, /dev/null as root) is never renamed over: it stays what it was, the command says so
    fifo, fifo_link = tmp_path / "fifo", tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    fifo_link.symlink_to(fifo)
    for out in (fifo, fifo_link):
        refused(capsys, ["schedule", "--from", f, "--out", out], f"cannot write --out {out}: it is a FIFO, not a "
                "regular file; give the name of a file")
    with pytest.raises(PgpsError, match="it is a FIFO, not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


LENGTHS_INTERIOR = """name: lengths_interior
parameters:
  stages: {type: int, low: 1, high: 3}
  growth: {value: 1.5, when: "stages > 1"}
  lengths: {value: [0.5, 0.6], when: "stages == 2"}
search: {algorithm: grid, references: false}
asha: {enabled: false}
confirm: {enabled: false}
budget: {epochs: 6, iterations_per_epoch: 2, filters: [8, 16, 32, 64], synthetic_cases: 6,
         synthetic_shape: [32, 32, 32], final_patch: [32, 32, 32], pools: [3, 3, 3]}
"""


def test_a_space_invalid_only_at_an_interior_stage_count_is_refused_before_ray(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(LENGTHS_INTERIOR)
    with pytest.raises(PgpsError, match=r"'stages': 2, .*lengths \[0.5, 0.6\] sum to 1.1"):
        sp.check_space_against_plan(sp.load(f), (32, 32, 32), (3, 3, 3))
    refused(capsys, ["tune", "--space", f, "--data", "synthetic", "--out", tmp_path / "o", "--cache-dir",
                     tmp_path / "cache"], "sum to 1.1")
    assert not (tmp_path / "o" / "ray").exists()
    # a 1..100 range read by conditions is checked at every value, in a few seconds
    big = sp.parse({"parameters": {"stages": {"type": "int", "low": 1, "high": 100},
                                   "growth": {"type": "float", "low": 1.05, "high": 2.5, "when": "stages > 1"},
                                   "length_ratio": {"type": "float", "low": 0.5, "high": 2.0, "when": "stages > 1"},
                                   "mode": {"type": "categorical", "choices": ["resource", "performance"]}},
                    "budget": {"epochs": 1000}})
    grid = sp._check_grid(big.parameters)
    assert {c["stages"] for c in grid} == set(range(1, 101)) and len(grid) < 1000


def test_a_trial_whose_schedule_cannot_be_built_fails_once_and_is_not_retried(monkeypatch):
    from pgps_tune import tuner

    reports = []
    monkeypatch.setattr(tuner.tune, "report", lambda metrics, **kw: reports.append(metrics))
    setup = {"budget": {"trainer": "nnunet", "epochs": 6, "batch_size": 2}, "cpus_per_trial": 1,
             "final_patch": (32, 32, 32), "pools": (3, 3, 3)}
    tuner.run_trial({"stages": 2, "growth": 1.5, "lengths": [0.5, 0.6]}, setup)  # returns: Tune sees no error
    assert len(reports) == 1 and reports[0]["diverged"] and not reports[0]["completed"]
    assert reports[0]["error"].startswith("invalid schedule: lengths [0.5, 0.6] sum to 1.1")
