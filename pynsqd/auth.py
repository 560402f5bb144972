"""nsqd's AUTH: asking an auth server what a secret may do, and checking
PUB/SUB against the answer (nsq's ``internal/auth``).

The auth server is asked ``GET /auth?common_name=&remote_ip=&secret=&tls=``
(or the same as a form POST with ``--auth-http-request-method=post``) and
answers::

    {"ttl": 3600, "identity": "...", "identity_url": "...",
     "authorizations": [{"topic": "regex", "channels": ["regex"],
                         "permissions": ["subscribe", "publish"]}]}

The answer is a connection's :class:`AuthState` until ``ttl`` seconds have
passed; the next PUB/SUB then asks again (the protocol's ``Reauthorize``
action) before it runs.  Regexes match anywhere in the name, as Go's
``MatchString``.

Everything but :meth:`Auth.query` / :meth:`Auth.authenticate` is plain
synchronous logic; those two are the trio edge.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import attrs

from .http_client import HTTPClientError, http_request
from .protocol import ProtocolError
from .protocol_v2 import Action, Authenticate, Reauthorize, go_quote

if TYPE_CHECKING:
    from .options import Options
    from .protocol_v2 import ProtocolV2

PERMISSIONS = frozenset({"subscribe", "publish"})


class AuthError(Exception):
    """No usable answer from any auth server (the client gets E_AUTH_FAILED)."""


# ================================================================ sans-IO


@attrs.frozen
class Authorization:
    topic: re.Pattern[str]
    channels: tuple[re.Pattern[str], ...]
    permissions: frozenset[str]

    def is_allowed(self, topic: str, channel: str) -> bool:
        """A channel means subscribing, no channel publishing (nsq's IsAllowed)."""
        if ("subscribe" if channel else "publish") not in self.permissions:
            return False
        if self.topic.search(topic) is None:
            return False
        return any(c.search(channel) is not None for c in self.channels)


@attrs.frozen
class AuthState:
    identity: str
    identity_url: str
    authorizations: tuple[Authorization, ...]
    ttl: int
    expires: float  # on the Auth clock
    # kept to ask again when the state expires
    secret: str = attrs.field(repr=False, default="")

    def is_expired(self, now: float) -> bool:
        return now >= self.expires

    def is_allowed(self, topic: str, channel: str) -> bool:
        return any(a.is_allowed(topic, channel) for a in self.authorizations)


def _compile(pattern: object, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise AuthError(f"{what} is not a string: {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AuthError(f"unable to compile {what} {pattern!r} {exc}") from None


def parse_auth_response(body: bytes, *, now: float, secret: str = "") -> AuthState:
    """Validate an auth server's JSON answer as nsq's QueryAuthd does."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthError(f"bad JSON from auth server - {exc}") from None
    if not isinstance(data, dict):
        raise AuthError("auth server answered something other than a JSON object")

    def field(name: str, typ: type, default: Any) -> Any:
        value = data.get(name)
        if value is None:
            return default
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise AuthError(f"auth server field {name!r} has the wrong type")
        return value

    ttl = field("ttl", int, 0)
    identity = field("identity", str, "")
    identity_url = field("identity_url", str, "")
    authorizations = []
    for raw in field("authorizations", list, []):
        if not isinstance(raw, dict):
            raise AuthError("authorization is not an object")
        permissions = raw.get("permissions") or []
        channels = raw.get("channels") or []
        if not isinstance(permissions, list) or not isinstance(channels, list):
            raise AuthError("authorization permissions/channels are not lists")
        for p in permissions:
            if p not in PERMISSIONS:
                raise AuthError(f"unknown permission {p}")
        authorizations.append(
            Authorization(
                topic=_compile(raw.get("topic") or "", "topic"),
                channels=tuple(_compile(c, "channel") for c in channels),
                permissions=frozenset(permissions),
            )
        )
    if ttl <= 0:
        raise AuthError(f"invalid TTL {ttl} (must be >0)")
    return AuthState(identity, identity_url, tuple(authorizations), ttl, now + ttl, secret)


def auth_params(*, remote_ip: str, tls: bool, secret: str, common_name: str) -> str:
    """The query (or form body), keys sorted as Go's url.Values.Encode."""
    return urlencode(sorted({"remote_ip": remote_ip, "tls": "true" if tls else "false", "secret": secret, "common_name": common_name}.items()))


def auth_endpoint(address: str) -> str:
    """``host:port`` means ``http://host:port/auth``; a full URL is used as is."""
    return address if "://" in address else f"http://{address}/auth"


def remote_ip(remote_address: str) -> str:
    return remote_address.rsplit(":", 1)[0].strip("[]")


class Auth:
    """The daemon's auth configuration and the PUB/SUB permission check."""

    def __init__(
        self, options: Options, log: Any, *, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
    ) -> None:
        self.addresses = list(options.auth_http_addresses)
        self.method = options.auth_http_request_method
        self.connect_timeout = options.http_client_connect_timeout
        self.request_timeout = options.http_client_request_timeout
        self.log = log
        self.clock = clock
        self.rng = rng or random.Random()

    def check(self, proto: ProtocolV2, cmd: str, topic: str, channel: str) -> Action | None:
        """None if the client may run ``cmd``; Reauthorize if its state has
        expired (the command runs again after); else raises nsqd's error."""
        state = proto.client.auth_state
        if not isinstance(state, AuthState):
            raise ProtocolError("E_AUTH_FIRST", f"AUTH required before {cmd}")
        if state.is_expired(self.clock()):
            return Reauthorize()
        if not state.is_allowed(topic, channel):
            raise ProtocolError("E_UNAUTHORIZED", f"AUTH failed for {cmd} on {go_quote(topic)} {go_quote(channel)}")
        return None

    # ------------------------------------------------------------ trio edge

    async def query(self, *, remote_ip: str, tls: bool, secret: str, common_name: str) -> AuthState:
        """Ask the auth servers, each in turn from a random one (as nsqd
        spreads the load), until one gives a valid answer."""
        params = auth_params(remote_ip=remote_ip, tls=tls, secret=secret, common_name=common_name)
        errors = []
        n = len(self.addresses)
        start = self.rng.randrange(n) if n else 0
        for i in range(n):
            address = self.addresses[(start + i) % n]
            endpoint = auth_endpoint(address)
            try:
                if self.method == "post":
                    resp = await http_request(
                        "POST", endpoint, params.encode(),
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                        timeout=self.request_timeout, connect_timeout=self.connect_timeout, max_body=1 << 20,
                    )
                else:
                    resp = await http_request(
                        "GET", f"{endpoint}?{params}",
                        timeout=self.request_timeout, connect_timeout=self.connect_timeout, max_body=1 << 20,
                    )
                if resp.status != 200:
                    raise AuthError(f"got response {resp.status} {resp.body[:200]!r}")
                return parse_auth_response(resp.body, now=self.clock(), secret=secret)
            except (HTTPClientError, ValueError, AuthError) as exc:
                self.log.debug("AUTH: query failed, trying the next server", address=address, error=str(exc))
                errors.append(f"failed to auth against {address} - {exc}")
        raise AuthError("; ".join(errors) or "no auth server configured")

    async def authenticate(self, conn: Any, action: Action) -> tuple[AuthState | None, ProtocolError | None]:
        """Run an Authenticate (AUTH) or Reauthorize action for ``conn``;
        the result goes to ``ProtocolV2.auth_done``."""
        client = conn.client
        if isinstance(action, Authenticate):
            secret = action.secret
        else:
            state = client.auth_state
            secret = state.secret if isinstance(state, AuthState) else ""
        try:
            state = await self.query(
                remote_ip=remote_ip(client.remote_address),
                tls=bool(client.tls),
                secret=secret,
                common_name=str(client.tls_info.get("common_name", "")),
            )
        except AuthError as exc:
            # the reason stays in the log: it is not for untrusted clients
            self.log.warning("PROTOCOL(V2): AUTH failed", client=client.remote_address, error=str(exc))
            return None, ProtocolError("E_AUTH_FAILED", "AUTH failed")
        if isinstance(action, Authenticate) and not state.authorizations:
            return None, ProtocolError("E_UNAUTHORIZED", "AUTH no authorizations found")
        self.log.info("PROTOCOL(V2): AUTH", client=client.remote_address, identity=state.identity, permissions=len(state.authorizations))
        return state, None
