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

from twisted_slb import config as config_module
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
        """An http listener's timeouts, header limit and insert_cookie settings default to the documented values."""
        config = parse_config(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = { type = "insert_cookie" }
""")
        web = config.listeners["web"]
        self.assertEqual((web.request_timeout, web.client_idle_timeout, web.max_header_bytes), (60.0, 60.0, 65536))
        self.assertEqual(web.response_idle_timeout, 60.0)
        p = web.persistence
        self.assertEqual((p.cookie, p.timeout, p.secure, p.httponly, p.samesite, p.path, p.refresh),
                         ("SERVERID", 3600, "auto", True, "lax", "/", True))

    def test_rulesAndRewrite(self):
        """A rule's domain is lowercased and kept with its path, group and rewrite_cookie persistence."""
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
        """load_config reads the file and remembers its path."""
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(BASE)
        self.assertEqual(load_config(path).path, path)

    def test_describeSaysThePolicy(self):
        """describe() names each listener's persistence, and says when there is none."""
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
        """A source_ip timeout over 3600 is refused with the field, the value and the allowed range."""
        message = self.error(BASE.replace("timeout = 1000", "timeout = 5000"))
        self.assertEqual(
            message,
            "slb.toml: listeners.tcp.persistence.timeout: out of range; got 5000; "
            "allowed: an integer from 1 to 3600 seconds for source_ip persistence",
        )

    def test_insertCookieTimeoutRange(self):
        """An insert_cookie timeout over 86400 is refused with the field, the value and the allowed range."""
        message = self.error(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = { type = "insert_cookie", timeout = 86401 }
""")
        self.assertIn("listeners.web.persistence.timeout: out of range; got 86401; allowed: an integer from 1 to 86400", message)

    def test_unknownKeyDidYouMean(self):
        """A misspelt key is refused with a suggestion of the key it resembles."""
        message = self.error(BASE.replace("weight = 100", "wieght = 100"))
        self.assertIn("backends.web.servers[0].wieght: unknown key (did you mean 'weight'?)", message)

    def test_boolIsNotAnInteger(self):
        """A boolean where an integer is expected is refused (TOML true is not 1)."""
        message = self.error(BASE.replace("weight = 100", "weight = true"))
        self.assertIn("backends.web.servers[0].weight: must be an integer, not a boolean; got True", message)

    def test_missingGroupNamesTheKnownOnes(self):
        """A listener naming a missing backend group is refused, listing the groups that exist."""
        message = self.error(BASE.replace('backends = "web"', 'backends = "wbe"'))
        self.assertIn("listeners.tcp.backends: no such backend group; got 'wbe'", message)
        self.assertIn("'web'", message)

    def test_duplicateServerNames(self):
        """Two servers of a group with one name are refused."""
        message = self.error(BASE.replace('name = "b"', 'name = "a"'))
        self.assertIn("backends.web.servers[1].name: duplicate server name", message)

    def test_badAddresses(self):
        """Server addresses without a port, with port 0 or over 65535, with broken brackets or a space are refused."""
        for address in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "[::1:80", "a b:80"):
            message = self.error(BASE.replace('"10.0.0.1:8080"', f'"{address}"'))
            self.assertIn("backends.web.servers[0].address", message)

    def test_badScheduler(self):
        """An unknown scheduler is refused, listing the choices."""
        message = self.error(BASE.replace('"wrr"', '"fastest"'))
        self.assertIn("backends.web.scheduler: not one of the choices; got 'fastest'; allowed: 'rr' | 'wrr' | 'wlc' | 'hash'", message)

    def test_cookiePersistenceOnTcp(self):
        """Cookie persistence on a tcp listener is refused: tcp persists by source IP only."""
        message = self.error(BASE.replace('type = "source_ip", timeout = 1000', 'type = "insert_cookie"'))
        self.assertIn("tcp listeners persist by source IP only", message)

    def test_keyOfAnotherProtocol(self):
        """A setting of http listeners given to a tcp listener is refused as not one of its settings."""
        message = self.error(BASE.replace("idle_timeout = 900", "request_timeout = 9"))
        self.assertIn("listeners.tcp.request_timeout: not a setting of tcp listeners", message)

    def test_responseIdleTimeout(self):
        """response_idle_timeout is read on http listeners, must be > 0, and is not a tcp setting."""
        http = BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
response_idle_timeout = TIMEOUT
"""
        config = parse_config(http.replace("TIMEOUT", "5"))
        self.assertEqual(config.listeners["web"].response_idle_timeout, 5.0)
        message = self.error(http.replace("TIMEOUT", "0"))
        self.assertIn("listeners.web.response_idle_timeout: out of range; got 0", message)
        message = self.error(BASE.replace("idle_timeout = 900", "response_idle_timeout = 9"))
        self.assertIn("listeners.tcp.response_idle_timeout: not a setting of tcp listeners", message)

    def test_badBind(self):
        """A bind that is not a Twisted endpoint description is refused."""
        message = self.error(BASE.replace('"tcp:8081:interface=0.0.0.0"', '"tpc:8081"'))
        self.assertIn("listeners.tcp.bind: not a valid endpoint", message)

    def test_systemdBindNeedsNoInheritedSocket(self):
        """A systemd: bind validates by its syntax: the socket exists only in the process systemd starts."""
        for bind in ("systemd:domain=INET:index=0", "systemd:domain=INET6:name=web", "systemd:domain=UNIX:index=3"):
            config = parse_config(BASE.replace('"tcp:8081:interface=0.0.0.0"', f'"{bind}"'), "slb.toml")
            self.assertEqual(config.listeners["tcp"].bind, bind)

    def test_badSystemdBind(self):
        """A malformed systemd: bind names the field, the value, what is wrong and an example."""
        cases = {
            "systemd:index=0": "domain= (INET, INET6 or UNIX) is missing",
            "systemd:domain=INET": "give exactly one of index=N and name=...",
            "systemd:domain=INET:index=0:name=web": "give exactly one of index=N and name=...",
            "systemd:domain=IPX4:index=0": "domain 'IPX4' is not INET, INET6 or UNIX",
            "systemd:domain=INET:index=first": "index 'first' is not a number",
            "systemd:domain=INET:port=80": "'port=80' is not domain=..., index=N or name=...",
        }
        for bind, problem in cases.items():
            message = self.error(BASE.replace('"tcp:8081:interface=0.0.0.0"', f'"{bind}"'))
            self.assertIn(f"listeners.tcp.bind: not a valid endpoint ({problem}); got {bind!r}", message)
            self.assertIn('"systemd:domain=INET:index=0"', message)

    def test_rewriteHasNoTimeout(self):
        """rewrite_cookie persistence refuses a timeout (the backend's cookie sets its own life)."""
        message = self.error(BASE + """
[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
persistence = { type = "rewrite_cookie", cookie = "JSESSIONID", timeout = 5 }
""")
        self.assertIn("rewrite_cookie has no timeout", message)

    def test_sameBindTwice(self):
        """Two listeners on the same address are refused, naming the other one."""
        message = self.error(BASE + """
[listeners.again]
protocol = "tcp"
bind = "tcp:8081:interface=0.0.0.0"
backends = "web"
""")
        self.assertIn("listeners.again.bind: the same address as listeners.tcp", message)

    def test_noListeners(self):
        """A configuration without listeners is refused."""
        self.assertIn("no listener is configured", self.error(BASE.split("[listeners.tcp]")[0]))

    def test_tomlSyntaxError(self):
        """A file that is not valid TOML is refused, naming the file."""
        self.assertIn("slb.toml: not valid TOML", self.error("[backends\n"))

    def test_missingFile(self):
        """A missing configuration file is a ConfigError naming the path, not a traceback."""
        path = os.path.join(self.mktemp(), "nope.toml")
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertIn(f"{path}: cannot read the configuration file", str(cm.exception))

    def test_missingCertificateFile(self):
        """A certificate file that does not exist is refused at load, naming the field and the path."""
        message = self.error(BASE + """
[listeners.secure]
protocol = "https"
bind = "tcp:443"
backends = "web"
certificates = [ { cert = "/nonexistent/a.pem", key = "/nonexistent/a.key" } ]
""")
        self.assertIn("listeners.secure.certificates[0].cert: file not found or not readable; got '/nonexistent/a.pem'", message)


    def test_caNotPem(self):
        """A backend group's C{tls.ca} that is not PEM fails the load (and so C{--check}), naming the field."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("just text\n")
        message = self.error(BASE.replace('retries = 2', f'retries = 2\ntls = {{ ca = "{path}" }}'))
        self.assertEqual(message, f"slb.toml: backends.web.tls.ca: {path} is not a PEM certificate file "
                                  "(no -----BEGIN CERTIFICATE----- block)")


class CookiePrefixTests(SynchronousTestCase):
    """C{__Host-} and C{__Secure-} insert cookies follow the rules browsers enforce, or fail the load."""

    def load(self, persistence: str, protocol: str = "http"):
        return parse_config(BASE + f"""
[listeners.web]
protocol = "{protocol}"
bind = "tcp:8080"
backends = "web"
persistence = {{ type = "insert_cookie", {persistence} }}
""", "slb.toml")

    def error(self, persistence: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            self.load(persistence)
        return str(cm.exception)

    def test_hostPrefixValid(self):
        """A Secure C{__Host-} cookie with no domain and path / loads."""
        p = self.load('cookie = "__Host-sid", secure = "always"').listeners["web"].persistence
        self.assertEqual((p.cookie, p.secure, p.domain, p.path), ("__Host-sid", "always", "", "/"))

    def test_hostPrefixWithDomain(self):
        """A __Host- cookie with a domain is refused, naming the rule."""
        message = self.error('cookie = "__Host-sid", secure = "always", domain = "example.com"')
        self.assertIn("listeners.web.persistence.domain: a __Host- cookie must be Secure, have no domain and "
                      "have path \"/\" (browsers drop it otherwise); got 'example.com'", message)

    def test_hostPrefixWithOtherPath(self):
        """A __Host- cookie with a path other than / is refused, naming the rule."""
        message = self.error('cookie = "__Host-sid", secure = "always", path = "/app"')
        self.assertIn("listeners.web.persistence.path: a __Host- cookie must be Secure", message)
        self.assertIn("got '/app'; allowed: \"/\"", message)

    def test_hostPrefixNeverSecure(self):
        """A __Host- cookie that is never Secure is refused, naming the rule."""
        message = self.error('cookie = "__Host-sid", secure = "never"')
        self.assertIn("listeners.web.persistence.secure: a __Host- cookie must be Secure", message)
        self.assertIn("got 'never'", message)

    def test_hostPrefixAutoOnHttp(self):
        """C{secure = "auto"} never sets Secure on an http listener, so a __Host- cookie there needs "always"."""
        message = self.error('cookie = "__Host-sid"')
        self.assertIn('"auto" never sets Secure on an http listener; got \'auto\'', message)

    def test_securePrefixNeverSecure(self):
        """C{__Secure-} needs Secure (browsers match the prefix whatever its case); domain and path are free."""
        message = self.error('cookie = "__secure-sid", secure = false')
        self.assertIn("listeners.web.persistence.secure: a __Secure- cookie must be Secure (browsers drop it "
                      "otherwise); got 'never'", message)
        p = self.load('cookie = "__Secure-sid", secure = true, domain = "example.com", path = "/app"')
        self.assertEqual(p.listeners["web"].persistence.secure, "always")


class ConfigFileTests(SynchronousTestCase):
    """What C{load_config} agrees to read."""

    def error(self, path: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        return str(cm.exception)

    def test_characterDeviceRefused(self):
        """C{--config /dev/zero} is one clear error, not a read until memory runs out."""
        self.assertEqual(self.error("/dev/zero"), "/dev/zero: not a regular file (a character device); "
                                                  "allowed: a regular TOML file of at most 10 MB")

    def test_directoryRefused(self):
        """A directory given as the configuration file is one clear error."""
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        self.assertIn(f"{path}: not a regular file (a directory)", self.error(path))

    def test_tooLargeRefused(self):
        """A file over the limit (10 MB) is refused, naming its size."""
        self.assertEqual(config_module.MAX_CONFIG_BYTES, 10 * 1024 * 1024)
        self.patch(config_module, "MAX_CONFIG_BYTES", len(BASE) - 1)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(BASE)
        self.assertIn(f"{path}: the configuration file is too large ({len(BASE)} bytes)", self.error(path))
        self.patch(config_module, "MAX_CONFIG_BYTES", len(BASE))
        self.assertEqual(load_config(path).path, path)


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


TWO_GROUPS = BASE.replace("[listeners.tcp]", """[backends.canary]
servers = [ { name = "c", address = "10.0.0.3:8080" } ]

[listeners.tcp]""")


class TableAndSplitConfigTests(SynchronousTestCase):
    """header and learn_cookie persistence, hash_key, hash_balance_factor and weighted splits (issue 16, 4-6)."""

    def parse(self, text: str):
        return parse_config(text, "slb.toml")

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            self.parse(text)
        return str(cm.exception)

    def http(self, persistence: str = "", backends: str = '"web"', base: str = BASE) -> str:
        text = base + f'\n[listeners.web]\nprotocol = "http"\nbind = "tcp:8080"\nbackends = {backends}\n'
        if persistence:
            text += f"persistence = {persistence}\n"
        return text

    def test_headerAndLearnCookieRead(self):
        """Both table types read their name, timeout (default 3600), max_entries and on_failure."""
        p = self.parse(self.http('{ type = "header", header = "X-Session-Id", max_entries = 10, '
                                 'on_failure = "strict" }')).listeners["web"].persistence
        self.assertEqual((p.type, p.header, p.timeout, p.max_entries, p.on_failure),
                         ("header", "X-Session-Id", 3600, 10, "strict"))
        p = self.parse(self.http('{ type = "learn_cookie", cookie = "JSESSIONID", timeout = 60 }')
                       ).listeners["web"].persistence
        self.assertEqual((p.type, p.cookie, p.timeout), ("learn_cookie", "JSESSIONID", 60))

    def test_tableTypeErrors(self):
        """Missing or invalid names, a key of another type, a timeout out of range, tcp use: each names the field."""
        cases = [
            ('{ type = "header" }', "listeners.web.persistence.header: required but missing"),
            ('{ type = "header", header = "X Session" }',
             "listeners.web.persistence.header: not a valid header name; got 'X Session'"),
            ('{ type = "header", header = "Cookie" }', "listeners.web.persistence.header: not a header to stick on"),
            ('{ type = "learn_cookie" }', "listeners.web.persistence.cookie: required but missing"),
            ('{ type = "learn_cookie", cookie = "a;b" }',
             "listeners.web.persistence.cookie: not a valid cookie name; got 'a;b'"),
            ('{ type = "header", header = "X-S", max_idle = 5 }',
             "listeners.web.persistence.max_idle: not a setting of header persistence, only of insert_cookie"),
            ('{ type = "learn_cookie", cookie = "J", timeout = 86401 }',
             "listeners.web.persistence.timeout: out of range; got 86401; allowed: an integer from 1 to 86400"),
            ('{ type = "header", header = "X-S", max_entries = 0 }',
             "listeners.web.persistence.max_entries: out of range; got 0"),
        ]
        for persistence, expected in cases:
            self.assertIn(expected, self.error(self.http(persistence)))
        message = self.error(BASE.replace('{ type = "source_ip", timeout = 1000 }', '{ type = "header", header = "X" }'))
        self.assertIn("listeners.tcp.persistence.type: not a persistence type for tcp listeners", message)

    def test_hashKeyRead(self):
        """hash_key and hash_balance_factor are read for a hash group; the defaults are source_ip and 0."""
        config = self.parse(BASE.replace('scheduler = "wrr"', 'scheduler = "hash"'))
        self.assertEqual((config.backends["web"].hash_key, config.backends["web"].hash_balance_factor),
                         ("source_ip", 0))
        for key in ("header:X-Tenant", "cookie:uid", "query:user", "path", "host"):
            base = BASE.replace('scheduler = "wrr"', f'scheduler = "hash"\nhash_key = "{key}"\nhash_balance_factor = 150')
            config = self.parse(self.http(base=base.replace('[listeners.tcp]', '[listeners.x]').split('[listeners.x]')[0]))
            self.assertEqual((config.backends["web"].hash_key, config.backends["web"].hash_balance_factor),
                             (key, 150))

    def test_hashKeyErrors(self):
        """Unknown keys, bad names, a factor out of range, and either key without scheduler hash are errors."""
        only_groups = BASE.split("[listeners.tcp]")[0]
        cases = [
            ('hash_key = "ip"', "backends.web.hash_key: not a hash key; got 'ip'; allowed: \"source_ip\" | "),
            ('hash_key = "header:"', "backends.web.hash_key: not a valid header name after 'header:'"),
            ('hash_key = "query:a&b"', "backends.web.hash_key: not a valid query name after 'query:'"),
            ('hash_key = 3', "backends.web.hash_key: must be a string, not an integer"),
            ('hash_balance_factor = 50', "backends.web.hash_balance_factor: below 100"),
            ('hash_balance_factor = 10001', "backends.web.hash_balance_factor: out of range; got 10001"),
        ]
        for line, expected in cases:
            text = only_groups.replace('scheduler = "wrr"', f'scheduler = "hash"\n{line}')
            self.assertIn(expected, self.error(self.http(base=text)))
        message = self.error(self.http(base=only_groups.replace('scheduler = "wrr"', 'hash_key = "path"')))
        self.assertIn("backends.web.hash_key: a setting of scheduler = \"hash\" only (this group's scheduler is 'wrr')",
                      message)

    def test_tcpListenerNeedsSourceIPHashKey(self):
        """A tcp listener over a group hashing a request property is an error naming the listener's backends."""
        message = self.error(BASE.replace('scheduler = "wrr"', 'scheduler = "hash"\nhash_key = "header:X-T"'))
        self.assertIn("listeners.tcp.backends: group 'web' hashes on 'header:X-T', which a tcp listener cannot read",
                      message)

    def test_splitRead(self):
        """backends = [ { group, weight } ] is read as a split on a listener and a rule; backends is its first group."""
        split = '[ { group = "web", weight = 90 }, { group = "canary", weight = 10 } ]'
        text = self.http('{ type = "insert_cookie" }', split, TWO_GROUPS.split("[listeners.tcp]")[0])
        text += f'[[listeners.web.rules]]\npath = "/app"\nbackends = {split}\n'
        web = self.parse(text).listeners["web"]
        self.assertEqual(web.backends, "web")
        self.assertEqual([(s.group, s.weight) for s in web.split], [("web", 90), ("canary", 10)])
        self.assertEqual([(s.group, s.weight) for s in web.rules[0].split], [("web", 90), ("canary", 10)])
        text = describe(self.parse(text))
        self.assertIn("split: web weight 90 (90% of new clients), canary weight 10 (10% of new clients)", text)
        self.assertIn("rule 0: host * path /app -> split web weight 90", text)

    def test_splitErrors(self):
        """Each split mistake names the field, the value and what is allowed."""
        groups = TWO_GROUPS.split("[listeners.tcp]")[0]
        cases = [
            ("[]", "listeners.web.backends: an empty split; got []"),
            ('[ { group = "nope" } ]', "listeners.web.backends[0].group: no such backend group; got 'nope'"),
            ('[ { group = "web" }, { group = "web" } ]', "listeners.web.backends[1].group: named twice in this split"),
            ('[ { group = "web", weight = 0 } ]', "listeners.web.backends: every weight is 0"),
            ('[ { group = "web", weight = 1001 } ]', "listeners.web.backends[0].weight: out of range; got 1001"),
            ('[ { group = "web", wieght = 1 } ]', "listeners.web.backends[0].wieght: unknown key (did you mean 'weight'?)"),
            ("3", "listeners.web.backends: must be a group name or an array of { group, weight }, not an integer"),
        ]
        for backends, expected in cases:
            self.assertIn(expected, self.error(self.http(backends=backends, base=groups)))
        clash = groups.replace('{ name = "c", address = "10.0.0.3:8080" }', '{ name = "a", address = "10.0.0.3:8080" }')
        message = self.error(self.http(backends='[ { group = "web" }, { group = "canary" } ]', base=clash))
        self.assertIn("listeners.web.backends[1].group: backend 'a' is in groups 'web' and 'canary'", message)
        message = self.error(TWO_GROUPS.replace('backends = "web"\npersistence = { type = "source_ip"',
                                                'backends = [ { group = "web" } ]\npersistence = { type = "source_ip"'))
        self.assertIn("listeners.tcp.backends: a tcp listener balances over one group", message)

    def test_describeTablesAndHash(self):
        """--check prints the header and learn_cookie tables and a hash group's key and bound."""
        base = BASE.split("[listeners.tcp]")[0].replace(
            'scheduler = "wrr"', 'scheduler = "hash"\nhash_key = "cookie:uid"\nhash_balance_factor = 125')
        text = describe(self.parse(self.http('{ type = "header", header = "X-Session-Id", max_entries = 5 }', base=base)))
        self.assertIn("persistence: header X-Session-Id: a request carrying it stays on the backend", text)
        self.assertIn("(table of at most 5 values); without it, balanced as usual and nothing stored", text)
        self.assertIn("hash_key cookie:uid (requests without it: weighted round robin), "
                      "no backend above 125% of the average load", text)
        text = describe(self.parse(self.http('{ type = "learn_cookie", cookie = "JSESSIONID" }')))
        self.assertIn("learn_cookie JSESSIONID: the value the backend sets is learned (never modified)", text)


class HTTP2ConfigTests(SynchronousTestCase):
    """The HTTP/2 settings of https listeners: defaults, and each bad value one error naming it."""

    def listener(self, extra: str = ""):
        from tests.certs import CertificateAuthority

        directory = os.path.abspath(self.mktemp())
        cert, key = CertificateAuthority().issue(["localhost"]).write(directory, "site")
        return BASE + f"""
[listeners.secure]
protocol = "https"
bind = "tcp:443"
backends = "web"
certificates = [ {{ cert = "{cert}", key = "{key}" }} ]
{extra}
"""

    def error(self, extra: str) -> str:
        with self.assertRaises(ConfigError) as cm:
            parse_config(self.listener(extra), "slb.toml")
        return str(cm.exception)

    def test_defaults(self):
        """An https listener offers h2 then http/1.1, 100 streams, 64 KB header lists, a 4 KB HPACK table."""
        secure = parse_config(self.listener(), "slb.toml").listeners["secure"]
        self.assertEqual(secure.alpn, ("h2", "http/1.1"))
        self.assertEqual((secure.max_concurrent_streams, secure.max_header_list_size, secure.hpack_table_size),
                         (100, 65536, 4096))

    def test_valuesRead(self):
        """Given values are kept; alpn = ["http/1.1"] turns HTTP/2 off."""
        secure = parse_config(self.listener('alpn = ["http/1.1"]\nmax_concurrent_streams = 16\n'
                                            'max_header_list_size = 8192\nhpack_table_size = 0'),
                              "slb.toml").listeners["secure"]
        self.assertEqual((secure.alpn, secure.max_concurrent_streams, secure.max_header_list_size,
                          secure.hpack_table_size), (("http/1.1",), 16, 8192, 0))

    def test_unknownProtocol(self):
        """An ALPN name the listener cannot speak is refused, naming it and what is allowed."""
        message = self.error('alpn = ["h3"]')
        self.assertIn("listeners.secure.alpn: 'h3' is not a protocol this listener speaks; got ['h3']; "
                      'allowed: a non-empty array of "h2" and "http/1.1"', message)

    def test_protocolTwice(self):
        """An ALPN list naming a protocol twice is refused, saying so."""
        self.assertIn("listeners.secure.alpn: a protocol is named twice", self.error('alpn = ["h2", "h2"]'))

    def test_streamsOutOfRange(self):
        """max_concurrent_streams outside 1..10000 is refused, naming the field, the value and the range."""
        self.assertIn("listeners.secure.max_concurrent_streams: out of range; got 0; allowed: an integer from 1 "
                      "to 10000", self.error("max_concurrent_streams = 0"))

    def test_headerListSizeOutOfRange(self):
        """max_header_list_size outside 1024..1048576 bytes is refused, naming the field, the value and the range."""
        self.assertIn("listeners.secure.max_header_list_size: out of range; got 100; allowed: an integer from "
                      "1024 to 1048576 bytes", self.error("max_header_list_size = 100"))

    def test_hpackTableSizeOutOfRange(self):
        """hpack_table_size outside 0..65536 bytes is refused, naming the field, the value and the range."""
        self.assertIn("listeners.secure.hpack_table_size: out of range; got 70000; allowed: an integer from 0 "
                      "to 65536 bytes", self.error("hpack_table_size = 70000"))

    def test_notOnHttpListeners(self):
        """The HTTP/2 keys belong to https listeners."""
        with self.assertRaises(ConfigError) as cm:
            parse_config(BASE + '[listeners.web]\nprotocol = "http"\nbind = "tcp:80"\nbackends = "web"\n'
                         "max_concurrent_streams = 10\n", "slb.toml")
        self.assertIn("listeners.web.max_concurrent_streams: not a setting of http listeners", str(cm.exception))

    def test_describeNamesHTTP2(self):
        """--check's description of an https listener names its HTTP/2 limits."""
        text = describe(parse_config(self.listener(), "slb.toml"))
        self.assertIn("ALPN h2, http/1.1; HTTP/2: max_concurrent_streams 100, max_header_list_size 65536, "
                      "hpack_table_size 4096", text)
