"""The HTML report (sweep and run pages, checked in a headless chromium) and the ``trials`` table."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgps_tune import schedule as sch
from pgps_tune.cli import build_parser, main
from pgps_tune.report import pareto_front, read_curves, read_trials, select_trials, write_report
from pgps_tune.results import COLUMNS, SCHEMA

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt install chromium)")

FINAL, POOLS, BATCH, EPOCHS = (16, 16, 16), (2, 2, 2), 2, 10


def _trial(tid: str, role: str, status: str, params: dict, dice: float, s: sch.Schedule, curve: list) -> dict:
    """One row of trials.parquet, as the exports write it, with the curve its result.json would hold."""
    row = {
        "trial_id": tid, "role": role, "status": status, "params": json.dumps({**params, "role": role}, sort_keys=True),
        "final_dice": dice, "best_dice": dice, "score": dice, "voxels_processed": 1000,
        "voxel_fraction": curve[-1][0] / (EPOCHS * 10), "schedule_voxel_fraction": s.voxel_fraction(),
        "train_time_s": 10 * s.voxel_fraction(), "wall_time_s": 12.0, "baseline_iterations": curve[-1][0],
        "rung_reached": 0 if status == "stopped_early" else 1, "stopped_early": status == "stopped_early",
        "failed": status == "failed", "completed": status == "completed", "num_failures": 0,
        "error": "", "n_stages": len(s.stages), "schedule": json.dumps(s.to_dict()), "dice_per_class": "{}",
    }
    return {"row": {c: row.get(c) for c in COLUMNS}, "curve": curve}


@pytest.fixture
def fake_sweep(tmp_path) -> Path:
    """A sweep folder as 'tune' leaves it, written by hand: no Ray run needed."""
    sweep = tmp_path / "sweep"
    ray = sweep / "ray"
    para = {g: sch.parametric(FINAL, POOLS, BATCH, EPOCHS, stages=2, growth=g) for g in (1.5, 2.0, 3.0)}
    trials = {
        "references": [
            _trial("base0001", "baseline", "completed", {"preset": "constant"}, 0.70,
                   sch.constant(FINAL, POOLS, BATCH, EPOCHS), [(20.0, 0.4), (60.0, 0.6), (100.0, 0.70)]),
            _trial("pape0002", "paper", "completed", {"preset": "paper", "mode": "resource"}, 0.66,
                   sch.paper(FINAL, POOLS, BATCH, EPOCHS), [(5.0, 0.2), (20.0, 0.5), (34.0, 0.66)]),
        ],
        "search": [
            _trial(f"srch000{i}", "search", "completed", {"stages": 2, "growth": g, "mode": "resource"}, d,
                   para[g], [(10.0, d - 0.3), (30.0, d - 0.1), (para[g].voxel_fraction() * 100, d)])
            for i, (g, d) in enumerate([(1.5, 0.74), (2.0, 0.71), (3.0, 0.60)])
        ] + [
            _trial("srch0009", "search", "stopped_early", {"stages": 1, "mode": "resource"}, 0.30,
                   sch.constant(FINAL, POOLS, BATCH, EPOCHS), [(10.0, 0.2), (20.0, 0.30)]),
        ],
    }
    for phase, ts in trials.items():
        for t in ts:
            folder = ray / f"sweep-{phase}" / f"run_trial_{t['row']['trial_id']}"
            folder.mkdir(parents=True)
            lines = [json.dumps({"trial_id": t["row"]["trial_id"], "baseline_iterations": x, "val_dice": y})
                     for x, y in t["curve"]]
            (folder / "result.json").write_text("\n".join(lines) + '\n{"trial_id": "cut by a ki')
    rows = [t["row"] for ts in trials.values() for t in ts]
    pq.write_table(pa.Table.from_pylist(rows), sweep / "trials.parquet")
    (sweep / "sweep.json").write_text(json.dumps({
        "format_version": 1, "sweep": "sweep", "dataset": "Fake", "storage_path": str(ray),
        "experiments": {"references": "sweep-references", "search": "sweep-search"},
        "objective": {"type": "max_dice"}, "final_patch": list(FINAL), "pools": list(POOLS),
    }))
    para[1.5].save(sweep / "best_schedule.yaml")
    (sweep / "summary.json").write_text(json.dumps({
        "dataset": "Fake", "sweep": "sweep", "objective": {"type": "max_dice"}, "trials": 6, "completed": 5,
        "stopped_early": 1, "failed": 0,
        "best": {k: rows[2][k] for k in ("trial_id", "role", "params", "final_dice", "score",
                                         "schedule_voxel_fraction", "train_time_s", "n_stages")},
        "gain_over_baseline": {"dice_points": 4.0, "time_ratio": 0.5, "baseline_dice": 0.70},
        "gain_over_paper": {"dice_points": 8.0, "time_ratio": None, "paper_dice": 0.66},
        "confirmation": {  # the shape results.confirmation_summary writes
            "repeat": "seed", "repeats": [1, 2, 3], "epochs": 10, "winner": "srch0000",
            "verdict": "the confirmed winner srch0000 beats the constant baseline by +4.10 Dice points",
            "significantly_better_than_baseline": True, "search_winner_confirmed": True,
            "schedules": {
                "baseline": {"role": "baseline", "trials": 3, "completed": 3, "schedule_voxel_fraction": 1.0,
                             "dice": {"mean": 0.70, "sd": 0.003, "n": 3}},
                "paper": {"role": "paper", "trials": 3, "completed": 3, "schedule_voxel_fraction": 0.44,
                          "dice": {"mean": 0.66, "sd": 0.005, "n": 3}},
                "srch0000": {"role": "search", "trials": 3, "completed": 3, "schedule_voxel_fraction": 0.7,
                             "dice": {"mean": 0.741, "sd": 0.004, "n": 3},
                             "vs": {"baseline": {"mean_diff": 0.041, "ci_low": 0.012, "ci_high": 0.07,
                                                 "p_value": 0.031, "n": 3},
                                    "paper": {"mean_diff": 0.081, "ci_low": 0.05, "ci_high": 0.11,
                                              "p_value": 0.004, "n": 3}}}}},
    }))
    return sweep


class _Refs(HTMLParser):
    """Every src/href of a page, to show that it fetches nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


def browse(page: Path, profile: Path) -> tuple[str, list[str]]:
    """Load ``page`` in headless chromium: the DOM after load, and every console message of the page."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def check_page(page: Path, tmp_path: Path, figures: int) -> str:
    """The page fetches nothing, logs nothing to the console, and shows all ``figures`` decoded."""
    text = page.read_text()
    refs = _Refs()
    refs.feed(text)
    assert len(refs.refs) == figures and all(r.startswith("data:image/png;base64,") for r in refs.refs), refs.refs
    assert "url(" not in text and "@import" not in text
    dom, console = browse(page, tmp_path / "profile")
    assert console == [], console
    loaded = re.search(r'<body[^>]*data-figures-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert loaded.groups() == (str(figures), str(figures))
    return dom


@needs_chromium
def test_sweep_report_opens_offline_with_every_figure(fake_sweep, tmp_path, capsys):
    assert main(["report", str(fake_sweep)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == fake_sweep / "report.html"
    # schedules, learning curves, Dice vs compute, confirmation intervals, importances: 5 figures
    dom = check_page(page, tmp_path, figures=5)
    assert "6 trials: 5 completed, 1 stopped early, 0 failed." in dom
    assert "Best: trial srch0000 (search), validation Dice 0.740, 2 stages" in dom
    assert "Against the baseline reference: Dice 0.740 vs 0.700 (+4.0 points), 0.50x its training time " \
           "(50% faster)." in dom
    assert "Against the paper reference: Dice 0.740 vs 0.660 (+8.0 points)." in dom
    assert "Caution" not in dom  # every reference learned (Dice above 0.5)
    # the confirmation: its verdict, and the paired difference with its interval and p-value
    assert "the confirmed winner srch0000 beats the constant baseline" in dom
    assert "+4.10 [+1.20, +7.00], p = 0.031" in dom and "srch0000 (confirmed winner)" in dom
    for tid in ("base0001", "pape0002", "srch0000", "srch0009"):
        assert tid in dom
    assert dom.index("srch0000") < dom.index("srch0001") < dom.index("srch0002")  # best score first


@needs_chromium
def test_run_report_of_a_real_train_run(tiny_msd, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_msd), "--out", str(run), "--preset", "parametric", "--stages", "2",
                 "--epochs", "4", "--iterations-per-epoch", "2", "--filters", "4", "8", "16", "--val-every", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert printed["val_dice"] == float(f"{printed['val_dice']:.4g}")  # rounded for people
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = write_report(run, tmp_path / "elsewhere" / "run.html")
    dom = check_page(page, tmp_path, figures=2)
    assert "8 of 8 iterations" in dom and "Stages" in dom


def test_report_refuses_what_it_cannot_read_in_one_line(fake_sweep, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds neither sweep.json nor metrics.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "typo")]) == 2  # said "holds neither ..." of a folder that is not there
    assert f"{tmp_path / 'typo'} does not exist; give a sweep folder" in capsys.readouterr().err
    assert main(["report", str(fake_sweep / "summary.json")]) == 2
    assert "summary.json is a file, not a folder; give a sweep folder" in capsys.readouterr().err
    assert main(["report", str(fake_sweep), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a .html file name" in capsys.readouterr().err
    (fake_sweep / "summary.json").write_text("{not json")
    assert main(["report", str(fake_sweep)]) == 2
    err = capsys.readouterr().err
    assert "summary.json is not valid JSON" in err and "Traceback" not in err
    assert not (fake_sweep / "report.html").exists()
    # a trials table whose JSON cells are damaged (handed over, or written by something else)
    table = pq.read_table(fake_sweep / "trials.parquet")
    cells = pa.array(["[" * 100_000 + "]" * 100_000] * len(table), pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("params"), "params", cells),
                   fake_sweep / "trials.parquet")
    assert main(["trials", str(fake_sweep)]) == 2
    err = capsys.readouterr().err
    assert "trials.parquet: trial base0001's params column is not valid JSON (nested too deeply" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_curves_come_from_result_lines_also_when_the_sweep_folder_moved(fake_sweep, tmp_path):
    meta = json.loads((fake_sweep / "sweep.json").read_text())
    curves = read_curves(fake_sweep, meta)
    assert curves["base0001"] == [(20.0, 0.4), (60.0, 0.6), (100.0, 0.7)]  # the cut line is skipped
    assert set(curves) == {"base0001", "pape0002", "srch0000", "srch0001", "srch0002", "srch0009"}
    moved = tmp_path / "moved"
    fake_sweep.rename(moved)  # storage_path in sweep.json now points nowhere; ray/ is inside the folder
    assert read_curves(moved, meta) == curves


def test_select_trials_filters_sorts_and_keeps_blanks_last():
    rows = [{"trial_id": t, "phase": p, "status": s, "score": v}
            for t, p, s, v in [("a", "search", "completed", 0.5), ("b", "search", "failed", math.nan),
                               ("c", "references", "completed", 0.7), ("d", "search", "completed", None)]]
    assert [r["trial_id"] for r in select_trials(rows)] == ["c", "a", "b", "d"]
    assert [r["trial_id"] for r in select_trials(rows, reverse=True)] == ["a", "c", "b", "d"]
    assert [r["trial_id"] for r in select_trials(rows, sort="trial_id", reverse=True)] == ["d", "c", "b", "a"]
    assert [r["trial_id"] for r in select_trials(rows, phase="search", status="completed")] == ["a", "d"]


def test_pareto_front_keeps_only_points_nothing_beats():
    pts = [(1.0, 0.8), (0.5, 0.7), (0.6, 0.6), (0.3, 0.5), (0.5, 0.65), (0.9, 0.8)]
    front = pareto_front(pts)
    assert front == [(0.3, 0.5), (0.5, 0.7), (0.9, 0.8)]
    for x, y in front:  # no point is at most as expensive and better, or cheaper and as good
        assert not any((a <= x and b > y) or (a < x and b >= y) for a, b in pts)


def test_trials_command_prints_filters_and_sorts_the_table(fake_sweep, capsys):
    assert main(["trials", str(fake_sweep)]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split()[:4] == ["trial_id", "phase", "role", "status"]
    assert [line.split()[0] for line in lines[1:]] == ["srch0000", "srch0001", "base0001", "pape0002",
                                                       "srch0002", "srch0009"]
    assert "growth=1.5 mode=resource stages=2" in lines[1] and "6 trials" in out.err

    assert main(["trials", str(fake_sweep), "--phase", "references", "--format", "csv",
                 "--columns", "trial_id,final_dice"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table == [["trial_id", "final_dice"], ["base0001", "0.7"], ["pape0002", "0.66"]]

    assert main(["trials", str(fake_sweep), "--status", "stopped_early", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trial_id"] for r in rows] == ["srch0009"] and set(COLUMNS) <= set(rows[0])

    assert main(["trials", str(fake_sweep), "--sort", "train_time_s", "--reverse", "--columns", "trial_id"]) == 0
    order = capsys.readouterr().out.split()[1:]
    times = {r["trial_id"]: r["train_time_s"] for r in read_trials(fake_sweep)}
    assert order == sorted(times, key=times.get)  # low first; equal times keep the file's order


def test_trials_prints_a_screenful_as_a_table_and_says_how_to_see_every_row(fake_sweep, capsys, monkeypatch):
    monkeypatch.setattr("pgps_tune.cli.TRIALS_SHOWN", 2)  # stands for the default 50 of a sweep of thousands
    assert main(["trials", str(fake_sweep)]) == 0
    out = capsys.readouterr()
    assert [line.split()[0] for line in out.out.splitlines()[1:]] == ["srch0000", "srch0001"]  # the best first
    assert "printed the first 2 of 6 selected trials; --limit 0 prints every one" in out.err

    assert main(["trials", str(fake_sweep), "--format", "csv", "--columns", "trial_id"]) == 0  # a file: every row
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 7 and "--limit" not in out.err
    assert main(["trials", str(fake_sweep), "--limit", "0", "--status", "completed"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert main(["trials", str(fake_sweep), "--limit", "1", "--format", "json", "--phase", "references"]) == 0
    out = capsys.readouterr()
    assert [r["trial_id"] for r in json.loads(out.out)] == ["base0001"] and "first 1 of 2 selected" in out.err


def test_the_trial_tables_show_fidelity_where_a_trial_trained_below_the_full_budget(fake_sweep, capsys):
    """A compressed ladder's low rungs score higher or lower than the full budget's winner: without the column
    a reader cannot tell why the top row is not the best.  A sweep all at the full budget does without it."""
    from pgps_tune.report import trial_table

    assert main(["trials", str(fake_sweep)]) == 0
    assert "fidelity" not in capsys.readouterr().out.splitlines()[0]
    rows = pq.read_table(fake_sweep / "trials.parquet").to_pylist()
    for r in rows:
        r["fidelity"] = 0.25 if r["trial_id"] == "srch0001" else 1.0
    pq.write_table(pa.Table.from_pylist(rows), fake_sweep / "trials.parquet")
    assert main(["trials", str(fake_sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].split().index("fidelity")
    assert {line.split()[0]: line.split()[column] for line in lines[1:]}["srch0001"] == "0.25"
    assert ">fidelity<" in trial_table(read_trials(fake_sweep), fake_sweep)


@pytest.mark.parametrize("argv,needle", [
    (["--phase", "refs"], "--phase 'refs' matches no trial; this sweep has references, search"),
    (["--status", "done"], "--status 'done' matches no trial; this sweep has completed, stopped_early"),
    (["--sort", "dice"], "--sort 'dice' is not a column of trials.parquet; use one of trial_id,"),
    (["--columns", "trial_id,nope"], "--columns: nope not in trials.parquet"),
])
def test_trials_command_names_what_exists(fake_sweep, capsys, argv, needle):
    assert main(["trials", str(fake_sweep), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_importances_use_only_the_search_phase_at_full_budget():
    # confirmation repeats and low-fidelity rungs carry seeds, folds and budgets that are not parameters
    def row(params, score, **extra):
        return {"role": "search", "completed": True, "params": json.dumps(params), "score": score, **extra}

    search = [row({"growth": g, "stages": s}, 0.5 + 0.1 * g - 0.01 * s, phase="search", fidelity=1.0)
              for g, s in ((1.5, 2), (2.0, 3), (2.5, 2), (3.0, 4))]
    repeats = [row({"growth": 1.5, "stages": 2, "seed": k, "epochs": 10}, 0.4 + 0.05 * k, phase="confirm")
               for k in (1, 2, 3)]
    rungs = [row({"growth": 9.0, "stages": 5, "lr": 0.1 * k}, 0.1 * k, phase="search", fidelity=0.25) for k in (1, 2)]
    from pgps_tune.report import param_importances

    assert set(param_importances(search + repeats + rungs)) == {"growth", "stages"}


def test_importances_of_many_trials_come_from_a_fixed_random_sample(monkeypatch):
    import optuna.importance  # the module itself: optuna's attribute is a lazy stand-in until first used

    from pgps_tune import report

    rows = [{"role": "search", "completed": True, "phase": "search", "score": 0.5 + 0.01 * i,
             "params": json.dumps({"growth": 1 + 0.1 * i, "stages": i % 3 + 1})} for i in range(12)]
    seen = []
    monkeypatch.setattr(report, "IMPORTANCE_TRIALS", 5)  # stands for 500 of thousands
    monkeypatch.setattr(optuna.importance, "get_param_importances",
                        lambda study, evaluator: seen.append(sorted(t.params["growth"] for t in study.trials)) or {})
    report.param_importances(rows)
    report.param_importances(rows[::-1])
    assert len(seen[0]) == 5 and seen[0] == seen[1]  # the same trials, whatever the table's order


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def _rewrite(path: Path, edit) -> None:
    table = pq.read_table(path)
    pq.write_table(edit(table), path)


def _cast(name: str, kind: pa.DataType):
    return lambda t: t.set_column(t.schema.get_field_index(name), name,
                                  pa.array([None if v is None else str(v).lower() for v in t[name].to_pylist()],
                                           kind))


@pytest.mark.parametrize("edit,needle", [
    (lambda t: pa.table({"id": [1, 2], "value": ["a", "b"]}),
     "lacks the columns trial_id, role, status, params, ... (22 in all)"),
    (lambda t: t.drop_columns(["score"]), "lacks the columns score;"),
    (lambda t: t.drop_columns(["role"]), "lacks the columns role;"),
    (lambda t: t.drop_columns(["status"]), "lacks the columns status;"),
    (lambda t: t.drop_columns(["schedule"]), "lacks the columns schedule;"),
    (_cast("score", pa.string()), "wrongly typed columns: score (string, not double)"),
    (_cast("completed", pa.string()), "wrongly typed columns: completed (string, not bool)"),
    (lambda t: pa.concat_tables([t, t]), "holds trial base0001 twice"),
    (lambda t: t.set_column(t.schema.get_field_index("status"), "status", pa.array(["done"] * len(t))),
     "trial base0001 has status 'done'"),
    (lambda t: t.set_column(t.schema.get_field_index("completed"), "completed", pa.array([False] * len(t))),
     "trial base0001 has completed False with status 'completed'"),
])
def test_a_foreign_or_damaged_trials_table_is_one_line_for_trials_and_report(fake_sweep, capsys, edit, needle):
    _rewrite(fake_sweep / "trials.parquet", edit)
    for argv in (["trials", str(fake_sweep)], ["report", str(fake_sweep)]):
        assert main(argv) == 2
        err = _one_line_error(capsys)
        assert needle in err and str(fake_sweep / "trials.parquet") in err and "'pgps-tune export'" in err, err
    assert not (fake_sweep / "report.html").exists()


def _summary_edit(path: Path, edit) -> None:
    s = json.loads(path.read_text())
    edit(s)
    path.write_text(json.dumps(s))


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.update(best="x"), "best is not a trial of trials.parquet"),
    (lambda s: s["best"].update(final_dice="abc"), "best is not a trial"),
    (lambda s: s["best"].update(final_dice=None), "best is not a trial"),
    (lambda s: s["best"].update(trial_id="gone0000"), "best is not a trial"),
    (lambda s: s.update(trials="many"), "trials is 'many', not a count"),
    (lambda s: s.update(trials=-5), "trials is -5, not a count"),
    (lambda s: s.update(completed=13), "completed is 13 where trials.parquet has 5"),
    (lambda s: s.pop("best"), "best is missing"),
    (lambda s: s.update(best=None), "best is missing though trials.parquet has a completed trial"),
    (lambda s: s.update(confirmation="yes"), "confirmation is not the confirmation pgps-tune writes"),
    (lambda s: s["confirmation"].pop("schedules"), "confirmation is not"),
    (lambda s: s["confirmation"]["schedules"].pop("srch0000"), "confirmation is not"),
    (lambda s: s["confirmation"]["schedules"]["srch0000"]["vs"]["baseline"].update(p_value="x"),
     "confirmation is not"),
    (lambda s: s["confirmation"]["schedules"]["srch0000"].update(within_tolerance={"mean_diff": -0.01}),
     "confirmation is not"),
    (lambda s: s["gain_over_baseline"].update(dice_points="x"), "gain_over_baseline is not the gain"),
])
def test_a_summary_that_does_not_match_the_sweep_is_one_line(fake_sweep, capsys, edit, needle):
    _summary_edit(fake_sweep / "summary.json", edit)
    assert main(["report", str(fake_sweep)]) == 2
    err = _one_line_error(capsys)
    assert needle in err and str(fake_sweep / "summary.json") in err and "rewrite it with 'pgps-tune export" in err
    assert not (fake_sweep / "report.html").exists()


def _run_folder(tmp_path: Path) -> Path:
    """A train run folder with the metrics.json fields the page reads (written by hand: no training)."""
    run = tmp_path / "run"
    run.mkdir()
    s = sch.constant(FINAL, POOLS, BATCH, 2)
    (run / "metrics.json").write_text(json.dumps({
        "val_dice": 0.5, "best_val_dice": 0.5, "train_time_s": 1.0, "voxel_fraction": 1.0, "iterations": 4,
        "total_iterations": 4, "completed": True, "schedule": s.to_dict(), "dataset": "Fake",
        "history": [{"val_dice": None, "train_loss": 1.0},
                    {"val_dice": 0.5, "train_loss": 0.8, "baseline_equivalent_iterations": 4.0}],
        "stages": [{"index": 0, "patch_size": list(FINAL), "batch_size": BATCH, "epochs": 2, "iterations": 4,
                    "wall_time_s": 1.0, "voxels": 4 * BATCH * 16 ** 3}]}))
    return run


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(history="x"), "(history)"),
    (lambda m: m.update(history=[{"val_dice": 0.5}]), "(history)"),
    (lambda m: m.update(total_iterations="x"), "(total_iterations)"),
    (lambda m: m.update(stages=[1, 2]), "(stages)"),
    (lambda m: m.update(val_dice="high"), "(val_dice)"),
    (lambda m: m.pop("schedule"), "(schedule)"),
])
def test_a_damaged_metrics_json_is_one_line(tmp_path, capsys, edit, needle):
    run = _run_folder(tmp_path)
    _summary_edit(run / "metrics.json", edit)
    assert main(["report", str(run)]) == 2
    err = _one_line_error(capsys)
    assert needle in err and str(run / "metrics.json") in err and "malformed fields" in err


def test_report_out_never_replaces_a_sweep_file_or_another_kind_of_file(fake_sweep, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (fake_sweep / "best_schedule.yaml").unlink()  # not there now, but the sweep's own name all the same
    before = {p: p.read_bytes() for p in fake_sweep.iterdir() if p.is_file()}
    for target, needle in [(fake_sweep / "trials.parquet", "is one of the files of"),
                           (fake_sweep / "sweep.json", "is one of the files of"),
                           (fake_sweep / "best_schedule.yaml", "is one of the files of"),
                           (tmp_path / "notes.txt", "exists and is not an HTML page")]:
        assert main(["report", str(fake_sweep), "--out", str(target)]) == 2
        assert needle in _one_line_error(capsys)
    assert {p: p.read_bytes() for p in fake_sweep.iterdir() if p.is_file()} == before
    assert (tmp_path / "notes.txt").read_text() == "mine"
    run = _run_folder(tmp_path)
    assert main(["report", str(run), "--out", str(run / "metrics.json")]) == 2
    assert "is one of the files of" in _one_line_error(capsys)


def test_damaged_curve_files_and_best_schedule_leave_a_page_that_says_what_is_missing(fake_sweep, capsys):
    result = next((fake_sweep / "ray" / "sweep-search").glob("*/result.json"))
    with result.open("a") as fh:
        fh.write("\n[1, 2]\n")  # a line that is JSON but not a result: skipped
    folder = next((fake_sweep / "ray" / "sweep-references").glob("*/result.json"))
    folder.unlink()
    folder.mkdir()
    (fake_sweep / "best_schedule.yaml").write_text("- a list\n")
    assert main(["report", str(fake_sweep)]) == 0
    err = capsys.readouterr().err
    assert "best_schedule.yaml" in err and "rewrite it with 'pgps-tune export" in err
    page = (fake_sweep / "report.html").read_text()
    assert "not drawn: 1 trial whose result.json cannot be read" in page and str(folder) in page
    assert "the best schedule is not drawn" in page


def test_messages_name_the_real_problem_and_its_fix(fake_sweep, tmp_path, capsys):
    _rewrite(fake_sweep / "trials.parquet", lambda t: t.set_column(
        t.schema.get_field_index("schedule"), "schedule", pa.array(['{"a": 1}'] * len(t))))
    assert main(["report", str(fake_sweep)]) == 2
    err = _one_line_error(capsys)
    assert "trial base0001 in" in err and "holds a damaged schedule" in err and "'pgps-tune export'" in err
    assert "pgps-tune schedule" not in err
    (fake_sweep / "trials.parquet").unlink()
    (fake_sweep / "trials.parquet").mkdir()
    assert main(["trials", str(fake_sweep)]) == 2
    assert "is a folder, not the sweep's trial table" in _one_line_error(capsys)
    assert main(["trials", str(_run_folder(tmp_path))]) == 2
    assert "is a 'pgps-tune train' run folder" in _one_line_error(capsys)
    export = tmp_path / "export"
    export.mkdir()
    for name in ("trials.parquet", "summary.json"):
        (export / name).write_text("x")
    assert main(["report", str(export)]) == 2
    assert "is an export folder" in _one_line_error(capsys)
    (tmp_path / "afile").write_text("x")
    assert main(["confirm", str(tmp_path / "afile")]) == 2
    assert "is a file; give a sweep folder" in _one_line_error(capsys)


def test_trials_columns_with_an_empty_name_says_so(fake_sweep, capsys):
    assert main(["trials", str(fake_sweep), "--columns", "trial_id,,score"]) == 2
    assert "--columns 'trial_id,,score' has an empty name" in _one_line_error(capsys)


def test_report_out_in_a_missing_folder_creates_it_and_says_so_in_one_line_as_every_out_does(fake_sweep, tmp_path,
                                                                                            capsys):
    page = tmp_path / "typo" / "deep" / "page.html"
    assert main(["report", str(fake_sweep), "--out", str(page)]) == 0
    err = capsys.readouterr().err
    assert page.is_file() and err == (f"pgps-tune: note: --out {page}: created the folder {tmp_path / 'typo'} and 1 "
                                      "folder(s) inside it, which did not exist\n")
    assert main(["report", str(fake_sweep), "--out", str(page.parent / "again.html")]) == 0
    assert capsys.readouterr().err == ""  # the folder is there now: nothing to say
    out = tmp_path / "new" / "s.yaml"  # schedule --out (and train, tune, predict, export, best) alike
    assert main(["schedule", "--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().err == f"pgps-tune: note: --out {out}: created the folder {out.parent}, which did " \
                                      "not exist\n"


def test_a_replaced_confirmation_is_named_with_the_command_that_brings_it_back(fake_sweep, capsys):
    # 'confirm' at another budget or repeat kind lists the earlier settings under confirmation.replaced:
    # the printed summary and the page say so in one sentence, with the confirm command for this folder
    from pgps_tune.report import summary_lines, sweep_report

    summary = json.loads((fake_sweep / "summary.json").read_text())
    assert not any("replaced" in line for line in summary_lines(summary, fake_sweep))
    seeds = {"top_k": 1, "epochs": 10, "seeds": 3, "folds": None, "splits": None}
    summary["confirmation"]["replaced"] = [seeds]
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    want = (f"The confirmation shown replaced an earlier one (top 1, 3 seeds, 10 epochs), whose trials stay in "
            f"trials.parquet: 'pgps-tune confirm {fake_sweep} --top-k 1 --seeds 3 --epochs 10' brings it back "
            "without training.")
    assert summary_lines(summary, fake_sweep)[-1] == want
    assert html.escape(want) in sweep_report(fake_sweep)
    a = build_parser().parse_args(shlex.split(want.split("'")[1])[1:])  # the flags it names are confirm's own
    assert (a.command, a.top_k, a.seeds, a.epochs) == ("confirm", 1, 3, 10)
    folds = {"top_k": 2, "epochs": 20, "seeds": None, "folds": 3, "splits": "/d/splits.json"}
    summary["confirmation"]["replaced"] = [seeds, folds]
    assert summary_lines(summary, "out")[-1] == (
        "The confirmation shown replaced 2 earlier ones (top 1, 3 seeds, 10 epochs; top 2, 3 folds, 20 epochs), "
        "whose trials stay in trials.parquet: 'pgps-tune confirm out --top-k 1 --seeds 3 --epochs 10' or "
        "'pgps-tune confirm out --top-k 2 --confirm-folds 3 --splits /d/splits.json --epochs 20' brings one back "
        "without training.")
    summary["confirmation"]["replaced"] = [{"top_k": 1}]  # damaged: refused in one line, not a traceback
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(fake_sweep)]) == 2
    err = capsys.readouterr().err
    assert "confirmation is not the confirmation pgps-tune writes" in err and "Traceback" not in err


HOSTILE = '<script>alert("x")</script></table></td>\'"&amp; \u202eRTL \u05e9\u05dc\u05d5\u05dd '


class _Tags(HTMLParser):
    """Every element of a page, and the text inside each <h1>, <bdi> and <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.open: list[str] = []
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag):]

    def handle_data(self, data):
        for tag in ("h1", "bdi", "script"):
            if tag in self.open:
                self.text[tag] = self.text.get(tag, "") + data


def _with_trials(sweep: Path, edit) -> None:
    """Rewrite a fake sweep's trials.parquet through ``edit(rows) -> rows`` and its summary.json to match."""
    from pgps_tune.results import summarize

    rows = edit(pq.read_table(sweep / "trials.parquet").to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sweep / "trials.parquet")
    meta = json.loads((sweep / "sweep.json").read_text())
    summary = summarize(read_trials(sweep), {**meta, "sweep": meta["sweep"]})
    (sweep / "summary.json").write_text(json.dumps(summary))


def _failed(row: dict, error: str) -> dict:
    return {**row, "status": "failed", "failed": True, "completed": False, "stopped_early": False,
            "final_dice": None, "best_dice": None, "score": None, "error": error}


def test_hostile_names_and_errors_are_text_and_cannot_break_the_page(fake_sweep):
    from pgps_tune.report import sweep_report

    meta = json.loads((fake_sweep / "sweep.json").read_text())
    (fake_sweep / "sweep.json").write_text(json.dumps({**meta, "sweep": HOSTILE + "N" * 400, "dataset": HOSTILE}))
    summary = json.loads((fake_sweep / "summary.json").read_text())
    summary["confirmation"]["verdict"] = HOSTILE
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    long_error = HOSTILE + "E" * 6000 + "\nTraceback line\n" * 50
    rows = pq.read_table(fake_sweep / "trials.parquet").to_pylist()
    rows[-1] = _failed(rows[-1], long_error)  # the stopped trial failed instead, with a hostile error
    rows[-1]["params"] = json.dumps({HOSTILE: HOSTILE, "role": "search"})
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), fake_sweep / "trials.parquet")
    summary.update(stopped_early=0, failed=1)
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    page = sweep_report(fake_sweep)
    tags = _Tags()
    tags.feed(page)
    # nothing the user wrote became markup: one script (the page's own), tables only where the page makes them
    assert tags.tags.count("script") == 1 and "alert" not in tags.text["script"]
    assert tags.tags.count("table") == 3  # failed trials, confirmation, trials: no more
    assert set(tags.tags) <= {"html", "head", "meta", "title", "style", "script", "body", "h1", "h2", "p", "br", "div",
                              "table", "thead", "tbody", "tr", "th", "td", "img", "bdi", "details", "summary", "pre",
                              "wbr"}
    assert html.escape(HOSTILE) in page and HOSTILE not in page
    # the user's names are isolated, so right-to-left text in one cannot turn the heading round
    assert tags.text["bdi"] == HOSTILE + "N" * 400 + HOSTILE
    # a long error shows its first line, cut, and opens to the rest, itself cut
    assert "E" * 6000 not in page and "(2857 more characters)" in page and page.count("<details>") == 2
    summary_text = re.search(r"<summary>(.*?)</summary>", page).group(1)
    assert summary_text == html.escape(HOSTILE + "E" * (160 - len(HOSTILE))) + " ..."


@needs_chromium
def test_a_narrow_window_never_scrolls_the_whole_page_sideways(fake_sweep, tmp_path):
    # long unbroken names and errors wrap; the tables scroll inside their own box
    meta = json.loads((fake_sweep / "sweep.json").read_text())
    (fake_sweep / "sweep.json").write_text(json.dumps({**meta, "sweep": "N" * 300}))
    _with_trials(fake_sweep, lambda rows: [*rows[:-1], _failed(rows[-1], "RuntimeError: " + "x" * 2000)])
    page = write_report(fake_sweep)
    probe = ("<script>window.addEventListener('load', function () {document.body.setAttribute('data-width', "
             "document.documentElement.scrollWidth + '/' + window.innerWidth)});</script>")
    probed = tmp_path / "probe.html"
    probed.write_text(page.read_text().replace("</body>", probe + "</body>"))
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=420,900", "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180)
    scroll, inner = map(int, re.search(r'data-width="(\d+)/(\d+)"', proc.stdout).groups())
    assert scroll <= inner, (scroll, inner)


def test_a_sweep_where_every_trial_failed_says_why_and_draws_no_empty_figure(fake_sweep):
    from pgps_tune.report import sweep_report

    _with_trials(fake_sweep, lambda rows: [_failed(r, "RuntimeError: out of memory" if i % 3 else "ValueError: nan")
                                           for i, r in enumerate(rows)])
    (fake_sweep / "best_schedule.yaml").unlink()
    for f in (fake_sweep / "ray").glob("*/*/result.json"):
        f.write_text("")  # the trials failed before their first validation
    page = sweep_report(fake_sweep)
    assert "6 trials: 0 completed, 0 stopped early, 6 failed." in page
    assert "<h2>Failed trials</h2>" in page
    failures = page.split("<h2>Failed trials</h2>")[1].split("<h2>")[0]
    assert failures.index("out of memory") < failures.index("ValueError: nan")  # the most frequent first
    assert "<td class=\"\">4</td>" in failures and "--status failed --columns trial_id,error" in failures
    assert "no trial reported a validation Dice" in page  # the ray/ folder is there: nothing to read
    assert page.count("<img") == 1  # the references' schedules only: no empty Dice-against-compute axes
    for f in (fake_sweep / "ray").glob("*/*/result.json"):
        f.unlink()  # the trial folders' results are gone (a copy made without them): not "nothing reported"
    assert "no trial&#x27;s result.json under" in sweep_report(fake_sweep)
    assert "no searched or reference trial completed with a Dice: nothing to plot" in page


def test_a_large_sweep_gives_a_page_of_bounded_size(fake_sweep):
    from pgps_tune.report import TABLE_ROWS, sweep_report

    def many(rows):
        searched = [r for r in rows if r["role"] == "search"]
        extra = [{**searched[i % len(searched)], "trial_id": f"many{i:05d}", "score": 0.5 + i / 10_000,
                  "final_dice": 0.5 + i / 10_000} for i in range(1500)]
        extra += [_failed({**searched[0], "trial_id": f"fail{i:05d}"}, f"RuntimeError: case {i % 20}: " + "x" * 400)
                  for i in range(300)]
        return rows + extra

    _with_trials(fake_sweep, many)
    page = sweep_report(fake_sweep)
    table = page.split("<h2>Trials</h2>")[1]
    assert table.count("<tr>") == 1 + TABLE_ROWS + 2  # header, the best searched trials, both references
    assert "base0001" in table and "pape0002" in table and "many01499" in table and "many00000" not in table
    assert f"{TABLE_ROWS + 2} of 1806 trials shown" in table
    assert html.escape(f"'pgps-tune trials {fake_sweep} --limit 0'") in table
    failures = page.split("<h2>Failed trials</h2>")[1].split("<h2>")[0]
    assert failures.count("<tr>") == 1 + 10 and "and 150 trials with 10 other errors" in failures
    assert len(page) < 700_000, len(page)



def test_dice_against_compute_draws_the_front_the_exports_name(fake_sweep):
    # confirmation repeats (retrained schedules) and short-budget rungs are not points of the search: the
    # drawn front is the one pareto.parquet and summary.json name (results.front_rows)
    from pgps_tune.report import comparable, dice_vs_compute_figure
    from pgps_tune.results import front_rows

    def more(rows):
        top = next(r for r in rows if r["trial_id"] == "srch0000")
        return rows + [{**top, "trial_id": "conf0001", "phase": "confirm", "final_dice": 0.9, "score": 0.9},
                       {**top, "trial_id": "rung0001", "fidelity": 0.25, "final_dice": 0.95, "score": 0.95}]

    _with_trials(fake_sweep, more)
    rows = read_trials(fake_sweep)
    shown = {r["trial_id"] for r in comparable(rows)}
    assert shown == {"base0001", "pape0002", "srch0000", "srch0001", "srch0002"}
    pareto_sweep = [r for r in rows if r["trial_id"] != "rung0001"]  # (a pareto sweep runs no ASHA: no rungs)
    drawn = set(pareto_front([(r["schedule_voxel_fraction"], r["final_dice"]) for r in comparable(rows)]))
    assert {(r["schedule_voxel_fraction"], r["final_dice"]) for r in front_rows(pareto_sweep)} == drawn
    assert len(drawn) == 3  # the paper reference, srch0001 and srch0000: never the repeat's Dice of 0.9
    assert dice_vs_compute_figure(rows, "srch0000")[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_confirmed_best_says_its_numbers_are_means_and_prints_them_as_the_terminal_does(fake_sweep, capsys):
    from pgps_tune.cli import _print_confirmation
    from pgps_tune.report import summary_lines, sweep_report

    summary = json.loads((fake_sweep / "summary.json").read_text())
    summary["best"].update(final_dice=0.741, confirmed=True, dice_sd=0.004, repeats=3)
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    lines = summary_lines(summary)
    assert lines[1].startswith("Best: trial srch0000 (search), validation Dice 0.741 (mean over 3 seeds, sd 0.004), ")
    assert lines[2].startswith("Against the baseline reference (means over 3 seeds): Dice 0.741 vs 0.700 (+4.0 points)")
    page = sweep_report(fake_sweep)
    _print_confirmation(summary)
    printed = capsys.readouterr().out
    for mean, sd in (("0.7000", "0.0030"), ("0.6600", "0.0050"), ("0.7410", "0.0040")):
        assert f"{mean}  {sd}" in printed  # the terminal's table ...
        assert f'<td class="">{mean}</td><td class="">{sd}</td>' in page  # ... and the page's, alike


def test_a_sweep_with_both_paper_modes_as_references_has_its_table_and_page(fake_sweep, capsys):
    # search.references: [constant, "paper:resource", "paper:performance"] (hippocampus_pareto) names each
    # reference's role after it; trials and report read such a table, and refuse a role no sweep writes
    def modes(rows):
        paper = next(r for r in rows if r["role"] == "paper")
        return [{**r, "role": "paper:resource"} if r is paper else r for r in rows] + [
            {**paper, "trial_id": "papp0003", "role": "paper:performance", "final_dice": 0.69, "score": 0.69,
             "schedule": json.dumps(sch.paper(FINAL, POOLS, BATCH, EPOCHS, "performance").to_dict())}]

    _with_trials(fake_sweep, modes)
    summary = json.loads((fake_sweep / "summary.json").read_text())
    summary["pareto"] = {"pick": "knee", "front": ["pape0002", "srch0000"]}
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    assert main(["trials", str(fake_sweep), "--columns", "trial_id,role"]) == 0
    assert "papp0003  paper:performance" in capsys.readouterr().out
    page = write_report(fake_sweep).read_text()
    assert "Pareto front: 2 schedules (pape0002, srch0000; cheapest first) in pareto.parquet and pareto/; best by " \
           "the rule knee." in page
    assert "papp0003" in page.split("<h2>Trials</h2>")[1]
    _rewrite(fake_sweep / "trials.parquet", lambda t: t.set_column(
        t.schema.get_field_index("role"), "role", pa.array(["boss"] * len(t))))
    assert main(["trials", str(fake_sweep)]) == 2
    assert "trial base0001 has role 'boss', which pgps-tune never writes" in _one_line_error(capsys)


def test_the_page_names_asha_rungs_only_where_asha_compared_trials_on_the_curves_clock(fake_sweep):
    from pgps_tune.report import asha_rungs, sweep_report

    rows = read_trials(fake_sweep)  # srch0009 was stopped early
    asha = {"time_attr": "baseline_iterations", "max_t": 100, "grace_period": 20, "reduction_factor": 2}
    assert asha_rungs({"asha": asha}, rows) == [20, 40, 80]
    assert asha_rungs({}, rows) == []  # a sweep.json from before the settings were recorded
    assert asha_rungs({"asha": {**asha, "time_attr": "epoch", "max_t": 10, "grace_period": 2}}, rows) == []
    assert asha_rungs({"asha": asha}, [{**r, "stopped_early": False} for r in rows]) == []  # ASHA may have been off
    meta = json.loads((fake_sweep / "sweep.json").read_text())
    (fake_sweep / "sweep.json").write_text(json.dumps({**meta, "asha": asha}))
    assert "ASHA compared the searched trials at 3 rungs of compute: 20, 40, 80 baseline-equivalent iterations" \
        in sweep_report(fake_sweep)


@pytest.mark.parametrize("over,searched", [({}, [0, 2]), ({"objective": {"type": "pareto"}}, [None, None]),
                                           ({"early_stopping": False}, [None, None])])
def test_rung_reached_is_empty_where_no_rung_compared_the_trial(fake_sweep, over, searched):
    # ASHA compares only the search phase, and only where it ran: the references and confirmation repeats, and
    # every trial of a pareto sweep or one with asha.enabled false, reached no rung (null), and the page says none
    from conftest import sweep_meta

    from pgps_tune.report import trial_table
    from pgps_tune.results import TrialRecord, trial_rows

    meta = sweep_meta(fake_sweep, **over)  # asha: epochs, rungs at 2, 4 and 8
    records = [TrialRecord(f"{phase}-{t}", "TERMINATED", {}, {"epoch": t, "completed": True}, phase=phase)
               for phase in ("references", "search", "confirm") for t in (3, 10)]
    rows = trial_rows(records, meta)
    assert [r["rung_reached"] for r in rows] == [None, None, *searched, None, None]
    columns = trial_table(rows, fake_sweep).split("</thead>")[0]
    assert ("rung_<wbr>reached" in columns) == (searched[0] is not None)
    # a table exported before the rule gave every trial a rung: its readers ('trials', the page) apply the rule
    old = [{**r, "rung_reached": 1} for r in rows]
    pq.write_table(pa.Table.from_pylist(old, schema=SCHEMA), fake_sweep / "trials.parquet")
    (fake_sweep / "sweep.json").write_text(json.dumps(meta))
    kept = [None if x is None else 1 for x in searched]
    assert [r["rung_reached"] for r in read_trials(fake_sweep)] == [None, None, *kept, None, None]
    (fake_sweep / "sweep.json").write_text(json.dumps({**meta, "early_stopping": False, "fidelity": {
        "type": "compressed"}}))  # a compressed ladder's rungs are runs at the rung's budget: each search trial's own
    assert [r["rung_reached"] for r in read_trials(fake_sweep)] == [None, None, 1, 1, None, None]


def test_a_cheapest_within_confirmation_shows_the_test_its_verdict_used_on_page_and_terminal(fake_sweep, capsys,
                                                                                                 monkeypatch):
    # the verdict said "within the tolerance, p = 0.004" while the table, the figure and the terminal showed the
    # two-sided "better" test's p = 0.12 beside it: each place shows the test the verdict used, and its question
    import pgps_tune.report as report
    from pgps_tune.cli import _print_confirmation
    from pgps_tune.report import sweep_report

    figures = []  # the figures as drawn, not encoded (the page's other checks open them in a browser)
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or b"")
    monkeypatch.setattr(report, "param_importances", lambda rows: {})  # not this test's: seconds to import

    summary = json.loads((fake_sweep / "summary.json").read_text())
    conf = summary["confirmation"]
    summary["objective"] = {"type": "cheapest_within", "tolerance": 0.05}
    w = conf["schedules"]["srch0000"]
    w["vs"]["baseline"] = {"mean_diff": -0.012, "ci_low": -0.03, "ci_high": 0.006, "p_value": 0.12, "n": 3}
    old = json.loads(json.dumps(summary))  # a summary written before the tolerance's test: its "better" test
    w["within_tolerance"] = {**w["vs"]["baseline"], "margin": 0.05, "p_value": 0.004, "within": True,
                             "pairs_within": 3}
    (fake_sweep / "summary.json").write_text(json.dumps(summary))
    page = sweep_report(fake_sweep)
    assert "-1.20 [-3.00, +0.60], p = 0.004" in page and "p = 0.12" not in page
    assert "+8.10 [+5.00, +11.00], p = 0.004" in page  # against the paper: the "better" test, as before
    assert ("p-values: vs baseline, cheapest_within&#x27;s question: is Dice within the tolerance (5.00 points) of "
            "the constant baseline&#x27;s? (one-sided paired t-test of the difference &gt; -5.00 points") in page
    assert "vs paper: is Dice better? (two-sided paired t-test" in page
    ax = next(f.axes[0] for f in figures if f.axes[0].get_title().startswith("confirmation"))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["srch0000 - baseline: within 5.00? p = 0.004",
                                                            "srch0000 - paper: better? p = 0.004"]
    tolerance = [c for c in ax.collections if c.get_label().startswith("-5.00: cheapest_within's tolerance")]
    assert len(tolerance) == 1 and tolerance[0].get_segments()[0][0][0] == pytest.approx(-5.0)
    _print_confirmation(summary)
    printed = capsys.readouterr().out
    assert "-1.20 [-3.00, +0.60] p=0.004 " in printed and "p=0.12" not in printed
    assert "  p-values: vs baseline, cheapest_within's question: is Dice within the tolerance (5.00 points)" in printed
    (fake_sweep / "summary.json").write_text(json.dumps(old))  # still renders, with the test it has, said so
    page = sweep_report(fake_sweep)
    assert "-1.20 [-3.00, +0.60], p = 0.12" in page
    assert ("p-values: vs baseline, paper: is Dice better? (two-sided paired t-test; better when the whole 95% "
            "interval is above 0) (a summary written before the confirmation tested cheapest_within&#x27;s "
            "tolerance: rerun &#x27;pgps-tune export&#x27; for that sweep to test it).") in page
