"""Admin actions: what each does on which daemons, as nsqadmin's clusterinfo
does it, and how pages offer it.

Every action is an entry of :data:`ACTIONS` (its name is the one nsqadmin
sends to ``--notification-http-endpoint``); a page shows the actions of its
``scope`` ("topic", "channel", "node_topic" for one nsqd's part of a topic,
"lookupd" for registrations) as POST forms, each confirmed on a second page
before anything happens.  A later feature -- peeking at messages, dead-letter
move-back, channel rewind -- is one more entry with its runner and, where it
needs input, its ``fields``: the pages, the confirmation, the CSRF check, the
read-only flag and the notifications come with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs

from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from .cluster_info import Answer, ClusterInfo, producer_address


class ActionError(Exception):
    """The request names no valid target; nothing was done."""


@attrs.frozen
class Target:
    topic: str = ""
    channel: str = ""
    node: str = ""


@attrs.frozen
class Outcome:
    """One daemon's answer to one request of an action."""

    daemon: str  # "nsqd host:port" / "nsqlookupd host:port"
    request: str  # "POST /channel/pause"
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


Runner = Callable[[ClusterInfo, Target], Awaitable[list[Outcome]]]


@attrs.frozen
class Field:
    """An extra input an action asks for (validated by its runner)."""

    name: str
    label: str
    placeholder: str = ""


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
    # offered only when the target is "paused" (on any nsqd) / "unpaused" (on some)
    show_if: str = ""

    def offered(self, paused_on: int, nodes: int) -> bool:
        if self.show_if == "paused":
            return paused_on > 0
        if self.show_if == "unpaused":
            return paused_on < nodes or nodes == 0
        return True


def _outcomes(kind: str, request: str, answers: dict[str, Answer]) -> list[Outcome]:
    return [Outcome(f"{kind} {addr}", request, a.error) for addr, a in sorted(answers.items())]


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


def _on_producers(path: str, with_channel: bool) -> Runner:
    async def run(ci: ClusterInfo, target: Target) -> list[Outcome]:
        nodes, outcomes = await _topic_producers(ci, target.topic)
        query = {"topic": target.topic}
        if with_channel:
            query["channel"] = target.channel
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
        Action("pause_topic", "topic", "Pause", "Pause topic “{topic}” on every nsqd that has it? Messages queue up until unpaused.", "Topic paused.", _on_producers("/topic/pause", False), show_if="unpaused"),
        Action("unpause_topic", "topic", "Unpause", "Unpause topic “{topic}” on every nsqd that has it?", "Topic unpaused.", _on_producers("/topic/unpause", False), show_if="paused"),
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
            show_if="unpaused",
        ),
        Action("unpause_channel", "channel", "Unpause", "Unpause channel “{channel}” of topic “{topic}” on every nsqd?", "Channel unpaused.", _on_producers("/channel/unpause", True), show_if="paused"),
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
    )
}


def for_scope(scope: str) -> list[Action]:
    return [a for a in ACTIONS.values() if a.scope == scope]


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
    return target


async def run_action(ci: ClusterInfo, action: Action, target: Target) -> list[Outcome]:
    """Run it; an action that finds nothing to act on says so."""
    outcomes = await action.run(ci, target)
    if not outcomes:
        outcomes = [Outcome("cluster", "-", "no nsqd or nsqlookupd to act on")]
    return outcomes


__all__ = ["ACTIONS", "Action", "ActionError", "Field", "Outcome", "Target", "for_scope", "run_action", "validate"]
