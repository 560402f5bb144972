"""pynsqadmin's HTTP side: the pages (server-rendered HTML, graphs as inline
SVG), the action forms' endpoint, the static files, ``/ping`` and nsqadmin's
``/config``.

Pages ask the cluster afresh on every request (as nsqadmin's API does) and
draw graphs from the sampler's :class:`~pynsqadmin.history.History`.  Safety:
Jinja2 escapes everything a daemon or a URL put in a page; no GET changes
anything; an action is a POST answered with a confirmation page whose form
carries a token (an HMAC of the action and its target under a per-process
key), and only a POST with that token acts -- so another site cannot make a
browser act, even with the confirmation skipped.  A Content-Security-Policy
allows nothing but this server's own files.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import math
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import jinja2
import trio

from pynsqd import version_string
from pynsqd.flags import format_duration
from pynsqd.http_server import HTTPError, Request, Response, Router, plain_text, respond
from pynsqd.log import get_logger
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from . import beyond, graph
from .actions import ACTIONS, ActionError, Target, facts, for_scope, question, run_action, validate
from .cluster_info import Answer, KnownNode, Snapshot, ago, producer_address
from .views import ChannelRow, lookupd_registrations, topic_rows, topic_view

if TYPE_CHECKING:
    from .nsqadmin import NSQAdmin

HTML = b"text/html; charset=utf-8"
SECURITY_HEADERS = [
    (
        b"Content-Security-Policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"same-origin"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cache-Control", b"no-store"),
]
STATIC_TYPES = {"css": b"text/css; charset=utf-8", "js": b"text/javascript; charset=utf-8", "svg": b"image/svg+xml"}
TOPIC_CHARTS = (("rate", "Messages", "/s"), ("depth", "Topic depth", ""), ("channel_depth", "Channels' depth", ""), ("in_flight", "In flight", ""))
CHANNEL_CHARTS = (("rate", "Messages", "/s"), ("depth", "Depth", ""), ("in_flight", "In flight", ""), ("deferred", "Deferred", ""))


# ---------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    """Table numbers: exact integers with separators, rates with one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{int(value):,}"


def duration(seconds: float) -> str:
    """e2e latencies: ``350µs``, ``12.5ms``, ``2.1s``, ``3m0s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return format_duration(round(seconds))


def pct(quantile: float) -> str:
    return f"{quantile * 100:g}"


def client_attributes(client: dict[str, Any]) -> list[str]:
    out = []
    if client.get("tls"):
        version = client.get("tls_version") or ""
        out.append(f"TLS {version}".strip())
    if client.get("snappy"):
        out.append("snappy")
    if client.get("deflate"):
        out.append("deflate")
    if client.get("sample_rate"):
        out.append(f"sampled {client['sample_rate']}%")
    if client.get("authed"):
        out.append(f"auth {client.get('auth_identity') or ''}".strip())
    return out


def html_response(body: str, status: int = 200) -> Response:
    return Response(status, body.encode(), HTML, list(SECURITY_HEADERS))


def redirect(location: str) -> Response:
    return Response(303, b"", None, [(b"Location", location.encode()), *SECURITY_HEADERS])


def _normalize_base(path: str) -> str:
    return "/" + path.strip("/") + "/" if path.strip("/") else "/"


# ---------------------------------------------------------------- pages


class AdminHTTP:
    def __init__(self, admin: NSQAdmin) -> None:
        self.admin = admin
        self.options = admin.options
        self.cluster = admin.cluster
        self.base = _normalize_base(self.options.base_path)
        self._key = secrets.token_bytes(32)  # confirmation tokens die with the process
        self._log = get_logger()
        self._static = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in ("style.css", "live.js", "favicon.svg")}
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader(__package__, "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            url=self.url,
            fmt=fmt,
            duration=duration,
            pct=pct,
            client_attributes=client_attributes,
            producer_address=producer_address,
            actions_for=for_scope,
            body_text=beyond.body_text,
            when=beyond.when,
            size=beyond.size,
            peek_counts=beyond.PEEK_COUNTS,
            version=version_string("nsqadmin"),
            sample_interval=format_duration(self.options.sample_interval),
        )

    def url(self, path: str, *names: str) -> str:
        """A link under --base-path; ``names`` (topics, channels, nodes) are
        quoted as path segments."""
        out = self.base + path
        for name in names:
            out += "/" + quote(str(name), safe=":[]")
        return out

    def router(self) -> Router:
        b = self.base
        r = Router(default_max_body=64 * 1024)
        r.add("GET", b, self.topics_page)
        if b != "/":
            r.add("GET", b.rstrip("/"), self.to_base)
        r.add("GET", b + "topics/**", self.topic_or_channel_page)
        r.add("GET", b + "nodes", self.nodes_page)
        r.add("GET", b + "nodes/**", self.node_page)
        r.add("GET", b + "lookup", self.lookup_page)
        r.add("POST", b + "actions", self.action)
        r.add("GET", b + "static/*", self.static)
        r.add("GET", b + "ping", self.ping)
        r.add(("GET", "PUT"), b + "config/*", self.config)
        return r

    # ------------------------------------------------------------ helpers

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        now = datetime.datetime.now().astimezone()
        base_context = {
            "title": context.get("title", "pynsqadmin"),
            "section": "",
            "notice": "",
            "errors": [],
            "refresh": self.options.sample_interval if template not in ("confirm.html", "result.html", "message.html") else 0,
            "actions_enabled": False,
            "read_only": self.options.disable_actions,
            "now_iso": now.isoformat(timespec="seconds"),
            "now_text": now.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "ago": lambda ts: ago(time.time() - ts),
        }
        base_context.update(context)
        return html_response(self.env.get_template(template).render(**base_context), status)

    def message(self, status: int, heading: str, text: str, back: str = "") -> Response:
        return self.render("message.html", status, title=heading, heading=heading, message=text, back=back or self.url(""))

    def actions_allowed(self, req: Request) -> bool:
        """nsqadmin's rule: with --admin-user, only those users (named by the
        --acl-http-header a proxy sets) may act; --disable-actions: nobody."""
        if self.options.disable_actions:
            return False
        if not self.options.admin_users:
            return True
        user = (req.header(self.options.acl_http_header.encode()) or b"").decode("latin-1")
        return user in self.options.admin_users

    def notice(self, req: Request) -> str:
        done = ACTIONS.get(req.arg("done") or "")
        if done is None:
            return ""
        # only numbers come from the URL into the text
        counts = {k: fmt(int(v)) if (v := req.arg(k) or "").isdigit() else "?" for k in done.counts}
        return done.done.format(**counts)

    def charts(self, topic: str, channel: str, spec: tuple[tuple[str, str, str], ...]) -> list[Any]:
        series = self.admin.history.series(topic, channel)
        if series is None:
            return []
        window = self.graph_window()
        return [graph.line_chart(series[metric], title=title, unit=unit, window=window, width=290, css_class=f"graph-{metric}") for metric, title, unit in spec]

    def graph_window(self) -> float:
        """--history, or less while pynsqadmin has not been up that long (a
        minute at least): a fresh start shows its few points, not a spike."""
        times = self.admin.history.times()
        if not times:
            return self.options.history_duration
        return min(self.options.history_duration, max(60.0, time.time() - times[0]))

    def down_nodes(self, snapshot: Snapshot, topic: str | None = None, *, complete: bool) -> list[KnownNode]:
        self.admin.nodes.update(snapshot, complete=complete)
        return self.admin.nodes.down(snapshot, topic)

    # ------------------------------------------------------------ pages

    async def to_base(self, req: Request) -> Response:
        return redirect(self.base)

    async def topics_page(self, req: Request) -> Response:
        snapshot = Snapshot(taken=0)
        lookupd_topics: dict[str, Answer] = {}

        async def get_snapshot() -> None:
            nonlocal snapshot
            snapshot = await self.cluster.snapshot()

        async def get_topics() -> None:
            nonlocal lookupd_topics
            lookupd_topics = await self.cluster.each("GET", self.cluster.lookupd_addresses, "/topics")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_snapshot)
            nursery.start_soon(get_topics)
        registered = {t for a in lookupd_topics.values() if a.ok for t in (a.data or {}).get("topics") or ()}
        down = self.down_nodes(snapshot, complete=True)
        rows = topic_rows(snapshot, registered, down)
        history = self.admin.history
        window = self.graph_window()
        sparks = {}
        for row in rows:
            series = history.series(row.name)
            sparks[row.name] = graph.sparkline(series["rate"], window=window, label=f"{row.name} message rate") if series else ""
        return self.render(
            "topics.html",
            title="Topics",
            section="topics",
            rows=rows,
            rates={row.name: history.latest(row.name, "", "rate") for row in rows},
            sparks=sparks,
            window_text=format_duration(window),
            errors=snapshot.errors(),
            notice=self.notice(req),
        )

    async def topic_or_channel_page(self, req: Request) -> Response:
        parts = [unquote(p) for p in req.path[len(self.base + "topics/") :].split("/")]
        if len(parts) == 1 and is_valid_topic_name(parts[0]):
            return await self.topic_page(req, parts[0])
        if len(parts) == 2 and is_valid_topic_name(parts[0]) and is_valid_channel_name(parts[1]):
            return await self.channel_page(req, parts[0], parts[1])
        return self.message(404, "Not found", "No such page: topic and channel names are 1-64 characters of . a-z A-Z 0-9 _ - (and #ephemeral).")

    async def topic_page(self, req: Request, topic: str) -> Response:
        snapshot = await self.cluster.snapshot(topic=topic)
        down = self.down_nodes(snapshot, topic, complete=False)
        view = topic_view(snapshot, topic, down)
        history = self.admin.history
        registered_only = False
        if not view.exists and history.series(topic) is None:
            # created through nsqlookupd, no nsqd has it yet: a page, not a 404
            lookups = await self.cluster.each("GET", self.cluster.lookupd_addresses, "/lookup", {"topic": topic})
            if not any(a.ok for a in lookups.values()):
                return self.message(404, "Topic not found", f"No nsqd or nsqlookupd has topic {topic!r}.", self.url(""))
            registered_only = True
        allowed = self.actions_allowed(req)
        peek = beyond.peek_count(req.arg("peek"))
        find = beyond.message_id(req.arg("find"))
        extras = await beyond.gather(self.cluster, [r.node for r in view.node_rows], topic, dead_letters=beyond.ORIGINS_SHOWN, peek=peek, find=find)
        return self.render(
            "topic.html",
            title=f"Topic {topic}",
            section="topics",
            view=view,
            target=Target(topic),
            extras=extras,
            facts=facts(len(view.paused_on), len(view.node_rows), *extras.facts(r.doc for r in view.node_rows)),
            prefill=extras.prefill(),
            disk_bound=bool(view.nodes_with("max_disk_bytes")),
            dead_lettering=any(ch.nodes_with("max_attempts") for ch in view.channels.values()),
            find=find,
            find_asked=req.arg("find"),
            node_target=lambda node, t=topic: Target(t, node=node),
            quantiles=sorted({q for row in view.node_rows for q in row.e2e} | {q for ch in view.channels.values() for q in ch.e2e}, reverse=True),
            charts=self.charts(topic, "", TOPIC_CHARTS),
            channel_rates={name: history.latest(topic, name, "rate") for name in view.channels},
            registered_only=registered_only,
            actions_enabled=allowed,
            errors=snapshot.errors(),
            notice=self.notice(req),
        )

    async def channel_page(self, req: Request, topic: str, channel: str) -> Response:
        snapshot = await self.cluster.snapshot(topic=topic, channel=channel, include_clients=True)
        down = self.down_nodes(snapshot, topic, complete=False)
        view = topic_view(snapshot, topic, down)
        row = view.channels.get(channel)
        if row is None:
            if self.admin.history.series(topic, channel) is None:
                return self.message(404, "Channel not found", f"No nsqd has channel {channel!r} of topic {topic!r}.", self.url("topics", topic))
            row = ChannelRow(channel)
        peek = beyond.peek_count(req.arg("peek"))
        peek_extra = req.arg("all") == "1"
        extras = await beyond.gather(self.cluster, [r.node for r in row.node_rows], topic, channel, dead_letters=0, peek=peek, peek_extra=peek_extra)
        return self.render(
            "channel.html",
            title=f"Channel {topic}/{channel}",
            section="topics",
            topic=topic,
            channel=row,
            down=down,
            target=Target(topic, channel),
            extras=extras,
            facts=facts(len(row.paused_on), len(row.node_rows), *extras.facts(r.doc for r in view.node_rows)),
            prefill=extras.prefill(),
            dead_lettering=bool(row.nodes_with("max_attempts")),
            quantiles=sorted({q for r in row.node_rows for q in r.e2e}, reverse=True),
            charts=self.charts(topic, channel, CHANNEL_CHARTS),
            connected=lambda ts: format_duration(max(0, int(time.time() - ts))) if ts else "–",
            actions_enabled=self.actions_allowed(req),
            errors=snapshot.errors(),
            notice=self.notice(req),
        )

    async def nodes_page(self, req: Request) -> Response:
        snapshot = await self.cluster.snapshot(with_info=True)
        down = [k for k in self.down_nodes(snapshot, complete=True) if k.address not in snapshot.nodes]
        return self.render(
            "nodes.html",
            title="Nodes",
            section="nodes",
            nodes=sorted(snapshot.nodes.values(), key=lambda n: n.address),
            down=down,
            lookupds=snapshot.lookupds,
            errors=snapshot.errors(),
        )

    async def node_page(self, req: Request) -> Response:
        address = unquote(req.path[len(self.base + "nodes/") :])
        # only nodes the cluster names are ever asked: a URL is not an address book
        snapshot = await self.cluster.snapshot(with_info=True, only=[address])
        node = snapshot.nodes.get(address)
        if node is not None:
            self.admin.nodes.update(snapshot, complete=True)
        known = next((k for k in self.admin.nodes.down(snapshot) if k.address == address), None)
        if node is None and known is None:
            return self.message(404, "Node not found", f"{address!r} is not registered with any nsqlookupd, nor an --nsqd-http-address.", self.url("nodes"))
        started = ""
        if node is not None and node.up:
            start = node.stats.get("start_time") if node.stats else None
            if start:
                started = datetime.datetime.fromtimestamp(start).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") + f" ({ago(time.time() - start)} ago)"
        return self.render("node.html", title=f"nsqd {address}", section="nodes", address=address, node=node, known=known, started=started)

    async def lookup_page(self, req: Request) -> Response:
        lookupds: dict[str, dict[str, Any]] = {}
        limiter = trio.CapacityLimiter(16)

        async def one(addr: str) -> None:
            ci = self.cluster
            info, topics, debug = await ci.request("GET", addr, "/info"), await ci.request("GET", addr, "/topics"), await ci.request("GET", addr, "/debug")
            if not (topics.ok and debug.ok):
                lookupds[addr] = {"ok": False, "error": topics.error or debug.error}
                return
            regs = lookupd_registrations(debug.data or {})
            table = {t: {"channels": sorted(regs.get(t, {}).get("channels", {})), "producers": regs.get(t, {}).get("producers", [])} for t in sorted((topics.data or {}).get("topics") or ())}

            async def channels_of(topic: str) -> None:
                async with limiter:
                    answer = await ci.request("GET", addr, "/channels", {"topic": topic})
                if answer.ok:
                    table[topic]["channels"] = sorted(set(table[topic]["channels"]) | set((answer.data or {}).get("channels") or ()))

            async with trio.open_nursery() as nursery:
                for topic, entry in table.items():
                    if not entry["producers"]:  # created through lookupd: /debug does not show its channels
                        nursery.start_soon(channels_of, topic)
            lookupds[addr] = {"ok": True, "error": "", "version": (info.data or {}).get("version", "") if info.ok else "", "topics": table}

        async with trio.open_nursery() as nursery:
            for addr in self.cluster.lookupd_addresses:
                nursery.start_soon(one, addr)
        ordered = {a: lookupds[a] for a in self.cluster.lookupd_addresses if a in lookupds}
        return self.render(
            "lookup.html",
            title="Lookup",
            section="lookup",
            lookupds=ordered,
            node_target=lambda node, topic: Target(topic, node=node),
            actions_enabled=self.actions_allowed(req),
            errors=[f"nsqlookupd {a}: {v['error']}" for a, v in ordered.items() if not v["ok"]],
            notice=self.notice(req),
        )

    # ------------------------------------------------------------ actions

    def token(self, action: str, target: Target) -> str:
        # the fields' values too: the confirmation approves exactly those
        text = json.dumps([action, target.topic, target.channel, target.node, sorted(target.values.items())])
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def page_of(self, target: Target, then: str) -> str:
        if then == "topics" or not target.topic:
            return self.url("")
        if then == "lookup":
            return self.url("lookup")
        if target.channel and then != "topic":
            return self.url("topics", target.topic, target.channel)
        return self.url("topics", target.topic)

    def _same_origin(self, req: Request) -> bool:
        origin = req.header(b"origin")
        if origin is None:  # not a browser, or an old one: the token still guards
            return True
        # behind a reverse proxy the browser's host may be in X-Forwarded-Host
        hosts = {(req.header(name) or b"").decode("latin-1") for name in (b"host", b"x-forwarded-host")}
        return urlsplit(origin.decode("latin-1")).netloc in hosts - {""}

    async def action(self, req: Request) -> Response:
        if not self.actions_allowed(req):
            return self.message(403, "Actions are disabled", "This pynsqadmin is read-only (--disable-actions), or you are not one of its --admin-user.")
        if not self._same_origin(req):
            return self.message(403, "Refused", "The form was sent from another site.")
        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        action = ACTIONS.get(form.get("action", ""))
        if action is None:
            return self.message(400, "Unknown action", "No such action.")
        values = {f.name: form.get(f.name, "") for f in action.fields}
        try:
            target = validate(action, Target(form.get("topic", "").strip(), form.get("channel", "").strip(), form.get("node", "").strip(), values))
        except ActionError as exc:
            return self.message(400, "Cannot do that", str(exc))
        back = self.page_of(target, "same")
        token = self.token(action.name, target)
        if "confirm" not in form:
            text = question(action, target)
            return self.render("confirm.html", title=action.label, action=action, target=target, question=text, fields=target.values, token=token, back=back)
        if not hmac.compare_digest(form["confirm"], token):
            return self.message(403, "Confirmation expired", "pynsqadmin was restarted since this form was shown: please try again.", back)
        try:
            outcomes = await run_action(self.cluster, action, target)
        except ActionError as exc:
            return self.message(400, "Cannot do that", str(exc), back)
        failed = [o for o in outcomes if not o.ok]
        user = (req.header(self.options.acl_http_header.encode()) or b"").decode("latin-1")
        self._log.info(
            "admin action",
            action=action.name,
            topic=target.topic,
            channel=target.channel,
            node=target.node,
            user=user,
            remote=req.remote_address,
            values=target.values,
            failed=len(failed),
        )
        self.admin.notify(action.name, target, user=user, request=req)
        if len(failed) < len(outcomes):
            # a fresh sample, so that the graphs of the page shown next agree
            # with its tables (emptied: depth 0 now, not at the next sample)
            with trio.move_on_after(self.options.http_client_connect_timeout + self.options.http_client_request_timeout):
                await self.admin.sample_once()
        if failed:
            return self.render("result.html", 502, title=action.label, action=action, outcomes=outcomes, failed=failed, back=self.page_of(target, action.then))
        counts = {k: sum(o.counts.get(k, 0) for o in outcomes) for k in action.counts}
        return redirect(self.page_of(target, action.then) + "?" + urlencode({"done": action.name, **counts}))

    # ------------------------------------------------------------ the rest

    async def static(self, req: Request) -> Response:
        name = req.path.rsplit("/", 1)[1]
        body = self._static.get(name)
        if body is None:
            raise HTTPError(404, "NOT_FOUND")
        return Response(200, body, STATIC_TYPES[name.rsplit(".", 1)[1]], [(b"Cache-Control", b"max-age=300"), (b"X-Content-Type-Options", b"nosniff")])

    async def ping(self, req: Request) -> Response:
        return plain_text("OK")

    async def config(self, req: Request) -> Response:
        """nsqadmin's ``/config/<opt>``: the lookupd list and log level, read
        and set at run time from --allow-config-from-cidr only."""
        host = req.remote_address.rsplit(":", 1)[0].strip("[]")
        try:
            allowed = ipaddress.ip_address(host) in ipaddress.ip_network(self.options.allow_config_from_cidr, strict=False)
        except ValueError:
            allowed = False
        if not allowed:
            raise HTTPError(403, "FORBIDDEN")
        name = req.path.rsplit("/", 1)[1]
        if name not in ("nsqlookupd_http_addresses", "log_level"):
            raise HTTPError(400, "INVALID_OPTION")
        if req.method == "PUT":
            try:
                value = json.loads(req.body)
            except ValueError:
                value = req.body.decode("utf-8", "replace").strip()  # a bare log level
            if name == "nsqlookupd_http_addresses":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise HTTPError(400, "INVALID_VALUE")
                self.cluster.lookupd_addresses = list(value)
            else:
                if value not in ("debug", "info", "warn", "error", "fatal"):
                    raise HTTPError(400, "INVALID_VALUE")
                self.admin.set_log_level(value)
        if name == "nsqlookupd_http_addresses":
            return respond(self.cluster.lookupd_addresses)
        return respond(self.admin.log_level)
