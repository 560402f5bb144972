"""The registration DB, directly: Go's semantics -- keys outlive their
producers, a peer that left is in no producer list."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqlookupd.registration_db import (
    CHANNEL,
    CLIENT,
    CLIENT_REGISTRATION,
    TOPIC,
    PeerInfo,
    Producer,
    Registration,
    RegistrationDB,
    filter_active,
)


def peer(n: int, *, last_update: float = 0.0) -> PeerInfo:
    return PeerInfo(
        id=f"127.0.0.1:{5000 + n}",
        remote_address=f"127.0.0.1:{5000 + n}",
        broadcast_address=f"host{n}",
        tcp_port=4150,
        http_port=4151 + n,
        version="1.3.0",
        hostname=f"host{n}",
        last_update=last_update,
    )


def state(db: RegistrationDB) -> dict[Registration, set[str]]:
    return {reg: {p.peer.id for p in producers} for reg, producers in db.items()}


def test_registration_matches_wildcards() -> None:
    reg = Registration(CHANNEL, "t", "c")
    assert reg.matches(CHANNEL, "t", "c")
    assert reg.matches(CHANNEL, "*", "c")
    assert reg.matches(CHANNEL, "t", "*")
    assert reg.matches(CHANNEL, "*", "*")
    assert not reg.matches(TOPIC, "t", "*")
    assert not reg.matches(CHANNEL, "u", "*")
    assert reg.debug_key() == "channel:t:c"


def test_add_and_remove_producer() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1), peer(2)
    reg = Registration(TOPIC, "t")
    assert db.add_producer(reg, Producer(p1))
    assert not db.add_producer(reg, Producer(p1))  # already there
    assert db.add_producer(reg, Producer(p2))
    assert db.find_registrations(TOPIC, "t", "") == [reg]
    assert [p.peer for p in db.find_producers(TOPIC, "t", "")] == [p1, p2]
    assert db.lookup_registrations(p1.id) == [reg]
    assert db.remove_producer(reg, p1.id) == (True, 1)
    assert db.remove_producer(reg, p1.id) == (False, 1)
    assert db.lookup_registrations(p1.id) == []
    # the last producer leaving keeps the key, with nobody in it (Go)
    assert db.remove_producer(reg, p2.id) == (True, 0)
    assert db.find_registrations(TOPIC, "t", "") == [reg]
    assert db.find_producers(TOPIC, "t", "") == []
    assert db.remove_producer(reg, p2.id) == (False, 0)
    assert db.remove_producer(Registration(TOPIC, "nope"), p2.id) == (False, 0)
    assert len(db) == 1


def test_registration_survives_its_producers() -> None:
    db = RegistrationDB()
    p1 = peer(1)
    db.create_topic("t")
    assert db.topics() == ["t"]
    db.register(p1, "t")
    db.register(p1, "u", "c")  # created by a producer only
    db.remove_peer(p1.id)
    assert state(db) == {
        Registration(TOPIC, "t"): set(),
        Registration(TOPIC, "u"): set(),
        Registration(CHANNEL, "u", "c"): set(),
    }
    assert db.topics() == ["t", "u"] and db.channels("u") == ["c"]
    db.remove_registration(Registration(TOPIC, "t"))
    assert db.topics() == ["u"]


def test_ephemeral_keys_go_with_their_last_unregister() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1), peer(2)
    for p in (p1, p2):
        db.register(p, "t#ephemeral", "c#ephemeral")
    db.unregister(p1, "t#ephemeral", "c#ephemeral")
    db.unregister(p1, "t#ephemeral")
    assert db.topics() == ["t#ephemeral"] and db.channels("t#ephemeral") == ["c#ephemeral"]
    db.unregister(p2, "t#ephemeral", "c#ephemeral")
    db.unregister(p2, "t#ephemeral")
    assert len(db) == 0
    # a disconnect is not an UNREGISTER: Go keeps even ephemeral keys then
    db.register(p1, "e#ephemeral", "c#ephemeral")
    db.remove_peer(p1.id)
    assert state(db) == {Registration(TOPIC, "e#ephemeral"): set(), Registration(CHANNEL, "e#ephemeral", "c#ephemeral"): set()}


def test_register_adds_channel_and_topic() -> None:
    db = RegistrationDB()
    p1 = peer(1)
    assert db.register(p1, "t", "c") == [Registration(CHANNEL, "t", "c"), Registration(TOPIC, "t")]
    assert db.register(p1, "t", "c") == []
    assert db.register(p1, "t", "d") == [Registration(CHANNEL, "t", "d")]
    assert db.topics() == ["t"]
    assert db.channels("t") == ["c", "d"]
    assert db.channels("other") == []


def test_unregister_channel_and_ephemeral_channel() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1), peer(2)
    db.create_channel("t", "c#ephemeral")
    db.create_channel("t", "d")
    for p in (p1, p2):
        db.register(p, "t", "c#ephemeral")
        db.register(p, "t", "d")
    assert db.unregister(p1, "t", "c#ephemeral") == ([Registration(CHANNEL, "t", "c#ephemeral")], [])
    assert db.channels("t") == ["c#ephemeral", "d"]
    db.unregister(p2, "t", "c#ephemeral")
    # an ephemeral channel goes with its last producer even though it was created over HTTP
    assert db.channels("t") == ["d"]
    db.unregister(p1, "t", "d")
    db.unregister(p2, "t", "d")
    assert db.channels("t") == ["d"]  # not ephemeral: stays


def test_topic_unregister_removes_own_channels_only() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1), peer(2)
    db.register(p1, "t", "a")
    db.register(p1, "t", "b")
    db.register(p2, "t", "b")
    db.register(p1, "u", "a")
    removed, unexpected = db.unregister(p1, "t")
    assert removed == [Registration(TOPIC, "t")]
    assert sorted(r.subkey for r in unexpected) == ["a", "b"]
    assert state(db) == {
        Registration(CHANNEL, "t", "a"): set(),
        Registration(CHANNEL, "t", "b"): {p2.id},
        Registration(TOPIC, "t"): {p2.id},
        Registration(CHANNEL, "u", "a"): {p1.id},
        Registration(TOPIC, "u"): {p1.id},
    }


def test_remove_peer_drops_everything_of_that_peer() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1), peer(2)
    db.identify(p1)
    db.identify(p2)
    db.register(p1, "t", "c")
    db.register(p2, "t")
    removed = db.remove_peer(p1.id)
    assert set(removed) == {CLIENT_REGISTRATION, Registration(TOPIC, "t"), Registration(CHANNEL, "t", "c")}
    assert state(db) == {
        CLIENT_REGISTRATION: {p2.id},
        Registration(TOPIC, "t"): {p2.id},
        Registration(CHANNEL, "t", "c"): set(),
    }
    assert db.remove_peer(p1.id) == []


def test_find_producers_wildcard_is_one_per_peer() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1), peer(2)
    db.register(p1, "t", "a")
    db.register(p1, "t", "b")
    db.register(p2, "t", "b")
    assert [p.peer for p in db.find_producers(CHANNEL, "t", "*")] == [p1, p2]
    assert [p.peer for p in db.find_producers(CHANNEL, "*", "a")] == [p1]
    assert db.find_producers(CLIENT, "", "") == []


def test_delete_topic_and_channel() -> None:
    db = RegistrationDB()
    p1 = peer(1)
    db.register(p1, "t", "a")
    db.create_channel("t", "b")
    db.register(p1, "u", "a")
    assert db.delete_channel("t", "a")
    assert not db.delete_channel("t", "a")
    assert db.channels("t") == ["b"]
    removed = db.delete_topic("t")
    assert set(removed) == {Registration(CHANNEL, "t", "b"), Registration(TOPIC, "t")}
    assert db.topics() == ["u"]
    # the peer's registrations are gone from its index too
    assert set(db.lookup_registrations(p1.id)) == {Registration(TOPIC, "u"), Registration(CHANNEL, "u", "a")}


def test_tombstone_and_lifetime() -> None:
    db = RegistrationDB()
    p1, p2 = peer(1, last_update=100.0), peer(2, last_update=100.0)
    db.register(p1, "t")
    db.register(p2, "t")
    db.register(p1, "u")
    assert db.tombstone_topic_producer("t", "host1:4152", now=100.0) == 1
    assert db.tombstone_topic_producer("t", "nohost:1", now=100.0) == 0
    assert db.topic_tombstoned("t", p1.id, 45.0, now=144.0)
    assert not db.topic_tombstoned("t", p1.id, 45.0, now=145.0)
    assert not db.topic_tombstoned("u", p1.id, 45.0, now=100.0)  # per topic
    active = db.active_producers(TOPIC, "t", "", inactive_timeout=300.0, tombstone_lifetime=45.0, now=110.0)
    assert [p.peer for p in active] == [p2]
    active = db.active_producers(TOPIC, "t", "", inactive_timeout=300.0, tombstone_lifetime=45.0, now=146.0)
    assert [p.peer for p in active] == [p1, p2]
    # re-registering keeps the existing producer, tombstone and all (as Go does)
    db.register(p1, "t")
    assert db.topic_tombstoned("t", p1.id, 45.0, now=110.0)
    # but a fresh registration after an unregister starts clean
    db.unregister(p1, "t")
    db.register(p1, "t")
    assert not db.topic_tombstoned("t", p1.id, 45.0, now=110.0)


def test_inactive_filter_uses_shared_peer_info() -> None:
    p1, p2 = peer(1, last_update=0.0), peer(2, last_update=50.0)
    producers = [Producer(p1), Producer(p2)]
    assert filter_active(producers, 60.0, 45.0, now=60.0) == producers
    assert [p.peer for p in filter_active(producers, 60.0, 45.0, now=61.0)] == [p2]
    p1.last_update = 61.0  # a PING refreshes every registration sharing the peer
    assert filter_active(producers, 60.0, 45.0, now=61.0) == producers


# ---------------------------------------------------------------- model-based

PEERS = [peer(n) for n in range(3)]
TOPICS = ["t0", "t1", "e#ephemeral"]
CHANNELS = ["c0", "c1", "e#ephemeral"]

peer_ids = st.integers(0, len(PEERS) - 1)
topics = st.sampled_from(TOPICS)
maybe_channel = st.sampled_from(["", *CHANNELS])
channels = st.sampled_from(CHANNELS)

operations = st.one_of(
    st.tuples(st.just("identify"), peer_ids),
    st.tuples(st.just("register"), peer_ids, topics, maybe_channel),
    st.tuples(st.just("unregister"), peer_ids, topics, maybe_channel),
    st.tuples(st.just("tombstone"), peer_ids, topics),
    st.tuples(st.just("disconnect"), peer_ids),
    st.tuples(st.just("create_topic"), topics),
    st.tuples(st.just("create_channel"), topics, channels),
    st.tuples(st.just("delete_topic"), topics),
    st.tuples(st.just("delete_channel"), topics, channels),
)


class Model:
    """The DB's intended behaviour, written as plainly as possible."""

    def __init__(self) -> None:
        self.regs: dict[Registration, set[str]] = {}
        self.tombstoned: set[tuple[str, str]] = set()
        # peers that disconnected and have not registered anything since
        self.gone: set[str] = set()

    def add(self, reg: Registration, pid: str) -> None:
        self.regs.setdefault(reg, set()).add(pid)
        self.gone.discard(pid)

    def discard(self, reg: Registration, pid: str) -> int:
        peers = self.regs.get(reg, set())
        peers.discard(pid)
        if reg.category == TOPIC:
            self.tombstoned.discard((reg.key, pid))
        return len(peers)

    def drop(self, reg: Registration) -> None:
        for pid in self.regs.pop(reg, set()):
            self.discard(reg, pid)
        if reg.category == TOPIC:
            self.tombstoned = {(t, p) for t, p in self.tombstoned if t != reg.key}

    def create(self, reg: Registration) -> None:
        self.regs.setdefault(reg, set())

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "identify":
            self.add(CLIENT_REGISTRATION, PEERS[op[1]].id)
        elif kind == "register":
            pid, topic, channel = PEERS[op[1]].id, op[2], op[3]
            if channel:
                self.add(Registration(CHANNEL, topic, channel), pid)
            self.add(Registration(TOPIC, topic), pid)
        elif kind == "unregister":
            pid, topic, channel = PEERS[op[1]].id, op[2], op[3]
            if channel:
                reg = Registration(CHANNEL, topic, channel)
                if self.discard(reg, pid) == 0 and channel.endswith("#ephemeral"):
                    self.drop(reg)
            else:
                for reg in [r for r in self.regs if r.category == CHANNEL and r.key == topic]:
                    self.discard(reg, pid)
                reg = Registration(TOPIC, topic)
                if self.discard(reg, pid) == 0 and topic.endswith("#ephemeral"):
                    self.drop(reg)
        elif kind == "tombstone":
            pid, topic = PEERS[op[1]].id, op[2]
            if pid in self.regs.get(Registration(TOPIC, topic), set()):
                self.tombstoned.add((topic, pid))
        elif kind == "disconnect":
            pid = PEERS[op[1]].id
            for reg in list(self.regs):
                self.discard(reg, pid)
            self.gone.add(pid)
        elif kind == "create_topic":
            self.create(Registration(TOPIC, op[1]))
        elif kind == "create_channel":
            self.create(Registration(CHANNEL, op[1], op[2]))
            self.create(Registration(TOPIC, op[1]))
        elif kind == "delete_topic":
            for reg in [r for r in self.regs if r.category in (TOPIC, CHANNEL) and r.key == op[1]]:
                self.drop(reg)
        elif kind == "delete_channel":
            self.drop(Registration(CHANNEL, op[1], op[2]))


def apply_to_db(db: RegistrationDB, op: tuple) -> None:
    kind = op[0]
    if kind == "identify":
        db.identify(PEERS[op[1]])
    elif kind == "register":
        db.register(PEERS[op[1]], op[2], op[3])
    elif kind == "unregister":
        db.unregister(PEERS[op[1]], op[2], op[3])
    elif kind == "tombstone":
        db.tombstone_topic_producer(op[2], PEERS[op[1]].node, now=1.0)
    elif kind == "disconnect":
        db.remove_peer(PEERS[op[1]].id)
    elif kind == "create_topic":
        db.create_topic(op[1])
    elif kind == "create_channel":
        db.create_channel(op[1], op[2])
    elif kind == "delete_topic":
        db.delete_topic(op[1])
    elif kind == "delete_channel":
        db.delete_channel(op[1], op[2])


def check(db: RegistrationDB, model: Model) -> None:
    assert state(db) == model.regs
    # no stale producers: a peer that left is in no producer list, by any query
    for pid in model.gone:
        assert db.lookup_registrations(pid) == []
        for category in (CLIENT, TOPIC, CHANNEL):
            assert pid not in {p.peer.id for p in db.find_producers(category, "*", "*")}
        for reg in db.find_registrations(CHANNEL, "*", "*") + db.find_registrations(TOPIC, "*", ""):
            assert db.producer(reg, pid) is None
    for p in PEERS:
        expected = {reg for reg, peers in model.regs.items() if p.id in peers}
        got = db.lookup_registrations(p.id)
        assert len(got) == len(set(got))
        assert set(got) == expected
        for topic in TOPICS:
            assert db.topic_tombstoned(topic, p.id, math.inf, now=2.0) == ((topic, p.id) in model.tombstoned)


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, max_size=40))
def test_any_sequence_matches_model_and_leaves_no_stale_producers(ops: list[tuple]) -> None:
    db = RegistrationDB()
    model = Model()
    for op in ops:
        apply_to_db(db, op)
        model.apply(op)
        check(db, model)
    for p in PEERS:
        db.remove_peer(p.id)
        model.apply(("disconnect", PEERS.index(p)))
    check(db, model)
    # every key is still there (Go keeps them), and none has a producer
    assert state(db) == {reg: set() for reg in model.regs}
    for p in PEERS:
        assert db.lookup_registrations(p.id) == []
