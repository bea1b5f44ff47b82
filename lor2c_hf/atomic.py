"""Atomic file writes: every file the library writes appears whole or not at all (temp file, fsync, rename)."""

from __future__ import annotations

import glob
import os
import stat
import tempfile
from typing import Callable

TMP_PREFIX = ".tmp-"  # atomic_write's temporary files; ones left by a killed save are removed by the next save


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: _write_text(tmp, text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then rename over `path`: a crash never leaves a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the rename makes them visible
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))  # mkstemp creates 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _new_file_mode(path: str) -> int:
    """The existing file's mode, or 0o666 minus the umask (read without changing it where Linux allows)."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the `.tmp-*` files a killed save left in `directory` (one process saves there at a time)."""
    stale = [p for p in glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*")) if os.path.isfile(p)]
    for path in stale:
        os.remove(path)
    return stale
