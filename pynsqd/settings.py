"""Per-topic and per-channel settings of pynsqd's opt-in features, made
through the HTTP API (``POST /topic/settings``, ``POST /channel/settings``)
and kept in nsqd.dat.

A setting made for a topic or channel overrides the daemon-wide flag.  It is
kept as an extra key of that topic's or channel's nsqd.dat entry, and only
once it has been made: Go nsqd's JSON decoding ignores such keys, and a
deployment that never made one writes exactly nsqd's file.  Each feature
adds its keys to the tables below; ``NSQD`` merges ``Topic.settings`` /
``Channel.settings`` into the entries and applies them after loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .protocol import is_ephemeral, is_valid_topic_name

# the query value that removes a setting (the flag applies again)
DEFAULT = "default"


@attrs.frozen
class Setting:
    # query parameter and nsqd.dat key
    key: str
    # the query value -> the value kept (ValueError: 400 INVALID_ARG_<KEY>)
    parse: Callable[[str], Any]
    # a value read back from nsqd.dat is usable
    valid: Callable[[Any], bool]


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"{value} not in [{lo}, {hi}]")
        return value

    return parse


def _is_int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and lo <= v <= hi


def _dead_letter_topic(text: str) -> str:
    if not is_valid_topic_name(text) or is_ephemeral(text):
        raise ValueError(f"{text!r} is not a durable topic name")
    return text


MAX_ATTEMPTS = 65535  # the attempts field of a message is 16 bits
MAX_DISK_BYTES = (1 << 63) - 1

TOPIC_SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("max_disk_bytes", _int_in(0, MAX_DISK_BYTES), _is_int_in(0, MAX_DISK_BYTES)),
    )
}

CHANNEL_SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("max_attempts", _int_in(0, MAX_ATTEMPTS), _is_int_in(0, MAX_ATTEMPTS)),
        Setting("dead_letter_topic", _dead_letter_topic, lambda v: isinstance(v, str) and _valid(_dead_letter_topic, v)),
    )
}


def _valid(parse: Callable[[str], Any], text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


def from_metadata(entry: dict[str, Any], table: dict[str, Setting], reserved: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """The settings of an nsqd.dat entry: (kept keys, keys dropped as invalid).
    Keys this version does not know are kept as they are (a newer pynsqd's)."""
    kept: dict[str, Any] = {}
    bad: list[str] = []
    for key, value in entry.items():
        if key in reserved:
            continue
        setting = table.get(key)
        if setting is not None and not setting.valid(value):
            bad.append(key)
            continue
        kept[key] = value
    return kept, bad


def parse_query(args: dict[str, str], table: dict[str, Setting]) -> dict[str, Any]:
    """The settings a request asks for: key -> value, or None to remove it.
    Raises KeyError(key) for a value that does not parse."""
    out: dict[str, Any] = {}
    for key, setting in table.items():
        if key not in args:
            continue
        text = args[key]
        if text == DEFAULT:
            out[key] = None
            continue
        try:
            out[key] = setting.parse(text)
        except ValueError:
            raise KeyError(key) from None
    return out


def apply_changes(settings: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
