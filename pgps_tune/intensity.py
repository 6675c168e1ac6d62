"""Intensity normalisation by modality, one scheme per channel.

CT intensities are physical (Hounsfield units), so every CT volume is normalised the same
way, from statistics of the whole training set: clip to the 0.5 and 99.5 percentiles of
the foreground intensities, then subtract the foreground mean and divide by the
foreground standard deviation (nnU-Net's CT scheme).  MRI and every other modality have
arbitrary intensity scales per scan, so each volume is z-scored on its own.

A scheme is plain data (it travels in the preprocessing cache, in checkpoints and in
``pgps-tune predict``):

>>> normalise(np.array([[[[0.0, 2.0]]]], dtype=np.float32), [{"type": "zscore"}]).ravel().tolist()
[-1.0, 1.0]
>>> ct = {"type": "ct", "lower": -100.0, "upper": 300.0, "mean": 100.0, "sd": 50.0}
>>> normalise(np.array([[[[-1000.0, 150.0]]]], dtype=np.float32), [ct]).ravel().tolist()
[-4.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

CT_PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 10_000  # foreground voxels per case for the CT statistics, as nnU-Net samples


def scheme_names(modalities: Sequence[str]) -> list[str]:
    """``ct`` for channels named CT (any case), ``zscore`` for every other modality."""
    return ["ct" if str(m).strip().upper() == "CT" else "zscore" for m in modalities]


def fit(names: Sequence[str], cases: Iterable[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> list[dict[str, Any]]:
    """Schemes for each channel; CT channels get statistics from the foreground of ``cases``.

    ``cases`` yields ``(image [C, X, Y, Z], label [X, Y, Z])``; it is read once, and only
    if some channel is CT.
    """
    if "ct" not in names:
        return [{"type": "zscore"} for _ in names]
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = [[] for _ in names]
    for image, label in cases:
        fg = np.flatnonzero(label > 0)
        if fg.size > SAMPLES_PER_CASE:
            fg = rng.choice(fg, SAMPLES_PER_CASE, replace=False)
        for c, name in enumerate(names):
            if name == "ct":
                samples[c].append(image[c].ravel()[fg])
    schemes: list[dict[str, Any]] = []
    for c, name in enumerate(names):
        if name != "ct":
            schemes.append({"type": "zscore"})
            continue
        values = np.concatenate(samples[c]) if samples[c] else np.zeros(0, np.float32)
        if values.size == 0:  # no foreground anywhere: fall back to the whole-volume scheme, said in the record
            schemes.append({"type": "zscore", "note": "CT channel without labelled foreground"})
            continue
        lower, upper = np.percentile(values, CT_PERCENTILES)
        schemes.append({"type": "ct", "lower": float(lower), "upper": float(upper),
                        "mean": float(values.mean()), "sd": float(values.std())})
    return schemes


def normalise(image: np.ndarray, schemes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Apply one scheme per channel of ``image [C, X, Y, Z]``; returns float32."""
    if len(schemes) != image.shape[0]:
        raise ValueError(f"{len(schemes)} normalisation schemes for {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        ch = image[c].astype(np.float32, copy=False)
        if scheme["type"] == "ct":
            ch = np.clip(ch, scheme["lower"], scheme["upper"])
            out[c] = (ch - scheme["mean"]) / max(scheme["sd"], 1e-8)
        else:
            out[c] = (ch - ch.mean()) / max(float(ch.std()), 1e-8)
    return out
