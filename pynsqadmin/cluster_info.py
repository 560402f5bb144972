"""What the cluster looks like right now: nsqlookupd's and nsqd's HTTP APIs
asked concurrently (nsqadmin's ``clusterinfo``), with every failure kept next
to the node it belongs to, so a page can mark that node and render the rest.

:class:`ClusterInfo` is the I/O edge (``pynsqd.http_client``);
:class:`Snapshot` and :class:`NodeBook` are plain data.  Nodes are named as
nsqadmin names them: ``broadcast_address:http_port`` as registered with
nsqlookupd, or the ``--nsqd-http-address`` as given.
"""

from __future__ import annotations

import json
import math
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

import attrs
import trio

from pynsqd.http_client import HTTPClientError, http_request
from pynsqd.listener import format_address

from .options import Options


def base_url(address: str) -> str:
    """``host:port`` -> ``http://host:port``; a full http(s) URL is kept."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def producer_address(producer: dict[str, Any]) -> str:
    """nsqadmin's ``Producer.HTTPAddress``: broadcast address and HTTP port."""
    host = producer.get("broadcast_address") or producer.get("hostname") or ""
    return format_address(host, int(producer.get("http_port") or 0))


def client_ssl_context(options: Options) -> ssl.SSLContext | None:
    """The TLS settings of the ``--http-client-tls-*`` flags (None: defaults)."""
    o = options
    if not (o.http_client_tls_root_ca_file or o.http_client_tls_cert or o.http_client_tls_insecure_skip_verify):
        return None
    ctx = ssl.create_default_context(cafile=o.http_client_tls_root_ca_file or None)
    if o.http_client_tls_cert:
        ctx.load_cert_chain(o.http_client_tls_cert, o.http_client_tls_key)
    if o.http_client_tls_insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@attrs.define
class Answer:
    """One request's outcome: ``data`` (parsed JSON, or None) or ``error``."""

    address: str
    data: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {status} {message or body[:120].decode('utf-8', 'replace').strip()}"


@attrs.define
class NodeState:
    """One nsqd as seen in a snapshot."""

    address: str
    producer: dict[str, Any] = attrs.Factory(dict)  # lookupd's record of it
    lookupds: list[str] = attrs.Factory(list)  # lookupds listing it
    stats: dict[str, Any] | None = None
    info: dict[str, Any] | None = None
    error: str = ""

    @property
    def up(self) -> bool:
        return self.stats is not None

    def topic(self, name: str) -> dict[str, Any] | None:
        for t in (self.stats or {}).get("topics") or ():
            if t.get("topic_name") == name:
                return t
        return None


@attrs.define
class Snapshot:
    taken: float
    lookupds: dict[str, Answer] = attrs.Factory(dict)  # lookupd address -> its /nodes answer
    nodes: dict[str, NodeState] = attrs.Factory(dict)

    def stats_by_node(self) -> dict[str, dict[str, Any] | None]:
        return {addr: node.stats for addr, node in self.nodes.items()}

    def errors(self) -> list[str]:
        out = [f"nsqlookupd {a.address}: {a.error}" for a in self.lookupds.values() if not a.ok]
        out += [f"nsqd {n.address}: {n.error}" for n in self.nodes.values() if n.error]
        return out


class ClusterInfo:
    def __init__(self, options: Options, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.options = options
        self.ssl_context = ssl_context
        self.lookupd_addresses = list(options.lookupd_http_addresses)
        self.nsqd_addresses = list(options.nsqd_http_addresses)

    async def request(self, method: str, address: str, path: str, query: dict[str, str] | None = None) -> Answer:
        url = base_url(address) + path + ("?" + urlencode(query) if query else "")
        try:
            resp = await http_request(
                method,
                url,
                timeout=self.options.http_client_request_timeout,
                connect_timeout=self.options.http_client_connect_timeout,
                ssl_context=self.ssl_context,
                headers={"Accept": "application/vnd.nsq; version=1.0"},
            )
        except (HTTPClientError, OSError, ValueError) as exc:
            return Answer(address, error=str(exc) or type(exc).__name__)
        if resp.status != 200:
            return Answer(address, error=_error_text(resp.status, resp.body))
        if not resp.body:
            return Answer(address, data=None)
        try:
            data = json.loads(resp.body)
        except ValueError:
            data = resp.body.decode("utf-8", "replace")
        # pre-1.0 daemons wrap answers in {"status_code":..,"data":..}
        if isinstance(data, dict) and "status_code" in data and "data" in data:
            data = data["data"]
        return Answer(address, data=data)

    async def each(self, method: str, addresses: Iterable[str], path: str, query: dict[str, str] | None = None) -> dict[str, Answer]:
        """The same request to many daemons at once."""
        answers: dict[str, Answer] = {}

        async def one(address: str) -> None:
            answers[address] = await self.request(method, address, path, query)

        async with trio.open_nursery() as nursery:
            for address in dict.fromkeys(addresses):
                nursery.start_soon(one, address)
        return answers

    async def snapshot(
        self,
        *,
        topic: str | None = None,
        channel: str | None = None,
        include_clients: bool = False,
        with_info: bool = False,
        only: Sequence[str] | None = None,
    ) -> Snapshot:
        """Every lookupd's ``/nodes``, then every nsqd's ``/stats`` (and
        ``/info``) at once.  ``only`` limits the nsqds asked to those."""
        snap = Snapshot(taken=time.time())
        snap.lookupds = await self.each("GET", self.lookupd_addresses, "/nodes")
        for lookupd, answer in snap.lookupds.items():
            if not answer.ok:
                continue
            for producer in (answer.data or {}).get("producers") or ():
                address = producer_address(producer)
                node = snap.nodes.setdefault(address, NodeState(address, producer=producer))
                node.lookupds.append(lookupd)
        for address in self.nsqd_addresses:
            snap.nodes.setdefault(address, NodeState(address))
        if only is not None:
            snap.nodes = {a: n for a, n in snap.nodes.items() if a in only}
        query = {"format": "json", "include_clients": "true" if include_clients else "false", "include_mem": "false"}
        if topic:
            query["topic"] = topic
            if channel:
                query["channel"] = channel
        stats = await self.each("GET", snap.nodes, "/stats", query)
        infos = await self.each("GET", snap.nodes, "/info") if with_info else {}
        for address, node in snap.nodes.items():
            answer = stats[address]
            if answer.ok and isinstance(answer.data, dict):
                node.stats = answer.data
            else:
                node.error = answer.error or "unexpected /stats answer"
            if address in infos and infos[address].ok:
                node.info = infos[address].data
        return snap


# ---------------------------------------------------------------- memory of nodes


@attrs.define
class KnownNode:
    address: str
    last_up: float
    topics: set[str] = attrs.Factory(set)
    producer: dict[str, Any] = attrs.Factory(dict)
    error: str = ""


class NodeBook:
    """Remembers the nsqds seen up, so that one that stops answering -- or
    drops out of nsqlookupd, as a killed nsqd does at once -- is still listed,
    marked down, for ``memory`` seconds instead of silently vanishing."""

    def __init__(self, memory: float) -> None:
        self.memory = memory
        self._nodes: dict[str, KnownNode] = {}

    def update(self, snapshot: Snapshot, *, complete: bool = True) -> None:
        """Learn from a snapshot; ``complete`` when it asked every node (a
        filtered one tells nothing about the topics a node has)."""
        now = snapshot.taken
        for address, node in snapshot.nodes.items():
            known = self._nodes.get(address)
            if node.up:
                topics = {t.get("topic_name", "") for t in node.stats.get("topics") or ()}  # type: ignore[union-attr]
                if known is None:
                    known = self._nodes[address] = KnownNode(address, now)
                known.last_up = now
                known.error = ""
                if complete:
                    known.topics = topics
                else:
                    known.topics |= topics
                if node.producer:
                    known.producer = node.producer
            elif known is not None:
                known.error = node.error
        for address in [a for a, k in self._nodes.items() if now - k.last_up > self.memory]:
            del self._nodes[address]

    def down(self, snapshot: Snapshot, topic: str | None = None) -> list[KnownNode]:
        """Nodes seen up before that are not up in ``snapshot`` (with
        ``topic``: only those that had it)."""
        out = []
        for address, known in sorted(self._nodes.items()):
            node = snapshot.nodes.get(address)
            if node is not None and node.up:
                continue
            if topic is not None and topic not in known.topics:
                continue
            if node is not None and node.error:
                known.error = node.error
            elif node is None and not known.error:
                known.error = "no longer registered with any nsqlookupd"
            out.append(known)
        return out


def ago(seconds: float) -> str:
    """``12s``, ``5m``, ``2h`` for how long ago something was."""
    if math.isnan(seconds) or seconds < 0:
        seconds = 0
    if seconds < 120:
        return f"{int(seconds)}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}m"
    return f"{int(seconds // 3600)}h"
