"""scripts/bench_nnunet.py without nnU-Net training: bad input is refused in one line, writing
nothing; the tuned schedule's batch mode is re-applied to nnU-Net's batch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import make_msd

from pgps_tune import schedule as sch
from pgps_tune.errors import PgpsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_nnunet", ROOT / "scripts" / "bench_nnunet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(bench, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["bench_nnunet.py", *args])
    rc = bench.main()
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--work", str(ROOT / "runs" / "nnunet_bench")], "is inside the repository"),
    (["--data", "{tmp}/nowhere"], "is not an MSD task folder (no dataset.json, imagesTr, labelsTr)"),
    (["--schedules", "constant", "papr"], "--schedules: unknown ['papr']"),
    (["--schedules", "tuned"], "--tuned FILE is needed"),
    (["--tuned", "{tmp}/missing.yaml"], "missing.yaml"),
    (["--schedules", "constant", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--schedules", "constant", "--iterations-per-epoch", "-3"], "--iterations-per-epoch must be >= 1"),
    (["--schedules", "constant", "--val-iterations-per-epoch", "0"], "--val-iterations-per-epoch must be >= 1"),
    (["--schedules", "constant", "--fold", "-1"], "--fold must be >= 0"),
    (["--schedules", "constant", "--da-processes", "3"], "--da-processes must be 0, 1 or 2"),
    (["--schedules", "constant", "--dataset-id", "1000"], "--dataset-id must be 1-999"),
    (["--schedules", "constant", "--width-divisor", "0"], "--width-divisor must be >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(bench, monkeypatch, capsys, tmp_path, args, match):
    msd = make_msd(tmp_path / "msd", n=2)
    work = tmp_path / "work"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = [] if "--data" in args else ["--data", str(msd)]
    base += [] if "--work" in args else ["--work", str(work)]
    rc, err = run(bench, monkeypatch, capsys, *base, *args)
    assert rc == 2
    assert err.startswith("bench_nnunet.py: error: ") and err.count("\n") == 1 and match in err, err
    assert not work.exists() and not (ROOT / "runs" / "nnunet_bench").exists()


def test_tuned_batches_follow_their_mode_at_nnunets_batch(bench):
    kw = dict(stages=4, start_fraction=0.3, length_ratio=1.3, mode="performance")
    for cap in (None, 40):
        swept = sch.parametric((40, 56, 40), (3, 3, 3), 4, 16, batch_cap=cap, **kw)
        moved = bench.rebatch(swept, 9)
        again = sch.parametric((40, 56, 40), (3, 3, 3), 9, 16, batch_cap=cap, **kw)
        assert moved.stages == again.stages and moved.baseline_batch_size == 9
        assert moved.meta["rebatched_from"] == 4
    # a sweep's schedule names its space, whose cap the larger batch reaches (700 -> 1575 at 8x8x8)
    swept = sch.parametric((40, 56, 40), (3, 3, 3), 4, 16, **{**kw, "start_fraction": 0.15}, batch_cap=1024)
    space = str(ROOT / "search_spaces" / "hippocampus_performance.yaml")
    named = sch.Schedule(swept.stages, swept.final_patch, swept.pools, 4, meta={**swept.meta, "space": space})
    moved = bench.rebatch(named, 9)
    assert moved.stages == sch.parametric((40, 56, 40), (3, 3, 3), 9, 16, **{**kw, "start_fraction": 0.15},
                                          batch_cap=1024).stages
    assert moved.stages[0].batch_size == 1024 < bench.rebatch(swept, 9).stages[0].batch_size
    resource = sch.parametric((40, 56, 40), (3, 3, 3), 4, 16, **{**kw, "mode": "resource"})
    assert [st.batch_size for st in bench.rebatch(resource, 9).stages] == [9] * len(resource.stages)
    odd = sch.Schedule((sch.Stage((16, 16, 16), 87, 2), sch.Stage((40, 56, 40), 3, 2)), (40, 56, 40), (3, 3, 3), 4,
                       meta={"mode": "performance"})
    with pytest.raises(PgpsError, match="do not follow its mode 'performance'"):
        bench.rebatch(odd, 9)


def test_a_narrower_configuration_inherits_the_rest_of_3d_fullres(bench, tmp_path):
    import json

    from pgps_tune import nnunet

    cfg = {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 56, 40], "batch_size": 7,
           "spacing": [1, 1, 1], "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {
               "n_stages": 4, "features_per_stage": [32, 64, 128, 256],
               "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}}}
    import nibabel as nib
    import numpy as np

    (tmp_path / "gt_segmentations").mkdir()  # a label file beside the plans gives the axis mapping
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "gt_segmentations" / "c.nii.gz")
    plans = tmp_path / "nnUNetPlans.json"
    plans.write_text(json.dumps({"dataset_name": "Dataset004_Hippocampus", "plans_name": "nnUNetPlans",
                                 "configurations": {"3d_fullres": cfg}, "keep": 1}))
    assert bench.narrow(plans, 1) == "3d_fullres" and "3d_fullres_w1" not in plans.read_text()
    assert bench.narrow(plans, 4) == "3d_fullres_w4"
    written = json.loads(plans.read_text())
    assert written["keep"] == 1 and written["configurations"]["3d_fullres"] == cfg  # the rest kept as it was
    assert bench.features(plans, "3d_fullres_w4") == [8, 16, 32, 64]
    full, narrow = nnunet.read_plans(plans, "3d_fullres"), nnunet.read_plans(plans, "3d_fullres_w4")
    assert (narrow.final_patch, narrow.pools, narrow.batch_size) == (full.final_patch, full.pools, full.batch_size)
    assert narrow.data_identifier == full.data_identifier  # trains on 3d_fullres' preprocessed data
    before = plans.stat().st_mtime_ns
    assert bench.narrow(plans, 4) == "3d_fullres_w4" and plans.stat().st_mtime_ns == before  # not rewritten
