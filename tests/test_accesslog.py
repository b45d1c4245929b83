"""
The buffered access log file (C{access_log = "/path"}): lines are buffered
and written once a second or when 64 KB wait, the file is reopened by name
on reload (rotation), a failing file is reported once, and a listener's
requests and connections end up in it.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody

from twisted_slb.accesslog import AccessLogFile
from twisted_slb.config import ConfigError, load_config
from tests.test_service import ServiceTestCase


class AccessLogFileTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = os.path.abspath(self.mktemp())
        self.file = AccessLogFile(self.path, reactor=self.clock, buffer_bytes=1000)
        self.addCleanup(self.file.close)

    def content(self) -> str:
        with open(self.path) as f:
            return f.read()

    def test_flushedAfterAtMostASecond(self):
        self.file.write_line("one")
        self.file.write_line("two")
        self.assertEqual(self.content(), "")
        self.clock.advance(1)
        lines = self.content().splitlines()
        self.assertEqual([line.split(" ", 1)[1] for line in lines], ["one", "two"])
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} one$")

    def test_flushedWhenTheBufferIsFull(self):
        for _ in range(40):
            self.file.write_line("x" * 30)
        self.assertGreaterEqual(len(self.content()), 1000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the rest waits for the timer

    def test_reopenAfterRotation(self):
        self.file.write_line("before")
        os.rename(self.path, self.path + ".1")
        self.file.reopen()  # what a reload does
        self.file.write_line("after")
        self.file.flush()
        with open(self.path + ".1") as f:
            self.assertIn("before", f.read())
        self.assertIn("after", self.content())
        self.assertNotIn("before", self.content())

    def test_failingWriteIsLoggedOnceAndRecovers(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.file.close()
        os.remove(self.path)
        os.mkdir(self.path)  # the path is now a directory: opening it fails
        for _ in range(3):
            self.file.write_line("lost")
            self.file.flush()
        errors = [e for e in events if e.get("log_namespace") == "twisted_slb.accesslog"]
        self.assertEqual(len(errors), 1)
        self.assertTrue(self.file.failing)
        os.rmdir(self.path)
        self.file.write_line("back")
        self.file.flush()
        self.assertFalse(self.file.failing)
        self.assertIn("back", self.content())


CONFIG = """
[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
access_log = "{log}"

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
access_log = "{log}"
"""


class AccessLogConfigTests(SynchronousTestCase):
    def load(self, value: str):
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(CONFIG.replace('"{log}"', value).format(a=1))
        return load_config(path)

    def test_relativePathIsBesideTheConfig(self):
        config = self.load('"access.log"')
        listener = config.listeners["web"]
        self.assertTrue(listener.access_log)
        self.assertEqual(listener.access_log_path, os.path.join(os.path.dirname(config.path), "access.log"))

    def test_booleanStillWorks(self):
        self.assertIsNone(self.load("true").listeners["web"].access_log_path)
        self.assertFalse(self.load("false").listeners["web"].access_log)

    def test_missingDirectoryNamesFieldAndValue(self):
        e = self.assertRaises(ConfigError, self.load, '"/nonexistent/dir/access.log"')
        self.assertIn("listeners.web.access_log", str(e))
        self.assertIn("/nonexistent/dir/access.log", str(e))
        self.assertIn("directory", str(e))

    def test_wrongType(self):
        e = self.assertRaises(ConfigError, self.load, "3")
        self.assertIn("true, false or a file path", str(e))


class AccessLogServiceTests(ServiceTestCase):
    @defer.inlineCallbacks
    def test_requestsAndConnectionsAreWritten(self):
        port, _ = yield self.start_http_backend("a")
        log_path = os.path.abspath(self.mktemp() + ".log")
        service = self.start_balancer(CONFIG.format(a=port.getHost().port, log=log_path))
        response = yield self.agent().request(
            b"GET", f"http://127.0.0.1:{self.port_of(service, 'web')}/x?y".encode()
        )
        yield readBody(response)
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from tests.test_service import NameLineClient

        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_of(service, "tcp")), NameLineClient()
        )
        client.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        yield client.first
        yield service.stopService()  # flushes
        with open(log_path) as f:
            text = f.read()
        self.assertIn('web 127.0.0.1 127.0.0.1:', text)
        self.assertIn('"GET /x?y HTTP/1.1" 200 -> a persistence=none', text)
        self.assertIn("tcp 127.0.0.1 -> a (127.0.0.1:", text)
