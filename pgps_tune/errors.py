"""The one error type users see, and atomic file writes.

Every problem a user can fix (bad data, bad schedule, bad flags) is raised as
:class:`PgpsError` with a one-line message that names the problem and the fix;
the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


class PgpsError(Exception):
    """A user-fixable problem; ``str(err)`` is the one-line message."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename.

    A crash or Ctrl-C at any point leaves either the old file or the new one,
    never a torn one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
