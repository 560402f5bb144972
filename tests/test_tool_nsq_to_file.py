"""pynsq_to_file end to end against a real pynsqd: 100,000 messages archived
with gzip and size rotation, the tool killed (-9) in the middle and started
again, every message in the files afterwards; time rotation, SIGHUP, the
work dir, file naming, and Go's nsq_to_file against pynsqd."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from helpers import Daemon, channel_stats, create_channel, go_binary, mpub_http, tool_command, wait_for, wait_drained
from pynsqd.client.tools.nsq_to_file import FileLogger, ToFileOptions, check, filename_format

N = 100_000


def read_archive(path: Path) -> tuple[list[bytes], bool]:
    """The lines of a (possibly gzipped) archive file, and whether it ended
    cleanly: a gzip member cut short by a kill (no trailer) is read up to
    the cut, as those lines were never finished (FIN) and come again."""
    data = path.read_bytes()
    if not path.name.endswith(".gz"):
        return data.splitlines(), data.endswith(b"\n") or not data
    out = bytearray()
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            out += d.decompress(data)
        except zlib.error:
            return bytes(out).splitlines(), False
        if not d.eof:
            out += d.flush()
            return bytes(out).splitlines(), False
        data = d.unused_data
    return bytes(out).splitlines(), True


def archive_lines(*dirs: Path) -> tuple[Counter, list[Path]]:
    lines: Counter = Counter()
    files = sorted(p for d in dirs for p in d.rglob("*") if p.is_file())
    for f in files:
        got, _ = read_archive(f)
        lines.update(got)
    return lines, files


def start_tool(*args: str) -> Daemon:
    return Daemon([*tool_command("nsq_to_file"), *args])



def test_filename_format_and_checks(tmp_path):
    opts = ToFileOptions(output_dir=str(tmp_path), topics=["t"], nsqd_tcp_addresses=["x:1"])
    # no rotation, no gzip: <REV> is dropped, one file per <DATETIME>, appended to
    assert filename_format(opts, "t", "host.example.com", 7) == "t.host.<DATETIME>.log"
    gz = ToFileOptions(output_dir=str(tmp_path), gzip=True, host_identifier="<SHORT_HOST>-<HOSTNAME>", filename_format="<TOPIC>-<PID>-<HOST><REV>")
    assert filename_format(gz, "t", "host.example.com", 7) == "t-7-host-host.example.com<REV>.gz"
    bad = ToFileOptions(output_dir=str(tmp_path), topics=["t"], nsqd_tcp_addresses=["x:1"], rotate_size=10, filename_format="<TOPIC>.log")
    assert check(bad) == "missing <REV> in --filename-format when gzip, rotation, or work dir enabled"
    assert check(ToFileOptions(topics=["t"])) == "--nsqd-tcp-address or --lookupd-http-address required."
    assert check(ToFileOptions(nsqd_tcp_addresses=["x:1"])) == "--topic or --topic-pattern required"
    assert check(ToFileOptions(topic_pattern="a", nsqd_tcp_addresses=["x:1"])) == "--lookupd-http-address must be specified when no --topic specified"
    assert check(ToFileOptions(topics=["t"], nsqd_tcp_addresses=["x:1"], gzip_level=12)) == "invalid --gzip-level value (12), should be 1-9"
    assert check(ToFileOptions(topics=["t"], nsqd_tcp_addresses=["x:1"], sync_interval=0)) == "--sync-interval must be positive"


def test_file_logger_rotates_by_size_and_datetime_and_never_overwrites(tmp_path):
    """The FileLogger alone, on a fake clock: Go's <REV> numbering."""
    now = [1_700_000_000.0]
    opts = ToFileOptions(output_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), rotate_size=20, datetime_format="%Y%m%d%H%M")
    import logging

    log = FileLogger(opts, "t", logging.getLogger("test"), clock=lambda: now[0], hostname="h")
    (tmp_path / "out").mkdir()
    first = log.current_filename().replace("<REV>", "-000000")
    (tmp_path / "out" / first).write_text("a file from before\n")  # taken: skipped, not overwritten
    for i in range(6):
        if log.needs_rotation():
            log.rotate()
        log.write(b"line %d 123456\n" % i)  # 15 bytes: a new file after every second line
    now[0] += 60  # a new <DATETIME>: <REV> starts again at 0
    assert log.needs_rotation()
    log.rotate()
    log.write(b"next minute\n")
    log.close()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not list((tmp_path / "work").iterdir())
    stamp0 = time.strftime("%Y%m%d%H%M", time.localtime(1_700_000_000.0))
    stamp1 = time.strftime("%Y%m%d%H%M", time.localtime(1_700_000_060.0))
    assert names == sorted([f"t.h-00000{r}.{stamp0}.log" for r in range(4)] + [f"t.h-000000.{stamp1}.log"])
    assert (tmp_path / "out" / first).read_text() == "a file from before\n"
    assert (tmp_path / "out" / f"t.h-000001.{stamp0}.log").read_text() == "line 0 123456\nline 1 123456\n"


def test_100k_messages_archived_through_a_kill_and_restart(nsqd, unique, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    create_channel(nsqd, unique, "archive")
    bodies = [b"msg-%06d" % i for i in range(N)]
    mpub_http(nsqd, unique, bodies)
    args = [
        f"--topic={unique}", "--channel=archive", f"--nsqd-tcp-address={nsqd.tcp_address}",
        f"--output-dir={out}", f"--work-dir={work}", "--gzip", "--rotate-size=300000", "--log-level=debug",
    ]
    started = time.monotonic()
    tool = start_tool(*args)
    try:
        # let it get a good way in, then kill it without warning
        wait_for(lambda: channel_stats(nsqd, unique, "archive")["depth"] < N * 2 // 3, timeout=60, message="a third archived")
        tool.kill()
        tool = start_tool(*args)  # a second run picks up what was not finished
        wait_drained(nsqd, unique, "archive")
        elapsed = time.monotonic() - started
        assert tool.stop(signal.SIGTERM) == 0, "\n".join(tool.lines[-20:])
    finally:
        tool.kill()
    lines, files = archive_lines(out, work)
    missing = set(bodies) - set(lines)
    assert not missing, f"{len(missing)} messages lost, e.g. {sorted(missing)[:3]}"
    assert set(lines) == set(bodies)
    # a message comes twice only if the kill caught it written but not yet fsynced + FINished
    duplicates = sum(lines.values()) - N
    assert duplicates <= 2 * 200, duplicates
    # the first run's last file stays in the work dir (killed: never closed), as Go leaves it;
    # everything the second run wrote was closed and moved out
    assert len(list(work.rglob("*.gz"))) <= 1
    assert len(files) >= 3  # rotated by size
    for f in out.iterdir():
        assert read_archive(f)[1], f"{f.name} not closed cleanly"
        assert f.name.startswith(f"{unique}.") and f.name.endswith(".log.gz")
    print(f"\npynsq_to_file: {N} messages in {elapsed:.1f}s with a kill and restart ({N / elapsed:,.0f} msg/s), {duplicates} written twice")


def test_time_rotation_sighup_and_sync_on_exit(nsqd, unique, tmp_path):
    create_channel(nsqd, unique, "c")
    tool = start_tool(f"--topic={unique}", "--channel=c", f"--nsqd-tcp-address={nsqd.tcp_address}", f"--output-dir={tmp_path}",
                      "--rotate-interval=300ms", "--sync-interval=100ms", "--skip-empty-files", "--log-level=debug")
    try:
        def count(word: str) -> int:
            return sum(word in line for line in tool.lines)

        mpub_http(nsqd, unique, [b"one-%d" % i for i in range(10)])
        wait_for(lambda: count("opening") == 1, message="first file")
        # older than --rotate-interval, the file is closed on a --sync-interval
        # tick (--skip-empty-files: no empty successor is opened)
        wait_for(lambda: count("closing") == 1, message="first file closed by time")
        mpub_http(nsqd, unique, [b"two-%d" % i for i in range(10)])
        wait_for(lambda: count("opening") == 2, message="second file")
        wait_drained(nsqd, unique, "c")
        os.kill(tool.proc.pid, signal.SIGHUP)  # logrotate: close now, reopen on the next message
        wait_for(lambda: count("SIGHUP") == 1 and count("closing") >= 2, message="SIGHUP handled")
        mpub_http(nsqd, unique, [b"three-%d" % i for i in range(10)])
        wait_for(lambda: count("opening") == 3, message="third file")
        wait_drained(nsqd, unique, "c")
        assert tool.stop(signal.SIGTERM) == 0
    finally:
        tool.kill()
    files = sorted(tmp_path.iterdir())
    contents = [f.read_bytes().splitlines() for f in files]
    assert [len(c) for c in contents] == [10, 10, 10], [f.name for f in files]
    assert sorted(b for c in contents for b in c) == sorted([b"%s-%d" % (w, i) for w in (b"one", b"two", b"three") for i in range(10)])
    assert [f.name.split(".")[1] for f in files] == ["%s-00000%d" % (socket.gethostname().split(".")[0], r) for r in range(3)]


def test_go_nsq_to_file_archives_from_pynsqd(nsqd, unique, tmp_path):
    """Go's nsq_to_file, unchanged, against pynsqd (as the README says)."""
    binary = go_binary("nsq_to_file")
    create_channel(nsqd, unique, "nsq_to_file")
    bodies = [b"go-%05d" % i for i in range(10_000)]
    mpub_http(nsqd, unique, bodies)
    go = Daemon([binary, f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}", f"--output-dir={tmp_path}", "--gzip", "--rotate-size=50000",
                 "--sync-interval=1s"])  # Go finishes a tail of fewer than 85% of RDY only on this tick
    try:
        wait_drained(nsqd, unique, "nsq_to_file")
        go.stop(signal.SIGTERM)
    finally:
        go.kill()
    lines, files = archive_lines(tmp_path)
    assert set(lines) == set(bodies) and sum(lines.values()) == len(bodies)
    assert len(files) > 1 and all(f.name.endswith(".log.gz") for f in files)
    assert gzip.decompress(files[0].read_bytes()).startswith(b"go-")


@pytest.mark.parametrize("args, message", [
    (["--topic=bad topic"], "pynsq_to_file: invalid topic name 'bad topic'"),
    (["--topic=ok", "--gzip", "--filename-format=<TOPIC>.log"], "pynsq_to_file: missing <REV> in --filename-format when gzip, rotation, or work dir enabled"),
    (["--topic=ok", "--nsqd-tcp-address=127.0.0.1:1"], "pynsq_to_file: cannot connect to nsqd 127.0.0.1:1: [Errno 111] Connection refused"),
])
def test_bad_settings_stop_at_start(nsqd, tmp_path, args, message):
    import subprocess

    if not any(a.startswith("--nsqd-tcp-address") for a in args):
        args = [*args, f"--nsqd-tcp-address={nsqd.tcp_address}"]
    p = subprocess.run([*tool_command("nsq_to_file"), *args, f"--output-dir={tmp_path}"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1] == message
    assert "Traceback" not in p.stderr


def test_a_message_that_cannot_be_written_stops_the_tool_and_stays_queued(nsqd, unique, tmp_path):
    """As Go's nsq_to_file ("FATAL: unable to create dir"), exit 1 with one
    line: never carry on failing until the messages are given up (lost)."""
    import subprocess

    create_channel(nsqd, unique, "c")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    mpub_http(nsqd, unique, [b"kept-1", b"kept-2"])
    p = subprocess.run([*tool_command("nsq_to_file"), f"--topic={unique}", "--channel=c", f"--nsqd-tcp-address={nsqd.tcp_address}",
                        f"--output-dir={not_a_dir}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines()[-1].startswith("pynsq_to_file: ") and "File exists" in p.stderr.splitlines()[-1]
    wait_for(lambda: channel_stats(nsqd, unique, "c")["in_flight_count"] == 0, message="nothing left in flight")
    c = channel_stats(nsqd, unique, "c")
    assert c["depth"] == 2 and c["message_count"] == 2


# a first SIGTERM read, then a second one still unread when the receiver
# closes: trio hands it back to the handler it restores
_SECOND_SIGNAL = """
import signal, sys, trio
from pynsqd.client.tools.common import stop_signal_receiver

async def main():
    with stop_signal_receiver() as signals:
        signal.raise_signal(signal.SIGTERM)
        async for _ in signals:
            break
        signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)  # and any later one, while the files are closed
    await trio.sleep(0)
    return 0

sys.exit(trio.run(main))
"""


def test_signals_after_the_first_never_kill_the_stopping_tool():
    # as Go's nsq_to_file, whose signal.Notify keeps every later SIGINT/SIGTERM from being fatal
    proc = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
