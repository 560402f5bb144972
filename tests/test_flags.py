"""Go ``flag`` package semantics, Go durations, TOML config and the CLI exit
codes (pynsqd.flags)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqd.flags import (
    FlagError,
    HelpRequested,
    flag_field,
    flags_of,
    format_duration,
    parse_bool,
    parse_duration,
    parse_flags,
    resolve,
    run_cli,
    usage,
)
from pynsqd.options import NSQD_FLAGS, Options

FAST = settings(max_examples=100, deadline=None)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str):
    return parse_flags(NSQD_FLAGS, list(argv))


# ---------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    "argv",
    [
        ["-mem-queue-size", "7"],
        ["--mem-queue-size", "7"],
        ["-mem-queue-size=7"],
        ["--mem-queue-size=7"],
    ],
)
def test_value_syntaxes(argv):
    parsed = parse(*argv)
    assert parsed.values == {"mem_queue_size": 7}
    assert parsed.given == {"mem_queue_size"}
    assert parsed.args == []


def test_value_may_look_like_a_flag_or_be_empty():
    # a non-boolean flag takes the next argument whatever it is, as Go does
    assert parse("--broadcast-address", "--snappy").values == {"broadcast_address": "--snappy"}
    assert parse("--broadcast-address=").values == {"broadcast_address": ""}
    assert parse("--statsd-prefix=a=b").values == {"statsd_prefix": "a=b"}


@pytest.mark.parametrize("prefix", ["-", "--"])
def test_bare_boolean(prefix):
    assert parse(f"{prefix}snappy").values == {"snappy": True}


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("false", False), ("1", True), ("0", False), ("t", True), ("F", False), ("TRUE", True), ("False", False)],
)
def test_boolean_with_value(text, value):
    assert parse(f"--snappy={text}").values == {"snappy": value}
    assert parse(f"-deflate={text}").values == {"deflate": value}


def test_boolean_does_not_consume_next_argument():
    parsed = parse("--snappy", "false", "--deflate=false")
    assert parsed.values == {"snappy": True}
    # "false" is the first positional argument: parsing stops there
    assert parsed.args == ["false", "--deflate=false"]


def test_last_repeated_scalar_wins():
    assert parse("--mem-queue-size", "1", "-mem-queue-size=2", "--mem-queue-size", "3").values == {"mem_queue_size": 3}
    assert parse("--snappy", "--snappy=false").values == {"snappy": False}
    assert parse("--msg-timeout=1s", "--msg-timeout=2m").values == {"msg_timeout": 120.0}


def test_list_flags_accumulate():
    parsed = parse("--lookupd-tcp-address", "a:4160", "-lookupd-tcp-address=b:4160", "--lookupd-tcp-address=a:4160")
    assert parsed.values == {"lookupd_tcp_addresses": ["a:4160", "b:4160", "a:4160"]}


def test_floats_list_accepts_comma_separated_values():
    parsed = parse(
        "--e2e-processing-latency-percentile=0.99,0.95", "--e2e-processing-latency-percentile", "0.5"
    )
    assert parsed.values == {"e2e_processing_latency_percentiles": [0.99, 0.95, 0.5]}
    with pytest.raises(FlagError):
        parse("--e2e-processing-latency-percentile=0.9,x")


def test_parsing_stops_at_first_non_flag():
    parsed = parse("--snappy", "positional", "--mem-queue-size", "5")
    assert parsed.values == {"snappy": True}
    assert parsed.args == ["positional", "--mem-queue-size", "5"]
    # a lone "-" is not a flag either
    parsed = parse("-", "--snappy")
    assert parsed.values == {}
    assert parsed.args == ["-", "--snappy"]


def test_parsing_stops_after_double_dash():
    parsed = parse("--snappy", "--", "--mem-queue-size", "5")
    assert parsed.values == {"snappy": True}
    assert parsed.args == ["--mem-queue-size", "5"]
    assert parse("--", "--", "x").args == ["--", "x"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-x"], "flag provided but not defined: -x"),
        (["--x"], "flag provided but not defined: -x"),
        (["--x=1"], "flag provided but not defined: -x"),
        (["--snappy", "--no-such-flag", "5"], "flag provided but not defined: -no-such-flag"),
        (["--mem-queue-size"], "flag needs an argument: -mem-queue-size"),
        (["-tcp-address"], "flag needs an argument: -tcp-address"),
        (["--mem-queue-size", "x"], 'invalid value "x" for flag -mem-queue-size: parse error'),
        (["--mem-queue-size=1.5"], 'invalid value "1.5" for flag -mem-queue-size: parse error'),
        (["--msg-timeout", "5"], 'invalid value "5" for flag -msg-timeout: parse error'),
        (["--msg-timeout=soon"], 'invalid value "soon" for flag -msg-timeout: parse error'),
        (["--e2e-processing-latency-percentile=x"], 'invalid value "x" for flag -e2e-processing-latency-percentile: parse error'),
        # Go words a boolean's bad value differently
        (["--snappy=x"], 'invalid boolean value "x" for -snappy: parse error'),
        (["--snappy="], 'invalid boolean value "" for -snappy: parse error'),
        (["---snappy"], "bad flag syntax: ---snappy"),
        (["-=1"], "bad flag syntax: -=1"),
        (["--=1"], "bad flag syntax: --=1"),
    ],
)
def test_flag_errors(argv, message):
    with pytest.raises(FlagError) as exc:
        parse(*argv)
    assert str(exc.value) == message
    assert "\n" not in str(exc.value)


def test_choice_error_names_the_choices():
    with pytest.raises(FlagError) as exc:
        parse("--log-level=loud")
    assert str(exc.value).startswith('invalid value "loud" for flag -log-level: ')
    assert "debug" in str(exc.value)


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["-help"], ["--snappy", "-h"], ["--h=1"]])
def test_help_requested(argv):
    with pytest.raises(HelpRequested):
        parse(*argv)


def test_help_after_positional_is_positional():
    assert parse("pos", "-h").args == ["pos", "-h"]


def test_tls_required_is_bool_like():
    assert parse("--tls-required").values == {"tls_required": "true"}
    assert parse("--tls-required=tcp-https").values == {"tls_required": "tcp-https"}
    assert parse("--tls-required=false").values == {"tls_required": "false"}
    parsed = parse("--tls-required", "tcp-https")
    assert parsed.values == {"tls_required": "true"}
    assert parsed.args == ["tcp-https"]


# a model of Go's flag package for a random mix of syntaxes

_SYNTAX = st.sampled_from(["-n v", "--n v", "-n=v", "--n=v"])


def _render(name: str, value: str, syntax: str) -> list[str]:
    dash = "--" if syntax.startswith("--") else "-"
    if "=" in syntax:
        return [f"{dash}{name}={value}"]
    return [f"{dash}{name}", value]


_ops = st.one_of(
    st.tuples(st.just("int"), st.integers(0, 10**9), _SYNTAX),
    st.tuples(st.just("list"), st.from_regex(r"[a-z0-9.:-]{1,12}", fullmatch=True), _SYNTAX),
    st.tuples(st.just("bool"), st.one_of(st.none(), st.booleans()), st.sampled_from(["-", "--"])),
    st.tuples(st.just("dur"), st.integers(0, 10**7), _SYNTAX),
)


@FAST
@given(st.lists(_ops, max_size=12), st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,5}", fullmatch=True), max_size=3))
def test_flag_sequences_match_go_model(ops, positional):
    argv: list[str] = []
    expected: dict[str, object] = {}
    for kind, value, syntax in ops:
        if kind == "int":
            argv += _render("mem-queue-size", str(value), syntax)
            expected["mem_queue_size"] = value
        elif kind == "list":
            argv += _render("lookupd-tcp-address", value, syntax)
            expected.setdefault("lookupd_tcp_addresses", []).append(value)  # type: ignore[union-attr]
        elif kind == "dur":
            argv += _render("msg-timeout", format_duration(value / 1000), syntax)
            expected["msg_timeout"] = value / 1000
        elif value is None:
            argv.append(f"{syntax}snappy")
            expected["snappy"] = True
        else:
            argv.append(f"{syntax}snappy={'true' if value else 'false'}")
            expected["snappy"] = value
    parsed = parse(*argv, *positional)
    assert parsed.values == expected
    assert parsed.given == set(expected)
    assert parsed.args == positional


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1h0m0s", 3600.0),
        ("15m0s", 900.0),
        ("1m0s", 60.0),
        ("2s", 2.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("1m30s", 90.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("+5s", 5.0),
        ("-1.5s", -1.5),
        ("1.s", 1.0),
        (".5s", 0.5),
        ("1h", 3600.0),
        ("2h45m", 9900.0),
        ("100ns", 1e-7),
        ("1us", 1e-6),
        ("1µs", 1e-6),  # U+00B5
        ("1μs", 1e-6),  # U+03BC
        ("1.5ms", 0.0015),
        ("30s1ms", 30.001),
        ("1.0000000001s", 1.0),  # below 1ns: truncated, as Go
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "1", "s", "1x", "+", "-", "1.5", ".s", "1s2", "--1s", "1 s", "1S", "1d", "١s", "9999999999h"]
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (3600.0, "1h0m0s"),
        (900.0, "15m0s"),
        (60.0, "1m0s"),
        (2.0, "2s"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (0.0, "0s"),
        (90.0, "1m30s"),
        (0.025, "25ms"),
        (0.0015, "1.5ms"),
        (1.5e-6, "1.5µs"),
        (1e-9, "1ns"),
        (-1.5, "-1.5s"),
        (86400.0, "24h0m0s"),
        (3600.5, "1h0m0.5s"),
        (3661.001, "1h1m1.001s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@FAST
@given(st.integers(-(10**12), 10**12))
def test_duration_round_trip_whole_milliseconds(ms):
    seconds = ms / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    # canonical: formatting what was parsed gives the same text
    assert format_duration(parse_duration(text)) == text


@FAST
@given(st.integers(0, 10**15))
def test_duration_round_trip_nanoseconds(ns):
    text = format_duration(ns / 1e9)
    assert round(parse_duration(text) * 1e9) == ns


def test_parse_bool_is_go_strconv():
    for t in ("1", "t", "T", "TRUE", "true", "True"):
        assert parse_bool(t) is True
    for f in ("0", "f", "F", "FALSE", "false", "False"):
        assert parse_bool(f) is False
    for bad in ("", "yes", "tRUE", "2", " true"):
        with pytest.raises(ValueError):
            parse_bool(bad)


# ---------------------------------------------------------------- config file


@pytest.fixture
def config_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "nsqd.cfg"
        path.write_text(text)
        return str(path)

    return write


def test_config_resolution(config_file):
    path = config_file(
        """
mem_queue_size = 5
sync_every = 7
msg_timeout = "30s"
max_msg_timeout = 120000          # integer milliseconds, as go-options
max_req_timeout = "1h30m"
nsqlookupd_tcp_addresses = ["a:4160", "b:4160"]
e2e_processing_latency_percentiles = [0.99, 0.5]
snappy = false
id = 7
log_level = "debug"
tls_min_version = "tls1.3"
some_unknown_key = "ignored"
[some_table]
x = 1
"""
    )
    opts, parsed = resolve(Options, ["--config", path, "--mem-queue-size", "9"])
    assert opts.mem_queue_size == 9  # command line > config
    assert opts.sync_every == 7  # config > default
    assert opts.msg_timeout == 30.0
    assert opts.max_msg_timeout == 120.0
    assert opts.max_req_timeout == 5400.0
    assert opts.lookupd_tcp_addresses == ["a:4160", "b:4160"]
    assert opts.e2e_processing_latency_percentiles == [0.99, 0.5]
    assert opts.snappy is False
    assert opts.node_id == 7
    assert opts.log_level == "debug"
    assert opts.tls_min_version == "tls1.3"
    assert opts.max_body_size == 5242880  # default
    assert parsed.given == {"config", "mem_queue_size"}


def test_command_line_list_replaces_config_list(config_file):
    path = config_file('nsqlookupd_tcp_addresses = ["a:4160", "b:4160"]\n')
    opts, _ = resolve(Options, ["--lookupd-tcp-address=c:4160", f"--config={path}"])
    assert opts.lookupd_tcp_addresses == ["c:4160"]


def test_config_duration_forms(config_file):
    path = config_file('sync_timeout = 1500\nmsg_timeout = "1m30s"\nstatsd_interval = "250ms"\n')
    opts, _ = resolve(Options, ["--config", path])
    assert (opts.sync_timeout, opts.msg_timeout, opts.statsd_interval) == (1.5, 90.0, 0.25)


def test_config_single_string_for_list(config_file):
    path = config_file('nsqlookupd_tcp_addresses = "a:4160"\n')
    opts, _ = resolve(Options, ["--config", path])
    assert opts.lookupd_tcp_addresses == ["a:4160"]


@pytest.mark.parametrize(
    "text",
    ['mem_queue_size = "lots"\n', "msg_timeout = true\n", 'msg_timeout = "5"\n', 'log_level = "loud"\n', "snappy = \"maybe\"\n"],
)
def test_bad_config_values(config_file, text):
    with pytest.raises(FlagError) as exc:
        resolve(Options, ["--config", config_file(text)])
    assert "config option" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_or_broken_config_file(tmp_path, config_file):
    with pytest.raises(FlagError) as exc:
        resolve(Options, ["--config", str(tmp_path / "nope.cfg")])
    assert str(exc.value).startswith("failed to load config file")
    with pytest.raises(FlagError) as exc:
        resolve(Options, ["--config", config_file("this is = = not toml\n")])
    assert str(exc.value).startswith("failed to load config file")


# ---------------------------------------------------------------- a small options class


@attrs.define(kw_only=True)
class _Small:
    name: str = flag_field("x", flag="name", kind="str", help="a name")
    count: int = flag_field(3, flag="count", kind="int", help="a count")
    wait: float = flag_field(1.5, flag="wait", kind="duration", help="a wait")
    on: bool = flag_field(False, flag="on", kind="bool", help="a switch")
    peers: list[str] = flag_field([], flag="peer", kind="strings", cfg="peer_list", help="peers")
    hidden: int = flag_field(0, flag="secret", kind="int", help="hidden", hidden=True)
    config: str = flag_field("", flag="config", kind="str", help="config file")

    def __attrs_post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("--count must be >= 0")


def test_flags_of_and_defaults_are_fresh():
    flags = {f.name: f for f in flags_of(_Small)}
    assert flags["peer"].cfg == "peer_list"
    assert flags["count"].cfg == "count"
    assert flags["peer"].is_list and not flags["count"].is_list
    a, _ = resolve(_Small, [])
    b, _ = resolve(_Small, [])
    a.peers.append("p")
    assert b.peers == []


def test_usage_text():
    text = usage("prog", flags_of(_Small))
    lines = text.splitlines()
    assert lines[0] == "Usage of prog:"
    assert "  -name string" in lines
    assert '    \ta name (default "x")' in lines
    assert "  -count int" in lines
    assert "    \ta count (default 3)" in lines
    assert "  -wait duration" in lines
    assert "    \ta wait (default 1.5s)" in lines
    assert "  -on" in lines
    assert "  -peer value" in lines
    assert "secret" not in text


def test_run_cli_in_process(capsys):
    opts, parsed = run_cli("prog", _Small, ["--count", "4", "rest"])
    assert opts.count == 4 and parsed.args == ["rest"]

    with pytest.raises(SystemExit) as exc:
        run_cli("prog", _Small, ["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().err.startswith("Usage of prog:\n")

    for argv, message in [
        (["--nope"], "prog: flag provided but not defined: -nope\n"),
        (["--count=-1"], "prog: --count must be >= 0\n"),
    ]:
        with pytest.raises(SystemExit) as exc:
            run_cli("prog", _Small, argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err == message


# ---------------------------------------------------------------- the real command line

VERSION_RE = re.compile(r"nsqd v[0-9]+\.[0-9]+\.[0-9]+(-[a-z]+)? \(built w/[a-z0-9.-]+\)")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run ``python -m pynsqd`` with several argument lists concurrently."""
    data = tmp_path_factory.mktemp("cli")
    # safety net: if a case unexpectedly starts the daemon, keep it local
    safe = ["--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--https-address=", f"--data-path={data}"]
    cases = {
        "help": ["--help"],
        "h": [*safe, "-h"],
        "bad_flag": [*safe, "--bogus"],
        "bad_value": [*safe, "--mem-queue-size=lots"],
        "missing": [*safe, "--msg-timeout"],
        "version": ["--version"],
    }
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pynsqd", *argv],
            cwd=str(data),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in cases.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("case", ["help", "h"])
def test_cli_help_exits_0_with_usage_on_stderr(cli_runs, case):
    rc, out, err = cli_runs[case]
    assert rc == 0
    assert out == ""
    assert err.startswith("Usage of pynsqd:\n")
    assert "  -tcp-address string" in err
    assert "  -lookupd-tcp-address value" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "case, line",
    [
        ("bad_flag", "pynsqd: flag provided but not defined: -bogus"),
        ("bad_value", 'pynsqd: invalid value "lots" for flag -mem-queue-size: parse error'),
        ("missing", "pynsqd: flag needs an argument: -msg-timeout"),
    ],
)
def test_cli_bad_flag_exits_2_with_one_line(cli_runs, case, line):
    rc, out, err = cli_runs[case]
    assert rc == 2
    assert out == ""
    assert err == line + "\n"


def test_cli_version(cli_runs):
    rc, out, err = cli_runs["version"]
    assert rc == 0
    assert out == "nsqd v1.3.0-compatible (built w/pynsqd-0.1.0)\n"
    assert VERSION_RE.fullmatch(out.strip())
    assert err == ""
