"""Data augmentation as batched tensor operations: the cost follows voxels, not samples.

Performance mode's first stages carry hundreds of tiny patches per batch, so nothing here
loops over samples: every transform is one tensor operation over the whole batch (or over
the rows it applies to), with per-sample parameters as tensors.

How it fits the engine (the batch of iteration ``i`` stays a pure function of ``(seed, i)``):

1. :func:`draw` makes every random choice of a batch (which transforms, angles, scales,
   sigmas, ...) with numpy, from a generator derived from ``(seed, i)`` alone: a stream of
   its own, so turning augmentation on or off leaves the crop centres unchanged.
2. The sampler cuts, around each patch centre, the region :func:`region_size` asks for: the
   smallest box that every drawn rotation, scaling and deformation of the patch stays inside,
   so no empty border ever lands inside the patch (padding appears only where the patch
   itself leaves the volume, as without augmentation).
3. :func:`apply` turns regions + parameters into patches: one sampling grid for the whole
   batch (the per-sample affine maps, plus the elastic field if any), one ``grid_sample``
   for the images (trilinear) and one for the labels (nearest) on that grid, then the
   intensity transforms in nnU-Net's order, vectorised over samples.

Where it runs: on the CPU the loader applies it (in its worker processes when there are
any, so it overlaps training); on CUDA the loader ships the region and the parameters and
the trainer's hook :func:`to_device` applies it on the GPU, where one batched resampling
is cheap and the CPU does nothing but cut.  Noise is drawn from a ``torch.Generator``
seeded by the batch, so it never touches the global RNG that checkpoints restore.

The presets themselves are plain data in :mod:`pgps_tune.config` (``AUGMENT_PRESETS``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pgps_tune.config import AugmentPreset

Params = dict[str, Any]  # numpy arrays from draw(); torch tensors after as_tensors()


def thin_axis(final_patch: Sequence[int], preset: AugmentPreset) -> int | None:
    """The out-of-plane axis of a strongly anisotropic final patch, else None."""
    if max(final_patch) <= preset.anisotropy_threshold * min(final_patch):
        return None
    return int(np.argmin(final_patch))


def _rotations(angles: np.ndarray) -> np.ndarray:
    """Rotation matrices [B, 3, 3] about axes 0, 1 and 2 in turn (radians [B, 3])."""
    c, s = np.cos(angles), np.sin(angles)
    one, zero = np.ones(len(angles)), np.zeros(len(angles))
    rx = np.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1).reshape(-1, 3, 3)
    ry = np.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1).reshape(-1, 3, 3)
    rz = np.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rx @ ry @ rz


def _either_side_of_one(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """nnU-Net's draw for multipliers: half below 1, half above, when the range straddles 1."""
    if not low < 1 < high:
        return rng.uniform(low, high, n)
    below = rng.random(n) < 0.5
    return np.where(below, rng.uniform(low, 1.0, n), rng.uniform(1.0, high, n))


def draw(
    rng: np.random.Generator,
    preset: AugmentPreset,
    batch: int,
    channels: int,
    patch: Sequence[int],
    thin: int | None = None,
) -> Params:
    """Every random choice of one batch, vectorised over samples (numpy arrays).

    ``affine`` [B,3,3] maps patch offsets to region offsets (rotation x scale x mirror);
    identity values (1, or 0 for sigmas and noise) mark a transform a sample skips.
    """
    b, c = batch, channels
    planar = np.ones(3, dtype=bool) if thin is None else np.arange(3) != thin

    if thin is None:
        limit = np.deg2rad(preset.rotation_deg)
        angles = rng.uniform(-limit, limit, (b, 3))
    else:
        limit = np.deg2rad(preset.rotation_deg_inplane)
        angles = np.where(np.arange(3) == thin, rng.uniform(-limit, limit, (b, 1)), 0.0)
    angles *= (rng.random(b) < preset.p_rotation)[:, None]
    scale = np.where(rng.random(b) < preset.p_scale, rng.uniform(*preset.scale, b), 1.0)
    scales = np.where(planar, scale[:, None], 1.0)
    mirror = np.where(rng.random((b, 3)) < preset.p_mirror, -1.0, 1.0)
    affine = _rotations(angles) * (scales * mirror)[:, None, :]  # R @ diag(scale * mirror)

    params: Params = {"affine": affine.astype(np.float32)}
    if preset.p_elastic > 0:
        grid = [max(2, math.ceil(p / preset.elastic_spacing) + 1) for p in patch]
        magnitude = rng.uniform(0, preset.elastic_magnitude, b) * (rng.random(b) < preset.p_elastic)
        field = rng.uniform(-1, 1, (b, 3, *grid)) * magnitude[:, None, None, None, None]
        field *= planar[None, :, None, None, None]
        params["elastic"] = field.astype(np.float32)

    def per_channel(p_sample: float, p_channel: float = 1.0) -> np.ndarray:
        return (rng.random(b) < p_sample)[:, None] & (rng.random((b, c)) < p_channel)

    noise_var = rng.uniform(*preset.noise_variance, b)
    params["noise_std"] = np.where(rng.random(b) < preset.p_noise, np.sqrt(noise_var), 0.0).astype(np.float32)
    params["seed"] = int(rng.integers(0, 2**62))
    sigma = rng.uniform(*preset.blur_sigma, (b, c, 3))
    params["blur_sigma"] = (sigma * per_channel(preset.p_blur, preset.blur_p_channel)[..., None]).astype(np.float32)
    params["brightness"] = np.where(
        per_channel(preset.p_brightness), rng.uniform(*preset.brightness, (b, c)), 1.0).astype(np.float32)
    params["contrast"] = np.where(
        per_channel(preset.p_contrast), _either_side_of_one(rng, *preset.contrast, b * c).reshape(b, c), 1.0
    ).astype(np.float32)
    lowres = per_channel(preset.p_lowres, preset.lowres_p_channel)
    zoom = np.where(lowres, rng.uniform(*preset.lowres_zoom, (b, c)), 1.0)
    params["lowres_zoom"] = np.where(planar, zoom[..., None], 1.0).astype(np.float32)
    for key, p in (("gamma_inverted", preset.p_gamma_inverted), ("gamma", preset.p_gamma)):
        g = _either_side_of_one(rng, *preset.gamma, b * c).reshape(b, c)
        params[key] = np.where(per_channel(p), g, 1.0).astype(np.float32)
    params["patch"] = tuple(int(p) for p in patch)
    return params


def region_size(params: Params, patch: Sequence[int]) -> tuple[int, int, int]:
    """The smallest region (per axis) that every sample's transformed patch stays inside.

    Output voxel offset ``o`` (from the patch centre) reads the region at ``A o + d(o)``, so
    axis ``i`` reaches ``sum_j |A_ij| (P_j - 1) / 2 + max|d_i|`` voxels from the centre
    (``max|d_i|`` is bounded by the largest control displacement, so a batch that deforms
    gets a region up to twice that larger than strictly needed).  The region keeps the
    patch's parity per axis, so that an identity transform reads whole voxels (a sample
    that skips every spatial transform is its crop, up to float rounding, not blurred).
    """
    affine = np.asarray(params["affine"], dtype=np.float64)
    reach = np.abs(affine) @ (np.asarray(patch, dtype=np.float64) - 1)  # [B, 3]: full extent - 1
    if "elastic" in params:
        reach = reach + 2 * np.abs(np.asarray(params["elastic"])).reshape(*reach.shape, -1).max(-1)
    need = 1 + reach.max(0)
    size = [max(1, math.ceil(n - 1e-6)) for n in need]
    return tuple(s + (s - p) % 2 for s, p in zip(size, patch))  # type: ignore[return-value]


def as_tensors(params: Params, device: torch.device | str = "cpu") -> Params:
    """The same parameters as tensors on ``device`` (``seed`` and ``patch`` stay Python values)."""
    return {k: v if k in ("seed", "patch") else torch.as_tensor(v).to(device, non_blocking=True)
            for k, v in params.items()}


# -- spatial: one resampling of the whole batch --------------------------------------------


def _grid(params: Params, region: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """grid_sample's sampling grid [B, *patch, 3] (normalised, align_corners=True)."""
    affine = params["affine"]
    dev = affine.device
    out_half = torch.tensor([max(p - 1, 0) for p in patch], dtype=torch.float32, device=dev)
    in_half = torch.tensor([max(r - 1, 1) for r in region], dtype=torch.float32, device=dev)
    theta = affine * out_half[None, None, :] / in_half[None, :, None]  # normalised patch -> region
    theta = theta.flip(1)  # grid_sample orders coordinates (W, H, D) = axes (2, 1, 0)
    # What affine_grid computes, as a sum of one outer product per axis: affine_grid's batched
    # matmul costs more on the CPU than the resampling itself when a batch holds 350 tiny patches.
    steps = [torch.linspace(-1, 1, p, device=dev) if p > 1 else torch.zeros(1, device=dev) for p in patch]
    parts = [theta[:, None, :, j] * steps[j][None, :, None] for j in range(3)]  # [B, P_j, 3]
    grid = parts[0][:, :, None, None] + parts[1][:, None, :, None] + parts[2][:, None, None, :]
    if "elastic" in params:
        disp = F.interpolate(params["elastic"], size=tuple(patch), mode="trilinear", align_corners=True)
        disp = disp * (2 / in_half)[None, :, None, None, None]
        grid = grid + torch.flip(disp.permute(0, 2, 3, 4, 1), (-1,))
    return grid


def spatial(image: torch.Tensor, label: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample regions [B,C,*region] to patches: image trilinear, labels nearest, same grid."""
    grid = _grid(params, image.shape[2:], params["patch"])
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    label = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return image, label.to(torch.uint8)


# -- intensity: vectorised over the rows (sample, channel) a transform applies to -----------


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of rows x [n, *patch], one sigma per row and axis [n, 3].

    A weighted sum of shifted views rather than a grouped convolution: the convolution's
    result depends on the number of threads, and a batch must not (loader workers use one).
    """
    n = x.shape[0]
    for axis in range(3):
        radius = max(1, math.ceil(3 * float(sigma[:, axis].max())))
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        w = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, axis, None] ** 2))
        w = w / w.sum(1, keepdim=True)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        padded = F.pad(x[:, None], pad, mode="replicate")[:, 0]
        size = x.shape[axis + 1]
        x = sum(w[:, t].view(n, 1, 1, 1) * padded.narrow(axis + 1, t, size) for t in range(2 * radius + 1))
    return x


def _low_resolution(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Rows x [n, *patch] sampled down (nearest) by ``zoom`` [n, 3] per row, then up (linear).

    Each row has its own coarse grid; all rows are handled at once with index tables padded
    to the patch size (a coarse grid never has more points than the patch).
    """
    n, patch = x.shape[0], x.shape[1:]
    for axis, size in enumerate(patch):
        coarse = (zoom[:, axis] * size).round().clamp(min=1)  # [n]
        pos = torch.arange(size, device=x.device, dtype=x.dtype)[None]  # [1, size]
        down = ((pos + 0.5) * size / coarse[:, None]).floor().clamp(max=size - 1)  # nearest-exact
        down = torch.where(pos < coarse[:, None], down, down.gather(1, (coarse[:, None] - 1).long()))
        up = ((pos + 0.5) * coarse[:, None] / size - 0.5).clamp(min=0)
        lo = up.floor().clamp(max=coarse[:, None] - 1)
        hi = (lo + 1).clamp(max=coarse[:, None] - 1)
        frac = (up - lo).clamp(max=1)
        shape = [n, *[size if a == axis else 1 for a in range(3)]]
        small = _take(x, axis, down.view(shape))  # low-resolution values at the first `coarse` positions
        x = torch.lerp(_take(small, axis, lo.view(shape)), _take(small, axis, hi.view(shape)), frac.view(shape))
    return x


def _take(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """x [n, *patch] read along spatial ``axis`` at per-row positions ``index`` (broadcast to x)."""
    return x.gather(axis + 1, index.long().expand(x.shape))


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of each row of x [n, *patch], as [n, 1, 1, 1], whatever the number of threads.

    torch splits a reduction to one value across threads, and the float sum then depends on
    the split (loader workers run one thread, the trainer several); summing one axis at a
    time keeps every partial sum within one thread.
    """
    return (x.sum(-1).sum(-1).sum(-1) / x[0].numel()).view(-1, 1, 1, 1)


def _range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row minimum and maximum of x [n, *patch], as [n, 1, 1, 1] each."""
    return x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma on rows [n, *patch]: on the [min, max]-scaled values, keeping mean and sd."""
    if invert:
        x = -x
    mean = _mean(x)
    sd = _mean((x - mean) ** 2).sqrt()
    lo, hi = _range(x)
    span = hi - lo + 1e-7
    x = ((x - lo) / span).pow(gamma.view(-1, 1, 1, 1)) * span + lo
    new_mean = _mean(x)
    x = (x - new_mean) / (_mean((x - new_mean) ** 2).sqrt() + 1e-8) * sd + mean
    return -x if invert else x


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale rows [n, *patch] about their mean, clipped to their original range."""
    mean = _mean(x)
    lo, hi = _range(x)
    return torch.minimum(torch.maximum((x - mean) * factor.view(-1, 1, 1, 1) + mean, lo), hi)


def _on_rows(x: torch.Tensor, active: torch.Tensor, fn, *args: torch.Tensor) -> None:
    """Apply ``fn`` to the rows of x [rows, *patch] where ``active`` [B, C] holds, in place."""
    rows = active.reshape(-1).nonzero().squeeze(1)
    if len(rows):
        x[rows] = fn(x[rows], *(a.reshape(x.shape[0], *a.shape[2:])[rows] for a in args))


def intensity(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma (nnU-Net's order)."""
    return _intensity_(image.clone(), params)


def _intensity_(image: torch.Tensor, params: Params) -> torch.Tensor:
    """:func:`intensity`, in place."""
    b, c = image.shape[:2]
    x = image.view(b * c, *image.shape[2:])  # rows: one (sample, channel) each
    gen = torch.Generator(device=x.device).manual_seed(params["seed"])

    def noise(rows: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return rows + torch.randn(rows.shape, generator=gen, device=x.device, dtype=x.dtype) * std.view(-1, 1, 1, 1)

    std = params["noise_std"].repeat_interleave(c).view(b, c)  # one draw per sample, every channel
    _on_rows(x, std > 0, noise, std)
    sigma = params["blur_sigma"]
    _on_rows(x, sigma.amax(-1) > 0, _gaussian_blur, sigma)
    x *= params["brightness"].reshape(-1, 1, 1, 1)
    _on_rows(x, params["contrast"] != 1, _contrast, params["contrast"])
    zoom = params["lowres_zoom"]
    _on_rows(x, (zoom < 1).any(-1), _low_resolution, zoom)
    _on_rows(x, params["gamma_inverted"] != 1, lambda v, g: _gamma(v, g, True), params["gamma_inverted"])
    _on_rows(x, params["gamma"] != 1, lambda v, g: _gamma(v, g, False), params["gamma"])
    return image


def apply(image: torch.Tensor, label: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Regions [B,C,*region] (float) and [B,1,*region] (uint8) -> augmented patches."""
    image, label = spatial(image, label, params)
    return _intensity_(image, params), label


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's hook: a loader batch as (image, long label) on ``device``.

    Augments there when the loader left that to the device (CUDA); a CPU loader has
    already applied it, and then this only moves the tensors.
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    if "augment" in batch:
        image, label = apply(image, label, as_tensors(batch["augment"], device))
    return image, label.long()
