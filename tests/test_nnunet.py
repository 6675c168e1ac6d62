"""The nnU-Net v2 bridge: plans import and dataset lookup (pure), and a schedule run inside nnU-Net.

The plans tests use small hand-written plans files and need no nnunetv2.  The training test
runs nnU-Net's own plan-and-preprocess on a tiny dataset in nnU-Net's raw layout, then its
trainer with a 3-stage schedule, interrupted at a stage boundary and continued.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_case, sweep_meta, trial_setup

from pgps_tune import nnunet, results
from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.errors import PgpsError

try:
    import nnunetv2  # noqa: F401
    HAS_NNUNET = True
except ImportError:
    HAS_NNUNET = False
needs_nnunet = pytest.mark.skipif(not HAS_NNUNET, reason="nnunetv2 not installed (pip install 'pgps-tune[nnunet]')")

# an anisotropic 3d_fullres as nnU-Net writes it: patch and strides in nnU-Net's axis order
TRANSPOSE = [2, 0, 1]
CANONICAL_PATCH = (20, 48, 64)  # x y z of the canonically oriented volume
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]


def nnunet_order(canonical: tuple[int, ...], transpose: list[int]) -> list[int]:
    """What nnU-Net's readers do to array axes: reverse (SimpleITK's z y x), then transpose_forward."""
    return list(np.empty(canonical, dtype=np.uint8).transpose(2, 1, 0).transpose(transpose).shape)


def current_plans() -> dict:
    patch = nnunet_order(CANONICAL_PATCH, TRANSPOSE)
    return {
        "dataset_name": "Dataset004_Hippo", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": TRANSPOSE, "transpose_backward": [1, 2, 0],
        "configurations": {
            "2d": {"patch_size": [64, 48], "batch_size": 12, "spacing": [0.8, 0.8],
                   "architecture": {"arch_kwargs": {"strides": [[1, 1], [2, 2]]}}},
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": patch,
                "spacing": [3.0, 0.8, 0.7],
                "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {"strides": STRIDES}},
            },
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "batch_size": 3},
        },
    }


def old_plans() -> dict:
    plans = current_plans()
    cfg = plans["configurations"]["3d_fullres"]
    del cfg["architecture"]
    cfg.update({"UNet_class_name": "PlainConvUNet", "pool_op_kernel_sizes": STRIDES,
                "conv_kernel_sizes": [[3, 3, 3]] * len(STRIDES)})
    return plans


def stride2_per_axis(strides: list[list[int]]) -> list[int]:
    return [sum(s[a] == 2 for s in strides) for a in range(3)]


def write_plans(folder: Path, plans: dict) -> Path:
    """A plans file as nnU-Net's preprocessing leaves it: with a label file in gt_segmentations beside it
    (canonically oriented unless the test wrote its own), which decides the axis mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    labels = folder / "gt_segmentations"
    if not labels.exists():
        labels.mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), labels / "case_000.nii.gz")
    return folder / "nnUNetPlans.json"


# -- plans import (no nnunetv2) ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [current_plans, old_plans], ids=["strides", "pool_op_kernel_sizes"])
def test_plans_give_final_patch_pools_batch_and_spacing_in_pgps_axes(tmp_path, make):
    plan = nnunet.read_plans(write_plans(tmp_path, make()), "3d_fullres")
    assert plan.final_patch == CANONICAL_PATCH
    assert list(plan.to_nnunet(plan.pools)) == stride2_per_axis(STRIDES)
    assert plan.to_nnunet(plan.spacing) == (3.0, 0.8, 0.7)
    assert plan.batch_size == 2 and plan.configuration == "3d_fullres"
    assert plan.dataset == "Dataset004_Hippo" and plan.data_identifier == "nnUNetPlans_3d_fullres"
    assert plan.from_nnunet(plan.to_nnunet((1, 2, 3))) == (1, 2, 3)
    sch.check_patch(plan.final_patch, plan.pools)  # the pools fit the patch axis by axis
    # nnU-Net's trainer gets the plans as read here, not a second read of a file that may have changed since
    path = tmp_path / "nnUNetPlans.json"
    given = plan.plans_dict()
    assert given == json.loads(path.read_text())
    path.write_text("{}")
    given["continue_training"] = True  # the trainer's copy is its own
    assert plan.plans_dict() == make() and "continue_training" not in plan.plans_dict()


def test_inheriting_configuration_keeps_the_parent_and_overrides(tmp_path):
    plans = current_plans()
    plan = nnunet.read_plans(write_plans(tmp_path, plans), "3d_cascade_fullres")
    parent = nnunet.read_plans(tmp_path / "nnUNetPlans.json", "3d_fullres")
    assert plan.batch_size == 3
    assert (plan.final_patch, plan.pools, plan.spacing) == (parent.final_patch, parent.pools, parent.spacing)


def test_axes_follow_the_label_files_orientation(tmp_path):
    """A file whose voxel axes are permuted against RAS: pgps-tune's loader sees its canonical shape."""
    file_shape = (6, 8, 12)
    affine = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # voxel i->y, j->z, k->x
    img = nib.Nifti1Image(np.zeros(file_shape, np.uint8), affine)
    (tmp_path / "gt_segmentations").mkdir()
    nib.save(img, tmp_path / "gt_segmentations" / "case_000.nii.gz")
    canonical = nib.as_closest_canonical(img).shape  # what pgps_tune.data trains on
    assert canonical != file_shape
    plans = current_plans()
    plans["transpose_forward"] = [0, 1, 2]
    plans["configurations"]["3d_fullres"].update(patch_size=list(file_shape[::-1]), spacing=[1.0, 1.0, 1.0])
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [2, 2, 2]]
    if HAS_NNUNET:  # nnU-Net's own reader gives the reversed voxel order this relies on
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        seg, _ = SimpleITKIO().read_seg(str(tmp_path / "gt_segmentations" / "case_000.nii.gz"))
        assert list(seg.shape[1:]) == plans["configurations"]["3d_fullres"]["patch_size"]
    plan = nnunet.read_plans(write_plans(tmp_path, plans), "3d_fullres")
    assert plan.final_patch == canonical


PERMUTED = (0, 0, 1, 1, 0, 0, 0, 1, 0)  # ITK direction: voxel i -> world y, j -> z, k -> x (as DICOM series can be)


def _permuted_dataset(folder: Path, ending: str) -> Path:
    """nnU-Net's preprocessed folder of a dataset whose voxel axes are permuted against RAS, in any format:
    its plans (patch = the reader's array shape, as nnU-Net plans it), dataset.json and one label file."""
    import SimpleITK as sitk

    labels = folder / "gt_segmentations"
    labels.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.zeros((8, 16, 24), np.uint8))  # SimpleITK's array order: k j i
    image.SetDirection(PERMUTED)
    sitk.WriteImage(image, str(labels / f"p_000{ending}"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "fg": 1},
                                                     "numTraining": 1, "file_ending": ending}))
    plans = current_plans()
    plans["transpose_forward"] = [0, 1, 2]
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(patch_size=[8, 16, 24], spacing=[1.0, 1.0, 1.0])  # what nnU-Net's readers see: k j i
    cfg["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [2, 2, 2]]
    return write_plans(folder, plans)


def test_axes_follow_the_label_orientation_in_every_format(tmp_path):
    """The same permuted data as .mha, .nrrd, .nii and .nii.gz: one mapping, onto the axes pgps-tune trains on."""
    from pgps_tune import imageio

    plans = {end: nnunet.read_plans(_permuted_dataset(tmp_path / end.strip("."), end)) for end in imageio.ENDINGS}
    array, affine = imageio.read(tmp_path / "mha" / "gt_segmentations" / "p_000.mha")
    canonical = imageio.to_canonical(array, affine)[0].shape  # what pgps_tune.data trains on
    assert canonical == (8, 24, 16) and array.shape == (24, 16, 8)
    for end, plan in plans.items():
        assert plan.final_patch == canonical, end
        assert plan.to_nnunet(plan.final_patch) == (8, 16, 24), end
    if HAS_NNUNET:  # nnU-Net's reader of these formats gives the array order the plans are in
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        seg, _ = SimpleITKIO().read_seg(str(tmp_path / "mha" / "gt_segmentations" / "p_000.mha"))
        assert list(seg.shape[1:]) == [8, 16, 24]


def test_without_a_readable_label_the_axis_mapping_is_refused(tmp_path):
    path = _permuted_dataset(tmp_path / "d", ".mha")
    (tmp_path / "d" / "gt_segmentations" / "p_000.mha").unlink()
    with pytest.raises(PgpsError, match=r"no label file \(.mha\) in .*gt_segmentations, so the orientation") as err:
        nnunet.read_plans(path)
    assert "\n" not in str(err.value)
    (tmp_path / "d" / "gt_segmentations" / "p_000.mha").write_bytes(b"not an image")
    with pytest.raises(PgpsError, match="cannot read MetaImage file"):
        nnunet.read_plans(path)
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"file_ending": ".tif"}))
    with pytest.raises(PgpsError, match="file_ending '.tif' is not a 3-D image format pgps-tune reads"):
        nnunet.read_plans(path)
    alone = tmp_path / "alone" / "nnUNetPlans.json"  # a plans file copied out of its folder
    alone.parent.mkdir()
    alone.write_text(path.read_text())
    with pytest.raises(PgpsError, match="no label file"):
        nnunet.read_plans(alone)
    for reader in ("NibabelIOWithReorient",):  # a reader that reorients sees canonical axes: nothing to read
        plans = json.loads(path.read_text()) | {"image_reader_writer": reader}
        alone.write_text(json.dumps(plans))
        assert nnunet.read_plans(alone).final_patch == (24, 16, 8)  # the plans' axes reversed


def _set(path: list, value):
    def mutate(plans: dict) -> dict:
        d = plans
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return plans
    return mutate


CFG = ["configurations", "3d_fullres"]
STRIDE_KEY = [*CFG, "architecture", "arch_kwargs", "strides"]


@pytest.mark.parametrize("mutate, configuration, match", [
    (lambda p: {"plans_name": "x"}, "3d_fullres", "not an nnU-Net plans file"),
    (lambda p: p, "3d_lowres", "configuration '3d_lowres' .* available: 2d, 3d_cascade_fullres, 3d_fullres"),
    (_set([*CFG, "inherits_from"], "3d_cascade_fullres"), "3d_cascade_fullres", "inherit in a circle"),
    (_set(["configurations", "3d_cascade_fullres", "inherits_from"], "3d_gone"), "3d_cascade_fullres",
     "'3d_gone' .*inherits_from of '3d_cascade_fullres'"),
    (lambda p: p, "2d", "2-D; pgps-tune schedules 3-D patches"),
    (_set(STRIDE_KEY, [[1, 1, 1], [3, 2, 2]]), "3d_fullres", r"stride\(s\) \[3\]"),
    (_set(STRIDE_KEY, [[1, 1, 1], [2, 2]]), "3d_fullres", "strides entry 1 must be 3 ints"),
    (_set([*CFG, "architecture"], {}), "3d_fullres", "neither architecture.arch_kwargs.strides nor pool_op"),
    (_set([*CFG, "batch_size"], 0), "3d_fullres", "batch_size must be a positive integer"),
    (_set([*CFG, "batch_size"], True), "3d_fullres", "batch_size must be a positive integer"),
    (_set([*CFG, "spacing"], [1.0, "a", 1.0]), "3d_fullres", "spacing must be 3 floats"),
    (_set(["transpose_forward"], [0, 0, 1]), "3d_fullres", "transpose_forward must be a permutation"),
    (_set([*CFG, "patch_size"], [20, 60, 48]), "3d_fullres", "not divisible by the network's downsampling"),
    (_set([*CFG, "patch_size"], [-24, 48, 64]), "3d_fullres",
     r"patch_size .* must be an integer in \[1, 4096\], got -24"),
    (_set([*CFG, "patch_size"], [0, 48, 64]), "3d_fullres", r"must be an integer in \[1, 4096\], got 0"),
    (_set([*CFG, "patch_size"], [2**40, 48, 64]), "3d_fullres",
     r"must be an integer in \[1, 4096\], got 1099511627776"),
    (_set([*CFG, "spacing"], [float("nan"), 0.8, 0.7]), "3d_fullres", "spacing must be 3 finite positive numbers"),
    (_set([*CFG, "spacing"], [3.0, -0.8, 0.7]), "3d_fullres", "spacing must be 3 finite positive numbers"),
    (_set([*CFG, "spacing"], [3.0, 0.0, 0.7]), "3d_fullres", "spacing must be 3 finite positive numbers"),
])
def test_bad_plans_give_one_line_errors(tmp_path, mutate, configuration, match):
    path = write_plans(tmp_path, mutate(current_plans()))
    with pytest.raises(PgpsError, match=match) as err:
        nnunet.read_plans(path, configuration)
    assert "\n" not in str(err.value)


def test_unreadable_plans_files(tmp_path):
    with pytest.raises(PgpsError, match="does not exist; run nnUNetv2_plan_and_preprocess"):
        nnunet.read_plans(tmp_path / "nope.json")
    for text in ("{not json", '{"configurations": ' + "[" * 500 + "]" * 500 + "}"):  # torn; crafted deep
        (tmp_path / "nnUNetPlans.json").write_text(text)
        with pytest.raises(PgpsError, match="not valid JSON .*; regenerate it with nnUNetv2_plan_and_preprocess"):
            nnunet.read_plans(tmp_path)
    (tmp_path / "nnUNetPlans.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(PgpsError, match="not UTF-8 text"):
        nnunet.read_plans(tmp_path)


# -- datasets by id or name --------------------------------------------------------------------------


def test_find_dataset_by_id_or_name_through_the_environment(tmp_path, monkeypatch):
    for name in ("Dataset004_Hippocampus", "Dataset012_Other", "Dataset013_A", "Dataset013_B"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    for ref in ("4", "004", 4, "Dataset004_Hippocampus"):
        assert nnunet.find_dataset(ref) == tmp_path / "Dataset004_Hippocampus"
    for ref, match in (("5", "no dataset with id 5"), ("13", "matches Dataset013_A, Dataset013_B"),
                       ("Dataset005_X", "not in nnUNet_raw"), ("Hippocampus", "not an nnU-Net dataset id or name")):
        with pytest.raises(PgpsError, match=match):
            nnunet.find_dataset(ref)
    assert nnunet.resolve_data("12") == str(tmp_path / "Dataset012_Other")
    assert nnunet.resolve_data("synthetic") == "synthetic"
    existing = tmp_path / "Dataset012_Other"
    assert nnunet.resolve_data(str(existing)) == str(existing)
    for var in nnunet.ENV_FOLDERS[1:]:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PgpsError, match=r"no nnU-Net dataset 5 and no such path \(looked in nnUNet_raw=.*, "
                                        r"nnUNet_preprocessed \(not set\), nnUNet_results \(not set\)\)"):
        nnunet.resolve_data("5")


def test_data_ids_are_found_where_nnunet_finds_them(tmp_path, monkeypatch):
    """As nnU-Net's own lookup: raw, preprocessed or results; pgps-tune's loader needs the raw folder."""
    for var in nnunet.ENV_FOLDERS:
        monkeypatch.setenv(var, str(tmp_path / var))
    (tmp_path / "nnUNet_raw").mkdir()
    (tmp_path / "nnUNet_preprocessed" / "Dataset004_Hippo").mkdir(parents=True)
    pre = str(tmp_path / "nnUNet_preprocessed" / "Dataset004_Hippo")
    assert nnunet.resolve_data("4", raw=False) == nnunet.resolve_data("Dataset004_Hippo", raw=False) == pre
    with pytest.raises(PgpsError, match=r"dataset 4 \(Dataset004_Hippo\) is in nnUNet_preprocessed but not in "
                                        r"nnUNet_raw=.*; set nnUNet_raw, or give --data the raw dataset folder"):
        nnunet.resolve_data("4")
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(PgpsError, match=r"not in nnUNet_raw \(not set\)"):
        nnunet.resolve_data("4")
    (tmp_path / "nnUNet_results" / "Dataset004_Other").mkdir(parents=True)
    with pytest.raises(PgpsError, match="dataset id 4 is Dataset004_Hippo in nnUNet_preprocessed, Dataset004_Other "
                                        "in nnUNet_results; give the full name"):
        nnunet.resolve_data("4", raw=False)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nope"))
    with pytest.raises(PgpsError, match=r"nnUNet_results=.*nope \(not a folder\)"):
        nnunet.resolve_data("7", raw=False)


def test_plan_on_nnunet_plans_shows_nnunets_dataset_whatever_its_labels(tmp_path, monkeypatch, capsys):
    """plan --nnunet-plans never runs pgps-tune's loader (which refuses regions and an ignore label) and needs
    only nnU-Net's preprocessed folder."""
    pre = tmp_path / "pre" / "Dataset004_Hippo"
    plans = current_plans()
    plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = nnunet_order((30, 50, 70), TRANSPOSE)
    write_plans(pre, plans)
    (pre / "dataset.json").write_text(json.dumps({
        "name": "Brats", "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 1,
        "labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, "regions_class_order": [1, 2]}))
    (tmp_path / "pre" / "Dataset005_Other").mkdir()
    for var in nnunet.ENV_FOLDERS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    for argv in (["plan", "--nnunet-plans", "4"], ["plan", "--data", "4", "--nnunet-plans", "4"]):
        assert main(argv) == 0
        shown = json.loads(capsys.readouterr().out)
        assert {k: shown[k] for k in ("dataset", "cases", "median_shape", "final_patch")} == {
            "dataset": "Brats", "cases": 1, "median_shape": [30, 50, 70], "final_patch": list(CANONICAL_PATCH)}
        assert "cache" not in shown and shown["nnunet"]["nnunet_patch_size"] == plans["configurations"]["3d_fullres"][
            "patch_size"]
    for argv, needle in ((["--data", "5"], "--data names Dataset005_Other but plan shows Dataset004_Hippo"),
                         (["--voxel-budget", "4096"], "nothing uses --voxel-budget; drop it")):
        assert main(["plan", "--nnunet-plans", "4", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert main(["plan"]) == 2
    assert "plan needs --data DIR" in capsys.readouterr().err


def test_a_tilde_in_nnunets_variables_is_refused(monkeypatch):
    """nnU-Net does not expand it (it would write into a folder named ~): pgps-tune must not check elsewhere."""
    monkeypatch.setenv("nnUNet_results", "~/results")
    with pytest.raises(PgpsError, match=r'nnUNet_results=~/results starts with ~, which nnU-Net does not expand; '
                                        r'export nnUNet_results="\$HOME/results"'):
        nnunet.env_folder("nnUNet_results", must_exist=False)


def test_the_cascade_needs_its_previous_stage_predictions(tmp_path, monkeypatch):
    """nnU-Net would stop inside its data loader on the first missing 3d_lowres prediction (a traceback)."""
    plans = current_plans()
    configs = plans["configurations"]
    configs["3d_lowres"] = {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                            "next_stage": "3d_cascade_fullres"}
    configs["3d_cascade_fullres"]["previous_stage"] = "3d_lowres"
    src = write_plans(tmp_path / "pre" / "Dataset004_Hippo", plans)
    (src.parent / "nnUNetPlans_3d_fullres").mkdir()
    for i in range(2):
        (src.parent / "nnUNetPlans_3d_fullres" / f"case_{i}.pkl").write_bytes(b"")
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    plan = nnunet.read_plans(src, "3d_cascade_fullres")
    trainer = f"{nnunet.TRAINER}_x"
    predicted = (tmp_path / "results" / "Dataset004_Hippo" / f"{trainer}__nnUNetPlans__3d_lowres"
                 / "predicted_next_stage" / "3d_cascade_fullres")
    predicted.mkdir(parents=True)
    (predicted / "case_0.b2nd").write_bytes(b"")
    with pytest.raises(PgpsError, match=rf"3d_cascade_fullres trains on the 3d_lowres predictions of {trainer}, and "
                                        r".* lacks 1 of 2 case\(s\) \(e.g. case_1\); first train 3d_lowres"):
        nnunet.check_previous_stage(plan, trainer)
    (predicted / "case_1.b2nd").write_bytes(b"")
    nnunet.check_previous_stage(plan, trainer)  # every case predicted
    monkeypatch.setattr(nnunet, "require_nnunet", lambda: None)
    with pytest.raises(PgpsError, match="3d_cascade_fullres is the second stage of nnU-Net's cascade: it trains on "
                                        "3d_lowres predictions that no trial has; sweep 3d_lowres"):
        nnunet.trial_plan(src, "3d_cascade_fullres")


def test_plans_by_dataset_id(tmp_path, monkeypatch):
    write_plans(tmp_path / "Dataset004_Hippo", current_plans())
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert nnunet.read_plans("4").source == tmp_path / "Dataset004_Hippo" / "nnUNetPlans.json"
    folder = tmp_path / "Dataset004_Hippo"
    assert nnunet.read_plans(folder).source.name == "nnUNetPlans.json"
    # planned with another planner only (nnUNetv2_plan_and_preprocess -pl nnUNetPlannerResEncM): the folder's
    # plans are named, by id, name or folder alike (was: 'nnUNetPlans.json does not exist; run ... first')
    (folder / "nnUNetPlans.json").rename(folder / "nnUNetResEncUNetMPlans.json")
    for ref in ("4", "Dataset004_Hippo", folder):
        with pytest.raises(PgpsError, match=r"Dataset004_Hippo holds nnUNetResEncUNetMPlans.json but no nnUNetPlans"
                                            r".json; give the plans file's path, e.g. .*nnUNetResEncUNetMPlans.json$"):
            nnunet.read_plans(ref)
    assert nnunet.read_plans(folder / "nnUNetResEncUNetMPlans.json").batch_size == 2
    (folder / "nnUNetResEncUNetMPlans.json").unlink()
    with pytest.raises(PgpsError, match=r"holds no nnU-Net plans \(\*Plans.json\); run nnUNetv2_plan_and_preprocess"):
        nnunet.read_plans("4")


# -- schedules for nnU-Net ---------------------------------------------------------------------------


@pytest.fixture
def plan(tmp_path):
    return nnunet.read_plans(write_plans(tmp_path / "pre" / "Dataset004_Hippo", current_plans()))


def test_export_writes_nnunet_order_beside_the_plans_and_reads_back(plan, tmp_path):
    s = sch.paper(plan.final_patch, plan.pools, plan.batch_size, 60, "performance")
    path = nnunet.export_for_nnunet(s, plan)
    assert path == plan.source.parent / "nnUNetTrainerPGPS__nnUNetPlans__3d_fullres.pgps_schedule.json"
    data = json.loads(path.read_text())
    cfg = current_plans()["configurations"]["3d_fullres"]
    assert data["schedule"]["final_patch"] == cfg["patch_size"]
    need = [2**p for p in stride2_per_axis(STRIDES)]
    for st in data["schedule"]["stages"]:  # every stage fits nnU-Net's network axis by axis
        assert all(p % n == 0 and p <= f for p, n, f in zip(st["patch_size"], need, cfg["patch_size"]))
    assert [st["batch_size"] for st in data["schedule"]["stages"]] == [st.batch_size for st in s.stages]
    from_file = nnunet.read_schedule(path, plan)
    s.save(tmp_path / "s.yaml")
    assert from_file == nnunet.read_schedule(tmp_path / "s.yaml", plan) == nnunet.for_nnunet(s, plan)


def test_schedules_that_do_not_fit_the_plans_are_refused(plan, tmp_path):
    other = sch.constant((16, 16, 16), (1, 1, 1), 2, 10)
    other.save(tmp_path / "other.yaml")
    with pytest.raises(PgpsError, match="build the schedule with --nnunet-plans"):
        nnunet.read_schedule(tmp_path / "other.yaml", plan)
    f = nnunet.for_nnunet(sch.constant(plan.final_patch, plan.pools, 2, 10), plan)
    replace_cfg = nnunet.NnunetSchedule(f.schedule, f.dataset, f.plans_name, "3d_lowres")
    replace_cfg.save(tmp_path / "lowres.json")
    with pytest.raises(PgpsError, match="made for Dataset004_Hippo / nnUNetPlans / 3d_lowres"):
        nnunet.read_schedule(tmp_path / "lowres.json", plan)
    bad = f.to_dict() | {"num_epochs": 0}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PgpsError, match="num_epochs must be a positive integer"):
        nnunet.read_schedule(tmp_path / "bad.json", plan)
    drawn = sch.preset("random", plan.final_patch, plan.pools, 2, 60)  # nnU-Net changes the patch per epoch only
    with pytest.raises(PgpsError, match="cannot draw it per iteration"):
        nnunet.export_for_nnunet(drawn, plan)


def test_trainer_finds_its_schedule_env_then_beside_plans_then_run_record(plan, tmp_path, monkeypatch):
    plans = json.loads(plan.source.read_text())
    fold = tmp_path / "fold_0"
    fold.mkdir()
    base = plan.source.parent

    def resolve():
        return nnunet.resolve_trainer_schedule(copy.deepcopy(plans), "3d_fullres", nnunet.TRAINER, base, fold)

    monkeypatch.delenv(nnunet.SCHEDULE_ENV, raising=False)
    with pytest.raises(PgpsError, match="found no schedule: set PGPS_TUNE_SCHEDULE=FILE"):
        resolve()
    record = nnunet.for_nnunet(sch.constant(plan.final_patch, plan.pools, 2, 7), plan)
    record.save(fold / nnunet.RUN_RECORD)
    assert resolve() == record
    beside = sch.paper(plan.final_patch, plan.pools, 2, 30)
    nnunet.export_for_nnunet(beside, plan)
    assert resolve().schedule == nnunet.for_nnunet(beside, plan).schedule
    named = sch.paper(plan.final_patch, plan.pools, 2, 40, "performance")
    named.save(tmp_path / "named.yaml")
    monkeypatch.setenv(nnunet.SCHEDULE_ENV, str(tmp_path / "named.yaml"))
    assert resolve().schedule == nnunet.for_nnunet(named, plan).schedule
    monkeypatch.setenv(nnunet.SCHEDULE_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(PgpsError, match="missing.yaml does not exist"):
        resolve()


def test_fit_epochs_maps_the_schedule_onto_nnunets_epochs(plan):
    s = sch.paper(plan.final_patch, plan.pools, 2, 100)
    assert nnunet.fit_epochs(s, 100) is s
    assert nnunet.fit_epochs(s, 1000).epochs == 1000
    with pytest.raises(PgpsError, match="stages but nnU-Net trains 3 epochs"):
        nnunet.fit_epochs(s, 3)


def test_trainer_names():
    for good in ("nnUNetTrainerPGPS", "nnUNetTrainerPGPS_tuned", "nnUNetTrainerPGPS_paper_2"):
        nnunet.check_trainer_name(good)
    for bad in ("nnUNetTrainer", "nnUNetTrainerPGPSx", "nnUNetTrainerPGPS_", "nnUNetTrainerPGPS__a",
                "x nnUNetTrainerPGPS"):
        with pytest.raises(PgpsError, match="must be nnUNetTrainerPGPS or"):
            nnunet.check_trainer_name(bad)


def test_a_different_schedule_beside_the_plans_is_not_replaced(plan):
    first = sch.paper(plan.final_patch, plan.pools, 2, 30)
    path = nnunet.export_for_nnunet(first, plan)
    before = path.read_bytes()
    assert nnunet.export_for_nnunet(first, plan) == path  # the same schedule again: fine
    other = sch.constant(plan.final_patch, plan.pools, 2, 30)
    with pytest.raises(PgpsError, match=r"already holds another schedule .* --trainer nnUNetTrainerPGPS_SUFFIX"):
        nnunet.export_for_nnunet(other, plan)
    assert path.read_bytes() == before
    from dataclasses import replace

    noted = replace(first, meta={"note": "after confirm"})  # trains the same: its notes are updated
    assert nnunet.export_for_nnunet(noted, plan) == path
    assert json.loads(path.read_text())["schedule"]["meta"] == {"note": "after confirm"}
    named = nnunet.export_for_nnunet(other, plan, "nnUNetTrainerPGPS_const")
    assert named != path and nnunet.read_schedule(named, plan).schedule == nnunet.for_nnunet(other, plan).schedule


def test_counts_beside_the_plans_compare_by_what_nnunet_trains(plan):
    from dataclasses import replace

    s30 = sch.paper(plan.final_patch, plan.pools, 2, 30)
    path = nnunet.for_nnunet(s30, plan).save(nnunet.schedule_file_for(plan))  # null counts: as export wrote before
    before = path.read_bytes()
    defaults = {"num_epochs": 1000, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50}
    assert nnunet.export_for_nnunet(s30, plan, **defaults) == path  # null trains nnU-Net's defaults: the same
    assert nnunet.trained_counts(nnunet.read_schedule(path, plan)) == (1000, 250, 50)
    path.write_bytes(before)
    with pytest.raises(PgpsError, match=r"this schedule with other counts \(epochs 1000 \(null: nnU-Net default\) -> "
                                        r"30, iterations per epoch 250 \(null: nnU-Net default\) -> 12\), which .*; "
                                        "give --epochs 1000 --iterations-per-epoch 250 to keep them"):
        nnunet.export_for_nnunet(s30, plan, num_epochs=30, num_iterations_per_epoch=12)
    # the same stages confirmed at 60 epochs: this schedule at other counts, not another schedule
    s60 = sch.paper(plan.final_patch, plan.pools, 2, 60)
    with pytest.raises(PgpsError, match=r"this schedule with other counts \(epochs 1000 .* -> 60\).* give --epochs "
                                        "1000 to keep them"):
        nnunet.export_for_nnunet(s60, plan, num_epochs=60)
    first = s30.stages[0]
    longer = replace(s30, stages=(sch.Stage(first.patch_size, first.batch_size, 9), *s30.stages[1:]))
    with pytest.raises(PgpsError, match="already holds these stages with other stage lengths, which"):
        nnunet.export_for_nnunet(longer, plan)
    assert path.read_bytes() == before


def test_a_file_beside_the_plans_that_nnunet_would_refuse_is_named_so(plan):
    s = sch.paper(plan.final_patch, plan.pools, 2, 30)
    path = nnunet.schedule_file_for(plan)
    stale = nnunet.for_nnunet(s, plan).to_dict()
    stale["schedule"] = sch.paper((20, 48, 128), plan.pools, 2, 30).to_dict()  # exported before a new plan
    odd = nnunet.for_nnunet(s, plan).to_dict()  # for a network that pooled less (other strides, same patch)
    odd["schedule"]["pools"] = [1, 1, 1]
    odd["schedule"]["stages"][0]["patch_size"] = [20, 12, 12]
    refuses = r"is there but nnU-Net's -tr nnUNetTrainerPGPS refuses it \("
    for text, needle in ((json.dumps(stale), r"final patch \[20, 48, 128\] differs from the plans' \[20, 64, 48\]"),
                         (json.dumps(odd), r"stage 0 patch \(for the network in .*\) [0-9x]+ is not divisible"),
                         ('{"format": "pgps-tune-nnunet"', "")):
        path.write_text(text)
        with pytest.raises(PgpsError, match=refuses + needle + ".*; move it away, then export again"):
            nnunet.export_for_nnunet(s, plan)
        assert path.read_text() == text
        if needle:  # nnU-Net's trainer reads it alike
            with pytest.raises(PgpsError, match=needle):
                nnunet.read_schedule(path, plan)


@pytest.mark.parametrize("given, name", [("0", "0"), ("00", "0"), ("01", "1"), ("+1", "1"), (" 1", "1"), (4, "4"),
                                         ("all", "all"), (" all ", "all")])
def test_every_spelling_of_a_fold_is_nnunets_folder(plan, tmp_path, monkeypatch, given, name):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    assert nnunet.fold_name(given, 5) == name
    assert nnunet.run_folder(plan, given).name == f"fold_{name}"


def test_folds_outside_the_split_are_refused(tmp_path):
    for bad in ("-1", "x", "1.5", "1_0", "", "٣"):
        with pytest.raises(PgpsError, match="fold must be a whole number"):
            nnunet.fold_name(bad)
    assert nnunet.dataset_folds(tmp_path) == 5  # nnU-Net's split before it has written splits_final.json
    with pytest.raises(PgpsError, match=r"fold 5 is not one of the dataset's 5 folds \(0-4; nnU-Net would train it "
                                        "on a random 80:20 split"):
        nnunet.fold_name("05", nnunet.dataset_folds(tmp_path))
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 3))
    assert nnunet.dataset_folds(tmp_path) == 3
    with pytest.raises(PgpsError, match="fold 3 is not one of the dataset's 3 folds"):
        nnunet.fold_name(3, nnunet.dataset_folds(tmp_path))
    (tmp_path / "splits_final.json").write_text("{}")
    with pytest.raises(PgpsError, match="is not nnU-Net's list of folds"):
        nnunet.dataset_folds(tmp_path)


# -- the CLI (no nnunetv2) -------------------------------------------------------------------------


def _finished_sweep(root: Path, dataset: str, data: str) -> Path:
    """A finished sweep's description (what export reads first); tuner.export itself is faked in the tests."""
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({
        "format_version": 2, "sweep": root.name, "space": "s.yaml", "dataset": dataset, "data": data,
        "storage": None, "storage_path": str(root / "ray"), "experiments": {"search": "x-search"},
        "objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "finished": True,
        "asha": {"time_attr": "epoch", "max_t": 10, "grace_period": 2, "reduction_factor": 2, "brackets": 1}}))
    return root


@pytest.fixture
def fake_export(monkeypatch):
    """tuner.export writing ``best[0]`` as the sweep's best_schedule.yaml (and the summary print left out)."""
    import pgps_tune.cli as cli
    import pgps_tune.tuner as tuner

    best: list[sch.Schedule] = []

    def export(experiment, out, results_store=None, pick=None):
        Path(out).mkdir(parents=True, exist_ok=True)
        best[0].save(Path(out) / "best_schedule.yaml")
        return {}

    monkeypatch.setattr(tuner, "export", export)
    monkeypatch.setattr(cli, "_print_summary", lambda *a, **k: None)
    return best


def test_cli_export_nnunet_refuses_before_writing_anything(plan, tmp_path, fake_export, capsys):
    beside = nnunet.schedule_file_for(plan)
    fits = sch.paper(plan.final_patch, plan.pools, 2, 30)
    fake_export.append(fits)
    out = tmp_path / "exp"
    synthetic = _finished_sweep(tmp_path / "syn", "synthetic", "synthetic")
    base = ["export", "--out", str(out), "--nnunet", str(plan.source)]

    def refused(argv: list[str], needle: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not out.exists() and not beside.exists()

    refused([*base, "--experiment", str(synthetic)],
            "searched synthetic (synthetic), not Dataset004_Hippo of")
    fake_export[0] = sch.constant((16, 16, 16), (1, 1, 1), 2, 4)  # another final patch: the synthetic sweep's
    refused([*base, "--experiment", str(synthetic), "--other-dataset"], "run the sweep with --nnunet-plans")
    hippo = _finished_sweep(tmp_path / "hippo", "Hippocampus", str(tmp_path / "raw" / "Dataset004_Hippo"))
    refused([*base, "--experiment", str(hippo)], "run the sweep with --nnunet-plans")
    fake_export[0] = fits
    assert main([*base, "--experiment", str(hippo)]) == 0
    assert nnunet.read_schedule(beside, plan) == nnunet.for_nnunet(fits, plan)
    assert f"nnU-Net schedule: {beside}" in capsys.readouterr().out
    # a different schedule is not written over the one nnUNetv2_train -tr nnUNetTrainerPGPS reads, nor --out redone
    written, best_before = beside.read_bytes(), (out / "best_schedule.yaml").read_bytes()
    fake_export[0] = sch.constant(plan.final_patch, plan.pools, 2, 30)
    assert main([*base, "--experiment", str(hippo)]) == 2
    assert "already holds another schedule" in capsys.readouterr().err
    assert beside.read_bytes() == written and (out / "best_schedule.yaml").read_bytes() == best_before
    assert main([*base, "--experiment", str(hippo), "--trainer", "nnUNetTrainerPGPS_const"]) == 0
    assert nnunet.schedule_file_for(plan, "nnUNetTrainerPGPS_const").is_file()


def test_export_for_a_configuration_of_another_patch_names_those_the_schedule_fits(tmp_path, fake_export, capsys):
    plans = current_plans()
    configs = plans["configurations"]
    configs["3d_lowres"] = {"inherits_from": "3d_fullres", "patch_size": [10, 32, 24]}
    configs["3d_cascade_fullres"]["previous_stage"] = "3d_lowres"
    plan = nnunet.read_plans(write_plans(tmp_path / "pre" / "Dataset004_Hippo", plans))
    fake_export.append(sch.paper(plan.final_patch, plan.pools, 2, 30))  # a sweep on 3d_fullres
    hippo = _finished_sweep(tmp_path / "hippo", "Hippocampus", str(tmp_path / "raw" / "Dataset004_Hippo"))
    assert main(["export", "--experiment", str(hippo), "--out", str(tmp_path / "exp"), "--nnunet", str(plan.source),
                 "--configuration", "3d_lowres"]) == 2
    err = capsys.readouterr().err
    assert ("(3d_lowres) trains 10x24x32 (x y z; nnU-Net order [10, 32, 24]); it fits 3d_fullres and "
            "3d_cascade_fullres of these plans: give --configuration 3d_fullres, or run a sweep with --nnunet-plans"
            ) in err, err
    assert err.count("\n") == 1 and not (tmp_path / "exp").exists()
    assert [p.name for p in plan.source.parent.glob("*.pgps_schedule.json")] == []


def test_export_of_an_nnunet_sweep_for_another_configurations_data_is_refused(tmp_path, fake_export, capsys):
    """3d_lowres and 3d_fullres of one patch and network: a schedule scored on the coarser data was not measured
    at 3d_fullres's spacing, so exporting it there needs --other-configuration; the same data passes."""
    plans = current_plans()
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "spacing": [6.0, 1.6, 1.4],
                                            "data_identifier": "nnUNetPlans_3d_lowres"}
    plan = nnunet.read_plans(write_plans(tmp_path / "pre" / "Dataset004_Hippo", plans))
    fake_export.append(sch.paper(plan.final_patch, plan.pools, 2, 30))
    hippo = _finished_sweep(tmp_path / "hippo", "Dataset004_Hippo", str(tmp_path / "pre" / "Dataset004_Hippo"))
    meta = json.loads((hippo / "sweep.json").read_text())
    meta["nnunet"] = {"plans": str(plan.source), "configuration": "3d_lowres", "fold": 0, "dataset": plan.dataset}
    (hippo / "sweep.json").write_text(json.dumps(meta))
    base = ["export", "--experiment", str(hippo), "--out", str(tmp_path / "exp"), "--nnunet", str(plan.source)]
    assert main([*base, "--configuration", "3d_fullres"]) == 2
    err = capsys.readouterr().err
    assert ("its trials trained nnU-Net's 3d_lowres data (spacing 6x1.4x1.6, x y z), not 3d_fullres's (spacing "
            "3x0.7x0.8), so its schedule was not measured for 3d_fullres; give --configuration 3d_lowres, run a sweep "
            f"with --nnunet-plans {plan.source} --configuration 3d_fullres, or add --other-configuration") in err, err
    assert err.count("\n") == 1 and not (tmp_path / "exp").exists()
    assert [p.name for p in plan.source.parent.glob("*.pgps_schedule.json")] == []
    assert main([*base, "--configuration", "3d_lowres"]) == 0
    assert main([*base, "--configuration", "3d_fullres", "--other-configuration"]) == 0
    assert nnunet.schedule_file_for(plan).is_file()
    meta["nnunet"]["configuration"] = "3d_fullres"  # 3d_cascade_fullres trains the same data at the same spacing
    (hippo / "sweep.json").write_text(json.dumps(meta))
    assert main([*base, "--configuration", "3d_cascade_fullres"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["export", "--experiment", str(hippo), "--out", str(tmp_path / "plain"), "--other-configuration"]) == 2
    assert "--other-configuration goes with --nnunet PLANS" in capsys.readouterr().err


def test_a_sweep_of_pgps_tunes_trainer_on_nnunet_plans_records_them_for_export(tmp_path, tiny_msd, fake_export,
                                                                                monkeypatch, capsys):
    """tune --nnunet-plans --configuration 3d_lowres with pgps-tune's own trainer keeps the plans in sweep.json, so
    export --nnunet compares them as for budget.trainer nnunet (the patch alone would pass 3d_fullres here)."""
    import contextlib

    import yaml

    from pgps_tune import tuner

    plans = current_plans()
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "spacing": [6.0, 1.6, 1.4],
                                            "data_identifier": "nnUNetPlans_3d_lowres"}
    plan = nnunet.read_plans(write_plans(tmp_path / "pre" / "Dataset004_Hippo", plans))

    def reached(*args, **kwargs):
        raise PgpsError("Ray reached")

    monkeypatch.setattr(tuner, "_ray_session", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(tuner, "_phases", reached)  # sweep.json is written before the phases start
    monkeypatch.setattr(tuner, "_check_reference_memory", lambda *a, **k: None)  # MONAI's network: not this test's
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"parameters": {"stages": {"type": "int", "low": 1, "high": 2},
                                                    "growth": {"value": 2.0}},
                                     "search": {"algorithm": "random", "num_samples": 1, "references": False},
                                     "confirm": {"enabled": False}, "budget": {"epochs": 30}}))
    out = tmp_path / "lowres"
    assert main(["tune", "--space", str(space), "--data", str(tiny_msd), "--out", str(out), "--quiet", "--cache-dir",
                 str(tmp_path / "cache"), "--nnunet-plans", str(plan.source), "--configuration", "3d_lowres"]) == 2
    assert "Ray reached" in capsys.readouterr().err
    tuned = json.loads((out / "sweep.json").read_text())["nnunet"]
    assert (tuned["plans"], tuned["configuration"], tuned["trainer"]) == (str(plan.source), "3d_lowres", "pgps_tune")
    assert tuned["spacing"] == [6.0, 1.4, 1.6] and tuned["network"] == "PlainConvUNet" and "fold" not in tuned
    fake_export.append(sch.paper(plan.final_patch, plan.pools, 2, 30))
    hippo = _finished_sweep(tmp_path / "hippo", "Hippocampus", str(tmp_path / "raw" / "Dataset004_Hippo"))
    meta = json.loads((hippo / "sweep.json").read_text())
    meta["final_patch"] = list(plan.final_patch)
    (hippo / "sweep.json").write_text(json.dumps({**meta, "nnunet": tuned}))
    base = ["export", "--experiment", str(hippo), "--out", str(tmp_path / "exp"), "--nnunet", str(plan.source)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert (f"{hippo}: it was tuned for nnU-Net's 3d_lowres (spacing 6x1.4x1.6, x y z), not 3d_fullres (spacing "
            "3x0.7x0.8), so its schedule was not measured for 3d_fullres; give --configuration 3d_lowres, run a sweep "
            f"with --nnunet-plans {plan.source} --configuration 3d_fullres, or add --other-configuration") in err, err
    assert err.count("\n") == 1 and not (tmp_path / "exp").exists()
    assert main([*base, "--configuration", "3d_lowres"]) == 0
    assert main([*base, "--other-configuration"]) == 0 and "note" not in capsys.readouterr().err
    # the plans' dataset is not what pgps-tune's trainer read: a sweep of another --data stays another dataset
    (hippo / "sweep.json").write_text(json.dumps({**meta, "dataset": "synthetic", "data": "synthetic",
                                                  "nnunet": tuned}))
    assert main([*base, "--configuration", "3d_lowres"]) == 2
    assert "searched synthetic (synthetic), not Dataset004_Hippo" in capsys.readouterr().err


def test_export_to_other_plans_of_the_dataset_compares_the_data_they_train(tmp_path, fake_export, capsys):
    """Other plans of the same data (nnUNetResEncUNetMPlans' 3d_fullres shares nnUNetPlans'): exported with a note
    naming what else differs; plans of another spacing or normalisation, or these plans planned again since at
    another spacing, are refused in one line unless --other-configuration."""
    folder = tmp_path / "pre" / "Dataset004_Hippo"
    plans = current_plans()
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    plan = nnunet.read_plans(write_plans(folder, plans))
    fake_export.append(sch.paper(plan.final_patch, plan.pools, 2, 30))
    hippo = _finished_sweep(tmp_path / "hippo", "Dataset004_Hippo", str(folder))
    meta = json.loads((hippo / "sweep.json").read_text())
    meta.update(final_patch=list(plan.final_patch), pools=list(plan.pools))
    (hippo / "sweep.json").write_text(json.dumps({**meta, "nnunet": {**nnunet.tuned_on(plan, "nnunet"), "fold": 0}}))

    def other(name: str, **cfg) -> Path:
        changed = copy.deepcopy(plans)
        changed["plans_name"] = name
        changed["configurations"]["3d_fullres"].update(cfg)
        (folder / f"{name}.json").write_text(json.dumps(changed))
        return folder / f"{name}.json"

    def export(plans_file: Path, *extra: str) -> tuple[int, str]:
        rc = main(["export", "--experiment", str(hippo), "--out", str(tmp_path / "exp"), "--nnunet", str(plans_file),
                   "--trainer", f"nnUNetTrainerPGPS_{plans_file.stem}", *extra])
        return rc, capsys.readouterr().err

    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {"strides": STRIDES}}
    rc, err = export(other("nnUNetResEncUNetMPlans", architecture=arch, batch_size=3))
    assert rc == 0 and err.strip() == (
        f"export: note: {hippo} was tuned on 3d_fullres of nnUNetPlans; 3d_fullres of nnUNetResEncUNetMPlans trains "
        "the same data (spacing 3x0.7x0.8, x y z), but its network is ResidualEncoderUNet, not PlainConvUNet and its "
        "batch size is 3, not 2"), err
    rc, err = export(other("nnUNetPlansShallow", architecture={"arch_kwargs": {"strides": STRIDES[:3]}}))
    assert rc == 0 and err.strip().endswith(", but its poolings per axis are 1x2x2, not 1x3x3 (x y z)"), err
    coarser = other("nnUNetPlansCoarse", spacing=[4.0, 1.0, 1.0])
    rc, err = export(coarser)
    assert rc == 2 and err.count("\n") == 1 and (
        f"{hippo}: its trials trained nnU-Net's 3d_fullres data of nnUNetPlans (spacing 3x0.7x0.8, x y z), not the "
        "data of 3d_fullres of nnUNetPlansCoarse (spacing 4x1x1), so its schedule was not measured for 3d_fullres of "
        f"nnUNetPlansCoarse; give --nnunet {plan.source} --configuration 3d_fullres, run a sweep with --nnunet-plans "
        f"{coarser} --configuration 3d_fullres, or add --other-configuration") in err, err
    assert export(coarser, "--other-configuration")[0] == 0
    rc, err = export(other("nnUNetPlansCT", normalization_schemes=["CTNormalization"]))
    assert rc == 2 and "(spacing 3x0.7x0.8, x y z, normalisation ZScoreNormalization), not the data of 3d_fullres " \
                       "of nnUNetPlansCT (spacing 3x0.7x0.8, normalisation CTNormalization)" in err, err
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 0.8, 0.7]  # nnUNetPlans planned again since the sweep
    write_plans(folder, plans)
    rc, err = export(plan.source)
    assert rc == 2 and ("its trials trained nnU-Net's 3d_fullres data (spacing 3x0.7x0.8, x y z), not the data "
                        f"{plan.source} plans for 3d_fullres now (spacing 2x0.7x0.8), so its schedule was not measured "
                        f"for 3d_fullres; run a sweep with --nnunet-plans {plan.source}") in err, err
    assert sorted(p.name for p in folder.glob("*.pgps_schedule.json")) == [
        "nnUNetTrainerPGPS_nnUNetPlansCoarse__nnUNetPlansCoarse__3d_fullres.pgps_schedule.json",
        "nnUNetTrainerPGPS_nnUNetPlansShallow__nnUNetPlansShallow__3d_fullres.pgps_schedule.json",
        "nnUNetTrainerPGPS_nnUNetResEncUNetMPlans__nnUNetResEncUNetMPlans__3d_fullres.pgps_schedule.json"]


def test_a_schedule_exported_from_a_sweep_on_other_data_is_compared_before_nnunet_train(tmp_path, capsys):
    """best_schedule.yaml keeps the plans its sweep was tuned on (sweep.json's nnunet), and nnunet-train compares them
    with the configuration it trains as export --nnunet does: a schedule tuned on 3d_lowres was trained at 3d_fullres
    without a word.  Refused in one line unless --other-configuration; the same data of other plans gets a note."""
    from pgps_tune.results import TrialRecord, export_sweep

    folder = tmp_path / "pre" / "Dataset004_Hippo"
    plans = current_plans()
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "spacing": [6.0, 1.6, 1.4],
                                            "data_identifier": "nnUNetPlans_3d_lowres"}
    full = nnunet.read_plans(write_plans(folder, plans))
    low = nnunet.read_plans(full.source, "3d_lowres")
    s = sch.paper(full.final_patch, full.pools, 2, 30)
    out = tmp_path / "sweep"
    meta = sweep_meta(out, "lowres", dataset="Dataset004_Hippo", final_patch=list(full.final_patch),
                      pools=list(full.pools), nnunet={**nnunet.tuned_on(low, "nnunet"), "fold": 0})
    export_sweep(out, meta, [TrialRecord("t1", "TERMINATED", {"stages": 9}, {
        "val_dice": 0.8, "score": 0.8, "completed": True, "schedule": json.dumps(s.to_dict()), "epoch": 30,
        "schedule_voxel_fraction": s.voxel_fraction()})], tmp_path / "store")
    best = out / "best_schedule.yaml"
    assert sch.load(best).meta["nnunet"]["configuration"] == "3d_lowres"
    with pytest.raises(PgpsError) as refused:
        nnunet.check_tuned_schedule(best, full)
    assert str(refused.value) == (
        f"{best}: its trials trained nnU-Net's 3d_lowres data (spacing 6x1.4x1.6, x y z), not 3d_fullres's (spacing "
        "3x0.7x0.8), so its schedule was not measured for 3d_fullres; train 3d_lowres instead, run a sweep with "
        f"--nnunet-plans {full.source} --configuration 3d_fullres, or add --other-configuration to train it for "
        "3d_fullres anyway")
    assert nnunet.check_tuned_schedule(best, low) is None
    from_store = results.best_schedule("Dataset004_Hippo", tmp_path / "store").save(tmp_path / "stored.yaml")
    with pytest.raises(PgpsError, match="its trials trained nnU-Net's 3d_lowres data"):  # 'best' writes it too
        nnunet.check_tuned_schedule(from_store, full)
    # the same data under other plans: a note naming what else differs; of other plans' data: their name to give
    resenc = copy.deepcopy(plans)
    resenc["plans_name"] = "nnUNetResEncUNetMPlans"
    resenc["configurations"]["3d_fullres"]["batch_size"] = 3
    (folder / "nnUNetResEncUNetMPlans.json").write_text(json.dumps(resenc))
    s_full = sch.Schedule.from_dict({**s.to_dict(), "meta": {**sch.load(best).meta,
                                                             "nnunet": nnunet.tuned_on(full, "nnunet")}})
    s_full.save(tmp_path / "full.yaml")
    note = nnunet.check_tuned_schedule(tmp_path / "full.yaml",
                                       nnunet.read_plans(folder / "nnUNetResEncUNetMPlans.json"))
    assert note == (f"pgps-tune: note: {tmp_path / 'full.yaml'} was tuned on 3d_fullres of nnUNetPlans; 3d_fullres of "
                    "nnUNetResEncUNetMPlans trains the same data (spacing 3x0.7x0.8, x y z), but its batch size is 3, "
                    "not 2")
    resenc["configurations"]["3d_fullres"]["spacing"] = [4.0, 1.0, 1.0]
    (folder / "nnUNetResEncUNetMPlans.json").write_text(json.dumps(resenc))
    with pytest.raises(PgpsError, match="; train 3d_fullres with --plans nnUNetPlans instead, run a sweep"):
        nnunet.check_tuned_schedule(tmp_path / "full.yaml", nnunet.read_plans(folder / "nnUNetResEncUNetMPlans.json"))
    # not compared: a schedule without the record (as before), one of another dataset, nnU-Net's own schedule file
    # (export --nnunet compared it, --other-configuration included, and it names its plans)
    sch.Schedule.from_dict({**s.to_dict(), "meta": {}}).save(tmp_path / "plain.yaml")
    assert nnunet.check_tuned_schedule(tmp_path / "plain.yaml", full) is None
    sch.Schedule.from_dict({**s.to_dict(), "meta": {**sch.load(best).meta, "dataset": "synthetic", "nnunet": {
        **nnunet.tuned_on(low, "pgps_tune")}}}).save(tmp_path / "synthetic.yaml")
    assert nnunet.check_tuned_schedule(tmp_path / "synthetic.yaml", full) is None
    # pgps-tune's trainer on nnUNet_raw's folder names the dataset by its dataset.json: its recipe's folder tells
    recipe = {"version": 1, "train": {}, "data": {"dataset": "Hippocampus", "val_fraction": 0.2, "split_seed": 0,
                                                  "source": str(tmp_path / "raw" / "Dataset004_Hippo")}}
    sch.Schedule.from_dict({**s.to_dict(), "recipe": recipe, "meta": {"dataset": "Hippocampus", "nnunet": {
        **nnunet.tuned_on(low, "pgps_tune")}}}).save(tmp_path / "named.yaml")
    with pytest.raises(PgpsError, match="named.yaml: it was tuned for nnU-Net's 3d_lowres"):
        nnunet.check_tuned_schedule(tmp_path / "named.yaml", full)
    assert nnunet.check_tuned_schedule(nnunet.for_nnunet(sch.load(best), full).save(tmp_path / "nn.json"), full) is None
    assert capsys.readouterr().err == ""


def test_cli_export_nnunet_writes_the_counts_nnunet_trains_and_says_them(plan, tmp_path, fake_export, capsys):
    beside = nnunet.schedule_file_for(plan)
    fake_export.append(sch.paper(plan.final_patch, plan.pools, 2, 30))  # 9 stages at 30 epochs
    stages = len(fake_export[0].stages)
    hippo = _finished_sweep(tmp_path / "hippo", "Hippocampus", str(tmp_path / "raw" / "Dataset004_Hippo"))
    base = ["export", "--experiment", str(hippo), "--out", str(tmp_path / "exp"), "--nnunet", str(plan.source)]

    def run(*extra: str) -> tuple[int, str, str]:
        rc = main([*base, *extra])
        out, err = capsys.readouterr()
        return rc, out, err

    def counts() -> list:
        data = json.loads(beside.read_text())
        return [data[k] for k in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")]

    rc, _, err = run("--epochs", str(stages - 1))
    assert rc == 2 and f"give --epochs {stages} or more" in err and err.count("\n") == 1, err
    assert not beside.exists() and not (tmp_path / "exp").exists()
    rc, out, _ = run()  # a sweep of pgps-tune's trainer: nnU-Net's own counts, said as such
    assert rc == 0 and counts() == [None, None, None]
    assert ("nnU-Net trains 1000 epochs x 250 iterations, 50 validation iterations per epoch (epochs, iterations, "
            "validation iterations: nnU-Net's default") in out
    rc, _, err = run("--epochs", "40")  # other counts are another training: not written over what -tr trains
    assert rc == 2 and "with other counts (epochs 1000 (null: nnU-Net default) -> 40)" in err, err
    assert counts() == [None, None, None]
    rc, out, _ = run("--epochs", "1000", "--iterations-per-epoch", "250")  # nnU-Net's defaults spelled out: the same
    assert rc == 0 and counts() == [1000, 250, None] and "epochs: --epochs; iterations: --iterations-per-epoch" in out
    rc, out, _ = run("--epochs", "40", "--iterations-per-epoch", "20", "--val-iterations-per-epoch", "5",
                     "--trainer", "nnUNetTrainerPGPS_short")
    short = nnunet.read_schedule(nnunet.schedule_file_for(plan, "nnUNetTrainerPGPS_short"), plan)
    assert rc == 0 and nnunet.trained_counts(short) == (40, 20, 5) and "nnU-Net trains 40 epochs x 20 iterations" in out
    # a sweep whose trials were nnU-Net trainings: by default nnU-Net trains what the winner was scored at
    meta = json.loads((hippo / "sweep.json").read_text())
    meta["trial_setup"] = trial_setup(hippo, trainer="nnunet", epochs=30, iterations_per_epoch=12,
                                      nnunet_val_iterations=3)
    (hippo / "sweep.json").write_text(json.dumps(meta))
    rc, out, err = run("--trainer", "nnUNetTrainerPGPS_tuned")
    assert rc == 0, err
    tuned = nnunet.read_schedule(nnunet.schedule_file_for(plan, "nnUNetTrainerPGPS_tuned"), plan)
    assert rc == 0 and nnunet.trained_counts(tuned) == (30, 12, 3), out
    assert "as the sweep's nnU-Net trials trained" in out
    # flags that only --nnunet uses are refused without it
    rc = main(["export", "--experiment", str(hippo), "--out", str(tmp_path / "plain"), "--epochs", "40"])
    err = capsys.readouterr().err
    assert rc == 2 and "--epochs goes with --nnunet PLANS" in err and not (tmp_path / "plain").exists(), err


def test_an_nnunet_schedule_file_is_named_as_such_where_a_schedule_is_expected(plan, tmp_path, capsys):
    path = nnunet.export_for_nnunet(sch.paper(plan.final_patch, plan.pools, 2, 30), plan)
    for argv in (["schedule", "--from", str(path)],
                 ["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--schedule", str(path)],
                 ["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--schedule", str(path),
                  "--nnunet-plans", str(plan.source)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{path} is an nnU-Net schedule file (nnU-Net's axis order" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(PgpsError, match="is an nnU-Net schedule file"):  # the Python API (README) too
        sch.load(path)


def test_cli_schedule_on_nnunet_plans(plan, capsys):
    assert main(["schedule", "--nnunet-plans", str(plan.source), "--preset", "paper", "--epochs", "40",
                 "--format", "json"]) == 0
    s = sch.Schedule.from_dict(json.loads(capsys.readouterr().out))
    assert (s.final_patch, s.pools, s.baseline_batch_size) == (plan.final_patch, plan.pools, plan.batch_size)
    assert s == sch.paper(plan.final_patch, plan.pools, plan.batch_size, 40)
    # --batch-size 2, the flag's default, is refused too: it is not what the plans' batch would give
    for extra in (["--final-patch", "8", "8", "8"], ["--batch-size", "5"], ["--batch-size", "2"]):
        assert main(["schedule", "--nnunet-plans", str(plan.source), *extra]) == 2
        err = capsys.readouterr().err
        assert "--nnunet-plans sets the final patch, pools and batch size; drop --" in err and err.count("\n") == 1


def test_cli_refuses_a_schedule_file_that_misses_the_plans(plan, tmp_path, capsys):
    sch.constant((16, 16, 16), (1, 1, 1), 2, 4).save(tmp_path / "s.yaml")
    s_yaml = str(tmp_path / "s.yaml")
    for argv in (["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--schedule", s_yaml],
                 ["schedule", "--from", s_yaml]):
        assert main([*argv, "--nnunet-plans", str(plan.source)]) == 2
        assert "build the schedule with --nnunet-plans" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_on_the_plans_draws_random_sampling_and_names_the_configuration_a_schedule_fits(tmp_path, capsys):
    """pgps-tune's trainer draws a random-sampling schedule per iteration (a family a sweep on the plans may pick),
    but 'train --nnunet-plans' refused it as nnU-Net's trainer would; a schedule of another configuration's patch
    (the best of a sweep on 3d_lowres) now names the configurations it fits, as export --nnunet does."""
    plans = current_plans()
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "patch_size": [10, 32, 24]}
    source = str(write_plans(tmp_path / "pre" / "Dataset004_Hippo", plans))
    low = nnunet.read_plans(source, "3d_lowres")
    sch.preset("random", low.final_patch, low.pools, 2, 30).save(tmp_path / "drawn.yaml")
    assert main(["schedule", "--from", str(tmp_path / "drawn.yaml"), "--nnunet-plans", source,
                 "--configuration", "3d_lowres"]) == 0
    assert "draws its stage at random" in capsys.readouterr().out
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--schedule",
                 str(tmp_path / "drawn.yaml"), "--nnunet-plans", source]) == 2
    err = capsys.readouterr().err
    assert err.endswith("it fits 3d_lowres of these plans: give --configuration 3d_lowres, or build the schedule "
                        "with --nnunet-plans\n") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_sweeps_train_on_the_plans(plan):
    from pgps_tune import space as sp

    space = nnunet.plan_space(sp.load(Path(__file__).parents[1] / "search_spaces" / "default.yaml"), plan)
    assert (space.budget.final_patch, space.budget.pools, space.budget.batch_size) == (
        plan.final_patch, plan.pools, plan.batch_size)
    sp.check_space_against_plan(space, plan.final_patch, plan.pools)


def test_an_old_or_incomplete_nnunetv2_is_named_with_its_version(monkeypatch, capsys):
    import importlib.metadata
    import types

    monkeypatch.setitem(sys.modules, "nnunetv2", types.ModuleType("nnunetv2"))  # importable, with no submodules
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.1")
    with pytest.raises(PgpsError, match=r"nnU-Net v2 >= 2.8 is needed, found nnunetv2 2.5.1; pip install "
                                        r"'pgps-tune\[nnunet\]'"):
        nnunet.require_nnunet()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.8.1")
    for module in [m for m in sys.modules if m.startswith("nnunetv2.")]:
        monkeypatch.delitem(sys.modules, module)
    assert main(["nnunet-train", "4", "3d_fullres", "0"]) == 2
    err = capsys.readouterr().err
    assert "the nnunetv2 found (2.8.1) is incomplete or incompatible (ModuleNotFoundError" in err
    assert "pip install 'pgps-tune[nnunet]'" in err and err.count("\n") == 1


def test_without_nnunetv2_the_bridge_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 now raises ImportError
    with pytest.raises(PgpsError, match=r"pip install 'pgps-tune\[nnunet\]'"):
        nnunet.require_nnunet()
    assert main(["nnunet-train", "4", "3d_fullres", "0"]) == 2
    assert "pip install 'pgps-tune[nnunet]'" in capsys.readouterr().err


# -- inside nnU-Net (needs nnunetv2) ---------------------------------------------------------------

DATASET = "Dataset990_PgpsTiny"


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory):
    """A tiny dataset in nnU-Net's raw layout (5 cases of 24^3, two foreground labels), planned and
    preprocessed by nnU-Net's own API for 3d_fullres."""
    if not HAS_NNUNET:
        pytest.skip("nnunetv2 not installed (pip install 'pgps-tune[nnunet]')")
    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw" / DATASET
    for i in range(5):
        image, label = blob_case((24, 24, 24), i)
        for sub, name, arr, dtype in (("imagesTr", f"case_{i:03d}_0000", image, np.float32),
                                      ("labelsTr", f"case_{i:03d}", label, np.uint8)):
            (raw / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr.astype(dtype), np.eye(4)), raw / sub / f"{name}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 5,
        "file_ending": ".nii.gz"}))
    env = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "pre", "nnUNet_results": root / "results",
           "nnUNet_def_n_proc": 1, "nnUNet_n_proc_DA": 1, "nnUNet_compile": "false"}
    # nnU-Net's planning runs multiprocessing pools: in a process of its own, since forking this one
    # (where earlier tests left Ray's and torch's threads) can deadlock the child
    script = ("from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, "
              "plan_experiments, preprocess\n"
              "extract_fingerprints([990], num_processes=1, show_progress_bar=False)\n"
              "plan_experiments([990])\n"
              "preprocess([990], configurations=('3d_fullres',), num_processes=(1,))\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **{k: str(v) for k, v in env.items()}},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        yield root


class _Interrupt(Exception):
    pass


@needs_nnunet
def test_cli_plan_by_dataset_id_shows_nnunets_plan(nnunet_dataset, capsys):
    assert main(["plan", "--data", "990", "--nnunet-plans", "990"]) == 0
    shown = json.loads(capsys.readouterr().out)
    planned = json.loads((nnunet_dataset / "pre" / DATASET / "nnUNetPlans.json").read_text())
    cfg = planned["configurations"]["3d_fullres"]
    assert shown["cases"] == 5 and shown["nnunet"]["nnunet_patch_size"] == cfg["patch_size"]
    assert shown["nnunet"]["batch_size"] == cfg["batch_size"]
    assert shown["final_patch"] == shown["nnunet"]["final_patch"]


@needs_nnunet
def test_schedule_runs_inside_nnunet_and_continues_at_a_stage_boundary(nnunet_dataset, tmp_path, monkeypatch, capsys):
    import torch

    plan = nnunet.read_plans("990")
    plans_json = json.loads(plan.source.read_text())
    assert plans_json["transpose_forward"] == [0, 1, 2]  # so nnU-Net's axes are pgps-tune's reversed
    inc = sch.divisors(plan.pools)
    # stage 0 is one pooling increment per axis (a 1x1x1 bottleneck, as the paper's first stage)
    s = sch.Schedule((sch.Stage(inc, 6, 2), sch.Stage((2 * inc[0], 3 * inc[1], 4 * inc[2]), 3, 2),
                      sch.Stage(plan.final_patch, plan.batch_size, 2)), plan.final_patch, plan.pools, plan.batch_size)
    s.save(tmp_path / "s.yaml")
    epoch_stage = [0, 1, 2]  # the schedule's 2+2+2 epochs halved onto nnU-Net's 3

    cls = nnunet.trainer_class()
    seen: list[tuple[int, tuple[int, ...]]] = []
    val_seen: list[tuple[int, ...]] = []
    train_step, validation_step, on_epoch_start = cls.train_step, cls.validation_step, cls.on_epoch_start
    stop_at: list[int] = [1]

    def record(self, batch):
        seen.append((self.current_epoch, tuple(batch["data"].shape)))
        return train_step(self, batch)

    def record_val(self, batch):
        val_seen.append(tuple(batch["data"].shape))
        return validation_step(self, batch)

    def maybe_stop(self):
        if stop_at and self.current_epoch == stop_at[0]:
            raise _Interrupt  # a run killed right after the checkpoint at the end of stage 0
        on_epoch_start(self)

    monkeypatch.setattr(cls, "train_step", record)
    monkeypatch.setattr(cls, "validation_step", record_val)
    monkeypatch.setattr(cls, "on_epoch_start", maybe_stop)
    monkeypatch.setattr("nnunetv2.training.logging.nnunet_logger.MetaLogger.plot_progress_png", lambda *a: None)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # augment in this process (the planner needs >= 1)

    def expected(epoch: int) -> tuple[int, ...]:
        st = s.stages[epoch_stage[epoch]]
        return (st.batch_size, 1, *reversed(st.patch_size))

    with pytest.raises(_Interrupt):
        nnunet.train("990", "3d_fullres", 0, tmp_path / "s.yaml", device="cpu", epochs=3, iterations_per_epoch=2,
                     val_iterations_per_epoch=1)
    out = nnunet.run_folder(plan, "0")
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1 and ckpt["trainer_name"] == nnunet.TRAINER
    assert seen == [(0, expected(0))] * 2

    stop_at.clear()
    seen.clear()
    assert main(["nnunet-train", "990", "3d_fullres", "0", "--continue", "--device", "cpu"]) == 0
    assert seen[0] == (1, expected(1))  # the first iteration after continuing is stage 1's patch and batch
    assert seen == [(e, expected(e)) for e in (1, 1, 2, 2)]
    final = (plan.batch_size, 1, *reversed(plan.final_patch))
    assert val_seen and set(val_seen) == {final}  # validation stays at the plans' patch
    printed = capsys.readouterr().out
    assert f"results: {out}" in printed and printed.rstrip().endswith("-p nnUNetPlans -device cpu")  # predict's: cuda
    for f in ("checkpoint_final.pth", "validation/summary.json", "pgps_schedule.json", "../plans.json",
              "../dataset.json"):
        assert (out / f).is_file(), f
    assert out.parent.name == "nnUNetTrainerPGPS__nnUNetPlans__3d_fullres"

    with pytest.raises(PgpsError, match="already holds a run; add --continue"):
        nnunet.train("990", "3d_fullres", 0, tmp_path / "s.yaml", device="cpu")
    sch.constant(plan.final_patch, plan.pools, plan.batch_size, 4).save(tmp_path / "other.yaml")
    with pytest.raises(PgpsError, match="this run was started with another schedule .*; drop --schedule"):
        nnunet.train("990", "3d_fullres", 0, tmp_path / "other.yaml", device="cpu", continue_training=True)
    # nnUNetv2_train --c (the trainer built by nnU-Net, its schedule from PGPS_TUNE_SCHEDULE) checks the same
    from dataclasses import replace

    started = nnunet.read_schedule(out / nnunet.RUN_RECORD, plan)
    plans = plan.plans_dict()
    dataset_json = json.loads((plan.source.parent / "dataset.json").read_text())
    other = nnunet.for_nnunet(sch.constant(plan.final_patch, plan.pools, plan.batch_size, 3), plan,
                              num_epochs=started.num_epochs, num_iterations_per_epoch=started.num_iterations_per_epoch,
                              num_val_iterations_per_epoch=started.num_val_iterations_per_epoch)
    for f, match in ((other, "this run was started with the schedule in"),
                     (replace(started, num_epochs=4), r"started with other counts \(num_epochs 3 -> 4;")):
        monkeypatch.setenv(nnunet.SCHEDULE_ENV, str(f.save(tmp_path / "nn.json")))
        with pytest.raises(PgpsError, match=match):
            cls(plans={**plans, "continue_training": True}, configuration="3d_fullres", fold=0,
                dataset_json=dataset_json, device=torch.device("cpu"))


@needs_nnunet
def test_train_takes_the_counts_from_the_schedule_file_unless_flags_are_given(nnunet_dataset, tmp_path, monkeypatch,
                                                                               capsys):
    plan = nnunet.read_plans("990")
    counts = {"num_epochs": 7, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 2}
    path = nnunet.for_nnunet(sch.constant(plan.final_patch, plan.pools, plan.batch_size, 4), plan,
                             **counts).save(tmp_path / "s.json")
    received: list[dict] = []

    def trainer(**kwargs):
        received.append(json.loads(Path(os.environ[nnunet.SCHEDULE_ENV]).read_text()))
        raise _Interrupt  # what the trainer would be given is all this test needs

    monkeypatch.setattr(nnunet, "trainer_class", lambda name: trainer)
    for flags, want in (({}, counts), ({"epochs": 5}, {**counts, "num_epochs": 5}),
                        ({"iterations_per_epoch": 4, "val_iterations_per_epoch": 1},
                         {**counts, "num_iterations_per_epoch": 4, "num_val_iterations_per_epoch": 1})):
        with pytest.raises(_Interrupt):
            nnunet.train("990", "3d_fullres", 0, path, device="cpu", trainer=f"{nnunet.TRAINER}_counts", **flags)
        assert {k: received[-1][k] for k in counts} == want, flags
    # a schedule exported from a sweep tuned on another configuration's data: refused before the trainer is built,
    # unless --other-configuration
    tuned = {**nnunet.tuned_on(plan, "nnunet"), "configuration": "3d_lowres", "spacing": [2.0, 2.0, 2.0]}
    lowres = sch.constant(plan.final_patch, plan.pools, plan.batch_size, 4)
    sch.Schedule.from_dict({**lowres.to_dict(), "meta": {"dataset": plan.dataset, "nnunet": tuned}}).save(
        tmp_path / "best_schedule.yaml")
    argv = ["nnunet-train", "990", "3d_fullres", "0", "--schedule", str(tmp_path / "best_schedule.yaml"), "--device",
            "cpu", "--trainer", f"{nnunet.TRAINER}_tuned"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "its trials trained nnU-Net's 3d_lowres data (spacing 2x2x2, x y z), not 3d_fullres's" in err, err
    assert err.count("\n") == 1 and len(received) == 3
    def reached(**kwargs):
        raise PgpsError("the trainer is built")

    monkeypatch.setattr(nnunet, "trainer_class", lambda name: reached)
    assert main([*argv, "--other-configuration"]) == 2
    assert capsys.readouterr().err == "pgps-tune: error: the trainer is built\n"


@needs_nnunet
def test_nnunet_finds_the_trainer_in_the_external_trainer_folder(monkeypatch):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    for name in (nnunet.TRAINER, f"{nnunet.TRAINER}_tuned"):
        # the call nnU-Net makes for each folder in nnUNet_extTrainer
        found = recursive_find_python_class(str(nnunet.TRAINER_DIR), name, None, base_folder=str(nnunet.TRAINER_DIR),
                                            cleanup_imports_from_base_folder=True)
        assert found is nnunet.trainer_class(name)
        assert found.__name__ == name
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a torchvision built for another torch raises RuntimeError, not ImportError
        pytest.skip(f"nnU-Net's full trainer lookup imports its Primus trainers, which need a working torchvision "
                    f"({type(exc).__name__})")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", nnunet.ext_trainer_path())
    assert recursive_find_trainer_class_by_name(nnunet.TRAINER) is nnunet.trainer_class()


def _working_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's build beside a CPU torch raises RuntimeError ("torchvision::nms does not exist")
        return False
    return True


@needs_nnunet
@pytest.mark.skipif(not _working_torchvision(),
                    reason="nnUNetv2_train's trainer lookup imports nnU-Net's Primus trainers, which need torchvision "
                           "(the CPU build beside a CPU torch: scripts/setup.sh installs it)")
def test_nnunet_v2_train_runs_the_exported_schedule(nnunet_dataset):
    """nnU-Net's own command line, as docs/NNUNET.md has users run it: nnUNet_extTrainer pointed at the trainer
    folder, the schedule file beside the plans (what 'export --nnunet' writes; here with short counts)."""
    command = Path(sys.executable).parent / "nnUNetv2_train"
    plan = nnunet.read_plans("990")
    trainer = f"{nnunet.TRAINER}_cli"  # its own file beside the plans and run folder: the other tests' stay as they are
    inc = sch.divisors(plan.pools)
    s = sch.Schedule((sch.Stage(inc, 4, 1), sch.Stage(plan.final_patch, plan.batch_size, 1)), plan.final_patch,
                     plan.pools, plan.batch_size)
    written = nnunet.for_nnunet(s, plan, num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1)
    written.save(nnunet.schedule_file_for(plan, trainer))
    env = {**os.environ, "nnUNet_extTrainer": nnunet.ext_trainer_path(), "nnUNet_n_proc_DA": "0"}
    env.pop(nnunet.SCHEDULE_ENV, None)
    done = subprocess.run([str(command), "990", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = nnunet.run_folder(plan, 0, trainer)
    assert nnunet.read_schedule(out / nnunet.RUN_RECORD, plan) == written
    assert (out / "checkpoint_final.pth").is_file() and (out / "validation" / "summary.json").is_file()
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    final = "x".join(map(str, plan.to_nnunet(plan.final_patch)))
    first = "x".join(map(str, plan.to_nnunet(inc)))
    assert f"pgps-tune stage 0: patch {first}, batch 4" in log and f"pgps-tune stage 1: patch {final}" in log


def test_nnunet_train_names_a_torchvision_that_blocks_nnunets_trainer_lookup(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what importing it raises: ImportError
    assert "(nnUNetv2_predict, nnUNetv2_train -tr) import torchvision, which does not import here" in \
        nnunet.lookup_note()


@needs_nnunet
def test_a_sweep_whose_trials_are_nnunet_trainings(nnunet_dataset, tmp_path, monkeypatch):
    """budget.trainer nnunet: each Ray Tune trial is an nnU-Net training of its schedule, scored by nnU-Net."""
    import pyarrow.parquet as pq
    import yaml

    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    plan = nnunet.read_plans("990")
    space = tmp_path / "s.yaml"
    budget = {"trainer": "nnunet", "epochs": 2, "iterations_per_epoch": 2, "nnunet_val_iterations": 1,
              "val_every": 1, "max_failures": 0}
    space.write_text(yaml.safe_dump({
        "name": "nn", "parameters": {"stages": {"type": "categorical", "choices": [1, 2]}, "growth": {"value": 2.0},
                                     "mode": {"value": "performance"}},
        "search": {"algorithm": "grid", "references": False}, "asha": {"enabled": False},
        "confirm": {"enabled": False}, "budget": budget}))
    out = tmp_path / "sweep"
    # no plans: refused before Ray starts, naming the flag
    assert main(["tune", "--space", str(space), "--data", "990", "--out", str(out), "--quiet"]) == 2
    assert not out.exists() or not (out / "sweep.json").exists()
    assert main(["tune", "--space", str(space), "--data", "990", "--nnunet-plans", "990", "--out", str(out),
                 "--quiet", "--max-concurrent", "1"]) == 0
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    search = [r for r in rows if r["phase"] == "search"]
    assert len(search) == 2 and all(r["completed"] for r in search)
    for r in search:
        s = sch.Schedule.from_dict(json.loads(r["schedule"]))
        assert s.final_patch == plan.final_patch and s.baseline_batch_size == plan.batch_size
        assert 0.0 <= r["final_dice"] <= 1.0
    assert {len(sch.Schedule.from_dict(json.loads(r["schedule"])).stages) for r in search} == {1, 2}
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["nnunet"]["configuration"] == "3d_fullres" and meta["nnunet"]["fold"] == 0
    best = sch.load(out / "best_schedule.yaml")
    assert best.final_patch == plan.final_patch and best.meta["nnunet_trainer"]["configuration"] == "3d_fullres"
    # exported for nnUNetv2_train -tr: nnU-Net trains the counts the winner was scored at
    assert main(["export", "--experiment", str(out), "--out", str(out), "--nnunet", "990",
                 "--trainer", "nnUNetTrainerPGPS_sweep"]) == 0
    exported = nnunet.schedule_file_for(plan, "nnUNetTrainerPGPS_sweep")
    assert nnunet.trained_counts(nnunet.read_schedule(exported, plan)) == (2, 2, 1)
    exported.unlink()  # the dataset is shared with the other tests


@needs_nnunet
def test_nnunet_train_checks_folds_flags_and_plans_before_nnunet_starts(nnunet_dataset, tmp_path, monkeypatch,
                                                                         capsys):
    plan = nnunet.read_plans("990")
    trainer = f"{nnunet.TRAINER}_checks"
    sch.constant(plan.final_patch, plan.pools, plan.batch_size, 4).save(tmp_path / "s.yaml")
    sch.constant(plan.final_patch, plan.pools, plan.batch_size + 1, 4).save(tmp_path / "other.yaml")
    built: list[dict] = []

    class Fake:  # what nnU-Net's trainer is given; it trains nothing
        def __init__(self, **kwargs):
            built.append(kwargs)

        def run_training(self):
            pass

        def perform_actual_validation(self, save_probabilities):
            pass

    monkeypatch.setattr(nnunet, "trainer_class", lambda name: Fake)
    monkeypatch.setattr("nnunetv2.run.run_training.maybe_load_checkpoint", lambda *a: None)
    base = ["nnunet-train", "990", "3d_fullres"]
    flags = ["--schedule", str(tmp_path / "s.yaml"), "--trainer", trainer, "--device", "cpu"]

    def refused(argv: list[str], needle: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err

    # a fold spelt 01 trains, is checked and printed as nnU-Net's fold_1
    assert main([*base, "01", *flags]) == 0
    out = nnunet.run_folder(plan, 1, trainer)
    printed = capsys.readouterr().out
    assert f"results: {out}\n" in printed and " -f 1 " in printed and built[-1]["fold"] == 1
    # a run in fold_0 (its checkpoint and record): no spelling of 0 starts over it
    run = nnunet.run_folder(plan, 0, trainer)
    run.mkdir(parents=True)
    (run / "checkpoint_latest.pth").write_bytes(b"")
    record = replace_counts(nnunet.read_schedule(tmp_path / "s.yaml", plan), num_epochs=4, num_iterations_per_epoch=2)
    record.save(run / nnunet.RUN_RECORD)
    for fold in ("0", "00", "+0", " 0"):
        refused([*base, fold, *flags], f"{run} already holds a run; add --continue")
    before = sorted(p.name for p in run.iterdir())
    cont = [*base, "00", "--continue", "--trainer", trainer, "--device", "cpu"]
    refused([*cont, "--epochs", "6"], "this run trains 4 epochs, not 6; drop --epochs to continue it")
    refused([*cont, "--iterations-per-epoch", "3"], "this run trains 2 iterations per epoch, not 3; drop "
                                                    "--iterations-per-epoch")
    refused([*cont, "--schedule", str(tmp_path / "other.yaml")], "drop --schedule to continue it with that one")
    assert sorted(p.name for p in run.iterdir()) == before  # no log file of a refused start
    n = len(built)
    assert main([*cont, "--epochs", "4"]) == 0 and built[n]["fold"] == 0  # the run's own counts: continued
    capsys.readouterr()
    refused([*base, "5", *flags], "fold 5 is not one of the dataset's 5 folds (0-4; nnU-Net would train it on a "
                                  "random 80:20 split instead)")
    for plans in ("nnUNetResEncUNetMPlans", str(plan.source)):
        refused([*base, "2", *flags, "--plans", plans], "--plans takes the plans identifier (the file name without "
                                                        f".json, e.g. nnUNetPlans), got '{plans}'; ")
        refused([*base, "2", *flags, "--plans", plans], "holds nnUNetPlans")


def replace_counts(f: nnunet.NnunetSchedule, **counts: int) -> nnunet.NnunetSchedule:
    from dataclasses import replace

    return replace(f, schedule=nnunet.fit_epochs(f.schedule, counts["num_epochs"]), **counts)


@needs_nnunet
def test_a_dataset_json_that_disagrees_with_the_preprocessed_data_is_refused(nnunet_dataset):
    plan = nnunet.read_plans("990")
    described = json.loads((plan.source.parent / "dataset.json").read_text())
    nnunet.check_dataset_json(plan, described)  # as preprocessed: fine
    with pytest.raises(PgpsError, match=r"names 2 channel\(s\) but the preprocessed data have 1 "
                                        r"\(dataset_fingerprint.json\); regenerate with nnUNetv2_plan_and_preprocess"):
        nnunet.check_dataset_json(plan, {**described, "channel_names": {"0": "MRI", "1": "CT"}})
    with pytest.raises(PgpsError, match=r"gives the foreground class\(es\) \['1', '2', '3'\] but the preprocessed "
                                        r"data have \['1', '2'\]"):
        nnunet.check_dataset_json(plan, {**described, "labels": {**described["labels"], "c": 3}})
    with pytest.raises(PgpsError, match=r"gives the foreground class\(es\) \['1'\]"):
        nnunet.check_dataset_json(plan, {**described, "labels": {"background": 0, "a": 1}})


@needs_nnunet
@pytest.mark.parametrize("labels, regions, locations", [
    ({"background": 0, "a": 1, "b": 2, "ignore": 3}, None, [1, 2, (-1, 0, 1, 2)]),
    ({"background": 0, "whole": [1, 2], "core": 2}, [1, 2], [(1, 2), 2]),
], ids=["ignore_label", "regions"])
def test_dataset_json_check_knows_nnunets_ignore_label_and_regions(tmp_path, labels, regions, locations):
    # with an ignore label nnU-Net's preprocessing also samples [-1, *labels] (every annotated voxel): as
    # preprocessed, such a dataset.json was refused as disagreeing with its own data
    import pickle

    plan = nnunet.read_plans(write_plans(tmp_path, current_plans()))
    (tmp_path / plan.data_identifier).mkdir()
    props = {"class_locations": {k: np.zeros((0, 4), np.int64) for k in locations}}
    (tmp_path / plan.data_identifier / "case_000.pkl").write_bytes(pickle.dumps(props))
    described = {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz",
                 **({"regions_class_order": regions} if regions else {})}
    nnunet.check_dataset_json(plan, described)
    fewer = {k: v for k, v in labels.items() if k not in ("ignore", "core")}
    with pytest.raises(PgpsError, match="gives the foreground class"):
        nnunet.check_dataset_json(plan, {**described, "labels": fewer,
                                         **({"regions_class_order": [1]} if regions else {})})


@needs_nnunet
def test_trial_results_name_regions_and_labels_as_dataset_json_does():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    names = nnunet.class_names({"labels": regions})
    assert nnunet.head_names(LabelManager(regions, [1, 2, 3]), names) == ["whole", "core", "enhancing"]
    # nnU-Net's summary.json keys regions by their tuple's text (the trial's end used to fail on int("(1, 2, 3)"))
    summary = {"mean": {"(1, 2, 3)": {"Dice": 0.9}, "(2, 3)": {"Dice": 0.8}, "3": {"Dice": 0.7}}}
    assert nnunet.summary_dice(summary, names) == {"whole": 0.9, "core": 0.8, "enhancing": 0.7}
    plain = {"background": 0, "a": 1, "b": 2, "ignore": 3}
    assert nnunet.head_names(LabelManager(plain, None), nnunet.class_names({"labels": plain})) == ["a", "b"]


def test_a_properties_pickle_may_hold_numpy_and_plain_data_but_never_a_function(tmp_path):
    """The preprocessed folder's .pkl files are read before training: one naming os.system is refused, unrun."""
    import io
    import pickle

    from pgps_tune.nnunet import _PlainUnpickler

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    plain = {"class_locations": {1: np.zeros((2, 4), np.int64)}, "spacing": (1.0, 1.5), "n": np.int64(3)}
    back = _PlainUnpickler(io.BytesIO(pickle.dumps(plain))).load()
    assert np.array_equal(back["class_locations"][1], plain["class_locations"][1]) and back["n"] == 3
    with pytest.raises(pickle.UnpicklingError, match="system"):
        _PlainUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    assert not marker.exists()


def test_nnunet_trials_refuse_pgps_tune_case_splits_for_the_confirmation(plan, tmp_path, capsys):
    # trainer nnunet confirms on nnU-Net's own folds: a splits file would be ignored, so it is refused from the
    # space file and from --confirm-splits alike (the flag used to slip past the space file's check)
    import yaml

    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]))
    space = {"parameters": {"stages": {"type": "int", "low": 1, "high": 2}}, "objective": {"type": "max_dice"},
             "search": {"algorithm": "random", "num_samples": 2, "seed": 0},
             "budget": {"trainer": "nnunet", "epochs": 30, "iterations_per_epoch": 2}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({**space, "confirm": {"folds": 2, "splits": str(splits)}}))
    base = ["tune", "--data", "synthetic", "--out", str(tmp_path / "out"), "--nnunet-plans", str(plan.source)]
    for argv, needle in (([*base, "--space", str(tmp_path / "f.yaml")], "confirm.splits lists pgps-tune's case "
                          "splits, but trainer nnunet confirms on nnU-Net's own folds"),
                         ([*base, "--space", str(tmp_path / "s.yaml"), "--confirm-folds", "2", "--confirm-splits",
                           str(splits)], "--confirm-splits (with ")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    # without a confirmation the flag's file is not used: not this refusal
    main([*base, "--space", str(tmp_path / "s.yaml"), "--confirm-splits", str(splits), "--no-confirm"])
    assert "case splits" not in capsys.readouterr().err
    # nor from 'confirm --splits' on a finished sweep whose trials train nnU-Net
    sweep = tmp_path / "done"
    sweep.mkdir()
    meta = sweep_meta(sweep, "n", reference_configs=[], trial_setup=trial_setup(tmp_path, trainer="nnunet"))
    (sweep / "sweep.json").write_text(json.dumps(meta))
    stored = (sweep / "sweep.json").read_bytes()
    assert main(["confirm", str(sweep), "--splits", str(splits)]) == 2
    err = capsys.readouterr().err
    assert ("--splits (sweep n trains nnU-Net) lists pgps-tune's case splits, but trainer nnunet confirms on nnU-Net's "
            "own folds (confirm.folds: N trains folds 0..N-1 of its splits_final.json); drop --splits") in err, err
    assert err.count("\n") == 1 and (sweep / "sweep.json").read_bytes() == stored


@needs_nnunet
def test_an_nnunet_sweep_of_region_labels_never_runs_pgps_tunes_loader(tmp_path, monkeypatch, capsys):
    """budget.trainer nnunet on a BraTS-style dataset (regions, an ignore label), which pgps-tune's own loader
    refuses: tune and confirm take its name and folds from nnU-Net's preprocessed folder and prepare no cache."""
    import contextlib

    import yaml

    from pgps_tune import tuner

    description = {"name": "Brats", "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 3,
                   "labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, "regions_class_order": [1, 2]}
    for folder in (tmp_path / "raw" / "Dataset004_Hippo", tmp_path / "pre" / "Dataset004_Hippo"):
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps(description))
    plans = write_plans(tmp_path / "pre" / "Dataset004_Hippo", current_plans())
    (plans.parent / "nnUNetPlans_3d_fullres").mkdir()
    for i in range(3):
        (plans.parent / "nnUNetPlans_3d_fullres" / f"case_{i}.pkl").write_bytes(b"")
    (plans.parent / "splits_final.json").write_text(json.dumps([{"train": ["a", "b"], "val": ["c"]}] * 3))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    seen: list = []

    def stop(*args, **kwargs):  # what the Ray phases would be given: no Ray in this test
        seen.append(args)
        raise PgpsError("Ray reached")

    def reached(argv: list[str]) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Ray reached" in err, err

    monkeypatch.setattr(tuner, "_ray_session", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(tuner, "_run_phases", stop)
    monkeypatch.setattr(tuner, "run_confirmation", stop)
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({
        "name": "nn", "parameters": {"stages": {"type": "categorical", "choices": [1, 2]}, "growth": {"value": 2.0}},
        "search": {"algorithm": "grid", "references": False}, "asha": {"enabled": False}, "confirm": {"folds": 3},
        "budget": {"trainer": "nnunet", "epochs": 30, "iterations_per_epoch": 2}}))
    tune = ["tune", "--space", str(space), "--nnunet-plans", "4", "--cache-dir", str(tmp_path / "cache")]
    reached([*tune, "--data", "4", "--out", str(tmp_path / "a")])
    _, _, ds, final, pools, *_, confirm, _ = seen[-1]
    plan = nnunet.read_plans(plans)
    assert (ds.name, ds.cases, ds.folds, final, pools) == ("Brats", 3, 3, plan.final_patch, plan.pools)
    assert confirm.folds == 3 and not (tmp_path / "cache").exists()
    # --data is not read: another nnU-Net dataset is refused, anything else named in a note
    (tmp_path / "raw" / "Dataset005_Other").mkdir()
    assert main([*tune, "--data", "5", "--out", str(tmp_path / "b")]) == 2
    assert "--data names Dataset005_Other but the trials train Dataset004_Hippo" in capsys.readouterr().err
    assert main([*tune, "--data", "synthetic", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--data synthetic is not read" in err and "Ray reached" in err and seen[-1][2].name == "Brats"
    # confirm: nnU-Net's folds, never a split of the data by pgps-tune's loader
    sweep = tmp_path / "done"
    sweep.mkdir()
    setup = {**trial_setup(tmp_path, trainer="nnunet"), "data": str(tmp_path / "raw" / "Dataset004_Hippo"),
             "cache_root": None, "nnunet": {"plans": str(plans), "configuration": "3d_fullres"}}
    (sweep / "sweep.json").write_text(json.dumps(sweep_meta(sweep, "n", reference_configs=[], trial_setup=setup)))
    assert main(["confirm", str(sweep), "--confirm-folds", "4"]) == 2
    assert "4 folds asked for, but nnU-Net's split of Dataset004_Hippo has 3" in capsys.readouterr().err
    reached(["confirm", str(sweep), "--confirm-folds", "2"])
    assert seen[-1][2].folds == 2 and not (tmp_path / "cache").exists()


def test_train_notes_a_schedule_tuned_by_nnunets_trials_on_other_data(capsys):
    """A schedule of a budget.trainer nnunet sweep has no recipe, so 'train --schedule' compared nothing: one tuned
    on nnU-Net's 3d_lowres data, or on another dataset, trained without a word.  Its meta.nnunet now gives notes,
    as a recipe does; a schedule of pgps-tune's trainer on the plans (it trained its own preparation) is not noted."""
    from types import SimpleNamespace

    from pgps_tune.cli import _note_nnunet_data

    on = {"configuration": "3d_lowres", "trainer": "nnunet", "spacing": [2.0, 1.5, 1.5], "dataset": "Dataset004_Hippo"}
    ds = SimpleNamespace(name="Hippocampus", spacing=(1.0, 1.0, 1.0))
    notes = []
    for meta in ({"dataset": "Hippocampus", "nnunet": on}, {"dataset": "Prostate", "nnunet": on},
                 {"dataset": "Hippocampus", "nnunet": {**on, "spacing": [1.0, 1.0, 1.0]}},
                 {"dataset": "Hippocampus", "nnunet": {**on, "trainer": "pgps_tune"}}, {"dataset": "Hippocampus"}):
        a = SimpleNamespace(notes=[])
        _note_nnunet_data(a, meta, ds)
        notes.append(a.notes)
    assert notes == [
        ["train: note: the schedule file's trials trained nnU-Net's 3d_lowres data (spacing 2x1.5x1.5, x y z), but "
         "train prepares --data Hippocampus at spacing 1x1x1: its patches cover another extent, and its Dice will "
         "differ from the sweep's"],
        ["train: note: the schedule file was tuned by nnU-Net's trials on dataset Prostate, --data is Hippocampus"],
        [], [], []]
    assert capsys.readouterr().err == ""
