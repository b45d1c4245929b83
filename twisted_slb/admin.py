"""
The admin listener: C{/} (an HTML page), C{/stats} (JSON), C{/metrics}
(Prometheus text format) and a small API to drain or enable a backend::

    [admin]
    bind = "tcp:8404:interface=127.0.0.1"
    token = ""        # when set, actions (POST, DELETE) need "Authorization: Bearer <token>"
    hosts = []        # more names a request's Host may carry (besides the bind address and localhost)

POST actions (C{/backends/<group>/<backend>/drain}, C{.../enable},
C{.../down}, C{.../up}) set the operator's state of a backend (C{drain}:
no new clients; C{down}: maintenance, no clients; C{enable} or C{up}: ready),
which holds until the operator changes it, whatever the health checks say.

C{/tables} shows the stick tables, and C{DELETE /tables/NAME/KEY} and
C{DELETE /tables/NAME} unpin one client or clear a table (L{TablesPage});
each backend's pinned and cookie clients are in C{/stats}, C{/metrics} and
the page (L{twisted_slb.persistence.census}).

Actions (POST and DELETE) change the balancer, so L{AdminAccess} refuses
them when they could come from a web page the operator's browser shows:

 - every request's C{Host} must be one of the listener's names (421
   otherwise), so that a DNS-rebinding page can neither read nor act;
 - a request a browser sent from another origin (C{Origin}, or
   C{Sec-Fetch-Site} other than C{same-origin}) is refused (403), and a
   cross-site read (a C{fetch} or C{<script>} of C{/stats}) too;
 - an action that shows any sign of a browser (C{Origin}, C{Sec-Fetch-*},
   C{Referer}, C{Cookie}, a form's content type) needs the header
   C{X-SLB-Admin: 1} or the token, which neither a cross-site form nor a
   C{no-cors} fetch can send; C{curl -X POST} sends none of those signs
   and needs nothing more;
 - without a token, actions are allowed from loopback only; with one,
   only with C{Authorization: Bearer <token>}.

These checks run on the request head, before any body byte is read
(L{AdminAccess.check_head}); bodies are capped at L{MAX_BODY_BYTES}, and a
request must arrive whole within L{REQUEST_TIMEOUT} seconds.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, quote, unquote_to_bytes

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.template import Tag, flattenString, tags

from twisted_slb.limits import ConnectionLimit
from twisted_slb.persistence.census import table_counts
from twisted_slb.backends import ADMIN_STATES, DRAIN, MAINT, READY
from twisted_slb.stats import StatsRegistry, UDPListenerStats
from twisted_slb.web.front import BadRequest, HTTPFrontFactory

log = Logger(namespace="twisted_slb.admin")

#: The header the admin page's script sends with its POSTs; a cross-site
#: form or C{no-cors} fetch cannot send it (a CORS fetch would need a
#: preflight, which the admin listener never grants).
ADMIN_HEADER = b"X-SLB-Admin"
#: Largest request body the admin listener reads (the actions need none).
MAX_BODY_BYTES = 4096
#: Seconds a request (head and body) has to arrive from its first byte, and
#: an idle keep-alive connection stays open.
REQUEST_TIMEOUT = 10.0
MAX_HEADER_BYTES = 16384
MAX_HEADERS = 64

CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
#: Content types a cross-site HTML form can send.
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain")
_SAFE_METHODS = (b"GET", b"HEAD")


def _split_host(value: str) -> Tuple[str, Optional[str]]:
    """C{"name:port"} or C{"[v6]:port"} -> (lower-case name, port or L{None})."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            raise ValueError(value)
        return name, rest[1:] or None
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name.rstrip("."), port
    if ":" in value:
        raise ValueError(value)
    return value.rstrip("."), None


def _origin(value: str) -> Optional[Tuple[str, str, str]]:
    """C{scheme://host[:port]} -> (scheme, host, port with the default filled in)."""
    scheme, sep, rest = value.strip().lower().partition("://")
    if not sep or scheme not in ("http", "https") or "/" in rest:
        return None
    try:
        name, port = _split_host(rest)
    except ValueError:
        return None
    return scheme, name, port or ("443" if scheme == "https" else "80")


def bind_interface(bind: str) -> Optional[str]:
    """
    The address a C{tcp:}/C{ssl:} endpoint description binds (C{""} for every
    interface), or L{None} for other endpoints (C{unix:}, C{systemd:}).
    """
    kind, _, rest = bind.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    interface = ""
    for part in rest.replace("\\:", "\0").split(":")[1:]:
        key, eq, value = part.partition("=")
        if eq and key == "interface":
            interface = value.replace("\0", ":")
    if not interface and kind == "tcp6":
        return "::"
    return interface


def exposed_without_token(bind: str, token: str) -> bool:
    """Whether an admin listener on C{bind} is reachable beyond loopback with no token."""
    if token:
        return False
    interface = bind_interface(bind)
    if interface is None:
        return False  # a UNIX socket: file permissions decide
    if interface == "":
        return True
    try:
        return not ipaddress.ip_address(interface.split("%")[0]).is_loopback
    except ValueError:
        return True


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class AdminAccess:
    """
    Who may read and act through the admin listener (see the module
    docstring for the rules).

    @ivar token: the bearer token actions need, or C{""}.
    @ivar names: host names (lower case) a request's C{Host} may carry, on
        top of the address the connection arrived on.
    """

    def __init__(self, token: str = "", names: Iterable[str] = ()) -> None:
        self.token = token
        self.names = frozenset(
            {"localhost"} | {n.lower().strip("[]").rstrip(".") for n in names if n}
        )

    def _header(self, request, name: bytes) -> Optional[str]:
        value = request.getHeader(name)
        return None if value is None else value.decode("latin-1")

    def host_refusal(self, request) -> Optional[Tuple[int, str]]:
        """421 unless C{Host} names this listener (a rebinding page's does not)."""
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if not values:
            if request.clientproto == b"HTTP/1.0":
                return None  # no name to check: not what a browser sends
            return 400, "no Host header"
        if len(values) > 1:
            return 400, "more than one Host header"
        try:
            name, _ = _split_host(values[0].decode("latin-1"))
        except ValueError:
            return 400, f"invalid Host {values[0][:80]!r}"
        local = getattr(request.getHost(), "host", None)
        if name in self.names or (local is not None and name == local.split("%")[0].lower()):
            return None
        return 421, (f"Host {name!r} is not a name of this admin listener "
                     "(add it to [admin] hosts if it is)")

    def cross_site_refusal(self, request) -> Optional[str]:
        """Why a browser request from another origin is refused, or L{None}."""
        site = self._header(request, b"sec-fetch-site")
        safe = request.method in _SAFE_METHODS
        if safe:
            # Reads: a navigation (a link to the page) is fine; a
            # cross-site fetch or <script src> of /stats is not.
            if site in ("cross-site", "same-site") and self._header(request, b"sec-fetch-mode") != "navigate":
                return f"a cross-site read (Sec-Fetch-Site {site})"
            return None
        origin = self._header(request, b"origin")
        if origin is not None:
            own = _origin(("https" if request.isSecure() else "http") + "://" +
                          (self._header(request, b"host") or ""))
            if own is None or _origin(origin) != own:
                return f"a request from another origin (Origin {origin[:80]})"
        if site is not None and site != "same-origin":
            return f"a request from another site (Sec-Fetch-Site {site[:40]})"
        return None

    def _from_browser(self, request) -> bool:
        headers = request.requestHeaders
        for name in (b"origin", b"sec-fetch-site", b"sec-fetch-mode", b"referer", b"cookie"):
            if headers.hasHeader(name):
                return True
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        return content_type in _FORM_TYPES

    def action_refusal(self, request) -> Optional[str]:
        """Why a state-changing request is not authorized, or L{None}."""
        if self.token:
            given = request.getHeader(b"authorization") or b""
            if hmac.compare_digest(given, b"Bearer " + self.token.encode("utf-8")):
                return None
            return "a valid 'Authorization: Bearer <token>' header is required"
        if not _is_loopback(getattr(request.getClientAddress(), "host", "")):
            return "actions are allowed from loopback only (or set [admin].token)"
        if self._from_browser(request) and request.getHeader(ADMIN_HEADER) != b"1":
            return "a browser's request needs the 'X-SLB-Admin: 1' header (the admin page's buttons send it)"
        return None

    def refusal(self, request) -> Optional[Tuple[int, str]]:
        """C{(status, why)} if C{request} must be refused, else L{None}."""
        refused = self.host_refusal(request)
        if refused is not None:
            return refused
        why = self.cross_site_refusal(request)
        if why is None and request.method not in _SAFE_METHODS:
            why = self.action_refusal(request)
        return None if why is None else (403, why)

    def check_head(self, request) -> None:
        """
        The L{HTTPFrontFactory.check_head} hook: refuse on the request head,
        before any body byte is read.

        @raise BadRequest: the request is refused.
        """
        refused = self.refusal(request)
        if refused is not None:
            code, why = refused
            raise BadRequest(f"{request.method.decode('ascii', 'replace')} {request.path[:100].decode('ascii', 'replace')}: {why}", code)


class _Collector:
    """Reads the registry at scrape time (nothing is counted twice)."""

    def __init__(self, registry: StatsRegistry) -> None:
        self.registry = registry

    def collect(self):
        requests = CounterMetricFamily("slb_requests", "HTTP requests by listener, backend and status code",
                                       labels=["listener", "backend", "code"])
        connections = CounterMetricFamily("slb_connections", "Client connections accepted", labels=["listener"])
        active = GaugeMetricFamily("slb_connections_active", "Client connections open now", labels=["listener"])
        persistence = CounterMetricFamily("slb_persistence", "Persistence outcomes (hit, new, repin, expired, strict, none)",
                                          labels=["listener", "outcome"])
        for stats in self.registry.listeners.values():
            for (backend, code), count in stats.requests.items():
                requests.add_metric([stats.name, backend, str(code)], count)
            connections.add_metric([stats.name], stats.connections_total)
            active.add_metric([stats.name], stats.active)
            for outcome, count in stats.persistence.items():
                persistence.add_metric([stats.name, outcome], count)
        up = GaugeMetricFamily("slb_backend_up", "1 when the backend is up (drained included)", labels=["group", "backend"])
        weight = GaugeMetricFamily("slb_backend_weight", "Scheduling weight (0: drain)", labels=["group", "backend"])
        busy = GaugeMetricFamily("slb_backend_active", "Connections or requests in flight", labels=["group", "backend"])
        failures = CounterMetricFamily("slb_backend_failures", "Failed connects and requests", labels=["group", "backend"])
        byte_count = CounterMetricFamily("slb_backend_bytes", "Bytes to and from the backend",
                                         labels=["group", "backend", "direction"])
        admin = GaugeMetricFamily("slb_backend_admin_state", "The operator's state (1 for the one in force)",
                                  labels=["group", "backend", "state"])
        healthy = GaugeMetricFamily("slb_backend_healthy", "1 when the health checks (active and passive) "
                                    "consider the backend up", labels=["group", "backend"])
        ejected = GaugeMetricFamily("slb_backend_ejected", "1 while passive checks have ejected the backend",
                                    labels=["group", "backend"])
        ejections = CounterMetricFamily("slb_backend_ejections", "Ejections by passive checks",
                                        labels=["group", "backend"])
        pinned = GaugeMetricFamily("slb_backend_pinned_clients", "Stick table entries (clients) pinned to the "
                                   "backend, over every table", labels=["group", "backend"])
        cookie_clients = GaugeMetricFamily("slb_backend_cookie_clients", "Distinct clients the backend served "
                                           "with an insert or rewrite cookie in the last max_idle seconds "
                                           "(HyperLogLog estimate)", labels=["group", "backend"])
        pinned_counts = self.registry.census.pinned()
        cookie_counts = self.registry.census.cookies()
        for group in self.registry.groups.values():
            for b in group.backends:
                labels = [group.name, b.name]
                pinned.add_metric(labels, pinned_counts.get((group.name, b.name), 0))
                cookie_clients.add_metric(labels, cookie_counts.get((group.name, b.name), 0))
                up.add_metric(labels, 1 if b.up else 0)
                for state in ADMIN_STATES:
                    admin.add_metric(labels + [state], 1 if b.admin_state == state else 0)
                healthy.add_metric(labels, 1 if b.health_state == "up" else 0)
                ejected.add_metric(labels, 1 if b.ejected else 0)
                health = b.extra.get("health")
                ejections.add_metric(labels, getattr(health, "ejections", 0))
                weight.add_metric(labels, b.weight)
                busy.add_metric(labels, b.active)
                failures.add_metric(labels, b.failures)
                byte_count.add_metric(labels + ["in"], b.bytes_in)
                byte_count.add_metric(labels + ["out"], b.bytes_out)
        entries = GaugeMetricFamily("slb_table_entries", "Live entries of a stick table", labels=["table", "type"])
        for table in self.registry.census.describe():
            entries.add_metric([table["name"], table["type"]], table["entries"])
        return [requests, connections, active, persistence, up, weight, busy, failures, byte_count,
                admin, healthy, ejected, ejections, pinned, cookie_clients, entries, *_udp_metrics(self.registry),
                *_store_metrics(self.registry)]


def _store_metrics(registry: StatsRegistry) -> list:
    """The shared store's state and counts (nothing with the memory store)."""
    store = registry.store
    if store is None:
        return []
    s = store.snapshot()
    up = GaugeMetricFamily("slb_store_up", "1 while the shared store (Redis) is connected and answering")
    up.add_metric([], 1 if s["connected"] and s["healthy"] else 0)
    episodes = CounterMetricFamily("slb_store_episodes", "Times the shared store became unreachable or slow")
    episodes.add_metric([], s["episodes"])
    ops = CounterMetricFamily("slb_store_operations", "Shared store operations by kind (lookups, lookup_hits, "
                              "lookup_timeouts, writes, refreshes, deletes, errors, skipped)", labels=["kind"])
    for kind in ("lookups", "lookup_hits", "lookup_timeouts", "writes", "refreshes", "deletes", "errors", "skipped"):
        ops.add_metric([kind], s[kind])
    return [up, episodes, ops]


def _udp_metrics(registry: StatsRegistry) -> list:
    """The udp listeners' datagrams, bytes, sessions and drops."""
    datagrams = CounterMetricFamily("slb_udp_datagrams", "UDP datagrams from clients (in) and to clients (out)",
                                    labels=["listener", "direction"])
    byte_count = CounterMetricFamily("slb_udp_bytes", "UDP payload bytes from clients (in) and to clients (out)",
                                     labels=["listener", "direction"])
    sessions = GaugeMetricFamily("slb_udp_sessions_active", "UDP sessions (client addresses) open now", labels=["listener"])
    sessions_total = CounterMetricFamily("slb_udp_sessions", "UDP sessions started", labels=["listener"])
    drops = CounterMetricFamily("slb_udp_drops", "UDP datagrams dropped, by reason", labels=["listener", "reason"])
    evictions = CounterMetricFamily("slb_udp_evictions", "UDP sessions evicted to stay within max_sessions",
                                    labels=["listener"])
    refused = CounterMetricFamily("slb_udp_refused", "UDP sessions whose backend answered port unreachable",
                                  labels=["listener"])
    for stats in registry.listeners.values():
        # A udp listener's stats (StatsRegistry.for_listener: protocol "udp").
        if not isinstance(stats, UDPListenerStats):
            continue
        name = stats.name
        datagrams.add_metric([name, "in"], stats.datagrams_in)
        datagrams.add_metric([name, "out"], stats.datagrams_out)
        byte_count.add_metric([name, "in"], stats.bytes_in)
        byte_count.add_metric([name, "out"], stats.bytes_out)
        sessions.add_metric([name], stats.active)
        sessions_total.add_metric([name], stats.connections_total)
        for reason, count in stats.drops.items():
            drops.add_metric([name, reason], count)
        evictions.add_metric([name], stats.evictions)
        refused.add_metric([name], stats.refused)
    return [datagrams, byte_count, sessions, sessions_total, drops, evictions, refused]


class _AdminPage(Resource):
    """
    A leaf of the admin tree: checks L{AdminAccess} (again, for a tree served
    by a plain twisted.web C{Site}), sends the security headers, and answers
    405 to methods it has no C{render_*} for.
    """

    isLeaf = True

    def __init__(self, access: AdminAccess) -> None:
        Resource.__init__(self)
        self.access = access

    def _guard(self, request) -> Optional[bytes]:
        """Send the security headers; the refusal's body if refused."""
        for name, value in _SECURITY_HEADERS:
            request.setHeader(name, value)
        refused = self.access.refusal(request)
        if refused is None:
            return None
        code, why = refused
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"{code} {why}\n".encode("utf-8")

    def render(self, request):
        refused = self._guard(request)
        if refused is not None:
            return refused
        method = request.method.decode("ascii", "replace")
        if request.method == b"HEAD" and not hasattr(self, "render_HEAD"):
            method = "GET"
        handler = getattr(self, "render_" + method, None)
        if handler is None:
            allowed = sorted(m[7:] for m in dir(self) if m.startswith("render_") and m[7:].isupper())
            request.setResponseCode(405)
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"405 Method Not Allowed: use {' or '.join(allowed)}\n".encode("utf-8")
        return handler(request)


class MetricsPage(_AdminPage):
    def __init__(self, access: AdminAccess, registry: StatsRegistry) -> None:
        _AdminPage.__init__(self, access)
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.prometheus.register(_Collector(registry))

    def render_GET(self, request):
        # generate_latest on the reactor thread: prometheus_client's own
        # Twisted resource runs the collection in a thread pool, where it
        # would read our counters while the reactor changes them.
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.prometheus)


class AdminState:
    """
    What the admin listener shows besides the registry's counters.

    @ivar registry: the L{StatsRegistry}.
    @ivar version: the twisted_slb version.
    @ivar started: when the balancer started (C{clock.seconds()}).
    @ivar binds: a callable returning listener name -> bind description.
    """

    def __init__(self, registry: StatsRegistry, clock=None, version: str = "",
                 binds: Optional[Callable[[], Mapping[str, str]]] = None, started: Optional[float] = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.registry = registry
        self.clock = clock
        self.version = version or _version()
        self.binds = binds or dict
        self.started = clock.seconds() if started is None else started

    def snapshot(self) -> dict:
        """The registry's snapshot, with each listener's bind, the version and the uptime."""
        doc = self.registry.snapshot()
        binds = self.binds()
        for listener in doc["listeners"]:
            listener["bind"] = binds.get(listener["name"])
        doc["version"] = self.version
        doc["uptime"] = round(self.clock.seconds() - self.started, 3)
        return doc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twisted_slb")
    except PackageNotFoundError:
        return "unknown"


class StatsPage(_AdminPage):
    def __init__(self, access: AdminAccess, state: AdminState) -> None:
        _AdminPage.__init__(self, access)
        self.state = state

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.state.snapshot(), indent=2).encode("utf-8")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}h {minutes:02d}m {seconds:02d}s" if hours or days else f"{minutes}m {seconds:02d}s"
    return f"{days}d {text}" if days else text


def _num(value) -> Tag:
    return tags.td(str(value), class_="num")


def _listener_rows(listeners: List[dict]) -> List[Tag]:
    rows = [tags.tr(*[tags.th(h) for h in (
        "listener", "protocol", "bind", "active", "connections", "requests", "by status", "persistence",
        "bytes in", "bytes out")])]
    for l in listeners:
        persistence = ", ".join(f"{k} {v}" for k, v in l["persistence"].items() if v)
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(l["requests_by_class"].items()))
        rows.append(tags.tr(
            tags.td(l["name"]), tags.td(l["protocol"]), tags.td(tags.code(l.get("bind") or "-")),
            _num(l["active_connections"]), _num(l["connections_total"]), _num(l["requests_total"]),
            tags.td(classes), tags.td(persistence), _num(l.get("bytes_in", 0)), _num(l["bytes_out"]),
        ))
    return rows


def _health(b: dict) -> str:
    """The health checks' view: active state, and a passive ejection with its time left."""
    passive = b.get("passive") or {}
    if passive.get("ejected"):
        return f"{b.get('health_state', '-')}, ejected ({passive.get('ejected_for', 0):.0f} s left)"
    return str(b.get("health_state", "-"))


def _backend_row(group: str, b: dict) -> Tag:
    health = b.get("health") or {}
    check = f"{health.get('last_status') or '-'} {health.get('last_reason') or ''}".strip()
    buttons = [
        tags.button(action, type="button", class_="act",
                    **{"data-group": group, "data-backend": b["name"], "data-action": action})
        for action in ("drain", "enable", "down", "up")
    ]
    return tags.tr(
        tags.td(b["name"]), tags.td(tags.code(str(b.get("id", "")))), tags.td(str(b["address"])),
        tags.td(tags.span(b["state"], class_=f"state {b['state']}")),
        tags.td(str(b.get("admin_state", "-"))), tags.td(_health(b)),
        _num(b["weight"]), _num(b["active"]), _num(b.get("pinned_clients", 0)), _num(b.get("cookie_clients", 0)),
        _num(b["total"]), _num(b["failures"]),
        _num(b["bytes_in"]), _num(b["bytes_out"]), tags.td(check), tags.td(*buttons, class_="actions"),
    )


def _udp_rows(snapshot: dict) -> List[Tag]:
    """The udp listeners' own table (nothing without udp listeners)."""
    udp = [l for l in snapshot["listeners"] if "udp" in l]
    if not udp:
        return []
    header = tags.tr(*[tags.th(h) for h in (
        "listener", "sessions", "sessions total", "datagrams in", "bytes in", "datagrams out", "bytes out",
        "drops", "evicted", "refused")])
    rows = [header]
    for l in udp:
        u = l["udp"]
        drops = ", ".join(f"{k} {v}" for k, v in u["drops"].items() if v) or "0"
        rows.append(tags.tr(
            tags.td(l["name"]), _num(u["sessions"]), _num(u["sessions_total"]), _num(u["datagrams_in"]),
            _num(l["bytes_in"]), _num(u["datagrams_out"]), _num(l["bytes_out"]), tags.td(drops),
            _num(u["evictions"]), _num(u["refused"]),
        ))
    return [tags.h2("UDP listeners"), tags.table(*rows, id="udp")]


def _table_rows(snapshot: dict) -> List[Tag]:
    """The stick tables (nothing without any), each linked to its entries (JSON)."""
    tables = snapshot.get("tables") or []
    if not tables:
        return []
    rows = [tags.tr(*[tags.th(h) for h in ("table", "type", "used by", "entries", "max entries", "timeout")])]
    for t in tables:
        rows.append(tags.tr(
            tags.td(tags.a(tags.code(t["name"]), href=table_url(t["name"]))), tags.td(t["type"]),
            tags.td(", ".join(t.get("routes") or ()) or "-"), _num(t["entries"]),
            _num(t["max_entries"] if t["max_entries"] is not None else "-"),
            tags.td(f"{t['timeout']} s" if t["timeout"] is not None else "-", class_="num"),
        ))
    return [tags.h2("Stick tables"), tags.table(*rows, id="tables")]


def _process_text(process: Optional[dict]) -> str:
    """The process id and start time (they change on an upgrade), for the page's first line."""
    if not process:
        return ""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(process["started"]))
    return f" · process {int(process['pid'])}, started {started}"


def page_tag(snapshot: dict, token_required: bool = False) -> Tag:
    """The admin page for C{snapshot} (L{AdminState.snapshot}), as a tag tree."""
    body = [
        tags.h1("twisted_slb"),
        tags.p(f"version {snapshot.get('version', '?')} · up {_duration(snapshot.get('uptime', 0))}"
               f"{_process_text(snapshot.get('process'))}", id="about"),
    ]
    if token_required:
        body.append(tags.p(tags.label("token ", tags.input(type="password", id="token", autocomplete="off")),
                           " (actions need it; kept for this tab only)", id="auth"))
    body.append(tags.p("", id="message", role="status"))
    body += [tags.h2("Listeners"), tags.table(*_listener_rows(snapshot["listeners"]), id="listeners")]
    body += _udp_rows(snapshot)
    for g in snapshot["groups"]:
        header = tags.tr(*[tags.th(h) for h in (
            "backend", "id", "address", "state", "operator", "health", "weight", "active", "pinned",
            "cookie clients", "total", "failures", "bytes in", "bytes out", "last check", "actions")])
        scheduler = g["scheduler"]
        if scheduler == "hash":
            scheduler += f", key {g.get('hash_key', 'source_ip')}"
            if g.get("hash_balance_factor"):
                scheduler += f", bound {g['hash_balance_factor']}%"
        body.append(tags.h2(f"Group {g['name']} ", tags.small(f"({scheduler})")))
        body.append(tags.table(header, *[_backend_row(g["name"], b) for b in g["backends"]], class_="group",
                               **{"data-group": g["name"]}))
    body += _table_rows(snapshot)
    if snapshot.get("splits"):
        rows = [tags.tr(*[tags.th(h) for h in ("split", "group", "new clients", "requests")])]
        for split in snapshot["splits"]:
            for group in split["groups"]:
                rows.append(tags.tr(tags.td(split["route"]), tags.td(group), _num(split["clients"].get(group, 0)),
                                    _num(split["requests"].get(group, 0))))
        body += [tags.h2("Splits"), tags.table(*rows, id="splits")]
    body.append(tags.p(tags.a("stats (JSON)", href="/stats"), " · ", tags.a("metrics (Prometheus)", href="/metrics")))
    body.append(tags.script(src="/admin.js"))
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"), tags.meta(**{"http-equiv": "refresh", "content": "5"}),
            tags.title("twisted_slb"), tags.link(rel="stylesheet", href="/admin.css"),
        ),
        tags.body(*body),
        lang="en",
    )


def render_page(snapshot: dict, token_required: bool = False) -> bytes:
    """The admin page as bytes; every value is escaped by L{twisted.web.template}."""
    out: List[bytes] = []
    failures: list = []
    # Nothing in the tree is asynchronous: the Deferred has fired on return.
    flattenString(None, page_tag(snapshot, token_required)).addCallbacks(out.append, failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + out[0]


STYLE = b"""\
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f0f0f0}.num{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:.1em .6em;border-radius:.8em;color:#fff;font-weight:600}
.up{background:#1a8f3a}.drain{background:#d08a00}.down{background:#c62828}
.actions button{margin-right:.3em}#message:empty{display:none}
#message{padding:.3em .6em;background:#eef;border:1px solid #99c;display:inline-block}
"""

#: The page's script (served from the admin listener itself: the CSP allows
#: no inline script).  Its POSTs carry X-SLB-Admin (and the token when one is
#: typed), which no cross-site form can send.
SCRIPT = b"""\
"use strict";
(function () {
  var token = document.getElementById("token");
  if (token) {
    token.value = sessionStorage.getItem("slb-admin-token") || "";
    token.addEventListener("input", function () { sessionStorage.setItem("slb-admin-token", token.value); });
  }
  var message = document.getElementById("message");
  document.querySelectorAll("button[data-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      var headers = {"X-SLB-Admin": "1"};
      if (token && token.value) { headers["Authorization"] = "Bearer " + token.value; }
      var url = "/backends/" + encodeURIComponent(button.dataset.group) + "/" +
        encodeURIComponent(button.dataset.backend) + "/" + encodeURIComponent(button.dataset.action);
      fetch(url, {method: "POST", headers: headers, credentials: "omit", cache: "no-store"}).then(function (r) {
        return r.text().then(function (text) {
          message.textContent = text;
          if (r.ok) { location.reload(); }
        });
      }, function (error) { message.textContent = String(error); });
    });
  });
})();
"""


class StaticFile(_AdminPage):
    def __init__(self, access: AdminAccess, body: bytes, content_type: bytes) -> None:
        _AdminPage.__init__(self, access)
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        return self.body


class BackendAction(_AdminPage):
    """POST /backends/<group>/<backend>/<action>."""

    def __init__(self, access: AdminAccess, registry: StatsRegistry) -> None:
        _AdminPage.__init__(self, access)
        self.registry = registry

    def render_POST(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        parts = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if len(parts) != 3 or parts[2] not in ("drain", "enable", "down", "up"):
            request.setResponseCode(404)
            return b"404 Not Found: POST /backends/<group>/<backend>/(drain|enable|down|up)\n"
        group_name, backend_name, action = parts
        group = self.registry.groups.get(group_name)
        backend = group.get(backend_name) if group is not None else None
        if backend is None or backend.name != backend_name:
            request.setResponseCode(404)
            return f"404 Not Found: no backend {group_name}/{backend_name}\n".encode("utf-8")
        # The operator's state only: the health checks never change it, and
        # it never changes theirs.
        backend.admin_state = {"drain": DRAIN, "down": MAINT}.get(action, READY)
        log.info("admin: backend {group}/{backend} {action} by {client}; now {state} "
                 "(operator {admin_state}, health {health_state}), weight {weight}",
                 group=group_name, backend=backend_name, action=action,
                 client=getattr(request.getClientAddress(), "host", "?"), state=backend.state,
                 admin_state=backend.admin_state, health_state=backend.health_state, weight=backend.weight)
        return (f"{group_name}/{backend_name}: {backend.state} (operator {backend.admin_state}, "
                f"health {backend.health_state}), weight {backend.weight}\n").encode("utf-8")


def key_text(key: bytes) -> str:
    """
    A stick table key as text: itself when it is printable ASCII, else with
    C{\\xNN} escapes for the other bytes (and C{\\\\} for a backslash, so
    that the text always reads back to one key).
    """
    if all(0x20 <= c < 0x7F and c != 0x5C for c in key):
        return key.decode("ascii")
    return "".join(
        "\\\\" if c == 0x5C else chr(c) if 0x20 <= c < 0x7F else f"\\x{c:02x}" for c in key
    )


def table_url(name: str, key: Optional[bytes] = None) -> str:
    """The admin path of a table (its name percent-encoded, C{/} included), or of one of its keys."""
    url = "/tables/" + quote(name, safe="")
    return url if key is None else url + "/" + quote(key, safe="")


#: The most entries C{GET /tables/NAME} lists at once.
MAX_LIMIT = 100_000


class TablesPage(_AdminPage):
    """
    The stick tables at runtime:

     - C{GET /tables}: every table (name, type, the listeners and rules that
       use it, entries, C{max_entries}, C{timeout});
     - C{GET /tables/NAME?limit=100&backend=B}: its entries (key, backend,
       seconds idle), least recently used first, at most C{limit}, only
       those pinned to backend C{B} (a name or an id) if given;
     - C{GET /tables/NAME/KEY}: one entry; C{DELETE /tables/NAME/KEY}:
       unpin that client (its next visit is balanced anew);
     - C{DELETE /tables/NAME}: clear the table.

    C{NAME} is the table's name with its C{/} percent-encoded
    (C{web%2Fapp}); C{KEY} is the key's bytes, percent-encoded.  Only the
    L{twisted_slb.persistence.tables.IStickTable} methods C{items}, C{get}
    and C{delete} are used, so a table kept in a shared store is served the
    same way.  DELETE changes the balancer: L{AdminAccess} checks it as it
    does the POST actions.
    """

    def __init__(self, access: AdminAccess, registry: StatsRegistry) -> None:
        _AdminPage.__init__(self, access)
        self.census = registry.census

    def _locate(self, request) -> Tuple[Optional[str], Optional[bytes]]:
        """
        The table name and key the path names: C{(None, None)} for the list,
        C{(name, None)} for a table, C{(name, key)} for an entry.

        @raise KeyError: no such table.
        """
        raw = request.path.split(b"/")[1 + len(request.prepath):]
        if raw and raw[-1] == b"":
            raw = raw[:-1]
        if not raw:
            return None, None
        parts = [unquote_to_bytes(p) for p in raw]
        tables = self.census.tables
        first = parts[0].decode("utf-8", "replace")
        if first in tables:
            found = 1
        else:
            # A name written with its slashes as they are (web/app): the
            # longest run of segments that names a table.
            found = next((i for i in range(len(parts), 1, -1)
                          if b"/".join(parts[:i]).decode("utf-8", "replace") in tables), 0)
            if not found:
                raise KeyError(b"/".join(parts).decode("utf-8", "replace"))
            first = b"/".join(parts[:found]).decode("utf-8", "replace")
        rest = parts[found:]
        return first, (b"/".join(rest) if rest else None)

    def _not_found(self, request, what: str) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"404 Not Found: {what}\n".encode("utf-8")

    def _json(self, request, doc) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(doc, indent=2).encode("utf-8") + b"\n"

    def _backend(self, name: str, backend_key: str) -> Tuple[Optional[str], str]:
        backend = self.census.backend_for(name, backend_key)
        return (backend.name if backend is not None else None), backend_key

    def render_GET(self, request):
        try:
            name, key = self._locate(request)
        except KeyError as e:
            return self._not_found(request, f"no stick table {e.args[0]!r} (GET /tables lists them)")
        if name is None:
            tables = self.census.describe()
            for t in tables:
                t["url"] = table_url(t["name"])
            return self._json(request, {"tables": tables})
        table = self.census.tables[name]
        if key is not None:
            backend_key = table.get(key)
            if backend_key is None:
                return self._not_found(request, f"no entry {key_text(key)!r} in stick table {name!r}")
            backend, backend_id = self._backend(name, backend_key)
            return self._json(request, {"table": name, "key": key_text(key), "backend": backend,
                                        "backend_id": backend_id, "url": table_url(name, key)})
        return self._list(request, name, table)

    def _list(self, request, name: str, table):
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
        limit_text = (query.get("limit") or ["100"])[-1]
        if not limit_text.isdigit() or not 0 <= int(limit_text) <= MAX_LIMIT:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (f"400 Bad Request: limit {limit_text[:40]!r} is not an integer from 0 to {MAX_LIMIT}\n"
                    .encode("utf-8"))
        limit = int(limit_text)
        wanted = (query.get("backend") or [None])[-1]
        (doc,) = self.census.describe([name])
        # The counts come from the table's own per-backend counts (a walk
        # only for a table without them), so the walk below stops at limit.
        counts: Dict[str, int] = {}
        matched = 0
        for backend_key, count in table_counts(table).items():
            backend = self._backend(name, backend_key)[0]
            label = backend if backend is not None else backend_key
            counts[label] = counts.get(label, 0) + count
            if wanted is None or wanted in (backend, backend_key):
                matched += count
        names: Dict[str, Optional[str]] = {}
        shown: List[Dict[str, object]] = []
        for entry_key, backend_key, idle in table.items():
            if len(shown) >= limit:
                break
            backend = names.get(backend_key, "")
            if backend == "":
                backend = names[backend_key] = self._backend(name, backend_key)[0]
            if wanted is not None and wanted not in (backend, backend_key):
                continue
            shown.append({"key": key_text(entry_key), "backend": backend, "backend_id": backend_key,
                          "idle": round(idle, 3), "url": table_url(name, entry_key)})
        doc.update(backends=counts, matched=matched, shown=len(shown), truncated=matched > len(shown),
                   items=shown)
        return self._json(request, doc)

    def render_DELETE(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        try:
            name, key = self._locate(request)
        except KeyError as e:
            return self._not_found(request, f"no stick table {e.args[0]!r} (GET /tables lists them)")
        client = getattr(request.getClientAddress(), "host", "?")
        if name is None:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET")
            return b"405 Method Not Allowed: DELETE /tables/NAME clears one table, DELETE /tables/NAME/KEY one entry\n"
        table = self.census.tables[name]
        if key is None:
            keys = [k for k, _, _ in table.items()]
            for k in keys:
                table.delete(k)
            log.info("admin: stick table {table} cleared ({count} entries) by {client}",
                     table=name, count=len(keys), client=client)
            return f"{name}: cleared, {len(keys)} entries removed\n".encode("utf-8")
        backend_key = table.get(key)
        if backend_key is None:
            return self._not_found(request, f"no entry {key_text(key)!r} in stick table {name!r}")
        table.delete(key)
        backend = self._backend(name, backend_key)[0] or backend_key
        log.info("admin: stick table {table}: {key} unpinned from backend {backend} by {client}",
                 table=name, key=key_text(key), backend=backend, client=client)
        return f"{name}: {key_text(key)} unpinned from backend {backend}\n".encode("utf-8")


class AdminPage(_AdminPage):
    """C{/}: the HTML page."""

    def __init__(self, access: AdminAccess, state: AdminState) -> None:
        _AdminPage.__init__(self, access)
        self.state = state

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return render_page(self.state.snapshot(), token_required=bool(self.access.token))


class AdminResource(Resource):
    """
    The admin tree: C{/}, C{/stats}, C{/metrics}, C{/backends/...},
    C{/tables/...}, C{/admin.js}, C{/admin.css}.
    """

    def __init__(self, registry: StatsRegistry, token: str = "", access: Optional[AdminAccess] = None,
                 state: Optional[AdminState] = None) -> None:
        Resource.__init__(self)
        self.registry = registry
        self.access = access = access if access is not None else AdminAccess(token)
        self.state = state = state if state is not None else AdminState(registry)
        self.page = AdminPage(access, state)
        self.putChild(b"stats", StatsPage(access, state))
        self.putChild(b"metrics", MetricsPage(access, registry))
        self.putChild(b"backends", BackendAction(access, registry))
        self.putChild(b"tables", TablesPage(access, registry))
        self.putChild(b"admin.js", StaticFile(access, SCRIPT, b"text/javascript; charset=utf-8"))
        self.putChild(b"admin.css", StaticFile(access, STYLE, b"text/css; charset=utf-8"))

    def getChild(self, path, request):
        if path == b"" and not request.postpath:
            return self.page
        return _NotFound(self.access)

    def render(self, request):
        return self.page.render(request)


class _NotFound(_AdminPage):
    def render(self, request):
        refused = self._guard(request)
        if refused is not None:
            return refused
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"404 Not Found\n"


def admin_site(registry: StatsRegistry, token: str = "", hosts: Iterable[str] = (), bind: str = "",
               reactor=None, limit: Optional[ConnectionLimit] = None, state: Optional[AdminState] = None,
               listener_name: str = "[admin]") -> HTTPFrontFactory:
    """
    The admin listener's factory: the admin tree served by
    L{HTTPFrontFactory} with small limits (L{MAX_BODY_BYTES},
    L{REQUEST_TIMEOUT}, L{MAX_HEADER_BYTES}) and L{AdminAccess} checked on
    every request head.

    @param hosts: names (besides C{bind}'s address and C{localhost}) a
        request's C{Host} may carry.
    @param limit: the listener's connection limit (C{[admin]
        max_connections}).
    """
    if reactor is None:
        from twisted.internet import reactor
    interface = bind_interface(bind) if bind else None
    access = AdminAccess(token, [*hosts, *([interface] if interface else [])])
    if state is None:
        state = AdminState(registry, clock=reactor)
    factory = HTTPFrontFactory(
        AdminResource(registry, access=access, state=state),
        reactor=reactor,
        client_idle_timeout=REQUEST_TIMEOUT,
        max_header_bytes=MAX_HEADER_BYTES,
        max_headers=MAX_HEADERS,
        max_body_bytes=MAX_BODY_BYTES,
        request_buffering=True,  # an action runs once its whole request is in
        listener_name=listener_name,
        limit=limit,
    )
    factory.check_head = access.check_head
    factory.whole_request_deadline = True
    return factory
