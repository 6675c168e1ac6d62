"""Datasets: discovery (MSD, nnU-Net raw, synthetic), preprocessing cache, split, planning.

Volumes are preprocessed once (canonical orientation, resampling to a common
spacing where cases differ, intensity normalisation per channel by modality:
see :mod:`pgps_tune.intensity`) and cached as
``.npy`` files that every later run (and every tuner trial) memory-maps, so
loading costs nothing after the first run.  Foreground voxel coordinates per
class are cached beside them for foreground-centred sampling.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgps_tune import imageio, intensity
from pgps_tune.errors import PgpsError

PREPROCESS_VERSION = 2  # 2: normalisation by modality (CT dataset-wide), .nrrd/.mha readers
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


# -- discovery -----------------------------------------------------------------


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise PgpsError(f"data folder {root} does not exist; give an MSD-layout folder or 'synthetic'")
    if not path.is_file():
        raise PgpsError(
            f"{path} is missing; the data folder needs an MSD or nnU-Net dataset.json"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PgpsError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict) or "labels" not in data or not isinstance(data["labels"], dict):
        raise PgpsError(f"{path} has no 'labels' mapping; add one, e.g. {{\"0\": \"background\", \"1\": \"organ\"}}")
    return data


def _parse_labels(raw: dict[str, Any], path: Path) -> dict[int, str]:
    labels: dict[int, str] = {}
    try:
        for k, v in raw.items():
            # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}
            if isinstance(v, int) and not isinstance(v, bool):
                labels[v] = str(k)
            else:
                labels[int(k)] = str(v)
    except (TypeError, ValueError):
        raise PgpsError(
            f"{path}: 'labels' must map integer values to names; fix its labels section"
        ) from None
    if 0 not in labels or len(labels) < 2:
        raise PgpsError(f"{path}: 'labels' needs background 0 and at least one foreground label")
    if sorted(labels) != list(range(len(labels))):
        raise PgpsError(f"{path}: label values {sorted(labels)} must be consecutive from 0")
    return labels


def discover(root: str | Path) -> DatasetSpec:
    """Read an MSD-layout or nnU-Net-raw-layout dataset folder."""
    root = Path(root)
    data = _read_dataset_json(root)
    path = root / "dataset.json"
    labels = _parse_labels(data["labels"], path)
    cases: list[Case] = []
    if "training" in data:  # MSD
        layout = "msd"
        modality = data.get("modality") or {"0": "image"}
        channels = len(modality) if isinstance(modality, dict) else 1
        if not isinstance(data["training"], list):
            raise PgpsError(f"{path}: 'training' must be a list of {{image, label}} entries")
        for i, entry in enumerate(data["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise PgpsError(f"{path}: training entry {i} needs 'image' and 'label'")
            image, label = root / entry["image"], root / entry["label"]
            case_id = Path(entry["label"]).name.split(".")[0]
            cases.append(Case(case_id, (image,), label))
    elif "channel_names" in data or "modality" in data:  # nnU-Net v2 raw
        layout = "nnunet"
        names = data.get("channel_names") or data.get("modality")
        channels = len(names)
        ending = data.get("file_ending", ".nii.gz")
        for label in sorted((root / "labelsTr").glob(f"*{ending}")):
            case_id = label.name[: -len(ending)]
            images = tuple(
                root / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in range(channels)
            )
            cases.append(Case(case_id, images, label))
    else:
        raise PgpsError(
            f"{path} has neither 'training' (MSD) nor 'channel_names' (nnU-Net); "
            "use an MSD or nnU-Net raw dataset.json"
        )
    if not cases:
        raise PgpsError(f"{root} lists no labelled training cases; add cases to imagesTr/labelsTr")
    missing = [str(p) for c in cases for p in (*c.images, c.label) if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PgpsError(f"missing file {missing[0]}{more}; fix dataset.json or add the files")
    name = str(data.get("name") or root.name)
    return DatasetSpec(root, name, layout, labels, channels, tuple(cases), _modalities(data, channels))


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


def _load_image(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An image file (any :data:`imageio.ENDINGS`) in canonical orientation, and its canonical spacing."""
    arr, affine = imageio.read(path)
    arr, affine = imageio.to_canonical(arr, affine)
    return arr, imageio.voxel_sizes(affine)


def _read_case(case: Case, labels: dict[int, str], channels: int):
    chans, spacing = [], None
    for p in case.images:
        arr, spacing = _load_image(p)
        if arr.ndim == 4:
            chans.extend(np.moveaxis(arr, -1, 0))
        elif arr.ndim == 3:
            chans.append(arr)
        else:
            raise PgpsError(f"{p} has {arr.ndim} dimensions; images must be 3D (or 4D with channels last)")
    if len(chans) != channels:
        raise PgpsError(
            f"case {case.case_id} has {len(chans)} image channels but dataset.json names {channels}; "
            "fix the modality/channel_names list"
        )
    image = np.stack([np.asarray(c, dtype=np.float32) for c in chans])
    lab, lab_spacing = _load_image(case.label)
    lab = np.asarray(lab)
    if lab.shape != image.shape[1:]:
        raise PgpsError(
            f"case {case.case_id}: image shape {list(image.shape[1:])} != label shape "
            f"{list(lab.shape)}; fix or drop the case"
        )
    if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
        raise PgpsError(f"case {case.case_id}: label map holds non-integer values; labels must be integers")
    values = set(np.unique(lab).astype(int).tolist())
    extra = sorted(values - set(labels))
    if extra:
        raise PgpsError(
            f"case {case.case_id}: label values {extra} are not in dataset.json labels "
            f"{sorted(labels)}; add them to 'labels' or fix the label map"
        )
    assert spacing is not None
    return image, lab.astype(np.uint8), spacing


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
        return np.load(self.cache_dir / f"{i:05d}_img.npy", mmap_mode="r")

    def label(self, i: int) -> np.ndarray:
        return np.load(self.cache_dir / f"{i:05d}_seg.npy", mmap_mode="r")

    def fg(self, i: int) -> dict[int, np.ndarray]:
        with np.load(self.cache_dir / f"{i:05d}_fg.npz") as z:
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


def _write_cache(
    out: Path, meta: dict[str, Any], volumes: list[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> None:
    """Write a complete cache folder atomically (temp folder + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rng = np.random.default_rng(0)
        for i, (img, seg) in enumerate(volumes):
            np.save(tmp / f"{i:05d}_img.npy", np.ascontiguousarray(img, dtype=np.float32))
            np.save(tmp / f"{i:05d}_seg.npy", np.ascontiguousarray(seg, dtype=np.uint8))
            fg = _fg_coords(seg, num_classes, rng)
            np.savez(tmp / f"{i:05d}_fg.npz", **{f"c{k}": v for k, v in fg.items()})
        (tmp / "prepared.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same cache first
            if not (out / "prepared.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_cache(out: Path) -> PreparedDataset:
    meta = json.loads((out / "prepared.json").read_text())
    return PreparedDataset(
        cache_dir=out,
        name=meta["name"],
        labels={int(k): v for k, v in meta["labels"].items()},
        channels=meta["channels"],
        spacing=tuple(meta["spacing"]),  # type: ignore[arg-type]
        case_ids=meta["case_ids"],
        shapes=[tuple(s) for s in meta["shapes"]],  # type: ignore[misc]
        normalisation=meta["normalisation"],
    )


def prepare(
    source: str | Path,
    cache_root: str | Path | None = None,
    workers: int = 2,
    synthetic_cases: int = 24,
    synthetic_shape: Sequence[int] = (48, 48, 48),
    synthetic_noise: float = 1.5,
    synthetic_seed: int = 0,
) -> PreparedDataset:
    """Preprocess ``source`` (a dataset folder or ``"synthetic"``) once, then reuse the cache."""
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    if str(source) == SYNTHETIC:
        key = hashlib.sha256(
            json.dumps(
                [PREPROCESS_VERSION, synthetic_cases, list(synthetic_shape), synthetic_noise, synthetic_seed]
            ).encode()
        ).hexdigest()[:16]
        out = cache_root / f"synthetic-{key}"
        if not (out / "prepared.json").is_file():
            vols = synthetic_volumes(synthetic_cases, synthetic_shape, synthetic_noise, synthetic_seed)
            meta = {
                "name": SYNTHETIC, "labels": {"0": "background", "1": "dim", "2": "bright"},
                "channels": 1, "spacing": [1.0, 1.0, 1.0],
                "case_ids": [f"synthetic_{i:03d}" for i in range(synthetic_cases)],
                "shapes": [list(v[1].shape) for v in vols], "source": SYNTHETIC,
                "normalisation": [intensity.ZSCORE],
            }
            _write_cache_checked(out, meta, vols, 3)
        return _open_cache(out)

    spec = discover(source)
    out = cache_root / f"{_safe(spec.name)}-{_fingerprint(spec)}"
    if (out / "prepared.json").is_file():
        return _open_cache(out)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        raw = list(pool.map(lambda c: _read_case(c, spec.labels, spec.channels), spec.cases))
    spacings = np.array([r[2] for r in raw])
    target = tuple(float(v) for v in np.median(spacings, axis=0))
    # CT statistics from the raw intensities of every labelled case, before resampling (as nnU-Net)
    schemes = intensity.fit(intensity.scheme_names(spec.modalities), ((r[0], r[1]) for r in raw))
    vols = []
    for image, label, sp in raw:
        if not np.allclose(sp, target, rtol=1e-3):
            image, label = _resample(image, label, sp, target)
        vols.append((intensity.normalise(image, schemes), label))
    meta = {
        "name": spec.name, "labels": {str(k): v for k, v in spec.labels.items()},
        "channels": spec.channels, "spacing": list(target),
        "case_ids": [c.case_id for c in spec.cases],
        "shapes": [list(v[1].shape) for v in vols], "source": str(Path(source).resolve()),
        "normalisation": schemes,
    }
    _write_cache_checked(out, meta, vols, len(spec.labels))
    return _open_cache(out)


def _write_cache_checked(out: Path, meta, vols, num_classes: int) -> None:
    try:
        _write_cache(out, meta, vols, num_classes)
    except OSError as exc:
        raise PgpsError(
            f"cannot write the preprocessing cache under {out.parent} ({exc.strerror or exc}); "
            "set PGPS_CACHE_DIR to a writable folder"
        ) from None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "dataset"


def synthetic_volumes(
    n: int, shape: Sequence[int], noise: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noisy spheres from MONAI's generator, deterministic from ``seed``.

    Two foreground classes (dim and bright spheres); with noise around 1.5 a
    small network keeps improving for a while, so curricula can differ.
    """
    from monai.data.synthetic import create_test_image_3d

    vols = []
    for i in range(n):
        rs = np.random.RandomState(seed * 100003 + i)
        img, seg = create_test_image_3d(
            *shape, num_objs=8, rad_max=max(3, min(shape) // 5), rad_min=max(2, min(shape) // 12),
            noise_max=noise, num_seg_classes=2, random_state=rs,
        )
        vols.append((intensity.normalise(img[None], [intensity.ZSCORE]), seg.astype(np.uint8)))
    return vols


# -- split -------------------------------------------------------------------------


def split(
    ds: PreparedDataset, val_fraction: float = 0.2, seed: int = 0, splits_file: str | Path | None = None
) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of case indices, or one read from a splits file.

    A splits file is JSON: ``{"train": [case ids], "val": [case ids]}``.
    """
    ids = {cid: i for i, cid in enumerate(ds.case_ids)}
    if splits_file:
        try:
            data = json.loads(Path(splits_file).read_text())
            train = [ids[c] for c in data["train"]]
            val = [ids[c] for c in data["val"]]
        except FileNotFoundError:
            raise PgpsError(f"splits file {splits_file} does not exist; check the path") from None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise PgpsError(
                f"splits file {splits_file} is malformed or names an unknown case ({exc}); "
                'it must be {"train": [case ids], "val": [case ids]}'
            ) from None
        if not train or not val or set(train) & set(val):
            raise PgpsError(f"splits file {splits_file}: train and val must be non-empty and disjoint")
        return train, val
    n = len(ds)
    if n < 2:
        raise PgpsError(f"dataset {ds.name} has {n} case(s); a train/validation split needs at least 2")
    if not 0 < val_fraction < 1:
        raise PgpsError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


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
