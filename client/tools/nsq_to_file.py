"""``pynsq_to_file``: archive topics to files, as Go's ``nsq_to_file``.

    pynsq_to_file --topic=events --lookupd-http-address=127.0.0.1:4161 --output-dir=/var/archive --gzip --rotate-size=100000000

Go's flags, defaults and file naming: one file per topic named by
``--filename-format`` (``<TOPIC>.<HOST><REV>.<DATETIME>.log``, ``<REV>`` is
``-000000``, ``-000001``...); a new file when ``<DATETIME>`` changes, after
``--rotate-interval``, or past ``--rotate-size`` bytes (counted before
compression, as Go does); ``--gzip`` files are concatenated gzip members, one
per sync; files are written in ``--work-dir`` and moved to ``--output-dir``
when closed, never overwriting one there.  A message is finished (FIN) only
once the file holding it is fsynced: as soon as no other message is waiting
to be written (group commit: nsqd sends no more until these are finished),
at the latest after ``--max-in-flight`` messages, every ``--sync-interval``,
at rotation, and at exit (SIGINT/SIGTERM: stop, sync, close).  SIGHUP closes the files (for
logrotate); the next message opens a new one.  Without ``--topic``, every
topic the lookupds know (matching ``--topic-pattern``) is archived, checked
again every ``--topic-refresh``.

Where we differ on purpose: bad settings (a ``--filename-format`` without
``<REV>`` where one is needed, a bad name, ``--sync-interval=0``) and an
nsqd given by address that cannot be reached stop the tool at start with
exit code 1 (Go logs the error and then idles); a ``--work-dir`` on another
file system is copied to ``--output-dir`` (Go cannot link across and
exits); the per-sync "syncing N records" line is logged at debug level;
Go syncs when a connection is nearly out of RDY or on the --sync-interval
tick, so a slow trickle of messages waits up to 30 s to be finished (and is
written twice after a crash), where ours is fsynced at once.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Set as AbstractSet, Callable, Sequence
from typing import Any

import attrs
import trio

from pynsqd.flags import flag_field
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from ..message import Message
from ..reader import Reader
from .common import (
    CONSUMER_OPTIONS,
    ToolExit,
    consumer_opts_flag,
    fail_if_not_dialled,
    http_timeout_flags,
    log_level_flag,
    lookupd_http_addresses_flag,
    lookupd_topics,
    max_in_flight_flag,
    nsqd_tcp_addresses_flag,
    parse_opts,
    run_tool,
    stop_signal_receiver,
    tool_main,
    tool_name,
    user_agent,
    version_flag,
)

PROG = tool_name("nsq_to_file")
FILE_BUFFER = 256 * 1024


@attrs.define(kw_only=True)
class ToFileOptions:
    topics: list[str] = flag_field([], flag="topic", kind="strings", help="nsq topic (may be given multiple times)")
    topic_pattern: str = flag_field("", flag="topic-pattern", kind="str", help="only log topics matching the following pattern")
    topic_refresh: float = flag_field(60.0, flag="topic-refresh", kind="duration", help="how frequently the topic list should be refreshed")
    channel: str = flag_field("nsq_to_file", flag="channel", kind="str", help="nsq channel")
    nsqd_tcp_addresses: list[str] = nsqd_tcp_addresses_flag()
    lookupd_http_addresses: list[str] = lookupd_http_addresses_flag()
    consumer_opts: list[str] = consumer_opts_flag()
    max_in_flight: int = max_in_flight_flag()
    http_connect_timeout, http_request_timeout = http_timeout_flags(5.0)
    log_prefix: str = flag_field(f"[{PROG}] ", flag="log-prefix", kind="str", help="log message prefix")
    log_level: str = log_level_flag("info", "")
    output_dir: str = flag_field("/tmp", flag="output-dir", kind="str", help="directory to write output files to")
    work_dir: str = flag_field("", flag="work-dir", kind="str", help="directory for in-progress files before moving to output-dir")
    datetime_format: str = flag_field("%Y-%m-%d_%H", flag="datetime-format", kind="str", help="strftime compatible format for <DATETIME> in filename format")
    filename_format: str = flag_field(
        "<TOPIC>.<HOST><REV>.<DATETIME>.log",
        flag="filename-format",
        kind="str",
        help="output filename format (<TOPIC>, <HOST>, <PID>, <DATETIME>, <REV> are replaced. <REV> is increased when file already exists)",
    )
    host_identifier: str = flag_field(
        "", flag="host-identifier", kind="str", help="value to output in log filename in place of hostname. <SHORT_HOST> and <HOSTNAME> are valid replacement tokens"
    )
    gzip_level: int = flag_field(6, flag="gzip-level", kind="int", help="gzip compression level (1-9, 1=BestSpeed, 9=BestCompression)")
    gzip: bool = flag_field(False, flag="gzip", kind="bool", help="gzip output files.")
    skip_empty_files: bool = flag_field(False, flag="skip-empty-files", kind="bool", help="skip writing empty files")
    rotate_size: int = flag_field(0, flag="rotate-size", kind="int", help="rotate the file when it grows bigger than rotate-size bytes")
    rotate_interval: float = flag_field(0.0, flag="rotate-interval", kind="duration", help="rotate the file every duration")
    sync_interval: float = flag_field(30.0, flag="sync-interval", kind="duration", help="sync file to disk every duration")
    version: bool = version_flag()

    @property
    def work(self) -> str:
        return self.work_dir or self.output_dir


def check(opts: ToFileOptions, given: AbstractSet[str] = frozenset()) -> str | None:
    """Go's start-up checks in Go's order, then the ones Go only logs later."""
    if not opts.channel:
        return "--channel is required"
    if not opts.nsqd_tcp_addresses and not opts.lookupd_http_addresses:
        return "--nsqd-tcp-address or --lookupd-http-address required."
    if opts.nsqd_tcp_addresses and opts.lookupd_http_addresses:
        return "use --nsqd-tcp-address or --lookupd-http-address not both"
    if not 1 <= opts.gzip_level <= 9:
        return f"invalid --gzip-level value ({opts.gzip_level}), should be 1-9"
    if not opts.topics and not opts.topic_pattern:
        return "--topic or --topic-pattern required"
    if not opts.topics and not opts.lookupd_http_addresses:
        return "--lookupd-http-address must be specified when no --topic specified"
    if not is_valid_channel_name(opts.channel):
        return f"invalid channel name {opts.channel!r}"
    for topic in opts.topics:
        if not is_valid_topic_name(topic):
            return f"invalid topic name {topic!r}"
    if opts.topic_pattern:
        try:
            re.compile(opts.topic_pattern)
        except re.error as exc:
            return f"invalid --topic-pattern {opts.topic_pattern!r}: {exc}"
    if opts.sync_interval <= 0:
        return "--sync-interval must be positive"
    if opts.topic_refresh <= 0:
        return "--topic-refresh must be positive"
    if opts.rotate_size < 0 or opts.rotate_interval < 0:
        return "--rotate-size and --rotate-interval must not be negative"
    if opts.max_in_flight < 1:
        return "--max-in-flight must be at least 1"
    try:
        filename_format(opts, "topic")
    except ValueError as exc:
        return str(exc)
    return None


def filename_format(opts: ToFileOptions, topic: str, hostname: str | None = None, pid: int | None = None) -> str:
    """The topic's file name with everything but ``<DATETIME>`` and ``<REV>`` filled in."""
    hostname = hostname if hostname is not None else socket.gethostname()
    short = hostname.split(".")[0]
    identifier = short
    if opts.host_identifier:
        identifier = opts.host_identifier.replace("<SHORT_HOST>", short).replace("<HOSTNAME>", hostname)
    fmt = opts.filename_format
    if opts.gzip or opts.rotate_size > 0 or opts.rotate_interval > 0 or opts.work != opts.output_dir:
        if "<REV>" not in fmt:
            raise ValueError("missing <REV> in --filename-format when gzip, rotation, or work dir enabled")
    else:
        fmt = fmt.replace("<REV>", "")  # never needed: one file per <DATETIME>, appended to
    fmt = fmt.replace("<TOPIC>", topic).replace("<HOST>", identifier).replace("<PID>", str(pid if pid is not None else os.getpid()))
    if opts.gzip and not fmt.endswith(".gz"):
        fmt += ".gz"
    return fmt


def _rev(template: str, rev: int) -> str:
    return template.replace("<REV>", f"-{rev:06d}")


class FileLogger:
    """One topic's output files: naming, rotation, gzip members, fsync, the
    move from the work dir.  Plain blocking file operations; the async side
    runs the slow ones (sync, rotate, close) in a worker thread, never two
    at once for one logger."""

    def __init__(self, opts: ToFileOptions, topic: str, log: logging.Logger, *, clock: Callable[[], float] = time.time, hostname: str | None = None) -> None:
        self.opts = opts
        self.topic = topic
        self.log = log
        self.clock = clock
        self.format = filename_format(opts, topic, hostname)
        self.tag = f"[{topic}/{opts.channel}]"
        self.raw: io.BufferedWriter[io.FileIO] | None = None  # the file
        self.writer: Any = None  # what messages are written to: the file, or a gzip member on it
        self.filename = ""  # the name before <REV> is filled in
        self.path = ""
        self.rev = 0
        self.open_time = 0.0
        self.size = 0  # bytes written, before compression (Go's --rotate-size counts these)
        self.files_closed = 0

    def current_filename(self) -> str:
        return self.format.replace("<DATETIME>", time.strftime(self.opts.datetime_format, time.localtime(self.clock())))

    def needs_rotation(self) -> bool:
        if self.raw is None:
            return True
        if self.current_filename() != self.filename:
            return True
        if self.opts.rotate_interval > 0 and self.clock() - self.open_time > self.opts.rotate_interval:
            return True
        return self.opts.rotate_size > 0 and self.size > self.opts.rotate_size

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.size += len(data)

    def sync(self) -> None:
        """Make everything written durable: for gzip, end the member (its
        trailer is the checksum of what was synced) and start the next."""
        if self.raw is None:
            return
        if self.opts.gzip:
            self.writer.close()
            self.raw.flush()
            os.fsync(self.raw.fileno())
            self.writer = self._gzip_member(self.raw)
        else:
            self.raw.flush()
            os.fsync(self.raw.fileno())

    def _gzip_member(self, raw: io.BufferedWriter[io.FileIO]) -> gzip.GzipFile:
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=self.opts.gzip_level, mtime=0)

    def rotate(self) -> None:
        """Close the current file and open the next one (Go's updateFile)."""
        self.close()
        filename = self.current_filename()
        self.rev = 0 if filename != self.filename else self.rev + 1
        self.filename = filename
        self.open_time = self.clock()
        template = os.path.join(self.opts.work, filename)
        os.makedirs(os.path.dirname(template) or ".", 0o770, exist_ok=True)
        exclusive = self.opts.gzip or self.opts.rotate_interval > 0
        while True:
            path = _rev(template, self.rev)
            if self.opts.work != self.opts.output_dir:
                # a finished file of that name already waits in the output dir
                final = self._output_path(path)
                os.makedirs(os.path.dirname(final) or ".", 0o770, exist_ok=True)
                if os.path.exists(final):
                    self.log.warning("%s output file already exists: %s", self.tag, final)
                    self.rev += 1
                    continue
            flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_APPEND)
            try:
                fd = os.open(path, flags, 0o666)
            except FileExistsError:
                self.log.warning("%s working file already exists: %s", self.tag, path)
                self.rev += 1
                continue
            size = os.fstat(fd).st_size
            if self.opts.rotate_size > 0 and size > self.opts.rotate_size:
                os.close(fd)
                self.rev += 1
                continue
            break
        self.log.info("%s opening %s", self.tag, path)
        self.path = path
        self.size = size
        raw = io.BufferedWriter(io.FileIO(fd, "wb"), buffer_size=FILE_BUFFER)  # closed in close()
        self.raw = raw
        self.writer = self._gzip_member(raw) if self.opts.gzip else raw

    def close(self) -> None:
        """Sync and close the file, then move it to the output dir."""
        if self.raw is None:
            return
        self.log.debug("%s closing %s", self.tag, self.path)
        self.sync()
        if self.opts.gzip:
            self.writer.close()  # the empty member just started: ends it cleanly
        self.raw.close()
        self.raw = self.writer = None
        self.files_closed += 1
        if self.opts.work != self.opts.output_dir:
            self._move(self.path)

    def _output_path(self, path: str) -> str:
        return os.path.join(self.opts.output_dir, os.path.relpath(path, self.opts.work))

    def _move(self, src: str) -> None:
        """To the output dir without overwriting: link then unlink (Go's
        exclusiveRename), the next <REV> if the name is taken."""
        dst = self._output_path(src)
        rev = self.rev
        template = self._output_path(os.path.join(self.opts.work, self.filename))
        while True:
            try:
                _exclusive_move(src, dst)
                self.log.debug("%s moved finished file %s to %s", self.tag, src, dst)
                return
            except FileExistsError:
                self.log.warning("%s destination file already exists: %s", self.tag, dst)
                rev += 1
                dst = _rev(template, rev)


def _exclusive_move(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # another file system: copy into a new file of that name, then drop the original
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
    os.unlink(src)


class TopicArchiver:
    """A Reader on one topic feeding a FileLogger; FINs once fsynced."""

    def __init__(
        self, opts: ToFileOptions, topic: str, extra: dict[str, Any], log: logging.Logger, on_failure: Callable[[str], None] = lambda line: None
    ) -> None:
        self.opts = opts
        self.file = FileLogger(opts, topic, log)
        self.log = log
        self.lock = trio.Lock()
        self.pending: list[Message] = []  # written, not yet synced
        self.stopping = False
        self.failed = False
        self.on_failure = on_failure
        self.reader = Reader(
            topic,
            opts.channel,
            self.handle,
            nsqd_tcp_addresses=opts.nsqd_tcp_addresses,
            lookupd_http_addresses=opts.lookupd_http_addresses,
            max_in_flight=opts.max_in_flight,
            concurrency=1,  # one writer per file, messages in arrival order
            **extra,
        )

    async def handle(self, message: Message) -> None:
        message.disable_auto_response()
        async with self.lock:
            if self.failed:
                message.requeue(0, backoff=False)
                return
            try:
                synced = False
                if self.file.needs_rotation():
                    await trio.to_thread.run_sync(self.file.rotate)
                    synced = True  # the old file was synced as it closed
                self.file.write(message.body + b"\n")
                self.pending.append(message)
                # group commit: sync once no other message is waiting to be
                # written (nsqd sends no more until these are finished), or a
                # window's worth is pending
                waiting = self.reader.in_flight - len(self.pending)
                if synced or self.stopping or waiting <= 0 or len(self.pending) >= self.opts.max_in_flight:
                    await self._sync_locked()
            except OSError as exc:
                self._fail(message, exc)

    def _fail(self, message: Message, exc: OSError) -> None:
        """A file that cannot be written stops the tool, as Go's FATAL: going
        on would fail each message until it is given up (lost).  Nothing
        more is taken; what is in flight goes back to nsqd at once."""
        self.failed = True
        self.reader.set_max_in_flight(0)
        for m in [*self.pending, message]:
            if not m.has_responded:
                m.requeue(0, backoff=False)
        self.pending = []
        line = f"{self.file.tag} cannot write messages: {exc}"
        self.log.error(line)
        self.on_failure(line)

    async def _sync_locked(self) -> None:
        if not self.pending:
            return
        self.log.debug("%s syncing %d records to disk", self.file.tag, len(self.pending))
        await trio.to_thread.run_sync(self.file.sync)
        pending, self.pending = self.pending, []
        for message in pending:
            message.finish()

    async def tick(self) -> None:
        """--sync-interval: rotate if due, sync."""
        async with self.lock:
            if self.failed:
                return
            if self.file.needs_rotation():
                await self._sync_locked()
                if self.opts.skip_empty_files:
                    await trio.to_thread.run_sync(self.file.close)  # the next message opens one
                else:
                    await trio.to_thread.run_sync(self.file.rotate)
            await self._sync_locked()

    async def reopen(self) -> None:
        """SIGHUP: close the file; the next message opens a new one."""
        async with self.lock:
            await self._sync_locked()
            await trio.to_thread.run_sync(self.file.close)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.reader.run)
            nursery.start_soon(self._ticker)
            task_status.started()
            await self.reader.wait_stopped()
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            async with self.lock:
                if self.failed:
                    try:
                        await trio.to_thread.run_sync(self.file.close)
                    except OSError as exc:  # said already; its messages went back to nsqd
                        self.log.debug("%s closing after the failure: %s", self.file.tag, exc)
                    return
                await self._sync_locked()
                await trio.to_thread.run_sync(self.file.close)

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.opts.sync_interval)
            await self.tick()

    async def stop(self) -> None:
        """Sync what is written, stop the Reader (messages still arriving are
        synced one by one), close the file."""
        self.stopping = True
        async with self.lock:
            await self._sync_locked()
        await self.reader.stop()


class Archiver:
    """Every topic's TopicArchiver, and the discovery of new topics."""

    def __init__(self, opts: ToFileOptions, extra: dict[str, Any], log: logging.Logger) -> None:
        self.opts = opts
        self.extra = extra
        self.log = log
        self.topics: dict[str, TopicArchiver] = {}
        self.pattern = re.compile(opts.topic_pattern) if opts.topic_pattern else None
        self.stopping = False
        self.failure = ""  # why the tool stops with exit code 1
        self._nursery: trio.Nursery | None = None
        self._background = trio.CancelScope()  # signals and discovery; cancelled: stop

    def allowed(self, topic: str) -> bool:
        return self.pattern is None or self.pattern.search(topic) is not None

    async def add(self, topics: Sequence[str]) -> list[TopicArchiver]:
        assert self._nursery is not None
        added = []
        for topic in topics:
            if topic in self.topics or self.stopping:
                continue
            if not self.allowed(topic):
                self.log.debug("skipping topic %s (doesn't match pattern %s)", topic, self.opts.topic_pattern)
                continue
            archiver = TopicArchiver(self.opts, topic, dict(self.extra), self.log, self.fail)
            self.topics[topic] = archiver
            await self._nursery.start(archiver.run)
            added.append(archiver)
        return added

    async def discover(self) -> None:
        """No --topic: every topic of the lookupds, again every --topic-refresh."""
        while True:
            topics = await lookupd_topics(self.opts.lookupd_http_addresses, self.opts.http_request_timeout, self.opts.http_connect_timeout, self.log)
            await self.add(sorted(topics))
            await trio.sleep(self.opts.topic_refresh)

    async def on_hup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                self.log.info("SIGHUP: closing files")
                for archiver in list(self.topics.values()):
                    await archiver.reopen()

    def fail(self, line: str) -> None:
        """A topic cannot be archived: stop every topic, exit 1 with ``line``."""
        if not self.failure:
            self.failure = line
            self._background.cancel()

    async def stop(self) -> None:
        self.stopping = True
        async with trio.open_nursery() as nursery:
            for archiver in list(self.topics.values()):
                nursery.start_soon(archiver.stop)

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            background = self._background

            async def signals_and_discovery() -> None:
                with background:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self.on_hup)
                        if not self.opts.topics:
                            inner.start_soon(self.discover)
                        with stop_signal_receiver() as signals:
                            async for _ in signals:
                                break
                        inner.cancel_scope.cancel()
                await self.stop()

            nursery.start_soon(signals_and_discovery)
            started = await self.add(self.opts.topics)
            await fail_if_not_dialled(PROG, [a.reader for a in started], nursery)
        if self.failure:
            raise ToolExit(1, f"{PROG}: {self.failure}")
        return 0


async def run_to_file(opts: ToFileOptions, extra: dict[str, Any]) -> int:
    log = logging.getLogger("pynsqd.client.tools.nsq_to_file")
    extra.setdefault("user_agent", user_agent(PROG))
    return await Archiver(opts, extra, log).run()


def main(argv: Sequence[str] | None = None) -> int:
    return tool_main(PROG, ToFileOptions, __doc__, argv, check, lambda opts: run_tool(PROG, run_to_file, opts, parse_opts(opts.consumer_opts, CONSUMER_OPTIONS)))


if __name__ == "__main__":
    raise SystemExit(main())
