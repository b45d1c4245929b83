"""
End-to-end tests of the persistence modes of issue 16 (sections 1-3) on real
sockets: C{on_failure = "strict"} (HTTP 503 with C{Retry-After}, TCP close,
the pin kept), cookie lifetimes enforced by the balancer (C{max_idle},
C{max_life}), and fixed cookie values per server (C{cookie = "s1"}).
"""

from __future__ import annotations

import time
from typing import Dict, List

from twisted.internet import defer, error, reactor
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tests.test_service import ServiceTestCase, backend_of, jar_update
from twisted_slb.backends import backend_id
from twisted_slb.config import parse_config


def base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


HTTP_CONFIG = """
[backends.web]
scheduler = "rr"
retries = 2
servers = [
  {{ name = "a", address = "127.0.0.1:{a}", cookie = "s1" }},
  {{ name = "b", address = "127.0.0.1:{b}", cookie = "s2" }},
  {{ name = "c", address = "127.0.0.1:{c}" }},
]

[listeners.strict]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600, on_failure = "strict" }}

[listeners.life]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600, max_idle = 600, max_life = 7200 }}

[listeners.app]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "rewrite_cookie", cookie = "JSESSIONID", on_failure = "strict" }}
"""


class HTTPModesTests(ServiceTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.backends = {}
        self.ports: Dict[str, int] = {}
        for name in "abc":
            port, page = yield self.start_http_backend(name)
            self.backends[name] = (port, page)
            self.ports[name] = port.getHost().port
        self.service = self.start_balancer(HTTP_CONFIG.format(**self.ports))
        self.url = {n: f"http://127.0.0.1:{self.port_of(self.service, n)}" for n in ("strict", "life", "app")}
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def request(self, url: str, cookies: Dict[str, str]):
        """One request on a fresh connection: (code, body, Set-Cookie values, Retry-After values)."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        headers = Headers()
        if cookies:
            headers.addRawHeader(b"Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode())
        response = yield agent.request(b"GET", url.encode(), headers)
        body = yield readBody(response)
        return (response.code, body.decode(), [c.decode() for c in response.headers.getRawHeaders(b"set-cookie", [])],
                response.headers.getRawHeaders(b"retry-after", []))

    def stats(self, listener: str) -> Dict[str, int]:
        return self.service.stats.listeners[listener].persistence

    @defer.inlineCallbacks
    def test_strictDownBackendAnswers503AndKeepsThePin(self):
        """
        on_failure = "strict": a client pinned to a stopped backend gets 503
        with Retry-After (the body names no backend), no new cookie, one log
        line and a count in the stats; once the backend listens again the
        same cookie reaches it.
        """
        jar: Dict[str, str] = {}
        code, body, set_cookies, _ = yield self.request(self.url["strict"] + "/", jar)
        jar_update(jar, set_cookies)
        first = backend_of(body)
        port, page = self.backends[first]
        yield page.site.kill(port)
        del self.events[:]
        code, body, set_cookies, retry_after = yield self.request(self.url["strict"] + "/", jar)
        self.assertEqual(code, 503)
        self.assertEqual(retry_after, [b"5"])
        self.assertEqual(set_cookies, [])
        self.assertEqual(body, "503 Service Unavailable: the server holding this session is not available; "
                               "retry later\n")
        self.assertEqual(self.stats("strict")["strict"], 1)
        said = [e for e in self.events if "on_failure = strict" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        port, page = yield self.start_http_backend(first, self.ports[first])
        code, body, set_cookies, _ = yield self.request(self.url["strict"] + "/", jar)
        self.assertEqual((code, backend_of(body)), (200, first))

    @defer.inlineCallbacks
    def test_strictDrainedBackendKeepsServing(self):
        """A drained backend (weight 0) still serves the clients pinned to it in strict mode."""
        self.service.groups["web"].get("c").weight = 0
        code, body, _, _ = yield self.request(self.url["strict"] + "/", {"SERVERID": backend_id("c")})
        self.assertEqual((code, backend_of(body)), (200, "c"))

    @defer.inlineCallbacks
    def test_strictRemovedBackendIsRebalanced(self):
        """A pin to a backend removed from the configuration by a reload is re-balanced, strict or not."""
        text = HTTP_CONFIG.format(**self.ports).replace('  {{ name = "c", address = "127.0.0.1:{c}" }},\n'.format(
            c=self.ports["c"]), "")
        self.assertTrue(self.service.reload(parse_config(text, "slb.toml")))
        code, body, set_cookies, _ = yield self.request(self.url["strict"] + "/", {"SERVERID": backend_id("c")})
        self.assertEqual(code, 200)
        self.assertIn(backend_of(body), ("a", "b"))
        self.assertEqual(len(set_cookies), 1)
        self.assertEqual(self.stats("strict")["repin"], 1)

    @defer.inlineCallbacks
    def test_strictRewriteCookieAnswers503(self):
        """rewrite_cookie with on_failure = "strict": s2~x pinned to a stopped b gets 503, not another backend."""
        port, page = self.backends["b"]
        yield page.site.kill(port)
        code, _, _, retry_after = yield self.request(self.url["app"] + "/", {"JSESSIONID": "s2~x"})
        self.assertEqual((code, retry_after), (503, [b"5"]))

    @defer.inlineCallbacks
    def test_fixedValuesAndHAProxyCookie(self):
        """New clients of a get SERVERID=s1.<stamp>; an HAProxy-issued SERVERID=s2 reaches b."""
        code, body, set_cookies, _ = yield self.request(self.url["strict"] + "/", {})
        self.assertEqual(backend_of(body), "a")
        self.assertRegex(set_cookies[0], r"^SERVERID=s1\.[0-9a-z]+;")
        for _ in range(3):
            code, body, _, _ = yield self.request(self.url["strict"] + "/", {"SERVERID": "s2"})
            self.assertEqual((code, backend_of(body)), (200, "b"))
            self.assertNotIn("SERVERID", body)

    @defer.inlineCallbacks
    def test_rewritePrefixIsTheFixedValue(self):
        """rewrite_cookie prefixes the application's cookie with s1~ for server a; the backend sees its own."""
        jar: Dict[str, str] = {}
        _, body, set_cookies, _ = yield self.request(self.url["app"] + "/session", jar)
        self.assertEqual(backend_of(body), "a")
        jar_update(jar, set_cookies)
        self.assertEqual(jar["JSESSIONID"], "s1~s-a")
        _, body, _, _ = yield self.request(self.url["app"] + "/", jar)
        self.assertIn("cookie=JSESSIONID=s-a", body)

    @defer.inlineCallbacks
    def test_idleAndOldCookiesExpire(self):
        """
        max_idle 600, max_life 7200: a cookie last written 601 s ago, or
        issued 7201 s ago, is balanced anew with a new cookie and counted as
        expired; a fresh one pins.
        """
        now = int(time.time())
        fresh = f"s2.{base36(now - 30)}.{base36(now - 30)}"
        idle = f"s2.{base36(now - 1000)}.{base36(now - 601)}"
        old = f"s2.{base36(now - 7201)}.{base36(now - 5)}"
        _, body, set_cookies, _ = yield self.request(self.url["life"] + "/", {"SERVERID": fresh})
        self.assertEqual((backend_of(body), set_cookies), ("b", []))
        for value in (idle, old):
            _, body, set_cookies, _ = yield self.request(self.url["life"] + "/", {"SERVERID": value})
            self.assertEqual(len(set_cookies), 1)
            self.assertNotIn(value, set_cookies[0])
        self.assertEqual((self.stats("life")["expired"], self.stats("life")["hit"]), (2, 1))


TCP_CONFIG = """
[backends.echo]
servers = [
  {{ name = "a", address = "127.0.0.1:{a}" }},
  {{ name = "b", address = "127.0.0.1:{b}" }},
]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "echo"
persistence = {{ type = "source_ip", timeout = 1000, on_failure = "strict" }}
"""


class TCPStrictTests(ServiceTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.backends = {}
        for name in "ab":
            self.backends[name] = yield self.start_tcp_backend(name)
        text = TCP_CONFIG.format(**{n: p.getHost().port for n, p in self.backends.items()})
        self.service = self.start_balancer(text)
        self.port = self.port_of(self.service, "tcp")

    @defer.inlineCallbacks
    def test_strictClosesAndKeepsThePin(self):
        """
        A client whose backend stopped has its connection closed (no other
        backend answers it), counted as strict; its pin is kept.
        """
        source = "127.0.0.9"
        first = yield self.connect_from(source)
        name = first.split("=")[1]
        yield self.backends[name].stopListening()
        with self.assertRaises((error.ConnectionDone, error.ConnectionLost)):
            yield self.connect_from(source)
        self.assertEqual(self.service.stats.listeners["tcp"].persistence["strict"], 1)
        table = self.service.stick_tables["tcp/echo"]
        self.assertEqual(table.get(source), backend_id(name))


TABLES_CONFIG = """
[backends.web]
scheduler = "rr"
servers = [
  {{ name = "a", address = "127.0.0.1:{a}" }},
  {{ name = "b", address = "127.0.0.1:{b}" }},
]

[backends.canary]
servers = [ {{ name = "c", address = "127.0.0.1:{c}" }} ]

[backends.tenants]
scheduler = "hash"
hash_key = "header:X-Tenant"
hash_balance_factor = 150
servers = [
  {{ name = "a", address = "127.0.0.1:{a}" }},
  {{ name = "b", address = "127.0.0.1:{b}" }},
  {{ name = "c", address = "127.0.0.1:{c}" }},
]

[listeners.header]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "header", header = "X-Session-Id", timeout = 3600 }}

[listeners.learn]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "learn_cookie", cookie = "JSESSIONID", timeout = 3600, on_failure = "strict" }}

[listeners.hash]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "tenants"

[listeners.split]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = [ {{ group = "web", weight = {stable} }}, {{ group = "canary", weight = {canary} }} ]
persistence = {{ type = "insert_cookie", timeout = 3600 }}
"""


class TableAndSplitTests(ServiceTestCase):
    """Issue 16 sections 4-6 end to end: header and learned-cookie tables, hash keys, a sticky canary split."""

    @defer.inlineCallbacks
    def setUp(self):
        self.backends = {}
        self.ports: Dict[str, int] = {}
        for name in "abc":
            port, page = yield self.start_http_backend(name)
            self.backends[name] = (port, page)
            self.ports[name] = port.getHost().port
        self.service = self.start_balancer(self.config_text(90, 10))
        self.url = {n: f"http://127.0.0.1:{self.port_of(self.service, n)}"
                    for n in ("header", "learn", "hash", "split")}

    def config_text(self, stable: int, canary: int) -> str:
        return TABLES_CONFIG.format(stable=stable, canary=canary, **self.ports)

    @defer.inlineCallbacks
    def request(self, url: str, headers: Dict[str, str]):
        """One request on a fresh connection: (code, body, Set-Cookie values)."""
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        h = Headers()
        for name, value in headers.items():
            h.addRawHeader(name.encode(), value.encode())
        response = yield agent.request(b"GET", url.encode(), h)
        body = yield readBody(response)
        return response.code, body.decode(), [c.decode() for c in response.headers.getRawHeaders(b"set-cookie", [])]

    @defer.inlineCallbacks
    def test_headerPersistence(self):
        """
        One X-Session-Id value reaches one backend on every connection, no
        cookie is set, the backend sees the header; requests without it are
        spread and leave nothing in the table; a reload keeps the table.
        """
        seen = set()
        for _ in range(4):
            code, body, set_cookies = yield self.request(self.url["header"] + "/", {"X-Session-Id": "abc"})
            self.assertEqual((code, set_cookies), (200, []))
            seen.add(backend_of(body))
        self.assertEqual(len(seen), 1)
        table = self.service.stick_tables["header/web/header:x-session-id"]
        self.assertEqual(len(table), 1)
        spread = set()
        for _ in range(4):
            _, body, _ = yield self.request(self.url["header"] + "/", {})
            spread.add(backend_of(body))
        self.assertEqual((spread, len(table)), ({"a", "b"}, 1))
        self.assertTrue(self.service.reload(parse_config(self.config_text(90, 10), "slb.toml")))
        self.assertIs(self.service.stick_tables["header/web/header:x-session-id"], table)
        _, body, _ = yield self.request(self.url["header"] + "/", {"X-Session-Id": "abc"})
        self.assertEqual({backend_of(body)}, seen)
        self.assertEqual(self.service.stats.listeners["header"].persistence["hit"], 4)

    def test_tableDroppedWhenItsPersistenceChanges(self):
        """A reload that changes a listener's persistence type drops the old table and starts a new one."""
        old = self.service.stick_tables["header/web/header:x-session-id"]
        old.set(b"abc", backend_id("a"))
        text = self.config_text(90, 10).replace(
            'type = "header", header = "X-Session-Id"', 'type = "learn_cookie", cookie = "sid"')
        self.assertTrue(self.service.reload(parse_config(text, "slb.toml")))
        self.assertNotIn("header/web/header:x-session-id", self.service.stick_tables)
        self.assertEqual(len(self.service.stick_tables["header/web/learn_cookie:sid"]), 0)

    @defer.inlineCallbacks
    def test_learnedCookie(self):
        """
        The backend's JSESSIONID reaches the client unmodified and routes
        its later requests to that backend, which sees it as it set it;
        with on_failure strict a stopped backend answers 503 and the entry stays.
        """
        _, body, set_cookies = yield self.request(self.url["learn"] + "/session", {})
        first = backend_of(body)
        self.assertTrue(set_cookies[0].startswith(f"JSESSIONID=s-{first};"), set_cookies)
        for _ in range(4):
            code, body, set_cookies = yield self.request(self.url["learn"] + "/", {"Cookie": f"JSESSIONID=s-{first}"})
            self.assertEqual((code, backend_of(body)), (200, first))
            self.assertIn(f"cookie=JSESSIONID=s-{first}", body)
        port, page = self.backends[first]
        yield page.site.kill(port)
        code, _, _ = yield self.request(self.url["learn"] + "/", {"Cookie": f"JSESSIONID=s-{first}"})
        self.assertEqual(code, 503)
        table = self.service.stick_tables["learn/web/learn_cookie:JSESSIONID"]
        self.assertEqual(table.get(f"s-{first}"), backend_id(first))

    @defer.inlineCallbacks
    def test_hashKeyHeader(self):
        """
        A group hashing X-Tenant sends each tenant to one backend on every
        connection without any table; requests without the header go round.
        """
        by_tenant = {}
        for tenant in ("t1", "t2", "t3", "t4", "t5", "t6"):
            for _ in range(3):
                _, body, set_cookies = yield self.request(self.url["hash"] + "/", {"X-Tenant": tenant})
                by_tenant.setdefault(tenant, set()).add(backend_of(body))
                self.assertEqual(set_cookies, [])
        self.assertTrue(all(len(s) == 1 for s in by_tenant.values()), by_tenant)
        self.assertGreater(len(set().union(*by_tenant.values())), 1)
        spread = set()
        for _ in range(3):
            _, body, _ = yield self.request(self.url["hash"] + "/", {})
            spread.add(backend_of(body))
        self.assertEqual(spread, {"a", "b", "c"})

    @defer.inlineCallbacks
    def test_stickyCanarySplit(self):
        """
        Of 20 new clients 18 reach the stable group and 2 canary; each keeps
        its backend with its cookie.  After a reload that gives canary weight
        0, its clients stay on canary and new clients all go to stable;
        /stats counts the clients per group.
        """
        jars = []
        groups = {"a": "web", "b": "web", "c": "canary"}
        for _ in range(20):
            _, body, set_cookies = yield self.request(self.url["split"] + "/", {})
            jar: Dict[str, str] = {}
            jar_update(jar, set_cookies)
            jars.append((backend_of(body), jar))
        counts = [groups[b] for b, _ in jars]
        self.assertEqual((counts.count("web"), counts.count("canary")), (18, 2))
        self.assertTrue(self.service.reload(parse_config(self.config_text(100, 0), "slb.toml")))
        for name, jar in jars:
            cookie = "; ".join(f"{k}={v}" for k, v in jar.items())
            _, body, _ = yield self.request(self.url["split"] + "/", {"Cookie": cookie})
            self.assertEqual(backend_of(body), name)
        for _ in range(4):
            _, body, _ = yield self.request(self.url["split"] + "/", {})
            self.assertIn(backend_of(body), ("a", "b"))
        (split,) = self.service.stats.snapshot()["splits"]
        self.assertEqual((split["route"], split["groups"]), ("split", ["web", "canary"]))
        self.assertEqual(split["clients"], {"web": 22, "canary": 2})
        self.assertEqual(split["requests"], {"web": 40, "canary": 4})

    @defer.inlineCallbacks
    def test_adminPageShowsSplitsAndHashKeys(self):
        """The admin page shows each split's clients and requests per group, and a hash group's key and bound."""
        from twisted_slb.admin import render_page

        for _ in range(10):
            yield self.request(self.url["split"] + "/", {})
        page = render_page(self.service.stats.snapshot())
        self.assertIn(b"<h2>Splits</h2>", page)
        self.assertIn(b"<tr><td>split</td><td>canary</td><td class=\"num\">1</td>", page)
        self.assertIn(b"(hash, key header:X-Tenant, bound 150%)", page)
