"""nsqd's TCP protocol V2 for one connection, sans-IO.

The trio edge feeds received bytes to :meth:`ProtocolV2.receive_data` and
calls :meth:`ProtocolV2.process`, which runs every complete command against
the daemon's topics and channels and writes replies into the client's output
buffer.  ``process`` returns an :class:`Action` when the edge has to do
something only it can (upgrade the stream to TLS/snappy/deflate, ask the auth
server, close); it returns None when it needs more bytes.

Error codes, texts and fatality follow nsqd 1.3.0: every error closes the
connection except E_FIN_FAILED, E_REQ_FAILED and E_TOUCH_FAILED.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from .backend_queue import BackendError
from .channel import ChannelError, ChannelExiting, TooManyConsumers
from .client_v2 import STATE_CLOSING, STATE_INIT, STATE_SUBSCRIBED, ClientV2
from .protocol import (
    CLOSE_WAIT,
    FIN_RUN,
    MSG_ID_LENGTH,
    NSQD_BODY_COMMANDS,
    OK,
    Command,
    CommandParser,
    ProtocolError,
    scan_mpub_body,
    is_valid_channel_name,
    is_valid_topic_name,
    parse_base10,
)
from .topic import Topic, TopicExiting, TopicFull

if TYPE_CHECKING:
    from .message import Messages
    from .nsqd import NSQD


def go_quote(text: str) -> str:
    """Go's %q for the names nsqd echoes in errors."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _publish_failed(name: bytes, exc: Exception) -> ProtocolError:
    """E_PUB_FAILED, E_MPUB_FAILED, E_DPUB_FAILED: the publish was not accepted."""
    cmd = _text(name)
    return ProtocolError(f"E_{cmd}_FAILED", f"{cmd} failed {exc}")


# ------------------------------------------------------------ edge actions


@attrs.frozen
class Action:
    """Something the trio edge must do before ``process`` is called again."""


@attrs.frozen
class Close(Action):
    """Flush what is buffered, then close the connection."""


@attrs.frozen
class Upgrade(Action):
    """Flush (the IDENTIFY reply), then wrap the stream: ``kinds`` in order,
    from ``"tls"``, ``"snappy"``, ``"deflate"``; after each, send ``OK``
    through the new layer (call :meth:`ProtocolV2.upgraded`)."""

    kinds: tuple[str, ...]
    deflate_level: int = 6


@attrs.frozen
class Authenticate(Action):
    """Ask the auth server about ``secret``; report with :meth:`ProtocolV2.auth_done`."""

    secret: str


@attrs.frozen
class Reauthorize(Action):
    """The cached authorizations expired: refresh them before ``command``
    runs (report with :meth:`ProtocolV2.auth_done`; the command is retried)."""


CLOSE = Close()

# a publisher's checked topic names are kept up to this many
_TOPIC_NAMES_KEPT = 64

_IDENTIFY_TYPES: dict[str, type | tuple[type, ...]] = {
    "client_id": str,
    "hostname": str,
    "user_agent": str,
    "short_id": str,
    "long_id": str,
    "feature_negotiation": bool,
    "tls_v1": bool,
    "deflate": bool,
    "snappy": bool,
    "heartbeat_interval": int,
    "output_buffer_size": int,
    "output_buffer_timeout": int,
    "deflate_level": int,
    "sample_rate": int,
    "msg_timeout": int,
}


class ProtocolV2:
    def __init__(self, nsqd: NSQD, client: ClientV2) -> None:
        self.nsqd = nsqd
        self.opts = nsqd.options
        self.client = client
        self.parser = CommandParser(NSQD_BODY_COMMANDS, on_header=self._check_header, on_body_size=self._check_body_size)
        self._handlers = {
            b"FIN": self.FIN,
            b"RDY": self.RDY,
            b"REQ": self.REQ,
            b"PUB": self.PUB,
            b"MPUB": self.MPUB,
            b"DPUB": self.DPUB,
            b"NOP": self.NOP,
            b"TOUCH": self.TOUCH,
            b"SUB": self.SUB,
            b"CLS": self.CLS,
            b"AUTH": self.AUTH,
            b"IDENTIFY": self.IDENTIFY,
        }
        # a command waiting for the auth server's answer (Reauthorize)
        self._retry: Command | None = None
        self._tls_required = nsqd.tls_required_for_tcp
        self._failed = False
        # the topic names this publisher used lately, checked (raw -> name)
        self._topic_names: dict[bytes, str] = {}
        # PUB may take the parser's quick path: nothing to ask first
        self._quick_pub = not self._tls_required and nsqd.auth is None
        self._max_msg_size = self.opts.max_msg_size

    # ------------------------------------------------------------ driving

    def receive_data(self, data: bytes) -> None:
        self.parser.receive_data(data)

    def process(self) -> Action | None:
        client = self.client
        parser = self.parser
        while True:
            if client.closing_connection or self._failed:
                return CLOSE
            if self._retry is not None:
                cmd, self._retry = self._retry, None
            else:
                if not parser.has_input():
                    return None
                if client.state == STATE_SUBSCRIBED and not self._tls_required:
                    # a consumer's input is mostly FINs: a buffer of them at a time
                    ids = parser.take_run(FIN_RUN)
                    if ids:
                        self._fin_run(ids)
                        continue
                elif self._quick_pub:
                    # a publisher's is PUBs to the topics it used before
                    pub = parser.take_body_command(b"PUB ", self._topic_names, self._max_msg_size)
                    if pub is not None:
                        raw_topic, body = pub
                        try:
                            topic = self._publish_topic(b"PUB", raw_topic)
                            self._accept(b"PUB", topic, [topic.new_message(body)])
                        except ProtocolError as err:
                            return self._fail(err)  # E_PUB_FAILED is fatal
                        continue
                try:
                    cmd = parser.next_command()
                except ProtocolError as err:
                    return self._fail(err)
                if cmd is None:
                    return None
            try:
                if cmd.name == b"FIN" and not self._tls_required:
                    action = self.FIN(cmd)  # the per-message command, dispatched first
                else:
                    action = self.execute(cmd)
            except ProtocolError as err:
                if err.fatal:
                    return self._fail(err)
                client.send_error(err)
                continue
            if action is not None:
                return action

    def _fail(self, err: ProtocolError) -> Action:
        self.nsqd.log.error("client error", client=self.client.remote_address, error=str(err))
        client = self.client
        client.send_error(err)
        # the error is the last frame: no message may follow it
        client.ready_count = 0
        self._failed = True
        return CLOSE

    def execute(self, cmd: Command) -> Action | None:
        name = cmd.name
        handler = self._handlers.get(name)
        if handler is None:
            raise ProtocolError("E_INVALID", f"invalid command {_text(name)}")
        if self._tls_required and name != b"IDENTIFY" and not self.client.tls:
            raise ProtocolError("E_INVALID", f"cannot {_text(name)} in current state (TLS required)")
        return handler(cmd)

    def connection_lost(self) -> None:
        """The socket is gone: leave the channel (requeueing in-flight messages)."""
        client = self.client
        channel = client.channel
        client.state = STATE_CLOSING if client.state == STATE_SUBSCRIBED else client.state
        if channel is not None:
            channel.remove_client(client)
        self.nsqd.remove_client(client)

    # ------------------------------------------------------------ pre-body checks

    def _check_header(self, name: bytes, params: list[bytes]) -> None:
        """What nsqd validates before reading a command's body."""
        if name == b"PUB" or name == b"MPUB":
            if len(params) < 1:
                raise ProtocolError("E_INVALID", f"{_text(name)} insufficient number of parameters")
            self._check_topic(name, params[0])
        elif name == b"DPUB":
            if len(params) < 2:
                raise ProtocolError("E_INVALID", "DPUB insufficient number of parameters")
            self._check_topic(name, params[0])
            self._dpub_delay(params[1])
        elif name == b"IDENTIFY":
            if self.client.state != STATE_INIT:
                raise ProtocolError("E_INVALID", "cannot IDENTIFY in current state")
        elif name == b"AUTH":
            if self.client.state != STATE_INIT:
                raise ProtocolError("E_INVALID", "cannot AUTH in current state")
            if params:
                raise ProtocolError("E_INVALID", "AUTH invalid number of parameters")

    def _check_body_size(self, name: bytes, params: list[bytes], size: int) -> None:
        opts = self.opts
        cmd = _text(name)
        if name == b"PUB" or name == b"DPUB":
            if size <= 0:
                raise ProtocolError("E_BAD_MESSAGE", f"{cmd} invalid message body size {size}")
            if size > opts.max_msg_size:
                raise ProtocolError("E_BAD_MESSAGE", f"{cmd} message too big {size} > {opts.max_msg_size}")
        else:  # MPUB, IDENTIFY, AUTH
            if size <= 0:
                raise ProtocolError("E_BAD_BODY", f"{cmd} invalid body size {size}")
            if size > opts.max_body_size:
                raise ProtocolError("E_BAD_BODY", f"{cmd} body too big {size} > {opts.max_body_size}")

    def _check_topic(self, name: bytes, raw: bytes) -> str:
        topic = self._topic_names.get(raw)
        if topic is not None:
            return topic
        topic = _text(raw)
        if not is_valid_topic_name(topic):
            raise ProtocolError("E_BAD_TOPIC", f"{_text(name)} topic name {go_quote(topic)} is not valid")
        if len(self._topic_names) >= _TOPIC_NAMES_KEPT:
            self._topic_names.clear()
        self._topic_names[raw] = topic
        return topic

    def _dpub_delay(self, raw: bytes) -> float:
        try:
            ms = parse_base10(raw)
        except ValueError:
            raise ProtocolError("E_INVALID", f"DPUB could not parse timeout {_text(raw)}") from None
        max_ms = int(self.opts.max_req_timeout * 1000)
        if ms > max_ms:
            raise ProtocolError("E_INVALID", f"DPUB timeout {ms} out of range 0-{max_ms}")
        return ms / 1000.0

    # ------------------------------------------------------------ auth

    def _check_auth(self, cmd: str, topic: str, channel: str) -> Action | None:
        auth = self.nsqd.auth
        if auth is None:
            return None
        return auth.check(self, cmd, topic, channel)

    def retry_after_auth(self, cmd: Command) -> Action:
        self._retry = cmd
        return Reauthorize()

    # ------------------------------------------------------------ commands

    def IDENTIFY(self, cmd: Command) -> Action | None:
        client = self.client
        opts = self.opts
        try:
            data = json.loads(cmd.body or b"")
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body") from None
        if not isinstance(data, dict):
            raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")
        for key, typ in _IDENTIFY_TYPES.items():
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")

        def get(key: str, default: Any) -> Any:
            value = data.get(key)
            return default if value is None else value

        client.client_id = get("client_id", "") or get("short_id", "") or ""
        client.hostname = get("hostname", "") or get("long_id", "") or ""
        client.user_agent = get("user_agent", "")

        heartbeat = get("heartbeat_interval", 0)
        if heartbeat == -1:
            client.heartbeat_interval = 0.0
        elif heartbeat == 0:
            pass
        elif 1000 <= heartbeat <= opts.max_heartbeat_interval * 1000:
            client.heartbeat_interval = heartbeat / 1000.0
        else:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY heartbeat interval ({heartbeat}) is invalid")

        size = get("output_buffer_size", 0)
        if size == -1:
            client.output_buffer_size = 1
        elif size == 0:
            pass
        elif 64 <= size <= opts.max_output_buffer_size:
            client.output_buffer_size = size
        else:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY output buffer size ({size}) is invalid")

        timeout = get("output_buffer_timeout", 0)
        if timeout == -1:
            client.output_buffer_timeout = 0.0
        elif timeout == 0:
            pass
        elif opts.min_output_buffer_timeout * 1000 <= timeout <= opts.max_output_buffer_timeout * 1000:
            client.output_buffer_timeout = timeout / 1000.0
        else:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY output buffer timeout ({timeout}) is invalid")

        rate = get("sample_rate", 0)
        if not 0 <= rate <= 99:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY sample rate ({rate}) is invalid")
        client.sample_rate = rate

        msg_timeout = get("msg_timeout", 0)
        if msg_timeout == 0:
            pass
        elif 1000 <= msg_timeout <= opts.max_msg_timeout * 1000:
            client.msg_timeout = msg_timeout / 1000.0
        else:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY msg timeout ({msg_timeout}) is invalid")

        if not get("feature_negotiation", False):
            client.send_response(OK)
            return None

        nsqd = self.nsqd
        tls = nsqd.tls_enabled and bool(get("tls_v1", False))
        deflate = opts.deflate and bool(get("deflate", False))
        deflate_level = 0
        if deflate:
            deflate_level = get("deflate_level", 0)
            if deflate_level <= 0:
                deflate_level = 6
            deflate_level = min(deflate_level, opts.max_deflate_level)
        snappy = opts.snappy and bool(get("snappy", False))
        if deflate and snappy:
            raise ProtocolError("E_IDENTIFY_FAILED", "cannot enable both deflate and snappy compression")
        reply = {
            "max_rdy_count": opts.max_rdy_count,
            "version": nsqd.version,
            "max_msg_timeout": int(opts.max_msg_timeout * 1000),
            "msg_timeout": int(client.msg_timeout * 1000),
            "tls_v1": tls,
            "deflate": deflate,
            "deflate_level": deflate_level,
            "max_deflate_level": opts.max_deflate_level,
            "snappy": snappy,
            "sample_rate": client.sample_rate,
            "auth_required": nsqd.auth is not None,
            "output_buffer_size": client.output_buffer_size,
            "output_buffer_timeout": int(client.output_buffer_timeout * 1000),
        }
        client.send_response(json.dumps(reply, separators=(",", ":")).encode())
        kinds = tuple(k for k, on in (("tls", tls), ("snappy", snappy), ("deflate", deflate)) if on)
        if kinds:
            return Upgrade(kinds, deflate_level or 6)
        return None

    def upgraded(self, kind: str) -> None:
        """The edge finished wrapping the stream in ``kind``: confirm with OK."""
        client = self.client
        if kind == "tls":
            client.tls = True
        elif kind == "snappy":
            client.snappy = True
        elif kind == "deflate":
            client.deflate = True
        client.send_response(OK)

    def AUTH(self, cmd: Command) -> Action | None:
        client = self.client
        if client.auth_state is not None:
            raise ProtocolError("E_INVALID", "AUTH already set")
        if self.nsqd.auth is None:
            raise ProtocolError("E_AUTH_DISABLED", "AUTH disabled")
        return Authenticate(_text(cmd.body or b""))

    def auth_done(self, state: Any | None, error: ProtocolError | None) -> None:
        """Report the auth server's answer for Authenticate/Reauthorize."""
        if error is not None:
            self._retry = None
            self.client.send_error(error)
            self._failed = True
            return
        first = self.client.auth_state is None
        self.client.auth_state = state
        if first:
            reply = {
                "identity": getattr(state, "identity", ""),
                "identity_url": getattr(state, "identity_url", ""),
                "permission_count": len(getattr(state, "authorizations", ())),
            }
            self.client.send_response(json.dumps(reply).encode())

    def SUB(self, cmd: Command) -> Action | None:
        client = self.client
        if client.state != STATE_INIT:
            raise ProtocolError("E_INVALID", "cannot SUB in current state")
        if client.heartbeat_interval <= 0:
            raise ProtocolError("E_INVALID", "cannot SUB with heartbeats disabled")
        params = cmd.params
        if len(params) < 2:
            raise ProtocolError("E_INVALID", "SUB insufficient number of parameters")
        topic_name = _text(params[0])
        if not is_valid_topic_name(topic_name):
            raise ProtocolError("E_BAD_TOPIC", f"SUB topic name {go_quote(topic_name)} is not valid")
        channel_name = _text(params[1])
        if not is_valid_channel_name(channel_name):
            raise ProtocolError("E_BAD_CHANNEL", f"SUB channel name {go_quote(channel_name)} is not valid")
        action = self._check_auth("SUB", topic_name, channel_name)
        if action is not None:
            return self.retry_after_auth(cmd) if isinstance(action, Reauthorize) else action
        # an ephemeral topic/channel may be exiting as its last user leaves: retry once fresh
        for _ in range(2):
            try:
                channel = self.nsqd.get_topic(topic_name).get_channel(channel_name)
                client.state = STATE_SUBSCRIBED
                channel.add_client(client)
                break
            except (ChannelExiting, TopicExiting):
                client.state = STATE_INIT
                continue
            except TooManyConsumers as exc:
                client.state = STATE_INIT
                raise ProtocolError("E_SUB_FAILED", f"SUB failed {exc}") from None
        else:
            raise ProtocolError("E_SUB_FAILED", "SUB failed channel is exiting")
        client.send_response(OK)
        return None

    def RDY(self, cmd: Command) -> None:
        client = self.client
        if client.state == STATE_CLOSING:
            return None  # nsqd ignores RDY after CLS
        if client.state != STATE_SUBSCRIBED:
            raise ProtocolError("E_INVALID", "cannot RDY in current state")
        count = 1
        if cmd.params:
            try:
                count = parse_base10(cmd.params[0])
            except ValueError:
                raise ProtocolError("E_INVALID", f"RDY could not parse count {_text(cmd.params[0])}") from None
        max_rdy = self.opts.max_rdy_count
        if count > max_rdy:
            raise ProtocolError("E_INVALID", f"RDY count {count} out of range 0-{max_rdy}")
        client.ready_count = count
        assert client.channel is not None
        client.channel.client_ready_changed(client)
        return None

    def _message_id(self, name: str, params: list[bytes], needed: int) -> bytes:
        client = self.client
        if client.state != STATE_SUBSCRIBED and client.state != STATE_CLOSING:
            raise ProtocolError("E_INVALID", f"cannot {name} in current state")
        if len(params) < needed:
            raise ProtocolError("E_INVALID", f"{name} insufficient number of params")
        msg_id = params[0]
        if len(msg_id) != MSG_ID_LENGTH:
            raise ProtocolError("E_INVALID", "Invalid Message ID")
        return msg_id

    def FIN(self, cmd: Command) -> None:
        client = self.client
        params = cmd.params
        # the checks of _message_id, inline: FIN comes once per message
        if client.state != STATE_SUBSCRIBED or len(params) != 1 or len(params[0]) != MSG_ID_LENGTH:
            self._message_id("FIN", params, 1)  # raises the right error (or passes a closing client)
        msg_id = params[0]
        try:
            client.channel.finish(client, msg_id)  # type: ignore[union-attr]
        except ChannelError as exc:
            raise ProtocolError("E_FIN_FAILED", f"FIN {_text(msg_id)} failed {exc}", fatal=False) from None
        return None

    def _fin_run(self, ids: list[bytes]) -> None:
        """``FIN <id>`` for each of ``ids``, as the FIN command would."""
        client = self.client
        channel = client.channel
        assert channel is not None
        start = 0
        while start < len(ids):
            start = channel.finish_many(client, ids, start)
            if start < len(ids):
                # it stopped at an id this client cannot finish: FIN says why
                try:
                    self.FIN(Command(b"FIN", [ids[start]]))
                except ProtocolError as err:
                    client.send_error(err)
                start += 1

    def REQ(self, cmd: Command) -> None:
        msg_id = self._message_id("REQ", cmd.params, 2)
        raw = cmd.params[1]
        try:
            ms = parse_base10(raw)
        except ValueError:
            raise ProtocolError("E_INVALID", f"REQ could not parse timeout {_text(raw)}") from None
        # nsqd 1.x clamps out-of-range timeouts instead of failing
        delay = min(ms / 1000.0, self.opts.max_req_timeout)
        client = self.client
        try:
            client.channel.requeue(client, msg_id, delay)  # type: ignore[union-attr]
        except ChannelError as exc:
            raise ProtocolError("E_REQ_FAILED", f"REQ {_text(msg_id)} failed {exc}", fatal=False) from None
        return None

    def TOUCH(self, cmd: Command) -> None:
        msg_id = self._message_id("TOUCH", cmd.params, 1)
        client = self.client
        try:
            client.channel.touch(client, msg_id)  # type: ignore[union-attr]
        except ChannelError as exc:
            raise ProtocolError("E_TOUCH_FAILED", f"TOUCH {_text(msg_id)} failed {exc}", fatal=False) from None
        return None

    def CLS(self, cmd: Command) -> None:
        client = self.client
        if client.state != STATE_SUBSCRIBED:
            raise ProtocolError("E_INVALID", "cannot CLS in current state")
        client.ready_count = 0
        client.state = STATE_CLOSING
        client.send_response(CLOSE_WAIT)
        return None

    def NOP(self, cmd: Command) -> None:
        return None

    def _publish(self, cmd: Command, make: Callable[[Topic], Messages]) -> Action | None:
        """PUB, MPUB and DPUB once their input is valid: auth, queue, reply."""
        if self.nsqd.auth is not None:
            action = self._check_auth(_text(cmd.name), self._check_topic(cmd.name, cmd.params[0]), "")
            if action is not None:
                return self.retry_after_auth(cmd) if isinstance(action, Reauthorize) else action
        topic = self._publish_topic(cmd.name, cmd.params[0])
        self._accept(cmd.name, topic, make(topic))
        return None

    def _publish_topic(self, name: bytes, raw_topic: bytes) -> Topic:
        """The topic a publish (``name``) goes to, if it takes publishes (its disk bound)."""
        topic = self.nsqd.get_topic(self._check_topic(name, raw_topic))
        if topic.max_disk_bytes:
            try:
                topic.check_disk_bound()
            except TopicFull as exc:  # back-pressure: the publisher retries later
                raise _publish_failed(name, exc) from None
        return topic

    def _accept(self, name: bytes, topic: Topic, msgs: Messages) -> None:
        """Queue the messages of a publish (``name``), count them, answer OK."""
        nsqd = self.nsqd
        try:
            topic.put_messages(msgs)
        except (BackendError, TopicExiting) as exc:
            nsqd.note_put_failure(exc)
            raise _publish_failed(name, exc) from None
        if not nsqd.is_healthy():
            nsqd.note_put_success()
        counts = self.client.pub_counts
        topic_name = topic.name
        counts[topic_name] = counts.get(topic_name, 0) + len(msgs)
        self.client.send_response(OK)

    def PUB(self, cmd: Command) -> Action | None:
        body: bytes = cmd.body  # type: ignore[assignment]
        return self._publish(cmd, lambda topic: [topic.new_message(body)])

    def MPUB(self, cmd: Command) -> Action | None:
        # every message is validated before any is queued; they stay in the
        # body until delivered
        body = cmd.body or b""
        count, size, starts = scan_mpub_body(body, self.opts.max_msg_size, self.opts.max_body_size)
        return self._publish(cmd, lambda topic: topic.new_batch(body, count, size, starts))

    def DPUB(self, cmd: Command) -> Action | None:
        delay = self._dpub_delay(cmd.params[1])
        body: bytes = cmd.body  # type: ignore[assignment]
        return self._publish(cmd, lambda topic: [topic.new_message(body, deferred=delay)])
