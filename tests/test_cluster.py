"""A real cluster: 2 pynsqlookupd + 3 pynsqd subprocesses, every nsqd
registered with both lookupds, consumed by the official pynsq Reader that
knows only the two lookupd HTTP addresses.

The same scenario runs on loopback (distinct ephemeral ports) and, where the
machine allows it, across three network namespaces joined by a bridge, each
daemon on its namespace's own address with ``--broadcast-address`` set so that
``/lookup`` hands out addresses that are reachable from the other namespaces.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from helpers import Daemon, http_request, wait_for

DRIVER = str(Path(__file__).parent / "pynsq_driver.py")
TOPIC = "clustered"
CHANNEL = "cluster"
PER_NSQD = 20
T = TypeVar("T")


# ---------------------------------------------------------------- network namespaces

CLONE_NEWNET = 0x40000000


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread that has joined network namespace
    ``ns``: its sockets live there (a namespace is per thread)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class Namespaces:
    """Three namespaces: a bridge in the first joins veths from the other two.
    Addresses 10.200.0.1, .2, .3 (/24)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.names = [f"pynsq{tag}{x}" for x in "abc"]
        self.addresses = ["10.200.0.1", "10.200.0.2", "10.200.0.3"]
        self.created: list[str] = []

    def setup(self) -> None:
        a = self.names[0]
        for ns in self.names:
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", a, "addr", "add", f"{self.addresses[0]}/24", "dev", "br0")
        sh("ip", "-n", a, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names[1:], start=1):
            # create the pair inside the hub namespace, then move one end out
            sh("ip", "-n", a, "link", "add", f"hub{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", a, "link", "set", f"hub{i}", "master", "br0")
            sh("ip", "-n", a, "link", "set", f"hub{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def cleanup(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.created.clear()


def netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"pynsqprobe{os.getpid() % 100000}"
    try:
        sh("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        return f"cannot create a network namespace: {detail}"
    try:
        sh("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        return f"no bridge/veth support in namespaces: {detail}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


# ---------------------------------------------------------------- the cluster


class Node:
    """One daemon, possibly inside a namespace, restartable with the same arguments."""

    def __init__(self, kind: str, args: list[str], host: str, ns: str | None) -> None:
        self.kind = kind
        self.args = args
        self.host = host
        self.ns = ns
        self.daemon = self._spawn()

    def _spawn(self) -> Daemon:
        prefix = ["ip", "netns", "exec", self.ns] if self.ns else []
        return Daemon([*prefix, sys.executable, "-m", self.kind, *self.args])

    def restart(self) -> None:
        self.daemon = self._spawn()
        self.daemon.wait_listening()

    @property
    def tcp(self) -> str:
        return f"{self.host}:{self.daemon.tcp_port}"

    @property
    def http(self) -> str:
        return f"{self.host}:{self.daemon.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        url = f"http://{self.http}{path}"
        if self.ns is None:
            return http_request(method, url, body)
        return run_in_netns(self.ns, lambda: http_request(method, url, body))

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (self.http, path, status, body)
        return json.loads(body)


class Cluster:
    def __init__(self, tmp: Path, hosts: list[str], namespaces: list[str | None]) -> None:
        """Lookupds on hosts[0] and hosts[1], nsqd i on hosts[i]."""
        self.hosts = hosts
        self.namespaces = namespaces
        self.lookupds: list[Node] = []
        self.nsqds: list[Node] = []
        self.reader_ns = namespaces[2]
        for i in range(2):
            self.lookupds.append(Node("pynsqlookupd", [
                f"--tcp-address={hosts[i]}:{self._port(4160)}",
                f"--http-address={hosts[i]}:{self._port(4161)}",
                f"--broadcast-address={hosts[i]}",
                "--tombstone-lifetime=2s",
            ], hosts[i], namespaces[i]))
        for node in self.lookupds:
            node.daemon.wait_listening()
        for i in range(3):
            (tmp / f"nsqd{i}").mkdir()  # nsqd, as Go's, never creates its --data-path
            self.nsqds.append(Node("pynsqd", [
                f"--tcp-address={hosts[i]}:{self._port(4150)}",
                f"--http-address={hosts[i]}:{self._port(4151)}",
                f"--broadcast-address={hosts[i]}",
                f"--data-path={tmp / f'nsqd{i}'}",
                "--log-level=debug",
                *[f"--lookupd-tcp-address={node.tcp}" for node in self.lookupds],
            ], hosts[i], namespaces[i]))
        for node in self.nsqds:
            node.daemon.wait_listening()

    def _port(self, default: int) -> int:
        # namespaces have ports of their own: use nsqd's defaults there
        return default if self.namespaces[0] else 0

    def stop(self) -> None:
        for node in self.nsqds + self.lookupds:
            node.daemon.kill()

    def logs(self) -> str:
        out = []
        for node in self.lookupds + self.nsqds:
            out.append(f"---- {node.kind} {node.host} ----")
            out.extend(node.daemon.lines[-40:])
        return "\n".join(out)

    # -------------------------------------------------------- views

    def lookup(self, lookupd: Node) -> set[str]:
        """tcp addresses /lookup hands out for the topic (empty if unknown)."""
        status, body = lookupd.request("GET", f"/lookup?topic={TOPIC}")
        if status == 404:
            return set()
        assert status == 200, body
        return {f"{p['broadcast_address']}:{p['tcp_port']}" for p in json.loads(body)["producers"]}

    def nodes(self, lookupd: Node) -> dict[str, dict[str, Any]]:
        return {f"{p['broadcast_address']}:{p['tcp_port']}": p for p in lookupd.get("/nodes")["producers"]}

    def channels(self, nsqd: Node) -> list[str]:
        stats = nsqd.get(f"/stats?format=json&topic={TOPIC}")
        return [c["channel_name"] for t in stats["topics"] for c in t["channels"]]

    def start_reader(self, count: int) -> subprocess.Popen[str]:
        prefix = ["ip", "netns", "exec", self.reader_ns] if self.reader_ns else []
        lookupd_args = [arg for node in self.lookupds for arg in ("--lookupd", node.http)]
        return subprocess.Popen(
            [*prefix, sys.executable, DRIVER, "read", TOPIC, CHANNEL, str(count), *lookupd_args, "--timeout", "45"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


def run_scenario(cluster: Cluster) -> dict[str, float]:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    lookupds, nsqds = cluster.lookupds, cluster.nsqds
    every = {n.tcp for n in nsqds}

    # every nsqd registered with both lookupds
    for lookupd in lookupds:
        wait_for(lambda: set(cluster.nodes(lookupd)) >= every, timeout=20, message=f"all nsqds in {lookupd.http}/nodes")
    timings["registered"] = time.monotonic() - t0

    # the topic starts on nsqd 0; the Reader finds it through the lookupds and
    # its SUB creates the channel there, which nsqd 0 registers with both
    assert nsqds[0].request("POST", f"/pub?topic={TOPIC}", b"n0-first") == (200, b"OK")
    for lookupd in lookupds:
        wait_for(lambda: cluster.lookup(lookupd) == {nsqds[0].tcp}, timeout=15, message="topic on nsqd 0 in /lookup")
    expected = {"n0-first"} | {f"n{i}-{j}" for i in range(3) for j in range(PER_NSQD)}
    reader = cluster.start_reader(len(expected))
    try:
        for lookupd in lookupds:
            wait_for(lambda: CHANNEL in lookupd.get(f"/channels?topic={TOPIC}")["channels"], timeout=30,
                     message="the Reader's channel registered")
        # nsqds 1 and 2 get the topic only now: they ask the lookupds for its
        # channels first, so these messages wait in the Reader's channel even
        # though another channel is created there at once (without the query,
        # that first channel would take them all: nsqio/nsq #1416)
        for i, nsqd in enumerate(nsqds):
            body = "\n".join(f"n{i}-{j}" for j in range(PER_NSQD)).encode()
            assert nsqd.request("POST", f"/mpub?topic={TOPIC}", body) == (200, b"OK")
            if i:
                assert nsqd.request("POST", f"/channel/create?topic={TOPIC}&channel=audit") == (200, b"")
        for i in (1, 2):
            wait_for(lambda: CHANNEL in cluster.channels(nsqds[i]), timeout=15, message=f"channel pre-created on nsqd {i}")
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate(timeout=10)
    assert reader.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    bodies = [e["body"] for e in events if e["event"] == "message"]
    assert set(bodies) == expected, (sorted(expected - set(bodies)), err[-2000:])
    assert len(bodies) == len(expected)
    for lookupd in lookupds:
        assert cluster.lookup(lookupd) == every
    timings["consumed"] = time.monotonic() - t0

    # kill nsqd 2: both lookupds forget it, in /lookup and /nodes
    gone = nsqds[2].tcp
    nsqds[2].daemon.kill()
    for lookupd in lookupds:
        wait_for(lambda: gone not in cluster.lookup(lookupd) and gone not in cluster.nodes(lookupd), timeout=15,
                 message=f"killed nsqd gone from {lookupd.http}")
    assert cluster.lookup(lookupds[0]) == every - {gone}
    # restarted on the same data path, it loads its topic and channel and registers them again
    nsqds[2].restart()
    back = nsqds[2].tcp
    for lookupd in lookupds:
        wait_for(lambda: back in cluster.lookup(lookupd) and back in cluster.nodes(lookupd), timeout=20,
                 message=f"restarted nsqd back in {lookupd.http}")
        assert CHANNEL in lookupd.get(f"/channels?topic={TOPIC}")["channels"]
    timings["kill_restart"] = time.monotonic() - t0

    # tombstone nsqd 0's topic on both lookupds: hidden from /lookup for the
    # lifetime (2s), still listed in /nodes with its tombstone, then back
    node = f"{nsqds[0].host}:{nsqds[0].daemon.http_port}"
    for lookupd in lookupds:
        assert lookupd.request("POST", f"/topic/tombstone?topic={TOPIC}&node={node}") == (200, b"")
    tombstoned_at = time.monotonic()
    for lookupd in lookupds:
        assert nsqds[0].tcp not in cluster.lookup(lookupd)
        entry = cluster.nodes(lookupd)[nsqds[0].tcp]
        assert dict(zip(entry["topics"], entry["tombstones"])) == {TOPIC: True}
    for lookupd in lookupds:
        wait_for(lambda: nsqds[0].tcp in cluster.lookup(lookupd), timeout=15, message="tombstone expiry")
    assert time.monotonic() - tombstoned_at >= 1.5
    for lookupd in lookupds:
        assert cluster.lookup(lookupd) == {n.tcp for n in nsqds}
    timings["tombstone"] = time.monotonic() - t0
    return timings


def _run(cluster_factory: Callable[[], Cluster]) -> None:
    cluster = None
    try:
        cluster = cluster_factory()
        timings = run_scenario(cluster)
        print("timings (s since start):", {k: round(v, 2) for k, v in timings.items()})
    except BaseException:
        if cluster is not None:
            print(cluster.logs())
        raise
    finally:
        if cluster is not None:
            cluster.stop()


def test_cluster_on_loopback(tmp_path: Path) -> None:
    _run(lambda: Cluster(tmp_path, ["127.0.0.1"] * 3, [None, None, None]))


def test_cluster_across_network_namespaces(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    namespaces = Namespaces()
    try:
        namespaces.setup()
        _run(lambda: Cluster(tmp_path, namespaces.addresses, list(namespaces.names)))
    finally:
        namespaces.cleanup()
