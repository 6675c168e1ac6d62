import json

import numpy as np
import pytest
from conftest import make_msd, write_case

from pgps_tune import data
from pgps_tune.errors import PgpsError


def test_msd_prepare_and_cache_reuse(tiny_msd):
    ds = data.prepare(tiny_msd)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.channels == 1
    img, seg = ds.image(0), ds.label(0)
    assert img.shape == (1, 20, 24, 16) and seg.shape == (20, 24, 16)
    assert abs(float(img.mean())) < 1e-4 and abs(float(img.std()) - 1) < 1e-3  # z-score
    fg = ds.fg(0)
    assert set(fg) == {1, 2} and all((seg[tuple(c.T)] == k).all() for k, c in fg.items())
    stamp = (ds.cache_dir / "prepared.json").stat().st_mtime_ns
    again = data.prepare(tiny_msd)
    assert again.cache_dir == ds.cache_dir
    assert (again.cache_dir / "prepared.json").stat().st_mtime_ns == stamp  # not redone


def test_changed_files_invalidate_the_cache(tiny_msd):
    first = data.prepare(tiny_msd).cache_dir
    image, label = np.ones((20, 24, 16)), np.zeros((20, 24, 16))
    label[5:10, 5:10, 5:10] = 1
    write_case(tiny_msd, "case_000", image, label)
    assert data.prepare(tiny_msd).cache_dir != first


def test_resampling_to_the_median_spacing(tmp_path):
    root = make_msd(tmp_path / "mixed", n=3, shape=(20, 24, 16),
                    spacings=[(1, 1, 2), (1, 1, 2), (1, 1, 1)])
    ds = data.prepare(root)
    assert ds.spacing == (1.0, 1.0, 2.0)
    assert ds.shapes[0] == (20, 24, 16) and ds.shapes[2] == (20, 24, 8)
    assert set(np.unique(ds.label(2)).tolist()) <= {0, 1, 2}


def test_nnunet_raw_layout(tmp_path):
    root = tmp_path / "Dataset001_Tiny"
    rng = np.random.default_rng(0)
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        seg = np.zeros((16, 16, 16), np.uint8)
        seg[4:9, 4:9, 4:9] = 1
        for c in range(2):
            nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 16)).astype(np.float32), np.eye(4)),
                     root / "imagesTr" / f"tiny_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), root / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    ds = data.prepare(root)
    assert len(ds) == 3 and ds.channels == 2 and ds.image(0).shape == (2, 16, 16, 16)
    assert ds.labels == {0: "background", 1: "organ"}


def test_synthetic_is_deterministic(tmp_path):
    a = data.synthetic_volumes(2, (24, 24, 24), 1.5, seed=3)
    b = data.synthetic_volumes(2, (24, 24, 24), 1.5, seed=3)
    c = data.synthetic_volumes(2, (24, 24, 24), 1.5, seed=4)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])
    assert set(np.unique(a[0][1]).tolist()) <= {0, 1, 2} and a[0][1].max() > 0


def test_split_is_seeded_and_splits_file(tiny_msd, tmp_path):
    ds = data.prepare(tiny_msd)
    tr, va = data.split(ds, 0.34, seed=1)
    assert (tr, va) == data.split(ds, 0.34, seed=1)
    assert sorted(tr + va) == list(range(6)) and len(va) == 2
    f = tmp_path / "splits.json"
    f.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_005"]}))
    assert data.split(ds, splits_file=f) == ([0, 1], [5])
    f.write_text(json.dumps({"train": ["nope"], "val": ["case_005"]}))
    with pytest.raises(PgpsError, match="unknown case"):
        data.split(ds, splits_file=f)


@pytest.mark.parametrize(
    "median,spacing,budget,final,pools",
    [
        ((35, 50, 36), (1, 1, 1), 128**3, (40, 56, 40), (3, 3, 3)),  # nnU-Net's Hippocampus plan
        ((48, 48, 48), (1, 1, 1), 128**3, (48, 48, 48), (3, 3, 3)),
        ((20, 320, 256), (5, 0.8, 0.8), 128**3, (20, 320, 256), (2, 5, 5)),
    ],
)
def test_planner(median, spacing, budget, final, pools):
    plan = data.plan_patch(median, spacing, budget)
    assert plan.final_patch == final and plan.pools == pools
    assert all(f % 2**p == 0 for f, p in zip(plan.final_patch, plan.pools))


def test_planner_shrinks_to_the_budget_along_the_physically_largest_axis():
    plan = data.plan_patch((20, 320, 256), (5, 0.8, 0.8), voxel_budget=64**3)
    assert plan.final_patch[0] == 20  # 100 mm: the short axis in physical size is kept
    assert plan.final_patch[1] < 320 and plan.final_patch[2] < 256
    rounding = np.prod([1 + 2**p / f for f, p in zip(plan.final_patch, plan.pools)])
    assert np.prod(plan.final_patch) <= 64**3 * rounding
