"""The confirmation phase: its statistics, its folds, its choice of schedules, and one sweep end to end."""

import html
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_cli import refused
from test_tuner import BUDGET, write_space

from pgps_tune import data
from pgps_tune import schedule as sch
from pgps_tune import space as sp
from pgps_tune.cli import main
from pgps_tune.results import confirm_candidates, confirmation_summary, search_check
from pgps_tune.stats import paired_comparison, spread

ROOT = Path(__file__).resolve().parents[1]

# -- statistics ---------------------------------------------------------------------------------


def test_paired_t_test_matches_a_hand_computation():
    a, b = [0.80, 0.82, 0.85], [0.78, 0.79, 0.80]
    d = [x - y for x, y in zip(a, b)]  # 0.02, 0.03, 0.05
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    se = sd / math.sqrt(3)
    t = mean / se
    # Student's t with 2 degrees of freedom has a closed form: two-sided p = 1 - t / sqrt(t^2 + 2),
    # and its 97.5% quantile is 4.302652729911275 (any t table)
    c = paired_comparison(a, b)
    assert c.n == 3
    assert c.mean_diff == pytest.approx(mean, rel=1e-12)
    assert c.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert (c.ci_low, c.ci_high) == pytest.approx((mean - 4.302652729911275 * se, mean + 4.302652729911275 * se))
    assert c.ci_low < 0 < c.ci_high and not c.better and not c.worse  # p > 0.05: the interval holds 0
    assert c.to_dict()["significantly_better"] is False and c.to_dict()["confidence"] == 0.95


def test_paired_comparison_edges():
    # a consistent gain over enough pairs is significant, in one direction only
    gain = paired_comparison([0.90, 0.91, 0.92, 0.93, 0.94], [0.80, 0.80, 0.83, 0.82, 0.85])
    assert gain.better and not gain.worse and gain.ci_low > 0 and gain.p_value < 0.05
    loss = paired_comparison([0.80, 0.80, 0.83, 0.82, 0.85], [0.90, 0.91, 0.92, 0.93, 0.94])
    assert loss.worse and not loss.better
    # a NaN (a failed trial) drops its pair; one pair left has no spread to test against
    one = paired_comparison([0.5, math.nan], [0.4, 0.6])
    assert one.n == 1 and one.mean_diff == pytest.approx(0.1) and math.isnan(one.p_value) and not one.better
    assert paired_comparison([math.nan], [0.1]).n == 0
    # identical results: no difference at all
    same = paired_comparison([0.3, 0.4], [0.3, 0.4])
    assert (same.mean_diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0) and not same.better
    with pytest.raises(ValueError, match="differ in length"):
        paired_comparison([0.1, 0.2], [0.1])


def test_spread_is_mean_and_sample_sd_over_finite_values():
    s = spread([0.2, 0.4, 0.6, math.nan])
    assert s.n == 3 and s.mean == pytest.approx(0.4) and s.sd == pytest.approx(0.2)
    single = spread([0.7])
    assert single.n == 1 and single.mean == 0.7 and math.isnan(single.sd)
    assert spread([]).n == 0


# -- folds ----------------------------------------------------------------------------------------


def test_fold_split_validates_every_case_once_and_reads_a_splits_file(tiny_msd, tmp_path, capsys):
    ds = data.prepare(tiny_msd)
    n = len(ds)
    folds = [data.fold_split(ds, 3, i, seed=5) for i in range(3)]
    vals = [v for _, v in folds]
    assert sorted(c for v in vals for c in v) == list(range(n))  # every case validated exactly once
    for train, val in folds:
        assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
    assert folds == [data.fold_split(ds, 3, i, seed=5) for i in range(3)]  # seeded
    assert [data.fold_split(ds, 3, i, seed=6)[1] for i in range(3)] != vals
    f = tmp_path / "splits.json"
    ids = ds.case_ids
    f.write_text(json.dumps([{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:]}]))
    assert data.fold_split(ds, 2, 1, splits_file=f) == ([0, 1], list(range(2, n)))
    with pytest.raises(data.PgpsError, match="must be a list of 3 folds"):
        data.fold_split(ds, 3, 0, splits_file=f)
    with pytest.raises(data.PgpsError, match=f"has {n} cases; use 2 to {n} folds"):
        data.fold_split(ds, n + 1, 0)
    f.write_text(json.dumps([{"train": ["nope"], "val": ids[:1]}]))
    with pytest.raises(data.PgpsError, match="names 1 case id.* that dataset .* does not have"):
        data.fold_split(ds, 1, 0, splits_file=f)


# -- the space's confirm section --------------------------------------------------------------------


@pytest.mark.parametrize("confirm,needle", [
    ({"seeds": 1}, "confirm.seeds must be an integer in [2, 1000], got 1"),
    ({"folds": 1}, "confirm.folds must be an integer in [2, 1000], got 1"),
    ({"top_k": 0}, "confirm.top_k must be an integer in [1, 1000], got 0"),
    ({"epochs": 2.5}, "confirm.epochs must be an integer"),
    ({"enabled": "yes"}, "confirm.enabled must be true or false"),
    ({"splits": 3}, "confirm.splits must be a string"),
    ({"seed": 3}, "unknown key(s) ['seed'] in 'confirm'"),
])
def test_bad_confirm_sections_are_refused_in_one_line(confirm, needle):
    with pytest.raises(sp.PgpsError) as exc:
        sp.parse({"parameters": {"stages": {"value": 1}}, "confirm": confirm}, "s.yaml")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_confirm_section_defaults_and_nulls():
    c = sp.parse({"parameters": {"stages": {"value": 1}}}).confirm
    assert (c.enabled, c.top_k, c.seeds, c.folds, c.epochs) == (True, 3, 3, None, None)
    c = sp.parse({"parameters": {"stages": {"value": 1}}, "confirm": {"folds": 5, "epochs": None}}).confirm
    assert c.folds == 5 and c.epochs is None


def test_confirm_epochs_too_short_for_the_paper_reference_is_refused_before_a_trial():
    space = sp.parse({"parameters": {"stages": {"value": 1}}, "budget": {"epochs": 20},
                      "confirm": {"epochs": 3}}, "s.yaml")
    with pytest.raises(sp.PgpsError, match="paper reference cannot be built at confirm.epochs 3"):
        sp.check_space_against_plan(space, (16, 16, 16), (2, 2, 2))


# -- choosing and judging schedules ------------------------------------------------------------------


def row(trial_id, phase, role, params, dice, schedule="s1", completed=True, per_class=None):
    return {"trial_id": trial_id, "phase": phase, "role": role, "params": json.dumps(params, sort_keys=True),
            "final_dice": dice, "score": dice, "completed": completed, "schedule": json.dumps(schedule),
            "schedule_voxel_fraction": 0.5, "train_time_s": 1.0, "n_stages": 2,
            "dice_per_class": json.dumps(per_class or {"a": dice})}


def test_candidates_are_the_best_distinct_searched_schedules():
    rows = [row("base", "references", "baseline", {"preset": "constant"}, 0.5, schedule="constant"),
            row("t1", "search", "search", {"stages": 1}, 0.9, schedule="constant"),  # the baseline again
            row("t2", "search", "search", {"growth": 2.0}, 0.8, schedule="A"),
            row("t3", "search", "search", {"growth": 2.1}, 0.79, schedule="A"),  # same stages as t2
            row("t4", "search", "search", {"growth": 3.0}, 0.7, schedule="B"),
            row("t5", "search", "search", {"growth": 4.0}, 0.95, schedule="C", completed=False),  # stopped early
            row("t6", "search", "search", {"growth": 2.0, "lr": 0.1}, 0.6, schedule="A")]  # other trainer setting
    objective = {"type": "max_dice"}
    assert [r["trial_id"] for r in confirm_candidates(rows, 3, objective)] == ["t2", "t4", "t6"]
    assert [r["trial_id"] for r in confirm_candidates(rows, 1, objective)] == ["t2"]


def confirmation(values: dict[str, list[float]]):
    """Rows and sweep.json of a confirmation over seeds 1..n, with these Dice values per schedule (t...: searched
    schedules, the others references)."""
    n = len(next(iter(values.values())))
    configs, rows = [], []
    for name, dices in values.items():
        role = "search" if name.startswith("t") else name
        for seed, dice in zip(range(1, n + 1), dices):
            config = {"role": role, "candidate": name, "seed": seed, "epochs": 10}
            configs.append(config)
            rows.append(row(f"{name}-{seed}", "confirm", role, config, dice, per_class={"a": dice, "b": dice / 2}))
    meta = {"confirmation": {"configs": configs, "repeat": "seed", "epochs": 10, "top_k": 2,
                             "experiments": ["confirm"]}}
    return rows, meta


def test_a_winner_no_better_than_the_baseline_is_said_plainly():
    rows, meta = confirmation({"baseline": [0.80, 0.70, 0.75], "paper": [0.6, 0.6, 0.7],
                               "t1": [0.82, 0.69, 0.77], "t2": [0.5, 0.5, 0.5]})
    c = confirmation_summary(rows, meta, search_best="t2")
    assert c["winner"] == "t1" and c["search_winner_confirmed"] is False
    assert not c["significantly_better_than_baseline"]
    assert c["verdict"].startswith("no searched schedule is significantly better than the constant baseline")
    t1 = c["schedules"]["t1"]
    assert t1["dice"]["n"] == 3 and t1["dice"]["mean"] == pytest.approx(0.76)
    assert t1["dice_per_class"]["b"]["mean"] == pytest.approx(0.38)
    assert t1["vs"]["baseline"]["mean_diff"] == pytest.approx(0.01)
    assert t1["vs"]["baseline"] == paired_comparison([0.82, 0.69, 0.77], [0.80, 0.70, 0.75]).to_dict()
    assert t1["params"] == {}  # the confirmation's own keys are not the schedule's parameters


def test_a_winner_significantly_better_than_the_baseline_says_by_how_much():
    rows, meta = confirmation({"baseline": [0.70, 0.60, 0.65, 0.72], "paper": [0.7, 0.6, 0.7, 0.7],
                               "t1": [0.80, 0.71, 0.74, 0.83]})
    rows[-1] = {**rows[-1], "completed": False}  # t1's 4th seed failed: its pair is dropped
    c = confirmation_summary(rows, meta, search_best="t1")
    assert c["winner"] == "t1" and c["search_winner_confirmed"] is True
    vs = c["schedules"]["t1"]["vs"]["baseline"]
    assert vs["n"] == 3 and vs["significantly_better"] and c["significantly_better_than_baseline"]
    assert c["verdict"].startswith("the confirmed winner t1 beats the constant baseline by +10.00 Dice points")


def test_a_confirmed_winner_whose_search_trial_is_not_read_back_takes_its_schedule_from_the_confirmation():
    # summarize stopped on StopIteration (export, report: 'internal error') where the winner's search row was missing
    from pgps_tune.results import summarize

    rows, meta = confirmation({"baseline": [0.70, 0.60, 0.65], "t1": [0.80, 0.71, 0.74]})
    for r, c in zip(rows, meta["confirmation"]["configs"]):
        c.update({"growth": 2.0} if c["candidate"] == "t1" else {})
        r.update(params=json.dumps(c, sort_keys=True), stopped_early=False, failed=False)
    meta.update(dataset="d", sweep="s", objective={"type": "max_dice"})
    best = summarize(rows, meta)["best"]
    assert best["trial_id"] == "t1" and json.loads(best["params"]) == {"growth": 2.0}
    assert best["final_dice"] == pytest.approx(0.75) and best["confirmed"]


def test_a_winner_significantly_worse_than_the_baseline_is_called_worse():
    rows, meta = confirmation({"baseline": [0.80, 0.71, 0.74, 0.83], "t1": [0.70, 0.60, 0.65, 0.72]})
    c = confirmation_summary(rows, meta)
    assert c["schedules"]["t1"]["vs"]["baseline"]["significantly_worse"] and "paper" not in c["schedules"]["t1"]["vs"]
    assert "the best, t1, is significantly worse, by -10.25 Dice points" in c["verdict"]
    assert c["search_winner_confirmed"] is None  # no search best was given


def test_failed_repeats_neither_crown_a_lucky_schedule_nor_print_nan_and_a_steadier_better_one_is_named():
    def verdict(values, failed=()):
        rows, meta = confirmation(values)
        c = confirmation_summary([{**r, "completed": r["trial_id"] not in failed} for r in rows], meta)
        assert "nan" not in c["verdict"]
        return c["winner"], c["significantly_better_than_baseline"], c["verdict"]

    # t2's one completed seed (0.9) does not outrank t1's three, which beat the baseline on each
    values = {"baseline": [0.5, 0.6, 0.55], "t1": [0.7, 0.8, 0.75], "t2": [0.7, 0.8, 0.9]}
    assert verdict(values, {"t2-1", "t2-2"})[:2] == ("t1", True)
    no_pair = verdict(values, {"baseline-1", "baseline-2", "baseline-3"})
    assert no_pair[:2] == ("t2", False) and "completed no seed in common, so they are not compared" in no_pair[2]
    one_pair = verdict(values, {"baseline-1", "baseline-2"})
    assert "only one seed in common (+35.00 Dice points), too few to test" in one_pair[2]
    from pgps_tune.report import _points  # the page's cells, as the terminal's table: no "+nan [+nan, +nan]"

    assert _points(paired_comparison([0.7, 0.8], [math.nan, math.nan]).to_dict()) == ""
    assert _points(paired_comparison([0.7, 0.8], [0.5, math.nan]).to_dict()) == "+20.00 [-, -], p = -"
    # the best mean score is t1's, but only t2 is steadily above the baseline: the verdict must not say "none is"
    winner, better, text = verdict({"baseline": [0.5, 0.6, 0.55, 0.5], "t1": [0.9, 0.3, 0.95, 0.5],
                                    "t2": [0.52, 0.63, 0.57, 0.52]})
    assert (winner, better) == ("t1", False) and "while t2 is significantly better than it" in text
    assert not text.startswith("no searched schedule")


def test_a_reference_that_failed_every_repeat_has_no_gain_and_the_outcome_still_prints():
    # the summary tune and confirm print crashed on a NaN time ratio ("cannot convert float NaN to integer")
    from pgps_tune.report import summary_lines
    from pgps_tune.results import summarize

    rows, meta = confirmation({"baseline": [0.5, 0.6], "paper": [0.4, 0.5], "t1": [0.7, 0.8]})
    rows = [{**r, "completed": r["role"] != "baseline", "stopped_early": False, "failed": r["role"] == "baseline"}
            for r in [*rows, row("t1", "search", "search", {}, 0.7)]]
    meta.update(dataset="d", sweep="s", objective={"type": "max_dice"})
    summary = summarize(rows, meta)
    assert "gain_over_baseline" not in summary and summary["gain_over_paper"]["pairs"] == 2
    lines = summary_lines(summary)
    assert not any("baseline reference" in line or "nan" in line for line in lines)
    assert "Against the paper reference (means over 2 seeds): Dice 0.750 vs 0.450 (+30.0 points)" in lines[2]


def test_cheapest_within_scores_a_confirmation_against_its_own_baseline_on_each_seed():
    # the search's target was the baseline's one run at the search's epochs (here 0.70 - 0.05); a confirmation at
    # 14 epochs was scored against it although it trains the baseline on its own seeds at its own budget
    from pgps_tune.results import TrialRecord, scored_by_search_target, summarize, trial_rows

    meta = {"objective": {"type": "cheapest_within", "tolerance": 0.05}, "target_dice": 0.65, "dataset": "d",
            "sweep": "s", "asha": {"time_attr": "epoch", "max_t": 10, "grace_period": 1, "reduction_factor": 2}}
    dice = {"baseline": [0.80, 0.60, 0.70], "t1": [0.76, 0.58, 0.50], "t2": [0.70, 0.50, 0.66]}
    configs, records = [], [TrialRecord("t1", "TERMINATED", {}, {"val_dice": 0.6, "completed": True,
                                                                 "schedule": "{}", "schedule_voxel_fraction": 0.4})]
    for name, values in dice.items():
        for seed, d in enumerate(values, 1):
            config = {"role": "search" if name != "baseline" else name, "candidate": name, "seed": seed,
                      "epochs": 14}
            configs.append(config)
            status = "ERROR" if (name, seed) == ("baseline", 3) else "TERMINATED"
            result = {"val_dice": d, "completed": True, "role": config["role"],
                      "schedule_voxel_fraction": 1.0 if name == "baseline" else 0.4}
            records.append(TrialRecord(f"{name}-{seed}", status, config, result, phase="confirm"))
    meta["confirmation"] = {"configs": configs, "repeat": "seed", "epochs": 14, "top_k": 2, "experiments": ["c"]}
    rows = trial_rows(records, meta)
    scores = {r["trial_id"]: r["score"] for r in rows}
    # seed 1 target 0.75, seed 2 0.55: t1 is within on both (0.6 saved), t2 on neither; seed 3's baseline failed
    assert scores["t1-1"] == scores["t1-2"] == pytest.approx(0.6) and scores["baseline-1"] == 0.0
    assert (scores["t2-1"], scores["t2-2"]) == pytest.approx((0.70 - 0.75, 0.50 - 0.55))
    assert math.isnan(scores["t1-3"]) and math.isnan(scores["t2-3"])  # no target on seed 3: no score
    assert scores["t1"] == pytest.approx(0.6 - 0.65)  # the search's trials keep the search's target
    c = summarize(rows, meta)["confirmation"]
    assert c["winner"] == "t1" and c["schedules"]["t1"]["score"] == {"n": 2, "mean": pytest.approx(0.6), "sd": 0.0}
    assert c["tolerance"] == 0.05 and c["target_dice_by_seed"]["1"] == pytest.approx(0.75)
    assert math.isnan(c["target_dice_by_seed"]["3"]) and not scored_by_search_target(c, meta["objective"])
    old = {k: v for k, v in c.items() if k not in ("tolerance", "target_dice_by_seed")}
    assert scored_by_search_target(old, meta["objective"]) and scored_by_search_target(old, "cheapest_within")
    assert not scored_by_search_target(old, {"type": "max_dice"})
    # a baseline that completed no seed leaves no target: said so, not 'no searched schedule completed'
    rows = trial_rows([t if t.config.get("role") != "baseline" else TrialRecord(t.trial_id, "ERROR", t.config, {},
                                                                               phase="confirm") for t in records], meta)
    c = summarize(rows, meta)["confirmation"]
    assert c["winner"] is None and c["verdict"].startswith("the constant baseline completed no confirmation seed, so "
                                                          "cheapest_within has no target Dice")


def test_the_verdict_answers_the_objectives_question(capsys):
    # cheapest_within asks "within the tolerance of the baseline, for fewer voxels?": the verdict asked "better
    # Dice?" and said "NOT SIGNIFICANT: ... keep the constant schedule" of a winner within it on every seed at 0.56x
    from pgps_tune.cli import _print_confirmation
    from pgps_tune.results import _confirmation_evidence, summarize

    def verdict(objective, values, cost=0.56):
        rows, meta = confirmation(values)
        for r in rows:
            vf = 1.0 if r["role"] == "baseline" else cost
            base = values["baseline"][json.loads(r["params"])["seed"] - 1]
            r.update(schedule_voxel_fraction=vf, stopped_early=False, failed=False, score=sp.objective_score(
                objective, r["final_dice"], vf, base - objective.get("tolerance", 0)))
        rows.append({**row("t1", "search", "search", {}, 0.7), "stopped_early": False, "failed": False})
        meta.update(dataset="d", sweep="s", objective=objective)
        return summarize(rows, meta)

    within = {"type": "cheapest_within", "tolerance": 0.05}
    summary = verdict(within, {"baseline": [0.80, 0.70, 0.75, 0.72], "t1": [0.79, 0.68, 0.75, 0.70]})
    c = summary["confirmation"]
    assert c["objective_met"] and not c["significantly_better_than_baseline"]
    assert c["verdict"].startswith("the confirmed winner t1 is within the tolerance (5.00 Dice points) of the constant "
                                   "baseline at 0.56x its voxels: it differs by -1.25 Dice points")
    assert "one-sided paired t-test of t1 - baseline + 0.05 > 0 at the 2.5% level" in c["verdict"]
    assert "within on 4 of 4 seeds" in c["verdict"] and c["schedules"]["t1"]["within_tolerance"]["within"]
    _print_confirmation(summary)
    assert capsys.readouterr().out.splitlines()[-1].startswith("the confirmed winner t1 is within the tolerance")
    evidence = _confirmation_evidence(summary, {"trial_id": "t1-1"})["confirmation"]  # best_schedule.yaml's
    assert evidence["objective_met"] and evidence["within_tolerance"]["pairs_within"] == 4
    # summary.json's gain over the baseline gives the verdict's test beside the "better" one, and says which is which
    gain, within_p = summary["gain_over_baseline"], c["schedules"]["t1"]["within_tolerance"]["p_value"]
    assert gain["within_tolerance"] and gain["within_p_value"] == within_p < 0.025 < gain["p_value"]
    assert gain["tolerance_points"] == pytest.approx(5.0)
    assert c["question"].startswith("vs baseline, cheapest_within's question: is Dice within the tolerance")
    # a winner whose interval reaches below the tolerance is not called within it, whatever its mean
    c = verdict(within, {"baseline": [0.80, 0.70, 0.75], "t1": [0.79, 0.60, 0.76]})["confirmation"]
    assert not c["objective_met"] and "within on 2 of 3 seeds" in c["verdict"]
    assert c["verdict"].startswith("no searched schedule is shown to be within the tolerance (5.00 Dice points) of "
                                   "the constant baseline: the best, t1 (0.56x its voxels), differs by")
    # dice_under_budget: better Dice, under the budget; max_dice as it was
    budget = {"type": "dice_under_budget", "voxel_budget": 0.6}
    c = verdict(budget, {"baseline": [0.70, 0.60, 0.65, 0.72], "t1": [0.80, 0.71, 0.74, 0.83]})["confirmation"]
    assert c["objective_met"] and c["verdict"].startswith(
        "the confirmed winner t1 (0.56x the baseline's voxels, under the voxel budget 0.6) beats the constant "
        "baseline by +10.25 Dice points")
    assert c["question"] == ("vs baseline, dice_under_budget's question: is Dice better than the constant baseline's, "
                             "under the voxel budget 0.6? (two-sided paired t-test; better when the whole 95% interval "
                             "is above 0)")
    # retrained at the confirmation's epochs over the budget, though better: the terminal does not call it 'NOT
    # SIGNIFICANT' beside its p = 0.001
    summary = verdict(budget, {"baseline": [0.70, 0.60, 0.65, 0.72], "t1": [0.80, 0.71, 0.74, 0.83]}, cost=0.7)
    assert summary["confirmation"]["significantly_better_than_baseline"]
    _print_confirmation(summary)
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "OVER THE VOXEL BUDGET: the confirmed winner t1 trains 0.700x the constant baseline's voxels")
    c = verdict(budget, {"baseline": [0.80, 0.70, 0.75], "t1": [0.82, 0.69, 0.77]})["confirmation"]
    assert not c["objective_met"] and "keep the constant schedule where its full cost is affordable" in c["verdict"]
    assert c["verdict"].startswith("no searched schedule under the voxel budget 0.6 is significantly better")
    c = verdict({"type": "max_dice"}, {"baseline": [0.80, 0.70, 0.75], "t1": [0.82, 0.69, 0.77]})["confirmation"]
    assert c["objective_met"] is False and c["verdict"].startswith("no searched schedule is significantly better")
    assert "within_tolerance" not in c["schedules"]["t1"] and c["question"].startswith(
        "vs baseline, max_dice's question: is Dice better than the constant baseline's? (two-sided")


def test_a_search_whose_best_trial_was_a_reference_is_judged_by_its_best_searched_trial(capsys):
    # the search's best is ranked among the references: the terminal said "the search phase's best trial, base, is
    # not the confirmed winner" of the baseline, though the search's best searched trial was the winner
    from pgps_tune.cli import _print_confirmation
    from pgps_tune.report import confirmation_section
    from pgps_tune.results import summarize

    def summary(search):
        rows, meta = confirmation({"baseline": [0.5, 0.6, 0.55], "t1": [0.7, 0.8, 0.75], "t2": [0.6, 0.7, 0.6]})
        rows += [row("base", "references", "baseline", {}, 0.9), *(row(t, "search", "search", {}, d)
                                                                   for t, d in search.items())]
        meta.update(dataset="d", sweep="s", objective={"type": "max_dice"})
        return summarize([{**r, "stopped_early": False, "failed": False} for r in rows], meta)

    for search, right, words in (
            ({"t1": 0.8, "t2": 0.7}, True, "the search phase's best trial, base, is the baseline reference, and its "
             "best searched trial, t1, is the confirmed winner"),
            ({"t1": 0.7, "t2": 0.8}, False, "the search phase's best trial, base, is the baseline reference, and its "
             "best searched trial, t2, is not the confirmed winner")):
        s = summary(search)
        c = s["confirmation"]
        assert s["search_best"]["trial_id"] == "base" and c["winner"] == "t1"
        assert c["best_searched"] == max(search, key=search.get) and c["search_winner_confirmed"] is right
        _print_confirmation(s)
        assert f"  {words}\n" in capsys.readouterr().out and f"; {html.escape(words)}.</p>" in confirmation_section(
            c, search_check(s))
    s = summary({"t1": 0.95, "t2": 0.7})  # the search's best is searched and confirmed: nothing to say
    assert s["search_best"]["trial_id"] == "t1" and search_check(s) is None


def test_the_exported_winner_is_trained_at_the_budget_of_the_confirmation_reported():
    # 'confirm --epochs 12' replaced a 10-epoch confirmation: best_schedule.yaml must hold a 12-epoch trial
    # of the winner, not the replaced confirmation's trial that comes first in trials.parquet
    from pgps_tune.results import summarize, winner_row

    old, _ = confirmation({"baseline": [0.5, 0.6], "t1": [0.7, 0.8]})
    rows, meta = confirmation({"baseline": [0.5, 0.6], "t1": [0.7, 0.8]})
    for r in rows:
        config = {**json.loads(r["params"]), "epochs": 12}
        r.update(trial_id=r["trial_id"] + "@12", params=json.dumps(config, sort_keys=True))
    meta["confirmation"].update(epochs=12, configs=[json.loads(r["params"]) for r in rows])
    meta.update(dataset="d", sweep="s", objective={"type": "max_dice"})
    rows = [{**r, "stopped_early": False, "failed": False}
            for r in [*old, *rows, row("t1", "search", "search", {}, 0.7)]]
    winner = winner_row(rows, summarize(rows, meta), meta)
    assert winner["trial_id"] == "t1-1@12" and json.loads(winner["params"])["epochs"] == 12


def test_every_reference_the_sweep_trained_is_compared_in_summary_terminal_and_page(capsys):
    # search.references: [constant, "paper:resource", "paper:performance"] (hippocampus_pareto): a gain over each,
    # in summary.json, the outcome lines of the terminal and page, and the confirmation's tests and table
    from pgps_tune.cli import _print_confirmation
    from pgps_tune.report import confirmation_section, summary_lines
    from pgps_tune.results import summarize

    refs = [row("base", "references", "baseline", {}, 0.6), row("pres", "references", "paper:resource", {}, 0.55),
            row("pper", "references", "paper:performance", {}, 0.65), row("t1", "search", "search", {}, 0.7)]
    meta = {"dataset": "d", "sweep": "s", "objective": {"type": "pareto"}}
    summary = summarize([{**r, "stopped_early": False, "failed": False} for r in refs], meta)
    gains = {k: round(v["dice_points"], 6) for k, v in summary.items() if k.startswith("gain_over_")}
    assert gains == {"gain_over_baseline": 10.0, "gain_over_paper:resource": 15.0, "gain_over_paper:performance": 5.0}
    lines = summary_lines(summary)
    assert [line.split(":")[0] for line in lines[2:5]] == [
        "Against the baseline reference", "Against the paper", "Against the paper"]
    assert "Against the paper:performance reference: Dice 0.700 vs 0.650 (+5.0 points)" in lines[4]
    rows, meta = confirmation({"baseline": [0.6, 0.62], "paper": [0.5, 0.52], "paper:performance": [0.64, 0.7],
                               "t1": [0.7, 0.72]})
    conf = confirmation_summary(rows, meta)
    assert list(conf["schedules"]["t1"]["vs"]) == ["baseline", "paper", "paper:performance"]
    _print_confirmation({"confirmation": conf, "search_best": {"trial_id": "t1"}})
    head, *table = capsys.readouterr().out.splitlines()[1:6]
    assert [h.strip() for h in head.split("  vs ")[1:]] == ["baseline (95% interval, p)", "paper", "paper:performance"]
    assert table[3].startswith("  t1 *") and table[3].count(" p=") == 3
    assert "vs paper:performance, points [95% interval], p" in confirmation_section(conf)


def test_tune_flags_replace_the_confirm_section(tmp_path, monkeypatch):
    import pgps_tune.tuner as tuner

    seen = []

    def fake_sweep(opts):
        seen.append(opts.space.confirm)
        return {"sweep": "s", "dataset": "synthetic", "trials": 0, "completed": 0, "stopped_early": 0, "failed": 0,
                "best": None}

    monkeypatch.setattr(tuner, "sweep", fake_sweep)
    space = write_space(tmp_path / "s.yaml", confirm={"enabled": True, "folds": 4})
    base = ["tune", "--space", str(space), "--data", "synthetic", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--no-confirm"]) == 0
    assert main([*base, "--out", str(tmp_path / "c"), "--confirm-seeds", "5", "--confirm-epochs", "30",
                 "--confirm-top-k", "2"]) == 0
    (tmp_path / "f.json").write_text("[]")
    assert main([*base, "--out", str(tmp_path / "d"), "--confirm-splits", str(tmp_path / "f.json")]) == 0
    a, b, c, d = seen
    assert a.enabled and a.folds == 4 and not b.enabled
    assert (c.seeds, c.folds, c.epochs, c.top_k) == (5, None, 30, 2)  # seeds replace the file's folds
    assert d.splits == str(tmp_path / "f.json") and d.folds == 4


def test_a_missing_splits_file_names_the_space_file_or_flag_that_gave_it_and_the_fix(tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "s.yaml", confirm={"enabled": True, "splits": "nosuch/splits.json"})
    base = ["tune", "--space", space, "--data", "synthetic", "--quiet", "--out", tmp_path / "sw"]
    line = refused(capsys, base)  # before any data are prepared
    missing = tmp_path.resolve() / "nosuch" / "splits.json"  # a relative path is read from the space file's folder
    assert f"the space file {space} (confirm.splits) names the splits file {missing}, which does not exist;" in line
    assert line.endswith(f"correct confirm.splits in {space} or create that file, or give --confirm-splits FILE")
    line = refused(capsys, [*base, "--confirm-splits", "other.json"])  # the flag's file, not the space file's
    assert line.startswith("pgps-tune: error: --confirm-splits names the splits file other.json, which does not "
                           f"exist (read from the current folder, {tmp_path.resolve()})")
    assert "s.yaml" not in line
    assert not (tmp_path / "sw").exists()


def test_a_relative_splits_path_is_read_from_the_space_files_folder_and_a_flags_from_the_current_one(
        tmp_path, monkeypatch):
    import pgps_tune.tuner as tuner

    seen = []
    monkeypatch.setattr(tuner, "sweep", lambda opts: seen.append(opts.space.confirm) or {
        "sweep": "s", "dataset": "synthetic", "trials": 0, "completed": 0, "stopped_early": 0, "failed": 0,
        "best": None})
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "splits.json").write_text("[]")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.json").write_text("[]")
    space = write_space(tmp_path / "spaces" / "s.yaml", confirm={"enabled": True, "splits": "splits.json"})
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the space file's folder nor a trial's
    base = ["tune", "--space", str(space), "--data", "synthetic", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--confirm-splits", "mine.json"]) == 0
    assert [c.splits for c in seen] == [str(tmp_path.resolve() / "spaces" / "splits.json"),
                                        str(tmp_path.resolve() / "elsewhere" / "mine.json")]


def test_a_store_written_before_the_phase_column_still_reads(tmp_path):
    import pyarrow as pa

    from pgps_tune import results

    r = row("t1", "search", "search", {}, 0.5, schedule=sch.paper((16, 16, 16), (2, 2, 2), 2, 10).to_dict())
    full = {c: r.get(c) for c in results.COLUMNS} | {"status": "completed", "best_dice": 0.5, "voxels_processed": 1,
                                                     "voxel_fraction": 1.0, "wall_time_s": 1.0,
                                                     "baseline_iterations": 1.0, "rung_reached": 0,
                                                     "stopped_early": False, "failed": False, "num_failures": 0,
                                                     "error": ""}
    table = pa.Table.from_pylist([full], schema=results.SCHEMA)
    meta = {"objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "dataset": "x"}
    results.store_sweep(table, {**meta, "sweep": "new"}, tmp_path)
    old = table.drop_columns(["phase"]).append_column("objective", pa.array(["max_dice"]))
    old = old.append_column("final_patch", pa.array(["[16, 16, 16]"]))
    (tmp_path / "dataset=x" / "sweep=old").mkdir(parents=True)
    pq.write_table(old, tmp_path / "dataset=x" / "sweep=old" / "part-0.parquet")
    store = results.load_store(tmp_path).sort_by("sweep")
    assert store["sweep"].to_pylist() == ["new", "old"] and store["phase"].to_pylist() == ["search", None]


def test_an_interrupted_confirmation_continues_as_it_started_and_an_extension_adds_only_new_trials(
        tmp_path, monkeypatch):
    # the bookkeeping around Tune (which trials, which experiment), with run_phase standing in for Tune
    import signal

    from pgps_tune import tuner
    from pgps_tune.results import TrialRecord

    records, done = _one_searched_trial(monkeypatch)
    calls = []

    def run_phase(phase, opts, setup, fs, path, name, searcher, n, scheduler, signals=None):
        calls.append((name, searcher.configs))
        if len(calls) == 1:
            raise tuner.SweepInterrupted(signal.SIGINT)

    monkeypatch.setattr(tuner, "run_phase", run_phase)
    meta, opts = _sweep_to_confirm(tmp_path, seed=7)
    two = tuner.ConfirmSettings(top_k=1, epochs=10, seeds=2)
    with pytest.raises(tuner.SweepInterrupted):
        tuner.run_confirmation(opts, meta, two, None, None)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["pending_confirm"]["key"] == "confirm" and list(saved["experiments"]) == ["search"]
    assert sorted((c["candidate"], c["seed"]) for c in calls[0][1]) == [("baseline", 8), ("baseline", 9),
                                                                       ("s1", 8), ("s1", 9)]
    with pytest.raises(sp.PgpsError, match="was interrupted; finish it first"):
        tuner.run_confirmation(opts, saved, tuner.ConfirmSettings(top_k=1, epochs=10, seeds=3), None, None)
    tuner.run_confirmation(opts, saved, two, None, None)  # continues: the same experiment, the same trials
    assert calls[1] == ("s-confirm", calls[0][1])
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert "pending_confirm" not in saved and saved["experiments"]["confirm"] == "s-confirm"
    assert saved["confirmation"]["configs"] == calls[0][1]
    records += [TrialRecord(f"c{i}", "TERMINATED", c, {**done, "role": c["role"]}, phase="confirm")
                for i, c in enumerate(calls[0][1])]
    tuner.run_confirmation(opts, saved, tuner.ConfirmSettings(top_k=1, epochs=10, seeds=3), None, None)
    assert calls[2][0] == "s-confirm-2" and sorted((c["candidate"], c["seed"]) for c in calls[2][1]) == [
        ("baseline", 10), ("s1", 10)]
    records += [TrialRecord(f"d{i}", "TERMINATED", c, {**done, "role": c["role"]}, phase="confirm")
                for i, c in enumerate(calls[2][1])]
    three = json.loads((tmp_path / "sweep.json").read_text())["confirmation"]
    tuner.run_confirmation(opts, saved, two, None, None)  # fewer seeds: nothing new to train, nothing dropped
    assert len(calls) == 3 and json.loads((tmp_path / "sweep.json").read_text())["confirmation"] == three
    assert sorted(c["seed"] for c in three["configs"]) == [8, 8, 9, 9, 10, 10]


def test_a_confirmation_never_shrinks_and_a_resume_never_replaces_it(tmp_path, monkeypatch, capsys):
    # what 'confirm' extended survives whatever re-runs the phase later (tune --resume, confirm with less);
    # a confirmation at another budget replaces the exported one visibly, and confirming the old one restores it
    from pgps_tune import tuner
    from pgps_tune.results import TrialRecord

    records, done = _one_searched_trial(monkeypatch)
    trained = []

    def run_phase(phase, opts, setup, fs, path, name, searcher, n, scheduler, signals=None):
        trained.extend(searcher.configs)
        records.extend(TrialRecord(f"c{len(records)}", "TERMINATED", c, {**done, "role": c["role"]}, phase="confirm")
                       for c in searcher.configs)

    monkeypatch.setattr(tuner, "run_phase", run_phase)
    meta, opts = _sweep_to_confirm(tmp_path, seed=0)
    seeds = tuner.ConfirmSettings
    tuner.run_confirmation(opts, meta, seeds(top_k=1, epochs=10, seeds=3), None, None)
    # tune --resume with the space's 2 seeds: the sweep's 3 are kept (and said), nothing trains
    assert tuner.resumed_confirmation(meta, seeds(top_k=1, epochs=10, seeds=2)) == seeds(1, 10, seeds=3)
    assert "keeping sweep s's confirmation (top 1, 3 seeds, 10 epochs)" in capsys.readouterr().err
    assert tuner.resumed_confirmation(meta, seeds(top_k=2, epochs=10, seeds=4)) == seeds(2, 10, seeds=4)
    with pytest.raises(sp.PgpsError, match=r"\(top 1, 3 seeds, 10 epochs\) differs from the one the space asks for "
                       r"\(top 1, 3 seeds, 20 epochs\); --resume would replace its verdict: resume with "
                       r"--confirm-top-k 1 --confirm-seeds 3 --confirm-epochs 10, or with --no-confirm"):
        tuner.resumed_confirmation(meta, seeds(top_k=1, epochs=20, seeds=3))
    with pytest.raises(sp.PgpsError, match="--confirm-folds 3 --confirm-epochs 10, or"):
        tuner.resumed_confirmation({**meta, "confirmation": {"settings": asdict(seeds(1, 10, folds=3))}},
                                   seeds(1, 10, seeds=3))
    # another budget replaces it in the exports, recorded; back at 10 epochs with 2 seeds: all 3 return
    tuner.run_confirmation(opts, meta, seeds(top_k=1, epochs=20, seeds=2), None, None)
    assert meta["confirmation"]["replaced"] == [asdict(seeds(1, 10, seeds=3))]
    assert json.loads((tmp_path / "sweep.json").read_text())["confirmation"]["replaced"] == [
        asdict(seeds(1, 10, seeds=3))]
    before = len(trained)
    tuner.run_confirmation(opts, meta, seeds(top_k=1, epochs=10, seeds=2), None, None)
    assert len(trained) == before and meta["confirmation"]["settings"] == asdict(seeds(1, 10, seeds=3))
    assert meta["confirmation"]["replaced"] == [asdict(seeds(1, 20, seeds=2))]
    assert sorted(c["seed"] for c in meta["confirmation"]["configs"]) == [1, 1, 2, 2, 3, 3]


def test_confirm_says_when_it_keeps_more_than_asked_and_when_it_replaces_the_exported_confirmation(
        tmp_path, monkeypatch, capsys):
    # the two note lines of 'pgps-tune confirm' itself, word for word (training, Ray and the export stubbed)
    import contextlib

    from conftest import sweep_meta, trial_setup

    from pgps_tune import tuner

    three = asdict(tuner.ConfirmSettings(top_k=1, epochs=10, seeds=3))
    meta = sweep_meta(tmp_path, "s", trial_setup=trial_setup(tmp_path), reference_configs=[],
                      experiments={"search": "s-search", "confirm": "s-confirm"},
                      confirmation={"settings": three, "repeat": "seed", "epochs": 10, "top_k": 1, "configs": [],
                                    "experiments": ["confirm"]})
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    ran = []
    monkeypatch.setattr(tuner, "run_confirmation", lambda opts, meta, settings, fs, signals: ran.append(settings))
    monkeypatch.setattr(tuner, "_ray_session", lambda opts, signals: contextlib.nullcontext())
    monkeypatch.setattr(tuner, "export_sweep", lambda *a: {})
    monkeypatch.setattr(tuner, "read_trials", lambda meta: [])
    monkeypatch.setattr(data, "prepare", lambda *a, **k: None)
    tuner.confirm(tuner.ConfirmOptions(tmp_path, seeds=2, quiet=True))
    assert ran[-1] == tuner.ConfirmSettings(top_k=1, epochs=10, seeds=3)
    assert ("pgps-tune: note: confirming top 1, 3 seeds, 10 epochs: the sweep's confirmations already hold those "
            "schedules and repeats, and a confirmation never drops any (asked: top 1, 2 seeds, 10 epochs)\n"
            ) == capsys.readouterr().err
    tuner.confirm(tuner.ConfirmOptions(tmp_path, epochs=20, quiet=True))
    assert ran[-1] == tuner.ConfirmSettings(top_k=1, epochs=20, seeds=3)
    assert (f"pgps-tune: note: this confirmation (top 1, 3 seeds, 20 epochs) replaces the sweep's (top 1, 3 seeds, "
            f"10 epochs) in its exports; those trials stay in trials.parquet, and 'pgps-tune confirm {tmp_path} "
            "--top-k 1 --seeds 3 --epochs 10' brings it back without training\n") == capsys.readouterr().err


# -- end to end -------------------------------------------------------------------------------------


def test_sweep_confirms_then_extends_without_repeating_a_trial(shared_ray, tmp_path, capsys, monkeypatch):
    # one searched schedule (2 stages; one stage would train the constant baseline again, which is no candidate)
    monkeypatch.setenv("PGPS_RESULTS_DIR", str(tmp_path / "store"))
    space = write_space(tmp_path / "s.yaml", parameters={"stages": {"value": 2}, "growth": {"value": 2.0}},
                        search={"num_samples": 1, "references": False}, asha={"enabled": False},
                        budget={**BUDGET, "iterations_per_epoch": 2, "val_every": 10, "synthetic_cases": 4},
                        confirm={"enabled": True, "top_k": 2, "seeds": 2})
    out = tmp_path / "sweep"
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet",
                 "--max-concurrent", "1"]) == 0
    printed = capsys.readouterr().out
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert [r["phase"] for r in rows] == ["search"] + ["confirm"] * 6  # 1 candidate + 2 references, 2 seeds
    confirm_rows = [r for r in rows if r["phase"] == "confirm"]
    searched = rows[0]["trial_id"]
    configs = [json.loads(r["params"]) for r in confirm_rows]
    assert sorted((c["candidate"], c["seed"]) for c in configs) == sorted(
        (name, seed) for name in ("baseline", "paper", searched) for seed in (1, 2))  # fresh seeds: budget.seed 0
    assert all(r["completed"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    c = summary["confirmation"]
    assert c["winner"] == searched and c["repeats"] == [1, 2] and summary["best"]["confirmed"]
    assert summary["best"]["final_dice"] == pytest.approx(c["schedules"][searched]["dice"]["mean"])
    assert summary["search_best"]["trial_id"] == searched and c["search_winner_confirmed"] is True
    vs = c["schedules"][searched]["vs"]["baseline"]
    assert vs["n"] == 2 and vs["significantly_better"] == c["significantly_better_than_baseline"]
    assert summary["gain_over_baseline"]["pairs"] == 2 and "gain_over_paper" in summary
    assert c["verdict"] in printed
    best = sch.load(out / "best_schedule.yaml")
    assert best.meta["confirmation"]["verdict"] == c["verdict"] and best.meta["confirmation"]["repeats"] == [1, 2]
    assert best.meta["val_dice"] == pytest.approx(c["schedules"][searched]["dice"]["mean"])
    assert len(best.stages) == 2
    # a third seed: only the 3 new trials run, in an experiment of their own
    capsys.readouterr()
    assert main(["confirm", str(out), "--seeds", "3", "--progress", "json", "--max-concurrent", "1"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert sum(e.get("phase") == "confirm" and e.get("event") == "complete" for e in events) == 3, events[-3:]
    meta = json.loads((out / "sweep.json").read_text())
    assert list(meta["experiments"]) == ["search", "confirm", "confirm-2"] and "pending_confirm" not in meta
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    new = [json.loads(r["params"]) for r in rows[7:]]
    assert len(rows) == 10 and sorted(c["candidate"] for c in new) == sorted(["baseline", "paper", searched])
    assert all(c["seed"] == 3 for c in new)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["confirmation"]["repeats"] == [1, 2, 3]
    assert summary["confirmation"]["schedules"][searched]["vs"]["baseline"]["n"] == 3
    assert yaml.safe_load((out / "best_schedule.yaml").read_text())["meta"]["confirmation"]["repeats"] == [1, 2, 3]
    assert "(mean over 3 seeds" in (out / "report.html").read_text()  # the page was left as the sweep first wrote it
    # what confirm added survives: the original command resumed (its space says 2 seeds), confirm --seeds 2
    tune = ["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet", "--max-concurrent", "1"]
    capsys.readouterr()
    assert main([*tune, "--resume"]) == 0
    assert "keeping sweep sweep's confirmation (top 2, 3 seeds" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["confirmation"]["repeats"] == [1, 2, 3]
    assert main(["confirm", str(out), "--seeds", "2", "--max-concurrent", "1"]) == 0
    assert "confirming top 2, 3 seeds" in capsys.readouterr().err
    assert len(pq.read_table(out / "trials.parquet")) == 10
    assert json.loads((out / "summary.json").read_text())["confirmation"]["repeats"] == [1, 2, 3]
    assert json.loads((out / "sweep.json").read_text())["confirmation"]["settings"]["seeds"] == 3
    assert "--confirm-top-k 2 --confirm-seeds 3 --confirm-epochs" in refused(
        capsys, [*tune, "--resume", "--confirm-epochs", "20"])  # another budget: only 'confirm' replaces it
    assert json.loads((out / "summary.json").read_text())["confirmation"]["repeats"] == [1, 2, 3]
    assert json.loads((out / "sweep.json").read_text())["finished"]  # refused before anything was written
    # the confirmation benchmark reads this sweep as it reads a real one (nothing is trained)
    bench = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_confirm.py"), "--sweep", str(out),
                            "--report", str(tmp_path / "docs" / "c.md")], capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr[-2000:]
    report = (tmp_path / "docs" / "c.md").read_text()
    assert f"{searched} (" in report and "**(winner)**" in report and "3 pairs" in report
    assert f"the search phase's best trial ({searched}) is the confirmed winner" in report
    assert "in 3 of 3 seeds" in report  # one searched schedule: every seed picks it
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_confirm.py"), "--sweep",
                              str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "summary.json is missing" in missing.stderr and "Traceback" not in missing.stderr


def test_confirm_refuses_what_it_cannot_confirm_in_one_line(tmp_path, capsys):
    assert "does not exist; give the --out folder" in refused(capsys, ["confirm", tmp_path])
    meta = {"format_version": 2, "sweep": "s", "dataset": "synthetic", "space": "s.yaml", "storage_path": "x",
            "experiments": {"search": "s-search"}, "objective": {"type": "max_dice"}, "final_patch": [16, 16, 16],
            "asha": {"time_attr": "epoch", "max_t": 10, "grace_period": 1, "reduction_factor": 2, "brackets": 1},
            "finished": False}
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    assert "is not finished" in refused(capsys, ["confirm", tmp_path])
    (tmp_path / "sweep.json").write_text(json.dumps({**meta, "finished": True}))
    assert "without confirmation" in refused(capsys, ["confirm", tmp_path])
    assert "--seeds: must be an integer in [2, 1000], got '1'" in refused(capsys, ["confirm", tmp_path, "--seeds", "1"])
    space = write_space(tmp_path / "s.yaml")
    assert "not both" in refused(capsys, ["tune", "--space", space, "--data", "synthetic", "--out", tmp_path / "o",
                                          "--confirm-seeds", "2", "--confirm-folds", "3"])


def _one_searched_trial(monkeypatch) -> tuple[list, dict]:
    """One completed searched trial, as the tuner's read_trials hands it to a confirmation (no Ray), and its
    result (which the tests' confirmation trials reuse)."""
    from pgps_tune import tuner
    from pgps_tune.results import TrialRecord

    schedule = json.dumps(sch.paper((16, 16, 16), (2, 2, 2), 2, 10).to_dict())
    done = {"val_dice": 0.5, "score": 0.5, "completed": True, "schedule": schedule, "schedule_voxel_fraction": 0.5}
    records = [TrialRecord("s1", "TERMINATED", {"stages": 2, "growth": 2.0}, done, phase="search")]
    monkeypatch.setattr(tuner, "read_trials", lambda meta: list(records))
    return records, done


def _sweep_to_confirm(folder, seed: int):
    """A finished sweep's sweep.json (as a dict) and options, for run_confirmation without Ray."""
    from conftest import trial_setup

    from pgps_tune import tuner

    meta = {"sweep": "s", "storage_path": str(folder), "experiments": {"search": "s-search"},
            "objective": {"type": "max_dice"}, "trial_setup": trial_setup(folder, seed=seed),
            "reference_configs": [{"role": "baseline", "preset": "constant"}],
            "asha": {"time_attr": "epoch", "max_t": 10, "grace_period": 1, "reduction_factor": 2}}
    return meta, tuner.SweepOptions(space=sp.parse({"parameters": {"stages": {"value": 1}}}), data="synthetic",
                                    out=folder)


def test_a_searched_schedule_that_trains_a_reference_is_no_candidate_but_a_stored_confirmation_keeps_its_own(
        tmp_path, monkeypatch):
    # a one-stage searched schedule (preset: parametric, its lr the budget's) trains the constant baseline
    # (preset: constant): it was confirmed beside the baseline, as a candidate, whether or not the sweep had
    # trained the references first
    from pgps_tune import tuner
    from pgps_tune.config import patch_multiple
    from pgps_tune.results import TrialRecord

    records, done = _one_searched_trial(monkeypatch)  # s1: a 2-stage schedule, Dice 0.5
    one = sp.schedule_from_params({"stages": 1}, (16, 16, 16), (2, 2, 2), 2, 10, patch_multiple("unet", (2, 2, 2), 16))
    assert one.meta["preset"] == "parametric"
    records.insert(0, TrialRecord("same", "TERMINATED", {"stages": 1, "lr": 0.01},
                                  {**done, "val_dice": 0.9, "score": 0.9, "schedule": json.dumps(one.to_dict())},
                                  phase="search"))
    trained = []

    def run_phase(phase, opts, setup, fs, path, name, searcher, n, scheduler, signals=None):
        trained.append(sorted({c["candidate"] for c in searcher.configs}))
        records.extend(TrialRecord(f"c{len(records)}", "TERMINATED", c, {**done, "role": c["role"]}, phase="confirm")
                       for c in searcher.configs)

    monkeypatch.setattr(tuner, "run_phase", run_phase)
    meta, opts = _sweep_to_confirm(tmp_path, seed=0)
    meta["trial_setup"]["budget"]["lr"] = 0.01
    seeds = tuner.ConfirmSettings
    tuner.run_confirmation(opts, meta, seeds(top_k=2, epochs=10, seeds=2), None, None)
    assert trained == [["baseline", "s1"]]  # the best searched trial, 'same', is the baseline again
    # a confirmation stored before this rule confirmed 'same': extending it keeps its candidates (its verdict
    # only gains repeats); another budget is a new confirmation, chosen by the rule
    for c in meta["confirmation"]["configs"]:
        if c["candidate"] == "s1":
            c["candidate"] = "same"
    records[:] = [r for r in records if r.phase != "confirm"]
    tuner.run_confirmation(opts, meta, seeds(top_k=2, epochs=10, seeds=3), None, None)
    assert trained[-1] == ["baseline", "s1", "same"]
    tuner.run_confirmation(opts, meta, seeds(top_k=2, epochs=20, seeds=2), None, None)
    assert trained[-1] == ["baseline", "s1"]
    # a searched lr other than the budget's trains something else
    records[0].config["lr"] = 0.02
    meta.pop("confirmation")
    records[:] = [r for r in records if r.phase != "confirm"]
    tuner.run_confirmation(opts, meta, seeds(top_k=2, epochs=30, seeds=2), None, None)
    assert trained[-1] == ["baseline", "s1", "same"]


def test_confirm_on_a_read_only_sweep_folder_names_a_fix_confirm_has(tmp_path, monkeypatch):
    # the lock's fix was "give a writable --out", a flag confirm does not have
    import errno
    import os

    from pgps_tune.errors import PgpsError
    from pgps_tune.tuner import sweep_lock

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".pgps-sweep.lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    for command, fix in (("confirm", f"make {tmp_path} writable, or copy the sweep folder somewhere writable and "
                                     "confirm the copy"), ("tune", "give a writable --out")):
        with pytest.raises(PgpsError) as err, sweep_lock(tmp_path, command):
            pass
        assert str(err.value).endswith(f"(Read-only file system); {fix}")


def test_a_search_that_only_found_the_references_schedules_is_not_said_to_have_failed(tmp_path, monkeypatch, capsys):
    from pgps_tune import tuner
    from pgps_tune.results import TrialRecord

    records, done = _one_searched_trial(monkeypatch)
    records.append(TrialRecord("b1", "TERMINATED", {"role": "baseline", "preset": "constant"}, done,
                               phase="references"))  # the same schedule as the searched trial's
    meta, opts = _sweep_to_confirm(tmp_path, seed=0)
    tuner.run_confirmation(opts, meta, tuner.ConfirmSettings(top_k=1, epochs=10, seeds=2), None, None)
    assert "the 1 completed searched trial trained only the references' schedules, so there is nothing to " \
           "confirm" in capsys.readouterr().err
    # the summary and the terminal say so in one line: no empty table over '0 seeds', no 'NOT SIGNIFICANT: no
    # searched schedule completed its confirmation trials' (none was run)
    from pgps_tune.cli import _print_confirmation
    from pgps_tune.report import confirmation_section

    conf = confirmation_summary([], meta)
    _print_confirmation({"confirmation": conf})
    assert capsys.readouterr().out == ("confirmation: the search left no schedule to confirm (no searched trial "
                                       "completed, or each one trains a reference's schedule); there is no confirmed "
                                       "winner\n")
    assert confirmation_section(conf).startswith("<p>the search left no schedule to confirm") and "<table" not in \
        confirmation_section(conf)
    records.clear()
    tuner.run_confirmation(opts, meta, tuner.ConfirmSettings(top_k=1, epochs=10, seeds=2), None, None)
    assert "no searched schedule completed, so there is nothing to confirm" in capsys.readouterr().err
