"""Normalisation by modality: CT dataset-wide from foreground statistics, everything else per volume."""

import json

import numpy as np
import pytest
from conftest import make_msd

from pgps_tune import data, intensity
from pgps_tune.errors import PgpsError


def _ct_cases():
    """Two CT cases whose foreground holds 1..1000 HU between them, in a -1000 HU (air) background."""
    cases = []
    for values in (np.arange(1, 601), np.arange(601, 1001)):
        image = np.full((1, 10, 10, 10), -1000.0, dtype=np.float32)
        label = np.zeros((10, 10, 10), dtype=np.uint8)
        label.ravel()[: values.size] = 1
        image[0].ravel()[: values.size] = values
        cases.append((image, label))
    return cases


def test_modality_names_pick_the_scheme():
    assert intensity.scheme_names(["CT", "ct ", "MRI", "T2", "FLAIR", "image"]) == ["ct", "ct"] + ["zscore"] * 4
    # nnU-Net v2's other channel names, compared as nnU-Net compares them (casefold)
    assert intensity.scheme_names(["noNorm", "NONORM", "rescale_to_0_1", "RGB_to_0_1"]) == [
        "none", "none", "rescale", "rgb"]


def test_nnunets_other_schemes_keep_rescale_or_divide_each_channel_on_its_own():
    image = np.stack([np.linspace(-50, 150, 8, dtype=np.float32).reshape(2, 2, 2)] * 4)
    image[3] = 255.0
    schemes = intensity.fit(["none", "rescale", "rgb", "rescale"], [])
    assert schemes == [{"type": "none"}, {"type": "rescale"}, {"type": "rgb"}, {"type": "rescale"}]
    out = intensity.normalise(image, schemes)
    assert np.array_equal(out[0], image[0])  # noNorm: as they are
    assert out[1].min() == 0 and out[1].max() == pytest.approx(1) and np.argmax(out[1]) == np.argmax(image[1])
    assert out[2] == pytest.approx(image[2] / 255)
    assert np.array_equal(out[3], np.zeros_like(out[3]))  # a constant volume rescales to 0, not NaN
    mixed = intensity.fit(["ct", "none"], _ct_cases_with_second_channel())
    assert mixed[0]["type"] == "ct" and mixed[1] == {"type": "none"}


def _ct_cases_with_second_channel():
    return [(np.concatenate([image, image]), label) for image, label in _ct_cases()]


def test_ct_statistics_weigh_every_case_equally_as_nnunets_sampling_does():
    (scheme,) = intensity.fit(["ct"], _ct_cases())
    # 1..600 HU in one case, 601..1000 in the other: equal weights make the foreground a half-half mixture of the
    # two uniforms (pooling the voxels would give the 600-voxel case 1.5x the weight: mean 500.5, not 550.5)
    assert scheme["type"] == "ct"
    assert scheme["mean"] == pytest.approx((300.5 + 800.5) / 2, abs=5)
    within = (600**2 / 12 + 400**2 / 12) / 2  # mixture variance: mean of the variances + variance of the means
    assert scheme["sd"] == pytest.approx(np.sqrt(within + 250.0**2), rel=0.02)
    # the 0.5 / 99.5 percentiles of the mixture: the 1st percentile of the first case, the 99th of the second
    assert scheme["lower"] == pytest.approx(1 + 599 * 0.01, abs=3)
    assert scheme["upper"] == pytest.approx(601 + 399 * 0.99, abs=3)


def test_ct_normalisation_is_the_same_map_for_every_volume():
    (scheme,) = intensity.fit(["ct"], _ct_cases())
    mean, sd = scheme["mean"], scheme["sd"]
    a = np.array([[[[-1000.0, 100.0, mean, 5000.0]]]], dtype=np.float32)
    b = np.array([[[[100.0, 0.0, 0.0, 0.0]]]], dtype=np.float32)
    na, nb = intensity.normalise(a, [scheme]), intensity.normalise(b, [scheme])
    expected = [(scheme["lower"] - mean) / sd, (100 - mean) / sd, 0.0, (scheme["upper"] - mean) / sd]
    assert na.ravel() == pytest.approx(expected, abs=1e-5)  # clipped to the percentiles, then z-scored
    assert nb.ravel()[0] == pytest.approx(na.ravel()[1])  # 100 HU means the same in any volume


def test_mixed_ct_and_mri_channels_are_normalised_each_on_its_own():
    cases = []
    for image, label in _ct_cases():
        mri = np.random.default_rng(0).normal(300, 40, (1, 10, 10, 10)).astype(np.float32)
        cases.append((np.concatenate([image, mri]), label))
    ct_only = intensity.fit(["ct"], [(image[:1], label) for image, label in cases])
    schemes = intensity.fit(["ct", "zscore"], cases)
    assert schemes == [ct_only[0], {"type": "zscore"}]  # the MRI channel does not touch the CT statistics
    out = intensity.normalise(cases[0][0], schemes)
    assert abs(out[1].mean()) < 1e-5 and out[1].std() == pytest.approx(1, abs=1e-4)
    assert out[0] == pytest.approx(intensity.normalise(cases[0][0][:1], ct_only)[0])


def test_zscore_only_datasets_are_not_read_for_statistics():
    def never():
        raise AssertionError("cases were read although no channel is CT")
        yield

    assert intensity.fit(["zscore", "zscore"], never()) == [{"type": "zscore"}] * 2


def test_a_ct_dataset_without_foreground_is_refused_with_the_fix():
    cases = [(image, np.zeros_like(label)) for image, label in _ct_cases()]
    with pytest.raises(PgpsError, match="no labelled case has foreground"):
        intensity.fit(["zscore", "ct"], [(np.concatenate([i, i]), lab) for i, lab in cases])


def test_large_cases_are_sampled_reproducibly():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (1, 40, 40, 40)).astype(np.float32)  # 64000 foreground voxels
    label = np.ones((40, 40, 40), dtype=np.uint8)
    first = intensity.fit(["ct"], [(image, label)], seed=3)
    assert first == intensity.fit(["ct"], [(image, label)], seed=3)
    assert first != intensity.fit(["ct"], [(image, label)], seed=4)  # a sample, not every voxel
    assert first[0]["mean"] == pytest.approx(image.mean(), abs=0.5) and first[0]["sd"] == pytest.approx(10, rel=0.05)


def test_prepare_normalises_ct_dataset_wide_and_records_the_scheme(tmp_path):
    root = make_msd(tmp_path / "ct", n=3)
    meta = json.loads((root / "dataset.json").read_text())
    mri = data.prepare(root)
    assert mri.normalisation == [{"type": "zscore"}]
    meta["modality"] = {"0": "CT"}
    (root / "dataset.json").write_text(json.dumps(meta))
    ct = data.prepare(root)
    assert ct.cache_dir != mri.cache_dir  # the modality is part of the cache key
    (scheme,) = ct.normalisation
    assert scheme["type"] == "ct"
    assert json.loads((ct.cache_dir / "prepared.json").read_text())["normalisation"] == [scheme]
    raw = [data._load_image(c.images[0])[0] for c in data.discover(root).cases]
    for i, image in enumerate(raw):  # one affine map for all cases: the same statistics everywhere
        expected = (np.clip(image, scheme["lower"], scheme["upper"]) - scheme["mean"]) / scheme["sd"]
        assert np.allclose(ct.image(i)[0], expected, atol=1e-5)


def test_a_recipe_accepts_exactly_the_schemes_normalise_applies():
    from pgps_tune import intensity
    from pgps_tune.config import SCHEMES

    assert set(SCHEMES) == {"ct", *intensity.FIXED}


def test_an_rgb_channel_outside_0_to_255_is_refused_naming_the_case(tmp_path):
    intensity.check_values(np.array([[[[0.0, 255.0]]]]), [{"type": "rgb"}], "x")  # in range: nothing to say
    intensity.check_values(np.array([[[[-5.0, 900.0]]]]), [{"type": "none"}], "x")  # no range for other schemes
    root = make_msd(tmp_path / "rgb", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "RGB_to_0_1"}  # nnU-Net's name, any case; make_msd's images hold negative values
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(PgpsError, match=r"^case \S+: channel 0 is declared rgb_to_0_1 .* outside 0-255; declare it "
                                        r"as zscore or rescale_to_0_1 in dataset.json, or fix the image$"):
        data.prepare(root)


def test_ct_mean_and_sd_are_those_of_the_unclipped_foreground_as_nnunets():
    image = np.zeros((1, 10, 10, 10), dtype=np.float32)
    image[0, 0, 0, 0] = 100_000.0  # one outlier in 1,000 foreground voxels, far above the 99.5 percentile
    (scheme,) = intensity.fit(["ct"], [(image, np.ones((10, 10, 10), dtype=np.uint8))])
    assert scheme["upper"] < 1  # the percentile clips it away...
    assert scheme["mean"] > 10  # ...but mean and sd see it (about 10 of the 10,000 draws; clipped they would be 0)
    assert scheme["sd"] > 1000
