"""``pgps-tune`` command line: parse, call the library, turn errors into one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pgps_tune import schedule as sch
from pgps_tune.config import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, OPTIMIZERS, TrainConfig
from pgps_tune.errors import PgpsError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_schedule_args(p: argparse.ArgumentParser, need_shape: bool) -> None:
    g = p.add_argument_group("schedule")
    g.add_argument("--preset", choices=["constant", "paper", "parametric"], default=None,
                   help="built-in curriculum (default: paper)")
    g.add_argument("--mode", choices=list(sch.MODES), default="resource",
                   help="resource: constant batch; performance: batch grows to keep voxels per batch")
    g.add_argument("--final-patch", nargs=3, type=int, metavar=("X", "Y", "Z"), required=need_shape and False,
                   help="final (inference) patch size" + ("" if need_shape else "; default: planned from the data"))
    g.add_argument("--pools", nargs=3, type=int, metavar=("PX", "PY", "PZ"),
                   help="stride-2 poolings per axis of the network" + ("" if need_shape else "; default: planned"))
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"baseline batch size (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--batch-cap", type=int, default=None, help="performance mode: largest batch allowed")
    g.add_argument("--stages", type=int, default=4, help="parametric: number of stages")
    g.add_argument("--growth", type=float, default=None, help="parametric: side-length growth per stage")
    g.add_argument("--start-fraction", type=float, default=None,
                   help="parametric: first patch side as a fraction of the final (instead of --growth)")
    g.add_argument("--length-ratio", type=float, default=1.0,
                   help="parametric: each stage is this many times longer than the one before")
    g.add_argument("--final-fraction", type=float, default=None,
                   help="parametric: share of all epochs spent at the final patch size")


def _build_schedule(a: argparse.Namespace, final: Any, pools: Any, epochs: int) -> sch.Schedule:
    preset = a.preset or "paper"
    if preset == "parametric":
        growth = a.growth
        if growth is None and a.start_fraction is None and a.stages > 1:
            growth = 1.5
        return sch.parametric(
            final, pools, a.batch_size, epochs, stages=a.stages, growth=growth,
            start_fraction=a.start_fraction, length_ratio=a.length_ratio,
            final_fraction=a.final_fraction, mode=a.mode, batch_cap=a.batch_cap,
        )
    return sch.preset(preset, final, pools, a.batch_size, epochs, a.mode, a.batch_cap)


def _print_schedule(s: sch.Schedule, fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(s.to_json())
    elif fmt == "yaml":
        sys.stdout.write(s.to_yaml())
    else:
        print(s.table())


# -- commands ---------------------------------------------------------------------


def _schedule_file(path: str, epochs: int | None, flag: str, preset: str | None) -> sch.Schedule:
    """A schedule file, rescaled to ``epochs`` if given."""
    if preset:
        raise PgpsError(f"give either {flag} FILE or --preset, not both")
    s = sch.load(path)
    return sch.rescale_epochs(s, epochs) if epochs is not None else s


def cmd_schedule(a: argparse.Namespace) -> int:
    if a.from_file:
        s = _schedule_file(a.from_file, a.epochs, "--from", a.preset)
    else:
        if a.final_patch is None or a.pools is None:
            raise PgpsError("--final-patch X Y Z and --pools PX PY PZ are needed (or --from FILE)")
        s = _build_schedule(a, a.final_patch, a.pools, a.epochs if a.epochs is not None else 1000)
    if a.out:
        s.save(a.out)
    _print_schedule(s, a.format)
    return 0


def _check_writable(out: Path) -> None:
    from pgps_tune.errors import atomic_write_text

    if out.exists() and not out.is_dir():
        raise PgpsError(f"--out {out} is a file; give a folder")
    atomic_write_text(out / ".write_test", "")
    (out / ".write_test").unlink()


def _prepare(a: argparse.Namespace):
    from pgps_tune.data import prepare

    return prepare(a.data, cache_root=a.cache_dir)


def cmd_train(a: argparse.Namespace) -> int:
    from pgps_tune.data import plan_patch, split
    from pgps_tune.network import NETWORKS
    from pgps_tune.trainer import CHECKPOINT, Trainer, resolve_device

    if a.network not in NETWORKS:
        raise PgpsError(f"unknown network {a.network!r}; use one of {', '.join(NETWORKS)}")
    resolve_device(a.device)
    out = Path(a.out)
    has_run = (out / CHECKPOINT).is_file()
    if a.resume and not has_run:
        raise PgpsError(f"--resume given but {out / CHECKPOINT} does not exist; run without --resume to start")
    if has_run and not a.resume:
        raise PgpsError(f"{out} already holds a run; add --resume to continue it, or choose a new --out")
    _check_writable(out)
    if a.schedule:
        s = _schedule_file(a.schedule, a.epochs, "--schedule", a.preset)
        ds = _prepare(a)
    else:
        ds = _prepare(a)
        plan = plan_patch(ds.median_shape, ds.spacing, voxel_budget=a.voxel_budget)
        final = tuple(a.final_patch) if a.final_patch else plan.final_patch
        pools = tuple(a.pools) if a.pools else plan.pools
        s = _build_schedule(a, final, pools, a.epochs if a.epochs is not None else DEFAULT_EPOCHS)
    train_cases, val_cases = split(ds, a.val_fraction, a.split_seed, a.splits)
    searched = s.meta.get("trainer") or {}  # trainer settings a sweep found with this schedule
    for name, flag in (("fg_ratio", "--fg-ratio"), ("lr", "--lr")):
        if getattr(a, name) is None and name in searched:
            setattr(a, name, float(searched[name]))
            if not a.quiet:
                print(f"{name} {searched[name]:.4g} from the schedule file (override with {flag})", flush=True)
    if a.fg_ratio is None:
        a.fg_ratio = 0.5
    cfg = TrainConfig(
        network=a.network, deep_supervision=a.deep_supervision, optimizer=a.optimizer, lr=a.lr,
        iterations_per_epoch=a.iterations_per_epoch, seed=a.seed, device=a.device, threads=a.threads,
        workers=a.workers, fg_ratio=a.fg_ratio, val_every=a.val_every,
        max_train_seconds=a.max_train_seconds,
        **({"filters": tuple(a.filters)} if a.filters else {}),
    )
    if not 0 <= cfg.fg_ratio <= 1:
        raise PgpsError(f"--fg-ratio must be in [0, 1], got {cfg.fg_ratio}")
    trainer = Trainer(ds, train_cases, val_cases, s, cfg, out, callback=None if a.quiet else _progress)
    try:
        metrics = trainer.fit(resume=a.resume)
    except KeyboardInterrupt:
        done = trainer.state.iteration
        raise Interrupted(
            f"interrupted at iteration {done}; the last checkpoint in {out} is intact: "
            "rerun the same command with --resume to continue"
        ) from None
    trainer.write_metrics()
    print(json.dumps({k: metrics[k] for k in (
        "val_dice", "val_dice_per_class", "best_val_dice", "wall_time_s", "train_time_s",
        "voxel_fraction", "iterations", "completed")}, indent=1))
    return 0


def _progress(r: dict[str, Any]) -> None:
    patch = "x".join(map(str, r["patch_size"]))
    print(
        f"epoch {r['epoch']:>4}  stage {r['stage']:>2} ({patch})  loss {r['train_loss']:.4f}  "
        f"val_dice {r['val_dice']:.4f}  train {r['train_time_s']:.1f}s",
        file=sys.stderr, flush=True,
    )


def cmd_evaluate(a: argparse.Namespace) -> int:
    from pgps_tune.trainer import evaluate_run

    ds = _prepare(a)
    print(json.dumps(evaluate_run(a.run, ds, a.device), indent=1))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from pgps_tune.data import plan_patch

    ds = _prepare(a)
    plan = plan_patch(ds.median_shape, ds.spacing, voxel_budget=a.voxel_budget)
    print(json.dumps({
        "dataset": ds.name, "cases": len(ds), "median_shape": list(ds.median_shape),
        "spacing": list(ds.spacing), "final_patch": list(plan.final_patch), "pools": list(plan.pools),
        "cache": str(ds.cache_dir),
    }, indent=1))
    return 0


REPO_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _space_path(name: str) -> Path:
    p = Path(name)
    if p.exists() or p.suffix:
        return p
    return REPO_SPACES / f"{name}.yaml"  # a bare name picks a shipped space


def _sweep(a: argparse.Namespace, space_file: str, data: str, out: str) -> int:
    import os

    from pgps_tune import space as sp

    if a.address:
        # Ray waits minutes on an address where nothing listens; these bound it to seconds.
        # Ray reads them when its core library starts, so set them before importing it.
        for key, value in {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "3",
                           "RAY_gcs_rpc_server_connect_timeout_s": "1"}.items():
            os.environ.setdefault(key, value)
    from pgps_tune.tuner import SweepInterrupted, SweepOptions, sweep

    space = sp.load(_space_path(space_file))
    opts = SweepOptions(
        space=space, data=data, out=Path(out), num_samples=a.num_samples, max_concurrent=a.max_concurrent,
        cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial, address=a.address,
        storage=a.storage, resume=a.resume, cache_root=a.cache_dir, results_store=a.results_store,
        quiet=a.quiet, max_failures=a.max_failures,
    )
    _check_writable(Path(out))
    try:
        summary = sweep(opts)
    except SweepInterrupted as exc:
        started = (Path(out) / "sweep.json").is_file()
        print(f"pgps-tune: interrupted by {exc}; "
              + (f"finished trials and checkpoints in {out} are kept and nothing was exported; resume with:"
                 if started else "the sweep had not started; run it again with:"), file=sys.stderr)
        print(_command_line(a, resume=started), file=sys.stderr, flush=True)
        return 128 + exc.signum
    _print_summary(summary, Path(out))
    return 0


def _command_line(a: argparse.Namespace, resume: bool) -> str:
    """The command that reruns ``a`` (with --resume), one line to copy: paths absolute, options as given."""
    import shlex

    sub = next(act for act in build_parser()._actions if isinstance(act, argparse._SubParsersAction))
    words = ["pgps-tune"] if Path(sys.argv[0]).name == "pgps-tune" else [sys.executable, "-m", "pgps_tune.cli"]
    words.append(a.command)
    for act in sub.choices[a.command]._actions:
        value = getattr(a, act.dest, None)
        if not act.option_strings or act.dest in ("help", "resume") or value is None or (
                value == act.default and act.dest != "out"):
            continue
        flag = act.option_strings[-1]
        if act.nargs == 0:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            text = str(value)
            if act.dest == "out" or (text != "synthetic" and "://" not in text and Path(text).exists()):
                text = str(Path(text).resolve())
            words += [flag, text]
    if resume:
        words.append("--resume")
    return shlex.join(words)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    best = summary.get("best")
    print(f"sweep {summary['sweep']} on {summary['dataset']}: {summary['trials']} trials, "
          f"{summary['completed']} completed, {summary['stopped_early']} stopped early, {summary['failed']} failed")
    if not best:
        print("no trial completed; nothing exported as best")
        return
    print(f"best: trial {best['trial_id']} ({best['role']}) {best['params']}")
    print(f"  {summary['objective']['type']} score {best['score']:.4f}, val Dice {best['final_dice']:.4f}, "
          f"{best['n_stages']} stages, voxel fraction {best['schedule_voxel_fraction']:.3f}")
    for role in ("baseline", "paper"):
        g = summary.get(f"gain_over_{role}")
        if g:
            print(f"  vs {role}: Dice {g['dice_points']:+.2f} points ({g['dice_relative_pct']:+.2f}% relative), "
                  f"time x{g['time_ratio']:.2f}, voxels x{g['voxel_ratio']:.2f}")
    best_file = out / "best_schedule.yaml"
    if best_file.is_file():
        print(sch.load(best_file).table())
    print(f"schedule: {best_file}  trials: {out / 'trials.parquet'}")


def cmd_tune(a: argparse.Namespace) -> int:
    return _sweep(a, a.space, a.data, a.out)


def cmd_demo(a: argparse.Namespace) -> int:
    rc = _sweep(a, "smoke", "synthetic", a.out)
    best = Path(a.out) / "best_schedule.yaml"
    if rc == 0 and best.is_file():
        print()
        sys.stdout.write(best.read_text())
    return rc


def cmd_export(a: argparse.Namespace) -> int:
    from pgps_tune.results import read_meta, require_finished

    require_finished(read_meta(a.experiment))  # refused before Ray is imported and before --out is made
    from pgps_tune.tuner import export

    _check_writable(Path(a.out))
    _print_summary(export(a.experiment, a.out, results_store=a.results_store), Path(a.out))
    return 0


def cmd_best(a: argparse.Namespace) -> int:
    from pgps_tune.results import best_schedule

    s = best_schedule(a.dataset, a.results_store, a.objective)
    if a.out:
        s.save(a.out)
    _print_schedule(s, a.format)
    return 0


class Interrupted(Exception):
    pass


# -- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgps-tune", description="Patch-size curricula for 3D segmentation.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("schedule", help="build, convert or show a schedule")
    _add_schedule_args(s, need_shape=True)
    s.add_argument("--from", dest="from_file", help="read a schedule file (YAML or JSON)")
    s.add_argument("--epochs", type=int, default=None, help="total epochs (default 1000; with --from: rescale)")
    s.add_argument("--format", choices=["json", "yaml", "table"], default="table")
    s.add_argument("--out", help="also write the schedule to this file (.json or .yaml)")
    s.set_defaults(func=cmd_schedule)

    def data_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data", required=True, help="MSD/nnU-Net dataset folder, or 'synthetic'")
        q.add_argument("--cache-dir", default=None, help="preprocessing cache (default ~/.cache/pgps-tune)")
        q.add_argument("--device", default="auto", help="auto, cpu or cuda")
        q.add_argument("--voxel-budget", type=int, default=128**3, help="planner: most voxels per patch")

    t = sub.add_parser("train", help="train one schedule")
    data_args(t)
    t.add_argument("--out", required=True, help="run folder (checkpoint.pt, metrics.json)")
    t.add_argument("--schedule", help="schedule file (instead of --preset)")
    _add_schedule_args(t, need_shape=False)
    t.add_argument("--epochs", type=int, default=None,
                   help=f"total epochs (default {DEFAULT_EPOCHS}; rescales a --schedule)")
    t.add_argument("--iterations-per-epoch", type=int, default=TrainConfig.iterations_per_epoch,
                   help=f"default {TrainConfig.iterations_per_epoch}")
    t.add_argument("--network", default=TrainConfig.network, help="unet or dynunet")
    t.add_argument("--filters", nargs="+", type=int, help="channels per level")
    t.add_argument("--deep-supervision", action="store_true", help="dynunet only")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=TrainConfig.optimizer,
                   help=f"default {TrainConfig.optimizer}")
    t.add_argument("--lr", type=float, default=None,
                   help="default " + ", ".join(f"{v:g} ({k})" for k, v in DEFAULT_LR.items()))
    t.add_argument("--fg-ratio", type=float, default=None,
                   help="share of foreground-centred patches (default: the schedule file's, else 0.5)")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--split-seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--splits", help='JSON {"train": [ids], "val": [ids]}')
    t.add_argument("--val-every", type=int, default=None, help="epochs between validations")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--max-train-seconds", type=float, default=None, help="stop after this much training")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Dice of a trained run on every labelled case of a dataset")
    data_args(e)
    e.add_argument("--run", required=True, help="run folder written by 'train'")
    e.set_defaults(func=cmd_evaluate)

    pl = sub.add_parser("plan", help="show the planned final patch and poolings for a dataset")
    data_args(pl)
    pl.set_defaults(func=cmd_plan)

    def sweep_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--num-samples", type=int, default=None, help="search trials (default: the space's)")
        q.add_argument("--max-concurrent", type=int, default=None, help="trials running at once")
        q.add_argument("--cpus-per-trial", type=float, default=1.0)
        q.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
        q.add_argument("--address", default=None, help="join a Ray cluster ('auto' or HOST:PORT)")
        q.add_argument("--storage", default=None, help="local path or s3:// / gs:// URI for Tune's results")
        q.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
        q.add_argument("--max-failures", type=int, default=None,
                       help="retries of a failed trial from its last checkpoint (default: the space's budget)")
        q.add_argument("--cache-dir", default=None, help="preprocessing cache (default ~/.cache/pgps-tune)")
        q.add_argument("--results-store", default=None, help="results store (default ~/.local/share/pgps-tune/results)")
        q.add_argument("--quiet", action="store_true", help="no progress lines")

    tu = sub.add_parser("tune", help="search the best schedule for a dataset with Ray Tune")
    tu.add_argument("--space", required=True, help="space file, or the name of one in search_spaces/")
    tu.add_argument("--data", required=True, help="MSD/nnU-Net dataset folder, or 'synthetic'")
    tu.add_argument("--out", required=True, help="sweep folder (exports, sweep.json, Tune results)")
    sweep_args(tu)
    tu.set_defaults(func=cmd_tune)

    de = sub.add_parser("demo", help="a small sweep on synthetic data, end to end (about 2 minutes on 2 cores)")
    de.add_argument("--out", default="runs/demo")
    sweep_args(de)
    de.set_defaults(func=cmd_demo, max_concurrent=None)

    ex = sub.add_parser("export", help="(re)write trials.parquet and best_schedule.yaml of a sweep")
    ex.add_argument("--experiment", required=True, help="the --out folder of a sweep")
    ex.add_argument("--out", required=True)
    ex.add_argument("--results-store", default=None)
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("best", help="the best stored schedule for a dataset, over all sweeps")
    be.add_argument("--dataset", required=True, help="dataset name (dataset.json 'name', or 'synthetic')")
    be.add_argument("--objective", default="max_dice")
    be.add_argument("--results-store", default=None)
    be.add_argument("--format", choices=["json", "yaml", "table"], default="yaml")
    be.add_argument("--out", help="also write the schedule to this file")
    be.set_defaults(func=cmd_best)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PgpsError as exc:
        print(f"pgps-tune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"pgps-tune: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("pgps-tune: interrupted; nothing was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
