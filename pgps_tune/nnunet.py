"""The nnU-Net v2 bridge: nnU-Net's plans in, pgps-tune schedules out to nnU-Net's own trainer.

Most people who would use a tuned curriculum train with nnU-Net, so the bridge goes both ways:

- **Plans in.** :func:`read_plans` reads ``nnUNetPlans.json`` (the current format, whose
  network strides sit in ``architecture.arch_kwargs.strides``, and the older one with
  ``pool_op_kernel_sizes``; configurations that ``inherits_from`` another) into a small
  :class:`NnunetPlan`: final patch, poolings per axis, batch size and spacing, so schedules
  and sweeps are built on exactly nnU-Net's numbers.  :func:`find_dataset` finds a dataset by
  id or name (``4``, ``Dataset004_Hippocampus``) through the environment variables nnU-Net
  users already set (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``).
- **Schedules out.** :func:`trainer_class` is a subclass of nnU-Net's ``nnUNetTrainer`` that
  changes patch and batch per stage and keeps everything else nnU-Net's (preprocessing,
  augmentation, loss, deep supervision, poly LR over the whole run, validation at the final
  patch, output layout).  :func:`train` runs it (``pgps-tune nnunet-train``); nnU-Net's own
  ``nnUNetv2_train -tr nnUNetTrainerPGPS`` finds it through ``nnUNet_extTrainer`` pointed at
  :data:`TRAINER_DIR`.  See docs/NNUNET.md for the user's side.

**Axis order.**  pgps-tune's loader reorients every volume to the closest canonical (RAS)
orientation and calls those axes x y z; nnU-Net reads arrays in reversed voxel order (z y x,
SimpleITK's convention, which its nibabel readers copy) and then permutes them by the plans'
``transpose_forward``.  So a plans patch of ``[20, 320, 256]`` is ``256 320 20`` in pgps-tune.
:class:`NnunetPlan` holds both and converts; the permutation also follows the voxel-to-world
axes of the dataset's label files (``gt_segmentations`` beside the plans, any format
:mod:`pgps_tune.imageio` reads), which must be there unless nnU-Net's reader reorients.
Schedule files always use pgps-tune's order; only the nnU-Net schedule file (below) and
nnU-Net's own run folders use nnU-Net's order, as nnU-Net's plans do.

**How the schedule reaches nnU-Net's trainer.**  nnU-Net builds trainers itself from
``(plans, configuration, fold, dataset_json)``, so the trainer looks the schedule up, in this
order: the file named by :data:`SCHEDULE_ENV` (any schedule file, or an nnU-Net schedule
file); ``TRAINER__PLANS__CONFIGURATION.pgps_schedule.json`` beside the plans file (what
``pgps-tune export --nnunet`` writes); the record the run keeps in its fold folder
(``pgps_schedule.json``), which also makes a continued run refuse a different schedule.

nnunetv2 is an optional extra: this module imports without it and only the functions that
need it import it (:func:`require_nnunet` names the install command).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgps_tune import schedule as sch
from pgps_tune.errors import PgpsError, atomic_write_text, brief, read_json
from pgps_tune.limits import LIMITS

if TYPE_CHECKING:
    from pgps_tune.space import SearchSpace

REPLAN = "regenerate it with nnUNetv2_plan_and_preprocess"  # the fix for a damaged plans/dataset file

Triple = tuple[int, int, int]
INSTALL_HINT = "pip install 'pgps-tune[nnunet]'"
TRAINER = "nnUNetTrainerPGPS"
SCHEDULE_ENV = "PGPS_TUNE_SCHEDULE"
RUN_RECORD = "pgps_schedule.json"
FILE_FORMAT = sch.NNUNET_FILE_FORMAT
FILE_FORMAT_VERSION = 1
TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_trainers"
ENV_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_TRAINER_NAME = re.compile(rf"^{TRAINER}(_[A-Za-z0-9]+)*$")  # no "__": nnU-Net splits folder names on it
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_\w+$")


MIN_NNUNET = (2, 8)
# the nnunetv2 modules the trainer and nnunet-train use: an older or damaged install lacks some
_NNUNET_MODULES = ("nnunetv2.run.run_training", "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
                   "nnunetv2.training.dataloading.data_loader", "nnunetv2.utilities.default_n_proc_DA",
                   "nnunetv2.training.data_augmentation.compute_initial_patch_size")


def require_nnunet() -> None:
    """Raise a one-line error naming the install command when nnunetv2 is missing, too old or incomplete."""
    import importlib
    from importlib import metadata

    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise PgpsError(f"nnU-Net v2 is not installed; install the extra: {INSTALL_HINT}") from None
    try:
        found = metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        found = "an nnunetv2 without package metadata"
    numbers = [int(n) for n in re.findall(r"\d+", found)[:2]]
    need = ".".join(map(str, MIN_NNUNET))
    if len(numbers) == 2 and tuple(numbers) < MIN_NNUNET:
        raise PgpsError(f"nnU-Net v2 >= {need} is needed, found nnunetv2 {found}; {INSTALL_HINT}")
    for module in _NNUNET_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # ModuleNotFoundError too: a module or a name in it is missing
            raise PgpsError(f"nnU-Net v2 >= {need} is needed, and the nnunetv2 found ({found}) is incomplete or "
                            f"incompatible ({type(exc).__name__}: {exc}); {INSTALL_HINT}") from None


# -- datasets by id or name, through nnU-Net's environment variables -------------------------------


def env_folder(var: str, must_exist: bool = True) -> Path:
    """The folder an nnU-Net environment variable names, or a one-line error saying what to set."""
    value = os.environ.get(var)
    if not value:
        raise PgpsError(f"{var} is not set; export {var}=/path/to/the/folder as for nnU-Net")
    if value.startswith("~"):  # nnU-Net takes the value as it is: a folder named ~ in the current folder
        raise PgpsError(f"{var}={value} starts with ~, which nnU-Net does not expand; export {var}=\"$HOME"
                        f"{value[1:]}\" (without quotes around the ~, the shell expands it)")
    path = Path(value)
    if must_exist and not path.is_dir():
        raise PgpsError(f"{var}={value} is not a folder; point it at nnU-Net's {var} folder")
    return path


def looks_like_dataset(ref: str) -> bool:
    """Whether ``ref`` names an nnU-Net dataset (``4``, ``004``, ``Dataset004_Hippocampus``)."""
    return ref.isdigit() or bool(_DATASET_NAME.match(ref))


def _matches(root: Path, ref: str) -> list[Path]:
    """The dataset folders under ``root`` that an id (``4``) or name (``Dataset004_Hippocampus``) names."""
    if not ref.isdigit():
        return [root / ref] if (root / ref).is_dir() else []
    prefix = f"Dataset{int(ref):03d}_"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def find_dataset(ref: str | int, var: str = "nnUNet_raw") -> Path:
    """The dataset folder for an id (``4``) or name (``Dataset004_Hippocampus``) under ``$var``.

    nnU-Net names datasets ``DatasetXXX_Name`` with a three-digit id; an id must match exactly
    one such folder.
    """
    ref = str(ref).strip()
    if not looks_like_dataset(ref):
        raise PgpsError(
            f"{ref!r} is not an nnU-Net dataset id or name; give an id (e.g. 4) or a name like Dataset004_Hippocampus"
        )
    root = env_folder(var)
    hits = _matches(root, ref)
    if not hits and not ref.isdigit():
        raise PgpsError(f"dataset {ref} is not in {var}={root}; check the name or the variable")
    if not hits:
        raise PgpsError(f"no dataset with id {int(ref)} (Dataset{int(ref):03d}_*) in {var}={root}; check the id or "
                        "the variable")
    if len(hits) > 1:
        raise PgpsError(
            f"dataset id {int(ref)} matches {', '.join(p.name for p in hits)} in {root}; give the full name"
        )
    return hits[0]


def resolve_data(data: str, raw: bool = True) -> str:
    """A ``--data`` value, with an nnU-Net dataset id or name turned into its dataset folder.

    Paths that exist (and ``synthetic``) are kept as given, so a folder called ``4`` still wins.
    The dataset is looked up as nnU-Net does, in ``nnUNet_raw``, ``nnUNet_preprocessed`` and
    ``nnUNet_results``: its ``nnUNet_raw`` folder where it has one; with ``raw`` (pgps-tune's own
    loader reads the raw images) a dataset found only elsewhere is refused naming the fix, else
    (a sweep whose trials train nnU-Net's preprocessed data) its folder there.
    """
    if data == "synthetic" or Path(data).exists() or not looks_like_dataset(data):
        return data
    ref = data.strip()
    found: dict[str, Path] = {}
    looked: list[str] = []
    for var in ENV_FOLDERS:
        value = os.environ.get(var)
        root = env_folder(var, must_exist=False) if value else None
        looked.append(f"{var}={value}" + ("" if root is None or root.is_dir() else " (not a folder)")
                      if value else f"{var} (not set)")
        hits = _matches(root, ref) if root is not None and root.is_dir() else []
        if len(hits) > 1:
            find_dataset(ref, var)  # its one-line error: several folders share the id
        if hits:
            found[var] = hits[0]
    if len({p.name for p in found.values()}) > 1:
        where = ", ".join(f"{p.name} in {var}" for var, p in found.items())
        raise PgpsError(f"dataset id {int(ref)} is {where}; give the full name")
    if "nnUNet_raw" in found:
        return str(found["nnUNet_raw"])
    if found and raw:
        var, path = next(iter(found.items()))
        raise PgpsError(f"dataset {ref} ({path.name}) is in {var} but not in {looked[0]}, and pgps-tune reads the "
                        "raw images; set nnUNet_raw, or give --data the raw dataset folder")
    if found:
        return str(found.get("nnUNet_preprocessed") or found["nnUNet_results"])
    raise PgpsError(f"no nnU-Net dataset {ref} and no such path (looked in {', '.join(looked)}); check the id or "
                    "name, or export nnU-Net's variables")


# -- plans -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NnunetPlan:
    """What pgps-tune needs from one configuration of nnU-Net's plans.

    ``final_patch``, ``pools`` and ``spacing`` are in pgps-tune's axis order (x y z of the
    canonically oriented volume); ``axes[i]`` is the pgps-tune axis of nnU-Net's axis ``i``,
    and :meth:`to_nnunet` / :meth:`from_nnunet` convert.
    """

    configuration: str
    final_patch: Triple
    pools: Triple
    batch_size: int
    spacing: tuple[float, float, float]
    axes: Triple
    dataset: str
    plans_name: str
    data_identifier: str
    source: Path
    # the whole plans file as read, which nnU-Net's trainer is given: read once, so the file cannot change
    # between the checks above and the training (a copy each time, as the trainer is given a dict to change)
    plans: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def plans_dict(self) -> dict[str, Any]:
        """A deep copy of the plans file this plan was read from."""
        return copy.deepcopy(self.plans)

    def to_nnunet(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """pgps-tune's x y z -> nnU-Net's axis order."""
        return tuple(values[self.axes[i]] for i in range(3))

    def from_nnunet(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """nnU-Net's axis order -> pgps-tune's x y z."""
        return _to_pgps(self.axes, values)

    def describe(self) -> dict[str, Any]:
        """Plain values for printing: both axis orders."""
        return {
            "plans": str(self.source), "dataset": self.dataset, "configuration": self.configuration,
            "final_patch": list(self.final_patch), "pools": list(self.pools), "batch_size": self.batch_size,
            "spacing": list(self.spacing), "nnunet_patch_size": list(self.to_nnunet(self.final_patch)),
            "nnunet_pools": list(self.to_nnunet(self.pools)), "nnunet_axes_in_pgps_order": list(self.axes),
        }


def _resolve_configuration(configs: dict[str, Any], name: str, src: str) -> dict[str, Any]:
    """A configuration with ``inherits_from`` applied (the child's keys win, as in nnU-Net)."""
    chain: list[str] = []
    while True:
        if name in chain:
            circle = " -> ".join([*chain, name])
            raise PgpsError(f"{src}: configurations inherit in a circle ({circle}); fix inherits_from")
        if name not in configs:
            where = f"inherits_from of {chain[-1]!r}" if chain else "the plans"
            raise PgpsError(
                f"{src}: configuration {name!r} (from {where}) does not exist; available: {', '.join(sorted(configs))}"
            )
        if not isinstance(configs[name], dict):
            raise PgpsError(f"{src}: configuration {name!r} is not a mapping")
        chain.append(name)
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    merged: dict[str, Any] = {}
    for n in reversed(chain):
        merged.update(configs[n])
    return merged


def _triple(value: Any, kind: type, what: str, src: str) -> tuple[Any, ...]:
    accepted = (int, float) if kind is float else (int,)
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, accepted) and not isinstance(v, bool) for v in value)):
        raise PgpsError(f"{src}: {what} must be 3 {kind.__name__}s, got {value!r}; regenerate the plans with nnU-Net")
    return tuple(kind(v) for v in value)


def _to_pgps(axes: Sequence[int], values: Sequence[Any]) -> tuple[Any, ...]:
    out: list[Any] = [None] * 3
    for i in range(3):
        out[axes[i]] = values[i]
    return tuple(out)


def _pools_from_strides(strides: Any, key: str, src: str) -> Triple:
    """Stride-2 poolings per axis; the first entry is the stem ([1, 1, 1])."""
    if not isinstance(strides, list) or not strides:
        raise PgpsError(f"{src}: {key} must be a list of per-stage strides; regenerate the plans with nnU-Net")
    rows = [_triple(s, int, f"{key} entry {i}", src) for i, s in enumerate(strides)]
    bad = sorted({v for row in rows for v in row} - {1, 2})
    if bad:
        raise PgpsError(f"{src}: {key} holds stride(s) {bad}; pgps-tune supports networks that pool by 1 or 2 per axis")
    return tuple(sum(row[a] == 2 for row in rows) for a in range(3))  # type: ignore[return-value]


def _label_ending(plans_dir: Path) -> str | None:
    """The image ending of the dataset's files (``file_ending`` of dataset.json beside the plans), if given."""
    desc = plans_dir / "dataset.json"
    if not desc.is_file():
        return None
    data = read_json(desc, "nnU-Net dataset description", REPLAN)
    ending = data.get("file_ending") if isinstance(data, dict) else None
    return ending if isinstance(ending, str) and ending else None


def _file_axes(plans_dir: Path, reader: str) -> Triple:
    """Canonical (RAS) axis of each voxel axis of the dataset's files, read from one label file.

    nnU-Net copies the labels to ``gt_segmentations`` beside the plans.  Readers that reorient
    (``NibabelIOWithReorient``) already see canonical axes; for every other reader the
    orientation of the first label file (any format :mod:`pgps_tune.imageio` reads: NIfTI
    through nibabel, ``.mha``/``.nrrd`` through SimpleITK) decides.  Without a label file to
    look at, the mapping is refused rather than guessed: datasets whose voxel axes are
    permuted against RAS (common for DICOM-derived files) would get a transposed patch.
    """
    if "Reorient" in reader:
        return (0, 1, 2)
    from pgps_tune import imageio

    labels = plans_dir / "gt_segmentations"
    ending = _label_ending(plans_dir)
    if ending is not None and ending.lower() not in imageio.ENDINGS:
        raise PgpsError(f"{plans_dir / 'dataset.json'}: file_ending {ending!r} is not a 3-D image format pgps-tune "
                        f"reads ({', '.join(imageio.ENDINGS)}), so it cannot map nnU-Net's axes onto its own")
    files = sorted(f for f in labels.iterdir() if f.is_file() and imageio.ending(f)
                   and (ending is None or f.name.lower().endswith(ending.lower()))) if labels.is_dir() else []
    if not files:
        raise PgpsError(f"no label file ({ending or ', '.join(imageio.ENDINGS)}) in {labels}, so the orientation of "
                        "the dataset's voxel axes is unknown; give the plans inside nnU-Net's preprocessed dataset "
                        "folder (with its gt_segmentations), or re-run nnUNetv2_plan_and_preprocess")
    import nibabel as nib

    _, affine = imageio.header(files[0])  # a one-line error for an unreadable file
    ornt = nib.orientations.io_orientation(affine)
    return tuple(int(ornt[k, 0]) for k in range(3))  # type: ignore[return-value]


def plan_from_dict(plans: Any, configuration: str, source: str | Path = "<plans>",
                   file_axes: Sequence[int] | None = None) -> NnunetPlan:
    """An :class:`NnunetPlan` from a parsed plans dict (see :func:`read_plans` for files)."""
    src = str(source)
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise PgpsError(f"{src}: not an nnU-Net plans file (no 'configurations'); give nnUNetPlans.json")
    cfg = _resolve_configuration(plans["configurations"], configuration, src)
    if "patch_size" not in cfg:
        raise PgpsError(f"{src}: configuration {configuration!r} has no patch_size; regenerate the plans with nnU-Net")
    if isinstance(cfg["patch_size"], list) and len(cfg["patch_size"]) == 2:
        raise PgpsError(f"{src}: configuration {configuration!r} is 2-D; pgps-tune schedules 3-D patches: "
                        "use a 3d configuration such as 3d_fullres")
    patch = _triple(cfg["patch_size"], int, "patch_size", src)
    for v in patch:
        LIMITS["patch_axis"].check(v, f"{src}: every axis of patch_size {list(patch)}")
    arch = cfg.get("architecture")
    if isinstance(arch, dict) and isinstance(arch.get("arch_kwargs"), dict) and "strides" in arch["arch_kwargs"]:
        pools = _pools_from_strides(arch["arch_kwargs"]["strides"], "architecture.arch_kwargs.strides", src)
    elif "pool_op_kernel_sizes" in cfg:
        pools = _pools_from_strides(cfg["pool_op_kernel_sizes"], "pool_op_kernel_sizes", src)
    else:
        raise PgpsError(
            f"{src}: configuration {configuration!r} has neither architecture.arch_kwargs.strides nor "
            "pool_op_kernel_sizes; regenerate the plans with nnU-Net"
        )
    batch = cfg.get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise PgpsError(f"{src}: batch_size must be a positive integer, got {batch!r}")
    spacing = _triple(cfg.get("spacing"), float, "spacing", src)
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise PgpsError(f"{src}: spacing must be 3 finite positive numbers, got {list(spacing)}; {REPLAN}")
    tf = plans.get("transpose_forward", [0, 1, 2])
    if not isinstance(tf, list) or len(tf) != 3 or set(tf) != {0, 1, 2}:
        raise PgpsError(f"{src}: transpose_forward must be a permutation of [0, 1, 2], got {tf!r}")
    fa = tuple(file_axes) if file_axes is not None else (0, 1, 2)
    axes: Triple = tuple(fa[2 - tf[i]] for i in range(3))  # type: ignore[assignment]
    plan = NnunetPlan(
        configuration=configuration, final_patch=_to_pgps(axes, patch), pools=_to_pgps(axes, pools),  # type: ignore[arg-type]
        batch_size=batch, spacing=_to_pgps(axes, spacing), axes=axes,  # type: ignore[arg-type]
        dataset=str(plans.get("dataset_name", "")), plans_name=str(plans.get("plans_name", Path(src).stem)),
        data_identifier=str(cfg.get("data_identifier") or f"{plans.get('plans_name', 'nnUNetPlans')}_{configuration}"),
        source=Path(src), plans=plans,
    )
    try:
        sch.check_patch(plan.final_patch, plan.pools, "the plans' patch_size")
    except PgpsError as exc:
        raise PgpsError(f"{src}: {exc}") from None
    return plan


def plans_path(ref: str | Path) -> Path:
    """A plans file: a path as given, or ``nnUNetPlans.json`` of a dataset folder or id/name in ``nnUNet_preprocessed``.

    A folder without ``nnUNetPlans.json`` is refused naming the plans it holds (``-pl nnUNetPlannerResEncM``
    writes ``nnUNetResEncUNetMPlans.json``): which of them is meant is the user's choice.
    """
    p = Path(ref).expanduser()
    if not p.is_dir() and (p.exists() or not looks_like_dataset(str(ref))):
        return p
    folder = p if p.is_dir() else find_dataset(str(ref), "nnUNet_preprocessed")
    if (folder / "nnUNetPlans.json").is_file():
        return folder / "nnUNetPlans.json"
    present = sorted(f.name for f in folder.glob("*Plans.json") if f.is_file())
    if present:
        raise PgpsError(f"{folder} holds {', '.join(present)} but no nnUNetPlans.json; give the plans file's path, "
                        f"e.g. {folder / present[0]}")
    raise PgpsError(f"{folder} holds no nnU-Net plans (*Plans.json); run nnUNetv2_plan_and_preprocess first, or give "
                    "the plans file's path")


def read_plans(ref: str | Path, configuration: str = "3d_fullres") -> NnunetPlan:
    """Read one configuration of an nnU-Net plans file (a path, a dataset folder, or a dataset id/name)."""
    path = plans_path(ref)
    plans = read_json(path, "plans file", REPLAN,
                      "run nnUNetv2_plan_and_preprocess first, or give the path of nnUNetPlans.json")
    plan = plan_from_dict(plans, configuration, path)  # the plans' own errors first
    axes = _file_axes(path.parent, str(plan.plans.get("image_reader_writer", "")))
    return plan if axes == (0, 1, 2) else plan_from_dict(plans, configuration, path, axes)


def planned_dataset(plan: NnunetPlan) -> dict[str, Any]:
    """The dataset as nnU-Net planned it (what ``pgps-tune plan --nnunet-plans`` shows), read from the plans'
    folder only, so any dataset nnU-Net preprocessed is described (region labels, an ``ignore`` label).

    ``dataset``: pgps-tune's name for it (dataset.json's ``name``, else the folder's, as the results store
    files sweeps); ``cases``: the label files nnU-Net's preprocessing copied to ``gt_segmentations``
    (dataset.json's ``numTraining`` without them); ``median_shape`` and ``spacing``: the configuration's
    (after nnU-Net's resampling), in pgps-tune's axis order.
    """
    from pgps_tune import imageio
    from pgps_tune.data import dataset_name

    base = plan.source.parent
    desc = base / "dataset.json"
    description = read_json(desc, "nnU-Net dataset description", REPLAN) if desc.is_file() else {}
    if not isinstance(description, dict):
        raise PgpsError(f"{desc} is not a JSON object; {REPLAN}")
    labels = base / "gt_segmentations"
    cases = (sum(1 for f in labels.iterdir() if f.is_file() and imageio.ending(f)) if labels.is_dir()
             else description.get("numTraining"))
    cfg = _resolve_configuration(plan.plans["configurations"], plan.configuration, str(plan.source))
    median = cfg.get("median_image_size_in_voxels")
    median = (list(plan.from_nnunet(_triple(median, float, "median_image_size_in_voxels", str(plan.source))))
              if median is not None else None)
    return {"dataset": dataset_name(description, base), "cases": cases, "median_shape": median,
            "spacing": list(plan.spacing)}


def unread_data(data: str, plan: NnunetPlan, reader: str) -> str | None:
    """Check a ``--data`` that ``reader`` (e.g. "the trials train") replaces by the plans' preprocessed dataset.

    One naming another nnU-Net dataset is refused; any other than the plans' own is returned as a note.
    """
    given = Path(data).name
    if given == plan.dataset:
        return None
    if looks_like_dataset(given):
        raise PgpsError(f"--data names {given} but {reader} {plan.dataset} of --nnunet-plans {plan.source}; give "
                        f"--data {plan.dataset} (or the plans of {given})")
    return f"{reader} nnU-Net's preprocessed {plan.dataset} (--nnunet-plans); --data {data} is not read"


def plan_space(space: SearchSpace, plan: NnunetPlan) -> SearchSpace:
    """A search space whose budget trains on the plan's final patch, pools and batch size."""
    return replace(space, budget=replace(space.budget, final_patch=plan.final_patch, pools=plan.pools,
                                         batch_size=plan.batch_size))


def check_schedule(s: sch.Schedule, plan: NnunetPlan, fix: str = "build the schedule with --nnunet-plans",
                   nnunet_trainer: bool = True) -> None:
    """Refuse a schedule (pgps-tune axis order) that the network for this plan cannot train.  ``nnunet_trainer``:
    nnU-Net's trainer trains it, which changes the patch per epoch only; pgps-tune's (``train --nnunet-plans``)
    also draws it per iteration (random sampling, a family a sweep on the plans may pick)."""
    where = f"{plan.source} ({plan.configuration})"
    if nnunet_trainer and s.sampling != "staged":
        raise PgpsError(f"nnU-Net's trainer changes the patch per epoch and cannot draw it per iteration ({s.sampling} "
                        "sampling); export a staged schedule")
    if s.final_patch != plan.final_patch:
        raise PgpsError(
            f"the schedule ends at {'x'.join(map(str, s.final_patch))} but {where} trains "
            f"{'x'.join(map(str, plan.final_patch))} (x y z; nnU-Net order "
            f"{list(plan.to_nnunet(plan.final_patch))}); {fix}"
        )
    for i, st in enumerate(s.stages):
        sch.check_patch(st.patch_size, plan.pools, f"stage {i} patch (for the network in {where})")


# -- the nnU-Net schedule file -------------------------------------------------------------------


@dataclass(frozen=True)
class NnunetSchedule:
    """What the nnU-Net trainer runs: a schedule in nnU-Net's axis order, tied to one plan.

    ``num_epochs`` / ``num_iterations_per_epoch`` / ``num_val_iterations_per_epoch`` override
    nnU-Net's defaults (1000 / 250 / 50) when set; the schedule is stretched or shrunk to the
    trainer's epochs.
    """

    schedule: sch.Schedule
    dataset: str
    plans_name: str
    configuration: str
    num_epochs: int | None = None
    num_iterations_per_epoch: int | None = None
    num_val_iterations_per_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, "axis_order": "nnunet",
            "dataset": self.dataset, "plans": self.plans_name, "configuration": self.configuration,
            "num_epochs": self.num_epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "schedule": self.schedule.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def matches(self, plan: NnunetPlan) -> bool:
        mine = (self.dataset, self.plans_name, self.configuration)
        return mine == (plan.dataset, plan.plans_name, plan.configuration)


def _optional_count(data: dict[str, Any], key: str, src: str) -> int | None:
    v = data.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise PgpsError(f"{src}: {key} must be a positive integer or null, got {v!r}")
    return v


def _nnunet_file_from_dict(data: dict[str, Any], src: str) -> NnunetSchedule:
    known = {"format", "format_version", "axis_order", "dataset", "plans", "configuration", "num_epochs",
             "num_iterations_per_epoch", "num_val_iterations_per_epoch", "schedule"}
    unknown = sorted(set(data) - known, key=str)  # keys of mixed types (5: x) sort too
    if unknown:
        raise PgpsError(f"{src}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    version = data.get("format_version")
    if type(version) is not int or version != FILE_FORMAT_VERSION or data.get("axis_order") != "nnunet":
        raise PgpsError(
            f"{src}: format_version {data.get('format_version')!r} / axis_order {data.get('axis_order')!r} not "
            f"supported (this pgps-tune writes {FILE_FORMAT_VERSION} / nnunet); re-export it with 'pgps-tune export'"
        )
    for key in ("dataset", "plans", "configuration"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise PgpsError(f"{src}: '{key}' must name the nnU-Net {key} the schedule was made for")
    return NnunetSchedule(
        schedule=sch.Schedule.from_dict(data.get("schedule"), f"{src}: schedule"),
        dataset=data["dataset"], plans_name=data["plans"], configuration=data["configuration"],
        num_epochs=_optional_count(data, "num_epochs", src),
        num_iterations_per_epoch=_optional_count(data, "num_iterations_per_epoch", src),
        num_val_iterations_per_epoch=_optional_count(data, "num_val_iterations_per_epoch", src),
    )


def for_nnunet(s: sch.Schedule, plan: NnunetPlan, **overrides: int | None) -> NnunetSchedule:
    """A pgps-tune schedule (x y z) checked against the plan and turned into nnU-Net's axis order."""
    check_schedule(s, plan)
    nn = sch.Schedule(
        tuple(sch.Stage(plan.to_nnunet(st.patch_size), st.batch_size, st.epochs) for st in s.stages),  # type: ignore[arg-type]
        plan.to_nnunet(s.final_patch), plan.to_nnunet(s.pools), s.baseline_batch_size,  # type: ignore[arg-type]
        meta=dict(s.meta),
    )
    return NnunetSchedule(nn, plan.dataset, plan.plans_name, plan.configuration, **overrides)


def read_schedule(path: str | Path, plan: NnunetPlan) -> NnunetSchedule:
    """Any schedule file for nnU-Net: an nnU-Net schedule file, or a pgps-tune schedule (converted)."""
    from pgps_tune.errors import read_yaml

    data = read_yaml(path, "schedule", "check the path, or write one with 'pgps-tune schedule --out'")
    if isinstance(data, dict) and data.get("format") == FILE_FORMAT:
        f = _nnunet_file_from_dict(data, str(path))
        if not f.matches(plan):
            raise PgpsError(
                f"{path} was made for {f.dataset} / {f.plans_name} / {f.configuration}, not {plan.dataset} / "
                f"{plan.plans_name} / {plan.configuration}; export the schedule for these plans"
            )
        nn = f.schedule
        if nn.final_patch != plan.to_nnunet(plan.final_patch):
            raise PgpsError(f"{path}: final patch {list(nn.final_patch)} differs from the plans' "
                            f"{list(plan.to_nnunet(plan.final_patch))}; re-export it for the current plans")
        mine = sch.Schedule(tuple(sch.Stage(plan.from_nnunet(st.patch_size), st.batch_size, st.epochs)  # type: ignore[arg-type]
                                  for st in nn.stages), plan.final_patch, plan.from_nnunet(nn.pools),  # type: ignore[arg-type]
                            nn.baseline_batch_size, sampling=nn.sampling)
        try:  # every stage, for the plans' network (planned again with other poolings: not the file's)
            check_schedule(mine, plan, fix="re-export it for the current plans")
        except PgpsError as exc:
            raise PgpsError(f"{path}: {exc}") from None
        return f
    return for_nnunet(sch.Schedule.from_dict(data, str(path)), plan)


def schedule_file_for(plan: NnunetPlan, trainer: str = TRAINER) -> Path:
    """Where the trainer looks for its schedule beside the plans (named like nnU-Net's run folders)."""
    return plan.source.parent / f"{trainer}__{plan.plans_name}__{plan.configuration}.pgps_schedule.json"


def trained_counts(f: NnunetSchedule) -> tuple[int, int, int]:
    """The epochs, iterations and validation iterations per epoch nnU-Net's trainer runs ``f`` with (its
    ``num_*``, else nnU-Net's defaults)."""
    return (f.num_epochs or DEFAULT_EPOCHS, f.num_iterations_per_epoch or DEFAULT_ITERATIONS,
            f.num_val_iterations_per_epoch or DEFAULT_VAL_ITERATIONS)


def _trained(f: NnunetSchedule) -> tuple[Any, ...]:
    """What the trainer runs from ``f``: the stages fitted to its epochs, and its counts (not the schedule's
    notes, ``meta``, nor its ``recipe``, which nnU-Net does not read, nor whether a count is written out or
    left to nnU-Net's default)."""
    counts = trained_counts(f)
    return (f.dataset, f.plans_name, f.configuration, fit_epochs(f.schedule, counts[0]), counts)


def _stages(f: NnunetSchedule) -> tuple[Any, ...]:
    """The stages of ``f`` without their lengths: one curriculum whether it was found at 30 epochs or confirmed
    at 60 (the trainer fits the lengths to its epochs)."""
    s = f.schedule
    return (f.dataset, f.plans_name, f.configuration, s.final_patch, s.pools, s.baseline_batch_size, s.sampling,
            tuple((st.patch_size, st.batch_size) for st in s.stages))


def _check_beside(path: Path, f: NnunetSchedule, plan: NnunetPlan, trainer: str) -> None:
    """Refuse to replace a different schedule file beside the plans (what ``-tr TRAINER`` trains next).

    The file there is read as the trainer reads it (:func:`read_schedule`): one it would refuse (damaged,
    made for other plans or an earlier planning) is named so, not replaced.  Different epoch or iteration
    counts are a different training too: the refusal names them and the flags that keep them.  One that
    trains the same (only the schedule's notes, ``meta``, differ: e.g. a re-export after a confirmation; or
    a count left null that the other spells out as nnU-Net's default) is updated.
    """
    if not path.exists():
        return
    try:
        held = read_schedule(path, plan)
        trains = _trained(held)  # more stages than its epochs: nnU-Net's trainer refuses it too
    except PgpsError as exc:
        why = str(exc).removeprefix(f"{path}: ").replace(f"schedule file {path}", "it")  # the path once
        raise PgpsError(f"{path} is there but nnU-Net's -tr {trainer} refuses it ({why}); move it away, then export "
                        "again") from None
    if trains == _trained(f):
        return
    move = (f"export this one under another name with --trainer {TRAINER}_SUFFIX (e.g. {TRAINER}_tuned), or move "
            "that file away first")
    if _stages(held) != _stages(f):
        raise PgpsError(f"{path} already holds another schedule (the one nnU-Net's -tr {trainer} trains); {move}")
    names = ("epochs", "iterations per epoch", "validation iterations per epoch")
    pairs = list(zip(names, COUNT_FLAGS.values(), trained_counts(held), trained_counts(f)))
    null = [getattr(held, key) is None for key in COUNT_FLAGS]  # a file written before export set them
    changed = [f"{name} {a}{' (null: nnU-Net default)' * unset} -> {b}"
               for (name, _, a, b), unset in zip(pairs, null) if a != b]
    epochs = trained_counts(held)[0]
    if fit_epochs(f.schedule, epochs) != fit_epochs(held.schedule, epochs):  # held's counts would not make it
        counts = f" and counts ({', '.join(changed)})" if changed else ""
        raise PgpsError(f"{path} already holds these stages with other stage lengths{counts}, which nnU-Net's "
                        f"-tr {trainer} trains; {move}")
    keep = " ".join(f"{flag} {a}" for _, flag, a, b in pairs if a != b)
    raise PgpsError(f"{path} already holds this schedule with other counts ({', '.join(changed)}), which nnU-Net's "
                    f"-tr {trainer} trains; give {keep} to keep them, or {move}")


def export_for_nnunet(s: sch.Schedule, plan: NnunetPlan, trainer: str = TRAINER, **counts: int | None) -> Path:
    """Write ``s`` as the nnU-Net schedule file beside the plans; returns its path.

    ``counts``: ``num_epochs`` / ``num_iterations_per_epoch`` / ``num_val_iterations_per_epoch`` written into
    the file (None: nnU-Net's default).  A different schedule already there is not replaced (see
    :func:`_check_beside`).
    """
    check_trainer_name(trainer)
    f = for_nnunet(s, plan, **counts)
    fit_epochs(f.schedule, trained_counts(f)[0])  # more stages than epochs: refused now, not when nnU-Net starts
    path = schedule_file_for(plan, trainer)
    _check_beside(path, f, plan, trainer)
    return f.save(path)


def _sweep_searched(meta: dict[str, Any], plan: NnunetPlan) -> bool:
    """Whether the sweep in ``meta`` searched the plans' dataset (by its nnU-Net folder name or dataset name).
    The dataset of its plans counts where its trials trained nnU-Net's data; pgps-tune's trainer read --data."""
    names = {str(meta.get("dataset", "")), Path(str(meta.get("data", ""))).name}
    on = meta.get("nnunet")
    if isinstance(on, dict) and on.get("trainer", "nnunet") == "nnunet":
        names.add(str(on.get("dataset", "")))
    return plan.dataset in names


def tuned_on(plan: NnunetPlan, trainer: str) -> dict[str, Any]:
    """What sweep.json keeps (as ``nnunet``) of the plans a sweep's schedules were tuned on, by either trainer
    (``budget.trainer``): the plans and configuration, and what ``export --nnunet`` compares with the plans it
    writes for (see :func:`_check_sweep_plans`), as they were when the sweep ran (the plans may be planned
    again since).  ``spacing`` in pgps-tune's axis order."""
    cfg = _resolve_configuration(plan.plans["configurations"], plan.configuration, str(plan.source))
    arch = cfg.get("architecture")
    network = arch.get("network_class_name") if isinstance(arch, dict) else cfg.get("UNet_class_name")
    return {"plans": str(plan.source), "plans_name": plan.plans_name, "configuration": plan.configuration,
            "dataset": plan.dataset, "trainer": trainer, "spacing": list(plan.spacing),
            "normalization": _normalization(cfg), "batch_size": plan.batch_size,
            "network": str(network).rsplit(".", 1)[-1] if network else None}


def _normalization(cfg: dict[str, Any]) -> list[str] | None:
    """A configuration's intensity normalisation per channel (nnU-Net's scheme, ``+mask`` where it normalises
    inside the foreground mask only), None where the plans do not say."""
    schemes, masks = cfg.get("normalization_schemes"), cfg.get("use_mask_for_norm")
    if not isinstance(schemes, list):
        return None
    masks = masks if isinstance(masks, list) and len(masks) == len(schemes) else [False] * len(schemes)
    return [f"{s}{'+mask' if m else ''}" for s, m in zip(schemes, masks)]


def _check_sweep_plans(experiment: str | Path, meta: dict[str, Any], plan: NnunetPlan,
                       command: str = "export") -> str | None:
    """Refuse exporting a sweep tuned on nnU-Net's plans (``tune --nnunet-plans``, with either trainer) for a
    configuration whose data differ from those it was tuned on: another spacing (3d_lowres is resampled
    coarser than 3d_fullres) or normalisation, in these plans, in other plans of the dataset, or in these plans
    planned again since, even where the patch and network are the same.  A configuration of the same data
    (3d_cascade_fullres beside a sweep of 3d_fullres; nnUNetResEncUNetMPlans' 3d_fullres beside nnUNetPlans')
    passes with a note (returned) saying what else differs.  Another final patch is left to
    :func:`check_schedule`, whose refusal names the configurations the schedule fits.  A sweep of pgps-tune's
    trainer from before sweep.json kept its plans is not compared (only its patch is).  ``command``: ``export``,
    or ``nnunet-train`` (``meta`` then made of an exported schedule's, :func:`check_tuned_schedule`), whose
    fixes the refusal names."""
    train = command == "nnunet-train"
    verb = "train" if train else "export"
    on = meta.get("nnunet")
    if not isinstance(on, dict) or not isinstance(on.get("configuration"), str):
        return None
    swept, name = on["configuration"], str(on.get("plans_name") or Path(str(on.get("plans", ""))).stem)
    same_plans = name == plan.plans_name
    if "spacing" in on:  # as it was when the sweep ran
        was: dict[str, Any] | None = on
        spacing = on["spacing"]
        if not valid_spacing(spacing):
            raise PgpsError(f"{Path(experiment) / 'sweep.json'}: nnunet.spacing {spacing!r} is not 3 positive "
                            f"numbers (damaged); restore the file, or add --other-configuration to {verb} without "
                            "comparing the plans")
        if meta.get("final_patch") is not None and list(meta["final_patch"]) != list(plan.final_patch):
            return None
    elif same_plans and swept == plan.configuration:  # a budget.trainer nnunet sweep from before the record
        return None
    else:  # its configuration as its plans file (else these plans) holds it now
        recorded = Path(str(on.get("plans", "")))
        try:
            was = tuned_on(read_plans(recorded if not same_plans and recorded.is_file() else plan.source, swept),
                           "nnunet")
        except PgpsError:  # these plans do not hold it (or not as a 3-D configuration)
            was = None
    here = tuned_on(plan, str(on.get("trainer", "nnunet")))
    if was is None:
        raise PgpsError(f"{experiment}: its trials trained nnU-Net's {swept}, which {plan.source} does not hold as a "
                        f"3-D configuration, so its schedule was not measured for {plan.configuration}; "
                        f"{_give(train, swept)}, run a sweep with --nnunet-plans {plan.source} --configuration "
                        f"{plan.configuration}, or add --other-configuration to {verb} it for {plan.configuration} "
                        "anyway")
    from pgps_tune.results import same_tuned_data

    same_spacing, same_norm = same_tuned_data(was, here)
    norm = was.get("normalization") if isinstance(was.get("normalization"), list) else None
    replanned = (name, swept) == (plan.plans_name, plan.configuration)
    if same_spacing and same_norm:
        return None if replanned else _same_data_note(experiment, f"{swept} of {name}", was, here, plan,
                                                      meta.get("pools"), "pgps-tune" if train else command)
    norms = ["" if same_norm else f", normalisation {'/'.join(map(str, n))}" for n in (norm, here["normalization"])]
    then = swept if same_plans else f"{swept} of {name}"
    target = plan.configuration if same_plans else f"{plan.configuration} of {plan.plans_name}"
    if on.get("trainer", "nnunet") == "nnunet":
        tuned = f"its trials trained nnU-Net's {swept} data{'' if same_plans else f' of {name}'}"
        now = (f"the data {plan.source} plans for {target} now" if replanned else
               f"{target}'s" if same_plans else f"the data of {target}")
    else:
        tuned = f"it was tuned for nnU-Net's {then}"
        now = f"{target} as {plan.source} plans it now" if replanned else target
    give = ("" if replanned else f"{_give(train, swept)}, " if same_plans else
            f"{_give(train, swept, name if train else on.get('plans'))}, ")
    raise PgpsError(f"{experiment}: {tuned} (spacing {spacing_text(was['spacing'])}, x y z{norms[0]}), not {now} "
                    f"(spacing {spacing_text(plan.spacing)}{norms[1]}), so its schedule was not measured for {target}; "
                    f"{give}run a sweep with --nnunet-plans {plan.source} --configuration {plan.configuration}, or "
                    f"add --other-configuration to {verb} it for {target} anyway")


def _give(train: bool, configuration: str, plans: Any = None) -> str:
    """How ``export --nnunet`` (``--nnunet PLANS --configuration C``), or ``nnunet-train`` (``DATASET C FOLD
    --plans NAME``), is given the configuration (of other plans) a schedule was tuned on."""
    if train:
        return f"train {configuration}{f' with --plans {plans}' if plans else ''} instead"
    return f"give {f'--nnunet {plans} ' if plans else ''}--configuration {configuration}"


def check_tuned_schedule(path: str | Path, plan: NnunetPlan) -> str | None:
    """Refuse training the pgps-tune schedule file ``path`` for ``plan`` where its sweep was tuned on another
    configuration's data, as ``export --nnunet`` refuses exporting it (:func:`_check_sweep_plans`), from what
    the exported schedule keeps of them (``meta.nnunet``, :func:`pgps_tune.results.tuned_record`); a note (or
    None) where only the name differs.  Not compared: a schedule without that record, or of another dataset
    (its ``meta.dataset``, its recipe's data folder, or for nnU-Net's trials its plans' dataset, as
    :func:`_sweep_searched` tells a sweep's), and nnU-Net's schedule files, which name the plans they are for
    (``export --nnunet`` compared them)."""
    from pgps_tune.errors import read_yaml

    data = read_yaml(path, "schedule", "check the path, or write one with 'pgps-tune schedule --out'")
    if not isinstance(data, dict) or data.get("format") == FILE_FORMAT:
        return None
    s = sch.Schedule.from_dict(data, str(path))
    on = s.meta.get("nnunet")
    meta = {"dataset": str(s.meta.get("dataset", "")), "nnunet": on, "final_patch": list(s.final_patch),
            "pools": list(s.pools), "data": s.recipe.data.source if s.recipe is not None else ""}  # as sweep.json's
    if not isinstance(on, dict) or not _sweep_searched(meta, plan):
        return None
    return _check_sweep_plans(path, meta, plan, "nnunet-train")


def _same_data_note(experiment: str | Path, swept: str, was: dict[str, Any], here: dict[str, Any],
                    plan: NnunetPlan, pools: Any = None, command: str = "export") -> str:
    """The note of an export to another configuration or plans of the same data: what else differs (``pools``:
    the sweep's poolings per axis, pgps-tune's order)."""
    other = []
    if None not in (was.get("network"), here["network"]) and was["network"] != here["network"]:
        other.append(f"its network is {here['network']}, not {was['network']}")
    if isinstance(pools, list) and pools != list(plan.pools):
        other.append(f"its poolings per axis are {'x'.join(map(str, plan.pools))}, not {'x'.join(map(str, pools))} "
                     "(x y z)")
    if was.get("batch_size") not in (None, here["batch_size"]):
        other.append(f"its batch size is {here['batch_size']}, not {was['batch_size']}")
    but = f", but {' and '.join(other)}" if other else ""
    return (f"{command}: note: {experiment} was tuned on {swept}; {plan.configuration} of {plan.plans_name} trains "
            f"the same data (spacing {spacing_text(plan.spacing)}, x y z){but}")


def spacing_text(values: Sequence[float]) -> str:
    """A spacing as messages show it: ``1x0.5x2``."""
    return "x".join(f"{float(v):g}" for v in values)


def valid_spacing(v: Any) -> bool:
    """Whether ``v`` is 3 positive finite numbers (the spacing of a record :func:`tuned_on` writes)."""
    return isinstance(v, list) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)


COUNT_FLAGS = {"num_epochs": "--epochs", "num_iterations_per_epoch": "--iterations-per-epoch",
               "num_val_iterations_per_epoch": "--val-iterations-per-epoch"}


def _export_counts(meta: dict[str, Any], s: sch.Schedule, given: dict[str, int | None]
                   ) -> tuple[dict[str, int | None], dict[str, str]]:
    """The counts ``export --nnunet`` writes, and where each comes from: the flag given, else (a sweep whose
    trials trained with nnU-Net) the budget the schedule was scored at, else nnU-Net's default (left null)."""
    budget = (meta.get("trial_setup") or {}).get("budget") or {}
    tuned: dict[str, Any] = {}
    if budget.get("trainer") == "nnunet":  # s.epochs: the search's, or a confirmation's when it chose the winner
        tuned = {"num_epochs": s.epochs, "num_iterations_per_epoch": budget.get("iterations_per_epoch"),
                 "num_val_iterations_per_epoch": budget.get("nnunet_val_iterations")}
    counts: dict[str, int | None] = {}
    origins: dict[str, str] = {}
    for key, flag in COUNT_FLAGS.items():
        value = tuned.get(key)
        if given.get(key) is not None:
            counts[key], origins[key] = given[key], flag
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            counts[key], origins[key] = value, "as the sweep's nnU-Net trials trained"
        else:
            counts[key], origins[key] = None, "nnU-Net's default"
    return counts, origins


def counts_line(f: NnunetSchedule, origins: dict[str, str]) -> str:
    """What ``export --nnunet`` says nnU-Net will train: the three counts and where each came from."""
    epochs, iterations, val = trained_counts(f)
    by: dict[str, list[str]] = {}
    for key, what in zip(COUNT_FLAGS, ("epochs", "iterations", "validation iterations")):
        by.setdefault(origins[key], []).append(what)
    where = "; ".join(f"{', '.join(whats)}: {origin}" for origin, whats in by.items())
    return (f"nnU-Net trains {epochs} epochs x {iterations} iterations, {val} validation iterations per epoch "
            f"({where}; change with {', '.join(COUNT_FLAGS.values())})")


def _configurations_for(s: sch.Schedule, plan: NnunetPlan, nnunet_trainer: bool = True) -> list[str]:
    """The other configurations of ``plan``'s plans file whose network trains ``s`` (for a refusal's fix: a
    sweep on 3d_fullres exported with ``--configuration 3d_lowres``)."""
    if s.final_patch == plan.final_patch:
        return []
    fits = []
    for name in sorted(plan.plans["configurations"]):
        try:
            other = read_plans(plan.source, name)
            check_schedule(s, other, nnunet_trainer=nnunet_trainer)
        except PgpsError:  # 2-D, another patch, damaged: not one to name
            continue
        fits.append((previous_stage(other) is not None, name))  # a cascade's second stage last
    return [name for _, name in sorted(fits)]


def _fits_fix(s: sch.Schedule, plan: NnunetPlan, otherwise: str, alone: str, nnunet_trainer: bool = True) -> str:
    """The fix of a refusal of ``s`` for ``plan`` (:func:`check_schedule`): the configurations of these plans it
    fits where there are any, else ``alone``."""
    fits = _configurations_for(s, plan, nnunet_trainer)
    return (f"it fits {' and '.join(fits)} of these plans: give --configuration {fits[0]}, or {otherwise}" if fits
            else alone)


def check_plan_schedule(s: sch.Schedule, plan: NnunetPlan) -> None:
    """Refuse a schedule file for pgps-tune's trainer on ``plan`` (``train`` / ``schedule --from`` with
    ``--nnunet-plans``) that the plan's network cannot train, naming the configurations it fits (a best schedule
    of a sweep on another configuration); random sampling is pgps-tune's to draw."""
    build = "build the schedule with --nnunet-plans"
    check_schedule(s, plan, fix=_fits_fix(s, plan, build, build, nnunet_trainer=False), nnunet_trainer=False)


def prepare_export(experiment: str | Path, plans: str | Path, configuration: str = "3d_fullres",
                   trainer: str = TRAINER, pick: str | None = None, other_dataset: bool = False,
                   other_configuration: bool = False, counts: dict[str, int | None] | None = None
                   ) -> tuple[Path, NnunetSchedule, dict[str, str], str | None]:
    """Everything ``export --nnunet`` checks before it writes anything; returns where and what to write,
    where each of its counts comes from (see :func:`_export_counts`), and a note for the user (or None).

    Refused in one line: a bad trainer name or plans; a sweep of another dataset than the plans'
    (a synthetic one included) unless ``other_dataset``; a sweep tuned on another configuration's data (of
    these plans or others) unless ``other_configuration`` (see :func:`_check_sweep_plans`); a best
    schedule the plans' network cannot train, or with more stages than epochs; a different schedule file
    (or other counts) already beside the plans.  The best schedule is the one ``export`` writes as
    best_schedule.yaml (picked by a dry export into a temporary folder).  ``counts``: ``num_epochs`` /
    ``num_iterations_per_epoch`` / ``num_val_iterations_per_epoch`` given on the command line.
    """
    from pgps_tune.results import read_meta
    from pgps_tune.tuner import export

    check_trainer_name(trainer)
    plan = read_plans(plans, configuration)
    meta = read_meta(experiment)
    if not other_dataset and not _sweep_searched(meta, plan):
        raise PgpsError(
            f"{experiment} searched {meta.get('dataset')} ({meta.get('data')}), not {plan.dataset} of {plan.source}; "
            f"export a sweep of {plan.dataset}, or add --other-dataset to train this schedule on {plan.dataset} anyway"
        )
    note = None
    if not other_configuration and _sweep_searched(meta, plan):  # another dataset: --other-dataset took that
        note = _check_sweep_plans(experiment, meta, plan)
    with tempfile.TemporaryDirectory(prefix="pgps-export-") as tmp:
        export(experiment, Path(tmp) / "out", results_store=Path(tmp) / "store", pick=pick)
        best = Path(tmp) / "out" / "best_schedule.yaml"
        if not best.is_file():
            raise PgpsError(f"{experiment} has no best schedule to export for nnU-Net (no completed trial)")
        s = sch.load(best)
    check_schedule(s, plan, fix=_fits_fix(s, plan, f"run a sweep with --nnunet-plans {plan.source} --configuration "
                                               f"{plan.configuration}", "run the sweep with --nnunet-plans so that "
                                               "it searches on the plans' patch"))
    chosen, origins = _export_counts(meta, s, counts or {})
    f = for_nnunet(s, plan, **chosen)
    epochs = trained_counts(f)[0]
    if epochs < len(s.stages):
        raise PgpsError(f"the best schedule has {len(s.stages)} stages but nnU-Net would train {epochs} epochs "
                        f"({origins['num_epochs']}); give --epochs {len(s.stages)} or more")
    path = schedule_file_for(plan, trainer)
    _check_beside(path, f, plan, trainer)
    return path, f, origins, note


# -- the trainer ------------------------------------------------------------------------------------


def is_trainer_name(name: str) -> bool:
    """Whether ``name`` is this trainer: ``nnUNetTrainerPGPS`` or ``nnUNetTrainerPGPS_SUFFIX``."""
    return bool(_TRAINER_NAME.match(name))


def check_trainer_name(name: str) -> None:
    if not is_trainer_name(name):
        raise PgpsError(
            f"trainer name {name!r} must be {TRAINER} or {TRAINER}_SUFFIX (letters and digits, single _ between), "
            "so nnU-Net's tools can find it"
        )


def trainer_plan(plans: dict[str, Any], configuration: str, preprocessed_dir: str | Path | None) -> NnunetPlan:
    """The plan of a trainer nnU-Net built from a plans dict (and where its preprocessed data lives)."""
    base = Path(preprocessed_dir) if preprocessed_dir else None
    source = base / f"{plans.get('plans_name', 'nnUNetPlans')}.json" if base else "<plans>"
    axes = _file_axes(base, str(plans.get("image_reader_writer", ""))) if base else None
    return plan_from_dict(plans, configuration, source, axes)


def resolve_trainer_schedule(plans: dict[str, Any], configuration: str, trainer: str,
                             preprocessed_dir: str | Path | None, fold_dir: str | Path | None) -> NnunetSchedule:
    """The schedule an nnU-Net trainer runs (lookup order in the module docstring)."""
    base = Path(preprocessed_dir) if preprocessed_dir else None
    plan = trainer_plan(plans, configuration, base)
    named = os.environ.get(SCHEDULE_ENV)
    if named:
        return read_schedule(named, plan)
    candidates = [schedule_file_for(plan, trainer)] if base else []
    candidates += [Path(fold_dir) / RUN_RECORD] if fold_dir else []
    for path in candidates:
        if path.is_file():
            return read_schedule(path, plan)
    raise PgpsError(
        f"{trainer} found no schedule: set {SCHEDULE_ENV}=FILE, or write "
        f"{candidates[0] if candidates else 'the file beside the plans'} with 'pgps-tune export --nnunet'"
    )


def fit_epochs(s: sch.Schedule, epochs: int) -> sch.Schedule:
    """``s`` stretched or shrunk to ``epochs`` (unchanged when it already has that many)."""
    if epochs < len(s.stages):
        raise PgpsError(f"the schedule has {len(s.stages)} stages but nnU-Net trains {epochs} epochs; "
                        "give at least one epoch per stage")
    return s if s.epochs == epochs else sch.rescale_epochs(s, epochs)


def _stage_lines(s: sch.Schedule) -> Iterator[str]:
    for i, (st, start) in enumerate(zip(s.stages, s.stage_starts())):
        yield (f"  stage {i}: epochs {start}-{start + st.epochs - 1}, patch {'x'.join(map(str, st.patch_size))}, "
               f"batch {st.batch_size}")


def trainer_class(name: str = TRAINER) -> type:
    """nnU-Net's trainer with a patch-size curriculum (built on first use: nnunetv2 is optional).

    Any ``nnUNetTrainerPGPS_SUFFIX`` is the same trainer under another name, so runs with
    different schedules get different nnU-Net result folders.  One class per name.
    """
    check_trainer_name(name)
    require_nnunet()
    return _trainer_class(name)


@functools.cache
def _trainer_class(name: str) -> type:
    if name != TRAINER:
        base = _trainer_class(TRAINER)
        return type(name, (base,), {"__doc__": base.__doc__, "__module__": __name__})
    return _define_trainer()


def _define_trainer() -> type:
    import torch
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from pgps_tune.network import _swap_instance_norms

    def shut_down(loader: Any) -> None:
        if hasattr(loader, "_finish"):
            loader._finish()

    class nnUNetTrainerPGPS(nnUNetTrainer):
        """nnU-Net's trainer; the training patch and batch follow a pgps-tune schedule.

        The stage is a function of ``current_epoch`` alone, so a run continued from any
        checkpoint (also one saved at a stage boundary, which this trainer always writes)
        trains the right stage.  Validation and inference stay at the plans' patch.
        """

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
            continuing = bool(plans.get("continue_training"))  # nnU-Net's __init__ pops it
            super().__init__(plans, configuration, fold, dataset_json, device)
            if self.is_ddp:
                raise PgpsError(f"{type(self).__name__} trains on one device; drop -num_gpus")
            f = resolve_trainer_schedule(self.plans_manager.plans, configuration, type(self).__name__,
                                         self.preprocessed_dataset_folder_base, self.output_folder)
            self.num_epochs = f.num_epochs or self.num_epochs
            self.num_iterations_per_epoch = f.num_iterations_per_epoch or self.num_iterations_per_epoch
            self.num_val_iterations_per_epoch = f.num_val_iterations_per_epoch or self.num_val_iterations_per_epoch
            self.pgps_file = replace(f, schedule=fit_epochs(f.schedule, self.num_epochs),
                                     num_epochs=self.num_epochs, num_iterations_per_epoch=self.num_iterations_per_epoch,
                                     num_val_iterations_per_epoch=self.num_val_iterations_per_epoch)
            self.pgps_stage: int | None = None
            record = Path(self.output_folder) / RUN_RECORD
            if continuing and record.is_file():
                plan = trainer_plan(self.plans_manager.plans, configuration, self.preprocessed_dataset_folder_base)
                started = read_schedule(record, plan)
                counts = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")
                changed = [f"{k} {getattr(started, k)} -> {getattr(self.pgps_file, k)}" for k in counts
                           if getattr(started, k) != getattr(self.pgps_file, k)]
                if changed:
                    raise PgpsError(f"this run was started with other counts ({', '.join(changed)}; kept in "
                                    f"{record}); continue it with those, or start a new run")
                if started != self.pgps_file:
                    raise PgpsError(f"this run was started with the schedule in {record}; continue it with that "
                                    f"schedule ({SCHEDULE_ENV}={record}) or start a new run")

        @property
        def pgps_schedule(self) -> sch.Schedule:
            return self.pgps_file.schedule

        @staticmethod
        def build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision=True) -> torch.nn.Module:
            # a stage of one pooling increment leaves a 1x1x1 bottleneck: see pgps_tune.network
            net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
            _swap_instance_norms(net)
            return net

        def stage_at(self, epoch: int) -> int:
            return self.pgps_schedule.stage_index_at(min(epoch, self.pgps_schedule.epochs - 1))

        def on_train_start(self) -> None:
            self.pgps_file.save(Path(self.output_folder) / RUN_RECORD)
            self.pgps_stage = self.stage_at(self.current_epoch)
            super().on_train_start()  # builds the loaders through get_dataloaders
            lines = "\n".join(_stage_lines(self.pgps_schedule))
            self.print_to_log_file(f"pgps-tune schedule (nnU-Net axis order):\n{lines}", add_timestamp=False)

        def get_dataloaders(self):
            # nnU-Net's own loaders at the plans' patch; validation keeps its loader, training gets the stage's
            train, val = super().get_dataloaders()
            shut_down(train)
            return self._stage_loader(self.pgps_stage), val

        def _stage_loader(self, index: int):
            stage = self.pgps_schedule.stages[index]
            patch = list(stage.patch_size)
            # rotation, dummy-2D and mirroring are decided on the final patch, so every stage augments alike
            rotation, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
            if dummy_2d:
                initial[0] = patch[0]
            lm = self.label_manager
            transforms = self.get_training_transforms(
                patch, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
                use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
                foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
                ignore_label=lm.ignore_label)
            dataset_tr, _ = self.get_tr_and_val_datasets()
            loader = nnUNetDataLoader(dataset_tr, stage.batch_size, initial, patch, lm,
                                      oversample_foreground_percent=self.oversample_foreground_percent,
                                      sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                      probabilistic_oversampling=self.probabilistic_oversampling)
            procs = get_allowed_n_proc_DA()
            if procs == 0:
                return SingleThreadedAugmenter(loader, None)
            return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=procs,
                                                num_cached=max(6, procs // 2), seeds=None,
                                                pin_memory=self.device.type == "cuda", wait_time=0.002)

        def on_train_epoch_start(self) -> None:
            index = self.stage_at(self.current_epoch)
            if index != self.pgps_stage:
                shut_down(self.dataloader_train)
                self.pgps_stage = index
                self.dataloader_train = self._stage_loader(index)
            super().on_train_epoch_start()
            st = self.pgps_schedule.stages[index]
            self.print_to_log_file(f"pgps-tune stage {index}: patch {'x'.join(map(str, st.patch_size))}, "
                                   f"batch {st.batch_size}")

        def on_epoch_end(self) -> None:
            last_of_stage = self.current_epoch + 1 in self.pgps_schedule.stage_starts()[1:]
            super().on_epoch_end()  # increments current_epoch
            if last_of_stage:
                # a checkpoint at every stage boundary, stored the way nnU-Net stores its own
                self.current_epoch -= 1
                self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
                self.current_epoch += 1

    return nnUNetTrainerPGPS


# -- training through nnU-Net ---------------------------------------------------------------------


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ext_trainer_path() -> str:
    """``nnUNet_extTrainer`` with pgps-tune's trainer folder first (nnU-Net searches each in turn)."""
    rest = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != str(TRAINER_DIR)]
    return os.pathsep.join([str(TRAINER_DIR), *rest])


def lookup_note() -> str | None:
    """Why nnU-Net's trainer lookup by name (``nnUNetv2_train -tr``, ``nnUNetv2_predict``) would fail here, if it would.

    The lookup imports every trainer nnU-Net ships, and its Primus trainers import timm, which
    imports torchvision: PyPI's build of it does not import beside a CPU build of torch.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision  # noqa: F401
    except Exception as exc:  # a build for another torch raises RuntimeError, not ImportError
        import torch

        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return (f"nnU-Net's tools that find the trainer by name (nnUNetv2_predict, nnUNetv2_train -tr) import "
                f"torchvision, which does not import here ({why}); install the build that matches torch "
                f"{torch.__version__} (docs/NNUNET.md)")
    return None


def run_folder(plan: NnunetPlan, fold: str | int, trainer: str = TRAINER) -> Path:
    """nnU-Net's result folder for this run: nnUNet_results/DATASET/TRAINER__PLANS__CONFIG/fold_F."""
    name = f"{trainer}__{plan.plans_name}__{plan.configuration}"
    return env_folder("nnUNet_results", must_exist=False) / plan.dataset / name / f"fold_{fold_name(fold)}"


_FOLD = re.compile(r"^\+?[0-9]+$")  # ASCII digits only, as nnU-Net's int() of its folder name
DEFAULT_FOLDS = 5  # nnU-Net's split when the dataset has no splits_final.json yet
DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_VAL_ITERATIONS = 1000, 250, 50  # nnU-Net's trainer's counts


def dataset_folds(preprocessed: Path) -> int:
    """How many folds nnU-Net splits this dataset into: ``splits_final.json``'s, else nnU-Net's 5."""
    path = preprocessed / "splits_final.json"
    if not path.is_file():
        return DEFAULT_FOLDS
    splits = read_json(path, "nnU-Net's split file", "delete it to let nnU-Net write a new 5-fold split")
    if not isinstance(splits, list) or not splits:
        raise PgpsError(f"{path} is not nnU-Net's list of folds; delete it to let nnU-Net write a new 5-fold split")
    return len(splits)


def fold_name(fold: str | int, folds: int | None = None) -> str:
    """``fold`` as nnU-Net names its folder (``fold_<int>``): ``00``, ``+0``, `` 0`` are fold ``0``; or ``all``.

    With ``folds`` (the dataset's, see :func:`dataset_folds`) a fold beyond them is refused: nnU-Net
    would quietly train it on a random 80:20 split instead of one of the dataset's folds.
    """
    text = str(fold).strip()
    if text == "all":
        return text
    if not _FOLD.match(text):
        raise PgpsError(f"fold must be a whole number (0-{(folds or DEFAULT_FOLDS) - 1} for the dataset's split) "
                        f"or 'all', got {str(fold)!r}")
    number = int(text)
    if folds is not None and number >= folds:
        raise PgpsError(
            f"fold {number} is not one of the dataset's {folds} folds (0-{folds - 1}; nnU-Net would train it on a "
            "random 80:20 split instead); use 0-{0} or 'all', or add the split to splits_final.json".format(folds - 1)
        )
    return str(number)


def torch_device(name: str):
    """The torch device of a --device value (auto: cuda where one is visible), refused in one line if unusable."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise PgpsError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise PgpsError("--device cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def check_preprocessed(plan: NnunetPlan) -> None:
    """Refuse a plan whose configuration nnU-Net has not preprocessed (its data folder beside the plans)."""
    data = plan.source.parent / plan.data_identifier
    if not data.is_dir():
        raise PgpsError(f"{data} does not exist; run nnUNetv2_plan_and_preprocess -d {plan.dataset} "
                        f"-c {plan.configuration} first")


def previous_stage(plan: NnunetPlan) -> str | None:
    """The configuration whose predictions this one trains on (nnU-Net's cascade: ``3d_cascade_fullres``
    on ``3d_lowres``), or None."""
    cfg = _resolve_configuration(plan.plans["configurations"], plan.configuration, str(plan.source))
    prev = cfg.get("previous_stage")
    return str(prev) if prev else None


def check_previous_stage(plan: NnunetPlan, trainer: str) -> None:
    """Refuse a cascade configuration whose previous stage has not predicted every case yet.

    nnU-Net reads them from that stage's run of the same trainer name (its validation writes them to
    ``predicted_next_stage``), and without them stops inside the data loader with a missing file.
    """
    prev = previous_stage(plan)
    if prev is None:
        return
    folder = (env_folder("nnUNet_results", must_exist=False) / plan.dataset
              / f"{trainer}__{plan.plans_name}__{prev}" / "predicted_next_stage" / plan.configuration)
    have: set[str] = set()
    for f in folder.iterdir() if folder.is_dir() else ():
        have |= {f.name[:-len(e)] for e in (".b2nd", ".npz", ".npy") if f.name.endswith(e)}
    cases = sorted(p.name[:-4] for p in (plan.source.parent / plan.data_identifier).glob("*.pkl"))
    missing = [c for c in cases if c not in have]
    if missing:
        raise PgpsError(f"{plan.configuration} trains on the {prev} predictions of {trainer}, and {folder} lacks "
                        f"{len(missing)} of {len(cases)} case(s) (e.g. {missing[0]}); first train {prev} with the "
                        f"same trainer name on every fold (nnunet-train {plan.dataset} {prev} FOLD --trainer {trainer})"
                        ", whose validation writes them")


def check_dataset_json(plan: NnunetPlan, dataset_json: dict[str, Any]) -> None:
    """Refuse a preprocessed dataset.json whose channels or labels are not those of the preprocessed data.

    nnU-Net builds its network from dataset.json, so an edited file would only fail deep inside
    training (channels) or train a network with classes the data never has (labels).  The channels
    are compared with ``dataset_fingerprint.json``, the labels with one preprocessed case's
    foreground classes (its ``.pkl``, which nnU-Net's preprocessing writes from the labels it used).
    """
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    base = plan.source.parent
    where = f"{base / 'dataset.json'}"
    fix = f"regenerate with nnUNetv2_plan_and_preprocess -d {plan.dataset} (or restore {where})"
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(names, dict) or not names:
        raise PgpsError(f"{where} has no channel_names; {fix}")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise PgpsError(f"{where} has no labels; {fix}")
    fingerprint = base / "dataset_fingerprint.json"
    if fingerprint.is_file():
        fp = read_json(fingerprint, "nnU-Net dataset fingerprint", REPLAN)
        per_channel = fp.get("foreground_intensity_properties_per_channel") if isinstance(fp, dict) else None
        if isinstance(per_channel, dict) and len(per_channel) != len(names):
            raise PgpsError(f"{where} names {len(names)} channel(s) but the preprocessed data have "
                            f"{len(per_channel)} ({fingerprint.name}); {fix}")
    cases = sorted((base / plan.data_identifier).glob("*.pkl"))
    if not cases:
        return
    try:
        with open(cases[0], "rb") as fh:
            props = _PlainUnpickler(fh).load()  # nnU-Net's properties file: numpy and plain data, nothing else
        seen = props["class_locations"]
    except Exception as exc:  # a damaged pickle raises many types
        why = brief(exc) if str(exc).strip() else "damaged"
        raise PgpsError(f"cannot read {cases[0]} ({type(exc).__name__}: {why}); {fix}") from None
    try:
        lm = LabelManager(labels, dataset_json.get("regions_class_order"))
        want = list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        if lm.has_ignore_label:  # nnU-Net's preprocessing also samples every annotated class: [-1, *labels]
            want.append([-1, *lm.all_labels])
    except Exception as exc:  # nnU-Net asserts on inconsistent label dicts
        raise PgpsError(f"{where}: nnU-Net cannot read its labels ({type(exc).__name__}: {exc}); {fix}") from None

    def key(v: Any) -> str:
        return str(tuple(int(i) for i in v) if isinstance(v, list | tuple) else int(v))

    if sorted(map(key, want)) != sorted(map(key, seen)):
        raise PgpsError(f"{where} gives the foreground class(es) {sorted(map(key, want))} but the preprocessed data "
                        f"have {sorted(map(key, seen))} ({cases[0].name}); {fix}")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and dtypes and Python's plain containers only: a file of a
    preprocessed folder someone handed over cannot name a function (os.system, eval, ...) to be run."""
    ALLOWED = {(m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a properties file never holds")


def _plans_file(base: Path, identifier: str) -> Path:
    """The plans file of ``--plans IDENTIFIER``: refused in one line when it is a path or not there."""
    present = sorted(p.stem for p in base.glob("*Plans.json") if p.is_file())
    listing = f"{base} holds {', '.join(present)}" if present else f"{base} holds no *Plans.json"
    path = base / f"{identifier}.json"
    if "/" in identifier or os.sep in identifier or identifier.endswith(".json") or not path.is_file():
        raise PgpsError(f"--plans takes the plans identifier (the file name without .json, e.g. nnUNetPlans), "
                        f"got {identifier!r}; {listing}")
    return path


def _continue_checks(record: Path, plan: NnunetPlan, given: NnunetSchedule | None,
                     counts: dict[str, int | None]) -> NnunetSchedule:
    """The run's own schedule and counts; a flag or schedule that would change them is refused, naming it."""
    started = read_schedule(record, plan)
    flags = {"num_epochs": ("--epochs", "epochs"), "num_iterations_per_epoch": ("--iterations-per-epoch",
             "iterations per epoch"), "num_val_iterations_per_epoch": ("--val-iterations-per-epoch",
                                                                      "validation iterations per epoch")}
    for key, value in counts.items():
        have = getattr(started, key)
        if value is not None and have is not None and value != have:
            flag, what = flags[key]
            raise PgpsError(f"this run trains {have} {what}, not {value}; drop {flag} to continue it "
                            "(or start a new run)")
    if given is not None:
        fitted = fit_epochs(given.schedule, started.num_epochs or started.schedule.epochs)
        if fitted != started.schedule:
            raise PgpsError(f"this run was started with another schedule (kept in {record}); drop --schedule to "
                            "continue it with that one (or start a new run)")
    return started


def train(dataset: str, configuration: str, fold: str | int, schedule: str | Path | None = None, *,
          device: str = "auto", continue_training: bool = False, epochs: int | None = None,
          iterations_per_epoch: int | None = None, val_iterations_per_epoch: int | None = None,
          trainer: str = TRAINER, plans_identifier: str = "nnUNetPlans", save_probabilities: bool = False,
          other_configuration: bool = False) -> Path:
    """Train one fold with nnU-Net's trainer following ``schedule``; returns nnU-Net's fold folder.

    Without ``schedule`` the run uses the file beside the plans, or (continuing) the schedule it
    was started with.  Epoch and iteration counts: the arguments, else (continuing) the run's own,
    else the schedule file's ``num_epochs``/..., else nnU-Net's (1000 / 250 / 50).
    Checks what nnU-Net would only find late or print as a warning (a missing checkpoint to
    continue, a run that would be overwritten, a fold outside the dataset's split, a dataset.json
    that disagrees with the preprocessed data) before anything is written, and, unless
    ``other_configuration``, a schedule exported from a sweep tuned on another configuration's data
    (:func:`check_tuned_schedule`).
    """
    fold_name(fold)  # the spelling, before anything else
    require_nnunet()
    check_trainer_name(trainer)
    counts = {"num_epochs": epochs, "num_iterations_per_epoch": iterations_per_epoch,
              "num_val_iterations_per_epoch": val_iterations_per_epoch}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise PgpsError(f"{name.replace('num_', '').replace('_', ' ')} must be >= 1, got {value}")
    base = find_dataset(dataset, "nnUNet_preprocessed")
    plan = read_plans(_plans_file(base, plans_identifier), configuration)
    check_preprocessed(plan)
    fold = fold_name(fold, dataset_folds(base))
    dataset_json = read_json(base / "dataset.json", "nnU-Net dataset description", REPLAN)
    if not isinstance(dataset_json, dict):
        raise PgpsError(f"{base / 'dataset.json'} is not a JSON object; {REPLAN}")
    check_dataset_json(plan, dataset_json)
    check_previous_stage(plan, trainer)
    out = run_folder(plan, fold, trainer)
    has_run = any((out / f).is_file() for f in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"))
    if continue_training and not has_run:
        raise PgpsError(f"nothing to continue in {out} (no checkpoint); run without --continue to start")
    if has_run and not continue_training:
        raise PgpsError(f"{out} already holds a run; add --continue to continue it, or use another --trainer name")
    if schedule is None and not continue_training:
        schedule = schedule_file_for(plan, trainer)
        if not Path(schedule).is_file():
            raise PgpsError(f"give --schedule FILE (there is no {schedule}; 'pgps-tune export --nnunet' writes "
                            "the one beside the plans)")
    given = read_schedule(schedule, plan) if schedule is not None else None
    if given is not None and not other_configuration and (note := check_tuned_schedule(schedule, plan)):
        print(note, file=sys.stderr, flush=True)
    record = out / RUN_RECORD
    if continue_training and record.is_file():
        f = _continue_checks(record, plan, given, counts)
    elif given is None:
        raise PgpsError(f"give --schedule FILE: the run in {out} keeps no {RUN_RECORD}")
    else:
        f = given
    f = replace(f, **{k: v if v is not None else getattr(f, k) for k, v in counts.items()})
    fit_epochs(f.schedule, f.num_epochs or DEFAULT_EPOCHS)  # more stages than epochs: refused before nnU-Net starts
    dev = torch_device(device)
    import torch
    from nnunetv2.run.run_training import maybe_load_checkpoint

    # built here rather than through nnunetv2's run_training, whose lookup by name imports every
    # trainer nnU-Net ships (some need torchvision); what follows is its single-device path
    plans = plan.plans_dict()
    plans["continue_training"] = continue_training
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="pgps-nnunet-") as tmp, \
            _environment(**{SCHEDULE_ENV: str(f.save(Path(tmp) / "schedule.json"))}):
        nnunet_trainer = trainer_class(trainer)(plans=plans, configuration=configuration,
                                                fold=fold if fold == "all" else int(fold),
                                                dataset_json=dataset_json, device=dev)
    maybe_load_checkpoint(nnunet_trainer, continue_training, False)
    nnunet_trainer.run_training()
    nnunet_trainer.perform_actual_validation(save_probabilities)
    return out


# -- a Ray Tune trial that trains with nnU-Net (budget.trainer: nnunet) ---------------------------


def class_key(value: Any) -> int | tuple[int, ...]:
    """A label value or region as nnU-Net keys its Dice: an int, or a tuple of ints (a region)."""
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else int(value)


def class_names(dataset_json: dict[str, Any]) -> dict[int | tuple[int, ...], str]:
    """The name dataset.json gives each label value or region (``{"whole": [1, 2, 3]}``: ``(1, 2, 3)``)."""
    names: dict[int | tuple[int, ...], str] = {}
    for name, value in (dataset_json.get("labels") or {}).items():
        try:
            names[class_key(value)] = str(name)
        except (TypeError, ValueError):  # not a label nnU-Net could train either: its own checks name it
            continue
    return names


def head_names(label_manager: Any, names: dict[int | tuple[int, ...], str]) -> list[str]:
    """The name of each output of nnU-Net's network (its pseudo Dice): a foreground label, or a region."""
    lm = label_manager
    heads = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    return [names.get(class_key(h), str(h)) for h in heads]


def summary_dice(summary: dict[str, Any], names: dict[int | tuple[int, ...], str]) -> dict[str, float]:
    """Dice per label or region of nnU-Net's ``validation/summary.json`` (keys ``"1"``, ``"(1, 2)"``), by name."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region

    return {names.get(key_to_label_or_region(k), k): float(v["Dice"]) for k, v in summary.get("mean", {}).items()}


def trial_plan(plans: str | Path | NnunetPlan, configuration: str) -> NnunetPlan:
    """The plan a sweep with ``budget.trainer: nnunet`` trains (``plans`` may be read already): refused now if
    nnU-Net could not train it."""
    require_nnunet()
    plan = plans if isinstance(plans, NnunetPlan) else read_plans(plans, configuration)
    if plan.configuration != configuration:
        raise PgpsError(f"the plans were read for configuration {plan.configuration}, not {configuration}")
    if (prev := previous_stage(plan)) is not None:
        raise PgpsError(f"{configuration} is the second stage of nnU-Net's cascade: it trains on {prev} predictions "
                        f"that no trial has; sweep {prev} (or 3d_fullres) instead")
    check_preprocessed(plan)
    if not (plan.source.parent / "dataset.json").is_file():
        raise PgpsError(f"{plan.source.parent / 'dataset.json'} does not exist; nnU-Net's preprocessing writes it "
                        "beside the plans")
    return plan


@dataclass(frozen=True)
class SweepDataset:
    """The dataset of a sweep with ``budget.trainer: nnunet``, as nnU-Net preprocessed it.

    Its trials train nnU-Net's preprocessed data, so the sweep never runs the dataset through
    pgps-tune's loader (which refuses what nnU-Net trains fine: region labels such as
    ``"whole": [1, 2]``, an ``ignore`` label).  ``name`` follows pgps-tune's rule (dataset.json's
    ``name``, else the folder's), so the results store files the sweep where a pgps-tune-trainer
    sweep of the same dataset goes; ``folds`` are nnU-Net's (its ``splits_final.json``).
    """

    name: str
    cases: int
    folds: int
    plan: NnunetPlan

    def check_folds(self, folds: int, source: str) -> None:
        """Refuse a confirmation on more folds than nnU-Net's split of the dataset has."""
        if folds > self.folds:
            raise PgpsError(f"{source}: {folds} folds asked for, but nnU-Net's split of {self.plan.dataset} has "
                            f"{self.folds}; confirm on at most {self.folds} (or on seeds)")


def sweep_dataset(plans: str | Path | NnunetPlan, configuration: str) -> SweepDataset:
    """The :class:`SweepDataset` of these plans, refused now if nnU-Net could not train or split it."""
    from pgps_tune.data import dataset_name

    plan = trial_plan(plans, configuration)
    base = plan.source.parent
    description = read_json(base / "dataset.json", "nnU-Net dataset description", REPLAN)
    if not isinstance(description, dict):
        raise PgpsError(f"{base / 'dataset.json'} is not a JSON object; {REPLAN}")
    cases = sum(1 for _ in (base / plan.data_identifier).glob("*.pkl"))  # one properties file per case
    folds = dataset_folds(base)
    if not (base / "splits_final.json").is_file() and cases < folds:
        raise PgpsError(f"{base} holds {cases} preprocessed case(s) and no splits_final.json, and nnU-Net's "
                        f"{folds}-fold split needs {folds} cases; write a splits_final.json with fewer folds")
    return SweepDataset(dataset_name(description, base), cases, folds, plan)


def train_trial(plans: str | Path, configuration: str, fold: int, s: sch.Schedule, out: Path,
                callback, *, epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
                report_every: int, device: str = "cpu", processes: int = 0, resume: bool = False) -> dict[str, Any]:
    """Train ``s`` (pgps-tune axis order) on one nnU-Net fold with nnU-Net's own trainer, inside ``out``.

    What a Ray Tune trial of a sweep with ``budget.trainer: nnunet`` runs; this module stays free
    of Ray: ``callback(result)`` gets the same result dictionary as :class:`pgps_tune.trainer.Trainer`'s
    callback, every ``report_every`` epochs (``val_dice``: nnU-Net's pseudo Dice of that epoch, its
    validation iterations at the final patch) and once at the end (``val_dice``: the foreground mean
    Dice of nnU-Net's sliding-window validation of the whole fold, ``completed`` true).  nnU-Net's
    fold folder is ``out`` itself; ``resume`` continues from the checkpoint there (nnU-Net writes one
    at every stage boundary).  ``processes``: nnU-Net's augmentation workers (0: in this process).
    Returns the final result.
    """
    import numpy as np

    plan = trial_plan(plans, configuration)
    check_schedule(s, plan)
    f = for_nnunet(s, plan, num_epochs=epochs, num_iterations_per_epoch=iterations_per_epoch,
                   num_val_iterations_per_epoch=val_iterations_per_epoch)
    fit_epochs(f.schedule, epochs)  # more stages than epochs is refused here
    dev = torch_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset_json = read_json(plan.source.parent / "dataset.json", "nnU-Net dataset description", REPLAN)
    names = class_names(dataset_json)
    plans_dict = plan.plans_dict()
    plans_dict["continue_training"] = resume
    base = trainer_class(TRAINER)
    baseline = s.baseline_batch_size * float(np.prod(s.final_patch))
    done: dict[str, Any] = {"voxels": 0.0, "train_s": 0.0, "best": -1.0}

    def stage_of(epoch: int) -> sch.Stage:  # epoch counted from 0
        return s.stages[s.stage_index_at(min(epoch, s.epochs - 1))]

    def count_epoch(epoch: int, iterations: int) -> None:
        st = stage_of(epoch)
        done["voxels"] += st.batch_size * float(np.prod(st.patch_size)) * iterations

    def result(trainer, epoch: int, completed: bool, dice: float, per_class: dict[str, float]) -> dict[str, Any]:
        st = stage_of(epoch - 1)
        done["best"] = max(done["best"], dice)
        losses = trainer.logger.get_value("train_losses", step=-1) if trainer.logger else float("nan")
        return {"epoch": epoch, "stage": s.stages.index(st),
                "patch_size": tuple(st.patch_size), "val_dice": float(dice), "best_val_dice": float(done["best"]),
                "val_dice_per_class": per_class, "train_loss": float(losses), "train_time_s": done["train_s"],
                "voxels_processed": done["voxels"], "baseline_equivalent_iterations": done["voxels"] / baseline,
                "completed": completed}

    class Reporting(base):  # noqa: N801 (nnU-Net names folders after the class: keep its name below)
        def on_epoch_end(self) -> None:
            epoch = self.current_epoch
            count_epoch(epoch, self.num_iterations_per_epoch)
            super().on_epoch_end()
            value = self.logger.get_value
            done["train_s"] += value("epoch_end_timestamps", step=-1) - value("epoch_start_timestamps", step=-1)
            if (epoch + 1) % report_every == 0 and epoch + 1 < self.num_epochs:
                dice = [float(d) for d in value("dice_per_class_or_region", step=-1)]
                per = dict(zip(head_names(self.label_manager, names), dice))
                callback(result(self, epoch + 1, False, float(np.nanmean(dice)), per))

    Reporting.__name__ = Reporting.__qualname__ = TRAINER
    counts = {"nnUNet_results": str(out / "results"), "nnUNet_preprocessed": str(plan.source.parent.parent),
              "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", str(processes)),
              "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(max(1, processes)))}
    from nnunetv2.run.run_training import maybe_load_checkpoint

    with tempfile.TemporaryDirectory(prefix="pgps-nnunet-") as tmp, \
            _environment(**counts, **{SCHEDULE_ENV: str(f.save(Path(tmp) / "schedule.json"))}):
        t = Reporting(plans=plans_dict, configuration=configuration, fold=int(fold), dataset_json=dataset_json,
                      device=dev)
        if resume:
            maybe_load_checkpoint(t, True, False)
            # nnU-Net's own epoch times are in the checkpoint's logger: count what ran before
            starts, ends = (t.logger.get_value(k, step=None) for k in ("epoch_start_timestamps",
                                                                        "epoch_end_timestamps"))
            done["train_s"] = float(sum(e - b for b, e in zip(starts, ends)))
            for epoch in range(t.current_epoch):
                count_epoch(epoch, t.num_iterations_per_epoch)
        t.run_training()
        t.perform_actual_validation(False)
        summary = read_json(Path(t.output_folder) / "validation" / "summary.json", "nnU-Net's validation summary",
                            "nnU-Net's validation did not finish; train this trial again")
    final = result(t, epochs, True, float(summary["foreground_mean"]["Dice"]), summary_dice(summary, names))
    final["fold_folder"] = str(t.output_folder)
    callback(final)
    return final
