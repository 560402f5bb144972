"""pynsq_to_nsq end to end between two real pynsqds: 100,000 messages copied
with the destination restarted (SIGTERM, same port and data) in the middle,
every one arriving; several topics to one destination topic; the JSON
filters as Go applies them."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections import Counter

import pytest

from helpers import Daemon, channel_stats, create_channel, drain, free_port, mpub_http, start_nsqd, tool_command, wait_for, wait_drained
from pynsqd.client.tools.nsq_to_nsq import Backoff, JSONFilter

N = 100_000



def start_tool(*args: str) -> Daemon:
    return Daemon([*tool_command("nsq_to_nsq"), *args])


def test_json_filter_as_go():
    log = logging.getLogger("test")
    f = JSONFilter("kind", "click", ["b", "a"], log)
    assert f(b'{"kind": "click", "a": 1, "b": 2.0, "c": 3}') == b'{"a":1,"b":2.0}'  # sorted keys, compact
    assert f(b'{"kind": "view", "a": 1}') is None  # no match: dropped
    assert f(b"not json") is None  # dropped, as Go does
    with pytest.raises(Backoff):  # a required value with the field missing: requeued with backoff
        f(b'{"a": 1}')
    number = JSONFilter("n", "5", [], log)
    assert number(b'{"n": 5}') == b'{"n": 5}' and number(b'{"n": 5.0}') == b'{"n": 5.0}' and number(b'{"n": "5"}') == b'{"n": "5"}'
    assert number(b'{"n": 6}') is None
    assert JSONFilter("n", "", [], log)(b'{"m": 1}') is None  # field required, no value: absent = dropped


def test_100k_messages_copied_through_a_destination_restart(nsqd, unique, tmp_path):
    dest_data = tmp_path / "dest"
    dest_data.mkdir()
    port = free_port()
    dest = start_nsqd(str(dest_data), f"--tcp-address=127.0.0.1:{port}")
    create_channel(dest, unique, "check")
    create_channel(nsqd, unique, "nsq_to_nsq")
    bodies = [b"c%06d" % i for i in range(N)]
    mpub_http(nsqd, unique, bodies)
    tool = start_tool(f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}", f"--destination-nsqd-tcp-address=127.0.0.1:{port}", "--status-every=0")
    started = time.monotonic()
    try:
        wait_for(lambda: channel_stats(dest, unique, "check")["message_count"] >= N // 3, timeout=60, interval=0.05, message="a third copied")
        assert dest.stop(signal.SIGTERM) == 0  # the destination restarts: its queue goes to disk...
        dest = start_nsqd(str(dest_data), f"--tcp-address=127.0.0.1:{port}")  # ...and comes back on its port
        wait_drained(nsqd, unique, "nsq_to_nsq")
        elapsed = time.monotonic() - started
        assert tool.stop(signal.SIGTERM) == 0
        assert any("connection" in line and "lost" in line or "cannot connect" in line for line in tool.lines), "\n".join(tool.lines)
        got = Counter(drain(dest, unique, "check"))
    finally:
        tool.kill()
        dest.stop()
    assert set(got) == set(bodies), f"{len(set(bodies) - set(got))} lost"
    duplicates = sum(got.values()) - N
    assert duplicates <= 1000, duplicates  # at most a batch caught in the restart, at least once
    print(f"\npynsq_to_nsq: {N} messages in {elapsed:.1f}s through a destination restart ({N / elapsed:,.0f} msg/s), {duplicates} copied twice")


def test_topics_to_one_destination_topic_with_filters(nsqd, unique, tmp_path):
    dest = start_nsqd(str(tmp_path))
    try:
        target = unique + "_all"
        create_channel(dest, target, "check")
        events = [json.dumps({"kind": kind, "n": i, "secret": "x"}).encode() for i, kind in enumerate(["click", "view"] * 10)]
        for topic in (unique + "_a", unique + "_b"):
            create_channel(nsqd, topic, "copy")
            mpub_http(nsqd, topic, events)
        tool = start_tool(f"--topic={unique}_a", f"--topic={unique}_b", "--channel=copy", f"--destination-topic={target}",
                          f"--nsqd-tcp-address={nsqd.tcp_address}", f"--destination-nsqd-tcp-address={dest.tcp_address}",
                          "--require-json-field=kind", "--require-json-value=click", "--whitelist-json-field=n", "--whitelist-json-field=kind")
        try:
            for topic in (unique + "_a", unique + "_b"):
                wait_drained(nsqd, topic, "copy")
        finally:
            assert tool.stop() == 0
        got = sorted(drain(dest, target, "check"))
        expected = sorted(json.dumps({"kind": "click", "n": i}, separators=(",", ":"), sort_keys=True).encode() for i in range(0, 20, 2))
        assert got == sorted(expected * 2)
    finally:
        dest.stop()


@pytest.mark.parametrize("args, message", [
    (["--destination-nsqd-tcp-address=127.0.0.1:1", "--topic=bad topic"], "pynsq_to_nsq: --topic is invalid"),
    (["--destination-nsqd-tcp-address=127.0.0.1:1", "--destination-topic=a/b"], "pynsq_to_nsq: --destination-topic is invalid"),
    ([], "pynsq_to_nsq: --destination-nsqd-tcp-address required (to publish stdin, use pyto_nsq)"),
    (["--destination-nsqd-tcp-address=127.0.0.1:1", "--mode=multicast"], "pynsq_to_nsq: invalid --mode 'multicast' (round-robin, hostpool or epsilon-greedy)"),
])
def test_bad_settings(args, message):
    argv = [*tool_command("nsq_to_nsq"), "--nsqd-tcp-address=127.0.0.1:1", *args]
    if not any(a.startswith("--topic") for a in args):
        argv.append("--topic=t")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stderr.strip() == message


def test_source_nsqd_down_stops_at_once():
    p = subprocess.run([*tool_command("nsq_to_nsq"), "--topic=t", "--nsqd-tcp-address=127.0.0.1:1", "--destination-nsqd-tcp-address=127.0.0.1:1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stderr.splitlines()[-1] == "pynsq_to_nsq: cannot connect to nsqd 127.0.0.1:1: [Errno 111] Connection refused"
