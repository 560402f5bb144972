"""How the client logs: through the standard library's :mod:`logging`, like
any library, so the application decides what is shown and where.

Loggers are named after the modules (``pynsqd.client.reader``,
``pynsqd.client.writer``, ``pynsqd.client.conn``, ``pynsqd.client.sync_writer``);
``pynsqd.client`` has a :class:`logging.NullHandler`, so nothing is printed
until the application configures logging (``logging.basicConfig()`` prints
WARNING and above to stderr).  Each line starts with what it is about:
``[topic/channel]`` for a Reader, ``[writer]`` for a Writer, then the nsqd.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class Prefixed(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that starts every line with ``[prefix]``; the prefix is also
    on the record as ``nsq_context`` for structured handlers."""

    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        super().__init__(logger, {"nsq_context": prefix})
        self.prefix = prefix

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return f"[{self.prefix}] {msg}", kwargs

    def child(self, more: str) -> Prefixed:
        return Prefixed(self.logger, f"{self.prefix} {more}")


def get_logger(name: str, prefix: str) -> Prefixed:
    return Prefixed(logging.getLogger(name), prefix)
