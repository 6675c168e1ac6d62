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
    s = sch.paper((40, 56, 40), (3, 3, 3), 2, 150, "resource")
    assert len(s.stages) == 15
    expected = sum(math.prod(p.patch_size) for p in s.stages) / (15 * 40 * 56 * 40)
    assert s.voxel_fraction() == pytest.approx(expected)
    assert s.voxels(iterations_per_epoch=7) == 7 * sum(10 * 2 * p.patch_voxels for p in s.stages)
    assert s.voxels_until(s.epochs) == pytest.approx(s.voxels())


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


def test_allocate_epochs_sums_and_minimum():
    for epochs in range(5, 40):
        got = sch.allocate_epochs(epochs, [1, 2, 3, 0.5, 9])
        assert sum(got) == epochs and min(got) >= 1


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
    s = sch.paper((32, 32, 32), (3, 3, 3), 2, 100, "performance")
    r = sch.rescale_epochs(s, 20)
    assert r.epochs == 20 and [st.patch_size for st in r.stages] == [st.patch_size for st in s.stages]
    assert r.voxel_fraction() == pytest.approx(s.voxel_fraction())
