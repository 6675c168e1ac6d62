"""Augmentation: deterministic per (seed, iteration), batched, no empty borders, labels intact."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pgps_tune import augment as aug
from pgps_tune import data
from pgps_tune import schedule as sch
from pgps_tune.config import AUGMENT_PRESETS, TrainConfig
from pgps_tune.errors import PgpsError
from pgps_tune.sampler import ProgressiveSampler, crop, crops, loader
from pgps_tune.trainer import Trainer

DEFAULT = AUGMENT_PRESETS["default"]
# every transform on every sample, at the far end of the spatial ranges
ALWAYS = replace(
    AUGMENT_PRESETS["elastic"], p_rotation=1, p_scale=1, scale=(1.4, 1.4), p_elastic=1, p_noise=1, p_blur=1,
    blur_p_channel=1, p_brightness=1, p_contrast=1, p_lowres=1, lowres_p_channel=1, p_gamma_inverted=1, p_gamma=1,
)


@pytest.fixture
def ds(tiny_msd):
    return data.prepare(tiny_msd)


def _params(preset, batch, patch, channels=1, seed=0, thin=None):
    return aug.draw(np.random.default_rng(seed), preset, batch, channels, patch, thin)


def _coordinates(region):
    """A 3-channel image holding each voxel's own index per axis (trilinear reads it exactly)."""
    grids = torch.meshgrid(*[torch.arange(r, dtype=torch.float32) for r in region], indexing="ij")
    return torch.stack(grids)[None]


def test_a_batch_is_a_pure_function_of_seed_and_iteration_whatever_the_workers(ds):
    s = sch.paper((24, 24, 16), (3, 3, 3), 2, 8, "performance")
    a, b = (ProgressiveSampler(ds, list(range(len(ds))), s, 3, seed=7, augment="default") for _ in range(2))
    for it in (0, 11, 23):
        assert all(np.array_equal(x, y) for x, y in zip(a.batch(it), b.batch(it)))
    assert not np.array_equal(a.batch(0)[0], a.batch(1)[0][: len(a.batch(0)[0])])
    serial, parallel = list(loader(a, 0, workers=0)), list(loader(b, 0, workers=2))
    assert [x["iteration"] for x in parallel] == list(range(a.total_iterations))
    for x, y in zip(serial, parallel):
        assert x["image"].equal(y["image"]) and x["label"].equal(y["label"])
    resumed = list(loader(ProgressiveSampler(ds, list(range(len(ds))), s, 3, seed=7, augment="default"), 10))
    assert all(x["image"].equal(y["image"]) for x, y in zip(serial[10:], resumed))
    # the device hook (CUDA's path, here on the CPU) finishes a deferred batch to the same tensors
    deferred = next(iter(loader(a, 4, defer_augment=True)))
    assert deferred["image"].shape[2:] != serial[4]["image"].shape[2:]  # the loader shipped the larger region
    image, label = aug.to_device(deferred, torch.device("cpu"))
    assert image.equal(serial[4]["image"]) and label.equal(serial[4]["label"].long())


def test_augmentation_keeps_the_crop_centres_and_none_gives_plain_crops(ds):
    s = sch.constant((16, 16, 8), (3, 3, 3), 4, 2)
    plain = ProgressiveSampler(ds, list(range(len(ds))), s, 1, seed=3, augment="none")
    augmented = ProgressiveSampler(ds, list(range(len(ds))), s, 1, seed=3, augment="default")
    for it in range(2):
        cut = plain.cut(it)
        assert cut["augment"] is None and np.array_equal(cut["image"], plain.batch(it)[0])
        region = augmented.cut(it)["image"]
        m = [(r - p) // 2 for r, p in zip(region.shape[2:], (16, 16, 8))]
        assert np.array_equal(region[:, :, m[0]:m[0] + 16, m[1]:m[1] + 16, m[2]:m[2] + 8], cut["image"])


@pytest.mark.parametrize("patch, thin", [((8, 12, 6), None), ((4, 24, 20), 0)])
def test_no_empty_border_inside_the_patch(patch, thin):
    params = _params(ALWAYS, 16, patch, thin=thin)
    region = aug.region_size(params, patch)
    ones = torch.ones(16, 1, *region)
    image, label = aug.spatial(ones, torch.ones_like(ones, dtype=torch.uint8), aug.as_tensors(params))
    assert image.shape[2:] == patch
    assert torch.allclose(image, torch.ones_like(image), atol=1e-5) and bool((label == 1).all())
    # and the region is tight (without elastic deformation, whose bound is loose by design): four voxels
    # less on its widest axis reads padding
    params = _params(replace(ALWAYS, p_elastic=0), 16, patch, thin=thin)
    region = aug.region_size(params, patch)
    axis = int(np.argmax(np.array(region) - np.array(patch)))
    smaller = list(region)
    smaller[axis] -= 4
    image, _ = aug.spatial(torch.ones(16, 1, *smaller), torch.ones(16, 1, *smaller, dtype=torch.uint8),
                           aug.as_tensors(params))
    assert float(image.min()) < 0.5


def test_anisotropic_patches_rotate_scale_and_deform_in_plane_only():
    patch = (4, 24, 20)
    assert aug.thin_axis(patch, DEFAULT) == 0 and aug.thin_axis((16, 24, 20), DEFAULT) is None
    params = _params(ALWAYS, 32, patch, thin=0)
    affine = np.abs(params["affine"])
    assert np.allclose(affine[:, 0, 0], 1) and np.allclose(affine[:, 0, 1:], 0) and np.allclose(affine[:, 1:, 0], 0)
    assert np.all(params["elastic"][:, 0] == 0) and np.all(params["lowres_zoom"][..., 0] == 1)
    assert aug.region_size(params, patch)[0] == patch[0]


def test_image_and_label_share_one_transform_and_labels_stay_integers():
    patch, n = (10, 12, 8), 12
    params = _params(ALWAYS, n, patch, seed=5)
    region = aug.region_size(params, patch)
    coords = _coordinates(region).expand(n, -1, -1, -1, -1)
    label = ((coords[:, 0] % 4) + 4 * (coords[:, 1] % 4) + 16 * (coords[:, 2] % 4))[:, None].to(torch.uint8)
    where, moved = aug.spatial(coords.contiguous(), label, aug.as_tensors(params))
    assert moved.dtype == torch.uint8 and set(moved.unique().tolist()) <= set(label.unique().tolist())
    r = where.round()  # the region voxel the image read at each patch voxel: the label must come from there
    expected = (r[:, 0] % 4) + 4 * (r[:, 1] % 4) + 16 * (r[:, 2] % 4)
    assert (moved[:, 0] == expected).float().mean() > 0.999  # ties at exactly half a voxel may round either way


def test_mirroring_and_quarter_turns_move_whole_voxels():
    patch = (4, 6, 8)
    none = _params(AUGMENT_PRESETS["none"], 2, patch)
    quarter = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)  # axes 0 and 1 swap
    params = {**none, "affine": np.stack([np.diag([-1, 1, 1]).astype(np.float32), quarter])}
    region = aug.region_size(params, patch)
    assert region == (6, 6, 8)
    x = torch.randn(2, 1, *region)
    label = torch.randint(0, 3, (2, 1, *region), dtype=torch.uint8)
    image, moved = aug.apply(x, label, aug.as_tensors(params))
    flipped = label[0, :, 1:5].flip(1)
    assert moved[0].equal(flipped) and torch.allclose(image[0], x[0, :, 1:5].flip(1), atol=1e-5)
    turned = label[1, 0, :, 1:5].flip(0).transpose(0, 1)  # out[i, j, k] = region[5 - j, i + 1, k]
    assert moved[1, 0].equal(turned)


def test_intensity_transforms_follow_their_parameters():
    patch, n = (8, 8, 8), 6
    x = torch.randn(n, 1, *patch) * 2 + 1
    base = {k: torch.as_tensor(v) if k not in ("seed", "patch") else v
            for k, v in _params(AUGMENT_PRESETS["none"], n, patch).items()}
    assert aug.intensity(x, base).equal(x)  # every parameter at its identity: nothing changes
    bright = {**base, "brightness": torch.full((n, 1), 1.2)}
    assert torch.allclose(aug.intensity(x, bright), x * 1.2)
    contrast = aug.intensity(x, {**base, "contrast": torch.full((n, 1), 0.8)})
    assert torch.allclose(contrast.mean((2, 3, 4)), x.mean((2, 3, 4)), atol=1e-4)
    assert bool((contrast.amin((2, 3, 4)) >= x.amin((2, 3, 4)) - 1e-6).all())
    gamma = aug.intensity(x, {**base, "gamma": torch.full((n, 1), 1.4)})
    assert torch.allclose(gamma.mean((2, 3, 4)), x.mean((2, 3, 4)), atol=1e-4)
    assert torch.allclose(gamma.std((2, 3, 4), correction=0), x.std((2, 3, 4), correction=0), atol=1e-3)
    assert not torch.allclose(gamma, x, atol=1e-2)
    flat = torch.full((n, 1, *patch), 3.0)
    blurred = aug.intensity(flat, {**base, "blur_sigma": torch.full((n, 1, 3), 0.8)})
    assert torch.allclose(blurred, flat)  # a constant stays constant (replicated borders)
    ramp = _coordinates(patch)[:, :1].expand(n, 1, *patch).contiguous()
    coarse = aug.intensity(ramp, {**base, "lowres_zoom": torch.full((n, 1, 3), 0.5)})
    assert not torch.allclose(coarse, ramp) and torch.allclose(coarse.mean(), ramp.mean(), atol=0.5)
    noisy = aug.intensity(x, {**base, "noise_std": torch.tensor([0.0, 0.5, 0, 0, 0, 0])})
    assert noisy[0].equal(x[0]) and 0.3 < float((noisy[1] - x[1]).std()) < 0.7


def test_the_augmentation_is_recorded_and_part_of_the_checkpoint_identity(ds, tmp_path):
    s = sch.parametric((16, 16, 16), (2, 2, 2), 2, 3, stages=3, start_fraction=0.25)
    cfg = TrainConfig(iterations_per_epoch=1, val_every=3, threads=1, filters=(4, 8, 16), augment="light")
    m = Trainer(ds, [0, 1, 2, 3], [4], s, cfg, tmp_path / "run").fit()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["completed"] and saved["config"]["augment"] == "light"
    assert saved["augmentation"]["rotation_deg"] == AUGMENT_PRESETS["light"].rotation_deg
    with pytest.raises(PgpsError, match=r"was made with augment light \(now none\)"):
        Trainer(ds, [0, 1, 2, 3], [4], s, cfg.replace(augment="none"), tmp_path / "run").fit(resume=True)
    with pytest.raises(PgpsError, match="unknown augmentation 'heavy'; use one of default"):
        Trainer(ds, [0, 1, 2, 3], [4], s, cfg.replace(augment="heavy"), tmp_path / "other")


@pytest.mark.parametrize("shape, n, spread", [((2, 12, 14, 10), 40, 3), ((1, 60, 60, 60), 2, 60)])
def test_batched_crops_equal_crops_one_by_one(shape, n, spread):
    """One gather over the crops' box (many crops close together) or one by one (few, far apart)."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape).astype(np.float32)
    size = (5, 6, 4)
    starts = rng.integers(-3, spread, (n, 3))
    assert np.array_equal(crops(volume, starts, size), np.stack([crop(volume, st, size) for st in starts]))
