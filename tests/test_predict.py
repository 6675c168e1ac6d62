"""``pgps-tune predict`` and ``evaluate``: outputs in each input's geometry, Dice as evaluate reports it."""

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob_case, make_msd

from pgps_tune import data, imageio
from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.config import TrainConfig
from pgps_tune.predict import Run, case_geometry, predict_case, segment
from pgps_tune.trainer import Trainer, dice_scores, evaluate_run

# the case files of the trained run are stored in an unusual orientation: permuted and flipped axes
ODD = np.array([[0, -1.0, 0, 30], [0, 0, 1.0, -5], [-1.0, 0, 0, 12], [0, 0, 0, 1]])


def _train(root, out, cache, epochs=4, ipe=10, augment="default"):
    ds = data.prepare(root, cache_root=cache)
    s = sch.preset("constant", (16, 16, 16), (2, 2, 2), 2, epochs)
    cfg = TrainConfig(iterations_per_epoch=ipe, val_every=epochs, threads=1, filters=(4, 8, 16), augment=augment)
    train, val = data.split(ds, 0.34, seed=0)
    Trainer(ds, train, val, s, cfg, out).fit()
    return ds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained briefly on 6 tiny blob cases; case_005 is stored with the ODD affine."""
    base = tmp_path_factory.mktemp("predict")
    root = make_msd(base / "data", n=6)
    image, label = (np.asanyarray(nib.load(root / d / "case_005.nii.gz").dataobj) for d in ("imagesTr", "labelsTr"))
    for d, arr in (("imagesTr", image), ("labelsTr", label)):
        nib.save(nib.Nifti1Image(imageio.from_canonical(arr, ODD), ODD), root / d / "case_005.nii.gz")
    ds = _train(root, base / "run", base / "cache")
    return base / "run", root, ds


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def one_line_error(rc, err, needle):
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


def _dice(pred, label, num_classes):
    return float(np.nanmean(dice_scores(torch.from_numpy(pred), torch.from_numpy(label), num_classes)))


def test_prediction_has_the_input_geometry_and_the_dice_evaluate_reports(run, tmp_path, capsys):
    run_dir, root, ds = run
    for case in ("case_001", "case_005"):  # case_005: permuted and flipped axes
        rc, out, err = cli(capsys, "predict", "--run", run_dir, "--input", root / "imagesTr" / f"{case}.nii.gz",
                           "--out", tmp_path / "pred")
        assert rc == 0, err
        assert json.loads(out)["outputs"] == [str(tmp_path / "pred" / f"{case}.nii.gz")]
        assert len(err.splitlines()) == 1 and case in err  # one progress line per case
        source = nib.load(root / "imagesTr" / f"{case}.nii.gz")
        pred = nib.load(tmp_path / "pred" / f"{case}.nii.gz")
        assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)
        label = np.asanyarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj)
        dice = _dice(np.asanyarray(pred.dataobj), label, ds.num_classes)
        reported = evaluate_run(run_dir, ds, "cpu", cases=[ds.case_ids.index(case)])["dice"]
        assert dice == pytest.approx(reported, abs=1e-6)
        assert dice > 0.1  # the run learnt something, so the equality compares real segmentations


def test_mirroring_keeps_the_geometry_and_the_dice_evaluate_mirror_reports(run, tmp_path, capsys):
    run_dir, root, ds = run
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", root / "imagesTr" / "case_005.nii.gz",
                     "--out", tmp_path, "--mirror", "--quiet")
    assert rc == 0 and err == ""
    pred, source = nib.load(tmp_path / "case_005.nii.gz"), nib.load(root / "imagesTr" / "case_005.nii.gz")
    assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)
    label = np.asanyarray(nib.load(root / "labelsTr" / "case_005.nii.gz").dataobj)
    dice = _dice(np.asanyarray(pred.dataobj), label, ds.num_classes)
    case = [ds.case_ids.index("case_005")]
    mirrored = evaluate_run(run_dir, ds, "cpu", cases=case, mirror=True)["dice"]
    assert dice == pytest.approx(mirrored, abs=1e-6)
    # the CLI says that it mirrored; its Dice over the validation cases comes from the same inference
    rc, out, err = cli(capsys, "evaluate", "--data", root, "--run", run_dir, "--mirror")
    assert rc == 0, err
    report = json.loads(out)
    assert report["mirrored"] is True and report["scored"] and report["dice"] > 0


def test_mirroring_is_refused_for_a_run_that_never_trained_on_mirrored_patches(tmp_path, capsys):
    root = make_msd(tmp_path / "data", n=4)
    _train(root, tmp_path / "run", tmp_path / "cache", epochs=1, ipe=1, augment="none")
    for argv in (("predict", "--run", tmp_path / "run", "--input", root / "imagesTr", "--out", tmp_path / "pred",
                  "--mirror"),
                 ("evaluate", "--data", root, "--cache-dir", tmp_path / "cache", "--run", tmp_path / "run",
                  "--mirror")):
        rc, out, err = cli(capsys, *argv)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "trained without mirroring (augmentation 'none')" in err and "leave out --mirror" in err
    assert not (tmp_path / "pred").exists()  # refused before any work
    rc, out, _ = cli(capsys, "evaluate", "--data", root, "--cache-dir", tmp_path / "cache", "--run", tmp_path / "run")
    assert rc == 0 and json.loads(out)["mirrored"] is False


class Threshold(torch.nn.Module):
    """Class 1 where the normalised intensity is positive: a model whose right answer is known."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), 10 * x[:, :1]], 1)


def _sphere(shape, spacing, centre_mm, radius_mm):
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    return (np.linalg.norm(grid - centre_mm, axis=-1) < radius_mm).astype(np.float32)


@pytest.mark.parametrize("end", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_a_resampled_input_comes_back_on_its_own_grid(tmp_path, end):
    # the run saw 1 mm voxels; the input has 1 x 1.5 x 3 mm voxels (R, A, S) stored on the axes I, L, A
    run = Run(Threshold(), channels=1, num_classes=2, final_patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0),
              normalisation=[{"type": "ct", "lower": -1e9, "upper": 1e9, "mean": 0.5, "sd": 1.0}])
    canonical_spacing = (1.0, 1.5, 3.0)
    sphere = _sphere((30, 20, 10), canonical_spacing, (13.0, 16.0, 14.0), 8.0)
    affine = np.array([[0, -1.0, 0, 40], [0, 0, 1.5, -5], [-3.0, 0, 0, 12], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("I", "L", "A")
    image = imageio.from_canonical(sphere, affine)  # the same sphere, stored on the input's axes
    imageio.write(tmp_path / f"in{end}", image, affine)
    geometry = case_geometry([tmp_path / f"in{end}"], 1)
    assert geometry.spacing == pytest.approx(canonical_spacing) and geometry.canonical_shape == (30, 20, 10)
    label = predict_case(run, [tmp_path / f"in{end}"], geometry, torch.device("cpu"))
    assert label.shape == image.shape
    assert _dice(label, image.astype(np.uint8), 2) > 0.97  # a voxel's shift along any axis costs far more
    shifted = np.roll(image, 1, axis=0)  # one 3 mm voxel
    assert _dice(label, shifted.astype(np.uint8), 2) < 0.9


def test_an_itk_output_keeps_the_spacing_direction_and_origin_its_input_stores(tmp_path, monkeypatch):
    """A MetaImage header written with 4 digits holds directions that are not unit vectors: an output whose fields
    were split anew from the affine (spacing 2e-5 smaller, directions normalised) is refused by ITK beside its
    input ('Inputs do not occupy the same physical space')."""
    import SimpleITK as sitk

    from pgps_tune import predict as pr

    run = Run(Threshold(), channels=1, num_classes=2, final_patch=(16, 16, 16), spacing=(0.7, 0.9, 2.3),
              normalisation=[{"type": "ct", "lower": -1e9, "upper": 1e9, "mean": 0.5, "sd": 1.0}])
    monkeypatch.setattr(pr, "_load_run", lambda run_dir, device: run)
    image = np.zeros((6, 5, 4), np.float32)
    image[1:4, 2:5, 1:3] = 1
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "TransformMatrix = 0.8660 0.5 0 -0.5 0.8660 0 0 0 1\nOffset = 1.5 -2.5 3.5\n"
              "ElementSpacing = 0.7 0.9 2.3\nDimSize = 6 5 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    (tmp_path / "in.mha").write_bytes(header.encode() + image.transpose(2, 1, 0).tobytes())
    pr.predict("run", tmp_path / "in.mha", tmp_path / "out", "cpu")
    source, out = (sitk.ReadImage(str(f)) for f in (tmp_path / "in.mha", tmp_path / "out" / "in.mha"))
    assert out.GetSpacing() == source.GetSpacing() == (0.7, 0.9, 2.3)
    assert out.GetDirection() == source.GetDirection() and out.GetOrigin() == source.GetOrigin()
    assert np.array_equal(sitk.GetArrayFromImage(out), image.transpose(2, 1, 0))  # at the run's spacing: exact


def test_mirroring_averages_copies_flipped_back_into_place():
    run = Run(Threshold(), channels=1, num_classes=2, final_patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0),
              normalisation=[{"type": "zscore"}])
    image = np.random.default_rng(0).normal(size=(1, 20, 18, 17)).astype(np.float32)
    plain = segment(run, image, torch.device("cpu"))
    mirrored = segment(run, image, torch.device("cpu"), mirror=True)
    assert plain.shape == (2, 20, 18, 17)
    assert np.allclose(mirrored, plain, atol=1e-5)  # the model commutes with flips: any misplaced copy would show


def test_existing_outputs_are_refused_before_any_work(run, tmp_path, capsys):
    run_dir, root, _ = run
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("case_000", "case_001"):
        (folder / f"{case}.nii.gz").write_bytes((root / "imagesTr" / f"{case}.nii.gz").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "case_001.nii.gz").write_bytes(b"precious")
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", out)
    one_line_error(rc, err, "case_001.nii.gz already exists; add --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["case_001.nii.gz"]  # case_000 was not predicted either
    assert (out / "case_001.nii.gz").read_bytes() == b"precious"
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", out, "--overwrite",
                     "--skip-existing")
    one_line_error(rc, err, "--overwrite and --skip-existing contradict each other")
    # a predict stopped part-way continues: the existing output is kept, the other case segmented
    rc, stdout, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", out, "--skip-existing")
    assert rc == 0 and json.loads(stdout)["skipped"] == 1 and json.loads(stdout)["cases"] == 2
    assert "case_001.nii.gz exists, skipped" in err and (out / "case_001.nii.gz").read_bytes() == b"precious"
    assert nib.load(out / "case_000.nii.gz").shape == nib.load(folder / "case_000.nii.gz").shape
    rc, stdout, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", out, "--overwrite")
    assert rc == 0 and json.loads(stdout)["cases"] == 2 and len(err.splitlines()) == 2
    assert nib.load(out / "case_001.nii.gz").shape == (20, 24, 16)
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", folder / "case_000.nii.gz", "--out", folder,
                     "--overwrite")
    one_line_error(rc, err, "would replace its own input")
    # the input folder itself: a CASE_0000 image's output CASE would be read as an image by the next predict
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", folder)
    one_line_error(rc, err, "is the --input folder: the segmentations would lie among the images")
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", tmp_path / "seg.nii.gz")
    one_line_error(rc, err, "seg.nii.gz is named like an image file, but it is the folder the segmentations go in")
    assert sorted(p.name for p in folder.iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory):
    """A 2-channel (CT + MRI) MSD dataset with 4D images, and a run trained on it for a few iterations."""
    base = tmp_path_factory.mktemp("twochannel")
    root = base / "data"
    training = []
    for i in range(3):
        image, label = blob_case((16, 16, 16), i)
        both = np.stack([image * 300 - 100, image], -1).astype(np.float32)
        for d, arr in (("imagesTr", both), ("labelsTr", label.astype(np.uint8))):
            (root / d).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.eye(4)), root / d / f"two_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/two_{i:03d}.nii.gz", "label": f"./labelsTr/two_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Two", "modality": {"0": "CT", "1": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "training": training}))
    ds = _train(root, base / "run", base / "cache", epochs=1, ipe=2)
    assert [s["type"] for s in ds.normalisation] == ["ct", "zscore"]
    return base / "run", root


def test_multichannel_4d_file_and_nnunet_channel_files_agree(two_channel_run, tmp_path, capsys):
    run_dir, root = two_channel_run
    four_d = root / "imagesTr" / "two_001.nii.gz"
    img = nib.load(four_d)
    split = tmp_path / "split"
    split.mkdir()
    for c in range(2):  # the same case as nnU-Net writes it: one .mha per channel
        imageio.write(split / f"two_001_{c:04d}.mha", np.asanyarray(img.dataobj)[..., c], img.affine)
    assert cli(capsys, "predict", "--run", run_dir, "--input", four_d, "--out", tmp_path / "a", "--quiet")[0] == 0
    assert cli(capsys, "predict", "--run", run_dir, "--input", split, "--out", tmp_path / "b", "--quiet")[0] == 0
    assert cli(capsys, "predict", "--run", run_dir, "--input", split / "two_001_0000.mha",
               "--out", tmp_path / "c", "--quiet")[0] == 0
    a = nib.load(tmp_path / "a" / "two_001.nii.gz")
    assert a.shape == (16, 16, 16) and np.array_equal(a.affine, img.affine)
    for other in (tmp_path / "b" / "two_001.mha", tmp_path / "c" / "two_001.mha"):  # the input's format
        arr, affine = imageio.read(other)
        assert np.array_equal(arr, np.asanyarray(a.dataobj)) and np.allclose(affine, img.affine)
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", split / "two_001_0001.mha", "--out", tmp_path)
    one_line_error(rc, err, "gives 1 channel(s) (two_001_0001.mha is 16x16x16) but the run was trained on 2")
    # the two channels as a NIfTI vector image X x Y x Z x 1 x C: the same labels, written as a plain 3D label map
    vector = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None, :], img.affine)
    vector.header.set_intent("vector")
    nib.save(vector, tmp_path / "two_001.nii.gz")
    assert cli(capsys, "predict", "--run", run_dir, "--input", tmp_path / "two_001.nii.gz", "--out", tmp_path / "v",
               "--quiet")[0] == 0
    v = nib.load(tmp_path / "v" / "two_001.nii.gz")
    assert np.array_equal(v.dataobj, a.dataobj) and v.header.get_intent()[0] == "none"
    # channel files on one grid by the rule training data follow: channel 1 stored mirrored along x with a header
    # that says so is read as training would read it (one warning); one whose header is turned by 1 degree is not
    c, s = np.cos(np.radians(1.0)), np.sin(np.radians(1.0))
    for name, affine in (("mirrored", np.array([[-1.0, 0, 0, 15], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
                         ("turned", np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))):
        (tmp_path / name).mkdir()
        imageio.write(tmp_path / name / "two_001_0000.nii.gz", np.asanyarray(img.dataobj)[..., 0], img.affine)
        imageio.write(tmp_path / name / "two_001_0001.nii.gz",
                      imageio.from_canonical(np.asanyarray(img.dataobj)[..., 1], affine), affine)
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", tmp_path / "mirrored", "--out", tmp_path / "d",
                     "--quiet")
    assert rc == 0 and err == ("pgps-tune: warning: case two_001: two_001_0001.nii.gz stores its voxels in "
                               "orientation LAS, its image in RAS; both were reoriented by their headers"), err
    assert np.array_equal(nib.load(tmp_path / "d" / "two_001.nii.gz").dataobj, a.dataobj)
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", tmp_path / "turned", "--out", tmp_path / "e")
    one_line_error(rc, err, "two_001_0001.nii.gz is not on its image's voxel grid (voxel sizes [1.0, 1.0, 1.0] against "
                            "[1.0, 1.0, 1.0], orientation RAS against RAS, axes up to 1 degrees apart)")


def test_bad_inputs_give_one_line(run, two_channel_run, tmp_path, capsys):
    run_dir, root, _ = run
    two_dir, two_root = two_channel_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    channels = tmp_path / "misregistered"
    channels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), channels / "x_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 9), np.float32), np.eye(4)), channels / "x_0001.nii.gz")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    for name in ("y_0000.nii.gz", "y_0001.nii.gz", "z_0000.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), lonely / name)
    twice = tmp_path / "twice"  # channel 0000 twice (two endings), channel 0001 missing: not to be filled in
    per_case = tmp_path / "two_per_case"  # nnU-Net files of a 2-channel dataset given to a 1-channel run
    for folder, names in ((twice, ("a_0000.nii.gz", "a_0000.nii", "b_0000.nii.gz", "b_0001.nii.gz")),
                          (per_case, ("c_0000.nii.gz", "c_0001.nii.gz", "d_0000.nii.gz", "d_0001.nii.gz"))):
        folder.mkdir()
        for name in names:
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), folder / name)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.complex64), np.eye(4)), tmp_path / "complex.nii.gz")
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "flat.mha"))
    shutil.copy(tmp_path / "flat.nii.gz", tmp_path / ".nii.gz")
    gone = tmp_path / "gone"  # an image whose link lost its target (an unmounted share) is not left out
    gone.mkdir()
    shutil.copy(root / "imagesTr" / "case_000.nii.gz", gone / "case_000.nii.gz")
    (gone / "case_001.nii.gz").symlink_to(tmp_path / "unmounted" / "case_001.nii.gz")
    image = root / "imagesTr" / "case_000.nii.gz"
    cases = [
        (tmp_path, image, "does not exist; give --run a run folder"),
        (run_dir, tmp_path / "absent.nii.gz", "does not exist; give an image file"),
        (run_dir, tmp_path / "empty", "holds no image files"),
        (run_dir, root / "dataset.json", "is not an image this tool reads"),
        (run_dir, tmp_path / "broken.nii.gz", "cannot read NIfTI file"),
        (run_dir, tmp_path / "flat.nii.gz", "has 2 dimensions"),
        (run_dir, tmp_path / "nan.nii.gz", "non-finite voxels"),
        (two_dir, image, "gives 1 channel(s) (case_000.nii.gz is 20x24x16) but"),
        (two_dir, channels, "does not share the voxel grid"),
        (two_dir, lonely, "case z in " + str(lonely) + " has channel file(s) 0000 (z_0000.nii.gz) but the run takes "
                          "0000, 0001, each once"),
        (two_dir, twice, "case a in " + str(twice) + " has channel file(s) 0000, 0000 (a_0000.nii, a_0000.nii.gz)"),
        (run_dir, lonely.parent / "two_per_case", "holds nnU-Net channel files 0000 to 0001 (2 channels per case) but "
                                                  "the run was trained on 1"),
        (run_dir, tmp_path / "complex.nii.gz", "holds complex voxels (complex64); give a scalar image"),
        (run_dir, tmp_path / "rgb.nii.gz", "holds RGB or other compound voxels"),
        (run_dir, tmp_path / "flat.mha", "has 2 dimensions; images must be 3D"),
        (run_dir, tmp_path / ".nii.gz", "has no name before its ending"),
        (run_dir, gone, f"case_001.nii.gz is a link to {tmp_path / 'unmounted'}"),
        (run_dir, gone / "case_001.nii.gz", "case_001.nii.gz is a link to "),
    ]
    for run_arg, source, needle in cases:
        rc, _, err = cli(capsys, "predict", "--run", run_arg, "--input", source, "--out", tmp_path / "out")
        one_line_error(rc, err, needle)
    assert not list((tmp_path / "out").glob("*"))
    (tmp_path / "file").write_text("")
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", image, "--out", tmp_path / "file")
    one_line_error(rc, err, "is a file; give a folder for the segmentations")
    one_line_error(*cli(capsys, "predict", "--run", run_dir, "--input", image, "--out", "")[::2],
                   "argument --out is empty; give a value")
    (tmp_path / "taken" / "case_000.nii.gz").mkdir(parents=True)  # an output name taken by a folder
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", image, "--out", tmp_path / "taken", "--overwrite")
    one_line_error(rc, err, "case_000.nii.gz is a folder; move it away or choose another --out")


def test_an_input_too_large_for_memory_is_refused_before_any_output_and_a_full_disk_names_what_is_done(
        run, tmp_path, capsys, monkeypatch):
    run_dir, root, _ = run
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    image, _ = blob_case((20, 24, 16), 0)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), coarse / "a.nii.gz")
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([8.0, 8.0, 8.0, 1.0])), coarse / "b.nii.gz")  # 8 mm
    monkeypatch.setattr(imageio, "available_memory", lambda: 2**27)
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", coarse, "--out", tmp_path / "o1")
    one_line_error(rc, err, "case b (20x24x16 voxels of 8x8x8 mm) is resampled to the run's spacing 1x1x1 mm as "
                            "160x192x128 voxels, about 0.")
    assert "GiB of memory to segment, more than the 0.1 GiB available" in err and not (tmp_path / "o1").exists()
    monkeypatch.undo()
    (coarse / "b.nii.gz").unlink()
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), coarse / "c.nii.gz")
    real, calls = imageio.write, []

    def disk_fills(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(imageio, "write", disk_fills)
    rc, _, err = cli(capsys, "predict", "--run", run_dir, "--input", coarse, "--out", tmp_path / "o2", "--quiet")
    one_line_error(rc, err, "c.nii.gz (No space left on device): free space or choose another --out (case 2 of 2; "
                            "the 1 output(s) before it are complete: once fixed, add --skip-existing")
    assert nib.load(tmp_path / "o2" / "a.nii.gz").shape == (20, 24, 16)


def test_ctrl_c_part_way_leaves_whole_outputs_and_says_how_to_go_on(run, tmp_path, capsys, monkeypatch):
    run_dir, root, _ = run
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("case_000", "case_001"):
        shutil.copy(root / "imagesTr" / f"{case}.nii.gz", folder)
    real = imageio.write

    def ctrl_c_on_the_second(path, *args, **kwargs):
        if path.name == "case_001.nii.gz":
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(imageio, "write", ctrl_c_on_the_second)
    for extra, hint in (((), "rerun the same command with --skip-existing added to segment only the cases left"),
                        (("--skip-existing",), "rerun the same command to segment only the cases left"),
                        (("--overwrite",), "still hold what was there before: rerun the same command")):
        rc, out, err = cli(capsys, "predict", "--run", run_dir, "--input", folder, "--out", tmp_path / "out",
                           "--quiet", *extra)
        assert rc == 130 and out == "" and len(err.splitlines()) == 1, err
        assert f"interrupted; every output in {tmp_path / 'out'} is complete" in err and hint in err
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_000.nii.gz"]


def test_evaluate_scores_the_validation_cases_of_the_run_and_says_so(run, tmp_path, capsys):
    run_dir, root, ds = run
    val = json.loads((run_dir / "metrics.json").read_text())["split"]["val"]
    rc, out, _ = cli(capsys, "evaluate", "--run", run_dir, "--data", root)
    ev = json.loads(out)
    assert rc == 0 and ev["scored"] == f"validation cases of the run ({len(val)})"
    assert ev["case_ids"] == sorted(val) and ev["cases"] == len(val) == 2
    assert list(ev["dice_per_case"]) == ev["case_ids"]  # each scored case's Dice per class
    for name, dice in ev["dice_per_class"].items():
        assert dice == pytest.approx(np.mean([ev["dice_per_case"][c][name] for c in val]), abs=1e-4)
    rc, out, _ = cli(capsys, "evaluate", "--run", run_dir, "--data", root, "--all-cases")
    ev = json.loads(out)
    assert "training cases included" in ev["scored"] and ev["cases"] == 6 and ev["case_ids"] == ds.case_ids
    old = tmp_path / "old_run"  # a run from before runs recorded their split
    shutil.copytree(run_dir, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["split"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    ev = json.loads(cli(capsys, "evaluate", "--run", old, "--data", root)[1])
    assert ev["cases"] == 6 and "does not record its validation cases" in ev["scored"]
    other = make_msd(tmp_path / "other", n=3)  # named Tiny too, but without the run's cases 3 to 5
    rc, out, _ = cli(capsys, "evaluate", "--run", run_dir, "--data", other)
    ev = json.loads(out)
    assert ev["cases"] == 3 and re.fullmatch(r"all 3 labelled cases of Tiny \(not the data the run trained on: its "
                                             r"case case_00[345] is not among them\)", ev["scored"]), ev["scored"]


def _renumbered(root, out):
    """A copy of a dataset whose classes a and b swap values, in dataset.json and in every label file."""
    shutil.copytree(root, out)
    meta = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background", "1": "b", "2": "a"}}))
    for f in (out / "labelsTr").iterdir():
        img = nib.load(f)
        label = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.choose(label, [0, 2, 1]).astype(label.dtype), img.affine), f)
    return out


def test_evaluate_reads_renumbered_labels_by_name(run, tmp_path, capsys):
    run_dir, root, _ = run
    ev = json.loads(cli(capsys, "evaluate", "--run", run_dir, "--data", root)[1])
    rc, out, err = cli(capsys, "evaluate", "--run", run_dir, "--data", _renumbered(root, tmp_path / "swapped"))
    assert rc == 0, err
    ev2 = json.loads(out)
    assert ev2["case_ids"] == ev["case_ids"] and ev2["dice_per_case"] == ev["dice_per_case"]  # classes by name
    assert ev2["scored"] == f"{ev['scored']}; Tiny's labels renumbered to the run's by name (b 1 -> 2, a 2 -> 1)"


def test_evaluate_on_data_prepared_otherwise_scores_as_predict_segments(run, tmp_path, capsys):
    """Data at another spacing than the run's: its cache is not what the network saw in training, so each case is
    segmented as predict does (resampled to the run's spacing) and scored on its own grid."""
    run_dir, root, _ = run
    coarse = tmp_path / "coarse"
    meta = json.loads((root / "dataset.json").read_text())
    for entry in meta["training"]:
        for key in ("image", "label"):
            img = nib.load(root / entry[key])
            scaled = img.affine.copy()
            scaled[:3, :3] *= 2.0  # 2 mm voxels: the run trained on 1 mm
            (coarse / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), scaled), coarse / entry[key])
    (coarse / "dataset.json").write_text(json.dumps({**meta, "name": "Tiny2mm"}))
    rc, out, err = cli(capsys, "evaluate", "--run", run_dir, "--data", coarse)
    assert rc == 0, err
    ev = json.loads(out)
    assert ev["cases"] == 6 and "segmented as predict does (resampled to the run's spacing 1x1x1 mm" in ev["scored"]
    assert cli(capsys, "predict", "--run", run_dir, "--input", coarse / "imagesTr", "--out", tmp_path / "p",
               "--quiet")[0] == 0
    scores = [dice_scores(torch.from_numpy(np.asanyarray(nib.load(tmp_path / "p" / f"case_{i:03d}.nii.gz").dataobj)
                                           .astype(np.int64)),
                          torch.from_numpy(np.asanyarray(nib.load(coarse / "labelsTr" / f"case_{i:03d}.nii.gz").dataobj)
                                           .astype(np.int64)), 3) for i in range(6)]
    per_class = np.nanmean(np.array(scores), axis=0)
    assert ev["dice_per_class"] == pytest.approx(dict(zip(["a", "b"], per_class.tolist())), abs=6e-5)  # 4 places
    # the same classes numbered otherwise (a and b swapped in dataset.json and in the label files): read by name
    ev2 = json.loads(cli(capsys, "evaluate", "--run", run_dir, "--data", _renumbered(coarse, tmp_path / "swapped"))[1])
    assert ev2["dice_per_class"] == pytest.approx(ev["dice_per_class"], abs=1e-6)
    assert ev2["scored"].endswith("; Tiny2mm's labels renumbered to the run's by name (b 1 -> 2, a 2 -> 1)")
    other = tmp_path / "other"
    shutil.copytree(root, other)
    (other / "dataset.json").write_text(json.dumps({**meta, "labels": {"0": "background", "1": "a", "2": "c"}}))
    rc, _, err = cli(capsys, "evaluate", "--run", run_dir, "--data", other)
    one_line_error(rc, err, "the run's classes are 0 background, 1 a, 2 b, but Tiny's are 0 background, 1 a, 2 c; "
                            "evaluate on data whose labels have the run's names")
    rc, _, err = cli(capsys, "evaluate", "--run", tmp_path / "nowhere", "--data", root, "--cache-dir", tmp_path / "c")
    one_line_error(rc, err, "does not exist; give --run a run folder")
    assert not (tmp_path / "c").exists()  # the run is checked before the data are prepared


def test_evaluate_scores_a_case_that_preparation_resampled_against_its_own_label_file(run, tmp_path, capsys):
    """A case at another spacing than the run's: preparation resampled it (and its label) to the median spacing,
    but its Dice is that of predict's output against its label file, on the file's own grid."""
    run_dir, root, _ = run
    mixed = tmp_path / "mixed"
    shutil.copytree(root, mixed)
    for d in ("imagesTr", "labelsTr"):  # case_002 at 1 x 1 x 2.5 mm: the median spacing stays the run's 1 mm
        img = nib.load(mixed / d / "case_002.nii.gz")
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine @ np.diag([1, 1, 2.5, 1])),
                 mixed / d / "case_002.nii.gz")
    rc, out, err = cli(capsys, "evaluate", "--run", run_dir, "--data", mixed, "--cache-dir", tmp_path / "c",
                       "--all-cases")
    assert rc == 0, err
    ev = json.loads(out)
    assert ev["scored"].endswith("scored against its label file: case_002 is at another spacing than the run's"), \
        ev["scored"]
    assert cli(capsys, "predict", "--run", run_dir, "--input", mixed / "imagesTr", "--out", tmp_path / "p",
               "--quiet")[0] == 0
    for case in ("case_001", "case_002"):
        pred, label = (np.asanyarray(nib.load(f / f"{case}.nii.gz").dataobj).astype(np.int64)
                       for f in (tmp_path / "p", mixed / "labelsTr"))
        dice = dice_scores(torch.from_numpy(pred), torch.from_numpy(label), 3).tolist()
        assert list(ev["dice_per_case"][case].values()) == pytest.approx(dice, rel=1e-3, abs=1e-4), case


def test_a_checkpoint_that_does_not_fit_its_network_or_channels_gives_one_short_line(run, tmp_path, capsys):
    run_dir, root, _ = run
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    image = root / "imagesTr" / "case_000.nii.gz"
    for name, changed, needle in (
        ("classes", {"num_classes": 4}, "incomplete (RuntimeError: Error(s) in loading state_dict for UNet: size "),
        ("schemes", {"preprocessing": {**ck["preprocessing"], "normalisation": []}},
         "incomplete (preprocessing: ValueError: 0 normalisation scheme(s) for 1 channel(s)); retrain the run"),
        ("ct", {"preprocessing": {**ck["preprocessing"], "normalisation": [{"type": "ct", "lower": 0.0}]}},
         "a ct scheme needs finite lower, upper, mean and sd"),
    ):
        (tmp_path / name).mkdir()
        torch.save({**ck, **changed}, tmp_path / name / "checkpoint.pt")
        rc, _, err = cli(capsys, "predict", "--run", tmp_path / name, "--input", image, "--out", tmp_path / "out")
        one_line_error(rc, err, needle)
        assert len(err) < 400 and not (tmp_path / "out").exists()
    rc, _, err = cli(capsys, "evaluate", "--run", tmp_path / "schemes", "--data", root)
    one_line_error(rc, err, "0 normalisation scheme(s) for 1 channel(s)")
