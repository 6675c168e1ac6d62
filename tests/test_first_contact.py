"""A new user's first commands: every fix an error suggests is the flag that fixes it. No Ray, no training."""

from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.space import check_space_against_plan


def test_a_confirmation_too_short_for_the_paper_reference_names_confirm_epochs(tmp_path, capsys, monkeypatch):
    import pgps_tune.tuner as tuner

    seen = {}

    def fake(opts):  # the sweep's first check, against Hippocampus's plan, in place of the sweep
        check_space_against_plan(opts.space, (40, 56, 40), (3, 3, 3))
        seen["confirm_epochs"] = opts.space.confirm.epochs
        return {"sweep": opts.out.name, "dataset": "Hippocampus", "trials": 0, "completed": 0, "stopped_early": 0,
                "failed": 0, "best": None}

    monkeypatch.setattr(tuner, "sweep", fake)
    stages = len(sch.paper_patches((40, 56, 40), (3, 3, 3)))
    base = ["tune", "--space", "smoke", "--data", "synthetic", "--out", str(tmp_path / "s"), "--epochs", str(stages)]
    assert main([*base, "--confirm-epochs", str(stages - 1)]) == 2
    err = capsys.readouterr().err
    assert f"at confirm.epochs {stages - 1}" in err and err.rstrip().endswith(f"give --confirm-epochs >= {stages}")
    assert main([*base, "--confirm-epochs", str(stages)]) == 0  # the fix given is the fix
    assert seen["confirm_epochs"] == stages


def test_too_few_filter_widths_for_the_plan_are_refused_before_any_trial_with_the_fix(tmp_path, capsys, monkeypatch):
    import pgps_tune.tuner as tuner

    def fake(opts):  # the sweep's first check, against Hippocampus's plan (3 poolings), in place of the sweep
        check_space_against_plan(opts.space, (40, 56, 40), (3, 3, 3))
        return {"sweep": opts.out.name, "dataset": "Hippocampus", "trials": 0, "completed": 0, "stopped_early": 0,
                "failed": 0, "best": None}

    monkeypatch.setattr(tuner, "sweep", fake)
    stages = len(sch.paper_patches((40, 56, 40), (3, 3, 3)))
    base = ["tune", "--space", "smoke", "--data", "synthetic", "--out", str(tmp_path / "s"), "--epochs", str(stages),
            "--confirm-epochs", str(stages)]
    assert main([*base, "--filters", "4", "8", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1 and "Traceback" not in err  # one line, after the budget-override notice
    line = err.splitlines()[-1]
    assert line.startswith("pgps-tune: error: ") and "gives 3 widths" in line
    assert line.endswith("(e.g. --filters 16 32 64 128)")
    assert main([*base, "--filters", "16", "32", "64", "128"]) == 0  # the fix given is the fix


def test_trials_filters_on_a_value_with_no_trial_select_none_and_refuse_only_unknown_values():
    import pytest

    from pgps_tune.errors import PgpsError
    from pgps_tune.report import FILTER_VALUES, select_trials
    from pgps_tune.tuner import PHASES

    rows = [{"trial_id": "a", "phase": "search", "status": "completed", "score": 0.5}]
    # 'is any trial failed?' in a script: an empty answer, not an error
    assert select_trials(rows, status="failed") == [] and select_trials(rows, phase="confirm") == []
    with pytest.raises(PgpsError, match="--status 'done' matches no trial; this sweep has completed .any sweep: "):
        select_trials(rows, status="done")
    assert FILTER_VALUES["phase"] == PHASES  # the phases a sweep writes
