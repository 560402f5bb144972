"""Per-topic/channel settings (pynsqd/settings.py): the query values taken,
what nsqd.dat entries keep."""

from __future__ import annotations

import pytest

from pynsqd.settings import CHANNEL_SETTINGS, TOPIC_SETTINGS, apply_changes, from_metadata, parse_query


def test_query_values_parse_or_name_the_bad_key():
    assert parse_query({"max_attempts": "3", "dead_letter_topic": "x.dead"}, CHANNEL_SETTINGS) == {"max_attempts": 3, "dead_letter_topic": "x.dead"}
    assert parse_query({"max_disk_bytes": "default"}, TOPIC_SETTINGS) == {"max_disk_bytes": None}
    assert parse_query({"other": "1"}, TOPIC_SETTINGS) == {}
    for args in ({"max_attempts": "65536"}, {"max_attempts": "-1"}, {"max_attempts": "x"}, {"dead_letter_topic": "a#ephemeral"}, {"dead_letter_topic": ""}):
        with pytest.raises(KeyError):
            parse_query(args, CHANNEL_SETTINGS)


def test_metadata_entries_keep_valid_and_unknown_keys():
    entry = {"name": "c", "paused": False, "max_attempts": 3, "dead_letter_topic": "bad name", "retention": "1h"}
    kept, bad = from_metadata(entry, CHANNEL_SETTINGS, ("name", "paused"))
    assert kept == {"max_attempts": 3, "retention": "1h"}  # a newer pynsqd's key survives
    assert bad == ["dead_letter_topic"]
    settings = dict(kept)
    apply_changes(settings, {"max_attempts": None, "dead_letter_topic": "x.dead"})
    assert settings == {"retention": "1h", "dead_letter_topic": "x.dead"}
    assert from_metadata({"name": "t", "max_disk_bytes": True}, TOPIC_SETTINGS, ("name",)) == ({}, ["max_disk_bytes"])
