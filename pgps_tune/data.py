"""Datasets: discovery (MSD, nnU-Net raw, synthetic), preprocessing cache, split, planning.

Volumes are preprocessed once (canonical orientation, resampling to a common
spacing where cases differ, intensity normalisation per channel by modality:
see :mod:`pgps_tune.intensity`) and cached as
``.npy`` files that every later run (and every tuner trial) memory-maps, so
loading costs nothing after the first run.  Foreground voxel coordinates per
class are cached beside them for foreground-centred sampling.

The files a dataset names may lie outside its folder (an absolute path, ``..``, an
environment variable in nnU-Net's ``dataset`` key, a link that leads out), as nnU-Net
reads them: pgps-tune only reads them, and nothing is written beside them or under a
name taken from dataset.json (the cache names its files by case index).  An image with
a non-finite voxel (NaN, inf, or a value beyond float32) is refused with one line
naming the case and file, and nothing of it lands in the cache.

The cache, ``CACHE_ROOT/NAME-FINGERPRINT/``:

- **Written whole or not at all.**  A build writes into ``.NAME.tmp-*`` beside
  the folder, ``prepared.json`` last, then renames the folder into place.
  ``prepared.json`` is the completeness record: it lists every other file with
  its size in bytes.
- **Built in bounded memory.**  Preparation holds at most ``workers`` cases in
  memory at a time, so a dataset larger than the machine's memory (MSD's CT
  tasks) is prepared like a small one: the cases are read and checked once,
  parked on disk inside the temporary folder, then normalised one by one.
- **Checked on every open** (cheaply, no data is read): every listed file
  exists with its recorded size, each ``.npy`` header holds the dtype and shape
  that ``prepared.json`` gives the case, each ``_fg.npz`` lists one array per
  foreground class.  A truncated or missing file, a garbled ``prepared.json``
  or a shape that disagrees is reported on stderr and the folder is rebuilt;
  flipped bytes inside a file of the right size are not detected.  Nothing in
  the cache can run code (``np.load`` without pickles, plain JSON).
- **Built once per cache folder.**  The build holds ``fcntl.flock`` on
  ``.NAME.lock`` beside the folder: a second process (another trial on a fresh
  node, a second CLI run) waits, then opens what the first built.  The lock
  holder also removes ``.NAME.*`` temporaries of writers that died (SIGKILL,
  SIGTERM); Ctrl-C removes its own.  For several nodes there are two options:
  a shared ``--cache-dir`` (``PGPS_CACHE_DIR``) on NFS, built once before the
  sweep (the tuner's driver prepares it before any trial starts; Linux NFS
  clients carry ``flock`` as NFS locks); or a per-node cache on local disk,
  built by the first trial on each node while the others wait.
- **Shared by a team.**  Folders and files get the umask's permissions (a
  group-writable umask such as 002 makes a group cache); a cache that is
  valid but read-only is used without locking.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgps_tune import imageio, intensity
from pgps_tune.errors import MAX_JSON_BYTES, PgpsError, loads_json, read_file, read_json

PREPROCESS_VERSION = 6  # 2: file sizes in prepared.json; 3: normalisation by modality, .nrrd/.mha;
# 4: every case checked on its voxel grid and for foreground (a cache built without those checks is rebuilt)
# 5: MSD case ids keep the dots of their names (cut at the first dot before); nnU-Net's noNorm, rescale_to_0_1
# and rgb_to_0_1 channels normalised as nnU-Net does (z-scored before)
# 6: CT statistics weigh every case equally (nnU-Net's draws with replacement per case); an rgb_to_0_1 channel
# outside 0-255 refused (a cache built from one is rebuilt, and refused)
MAX_FG_COORDS = 20000  # per class and case; plenty for sampling centres
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one 4D file (MSD) or one 3D file per channel (nnU-Net)
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    """What a raw dataset folder holds, read from its ``dataset.json``."""

    root: Path
    name: str
    layout: str  # "msd" | "nnunet"
    labels: dict[int, str]
    channels: int
    cases: tuple[Case, ...]
    modalities: tuple[str, ...]  # per channel, from 'modality' (MSD) or 'channel_names' (nnU-Net)
    notes: tuple[str, ...] = ()  # warnings about the folder (cases it may miss), printed when it is prepared


# -- discovery -----------------------------------------------------------------


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if root.exists() and not root.is_dir():
        folder = f" (its folder {root.parent})" if root.name == "dataset.json" else ""
        raise PgpsError(f"data folder {root} is a file; give the dataset's folder{folder}, the one holding "
                        "dataset.json, or 'synthetic'")
    if not root.is_dir():
        raise PgpsError(f"data folder {root} does not exist; give an MSD-layout folder or 'synthetic'")
    if not path.is_file():
        raise PgpsError(
            f"{path} is missing; the data folder needs an MSD or nnU-Net dataset.json"
        )
    data = read_json(path, "dataset description", "fix or re-download it")
    if not isinstance(data, dict) or "labels" not in data or not isinstance(data["labels"], dict):
        raise PgpsError(f"{path} has no 'labels' mapping; add one, e.g. {{\"0\": \"background\", \"1\": \"organ\"}}")
    return data


MAX_LABELS = 256  # label maps are cached as uint8


def _integer_text(x: Any) -> int | None:
    """The integer a string such as ``"3"`` or ``" -1"`` writes, else None."""
    if isinstance(x, str) and x.strip().lstrip("+-").isdigit():
        return int(x)
    return None


def _parse_labels(raw: dict[str, Any], path: Path) -> dict[int, str]:
    """``labels`` of dataset.json: MSD's ``{"0": "background"}`` or nnU-Net v2's ``{"background": 0}`` (also
    with the value as a string), refused in one line where a value is not one integer or is given twice."""
    labels: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, list):
            raise PgpsError(
                f"{path}: label {k!r} maps to {v!r}, an nnU-Net region (several values trained as one); pgps-tune "
                "trains one class per label value: give each label a single integer, or train regions with nnU-Net"
            )
        if isinstance(v, int) and not isinstance(v, bool):
            value, name = v, str(k)
        elif (from_key := _integer_text(k)) is not None:  # MSD: {"1": "organ"}
            value, name = from_key, str(v)
        elif (from_value := _integer_text(v)) is not None:  # nnU-Net with the value as text: {"organ": "1"}
            value, name = from_value, str(k)
        else:
            raise PgpsError(f"{path}: label {k!r}: {v!r} does not pair an integer value with a name; write 'labels' "
                            'as {"0": "background", "1": "organ"} or {"background": 0, "organ": 1}')
        if value in labels:
            raise PgpsError(f"{path}: labels {labels[value]!r} and {name!r} both have value {value}; give each "
                            "label its own value")
        labels[value] = name
    if 0 not in labels or len(labels) < 2:
        raise PgpsError(f"{path}: 'labels' needs background 0 and at least one foreground label; add them")
    if sorted(labels) != list(range(len(labels))):
        raise PgpsError(f"{path}: label values {sorted(labels)} must be consecutive from 0; renumber them 0, 1, 2, ...")
    if len(labels) > MAX_LABELS:
        raise PgpsError(f"{path} declares {len(labels)} labels; label maps are stored in 8 bits, at most "
                        f"{MAX_LABELS} labels (0-{MAX_LABELS - 1}): merge or drop labels")
    if "ignore" in labels.values():
        raise PgpsError(
            f"{path} declares an 'ignore' label (nnU-Net v2's unannotated voxels, left out of its loss); pgps-tune "
            "would train it as a class: relabel those voxels, or train the dataset with nnU-Net's own trainer "
            "(see 'pgps-tune nnunet-train')"
        )
    return labels


def _followable(path: Path, what: str) -> Path:
    """``path``, refused in one line where it cannot be followed (a link loop, a NUL byte in the name).

    Where it leads (inside the dataset folder or not) is the dataset's business: it is only read.
    """
    try:
        path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise PgpsError(f"{what} {path} cannot be resolved ({exc}); fix the file name or link") from None
    return path


def _msd_cases(root: Path, data: dict[str, Any], path: Path, channels: int) -> list[Case]:
    """The cases ``training`` lists. An image listed as ``x.nii.gz`` that is on disk as ``x_0000.nii.gz``,
    ``x_0001.nii.gz``, ... (nnU-Net v1's raw layout, whose dataset.json is MSD's) is read from those files."""
    if not isinstance(data["training"], list):
        raise PgpsError(f"{path}: 'training' must be a list of {{image, label}} entries")
    cases = []
    for i, entry in enumerate(data["training"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            raise PgpsError(f"{path}: training entry {i} needs 'image' and 'label' file names")
        image, label = (
            _followable(root / entry[k], f"{path}: training entry {i} '{k}'") for k in ("image", "label")
        )
        images: tuple[Path, ...] = (image,)
        end = imageio.ending(image.name)
        if end and not image.exists():
            split = tuple(image.with_name(f"{image.name[: -len(end)]}_{c:04d}{end}") for c in range(channels))
            if split[0].exists():  # nnU-Net v1: one file per channel
                images = tuple(_followable(f, f"{path}: training entry {i} channel file") for f in split)
        cases.append(Case(_case_id(Path(entry["label"]).name), images, label))
    return cases


def _listed_file(root: Path, name: str, what: str) -> Path:
    """A file of nnU-Net v2's ``dataset`` key, found as nnU-Net finds it: environment variables expanded, then
    absolute as given or relative to the dataset folder (``..`` taken away by name, as ``os.path.abspath``)."""
    expanded = os.path.expandvars(name)
    path = _followable(Path(os.path.abspath(os.path.join(root, expanded))), what)
    unset = re.search(r"\$\{?(\w+)", expanded)  # expandvars leaves a variable that is not set as it was
    if unset and not path.exists():
        raise PgpsError(f"{what} {name} uses ${unset.group(1)}, which is not set; export {unset.group(1)}=... "
                        "(nnU-Net expands it the same way)")
    return path


def _listed_nnunet_cases(root: Path, listed: Any, channels: int, path: Path) -> list[Case]:
    """The cases of nnU-Net v2's ``dataset`` key: ``{case: {"images": [one per channel], "label": file}}``,
    each file anywhere (see :func:`_listed_file`)."""
    if not isinstance(listed, dict) or not listed:
        raise PgpsError(f"{path}: 'dataset' must map each case id to its images and label, e.g. "
                        '{"case_1": {"images": ["imagesTr/case_1_0000.nii.gz"], "label": "labelsTr/case_1.nii.gz"}}')
    cases = []
    for case_id, entry in listed.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if (not isinstance(images, list) or not all(isinstance(f, str) and f for f in images)
                or not isinstance(label, str) or not label):
            raise PgpsError(f"{path}: dataset entry {case_id!r} needs 'images' (a list of files, one per channel) and "
                            "'label' (a file)")
        if len(images) != channels:
            raise PgpsError(f"{path}: dataset entry {case_id!r} lists {len(images)} image file(s) but channel_names "
                            f"names {channels} channel(s); list one file per channel")
        where = f"{path}: dataset entry {case_id!r}"
        cases.append(Case(str(case_id), tuple(_listed_file(root, f, f"{where} image") for f in images),
                          _listed_file(root, label, f"{where} label")))
    return cases


def _case_id(name: str) -> str:
    """A case's id: its label file's name without the image ending (``la_003.nii.gz`` -> ``la_003``; dots
    inside a name, as in DICOM UIDs, are kept)."""
    end = imageio.ending(name)
    return name[: -len(end)] if end else name.split(".")[0]


def _nnunet_cases(root: Path, channels: int, ending: Any, path: Path) -> tuple[list[Case], list[str]]:
    """The labelled cases of an nnU-Net raw folder, and notes on image files no case uses."""
    if not isinstance(ending, str) or not ending.startswith(".") or any(c in ending for c in "/\\*?["):
        raise PgpsError(f"{path}: file_ending {ending!r} must be a file extension such as '.nii.gz'; fix it")
    cases = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        case_id = label.name[: -len(ending)]
        images = tuple(root / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in range(channels))
        cases.append(Case(case_id, tuple(_followable(p, "image") for p in images), _followable(label, "label")))
    if not cases and (root / "labelsTr").is_dir():
        found = sorted({imageio.ending(f) or f.suffix or f.name for f in (root / "labelsTr").iterdir()
                        if not f.name.startswith(".")})
        if found:
            raise PgpsError(f"{root / 'labelsTr'} holds no '*{ending}' file (dataset.json's file_ending) but "
                            f"{', '.join(found)} files; set file_ending to the labels' ending")
    used = {p for c in cases for p in c.images}
    stray = sorted(p.name for p in (root / "imagesTr").glob(f"*{ending}") if p not in used)
    notes = []
    if stray and cases:
        notes.append(f"{len(stray)} file(s) in imagesTr belong to no labelled case and are not used (e.g. {stray[0]}): "
                     f"an image without its label in labelsTr, or a channel beyond the {channels} of dataset.json")
    return cases, notes


def _channel_count(names: Any, key: str, path: Path) -> int:
    if isinstance(names, str):  # a single modality written as a plain name
        return 1
    if not isinstance(names, (dict, list)) or not names:
        raise PgpsError(f"{path}: '{key}' must name the image channels, e.g. {{\"0\": \"CT\"}}")
    return len(names)


def discover(root: str | Path) -> DatasetSpec:
    """Read an MSD-layout or nnU-Net-raw-layout dataset folder.

    Files may lie outside the folder (see the module docstring); MSD images may be 4D
    with channels last, nnU-Net images are one 3D file per channel (``_0000``, ...).
    """
    root = Path(root)
    data = _read_dataset_json(root)
    path = root / "dataset.json"
    labels = _parse_labels(data["labels"], path)
    if "dataset" in data and "channel_names" in data:  # nnU-Net v2 raw listing its cases (any file names)
        layout = "nnunet"
        channels = _channel_count(data["channel_names"], "channel_names", path)
        cases, notes = _listed_nnunet_cases(root, data["dataset"], channels, path), []
    elif "training" in data:  # MSD (and nnU-Net v1 raw, which lists its cases the same way)
        layout = "msd"
        key = "modality" if data.get("modality") else "channel_names"
        channels = _channel_count(data.get(key) or {"0": "image"}, key, path)
        cases, notes = _msd_cases(root, data, path, channels), []
    elif "channel_names" in data or "modality" in data:  # nnU-Net v2 raw
        layout = "nnunet"
        key = "channel_names" if "channel_names" in data else "modality"
        channels = _channel_count(data[key], key, path)
        cases, notes = _nnunet_cases(root, channels, data.get("file_ending", ".nii.gz"), path)
    else:
        raise PgpsError(
            f"{path} has neither 'training' (MSD) nor 'channel_names' (nnU-Net); "
            "use an MSD or nnU-Net raw dataset.json"
        )
    if not cases:
        raise PgpsError(f"{root} lists no labelled training cases; add cases to imagesTr/labelsTr")
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise PgpsError(f"{path}: case {c.case_id} is listed twice; give each case its own label file name")
        seen.add(c.case_id)
    missing = [p for c in cases for p in (*c.images, c.label) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more file(s) missing)" if len(missing) > 1 else ""
        first = missing[0]
        if first.is_dir():
            raise PgpsError(f"{first} is a folder, not an image file{more}; fix dataset.json or the files")
        if first.is_symlink():
            raise PgpsError(f"{first} is a link to {os.readlink(first)}, which does not exist{more}; fix the link")
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PgpsError(f"missing file {first}{more}; fix dataset.json or add the files")
    declared = data.get("numTraining")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != len(cases):
        found = "lists" if layout == "msd" else "has labels for"
        notes.append(f"{path.name} gives numTraining {declared} but {found} {len(cases)} case(s); check for missing "
                     "or misnamed files")
    return DatasetSpec(root, dataset_name(data, root), layout, labels, channels, tuple(cases),
                       _modalities(data, channels), tuple(notes))


def dataset_name(description: dict[str, Any], folder: Path) -> str:
    """A dataset's name, which the results store files its sweeps under: dataset.json's ``name``, else the folder's."""
    return str(description.get("name") or folder.name)


def _modalities(data: dict[str, Any], channels: int) -> tuple[str, ...]:
    """Channel modality names in channel order; ``image`` where dataset.json names none."""
    names = data.get("channel_names") or data.get("modality") or {}
    if isinstance(names, dict):
        try:
            names = [v for _, v in sorted(names.items(), key=lambda kv: int(kv[0]))]
        except (TypeError, ValueError):
            names = list(names.values())
    elif isinstance(names, str):
        names = [names]
    names = [str(n) for n in names]
    return tuple(names[c] if c < len(names) else "image" for c in range(channels))


# -- reading and preprocessing ---------------------------------------------------


def _load_image(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image file (any :data:`imageio.ENDINGS`) in canonical orientation, its canonical affine and the
    file's own affine."""
    arr, affine = imageio.read(path)
    out, canonical = imageio.to_canonical(arr, affine)
    return out, canonical, affine


def _channels_of(path: Path, case_id: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The float32 channels of one image file (3D, or 4D with channels last), all finite, and its affines."""
    arr, canonical, affine = _load_image(path)
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused below
        arr = np.asarray(arr, dtype=np.float32)
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise PgpsError(
            f"case {case_id}: {path} holds {bad} non-finite voxel(s) (NaN, inf or beyond float32); "
            "fix or drop the case"
        )
    return (list(np.moveaxis(arr, -1, 0)) if arr.ndim == 4 else [arr]), canonical, affine


def same_grid(case_id: str, path: Path, ref: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]
              ) -> str | None:
    """Check that the file ``path`` of a case (a label, a further channel) lies on its first image's voxel
    grid; ``ref`` and ``other`` are each (canonical affine, file affine).  The one rule for training data and
    for ``predict``'s channel files.

    Equal canonical grids (axes within 0.1% of the largest voxel size, origins within half the smallest) are
    what makes the reoriented arrays correspond voxel for voxel; if the files store their voxels in
    different axis orders, that is legitimate but unusual, and returned as a note.  Files whose own axes
    agree and whose origins alone differ keep corresponding voxels through the reorientation too (a
    header written by another tool): a note, and the voxels are used as aligned, as nnU-Net does.
    Anything else (another spacing, a mirrored header, a rotated axis) would pair image voxels with the wrong
    labels: refused.
    """
    (ref_c, ref_f), (oth_c, oth_f) = ref, other
    sizes = np.linalg.norm(ref_c[:3, :3], axis=0)
    tol = 1e-3 * float(sizes.max())
    shift = float(np.linalg.norm(ref_c[:3, 3] - oth_c[:3, 3]))
    codes = "".join(imageio.axis_codes(oth_f)), "".join(imageio.axis_codes(ref_f))
    if np.allclose(ref_c[:3, :3], oth_c[:3, :3], rtol=0, atol=tol) and shift <= 0.5 * float(sizes.min()):
        if codes[0] == codes[1]:
            return None
        return (f"case {case_id}: {path.name} stores its voxels in orientation {codes[0]}, its image in "
                f"{codes[1]}; both were reoriented by their headers")
    if np.allclose(ref_f[:3, :3], oth_f[:3, :3], rtol=0, atol=tol):
        return (f"case {case_id}: {path.name}'s origin is {shift:.3g} mm from its image's; the voxels are used "
                "as aligned (as nnU-Net does)")
    theirs = [round(float(v), 4) for v in np.linalg.norm(oth_f[:3, :3], axis=0)]
    mine = [round(float(v), 4) for v in np.linalg.norm(ref_f[:3, :3], axis=0)]
    # what sizes and axis codes cannot show: a small rotation or a sheared axis (the files' axes in turn)
    cosines = np.sum(ref_f[:3, :3] * oth_f[:3, :3], axis=0) / np.prod([np.linalg.norm(f[:3, :3], axis=0)
                                                                       for f in (ref_f, oth_f)], axis=0)
    turned = float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())
    raise PgpsError(
        f"case {case_id}: {path} is not on its image's voxel grid (voxel sizes {theirs} against {mine}, "
        f"orientation {codes[0]} against {codes[1]}, axes up to {turned:.3g} degrees apart), so its voxels would "
        "not line up; fix its header to the image's or drop the case"
    )


def _read_case(case: Case, labels: dict[int, str], channels: int):
    """A case's image ``[C, X, Y, Z]`` and label on the canonical grid, its spacing, a note for each file
    whose header places it apart from the first image file (:func:`same_grid`), and its label values."""
    files = [_channels_of(p, case.case_id) for p in case.images]
    chans = [c for cs, _, _ in files for c in cs]
    if len(chans) != channels:
        shapes = ", ".join(f"{p.name} is {'x'.join(map(str, imageio.header(p)[0]))}" for p in case.images)
        raise PgpsError(
            f"case {case.case_id} has {len(chans)} image channels ({shapes}) but dataset.json names {channels}; "
            "fix the modality/channel_names list, or give images with those channels (the last axis of a 4D "
            "image is its channels: a time series needs one time point per file)"
        )
    if len({c.shape for c in chans}) > 1:
        raise PgpsError(
            f"case {case.case_id}: its channel files differ in shape {sorted({c.shape for c in chans})}; "
            "fix or drop the case"
        )
    image = np.stack(chans)
    ref = files[0][1:]
    lab, *lab_affines = _load_image(case.label)
    lab = np.asarray(lab)
    if lab.ndim == 4 and lab.shape[3] == 1:  # X Y Z 1, as some tools write a label (ITK reads it as 3D)
        lab = lab[..., 0]
    others = [(p, f[1:]) for p, f in zip(case.images[1:], files[1:])] + [(case.label, tuple(lab_affines))]
    notes = [n for p, aff in others if (n := same_grid(case.case_id, p, ref, aff))]
    if lab.shape != image.shape[1:]:
        raise PgpsError(
            f"case {case.case_id}: image shape {list(image.shape[1:])} != label shape "
            f"{list(lab.shape)}; fix or drop the case"
        )
    if lab.dtype.kind == "f":
        lab, note = _integer_labels(case.case_id, case.label, lab)
        notes += [note] if note else []
    values = set(np.unique(lab).astype(int).tolist())
    extra = sorted(values - set(labels))
    if extra:
        raise PgpsError(
            f"case {case.case_id}: label values {extra} are not in dataset.json labels "
            f"{sorted(labels)}; add them to 'labels' or fix the label map"
        )
    return image, lab.astype(np.uint8), imageio.voxel_sizes(ref[0]), notes, values


# how far from an integer a label stored in floating point may be and still be that integer: a label map
# written as float32 after some arithmetic holds 0.9999999 for 1; one resampled with interpolation holds 0.5
LABEL_ROUNDING = 1e-3


def _integer_labels(case_id: str, path: Path, lab: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A label map stored in floating point as integers, and a note where any value was not one already;
    values further than :data:`LABEL_ROUNDING` from an integer (and NaN, inf) are refused in one line."""
    rounded = np.rint(lab)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, and refused as such
        off = np.abs(lab - rounded)
    bad = ~(off <= LABEL_ROUNDING)
    if bad.any():
        raise PgpsError(f"case {case_id}: label map {path} holds {int(bad.sum())} voxel(s) that are not integer "
                        f"labels (e.g. {lab[bad].flat[0]:.7g}); write integer labels (a label map resampled by "
                        "interpolation needs nearest-neighbour instead) or drop the case")
    if not off.any():
        return rounded, None
    near = lab[off > 0].flat[0]
    return rounded, (f"case {case_id}: {path.name} stores its labels as floating-point values near integers "
                     f"(e.g. {near:.7g}), read as the nearest integers")


# memory while a case is resampled and normalised, measured with tracemalloc: scipy's cubic spline filter takes
# about 24 bytes per voxel of the input channel in hand, the resampled channels, their stacking and the
# normalisation's float64 statistics 8 per channel plus 16 per voxel of the output
RESAMPLE_BYTES_IN, RESAMPLE_BYTES_OUT, RESAMPLE_BYTES_OUT_CHANNEL = 24, 16, 8


def _check_resample_memory(case_id: str, shape: Sequence[int], spacing, target) -> None:
    """Refuse, in one line and before it is tried, a case whose resampling needs more memory than is free.

    One case whose header gives a spacing far from the others' (10 mm among 1 mm cases) is resampled to a
    volume hundreds of times its own size: that would end in an out-of-memory kill without a word."""
    channels, grid = int(shape[0]), [int(n) for n in shape[1:]]
    out = imageio.resampled_shape(grid, spacing, target)
    need = (RESAMPLE_BYTES_IN * math.prod(grid)
            + (RESAMPLE_BYTES_OUT + RESAMPLE_BYTES_OUT_CHANNEL * channels) * math.prod(out))
    imageio.require_memory(
        need, f"case {case_id}: resampling it from spacing {imageio.spacing_text(spacing)} to the dataset's median "
        f"spacing {imageio.spacing_text(target)} turns its {'x'.join(map(str, grid))} voxels into "
        f"{'x'.join(map(str, out))}", "while preprocessing",
        "check the spacing in its header, drop the case, or run where more memory is free")


def _resample(image: np.ndarray, label: np.ndarray, spacing, target) -> tuple[np.ndarray, np.ndarray]:
    shape = imageio.resampled_shape(image.shape[1:], spacing, target)
    return imageio.resample(image, shape, order=3).astype(np.float32), imageio.resample(label[None], shape, 0)[0]


def _fg_coords(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    coords = {}
    for k in range(1, num_classes):
        idx = np.argwhere(label == k).astype(np.int32)
        if len(idx) > MAX_FG_COORDS:
            idx = idx[np.sort(rng.choice(len(idx), MAX_FG_COORDS, replace=False))]
        coords[k] = idx
    return coords


# -- the prepared (cached) dataset ------------------------------------------------

META = "prepared.json"


def _case_files(i: int) -> tuple[str, str, str]:
    """The image, label and foreground-coordinate file names of case ``i`` in a cache folder."""
    return f"{i:05d}_img.npy", f"{i:05d}_seg.npy", f"{i:05d}_fg.npz"


@dataclass
class PreparedDataset:
    """Preprocessed volumes, memory-mapped from the cache folder."""

    cache_dir: Path
    name: str
    labels: dict[int, str]
    channels: int
    spacing: tuple[float, float, float]
    case_ids: list[str]
    shapes: list[tuple[int, int, int]]
    normalisation: list[dict[str, Any]]  # one intensity scheme per channel (pgps_tune.intensity)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def median_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.median(np.array(self.shapes), axis=0))  # type: ignore[return-value]

    def image(self, i: int) -> np.ndarray:
        return load_npy(self.cache_dir / _case_files(i)[0])

    def label(self, i: int) -> np.ndarray:
        return load_npy(self.cache_dir / _case_files(i)[1])

    def fg(self, i: int) -> dict[int, np.ndarray]:
        with _NPY_HEADER_LOCK, np.load(self.cache_dir / _case_files(i)[2]) as z:
            return {int(k[1:]): z[k] for k in z.files}

    def __len__(self) -> int:
        return len(self.case_ids)


def default_cache_root() -> Path:
    env = os.environ.get("PGPS_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pgps-tune"


def _fingerprint(spec: DatasetSpec) -> str:
    h = hashlib.sha256(f"v{PREPROCESS_VERSION}".encode())
    h.update(json.dumps([spec.labels, spec.modalities], sort_keys=True).encode())
    for c in spec.cases:
        for p in (*c.images, c.label):
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class _Damaged(Exception):
    """A cache folder fails the integrity check; ``str()`` says how."""


def _check_npy(path: Path, shape: tuple[int, ...], dtype: type) -> None:
    """The ``.npy`` header holds ``shape`` and ``dtype`` and the file is exactly that long."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[version]
            with _NPY_HEADER_LOCK:
                got, fortran, got_dtype = read(fh)
            end = fh.tell() + math.prod(got) * got_dtype.itemsize
    except (OSError, ValueError, KeyError) as exc:
        raise _Damaged(f"{path.name} has no readable array header ({exc})") from None
    if got != shape or got_dtype != np.dtype(dtype) or fortran or end != path.stat().st_size:
        raise _Damaged(f"{path.name} holds {got_dtype}{list(got)}, {META} says {np.dtype(dtype)}{list(shape)}")


def _open_checked(out: Path) -> PreparedDataset:
    """Open a cache folder after the integrity check of the module docstring, or raise :class:`_Damaged`."""
    try:
        meta = loads_json(read_file(out / META, MAX_JSON_BYTES))
    except FileNotFoundError:
        raise _Damaged(f"{META} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Damaged(f"{META} is unreadable ({exc})") from None
    try:
        ds = PreparedDataset(
            cache_dir=out,
            name=str(meta["name"]),
            labels={int(k): str(v) for k, v in meta["labels"].items()},
            channels=int(meta["channels"]),
            spacing=tuple(float(v) for v in meta["spacing"]),  # type: ignore[arg-type]
            case_ids=[str(c) for c in meta["case_ids"]],
            shapes=[tuple(int(v) for v in s) for s in meta["shapes"]],  # type: ignore[misc]
            normalisation=[dict(n) for n in meta["normalisation"]],
        )
        sizes = {str(k): int(v) for k, v in meta["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _Damaged(f"{META} lacks or garbles a field ({type(exc).__name__}: {exc})") from None
    listed = {name for i in range(len(ds)) for name in _case_files(i)}
    if (
        len(ds.shapes) != len(ds) or any(len(s) != 3 for s in ds.shapes) or len(ds.spacing) != 3
        or ds.channels < 1 or ds.num_classes < 2 or set(sizes) != listed or len(ds.normalisation) != ds.channels
    ):
        raise _Damaged(f"{META} is inconsistent (cases, shapes and files disagree)")
    for name, size in sorted(sizes.items()):
        try:
            actual = (out / name).stat().st_size
        except OSError:
            raise _Damaged(f"{name} is missing") from None
        if actual != size:
            raise _Damaged(f"{name} has {actual} bytes, {META} says {size}")
    classes = {f"c{k}.npy" for k in range(1, ds.num_classes)}
    for i, shape in enumerate(ds.shapes):
        img, seg, fg = _case_files(i)
        _check_npy(out / img, (ds.channels, *shape), np.float32)
        _check_npy(out / seg, shape, np.uint8)
        try:
            with zipfile.ZipFile(out / fg) as z:
                names = set(z.namelist())
        except (OSError, zipfile.BadZipFile) as exc:
            raise _Damaged(f"{fg} is not a readable archive ({exc})") from None
        if names != classes:
            raise _Damaged(f"{fg} holds {sorted(names)}, not one array per foreground class")
    return ds


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[OSError | None]:
    """Hold the exclusive lock that lets one process at a time build ``out``.

    Yields None while held, or the error that prevented it (a read-only cache folder,
    a file system without locks): such a cache can still be read if it is complete.
    """
    lock = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:  # writable: NFS carries an exclusive flock as a write lock
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file: a local flock works on a read-only descriptor
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        yield exc
        return
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"pgps-tune: waiting for another process to finish preparing {out}",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks
            yield exc
        else:
            yield None
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    """Delete a folder or file; a remnant that resists stays for the next build's clean-up."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_stale(out: Path) -> None:
    """Remove temporaries of ``out`` left by dead writers (only while holding the build lock)."""
    for p in out.parent.glob(f".{out.name}.*"):
        if p.name != f".{out.name}.lock":
            _remove(p)


def _write_cache(out: Path, build: Callable[[Path], dict[str, Any]]) -> None:
    """Write a complete cache folder atomically: ``build(folder)`` writes the case files into a temporary
    folder and returns the metadata, then ``prepared.json`` is written last and the folder renamed."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(tmp)  # mode 0777 less the umask (mkdtemp would give 0700)
    try:
        meta = build(tmp)
        sizes = {n: (tmp / n).stat().st_size for i in range(len(meta["case_ids"])) for n in _case_files(i)}
        (tmp / META).write_text(json.dumps({**meta, "files": sizes}, indent=1), encoding="utf-8")
        if out.exists():  # a damaged folder (we hold the lock): move it aside, then drop it
            old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            os.replace(out, old)
            _remove(old)
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def _save_case(folder: Path, i: int, image: np.ndarray, label: np.ndarray) -> list[int]:
    """Write case ``i``'s image (float32) and label (uint8) into a cache folder; returns the label's shape."""
    names = _case_files(i)
    np.save(folder / names[0], np.ascontiguousarray(image, dtype=np.float32))
    np.save(folder / names[1], np.ascontiguousarray(label, dtype=np.uint8))
    return list(label.shape)


def _save_fg(folder: Path, cases: int, num_classes: int) -> None:
    """Write every case's foreground coordinates, in case order: the sampling of classes with more than
    :data:`MAX_FG_COORDS` voxels shares one generator, so the order makes the cache reproducible."""
    rng = np.random.default_rng(0)
    for i in range(cases):
        _, seg, fg = _case_files(i)
        coords = _fg_coords(load_npy(folder / seg), num_classes, rng)
        np.savez(folder / fg, **{f"c{k}": v for k, v in coords.items()})


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11 keeps the AST constructor's recursion
# count per interpreter, not per thread: two threads parsing at different stack depths can make one fail with
# "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905).  Preparation's worker threads and
# the sampler's prefetch thread open cache files beside other threads, so every .npy open here takes this lock
# (and those threads import nothing on first use: a module's first import parses too, see _in_parallel).
_NPY_HEADER_LOCK = threading.Lock()


def load_npy(path: Path) -> np.ndarray:
    """Memory-map the .npy file ``path`` read-only; safe beside other threads that open .npy files."""
    with _NPY_HEADER_LOCK:
        return np.load(path, mmap_mode="r")


def _in_parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]`` on ``workers`` threads, so at most ``workers`` items are in hand at once.

    ``fn`` opens .npy files with :func:`load_npy` and imports no module on first use: the caller imports
    them before (a first import parses Python source, which races the other threads' parsing as
    :func:`load_npy` explains).

    On an error or Ctrl-C the items not started are dropped and the running ones finish before it is
    raised (so nothing writes into a folder the caller then removes)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _cached(out: Path, build: Callable[[Path], dict[str, Any]]) -> PreparedDataset:
    """Open the cache folder ``out``, building it with ``build`` (see :func:`_write_cache`) first if it is
    missing or damaged."""
    with _build_lock(out) as lock_error:
        if lock_error is None:
            _remove_stale(out)
        try:
            return _open_checked(out)
        except _Damaged as exc:
            damage = str(exc) if out.exists() else None
        if lock_error is not None:
            state = f"is damaged ({damage})" if damage else "does not exist yet"
            raise PgpsError(
                f"the preprocessing cache {out} {state} and cannot be built there "
                f"({lock_error.strerror or lock_error}); set PGPS_CACHE_DIR (or --cache-dir) to a writable folder "
                "on a file system with locks"
            )
        if damage:
            print(f"pgps-tune: the preprocessing cache {out} is damaged ({damage}); rebuilding it",
                  file=sys.stderr, flush=True)
        try:
            _write_cache(out, build)
        except OSError as exc:
            raise PgpsError(
                f"cannot write the preprocessing cache under {out.parent} ({exc.strerror or exc}); "
                "set PGPS_CACHE_DIR (or --cache-dir) to a writable folder with free space"
            ) from None
        try:
            return _open_checked(out)
        except _Damaged as exc:
            raise PgpsError(f"the preprocessing cache {out} fails its check right after writing ({exc}); "
                            "check the disk") from None


def _preprocess(spec: DatasetSpec, workers: int, folder: Path) -> dict[str, Any]:
    """Read, reorient, resample and normalise every case of ``spec`` into the cache folder ``folder``.

    Memory holds at most ``workers`` cases at a time, whatever the dataset's size: a first pass reads and
    checks every case and parks its voxels on the canonical grid in ``folder`` (the target spacing and the
    CT statistics need every case before any can be normalised); a second resamples and normalises each
    parked case into its cache files.  Each file is decoded once; the disk holds about one copy of the
    dataset beside the cache while it is built.
    """
    parked = folder / "parked"
    os.mkdir(parked)
    imageio.import_libraries(p for c in spec.cases for p in (*c.images, c.label))  # see _in_parallel

    def park(item: tuple[int, Case]) -> tuple[tuple[float, float, float], list[str], set[int]]:
        k, case = item
        image, label, spacing, notes, values = _read_case(case, spec.labels, spec.channels)
        np.save(parked / f"{k}_img.npy", image)
        np.save(parked / f"{k}_seg.npy", label)
        return spacing, notes, values

    def unpark(k: int) -> tuple[np.ndarray, np.ndarray]:
        return load_npy(parked / f"{k}_img.npy"), load_npy(parked / f"{k}_seg.npy")

    read = _in_parallel(park, list(enumerate(spec.cases)), workers)
    for note in spec.notes:
        print(f"pgps-tune: warning: {note}", file=sys.stderr, flush=True)
    _check_classes(spec, set().union(*(r[2] for r in read)), [n for r in read for n in r[1]])
    spacings = np.array([r[0] for r in read])
    target = tuple(float(v) for v in np.median(spacings, axis=0))
    # CT statistics from the raw intensities of every labelled case, before resampling (as nnU-Net)
    schemes = intensity.fit(intensity.scheme_names(spec.modalities), (unpark(k) for k in range(len(spec.cases))))

    def finish(k: int) -> list[int]:
        case, sp = spec.cases[k], read[k][0]
        image, label = unpark(k)
        intensity.check_values(image, schemes, f"case {case.case_id}")
        if imageio.needs_resampling(sp, target):
            _check_resample_memory(case.case_id, image.shape, sp, target)
            image, label = _resample(image, label, sp, target)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            image = intensity.normalise(image, schemes)
        if not np.isfinite(image).all():
            raise PgpsError(
                f"case {case.case_id}: its intensities are too large to normalise in float32; "
                "rescale the image or drop the case"
            )
        shape = _save_case(folder, k, image, label)
        del image, label
        for name in (f"{k}_img.npy", f"{k}_seg.npy"):
            (parked / name).unlink()
        return shape

    shapes = _in_parallel(finish, list(range(len(spec.cases))), workers)
    parked.rmdir()
    _save_fg(folder, len(spec.cases), len(spec.labels))
    return {
        "name": spec.name, "labels": {str(k): v for k, v in spec.labels.items()},
        "channels": spec.channels, "spacing": list(target),
        "case_ids": [c.case_id for c in spec.cases],
        "shapes": shapes, "source": str(spec.root.resolve()),
        "normalisation": schemes,
    }


def _check_classes(spec: DatasetSpec, present: set[int], notes: list[str]) -> None:
    """Refuse labels without any foreground (``present``: the label values of every case); warn (one line
    each) about declared classes no case holds and about the files :func:`same_grid` noted (the first
    named, the others counted)."""
    foreground = {k: v for k, v in spec.labels.items() if k != 0}
    if not present & set(foreground):
        raise PgpsError(f"no label map of {spec.name} ({spec.root}) holds a foreground voxel (every voxel is "
                        f"background); nothing can be learnt: check labelsTr")
    missing = [f"{v} ({k})" for k, v in sorted(foreground.items()) if k not in present]
    if missing:
        print(f"pgps-tune: warning: no case of {spec.name} holds class {', '.join(missing)} of dataset.json; "
              "its Dice is undefined and left out of the mean", file=sys.stderr, flush=True)
    if notes:
        more = f" (and {len(notes) - 1} more)" if len(notes) > 1 else ""
        print(f"pgps-tune: warning: {notes[0]}{more}: check those files' headers", file=sys.stderr, flush=True)


def _synthetic(cases: int, shape: Sequence[int], noise: float, seed: int, folder: Path) -> dict[str, Any]:
    """Write the synthetic dataset's cases into the cache folder ``folder``, one at a time."""
    made = enumerate(_synthetic_cases(cases, shape, noise, seed))
    shapes = [_save_case(folder, i, img, seg) for i, (img, seg) in made]
    _save_fg(folder, cases, 3)
    return {
        "name": SYNTHETIC, "labels": {"0": "background", "1": "dim", "2": "bright"},
        "channels": 1, "spacing": [1.0, 1.0, 1.0],
        "case_ids": [f"synthetic_{i:03d}" for i in range(cases)],
        "shapes": shapes, "source": SYNTHETIC,
        "normalisation": [intensity.ZSCORE],
    }


def prepare(
    source: str | Path,
    cache_root: str | Path | None = None,
    workers: int = 2,
    synthetic_cases: int = 24,
    synthetic_shape: Sequence[int] = (48, 48, 48),
    synthetic_noise: float = 1.5,
    synthetic_seed: int = 0,
) -> PreparedDataset:
    """Preprocess ``source`` (a dataset folder or ``"synthetic"``) once, then reuse the cache.

    Safe to call from several processes at once: one builds, the others wait and read.
    """
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    if file := next((p for p in (cache_root, *cache_root.parents) if p.exists() and not p.is_dir()), None):
        raise PgpsError(f"the preprocessing cache {cache_root} cannot be made: {file} is a file; set PGPS_CACHE_DIR "
                        "(or --cache-dir) to a folder")
    if str(source) == SYNTHETIC:
        args = (synthetic_cases, list(synthetic_shape), synthetic_noise, synthetic_seed)
        key = hashlib.sha256(json.dumps([PREPROCESS_VERSION, *args]).encode()).hexdigest()[:16]
        return _cached(cache_root / f"synthetic-{key}", lambda folder: _synthetic(*args, folder))
    spec = discover(source)
    out = cache_root / f"{_safe(spec.name)}-{_fingerprint(spec)}"
    return _cached(out, lambda folder: _preprocess(spec, workers, folder))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "dataset"


def synthetic_volumes(
    n: int, shape: Sequence[int], noise: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noisy spheres from MONAI's generator, deterministic from ``seed``.

    Two foreground classes (dim and bright spheres); with noise around 1.5 a
    small network keeps improving for a while, so curricula can differ.
    """
    return list(_synthetic_cases(n, shape, noise, seed))


def _synthetic_cases(n: int, shape: Sequence[int], noise: float, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The cases of :func:`synthetic_volumes`, made one at a time."""
    from monai.data.synthetic import create_test_image_3d

    for i in range(n):
        rs = np.random.RandomState(seed * 100003 + i)
        img, seg = create_test_image_3d(
            *shape, num_objs=8, rad_max=max(3, min(shape) // 5), rad_min=max(2, min(shape) // 12),
            noise_max=noise, num_seg_classes=2, random_state=rs,
        )
        yield intensity.normalise(img[None], [intensity.ZSCORE]), seg.astype(np.uint8)


# -- split -------------------------------------------------------------------------


def split(
    ds: PreparedDataset, val_fraction: float = 0.2, seed: int = 0, splits_file: str | Path | None = None
) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of case indices, or one read from a splits file.

    A splits file is JSON: ``{"train": [case ids], "val": [case ids]}``.
    """
    if splits_file:
        return _split_entry(ds.name, ds.case_ids, read_splits(splits_file), splits_file)
    n = len(ds)
    if n < 2:
        raise PgpsError(f"dataset {ds.name} has {n} labelled case(s); a train/validation split needs at least 2: "
                        "add labelled cases to the dataset")
    if not 0 < val_fraction < 1:
        raise PgpsError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


ONE_SPLIT = 'it must be {"train": [case ids], "val": [case ids]}'
FOLDS = 'it must be a list of folds, each {"train": [case ids], "val": [case ids]} (as nnU-Net\'s splits_final.json)'


def read_splits(splits_file: str | Path, shape: str = ONE_SPLIT) -> Any:
    """The JSON of a splits file (its shape is checked by the caller), or a one-line error ending with
    ``shape``, what the caller needs: one split (:data:`ONE_SPLIT`) or cross-validation folds (:data:`FOLDS`)."""
    return read_json(splits_file, "splits file", shape)


def check_splits_file(source: str | Path, splits_file: str | Path) -> None:
    """Check a splits file against a dataset folder's case ids before it is prepared (which can take
    minutes on a large dataset): the same one-line refusals as :func:`split` gives after."""
    spec = discover(source)
    _split_entry(spec.name, [c.case_id for c in spec.cases], read_splits(splits_file), splits_file)


def _split_entry(name: str, case_ids: Sequence[str], entry: Any, splits_file: str | Path
                 ) -> tuple[list[int], list[int]]:
    """One ``{"train": [...], "val": [...]}`` entry of a splits file, as indices into ``case_ids`` (of the
    dataset ``name``), checked."""
    shape = ONE_SPLIT
    if isinstance(entry, list):
        raise PgpsError(f"splits file {splits_file} is a list (of cross-validation folds?), but one split is needed "
                        f"here; {shape}")
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("train", "val")):
        raise PgpsError(f"splits file {splits_file} needs lists of case ids under 'train' and 'val'; {shape}")
    ids = {cid: i for i, cid in enumerate(case_ids)}
    unknown = [c for k in ("train", "val") for c in entry[k] if not isinstance(c, str) or c not in ids]
    if unknown:
        raise PgpsError(f"splits file {splits_file} names {len(unknown)} case id(s) that dataset {name} does not "
                        f"have, e.g. {unknown[0]!r}; use the ids of its dataset.json (e.g. {case_ids[0]!r})")
    train, val = [ids[c] for c in entry["train"]], [ids[c] for c in entry["val"]]
    twice = sorted((c, n) for c, n in Counter(entry["train"] + entry["val"]).items() if n > 1)
    if not train or not val or twice:
        why = f"{twice[0][0]!r} is listed {twice[0][1]} times" if twice else "one is empty"
        raise PgpsError(f"splits file {splits_file}: train and val must be non-empty and name each case once "
                        f"({why})")
    return train, val


def fold_split(
    ds: PreparedDataset, folds: int, fold: int, seed: int = 0, splits_file: str | Path | None = None
) -> tuple[list[int], list[int]]:
    """Train/validation case indices of cross-validation fold ``fold`` (0-based) of ``folds``.

    Seeded: the cases are shuffled with ``seed`` and cut into ``folds`` near-equal parts; fold i
    validates on part i and trains on the rest, so every case is validated exactly once.  A
    splits file is a JSON list of ``{"train": [case ids], "val": [case ids]}``, one per fold
    (nnU-Net's ``splits_final.json``); it must hold exactly ``folds`` entries.
    """
    if splits_file:
        entries = read_splits(splits_file, FOLDS)
        if not isinstance(entries, list) or len(entries) != folds:
            got = f"{len(entries)} entries" if isinstance(entries, list) else "not a list"
            raise PgpsError(f"splits file {splits_file} must be a list of {folds} folds "
                            f'[{{"train": [case ids], "val": [case ids]}}, ...] ({got})')
        return _split_entry(ds.name, ds.case_ids, entries[fold], splits_file)
    n = len(ds)
    if not 2 <= folds <= n:
        raise PgpsError(f"{folds} cross-validation folds asked for, but dataset {ds.name} has {n} cases; "
                        f"use 2 to {n} folds")
    if not 0 <= fold < folds:
        raise PgpsError(f"fold {fold} does not exist; folds are 0 to {folds - 1}")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    val = sorted(parts[fold].tolist())
    return sorted(set(range(n)) - set(val)), val


# -- planning ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    final_patch: tuple[int, int, int]
    pools: tuple[int, int, int]


def plan_patch(
    median_shape: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    voxel_budget: int = 128**3,
    max_pools: int = 5,
    min_bottleneck: int = 4,
) -> Plan:
    """Choose the final patch and poolings from the data, nnU-Net style.

    Start from the median shape; while the patch holds more voxels than the
    budget (a proxy for GPU memory), shrink the axis that is largest in
    physical size.  Pool each axis while its bottleneck stays >= ``min_bottleneck``
    voxels; then round each axis up to a multiple of ``2**pools``.
    """
    patch = [float(s) for s in median_shape]
    while math.prod(patch) > voxel_budget:
        axis = max(range(3), key=lambda a: patch[a] * spacing[a])
        patch[axis] *= 0.9
    pools = [
        int(min(max_pools, max(0, math.floor(math.log2(max(p, 1) / min_bottleneck))))) for p in patch
    ]
    final = tuple(int(math.ceil(p / 2**k) * 2**k) for p, k in zip(patch, pools))
    return Plan(final, tuple(pools))  # type: ignore[arg-type]
