"""How an NSQ daemon process runs (nsqlookupd, nsqadmin): flags or exit as
Go does, ``--version``, logging set up, serve until SIGINT/SIGTERM, a listen
failure as one fatal line and exit code 1."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, Protocol, TypeVar

import trio

from . import log as logging
from . import version_string
from .flags import ParsedFlags, run_cli
from .listener import ListenError


T = TypeVar("T")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Daemon(Protocol):
    async def run(self, *, task_status: Any = ...) -> None: ...

    def shutdown(self) -> None: ...


def log_flag_warnings(parsed: ParsedFlags) -> None:
    """What parsing the flags and --config found worth saying (an unknown
    config key), once the daemon's logging is set up."""
    log = logging.get_logger()
    for warning in parsed.warnings:
        log.warning(warning)


@asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Any]:
    """A daemon serving in-process (tests, embedding) inside the block, shut
    down on exit."""
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.shutdown()


async def run_until_signal(body: Callable[[trio.CancelScope], Awaitable[T]]) -> T:
    """``await body(stop)``, where ``stop`` is cancelled by the first
    SIGINT/SIGTERM.  The signals are received from the start (an early one
    is a clean shutdown, not a KeyboardInterrupt) to the very end: a second
    one -- a supervisor's retry, Ctrl-C twice, a whole process group
    signalled -- is logged and ignored, never the default "die now" in the
    middle of writing the queues to disk."""
    log = logging.get_logger()
    stop = trio.CancelScope()
    outside: list[int] = []

    def outside_receiver(signum: int, frame: object) -> None:
        # what trio restores when its receiver closes, and hands the signals
        # the watcher had not read yet (the second of a pair sent together):
        # the daemon is stopping already.  One before the receiver opens is
        # kept for it.
        outside.append(signum)

    async def watch(signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.cancel_called:
                log.info("signal received while shutting down, ignored", signal=name)
            else:
                log.info("signal received, shutting down", signal=name)
                stop.cancel()

    previous = {signum: signal.signal(signum, outside_receiver) for signum in _STOP_SIGNALS}
    try:
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            if outside:
                log.info("signal received, shutting down", signal=signal.Signals(outside[0]).name)
                stop.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, signals)
                try:
                    return await body(stop)
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        for signum, handler in previous.items():
            if stop.cancel_called:
                # shut down and about to exit: a signal sent a moment later
                # must not kill the process with the default action
                handler = signal.SIG_IGN
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


async def serve_until_signal(daemon: Daemon, on_started: Callable[[], None] | None = None) -> int:
    """Run ``daemon`` until SIGINT/SIGTERM; returns the process exit code."""
    log = logging.get_logger()

    async def body(stop: trio.CancelScope) -> int:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(daemon.run)
            except ListenError as exc:
                log.critical(str(exc))
                return 1
            if on_started is not None:
                on_started()
            with stop:
                await trio.sleep_forever()
            daemon.shutdown()
        return 0

    return await run_until_signal(body)


def daemon_main(
    prog: str,
    options_cls: type,
    argv: Sequence[str],
    make_daemon: Callable[[Any], Daemon],
    on_started: Callable[[Any], None] | None = None,
) -> NoReturn:
    """The console entry point of the daemon called ``prog`` (Go's name)."""
    options, parsed = run_cli(prog, options_cls, argv)
    if options.version:
        print(version_string(prog))
        raise SystemExit(0)
    logging.configure(app=prog, prefix=options.log_prefix, level=options.log_level, fmt=options.log_format)
    log_flag_warnings(parsed)
    started = (lambda: on_started(options)) if on_started is not None else None
    try:
        code = trio.run(serve_until_signal, make_daemon(options), started)
    except KeyboardInterrupt:
        code = 0
    raise SystemExit(code)
