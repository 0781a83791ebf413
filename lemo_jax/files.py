"""Atomic file writes: a reader, a crash or a second process never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Calls `write(handle)` on a temporary file beside `path`, then renames it to `path`.

    The rename is atomic on POSIX within one file system, which is why the temporary file lives
    in the same directory. Its name is unique (`mkstemp`), so processes writing the same path at
    once each rename a whole file of their own. On any error the temporary file is removed and
    the error re-raised.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def is_temporary(path: Path) -> bool:
    """Whether `path` is a `write_atomically` temporary: being written, or left by a crash."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda handle: handle.write(text.encode()))
