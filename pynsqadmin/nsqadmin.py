"""The nsqadmin daemon: the HTTP listener, the sampler that feeds the graphs'
history, and the nursery that owns both (and the admin-action notifications)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from pynsqd import log as logging
from pynsqd import version_string
from pynsqd.http_client import HTTPClientError, http_post
from pynsqd.daemon import running
from pynsqd.http_server import Request, serve_http
from pynsqd.listener import listen_or_fail
from pynsqd.log import get_logger

from .actions import Target
from .cluster_info import ClusterInfo, NodeBook, client_ssl_context
from .history import History
from .http_api import AdminHTTP
from .options import Options

# notifications waiting to be sent; beyond this they are dropped (and logged)
NOTIFY_BACKLOG = 100


class NSQAdmin:
    """Run with ``await nursery.start(admin.run)`` or :func:`open_nsqadmin`.

    ``http_address``/``http_port`` hold the bound address once started;
    :meth:`shutdown` cancels every task it owns.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self.cluster = ClusterInfo(options, ssl_context=client_ssl_context(options))
        self.history = History(options.history_points, max_series=options.history_max_series)
        self.nodes = NodeBook(options.down_node_memory)
        self.log_level = options.log_level
        self.http_address = ""
        self.http_port = 0
        self.samples = 0  # sampling rounds done
        self.last_sample_seconds = 0.0
        # what the last round saw, so that changes are logged once
        self._up: set[str] = set()
        self._lookupds_failing: set[str] = set()
        self._cancel_scope = trio.CancelScope()
        self._notify_send, self._notify_receive = trio.open_memory_channel[dict[str, Any]](NOTIFY_BACKLOG)
        self._log = get_logger()

    async def run(self, *, task_status: trio.TaskStatus[NSQAdmin] = trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel_scope:
            self._log.info(version_string("nsqadmin"))
            listener, self.http_address, self.http_port = await listen_or_fail(self.options.http_address)
            router = AdminHTTP(self).router()
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve_http, listener, router, server_header=b"pynsqadmin"))
                self._log.info(f"HTTP: listening on {self.http_address}")
                nursery.start_soon(self._sampler)
                if self.options.notification_http_endpoint:
                    nursery.start_soon(self._notifier)
                task_status.started(self)
        self._log.info("exiting")

    def shutdown(self) -> None:
        self._cancel_scope.cancel()

    # ------------------------------------------------------------ sampling

    async def sample_once(self) -> None:
        """One round: every nsqd's /stats into the history, nodes noted."""
        started = trio.current_time()
        snapshot = await self.cluster.snapshot()
        self.history.record(snapshot.taken, snapshot.stats_by_node())
        self.nodes.update(snapshot)
        self.samples += 1
        self.last_sample_seconds = trio.current_time() - started
        up = {addr for addr, node in snapshot.nodes.items() if node.up}
        for addr in sorted(self._up - up):
            node = snapshot.nodes.get(addr)
            self._log.warning("nsqd down", node=addr, error=node.error if node else "no longer registered with any nsqlookupd")
        for addr in sorted(up - self._up):
            self._log.info("nsqd up", node=addr)
        self._up = up
        failing = {a.address for a in snapshot.lookupds.values() if not a.ok}
        for addr in sorted(failing - self._lookupds_failing):
            self._log.warning("nsqlookupd unreachable", lookupd=addr, error=snapshot.lookupds[addr].error)
        for addr in sorted(self._lookupds_failing - failing):
            self._log.info("nsqlookupd reachable again", lookupd=addr)
        self._lookupds_failing = failing
        if self.history.untracked:
            self._log.warning("history full, topics/channels not graphed", untracked=self.history.untracked, max_series=self.options.history_max_series)

    async def _sampler(self) -> None:
        interval = self.options.sample_interval
        # a round is bounded, but long enough for its two request stages to
        # time out: one hung nsqd then costs late points, not every point
        budget = max(interval, 2 * self.options.http_client_request_timeout)
        next_at = trio.current_time()
        while True:
            with trio.move_on_after(budget):
                await self.sample_once()
            next_at += interval
            now = trio.current_time()
            if next_at < now:  # fell behind: skip, never burst
                next_at = now + interval
            await trio.sleep_until(next_at)

    # ------------------------------------------------------------ notifications

    def notify(self, action: str, target: Target, *, user: str, request: Request) -> None:
        """Queue nsqadmin's admin-action notification for
        --notification-http-endpoint (a no-op without it)."""
        if not self.options.notification_http_endpoint:
            return
        host = (request.header(b"host") or b"").decode("latin-1")
        event = {
            "action": action,
            "topic": target.topic,
            "channel": target.channel,
            "node": target.node,
            "timestamp": int(time.time()),
            "user": user,
            "remote_ip": request.remote_address.rsplit(":", 1)[0].strip("[]"),
            "user_agent": (request.header(b"user-agent") or b"").decode("latin-1"),
            "url": f"http://{host}{request.path}",
            "via": "pynsqadmin",
        }
        try:
            self._notify_send.send_nowait(event)
        except trio.WouldBlock:
            self._log.warning("notification dropped: endpoint too slow", action=action)

    async def _notifier(self) -> None:
        endpoint = self.options.notification_http_endpoint
        async for event in self._notify_receive:
            try:
                resp = await http_post(
                    endpoint,
                    json.dumps(event).encode(),
                    headers={"Content-Type": "application/json"},
                    timeout=self.options.http_client_request_timeout,
                    connect_timeout=self.options.http_client_connect_timeout,
                    ssl_context=self.cluster.ssl_context,
                )
                if resp.status >= 300:
                    self._log.warning("notification refused", endpoint=endpoint, status=resp.status)
            except (HTTPClientError, OSError, ValueError) as exc:
                self._log.warning("notification failed", endpoint=endpoint, error=str(exc))

    def set_log_level(self, level: str) -> None:
        self.log_level = level
        o = self.options
        logging.configure(app="nsqadmin", prefix=o.log_prefix, level=level, fmt=o.log_format)


@asynccontextmanager
async def open_nsqadmin(options: Options | None = None, **kwargs: Any) -> AsyncIterator[NSQAdmin]:
    """An in-process nsqadmin for tests and embedding."""
    daemon = NSQAdmin(options if options is not None else Options(**kwargs))  # type: ignore[arg-type]
    async with running(daemon):
        yield daemon
