"""pynsqd's opt-in features -- dead letters, bounded disk, inspection,
retention and replay (README "Beyond NSQ") -- as the topic and channel pages
show them.

Their numbers come with nsqd's ``/stats`` (fields only where a feature is
on).  The rest is asked of each nsqd that holds the topic while the page is
made: first its settings (``/topic/settings``, ``/channel/settings``), which
a Go nsqd answers 404 -- such a node is left out, with no error and no
control -- then, where that answered, the dead letters' origins and, when
the page asks, a peek or where a message id is.  Every request is a GET:
looking changes nothing on the nsqds.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from pynsqd.flags import format_duration
from pynsqd.inspection import preview

from .cluster_info import Answer, ClusterInfo

PEEK_COUNTS = (10, 50)  # the peek links a page offers
MAX_PEEK = 100
PEEK_BODY_LIMIT = 512  # bytes of each body asked for, and shown
ORIGINS_SHOWN = 100  # dead letters' origins listed per nsqd
_MESSAGE_ID = re.compile(r"[0-9a-f]{16}")


@attrs.define
class NodeExtras:
    """What one nsqd said of the topic (or channel) beyond nsqd's API."""

    node: str
    settings: dict[str, Any] | None = None  # None: no such endpoints (Go nsqd), or no answer
    dead_letters: dict[str, Any] | None = None  # /dead_letter/messages: {"count", "messages"}
    peek: Answer | None = None
    find: Answer | None = None

    @property
    def own(self) -> dict[str, Any]:
        """The settings made for this topic or channel (not the flags')."""
        own = (self.settings or {}).get("settings")
        return own if isinstance(own, dict) else {}


@attrs.define
class Extras:
    nodes: list[NodeExtras] = attrs.Factory(list)

    @property
    def supported(self) -> list[NodeExtras]:
        return [n for n in self.nodes if n.settings is not None]

    @property
    def dead_letter_count(self) -> int:
        return sum(int((n.dead_letters or {}).get("count") or 0) for n in self.nodes)

    def origins(self) -> list[dict[str, Any]]:
        return [{**o, "node": n.node} for n in self.nodes for o in (n.dead_letters or {}).get("messages") or () if isinstance(o, dict)]

    def found(self) -> list[dict[str, Any]]:
        """Where ``?find`` found the message: one row per queue holding it
        ({"node", "queue", **the entry}), and per nsqd whose history keeps it."""
        out = []
        for n in self.supported:
            data = n.find.data if n.find is not None and n.find.ok and isinstance(n.find.data, dict) else {}
            entries = [("topic", data["topic"])] if isinstance(data.get("topic"), dict) else []
            entries += [(f"channel {c.get('channel_name', '')}", c) for c in data.get("channels") or () if isinstance(c, dict)]
            out += [{**e, "node": n.node, "queue": queue} for queue, e in entries if e.get("state") != "not_found"]
            if data.get("retained"):
                out.append({"node": n.node, "queue": "retained history", "state": "retained"})
        return out

    def facts(self, topic_docs: Iterable[dict[str, Any]]) -> list[str]:
        """Facts for :attr:`Action.requires` (see actions.facts)."""
        out = []
        if self.supported:
            out.append("pynsqd")
        own = [n.own for n in self.nodes]
        if any("max_attempts" in o or "dead_letter_topic" in o for o in own):
            out.append("channel_settings")
        if any("max_disk_bytes" in o for o in own):
            out.append("disk_bound_set")
        if any("retention" in o for o in own):
            out.append("retention_set")
        if any(d.get("retention") for d in topic_docs):
            out.append("retention")
        if self.dead_letter_count:
            out.append("dead_letters")
        return out

    def prefill(self) -> dict[str, str]:
        """The settings made, as the forms' starting values."""
        out: dict[str, str] = {}
        for n in self.nodes:
            for key, value in n.own.items():
                if key == "retention" and isinstance(value, dict):
                    out.setdefault("time", format_duration(int(value.get("time") or 0) / 1e9) if value.get("time") else "")
                    out.setdefault("bytes", str(value.get("bytes") or ""))
                elif isinstance(value, (int, str)):
                    out.setdefault(key, str(value))
        return out


def peek_count(text: str | None) -> int:
    """``?peek=N`` -> how many messages to show (0: no peek)."""
    if text is None:
        return 0
    try:
        return max(1, min(MAX_PEEK, int(text)))
    except ValueError:
        return PEEK_COUNTS[0]


def message_id(text: str | None) -> str:
    """``?find=ID`` as nsqd takes it, or "" if it is not a message id."""
    text = (text or "").strip().lower()
    return text if _MESSAGE_ID.fullmatch(text) else ""


async def gather(
    ci: ClusterInfo,
    nodes: Iterable[str],
    topic: str,
    channel: str = "",
    *,
    dead_letters: int | None = None,
    peek: int = 0,
    peek_extra: bool = False,
    find: str = "",
) -> Extras:
    """Ask each node: its settings, then (where it has them) ``dead_letters``
    origins at most (None: none asked), a peek at ``peek`` messages (with the
    deferred and in-flight ones: ``peek_extra``), where message ``find`` is."""
    base = {"topic": topic, **({"channel": channel} if channel else {})}
    extras = Extras([NodeExtras(n) for n in dict.fromkeys(nodes)])

    async def one(ne: NodeExtras) -> None:
        answer = await ci.request("GET", ne.node, "/channel/settings" if channel else "/topic/settings", base)
        if not answer.ok or not isinstance(answer.data, dict):
            return  # Go's nsqd (404), or a node down: the page shows nothing more of it
        ne.settings = answer.data

        async def origins() -> None:
            got = await ci.request("GET", ne.node, "/dead_letter/messages", {"topic": topic, "n": str(dead_letters)})
            ne.dead_letters = got.data if got.ok and isinstance(got.data, dict) else None

        async def look() -> None:
            query = {**base, "count": str(peek), "body_limit": str(PEEK_BODY_LIMIT)}
            if peek_extra:
                query |= {"include_deferred": "true", "include_in_flight": "true"}
            ne.peek = await ci.request("GET", ne.node, "/channel/peek" if channel else "/topic/peek", query)

        async def where() -> None:
            ne.find = await ci.request("GET", ne.node, "/message/find", {"topic": topic, "id": find, "body_limit": str(PEEK_BODY_LIMIT)})

        async with trio.open_nursery() as nursery:
            if dead_letters is not None:
                nursery.start_soon(origins)
            if peek:
                nursery.start_soon(look)
            if find:
                nursery.start_soon(where)

    async with trio.open_nursery() as nursery:
        for ne in extras.nodes:
            nursery.start_soon(one, ne)
    return extras


# ---------------------------------------------------------------- formatting


def body_text(msg: dict[str, Any]) -> str:
    """A peeked body as text: decoded from its base64 here (so the page
    never relies on the nsqd's own rendering), bounded, UTF-8 where it is
    and ``\\xNN`` for other bytes and control characters; the template escapes it."""
    try:
        body = base64.b64decode(str(msg.get("body") or ""), validate=True)[:PEEK_BODY_LIMIT]
    except (binascii.Error, ValueError):
        return str(msg.get("body_preview") or "")[:PEEK_BODY_LIMIT]
    return preview(body)


def when(ns: Any) -> str:
    """Unix nanoseconds as local time, to the millisecond."""
    try:
        stamp = datetime.datetime.fromtimestamp(int(ns) / 1e9).astimezone()
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"
    return stamp.strftime("%Y-%m-%d %H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


def size(n: Any) -> str:
    """Bytes as people read them: ``512 B``, ``1.5 MiB``."""
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


__all__ = ["MAX_PEEK", "PEEK_COUNTS", "Extras", "NodeExtras", "body_text", "gather", "message_id", "peek_count", "size", "when"]
