"""The benchmark scripts' quick modes, at their smallest, on a tiny MSD folder: they must not rot."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import make_msd

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_bench_curriculum_quick_smallest(tmp_path):
    data = make_msd(tmp_path / "tiny", n=6, shape=(24, 24, 24))
    sched = tmp_path / "searched.yaml"
    # a searched schedule as bench_search writes it: a parametric schedule for this data's plan
    from pgps_tune import schedule as sch
    from pgps_tune.data import plan_patch, prepare

    plan = plan_patch(*(lambda d: (d.median_shape, d.spacing))(prepare(str(data))))
    sch.parametric(plan.final_patch, plan.pools, 2, 16, stages=2, growth=2.0, mode="resource").save(sched)
    p = run("bench_curriculum.py", "--quick", "--data", str(data), "--seeds", "0", "1", "--long", "16x1",
            "--short", "16x1", "--val-every", "8", "--batch-size", "2", "--searched", str(sched),
            "--out", str(tmp_path / "out"), "--report", str(tmp_path / "docs" / "bench_curriculum.md"),
            "--workers", "1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for budget in ("long", "short"):
        rows = summary["summaries"][budget]
        assert set(rows) == {"constant", "paper-resource", "paper-performance", "searched"}
        assert rows["constant"]["time_ratio"] == 1.0
        assert all(len(r["dice"]) == 2 and 0 <= r["dice_mean"] <= 1 for r in rows.values())
        assert rows["paper-resource"]["voxel_fraction"] < 1.0
    report = (tmp_path / "docs" / "bench_curriculum.md").read_text()
    assert "| paper-resource |" in report and "Targets:" in report and "0.44x" in report
    for png in ("bench_curriculum_dice_vs_time.png", "bench_curriculum_patch_size.png"):
        assert (tmp_path / "docs" / "img" / png).read_bytes()[:4] == b"\x89PNG"
    # a second call reuses every finished job
    p2 = run("bench_curriculum.py", "--quick", "--data", str(data), "--seeds", "0", "1", "--long", "16x1",
             "--short", "16x1", "--val-every", "8", "--batch-size", "2", "--searched", str(sched),
             "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert p2.returncode == 0 and "16 reused, 0 to run" in p2.stdout


def test_bench_curriculum_bad_input(tmp_path):
    p = run("bench_curriculum.py", "--quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
            cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
    p = run("bench_curriculum.py", "--quick", "--long", "sixteen", cwd=tmp_path)
    assert p.returncode != 0 and "EPOCHSxITERATIONS" in p.stderr and "Traceback" not in p.stderr


def test_bench_search_quick_smallest(tmp_path):
    data = make_msd(tmp_path / "tiny", n=6, shape=(24, 24, 24))
    # three live searches (asha_random is asha_tpe's code with another sampler: left out to save a Ray sweep)
    p = run("bench_search.py", "--quick", "--data", str(data), "--iterations-per-epoch", "1", "--val-every", "8",
            "--replay-seeds", "3", "--out", str(tmp_path / "out"), "--report", str(tmp_path / "docs" / "s.md"),
            "--methods", "grid", "asha_tpe", "optuna_sha", "--concurrent", "1", cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(s["grid"]) == 4  # the quick space: 2 stage counts x 2 modes, every one trained to the end
    assert set(s["summary"]) == {"grid", "asha_tpe", "optuna_sha"}
    grid_compute = s["curves"]["grid"][-1][0]
    assert abs(grid_compute - 1.0) < 1e-9
    for m in ("asha_tpe", "optuna_sha"):
        spent = s["curves"][m][-1][0]
        # each search stops once it has spent its share (half the grid), give or take one report per trial
        assert 0.3 < spent < 1.0, (m, spent)
    assert "Determinism" in p.stdout and "| asha_tpe |" in p.stdout
    assert (tmp_path / "docs" / "img" / "s_best_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "grid_best_schedule.yaml").is_file()
    # the report rebuilds from the stored trials without training anything
    p2 = run("bench_search.py", "--quick", "--data", str(data), "--iterations-per-epoch", "1", "--val-every", "8",
             "--replay-seeds", "3", "--out", str(tmp_path / "out"), "--reuse", "--methods", "grid", "asha_tpe",
             "optuna_sha", cwd=tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["grid"] == s["grid"]
    p3 = run("bench_search.py", "--quick", "--data", str(data), "--out", str(tmp_path / "fresh"), "--reuse", "grid",
             cwd=tmp_path)
    assert p3.returncode != 0 and "run without --reuse" in p3.stderr and "Traceback" not in p3.stderr


def test_bench_stage_cost_quick(tmp_path):
    data = make_msd(tmp_path / "tiny data", n=4, shape=(24, 24, 24))  # a space: the recorded command quotes it
    p = run("bench_stage_cost.py", "--quick", "--data", str(data), "--steps", "1", "--batch-size", "2",
            "--channels-last", "--report", str(tmp_path / "cost.md"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    text = (tmp_path / "cost.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 2 and rows[-1].split("|")[5].strip() == "1.00"  # the final stage against itself
    recorded = shlex.split(re.search(r"^Command: `(.*)`$", text, re.M).group(1))  # the report's command runs as shown
    assert recorded[recorded.index("--data") + 1] == str(data)


def test_bench_augment_times_the_trainers_own_step(tmp_path):
    data = make_msd(tmp_path / "tiny", n=4, shape=(24, 24, 24))
    p = run("bench_augment.py", "--data", str(data), "--iterations", "1", "--repeats", "1", "--threads", "1",
            "--report", str(tmp_path / "aug.md"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split("|") for line in (tmp_path / "aug.md").read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 2 and rows[-1][9].strip() == "1.00"  # the final stage against itself
    assert all(float(r[6]) > 0 for r in rows)  # the model's rate, Mvox/s


def test_bench_docs_copies_reports_between_markers(tmp_path):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("bench_docs", ROOT / "scripts" / "bench_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "bench_x.md").write_text("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    text = "intro\n<!-- begin generated: bench_x -->\nstale\n<!-- end generated: bench_x -->\nhand-written\n"
    out = mod.fill(text, tmp_path)
    assert out == "intro\n<!-- begin generated: bench_x -->\n| a | b |\n|---|---|\n| 1 | 2 |\n" \
                  "<!-- end generated: bench_x -->\nhand-written\n"
    assert mod.fill(out, tmp_path) == out  # idempotent
    with pytest.raises(SystemExit, match="bench_y.md does not exist"):
        mod.fill("<!-- begin generated: bench_y -->\n<!-- end generated: bench_y -->\n", tmp_path)
