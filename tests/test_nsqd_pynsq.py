"""Interop with the official pynsq client (Reader and Writer from PyPI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import RawClient, wait_for

DRIVER = str(Path(__file__).parent / "pynsq_driver.py")


def run_driver(*args: str, timeout: float = 60.0) -> list[dict]:
    proc = subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def start_driver(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, DRIVER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_driver(proc: subprocess.Popen, timeout: float = 60.0) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_pynsq_writer_then_two_channels_of_pynsq_readers(nsqd, unique):
    # both channels exist before publishing, so each gets a copy of everything
    for ch in ("one", "two"):
        assert nsqd.http("POST", f"/topic/create?topic={unique}")[0] == 200
        assert nsqd.http("POST", f"/channel/create?topic={unique}&channel={ch}")[0] == 200
    events = run_driver("write", unique, "50", "--nsqd", nsqd.tcp_address, "--prefix", "w-")
    assert events[-1] == {"event": "done", "acked": 50, "errors": 0}
    events = run_driver("write", unique, "50", "--mpub", "10", "--nsqd", nsqd.tcp_address, "--prefix", "m-")
    assert events[-1] == {"event": "done", "acked": 5, "errors": 0}
    assert nsqd.http("POST", f"/pub?topic={unique}", b"via-http")[0] == 200
    expected = {f"w-{i}" for i in range(50)} | {f"m-{i}" for i in range(50)} | {"via-http"}
    readers = [start_driver("read", unique, ch, "101", "--nsqd", nsqd.tcp_address, "--timeout", "40") for ch in ("one", "two")]
    for proc in readers:
        events = finish_driver(proc)
        bodies = [e["body"] for e in events if e["event"] == "message"]
        assert set(bodies) == expected and len(bodies) == 101


def test_pynsq_competing_readers_share_a_channel(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=shared")[0] == 200
    n = 200
    readers = [start_driver("read", unique, "shared", "1000", "--nsqd", nsqd.tcp_address, "--timeout", "40") for _ in range(2)]
    # both readers subscribed and ready before the work arrives
    wait_for(lambda: sum(c["ready_count"] > 0 for c in nsqd.stats(unique)["topics"][0]["channels"][0]["clients"]) == 2, timeout=30)
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [f"job-{i}".encode() for i in range(n)])

    def all_finished():
        st = nsqd.stats(unique)["topics"][0]["channels"][0]
        return sum(c["finish_count"] for c in st["clients"]) == n

    wait_for(all_finished, timeout=30)
    bodies = []
    counts = []
    for proc in readers:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        got = [json.loads(l)["body"] for l in out.splitlines() if '"event": "message"' in l]
        counts.append(len(got))
        bodies.extend(got)
    assert sorted(bodies) == sorted(f"job-{i}" for i in range(n))
    assert all(c > 0 for c in counts), counts


def test_pynsq_reader_requeue_is_redelivered(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=rq")[0] == 200
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [b"r1", b"r2"])
    events = run_driver("read", unique, "rq", "2", "--nsqd", nsqd.tcp_address, "--requeue-first")
    requeued = [e for e in events if e["event"] == "requeue"]
    done = [e for e in events if e["event"] == "message"]
    assert sorted(e["body"] for e in requeued) == ["r1", "r2"]
    assert sorted(e["body"] for e in done) == ["r1", "r2"]
    assert all(e["attempts"] == 2 for e in done)
