"""Every exception the client raises on purpose.

All derive from :class:`ClientError`, so ``except ClientError`` catches
anything the library reports (and lets the caller's own exceptions, which
always come out of a Reader's or Writer's ``async with`` block as
themselves, pass).
"""

from __future__ import annotations

import os
import socket

NON_FATAL_ERRORS = frozenset({"E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"})


class ClientError(Exception):
    """Base class of the client's exceptions."""


class NSQError(ClientError):
    """nsqd answered with an error frame (or a name was refused before
    sending): ``code`` is nsqd's, e.g. ``E_BAD_TOPIC``, ``E_BAD_MESSAGE``."""

    def __init__(self, code: str, description: str = "") -> None:
        super().__init__(f"{code} {description}".strip())
        self.code = code
        self.description = description

    @property
    def fatal(self) -> bool:
        """nsqd closes the connection after every error but FIN/REQ/TOUCH failures."""
        return self.code not in NON_FATAL_ERRORS

    @classmethod
    def from_frame(cls, data: bytes) -> NSQError:
        code, _, description = data.decode(errors="replace").partition(" ")
        return cls(code, description)


class ConnectionClosed(ClientError):
    """The connection went away before nsqd answered."""


class HandshakeError(ClientError):
    """nsqd did not accept the connection (IDENTIFY, TLS/compression upgrade,
    AUTH or SUB)."""


class PublishError(ClientError):
    """No nsqd accepted a publish within ``publish_timeout``; the message
    names the last error (an error frame, a lost connection, or why nsqd
    could not be reached), which is also ``__cause__``."""


class NotRunningError(ClientError, RuntimeError):
    """A Writer was used before it was started or after it stopped."""


class AlreadyResponded(ClientError):
    """FIN or REQ was already sent for this message."""


class BackgroundTaskError(ClientError):
    """One of a Reader's or Writer's own tasks failed (a bug, not something
    the caller did); the original exception is ``__cause__``."""


def describe(exc: BaseException) -> str:
    """One line for a log or an error message: the cause that generic
    wrappers (anyio's "All connection attempts failed") hide, and the same
    words for a system error on every backend ("[Errno 111] Connection refused")."""
    if isinstance(exc, OSError) and not exc.errno and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    if isinstance(exc, socket.gaierror):
        return str(exc)  # resolver codes are not errnos: strerror() has no words for them
    if isinstance(exc, OSError) and exc.errno:
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text
