import json

import pytest
import torch

from pgps_tune import data
from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.network import SafeInstanceNorm3d, build_network
from pgps_tune.config import DEFAULT_LR, TrainConfig
from pgps_tune.trainer import Trainer


@pytest.fixture
def ds(tiny_msd):
    return data.prepare(tiny_msd)


def _schedule():
    # stages: 4^3 (epochs 0-1), 8^3 (epochs 2-3), 16^3 (epochs 4-5)
    return sch.parametric((16, 16, 16), (2, 2, 2), 2, 6, stages=3, start_fraction=0.25)


def _trainer(ds, out, callback=None, **cfg):
    config = TrainConfig(iterations_per_epoch=2, val_every=1, threads=1, filters=(4, 8, 16), **cfg)
    return Trainer(ds, [0, 1, 2, 3], [4, 5], _schedule(), config, out, callback)


def test_every_paper_stage_trains_including_the_1x1x1_bottleneck():
    for name in ("unet", "dynunet"):
        net = build_network(name, 1, 3, (3, 3, 3), (4, 8, 16, 32))
        assert any(isinstance(m, SafeInstanceNorm3d) for m in net.modules())
        net.train()
        for st in sch.paper((16, 16, 8), (3, 3, 3), 2, 5).stages:
            out = net(torch.randn(2, 1, *st.patch_size))
            out.float().mean().backward()
            assert out.shape[-3:] == st.patch_size


def test_deep_supervision_trains(ds, tmp_path):
    m = _trainer(ds, tmp_path / "ds", network="dynunet", deep_supervision=True).fit()
    assert m["completed"] and 0 <= m["val_dice"] <= 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_smoke_metrics_and_callback(ds, tmp_path, optimizer):
    reports = []
    m = _trainer(ds, tmp_path / "run", callback=reports.append, optimizer=optimizer).fit()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val_dice"] == pytest.approx(m["val_dice"]) and 0 <= m["val_dice"] <= 1
    assert m["iterations"] == 12 and m["completed"]
    assert [r["stage"] for r in reports] == [0, 0, 1, 1, 2, 2]
    assert [r["patch_size"] for r in reports][::2] == [[4, 4, 4], [8, 8, 8], [16, 16, 16]]
    assert all((tmp_path / "run" / "checkpoint.pt").is_file() for _ in reports)
    voxels = [r["voxels_processed"] for r in reports]
    assert voxels == sorted(voxels) and m["voxels_processed"] == _schedule().voxels(2)
    assert m["voxel_fraction"] == pytest.approx(_schedule().voxel_fraction())
    assert [s["iterations"] for s in m["stages"]] == [4, 4, 4]
    assert all(s["wall_time_s"] > 0 for s in m["stages"])
    assert set(reports[-1]) >= {"val_dice", "train_loss", "train_time_s", "voxels_processed",
                                "baseline_equivalent_iterations", "checkpoint_dir", "best_val_dice"}


def test_lr_is_poly_over_the_whole_run_and_never_reset(ds, tmp_path):
    reports = []
    _trainer(ds, tmp_path / "lr", callback=reports.append).fit()
    lrs = [r["lr"] for r in reports]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] == pytest.approx(DEFAULT_LR["adamw"] * (1 - 2 / 12) ** 0.9)


def test_resume_in_the_middle_of_a_stage_continues_exactly(ds, tmp_path):
    straight = _trainer(ds, tmp_path / "a")
    straight.fit()

    def stop_at_epoch_3(r):
        if r["epoch"] == 3:  # epoch 3 is the middle of stage 1
            raise KeyboardInterrupt

    first = _trainer(ds, tmp_path / "b", callback=stop_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert first.state.iteration == 6
    seen = []
    resumed = _trainer(ds, tmp_path / "b", callback=seen.append)
    resumed.load_checkpoint()
    assert resumed.state.iteration == 6 and resumed.sampler.stage_index(6) == 1
    img, seg, stage = resumed.sampler.batch(6)
    ref_img, ref_seg, ref_stage = straight.sampler.batch(6)
    assert stage == ref_stage == 1 and (img == ref_img).all() and (seg == ref_seg).all()
    resumed = _trainer(ds, tmp_path / "b", callback=seen.append)
    m = resumed.fit(resume=True)
    assert [r["epoch"] for r in seen] == [4, 5, 6] and [r["stage"] for r in seen] == [1, 2, 2]
    assert [h["stage"] for h in m["history"]] == [h["stage"] for h in straight.state.history]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert m["val_dice"] == straight.state.history[-1]["val_dice"]


def test_resume_with_other_settings_is_refused(ds, tmp_path):
    _trainer(ds, tmp_path / "c").fit()
    from pgps_tune.errors import PgpsError

    with pytest.raises(PgpsError, match="another schedule"):
        _trainer(ds, tmp_path / "c", seed=5).fit(resume=True)


def test_cli_train_and_evaluate(tiny_msd, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--data", str(tiny_msd), "--out", str(out), "--preset", "paper", "--mode", "performance",
               "--final-patch", "16", "16", "16", "--pools", "2", "2", "2", "--epochs", "10",
               "--iterations-per-epoch", "1", "--filters", "4", "8", "16", "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["val_dice"], float) and isinstance(metrics["wall_time_s"], float)
    assert len(metrics["stages"]) == 10 and (out / "checkpoint.pt").is_file()
    assert sch.load(out / "schedule.yaml").stages[0].patch_size == (4, 4, 4)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--data", str(tiny_msd), "--all-cases"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["cases"] == 6 and 0 <= ev["dice"] <= 1 and set(ev["dice_per_class"]) == {"a", "b"}


def test_cli_train_on_synthetic_with_a_schedule_file(tmp_path, capsys):
    f = tmp_path / "s.json"
    assert main(["schedule", "--preset", "parametric", "--stages", "2", "--growth", "2", "--final-patch",
                 "48", "48", "48", "--pools", "3", "3", "3", "--epochs", "2", "--out", str(f)]) == 0
    out = tmp_path / "syn"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--schedule", str(f),
                 "--iterations-per-epoch", "1", "--filters", "4", "8", "16", "32", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["completed"]


def test_cli_train_takes_searched_trainer_settings_from_the_schedule_file(tmp_path, capsys):
    from pgps_tune import schedule as sch
    from pgps_tune.results import trainer_meta

    meta = trainer_meta(json.dumps({"stages": 2, "growth": 2.0, "fg_ratio": 0.7, "lr": 0.002}))
    assert meta == {"trainer": {"fg_ratio": 0.7, "lr": 0.002}}
    s = sch.parametric((48, 48, 48), (3, 3, 3), 2, 2, stages=2, growth=2.0)
    f = tmp_path / "best.yaml"
    sch.Schedule(s.stages, s.final_patch, s.pools, s.baseline_batch_size, meta={**s.meta, **meta}).save(f)
    base = ["train", "--data", "synthetic", "--schedule", str(f), "--iterations-per-epoch", "1",
            "--filters", "4", "8", "16", "32", "--optimizer", "adamw"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "fg_ratio 0.7 from the schedule file" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]
    assert cfg["fg_ratio"] == 0.7 and cfg["lr"] == 0.002
    # an explicit flag wins over the file
    assert main([*base, "--out", str(tmp_path / "b"), "--fg-ratio", "0.4", "--quiet"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["config"]["fg_ratio"] == 0.4
