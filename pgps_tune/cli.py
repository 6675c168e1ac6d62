"""``pgps-tune`` command line: parse, call the library, turn errors into one line.

Exit codes: 0 done; 2 a user error (one ``pgps-tune: error:`` line naming the problem and the
fix); 130 Ctrl-C (SIGINT); 143 SIGTERM; 141 the output's reader left (``| head``), quietly, as a
shell command killed by SIGPIPE; 1 an internal error, reported in one line that names the
log file holding its traceback (under ``$XDG_STATE_HOME/pgps-tune/logs``, by default
``~/.local/state/pgps-tune/logs``, or the temporary folder where that cannot be written).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pgps_tune import __version__
from pgps_tune import schedule as sch
from pgps_tune.config import (
    AUGMENT_PRESETS,
    CPU_PRECISIONS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEVICES,
    NETWORKS,
    OPTIMIZERS,
    TOKEN_SIZES,
    WIDTH_NETWORKS,
    DataIdentity,
    Recipe,
    TrainConfig,
    check_filters,
    check_network_widths,
    check_train_value,
    patch_multiple,
)
from pgps_tune.errors import PgpsError, refuse_special, strict_json
from pgps_tune.limits import LIMITS

if TYPE_CHECKING:
    from pgps_tune.space import SearchSpace

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def _number(name: str) -> Callable[[str], int | float]:
    """An argparse ``type`` that accepts what ``pgps_tune.limits.LIMITS[name]`` allows, else names the range."""
    rng = LIMITS[name]

    def parse(text: str) -> int | float:
        try:
            return rng.parse(text, "value")
        except PgpsError:
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}") from None

    parse.__name__ = name
    return parse


def _add_schedule_args(p: argparse.ArgumentParser, planned: bool) -> None:
    g = p.add_argument_group("schedule")
    g.add_argument("--preset", choices=[*sch.PRESETS, "parametric"], default=None,
                   help="built-in curriculum (default: paper); random: every iteration draws one of the paper's "
                        "patch sizes")
    g.add_argument("--mode", choices=list(sch.MODES), default="resource",
                   help="resource: constant batch; performance: batch grows to keep voxels per batch; sqrt: batch "
                        "grows with the square root of the voxel ratio")
    g.add_argument("--final-patch", nargs=3, type=_number("patch_axis"), metavar=("X", "Y", "Z"),
                   help="final (inference) patch size" + ("; default: planned from the data" if planned else ""))
    g.add_argument("--pools", nargs=3, type=_number("pools"), metavar=("PX", "PY", "PZ"),
                   help="stride-2 poolings per axis of the network" + ("; default: planned" if planned else ""))
    g.add_argument("--batch-size", type=_number("batch_size"), default=DEFAULT_BATCH_SIZE,
                   help=f"baseline batch size (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--batch-cap", type=_number("batch_cap"), default=None,
                   help="performance mode: largest batch allowed")
    g.add_argument("--stages", type=_number("stages"), default=4, help="parametric: number of stages (default 4)")
    g.add_argument("--growth", type=_number("growth"), default=None,
                   help="parametric: side-length growth per stage (default 1.5)")
    g.add_argument("--start-fraction", type=_number("start_fraction"), default=None,
                   help="parametric: first patch side as a fraction of the final (instead of --growth)")
    g.add_argument("--length-ratio", type=_number("length_ratio"), default=1.0,
                   help="parametric: each stage is this many times longer than the one before")
    g.add_argument("--final-fraction", type=_number("final_fraction"), default=None,
                   help="parametric: share of all epochs spent at the final patch size")
    g.add_argument("--lengths", nargs="+", type=_number("lengths"), metavar="L", default=None,
                   help="parametric: one length per stage, fractions summing to 1 or epochs summing to --epochs "
                        "(instead of --length-ratio and --final-fraction)")
    g.add_argument("--growth-shape", choices=list(sch.GROWTH_SHAPES), default="geometric",
                   help="parametric: geometric (side times --growth per stage) or linear (same length added per "
                        "stage)")
    g.add_argument("--family", choices=list(sch.FAMILIES), default="staged",
                   help="parametric: staged (stages in order) or random (each iteration draws a stage's patch)")


def _explicit_dests(argv: list[str]) -> set[str]:
    """The options given on the command line (argparse's defaults left out), whatever their spelling
    (``--flag value``, ``--flag=value``, an abbreviation): to refuse flags a command would ignore."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        p._defaults = {}  # noqa: SLF001 (set_defaults of each subcommand)
        for action in p._actions:  # noqa: SLF001
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                parsers.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


PARAMETRIC_FLAGS = ("stages", "growth", "start_fraction", "length_ratio", "final_fraction", "lengths", "growth_shape",
                    "family")
SHAPING_FLAGS = ("mode", "final_patch", "pools", "batch_size", "batch_cap", *PARAMETRIC_FLAGS)


def _check_schedule_flags(a: argparse.Namespace, file_flag: str | None) -> None:
    """Refuse schedule flags the command would ignore, so what trains is what the command line says;
    ``file_flag``: the flag that gave a schedule file (``--schedule``, ``--from``), None without one."""
    given = [f for f in SHAPING_FLAGS if f in getattr(a, "explicit", ())]
    if file_flag and given:
        raise PgpsError(f"{file_flag} FILE fixes the patches, batches and stages; {_flags(given)} would be ignored: "
                        f"drop {'it' if len(given) == 1 else 'them'}, or change the file ('pgps-tune schedule' writes "
                        "one)")
    if (a.preset or "paper") != "parametric" and (parametric := [f for f in given if f in PARAMETRIC_FLAGS]):
        raise PgpsError(f"{_flags(parametric)} shape{'s' * (len(parametric) == 1)} --preset parametric only; add "
                        f"--preset parametric, or drop {'it' if len(parametric) == 1 else 'them'}")
    if "batch_cap" in given and a.mode == "resource":
        raise PgpsError("--batch-cap limits the growing batches of --mode performance or sqrt; resource mode keeps "
                        "the batch constant: add --mode performance, or drop --batch-cap")


def _flags(dests: list[str]) -> str:
    return ", ".join("--" + d.replace("_", "-") for d in dests)


def _build_schedule(a: argparse.Namespace, final: Any, pools: Any, epochs: int) -> sch.Schedule:
    preset = a.preset or "paper"
    # train: the network's own patch rule, so that a paper schedule starts at its smallest legal patch
    multiple_of = patch_multiple(a.network, pools, a.token_size) if "network" in a else None
    if preset == "parametric":
        growth = a.growth
        if growth is None and a.start_fraction is None and a.stages > 1:
            growth = 1.5
        return sch.parametric(
            final, pools, a.batch_size, epochs, stages=a.stages, growth=growth,
            start_fraction=a.start_fraction, length_ratio=a.length_ratio,
            final_fraction=a.final_fraction, mode=a.mode, batch_cap=a.batch_cap, multiple_of=multiple_of,
            lengths=a.lengths, growth_shape=a.growth_shape, family=a.family,
        )
    return sch.preset(preset, final, pools, a.batch_size, epochs, a.mode, a.batch_cap, multiple_of)


def _print_schedule(s: sch.Schedule, fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(s.to_json())
    elif fmt == "yaml":
        sys.stdout.write(s.to_yaml())
    else:
        print(s.table())


def _add_nnunet_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("nnU-Net plans")
    g.add_argument("--nnunet-plans", metavar="PLANS",
                   help="take the final patch, pools and batch size from nnU-Net's plans: nnUNetPlans.json, "
                        "or a dataset id/name in nnUNet_preprocessed (e.g. 4 or Dataset004_Hippocampus)")
    g.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")


def _nnunet_plan(a: argparse.Namespace):
    """The nnU-Net plan named by --nnunet-plans (None without it); refuses flags it would override."""
    if not getattr(a, "nnunet_plans", None):
        if "configuration" in getattr(a, "explicit", ()):
            raise PgpsError("--configuration picks the configuration of --nnunet-plans; without --nnunet-plans it "
                            "would be ignored: add --nnunet-plans PLANS, or drop --configuration")
        return None
    from pgps_tune import nnunet

    given = {"--final-patch": getattr(a, "final_patch", None), "--pools": getattr(a, "pools", None),
             "--batch-size": "batch_size" in getattr(a, "explicit", ())  # also the default's value, given
             or getattr(a, "batch_size", None) not in (None, DEFAULT_BATCH_SIZE)}
    clash = [flag for flag, value in given.items() if value]
    if clash:
        raise PgpsError(f"--nnunet-plans sets the final patch, pools and batch size; drop {', '.join(clash)}")
    return nnunet.read_plans(a.nnunet_plans, a.configuration)


def _data(value: str, raw: bool = True) -> str:
    """A --data argument: a folder, an nnU-Net dataset id/name, or 'synthetic' in any case.

    ``raw``: pgps-tune's loader reads the data, so an nnU-Net dataset must be in nnUNet_raw.
    """
    from pgps_tune.data import SYNTHETIC
    from pgps_tune.nnunet import resolve_data

    if value.lower() == SYNTHETIC and not Path(value).exists():
        return SYNTHETIC
    return resolve_data(value, raw)


# -- commands ---------------------------------------------------------------------


def _schedule_file(path: str, epochs: int | None, flag: str, preset: str | None) -> sch.Schedule:
    """A schedule file, rescaled to ``epochs`` if given."""
    if preset:
        raise PgpsError(f"give either {flag} FILE or --preset, not both")
    s = sch.load(path)
    if epochs is not None and epochs < len(s.stages):
        raise PgpsError(f"--epochs {epochs} cannot rescale {path}: its {len(s.stages)} stages need at least "
                        f"{len(s.stages)} epochs; give --epochs {len(s.stages)} or more")
    return sch.rescale_epochs(s, epochs) if epochs is not None else s


def cmd_schedule(a: argparse.Namespace) -> int:
    if a.out:
        _check_out_file(Path(a.out))
    plan = _nnunet_plan(a)
    _check_schedule_flags(a, "--from" if a.from_file else None)
    if a.from_file:
        s = _schedule_file(a.from_file, a.epochs, "--from", a.preset)
        if plan is not None:
            from pgps_tune.nnunet import check_plan_schedule

            check_plan_schedule(s, plan)
    elif plan is not None:
        a.batch_size = plan.batch_size
        s = _build_schedule(a, plan.final_patch, plan.pools, a.epochs if a.epochs is not None else DEFAULT_EPOCHS)
    else:
        if a.final_patch is None or a.pools is None:
            raise PgpsError("--final-patch X Y Z and --pools PX PY PZ are needed (or --from FILE, --nnunet-plans)")
        s = _build_schedule(a, a.final_patch, a.pools, a.epochs if a.epochs is not None else DEFAULT_EPOCHS)
    if a.out:
        s.save(a.out)
    _print_schedule(s, a.format)
    return 0


def _writable_ancestor(path: Path) -> None:
    """Refuse ``path`` when its nearest existing ancestor is not a folder we may write in."""
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise PgpsError(f"cannot write to {path}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PgpsError(f"cannot write to {path}: {existing} is not writable; choose another --out")


def _check_writable(out: Path, folder: str = "a folder (a new one, or the run to continue)") -> None:
    """Refuse an --out folder that cannot be made or written, creating nothing: it is made when work starts."""
    if out.is_symlink() and not out.exists():
        raise PgpsError(f"--out {out} is a link to {os.readlink(out)}, which does not exist; give {folder}")
    if out.exists() and not out.is_dir():
        raise PgpsError(f"--out {out} is a file; give {folder}")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise PgpsError(f"cannot write to --out {out}: the folder is not writable; choose another --out")
        return
    _writable_ancestor(out)


def _check_out_file(path: Path, what: str = "a file name (.yaml or .json)") -> None:
    """Refuse an --out file that is a folder or cannot be written, before any work."""
    if path.is_dir():
        raise PgpsError(f"--out {path} is a folder; give {what}")
    refuse_special(path, f"--out {path}")
    _writable_ancestor(path)


def _missing(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first (what a command that writes
    ``path`` creates)."""
    missing: list[Path] = []
    p = path.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _missing_parents(out: Any) -> list[Path]:
    """The folders above ``--out`` that do not exist yet, topmost first: a command creates them as it writes."""
    return _missing(Path(out).parent)[::-1] if isinstance(out, str) and out else []


def _note_created(out: str, missing: list[Path]) -> None:
    """Say which of ``missing`` the command created for ``--out``: a mistyped parent does not silently make a tree
    (every command's --out, file or folder, alike)."""
    made = [p for p in missing if p.is_dir()]
    if made:
        below = f" and {len(made) - 1} folder(s) inside it" if len(made) > 1 else ""
        print(f"pgps-tune: note: --out {out}: created the folder {made[0]}{below}, which did not exist",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def _no_empty_folder_left(out: Path | None) -> Iterator[None]:
    """If the command fails, remove the folders it created for ``out`` that hold no file.

    A command that stops on its inputs then leaves nothing behind, while anything it wrote
    (a checkpoint, a started sweep to resume) stays: only empty folders are removed.
    """
    created = _missing(out) if out is not None else []  # out and its missing parents, deepest first
    try:
        yield
    except BaseException:
        for folder in created:
            if folder.is_dir():
                for root, _, _ in os.walk(folder, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(root)  # only ever removes an empty folder
        raise


def _prepare(a: argparse.Namespace, **synthetic: Any):
    from pgps_tune.data import prepare

    return prepare(_data(a.data), cache_root=a.cache_dir, **synthetic)


def _synthetic_args(a: argparse.Namespace, recipe: Recipe | None) -> dict[str, Any]:
    """How train makes --data synthetic: as the recipe's was (case count and shape), else the budget's defaults."""
    from pgps_tune.space import Budget

    if a.data != "synthetic":
        return {}
    d = recipe.data if recipe is not None and recipe.data.synthetic_cases is not None else Budget
    return {"synthetic_cases": d.synthetic_cases, "synthetic_shape": tuple(d.synthetic_shape)}


# TrainConfig fields that train takes as flags (the flag is the field with dashes); their argparse
# default is None, so that only a flag the user gave replaces the schedule file's recipe
TRAIN_FLAGS = ("network", "filters", "res_units", "deep_supervision", "token_size", "feature_size", "hidden_size",
               "augment", "cpu_precision", "optimizer", "lr", "fg_ratio", "seed", "iterations_per_epoch", "val_every",
               "threads", "workers", "max_train_seconds", "device")
SPLIT_FLAGS = ("val_fraction", "split_seed")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _shown(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, list | tuple):
        return " ".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _given_train_flags(a: argparse.Namespace) -> dict[str, Any]:
    """The trainer flags given on the command line, each checked like a file's value."""
    given = {f: getattr(a, f) for f in TRAIN_FLAGS if getattr(a, f, None) is not None}
    return {f: check_train_value(f, v, _flag(f)) for f, v in given.items()}


def _run_settings(a: argparse.Namespace, s: sch.Schedule | None, given: dict[str, Any]) -> TrainConfig:
    """The run's trainer settings: the schedule file's recipe (or the defaults), then the flags given.

    Every flag that changes a recipe value is reported, one line each; the split flags are
    resolved into ``a`` the same way.  A schedule file without a recipe (written before
    recipes) keeps the old behaviour: defaults, plus its searched fg_ratio/lr.
    """
    from pgps_tune.space import Budget

    recipe = s.recipe if s is not None else None
    if recipe is None:
        searched = s.meta.get("trainer") if s is not None else None  # settings a sweep found with it
        searched = searched if isinstance(searched, dict) else {}
        for name in ("fg_ratio", "lr"):
            if name not in given and name in searched:
                given = {**given, name: check_train_value(name, searched[name],
                                                          f"the schedule file's meta.trainer.{name}")}
                if not a.quiet:  # stderr: stdout holds only the run's JSON
                    _note(a, f"train: {name} {given[name]:.4g} from the schedule file (override with {_flag(name)})")
        for f in SPLIT_FLAGS:
            if getattr(a, f) is None:
                setattr(a, f, getattr(Budget, f))
        return TrainConfig(**given)
    file_split = {f: getattr(recipe.data, f) for f in SPLIT_FLAGS}
    overridden = [(f, v, getattr(recipe.train, f)) for f, v in given.items() if v != getattr(recipe.train, f)]
    overridden += [(f, getattr(a, f), file_split[f]) for f in SPLIT_FLAGS
                   if getattr(a, f) is not None and getattr(a, f) != file_split[f]]
    for f, v, was in overridden:
        _note(a, f"train: {_flag(f)} {_shown(v)} overrides the schedule file's {f} {_shown(was)}")
    if a.splits:
        _note(a, f"train: --splits {a.splits} overrides the schedule file's split (val_fraction "
              f"{_shown(file_split['val_fraction'])}, split_seed {file_split['split_seed']})")
    for f in SPLIT_FLAGS:
        if getattr(a, f) is None:
            setattr(a, f, file_split[f])
    cfg = recipe.train.replace(**given)
    if "device" not in given:
        from pgps_tune.trainer import resolve_device

        try:
            resolve_device(cfg.device)
        except PgpsError:
            raise PgpsError(f"the schedule file's recipe trains on {cfg.device}, which this machine lacks; "
                            "add --device cpu (or auto)") from None
    if not a.quiet:
        lr = _shown(cfg.lr) if cfg.lr is not None else f"{cfg.resolved_lr():g} (default)"
        units = f" res units {cfg.res_units}" if cfg.res_units != 1 else ""
        _note(a, f"train: as in the schedule file's recipe (trained on {recipe.data.dataset}): {cfg.network} "
              f"{_shown(cfg.filters)}{units}, {cfg.optimizer} lr {lr}, {cfg.iterations_per_epoch} iterations per "
              f"epoch, augment {cfg.augment}, seed {cfg.seed}, device {cfg.device}, threads {_shown(cfg.threads)}; "
              "flags override")
    return cfg


def _check_widths(network: str, feature_size: int | None, hidden_size: int, given: set[str], source: str) -> None:
    """Refuse a width flag the network does not use, and a width (given or from ``source``) it cannot be built with."""
    for f in ("feature_size", "hidden_size", "res_units"):
        if f in given and network not in WIDTH_NETWORKS[f]:
            widths = (" (its widths are --filters)" if network in ("unet", "dynunet", "dynunet_resenc")
                      and f != "res_units" else "")
            raise PgpsError(f"{_flag(f)} applies to --network {', '.join(WIDTH_NETWORKS[f])}, not {network}"
                            f"{widths}; drop it or change --network")
    def name(f: str) -> str:
        return _flag(f) if f in given else f"{source}'s {f}"

    check_network_widths(network, feature_size, hidden_size, (name("feature_size"), name("hidden_size")))


def _note_other_data(a: argparse.Namespace, recipe: Recipe, ds: Any) -> None:
    """Say so when --data is not what the recipe was trained on (allowed: a schedule may transfer)."""
    d = recipe.data
    if ds.name != d.dataset:
        _note(a, f"train: note: the schedule file's recipe was trained on dataset {d.dataset}, --data is {ds.name}")
        return
    said, done = [n["type"] for n in d.normalisation], [n["type"] for n in ds.normalisation]
    if d.normalisation and said != done:  # the recipe describes the data; train normalises as --data is prepared
        raise PgpsError(f"the schedule file's recipe.data.normalisation says {', '.join(said)} per channel, but "
                        f"--data {ds.name} is prepared as {', '.join(done)} (from its modalities), and train "
                        "normalises as the data are prepared; correct recipe.data.normalisation or delete it")
    if (d.spacing and tuple(ds.spacing) != d.spacing) or (
            d.normalisation and [dict(n) for n in ds.normalisation] != list(d.normalisation)):
        _note(a, f"train: note: --data is {ds.name} as in the recipe, but preprocessed differently (spacing or "
              "normalisation); its Dice will differ from the sweep's")


def _note_nnunet_data(a: argparse.Namespace, meta: dict[str, Any], ds: Any) -> None:
    """Say so when --data is not what a schedule tuned by nnU-Net's trials (``budget.trainer: nnunet``; no recipe:
    nnU-Net trained it) was tuned on: another dataset, or data at another spacing than nnU-Net's configuration
    (``meta.nnunet``, the record ``export`` and ``best`` write), e.g. 3d_lowres's coarser data.  Notes, as for a
    recipe (a schedule may transfer): train prepares --data itself, whatever configuration it was tuned on."""
    on = meta.get("nnunet")
    if not isinstance(on, dict) or on.get("trainer", "nnunet") != "nnunet":
        return
    if ds.name not in {str(meta.get("dataset", "")), str(on.get("dataset", ""))}:
        _note(a, f"train: note: the schedule file was tuned by nnU-Net's trials on dataset {meta.get('dataset')}, "
              f"--data is {ds.name}")
        return
    from pgps_tune.nnunet import spacing_text, valid_spacing

    was = on.get("spacing")
    if valid_spacing(was) and not all(math.isclose(float(v), float(w), rel_tol=1e-3) for v, w in zip(was, ds.spacing)):
        _note(a, f"train: note: the schedule file's trials trained nnU-Net's {on.get('configuration')} data "
              f"(spacing {spacing_text(was)}, x y z), but train prepares --data {ds.name} at spacing "
              f"{spacing_text(ds.spacing)}: its patches cover another extent, and its Dice will differ from the "
              "sweep's")


def _note(a: argparse.Namespace, line: str) -> None:
    """A line for stderr that train holds back until its checks passed, so that bad input gets its error line
    alone (a command that does not collect notes prints it at once)."""
    notes = getattr(a, "notes", None)
    if notes is None:
        print(line, file=sys.stderr, flush=True)
    else:
        notes.append(line)


def _flush_notes(a: argparse.Namespace) -> None:
    for line in getattr(a, "notes", None) or ():
        print(line, file=sys.stderr, flush=True)
    a.notes = None


TRAIN_LOCK = ".pgps-train.lock"  # held while a train command writes its run folder (removed at the end)


def cmd_train(a: argparse.Namespace) -> int:
    """One train command at a time per run folder: a second one (the same --out typed twice, a --resume while
    the run goes on) would write the same checkpoint and files."""
    from pgps_tune.errors import folder_lock

    out = Path(a.out)
    _check_writable(out)
    with folder_lock(out, TRAIN_LOCK, f"{out} is in use by another pgps-tune train ({{holder}}); wait for it to "
                     "end or stop it (Ctrl-C), then continue with --resume", lambda: False):
        return _train(a)


def _train(a: argparse.Namespace) -> int:
    import signal
    import threading

    from pgps_tune.data import plan_patch, split
    from pgps_tune.trainer import (
        CHECKPOINT,
        METRICS,
        TensorBoardLog,
        Trainer,
        check_batch_memory,
        discard_unstarted_run,
        resolve_device,
    )

    a.notes = []  # held back until the checks passed (_flush_notes)
    given = _given_train_flags(a)  # refused before anything is written
    _check_schedule_flags(a, "--schedule" if a.schedule else None)
    if a.splits and (ignored := [f for f in ("val_fraction", "split_seed") if f in getattr(a, "explicit", ())]):
        raise PgpsError(f"--splits FILE gives the train/validation split; {_flags(ignored)} would be ignored: drop "
                        f"{'it' if len(ignored) == 1 else 'them'}")
    if a.splits and _data(a.data) != "synthetic":  # its case ids, before the data are prepared
        from pgps_tune.data import check_splits_file

        check_splits_file(_data(a.data), a.splits)
    if "device" in given:
        resolve_device(given["device"])
    out = Path(a.out)
    has_run = (out / CHECKPOINT).is_file()
    if a.resume and not has_run:
        raise PgpsError(f"--resume given but {out / CHECKPOINT} does not exist; run without --resume to start")
    if has_run and not a.resume:
        raise PgpsError(f"{out} already holds a run; add --resume to continue it, or choose a new --out")
    if not has_run and (out / CHECKPOINT).exists():
        raise PgpsError(f"{out / CHECKPOINT} is not a file (a folder?); move it away, or choose a new --out")
    if not has_run and (out / METRICS).exists():
        raise PgpsError(f"{out} holds a run's {METRICS} but no {CHECKPOINT} to continue from; choose a new --out, "
                        "or move that run's files away")
    # Ctrl-C and SIGTERM (a scheduler's stop, `kill`) stop the run at the next iteration boundary,
    # keeping the last checkpoint; before training starts, or at a second signal, at once
    signals: list[int] = []
    trainer = None

    def on_stop(signum: int, frame: Any) -> None:
        signals.append(signum)
        if trainer is None or len(signals) > 1:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    nn_plan = _nnunet_plan(a)
    if nn_plan is not None and a.schedule:  # refused before anything is written
        from pgps_tune.nnunet import check_plan_schedule

        check_plan_schedule(sch.load(a.schedule), nn_plan)
    try:
        _check_writable(out)
        synthetic: dict[str, Any] = {}
        if a.schedule:
            s = _schedule_file(a.schedule, None, "--schedule", a.preset)
            if a.epochs is not None and a.epochs != s.epochs:
                _note(a, f"train: --epochs {a.epochs} rescales the schedule file's {s.epochs} epochs")
                s = sch.rescale_epochs(s, a.epochs)
            cfg = _run_settings(a, s, given)
            _check_widths(cfg.network, cfg.feature_size, cfg.hidden_size, set(given), "the schedule file's recipe")
            check_filters(cfg.network, s.pools, cfg.filters, "--filters" if "filters" in given else
                          "the schedule file's recipe.train.filters" if s.recipe else "the default --filters")
            synthetic = _synthetic_args(a, s.recipe)
            ds = _prepare(a, **synthetic)
            if s.recipe is not None:
                _note_other_data(a, s.recipe, ds)
            else:
                _note_nnunet_data(a, s.meta, ds)
        else:
            cfg = _run_settings(a, None, given)
            _check_widths(cfg.network, cfg.feature_size, cfg.hidden_size, set(given), "the defaults")
            a.network, a.token_size = cfg.network, cfg.token_size  # the network's patch rule shapes the schedule
            synthetic = _synthetic_args(a, None)
            if nn_plan is not None:
                a.batch_size = nn_plan.batch_size
                s = _build_schedule(a, nn_plan.final_patch, nn_plan.pools,
                                    a.epochs if a.epochs is not None else DEFAULT_EPOCHS)
                ds = _prepare(a, **synthetic)
            else:
                ds = _prepare(a, **synthetic)
                plan = plan_patch(ds.median_shape, ds.spacing, voxel_budget=a.voxel_budget)
                final = tuple(a.final_patch) if a.final_patch else plan.final_patch
                pools = tuple(a.pools) if a.pools else plan.pools
                s = _build_schedule(a, final, pools, a.epochs if a.epochs is not None else DEFAULT_EPOCHS)
        check_batch_memory(s, cfg, "lower --batch-size (or --batch-cap, or the batch sizes of the schedule file)")
        _note_padding(a, s, ds)
        train_cases, val_cases = split(ds, a.val_fraction, a.split_seed, a.splits)
        # the run's own schedule.yaml carries what this run trains with, so it can train it again
        # (a --splits file is not a recipe's split: that run's recipe is left out)
        source = a.data if a.data == "synthetic" else str(Path(_data(a.data)).resolve())
        recipe = None if a.splits else Recipe(cfg, DataIdentity.of(ds, source, a.val_fraction, a.split_seed,
                                                                   **synthetic))
        s = dataclasses.replace(s, recipe=recipe)
        progress = _TrainProgress(progress_mode(a.progress, a.quiet))
        tensorboard = TensorBoardLog(out / "tensorboard")

        def report(r: dict[str, Any]) -> None:
            tensorboard(r)
            progress(r)

        trainer = Trainer(ds, train_cases, val_cases, s, cfg, out, callback=report)
        if progress.mode != "none":
            trainer.on_epoch = progress.epoch
        _flush_notes(a)
        try:
            metrics = trainer.fit(resume=a.resume)
        finally:
            progress.close()
            tensorboard.close()
    except KeyboardInterrupt:
        cause = "stopped by SIGTERM" if signal.SIGTERM in signals else "interrupted"
        saved = trainer.saved_iteration if trainer is not None else None
        if saved is None:
            discard_unstarted_run(trainer)
            message = f"{cause} before the first checkpoint; nothing to resume: rerun the same command to start again"
        else:
            message = (
                f"{cause} at iteration {trainer.state.iteration}; the checkpoint of iteration {saved} in {out} "
                "is intact: rerun the same command with --resume added to continue"
            )
        exc = Interrupted(message)
        exc.exit_code = 128 + (signals[0] if signals else signal.SIGINT)  # 143 for SIGTERM, 130 for Ctrl-C
        raise exc from None
    except PgpsError:
        discard_unstarted_run(trainer)  # a run that never checkpointed leaves nothing behind
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        trainer.write_metrics()
        _write_learning_curve(out)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, raised as one) once training had ended
        ended = "finished" if metrics["completed"] else "stopped at --max-train-seconds"
        raise Interrupted(f"interrupted after the run had {ended}: its checkpoint and metrics.json in {out} are "
                          "complete; its learning curve may be missing: rerun the same command with --resume added "
                          "to draw it") from None
    if not metrics["completed"]:  # stopped by --max-train-seconds (a stop by a signal raised above)
        limit, done, total = trainer.cfg.max_train_seconds, metrics["iterations"], metrics["total_iterations"]
        print(f"train: stopped at --max-train-seconds {limit:g} after iteration {done} of {total}; the run in {out} "
              "continues with --resume (and a larger limit)", file=sys.stderr)
    print(strict_json(_rounded({k: metrics[k] for k in (
        "val_dice", "val_dice_per_class", "best_val_dice", "wall_time_s", "train_time_s",
        "voxel_fraction", "iterations", "completed")})))
    return 0


def _note_padding(a: argparse.Namespace, s: sch.Schedule, ds: Any) -> None:
    """Say so (one line) when the final patch is larger than every case along an axis: that much of every
    patch is padding, computed and never learnt from."""
    largest = [max(shape[ax] for shape in ds.shapes) for ax in range(3)]
    axes = [ax for ax in range(3) if s.final_patch[ax] > largest[ax]]
    if axes:
        _note(a, f"train: warning: the final patch {'x'.join(map(str, s.final_patch))} is larger than every case "
              f"along axis {', '.join(map(str, axes))} (the largest is {'x'.join(map(str, largest))}): the rest of "
              "every patch is padding; a smaller --final-patch trains as well for less ('pgps-tune plan' gives one)")


def _rounded(v: Any) -> Any:
    """Floats to 4 significant digits, for JSON a person reads (the files written keep full precision).

    >>> _rounded({"dice": 0.876512345, "n": 3, "t": [451.2345, float("nan")]})
    {'dice': 0.8765, 'n': 3, 't': [451.2, nan]}
    """
    if isinstance(v, float):
        return float(f"{v:.4g}") if math.isfinite(v) else v
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_rounded(x) for x in v]
    return v


def _write_learning_curve(run: Path) -> None:
    """The run's learning-curve PNG; a missing plotting library costs the figure, never the finished run."""
    from pgps_tune.report import write_run_curve

    try:
        print(f"learning curve: {write_run_curve(run)}", file=sys.stderr)
    except PgpsError as exc:
        print(f"pgps-tune: note: no learning curve written: {exc}", file=sys.stderr)


PROGRESS = ("auto", "live", "lines", "json", "none")
AUTOSCALING_HELP = ("with --address: the cluster's autoscaler starts nodes when trials wait, so no live node "
                    "need fit a trial (node types the autoscaler reported are checked all the same)")
PENDING_HELP = ("with --address: seconds trials may wait, none running, while no node of the cluster can run one "
                "(a node left, or the autoscaler starts none) before the sweep stops, its state kept for --resume "
                "(default 120, 900 with --autoscaling)")


def progress_mode(choice: str, quiet: bool, stream: Any = None) -> str:
    """The progress mode to use: --quiet is none; auto is live on a terminal, plain lines elsewhere."""
    if quiet:
        return "none"
    if choice == "auto":
        stream = stream or sys.stderr
        return "live" if stream.isatty() else "lines"
    return choice


class _TrainProgress:
    """A train run's progress on stderr: a bar on a terminal (live), plain lines, or JSON lines.

    Two trainer hooks feed it: :meth:`epoch` (every epoch's end) and the call (every validation).
    """

    def __init__(self, mode: str, stream: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode, self.stream, self.clock = mode, stream or sys.stderr, clock
        self.last_val: dict[str, Any] = {}
        self.drawn = False
        self.t0, self.first_epoch = clock(), None  # the time left is measured from here, validations included

    def _emit(self, text: str, end: str = "\n") -> None:
        self.stream.write(text + end)
        self.stream.flush()

    def epoch(self, r: dict[str, Any]) -> None:
        from pgps_tune.report import bar, duration

        patch = "x".join(map(str, r["patch_size"]))
        where = f"epoch {r['epoch']}/{r['epochs']}  stage {r['stage'] + 1}/{r['stages']} ({patch})"
        if self.mode == "json":
            self._emit(strict_json(_rounded({"event": "epoch", **r}), indent=None))
        elif self.mode == "lines":
            self._emit(f"{where}  loss {r['train_loss']:.4f}  train {r['train_time_s']:.1f}s")
        elif self.mode == "live":
            if self.first_epoch is None:  # a resumed run starts at a later epoch
                self.first_epoch = r["epoch"]
            done = r["epoch"] - self.first_epoch + 1
            left = (self.clock() - self.t0) / done * (r["epochs"] - r["epoch"])
            dice = f"  Dice {self.last_val['val_dice']:.3f}" if "val_dice" in self.last_val else ""
            self._emit(f"\r\x1b[K{bar(r['epoch'] / r['epochs'])} {where}  loss {r['train_loss']:.3f}{dice}  "
                       f"{duration(left)} left", end="")
            self.drawn = r["epoch"] < r["epochs"]
            if not self.drawn:
                self._emit("")

    def __call__(self, r: dict[str, Any]) -> None:
        self.last_val = r
        if self.mode == "json":
            keep = ("epoch", "iteration", "stage", "patch_size", "train_loss", "val_dice", "best_val_dice",
                    "val_dice_per_class", "train_time_s", "baseline_equivalent_iterations", "completed")
            self._emit(strict_json(_rounded({"event": "validation", **{k: r[k] for k in keep}}), indent=None))
        elif self.mode == "lines":
            self._emit(f"  validation at epoch {r['epoch']}: Dice {r['val_dice']:.4f} (best {r['best_val_dice']:.4f})")

    def close(self) -> None:
        if self.drawn:  # a stopped run leaves the bar's line unfinished
            self._emit("")


def cmd_evaluate(a: argparse.Namespace) -> int:
    from pgps_tune import predict as pr
    from pgps_tune.data import SYNTHETIC, discover
    from pgps_tune.trainer import evaluate_run

    pre = pr.run_preprocessing(a.run)  # the run is checked before the data are prepared
    ds = _prepare(a)
    relabel, renumbered = pr.relabelling(pre, ds)
    cases, scored = pr.evaluation_cases(a.run, ds, a.all_cases)
    synthetic = _data(a.data) == SYNTHETIC
    files = [] if synthetic else [discover(_data(a.data)).cases[i] for i in cases]
    spacing = f"{'x'.join(f'{v:.3g}' for v in pre['spacing'])} mm"
    if not pr.same_preprocessing(pre, ds):  # another spacing or normalisation than the run's training data
        if synthetic:
            raise PgpsError("the synthetic data are prepared at another spacing or normalisation than the run's "
                            "training data; evaluate on a dataset folder")
        why = (f"resampled to the run's spacing {spacing}, normalised as its training data) and scored on its own "
               "grid: this data's preprocessing differs from the run's")
    elif resampled := pr.resampled_cases(files, ds.spacing):  # their cached labels are not on their files' grid
        more = f" and {len(resampled) - 2} more" if len(resampled) > 2 else ""
        why = (f"resampled to the run's spacing {spacing} and back) and scored against its label file: "
               f"{', '.join(resampled[:2])}{more} {'is' if len(resampled) == 1 else 'are'} at another spacing than the "
               "run's")
    else:
        why = ""
    if why:  # score as predict segments
        result = pr.evaluate_files(a.run, files, a.device, a.mirror, relabel=relabel)
        scored += f", each segmented as predict does ({why}"
    else:
        result = evaluate_run(a.run, ds, a.device, cases=cases, mirror=a.mirror, relabel=relabel)
    if renumbered:
        scored += f"; {renumbered}"
    print(strict_json(_rounded({"scored": scored, "mirrored": a.mirror, **result,
                                "case_ids": [ds.case_ids[i] for i in cases]})))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from pgps_tune.predict import predict

    _check_writable(Path(a.out), "a folder for the segmentations (a new one, or an existing one)")
    existed = set()
    if a.skip_existing:
        out = Path(a.out)
        existed = {p for p in out.iterdir() if p.is_file()} if out.is_dir() else set()
    try:
        written = predict(a.run, a.input, a.out, a.device, mirror=a.mirror, overwrite=a.overwrite,
                          progress=None if a.quiet else lambda line: print(line, file=sys.stderr, flush=True),
                          skip_existing=a.skip_existing)
    except KeyboardInterrupt as exc:  # outputs are written whole: say what the folder holds and how to go on
        cause = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if a.overwrite:
            rest = ("those of the cases not reached still hold what was there before: rerun the same command to "
                    "replace them all")
        else:
            rest = "rerun the same command" + ("" if a.skip_existing else " with --skip-existing added") + \
                " to segment only the cases left"
        raise Interrupted(f"{cause}; every output in {a.out} is complete (each is written whole); {rest}") from None
    skipped = [p for p in written if p in existed]
    print(json.dumps({"cases": len(written), "outputs": [str(p) for p in written],
                      **({"skipped": len(skipped)} if a.skip_existing else {})}, indent=1))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from pgps_tune.data import plan_patch

    nn_plan = _nnunet_plan(a)
    if nn_plan is not None:  # nnU-Net's plan of nnU-Net's preprocessed data: pgps-tune's loader is not run
        from pgps_tune import nnunet

        if unused := [f"--{d.replace('_', '-')}" for d in ("cache_dir", "voxel_budget") if d in a.explicit]:
            raise PgpsError(f"with --nnunet-plans, plan shows nnU-Net's plan of its preprocessed data: nothing uses "
                            f"{' or '.join(unused)}; drop {'it' if len(unused) == 1 else 'them'}")
        if a.data and (note := nnunet.unread_data(_data(a.data, raw=False), nn_plan, "plan shows")) is not None:
            print(f"pgps-tune: note: {note}", file=sys.stderr)
        print(json.dumps(_rounded({**nnunet.planned_dataset(nn_plan), "final_patch": list(nn_plan.final_patch),
                                   "pools": list(nn_plan.pools), "nnunet": nn_plan.describe()}), indent=1))
        return 0
    if not a.data:
        raise PgpsError("plan needs --data DIR (a dataset folder, an nnU-Net dataset id, or synthetic), or "
                        "--nnunet-plans PLANS")
    ds = _prepare(a)
    plan = plan_patch(ds.median_shape, ds.spacing, voxel_budget=a.voxel_budget)
    print(json.dumps(_rounded({
        "dataset": ds.name, "cases": len(ds), "median_shape": list(ds.median_shape),
        "spacing": list(ds.spacing), "final_patch": list(plan.final_patch), "pools": list(plan.pools),
        "cache": str(ds.cache_dir),
    }), indent=1))
    return 0


def _space_path(name: str) -> Path:
    """A --space argument: a file, or the name of a shipped space (unknown names list the shipped ones)."""
    from pgps_tune.space import resolve

    return resolve(name)


# Space budget fields that tune and demo take as flags (the flag is the field with dashes)
BUDGET_FLAGS = ("epochs", "iterations_per_epoch", "batch_size", "val_every", "network", "token_size", "feature_size",
                "hidden_size", "augment", "cpu_precision", "filters", "res_units", "optimizer", "lr", "fg_ratio",
                "seed", "val_fraction", "split_seed", "final_patch", "pools")


def _with_budget_flags(a: argparse.Namespace, space: SearchSpace) -> SearchSpace:
    """The space with the budget flags given on the command line in place of its budget values."""
    import dataclasses

    given = {f: getattr(a, f) for f in BUDGET_FLAGS if getattr(a, f, None) is not None}
    if not given:
        return space
    given = {f: tuple(v) if isinstance(v, list) else v for f, v in given.items()}
    if not a.quiet:
        shown = ", ".join(f"{f} {' '.join(map(str, v)) if isinstance(v, tuple) else v}" for f, v in given.items())
        print(f"budget from the command line: {shown} (in place of {space.source}'s)", file=sys.stderr)
    b = dataclasses.replace(space.budget, **given)
    _check_widths(b.network, b.feature_size, b.hidden_size, set(given), f"{space.source}: budget")
    return dataclasses.replace(space, budget=b)


# Space confirm fields that tune and demo take as flags (--confirm-top-k, ...), and --no-confirm
CONFIRM_FLAGS = ("top_k", "seeds", "folds", "splits", "epochs")


def _with_confirm_flags(a: argparse.Namespace, space: SearchSpace) -> SearchSpace:
    """The space with the confirmation flags given on the command line in place of its confirm section."""
    import dataclasses

    from pgps_tune.space import check_nnunet_splits, check_splits_exists

    given = {f: getattr(a, f"confirm_{f}") for f in CONFIRM_FLAGS if getattr(a, f"confirm_{f}", None) is not None}
    if a.no_confirm:
        given["enabled"] = False
    if given.get("seeds") is not None and (given.get("folds") or given.get("splits")):
        raise PgpsError("give --confirm-seeds or --confirm-folds/--confirm-splits, not both")
    if "seeds" in given:  # the command line's choice of repeats replaces the file's
        given.update(folds=None, splits=None)
    check_nnunet_splits(space.budget.trainer, given.get("splits") and given.get("enabled", True),
                        f"--confirm-splits (with {space.source}'s budget.trainer nnunet)", "--confirm-splits")
    check_splits_exists(given.get("splits"), "--confirm-splits", "give the path of an existing splits file")
    if given.get("splits"):  # stored with the sweep and read by trials in their own folders: made absolute here
        given["splits"] = str(Path(given["splits"]).resolve())
    return dataclasses.replace(space, confirm=dataclasses.replace(space.confirm, **given)) if given else space


def cmd_report(a: argparse.Namespace) -> int:
    from pgps_tune.report import check_page_target, write_report

    if a.out:
        _check_out_file(Path(a.out), "a .html file name")
        check_page_target(Path(a.out), Path(a.path))  # before the page is made (figures take seconds)
    print(write_report(a.path, a.out))
    return 0


TRIALS_SHOWN = 50  # rows 'trials' prints as a table unless --limit says otherwise: a screenful, not 2,000 lines


def cmd_trials(a: argparse.Namespace) -> int:
    import csv

    from pgps_tune.report import TRIAL_COLUMNS, fmt, params_text, plural, read_trials, select_trials, table_columns

    everything = read_trials(a.sweep)
    rows = select_trials(everything, a.sort, a.phase, a.status, a.reverse)
    limit = a.limit if a.limit is not None else TRIALS_SHOWN if a.format == "table" else 0
    selected, rows = len(rows), rows[:limit] if limit else rows
    every = list(rows[0]) if rows else list(TRIAL_COLUMNS)
    summary = table_columns(everything) if everything else list(TRIAL_COLUMNS)
    columns = a.columns.split(",") if a.columns else (summary if a.format == "table" else every)
    if "" in (c.strip() for c in columns):
        raise PgpsError(f"--columns {a.columns!r} has an empty name (two commas, or one at an end); give names "
                        f"separated by single commas, from {', '.join(every)}")
    columns = [c.strip() for c in columns]
    unknown = [c for c in columns if rows and c not in rows[0]]
    if unknown:
        raise PgpsError(f"--columns: {', '.join(unknown)} not in trials.parquet; use some of {', '.join(every)}")
    if a.format == "json":
        clean = [{c: None if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in columns} for r in rows]
        print(json.dumps(clean, indent=1))
    elif a.format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in columns] for r in rows])
    else:
        cells = [[params_text(r[c]) if c == "params" else fmt(r[c]) for c in columns] for r in rows]
        widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
        for line in [columns, *cells]:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        shown = plural(len(rows), "trial") + (f" of {len(everything)}" if len(rows) < len(everything) else "")
        print(shown, file=sys.stderr)
    if len(rows) < selected:  # csv and json too: a cut file must not pass for the whole selection
        print(f"pgps-tune: note: printed the first {len(rows)} of {plural(selected, 'selected trial')}; --limit 0 "
              "prints every one", file=sys.stderr)
    return 0


def _bound_ray_connect(address: str | None) -> None:
    """With ``--address``: Ray waits minutes on an address where nothing answers; these bound it to seconds.
    Ray reads them when its core library starts, so this comes before anything imports it."""
    if address:
        for key, value in {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "3",
                           "RAY_gcs_rpc_server_connect_timeout_s": "1"}.items():
            os.environ.setdefault(key, value)


def _sweep(a: argparse.Namespace, space_file: str, data: str, out: str) -> int:
    from pgps_tune import space as sp

    _bound_ray_connect(a.address)
    from pgps_tune.tuner import SweepInterrupted, SweepOptions, TrialsUnplaced, sweep

    space = _with_confirm_flags(a, _with_budget_flags(a, sp.load(_space_path(space_file))))
    if (nn_plan := _nnunet_plan(a)) is not None:
        from pgps_tune.nnunet import plan_space

        space = plan_space(space, nn_plan)
    data = _data(data, raw=space.budget.trainer != "nnunet")  # nnU-Net's trials need only its preprocessed data
    opts = SweepOptions(
        space=space, data=data, out=Path(out), num_samples=a.num_samples, max_concurrent=a.max_concurrent,
        cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial, address=a.address,
        autoscaling=a.autoscaling, pending_timeout=a.pending_timeout,
        storage=a.storage, resume=a.resume, cache_root=a.cache_dir, results_store=a.results_store,
        quiet=a.quiet, max_failures=a.max_failures, warm_start=getattr(a, "warm_start", False),
        progress=progress_mode(a.progress, a.quiet), mlflow=a.mlflow,
        nnunet_plans=nn_plan, nnunet_configuration=getattr(a, "configuration", "3d_fullres"),
    )
    _check_writable(Path(out))
    try:
        summary = sweep(opts)
    except SweepInterrupted as exc:
        started = (Path(out) / "sweep.json").is_file()
        print(f"pgps-tune: interrupted by {exc}; "
              + (f"finished trials and checkpoints in {out} are kept and "
                 + ("its exports may be incomplete (the interrupt came while they were written)" if exc.exporting
                    else "nothing was exported") + "; resume with:"
                 if started else "the sweep had not started; run it again with:"), file=sys.stderr)
        print(_command_line(a, resume=started), file=sys.stderr, flush=True)
        return 128 + exc.signum
    except TrialsUnplaced as exc:  # stopped as an interrupt stops it: the sweep.json it wrote says unfinished
        raise PgpsError(f"{exc}; the sweep stopped with its finished trials and checkpoints kept in {out}: once the "
                        f"cluster can run its trials, resume with: {_command_line(a, resume=True)}") from None
    try:
        _print_summary(summary, Path(out), _write_sweep_report(Path(out)))
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, raised as one) while the page was drawn or the outcome printed
        raise Interrupted(f"interrupted after the sweep had finished: it is exported in {out} (best_schedule.yaml, "
                          f"trials.parquet, summary.json); its page may be missing: write it with "
                          f"'pgps-tune report {out}'") from None
    if summary.get("trials") and not summary.get("best"):  # `tune ... && use best_schedule.yaml` must not go on
        raise PgpsError(_no_best(summary, Path(out)))
    return 0


def _no_best(summary: dict[str, Any], out: Path) -> str:
    """Why a finished sweep exported no best schedule, with its most frequent trial error and where the rest are."""
    from pgps_tune.report import error_groups, read_trials

    errors = [(error, len(ids)) for error, ids in error_groups(read_trials(out)) if error]
    counts = (f"{summary.get('failed', 0)} of {summary.get('trials', 0)} trial(s) failed, "
              f"{summary.get('stopped_early', 0)} stopped early")
    why = "".join(f"; the most frequent error ({n}x): {error}" for error, n in errors[:1])
    what = ("no trial completed" if not summary.get("completed") else
            f"none of the {summary['completed']} completed trial(s) has a score at the full budget")
    return (f"{what} ({counts}), so {out} holds no best schedule{why}; fix that and run the sweep again (every "
            f"trial's error: 'pgps-tune trials {out} --status failed --columns trial_id,error --limit 0')")


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


def _print_summary(summary: dict[str, Any], out: Path, report: Path | None = None, sweep: Path | None = None) -> None:
    """The sweep's outcome (the same sentences as its HTML page), the best schedule, and where the files are
    (``sweep``: the sweep's folder where the exports went elsewhere)."""
    from pgps_tune.report import summary_lines

    first, *rest = summary_lines(summary, sweep or out)
    print(f"sweep {summary['sweep']} on {summary['dataset']}: {first}")
    for line in rest:
        print(f"  {line}")
    if "confirmation" in summary:
        _print_confirmation(summary)
    if front := summary.get("pareto"):
        print(f"  Pareto front: {len(front['front'])} schedules in {out / 'pareto.parquet'} and {out / 'pareto'}/; "
              f"best by the rule {front['pick']}")
    best_file = out / "best_schedule.yaml"
    if summary.get("best") and best_file.is_file():
        print(sch.load(best_file).table())
        print(f"schedule: {best_file}  trials: {out / 'trials.parquet'}")
    if report is not None:
        print(f"report: {report}")


def _write_sweep_report(out: Path) -> Path | None:
    """The finished sweep's HTML page; a figure that cannot be drawn costs the page, never the sweep."""
    from pgps_tune.report import write_report

    try:
        return write_report(out)
    except PgpsError as exc:
        print(f"pgps-tune: note: no report written: {exc}", file=sys.stderr)
    except Exception as exc:  # the sweep is exported: a page that fails says so, with how to retry
        log = _crash_log(sys.argv[1:])
        first = (str(exc).splitlines() or [""])[0][:160]
        print(f"pgps-tune: note: no report written ({type(exc).__name__}: {first}; traceback in {log}); "
              f"the sweep is exported; retry with 'pgps-tune report {out}'", file=sys.stderr)
    return None


def _num(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _print_confirmation(summary: dict[str, Any]) -> None:
    """The confirmation's table (mean ± sd per schedule, paired differences) and its verdict in words."""
    from pgps_tune.results import confirmation_question, reference_order, search_check, shown_test
    from pgps_tune.space import over_voxel_budget

    c = summary["confirmation"]
    if not c["schedules"]:  # nothing was confirmed: no table of nothing
        print(f"confirmation: {c['verdict']}")
        return
    references = reference_order(e["role"] for e in c["schedules"].values())  # a column for each
    print(f"confirmation: {len(c['repeats'])} {c['repeat']}s per schedule, {c['epochs']} epochs")
    heads = [f"vs {role}" + (" (95% interval, p)" if not i else "") for i, role in enumerate(references)]
    print((f"  {'schedule':<16} {'n':>2} {'Dice mean':>9} {'sd':>7}  " + " ".join(f"{h:<38}" for h in heads)).rstrip())
    for name, e in c["schedules"].items():
        tests = []
        for role in references:  # the test the verdict uses (cheapest_within's against the baseline: 'within?')
            t = shown_test(e, role)
            tests.append("" if t is None else f"{_num(100 * t['mean_diff'], '+.2f')} "
                         f"[{_num(100 * t['ci_low'], '+.2f')}, {_num(100 * t['ci_high'], '+.2f')}] "
                         f"p={_num(t['p_value'], '.3g')}")
        label = name + (" *" if name == c["winner"] else "")
        print((f"  {label:<16} {e['dice']['n']:>2} {_num(e['dice']['mean']):>9} {_num(e['dice']['sd']):>7}  "
               + " ".join(f"{t:<38}" for t in tests)).rstrip())
    print(f"  (* the confirmed winner; differences in Dice points, paired by {c['repeat']})")
    if question := confirmation_question(c, summary.get("objective")):
        print(f"  p-values: {question}")
    if "tolerance" in c:
        print(f"  cheapest_within: each {c['repeat']} is scored against the baseline's Dice on that {c['repeat']} "
              f"less {c['tolerance']:g}")
    if (check := search_check(summary)) is not None:
        print(f"  {check}")
    # the objective's answer (a summary from before it: the Dice test's, which was then its only one); a
    # dice_under_budget winner over the budget may be significantly better: it is not the test that failed
    over = c["winner"] is not None and over_voxel_budget(summary.get("objective") or {},
                                                         c["schedules"][c["winner"]]["schedule_voxel_fraction"])
    met = c.get("objective_met", c["significantly_better_than_baseline"])
    print(("" if met else "OVER THE VOXEL BUDGET: " if over else "NOT SIGNIFICANT: ") + c["verdict"])


def cmd_tune(a: argparse.Namespace) -> int:
    return _sweep(a, a.space, a.data, a.out)


def cmd_demo(a: argparse.Namespace) -> int:
    rc = _sweep(a, "smoke", "synthetic", a.out)
    best = Path(a.out) / "best_schedule.yaml"
    if rc == 0 and best.is_file():
        print()
        sys.stdout.write(best.read_text())
    page = Path(a.out) / "report.html"
    if rc == 0 and page.is_file():
        print(f"\nopen in a browser: {page.resolve().as_uri()}")
    return rc


def cmd_export(a: argparse.Namespace) -> int:
    from pgps_tune.results import pick_rule, read_meta

    _check_writable(Path(a.out))  # creates nothing
    meta = read_meta(a.experiment)
    _require_finished(a.experiment, meta, "export")  # refused before Ray is imported and before --out is made
    pick_rule(meta, a.pick)  # a bad --pick too
    from pgps_tune.tuner import export

    nn_export = None
    if a.nnunet:
        from pgps_tune import nnunet

        # every --nnunet check before anything is written
        counts = {"num_epochs": a.epochs, "num_iterations_per_epoch": a.iterations_per_epoch,
                  "num_val_iterations_per_epoch": a.val_iterations_per_epoch}
        nn_export = nnunet.prepare_export(a.experiment, a.nnunet, a.configuration, a.trainer, pick=a.pick,
                                          other_dataset=a.other_dataset,
                                          other_configuration=a.other_configuration, counts=counts)
    elif ignored := [f"--{d.replace('_', '-')}" for d in ("configuration", "trainer", "other_dataset",
                                                          "other_configuration", "epochs", "iterations_per_epoch",
                                                          "val_iterations_per_epoch")
                     if d in getattr(a, "explicit", ())]:
        raise PgpsError(f"{', '.join(ignored)} {'goes' if len(ignored) == 1 else 'go'} with --nnunet PLANS; without "
                        f"it nothing would use {'it' if len(ignored) == 1 else 'them'}: add --nnunet PLANS, or drop "
                        f"{'it' if len(ignored) == 1 else 'them'}")
    _check_writable(Path(a.out))
    summary = export(a.experiment, a.out, results_store=a.results_store, pick=a.pick)
    # the sweep's own page shows the exports: rewritten with them (another --out has no sweep.json for a page)
    page = _write_sweep_report(Path(a.out)) if Path(a.out).resolve() == Path(a.experiment).resolve() else None
    _print_summary(summary, Path(a.out), page, Path(a.experiment))
    if nn_export is not None:
        from pgps_tune.nnunet import counts_line

        path, nn_file, origins, note = nn_export
        nn_file.save(path)
        print(f"nnU-Net schedule: {path} (read by -tr {a.trainer}; see docs/NNUNET.md)")
        print(counts_line(nn_file, origins))
        if note is not None:
            print(note, file=sys.stderr, flush=True)
    return 0


def _require_finished(folder: str | Path, meta: dict[str, Any], command: str) -> None:
    """Refuse an unfinished sweep; while its driver still runs, name that driver rather than ask for a resume."""
    from pgps_tune.errors import lock_holder
    from pgps_tune.results import SWEEP_LOCK, require_finished

    if not meta.get("finished") and (holder := lock_holder(Path(folder) / SWEEP_LOCK)):
        raise PgpsError(f"{folder} is in use by another pgps-tune command ({holder}); wait for it to end, "
                        f"then run '{command}' again")
    require_finished(meta)


def cmd_confirm(a: argparse.Namespace) -> int:
    from pgps_tune.results import read_meta

    if Path(a.sweep).exists() and not Path(a.sweep).is_dir():
        raise PgpsError(f"{a.sweep} is a file; give a sweep folder (the --out of 'pgps-tune tune')")
    _require_finished(a.sweep, read_meta(a.sweep), "confirm")  # refused before Ray is imported
    _bound_ray_connect(a.address)
    from pgps_tune.tuner import ConfirmOptions, SweepInterrupted, TrialsUnplaced, confirm

    opts = ConfirmOptions(
        sweep=Path(a.sweep), top_k=a.top_k, seeds=a.seeds, folds=a.confirm_folds,
        splits=str(Path(a.splits).resolve()) if a.splits else None, epochs=a.epochs,
        cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial, max_concurrent=a.max_concurrent,
        max_failures=a.max_failures, address=a.address, autoscaling=a.autoscaling,
        pending_timeout=a.pending_timeout, results_store=a.results_store,
        quiet=a.quiet, progress=progress_mode(a.progress, a.quiet), mlflow=a.mlflow)
    try:
        summary = confirm(opts)
    except SweepInterrupted as exc:
        print(f"pgps-tune: interrupted by {exc}; the confirmation's finished trials are kept and the exports are "
              "unchanged; run the same command again to continue it", file=sys.stderr)
        return 128 + exc.signum
    except TrialsUnplaced as exc:
        raise PgpsError(f"{exc}; the confirmation stopped with its finished trials kept and the exports unchanged: "
                        "once the cluster can run its trials, run the same command again to continue it") from None
    # the sweep's page shows the confirmation: rewritten with the exports, as tune and export rewrite it
    _print_summary(summary, Path(a.sweep), _write_sweep_report(Path(a.sweep)))
    return 0


def cmd_nnunet_train(a: argparse.Namespace) -> int:
    from pgps_tune import nnunet

    out = nnunet.train(
        a.dataset, a.configuration, a.fold, a.schedule, device=a.device, continue_training=a.continue_training,
        epochs=a.epochs, iterations_per_epoch=a.iterations_per_epoch,
        val_iterations_per_epoch=a.val_iterations_per_epoch, trainer=a.trainer, plans_identifier=a.plans,
        save_probabilities=a.npz, other_configuration=a.other_configuration,
    )
    print(f"results: {out}")
    device = nnunet.torch_device(a.device).type  # nnUNetv2_predict's default is cuda
    print(f"predict: nnUNet_extTrainer={nnunet.ext_trainer_path()} nnUNetv2_predict -i IN -o OUT "
          f"-d {a.dataset} -c {a.configuration} -f {nnunet.fold_name(a.fold)} -tr {a.trainer} -p {a.plans}"
          + ("" if device == "cuda" else f" -device {device}"))
    if (note := nnunet.lookup_note()) is not None:
        print(f"pgps-tune: note: {note}", file=sys.stderr)
    return 0


def cmd_best(a: argparse.Namespace) -> int:
    from pgps_tune.results import best_schedule

    if a.out:
        _check_out_file(Path(a.out))
    s = best_schedule(a.dataset, a.results_store, a.objective, a.sweep or (), a.pick)
    if a.out:
        s.save(a.out)
    _print_schedule(s, a.format)
    return 0


class Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM; the message says what was kept and how to go on.

    ``exit_code`` None: 143 if a SIGTERM stopped the command, else 130.
    """

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that commands unwind as from Ctrl-C (then exit 143)."""


# -- parser ---------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """Help with short placeholders: N for an integer flag, X for a real one, else the flag's name."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        rng = LIMITS.get(getattr(action.type, "__name__", ""))
        if rng is not None:
            return "N" if rng.integer else "X"
        return super()._get_default_metavar_for_optional(action)


class _Parser(argparse.ArgumentParser):
    """argparse with pgps-tune's errors: one line that names the flag, then exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"pgps-tune: error: {message} (see '{self.prog} --help')\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        """As argparse's, but a failed write is not ignored: ``--help | head`` ends as other output does (main)."""
        file = file or sys.stderr
        if message and file is not None:  # None: the process has no stderr (started with 2>&-)
            file.write(message)


def build_parser() -> argparse.ArgumentParser:
    from pgps_tune.space import OBJECTIVES, Budget, shipped_spaces

    n = _number
    p = _Parser(prog="pgps-tune", description="Patch-size curricula for 3D segmentation.",
                epilog="exit codes: 0 done, 1 internal error (traceback in a log file), 2 user error, "
                       "130 Ctrl-C, 141 output pipe closed (| head), 143 SIGTERM")
    p.add_argument("--version", action="version", version=f"pgps-tune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("schedule", help="build, convert or show a schedule")
    _add_schedule_args(s, planned=False)
    s.add_argument("--from", dest="from_file", metavar="FILE", help="read a schedule file (YAML or JSON)")
    s.add_argument("--epochs", type=n("epochs"), default=None,
                   help=f"total epochs (default {DEFAULT_EPOCHS}; with --from: rescale)")
    s.add_argument("--format", choices=["json", "yaml", "table"], default="table", help="default table")
    s.add_argument("--out", metavar="FILE", help="also write the schedule to this file (.json or .yaml; an existing "
                   "file is replaced, a symbolic link written through to its target)")
    _add_nnunet_args(s)
    s.set_defaults(func=cmd_schedule)

    def data_args(q: argparse.ArgumentParser, required: bool = True, also: str = "") -> None:
        q.add_argument("--data", required=required, metavar="DIR",
                       help=f"MSD/nnU-Net dataset folder, nnU-Net dataset id or name, or 'synthetic'{also}")
        q.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="preprocessing cache (default ~/.cache/pgps-tune)")

    def device_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", choices=DEVICES, default=TrainConfig.device,
                       help=f"default {TrainConfig.device}: cuda where a GPU is visible")

    def voxel_budget_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--voxel-budget", type=n("voxel_budget"), default=128**3,
                       help="planner: most voxels per patch (default 128^3)")

    t = sub.add_parser(
        "train", help="train one schedule",
        description="Train one schedule. A schedule file a sweep exported carries the recipe its trial trained "
                    "with (network, optimizer, learning rate, augmentation, seed, split, ...): train uses it, and "
                    "each trainer flag given here replaces that one value (reported). Defaults below apply "
                    "without a recipe.")
    data_args(t)
    t.add_argument("--device", choices=DEVICES, default=None,
                   help=f"default {TrainConfig.device}: cuda where a GPU is visible")
    voxel_budget_arg(t)
    t.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder (checkpoint.pt, metrics.json, learning_curve.png)")
    t.add_argument("--schedule", metavar="FILE", help="schedule file (instead of --preset); trains with its recipe")
    _add_schedule_args(t, planned=True)
    t.add_argument("--epochs", type=n("epochs"), default=None,
                   help=f"total epochs (default {DEFAULT_EPOCHS}; rescales a --schedule)")
    # trainer flags: default None, so that only a flag given replaces a schedule file's recipe (TRAIN_FLAGS)
    t.add_argument("--iterations-per-epoch", type=n("iterations_per_epoch"),
                   help=f"default {TrainConfig.iterations_per_epoch}")
    t.add_argument("--network", help=f"{', '.join(NETWORKS)} (default {TrainConfig.network})")
    t.add_argument("--token-size", type=int, choices=TOKEN_SIZES,
                   help=f"unetr: token side; patch sides must be multiples of it (default {TrainConfig.token_size})")
    t.add_argument("--feature-size", type=n("feature_size"),
                   help="segresnet/swinunetr/unetr base width (default: MONAI's, 8/24/16; swinunetr needs a "
                        "multiple of 12, segresnet of 8); smaller widths fit small machines")
    t.add_argument("--hidden-size", type=n("hidden_size"),
                   help=f"unetr transformer width, a multiple of 64 (default {TrainConfig.hidden_size}; smaller "
                        "widths fit small machines)")
    t.add_argument("--augment", help=f"augmentation preset: {', '.join(AUGMENT_PRESETS)} (default "
                   f"{TrainConfig.augment}, close to nnU-Net's; none: plain crops)")
    t.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help=f"CPU training arithmetic (default {TrainConfig.cpu_precision}: bfloat16 autocast where the "
                        "CPU has it in hardware and the batch gains, fp32 elsewhere; fp32: never); CUDA uses fp16 AMP")
    t.add_argument("--filters", nargs="+", type=n("filters"),
                   help=f"channels per level (default {' '.join(map(str, TrainConfig.filters))})")
    t.add_argument("--res-units", type=n("res_units"),
                   help=f"unet: residual units per level (default {TrainConfig.res_units}; 2 doubles the depth, "
                        "more Dice per iteration at 1.2-1.5x the time per iteration on a CPU)")
    t.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, help="dynunet only (default off)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {TrainConfig.optimizer}")
    t.add_argument("--lr", type=n("lr"), help="default " + ", ".join(f"{v:g} ({k})" for k, v in DEFAULT_LR.items()))
    t.add_argument("--fg-ratio", type=n("fg_ratio"),
                   help=f"share of foreground-centred patches (default {TrainConfig.fg_ratio})")
    t.add_argument("--seed", type=n("seed"), help=f"default {TrainConfig.seed}")
    t.add_argument("--split-seed", type=n("split_seed"), help=f"default {Budget.split_seed}")
    t.add_argument("--val-fraction", type=n("val_fraction"), help=f"default {Budget.val_fraction}")
    t.add_argument("--splits", metavar="FILE", help='JSON {"train": [ids], "val": [ids]}')
    t.add_argument("--val-every", type=n("val_every"),
                   help="epochs between validations (default: about 10 validations per run)")
    t.add_argument("--threads", type=n("threads"), help="torch threads (default: all cores)")
    t.add_argument("--workers", type=n("workers"), help=f"DataLoader worker processes (default {TrainConfig.workers})")
    t.add_argument("--max-train-seconds", type=n("max_train_seconds"),
                   help="stop after the epoch that passes this much training time")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    t.add_argument("--quiet", action="store_true", help="no progress output (same as --progress none)")
    t.add_argument("--progress", choices=PROGRESS, default="auto",
                   help="progress on stderr: live (a bar), lines (one per epoch and validation), json (one JSON "
                        "object per line), none; default auto: live on a terminal, else lines")
    _add_nnunet_args(t)
    t.set_defaults(func=cmd_train, out_folder=True)

    e = sub.add_parser("evaluate", help="Dice of a trained run: its validation cases, or every labelled case")
    data_args(e)
    device_arg(e)
    e.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder written by 'train'")
    e.add_argument("--all-cases", action="store_true",
                   help="score every labelled case (default on the run's own dataset: its validation cases)")
    e.add_argument("--mirror", action="store_true",
                   help="test-time augmentation, as predict --mirror: average the 8 mirrored copies")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="segment new images with a trained run (outputs in each input's geometry)")
    pr.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder written by 'train'")
    pr.add_argument("--input", required=True, metavar="PATH",
                    help="an image (.nii.gz, .nii, .nrrd, .mha) or a folder of them (also nnU-Net CASE_0000 files)")
    pr.add_argument("--out", required=True, metavar="DIR",
                    help="folder for the segmentations (CASE + the input's ending)")
    pr.add_argument("--mirror", action="store_true", help="test-time augmentation: average the 8 mirrored copies")
    pr.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    pr.add_argument("--skip-existing", action="store_true",
                    help="keep existing outputs and segment only the other cases (continues a stopped predict)")
    device_arg(pr)
    pr.add_argument("--quiet", action="store_true", help="no progress lines")
    pr.set_defaults(func=cmd_predict)

    pl = sub.add_parser("plan", help="show the planned final patch and poolings for a dataset")
    data_args(pl, required=False, also=" (not needed with --nnunet-plans)")
    voxel_budget_arg(pl)
    _add_nnunet_args(pl)
    pl.set_defaults(func=cmd_plan)

    def sweep_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--num-samples", type=n("num_samples"), default=None,
                       help="search trials (default: the space's search.num_samples)")
        q.add_argument("--max-concurrent", type=n("max_concurrent"), default=None,
                       help="trials running at once (default: as many as the resources allow)")
        q.add_argument("--cpus-per-trial", type=n("cpus_per_trial"), default=1.0, help="default 1")
        q.add_argument("--gpus-per-trial", type=n("gpus_per_trial"), default=0.0,
                       help="default 0; fractions allowed, e.g. 0.5")
        q.add_argument("--address", default=None, metavar="auto|HOST:PORT", help="join a running Ray cluster")
        q.add_argument("--autoscaling", action="store_true", help=AUTOSCALING_HELP)
        q.add_argument("--pending-timeout", type=n("pending_timeout"), default=None, metavar="SECONDS",
                       help=PENDING_HELP)
        q.add_argument("--storage", default=None, metavar="PATH|URI",
                       help="local path or s3:// / gs:// URI for Tune's results (default SWEEP_DIR/ray)")
        q.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
        q.add_argument("--max-failures", type=n("max_failures"), default=None,
                       help="retries of a failed trial from its last checkpoint (default: the space's budget)")
        q.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="preprocessing cache (default ~/.cache/pgps-tune)")
        q.add_argument("--results-store", default=None, metavar="DIR",
                       help="results store (default ~/.local/share/pgps-tune/results)")
        q.add_argument("--quiet", action="store_true", help="no progress output (same as --progress none)")
        q.add_argument("--progress", choices=PROGRESS, default="auto",
                       help="progress on stderr: live (a refreshing trial table with an ETA), lines (one per trial "
                            "event), json (one JSON object per line), none; default auto: live on a terminal, "
                            "else lines")
        q.add_argument("--mlflow", metavar="URI", default=None,
                       help="also log every trial to MLflow at this tracking URI (e.g. http://host:5000 or "
                            "sqlite:///path/mlflow.db; needs pip install 'pgps-tune[mlflow]')")
        g = q.add_argument_group("confirmation", "each given flag replaces that key of the space file's confirm "
                                 "section (docs/GUIDE.md, Confirming the winner)")
        g.add_argument("--no-confirm", action="store_true", help="skip the confirmation phase (confirm.enabled false)")
        g.add_argument("--confirm-top-k", type=n("top_k"), metavar="K", help="distinct searched schedules to confirm")
        g.add_argument("--confirm-seeds", type=n("seeds"), metavar="N", help="seeds per confirmed schedule")
        g.add_argument("--confirm-folds", type=n("folds"), metavar="K",
                       help="confirm on K cross-validation folds instead of seeds")
        g.add_argument("--confirm-splits", metavar="FILE",
                       help='confirm on the folds of this JSON list [{"train": [ids], "val": [ids]}, ...]')
        g.add_argument("--confirm-epochs", type=n("epochs"), metavar="N",
                       help="epochs of each confirmation trial (default: the search's)")
        budget_args(q)

    def budget_args(q: argparse.ArgumentParser) -> None:
        g = q.add_argument_group("budget", "each given flag replaces that key of the space file's budget section, "
                                           "for every trial (references included)")
        g.add_argument("--epochs", type=n("epochs"), help="epochs per trial (the paper reference needs at least "
                       "its stage count)")
        g.add_argument("--iterations-per-epoch", type=n("iterations_per_epoch"), help="iterations per epoch")
        g.add_argument("--batch-size", type=n("batch_size"), help="the constant baseline's batch size")
        g.add_argument("--val-every", type=n("val_every"), help="epochs between validations (each is a report "
                       "to Tune)")
        g.add_argument("--network", choices=NETWORKS, help="network")
        g.add_argument("--token-size", type=int, choices=TOKEN_SIZES, help="unetr: token side")
        g.add_argument("--feature-size", type=n("feature_size"), help="segresnet/swinunetr/unetr base width "
                       "(swinunetr: a multiple of 12, segresnet: of 8)")
        g.add_argument("--hidden-size", type=n("hidden_size"), help="unetr transformer width (a multiple of 64)")
        g.add_argument("--augment", choices=tuple(AUGMENT_PRESETS), help="augmentation preset (none: plain crops)")
        g.add_argument("--cpu-precision", choices=CPU_PRECISIONS, help="CPU training arithmetic: bf16 (autocast "
                       "where the CPU has it in hardware) or fp32")
        g.add_argument("--filters", nargs="+", type=n("filters"), metavar="N", help="channels per level")
        g.add_argument("--res-units", type=n("res_units"), metavar="N", help="unet: residual units per level")
        g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer")
        g.add_argument("--lr", type=n("lr"), help="learning rate (a searched lr parameter still wins)")
        g.add_argument("--fg-ratio", type=n("fg_ratio"), help="share of foreground-centred patches (a searched "
                       "fg_ratio still wins)")
        g.add_argument("--seed", type=n("seed"), help="training seed")
        g.add_argument("--val-fraction", type=n("val_fraction"), help="share of the cases held out for validation")
        g.add_argument("--split-seed", type=n("split_seed"), help="seed of the train/validation split")
        g.add_argument("--final-patch", nargs=3, type=n("patch_axis"), metavar=("X", "Y", "Z"),
                       help="final patch size (default: planned from the data)")
        g.add_argument("--pools", nargs=3, type=n("pools"), metavar=("PX", "PY", "PZ"),
                       help="stride-2 poolings per axis (default: planned from the data)")

    tu = sub.add_parser("tune", help="search the best schedule for a dataset with Ray Tune")
    tu.add_argument("--space", required=True, metavar="NAME|FILE",
                    help=f"a space file, or a shipped space: {', '.join(shipped_spaces())}")
    tu.add_argument("--data", required=True, metavar="DIR", help="MSD/nnU-Net dataset folder, or 'synthetic'")
    tu.add_argument("--out", required=True, metavar="SWEEP_DIR",
                    help="sweep folder (exports, sweep.json, Tune results)")
    tu.add_argument("--warm-start", action="store_true",
                    help="seed the Optuna study with the completed trials of earlier sweeps of the same dataset, "
                         "space and budget in the results store")
    sweep_args(tu)
    _add_nnunet_args(tu)
    tu.set_defaults(func=cmd_tune, out_folder=True)

    de = sub.add_parser("demo", help="a small sweep on synthetic data, end to end (about 4 minutes on 2 cores)")
    de.add_argument("--out", default="runs/demo", metavar="SWEEP_DIR", help="sweep folder (default runs/demo)")
    sweep_args(de)
    de.set_defaults(func=cmd_demo, out_folder=True)

    co = sub.add_parser("confirm", help="run or extend the confirmation of a finished sweep (more seeds, folds, "
                        "a longer budget) and re-export it")
    co.add_argument("sweep", metavar="SWEEP_DIR", help="the --out folder of a finished 'tune' or 'demo'")
    co.add_argument("--top-k", type=n("top_k"), metavar="K", help="distinct searched schedules to confirm "
                    "(default: as the sweep's last confirmation, else 3)")
    co.add_argument("--seeds", type=n("seeds"), metavar="N", help="seeds per schedule (default: as before, else 3)")
    co.add_argument("--confirm-folds", type=n("folds"), metavar="K", help="cross-validation folds instead of seeds")
    co.add_argument("--splits", metavar="FILE", help='folds from this JSON list [{"train": [ids], "val": [ids]}, ...]')
    co.add_argument("--epochs", type=n("epochs"), metavar="N", help="epochs per trial (default: as before, else "
                    "the search's)")
    co.add_argument("--cpus-per-trial", type=n("cpus_per_trial"), default=None, help="default: the sweep's")
    co.add_argument("--gpus-per-trial", type=n("gpus_per_trial"), default=None, help="default: the sweep's")
    co.add_argument("--max-concurrent", type=n("max_concurrent"), default=None, help="default: as many as fit")
    co.add_argument("--max-failures", type=n("max_failures"), default=None,
                    help="retries of a failed trial (default: the space's budget.max_failures)")
    co.add_argument("--address", default=None, metavar="auto|HOST:PORT", help="join a running Ray cluster")
    co.add_argument("--autoscaling", action="store_true", help=AUTOSCALING_HELP)
    co.add_argument("--pending-timeout", type=n("pending_timeout"), default=None, metavar="SECONDS",
                    help=PENDING_HELP)
    co.add_argument("--results-store", default=None, metavar="DIR", help="results store (default "
                    "~/.local/share/pgps-tune/results)")
    co.add_argument("--quiet", action="store_true", help="no progress output (same as --progress none)")
    co.add_argument("--progress", choices=PROGRESS, default="auto",
                    help="progress on stderr, as for tune: live, lines, json or none; default auto: live on a "
                         "terminal, else lines")
    co.add_argument("--mlflow", metavar="URI", default=None,
                    help="also log every confirmation trial, and the verdict on the sweep's own run, to MLflow at "
                         "this tracking URI, in the sweep's experiment (as tune --mlflow)")
    co.set_defaults(func=cmd_confirm)

    ex = sub.add_parser("export", help="(re)write trials.parquet and best_schedule.yaml of a sweep")
    ex.add_argument("--experiment", required=True, metavar="SWEEP_DIR", help="the --out folder of a sweep")
    ex.add_argument("--out", required=True, metavar="DIR", help="folder for the exports (may be SWEEP_DIR)")
    ex.add_argument("--results-store", default=None, metavar="DIR", help="results store (default "
                    "~/.local/share/pgps-tune/results)")
    ex.add_argument("--nnunet", metavar="PLANS",
                    help="also write the best schedule for nnU-Net beside these plans (nnUNetPlans.json, or a dataset "
                         "id/name in nnUNet_preprocessed)")
    ex.add_argument("--pick", metavar="RULE", default=None,
                    help="pareto sweeps: the front schedule to export as best_schedule.yaml: knee, max_dice or "
                         "cheapest_within=T (the cheapest within T Dice of the best); default: the rule an earlier "
                         "export --pick into SWEEP_DIR recorded, else the space's objective.pick")
    ex.add_argument("--configuration", default="3d_fullres", help="with --nnunet: the nnU-Net configuration")
    ex.add_argument("--trainer", default="nnUNetTrainerPGPS",
                    help="with --nnunet: the trainer name it is for; a different schedule already written for that "
                         "name is not replaced: give nnUNetTrainerPGPS_SUFFIX")
    ex.add_argument("--other-dataset", action="store_true",
                    help="with --nnunet: export although the sweep searched another dataset than the plans'")
    ex.add_argument("--other-configuration", action="store_true",
                    help="with --nnunet: export although the sweep was tuned on another configuration's data "
                         "(e.g. 3d_lowres for 3d_fullres, or plans of another spacing)")
    ex.add_argument("--epochs", type=n("epochs"), default=None,
                    help="with --nnunet: the epochs nnU-Net trains (default: a budget.trainer nnunet sweep's, else "
                         "nnU-Net's 1000); the schedule is rescaled")
    ex.add_argument("--iterations-per-epoch", type=n("iterations_per_epoch"), default=None,
                    help="with --nnunet: default a budget.trainer nnunet sweep's, else 250 (nnU-Net's)")
    ex.add_argument("--val-iterations-per-epoch", type=n("iterations_per_epoch"), default=None,
                    help="with --nnunet: default a budget.trainer nnunet sweep's, else 50 (nnU-Net's)")
    ex.set_defaults(func=cmd_export, out_folder=True)

    nt = sub.add_parser("nnunet-train", help="train a schedule with nnU-Net's own trainer (needs the nnunet extra)")
    nt.add_argument("dataset", help="nnU-Net dataset id or name (in nnUNet_preprocessed)")
    nt.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    nt.add_argument("fold", help="0-4 (the folds of splits_final.json), or all")
    nt.add_argument("--schedule", help="schedule file (default: the one beside the plans; continuing: the run's own)")
    nt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    nt.add_argument("--continue", dest="continue_training", action="store_true",
                    help="continue from the run's last checkpoint")
    nt.add_argument("--epochs", type=n("epochs"), default=None,
                    help="nnU-Net epochs (default 1000); the schedule is rescaled")
    nt.add_argument("--iterations-per-epoch", type=n("iterations_per_epoch"), default=None,
                    help="default 250 (nnU-Net's)")
    nt.add_argument("--val-iterations-per-epoch", type=n("iterations_per_epoch"), default=None,
                    help="default 50 (nnU-Net's)")
    nt.add_argument("--trainer", default="nnUNetTrainerPGPS",
                    help="nnUNetTrainerPGPS or nnUNetTrainerPGPS_SUFFIX (keeps runs of different schedules apart)")
    nt.add_argument("--plans", default="nnUNetPlans", help="nnU-Net plans identifier (default nnUNetPlans)")
    nt.add_argument("--npz", action="store_true", help="also save validation probabilities (nnU-Net's --npz)")
    nt.add_argument("--other-configuration", action="store_true",
                    help="train a schedule exported from a sweep although it was tuned on another configuration's "
                         "data (e.g. 3d_lowres for 3d_fullres, or plans of another spacing)")
    nt.set_defaults(func=cmd_nnunet_train)

    be = sub.add_parser(
        "best", help="the best stored schedule for a dataset, over all sweeps",
        description="The best schedule for a dataset: the completed trials of every stored sweep of it (or of the "
                    "--sweep ones) ranked by the objective's score; trials at a fraction of the budget (ASHA's "
                    "compressed rungs) and confirmation repeats are not ranked, but a sweep whose confirmation chose a "
                    "winner is ranked by that winner alone, with its means over the repeats (the Dice and "
                    "schedule of its best_schedule.yaml); for --objective pareto, the --pick rule chooses from the "
                    "front of the ranked trials, as a pareto sweep's export does. Scores compare only at the same "
                    "budget (epochs x iterations per epoch), data and split, and final patch: when the ranked "
                    "sweeps differ in these, a note line names them and how; --sweep ranks comparable sweeps only.")
    be.add_argument("--dataset", required=True, metavar="NAME",
                    help="dataset name (dataset.json 'name', or 'synthetic'), matched exactly")
    be.add_argument("--objective", choices=OBJECTIVES, default="max_dice", help="default max_dice")
    be.add_argument("--pick", metavar="RULE", default=None,
                    help="--objective pareto: the front schedule to give, by the rule a pareto sweep's export uses: "
                         "knee, max_dice or cheapest_within=T; default: the rule the ranked sweeps were exported with "
                         "(knee where they differ, or were stored before the rule was)")
    be.add_argument("--results-store", default=None, metavar="DIR", help="results store (default "
                    "~/.local/share/pgps-tune/results)")
    be.add_argument("--format", choices=["json", "yaml", "table"], default="yaml", help="default yaml")
    be.add_argument("--sweep", action="append", metavar="NAME", help="rank only this stored sweep (repeatable; "
                    "the names 'pgps-tune best' notes, or the store's sweep=NAME folders)")
    be.add_argument("--out", metavar="FILE", help="also write the schedule to this file")
    be.set_defaults(func=cmd_best)

    rp = sub.add_parser("report", help="an HTML page (inline figures, opens offline) of a sweep or a train run")
    rp.add_argument("path", metavar="SWEEP_OR_RUN_DIR", help="the --out folder of 'tune', 'demo' or 'train'")
    rp.add_argument("--out", metavar="FILE", help="the page to write (default SWEEP_OR_RUN_DIR/report.html)")
    rp.set_defaults(func=cmd_report)

    tr = sub.add_parser("trials", help="print a sweep's trial table (trials.parquet)")
    tr.add_argument("sweep", metavar="SWEEP_DIR", help="the --out folder of 'tune' or 'demo'")
    tr.add_argument("--sort", metavar="COLUMN", help="sort by this column: numbers high first, text A-Z "
                    "(default: score)")
    tr.add_argument("--phase", help="only this phase, e.g. references or search")
    tr.add_argument("--status", help="only this status, e.g. completed, stopped_early or failed")
    tr.add_argument("--reverse", action="store_true",
                    help="reverse the order (numbers low first, text Z-A; blanks stay last)")
    tr.add_argument("--columns", metavar="A,B,...", help="columns to print, comma-separated (default: a summary "
                    "for table, every column for csv and json)")
    tr.add_argument("--format", choices=["table", "csv", "json"], default="table", help="default table")
    tr.add_argument("--limit", type=n("limit"), default=None,
                    help=f"print at most N trials, in the order shown (default {TRIALS_SHOWN} for table, every one for "
                         "csv and json; 0: every one)")
    tr.set_defaults(func=cmd_trials)
    return p


# -- main: errors, signals, crash logs ---------------------------------------------------------


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[list[int]]:
    """Turn SIGTERM into :class:`Terminated` in this process while the block runs; yield what arrived."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a forked child (a DataLoader worker): die as SIGTERM asks
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:  # not where the block chose to ignore it
            signal.signal(signal.SIGTERM, previous)


def _crash_log(argv: list[str]) -> Path | None:
    """Write the traceback being handled to a log file; its path, or None where no folder is writable."""
    from pgps_tune.errors import atomic_write_text

    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = (f"pgps-tune {shlex.join(argv)}\npython {sys.version.split()[0]}, cwd {os.getcwd()}\n\n"
            f"{traceback.format_exc()}")
    for folder in (state / "pgps-tune" / "logs", Path(tempfile.gettempdir())):
        with contextlib.suppress(PgpsError, OSError):
            return atomic_write_text(folder / name, text)
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the arguments; None: this process's own, as the ``pgps-tune`` script runs
    it, which then ignores signals once the command has done its work, up to the exit)."""
    argv_given = argv
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:
        if _stdout_gone():  # `pgps-tune tune --help | head -0`: help or version for a reader that left
            return EXIT_PIPE
        raise
    args.explicit = _explicit_dests(argv)
    empty = next((k for k, v in vars(args).items() if isinstance(v, str) and not v.strip()), None)
    if empty:  # "--out $DIR" with DIR unset: a path of "" would mean the current folder
        print(f"pgps-tune: error: argument --{empty.replace('_', '-')} is empty; give a value (is a shell variable "
              "unset?)", file=sys.stderr)
        return EXIT_USAGE
    _fatal_errors_show_where()
    out = Path(args.out) if getattr(args, "out_folder", False) else None
    missing = _missing_parents(getattr(args, "out", None))
    with _sigterm_raises() as terminated:
        try:
            with _no_empty_folder_left(out):
                rc = args.func(args)
            if rc == 0 and missing:  # commands without --out have none
                _note_created(args.out, missing)
            if argv_given is None:
                sys.stdout.flush()  # a reader that left (`| head`) is found here, not at the interpreter's exit
            return rc
        except PgpsError as exc:
            print(f"pgps-tune: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
            return EXIT_USAGE
        except Interrupted as exc:
            print(f"pgps-tune: {exc}", file=sys.stderr)
            return exc.exit_code or (EXIT_SIGTERM if terminated else EXIT_SIGINT)
        except KeyboardInterrupt:
            how = "terminated (SIGTERM)" if terminated else "interrupted"
            print(f"pgps-tune: {how}; nothing was left half-written", file=sys.stderr)
            return EXIT_SIGTERM if terminated else EXIT_SIGINT
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:  # Ray's own SIGTERM handler exits with the signal number
                raise
            print("pgps-tune: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
            return EXIT_SIGTERM
        except Exception as exc:
            if isinstance(exc, BrokenPipeError) and _stdout_gone():  # `pgps-tune best ... | head`: the reader left
                return EXIT_PIPE
            log = _crash_log(argv)
            where = f"the traceback is in {log}" if log else "no log folder was writable for the traceback"
            print(f"pgps-tune: internal error ({_cause(exc)}); {where}; please report it", file=sys.stderr)
            return EXIT_INTERNAL
        finally:
            if argv_given is None:  # the outcome is decided: a signal from now on (a Ctrl-C while the
                for sig in (signal.SIGINT, signal.SIGTERM):  # interpreter shuts down) must not change it
                    signal.signal(sig, signal.SIG_IGN)


EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a command whose output pipe closed


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone (a pipe closed by ``head``); then stdout is pointed at /dev/null, so
    that the interpreter's last flush does not fail again. False where the broken pipe was another one."""
    import select

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):  # a pipe without reader: POLLERR
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return True
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout)
        return False


def _fatal_errors_show_where() -> None:
    """On a crash in native code (a segfault in Ray's core worker, torch, ...) print the Python stack of
    every thread to stderr, as ``python -X faulthandler`` does, instead of dying without a word; a
    sweep killed so is continued with the same command and ``--resume``."""
    import faulthandler
    import io

    if not faulthandler.is_enabled():  # pytest's, or the user's own, stays
        with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
            faulthandler.enable(file=sys.stderr, all_threads=True)


def _cause(exc: BaseException) -> str:
    """``Type: message`` of an internal error, in at most 200 characters of one line.

    Ray wraps an error raised inside Tune in a TuneError whose message is the whole formatted traceback:
    its last line (the exception that started it) is what names the problem.
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.lstrip().startswith("Traceback (most recent call last)") and lines:
        what = f"{type(exc).__name__} from {lines[-1]}"
    else:
        what = f"{type(exc).__name__}: {' '.join(text.split())}"
    return what[:200]


if __name__ == "__main__":
    sys.exit(main())
