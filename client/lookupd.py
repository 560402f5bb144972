"""nsqd discovery through nsqlookupd.

lookupds never talk to each other, so a consumer asks every one of them and
takes the union of the producers.  A lookupd that cannot be reached keeps
its last good answer: one lookupd being down must not make its nsqds look
gone.  :class:`Discovery` is that bookkeeping (sans-IO);
:func:`query_lookupd` is the HTTP edge (``pynsqd.http_client``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import attrs


class LookupError_(Exception):
    """A lookupd answered with something that is not a lookup result."""


def _base_url(address: str) -> str:
    base = address if "://" in address else f"http://{address}"
    base = base.rstrip("/")
    for path in ("/lookup", "/topics"):
        if base.endswith(path):
            base = base[: -len(path)]
    return base


def lookup_url(address: str, topic: str) -> str:
    return f"{_base_url(address)}/lookup?topic={quote(topic)}"


def topics_url(address: str) -> str:
    return f"{_base_url(address)}/topics"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _answer(status: int, body: bytes) -> dict[str, Any]:
    """A lookupd's JSON answer, unwrapped from the pre-1.0 ``{"status_code":..,"data":{..}}``."""
    if status != 200:
        raise LookupError_(f"HTTP {status}: {body[:200]!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        raise LookupError_(f"not JSON: {body[:200]!r}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict):
        doc = doc["data"]
    if not isinstance(doc, dict):
        raise LookupError_(f"unexpected answer: {body[:200]!r}")
    return doc


def parse_lookup(status: int, body: bytes) -> list[dict[str, Any]]:
    """Producers from a ``/lookup`` answer; a 404 (topic unknown) is none.

    Accepts both nsqlookupd's current shape and the pre-1.0 one wrapped in
    ``{"status_code":..,"data":{..}}``.
    """
    if status == 404:
        return []
    doc = _answer(status, body)
    if not isinstance(doc.get("producers", []), list):
        raise LookupError_(f"unexpected answer: {body[:200]!r}")
    return [p for p in doc.get("producers") or [] if isinstance(p, dict)]


def parse_topics(status: int, body: bytes) -> list[str]:
    """The topic names from a ``/topics`` answer (either shape, as parse_lookup)."""
    topics = _answer(status, body).get("topics")
    if not isinstance(topics, list):
        raise LookupError_(f"unexpected answer: {body[:200]!r}")
    return [t for t in topics if isinstance(t, str)]


def _producer_addresses(producers: Iterable[dict[str, Any]], port_key: str) -> set[str]:
    out = set()
    for p in producers:
        host = p.get("broadcast_address") or p.get("address") or p.get("hostname")
        port = p.get(port_key)
        if host and isinstance(port, int):
            out.add(_join(host, port))
    return out


def producer_tcp_addresses(producers: Iterable[dict[str, Any]]) -> set[str]:
    return _producer_addresses(producers, "tcp_port")


def producer_http_addresses(producers: Iterable[dict[str, Any]]) -> set[str]:
    return _producer_addresses(producers, "http_port")


async def query_lookupd(address: str, topic: str, timeout: float) -> list[dict[str, Any]]:
    """Raises LookupError_ when there is no usable answer."""
    # imported here: a Reader given only nsqd addresses needs no HTTP at all
    from pynsqd.http_client import HTTPClientError, http_get

    try:
        resp = await http_get(lookup_url(address, topic), timeout=timeout, connect_timeout=min(timeout, 2.0))
    except HTTPClientError as exc:
        raise LookupError_(str(exc)) from exc
    return parse_lookup(resp.status, resp.body)


async def query_topics(address: str, timeout: float, connect_timeout: float = 2.0) -> list[str]:
    """Every topic one lookupd knows; LookupError_ when there is no usable answer."""
    from pynsqd.http_client import HTTPClientError, http_get

    try:
        resp = await http_get(topics_url(address), timeout=timeout, connect_timeout=min(timeout, connect_timeout))
    except HTTPClientError as exc:
        raise LookupError_(str(exc)) from exc
    return parse_topics(resp.status, resp.body)


QueryErrors = (LookupError_, ValueError)


@attrs.define
class Discovery:
    """The union of every lookupd's last good answer."""

    lookupds: list[str]
    answers: dict[str, set[str]] = attrs.field(factory=dict)

    def answered(self, lookupd: str, addresses: set[str]) -> None:
        self.answers[lookupd] = set(addresses)

    def failed(self, lookupd: str) -> None:
        """Nothing to do: the last good answer stands."""

    def producers(self) -> set[str]:
        out: set[str] = set()
        for addresses in self.answers.values():
            out |= addresses
        return out
