"""Atomic file writes: a reader sees the old content or the new, never a mix, and a crash
leaves no half-written file behind (the one copy; every package writes through it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path | str) -> None:
    """Make a rename inside ``directory`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, the file created with ``mode`` from the start
    (a secret is never readable by others, not even briefly): a temporary file in the same
    folder, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str, mode: int = 0o600) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir"]
