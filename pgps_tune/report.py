"""Seeing a sweep or a training run: one self-contained HTML page, figures, the trial table.

The page (``pgps-tune report``) opens offline: every figure is a PNG inlined as a data
URI, the only script is inline, and nothing is fetched.  For a sweep it shows the failed
trials grouped by error; the best schedule and the references as patch side and batch size
over training; every trial's learning curve (Dice against baseline-equivalent compute; an
early-stopped trial ends in a cross where ASHA stopped it); Dice against compute for the
completed trials with the Pareto front and the compute of the paper schedule in both modes;
confirmation results when the sweep has them; Optuna's parameter importances; and the trial
table.  Whatever a sweep holds, the page stays readable and small: every name and error is
escaped text, long ones wrap or fold, and a large sweep's table is cut (:data:`TABLE_ROWS`).
For a single ``train`` run it shows the schedule, the learning curve with the stage
changes, and the stage table.

Reads only plain files (sweep.json, trials.parquet, summary.json, schedule files,
metrics.json and Tune's ``result.json`` lines), so it imports neither Ray nor torch;
matplotlib draws the figures.  The text helpers here (:func:`fmt`, :func:`summary_lines`, and
:func:`pgps_tune.schedule.plural`) also serve the command line, so the page and the terminal print numbers alike.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shlex
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from pgps_tune import schedule as sch
from pgps_tune.errors import (
    MAX_JSON_BYTES,
    PgpsError,
    TooLarge,
    atomic_write,
    atomic_write_text,
    loads_json,
    read_file,
    read_json,
)
from pgps_tune.pareto import non_dominated
from pgps_tune.results import (
    BEST,
    COLUMNS,
    FIDELITY,
    PARETO,
    PARETO_DIR,
    PHASES,
    STATUSES,
    SUMMARY,
    SWEEP_FILE,
    TRIALS,
    asha_compared,
    check_trials,
    confirmation_flags,
    confirmation_question,
    describe_confirmation,
    full_fidelity,
    read_parquet,
    reference_order,
    rung_counted,
    schedule_of,
    scored_by_search_target,
    search_check,
    search_target_note,
    shown_test,
    valid_confirm_settings,
)
from pgps_tune.schedule import plural

REPORT = "report.html"
LEARNING_CURVE = "learning_curve.png"
TRIAL_COLUMNS = ("trial_id", "phase", "role", "status", "final_dice", "score", "schedule_voxel_fraction",
                 "train_time_s", "n_stages", "rung_reached", "fidelity", "params", "error")
# a final validation Dice below this means a run has not learned the task (the trivial predictors score
# far below it: all background 0, all foreground twice the foreground share); a gain over such a
# reference is flagged (:func:`summary_lines`)
LEARNED_DICE = 0.5
COLOURS = {"baseline": "#444444", "paper": "#d62728", "search": "#1f77b4", "best": "#2ca02c", "run": "#1f77b4",
           "paper:resource": "#d62728", "paper:performance": "#9467bd", "paper:sqrt": "#8c564b"}
OTHER_REFERENCE = "#e377c2"  # a reference of search.references with no colour of its own (random, random:MODE)


def colour(role: str) -> str:
    """A role's colour in every figure: searched, the best, each reference (``search.references`` may name several)."""
    return COLOURS.get(role, OTHER_REFERENCE)


# -- numbers and words for people ----------------------------------------------------------------


def number(v: Any) -> float:
    """A float from a table cell; None (missing, or a NaN written as JSON null) is NaN."""
    return math.nan if v is None else float(v)


def fmt(v: Any) -> str:
    """A cell for people: 4 significant digits, integers whole, missing numbers empty.

    >>> fmt(0.476978523), fmt(1.0), fmt(12345.678), fmt(float("nan")), fmt(None), fmt(True), fmt(7)
    ('0.477', '1', '1.235e+04', '', '', 'yes', '7')
    """
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def duration(seconds: float | None) -> str:
    """A time span for people, to the unit that matters.

    >>> duration(42.4), duration(125), duration(3 * 3600 + 1260), duration(None)
    ('42s', '2m05s', '3h21m', '?')
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def bar(fraction: float, width: int = 20) -> str:
    """A text progress bar.

    >>> bar(0.5, 10), bar(0, 4), bar(1.2, 4)
    ('[#####.....]', '[....]', '[####]')
    """
    filled = round(width * min(1.0, max(0.0, fraction)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def params_text(params: Any) -> str:
    """A trial's ``params`` JSON as ``key=value`` words (the role is a column of its own).

    >>> params_text('{"growth": 1.587129, "mode": "resource", "role": "search", "stages": 2}')
    'growth=1.587 mode=resource stages=2'
    """
    try:
        return " ".join(f"{k}={fmt(v)}" for k, v in json.loads(params).items() if k != "role")
    except (TypeError, json.JSONDecodeError, AttributeError):
        return fmt(params)


# -- the trial table ---------------------------------------------------------------------------


def phase_of(row: dict[str, Any]) -> str:
    """A trial's phase: the ``phase`` column where the sweep wrote one, else from its role."""
    return row.get("phase") or ("search" if row.get("role", "search") == "search" else "references")


def read_trials(sweep: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's ``trials.parquet`` (plain dicts; pyarrow only, no pandas), read within the bounds
    of :func:`~pgps_tune.results.read_parquet`."""
    sweep = Path(sweep)
    path = sweep / TRIALS
    if path.is_dir():
        raise PgpsError(f"{path} is a folder, not the sweep's trial table; move it away, then rewrite the table "
                        f"with 'pgps-tune export --experiment {sweep} --out {sweep}'")
    if not path.exists():  # a FIFO or a device is named by read_parquet
        if (sweep / "metrics.json").is_file():
            raise PgpsError(f"{sweep} is a 'pgps-tune train' run folder, which has no trial table; give a sweep "
                            "folder (the --out of 'pgps-tune tune'), or see the run with 'pgps-tune report'")
        raise PgpsError(f"{path} does not exist; give a sweep folder (the --out of 'pgps-tune tune'), and if the "
                        "sweep was interrupted, finish it with 'tune --resume' or run 'pgps-tune export'")
    fix = "rewrite it with 'pgps-tune export'"
    try:
        table = read_parquet(path, COLUMNS, str(path), fix)
    except PgpsError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PgpsError(f"{path} is unreadable ({type(exc).__name__}); {fix}") from None
    rows = check_trials(table, path, fix)
    meta = _rung_meta(sweep)
    for r in rows:
        r["phase"] = phase_of(r)
        if not rung_counted(r["phase"], meta):  # a table exported before the rule held rungs no trial met
            r["rung_reached"] = None
    return rows


def _rung_meta(sweep: Path) -> dict[str, Any]:
    """What of the sweep's sweep.json (else summary.json) decides which trials have a rung (:func:`rung_counted`):
    its objective, early_stopping and fidelity; none where neither is readable (a table alone, the phases then
    decide): the trial table is shown without them, as it is stored."""
    for name in (SWEEP_FILE, SUMMARY):
        try:
            data = read_json(sweep / name, "file", "")
        except PgpsError:
            continue
        if isinstance(data, dict):
            return {k: data[k] for k, kind in (("objective", dict), ("early_stopping", bool), ("fidelity", dict))
                    if isinstance(data.get(k), kind)}
    return {}


FILTER_VALUES = {"phase": PHASES, "status": STATUSES}  # the values any sweep may write


def select_trials(rows: list[dict[str, Any]], sort: str | None = None, phase: str | None = None,
                  status: str | None = None, reverse: bool = False) -> list[dict[str, Any]]:
    """Filter by phase and status, then sort by a column: numbers high first, text A-Z, blanks last.

    Without ``sort`` the best score comes first; ``reverse`` turns the order (not the blanks) round.
    """
    if rows and sort is not None and sort not in rows[0]:
        raise PgpsError(f"--sort {sort!r} is not a column of trials.parquet; use one of {', '.join(rows[0])}")
    for key, want in (("phase", phase), ("status", status)):
        if want is not None:  # a value no sweep writes is refused; one this sweep has no trial of selects none
            known = sorted({str(r[key]) for r in rows})
            if want not in known and want not in FILTER_VALUES[key]:
                raise PgpsError(f"--{key} {want!r} matches no trial; this sweep has {', '.join(known) or 'none'} "
                                f"(any sweep: {', '.join(FILTER_VALUES[key])})")
            rows = [r for r in rows if r[key] == want]
    key = sort or "score"
    blank = [r for r in rows if fmt(r[key]) == ""]
    filled = [r for r in rows if fmt(r[key]) != ""]
    numeric = all(isinstance(r[key], int | float) for r in filled)
    filled.sort(key=lambda r: r[key] if numeric else str(r[key]), reverse=numeric != reverse)
    return filled + blank


# -- figures -----------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PgpsError("figures need matplotlib, which is not installed here; install it into this "
                        "environment (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _side(patch: tuple[int, ...]) -> float:
    """One number for a patch: the side of the cube with its voxels."""
    return math.prod(patch) ** (1 / 3)


# drawn in this order, so the best (thick, pale) stays visible under a reference it equals
_STYLES = {"best": {"lw": 6, "alpha": 0.45}, "baseline": {"lw": 1.5, "ls": "--"}, "paper": {"lw": 1.5}}


def schedule_figure(schedules: dict[str, sch.Schedule]) -> bytes:
    """Patch side and batch size over training (fraction of the epochs) for each named schedule."""
    import matplotlib.ticker as mticker

    plt = _pyplot()
    fig, (ax_p, ax_b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name in sorted(schedules, key=lambda n: list(_STYLES).index(n) if n in _STYLES else len(_STYLES)):
        s = schedules[name]
        xs, sides, batches = [], [], []
        for start, st in zip(s.stage_starts(), s.stages):
            for x in (start / s.epochs, (start + st.epochs) / s.epochs):
                xs.append(x)
                sides.append(_side(st.patch_size))
                batches.append(st.batch_size)
        style = {"color": colour(name), **_STYLES.get(name, {"lw": 2})}
        ax_p.plot(xs, sides, label=f"{name} ({plural(len(s.stages), 'stage')})", **style)
        ax_b.plot(xs, batches, label=name, **style)
    ax_p.set(xlabel="fraction of training (epochs)", ylabel="patch side (cube root of voxels)", title="patch size")
    ax_b.set(xlabel="fraction of training (epochs)", ylabel="batch size", title="batch size")
    ax_b.set_yscale("log", base=2)
    ax_b.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_b.yaxis.set_minor_formatter(mticker.NullFormatter())
    # below both plots, where no curve is (a sweep with several references has a long key)
    fig.legend(*ax_p.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, -0.03),
               ncol=min(4, len(schedules)), fontsize=8)
    return _png(fig)


def learning_curve_figure(curves: dict[str, list[tuple[float, float]]], stopped: set[str],
                          roles: dict[str, str], best: str | None, repeats: Collection[str] = (),
                          rungs: Sequence[float] = ()) -> bytes:
    """Validation Dice against compute, one line per trial; an early-stopped trial ends in a cross; the
    confirmation's ``repeats`` are dotted, in their role's colour (they are not more searched trials);
    ASHA's ``rungs`` (in baseline-equivalent iterations) are grey verticals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, x in enumerate(rungs):
        ax.axvline(x, color="#bbbbbb", lw=1, ls="--", zorder=0, label=None if i else "ASHA rungs")
    labelled: set[str] = set()
    # many searched trials would hide each other and the references: the more there are, the fainter each
    faint = min(0.5, max(0.05, 15 / max(1, sum(roles.get(t, "search") == "search" for t in curves))))
    # the searched trials as one collection and their crosses as one marker line (drawn first, under the
    # references): a line artist each made 2,000 trials take seconds to draw
    searched = {tid: pts for tid, pts in curves.items()
                if pts and tid != best and tid not in repeats and roles.get(tid, "search") == "search"}
    if searched:
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(list(searched.values()), colors=colour("search"), alpha=faint, lw=1,
                                         label="searched"))
        ends = [pts[-1] for tid, pts in searched.items() if tid in stopped]
        if ends:
            ax.plot(*zip(*ends), "x", ls="none", color="black", ms=7, alpha=min(1.0, 2 * faint))
    for tid, pts in sorted(curves.items(), key=lambda kv: (_draw_order(roles.get(kv[0], "search"), kv[0] == best))):
        if not pts or tid in searched:
            continue
        xs, ys = zip(*pts)
        role = "best" if tid == best else roles.get(tid, "search")
        label = {"best": f"best ({roles.get(tid, 'search')})", "search": "searched"}.get(role, role)
        style = {"alpha": faint if role == "search" else 0.95, "lw": 1 if role == "search" else 2}
        if tid in repeats:
            label, style = "confirmation repeats (dotted)", {"alpha": 0.8, "lw": 1.5, "ls": ":"}
        ax.plot(xs, ys, color=colour(role), label=None if label in labelled else label, **style)
        labelled.add(label)
        if tid in stopped:
            ax.plot(xs[-1], ys[-1], "x", color="black", ms=7, alpha=min(1.0, 2 * faint))
    if stopped & set(curves):
        ax.plot([], [], "x", color="black", label="stopped early by ASHA")
    ax.autoscale_view()  # a collection's lines count towards the limits only when asked
    ax.set(xlabel="compute (baseline-equivalent iterations)", ylabel="validation Dice (at the final patch)",
           title="learning curves")
    # beside the axes: it hides no curve, and matplotlib need not search many lines for a free corner
    for handle in ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)).legend_handles:
        handle.set_alpha(1)  # the key at full strength, however faint the lines
    return _png(fig)


def asha_rungs(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[float]:
    """The rungs at which ASHA compared a sweep's trials, where the learning curves' axis is its clock: ASHA
    stopped a trial (so it ran: sweep.json records its settings also where it was off), on the
    ``baseline_iterations`` clock, every trial at the full budget (a compressed ladder's rungs are budgets)."""
    from pgps_tune.asha import AshaSettings

    if (not asha_compared(meta) or not any(r["stopped_early"] for r in rows)
            or not all(full_fidelity(r) for r in rows)):
        return []
    try:
        asha = AshaSettings.from_dict(meta["asha"])
    except (KeyError, TypeError, ValueError):  # an older or damaged sweep.json: no rungs to draw
        return []
    return asha.milestones() if asha.time_attr == "baseline_iterations" else []


def _draw_order(role: str, is_best: bool) -> tuple[int, int]:
    """Draw searched trials first and the references and the best on top of them."""
    return int(is_best), int(role != "search")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (compute, Dice) points: no other point is cheaper and at least as good.

    >>> pareto_front([(1.0, 0.8), (0.5, 0.7), (0.6, 0.6), (0.3, 0.5), (0.5, 0.65)])
    [(0.3, 0.5), (0.5, 0.7), (1.0, 0.8)]
    """
    return sorted({points[i] for i in non_dominated([(y, x) for x, y in points])})  # equal points drawn once


def row_schedule(row: dict[str, Any], where: str | Path = TRIALS) -> sch.Schedule:
    """The schedule in a trial's ``schedule`` cell, refused in one line with the fix for the table."""
    return schedule_of(row, str(where), "rewrite the table with 'pgps-tune export'")


def paper_fractions(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Voxel fraction of the paper schedule in both modes, for the plan the sweep trained on."""
    ref = next((r for r in rows if r["role"] in ("paper", "baseline") and r["schedule"]), None)
    if ref is None:
        return {}
    s = row_schedule(ref)
    out = {}
    for mode in sch.MODES:
        try:
            out[mode] = sch.paper(s.final_patch, s.pools, s.baseline_batch_size, s.epochs, mode).voxel_fraction()
        except PgpsError:  # too few epochs for the paper's stage count: nothing to mark
            continue
    return out


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials Dice against compute draws: completed at the full budget with a Dice, searched or references.

    Confirmation repeats are left out (they retrain schedules already drawn, often at another budget, and the
    Confirmation section shows them), as are trials trained at a fraction of the budget: so the front drawn is
    the front that ``pareto.parquet`` and ``summary.json`` name.
    """
    return [r for r in rows if r["completed"] and r.get("phase") != "confirm" and full_fidelity(r)
            and math.isfinite(number(r["final_dice"])) and math.isfinite(number(r["schedule_voxel_fraction"]))]


def dice_vs_compute_figure(rows: list[dict[str, Any]], best: str | None, confirmed: bool = False) -> bytes:
    """Final Dice against the schedule's voxel fraction; Pareto front; the paper modes' compute.  A ``confirmed``
    best is drawn at its search trial's Dice (the summary gives its mean over the confirmation's repeats)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    done = comparable(rows)
    point = {r["trial_id"]: (number(r["schedule_voxel_fraction"]), number(r["final_dice"])) for r in done}
    references = [r for r in dict.fromkeys(r["role"] for r in done) if r not in ("search", "baseline")]
    markers = {"search": "o", "baseline": "s", **{ref: "D^vPX"[i % 5] for i, ref in enumerate(references)}}
    for role in markers:
        pts = [point[r["trial_id"]] for r in done if r["role"] == role]
        label = {"search": "searched", "baseline": "constant baseline", "paper": "paper reference"}.get(
            role, f"{role} reference")
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, marker=markers[role], color=colour(role), label=label, zorder=3)
    front = pareto_front(list(point.values()))
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color=COLOURS["best"], label="Pareto front", zorder=2)
    if best in point:
        ax.scatter(*point[best], marker="*", s=260, facecolor="none", edgecolor="black", zorder=4,
                   label="best (its search trial)" if confirmed else "best")
    for (mode, x), ls in zip(paper_fractions(rows).items(), (":", "-.")):
        ax.axvline(x, color=colour(f"paper:{mode}"), ls=ls, lw=1, label=f"paper, {mode} mode: {x:.2f} of the compute")
    ax.set(xlabel="compute (voxel fraction of the constant baseline)", ylabel="final validation Dice",
           title="Dice against compute (completed trials of the search and references)")
    if ax.get_legend_handles_labels()[0]:  # nothing completed: an empty plot, without a warning
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def importance_figure(importances: dict[str, float], trials: int = 0) -> bytes:
    """The importances as bars; ``trials``: the trials they could come from, named in the title where more
    than :data:`IMPORTANCE_TRIALS` (the importances then come from a sample of them)."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.4 * len(names)))
    ax.barh(names, [importances[n] for n in names], color=COLOURS["search"])
    sample = f"\n(from {IMPORTANCE_TRIALS} of {trials:,} trials, drawn at random)" if trials > IMPORTANCE_TRIALS else ""
    ax.set(xlabel="importance (Optuna's fANOVA; sums to 1)", title=f"parameter importances{sample}")
    return _png(fig)


# fANOVA's forest takes about 7 ms a trial: a random sample of this many keeps a page of thousands of trials to seconds
IMPORTANCE_TRIALS = 500


def importance_trials(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """(params, score) of the trials importances are estimated from: the search phase's own completed
    full-budget trials (confirmation repeats and low-fidelity rungs would make their seeds, folds and budgets
    look like parameters)."""
    return [(json.loads(r["params"]), number(r["score"])) for r in rows
            if r["role"] == "search" and r.get("phase") in (None, "search") and not number(r.get("fidelity")) < 1
            and r["completed"] and not math.isnan(number(r["score"]))]


def param_importances(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Optuna's fANOVA importances over the completed searched trials (:func:`importance_trials`; a random
    :data:`IMPORTANCE_TRIALS` of them where there are more), None: too few to say.

    A parameter every trial shares at one value says nothing and is left out; the study
    is rebuilt in memory from the trial table, so no Optuna storage is needed.
    """
    import random

    import optuna

    done = importance_trials(rows)
    if len(done) > IMPORTANCE_TRIALS:  # the same sample on every run of the report, whatever the table's order
        done = random.Random(0).sample(sorted(done, key=lambda d: (json.dumps(d[0], sort_keys=True), d[1])),
                                       IMPORTANCE_TRIALS)
    values: dict[str, list[Any]] = {}
    for params, _ in done:
        for k, v in params.items():
            values.setdefault(k, []).append(v)
    dists: dict[str, Any] = {}
    for k, vs in values.items():
        if k in ("role", "preset") or len({json.dumps(v) for v in vs}) < 2:
            continue
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vs):
            lo, hi = min(vs), max(vs)
            dists[k] = (optuna.distributions.IntDistribution(lo, hi) if all(isinstance(v, int) for v in vs)
                        else optuna.distributions.FloatDistribution(float(lo), float(hi)))
        else:
            dists[k] = optuna.distributions.CategoricalDistribution(sorted({str(v) for v in vs}))
    trials = []
    for params, score in done:
        kept = {k: (str(v) if isinstance(dists[k], optuna.distributions.CategoricalDistribution) else v)
                for k, v in params.items() if k in dists}
        trials.append(optuna.trial.create_trial(params=kept, distributions={k: dists[k] for k in kept}, value=score))
    if len(trials) < 3 or not dists:
        return None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):  # e.g. no parameter present in every trial
        return None


def run_curve_figure(metrics: dict[str, Any]) -> bytes:
    """A run's validation Dice and training loss against compute, stage changes as dotted lines."""
    plt = _pyplot()
    history = [h for h in metrics.get("history", []) if h.get("val_dice") is not None]
    s = sch.Schedule.from_dict(metrics["schedule"]) if isinstance(metrics.get("schedule"), dict) else None
    fig, (ax_d, ax_l) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = [h["baseline_equivalent_iterations"] for h in history]
    ax_d.plot(xs, [h["val_dice"] for h in history], "o-", color=COLOURS["best"], ms=3)
    ax_l.plot(xs, [h["train_loss"] for h in history], "o-", color=COLOURS["search"], ms=3)
    if s is not None:  # a stage ends where its voxels are spent, in baseline iterations
        per_iteration = s.baseline_batch_size * math.prod(s.final_patch)
        done = 0.0
        for st in metrics.get("stages", [])[:-1]:
            done += st["voxels"] / per_iteration
            for ax in (ax_d, ax_l):
                ax.axvline(done, color="#999999", ls=":", lw=1)
    ax_d.set(xlabel="compute (baseline-equivalent iterations)", ylabel="validation Dice (at the final patch)",
             title="validation Dice (dotted: stage changes)")
    ax_l.set(xlabel="compute (baseline-equivalent iterations)", ylabel="training loss (Dice + CE)",
             title="training loss")
    return _png(fig)


def write_run_curve(run: str | Path) -> Path:
    """Write ``learning_curve.png`` into a run folder from its metrics.json; returns the file."""
    run = Path(run)
    png = run_curve_figure(_read_metrics(run))
    return atomic_write(run / LEARNING_CURVE, lambda fh: fh.write(png))


# -- reading a sweep ---------------------------------------------------------------------------


def _tune_root(sweep: Path, meta: dict[str, Any]) -> Path | None:
    """Where the sweep's Tune experiments are on this machine: a copied or moved sweep folder reads its own
    (:func:`results.tune_storage`), never those of the folder it came from."""
    from pgps_tune.results import tune_storage

    try:
        local = tune_storage(sweep, meta)[0]
    except (KeyError, TypeError, ValueError):  # a sweep.json without a usable storage path: its own ray/ only
        local = str(sweep / "ray")
    for root in (Path(local), sweep / "ray"):
        if root.is_dir() and any((root / e).is_dir() for e in meta.get("experiments", {}).values()):
            return root
    return None


def read_curves(sweep: Path, meta: dict[str, Any], unreadable: list[Path] | None = None
                ) -> dict[str, list[tuple[float, float]]]:
    """``{trial_id: [(baseline_iterations, val_dice), ...]}`` from Tune's result.json lines.

    A line that is not a result (cut by a kill, damaged) is skipped; a result.json that cannot be read
    (a folder, a FIFO in its place, no permission, more than any result file holds) is added to ``unreadable``,
    for the page to name.
    """
    root = _tune_root(sweep, meta)
    curves: dict[str, set[tuple[float, float]]] = {}
    if root is None:
        return {}
    for exp in meta.get("experiments", {}).values():
        for f in sorted((root / exp).glob("*/result.json")):
            try:
                text = read_file(f, MAX_JSON_BYTES).decode("utf-8", errors="replace")
            except (OSError, TooLarge):
                if unreadable is not None:
                    unreadable.append(f)
                continue
            for line in text.splitlines():
                try:
                    r = loads_json(line)
                except ValueError:
                    continue  # a line cut by a kill
                if not isinstance(r, dict):
                    continue  # not a result: a damaged line
                x, y = r.get("baseline_iterations"), r.get("val_dice")
                if isinstance(x, int | float) and isinstance(y, int | float) and "trial_id" in r:
                    curves.setdefault(str(r["trial_id"]), set()).add((float(x), float(y)))
    return {tid: sorted(pts) for tid, pts in curves.items()}


def _read_metrics(run: Path) -> dict[str, Any]:
    """A run's metrics.json, refused in one line unless it holds what the page and the figure read."""
    path = run / "metrics.json"
    m = _read_json(path, "give a run folder written by 'pgps-tune train'")
    bad = _metrics_problems(m)
    if bad:
        raise PgpsError(f"{path} has missing or malformed fields ({', '.join(bad)}); it was damaged or edited: "
                        "restore it, or train the run again into a new --out")
    return m


def _read_json(path: Path, what: str) -> Any:
    data = read_json(path, "file", what)
    if not isinstance(data, dict):
        raise PgpsError(f"{path} is not a JSON object; {what}")
    return data


def _is_num(v: Any, nullable: bool = True) -> bool:
    """A JSON number (``null`` too where ``nullable``: NaN is written as null)."""
    return (v is None and nullable) or (isinstance(v, int | float) and not isinstance(v, bool))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _summary_problems(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What in a summary.json is not what :func:`pgps_tune.results.summarize` writes for these trials."""
    from pgps_tune.results import pick_best

    bad = []
    counts = {"trials": len(rows), **{k: sum(bool(r[k]) for r in rows) for k in ("completed", "stopped_early",
                                                                                 "failed")}}
    for key, want in counts.items():
        if not _is_count(summary.get(key)):
            bad.append(f"{key} is {summary.get(key)!r}, not a count")
        elif summary[key] != want:
            bad.append(f"{key} is {summary[key]} where trials.parquet has {want}")
    best = summary.get("best", "missing")
    if best is None or best == "missing":
        if pick_best(rows) is not None or best == "missing":
            bad.append("best is missing though trials.parquet has a completed trial" if best is None
                       else "best is missing")
    elif not (isinstance(best, dict) and isinstance(best.get("trial_id"), str)
              and best["trial_id"] in {r["trial_id"] for r in rows} and isinstance(best.get("role"), str)
              and _is_num(best.get("final_dice"), nullable=False) and math.isfinite(best["final_dice"])
              and _is_count(best.get("n_stages")) and _is_num(best.get("schedule_voxel_fraction"))):
        bad.append("best is not a trial of trials.parquet with its Dice, stages and voxel fraction")
    for role in gain_roles(summary):
        g = summary[f"gain_over_{role}"]
        if g is not None and not (isinstance(g, dict) and _is_num(g.get("dice_points"), nullable=False)
                                  and all(_is_num(g.get(k)) for k in ("time_ratio", "voxel_ratio", f"{role}_dice"))):
            bad.append(f"gain_over_{role} is not the gain pgps-tune writes")
    conf = summary.get("confirmation")
    if conf is not None and not _confirmation_ok(conf):
        bad.append("confirmation is not the confirmation pgps-tune writes")
    return bad


def _confirmation_ok(conf: Any) -> bool:
    def test_ok(t: Any) -> bool:
        return isinstance(t, dict) and all(_is_num(t.get(k)) for k in ("mean_diff", "ci_low", "ci_high", "p_value"))

    def entry_ok(e: Any) -> bool:
        return (isinstance(e, dict) and isinstance(e.get("role"), str) and _is_count(e.get("completed"))
                and _is_count(e.get("trials")) and isinstance(e.get("dice"), dict)
                and _is_num(e["dice"].get("mean")) and _is_num(e["dice"].get("sd"))
                and _is_num(e.get("schedule_voxel_fraction")) and isinstance(e.get("vs", {}), dict)
                and all(test_ok(t) for t in e.get("vs", {}).values())
                and ("within_tolerance" not in e or test_ok(e["within_tolerance"])
                     and _is_num(e["within_tolerance"].get("margin"), nullable=False)))

    return (isinstance(conf, dict) and conf.get("repeat") in ("seed", "fold") and isinstance(conf.get("repeats"), list)
            and _is_count(conf.get("epochs")) and isinstance(conf.get("verdict", ""), str)
            and isinstance(conf.get("schedules"), dict) and all(entry_ok(e) for e in conf["schedules"].values())
            and (conf.get("winner") is None or conf["winner"] in conf["schedules"])
            and isinstance(conf.get("replaced", []), list)
            and all(map(valid_confirm_settings, conf.get("replaced", []))))


def _metrics_problems(m: dict[str, Any]) -> list[str]:
    """What in a run's metrics.json is not what ``pgps-tune train`` writes (the fields the page reads)."""
    bad = [k for k in ("val_dice", "best_val_dice", "train_time_s", "voxel_fraction") if not _is_num(m.get(k))]
    bad += [k for k in ("iterations", "total_iterations") if not _is_count(m.get(k))]
    if not isinstance(m.get("schedule"), dict):
        bad.append("schedule")
    history = m.get("history", [])
    if not (isinstance(history, list) and all(
            isinstance(h, dict) and _is_num(h.get("val_dice")) and (h.get("val_dice") is None or (
                _is_num(h.get("baseline_equivalent_iterations"), nullable=False) and _is_num(h.get("train_loss"))))
            for h in history)):
        bad.append("history")
    stages = m.get("stages", [])
    if not (isinstance(stages, list) and all(isinstance(st, dict) and _is_num(st.get("voxels"), nullable=False)
                                             for st in stages)):
        bad.append("stages")
    return bad


# -- the page ------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
h1,h2,p{overflow-wrap:anywhere}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.p{text-align:left;font-family:monospace;font-size:.9em}
td.e{text-align:left;max-width:32em;overflow-wrap:anywhere}td.e:not(:empty){min-width:16em}
td.e details pre{white-space:pre-wrap;margin:0}
img{max-width:100%}.note{color:#666}div.t{overflow-x:auto}
@media print{body{margin:0;max-width:none}div.t{overflow:visible}table{font-size:.7em}
h2{break-after:avoid}img,tr{break-inside:avoid}}
"""
# marks the page once every figure has decoded: a headless browser check reads it from the DOM
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-figures-loaded', ok + '/' + imgs.length);
});
"""
_LEFT = ("trial_id", "phase", "role", "status", "error")
ERROR_SHOWN = 160  # characters of an error shown in its cell; the rest (up to ERROR_KEPT) opens below it
ERROR_KEPT = 4000


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _error_cell(v: Any) -> str:
    """An error in a cell of bounded width: its first line, cut; a longer or many-line error opens below."""
    text = str(v or "").strip()
    first = (text.splitlines() or [""])[0]
    if len(first) <= ERROR_SHOWN and first == text:
        return f'<td class="e">{html.escape(text)}</td>'
    cut = text[:ERROR_KEPT] + (f" ... ({len(text) - ERROR_KEPT} more characters)" if len(text) > ERROR_KEPT else "")
    return (f'<td class="e"><details><summary>{html.escape(first[:ERROR_SHOWN])}'
            f'{" ..." if len(first) > ERROR_SHOWN else ""}</summary><pre>{html.escape(cut)}</pre></details></td>')


def _cell(column: str, v: Any, left: bool, spec: str | None = None) -> str:
    if column == "params":
        return f'<td class="p">{html.escape(params_text(v))}</td>'
    if column == "error":
        return _error_cell(v)
    if isinstance(v, dict | list):
        v = json.dumps(v)
    text = format(v, spec) if spec and isinstance(v, float) and math.isfinite(v) else fmt(v)
    return f'<td class="{"l" if left or isinstance(v, str) else ""}">{html.escape(text)}</td>'


def _head(column: str) -> str:
    """A column name that may wrap after its underscores (schedule_voxel_fraction is wider than its numbers)."""
    return "_<wbr>".join(map(html.escape, column.split("_")))


def _table(rows: list[dict[str, Any]], columns: list[str], specs: dict[str, str] | None = None) -> str:
    """A table (text columns left, numbers right); ``specs``: a column's number format where the terminal prints
    it so (else :func:`fmt`)."""
    left = {c: c in _LEFT or c == "params" or any(isinstance(r.get(c), str | list | dict) for r in rows)
            for c in columns}
    specs = specs or {}
    head = "".join(f'<th class="{"l" if left[c] else ""}">{_head(c)}</th>' for c in columns)
    body = "".join("<tr>" + "".join(_cell(c, r.get(c), left[c], specs.get(c)) for c in columns) + "</tr>"
                   for r in rows)
    return f'<div class="t"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _points(t: dict[str, Any] | None) -> str:
    """A paired difference in Dice points with its 95% interval and p-value ('' without one; '-' for an
    interval and p-value that one pair cannot give), as the terminal's table shows them."""
    if not t or not math.isfinite(number(t["mean_diff"])):  # no pair: nothing to show
        return ""
    low, high, p = (number(t[k]) for k in ("ci_low", "ci_high", "p_value"))
    return (f"{100 * number(t['mean_diff']):+.2f} [{f'{100 * low:+.2f}' if math.isfinite(low) else '-'}, "
            f"{f'{100 * high:+.2f}' if math.isfinite(high) else '-'}], p = {f'{p:.3g}' if math.isfinite(p) else '-'}")


def confirmation_figure(conf: dict[str, Any]) -> bytes:
    """Each searched schedule's paired Dice difference to each reference, with its 95% interval and the p-value of
    the test the verdict uses (:func:`pgps_tune.results.shown_test`): against the baseline of a
    ``cheapest_within`` sweep, whether it is within the tolerance (the interval's bound, minus the tolerance, is
    drawn beside it), else whether it is better (the bound 0)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * max(1, len(conf["schedules"]))))
    labels, y, bound = [], 0, False
    for name, e in conf["schedules"].items():
        for role in e.get("vs", {}):
            t = shown_test(e, role) or {}
            mean, low, high = (100 * number(t[k]) for k in ("mean_diff", "ci_low", "ci_high"))
            if mean == mean:  # NaN: too few pairs to draw
                err = [[mean - low if low == low else 0.0], [high - mean if high == high else 0.0]]
                ax.errorbar([mean], [y], xerr=err, fmt="o", capsize=4,
                            color=colour(role))
            p, question = number(t["p_value"]), "better?"
            if "margin" in t:  # within the tolerance: the whole interval above -tolerance
                margin = 100 * number(t["margin"])
                ax.vlines(-margin, y - 0.4, y + 0.4, colors="black", linestyles="--", lw=1.2,
                          label=None if bound else f"-{margin:.2f}: cheapest_within's tolerance below the baseline")
                bound, question = True, f"within {margin:.2f}?"
            labels.append(f"{name} - {role}: {question} p = {f'{p:.3g}' if math.isfinite(p) else '-'}")
            y += 1
    ax.axvline(0.0, color="grey", lw=1)
    if bound:
        ax.legend(loc="best", fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set(xlabel=f"Dice difference, points (mean and 95% interval over {conf['repeat']}s)",
           title="confirmation: searched schedules against the references")
    return _png(fig)


def confirmation_section(conf: dict[str, Any], check: str | None = None,
                         objective: dict[str, Any] | None = None) -> str:
    """The confirmation's verdict in words, whether the search picked its winner (``check``:
    :func:`pgps_tune.results.search_check`), its table (mean ± sd, paired differences: the tests the verdict of
    the sweep's ``objective`` uses, and the question each answers) and its figure."""
    rows = []
    references = reference_order(e["role"] for e in conf["schedules"].values())
    for name, e in conf["schedules"].items():
        rows.append({
            "schedule": name + (" (confirmed winner)" if name == conf.get("winner") else ""), "role": e["role"],
            f"{conf['repeat']}s done": f"{e['completed']}/{e['trials']}",
            "Dice mean": number(e["dice"]["mean"]), "Dice sd": number(e["dice"]["sd"]),
            **{f"vs {role}, points [95% interval], p": _points(shown_test(e, role)) for role in references},
            "voxel fraction": number(e["schedule_voxel_fraction"]),
        })
    verdict = conf.get("verdict", "")
    if not conf["schedules"]:  # nothing was confirmed: no table of nothing
        return f"<p>{html.escape(verdict)}.</p>"
    if check:
        verdict += f"; {check}"
    head = (f"<p>{html.escape(verdict)}.</p><p>{plural(len(conf['repeats']), conf['repeat'])} per schedule, "
            f"{plural(int(conf['epochs']), 'epoch')} each; differences are paired by {conf['repeat']}"
            + (f"; cheapest_within scores each {conf['repeat']} against the baseline's Dice on that {conf['repeat']} "
               f"less {conf['tolerance']:g}" if "tolerance" in conf else "") + ".</p>")
    has_tests = any(e.get("vs") for e in conf["schedules"].values())
    question = confirmation_question(conf, objective)  # what each p answers, as the terminal says it
    # mean and sd as 'pgps-tune tune' and 'confirm' print them
    return head + _table(rows, list(rows[0]) if rows else [], {"Dice mean": ".4f", "Dice sd": ".4f"}) + (
        _note(f"p-values: {question}.") if question else "") + (
        _img(confirmation_figure(conf), "confirmation") if has_tests else "")


def _page(what: str, name: Any, dataset: Any, sections: list[tuple[str, str]]) -> str:
    """The whole page of a sweep or run (``what``) ``name`` on ``dataset``: the names are the user's, set apart
    (``<bdi>``) so that right-to-left text in one cannot turn the rest of the heading round."""
    title = f"pgps-tune: {what} '{name}' on {dataset}"
    heading = f"pgps-tune: {what} '<bdi>{html.escape(str(name))}</bdi>' on <bdi>{html.escape(str(dataset))}</bdi>"
    parts = [f"<h1>{heading}</h1>"] + [f"<h2>{html.escape(h)}</h2>\n{b}" for h, b in sections]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def time_words(ratio: float) -> str:
    """A training-time ratio against a reference in plain words: the ratio, then faster or slower.

    >>> time_words(0.72), time_words(1.38), time_words(1.003)
    ('0.72x its training time (28% faster)', '1.38x its training time (38% slower)', 'the same training time')
    """
    change = round(100 * (1 - ratio))
    if change == 0:
        return "the same training time"
    return f"{ratio:.2f}x its training time ({abs(change)}% {'faster' if change > 0 else 'slower'})"


def summary_lines(summary: dict[str, Any], sweep: str | Path | None = None) -> list[str]:
    """A sweep's outcome for people (terminal and page alike): counts, the best trial, its gains, and
    which earlier confirmation a later one replaced (with the command for ``sweep``, its folder, that
    brings it back).

    Honest by construction: a reference below :data:`LEARNED_DICE` is flagged as not having
    learned, since a gain over it says how fast schedules learn, not where they end; Dice is
    compared in points (no relative percentages, which an undertrained reference inflates);
    time ratios say faster or slower.
    """
    return _outcome_lines(summary) + replaced_lines(summary.get("confirmation") or {}, sweep)


def replaced_lines(conf: dict[str, Any], sweep: str | Path | None = None) -> list[str]:
    """One sentence naming the confirmations that 'pgps-tune confirm' at another budget or repeat kind
    replaced (``confirmation.replaced``), and how to bring one back; none when nothing was replaced.

    >>> replaced_lines({"replaced": [{"top_k": 1, "epochs": 10, "seeds": 3, "folds": None, "splits": None}]}, "out")
    ["The confirmation shown replaced an earlier one (top 1, 3 seeds, 10 epochs), whose trials stay in \
trials.parquet: 'pgps-tune confirm out --top-k 1 --seeds 3 --epochs 10' brings it back without training."]
    """
    replaced = conf.get("replaced") or []
    if not replaced:
        return []
    which = "; ".join(map(describe_confirmation, replaced))
    earlier = f"an earlier one ({which}), whose trials stay" if len(replaced) == 1 else \
        f"{len(replaced)} earlier ones ({which}), whose trials stay"
    how = "confirming with its settings again" if sweep is None else " or ".join(
        f"'pgps-tune confirm {shlex.quote(str(sweep))} {confirmation_flags(r)}'" for r in replaced)
    it = "it" if len(replaced) == 1 else "one"
    return [f"The confirmation shown replaced {earlier} in trials.parquet: {how} brings {it} back without training."]


def _outcome_lines(summary: dict[str, Any]) -> list[str]:
    n = int(summary.get("trials", 0))
    lines = [f"{plural(n, 'trial')}: {summary.get('completed', 0)} completed, {summary.get('stopped_early', 0)} "
             f"stopped early, {summary.get('failed', 0)} failed."]
    best = summary.get("best")
    if not best:
        if not summary.get("completed"):
            return [*lines, "No trial completed, so there is no best schedule."]
        return [*lines, "No completed trial has a score at the full budget, so there is no best schedule."]
    dice = number(best["final_dice"])
    # a confirmed winner's numbers are means over the confirmation's repeats, not its search trial's (the table's)
    means = shown = ""
    if best.get("confirmed") and isinstance(best.get("repeats"), int):
        over = plural(best["repeats"], (summary.get("confirmation") or {}).get("repeat", "repeat"))
        means = f" (means over {over})"
        sd = number(best.get("dice_sd"))
        shown = f" (mean over {over}" + (f", sd {sd:.3f})" if math.isfinite(sd) else ")")
    lines.append(f"Best: trial {best['trial_id']} ({best['role']}), validation Dice {dice:.3f}{shown}, "
                 f"{plural(int(best['n_stages']), 'stage')}, "
                 f"{number(best['schedule_voxel_fraction']):.2f}x the constant baseline's voxels.")
    for role in gain_roles(summary):
        g = summary[f"gain_over_{role}"]
        if best["role"] == role:
            lines.append(f"The best schedule is the {role} reference itself.")
            continue
        if not g:
            continue
        ref = number(g.get(f"{role}_dice"))
        parts = [f"Dice {dice:.3f} vs {ref:.3f} ({number(g['dice_points']):+.1f} points)"]
        if g.get("time_ratio"):
            parts.append(time_words(number(g["time_ratio"])))
        if g.get("voxel_ratio"):
            parts.append(f"{number(g['voxel_ratio']):.2f}x its voxels")
        line = f"Against the {role} reference{means}: {', '.join(parts)}."
        if not ref >= LEARNED_DICE:
            line += (f" Caution: the {role} reached only Dice {ref:.3f} (below {LEARNED_DICE}), so it has not "
                     "learned at this budget: the gain shows how fast schedules learn, not where they end; give "
                     "more --epochs for a quality comparison.")
        lines.append(line)
    if not dice >= LEARNED_DICE:
        lines.append(f"Caution: even the best trial reached only Dice {dice:.3f} (below {LEARNED_DICE}); "
                     "no schedule has learned the task at this budget: give more --epochs.")
    return lines


def gain_roles(summary: dict[str, Any]) -> list[str]:
    """The references a summary compares the best with (its ``gain_over_ROLE`` keys), in its order."""
    return [k.removeprefix("gain_over_") for k in summary if k.startswith("gain_over_")]


def sweep_report(sweep: str | Path) -> str:
    """The HTML page of a sweep folder (finished, or exported with 'pgps-tune export')."""
    sweep = Path(sweep)
    meta = _read_json(sweep / "sweep.json", "give the --out folder of a 'pgps-tune tune' run")
    summary = _read_json(sweep / "summary.json", "finish the sweep ('tune --resume') or run 'pgps-tune export'")
    rows = read_trials(sweep)
    bad = _summary_problems(summary, rows)
    if bad:
        raise PgpsError(f"{sweep / 'summary.json'} does not match the sweep ({'; '.join(bad)}); it was damaged, "
                        f"edited or left by another export: rewrite it with 'pgps-tune export --experiment {sweep} "
                        f"--out {sweep}'")
    best = (summary.get("best") or {}).get("trial_id")
    lines = summary_lines(summary, sweep)
    if isinstance(front := summary.get("pareto"), dict):  # as the terminal says it after the sweep
        ids = [str(t) for t in front.get("front") or []]
        lines.append(f"Pareto front: {plural(len(ids), 'schedule')} ({', '.join(ids)}; cheapest first) in "
                     f"{PARETO} and {PARETO_DIR}/; best by the rule {front.get('pick')}.")
    sections: list[tuple[str, str]] = [("Summary", "<p>" + "<br>".join(map(html.escape, lines)) + "</p>")]
    if any(r["failed"] for r in rows):
        sections.append(("Failed trials", failures_section(rows, sweep)))

    schedules: dict[str, sch.Schedule] = {}
    for r in rows:  # every reference: the baseline, the paper schedule, and any other search.references names
        if r["role"] != "search" and r["schedule"] and r["phase"] == "references":
            schedules[r["role"]] = row_schedule(r, sweep / TRIALS)
    damaged = ""
    if (sweep / "best_schedule.yaml").exists():
        try:
            schedules["best"] = sch.load(sweep / "best_schedule.yaml")
        except PgpsError as exc:  # the page still shows the rest, and says what to do
            damaged = (f"the best schedule is not drawn: {exc}; rewrite it with 'pgps-tune export --experiment "
                       f"{sweep} --out {sweep}'")
            print(f"pgps-tune: note: {damaged}", file=sys.stderr)
    sections.append(("Schedules", (_img(schedule_figure(schedules), "schedules") if schedules
                                   else _note("no trial recorded a schedule")) + (_note(damaged) if damaged else "")))

    unreadable: list[Path] = []
    curves = read_curves(sweep, meta, unreadable)
    if curves:
        roles = {r["trial_id"]: r["role"] for r in rows}
        stopped = {r["trial_id"] for r in rows if r["stopped_early"]}
        repeats = {r["trial_id"] for r in rows if r["phase"] == "confirm"}
        rungs = asha_rungs(meta, rows)
        body = _img(learning_curve_figure(curves, stopped, roles, best, repeats, rungs), "learning curves")
        if rungs:
            body += _note(f"ASHA compared the searched trials at {plural(len(rungs), 'rung')} of compute: "
                          f"{', '.join(f'{x:g}' for x in rungs)} baseline-equivalent iterations; a trial's "
                          "rung_reached (in the table) is the highest one it passed, counted from 0 (-1: none; "
                          "empty: a trial no rung compared, as the references)")
    elif (root := _tune_root(sweep, meta)) is None:
        body = _note("no Tune results on this machine to read the curves from (remote --storage, or the ray/ "
                     "folder is gone)")
    elif not any(next((root / e).glob("*/result.json"), None) for e in meta.get("experiments", {}).values()):
        body = _note(f"no Tune results on this machine to read the curves from (no trial's result.json under "
                     f"{root}: the trial folders are gone)")
    else:
        body = _note("no trial reported a validation Dice")
    if unreadable:
        body += _note(f"not drawn: {plural(len(unreadable), 'trial')} whose result.json cannot be read "
                      f"({', '.join(map(str, unreadable[:3]))}{', ...' if len(unreadable) > 3 else ''})")
    sections.append(("Learning curves", body))
    confirmed = bool((summary.get("best") or {}).get("confirmed"))
    sections.append(("Dice against compute", _img(dice_vs_compute_figure(rows, best, confirmed), "Dice against compute")
                     if comparable(rows)
                     else _note("no searched or reference trial completed with a Dice: nothing to plot")))

    confirmation = summary.get("confirmation")
    sections.append(("Confirmation", confirmation_section(confirmation, search_check(summary),
                                                          summary.get("objective")) + (
        _note(search_target_note(meta.get("sweep", sweep.name), str(sweep)))
        if confirmation["schedules"] and scored_by_search_target(confirmation, summary.get("objective")) else "")
        if confirmation else _note("this sweep has no confirmation results")))

    importances = param_importances(rows)
    sections.append(("Parameter importances", _img(importance_figure(importances, len(importance_trials(rows))),
                                                    "parameter importances")
                     if importances else _note("too few completed searched trials that differ in their "
                                               "parameters to estimate importances (3 needed)")))
    sections.append(("Trials", trial_table(rows, sweep)))
    return _page("sweep", meta.get("sweep", sweep.name), meta.get("dataset", "?"), sections)


TABLE_ROWS = 300  # searched trials the page's table shows at most: the page stays small for any sweep


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The :data:`TRIAL_COLUMNS` a table of ``rows`` shows: ``rung_reached`` only where ASHA compared some trial
    (a pareto sweep, or one without ASHA, has no rungs), ``fidelity`` only where some trial trained below the
    full budget (a compressed ladder: its low rungs' Dice are not comparable with the full budget's)."""
    return [c for c in TRIAL_COLUMNS if rows and c in rows[0]
            and (c != "rung_reached" or any(r[c] is not None for r in rows))
            and (c != FIDELITY or not all(full_fidelity(r) for r in rows))]


def trial_table(rows: list[dict[str, Any]], sweep: Path) -> str:
    """The trial table, best score first: every trial, or for a large sweep the references, the confirmation
    trials and the :data:`TABLE_ROWS` best-scored searched trials, with a note naming the command for all."""
    columns = table_columns(rows)
    ordered = select_trials(rows)
    searched = [r for r in ordered if r["phase"] == "search"]
    if len(searched) <= TABLE_ROWS:
        return _table(ordered, columns)
    cut = {r["trial_id"] for r in searched[TABLE_ROWS:]}
    shown = [r for r in ordered if r["trial_id"] not in cut]
    others = "the references and confirmation trials" if any(r["phase"] == "confirm" for r in rows) \
        else "the references"
    return _note(f"{len(shown)} of {plural(len(rows), 'trial')} shown: {others} and the {TABLE_ROWS} best-scored "
                 f"of {len(searched)} searched trials; every trial: 'pgps-tune trials {shlex.quote(str(sweep))} "
                 "--limit 0' (--sort, --status, --format csv)") + _table(shown, columns)


def error_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The failed trials grouped by the first line of their error, the most frequent first:
    ``[(first line, [trial ids]), ...]`` (``""``: no error recorded)."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["failed"]:
            text = str(r.get("error") or "").strip()
            groups.setdefault((text.splitlines() or [""])[0][:300], []).append(str(r["trial_id"]))
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


ERROR_GROUPS = 10  # distinct errors the page lists; the rest are counted


def failures_section(rows: list[dict[str, Any]], sweep: Path) -> str:
    """Why trials failed: each distinct error (its first line) with how many trials and which, most frequent
    first, so a failure is seen however long the sweep and wherever the table cuts."""
    groups = error_groups(rows)
    table = [{"error": error or "(no error recorded)", "trials": len(ids),
              "trial_id": ", ".join(ids[:5]) + (f", ... ({len(ids) - 5} more)" if len(ids) > 5 else "")}
             for error, ids in groups[:ERROR_GROUPS]]
    rest = sum(len(ids) for _, ids in groups[ERROR_GROUPS:])
    n = sum(len(ids) for _, ids in groups)
    return (_table(table, ["trials", "error", "trial_id"])
            + (_note(f"and {plural(rest, 'trial')} with {plural(len(groups) - ERROR_GROUPS, 'other error')}")
               if rest else "")
            + _note(f"{plural(n, 'trial')} failed; each one's whole error: 'pgps-tune trials {shlex.quote(str(sweep))} "
                    "--status failed --columns trial_id,error --limit 0'"))


def run_report(run: str | Path) -> str:
    """The HTML page of a ``pgps-tune train`` run folder."""
    run = Path(run)
    m = _read_metrics(run)
    s = sch.Schedule.from_dict(m["schedule"], source=str(run / "metrics.json"))
    done = "" if m.get("completed") else " (stopped before the end)"
    sections = [
        ("Summary", "<p>" + html.escape(
            f"Validation Dice {fmt(number(m.get('val_dice')))} (best {fmt(number(m.get('best_val_dice')))}) after "
            f"{m.get('iterations')} of {plural(int(m.get('total_iterations', 0)), 'iteration')}{done}; training "
            f"time {number(m.get('train_time_s')):.1f} s; {fmt(number(m.get('voxel_fraction')))}x the constant "
            "baseline's voxels.") + "</p>"),
        ("Schedule", _img(schedule_figure({"run": s}), "schedule")),
        ("Learning curve", _img(run_curve_figure(m), "learning curve")),
        ("Stages", _table(m.get("stages", []), ["index", "patch_size", "batch_size", "epochs", "iterations",
                                                "wall_time_s", "voxels"])),
    ]
    return _page("run", run.name, m.get("dataset", "?"), sections)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the page for a sweep folder or a run folder (default ``PATH/report.html``); returns the file."""
    path = Path(path)
    if (path / "sweep.json").is_file():
        make = sweep_report
    elif (path / "metrics.json").is_file():
        make = run_report
    elif (path / TRIALS).is_file() and (path / "summary.json").is_file():
        raise PgpsError(f"{path} is an export folder ('pgps-tune export --out'), which has no sweep.json; the page "
                        "is made from the sweep folder itself: run 'pgps-tune report SWEEP_DIR --out FILE' on the "
                        "folder the sweep ran in")
    else:
        what = "holds neither sweep.json nor metrics.json" if path.is_dir() else (
            "is a file, not a folder" if path.exists() else "does not exist")
        raise PgpsError(f"{path} {what}; give a sweep folder (the --out of 'pgps-tune tune') or a run folder (the "
                        "--out of 'pgps-tune train')")
    target = Path(out) if out else path / REPORT
    check_page_target(target, path)
    return atomic_write_text(target, make(path))


PAGE_SUFFIXES = (".html", ".htm")


def check_page_target(target: Path, folder: Path) -> None:
    """Refuse, in one line, a page target that would replace something else: a folder, an existing file that
    is not an HTML page, or any file of the sweep or run folder but its page (a sweep.json not yet written
    included)."""
    if target.is_dir():
        raise PgpsError(f"--out {target} is a folder; give a file name such as {target / REPORT}")
    inside = target.resolve().parent == folder.resolve()
    if inside and target.name != REPORT and target.name in OWN_FILES:
        raise PgpsError(f"--out {target} is one of the files of {folder}; give a new .html file name, such as "
                        f"{folder / REPORT}")
    if target.exists() and target.suffix.lower() not in PAGE_SUFFIXES:
        raise PgpsError(f"--out {target} exists and is not an HTML page; give a new file name ending in .html "
                        "(or move that file away)")


# what sweep and run folders hold besides their page: never a target for the page
# (the run's names are trainer.METRICS, SCHEDULE and CHECKPOINT, and the study tuner.STUDY_FILE: modules that
# import torch or Ray, which the page does not)
OWN_FILES = (SWEEP_FILE, TRIALS, SUMMARY, BEST, PARETO, "optuna.journal",
             "metrics.json", "schedule.yaml", "checkpoint.pt", LEARNING_CURVE)
