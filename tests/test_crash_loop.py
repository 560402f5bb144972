"""Crash loop (issue 11): pynsqd with --sync-every=1 killed with SIGKILL at a
random moment, round after round, while publishers (PUB, MPUB, DPUB) and
consumers (FIN, REQ with and without a delay, messages held in flight) work
on 2 topics x 3 channels and one topic is paused and unpaused (so backlogs are
copied from topic to channels).  At the end:

- every acknowledged message was delivered on every channel of its topic;
- none before its due time (DPUB, and REQ with a delay);
- within one daemon run no id is delivered after its FIN, nor while the same
  id is still in flight on that channel (one copy per channel);
- a FIN the daemon had answered for (a later reply on that connection) is
  never undone by a crash.

Sized for CI (a few rounds); ``CRASH_ROUNDS=50`` for a long run,
``CRASH_SEED=`` to replay one.  Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict

from helpers import Daemon, RawClient, start_nsqd, wait_for
from pynsqd.protocol import FRAME_TYPE_ERROR

ROUNDS = int(os.environ.get("CRASH_ROUNDS", "5"))
TOPICS = ("crash0", "crash1")
CHANNELS = ("a", "b", "c")
NO_SUCH_ID = b"0" * 16


class Ledger:
    """What the clients saw, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, set[bytes]] = {t: set() for t in TOPICS}
        self.delivered: dict[tuple[str, str], set[bytes]] = defaultdict(set)
        self.confirmed_fin: set[tuple[str, str, bytes]] = set()
        self.req_due: dict[tuple[str, str, bytes], float] = {}  # confirmed REQ with a delay: not before
        self.problems: list[str] = []
        self.counts: dict[str, int] = defaultdict(int)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def due_of(body: bytes) -> float:
    """Bodies carry the earliest time they may be delivered (ms, wall clock)."""
    return int(body.rsplit(b"|", 1)[1]) / 1000.0


def publisher(d: Daemon, topic: str, tag: str, ledger: Ledger, stop: threading.Event, rng: random.Random) -> None:
    seq = 0
    try:
        with RawClient(d.tcp_port) as p:
            while not stop.is_set():
                kind = rng.choice(("PUB", "MPUB", "MPUB", "DPUB"))
                now_ms = int(time.time() * 1000)
                if kind == "DPUB":
                    delay = rng.randrange(100, 1500)
                    bodies = [b"%s|%d|%d" % (tag.encode(), seq, now_ms + delay)]
                    p.cmd(b"DPUB", topic, str(delay), body=bodies[0])
                    frame = p.read_response()
                elif kind == "PUB":
                    bodies = [b"%s|%d|0" % (tag.encode(), seq)]
                    frame = p.pub(topic, bodies[0])
                else:
                    bodies = [b"%s|%d.%d|0" % (tag.encode(), seq, j) for j in range(rng.randrange(2, 40))]
                    frame = p.mpub(topic, bodies)
                seq += 1
                if frame.frame_type == FRAME_TYPE_ERROR:
                    ledger.problem(f"{kind} refused: {frame.data!r}")
                    return
                with ledger.lock:
                    ledger.acked[topic].update(bodies)
                    ledger.counts[kind] += 1
    except (OSError, ConnectionError):
        pass  # killed


def consumer(
    d: Daemon, run: int, topic: str, channel: str, ledger: Ledger, stop: threading.Event, rng: random.Random, finish_all: bool
) -> None:
    key = (topic, channel)
    held: dict[bytes, bytes] = {}  # id -> body, delivered and not answered yet
    fin_sent: set[bytes] = set()  # ids FINed in this run
    unconfirmed_fin: list[bytes] = []
    unconfirmed_req: list[tuple[bytes, float]] = []
    holds = 0
    try:
        c = RawClient(d.tcp_port)
        c.identify(feature_negotiation=True, output_buffer_timeout=25, msg_timeout=60000)
        c.sub(topic, channel)
        c.cmd(b"RDY", "25")
        since_confirm = 0
        while not stop.is_set():
            try:
                _, attempts, msg_id, body = c.read_message(timeout=0.2)
            except TimeoutError:
                continue
            now = time.time()
            if msg_id in fin_sent:
                ledger.problem(f"run {run} {topic}/{channel}: {msg_id!r} delivered after its FIN")
            if msg_id in held:
                ledger.problem(f"run {run} {topic}/{channel}: {msg_id!r} delivered while in flight")
            if now < due_of(body):
                ledger.problem(f"run {run} {topic}/{channel}: {body!r} delivered {due_of(body) - now:.3f}s early")
            with ledger.lock:
                if (topic, channel, body) in ledger.confirmed_fin:
                    ledger.problems.append(f"run {run} {topic}/{channel}: {body!r} came back after a confirmed FIN")
                due = ledger.req_due.pop((topic, channel, body), None)
                if due is not None and now < due:
                    ledger.problems.append(f"run {run} {topic}/{channel}: {body!r} REQ'd, back {due - now:.3f}s early")
                if body in ledger.delivered[key]:
                    ledger.counts["redelivered"] += 1
                ledger.delivered[key].add(body)
                ledger.counts["delivered"] += 1
            roll = rng.random()
            if finish_all or roll < 0.7:
                c.cmd(b"FIN", msg_id)
                fin_sent.add(msg_id)
                unconfirmed_fin.append(body)
            elif roll < 0.8:
                c.cmd(b"REQ", msg_id, "0")
                ledger.counts["REQ 0"] += 1
            elif roll < 0.9 or holds >= 5:
                delay = rng.randrange(100, 1000)
                c.cmd(b"REQ", msg_id, str(delay))
                unconfirmed_req.append((body, time.time() + delay / 1000))
                ledger.counts["REQ delay"] += 1
            else:
                held[msg_id] = body  # in flight until the crash
                holds += 1
                ledger.counts["held"] += 1
                continue
            since_confirm += 1
            if since_confirm >= 20:
                since_confirm = 0
                # a round trip: every command before it has been done (and synced)
                c.cmd(b"FIN", NO_SUCH_ID)
                frame = c.read_response()
                if frame.frame_type != FRAME_TYPE_ERROR or not frame.data.startswith(b"E_FIN_FAILED"):
                    ledger.problem(f"unexpected reply {frame}")
                    return
                with ledger.lock:
                    ledger.confirmed_fin.update((topic, channel, b) for b in unconfirmed_fin)
                    for b, due in unconfirmed_req:
                        ledger.req_due[(topic, channel, b)] = due
                    ledger.counts["FIN confirmed"] += len(unconfirmed_fin)
                unconfirmed_fin.clear()
                unconfirmed_req.clear()
        c.close()
    except (OSError, ConnectionError):
        pass  # killed
    except AssertionError as exc:  # an error frame where a message was expected
        ledger.problem(f"run {run} {topic}/{channel}: {exc}")


def pauser(d: Daemon, stop: threading.Event, rng: random.Random) -> None:
    try:
        while not stop.wait(rng.uniform(0.05, 0.3)):
            d.http("POST", f"/topic/{rng.choice(('pause', 'unpause'))}?topic={TOPICS[1]}", timeout=2)
    except OSError:
        pass


def test_crash_loop_sync_mode(tmp_path):
    seed = int(os.environ.get("CRASH_SEED", str(random.randrange(1 << 30))))
    print(f"\ncrash loop: CRASH_SEED={seed} CRASH_ROUNDS={ROUNDS}")
    rng = random.Random(seed)
    ledger = Ledger()
    args = ("--sync-every=1", "--log-level=info")
    started = time.monotonic()
    for run in range(ROUNDS + 1):
        final = run == ROUNDS
        d = start_nsqd(str(tmp_path), *args)
        if run == 0:
            for topic in TOPICS:
                for channel in CHANNELS:
                    d.http("POST", f"/topic/create?topic={topic}")
                    d.http("POST", f"/channel/create?topic={topic}&channel={channel}")
        if final:
            d.http("POST", f"/topic/unpause?topic={TOPICS[1]}")
        stop = threading.Event()
        threads = [
            threading.Thread(target=consumer, args=(d, run, t, c, ledger, stop, random.Random(rng.random()), final))
            for t in TOPICS
            for c in CHANNELS
        ]
        if not final:
            threads += [
                threading.Thread(target=publisher, args=(d, t, f"{t}.r{run}", ledger, stop, random.Random(rng.random())))
                for t in TOPICS
            ]
            threads.append(threading.Thread(target=pauser, args=(d, stop, random.Random(rng.random()))))
        for th in threads:
            th.start()
        try:
            if final:
                # everything acknowledged comes out, then nothing else is left
                def complete() -> bool:
                    with ledger.lock:
                        if any(not ledger.acked[t] <= ledger.delivered[(t, c)] for t in TOPICS for c in CHANNELS):
                            return False
                    stats = d.stats()["topics"]
                    return all(
                        t["depth"] == 0 and all(c["depth"] == c["in_flight_count"] == c["deferred_count"] == 0 for c in t["channels"])
                        for t in stats
                    )

                wait_for(complete, timeout=90, interval=0.2, message="every acknowledged message delivered")
                stop.set()
                for th in threads:
                    th.join(10)
                assert d.stop() == 0
            else:
                time.sleep(rng.uniform(0.4, 2.0))  # the random moment of the crash, not a synchronisation
                d.kill()
                stop.set()
                for th in threads:
                    th.join(10)
        finally:
            stop.set()
            d.kill()
        assert not any(th.is_alive() for th in threads)
        assert not ledger.problems, ledger.problems[:10]
    missing = {
        (t, c): len(ledger.acked[t] - ledger.delivered[(t, c)]) for t in TOPICS for c in CHANNELS if ledger.acked[t] - ledger.delivered[(t, c)]
    }
    assert not missing, missing
    acked = sum(len(v) for v in ledger.acked.values())
    figures = ", ".join(f"{k} {v}" for k, v in sorted(ledger.counts.items()))
    print(f"crash loop: {ROUNDS} kill -9 rounds in {time.monotonic() - started:.1f}s, {acked} messages acknowledged, {figures}")
    assert acked > 0 and ledger.counts["FIN confirmed"] > 0
