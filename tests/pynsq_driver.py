"""Drive the official pynsq client (it runs its own tornado loop) from a
subprocess, printing one JSON line per event on stdout.

    python pynsq_driver.py read TOPIC CHANNEL COUNT --nsqd ADDR [--lookupd ADDR] [--max-in-flight N] [--requeue-first]
    python pynsq_driver.py write TOPIC COUNT --nsqd ADDR [--mpub N] [--prefix P]

both take [--snappy | --deflate] [--tls --tls-ca CA [--tls-cert C --tls-key K]] [--auth-secret S]
"""

from __future__ import annotations

import argparse
import json
import sys

import nsq
import tornado.ioloop


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def conn_options(args: argparse.Namespace) -> dict[str, object]:
    """Transport options shared by Reader and Writer (nsq.AsyncConn kwargs)."""
    kwargs: dict[str, object] = {}
    if args.snappy:
        kwargs["snappy"] = True
    if args.deflate:
        kwargs["deflate"] = True
    if args.tls:
        kwargs["tls_v1"] = True
        tls_options: dict[str, object] = {"ca_certs": args.tls_ca}
        if args.tls_cert:
            tls_options.update(certfile=args.tls_cert, keyfile=args.tls_key)
        kwargs["tls_options"] = tls_options
    if args.auth_secret:
        kwargs["auth_secret"] = args.auth_secret
    return kwargs


def add_conn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snappy", action="store_true")
    p.add_argument("--deflate", action="store_true")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--tls-ca", default=None)
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--auth-secret", default=None)


def read(args: argparse.Namespace) -> None:
    loop = tornado.ioloop.IOLoop.current()
    seen = {"n": 0}

    def handler(message: nsq.Message) -> bool:
        body = message.body.decode()
        if args.requeue_first and message.attempts == 1:
            emit(event="requeue", body=body, attempts=message.attempts, id=message.id.decode())
            return False
        seen["n"] += 1
        emit(event="message", body=body, attempts=message.attempts, id=message.id.decode())
        if seen["n"] >= args.count:
            # let the FIN go out before stopping
            loop.call_later(0.3, loop.stop)
        return True

    kwargs: dict[str, object] = {
        "topic": args.topic,
        "channel": args.channel,
        "message_handler": handler,
        "max_in_flight": args.max_in_flight,
        "requeue_delay": 0,
        "max_tries": 0,
    }
    if args.nsqd:
        kwargs["nsqd_tcp_addresses"] = args.nsqd
    if args.lookupd:
        kwargs["lookupd_http_addresses"] = [f"http://{a}" for a in args.lookupd]
        kwargs["lookupd_poll_interval"] = 1
    kwargs.update(conn_options(args))
    reader = nsq.Reader(**kwargs)
    emit(event="started")
    loop.call_later(args.timeout, loop.stop)
    loop.start()
    reader.close()
    emit(event="done", count=seen["n"])


def write(args: argparse.Namespace) -> None:
    loop = tornado.ioloop.IOLoop.current()
    state = {"sent": 0, "acked": 0, "errors": 0}
    writer = nsq.Writer(args.nsqd, **conn_options(args))

    def callback(conn: object, data: object) -> None:
        if isinstance(data, nsq.Error):
            state["errors"] += 1
            emit(event="error", error=str(data))
        else:
            state["acked"] += 1
        if state["acked"] + state["errors"] >= batches:
            loop.stop()

    bodies = [f"{args.prefix}{i}".encode() for i in range(args.count)]
    batches = (len(bodies) + args.mpub - 1) // args.mpub if args.mpub > 1 else len(bodies)

    def go() -> None:
        if not writer.conns:
            loop.call_later(0.05, go)
            return
        if args.mpub > 1:
            for i in range(0, len(bodies), args.mpub):
                writer.mpub(args.topic, bodies[i : i + args.mpub], callback=callback)
        else:
            for body in bodies:
                writer.pub(args.topic, body, callback=callback)

    loop.call_later(0.05, go)
    loop.call_later(args.timeout, loop.stop)
    loop.start()
    emit(event="done", acked=state["acked"], errors=state["errors"])


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("read")
    r.add_argument("topic")
    r.add_argument("channel")
    r.add_argument("count", type=int)
    r.add_argument("--nsqd", action="append", default=[])
    r.add_argument("--lookupd", action="append", default=[])
    r.add_argument("--max-in-flight", type=int, default=10)
    r.add_argument("--requeue-first", action="store_true")
    add_conn_arguments(r)
    r.add_argument("--timeout", type=float, default=60.0)
    w = sub.add_parser("write")
    w.add_argument("topic")
    w.add_argument("count", type=int)
    w.add_argument("--nsqd", action="append", default=[])
    w.add_argument("--mpub", type=int, default=1)
    w.add_argument("--prefix", default="msg-")
    add_conn_arguments(w)
    w.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    if args.mode == "read":
        read(args)
    else:
        write(args)


if __name__ == "__main__":
    main()
