"""Test helpers: start real daemons as subprocesses and talk to them over
loopback with the shared codec, synchronously (tests stay simple) and with
deadlines instead of sleeps."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from pynsqd.protocol import (
    FRAME_TYPE_MESSAGE,
    MAGIC_V2,
    Frame,
    FrameDecoder,
    decode_message,
    encode_command,
    encode_mpub_body,
)

LISTEN_RE = re.compile(r"(TCP|HTTP|HTTPS): listening on (\S+)")


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


BACKENDS = ("trio", "asyncio")


def on_both_backends(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test once on trio and once on asyncio (``anyio.run``):
    the same test, parametrized ``[trio]``/``[asyncio]``.  The wrapper is a
    plain function, so pytest-trio's trio_mode leaves it alone; fixtures
    are passed through by name."""
    signature = inspect.signature(test)

    @pytest.mark.parametrize("backend", BACKENDS)
    @functools.wraps(test)
    def run(backend: str, **fixtures: Any) -> None:
        anyio.run(functools.partial(test, **fixtures), backend=backend)

    backend_param = inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    run.__signature__ = signature.replace(parameters=[backend_param, *signature.parameters.values()])  # type: ignore[attr-defined]
    return run


async def eventually(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.03, message: str = "condition") -> Any:
    """Poll ``predicate`` without blocking the event loop (trio or asyncio)
    the client runs on, until it returns something truthy, or fail."""
    deadline = anyio.current_time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await anyio.sleep(interval)


class Daemon:
    """A daemon subprocess whose stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            text=True,
        )
        self.lines: list[str] = []
        self.addresses: dict[str, str] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = LISTEN_RE.search(line)
            if m:
                self.addresses[m.group(1)] = m.group(2)

    def wait_listening(self, kinds: tuple[str, ...] = ("TCP", "HTTP"), timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n" + "\n".join(self.lines))
            return all(k in self.addresses for k in kinds)

        wait_for(ready, timeout, message="listening lines")

    def port(self, kind: str) -> int:
        return int(self.addresses[kind].rsplit(":", 1)[1])

    @property
    def tcp_port(self) -> int:
        return self.port("TCP")

    @property
    def http_port(self) -> int:
        return self.port("HTTP")

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    def http(self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        return http_request(method, f"http://127.0.0.1:{self.http_port}{path}", body, timeout)

    def json(self, path: str) -> Any:
        status, body = self.http("GET", path)
        assert status == 200, (status, body)
        return json.loads(body)

    def stats(self, topic: str | None = None) -> dict[str, Any]:
        q = "/stats?format=json" + (f"&topic={topic}" if topic else "")
        return self.json(q)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        self._reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def start_nsqd(data_path: str, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    args = [
        sys.executable, "-m", "pynsqd",
        "--tcp-address=127.0.0.1:0",
        "--http-address=127.0.0.1:0",
        f"--data-path={data_path}",
        "--log-level=debug",
        *extra,
    ]
    daemon = Daemon(args, env=env)
    daemon.wait_listening()
    return daemon


def channel_stats(nsqd: Daemon, topic: str, channel: str) -> dict[str, Any]:
    """One channel's entry in an nsqd's /stats."""
    for t in nsqd.stats(topic)["topics"]:
        for c in t["channels"]:
            if c["channel_name"] == channel:
                return c
    raise AssertionError(f"{topic}/{channel} not on nsqd")


def start_nsqlookupd(*extra: str) -> Daemon:
    daemon = Daemon([
        sys.executable, "-m", "pynsqlookupd",
        "--tcp-address=127.0.0.1:0",
        "--http-address=127.0.0.1:0",
        "--broadcast-address=127.0.0.1",
        *extra,
    ])
    daemon.wait_listening()
    return daemon


def go_nsq_binary(name: str) -> str | None:
    """The path of a Go NSQ 1.3.0 binary (``nsqd``, ``nsqlookupd``...) from
    the shared folder beside the repository (or ``$GO_NSQ_DIR``), if there."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    given = os.environ.get("GO_NSQ_DIR", "")  # the binaries' folder, or the one holding go-nsq-1.3.0
    candidates = [given, os.path.join(given, "go-nsq-1.3.0")] if given else []
    while True:
        candidates.append(os.path.join(here, "shared", "go-nsq-1.3.0"))
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for folder in candidates:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


GO_NSQD_MISSING = "Go nsqd 1.3.0 binary not found (shared/go-nsq-1.3.0 beside the repository, or $GO_NSQ_DIR)"


def start_go_nsqd(data_path: str, *extra: str) -> Daemon:
    """Go nsqd 1.3.0 on loopback ephemeral ports (callers skip when
    :func:`go_nsq_binary` finds none)."""
    binary = go_nsq_binary("nsqd")
    assert binary is not None, GO_NSQD_MISSING
    daemon = Daemon([binary, "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", f"--data-path={data_path}", *extra])
    daemon.wait_listening()
    return daemon


def start_nsqadmin(*extra: str) -> Daemon:
    daemon = Daemon([sys.executable, "-m", "pynsqadmin", "--http-address=127.0.0.1:0", *extra])
    daemon.wait_listening(("HTTP",))
    return daemon


def http_request(method: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class RawClient:
    """A blocking NSQ V2 client over a plain socket, for protocol tests."""

    def __init__(self, port: int, host: str = "127.0.0.1", magic: bytes = MAGIC_V2, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []
        if magic:
            self.sock.sendall(magic)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, name: bytes, *params: bytes | str, body: bytes | None = None) -> None:
        self.send(encode_command(name, *params, body=body))

    def identify(self, **fields: Any) -> Frame:
        self.cmd(b"IDENTIFY", body=json.dumps(fields).encode())
        return self.read_frame()

    def sub(self, topic: str, channel: str) -> Frame:
        self.cmd(b"SUB", topic, channel)
        return self.read_response()

    def pub(self, topic: str, body: bytes) -> Frame:
        self.cmd(b"PUB", topic, body=body)
        return self.read_response()

    def mpub(self, topic: str, bodies: list[bytes]) -> Frame:
        self.cmd(b"MPUB", topic, body=encode_mpub_body(bodies))
        return self.read_response()

    def read_frame(self, timeout: float | None = None) -> Frame:
        if self.pending:
            return self.pending.pop(0)
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return frame
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by server")
                self.decoder.receive_data(data)
        finally:
            if timeout is not None:
                self.sock.settimeout(10.0)

    def read_response(self, timeout: float | None = None) -> Frame:
        """The next non-heartbeat, non-message frame (messages are kept)."""
        kept = []
        try:
            while True:
                frame = self.read_frame(timeout)
                if frame.frame_type == FRAME_TYPE_MESSAGE:
                    kept.append(frame)
                    continue
                if frame.data == b"_heartbeat_":
                    self.cmd(b"NOP")
                    continue
                return frame
        finally:
            self.pending[:0] = kept

    def read_message(self, timeout: float | None = None) -> tuple[int, int, bytes, bytes]:
        """The next message (answering heartbeats on the way)."""
        while True:
            frame = self.read_frame(timeout)
            if frame.frame_type == FRAME_TYPE_MESSAGE:
                return decode_message(frame.data)
            if frame.data == b"_heartbeat_":
                self.cmd(b"NOP")
                continue
            raise AssertionError(f"expected a message, got {frame}")

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (reads hit EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.decoder.receive_data(data)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- TLS / compression


class Certs:
    """A throwaway CA (trustme) with a server certificate for 127.0.0.1 and
    client certificates, written as PEM files under ``directory``."""

    def __init__(self, directory: str) -> None:
        import trustme

        self.directory = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        self.server_cert = self._write("server.pem", b"".join(p.bytes() for p in server.cert_chain_pems))
        self.server_key = self._write("server.key", server.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def client_cert(self, common_name: str, *, ca: Any = None) -> tuple[str, str]:
        """(cert, key) paths for a client certificate (from another CA if given)."""
        issued = (ca or self.ca).issue_cert(f"{common_name}.clients.test", common_name=common_name)
        cert = self._write(f"{common_name}.pem", b"".join(p.bytes() for p in issued.cert_chain_pems))
        key = self._write(f"{common_name}.key", issued.private_key_pem.bytes())
        return cert, key

    def nsqd_flags(self) -> list[str]:
        return [f"--tls-cert={self.server_cert}", f"--tls-key={self.server_key}", "--https-address=127.0.0.1:0"]

    def client_context(self, cert: tuple[str, str] | None = None, *, maximum: Any = None) -> Any:
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            ctx.load_cert_chain(*cert)
        if maximum is not None:
            ctx.maximum_version = maximum
        return ctx


class CompressedSocket:
    """A blocking socket seen through a pynsqd.streams codec, so RawClient
    can keep talking after a snappy/deflate upgrade."""

    def __init__(self, sock: Any, encoder: Any, decoder: Any) -> None:
        self._sock = sock
        self._encoder = encoder
        self._decoder = decoder

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(self._encoder.encode(data))

    def recv(self, n: int) -> bytes:
        while True:
            out = self._decoder.read(n)
            if out:
                return out
            raw = self._sock.recv(65536)
            if not raw:
                return b""
            self._decoder.feed(raw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def recv_exact(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by server")
        buf += chunk
    return buf


def read_frame_exact(sock: Any) -> Frame:
    """One frame read with exact sizes (no byte of a following layer consumed)."""
    size, frame_type = struct.unpack(">ii", recv_exact(sock, 8))
    return Frame(frame_type, recv_exact(sock, size - 4))


def identify_and_upgrade(client: RawClient, tls_context: Any = None, **fields: Any) -> dict[str, Any]:
    """IDENTIFY with feature negotiation, then add the layers nsqd agreed to in
    its order (TLS, then snappy/deflate), checking each ``OK``.  Returns the
    IDENTIFY response; an error frame raises AssertionError."""
    from pynsqd.streams import DeflateDecoder, DeflateEncoder, SnappyDecoder, SnappyEncoder

    fields.setdefault("feature_negotiation", True)
    client.cmd(b"IDENTIFY", body=json.dumps(fields).encode())
    frame = read_frame_exact(client.sock)
    assert frame.frame_type == 0, frame
    reply = json.loads(frame.data)
    if reply.get("tls_v1"):
        assert tls_context is not None, "nsqd agreed to TLS but no context was given"
        client.sock = tls_context.wrap_socket(client.sock, server_hostname="127.0.0.1")
        assert read_frame_exact(client.sock).data == b"OK"
    if reply.get("snappy"):
        client.sock = CompressedSocket(client.sock, SnappyEncoder(), SnappyDecoder())
        assert read_frame_exact(client.sock).data == b"OK"
    if reply.get("deflate"):
        client.sock = CompressedSocket(client.sock, DeflateEncoder(reply["deflate_level"]), DeflateDecoder())
        assert read_frame_exact(client.sock).data == b"OK"
    return reply


# ---------------------------------------------------------------- tools and Go's binaries


def go_binary(name: str) -> str:
    """A Go NSQ 1.3.0 binary's path, or the test is skipped with the reason."""
    path = go_nsq_binary(name)
    if path is None:
        pytest.skip(f"Go NSQ 1.3.0's {name} not found (shared/go-nsq-1.3.0 beside the repository, or $GO_NSQ_DIR)")
    return path


def tool_command(go_name: str) -> list[str]:
    """How a test runs one of our tools: the module behind the console
    script py<go_name> (pynsq_tail, pyto_nsq...), with this interpreter."""
    return [sys.executable, "-m", f"pynsqd.client.tools.{go_name}"]


def run_tool(go_name: str, *args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*tool_command(go_name), *args], input=stdin, capture_output=True, timeout=timeout)


def mpub_http(nsqd: Daemon, topic: str, bodies: list[bytes], chunk: int = 20000) -> None:
    """Publish many messages fast: binary /mpub in chunks."""
    for i in range(0, len(bodies), chunk):
        status, body = nsqd.http("POST", f"/mpub?topic={topic}&binary=true", encode_mpub_body(bodies[i : i + chunk]), timeout=60)
        assert status == 200, body


def drain(nsqd: Daemon, topic: str, channel: str, timeout: float = 60.0) -> list[bytes]:
    """Every message queued on ``topic``/``channel``, each FINished, until
    the channel is empty; duplicates stay in the list."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    with RawClient(nsqd.tcp_port) as client:
        client.identify(heartbeat_interval=30000)
        assert client.sub(topic, channel).data == b"OK"
        client.cmd(b"RDY", b"2500")
        fins: list[bytes] = []
        while True:
            try:
                _, _, msg_id, body = client.read_message(timeout=0.5)
            except socket.timeout:
                client.send(b"".join(fins))
                fins = []
                c = channel_stats(nsqd, topic, channel)
                if c["depth"] == 0 and c["in_flight_count"] == 0 and c["deferred_count"] == 0:
                    return bodies
                assert time.monotonic() < deadline, f"still {c['depth']} queued on {topic}/{channel}"
                continue
            bodies.append(body)
            fins.append(encode_command(b"FIN", msg_id))
            if len(fins) >= 500:
                client.send(b"".join(fins))
                fins = []


PYNSQ_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pynsq_driver.py")


def run_driver(*args: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run pynsq through tests/pynsq_driver.py; its JSON events."""
    proc = subprocess.run([sys.executable, PYNSQ_DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def free_port() -> int:
    """A loopback port that was free a moment ago (for a restart on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_channel(nsqd: Daemon, topic: str, channel: str) -> None:
    """Topic and channel created up front, so every message is kept for the channel."""
    assert nsqd.http("POST", f"/topic/create?topic={topic}")[0] == 200
    assert nsqd.http("POST", f"/channel/create?topic={topic}&channel={channel}")[0] == 200


def wait_drained(nsqd: Daemon, topic: str, channel: str, timeout: float = 120) -> None:
    """Until every message of the channel is finished: none queued, in flight or deferred."""

    def drained() -> bool:
        c = channel_stats(nsqd, topic, channel)
        return c["depth"] == 0 and c["in_flight_count"] == 0 and c["deferred_count"] == 0

    wait_for(drained, timeout=timeout, interval=0.1, message=f"{topic}/{channel} drained")


PYNSQ_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pynsq_driver.py")


def run_pynsq(*args: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run tests/pynsq_driver.py (the official pynsq client) to completion: its JSON events."""
    proc = subprocess.run([sys.executable, PYNSQ_DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
