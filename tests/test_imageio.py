"""Readers and writers: NIfTI, .nrrd and .mha give one array and one RAS+ affine for the same image."""

import gzip
import io
import itertools
import json
import os
import re
import threading
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blob_case

from pgps_tune import data, imageio
from pgps_tune.errors import PgpsError

SPACING = (0.7, 1.3, 2.5)
ORIGIN = (10.0, -20.0, 30.0)
DIRECTION = np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float)  # permuted and flipped, in LPS


def _itk_image(arr):
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION.ravel().tolist())
    return img


@pytest.fixture
def volume():
    return np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)


def test_every_format_gives_the_array_and_affine_itk_means(tmp_path, volume):
    img = _itk_image(volume)
    reads = {}
    for end in (".nii.gz", ".nii", ".mha", ".nrrd"):  # ITK writes all four, NIfTI in RAS by its own rules
        sitk.WriteImage(img, str(tmp_path / f"x{end}"))
        reads[end] = imageio.read(tmp_path / f"x{end}")
        assert imageio.header(tmp_path / f"x{end}")[0] == volume.shape
    for end, (arr, affine) in reads.items():
        assert np.array_equal(arr, volume), end
        for index in [(0, 0, 0), (1, 2, 3), (4, 5, 6)]:
            lps = np.array(img.TransformIndexToPhysicalPoint(index))
            assert np.allclose(affine @ [*index, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4), end
            assert arr[index] == img.GetPixel(index)
        assert np.allclose(affine, reads[".nii.gz"][1], atol=1e-5)
        assert np.allclose(imageio.header(tmp_path / f"x{end}")[1], affine)
    canon = {end: imageio.to_canonical(*r) for end, r in reads.items()}
    for arr, affine in canon.values():
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert np.array_equal(arr, canon[".nii.gz"][0]) and np.allclose(affine, canon[".nii.gz"][1], atol=1e-5)


@pytest.mark.parametrize("end", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_then_read_gives_back_array_and_affine(tmp_path, end):
    label = np.random.default_rng(1).integers(0, 3, (6, 5, 4)).astype(np.uint8)
    affine = np.array([[0, 0, -2.0, 5], [1.5, 0, 0, -3], [0, -0.8, 0, 7], [0, 0, 0, 1]])
    imageio.write(tmp_path / f"seg{end}", label, affine)
    arr, back = imageio.read(tmp_path / f"seg{end}")
    assert arr.dtype == np.uint8 and np.array_equal(arr, label) and np.allclose(back, affine, atol=1e-5)
    channels = np.random.default_rng(2).normal(size=(6, 5, 4, 2)).astype(np.float32)
    imageio.write(tmp_path / f"img{end}", channels, affine)
    assert np.array_equal(imageio.read(tmp_path / f"img{end}")[0], channels)
    assert imageio.header(tmp_path / f"img{end}")[0] == (6, 5, 4, 2)


def test_writing_like_a_nifti_keeps_its_header_but_not_its_scaling(tmp_path):
    source = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    source.header.set_slope_inter(2.0, -1024.0)
    source.header["descrip"] = b"scanner X"
    source.header.set_qform(source.affine, code=1)
    source.header["cal_max"] = 3000
    nib.save(source, tmp_path / "in.nii.gz")
    label = np.zeros((4, 4, 4), np.uint8)
    label[1, 2, 3] = 2
    imageio.write(tmp_path / "out.nii.gz", label, source.affine, like=tmp_path / "in.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(np.asanyarray(out.dataobj), label) and out.get_data_dtype() == np.uint8
    assert out.header["descrip"] == b"scanner X" and int(out.header["qform_code"]) == 1
    assert float(out.header["cal_max"]) == 0


def test_a_nifti_stored_compressed_or_not_against_its_name_reads_by_its_content(tmp_path):
    # ITK (so nnU-Net) reads either; nibabel alone refused an uncompressed file named .nii.gz ("Not a gzipped file")
    stored = np.arange(120, dtype=np.int16).reshape(6, 5, 4)
    source = nib.Nifti1Image(stored, np.diag([2.0, 2.0, 3.0, 1.0]))
    source.header.set_slope_inter(2.0, -1024.0)
    raw = source.to_bytes()
    (tmp_path / "plain.nii.gz").write_bytes(raw)
    (tmp_path / "packed.nii").write_bytes(gzip.compress(raw))
    for name in ("plain.nii.gz", "packed.nii"):
        arr, affine = imageio.read(tmp_path / name)
        assert np.array_equal(arr, stored * 2.0 - 1024) and np.array_equal(affine, source.affine)
        shape, header_affine = imageio.header(tmp_path / name)
        assert shape == (6, 5, 4) and np.array_equal(header_affine, affine)
        imageio.write(tmp_path / f"seg_{name}", np.ones((6, 5, 4), np.uint8), affine, like=tmp_path / name)
        assert np.array_equal(imageio.read(tmp_path / f"seg_{name}")[0], np.ones((6, 5, 4), np.uint8))
    (tmp_path / "cut.nii.gz").write_bytes(raw[:-10])
    with pytest.raises(PgpsError, match=f"cut.nii.gz holds {len(raw) - 10:,} bytes, fewer than the {len(raw):,}"):
        imageio.read(tmp_path / "cut.nii.gz")


def test_from_canonical_undoes_to_canonical_for_all_48_axis_orders():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for perm, signs in itertools.product(itertools.permutations(range(3)), itertools.product((-1, 1), repeat=3)):
        affine = np.eye(4)
        affine[:3, :3] = np.eye(3)[:, perm] * signs * [1.0, 2.0, 3.0]
        canon, canon_affine = imageio.to_canonical(arr, affine)
        assert nib.aff2axcodes(canon_affine) == ("R", "A", "S")
        assert np.array_equal(imageio.from_canonical(canon, affine), arr)
        shape, grid_affine = imageio.canonical_grid((*arr.shape, 2), affine)  # the same from the header alone
        assert shape == canon.shape and np.array_equal(grid_affine, canon_affine)
        # every voxel keeps its world position
        for index in [(0, 0, 0), (1, 2, 3)]:
            world = affine @ [*index, 1]
            cidx = np.round(np.linalg.solve(canon_affine, world)[:3]).astype(int)
            assert canon[tuple(cidx)] == arr[index]


def test_unreadable_and_unknown_files_give_one_line(tmp_path):
    (tmp_path / "broken.mha").write_bytes(b"not an image")
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("hello")
    for name, kind in (("broken.mha", "MetaImage"), ("broken.nii.gz", "NIfTI")):
        for fn in (imageio.read, imageio.header):
            with pytest.raises(PgpsError, match=f"cannot read {kind} file .*{name}") as err:
                fn(tmp_path / name)
            assert "\n" not in str(err.value)
    with pytest.raises(PgpsError, match="not an image file"):
        imageio.read(tmp_path / "notes.txt")
    with pytest.raises(PgpsError, match="does not exist"):
        imageio.read(tmp_path / "absent.nrrd")


_MHA = "ObjectType = Image\nNDims = 3\nDimSize = 3 2 2\nElementType = MET_UCHAR\n{}ElementDataFile = {}\n"


@pytest.mark.parametrize("name,header,body,needle", [
    ("no-type.mha", _MHA.replace("ElementType = MET_UCHAR\n", ""), "LOCAL",
     r"\(ElementType required and not defined\.\)"),
    ("bad-dims.mha", _MHA.replace("3 2 2", "3 x 2"), "LOCAL", r"\(ElementType required and not defined\.\)"),
    ("no-channels.mha", _MHA, "LOCAL", r"\(Unknown PixelType: unsigned_char\(1\)\)"),
    ("bad-sizes.nrrd", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 3 -2 2\nencoding: raw\n\n", "",
     r"\(\[nrrd\] _nrrdSizeCheck: axis 1 size is zero!\)"),
    ("flat.mha", _MHA, "LOCAL", r"has a degenerate voxel grid in its header"),
    ("short.mha", _MHA, "case.raw", r"case.raw \(the data file of .*short.mha\) holds 5 bytes, fewer than the 12 its "
                                    r"header declares"),
    ("header-only.mha", _MHA.rstrip("\n"), "LOCAL", r"holds 0 bytes, fewer than the 12"),
], ids=["no type", "bad sizes", "no channels", "nrrd sizes", "flat direction", "short data file", "header only"])
def test_a_broken_itk_file_gives_one_line_and_no_itk_text(tmp_path, capfd, name, header, body, needle):
    # MetaImage's parser prints its complaint to file descriptor 2 from C++, above an error that says less
    # ("Reason: No such file or directory"): the complaint becomes the reason, and nothing else shows; what
    # ITK would have found reading the voxels is found before
    (tmp_path / "case.raw").write_bytes(bytes(5))
    extra = {"no-channels.mha": "ElementNumberOfChannels = 0\n", "flat.mha": "TransformMatrix = 1 0 0 0 1 0 0 0 0\n"}
    text = header.format(extra.get(name, ""), body) if ".mha" in name else header
    (tmp_path / name).write_bytes(text.encode() + bytes(12) * (body == "LOCAL" and "only" not in name))
    for fn in (imageio.read, imageio.header):
        if fn is imageio.header and name in ("short.mha", "header-only.mha"):
            continue  # what only reading the voxels finds
        with pytest.raises(PgpsError, match=needle) as err:
            fn(tmp_path / name)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)
        assert str(err.value).endswith(("; replace the file or remove it", "or replace the file"))
    out, printed = capfd.readouterr()
    assert printed == "" and out == ""


def _nifti_with_sform(path, array, affine):
    """A NIfTI file whose geometry is ``affine`` as given (nibabel would refuse to build some of them)."""
    img = nib.Nifti1Image(array, None)
    img.header.set_qform(None, code=0)
    img.header["srow_x"], img.header["srow_y"], img.header["srow_z"] = affine[:3]
    img.header["sform_code"] = 1
    nib.save(img, path)


@pytest.mark.parametrize("shape,affine,needle", [
    ((6, 5), np.eye(4), "has 2 dimensions; images must be 3D"),
    ((6, 5, 4, 2, 3), np.eye(4), r"has 5 dimensions \(6x5x4x2x3 voxels\)"),
    ((0, 5, 4), np.eye(4), "holds no voxels"),
    ((6, 5, 4), np.array([[1, 0, 0, np.nan], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "non-finite affine"),
    ((6, 5, 4), np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "degenerate voxel grid"),
], ids=["2D", "5D", "empty", "NaN origin", "two axes alike"])
def test_a_volume_without_a_usable_voxel_grid_gives_one_line(tmp_path, shape, affine, needle):
    path = tmp_path / "odd.nii.gz"
    _nifti_with_sform(path, np.zeros(shape, np.float32), affine)
    with pytest.raises(PgpsError, match=needle) as err:
        imageio.read(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_nifti_vector_image_reads_as_channels_as_itk_reads_it(tmp_path, volume):
    """ITK writes an image of several components per voxel to NIfTI as X x Y x Z x 1 x C (time, then components)."""
    arr = np.stack([volume, 2 * volume], -1)
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0, 3), isVector=True)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION.ravel().tolist())
    for end in (".nii.gz", ".mha"):
        sitk.WriteImage(img, str(tmp_path / f"vector{end}"))
    assert nib.load(tmp_path / "vector.nii.gz").shape == (*volume.shape, 1, 2)
    (a, a_affine), (b, b_affine) = (imageio.read(tmp_path / f"vector{end}") for end in (".nii.gz", ".mha"))
    assert np.array_equal(a, arr) and np.array_equal(b, arr) and np.allclose(a_affine, b_affine)
    shape, affine = imageio.header(tmp_path / "vector.nii.gz")
    assert shape == arr.shape and np.array_equal(affine, a_affine)


def _nnunet(root, end, spacing=(1.0, 1.0, 2.0)):
    """A two-channel nnU-Net raw dataset (CT + MRI) in format ``end``."""
    affine = np.diag([*spacing, 1.0])
    for i in range(3):
        image, label = blob_case((12, 10, 8), i)
        for c, scale in enumerate((400.0, 1.0)):
            imageio.write(root / "imagesTr" / f"tiny_{i:03d}_{c:04d}{end}", (image * scale).astype(np.float32), affine)
        imageio.write(root / "labelsTr" / f"tiny_{i:03d}{end}", label.astype(np.uint8), affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"1": "T2", "0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 3, "file_ending": end}))
    return root


def test_prepare_reads_nnunet_nrrd_and_mha_like_nifti(tmp_path):
    ref = data.prepare(_nnunet(tmp_path / "nii", ".nii.gz"))
    assert data.discover(tmp_path / "nii").modalities == ("CT", "T2")
    assert [s["type"] for s in ref.normalisation] == ["ct", "zscore"]
    for end in (".nrrd", ".mha"):
        ds = data.prepare(_nnunet(tmp_path / end[1:], end))
        assert ds.spacing == ref.spacing == (1.0, 1.0, 2.0) and ds.normalisation == ref.normalisation
        for i in range(len(ds)):
            assert np.array_equal(ds.image(i), ref.image(i)) and np.array_equal(ds.label(i), ref.label(i))


@pytest.mark.parametrize("end", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_a_file_holding_fewer_voxels_than_its_header_declares_is_refused_before_the_reader_allocates_them(
        tmp_path, end):
    # the readers allocate what the header declares first: a 1 KiB file that claims 4 GB held 4 GB, and ITK
    # filled what a compressed .mha lacked with zeros
    volume = np.random.default_rng(0).normal(size=(6, 5, 200)).astype(np.float32)
    whole = imageio.write(tmp_path / f"x{end}", volume, np.eye(4)).read_bytes()
    if end in (".mha", ".nrrd"):
        grown = whole.replace(b"DimSize = 6 5 200", b"DimSize = 6 5 400").replace(b"sizes: 6 5 200", b"sizes: 6 5 400")
    else:
        raw = gzip.decompress(whole) if end == ".nii.gz" else whole
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
        hdr.set_data_shape((6, 5, 400))
        grown = hdr.binaryblock + raw[348:]
        grown = gzip.compress(grown) if end == ".nii.gz" else grown
        raw = gzip.compress(raw[:100]) + gzip.compress(raw[100:])  # two gzip members (bgzip), as valid as one
        (tmp_path / f"members{end}").write_bytes(raw if end == ".nii.gz" else whole)
        assert np.array_equal(imageio.read(tmp_path / f"members{end}")[0], volume)
    for name, content in (("cut", whole[:-40]), ("grown", grown)):
        (tmp_path / f"{name}{end}").write_bytes(content)
        with pytest.raises(PgpsError, match="bytes, fewer than the .* its header declares: the file is cut short"):
            imageio.read(tmp_path / f"{name}{end}")


@pytest.mark.parametrize("end", [".nii.gz", ".mha", ".nrrd"])
def test_a_header_declaring_more_voxels_than_memory_holds_is_refused_before_decoding(tmp_path, end, monkeypatch):
    # a crafted .nii.gz of zeros is a few MiB that inflate to tens of GiB; here the memory shrinks instead
    path = tmp_path / f"x{end}"
    imageio.write(path, np.zeros((6, 5, 4), np.int16), np.eye(4))
    decoded = 6 * 5 * 4 * 2
    monkeypatch.setattr(imageio, "available_memory", lambda: decoded - 1)
    with pytest.raises(PgpsError, match=r"declares 6x5x4(x1)? voxels in its header, 0.0 GiB decoded, more than "
                                        r"the 0.0 GiB of memory available; check the file") as err:
        imageio.read(path)
    assert "\n" not in str(err.value)
    for free in (decoded, None):  # enough memory, or none known: read as before
        monkeypatch.setattr(imageio, "available_memory", lambda free=free: free)
        assert imageio.read(path)[0].shape == (6, 5, 4)


def test_available_memory_and_the_limit_take_the_tightest_cgroup_of_either_version(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 100000 kB\nMemAvailable:   50000 kB\n")

    def files(folder, **values):
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            (folder / name.replace("_", ".", 1)).write_text(f"{value}\n")

    kib = 1024
    assert imageio.available_memory(proc, cg) == 50000 * kib  # no cgroup files: MemAvailable alone
    assert imageio.memory_limit(proc, cg) == 100000 * kib  # and MemTotal
    # v1 (this machine's kind): a job's memory cgroup, limited by its parent's limit; the root unlimited
    (proc / "self" / "cgroup").write_text("4:memory:/jobs/job7\n3:cpuset:/\n0::/\n")
    files(cg / "memory", memory_limit_in_bytes=9223372036854771712, memory_usage_in_bytes=10**9)
    files(cg / "memory" / "jobs", memory_limit_in_bytes=30000 * kib, memory_usage_in_bytes=20000 * kib)
    files(cg / "memory" / "jobs" / "job7", memory_limit_in_bytes=9223372036854771712, memory_usage_in_bytes=5)
    assert imageio.available_memory(proc, cg) == 10000 * kib  # the parent's headroom, not the unlimited leaves
    assert imageio.memory_limit(proc, cg) == 30000 * kib
    # v2: the process's own cgroup, below a parent without a limit
    (proc / "self" / "cgroup").write_text("0::/user.slice/run-1.scope\n")
    files(cg / "user.slice", memory_max="max", memory_current=123)
    files(cg / "user.slice" / "run-1.scope", memory_max=8000 * kib, memory_current=1000 * kib)
    assert imageio.available_memory(proc, cg) == 7000 * kib
    assert imageio.memory_limit(proc, cg) == 8000 * kib
    # a namespaced container sees itself at the root
    (proc / "self" / "cgroup").write_text("0::/\n")
    files(cg, memory_max=60000 * kib, memory_current=40000 * kib)
    assert imageio.available_memory(proc, cg) == 20000 * kib
    assert imageio.memory_limit(proc, cg) == 60000 * kib
    (proc / "meminfo").write_text("garbage\n")
    (cg / "memory.max").write_text("not a number\n")
    assert imageio.available_memory(proc, cg) is None and imageio.memory_limit(proc, cg) is None  # no guess
    assert imageio.available_memory() is None or imageio.available_memory() > 0  # this machine's own


def test_an_nrrd_or_mha_reads_its_voxels_only_from_a_file_beside_it(tmp_path):
    # ITK reads whatever file a header names: a dataset someone sent could point it at a private file, at
    # /dev/stdin or a FIFO (a hang), or at several files; only one regular file beside the header is read
    images = tmp_path / "imagesTr"
    images.mkdir()
    (tmp_path / "private.raw").write_bytes(b"secret" * 200)
    (images / "case.raw").write_bytes(bytes(range(60)) * 4)
    os.mkfifo(images / "fifo.raw")  # nothing ever writes to it
    nrrd = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 6 5 8\nencoding: raw\ndata file: {}\n\n"
    mha = "ObjectType = Image\nNDims = 3\nDimSize = 6 5 8\nElementType = MET_UCHAR\nElementDataFile = {}\n"
    for header in (nrrd, mha):
        f = images / ("a.nrrd" if header is nrrd else "a.mha")
        f.write_text(header.format("case.raw"))  # a detached data file beside its header is read
        assert imageio.read(f)[0].shape == (6, 5, 8) and imageio.header(f)[0] == (6, 5, 8)
        for name, needle in [("../private.raw", "outside the image's own folder"),
                             (str(tmp_path / "private.raw"), "outside the image's own folder"),
                             ("/dev/stdin", "outside the image's own folder"),
                             ("fifo.raw", "not a regular file"), ("LIST", "several files"),
                             ("case%03d.raw 1 8 1", "several files")]:
            f.write_text(header.format(name))
            for read in (imageio.read, imageio.header):
                with pytest.raises(PgpsError, match=needle) as err:
                    read(f)
                assert "\n" not in str(err.value) and "secret" not in str(err.value)


def test_nifti_header_extensions_nibabel_would_read_whole_are_refused_before_it_reads_them(tmp_path):
    # an extension may claim 2 GiB, which nibabel reads in one piece (a 1 MiB .nii.gz of zeros took 1.1 GB), and
    # a size under 8 or a vox_offset of 0 sends it reading the rest of the file: the extensions are walked and
    # summed first, a few bytes at a time; a small extension, NIfTI-1 or -2, .nii or .nii.gz, still reads
    import gzip

    def nifti(name, version=1, extensions=(), vox_offset=None, extender=None):
        img = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                                                                   np.eye(4))
        raw = img.to_bytes()
        size = 348 if version == 1 else 540
        head = bytearray(raw[:size])
        exts = b"".join(np.int32([esize, 6]).tobytes() + bytes(max(0, min(esize, 64) - 8)) for esize in extensions)
        offset = size + 4 + len(exts) if vox_offset is None else vox_offset
        if version == 1:
            head[108:112] = np.float32(offset).tobytes()
        else:
            head[168:176] = np.int64(offset).tobytes()
        flag = extender if extender is not None else b"\1\0\0\0" if extensions else b"\0\0\0\0"
        payload = bytes(head) + flag + exts + raw[size + 4:]
        path = tmp_path / name
        path.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
        return path

    for version, end in itertools.product((1, 2), (".nii", ".nii.gz")):
        ok = nifti(f"ok{version}{end}", version, [32, 64])  # a small extension (a comment) reads as before
        assert imageio.read(ok)[0].shape == (2, 3, 4) and imageio.header(ok)[0] == (2, 3, 4)
        cases = [(nifti(f"big{version}{end}", version, [1 << 30]), "at least 1,024 MiB of NIfTI header extensions"),
                 (nifti(f"far{version}{end}", version, vox_offset=1 << 30), "starts its voxels 1,024 MiB into"),
                 (nifti(f"zero{version}{end}", version, [0], vox_offset=0), "extension of 0 bytes"),
                 (nifti(f"many{version}{end}", version, [16] * 10_001), "more than 10,000 NIfTI header extensions")]
        for path, needle in cases:
            for fn in (imageio.read, imageio.header,
                       lambda p: imageio.write(tmp_path / "out.nii.gz", np.zeros((2, 3, 4), np.uint8), np.eye(4), p)):
                with pytest.raises(PgpsError, match=needle) as err:
                    fn(path)
                assert "\n" not in str(err.value) and "replace the file or remove it" in str(err.value)
            assert not (tmp_path / "out.nii.gz").exists()


def test_a_compressed_mha_is_inflated_once_and_reads_as_itk_reads_it(tmp_path, monkeypatch):
    # its zlib stream does not say its length, so the stored-bytes check inflates it: the voxels come from that
    # inflate (ITK is asked only for the header), the same values, types, channels and byte order as ITK's
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (3, 4, 5)).astype(np.uint8), rng.normal(size=(3, 4, 5, 2)).astype(np.float64),
              rng.integers(-900, 900, (3, 4, 5)).astype(np.int16)]
    files = []
    for i, arr in enumerate(arrays):
        files.append(tmp_path / f"x{i}.mha")
        sitk.WriteImage(sitk.GetImageFromArray(arr.transpose(2, 1, 0, *range(3, arr.ndim)), isVector=arr.ndim == 4),
                        str(files[-1]), useCompression=True)
    raw = zlib.compress(arrays[2].astype(">i2").transpose(2, 1, 0).tobytes())  # big-endian, as older scanners wrote
    files.append(tmp_path / "msb.mha")
    files[-1].write_bytes(b"ObjectType = Image\nNDims = 3\nBinaryDataByteOrderMSB = True\nCompressedData = True\n"
                          b"DimSize = 3 4 5\nElementType = MET_SHORT\nElementDataFile = LOCAL\n" + raw)
    calls = []
    itk_call = imageio._itk_call
    monkeypatch.setattr(imageio, "_itk_call", lambda path, call: calls.append(call.__name__) or itk_call(path, call))
    for arr, path in zip([*arrays, arrays[2]], files):
        got = imageio.read(path)[0]
        assert got.dtype == arr.dtype.newbyteorder("=") and got.flags.c_contiguous and np.array_equal(got, arr)
    assert set(calls) == {"ReadImageInformation"}
    calls.clear()
    (tmp_path / "x.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 3 4 5\nendian: little\n"
                                      b"encoding: gzip\n\n" + gzip.compress(arrays[2].transpose(2, 1, 0).tobytes()))
    assert np.array_equal(imageio.read(tmp_path / "x.nrrd")[0], arrays[2])  # a gzip stream says its length: ITK's
    assert calls == ["ReadImageInformation", "Execute"]


def test_a_detached_data_file_is_checked_like_voxels_in_the_header_file(tmp_path):
    # ITK read a compressed data file that held a third of its voxels without a word, the rest as zeros
    voxels = bytes(range(60))
    (tmp_path / "short.raw.gz").write_bytes(gzip.compress(voxels[:20]))
    (tmp_path / "case.raw.gz").write_bytes(gzip.compress(voxels))
    (tmp_path / "case.raw").write_bytes(voxels)
    mha = "ObjectType = Image\nNDims = 3\nDimSize = 5 4 3\nElementType = MET_UCHAR\n{}ElementDataFile = {}\n"
    nrrd = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 5 4 3\nencoding: {}\ndata file: {}\n\n"
    for header, gz in ((mha, "CompressedData = True\n"), (nrrd, "gzip")):
        f = tmp_path / ("x.mha" if header is mha else "x.nrrd")
        f.write_text(header.format(gz, "case.raw.gz"))
        assert imageio.read(f)[0].tobytes(order="F") == voxels
        f.write_text(header.format(gz, "short.raw.gz"))
        with pytest.raises(PgpsError, match=r"short.raw.gz \(the data file of .*x\.(mha|nrrd)\) inflates to 20 bytes, "
                                            "fewer than the 60 its header declares"):
            imageio.read(f)
    f = tmp_path / "x.mha"
    f.write_text(mha.format("HeaderSize = 50\n", "case.raw"))  # voxels from byte 50 of their file: 10 there
    with pytest.raises(PgpsError, match=r"case.raw \(the data file of .*x.mha\) holds 10 bytes, fewer than the 60"):
        imageio.read(f)


def test_reads_on_two_threads_count_each_others_decodes_against_the_memory(tmp_path, monkeypatch):
    # preparation reads two cases at once: each fits the memory alone, not both; the second waits for the first
    # to be decoded, then looks again at what is left (here the first's voxels are held, or were let go)
    free, seen, done = {"bytes": 100}, threading.Event(), []

    def memory():
        if threading.current_thread().name == "second":
            seen.set()
        return free["bytes"]

    def second():
        try:
            with imageio._decoding_memory(tmp_path / "b.nii", (6, 10), 1):
                done.append("b decoded")
        except PgpsError as exc:
            done.append(str(exc))

    monkeypatch.setattr(imageio, "available_memory", memory)
    for left in (100, 40):
        done.clear()
        seen.clear()
        with imageio._decoding_memory(tmp_path / "a.nii", (6, 10), 1):
            other = threading.Thread(target=second, name="second")
            other.start()
            assert seen.wait(60)  # it has looked at the memory: 60 + 60 bytes, more than the 100 there are
            done.append("a decoded")
            free["bytes"] = left
        other.join(60)
        free["bytes"] = 100
        assert done[0] == "a decoded" and len(done) == 2
        assert done[1] == "b decoded" if left == 100 else re.match(
            r".*b.nii declares 6x10 voxels in its header, 0.0 GiB decoded, more than the 0.0 GiB of memory", done[1])
    with imageio._decoding_memory(tmp_path / "a.nii", (6, 10), 1):  # too large alone: refused at once
        with pytest.raises(PgpsError, match="declares 11x10 voxels"):
            with imageio._decoding_memory(tmp_path / "b.nii", (11, 10), 1):
                pass


def test_itk_reads_on_two_threads_share_the_caught_standard_error(tmp_path, capfd):
    # fd 2 is the process's: a read that fails while another thread's read goes on still gets its own reason,
    # and what no failure claimed (a warning of a read that worked) is shown once the last read ends
    (tmp_path / "x.mha").write_text(_MHA.replace("ElementType = MET_UCHAR\n", "").format("", "LOCAL"))
    failed = []

    def broken():
        with pytest.raises(PgpsError, match=r"x.mha \(ElementType required and not defined\.\)") as err:
            imageio.read(tmp_path / "x.mha")
        failed.append(str(err.value))

    with imageio._stderr_caught():  # another read under way
        other = threading.Thread(target=broken)
        other.start()
        other.join(60)
        os.write(2, b"a warning of ITK's\n")
        assert capfd.readouterr().err == ""
    assert len(failed) == 1 and capfd.readouterr().err == "a warning of ITK's\n"
