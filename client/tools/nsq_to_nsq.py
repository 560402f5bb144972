"""``pynsq_to_nsq``: copy topics from one set of nsqds to another, as Go's
``nsq_to_nsq``.

    pynsq_to_nsq --topic=events --lookupd-http-address=10.0.0.1:4161 --destination-nsqd-tcp-address=10.0.1.1:4150

Go's flags and semantics: each ``--topic`` (repeatable) is consumed on
``--channel`` and published to ``--destination-topic`` (default: the same
name) on one of the ``--destination-nsqd-tcp-address`` nsqds, chosen by
``--mode`` (``hostpool``, the default: in turn, a failing nsqd left alone for
a while; ``round-robin``; ``epsilon-greedy``: mostly the fastest).  A message
is finished only once a destination nsqd said OK; if no destination takes it
within the Writer's ``publish_timeout`` (10 s, ``--producer-opt``), it is
requeued (go-nsq's delay and backoff).  ``--require-json-field`` /
``--require-json-value`` pass only matching JSON messages (a message missing
the field when a value is required is requeued with backoff, one that is not
JSON is dropped, as in Go), ``--whitelist-json-field`` keeps only those fields.
Every ``--status-every`` publishes a timing line is logged.

Where we differ on purpose: messages that arrive together are published as
one MPUB (Go: one PUB each; the same messages, far fewer round trips), and a
destination whose connection is down is skipped while another is up (a
destination restart then costs a reconnect, not a requeue); a bad setting
or a source nsqd given by address that cannot be reached stops the tool at
start with exit code 1; ``--log-level`` exists (default info).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Set as AbstractSet, Sequence
from typing import Any

import attrs
import trio

from pynsqd.flags import flag_field
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from ..errors import ClientError
from ..message import Message
from ..reader import Reader
from ..writer import Writer
from .common import (
    CONSUMER_OPTIONS,
    PRODUCER_OPTIONS,
    consumer_opts_flag,
    fail_if_not_dialled,
    log_level_flag,
    lookupd_http_addresses_flag,
    max_in_flight_flag,
    nsqd_tcp_addresses_flag,
    parse_opts,
    producer_opts_flag,
    run_tool,
    tool_main,
    tool_name,
    until_signal,
    user_agent,
    version_flag,
)
from .relay import MODES, HostPool, TimerMetrics

PROG = tool_name("nsq_to_nsq")
MAX_BATCH_BYTES = 1024 * 1024  # per MPUB: well under nsqd's default --max-body-size


@attrs.define(kw_only=True)
class ToNSQOptions:
    topics: list[str] = flag_field([], flag="topic", kind="strings", help="nsq topic (may be given multiple times)")
    channel: str = flag_field("nsq_to_nsq", flag="channel", kind="str", help="nsq channel")
    destination_topic: str = flag_field(
        "", flag="destination-topic", kind="str", help="use this destination topic for all consumed topics (default is consumed topic name)"
    )
    destination_nsqd_tcp_addresses: list[str] = flag_field(
        [], flag="destination-nsqd-tcp-address", kind="strings", help="destination nsqd TCP address (may be given multiple times)"
    )
    nsqd_tcp_addresses: list[str] = nsqd_tcp_addresses_flag()
    lookupd_http_addresses: list[str] = lookupd_http_addresses_flag()
    consumer_opts: list[str] = consumer_opts_flag()
    producer_opts: list[str] = producer_opts_flag()
    max_in_flight: int = max_in_flight_flag()
    mode: str = flag_field("hostpool", flag="mode", kind="str", help="the upstream request mode options: round-robin, hostpool (default), epsilon-greedy")
    status_every: int = flag_field(250, flag="status-every", kind="int", help="the # of requests between logging status (per destination), 0 disables")
    require_json_field: str = flag_field("", flag="require-json-field", kind="str", help="for JSON messages: only pass messages that contain this field")
    require_json_value: str = flag_field(
        "", flag="require-json-value", kind="str", help="for JSON messages: only pass messages in which the required field has this value"
    )
    whitelist_json_fields: list[str] = flag_field([], flag="whitelist-json-field", kind="strings", help="for JSON messages: pass this field (may be given multiple times)")
    log_level: str = log_level_flag("info", PROG)
    version: bool = version_flag()


def check(opts: ToNSQOptions, given: AbstractSet[str] = frozenset()) -> str | None:
    """Go's start-up checks, in Go's order."""
    if not opts.topics or not opts.channel:
        return "--topic and --channel are required"
    for topic in opts.topics:
        if not is_valid_topic_name(topic):
            return "--topic is invalid"
    if opts.destination_topic and not is_valid_topic_name(opts.destination_topic):
        return "--destination-topic is invalid"
    if not is_valid_channel_name(opts.channel):
        return "--channel is invalid"
    if not opts.nsqd_tcp_addresses and not opts.lookupd_http_addresses:
        return "--nsqd-tcp-address or --lookupd-http-address required"
    if opts.nsqd_tcp_addresses and opts.lookupd_http_addresses:
        return "use --nsqd-tcp-address or --lookupd-http-address not both"
    if not opts.destination_nsqd_tcp_addresses:
        # the name used to be pyto_nsq's: say where stdin publishing went
        return "--destination-nsqd-tcp-address required (to publish stdin, use pyto_nsq)"
    if opts.mode not in MODES:
        return f"invalid --mode {opts.mode!r} (round-robin, hostpool or epsilon-greedy)"
    if opts.require_json_value and not opts.require_json_field:
        return "--require-json-value needs --require-json-field"
    if opts.max_in_flight < 1:
        return "--max-in-flight must be at least 1"
    return None


class Backoff(Exception):
    """The message must be requeued with backoff (Go's handler error)."""


class JSONFilter:
    """``--require-json-field/-value`` and ``--whitelist-json-field``, as Go
    applies them: the body to publish, or ``None`` to drop the message."""

    def __init__(self, field: str, value: str, whitelist: Sequence[str], log: logging.Logger) -> None:
        self.field = field
        self.value = value
        self.whitelist = list(whitelist)
        self.log = log
        try:
            self.number: float | None = float(value)
        except ValueError:
            self.number = None

    @property
    def active(self) -> bool:
        return bool(self.field or self.whitelist)

    def __call__(self, body: bytes) -> bytes | None:
        try:
            doc = json.loads(body)
        except ValueError:
            self.log.error("Unable to decode json: %s", body[:200].decode(errors="replace"))
            return None
        if self.field and not self._passes(doc):
            return None
        if not self.whitelist:
            return body
        if not isinstance(doc, dict):
            raise Backoff("json is not an object")
        kept = {k: doc[k] for k in self.whitelist if k in doc}
        # Go: encoding/json of a map -- sorted keys, compact
        return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def _passes(self, doc: Any) -> bool:
        if not isinstance(doc, dict) or self.field not in doc:
            if self.value:
                self.log.error("missing field to check required value")
                raise Backoff("missing field to check required value")
            return False
        if not self.value:
            return True
        got = doc[self.field]
        if isinstance(got, str):
            return got == self.value
        if self.number is not None and isinstance(got, (int, float)) and not isinstance(got, bool):
            return float(got) == self.number
        return False  # neither a string nor a comparable number: no match


class TopicRelay:
    """One source topic: a Reader whose messages are batched into MPUBs to
    the destination chosen by the mode; FIN once published, REQ if not."""

    def __init__(
        self, opts: ToNSQOptions, topic: str, writers: dict[str, Writer], hosts: HostPool, metrics: dict[str, TimerMetrics], extra: dict[str, Any], log: logging.Logger
    ) -> None:
        self.opts = opts
        self.topic = topic
        self.destination = opts.destination_topic or topic
        self.writers = writers
        self.hosts = hosts
        self.metrics = metrics
        self.log = log
        self.filter = JSONFilter(opts.require_json_field, opts.require_json_value, opts.whitelist_json_fields, log)
        self.pending: list[tuple[Message, bytes]] = []
        self._wakeup = trio.Event()
        self.published = 0
        self.reader = Reader(
            topic,
            opts.channel,
            self.handle,
            nsqd_tcp_addresses=opts.nsqd_tcp_addresses,
            lookupd_http_addresses=opts.lookupd_http_addresses,
            max_in_flight=opts.max_in_flight,
            concurrency=1,  # only queues the message: the publishers do the work
            **extra,
        )

    async def handle(self, message: Message) -> None:
        body = message.body
        if self.filter.active:
            try:
                filtered = self.filter(message.body)
            except Backoff as exc:
                message.requeue()
                self.log.warning("[%s/%s] message %s requeued: %s", self.topic, self.opts.channel, message.id.decode(), exc)
                return
            if filtered is None:
                return  # filtered out: finished, not passed on
            body = filtered
        message.disable_auto_response()
        self.pending.append((message, body))
        self._wakeup.set()

    def _take_batch(self) -> list[tuple[Message, bytes]]:
        size = 0
        n = 0
        for _, body in self.pending:
            if n and size + len(body) > MAX_BATCH_BYTES:
                break
            size += len(body) + 4
            n += 1
        batch, self.pending = self.pending[:n], self.pending[n:]
        return batch

    def _connected(self, address: str) -> bool:
        return bool(self.writers[address].connected)

    async def publisher(self) -> None:
        """Publishes whatever is pending, as one MPUB; several of these run
        at once (one per destination), so batches form while one is in flight."""
        while True:
            while not self.pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            batch = self._take_batch()
            started = trio.current_time()
            address = self.hosts.get(started, self._connected)
            bodies = [body for _, body in batch]
            try:
                writer = self.writers[address]
                if len(bodies) == 1:
                    await writer.pub(self.destination, bodies[0])
                else:
                    await writer.mpub(self.destination, bodies)
            except ClientError as exc:
                self.hosts.mark(address, False, trio.current_time())
                self.log.warning("[%s/%s] publishing %d messages to nsqd %s failed, requeueing: %s", self.topic, self.opts.channel, len(batch), address, exc)
                for message, _ in batch:
                    message.requeue()
                continue
            now = trio.current_time()
            self.hosts.mark(address, True, now, now - started)
            for message, _ in batch:
                message.finish()
            self.published += len(batch)
            for metrics in (self.metrics[address], self.metrics["aggregate"]):
                line = metrics.status(now - started, len(batch))
                if line:
                    self.log.info(line)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(max(2, len(self.writers))):
                nursery.start_soon(self.publisher)
            await nursery.start(self.reader.run)
            task_status.started()
            await self.reader.wait_stopped()
            nursery.cancel_scope.cancel()


async def run_to_nsq(opts: ToNSQOptions, consumer_extra: dict[str, Any], producer_extra: dict[str, Any]) -> int:
    log = logging.getLogger("pynsqd.client.tools.nsq_to_nsq")
    consumer_extra.setdefault("user_agent", user_agent(PROG))
    producer_extra.setdefault("user_agent", user_agent(PROG))
    destinations = list(dict.fromkeys(opts.destination_nsqd_tcp_addresses))
    # one Writer per destination, so the mode (not the Writer) picks the nsqd
    writers = {address: Writer([address], **producer_extra) for address in destinations}
    hosts = HostPool(destinations, opts.mode, now=trio.current_time())
    one = len(destinations) == 1
    metrics = {a: TimerMetrics(0 if one else opts.status_every, f"[{a}]:") for a in destinations}
    metrics["aggregate"] = TimerMetrics(opts.status_every, "[aggregate]:")
    relays = [TopicRelay(opts, topic, writers, hosts, metrics, dict(consumer_extra), log) for topic in dict.fromkeys(opts.topics)]

    async def stop_readers() -> None:
        async with trio.open_nursery() as nursery:
            for relay in relays:
                nursery.start_soon(relay.reader.stop)

    async with trio.open_nursery() as nursery:
        for writer in writers.values():
            await nursery.start(writer.run)
        async with trio.open_nursery() as relaying:
            for relay in relays:
                await relaying.start(relay.run)
            await relaying.start(until_signal, stop_readers)
            await fail_if_not_dialled(PROG, [r.reader for r in relays], nursery)
            for relay in relays:
                await relay.reader.wait_stopped()
            relaying.cancel_scope.cancel()
        for writer in writers.values():
            await writer.stop()
        nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def start(opts: ToNSQOptions) -> int:
        return run_tool(PROG, run_to_nsq, opts, parse_opts(opts.consumer_opts, CONSUMER_OPTIONS), parse_opts(opts.producer_opts, PRODUCER_OPTIONS))

    return tool_main(PROG, ToNSQOptions, __doc__, argv, check, start)


if __name__ == "__main__":
    raise SystemExit(main())
