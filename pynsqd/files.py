"""Small file-system steps the daemon's state files share (nsqd.dat, the
deferral and dead-letter files beside the queues)."""

from __future__ import annotations

import os
import random


def write_atomically(path: str, data: bytes) -> None:
    """tmp + fsync + rename (+ fsync of the directory), as nsqd writes nsqd.dat."""
    tmp = f"{path}.{random.getrandbits(63)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path)


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path`` (a created or renamed file's entry)."""
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
