"""The programs in ``examples/``, run as their docstrings say -- subprocesses
with command-line flags -- against real pynsqd (and pynsqlookupd) daemons,
fed real input, with exact results checked.  Every wait is on a condition
(nsqd's /stats, the programs' output) with a deadline."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers import Daemon, http_request, start_nsqd, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = [
    "offload_work/web.py",
    "offload_work/worker.py",
    "word_count/splitter.py",
    "word_count/counter.py",
    "metrics_aggregator/aggregator.py",
    "metrics_aggregator/generate.py",
]


class Example:
    """One example program as a subprocess; stdout and stderr go to files
    (no pipe to fill up), read back whenever a test looks."""

    def __init__(self, tmp: Path, name: str, script: str, *args: str) -> None:
        self.name = name
        self.out_path = tmp / f"{name}.stdout"
        self.err_path = tmp / f"{name}.stderr"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / script), *args], stdout=out, stderr=err)

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.stderr()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, as Ctrl-C would: the program stops gracefully, exit 0."""
        self.check_running()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout}s:\n{self.stderr()}") from None
        assert self.proc.returncode == 0, f"{self.name} exited with {self.proc.returncode}:\n{self.stderr()}"


@pytest.fixture
def start(tmp_path):
    started: list[Example] = []

    def start_example(name: str, script: str, *args: str) -> Example:
        example = Example(tmp_path, name, script, *args)
        started.append(example)
        return example

    yield start_example
    for example in started:
        if example.proc.poll() is None:
            example.proc.kill()
            example.proc.wait(10)


def channel(nsqd: Daemon, topic: str, name: str) -> dict[str, Any]:
    for t in nsqd.stats(topic)["topics"]:
        if t["topic_name"] == topic:
            for c in t["channels"]:
                if c["channel_name"] == name:
                    return c
    return {}


def drained(nsqd: Daemon, topic: str, name: str, count: int) -> bool:
    """``count`` messages reached the channel and every one is finished."""
    c = channel(nsqd, topic, name)
    return c.get("message_count") == count and c["depth"] == c["in_flight_count"] == c["deferred_count"] == 0


def subscribed(nsqd: Daemon, topic: str, name: str, clients: int, *examples: Example) -> bool:
    """``clients`` consumers on the channel, each ready for messages (RDY > 0)."""
    for example in examples:
        example.check_running()
    c = channel(nsqd, topic, name)
    return c.get("client_count") == clients and all(cl["ready_count"] > 0 for cl in c["clients"])


def test_every_example_documents_how_to_run_it_and_has_flags(tmp_path) -> None:
    procs = {s: subprocess.Popen([sys.executable, str(EXAMPLES / s), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in SCRIPTS}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (script, err)
        source = (EXAMPLES / script).read_text()
        assert source.startswith('"""') and f"python examples/{script}" in source, script
        flags = out.decode()
        assert "--nsqd-tcp-address" in flags or "--nsqd-http-address" in flags, script


# ---------------------------------------------------------------- offload_work


def test_offload_work_jobs_done_retried_or_given_up_exactly_once(nsqd, tmp_path, start) -> None:
    failed_file = tmp_path / "failed.jsonl"
    worker = start(
        "worker", "offload_work/worker.py", f"--nsqd-tcp-address={nsqd.tcp_address}",
        "--max-attempts=3", "--requeue-delay=0.05", "--backoff-multiplier=0.01", "--max-backoff=0.1",
        "--touch-every=0.2", f"--failed-file={failed_file}", "--log-level=info",
    )
    web = start("web", "offload_work/web.py", "--http-address=127.0.0.1:0", f"--nsqd-http-address={nsqd.http_address}")

    def listening() -> str | None:
        web.check_running()
        m = re.search(r"HTTP: listening on (\S+)", web.stderr())
        return m.group(1) if m else None

    web_address = wait_for(listening, timeout=20, message="the web app listening")
    wait_for(lambda: subscribed(nsqd, "jobs", "workers", 1, worker), timeout=20, message="the worker subscribed")

    def submit(job: dict[str, Any]) -> str:
        status, body = http_request("POST", f"http://{web_address}/jobs", json.dumps(job).encode())
        assert status == 202, (status, body)
        answer = json.loads(body)
        assert answer["status"] == "queued"
        return answer["id"]

    def outcomes() -> dict[str, list[dict[str, Any]]]:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for line in worker.json_lines():
            by_id.setdefault(line["id"], []).append(line)
        return by_id

    # the request answers before the slow work could have run
    slow = submit({"name": "slow", "seconds": 1.0})
    assert slow not in outcomes()
    names = {slow: "slow"}
    for name, job in [
        ("quick-1", {}), ("quick-2", {}), ("quick-3", {}),
        ("flaky-1", {"fail_times": 2}), ("flaky-2", {"fail_times": 2}),
        ("doomed-1", {"fail_times": 1000}), ("doomed-2", {"fail_times": 1000}),
    ]:
        names[submit({"name": name, "seconds": 0.01, **job})] = name
    # a request that is not a job never reaches nsqd; a message that is not
    # JSON (from some other publisher) is given up at once
    assert http_request("POST", f"http://{web_address}/jobs", b"not json")[0] == 400
    assert nsqd.http("POST", "/pub?topic=jobs", b"garbage")[0] == 200

    def all_resolved() -> bool:
        worker.check_running()
        got = outcomes()
        resolved = {i for i, lines in got.items() if any(e["event"] in ("done", "failed") for e in lines)}
        return resolved >= set(names) | {None}

    wait_for(all_resolved, timeout=30, message="every job done or given up")
    wait_for(lambda: drained(nsqd, "jobs", "workers", 9), timeout=10, message="the jobs channel empty")
    worker.stop()
    web.stop()

    got = outcomes()
    for job_id, name in names.items():
        events = [(e["event"], e["attempts"]) for e in got[job_id]]
        if name.startswith("doomed"):
            assert events == [("retry", 1), ("retry", 2), ("retry", 3), ("failed", 3)], name
        elif name.startswith("flaky"):
            assert events == [("retry", 1), ("retry", 2), ("done", 3)], name
        else:
            assert events == [("done", 1)], name
    (garbage,) = got[None]
    assert garbage["event"] == "failed" and garbage["reason"] == "not a JSON job" and garbage["job"] == {"raw": "garbage"}

    dead = [json.loads(line) for line in failed_file.read_text().splitlines()]
    assert sorted(names.get(d["id"], d["id"]) or "garbage" for d in dead) == ["doomed-1", "doomed-2", "garbage"]
    assert all(d["reason"] == "gave up after 3 attempts" for d in dead if d["id"])

    c = channel(nsqd, "jobs", "workers")
    assert c["requeue_count"] == 2 * 2 + 2 * 3 and c["timeout_count"] == 0


# ---------------------------------------------------------------- word_count

VOCABULARY = ["nsq", "trio", "the", "a", "message", "queue", "don't", "realtime", "topic", "channel", "python", "42"]


def sentences(n: int, rng: random.Random) -> tuple[list[str], Counter[str]]:
    lines, expected = [], Counter()
    for _ in range(n):
        words = [rng.choice(VOCABULARY) for _ in range(rng.randint(1, 12))]
        expected.update(words)
        text = " ".join(w + ("," if rng.random() < 0.1 else "") for w in words)
        lines.append(text[0].upper() + text[1:] + rng.choice(".!?"))
    lines.append("-- ... !")  # no words at all
    return lines, expected


def test_word_count_two_splitters_on_one_channel_exact_totals(tmp_path, start) -> None:
    lookupd = Daemon([sys.executable, "-m", "pynsqlookupd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--broadcast-address=127.0.0.1"])
    try:
        lookupd.wait_listening()
        (tmp_path / "nsqd").mkdir()
        nsqd = start_nsqd(str(tmp_path / "nsqd"), f"--lookupd-tcp-address=127.0.0.1:{lookupd.tcp_port}", "--broadcast-address=127.0.0.1")
        try:
            run_word_count(nsqd, f"127.0.0.1:{lookupd.http_port}", tmp_path, start)
        finally:
            nsqd.stop()
    finally:
        lookupd.stop()


def run_word_count(nsqd: Daemon, lookupd_http: str, tmp_path: Path, start) -> None:
    # the topics exist, and lookupd knows it, before consumers look them up
    for topic in ("sentences", "words"):
        assert nsqd.http("POST", f"/topic/create?topic={topic}")[0] == 200

    def registered(topic: str) -> bool:
        status, body = http_request("GET", f"http://{lookupd_http}/lookup?topic={topic}")
        return status == 200 and len(json.loads(body)["producers"]) == 1

    wait_for(lambda: registered("sentences") and registered("words"), timeout=15, message="topics in lookupd")

    # one splitter finds nsqd through lookupd, the other is given it; both
    # publish their words to it
    splitters = [
        start("splitter-1", "word_count/splitter.py", f"--lookupd-http-address={lookupd_http}", f"--nsqd-tcp-address={nsqd.tcp_address}", "--max-in-flight=5"),
        start("splitter-2", "word_count/splitter.py", f"--nsqd-tcp-address={nsqd.tcp_address}", "--max-in-flight=5"),
    ]
    counter = start("counter", "word_count/counter.py", f"--lookupd-http-address={lookupd_http}", "--json", "--print-every=0.3", "--top=3")
    wait_for(lambda: subscribed(nsqd, "sentences", "splitter", 2, *splitters), timeout=20, message="two splitters subscribed")
    wait_for(lambda: subscribed(nsqd, "words", "counter", 1, counter), timeout=20, message="the counter subscribed")

    lines, expected = sentences(300, random.Random(7))
    feed = subprocess.run(
        [sys.executable, "-m", "pynsqd.client.tools.to_nsq", "--topic=sentences", f"--nsqd-tcp-address={nsqd.tcp_address}"],
        input="\n".join(lines).encode(), capture_output=True, timeout=30,
    )
    assert feed.returncode == 0, feed.stderr

    total = sum(expected.values())
    wait_for(lambda: drained(nsqd, "sentences", "splitter", len(lines)), timeout=30, message="every sentence split")
    wait_for(lambda: drained(nsqd, "words", "counter", total), timeout=30, message="every word counted")
    for example in (*splitters, counter):
        example.stop()

    done = [s.json_lines()[-1] for s in splitters]
    assert sum(d["sentences"] for d in done) == len(lines)
    assert sum(d["words"] for d in done) == total
    # both did a share: 301 sentences arrive at once, each splitter has 5 in flight at most
    assert all(d["sentences"] > 0 for d in done), done

    reports = counter.json_lines()
    final = reports[-1]
    assert final["counts"] == dict(expected) and final["words"] == total and final["distinct"] == len(VOCABULARY)
    assert list(final["counts"]) == [w for w, _ in sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))]


# ---------------------------------------------------------------- metrics_aggregator


def test_metrics_aggregator_per_route_counts_and_latency_averages(nsqd, tmp_path, start) -> None:
    json_out = tmp_path / "aggregates.json"
    aggregator = start(
        "aggregator", "metrics_aggregator/aggregator.py", f"--nsqd-tcp-address={nsqd.tcp_address}",
        f"--json-out={json_out}", "--print-every=0.3",
    )
    wait_for(lambda: subscribed(nsqd, "access_log", "aggregator", 1, aggregator), timeout=20, message="the aggregator subscribed")

    gen = subprocess.run(
        [sys.executable, str(EXAMPLES / "metrics_aggregator/generate.py"), f"--nsqd-http-address={nsqd.http_address}",
         "--count=500", "--batch=64", "--seed=11", "--echo"],
        capture_output=True, timeout=30,
    )
    assert gen.returncode == 0, gen.stderr
    events = [json.loads(line) for line in gen.stdout.decode().splitlines()]
    assert len(events) == 500
    for bad in (b"not json", b'{"route": "/login"}', b"[1, 2]", b'{"route": "/", "status": 200, "latency_ms": "slow"}'):
        assert nsqd.http("POST", "/pub?topic=access_log", bad)[0] == 200

    wait_for(lambda: drained(nsqd, "access_log", "aggregator", 504), timeout=30, message="every event consumed")
    aggregator.stop()

    expected: dict[str, dict[str, Any]] = {}
    latencies: dict[str, list[float]] = {}
    for e in events:
        key = f"{e['method']} {e['route']}"
        r = expected.setdefault(key, {"count": 0, "errors": 0})
        r["count"] += 1
        r["errors"] += e["status"] >= 500
        latencies.setdefault(key, []).append(e["latency_ms"])
    got = json.loads(json_out.read_text())
    assert got["events"] == 500 and got["invalid"] == 4
    assert set(got["routes"]) == set(expected) and len(expected) == 5
    for key, r in expected.items():
        g = got["routes"][key]
        assert (g["count"], g["errors"]) == (r["count"], r["errors"]), key
        assert g["avg_ms"] == pytest.approx(sum(latencies[key]) / len(latencies[key]), rel=1e-12), key
        assert g["max_ms"] == max(latencies[key]), key

    table = aggregator.stdout().split("\n\n")[-2]  # the last report, printed on exit
    assert table.splitlines()[0].split() == ["route", "requests", "5xx", "avg", "ms", "max", "ms"]
    assert table.splitlines()[-1] == "500 events, 4 invalid"
    rows = {" ".join(line.split()[:2]): int(line.split()[2]) for line in table.splitlines()[1:-1]}
    assert rows == {key: r["count"] for key, r in expected.items()}
