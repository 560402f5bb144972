"""Command-line flags parsed the way Go's ``flag`` package does, plus TOML config.

NSQ's daemons are started by tools and test harnesses that pass Go-style
flags (``-name value``, ``--name=value``, bare booleans, repeatable lists), so
argparse's GNU conventions would break them.  Options classes declare their
flags once, as ``attrs`` fields with ``flag_field``; everything else (parsing,
``--help``, the TOML config file, ``GET /config/<name>``, the README table)
is derived from that one definition.
"""

from __future__ import annotations

import decimal
import difflib
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

# ---------------------------------------------------------------- durations

_DURATION_UNITS = {  # in nanoseconds, as Go's time package
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5
    "μs": 1_000,  # U+03BC
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|µs|μs|ms|s|m|h)")
_MAX_DURATION_NS = (1 << 63) - 1


def parse_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` -> seconds (``"1m30s"``, ``"250ms"``, ``"0"``).

    Summed in integer nanoseconds as Go does (fractions below 1ns truncated),
    so the result is the float nearest the exact duration.
    """
    s = text.strip()
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or not (m.group(1) or m.group(2)):
            raise ValueError(f"invalid duration {text!r}")
        whole, frac, unit_name = m.group(1), m.group(2) or "", m.group(3)
        unit = _DURATION_UNITS[unit_name]
        total += int(whole or "0") * unit
        if frac:
            total += int(frac) * unit // 10 ** len(frac)
        if total > _MAX_DURATION_NS:
            raise ValueError(f"invalid duration {text!r}")
        pos = m.end()
    return sign * total / 1_000_000_000  # int / int: correctly rounded


def format_duration(seconds: float) -> str:
    """Go's ``Duration.String`` (``60.0`` -> ``"1m0s"``, ``0.25`` -> ``"250ms"``)."""
    # via the float's shortest decimal form: seconds * 1e9 in binary floating
    # point is off by a few ns for large values
    ns = round(decimal.Decimal(repr(float(seconds))) * 1_000_000_000)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                value = ns / size
                text = f"{value:.9f}".rstrip("0").rstrip(".")
                return f"{sign}{text}{unit}"
    hours, rem = divmod(ns, 3600 * 10**9)
    minutes, rem = divmod(rem, 60 * 10**9)
    secs = f"{rem / 1e9:.9f}".rstrip("0").rstrip(".")
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def parse_bool(text: str) -> bool:
    """Go's ``strconv.ParseBool``."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"invalid boolean {text!r}")


def _parse_int(text: str) -> int:
    # Go's ParseInt with base 0 accepts 0x.. and 0o.. too; decimal is what
    # anyone passes.
    return int(text, 0) if text[:2].lower() in ("0x", "0o", "0b") else int(text)


def _parse_float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------- flag kinds

# kind -> (parse one command-line string, is a list flag)
KINDS: dict[str, tuple[Callable[[str], Any], bool]] = {
    "bool": (parse_bool, False),
    "int": (_parse_int, False),
    "float": (float, False),
    "str": (str, False),
    "duration": (parse_duration, False),
    "strings": (str, True),  # repeatable, accumulates
    "floats": (_parse_float_list, True),  # repeatable and comma separated
}


def flag_field(
    default: Any,
    *,
    flag: str,
    kind: str,
    help: str,
    cfg: str | None = None,
    choices: Sequence[str] | None = None,
    parse: Callable[[str], Any] | None = None,
    bool_like: bool = False,
    hidden: bool = False,
) -> Any:
    """An attrs field that is also a command-line flag and a config key.

    ``parse`` replaces the kind's parser (for values like ``--tls-required``);
    ``bool_like`` lets such a flag be given bare, as Go's IsBoolFlag does.
    """
    if kind not in KINDS:
        raise ValueError(kind)
    meta = {
        "flag": flag,
        "kind": kind,
        "help": help,
        "cfg": cfg or flag.replace("-", "_"),
        "choices": tuple(choices) if choices else None,
        "parse": parse,
        "bool_like": bool_like or kind == "bool",
        "hidden": hidden,
    }
    if isinstance(default, list):
        return attrs.field(factory=lambda: list(default), metadata=meta)
    return attrs.field(default=default, metadata=meta)


@attrs.frozen
class Flag:
    name: str
    attr: str
    kind: str
    default: Any
    help: str
    cfg: str
    choices: tuple[str, ...] | None
    parse: Callable[[str], Any] | None
    bool_like: bool
    hidden: bool

    @property
    def is_list(self) -> bool:
        return KINDS[self.kind][1]

    def convert(self, text: str) -> Any:
        value = (self.parse or KINDS[self.kind][0])(text)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return value

    def default_text(self) -> str:
        d = self.default
        if self.kind == "duration":
            return format_duration(d)
        if self.kind == "bool":
            return "true" if d else "false"
        if isinstance(d, list):
            return ",".join(str(x) for x in d)
        return str(d)


def flags_of(options_cls: type) -> list[Flag]:
    out = []
    for f in attrs.fields(options_cls):
        m = f.metadata
        if "flag" not in m:
            continue
        default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[attr-defined]
        out.append(
            Flag(
                name=m["flag"],
                attr=f.name,
                kind=m["kind"],
                default=default,
                help=m["help"],
                cfg=m["cfg"],
                choices=m["choices"],
                parse=m["parse"],
                bool_like=m["bool_like"],
                hidden=m["hidden"],
            )
        )
    return out


class FlagError(Exception):
    """A bad command line; the message is one line, Go's wording."""


class HelpRequested(Exception):
    pass


@attrs.define
class ParsedFlags:
    values: dict[str, Any]  # attr -> value, only for flags given
    given: set[str]  # attr names given on the command line
    args: list[str]  # positional arguments left over
    # one line each, for the daemon to log once its logging is set up
    # (e.g. an unknown key in the --config file)
    warnings: list[str] = attrs.field(factory=list)


def parse_flags(flags: Sequence[Flag], argv: Sequence[str]) -> ParsedFlags:
    """Parse ``argv`` (without the program name) as Go's ``flag`` package does.

    ``-name``/``--name``, ``-name=value``, ``-name value`` for non-booleans,
    bare booleans; the last of a repeated scalar wins, list flags accumulate;
    parsing stops at the first non-flag argument or after ``--``.
    """
    by_name = {f.name: f for f in flags}
    values: dict[str, Any] = {}
    given: set[str] = set()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            i += 1
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] == "-" or name[0] == "=":
            raise FlagError(f"bad flag syntax: {arg}")
        i += 1
        has_value = "=" in name
        value = ""
        if has_value:
            name, value = name.split("=", 1)
        if name in ("h", "help") and name not in by_name:
            raise HelpRequested()
        flag = by_name.get(name)
        if flag is None:
            raise FlagError(f"flag provided but not defined: -{name}")
        if not has_value:
            if flag.bool_like:
                value = "true"
            else:
                if i >= len(args):
                    raise FlagError(f"flag needs an argument: -{name}")
                value = args[i]
                i += 1
        try:
            converted = flag.convert(value)
        except (ValueError, TypeError) as exc:
            detail = str(exc) if flag.choices or flag.parse else "parse error"
            if flag.bool_like:  # Go words a boolean flag's bad value differently
                raise FlagError(f'invalid boolean value "{value}" for -{name}: {detail}') from None
            raise FlagError(f'invalid value "{value}" for flag -{name}: {detail}') from None
        if flag.is_list:
            current = values.setdefault(flag.attr, [])
            if isinstance(converted, list):
                current.extend(converted)
            else:
                current.append(converted)
        else:
            values[flag.attr] = converted
        given.add(flag.attr)
    return ParsedFlags(values=values, given=given, args=args[i:])


def load_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def coerce_config_value(flag: Flag, value: Any) -> Any:
    """A TOML value for ``flag``; durations may be strings or ms integers, as
    NSQ's go-options accepts."""
    kind = flag.kind
    if flag.is_list:
        items = value if isinstance(value, list) else [value]
        if kind == "floats":
            out: list[Any] = []
            for item in items:
                out.extend(_parse_float_list(item) if isinstance(item, str) else [float(item)])
            return out
        return [str(x) for x in items]
    if flag.parse is not None:
        if isinstance(value, bool):
            value = "true" if value else "false"
        return flag.convert(str(value))
    if kind == "duration":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value / 1000.0
        return parse_duration(str(value))
    if kind == "bool":
        if isinstance(value, bool):
            return value
        return parse_bool(str(value))
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        return int(value)
    if kind == "float":
        return float(value)
    value = str(value)
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"must be one of {', '.join(flag.choices)}")
    return value


def resolve(options_cls: type, argv: Sequence[str], *, config_attr: str = "config") -> tuple[Any, ParsedFlags]:
    """Build an options instance: command line > config file > defaults."""
    flags = flags_of(options_cls)
    parsed = parse_flags(flags, argv)
    kwargs: dict[str, Any] = {}
    config_path = parsed.values.get(config_attr)
    if config_path:
        try:
            cfg = load_config(config_path)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FlagError(f"failed to load config file {config_path} - {exc}") from None
        by_cfg = {f.cfg: f for f in flags}
        for key, value in cfg.items():
            flag = by_cfg.get(key)
            if flag is None:
                # go-options ignores unknown keys silently; a typo must not be
                parsed.warnings.append(unknown_config_key(config_path, key, by_cfg))
                continue
            if flag.attr in parsed.given:
                continue
            try:
                kwargs[flag.attr] = coerce_config_value(flag, value)
            except (ValueError, TypeError) as exc:
                raise FlagError(f"invalid value {value!r} for config option {key}: {exc}") from None
    kwargs.update(parsed.values)
    try:
        return options_cls(**kwargs), parsed
    except ValueError as exc:
        raise FlagError(str(exc)) from None


def unknown_config_key(path: str, key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f'config file {path}: unknown option "{key}" ignored{hint}'


_GO_ESCAPES = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t", "\v": r"\v", '"': r'\"', "\\": r"\\"}


def go_quote(text: str) -> str:
    """Go's ``strconv.Quote``: how ``--help`` shows a string default
    (``"\\n"``, not a raw line break)."""
    out = []
    for ch in text:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def usage(prog: str, flags: Sequence[Flag]) -> str:
    """Go's ``flag.PrintDefaults``: sorted by name, string defaults quoted."""
    lines = [f"Usage of {prog}:"]
    for f in sorted(flags, key=lambda f: f.name):
        if f.hidden:
            continue
        typ = {
            "bool": "",
            "int": " int",
            "float": " float",
            "str": " string",
            "duration": " duration",
            "strings": " value",
            "floats": " value",
        }[f.kind]
        lines.append(f"  -{f.name}{typ}")
        help_text = f.help
        default = f.default_text()
        if default not in ("", "false", "0s", "0", "0.0") and not f.is_list:  # Go hides zero values
            help_text += f" (default {go_quote(default)})" if f.kind == "str" else f" (default {default})"
        lines.append(f"    \t{help_text}")
    return "\n".join(lines) + "\n"


def run_cli(prog: str, options_cls: type, argv: Sequence[str], epilog: str = "") -> tuple[Any, ParsedFlags]:
    """Parse flags or exit the way a Go daemon does: help -> 0, bad flag -> 2.
    ``epilog`` follows the flag list in ``--help`` (what differs from Go)."""
    flags = flags_of(options_cls)
    try:
        return resolve(options_cls, argv)
    except HelpRequested:
        sys.stderr.write(usage(prog, flags) + (f"\n{epilog.strip()}\n" if epilog.strip() else ""))
        raise SystemExit(0) from None
    except FlagError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        raise SystemExit(2) from None
