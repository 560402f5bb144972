"""Smoke test for bench/nsq_bench.py: every workload, tiny counts, against a
spawned pynsqd.  Proves the load generator runs and checks its own counts; it
measures nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "nsq_bench.py"

SMALL = [
    "--mpub-messages=4000", "--spill-messages=12000", "--pub-messages=500", "--http-messages=300",
    "--consume-messages=4000", "--pubsub-messages=4000", "--latency-rate=2000", "--latency-duration=0.5",
    "--time-limit=2", "--grace=3", "--idle-timeout=3",
]


def _import_bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import nsq_bench
    finally:
        sys.path.pop(0)
    return nsq_bench


def test_helpers() -> None:
    nb = _import_bench()
    from pynsqd.protocol import encode_command

    ids = [b"%016x" % i for i in range(5)]
    assert nb.fin_batch(ids) == b"".join(encode_command(b"FIN", i) for i in ids)
    assert nb.percentile(list(range(1, 101)), 50) == 50
    assert nb.percentile(list(range(1, 101)), 99) == 99
    assert nb.percentile([7], 90) == 7
    opts = nb.parse_options(["--spawn", "--workloads=pub,latency"])
    assert opts.workload_list == ["pub", "latency"]
    assert nb.daemon_flags(opts, "spill") == []
    assert nb.daemon_flags(opts, "mpub") == ["--mem-queue-size=1000000"]


def test_bench_all_workloads_against_spawned_pynsqd(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--spawn", "--quiet", f"--json-out={out}", *SMALL],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    report = json.loads(out.read_text())
    problems = {e["workload"]: e["errors"] + e["anomalies"] for e in report["workloads"] if not e["ok"]}
    assert proc.returncode == 0, f"rc={proc.returncode} problems={problems}\n{proc.stdout}\n{proc.stderr[-3000:]}"

    by_name = {e["workload"]: e for e in report["workloads"]}
    assert list(by_name) == ["mpub", "spill", "pub", "http_pub", "consume", "pubsub", "latency"]
    expected = {"mpub": 4000, "spill": 12000, "pub": 500, "http_pub": 300, "consume": 4000, "pubsub": 4000,
                "latency": 1000}
    for name, count in expected.items():
        e = by_name[name]
        assert e["messages"] == count, (name, e["messages"])
        assert e["msgs_per_s"] > 0 and e["mb_per_s"] > 0
        assert e["daemon"]["before"]["rss_bytes"] > 0 and e["daemon"]["cpu_s"] >= 0
        assert e["wall_s"] < 10, (name, e["wall_s"])
    assert by_name["spill"]["detail"]["topic_stats"]["backend_depth"] > 0  # went past mem-queue-size 10000
    assert by_name["consume"]["detail"]["channel_after"]["depth"] == 0
    lat = by_name["latency"]["detail"]["latency_ms"]
    assert lat["count"] == 1000 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert report["machine"]["cpu_count"] and report["machine"]["python"]
    assert "| workload" in proc.stdout and "latency" in proc.stdout


def test_client_bench_every_workload_with_tiny_counts(tmp_path: Path) -> None:
    out = tmp_path / "client.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "client_bench.py"), "--repeat=1", "--pub-messages=300", "--consume-messages=1000",
         "--time-limit=30", "--quiet", f"--json-out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    for name, w in report["workloads"].items():
        assert len(w["runs"]) == 1 and w["median"] > 0, name
    assert "| `writer_50_trio`" in proc.stdout


def test_side_by_side_runs_every_workload(tmp_path: Path) -> None:
    # pynsqd against itself, with nsq_bench's workers as the load (no Go tools
    # needed): proves the mode runs and reports; it measures nothing.  RSS
    # needs enough messages to move it by whole pages on both daemons (2000 of
    # them could leave one at +0 MiB, and a ratio with 0 is none)
    out = tmp_path / "sbs.json"
    pynsqd = f"{sys.executable} -m pynsqd"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "side_by_side.py"), f"--other-nsqd={pynsqd}", "--bench-tools=",
         "--rounds=1", "--runfor=0.5", "--rss-messages=50000", "--pin=same", f"--json-out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["workload"]: r for r in report["summary"]}
    assert list(rows) == ["mpub", "consume", "spill", "pub", "rss"]
    assert all(r["ratio_median"] and r["pynsqd_median"] and r["other_median"] for r in rows.values()), rows
    assert "| MPUB into memory (msg/s) |" in proc.stdout
    assert "pub pinned (same)" in proc.stdout
