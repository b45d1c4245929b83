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
