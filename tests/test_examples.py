"""
Every example runs as written: each configuration in examples/ loads and
serves (with its ports moved to free ones and its backends to test
backends), and each embedding program starts and proxies.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from tests.test_twistd import Twistd
from twisted_slb.config import parse_config
from twisted_slb.demo import CheckPage, EchoNameFactory
from twisted_slb.service import BalancerService

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class ExampleCase(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def backends(self):
        """Demo backends standing in for 127.0.0.1:9001-9003 (HTTP) and 9101-9103 (TCP)."""
        ports = {}
        for i, name in enumerate("abc", 1):
            http = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(CheckPage(name)))
            tcp = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(EchoNameFactory(name))
            self.addCleanup(http.stopListening)
            self.addCleanup(tcp.stopListening)
            ports[9000 + i] = http.getHost().port
            ports[9100 + i] = tcp.getHost().port
        return ports

    @defer.inlineCallbacks
    def get(self, url: str, host: str = None):
        headers = Headers({b"host": [host.encode()]} if host else {})
        response = yield Agent(reactor).request(b"GET", url.encode(), headers)
        body = yield readBody(response)
        return response.code, body


class ConfigExampleTests(ExampleCase):
    @defer.inlineCallbacks
    def run_config(self, name: str, where: str = EXAMPLES):
        ports = yield self.backends()
        with open(os.path.join(EXAMPLES, name)) as f:
            text = f.read()
        parse_config(text, os.path.join(where, name))  # valid exactly as written
        text = re.sub(r'bind = "tcp:\d+', 'bind = "tcp:0', text)
        text = re.sub(r"127\.0\.0\.1:(9\d\d\d)", lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", text)
        service = BalancerService(parse_config(text, os.path.join(where, name)), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def port(self, service, listener: str) -> int:
        return service.getServiceNamed(listener).port.getHost().port

    def test_everyConfigExampleIsTested(self):
        """Every .toml file in examples/ has a test here: a new example without one fails."""
        tested = {"tcp-source-ip.toml", "http-insert-cookie.toml", "http-rewrite-cookie.toml", "domains.toml",
                  "https.toml", "health-admin.toml", "udp-dns.toml"}
        present = {os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.toml"))}
        self.assertEqual(present, tested)

    @defer.inlineCallbacks
    def test_tcpSourceIp(self):
        """tcp-source-ip.toml relays a TCP client to a backend, which greets it with its name."""
        service = yield self.run_config("tcp-source-ip.toml")
        done = defer.Deferred()

        class First(protocol.Protocol):
            def dataReceived(self, data):
                done.callback(data)
                self.transport.loseConnection()

        yield protocol.ClientCreator(reactor, First).connectTCP("127.0.0.1", self.port(service, "tcp"))
        line = yield done
        self.assertTrue(line.startswith(b"backend="))

    @defer.inlineCallbacks
    def test_httpInsertCookie(self):
        """http-insert-cookie.toml proxies a request and sets the SERVERID cookie."""
        service = yield self.run_config("http-insert-cookie.toml")
        response = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{self.port(service, 'web')}/".encode())
        yield readBody(response)
        self.assertTrue(any(c.startswith(b"SERVERID=") for c in response.headers.getRawHeaders(b"set-cookie")))

    @defer.inlineCallbacks
    def test_httpRewriteCookie(self):
        """http-rewrite-cookie.toml prefixes the backend's JSESSIONID with the backend id."""
        service = yield self.run_config("http-rewrite-cookie.toml")
        response = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{self.port(service, 'app')}/".encode())
        yield readBody(response)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0]
        self.assertRegex(cookie, rb"^JSESSIONID=[0-9a-f]{16}~")

    @defer.inlineCallbacks
    def test_domains(self):
        """domains.toml sends app.example.com/api to its API group and gives shop.example.com its own SHOPID cookie."""
        service = yield self.run_config("domains.toml")
        url = f"http://127.0.0.1:{self.port(service, 'web')}"
        code, body = yield self.get(url + "/api/x", host="app.example.com")
        self.assertEqual(code, 200)
        self.assertRegex(body, rb"backend=[bc] ")
        response = yield Agent(reactor).request(
            b"GET", (url + "/").encode(), Headers({b"host": [b"shop.example.com"]})
        )
        yield readBody(response)
        self.assertTrue(any(c.startswith(b"SHOPID=") for c in response.headers.getRawHeaders(b"set-cookie")))


    @defer.inlineCallbacks
    def test_https(self):
        """make_certs.py, then https.toml: SNI picks the wildcard certificate, the redirect works."""
        import subprocess

        where = os.path.abspath(self.mktemp())
        subprocess.run([sys.executable, os.path.join(EXAMPLES, "make_certs.py"), os.path.join(where, "certs")],
                       check=True, capture_output=True)
        service = yield self.run_config("https.toml", where)
        from twisted.internet import ssl
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        from tests.test_https import PeerCertificate

        with open(os.path.join(where, "certs", "ca.pem"), "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        client = PeerCertificate()
        endpoint = wrapClientTLS(ssl.optionsForClientTLS("v1.api.example.test", trustRoot=trust),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", self.port(service, "secure")))
        yield connectProtocol(endpoint, client)
        yield client.serial  # verified against *.api.example.test
        code, _ = yield self.get(f"http://127.0.0.1:{self.port(service, 'redirect')}/cart?id=7",
                                 host="shop.example.test")
        self.assertEqual(code, 301)

    @defer.inlineCallbacks
    def test_healthAdmin(self):
        """health-admin.toml serves /stats on its admin listener, with the backends checked up."""
        service = yield self.run_config("health-admin.toml")
        code, body = yield self.get(f"http://127.0.0.1:{self.port(service, '[admin]')}/stats")
        self.assertEqual(code, 200)
        self.assertIn(b'"state": "up"', body)


    @defer.inlineCallbacks
    def test_udpDns(self):
        """udp-dns.toml: answers come from one backend for every source port of a client IP, and the udp check passes."""
        from twisted.internet.protocol import DatagramProtocol

        from twisted_slb.demo import UDPEchoName

        ports = {}
        for name, port in (("a", 5301), ("b", 5302)):
            listening = reactor.listenUDP(0, UDPEchoName(name), interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            ports[port] = listening.getHost().port
        with open(os.path.join(EXAMPLES, "udp-dns.toml")) as f:
            text = f.read()
        parse_config(text, os.path.join(EXAMPLES, "udp-dns.toml"))  # valid exactly as written
        text = text.replace('bind = "udp:5353', 'bind = "udp:0')
        text = re.sub(r"127\.0\.0\.1:(530\d)", lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", text)
        service = BalancerService(parse_config(text, os.path.join(EXAMPLES, "udp-dns.toml")), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        address = ("127.0.0.1", service.getServiceNamed("dns").port.getHost().port)

        class Ask(DatagramProtocol):
            def __init__(self):
                self.answer = defer.Deferred()

            def datagramReceived(self, data, addr):
                self.answer.callback(data)

        names = set()
        for _ in range(4):
            client = Ask()
            port = reactor.listenUDP(0, client, interface="127.0.0.5")
            self.addCleanup(port.stopListening)
            port.write(b"hello", address)
            names.add((yield client.answer.addTimeout(10, reactor)).split()[0])
        self.assertEqual(len(names), 1)
        monitor = service.getServiceNamed("health:dns")
        backend = service.groups["dns"].get("a")
        checked = defer.Deferred()
        original = monitor._checked
        monitor._checked = lambda b, ok, reason: (original(b, ok, reason),
                                                 b is backend and not checked.called and checked.callback(ok))
        ok = yield checked.addTimeout(10, reactor)
        self.assertTrue(ok)


class ProgramExampleTests(ExampleCase):
    @defer.inlineCallbacks
    def start(self, script: str, *args: str):
        proc = Twistd()  # any process: it collects output and matches patterns
        argv = [sys.executable, os.path.join(EXAMPLES, script), *args, "--listen", "tcp:0:interface=127.0.0.1"]
        env = dict(os.environ, PYTHONPATH=os.path.dirname(EXAMPLES))
        transport = reactor.spawnProcess(proc, sys.executable, argv, env=env)

        def stop():
            if not proc.ended.called:
                transport.signalProcess("TERM")
            return proc.ended

        self.addCleanup(stop)
        m = yield proc.wait_for(r"127\.0\.0\.1:(\d+)", anywhere=True)
        return int(m.group(1))

    @defer.inlineCallbacks
    def test_embedWeb(self):
        """embed_web.py serves the application's own page at / and proxies /app/ to the backends."""
        ports = yield self.backends()
        port = yield self.start("embed_web.py", f"127.0.0.1:{ports[9001]}", f"127.0.0.1:{ports[9002]}")
        code, body = yield self.get(f"http://127.0.0.1:{port}/")
        self.assertIn(b"application's own", body)
        code, body = yield self.get(f"http://127.0.0.1:{port}/app/x")
        self.assertEqual(code, 200)
        self.assertIn(b"backend=", body)

    @defer.inlineCallbacks
    def test_embedTcp(self):
        """embed_tcp.py relays a TCP client to a backend."""
        ports = yield self.backends()
        port = yield self.start("embed_tcp.py", f"127.0.0.1:{ports[9101]}", f"127.0.0.1:{ports[9102]}")
        done = defer.Deferred()

        class First(protocol.Protocol):
            def dataReceived(self, data):
                done.callback(data)
                self.transport.loseConnection()

        yield protocol.ClientCreator(reactor, First).connectTCP("127.0.0.1", port)
        self.assertTrue((yield done).startswith(b"backend="))

    @defer.inlineCallbacks
    def test_stickyHeaderPolicy(self):
        """sticky_header_policy.py sends every request with one X-User-Id to one backend."""
        ports = yield self.backends()
        port = yield self.start("sticky_header_policy.py", f"127.0.0.1:{ports[9001]}", f"127.0.0.1:{ports[9002]}")
        seen = set()
        for _ in range(4):
            response = yield Agent(reactor).request(
                b"GET", f"http://127.0.0.1:{port}/".encode(), Headers({b"x-user-id": [b"alice"]})
            )
            seen.add((yield readBody(response)).split()[0])
        self.assertEqual(len(seen), 1)


class PolicyTestExampleTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_stickyHeaderPolicyTestsPass(self):
        """examples/test_sticky_header_policy.py, run with trial from examples/ as its docstring says, passes all its tests."""
        from twisted.internet.utils import getProcessOutputAndValue

        env = dict(os.environ, PYTHONPATH=os.path.dirname(EXAMPLES))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "twisted.trial", "--temp-directory", os.path.abspath(self.mktemp()), "test_sticky_header_policy"],
            env=env, path=EXAMPLES,
        )
        self.assertEqual(code, 0, out + err)
        self.assertRegex(out, rb"PASSED \(successes=[1-9]")
