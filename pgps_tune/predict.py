"""Apply a trained run to new images (``pgps-tune predict``). Knows nothing about Ray.

Each input goes the way the training data went (``data.prepare``): closest canonical
(RAS+) axis order, resampling to the run's spacing (cubic), the run's intensity
normalisation per channel.  The network then runs as a sliding window at the final
patch size with Gaussian weighting and the overlap the run validated with, optionally
averaged over the 8 mirrored copies of the volume (test-time augmentation).  The class
probabilities come back the same way in reverse: linear resampling to the input's
canonical grid (then argmax, as nnU-Net does), the input's own axis order, and the
input's affine and format, so the segmentation overlays the image voxel for voxel.

Nothing is computed before every input has been checked (readable header, 3D or 4D,
the run's channel count, channel files on one grid) and every output name is known
not to replace an existing file (unless ``overwrite``) or an input (never).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgps_tune import imageio
from pgps_tune.data import PreparedDataset, same_grid
from pgps_tune.errors import MAX_JSON_BYTES, PgpsError, loads_json, os_cause, read_file

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's CASE_0000


@dataclass(frozen=True)
class Run:
    """What inference needs from a trained run; plain values besides the model."""

    model: torch.nn.Module
    channels: int
    num_classes: int
    final_patch: tuple[int, int, int]
    spacing: tuple[float, float, float]
    normalisation: list[dict[str, Any]]
    sw_batch_size: int = 4
    overlap: float = 0.25
    augment: str = "default"  # the training's augmentation preset (test-time mirroring needs one that mirrors)
    class_names: tuple[str, ...] = ()  # of the foreground classes 1, 2, ... (the training data's labels)


# -- the run folder ------------------------------------------------------------------


def _read_checkpoint(run_dir: str | Path, device: torch.device) -> dict[str, Any]:
    """The run's checkpoint, read without running code (the trainer's safe loader)."""
    from pgps_tune.trainer import CHECKPOINT, read_checkpoint

    path = Path(run_dir) / CHECKPOINT
    try:
        found = path.is_file()
    except OSError as exc:  # a folder this user may not enter
        raise PgpsError(f"cannot read {path} ({exc.strerror or exc}); check the run folder's permissions") from None
    if not found:
        raise PgpsError(f"{path} does not exist; give --run a run folder written by 'pgps-tune train'")
    return read_checkpoint(path, "give --run a run folder written by 'pgps-tune train', or retrain the run")


def _load_run(run_dir: str | Path, device: torch.device) -> Run:
    """The network of a run folder, with the preprocessing its training data had."""
    from pgps_tune.config import TrainConfig
    from pgps_tune.network import network_for, place
    from pgps_tune.schedule import Schedule
    from pgps_tune.trainer import CHECKPOINT, _one_line

    ck = _read_checkpoint(run_dir, device)
    path = Path(run_dir) / CHECKPOINT
    pre = _preprocessing(ck, path)
    try:
        cfg = ck["config"]
        schedule = Schedule.from_dict(ck["schedule"], source=str(path))
        config = TrainConfig.from_dict(cfg)
        model = place(network_for(config, ck["channels"], ck["num_classes"], schedule), config.network, device,
                      schedule.final_patch)
        model.load_state_dict(ck["model"])
        return Run(
            model=model.eval(), channels=int(ck["channels"]), num_classes=int(ck["num_classes"]),
            final_patch=tuple(int(v) for v in schedule.final_patch),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in pre["spacing"]),  # type: ignore[arg-type]
            normalisation=list(pre["normalisation"]),
            sw_batch_size=int(cfg["sw_batch_size"]), overlap=float(cfg["sw_overlap"]),
            augment=config.augment,
            class_names=tuple(pre["labels"].get(str(k), str(k)) for k in range(1, int(ck["num_classes"]))),
        )
    except PgpsError:
        raise
    except Exception as exc:  # a field that does not fit: torch's state-dict message alone spans many lines
        raise PgpsError(f"checkpoint {path} is incomplete ({_one_line(exc)}); retrain the run") from None


def evaluation_cases(run_dir: str | Path, ds: PreparedDataset, all_cases: bool = False) -> tuple[list[int], str]:
    """Which cases of the prepared dataset ``ds`` to score for a run, and a sentence saying which.

    On the run's own dataset (same name, and every case the run trained or validated on
    is there) these are the run's validation cases; with ``all_cases``, on another
    dataset, or for a run that does not record its split, every labelled case.  The split
    comes from the run's metrics.json (plain JSON: no checkpoint is unpickled for it).
    """
    from pgps_tune.trainer import METRICS

    every = list(range(len(ds)))
    try:
        record = loads_json(read_file(Path(run_dir) / METRICS, MAX_JSON_BYTES))
        run_name, split = record["dataset"], record["split"]
        train, val = [str(c) for c in split["train"]], [str(c) for c in split["val"]]
    except (OSError, ValueError, KeyError, TypeError):
        return every, f"all {len(ds)} labelled cases of {ds.name} (the run does not record its validation cases)"
    index = {c: i for i, c in enumerate(ds.case_ids)}
    absent = next((c for c in (*train, *val) if c not in index), None)
    if run_name != ds.name:
        return every, f"all {len(ds)} labelled cases of {ds.name} (not the run's dataset {run_name})"
    if absent is not None:  # the same name, other data (a subset, a new release): the run's split cannot be found
        return every, (f"all {len(ds)} labelled cases of {ds.name} (not the data the run trained on: its case "
                       f"{absent} is not among them)")
    if all_cases:
        return every, f"all {len(ds)} labelled cases of {ds.name}, the run's training cases included"
    return sorted(index[c] for c in val), f"validation cases of the run ({len(val)})"


def run_preprocessing(run_dir: str | Path) -> dict[str, Any]:
    """The spacing, labels and normalisation a run's training data had (from its checkpoint)."""
    return _preprocessing(_read_checkpoint(run_dir, torch.device("cpu")), Path(run_dir) / "checkpoint.pt")


def _preprocessing(ck: dict[str, Any], path: Path) -> dict[str, Any]:
    """A checkpoint's record of its training data's preprocessing, checked field by field."""
    if "preprocessing" not in ck:
        raise PgpsError(f"{path} does not record the spacing and normalisation of its training data (an older "
                        "version wrote it); retrain the run")
    from pgps_tune.intensity import check_schemes

    pre = ck["preprocessing"]
    try:
        out = {"spacing": [float(v) for v in pre["spacing"]],
               "labels": {str(int(k)): str(v) for k, v in dict(pre["labels"]).items()},
               "normalisation": [dict(n) for n in pre["normalisation"]]}
        if len(out["spacing"]) != 3 or not all(math.isfinite(v) and v > 0 for v in out["spacing"]):
            raise ValueError(f"spacing {out['spacing']} is not 3 positive voxel sizes")
        check_schemes(out["normalisation"], ck["channels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PgpsError(f"checkpoint {path} is incomplete (preprocessing: {type(exc).__name__}: {exc}); retrain "
                        "the run") from None
    return out


def same_preprocessing(pre: dict[str, Any], ds: PreparedDataset) -> bool:
    """Whether ``ds`` was prepared as the run's training data was (spacing, normalisation): then its cached
    volumes are what the network expects; otherwise each case must go the way ``predict`` takes it."""
    return bool(np.allclose(ds.spacing, pre["spacing"], rtol=1e-3)) and list(ds.normalisation) == list(
        pre["normalisation"])


def resampled_cases(cases: Sequence[Any], spacing: Sequence[float]) -> list[str]:
    """The ids of ``cases`` (``data.Case``) whose images, by their headers, ``data.prepare`` resampled to
    ``spacing``: their cached volumes and labels lie on another grid than their files, where ``predict``
    writes its segmentations and where they are to be scored."""
    found = []
    for case in cases:
        shape, affine = imageio.header(case.images[0])
        if imageio.needs_resampling(imageio.voxel_sizes(imageio.canonical_grid(shape, affine)[1]), spacing):
            found.append(case.case_id)
    return found


def relabelling(pre: dict[str, Any], ds: PreparedDataset) -> tuple[np.ndarray | None, str]:
    """How ``ds``'s label values are read as the run's classes, and a sentence saying so where they differ.

    The same names with the same values: ``(None, "")``.  The same names with other values (a dataset
    whose labels were renumbered): a lookup table from ``ds``'s values to the run's, by name.  Other names
    (a class the run never learnt, or one missing from the data) are refused in one line.
    """
    theirs = {int(k): str(v) for k, v in pre["labels"].items()}
    if theirs == ds.labels:
        return None, ""

    def show(labels: dict[int, str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(labels.items()))

    by_name = {name: value for value, name in theirs.items()}
    if sorted(theirs.values()) != sorted(ds.labels.values()) or len(by_name) != len(theirs):
        raise PgpsError(f"the run's classes are {show(theirs)}, but {ds.name}'s are {show(ds.labels)}; evaluate on "
                        "data whose labels have the run's names (their values may differ)")
    table = np.zeros(max(ds.labels) + 1, np.int64)
    for value, name in ds.labels.items():
        table[value] = by_name[name]
    moved = ", ".join(f"{name} {value} -> {by_name[name]}" for value, name in sorted(ds.labels.items())
                      if by_name[name] != value)
    return table, f"{ds.name}'s labels renumbered to the run's by name ({moved})"


def evaluate_files(run_dir: str | Path, cases: Sequence[Any], device: str = "auto", mirror: bool = False,
                   progress: Callable[[str], None] | None = None, relabel: np.ndarray | None = None
                   ) -> dict[str, Any]:
    """Score a run on raw cases (``data.Case``: image files and a label file) the way ``predict`` segments
    them: resampled to the run's spacing and normalised with the run's schemes, the segmentation brought back
    to each image's own grid and compared with its label there (the result has ``evaluate``'s form).
    ``relabel``: the run's class of each label value (see :func:`relabelling`)."""
    from pgps_tune.trainer import check_mirroring, dice_report, dice_scores, resolve_device

    dev = resolve_device(device)
    run = _load_run(run_dir, dev)
    if mirror:
        check_mirroring(run.augment)
    geometries = [case_geometry(case.images, run.channels, case.case_id) for case in cases]
    for case, geometry in zip(cases, geometries):
        check_memory(run, case.case_id, geometry)
    scores = []
    for i, (case, geometry) in enumerate(zip(cases, geometries), 1):
        pred, _ = imageio.to_canonical(predict_case(run, case.images, geometry, dev, mirror), geometry.affine)
        truth, affine = imageio.read(case.label)
        truth = np.asarray(truth)[..., 0] if truth.ndim == 4 and truth.shape[3] == 1 else np.asarray(truth)
        truth, _ = imageio.to_canonical(truth, affine)
        if truth.shape != pred.shape:
            raise PgpsError(f"case {case.case_id}: its label {case.label} is {'x'.join(map(str, truth.shape))} "
                            f"voxels, its image {'x'.join(map(str, pred.shape))}; fix or drop the case")
        truth = np.rint(truth).astype(np.int64)
        scores.append(dice_scores(torch.from_numpy(pred.astype(np.int64)),
                                  torch.from_numpy(truth if relabel is None else relabel[truth]), run.num_classes))
        if progress:
            progress(f"[{i}/{len(cases)}] {case.case_id}")
    return dice_report(scores, [case.case_id for case in cases], run.class_names)


# -- inputs ------------------------------------------------------------------------------


def _stem(path: Path) -> str:
    return path.name[: -len(imageio.ending(path))]


def find_inputs(source: str | Path, channels: int) -> list[tuple[str, list[Path]]]:
    """``[(case name, [files])]`` from an image file or a folder of them.

    A case is one file (3D, or 4D with channels last), or nnU-Net's one file per channel
    (``CASE_0000``, ``CASE_0001``, ...; the case is then named ``CASE``).  A folder is read
    the nnU-Net way when every image in it is named ``*_NNNN`` and the numbers are
    exactly the run's channels; a single ``CASE_0000`` file brings its sibling ``CASE_0001``...
    """
    source = Path(source)
    kinds = ", ".join(imageio.ENDINGS)
    try:
        return _find_inputs(source, channels, kinds)
    except OSError as exc:  # a folder this user may not list
        raise PgpsError(f"cannot read --input {source} ({exc.strerror or exc}); check its permissions") from None


def _find_inputs(source: Path, channels: int, kinds: str) -> list[tuple[str, list[Path]]]:
    if source.is_file():
        if not imageio.ending(source):
            raise PgpsError(f"--input {source} is not an image this tool reads; give a {kinds} file or a folder")
        m = _CHANNEL_FILE.match(_stem(source))
        end = source.name[len(_stem(source)):]
        siblings = [source.with_name(f"{m['case']}_{c:04d}{end}") for c in range(channels)] if m else []
        if m and m["channel"] == "0000" and (channels == 1 or siblings[1].is_file()):
            return [(m["case"], siblings)]  # named CASE, as in a folder of channel files
        return [(_named(source), [source])]
    if source.is_symlink() and not source.exists():
        raise PgpsError(f"--input {source} is a link to {os.readlink(source)}, which does not exist; fix the link")
    if not source.is_dir():
        raise PgpsError(f"--input {source} does not exist; give an image file or a folder of them")
    named = sorted(p for p in source.iterdir() if imageio.ending(p) and not p.name.startswith("."))
    dangling = [p for p in named if p.is_symlink() and not p.exists()]
    if dangling:  # an image whose target went away (an unmounted share) is not to be left out without a word
        more = f" (and {len(dangling) - 1} more such link(s))" if len(dangling) > 1 else ""
        raise PgpsError(f"{dangling[0]} is a link to {os.readlink(dangling[0])}, which does not exist{more}; fix "
                        "the link or remove it")
    files = [p for p in named if p.is_file()]
    if not files:
        raise PgpsError(f"--input {source} holds no image files; give a folder of {kinds} files")
    matches = [_CHANNEL_FILE.match(_stem(p)) for p in files]
    wanted = [f"{c:04d}" for c in range(channels)]
    numbers = sorted({m["channel"] for m in matches if m})
    if all(matches) and (numbers == wanted or numbers == [f"{c:04d}" for c in range(len(numbers))]):
        cases: dict[str, list[Path]] = {}
        for p, m in zip(files, matches):
            assert m is not None
            cases.setdefault(m["case"], []).append(p)
        if numbers != wanted and len(numbers) > 1 and len(cases) > 1:
            raise PgpsError(f"{source} holds nnU-Net channel files {numbers[0]} to {numbers[-1]} ({len(numbers)} "
                            f"channels per case) but the run was trained on {channels}; give images with the run's "
                            "channels")
        if numbers == wanted:
            for case, ps in cases.items():
                got = sorted(_CHANNEL_FILE.match(_stem(p))["channel"] for p in ps)  # type: ignore[index]
                if got != wanted:
                    names = ", ".join(p.name for p in ps)
                    raise PgpsError(
                        f"case {case} in {source} has channel file(s) {', '.join(got)} ({names}) but the run takes "
                        f"{', '.join(wanted)}, each once; give every channel of the case once")
            return sorted(cases.items())
    return [(_named(p), [p]) for p in files]


def _named(path: Path) -> str:
    """The case name of a one-file case: the file name without its image ending (never empty)."""
    if not _stem(path):
        raise PgpsError(f"--input {path} has no name before its ending; rename it (its output is named after it)")
    return _stem(path)


@dataclass(frozen=True)
class Geometry:
    """Where an input's voxels sit: what writing the prediction back onto them needs."""

    affine: np.ndarray  # of the input file(s)
    shape: tuple[int, int, int]  # the input's own voxel grid
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # along the canonical axes
    like: Path  # the (first) input file: its format and header go to the output


def case_geometry(files: Sequence[Path], channels: int, case: str = "") -> Geometry:
    """Check a case's files from their headers alone (readable, 3D/4D, channels, one grid); its geometry.

    Channel files must lie on the first one's voxel grid by the rule training data follow
    (:func:`data.same_grid`): one stored in another axis order, or whose origin alone differs, is read
    (with a warning on stderr, as ``prepare`` gives), since each file is reoriented by its own header."""
    found, first, shapes = 0, None, []
    for path in files:
        if not path.is_file():
            raise PgpsError(f"channel file {path} does not exist; give every channel of the case")
        shape, affine = imageio.header(path)  # 3D or 4D, on a usable grid
        grid = imageio.canonical_grid(shape, affine)  # (shape, affine) on the canonical axes
        if first is None:
            first = (path, tuple(int(n) for n in shape[:3]), affine, grid)
        elif grid[0] != first[3][0]:
            size = "x".join(map(str, grid[0])), "x".join(map(str, first[3][0]))
            raise PgpsError(f"{path} does not share the voxel grid of {first[0]} ({size[0]} against {size[1]} voxels "
                            "once reoriented); channel files must be co-registered")
        elif note := same_grid(case or _stem(files[0]), path, (first[3][1], first[2]), (grid[1], affine)):
            print(f"pgps-tune: warning: {note}", file=sys.stderr, flush=True)
        found += shape[3] if len(shape) == 4 else 1
        shapes.append(f"{path.name} is {'x'.join(map(str, shape))}")
    assert first is not None
    if found != channels:
        raise PgpsError(f"{files[0]} gives {found} channel(s) ({', '.join(shapes)}) but the run was trained on "
                        f"{channels}; give images with the run's channels (the last axis of a 4D image is its "
                        "channels: a time series needs one time point per file)")
    path, shape3, affine, (canonical_shape, canonical_affine) = first
    return Geometry(affine, shape3, canonical_shape, imageio.voxel_sizes(canonical_affine), path)  # type: ignore[arg-type]


def read_case(files: Sequence[Path]) -> np.ndarray:
    """The case as ``[C, X, Y, Z]`` float32 in canonical orientation (files checked by :func:`case_geometry`)."""
    chans: list[np.ndarray] = []
    for path in files:
        arr, affine = imageio.read(path)
        with np.errstate(over="ignore"):
            arr, _ = imageio.to_canonical(np.asarray(arr, dtype=np.float32), affine)
        chans.extend(np.moveaxis(arr, -1, 0) if arr.ndim == 4 else [arr])
    image = np.stack(chans)
    if not np.all(np.isfinite(image)):
        raise PgpsError(f"{files[0]} holds non-finite voxels (NaN, inf or beyond float32); fix the image")
    return image


# -- inference ---------------------------------------------------------------------------


def segment(run: Run, image: np.ndarray, device: torch.device, mirror: bool = False) -> np.ndarray:
    """Class probabilities ``[K, X, Y, Z]`` of a normalised ``[C, X, Y, Z]`` image: the trainer's
    sliding window at the final patch with the run's overlap, mirrored as ``evaluate`` does."""
    from pgps_tune.trainer import window_probs

    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    return window_probs(run.model, x, run.final_patch, run.sw_batch_size, run.overlap, mirror)[0].cpu().numpy()


def predict_case(run: Run, files: Sequence[Path], geometry: Geometry, device: torch.device,
                 mirror: bool = False) -> np.ndarray:
    """The label map of one case on the input's own voxel grid (uint8, or uint16 past 255 classes)."""
    from pgps_tune.intensity import check_values, normalise

    image = read_case(files)
    check_values(image, run.normalisation, str(files[0]))
    shape = geometry.canonical_shape
    if imageio.needs_resampling(geometry.spacing, run.spacing):
        shape = imageio.resampled_shape(shape, geometry.spacing, run.spacing)
    image = normalise(imageio.resample(image, shape, order=3), run.normalisation)
    probs = imageio.resample(segment(run, image, device, mirror), geometry.canonical_shape, order=1)
    label = probs.argmax(0).astype(np.uint8 if run.num_classes <= 256 else np.uint16)
    return imageio.from_canonical(label, geometry.affine)


def output_path(out_dir: Path, case: str, like: Path) -> Path:
    """``OUT/CASE`` with the input's ending: outputs keep the input's format."""
    return out_dir / f"{case}{like.name[len(_stem(like)):]}"


def predict(
    run_dir: str | Path,
    source: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    mirror: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    skip_existing: bool = False,
) -> list[Path]:
    """Segment every case of ``source`` with the run's network; one label file per case in ``out_dir``.

    Args:
        run_dir: a folder written by ``pgps-tune train``.
        source: an image file or a folder (see :func:`find_inputs`).
        out_dir: where ``CASE.<input ending>`` files go.
        device: ``auto``, ``cpu`` or ``cuda``.
        mirror: average over the 8 mirrored copies (8x the inference time).
        overwrite: replace existing outputs; without it (or ``skip_existing``) any existing output stops the
            run before any work.
        progress: called with one line per finished (or skipped) case.
        skip_existing: keep the existing outputs and segment only the other cases: how a run stopped part-way
            continues (outputs are written atomically, so one that exists is complete).

    Returns every case's output file, in case order (the skipped ones included).
    """
    from pgps_tune.trainer import check_mirroring, resolve_device

    dev = resolve_device(device)
    run = _load_run(run_dir, dev)
    if mirror:
        check_mirroring(run.augment)
    inputs = find_inputs(source, run.channels)
    out_dir = Path(out_dir)
    _check_out(out_dir, Path(source))
    targets = [output_path(out_dir, case, files[0]) for case, files in inputs]
    if overwrite and skip_existing:
        raise PgpsError("--overwrite and --skip-existing contradict each other; give one")
    _check_targets(targets, inputs, overwrite or skip_existing)
    done = {t for t in targets if skip_existing and t.is_file()}
    geometries = [None if t in done else case_geometry(files, run.channels, case)
                  for (case, files), t in zip(inputs, targets)]
    for (case, _), geometry in zip(inputs, geometries):
        if geometry is not None:
            check_memory(run, case, geometry)
    for i, ((case, files), geometry, target) in enumerate(zip(inputs, geometries, targets), 1):
        if geometry is None:
            if progress:
                progress(f"[{i}/{len(inputs)}] {case}: {target} exists, skipped (--skip-existing)")
            continue
        t0 = time.perf_counter()
        try:
            label = predict_case(run, files, geometry, dev, mirror)
        except PgpsError as exc:
            raise PgpsError(f"{exc}{_written(i - 1, len(inputs))}") from None
        try:
            imageio.write(target, label, geometry.affine, like=geometry.like)
        except (OSError, PgpsError) as err:  # the disk filled, the folder went away (atomic_write names its OSError)
            exc = os_cause(err)
            why = exc.strerror if exc is not None and exc.strerror else err
            raise PgpsError(f"cannot write {target} ({why}): free space or choose another --out"
                            f"{_written(i - 1, len(inputs))}") from None
        if progress:
            size = "x".join(map(str, geometry.shape))
            progress(f"[{i}/{len(inputs)}] {case} ({size}) -> {target} ({time.perf_counter() - t0:.1f} s)")
    return targets


def _written(done: int, total: int) -> str:
    """What a failure part-way leaves, for its message: the outputs before it are complete."""
    return (f" (case {done + 1} of {total}; the {done} output(s) before it are complete: once fixed, add "
            "--skip-existing to segment only the rest)") if done else ""


# inference memory per voxel, from the code's arrays (float32): at the run's spacing the normalised image, the
# sliding window's class probabilities and Gaussian weights and their resampling (12 bytes a class, 20 more);
# on the input's grid the probabilities resampled back and stacked (8 bytes a class)
PREDICT_BYTES_PER_CLASS, PREDICT_BYTES, PREDICT_BYTES_BACK_PER_CLASS = 12, 20, 8


def check_memory(run: Run, case: str, geometry: Geometry) -> None:
    """Refuse, before any case is predicted, a case whose inference cannot fit in the memory available.

    An image whose voxels are far coarser than the run's (an 8 mm scan for a 1 mm run) is resampled to
    hundreds of times its size before the network sees it; without this it ends in an out-of-memory kill."""
    shape = geometry.canonical_shape
    if imageio.needs_resampling(geometry.spacing, run.spacing):
        shape = imageio.resampled_shape(shape, geometry.spacing, run.spacing)
    k = run.num_classes
    need = (math.prod(shape) * (PREDICT_BYTES_PER_CLASS * k + PREDICT_BYTES)
            + math.prod(geometry.canonical_shape) * PREDICT_BYTES_BACK_PER_CLASS * k)
    imageio.require_memory(
        need, f"case {case} ({'x'.join(map(str, geometry.shape))} voxels of {imageio.spacing_text(geometry.spacing)}) "
        f"is resampled to the run's spacing {imageio.spacing_text(run.spacing)} as {'x'.join(map(str, shape))} voxels",
        "to segment", "check the spacing in its header, or run where more memory is free")


def _check_out(out_dir: Path, source: Path) -> None:
    """Refuse an output folder that a later ``predict`` would misread: the input folder itself (its
    segmentations would be read as images next time: a ``CASE_0000`` input gives a ``CASE`` output), or a
    new folder named like an image file (``--out seg.nii.gz`` would make a folder of that name)."""
    if source.is_dir() and out_dir.exists() and out_dir.resolve() == source.resolve():
        raise PgpsError(f"--out {out_dir} is the --input folder: the segmentations would lie among the images and "
                        "be read as images by the next predict; choose another --out (a subfolder of it works)")
    end = imageio.ending(out_dir)
    if end and not out_dir.is_dir():
        raise PgpsError(f"--out {out_dir} is named like an image file, but it is the folder the segmentations go in "
                        f"(each named after its input, e.g. CASE{end}); give a folder")


def _check_targets(targets: list[Path], inputs: list[tuple[str, list[Path]]], overwrite: bool) -> None:
    names = [t.name for t in targets]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise PgpsError(f"two inputs would both be written to {twice}; give each case one image (or channel set)")
    sources = {p.resolve() for _, files in inputs for p in files}
    replaced = next((t for t in targets if t.resolve() in sources), None)
    if replaced:
        raise PgpsError(f"the output {replaced} would replace its own input; choose another --out")
    folder = next((t for t in targets if t.is_dir()), None)
    if folder:
        raise PgpsError(f"the output {folder} is a folder; move it away or choose another --out")
    clash = [t for t in targets if t.exists() or t.is_symlink()]
    if clash and not overwrite:
        what = f"{clash[0]} and {len(clash) - 1} more outputs already exist" if len(clash) > 1 else \
            f"{clash[0]} already exists"
        them = "them" if len(clash) > 1 else "it"
        raise PgpsError(f"{what}; add --overwrite to replace {them}, --skip-existing to keep {them} and segment the "
                        "other cases, or choose another --out")
