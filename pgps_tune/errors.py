"""The one error type users see, and atomic file writes.

Every problem a user can fix (bad data, bad schedule, bad flags) is raised as
:class:`PgpsError` with a one-line message that names the problem and the fix;
the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_temp(path)
        except OSError as exc:
            raise PgpsError(
                f"cannot write to {path.parent}: {exc.strerror or exc}; choose a writable output folder"
            ) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_yaml(path: str | Path, kind: str, missing_hint: str) -> Any:
    """Parse a YAML (or JSON) file, turning every failure into a one-line :class:`PgpsError`."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PgpsError(f"{kind} file {path} does not exist; {missing_hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PgpsError(f"cannot read {kind} file {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PgpsError(f"{kind} file {path} is not valid YAML{at}; fix the syntax") from None
