"""Small file-system helpers with no fact-ray dependencies: an advisory lock between processes of one host."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing) for the duration of the block. The kernel drops it when
    the holder dies, so a killed process never leaves it held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
