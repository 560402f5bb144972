"""Offload slow work from a web request: the worker half.

Consumes the ``jobs`` topic on the ``workers`` channel and does the slow
work.  When the work raises, the Reader requeues the job (nsqd redelivers it
after ``--requeue-delay`` x attempts seconds) and backs off (pauses
consuming for a moment), so a broken dependency is not hammered.  A job
delivered more than ``--max-attempts`` times goes to the give-up hook, which
records it as failed -- a JSON line appended to ``--failed-file`` -- and is
then finished: nsqd forgets it.

Run (with a pynsqd on 127.0.0.1:4150, and web.py in front):

    python examples/offload_work/worker.py --concurrency 4 --max-attempts 5 --failed-file failed_jobs.jsonl

Start more workers, here or on other machines (``--lookupd-http-address``
finds every nsqd with the topic), and they share the jobs of the channel.
Every outcome is printed as one JSON line on stdout:

    {"event": "done", "id": "5f0c...", "attempts": 1, ...}
    {"event": "retry", "id": "5f0c...", "attempts": 1, "error": "..."}
    {"event": "failed", "id": "5f0c...", "attempts": 5, "job": {...}}

The work is simulated: a job sleeps ``"seconds"`` (default 1) and, to play a
flaky dependency, fails its first ``"fail_times"`` attempts (default 0).
While it works, the message is TOUCHed every ``--touch-every`` seconds so
that nsqd does not time it out and hand it to another worker.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import Any

import trio

from pynsqd.client import Message, Reader
from pynsqd import log


class JobFailed(Exception):
    pass


async def do_the_work(job: dict[str, Any], attempt: int) -> None:
    """Stands for the real thing: resize an image, send an email, call an API..."""
    await trio.sleep(float(job.get("seconds", 1.0)))
    if attempt <= int(job.get("fail_times", 0)):
        raise JobFailed(f"simulated failure {attempt} of {job['fail_times']}")


def parse_job(body: bytes) -> dict[str, Any] | None:
    try:
        job = json.loads(body)
    except ValueError:
        return None
    return job if isinstance(job, dict) else None


def report(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def keep_alive(message: Message, every: float) -> None:
    while True:
        await trio.sleep(every)
        message.touch()  # nsqd restarts this message's timeout


class Worker:
    def __init__(self, touch_every: float, failed_file: str) -> None:
        self.touch_every = touch_every
        self.failed_file = failed_file

    async def handle(self, message: Message) -> None:
        """The Reader's handler: returning finishes the message, raising requeues it."""
        job = parse_job(message.body)
        if job is None:
            # retrying cannot fix this one: record it as failed now (and finish it)
            await self.record_failure(message.body, message.attempts, "not a JSON job")
            return
        failure = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive, message, self.touch_every)
            try:
                await do_the_work(job, message.attempts)
            except Exception as exc:  # noqa: BLE001 - any failure means "try again later"
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            report("retry", id=job.get("id"), attempts=message.attempts, error=str(failure))
            raise failure  # the Reader requeues the message and backs off
        report("done", id=job.get("id"), attempts=message.attempts)

    async def give_up(self, message: Message) -> None:
        """The Reader's ``on_give_up``: called on delivery ``max_attempts + 1``,
        so the job ran ``max_attempts`` times; the message is finished after."""
        tries = message.attempts - 1
        await self.record_failure(message.body, tries, f"gave up after {tries} attempts")

    async def record_failure(self, body: bytes, attempts: int, reason: str) -> None:
        job = parse_job(body)
        if job is None:
            job = {"raw": body.decode(errors="replace")}
        record = {"event": "failed", "id": job.get("id"), "attempts": attempts, "reason": reason, "job": job, "failed_at": time.time()}
        if self.failed_file:
            async with await trio.open_file(self.failed_file, "a") as f:
                await f.write(json.dumps(record) + "\n")
        report(**record)


async def main(args: argparse.Namespace) -> None:
    worker = Worker(args.touch_every, args.failed_file)
    if args.lookupd_http_address:
        sources = {"lookupd_http_addresses": args.lookupd_http_address, "nsqd_tcp_addresses": args.nsqd_tcp_address or []}
    else:
        sources = {"nsqd_tcp_addresses": args.nsqd_tcp_address or ["127.0.0.1:4150"]}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Reader(
            args.topic,
            args.channel,
            worker.handle,
            **sources,
            max_in_flight=args.concurrency,
            max_attempts=args.max_attempts,
            on_give_up=worker.give_up,
            default_requeue_delay=args.requeue_delay,
            backoff_multiplier=args.backoff_multiplier,
            max_backoff_duration=args.max_backoff,
        ):
            async for _ in signals:  # Ctrl-C / SIGTERM: stop taking jobs and
                break  # let the running ones finish (leaving the block)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsqd-tcp-address", action="append", help="nsqd to consume from, repeatable (default 127.0.0.1:4150 unless --lookupd-http-address)")
    p.add_argument("--lookupd-http-address", action="append", help="nsqlookupd to discover nsqds from, repeatable")
    p.add_argument("--topic", default="jobs")
    p.add_argument("--channel", default="workers")
    p.add_argument("--concurrency", type=int, default=4, help="jobs worked on at once (max_in_flight)")
    p.add_argument("--max-attempts", type=int, default=5, help="give up on a job after this many attempts")
    p.add_argument("--requeue-delay", type=float, default=10.0, help="seconds before a retry, times the attempts so far")
    p.add_argument("--backoff-multiplier", type=float, default=1.0, help="consumer backoff after a failure: this x 2^level seconds")
    p.add_argument("--max-backoff", type=float, default=60.0, help="longest consumer backoff in seconds")
    p.add_argument("--touch-every", type=float, default=20.0, help="TOUCH a job being worked on this often (below nsqd's --msg-timeout)")
    p.add_argument("--failed-file", default="failed_jobs.jsonl", help="append given-up jobs here, one JSON line each ('' to only print them)")
    p.add_argument("--log-level", default="warn", choices=("debug", "info", "warn", "error"))
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    log.configure(app="worker", level=arguments.log_level)
    trio.run(main, arguments)
