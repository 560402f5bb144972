"""The daemon: owns the topics, the listeners and every background task.

``NSQD`` holds the plain (synchronous) state — topics, channels, clients —
and :meth:`NSQD.run` is the trio edge: it opens the listeners and a nursery
in which every task of the daemon lives (connections, channel timers, topic
drains), and shuts down by cancellation followed by a flush.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from . import NSQ_VERSION, version_string
from .backend_queue import BackendQueue, DummyBackendQueue
from .channel import Channel
from .dead_letter import DeadLetters
from .disk_queue import DiskQueue, list_data_files
from .fsutil import unlink_quiet as _unlink_quiet
from .fsutil import write_atomically as _write_atomically
from .client_v2 import ClientV2
from .e2e import LatencyStream
from .auth import Auth
from .listener import open_listener
from .lookup import Lookup
from . import log as logging_setup
from .http_server import HTTPError, Response, respond
from .log import LEVELS, get_logger
from .options import Options, config_value
from .protocol import is_ephemeral, is_valid_channel_name, is_valid_topic_name
from .settings import CHANNEL_SETTINGS, TOPIC_SETTINGS, from_metadata
from .streams import DeflateStream, SnappyStream
from .tls import TLSRequiredRouter, build_server_context, connection_info, upgrade_server_stream
from .retention import Retention
from .topic import Topic

# a topic drain hands this many messages to the channels between yields
DRAIN_STEP = 1000
# a drain that found a channel's disk full retries after this long, doubling up to the max
DRAIN_RETRY_MIN = 0.05
DRAIN_RETRY_MAX = 1.0

METADATA_FILE = "nsqd.dat"


class DataPathLocked(Exception):
    pass


class _ChannelTimer:
    """The cancel scopes of one channel's timer task."""

    __slots__ = ("outer", "inner")

    def __init__(self) -> None:
        self.outer = trio.CancelScope()
        self.inner: trio.CancelScope | None = None

    def wake_by(self, deadline: float) -> None:
        inner = self.inner
        if inner is not None and deadline < inner.deadline:
            inner.deadline = deadline


class NSQD:
    def __init__(self, options: Options, *, backend_factory: Callable[[str, bool], BackendQueue] | None = None) -> None:
        self.options = options
        self.log = get_logger()
        self.version = NSQ_VERSION
        self.version_string = version_string("nsqd")
        self.hostname = socket.gethostname()
        self.data_path = options.data_path or os.getcwd()
        self.topics: dict[str, Topic] = {}
        self.clients: dict[int, ClientV2] = {}
        self._client_seq = 0
        self.start_time = int(time.time())
        # what is failing, by source ("put", "sync", "drain <topic>"): /ping says NOK while any is
        self._health: dict[str, str] = {}
        self._backend_factory = backend_factory or self._default_backend
        self._nursery: trio.Nursery | None = None
        # tasks asked for before run() opened the nursery (while the metadata
        # loads): started as soon as it opens
        self._early_tasks: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self._timers: dict[int, _ChannelTimer] = {}
        self._draining: set[Topic] = set()  # by identity: a deleted topic's task may outlive it
        self.tcp_address = ""
        self.http_address = ""
        self.https_address = ""
        self.tcp_port = 0
        self.http_port = 0
        self.https_port = 0
        # --tls-cert/--tls-key: the context of IDENTIFY's tls_v1 upgrade and of HTTPS
        self.tls_context = build_server_context(options)
        self.tls_enabled = self.tls_context is not None
        # --auth-http-address: AUTH, and PUB/SUB checked against its answers
        self.auth: Auth | None = Auth(options, self.log) if options.auth_http_addresses else None
        self.exiting = False
        self._sync_due: set[BackendQueue] = set()
        # nsqd.dat is behind the topics and channels: written with the next sync round
        self._metadata_due = False
        self._rounds_started = 0
        self._rounds_done = 0
        self._round_finished = trio.Event()
        # --sync-every=1: every acknowledged message is on disk before the
        # reply, written through (no memory queue) and kept until FIN
        self.durable = options.sync_every == 1
        self._lock_fd: int | None = None
        self._data_files: dict[str, list[int]] | None = None  # while loading: queue name -> data files
        self._loading = False
        # called after PUT /config changes options (the lookupd connections)
        self.options_changed_hooks: list[Callable[[], None]] = []
        # told of "topic_created"/"topic_deleted"/"channel_created"/
        # "channel_deleted" (topic, channel or None): lookupd registration
        self.event_hooks: list[Callable[[str, Topic, Channel | None], None]] = []
        # long-running tasks of optional subsystems, started in the daemon's nursery
        self.services: list[Callable[[], Awaitable[None]]] = []
        # server-side max attempts and the dead-letter topics (dead_letter.py)
        self.dead_letters = DeadLetters(self)
        # read a topic's extra keys of nsqd.dat (its settings) once loaded
        self.topic_metadata_loaders: list[Callable[[Topic], None]] = []
        # run at the end of close(), once the queues are on disk
        self.close_hooks: list[Callable[[], None]] = []
        # nsqlookupd registration and new topics' channel pre-creation
        self.lookup = Lookup(self).install()
        # per-topic retention and channel replays
        self.retention = Retention(self).install()
        if options.statsd_address:
            from .statsd import StatsdService

            self.services.append(StatsdService(self).run)

    # ------------------------------------------------------------ properties

    @property
    def tls_required_for_tcp(self) -> bool:
        return self.options.tls_required != "false"

    @property
    def health_error(self) -> str | None:
        return next(reversed(self._health.values()), None)

    def is_healthy(self) -> bool:
        return not self._health

    def health(self) -> str:
        return "OK" if not self._health else f"NOK - {self.health_error}"

    def set_unhealthy(self, source: str, error: str) -> None:
        self._health.pop(source, None)
        self._health[source] = error

    def set_healthy(self, source: str) -> None:
        self._health.pop(source, None)

    def note_put_failure(self, exc: Exception) -> None:
        from .backend_queue import BackendError

        if isinstance(exc, BackendError):
            self.set_unhealthy("put", str(exc))

    def note_put_success(self) -> None:
        self.set_healthy("put")

    # ------------------------------------------------------------ durability

    def _mark_sync_due(self, backend: BackendQueue) -> None:
        self._sync_due.add(backend)

    def mark_sync_due(self, item: Any) -> None:
        """``item`` (a queue, or anything with ``prepare_sync``) is written by the next sync round."""
        self._sync_due.add(item)

    def sync_pending(self) -> bool:
        """A sync is due or running: replies must wait for :meth:`sync_barrier`."""
        return bool(self._sync_due) or self._metadata_due or self._rounds_started != self._rounds_done

    async def sync_barrier(self) -> None:
        """Return once everything written before the call that --sync-every
        asks to be durable is on disk (group commit).

        Connections call this after a batch of commands, before their replies
        go out, so one fsync covers many publishes.  Syncs run in rounds, one
        at a time: a round snapshots every due queue at its start and fsyncs
        them in a worker thread; a caller arriving during a round waits for
        the next one, which covers what it wrote."""
        if not self.sync_pending():
            return
        need = self._rounds_started + 1
        while self._rounds_done < need:
            if self._rounds_started == self._rounds_done:
                await self._sync_round()
            else:
                await self._round_finished.wait()

    async def _sync_round(self) -> None:
        self._rounds_started += 1
        try:
            due, self._sync_due = self._sync_due, set()
            jobs = [b.prepare_sync() if hasattr(b, "prepare_sync") else b.sync for b in due]
            if self._metadata_due:
                self._metadata_due = False
                jobs.append(self._metadata_job())
            if jobs:
                errors = await trio.to_thread.run_sync(_run_sync_jobs, jobs)
                for err in errors:
                    self.set_unhealthy("sync", str(err))
                    self.log.error("sync failed", error=str(err))
                if not errors:
                    self.set_healthy("sync")
        finally:
            self._rounds_done += 1
            finished, self._round_finished = self._round_finished, trio.Event()
            finished.set()

    async def _sync_ticker(self) -> None:
        """--sync-timeout: make dirty queues durable even when idle."""
        while True:
            await trio.sleep(self.options.sync_timeout)
            for backend in self._all_backends():
                if getattr(backend, "dirty", False):
                    self._sync_due.add(backend)
            await self.sync_barrier()

    def _all_backends(self) -> list[Any]:
        out: list[Any] = []
        for topic in self.topics.values():
            out.append(topic.backend)
            out.extend(c.backend for c in topic.channels.values())
            if topic.retention is not None:
                out.append(topic.retention)  # type: ignore[arg-type]
        out.extend(self.dead_letters.logs.values())
        return out

    def lock_data_path(self) -> None:
        """flock the data directory as nsqd does, so a second daemon refuses it.

        A missing directory is an error, as in nsqd: a typo in --data-path
        must not quietly become a new, empty queue directory."""
        try:
            fd = os.open(self.data_path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                reason = f"--data-path={self.data_path} is not a directory"
            else:  # nsqd's words: "open /x: no such file or directory"
                reason = f"open {self.data_path}: {(exc.strerror or str(exc)).lower()}"
            raise DataPathLocked(f"failed to instantiate nsqd - failed to lock data-path: {reason}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataPathLocked(f"--data-path={self.data_path} in use (possibly by another instance of nsqd)") from None
            raise
        self._lock_fd = fd

    def unlock_data_path(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def metadata(self) -> dict[str, Any]:
        topics = []
        for name, topic in sorted(self.topics.items()):
            if topic.ephemeral:
                continue
            # settings made through the HTTP API are extra keys (Go ignores
            # them), present only once made: see settings.py
            channels = [
                {"name": cname, "paused": c.paused, **c.settings}
                for cname, c in sorted(topic.channels.items())
                if not c.ephemeral
            ]
            topics.append({"name": name, "paused": topic.paused, "channels": channels, **topic.settings})
        return {"topics": topics, "version": NSQ_VERSION}

    def persist_metadata(self) -> None:
        """Write nsqd.dat atomically (tmp + fsync + rename), nsqd's format."""
        if self._loading:
            return
        _write_atomically(os.path.join(self.data_path, METADATA_FILE), json.dumps(self.metadata()).encode())

    def metadata_changed(self) -> None:
        """A topic or channel was created, deleted, paused or unpaused.  While
        the daemon runs nsqd.dat is written with the next sync round, in a
        worker thread (its two fsyncs on the event loop would stall every
        connection): replies and admin answers wait for that round as they
        wait for their messages' syncs.  Otherwise (loading, shutdown) at once."""
        if self._nursery is not None:
            self._metadata_due = True
            return
        try:
            self.persist_metadata()
        except OSError as exc:
            self.log.error("failed to persist metadata", error=str(exc))

    def _metadata_job(self) -> Callable[[], None]:
        """The snapshot taken now, written (tmp + fsync + rename) by a sync round's worker thread."""
        path = os.path.join(self.data_path, METADATA_FILE)
        data = json.dumps(self.metadata()).encode()
        log = self.log

        def write() -> None:
            try:
                _write_atomically(path, data)
            except OSError as exc:
                log.error("failed to persist metadata", error=str(exc))

        return write

    def load_metadata(self) -> None:
        path = os.path.join(self.data_path, METADATA_FILE)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"failed to parse metadata in {path} - {exc}") from None
        self._loading = True
        # one directory listing for every queue's recovery
        self._data_files = list_data_files(self.data_path)
        try:
            for t in data.get("topics") or []:
                name = t.get("name", "")
                if not is_valid_topic_name(name):
                    self.log.warning("skipping creation of invalid topic", topic=name)
                    continue
                topic = self.get_topic(name)
                if t.get("paused"):
                    topic.pause()
                topic.settings = self._settings_of(t, TOPIC_SETTINGS, ("name", "paused", "channels"), name)
                self.apply_topic_settings(topic)
                for load in self.topic_metadata_loaders:
                    load(topic)
                for c in t.get("channels") or []:
                    cname = c.get("name", "")
                    if not is_valid_channel_name(cname):
                        self.log.warning("skipping creation of invalid channel", topic=name, channel=cname)
                        continue
                    channel = topic.get_channel(cname)
                    if c.get("paused"):
                        channel.pause()
                    channel.settings = self._settings_of(c, CHANNEL_SETTINGS, ("name", "paused"), f"{name}:{cname}")
                    self.apply_channel_settings(topic, channel)
            self.dead_letters.recover()
        finally:
            self._loading = False
            self._data_files = None

    def _settings_of(self, entry: dict[str, Any], table: Any, reserved: tuple[str, ...], where: str) -> dict[str, Any]:
        kept, bad = from_metadata(entry, table, reserved)
        for key in bad:
            self.log.warning("ignoring an invalid setting in nsqd.dat", queue=where, setting=key, value=repr(entry.get(key)))
        return kept

    # ------------------------------------------------------------ settings (settings.py)

    def apply_topic_settings(self, topic: Topic) -> None:
        """The topic's settings (or the flags where it has none) take effect."""
        topic.max_disk_bytes = 0 if topic.ephemeral else int(topic.settings.get("max_disk_bytes", self.options.max_disk_bytes_per_topic))  # type: ignore[call-overload]
        if not topic.max_disk_bytes:
            topic.disk_full = False

    def apply_channel_settings(self, topic: Topic, channel: Channel) -> None:
        self.dead_letters.configure(topic, channel)

    # ------------------------------------------------------------ config

    async def set_config(self, name: str, body: bytes) -> Response:
        """``PUT /config/<name>``: the two options nsqd lets you change live."""
        if not body or len(body) > self.options.max_msg_size:
            raise HTTPError(413, "INVALID_VALUE")
        if name == "nsqlookupd_tcp_addresses":
            try:
                value = json.loads(body)
            except ValueError:
                raise HTTPError(400, "INVALID_VALUE") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise HTTPError(400, "INVALID_VALUE")
            self.options.lookupd_tcp_addresses = value
            for hook in self.options_changed_hooks:
                hook()
        elif name == "log_level":
            level = body.decode(errors="replace").strip().lower()
            if level not in LEVELS:
                raise HTTPError(400, "INVALID_VALUE")
            self.options.log_level = level
            o = self.options
            logging_setup.configure(app="nsqd", prefix=o.log_prefix, level=level, fmt=o.log_format)
            self.log.info("log level changed", level=level)
        else:
            raise HTTPError(400, "INVALID_OPTION")
        return respond(config_value(self.options, name))

    # ------------------------------------------------------------ backends

    def _default_backend(self, name: str, ephemeral: bool) -> BackendQueue:
        if ephemeral:
            return DummyBackendQueue()
        o = self.options
        return DiskQueue(
            name,
            self.data_path,
            max_bytes_per_file=o.max_bytes_per_file,
            min_msg_size=26,
            max_msg_size=o.max_msg_size + 26,
            sync_every=o.sync_every,
            on_sync_due=self._mark_sync_due,
            track_acks=self.durable,
            data_files=self._data_files.get(name, []) if self._data_files is not None else None,
        )

    # ------------------------------------------------------------ topics

    def _mem_queue_size(self, ephemeral: bool) -> int:
        return 0 if self.durable and not ephemeral else self.options.mem_queue_size

    # ------------------------------------------------------------ deferrals kept beside queues

    def _deferrals_path(self, queue_name: str) -> str:
        return os.path.join(self.data_path, f"{queue_name}.pynsqd-deferred.json")

    def _load_deferrals(self, queue_name: str) -> dict[bytes, Any]:
        """Deferral times saved at the last shutdown, for messages stored as
        ordinary (Go-readable) records in the queue."""
        try:
            with open(self._deferrals_path(queue_name), "rb") as fh:
                data = json.load(fh)
            return {k.encode(): v for k, v in data.get("deferred", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            self.log.error("ignoring unreadable deferral file", queue=queue_name, error=str(exc))
            return {}

    def _save_deferrals(self, queue_name: str, deferrals: dict[bytes, Any]) -> None:
        path = self._deferrals_path(queue_name)
        if not deferrals:
            _unlink_quiet(path)
            return
        data = {"version": 1, "deferred": {k.decode(): v for k, v in deferrals.items()}}
        _write_atomically(path, json.dumps(data).encode())

    def get_topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is not None and not topic.exiting:
            return topic
        topic = Topic(
            name,
            backend=self._backend_factory(name, is_ephemeral(name)),
            mem_queue_size=self._mem_queue_size(is_ephemeral(name)),
            node_id=self.options.node_id,
            make_channel=self._make_channel,
            on_backlog=self._start_drain,
            on_channel_created=self._channel_created,
            on_channel_deleted=self._channel_deleted,
            on_empty_ephemeral=lambda t: self.delete_existing_topic(t.name),
        )
        if not topic.ephemeral:
            topic.pending_deferrals = self._load_deferrals(name)
        self.apply_topic_settings(topic)
        self.dead_letters.topic_created(topic)
        self.topics[name] = topic
        self.log.info("TOPIC: created", topic=name)
        if not topic.ephemeral:
            self.metadata_changed()
        self._emit("topic_created", topic, None)
        return topic

    def get_existing_topic(self, name: str) -> Topic | None:
        return self.topics.get(name)

    def delete_existing_topic(self, name: str) -> bool:
        topic = self.topics.pop(name, None)
        if topic is None:
            return False
        self.log.info("TOPIC: deleting", topic=name)
        topic.delete()
        _unlink_quiet(self._deferrals_path(name))
        self.dead_letters.topic_deleted(topic)
        if not topic.ephemeral:
            self.metadata_changed()
        self._emit("topic_deleted", topic, None)
        return True

    def _make_channel(self, topic: Topic, name: str) -> Channel:
        timer = _ChannelTimer()
        channel = Channel(
            topic.name,
            name,
            backend=self._backend_factory(f"{topic.name}:{name}", topic.ephemeral or is_ephemeral(name)),
            mem_queue_size=self._mem_queue_size(topic.ephemeral or is_ephemeral(name)),
            max_msg_timeout=self.options.max_msg_timeout,
            max_channel_consumers=self.options.max_channel_consumers,
            clock=_trio_clock(),
            on_deadline=timer.wake_by,
            on_delete=lambda ch: topic.delete_existing_channel(ch.name),
            e2e=self._new_latency_stream(),
        )
        if not channel.ephemeral and not topic.ephemeral:
            channel.pending_deferrals = self._load_deferrals(f"{topic.name}:{name}")
        self._timers[id(channel)] = timer
        self.start_soon(self._run_channel_timer, channel, timer)
        self.dead_letters.configure(topic, channel)
        return channel

    def _new_latency_stream(self) -> LatencyStream | None:
        """A channel's e2e latency sketch, when percentiles are configured."""
        o = self.options
        if not o.e2e_processing_latency_percentiles:
            return None
        return LatencyStream(o.e2e_processing_latency_percentiles, o.e2e_processing_latency_window_time)

    def _emit(self, event: str, topic: Topic, channel: Channel | None) -> None:
        for hook in self.event_hooks:
            try:
                hook(event, topic, channel)
            except Exception:
                self.log.exception("event hook failed", hook_event=event, topic=topic.name)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run a task in the daemon's nursery; one asked for before the daemon
        runs (loading the metadata) starts when it does.  False once it has
        stopped."""
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)
            return True
        if self.exiting:
            return False
        self._early_tasks.append((fn, args))
        return True

    def _channel_created(self, topic: Topic, channel: Channel) -> None:
        if not channel.ephemeral and not topic.ephemeral:
            self.metadata_changed()
        self._emit("channel_created", topic, channel)

    def _channel_deleted(self, topic: Topic, channel: Channel) -> None:
        _unlink_quiet(self._deferrals_path(f"{topic.name}:{channel.name}"))
        timer = self._timers.pop(id(channel), None)
        if timer is not None:
            timer.outer.cancel()
        if not channel.ephemeral and not topic.ephemeral and not topic.exiting:
            self.metadata_changed()
        self.dead_letters.channel_gone(topic, channel)
        self._emit("channel_deleted", topic, channel)

    async def _run_channel_timer(self, channel: Channel, timer: _ChannelTimer) -> None:
        """Requeue timed-out and release due deferred messages of one channel."""
        with timer.outer:
            while not channel.exiting:
                with trio.CancelScope(deadline=channel.next_deadline) as inner:
                    timer.inner = inner
                    await trio.sleep_forever()
                timer.inner = None
                if channel.exiting:
                    return
                channel.process_timeouts(trio.current_time())

    def _start_drain(self, topic: Topic) -> None:
        if topic in self._draining:
            return
        if self.start_soon(self._drain_topic, topic):
            self._draining.add(topic)

    async def _drain_topic(self, topic: Topic) -> None:
        from .backend_queue import BackendError

        retry = DRAIN_RETRY_MIN
        failing = False
        try:
            while True:
                try:
                    more = topic.drain(DRAIN_STEP)
                except BackendError as exc:
                    # a channel's disk is full: the batch waits in the topic,
                    # /ping says so, and the drain tries again by itself
                    self.set_unhealthy(f"drain {topic.name}", str(exc))
                    if not failing:
                        self.log.error("TOPIC: cannot move messages to a channel, retrying", topic=topic.name, error=str(exc))
                        failing = True
                    await trio.sleep(retry)
                    retry = min(retry * 2, DRAIN_RETRY_MAX)
                    continue
                if failing and not topic.stalled:
                    failing = False
                    retry = DRAIN_RETRY_MIN
                    self.set_healthy(f"drain {topic.name}")
                    self.log.info("TOPIC: moving messages to the channels again", topic=topic.name)
                if topic.drained_tokens and not topic.stalled:
                    # durable mode: the channels' copies reach the disk before
                    # the topic's records are let go
                    for channel in topic.channels.values():
                        if getattr(channel.backend, "dirty", False):
                            self._sync_due.add(channel.backend)
                    await self.sync_barrier()
                    topic.ack_drained()
                if not more:
                    break
                await trio.sleep(0)
        finally:
            self._draining.discard(topic)
            self.set_healthy(f"drain {topic.name}")

    # ------------------------------------------------------------ clients

    async def upgrade_stream(self, conn: Any, kind: str, action: Any) -> trio.abc.Stream:
        """Wrap a TCP connection's stream in what IDENTIFY negotiated (tcp.py's
        Upgrade action): ``tls``, then ``snappy`` or ``deflate``."""
        client = conn.client
        if kind == "tls":
            assert self.tls_context is not None
            stream = await upgrade_server_stream(conn.stream, self.tls_context)
            client.tls_info = connection_info(stream)
            return stream
        if kind == "snappy":
            return SnappyStream(conn.stream)
        if kind == "deflate":
            client.deflate_level = action.deflate_level
            return DeflateStream(conn.stream, action.deflate_level)
        raise ValueError(f"unknown stream upgrade {kind!r}")

    def new_client(self, remote_address: str) -> ClientV2:
        self._client_seq += 1
        client = ClientV2(self._client_seq, remote_address, self.options)
        self.clients[client.id] = client
        return client

    def remove_client(self, client: ClientV2) -> None:
        self.clients.pop(client.id, None)

    # ------------------------------------------------------------ stats

    def stats(self, topic: str | None = None, channel: str | None = None, include_clients: bool = True) -> dict[str, Any]:
        topics = [
            t.stats(channel, include_clients)
            for name, t in sorted(self.topics.items())
            if topic is None or name == topic
        ]
        producers = []
        if include_clients:
            for c in self.clients.values():
                if c.pub_counts and (topic is None or topic in c.pub_counts):
                    st = c.stats()
                    if topic is not None:
                        # nsqd narrows a producer's pub_counts to the topic asked for
                        st["pub_counts"] = [{"topic": topic, "count": c.pub_counts[topic]}]
                    producers.append(st)
        return {"topics": topics, "producers": producers}

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled, then shut down cleanly."""
        from .http_api import make_router
        from .http_server import serve_http
        from .tcp import serve_tcp

        opts = self.options
        tcp_listener, self.tcp_address, self.tcp_port = await open_listener(opts.tcp_address)
        https_listener = None
        if self.tls_context is not None and opts.https_address:
            https_listener, self.https_address, self.https_port = await open_listener(opts.https_address)
        http_listener, self.http_address, self.http_port = await open_listener(opts.http_address)
        self.log.info(f"TCP: listening on {self.tcp_address}")
        if https_listener is not None:
            self.log.info(f"HTTPS: listening on {self.https_address}")
        self.log.info(f"HTTP: listening on {self.http_address}")
        router = make_router(self)
        # --tls-required=true: plain HTTP only points at the HTTPS port
        plain_router = TLSRequiredRouter(self.https_port, router.default_max_body) if opts.tls_required == "true" else router
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                early, self._early_tasks = self._early_tasks, []
                for fn, args in early:
                    nursery.start_soon(fn, *args)
                nursery.start_soon(self._sync_ticker)
                for service in self.services:
                    nursery.start_soon(service)
                await nursery.start(serve_tcp, self, tcp_listener)
                if https_listener is not None:
                    ssl_listener = trio.SSLListener(https_listener, self.tls_context, https_compatible=True)
                    await nursery.start(partial(serve_http, ssl_listener, router, name="HTTPS"))
                await nursery.start(serve_http, http_listener, plain_router)
                task_status.started(self)
        finally:
            self._nursery = None
            self.exiting = True
            with trio.CancelScope(shield=True):
                self.close()

    def close(self) -> None:
        """The daemon is stopping: persist metadata, move what is only in
        memory (queued, in flight, deferred) to disk, close every queue."""
        self.metadata_changed()
        # messages on their way to a dead-letter topic stay in their channels
        self.dead_letters.give_back()
        written = 0
        for topic in self.topics.values():
            # what a full disk kept from a channel joins that channel's memory first
            topic.settle_stall()
            for channel in topic.channels.values():
                try:
                    counts = _unsaved_counts(channel)
                    deferrals = channel.flush_to_backend()
                    channel.backend.close()
                    if not channel.ephemeral and not topic.ephemeral:
                        self._save_deferrals(f"{topic.name}:{channel.name}", deferrals)
                    written += self._log_persisted(f"{topic.name}:{channel.name}", channel, counts)
                except Exception:
                    self.log.exception("failed to flush channel", topic=topic.name, channel=channel.name)
            try:
                counts = _unsaved_counts(topic)
                deferrals = topic.flush_to_backend()
                topic.backend.close()
                if not topic.ephemeral:
                    self._save_deferrals(topic.name, deferrals)
                written += self._log_persisted(topic.name, topic, counts)
            except Exception:
                self.log.exception("failed to flush topic", topic=topic.name)
        self.dead_letters.close()
        self.log.info(f"NSQ: persisted {written} in-memory messages to disk at exit", data_path=self.data_path)
        for hook in self.close_hooks:
            try:
                hook()
            except Exception:
                self.log.exception("close hook failed")

    def _log_persisted(self, queue: str, owner: Topic | Channel, counts: dict[str, int]) -> int:
        """One line per queue that had messages only in memory: what was
        written to disk at exit, and the depth now on disk."""
        total = sum(counts.values())
        if total:
            fields = {k: v for k, v in counts.items() if v}
            if isinstance(owner.backend, DummyBackendQueue):  # #ephemeral: memory only
                self.log.info(f"NSQ: dropped {total} messages of ephemeral {queue}", **fields)
                return 0
            self.log.info(f"NSQ: persisted {queue}: {total} messages written to disk", **fields, disk_depth=owner.backend.depth())
        return total


def _unsaved_counts(owner: Topic | Channel) -> dict[str, int]:
    """Messages a topic or channel holds only in memory (shutdown log)."""
    return {
        "memory": len(owner.memory),
        "in_flight": len(getattr(owner, "in_flight", ())),
        "deferred": len(getattr(owner, "deferred", ())),
    }


def _run_sync_jobs(jobs: list[Callable[[], None]]) -> list[Exception]:
    """Run a round's fsync jobs (in a worker thread); collect failures."""
    errors: list[Exception] = []
    for job in jobs:
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
    return errors


def _trio_clock() -> Callable[[], float]:
    """trio's clock as one bound method (trio.current_time goes through two
    more calls, per delivered message)."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:  # outside trio.run (unit tests of the sans-IO core)
        return trio.current_time
