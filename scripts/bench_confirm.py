"""Confirmation benchmark: how far a sweep's winner holds up, and the Dice/compute front.

Reads two finished sweeps (nothing is trained here):

* ``--sweep``: a ``max_dice`` sweep with its confirmation phase (e.g. the shipped
  ``hippocampus_performance`` space), whose summary.json holds the confirmed schedules;
* ``--pareto`` (optional): a ``pareto`` sweep whose references include the paper schedule in
  both modes (e.g. the shipped ``hippocampus_pareto`` space).

It reports the confirmed winner's gain over the constant baseline and over the paper schedule
(mean difference, 95% interval and p-value of the paired t-test over the shared seeds), its
training time against the baseline's, how often the search phase's pick is the confirmed
winner (overall, and for a sweep that had trained each schedule on one seed), and, with
``--pareto``, the front plotted against the two paper modes::

    .venv/bin/pgps-tune tune --space hippocampus_performance --data DATA --out runs/issue10_sweep
    .venv/bin/pgps-tune tune --space hippocampus_pareto --data DATA --out runs/issue10_pareto
    .venv/bin/python scripts/bench_confirm.py --sweep runs/issue10_sweep --pareto runs/issue10_pareto \\
        --report docs/bench_confirm.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pgps_tune.errors import PgpsError, atomic_write, atomic_write_text

TARGET_GAIN, TARGET_TIME = 0.01, 0.9  # issue 10: >= 1 Dice point over constant at <= 0.9x its time


def _read(sweep: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary, trials = sweep / "summary.json", sweep / "trials.parquet"
    for f in (summary, trials):
        if not f.is_file():
            raise PgpsError(f"{f} is missing; give a finished sweep folder (pgps-tune tune ... --out DIR)")
    return json.loads(summary.read_text()), pq.read_table(trials).to_pylist()


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}"


def _interval(p: dict[str, Any]) -> str:
    return (f"{_pct(p['mean_diff'])} points (95% interval {_pct(p['ci_low'])} to {_pct(p['ci_high'])}, "
            f"p = {p['p_value']:.3g}, {p['n']} pairs)")


def _label(name: str, entry: dict[str, Any]) -> str:
    if entry["role"] != "search":
        return entry["role"]
    params = {k: v for k, v in entry["params"].items() if k not in ("mode", "batch_cap")}
    return f"{name} (" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in sorted(params.items())) + ")"


def one_seed_agreement(schedules: dict[str, dict[str, Any]], winner: str, key: str) -> tuple[int, int, int, int]:
    """How often one training per schedule would have picked the confirmed winner.

    Returns (same-seed hits, seeds, any-seed hits, combinations): with every schedule trained on
    the same seed (as one sweep trains them), and with each on any one of its seeds.
    """
    searched = {n: e[key] for n, e in schedules.items() if e["role"] == "search"}
    seeds = sorted(set.intersection(*(set(v) for v in searched.values())))
    same = sum(max(searched, key=lambda n, s=s: searched[n][s]) == winner for s in seeds)
    names = list(searched)
    combos = list(itertools.product(*(sorted(searched[n]) for n in names)))
    anyseed = sum(names[max(range(len(names)), key=lambda i, c=c: searched[names[i]][c[i]])] == winner
                  for c in combos)
    return same, len(seeds), anyseed, len(combos)


def confirmation_lines(summary: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    conf = summary.get("confirmation")
    if not conf:
        raise PgpsError("the sweep has no confirmation; run `pgps-tune confirm SWEEP_DIR` first")
    schedules, winner, kind = conf["schedules"], conf["winner"], conf["repeat"]
    key = "dice_by_" + kind
    base = next((e for e in schedules.values() if e["role"] == "baseline"), None)
    by_id = {r["trial_id"]: r for r in rows}
    search_rows = [r for r in rows if r.get("phase") in ("search", None) and r["completed"] and r["role"] == "search"]
    search_rank = {r["trial_id"]: i + 1 for i, r in enumerate(sorted(search_rows, key=lambda r: -r["score"]))}
    lines = [f"Confirmation: {len(schedules)} schedules × {len(conf['repeats'])} {kind}s "
             f"({', '.join(map(str, conf['repeats']))}) at {conf['epochs']} epochs; "
             f"{len(search_rows)} search trials completed.", "",
             f"| schedule | search rank | search Dice | stages | voxel fraction | confirmed Dice (mean ± sd) | "
             f"per {kind} | time (s) | time vs constant |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(schedules, key=lambda n: -schedules[n]["dice"]["mean"])
    for name in order:
        e = schedules[name]
        row = by_id.get(name)
        rank = search_rank.get(name, "")
        sdice = f"{row['final_dice']:.4f}" if row and e["role"] == "search" else ""
        ratio = e["train_time_s"] / base["train_time_s"] if base else math.nan
        per = ", ".join(f"{v:.4f}" for v in e[key].values())
        mark = " **(winner)**" if name == winner else ""
        lines.append(f"| {_label(name, e)}{mark} | {rank} | {sdice} | {e['n_stages']} | "
                     f"{e['schedule_voxel_fraction']:.3f} | {e['dice']['mean']:.4f} ± {e['dice']['sd']:.4f} | "
                     f"{per} | {e['train_time_s']:.0f} | {ratio:.3f} |")
    facts: dict[str, Any] = {"winner": winner}
    lines.append("")
    if winner is None:
        lines.append("No searched schedule completed its confirmation: there is no confirmed winner.")
        return lines, facts
    w = schedules[winner]
    for role, p in w.get("vs", {}).items():
        lines.append(f"- winner vs {role}: {_interval(p)}")
        facts[role] = p
    if base:
        ratio = w["train_time_s"] / base["train_time_s"]
        facts["time_ratio"] = ratio
        gain = w["vs"]["baseline"]["mean_diff"]
        met = gain >= TARGET_GAIN and ratio <= TARGET_TIME
        lines.append(f"- winner's training time {ratio:.3f}x the constant baseline's (mean over the {kind}s)")
        lines.append(f"- target (>= {100 * TARGET_GAIN:.0f} Dice point over constant at <= {TARGET_TIME}x its time): "
                     + ("met" if met else f"NOT met (gain {_pct(gain)} points at {ratio:.3f}x)"))
    lines.append(f"- sweep verdict: {conf['verdict']}")
    best_search = max(search_rows, key=lambda r: r["score"])["trial_id"] if search_rows else None
    lines.append(f"- the search phase's best trial ({best_search}) "
                 + ("is" if best_search == winner else "is NOT") + " the confirmed winner")
    same, seeds, anyseed, combos = one_seed_agreement(schedules, winner, key)
    lines.append(f"- one training per schedule (the same {kind} for all) picks the confirmed winner in {same} of "
                 f"{seeds} {kind}s; with any one {kind} per schedule, in {anyseed} of {combos} combinations "
                 f"({100 * anyseed / combos:.0f}%)")
    optimism = [row["final_dice"] - schedules[n]["dice"]["mean"] for n, row in by_id.items()
                if n in schedules and schedules[n]["role"] == "search"]
    if optimism:
        lines.append("- search-phase Dice minus confirmed mean Dice of the confirmed searched schedules: "
                     + ", ".join(_pct(x) for x in optimism) + " points (the winner's curse when positive)")
    return lines, facts


def pareto_lines(rows: list[dict[str, Any]], front_file: Path, img: Path | None) -> list[str]:
    done = [r for r in rows if r["completed"] and r.get("phase") != "confirm" and math.isfinite(r["final_dice"])]
    front = pq.read_table(front_file).to_pylist() if front_file.is_file() else []
    base = next((r for r in done if r["role"] == "baseline"), None)
    lines = [f"Pareto sweep: {len(done)} completed trials, {len(front)} on the front (Dice against voxel fraction).",
             "", "| trial | role | voxel fraction | Dice | time vs constant | on front | picked |",
             "|---|---|---|---|---|---|---|"]
    on_front = {r["trial_id"]: r for r in front}
    for r in sorted(done, key=lambda r: r["schedule_voxel_fraction"]):
        f = on_front.get(r["trial_id"])
        ratio = r["train_time_s"] / base["train_time_s"] if base else math.nan
        lines.append(f"| {r['trial_id']} | {r['role']} | {r['schedule_voxel_fraction']:.3f} | {r['final_dice']:.4f} | "
                     f"{ratio:.3f} | {'yes' if f else ''} | {'yes' if f and f['picked'] else ''} |")
    refs = {r["role"]: r for r in done if r["role"] != "search"}
    for role in ("paper:resource", "paper:performance"):
        ref = refs.get(role)
        if ref is None:
            continue
        dominated_by = [f for f in front if f["role"] == "search" and f["final_dice"] >= ref["final_dice"]
                        and f["schedule_voxel_fraction"] <= ref["schedule_voxel_fraction"]]
        lines.append(f"- {role} ({ref['schedule_voxel_fraction']:.3f} voxels, Dice {ref['final_dice']:.4f}): "
                     + (f"dominated by {len(dominated_by)} searched front schedule(s)" if dominated_by
                        else "not dominated by any searched schedule"))
    if img is not None:
        _plot(done, front, img)
        lines += ["", f"![Dice against voxel fraction](img/{img.name})"]
    return lines


def _plot(done: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    searched = [r for r in done if r["role"] == "search"]
    ax.scatter([r["schedule_voxel_fraction"] for r in searched], [r["final_dice"] for r in searched],
               s=18, color="#9aa", label="searched trials")
    pts = sorted((r["schedule_voxel_fraction"], r["final_dice"]) for r in front)
    if pts:
        ax.step(*zip(*pts), where="post", color="#246", label="Pareto front")
    style = {"baseline": ("s", "#c33", "constant"), "paper:resource": ("^", "#393", "paper resource"),
             "paper:performance": ("v", "#93c", "paper performance")}
    for r in done:
        if r["role"] in style:
            m, c, label = style[r["role"]]
            ax.scatter([r["schedule_voxel_fraction"]], [r["final_dice"]], marker=m, s=70, color=c, label=label)
    ax.set_xlabel("voxels processed (fraction of the constant baseline's)")
    ax.set_ylabel("validation Dice")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", required=True, help="a finished max_dice sweep with its confirmation")
    ap.add_argument("--pareto", help="a finished pareto sweep (its references: constant and both paper modes)")
    ap.add_argument("--report", help="write a Markdown report here (the plot beside it, in img/)")
    a = ap.parse_args(argv)
    try:
        summary, rows = _read(Path(a.sweep))
        lines = ["# Confirmation benchmark", "",
                 f"Command: `.venv/bin/python {shlex.join(['scripts/bench_confirm.py', *sys.argv[1:]])}`", "",
                 f"Machine: {platform.machine()}, sweeps `{a.sweep}`" + (f" and `{a.pareto}`" if a.pareto else ""), ""]
        body, _ = confirmation_lines(summary, rows)
        lines += ["## Confirmation of the winner", "", *body]
        if a.pareto:
            _, prow = _read(Path(a.pareto))
            img = Path(a.report).parent / "img" / f"{Path(a.report).stem}_pareto.png" if a.report else None
            lines += ["", "## The Dice/compute front against the paper's two modes", "",
                      *pareto_lines(prow, Path(a.pareto) / "pareto.parquet", img)]
    except PgpsError as e:
        print(f"bench_confirm: error: {e}", file=sys.stderr)
        return 2
    text = "\n".join(lines) + "\n"
    print(text)
    if a.report:
        atomic_write_text(Path(a.report), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
