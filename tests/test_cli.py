"""The command line: every numeric flag checked, one-line errors, exit codes, output folders, plan, demo."""

import json
import math
from pathlib import Path

import pytest

from pgps_tune import schedule as sch
from pgps_tune.cli import _no_empty_folder_left, build_parser, main
from pgps_tune.limits import LIMITS
from pgps_tune.space import shipped_spaces


def error_line(err: str) -> str:
    """The one ``pgps-tune: error:`` line of stderr (warnings from libraries may stand beside it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pgps-tune: error:")]
    assert len(lines) == 1, err
    return lines[0]


def refused(capsys, argv) -> str:
    """Run the CLI on ``argv``, expect exit 2 with one error line, and return that line."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses a flag before main() runs the command
        rc = exc.code
    assert rc == 2
    return error_line(capsys.readouterr().err)


def numeric_flags():
    """(command, flag, nargs, range) for every flag of every command that takes a number."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    found = []
    for name, sub in commands.items():
        for action in sub._actions:
            kind = getattr(action.type, "__name__", None)
            if action.option_strings and action.type is not None and not action.choices:  # choices: argparse checks
                assert kind in LIMITS, f"{name} {action.option_strings[0]} takes {kind}, which no range checks"
                found.append((name, action.option_strings[0], action.nargs, LIMITS[kind]))
    return found


FLAGS = numeric_flags()


def bad_values(rng):
    low = rng.low if rng.low_open else rng.low - 1
    high = rng.high if rng.high_open else (rng.high * 10 + 1 if rng.high > 0 else 1)
    values = [f"{low:g}" if not rng.integer else str(int(low)), str(int(high)) if rng.integer else f"{high:g}",
              "nan", "inf", "-inf", "abc"]
    return values + (["1.5", "1e9"] if rng.integer else [])


def test_every_numeric_flag_is_covered():
    flags = {(c, f) for c, f, _, _ in FLAGS}
    for needed in [("train", "--workers"), ("train", "--threads"), ("train", "--lr"), ("train", "--voxel-budget"),
                   ("train", "--batch-size"), ("tune", "--num-samples"), ("demo", "--num-samples"),
                   ("train", "--epochs"), ("train", "--iterations-per-epoch"), ("train", "--val-fraction"),
                   ("train", "--fg-ratio"), ("train", "--max-train-seconds"), ("tune", "--cpus-per-trial"),
                   ("tune", "--gpus-per-trial"), ("tune", "--max-concurrent"), ("tune", "--max-failures"),
                   ("schedule", "--stages"), ("schedule", "--growth"), ("schedule", "--start-fraction"),
                   ("schedule", "--length-ratio"), ("schedule", "--final-fraction"), ("schedule", "--batch-cap"),
                   ("schedule", "--final-patch"), ("schedule", "--pools"), ("train", "--filters"),
                   ("train", "--seed"), ("train", "--split-seed"), ("train", "--val-every"),
                   ("plan", "--voxel-budget")]:
        assert needed in flags, needed


@pytest.mark.parametrize("command,flag,nargs,rng", FLAGS, ids=[f"{c} {f}" for c, f, _, _ in FLAGS])
def test_every_numeric_flag_refuses_nonsense_in_one_line(capsys, command, flag, nargs, rng):
    n = nargs if isinstance(nargs, int) else 1
    for value in bad_values(rng):
        # argparse takes "-inf" for a flag unless it is joined with "=" (possible for one value only)
        argv = [command, f"{flag}={value}"] if n == 1 else [command, flag, *[value] * n]
        if n > 1 and value == "-inf":
            continue
        line = refused(capsys, argv)
        assert f"argument {flag}: must be {rng}, got '{value}'" in line, line


def test_good_values_pass_the_parser():
    a = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--lr", "1e-4", "--fg-ratio", "0",
                                   "--workers", "0", "--seed", "4294967295", "--final-patch", "40", "56", "40"])
    assert a.lr == 1e-4 and a.fg_ratio == 0.0 and a.workers == 0 and a.seed == 2**32 - 1
    assert a.final_patch == [40, 56, 40]
    assert build_parser().parse_args(["tune", "--space", "s", "--data", "d", "--out", "o",
                                      "--gpus-per-trial", "0.5"]).gpus_per_trial == 0.5


def test_voxel_budget_minus_one_is_refused_at_once(capsys, tiny_msd):
    line = refused(capsys, ["plan", "--data", tiny_msd, "--voxel-budget", "-1"])
    assert "--voxel-budget: must be an integer in [512, " in line


def test_plan_prints_the_plan(capsys, tiny_msd):
    assert main(["plan", "--data", str(tiny_msd)]) == 0
    plan = json.loads(capsys.readouterr().out)
    # by hand: the cases are 20x24x16 at spacing 1 (under the 128^3 budget, so kept); each axis pools
    # while its bottleneck stays >= 4 voxels: floor(log2(20/4)) = floor(log2(24/4)) = floor(log2(16/4)) = 2,
    # and 20, 24, 16 are already multiples of 2^2
    assert plan["final_patch"] == [20, 24, 16] and plan["pools"] == [2, 2, 2]
    assert plan["median_shape"] == [20, 24, 16] and plan["spacing"] == [1.0, 1.0, 1.0]
    assert plan["dataset"] == "Tiny" and plan["cases"] == 6 and Path(plan["cache"]).is_dir()
    assert main(["plan", "--data", str(tiny_msd), "--voxel-budget", "512"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert math.prod(small["final_patch"]) < math.prod(plan["final_patch"]) and max(small["pools"]) < 2


def test_demo_runs_the_shipped_smoke_space_on_synthetic_data(tmp_path, capsys, monkeypatch):
    # the whole demo takes about 2 minutes (scripts' CI runs it from a wheel); here its wiring:
    # the shipped smoke space, synthetic data, the flags passed on, and the best schedule printed
    import pgps_tune.tuner as tuner

    seen = {}
    best = sch.paper((32, 32, 32), (3, 3, 3), 2, 10)

    def fake_sweep(opts):
        seen["opts"] = opts
        best.save(opts.out / "best_schedule.yaml")
        return {"sweep": opts.out.name, "dataset": "synthetic", "trials": 0, "completed": 0, "stopped_early": 0,
                "failed": 0, "best": None}

    monkeypatch.setattr(tuner, "sweep", fake_sweep)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-samples", "2", "--max-concurrent", "1", "--quiet"]) == 0
    opts = seen["opts"]
    assert opts.space.name == "smoke" and Path(opts.space.source) == shipped_spaces()["smoke"]
    assert opts.data == "synthetic" and opts.num_samples == 2 and opts.max_concurrent == 1 and opts.quiet
    assert opts.out == out
    assert capsys.readouterr().out.endswith(best.to_yaml())
    assert build_parser().parse_args(["demo"]).out == "runs/demo"
    assert "--num-samples: must be an integer in [1, " in refused(capsys, ["demo", "--num-samples", "0"])
    assert "--num-samples: must be" in refused(capsys, ["demo", "--num-samples", "-1"])


def test_an_interrupt_while_the_sweep_is_exported_does_not_say_nothing_was_exported(tmp_path, capsys, monkeypatch):
    import signal

    import pgps_tune.tuner as tuner

    def interrupted(opts, exporting):
        opts.out.mkdir()
        (opts.out / "sweep.json").write_text("{}")  # the sweep had started
        exc = tuner.SweepInterrupted(signal.SIGTERM)
        exc.exporting = exporting
        raise exc

    for exporting, said in ((False, "nothing was exported; resume with:"),
                            (True, "its exports may be incomplete (the interrupt came while they were written); "
                                   "resume with:")):
        out = tmp_path / str(exporting)
        monkeypatch.setattr(tuner, "sweep", lambda opts, e=exporting: interrupted(opts, e))
        assert main(["demo", "--out", str(out), "--quiet"]) == 143
        err = capsys.readouterr().err.splitlines()
        assert err[0] == f"pgps-tune: interrupted by SIGTERM; finished trials and checkpoints in {out} are kept and " \
            + said and err[1].endswith("--resume"), err


def test_a_sweep_whose_trials_no_node_can_run_stops_in_one_line_with_its_resume_command(tmp_path, capsys,
                                                                                        monkeypatch):
    import pgps_tune.tuner as tuner

    seen = {}

    def stuck(opts):
        seen["timeout"] = opts.pending_timeout
        opts.out.mkdir()
        (opts.out / "sweep.json").write_text("{}")  # the sweep had started
        raise tuner.TrialsUnplaced("search: 2 trials waited 2m00s and no node of the cluster can run one now")

    monkeypatch.setattr(tuner, "sweep", stuck)
    out = tmp_path / "o"
    assert main(["demo", "--out", str(out), "--quiet", "--pending-timeout", "30"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("pgps-tune: error: search: 2 trials waited 2m00s and no node of the cluster can run one "
                           f"now; the sweep stopped with its finished trials and checkpoints kept in {out}: once the "
                           "cluster can run its trials, resume with: ")
    assert line.endswith(" --pending-timeout 30.0 --quiet --resume")
    assert seen["timeout"] == 30
    assert "--pending-timeout: must be a number in (0, " in refused(capsys, ["demo", "--pending-timeout", "0"])


def test_unknown_space_name_lists_the_shipped_ones(capsys, tmp_path):
    line = refused(capsys, ["tune", "--space", "defualt", "--data", "synthetic", "--out", tmp_path / "o"])
    assert "no shipped space of that name" in line and "default" in line and "smoke" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["train", "--data", "synthetic", "--out", "{file}"], "is a file; give a folder"),
    (["train", "--data", "synthetic", "--out", "{file}/run"], "is a file; choose another --out"),
    (["tune", "--space", "smoke", "--data", "synthetic", "--out", "{file}"], "is a file; give a folder"),
    (["demo", "--out", "{file}"], "is a file; give a folder"),
    (["export", "--experiment", "{tmp}", "--out", "{file}"], "is a file; give a folder"),
    (["schedule", "--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
      "--out", "{tmp}"], "is a folder; give a file name"),
    (["schedule", "--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
      "--out", "{file}/s.yaml"], "is a file; choose another --out"),
    (["best", "--dataset", "synthetic", "--out", "{tmp}"], "is a folder; give a file name"),
])
def test_an_output_that_cannot_be_one_is_refused_in_one_line(capsys, tmp_path, argv, needle):
    (tmp_path / "file").write_text("keep")
    line = refused(capsys, [a.format(file=tmp_path / "file", tmp=tmp_path) for a in argv])
    assert needle in line
    assert (tmp_path / "file").read_text() == "keep"


def test_a_command_that_fails_on_its_inputs_leaves_no_output_folder(capsys, tmp_path, tiny_msd):
    (tiny_msd / "dataset.json").write_text("{broken")
    out = tmp_path / "new" / "run"
    refused(capsys, ["train", "--data", tiny_msd, "--out", out, "--epochs", "2"])
    assert not (tmp_path / "new").exists()
    out = tmp_path / "other"
    refused(capsys, ["train", "--data", tiny_msd.parent / "missing", "--out", out])
    assert not out.exists()


def test_folders_a_failed_command_made_go_but_written_files_stay(tmp_path):
    made = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), _no_empty_folder_left(made):
        (made / "ray" / "x").mkdir(parents=True)
        raise RuntimeError
    assert not (tmp_path / "a").exists()
    with pytest.raises(KeyboardInterrupt), _no_empty_folder_left(made):
        (made / "ray").mkdir(parents=True)
        (made / "sweep.json").write_text("{}")
        raise KeyboardInterrupt
    assert (made / "sweep.json").is_file() and not (made / "ray").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), _no_empty_folder_left(tmp_path / "kept"):
        raise RuntimeError
    assert (tmp_path / "kept").is_dir()  # it was there before: never removed


def test_a_batch_that_cannot_fit_is_refused_with_the_estimate_and_the_memory(capsys, tmp_path, tiny_msd):
    line = refused(capsys, ["train", "--data", tiny_msd, "--out", tmp_path / "o", "--batch-size", "1000000",
                            "--preset", "constant", "--quiet"])
    assert "stage 0 (batch 1000000 of 20x24x16 patches) needs an estimated" in line
    assert " GiB of memory for its activations, more than the " in line and "lower --batch-size" in line
    assert not (tmp_path / "o").exists()


def test_the_batch_check_counts_a_cgroup_limit_below_the_machines_memory(capsys, tmp_path, tiny_msd, monkeypatch):
    from pgps_tune import imageio

    monkeypatch.setattr(imageio, "memory_limit", lambda: 2**30)  # a job limited to 1 GiB (v1 or v2, own or parent)
    line = refused(capsys, ["train", "--data", tiny_msd, "--out", tmp_path / "o", "--batch-size", "1000",
                            "--preset", "constant", "--quiet"])
    assert "stage 0 (batch 1000 of 20x24x16 patches)" in line and "more than the 1 GiB of RAM here" in line


def test_flags_a_command_would_ignore_are_refused(capsys, tmp_path, tiny_msd):
    """What trains is what the command line says: a schedule flag beside a schedule file, a parametric flag
    beside another preset, --batch-cap in resource mode, split flags beside --splits (any spelling)."""
    sched = tmp_path / "s.yaml"
    sched.write_text(sch.constant((16, 16, 16), (2, 2, 2), 2, 4).to_yaml())
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_002"]}))
    train = ["train", "--data", tiny_msd, "--out", tmp_path / "o", "--quiet"]
    for extra, needle in [
        (["--schedule", sched, "--final-patch", "32", "32", "32", "--mode=performance"],
         "--schedule FILE fixes the patches, batches and stages; --mode, --final-patch would be ignored: drop them"),
        (["--schedule", sched, "--batch-siz", "4"], "--batch-size would be ignored"),  # an abbreviation
        (["--preset", "constant", "--stages", "3", "--growth", "2"],
         "--stages, --growth shape --preset parametric only; add --preset parametric, or drop them"),
        (["--lengths", "1", "1"], "--lengths shapes --preset parametric only"),  # the default preset is paper
        (["--batch-cap", "8"], "--batch-cap limits the growing batches of --mode performance or sqrt"),
        (["--splits", splits, "--split-seed", "3"], "--splits FILE gives the train/validation split; --split-seed "
                                                    "would be ignored: drop it"),
    ]:
        assert needle in refused(capsys, [*train, *extra])
    assert not (tmp_path / "o").exists()
    assert "--from FILE fixes the patches" in refused(capsys, ["schedule", "--from", sched, "--pools", "3", "3", "3"])
    out = tmp_path / "p.yaml"  # the same flags where they do shape the schedule are taken
    assert main(["schedule", "--preset", "parametric", "--stages", "3", "--growth", "2", "--mode", "performance",
                 "--batch-cap", "8", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2", "--out",
                 str(out)]) == 0
    assert len(sch.load(out).stages) == 3


def test_a_final_patch_larger_than_every_case_is_said_and_a_folder_named_checkpoint_is_refused(
        capsys, tmp_path, tiny_msd):
    assert main(["train", "--data", str(tiny_msd), "--out", str(tmp_path / "o"), "--preset", "constant",
                 "--final-patch", "32", "32", "16", "--pools", "2", "2", "2", "--filters", "4", "8", "16",
                 "--epochs", "1", "--iterations-per-epoch", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the final patch 32x32x16 is larger than every case along axis 0, 1 (the largest is 20x24x16)" \
        in err
    (tmp_path / "p" / "checkpoint.pt").mkdir(parents=True)
    assert "checkpoint.pt is not a file (a folder?)" in refused(capsys, ["train", "--data", tiny_msd, "--out",
                                                                          tmp_path / "p", "--quiet"])


def test_training_memory_estimate():
    # by hand: 16^3 at batch 2, pools 2 per axis, filters 4, 8, 16: 4*16^3 + 8*8^3 + 16*4^3 = 21504 values
    # per patch, times 2 patches, 4 saved activations each (UNet) and 4 bytes
    s = sch.constant((16, 16, 16), (2, 2, 2), 2, 5)
    assert sch.training_memory(s, (4, 8, 16, 32)) == (21504 * 2 * 4 * 4, 0)
    assert sch.training_memory(s, (4, 8, 16), "dynunet", bytes_per_value=2) == (21504 * 2 * 12 * 2, 0)
    # --res-units: one more saved value per channel and voxel for each residual unit past the first (UNet only)
    assert sch.training_memory(s, (4, 8, 16, 32), res_units=3) == (21504 * 2 * 6 * 4, 0)
    assert sch.training_memory(s, (4, 8, 16), "dynunet", res_units=3) == (21504 * 2 * 12 * 4, 0)
    # performance mode: the first stage (4^3 patches, batch 2*16^3/4^3 = 128) holds 4*64 + 8*8 + 16*1 = 336
    # values per patch, 43008 in all: the final stage's 43008 too, so the first stage counts
    perf = sch.paper((16, 16, 16), (2, 2, 2), 2, 20, "performance")
    assert perf.stages[0].batch_size == 128
    assert sch.training_memory(perf, (4, 8, 16))[0] == 43008 * 4 * 4


def test_device_cuda_without_a_gpu_is_refused(capsys, tmp_path, tiny_msd, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(capsys, ["train", "--data", tiny_msd, "--out", tmp_path / "o", "--device", "cuda"])
    assert "--device cuda asked for but no CUDA GPU is visible" in line
    assert "invalid choice: 'gpu'" in refused(capsys, ["train", "--data", tiny_msd, "--out", tmp_path / "o",
                                                       "--device", "gpu"])


class TuneError(Exception):  # as Ray's: its message is the formatted traceback of what failed inside Tune
    pass


WRAPPED = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
           'optuna.exceptions.UpdateFinishedTrialError: Trial#1 has already finished and can not be updated.\n')


@pytest.mark.parametrize("exc, shown", [
    (RuntimeError("boom\nsecond line"), "RuntimeError: boom second line"),
    (TuneError(WRAPPED), "TuneError from optuna.exceptions.UpdateFinishedTrialError: Trial#1 has already finished "
                         "and can not be updated.")])
def test_an_internal_error_prints_one_line_naming_its_log(capsys, tmp_path, tiny_msd, monkeypatch, exc, shown):
    import pgps_tune.data

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(pgps_tune.data, "plan_patch", broken)
    assert main(["plan", "--data", str(tiny_msd)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"pgps-tune: internal error ({shown}); the traceback is in ")
    log = Path(err.split("the traceback is in ")[1].split(";")[0])
    assert log.parent == tmp_path / "state" / "pgps-tune" / "logs"
    text = log.read_text()
    assert "Traceback" in text and f"{type(exc).__name__}: " in text and "plan --data" in text


def test_the_crash_log_falls_back_to_the_temporary_folder(capsys, tmp_path, monkeypatch):
    import pgps_tune.cli as cli

    def broken(a):
        raise ZeroDivisionError("oops")

    (tmp_path / "state").write_text("not a folder")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(cli.tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(cli, "cmd_best", broken)
    assert main(["best", "--dataset", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"the traceback is in {tmp_path / 'tmp'}/crash-" in err and len(err.splitlines()) == 1


def test_nnunet_flags_without_their_plans_are_refused_not_ignored(capsys, tmp_path):
    # --configuration without --nnunet-plans (or export's --nnunet) was silently ignored
    for argv in (["plan", "--data", "synthetic"],
                 ["schedule", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2"],
                 ["tune", "--space", "smoke", "--data", "synthetic", "--out", tmp_path / "o"]):
        line = refused(capsys, [*argv, "--configuration", "2d"])
        assert "--configuration picks the configuration of --nnunet-plans" in line and "drop --configuration" in line
    assert not (tmp_path / "o").exists()


def test_a_data_argument_that_is_a_file_is_called_a_file(capsys, tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    line = refused(capsys, ["plan", "--data", tmp_path / "dataset.json"])
    assert line == (f"pgps-tune: error: data folder {tmp_path / 'dataset.json'} is a file; give the dataset's folder "
                    f"(its folder {tmp_path}), the one holding dataset.json, or 'synthetic'")


def test_a_cache_dir_that_is_a_file_is_called_a_file(capsys, tmp_path):
    # it was "the preprocessing cache FILE/NAME does not exist yet and cannot be built there (File exists)"
    (tmp_path / "f").write_text("x")
    for cache in (tmp_path / "f", tmp_path / "f" / "sub"):
        line = refused(capsys, ["plan", "--data", "synthetic", "--cache-dir", cache])
        assert line == (f"pgps-tune: error: the preprocessing cache {cache} cannot be made: {tmp_path / 'f'} is a "
                        "file; set PGPS_CACHE_DIR (or --cache-dir) to a folder")


def test_ctrl_c_after_a_sweep_is_exported_says_it_is_and_how_to_write_its_page(tmp_path, capsys, monkeypatch):
    # a Ctrl-C while the finished sweep's page was drawn said only "interrupted; nothing was left half-written"
    import pgps_tune.cli as cli
    import pgps_tune.tuner as tuner

    def page(out):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner, "sweep", lambda opts: {"sweep": "s", "dataset": "synthetic"})
    monkeypatch.setattr(cli, "_write_sweep_report", page)
    out = tmp_path / "s"
    assert main(["tune", "--space", "smoke", "--data", "synthetic", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"it is exported in {out}" in err and f"pgps-tune report {out}" in err


@pytest.mark.parametrize("raised,code", [(SystemExit(15), 143), (KeyboardInterrupt(), 130)])
def test_signals_that_reach_main_exit_with_their_code(capsys, monkeypatch, raised, code):
    # Ray's driver turns SIGTERM into SystemExit(15); a bare Ctrl-C outside a command's handler is 130
    import pgps_tune.cli as cli

    def stopped(a):
        raise raised

    monkeypatch.setattr(cli, "cmd_best", stopped)
    assert main(["best", "--dataset", "x"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing was left half-written" in err
