import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_case, make_msd, write_case

from pgps_tune import data
from pgps_tune.errors import PgpsError, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _count_reads(monkeypatch) -> list[str]:
    """Record the case id of every raw case read (a read means preprocessing ran)."""
    calls: list[str] = []
    real = data._read_case

    def counting(case, *args):
        calls.append(case.case_id)
        return real(case, *args)

    monkeypatch.setattr(data, "_read_case", counting)
    return calls


def _file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_msd_prepare_and_cache_reuse(tiny_msd, monkeypatch):
    reads = _count_reads(monkeypatch)
    ds = data.prepare(tiny_msd)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.channels == 1
    img, seg = ds.image(0), ds.label(0)
    assert img.shape == (1, 20, 24, 16) and seg.shape == (20, 24, 16)
    assert abs(float(img.mean())) < 1e-4 and abs(float(img.std()) - 1) < 1e-3  # z-score
    fg = ds.fg(0)
    assert set(fg) == {1, 2} and all((seg[tuple(c.T)] == k).all() for k, c in fg.items())
    assert sorted(reads) == [f"case_{i:03d}" for i in range(6)]
    stamps = _file_stamps(ds.cache_dir)
    again = data.prepare(tiny_msd)
    assert again.cache_dir == ds.cache_dir
    assert len(reads) == 6  # no case was read again
    assert _file_stamps(again.cache_dir) == stamps  # and no file rewritten or replaced


def _peak_preparing(root: Path, cache: Path, workers: int) -> tuple[data.PreparedDataset, int]:
    """The prepared dataset and the peak of memory allocated (NumPy's buffers included) while preparing it."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        ds = data.prepare(root, cache_root=cache, workers=workers)
        return ds, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_preparation_holds_a_few_cases_in_memory_not_the_whole_dataset(tmp_path):
    """A dataset larger than the machine's memory is prepared like a small one: the memory it takes does not
    grow with the number of cases (before, every case was held at once: 52 cases' worth for these 16, 3.3 per
    case); the files do not depend on the number of workers."""
    shape, spacings = (40, 40, 40), [(1.0, 1.0, 1.0), (1.0, 1.0, 1.25)]
    data.prepare(make_msd(tmp_path / "warm", n=2, shape=(8, 8, 8), spacings=spacings), cache_root=tmp_path / "w")
    few, few_peak = _peak_preparing(make_msd(tmp_path / "few", n=4, shape=shape, spacings=spacings * 2),
                                    tmp_path / "c4", workers=1)
    many, peak = _peak_preparing(make_msd(tmp_path / "many", n=16, shape=shape, spacings=spacings * 8),
                                 tmp_path / "c16", workers=1)
    case_bytes = 4 * int(np.prod(shape))  # one case in float32
    assert len(many) == 16 and {s[2] for s in many.shapes} == {36, 44}  # every case resampled (median spacing)
    assert peak < 1.25 * few_peak and peak < 20 * case_bytes, (peak / case_bytes, few_peak / case_bytes)
    other = data.prepare(tmp_path / "many", cache_root=tmp_path / "three", workers=3).cache_dir
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in many.cache_dir.iterdir())
    assert all((other / p.name).read_bytes() == p.read_bytes() for p in many.cache_dir.iterdir())


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


def _ramp(shape, axis: int) -> np.ndarray:
    """A volume that increases along ``axis`` only: its axis survives z-scoring, so it tells channels apart."""
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")[axis]


def _varies_along(vol: np.ndarray) -> list[int]:
    return [a for a in range(3) if not np.allclose(np.diff(vol, axis=a), 0, atol=1e-5)]


def test_nnunet_raw_layout(tmp_path):
    root = tmp_path / "Dataset001_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        seg = np.zeros((16, 16, 16), np.uint8)
        seg[4:9, 4:9, 4:9] = 1
        for c in range(2):  # channel c rises along axis 2 - c: the order is visible after preprocessing
            nib.save(nib.Nifti1Image(_ramp((16, 16, 16), 2 - c) * (i + 1), np.eye(4)),
                     root / "imagesTr" / f"tiny_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), root / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    ds = data.prepare(root)
    assert len(ds) == 3 and ds.channels == 2 and ds.image(0).shape == (2, 16, 16, 16)
    assert ds.labels == {0: "background", 1: "organ"}
    assert [_varies_along(ds.image(0)[c]) for c in range(2)] == [[2], [1]]
    # nnU-Net v2's 'dataset' key lists the cases (a subset here): those are the cases, not labelsTr's files
    listed = {f"c{i}": {"images": [f"imagesTr/tiny_{i:03d}_{c:04d}.nii.gz" for c in range(2)],
                        "label": f"labelsTr/tiny_{i:03d}.nii.gz"} for i in (0, 2)}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
        "file_ending": ".nii.gz", "dataset": listed}))
    listed_ds = data.prepare(root)
    assert listed_ds.case_ids == ["c0", "c2"] and np.array_equal(listed_ds.image(1), ds.image(2))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1},
        "dataset": {"c0": {**listed["c0"], "images": listed["c0"]["images"][:1]}}}))
    with pytest.raises(PgpsError, match="lists 1 image file.* names 2 channel"):
        data.discover(root)
    # nnU-Net v1: an MSD dataset.json whose listed images are on disk as one file per channel
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "organ"}, "numTraining": 3,
        "training": [{"image": f"./imagesTr/tiny_{i:03d}.nii.gz", "label": f"./labelsTr/tiny_{i:03d}.nii.gz"}
                     for i in range(3)]}))
    v1 = data.prepare(root)
    assert v1.case_ids == ds.case_ids and all(np.array_equal(v1.image(i), ds.image(i)) for i in range(3))


def test_msd_4d_images_are_channels_last_in_order(tmp_path):
    shape = (10, 12, 8)
    root = tmp_path / "multi"
    label = np.zeros(shape)
    label[2:5, 3:6, 2:4] = 1
    image = np.stack([_ramp(shape, a) for a in (1, 2, 0)], axis=-1)  # channel 0 rises along y, 1 along z, 2 along x
    training = [write_case(root, f"m_{i}", image * (i + 1), label) for i in range(2)]
    dataset = {"labels": {"0": "background", "1": "organ"}, "training": training,
               "modality": {"0": "FLAIR", "1": "T1", "2": "T2"}}
    (root / "dataset.json").write_text(json.dumps(dataset))
    ds = data.prepare(root)
    assert ds.channels == 3 and ds.image(1).shape == (3, *shape)
    assert [_varies_along(ds.image(1)[c]) for c in range(3)] == [[1], [2], [0]]
    assert np.array_equal(ds.label(1), label)
    (root / "dataset.json").write_text(json.dumps({**dataset, "modality": {"0": "FLAIR", "1": "T1"}}))
    with pytest.raises(PgpsError, match=re.escape("has 3 image channels (m_0.nii.gz is 10x12x8x3) but dataset.json "
                                                  "names 2")):
        data.prepare(root)  # the same files with another channel list are not the cached dataset


@pytest.mark.parametrize("channels", [1, 2])
def test_flipped_and_permuted_affines_are_reoriented_and_stay_aligned(tmp_path, channels):
    """The stored image runs (z reversed, x, y); the label is stored in canonical order."""
    rng = np.random.default_rng(0)
    canonical = rng.normal(size=(channels, 6, 7, 8)).astype(np.float32)  # (C, x, y, z), spacing 1, 2, 3 mm
    label = np.zeros((6, 7, 8), np.uint8)
    label[1:3, 2:6, 5:8] = 1
    stored = np.moveaxis(np.transpose(canonical, (0, 3, 1, 2))[:, ::-1], 0, -1)  # voxel (i, j, k) = (z', x, y)
    affine = np.array([[0, 1, 0, 0], [0, 0, 2, 0], [-3, 0, 0, 7 * 3], [0, 0, 0, 1]], dtype=float)
    root = tmp_path / "oblique"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(stored[..., 0] if channels == 1 else stored, affine), root / "imagesTr" / "c.nii.gz")
    nib.save(nib.Nifti1Image(label, np.diag([1.0, 2.0, 3.0, 1.0])), root / "labelsTr" / "c.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "organ"}, "modality": {str(c): f"m{c}" for c in range(channels)},
        "training": [{"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}]}))
    ds = data.prepare(root)
    assert ds.spacing == (1.0, 2.0, 3.0) and ds.shapes == [(6, 7, 8)]
    assert np.array_equal(ds.label(0), label)
    image = ds.image(0)
    for c in range(channels):  # the same voxels in the same places (up to the intensity normalisation)
        assert np.corrcoef(image[c].ravel(), canonical[c].ravel())[0, 1] > 0.9999


def _resave_label(root: Path, case: str, affine: np.ndarray, flip_x: bool = False) -> np.ndarray:
    """Rewrite a case's label with another header (and its voxels mirrored along x if asked); the old voxels."""
    path = root / "labelsTr" / f"{case}.nii.gz"
    voxels = np.asarray(nib.load(path).dataobj)
    nib.save(nib.Nifti1Image(voxels[::-1] if flip_x else voxels, affine), path)
    return voxels


@pytest.mark.parametrize("affine,needle", [
    (np.diag([2.0, 2.0, 2.0, 1.0]), r"voxel sizes \[2.0, 2.0, 2.0\] against \[1.0, 1.0, 1.0\], orientation RAS"),
    (np.diag([-1.0, 1.0, 1.0, 1.0]), "orientation LAS against RAS, axes up to 180 degrees apart"),  # the header
    # mirrored, the voxels not; and a header turned by half a degree, which sizes and orientation codes do not show
    (np.array([[np.cos(0.5 * np.pi / 180), -np.sin(0.5 * np.pi / 180), 0, 0],
               [np.sin(0.5 * np.pi / 180), np.cos(0.5 * np.pi / 180), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
     r"against \[1.0, 1.0, 1.0\], orientation RAS against RAS, axes up to 0.5 degrees apart"),
], ids=["spacing", "mirrored header", "turned header"])
def test_a_label_off_its_images_voxel_grid_is_refused_in_one_line(tiny_msd, affine, needle):
    _resave_label(tiny_msd, "case_002", affine)
    with pytest.raises(PgpsError, match=needle) as err:
        data.prepare(tiny_msd)
    assert "case case_002:" in str(err.value) and "\n" not in str(err.value)


def test_a_channel_file_off_the_first_ones_grid_is_refused(tmp_path):
    root = tmp_path / "Dataset002_Two"
    for i in range(2):
        image, label = blob_case((12, 10, 8), i)
        for c, spacing in enumerate([1.0, 1.0 if i == 0 else 1.5]):
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([spacing] * 3 + [1.0])),
                     _mkdirs(root / "imagesTr") / f"two_{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), _mkdirs(root / "labelsTr") / f"two_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2}))
    with pytest.raises(PgpsError, match=r"case two_001: .*two_001_0001.nii.gz is not on its image's voxel grid"):
        data.prepare(root)


def _mkdirs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_labels_whose_header_differs_but_whose_voxels_line_up_are_used_with_one_warning(tiny_msd, capsys):
    shifted = np.eye(4)
    shifted[:3, 3] = [3.0, 0.0, 0.0]
    before = {c: _resave_label(tiny_msd, c, shifted) for c in ("case_001", "case_004")}
    # and a label stored mirrored with a header that says so: the same voxel grid, reoriented by its header
    mirrored = np.array([[-1.0, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # x runs 19 .. 0
    before["case_003"] = _resave_label(tiny_msd, "case_003", mirrored, flip_x=True)
    ds = data.prepare(tiny_msd)
    for case, voxels in before.items():
        assert np.array_equal(ds.label(ds.case_ids.index(case)), voxels), case
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("warning: case case_001: case_001.nii.gz's origin is 3 mm from its image's; the voxels are used as "
            "aligned (as nnU-Net does) (and 2 more): check those files' headers") in err


def test_labels_without_foreground_are_refused_and_a_class_no_case_holds_is_named(tiny_msd, capsys):
    _edit_meta(tiny_msd / "dataset.json", lambda m: m["labels"].update({"3": "cyst"}))
    data.prepare(tiny_msd)
    err = capsys.readouterr().err
    assert "warning: no case of Tiny holds class cyst (3) of dataset.json" in err and err.count("\n") == 1
    for path in (tiny_msd / "labelsTr").glob("*.nii.gz"):  # new files: the cache is rebuilt
        nib.save(nib.Nifti1Image(np.zeros(nib.load(path).shape, np.uint8), np.eye(4)), path)
    with pytest.raises(PgpsError, match="no label map of Tiny .* holds a foreground voxel"):
        data.prepare(tiny_msd)


def test_dataset_json_nested_too_deep_is_refused_and_a_byte_order_mark_is_read(tiny_msd):
    path = tiny_msd / "dataset.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as some Windows editors save it
    assert data.discover(tiny_msd).name == "Tiny"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PgpsError, match=r"dataset.json is not valid JSON \(nested too deeply \(more than 100 .*; fix"):
        data.discover(tiny_msd)


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
    for bad, needle in [
        ({"train": ["nope"], "val": ["case_005"]}, "names 1 case id\\(s\\) that dataset Tiny does not have"),
        ({"train": [0, 1], "val": [5]}, "names 3 case id"),
        ({"train": "case_000", "val": ["case_005"]}, "needs lists of case ids under 'train' and 'val'"),
        ([{"train": ["case_000"], "val": ["case_005"]}], "is a list \\(of cross-validation folds\\?\\)"),
        ({"train": ["case_000", "case_000"], "val": ["case_005"]}, "'case_000' is listed 2 times"),
        ({"train": ["case_000", "case_005"], "val": ["case_005"]}, "'case_005' is listed 2 times"),
        ({"train": [], "val": ["case_005"]}, "one is empty"),
    ]:
        f.write_text(json.dumps(bad))
        with pytest.raises(PgpsError, match=needle) as err:
            data.split(ds, splits_file=f)
        assert "\n" not in str(err.value)
        with pytest.raises(PgpsError, match=needle):  # the same, from the folder alone (before preparing it)
            data.check_splits_file(tiny_msd, f)
    f.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_005"]}))
    data.check_splits_file(tiny_msd, f)
    f.write_text(json.dumps({"train": ["nope"], "val": ["case_005"]}))
    from pgps_tune.cli import main

    assert main(["train", "--data", str(tiny_msd), "--out", str(tmp_path / "o"), "--splits", str(f), "--cache-dir",
                 str(tmp_path / "fresh"), "--quiet"]) == 2
    assert not (tmp_path / "fresh").exists()  # refused before the data were prepared


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


def test_planner_keeps_an_axis_that_is_physically_short_enough():
    # 20 x 5 mm = 100 mm against 256 and 205 mm in-plane; 96^3 voxels leave ~210 voxels (168 mm) in-plane,
    # so only the in-plane axes shrink.  max_pools=0 shows the shrunk patch itself, before any rounding.
    plan = data.plan_patch((20, 320, 256), (5, 0.8, 0.8), voxel_budget=96**3, max_pools=0)
    assert plan.final_patch[0] == 20
    assert plan.final_patch[1] < 320 and plan.final_patch[2] < 256
    assert min(plan.final_patch[1], plan.final_patch[2]) * 0.8 > 100  # still longer than the kept axis
    assert np.prod([f - 1 for f in plan.final_patch]) < 96**3  # ceil() adds less than one voxel per axis
    assert data.plan_patch((20, 320, 256), (5, 0.8, 0.8), voxel_budget=96**3).final_patch[0] == 20


def test_planner_shrinks_every_axis_once_it_is_the_longest_then_rounds_up():
    # 64^3 voxels leave ~114 voxels (91 mm) in-plane, shorter than 100 mm: then axis 0 shrinks too ...
    shrunk = data.plan_patch((20, 320, 256), (5, 0.8, 0.8), voxel_budget=64**3, max_pools=0)
    assert shrunk.final_patch[0] < 20 and shrunk.final_patch[1] < 320 and shrunk.final_patch[2] < 256
    assert np.prod([f - 1 for f in shrunk.final_patch]) < 64**3
    # ... and rounding up to a multiple of 2**pools (4 for its 2 pools) brings it back to 20
    plan = data.plan_patch((20, 320, 256), (5, 0.8, 0.8), voxel_budget=64**3)
    assert plan.pools[0] == 2 and plan.final_patch[0] == 20
    assert all(f % 2**p == 0 for f, p in zip(plan.final_patch, plan.pools))
    assert all(f >= s for f, s in zip(plan.final_patch, shrunk.final_patch))
    rounding = np.prod([1 + 2**p / f for f, p in zip(plan.final_patch, plan.pools)])
    assert np.prod(plan.final_patch) <= 64**3 * rounding


# -- refused inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_voxels_are_refused_naming_case_and_file(tiny_msd, tmp_path, value):
    image, label = blob_case((20, 24, 16), 3)
    image[3, 4, 5] = value
    path = tiny_msd / "imagesTr" / "case_003.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float64), np.eye(4)), path)  # float64: 1e39 only overflows float32
    cache = tmp_path / "cache"
    with pytest.raises(PgpsError, match=r"case case_003: .*case_003.nii.gz holds 1 non-finite voxel") as err:
        data.prepare(tiny_msd, cache_root=cache)
    assert "\n" not in str(err.value)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []  # nothing cached


def test_intensities_too_large_for_float32_statistics_never_reach_the_cache(tiny_msd, tmp_path):
    image, _ = blob_case((20, 24, 16), 1)
    huge = np.where(image > 0.5, 3e38, -3e38).astype(np.float32)  # finite, but sums overflow float32
    nib.save(nib.Nifti1Image(huge, np.eye(4)), tiny_msd / "imagesTr" / "case_001.nii.gz")
    try:
        ds = data.prepare(tiny_msd, cache_root=tmp_path / "cache")
    except PgpsError as err:  # refused, naming the case ...
        assert str(err).startswith("case case_001: ")
    else:  # ... or normalised to finite values
        assert all(np.isfinite(ds.image(i)).all() for i in range(len(ds)))


def _move_away(path: Path, away: Path) -> Path:
    """Move a dataset file out of its folder (as a dataset kept on another disk); returns where it went."""
    away.mkdir(exist_ok=True)
    return path.rename(away / path.name)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "linked folder"])
def test_msd_entries_outside_the_dataset_folder_are_read(tiny_msd, tmp_path, how):
    """A file elsewhere is only read (nothing is written beside it or named after it): absolute paths, .. and
    links that lead out of the folder are the dataset's own business, as for nnU-Net."""
    meta = json.loads((tiny_msd / "dataset.json").read_text())
    entry = meta["training"][2]
    target = _move_away(tiny_msd / entry["image"], tmp_path / "elsewhere")
    if how == "absolute":
        entry["image"] = str(target)
    elif how == "dotdot":
        entry["image"] = "./imagesTr/../../elsewhere/case_002.nii.gz"
    elif how == "link":
        (tiny_msd / entry["image"]).symlink_to(target)
    else:
        (tiny_msd / "more").symlink_to(target.parent, target_is_directory=True)
        entry["image"] = "more/case_002.nii.gz"
    (tiny_msd / "dataset.json").write_text(json.dumps(meta))
    spec = data.discover(tiny_msd)
    assert spec.cases[2].images[0].resolve() == target.resolve()
    if how == "absolute":
        ds = data.prepare(tiny_msd, cache_root=tmp_path / "cache")
        assert len(ds) == 6 and ds.image(2).shape == (1, 20, 24, 16)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m["training"][1].__setitem__("image", 7), "training entry 1 needs 'image' and 'label' file names"),
        (lambda m: m["training"].append(m["training"][0]), "case case_000 is listed twice"),
        (lambda m: m.__setitem__("modality", 3), "'modality' must name the image channels"),
    ],
    ids=["number as a path", "duplicate case", "modality a number"],
)
def test_malformed_msd_entries_get_one_line(tiny_msd, edit, needle):
    _edit_meta(tiny_msd / "dataset.json", edit)
    with pytest.raises(PgpsError, match=needle) as err:
        data.discover(tiny_msd)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("labels,needle", [
    ({"background": 0, "whole tumor": [1, 2], "core": [2]}, "an nnU-Net region (several values trained as one)"),
    ({"0": "background", "1": "a", "01": "b"}, "labels 'a' and 'b' both have value 1; give each label its own value"),
    ({"background": 0, "a": 1, "b": 1}, "labels 'a' and 'b' both have value 1"),
    ({"background": 0, "a": 1.0}, "label 'a': 1.0 does not pair an integer value with a name"),
    ({"background": 0, "a": 1, "ignore": 2}, "declares an 'ignore' label (nnU-Net v2's unannotated voxels"),
    ({str(k): f"c{k}" for k in range(300)}, "declares 300 labels; label maps are stored in 8 bits, at most 256"),
    ({"0": "background", "2": "a"}, "label values [0, 2] must be consecutive from 0; renumber them"),
], ids=["regions", "MSD value twice", "v2 value twice", "float value", "ignore label", "300 labels", "gap"])
def test_labels_that_cannot_be_trained_as_given_are_refused_in_one_line(tiny_msd, labels, needle):
    _edit_meta(tiny_msd / "dataset.json", lambda m: m.__setitem__("labels", labels))
    with pytest.raises(PgpsError, match=re.escape(needle)) as err:
        data.discover(tiny_msd)
    assert "\n" not in str(err.value)


def test_label_values_as_strings_and_a_trailing_label_axis_of_one_are_read(tiny_msd, tmp_path, capsys):
    _edit_meta(tiny_msd / "dataset.json", lambda m: m.__setitem__("labels", {"background": "0", "a": "1", "b": " 2"}))
    image, label = blob_case((20, 24, 16), 9)
    nib.save(nib.Nifti1Image(label[..., None].astype(np.uint8), np.eye(4)), tiny_msd / "labelsTr" / "case_002.nii.gz")
    # X Y Z 1 1 (a vector image of one component) in float32 with 1 written as 0.9999999
    near = np.where(label == 1, np.float32(0.9999999), label).astype(np.float32)[..., None, None]
    nib.save(nib.Nifti1Image(near, np.eye(4)), tiny_msd / "labelsTr" / "case_003.nii.gz")
    ds = data.prepare(tiny_msd, cache_root=tmp_path / "cache")
    assert ds.labels == {0: "background", 1: "a", 2: "b"}
    for i in (2, 3):
        assert ds.label(i).shape == (20, 24, 16) and np.array_equal(ds.label(i), label)  # X Y Z 1 read as X Y Z
    assert ("case case_003: case_003.nii.gz stores its labels as floating-point values near integers "
            "(e.g. 0.9999999), read as the nearest integers") in capsys.readouterr().err


@pytest.mark.parametrize("value", [0.5, np.nan, np.inf])
def test_a_float_label_that_is_not_near_an_integer_is_refused_naming_the_file_and_the_value(value):
    lab = np.zeros((3, 3, 3))
    lab[1, 1, 1] = value
    with pytest.raises(PgpsError, match=re.escape(f"label map x.nii.gz holds 1 voxel(s) that are not integer labels "
                                                  f"(e.g. {value:.7g}); write integer labels")):
        data._integer_labels("c", Path("x.nii.gz"), lab)


def test_msd_case_ids_keep_the_dots_of_their_names(tmp_path):
    root = tmp_path / "uids"
    training = [write_case(root, name, *blob_case((16, 16, 16), i))
                for i, name in enumerate(["1.2.840.1", "1.2.840.2", "pat.v1", "pat.v2"])]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"},
                                                   "modality": {"0": "MRI"}, "training": training}))
    assert [c.case_id for c in data.discover(root).cases] == ["1.2.840.1", "1.2.840.2", "pat.v1", "pat.v2"]


def _nnunet_folder(nn: Path, cases: int, labelled: int, file_ending: str = ".nii.gz") -> Path:
    """An nnU-Net raw folder of one-channel .nii.gz cases c_000, ..., the first ``labelled`` with a label;
    dataset.json gives ``file_ending`` and numTraining ``cases``."""
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for i in range(cases):
        image, label = blob_case((16, 16, 16), i)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), nn / "imagesTr" / f"c_{i:03d}_0000.nii.gz")
        if i < labelled:
            nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), nn / "labelsTr" / f"c_{i:03d}.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "file_ending": file_ending,
                                                 "numTraining": cases, "labels": {"background": 0, "a": 1, "b": 2}}))
    return nn


def test_folders_broken_links_and_a_missed_file_ending_are_named(tiny_msd, tmp_path):
    (tiny_msd / "imagesTr" / "case_001.nii.gz").unlink()
    (tiny_msd / "imagesTr" / "case_001.nii.gz").mkdir()
    with pytest.raises(PgpsError, match=r"case_001.nii.gz is a folder, not an image file; fix dataset.json"):
        data.discover(tiny_msd)
    (tiny_msd / "imagesTr" / "case_001.nii.gz").rmdir()
    (tiny_msd / "imagesTr" / "case_001.nii.gz").symlink_to(tiny_msd / "gone.nii.gz")
    with pytest.raises(PgpsError, match=r"case_001.nii.gz is a link to .*gone.nii.gz, which does not exist; fix the"):
        data.discover(tiny_msd)
    (tiny_msd / "labelsTr" / "case_003.nii.gz").unlink()
    with pytest.raises(PgpsError, match=r"is a link to .* \(and 1 more file\(s\) missing\)"):
        data.discover(tiny_msd)
    nn = _nnunet_folder(tmp_path / "nn", cases=2, labelled=2, file_ending=".nrrd")
    with pytest.raises(PgpsError, match=r"labelsTr holds no '\*.nrrd' file \(dataset.json's file_ending\) but .nii.gz "
                                        r"files; set file_ending to the labels' ending"):
        data.discover(nn)


def test_cases_the_folder_may_miss_are_warned_about_once_when_it_is_prepared(tmp_path, capsys):
    nn = _nnunet_folder(tmp_path / "nn", cases=3, labelled=2)  # the third image lost its label (or it was misnamed)
    ds = data.prepare(nn, cache_root=tmp_path / "cache")
    assert len(ds) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pgps-tune: warning:")]
    assert any("numTraining 3 but has labels for 2 case(s); check for missing or misnamed files" in x for x in err), err
    assert any("1 file(s) in imagesTr belong to no labelled case and are not used (e.g. c_002_0000.nii.gz)" in x
               for x in err), err
    data.prepare(nn, cache_root=tmp_path / "cache")  # the cache is reused: nothing said again
    assert "warning" not in capsys.readouterr().err


def test_a_case_whose_resampling_cannot_fit_in_memory_is_refused_before_it_is_tried(tiny_msd, tmp_path, monkeypatch):
    from pgps_tune import imageio

    image, label = blob_case((40, 48, 32), 5)
    write_case(tiny_msd, "case_005", image, label, spacing=(10.0, 10.0, 10.0))  # 10 mm among 1 mm cases: 1000x larger
    monkeypatch.setattr(imageio, "available_memory", lambda: 2**30)
    with pytest.raises(PgpsError, match=r"case case_005: resampling it from spacing 10x10x10 mm to the dataset's "
                                        r"median spacing 1x1x1 mm turns its 40x48x32 voxels into 400x480x320, about "
                                        r"1\.4 GiB of memory while preprocessing, more than the 1\.0 GiB available"
                                        r"; check the spacing in its header") as err:
        data.prepare(tiny_msd, cache_root=tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []  # nothing cached


def test_links_and_dotdot_that_stay_inside_the_dataset_folder_are_fine(tiny_msd):
    store = tiny_msd / "store"
    store.mkdir()
    (tiny_msd / "imagesTr" / "case_001.nii.gz").rename(store / "case_001.nii.gz")
    (tiny_msd / "imagesTr" / "case_001.nii.gz").symlink_to(store / "case_001.nii.gz")
    meta = json.loads((tiny_msd / "dataset.json").read_text())
    meta["training"][0]["image"] = "./labelsTr/../imagesTr/case_000.nii.gz"
    (tiny_msd / "dataset.json").write_text(json.dumps(meta))
    assert len(data.discover(tiny_msd).cases) == 6


def _nnunet(root: Path, cases: int = 2) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        image, label = blob_case((12, 12, 12), i)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), root / "imagesTr" / f"t_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), root / "labelsTr" / f"t_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}))
    return root


@pytest.mark.parametrize("how", ["label link", "image link", "images folder link", "listed absolute",
                                 "listed dotdot", "listed variable"])
def test_nnunet_files_outside_the_dataset_folder_are_read(tmp_path, monkeypatch, how):
    """nnU-Net v2's 'dataset' key may name files anywhere (absolute, .., $VARIABLES), and links may lead out."""
    root = _nnunet(tmp_path / "Dataset002_Out")
    away = tmp_path / "elsewhere"
    image = root / "imagesTr" / "t_001_0000.nii.gz"
    label = root / "labelsTr" / "t_001.nii.gz"
    if how == "images folder link":
        for f in sorted((root / "imagesTr").iterdir()):
            _move_away(f, away)
        (root / "imagesTr").rmdir()
        (root / "imagesTr").symlink_to(away, target_is_directory=True)
    elif how.endswith("link"):
        moved = _move_away(label if how == "label link" else image, away)
        (label if how == "label link" else image).symlink_to(moved)
    else:
        for f in (image, label):
            _move_away(f, away)
        monkeypatch.setenv("PGPS_TEST_AWAY", str(away))
        where = {"listed absolute": str(away), "listed dotdot": "imagesTr/../../elsewhere",
                 "listed variable": "$PGPS_TEST_AWAY"}[how]
        meta = json.loads((root / "dataset.json").read_text())
        meta["dataset"] = {"t_000": {"images": ["imagesTr/t_000_0000.nii.gz"], "label": "labelsTr/t_000.nii.gz"},
                           "t_001": {"images": [f"{where}/t_001_0000.nii.gz"], "label": f"{where}/t_001.nii.gz"}}
        (root / "dataset.json").write_text(json.dumps(meta))
    case = data.discover(root).cases[1]
    read = case.label if how == "label link" else case.images[0]
    assert case.case_id == "t_001" and read.resolve().parent == away.resolve()
    if how == "listed variable":
        ds = data.prepare(root, cache_root=tmp_path / "cache")
        assert ds.case_ids == ["t_000", "t_001"] and ds.label(1).sum() == blob_case((12, 12, 12), 1)[1].sum()
        monkeypatch.delenv("PGPS_TEST_AWAY")
        with pytest.raises(PgpsError, match=r"'t_001' image \$PGPS_TEST_AWAY/t_001_0000.nii.gz uses \$PGPS_TEST_AWAY, "
                                            "which is not set; export PGPS_TEST_AWAY="):
            data.discover(root)


def test_a_file_ending_that_is_a_path_is_refused(tmp_path):
    root = _nnunet(tmp_path / "Dataset002_Out")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": "/../../elsewhere/secret.nii.gz"}))
    with pytest.raises(PgpsError, match="file_ending .* must be a file extension") as err:
        data.discover(root)
    assert "\n" not in str(err.value)


# -- the cache: integrity, concurrency, interrupts, permissions -----------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _reshape_npy(path: Path) -> None:  # the same bytes under another shape: only the header check sees it
    arr = np.load(path)
    np.save(path, arr.reshape(arr.shape[0], arr.shape[2], arr.shape[1], arr.shape[3]))


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


DAMAGE = {
    "truncated image": lambda d: _truncate(d / "00001_img.npy"),
    "truncated label": lambda d: _truncate(d / "00004_seg.npy"),
    "truncated prepared.json": lambda d: _truncate(d / "prepared.json"),
    "garbled prepared.json": lambda d: (d / "prepared.json").write_bytes(b"\x00\xffnot json"),
    "missing fg": lambda d: (d / "00002_fg.npz").unlink(),
    "truncated fg": lambda d: _truncate(d / "00002_fg.npz"),
    "reshaped image": lambda d: _reshape_npy(d / "00000_img.npy"),
    "shape in prepared.json": lambda d: _edit_meta(
        d / "prepared.json", lambda m: m["shapes"].__setitem__(3, [20, 24, 15])
    ),
    "field missing": lambda d: _edit_meta(d / "prepared.json", lambda m: m.pop("case_ids")),
    "folder is a file": lambda d: None,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_detected_and_rebuilt(tiny_msd, monkeypatch, capsys, damage):
    ds = data.prepare(tiny_msd)
    before = [(np.array(ds.image(i)), np.array(ds.label(i)), ds.fg(i)) for i in range(len(ds))]
    if damage == "folder is a file":
        import shutil

        shutil.rmtree(ds.cache_dir)
        ds.cache_dir.write_text("not a folder")
    else:
        DAMAGE[damage](ds.cache_dir)
    capsys.readouterr()
    reads = _count_reads(monkeypatch)
    again = data.prepare(tiny_msd)
    assert len(reads) == 6  # rebuilt
    assert f"preprocessing cache {ds.cache_dir} is damaged" in capsys.readouterr().err
    assert again.cache_dir == ds.cache_dir and len(again) == 6 and again.shapes == ds.shapes
    for i, (img, seg, fg) in enumerate(before):
        assert np.array_equal(again.image(i), img) and np.array_equal(again.label(i), seg)
        assert all(np.array_equal(again.fg(i)[k], v) for k, v in fg.items())
    assert sorted(p.name for p in ds.cache_dir.parent.glob(f".{ds.cache_dir.name}.*")) == [
        f".{ds.cache_dir.name}.lock"
    ]  # the damaged copy is gone too


CHILD = """
import os, signal, sys, time
from pathlib import Path
# Python leaves SIGINT ignored where it started so (a child of a shell's background job, as a CI script
# may run pytest): Ctrl-C must raise KeyboardInterrupt here, as in a terminal
signal.signal(signal.SIGINT, signal.default_int_handler)
from pgps_tune import data
source, cache, gate, hook = sys.argv[1:5]
gate = Path(gate)
real = getattr(data, hook)
def gated(*args, **kwargs):  # record the call, then wait for the test to open the gate
    with open(gate / "calls", "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    (gate / f"inside-{os.getpid()}").touch()
    while not (gate / "go").exists():
        time.sleep(0.01)
    return real(*args, **kwargs)
setattr(data, hook, gated)
print(data.prepare(source, cache_root=cache).cache_dir, flush=True)
"""


def _child(source: Path, cache: Path, gate: Path, hook: str, err: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(err, "w") as fh:
        return subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(cache), str(gate), hook],
                                stdout=subprocess.PIPE, stderr=fh, text=True, env=env)


def _wait_for(what: str, ready, procs: list[subprocess.Popen], errs: list[Path], limit: float = 180) -> None:
    """Poll for an observed state; fail with the children's stderr if one dies or the limit passes."""
    deadline = time.monotonic() + limit
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            logs = " | ".join(e.read_text()[-800:] for e in errs)
            pytest.fail(f"never saw {what} ({'a child exited' if dead else f'{limit} s passed'}); stderr: {logs}")
        time.sleep(0.02)


def test_two_processes_preparing_at_once_build_the_cache_once(tiny_msd, tmp_path):
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    gate.mkdir()
    errs = [tmp_path / "err0", tmp_path / "err1"]
    procs = [_child(tiny_msd, cache, gate, "_read_case", e) for e in errs]
    _wait_for(
        "one process reading while the other waits for the lock",
        lambda: list(gate.glob("inside-*")) and any("waiting for another process" in e.read_text() for e in errs),
        procs, errs,
    )
    (gate / "go").touch()
    outs = [p.communicate(timeout=180)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.read_text() for e in errs]
    calls = (gate / "calls").read_text().split()
    assert len(calls) == 6 and len(set(calls)) == 1  # every case read once, by one process
    assert len(list(gate.glob("inside-*"))) == 1
    assert outs[0] == outs[1] and len(data.prepare(tiny_msd, cache_root=cache)) == 6


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["KILL", "TERM", "INT"])
def test_a_killed_preparation_leaves_no_temporary_folder_behind(tiny_msd, tmp_path, sig):
    cache, gate, err = tmp_path / "cache", tmp_path / "gate", tmp_path / "err"
    gate.mkdir()
    proc = _child(tiny_msd, cache, gate, "_fg_coords", err)  # blocks while writing the cache
    _wait_for("the cache being written", lambda: list(gate.glob("inside-*")), [proc], [err])
    temps = list(cache.glob(".*.tmp-*"))
    assert len(temps) == 1 and temps[0].is_dir()
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert not temps[0].exists()  # Ctrl-C cleans up at once
    ds = data.prepare(tiny_msd, cache_root=cache)  # the next run removes what a dead writer left
    assert len(ds) == 6
    assert sorted(p.name for p in cache.iterdir()) == sorted([ds.cache_dir.name, f".{ds.cache_dir.name}.lock"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tiny_msd, tmp_path):
    cache = tmp_path / "cache"
    old = os.umask(0o002)  # a team's group-writable umask
    try:
        ds = data.prepare(tiny_msd, cache_root=cache)
        written = atomic_write_text(tmp_path / "out" / "a.txt", "one")
        os.umask(0o077)
        private = atomic_write_text(tmp_path / "out" / "b.txt", "one")
        os.chmod(written, 0o604)
        atomic_write_text(written, "two")  # overwriting keeps the file's own mode
    finally:
        os.umask(old)
    assert _mode(cache) == 0o775 and _mode(ds.cache_dir) == 0o775
    modes = {p.name: _mode(p) for p in [*ds.cache_dir.iterdir(), *cache.glob(".*")]}
    assert len(modes) == 6 * 3 + 2 and set(modes.values()) == {0o664}
    assert _mode(written) == 0o604 and written.read_text() == "two"
    assert _mode(private) == 0o600 and _mode(tmp_path / "out") == 0o775


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_complete_read_only_cache_is_used(tiny_msd, tmp_path):
    cache = tmp_path / "cache"
    ds = data.prepare(tiny_msd, cache_root=cache)
    (cache / f".{ds.cache_dir.name}.lock").unlink()
    cache.chmod(0o555)
    try:
        assert data.prepare(tiny_msd, cache_root=cache).cache_dir == ds.cache_dir
        with pytest.raises(PgpsError, match="does not exist yet and cannot be built there"):
            data.prepare("synthetic", cache_root=cache, synthetic_cases=2, synthetic_shape=(8, 8, 8))
    finally:
        cache.chmod(0o755)


def test_without_file_locks_a_complete_cache_is_still_read(tiny_msd, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = data.prepare(tiny_msd, cache_root=cache)

    def no_locks(fd, operation):  # what flock does on a file system without lock support
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(data.fcntl, "flock", no_locks)
    assert data.prepare(tiny_msd, cache_root=cache).cache_dir == ds.cache_dir
    with pytest.raises(PgpsError, match=r"does not exist yet and cannot be built there \(No locks available\)"):
        data.prepare("synthetic", cache_root=cache, synthetic_cases=2, synthetic_shape=(8, 8, 8))


def _ct_mri_folder(root: Path, end: str, cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """An nnU-Net raw folder with channels CT and T2 in ``end`` files, written by SimpleITK on an
    anisotropic grid whose direction swaps and mirrors the first two axes."""
    import SimpleITK as sitk

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()

    def save(array_xyz: np.ndarray, path: Path) -> None:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
        img.SetSpacing((0.8, 1.5, 3.0))
        img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
        img.SetOrigin((10.0, -20.0, 5.0))
        sitk.WriteImage(img, str(path))

    for i, (ct, mri, label) in enumerate(cases):
        save(ct, root / "imagesTr" / f"c{i}_0000{end}")
        save(mri, root / "imagesTr" / f"c{i}_0001{end}")
        save(label, root / "labelsTr" / f"c{i}{end}")
    (root / "dataset.json").write_text(json.dumps({
        "name": f"ctmri{end.replace('.', '_')}", "channel_names": {"1": "T2", "0": "ct"}, "file_ending": end,
        "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": len(cases)}))
    return root


def test_ct_and_mri_channels_match_numpy_in_every_format(tmp_path):
    """CT: clipped to the 0.5/99.5 percentiles of the foreground intensities (every case weighing the same, as
    nnU-Net's draws with replacement), z-scored with the unclipped foreground mean and sd (nnU-Net's
    CTNormalization); T2: z-scored per volume; the same arrays, labels and spacing whichever of the four
    formats holds the cases."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        label = np.zeros((9, 7, 5), dtype=np.uint8)
        label[2:5 + i, 1:4, 1:4], label[7, 5, 3] = 1, 2
        ct = rng.normal(40, 300, label.shape).astype(np.int16)
        ct[label > 0] += rng.normal(100, 50, int((label > 0).sum())).astype(np.int16)
        cases.append((ct, rng.gamma(2, 50 * (i + 1), label.shape).astype(np.float32), label))
    # the statistics a case-weighted foreground gives: each case's foreground, repeated to the same length
    per_case = [ct[label > 0].astype(np.float64) for ct, _, label in cases]
    n = np.lcm.reduce([v.size for v in per_case])
    fg = np.concatenate([np.tile(v, n // v.size) for v in per_case])
    lower, upper = np.percentile(fg, [0.5, 99.5])  # test_intensity pins which statistic is which

    def canonical(a: np.ndarray) -> np.ndarray:  # index axes (A, L, S) -> (R, A, S)
        return np.flip(a.transpose(1, 0, 2), axis=0)

    for end in (".nii.gz", ".nii", ".nrrd", ".mha"):
        ds = data.prepare(_ct_mri_folder(tmp_path / end[1:], end, cases))
        assert ds.spacing == pytest.approx((1.5, 0.8, 3.0))
        assert [s["type"] for s in ds.normalisation] == ["ct", "zscore"]
        got = [ds.normalisation[0][k] for k in ("lower", "upper", "mean", "sd")]
        assert got[2:] == pytest.approx([fg.mean(), fg.std()], rel=0.02)  # 10,000 draws per case
        assert got[:2] == pytest.approx([lower, upper], abs=0.05 * (upper - lower))
        if end == ".nii.gz":
            first = ds.normalisation
        assert ds.normalisation == first  # the same draws whichever format holds the cases
        for k, (ct, mri, label) in enumerate(cases):
            m = mri.astype(np.float64)
            lo, up, mean, sd = got
            assert np.allclose(ds.image(k)[0], canonical((np.clip(ct, lo, up) - mean) / sd), atol=1e-5)
            assert np.allclose(ds.image(k)[1], canonical((m - m.mean()) / m.std()), atol=1e-5)
            assert (np.asarray(ds.label(k)) == canonical(label)).all()


def test_cache_files_open_safely_from_threads_at_different_stack_depths(tiny_msd):
    # numpy parses .npy headers with ast.literal_eval, whose recursion count CPython 3.11 shares between
    # threads: without a lock, threads opening cache files while finalizers switch threads mid-parse fail with
    # "SystemError: AST constructor recursion depth mismatch" (once in CI, while preparing with 2 workers)
    import gc
    from concurrent.futures import ThreadPoolExecutor

    ds = data.prepare(tiny_msd)

    class Cycle:  # garbage whose finalizer gives up the GIL, so collections switch threads mid-parse
        def __init__(self):
            self.me = self

        def __del__(self):
            time.sleep(0)

    def deep(n: int, k: int) -> int:
        if n:
            return deep(n - 1, k)
        for _ in range(300):
            Cycle()
            assert ds.image(k % len(ds)).shape[0] == ds.channels
            assert ds.label(k % len(ds)).ndim == 3
        return k

    threshold = gc.get_threshold()
    gc.set_threshold(20, 1, 1)
    try:
        with ThreadPoolExecutor(4) as pool:
            assert sorted(pool.map(lambda k: deep(5 * k, k), range(8))) == list(range(8))
    finally:
        gc.set_threshold(*threshold)


PARSES = """
import ast, sys, threading, traceback
from pgps_tune import data
real, seen = ast.parse, []
def parse(*args, **kwargs):  # where a thread other than the main one parses Python, besides a .npy header
    where = traceback.extract_stack()
    if threading.current_thread() is not threading.main_thread() and not any(
            f.name == "_read_array_header" for f in where):
        seen.append(" < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in reversed(where[:-1])
                               if "frozen" not in f.filename)[:300])
    return real(*args, **kwargs)
ast.parse = parse
data.prepare(sys.argv[1], cache_root=sys.argv[2], workers=2)
print("\\n".join(seen))
"""


def test_preparation_threads_parse_nothing_but_npy_headers(tmp_path):
    # a first import on a worker thread parses source too (scipy's imports numpy.ma, which asks
    # inspect.signature of builtins), outside the .npy lock: it raced the other worker's cache reads as the
    # headers did (gh-106905). A fresh interpreter, where nothing is imported yet; cases that are resampled
    source = make_msd(tmp_path / "msd", n=4, shape=(12, 10, 8), spacings=[(1.0, 1.0, 1.0)] * 2 + [(1.5, 1.0, 1.0)] * 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PARSES, str(source), str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
