"""A small, fast HTTP/1.1 endpoint for the nsq_to_http tests, run as a
subprocess: keep-alive, Content-Length bodies, one line per request
appended to --out *before* it answers (so a request answered 2xx is on
disk even if the sink is then killed).

    python http_sink.py --port=0 --out=FILE [--status=200] [--fail=N --fail-status=500]

Prints ``listening on 127.0.0.1:PORT`` on stdout.  POST records the body,
GET the query string after ``?`` (``%s`` filled by nsq_to_http); each line is
``METHOD<TAB>PATH<TAB>DATA`` with the header names seen on the first request
of a connection logged once to --headers-out (if given).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys


class Sink(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace, fd: int, state: dict) -> None:
        self.args = args
        self.fd = fd
        self.state = state
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        close = False
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end].decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                break
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.state["n"] += 1
            failing = self.state["n"] <= self.args.fail
            status = self.args.fail_status if failing else self.args.status
            if not failing:
                path, _, query = target.partition("?")
                data = body if method == "POST" else query.encode()
                os.write(self.fd, b"%s\t%s\t%s\t%s\n" % (method.encode(), path.encode(), headers.get("content-type", "").encode(), data))
                if self.args.headers_out and not self.state.get("headers_written"):
                    with open(self.args.headers_out, "w") as fh:
                        fh.write("\n".join(f"{k}: {v}" for k, v in sorted(headers.items())) + "\n")
                    self.state["headers_written"] = True
            out.append(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % status)
            if headers.get("connection", "").lower() == "close":
                close = True
                break
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]
        if close:
            self.transport.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--headers-out", default="")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--fail", type=int, default=0, help="answer the first N requests with --fail-status, recording nothing")
    parser.add_argument("--fail-status", type=int, default=500)
    args = parser.parse_args()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    state = {"n": 0}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Sink(args, fd, state), "127.0.0.1", args.port, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    os.close(fd)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
