"""The one error type users see, and atomic file writes.

Every problem a user can fix (bad data, bad schedule, bad flags) is raised as
:class:`PgpsError` with a one-line message that names the problem and the fix;
the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import numbers
import os
import re
import signal
import stat
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then hand each one that came to the handler that was
    in place before (main thread only; blocks nest).

    Both signals, because either stops a command (SIGTERM raises where the program is, as Ctrl-C does): a
    file half-replaced, or a checkpoint written but not yet counted as saved, is what either would leave.
    The signal goes to the command's own handler, not a bare KeyboardInterrupt: train then stops at its next
    iteration with the new checkpoint counted, and a sweep stops as for that signal.  A handler that Python
    did not install (None) is left alone, so its signal is not held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    previous = {s: signal.signal(s, hold) for s in STOP_SIGNALS if signal.getsignal(s) is not None}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):  # each signal once, in the order they came; its handler runs here
            signal.raise_signal(s)


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
    a Ctrl-C or SIGTERM is held until the write is complete (:func:`stop_signals_held`), so
    no temporary file is left behind.
    The file gets normal permissions: the umask's for a new file, the old mode for a
    replaced one.
    """
    path = Path(path)
    with stop_signals_held():
        tmp = _staged(path, write)
        try:
            _replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def os_cause(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: ``err`` itself, or the one :func:`atomic_write` names in its
    one-line error (for callers whose message says more: what is kept, what to rerun); None for another."""
    cause = err.__cause__ if isinstance(err, PgpsError) else err
    return cause if isinstance(cause, OSError) else None


def brief(exc: BaseException | str, limit: int = 160) -> str:
    """What an exception says, in at most about ``limit`` characters of one line, for a one-line error.

    Its first non-empty line, spaces collapsed; a longer one keeps its start and its end (where
    libraries put the cause: ``... curlCode: 6, Couldn't resolve host name``) around ``...``, cut
    at spaces; an exception that says nothing gives its type's name.

    >>> brief(OSError("When reading information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION "
    ...               "during HeadObject operation: curlCode: 6, Couldn't resolve host name"), 100)
    "When reading information for key 'x' in bucket ... curlCode: 6, Couldn't resolve host name"
    >>> brief(KeyError()), brief(ValueError("\\n  two   words\\nsecond line"))
    ('KeyError', 'two words')
    """
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    line = next((x for x in lines if x), "") or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    if len(line) <= limit:
        return line
    half = max(8, (limit - 5) // 2)
    head, tail = line[:half], line[-half:]
    head = head.rsplit(" ", 1)[0] if " " in head[1:] else head
    tail = tail.split(" ", 1)[1] if " " in tail[:-1] else tail
    return f"{head} ... {tail}"


def _why(exc: OSError) -> str:
    return exc.strerror or brief(exc)


def _check_target(path: Path, writable: bool = False) -> None:
    """Refuse, in one line, a target with a folder in its place, or a FIFO, socket or device (a rename would put
    a file in place of ``/dev/null`` itself), and with ``writable``, a file that is not writable (read-only, or
    one the system protects, ``chattr +i``), before anything is written."""
    if path.is_dir() and not path.is_symlink():
        raise PgpsError(f"cannot replace {path}: it is a folder; move it away, then run the command again")
    refuse_special(path)
    if writable and path.exists() and not os.access(path, os.W_OK):
        raise PgpsError(f"cannot replace {path}: the file is not writable (read-only or immutable); make it "
                        "writable or move it away, then run the command again")


def refuse_special(path: Path, what: str = "") -> None:
    """Refuse an output ``path`` (``what`` names it: "--out X") that is a FIFO, a socket or a device, which pgps-tune
    writes only as whole files replaced by a rename (a link to one counts as one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there (or not reachable): the write itself says why
        return
    kind = special_kind(mode)
    if kind is not None:
        raise PgpsError(f"cannot write {what or path}: it is {kind}, not a regular file; give the name of a file "
                        "(pgps-tune writes whole files and replaces them)")


def special_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` is where it is neither a regular file nor a folder ("a FIFO", "a device", ...)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")


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
    with stop_signals_held():
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


def lock_holder(path: Path) -> str | None:
    """Who holds the :func:`folder_lock` file ``path`` now (its pid, host and start), or None when no one does.

    Probes without waiting and lets go at once; a missing file or a file system without locks reads as free.
    """
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return " ".join(path.read_text(errors="replace").split())[:120] or "starting"
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


@contextlib.contextmanager
def folder_lock(out: Path, name: str, in_use: str, keep: Callable[[], bool], command: str = "",
                unwritable: str = "give a writable --out") -> Iterator[None]:
    """Hold the lock file ``out/name`` for the block, or refuse in one line (``in_use``, given the holder) while
    another process holds it: one command at a time writes a run or sweep folder.  ``command`` names the
    holder's command in the file, where several commands share the lock; ``unwritable`` is the fix when the
    file cannot be written (for a command without --out, not that flag).

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
        raise PgpsError(f"cannot write the lock file {path} ({exc.strerror or type(exc).__name__}); "
                        f"{unwritable}") from None
    try:
        os.ftruncate(fd, 0)
        who = f"{command}, " if command else ""
        os.write(fd, f"{who}pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
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
    """The bytes of the file ``what`` names ("space file x.yaml") as :func:`read_file` reads them, refused in
    one line when it is missing, a folder, not a regular file, unreadable or over ``limit`` bytes."""
    try:
        return read_file(path, limit)
    except FileNotFoundError:
        raise PgpsError(f"{what} does not exist; {missing_hint}") from None
    except IsADirectoryError:
        raise PgpsError(f"{what} is a folder; give a file") from None
    except NotRegular as exc:
        raise PgpsError(f"{what} is not a regular file ({exc.kind}); give a file") from None
    except OSError as exc:
        raise PgpsError(f"cannot read {what}: {exc.strerror or exc}") from None
    except TooLarge:
        raise PgpsError(f"{what} is larger than {limit >> 20} MiB; {too_big_hint}") from None


class TooLarge(ValueError):
    """A file longer than its reader accepts (:func:`read_at_most`); ``str()`` says the limit."""


class NotRegular(OSError):
    """A FIFO, a socket or a device where a file is read; ``kind`` names which."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", str(path))
        self.kind = kind


def read_at_most(fh: Any, limit: int) -> bytes:
    """All of the open binary file ``fh`` (a local file, a pyarrow stream), or :class:`TooLarge` once it has
    more than ``limit`` bytes.

    Only ``limit + 1`` bytes are ever read, a MiB at a time, so a file that claims gigabytes (a sparse file,
    a few bytes on disk, is read as zeros of any length) costs no more memory than the limit, and a small
    file no more than its size (one ``read(limit + 1)`` would allocate the whole limit).
    """
    chunks: list[bytes] = []
    got = 0
    while got <= limit and (chunk := fh.read(min(1 << 20, limit + 1 - got))):
        chunks.append(chunk)
        got += len(chunk)
    if got > limit:
        raise TooLarge(f"larger than {limit >> 20} MiB")
    return b"".join(chunks)


def open_regular(path: str | Path) -> IO[bytes]:
    """The regular file ``path`` opened for reading (binary; the caller closes it); ``OSError`` where it cannot
    be opened, :class:`NotRegular` (an ``OSError``) for a FIFO, a socket or a device (``/dev/zero``).

    The file is opened without blocking (opening a FIFO waits for a writer: a FIFO in a folder someone sent
    would hang the command) and its kind checked on the open file; a device is not even opened (opening one
    can act).
    """
    def refuse_unless_regular(mode: int) -> None:  # on the path before it is opened, then on the open file
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegular(Path(path), special_kind(mode) or "a special file")

    refuse_unless_regular(os.stat(path).st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # and should it change in between
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket (or a FIFO nobody could open)
            raise NotRegular(Path(path), "a socket or a FIFO") from None
        raise
    try:
        refuse_unless_regular(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`), read by :func:`read_at_most`:
    :class:`TooLarge` past ``limit`` bytes; ``OSError`` where it cannot be read, :class:`NotRegular` (an
    ``OSError``) for a FIFO, a socket or a device."""
    with open_regular(path) as fh:
        return read_at_most(fh, limit)


MAX_YAML_BYTES = 1 << 20  # space and schedule files are a few KiB
MAX_YAML_VALUES = 100_000  # after expanding aliases: a schedule of 1000 stages holds about 11,000
MAX_YAML_DEPTH = 50  # nesting; the files nest 4 deep

# YAML 1.2's core schema, the scalars pgps-tune's files are read with (PyYAML alone reads YAML 1.1, where
# `010` is 8, `1:30` is 90, `off` is false, `2024-01-31` a date and `1e-4` a string).  Plain scalars that
# are not one of these are strings.
_YAML_TAG = "tag:yaml.org,2002:"
_YAML_NULL = ("~", "null", "Null", "NULL", "")
_YAML_TRUE, _YAML_FALSE = ("true", "True", "TRUE"), ("false", "False", "FALSE")
_YAML_INT = r"[-+]?[0-9]+"  # decimal only; a leading zero is decimal too (010 is 10, as YAML 1.2 reads it)
_YAML_FLOAT = (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
# what YAML 1.1 reads as a number and 1.2 does not (or reads otherwise): hex, octal, binary, base 60, digits
# grouped by underscores.  Refused: whichever the writer meant, one of the two readers gets it wrong.
_YAML11_NUMBER = (r"[-+]?0[xX][0-9a-fA-F_]+|[-+]?0[oO]?[0-7_]*_[0-7_]*|[-+]?0[oObB][0-9_]+"
                  r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?|[-+]?[0-9][0-9_]*_[0-9_]*(?:\.[0-9_]*)?"
                  r"(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]*_[0-9_]*(?:[eE][-+]?[0-9]+)?")
_YAML11_TAG = "tag:pgps-tune:yaml-1.1-number"
# characters YAML allows in a file (PyYAML's own test): a pasted terminal colour code (ESC) or a NUL is not one
_YAML_UNPRINTABLE = r"[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]"


class _YamlRefused(Exception):
    """A YAML document pgps-tune does not read; ``str()`` says why, ``mark`` where."""

    def __init__(self, message: str, mark: Any = None) -> None:
        super().__init__(message)
        self.mark = mark


@functools.cache
def _yaml_classes() -> tuple[type, type]:
    """The Loader and Dumper of pgps-tune's YAML rules (built once, on first use: yaml is imported lazily)."""
    import yaml
    from yaml.composer import Composer
    from yaml.constructor import SafeConstructor
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.resolver import BaseResolver
    from yaml.scanner import Scanner

    class CoreResolver(BaseResolver):
        """YAML 1.2 core schema: null, true/false, decimal ints, floats (``1e-4`` included); no timestamps,
        no merge keys, no yes/no/on/off; YAML 1.1's other number forms get a tag of their own (refused)."""

    bool_re, null_re = "|".join(_YAML_TRUE + _YAML_FALSE), "|".join(map(re.escape, _YAML_NULL))
    numbers = (("int", _YAML_INT, "-+0123456789"), ("float", _YAML_FLOAT, "-+0123456789."))
    CoreResolver.yaml_implicit_resolvers = {}
    for tag, pattern, first in (("bool", bool_re, "tTfF"), *numbers, ("null", null_re, ["~", "n", "N", ""])):
        CoreResolver.add_implicit_resolver(_YAML_TAG + tag, re.compile(f"^(?:{pattern})$"), list(first))
    CoreResolver.add_implicit_resolver(_YAML11_TAG, re.compile(f"^(?:{_YAML11_NUMBER})$"), list("-+0123456789."))

    class CoreConstructor(SafeConstructor):
        """Builds only plain data: mappings (string or number keys, each once), lists, strings, numbers,
        true/false, null.  Any other tag (``!!binary``, ``!!timestamp``, ``!!python/...``, ``!!set``) is refused."""

        yaml_constructors = {
            _YAML_TAG + "str": SafeConstructor.construct_yaml_str,
            _YAML_TAG + "seq": SafeConstructor.construct_yaml_seq,
            _YAML_TAG + "map": SafeConstructor.construct_yaml_map,
        }

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            if node.tag == _YAML11_TAG:
                v = node.value.lower()
                form = ("a hex" if "x" in v else "a binary" if "b" in v else "a base-60" if ":" in v
                        else "an octal" if re.fullmatch(r"[-+]?0o?[0-7_]+", v) else "a digit-grouped")
                try:
                    old = yaml.safe_load(node.value)
                except (yaml.YAMLError, ValueError):
                    old = None
                old = f" (YAML 1.1: {old})" if isinstance(old, int | float) else ""
                raise _YamlRefused(f"{node.value} is {form} number, which YAML 1.1 and 1.2 read differently{old}; "
                                   "write it in plain decimal, or quote it for text", node.start_mark)
            if node.tag not in self.yaml_constructors:
                raise _YamlRefused(f"the tag {node.tag.replace(_YAML_TAG, '!!')} is not read; pgps-tune reads "
                                   "plain YAML only (mappings, lists, strings, numbers, true/false, null): remove "
                                   "the tag", node.start_mark)
            return super().construct_object(node, deep)

        def _scalar(self, node: Any, pattern: str, what: str) -> str:
            value = self.construct_scalar(node)
            if not re.fullmatch(pattern, value):
                raise _YamlRefused(f"{value!r} is not {what}", node.start_mark)
            return value

        def construct_yaml_null(self, node: Any) -> None:
            self._scalar(node, null_re, "null")

        def construct_yaml_bool(self, node: Any) -> bool:
            return self._scalar(node, bool_re, "true or false") in _YAML_TRUE

        def construct_yaml_int(self, node: Any) -> int:
            value = self._scalar(node, _YAML_INT, "a plain decimal integer")
            if len(value) > 100:  # Python refuses to convert past 4300 digits, and no setting needs 100
                raise _YamlRefused(f"an integer of {len(value)} digits is too long for any setting", node.start_mark)
            return int(value)

        def construct_yaml_float(self, node: Any) -> float:
            value = self._scalar(node, _YAML_FLOAT, "a number").lower()
            return float(value.replace(".inf", "inf").replace(".nan", "nan"))

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if not isinstance(node, yaml.MappingNode):
                raise _YamlRefused("expected a mapping", node.start_mark)
            mapping: dict[Any, Any] = {}
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    kind = "mapping" if isinstance(key_node, yaml.MappingNode) else "list"
                    raise _YamlRefused(f"a key is a {kind}; keys must be plain names", key_node.start_mark)
                key = self.construct_object(key_node, deep=deep)
                if key == "<<" and key_node.style is None:
                    raise _YamlRefused("merge keys (<<) are YAML 1.1 and not read; write the keys out",
                                       key_node.start_mark)
                if key in mapping:  # also 1 and 1.0, or true and 1: Python would keep one silently
                    first = lines[key] + 1
                    raise _YamlRefused(f"key {key!r} appears twice (also at line {first}); keep one",
                                       key_node.start_mark)
                lines[key] = key_node.start_mark.line
                mapping[key] = self.construct_object(value_node, deep=deep)
            return mapping

    for tag, build in (("null", CoreConstructor.construct_yaml_null), ("bool", CoreConstructor.construct_yaml_bool),
                       ("int", CoreConstructor.construct_yaml_int), ("float", CoreConstructor.construct_yaml_float)):
        CoreConstructor.yaml_constructors[_YAML_TAG + tag] = build

    class Loader(Reader, Scanner, Parser, Composer, CoreConstructor, CoreResolver):
        """Refuses deep nesting while composing (PyYAML's scanner slows quadratically with depth)."""

        depth = 0

        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)
            CoreConstructor.__init__(self)
            CoreResolver.__init__(self)

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise _YamlRefused(f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    class Dumper(yaml.SafeDumper):
        """PyYAML's safe dumper, quoting also the strings that YAML 1.2 (and so :func:`read_yaml`) would read
        as numbers (``"1e-4"``, ``"09"``): what pgps-tune writes, it and YAML 1.1 readers read back alike."""

    for tag, pattern, first in numbers:
        Dumper.add_implicit_resolver(_YAML_TAG + tag, re.compile(f"^(?:{pattern})$"), list(first))
    return Loader, Dumper


def did_you_mean(keys: Any, known: Any) -> str:
    """`` (did you mean 'epochs'?)`` where an unknown key (one, or the first of a list that has one) is a near
    miss of one of ``known``, else ``""``.

    >>> did_you_mean("epoch", ["patch_size", "batch_size", "epochs"]), did_you_mean(5, ["epochs"])
    (" (did you mean 'epochs'?)", '')
    >>> did_you_mean([1, "seed"], ["seeds", "folds"])
    " ('seed': did you mean 'seeds'?)"
    """
    import difflib

    several = isinstance(keys, list) and len(keys) > 1
    for key in keys if isinstance(keys, list) else [keys]:
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
        if close:
            return f" ({key!r}: did you mean {close[0]!r}?)" if several else f" (did you mean {close[0]!r}?)"
    return ""


def yaml_text(data: Any) -> str:
    """``data`` as YAML (block style, keys in order) that :func:`read_yaml` and YAML 1.1 readers read back alike.

    >>> print(yaml_text({"lr": 0.003, "note": "1e-4", "when": "off"}), end="")
    {lr: 0.003, note: '1e-4', when: 'off'}
    """
    import yaml

    return yaml.dump(data, Dumper=_yaml_classes()[1], sort_keys=False, default_flow_style=None)


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

    Every file pgps-tune reads as YAML (schedules, in YAML or JSON, and spaces) is read here, by one set of
    rules: YAML 1.2's core schema (``1e-4`` is a number, ``off`` and ``2024-01-31`` are strings, an integer
    is plain decimal: ``010`` is 10, and YAML 1.1's ``0x10``, ``1:30`` and ``1_000`` are refused), one
    document, plain data only (no tags), each key of a mapping once.  Untrusted input is bounded before
    it is built: at most :data:`MAX_YAML_BYTES` are read, :data:`MAX_YAML_DEPTH` levels of nesting and
    :data:`MAX_YAML_VALUES` values after alias expansion are accepted, so an alias bomb ("billion
    laughs") or a huge file is refused at once.
    """
    import yaml

    path = Path(path)
    what = f"{kind} file {path}"
    data = _read_bounded(path, MAX_YAML_BYTES, what, missing_hint, f"give a {kind} file, which is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PgpsError(f"{what} is not UTF-8 text; give a YAML or JSON {kind} file") from None
    bad = re.search(_YAML_UNPRINTABLE, text)
    if bad:  # PyYAML's own refusal names neither line nor column
        line, col = text.count("\n", 0, bad.start()) + 1, bad.start() - text.rfind("\n", 0, bad.start())
        raise PgpsError(f"{what} holds a control character ({ord(bad.group()):#04x}) at line {line}, column {col}; "
                        "remove it")
    loader = None
    try:
        loader = _yaml_classes()[0](text)
        node = loader.get_single_node()
        if node is None:
            raise PgpsError(f"{what} is empty (or holds only comments); give a {kind} file")
        if _yaml_values(node) > MAX_YAML_VALUES:
            raise PgpsError(f"{what} holds more than {MAX_YAML_VALUES} values once its aliases are "
                            f"expanded; a {kind} file needs far fewer (remove the repeated aliases)")
        return loader.construct_document(node)
    except _YamlRefused as exc:
        at = f", line {exc.mark.line + 1}" if exc.mark else ""
        raise PgpsError(f"{what}{at}: {exc}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or ""
        mark = getattr(exc, "problem_mark", None)
        if problem.startswith("but found another document"):
            raise PgpsError(f"{what} holds more than one YAML document (another starts at line {mark.line + 1}); "
                            "keep one (two files joined together?)") from None
        at = f" at line {mark.line + 1}" if mark else ""
        why = f" ({problem})" if problem else ""
        raise PgpsError(f"{what} is not valid YAML{at}{why}; fix the syntax") from None
    except ValueError as exc:  # an alias that contains itself
        raise PgpsError(f"{what} is not valid YAML ({exc}); fix the file") from None
    finally:
        if loader is not None:
            loader.dispose()


MAX_JSON_BYTES = 256 << 20  # dataset.json of a large nnU-Net set; Tune's state takes ~26 KB a trial: ~10,000 trials


MAX_JSON_DEPTH = 100  # nesting: dataset.json nests 3 deep, Tune's trial states about 10
# values, counted as the brackets and commas outside strings: dataset.json of 100,000 cases counts about
# 300,000, an nnU-Net split of them 1,000,000.  Parsed, "{}," (3 bytes, counted twice) takes 70 bytes: the
# limit keeps a file to a few hundred MiB of memory, where 256 MiB of "{},{},..." took 13 GiB
MAX_JSON_VALUES = 5_000_000


class JsonTooBig(ValueError):
    """A JSON document nested more than :data:`MAX_JSON_DEPTH` levels or holding more than
    :data:`MAX_JSON_VALUES` values: invalid JSON to pgps-tune, though Python's own parser may read it
    (a check that inspects what another reader will load must refuse it)."""


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _json_values_ok(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` holds at most ``limit`` values, told before it is parsed: each value but the
    first of a container follows a comma, each container opens with a bracket (counted outside strings only
    when the quick count over the whole text is too high)."""
    def count(t: str) -> int:
        return t.count("{") + t.count("[") + t.count(",")

    return count(text) <= limit or count(_JSON_STRING.sub('""', text)) <= limit


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
    """``json.loads`` that reports every malformed document as ``ValueError``, and refuses (:class:`JsonTooBig`)
    one nested more than :data:`MAX_JSON_DEPTH` levels deep or holding more than :data:`MAX_JSON_VALUES`
    values, the second before it is parsed.

    Python's parser recurses once per nesting level, so a document nested a few thousand
    levels deep (``[[[[...``, easy to craft, a few KiB) raises ``RecursionError`` instead of
    ``JSONDecodeError``; one nested a few hundred levels parses, and then any code that walks the
    value (formatting, dumping, searching it) recurses as deep.  Both are one more way to be
    invalid here, caught where invalid JSON is; no file pgps-tune reads nests anywhere near the limit.
    ``unique_keys``: an object naming a key twice is refused (:class:`DuplicateKey`), not read as its last.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # as json.loads does for UTF-8, the only encoding pgps-tune's files use
    if not _json_values_ok(text, MAX_JSON_VALUES):
        raise JsonTooBig(f"more than {MAX_JSON_VALUES:,} values, far more than any file pgps-tune reads holds")
    too_deep = f"nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise JsonTooBig(too_deep) from None
    # fewer brackets than the limit cannot nest deeper: most texts skip the walk (a store's 100,000 rows each)
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and not _json_depth_ok(value, MAX_JSON_DEPTH):
        raise JsonTooBig(too_deep)
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
