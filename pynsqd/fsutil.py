"""Small file-system steps the daemon's files share: atomic replacement
(tmp + fsync + rename + directory fsync, as nsqd writes nsqd.dat), fsync by
path, quiet unlink."""

from __future__ import annotations

import os
import random
from collections.abc import Callable


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old file or the new one."""
    tmp = f"{path}.{random.getrandbits(63)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str, fsync: Callable[[int], None] = os.fsync) -> None:
    """Make a directory's entries (new, renamed, removed files) durable."""
    fsync_path(path, missing_ok=False, fsync=fsync)


def fsync_path(path: str, missing_ok: bool = True, fsync: Callable[[int], None] = os.fsync) -> None:
    """fsync a file (or directory) by name; one already removed needs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: list[str], fds: list[int | None], fsync: Callable[[int], None] = os.fsync) -> None:
    """fsync files by name (those removed meanwhile need nothing), then by
    descriptor; the descriptors (dups taken for the sync) are closed whatever happens."""
    try:
        for path in paths:
            fsync_path(path, fsync=fsync)
        for fd in fds:
            if fd is not None:
                fsync(fd)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
