import errno
import io
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pgps_tune import data
from pgps_tune import network as network_mod
from pgps_tune import schedule as sch
from pgps_tune.cli import Interrupted, build_parser, main
from pgps_tune.config import DEFAULT_LR, TrainConfig
from pgps_tune.errors import DivergedError, PgpsError
from pgps_tune.network import SafeInstanceNorm3d, build_network
from pgps_tune.trainer import CHECKPOINT, Trainer, evaluate, evaluate_run, read_checkpoint, strict_json

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")


@pytest.fixture
def ds(tiny_msd):
    return data.prepare(tiny_msd)


def _schedule():
    # stages: 4^3 (epochs 0-1), 8^3 (epochs 2-3), 16^3 (epochs 4-5)
    return sch.parametric((16, 16, 16), (2, 2, 2), 2, 6, stages=3, start_fraction=0.25)


def _trainer(ds, out, callback=None, **cfg):
    # explicitly on the CPU (a GPU box would pick CUDA and AMP under "auto"); GPU tests say device="cuda"
    config = TrainConfig(**{"iterations_per_epoch": 2, "val_every": 1, "threads": 1, "filters": (4, 8, 16),
                            "device": "cpu", **cfg})
    return Trainer(ds, [0, 1, 2, 3], [4, 5], _schedule(), config, out, callback)


# a tiny CLI run: 4 one-iteration epochs at 16^3
_TRAIN = ["--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
          "--filters", "4", "8", "16", "--iterations-per-epoch", "1", "--device", "cpu", "--epochs", "4"]


def _strict_load(text):
    """json.loads that fails on NaN/Infinity, which are not JSON."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} written"))


def _one_line(rc, err, needle):
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_every_paper_stage_trains_including_the_1x1x1_bottleneck():
    for name in ("unet", "dynunet"):
        net = build_network(name, 1, 3, (3, 3, 3), (4, 8, 16, 32))
        assert any(isinstance(m, SafeInstanceNorm3d) for m in net.modules())
        net.train()
        for st in sch.paper((16, 16, 8), (3, 3, 3), 2, 5).stages:
            out = net(torch.randn(2, 1, *st.patch_size))
            out.float().mean().backward()
            assert out.shape[-3:] == st.patch_size


@pytest.mark.parametrize("layout", ["default", "channels_last"])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_through_the_group_norm_kernel_matches_torchs_instance_norm(affine, layout):
    # default layout: group norm's fused kernel; channels-last 3D: instance norm's own path (faster there)
    torch.manual_seed(0)
    ref, ours = torch.nn.InstanceNorm3d(3, affine=affine), SafeInstanceNorm3d(3, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2), ref.bias.uniform_(-1, 1)
        ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 5, 4, 6) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out = m(xi)
        fused = m is ours and layout == "default"
        assert ("GroupNorm" in type(out.grad_fn).__name__) == fused  # the fused kernel, not batch norm's
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad, *(p.grad for p in m.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiny_stages_step_with_pytorchs_convolutions_and_the_rest_with_onednn(ds, tmp_path, monkeypatch):
    t = _trainer(ds, tmp_path / "run")
    t.native_conv_max_voxels = 2 * 8**3  # batch 2: the 4^3 and 8^3 stages, not 16^3
    seen = []
    step, validate = t._step_with, t.validate
    monkeypatch.setattr(t, "_step_with", lambda *a: seen.append(("step", torch.backends.mkldnn.enabled)) or step(*a))
    monkeypatch.setattr(t, "validate", lambda: seen.append(("val", torch.backends.mkldnn.enabled)) or validate())
    before = torch.backends.mkldnn.enabled
    t.fit()
    steps = [on for what, on in seen if what == "step"]
    assert steps == [False] * 8 + [True] * 4  # 2 iterations x 2 epochs per stage
    assert all(on == before for what, on in seen if what == "val")  # validation at the final patch: as set
    assert torch.backends.mkldnn.enabled == before


def test_deep_supervision_trains_its_auxiliary_heads(ds, tmp_path):
    t = _trainer(ds, tmp_path / "ds", network="dynunet", deep_supervision=True)
    heads = list(t.model.deep_supervision_heads.parameters())
    image, label, _ = t.sampler.batch(t.total_iterations - 1)  # a final-stage batch
    image, label = torch.from_numpy(image), torch.from_numpy(label).long()
    t.model.train()
    with torch.no_grad():  # instance norm keeps no running statistics: this forward changes nothing
        out = t.model(image)
    assert out.dim() == 6 and out.shape[1] == 1 + len(t.model.deep_supervision_heads) and heads
    main_head_loss = float(t.loss_fn(out[:, 0], label))
    before = [p.detach().clone() for p in heads]
    loss = t._step(image, label)
    assert loss != pytest.approx(main_head_loss, abs=1e-6)  # the auxiliary outputs are in the loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)  # gradients reach every head
    assert all(not torch.equal(a, p) for a, p in zip(before, heads))  # and the step moves them
    m = t.fit()
    assert m["completed"] and 0 <= m["val_dice"] <= 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_smoke_metrics_and_callback(ds, tmp_path, optimizer):
    run = tmp_path / "run"
    reports, seen = [], []

    def check_checkpoint_now(r):
        # the checkpoint on disk when the report arrives holds exactly this state
        reports.append(r)
        ck = read_checkpoint(run / "checkpoint.pt", "")
        assert ck["state"]["iteration"] == r["iteration"] and ck["state"]["history"][-1]["epoch"] == r["epoch"]
        live = trainer.model.state_dict()
        assert all(torch.equal(v, live[k]) for k, v in ck["model"].items())
        seen.append({k: v.clone() for k, v in ck["model"].items()})
        groups = ck["optimizer"]["param_groups"]
        assert groups[0]["lr"] == pytest.approx(r["lr"])
        buffers = {name for st in ck["optimizer"]["state"].values() for name in st}
        if optimizer == "sgd":
            assert groups[0]["momentum"] == 0.99 and groups[0]["nesterov"] and buffers == {"momentum_buffer"}
        else:
            assert groups[0]["betas"] == (0.9, 0.999) and buffers == {"step", "exp_avg", "exp_avg_sq"}

    trainer = _trainer(ds, run, callback=check_checkpoint_now, optimizer=optimizer)
    assert type(trainer.opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    m = trainer.fit()
    assert len(seen) == 6 and all(  # every report's checkpoint held other weights than the one before
        any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:]))
    saved = _strict_load((run / "metrics.json").read_text())
    assert saved["val_dice"] == pytest.approx(m["val_dice"]) and 0 <= m["val_dice"] <= 1
    assert m["iterations"] == 12 and m["completed"]
    assert [r["stage"] for r in reports] == [0, 0, 1, 1, 2, 2]
    assert [r["patch_size"] for r in reports][::2] == [[4, 4, 4], [8, 8, 8], [16, 16, 16]]
    voxels = [r["voxels_processed"] for r in reports]
    assert voxels == sorted(voxels) and m["voxels_processed"] == 2 * _schedule().voxels()
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


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_in_the_middle_of_a_stage_continues_exactly(ds, tmp_path, deterministic):
    straight = _trainer(ds, tmp_path / "a")
    assert straight.device.type == "cpu"
    straight.fit()
    next_draws = []

    def stop_at_epoch_3(r):
        if r["epoch"] == 3:  # epoch 3 is the middle of stage 1
            # the checkpoint was saved just before this report: these are its RNGs' next draws
            next_draws.append((random.random(), float(np.random.random()), float(torch.rand(1))))
            raise KeyboardInterrupt

    first = _trainer(ds, tmp_path / "b", callback=stop_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert first.state.iteration == 6
    seen = []
    resumed = _trainer(ds, tmp_path / "b", callback=seen.append)
    resumed.load_checkpoint()
    assert [(random.random(), float(np.random.random()), float(torch.rand(1)))] == next_draws
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


def test_asha_counts_every_validation_a_trial_reports(ds, tmp_path):
    """6 epochs validated every 4: reports at epochs 4 and 6.  ASHA's training_iteration clock must end at the
    last one, else Tune stops every trial one validation before its end (none completes)."""
    from pgps_tune import space as sp
    from pgps_tune.asha import AshaSettings

    reports = []
    _trainer(ds, tmp_path, reports.append, val_every=4, iterations_per_epoch=1).fit()
    space = sp.parse({"parameters": {"stages": 1}, "asha": {"time_attr": "training_iteration"},
                      "budget": {"epochs": 6, "val_every": 4}}, "s.yaml")
    assert [r["epoch"] for r in reports] == [4, 6]
    assert AshaSettings.from_space(space).max_t == len(reports)


def test_a_resume_between_validations_reports_the_same_train_loss(ds, tmp_path, deterministic):
    """The losses since the last validation are in the checkpoint: a run stopped after a checkpoint that did
    not validate (epoch 3 of validations every 2) reports the same history as one that never stopped."""
    straight = _trainer(ds, tmp_path / "a", val_every=2).fit()

    def stop_at_epoch_4(r):
        if r["epoch"] == 4:  # the checkpoint of epoch 3 (no validation) is the last one
            raise KeyboardInterrupt

    first = _trainer(ds, tmp_path / "b", val_every=2)
    first.on_epoch = stop_at_epoch_4
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    saved = read_checkpoint(tmp_path / "b" / CHECKPOINT, "")["state"]
    assert saved["iteration"] == 6 and saved["pending_losses"] == first.state.pending_losses[:2]  # epoch 3's two
    resumed = _trainer(ds, tmp_path / "b", val_every=2).fit(resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]


def test_a_resume_under_another_thread_count_says_it_is_not_bit_exact(ds, tmp_path, capsys):
    """Float reductions depend on the thread count: the run continues, and says it will not be identical."""
    def stop(r):
        if r["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trainer(ds, tmp_path, callback=stop).fit()
    assert read_checkpoint(tmp_path / CHECKPOINT, "")["runtime"]["threads"] == 1
    capsys.readouterr()
    same = _trainer(ds, tmp_path)
    same.load_checkpoint()
    assert "note" not in capsys.readouterr().err
    other = _trainer(ds, tmp_path, threads=2)
    torch.set_num_threads(2)
    try:
        other.load_checkpoint()
    finally:
        torch.set_num_threads(1)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torch threads 1 (now 2)" in err and "not bit-identically" in err


def test_the_layout_follows_the_patch_and_resume_is_exact_from_either_layout(ds, tmp_path, monkeypatch,
                                                                            deterministic):
    # channels-last from 16^3 here (the default threshold is above this test's patches): stages 0-1
    # train in the default layout, stage 2 and every validation in channels-last.  A fused optimizer
    # walks a buffer as flat memory, so each switch, and a checkpoint whose buffers are in the other
    # layout (one written before the network went channels-last), must re-lay the buffers out, or the
    # update lands on the wrong elements without an error.
    monkeypatch.setattr(network_mod, "CHANNELS_LAST_MIN_VOXELS", 16**3)
    cl = torch.channels_last_3d
    seen = []
    straight = _trainer(ds, tmp_path / "straight")
    straight._step = _spy(straight, seen)
    straight.fit()
    assert [fmt for patch, fmt in seen] == [False] * 8 + [True] * 4 and seen[-1][0] == (16, 16, 16)
    first = _trainer(ds, tmp_path / "a", callback=lambda r: _stop_at(r, 3))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    flat_dir = tmp_path / "flat"
    flat_dir.mkdir()
    ck = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)
    buffers = [b for b in ck["optimizer"]["state"].values()]
    assert any(v.is_contiguous(memory_format=cl) and not v.is_contiguous()
               for b in buffers for v in b.values() if torch.is_tensor(v) and v.dim() == 5)
    for b in buffers:
        for name, value in b.items():
            if torch.is_tensor(value) and value.dim() == 5:
                b[name] = value.contiguous()
    torch.save(ck, flat_dir / CHECKPOINT)
    for folder in (tmp_path / "a", flat_dir):
        resumed = _trainer(ds, folder)
        resumed.fit(resume=True)
        assert all(p.is_contiguous(memory_format=cl) for p in resumed.model.parameters() if p.dim() == 5)
        for (k, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(x, y), (folder.name, k)


def test_bf16_follows_the_batch_size_is_recorded_and_resumes_exactly(ds, tmp_path, monkeypatch, deterministic):
    # as if the CPU had bf16 in hardware, from 8^3 x 2 voxels (the default threshold is above this test's
    # batches): stage 0 (4^3) trains in fp32, stages 1-2 in bf16 (the 8^3 stage's thin bottleneck
    # convolutions in fp32, network.GuardedConv3d); validations stay fp32
    from pgps_tune import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(network_mod, "CPU_BF16_MIN_VOXELS", 2 * 8**3)
    seen = []

    def hook(module, args, out):
        seen.append((module.training, out.dtype))

    straight = _trainer(ds, tmp_path / "straight")
    straight.model.register_forward_hook(hook)
    m = straight.fit()
    assert [d for training, d in seen if training] == [torch.float32] * 4 + [torch.bfloat16] * 8
    assert {d for training, d in seen if not training} == {torch.float32}
    assert [s["arithmetic"] for s in m["stages"]] == ["fp32", "bf16", "bf16"]
    assert all(p.dtype == torch.float32 for p in straight.model.parameters())
    first = _trainer(ds, tmp_path / "a", callback=lambda r: _stop_at(r, 3))  # stops inside stage 1
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = _trainer(ds, tmp_path / "a")
    resumed.fit(resume=True)
    for (k, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(x, y), k
    full = _trainer(ds, tmp_path / "fp32", cpu_precision="fp32")
    m32 = full.fit()
    assert [s["arithmetic"] for s in m32["stages"]] == ["fp32"] * 3
    assert not all(torch.equal(x, y) for x, y in zip(straight.model.parameters(), full.model.parameters()))
    with pytest.raises(PgpsError, match=r"was made with cpu_precision bf16 \(now fp32\); resume with the same"):
        _trainer(ds, tmp_path / "a", cpu_precision="fp32").fit(resume=True)
    monkeypatch.setattr(trainer_mod, "cpu_has_bf16", lambda: False)  # emulated bf16 is slower: fp32 there
    assert [_trainer(ds, tmp_path / "x").arithmetic(i) for i in range(3)] == ["fp32"] * 3
    with pytest.raises(PgpsError, match="unknown CPU precision 'fp8'; use one of bf16, fp32"):
        _trainer(ds, tmp_path / "y", cpu_precision="fp8")


def test_runs_and_files_from_before_cpu_precision_read_as_fp32(ds, tmp_path):
    # configs, checkpoints and schedule-file recipes written before the setting existed trained in fp32
    cfg = TrainConfig(cpu_precision="fp32").to_dict()
    del cfg["cpu_precision"]
    assert TrainConfig.from_dict(cfg).cpu_precision == "fp32"
    assert TrainConfig.parse({"network": "unet"}, "recipe.train").cpu_precision == "fp32"
    assert TrainConfig.parse({"cpu_precision": "bf16"}, "recipe.train").cpu_precision == "bf16"
    with pytest.raises(PgpsError, match="recipe.train.cpu_precision: unknown CPU precision 'half'"):
        TrainConfig.parse({"cpu_precision": "half"}, "recipe.train")
    old = _trainer(ds, tmp_path / "old", callback=lambda r: _stop_at(r, 1), cpu_precision="fp32")
    with pytest.raises(KeyboardInterrupt):
        old.fit()
    ck = torch.load(tmp_path / "old" / CHECKPOINT, weights_only=True)
    assert "cpu_precision" not in ck["identity"]["config"]  # the identity an older version wrote
    del ck["config"]["cpu_precision"]
    torch.save(ck, tmp_path / "old" / CHECKPOINT)
    assert _trainer(ds, tmp_path / "old", cpu_precision="fp32").fit(resume=True)["completed"]


def _spy(trainer, seen):
    step = trainer._step

    def spied(image, label):
        out = step(image, label)
        w = max((p for p in trainer.model.parameters() if p.dim() == 5), key=lambda p: p.numel())
        seen.append((tuple(label.shape[2:]), w.is_contiguous(memory_format=torch.channels_last_3d)
                     and not w.is_contiguous()))
        return out
    return spied


def _stop_at(report, epoch):
    if report["epoch"] == epoch:
        raise KeyboardInterrupt


def test_resume_with_other_settings_is_refused(ds, tmp_path):
    _trainer(ds, tmp_path / "c").fit()
    from pgps_tune.errors import PgpsError

    with pytest.raises(PgpsError, match=r"was made with seed 0 \(now 5\); resume with the same ones"):
        _trainer(ds, tmp_path / "c", seed=5).fit(resume=True)
    with pytest.raises(PgpsError, match=r"was made with another schedule; resume"):
        Trainer(ds, [0, 1, 2, 3], [4, 5], sch.parametric((16, 16, 16), (2, 2, 2), 4, 6, stages=3, start_fraction=0.25),
                TrainConfig(iterations_per_epoch=2, val_every=1, threads=1, filters=(4, 8, 16), device="cpu"),
                tmp_path / "c").fit(resume=True)


def test_resume_on_other_images_under_the_same_names_is_refused(tmp_path):
    """Two copies of a dataset with one name and the same case names, whose voxels differ: a checkpoint of one is
    not resumed on the other (the identity holds a sample of the cases' voxels)."""
    from conftest import blob_case, make_msd, write_case

    from pgps_tune.errors import PgpsError

    first = data.prepare(make_msd(tmp_path / "one", n=6), cache_root=tmp_path / "cache")
    other_root = make_msd(tmp_path / "two", n=6)
    image, label = blob_case((20, 24, 16), 99)  # one case of six differs
    write_case(other_root, "case_002", image, label)
    other = data.prepare(other_root, cache_root=tmp_path / "cache")
    assert other.name == first.name and other.case_ids == first.case_ids
    stop = _trainer(first, tmp_path / "run", callback=lambda r: _stop_at(r, 2))
    with pytest.raises(KeyboardInterrupt):
        stop.fit()
    with pytest.raises(PgpsError, match="was made with other images or labels under the same case names"):
        _trainer(other, tmp_path / "run").fit(resume=True)
    again = data.prepare(tmp_path / "one", cache_root=tmp_path / "cache2")  # the same data in another cache folder
    assert _trainer(again, tmp_path / "run").fit(resume=True)["completed"]


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
    out, err = capsys.readouterr()
    assert "fg_ratio 0.7 from the schedule file" in err and json.loads(out)["completed"]  # stdout: the JSON alone
    cfg = json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]
    assert cfg["fg_ratio"] == 0.7 and cfg["lr"] == 0.002
    # an explicit flag wins over the file
    assert main([*base, "--out", str(tmp_path / "b"), "--fg-ratio", "0.4", "--quiet"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["config"]["fg_ratio"] == 0.4


def test_evaluate_scores_the_trained_weights(ds, tmp_path):
    run = tmp_path / "run"
    # numpy numbers (as a sampler may give) still make a checkpoint that loads with weights_only
    m = _trainer(ds, run, lr=np.float64(2e-3), seed=np.int64(3)).fit()
    ev = evaluate_run(run, ds, "cpu", cases=[4, 5])  # the validation cases of _trainer
    assert ev["dice"] == pytest.approx(m["val_dice"], abs=1e-6)
    assert ev["dice_per_class"] == pytest.approx(m["val_dice_per_class"], abs=1e-6)
    # the same folder with other weights scores differently: evaluate reads these weights
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    ck["model"] = {k: v + v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1
                   else v for k, v in ck["model"].items()}
    other = tmp_path / "perturbed"
    other.mkdir()
    torch.save(ck, other / "checkpoint.pt")
    assert evaluate_run(other, ds, "cpu", cases=[4, 5])["dice_per_class"] != pytest.approx(
        m["val_dice_per_class"], abs=1e-3)


def test_the_schedule_file_is_what_trains(tiny_msd, tmp_path, monkeypatch):
    # uneven stages, batch sizes and lengths, so that no default could produce them
    s = sch.Schedule((sch.Stage((8, 4, 12), 3, 1), sch.Stage((12, 16, 8), 1, 2), sch.Stage((16, 16, 16), 2, 1)),
                     (16, 16, 16), (2, 2, 2), 2)
    f = tmp_path / "s.yaml"
    s.save(f)
    shapes = []
    step = Trainer._step

    def record(self, image, label):
        shapes.append((image.shape[0], *image.shape[2:]))
        return step(self, image, label)

    monkeypatch.setattr(Trainer, "_step", record)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_msd), "--out", str(out), "--schedule", str(f), "--device", "cpu",
                 "--iterations-per-epoch", "2", "--filters", "4", "8", "16", "--quiet"]) == 0
    assert shapes == [(st.batch_size, *st.patch_size) for st in s.stages for _ in range(2 * st.epochs)]
    metrics = _strict_load((out / "metrics.json").read_text())
    assert [(tuple(m["patch_size"]), m["batch_size"], m["epochs"], m["iterations"]) for m in metrics["stages"]] == [
        (st.patch_size, st.batch_size, st.epochs, 2 * st.epochs) for st in s.stages]
    assert sch.load(out / "schedule.yaml") == s


def test_dataloader_workers_give_the_same_run(ds, tmp_path):
    runs = [_trainer(ds, tmp_path / f"w{w}", workers=w) for w in (0, 2)]
    ms = [t.fit() for t in runs]
    assert [h["train_loss"] for h in ms[0]["history"]] == [h["train_loss"] for h in ms[1]["history"]]
    a, b = (t.model.state_dict() for t in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- untrusted and damaged checkpoints ------------------------------------------------------


class _TouchOnLoad:
    """What an attacker would put in a checkpoint: unpickling it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(path, marker, raw):
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": 1, "model": _TouchOnLoad(marker)}
    if raw:  # a plain pickle, not a torch archive
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    pickle.loads(pickle.dumps(_TouchOnLoad(marker.with_suffix(".check"))))
    assert marker.with_suffix(".check").exists()  # the payload does run code when unpickled


@pytest.mark.parametrize("raw", [False, True], ids=["torch-archive", "raw-pickle"])
def test_a_crafted_checkpoint_runs_nothing(tiny_msd, tmp_path, capsys, raw):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _crafted(run / "checkpoint.pt", marker, raw)
    before = (run / "checkpoint.pt").read_bytes()
    for argv in (["evaluate", "--run", str(run)],
                 ["train", "--out", str(run), "--resume", *_TRAIN]):
        rc = main([*argv, "--data", str(tiny_msd), "--device", "cpu"])
        _one_line(rc, capsys.readouterr().err, "refused to load")
        assert not marker.exists()
    assert (run / "checkpoint.pt").read_bytes() == before  # and nothing deleted or rewritten


def test_damaged_checkpoints_get_one_line_naming_the_file(ds, tmp_path):
    run = tmp_path / "run"
    _trainer(ds, run).fit()
    path = run / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    good_bytes = path.read_bytes()

    def changed(edit):
        ck = torch.load(io.BytesIO(good_bytes), weights_only=True)
        edit(ck)
        return ck

    first_param = next(iter(good["model"]))
    first_buffer = next(iter(good["optimizer"]["state"]))
    damage = {
        "missing optimizer": lambda ck: ck.pop("optimizer"),
        "state is a list": lambda ck: ck.update(state=[1, 2]),
        "iteration is a string": lambda ck: ck["state"].update(iteration="six"),
        "history lost": lambda ck: ck["state"].pop("history"),
        "a history entry lacks its time": lambda ck: ck["state"]["history"][0].pop("val_time_s"),
        "a stage's voxels are a float": lambda ck: ck["state"]["stages"][0].update(voxels=1.5),
        "classes are a bool": lambda ck: ck.update(num_classes=True),
        "weights of the wrong shape": lambda ck: ck["model"].update({first_param: torch.zeros(3)}),
        "optimizer buffer of the wrong shape": lambda ck: ck["optimizer"]["state"][first_buffer].update(
            exp_avg=torch.zeros(2, 2)),
        "numpy RNG cut short": lambda ck: ck["rng"].update(numpy=["MT19937", [1, 2, 3], 0, 0, 0.0]),
        "too many stages": lambda ck: ck["state"]["stages"].append(ck["state"]["stages"][0]),
        "another format": lambda ck: ck.update(format_version=99),
    }
    for name, edit in damage.items():
        torch.save(changed(edit), path)
        with pytest.raises(PgpsError) as err:
            _trainer(ds, run).load_checkpoint()
        msg = str(err.value)
        assert str(path) in msg and "new --out" in msg and len(msg.splitlines()) == 1, (name, msg)
    for content in (b"", b"not a checkpoint", good_bytes[: len(good_bytes) // 2]):
        path.write_bytes(content)
        for load in (lambda: _trainer(ds, run).load_checkpoint(), lambda: evaluate_run(run, ds, "cpu")):
            with pytest.raises(PgpsError, match="unreadable or damaged|refused to load") as err:
                load()
            assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
    torch.save([1, 2, 3], path)
    with pytest.raises(PgpsError, match="not a pgps-tune checkpoint"):
        evaluate_run(run, ds, "cpu")
    torch.save(changed(lambda ck: ck["config"].pop("network")), path)
    with pytest.raises(PgpsError, match="'config and model' does not fit"):
        evaluate_run(run, ds, "cpu")


def _fail_checkpoint_writes(monkeypatch, armed):
    """A disk that fills: fsync of a checkpoint's temporary file raises ENOSPC while ``armed()``."""
    real = os.fsync

    def fsync(fd):
        if armed() and ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_a_full_disk_keeps_the_previous_checkpoint(ds, tmp_path, monkeypatch, capsys, tiny_msd):
    run = tmp_path / "run"
    saved = {}

    def remember(r):
        saved[r["epoch"]] = (run / "checkpoint.pt").read_bytes()

    _fail_checkpoint_writes(monkeypatch, lambda: 2 in saved)  # the disk fills after epoch 2's checkpoint
    with pytest.raises(PgpsError) as err:
        _trainer(ds, run, callback=remember).fit()
    msg = str(err.value)
    assert "No space left" in msg and "checkpoint of iteration 4 is intact" in msg and "--resume" in msg
    assert len(msg.splitlines()) == 1 and sorted(saved) == [1, 2]
    assert (run / "checkpoint.pt").read_bytes() == saved[2]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.json", "schedule.yaml"]
    # the CLI: the first checkpoint cannot be written; one line, a non-zero exit, and no half run left
    _fail_checkpoint_writes(monkeypatch, lambda: True)
    out = tmp_path / "cli"
    rc = main(["train", "--data", str(tiny_msd), "--out", str(out), *_TRAIN, "--quiet"])
    _one_line(rc, capsys.readouterr().err, "No space left")
    assert not out.exists()


# -- divergence, undefined numbers and empty labels ---------------------------------------------


def test_nan_lr_is_refused_and_divergence_stops_the_cli_with_one_line(tiny_msd, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_msd), "--out", str(out), *_TRAIN, "--iterations-per-epoch", "2", "--quiet"]
    with pytest.raises(SystemExit) as stop:  # refused by the parser, before anything is read or written
        main([*argv, "--lr", "nan"])
    assert stop.value.code == 2
    _one_line(2, capsys.readouterr().err, "--lr")
    assert not out.exists()
    # a loss that turns non-finite stops the run: one line, and no half run before the first checkpoint
    from monai.losses import DiceCELoss

    monkeypatch.setattr(DiceCELoss, "forward", lambda self, x, y: (x * float("nan")).mean())
    _one_line(main(argv), capsys.readouterr().err, "diverged")
    assert not out.exists()


def test_non_finite_values_stop_training(ds, tmp_path):
    t = _trainer(ds, tmp_path / "nan")
    image, label, _ = t.sampler.batch(0)
    image, label = torch.from_numpy(image), torch.from_numpy(label).long()
    t._step(image, label)  # a finite batch trains
    poisoned = image.clone()
    poisoned[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(DivergedError, match="diverged: the training loss is nan"):
        t._step(poisoned, label)
    # a finite loss whose gradient is not finite stops too
    next(t.model.parameters()).register_hook(lambda g: g * float("inf"))
    with pytest.raises(DivergedError, match="diverged: the gradient norm is"):
        t._step(image, label)


def test_undefined_numbers_are_written_as_null(ds, tmp_path):
    t = _trainer(ds, tmp_path / "none")
    m = _strict_load(strict_json(t.metrics()))  # before any validation
    assert m["best_val_dice"] is None and m["val_dice"] is None


class _Cases:
    """What evaluate reads of a dataset: cases whose image holds the class to predict at each voxel."""

    num_classes, labels = 3, {0: "background", 1: "a", 2: "b"}

    def __init__(self, predictions, labels):
        self.predictions, self.label_maps = predictions, labels
        self.case_ids = [f"case{i}" for i in range(len(labels))]

    def image(self, i):
        return self.predictions[i][None].astype(np.float32)

    def label(self, i):
        return self.label_maps[i]


class _PredictTheImage(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).permute(0, 4, 1, 2, 3).float() * 10


def test_dice_of_empty_labels():
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = 1
    # case 0: class a predicted exactly (Dice 1); class b in neither label nor prediction (left out)
    # case 1: class a absent from the label but predicted (Dice 0); class b again in neither
    cases = _Cases(predictions=[blob, blob], labels=[blob, empty])
    ev = evaluate(_PredictTheImage(), cases, [0, 1], (4, 4, 4), torch.device("cpu"))
    assert ev["dice_per_class"]["a"] == pytest.approx(0.5)
    assert math.isnan(ev["dice_per_class"]["b"]) and ev["dice"] == pytest.approx(0.5)
    assert _strict_load(strict_json(ev))["dice_per_class"] == {"a": 0.5, "b": None}
    assert _strict_load(strict_json(ev))["dice_per_case"] == {"case0": {"a": 1.0, "b": None},
                                                              "case1": {"a": 0.0, "b": None}}
    # nothing to score at all: the Dice itself is undefined
    ev = evaluate(_PredictTheImage(), _Cases([empty], [empty]), [0], (4, 4, 4), torch.device("cpu"))
    assert _strict_load(strict_json(ev))["dice"] is None


# -- interrupts -----------------------------------------------------------------------------------------

def test_ctrl_c_before_the_first_checkpoint_says_rerun(tiny_msd, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_msd), "--out", str(out), *_TRAIN, "--quiet"]

    def ctrl_c(self, image, label):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_step", ctrl_c)
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 130 and len(err.strip().splitlines()) == 1
    assert "before the first checkpoint" in err and "rerun the same command" in err and "--resume" not in err
    assert not out.exists()
    assert main(argv) == 0  # the rerun is not told "already holds a run"


def test_sigterm_after_a_checkpoint_names_resume(tiny_msd, tmp_path, monkeypatch):
    import pgps_tune.cli as cli

    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_msd), "--out", str(out), *_TRAIN]
    progress = cli._TrainProgress.__call__  # sees every validation

    def terminate_at_epoch_2(self, r):
        progress(self, r)
        if r["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli._TrainProgress, "__call__", terminate_at_epoch_2)
    handler = signal.getsignal(signal.SIGTERM)
    args = build_parser().parse_args(argv)
    with pytest.raises(Interrupted) as err:
        args.func(args)
    assert err.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is handler
    msg = str(err.value)
    assert "SIGTERM" in msg and "checkpoint of iteration 2" in msg and "--resume" in msg
    assert len(msg.splitlines()) == 1
    monkeypatch.setattr(cli._TrainProgress, "__call__", progress)
    assert main([*argv, "--resume", "--quiet"]) == 0
    assert _strict_load((out / "metrics.json").read_text())["iterations"] == 4


def test_sigterm_to_the_process_group_with_dataloader_workers(tiny_msd, tmp_path):
    # a scheduler's stop signals every process of the job; the workers die first, torch reports them
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pgps_tune.cli", "train", "--data", str(tiny_msd), "--out", str(out), *_TRAIN,
            "--epochs", "100000", "--val-every", "100000", "--workers", "2", "--quiet"]  # stderr: the stop only
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the exit code (143) is main()'s to map from Interrupted.exit_code, checked in-process above
    _one_line(proc.returncode, err, "stopped by SIGTERM")
    assert "--resume" in err and read_checkpoint(out / "checkpoint.pt", "")["state"]["iteration"] > 0


# -- GPU-only (skipped here without one) ----------------------------------------------------------------


@needs_cuda
def test_amp_step_on_cuda(ds, tmp_path):
    t = _trainer(ds, tmp_path / "amp", device="cuda")
    assert t.amp and t.scaler.is_enabled()
    image, label, _ = t.sampler.batch(t.total_iterations - 1)
    image, label = torch.from_numpy(image).cuda(), torch.from_numpy(label).long().cuda()

    def weights():
        return [p.detach().clone() for p in t.model.parameters()]

    before = weights()
    assert math.isfinite(t._step(image, label))
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
    # an overflowing fp16 gradient is the scaler's business: the step is skipped, the scale lowered
    hook = next(t.model.parameters()).register_hook(lambda g: g * float("inf"))
    before, scale = weights(), t.scaler.get_scale()
    t._step(image, label)
    assert all(torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
    assert t.scaler.get_scale() < scale
    hook.remove()
    # but a NaN loss still stops the run
    poisoned = image.clone()
    poisoned[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(DivergedError, match="training loss is nan"):
        t._step(poisoned, label)
    m = t.fit()
    assert m["completed"] and m["device"].startswith("cuda")


@needs_cuda
def test_cuda_rng_state_goes_through_a_checkpoint(ds, tmp_path):
    t = _trainer(ds, tmp_path / "rng", device="cuda")
    torch.rand(10, device="cuda")  # away from the seeded state that a new trainer would set again
    t.out.mkdir()
    t.save_checkpoint()
    expected = torch.rand(4, device="cuda")
    resumed = _trainer(ds, tmp_path / "rng", device="cuda")  # reseeds the generators
    resumed.load_checkpoint()
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_fused_sgd_after_a_1x1x1_bottleneck_stage_matches_lazy_unfused_sgd(ds, tmp_path, monkeypatch):
    s = sch.paper((16, 16, 8), (3, 3, 3), 2, 3)  # stage 0 is 8^3: pools of 3 leave a 1x1x1 bottleneck
    assert s.stages[0].patch_size == (8, 8, 8)
    config = TrainConfig(optimizer="sgd", iterations_per_epoch=2, val_every=1, threads=1, filters=(4, 8, 16, 32),
                         device="cpu")

    def run(name):
        untrained = []

        def after_stage_0(r):
            if r["epoch"] == 1:  # parameters without a gradient yet have no (lazy) or a zero (fused) buffer
                state = t.opt.state
                untrained.extend(p for p in t.model.parameters()
                                 if state[p].get("momentum_buffer") is None or not state[p]["momentum_buffer"].any())
        t = Trainer(ds, [0, 1, 2, 3], [4, 5], s, config, tmp_path / name, after_stage_0)
        t.fit()
        return t, untrained

    fused, fused_untrained = run("fused")
    assert fused.opt.defaults["fused"]

    class LazySGD(torch.optim.SGD):  # torch's own unfused path: a buffer appears with the first gradient
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "fused": False})

    monkeypatch.setattr(torch.optim, "SGD", LazySGD)
    monkeypatch.setattr(Trainer, "_fill_momentum", lambda self: None)
    lazy, lazy_untrained = run("lazy")
    assert not lazy.opt.defaults["fused"]
    assert lazy_untrained and len(lazy_untrained) == len(fused_untrained)  # the case that broke fused SGD
    for (k, a), b in zip(fused.model.state_dict().items(), lazy.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_prefetched_batches_are_the_sampler_batches_and_the_thread_stops(ds, tmp_path):
    import threading

    t = _trainer(ds, tmp_path / "p")
    t.prefetch_depth = 2  # off by default on the CPU (docs/bench_iteration.md)
    batches = t._batches(3)
    for it, k, image, label in [next(batches) for _ in range(4)]:
        ref_image, ref_label, ref_stage = t.sampler.batch(it)
        assert (image.numpy() == ref_image).all() and (label.numpy() == ref_label).all() and k == ref_stage
    assert [th for th in threading.enumerate() if th.name == "pgps-prefetch"]
    batches.close()  # what fit() does when it stops early
    assert not [th for th in threading.enumerate() if th.name == "pgps-prefetch"]


def test_random_patch_sampling_trains_end_to_end_and_validates_at_the_final_patch(ds, tmp_path, monkeypatch):
    from pgps_tune import trainer as trainer_module

    windows = []
    real = trainer_module.sliding_window_inference

    def recording(inputs, roi_size, *args, **kwargs):
        windows.append(tuple(roi_size))
        return real(inputs, roi_size, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "sliding_window_inference", recording)
    s = sch.randomize(_schedule())  # 4^3, 8^3, 16^3, each drawn with odds 2/6
    config = TrainConfig(iterations_per_epoch=2, val_every=3, threads=1, filters=(4, 8, 16), device="cpu")
    t = Trainer(ds, [0, 1, 2, 3], [4, 5], s, config, tmp_path / "r")
    m = t.fit()
    draws = [s.stage_index_of_iteration(i, 2, config.seed) for i in range(12)]
    assert len(set(draws)) > 1 and draws != sorted(draws)  # this seed mixes the sizes (else the test says nothing)
    assert [st["iterations"] for st in m["stages"]] == [draws.count(k) for k in range(3)]
    assert m["voxels_processed"] == sum(s.stages[k].batch_size * s.stages[k].patch_voxels for k in draws)
    assert m["completed"] and 0 <= m["val_dice"] <= 1 and len(m["history"]) == 2
    assert windows and set(windows) == {(16, 16, 16)}  # every validation at the final patch
    assert sum(st["wall_time_s"] for st in m["stages"]) == pytest.approx(m["train_time_s"])
    assert sch.load(tmp_path / "r" / "schedule.yaml").sampling == "random"
    # the staged twin of the same stages is another run: its checkpoint is not resumed as this one
    with pytest.raises(PgpsError, match=r"was made with sampling random \(now staged\)"):
        Trainer(ds, [0, 1, 2, 3], [4, 5], _schedule(), config, tmp_path / "r").fit(resume=True)


def test_trainer_refuses_an_unknown_optimizer_and_a_schedule_that_is_not_one(tmp_path):
    ds = data.prepare("synthetic", tmp_path / "cache", synthetic_cases=4, synthetic_shape=(16, 16, 16))
    s = sch.constant((16, 16, 16), (2, 2, 2), 2, 2)
    cfg = TrainConfig(filters=(4, 8, 16), iterations_per_epoch=1, device="cpu", threads=1)
    with pytest.raises(PgpsError, match="optimizer: unknown optimizer 'adam'"):  # was KeyError: 'adam'
        Trainer(ds, [0, 1], [2, 3], s, cfg.replace(optimizer="adam"), tmp_path / "run")
    with pytest.raises(PgpsError, match="TrainConfig.optimizer: unknown optimizer 'adam'"):  # alone, too
        cfg.replace(optimizer="adam").resolved_lr()
    with pytest.raises(PgpsError, match="schedule must be a Schedule, got a dict"):
        Trainer(ds, [0, 1], [2, 3], s.to_dict(), cfg, tmp_path / "run")
    # a config built in Python gets a flag's checks: these trained something else or failed later
    for change, line in (({"fg_ratio": 2.0}, r"TrainConfig.fg_ratio must be .*got 2.0"),
                         ({"threads": 0}, r"TrainConfig.threads must be .*got 0"),
                         ({"workers": -1}, r"TrainConfig.workers must be .*got -1"),
                         ({"val_every": 0}, r"TrainConfig.val_every must be .*got 0"),
                         ({"augment": "heavy"}, r"TrainConfig.augment: unknown augmentation 'heavy'")):
        with pytest.raises(PgpsError, match=line):
            Trainer(ds, [0, 1], [2, 3], s, cfg.replace(**change), tmp_path / "run")
    for train, val, bad in (([0, 9], [2, 3], "train_cases holds 9"), ([0, 1], [-1], "val_cases holds -1"),
                            ([0, 1.0], [2], "train_cases holds 1.0")):
        with pytest.raises(PgpsError, match=f"{bad}, which is not a case index of synthetic \\(0 to 3\\)"):
            Trainer(ds, train, val, s, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    import numpy as np  # NumPy scalars (a grid's, a sampler's) are the numbers they hold
    Trainer(ds, [np.int64(0), 1], [2, 3], s, cfg.replace(seed=np.int64(3), fg_ratio=np.float64(0.4)), tmp_path / "ok")
