"""The one error type users see, and atomic file writes.

Every problem a user can fix (bad data, bad schedule, bad flags) is raised as
:class:`PgpsError` with a one-line message that names the problem and the fix;
the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class PgpsError(Exception):
    """A user-fixable problem; ``str(err)`` is the one-line message."""


class DivergedError(PgpsError):
    """Training produced a non-finite loss (or gradient); the run cannot go on.

    Raised by the trainer at the first non-finite value. A sweep records the trial as
    failed with the reason ``diverged`` and never reports its score to ASHA or Optuna.
    """


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then raise it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create the temporary file beside ``path`` with the mode ``path`` should end up with.

    ``mkstemp`` would give 0600, which breaks a cache or results folder shared by a team:
    a new file gets 0666 less the umask (the kernel applies it to ``os.open``'s mode), and
    a file that is replaced keeps its own mode.
    """
    try:
        keep: int | None = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        keep = None
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        if keep is not None:
            try:
                os.fchmod(fd, keep)
            except OSError:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
        return fd, tmp


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename.

    A crash at any point leaves either the old file or the new one, never a torn one;
    a Ctrl-C is held until the write is complete, so no temporary file is left behind.
    The file gets normal permissions: the umask's for a new file, the old mode for a
    replaced one.
    """
    path = Path(path)
    with _ctrl_c_deferred():
        tmp = _staged(path, write)
        try:
            _replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc).splitlines()[0][:160] or type(exc).__name__


def _check_target(path: Path, writable: bool = False) -> None:
    """Refuse, in one line, a target with a folder in its place (and with ``writable``, a file that is not
    writable: read-only, or one the system protects, ``chattr +i``), before anything is written."""
    if path.is_dir() and not path.is_symlink():
        raise PgpsError(f"cannot replace {path}: it is a folder; move it away, then run the command again")
    if writable and path.exists() and not os.access(path, os.W_OK):
        raise PgpsError(f"cannot replace {path}: the file is not writable (read-only or immutable); make it "
                        "writable or move it away, then run the command again")


def _staged(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """The temporary file beside ``path``, written and synced (removed again if that fails)."""
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as exc:
        raise PgpsError(f"cannot write to {path.parent}: {_why(exc)}; choose a writable output folder") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a quota: the old file is still there
            raise PgpsError(f"cannot write {path}: {_why(exc)}; {path.name} was left as it was; free space or "
                            "choose another output folder") from exc
        raise
    return tmp


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        what = "it is a folder" if path.is_dir() else _why(exc)
        raise PgpsError(f"cannot replace {path}: {what}; move it away or make it writable, then run the command "
                        "again") from exc


def atomic_write_all(files: dict[Path, Callable[[IO[bytes]], None] | None]) -> None:
    """Replace several files as one: every target is checked and every new file written (to a temporary file
    beside it) before the first is renamed into place, so a folder in the way, a file that is not writable
    (read-only, immutable) or a full disk leaves all of them as they were.  ``None`` for a file removes it
    (last)."""
    with _ctrl_c_deferred():
        for path in files:
            _check_target(Path(path), writable=True)
        staged: list[tuple[Path, Path]] = []
        try:
            for path, write in files.items():
                if write is not None:
                    staged.append((_staged(Path(path), write), Path(path)))
            for tmp, path in staged:
                _replace(tmp, path)
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        for path, write in files.items():
            if write is None:
                try:
                    Path(path).unlink(missing_ok=True)
                except OSError as exc:
                    raise PgpsError(f"cannot remove {path}: {_why(exc)}; remove it by hand") from exc


@contextlib.contextmanager
def folder_lock(out: Path, name: str, in_use: str, keep: Callable[[], bool]) -> Iterator[None]:
    """Hold the lock file ``out/name`` for the block, or refuse in one line (``in_use``, given the holder) while
    another process holds it: one command at a time writes a run or sweep folder.

    An ``flock``: the kernel drops it however its holder ends (``kill -9`` included), so none is ever left
    stale, and on NFS it is an NFS lock.  The file names its holder (pid, host, start).  The file is removed
    at the end unless ``keep()`` (the folder holds something worth resuming), so a command refused on its
    inputs leaves the folder as it was.  A file system without locks runs with a warning.
    """
    import fcntl
    import socket

    path = out / name
    fd = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = " ".join(path.read_text(errors="replace").split())[:120] or "starting"
                raise PgpsError(in_use.format(holder=holder)) from None
            except OSError as exc:  # a file system without locks (some NFS mounts): run, and say so
                print(f"pgps-tune: warning: cannot lock {path} ({exc.strerror or type(exc).__name__}); nothing "
                      f"keeps a second command off {out}: run one at a time", file=sys.stderr, flush=True)
                break
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)  # removed by a holder that had just ended: lock the file there now
    except OSError as exc:
        raise PgpsError(f"cannot write the lock file {path} ({exc.strerror or type(exc).__name__}); give a "
                        "writable --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        yield
    finally:
        if not keep():
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _read_bounded(path: Path, limit: int, what: str, missing_hint: str, too_big_hint: str) -> bytes:
    """The bytes of the file ``what`` names ("space file x.yaml"), refused in one line when it is missing,
    a folder, unreadable or over ``limit`` bytes (only ``limit + 1`` are ever read, a MiB at a time: one
    ``read(limit + 1)`` would allocate the whole limit for every small file)."""
    chunks: list[bytes] = []
    got = 0
    try:
        with path.open("rb") as fh:
            while got <= limit and (chunk := fh.read(min(1 << 20, limit + 1 - got))):
                chunks.append(chunk)
                got += len(chunk)
    except FileNotFoundError:
        raise PgpsError(f"{what} does not exist; {missing_hint}") from None
    except IsADirectoryError:
        raise PgpsError(f"{what} is a folder; give a file") from None
    except OSError as exc:
        raise PgpsError(f"cannot read {what}: {exc.strerror or exc}") from None
    if got > limit:
        raise PgpsError(f"{what} is larger than {limit >> 20} MiB; {too_big_hint}")
    return b"".join(chunks)


MAX_YAML_BYTES = 1 << 20  # space and schedule files are a few KiB
MAX_YAML_VALUES = 100_000  # after expanding aliases: a schedule of 1000 stages holds about 11,000
MAX_YAML_DEPTH = 50  # nesting; the files nest 4 deep


def _yaml_values(root: Any) -> int:
    """How many values a composed YAML node holds once every alias is expanded.

    Aliases share nodes, so this counts each node once per use without building anything;
    it stops as soon as the count passes :data:`MAX_YAML_VALUES` (an alias bomb) and refuses
    an alias that contains itself.  Iterative, so a long chain of aliases cannot overflow the stack.
    """
    import yaml

    def children(node: Any) -> list[Any]:
        if isinstance(node, yaml.MappingNode):
            return [x for pair in node.value for x in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[key] > MAX_YAML_VALUES:
                return sizes[key]
        elif key not in sizes:
            if key in open_nodes:
                raise ValueError("an alias refers to a node that contains it")
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children(node) if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: str | Path, kind: str, missing_hint: str) -> Any:
    """Parse a YAML (or JSON) file, turning every failure into a one-line :class:`PgpsError`.

    Untrusted input is bounded before it is built: at most :data:`MAX_YAML_BYTES` are read,
    :data:`MAX_YAML_DEPTH` levels of nesting and :data:`MAX_YAML_VALUES` values after alias
    expansion are accepted, so an alias bomb ("billion laughs") or a huge file is refused at
    once; only plain YAML types are built.
    """
    import yaml

    path = Path(path)
    data = _read_bounded(path, MAX_YAML_BYTES, f"{kind} file {path}", missing_hint,
                         f"give a {kind} file, which is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PgpsError(f"{kind} file {path} is not UTF-8 text; give a YAML or JSON {kind} file") from None
    class Loader(yaml.SafeLoader):
        """Refuses deep nesting while composing (PyYAML's scanner slows quadratically with depth)."""

        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise ValueError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _yaml_values(node) > MAX_YAML_VALUES:
            raise PgpsError(f"{kind} file {path} holds more than {MAX_YAML_VALUES} values once its aliases are "
                            f"expanded; a {kind} file needs far fewer (remove the repeated aliases)")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PgpsError(f"{kind} file {path} is not valid YAML{at}; fix the syntax") from None
    except (ValueError, TypeError) as exc:  # a bad date, a self-containing alias, deep nesting
        raise PgpsError(f"{kind} file {path} is not valid YAML ({exc}); fix the file") from None
    finally:
        loader.dispose()


MAX_JSON_BYTES = 256 << 20  # dataset.json of a large nnU-Net set, a sweep's state: a few MiB at most


MAX_JSON_DEPTH = 100  # nesting: dataset.json nests 3 deep, Tune's trial states about 10


class JsonTooDeep(ValueError):
    """A JSON document nested more than :data:`MAX_JSON_DEPTH` levels: invalid JSON to pgps-tune, though
    Python's own parser may read it (a check that inspects what another reader will load must refuse it)."""


def _json_depth_ok(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests at most ``limit`` containers deep; iterative, so a deep value
    cannot overflow the stack while it is measured."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return False
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return True


class DuplicateKey(ValueError):
    """A JSON object names one key twice (``json.loads`` would keep the last value without a word)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(f"the key {key!r} appears twice in one object; keep one")
        seen[key] = value
    return seen


def loads_json(text: str | bytes, unique_keys: bool = False) -> Any:
    """``json.loads`` that reports every malformed document as ``ValueError``, and refuses one nested
    more than :data:`MAX_JSON_DEPTH` levels deep.

    Python's parser recurses once per nesting level, so a document nested a few thousand
    levels deep (``[[[[...``, easy to craft, a few KiB) raises ``RecursionError`` instead of
    ``JSONDecodeError``; one nested a few hundred levels parses, and then any code that walks the
    value (formatting, dumping, searching it) recurses as deep.  Both are one more way to be
    invalid here, caught where invalid JSON is; no file pgps-tune reads nests anywhere near the limit.
    ``unique_keys``: an object naming a key twice is refused (:class:`DuplicateKey`), not read as its last.
    """
    too_deep = f"nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise JsonTooDeep(too_deep) from None
    if not _json_depth_ok(value, MAX_JSON_DEPTH):
        raise JsonTooDeep(too_deep)
    return value


def read_json(path: str | Path, kind: str, hint: str, missing_hint: str | None = None) -> Any:
    """Parse a JSON file given to (or found by) pgps-tune, turning every failure into a one-line
    :class:`PgpsError` that names ``kind`` and the file and ends with ``hint`` (what to do), or with
    ``missing_hint`` where that is given and the file does not exist.

    At most :data:`MAX_JSON_BYTES` are read; a UTF-8 byte-order mark (as Windows editors write
    one) is accepted; a key given twice in one object is refused (which one was meant is unknown).
    """
    path = Path(path)
    data = _read_bounded(path, MAX_JSON_BYTES, f"{kind} {path}", missing_hint or hint,
                         f"more than such a file holds: {hint}")
    try:
        return loads_json(data.decode("utf-8-sig"), unique_keys=True)
    except UnicodeDecodeError:
        raise PgpsError(f"{kind} {path} is not UTF-8 text; {hint}") from None
    except DuplicateKey as exc:
        raise PgpsError(f"{kind} {path}: {exc}") from None
    except ValueError as exc:
        raise PgpsError(f"{kind} {path} is not valid JSON ({exc}); {hint}") from None


def _scalar(x: Any) -> Any:
    """``json.dumps`` default: numpy scalars (from a sampler, a search space) as Python numbers."""
    if hasattr(x, "dtype") and hasattr(x, "item") and getattr(x, "shape", None) == ():
        return x.item()
    raise TypeError(f"{type(x).__name__} is not plain data")


def strict_json(obj: Any, indent: int | None = 1) -> str:
    """JSON that every parser accepts: NaN and infinities become ``null``, numpy scalars plain numbers.

    >>> strict_json({"dice": float("nan"), "x": [1.0, float("inf")]}, indent=None)
    '{"dice": null, "x": [1.0, null]}'
    """

    def clean(x: Any) -> Any:
        if isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral):
            return float(x) if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False, default=_scalar)
