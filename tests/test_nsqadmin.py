"""pynsqadmin as a real process against real pynsqlookupd + 2 pynsqd (and Go's
daemons where present): its pages over plain HTTP, actions through their
confirmation, safety (no GET actions, CSRF token, read-only flag, escaping),
nodes that are down, flags.  The browser's view is in test_nsqadmin_browser.py."""

from __future__ import annotations

import html
import http.client
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from pynsqadmin.actions import ACTIONS

from helpers import (
    GO_NSQD_MISSING, Daemon, RawClient, channel_stats, go_nsq_binary, http_request, identify_and_upgrade, start_go_nsqd, start_nsqadmin,
    start_nsqd, start_nsqlookupd, wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN_RE = re.compile(r'name="confirm" value="([0-9a-f]+)"')


class Cluster:
    """pynsqlookupd, 2 pynsqd registered with it (with ``nsqd_flags``), pynsqadmin."""

    def __init__(self, tmp: Path, *nsqd_flags: str, sample_interval: str = "1s") -> None:
        self.lookupd = start_nsqlookupd()
        lookup = f"--lookupd-tcp-address=127.0.0.1:{self.lookupd.tcp_port}"
        self.nsqds = []
        for i in range(2):
            (tmp / f"nsqd{i}").mkdir()
            self.nsqds.append(start_nsqd(str(tmp / f"nsqd{i}"), "--broadcast-address=127.0.0.1", lookup, *nsqd_flags))
        self.admin = start_nsqadmin(f"--lookupd-http-address={self.lookupd.http_address}", f"--sample-interval={sample_interval}")

    def stop(self) -> None:
        for d in [self.admin, *self.nsqds, self.lookupd]:
            d.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("admin"))
    yield c
    c.stop()


def page(admin: Daemon, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", admin.http_port, timeout=15)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def post(admin: Daemon, path: str, form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", admin.http_port, timeout=15)
    try:
        conn.request("POST", path, urlencode(form), {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def act(admin: Daemon, action: str, **target: str) -> tuple[int, dict[str, str], str]:
    """Submit an action's form, then its confirmation."""
    status, _, body = post(admin, "/actions", {"action": action, **target})
    assert status == 200, body
    token = TOKEN_RE.search(body)
    assert token, body
    return post(admin, "/actions", {"action": action, **target, "confirm": html.unescape(token.group(1))})


def publish(nsqd: Daemon, topic: str, bodies: list[bytes]) -> None:
    status, body = nsqd.http("POST", f"/mpub?topic={topic}", b"\n".join(bodies))
    assert status == 200, body


# ---------------------------------------------------------------- pages


def test_topics_page_lists_a_topic_after_publish(cluster, unique):
    publish(cluster.nsqds[0], unique, [b"a", b"b", b"c"])
    publish(cluster.nsqds[1], unique, [b"d"])

    def listed() -> str | None:
        status, body = page(cluster.admin, "/")
        assert status == 200
        return body if f'data-topic="{unique}"' in body else None

    body = wait_for(listed, message="topic on the topics page")
    row = body.split(f'data-topic="{unique}"', 1)[1].split("</tr>", 1)[0]
    assert f'href="/topics/{unique}"' in row
    cells = re.findall(r'<td class="num[^"]*">(.*?)</td>', row)
    assert re.sub("<[^>]+>", "", cells[0]) == "2"  # nsqds
    assert re.sub("<[^>]+>", "", cells[2]) == "4"  # depth: no channel yet, all in the topic


def test_topic_page_breaks_down_per_nsqd_and_lists_channels(cluster, unique):
    for nsqd in cluster.nsqds:
        assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
        assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=work")[0] == 200
    publish(cluster.nsqds[0], unique, [b"x"] * 5)
    publish(cluster.nsqds[1], unique, [b"y"] * 2)
    status, body = page(cluster.admin, f"/topics/{unique}")
    assert status == 200
    for nsqd in cluster.nsqds:
        assert f'data-node="127.0.0.1:{nsqd.http_port}"' in body
    channels = body.split('id="channels"', 1)[1]
    row = channels.split('data-channel="work"', 1)[1].split("</tr>", 1)[0]
    assert re.sub("<[^>]+>", "", re.findall(r'<td class="num[^"]*">(.*?)</td>', row)[0]) == "7"
    assert f'href="/topics/{unique}/work"' in row
    # the per-node actions (tombstone) and the topic's own
    assert 'data-action="tombstone_topic_producer"' in body and 'data-action="pause_topic"' in body
    assert 'data-action="unpause_topic"' not in body


def test_channel_page_shows_its_clients_escaped(cluster, unique):
    nsqd = cluster.nsqds[0]
    with RawClient(nsqd.tcp_port) as client:
        identify_and_upgrade(client, snappy=True, user_agent='<script>alert("ua")</script>', hostname="consumer-host", heartbeat_interval=30000)
        assert client.sub(unique, "live").data == b"OK"
        client.cmd(b"RDY", b"3")
        publish(nsqd, unique, [b"m1", b"m2"])
        client.read_message()
        status, body = page(cluster.admin, f"/topics/{unique}/live")
    assert status == 200
    clients = body.split('id="clients"', 1)[1].split("</table>", 1)[0]
    assert "consumer-host" in clients
    assert "<script>" not in body and "&lt;script&gt;alert(&#34;ua&#34;)&lt;/script&gt;" in clients
    assert ">snappy<" in clients
    assert f"127.0.0.1:{nsqd.http_port}" in clients


def test_channel_page_names_each_clients_client_id(cluster, unique):
    """nsqadmin shows "host:port (client_id)": the id is how an operator
    tells workers on one host apart."""
    nsqd = cluster.nsqds[0]
    with RawClient(nsqd.tcp_port) as client:
        identify_and_upgrade(client, client_id="billing-worker-7", hostname="consumer-host", heartbeat_interval=30000)
        assert client.sub(unique, "ids").data == b"OK"
        status, body = page(cluster.admin, f"/topics/{unique}/ids")
    assert status == 200
    clients = body.split('id="clients"', 1)[1].split("</table>", 1)[0]
    assert "consumer-host" in clients and "billing-worker-7" in clients


def test_nodes_page_shows_each_nsqd_and_its_lookupd(cluster):
    status, body = page(cluster.admin, "/nodes")
    assert status == 200
    for nsqd in cluster.nsqds:
        row = body.split(f'data-node="127.0.0.1:{nsqd.http_port}"', 1)[1].split("</tr>", 1)[0]
        assert 'badge up">up' in row and "1.3.0" in row and cluster.lookupd.http_address in row
        assert f">{nsqd.tcp_port}<" in row
    status, body = page(cluster.admin, f"/nodes/127.0.0.1:{cluster.nsqds[0].http_port}")
    assert status == 200 and "Version" in body
    # a URL is not an address book: unknown nodes are never asked
    assert page(cluster.admin, "/nodes/127.0.0.1:1")[0] == 404


def test_topic_created_through_the_lookup_page(cluster, unique):
    status, headers, _ = act(cluster.admin, "create_topic", topic=unique)
    assert status == 303 and headers["Location"] == "/lookup?done=create_topic"
    assert unique in cluster.lookupd.json("/topics")["topics"]
    body = page(cluster.admin, "/")[1]
    assert f'data-topic="{unique}"' in body
    status, body = page(cluster.admin, f"/topics/{unique}")
    assert status == 200 and "Registered in nsqlookupd only" in body
    assert page(cluster.admin, "/topics/never_heard_of")[0] == 404


def test_lookup_page_shows_registrations_and_tombstones(cluster, unique):
    for nsqd in cluster.nsqds:
        assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
    assert cluster.nsqds[0].http("POST", f"/channel/create?topic={unique}&channel=reg")[0] == 200
    node = f"127.0.0.1:{cluster.nsqds[1].http_port}"
    assert cluster.lookupd.http("POST", f"/topic/tombstone?topic={unique}&node={node}")[0] == 200

    def shown() -> str | None:
        body = page(cluster.admin, "/lookup")[1]
        row = body.split(f'data-topic="{unique}"', 1)[-1].split("</tr>", 1)[0]
        return row if ">reg<" in row and "tombstoned" in row else None

    row = wait_for(shown, message="registrations on the lookup page")
    assert f"{node} · tombstoned" in row


def test_graphs_come_from_sampling(cluster, unique):
    nsqd = cluster.nsqds[0]
    assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200

    def drawn() -> str | None:
        body = page(cluster.admin, f"/topics/{unique}")[1]
        svg = re.search(r'<svg class="graph graph-depth"[^>]*data-points="(\d+)"', body)
        return body if svg and int(svg.group(1)) >= 2 else None

    wait_for(drawn, timeout=30, message="two samples of the topic")
    publish(nsqd, unique, [b"z"] * 30)

    def depth_seen() -> bool:
        body = page(cluster.admin, f"/topics/{unique}")[1]
        last = re.search(r'<svg class="graph graph-depth"[^>]*data-last="([0-9.]+)"', body)
        return bool(last) and float(last.group(1)) == 30.0

    wait_for(depth_seen, timeout=30, message="depth 30 in the graph")
    sparkline = page(cluster.admin, "/")[1].split(f'data-topic="{unique}"', 1)[1].split("</tr>", 1)[0]
    assert '<svg class="sparkline"' in sparkline


# ---------------------------------------------------------------- actions


def test_actions_need_post_confirmation_and_a_token(cluster, unique):
    nsqd = cluster.nsqds[0]
    assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=c")[0] == 200
    target = {"topic": unique, "channel": "c"}
    # no action by GET
    assert page(cluster.admin, "/actions?" + urlencode({"action": "pause_channel", **target}))[0] == 405
    # the first POST only asks
    status, _, body = post(cluster.admin, "/actions", {"action": "pause_channel", **target})
    assert status == 200 and "Pause channel “c”" in body and 'id="confirm"' in body
    assert channel_stats(nsqd, unique, "c")["paused"] is False
    # a forged confirmation (another site cannot know the token)
    assert post(cluster.admin, "/actions", {"action": "pause_channel", **target, "confirm": "0" * 64})[0] == 403
    # another site's form, even with a token
    token = TOKEN_RE.search(body).group(1)
    status, _, _ = post(cluster.admin, "/actions", {"action": "pause_channel", **target, "confirm": token}, {"Origin": "http://evil.example"})
    assert status == 403
    assert channel_stats(nsqd, unique, "c")["paused"] is False
    status, headers, _ = post(cluster.admin, "/actions", {"action": "pause_channel", **target, "confirm": token})
    assert status == 303 and headers["Location"] == f"/topics/{unique}/c?done=pause_channel"
    assert channel_stats(nsqd, unique, "c")["paused"] is True
    body = page(cluster.admin, headers["Location"])[1]
    assert "Channel paused." in body and 'data-action="unpause_channel"' in body
    # invalid names are refused before anything is asked of the cluster
    assert post(cluster.admin, "/actions", {"action": "empty_topic", "topic": "bad name!"})[0] == 400
    assert post(cluster.admin, "/actions", {"action": "no_such_action", "topic": unique})[0] == 400


def test_after_an_action_the_graphs_show_its_effect_not_the_sample_before(cluster, unique):
    """Emptied says "Channel emptied." next to a depth graph that must not
    still say 30 until the next sample (an hour away here)."""
    nsqd = cluster.nsqds[0]
    assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=c")[0] == 200
    publish(nsqd, unique, [b"z"] * 30)
    admin = start_nsqadmin(f"--nsqd-http-address={nsqd.http_address}", "--sample-interval=10m")
    try:
        def depth_graph(path: str) -> float | None:
            last = re.search(r'<svg class="graph graph-depth"[^>]*data-last="([0-9.]+)"', page(admin, path)[1])
            return float(last.group(1)) if last else None

        wait_for(lambda: depth_graph(f"/topics/{unique}/c") == 30.0, message="the first sample")
        status, headers, _ = act(admin, "empty_channel", topic=unique, channel="c")
        assert status == 303
        assert channel_stats(nsqd, unique, "c")["depth"] == 0
        assert depth_graph(headers["Location"]) == 0.0
    finally:
        admin.stop()


def test_topic_actions_on_every_nsqd(cluster, unique):
    for nsqd in cluster.nsqds:
        publish(nsqd, unique, [b"q"] * 3)
    status, headers, _ = act(cluster.admin, "pause_topic", topic=unique)
    wait_for(lambda: all(n.stats(unique)["topics"][0]["paused"] for n in cluster.nsqds), message="paused on both")
    status, headers, _ = act(cluster.admin, "empty_topic", topic=unique)
    assert status == 303
    assert all(n.stats(unique)["topics"][0]["depth"] == 0 for n in cluster.nsqds)
    status, headers, _ = act(cluster.admin, "delete_topic", topic=unique)
    assert status == 303 and headers["Location"] == "/?done=delete_topic"
    assert all(n.stats(unique)["topics"] == [] for n in cluster.nsqds)


def test_create_channel_through_lookupd_and_producers(cluster, unique):
    assert cluster.nsqds[0].http("POST", f"/topic/create?topic={unique}")[0] == 200
    wait_for(lambda: cluster.lookupd.http("GET", f"/lookup?topic={unique}")[0] == 200, message="topic registered")
    status, headers, _ = act(cluster.admin, "create_channel", topic=unique, channel="made")
    assert status == 303, headers
    assert channel_stats(cluster.nsqds[0], unique, "made")["depth"] == 0
    assert "made" in cluster.lookupd.json(f"/channels?topic={unique}")["channels"]


def test_read_only_admin_offers_and_takes_no_action(cluster, unique):
    nsqd = cluster.nsqds[0]
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=ro")[0] == 404  # no topic yet
    assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=ro")[0] == 200
    ro = start_nsqadmin(f"--nsqd-http-address={nsqd.http_address}", "--disable-actions")
    try:
        status, body = page(ro, f"/topics/{unique}/ro")
        assert status == 200 and "<form" not in body and "read-only" in body
        assert 'href="?peek=10#messages"' in body  # looking is no action
        assert 'method="post"' not in page(ro, f"/topics/{unique}")[1]
        assert post(ro, "/actions", {"action": "pause_channel", "topic": unique, "channel": "ro"})[0] == 403
        assert post(ro, "/actions", {"action": "set_channel_dead_letter", "topic": unique, "channel": "ro", "max_attempts": "1"})[0] == 403
        assert channel_stats(nsqd, unique, "ro")["paused"] is False
        assert "max_attempts" not in channel_stats(nsqd, unique, "ro")
    finally:
        ro.stop()


def test_admin_users_and_notifications(cluster, unique):
    """--admin-user: only the users a proxy names in --acl-http-header act;
    --notification-http-endpoint gets nsqadmin's JSON for each action."""
    received: list[dict] = []

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    nsqd = cluster.nsqds[0]
    assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
    admin = start_nsqadmin(
        f"--nsqd-http-address={nsqd.http_address}",
        "--admin-user=alice",
        f"--notification-http-endpoint=http://127.0.0.1:{server.server_address[1]}/actions",
    )
    try:
        status, body = page(admin, f"/topics/{unique}")
        assert status == 200 and 'method="post"' not in body  # a GET form (find a message) changes nothing
        assert post(admin, "/actions", {"action": "pause_topic", "topic": unique})[0] == 403
        alice = {"X-Forwarded-User": "alice"}
        assert 'data-action="pause_topic"' in page(admin, f"/topics/{unique}", alice)[1]
        status, _, body = post(admin, "/actions", {"action": "pause_topic", "topic": unique}, alice)
        token = TOKEN_RE.search(body).group(1)
        status, _, _ = post(admin, "/actions", {"action": "pause_topic", "topic": unique, "confirm": token}, {**alice, "User-Agent": "test-browser"})
        assert status == 303 and nsqd.stats(unique)["topics"][0]["paused"] is True
        wait_for(lambda: received, message="the notification")
        event = received[0]
        assert {k: event[k] for k in ("action", "topic", "channel", "node", "user", "remote_ip", "user_agent")} == {
            "action": "pause_topic", "topic": unique, "channel": "", "node": "", "user": "alice", "remote_ip": "127.0.0.1", "user_agent": "test-browser",
        }
        assert isinstance(event["timestamp"], int) and event["url"].endswith("/actions")
    finally:
        admin.stop()
        server.shutdown()


def test_ephemeral_names_in_urls(cluster, unique):
    nsqd = cluster.nsqds[0]
    with RawClient(nsqd.tcp_port) as client:
        client.identify(heartbeat_interval=30000)
        assert client.sub(unique, "tmp#ephemeral").data == b"OK"
        status, body = page(cluster.admin, f"/topics/{unique}")
        assert status == 200 and f'href="/topics/{unique}/tmp%23ephemeral"' in body
        status, body = page(cluster.admin, f"/topics/{unique}/tmp%23ephemeral")
        assert status == 200 and "tmp#ephemeral" in body


def test_down_nodes_are_marked_and_the_rest_renders(cluster, tmp_path, unique):
    doomed = start_nsqd(str(tmp_path), "--broadcast-address=127.0.0.1", f"--lookupd-tcp-address=127.0.0.1:{cluster.lookupd.tcp_port}")
    try:
        publish(doomed, unique, [b"m"])
        publish(cluster.nsqds[0], unique, [b"m"])
        address = f"127.0.0.1:{doomed.http_port}"
        wait_for(lambda: f'data-node="{address}" class="up"' in page(cluster.admin, "/nodes")[1], message="node up")
        wait_for(lambda: any("nsqd up" in line and address in line for line in cluster.admin.lines), message="the sampler seeing it")
    finally:
        doomed.kill()
    # kill -9: lookupd drops it at once; pynsqadmin remembers and marks it
    wait_for(lambda: any("nsqd down" in line and address in line for line in cluster.admin.lines), message="the sampler's log line")
    status, body = page(cluster.admin, "/nodes")
    assert status == 200
    row = body.split(f'data-node="{address}"', 1)[1].split("</tr>", 1)[0]
    assert 'class="down"' in body.split(f'data-node="{address}"', 1)[1][:20] and "badge down" in row
    status, body = page(cluster.admin, f"/topics/{unique}")
    assert status == 200 and f"127.0.0.1:{cluster.nsqds[0].http_port}" in body
    assert "badge down" in body.split(address, 1)[1][:200]
    # an nsqlookupd that refuses, an nsqd gone and one that hangs (accepts,
    # never answers): each marked, the page rendered once the timeout passes
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    hung_address = f"127.0.0.1:{hung.getsockname()[1]}"
    with_dead = start_nsqadmin(
        f"--lookupd-http-address={cluster.lookupd.http_address}",
        "--lookupd-http-address=127.0.0.1:1",
        f"--nsqd-http-address={address}",
        f"--nsqd-http-address={hung_address}",
        "--http-client-request-timeout=1s",
    )
    try:
        started = time.monotonic()
        status, body = page(with_dead, "/")
        assert time.monotonic() - started < 10
        assert status == 200 and f'data-topic="{unique}"' in body
        assert 'role="alert">nsqlookupd 127.0.0.1:1:' in body and f'role="alert">nsqd {address}:' in body
        assert f'role="alert">nsqd {hung_address}: GET' in body and "timed out" in body
        status, body = page(with_dead, "/nodes")
        assert status == 200 and 'badge down">down' in body
    finally:
        with_dead.stop()
        hung.close()


# ---------------------------------------------------------------- the daemon


def test_version_flags_and_config_endpoint(cluster):
    out = subprocess.run([sys.executable, "-m", "pynsqadmin", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("nsqadmin v1.3.0-compatible (built w/pynsqd-")
    bad = subprocess.run([sys.executable, "-m", "pynsqadmin", "--sample-interval=never"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    helped = subprocess.run([sys.executable, "-m", "pynsqadmin", "--help"], capture_output=True, text=True, timeout=30)
    assert "-lookupd-http-address value" in helped.stderr and "0.0.0.0:4171" in helped.stderr and "unused" in helped.stderr
    assert any(re.search(r"HTTP: listening on 127\.0\.0\.1:\d+$", line) for line in cluster.admin.lines)
    status, body = http_request("GET", f"http://127.0.0.1:{cluster.admin.http_port}/config/nsqlookupd_http_addresses")
    assert status == 200 and json.loads(body) == [cluster.lookupd.http_address]
    status, body = http_request("GET", f"http://127.0.0.1:{cluster.admin.http_port}/ping")
    assert (status, body) == (200, b"OK")
    status, body = page(cluster.admin, "/static/style.css")
    assert status == 200 and "graph-line" in body
    status, body = page(cluster.admin, "/")
    # everything from here: no CDN, no external fetch
    assert not re.search(r'(src|href)="(https?:)?//', body)


def test_base_path(cluster, unique):
    publish(cluster.nsqds[0], unique, [b"x"])
    admin = start_nsqadmin(f"--nsqd-http-address={cluster.nsqds[0].http_address}", "--base-path=/admin")
    try:
        status, body = page(admin, "/admin/")
        assert status == 200 and f'href="/admin/topics/{unique}"' in body and 'href="/admin/static/style.css"' in body
        assert page(admin, "/")[0] == 404
        assert page(admin, f"/admin/topics/{quote(unique)}")[0] == 200
    finally:
        admin.stop()


# ---------------------------------------------------------------- Go's daemons


def test_pages_against_go_nsqd_and_nsqlookupd(tmp_path, unique):
    go_lookupd = go_nsq_binary("nsqlookupd")
    if go_lookupd is None or go_nsq_binary("nsqd") is None:
        pytest.skip(GO_NSQD_MISSING)
    lookupd = Daemon([go_lookupd, "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--broadcast-address=127.0.0.1"])
    nsqd = admin = None
    try:
        lookupd.wait_listening()
        nsqd = start_go_nsqd(
            str(tmp_path), "--broadcast-address=127.0.0.1", f"--lookupd-tcp-address=127.0.0.1:{lookupd.tcp_port}", "--e2e-processing-latency-percentile=0.99",
        )
        publish(nsqd, unique, [b"go"] * 4)
        assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=gch")[0] == 200
        publish(nsqd, unique, [b"go"] * 3)
        with RawClient(nsqd.tcp_port) as consumer:  # one finished message: e2e latency to show
            consumer.identify(heartbeat_interval=30000)
            assert consumer.sub(unique, "gch").data == b"OK"
            consumer.cmd(b"RDY", b"1")
            msg_id = consumer.read_message()[2]
            consumer.cmd(b"RDY", b"0")
            consumer.cmd(b"FIN", msg_id)
            consumer.cmd(b"CLS")
            assert consumer.read_response().data == b"CLOSE_WAIT"
        admin = start_nsqadmin(f"--lookupd-http-address=127.0.0.1:{lookupd.http_port}")
        node = f"127.0.0.1:{nsqd.http_port}"

        def topic_page() -> str | None:
            status, body = page(admin, f"/topics/{unique}")
            return body if status == 200 and f'data-node="{node}"' in body else None

        body = wait_for(topic_page, message="Go nsqd's topic on the page")
        row = body.split('data-channel="gch"', 1)[1].split("</tr>", 1)[0]
        # the 4 held by the channel-less topic went to its first channel; 1 finished
        assert re.sub("<[^>]+>", "", re.findall(r'<td class="num[^"]*">(.*?)</td>', row)[0]) == "6"
        assert "e2e p99" in body
        nodes = page(admin, "/nodes")[1]
        assert f'data-node="{node}" class="up"' in nodes and "1.3.0" in nodes
        # none of pynsqd's opt-in features: no error, no control, no peek (even when asked)
        beyond = [f'data-action="{name}"' for name, a in ACTIONS.items() if a.group] + ['id="messages"', "?peek=", "Settings", 'id="dead-letters"']
        for path in (f"/topics/{unique}", f"/topics/{unique}?peek=10&find=18afeffa5aa69000", f"/topics/{unique}/gch", f"/topics/{unique}/gch?peek=10&all=1"):
            status, body = page(admin, path)
            assert status == 200 and 'role="alert"' not in body, path
            assert not [b for b in beyond if b in body], path
        status, headers, _ = act(admin, "pause_channel", topic=unique, channel="gch")
        assert status == 303
        assert channel_stats(nsqd, unique, "gch")["paused"] is True
        assert page(admin, "/lookup")[0] == 200
    finally:
        for d in (admin, nsqd, lookupd):
            if d is not None:
                d.stop()


def test_readme_starts_pynsqadmin_on_loopback():
    text = (ROOT / "README.md").read_text()
    run = text[text.index("<!-- run-command -->") :].split("```")[1]
    assert ".venv/bin/pynsqd-local" in run  # which starts pynsqadmin on 127.0.0.1:4171 (tests/test_local.py)
    assert "http://127.0.0.1:4171/" in text.split("<!-- run-command -->")[0]
    for name in ("topics", "topic", "channel", "channel-peek", "dead-letters", "nodes", "lookup"):
        assert (ROOT / "docs" / f"nsqadmin-{name}.png").exists()
        assert f"docs/nsqadmin-{name}.png" in text
    assert "python -m pynsqadmin.screenshots docs/" in text


async def test_the_sampler_feeds_the_history_in_process(cluster, unique):
    """open_nsqadmin in-process; rounds driven by hand, no waiting on the clock."""
    from pynsqadmin import open_nsqadmin

    nsqd = cluster.nsqds[1]
    async with open_nsqadmin(http_address="127.0.0.1:0", nsqd_http_addresses=[nsqd.http_address], sample_interval=3600.0) as admin:
        assert admin.http_port > 0
        publish(nsqd, unique, [b"s"] * 10)
        await admin.sample_once()
        publish(nsqd, unique, [b"s"] * 20)
        await admin.sample_once()
        series = admin.history.series(unique)
        assert series is not None and series["depth"].last() == 30
        assert admin.history.latest(unique, "", "rate") > 0
        assert admin.samples >= 2
