"""pynsqadmin over pynsqd's opt-in features (README "Beyond NSQ"): what the
topic and channel pages show of bounded disk, retention, replay and dead
letters, peeking and finding messages (escaped, binary-safe), and the actions
that set them, rewind a channel and move dead letters back -- each checked
against the nsqds' own state.  Real pynsqlookupd + 2 pynsqd + pynsqadmin
subprocesses; Go's nsqd is covered in test_nsqadmin.py."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import pytest

from pynsqadmin import beyond
from pynsqadmin.actions import ACTIONS, ActionError, Target, parse_size, question, validate

from helpers import Daemon, RawClient, channel_stats, wait_for
from test_nsqadmin import TOKEN_RE, Cluster, act, page, post, publish


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # every message on disk: a disk bound is reached by the first one
    c = Cluster(tmp_path_factory.mktemp("admin_beyond"), "--mem-queue-size=0", sample_interval="1m")
    yield c
    c.stop()


def ok(nsqd: Daemon, method: str, path: str, body: bytes | None = None) -> None:
    status, answer = nsqd.http(method, path, body)
    assert status == 200, (path, status, answer)


def registered(cluster: Cluster, topic: str) -> None:
    """Actions find the topic's nsqds through nsqlookupd."""
    wait_for(lambda: cluster.lookupd.http("GET", f"/lookup?topic={topic}")[0] == 200, message=f"{topic} in nsqlookupd")


def text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def section(body: str, marker: str) -> str:
    return body.split(marker, 1)[1].split("</table>", 1)[0]


def take_and_requeue(nsqd: Daemon, topic: str, channel: str, count: int) -> None:
    """Receive ``count`` messages and give each back (REQ 0)."""
    with RawClient(nsqd.tcp_port) as client:
        client.identify(heartbeat_interval=30000)
        assert client.sub(topic, channel).data == b"OK"
        client.cmd(b"RDY", str(count).encode())
        for _ in range(count):
            client.cmd(b"REQ", client.read_message()[2], b"0")
        client.cmd(b"RDY", b"0")
        client.cmd(b"CLS")
        assert client.read_response().data == b"CLOSE_WAIT"


def test_fields_are_parsed_before_the_confirmation():
    assert [parse_size(t) for t in ("1048576", "10MB", "2GiB", "1.5k")] == ["1048576", "10000000", str(2 << 30), "1500"]
    for bad in ("lots", "-1", "1e3", "10 XB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    rewind = ACTIONS["rewind_channel"]
    for since in ("oldest", "90m", "1714557600000000000", "2024-05-01T10:00:00Z"):
        assert validate(rewind, Target("t", "c", values={"since": f" {since} "})).values == {"since": since}
    # a time without its offset is this pynsqadmin's local time, sent as unix ns
    assert validate(rewind, Target("t", "c", values={"since": "2024-05-01T10:00"})).values["since"].isdigit()
    for since in ("", "yesterday", "-5m"):
        with pytest.raises(ActionError):
            validate(rewind, Target("t", "c", values={"since": since}))
    dead = ACTIONS["set_channel_dead_letter"]
    target = validate(dead, Target("t", "c", node="x", values={"max_attempts": "3", "dead_letter_topic": "", "other": "y"}))
    assert target == Target("t", "c", values={"max_attempts": "3", "dead_letter_topic": ""})
    assert "after 3 deliveries" in question(dead, target) and "--dead-letter-topic" in question(dead, target)
    for values in ({"max_attempts": "65536"}, {"max_attempts": "1", "dead_letter_topic": "x#ephemeral"}):
        with pytest.raises(ActionError):
            validate(dead, Target("t", "c", values=values))
    with pytest.raises(ActionError):
        validate(ACTIONS["requeue_dead_letters"], Target("t.dead", values={"to": "elsewhere"}))
    assert "their topics" in question(ACTIONS["requeue_dead_letters"], Target("t.dead", values={"to": "topic"}))
    move = ACTIONS["requeue_dead_letters"]
    assert "Move all of the messages" in question(move, validate(move, Target("t.dead", values={"to": "channel", "n": ""})))
    assert "Move 2 of the messages" in question(move, validate(move, Target("t.dead", values={"to": "channel", "n": "2"})))
    for n in ("0", "-1", "many"):
        with pytest.raises(ActionError):
            validate(move, Target("t.dead", values={"to": "channel", "n": n}))


def test_peeked_bodies_are_shown_from_their_bytes():
    def shown(body: bytes) -> str:
        return beyond.body_text({"body": base64.b64encode(body).decode(), "body_preview": "not this"})

    assert shown("héllo\n".encode()) == "héllo\\x0a"
    assert shown(b"\xff\x00<") == "\\xff\\x00<"  # the page's template escapes the markup
    assert len(shown(b"x" * 5000)) == beyond.PEEK_BODY_LIMIT
    assert beyond.body_text({"body": "%%%", "body_preview": "kept"}) == "kept"
    assert (beyond.size(512), beyond.size(1536), beyond.size(None)) == ("512 B", "1.5 KiB", "–")
    assert (beyond.peek_count(None), beyond.peek_count("5"), beyond.peek_count("9999"), beyond.peek_count("x")) == (0, 5, beyond.MAX_PEEK, 10)
    assert (beyond.message_id("18AFEFFA5AA69000"), beyond.message_id("<b>")) == ("18afeffa5aa69000", "")


def test_disk_bound_and_retention_set_shown_and_cleared(cluster, unique):
    for nsqd in cluster.nsqds:
        ok(nsqd, "POST", f"/topic/create?topic={unique}")
        ok(nsqd, "POST", f"/channel/create?topic={unique}&channel=c")
    registered(cluster, unique)
    status, body = page(cluster.admin, f"/topics/{unique}")
    assert status == 200
    # off: nothing shown but the forms that turn them on
    assert "On disk / bound" not in body and 'id="retention"' not in body
    assert 'data-action="set_topic_disk_bound"' in body and 'data-action="set_topic_retention"' in body
    assert 'data-action="clear_topic_disk_bound"' not in body and 'data-action="clear_topic_retention"' not in body
    assert 'data-action="requeue_dead_letters"' not in body

    # a bound of 1 byte on both nsqds: the first message on disk fills it
    assert post(cluster.admin, "/actions", {"action": "set_topic_disk_bound", "topic": unique, "max_disk_bytes": "lots"})[0] == 400
    status, headers, _ = act(cluster.admin, "set_topic_disk_bound", topic=unique, max_disk_bytes="1")
    assert status == 303 and headers["Location"] == f"/topics/{unique}?done=set_topic_disk_bound"
    assert all(n.json(f"/topic/settings?topic={unique}")["max_disk_bytes"] == 1 for n in cluster.nsqds)
    full, other = cluster.nsqds
    publish(full, unique, [b"m"])
    assert full.http("POST", f"/pub?topic={unique}", b"refused")[0] == 503
    body = page(cluster.admin, f"/topics/{unique}")[1]
    assert "Disk bound set." not in body and "disk full" in body
    row = body.split(f'data-node="127.0.0.1:{full.http_port}"', 1)[1].split("</tr>", 1)[0]
    assert "badge down\">FULL" in row and "1 B" in row
    row = body.split(f'data-node="127.0.0.1:{other.http_port}"', 1)[1].split("</tr>", 1)[0]
    assert "FULL" not in row and "0 B / 1 B" in row
    assert 'data-action="clear_topic_disk_bound"' in body and 'name="max_disk_bytes" value="1"' in body

    status, _, _ = act(cluster.admin, "clear_topic_disk_bound", topic=unique)
    assert status == 303
    assert all(n.json(f"/topic/settings?topic={unique}")["settings"] == {} for n in cluster.nsqds)
    assert "max_disk_bytes" not in full.stats(unique)["topics"][0]
    assert "On disk / bound" not in page(cluster.admin, f"/topics/{unique}")[1]

    # retention: 1h, no size bound, on both; what it keeps is shown
    status, _, _ = act(cluster.admin, "set_topic_retention", topic=unique, time="1h", bytes="")
    assert status == 303
    for nsqd in cluster.nsqds:
        kept = nsqd.json(f"/topic/retention?topic={unique}")
        assert (kept["enabled"], kept["source"], kept["time"], kept["bytes"]) == (True, "topic", 3600 * 10**9, 0)
    publish(other, unique, [b"r1", b"r2", b"r3"])
    body = page(cluster.admin, f"/topics/{unique}")[1]
    row = section(body, 'id="retention"').split(f'data-node="127.0.0.1:{other.http_port}"', 1)[1].split("</tr>", 1)[0]
    assert "1h0m0s" in row and re.findall(r'<td class="num">(.*?)</td>', row)[0] == '<span class="num">3</span>'
    assert 'data-action="clear_topic_retention"' in body and 'name="time" value="1h0m0s"' in body
    assert 'data-action="rewind_channel"' in page(cluster.admin, f"/topics/{unique}/c")[1]

    status, _, _ = act(cluster.admin, "clear_topic_retention", topic=unique)
    assert status == 303
    assert not any(n.json(f"/topic/retention?topic={unique}")["enabled"] for n in cluster.nsqds)
    body = page(cluster.admin, f"/topics/{unique}")[1]
    assert 'id="retention"' not in body
    assert 'data-action="rewind_channel"' not in page(cluster.admin, f"/topics/{unique}/c")[1]


def test_dead_letters_set_shown_and_moved_back(cluster, unique):
    nsqd = cluster.nsqds[0]
    dead = f"{unique}.dead"
    ok(nsqd, "POST", f"/topic/create?topic={unique}")
    for channel in ("work", "other"):
        ok(nsqd, "POST", f"/channel/create?topic={unique}&channel={channel}")
    registered(cluster, unique)
    body = page(cluster.admin, f"/topics/{unique}/work")[1]
    assert "Max attempts</th>" not in body and 'data-action="set_channel_dead_letter"' in body
    assert 'data-action="clear_channel_dead_letter"' not in body

    # max attempts 1, the default dead-letter topic (TOPIC.dead)
    status, _, body = post(cluster.admin, "/actions", {"action": "set_channel_dead_letter", "topic": unique, "channel": "work", "max_attempts": "1", "dead_letter_topic": ""})
    assert "after 1 deliveries" in body and "--dead-letter-topic" in body
    status, _, _ = act(cluster.admin, "set_channel_dead_letter", topic=unique, channel="work", max_attempts="1", dead_letter_topic="")
    assert status == 303
    assert nsqd.json(f"/channel/settings?topic={unique}&channel=work") == {"max_attempts": 1, "dead_letter_topic": dead, "settings": {"max_attempts": 1}}

    publish(nsqd, unique, [b"d1", b"d2", b"d3", b"d4"])
    take_and_requeue(nsqd, unique, "work", 4)
    wait_for(lambda: channel_stats(nsqd, unique, "work")["dead_letter_count"] == 4, message="4 dead letters")
    body = page(cluster.admin, f"/topics/{unique}/work")[1]
    row = body.split('id="channel-nodes"', 1)[1].split("</tr>", 2)[1]
    assert f'href="/topics/{dead}">{dead}</a>' in row and '<td class="num dead"><span class="num">4</span>' in row
    assert 'data-action="clear_channel_dead_letter"' in body and 'name="max_attempts" value="1"' in body
    topic_body = page(cluster.admin, f"/topics/{unique}")[1]
    assert '<td class="num dead"><span class="num">4</span>' in section(topic_body, 'data-channel="work"')

    # the dead-letter topic's page: each message's origin, and the move back
    registered(cluster, dead)
    body = page(cluster.admin, f"/topics/{dead}")[1]
    origins = section(body, 'id="dead-letters"')
    assert origins.count(f'href="/topics/{unique}/work">{unique}/work</a>') == 4
    assert 'data-action="requeue_dead_letters"' in body
    status, headers, _ = act(cluster.admin, "requeue_dead_letters", topic=dead, to="channel", n="1")
    assert status == 303 and headers["Location"] == f"/topics/{dead}?done=requeue_dead_letters&moved=1&kept=0"
    assert channel_stats(nsqd, unique, "work")["depth"] == 1 and nsqd.stats(dead)["topics"][0]["depth"] == 3
    status, headers, _ = act(cluster.admin, "requeue_dead_letters", topic=dead, to="channel", n="")
    assert status == 303 and headers["Location"] == f"/topics/{dead}?done=requeue_dead_letters&moved=3&kept=0"
    assert "Moved back 3 messages (0 stayed" in page(cluster.admin, headers["Location"])[1]
    # into the channel they came from, not onto the topic: "other" had them already
    assert channel_stats(nsqd, unique, "work")["depth"] == 4
    assert channel_stats(nsqd, unique, "other")["depth"] == 4
    assert nsqd.stats(dead)["topics"][0]["depth"] == 0

    # again, through a channel of the dead-letter topic, onto the topic this time
    ok(nsqd, "POST", f"/channel/create?topic={dead}&channel=inspect")
    take_and_requeue(nsqd, unique, "work", 4)
    wait_for(lambda: channel_stats(nsqd, dead, "inspect")["depth"] == 4, message="4 dead letters again")
    body = page(cluster.admin, f"/topics/{dead}/inspect")[1]
    assert 'data-action="requeue_dead_letters_channel"' in body
    status, headers, _ = act(cluster.admin, "requeue_dead_letters_channel", topic=dead, channel="inspect", to="topic")
    assert status == 303 and "moved=4&kept=0" in headers["Location"]
    assert channel_stats(nsqd, unique, "work")["depth"] == 4
    assert channel_stats(nsqd, unique, "other")["depth"] == 8
    assert channel_stats(nsqd, dead, "inspect")["depth"] == 0

    status, _, _ = act(cluster.admin, "clear_channel_dead_letter", topic=unique, channel="work")
    assert status == 303
    assert nsqd.json(f"/channel/settings?topic={unique}&channel=work")["settings"] == {}
    assert "max_attempts" not in channel_stats(nsqd, unique, "work")


def test_peek_and_find_escape_what_nsqd_says(cluster, unique):
    nsqd = cluster.nsqds[1]
    bodies = [b"<script>alert(1)</script>", b"\x00\xff\x01binary", b"x" * 2000]
    for b in bodies:
        ok(nsqd, "POST", f"/pub?topic={unique}", b)
    body = page(cluster.admin, f"/topics/{unique}")[1]
    assert 'class="grid messages' not in body and f'href="?peek=10#messages"' in body
    status, body = page(cluster.admin, f"/topics/{unique}?peek=10")
    assert status == 200
    peeked = body.split('id="messages"', 1)[1]
    assert "The next 3 of 3 queued" in peeked
    assert "<script>alert" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in peeked
    assert r"\x00\xff\x01binary" in peeked
    assert "x" * 512 + "</code>" in peeked and "x" * 513 not in peeked and "2.0 KiB in all" in peeked
    ids = re.findall(r'<tr data-id="([0-9a-f]{16})">', peeked)
    assert len(ids) == 3

    body = page(cluster.admin, f"/topics/{unique}?find={ids[0]}")[1]
    found = section(body, 'id="found"')
    assert f"127.0.0.1:{nsqd.http_port}" in found and "<td>topic</td>" in found and "queued: disk" in found
    assert "Not a message id" in page(cluster.admin, f"/topics/{unique}?find=%3Cb%3E")[1]
    assert "is not queued, deferred or in flight" in page(cluster.admin, f"/topics/{unique}?find={'0' * 16}")[1]

    # a channel: queued, deferred and in flight (to a client whose name is markup)
    ok(nsqd, "POST", f"/channel/create?topic={unique}&channel=c")
    ok(nsqd, "POST", f"/pub?topic={unique}&defer=600000", b"later")
    with RawClient(nsqd.tcp_port) as client:
        client.identify(heartbeat_interval=30000, hostname="<b>consumer</b>")
        assert client.sub(unique, "c").data == b"OK"
        client.cmd(b"RDY", b"1")
        client.read_message()
        wait_for(lambda: channel_stats(nsqd, unique, "c")["deferred_count"] == 1, message="the deferred one")
        assert 'class="grid messages' not in page(cluster.admin, f"/topics/{unique}/c")[1]
        status, body = page(cluster.admin, f"/topics/{unique}/c?peek=10&all=1")
    assert status == 200
    peeked = body.split('id="messages"', 1)[1]
    assert "The next 2 of 2 queued" in peeked and "Deferred (1)" in peeked and "In flight (1)" in peeked
    assert ">later</code>" in peeked.split("peek-deferred", 1)[1]
    in_flight = peeked.split("peek-in-flight", 1)[1]
    assert "to &lt;b&gt;consumer&lt;/b&gt;" in in_flight and "&lt;script&gt;alert(1)" in in_flight
    assert "<b>consumer" not in body and "<script>alert" not in body


def test_rewind_from_the_channel_page(cluster, unique):
    nsqd = cluster.nsqds[1]
    ok(nsqd, "POST", f"/topic/create?topic={unique}")
    ok(nsqd, "POST", f"/topic/retention?topic={unique}&time=1h")
    ok(nsqd, "POST", f"/channel/create?topic={unique}&channel=c")
    registered(cluster, unique)
    publish(nsqd, unique, [b"a", b"b", b"c", b"d", b"e"])
    with RawClient(nsqd.tcp_port) as client:
        client.identify(heartbeat_interval=30000)
        assert client.sub(unique, "c").data == b"OK"
        client.cmd(b"RDY", b"5")
        for _ in range(5):
            client.cmd(b"FIN", client.read_message()[2])
        client.cmd(b"RDY", b"0")
        wait_for(lambda: channel_stats(nsqd, unique, "c")["message_count"] == 5 and channel_stats(nsqd, unique, "c")["in_flight_count"] == 0, message="all finished")
    assert channel_stats(nsqd, unique, "c")["depth"] == 0
    target = {"topic": unique, "channel": "c"}
    assert post(cluster.admin, "/actions", {"action": "rewind_channel", **target, "since": "the day before"})[0] == 400
    # the token binds the values confirmed: another value with it is refused
    status, _, body = post(cluster.admin, "/actions", {"action": "rewind_channel", **target, "since": "oldest"})
    assert status == 200 and "since oldest" in body
    token = TOKEN_RE.search(body).group(1)
    assert post(cluster.admin, "/actions", {"action": "rewind_channel", **target, "since": "1s", "confirm": token})[0] == 403
    status, _, _ = post(cluster.admin, "/actions", {"action": "rewind_channel", **target, "since": "oldest", "confirm": token})
    assert status == 303
    wait_for(lambda: channel_stats(nsqd, unique, "c")["depth"] == 5, message="the 5 given again")
    body = page(cluster.admin, f"/topics/{unique}/c")[1]
    row = section(body, 'id="replay"')
    assert "the oldest retained message" in row and '<span class="num">5</span>' in row
