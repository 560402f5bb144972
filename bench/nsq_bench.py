#!/usr/bin/env python3
"""nsq_bench: a load generator and report for any NSQ-compatible nsqd.

It speaks TCP protocol V2 and HTTP/1.1 itself over raw sockets (framing from
the shared sans-IO codec ``pynsqd.protocol``; no client library), so the same
figures can be taken from pynsqd and from Go nsqd.  Load runs in several
processes so that the generator is not the bottleneck.

    python bench/nsq_bench.py --spawn                       # every workload, fresh pynsqd each
    python bench/nsq_bench.py --nsqd-tcp-address=127.0.0.1:4150 \\
        --nsqd-http-address=127.0.0.1:4151 --workloads=mpub,consume

Workloads (each bounded by a message count AND a time limit): mpub, spill,
pub, http_pub, consume, pubsub, latency -- see bench/README.md.

Importable: ``build_parser()``, ``run(options) -> report dict``,
``main(argv) -> exit status``.  Exit status: 0 all workloads ran clean, 3 a
workload saw errors or failed verification (the report says which), 2 usage.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import queue as _queue
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # running as ``python bench/nsq_bench.py``
    sys.path.insert(0, str(_REPO))

from pynsqd.protocol import (  # noqa: E402  (after the sys.path fix)
    CLOSE_WAIT,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    HEARTBEAT,
    MAGIC_V2,
    MSG_HEADER_LENGTH,
    MSG_ID_LENGTH,
    OK,
    FrameDecoder,
    decode_message,
    encode_command,
    encode_message,
    encode_mpub_body,
)

BENCH_VERSION = 1
WORKLOADS = ("mpub", "spill", "pub", "http_pub", "consume", "pubsub", "latency")
MIB = 1024 * 1024
RECV_SIZE = 1 << 20
SOCK_BUF = 4 << 20
USER_AGENT = f"nsq_bench/{BENCH_VERSION}"
_TS = struct.Struct(">q")

# FIN lines are built for a whole recv() worth of messages with one join: ~40x
# cheaper than one encode_command() call per message.  Checked here against
# the codec so the batch form cannot drift from the real framing.
_FIN_SAMPLE = b"0123456789abcdef"
assert b"FIN " + b"\nFIN ".join([_FIN_SAMPLE, _FIN_SAMPLE]) + b"\n" == encode_command(b"FIN", _FIN_SAMPLE) * 2
# The consumer's hot path slices the id straight out of the message frame
# (decode_message builds a tuple and copies the body); same layout, checked here.
_ID = slice(MSG_HEADER_LENGTH - MSG_ID_LENGTH, MSG_HEADER_LENGTH)
assert decode_message(encode_message(1, 1, _FIN_SAMPLE, b"x"))[2] == encode_message(1, 1, _FIN_SAMPLE, b"x")[_ID]
NOP = encode_command(b"NOP")
CLS = encode_command(b"CLS")


def fin_batch(ids: list[bytes]) -> bytes:
    """``FIN <id>\\n`` for every id, as one buffer (== encode_command per id)."""
    return b"FIN " + b"\nFIN ".join(ids) + b"\n"


class BenchError(Exception):
    pass


# =================================================================== helpers


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def fmt_addr(addr: tuple[str, int] | None) -> str | None:
    return f"{addr[0]}:{addr[1]}" if addr else None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def git_info() -> dict[str, Any] | None:
    """The repo's commit and whether pynsqd/ has uncommitted changes (what a spawned pynsqd runs)."""
    try:
        commit = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--", "pynsqd"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [line[3:] for line in dirty if line.strip()]
    return {"commit": commit, "pynsqd_uncommitted_changes": changed}


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": model,
        "mem_total_bytes": mem_total,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_sample(pid: int | None) -> dict[str, Any] | None:
    """RSS, peak RSS and CPU seconds of a process from /proc/<pid>."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15
    utime, stime = int(fields[11]), int(fields[12])
    out: dict[str, Any] = {"t": time.monotonic(), "cpu_s": (utime + stime) / _CLK_TCK}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_bytes" if key == "VmRSS" else "rss_peak_bytes"] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out["threads"] = int(value)
    return out


def system_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


# =================================================================== TCP V2


def open_v2(addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(addr, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    sock.sendall(MAGIC_V2)
    return sock


def read_response(sock: socket.socket, dec: FrameDecoder, timeout: float = 10.0) -> bytes:
    """Wait for the next response frame (answering heartbeats); error frames raise."""
    deadline = time.monotonic() + timeout
    while True:
        for ftype, data in dec.frames():
            if ftype == FRAME_TYPE_RESPONSE:
                if data == HEARTBEAT:
                    sock.sendall(NOP)
                    continue
                return data
            if ftype == FRAME_TYPE_ERROR:
                raise BenchError(data.decode(errors="replace"))
            raise BenchError(f"unexpected frame type {ftype} while waiting for a response")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError("timed out waiting for a response")
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            raise BenchError("connection closed by nsqd")
        dec.receive_data(data)


def identify(sock: socket.socket, dec: FrameDecoder, fields: dict[str, Any]) -> dict[str, Any] | None:
    body = json.dumps({"client_id": fields.pop("client_id", "nsq_bench"), "hostname": socket.gethostname(),
                       "user_agent": USER_AGENT, **fields}).encode()
    sock.sendall(encode_command(b"IDENTIFY", body=body))
    data = read_response(sock, dec)
    if data == OK:
        return None
    return json.loads(data)


def _worker_conn(cfg: dict[str, Any], **ident: Any) -> tuple[socket.socket, FrameDecoder, dict[str, Any] | None]:
    sock = open_v2(cfg["tcp"])
    dec = FrameDecoder()
    neg = identify(sock, dec, ident)
    return sock, dec, neg


# =================================================================== HTTP/1.1


class HttpConn:
    """A minimal keep-alive HTTP/1.1 client over a raw socket (Content-Length bodies)."""

    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.host = f"{addr[0]}:{addr[1]}".encode()
        self.sock: socket.socket | None = None
        self.buf = b""
        self.reconnects = -1

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = b""
        self.reconnects += 1
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def encode(self, method: str, target: str, body: bytes = b"") -> bytes:
        head = f"{method} {target} HTTP/1.1\r\n".encode() + b"Host: " + self.host + b"\r\n"
        head += b"User-Agent: " + USER_AGENT.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        return head + body

    def send_raw(self, request: bytes) -> tuple[int, bytes]:
        """Send one encoded request and read its response -> (status, body)."""
        sock = self.sock or self._connect()
        sock.sendall(request)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("HTTP connection closed by server")
            buf += chunk
        head = buf[:end].split(b"\r\n")
        parts = head[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise BenchError(f"bad HTTP status line {head[0]!r}")
        status = int(parts[1])
        length = None
        close = parts[0] == b"HTTP/1.0"
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding":
                raise BenchError("chunked HTTP responses are not supported by the bench")
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if length is None:
            raise BenchError("HTTP response without Content-Length")
        need = end + 4 + length
        while len(buf) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("HTTP connection closed mid-body")
            buf += chunk
        body = buf[end + 4 : need]
        self.buf = buf[need:]
        if close:
            self.close()
        return status, body

    def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        return self.send_raw(self.encode(method, target, body))


def http_call(addr: tuple[str, int], method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = HttpConn(addr)
    try:
        return conn.request(method, target, body)
    finally:
        conn.close()


def topic_stats(addr: tuple[str, int] | None, topic: str) -> dict[str, Any] | None:
    if addr is None:
        return None
    status, body = http_call(addr, "GET", f"/stats?format=json&topic={topic}")
    if status != 200:
        raise BenchError(f"/stats answered {status}: {body[:200]!r}")
    data = json.loads(body)
    data = data.get("data", data)  # nsqd < 1.0 wrapped everything in "data"
    for t in data.get("topics") or []:
        if t.get("topic_name") == topic:
            return t
    return None


def channel_of(tstats: dict[str, Any] | None, channel: str) -> dict[str, Any] | None:
    for c in (tstats or {}).get("channels") or []:
        if c.get("channel_name") == channel:
            return c
    return None


# =================================================================== workers
#
# Every worker runs in its own process: it connects and prepares, reports
# ready, waits for the common start signal, runs bounded by its count and the
# deadline, and returns a dict of plain values.


def _mpub_worker(cfg: dict[str, Any], wait_start: Callable[[], float]) -> dict[str, Any]:
    """Pipelined MPUB: up to ``window`` MPUBs in flight, ``count`` messages in all."""
    sock, dec, _ = _worker_conn(cfg, client_id=f"bench-writer-{cfg['index']}")
    batch, count = cfg["batch"], cfg["count"]
    full, rem = divmod(count, batch)
    cmd = encode_command(b"MPUB", cfg["topic"], body=encode_mpub_body([cfg["payload"]] * batch))
    last = encode_command(b"MPUB", cfg["topic"], body=encode_mpub_body([cfg["payload"]] * rem)) if rem else cmd
    total, window = full + (1 if rem else 0), cfg["window"]
    res: dict[str, Any] = {"errors": []}
    t0 = wait_start()
    cpu0 = _cpu_self()
    deadline = t0 + cfg["time_limit"]
    hard = deadline + cfg["grace"]
    sent = acked = 0
    stopping = False
    t_last = t0
    recv = sock.recv
    frames = dec.frames
    try:
        while True:
            if not stopping:
                while sent - acked < window and sent < total:
                    sent += 1
                    sock.sendall(cmd if sent < total else last)
            if acked >= sent:
                break
            now = time.monotonic()
            if now > hard:
                res["errors"].append(f"timed out waiting for {sent - acked} MPUB acks")
                break
            sock.settimeout(hard - now)
            data = recv(65536)
            if not data:
                res["errors"].append("connection closed by nsqd")
                break
            for ftype, fdata in frames(data):
                if ftype == FRAME_TYPE_RESPONSE:
                    if fdata == OK:
                        acked += 1
                    elif fdata == HEARTBEAT:
                        sock.sendall(NOP)
                    else:
                        res["errors"].append(f"unexpected response {fdata[:80]!r}")
                elif ftype == FRAME_TYPE_ERROR:
                    res["errors"].append(fdata.decode(errors="replace"))
                    stopping = True
                    sent = acked  # nsqd closes after an MPUB error: stop waiting
            t_last = time.monotonic()
            if not stopping and t_last > deadline:
                stopping = True
    except (OSError, BenchError) as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    done = min(acked * batch, count)
    _unexpect(cfg, count - done)
    res.update(t_start=t0, t_end=t_last, messages=done, sent=min(sent * batch, count), cpu_s=_cpu_self() - cpu0)
    return res


def _unexpect(cfg: dict[str, Any], missing: int) -> None:
    """A writer that stopped short tells the readers to expect fewer messages."""
    expected = cfg.get("expected")
    if expected is not None and missing > 0:
        with expected.get_lock():
            expected.value -= missing


def _pub_worker(cfg: dict[str, Any], wait_start: Callable[[], float]) -> dict[str, Any]:
    """PUB one message, wait for OK, repeat."""
    if cfg.get("cpu") is not None:  # side_by_side --pin
        os.sched_setaffinity(0, {cfg["cpu"]})
    sock, dec, _ = _worker_conn(cfg, client_id=f"bench-pub-{cfg['index']}")
    cmd = encode_command(b"PUB", cfg["topic"], body=cfg["payload"])
    res: dict[str, Any] = {"errors": []}
    t0 = wait_start()
    cpu0 = _cpu_self()
    deadline = t0 + cfg["time_limit"]
    total = cfg["count"]
    acked = 0
    sock.settimeout(cfg["grace"])
    recv, frames, sendall, mono = sock.recv, dec.frames, sock.sendall, time.monotonic
    t_last = t0
    try:
        while acked < total:
            sendall(cmd)
            got = False
            while not got:
                data = recv(65536)
                if not data:
                    raise BenchError("connection closed by nsqd")
                for ftype, fdata in frames(data):
                    if ftype == FRAME_TYPE_RESPONSE and fdata == OK:
                        got = True
                    elif ftype == FRAME_TYPE_RESPONSE and fdata == HEARTBEAT:
                        sendall(NOP)
                    else:
                        raise BenchError(fdata.decode(errors="replace"))
            acked += 1
            if not acked & 63:
                t_last = mono()
                if t_last > deadline:
                    break
        t_last = mono()
    except (OSError, BenchError) as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    res.update(t_start=t0, t_end=t_last, messages=acked, sent=acked, cpu_s=_cpu_self() - cpu0)
    return res


def _http_pub_worker(cfg: dict[str, Any], wait_start: Callable[[], float]) -> dict[str, Any]:
    """POST /pub one at a time on one keep-alive connection."""
    conn = HttpConn(cfg["http"], timeout=cfg["grace"])
    conn._connect()
    request = conn.encode("POST", f"/pub?topic={cfg['topic']}", cfg["payload"])
    res: dict[str, Any] = {"errors": []}
    t0 = wait_start()
    cpu0 = _cpu_self()
    deadline = t0 + cfg["time_limit"]
    total = cfg["count"]
    acked = 0
    t_last = t0
    try:
        while acked < total:
            status, body = conn.send_raw(request)
            if status != 200 or body != OK:
                raise BenchError(f"/pub answered {status} {body[:120]!r}")
            acked += 1
            if not acked & 63:
                t_last = time.monotonic()
                if t_last > deadline:
                    break
        t_last = time.monotonic()
    except (OSError, BenchError) as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    res.update(t_start=t0, t_end=t_last, messages=acked, sent=acked, cpu_s=_cpu_self() - cpu0,
               reconnects=max(0, conn.reconnects))
    return res


def _consumer_worker(cfg: dict[str, Any], wait_start: Callable[[], float]) -> dict[str, Any]:
    """SUB + RDY, FIN everything (one sendall per recv), until the shared count is reached.

    With ``latency`` set, each body starts with the int64 CLOCK_MONOTONIC ns at
    which the writer sent it; the latency is taken at the recv() return."""
    ident: dict[str, Any] = {"client_id": f"bench-reader-{cfg['index']}", "feature_negotiation": True}
    if cfg.get("output_buffer_timeout") is not None:
        ident["output_buffer_timeout"] = cfg["output_buffer_timeout"]
    if cfg.get("output_buffer_size") is not None:
        ident["output_buffer_size"] = cfg["output_buffer_size"]
    sock, dec, neg = _worker_conn(cfg, **ident)
    rdy = cfg["rdy"]
    if neg and neg.get("max_rdy_count"):
        rdy = min(rdy, int(neg["max_rdy_count"]))
    sock.sendall(encode_command(b"SUB", cfg["topic"], cfg["channel"]))
    read_response(sock, dec)
    res: dict[str, Any] = {"errors": [], "rdy": rdy, "identify_response": neg}
    shared = cfg["shared_count"]  # mp.Value: messages received by all readers
    expected = cfg["expected"]  # mp.Value: messages the readers should get in all
    latency = cfg.get("latency", False)
    lats: list[int] = []
    t0 = wait_start()
    cpu0 = _cpu_self()
    deadline = t0 + cfg["time_limit"] + (cfg["grace"] if cfg.get("follow_writers") else 0.0)
    idle = cfg["idle_timeout"]
    sock.sendall(encode_command(b"RDY", str(rdy)))
    received = redelivered = 0
    t_first = t_last = None
    mono = time.monotonic
    mono_ns = time.monotonic_ns
    recv, frames, sendall = sock.recv, dec.frames, sock.sendall
    unpack_ts = _TS.unpack_from
    id_at = _ID
    last_activity = t0
    try:
        while True:
            now = mono()
            if now > deadline:
                break
            sock.settimeout(min(0.5, deadline - now))
            try:
                data = recv(RECV_SIZE)
            except TimeoutError:
                with shared.get_lock():
                    done = shared.value >= expected.value
                if done:
                    break
                if mono() - last_activity > idle:
                    res["errors"].append(f"stalled: no message for {idle:.0f}s")
                    break
                continue
            if not data:
                res["errors"].append("connection closed by nsqd")
                break
            if latency:
                t_ns = mono_ns()
            ids = []
            for ftype, fdata in frames(data):
                if ftype == FRAME_TYPE_MESSAGE:
                    if latency:
                        _, attempts, msg_id, body = decode_message(fdata)
                        ids.append(msg_id)
                        lats.append(t_ns - unpack_ts(body)[0])
                        if attempts != 1:
                            redelivered += 1
                        continue
                    ids.append(fdata[id_at])
                    if fdata[8] or fdata[9] != 1:  # attempts (uint16 at offset 8) != 1
                        redelivered += 1
                elif ftype == FRAME_TYPE_RESPONSE:
                    if fdata == HEARTBEAT:
                        sendall(NOP)
                elif ftype == FRAME_TYPE_ERROR:
                    res["errors"].append(fdata.decode(errors="replace"))
            last_activity = mono()
            if ids:
                sendall(fin_batch(ids))
                n = len(ids)
                received += n
                if t_first is None:
                    t_first = last_activity
                t_last = last_activity
                with shared.get_lock():
                    shared.value += n
                    done = shared.value >= expected.value
                if done:
                    break
        # leave cleanly: CLS, wait (briefly) for CLOSE_WAIT so the FINs were read
        try:
            sendall(CLS)
            end = mono() + 2.0
            got = False
            while not got and mono() < end:
                sock.settimeout(max(0.01, end - mono()))
                data = recv(RECV_SIZE)
                if not data:
                    break
                for ftype, fdata in frames(data):
                    if ftype == FRAME_TYPE_RESPONSE and fdata == CLOSE_WAIT:
                        got = True
                    elif ftype == FRAME_TYPE_MESSAGE:
                        # delivered before CLS took effect: FIN it, do not count it
                        sendall(fin_batch([fdata[_ID]]))
                        res["late_after_cls"] = res.get("late_after_cls", 0) + 1
        except (OSError, BenchError):
            pass
    except (OSError, BenchError) as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    res.update(t_start=t0, t_first=t_first, t_end=t_last or t0, messages=received, redelivered=redelivered,
               cpu_s=_cpu_self() - cpu0)
    if latency:
        lats.sort()
        res["latency_ms"] = latency_summary(lats)
    return res


def latency_summary(sorted_ns: Sequence[int]) -> dict[str, Any]:
    if not sorted_ns:
        return {"count": 0}
    ms = 1e-6
    return {
        "count": len(sorted_ns),
        "min": sorted_ns[0] * ms,
        "p50": percentile(sorted_ns, 50) * ms,
        "p90": percentile(sorted_ns, 90) * ms,
        "p99": percentile(sorted_ns, 99) * ms,
        "p999": percentile(sorted_ns, 99.9) * ms,
        "max": sorted_ns[-1] * ms,
        "mean": sum(sorted_ns) / len(sorted_ns) * ms,
    }


def _paced_writer(cfg: dict[str, Any], wait_start: Callable[[], float]) -> dict[str, Any]:
    """Publish at a steady rate: every tick, one PUB/MPUB with the messages now due.

    Each body starts with the CLOCK_MONOTONIC ns of its send (system-wide, so
    comparable in the reader process).  Acks are read without blocking; the
    send schedule never waits for them."""
    sock, dec, _ = _worker_conn(cfg, client_id=f"bench-paced-{cfg['index']}")
    rate, total = cfg["rate"], cfg["count"]
    tick = cfg["tick"]
    pad = cfg["payload"][8:]
    topic = cfg["topic"].encode()
    max_batch = cfg["max_batch"]
    res: dict[str, Any] = {"errors": []}
    t0 = wait_start()
    cpu0 = _cpu_self()
    deadline = t0 + cfg["time_limit"]
    sent = acked_cmds = cmds = 0
    max_outstanding = 0
    behind_max = 0.0
    mono, mono_ns = time.monotonic, time.monotonic_ns
    frames = dec.frames

    # a socket with a timeout polls before recv() even with MSG_DONTWAIT, so
    # the non-blocking read asks poll() first
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def read_acks(block: float) -> None:
        nonlocal acked_cmds
        if block <= 0:
            if not poller.poll(0):
                return
            data = sock.recv(65536)  # readable: returns at once
        else:
            sock.settimeout(block)
            try:
                data = sock.recv(65536)
            finally:
                sock.settimeout(grace)
        if not data:
            raise BenchError("connection closed by nsqd")
        for ftype, fdata in frames(data):
            if ftype == FRAME_TYPE_RESPONSE:
                if fdata == OK:
                    acked_cmds += 1
                elif fdata == HEARTBEAT:
                    sock.sendall(NOP)
            elif ftype == FRAME_TYPE_ERROR:
                raise BenchError(fdata.decode(errors="replace"))

    t_last = t0
    grace = cfg["grace"]
    try:
        sock.settimeout(grace)
        while sent < total:
            now = mono()
            if now > deadline:
                break
            due = min(total, int((now - t0) * rate) + 1)
            n = min(due - sent, max_batch)
            if n > 0:
                behind_max = max(behind_max, (due - sent) / rate)
                stamp = _TS.pack(mono_ns()) + pad
                if n == 1:
                    sock.sendall(encode_command(b"PUB", topic, body=stamp))
                else:
                    sock.sendall(encode_command(b"MPUB", topic, body=encode_mpub_body([stamp] * n)))
                sent += n
                cmds += 1
                t_last = mono()
            read_acks(0)
            max_outstanding = max(max_outstanding, cmds - acked_cmds)
            wake = max(t0 + sent / rate, t_last + tick)
            delay = wake - mono()
            if delay > 0:
                time.sleep(delay)
        end = mono() + grace
        while acked_cmds < cmds:
            left = end - mono()
            if left <= 0:
                res["errors"].append(f"timed out waiting for {cmds - acked_cmds} publish acks")
                break
            read_acks(left)
    except (OSError, BenchError) as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    _unexpect(cfg, total - sent)
    res.update(t_start=t0, t_end=t_last, messages=sent, sent=sent, commands=cmds, acked_commands=acked_cmds,
               max_outstanding_commands=max_outstanding, max_behind_schedule_s=behind_max,
               cpu_s=_cpu_self() - cpu0)
    return res


# =================================================================== orchestration


def _worker_entry(fn: Callable[..., dict[str, Any]], cfg: dict[str, Any], ready_q: Any, start_evt: Any,
                  result_q: Any) -> None:
    idx = cfg["index"]
    signalled = False

    def wait_start() -> float:
        nonlocal signalled
        ready_q.put(("ready", idx))
        signalled = True
        if not start_evt.wait(120):
            raise BenchError("start signal never came")
        return time.monotonic()

    try:
        res = fn(cfg, wait_start)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        res = {"errors": [f"worker failed: {type(exc).__name__}: {exc}"], "traceback": traceback.format_exc(),
               "messages": 0, "t_start": time.monotonic(), "t_end": time.monotonic(), "cpu_s": 0.0}
        if not signalled:
            ready_q.put(("failed", idx))
    res["index"] = idx
    res["role"] = cfg["role"]
    result_q.put(res)


def run_workers(specs: list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]], *, hard_timeout: float,
                before_start: Callable[[], None] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Start one process per spec, start them together, collect their result dicts."""
    ctx = mp.get_context("fork")
    ready_q, result_q, start_evt = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = []
    for i, (fn, cfg) in enumerate(specs):
        cfg = {**cfg, "index": i}
        p = ctx.Process(target=_worker_entry, args=(fn, cfg, ready_q, start_evt, result_q), daemon=True)
        p.start()
        procs.append(p)
    pending = len(procs)
    setup_deadline = time.monotonic() + 30
    while pending:
        try:
            ready_q.get(timeout=max(0.1, setup_deadline - time.monotonic()))
            pending -= 1
        except _queue.Empty:
            if time.monotonic() > setup_deadline:
                break
    if before_start:
        before_start()
    t0 = time.monotonic()
    start_evt.set()
    results: list[dict[str, Any]] = []
    end = t0 + hard_timeout
    while len(results) < len(procs):
        try:
            results.append(result_q.get(timeout=max(0.1, end - time.monotonic())))
        except _queue.Empty:
            if time.monotonic() > end:
                break
    got = {r["index"] for r in results}
    for i, p in enumerate(procs):
        p.join(timeout=5 if i in got else 0.1)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if i not in got:
            results.append({"index": i, "role": specs[i][1]["role"], "messages": 0, "t_start": t0, "t_end": t0,
                            "cpu_s": 0.0, "errors": [f"worker hung: no result within {hard_timeout:.0f}s, killed"]})
    results.sort(key=lambda r: r["index"])
    return results, t0


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def aggregate(results: list[dict[str, Any]], role: str, size: int) -> dict[str, Any]:
    rs = [r for r in results if r["role"] == role]
    msgs = sum(r.get("messages", 0) for r in rs)
    starts = [r["t_start"] for r in rs if r.get("t_start") is not None]
    ends = [r["t_end"] for r in rs if r.get("t_end") is not None]
    secs = (max(ends) - min(starts)) if starts and ends else 0.0
    secs = max(secs, 1e-9)
    return {
        "messages": msgs,
        "seconds": secs,
        "msgs_per_s": msgs / secs if msgs else 0.0,
        "mb_per_s": msgs * size / secs / MIB if msgs else 0.0,
        "processes": len(rs),
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in rs),
        "errors": [e for r in rs for e in r.get("errors", [])],
    }


# =================================================================== daemon


LISTEN_RE = re.compile(r"(TCP|HTTP): listening on (\S+)")


class SpawnedDaemon:
    """A daemon subprocess with a temp data dir; stderr collected line by line."""

    def __init__(self, cmd: list[str], flags: list[str], keep_log_lines: int = 2000) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="nsq_bench_")
        self.args = [*cmd, "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0",
                     f"--data-path={self.data_dir}", *flags]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, text=True, errors="replace")
        self.lines: list[str] = []
        self.line_count = 0
        self.notable: list[str] = []
        self._keep = keep_log_lines
        self.addresses: dict[str, tuple[str, int]] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.line_count += 1
            if len(self.lines) < self._keep:
                self.lines.append(line)
            if any(k in line for k in ("ERROR", "WARN", "FATAL", "Traceback", "Error", "exception")):
                if len(self.notable) < 200:
                    self.notable.append(line)
            m = LISTEN_RE.search(line)
            if m and m.group(1) not in self.addresses:
                self.addresses[m.group(1)] = parse_addr(m.group(2))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ("TCP" in self.addresses and "HTTP" in self.addresses):
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise BenchError(f"daemon exited with {self.proc.returncode}: " + " | ".join(self.lines[-20:]))
            if time.monotonic() > deadline:
                raise BenchError("daemon did not print its listening addresses in time")
            time.sleep(0.02)

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM, wait (graceful shutdown writes memory queues to disk), else SIGKILL."""
        out: dict[str, Any] = {}
        t = time.monotonic()
        if self.proc.poll() is not None:
            out["exited_before_stop"] = True
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                out["killed_after_s"] = timeout
                self.proc.kill()
                self.proc.wait(10)
        out["shutdown_s"] = time.monotonic() - t
        out["returncode"] = self.proc.returncode
        self._reader.join(2)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return out


def spawn_listening(cmd: list[str], flags: list[str]) -> SpawnedDaemon:
    """A spawned daemon once it listens (stopped again if it never does)."""
    daemon = SpawnedDaemon(cmd, flags)
    try:
        daemon.wait_listening()
    except BaseException:
        daemon.stop(5)
        raise
    return daemon


def data_dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class Target:
    """Where a workload sends its load: a spawned daemon or a given address."""

    def __init__(self, opts: argparse.Namespace, flags: list[str]) -> None:
        self.opts = opts
        self.flags = flags
        self.daemon: SpawnedDaemon | None = None
        if opts.spawn:
            self.daemon = spawn_listening(shlex.split(opts.daemon_cmd), flags)
            self.tcp = self.daemon.addresses["TCP"]
            self.http: tuple[str, int] | None = self.daemon.addresses["HTTP"]
            self.pid: int | None = self.daemon.pid
        else:
            self.tcp = opts.nsqd_tcp_address
            self.http = opts.nsqd_http_address
            self.pid = opts.daemon_pid

    def sample(self) -> dict[str, Any] | None:
        s = proc_sample(self.pid)
        if s is not None and self.daemon is not None:
            s["data_dir_bytes"] = data_dir_bytes(self.daemon.data_dir)
        return s

    def alive(self) -> bool:
        return self.daemon is None or self.daemon.proc.poll() is None

    def create_channel(self, topic: str, channel: str) -> None:
        """Topic + channel up front, so published messages land in the channel."""
        if self.http is not None:
            for target in (f"/topic/create?topic={topic}", f"/channel/create?topic={topic}&channel={channel}"):
                status, body = http_call(self.http, "POST", target)
                if status != 200:
                    raise BenchError(f"POST {target} answered {status} {body[:200]!r}")
            return
        # no HTTP address: a subscriber creates both; a closed subscriber leaves them
        sock = open_v2(self.tcp)
        dec = FrameDecoder()
        try:
            identify(sock, dec, {"client_id": "bench-setup"})
            sock.sendall(encode_command(b"SUB", topic, channel))
            read_response(sock, dec)
        finally:
            sock.close()

    def delete_topic(self, topic: str) -> None:
        if self.http is not None:
            try:
                http_call(self.http, "POST", f"/topic/delete?topic={topic}")
            except (OSError, BenchError):
                pass

    def close(self) -> dict[str, Any] | None:
        if self.daemon is None:
            return None
        return self.daemon.stop(self.opts.shutdown_timeout)


# =================================================================== workloads


class Ctx:
    """What a workload function gets: options, target, names, and the daemon samples."""

    def __init__(self, opts: argparse.Namespace, target: Target, workload: str, run_id: str) -> None:
        self.opts = opts
        self.target = target
        self.workload = workload
        self.topic = f"bench_{workload}_{run_id}"
        self.channel = "bench"
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.sys_before: tuple[float, float] | None = None
        self.sys_after: tuple[float, float] | None = None
        self.t_before = self.t_after = 0.0
        self.anomalies: list[str] = []
        self.payload = b"b" * opts.size
        # how many messages the readers of a run should expect; writers lower it when they stop short
        self.expected = mp.get_context("fork").Value("q", 0)

    def sample_before(self) -> None:
        self.before = self.target.sample()
        self.sys_before = system_cpu()
        self.t_before = time.monotonic()

    def sample_after(self) -> None:
        self.after = self.target.sample()
        self.sys_after = system_cpu()
        self.t_after = time.monotonic()

    def machine_usage(self, generator_cpu_s: float) -> dict[str, Any] | None:
        """Machine-wide CPU during the measured phase, in % of one core, split
        into daemon, load generator and everything else (other processes)."""
        if not (self.sys_before and self.sys_after):
            return None
        wall = self.t_after - self.t_before
        busy = self.sys_after[0] - self.sys_before[0]
        daemon = (self.after["cpu_s"] - self.before["cpu_s"]) if self.before and self.after else 0.0
        pct = 100.0 / wall if wall > 0 else 0.0
        return {"busy_pct": busy * pct, "daemon_pct": daemon * pct, "generator_pct": generator_cpu_s * pct,
                "other_pct": max(0.0, busy - daemon - generator_cpu_s) * pct, "cores": os.cpu_count()}

    def base_cfg(self, role: str) -> dict[str, Any]:
        o = self.opts
        return {"role": role, "tcp": self.target.tcp, "http": self.target.http, "topic": self.topic,
                "channel": self.channel, "payload": self.payload, "time_limit": o.time_limit, "grace": o.grace}

    def writer_specs(self, count: int, writers: int, role: str = "writer",
                     time_limit: float | None = None) -> list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]]:
        o = self.opts
        specs = []
        for n in _split(count, writers):
            if n:
                cfg = {**self.base_cfg(role), "batch": o.batch, "count": n, "window": o.window,
                       "expected": self.expected}
                if time_limit is not None:
                    cfg["time_limit"] = time_limit
                specs.append((_mpub_worker, cfg))
        return specs

    def reader_specs(self, count: int, readers: int, **extra: Any) -> list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]]:
        shared = mp.get_context("fork").Value("q", 0)
        with self.expected.get_lock():
            self.expected.value = count
        return [(_consumer_worker, {**self.base_cfg("reader"), "rdy": self.opts.rdy, "shared_count": shared,
                                    "expected": self.expected, "idle_timeout": self.opts.idle_timeout, **extra})
                for _ in range(readers)]

    def hard_timeout(self, time_limit: float | None = None) -> float:
        return (time_limit or self.opts.time_limit) + 2 * self.opts.grace + 15

    def run(self, specs: list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]],
            time_limit: float | None = None) -> list[dict[str, Any]]:
        results, _ = run_workers(specs, hard_timeout=self.hard_timeout(time_limit), before_start=self.sample_before)
        self.sample_after()
        return results

    def check(self, cond: bool, message: str) -> None:
        if not cond:
            self.anomalies.append(message)

    def stats(self) -> dict[str, Any] | None:
        try:
            return topic_stats(self.target.http, self.topic)
        except (OSError, BenchError, ValueError) as exc:
            self.anomalies.append(f"/stats failed: {exc}")
            return None

    def wait_stats(self, predicate: Callable[[dict[str, Any] | None], bool], timeout: float) -> dict[str, Any] | None:
        """Poll /stats until predicate(topic stats) holds (bounded); returns the last stats."""
        end = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st is not None and predicate(st):
                return st
            if time.monotonic() > end or self.target.http is None:
                return st
            time.sleep(0.1)


def _w_publish_only(ctx: Ctx, count: int, expect_disk: bool) -> dict[str, Any]:
    o = ctx.opts
    results = ctx.run(ctx.writer_specs(count, o.writers))
    agg = aggregate(results, "writer", o.size)
    out = {**agg, "detail": {"writers": agg.pop("processes"), "batch": o.batch, "window": o.window}}
    n = agg["messages"]
    st = ctx.wait_stats(lambda s: s.get("depth", 0) >= n, 5.0)
    if st is not None:
        out["detail"]["topic_stats"] = {k: st.get(k) for k in ("depth", "backend_depth", "message_count")}
        ctx.check(st.get("message_count") == n, f"topic message_count {st.get('message_count')} != {n} acked")
        ctx.check(st.get("depth") == n, f"topic depth {st.get('depth')} != {n} acked (messages lost or duplicated)")
        if expect_disk and n > 20000:
            ctx.check((st.get("backend_depth") or 0) > 0, "nothing reached the disk queue (backend_depth 0): "
                                                           "is the daemon's --mem-queue-size above the count?")
    return out


def w_mpub(ctx: Ctx) -> dict[str, Any]:
    return _w_publish_only(ctx, ctx.opts.mpub_messages, expect_disk=False)


def w_spill(ctx: Ctx) -> dict[str, Any]:
    return _w_publish_only(ctx, ctx.opts.spill_messages, expect_disk=True)


def _w_single(ctx: Ctx, fn: Callable[..., dict[str, Any]], count: int) -> dict[str, Any]:
    cfg = {**ctx.base_cfg("writer"), "count": count}
    results = ctx.run([(fn, cfg)])
    agg = aggregate(results, "writer", ctx.opts.size)
    agg.pop("processes")
    out = {**agg, "detail": {"round_trip_us": agg["seconds"] / agg["messages"] * 1e6 if agg["messages"] else None}}
    if "reconnects" in results[0]:
        out["detail"]["http_reconnects"] = results[0]["reconnects"]
        ctx.check(results[0]["reconnects"] == 0, f"HTTP keep-alive broke: {results[0]['reconnects']} reconnects")
    n = agg["messages"]
    st = ctx.wait_stats(lambda s: s.get("message_count", 0) >= n, 5.0)
    if st is not None:
        ctx.check(st.get("message_count") == n, f"topic message_count {st.get('message_count')} != {n} acked")
    return out


def w_pub(ctx: Ctx) -> dict[str, Any]:
    return _w_single(ctx, _pub_worker, ctx.opts.pub_messages)


def w_http_pub(ctx: Ctx) -> dict[str, Any]:
    if ctx.target.http is None:
        raise BenchError("http_pub needs --nsqd-http-address")
    return _w_single(ctx, _http_pub_worker, ctx.opts.http_messages)


def w_consume(ctx: Ctx) -> dict[str, Any]:
    o = ctx.opts
    ctx.target.create_channel(ctx.topic, ctx.channel)
    # 1. backlog (not part of the figure, reported as detail)
    fill_limit = 2 * o.time_limit
    res_fill, _ = run_workers(ctx.writer_specs(o.consume_messages, o.writers, "filler", fill_limit),
                              hard_timeout=ctx.hard_timeout(fill_limit))
    fill = aggregate(res_fill, "filler", o.size)
    backlog = fill["messages"]
    ctx.check(not fill["errors"], f"prefill errors: {fill['errors'][:3]}")
    ctx.check(backlog == o.consume_messages, f"prefill stored {backlog} of {o.consume_messages} in the time limit")
    st = ctx.wait_stats(lambda s: ((channel_of(s, ctx.channel) or {}).get("depth", -1)) >= backlog, 30.0)
    ch = channel_of(st, ctx.channel)
    if ch is not None:
        ctx.check(ch.get("depth") == backlog, f"channel depth {ch.get('depth')} != backlog {backlog} before draining")
    # 2. drain
    results = ctx.run(ctx.reader_specs(backlog, o.readers))
    agg = aggregate(results, "reader", o.size)
    readers = [r for r in results if r["role"] == "reader"]
    out = {**agg, "detail": {
        "backlog": backlog, "readers": agg.pop("processes"), "rdy": readers[0].get("rdy") if readers else None,
        "prefill_msgs_per_s": fill["msgs_per_s"], "prefill_seconds": fill["seconds"],
        "redelivered": sum(r.get("redelivered", 0) for r in readers),
        "first_message_after_s": min((r["t_first"] - r["t_start"] for r in readers if r.get("t_first")), default=None),
    }}
    ctx.check(agg["messages"] == backlog, f"received {agg['messages']} of {backlog} backlog")
    _check_drained(ctx, out)
    return out


def _check_drained(ctx: Ctx, out: dict[str, Any]) -> None:
    def drained(s: dict[str, Any] | None) -> bool:
        c = channel_of(s, ctx.channel) or {}
        return c.get("depth") == 0 and c.get("in_flight_count") == 0

    st = ctx.wait_stats(drained, 5.0)
    ch = channel_of(st, ctx.channel)
    if ch is not None:
        out["detail"]["channel_after"] = {k: ch.get(k) for k in ("depth", "backend_depth", "in_flight_count",
                                                                 "message_count", "requeue_count", "timeout_count")}
        ctx.check(drained(st), f"channel not drained after FIN: depth {ch.get('depth')}, "
                               f"in_flight {ch.get('in_flight_count')}")


def w_pubsub(ctx: Ctx) -> dict[str, Any]:
    o = ctx.opts
    ctx.target.create_channel(ctx.topic, ctx.channel)
    specs = ctx.writer_specs(o.pubsub_messages, o.pubsub_writers)
    specs += ctx.reader_specs(o.pubsub_messages, o.readers, follow_writers=True)
    results = ctx.run(specs)
    w = aggregate(results, "writer", o.size)
    r = aggregate(results, "reader", o.size)
    out = {"messages": r["messages"], "seconds": r["seconds"], "msgs_per_s": r["msgs_per_s"], "mb_per_s": r["mb_per_s"],
           "cpu_s": w["cpu_s"] + r["cpu_s"], "errors": w["errors"] + r["errors"],
           "detail": {"publish": {k: w[k] for k in ("messages", "seconds", "msgs_per_s", "mb_per_s", "processes")},
                      "consume": {k: r[k] for k in ("messages", "seconds", "msgs_per_s", "mb_per_s", "processes")},
                      "redelivered": sum(x.get("redelivered", 0) for x in results if x["role"] == "reader")}}
    ctx.check(r["messages"] == w["messages"], f"consumed {r['messages']} of {w['messages']} published")
    _check_drained(ctx, out)
    return out


def w_latency(ctx: Ctx) -> dict[str, Any]:
    o = ctx.opts
    ctx.target.create_channel(ctx.topic, ctx.channel)
    count = int(o.latency_rate * o.latency_duration)
    wcfg = {**ctx.base_cfg("writer"), "rate": float(o.latency_rate), "count": count, "tick": o.latency_tick_ms / 1000.0,
            "max_batch": o.batch, "time_limit": min(o.time_limit, o.latency_duration + o.grace),
            "expected": ctx.expected}
    specs: list[tuple[Callable[..., dict[str, Any]], dict[str, Any]]] = [(_paced_writer, wcfg)]
    specs += ctx.reader_specs(count, 1, latency=True, follow_writers=True,
                              output_buffer_timeout=o.latency_output_buffer_timeout or None,
                              output_buffer_size=o.latency_output_buffer_size or None)
    results = ctx.run(specs)
    w = aggregate(results, "writer", o.size)
    r = aggregate(results, "reader", o.size)
    wres = next(x for x in results if x["role"] == "writer")
    rres = next(x for x in results if x["role"] == "reader")
    lat = rres.get("latency_ms", {"count": 0})
    out = {"messages": r["messages"], "seconds": w["seconds"], "msgs_per_s": w["msgs_per_s"], "mb_per_s": w["mb_per_s"],
           "cpu_s": w["cpu_s"] + r["cpu_s"], "errors": w["errors"] + r["errors"],
           "detail": {"target_rate": o.latency_rate, "achieved_publish_rate": w["msgs_per_s"],
                      "consume_rate": r["msgs_per_s"], "latency_ms": lat,
                      "publish_commands": wres.get("commands"), "max_outstanding_commands": wres.get("max_outstanding_commands"),
                      "max_behind_schedule_s": wres.get("max_behind_schedule_s"),
                      "output_buffer_timeout_ms": o.latency_output_buffer_timeout or "server default",
                      "output_buffer_size": o.latency_output_buffer_size or "server default",
                      "identify_response": rres.get("identify_response")}}
    ctx.check(r["messages"] == w["messages"], f"consumed {r['messages']} of {w['messages']} published")
    ctx.check(w["msgs_per_s"] >= 0.95 * o.latency_rate or w["messages"] < o.latency_rate,
              f"publisher fell behind: {w['msgs_per_s']:.0f} msg/s of {o.latency_rate} target")
    return out


WORKLOAD_FUNCS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "mpub": w_mpub, "spill": w_spill, "pub": w_pub, "http_pub": w_http_pub,
    "consume": w_consume, "pubsub": w_pubsub, "latency": w_latency,
}


def daemon_flags(opts: argparse.Namespace, workload: str) -> list[str]:
    """Flags for a spawned daemon: spill runs on nsqd defaults (mem-queue-size
    10000); every other workload keeps its messages in memory, as NSQ's own
    bench does.  --daemon-arg values come last (so they win)."""
    flags = [] if workload == "spill" else [f"--mem-queue-size={opts.mem_queue_size}"]
    return flags + list(opts.daemon_arg)


def run_workload(opts: argparse.Namespace, workload: str, run_id: str) -> dict[str, Any]:
    flags = daemon_flags(opts, workload) if opts.spawn else []
    entry: dict[str, Any] = {"workload": workload, "daemon_flags": flags}
    target = None
    ctx = None
    t_wall = time.monotonic()
    try:
        target = Target(opts, flags)
        entry["target"] = {"tcp": fmt_addr(target.tcp), "http": fmt_addr(target.http), "pid": target.pid}
        ctx = Ctx(opts, target, workload, run_id)
        entry["topic"] = ctx.topic
        result = WORKLOAD_FUNCS[workload](ctx)
        entry.update(result)
    except Exception as exc:  # noqa: BLE001 - one workload failing must not lose the others
        entry["errors"] = entry.get("errors", []) + [f"{type(exc).__name__}: {exc}"]
        entry["traceback"] = traceback.format_exc()
    finally:
        if ctx is not None:
            entry["anomalies"] = ctx.anomalies
            entry["daemon"] = daemon_usage(ctx.before, ctx.after, entry.get("seconds"))
            entry["generator_cpu_s"] = entry.pop("cpu_s", None)
            entry["machine_cpu"] = ctx.machine_usage(entry["generator_cpu_s"] or 0.0)
            if target is not None and not target.alive():
                ctx.anomalies.append(f"daemon died during the workload (exit {target.daemon.proc.returncode})")
            if target is not None and not opts.keep_topics:
                target.delete_topic(ctx.topic)
        if target is not None:
            stop = target.close()
            if stop is not None:
                entry.setdefault("daemon", {})["stop"] = stop
                if stop.get("killed_after_s") or (stop.get("returncode") not in (0, None)):
                    entry.setdefault("anomalies", []).append(f"daemon shutdown: {stop}")
                d = target.daemon
                assert d is not None
                entry["daemon"]["log_lines"] = d.line_count
                entry["daemon"]["log_notable"] = d.notable[:20]
    entry["wall_s"] = time.monotonic() - t_wall
    entry.setdefault("errors", [])
    entry.setdefault("anomalies", [])
    entry["ok"] = not entry["errors"] and not entry["anomalies"]
    return entry


def _rank_key(e: dict[str, Any]) -> float:
    if e["workload"] == "latency":
        return ((e.get("detail") or {}).get("latency_ms") or {}).get("p99", float("inf"))
    return e.get("msgs_per_s", 0.0)


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per workload: the median run (by msgs/s; latency by p99), with every run attached."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=_rank_key)
    entry = dict(ordered[(len(ordered) - 1) // 2])
    rates = [r.get("msgs_per_s", 0.0) for r in runs]
    entry["repeat"] = {"runs": len(runs), "msgs_per_s": rates, "min": min(rates), "max": max(rates),
                       "median_run": runs.index(ordered[(len(ordered) - 1) // 2])}
    if entry["workload"] == "latency":
        entry["repeat"]["p99_ms"] = [((r.get("detail") or {}).get("latency_ms") or {}).get("p99") for r in runs]
    entry["errors"] = [f"run {i + 1}: {e}" for i, r in enumerate(runs) for e in r["errors"]]
    entry["anomalies"] = [f"run {i + 1}: {a}" for i, r in enumerate(runs) for a in r["anomalies"]]
    entry["ok"] = all(r["ok"] for r in runs)
    entry["runs"] = runs
    return entry


def daemon_usage(before: dict[str, Any] | None, after: dict[str, Any] | None, seconds: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"before": before, "after": after}
    if before and after:
        cpu = after["cpu_s"] - before["cpu_s"]
        wall = after["t"] - before["t"]
        out["cpu_s"] = cpu
        out["cpu_pct"] = 100.0 * cpu / wall if wall > 0 else None
        out["rss_delta_bytes"] = after.get("rss_bytes", 0) - before.get("rss_bytes", 0)
    return out


# =================================================================== report


def _mb(n: int | None) -> str:
    return f"{n / MIB:.0f}" if n else "-"


def notes_for(e: dict[str, Any]) -> str:
    d = e.get("detail") or {}
    w = e["workload"]
    parts = []
    if w == "latency" and d.get("latency_ms", {}).get("count"):
        lat = d["latency_ms"]
        parts.append(f"p50 {lat['p50']:.2f} p90 {lat['p90']:.2f} p99 {lat['p99']:.2f} max {lat['max']:.2f} ms")
        parts.append(f"target {d['target_rate']}/s")
    if w == "pubsub" and d:
        parts.append(f"pub {d['publish']['msgs_per_s']:,.0f}/s, sub {d['consume']['msgs_per_s']:,.0f}/s")
    if w == "consume" and d:
        parts.append(f"backlog {d['backlog']:,} (fill {d['prefill_msgs_per_s']:,.0f}/s)")
    if w in ("pub", "http_pub") and d.get("round_trip_us"):
        parts.append(f"{d['round_trip_us']:.0f} us/round trip")
    if w == "spill" and d.get("topic_stats"):
        parts.append(f"on disk {d['topic_stats'].get('backend_depth'):,}")
    if e.get("repeat"):
        rp = e["repeat"]
        if w == "latency":
            parts.append(f"median p99 of {rp['runs']} runs ({min(rp['p99_ms']):.2f}-{max(rp['p99_ms']):.2f})")
        else:
            parts.append(f"median of {rp['runs']} runs ({rp['min']:,.0f}-{rp['max']:,.0f})")
    other = (e.get("machine_cpu") or {}).get("other_pct")
    if other is not None and other >= 15:
        parts.append(f"other processes {other:.0f}% CPU")
    if e.get("errors"):
        parts.append("ERRORS: " + "; ".join(e["errors"][:2]))
    if e.get("anomalies"):
        parts.append("CHECK: " + "; ".join(e["anomalies"][:2]))
    return "; ".join(parts)


def format_table(report: dict[str, Any]) -> str:
    head = ["workload", "msgs", "secs", "msgs/s", "MB/s", "daemon CPU%", "RSS MB", "notes"]
    rows = []
    for e in report["workloads"]:
        dm = e.get("daemon") or {}
        after = dm.get("after") or {}
        rows.append([
            e["workload"],
            f"{e.get('messages', 0):,}",
            f"{e.get('seconds', 0):.2f}",
            f"{e.get('msgs_per_s', 0):,.0f}",
            f"{e.get('mb_per_s', 0):.1f}",
            f"{dm['cpu_pct']:.0f}" if dm.get("cpu_pct") is not None else "-",
            _mb(after.get("rss_bytes")) + ("/" + _mb(after.get("rss_peak_bytes")) if after else ""),
            notes_for(e),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    lines = ["| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(head)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.rjust(widths[i]) if 0 < i < 7 else c.ljust(widths[i])
                                       for i, c in enumerate(r)) + " |")
    return "\n".join(lines)


# =================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsq_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("target")
    g.add_argument("--nsqd-tcp-address", type=parse_addr, help="HOST:PORT of an nsqd's TCP listener")
    g.add_argument("--nsqd-http-address", type=parse_addr, help="HOST:PORT of its HTTP listener (stats, http_pub)")
    g.add_argument("--daemon-pid", type=int, help="pid of that nsqd, to record its RSS/CPU from /proc")
    g.add_argument("--spawn", action="store_true", help="start a fresh daemon (temp data dir, port 0) per workload")
    g.add_argument("--daemon-cmd", default=f"{shlex.quote(sys.executable)} -m pynsqd",
                   help="daemon command line for --spawn (any nsqd-compatible binary)")
    g.add_argument("--daemon-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for the spawned daemon (repeatable), e.g. --daemon-arg=--sync-every=10000")
    g.add_argument("--mem-queue-size", type=int, default=1_000_000,
                   help="--mem-queue-size given to spawned daemons for every workload but spill")
    g.add_argument("--shutdown-timeout", type=float, default=60.0, help="seconds to wait for a spawned daemon to exit")

    g = p.add_argument_group("workloads")
    g.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: " + ",".join(WORKLOADS))
    g.add_argument("--size", type=int, default=200, help="message body bytes")
    g.add_argument("--repeat", type=int, default=1, help="run each workload N times; report the median run")
    g.add_argument("--time-limit", type=float, default=20.0, help="seconds, per measured phase")
    g.add_argument("--grace", type=float, default=10.0, help="seconds to wait for outstanding acks after the time limit")
    g.add_argument("--idle-timeout", type=float, default=10.0, help="a reader with nothing for this long reports a stall")
    g.add_argument("--writers", type=int, default=2, help="MPUB writer processes (one connection each)")
    g.add_argument("--batch", type=int, default=200, help="messages per MPUB")
    g.add_argument("--window", type=int, default=4, help="MPUBs in flight per writer connection")
    g.add_argument("--readers", type=int, default=1, help="consumer processes (one connection each, same channel)")
    g.add_argument("--rdy", type=int, default=2500, help="RDY count per consumer (capped at the server's max_rdy_count)")
    g.add_argument("--mpub-messages", type=int, default=1_000_000, help="mpub: messages")
    g.add_argument("--spill-messages", type=int, default=1_000_000, help="spill: messages")
    g.add_argument("--pub-messages", type=int, default=100_000, help="pub: messages")
    g.add_argument("--http-messages", type=int, default=20_000, help="http_pub: messages")
    g.add_argument("--consume-messages", type=int, default=300_000, help="consume: backlog size")
    g.add_argument("--pubsub-messages", type=int, default=1_000_000, help="pubsub: messages")
    g.add_argument("--pubsub-writers", type=int, default=1, help="pubsub: writer processes")
    g.add_argument("--latency-rate", type=int, default=10_000, help="latency: messages per second")
    g.add_argument("--latency-duration", type=float, default=10.0, help="latency: seconds of publishing")
    g.add_argument("--latency-tick-ms", type=float, default=1.0, help="latency: minimum ms between publish commands")
    g.add_argument("--latency-output-buffer-size", type=int, default=-1,
                   help="latency: consumer IDENTIFY output_buffer_size (-1 unbuffered: every message written at "
                        "once, on Go nsqd and pynsqd alike; 0 server default 16 KiB)")
    g.add_argument("--latency-output-buffer-timeout", type=int, default=0,
                   help="latency: consumer IDENTIFY output_buffer_timeout ms (0 = not sent, server default 250; "
                        "25 = nsqd minimum; ignored by nsqd when the buffer size is -1; never use -1 to measure "
                        "latency: Go nsqd then flushes only when the buffer fills)")

    g = p.add_argument_group("output")
    g.add_argument("--json-out", help="write the full report as JSON here")
    g.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics afterwards")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    opts = p.parse_args(argv)
    names = [w.strip() for w in opts.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {','.join(bad)}; choose from {','.join(WORKLOADS)}")
    opts.workload_list = names
    if not opts.spawn and opts.nsqd_tcp_address is None:
        p.error("give --spawn or --nsqd-tcp-address")
    if opts.size < 8 and "latency" in names:
        p.error("latency needs --size >= 8 (the body carries a timestamp)")
    if min(opts.size, opts.writers, opts.readers, opts.batch, opts.window, opts.repeat) < 1:
        p.error("--size, --writers, --readers, --batch, --window and --repeat must be >= 1")
    for addr in (opts.nsqd_tcp_address, opts.nsqd_http_address):
        if addr and addr[0] not in ("127.0.0.1", "localhost", "::1"):
            p.error("the bench only targets loopback addresses")
    return opts


def _log(opts: argparse.Namespace, msg: str) -> None:
    if not opts.quiet:
        print(f"[nsq_bench] {msg}", file=sys.stderr, flush=True)


def run(opts: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {
        "tool": "nsq_bench", "bench_version": BENCH_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/nsq_bench.py",
                                                     *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "git": git_info(),
        "target": {"spawn": opts.spawn, "daemon_cmd": opts.daemon_cmd if opts.spawn else None,
                   "daemon_args": opts.daemon_arg, "tcp": fmt_addr(opts.nsqd_tcp_address),
                   "http": fmt_addr(opts.nsqd_http_address), "pid": opts.daemon_pid},
        "settings": {k: v for k, v in vars(opts).items()
                     if k not in ("nsqd_tcp_address", "nsqd_http_address", "workload_list", "json_out")},
        "workloads": [],
    }
    for w in opts.workload_list:
        runs = []
        for i in range(opts.repeat):
            _log(opts, f"{w}: running" + (f" ({i + 1}/{opts.repeat})" if opts.repeat > 1 else ""))
            entry = run_workload(opts, w, f"{run_id}_{i}" if opts.repeat > 1 else run_id)
            runs.append(entry)
            status = "ok" if entry["ok"] else "PROBLEMS: " + "; ".join((entry["errors"] + entry["anomalies"])[:3])
            other = (entry.get("machine_cpu") or {}).get("other_pct")
            _log(opts, f"{w}: {entry.get('messages', 0):,} msgs in {entry.get('seconds', 0):.2f}s = "
                       f"{entry.get('msgs_per_s', 0):,.0f} msg/s"
                       + (f", other processes {other:.0f}% CPU" if other is not None else "") + f" ({status})")
        report["workloads"].append(summarize_runs(runs))
    report["ok"] = all(e["ok"] for e in report["workloads"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    report = run(opts, argv)
    print(format_table(report))
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["ok"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
