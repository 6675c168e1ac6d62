"""Exports and the results store: trials.parquet, best_schedule.yaml, every sweep in one dataset.

Pure pyarrow and YAML (no Ray): the tuner reads a sweep's Tune experiments into
plain :class:`TrialRecord` s, and this module turns them into ``trials.parquet``
(one row per trial), ``best_schedule.yaml`` (a schedule file that ``pgps-tune
train --schedule`` accepts) and ``summary.json``.  A trial's ``schedule`` is the
schedule file it trained, recipe included (trainer settings, data, split: see
:class:`pgps_tune.config.Recipe`), so every schedule exported from it, here or
from the store, trains that trial again.  The results store is a Parquet
dataset partitioned by ``dataset`` and ``sweep``; :func:`best_schedule` answers
"the best schedule for dataset X" with one query.

Everything read back here (``sweep.json``, the store, the trials' last results) is
parsed as data: JSON and Parquet only, checked, and refused in one line when it is
not what a sweep writes or would decode to far more memory (:func:`read_parquet`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pgps_tune import pareto
from pgps_tune import schedule as sch
from pgps_tune.asha import AshaSettings
from pgps_tune.errors import (
    NotRegular,
    PgpsError,
    atomic_write,
    atomic_write_all,
    atomic_write_text,
    brief,
    loads_json,
    open_regular,
    os_cause,
    read_json,
    strict_json,
)
from pgps_tune.nnunet import spacing_text, valid_spacing

SWEEP_FILE = "sweep.json"
SWEEP_LOCK = ".pgps-sweep.lock"  # held by the command writing a sweep folder (tuner.sweep_lock)
TRIALS = "trials.parquet"
BEST = "best_schedule.yaml"
SUMMARY = "summary.json"
PARETO = "pareto.parquet"
PARETO_DIR = "pareto"  # one schedule file per front schedule
# the values of trials.parquet's phase and status columns
PHASES = ("references", "search", "confirm")  # a sweep's phases, in the order they run
STATUSES = ("completed", "stopped_early", "failed", "unfinished")  # what trial_rows says of a trial
SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("phase", pa.string()), ("role", pa.string()), ("status", pa.string()),
    ("params", pa.string()),
    ("final_dice", pa.float64()), ("best_dice", pa.float64()), ("score", pa.float64()),
    ("voxels_processed", pa.int64()), ("voxel_fraction", pa.float64()),
    ("schedule_voxel_fraction", pa.float64()), ("train_time_s", pa.float64()), ("wall_time_s", pa.float64()),
    ("baseline_iterations", pa.float64()), ("rung_reached", pa.int64()), ("stopped_early", pa.bool_()),
    ("failed", pa.bool_()), ("completed", pa.bool_()), ("num_failures", pa.int64()), ("error", pa.string()),
    ("n_stages", pa.int64()), ("schedule", pa.string()), ("dice_per_class", pa.string()),
    ("fidelity", pa.float64()),  # share of the budget the trial trained at (asha.fidelity compressed: below 1)
])
COLUMNS = SCHEMA.names
FIDELITY = "fidelity"  # absent from stores written before it: those trials trained at the full budget
STORE_COLUMNS = (*COLUMNS, "objective", "final_patch")  # plus the partition keys dataset and sweep
SPACE_KEY = "space_key"  # SearchSpace.key() of the sweep; absent from stores written before it
LATER_COLUMNS = ("phase", "fidelity")  # added since the first stores were written: read back as null where absent
META_KEYS = ("format_version", "sweep", "dataset", "space", "storage_path", "experiments", "objective", "asha",
             "final_patch", "finished")
FINISHED_STATUSES = ("TERMINATED", "ERROR")  # Tune's end states; anything else is an unfinished trial


def default_store() -> Path:
    env = os.environ.get("PGPS_RESULTS_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "pgps-tune" / "results"


def store_root(store: str | Path | None) -> Path:
    """The results store's folder: ``store`` (``--results-store``), else :func:`default_store`."""
    return Path(store) if store else default_store()


def _refuse_file_store(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise PgpsError(f"results store {root} is a file; set --results-store or PGPS_RESULTS_DIR to a folder")


# -- sweep.json ------------------------------------------------------------------------------


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(out / SWEEP_FILE, strict_json(meta) + "\n")


def read_meta(experiment: str | Path) -> dict[str, Any]:
    """A sweep's ``sweep.json``, checked to hold what the exports need."""
    path = Path(experiment) / SWEEP_FILE
    hint = "give the --out folder of a 'pgps-tune tune' run"
    if not path.is_file():
        raise PgpsError(f"{path} does not exist; {hint}")
    meta = read_json(path, "sweep description", f"it was damaged: {hint}, or rerun the sweep into a new --out")
    if not isinstance(meta, dict):
        raise PgpsError(f"{path} is not a sweep description (a JSON object); {hint}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise PgpsError(f"{path} misses {', '.join(missing)}; it was damaged or written by another program: {hint}")
    version = meta["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PgpsError(f"{path}: format_version {version!r} is not one pgps-tune writes; it was damaged or "
                        f"written by another program: {hint}")
    if version > META_FORMAT:
        raise PgpsError(f"{path} has format_version {version}, newer than this pgps-tune reads ({META_FORMAT}); "
                        "upgrade pgps-tune")
    from pgps_tune.space import OBJECTIVES

    checks = [
        ("asha", lambda: AshaSettings.from_dict(meta["asha"])),
        ("early_stopping", lambda: isinstance(meta.get("early_stopping", False), bool)),
        ("experiments", lambda: _check_experiments(meta["experiments"])),
        ("objective", lambda: meta["objective"]["type"] in OBJECTIVES),
        ("storage_path", lambda: isinstance(meta["storage_path"], str)),
        ("dataset", lambda: isinstance(meta["dataset"], str) and meta["dataset"]),
        ("sweep", lambda: isinstance(meta["sweep"], str) and meta["sweep"]),
        ("final_patch", lambda: _ints(meta["final_patch"])),
        ("finished", lambda: isinstance(meta["finished"], bool) or meta["finished"] is None),
        (PICK, lambda: PICK not in meta or _valid_pick(meta[PICK])),
        ("trial_setup", lambda: "trial_setup" not in meta or _check_setup(meta["trial_setup"])),
        ("reference_configs", lambda: "reference_configs" not in meta or (
            isinstance(meta["reference_configs"], list) and all(isinstance(c, dict)
                                                                for c in meta["reference_configs"]))),
        ("confirmation", lambda: not meta.get("confirmation") or _check_confirmation(meta["confirmation"])),
        ("pending_confirm", lambda: not meta.get("pending_confirm") or (
            valid_confirm_settings(meta["pending_confirm"]["settings"]) and isinstance(
                meta["pending_confirm"]["key"], str) and isinstance(meta["pending_confirm"]["configs"], list))),
    ]
    bad = []
    for key, check in checks:
        try:
            ok = check()
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            bad.append(key)
    if bad:
        raise PgpsError(f"{path} has malformed fields ({', '.join(bad)}); it was damaged or edited: restore it from "
                        f"a backup, or rerun the sweep into a new --out")
    return meta


# sweep.json: the absolute path of the folder the sweep was written in (a copied or moved folder has another)
FOLDER_KEY = "folder"
# sweep.json: the pick rule an 'export --pick' into the sweep folder chose (a pareto sweep; absent: the space's
# objective.pick); later exports, 'tune --resume' and the report's figures keep to it.  Also a store column:
# the rule the sweep's stored rows were exported with (empty for other objectives and in stores before it)
PICK = "pick"


def _valid_pick(text: Any) -> bool:
    try:
        return isinstance(text, str) and pareto.parse_pick(text) is not None
    except PgpsError:
        return False


def _origin(meta: dict[str, Any]) -> str | None:
    """The folder the sweep's sweep.json was written in; for one written before it said so, the folder whose
    ``ray/`` the default storage was (None: an explicit --storage, whose folder it does not tell)."""
    origin = meta.get(FOLDER_KEY)
    if isinstance(origin, str) and origin:
        return origin
    return str(Path(meta["storage_path"]).parent) if meta.get("storage") is None else None


def tune_storage(sweep: str | Path, meta: dict[str, Any]) -> tuple[str, str | None]:
    """(path, note): where the Tune experiments of the sweep in folder ``sweep`` are on this machine.

    sweep.json records an absolute storage path.  A local storage inside the folder the sweep was
    written in (``SWEEP/ray``, the default) is the same place inside ``sweep``, so a copied or moved
    folder reads and writes its own experiments, never those of the folder it came from.  A remote
    URI or a local ``--storage`` outside that folder stays as recorded.  ``note`` says what changed
    (None: nothing did).
    """
    recorded = meta["storage_path"]
    origin = _origin(meta)
    if "://" in str(meta.get("storage") or "") or origin is None:
        return recorded, None
    try:
        inside = Path(recorded).relative_to(origin)
    except ValueError:
        return recorded, None  # an external --storage
    path = str(Path(sweep).resolve() / inside)
    if path == recorded:
        return recorded, None
    return path, (f"sweep.json records the Tune storage {recorded}, inside {origin} where the sweep was written; "
                  f"this folder is a copy or a move of it, so its own {path} is used")


def shared_storage(sweep: str | Path, meta: dict[str, Any]) -> str | None:
    """The folder this copy ``sweep`` shares its Tune storage with (a remote or external ``--storage``,
    recorded in both), while that folder still holds the sweep; None for a move, or storage of its own
    (``meta``'s storage path as recorded, or as :func:`tune_storage` found it)."""
    origin = meta.get(FOLDER_KEY)
    here = Path(sweep).resolve()
    if not isinstance(origin, str) or not origin or Path(origin) == here:
        return None
    storage = Path(meta["storage_path"])
    if "://" not in str(meta.get("storage") or "") and (storage.is_relative_to(origin) or storage.is_relative_to(here)):
        return None  # inside the folder: each copy has its own
    return origin if (Path(origin) / SWEEP_FILE).is_file() else None


META_FORMAT = 2  # the sweep.json format this pgps-tune writes (tuner.FORMAT_VERSION), the newest it reads
SETUP_INTS = ("epochs", "iterations_per_epoch", "batch_size", "seed", "split_seed", "synthetic_cases", "token_size",
              "val_every")


def _ints(v: Any, n: int = 3) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                       for x in v)


def _check_experiments(experiments: Any) -> bool:
    """Tune experiment names, one per phase entry (``references``, ``search``, ``confirm-2``, ...), each
    named after its entry: two entries swapped would relabel the phases."""
    return (isinstance(experiments, dict) and "search" in experiments
            and all(isinstance(v, str) and v and "/" not in v and v not in (".", "..") and v.endswith(f"-{k}")
                    for k, v in experiments.items()))


def _check_setup(setup: Any) -> bool:
    """What ``confirm`` reads of sweep.json's ``trial_setup``."""
    b = setup["budget"]
    return (isinstance(setup["data"], str) and _ints(setup["final_patch"]) and isinstance(setup["pools"], list)
            and isinstance(b, dict) and all(isinstance(b[k], int) and not isinstance(b[k], bool) for k in SETUP_INTS)
            and b["epochs"] > 0 and b["iterations_per_epoch"] > 0 and _ints(b["synthetic_shape"])
            and isinstance(b["network"], str) and isinstance(b["val_fraction"], (int, float))
            and isinstance(setup["objective"], dict))


def _check_confirmation(conf: Any) -> bool:
    """What the exports read of sweep.json's ``confirmation``: the repeat kind and one config per trial;
    what a later confirm or resume reads: its settings and those of the ones it replaced."""
    kind = conf["repeat"]
    settings = [conf["settings"]] if "settings" in conf else []
    return (kind in REPEAT_KEYS and isinstance(conf["configs"], list) and isinstance(conf["epochs"], int)
            and isinstance(conf.get("replaced", []), list)
            and all(valid_confirm_settings(s) for s in settings + conf.get("replaced", []))
            and isinstance(conf["top_k"], int) and isinstance(conf["experiments"], list)
            and all(isinstance(c, dict) and isinstance(c["candidate"], str) and isinstance(c["role"], str)
                    and kind in c for c in conf["configs"]))


def valid_confirm_settings(s: Any) -> bool:
    """A confirmation's settings as sweep.json keeps them (tuner.ConfirmSettings as a dict)."""
    return (isinstance(s, dict) and set(s) == {"top_k", "epochs", "seeds", "folds", "splits"}
            and all(isinstance(s[k], int) for k in ("top_k", "epochs"))
            and all(s[k] is None or isinstance(s[k], int) for k in ("seeds", "folds"))
            and (s["splits"] is None or isinstance(s["splits"], str)))


def describe_confirmation(settings: dict[str, Any]) -> str:
    """A confirmation's settings in words: ``top 1, 3 seeds, 10 epochs``."""
    how = f"{settings['folds']} folds" if settings.get("folds") else f"{settings['seeds']} seeds"
    return f"top {settings['top_k']}, {how}, {settings['epochs']} epochs"


def confirmation_flags(settings: dict[str, Any], tune: bool = False) -> str:
    """The command-line flags that ask for ``settings``: confirm's own, or (``tune``) tune's."""
    flag = ({"top_k": "--confirm-top-k", "seeds": "--confirm-seeds", "splits": "--confirm-splits",
             "epochs": "--confirm-epochs"} if tune else
            {"top_k": "--top-k", "seeds": "--seeds", "splits": "--splits", "epochs": "--epochs"})
    how = (f"{flag['seeds']} {settings['seeds']}" if settings.get("folds") is None else
           f"--confirm-folds {settings['folds']}" + (f" {flag['splits']} {settings['splits']}"
                                                     if settings.get("splits") else ""))
    return f"{flag['top_k']} {settings['top_k']} {how} {flag['epochs']} {settings['epochs']}"


# -- Parquet read back --------------------------------------------------------------------------

# Bounds on a Parquet file read back (a sweep's trials.parquet, a store part), all far above what pgps-tune writes:
# one row per trial (num_samples stops at 100,000), 29 columns, a row of 0.7-1.5 KiB (a 100,000-trial table
# decodes to about 150 MiB, its footer is about 20 KiB).  Parquet's dictionary and RLE encodings store a value
# repeated on every row once (355 bytes on disk decoded to 500 MB), so the size the rows decode to is counted
# before they are decoded.  256 MiB, as for a JSON file: with its Python rows, a table stays under a GiB.
MAX_PARQUET_ROWS = 1_000_000
MAX_PARQUET_COLUMNS = 1_000
MAX_PARQUET_FOOTER = 4 << 20  # parsed, a footer takes about 15 times its size
MAX_PARQUET_BYTES = 256 << 20  # on disk, as the page headers say the pages decompress, and decoded
MAX_PARQUET_PAGES = 100_000  # of the columns read; pgps-tune writes a few per column (20,000 rows a page)
MAX_STORE_BYTES = 1 << 30  # every sweep of the results store, decoded: about 700,000 trials
_PARQUET_BATCH = 4096  # rows decoded at a time
_PAGE_HEADER_MAX = 16 << 20  # pyarrow's own bound on a page header (max_page_header_size)
_PARQUET_816_PAD = 100  # what pyarrow reads past a column chunk written by parquet-mr before 1.2.9


def _parquet_type_ok(t: pa.DataType) -> bool:
    """A column type pgps-tune writes (or reads back in place of one): no nested or fixed-width binary types,
    whose values a few bytes on disk can make any size."""
    return any(f(t) for f in (pa.types.is_null, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating,
                              pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                              pa.types.is_large_binary))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A Thrift compact-protocol varint at ``pos``: its value and the position after it."""
    value = shift = 0
    while shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("a varint of more than 10 bytes")


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _thrift_struct(buf: bytes, pos: int, depth: int = 0) -> tuple[dict[int, Any], int]:
    """The Thrift compact-protocol struct at ``pos``: its integer fields (and, nested, its struct fields) by field
    id, the others skipped, and the position after it.  ``IndexError`` where it runs past ``buf``, ``ValueError``
    where it cannot be a struct."""
    if depth > 8:  # a page header nests 3 deep
        raise ValueError("structs nested too deep")
    fields: dict[int, Any] = {}
    last = 0
    while (head := buf[pos]) != 0:
        pos += 1
        kind, delta = head & 0x0F, head >> 4
        if delta:
            last += delta
        else:
            raw, pos = _varint(buf, pos)
            last = _zigzag(raw)
        if kind in (4, 5, 6):  # i16, i32, i64
            raw, pos = _varint(buf, pos)
            fields[last] = _zigzag(raw)
        elif kind == 12:
            fields[last], pos = _thrift_struct(buf, pos, depth + 1)
        else:
            pos = _thrift_skip(buf, pos, kind, depth)
    return fields, pos + 1


def _thrift_skip(buf: bytes, pos: int, kind: int, depth: int) -> int:
    """The position after a Thrift compact-protocol value of type ``kind`` at ``pos``."""
    if kind in (1, 2):  # a boolean field is its header
        return pos
    if kind == 3:
        return pos + 1
    if kind in (4, 5, 6):
        return _varint(buf, pos)[1]
    if kind == 7:
        return pos + 8
    if kind == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if kind == 12:
        return _thrift_struct(buf, pos, depth + 1)[1]
    if kind in (9, 10, 11):  # list, set, map
        if kind == 11:
            n, pos = _varint(buf, pos)
            kinds = (buf[pos] >> 4, buf[pos] & 0x0F) if n else ()
            pos += 1 if n else 0
        else:
            n, kinds = buf[pos] >> 4, (buf[pos] & 0x0F,)
            pos += 1
            if n == 15:
                n, pos = _varint(buf, pos)
        for _ in range(n):
            for k in kinds:  # a boolean element takes a byte
                pos = pos + 1 if k in (1, 2) else _thrift_skip(buf, pos, k, depth + 1)
            if pos > len(buf):
                raise IndexError(pos)
        return pos
    raise ValueError(f"unknown Thrift type {kind}")


def _page_header(fd: int, pos: int, size: int) -> tuple[dict[int, Any], int]:
    """The Parquet page header at byte ``pos`` of the open file ``fd`` (of ``size`` bytes) and where its page's
    data begins; ``OSError`` for a header that is not one."""
    window = 1 << 12
    while True:
        buf = os.pread(fd, min(window, size - pos), pos)
        try:
            header, end = _thrift_struct(buf, 0)
        except IndexError:
            if pos + len(buf) >= size or window >= _PAGE_HEADER_MAX:
                raise OSError(f"the page header at byte {pos} is cut off or damaged") from None
            window *= 8
            continue
        except ValueError as exc:
            raise OSError(f"the page header at byte {pos} is damaged ({exc})") from None
        return header, pos + end


def _pages_unpack_to(fd: int, size: int, meta: pq.FileMetaData, wanted: Sequence[int]) -> tuple[int, int]:
    """What the pages of the ``wanted`` columns decompress to, as their own headers say, and how many there are.

    pyarrow sizes a page's buffer from its header alone, before it decompresses the page, and the footer's
    ``total_uncompressed_size`` is not checked against the headers: a header may claim 2 GiB, and a few KiB of
    zstd then fill them.  The headers are read from the range pyarrow reads (the column chunk, and the next
    bytes where the chunk's pages hold fewer values than its footer says: pyarrow pads the range of files that
    old parquet-mr versions wrote).  Counting stops once past :data:`MAX_PARQUET_BYTES` or
    :data:`MAX_PARQUET_PAGES`."""
    unpacked = pages = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        for j in wanted:
            chunk = group.column(j)
            pos = chunk.data_page_offset
            if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < pos:
                pos = chunk.dictionary_page_offset
            end = pos + chunk.total_compressed_size
            values = 0
            while pos < end or (values < chunk.num_values and pos < min(size, end + _PARQUET_816_PAD)):
                if not 0 <= pos < size:
                    raise OSError(f"a page of column {meta.schema.column(j).path} lies outside the file")
                header, data = _page_header(fd, pos, size)
                packed, unpacked_page = header.get(3, -1), header.get(2, -1)
                if packed < 0 or unpacked_page < 0:
                    raise OSError(f"the page header at byte {pos} gives no sizes or negative ones")
                values += sum(sub.get(1, 0) for k in (5, 8)  # a data page's num_values (v1 or v2)
                              if isinstance(sub := header.get(k), dict))
                unpacked += unpacked_page
                pages += 1
                if unpacked > MAX_PARQUET_BYTES or pages > MAX_PARQUET_PAGES:
                    return unpacked, pages
                pos = data + packed
    return unpacked, pages


def _decoded_bytes(batch: pa.RecordBatch) -> int:
    """What ``batch`` takes once its dictionary columns are decoded: each row's value counted, not the
    dictionary's one copy (the decoding this bounds is what a dictionary bomb relies on)."""
    size = 0
    for col in batch.columns:
        if pa.types.is_dictionary(col.type):
            lengths = pc.take(pc.binary_length(col.dictionary), col.indices)
            size += (pc.sum(lengths).as_py() or 0) + 8 * len(col)  # plus the offsets and validity
        else:
            size += col.nbytes
    return size


def read_parquet(path: Path, columns: Sequence[str], where: str, fix: str) -> pa.Table:
    """The ``columns`` a Parquet file someone may have sent has (of those, the ones it holds), its string
    columns decoded, refused in one line naming ``where`` and ``fix`` when reading it could exhaust the memory.

    Before any data is read, the file must be a regular file (a FIFO would hang the reader) of at most
    :data:`MAX_PARQUET_BYTES`, with a footer of at most :data:`MAX_PARQUET_FOOTER` (a sparse file is zeros of
    any length), at most :data:`MAX_PARQUET_ROWS` rows and :data:`MAX_PARQUET_COLUMNS` columns, pages that
    decompress (as the footer says) to at most :data:`MAX_PARQUET_BYTES`, and plain column types.  Then
    :data:`_PARQUET_BATCH` rows at a time are read with the strings kept as dictionaries, and the size they
    decode to is summed: past :data:`MAX_PARQUET_BYTES` the file is refused before it is decoded.  A damaged
    file raises what pyarrow raises (``OSError``, ``pa.ArrowException``), for the caller to name.
    """
    def refuse(what: str) -> PgpsError:
        return PgpsError(f"{where} {what}, far more than a table pgps-tune writes: it was damaged or crafted; {fix}")

    try:
        fh = open_regular(path)
    except NotRegular as exc:
        raise PgpsError(f"{where} is not a regular file ({exc.kind}); {fix}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_PARQUET_BYTES:
            raise refuse(f"is {size >> 20:,} MiB")
        if size >= 8:  # the footer's length, then PAR1, end the file; pyarrow names a file too short
            fh.seek(size - 8)
            footer = int.from_bytes(fh.read(4), "little")
            if footer > MAX_PARQUET_FOOTER:
                raise refuse(f"has a footer of {footer >> 20} MiB")
            fh.seek(0)
        pf = pq.ParquetFile(fh, buffer_size=1 << 20)  # pages streamed, not a column's pages at once
        meta = pf.metadata
        if max(meta.num_rows, sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
               ) > MAX_PARQUET_ROWS:
            raise refuse(f"holds {meta.num_rows:,} rows")
        if meta.num_columns > MAX_PARQUET_COLUMNS:
            raise refuse(f"has {meta.num_columns:,} columns")
        schema = pf.schema_arrow
        present = [c for c in columns if c in schema.names]
        if twice := [c for c in present if schema.names.count(c) > 1]:
            raise PgpsError(f"{where} holds two columns named {', '.join(twice)[:120]}, which pgps-tune never "
                            f"writes; {fix}")
        odd = [f"{c} ({schema.field(c).type})" for c in present if not _parquet_type_ok(schema.field(c).type)]
        if odd:
            raise refuse(f"has columns of types pgps-tune never writes: {', '.join(odd)[:200]}")
        wanted = [j for j in range(meta.num_columns) if meta.schema.column(j).path in present]
        unpacked, pages = _pages_unpack_to(fh.fileno(), size, meta, wanted)
        if unpacked > MAX_PARQUET_BYTES:
            raise refuse(f"has pages that decompress to more than {MAX_PARQUET_BYTES >> 20} MiB")
        if pages > MAX_PARQUET_PAGES:
            raise refuse(f"has more than {MAX_PARQUET_PAGES:,} pages")
        pf = pq.ParquetFile(fh, metadata=meta, buffer_size=1 << 20, read_dictionary=present)
        batches, decoded = [], 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=present):
            decoded += _decoded_bytes(batch)
            if decoded > MAX_PARQUET_BYTES:
                raise refuse(f"decodes to more than {MAX_PARQUET_BYTES >> 20} MiB")
            # decoded now: a batch's dictionary holds every value the reader has met in the row group so far, so
            # batches kept with theirs take memory quadratic in the rows (a 100,000-row table: 2.1 GB, not 0.3)
            plain = [_plain(col) for col in batch.columns]
            batches.append(pa.RecordBatch.from_arrays(plain, schema=pa.schema(
                [f.with_type(col.type) for f, col in zip(batch.schema, plain)])))
        table = pa.Table.from_batches(batches) if batches else pf.schema_arrow.empty_table().select(present)
    return pa.table({c: _plain(table[c]) for c in present})


def _plain(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``col`` with its dictionary decoded (as it is, if it has none)."""
    return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


# -- trials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """One Tune trial as plain data, as the tuner reads it from an experiment folder."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict[str, Any] = field(default_factory=dict)
    last_result: dict[str, Any] = field(default_factory=dict)
    num_failures: int = 0
    error: str = ""  # the last line of the trial's error, if it failed
    phase: str = "search"  # references, search or confirm


# the columns that hold JSON text, and what each must decode to (empty text: none recorded)
JSON_COLUMNS: dict[str, tuple[type, ...]] = {"params": (dict,), "schedule": (dict, type(None)),
                                             "dice_per_class": (dict,)}


def check_json_columns(rows: list[dict[str, Any]], where: str, fix: str,
                       read: Callable[[str, str, Any], None] | None = None) -> None:
    """Refuse, in one line naming ``where`` and the trial, a row whose JSON text columns do not decode to
    what pgps-tune writes there: the tables are files anyone can hand over (a shared results store, a
    sweep folder), and every reader after this one parses those columns without checks.  ``read(column,
    text, value)`` is given each distinct text's value, for a caller that would parse it again."""
    checked: set[tuple[str, str]] = set()  # a text many rows share (a schedule, '{}') is parsed once
    for r in rows:
        for col, kinds in JSON_COLUMNS.items():
            text = r.get(col)
            if not text or (col, text) in checked:
                continue
            checked.add((col, text))
            try:
                value = loads_json(text)
            except ValueError as exc:
                problem = f"not valid JSON ({exc})"
            else:
                if isinstance(value, kinds):
                    if read is not None:
                        read(col, text, value)
                    continue
                problem = f"a JSON {type(value).__name__}, not the object pgps-tune writes"
            raise PgpsError(f"{where}: trial {r.get('trial_id')}'s {col} column is {problem}; {fix}")


ROLES = ("baseline", "paper", "search")  # the values of trials.parquet's role column (and known_role's others)


def known_role(role: Any) -> bool:
    """Whether trials.parquet's role column may hold ``role``: one of :data:`ROLES`, or a further reference that a
    space's ``search.references`` names (``paper:performance``, ...: :func:`pgps_tune.space.reference_configs`
    gives such a reference its name as its role).

    >>> [known_role(r) for r in ("search", "paper:performance", "random", "constant:resource", "paper:fast", 3)]
    [True, True, True, False, False, False]
    """
    if role in ROLES:
        return True
    if not isinstance(role, str):
        return False
    preset, colon, mode = role.partition(":")
    return preset in sch.PRESETS and preset != "constant" and (not colon or mode in sch.MODES)


def _fits(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of type ``have`` holds what ``want`` means: the same, or a narrower number
    (integers where floats are meant), or text stored as large_string."""
    if have == want:
        return True
    if pa.types.is_floating(want):
        return pa.types.is_floating(have) or pa.types.is_integer(have)
    if pa.types.is_integer(want):
        return pa.types.is_integer(have)
    return pa.types.is_string(want) and pa.types.is_large_string(have)


def check_trials(table: pa.Table, where: str | Path, fix: str = "rewrite it with 'pgps-tune export'"
                 ) -> list[dict[str, Any]]:
    """The rows of a trials table (``trials.parquet``), refused in one line naming ``where`` and ``fix``
    unless it is what :func:`trial_rows` writes: every column of :data:`SCHEMA` with its type (a column added
    later may be missing, or all null), the known phase, role and status values, booleans that agree with the
    status, the JSON text columns that decode, each trial once.  The one check that ``trials``, ``report``
    and every other reader of a sweep's table share."""
    names = table.schema.names
    missing = [c for c in COLUMNS if c not in names and c not in LATER_COLUMNS]
    if missing:
        listed = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
        raise PgpsError(f"{where} lacks the columns {listed}; it was not written by pgps-tune: {fix}")
    wrong = [f"{c} ({table.schema.field(c).type}, not {SCHEMA.field(c).type})" for c in COLUMNS if c in names
             and not _fits(table.schema.field(c).type, SCHEMA.field(c).type)
             and not (c in LATER_COLUMNS and pa.types.is_null(table.schema.field(c).type))]
    if wrong:
        raise PgpsError(f"{where} has wrongly typed columns: {', '.join(wrong)}; it was not written by pgps-tune "
                        f"or was edited: {fix}")
    columns = [table[c].cast(SCHEMA.field(c).type) if c in names else pa.nulls(len(table), SCHEMA.field(c).type)
               for c in COLUMNS]
    columns = [pc.fill_null(col, math.nan) if pa.types.is_floating(col.type) and c != FIDELITY else col
               for c, col in zip(COLUMNS, columns)]  # a missing number is NaN, as trial_rows writes it
    rows = pa.Table.from_arrays(columns, schema=SCHEMA).to_pylist()
    allowed = {"phase": (*PHASES, None), "status": STATUSES}
    seen: set[str] = set()
    for r in rows:
        bad = [f"{c} {r[c]!r}" for c, values in allowed.items() if r[c] not in values]
        if not known_role(r["role"]):
            bad.insert(0, f"role {r['role']!r}")
        if r["trial_id"] is None:
            bad.append("trial_id null")
        bad += [f"{flag} {r[flag]!r} with status {r['status']!r}" for flag in ("completed", "stopped_early", "failed")
                if r[flag] is not (r["status"] == flag)]
        if bad:
            raise PgpsError(f"{where}: trial {r['trial_id']} has {'; '.join(bad)}, which pgps-tune never writes; "
                            f"{fix}")
        if r["trial_id"] in seen:
            raise PgpsError(f"{where} holds trial {r['trial_id']} twice; it was written twice into one table or "
                            f"edited: {fix}")
        seen.add(r["trial_id"])
    check_json_columns(rows, str(where), fix)
    return rows


def _float(r: dict[str, Any], key: str, default: float = math.nan) -> float:
    v = r.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def asha_compared(meta: dict[str, Any]) -> bool:
    """Whether ASHA compared the search phase's trials at its rungs (sweep.json's ``early_stopping``): not in a
    ``pareto`` sweep, nor with ``asha.enabled: false``, nor in a compressed ladder (whose rungs are budgets).
    A sweep.json from before the key existed ran ASHA unless its objective was ``pareto``."""
    return bool(meta.get("early_stopping", (meta.get("objective") or {}).get("type") != "pareto"))


def rung_counted(phase: str, meta: dict[str, Any]) -> bool:
    """Whether a trial of ``phase`` has a ``rung_reached`` (:func:`trial_rows`): a search trial that ASHA compared,
    or a rung of a compressed ladder (a run at that rung's budget); never a reference nor a confirmation repeat.
    A table exported before this rule gave every trial one; its readers apply the rule again."""
    fidelity = meta.get("fidelity")
    if isinstance(fidelity, dict) and fidelity.get("type") == "compressed":
        return phase.startswith("search")
    return phase == "search" and asha_compared(meta)


def trial_status(tune_status: str, last_result: dict[str, Any]) -> str:
    """What a trial came to (one of :data:`STATUSES`), from Tune's status and the trial's last report: a
    trial that diverged, or whose schedule was invalid, ended its run normally but failed."""
    if tune_status == "ERROR" or last_result.get("diverged"):
        return "failed"
    if tune_status == "TERMINATED":
        return "completed" if last_result.get("completed") else "stopped_early"
    return "unfinished"


def trial_rows(records: list[TrialRecord], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial (the columns of ``trials.parquet``).  ``rung_reached`` is null for a trial that no
    rung compared: the references, the confirmation's repeats, every trial of a sweep without ASHA."""
    from pgps_tune.space import objective_score

    asha = AshaSettings.from_dict(meta["asha"])
    compared = asha_compared(meta)
    rows = []
    for t in records:
        r = t.last_result
        diverged = bool(r.get("diverged"))
        status = trial_status(t.status, r)
        failed, completed = status == "failed", status == "completed"
        score = _float(r, "score")
        if "target_dice" in meta and not failed:  # rescored with the target, which the references ran without
            score = objective_score(meta["objective"], _float(r, "val_dice"), _float(r, "schedule_voxel_fraction"),
                                    meta["target_dice"])
        per_class = {k[5:]: v for k, v in r.items() if k.startswith("dice_")}
        rows.append({
            "trial_id": t.trial_id,
            "phase": t.phase,
            "role": str(r.get("role") or t.config.get("role", "search")),
            "status": status,
            "params": json.dumps(t.config, sort_keys=True),
            "final_dice": _float(r, "val_dice"),
            "best_dice": _float(r, "best_val_dice", _float(r, "val_dice")),
            "score": score,
            "voxels_processed": int(_float(r, "voxels_processed", 0)),
            "voxel_fraction": _float(r, "baseline_iterations", 0.0) / max(1.0, asha.max_t)
            if asha.time_attr == "baseline_iterations" else math.nan,
            "schedule_voxel_fraction": _float(r, "schedule_voxel_fraction"),
            "train_time_s": _float(r, "train_time_s"),
            "wall_time_s": _float(r, "time_total_s"),
            "baseline_iterations": _float(r, "baseline_iterations", 0.0),
            "rung_reached": int(r["rung"]) if isinstance(r.get("rung"), int)
            else asha.rung_reached(_float(r, asha.time_attr, 0.0)) if compared and t.phase == "search" else None,
            "stopped_early": status == "stopped_early",
            "failed": failed,
            "completed": completed,
            "num_failures": t.num_failures,
            "error": str(r.get("error", "diverged")) if diverged else (t.error or "failed (no error recorded)")
            if failed else "",
            "n_stages": int(_float(r, "n_stages", 0)),
            "schedule": str(r.get("schedule", "")),
            "dice_per_class": strict_json(per_class, indent=None),
            "fidelity": _float(r, "fidelity", 1.0),
        })
    if meta["objective"]["type"] == "cheapest_within":
        _score_confirmations(rows, meta["objective"])
    return rows


def _repeat_of(params: str) -> str:
    """Which repeat a confirmation trial is (its seed or fold, of which split) at which budget: what pairs it."""
    config = json.loads(params or "{}")
    return json.dumps([config.get(k) for k in ("epochs", *REPEAT_KEYS, "folds", "splits")])


def _score_confirmations(rows: list[dict[str, Any]], objective: dict[str, Any]) -> None:
    """Score each confirmation trial of a ``cheapest_within`` sweep against its own target: the constant baseline's
    Dice on the same repeat at the same budget, less the tolerance (the search's target is the baseline's one run
    at the search's epochs: another budget, another seed).  Without that baseline (it failed) no score."""
    from pgps_tune.space import objective_score

    base = {}
    for r in rows:
        if r["phase"] == "confirm" and r["role"] == "baseline" and r["completed"]:
            base.setdefault(_repeat_of(r["params"]), r["final_dice"])
    for r in rows:
        if r["phase"] == "confirm" and not r["failed"]:
            dice = base.get(_repeat_of(r["params"]))
            r["score"] = math.nan if dice is None else objective_score(
                objective, r["final_dice"], r["schedule_voxel_fraction"], dice - objective["tolerance"])


def trainer_meta(params_json: str) -> dict[str, Any]:
    """The searched trainer settings of a trial (fg_ratio, lr), to travel with its schedule."""
    from pgps_tune.space import TRAINER_PARAMS

    params = json.loads(params_json or "{}")
    trainer = {k: params[k] for k in TRAINER_PARAMS if k in params}
    return {"trainer": trainer} if trainer else {}


def rankable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials :func:`pick_best` ranks: completed searched or reference trials at the full budget."""
    return [r for r in rows if r["completed"] and r["schedule"] and not math.isnan(r["score"])
            and r.get("phase") != "confirm" and full_fidelity(r)]


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed full-budget trial with the highest objective score (ties: cheaper, then higher Dice).

    Confirmation trials are repeats, judged together by :func:`confirmation_summary`, never one by one;
    a trial trained at a fraction of the budget (``fidelity`` below 1) only ranks schedules for the
    next rung: its score is not one the exports can compare.
    """
    return _highest(rankable(rows))


def _highest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda r: (r["score"], -r["schedule_voxel_fraction"], r["final_dice"]), default=None)


# -- confirmation -----------------------------------------------------------------------------

REFERENCE_ROLES = ("baseline", "paper")  # the references every confirmation trains; search.references may add more


def reference_order(roles: Iterable[str]) -> list[str]:
    """The references ``roles`` (any but ``search``) in the order the exports compare with them: the baseline, the
    paper schedule, then the others of ``search.references`` as they come.

    >>> reference_order(["search", "paper:performance", "baseline", "paper:resource"])
    ['baseline', 'paper:performance', 'paper:resource']
    """
    roles = [r for r in dict.fromkeys(roles) if r != "search"]
    return sorted(roles, key=lambda r: REFERENCE_ROLES.index(r) if r in REFERENCE_ROLES else len(REFERENCE_ROLES))
REPEAT_KEYS = ("seed", "fold")  # what pairs two confirmation trials: the same seed, or the same fold
CONFIRM_KEYS = ("candidate", *REPEAT_KEYS, "folds", "splits", "epochs")  # added to a schedule's config


def training_key(schedule: Any, params: dict[str, Any], budget: dict[str, Any] | None = None) -> str:
    """What a trial trains, as one string: trials with the same key train alike.

    The schedule (plain data, a trial's ``schedule`` column) counts by what :class:`pgps_tune.schedule.Schedule`
    compares (its stages, final patch, pools and sampling), not by its provenance or the recipe it carries: the
    constant baseline (``preset: constant``) and a searched one-stage schedule (``preset: parametric``) train
    the same.  The trainer settings a space may search (fg_ratio, lr) count at the values the trial trains with,
    its own (``params``) or else the ``budget``'s (without a budget: only its own).

    >>> one = {"stages": [{"patch_size": [16, 16, 16], "batch_size": 2, "epochs": 10}]}
    >>> a = training_key({**one, "meta": {"preset": "constant"}}, {"preset": "constant"}, {"lr": 0.01})
    >>> a == training_key({**one, "meta": {"preset": "parametric"}}, {"stages": 1, "lr": 0.01}, {"lr": 0.01})
    True
    >>> a == training_key(one, {"stages": 1, "lr": 0.02}, {"lr": 0.01})
    False
    """
    from pgps_tune.space import TRAINER_PARAMS

    if isinstance(schedule, dict):
        schedule = {k: v for k, v in schedule.items() if k not in ("meta", "recipe")}
    trainer = {}
    for k in TRAINER_PARAMS:
        v = params[k] if k in params else (budget or {}).get(k)
        trainer[k] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    return json.dumps([schedule, trainer], sort_keys=True)


def _trains_as(row: dict[str, Any], budget: dict[str, Any] | None) -> str:
    return training_key(json.loads(row["schedule"] or "null"), json.loads(row["params"] or "{}"), budget)


def full_fidelity(row: dict[str, Any]) -> bool:
    """Whether a trial trained at the full budget (stores from before the column hold only such trials)."""
    return row.get(FIDELITY) is None or row[FIDELITY] >= 1.0


def confirm_candidates(rows: list[dict[str, Any]], top_k: int, objective: dict[str, Any],
                       references: Iterable[str] = (), budget: dict[str, Any] | None = None,
                       held: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The ``top_k`` best distinct searched schedules: completed search trials by score (ties as
    :func:`pick_best`), each training (:func:`training_key`, with the sweep's ``budget``) once, none that trains a
    reference's: those of the reference trials in ``rows`` and the keys ``references`` (the references a
    confirmation trains, whether or not the sweep trained them first).

    ``held``: the searched trials an earlier run of this confirmation confirmed; they stay candidates whatever
    the rule says now (a confirmation's candidates never change once it has run, so extending it only adds
    repeats), and the rest of ``top_k`` is filled around them.
    """
    # the references' own trials only: the candidates must not change once a confirmation has run
    seen = {_trains_as(r, budget) for r in rows
            if r["role"] in REFERENCE_ROLES and r["schedule"] and r.get("phase") != "confirm"} | set(references)
    from pgps_tune.space import over_voxel_budget

    done = [r for r in rows if r.get("phase") == "search" and r["role"] == "search" and r["completed"]
            and r["schedule"] and math.isfinite(r["score"]) and full_fidelity(r)
            and not over_voxel_budget(objective, r["schedule_voxel_fraction"])]  # never trained
    held = set(held)
    kept = list({r["trial_id"]: r for r in rows if r["trial_id"] in held and r.get("phase") != "confirm"
                 and r["role"] == "search"}.values())
    seen |= {_trains_as(r, budget) for r in kept}
    picked = []
    for r in sorted(done, key=rank_key):
        if len(kept) + len(picked) >= top_k:
            break
        if r["trial_id"] not in held and (key := _trains_as(r, budget)) not in seen:
            seen.add(key)
            picked.append(r)
    return sorted(kept + picked, key=rank_key)


def rank_key(r: dict[str, Any]) -> tuple[float, float, float]:
    """The order candidates are picked in: the best score first, then the cheaper, then the higher Dice."""
    return -r["score"], r["schedule_voxel_fraction"], -r["final_dice"]


def confirmation_summary(rows: list[dict[str, Any]], meta: dict[str, Any],
                         search_best: str | None = None) -> dict[str, Any] | None:
    """The evidence of the sweep's confirmation (``meta["confirmation"]``), or None without one.

    Per schedule: mean ± sd of the Dice, of the score and of each class's Dice over the repeats;
    per searched schedule and reference: the paired comparison of Dice on the shared repeats.
    The winner is the searched schedule with the best mean score (ties: fewer voxels);
    ``search_best`` (the search phase's best searched trial, ``best_searched``) tells whether the search
    picked it too (``search_winner_confirmed``).
    """
    from pgps_tune.stats import paired_comparison, spread, within_margin

    conf = meta.get("confirmation")
    if not conf:
        return None
    wanted = {json.dumps(c, sort_keys=True): c for c in conf["configs"]}
    kind = conf["repeat"]
    repeats = sorted({c[kind] for c in wanted.values()})
    trials: dict[str, dict[Any, dict[str, Any]]] = {}
    for r in rows:
        config = wanted.get(r["params"]) if r.get("phase") == "confirm" else None
        if config is not None:
            slot = trials.setdefault(config["candidate"], {})
            if config[kind] not in slot or (r["completed"] and not slot[config[kind]]["completed"]):
                slot[config[kind]] = r
    schedules: dict[str, dict[str, Any]] = {}
    values: dict[str, list[float]] = {}
    for config in wanted.values():
        name = config["candidate"]
        if name in schedules:
            continue
        got = trials.get(name, {})
        done = [got[k] if k in got and got[k]["completed"] else None for k in repeats]
        values[name] = [r["final_dice"] if r else math.nan for r in done]
        per_class: dict[str, list[float]] = {}
        for r in done:
            for cls, v in json.loads(r["dice_per_class"]).items() if r else ():
                per_class.setdefault(cls, []).append(v if isinstance(v, int | float) else math.nan)
        finished = [r for r in done if r]
        schedules[name] = {
            "role": config["role"], "params": {k: v for k, v in config.items() if k not in (*CONFIRM_KEYS, "role")},
            "trials": len(repeats), "completed": len(finished),
            "dice": spread(values[name]).to_dict(), "score": spread([r["score"] if r else math.nan
                                                                    for r in done]).to_dict(),
            "dice_per_class": {cls: spread(v).to_dict() for cls, v in sorted(per_class.items())},
            "dice_by_" + kind: dict(zip(map(str, repeats), values[name])),
            "train_time_s": spread([r["train_time_s"] for r in finished]).mean,
            "schedule_voxel_fraction": finished[0]["schedule_voxel_fraction"] if finished else math.nan,
            "n_stages": finished[0]["n_stages"] if finished else 0,
        }
    references = reference_order(e["role"] for e in schedules.values())  # every one the confirmation trained
    objective = meta.get("objective") or {}
    within = objective.get("type") == "cheapest_within" and "baseline" in schedules
    for name, entry in schedules.items():
        if entry["role"] == "search":
            entry["vs"] = {role: paired_comparison(values[name], values[role]).to_dict()
                           for role in references if role in schedules}
            if within:  # cheapest_within's own question: within the tolerance of the baseline, not better
                entry["within_tolerance"] = within_margin(values[name], values["baseline"],
                                                          objective["tolerance"]).to_dict()
    # the most repeats completed first: a schedule whose other trials failed does not win on its lucky one
    searched = [n for n, e in schedules.items() if e["role"] == "search" and e["score"]["n"] > 0]
    winner = max(searched, key=lambda n: (schedules[n]["score"]["n"], schedules[n]["score"]["mean"],
                                          -schedules[n]["schedule_voxel_fraction"]), default=None)
    out = {"repeat": kind, "repeats": repeats, "epochs": conf["epochs"], "top_k": conf["top_k"],
           "experiments": conf["experiments"], "schedules": schedules, "winner": winner,
           **({"replaced": conf["replaced"]} if conf.get("replaced") else {})}  # earlier ones 'confirm' set aside
    if objective.get("type") == "cheapest_within" and schedules:  # the targets the scores were taken against
        tolerance = objective["tolerance"]
        out["tolerance"] = tolerance
        out[TARGET + kind] = {k: v - tolerance for k, v in schedules.get("baseline", {}).get("dice_by_" + kind,
                                                                                              {}).items()}
    out.update(_verdict(winner, schedules, search_best, kind, objective))
    out["question"] = confirmation_question(out, objective)
    if winner is None and TARGET + kind in out and not any(map(math.isfinite, out[TARGET + kind].values())) \
            and any(e["role"] == "search" and e["completed"] for e in schedules.values()):
        out["verdict"] = (f"the constant baseline completed no confirmation {kind}, so cheapest_within has no target "
                          "Dice to score the searched schedules against; there is no confirmed winner: confirm again "
                          "once its failure is fixed")
    return out


TARGET = "target_dice_by_"  # + seed or fold: a cheapest_within confirmation's target on each repeat


def scored_by_search_target(confirmation: dict[str, Any], objective: Any) -> bool:
    """Whether a stored ``cheapest_within`` confirmation (summary.json's, or a store cell's) was scored the way
    pgps-tune scored it before it had targets of its own: against the search's target Dice."""
    return (isinstance(objective, dict) and objective.get("type") == "cheapest_within"
            or objective == "cheapest_within") and not any(str(k).startswith(TARGET) for k in confirmation)


def search_target_note(sweep: str, folder: str) -> str:
    """The note for a confirmation :func:`scored_by_search_target`: what its scores mean and the export that
    rescores it."""
    return (f"the confirmation of sweep {sweep!r} was scored against its search's target Dice (the constant "
            "baseline's one run at the search's epochs), as pgps-tune did before each confirmation trial was scored "
            "against the baseline on the same seed or fold at the confirmation's epochs; rescore it with 'pgps-tune "
            f"export --experiment {folder} --out {folder}'")


def _verdict(winner: str | None, schedules: dict[str, dict[str, Any]], search_best: str | None,
             kind: str = "seed", objective: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain-words answer to the objective's question, and was the search right?  ``max_dice``: is the confirmed
    winner's Dice better than the constant baseline's; ``dice_under_budget``: is it, under the voxel budget;
    ``cheapest_within``: is it within the tolerance of the baseline's (:func:`pgps_tune.stats.within_margin`), at
    what share of the voxels.  ``objective_met`` holds the answer (for ``max_dice``, the Dice test's)."""
    from pgps_tune.space import over_voxel_budget

    objective = objective or {}
    if winner is None:
        text = ("no searched schedule completed its confirmation trials; there is no confirmed winner" if schedules
                else "the search left no schedule to confirm (no searched trial completed, or each one trains a "
                     "reference's schedule); there is no confirmed winner")
        return {"significantly_better_than_baseline": False, "objective_met": False, "verdict": text}
    base = schedules[winner].get("vs", {}).get("baseline")
    better = bool(base and base["significantly_better"])
    met = better
    if base is None or base["n"] == 0:
        text = (f"the confirmed winner {winner} and the constant baseline completed no {kind} in common, so they "
                f"are not compared; confirm again once the failed trials' cause is fixed")
    elif base["n"] == 1:
        text = (f"the confirmed winner {winner} and the constant baseline completed only one {kind} in common "
                f"({100 * base['mean_diff']:+.2f} Dice points), too few to test the difference; confirm with more "
                f"{kind}s")
    elif "within_tolerance" in schedules[winner]:
        met, text = _within_verdict(winner, schedules, kind)
    else:
        text = _better_verdict(winner, schedules, base, objective)
        if objective.get("type") == "dice_under_budget":
            met = better and not over_voxel_budget(objective, schedules[winner]["schedule_voxel_fraction"])
    return {"significantly_better_than_baseline": better, "objective_met": met, "verdict": text,
            "search_winner_confirmed": search_best == winner if search_best else None,
            **({"best_searched": search_best} if search_best else {})}


BETTER_TEST = "two-sided paired t-test; better when the whole 95% interval is above 0"


def shown_test(entry: dict[str, Any], role: str) -> dict[str, Any] | None:
    """The paired test a confirmation's table and figure show for a searched schedule against reference ``role``:
    the one its verdict uses.  Against the baseline of a ``cheapest_within`` sweep, the non-inferiority test
    (``within_tolerance``, :func:`pgps_tune.stats.within_margin`); else the two-sided "better" test (``vs``).
    A summary written before the first has only the second, as its verdict did."""
    if role == "baseline" and "within_tolerance" in entry:
        return entry["within_tolerance"]
    return entry.get("vs", {}).get(role)


def confirmation_question(conf: dict[str, Any], objective: dict[str, Any] | None) -> str:
    """Which question each column of a confirmation's paired tests answers, and by which test, in one sentence
    (summary.json's ``confirmation.question``, the note under the table on the terminal and the page): against
    the constant baseline the objective's question (``cheapest_within``: within the tolerance; else better Dice),
    against the other references better Dice.  Also of a summary written before ``question``, from its tests.

    >>> within = {"schedules": {"t1": {"role": "search", "vs": {"baseline": {}, "paper": {}},
    ...                                "within_tolerance": {"margin": 0.05}}}}
    >>> print(confirmation_question(within, {"type": "cheapest_within", "tolerance": 0.05}))
    vs baseline, cheapest_within's question: is Dice within the tolerance (5.00 points) of the constant baseline's? \
(one-sided paired t-test of the difference > -5.00 points at the 2.5% level; within when the whole 95% interval is \
above -5.00); vs paper: is Dice better? (two-sided paired t-test; better when the whole 95% interval is above 0)
    """
    objective = objective or {}
    kind = objective.get("type", "max_dice")
    searched = [e for e in conf["schedules"].values() if e["role"] == "search"]
    roles = reference_order({role for e in searched for role in e.get("vs", {})})
    within = next((e["within_tolerance"] for e in searched if "within_tolerance" in e), None)
    parts = []
    if within is not None:
        t = 100 * within["margin"]
        parts.append(f"vs baseline, cheapest_within's question: is Dice within the tolerance ({t:.2f} points) of the "
                     f"constant baseline's? (one-sided paired t-test of the difference > -{t:.2f} points at the 2.5% "
                     f"level; within when the whole 95% interval is above -{t:.2f})")
    elif "baseline" in roles and kind in ("max_dice", "dice_under_budget"):
        budget = f", under the voxel budget {objective['voxel_budget']:g}" if kind == "dice_under_budget" else ""
        parts.append(f"vs baseline, {kind}'s question: is Dice better than the constant baseline's{budget}? "
                     f"({BETTER_TEST})")
    rest = [role for role in roles if not parts or role != "baseline"]
    if rest:
        parts.append(f"vs {', '.join(rest)}: is Dice better? ({BETTER_TEST})")
    if within is None and kind == "cheapest_within" and "baseline" in roles:  # the verdict asked "better?" too
        parts[-1] += (" (a summary written before the confirmation tested cheapest_within's tolerance: rerun "
                      "'pgps-tune export' for that sweep to test it)")
    return "; ".join(parts)


def _better_verdict(winner: str, schedules: dict[str, dict[str, Any]], base: dict[str, Any],
                    objective: dict[str, Any]) -> str:
    """The verdict of ``max_dice`` and ``dice_under_budget``: is the winner's Dice better than the baseline's?"""
    from pgps_tune.space import over_voxel_budget

    test = (f"{100 * base['mean_diff']:+.2f} Dice points (95% interval {100 * base['ci_low']:+.2f} to "
            f"{100 * base['ci_high']:+.2f}, p = {base['p_value']:.3g}, {base['n']} pairs)")
    budget, cost = objective.get("voxel_budget"), schedules[winner]["schedule_voxel_fraction"]
    under = objective.get("type") == "dice_under_budget"
    if over_voxel_budget(objective, cost):  # retrained at the confirmation's epochs, its rounding can cost more
        return (f"the confirmed winner {winner} trains {cost:.3f}x the constant baseline's voxels at the "
                f"confirmation's budget, over the voxel budget {budget:g}, so it does not answer dice_under_budget "
                f"(it differs by {test} from the constant baseline); confirm at the search's epochs")
    size = f" ({cost:.2f}x the baseline's voxels, under the voxel budget {budget:g})" if under else ""
    if base["significantly_better"]:
        return f"the confirmed winner {winner}{size} beats the constant baseline by {test}"
    how = "is significantly worse, by" if base["significantly_worse"] else "differs by"
    others = [n for n, e in schedules.items()
              if n != winner and e.get("vs", {}).get("baseline", {}).get("significantly_better")]
    if others:  # a steadier schedule with a lower mean score: "no searched schedule is better" would be false
        return (f"the confirmed winner {winner}{size} (the best mean score) {how} {test} from the constant baseline, "
                f"while {', '.join(others)} {'is' if len(others) == 1 else 'are'} significantly better than it; "
                "confirm with more seeds or folds to choose between them")
    advice = "" if base["significantly_worse"] else ", or confirm with more seeds or folds, or a longer budget"
    if under:
        return (f"no searched schedule under the voxel budget {budget:g} is significantly better than the constant "
                f"baseline: the best, {winner} ({cost:.2f}x its voxels), {how} {test}; keep the constant schedule "
                f"where its full cost is affordable{advice}")
    return (f"no searched schedule is significantly better than the constant baseline: the best, {winner}, "
            f"{how} {test}; keep the constant schedule{advice}")


def _within_verdict(winner: str, schedules: dict[str, dict[str, Any]], kind: str) -> tuple[bool, str]:
    """The verdict of ``cheapest_within``: is the winner within the tolerance of the baseline on the paired
    repeats (:func:`pgps_tune.stats.within_margin`), and at what share of its voxels?"""
    w = schedules[winner]["within_tolerance"]
    cost = schedules[winner]["schedule_voxel_fraction"] / schedules["baseline"]["schedule_voxel_fraction"]
    margin = 100 * w["margin"]
    test = (f"{100 * w['mean_diff']:+.2f} Dice points (95% interval {100 * w['ci_low']:+.2f} to "
            f"{100 * w['ci_high']:+.2f}; one-sided paired t-test of {winner} - baseline + {w['margin']:g} > 0 at the "
            f"2.5% level, p = {w['p_value']:.3g}, {w['n']} pairs; within on {w['pairs_within']} of {w['n']} {kind}s)")
    if w["within"]:
        return True, (f"the confirmed winner {winner} is within the tolerance ({margin:.2f} Dice points) of the "
                      f"constant baseline at {cost:.2f}x its voxels: it differs by {test}")
    others = [n for n, e in schedules.items() if n != winner and e.get("within_tolerance", {}).get("within")]
    if others:
        return False, (f"the confirmed winner {winner} (the best mean score, {cost:.2f}x the baseline's voxels) is "
                       f"not shown to be within the tolerance ({margin:.2f} Dice points) of the constant baseline: it "
                       f"differs by {test}, while {', '.join(others)} {'is' if len(others) == 1 else 'are'}; confirm "
                       "with more seeds or folds to choose between them")
    short = w["ci_high"] < -w["margin"]  # the whole interval below the tolerance: more repeats will not help
    return False, (f"no searched schedule is shown to be within the tolerance ({margin:.2f} Dice points) of the "
                   f"constant baseline: the best, {winner} ({cost:.2f}x its voxels), "
                   f"{'falls short, by' if short else 'differs by'} {test}; keep the constant schedule"
                   + ("" if short else ", or confirm with more seeds or folds"))


def search_check(summary: dict[str, Any]) -> str | None:
    """Whether the search phase picked the confirmed winner, in words (None: it did, or there is nothing to say).

    The search's best trial (``search_best``) is ranked among the references too, so it can be the baseline:
    that is said, and the search is judged by its best searched trial (``confirmation.best_searched``; absent
    from summaries written before it, whose ``search_winner_confirmed`` compared the reference).

    >>> c = {"winner": "t1", "search_winner_confirmed": False, "best_searched": "t2"}
    >>> search_check({"confirmation": c, "search_best": {"trial_id": "b0", "role": "baseline"}})
    "the search phase's best trial, b0, is the baseline reference, and its best searched trial, t2, is not the \
confirmed winner"
    >>> search_check({"confirmation": c, "search_best": {"trial_id": "t2", "role": "search"}})
    "the search phase's best trial, t2, is not the confirmed winner"
    """
    conf, best = summary.get("confirmation") or {}, summary.get("search_best")
    if not conf.get("winner") or not isinstance(best, dict) or "trial_id" not in best:
        return None
    if best.get("role", "search") != "search":
        text = f"the search phase's best trial, {best['trial_id']}, is the {best['role']} reference"
        if conf.get("best_searched") and conf.get("search_winner_confirmed") is not None:
            verb = "is" if conf["search_winner_confirmed"] else "is not"
            text += f", and its best searched trial, {conf['best_searched']}, {verb} the confirmed winner"
        return text
    if conf.get("search_winner_confirmed") is False:
        return f"the search phase's best trial, {best['trial_id']}, is not the confirmed winner"
    return None


def schedule_of(row: dict[str, Any], where: str, fix: str = "rerun 'pgps-tune export' for that sweep") -> sch.Schedule:
    """The schedule a trial trained (its ``schedule`` column), refused in one line naming the trial, ``where``
    it is and ``fix``: a damaged cell is the table's problem, not a schedule file's."""
    source = f"trial {row['trial_id']} in {where}"
    try:
        data = loads_json(row["schedule"])
        return sch.Schedule.from_dict(data, source=source)
    except (ValueError, PgpsError) as exc:
        why = str(exc).removeprefix(f"{source}: ").split(" (regenerate it with")[0].split("; ")[0]
        raise PgpsError(f"{source} holds a damaged schedule ({why}); {fix}") from None


BEST_KEYS = ("trial_id", "role", "params", "final_dice", "score", "schedule_voxel_fraction", "train_time_s", "n_stages")


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any], best: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: counts, the best schedule (``best``, else :func:`pick_best`'s) and its gain over each reference
    the sweep trained (``gain_over_ROLE``: the baseline, the paper schedule and any other of ``search.references``).

    With a confirmation, ``best`` is the confirmed winner (its numbers the means over the
    repeats; ``search_best`` is the search phase's pick) and the gains are the paired means.
    """
    best = best or pick_best(rows)
    done = {r["role"]: r for r in rows if r["role"] != "search" and r["completed"] and r["phase"] != "confirm"}
    refs = {role: done[role] for role in reference_order(done)}  # every reference the sweep trained
    summary: dict[str, Any] = {
        "dataset": meta["dataset"], "sweep": meta["sweep"], "objective": meta["objective"],
        "trials": len(rows), "completed": sum(r["completed"] for r in rows),
        "stopped_early": sum(r["stopped_early"] for r in rows), "failed": sum(r["failed"] for r in rows),
        "best": None,
    }
    # the search's best may be a reference: whether the search was right asks of its best searched trial
    searched = _highest([r for r in rankable(rows) if r["role"] == "search"])
    confirmation = confirmation_summary(rows, meta, searched["trial_id"] if searched else None)
    if confirmation is not None:
        summary["confirmation"] = confirmation
        if best is not None:
            summary["search_best"] = {k: best[k] for k in BEST_KEYS}
        if confirmation["winner"] is not None:
            return {**summary, **_confirmed_best(rows, confirmation)}
    if best is None:
        return summary
    summary["best"] = {k: best[k] for k in BEST_KEYS}
    for role, ref in refs.items():
        summary[f"gain_over_{role}"] = {
            "dice_points": 100 * (best["final_dice"] - ref["final_dice"]),
            "dice_relative_pct": 100 * (best["final_dice"] / ref["final_dice"] - 1) if ref["final_dice"] else None,
            "time_ratio": best["train_time_s"] / ref["train_time_s"] if ref["train_time_s"] else None,
            "voxel_ratio": best["schedule_voxel_fraction"] / ref["schedule_voxel_fraction"],
            f"{role}_dice": ref["final_dice"],
        }
    return summary


def _confirmed_best(rows: list[dict[str, Any]], confirmation: dict[str, Any]) -> dict[str, Any]:
    """``best`` and ``gain_over_*`` of a summary from the confirmation: means over the repeats, paired gains."""
    schedules, winner = confirmation["schedules"], confirmation["winner"]
    w = schedules[winner]
    searched = next((r for r in rows if r["trial_id"] == winner), None)
    # the confirmation retrained the searched trial's config: it gives the schedule where the search's row is gone
    params = searched["params"] if searched else json.dumps(w["params"], sort_keys=True)
    out: dict[str, Any] = {"best": {
        "trial_id": winner, "role": "search", "params": params, "final_dice": w["dice"]["mean"],
        "score": w["score"]["mean"], "schedule_voxel_fraction": w["schedule_voxel_fraction"],
        "train_time_s": w["train_time_s"], "n_stages": w["n_stages"], "confirmed": True,
        "dice_sd": w["dice"]["sd"], "repeats": w["dice"]["n"]}}
    for role, test in w.get("vs", {}).items():
        if not test["n"]:  # no repeat both completed: nothing to compare (the verdict says so)
            continue
        ref = schedules[role]
        within = w.get("within_tolerance") if role == "baseline" else None  # cheapest_within's own test
        out[f"gain_over_{role}"] = {
            "dice_points": 100 * test["mean_diff"], "ci_low_points": 100 * test["ci_low"],
            "ci_high_points": 100 * test["ci_high"], "p_value": test["p_value"], "pairs": test["n"],
            "significantly_better": test["significantly_better"],
            **({"tolerance_points": 100 * within["margin"], "within_tolerance": within["within"],
                "within_p_value": within["p_value"]} if within else {}),
            "dice_relative_pct": 100 * (w["dice"]["mean"] / ref["dice"]["mean"] - 1) if ref["dice"]["mean"] else None,
            "time_ratio": w["train_time_s"] / ref["train_time_s"] if ref["train_time_s"] else None,
            "voxel_ratio": w["schedule_voxel_fraction"] / ref["schedule_voxel_fraction"]
            if ref["schedule_voxel_fraction"] else None,
            f"{role}_dice": ref["dice"]["mean"],
        }
    return out


def winner_row(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any] | None:
    """The trial whose schedule best_schedule.yaml holds: a completed trial of the confirmed winner in the
    confirmation the summary reports (``meta["confirmation"]``: its schedule at that confirmation's budget, not
    at the budget of one it replaced), else the search's best trial."""
    conf = summary.get("confirmation") or {}
    if conf.get("winner"):
        own = {json.dumps(c, sort_keys=True) for c in meta["confirmation"]["configs"]
               if c["candidate"] == conf["winner"]}
        return next(r for r in rows if r["phase"] == "confirm" and r["completed"] and r["params"] in own)
    return pick_best(rows)


def require_finished(meta: dict[str, Any], records: list[TrialRecord] = ()) -> None:
    """Refuse to export a sweep that an interrupt (or a crash) left unfinished."""
    unfinished = [t.trial_id for t in records if t.status not in FINISHED_STATUSES]
    if not meta["finished"] or unfinished:
        raise PgpsError(f"sweep {meta['sweep']} is not finished "
                        f"({sch.plural(len(unfinished), 'trial')} known unfinished); "
                        "complete it with the same 'pgps-tune tune' command plus --resume, then export")


# -- the Pareto front -----------------------------------------------------------------------------


def pick_rule(meta: dict[str, Any], pick: str | None = None) -> pareto.PickRule | None:
    """The pick rule of a ``pareto`` sweep: ``pick``, else the one its last ``export --pick`` recorded
    (:data:`PICK`), else its space's; None for a one-number objective."""
    objective = meta["objective"]
    if objective["type"] != "pareto":
        if pick is not None:
            raise PgpsError(f"--pick chooses among a Pareto front, but sweep {meta['sweep']} optimised "
                            f"{objective['type']}; leave out --pick (or run the sweep with objective type pareto)")
        return None
    if pick is not None:
        return pareto.parse_pick(pick, "--pick")
    if meta.get(PICK):
        return pareto.parse_pick(meta[PICK], f"sweep {meta['sweep']}: sweep.json {PICK}")
    return pareto.parse_pick(objective.get("pick", "knee"), f"sweep {meta['sweep']}: objective.pick")


def _point(row: dict[str, Any]) -> tuple[float, float]:
    """A completed trial's (Dice, voxel fraction); (nan, nan) for anything else, which no front holds
    (confirmation repeats included: they retrain schedules already on the plot)."""
    ok = row["completed"] and row["schedule"] and row.get("phase") != "confirm"
    return (row["final_dice"], row["schedule_voxel_fraction"]) if ok else (math.nan, math.nan)


def front_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials (references included) on the Dice / voxel-fraction front, cheapest first."""
    return [rows[i] for i in pareto.non_dominated([_point(r) for r in rows])]


def _parquet(table: pa.Table) -> Callable[[IO[bytes]], None]:
    return lambda fh: pq.write_table(table, fh)


def _text(text: str) -> Callable[[IO[bytes]], None]:
    return lambda fh: fh.write(text.encode("utf-8"))


def export_front(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], rule: pareto.PickRule
                 ) -> tuple[dict[Path, Callable[[IO[bytes]], None] | None], dict[str, Any] | None]:
    """The files of a Pareto front (pareto.parquet and pareto/TRIAL.yaml for each front schedule; ``None``:
    the file of a trial no longer on the front, to remove), and the row ``rule`` picks."""
    points = [_point(r) for r in rows]
    front = pareto.non_dominated(points)
    chosen = pareto.pick(points, rule)
    folder = out / PARETO_DIR
    files: dict[Path, Callable[[IO[bytes]], None] | None] = {}
    for r in (rows[i] for i in front):
        s = schedule_of(r, meta["sweep"])
        files[folder / f"{r['trial_id']}.yaml"] = _text(replace(s, meta={  # the recipe and the family stay
            **s.meta, **trainer_meta(r["params"]), "dataset": meta["dataset"], "objective": "pareto",
            "val_dice": r["final_dice"], "voxel_fraction": r["schedule_voxel_fraction"], "sweep": meta["sweep"],
            "trial_id": r["trial_id"], "role": r["role"], "space": meta["space"], **tuned_record(meta),
        }).to_yaml())
    for stale in folder.glob("*.yaml") if folder.is_dir() else ():
        files.setdefault(stale, None)
    table = pa.Table.from_pylist(
        [{**rows[i], "file": f"{PARETO_DIR}/{rows[i]['trial_id']}.yaml", "picked": i == chosen} for i in front],
        schema=SCHEMA.append(pa.field("file", pa.string())).append(pa.field("picked", pa.bool_())))
    files[out / PARETO] = _parquet(table)
    return files, None if chosen is None else rows[chosen]


def export_sweep(out: str | Path, meta: dict[str, Any], records: list[TrialRecord],
                 results_store: str | Path | None = None, pick: str | None = None,
                 origin: str | Path | None = None) -> dict[str, Any]:
    """(Re)write trials.parquet, best_schedule.yaml and summary.json, and add the sweep to the results store.

    Only a finished sweep is exported: an interrupted one would be stored as if its unfinished
    trials were its result.  A ``pareto`` sweep also writes its front (:func:`export_front`),
    and ``pick`` (else the space's ``objective.pick``) chooses its best schedule.  The files are
    replaced together (:func:`pgps_tune.errors.atomic_write_all`): a folder or a protected file in
    the way leaves every one of them as it was.  ``origin``: the sweep folder (default ``out``),
    which tells the store's sweeps of one name apart (:func:`store_sweep`).
    """
    require_finished(meta, records)
    rule = pick_rule(meta, pick)
    rows = trial_rows(records, meta)
    out = Path(out)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    files: dict[Path, Callable[[IO[bytes]], None] | None] = {out / TRIALS: _parquet(table)}
    if rule is not None:  # a pareto sweep: the rule picks from the front
        front_files, best = export_front(out, rows, meta, rule)
        files.update(front_files)
        summary = summarize(rows, meta, best)
        summary["pareto"] = {"pick": str(rule), "front": [r["trial_id"] for r in front_rows(rows)]}
    else:
        summary = summarize(rows, meta)
        best = winner_row(rows, summary, meta)
    files[out / BEST] = None  # a re-export must not leave an older sweep's winner
    if best is not None:
        s = schedule_of(best, meta["sweep"])
        s = replace(s, meta={  # the recipe the trial recorded stays with its schedule
            **s.meta, **trainer_meta(best["params"]), "dataset": meta["dataset"],
            "objective": meta["objective"]["type"], **({PICK: str(rule)} if rule is not None else {}),
            "score": best["score"], "val_dice": best["final_dice"], "sweep": summary["sweep"],
            "trial_id": best["trial_id"], "space": meta["space"], **tuned_record(meta),
            **{k: v for k, v in summary.items() if k.startswith("gain_over_")},
            **_confirmation_evidence(summary, best),
        })
        files[out / BEST] = _text(s.to_yaml())
    files[out / SUMMARY] = _text(strict_json(summary) + "\n")
    atomic_write_all(files)
    confirmed = confirmed_winner(summary, best) if best is not None else {}
    store_sweep(table, meta, results_store, origin or out,
                {confirmed["recipe_trial"]: confirmed} if confirmed else None, rule)
    return summary


def tuned_record(meta: dict[str, Any]) -> dict[str, Any]:
    """What an exported schedule keeps of the nnU-Net plans its sweep (sweep.json ``meta``) was tuned on
    (``nnunet``: :func:`pgps_tune.nnunet.tuned_on`), so that ``nnunet-train --schedule`` compares them with the
    plans it trains, as ``export --nnunet`` does; empty for a sweep on pgps-tune's own plan."""
    return {"nnunet": meta["nnunet"]} if isinstance(meta.get("nnunet"), dict) else {}


def same_tuned_data(was: dict[str, Any], here: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the data of two records of nnU-Net plans (:func:`pgps_tune.nnunet.tuned_on`) have one spacing, and
    one normalisation (where both records say theirs): a schedule scored on one was measured for the other."""
    spacing = all(math.isclose(float(a), float(b), rel_tol=1e-6) for a, b in zip(was["spacing"], here["spacing"]))
    norms = [r.get("normalization") if isinstance(r.get("normalization"), list) else None for r in (was, here)]
    return spacing, None in norms or norms[0] == norms[1]


def confirmed_winner(summary: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The confirmed winner's figures, as best_schedule.yaml's meta and 'pgps-tune best' give them (empty without
    a confirmed winner): ``trial_id`` the winner's searched trial (summary.json's ``best``), ``val_dice`` and
    ``score`` the means over the repeats, ``recipe_trial`` the confirmation trial ``row`` whose schedule and
    recipe the file holds, and ``confirmation`` what the means are over.  One winner, one Dice, everywhere."""
    conf = summary.get("confirmation")
    if not conf or not conf["winner"]:
        return {}
    w = conf["schedules"][conf["winner"]]
    return {"trial_id": conf["winner"], "recipe_trial": row["trial_id"], "val_dice": w["dice"]["mean"],
            "score": w["score"]["mean"], "confirmation": {
                "repeat": conf["repeat"], "repeats": conf["repeats"], "epochs": conf["epochs"], "dice": w["dice"],
                **{k: v for k, v in conf.items() if k.startswith(TARGET)}}}


def _confirmation_evidence(summary: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """What best_schedule.yaml carries of the confirmation: the winner's figures, its tests, the verdict."""
    out = confirmed_winner(summary, row)
    if out:
        w = summary["confirmation"]["schedules"][out["trial_id"]]
        conf = summary["confirmation"]
        out["confirmation"].update(dice_per_class=w["dice_per_class"], vs=w.get("vs", {}),
                                   **{k: w[k] for k in ("within_tolerance",) if k in w}, verdict=conf["verdict"],
                                   significantly_better_than_baseline=conf["significantly_better_than_baseline"],
                                   **{k: conf[k] for k in ("objective_met",) if k in conf})
    return out


# -- the results store -------------------------------------------------------------------------


ORIGIN = "origin"  # the resolved sweep folder a store partition came from; absent from stores written before it
# JSON of :func:`confirmed_winner` on the row of the trial a confirmed sweep exported (else empty): 'best' gives
# that sweep's winner the figures best_schedule.yaml and summary.json give it; absent from stores before it
CONFIRMED = "confirmed"
# JSON of sweep.json's ``nnunet`` (the nnU-Net plans the sweep was tuned on: :func:`tuned_record`), empty for a
# sweep on pgps-tune's own plan: 'best' writes it into its schedule's meta as export does; absent from stores before it
TUNED_ON = "nnunet"
STORE_KEYS = pa.schema([("dataset", pa.string()), ("sweep", pa.string())])  # the partition columns
PART = "part-0.parquet"  # a partition's one file


def _partition(root: Path, dataset: str, sweep: str) -> Path:
    """The folder of one sweep's rows, named as pyarrow's hive partitioning names it (values URI-escaped)."""
    expr = (pc.field("dataset") == dataset) & (pc.field("sweep") == sweep)
    return root / pads.partitioning(STORE_KEYS, flavor="hive").format(expr)[0]


def _parts(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.parquet") if not f.name.startswith((".", "_")))


def _holds_other_sweep(folder: Path, origin: str, trial_ids: set[str]) -> str | None:
    """Where the sweep stored in ``folder`` came from, if it is not the sweep of ``origin``; None if the folder
    is free or holds this sweep.  A partition written before origins were recorded holds this sweep when it
    shares trial ids with it (Tune's ids are random): that is how a re-export used to replace its rows."""
    for f in _parts(folder):
        fix = "move it out of the store, then export again"
        try:
            t = read_parquet(f, (ORIGIN, "trial_id"), f"results store file {f}", fix)
        except (OSError, pa.ArrowException) as exc:
            raise PgpsError(f"results store file {f} is not readable Parquet ({brief(exc)}); "
                            f"{fix}") from None
        names = t.schema.names
        stored = {str(v) for v in t[ORIGIN].to_pylist() if v} if ORIGIN in names else set()
        ids = set(t["trial_id"].to_pylist()) if "trial_id" in names else set()
        if stored and origin and stored != {origin}:
            return ", ".join(sorted(stored))
        if not (stored and origin) and not ids & trial_ids:
            return ", ".join(sorted(stored)) or "a sweep with other trials"
    return None


def check_store_writable(store: str | Path | None) -> None:
    """Refuse, before a sweep trains anything, a results store it could not add its rows to at the end:
    a file, or a folder (or its nearest existing parent) that is not writable (a read-only file system)."""
    root = store_root(store).absolute()
    _refuse_file_store(root)
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PgpsError(f"cannot write the results store {root} ({existing} is not writable); set --results-store "
                        "or PGPS_RESULTS_DIR to a writable folder")


def store_sweep(table: pa.Table, meta: dict[str, Any], store: str | Path | None, origin: str | Path | None = None,
                confirmed: dict[str, dict[str, Any]] | None = None, rule: pareto.PickRule | None = None) -> Path:
    """Add (or replace) one sweep's rows in the store, partitioned by dataset and sweep; returns the partition.

    ``confirmed``: the confirmed winner's figures (:func:`confirmed_winner`) by the trial id of the row that
    carries them (column :data:`CONFIRMED`).  ``rule``: the pick rule a pareto sweep's export used (column
    :data:`PICK`), which 'pgps-tune best' applies again.

    ``origin`` (the sweep folder) tells sweeps of one name apart: a re-export of the same sweep replaces its
    rows, while another sweep of that name (``runs/demo`` of another project) goes to ``NAME-HASH`` of its
    origin, and a note says so.  The partition's file is replaced atomically (a temporary file, then a
    rename): a kill or a full disk leaves the rows stored before.
    """
    root = store_root(store)
    origin = str(Path(origin).resolve()) if origin else ""
    n = table.num_rows
    table = table.append_column("objective", pa.array([meta["objective"]["type"]] * n, pa.string()))
    table = table.append_column("final_patch", pa.array([json.dumps(meta["final_patch"])] * n, pa.string()))
    table = table.append_column(SPACE_KEY, pa.array([str(meta.get(SPACE_KEY, ""))] * n, pa.string()))
    table = table.append_column(ORIGIN, pa.array([origin] * n, pa.string()))
    confirmed = confirmed or {}
    table = table.append_column(CONFIRMED, pa.array([strict_json(confirmed[t], indent=None) if t in confirmed else ""
                                                     for t in table["trial_id"].to_pylist()], pa.string()))
    table = table.append_column(PICK, pa.array([str(rule) if rule is not None else ""] * n, pa.string()))
    tuned = tuned_record(meta).get("nnunet")
    table = table.append_column(TUNED_ON, pa.array([strict_json(tuned, indent=None) if tuned else ""] * n,
                                                   pa.string()))
    _refuse_file_store(root)
    name = meta["sweep"]
    folder = _partition(root, meta["dataset"], name)
    other = _holds_other_sweep(folder, origin, set(table["trial_id"].to_pylist()))
    if other is not None:
        tag = origin or json.dumps(sorted(table["trial_id"].to_pylist()))
        name = f"{name}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
        folder = _partition(root, meta["dataset"], name)
        print(f"pgps-tune: note: the results store already holds a sweep {meta['sweep']!r} of dataset "
              f"{meta['dataset']!r} from {other}; this one ({origin or 'no folder given'}) is stored as {name!r}",
              file=sys.stderr)
    try:
        atomic_write(folder / PART, lambda fh: pq.write_table(table, fh))
        for stale in _parts(folder):  # e.g. part-1.parquet of an older pyarrow writer
            if stale.name != PART:
                stale.unlink()
    except (OSError, PgpsError) as err:  # atomic_write names the OSError of its own steps
        exc = os_cause(err)
        why = exc.strerror if exc is not None and exc.strerror else brief(exc or err, 200)
        raise PgpsError(
            f"cannot write the results store {root} ({why}); the rows "
            "stored before are kept; free space, or set PGPS_RESULTS_DIR or --results-store to a writable folder"
        ) from None
    return folder


def _store_files(root: Path) -> list[Path]:
    """The store's Parquet files; anything else in it is refused, naming the file."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if name.startswith((".", "_")):
                continue  # hidden and temporary files, as pyarrow itself skips them
            path = Path(dirpath) / name
            layout = (len(rel) == 2 and rel[0].startswith("dataset=") and rel[1].startswith("sweep=")
                      and name.endswith(".parquet"))
            if not layout:
                raise PgpsError(f"results store {root} holds {path}, which is not one of its tables "
                                "(dataset=NAME/sweep=NAME/part-N.parquet); move that file out of the store")
            files.append(path)
    return files


def stored_datasets(store: str | Path | None = None) -> list[str]:
    """The datasets the store holds sweeps of, from its folder names alone (no table is read)."""
    root = store_root(store)
    partitioning = pads.partitioning(STORE_KEYS, flavor="hive")
    return sorted({pads.get_partition_keys(partitioning.parse(f.relative_to(root).as_posix())).get("dataset")
                   for f in _store_files(root)} - {None}) if root.is_dir() else []


def load_store(store: str | Path | None = None, dataset: str | None = None) -> pa.Table:
    """Every stored trial, with its ``dataset``, ``sweep``, ``space_key``, ``origin``, ``nnunet`` (the plans its sweep
    was tuned on, as JSON; empty where none, or where a file predates them) and ``confirmed`` (null where a file
    predates it: :func:`settle_confirmed` derives it).

    ``dataset``: only that dataset's trials; the other datasets' folders are neither read nor checked (a store of
    many sweeps answers a question about one dataset in the time of its own rows).

    The JSON columns are not parsed here: a reader checks those of the rows it uses with
    :func:`check_stored_rows` before it reads them."""
    root = store_root(store)
    if not root.exists():
        raise PgpsError(f"results store {root} does not exist yet; run a sweep first")
    if not root.is_dir():
        raise PgpsError(f"results store {root} is a file; give the store's folder (--results-store or "
                        "PGPS_RESULTS_DIR)")
    files = _store_files(root)
    if not files:
        raise PgpsError(f"results store {root} holds no sweeps yet; run a sweep first")
    schema = pa.unify_schemas([SCHEMA, pa.schema([("objective", pa.string()), ("final_patch", pa.string())]),
                               pa.schema([(SPACE_KEY, pa.string()), (ORIGIN, pa.string()), (CONFIRMED, pa.string()),
                                          (PICK, pa.string()), (TUNED_ON, pa.string())])])
    partitioning = pads.partitioning(STORE_KEYS, flavor="hive")
    tables, size = [], 0
    for f in files:
        keys = pads.get_partition_keys(partitioning.parse(f.relative_to(root).as_posix()))
        if dataset is not None and keys.get("dataset") != dataset:
            continue
        fix = "move it out of the store, or rerun 'pgps-tune export' for its sweep"
        try:
            t = read_parquet(f, schema.names, f"results store file {f}", fix)
        except (OSError, pa.ArrowException) as exc:
            raise PgpsError(f"results store file {f} is not readable Parquet ({brief(exc)}); "
                            f"{fix}") from None
        missing = [c for c in STORE_COLUMNS if c not in t.schema.names and c not in LATER_COLUMNS]
        if missing:
            raise PgpsError(f"results store file {f} lacks columns {missing}; it was not written by pgps-tune: "
                            "move it out of the store")
        size += t.nbytes
        if size > MAX_STORE_BYTES:
            raise PgpsError(f"results store {root} holds more than {MAX_STORE_BYTES >> 20} MiB of trials (reading "
                            f"{f}); move sweeps you no longer compare out of it, or give another --results-store")
        try:  # a column a file lacks (LATER_COLUMNS, SPACE_KEY, ORIGIN, CONFIRMED, PICK, TUNED_ON) reads as null;
            # FIDELITY 1
            columns = [t[c].cast(field.type) if c in t.schema.names else pa.nulls(len(t), field.type)
                       for c, field in zip(schema.names, schema)]
        except (pa.ArrowException, ValueError) as exc:
            raise PgpsError(f"results store file {f} is damaged ({brief(exc)}); move it "
                            "out of the store, then rerun 'pgps-tune export' for its sweep") from None
        columns += [pa.array([keys.get(k)] * len(t), pa.string()) for k in STORE_KEYS.names]
        tables.append(pa.Table.from_arrays(columns, schema=pa.unify_schemas([schema, STORE_KEYS])))
        _check_stored(tables[-1], f.parent)
    if not tables:  # no sweep of ``dataset``: an empty table of the store's columns
        tables = [pa.Table.from_pylist([], schema=pa.unify_schemas([schema, STORE_KEYS]))]
    table = pa.concat_tables(tables).select([*STORE_COLUMNS, "dataset", "sweep", SPACE_KEY, ORIGIN, CONFIRMED, PICK,
                                             TUNED_ON])
    table = table.set_column(table.schema.get_field_index(FIDELITY), FIDELITY, pc.fill_null(table[FIDELITY], 1.0))
    for column in (SPACE_KEY, ORIGIN, PICK, TUNED_ON):
        table = table.set_column(table.schema.get_field_index(column), column, pc.fill_null(table[column], ""))
    return table


STORE_FIX = "move that folder out of the store, or rerun 'pgps-tune export' for its sweep"


def _check_stored(table: pa.Table, folder: Path) -> None:
    """Refuse, naming ``folder`` and the trial, a stored sweep whose confirmed winner, pick rule, final patch or
    nnU-Net record is not what pgps-tune writes there (every reader after :func:`load_store` trusts them).  Each
    distinct cell is read once: a sweep stores its final patch, nnU-Net record and (pareto) rule on every row, a
    confirmed sweep its winner on one.  The JSON columns of the rows a reader uses are checked by
    :func:`check_stored_rows`."""
    for column, valid, what in ((CONFIRMED, _valid_confirmed, "is not the confirmed winner's figures pgps-tune "
                                 "writes there"), (PICK, _valid_pick, "is not a pick rule"),
                                ("final_patch", _valid_patch, "is not a final patch (a JSON list of 3 sizes)"),
                                (TUNED_ON, _valid_tuned, "is not the record of nnU-Net plans pgps-tune writes there")):
        cells = pc.fill_null(table[column], "")
        for text in pc.unique(cells).to_pylist():
            if (text or column == "final_patch") and not valid(text):  # only the final patch is never empty
                trial = table["trial_id"].filter(pc.equal(cells, text))[0].as_py()
                shown = f" {brief(text)!r}" if column != CONFIRMED else ""
                raise PgpsError(f"results store folder {folder}: trial {trial}'s {column} column{shown} {what}; "
                                f"{STORE_FIX}")


def _valid_patch(text: str) -> bool:
    """Whether a store cell of column ``final_patch`` is what :func:`store_sweep` writes ('best' prints it)."""
    try:
        return _ints(loads_json(text))
    except ValueError:
        return False


def _valid_tuned(text: str) -> bool:
    """Whether a store cell of column :data:`TUNED_ON` is a record :func:`store_sweep` writes (sweep.json's
    ``nnunet``: an object naming at least the configuration, its spacing 3 positive numbers where recorded)."""
    try:
        on = loads_json(text)
    except ValueError:
        return False
    return isinstance(on, dict) and isinstance(on.get("configuration"), str) and (
        "spacing" not in on or valid_spacing(on["spacing"]))


def check_stored_rows(rows: list[dict[str, Any]], store: str | Path | None,
                      read: Callable[[str, str, Any], None] | None = None) -> None:
    """Refuse, naming its folder and trial, a stored row of ``rows`` (:func:`load_store`'s) whose JSON columns do
    not decode to what pgps-tune writes (:func:`check_json_columns`).  Only the rows a reader goes on to use are
    checked: parsing every cell of a dataset's 100,000 rows took most of the time of 'best'.  ``read``: as for
    :func:`check_json_columns`."""
    root = store_root(store)
    by_sweep: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_sweep.setdefault((r["dataset"], r["sweep"]), []).append(r)
    for (dataset, name), stored in by_sweep.items():
        check_json_columns(stored, f"results store folder {_partition(root, dataset, name)}", STORE_FIX, read)


def _valid_confirmed(text: str) -> bool:
    """Whether a store cell of column :data:`CONFIRMED` is what :func:`confirmed_winner` writes."""
    try:
        c = loads_json(text)
    except ValueError:
        return False
    return (isinstance(c, dict) and set(c) == {"trial_id", "recipe_trial", "val_dice", "score", "confirmation"}
            and isinstance(c["trial_id"], str) and isinstance(c["recipe_trial"], str)
            and all(isinstance(c[k], (int, float)) and not isinstance(c[k], bool) and math.isfinite(c[k])
                    for k in ("val_dice", "score"))
            and isinstance(c["confirmation"], dict))


def comparable_as(row: dict[str, Any], trained: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """What a stored score is comparable with: the budget its trial trained (epochs x iterations per epoch, and
    a time limit), its data and split (for nnU-Net's trials, the spacing and normalisation of nnU-Net's data:
    column :data:`TUNED_ON`), and its final patch; two scores mean the same only where all agree.
    ``trained``: :func:`trained_as` by schedule text, where the caller has it (its schedule is not parsed again)."""
    text = row["schedule"] or "null"
    on = trained[text] if trained is not None and text in trained else trained_as(json.loads(text))
    return {**on, "data": on["data"] + _nnunet_data(row.get(TUNED_ON) or ""),
            "final patch": "x".join(map(str, json.loads(row["final_patch"])))}


def _nnunet_data(text: str) -> str:
    """The nnU-Net data a stored sweep's trials trained (``budget.trainer: nnunet``), as its record (column
    :data:`TUNED_ON`, checked by load_store) gives them: 3d_lowres and 3d_fullres of one patch train other data;
    empty for pgps-tune's trainer (its recipe gives its data) and where not recorded."""
    on = loads_json(text) if text else None
    if not (isinstance(on, dict) and on.get("trainer") == "nnunet" and valid_spacing(on.get("spacing"))):
        return ""
    norm = on.get("normalization")
    shown = f" ({'/'.join(map(str, norm))})" if isinstance(norm, list) else ""
    return f", nnU-Net's data at spacing {spacing_text(on['spacing'])}{shown}"


def trained_as(schedule: dict[str, Any] | None) -> dict[str, str]:
    """The budget and data of a stored trial's schedule (parsed), as :func:`comparable_as` compares them."""
    s = schedule or {}
    recipe = s.get("recipe") or {}
    train, data = recipe.get("train") or {}, recipe.get("data") or {}
    budget = (f"{sum(st['epochs'] for st in s.get('stages', []))} epochs x "
              f"{train.get('iterations_per_epoch', '?')} iterations")
    if train.get("max_train_seconds"):
        budget += f" within {train['max_train_seconds']:g} s"
    shape = data.get("synthetic_shape")
    on = (f"{data.get('source', '?')}" + (f" ({data.get('synthetic_cases')} cases of {'x'.join(map(str, shape))})"
                                           if shape else "")
          + f", split {data.get('val_fraction', '?')}/{data.get('split_seed', '?')}"
          + (f", spacing {'x'.join(f'{v:g}' for v in data['spacing'])}" if data.get("spacing") else ""))
    return {"budget": budget, "data": on}


def incomparable_note(rows: list[dict[str, Any]], best: dict[str, Any],
                      trained: dict[str, dict[str, str]] | None = None) -> str | None:
    """One line naming the ranked sweeps whose budget, data or final patch differ from the winner's (None: all
    alike), so that ``best`` never compares scores of different things silently.  ``trained``: as for
    :func:`comparable_as`."""
    won = comparable_as(best, trained)
    differ: dict[str, set[str]] = {}
    seen: dict[tuple[str, str, str], set[str]] = {}  # a schedule text many rows share is read once
    for r in rows:
        if (text := (r["schedule"], r["final_patch"], r.get(TUNED_ON) or "")) not in seen:
            seen[text] = {k for k, v in comparable_as(r, trained).items() if v != won[k]}
        if keys := seen[text]:
            differ.setdefault(r["sweep"], set()).update(keys)
    if not differ:
        return None
    shown = [f"{name} ({', '.join(k for k in won if k in keys)})" for name, keys in sorted(differ.items())]
    more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    return (f"the winner, sweep {best['sweep']!r} ({won['budget']}, final patch {won['final patch']}, data "
            f"{won['data']}), was ranked with sweeps of another budget, data or final patch, whose scores do not "
            f"compare: {'; '.join(shown[:5])}{more}; rank comparable sweeps only with --sweep NAME (repeatable)")


def best_schedule(dataset: str, store: str | Path | None = None, objective: str = "max_dice",
                  sweeps: Sequence[str] = (), pick: str | None = None) -> sch.Schedule:
    """The best completed schedule for ``dataset`` over every stored sweep (or the ``sweeps`` named) with
    ``objective``; a note on stderr names the ranked sweeps that differ from the winner's in budget, data or
    final patch (:func:`incomparable_note`).  ``sweeps`` may also be one sweep's name.

    For ``pareto``, the schedule the pick rule ``pick`` chooses from the front of the ranked trials, as a
    pareto sweep's export chooses its best_schedule.yaml: the highest Dice alone would be the front's most
    expensive end, whatever the sweep exported.  Without ``pick``, the rule the ranked sweeps were exported
    with (:func:`recorded_pick`), so that ``best --sweep NAME`` gives NAME's best_schedule.yaml."""
    if not isinstance(dataset, str):
        raise PgpsError(f"dataset must be a dataset's name as the store spells it, got {dataset!r}")
    if pick is not None and objective != "pareto":
        raise PgpsError(f"--pick chooses from a Pareto front, but --objective is {objective}; give --objective "
                        "pareto, or leave out --pick")
    rule = pareto.parse_pick(pick) if pick is not None else None
    sweeps = (sweeps,) if isinstance(sweeps, str) else tuple(sweeps)  # "demo" is one sweep, not four
    t = load_store(store, dataset)
    known = stored_datasets(store)
    if dataset not in known:  # names are matched exactly: "Hippo" and "hippo" can be two datasets
        alike = [d for d in known if d.lower() == dataset.lower()]
        if alike:
            raise PgpsError(f"the store has no dataset {dataset!r}, but has {', '.join(map(repr, alike))} (names "
                            "are matched exactly, case included); give --dataset as the store spells it")
    t, unsettled = settle_confirmed(t, dataset, store)
    for note in unsettled:
        print(f"pgps-tune: note: {note}", file=sys.stderr, flush=True)
    if sweeps:
        stored = sorted(set(t.filter(pc.equal(t["dataset"], dataset))["sweep"].to_pylist()))
        unknown = [s for s in sweeps if s not in stored]
        if unknown:
            raise PgpsError(f"the store holds no sweep {unknown[0]!r} of dataset {dataset!r}; give --sweep as one of "
                            f"{', '.join(stored) or '(none)'}")
        t = t.filter(pc.is_in(t["sweep"], value_set=pa.array(list(sweeps), pa.string())))
    mask = pc.and_(pc.and_(pc.equal(t["dataset"], dataset), pc.equal(t["objective"], objective)), t["completed"])
    candidates = t.filter(mask).to_pylist()
    trained: dict[str, dict[str, str]] = {}  # each schedule text's budget and data, read as it is checked
    alike: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}  # one copy of each (a sweep's rows share it)

    def read(column: str, text: str, value: Any) -> None:
        if column == "schedule":
            on = trained_as(value)
            trained[text] = alike.setdefault(tuple(on.items()), on)

    check_stored_rows(candidates, store, read)
    ranked = stored_ranking(candidates)
    for r in ranked:  # a confirmed winner's score stored before confirmations had targets of their own
        if r.get(CONFIRMED) and scored_by_search_target(json.loads(r[CONFIRMED])["confirmation"], objective):
            print(f"pgps-tune: note: {search_target_note(r['sweep'], r[ORIGIN] or 'SWEEP_DIR')}", file=sys.stderr,
                  flush=True)
    if objective == "pareto" and rule is None:
        rule = recorded_pick(ranked)
    if rule is None:
        best = _highest(ranked)
    else:
        chosen = pareto.pick([_point(r) for r in ranked], rule)
        best = None if chosen is None else ranked[chosen]
    if best is None:
        used = sorted(set(t.filter(pc.equal(t["dataset"], dataset))["objective"].to_pylist()) - {None})
        if used and objective not in used:
            raise PgpsError(f"no trials of dataset {dataset!r} with objective {objective!r} in the store; its sweeps "
                            f"used: {', '.join(used)}")
        raise PgpsError(f"no completed '{objective}' trials for dataset {dataset!r} in the store; known: {known}")
    note = incomparable_note(ranked, best, trained)
    if note:
        print(f"pgps-tune: note: {note}", file=sys.stderr, flush=True)
    dataset = best["dataset"]  # as the sweep stored it
    s = schedule_of(best, f"results store folder {_partition(store_root(store), best['dataset'], best['sweep'])}",
                     "move that folder out of the store, or rerun 'pgps-tune export' for its sweep")
    return replace(s, meta={
        **s.meta, **trainer_meta(best["params"]), "dataset": dataset, "objective": objective,
        **({PICK: str(rule)} if rule is not None else {}), "score": best["score"],
        "val_dice": best["final_dice"], "sweep": best["sweep"], "trial_id": best["trial_id"],
        **({"nnunet": json.loads(best[TUNED_ON])} if best[TUNED_ON] else {}),  # as export's, for nnunet-train
        **json.loads(best[CONFIRMED] or "{}"),
    })


def recorded_pick(rows: list[dict[str, Any]]) -> pareto.PickRule:
    """The pick rule the stored pareto sweeps of ``rows`` were exported with (column :data:`PICK`); ``knee`` for
    sweeps stored before the rule was, and where the sweeps' rules differ, with a note naming them and the fix."""
    used: dict[str, set[str]] = {}
    for r in rows:
        if r.get(PICK):
            used.setdefault(r[PICK], set()).add(r["sweep"])
    if len(used) == 1:
        return pareto.parse_pick(next(iter(used)))
    if used:
        shown = "; ".join(f"{rule} ({', '.join(sorted(names))})" for rule, names in sorted(used.items()))
        print(f"pgps-tune: note: the ranked pareto sweeps were exported with different pick rules, {shown}: their "
              "front is picked by knee; give --pick RULE, or --sweep NAME for one sweep's", file=sys.stderr, flush=True)
    return pareto.PickRule("knee")


def settle_confirmed(table: pa.Table, dataset: str, store: str | Path | None = None) -> tuple[pa.Table, list[str]]:
    """``table`` (:func:`load_store`'s) with column :data:`CONFIRMED` filled in for the sweeps of ``dataset`` stored
    before it (null there), from their confirmation trials as the export fills it in: 'best' then ranks an older
    confirmed sweep by its winner, not by its search trial.  Also a note for each sweep whose rows cannot tell
    (the trials of confirmations at two budgets or repeat kinds): it is ranked by its search trials, and the
    note names the export that updates the store.  ``store``: where ``table`` was read (named by the refusal of a
    damaged row: :func:`check_stored_rows`)."""
    cells = table[CONFIRMED].to_pylist()
    old: dict[tuple[str, str], list[int]] = {}
    for i, (d, name, cell) in enumerate(zip(table["dataset"].to_pylist(), table["sweep"].to_pylist(), cells)):
        if cell is None and d == dataset:
            old.setdefault((d, name), []).append(i)
    notes = []
    for (_, name), rows_at in sorted(old.items()):
        rows = table.take(rows_at).to_pylist()
        check_stored_rows(rows, store)
        derived = _stored_confirmation(rows)
        if derived is None:
            folder = next((r[ORIGIN] for r in rows if r[ORIGIN]), "") or "SWEEP_DIR"
            notes.append(f"sweep {name!r} was stored before pgps-tune stored confirmed winners, and its rows hold "
                         "trials of more than one confirmation: it is ranked by its search trials; update the store "
                         f"with 'pgps-tune export --experiment {folder} --out {folder}'")
            derived = [""] * len(rows)
        for i, cell in zip(rows_at, derived):
            cells[i] = cell
    table = table.set_column(table.schema.get_field_index(CONFIRMED), CONFIRMED, pa.array(cells, pa.string()))
    return table, notes


def _stored_confirmation(rows: list[dict[str, Any]]) -> list[str] | None:
    """The :data:`CONFIRMED` cells of one stored sweep's ``rows``, as its export writes them; None where the
    confirmation trials' settings (their params) are not those of one confirmation."""
    configs = [json.loads(r["params"] or "null") for r in rows if r["phase"] == "confirm"]
    if not configs:
        return [""] * len(rows)
    if not all(isinstance(c, dict) and isinstance(c.get("candidate"), str) and isinstance(c.get("role"), str)
               for c in configs):
        return None
    kind = next((k for k in reversed(REPEAT_KEYS) if all(isinstance(c.get(k), int) for c in configs)), None)
    if kind is None or len({json.dumps([c.get(k) for k in ("epochs", "folds", "splits")]) for c in configs}) != 1:
        return None
    meta = {"confirmation": {"configs": configs, "repeat": kind, "top_k": 0, "epochs": configs[0].get("epochs"),
                             "experiments": []}}
    conf = confirmation_summary(rows, meta)
    summary = {"confirmation": conf}
    if not conf or not conf["winner"]:
        return [""] * len(rows)
    figures = confirmed_winner(summary, winner_row(rows, summary, meta))
    return [strict_json(figures, indent=None) if r["trial_id"] == figures["recipe_trial"] else "" for r in rows]


def stored_ranking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored trials 'pgps-tune best' ranks: those :func:`rankable` of each sweep, except that a sweep whose
    confirmation chose a winner is represented by that winner alone, with its means over the repeats (column
    :data:`CONFIRMED`): the schedule, Dice and score its best_schedule.yaml and summary.json give."""
    confirmed = {r["sweep"]: r for r in rows if r.get(CONFIRMED)}
    out = [r for r in rankable(rows) if r["sweep"] not in confirmed]
    for r in confirmed.values():
        c = json.loads(r[CONFIRMED])
        out.append({**r, "final_dice": c["val_dice"], "score": c["score"]})
    return out


def stored_trials(dataset: str, space_key: str, final_patch: list[int], store: str | Path | None = None,
                  exclude_sweep: str | None = None, exclude_origins: Sequence[str] = (),
                  tuned: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Completed searched trials of ``dataset`` from earlier sweeps of the same space (``tune --warm-start``).

    Same space means the same :meth:`pgps_tune.space.SearchSpace.key` (parameters, objective and
    budget) and the same final patch, so their scores mean what this sweep's will.  A sweep's own rows
    are left out by their ``origin`` (``exclude_origins``: its folder, and the folder it was copied from),
    whatever name the store gave them (``NAME-HASH`` when another sweep had the name first); only rows
    stored before origins were recorded are told by their sweep name (``exclude_sweep``).

    ``tuned``: this sweep's nnU-Net record (sweep.json's ``nnunet``).  Where its trials train nnU-Net's data
    (``budget.trainer: nnunet``, which the key holds but not the plans), the trials of sweeps recorded on other
    data (another spacing or normalisation: 3d_lowres beside 3d_fullres, of one patch and network) are left out:
    their scores were measured on other data.  Rows stored before the record are kept.
    """
    try:
        t = load_store(store, dataset)
    except PgpsError as exc:
        raise PgpsError(f"--warm-start: {exc}") from None
    mask = pc.and_(pc.and_(pc.equal(t["dataset"], dataset), pc.equal(t[SPACE_KEY], space_key)),
                   pc.and_(t["completed"], pc.equal(t["role"], "search")))
    mask = pc.and_(mask, pc.equal(t["final_patch"], json.dumps(list(final_patch))))
    mask = pc.and_(mask, pc.greater_equal(t[FIDELITY], 1.0))  # a compressed rung's score is not a full run's
    # a confirmation repeat (role search too) is another seed or fold, maybe at other epochs: not a search's score
    mask = pc.and_(mask, pc.fill_null(pc.not_equal(t["phase"], "confirm"), True))
    own = pc.is_in(t[ORIGIN], value_set=pa.array([str(o) for o in exclude_origins if o], pa.string()))
    if exclude_sweep is not None:  # a row without an origin: its name is all that tells whose it is
        own = pc.or_(own, pc.and_(pc.equal(t[ORIGIN], ""), pc.equal(t["sweep"], exclude_sweep)))
    mask = pc.and_(mask, pc.invert(own))
    other = _other_data(t.filter(mask)[TUNED_ON], tuned)
    mask = pc.and_(mask, pc.invert(pc.is_in(t[TUNED_ON], value_set=pa.array(sorted(other), pa.string()))))
    found, seen = [], set()
    candidates = t.filter(mask).to_pylist()
    check_stored_rows(candidates, store)
    for r in candidates:  # a sweep and a copy of it stored beside it hold the same trials: once
        if (key := (r["trial_id"], r["params"], r["score"])) not in seen:
            seen.add(key)
            found.append(r)
    if not found:
        shown = "; ".join(sorted(other.values()))
        also = (f" on these data (those of {shown} trained nnU-Net's data at another spacing or normalisation)"
                if other else "")
        raise PgpsError(f"--warm-start: the results store {store_root(store)} holds no "
                        f"completed trials of dataset {dataset!r} with this space and budget (key {space_key}){also}; "
                        "run a sweep of it first, or leave out --warm-start")
    return found


def _other_data(cells: pa.ChunkedArray, tuned: dict[str, Any] | None) -> dict[str, str]:
    """The stored nnU-Net records among ``cells`` (column :data:`TUNED_ON`) of trials that trained nnU-Net's data
    other than ``tuned``'s (:func:`same_tuned_data`), each with the configuration it names; none where ``tuned``
    is not a record of nnU-Net's trials (pgps-tune's trainer prepares its own data whatever the configuration)."""
    if not (isinstance(tuned, dict) and tuned.get("trainer") == "nnunet" and valid_spacing(tuned.get("spacing"))):
        return {}
    other = {}
    for text in pc.unique(cells).to_pylist():
        on = loads_json(text) if text else None  # checked by load_store
        if isinstance(on, dict) and valid_spacing(on.get("spacing")) and not all(same_tuned_data(on, tuned)):
            other[text] = f"{on['configuration']} of {on.get('plans_name') or on.get('plans')}"
    return other
