"""What the command-line tools share: option parsing helpers, logging, signals."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pynsqd import log as logging_setup
from pynsqd.flags import parse_bool, parse_duration


def version_line(app: str) -> str:
    from pynsqd import NSQ_VERSION

    from .. import __version__

    return f"{app} v{NSQ_VERSION}-compatible (built w/pynsqd-client-{__version__})"


def configure_logging(app: str, level: str) -> None:
    logging_setup.configure(app=app, prefix=f"[{app}] ", level=level)
    # the client library logs through the standard library, as a library should
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{app}] %(asctime)s %(levelname)s: %(message)s", "%Y/%m/%d %H:%M:%S"))
    client_log = logging.getLogger("pynsqd.client")
    client_log.addHandler(handler)
    client_log.setLevel(logging_setup.LEVELS[level])


def parse_opts(items: list[str], allowed: dict[str, Any]) -> dict[str, Any]:
    """``--consumer-opt=name,value`` (go-nsq's syntax) or ``name=value`` into
    keyword arguments, converted to the type of the field's default."""
    out: dict[str, Any] = {}
    for item in items:
        sep = "," if "," in item else "="
        name, found, text = item.partition(sep)
        name = name.strip()
        if not found or name not in allowed:
            raise ValueError(f"unknown option {item!r} (known: {', '.join(sorted(allowed))})")
        default = allowed[name]
        if isinstance(default, bool):
            value: Any = parse_bool(text)
        elif isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = parse_duration(text) if text[-1:].isalpha() else float(text)
        else:
            value = text
        out[name] = value
    return out


async def until_signal(on_signal: Callable[[], Awaitable[None]], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Call ``on_signal`` at the first SIGINT/SIGTERM; a second one exits at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            break

        async def second_signal() -> None:
            async for _ in signals:
                raise KeyboardInterrupt

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_signal)
            await on_signal()
            nursery.cancel_scope.cancel()


def run_tool(main: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run for a command-line tool: Ctrl-C exits 130, a closed stdout 0."""
    try:
        return trio.run(main, *args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
