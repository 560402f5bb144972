"""structlog set up the way the daemons log: one event per line on stderr.

Text lines keep nsqd's shape (``[nsqd] 2006/01/02 15:04:05.000000 INFO: ...``)
with the event's fields appended as key=value, because harnesses grep for
``TCP: listening on``; ``--log-format=json`` emits one JSON object per line.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any, TextIO

import structlog

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "fatal": 50, "critical": 50}
_LEVEL_TEXT = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "warn": "WARNING", "error": "ERROR", "critical": "FATAL", "fatal": "FATAL"}


def _format_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in " \"=\n"):
        return json.dumps(text)
    return text


class TextRenderer:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        msg = event.pop("event", "")
        level = _LEVEL_TEXT.get(method, method.upper())
        event.pop("level", None)
        ts = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")
        fields = " ".join(f"{k}={_format_value(v)}" for k, v in event.items())
        return f"{self.prefix}{ts} {level}: {msg}" + (f" {fields}" if fields else "")


class JSONRenderer:
    def __init__(self, app: str) -> None:
        self.app = app

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        out = {
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            "level": _LEVEL_TEXT.get(method, method.upper()).lower(),
            "app": self.app,
        }
        out.update(event)
        return json.dumps(out, default=str)


def configure(*, app: str = "nsqd", prefix: str | None = None, level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """(Re)configure logging; called at start and by ``PUT /config/log_level``."""
    renderer: Any = JSONRenderer(app) if fmt == "json" else TextRenderer(prefix if prefix is not None else f"[{app}] ")
    structlog.configure(
        processors=[structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**fields: Any) -> Any:
    return structlog.get_logger().bind(**fields) if fields else structlog.get_logger()
