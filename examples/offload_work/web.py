"""Offload slow work from a web request: the web half.

``POST /jobs`` with a JSON object publishes it, with an id added, to the
``jobs`` topic through nsqd's HTTP ``/pub`` and answers ``202 Accepted`` at
once; ``worker.py`` does the slow part later.  The request costs one
loopback round trip to nsqd, however long the job takes.

Run (with a pynsqd on 127.0.0.1:4150/4151, and worker.py alongside):

    python examples/offload_work/web.py --http-address 127.0.0.1:8080
    curl -d '{"task": "thumbnail", "seconds": 2}' http://127.0.0.1:8080/jobs
    # -> 202 {"id": "5f0c...", "status": "queued"}

The HTTP side is pynsqd's own h11 server (``pynsqd.http_server.Router``),
the publish pynsqd's h11 client; any HTTP framework and client would do.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid

import trio

from pynsqd.http_client import HTTPClientError, http_post
from pynsqd.http_server import HTTPError, Request, Response, Router, respond, serve_http


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_router(nsqd_http_address: str, topic: str) -> Router:
    pub_url = f"http://{nsqd_http_address}/pub?topic={topic}"

    async def submit(request: Request) -> Response:
        try:
            job = json.loads(request.body)
        except ValueError:
            raise HTTPError(400, "INVALID_JSON") from None
        if not isinstance(job, dict):
            raise HTTPError(400, "JOB_MUST_BE_AN_OBJECT")
        job["id"] = uuid.uuid4().hex
        job["submitted_at"] = time.time()
        try:
            answer = await http_post(pub_url, json.dumps(job).encode(), timeout=2.0)
        except HTTPClientError:
            raise HTTPError(503, "QUEUE_UNAVAILABLE") from None
        if answer.status != 200:
            raise HTTPError(503, "QUEUE_UNAVAILABLE")
        body = json.dumps({"id": job["id"], "status": "queued"}).encode()
        return Response(202, body, b"application/json")

    async def ping(request: Request) -> Response:
        return respond("OK")

    router = Router(default_max_body=64 * 1024)
    router.add("POST", "/jobs", submit)
    router.add("GET", "/ping", ping)
    return router


async def main(args: argparse.Namespace) -> None:
    router = make_router(args.nsqd_http_address, args.topic)
    host, port = split_address(args.http_address)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        listener = (await trio.open_tcp_listeners(port, host=host))[0]
        bound_host, bound_port = listener.socket.getsockname()[:2]
        print(f"HTTP: listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_http, listener, router)
            async for _ in signals:  # Ctrl-C / SIGTERM: stop serving
                break
            nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-address", default="127.0.0.1:8080", help="where the web app listens (port 0: any free port)")
    parser.add_argument("--nsqd-http-address", default="127.0.0.1:4151", help="nsqd's HTTP address to publish to")
    parser.add_argument("--topic", default="jobs", help="topic the jobs are published to")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
