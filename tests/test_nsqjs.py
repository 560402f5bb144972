"""Interop with nsqjs, the Node.js client from npm (Reader and Writer).

`.ci/run` installs it (`npm install --prefix tests/nsqjs`); elsewhere the
test is skipped, saying how to install it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import RawClient

HERE = Path(__file__).parent / "nsqjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (HERE / "node_modules" / "nsqjs").is_dir(),
    reason="nsqjs not installed: run `npm install --prefix tests/nsqjs` (needs Node.js)",
)


def run_js(*args: str, timeout: float = 60.0) -> list[dict]:
    proc = subprocess.run([NODE, str(HERE / "driver.js"), *args], capture_output=True, text=True, timeout=timeout, cwd=HERE)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (proc.stderr[-2000:], events[-5:])
    return events


def test_nsqjs_writer_and_reader(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    nsqd.http("POST", f"/channel/create?topic={unique}&channel=js")
    events = run_js("write", unique, "30", nsqd.tcp_address)
    assert events[-1]["event"] == "done"
    events = run_js("write", unique, "30", nsqd.tcp_address, "10")  # MPUB
    assert events[-1]["event"] == "done"
    events = run_js("read", unique, "js", "60", nsqd.tcp_address)
    bodies = sorted(e["body"] for e in events if e["event"] == "message")
    assert bodies == sorted([f"js-{i}" for i in range(30)] * 2)
    assert events[-1] == {"event": "done", "count": 60}


def test_nsqjs_reader_requeue_and_attempts(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    nsqd.http("POST", f"/channel/create?topic={unique}&channel=js")
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [b"a", b"b"])
    events = run_js("read", unique, "js", "2", nsqd.tcp_address, "requeue-first")
    assert sorted(e["body"] for e in events if e["event"] == "requeue") == ["a", "b"]
    done = [e for e in events if e["event"] == "message"]
    assert sorted(e["body"] for e in done) == ["a", "b"] and all(e["attempts"] == 2 for e in done)
