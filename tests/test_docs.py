"""The docs say what the code does: generated references current, every command line and flag real,
every fix an error message suggests available, and the README's Python example runs."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pgps_tune import schedule as sch
from pgps_tune.cli import build_parser, main
from pgps_tune.space import check_space_against_plan

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "GUIDE.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
NOT_OURS = {"--head", "--quick", "--logdir"}  # ray start --head; the benchmarks' --quick; tensorboard --logdir


def commands() -> dict[str, set[str]]:
    """Every subcommand with its option strings."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def test_reference_pages_are_current():
    proc = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, GUIDE], ids=lambda p: p.name)
def test_links_lead_somewhere(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        doc = (page.parent / path).resolve() if path else page
        assert doc.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and doc.suffix == ".md":
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", doc.read_text(), flags=re.M)}
            assert anchor in anchors, f"{page.name} links to {target}, a heading {doc.name} does not have"


def test_readme_leads():
    text = README.read_text()
    assert len(text.encode()) < 12 * 1024
    assert "bash scripts/setup.sh && .venv/bin/pgps-tune demo" in text
    # the README's test command is the one CI runs
    command = re.search(r"Run the tests.*?```bash\n(.*?)\n```", text, flags=re.S).group(1)
    assert command.startswith(".venv/bin/python -m pytest")
    assert f"\n{command}\n" in (README.parent / ".ci" / "run").read_text()
    headings = re.findall(r"^## (.*)$", text, flags=re.M)
    assert headings[:3] == ["What it is", "Quick start", "How a run works"]
    toc = text[:text.index("## What it is")]
    for h in headings:
        assert f"(#{_anchor(h)})" in toc, f"the table of contents misses {h}"
    assert "sampler.py" in text and "What a trial reports" in text


def command_lines(text: str) -> list[list[str]]:
    """The arguments of every ``pgps-tune`` command in the page's bash blocks."""
    found = []
    for block in fenced(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w.endswith("pgps-tune"):
                    args = words[i + 1:]
                    found.append(args[:args.index(">")] if ">" in args else args)
    return found


@pytest.mark.parametrize("page", [README, GUIDE], ids=lambda p: p.name)
def test_every_command_line_in_the_docs_parses(page):
    lines = command_lines(page.read_text())
    assert lines
    for argv in lines:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: 'pgps-tune {shlex.join(argv)}' does not parse")


@pytest.mark.parametrize("page", [README, GUIDE], ids=lambda p: p.name)
def test_every_flag_the_docs_name_exists(page):
    known = set().union(*commands().values())
    unknown = set(FLAG.findall(page.read_text())) - known - NOT_OURS
    assert not unknown, f"{page.name} names flags that no command has: {sorted(unknown)}"


def raised_texts() -> list[tuple[str, int, str]]:
    """(file, line, text) of every string in a ``raise`` statement of the package."""
    out = []
    for path in sorted((ROOT / "pgps_tune").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        out.append((path.name, node.lineno, sub.value))
    return out


def test_every_flag_an_error_message_suggests_exists():
    known = set().union(*commands().values())
    texts = raised_texts()
    assert any("--epochs" in t for _, _, t in texts)  # the scan sees the messages
    wrong = [f"{f}:{n} {flag}" for f, n, t in texts for flag in FLAG.findall(t) if flag not in known | NOT_OURS]
    assert not wrong, wrong
    named = [(f, n, c) for f, n, t in texts for c in re.findall(r"'pgps-tune ([a-z][a-z-]*[a-z])", t)]
    assert named and all(c in commands() for _, _, c in named), named


@pytest.fixture
def fake_sweep(monkeypatch):
    """tuner.sweep replaced by the check a sweep makes first: the space against Hippocampus's plan."""
    import pgps_tune.tuner as tuner

    seen = {}

    def fake(opts):
        seen["opts"] = opts
        check_space_against_plan(opts.space, (40, 56, 40), (3, 3, 3))
        return {"sweep": opts.out.name, "dataset": "Hippocampus", "trials": 0, "completed": 0, "stopped_early": 0,
                "failed": 0, "best": None}

    monkeypatch.setattr(tuner, "sweep", fake)
    return seen


def test_the_fix_for_a_short_paper_reference_is_a_flag_of_tune(fake_sweep, tmp_path, capsys):
    paper_stages = len(sch.paper_patches((40, 56, 40), (3, 3, 3)))
    base = ["tune", "--space", "smoke", "--data", "synthetic", "--out", str(tmp_path / "s")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"give --epochs >= {paper_stages}" in err
    assert main([*base, "--epochs", str(paper_stages)]) == 0
    assert fake_sweep["opts"].space.budget.epochs == paper_stages


def test_budget_flags_replace_only_the_keys_given(fake_sweep, tmp_path, capsys):
    from pgps_tune.space import load, resolve

    shipped = load(resolve("quick")).budget
    assert main(["tune", "--space", "quick", "--data", "synthetic", "--out", str(tmp_path / "s"),
                 "--iterations-per-epoch", "7", "--filters", "4", "8", "16", "32", "--optimizer", "sgd",
                 "--lr", "0.02", "--final-patch", "40", "56", "40", "--val-every", "1"]) == 0
    b = fake_sweep["opts"].space.budget
    assert (b.iterations_per_epoch, b.filters, b.optimizer, b.lr, b.final_patch, b.val_every) == (
        7, (4, 8, 16, 32), "sgd", 0.02, (40, 56, 40), 1)
    assert (b.epochs, b.batch_size, b.network, b.seed) == (shipped.epochs, shipped.batch_size, shipped.network,
                                                           shipped.seed)
    err = capsys.readouterr().err
    assert "budget from the command line: iterations_per_epoch 7, val_every 1, filters 4 8 16 32," in err


def test_version_and_the_commands_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from pgps_tune import __version__

    assert capsys.readouterr().out.strip() == f"pgps-tune {__version__}"
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = capsys.readouterr().out
    assert "quick" in text and "smoke" in text and "{adamw,sgd}" in text and "--epochs N" in text


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    # the README's notebook example, as written: a tiny synthetic sweep with Ray, the schedule, the store
    block = next(b for b in fenced(README.read_text(), "python") if "SweepOptions" in b)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        import ray

        ray.shutdown()
    out = capsys.readouterr().out
    assert "3 trials; best Dice" in out and "voxel fraction" in out
    best = sch.load(tmp_path / "runs" / "notebook" / "best_schedule.yaml")
    assert f"{best.stage_at(0).patch_size} {round(best.voxel_fraction(), 3)}" in out
