"""The command-line tools pynsq_tail, pyto_nsq and pynsq_stat against a real
pynsqd, as a new user tries them: Go's flags, output and exit codes; a closed
pipe, a bad name, an nsqd that is down, an unreachable stat target."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from helpers import channel_stats, create_channel, go_nsq_binary, mpub_http, run_tool, start_nsqd, tool_command
from pynsqd.client.tools.common import CONSUMER_OPTIONS, parse_opt
from pynsqd.client.tools.nsq_stat import ChannelSample, StatError, header, row, sum_channel
from pynsqd.client.tools.to_nsq import MAX_BATCH_BYTES, batches, split_records

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("nsq_tail", "to_nsq", "nsq_stat", "nsq_to_file", "nsq_to_http", "nsq_to_nsq")
DOWN = "127.0.0.1:1"  # nothing listens on port 1


def topic_count(nsqd, topic: str) -> int:
    return sum(t["message_count"] for t in nsqd.stats(topic)["topics"] if t["topic_name"] == topic)


# ---------------------------------------------------------------- pieces


def test_split_records_and_batches():
    assert split_records(b"a\nb\n\nc", b"\n") == ([b"a", b"b"], b"c")
    assert split_records(b"x,y,", b",") == ([b"x", b"y"], b"")
    big = b"x" * (MAX_BATCH_BYTES + 1)
    assert [len(b) for b in batches([b"a", big, b"b", b"c"])] == [1, 1, 2]
    assert [len(b) for b in batches([b"a"] * 600)] == [256, 256, 88]


def test_stat_sums_channels_over_nsqds_and_formats_rows_as_go():
    doc = {"topics": [{"topic_name": "t", "channels": [{"channel_name": "c", "depth": 5, "backend_depth": 2, "in_flight_count": 1,
                                                         "deferred_count": 0, "message_count": 10, "requeue_count": 1,
                                                         "timeout_count": 0, "client_count": 2},
                                                        {"channel_name": "other", "depth": 100}]}]}
    s = sum_channel([doc, doc], "t", "c")
    assert s == ChannelSample(depth=10, backend_depth=4, in_flight=2, deferred=0, requeued=2, timed_out=0, messages=20, clients=4, nsqds=2)
    # 20 arrived in 2 s, 10 of them still queued: 10/s in, 5/s out; nsq_stat's column widths
    assert row(s, ChannelSample(), 2.0) == "     10       5 |      10       6       4     2     0 |       2       0           20       4"
    assert header().splitlines() == [
        "------rate------+----------------depth----------------+--------------metadata---------------",
        "ingress  egress |   total     mem    disk inflt   def |     req     t-o         msgs clients",
    ]
    with pytest.raises(StatError, match=r"failed to find topic\(x\)"):
        sum_channel([doc], "x", "c")
    with pytest.raises(StatError, match=r"failed to find channel\(nope\) in stats metadata for topic\(t\)"):
        sum_channel([doc], "t", "nope")


def test_consumer_opt_syntax_is_go_nsqs():
    assert parse_opt("max_attempts,0", CONSUMER_OPTIONS) == ("max_attempts", 0)
    assert parse_opt("snappy", CONSUMER_OPTIONS) == ("snappy", True)  # a bare boolean
    assert parse_opt("default_requeue_delay,90s", CONSUMER_OPTIONS) == ("default_requeue_delay", 90.0)
    with pytest.raises(ValueError, match="invalid option nope"):
        parse_opt("nope,1", CONSUMER_OPTIONS)


# ---------------------------------------------------------------- names and flags


def test_every_tool_is_py_plus_its_go_name():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    tools = {name: target for name, target in scripts.items() if ".client.tools." in target}
    assert tools == {f"py{go}": f"pynsqd.client.tools.{go}:main" for go in TOOLS}
    # the old name of to_nsq is nowhere used for publishing stdin any more
    stdin_use = re.compile(r"\|\s*pynsq_to_nsq|pynsq_to_nsq[^\n|]*<\s")
    for doc in ("README.md", "client/README.md", "examples/README.md", *map(str, ROOT.glob("examples/*/*.py"))):
        assert not stdin_use.search((ROOT / doc).read_text()), doc


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    procs = {go: subprocess.Popen([*tool_command(go), "--help"], stderr=subprocess.PIPE, text=True) for go in TOOLS}
    out = {}
    for go, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        out[go] = err
    return out


def _flag_names(usage: str) -> set[str]:
    return {line.split()[0].lstrip("-") for line in usage.splitlines() if line.startswith("  -")}


@pytest.mark.parametrize("go", TOOLS)
def test_help_has_every_flag_of_the_go_tool(helps, go):
    text = helps[go]
    assert text.startswith(f"Usage of py{go}:\n")
    assert "Traceback" not in text
    binary = go_nsq_binary(go)
    if binary is None:
        pytest.skip(f"Go NSQ 1.3.0's {go} not found: nothing to compare the flags with")
    go_help = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stderr
    missing = _flag_names(go_help) - _flag_names(text)
    assert not missing, f"py{go} lacks Go's flags {sorted(missing)}"


def test_help_quotes_string_defaults(helps):
    # to_nsq's delimiter default is a newline: shown as Go shows it, not as a line break
    assert '    \tcharacter to split input from stdin (default "\\n")\n' in helps["to_nsq"]
    assert '(default "nsq_to_file")' in helps["nsq_to_file"]


# ---------------------------------------------------------------- pyto_nsq, pynsq_tail, pynsq_stat together


def test_to_nsq_then_tail_then_stat(nsqd, unique):
    create_channel(nsqd, unique, "keep")
    lines = b"".join(f"line {i}\n".encode() for i in range(30)) + b"\nno newline"
    p = run_tool("to_nsq", f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}", stdin=lines)
    assert p.returncode == 0, p.stderr
    assert topic_count(nsqd, unique) == 31

    p = run_tool("nsq_stat", f"--topic={unique}", "--channel=keep", f"--nsqd-http-address={nsqd.http_address}", "--count=2", "--interval=100ms")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode().splitlines()
    # Go's shape: header (2 lines), then one row per interval after the first poll
    assert out[1].startswith("ingress  egress |") and len(out) == 4
    assert out[2].split()[3:5] == ["31", "31"]  # total depth, in memory

    p = run_tool("nsq_tail", f"--topic={unique}", "--channel=keep", f"--nsqd-tcp-address={nsqd.tcp_address}", "-n", "5")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [f"line {i}" for i in range(5)]
    c = channel_stats(nsqd, unique, "keep")
    # exactly 5 taken; any extra that arrived was handed straight back
    assert c["depth"] == 26 and c["in_flight_count"] == 0

    p = run_tool("nsq_tail", f"--topic={unique}", "--channel=keep", f"--nsqd-tcp-address={nsqd.tcp_address}", "-n", "26", "--print-topic")
    assert p.returncode == 0, p.stderr
    shown = p.stdout.decode().splitlines()
    assert sorted(shown) == sorted([f"{unique} | line {i}" for i in range(5, 30)] + [f"{unique} | no newline"])


# ---------------------------------------------------------------- pynsq_tail


def test_tail_into_head_exits_at_once(nsqd, unique, tmp_path):
    """``pynsq_tail | head -2``: exit as soon as head is gone (141, as Go's
    nsq_tail killed by SIGPIPE), no per-message BrokenPipeError lines."""
    create_channel(nsqd, unique, "keep")
    mpub_http(nsqd, unique, [f"m{i}".encode() for i in range(20000)])
    cmd = " ".join([*tool_command("nsq_tail"), f"--topic={unique}", "--channel=keep", f"--nsqd-tcp-address={nsqd.tcp_address}"])
    started = time.monotonic()
    p = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} 2>tail.err | head -2; echo rc=${{PIPESTATUS[0]}}; cat tail.err"],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert time.monotonic() - started < 30
    lines = p.stdout.splitlines()
    assert len(lines[:2]) == 2 and all(line.startswith("m") for line in lines[:2]), p.stdout
    assert "rc=141" in lines
    assert "BrokenPipe" not in p.stdout and "Traceback" not in p.stdout
    # what was not printed went back to the channel, not lost in flight
    c = channel_stats(nsqd, unique, "keep")
    assert c["in_flight_count"] == 0 and c["depth"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topic=bad topic"], "pynsq_tail: invalid topic name 'bad topic'"),
        (["--topic=ok", "--channel=bad/channel"], "pynsq_tail: invalid channel name 'bad/channel'"),
        (["--topic=ok"], None),  # address filled in below: an nsqd that is down
        ([], "pynsq_tail: --topic required"),
    ],
)
def test_tail_fails_with_one_line(nsqd, args, message):
    address = DOWN if message is None else nsqd.tcp_address
    p = run_tool("nsq_tail", *args, f"--nsqd-tcp-address={address}", timeout=30)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert "Traceback" not in err
    if message is None:
        assert err.splitlines()[-1] == f"pynsq_tail: cannot connect to nsqd {DOWN}: [Errno 111] Connection refused"
    else:
        assert err.strip() == message


def test_tail_bad_flags_exit_2_as_go():
    p = run_tool("nsq_tail", "--bogus")
    assert p.returncode == 2 and b"flag provided but not defined: -bogus" in p.stderr
    p = run_tool("nsq_tail", "--topic=x", f"--nsqd-tcp-address={DOWN}", "--consumer-opt=nonsense,1")
    assert p.returncode == 2
    assert p.stderr.decode().strip() == 'pynsq_tail: invalid value "nonsense,1" for flag -consumer-opt: invalid option nonsense'
    p = run_tool("nsq_tail", "--topic=x")
    assert p.returncode == 1 and p.stderr.decode().strip() == "pynsq_tail: --nsqd-tcp-address or --lookupd-http-address required"



@pytest.mark.parametrize(
    "go, args",
    [
        ("nsq_tail", ["--topic=t"]),
        ("to_nsq", ["--topic=t"]),
        ("nsq_to_file", ["--topic=t", "--output-dir=."]),
        ("nsq_to_http", ["--topic=t", "--get=http://127.0.0.1:1/?m=%s"]),
        ("nsq_to_nsq", ["--topic=t", f"--destination-nsqd-tcp-address={DOWN}"]),
    ],
)
@pytest.mark.parametrize("address", ["nsqd-without-port", "127.0.0.1:99999"])
def test_a_bad_nsqd_address_is_one_line_not_a_traceback(go, args, address, tmp_path):
    flag = "--destination-nsqd-tcp-address" if go == "nsq_to_nsq" else "--nsqd-tcp-address"
    args = [a for a in args if not a.startswith(flag)] + [f"{flag}={address}"]
    if go == "nsq_to_nsq":
        args.append(f"--nsqd-tcp-address={DOWN}")
    p = subprocess.run([*tool_command(go), *args], capture_output=True, timeout=60, cwd=tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.strip() == f"py{go}: bad address {address!r}: want host:port"


# ---------------------------------------------------------------- pyto_nsq


def test_to_nsq_sends_every_line_to_every_nsqd(nsqd, tmp_path, unique):
    other = start_nsqd(str(tmp_path))
    try:
        lines = b"".join(b"%d\n" % i for i in range(5000))
        p = run_tool("to_nsq", f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}", f"--nsqd-tcp-address={other.tcp_address}", stdin=lines)
        assert p.returncode == 0, p.stderr
        assert topic_count(nsqd, unique) == 5000 and topic_count(other, unique) == 5000
    finally:
        other.stop()


@pytest.mark.parametrize(
    "stdin, args, message",
    [
        (b"x" * 2_000_000 + b"\n", [], "pyto_nsq: E_BAD_MESSAGE PUB message too big 2000000 > 1048576"),
        (b"a\n", ["--topic=bad topic"], "pyto_nsq: invalid topic name 'bad topic'"),
        (b"a\n", ["--delimiter=ab"], "pyto_nsq: --delimiter must be a single byte"),
        (b"a\n", ["down"], f"pyto_nsq: cannot connect to nsqd {DOWN}: [Errno 111] Connection refused"),
    ],
)
def test_to_nsq_fails_with_nsqds_own_words(nsqd, unique, stdin, args, message):
    address = DOWN if args == ["down"] else nsqd.tcp_address
    args = [a for a in args if a != "down"]
    if not any(a.startswith("--topic") for a in args):
        args.append(f"--topic={unique}")
    p = run_tool("to_nsq", *args, f"--nsqd-tcp-address={address}", stdin=stdin, timeout=30)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert "Traceback" not in err and "sub-exception" not in err
    assert err.splitlines()[-1] == message


# ---------------------------------------------------------------- pynsq_stat


def test_stat_never_reports_an_unreachable_or_missing_target_as_idle(nsqd, unique):
    create_channel(nsqd, unique, "c")
    cases = [
        ([f"--nsqd-http-address={DOWN}"], "pynsq_stat: ERROR: failed to get nsqd stats - nsqd 127.0.0.1:1: connect to 127.0.0.1:1 failed"),
        ([f"--lookupd-http-address={DOWN}"], "pynsq_stat: ERROR: failed to get topic producers - lookupd 127.0.0.1:1: connect to 127.0.0.1:1 failed"),
        ([f"--nsqd-http-address={nsqd.http_address}", f"--nsqd-http-address={DOWN}"], "pynsq_stat: ERROR: failed to get nsqd stats - nsqd 127.0.0.1:1"),
        ([f"--nsqd-http-address={nsqd.http_address}", "--topic=nope"], "pynsq_stat: ERROR: failed to find topic(nope) on any nsqd"),
        ([f"--nsqd-http-address={nsqd.http_address}", "--channel=nope"], f"pynsq_stat: ERROR: failed to find channel(nope) in stats metadata for topic({unique})"),
        ([f"--nsqd-http-address={nsqd.http_address}", "--count=0"], "pynsq_stat: --count should be positive"),
        ([f"--nsqd-http-address={nsqd.http_address}", "--interval=0"], "pynsq_stat: --interval should be positive"),
    ]
    procs = []
    for args, message in cases:
        argv = [f"--topic={unique}", "--channel=c", "--count=1", "--interval=100ms"]
        argv = [a for a in argv if not any(b.split("=")[0] == a.split("=")[0] for b in args)] + args
        procs.append((subprocess.Popen([*tool_command("nsq_stat"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), message))
    for proc, message in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (message, out, err)
        assert "0       0 |" not in out  # never a row of zeros
        assert err.strip().startswith(message), (message, err)


def test_stat_stops_on_sigint_and_a_vanished_nsqd_is_an_error(tmp_path, unique):
    lone = start_nsqd(str(tmp_path))
    create_channel(lone, unique, "c")
    proc = subprocess.Popen([*tool_command("nsq_stat"), f"--topic={unique}", "--channel=c", f"--nsqd-http-address={lone.http_address}", "--interval=200ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("------rate")
        lone.stop()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "ERROR: failed to get nsqd stats" in err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        lone.stop()


def test_tools_version_lines():
    for go in TOOLS:
        p = subprocess.run([*tool_command(go), "--version"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and p.stdout.startswith(f"py{go} v1.3.0-compatible"), (go, p)


@pytest.mark.parametrize("go", TOOLS)
def test_help_says_where_we_differ_from_go(helps, go):
    tail = helps[go].split("\n\n", 1)
    assert len(tail) == 2 and tail[1].startswith("Where we differ on purpose:"), helps[go][-300:]
    assert "``" not in tail[1]
