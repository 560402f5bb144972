"""pynsqd's opt-in features (issue 14) used together, against real pynsqd
subprocesses: what each adds to ``/stats`` (JSON and text) and ``/metrics``
appears exactly where it is on and goes once it is off; a replay meeting a
consumer's requeue in sync mode; a feature's event hook failing; bad input on
every endpoint the features add (a 4xx with nsqd's ``{"message": CODE}``,
nothing changed, nothing in the log)."""

from __future__ import annotations

import json

import pytest

from helpers import RawClient, channel_stats, create_channel, start_nsqd, wait_for
from test_faults import confirm, subscriber

# what each feature adds: topic keys, channel keys, /metrics families, text marks
TOPIC_KEYS = {"max_disk_bytes", "disk_bytes", "backend_bytes", "disk_full", "retention"}
CHANNEL_KEYS = {"max_attempts", "dead_letter_topic", "dead_letter_count", "replay", "backend_bytes"}
FAMILIES = (
    "nsqd_topic_disk_bytes", "nsqd_topic_max_disk_bytes", "nsqd_topic_disk_full", "nsqd_topic_retained_messages",
    "nsqd_topic_retained_bytes", "nsqd_topic_retained_oldest_timestamp_seconds", "nsqd_channel_dead_lettered_total",
    "nsqd_channel_replayed_total",
)
MARKS = (" disk: ", " retained: ", " dead: ", " replay: ")


def extras(d) -> tuple[set[str], set[str], set[str], set[str]]:
    """(topic keys, channel keys, metric families, text marks) of the features, as shown now."""
    topic = next(t for t in d.stats()["topics"] if t["topic_name"] == "t")
    channel = topic["channels"][0]
    metrics = d.http("GET", "/metrics")[1].decode()
    samples = {line.split("{")[0] for line in metrics.splitlines() if line and not line.startswith("#")}
    text = d.http("GET", "/stats")[1].decode()
    return TOPIC_KEYS & set(topic), CHANNEL_KEYS & set(channel), samples & set(FAMILIES), {m for m in MARKS if m in text}


def post(d, path: str) -> None:
    status, body = d.http("POST", path)
    assert status == 200, (path, status, body)


def test_each_features_stats_appear_where_it_is_on_and_go_once_it_is_off(tmp_path):
    d = start_nsqd(str(tmp_path))
    try:
        create_channel(d, "t", "c")
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", [b"a", b"b"]).data == b"OK"
        assert extras(d) == (set(), set(), set(), set())

        post(d, "/topic/settings?topic=t&max_disk_bytes=100000")
        post(d, "/channel/settings?topic=t&channel=c&max_attempts=3")
        post(d, "/topic/retention?topic=t&time=1h")
        with RawClient(d.tcp_port) as p:
            assert p.pub("t", b"kept").data == b"OK"
        post(d, "/channel/rewind?topic=t&channel=c&since=oldest")  # runs until the channel is drained
        topic_keys, channel_keys, families, marks = extras(d)
        assert topic_keys == TOPIC_KEYS and channel_keys == CHANNEL_KEYS
        assert families == set(FAMILIES) and marks == set(MARKS)
        text = d.http("GET", "/stats")[1].decode()
        assert " retained: 1 (" in text and " dead: 0" in text and " disk: " in text

        # off again, one after the other, each taking exactly its own along
        post(d, "/topic/retention?topic=t&time=0&bytes=0")  # the replay stops with it
        assert extras(d) == (
            TOPIC_KEYS - {"retention"}, {"max_attempts", "dead_letter_topic", "dead_letter_count", "backend_bytes"},
            {"nsqd_topic_disk_bytes", "nsqd_topic_max_disk_bytes", "nsqd_topic_disk_full", "nsqd_channel_dead_lettered_total"},
            {" disk: ", " dead: "},
        )
        post(d, "/channel/settings?topic=t&channel=c&max_attempts=default")
        post(d, "/topic/settings?topic=t&max_disk_bytes=default")
        assert extras(d) == (set(), set(), set(), set())
    finally:
        assert d.stop() == 0
    # the explicit "off" of retention is the only setting left in nsqd.dat
    entry = json.loads((tmp_path / "nsqd.dat").read_text())["topics"][0]
    assert entry == {"name": "t", "paused": False, "channels": [{"name": "c", "paused": False}], "retention": {"time": 0, "bytes": 0}}


def test_a_replayed_copy_dropped_for_a_requeued_one_is_not_served_again_after_a_restart(tmp_path):
    """Sync mode, a channel rewound while its copy of a message is in flight:
    the replayed copy waits (deferred) until the other is done; the consumer
    then REQs its copy with a delay, so one copy waits and the other is
    dropped.  The dropped one's record must go too: once the message is
    FINed, a SIGTERM restart must not deliver it again."""
    flags = ("--sync-every=1", "--log-level=info")
    d = start_nsqd(str(tmp_path), *flags)
    try:
        create_channel(d, "t", "c")
        post(d, "/topic/retention?topic=t&time=1h")
        with RawClient(d.tcp_port) as p:
            assert p.pub("t", b"once").data == b"OK"
        c = subscriber(d, "t", "c", rdy=2)
        msg_id = c.read_message()[2]
        post(d, "/channel/rewind?topic=t&channel=c&since=oldest")
        wait_for(lambda: channel_stats(d, "t", "c")["deferred_count"] == 1, message="the replayed copy waiting")
        c.cmd(b"REQ", msg_id, "200")
        _, attempts, again, body = c.read_message(timeout=10)
        assert (attempts, again, body) == (2, msg_id, b"once")
        c.cmd(b"FIN", msg_id)
        confirm(c)
        c.close()
    finally:
        assert d.stop() == 0
    d = start_nsqd(str(tmp_path), *flags)
    try:
        assert channel_stats(d, "t", "c")["depth"] == 0
        with subscriber(d, "t", "c") as c:
            confirm(c)
            with pytest.raises(TimeoutError):
                c.read_message(timeout=1.5)
    finally:
        d.stop()


def test_a_failing_feature_hook_is_logged_and_the_topic_still_made(tmp_path):
    """The features plug into topic and channel events through hooks; one
    that raises is logged, and what the event was about goes ahead."""
    from structlog.testing import capture_logs

    from pynsqd.nsqd import NSQD
    from pynsqd.options import Options

    nsqd = NSQD(Options(data_path=str(tmp_path)))

    def broken(event: str, topic: object, channel: object) -> None:
        raise RuntimeError("broken hook")

    nsqd.event_hooks.insert(0, broken)
    with capture_logs() as logged:
        topic = nsqd.get_topic("t")
        channel = topic.get_channel("c")
    assert nsqd.topics["t"] is topic and topic.channels["c"] is channel
    failed = [e for e in logged if e["event"] == "event hook failed"]
    assert [e["hook_event"] for e in failed] == ["topic_created", "channel_created"]


# (method, path, status, code) -- each against the state set up below, which none may change
BAD_INPUT = [
    ("POST", "/topic/settings", 400, "MISSING_ARG_TOPIC"),
    ("POST", "/topic/settings?topic=nope&max_disk_bytes=1", 404, "TOPIC_NOT_FOUND"),
    ("POST", "/topic/settings?topic=t", 400, "MISSING_ARG_MAX_DISK_BYTES"),
    ("POST", "/topic/settings?topic=t&max_disk_bytes=-1", 400, "INVALID_ARG_MAX_DISK_BYTES"),
    ("POST", "/topic/settings?topic=e%23ephemeral&max_disk_bytes=1", 400, "EPHEMERAL_TOPIC"),
    ("POST", "/channel/settings?topic=t&channel=nope&max_attempts=1", 404, "CHANNEL_NOT_FOUND"),
    ("POST", "/channel/settings?topic=t&channel=c&max_attempts=65536", 400, "INVALID_ARG_MAX_ATTEMPTS"),
    ("POST", "/channel/settings?topic=t&channel=c&max_attempts=2&dead_letter_topic=t", 400, "INVALID_ARG_DEAD_LETTER_TOPIC"),
    ("POST", "/channel/settings?topic=t&channel=c&dead_letter_topic=x%23ephemeral", 400, "INVALID_ARG_DEAD_LETTER_TOPIC"),
    ("POST", "/channel/settings?topic=t&channel=%ff", 400, "INVALID_ARG_CHANNEL"),
    ("POST", "/topic/retention?topic=t", 400, "MISSING_ARG_TIME"),
    ("POST", "/topic/retention?topic=t&time=-1s", 400, "INVALID_ARG_TIME"),
    ("POST", "/topic/retention?topic=t&time=1h&bytes=x", 400, "INVALID_ARG_BYTES"),
    ("POST", "/topic/retention?topic=e%23ephemeral&time=1h", 400, "EPHEMERAL_TOPIC"),
    ("POST", "/channel/rewind?topic=t&channel=c&since=oldest", 400, "RETENTION_NOT_ENABLED"),
    ("POST", "/channel/rewind?topic=kept&channel=c&since=%ff", 400, "INVALID_ARG_SINCE"),
    ("POST", "/channel/rewind?topic=kept&channel=c&since=2020-01-01T00:00:00", 400, "INVALID_ARG_SINCE"),
    ("POST", "/channel/create?topic=kept&channel=new&since=soon", 400, "INVALID_ARG_SINCE"),
    ("POST", "/channel/create?topic=t&channel=new&since=oldest", 400, "RETENTION_NOT_ENABLED"),
    ("GET", "/channel/peek?topic=t&channel=c&count=1001", 400, "INVALID_ARG_COUNT"),
    ("GET", "/channel/peek?topic=t&channel=c&body_limit=-1", 400, "INVALID_ARG_BODY_LIMIT"),
    ("GET", "/topic/peek?topic=nope", 404, "TOPIC_NOT_FOUND"),
    ("GET", "/message/find?topic=t", 400, "MISSING_ARG_ID"),
    ("GET", "/message/find?topic=t&id=%ff%ff%ff%ff%ff0", 400, "INVALID_ARG_ID"),
    ("GET", "/message/find?topic=t&id=0123456789abcdef&channel=nope", 404, "CHANNEL_NOT_FOUND"),
    ("GET", "/dead_letter/message?topic=t", 400, "MISSING_ARG_ID"),
    ("GET", "/dead_letter/message?topic=t&id=zzzzzzzzzzzzzzzz", 400, "INVALID_ARG_ID"),
    ("GET", "/dead_letter/message?topic=t&id=%ff%ff%ff%ff%ff0", 400, "INVALID_ARG_ID"),
    ("GET", "/dead_letter/message?topic=t&id=0123456789abcdef", 404, "MESSAGE_NOT_FOUND"),
    ("GET", "/dead_letter/message?topic=t&original_id=", 400, "MISSING_ARG_ORIGINAL_ID"),
    ("GET", "/dead_letter/message?topic=t&original_id=zzzzzzzzzzzzzzzz", 400, "INVALID_ARG_ORIGINAL_ID"),
    ("GET", "/dead_letter/message?topic=t&original_id=0123456789abcdef", 404, "MESSAGE_NOT_FOUND"),
    ("GET", "/dead_letter/messages?topic=t&n=-1", 400, "INVALID_ARG_N"),
    ("POST", "/dead_letter/requeue?topic=t&to=elsewhere", 400, "INVALID_ARG_TO"),
    ("POST", "/dead_letter/requeue?topic=t&n=%ff", 400, "INVALID_ARG_N"),
    ("POST", "/dead_letter/requeue?topic=t&channel=nope", 404, "CHANNEL_NOT_FOUND"),
    ("POST", "/dead_letter/requeue?topic=nope", 404, "TOPIC_NOT_FOUND"),
]


def test_bad_input_on_the_features_endpoints_is_a_4xx_code_and_changes_nothing(tmp_path):
    d = start_nsqd(str(tmp_path))
    try:
        create_channel(d, "t", "c")
        create_channel(d, "kept", "c")
        post(d, "/topic/retention?topic=kept&time=1h")
        post(d, "/topic/create?topic=e%23ephemeral")
        with RawClient(d.tcp_port) as p:
            assert p.pub("t", b"x").data == b"OK"
            assert p.pub("kept", b"y").data == b"OK"

        def state() -> tuple:
            topics = d.stats()["topics"]
            for t in topics:
                t.pop("e2e_processing_latency")
                t.get("retention", {}).pop("oldest_timestamp", None)
            return topics, (tmp_path / "nsqd.dat").read_text()

        before = state()
        for method, path, status, code in BAD_INPUT:
            assert d.http(method, path) == (status, json.dumps({"message": code}, separators=(",", ":")).encode()), (method, path)
        assert state() == before
    finally:
        assert d.stop() == 0
    assert not [line for line in d.lines if "Traceback" in line or "handler failed" in line]
