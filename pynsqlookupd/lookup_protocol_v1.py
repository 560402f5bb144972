"""nsqlookupd's TCP protocol V1 as a sans-IO state machine.

The transport strips the 4-byte magic, then feeds whatever arrives to
:meth:`LookupProtocolV1.receive_data` and sends back what it returns: replies
are ``[int32 size][data]``.  Every error is fatal: its reply is the last thing
sent and :attr:`LookupProtocolV1.closed` turns true.  When the connection goes
away, :meth:`LookupProtocolV1.connection_lost` drops the peer's registrations.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from pynsqd.log import get_logger
from pynsqd.protocol import (
    LOOKUPD_BODY_COMMANDS,
    OK,
    CommandParser,
    ProtocolError,
    encode_v1_response,
    is_valid_channel_name,
    is_valid_topic_name,
)

from .registration_db import PeerInfo, Registration, RegistrationDB

# An IDENTIFY body is ~200 bytes of JSON; anything near this is garbage (Go
# would try to allocate whatever size it is told).
MAX_IDENTIFY_BODY = 1 << 20


@attrs.define(kw_only=True)
class ServerInfo:
    """What IDENTIFY answers about this nsqlookupd."""

    tcp_port: int
    http_port: int
    version: str
    broadcast_address: str
    hostname: str

    def identify_response(self) -> bytes:
        # Go marshals a map, so the keys come out sorted
        return json.dumps(
            {
                "broadcast_address": self.broadcast_address,
                "hostname": self.hostname,
                "http_port": self.http_port,
                "tcp_port": self.tcp_port,
                "version": self.version,
            },
            separators=(",", ":"),
        ).encode()


_PEER_STR_FIELDS = ("hostname", "broadcast_address", "version")
_PEER_INT_FIELDS = ("tcp_port", "http_port")


def parse_identify_body(body: bytes) -> dict[str, Any]:
    """Decode IDENTIFY's JSON the way Go's ``json.Unmarshal`` into PeerInfo
    would: unknown keys ignored, keys matched case-insensitively, ``null``
    leaves a field empty, a wrong type is an error."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")
    fields: dict[str, Any] = {"hostname": "", "broadcast_address": "", "version": "", "tcp_port": 0, "http_port": 0}
    exact = {k for k in data if k in fields}
    for key, value in data.items():
        name = key if key in fields else key.lower()
        if name not in fields or (name != key and name in exact):
            continue
        if value is None:
            continue
        if name in _PEER_INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
                raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")
        elif not isinstance(value, str):
            raise ProtocolError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")
        fields[name] = value
    return fields


class LookupProtocolV1:
    """One nsqd's connection to this nsqlookupd."""

    def __init__(
        self,
        db: RegistrationDB,
        server: ServerInfo,
        *,
        remote_address: str,
        max_identify_body: int = MAX_IDENTIFY_BODY,
    ) -> None:
        self.db = db
        self.server = server
        self.remote_address = remote_address
        self.peer: PeerInfo | None = None
        self.closed = False
        self._max_identify_body = max_identify_body
        self._parser = CommandParser(
            LOOKUPD_BODY_COMMANDS, on_header=self._check_header, on_body_size=self._check_body_size, strip_lines=True
        )
        self._log = get_logger(client=remote_address)

    # ------------------------------------------------------------ parser hooks

    def _check_header(self, name: bytes, params: list[bytes]) -> None:
        # Go refuses a second IDENTIFY before it reads the body
        if self.peer is not None:
            raise ProtocolError("E_INVALID", "cannot IDENTIFY again")

    def _check_body_size(self, name: bytes, params: list[bytes], size: int) -> None:
        if size < 0:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY invalid body size {size}")
        if size > self._max_identify_body:
            raise ProtocolError("E_BAD_BODY", f"IDENTIFY body too big {size} > {self._max_identify_body}")

    # ------------------------------------------------------------ the state machine

    def receive_data(self, data: bytes, now: float) -> bytes:
        """Feed bytes from the peer; returns the reply bytes to send.

        ``now`` (wall-clock seconds) stamps IDENTIFY and PING.  After a fatal
        error the returned bytes end with the error reply, :attr:`closed` is
        true and any further data is ignored.
        """
        if self.closed:
            return b""
        out = bytearray()
        try:
            self._parser.receive_data(data)
            while (cmd := self._parser.next_command()) is not None:
                out += encode_v1_response(self._execute(cmd.name, cmd.params, cmd.body, now))
        except ProtocolError as exc:
            self._log.error("client error", error=str(exc))
            out += encode_v1_response(exc.frame_data())
            self.closed = True
        return bytes(out)

    def connection_lost(self) -> list[Registration]:
        """The connection is gone: remove everything this peer registered."""
        self.closed = True
        if self.peer is None:
            return []
        removed = self.db.remove_peer(self.peer.id)
        for reg in removed:
            self._log.debug("DB: UNREGISTER", category=reg.category, key=reg.key, subkey=reg.subkey)
        return removed

    def _execute(self, name: bytes, params: list[bytes], body: bytes | None, now: float) -> bytes:
        if name == b"PING":
            return self._ping(now)
        if name == b"IDENTIFY":
            return self._identify(body or b"", now)
        if name == b"REGISTER":
            return self._register(params)
        if name == b"UNREGISTER":
            return self._unregister(params)
        raise ProtocolError("E_INVALID", f"invalid command {name.decode('utf-8', 'replace')}")

    def _ping(self, now: float) -> bytes:
        # a PING may come before IDENTIFY; only then is there nothing to refresh
        if self.peer is not None:
            self._log.debug("pinged", since_last=round(now - self.peer.last_update, 3))
            self.peer.last_update = now
        return OK

    def _identify(self, body: bytes, now: float) -> bytes:
        fields = parse_identify_body(body)
        if not fields["broadcast_address"] or not fields["tcp_port"] or not fields["http_port"] or not fields["version"]:
            raise ProtocolError("E_BAD_BODY", "IDENTIFY missing fields")
        peer = PeerInfo(id=self.remote_address, remote_address=self.remote_address, last_update=now, **fields)
        self.peer = peer
        self._log.info(
            "IDENTIFY",
            address=peer.broadcast_address,
            tcp_port=peer.tcp_port,
            http_port=peer.http_port,
            version=peer.version,
        )
        if self.db.identify(peer):
            self._log.debug("DB: REGISTER", category="client", key="", subkey="")
        return self.server.identify_response()

    def _topic_channel(self, command: str, params: list[bytes]) -> tuple[PeerInfo, str, str]:
        if self.peer is None:
            raise ProtocolError("E_INVALID", "client must IDENTIFY")
        if not params:
            raise ProtocolError("E_INVALID", f"{command} insufficient number of params")
        topic = params[0].decode("utf-8", "replace")
        channel = params[1].decode("utf-8", "replace") if len(params) > 1 else ""
        if not is_valid_topic_name(topic):
            raise ProtocolError("E_BAD_TOPIC", f"{command} topic name '{topic}' is not valid")
        if channel and not is_valid_channel_name(channel):
            raise ProtocolError("E_BAD_CHANNEL", f"{command} channel name '{channel}' is not valid")
        return self.peer, topic, channel

    def _register(self, params: list[bytes]) -> bytes:
        peer, topic, channel = self._topic_channel("REGISTER", params)
        for reg in self.db.register(peer, topic, channel):
            self._log.debug("DB: REGISTER", category=reg.category, key=reg.key, subkey=reg.subkey)
        return OK

    def _unregister(self, params: list[bytes]) -> bytes:
        peer, topic, channel = self._topic_channel("UNREGISTER", params)
        removed, unexpected = self.db.unregister(peer, topic, channel)
        for reg in unexpected:
            self._log.warning("unexpected UNREGISTER", category=reg.category, key=reg.key, subkey=reg.subkey)
        for reg in removed:
            self._log.debug("DB: UNREGISTER", category=reg.category, key=reg.key, subkey=reg.subkey)
        return OK
