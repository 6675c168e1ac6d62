"""Apply a trained run to new images (``pgps-tune predict``). Knows nothing about Ray.

Each input goes the way the training data went: canonical orientation, resampling to
the run's spacing, the run's intensity normalisation.  The network then runs as a
sliding window at the final patch size with Gaussian weighting, optionally averaged
over the 8 mirrored copies of the volume (test-time augmentation).  The label map
comes back the same way in reverse: nearest-neighbour resampling to the input's
canonical grid, reorientation to the input's own axes, and the input's affine and
header, so the segmentation overlays the image voxel for voxel in any viewer.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgps_tune.errors import PgpsError, atomic_write

NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Geometry:
    """Where an input image's voxels sit, to write the prediction back onto them."""

    affine: np.ndarray
    header: Any  # nibabel header of the (first) input file
    shape: tuple[int, int, int]  # the input's own voxel grid
    canonical_shape: tuple[int, int, int]
    to_canonical: np.ndarray  # nibabel orientation transform from the input's axes to RAS+
    spacing: tuple[float, float, float]  # canonical spacing


def _ending(path: Path) -> str:
    return next((e for e in NIFTI_ENDINGS if path.name.endswith(e)), "")


def find_inputs(source: str | Path, channels: int) -> list[tuple[str, list[Path]]]:
    """``[(case name, [files])]``: one 3D/4D NIfTI per case, or nnU-Net's ``CASE_0000.nii.gz``... per channel."""
    source = Path(source)
    if source.is_file():
        if not _ending(source):
            raise PgpsError(f"--input {source} is not a NIfTI file (.nii or .nii.gz); give NIfTI images")
        return [(source.name[: -len(_ending(source))], [source])]
    if not source.is_dir():
        raise PgpsError(f"--input {source} does not exist; give a NIfTI file or a folder of them")
    files = sorted(p for p in source.iterdir() if p.is_file() and _ending(p))
    if not files:
        raise PgpsError(f"--input {source} holds no .nii/.nii.gz files; give a NIfTI file or a folder of them")
    stems = {p: p.name[: -len(_ending(p))] for p in files}
    split = {p: stems[p].rpartition("_") for p in files}
    if channels > 1 and all(sep and suffix.isdigit() and len(suffix) == 4 for _, sep, suffix in split.values()):
        cases: dict[str, list[Path]] = {}
        for p in files:
            cases.setdefault(split[p][0], []).append(p)
        bad = [c for c, ps in cases.items() if len(ps) != channels]
        if bad:
            raise PgpsError(f"case {bad[0]} has {len(cases[bad[0]])} channel files but the run was trained on "
                            f"{channels}; give CASE_0000 ... CASE_{channels - 1:04d} for every case")
        return [(c, sorted(ps)) for c, ps in sorted(cases.items())]
    return [(stems[p], [p]) for p in files]


def read_image(files: Sequence[Path], channels: int) -> tuple[np.ndarray, Geometry]:
    """The image as ``[C, X, Y, Z]`` float32 in canonical (RAS+) orientation, and its geometry."""
    import nibabel as nib

    chans, first = [], None
    for path in files:
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # nibabel raises many types for broken files
            raise PgpsError(f"cannot read NIfTI file {path} ({type(exc).__name__}); replace it") from None
        if data.ndim not in (3, 4):
            raise PgpsError(f"{path} has {data.ndim} dimensions; images must be 3D (or 4D with channels last)")
        if first is None:
            first = img
        elif data.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise PgpsError(f"{path} does not share the grid of {files[0]}; channel files must be co-registered")
        canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
        arr = np.asarray(canonical.dataobj, dtype=np.float32)
        chans.extend(np.moveaxis(arr, -1, 0) if arr.ndim == 4 else [arr])
    if len(chans) != channels:
        raise PgpsError(f"{files[0]} gives {len(chans)} channel(s) but the run was trained on {channels}")
    image = np.stack(chans)
    if not np.all(np.isfinite(image)):
        raise PgpsError(f"{files[0]} holds non-finite voxels (NaN or inf); fix the image")
    assert first is not None
    ornt = nib.orientations.io_orientation(first.affine)
    zooms = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(first.shape[:3], np.uint8), first.affine))
    geometry = Geometry(
        affine=first.affine, header=first.header, shape=tuple(int(s) for s in first.shape[:3]),  # type: ignore[arg-type]
        canonical_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        to_canonical=ornt, spacing=tuple(float(z) for z in zooms.header.get_zooms()[:3]),  # type: ignore[arg-type]
    )
    return image, geometry


def to_model_space(image: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Resample a canonical ``[C, X, Y, Z]`` image to the run's spacing (no-op where they agree)."""
    from scipy.ndimage import zoom

    if np.allclose(spacing, target, rtol=1e-3):
        return image
    shape = image.shape[1:]
    new = [max(1, round(s * sp / t)) for s, sp, t in zip(shape, spacing, target)]
    factors = [n / s for n, s in zip(new, shape)]
    return np.stack([zoom(c, factors, order=3, mode="nearest", grid_mode=True) for c in image]).astype(np.float32)


def to_input_space(label: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label map on the model's grid, back onto the input's own voxel grid and axes."""
    import nibabel as nib
    from scipy.ndimage import zoom

    if label.shape != geometry.canonical_shape:
        factors = [t / s for t, s in zip(geometry.canonical_shape, label.shape)]
        label = zoom(label, factors, order=0, mode="nearest", grid_mode=True)
        label = label[tuple(slice(0, t) for t in geometry.canonical_shape)]
    # undo as_closest_canonical: the inverse of the input -> RAS+ transform
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), geometry.to_canonical)
    return np.ascontiguousarray(nib.orientations.apply_orientation(label, back))


@torch.no_grad()
def segment(
    model: torch.nn.Module,
    image: np.ndarray,
    final_patch: Sequence[int],
    device: torch.device,
    mirror: bool = False,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
) -> np.ndarray:
    """Label map of a normalised ``[C, X, Y, Z]`` image: Gaussian-weighted sliding window, optional mirroring."""
    from monai.inferers import sliding_window_inference

    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)] if mirror else [()]
    probs = None
    for axes in flips:
        xi = torch.flip(x, axes) if axes else x
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = sliding_window_inference(xi, tuple(final_patch), sw_batch_size, model, overlap=overlap,
                                              mode="gaussian")
        p = torch.softmax(logits.float(), 1)
        p = torch.flip(p, axes) if axes else p
        probs = p if probs is None else probs + p
    assert probs is not None
    return probs.argmax(1)[0].to(torch.uint8).cpu().numpy()


def output_path(out_dir: Path, case: str) -> Path:
    return out_dir / f"{case}.nii.gz"


def predict(
    run_dir: str | Path,
    source: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    mirror: bool = False,
    overwrite: bool = False,
    overlap: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Segment every image of ``source`` with the run's network; write one NIfTI per case into ``out_dir``."""
    import nibabel as nib

    from pgps_tune.intensity import normalise
    from pgps_tune.trainer import load_run, resolve_device

    dev = resolve_device(device)
    run = load_run(run_dir, dev)
    inputs = find_inputs(source, run.channels)
    out_dir = Path(out_dir)
    targets = [output_path(out_dir, case) for case, _ in inputs]
    clash = [t for t in targets if t.exists()]
    if clash and not overwrite:
        more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
        raise PgpsError(f"{clash[0]}{more} already exist(s); add --overwrite or choose another --out")
    for i, ((case, files), target) in enumerate(zip(inputs, targets), 1):
        t0 = time.perf_counter()
        image, geometry = read_image(files, run.channels)
        image = normalise(to_model_space(image, geometry.spacing, run.spacing), run.normalisation)
        label = to_input_space(segment(run.model, image, run.final_patch, dev, mirror, overlap=overlap), geometry)
        header = geometry.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)  # the input's intensity scaling must not rescale labels
        seg = nib.Nifti1Image(label.astype(np.uint8), geometry.affine, header)
        payload = _gzip(seg.to_bytes())  # outputs are always .nii.gz
        atomic_write(target, lambda fh, payload=payload: fh.write(payload))
        if progress:
            progress(f"[{i}/{len(inputs)}] {case} -> {target} ({time.perf_counter() - t0:.1f} s)")
    return targets


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=6, mtime=0)
