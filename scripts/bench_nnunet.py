#!/usr/bin/env python
"""nnU-Net benchmark: does a schedule tuned with pgps-tune's own trainer carry over to nnU-Net v2?

Trains nnU-Net's own trainer (``pgps-tune nnunet-train``: nnU-Net's preprocessing, augmentation,
loss, deep supervision, poly LR and validation) on fold 0 of MSD Hippocampus three times, one
schedule each, at a short budget, and compares nnU-Net's own validation Dice
(``fold_0/validation/summary.json``, per class and mean) and training time:

- ``constant``: nnU-Net's own patch and batch for the whole run (what ``nnUNetv2_train`` trains);
- ``paper``: the paper's curriculum on nnU-Net's plans, performance mode (the batch grows as the
  patch shrinks, keeping the voxels per batch of nnU-Net's batch);
- ``tuned``: the schedule given by ``--tuned`` (a pgps-tune schedule file, e.g. a sweep's
  ``best_schedule.yaml``): its patches and stage lengths, with its batch mode re-applied to
  nnU-Net's batch size (a sweep on pgps-tune's own plan has another baseline batch).

    flock /tmp/pgps-cpu.lock env PYTHONPATH=$PWD .venv/bin/python scripts/bench_nnunet.py \\
        --tuned runs/sweep/best_schedule.yaml --epochs 16 --budget-minutes 20 --report docs/bench_nnunet.md

``--budget-minutes`` sizes the iterations per epoch from two short measured runs (see
:func:`size`); ``--iterations-per-epoch`` sets them instead.

Everything nnU-Net writes goes under ``--work`` (default /tmp/nnunet_bench, refused inside this
repository): ``nnUNet_raw`` (the MSD folder converted by symbolic links, read in place),
``nnUNet_preprocessed`` (``nnUNetv2_plan_and_preprocess -c 3d_fullres`` with 2 processes),
``nnUNet_results`` and the nnU-Net schedule files.  A run whose validation summary exists is
reused, an interrupted one is continued from its last checkpoint (the trainer writes one at every
stage boundary), so the benchmark resumes where it stopped.  Each run's trainer name carries the
schedule and the budget (``nnUNetTrainerPGPS_tuned_e16i40v5``).  Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgps_tune import schedule as sch  # noqa: E402
from pgps_tune.errors import PgpsError, atomic_write_text  # noqa: E402

SCHEDULES = ("constant", "paper", "tuned")
CONFIGURATION = "3d_fullres"
STAGE_LINE = re.compile(r"pgps-tune stage (\d+): patch (\d+x\d+x\d+), batch (\d+)")
# nnU-Net's own log lines: each epoch starts with "Epoch N" and ends with "Epoch time: X s"
EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$|: Epoch time: ([0-9.]+) s", re.M)


# -- checks -------------------------------------------------------------------------------------


def check_args(a: argparse.Namespace) -> None:
    """Refuse bad input before anything is converted, planned or trained."""
    work = Path(a.work).resolve()
    if work == ROOT or ROOT in work.parents:
        raise PgpsError(f"--work {a.work} is inside the repository; nnU-Net's folders go outside it "
                        "(e.g. /tmp/nnunet_bench)")
    if work.exists() and not work.is_dir():
        raise PgpsError(f"--work {a.work} is a file; give a folder")
    data = Path(a.data)
    missing = [p for p in ("dataset.json", "imagesTr", "labelsTr") if not (data / p).exists()]
    if missing:
        raise PgpsError(f"--data {a.data} is not an MSD task folder (no {', '.join(missing)}); give the folder "
                        "holding dataset.json, imagesTr and labelsTr")
    unknown = sorted(set(a.schedules) - set(SCHEDULES))
    if unknown:
        raise PgpsError(f"--schedules: unknown {unknown}; choose from {', '.join(SCHEDULES)}")
    if "tuned" in a.schedules:
        if not a.tuned:
            raise PgpsError("--tuned FILE is needed for the tuned schedule (or leave 'tuned' out of --schedules)")
        for path in a.tuned:  # a broken file is refused now, not after preprocessing and training
            if Path(path).exists():
                sch.load(path)
        first_existing(a.tuned)
    if a.budget_minutes is not None and not a.budget_minutes > 0:
        raise PgpsError(f"--budget-minutes must be > 0, got {a.budget_minutes}")
    for flag in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch", "fold"):
        value = getattr(a, flag)
        if value < (0 if flag == "fold" else 1):
            raise PgpsError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'fold' else 1}, got {value}")
    if not 0 <= a.da_processes <= 2:
        raise PgpsError(f"--da-processes must be 0, 1 or 2 (this benchmark shares 2 cores), got {a.da_processes}")
    if a.width_divisor < 1:
        raise PgpsError(f"--width-divisor must be >= 1 (1: nnU-Net's own width), got {a.width_divisor}")
    if not 1 <= a.dataset_id <= 999:
        raise PgpsError(f"--dataset-id must be 1-999, got {a.dataset_id}")


# -- nnU-Net's raw and preprocessed data --------------------------------------------------------


def environment(work: Path, da_processes: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_n_proc_DA=str(da_processes), nnUNet_def_n_proc="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p))
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    return env


def convert(data: Path, raw: Path, dataset: str) -> Path:
    """The MSD folder in nnU-Net's raw layout, by symbolic links (nnU-Net's MSD converter wants imagesTs)."""
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    if len(meta.get("modality", {})) != 1:
        raise PgpsError(f"{data}/dataset.json: one modality expected (this converter links images as _0000)")
    out = raw / dataset
    for case in meta["training"]:
        name = Path(case["image"]).name.removesuffix(".nii.gz")
        for sub, target in (("imagesTr", f"{name}_0000.nii.gz"), ("labelsTr", f"{name}.nii.gz")):
            src = (data / sub / f"{name}.nii.gz").resolve()
            if not src.is_file():
                raise PgpsError(f"{src} is listed in {data}/dataset.json but missing")
            link = out / sub / target
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(src)
    labels = {name: int(value) for value, name in meta["labels"].items()}
    atomic_write_text(out / "dataset.json", json.dumps({
        "name": meta.get("name", dataset), "channel_names": meta["modality"], "labels": labels,
        "numTraining": len(meta["training"]), "file_ending": ".nii.gz"}, indent=1) + "\n")
    return out


def prepare(a: argparse.Namespace, work: Path, env: dict[str, str], dataset: str) -> Path:
    """Convert and plan-and-preprocess once; returns the plans file."""
    convert(Path(a.data), work / "nnUNet_raw", dataset)
    pre = work / "nnUNet_preprocessed" / dataset
    plans = pre / "nnUNetPlans.json"
    if not (plans.is_file() and (pre / "nnUNetPlans_3d_fullres").is_dir()):
        bin_dir = Path(sys.executable).parent
        subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(a.dataset_id), "-c", CONFIGURATION,
                        "-np", "2", "-npfp", "2", "--verify_dataset_integrity"], check=True, env=env)
    return plans


def narrow(plans: Path, divisor: int) -> str:
    """The configuration to train: 3d_fullres, or (divisor > 1) a narrower network added to the plans.

    nnU-Net resolves ``inherits_from`` by a shallow update, so the new configuration carries a whole
    ``architecture`` entry (3d_fullres' with fewer features per stage); the preprocessed data, patch,
    batch and poolings are 3d_fullres' own.  The plans file is rewritten atomically, keeping every
    other entry.
    """
    if divisor == 1:
        return CONFIGURATION
    data = json.loads(plans.read_text(encoding="utf-8"))
    base = data["configurations"][CONFIGURATION]
    arch = json.loads(json.dumps(base["architecture"]))
    kwargs = arch.get("arch_kwargs", {})
    if "features_per_stage" not in kwargs:
        raise PgpsError(f"{plans}: {CONFIGURATION} names no architecture.arch_kwargs.features_per_stage (an older "
                        "plans format); use --width-divisor 1")
    kwargs["features_per_stage"] = [max(4, int(f) // divisor) for f in kwargs["features_per_stage"]]
    name = f"{CONFIGURATION}_w{divisor}"
    entry = {"inherits_from": CONFIGURATION, "architecture": arch}
    if data["configurations"].get(name) != entry:
        data["configurations"][name] = entry
        atomic_write_text(plans, json.dumps(data, indent=4) + "\n")
    return name


def features(plans: Path, configuration: str) -> list[int] | str:
    """The network's features per stage of ``configuration`` (inheritance resolved as nnU-Net does)."""
    from pgps_tune.nnunet import _resolve_configuration

    cfg = _resolve_configuration(json.loads(plans.read_text(encoding="utf-8"))["configurations"], configuration,
                                 str(plans))
    return cfg.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage", "?")


# -- the three schedules ------------------------------------------------------------------------


def space_cap(s: sch.Schedule) -> int | None:
    """The fixed ``batch_cap`` of the search space a sweep's schedule names in its meta (if readable)."""
    path = s.meta.get("space")
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    from pgps_tune.space import load

    return next((p.value for p in load(path).parameters if p.name == "batch_cap" and p.kind == "fixed"), None)


def rebatch(s: sch.Schedule, batch_size: int) -> sch.Schedule:
    """``s`` with its batch mode re-applied to another baseline batch (a sweep's plan vs nnU-Net's).

    The mode is the one in ``s.meta`` (or resource when every stage trains the baseline batch);
    the cap is the sweep's space's (which a larger baseline batch can reach where the sweep's did
    not), else a largest batch below the mode's rule, kept as is.
    """
    patches = [st.patch_size for st in s.stages]
    mode = s.meta.get("mode") or ("resource" if all(st.batch_size == s.baseline_batch_size for st in s.stages)
                                  else None)
    if mode is None:
        raise PgpsError("the tuned schedule records no batch mode (meta.mode) and its batches are not constant; "
                        "give a schedule file pgps-tune wrote")
    batches = [st.batch_size for st in s.stages]
    uncapped = sch._batches(patches, s.final_patch, s.baseline_batch_size, mode, None)
    cap = space_cap(s) or (max(batches) if batches != uncapped else None)
    if sch._batches(patches, s.final_patch, s.baseline_batch_size, mode, cap) != batches:
        raise PgpsError(f"the tuned schedule's batches {batches} do not follow its mode {mode!r} at batch "
                        f"{s.baseline_batch_size}; give a schedule file pgps-tune wrote")
    new = sch._batches(patches, s.final_patch, batch_size, mode, cap)
    stages = tuple(sch.Stage(st.patch_size, b, st.epochs) for st, b in zip(s.stages, new))
    meta = {**s.meta, "rebatched_from": s.baseline_batch_size}
    return sch.Schedule(stages, s.final_patch, s.pools, batch_size, meta=meta)


def build(name: str, plan, epochs: int, tuned: Path | None) -> sch.Schedule:
    """One of the three schedules on nnU-Net's plans (pgps-tune's axis order)."""
    final, pools, batch = plan.final_patch, plan.pools, plan.batch_size
    if name == "constant":
        return sch.constant(final, pools, batch, epochs)
    if name == "paper":
        return sch.paper(final, pools, batch, epochs, mode="performance")
    return rebatch(sch.load(tuned), batch)


def schedule_file(work: Path, name: str, plan, epochs: int, ipe: int, vpe: int,
                  tuned: Path | None = None, label: str | None = None) -> tuple[str, Path]:
    """The nnU-Net schedule file (nnU-Net's axis order, the budget in it) and the trainer name of its run.

    The name carries the schedule and the budget, and for the tuned schedule a digest of its stages,
    so a rerun reuses exactly the runs it would train.
    """
    from pgps_tune import nnunet

    f = nnunet.for_nnunet(build(name, plan, epochs, tuned), plan, num_epochs=epochs, num_iterations_per_epoch=ipe,
                          num_val_iterations_per_epoch=vpe)
    nnunet.fit_epochs(f.schedule, epochs)  # a schedule with more stages than epochs is refused here
    tag = label or f"e{epochs}i{ipe}v{vpe}"
    if name == "tuned":
        digest = hashlib.sha1(json.dumps(f.schedule.to_dict()["stages"]).encode()).hexdigest()[:6]
        name = f"tuned{digest}"
    return f"nnUNetTrainerPGPS_{name}_{tag}", f.save(work / "schedules" / f"{name}_{tag}_{plan.configuration}.json")


def first_existing(paths: list[str]) -> Path:
    for p in paths:
        if Path(p).is_file():
            return Path(p)
    raise PgpsError(f"none of the --tuned files exists: {', '.join(paths)}")


# -- training and reading back --------------------------------------------------------------------


def run_dir(work: Path, dataset: str, trainer: str, fold: int, configuration: str = CONFIGURATION) -> Path:
    return work / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"


def train(a: argparse.Namespace, trainer: str, schedule: Path, work: Path, env: dict[str, str], dataset: str) -> dict:
    """One nnU-Net training (reused when its validation exists, continued when interrupted)."""
    fold_dir = run_dir(work, dataset, trainer, a.fold, a.configuration)
    record_path = work / "records" / f"{trainer}_fold{a.fold}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"invocations": []}
    cmd = [sys.executable, "-m", "pgps_tune.cli", "nnunet-train", str(a.dataset_id), a.configuration, str(a.fold),
           "--schedule", str(schedule), "--device", "cpu", "--trainer", trainer]
    if not (fold_dir / "validation" / "summary.json").is_file():
        started = any((fold_dir / f).is_file() for f in ("checkpoint_latest.pth", "checkpoint_final.pth"))
        run = cmd + (["--continue"] if started else [])
        t0, load0 = time.time(), os.getloadavg()[0]
        print(f"bench_nnunet: {' '.join(run)}", flush=True)
        subprocess.run(run, check=True, env=env, cwd=ROOT)
        record["invocations"].append({"command": run, "start": t0, "wall_s": time.time() - t0,
                                      "load_before": load0, "load_after": os.getloadavg()[0]})
        atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    return read_run(fold_dir, record, cmd)


def size(a: argparse.Namespace, plan, work: Path, env: dict[str, str], dataset: str) -> dict:
    """Iterations per epoch for ``--epochs`` so that the trainings fit ``--budget-minutes``.

    Measured by two short runs kept like the others: the constant schedule (2 epochs of 6
    iterations and 2 validation ones; the first epoch, with the loader's warm-up, is left out)
    gives the cost of an iteration at nnU-Net's patch and batch; the paper schedule (one epoch of
    1 + 1 iterations per stage) gives the cost of a curriculum epoch with its loader rebuilt.  A
    curriculum epoch of the real budget is that epoch plus its further iterations at the constant
    cost (performance mode keeps the voxels per batch); a validation iteration counts as a training
    one, the tuned schedule as the paper's (more stages, more rebuilds), so the estimate errs long.
    Each run's start-up and final validation are the measured ones.
    """
    stages = len(build("paper", plan, a.epochs, None).stages)
    measured = {}
    for name, epochs, ipe, vpe in (("constant", 2, 6, 2), ("paper", stages, 1, 1)):
        trainer, path = schedule_file(work, name, plan, epochs, ipe, vpe, label="sizing")
        r = train(a, trainer, path, work, env, dataset)
        epoch_s = r["epoch_s"][1:] if name == "constant" else r["epoch_s"]
        measured[name] = {"epoch_s": sum(epoch_s) / len(epoch_s), "iterations": ipe + vpe,
                          "s_per_iteration": sum(epoch_s) / (len(epoch_s) * (ipe + vpe)),
                          "overhead_s": r["wall_s"] - r["train_s"]}
    c, p = measured["constant"], measured["paper"]
    n_const = a.schedules.count("constant")
    n_curr = len(a.schedules) - n_const
    rebuild = max(0.0, p["epoch_s"] - p["iterations"] * c["s_per_iteration"])  # per curriculum epoch
    fixed = n_const * c["overhead_s"] + n_curr * (p["overhead_s"] + a.epochs * rebuild)
    room = a.budget_minutes * 60 - fixed
    ipe = int(room / (len(a.schedules) * a.epochs * c["s_per_iteration"])) - a.val_iterations_per_epoch
    if ipe < 1:
        raise PgpsError(f"--budget-minutes {a.budget_minutes:g} leaves no room for {a.epochs} epochs of "
                        f"{'+'.join(a.schedules)} here ({c['s_per_iteration']:.2f} s per iteration, {fixed:.0f} s "
                        "of start-up, validation and curriculum loader rebuilds); give more minutes or fewer --epochs")
    return {"iterations_per_epoch": ipe, "measured": measured}


def read_run(fold_dir: Path, record: dict, cmd: list[str]) -> dict:
    """nnU-Net's validation summary, its epoch times and the stages its logs name.

    Everything comes from nnU-Net's text logs and JSON files: its checkpoints are pickles, which
    only a full unpickling (able to run code) could read.  An epoch redone after a continued run
    counts once, with its last time, as nnU-Net's own logger keeps it.
    """
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    stages: dict[int, dict] = {}
    times: dict[int, float] = {}
    for path in sorted(fold_dir.glob("training_log_*.txt")):  # named by start time: oldest first
        text = path.read_text(errors="replace")
        for m in STAGE_LINE.finditer(text):
            st = stages.setdefault(int(m[1]), {"patch": m[2], "batch": int(m[3]), "epochs": 0})
            st["epochs"] += 1
        epoch = None
        for m in EPOCH_LINE.finditer(text):
            if m[1] is not None:
                epoch = int(m[1])
            elif epoch is not None:
                times[epoch] = float(m[2])
    epoch_s = [times[k] for k in sorted(times)]
    plan_record = json.loads((fold_dir / "pgps_schedule.json").read_text())
    return {
        "command": cmd, "summary": summary, "epoch_s": epoch_s, "train_s": sum(epoch_s),
        "stages_seen": [stages[k] for k in sorted(stages)],
        "stages_planned": len(plan_record["schedule"]["stages"]),
        "wall_s": sum(i["wall_s"] for i in record["invocations"]),
        "invocations": record["invocations"],
    }


# -- the report -----------------------------------------------------------------------------------


def report(a: argparse.Namespace, runs: dict[str, dict], plans: Path, started: float, sizing: dict | None,
           tuned: Path | None) -> str:
    from importlib.metadata import version

    import torch

    from pgps_tune import nnunet

    plan = nnunet.read_plans(plans, a.configuration)
    nn_patch = "x".join(map(str, plan.to_nnunet(plan.final_patch)))
    data_json = json.loads((plans.parent / "dataset.json").read_text())
    labels = data_json["labels"]
    names = {str(v): k for k, v in labels.items()}
    base = runs.get("constant")
    lines = [
        "# nnU-Net benchmark: constant vs paper vs tuned schedule inside nnU-Net's own trainer", "",
        f"Command: `PYTHONPATH=$PWD .venv/bin/python {shlex.join(['scripts/bench_nnunet.py', *sys.argv[1:]])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, nnunetv2 "
        f"{version('nnunetv2')}; device cpu; nnUNet_n_proc_DA={a.da_processes}; one training at a time "
        "under the CPU lock", "",
        f"Data: MSD {data_json.get('name', plan.dataset)} as nnU-Net dataset {plan.dataset} (nnU-Net's 5-fold "
        f"split, fold {a.fold}); "
        f"nnU-Net's {a.configuration} plans: patch {nn_patch} (nnU-Net axis order), batch {plan.batch_size}, "
        f"poolings {list(plan.to_nnunet(plan.pools))}, features per stage {features(plans, a.configuration)}"
        + (f" (3d_fullres' divided by {a.width_divisor}: a narrower network than nnU-Net's, everything else "
           "nnU-Net's own)" if a.width_divisor > 1 else ""), "",
        f"Budget: {a.epochs} epochs x {a.iterations_per_epoch} iterations ({a.epochs * a.iterations_per_epoch} "
        f"iterations), {a.val_iterations_per_epoch} pseudo-Dice iterations per epoch, then nnU-Net's full "
        "sliding-window validation of the fold", "",
    ]
    if sizing:
        m = sizing["measured"]
        lines += [f"Budget sized (`--budget-minutes {a.budget_minutes:g}`) from two short runs: constant "
                  f"{m['constant']['s_per_iteration']:.2f} s per iteration, "
                  f"paper {m['paper']['epoch_s']:.1f} s per epoch of 1 + 1 iterations (one per stage, its loader "
                  f"rebuilt at each); start-up and final validation "
                  f"{m['constant']['overhead_s']:.0f} / {m['paper']['overhead_s']:.0f} s", ""]
    if tuned:
        t = sch.load(tuned)
        lines += [f"Tuned schedule: `{tuned}` ({len(t.stages)} stages, mode {t.meta.get('mode')}, "
                  f"batches re-applied to nnU-Net's batch {plan.batch_size} from {t.baseline_batch_size}; "
                  f"trainer settings found with it, not carried to nnU-Net: {t.meta.get('trainer', {})})"
                  + (f"; {a.tuned_note}" if a.tuned_note else ""), ""]
    lines += [
        "| schedule | stages | Dice (mean of classes) | per class | vs constant | train s | train time ratio | "
        "validation + overhead s | patch x batch seen, epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        s = r["summary"]
        dice = s["foreground_mean"]["Dice"]
        per = ", ".join(f"{names.get(k, k)} {v['Dice']:.4f}" for k, v in s["mean"].items())
        vs = "-"
        if base and name != "constant":
            vs = f"{(dice - base['summary']['foreground_mean']['Dice']) * 100:+.2f} pts"
        ratio = f"{r['train_s'] / base['train_s']:.3f}" if base else "-"
        seen = "; ".join(f"{st['patch']} b{st['batch']} x{st['epochs']}" for st in r["stages_seen"])
        lines.append(f"| {name} | {r['stages_planned']} | {dice:.4f} | {per} | {vs} | {r['train_s']:.0f} | {ratio} | "
                     f"{max(0.0, r['wall_s'] - r['train_s']):.0f} | {seen} |")
    lines += [
        "",
        "Dice: nnU-Net's `fold_0/validation/summary.json` (`foreground_mean` and per class), from the final "
        "checkpoint's sliding-window prediction of every validation case. Train s: the sum of nnU-Net's epoch "
        "times (training iterations plus the per-epoch pseudo-Dice iterations, from its checkpoint's log). "
        "Validation + overhead: the rest of the process' wall time (start-up, data loading, final "
        "validation). Patch x batch seen: the stages the trainer's log reports, in nnU-Net's axis order, with "
        "their epoch counts.",
        "",
        "Runs:",
        "",
    ]
    for name, r in runs.items():
        for inv in r["invocations"]:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(inv["start"]))
            lines.append(f"- {name}: `{' '.join(['pgps-tune', *inv['command'][3:]])}` at {when}, wall "
                         f"{inv['wall_s']:.0f} s, load average {inv['load_before']:.2f} before / "
                         f"{inv['load_after']:.2f} after")
        if not r["invocations"]:
            lines.append(f"- {name}: reused from an earlier invocation (no record of its wall time)")
    lines += ["", f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
                  f"(this invocation: {(time.time() - started) / 60:.1f} min)", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="bench_nnunet.py")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"),
                    help="the MSD task folder (read in place)")
    ap.add_argument("--work", default="/tmp/nnunet_bench", help="nnU-Net's folders, outside the repository")
    ap.add_argument("--tuned", nargs="+", metavar="FILE",
                    help="the tuned pgps-tune schedule file (e.g. a sweep's best_schedule.yaml); given several, the "
                         "first that exists when the tuned run starts (a sweep still running, then a fallback)")
    ap.add_argument("--tuned-note", default="", help="a sentence on where the tuned schedule came from, for the report")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), help="which to train, in order")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--iterations-per-epoch", type=int, default=40)
    ap.add_argument("--val-iterations-per-epoch", type=int, default=2)
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="size --iterations-per-epoch from two short measured runs so the trainings fit this")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--da-processes", type=int, default=2, help="nnUNet_n_proc_DA (0-2)")
    ap.add_argument("--dataset-id", type=int, default=4)
    ap.add_argument("--prepare-only", action="store_true", help="convert, preprocess and write the schedule files")
    ap.add_argument("--width-divisor", type=int, default=1,
                    help="train a configuration of the plans whose network has its features per stage divided by "
                         "this (written into nnUNetPlans.json as 3d_fullres_wN, inheriting the rest of 3d_fullres: "
                         "nnU-Net's full width costs about 10 s per iteration on 2 CPU cores); 1: 3d_fullres itself")
    ap.add_argument("--report", help="write the Markdown report here")
    a = ap.parse_args()
    a.configuration = CONFIGURATION
    try:
        check_args(a)
        started = time.time()
        work = Path(a.work).resolve()
        env = environment(work, a.da_processes)
        meta = json.loads((Path(a.data) / "dataset.json").read_text(encoding="utf-8"))
        dataset = f"Dataset{a.dataset_id:03d}_{re.sub(r'[^A-Za-z0-9]', '', meta.get('name', 'Task'))}"
        plans = prepare(a, work, env, dataset)
        from pgps_tune import nnunet

        a.configuration = narrow(plans, a.width_divisor)
        plan = nnunet.read_plans(plans, a.configuration)
        sizing = size(a, plan, work, env, dataset) if a.budget_minutes and not a.prepare_only else None
        if sizing:
            a.iterations_per_epoch = sizing["iterations_per_epoch"]
            print(f"bench_nnunet: sized: {a.epochs} epochs x {a.iterations_per_epoch} iterations", flush=True)
        runs, tuned = {}, None
        for name in a.schedules:
            tuned = first_existing(a.tuned) if name == "tuned" else tuned
            trainer, path = schedule_file(work, name, plan, a.epochs, a.iterations_per_epoch,
                                          a.val_iterations_per_epoch, tuned)
            print(f"bench_nnunet: {name}: {path}", flush=True)
            if not a.prepare_only:
                runs[name] = train(a, trainer, path, work, env, dataset)
        if a.prepare_only:
            return 0
    except PgpsError as exc:
        print(f"bench_nnunet.py: error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"bench_nnunet.py: error: {' '.join(map(str, exc.cmd[:6]))}... failed (exit {exc.returncode}); "
              "run the benchmark again to continue it", file=sys.stderr)
        return 1
    text = report(a, runs, plans, started, sizing, tuned)
    print(text)
    if a.report:
        atomic_write_text(a.report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
