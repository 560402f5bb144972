"""Go NSQ 1.3.0's own programs, unchanged, against pynsqd and pynsqlookupd
(as the README says they work): nsqadmin's JSON API sees our cluster,
to_nsq publishes and nsq_tail consumes.  Skipped where the binaries are
missing.  (Go's nsq_to_file: tests/test_tool_nsq_to_file.py.)"""

from __future__ import annotations

import json
import subprocess

from helpers import Daemon, create_channel, go_binary, http_request, start_nsqd, start_nsqlookupd, wait_for


def test_go_nsqadmin_sees_a_pynsqd_cluster(tmp_path, unique):
    binary = go_binary("nsqadmin")
    lookupd = start_nsqlookupd()
    nsqd = admin = None
    try:
        nsqd = start_nsqd(str(tmp_path), "--broadcast-address=127.0.0.1", f"--lookupd-tcp-address=127.0.0.1:{lookupd.tcp_port}")
        create_channel(nsqd, unique, "go_admin")
        assert nsqd.http("POST", f"/mpub?topic={unique}", b"a\nb\nc")[0] == 200
        admin = Daemon([binary, "--http-address=127.0.0.1:0", f"--lookupd-http-address=127.0.0.1:{lookupd.http_port}"])
        admin.wait_listening(("HTTP",))

        def api(path: str) -> dict:
            status, body = http_request("GET", f"http://127.0.0.1:{admin.http_port}/api{path}")
            assert status == 200, (path, body)
            return json.loads(body)

        wait_for(lambda: unique in api("/topics")["topics"], message="our topic in Go's nsqadmin")
        nodes = api("/nodes")["nodes"]
        assert [(n["broadcast_address"], n["tcp_port"], n["http_port"]) for n in nodes] == [("127.0.0.1", nsqd.tcp_port, nsqd.http_port)]
        topic = api(f"/topics/{unique}")
        assert topic["message_count"] == 3 and topic["depth"] == 0  # all handed to the channel
        assert [c["channel_name"] for c in topic["channels"]] == ["go_admin"] and topic["channels"][0]["depth"] == 3
        # an admin action through Go's nsqadmin reaches pynsqd
        status, body = http_request("POST", f"http://127.0.0.1:{admin.http_port}/api/topics/{unique}/go_admin", json.dumps({"action": "empty"}).encode())
        assert status == 200, body
        assert json.loads(nsqd.http("GET", f"/stats?format=json&topic={unique}")[1])["topics"][0]["channels"][0]["depth"] == 0
    finally:
        for d in (admin, nsqd, lookupd):
            if d is not None:
                d.stop()


def test_go_to_nsq_and_nsq_tail_through_pynsqd(nsqd, unique):
    to_nsq, nsq_tail = go_binary("to_nsq"), go_binary("nsq_tail")
    create_channel(nsqd, unique, "tail")
    lines = b"".join(b"go line %d\n" % i for i in range(100))
    p = subprocess.run([to_nsq, f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}"], input=lines, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([nsq_tail, f"--topic={unique}", "--channel=tail", f"--nsqd-tcp-address={nsqd.tcp_address}", "-n", "100"],
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == sorted(b"go line %d" % i for i in range(100))
