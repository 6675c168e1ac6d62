"""Volumes on disk and their voxel grids: NIfTI, plus nnU-Net's raw formats ``.nrrd`` and ``.mha``.

One convention for every format, nibabel's: an array indexed ``[x, y, z]`` (channels last
for 4D files) in the file's own axis order, and a 4x4 affine from voxel index to world
millimetres in RAS+ (x to the Right, y to the Anterior, z to the Superior).  NIfTI goes
through nibabel.  ``.nrrd`` and ``.mha`` go through SimpleITK, which keeps its arrays
``[z, y, x]`` and its geometry in LPS+ (origin, direction cosines, spacing); the affine is
``diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]``, which is also how ITK itself
writes NIfTI.

Training data and new images then go to the closest canonical (RAS+) axis order
(:func:`to_canonical`) and a prediction comes back with :func:`from_canonical`, so a
segmentation written with the input's affine overlays the input in any viewer.
"""

from __future__ import annotations

import gzip
import os
import re
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pgps_tune.errors import PgpsError, atomic_write

NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".mha")
ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_RAS = np.array([[0, 1], [1, 1], [2, 1]])  # nibabel's orientation of canonical axes


def ending(path: str | Path) -> str:
    """The image ending of ``path`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``; any case), or ``""``."""
    name = Path(path).name.lower()
    return next((e for e in ENDINGS if name.endswith(e)), "")


def _known(path: Path) -> str:
    end = ending(path)
    if not end:
        raise PgpsError(f"{path} is not an image file this tool reads; give {', '.join(ENDINGS)} files")
    return end


def _sitk():
    import SimpleITK as sitk

    return sitk


def _itk_affine(direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    n = round(len(direction) ** 0.5)
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ d @ np.diag(np.asarray(spacing, dtype=np.float64)[:3])
    affine[:3, 3] = _LPS @ np.asarray(origin, dtype=np.float64)[:3]
    return affine


def _cannot(path: Path, exc: Exception, printed: str = "") -> PgpsError:
    kind = {".nrrd": "NRRD", ".mha": "MetaImage"}.get(ending(path), "NIfTI")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # nibabel's lines read in turn; ITK's need picking out (:func:`_itk_reason`)
    reason = (_itk_reason(lines, printed) if kind != "NIfTI" else " ".join(lines))[:200] if lines \
        else type(exc).__name__
    return PgpsError(f"cannot read {kind} file {path} ({reason}); replace the file or remove it")


def _itk_reason(lines: list[str], printed: str) -> str:
    """What went wrong, in one line, from the lines of an ITK exception and what ITK printed meanwhile.

    MetaImage's parser prints the cause ("DimSize required and not defined.", with indented details)
    and then raises what is left of it ("Reason: No such file or directory"); NRRD's reader raises its
    callers' lines first and the cause last ("[nrrd] _nrrdSizeCheck: axis 1 size is zero!"); ITK's own
    errors follow the source file that raised them, on the line of ``ERROR:``, and may go on over more
    lines (a direction matrix)."""
    first, *more = printed.strip().splitlines() or [""]
    if first.strip():
        return " ".join([first.strip(), *(m.strip() for m in more if m[:1].isspace())])
    if nrrd := [line for line in lines if line.startswith("[nrrd]")]:
        return nrrd[-1]
    for i, line in enumerate(lines):
        if "ERROR:" in line:
            text = " ".join([line.split("ERROR:", 1)[1], *lines[i + 1:]])
            return re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text).strip()  # "MetaImageIO(0x55d6...): "
    return lines[-1]


def _itk_call(path: Path, call: Callable[[], Any]) -> Any:
    """``call()``, a SimpleITK read of ``path``, with what ITK prints to standard error caught
    (:func:`_stderr_caught`), and its failure refused in one line (:func:`_cannot`) whose reason that text
    gives where there is some.

    Parts of ITK, MetaImage's parser above all, print from C++ straight to file descriptor 2 (which
    SimpleITK's warning switch does not reach), several lines before an error that says less: a broken file
    would show them above the one-line error."""
    with _stderr_caught() as printed:
        try:
            return call()
        except Exception as exc:  # ITK raises RuntimeError; anything else is named the same way
            raise _cannot(path, exc, printed()) from None


_STDERR = threading.Lock()
_stderr: dict[str, Any] = {"users": 0}  # the blocks under way, the file fd 2 writes to, fd 2's own copy, and
# how far that file is claimed


@contextmanager
def _stderr_caught() -> Iterator[Callable[[], str]]:
    """File descriptor 2 writes to a file while the block runs, and goes back once the last of the blocks under
    way on any thread ends (fd 2 is the process's: ITK reads on two threads share one file and still run at
    once, SimpleITK letting go of the GIL); what no block claimed is then shown on standard error after all
    (an ITK warning on a read that worked, another thread's words).  Yields a function that gives what was
    printed since the block began and claims it, for a failure's reason."""
    with _STDERR:
        if not _stderr["users"]:
            _flush_stderr()
            file = tempfile.TemporaryFile()
            try:
                saved: int | None = os.dup(2)
            except OSError:  # no standard error (closed): nothing ITK prints shows anyway
                saved = None
            else:
                os.dup2(file.fileno(), 2)
            _stderr.update(file=file, saved=saved, claimed=0)
        _stderr["users"] += 1
        fd = _stderr["file"].fileno()
        start = os.fstat(fd).st_size

    def printed() -> str:
        _flush_stderr()
        with _STDERR:
            end = os.fstat(fd).st_size
            _stderr["claimed"] = max(_stderr["claimed"], end)
        return os.pread(fd, end - start, start).decode("utf-8", errors="replace")

    try:
        yield printed
    finally:
        with _STDERR:
            _stderr["users"] -= 1
            if not _stderr["users"]:
                _flush_stderr()
                if _stderr["saved"] is not None:
                    os.dup2(_stderr["saved"], 2)
                    os.close(_stderr["saved"])
                left = os.pread(fd, os.fstat(fd).st_size - _stderr["claimed"], _stderr["claimed"])
                _stderr["file"].close()
                if left and sys.stderr is not None:
                    sys.stderr.write(left.decode("utf-8", errors="replace"))
                    sys.stderr.flush()


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def _existing(path: str | Path) -> tuple[Path, str]:
    """``path`` as a Path and its known ending, refusing a file that is not there."""
    path = Path(path)
    end = _known(path)
    if not path.is_file():
        raise PgpsError(f"image {path} does not exist; check the path")
    return path, end


def header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (``[X, Y, Z]`` or ``[X, Y, Z, C]``) and affine of an image file, without reading its voxels; refused
    in one line as :func:`read` refuses it."""
    path, end = _existing(path)
    try:
        if end in NIFTI_ENDINGS:
            _check_nifti_extensions(path)  # before nibabel reads them
            with _nifti(path) as img:
                _check_dtype(path, img.header.get_data_dtype())
                shape, affine = _channels_last(path, img.shape), np.asarray(img.affine, dtype=np.float64)
        else:
            _check_data_file(path)  # before ITK opens what the header names
            reader = _sitk().ImageFileReader()
            reader.SetFileName(str(path))
            _itk_call(path, reader.ReadImageInformation)
            _check_itk(path, reader)
            comps = reader.GetNumberOfComponents()
            shape = _channels_last(path, (*reader.GetSize(), *((comps,) if comps > 1 else ())))
            affine = _itk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    except PgpsError:
        raise
    except Exception as exc:  # the readers raise many types for broken files
        raise _cannot(path, exc) from None
    _check_volume(path, shape, affine)
    return shape, affine


def available_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory this process could still take: the kernel's MemAvailable, capped by the
    headroom (limit less usage) of every memory cgroup it sits in, its own and their parents
    (cgroup v2's ``memory.max``, v1's ``memory.limit_in_bytes``: a container's or a batch job's
    limit); None where none of them can be read."""
    found = _meminfo(proc, "MemAvailable") + [limit - usage for limit, usage in _cgroup_limits(proc, cgroups)]
    return min(found) if found else None


def require_memory(need: int, what: str, doing: str, fix: str) -> None:
    """Refuse in one line work that needs ``need`` bytes when less memory is available: ``"{what}, about N GiB
    of memory {doing}, more than the M GiB available; {fix}"`` (nothing is refused where memory cannot be read)."""
    free = available_memory()
    if free is not None and need > free:
        raise PgpsError(f"{what}, about {need / 2**30:.1f} GiB of memory {doing}, more than the "
                        f"{max(free, 0) / 2**30:.1f} GiB available; {fix}")


def spacing_text(spacing: Sequence[float]) -> str:
    """``1x1x2.5 mm``."""
    return "x".join(f"{float(v):.3g}" for v in spacing) + " mm"


def memory_limit(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory this process may hold at most, used or not: the machine's MemTotal, capped by the
    limit of every memory cgroup it sits in (as :func:`available_memory`); None where none can be read."""
    found = _meminfo(proc, "MemTotal") + [limit for limit, _ in _cgroup_limits(proc, cgroups)]
    return min(found) if found else None


def _meminfo(proc: Path, field: str) -> list[int]:
    """``[bytes]`` of one field of ``/proc/meminfo``, or ``[]`` where it cannot be read."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return [int(line.split()[1]) * 1024]
    except (OSError, ValueError, IndexError):
        pass
    return []


def _cgroup_limits(proc: Path, cgroups: Path) -> list[tuple[int, int]]:
    """(limit, usage) in bytes of each of this process's memory cgroups that sets a limit."""
    found = []
    for folder, limit_file, usage_file in _memory_cgroups(proc, cgroups):
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a number near 2**63
                found.append((int(limit), int((folder / usage_file).read_text().strip())))
        except (OSError, ValueError):
            continue
    return found


def _memory_cgroups(proc: Path, cgroups: Path) -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of this process's memory cgroups and their parents, from
    ``/proc/self/cgroup``: the unified hierarchy (``0::PATH``, v2) and v1's ``memory`` controller.
    The mount's root is always among them (a cgroup namespace shows the process at ``/``)."""
    v2, v1 = ("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
    places: dict[Path, tuple[str, str]] = {cgroups: v2, cgroups / "memory": v1}
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            root, files = cgroups, v2
        elif "memory" in parts[1].split(","):
            root, files = cgroups / "memory", v1
        else:
            continue
        folder = root.joinpath(*[p for p in parts[2].strip().split("/") if p not in ("", ".", "..")])
        while folder != root:
            places[folder] = files
            folder = folder.parent
    return [(folder, *files) for folder, files in places.items()]


_DECODES = threading.Condition()
_decoding = 0  # bytes declared by the files being decoded now, which the memory available does not show yet


@contextmanager
def _decoding_memory(path: Path, shape: Sequence[int], itemsize: int) -> Iterator[None]:
    """Decode a file's voxels inside the block, refused first where its header declares more voxels than
    memory holds.

    A compressed file is small on disk whatever its header says: a damaged header, or a crafted
    ``.nii.gz`` of zeros (a few MiB that inflate to tens of GiB), would otherwise fill the memory
    and get the process killed without a word.  Files read on several threads at once (preparation reads
    two cases at a time) count each other's declared bytes until they are decoded, when the memory
    available shows them: a read that fits alone but not beside the decodes under way waits for them
    and then looks again, so two large files together never take more than the memory there is."""
    global _decoding
    need = int(np.prod([int(n) for n in shape], dtype=object)) * itemsize
    with _DECODES:
        while (free := available_memory()) is not None and need + _decoding > free:
            if need > free or not _decoding:
                raise PgpsError(
                    f"{path} declares {'x'.join(str(int(n)) for n in shape)} voxels in its header, "
                    f"{need / 2**30:.1f} GiB decoded, more than the {max(free, 0) / 2**30:.1f} GiB of memory "
                    "available; check the file (a damaged header, or not an image of this dataset) or run where "
                    "more memory is free"
                )
            _DECODES.wait()  # until a decode under way ends
        _decoding += need
    try:
        yield
    finally:
        with _DECODES:
            _decoding -= need
            _DECODES.notify_all()


def read(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of an image file, ``[X, Y, Z]`` or ``[X, Y, Z, C]``, and its RAS+ affine (see module doc).

    Refused in one line: a file that is not a 3D volume (2D, 5D), has an empty axis, or whose header
    gives no usable voxel grid (a non-finite affine, a zero voxel size): what would otherwise fail
    deep inside reorientation or resampling; and a file whose header declares more voxels than
    the memory available holds (:func:`_decoding_memory`), before they are decoded.
    """
    path, end = _existing(path)
    try:
        if end in NIFTI_ENDINGS:
            _check_nifti_extensions(path)  # before nibabel reads them
            with _nifti(path) as img:
                _check_dtype(path, img.header.get_data_dtype())
                stored = img.header.get_data_dtype().itemsize
                scaled = img.dataobj.slope != 1 or img.dataobj.inter != 0  # then nibabel gives float64 voxels
                with _decoding_memory(path, img.shape, 8 if scaled else stored):
                    _check_stored(path, path, 0, img.dataobj.offset + int(np.prod(img.shape, dtype=object)) * stored,
                                  compressed=_gzipped(path))
                    arr, affine = np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        else:
            arr, affine = _itk_read(path)
    except PgpsError:
        raise
    except Exception as exc:  # the readers raise many types for broken files
        raise _cannot(path, exc) from None
    arr = arr.reshape(_channels_last(path, arr.shape))
    _check_volume(path, arr.shape, affine)
    return arr, affine


def _itk_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read` of an ``.nrrd`` or ``.mha`` file: its voxels ``[X, Y, Z(, C)]`` and affine.

    The voxels a header declares are counted before any is decoded (:func:`_check_stored`).  A compressed
    MetaImage's zlib stream, unlike a gzip one, does not say its length: it is inflated to count it, and the
    voxels are then taken from that inflate rather than inflated again by ITK (a 256^3 int16 ``.mha`` took
    0.12 s more)."""
    _check_data_file(path)  # before ITK opens what the header names
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _itk_call(path, reader.ReadImageInformation)
    _check_itk(path, reader)
    size, comps = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    affine = _itk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
    _check_volume(path, _channels_last(path, (*size, *((comps,) if comps > 1 else ()))), affine)
    # the dtype of ITK's pixel type, from an image of one voxel ("vector of 64-bit float": float64)
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID(), comps)).dtype
    shape = (*size, comps)
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    with _decoding_memory(path, shape, dtype.itemsize):
        kept = None
        if (voxels := _itk_voxels(path)) is not None:
            data, start, compressed, msb = voxels
            kept = _check_stored(path, data, start, need, compressed, keep=compressed and ending(path) == ".mha")
        if kept is not None:
            arr = np.frombuffer(kept, dtype.newbyteorder(">" if msb else "<"), count=need // dtype.itemsize)
            arr = arr.reshape(*reversed(size), *((comps,) if comps > 1 else ()))
        else:
            img = _itk_call(path, reader.Execute)  # held while its view below is copied
            arr = sitk.GetArrayViewFromImage(img)  # ITK's axis order, [z, y, x(, c)]
        order = tuple(reversed(range(len(size)))) + tuple(range(len(size), arr.ndim))
        return np.array(arr.transpose(order), dtype=dtype.newbyteorder("="), order="C"), affine  # a copy, native order


def _channels_last(path: Path, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape this tool reads a file's voxels as: ``[X, Y, Z]``, or ``[X, Y, Z, C]`` with channels last.

    A vector image ``[X, Y, Z, 1, C]`` is ``[X, Y, Z, C]``: NIfTI keeps its fifth axis for the components
    of a voxel and its fourth for time, so ITK (and converters after it) write several channels of one
    time point that way, and ITK reads such a file back as C channels.  More time points, or more
    axes, are not one image; refused in one line that names the shape.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3] + shape[4:]
    if len(shape) > 4:
        raise PgpsError(f"{path} has {len(shape)} dimensions ({'x'.join(map(str, shape))} voxels); images must be 3D "
                        "(or 4D with channels last, or a vector image X x Y x Z x 1 x channels): give one time point "
                        "per file")
    return shape


def _gzipped(path: Path) -> bool:
    """Whether the file ``path`` is gzip-compressed, by its first bytes rather than its name."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


@contextmanager
def _nifti(path: Path) -> Iterator[Any]:
    """nibabel's image of the NIfTI file ``path``, its voxels readable inside the block.

    nibabel goes by the name (``.nii.gz`` compressed, ``.nii`` not) and refuses a file stored the other
    way; ITK, and nnU-Net with it, reads either by its content.  Such files occur (an uncompressed file
    given the dataset's ``.nii.gz`` ending, a copy renamed), so they are read by their content too.
    """
    import nibabel as nib

    gz = _gzipped(path)
    if gz == (ending(path) == ".nii.gz"):
        yield nib.load(str(path))
        return
    with (gzip.open if gz else open)(path, "rb") as fh:
        size = fh.read(4)
        fh.seek(0)
        klass = nib.Nifti2Image if 540 in (int.from_bytes(size, "little"), int.from_bytes(size, "big")) \
            else nib.Nifti1Image
        yield klass.from_file_map({"image": nib.FileHolder(fileobj=fh)})


def _check_stored(path: Path, data: Path, start: int, need: int, compressed: bool, keep: bool = False
                  ) -> bytearray | None:
    """Refuse an image ``path`` whose voxels, in the file ``data`` (``path`` itself or its detached data file) from
    byte ``start`` (stored raw, or as a gzip or zlib stream), are fewer than the ``need`` bytes its header
    declares, before a reader allocates them; with ``keep``, a compressed stream's first ``need`` bytes.

    The readers allocate the whole array first: a file cut short, or a header that claims more voxels than
    the file holds, took as much memory as claimed before nibabel or ITK noticed (a 1 KiB ``.nii.gz`` or
    ``.nii`` that claims 4 GB held 4 GB), and ITK reads a compressed ``.mha`` that holds half its voxels
    without a word, the rest as zeros.  A gzip stream that ends the file says its length (modulo 2**32) in
    its last 4 bytes, which answers for a whole file in one read; any other stream (or one to keep) is
    inflated once, a block at a time, counting bytes and keeping none unless asked.
    """
    where = str(path) if data == path else f"{data} (the data file of {path})"
    size = data.stat().st_size
    if not compressed:
        if size - start < need:
            raise PgpsError(f"{where} holds {max(size - start, 0):,} bytes, fewer than the {need:,} its header "
                            "declares: the file is cut short or its header is wrong; replace the file or remove it")
        return None
    kept = bytearray(need) if keep else None
    with open(data, "rb") as fh:
        fh.seek(start)
        gzip_stream = fh.read(2) == b"\x1f\x8b"
        if gzip_stream and not keep and size * 1100 >= need:  # deflate inflates at most about 1032-fold
            fh.seek(-4, 2)
            if int.from_bytes(fh.read(4), "little") == need % 2**32:
                return None
        fh.seek(start)
        got, todo, inflate = 0, b"", zlib.decompressobj(47)  # 47: a gzip or a zlib header
        while got < need:
            if not todo:
                todo = fh.read(1 << 20)
                if not todo:
                    break
            block = inflate.decompress(todo, min(1 << 24, need - got))
            if kept is not None:
                kept[got:got + len(block)] = block
            got += len(block)
            todo = inflate.unconsumed_tail
            if inflate.eof:  # the end of one gzip member: another may follow
                todo, inflate = inflate.unused_data, zlib.decompressobj(47)
                if not todo and not (todo := fh.read(1 << 20)):
                    break
    if got < need:
        raise PgpsError(f"{where} inflates to {got:,} bytes, fewer than the {need:,} its header declares: the file is "
                        "cut short or its header is wrong; replace the file or remove it")
    return kept


def _itk_voxels(path: Path) -> tuple[Path, int, bool, bool] | None:
    """Where an ``.nrrd`` or ``.mha`` file's voxels are stored: the file (``path`` itself, or the data file beside
    it that its header names), the byte they start at, whether they are compressed (NRRD's ``encoding: gzip``,
    MetaImage's ``CompressedData = True``) and whether a MetaImage stores them big-endian; None after a skip
    this check does not follow (NRRD's ``line skip``, ``byte skip``), in an encoding it does not know (NRRD's
    ``ascii``, ``hex``, ``bzip2``), or after a header it cannot make out."""
    fields, end = _itk_header(path)
    last = {key: value.lower() for key, value in fields}
    name = _itk_data_file(path)
    data = path if name is None else path.parent / name
    if ending(path) == ".nrrd":
        if last.keys() & {b"line skip", b"lineskip", b"byte skip", b"byteskip"}:
            return None
        encoding = last.get(b"encoding", b"raw")
        if encoding not in (b"raw", b"gzip", b"gz") or (name is None and end is None):
            return None
        return data, 0 if name else end, encoding != b"raw", False
    try:  # MetaImage's HeaderSize: where the voxels start in their file, or -1: at its end (as many as it holds)
        skip = int(last.get(b"headersize", b"0"))
    except ValueError:
        return None
    if b"elementdatafile" not in last or (name is None and end is None):
        return None
    start = skip if skip > 0 else 0 if name else end
    msb = b"true" in (last.get(b"binarydatabyteordermsb"), last.get(b"elementbyteordermsb"))
    return data, start, last.get(b"compresseddata") == b"true", msb


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    """Refuse voxels that are not one real number each (NIfTI's RGB triplets, complex values)."""
    if dtype.kind not in "biuf":
        what = "complex" if dtype.kind == "c" else "RGB or other compound" if dtype.kind == "V" else str(dtype)
        raise PgpsError(f"{path} holds {what} voxels ({dtype}); give a scalar image (one real number per voxel, "
                        "several channels as a 4D image or one file per channel)")


# Bytes of NIfTI header extensions (DICOM headers, AFNI and CIFTI XML) a file may carry: real ones take KiB,
# CIFTI's a few MiB; an extension may claim up to 2 GiB, which nibabel reads in one piece (a 1 MiB .nii.gz
# of zeros took 1.1 GB), so they are walked and summed before nibabel opens the file
MAX_NIFTI_EXTENSIONS = 32 << 20
MAX_NIFTI_EXTENSION_COUNT = 10_000  # nibabel keeps an object for each
_NIFTI_HEADERS = {348: 108, 540: 168}  # header size (NIfTI-1, NIfTI-2): where its vox_offset sits


def _check_nifti_extensions(path: Path) -> None:
    """Refuse a NIfTI file (1 or 2, ``.nii`` or ``.nii.gz``) whose header extensions, as nibabel would read them,
    take more than :data:`MAX_NIFTI_EXTENSIONS` bytes, or one whose size leaves nibabel reading the whole file
    (less than the 8 bytes of its own size and code), or whose voxels start further out than such extensions
    reach; read a few bytes at a time (and a ``.nii.gz`` inflated only up to its last extension).  A file this
    check cannot make out is left to nibabel, which names it."""
    with (gzip.open if _gzipped(path) else open)(path, "rb") as fh:
        head = fh.read(544)  # the longer header (NIfTI-2) and the 4 bytes that say whether extensions follow
        for order in "<>":
            size = int(np.frombuffer(head[:4], f"{order}i4")[0]) if len(head) >= 4 else 0
            if size in _NIFTI_HEADERS and len(head) >= size + 4:
                break
        else:
            return
        at = _NIFTI_HEADERS[size]
        vox_offset = float(np.frombuffer(head[at:at + 8], f"{order}i8")[0] if size == 540
                           else np.frombuffer(head[at:at + 4], f"{order}f4")[0])
        too_far = f"more than the {MAX_NIFTI_EXTENSIONS >> 20} MiB of them any scanner or tool writes"
        if vox_offset > size + 4 + MAX_NIFTI_EXTENSIONS:
            raise PgpsError(f"{path} starts its voxels {vox_offset / 2**20:,.0f} MiB into the file (vox_offset), "
                            f"past header extensions {too_far}: a damaged or crafted file; replace the file or "
                            "remove it")
        if head[size:size + 1] == b"\0":
            return  # no extensions (nibabel reads none either)
        fh.seek(size + 4)
        # as nibabel: extensions while 16 bytes are left before the voxels, or to the end where those start within
        # the header (a vox_offset of 0)
        left, total = vox_offset - size - 4, 0
        for count in range(MAX_NIFTI_EXTENSION_COUNT + 1):
            if not (left >= 16 or left < 0):
                return
            record = fh.read(8)
            if len(record) < 8:
                return  # the end, or cut short: nibabel names it
            if count == MAX_NIFTI_EXTENSION_COUNT:
                raise PgpsError(f"{path} carries more than {MAX_NIFTI_EXTENSION_COUNT:,} NIfTI header extensions "
                                "(a few is usual): a damaged or crafted file; replace the file or remove it")
            esize = int(np.frombuffer(record[:4], f"{order}i4")[0])
            if esize < 8:
                raise PgpsError(f"{path} has a NIfTI header extension of {esize} bytes (its size and code alone take "
                                "8): a damaged file; replace the file or remove it")
            total += esize
            if total > MAX_NIFTI_EXTENSIONS:
                raise PgpsError(f"{path} carries at least {total >> 20:,} MiB of NIfTI header extensions, {too_far}: "
                                "a damaged or crafted file; replace the file or remove it")
            fh.seek(esize - 8, 1)  # a .nii.gz inflates what it skips a block at a time
            left -= esize


def _itk_header(path: Path) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """The fields of an ``.nrrd`` or ``.mha`` header in order, as (key lower-cased, value), both stripped
    (NRRD's ``key:=value`` pairs are not fields), and the byte at which the header ends, where voxels kept in
    the file itself follow it: after NRRD's first empty line, after MetaImage's ``ElementDataFile`` (its last
    field, or the end of a file that holds nothing more); None where that end is not in the first 64 KiB."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)  # headers are a few hundred bytes
    nrrd = ending(path) == ".nrrd"
    lines = head.split(b"\n")
    fields: list[tuple[bytes, bytes]] = []
    at = 0
    for i, raw in enumerate(lines):
        complete = i < len(lines) - 1  # ends in a newline: what follows starts at ``at``
        at += len(raw) + 1
        line = raw.rstrip(b"\r")
        if nrrd and not line:
            return fields, at if complete else None
        if nrrd and i == 0:
            continue  # the magic line, "NRRD0004"
        key, sep, value = line.partition(b":" if nrrd else b"=")
        if sep and not value.startswith(b"="):
            fields.append((key.strip().lower(), value.strip()))
            if not nrrd and fields[-1][0] == b"elementdatafile":
                return fields, at if complete else len(head) if len(head) < 1 << 16 else None
    return fields, None


def _itk_data_file(path: Path) -> str | None:
    """The file an ``.nrrd`` (field ``data file``) or ``.mha`` (``ElementDataFile``) header keeps its voxels in,
    as written there; None where they follow the header in the file itself."""
    nrrd = ending(path) == ".nrrd"
    names = (b"data file", b"datafile") if nrrd else (b"elementdatafile",)
    value = next((v for k, v in _itk_header(path)[0] if k in names), None)
    if value is None:
        return None
    name = value.decode("utf-8", errors="replace")
    return None if not nrrd and name.upper() == "LOCAL" else name


def _check_data_file(path: Path) -> None:
    """Refuse an ``.nrrd`` or ``.mha`` file whose header names its voxels' file anywhere but beside it.

    ITK reads whatever file a header names, relative to the header's folder or absolute: a file of a
    dataset someone sent could make it read ``/etc/passwd`` or ``../../private.raw`` as voxels, wait
    forever on a FIFO or ``/dev/stdin``, or read ``/dev/zero`` as a volume of any size.
    """
    name = _itk_data_file(path)
    if name is None:
        return
    if name.upper().startswith("LIST") or "%" in name:
        raise PgpsError(f"{path} keeps its voxels in several files ({name[:80]!r}); give an image whose voxels sit "
                        "in the file itself (or in one data file beside it)")
    real = (path.parent / name).resolve()
    if not real.is_relative_to(path.parent.resolve()):
        raise PgpsError(f"{path} names {name[:120]!r} as the file of its voxels (it leads to {real}), outside the "
                        f"image's own folder {path.parent}; keep an image's data file beside its header")
    if not real.is_file():
        raise PgpsError(f"{path} names {name[:120]!r} as the file of its voxels, which is not a regular file in "
                        f"{path.parent}; put the data file beside its header")


def _check_itk(path: Path, reader: Any) -> None:
    """Refuse, from an ITK header, what the affine and the voxels cannot be made of: fewer than 3 dimensions
    (the direction matrix is then 2x2), complex pixels."""
    if reader.GetDimension() < 3:
        raise PgpsError(f"{path} has {reader.GetDimension()} dimensions; images must be 3D (or 4D with channels last)")
    pixel = _sitk().GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel:
        raise PgpsError(f"{path} holds complex voxels ({pixel}); give a scalar image (one real number per voxel)")


def _check_volume(path: Path, shape: Sequence[int], affine: np.ndarray) -> None:
    if 0 in shape:
        raise PgpsError(f"{path} holds no voxels (shape {list(shape)}); replace the file or remove it")
    if len(shape) not in (3, 4):
        raise PgpsError(f"{path} has {len(shape)} dimension{'s' * (len(shape) != 1)}; images must be 3D "
                        "(or 4D with channels last)")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise PgpsError(f"{path} has a non-finite affine in its header; fix its spacing, direction and origin, "
                        "or replace the file")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(sizes)):  # a zero or repeated axis
        raise PgpsError(f"{path} has a degenerate voxel grid in its header (voxel sizes "
                        f"{[round(float(v), 6) for v in sizes]}, axes not independent); fix its spacing and "
                        "direction, or replace the file")


def write(path: str | Path, array: np.ndarray, affine: np.ndarray, like: str | Path | None = None) -> Path:
    """Write ``array`` (``[X, Y, Z]`` or ``[X, Y, Z, C]``) with ``affine`` atomically; the format follows ``path``.

    ``like``: the file whose header is reused where it has ``affine``, so the output carries the input's header
    apart from the data type, the intensity scaling and the intent, which a label map must not inherit: a NIfTI
    file's units, descriptions and qform/sform codes; an ``.nrrd``/``.mha`` file's spacing, direction and origin
    as stored (an affine splits into them only up to rounding, and ITK refuses to combine images whose fields
    differ by more than 1e-6, as those of a header written with 4 digits, whose directions are not unit vectors).
    """
    path = Path(path)
    end = _known(path)
    array = np.asarray(array)
    if end in NIFTI_ENDINGS:
        payload = _nifti_bytes(array, affine, like)
        if end == ".nii.gz":
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
    else:
        payload = _itk_bytes(array, affine, end, like)
    return atomic_write(path, lambda fh: fh.write(payload))


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, like: str | Path | None) -> bytes:
    import nibabel as nib

    if like is not None and ending(like) in NIFTI_ENDINGS:
        _check_nifti_extensions(Path(like))
        with _nifti(Path(like)) as source:
            hdr = source.header.copy()
        hdr.set_data_dtype(array.dtype)
        hdr.set_slope_inter(1.0, 0.0)
        hdr["cal_min"], hdr["cal_max"] = 0, 0  # the input's display window means nothing for labels
        hdr.set_intent("none")  # nor does its intent (a vector image's components, a statistic)
        img = type(source)(array, affine, hdr)
    else:
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm", "sec")
    return img.to_bytes()


def _itk_geometry(affine: np.ndarray, like: str | Path | None) -> tuple[list[float], list[float], list[float]]:
    """ITK's spacing, direction (row by row) and origin of a 3D grid with ``affine``: those stored in ``like``
    (an ``.nrrd``/``.mha`` file, its first three axes) where it has that affine within 1e-6 mm, else from it."""
    affine = np.asarray(affine, dtype=np.float64)
    if like is not None and ending(like) in ITK_ENDINGS:
        reader = _sitk().ImageFileReader()
        reader.SetFileName(str(like))
        _itk_call(Path(like), reader.ReadImageInformation)  # read a moment ago: may be replaced or removed since
        n = reader.GetDimension()
        spacing, origin = list(reader.GetSpacing())[:3], list(reader.GetOrigin())[:3]
        direction = np.asarray(reader.GetDirection()).reshape(n, n)[:3, :3]
        if np.allclose(_itk_affine(direction.ravel(), spacing, origin), affine, rtol=0, atol=1e-6):
            return spacing, [float(v) for v in direction.ravel()], origin
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return ([float(s) for s in spacing], [float(v) for v in (_LPS @ affine[:3, :3] / spacing).ravel()],
            [float(v) for v in _LPS @ affine[:3, 3]])


def _itk_bytes(array: np.ndarray, affine: np.ndarray, end: str, like: str | Path | None) -> bytes:
    sitk = _sitk()
    order = (2, 1, 0) + tuple(range(3, array.ndim))
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(order)), isVector=array.ndim == 4)
    spacing, direction, origin = _itk_geometry(affine, like)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    # SimpleITK chooses the format by file name, so write a named temporary file and hand its bytes on
    with tempfile.TemporaryDirectory(prefix="pgps-") as tmp:
        out = Path(tmp) / f"out{end}"
        sitk.WriteImage(img, str(out), useCompression=True)
        return out.read_bytes()


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Spacing (mm) along each array axis of ``affine``."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def axis_codes(affine: np.ndarray) -> tuple[str, ...]:
    """Where each array axis of ``affine`` points, as nibabel names it: ``("R", "A", "S")`` for canonical."""
    import nibabel as nib

    return tuple(str(c) for c in nib.orientations.aff2axcodes(affine))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip and permute the first three axes to the closest RAS+ order; returns the array and its new affine.

    The same as ``nibabel.as_closest_canonical``, for arrays from any reader.
    """
    import nibabel as nib

    out = nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))
    return out, canonical_grid(array.shape, affine)[1]


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """The spatial shape and the affine that :func:`to_canonical` gives an image of ``shape`` (``[X, Y, Z]``,
    channels after them ignored) with ``affine``: from a header alone, without its voxels."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    out = [0, 0, 0]
    for axis, (to, _) in enumerate(ornt):  # input axis ``axis`` becomes canonical axis ``to``
        out[int(to)] = int(shape[axis])
    return tuple(out), np.asarray(affine) @ nib.orientations.inv_ornt_aff(ornt, tuple(shape[:3]))  # type: ignore[return-value]


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`: an array on the canonical grid, back on the axes of the image with ``affine``."""
    import nibabel as nib

    back = nib.orientations.ornt_transform(_RAS, nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def import_libraries(paths: Iterable[str | Path]) -> None:
    """Import, in the calling thread, the libraries that :func:`read` of ``paths`` and :func:`resample` use.

    For code that then reads or resamples on worker threads: a library's first import runs Python that
    parses source (numpy.ma, which scipy imports, asks :func:`inspect.signature` of builtins; nibabel
    builds dtypes from strings), and on a worker thread that parsing would race the other threads'
    (:func:`pgps_tune.data.load_npy` says why that fails).
    """
    import nibabel  # noqa: F401
    import scipy.ndimage  # noqa: F401

    if any(ending(p) in ITK_ENDINGS for p in paths):
        _sitk()


def needs_resampling(spacing: Sequence[float], target: Sequence[float]) -> bool:
    """Whether voxels of ``spacing`` go to ``target`` by resampling: the one rule of ``data.prepare``, ``predict``
    and ``evaluate`` (within 0.1%, so a header's rounding is no other grid)."""
    return not np.allclose(spacing, target, rtol=1e-3)


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, int, int]:
    """The grid that covers the same extent as ``shape`` at ``spacing`` with voxels of ``target`` size."""
    return tuple(max(1, round(s * sp / t)) for s, sp, t in zip(shape, spacing, target))  # type: ignore[return-value]


def resample(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample every channel of ``volume [C, X, Y, Z]`` onto ``shape`` (same extent; spline ``order``).

    Voxel edges stay aligned with the volume's edges (``grid_mode``), so a volume and its
    resampled copy cover the same region of the world.
    """
    from scipy.ndimage import zoom

    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    factors = [n / s for n, s in zip(shape, volume.shape[1:])]
    # zoom's output axis is round(s * n / s) == n
    return np.stack([zoom(c, factors, order=order, mode="nearest", grid_mode=True) for c in volume])
