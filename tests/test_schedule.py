import json
import math

import pytest
import yaml

from pgps_tune import schedule as sch
from pgps_tune.errors import PgpsError


def test_paper_example_from_the_guide():
    s = sch.paper((128, 128, 128), (5, 5, 5), 2, 1000, "performance")
    assert [st.patch_size for st in s.stages][:4] == [(32, 32, 32), (64, 32, 32), (64, 64, 32), (64, 64, 64)]
    assert [st.batch_size for st in s.stages] == [128, 64, 32, 16, 10, 7, 4, 3, 2, 2]
    assert [st.epochs for st in s.stages] == [100] * 10
    assert s.stages[-1].patch_size == (128, 128, 128)


@pytest.mark.parametrize(
    "final,pools",
    [((128, 128, 128), (5, 5, 5)), ((40, 56, 40), (3, 3, 3)), ((20, 192, 160), (2, 5, 5)),
     ((64, 160, 160), (4, 5, 5)), ((8, 8, 8), (3, 3, 3)), ((96, 32, 48), (3, 2, 4))],
)
def test_paper_rule_properties(final, pools):
    inc = [2**p for p in pools]
    s = sch.paper(final, pools, 2, 500, "resource")
    patches = [st.patch_size for st in s.stages]
    assert len(patches) == sum(math.ceil((f - i) / i) for f, i in zip(final, inc)) + 1
    assert patches[0] == tuple(inc)
    assert patches[-1] == tuple(final)
    for prev, cur in zip(patches, patches[1:]):
        grown = [a for a in range(3) if cur[a] != prev[a]]
        assert len(grown) == 1
        a = grown[0]
        assert cur[a] == prev[a] + inc[a]
        # the grown axis had the smallest next size among unfinished axes (ties: lowest index)
        candidates = [(prev[b] + inc[b], b) for b in range(3) if prev[b] < final[b]]
        assert (cur[a], a) == min(candidates)
    n = len(patches)
    assert [st.epochs for st in s.stages] == [500 // n] * (n - 1) + [500 - (500 // n) * (n - 1)]
    assert all(st.batch_size == 2 for st in s.stages)
    perf = sch.paper(final, pools, 2, 500, "performance")
    for st in perf.stages:
        assert st.batch_size == max(1, 2 * math.prod(final) // math.prod(st.patch_size))
        assert st.batch_size * st.patch_voxels <= 2 * math.prod(final)


def test_hippocampus_plan_has_15_stages_and_known_voxel_fraction():
    # By hand, in units of the 8-voxel increment: the final patch is 5x7x5; the paper rule grows
    # 1x1x1, 2x1x1, 2x2x1, 2x2x2, 3x2x2, 3x3x2, 3x3x3, 4x3x3, 4x4x3, 4x4x4, 5x4x4, 5x5x4, 5x5x5,
    # 5x6x5, 5x7x5 (15 stages); their volumes 1+2+4+8+12+18+27+36+48+64+80+100+125+150+175 = 850,
    # each for 10 of the 150 epochs at batch 2, against 15 x 175 for the baseline: 850 / 2625 = 0.3238.
    s = sch.paper((40, 56, 40), (3, 3, 3), 2, 150, "resource")
    assert len(s.stages) == 15
    assert [tuple(p // 8 for p in st.patch_size) for st in s.stages][9:] == [
        (4, 4, 4), (5, 4, 4), (5, 5, 4), (5, 5, 5), (5, 6, 5), (5, 7, 5)]
    assert s.voxel_fraction() == pytest.approx(0.3238, abs=1e-4)
    assert s.voxels() == 10 * 2 * 850 * 8**3
    assert s.baseline_voxels() == 150 * 2 * 40 * 56 * 40


def test_constant_is_the_baseline():
    s = sch.constant((40, 56, 40), (3, 3, 3), 2, 30)
    assert len(s.stages) == 1 and s.voxel_fraction() == 1.0 and s.epochs == 30


def test_stage_lookup():
    s = sch.paper((32, 32, 32), (3, 3, 3), 2, 20, "resource")  # 10 stages of 2 epochs
    assert [s.stage_index_at(e) for e in range(20)] == [i // 2 for i in range(20)]
    with pytest.raises(ValueError):
        s.stage_index_at(20)


@pytest.mark.parametrize("mode", ["resource", "performance"])
def test_parametric_family(mode):
    s = sch.parametric((40, 56, 40), (3, 3, 3), 2, 40, stages=4, growth=1.6, length_ratio=1.5,
                       mode=mode, batch_cap=12)
    assert s.epochs == 40
    assert s.stages[-1].patch_size == (40, 56, 40)
    sizes = [st.patch_voxels for st in s.stages]
    assert sizes == sorted(sizes)
    lengths = [st.epochs for st in s.stages]
    assert lengths == sorted(lengths)  # later stages are longer with length_ratio > 1
    for st in s.stages:
        assert all(p % 8 == 0 for p in st.patch_size)
        if mode == "performance":
            assert st.batch_size <= 12
            assert st.batch_size * st.patch_voxels <= 2 * 40 * 56 * 40
        else:
            assert st.batch_size == 2


def test_parametric_start_fraction_and_final_fraction():
    s = sch.parametric((64, 64, 64), (3, 3, 3), 2, 100, stages=3, start_fraction=0.25, final_fraction=0.5)
    assert s.stages[0].patch_size == (16, 16, 16)
    assert s.stages[-1].epochs == 50
    one = sch.parametric((64, 64, 64), (3, 3, 3), 2, 10, stages=1)
    assert len(one.stages) == 1 and one.voxel_fraction() == 1.0


def test_parametric_merges_stages_that_snap_together():
    s = sch.parametric((16, 16, 16), (3, 3, 3), 2, 12, stages=6, growth=1.1)
    assert len(s.stages) < 6 and s.epochs == 12 and s.meta["stages_requested"] == 6


def test_allocate_epochs_is_proportional():
    # by hand: 20 epochs over weights 1:1:2 are 5, 5, 10; 10 over 1:2:4:8 are 0.67, 1.33, 2.67, 5.33,
    # floored 1 (lifted), 1, 2, 5 = 9, and the one left goes to the largest remainder (2.67)
    assert sch.allocate_epochs(20, [1, 1, 2]) == [5, 5, 10]
    assert sch.allocate_epochs(10, [1, 2, 4, 8]) == [1, 1, 3, 5]
    assert sch.allocate_epochs(10, [1, 1, 1, 1]) == [2, 2, 3, 3]  # ties: the later stages
    # the minimum of one epoch each is taken from the stage furthest above its share
    assert sch.allocate_epochs(5, [1, 1, 1, 1, 100]) == [1, 1, 1, 1, 1]
    assert sch.allocate_epochs(6, [1, 1, 1, 1, 100]) == [1, 1, 1, 1, 2]
    for epochs in range(5, 60):
        weights = [1, 2, 3, 0.5, 9]
        got = sch.allocate_epochs(epochs, weights)
        exact = [epochs * w / sum(weights) for w in weights]
        assert sum(got) == epochs and min(got) >= 1
        if min(exact) >= 1:  # no stage lifted to the minimum: each within one epoch of its share
            assert all(abs(g - x) < 1 for g, x in zip(got, exact)), (epochs, got)
    with pytest.raises(PgpsError, match="need at least 5 epochs"):
        sch.allocate_epochs(4, [1, 2, 3, 0.5, 9])
    with pytest.raises(PgpsError, match="weights must be positive"):
        sch.allocate_epochs(10, [1, float("nan")])


@pytest.mark.parametrize("mode", ["resource", "performance"])
def test_round_trip_json_and_yaml(tmp_path, mode):
    s = sch.paper((20, 192, 160), (2, 5, 5), 3, 77, mode)
    for name in ("s.json", "s.yaml"):
        path = s.save(tmp_path / name)
        back = sch.load(path)
        assert back == s and back.meta == s.meta and back.to_dict() == s.to_dict()
    assert json.loads(s.to_json())["format_version"] == sch.FORMAT_VERSION
    assert sch.Schedule.from_dict(yaml.safe_load(s.to_yaml())) == s


def _bad(d, **change):
    d = json.loads(json.dumps(d))
    d.update(change)
    return d


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"format_version": 99}, "format_version"),
        ({"stages": []}, "at least one stage"),
        ({"extra": 1}, "unknown key"),
        ({"final_patch": [40, 50, 40]}, "not divisible"),
        ({"stages": [{"patch_size": [8, 8, 8], "batch_size": 2, "epochs": 0},
                     {"patch_size": [40, 56, 40], "batch_size": 2, "epochs": 1}]}, "epochs must be >= 1"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": -2, "epochs": 1}]},
         r"stage 0 batch_size must be an integer in \[1, 1000000\], got -2"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": 10**9, "epochs": 1}]}, "batch_size must be"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": 2, "epochs": 10**7}]}, "epochs must be an integer"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": 2, "epochs": 600_000}] * 2},
         "total epochs must be"),
        ({"baseline_batch_size": 0}, "baseline_batch_size must be"),
        ({"pools": [3, -1, 3]}, "pools per axis must be"),
        ({"final_patch": [40, 56, 10**6]}, "final_patch axis must be"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": 2.5, "epochs": 1}]}, "batch_size"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": 2, "epochs": True}]}, "epochs"),
        ({"stages": [{"patch_size": [12, 8, 8], "batch_size": 2, "epochs": 1},
                     {"patch_size": [40, 56, 40], "batch_size": 2, "epochs": 1}]}, "not divisible"),
        ({"stages": [{"patch_size": [16, 16, 16], "batch_size": 2, "epochs": 3}]}, "end the schedule"),
        ({"stages": [{"patch_size": [48, 56, 40], "batch_size": 2, "epochs": 1},
                     {"patch_size": [40, 56, 40], "batch_size": 2, "epochs": 1}]}, "larger than the final"),
        ({"stages": [{"patch_size": [40, 56], "batch_size": 2, "epochs": 1}]}, "patch_size"),
        ({"stages": [{"patch_size": [40, 56, 40], "batch_size": "two", "epochs": 1}]}, "batch_size"),
        ({"pools": [3, 3]}, "pools"),
    ],
)
def test_invalid_schedules_are_refused_with_reason(change, needle):
    good = sch.constant((40, 56, 40), (3, 3, 3), 2, 5).to_dict()
    with pytest.raises(PgpsError, match=needle):
        sch.Schedule.from_dict(_bad(good, **change))


def test_paper_needs_enough_epochs():
    with pytest.raises(PgpsError, match="needs at least 15 epochs"):
        sch.paper((40, 56, 40), (3, 3, 3), 2, 10)


def test_malformed_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stages: [1, 2\n")
    with pytest.raises(PgpsError, match="not valid YAML"):
        sch.load(p)
    with pytest.raises(PgpsError, match="does not exist"):
        sch.load(tmp_path / "none.yaml")


def test_rescale_keeps_the_curriculum_shape():
    s = sch.Schedule(
        (sch.Stage((8, 8, 8), 16, 10), sch.Stage((16, 16, 16), 4, 30), sch.Stage((32, 32, 32), 2, 60)),
        (32, 32, 32), (3, 3, 3), 2, meta={"preset": "mine"},
    )
    doubled = sch.rescale_epochs(s, 200)
    assert [st.epochs for st in doubled.stages] == [20, 60, 120]
    assert doubled.voxel_fraction() == pytest.approx(s.voxel_fraction())
    shrunk = sch.rescale_epochs(s, 20)  # 2, 6, 12 exactly
    assert [st.epochs for st in shrunk.stages] == [2, 6, 12]
    assert [(st.patch_size, st.batch_size) for st in shrunk.stages] == [(st.patch_size, st.batch_size)
                                                                        for st in s.stages]
    assert shrunk.meta == s.meta and shrunk.voxel_fraction() == pytest.approx(s.voxel_fraction())
    odd = sch.rescale_epochs(s, 7)  # shares 0.7, 2.1, 4.2: floors 1 (lifted), 2, 4 = 7
    assert [st.epochs for st in odd.stages] == [1, 2, 4]


# -- families: random patch-size sampling, the sqrt batch rule, explicit lengths, linear growth -------------


def test_random_preset_draws_the_paper_sizes_and_keeps_their_accounting():
    paper = sch.paper((40, 56, 40), (3, 3, 3), 2, 30, "performance")
    rnd = sch.preset("random", (40, 56, 40), (3, 3, 3), 2, 30, "performance")
    assert rnd.sampling == "random" and paper.sampling == "staged" and rnd != paper
    assert rnd.stages == paper.stages and rnd.meta["preset"] == "random"
    # the stage list is the set of sizes and their odds: the expected voxels are the paper's
    assert rnd.voxel_fraction() == paper.voxel_fraction()
    assert "draws its stage at random" in rnd.table() and "at random" not in paper.table()
    assert not paper.final_phase(0) and paper.final_phase(len(paper.stages) - 1)
    assert all(rnd.final_phase(k) for k in range(len(rnd.stages)))


def test_random_draw_is_a_function_of_seed_and_iteration_with_odds_by_epochs():
    s = sch.randomize(sch.parametric((32, 32, 32), (3, 3, 3), 2, 10, stages=3, growth=2.0,
                                     lengths=[0.2, 0.3, 0.5]))  # 8^3, 16^3, 32^3 for 2, 3, 5 epochs
    ipe, n = 100, 1000
    draws = [s.stage_index_of_iteration(i, ipe, seed=3) for i in range(n)]
    assert draws == [s.stage_index_of_iteration(i, ipe, seed=3) for i in reversed(range(n))][::-1]
    assert draws != [s.stage_index_of_iteration(i, ipe, seed=4) for i in range(n)]
    counts = [draws.count(k) for k in range(3)]
    # expected 200, 300, 500 of 1000; 5 standard deviations of a binomial is under 80
    assert all(abs(c - e) < 80 for c, e in zip(counts, (200, 300, 500))), counts
    assert len(set(draws[:ipe])) == 3  # sizes mix within an epoch, not one size per epoch
    staged = sch.paper((32, 32, 32), (3, 3, 3), 2, 20)
    assert [staged.stage_index_of_iteration(i, 3, seed=3) for i in range(60)] == [i // 3 // 2 for i in range(60)]
    with pytest.raises(ValueError, match="outside"):
        s.stage_index_of_iteration(ipe * 10, ipe, seed=3)


def test_random_sampling_survives_files_and_rescaling(tmp_path):
    s = sch.parametric((48, 48, 48), (3, 3, 3), 2, 12, stages=3, growth=2.0, family="random")
    for name in ("r.json", "r.yaml"):
        back = sch.load(s.save(tmp_path / name))
        assert back == s and back.sampling == "random"
    assert sch.rescale_epochs(s, 24).sampling == "random"
    assert "sampling" not in sch.paper((48, 48, 48), (3, 3, 3), 2, 20).to_dict()  # staged files unchanged
    with pytest.raises(PgpsError, match="sampling 'shuffled' unknown; use one of staged, random"):
        sch.Schedule.from_dict({**s.to_dict(), "sampling": "shuffled"})
    # the same checks as a curriculum: a random schedule must still contain the final patch, last
    bad = {**s.to_dict(), "stages": s.to_dict()["stages"][:-1]}
    with pytest.raises(PgpsError, match="end the schedule with a stage at the final patch size"):
        sch.Schedule.from_dict(bad)
    with pytest.raises(PgpsError, match="family 'shuffled' unknown"):
        sch.parametric((48, 48, 48), (3, 3, 3), 2, 12, stages=3, growth=2.0, family="shuffled")


def test_sqrt_batch_rule_lies_between_the_paper_modes():
    # the guide's example, by hand: voxel ratios 64, 32, 16, 8 give 2*sqrt(ratio) = 16, 11.3, 8, 5.7
    s = sch.paper((128, 128, 128), (5, 5, 5), 2, 1000, "sqrt")
    assert [st.batch_size for st in s.stages][:4] == [16, 11, 8, 5] and s.stages[-1].batch_size == 2
    res = sch.paper((128, 128, 128), (5, 5, 5), 2, 1000, "resource")
    perf = sch.paper((128, 128, 128), (5, 5, 5), 2, 1000, "performance")
    for st, r, p in zip(s.stages, res.stages, perf.stages):
        ratio = 128**3 / st.patch_voxels
        assert st.batch_size**2 <= 4 * ratio < (st.batch_size + 1) ** 2  # floor(2 * sqrt(ratio))
        assert r.batch_size <= st.batch_size <= p.batch_size
    assert res.voxel_fraction() < s.voxel_fraction() < perf.voxel_fraction()
    capped = sch.paper((128, 128, 128), (5, 5, 5), 2, 1000, "sqrt", batch_cap=6)
    assert max(st.batch_size for st in capped.stages) == 6


def test_explicit_lengths_as_fractions_or_epochs():
    frac = sch.parametric((64, 64, 64), (3, 3, 3), 2, 20, stages=3, growth=2.0, lengths=[0.25, 0.25, 0.5])
    assert [st.epochs for st in frac.stages] == [5, 5, 10]
    epochs = sch.parametric((64, 64, 64), (3, 3, 3), 2, 20, stages=3, growth=2.0, lengths=[2, 3, 15])
    assert [st.epochs for st in epochs.stages] == [2, 3, 15] and epochs.meta["lengths"] == [2, 3, 15]


@pytest.mark.parametrize("lengths,needle", [
    ([0.5, 0.5], "lengths has 2 entries but the schedule has 3 stages; give one length per stage"),
    ([0.2, 0.3, 0.4], "sum to 0.9; give fractions that sum to 1 or whole epochs that sum to the 20 epochs"),
    ([2, 3, 14], "sum to 19; give fractions that sum to 1 or whole epochs"),
    ([0.5, 0, 0.5], r"lengths entry 1 must be a number in \(0, 1000000\], got 0"),
    ([0.5, float("nan"), 0.5], "lengths entry 1 must be a number"),
    ([0.5, "a", 0.5], "lengths entry 1 must be a number"),
    ("0.5", "lengths must be a list of numbers"),
])
def test_bad_lengths_are_refused_in_one_line(lengths, needle):
    with pytest.raises(PgpsError, match=needle) as info:
        sch.parametric((64, 64, 64), (3, 3, 3), 2, 20, stages=3, growth=2.0, lengths=lengths)
    assert "\n" not in str(info.value)


def test_lengths_exclude_length_ratio_and_final_fraction():
    for extra in ({"length_ratio": 2.0}, {"final_fraction": 0.5}):
        with pytest.raises(PgpsError, match="give lengths, or length_ratio and final_fraction, not both"):
            sch.parametric((64, 64, 64), (3, 3, 3), 2, 20, stages=3, growth=2.0, lengths=[0.2, 0.3, 0.5], **extra)


def test_linear_growth_adds_the_same_side_per_stage():
    # by hand: first side 64 / 2**3 = 8, then +18.67 per stage: 8, 26.7, 45.3, 64, snapped to multiples
    # of 8: 8, 24, 48, 64; geometric growth from the same first side: 8, 16, 32, 64
    linear = sch.parametric((64, 64, 64), (3, 3, 3), 2, 8, stages=4, growth=2.0, growth_shape="linear")
    geometric = sch.parametric((64, 64, 64), (3, 3, 3), 2, 8, stages=4, growth=2.0)
    assert [st.patch_size[0] for st in linear.stages] == [8, 24, 48, 64]
    assert [st.patch_size[0] for st in geometric.stages] == [8, 16, 32, 64]
    # aspect kept per axis; start_fraction sets the same first side
    flat = sch.parametric((32, 64, 96), (3, 3, 3), 2, 6, stages=3, start_fraction=0.5, growth_shape="linear")
    assert [st.patch_size for st in flat.stages] == [(16, 32, 48), (24, 48, 72), (32, 64, 96)]
    assert flat.meta["growth_shape"] == "linear"
    with pytest.raises(PgpsError, match="growth_shape 'cubic' unknown; use one of geometric, linear"):
        sch.parametric((64, 64, 64), (3, 3, 3), 2, 8, stages=4, growth=2.0, growth_shape="cubic")


def test_random_sampling_is_held_to_its_largest_size_by_the_memory_estimate():
    # every size can be drawn, so the hungriest stage counts, as for the staged twin
    paper = sch.paper((64, 64, 64), (3, 3, 3), 2, 40, "sqrt")
    rnd = sch.preset("random", (64, 64, 64), (3, 3, 3), 2, 40, "sqrt")
    assert sch.training_memory(rnd, (4, 8, 16, 32)) == sch.training_memory(paper, (4, 8, 16, 32))


def test_pools_train_refuses_are_refused_by_schedule_with_trains_line(capsys):
    """schedule, train and tune give one line for pools no network here trains with (all 0), and for too few
    filters for the pools (train before the data are prepared, as tune does)."""
    from pgps_tune.cli import main
    from pgps_tune.config import NO_DOWNSAMPLING, check_filters
    from pgps_tune.network import build_network

    assert main(["schedule", "--preset", "paper", "--final-patch", "16", "16", "16", "--pools", "0", "0", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"pgps-tune: error: {NO_DOWNSAMPLING}\n"
    with pytest.raises(PgpsError) as built:  # what train's network build says
        build_network("unet", 1, 2, (0, 0, 0))
    assert str(built.value) == NO_DOWNSAMPLING
    fix = r"needs 7; give fewer pools, or at least 7 widths \(e.g. --filters 16 32 64 128 256 512 1024\)$"
    with pytest.raises(PgpsError, match=fix):
        build_network("unet", 1, 2, (6, 6, 6))
    check_filters("segresnet", (6, 6, 6), ())  # its widths are not filters


def test_public_api_edges_answer_or_refuse_in_one_line():
    s = sch.paper((32, 32, 32), (3, 3, 3), 2, 20)  # 10 stages of 2 epochs
    assert s.stage_at(19) == s.stages[-1] and s.stage_index_at(2.5) == 1  # the last epoch; mid-epoch 2
    for bad in (20, -1, "3", None):
        with pytest.raises(ValueError, match="epoch"):
            s.stage_at(bad)
    assert s.stage_index_of_iteration(199, 10, 0) == 9
    with pytest.raises(ValueError, match=r"iteration 200 outside the schedule's 0\.\.199"):
        s.stage_index_of_iteration(200, 10, 0)
    with pytest.raises(ValueError, match="iterations_per_epoch must be >= 1"):
        s.stage_index_of_iteration(5, 0, 0)
    # lists from Python are the same schedule as a file's tuples; a dict is not a Stage; meta=None is none
    listed = sch.Schedule([sch.Stage([32, 32, 32], 2, 5)], [32, 32, 32], [3, 3, 3], 2, meta=None)
    assert listed == sch.constant((32, 32, 32), (3, 3, 3), 2, 5) and listed.meta == {} and hash(listed)
    with pytest.raises(PgpsError, match="stage 0 is a dict, not a Stage"):
        sch.Schedule(({"patch_size": [32, 32, 32]},), (32, 32, 32), (3, 3, 3), 2)
    with pytest.raises(PgpsError, match=r"3 whole numbers .*32\.5"):  # was cut to 32 silently
        sch.paper((32.5, 32, 32), (3, 3, 3), 2, 20)
    with pytest.raises(PgpsError, match="needs 3 values"):
        sch.paper(32, (3, 3, 3), 2, 20)
    with pytest.raises(PgpsError, match=r"^epochs must be an integer"):
        sch.paper((32, 32, 32), (3, 3, 3), 2, "20")
    with pytest.raises(PgpsError, match="no memory model for network 'swin'"):
        sch.training_memory(s, [8, 16], "swin")


def test_hand_edited_files_are_read_or_refused_naming_the_fix(tmp_path):
    good = sch.paper((32, 32, 32), (3, 3, 3), 2, 10).to_dict()
    p = tmp_path / "s.yaml"
    p.write_text("# tuned on my data\n" + yaml.safe_dump(dict(reversed(list(good.items())))) + "# end\n")
    assert sch.load(p) == sch.Schedule.from_dict(good)  # comments, keys in another order
    p.write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "format_version"}))
    with pytest.raises(PgpsError, match="missing key 'format_version'.*'format_version: 1'"):
        sch.load(p)
    p.write_text(json.dumps({**good, "baseline_batch_size": 2.0}))
    with pytest.raises(PgpsError) as err:
        sch.load(p)
    assert str(err.value) == f"{p}: baseline_batch_size must be an integer, got 2.0; write 2"  # the path once
    good["stages"][0]["patch_size"] = [8.0, 8, 8]
    p.write_text(json.dumps(good))
    with pytest.raises(PgpsError, match=r"must hold integers, got \[8\.0, 8, 8\]; write 8$"):
        sch.load(p)
