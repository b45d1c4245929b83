"""
The admin listener: C{/} (an HTML page), C{/stats} (JSON), C{/metrics}
(Prometheus text format) and a small API to drain or enable a backend::

    [admin]
    bind = "tcp:8404:interface=127.0.0.1"
    token = ""        # when set, POST actions need "Authorization: Bearer <token>"

POST actions (C{/backends/<group>/<backend>/drain}, C{.../enable},
C{.../down}, C{.../up}) are refused unless the request comes from loopback
or carries the token.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import time
from typing import Dict, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb.stats import StatsRegistry

log = Logger(namespace="twisted_slb.admin")


class _Collector:
    """Reads the registry at scrape time (nothing is counted twice)."""

    def __init__(self, registry: StatsRegistry) -> None:
        self.registry = registry

    def collect(self):
        requests = CounterMetricFamily("slb_requests", "HTTP requests by listener, backend and status code",
                                       labels=["listener", "backend", "code"])
        connections = CounterMetricFamily("slb_connections", "Client connections accepted", labels=["listener"])
        active = GaugeMetricFamily("slb_connections_active", "Client connections open now", labels=["listener"])
        persistence = CounterMetricFamily("slb_persistence", "Persistence outcomes (hit, new, repin, none)",
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
        for group in self.registry.groups.values():
            for b in group.backends:
                labels = [group.name, b.name]
                up.add_metric(labels, 1 if b.up else 0)
                weight.add_metric(labels, b.weight)
                busy.add_metric(labels, b.active)
                failures.add_metric(labels, b.failures)
                byte_count.add_metric(labels + ["in"], b.bytes_in)
                byte_count.add_metric(labels + ["out"], b.bytes_out)
        return [requests, connections, active, persistence, up, weight, busy, failures, byte_count]


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: StatsRegistry) -> None:
        Resource.__init__(self)
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.prometheus.register(_Collector(registry))

    def render_GET(self, request):
        # generate_latest on the reactor thread: prometheus_client's own
        # Twisted resource runs the collection in a thread pool, where it
        # would read our counters while the reactor changes them.
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.prometheus)


class StatsPage(Resource):
    isLeaf = True

    def __init__(self, registry: StatsRegistry) -> None:
        Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.registry.snapshot(), indent=2).encode("utf-8")


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f0f0f0}.num{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:.1em .6em;border-radius:.8em;color:#fff;font-weight:600}
.up{background:#1a8f3a}.drain{background:#d08a00}.down{background:#c62828}
"""


def _process_line(process: Optional[dict]) -> str:
    if not process:
        return ""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(process["started"]))
    return f"<p id=process>process {int(process['pid'])}, started {html.escape(started)}</p>"


def render_page(snapshot: dict) -> bytes:
    e = lambda v: html.escape(str(v))
    rows = []
    for l in snapshot["listeners"]:
        persistence = ", ".join(f"{k} {v}" for k, v in l["persistence"].items() if v)
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(l["requests_by_class"].items()))
        rows.append(
            f"<tr><td>{e(l['name'])}</td><td>{e(l['protocol'])}</td><td class=num>{l['active_connections']}</td>"
            f"<td class=num>{l['connections_total']}</td><td class=num>{l['requests_total']}</td>"
            f"<td>{e(classes)}</td><td>{e(persistence)}</td><td class=num>{l['bytes_out']}</td></tr>"
        )
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>",
        f"<title>twisted_slb</title><style>{_STYLE}</style></head><body><h1>twisted_slb</h1>",
        _process_line(snapshot.get("process")),
        "<h2>Listeners</h2><table id=listeners><tr><th>listener</th><th>protocol</th><th>active</th>"
        "<th>connections</th><th>requests</th><th>by status</th><th>persistence</th><th>bytes out</th></tr>",
        *rows, "</table>",
    ]
    for g in snapshot["groups"]:
        parts.append(f"<h2>Group {e(g['name'])} <small>({e(g['scheduler'])})</small></h2>")
        parts.append(
            "<table class=group><tr><th>backend</th><th>address</th><th>state</th><th>weight</th>"
            "<th>active</th><th>total</th><th>failures</th><th>bytes in</th><th>bytes out</th><th>last check</th></tr>"
        )
        for b in g["backends"]:
            health = b["health"] or {}
            check = f"{health.get('last_status') or '-'} {health.get('last_reason') or ''}".strip()
            parts.append(
                f"<tr><td>{e(b['name'])}</td><td>{e(b['address'])}</td>"
                f"<td><span class='state {e(b['state'])}'>{e(b['state'])}</span></td>"
                f"<td class=num>{b['weight']}</td><td class=num>{b['active']}</td><td class=num>{b['total']}</td>"
                f"<td class=num>{b['failures']}</td><td class=num>{b['bytes_in']}</td>"
                f"<td class=num>{b['bytes_out']}</td><td>{e(check)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<p><a href=stats>stats (JSON)</a> · <a href=metrics>metrics (Prometheus)</a></p></body></html>")
    return "\n".join(parts).encode("utf-8")


class BackendAction(Resource):
    """POST /backends/<group>/<backend>/<action>."""

    isLeaf = True

    def __init__(self, registry: StatsRegistry, token: str) -> None:
        Resource.__init__(self)
        self.registry = registry
        self.token = token
        self.configured_weights: Dict[tuple, int] = {}

    def _allowed(self, request) -> Optional[str]:
        if self.token:
            given = request.getHeader(b"authorization") or b""
            if hmac.compare_digest(given, b"Bearer " + self.token.encode("utf-8")):
                return None
            return "a valid 'Authorization: Bearer <token>' header is required"
        host = getattr(request.getClientAddress(), "host", "")
        try:
            if ipaddress.ip_address(host.split("%")[0]).is_loopback:
                return None
        except ValueError:
            pass
        return "actions are allowed from loopback only (or set [admin].token)"

    def render_GET(self, request):
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        return b"405 Method Not Allowed: use POST\n"

    def render_POST(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        refused = self._allowed(request)
        if refused:
            request.setResponseCode(403)
            return f"403 Forbidden: {refused}\n".encode("utf-8")
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
        key = (group_name, backend_name)
        if action == "drain":
            if backend.weight:
                self.configured_weights[key] = backend.weight
            backend.weight = 0
        elif action == "enable":
            backend.weight = backend.weight or self.configured_weights.pop(key, 100)
        elif action == "down":
            backend.up = False
        else:
            backend.up = True
        log.info("admin: backend {group}/{backend} {action} by {client}; now {state}, weight {weight}",
                 group=group_name, backend=backend_name, action=action,
                 client=getattr(request.getClientAddress(), "host", "?"), state=backend.state, weight=backend.weight)
        return f"{group_name}/{backend_name}: {backend.state}, weight {backend.weight}\n".encode("utf-8")


class AdminResource(Resource):
    def __init__(self, registry: StatsRegistry, token: str = "") -> None:
        Resource.__init__(self)
        self.registry = registry
        self.putChild(b"stats", StatsPage(registry))
        self.putChild(b"metrics", MetricsPage(registry))
        self.putChild(b"backends", BackendAction(registry, token))

    def getChild(self, path, request):
        if path == b"":
            return self
        return Resource.getChild(self, path, request)

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return render_page(self.registry.snapshot())


def admin_site(registry: StatsRegistry, token: str = "") -> Site:
    site = Site(AdminResource(registry, token))
    site.noisy = False
    return site
