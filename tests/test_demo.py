"""
Tests for L{twisted_slb.demo}: the check page, the TCP echo, the demo
configuration, the port check, and the default run end to end.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from twisted_slb.config import parse_config
from twisted_slb.demo import (
    CheckPage,
    EchoNameFactory,
    PortTaken,
    check_ports_free,
    demo_banner,
    demo_config_text,
    demo_layout,
)


class CheckPageTests(SynchronousTestCase):
    def render(self, path=b"/", accept=None, cookie=None):
        request = DummyRequest([path.lstrip(b"/")])
        request.path = path
        if accept:
            request.requestHeaders.addRawHeader(b"accept", accept)
        if cookie:
            request.requestHeaders.addRawHeader(b"cookie", cookie)
        body = CheckPage("a", "127.0.0.1:9001").render(request)
        return request, body

    def test_plainTextForCurl(self):
        """curl gets one greppable line with the name and address."""
        _, body = self.render()
        self.assertTrue(body.startswith(b"backend=a address=127.0.0.1:9001 "))

    def test_htmlForBrowsers(self):
        """A browser (Accept: text/html) gets an HTML page with the backend's name in bold."""
        request, body = self.render(accept=b"text/html")
        self.assertIn(b"<b>a</b>", body)
        self.assertIn(b"text/html", request.responseHeaders.getRawHeaders(b"content-type")[0])

    def test_healthIsOk(self):
        """The demo backend's /health answers "ok"."""
        _, body = self.render(b"/health")
        self.assertEqual(body, b"ok\n")

    def test_setsSessionCookieOnlyWhenAbsent(self):
        """Like a Java app: a JSESSIONID for new visitors only."""
        request, _ = self.render()
        set_cookies = request.responseHeaders.getRawHeaders(b"set-cookie")
        self.assertTrue(set_cookies[0].startswith(b"JSESSIONID="))
        request, body = self.render(cookie=b"JSESSIONID=abc")
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"set-cookie"))
        self.assertIn(b"cookie=JSESSIONID=abc", body)


class EchoTests(SynchronousTestCase):
    def test_saysItsNameThenEchoes(self):
        """The TCP demo backend first writes its name, then echoes what it receives."""
        proto = EchoNameFactory("b").buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"hello\n")
        self.assertEqual(transport.value(), b"backend=b\nhello\n")

    def test_quitCloses(self):
        """A line C{quit} ends the connection, so a one-shot curl telnet:// check ends without a timeout."""
        proto = EchoNameFactory("b").buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"quit\r\n")
        self.assertEqual(transport.value(), b"backend=b\n")
        self.assertTrue(transport.disconnecting)


class LayoutTests(SynchronousTestCase):
    def test_configLoads(self):
        """The demo's configuration is a valid config with the three modes."""
        config = parse_config(demo_config_text(9000), path="<demo>")
        kinds = {name: l.persistence.type for name, l in config.listeners.items()}
        self.assertEqual(kinds, {"insert": "insert_cookie", "rewrite": "rewrite_cookie", "tcp": "source_ip"})
        self.assertEqual(config.listeners["insert"].bind, "tcp:9000:interface=127.0.0.1")

    def test_bannerShowsTheCurlWalkThrough(self):
        """The demo's banner prints the curl cookie-jar walk-through and the slb-check command for its port."""
        banner = demo_banner(9000)
        self.assertIn("curl -c jar http://127.0.0.1:9000/", banner)
        self.assertIn("curl -b jar http://127.0.0.1:9000/", banner)
        self.assertIn("slb-check http://127.0.0.1:9000/ -n 30", banner)

    def test_takenPortIsNamed(self):
        """A port already in use is reported by number, with the --port-base option that avoids it."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        with self.assertRaises(PortTaken) as cm:
            check_ports_free([port])
        self.assertIn(str(port), str(cm.exception))
        self.assertIn("--port-base", str(cm.exception))

    def test_adminListenerAndItsURL(self):
        """The demo runs the admin listener, and the banner gives its URL."""
        config = parse_config(demo_config_text(9000), path="<demo>")
        self.assertEqual(config.admin.bind, "tcp:9003:interface=127.0.0.1")
        self.assertIn("http://127.0.0.1:9003/", demo_banner(9000))

    def test_listenBaseMovesOnlyTheListeners(self):
        """--listen-base gives a copy that runs beside the demo: its listeners move, its backends stay the demo's."""
        demo = parse_config(demo_config_text(9000), path="<demo>")
        beside = parse_config(demo_config_text(9000, listen_base=10000), path="<copy>")
        self.assertEqual(beside.listeners["insert"].bind, "tcp:10000:interface=127.0.0.1")
        self.assertEqual(beside.admin.bind, "tcp:10003:interface=127.0.0.1")
        self.assertEqual(beside.backends, demo.backends)

    def test_portsDoNotOverlap(self):
        """The demo's ports are all different."""
        ports = demo_layout(8080).ports
        self.assertEqual(len(ports), len(set(ports)))
