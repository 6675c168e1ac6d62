"""Shared fixtures: an isolated cache and tiny MSD datasets written as NIfTI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PGPS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray,
               spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, str]:
    affine = np.diag([*spacing, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def blob_case(shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with two labelled blobs (classes 1 and 2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    label = np.zeros(shape, dtype=np.uint8)
    for cls in (1, 2):
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        r = min(shape) / 5
        label[np.linalg.norm(grid - centre, axis=-1) < r] = cls
    image = label * 1.0 + rng.normal(0, 0.3, shape)
    return image, label


def make_msd(root: Path, n: int = 6, shape: Sequence[int] = (20, 24, 16),
             spacings: Sequence[Sequence[float]] | None = None) -> Path:
    training = []
    for i in range(n):
        image, label = blob_case(shape, i)
        sp = spacings[i] if spacings else (1.0, 1.0, 1.0)
        training.append(write_case(root, f"case_{i:03d}", image, label, sp))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n, "training": training,
    }))
    return root


@pytest.fixture
def tiny_msd(tmp_path) -> Path:
    return make_msd(tmp_path / "tiny")
