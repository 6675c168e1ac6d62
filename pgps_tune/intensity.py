"""Intensity normalisation by modality, one scheme per channel.

CT intensities are physical (Hounsfield units), so every CT volume is normalised the same
way, from statistics of the whole training set: clip to the 0.5 and 99.5 percentiles of
the foreground intensities, then subtract the foreground mean and divide by the
foreground standard deviation (nnU-Net's CT scheme).  MRI and every other modality have
arbitrary intensity scales per scan, so each volume is z-scored on its own.  nnU-Net's
other channel names are honoured as nnU-Net honours them: ``noNorm`` keeps the intensities
as they are, ``rescale_to_0_1`` maps each volume's range onto [0, 1], ``rgb_to_0_1``
divides by 255 (and, as nnU-Net, refuses a volume with values outside 0-255: :func:`check_values`).

The CT statistics come from the labelled cases that :func:`fit` is given (``prepare``
gives it every labelled case of the dataset, validation cases included, as nnU-Net's
fingerprint does), sampled before resampling as nnU-Net samples them: :data:`SAMPLES_PER_CASE`
foreground voxels drawn with replacement from every case that has foreground, so every case
weighs the same whatever the size of its foreground (seeded: the same data give the same
statistics).  Mean and sd are those of the unclipped foreground intensities, as nnU-Net's.  A scheme
is plain data (it travels in the preprocessing cache, in checkpoints and into
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

from pgps_tune.errors import PgpsError

CT_PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 10_000  # foreground voxels per case for the CT statistics (nnU-Net's number)
ZSCORE: dict[str, Any] = {"type": "zscore"}


# nnU-Net v2's channel names with a scheme of their own (compared case-insensitively, as nnU-Net does)
NAMED_SCHEMES = {"ct": "ct", "nonorm": "none", "rescale_to_0_1": "rescale", "rgb_to_0_1": "rgb"}
FIXED = ("zscore", "none", "rescale", "rgb")  # schemes that need no statistics of the dataset


def scheme_names(modalities: Sequence[str]) -> list[str]:
    """The scheme of each channel from its modality name: ``ct`` for CT, nnU-Net's ``noNorm``,
    ``rescale_to_0_1`` and ``rgb_to_0_1`` as nnU-Net reads them, ``zscore`` for every other name.

    >>> scheme_names(["CT", " ct", "MRI", "T2", "noNorm", "rescale_to_0_1"])
    ['ct', 'ct', 'zscore', 'zscore', 'none', 'rescale']
    """
    return [NAMED_SCHEMES.get(str(m).strip().casefold(), "zscore") for m in modalities]


def fit(
    names: Sequence[str], cases: Iterable[tuple[np.ndarray, np.ndarray]], seed: int = 0
) -> list[dict[str, Any]]:
    """One scheme per channel; CT channels get statistics from the foreground (label > 0) of ``cases``.

    Args:
        names: per channel, ``"ct"`` or ``"zscore"`` (see :func:`scheme_names`).
        cases: ``(image [C, X, Y, Z], label [X, Y, Z])`` pairs; read once, and only if a channel is CT.
        seed: the sampling of :data:`SAMPLES_PER_CASE` foreground voxels per case (with replacement).

    A CT channel needs labelled foreground somewhere: without it the statistics are
    undefined, and a dataset without foreground cannot be trained on anyway, so that is
    refused with a :class:`PgpsError` rather than replaced by another scheme.
    """
    unknown = sorted(set(names) - {"ct", *FIXED})
    if unknown:
        raise ValueError(f"unknown normalisation scheme names {unknown}")
    if "ct" not in names:
        return [{"type": name} for name in names]
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = [[] for _ in names]
    for image, label in cases:
        fg = np.flatnonzero(np.asarray(label) > 0)
        if fg.size:  # as many draws from every case: a small foreground weighs as much as a large one
            fg = np.sort(rng.choice(fg, SAMPLES_PER_CASE, replace=True))
        for c, name in enumerate(names):
            if name == "ct":
                samples[c].append(np.asarray(image[c]).ravel()[fg].astype(np.float64))
    schemes: list[dict[str, Any]] = []
    for c, name in enumerate(names):
        values = np.concatenate(samples[c]) if samples[c] else np.zeros(0)
        if name != "ct":
            schemes.append({"type": name})
        elif values.size == 0:
            raise PgpsError(
                f"channel {c} is CT, whose normalisation needs foreground intensities, but no labelled case "
                "has foreground voxels; check the label maps in labelsTr"
            )
        else:
            lower, upper = np.percentile(values, CT_PERCENTILES)
            schemes.append({"type": "ct", "lower": float(lower), "upper": float(upper),
                            "mean": float(values.mean()), "sd": float(values.std())})
    return schemes


def check_schemes(schemes: Sequence[dict[str, Any]], channels: int) -> None:
    """ValueError unless ``schemes`` (read back from a checkpoint) are one known scheme per channel, a ``ct``
    one with its four finite statistics: what :func:`normalise` needs.

    >>> check_schemes([{"type": "ct", "lower": 0.0, "upper": 1.0, "mean": 0.5}], 1)
    Traceback (most recent call last):
    ValueError: channel 0: a ct scheme needs finite lower, upper, mean and sd
    """
    if len(schemes) != channels:
        raise ValueError(f"{len(schemes)} normalisation scheme(s) for {channels} channel(s)")
    for c, scheme in enumerate(schemes):
        kind = scheme.get("type")
        if kind not in ("ct", *FIXED):
            raise ValueError(f"channel {c}: unknown normalisation scheme {kind!r}")
        stats = [scheme.get(k) for k in ("lower", "upper", "mean", "sd")]
        if kind == "ct" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                                    for v in stats):
            raise ValueError(f"channel {c}: a ct scheme needs finite lower, upper, mean and sd")


def check_values(image: np.ndarray, schemes: Sequence[dict[str, Any]], where: str) -> None:
    """Refuse, in one line naming ``where`` (a case, a file), a channel its scheme cannot map as declared:
    an ``rgb_to_0_1`` channel (8-bit RGB, divided by 255) with values outside 0-255, which nnU-Net refuses too
    and which would otherwise train on values beyond [0, 1] without a word.  Called on the raw volume,
    before resampling (whose cubic spline can overshoot 0-255 slightly).

    >>> check_values(np.array([[[[0.0, 300.0]]]]), [{"type": "rgb"}], "case x")
    Traceback (most recent call last):
    pgps_tune.errors.PgpsError: case x: channel 0 is declared rgb_to_0_1 (8-bit RGB, divided by 255) but holds ...
    """
    for c, scheme in enumerate(schemes):
        if scheme["type"] == "rgb":
            low, high = float(np.min(image[c])), float(np.max(image[c]))
            if low < 0 or high > 255:
                raise PgpsError(
                    f"{where}: channel {c} is declared rgb_to_0_1 (8-bit RGB, divided by 255) but holds values from "
                    f"{low:.6g} to {high:.6g}, outside 0-255; declare it as zscore or rescale_to_0_1 in dataset.json, "
                    "or fix the image"
                )


def normalise(image: np.ndarray, schemes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Apply one scheme per channel of ``image [C, X, Y, Z]``; returns float32.

    ``zscore`` uses the volume's own mean and sd, ``ct`` the stored dataset-wide ones
    after clipping; an sd of 0 (a constant channel) divides by 1e-8 instead.  ``none``,
    ``rescale`` and ``rgb``: see the module docstring.
    """
    if len(schemes) != image.shape[0]:
        raise ValueError(f"{len(schemes)} normalisation schemes for {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        ch = np.asarray(image[c], dtype=np.float32)
        if scheme["type"] == "ct":
            ch = np.clip(ch, scheme["lower"], scheme["upper"])
            out[c] = (ch - scheme["mean"]) / max(scheme["sd"], 1e-8)
        elif scheme["type"] == "zscore":
            out[c] = (ch - ch.mean(dtype=np.float64)) / max(float(ch.std(dtype=np.float64)), 1e-8)
        elif scheme["type"] == "none":
            out[c] = ch
        elif scheme["type"] == "rescale":  # the volume's range onto [0, 1]; a constant volume becomes 0
            low = float(ch.min())
            out[c] = (ch - low) / max(float(ch.max()) - low, 1e-8)
        elif scheme["type"] == "rgb":
            out[c] = ch / 255.0
        else:
            raise ValueError(f"unknown normalisation scheme {scheme['type']!r}")
    return out
