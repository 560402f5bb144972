"""nsqd's HTTP API (:4151): publish, stats, topic/channel admin, config.

Status codes and ``{"message": CODE}`` errors as nsqd 1.3.0 answers them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import time
from collections.abc import Sequence

import trio

from . import inspection
from . import replay as replay_mod
from .backend_queue import BackendError
from .disk_queue import ReadCost, index_ids
from .flags import parse_duration
from .debug import debug_routes
from .http_server import HTTPError, Request, Response, Router, plain_text, respond
from .metrics import metrics_endpoint
from .options import config_value
from .protocol import MSG_ID_LENGTH, ProtocolError, decode_mpub_body, is_valid_channel_name, is_valid_topic_name
from .retention import Policy, file_holds, parse_since
from .settings import CHANNEL_SETTINGS, TOPIC_SETTINGS, Setting, apply_changes, parse_query
from .stats import format_text_stats, memory_stats
from .topic import Topic, TopicExiting, TopicFull

if TYPE_CHECKING:
    from .channel import Channel
    from .nsqd import NSQD

_TRUE = {"true": True, "1": True, "false": False, "0": False}
# a lookup by id scans at most this much of a queue's unindexed tail on the event loop
_ID_INDEX_INLINE_BYTES = 1 << 20


def make_router(nsqd: NSQD) -> Router:
    api = HTTPAPI(nsqd)
    opts = nsqd.options
    r = Router(default_max_body=max(opts.max_body_size, 1 << 20))
    r.add("GET", "/ping", api.ping)
    r.add("GET", "/info", api.info)
    # nsqd reads one byte past the limit to tell "too big" from "just fits"
    r.add("POST", "/pub", api.pub, max_body=opts.max_msg_size, too_big="MSG_TOO_BIG")
    r.add("POST", "/mpub", api.mpub, max_body=opts.max_body_size, too_big="BODY_TOO_BIG")
    r.add("GET", "/stats", api.stats)
    r.add("POST", "/topic/create", api.topic_create)
    r.add("POST", "/topic/delete", api.topic_delete)
    r.add("POST", "/topic/empty", api.topic_empty)
    r.add("POST", "/topic/pause", api.topic_pause)
    r.add("POST", "/topic/unpause", api.topic_pause)
    r.add("POST", "/channel/create", api.channel_create)
    r.add("POST", "/channel/delete", api.channel_delete)
    r.add("POST", "/channel/empty", api.channel_empty)
    r.add("POST", "/channel/pause", api.channel_pause)
    r.add("POST", "/channel/unpause", api.channel_pause)
    r.add(("GET", "POST"), "/topic/retention", api.topic_retention)
    r.add("POST", "/channel/rewind", api.channel_rewind)
    r.add("GET", "/topic/peek", api.topic_peek)
    r.add("GET", "/channel/peek", api.channel_peek)
    r.add("GET", "/message/find", api.message_find)
    r.add(("GET", "PUT"), "/config/*", api.config)
    # beyond nsqd: per-topic/channel settings of the opt-in features, dead letters
    r.add(("GET", "POST"), "/topic/settings", api.topic_settings)
    r.add(("GET", "POST"), "/channel/settings", api.channel_settings)
    r.add("GET", "/dead_letter/message", api.dead_letter_message)
    r.add("GET", "/dead_letter/messages", api.dead_letter_messages)
    r.add("POST", "/dead_letter/requeue", api.dead_letter_requeue)
    r.add("GET", "/metrics", metrics_endpoint(nsqd))
    for path, handler in debug_routes(nsqd).items():
        r.add("GET", path, handler)
    extra = getattr(nsqd, "extra_routes", None)
    if extra is not None:
        extra(r)
    return r


class HTTPAPI:
    def __init__(self, nsqd: NSQD) -> None:
        self.nsqd = nsqd

    # ------------------------------------------------------------ helpers

    def _topic_name(self, req: Request, invalid: str = "INVALID_TOPIC") -> str:
        name = req.arg("topic")
        if name is None:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        if not is_valid_topic_name(name):
            raise HTTPError(400, invalid)
        return name

    def _existing_topic_and_channel(self, req: Request) -> tuple[Topic, str]:
        topic_name = self._topic_name(req, "INVALID_ARG_TOPIC")
        channel_name = req.arg("channel")
        if channel_name is None:
            raise HTTPError(400, "MISSING_ARG_CHANNEL")
        if not is_valid_channel_name(channel_name):
            raise HTTPError(400, "INVALID_ARG_CHANNEL")
        topic = self.nsqd.get_existing_topic(topic_name)
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        return topic, channel_name

    def _existing_channel(self, req: Request) -> tuple[Topic, Channel]:
        topic, channel_name = self._existing_topic_and_channel(req)
        channel = topic.get_existing_channel(channel_name)
        if channel is None:
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        return topic, channel

    def _existing_topic(self, req: Request) -> Topic:
        topic = self.nsqd.get_existing_topic(self._topic_name(req, "INVALID_ARG_TOPIC"))
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        return topic

    @staticmethod
    def _message_id(req: Request, name: str = "id") -> bytes:
        """``id``: a message id as nsqd writes them (16 lowercase hex digits)."""
        text = req.arg(name)
        if not text:
            raise HTTPError(400, f"MISSING_ARG_{name.upper()}")
        msg_id = text.encode()
        if len(msg_id) != MSG_ID_LENGTH or any(c not in b"0123456789abcdef" for c in msg_id):
            raise HTTPError(400, f"INVALID_ARG_{name.upper()}")
        return msg_id

    @staticmethod
    def _int_arg(req: Request, name: str, default: int, lo: int, hi: int) -> int:
        text = req.arg(name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise HTTPError(400, f"INVALID_ARG_{name.upper()}") from None
        if not lo <= value <= hi:
            raise HTTPError(400, f"INVALID_ARG_{name.upper()}")
        return value

    @staticmethod
    def _bool_arg(req: Request, name: str) -> bool:
        return _TRUE.get((req.arg(name) or "").lower(), False)

    async def _put(self, topic: Topic, msgs: list, failed: str) -> Response:
        try:
            if topic.max_disk_bytes:
                topic.check_disk_bound()
            topic.put_messages(msgs)
        except TopicFull as exc:
            # back-pressure, not a failure of the daemon: /ping stays OK
            self.nsqd.log.debug("publish refused", topic=topic.name, reason=str(exc))
            raise HTTPError(503, "TOPIC_FULL") from None
        except TopicExiting:
            raise HTTPError(503, "EXITING") from None
        except BackendError as exc:
            self.nsqd.note_put_failure(exc)
            raise HTTPError(500, failed) from None
        if self.nsqd.sync_pending():
            await self.nsqd.sync_barrier()
        if not self.nsqd.is_healthy():
            self.nsqd.note_put_success()
        return respond("OK")

    async def _persisted(self) -> Response:
        """An admin change is answered once nsqd.dat has it (written off the
        event loop, with the next group commit)."""
        if self.nsqd.sync_pending():
            await self.nsqd.sync_barrier()
        return respond(None)

    # ------------------------------------------------------------ endpoints

    async def ping(self, req: Request) -> Response:
        nsqd = self.nsqd
        if not nsqd.is_healthy():
            return plain_text(nsqd.health(), 500)
        return plain_text("OK")

    async def info(self, req: Request) -> Response:
        n = self.nsqd
        o = n.options
        return respond(
            {
                "version": n.version,
                "broadcast_address": o.broadcast_address,
                "hostname": n.hostname,
                "http_port": n.http_port,
                "tcp_port": n.tcp_port,
                "start_time": n.start_time,
                "max_heartbeat_interval": round(o.max_heartbeat_interval * 1e9),
                "max_output_buffer_size": o.max_output_buffer_size,
                "max_output_buffer_timeout": round(o.max_output_buffer_timeout * 1e9),
                "max_deflate_level": o.max_deflate_level,
                "topology_zone": o.topology_zone,
                "topology_region": o.topology_region,
            }
        )

    async def pub(self, req: Request) -> Response:
        body = req.body
        if not body:
            raise HTTPError(400, "MSG_EMPTY")
        # nsqd creates the topic before it looks at ?defer
        topic = self.nsqd.get_topic(self._topic_name(req))
        deferred = 0.0
        if req.has_arg("defer"):
            try:
                ms = int(req.arg("defer") or "")
            except ValueError:
                raise HTTPError(400, "INVALID_DEFER") from None
            if ms < 0 or ms > self.nsqd.options.max_req_timeout * 1000:
                raise HTTPError(400, "INVALID_DEFER")
            deferred = ms / 1000.0
        return await self._put(topic, [topic.new_message(body, deferred)], "PUB_FAILED")

    async def mpub(self, req: Request) -> Response:
        opts = self.nsqd.options
        name = self._topic_name(req)
        binary = _TRUE.get((req.arg("binary") or "").lower(), False)
        if binary:
            try:
                bodies = decode_mpub_body(req.body, opts.max_msg_size, opts.max_body_size)
            except ProtocolError as err:
                raise HTTPError(413, err.code[2:]) from None
        else:
            bodies = []
            for line in req.body.split(b"\n"):
                if not line:
                    continue  # nsqd silently skips empty lines
                if len(line) > opts.max_msg_size:
                    raise HTTPError(413, "MSG_TOO_BIG")
                bodies.append(line)
        topic = self.nsqd.get_topic(name)
        if not bodies:
            return respond("OK")
        return await self._put(topic, topic.new_messages(bodies), "MPUB_FAILED")

    async def stats(self, req: Request) -> Response:
        n = self.nsqd
        fmt = req.arg("format") or "text"
        topic = req.arg("topic") or None
        channel = req.arg("channel") or None
        include_clients = _TRUE.get((req.arg("include_clients") or "").lower(), True)
        include_mem = _TRUE.get((req.arg("include_mem") or "").lower(), True)
        stats = n.stats(topic, channel, include_clients)
        mem = memory_stats() if include_mem else None
        if fmt != "json":
            return respond(format_text_stats(n, stats, mem))
        out = {
            "version": n.version,
            "health": n.health(),
            "start_time": n.start_time,
            "topics": stats["topics"],
        }
        if mem is not None:
            out["memory"] = mem
        out["producers"] = stats["producers"]
        return respond(out)

    async def topic_create(self, req: Request) -> Response:
        self.nsqd.get_topic(self._topic_name(req))
        return await self._persisted()

    async def topic_delete(self, req: Request) -> Response:
        name = req.arg("topic")
        if name is None:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        if not self.nsqd.delete_existing_topic(name):
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        return await self._persisted()

    async def topic_empty(self, req: Request) -> Response:
        topic = self.nsqd.get_existing_topic(self._topic_name(req))
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        topic.empty()
        return respond(None)

    async def topic_pause(self, req: Request) -> Response:
        name = req.arg("topic")
        if name is None:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        topic = self.nsqd.get_existing_topic(name)
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        if req.path.endswith("unpause"):
            topic.unpause()
        else:
            topic.pause()
        self.nsqd.metadata_changed()
        return await self._persisted()

    async def channel_create(self, req: Request) -> Response:
        topic, channel_name = self._existing_topic_and_channel(req)
        since = self._since(req, topic) if req.arg("since") is not None else None
        channel = topic.get_channel(channel_name)
        if since is not None:
            # from a point of the retained history instead of "from now"
            await self._replay(topic, channel, since)
        return await self._persisted()

    async def channel_delete(self, req: Request) -> Response:
        topic, channel_name = self._existing_topic_and_channel(req)
        if not topic.delete_existing_channel(channel_name):
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        return await self._persisted()

    async def channel_empty(self, req: Request) -> Response:
        topic, channel = self._existing_channel(req)
        channel.empty()
        self.nsqd.dead_letters.channel_emptied(topic, channel)
        self.nsqd.retention.cancel_replay(topic, channel)  # what it had still to give goes too
        return respond(None)

    async def channel_pause(self, req: Request) -> Response:
        topic, channel = self._existing_channel(req)
        if req.path.endswith("unpause"):
            channel.unpause()
        else:
            channel.pause()
        self.nsqd.metadata_changed()
        return await self._persisted()

    # ------------------------------------------------------------ retention and replay

    def _since(self, req: Request, topic: Topic) -> int:
        if topic.retention is None:
            raise HTTPError(400, "RETENTION_NOT_ENABLED")
        try:
            return parse_since(req.arg("since") or "", time.time_ns())
        except ValueError:
            raise HTTPError(400, "INVALID_ARG_SINCE") from None

    async def _replay(self, topic: Topic, channel: Channel, since: int) -> None:
        retention = self.nsqd.retention
        replay = retention.rewind(topic, channel, since)
        # before anything else runs: a backlog the topic drains into the channel meanwhile is checked against it
        retention.attach(topic, channel, replay)
        if replay_mod.persistent(topic, channel):
            await replay_mod.save_cursor(self.nsqd, topic, channel)  # on disk before the answer
        if topic.retention is not None and channel.replay is replay and not channel.exiting:
            retention.start_replay(topic, channel, replay)

    async def channel_rewind(self, req: Request) -> Response:
        """Give a channel again every retained message published since ``since``."""
        topic, channel = self._existing_channel(req)
        topic = self.nsqd.topics[channel.topic_name]
        await self._replay(topic, channel, self._since(req, topic))
        return respond(None)

    async def topic_retention(self, req: Request) -> Response:
        """GET: a topic's retention and what it holds; POST ``time=&bytes=``:
        the topic's own setting (``reset=true``: back to the flags')."""
        topic = self._existing_topic(req)
        retention = self.nsqd.retention
        if req.method == "POST":
            if topic.ephemeral:
                raise HTTPError(400, "EPHEMERAL_TOPIC")
            if self._bool_arg(req, "reset"):
                retention.set(topic, None)
            else:
                if req.arg("time") is None and req.arg("bytes") is None:
                    raise HTTPError(400, "MISSING_ARG_TIME")
                try:
                    seconds = parse_duration(req.arg("time") or "0")
                except ValueError:
                    raise HTTPError(400, "INVALID_ARG_TIME") from None
                size = self._int_arg(req, "bytes", 0, 0, 1 << 62)
                if seconds < 0:
                    raise HTTPError(400, "INVALID_ARG_TIME")
                retention.set(topic, Policy(seconds, size))
            await self._persisted()
        policy = retention.policy_of(topic)
        out: dict[str, object] = {
            "topic_name": topic.name,
            "enabled": topic.retention is not None,
            "source": "topic" if "retention" in topic.settings else "default",
            **policy.as_json(),
        }
        if topic.retention is not None:
            out.update(topic.retention.stats())
        return respond(out)

    # ------------------------------------------------------------ inspection

    def _peek_args(self, req: Request) -> tuple[int, int]:
        count = self._int_arg(req, "count", inspection.DEFAULT_COUNT, 1, inspection.MAX_COUNT)
        body_limit = self._int_arg(req, "body_limit", inspection.DEFAULT_BODY_LIMIT, 0, inspection.MAX_BODY_LIMIT)
        return count, body_limit

    async def channel_peek(self, req: Request) -> Response:
        """The next messages of a channel, in delivery order, taking none."""
        topic, channel = self._existing_channel(req)
        count, body_limit = self._peek_args(req)
        return respond(
            inspection.peek_channel(
                channel, count, body_limit,
                deferred=self._bool_arg(req, "include_deferred"), in_flight=self._bool_arg(req, "include_in_flight"),
            )
        )

    async def topic_peek(self, req: Request) -> Response:
        """The next messages a topic holds for its channels, taking none."""
        topic = self._existing_topic(req)
        count, body_limit = self._peek_args(req)
        from .nsqd import DRAIN_STEP

        return respond(inspection.peek_topic(topic, count, body_limit, DRAIN_STEP))

    async def message_find(self, req: Request) -> Response:
        """Where a message id is: in the topic's own queue and in each
        channel (or the one asked for): queued, deferred, in flight, or not."""
        topic = self._existing_topic(req)
        msg_id = self._message_id(req)
        _, body_limit = self._peek_args(req)
        channels = list(topic.channels.values())
        if req.arg("channel") is not None:
            channels = [self._existing_channel(req)[1]]
        await _extend_id_indexes([c.backend for c in channels] + ([topic.backend] if req.arg("channel") is None else []))
        cost = ReadCost()
        out: dict[str, object] = {"id": msg_id.decode(), "topic_name": topic.name}
        if req.arg("channel") is None:
            out["topic"] = inspection.find_in_topic(topic, msg_id, body_limit, cost)
        out["channels"] = [
            {"channel_name": c.name, **self._find_in_channel(c, msg_id, body_limit, cost)} for c in channels if not c.exiting
        ]
        if topic.retention is not None:
            candidates = topic.retention.id_candidates(msg_id)
            out["retained"] = await trio.to_thread.run_sync(file_holds, candidates, msg_id, self.nsqd.options.max_msg_size)
        out["examined"] = cost.as_dict()
        return respond(out)

    def _find_in_channel(self, channel: Channel, msg_id: bytes, body_limit: int, cost: ReadCost) -> dict[str, object]:
        """One channel's answer to ``/message/find``: a message it no longer
        holds because it dead-lettered it is found where it went."""
        found = inspection.find_in_channel(channel, msg_id, body_limit, cost)
        if found["state"] == "not_found":
            went = self.nsqd.dead_letters.lookup_original(channel.topic_name, channel.name, msg_id)
            if went is not None:
                return {"state": "dead_lettered", **went}
        return found

    async def config(self, req: Request) -> Response:
        name = req.path.rsplit("/", 1)[1]
        nsqd = self.nsqd
        if req.method == "PUT":
            return await nsqd.set_config(name, req.body)
        try:
            return respond(config_value(nsqd.options, name))
        except KeyError:
            raise HTTPError(400, "INVALID_OPTION") from None


    # ------------------------------------------------------------ beyond nsqd: settings

    def _changes(self, req: Request, table: dict[str, Setting]) -> dict[str, object]:
        """POST: the settings asked for (400 if none or one does not parse)."""
        try:
            changes = parse_query({k: req.arg(k) or "" for k in table if req.has_arg(k)}, table)
        except KeyError as exc:
            raise HTTPError(400, f"INVALID_ARG_{str(exc.args[0]).upper()}") from None
        if not changes:
            raise HTTPError(400, "MISSING_ARG_" + "_OR_".join(k.upper() for k in table))
        return changes

    async def topic_settings(self, req: Request) -> Response:
        """``/topic/settings?topic=T[&max_disk_bytes=N|default]``: POST sets
        (persisted in nsqd.dat), both answer the topic's settings in effect."""
        topic = self.nsqd.get_existing_topic(self._topic_name(req))
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        if req.method == "POST":
            if topic.ephemeral:
                raise HTTPError(400, "EPHEMERAL_TOPIC")  # memory only: nothing on disk to bound
            apply_changes(topic.settings, self._changes(req, TOPIC_SETTINGS))
            self.nsqd.apply_topic_settings(topic)
            self.nsqd.metadata_changed()
            await self._persisted()
        return respond({"max_disk_bytes": topic.max_disk_bytes, "settings": topic.settings})

    async def channel_settings(self, req: Request) -> Response:
        """``/channel/settings?topic=T&channel=C[&max_attempts=N|default][&dead_letter_topic=D|default]``."""
        topic, channel = self._existing_channel(req)
        if req.method == "POST":
            changes = self._changes(req, CHANNEL_SETTINGS)
            if changes.get("dead_letter_topic") == topic.name:
                raise HTTPError(400, "INVALID_ARG_DEAD_LETTER_TOPIC")
            apply_changes(channel.settings, changes)
            self.nsqd.apply_channel_settings(topic, channel)
            if not channel.ephemeral and not topic.ephemeral:
                self.nsqd.metadata_changed()
            await self._persisted()
        return respond({
            "max_attempts": channel.max_attempts,
            "dead_letter_topic": channel.dead_letter_topic,
            "settings": channel.settings,
        })

    # ------------------------------------------------------------ beyond nsqd: dead letters

    async def dead_letter_message(self, req: Request) -> Response:
        """``GET /dead_letter/message?topic=D&id=X``: where dead letter X of
        topic D came from; ``original_id=X`` instead: the dead letters of D that
        were message X where they came from (one per channel that moved it)."""
        topic = self._existing_topic(req)
        if req.has_arg("original_id"):
            original_id = self._message_id(req, "original_id")
            dlq = self.nsqd.dead_letters.logs.get(topic.name)
            found = dlq.by_original_id(original_id) if dlq is not None else []
            if not found:
                raise HTTPError(404, "MESSAGE_NOT_FOUND")
            return respond({"count": len(found), "messages": [o.to_json() for o in found]})
        origin = self.nsqd.dead_letters.lookup(topic.name, self._message_id(req))
        if origin is None:
            raise HTTPError(404, "MESSAGE_NOT_FOUND")
        return respond(origin.to_json())

    async def dead_letter_messages(self, req: Request) -> Response:
        """``GET /dead_letter/messages?topic=D[&n=100]``: the origins kept for
        topic D's dead letters, oldest first (at most n, default 100)."""
        topic = self._existing_topic(req)
        n = self._int_arg(req, "n", 100, 0, 1 << 62)
        dlq = self.nsqd.dead_letters.logs.get(topic.name)
        entries = list(dlq.entries.values()) if dlq is not None else []
        return respond({"count": len(entries), "messages": [o.to_json() for o in entries[:n]]})

    async def dead_letter_requeue(self, req: Request) -> Response:
        """``POST /dead_letter/requeue?topic=D[&channel=C][&n=N][&to=channel|topic]``:
        move the messages queued in dead-letter topic D (its own queue, or its
        channel C) back into the channels they came from (``to=topic``: onto
        their topics, every channel); answers how many moved and how many
        stayed (origin unknown, or its channel gone)."""
        topic = self._existing_topic(req)
        channel = None
        if req.has_arg("channel"):
            _, channel = self._existing_channel(req)
        to = req.arg("to") or "channel"
        if to not in ("channel", "topic"):
            raise HTTPError(400, "INVALID_ARG_TO")
        limit = self._int_arg(req, "n", 0, 0, 1 << 62)
        moved, kept = await self.nsqd.dead_letters.requeue(topic, channel, limit, to_topic=to == "topic")
        return respond({"moved": moved, "kept": kept})


async def _extend_id_indexes(backends: Sequence[object]) -> None:
    """Bring each disk queue's id index up to its write position: a header
    walk in a worker thread (the files are only appended to), a few rounds
    while publishers keep writing, the last small tail left to the lookup."""
    for backend in backends:
        plan_of = getattr(backend, "id_index_plan", None)
        if plan_of is None:
            continue
        for _ in range(3):
            token, plan = plan_of()
            if sum(end - start for _, _, start, end in plan) <= _ID_INDEX_INLINE_BYTES:
                break
            blocks = await trio.to_thread.run_sync(index_ids, plan, backend._min, backend._max)  # type: ignore[attr-defined]
            backend.add_id_blocks(token, plan, blocks)  # type: ignore[attr-defined]
