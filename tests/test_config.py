"""
Tests for L{twisted_slb.config}: valid documents load into the expected
values, and every invalid one is one L{ConfigError} naming the file, the
field path, the value and what is allowed.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb.config import ConfigError, describe, load_config, parse_config

BASE = """
[backends.web]
scheduler = "wrr"
connect_timeout = 5.0
retries = 2
servers = [
  { name = "a", address = "10.0.0.1:8080", weight = 100 },
  { name = "b", address = "[2001:db8::2]:8080" },
]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:8081:interface=0.0.0.0"
backends = "web"
persistence = { type = "source_ip", timeout = 1000 }
idle_timeout = 900
"""


class LoadTests(SynchronousTestCase):
    def test_issueExampleLoads(self):
        """The example of the foundation issue loads into frozen values."""
        config = parse_config(BASE, "slb.toml")
        group = config.backends["web"]
        self.assertEqual(group.scheduler, "wrr")
        self.assertEqual([(s.name, s.host, s.port, s.weight) for s in group.servers],
                         [("a", "10.0.0.1", 8080, 100), ("b", "2001:db8::2", 8080, 100)])
        listener = config.listeners["tcp"]
        self.assertEqual((listener.protocol, listener.backends, listener.idle_timeout), ("tcp", "web", 900.0))
        self.assertEqual((listener.persistence.type, listener.persistence.timeout), ("source_ip", 1000))
        with self.assertRaises(Exception):
            listener.bind = "x"  # frozen

    def test_httpDefaults(self):
        config = parse_config(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = { type = "insert_cookie" }
""")
        web = config.listeners["web"]
        self.assertEqual((web.request_timeout, web.client_idle_timeout, web.max_header_bytes), (60.0, 60.0, 65536))
        p = web.persistence
        self.assertEqual((p.cookie, p.timeout, p.secure, p.httponly, p.samesite, p.path, p.refresh),
                         ("SERVERID", 3600, "auto", True, "lax", "/", True))

    def test_rulesAndRewrite(self):
        config = parse_config(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"

[[listeners.web.rules]]
domain = "*.Example.com"
path = "/api"
persistence = { type = "rewrite_cookie", cookie = "JSESSIONID" }
""")
        rule = config.listeners["web"].rules[0]
        self.assertEqual((rule.domain, rule.path, rule.backends), ("*.example.com", "/api", "web"))
        self.assertEqual(rule.persistence.cookie, "JSESSIONID")

    def test_loadConfigReadsFile(self):
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(BASE)
        self.assertEqual(load_config(path).path, path)

    def test_describeSaysThePolicy(self):
        text = describe(parse_config(BASE + """
[listeners.plain]
protocol = "http"
bind = "tcp:8080"
backends = "web"
"""))
        self.assertIn("persistence: source_ip", text)
        self.assertIn("persistence: none (each request is balanced on its own)", text)


class BackendHeaderTests(SynchronousTestCase):
    LISTENER = BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
"""

    def test_offByDefault(self):
        """Without backend_header, responses do not name their backend."""
        self.assertEqual(parse_config(self.LISTENER).listeners["web"].backend_header, "")

    def test_readAndDescribed(self):
        """A header name is kept as written, and --check says what it does."""
        config = parse_config(self.LISTENER + 'backend_header = "X-Backend"\n')
        self.assertEqual(config.listeners["web"].backend_header, "X-Backend")
        self.assertIn("each response names its backend in X-Backend", describe(config))

    def test_badNamesAreRefused(self):
        """A header the protocol needs, or not a header name at all, is an error naming the field and value."""
        for value in ("Set-Cookie", "X Backend", "content-length"):
            with self.assertRaises(ConfigError) as cm:
                parse_config(self.LISTENER + f'backend_header = "{value}"\n', "slb.toml")
            self.assertIn(f"slb.toml: listeners.web.backend_header: not a header name the balancer may set; "
                          f"got {value!r}; allowed: an HTTP header name", str(cm.exception))

    def test_notOnTcpListeners(self):
        """backend_header is an http(s) setting: a tcp listener refuses it."""
        with self.assertRaises(ConfigError) as cm:
            parse_config(BASE.replace("idle_timeout = 900", 'idle_timeout = 900\nbackend_header = "X-Backend"'))
        self.assertIn("listeners.tcp.backend_header: not a setting of tcp listeners", str(cm.exception))


class ErrorTests(SynchronousTestCase):
    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            parse_config(text, "slb.toml")
        return str(cm.exception)

    def test_timeoutOutOfRange(self):
        message = self.error(BASE.replace("timeout = 1000", "timeout = 5000"))
        self.assertEqual(
            message,
            "slb.toml: listeners.tcp.persistence.timeout: out of range; got 5000; "
            "allowed: an integer from 1 to 3600 seconds for source_ip persistence",
        )

    def test_insertCookieTimeoutRange(self):
        message = self.error(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = { type = "insert_cookie", timeout = 86401 }
""")
        self.assertIn("listeners.web.persistence.timeout: out of range; got 86401; allowed: an integer from 1 to 86400", message)

    def test_unknownKeyDidYouMean(self):
        message = self.error(BASE.replace("weight = 100", "wieght = 100"))
        self.assertIn("backends.web.servers[0].wieght: unknown key (did you mean 'weight'?)", message)

    def test_boolIsNotAnInteger(self):
        message = self.error(BASE.replace("weight = 100", "weight = true"))
        self.assertIn("backends.web.servers[0].weight: must be an integer, not a boolean; got True", message)

    def test_missingGroupNamesTheKnownOnes(self):
        message = self.error(BASE.replace('backends = "web"', 'backends = "wbe"'))
        self.assertIn("listeners.tcp.backends: no such backend group; got 'wbe'", message)
        self.assertIn("'web'", message)

    def test_duplicateServerNames(self):
        message = self.error(BASE.replace('name = "b"', 'name = "a"'))
        self.assertIn("backends.web.servers[1].name: duplicate server name", message)

    def test_badAddresses(self):
        for address in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "[::1:80", "a b:80"):
            message = self.error(BASE.replace('"10.0.0.1:8080"', f'"{address}"'))
            self.assertIn("backends.web.servers[0].address", message)

    def test_badScheduler(self):
        message = self.error(BASE.replace('"wrr"', '"fastest"'))
        self.assertIn("backends.web.scheduler: not one of the choices; got 'fastest'; allowed: 'rr' | 'wrr' | 'wlc' | 'hash'", message)

    def test_cookiePersistenceOnTcp(self):
        message = self.error(BASE.replace('type = "source_ip", timeout = 1000', 'type = "insert_cookie"'))
        self.assertIn("tcp listeners persist by source IP only", message)

    def test_keyOfAnotherProtocol(self):
        message = self.error(BASE.replace("idle_timeout = 900", "request_timeout = 9"))
        self.assertIn("listeners.tcp.request_timeout: not a setting of tcp listeners", message)

    def test_badBind(self):
        message = self.error(BASE.replace('"tcp:8081:interface=0.0.0.0"', '"tpc:8081"'))
        self.assertIn("listeners.tcp.bind: not a valid endpoint", message)

    def test_rewriteHasNoTimeout(self):
        message = self.error(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = { type = "rewrite_cookie", cookie = "JSESSIONID", timeout = 5 }
""")
        self.assertIn("rewrite_cookie has no timeout", message)

    def test_sameBindTwice(self):
        message = self.error(BASE + """
[listeners.again]
protocol = "tcp"
bind = "tcp:8081:interface=0.0.0.0"
backends = "web"
""")
        self.assertIn("listeners.again.bind: the same address as listeners.tcp", message)

    def test_noListeners(self):
        self.assertIn("no listener is configured", self.error(BASE.split("[listeners.tcp]")[0]))

    def test_tomlSyntaxError(self):
        self.assertIn("slb.toml: not valid TOML", self.error("[backends\n"))

    def test_missingFile(self):
        path = os.path.join(self.mktemp(), "nope.toml")
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertIn(f"{path}: cannot read the configuration file", str(cm.exception))

    def test_missingCertificateFile(self):
        message = self.error(BASE + """
[listeners.secure]
protocol = "https"
bind = "tcp:443"
backends = "web"
certificates = [ { cert = "/nonexistent/a.pem", key = "/nonexistent/a.key" } ]
""")
        self.assertIn("listeners.secure.certificates[0].cert: file not found or not readable; got '/nonexistent/a.pem'", message)


# Documents built from plausible keys and values of every kind.
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 100000) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["tcp", "http", "https", "web", "source_ip", "insert_cookie", "rewrite_cookie",
                       "tcp:0", "127.0.0.1:80", "wrr", "hash", "/", "*.example.com"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from([
        "backends", "listeners", "servers", "name", "address", "weight", "protocol", "bind", "persistence",
        "type", "timeout", "cookie", "rules", "domain", "path", "scheduler", "retries", "admin", "workers",
        "health_check", "tls", "certificates", "web", "tcp", "a", "zzz"]), children, max_size=4),
    max_leaves=12,
)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(["backends", "listeners", "admin", "workers", "grace_period", "x"]),
                           _values, max_size=4))
    def test_everyDocumentIsConfigOrConfigError(self, document):
        """Whatever the document, the loader answers a Config or a ConfigError, never another exception."""
        try:
            parse_config(document, "fuzz.toml")
        except ConfigError as e:
            self.assertTrue(str(e).startswith("fuzz.toml: "))


HTTP_LISTENER = """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = {persistence}
"""


class PersistenceModeTests(SynchronousTestCase):
    """on_failure, max_idle, max_life and servers' cookie (issue 16, sections 1-3)."""

    def parse(self, persistence: str, base: str = BASE):
        return parse_config(base + HTTP_LISTENER.format(persistence=persistence), "slb.toml")

    def error(self, persistence: str, base: str = BASE) -> str:
        with self.assertRaises(ConfigError) as cm:
            self.parse(persistence, base)
        return str(cm.exception)

    def test_defaultsUnchanged(self):
        """Without the new keys: repin, max_idle is the timeout, no max_life."""
        p = self.parse('{ type = "insert_cookie", timeout = 900 }').listeners["web"].persistence
        self.assertEqual((p.on_failure, p.max_idle, p.max_life), ("repin", 900, 0))

    def test_onFailureForEveryType(self):
        """on_failure = "strict" is read for insert_cookie, rewrite_cookie and source_ip (http and tcp)."""
        for persistence in ('{ type = "insert_cookie", on_failure = "strict" }',
                            '{ type = "rewrite_cookie", cookie = "J", on_failure = "strict" }',
                            '{ type = "source_ip", on_failure = "strict" }'):
            self.assertEqual(self.parse(persistence).listeners["web"].persistence.on_failure, "strict")
        tcp = parse_config(BASE.replace('timeout = 1000 }', 'timeout = 1000, on_failure = "strict" }'), "slb.toml")
        self.assertEqual(tcp.listeners["tcp"].persistence.on_failure, "strict")

    def test_onFailureUnknownValue(self):
        """An unknown on_failure names the field, the value and the choices."""
        self.assertIn("listeners.web.persistence.on_failure: not one of the choices; got 'fail'; "
                      "allowed: 'repin' | 'strict'", self.error('{ type = "insert_cookie", on_failure = "fail" }'))

    def test_lifetimesRead(self):
        """max_idle and max_life are read in seconds."""
        p = self.parse('{ type = "insert_cookie", timeout = 3600, max_idle = 1800, max_life = 28800 }')
        self.assertEqual((p.listeners["web"].persistence.max_idle, p.listeners["web"].persistence.max_life),
                         (1800, 28800))

    def test_maxIdleAboveTimeout(self):
        """max_idle may not exceed the cookie's timeout (the browser drops it then)."""
        message = self.error('{ type = "insert_cookie", timeout = 600, max_idle = 601 }')
        self.assertIn("listeners.web.persistence.max_idle: out of range; got 601; allowed: an integer from 1 to 600",
                      message)

    def test_maxLifeType(self):
        """max_life must be an integer."""
        message = self.error('{ type = "insert_cookie", max_life = "8h" }')
        self.assertIn("listeners.web.persistence.max_life: must be an integer, not a string; got '8h'", message)

    def test_maxLifeOnRewriteCookie(self):
        """max_idle/max_life on rewrite_cookie is an error that says why and where they belong."""
        message = self.error('{ type = "rewrite_cookie", cookie = "J", max_life = 60 }')
        self.assertIn("listeners.web.persistence.max_life: not a setting of rewrite_cookie persistence, "
                      "only of insert_cookie", message)
        self.assertIn("got 60", message)

    def test_maxIdleOnSourceIP(self):
        """A key of another persistence type names the field and the keys allowed."""
        message = self.error('{ type = "source_ip", max_idle = 60 }')
        self.assertIn("listeners.web.persistence.max_idle: not a setting of source_ip persistence", message)
        self.assertIn("keys of source_ip: type, timeout, max_entries, on_failure", message)

    def test_serverCookieRead(self):
        """A server's cookie value is read; servers without one have ""."""
        config = self.parse('{ type = "insert_cookie" }', BASE.replace('weight = 100 }', 'weight = 100, cookie = "s1" }'))
        self.assertEqual([s.cookie for s in config.backends["web"].servers], ["s1", ""])

    def test_serverCookieNotAToken(self):
        """A server cookie with a '.', '~', space or ';' is an error naming the field."""
        for bad in ("s.1", "s~1", "s 1", "s;1", ""):
            message = self.error('{ type = "insert_cookie" }',
                                 BASE.replace('weight = 100 }', f'weight = 100, cookie = "{bad}" }}'))
            self.assertIn(f"backends.web.servers[0].cookie: not a cookie-safe value; got {bad!r}", message)

    def test_serverCookieDuplicate(self):
        """Two servers of a group with one cookie value is an error naming the second."""
        base = BASE.replace('weight = 100 }', 'weight = 100, cookie = "s1" }').replace(
            '"[2001:db8::2]:8080" }', '"[2001:db8::2]:8080", cookie = "s1" }')
        message = self.error('{ type = "insert_cookie" }', base)
        self.assertIn("backends.web.servers[1].cookie: duplicate cookie value in this group; got 's1'", message)

    def test_describeShowsTheNewSettings(self):
        """--check prints on_failure, the lifetimes and the servers' cookie values."""
        config = self.parse('{ type = "insert_cookie", timeout = 3600, max_idle = 1800, max_life = 28800, '
                            'on_failure = "strict" }',
                            BASE.replace('weight = 100 }', 'weight = 100, cookie = "s1" }'))
        text = describe(config)
        self.assertIn("max_idle 1800 s, max_life 28800 s", text)
        self.assertIn("on_failure strict: a client whose backend is down or refuses is not moved, "
                      "it gets 503 with Retry-After", text)
        self.assertIn("a=10.0.0.1:8080 (weight 100, cookie s1)", text)
        self.assertIn("on_failure repin", describe(parse_config(BASE, "slb.toml")))
