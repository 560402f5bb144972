"""Admin actions: what each does on which daemons, as nsqadmin's clusterinfo
does it, and how pages offer it.

Every action is an entry of :data:`ACTIONS` (its name is the one nsqadmin
sends to ``--notification-http-endpoint``); a page shows the actions of its
``scope`` ("topic", "channel", "node_topic" for one nsqd's part of a topic,
"lookupd" for registrations) as POST forms, each confirmed on a second page
before anything happens.  An action that needs input has ``fields``: each
parsed (and refused with a 400) before the confirmation, shown on it, bound
into its token and handed to the runner in ``Target.values``.  pynsqd's
opt-in features (dead letters, bounded disk, retention and rewind) are such
entries, offered only where a page found them (``requires``: facts a page
states, such as "pynsqd" for an nsqd answering their endpoints).
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Awaitable, Callable

import attrs

from pynsqd.flags import parse_duration
from pynsqd.protocol import is_ephemeral, is_valid_channel_name, is_valid_topic_name
from pynsqd.retention import parse_since

from .cluster_info import Answer, ClusterInfo, producer_address


class ActionError(Exception):
    """The request names no valid target; nothing was done."""


@attrs.frozen
class Target:
    topic: str = ""
    channel: str = ""
    node: str = ""
    # the action's fields as parsed by validate(): name -> the value sent
    values: dict[str, str] = attrs.field(factory=dict, hash=False)


@attrs.frozen
class Outcome:
    """One daemon's answer to one request of an action."""

    daemon: str  # "nsqd host:port" / "nsqlookupd host:port"
    request: str  # "POST /channel/pause"
    error: str = ""
    # numbers the daemon answered that the action's notice reports (moved, kept)
    counts: dict[str, int] = attrs.field(factory=dict, hash=False)

    @property
    def ok(self) -> bool:
        return not self.error


Runner = Callable[[ClusterInfo, Target], Awaitable[list[Outcome]]]


def _text(text: str) -> str:
    return text


@attrs.frozen
class Field:
    """An extra input an action asks for.  ``parse`` turns what was typed
    into the value sent to the daemons (a ValueError refuses it); it must
    give back what it is given once parsed, as the confirmation sends it again."""

    name: str
    label: str
    placeholder: str = ""
    required: bool = True
    parse: Callable[[str], str] = _text
    # (value, label): a choice instead of a text box
    choices: tuple[tuple[str, str], ...] = ()
    # what the question says of a blank optional value
    blank: str = ""


@attrs.frozen
class Action:
    name: str
    scope: str
    label: str  # the button
    question: str  # the confirmation, formatted with the target's fields
    done: str  # the notice after success
    run: Runner
    danger: bool = False
    fields: tuple[Field, ...] = ()
    # where to go afterwards: "topic", "channel", "topics", "lookup"
    then: str = "same"
    # offered only where the page states every one of these facts (see facts())
    requires: frozenset[str] = frozenset()
    # Outcome.counts summed into the notice ("{moved}")
    counts: tuple[str, ...] = ()
    # where the page puts it: "" its actions bar, else that section's
    group: str = ""

    def offered(self, facts: frozenset[str] | set[str]) -> bool:
        return self.requires <= facts


def facts(paused_on: int, nodes: int, *more: str) -> frozenset[str]:
    """What a page says of its topic or channel, for Action.requires:
    "paused" (on any nsqd), "unpaused" (on some), and the page's ``more``."""
    out = set(more)
    if paused_on > 0:
        out.add("paused")
    if paused_on < nodes or nodes == 0:
        out.add("unpaused")
    return frozenset(out)


# ---------------------------------------------------------------- fields' values

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> str:
    """Bytes as an integer: ``1048576``, ``10MB`` (10^7), ``1GiB`` (2^30)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError("a size in bytes, as 1048576, 500MB or 2GiB")
    unit = 1024 if m.group(3) else 1000
    value = int(float(m.group(1)) * unit ** _POWERS[m.group(2).lower()])
    if value >= 1 << 63:
        raise ValueError("too large")
    return str(value)


def _int_field(lo: int, hi: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"{lo} to {hi}")
        return str(value)

    return parse


def _duration(text: str) -> str:
    if parse_duration(text) < 0:  # Go's syntax (90m, 72h), as nsqd parses it
        raise ValueError("negative")
    return text.strip()


def _dead_letter_topic(text: str) -> str:
    if not is_valid_topic_name(text) or is_ephemeral(text):
        raise ValueError("a durable topic name")
    return text


def _since(text: str) -> str:
    """As /channel/rewind takes it (oldest, unix ns, RFC 3339, a duration
    ago); a time typed without its offset is this pynsqadmin's local time,
    sent as unix nanoseconds."""
    text = text.strip()
    try:
        parse_since(text, time.time_ns())
        return text
    except ValueError:
        stamp = datetime.datetime.fromisoformat(text)  # ValueError: refused
    return str(int(stamp.astimezone().timestamp()) * 1_000_000_000 + stamp.microsecond * 1000)


def _counts(data: object) -> dict[str, int]:
    """The numbers of a JSON answer ({"moved":12,"kept":0})."""
    return {k: v for k, v in data.items() if type(v) is int} if isinstance(data, dict) else {}


def _outcomes(kind: str, request: str, answers: dict[str, Answer]) -> list[Outcome]:
    return [Outcome(f"{kind} {addr}", request, a.error, _counts(a.data)) for addr, a in sorted(answers.items())]


async def _topic_producers(ci: ClusterInfo, topic: str) -> tuple[list[str], list[Outcome]]:
    """The nsqds that have ``topic``: the union of every lookupd's ``/lookup``
    and the ``--nsqd-http-address`` nodes whose ``/stats`` list it (nsqadmin
    asks either; asking both misses none)."""
    nodes: dict[str, None] = {}
    problems: list[Outcome] = []
    lookups = await ci.each("GET", ci.lookupd_addresses, "/lookup", {"topic": topic})
    for addr, answer in sorted(lookups.items()):
        if answer.ok:
            for producer in (answer.data or {}).get("producers") or ():
                nodes[producer_address(producer)] = None
        elif not answer.error.startswith("HTTP 404"):  # TOPIC_NOT_FOUND: none there
            problems.append(Outcome(f"nsqlookupd {addr}", "GET /lookup", answer.error))
    if ci.nsqd_addresses:
        stats = await ci.each("GET", ci.nsqd_addresses, "/stats", {"format": "json", "topic": topic, "include_clients": "false"})
        for addr, answer in sorted(stats.items()):
            if not answer.ok:
                problems.append(Outcome(f"nsqd {addr}", "GET /stats", answer.error))
            elif any(t.get("topic_name") == topic for t in (answer.data or {}).get("topics") or ()):
                nodes[addr] = None
    return list(nodes), problems


def _on_producers(path: str, with_channel: bool, fixed: dict[str, str] | None = None, names: tuple[str, ...] = (), blank: str = "") -> Runner:
    """POST ``path`` on every nsqd that has the topic, with ``fixed`` and the
    fields ``names`` (a blank one sent as ``blank``, or left out)."""

    async def run(ci: ClusterInfo, target: Target) -> list[Outcome]:
        nodes, outcomes = await _topic_producers(ci, target.topic)
        query = {"topic": target.topic, **({"channel": target.channel} if with_channel else {}), **(fixed or {})}
        for name in names:
            value = target.values.get(name) or blank
            if value:
                query[name] = value
        outcomes += _outcomes("nsqd", f"POST {path}", await ci.each("POST", nodes, path, query))
        return outcomes

    return run


def _delete(kind: str) -> Runner:
    """Delete from every lookupd and every nsqd that has the topic; the
    producers are looked up *first*, before lookupd forgets them."""

    async def run(ci: ClusterInfo, target: Target) -> list[Outcome]:
        nodes, outcomes = await _topic_producers(ci, target.topic)
        query = {"topic": target.topic}
        if kind == "channel":
            query["channel"] = target.channel
        path = f"/{kind}/delete"
        lookupds = await ci.each("POST", ci.lookupd_addresses, path, query)
        # a lookupd that never had the channel answers 404: nothing to undo there
        lookupds = {addr: Answer(addr) if ans.error.startswith("HTTP 404") else ans for addr, ans in lookupds.items()}
        outcomes += _outcomes("nsqlookupd", f"POST {path}", lookupds)
        outcomes += _outcomes("nsqd", f"POST {path}", await ci.each("POST", nodes, path, query))
        return outcomes

    return run


async def _create(ci: ClusterInfo, target: Target) -> list[Outcome]:
    """As nsqadmin: the topic (and channel) registered in every lookupd; a
    channel also created on every nsqd that has the topic."""
    outcomes = _outcomes("nsqlookupd", "POST /topic/create", await ci.each("POST", ci.lookupd_addresses, "/topic/create", {"topic": target.topic}))
    if target.channel:
        query = {"topic": target.topic, "channel": target.channel}
        outcomes += _outcomes("nsqlookupd", "POST /channel/create", await ci.each("POST", ci.lookupd_addresses, "/channel/create", query))
        nodes, problems = await _topic_producers(ci, target.topic)
        outcomes += problems
        outcomes += _outcomes("nsqd", "POST /channel/create", await ci.each("POST", nodes, "/channel/create", query))
    return outcomes


async def _tombstone(ci: ClusterInfo, target: Target) -> list[Outcome]:
    """Tombstone the node's registration of the topic in every lookupd, then
    delete the topic on that node (nsqadmin's TombstoneNodeForTopic)."""
    nodes, outcomes = await _topic_producers(ci, target.topic)
    if target.node not in nodes:
        # never POST to an address taken from a form unless the cluster names it
        raise ActionError(f"{target.node} is not a producer of topic {target.topic}")
    query = {"topic": target.topic, "node": target.node}
    outcomes += _outcomes("nsqlookupd", "POST /topic/tombstone", await ci.each("POST", ci.lookupd_addresses, "/topic/tombstone", query))
    outcomes += _outcomes("nsqd", "POST /topic/delete", await ci.each("POST", [target.node], "/topic/delete", {"topic": target.topic}))
    return outcomes


def _reset(name: str, scope: str, what: str, flags: str, path: str, fixed: dict[str, str], made: str, warning: str = "") -> Action:
    """A setting made for a topic or channel removed: the flags apply again
    (offered where the page found the setting ``made``)."""
    target = "channel “{channel}” of topic “{topic}”" if scope == "channel" else "topic “{topic}”"
    return Action(
        name,
        scope,
        f"Reset {what}",
        f"Give {target} the daemon's {flags} again, on every nsqd that has it?{warning}",
        f"{what.capitalize()} reset to the daemon's flags.",
        _on_producers(path, scope == "channel", fixed),
        danger=bool(warning),
        group="settings",
        requires=frozenset({"pynsqd", made}),
    )


def _move_back(name: str, scope: str, source: str) -> Action:
    """Dead letters moved back from a dead-letter topic's own queue, or one of its channels."""
    return Action(
        name,
        scope,
        "Move back",
        f"Move {{n}} of the messages queued in {source} back to {{to}}, on every nsqd that has it (that many on each)?",
        "Moved back {moved} messages ({kept} stayed: origin unknown or gone).",
        _on_producers("/dead_letter/requeue", scope == "channel", names=("to", "n")),
        fields=(
            Field("to", "to", choices=(("channel", "the channels they came from"), ("topic", "their topics (every channel)"))),
            # /dead_letter/requeue's n, per nsqd; blank: everything queued
            Field("n", "at most", "all", required=False, parse=_int_field(1, 1 << 62), blank="all"),
        ),
        group="dead_letters",
        requires=frozenset({"dead_letters"}),
        counts=("moved", "kept"),
    )


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("create_topic", "lookupd", "Create topic", "Create topic “{topic}” in every nsqlookupd?", "Topic created.", _create, then="lookup"),
        Action(
            "create_channel",
            "lookupd",
            "Create channel",
            "Create channel “{channel}” of topic “{topic}” in every nsqlookupd and on every nsqd that has the topic?",
            "Channel created.",
            _create,
            then="lookup",
        ),
        Action("pause_topic", "topic", "Pause", "Pause topic “{topic}” on every nsqd that has it? Messages queue up until unpaused.", "Topic paused.", _on_producers("/topic/pause", False), requires=frozenset({"unpaused"})),
        Action("unpause_topic", "topic", "Unpause", "Unpause topic “{topic}” on every nsqd that has it?", "Topic unpaused.", _on_producers("/topic/unpause", False), requires=frozenset({"paused"})),
        Action(
            "empty_topic",
            "topic",
            "Empty",
            "Empty topic “{topic}” on every nsqd that has it? Its queued messages (not its channels') are deleted for good.",
            "Topic emptied.",
            _on_producers("/topic/empty", False),
            danger=True,
        ),
        Action(
            "delete_topic",
            "topic",
            "Delete",
            "Delete topic “{topic}”, its channels and every message in them, from every nsqd and nsqlookupd?",
            "Topic deleted.",
            _delete("topic"),
            danger=True,
            then="topics",
        ),
        Action(
            "tombstone_topic_producer",
            "node_topic",
            "Tombstone",
            "Tombstone nsqd {node} for topic “{topic}” in every nsqlookupd and delete the topic on that nsqd?",
            "Topic tombstoned on the node.",
            _tombstone,
            danger=True,
        ),
        Action(
            "pause_channel",
            "channel",
            "Pause",
            "Pause channel “{channel}” of topic “{topic}” on every nsqd? Its consumers get nothing until unpaused.",
            "Channel paused.",
            _on_producers("/channel/pause", True),
            requires=frozenset({"unpaused"}),
        ),
        Action("unpause_channel", "channel", "Unpause", "Unpause channel “{channel}” of topic “{topic}” on every nsqd?", "Channel unpaused.", _on_producers("/channel/unpause", True), requires=frozenset({"paused"})),
        Action(
            "empty_channel",
            "channel",
            "Empty",
            "Empty channel “{channel}” of topic “{topic}” on every nsqd? Its queued and deferred messages are deleted for good.",
            "Channel emptied.",
            _on_producers("/channel/empty", True),
            danger=True,
        ),
        Action(
            "delete_channel",
            "channel",
            "Delete",
            "Delete channel “{channel}” of topic “{topic}” and its messages from every nsqd and nsqlookupd?",
            "Channel deleted.",
            _delete("channel"),
            danger=True,
            then="topic",
        ),
        # pynsqd's opt-in features (README "Beyond NSQ"), where its nsqds have them
        Action(
            "set_channel_dead_letter",
            "channel",
            "Set dead letters",
            "Channel “{channel}” of topic “{topic}”: after {max_attempts} deliveries (0: no limit) move a message to "
            "dead-letter topic {dead_letter_topic} instead of delivering it again -- on every nsqd that has it?",
            "Dead-letter settings made.",
            _on_producers("/channel/settings", True, names=("max_attempts", "dead_letter_topic"), blank="default"),
            fields=(
                Field("max_attempts", "max attempts", "3", parse=_int_field(0, 65535)),
                Field("dead_letter_topic", "to topic", "TOPIC.dead", required=False, parse=_dead_letter_topic, blank="(the daemon's --dead-letter-topic)"),
            ),
            group="settings",
            requires=frozenset({"pynsqd"}),
        ),
        _reset("clear_channel_dead_letter", "channel", "dead letters", "--max-attempts and --dead-letter-topic", "/channel/settings",
               {"max_attempts": "default", "dead_letter_topic": "default"}, "channel_settings"),
        Action(
            "rewind_channel",
            "channel",
            "Rewind",
            "Give channel “{channel}” of topic “{topic}” again every retained message published since {since}, on every nsqd that has it? "
            "Its consumers get them again, at least once.",
            "Channel rewound: the replay runs.",
            _on_producers("/channel/rewind", True, names=("since",)),
            fields=(Field("since", "since", "oldest, 90m, 2024-05-01T10:00", parse=_since),),
            group="rewind",
            requires=frozenset({"pynsqd", "retention"}),
        ),
        Action(
            "set_topic_disk_bound",
            "topic",
            "Bound disk",
            "Bound topic “{topic}” to {max_disk_bytes} bytes on disk (0: unbounded) on every nsqd that has it? Past it, publishes are refused.",
            "Disk bound set.",
            _on_producers("/topic/settings", False, names=("max_disk_bytes",)),
            fields=(Field("max_disk_bytes", "disk bound", "10GB", parse=parse_size),),
            group="settings",
            requires=frozenset({"pynsqd"}),
        ),
        _reset("clear_topic_disk_bound", "topic", "disk bound", "--max-disk-bytes-per-topic", "/topic/settings", {"max_disk_bytes": "default"}, "disk_bound_set"),
        Action(
            "set_topic_retention",
            "topic",
            "Retain",
            "Keep every message of topic “{topic}” for {time} and up to {bytes} bytes (0: no such bound; both 0: retention off "
            "and the history kept so far deleted), on every nsqd that has it?",
            "Retention set.",
            _on_producers("/topic/retention", False, names=("time", "bytes"), blank="0"),
            danger=True,
            fields=(
                Field("time", "for", "72h", required=False, parse=_duration, blank="0"),
                Field("bytes", "up to", "10GB", required=False, parse=parse_size, blank="0"),
            ),
            group="settings",
            requires=frozenset({"pynsqd"}),
        ),
        _reset("clear_topic_retention", "topic", "retention", "--retention-time and --retention-bytes", "/topic/retention", {"reset": "true"}, "retention_set",
               warning=" Where they keep nothing, its retained history is deleted."),
        _move_back("requeue_dead_letters", "topic", "dead-letter topic “{topic}”"),
        _move_back("requeue_dead_letters_channel", "channel", "channel “{channel}” of dead-letter topic “{topic}”"),
    )
}


def for_scope(scope: str, facts: frozenset[str] | None = None, group: str = "") -> list[Action]:
    """The actions of a scope and group, those a page's ``facts`` allow (None: all)."""
    return [a for a in ACTIONS.values() if a.scope == scope and a.group == group and (facts is None or a.offered(facts))]


def validate(action: Action, target: Target) -> Target:
    """The target an action needs, checked as nsqd checks names."""
    if not is_valid_topic_name(target.topic):
        raise ActionError("invalid topic name")
    needs_channel = action.scope == "channel" or action.name == "create_channel"
    if needs_channel and not is_valid_channel_name(target.channel):
        raise ActionError("invalid channel name")
    if not needs_channel:
        target = attrs.evolve(target, channel="")
    if action.scope == "node_topic":
        if not target.node:
            raise ActionError("no node given")
    else:
        target = attrs.evolve(target, node="")
    return attrs.evolve(target, values={f.name: _field_value(f, target.values.get(f.name, "")) for f in action.fields})


def _field_value(field: Field, text: str) -> str:
    text = text.strip()
    if not text:
        if field.required:
            raise ActionError(f"{field.label}: required")
        return ""
    if field.choices:
        if text not in dict(field.choices):
            raise ActionError(f"{field.label}: not one of the choices")
        return text
    try:
        return field.parse(text)
    except ValueError as exc:
        raise ActionError(f"{field.label}: {text!r} is not valid ({exc})") from None


def question(action: Action, target: Target) -> str:
    """The confirmation's question, with the target and the fields' values."""
    shown = {}
    for f in action.fields:
        value = target.values.get(f.name, "")
        shown[f.name] = dict(f.choices).get(value, value) or f.blank
    return action.question.format(topic=target.topic, channel=target.channel, node=target.node, **shown)


async def run_action(ci: ClusterInfo, action: Action, target: Target) -> list[Outcome]:
    """Run it; an action that finds nothing to act on says so."""
    outcomes = await action.run(ci, target)
    if not outcomes:
        outcomes = [Outcome("cluster", "-", "no nsqd or nsqlookupd to act on")]
    return outcomes


__all__ = ["ACTIONS", "Action", "ActionError", "Field", "Outcome", "Target", "facts", "for_scope", "parse_size", "question", "run_action", "validate"]
