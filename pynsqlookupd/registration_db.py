"""nsqlookupd's registration database, sans-IO.

A *registration* is ``(category, key, subkey)``: ``("client", "", "")`` for
every identified nsqd, ``("topic", topic, "")`` and ``("channel", topic,
channel)``.  Each maps to the producers (nsqd peers, by id = the connection's
remote address) that announced it.  All the producers of one connection share
one :class:`PeerInfo`, so a PING refreshes every registration at once, while
tombstones belong to one (topic, producer) pair.

Time is passed in (``now``, wall-clock seconds) so that the class never reads
a clock: tests drive it directly.

As in Go, a key outlives its producers: once the last producer of a topic or
channel leaves, the key stays with an empty producer list, so ``/topics`` and
``/channels`` still list it, ``/lookup`` answers 200 with no producers and
nsqadmin keeps showing it, until it is deleted over HTTP.  The exceptions are
Go's too: UNREGISTER of an ephemeral channel (or ephemeral topic) that leaves
it without producers removes the key.  What never survives a peer is the peer
itself: a disconnected nsqd is in no producer list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from pynsqd.protocol import is_ephemeral

CLIENT = "client"
TOPIC = "topic"
CHANNEL = "channel"
WILDCARD = "*"


@attrs.frozen
class Registration:
    category: str
    key: str = ""
    subkey: str = ""

    def matches(self, category: str, key: str, subkey: str) -> bool:
        """Go's ``IsMatch``: ``"*"`` matches any key or subkey."""
        return (
            self.category == category
            and (key == WILDCARD or self.key == key)
            and (subkey == WILDCARD or self.subkey == subkey)
        )

    def debug_key(self) -> str:
        return f"{self.category}:{self.key}:{self.subkey}"


CLIENT_REGISTRATION = Registration(CLIENT)


@attrs.define(eq=False)
class PeerInfo:
    """What an nsqd told us in IDENTIFY, plus when we last heard from it."""

    id: str
    remote_address: str
    broadcast_address: str
    tcp_port: int
    http_port: int
    version: str
    hostname: str = ""
    last_update: float = 0.0

    @property
    def node(self) -> str:
        """How ``/topic/tombstone?node=`` names a producer."""
        return f"{self.broadcast_address}:{self.http_port}"

    def to_json(self) -> dict[str, Any]:
        """The producer object of ``/lookup`` (Go's PeerInfo field order)."""
        return {
            "remote_address": self.remote_address,
            "hostname": self.hostname,
            "broadcast_address": self.broadcast_address,
            "tcp_port": self.tcp_port,
            "http_port": self.http_port,
            "version": self.version,
        }


@attrs.define(eq=False)
class Producer:
    peer: PeerInfo
    tombstoned: bool = False
    tombstoned_at: float = 0.0

    def tombstone(self, now: float) -> None:
        self.tombstoned = True
        self.tombstoned_at = now

    def is_tombstoned(self, lifetime: float, now: float) -> bool:
        return self.tombstoned and now - self.tombstoned_at < lifetime

    def is_active(self, inactive_timeout: float, tombstone_lifetime: float, now: float) -> bool:
        """Go's ``FilterByActive`` for one producer."""
        return now - self.peer.last_update <= inactive_timeout and not self.is_tombstoned(tombstone_lifetime, now)


def filter_active(producers: Iterable[Producer], inactive_timeout: float, tombstone_lifetime: float, now: float) -> list[Producer]:
    return [p for p in producers if p.is_active(inactive_timeout, tombstone_lifetime, now)]


class RegistrationDB:
    def __init__(self) -> None:
        # dicts as ordered sets: answers list things in the order they came
        self._registrations: dict[Registration, dict[str, Producer]] = {}
        self._by_peer: dict[str, dict[Registration, None]] = {}

    # ------------------------------------------------------------ primitives

    def add_registration(self, reg: Registration) -> None:
        """Create a key with no producer, as the HTTP API does."""
        self._registrations.setdefault(reg, {})

    def add_producer(self, reg: Registration, producer: Producer) -> bool:
        """True if the peer was not registered there yet.  An existing producer
        is kept as it is, tombstone included (Go does the same)."""
        producers = self._registrations.setdefault(reg, {})
        peer_id = producer.peer.id
        if peer_id in producers:
            return False
        producers[peer_id] = producer
        self._by_peer.setdefault(peer_id, {})[reg] = None
        return True

    def remove_producer(self, reg: Registration, peer_id: str) -> tuple[bool, int]:
        """-> (was it there, producers left).  The key stays even with no
        producer left (Go's ``RemoveProducer``)."""
        producers = self._registrations.get(reg)
        if producers is None:
            return False, 0
        removed = producers.pop(peer_id, None) is not None
        if removed:
            self._unindex(peer_id, reg)
        return removed, len(producers)

    def remove_registration(self, reg: Registration) -> None:
        """Drop a key and all its producers."""
        producers = self._registrations.pop(reg, None)
        for peer_id in producers or ():
            self._unindex(peer_id, reg)

    def _unindex(self, peer_id: str, reg: Registration) -> None:
        regs = self._by_peer.get(peer_id)
        if regs is not None:
            regs.pop(reg, None)
            if not regs:
                del self._by_peer[peer_id]

    # ------------------------------------------------------------ queries

    def find_registrations(self, category: str, key: str, subkey: str) -> list[Registration]:
        if key != WILDCARD and subkey != WILDCARD:
            reg = Registration(category, key, subkey)
            return [reg] if reg in self._registrations else []
        return [r for r in self._registrations if r.matches(category, key, subkey)]

    def find_producers(self, category: str, key: str, subkey: str) -> list[Producer]:
        """Producers of the matching keys, one per peer."""
        if key != WILDCARD and subkey != WILDCARD:
            return list(self._registrations.get(Registration(category, key, subkey), {}).values())
        seen: dict[str, Producer] = {}
        for reg, producers in self._registrations.items():
            if reg.matches(category, key, subkey):
                for peer_id, producer in producers.items():
                    seen.setdefault(peer_id, producer)
        return list(seen.values())

    def lookup_registrations(self, peer_id: str) -> list[Registration]:
        return list(self._by_peer.get(peer_id, ()))

    def producer(self, reg: Registration, peer_id: str) -> Producer | None:
        return self._registrations.get(reg, {}).get(peer_id)

    def items(self) -> Iterator[tuple[Registration, list[Producer]]]:
        """Every key with its producers (``/debug``)."""
        for reg, producers in self._registrations.items():
            yield reg, list(producers.values())

    def topics(self) -> list[str]:
        return [r.key for r in self._registrations if r.category == TOPIC]

    def channels(self, topic: str) -> list[str]:
        return [r.subkey for r in self._registrations if r.category == CHANNEL and r.key == topic]

    def __len__(self) -> int:
        return len(self._registrations)

    # ------------------------------------------------------------ the TCP protocol's operations

    def identify(self, peer: PeerInfo) -> bool:
        return self.add_producer(CLIENT_REGISTRATION, Producer(peer))

    def register(self, peer: PeerInfo, topic: str, channel: str = "") -> list[Registration]:
        """REGISTER: the channel (if any) and always its topic.  Returns the
        registrations that are new for this peer."""
        added = []
        wanted = [Registration(CHANNEL, topic, channel)] if channel else []
        wanted.append(Registration(TOPIC, topic))
        for reg in wanted:
            if self.add_producer(reg, Producer(peer)):
                added.append(reg)
        return added

    def unregister(self, peer: PeerInfo, topic: str, channel: str = "") -> tuple[list[Registration], list[Registration]]:
        """UNREGISTER, with Go's semantics.  Returns (removed, unexpected):

        * with a channel: only that channel; an ephemeral channel left without
          producers is removed outright (even if created through HTTP);
        * topic only: the topic and this peer's channels of it (nsqd
          unregisters its channels itself, so channels removed here are
          ``unexpected``: Go logs a warning for them); an ephemeral topic left
          without producers is removed outright.
        """
        removed: list[Registration] = []
        unexpected: list[Registration] = []
        if channel:
            reg = Registration(CHANNEL, topic, channel)
            was_there, left = self.remove_producer(reg, peer.id)
            if was_there:
                removed.append(reg)
            if left == 0 and is_ephemeral(channel):
                self.remove_registration(reg)
            return removed, unexpected
        for reg in self.find_registrations(CHANNEL, topic, WILDCARD):
            if self.remove_producer(reg, peer.id)[0]:
                unexpected.append(reg)
        reg = Registration(TOPIC, topic)
        was_there, left = self.remove_producer(reg, peer.id)
        if was_there:
            removed.append(reg)
        if left == 0 and is_ephemeral(topic):
            self.remove_registration(reg)
        return removed, unexpected

    def remove_peer(self, peer_id: str) -> list[Registration]:
        """A connection closed: drop every registration of that peer."""
        removed = []
        for reg in self.lookup_registrations(peer_id):
            if self.remove_producer(reg, peer_id)[0]:
                removed.append(reg)
        return removed

    # ------------------------------------------------------------ the HTTP API's operations

    def create_topic(self, topic: str) -> None:
        self.add_registration(Registration(TOPIC, topic))

    def create_channel(self, topic: str, channel: str) -> None:
        self.add_registration(Registration(CHANNEL, topic, channel))
        self.add_registration(Registration(TOPIC, topic))

    def delete_topic(self, topic: str) -> list[Registration]:
        """The topic and all its channels, whoever registered them."""
        regs = self.find_registrations(CHANNEL, topic, WILDCARD) + self.find_registrations(TOPIC, topic, "")
        for reg in regs:
            self.remove_registration(reg)
        return regs

    def delete_channel(self, topic: str, channel: str) -> bool:
        """False if there was no such channel (``CHANNEL_NOT_FOUND``)."""
        regs = self.find_registrations(CHANNEL, topic, channel)
        for reg in regs:
            self.remove_registration(reg)
        return bool(regs)

    def tombstone_topic_producer(self, topic: str, node: str, now: float) -> int:
        """Tombstone the producers of ``topic`` whose ``broadcast_address:http_port``
        is ``node``; returns how many were found."""
        count = 0
        for producer in self.find_producers(TOPIC, topic, ""):
            if producer.peer.node == node:
                producer.tombstone(now)
                count += 1
        return count

    # ------------------------------------------------------------ views

    def active_producers(
        self, category: str, key: str, subkey: str, *, inactive_timeout: float, tombstone_lifetime: float, now: float
    ) -> list[Producer]:
        return filter_active(self.find_producers(category, key, subkey), inactive_timeout, tombstone_lifetime, now)

    def topic_tombstoned(self, topic: str, peer_id: str, lifetime: float, now: float) -> bool:
        producer = self.producer(Registration(TOPIC, topic), peer_id)
        return producer is not None and producer.is_tombstoned(lifetime, now)
