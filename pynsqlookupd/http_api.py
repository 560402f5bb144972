"""nsqlookupd's HTTP API: the endpoints, JSON shapes and error codes of
nsqlookupd 1.3.0 (nsqadmin and every client parse them), plus ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pynsqd import NSQ_VERSION
from pynsqd.http_server import HTTPError, Request, Response, Router, plain_text, respond
from pynsqd.log import get_logger
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from .options import Options
from .registration_db import CHANNEL, CLIENT, TOPIC, RegistrationDB

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _required(req: Request, name: str) -> str:
    """A query parameter that must be present (it may be empty, as in Go)."""
    value = req.arg(name)
    if value is None:
        raise HTTPError(400, f"MISSING_ARG_{name.upper()}")
    return value


def _topic_channel_args(req: Request) -> tuple[str, str]:
    """Go's ``http_api.GetTopicChannelArgs``."""
    topic = _required(req, "topic")
    if not is_valid_topic_name(topic):
        raise HTTPError(400, "INVALID_ARG_TOPIC")
    channel = _required(req, "channel")
    if not is_valid_channel_name(channel):
        raise HTTPError(400, "INVALID_ARG_CHANNEL")
    return topic, channel


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class LookupHTTPAPI:
    def __init__(self, db: RegistrationDB, options: Options, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.options = options
        self.clock = clock
        self._log = get_logger()

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/ping", self.ping)
        r.add("GET", "/info", self.info)
        r.add("GET", "/debug", self.debug)
        r.add("GET", "/lookup", self.lookup)
        r.add("GET", "/topics", self.topics)
        r.add("GET", "/channels", self.channels)
        r.add("GET", "/nodes", self.nodes)
        r.add("GET", "/metrics", self.metrics)
        r.add("POST", "/topic/create", self.create_topic)
        r.add("POST", "/topic/delete", self.delete_topic)
        r.add("POST", "/channel/create", self.create_channel)
        r.add("POST", "/channel/delete", self.delete_channel)
        r.add("POST", "/topic/tombstone", self.tombstone_topic_producer)
        return r

    # ------------------------------------------------------------ read-only

    async def ping(self, req: Request) -> Response:
        return plain_text("OK")

    async def info(self, req: Request) -> Response:
        return respond({"version": NSQ_VERSION})

    async def topics(self, req: Request) -> Response:
        return respond({"topics": self.db.topics()})

    async def channels(self, req: Request) -> Response:
        topic = _required(req, "topic")
        return respond({"channels": self.db.channels(topic)})

    async def lookup(self, req: Request) -> Response:
        topic = _required(req, "topic")
        if not self.db.find_registrations(TOPIC, topic, ""):
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        producers = self.db.active_producers(
            TOPIC,
            topic,
            "",
            inactive_timeout=self.options.inactive_producer_timeout,
            tombstone_lifetime=self.options.tombstone_lifetime,
            now=self.clock(),
        )
        return respond({"channels": self.db.channels(topic), "producers": [p.peer.to_json() for p in producers]})

    async def nodes(self, req: Request) -> Response:
        now = self.clock()
        lifetime = self.options.tombstone_lifetime
        # tombstoned nodes are listed too: their tombstones say which topics
        producers = self.db.active_producers(
            CLIENT, "", "", inactive_timeout=self.options.inactive_producer_timeout, tombstone_lifetime=0.0, now=now
        )
        nodes = []
        for producer in producers:
            peer = producer.peer
            topics = [r.key for r in self.db.lookup_registrations(peer.id) if r.category == TOPIC]
            node = peer.to_json()
            node["tombstones"] = [self.db.topic_tombstoned(t, peer.id, lifetime, now) for t in topics]
            node["topics"] = topics
            nodes.append(node)
        return respond({"producers": nodes})

    async def debug(self, req: Request) -> Response:
        data: dict[str, list[dict[str, Any]]] = {}
        for reg, producers in self.db.items():
            if not producers:
                continue
            data[reg.debug_key()] = [
                {
                    "id": p.peer.id,
                    "hostname": p.peer.hostname,
                    "broadcast_address": p.peer.broadcast_address,
                    "tcp_port": p.peer.tcp_port,
                    "http_port": p.peer.http_port,
                    "version": p.peer.version,
                    "last_update": round(p.peer.last_update * 1e9),
                    "tombstoned": p.tombstoned,
                    # Go reports the zero time.Time's UnixNano here; 0 is saner
                    "tombstoned_at": round(p.tombstoned_at * 1e9) if p.tombstoned else 0,
                }
                for p in producers
            ]
        return respond(data)

    async def metrics(self, req: Request) -> Response:
        """Prometheus text exposition: what nsqadmin shows, as gauges."""
        producers = self.db.find_producers(CLIENT, "", "")
        topics = self.db.topics()
        channel_count = len(self.db.find_registrations(CHANNEL, "*", "*"))
        lines = [
            "# HELP nsqlookupd_info nsqlookupd version this server is compatible with.",
            "# TYPE nsqlookupd_info gauge",
            f'nsqlookupd_info{{version="{NSQ_VERSION}"}} 1',
            "# HELP nsqlookupd_producers Identified nsqd producers connected.",
            "# TYPE nsqlookupd_producers gauge",
            f"nsqlookupd_producers {len(producers)}",
            "# HELP nsqlookupd_topics Topics registered.",
            "# TYPE nsqlookupd_topics gauge",
            f"nsqlookupd_topics {len(topics)}",
            "# HELP nsqlookupd_channels Channels registered.",
            "# TYPE nsqlookupd_channels gauge",
            f"nsqlookupd_channels {channel_count}",
            "# HELP nsqlookupd_topic_producers Producers registered per topic.",
            "# TYPE nsqlookupd_topic_producers gauge",
        ]
        for topic in topics:
            count = len(self.db.find_producers(TOPIC, topic, ""))
            lines.append(f'nsqlookupd_topic_producers{{topic="{_escape_label(topic)}"}} {count}')
        return Response(200, ("\n".join(lines) + "\n").encode(), PROMETHEUS_CONTENT_TYPE)

    # ------------------------------------------------------------ admin

    async def create_topic(self, req: Request) -> Response:
        topic = _required(req, "topic")
        if not is_valid_topic_name(topic):
            raise HTTPError(400, "INVALID_ARG_TOPIC")
        self._log.info("DB: adding topic", topic=topic)
        self.db.create_topic(topic)
        return respond()

    async def delete_topic(self, req: Request) -> Response:
        topic = _required(req, "topic")
        for reg in self.db.delete_topic(topic):
            if reg.category == CHANNEL:
                self._log.info("DB: removing channel", topic=topic, channel=reg.subkey)
            else:
                self._log.info("DB: removing topic", topic=topic)
        return respond()

    async def create_channel(self, req: Request) -> Response:
        topic, channel = _topic_channel_args(req)
        self._log.info("DB: adding channel", topic=topic, channel=channel)
        self.db.create_channel(topic, channel)
        return respond()

    async def delete_channel(self, req: Request) -> Response:
        topic, channel = _topic_channel_args(req)
        if not self.db.delete_channel(topic, channel):
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        self._log.info("DB: removing channel", topic=topic, channel=channel)
        return respond()

    async def tombstone_topic_producer(self, req: Request) -> Response:
        topic = _required(req, "topic")
        node = _required(req, "node")
        count = self.db.tombstone_topic_producer(topic, node, self.clock())
        self._log.info("DB: setting tombstone", topic=topic, node=node, producers=count)
        return respond()
