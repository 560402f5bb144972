"""What the command-line tools share: naming, Go-style option passthrough,
logging, signals, exit codes, and failing at once when an nsqd is down."""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import signal
import sys
from collections.abc import Set as AbstractSet, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import trio

from pynsqd.flags import flag_field, parse_bool, parse_duration, run_cli

from ..conn import ConnectionOptions, check_addresses
from ..errors import ClientError, describe
from ..lookupd import QueryErrors, query_topics
from ..reader import ReaderConfig
from ..writer import WriterConfig

# every tool is "py" + the name of its Go counterpart, as the daemons are
# (pynsqd, pynsqlookupd, pynsqadmin): drop two letters and you have Go's name
PREFIX = "py"

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
_GO_LEVEL_NAMES = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "FATAL"}
_PY_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL}


def tool_name(go_name: str) -> str:
    return PREFIX + go_name


def version_line(prog: str) -> str:
    from pynsqd import NSQ_VERSION

    from .. import __version__

    return f"{prog} v{NSQ_VERSION}-compatible (built w/pynsqd-client-{__version__})"


def user_agent(prog: str) -> str:
    """What nsqd shows for the tool's connections (Go: ``nsq_tail/1.3.0 go-nsq/1.1.0``)."""
    from .. import __version__

    return f"{prog}/{__version__} pynsqd-client/{__version__}"


def differences(doc: str | None) -> str:
    """The "Where we differ on purpose" paragraph of a tool's docstring, for
    the end of its ``--help`` (the README says the same)."""
    text = inspect.cleandoc(doc or "")
    start = text.find("Where we differ on purpose")
    return text[start:].split("\n\n", 1)[0].replace("``", "") if start >= 0 else ""


class ToolExit(Exception):
    """Stop the tool with ``code``, after printing ``message`` (one line) on stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- logging


class _GoLogFormatter(logging.Formatter):
    """NSQ's Go log lines: ``[nsq_to_file] 2006/01/02 15:04:05.000000 INFO: text``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created).strftime("%Y/%m/%d %H:%M:%S.%f")
        line = f"{self.prefix}{ts} {_GO_LEVEL_NAMES.get(record.levelname, record.levelname)}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(prefix: str, level: str) -> logging.Logger:
    """Log the tool's lines and the client library's to stderr; returns the
    tool's logger.  Everything goes through stdlib logging (the client is a
    library and logs that way)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_GoLogFormatter(prefix))
    root = logging.getLogger("pynsqd.client")
    for old in list(root.handlers):
        if not isinstance(old, logging.NullHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_PY_LEVELS[level])
    return logging.getLogger("pynsqd.client.tools")


# ---------------------------------------------------------------- --consumer-opt / --producer-opt


def option_kinds(*classes: type) -> dict[str, type]:
    """name -> bool/int/float/str for every field of the client's options
    classes that a command line can set (go-nsq's ``Config`` names)."""
    out: dict[str, type] = {}
    for cls in classes:
        for a in attrs.fields(cls):
            t = str(a.type)
            if "SSLContext" in t:
                continue
            for kind in (bool, float, int, str):  # "int | None" is an int; "str | BackoffStrategy" a str
                if kind.__name__ in t:
                    out[a.name] = kind
                    break
    return out


CONSUMER_OPTIONS = option_kinds(ReaderConfig, ConnectionOptions)
PRODUCER_OPTIONS = option_kinds(WriterConfig, ConnectionOptions)


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        return parse_bool(text)
    if kind is int:
        return int(text)
    if kind is float:  # go-nsq's durations ("90s"), or plain seconds
        return parse_duration(text) if text[-1:].isalpha() else float(text)
    return text


def parse_opt(item: str, known: dict[str, type]) -> tuple[str, Any]:
    """go-nsq's ``ConfigFlag``: ``name,value``, or a bare boolean ``name``."""
    name, sep, text = item.partition(",")
    name = name.strip()
    kind = known.get(name)
    if kind is None:
        raise ValueError(f"invalid option {name}")
    if not sep:
        if kind is not bool:
            raise ValueError(f"option {name} needs a value ({name},VALUE)")
        return name, True
    try:
        return name, _convert(kind, text)
    except ValueError:
        raise ValueError(f"invalid value {text!r} for option {name}") from None


def opt_parser(known: dict[str, type]) -> Callable[[str], str]:
    """A flag parser that checks ``name,value`` while the command line is
    parsed, so a bad one exits 2 with Go's words (``invalid value "x,1" for
    flag -consumer-opt: invalid option x``)."""

    def check(item: str) -> str:
        parse_opt(item, known)
        return item

    return check


def parse_opts(items: Iterable[str], known: dict[str, type]) -> dict[str, Any]:
    return dict(parse_opt(item, known) for item in items)


# ---------------------------------------------------------------- the flags most tools share (Go's wording)


def nsqd_tcp_addresses_flag(help: str = "nsqd TCP address (may be given multiple times)") -> Any:
    return flag_field([], flag="nsqd-tcp-address", kind="strings", help=help)


def lookupd_http_addresses_flag() -> Any:
    return flag_field([], flag="lookupd-http-address", kind="strings", help="lookupd HTTP address (may be given multiple times)")


def max_in_flight_flag() -> Any:
    return flag_field(200, flag="max-in-flight", kind="int", help="max number of messages to allow in flight")


def consumer_opts_flag() -> Any:
    return flag_field(
        [],
        flag="consumer-opt",
        kind="strings",
        parse=opt_parser(CONSUMER_OPTIONS),
        help="option to passthrough to the Reader (may be given multiple times, name,value; the Reader's option names)",
    )


def producer_opts_flag() -> Any:
    return flag_field(
        [],
        flag="producer-opt",
        kind="strings",
        parse=opt_parser(PRODUCER_OPTIONS),
        help="option to passthrough to the Writer (may be given multiple times, name,value; the Writer's option names)",
    )


def http_timeout_flags(request: float) -> tuple[Any, Any]:
    return (
        flag_field(2.0, flag="http-client-connect-timeout", kind="duration", help="timeout for HTTP connect"),
        flag_field(request, flag="http-client-request-timeout", kind="duration", help="timeout for HTTP request"),
    )


def log_level_flag(default: str, prog: str) -> Any:
    help = "set log verbosity: debug, info, warn, error, or fatal" + (f" ({prog} only)" if prog else "")
    return flag_field(default, flag="log-level", kind="str", choices=LOG_LEVELS, help=help)


def version_flag() -> Any:
    return flag_field(False, flag="version", kind="bool", help="print version string")


def tool_main(
    prog: str,
    options_cls: type,
    doc: str | None,
    argv: Sequence[str] | None,
    check: Callable[[Any, AbstractSet[str]], str | None],
    start: Callable[[Any], int],
) -> int:
    """A tool's console entry point, as Go's tools behave: flags (``--help``
    with what differs from Go, exit 2 on a bad one), ``--version``, the
    start-up checks (exit 1 with one line), logging, then ``start(opts)``."""
    opts, parsed = run_cli(prog, options_cls, list(sys.argv[1:] if argv is None else argv), differences(doc))
    if opts.version:
        print(version_line(prog))
        return 0
    problem = check(opts, parsed.given) or bad_address(opts)
    if problem:
        sys.stderr.write(f"{prog}: {problem}\n")
        return 1
    if hasattr(opts, "log_level"):
        configure_logging(getattr(opts, "log_prefix", f"[{prog}] "), opts.log_level)
    return start(opts)


def bad_address(opts: Any) -> str | None:
    """The first nsqd TCP address that is not ``host:port`` (the Reader or
    Writer would refuse it later, inside the running tool)."""
    for name in ("nsqd_tcp_addresses", "destination_nsqd_tcp_addresses"):
        try:
            check_addresses(getattr(opts, name, ()))
        except ValueError as exc:
            return str(exc)
    return None


# ---------------------------------------------------------------- running


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signal_receiver() -> Iterator[AsyncIterator[int]]:
    """trio's receiver of SIGINT/SIGTERM, and those signals never fatal from
    then on, as after Go's ``signal.Notify``: a tool that stops once and then
    finishes its work (nsq_to_file closing its files) must not die of a second
    signal.  trio hands the signals its receiver had not given out when it
    closes back to the handlers it restores: "ignore", set here, instead of
    the default "die now"."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        yield signals


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


async def fail_if_not_dialled(prog: str, services: Iterable[Any], nursery: trio.Nursery) -> None:
    """Go's tools exit 1 when an nsqd given by address cannot be reached (or
    refuses the subscription) at start; the client would keep redialling.
    ``services`` are started Readers/Writers (``wait_dialled``,
    ``connect_errors``; those given only lookupds pass at once).  On a
    failure ``nursery`` (the one they run in) is cancelled and ToolExit raised."""
    services = list(services)
    if not services:
        return
    with trio.move_on_after(services[0].conn_options.dial_timeout + 5):
        for service in services:
            await service.wait_dialled()
    for service in services:
        for address, error in sorted(service.connect_errors.items()):
            nursery.cancel_scope.cancel()
            raise ToolExit(1, f"{prog}: cannot connect to nsqd {address}: {describe(error)}")


async def lookupd_topics(lookupds: Iterable[str], timeout: float, connect_timeout: float, log: logging.Logger) -> set[str]:
    """The union of every lookupd's topics; a lookupd that fails is logged
    and left out (Go's tools skip the whole refresh then)."""
    found: set[str] = set()

    async def one(address: str) -> None:
        try:
            found.update(await query_topics(address, timeout, connect_timeout))
        except QueryErrors as exc:
            log.error("could not retrieve topic list from lookupd %s: %s", address, exc)

    async with trio.open_nursery() as nursery:
        for address in lookupds:
            nursery.start_soon(one, address)
    return found


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def run_tool(prog: str, main: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run for a command-line tool.

    :class:`ToolExit` prints its line and exits with its code; Ctrl-C exits
    130; a closed stdout (``| head``) exits 141 as a Go tool killed by
    SIGPIPE does, without a traceback; a ClientError or OSError is one line,
    exit 1.
    """
    try:
        return trio.run(main, *args)
    except BaseException as exc:  # noqa: BLE001 - every way out becomes an exit code
        leaves = _leaves(exc)
        for leaf in leaves:
            if isinstance(leaf, ToolExit):
                if leaf.message:
                    sys.stderr.write(leaf.message + "\n")
                return leaf.code
        if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            # nothing more can be printed: keep the interpreter's final flush quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 130
        if all(isinstance(leaf, (ClientError, OSError)) for leaf in leaves):
            # what nsqd or the system said, not a traceback (a bug still shows one)
            for leaf in leaves:
                sys.stderr.write(f"{prog}: {describe(leaf)}\n")
            return 1
        raise
