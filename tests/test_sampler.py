import json

import numpy as np
import pytest
from conftest import blob_case, write_case

from pgps_tune import data
from pgps_tune import schedule as sch
from pgps_tune.sampler import ProgressiveSampler, crop, loader


@pytest.fixture
def ds(tiny_msd):
    return data.prepare(tiny_msd)


def _sampler(ds, s, ipe=3, **kw):
    return ProgressiveSampler(ds, list(range(len(ds))), s, ipe, seed=7, **kw)


def test_shapes_follow_the_schedule(ds):
    s = sch.paper((24, 24, 16), (3, 3, 3), 2, 8, "performance")  # 6 stages
    smp = _sampler(ds, s)
    for it in range(smp.total_iterations):
        img, seg, k = smp.batch(it)
        stage = s.stages[k]
        assert k == s.stage_index_at(it // 3)
        assert img.shape == (stage.batch_size, 1, *stage.patch_size) and img.dtype == np.float32
        assert seg.shape == (stage.batch_size, 1, *stage.patch_size) and seg.dtype == np.uint8


@pytest.mark.parametrize(
    "start,size",
    [
        ((-1, 0, -2), (4, 3, 8)),  # overruns both ends of axes 0 and 2
        ((1, -2, 2), (3, 4, 5)),  # axis 0 and 2 overrun the high end, axis 1 the low end
        ((0, 1, 1), (2, 2, 3)),  # wholly inside
        ((0, 0, -5), (2, 3, 3)),  # wholly before the start of axis 2
        ((0, 5, 0), (2, 2, 4)),  # wholly beyond the end of axis 1
    ],
)
def test_crop_places_the_volume_where_the_patch_overlaps_it(start, size):
    vol = np.arange(1, 2 * 2 * 3 * 4 + 1, dtype=np.float32).reshape(2, 2, 3, 4)  # 2 channels, all voxels > 0
    pad = 10
    padded = np.pad(vol, [(0, 0)] + [(pad, pad)] * 3)  # zeros around: the crop is a window of it
    expected = padded[(slice(None), *[slice(s + pad, s + pad + n) for s, n in zip(start, size)])]
    out = crop(vol, start, size)
    assert out.shape == (2, *size) and np.array_equal(out, expected)
    assert np.array_equal(crop(vol[0], start, size), expected[0])  # no channel axis


def test_patch_larger_than_volume_holds_the_whole_volume_at_its_offset(ds):
    s = sch.constant((32, 32, 32), (3, 3, 3), 2, 2)  # volumes are 20x24x16
    smp = _sampler(ds, s, fg_ratio=0.5)
    for it in range(smp.total_iterations):
        _, picks, _, _ = smp.plan_batch(it)
        img, seg, _ = smp.batch(it)
        assert img.shape == (2, 1, 32, 32, 32)
        for j in range(2):
            case = smp.cases[picks[j % len(picks)]]
            nz = np.argwhere(img[j, 0] != 0)  # z-scored voxels are non-zero, padding is zero
            lo, hi = nz.min(0), nz.max(0) + 1
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            assert tuple(hi - lo) == ds.shapes[case]
            assert np.array_equal(img[j, 0][box], ds.image(case)[0]) and np.array_equal(seg[j, 0][box], ds.label(case))
            assert seg[j].sum() == ds.label(case).sum()  # no label outside the box


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_foreground_share(ds, ratio):
    s = sch.constant((8, 8, 8), (3, 3, 3), 8, 20)
    smp = _sampler(ds, s, ipe=1, fg_ratio=ratio)
    centred = 0
    for it in range(20):
        _, _, is_fg, _ = smp.plan_batch(it)
        assert is_fg.sum() == round(ratio * 8)
        _, seg, _ = smp.batch(it)
        centred += int((seg[is_fg, 0, 4, 4, 4] > 0).sum())
    assert centred == round(ratio * 8) * 20  # every foreground crop is centred on a labelled voxel


def test_large_batches_load_few_volumes(ds):
    s = sch.paper((24, 24, 16), (3, 3, 3), 2, 6, "performance")
    smp = _sampler(ds, s, ipe=1)
    _, picks, is_fg, _ = smp.plan_batch(0)
    assert len(is_fg) == s.stages[0].batch_size > 2 and len(picks) == 2


def test_deterministic_and_independent_of_workers_and_resume(ds):
    s = sch.paper((24, 24, 16), (3, 3, 3), 2, 8, "performance")
    a, b = _sampler(ds, s), _sampler(ds, s)
    for it in (0, 5, 17, 23):
        assert all(np.array_equal(x, y) for x, y in zip(a.batch(it), b.batch(it)))
    serial = list(loader(a, 0, workers=0))
    parallel = list(loader(b, 0, workers=2))
    assert [x["iteration"] for x in parallel] == list(range(a.total_iterations))
    for x, y in zip(serial, parallel):
        assert x["stage"] == y["stage"] and x["image"].equal(y["image"]) and x["label"].equal(y["label"])
    resumed = list(loader(_sampler(ds, s), 10, workers=0))  # mid-stage restart
    for x, y in zip(serial[10:], resumed):
        assert x["iteration"] == y["iteration"] and x["image"].equal(y["image"])
    stages = [x["stage"] for x in serial]
    assert stages == sorted(stages) and stages[-1] == len(s.stages) - 1


def test_different_seeds_differ(ds):
    s = sch.constant((16, 16, 16), (3, 3, 3), 2, 1)
    a = ProgressiveSampler(ds, [0, 1, 2], s, 1, seed=1).batch(0)[0]
    b = ProgressiveSampler(ds, [0, 1, 2], s, 1, seed=2).batch(0)[0]
    assert not np.array_equal(a, b)


def test_cases_without_foreground_give_random_crops(tmp_path):
    root = tmp_path / "empty"
    training = []
    for i in range(3):
        image, label = blob_case((20, 24, 16), i)
        training.append(write_case(root, f"e_{i}", image, label * (i == 2)))  # cases 0 and 1: background only
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"}, "training": training}))
    ds = data.prepare(root)
    assert {k: len(v) for k, v in ds.fg(0).items()} == {1: 0, 2: 0} and not ds.label(0).any()
    s = sch.constant((8, 8, 8), (3, 3, 3), 4, 6)
    empty = ProgressiveSampler(ds, [0, 1], s, 1, seed=3, fg_ratio=1.0)  # every crop asks for foreground
    crops = set()
    for it in range(6):
        img, seg, _ = empty.batch(it)
        assert img.shape == (4, 1, 8, 8, 8) and np.isfinite(img).all() and not seg.any()
        crops.add(img.tobytes())
    assert len(crops) == 6  # random crops, not one fixed place
    mixed = ProgressiveSampler(ds, [0, 1, 2], s, 1, seed=3, fg_ratio=1.0, volumes_per_batch=4)
    labelled = 0
    for it in range(6):
        _, picks, _, _ = mixed.plan_batch(it)
        _, seg, _ = mixed.batch(it)
        for j in range(4):  # crops of the labelled case stay centred on its foreground
            case = mixed.cases[picks[j % len(picks)]]
            assert (seg[j, 0, 4, 4, 4] > 0) == (case == 2)
            labelled += case == 2
    assert 0 < labelled < 24


def test_random_sampling_draws_each_batch_from_seed_and_iteration(ds):
    s = sch.preset("random", (24, 24, 16), (3, 3, 3), 2, 8, "sqrt")  # 6 sizes, drawn per iteration
    a, b = _sampler(ds, s), _sampler(ds, s)
    stages = []
    for it in range(a.total_iterations):
        img, seg, k = a.batch(it)
        assert k == s.stage_index_of_iteration(it, 3, seed=7)
        assert img.shape == seg.shape == (s.stages[k].batch_size, 1, *s.stages[k].patch_size)
        stages.append(k)
    assert len(set(stages)) >= 4 and stages != sorted(stages)  # sizes mix, not a curriculum
    for it in (0, 9, 23):  # another sampler, iterations out of order: the same batches
        assert all(np.array_equal(x, y) for x, y in zip(a.batch(it), b.batch(it)))
    resumed = [x["stage"] for x in loader(_sampler(ds, s), 10, workers=0)]
    assert resumed == stages[10:]
    other_seed = ProgressiveSampler(ds, list(range(len(ds))), s, 3, seed=8)
    assert [other_seed.stage_index(i) for i in range(24)] != stages
