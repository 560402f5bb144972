"""Test helpers: start real daemons as subprocesses and talk to them over
loopback with the shared codec, synchronously (tests stay simple) and with
deadlines instead of sleeps."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

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
