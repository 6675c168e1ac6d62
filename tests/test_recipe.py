"""An exported schedule carries its trial's recipe, and ``train --schedule`` trains that trial again.

One tiny Ray sweep (one trial, no references, no ASHA) is shared by the end-to-end checks;
the rest needs no Ray.
"""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import yaml

from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.config import DataIdentity, Recipe, TrainConfig
from pgps_tune.results import TrialRecord, best_schedule, export_sweep

# every trainer value off its default, so that a default cannot pass for the recipe's value
BUDGET = {
    "epochs": 10, "iterations_per_epoch": 6, "batch_size": 2, "filters": [4, 8, 16], "optimizer": "adamw", "lr": 0.01,
    "val_every": 5, "fg_ratio": 0.6, "seed": 5, "augment": "light", "val_fraction": 0.34, "split_seed": 3,
    "synthetic_cases": 4, "synthetic_shape": [16, 16, 16], "final_patch": [16, 16, 16], "pools": [2, 2, 2],
}


@pytest.fixture(autouse=True)
def _store(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))


def _recipe_on_synthetic(**train) -> Recipe:
    cfg = TrainConfig(network="unet", filters=(4, 8, 16), optimizer="sgd", lr=0.02, iterations_per_epoch=2,
                      seed=5, device="cpu", threads=1, fg_ratio=0.6, val_every=1, augment="none").replace(**train)
    data = DataIdentity("synthetic", "synthetic", 0.34, 3, synthetic_cases=4, synthetic_shape=(16, 16, 16))
    return Recipe(cfg, data)


def test_the_export_carries_every_trainer_setting_and_the_data(tmp_path):
    cfg = TrainConfig(
        network="dynunet", filters=(4, 8, 16), deep_supervision=True, feature_size=12, hidden_size=256, token_size=8,
        augment="elastic", cpu_precision="fp32", optimizer="sgd", lr=0.05, weight_decay=1e-4, momentum=0.9,
        iterations_per_epoch=7, seed=11, device="cpu", threads=3, workers=2, fg_ratio=0.8, volumes_per_batch=1,
        val_every=2, sw_batch_size=2, sw_overlap=0.5, max_train_seconds=99.0, res_units=2,
    )
    assert all(getattr(cfg, f.name) != f.default for f in dataclasses.fields(TrainConfig)), "every field off default"
    data = DataIdentity("Tiny", "/data/Tiny", 0.25, 9, spacing=(1.0, 1.5, 2.0),
                        normalisation=({"type": "zscore"},))
    s = dataclasses.replace(sch.parametric((16, 16, 16), (2, 2, 2), 2, 4, stages=2, growth=2.0),
                            recipe=Recipe(cfg, data))
    record = TrialRecord("t1", "TERMINATED", {"role": "search"}, {
        "val_dice": 0.5, "score": 0.5, "completed": True, "schedule": json.dumps(s.to_dict()),
        "schedule_voxel_fraction": s.voxel_fraction(), "train_time_s": 1.0, "role": "search"})
    meta = {"sweep": "sw", "dataset": "Tiny", "space": "s.yaml", "objective": {"type": "max_dice"},
            "final_patch": [16, 16, 16], "finished": True,
            "asha": {"time_attr": "baseline_iterations", "max_t": 8, "grace_period": 1, "reduction_factor": 2,
                     "brackets": 1}}
    export_sweep(tmp_path, meta, [record], tmp_path / "store")
    raw = yaml.safe_load((tmp_path / "best_schedule.yaml").read_text())
    assert set(raw["recipe"]["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert raw["recipe"]["data"]["dataset"] == "Tiny" and raw["recipe"]["data"]["split_seed"] == 9
    best = sch.load(tmp_path / "best_schedule.yaml")
    assert best.recipe == Recipe(cfg, data) and best.stages == s.stages
    # the results store answers with the same recipe, and a rescaled or converted copy keeps it
    assert best_schedule("Tiny", tmp_path / "store").recipe == Recipe(cfg, data)
    assert sch.rescale_epochs(best, 8).recipe == best.recipe
    assert main(["schedule", "--from", str(tmp_path / "best_schedule.yaml"), "--out", str(tmp_path / "c.json")]) == 0
    assert sch.load(tmp_path / "c.json").recipe == best.recipe


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["train"].update(learning_rate=0.1), "recipe.train: unknown key(s) ['learning_rate']"),
    (lambda r: r["train"].update(lr=-1), "recipe.train.lr must be a number in (0, 10], got -1"),
    (lambda r: r["train"].update(network="vnet"), "recipe.train.network: unknown network 'vnet'"),
    (lambda r: r["data"].update(val_fraction=1.5), "recipe.data.val_fraction must be a number in (0, 1)"),
    (lambda r: r.update(version=7), "recipe.version 7 is not supported"),
    (lambda r: r.pop("version"), "recipe lacks 'version' (a recipe starts with 'version: 1')"),
    (lambda r: r.update(extra=1), "recipe: unknown key(s) ['extra']"),
    (lambda r: r["data"].update(normalisation=[{"type": "minmax"}]), "recipe.data.normalisation[0].type 'minmax' is "
     "not a normalisation scheme; use one of ct, zscore, none, rescale, rgb"),
    (lambda r: r["data"].update(normalisation=[{"type": "zscore", "mean": 3}]),
     "recipe.data.normalisation[0]: unknown key(s) ['mean']; a zscore entry has only type"),
    (lambda r: r["data"].update(normalisation=[{"type": "ct", "lower": 1, "upper": 0, "mean": 0, "sd": 1}]),
     "lower <= upper"),
    (lambda r: r["data"].update(normalisation=[{"type": "ct"}]),
     "recipe.data.normalisation[0]: lacks lower, upper, mean, sd; a ct entry has type, lower, upper, mean, sd"),
    # well formed, but not what train will do: synthetic data are z-scored
    (lambda r: r["data"].update(normalisation=[{"type": "none"}]), "recipe.data.normalisation says none per "
     "channel, but --data synthetic is prepared as zscore (from its modalities), and train normalises as the data "
     "are prepared; correct recipe.data.normalisation or delete it"),
])
def test_a_bad_recipe_is_refused_in_one_line_naming_the_key(tmp_path, capsys, edit, needle):
    s = dataclasses.replace(sch.constant((16, 16, 16), (2, 2, 2), 2, 2), recipe=_recipe_on_synthetic())
    raw = s.to_dict()
    edit(raw["recipe"])
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--schedule", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_flags_given_override_the_recipe_and_are_reported_others_do_not(tmp_path, capsys):
    s = dataclasses.replace(sch.constant((16, 16, 16), (2, 2, 2), 2, 1), recipe=_recipe_on_synthetic())
    f = tmp_path / "s.yaml"
    s.save(f)
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "a"), "--schedule", str(f), "--quiet",
                 "--lr", "0.01", "--no-deep-supervision", "--split-seed", "4"]) == 0
    err = capsys.readouterr().err
    assert "train: --lr 0.01 overrides the schedule file's lr 0.02" in err
    assert "train: --split-seed 4 overrides the schedule file's split_seed 3" in err
    # a flag equal to the recipe's value changes nothing, so it is not reported as an override
    assert "deep-supervision" not in err and err.count("overrides") == 2
    # refused later (a width the network lacks): the error line comes alone, without the override notes
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "b"), "--schedule", str(f), "--quiet",
                 "--lr", "0.01", "--feature-size", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--feature-size applies to" in err[0], err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["config"] == {**s.recipe.train.to_dict(), "lr": 0.01}
    # the run's own schedule file records what the run trained with, overrides included
    run_recipe = sch.load(tmp_path / "a" / "schedule.yaml").recipe
    assert run_recipe.train.lr == 0.01 and (run_recipe.data.split_seed, run_recipe.data.val_fraction) == (4, 0.34)
    # the synthetic data is made as the recipe's (4 cases), split as the recipe's fraction with the given seed
    assert len(metrics["split"]["train"]) + len(metrics["split"]["val"]) == 4


def test_a_schedule_file_without_a_recipe_trains_with_the_defaults(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    sch.constant((16, 16, 16), (2, 2, 2), 2, 1).save(f)
    assert "recipe" not in yaml.safe_load(f.read_text())
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "r"), "--schedule", str(f), "--quiet",
                 "--filters", "4", "8", "16", "--iterations-per-epoch", "1", "--threads", "1"]) == 0
    config = json.loads((tmp_path / "r" / "metrics.json").read_text())["config"]
    assert config == TrainConfig(filters=(4, 8, 16), iterations_per_epoch=1, threads=1).to_dict()
    assert "overrides" not in capsys.readouterr().err


def test_train_with_an_exported_schedule_reproduces_its_trial(shared_ray, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "recipe",
        "parameters": {"stages": {"value": 2}, "growth": {"value": 2.0}, "mode": {"value": "resource"}},
        "search": {"algorithm": "random", "num_samples": 1, "seed": 0, "references": False},
        "asha": {"enabled": False}, "confirm": {"enabled": False},
        "budget": BUDGET,
    }))
    sweep = tmp_path / "sweep"
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(sweep), "--quiet"]) == 0
    (trial,) = pq.read_table(sweep / "trials.parquet").to_pylist()
    assert trial["completed"]
    best_file = sweep / "best_schedule.yaml"
    recipe = sch.load(best_file).recipe
    assert recipe is not None and recipe.train.seed == 5 and recipe.data.split_seed == 3
    capsys.readouterr()
    run = tmp_path / "again"
    assert main(["train", "--data", "synthetic", "--out", str(run), "--schedule", str(best_file), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_dice"] == trial["final_dice"] > 0  # exactly: same recipe, data, split and sampler order
    assert metrics["val_dice_per_class"] == json.loads(trial["dice_per_class"])
    assert metrics["config"] == recipe.train.to_dict()
    assert "overrides" not in capsys.readouterr().err
