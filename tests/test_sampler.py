import numpy as np
import pytest

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


def test_crop_pads_where_the_patch_exceeds_the_volume():
    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    out = crop(vol, (-1, 0, -2), (4, 3, 8))
    assert out.shape == (4, 3, 8)
    assert np.array_equal(out[1:3, :, 2:6], vol)
    assert out.sum() == vol.sum()


def test_patch_larger_than_volume_is_padded_in_batches(ds):
    s = sch.constant((32, 32, 32), (3, 3, 3), 2, 1)  # volumes are 20x24x16
    img, seg, _ = _sampler(ds, s).batch(0)
    assert img.shape == (2, 1, 32, 32, 32)
    assert (seg > 0).any()


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
