"""Disk queues, metadata and restarts against real pynsqd subprocesses
(issue 3): clean restarts lose nothing, kill -9 with --sync-every=1 loses no
acknowledged message, torn files are survived, Go-format data dirs are read,
disk-full is refused and recovered from."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import Daemon, RawClient, start_nsqd, wait_for
from pynsqd.protocol import FRAME_TYPE_ERROR, encode_message


def consume(daemon: Daemon, topic: str, channel: str, count: int, *, rdy: int = 2500, timeout: float = 60.0, finish: bool = True) -> list[tuple[int, int, bytes, bytes]]:
    """Read ``count`` messages (FINing them unless told not to)."""
    c = RawClient(daemon.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25, msg_timeout=60000)
    assert c.sub(topic, channel).data == b"OK"
    c.cmd(b"RDY", str(rdy))
    out = []
    fins = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        assert time.monotonic() < deadline, f"got {len(out)} of {count}"
        msg = c.read_message(timeout=max(0.1, deadline - time.monotonic()))
        out.append(msg)
        if finish:
            fins.append(b"FIN " + msg[2] + b"\n")
            if len(fins) >= 200:
                c.send(b"".join(fins))
                fins = []
    if fins:
        c.send(b"".join(fins))
    c.cmd(b"NOP")
    # let the FINs land before the connection goes away
    wait_for(lambda: channel_in_flight(daemon, topic, channel) == (0 if finish else len(out)))
    c.close()
    return out


def channel_in_flight(daemon: Daemon, topic: str, channel: str) -> int | None:
    for t in daemon.stats(topic)["topics"]:
        for ch in t["channels"]:
            if ch["channel_name"] == channel:
                return ch["in_flight_count"]
    return None


def no_more_messages(daemon: Daemon, topic: str, channel: str, wait: float = 0.5) -> bool:
    c = RawClient(daemon.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    c.sub(topic, channel)
    c.cmd(b"RDY", "100")
    try:
        c.read_message(timeout=wait)
    except (socket.timeout, TimeoutError):
        return True
    finally:
        c.close()
    return False


def test_100k_messages_survive_a_restart_exactly_once(tmp_path):
    d = start_nsqd(str(tmp_path))
    n = 100_000
    with RawClient(d.tcp_port) as p:
        for start in range(0, n, 1000):
            assert p.mpub("big", [b"%d" % i for i in range(start, start + 1000)]).data == b"OK"
    st = d.stats("big")["topics"][0]
    assert st["depth"] == n and st["backend_depth"] == n - 10000
    assert d.stop() == 0
    d = start_nsqd(str(tmp_path))
    try:
        assert d.stats("big")["topics"][0]["depth"] == n
        msgs = consume(d, "big", "all", n)
        bodies = [m[3] for m in msgs]
        assert len(set(bodies)) == n and set(bodies) == {b"%d" % i for i in range(n)}
        assert no_more_messages(d, "big", "all")
    finally:
        d.stop()


def test_sigterm_keeps_memory_in_flight_and_deferred_messages(tmp_path):
    d = start_nsqd(str(tmp_path))
    c = RawClient(d.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    c.sub("keep", "ch")
    with RawClient(d.tcp_port) as p:
        p.mpub("keep", [b"m%d" % i for i in range(10)])
        p.cmd(b"DPUB", "keep", "4000", body=b"dpub")
        assert p.read_response().data == b"OK"
    c.cmd(b"RDY", "3")
    held = [c.read_message() for _ in range(3)]
    c.cmd(b"REQ", held[0][2], "3000")  # deferred for 3 s
    wait_for(lambda: d.stats("keep")["topics"][0]["channels"][0]["deferred_count"] == 2)
    stopped_at = time.monotonic()
    assert d.stop() == 0  # m1, m2 (and one more) in flight, m3.. in memory, two deferred
    c.close()
    files = os.listdir(tmp_path)
    assert any(f.startswith("keep:ch.diskqueue") for f in files)
    assert "keep:ch.pynsqd-deferred.json" in files

    d = start_nsqd(str(tmp_path))
    try:
        c = RawClient(d.tcp_port)
        c.identify(feature_negotiation=True, output_buffer_timeout=25)
        c.sub("keep", "ch")
        c.cmd(b"RDY", "100")
        got = {}
        while len(got) < 11:
            _, attempts, msg_id, body = c.read_message(timeout=20)
            got[body] = (attempts, time.monotonic() - stopped_at)
            c.cmd(b"FIN", msg_id)
        assert set(got) == {b"m%d" % i for i in range(10)} | {b"dpub"}
    finally:
        c.close()
        d.stop()
    # in flight at shutdown: delivered again with their attempts kept
    assert got[b"m1"][0] == 2 and got[b"m2"][0] == 2
    assert got[b"m0"][0] == 2  # REQ'd once: its second delivery
    # deferred ones not before their due time
    assert got[b"m0"][1] >= 2.9, got[b"m0"]
    assert got[b"dpub"][1] >= 3.9, got[b"dpub"]
    # the rest right away
    assert got[b"m5"][0] == 1


def test_kill_9_with_sync_every_1_loses_no_acknowledged_message(tmp_path):
    d = start_nsqd(str(tmp_path), "--sync-every=1")
    # consumers hold some messages in flight, finish others
    c = RawClient(d.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    c.sub("dur", "ch")
    with RawClient(d.tcp_port) as p:
        assert p.mpub("dur", [b"early%d" % i for i in range(20)]).data == b"OK"
    c.cmd(b"RDY", "10")
    first = [c.read_message() for _ in range(10)]
    for m in first[:5]:
        c.cmd(b"FIN", m[2])
    wait_for(lambda: d.stats("dur")["topics"][0]["channels"][0]["clients"][0]["finish_count"] == 5)
    finished = {m[3] for m in first[:5]}
    in_flight = {m[3] for m in first[5:]}

    acked: list[bytes] = []
    stop = threading.Event()

    def publisher() -> None:
        try:
            with RawClient(d.tcp_port) as p:
                i = 0
                while not stop.is_set():
                    batch = [b"late%d-%d" % (i, j) for j in range(5)]
                    if p.mpub("dur", batch).data == b"OK":
                        acked.extend(batch)
                    i += 1
        except (OSError, ConnectionError):
            pass

    thread = threading.Thread(target=publisher)
    thread.start()
    wait_for(lambda: len(acked) >= 200, timeout=30)
    d.kill()  # SIGKILL while publishing
    stop.set()
    thread.join(10)
    c.close()

    d = start_nsqd(str(tmp_path), "--sync-every=1")
    try:
        expected = ({b"early%d" % i for i in range(20)} - finished) | set(acked)
        c = RawClient(d.tcp_port)
        c.identify(feature_negotiation=True, output_buffer_timeout=25)
        c.sub("dur", "ch")
        c.cmd(b"RDY", "500")
        seen: dict[bytes, int] = {}
        deadline = time.monotonic() + 60
        while not expected <= set(seen):
            assert time.monotonic() < deadline, f"missing {len(expected - set(seen))}"
            _, attempts, msg_id, body = c.read_message(timeout=30)
            seen[body] = attempts
            c.cmd(b"FIN", msg_id)
        # messages in flight at the crash come back, their attempts kept
        assert all(seen[b] == 2 for b in in_flight), {b: seen[b] for b in in_flight}
        c.close()
    finally:
        d.stop()


def test_truncated_data_file_keeps_every_intact_message(tmp_path):
    d = start_nsqd(str(tmp_path), "--mem-queue-size=0")
    with RawClient(d.tcp_port) as p:
        p.mpub("torn", [b"message-%03d" % i for i in range(50)])
    assert d.stop() == 0
    data = sorted(Path(tmp_path).glob("torn.diskqueue.*.dat"))
    data = [f for f in data if "meta" not in f.name]
    last = data[-1]
    size = last.stat().st_size
    with open(last, "r+b") as fh:
        fh.truncate(size - 5)  # the last record is now torn
    d = start_nsqd(str(tmp_path), "--mem-queue-size=0")
    try:
        msgs = consume(d, "torn", "ch", 49)
        assert [m[3] for m in msgs] == [b"message-%03d" % i for i in range(49)]
        assert no_more_messages(d, "torn", "ch")
        # writing carries on after the damage
        with RawClient(d.tcp_port) as p:
            p.pub("torn", b"after")
        assert consume(d, "torn", "ch", 1)[0][3] == b"after"
    finally:
        d.stop()
    assert not list(Path(tmp_path).glob("*.bad.bad"))


def go_record(ts: int, attempts: int, msg_id: bytes, body: bytes) -> bytes:
    payload = encode_message(ts, attempts, msg_id, body)
    return struct.pack(">i", len(payload)) + payload


def test_reads_a_go_nsqd_data_directory(tmp_path):
    # what Go nsqd 1.3.0 leaves behind: nsqd.dat + go-diskqueue files
    (tmp_path / "nsqd.dat").write_text(json.dumps({
        "topics": [
            {"name": "gotopic", "paused": False, "channels": [{"name": "goch", "paused": False}, {"name": "paused", "paused": True}]},
            {"name": "idle", "paused": True, "channels": []},
        ],
        "version": "1.3.0",
    }))
    ts = time.time_ns()
    recs = [go_record(ts + i, 1 if i == 0 else 0, b"%016x" % (0x1000 + i), b"go-%d" % i) for i in range(6)]
    (tmp_path / "gotopic:goch.diskqueue.000000.dat").write_bytes(b"".join(recs[:4]))
    (tmp_path / "gotopic:goch.diskqueue.000001.dat").write_bytes(b"".join(recs[4:]))
    size1 = sum(map(len, recs[4:]))
    (tmp_path / "gotopic:goch.diskqueue.meta.dat").write_text(f"6\n0,0\n1,{size1}\n")
    d = start_nsqd(str(tmp_path))
    try:
        topics = {t["topic_name"]: t for t in d.stats()["topics"]}
        assert topics["idle"]["paused"] is True
        chans = {c["channel_name"]: c for c in topics["gotopic"]["channels"]}
        assert chans["paused"]["paused"] is True
        assert chans["goch"]["depth"] == 6 and chans["goch"]["backend_depth"] == 6
        msgs = consume(d, "gotopic", "goch", 6)
        assert [m[3] for m in msgs] == [b"go-%d" % i for i in range(6)]
        assert [m[2] for m in msgs] == [b"%016x" % (0x1000 + i) for i in range(6)]
        assert msgs[0][1] == 2 and msgs[1][1] == 1  # attempts carried over
        assert msgs[0][0] == ts
    finally:
        d.stop()


def test_data_written_by_pynsqd_follows_the_go_format(tmp_path):
    d = start_nsqd(str(tmp_path), "--mem-queue-size=2")
    d.http("POST", "/topic/create?topic=fmt")
    d.http("POST", "/channel/create?topic=fmt&channel=c")
    with RawClient(d.tcp_port) as p:
        p.mpub("fmt", [b"a", b"b", b"c", b"d"])
    d.http("POST", "/channel/pause?topic=fmt&channel=c")
    assert d.stop() == 0
    meta = json.loads((tmp_path / "nsqd.dat").read_text())
    assert meta == {"topics": [{"name": "fmt", "paused": False, "channels": [{"name": "c", "paused": True}]}], "version": "1.3.0"}
    depth, rpos, wpos = (tmp_path / "fmt:c.diskqueue.meta.dat").read_text().split("\n")[:3]
    assert depth == "4" and rpos == "0,0"
    raw = (tmp_path / "fmt:c.diskqueue.000000.dat").read_bytes()
    bodies = []
    pos = 0
    while pos < len(raw):
        (n,) = struct.unpack_from(">i", raw, pos)
        payload = raw[pos + 4 : pos + 4 + n]
        ts, attempts = struct.unpack_from(">qH", payload)
        assert len(payload[10:26]) == 16 and attempts == 0 and ts > 0
        bodies.append(payload[26:])
        pos += 4 + n
    assert sorted(bodies) == [b"a", b"b", b"c", b"d"]
    assert wpos == f"0,{len(raw)}"


def _limited_fsize(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # soft limit only, so that the test may raise it again without privileges
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit to give the space back")
def test_disk_full_refuses_publishes_then_recovers(tmp_path):
    # a file size limit stands in for a full disk: writes past it fail (EFBIG)
    args = [sys.executable, "-m", "pynsqd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0",
            f"--data-path={tmp_path}", "--mem-queue-size=0", "--sync-every=1"]
    proc_env = dict(os.environ)
    d = Daemon.__new__(Daemon)
    d.args = args
    d.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env, preexec_fn=_limited_fsize(64 * 1024))
    d.lines, d.addresses = [], {}
    d._reader = threading.Thread(target=d._read, daemon=True)
    d._reader.start()
    d.wait_listening()
    try:
        acked = []
        p = RawClient(d.tcp_port)
        body = b"x" * 1000
        failed = None
        for i in range(200):
            p.cmd(b"PUB", "full", body=b"%05d" % i + body)
            frame = p.read_response()
            if frame.frame_type == FRAME_TYPE_ERROR:
                failed = frame.data
                break
            acked.append(b"%05d" % i + body)
        assert failed is not None and failed.startswith(b"E_PUB_FAILED"), failed
        assert p.closed_by_server()
        status, text = d.http("GET", "/ping")
        assert status == 500 and text.startswith(b"NOK")
        # space comes back
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        with RawClient(d.tcp_port) as p2:
            assert p2.pub("full", b"after-space").data == b"OK"
        assert d.http("GET", "/ping") == (200, b"OK")
        msgs = consume(d, "full", "ch", len(acked) + 1)
        assert [m[3] for m in msgs] == acked + [b"after-space"]
    finally:
        d.stop()


@pytest.mark.parametrize("damage", ["read position past the end of its file", "read file past every file", "read = write = last file + 1"])
def test_wrong_but_readable_metadata_loses_no_message(tmp_path, damage):
    # issue 11, defect 6: metadata that parses but disagrees with the files
    # must not make messages vanish (they used to be dropped, orphaned or
    # deleted as "already read")
    flags = ("--mem-queue-size=0", "--max-bytes-per-file=20000")
    d = start_nsqd(str(tmp_path), *flags)
    d.http("POST", "/topic/create?topic=meta")
    d.http("POST", "/channel/create?topic=meta&channel=c")
    bodies = [b"message-%05d" % i for i in range(3000)]
    with RawClient(d.tcp_port) as p:
        for i in range(0, len(bodies), 500):
            assert p.mpub("meta", bodies[i : i + 500]).data == b"OK"
    assert d.stop() == 0
    meta_path = tmp_path / "meta:c.diskqueue.meta.dat"
    depth, rfn, rpos, wfn, wpos = (int(x) for x in meta_path.read_text().replace(",", "\n").split())
    assert (depth, rfn, rpos) == (3000, 0, 0) and wfn >= 3
    if damage == "read position past the end of its file":
        rpos = (tmp_path / "meta:c.diskqueue.000000.dat").stat().st_size + 1000
    elif damage == "read file past every file":
        rfn = wfn = wfn + 4
        rpos = wpos = 0
    else:
        rfn = wfn = wfn + 1
        rpos = wpos = 0
    meta_path.write_text(f"{depth}\n{rfn},{rpos}\n{wfn},{wpos}\n")
    d = start_nsqd(str(tmp_path), *flags)
    try:
        msgs = consume(d, "meta", "c", len(bodies))
        assert sorted(m[3] for m in msgs) == bodies
        assert any("diskqueue metadata disagrees with the data files" in line for line in d.lines)
        assert not any(".bad" in p.name for p in tmp_path.iterdir())  # the depth counted them all: all served
    finally:
        d.stop()


async def test_nsqd_dat_is_written_off_the_event_loop_before_the_answer(tmp_path, monkeypatch):
    """Creating, pausing or deleting writes nsqd.dat (tmp + 2 fsyncs) in a
    sync round's worker thread, never on the event loop, and what waits for
    the round (a reply, an admin answer) finds it on disk."""
    import trio

    from pynsqd import nsqd as nsqd_module
    from pynsqd.nsqd import NSQD
    from pynsqd.options import Options

    writers: list[threading.Thread] = []
    real = nsqd_module._write_atomically

    def spy(path: str, data: bytes) -> None:
        writers.append(threading.current_thread())
        real(path, data)

    monkeypatch.setattr(nsqd_module, "_write_atomically", spy)
    nsqd = NSQD(Options(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", data_path=str(tmp_path), lookupd_tcp_addresses=[]))
    meta = tmp_path / "nsqd.dat"
    async with trio.open_nursery() as nursery:
        await nursery.start(nsqd.run)
        nsqd.get_topic("t").get_channel("c").pause()
        nsqd.metadata_changed()
        assert nsqd.sync_pending() and not meta.exists()
        await nsqd.sync_barrier()
        assert json.loads(meta.read_text())["topics"] == [{"name": "t", "paused": False, "channels": [{"name": "c", "paused": True}]}]
        nsqd.delete_existing_topic("t")
        await nsqd.sync_barrier()
        assert json.loads(meta.read_text())["topics"] == []
        assert writers and threading.main_thread() not in writers
        nursery.cancel_scope.cancel()
    # at shutdown it is written at once (the loop is gone)
    assert writers[-1] is threading.main_thread()
