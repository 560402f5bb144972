#!/usr/bin/env python3
"""side_by_side: the same workloads against pynsqd and another nsqd binary
(Go nsqd 1.3.0 by default), back to back in one run, printed as ratios.

    python bench/side_by_side.py                       # 3 rounds, ../shared/go-nsq-1.3.0 when present
    python bench/side_by_side.py --rounds 5 --workloads=mpub,consume
    python bench/side_by_side.py --other-nsqd=/usr/local/bin/nsqd --bench-tools=/usr/local/bin

The load is Go's own ``bench_writer``/``bench_reader`` where they are found
(``--bench-tools``), else nsq_bench's raw-socket workers doing the same thing
(one MPUB in flight per connection, one connection per core).  Each round
runs every workload against both daemons in turn, alternating which goes
first, each on a fresh daemon with a temp data dir; a round's ratio compares
two runs a few seconds apart, and the table gives the median of the rounds.

Workloads:

* ``mpub``: bench_writer MPUB x ``--batch`` of ``--size`` B for ``--runfor``,
  daemon with ``--mem-queue-size=10000000`` (everything in memory);
* ``consume``: bench_reader (one connection per core, RDY 2500, FIN per
  message) for ``--runfor`` on the backlog ``mpub`` just left (same daemon);
* ``spill``: bench_writer against a daemon on default flags (past 10,000
  messages to the disk queue);
* ``pub``: one PUB at a time on one connection, each OK awaited, for ``--runfor``
  (``--pin same|apart``: the daemon and the client on one CPU, or on two);
* ``rss``: RSS growth for ``--rss-messages`` held in the in-memory queue,
  scaled to MiB per million (lower is better, so its ratio is Go / pynsqd).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nsq_bench as nb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _go_dir() -> Path:
    """Go NSQ 1.3.0's folder: $GO_NSQ_DIR, else shared/go-nsq-1.3.0 in the
    nearest folder above the repository that has one (work trees sit deeper)."""
    if os.environ.get("GO_NSQ_DIR"):
        return Path(os.environ["GO_NSQ_DIR"])
    for parent in REPO.parents:
        if (parent / "shared" / "go-nsq-1.3.0").is_dir():
            return parent / "shared" / "go-nsq-1.3.0"
    return REPO.parent / "shared" / "go-nsq-1.3.0"


DEFAULT_GO_DIR = _go_dir()
WORKLOADS = ("mpub", "consume", "spill", "pub", "rss")
# what the issue asks of each ratio (pynsqd / other; rss: other / pynsqd)
GOALS = {"mpub": 1.0, "consume": 1.0, "spill": 1.5, "pub": 1.0, "rss": 1.0}
MEM_QUEUE_SIZE = 10_000_000
_OPS_RE = re.compile(r"([0-9.]+)ops/s")


class Daemon:
    """One spawned daemon (nsq_bench's SpawnedDaemon) with what a workload needs."""

    def __init__(self, cmd: list[str], flags: list[str]) -> None:
        self.spawned = nb.spawn_listening(cmd, flags)
        self.tcp = self.spawned.addresses["TCP"]
        self.http = self.spawned.addresses["HTTP"]

    def sample(self) -> dict[str, Any]:
        return nb.proc_sample(self.spawned.pid) or {}

    def topic(self, name: str) -> dict[str, Any]:
        return nb.topic_stats(self.http, name) or {}

    def stop(self, topics: list[str]) -> None:
        # deleting first: a graceful stop would write gigabytes of memory queue to disk
        for t in topics:
            try:
                nb.http_call(self.http, "POST", f"/topic/delete?topic={t}")
            except (OSError, nb.BenchError):
                pass
        self.spawned.stop(60)


class Load:
    """bench_writer/bench_reader, or nsq_bench's workers when they are missing."""

    def __init__(self, tools: Path | None, size: int, batch: int, runfor: float, pin: str = "") -> None:
        self.writer = tools / "bench_writer" if tools and (tools / "bench_writer").exists() else None
        self.reader = tools / "bench_reader" if tools and (tools / "bench_reader").exists() else None
        self.size, self.batch, self.runfor = size, batch, runfor
        self.pin = pin

    def describe(self) -> dict[str, str]:
        return {"writer": str(self.writer or "nsq_bench._mpub_worker (window 1, one per core)"),
                "reader": str(self.reader or "nsq_bench._consumer_worker (one per core)")}

    def _go(self, binary: Path, d: Daemon, *args: str) -> float:
        cmd = [str(binary), f"-nsqd-tcp-address={nb.fmt_addr(d.tcp)}", f"-size={self.size}",
               f"-runfor={self.runfor}s", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.runfor + 60)
        found = _OPS_RE.findall(proc.stderr + proc.stdout)
        if proc.returncode != 0 or not found:
            raise nb.BenchError(f"{binary.name} failed ({proc.returncode}): {(proc.stderr + proc.stdout)[-500:]}")
        return float(found[-1])

    def _cfg(self, d: Daemon, topic: str, role: str) -> dict[str, Any]:
        return {"role": role, "tcp": d.tcp, "http": d.http, "topic": topic, "channel": "ch",
                "payload": b"b" * self.size, "time_limit": self.runfor, "grace": 10.0}

    def mpub(self, d: Daemon, topic: str) -> float:
        if self.writer is not None:
            return self._go(self.writer, d, f"-topic={topic}", f"-batch-size={self.batch}")
        cfg = {**self._cfg(d, topic, "writer"), "batch": self.batch, "count": 10**9, "window": 1, "expected": None}
        return self._workers([(nb._mpub_worker, cfg)] * (os.cpu_count() or 1), "writer")

    def consume(self, d: Daemon, topic: str, backlog: int) -> float:
        if self.reader is not None:
            return self._go(self.reader, d, f"-topic={topic}", "-channel=ch", "-rdy=2500")
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        shared, expected = ctx.Value("q", 0), ctx.Value("q", backlog)
        cfg = {**self._cfg(d, topic, "reader"), "rdy": 2500, "shared_count": shared, "expected": expected,
               "idle_timeout": 10.0}
        return self._workers([(nb._consumer_worker, cfg)] * (os.cpu_count() or 1), "reader")

    def pub(self, d: Daemon, topic: str) -> float:
        cfg = {**self._cfg(d, topic, "writer"), "count": 10**9}
        if self.pin:
            daemon_cpu, cfg["cpu"] = pin_cpus(self.pin)
            pin_process(d.spawned.pid, daemon_cpu)
        return self._workers([(nb._pub_worker, cfg)], "writer")

    def fill(self, d: Daemon, topic: str, count: int) -> None:
        cfg = {**self._cfg(d, topic, "writer"), "batch": self.batch, "window": 4, "expected": None,
               "time_limit": 120.0}
        specs = [(nb._mpub_worker, {**cfg, "count": n}) for n in nb._split(count, 2)]
        results, _ = nb.run_workers(specs, hard_timeout=180)
        agg = nb.aggregate(results, "writer", self.size)
        if agg["errors"] or agg["messages"] != count:
            raise nb.BenchError(f"filling {count} messages: {agg['messages']} acked, {agg['errors'][:2]}")

    def _workers(self, specs: list[tuple[Any, dict[str, Any]]], role: str) -> float:
        results, _ = nb.run_workers(specs, hard_timeout=self.runfor + 40)
        agg = nb.aggregate(results, role, self.size)
        if agg["errors"] and not agg["messages"]:
            raise nb.BenchError("; ".join(agg["errors"][:2]))
        return agg["msgs_per_s"]


def pin_cpus(pin: str) -> tuple[int, int]:
    """(daemon CPU, client CPU) for ``--pin``: ``same`` puts both on the last
    CPU (a round trip is then the two processes' CPU time, as on a machine
    whose other cores are busy), ``apart`` on the last and the first (every
    answer wakes the other core)."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1], cpus[-1]) if pin == "same" else (cpus[-1], cpus[0])


def pin_process(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` onto ``cpu`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def _cpu_pct(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    if not before or not after or after["t"] <= before["t"]:
        return None
    return 100.0 * (after["cpu_s"] - before["cpu_s"]) / (after["t"] - before["t"])


def run_daemon(name: str, cmd: list[str], load: Load, workloads: list[str], rss_messages: int) -> dict[str, Any]:
    """Every workload once against fresh daemons started with ``cmd``."""
    out: dict[str, Any] = {}
    tag = f"{name}_{os.getpid()}_{int(time.monotonic() * 1000) % 10**6}"
    in_memory = [f"--mem-queue-size={MEM_QUEUE_SIZE}"]

    def on_fresh_daemon(key: str, flags: list[str], fn: Any) -> None:
        """``fn(daemon, topic)`` on a daemon of its own; what it raises is that workload's error."""
        topic = f"sbs_{key}_{tag}"
        try:
            d = Daemon(cmd, flags)
            try:
                fn(d, topic)
            finally:
                d.stop([topic])
        except Exception as exc:  # noqa: BLE001 - one workload failing must not lose the others
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}

    def mpub_consume(d: Daemon, topic: str) -> None:
        s0 = d.sample()
        rate = load.mpub(d, topic)
        s1 = d.sample()
        backlog = d.topic(topic).get("depth", 0)
        if "mpub" in workloads:
            out["mpub"] = {"msgs_per_s": rate, "daemon_cpu_pct": _cpu_pct(s0, s1), "backlog": backlog}
        if "consume" in workloads:
            rate = load.consume(d, topic, backlog)
            s2 = d.sample()
            st = d.topic(topic)
            ch = nb.channel_of(st, "ch") or {}
            left = st.get("depth", 0) + ch.get("depth", 0) + ch.get("in_flight_count", 0)
            out["consume"] = {"msgs_per_s": rate, "daemon_cpu_pct": _cpu_pct(s1, s2), "backlog": backlog, "left": left}
            if left == 0 and load.reader is not None:
                out["consume"]["note"] = "backlog ran out: rate is a lower bound"

    def spill(d: Daemon, topic: str) -> None:
        s0 = d.sample()
        rate = load.mpub(d, topic)
        out["spill"] = {"msgs_per_s": rate, "daemon_cpu_pct": _cpu_pct(s0, d.sample()),
                        "backend_depth": d.topic(topic).get("backend_depth")}

    def pub(d: Daemon, topic: str) -> None:
        s0 = d.sample()
        rate = load.pub(d, topic)
        out["pub"] = {"msgs_per_s": rate, "daemon_cpu_pct": _cpu_pct(s0, d.sample()),
                      "round_trip_us": 1e6 / rate if rate else None}

    def rss(d: Daemon, topic: str) -> None:
        # the topic exists before the baseline sample: only messages count
        nb.http_call(d.http, "POST", f"/topic/create?topic={topic}")
        before = d.sample()["rss_bytes"]
        load.fill(d, topic, rss_messages)
        depth = d.topic(topic).get("depth")
        after = d.sample()["rss_bytes"]
        out["rss"] = {"mib_per_million": (after - before) / nb.MIB * 1e6 / rss_messages,
                      "rss_before_mib": before / nb.MIB, "rss_after_mib": after / nb.MIB, "depth": depth}

    if "mpub" in workloads or "consume" in workloads:
        on_fresh_daemon("mpub", in_memory, mpub_consume)
    if "spill" in workloads:
        on_fresh_daemon("spill", [], spill)
    if "pub" in workloads:
        on_fresh_daemon("pub", [], pub)
    if "rss" in workloads:
        on_fresh_daemon("rss", in_memory, rss)
    return out


def _value(entry: dict[str, Any] | None, workload: str) -> float | None:
    if not entry or "error" in entry:
        return None
    return entry["mib_per_million" if workload == "rss" else "msgs_per_s"]


def ratio(workload: str, ours: float | None, theirs: float | None) -> float | None:
    """pynsqd / other for rates; other / pynsqd for memory (above 1 is better either way)."""
    if not ours or not theirs:
        return None
    return theirs / ours if workload == "rss" else ours / theirs


def summarize(rounds: list[dict[str, Any]], workloads: list[str]) -> list[dict[str, Any]]:
    rows = []
    for w in workloads:
        ours = [_value(r["pynsqd"].get(w), w) for r in rounds]
        theirs = [_value(r["other"].get(w), w) for r in rounds]
        ratios = [ratio(w, a, b) for a, b in zip(ours, theirs)]
        ok = [x for x in ratios if x is not None]
        rows.append({
            "workload": w, "pynsqd": ours, "other": theirs, "ratios": ratios,
            "pynsqd_median": statistics.median([x for x in ours if x]) if any(ours) else None,
            "other_median": statistics.median([x for x in theirs if x]) if any(theirs) else None,
            "ratio_median": statistics.median(ok) if ok else None, "goal": GOALS[w],
            "cpu_pct": {"pynsqd": [(r["pynsqd"].get(w) or {}).get("daemon_cpu_pct") for r in rounds],
                        "other": [(r["other"].get(w) or {}).get("daemon_cpu_pct") for r in rounds]},
            "problems": [f"round {i + 1} {who}: {(r[who].get(w) or {}).get('error') or (r[who].get(w) or {}).get('note')}"
                         for i, r in enumerate(rounds) for who in ("pynsqd", "other")
                         if (r[who].get(w) or {}).get("error") or (r[who].get(w) or {}).get("note")],
        })
    return rows


LABELS = {
    "mpub": "MPUB into memory (msg/s)", "consume": "consume the backlog (msg/s)",
    "spill": "MPUB spilling to disk (msg/s)", "pub": "PUB one at a time (msg/s)",
    "rss": "RSS per 1M in-memory msgs (MiB)",
}


def format_table(rows: list[dict[str, Any]], other_name: str) -> str:
    def num(x: float | None, w: str) -> str:
        if x is None:
            return "-"
        return f"{x:,.0f}"

    lines = [f"| workload | pynsqd (median) | {other_name} (median) | ratio (median) | ratios per round | goal |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        w = r["workload"]
        rr = " · ".join("-" if x is None else f"{x:.2f}" for x in r["ratios"])
        med = "-" if r["ratio_median"] is None else f"**{r['ratio_median']:.2f}**"
        goal = f"≥ {r['goal']:.1f}" if w != "rss" else "≥ 1.0 (Go/py)"
        lines.append(f"| {LABELS[w]} | {num(r['pynsqd_median'], w)} | {num(r['other_median'], w)} | {med} | {rr} | {goal} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other-nsqd", default=str(DEFAULT_GO_DIR / "nsqd"),
                   help="the nsqd (command line) to compare with (default: Go's, from shared/go-nsq-1.3.0)")
    p.add_argument("--bench-tools", default=str(DEFAULT_GO_DIR),
                   help="folder with Go's bench_writer/bench_reader (else nsq_bench's workers)")
    p.add_argument("--pynsqd-cmd", default=f"{shlex.quote(sys.executable)} -m pynsqd")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runfor", type=float, default=4.0, help="seconds per measured workload")
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--rss-messages", type=int, default=1_000_000)
    p.add_argument("--pin", choices=("same", "apart"), default="",
                   help="pub only: pin the daemon (every thread) and the pub client to one CPU (same) or two (apart), "
                        "the two cases an unpinned run mixes (see bench/README.md)")
    p.add_argument("--json-out")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    workloads = [w for w in opts.workloads.split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        print(f"unknown workloads {bad}; choose from {WORKLOADS}", file=sys.stderr)
        return 2
    other = shlex.split(opts.other_nsqd)
    if not other or shutil.which(other[0]) is None:
        print(f"no nsqd at {opts.other_nsqd}: nothing to compare with (--other-nsqd)", file=sys.stderr)
        return 2
    tools = Path(opts.bench_tools) if opts.bench_tools else None
    if opts.pin == "apart" and len(os.sched_getaffinity(0)) < 2:
        print("--pin=apart needs two CPUs", file=sys.stderr)
        return 2
    load = Load(tools, opts.size, opts.batch, opts.runfor, opts.pin)
    cmds = {"pynsqd": shlex.split(opts.pynsqd_cmd), "other": other}
    report: dict[str, Any] = {
        "tool": "side_by_side", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/side_by_side.py", *(argv or sys.argv[1:])]),
        "machine": nb.machine_info(), "git": nb.git_info(), "load": load.describe(), "daemons": cmds,
        "settings": vars(opts), "rounds": [],
    }
    for i in range(opts.rounds):
        # alternate who goes first: a slow drift of the machine's load favours neither
        order = ["pynsqd", "other"] if i % 2 == 0 else ["other", "pynsqd"]
        rnd: dict[str, Any] = {"loadavg_start": os.getloadavg()}
        for who in order:
            print(f"[side_by_side] round {i + 1}/{opts.rounds}: {who}", file=sys.stderr, flush=True)
            rnd[who] = run_daemon(who, cmds[who], load, workloads, opts.rss_messages)
            print(f"[side_by_side]   {json.dumps(rnd[who], default=str)}", file=sys.stderr, flush=True)
        rnd["loadavg_end"] = os.getloadavg()
        report["rounds"].append(rnd)
    rows = summarize(report["rounds"], workloads)
    report["summary"] = rows
    loads = [r["loadavg_start"][0] for r in report["rounds"]] + [report["rounds"][-1]["loadavg_end"][0]]
    is_go = Path(other[0]).resolve() == (DEFAULT_GO_DIR / "nsqd").resolve()
    print(format_table(rows, "Go nsqd" if is_go else Path(other[0]).name))
    print(f"\nload: {load.describe()['writer']} / {load.describe()['reader']}; "
          f"1-min load average {min(loads):.2f}-{max(loads):.2f} over the run")
    if opts.pin:
        daemon_cpu, client_cpu = pin_cpus(opts.pin)
        print(f"pub pinned ({opts.pin}): daemon on CPU {daemon_cpu}, client on CPU {client_cpu}")
    for r in rows:
        for p in r["problems"]:
            print(f"{r['workload']}: {p}")
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if all(r["ratio_median"] is not None for r in rows) else 3


if __name__ == "__main__":
    raise SystemExit(main())
