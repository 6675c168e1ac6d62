"""One self-contained HTML page for a sweep or a training run (``pgps-tune report``).

The page opens offline: every figure is a PNG inlined as a data URI, the only script
is inline, and nothing is fetched.  For a sweep it shows the best schedule and both
references as patch side and batch size over training; every trial's learning curve
(Dice against baseline-equivalent compute, where early-stopped trials end in a cross
at the point ASHA stopped them); Dice against compute for all trials with the Pareto
front and the paper schedule marked; confirmation results when the sweep has them;
Optuna's parameter importances; and the trial table.  For a single ``train`` run it
shows the schedule, the learning curve and the stage table.

Reads only plain files (sweep.json, trials.parquet, summary.json, schedule files and
Tune's ``result.json`` lines), so it imports neither Ray nor torch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from pgps_tune import schedule as sch
from pgps_tune.errors import PgpsError, atomic_write_text

REPORT = "report.html"
LEARNING_CURVE = "learning_curve.png"
COLOURS = {"baseline": "#444444", "paper": "#d62728", "search": "#1f77b4", "best": "#2ca02c"}


# -- figures -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _side(patch: tuple[int, int, int]) -> float:
    """One number for a patch: the side of the cube with its voxels."""
    return math.prod(patch) ** (1 / 3)


def schedule_figure(schedules: dict[str, sch.Schedule]) -> bytes:
    """Patch side and batch size over training (fraction of the epochs) for each named schedule."""
    plt = _pyplot()
    fig, (ax_p, ax_b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, s in schedules.items():
        xs, sides, batches = [], [], []
        for start, st in zip(s.stage_starts(), s.stages):
            for x in (start / s.epochs, (start + st.epochs) / s.epochs):
                xs.append(x)
                sides.append(_side(st.patch_size))
                batches.append(st.batch_size)
        colour = COLOURS.get(name.split()[0], None)
        ax_p.plot(xs, sides, label=name, color=colour)
        ax_b.plot(xs, batches, label=name, color=colour)
    ax_p.set(xlabel="fraction of training", ylabel="patch side (cube root of voxels)", title="patch size")
    ax_b.set(xlabel="fraction of training", ylabel="batch size", title="batch size", yscale="log")
    ax_p.legend(fontsize=8)
    return _png(fig)


def learning_curve_figure(curves: dict[str, list[tuple[float, float]]], stopped: set[str],
                          roles: dict[str, str], xlabel: str) -> bytes:
    """Dice against compute per trial; an early-stopped trial ends in a cross."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for tid, pts in curves.items():
        if not pts:
            continue
        xs, ys = zip(*pts)
        role = roles.get(tid, "search")
        ax.plot(xs, ys, color=COLOURS.get(role, COLOURS["search"]), alpha=0.9 if role != "search" else 0.5,
                lw=2 if role != "search" else 1, label=role if role != "search" else None)
        if tid in stopped:
            ax.plot(xs[-1], ys[-1], "x", color="black", ms=7)
    ax.plot([], [], "x", color="black", label="stopped early (ASHA)")
    ax.set(xlabel=xlabel, ylabel="validation Dice (final patch)", title="learning curves")
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (compute, Dice) points: no other point is cheaper and at least as good.

    >>> pareto_front([(1.0, 0.8), (0.5, 0.7), (0.6, 0.6), (0.3, 0.5)])
    [(0.3, 0.5), (0.5, 0.7), (1.0, 0.8)]
    """
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def dice_vs_compute_figure(rows: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["completed"] and not math.isnan(r["final_dice"])]
    for role, marker in (("search", "o"), ("baseline", "s"), ("paper", "D")):
        pts = [(r["schedule_voxel_fraction"], r["final_dice"]) for r in done if r["role"] == role]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, marker=marker, color=COLOURS[role], label=role, zorder=3)
    front = pareto_front([(r["schedule_voxel_fraction"], r["final_dice"]) for r in done])
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color=COLOURS["best"], label="Pareto front", zorder=2)
    ax.set(xlabel="compute (voxel fraction of the constant baseline)", ylabel="final validation Dice",
           title="Dice against compute (completed trials)")
    ax.legend(fontsize=8)
    return _png(fig)


def importance_figure(importances: dict[str, float]) -> bytes:
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(names)))
    ax.barh(names, [importances[n] for n in names], color=COLOURS["search"])
    ax.set(xlabel="importance (Optuna fANOVA)", title="parameter importances")
    return _png(fig)


def param_importances(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Optuna's fANOVA importances over the completed searched trials (None: too few to say)."""
    import optuna

    trials = []
    for r in rows:
        if r["role"] != "search" or not r["completed"] or math.isnan(r["score"]):
            continue
        params = {k: v for k, v in json.loads(r["params"]).items() if k not in ("role", "preset")}
        dists: dict[str, Any] = {}
        for k, v in params.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                dists[k] = optuna.distributions.CategoricalDistribution(sorted({str(x) for x in _values(rows, k)}))
                params[k] = str(v)
            else:
                lo, hi = min(_values(rows, k)), max(_values(rows, k))
                if lo == hi:
                    continue
                dists[k] = (optuna.distributions.IntDistribution(int(lo), int(hi)) if isinstance(v, int)
                            else optuna.distributions.FloatDistribution(float(lo), float(hi)))
        params = {k: v for k, v in params.items() if k in dists}
        trials.append(optuna.trial.create_trial(params=params, distributions=dists, value=r["score"]))
    if len(trials) < 3:
        return None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # e.g. no parameter shared by every trial
        return None


def _values(rows: list[dict[str, Any]], key: str) -> list[Any]:
    return [json.loads(r["params"])[key] for r in rows if r["role"] == "search" and r["completed"]
            and key in json.loads(r["params"])]


# -- reading a sweep ---------------------------------------------------------------------------


def read_curves(meta: dict[str, Any], x_key: str) -> dict[str, list[tuple[float, float]]]:
    """``{trial_id: [(x, val_dice), ...]}`` from Tune's result.json lines (local storage only)."""
    root = Path(meta.get("storage_path", ""))
    curves: dict[str, list[tuple[float, float]]] = {}
    if not root.is_dir():
        return curves
    for exp in meta.get("experiments", {}).values():
        for f in sorted((root / exp).glob("*/result.json")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if "val_dice" in r and "trial_id" in r and r.get(x_key) is not None:
                    curves.setdefault(r["trial_id"], []).append((float(r[x_key]), float(r["val_dice"])))
    return {tid: sorted(set(pts)) for tid, pts in curves.items()}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PgpsError(f"{path} does not exist; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PgpsError(f"{path} is unreadable ({type(exc).__name__}); {what}") from None


def _rows(sweep: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = sweep / "trials.parquet"
    if not path.is_file():
        raise PgpsError(f"{path} does not exist; finish the sweep (tune --resume) or run 'pgps-tune export' first")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PgpsError(f"{path} is unreadable ({type(exc).__name__}); rerun 'pgps-tune export'") from None


# -- the page ------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%}.note{color:#666}
"""
# marks the page once every figure has decoded: a headless browser check reads it from the DOM
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-figures-loaded', ok + '/' + imgs.length);
});
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[str], left: tuple[str, ...] = ()) -> str:
    head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{_fmt(r.get(c, ""))}</td>' for c in columns)
        + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<h2>{html.escape(h)}</h2>\n{b}" for h, b in sections]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def sweep_report(sweep: str | Path) -> str:
    """The HTML page of a finished sweep folder."""
    sweep = Path(sweep)
    meta = _read_json(sweep / "sweep.json", "give the --out folder of a 'pgps-tune tune' run")
    summary = _read_json(sweep / "summary.json", "finish the sweep (tune --resume) or run 'pgps-tune export'")
    rows = _rows(sweep)
    sections: list[tuple[str, str]] = []

    best = summary.get("best")
    lines = [f"{summary.get('trials', len(rows))} trials: {summary.get('completed', 0)} completed, "
             f"{summary.get('stopped_early', 0)} stopped early, {summary.get('failed', 0)} failed."]
    if best:
        lines.append(f"Best: trial {html.escape(best['trial_id'])} ({html.escape(best['role'])}), "
                     f"validation Dice {best['final_dice']:.4f}, {best['n_stages']} stage(s), "
                     f"voxel fraction {best['schedule_voxel_fraction']:.3f}.")
        for role in ("baseline", "paper"):
            g = summary.get(f"gain_over_{role}")
            if g:
                t = g.get("time_ratio")
                speed = "" if not t else (f", {1 / t:.2f}x faster" if t < 0.995 else
                                          f", {t:.2f}x slower" if t > 1.005 else ", same time")
                lines.append(f"Against {role}: {g['dice_points']:+.2f} Dice points{speed}.")
    sections.append(("Summary", "<p>" + "<br>".join(lines) + "</p>"))

    schedules: dict[str, sch.Schedule] = {}
    for r in rows:
        if r["role"] in ("baseline", "paper") and r["schedule"]:
            schedules[r["role"]] = sch.Schedule.from_dict(json.loads(r["schedule"]))
    if (sweep / "best_schedule.yaml").is_file():
        schedules["best"] = sch.load(sweep / "best_schedule.yaml")
    if schedules:
        sections.append(("Schedules", _img(schedule_figure(schedules), "schedules")))

    x_key = "baseline_iterations"
    curves = read_curves(meta, x_key)
    if curves:
        roles = {r["trial_id"]: r["role"] for r in rows}
        stopped = {r["trial_id"] for r in rows if r["stopped_early"]}
        sections.append(("Learning curves", _img(
            learning_curve_figure(curves, stopped, roles, "compute (baseline-equivalent iterations)"),
            "learning curves")))
    else:
        sections.append(("Learning curves", '<p class="note">no local Tune results to read the curves from '
                                            "(remote storage or a moved sweep folder)</p>"))
    sections.append(("Dice against compute", _img(dice_vs_compute_figure(rows), "Dice against compute")))

    confirmation = summary.get("confirmation")
    if confirmation:
        sections.append(("Confirmation", "<pre>" + html.escape(json.dumps(confirmation, indent=1)) + "</pre>"))
    else:
        sections.append(("Confirmation", '<p class="note">this sweep has no confirmation phase</p>'))

    importances = param_importances(rows)
    sections.append(("Parameter importances", _img(importance_figure(importances), "parameter importances")
                     if importances else '<p class="note">too few completed searched trials to estimate '
                                         "importances (3 needed)</p>"))
    columns = ["trial_id", "role", "status", "final_dice", "score", "schedule_voxel_fraction", "train_time_s",
               "n_stages", "rung_reached", "params", "error"]
    columns = [c for c in columns if rows and c in rows[0]]
    ordered = sorted(rows, key=lambda r: -r["score"] if not math.isnan(r["score"]) else math.inf)
    sections.append(("Trials", _table(ordered, columns, left=("trial_id", "role", "status", "params", "error"))))
    return _page(f"pgps-tune sweep {meta.get('sweep', sweep.name)} on {meta.get('dataset', '?')}", sections)


def run_report(run: str | Path) -> str:
    """The HTML page of a ``pgps-tune train`` run folder."""
    run = Path(run)
    m = _read_json(run / "metrics.json", "give a run folder written by 'pgps-tune train'")
    s = sch.Schedule.from_dict(m["schedule"], source=str(run / "metrics.json"))
    sections = [
        ("Summary", f"<p>validation Dice {_fmt(m.get('val_dice'))} (best {_fmt(m.get('best_val_dice'))}), "
                    f"{m.get('iterations')} of {m.get('total_iterations')} iterations, training time "
                    f"{_fmt(m.get('train_time_s'))} s, voxel fraction {_fmt(m.get('voxel_fraction'))}.</p>"),
        ("Schedule", _img(schedule_figure({"run": s}), "schedule")),
        ("Learning curve", _img(run_curve_png(m), "learning curve")),
        ("Stages", _table(m.get("stages", []), ["index", "patch_size", "batch_size", "epochs", "iterations",
                                                "wall_time_s", "voxels"])),
    ]
    return _page(f"pgps-tune run {run.name} on {m.get('dataset', '?')}", sections)


def run_curve_png(metrics: dict[str, Any]) -> bytes:
    """Validation Dice of a run against baseline-equivalent compute, stage changes marked."""
    history = [h for h in metrics.get("history", []) if h.get("val_dice") is not None]
    curve = {"run": [(h["baseline_equivalent_iterations"], h["val_dice"]) for h in history]}
    return learning_curve_figure(curve, set(), {"run": "best"}, "compute (baseline-equivalent iterations)")


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the page for a sweep folder or a run folder; returns the file written."""
    path = Path(path)
    if (path / "sweep.json").is_file():
        page = sweep_report(path)
    elif (path / "metrics.json").is_file():
        page = run_report(path)
    else:
        raise PgpsError(f"{path} holds neither sweep.json nor metrics.json; give a sweep or run folder")
    target = Path(out) if out else path / REPORT
    if target.is_dir():
        raise PgpsError(f"--out {target} is a folder; give a file name such as {target / REPORT}")
    return atomic_write_text(target, page)
