"""Networks: patch rules checked before training; UNETR trains a growing patch; the others at two sizes."""

import pytest
import torch
from monai.networks.nets import UNETR
from torch import nn

from pgps_tune import data
from pgps_tune import schedule as sch
from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.config import TrainConfig, check_network_patches, patch_multiple
from pgps_tune.errors import PgpsError
from pgps_tune.network import ProgressiveUNETR, build_network
from pgps_tune.trainer import CHECKPOINT, Trainer, evaluate_run

TINY_UNETR = {"network": "unetr", "token_size": 4, "feature_size": 4, "hidden_size": 16}


@pytest.fixture
def ds(tiny_msd):
    return data.prepare(tiny_msd)


def test_unetr_trains_every_stage_of_a_growing_schedule_and_resumes_exactly(ds, tmp_path):
    s = sch.parametric((16, 16, 16), (2, 2, 2), 2, 3, stages=3, start_fraction=0.25, multiple_of=(4, 4, 4))
    assert [st.patch_size for st in s.stages] == [(4, 4, 4), (8, 8, 8), (16, 16, 16)]
    cfg = TrainConfig(iterations_per_epoch=1, val_every=1, threads=1, augment="none", **TINY_UNETR)
    reports = []
    m = Trainer(ds, [0, 1, 2, 3], [4], s, cfg, tmp_path / "a", reports.append).fit()
    assert m["completed"] and [r["stage"] for r in reports] == [0, 1, 2] and 0 <= m["val_dice"] <= 1
    saved = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)["model"]
    assert saved["vit.patch_embedding.position_embeddings"].shape == (1, 4 * 4 * 4, 16)  # the final grid

    def stop_after_stage_0(r):
        if r["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(ds, [0, 1, 2, 3], [4], s, cfg, tmp_path / "b", stop_after_stage_0).fit()
    assert 0 <= evaluate_run(tmp_path / "b", ds, "cpu")["dice"] <= 1  # trained at 4^3 so far, evaluated at 16^3
    resumed = Trainer(ds, [0, 1, 2, 3], [4], s, cfg, tmp_path / "b").fit(resume=True)
    assert resumed["val_dice"] == m["val_dice"]
    after = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["model"]
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_unetr_embeddings_are_stored_at_the_final_grid_and_resized_per_stage():
    net = ProgressiveUNETR(1, 2, (16, 32, 24), token_size=8, feature_size=4, hidden_size=16)
    stored = net.vit.patch_embedding.position_embeddings
    assert stored.shape == (1, 2 * 4 * 3, 16)
    assert torch.equal(net.position_embeddings_at((2, 4, 3)), stored)
    small = net.position_embeddings_at((1, 2, 3))
    assert small.shape == (1, 6, 16)
    grid = stored.detach().reshape(2, 4, 3, 16)  # tokens in row-major (x, y, z) order
    assert torch.allclose(small[0, 0], grid[:2, :2, 0].mean((0, 1)), atol=1e-6)  # trilinear at cell centres
    net.train()
    for patch in ((8, 8, 8), (16, 32, 24)):
        out = net(torch.randn(2, 1, *patch))
        out.mean().backward()
        assert out.shape == (2, 2, *patch)


def test_unetr_at_token_16_is_monais_unetr():
    ours = build_network("unetr", 1, 3, (4, 4, 4), final_patch=(32, 16, 16), feature_size=4, hidden_size=16)
    ref = UNETR(1, 3, (32, 16, 16), feature_size=4, hidden_size=16, mlp_dim=64, num_heads=1)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 1, 32, 16, 16)
    assert torch.allclose(ours.eval()(x), ref.eval()(x), atol=1e-5)


@pytest.mark.parametrize("name, patches", [
    ("swinunetr", ((32, 32, 32), (64, 32, 32))),
    ("segresnet", ((8, 8, 8), (16, 24, 8))),
    ("dynunet_resenc", ((8, 8, 8), (16, 24, 8))),
])
def test_networks_train_at_two_patch_sizes(name, patches):
    net = build_network(name, 1, 3, (3, 3, 3), (4, 8, 16, 32), feature_size=12 if name == "swinunetr" else None)
    net.train()
    for patch in patches:
        out = net(torch.randn(1, 1, *patch))
        out.mean().backward()
        assert out.shape == (1, 3, *patch)


def test_patch_rules_are_checked_before_training_with_the_smallest_legal_patch(ds, tmp_path):
    s = sch.paper((64, 64, 32), (3, 3, 3), 2, 30)
    with pytest.raises(PgpsError, match="stage 0 patch 8x8x8 does not suit --network swinunetr.*"
                                        "smallest legal patch is 32x32x32"):
        check_network_patches("swinunetr", s)
    s = sch.paper((16, 16, 16), (2, 2, 2), 2, 10)  # starts at 4x4x4
    cfg = TrainConfig(network="unetr", token_size=8, threads=1)
    with pytest.raises(PgpsError, match="token size 8 needs multiples of 8x8x8.*smallest legal patch is 8x8x8") as e:
        Trainer(ds, [0, 1], [2], s, cfg, tmp_path / "refused")
    assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()
    # the paper preset built for the network starts at its smallest legal patch
    swin = sch.paper((64, 64, 32), (3, 3, 3), 2, 30, multiple_of=patch_multiple("swinunetr", (3, 3, 3)))
    assert [st.patch_size for st in swin.stages] == [(32, 32, 32), (64, 32, 32), (64, 64, 32)]
    unetr = sch.paper((16, 16, 16), (2, 2, 2), 2, 10, multiple_of=patch_multiple("unetr", (2, 2, 2), 8))
    assert unetr.stages[0].patch_size == (8, 8, 8)
    check_network_patches("swinunetr", swin)
    assert patch_multiple("segresnet", (2, 3, 3)) == (4, 4, 4)


def test_cli_and_space_build_schedules_for_the_network(capsys, tiny_msd, tmp_path):
    argv = ["train", "--data", str(tiny_msd), "--out", str(tmp_path / "o"), "--final-patch", "40", "40", "40",
            "--pools", "3", "3", "3", "--network", "swinunetr", "--epochs", "3", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "smallest legal patch is 32x32x32" in err
    raw = {"parameters": {"stages": {"type": "int", "low": 1, "high": 3}, "growth": {"value": 2.0}},
           "budget": {"network": "swinunetr", "epochs": 6, "augment": "light"}}
    space = sp.parse(raw, "s.yaml")
    assert space.budget.augment == "light"
    sp.check_space_against_plan(space, (64, 64, 64), (3, 3, 3))  # every trial schedule snaps to multiples of 32
    with pytest.raises(PgpsError, match="smallest legal patch is 32x32x32"):
        sp.check_space_against_plan(space, (48, 64, 64), (3, 3, 3))
    for bad, needle in (({"augment": "heavy"}, "budget.augment: unknown augmentation 'heavy'"),
                        ({"network": "vnet"}, "budget.network 'vnet' unknown"),
                        ({"token_size": 12}, "budget.token_size 12 unknown")):
        with pytest.raises(PgpsError, match=needle):
            sp.parse({**raw, "budget": bad}, "s.yaml")


@pytest.mark.parametrize("name", ["unet", "dynunet", "segresnet"])
def test_thin_convolutions_leave_bf16_autocast_and_their_gradients_repeat(name):
    # under CPU bf16 autocast a convolution whose input or output has at most CPU_BF16_THIN_DEPTH voxels
    # along the first spatial axis computes in fp32 (oneDNN's bf16 weight gradient there was not
    # repeatable); the others in bf16
    from pgps_tune import network as network_mod

    torch.manual_seed(0)
    kw = {"filters": (4, 8, 16, 32)} if name != "segresnet" else {"feature_size": 8}
    net = build_network(name, 1, 2, (3, 3, 3), **kw)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert convs and all(type(m) in (network_mod.GuardedConv3d, network_mod.GuardedConvTranspose3d) for m in convs)
    seen = []
    for m in convs:
        m.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[2], out.shape[2], out.dtype)))
    x = torch.randn(3, 1, 16, 16, 16)
    grads = []
    for _ in range(2):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        out.float().square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    thin = network_mod.CPU_BF16_THIN_DEPTH
    assert {d for i, o, d in seen if min(i, o) <= thin} == {torch.float32}
    assert {d for i, o, d in seen if min(i, o) > thin} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with torch.no_grad():  # outside autocast nothing changes: the plain fp32 forward
        assert net(x).dtype == torch.float32
