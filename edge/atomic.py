"""Crash-safe file replacement: a reader sees the old file or the new one, never a mix."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644, _hook=None) -> None:
    """Write to a temp file in the same folder, fsync it, rename over `path`, fsync the folder.

    `_hook(step)` is called between the steps ("written", "synced", "renamed") so the crash tests
    can kill the process at each of them."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if _hook:
                _hook("written")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if _hook:
            _hook("synced")
        os.replace(tmp, path)
        if _hook:
            _hook("renamed")
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
