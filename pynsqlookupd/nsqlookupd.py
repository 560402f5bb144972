"""The nsqlookupd daemon: listeners, the shared DB, and the nursery that owns
every connection task."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

from pynsqd import NSQ_VERSION, version_string
from pynsqd.daemon import running
from pynsqd.http_server import serve_http
from pynsqd.listener import ListenError, listen_or_fail
from pynsqd.log import get_logger

from .http_api import LookupHTTPAPI
from .lookup_protocol_v1 import ServerInfo
from .options import Options
from .registration_db import RegistrationDB
from .tcp import serve_tcp

__all__ = ["ListenError", "NSQLookupd", "open_nsqlookupd"]


class NSQLookupd:
    """Run with ``await nursery.start(lookupd.run)`` or :func:`open_nsqlookupd`.

    ``tcp_address``/``http_address`` hold the real bound addresses (port 0
    resolved) once started; :meth:`shutdown` cancels every task it owns.
    """

    def __init__(self, options: Options, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.clock = clock
        self.db = RegistrationDB()
        self.tcp_address = ""
        self.http_address = ""
        self.tcp_port = 0
        self.http_port = 0
        self._cancel_scope = trio.CancelScope()
        self._log = get_logger()

    async def run(self, *, task_status: trio.TaskStatus[NSQLookupd] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind both listeners, report started, serve until cancelled."""
        with self._cancel_scope:
            self._log.info(version_string("nsqlookupd"))
            tcp_listener, self.tcp_address, self.tcp_port = await listen_or_fail(self.options.tcp_address)
            try:
                http_listener, self.http_address, self.http_port = await listen_or_fail(self.options.http_address)
            except BaseException:
                await tcp_listener.aclose()
                raise
            server = ServerInfo(
                tcp_port=self.tcp_port,
                http_port=self.http_port,
                version=NSQ_VERSION,
                broadcast_address=self.options.broadcast_address,
                hostname=socket.gethostname(),
            )
            router = LookupHTTPAPI(self.db, self.options, clock=self.clock).router()
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve_tcp, tcp_listener, self.db, server, clock=self.clock))
                self._log.info(f"TCP: listening on {self.tcp_address}")
                await nursery.start(partial(serve_http, http_listener, router, server_header=b"pynsqlookupd"))
                self._log.info(f"HTTP: listening on {self.http_address}")
                task_status.started(self)
        self._log.info("exiting")

    def shutdown(self) -> None:
        """Stop serving: closes the listeners and every connection."""
        self._cancel_scope.cancel()


@asynccontextmanager
async def open_nsqlookupd(options: Options | None = None, **kwargs: object) -> AsyncIterator[NSQLookupd]:
    """An in-process nsqlookupd for tests and embedding: serving inside the
    block, shut down on exit.  ``kwargs`` are :class:`Options` fields."""
    daemon = NSQLookupd(options if options is not None else Options(**kwargs))  # type: ignore[arg-type]
    async with running(daemon):
        yield daemon
