"""Network widths (--feature-size, --hidden-size): checked before training, carried like the other recipe fields."""

import dataclasses
import json

import pytest
import torch

from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.config import Recipe, TrainConfig
from pgps_tune.errors import PgpsError


def exit_code(argv: list[str]) -> int:
    """main's exit status, also when argparse refuses a flag's value (it exits)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


SPACE = {"parameters": {"stages": {"type": "int", "low": 1, "high": 2}}}


def test_space_budget_widths_reach_the_trial_config_and_bad_ones_are_refused():
    space = sp.parse({**SPACE, "budget": {"network": "unetr", "token_size": 8, "feature_size": 8, "hidden_size": 192}},
                     "s.yaml")
    cfg = TrainConfig.for_trial(dataclasses.asdict(space.budget), {}, device="cpu", threads=1)
    assert (cfg.network, cfg.feature_size, cfg.hidden_size) == ("unetr", 8, 192)
    assert sp.parse(SPACE, "s.yaml").budget.feature_size is None  # null: MONAI's default width
    for budget, needle in (
        ({"network": "swinunetr", "feature_size": 16}, "s.yaml: budget.feature_size 16 does not suit swinunetr: "
                                                       "it needs a multiple of 12"),
        ({"network": "segresnet", "feature_size": 12}, "budget.feature_size 12 does not suit segresnet"),
        ({"network": "unetr", "hidden_size": 200}, "budget.hidden_size 200 does not suit unetr: it needs a multiple "
                                                   "of 64"),
        ({"hidden_size": 0}, "budget.hidden_size"),
        ({"feature_size": "wide"}, "budget.feature_size"),
    ):
        with pytest.raises(PgpsError, match=needle) as e:
            sp.parse({**SPACE, "budget": budget}, "s.yaml")
        assert "\n" not in str(e.value)
    # a recipe read from a schedule file is checked the same way
    with pytest.raises(PgpsError, match="recipe.train.feature_size 18 does not suit swinunetr"):
        TrainConfig.parse({"network": "swinunetr", "feature_size": 18}, "recipe.train")


@pytest.mark.parametrize("flags, needle", [
    (["--network", "swinunetr", "--feature-size", "16"], "--feature-size 16 does not suit swinunetr"),
    (["--network", "unetr", "--token-size", "4", "--hidden-size", "96"], "--hidden-size 96 does not suit unetr"),
    (["--network", "unet", "--hidden-size", "192"], "--hidden-size applies to --network unetr, not unet"),
    (["--network", "dynunet", "--feature-size", "8"], "--feature-size applies to --network segresnet, swinunetr, "
                                                      "unetr, not dynunet (its widths are --filters)"),
    (["--network", "unetr", "--hidden-size", "0"], "--hidden-size"),
    (["--network", "dynunet", "--res-units", "2"], "--res-units applies to --network unet, not dynunet; drop it"),
    (["--res-units", "0"], "--res-units"),
])
def test_train_refuses_bad_widths_in_one_line_before_writing(capsys, tiny_msd, tmp_path, flags, needle):
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_msd), "--out", str(out), "--final-patch", "16", "16", "16",
            "--pools", "2", "2", "2", "--epochs", "1", "--quiet", *flags]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_tune_refuses_a_width_flag_its_budget_network_cannot_take(capsys, tmp_path):
    argv = ["tune", "--space", "quick", "--data", "synthetic", "--out", str(tmp_path / "sw"),
            "--network", "swinunetr", "--feature-size", "20"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "feature-size 20 does not suit swinunetr" in err[-1] and not (tmp_path / "sw").exists()


def test_train_carries_the_widths_into_metrics_and_the_checkpoint_identity(capsys, tiny_msd, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_msd), "--out", str(out), "--final-patch", "16", "16", "16",
            "--pools", "2", "2", "2", "--preset", "constant", "--epochs", "1", "--iterations-per-epoch", "1",
            "--network", "unetr", "--token-size", "4", "--feature-size", "4", "--hidden-size", "32",
            "--augment", "none", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["feature_size"], config["hidden_size"]) == (4, 32)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["model"]["out.conv.conv.weight"].shape[1] == 4  # the network was built at that width
    assert ck["identity"]["config"]["hidden_size"] == 32
    capsys.readouterr()
    # resuming with another width is refused: it is another network
    assert main([*argv[:-1], "--hidden-size", "64", "--resume", "--quiet"]) == 2
    assert "was made with hidden_size 32 (now 64); resume with the same ones" in capsys.readouterr().err
    assert Recipe.parse({"version": 1, "train": {**config}, "data": {
        "dataset": "x", "source": "x", "val_fraction": 0.2, "split_seed": 0}}).train.hidden_size == 32


def test_res_units_deepen_the_unet_and_travel_with_the_recipe(capsys, tiny_msd, tmp_path):
    from pgps_tune.network import build_network

    def convs(units):
        net = build_network("unet", 1, 2, (2, 2, 2), (4, 8, 16), res_units=units)
        return sum(isinstance(m, torch.nn.Conv3d) for m in net.modules())

    assert convs(2) > convs(1)  # one more convolution per residual unit at every level
    with pytest.raises(PgpsError, match="--res-units shapes --network unet; segresnet"):
        build_network("segresnet", 1, 2, (2, 2, 2), res_units=2)
    space = sp.parse({**SPACE, "budget": {"res_units": 2}}, "s.yaml")
    assert TrainConfig.for_trial(dataclasses.asdict(space.budget), {}, device="cpu", threads=1).res_units == 2
    with pytest.raises(PgpsError, match="budget.res_units shapes the unet network, not dynunet"):
        sp.check_space_against_plan(sp.parse({**SPACE, "budget": {"res_units": 2, "network": "dynunet"}}, "s.yaml"),
                                    (32, 32, 32), (2, 2, 2))
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_msd), "--out", str(out), "--final-patch", "16", "16", "16",
            "--pools", "2", "2", "2", "--preset", "constant", "--epochs", "1", "--iterations-per-epoch", "1",
            "--filters", "4", "8", "16", "--res-units", "2", "--augment", "none", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["res_units"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["identity"]["config"]["res_units"] == 2
    capsys.readouterr()
    assert main([*argv[:-1], "--res-units", "1", "--resume", "--quiet"]) == 2  # another network: refused
    assert "was made with res_units 2 (now 1); resume with the same ones" in capsys.readouterr().err
    # a recipe from before the setting existed trained with one unit
    old = {k: v for k, v in config.items() if k != "res_units"}
    assert TrainConfig.from_dict(old).res_units == 1 and TrainConfig.parse(old, "recipe.train").res_units == 1
