"""
The buffered access log file (C{access_log = "/path"}): lines are buffered
and written once a second or when 64 KB wait, the file is reopened by name
on reload (rotation), a failing file is reported once, and a listener's
requests and connections end up in it.

The default access log (L{TwistdLog}): the same text as twistd's observer
writes, written in batches at most 0.1 s late, at reload, at stop and at
shutdown; events again whenever twistd's file observer is not the only one.
"""

from __future__ import annotations

import io
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import (
    FileLogObserver, Logger, LoggingFile, LogPublisher, formatEvent, textFileLogObserver,
)
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody

from twisted_slb import accesslog
from twisted_slb.accesslog import AccessLogFile, TwistdLog
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
        """Lines are buffered and written, each with its ISO timestamp, within a second by the flush timer."""
        self.file.write_line("one")
        self.file.write_line("two")
        self.assertEqual(self.content(), "")
        self.clock.advance(1)
        lines = self.content().splitlines()
        self.assertEqual([line.split(" ", 1)[1] for line in lines], ["one", "two"])
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} one$")

    def test_lineAfterCloseIsWrittenAtOnce(self):
        """
        A line that comes after close (a connection that ended as the
        service stopped) is written at once, and no timer is left for a
        closed file.
        """
        self.file.write_line("before")
        self.file.close()
        self.file.write_line("after")
        self.assertEqual([line.split(" ", 1)[1] for line in self.content().splitlines()], ["before", "after"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flushedWhenTheBufferIsFull(self):
        """A full buffer is written at once, without waiting for the timer; one timer stays for the rest."""
        for _ in range(40):
            self.file.write_line("x" * 30)
        self.assertGreaterEqual(len(self.content()), 1000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the rest waits for the timer

    def test_reopenAfterRotation(self):
        """After the file is renamed (log rotation), reopen writes new lines to a new file at the configured path."""
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
        """
        A file that cannot be opened is logged once, not once per line, and writing resumes when the path
        works again.
        """
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
        """A relative access_log path is resolved beside the configuration file."""
        config = self.load('"access.log"')
        listener = config.listeners["web"]
        self.assertTrue(listener.access_log)
        self.assertEqual(listener.access_log_path, os.path.join(os.path.dirname(config.path), "access.log"))

    def test_booleanStillWorks(self):
        """access_log = true logs through twisted.logger (no path); false turns the log off."""
        self.assertIsNone(self.load("true").listeners["web"].access_log_path)
        self.assertFalse(self.load("false").listeners["web"].access_log)

    def test_missingDirectoryNamesFieldAndValue(self):
        """An access_log path in a missing directory is a config error naming the field, the value and the directory."""
        e = self.assertRaises(ConfigError, self.load, '"/nonexistent/dir/access.log"')
        self.assertIn("listeners.web.access_log", str(e))
        self.assertIn("/nonexistent/dir/access.log", str(e))
        self.assertIn("directory", str(e))

    def test_wrongType(self):
        """An access_log that is neither a boolean nor a string is refused, saying what is allowed."""
        e = self.assertRaises(ConfigError, self.load, "3")
        self.assertIn("true, false or a file path", str(e))


class AccessLogServiceTests(ServiceTestCase):
    @defer.inlineCallbacks
    def test_requestsAndConnectionsAreWritten(self):
        """
        A running balancer writes an HTTP request (listener, client, request line, status, backend,
        persistence) and a TCP connection to its access log file.
        """
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


class ShutdownClock(Clock):
    """A clock that also records system event triggers, as a reactor does."""

    def __init__(self):
        Clock.__init__(self)
        self.triggers = {}

    def addSystemEventTrigger(self, phase, event, f, *args):
        handle = (phase, event, len(self.triggers))
        self.triggers[handle] = f
        return handle

    def removeSystemEventTrigger(self, handle):
        del self.triggers[handle]

    def shutdown(self):
        for (phase, event, _), f in list(self.triggers.items()):
            if (phase, event) == ("after", "shutdown"):
                f()


class RecordingText(io.StringIO):
    """A text file that records the size of each write, in UTF-8 bytes."""

    def __init__(self, writes: list) -> None:
        io.StringIO.__init__(self)
        self.writes = writes

    def write(self, text):
        self.writes.append(len(text.encode()))
        return io.StringIO.write(self, text)


def twistd_like(out=None):
    """A publisher with only a twistd-style file observer, and the file."""
    out = io.StringIO() if out is None else out
    return LogPublisher(textFileLogObserver(out)), out


class TwistdTextTests(SynchronousTestCase):
    """L{TwistdLog} writes what twistd's observer writes for an access event."""

    def setUp(self):
        self.clock = ShutdownClock()
        self.clock.advance(1_700_000_000.25)

    def both(self, line: str, out_factory=io.StringIO):
        """The text of one line through an event, and through L{TwistdLog}, at the same time."""
        publisher, via_event = twistd_like(out_factory())
        Logger(namespace="twisted_slb.access", observer=publisher).info("{line}", line=line, listener="web")
        publisher, via_sink = twistd_like(out_factory())
        sink = TwistdLog(self.clock, publisher)
        self.assertTrue(sink.write_line(line))
        sink.flush()
        return via_event.getvalue(), via_sink.getvalue()

    def test_sameTextAsTheEvent(self):
        """An access line is byte for byte what twistd's observer writes for the
        event the proxy would have emitted (time, system, text, newline)."""
        self.clock.seconds = lambda: 1_700_000_000.25
        event, sink = self.both('web 127.0.0.1 h "GET /\u00e9" 200 -> a persistence=hit bytes=3 0.001s')
        # Events are timed by the wall clock: put the event's stamp in.
        stamp = event.split(" ", 1)[0]
        self.assertRegex(stamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}$")
        self.assertEqual(event.split(" ", 1)[1], sink.split(" ", 1)[1])
        self.assertIn(" [twisted_slb.access#info] web 127.0.0.1", sink)

    def test_sameStampAsTwistd(self):
        """The time in front of the line is twistd's formatting of the same instant."""
        import time as _time

        now = _time.time()
        self.clock.seconds = lambda: now
        publisher, out = twistd_like()
        sink = TwistdLog(self.clock, publisher)
        sink.write_line("x")
        sink.flush()
        expected = textFileLogObserver(io.StringIO()).formatEvent(
            {"log_time": now, "log_format": "x", "log_namespace": "twisted_slb.access",
             "log_level": accesslog.LogLevel.info})
        self.assertEqual(out.getvalue(), expected)

    def test_newlinesIndentedAsTwistdDoes(self):
        """A line holding a newline continues with a tab, as twistd's text does."""
        publisher, out = twistd_like()
        Logger(namespace="twisted_slb.access", observer=publisher).info("{line}", line="a\nb")
        publisher, out2 = twistd_like()
        sink = TwistdLog(self.clock, publisher)
        sink.write_line("a\nb")
        sink.flush()
        self.assertEqual(out2.getvalue().split(" ", 1)[1], out.getvalue().split(" ", 1)[1])
        self.assertTrue(out2.getvalue().endswith("a\n\tb\n"))

    def test_bytesFileGetsUTF8(self):
        """twistd's L{LogFile} takes bytes: the text is encoded as twistd's observer does."""
        path = self.mktemp()
        log_file = LogFile.fromFullPath(path)
        self.addCleanup(log_file.close)
        sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(log_file)))
        self.assertTrue(sink.write_line("caf\u00e9"))
        sink.flush()
        with open(path, "rb") as f:
            self.assertTrue(f.read().endswith(" [twisted_slb.access#info] caf\u00e9\n".encode("utf-8")))


def http_fields(uri=b"/cart", host=b"app.example.com", listener="web", status=200, gone=False):
    """The fields of an HTTP access line (accesslog.HTTP_FORMAT), as the proxy gives them."""
    return (listener.encode(), b"203.0.113.7", host, b"GET", uri, b"HTTP/1.1", status, b"a", b"hit", 5120, 0.0042,
            b" (client closed)" if gone else b"")


class HTTPFieldsTests(SynchronousTestCase):
    """
    HTTP lines given as fields (C{write_http}) and formatted with their
    batch are byte for byte the lines the text path writes, whatever the
    fields hold, in order with the other lines.
    """

    def setUp(self):
        self.clock = ShutdownClock()
        self.clock.advance(1_700_000_000.25)

    def logfile_sink(self):
        path = self.mktemp()
        log_file = LogFile.fromFullPath(path, rotateLength=None)
        self.addCleanup(log_file.close)
        sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(log_file)))
        sink.batch_format = True  # (the default on CPython only)
        return sink, path

    def written(self, path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def assertSameAsText(self, *rows):
        """Each of C{rows} written as fields gives the bytes of its text through write_line."""
        by_fields, path = self.logfile_sink()
        for fields in rows:
            self.assertTrue(by_fields.write_http(self.clock.seconds(), fields))
        by_fields.flush()
        by_text, text_path = self.logfile_sink()
        by_text.batch_format = False
        for fields in rows:
            self.assertTrue(by_text.write_line(accesslog.http_line(fields)))
        by_text.flush()
        self.assertEqual(self.written(path), self.written(text_path))
        return self.written(path)

    def test_line(self):
        """The text of a line: what the access log has always said."""
        data = self.assertSameAsText(http_fields(), http_fields(gone=True))
        lines = data.decode().splitlines()
        self.assertEqual([l.split("] ", 1)[1] for l in lines], [
            'web 203.0.113.7 app.example.com "GET /cart HTTP/1.1" 200 -> a persistence=hit bytes=5120 0.004s',
            'web 203.0.113.7 app.example.com "GET /cart HTTP/1.1" 200 -> a persistence=hit bytes=5120 0.004s'
            " (client closed)",
        ])
        self.assertIn(" [twisted_slb.access#info] ", lines[0])

    def test_nonASCIIRequestBytes(self):
        """A request's non-ASCII bytes are Latin-1 characters written in UTF-8, as
        in the text path, and non-ASCII names are UTF-8 (the batch is formatted
        row by row then)."""
        data = self.assertSameAsText(http_fields(), http_fields(uri=b"/caf\xe9"), http_fields(listener="w\u00e9b"))
        self.assertIn('"GET /caf\u00e9 HTTP/1.1"'.encode(), data)
        self.assertIn("w\u00e9b 203".encode(), data)

    def test_newlineIndented(self):
        """A newline inside a field continues with a tab, as twistd's text does."""
        data = self.assertSameAsText(http_fields(host=b"a\nb"), http_fields())
        self.assertIn(b" a\n\tb ", data)
        self.assertEqual(data.count(b"\n"), 3)

    def test_unexpectedType(self):
        """A status that is not a number is written as the text path shows it."""
        data = self.assertSameAsText(http_fields(status=None), http_fields())
        self.assertIn(b'" None -> a', data)

    def test_percentInThePrefix(self):
        """A % in the text around a line is kept as it is, not read as a format."""
        fmt = accesslog._row_format(b"100% [x] ", b"%s\n")
        self.assertEqual(accesslog._format_rows([http_fields()], fmt, None),
                         b'100% [x] web 203.0.113.7 app.example.com "GET /cart HTTP/1.1" 200 -> a persistence=hit '
                         b"bytes=5120 0.004s%s\n")

    def test_formattedAsABatch(self):
        """Fields wait unformatted until the batch is written: one format of
        the batch, not one per line."""
        sink, path = self.logfile_sink()
        formats = []
        real = accesslog._format_rows

        def counting(rows, *args):
            formats.append(len(rows))
            return real(rows, *args)

        self.patch(accesslog, "_format_rows", counting)
        for i in range(10):
            sink.write_http(self.clock.seconds(), http_fields())
        self.assertEqual(formats, [])
        self.clock.advance(0.1)
        self.assertEqual(formats, [10])
        self.assertEqual(self.written(path).count(b"\n"), 10)

    def test_orderAndTimeKept(self):
        """Lines given as text and as fields stay in the order they came, and a
        line of a later second gets that second's time."""
        sink, path = self.logfile_sink()
        sink.write_http(self.clock.seconds(), http_fields(uri=b"/1"))
        sink.write_line("tcp line")
        sink.write_http(self.clock.seconds(), http_fields(uri=b"/2"))
        self.clock.advance(0.05)
        first = self.clock.seconds()
        self.clock.advance(1)
        sink.write_http(self.clock.seconds(), http_fields(uri=b"/3"))
        sink.flush()
        lines = self.written(path).decode().splitlines()
        self.assertEqual([l.split("] ", 1)[1].split('"')[1] if '"' in l else l.split("] ", 1)[1] for l in lines],
                         ["GET /1 HTTP/1.1", "tcp line", "GET /2 HTTP/1.1", "GET /3 HTTP/1.1"])
        stamp = textFileLogObserver(io.StringIO()).formatEvent
        for line, when in zip(lines, [first, first, first, self.clock.seconds()]):
            expected = stamp({"log_time": when, "log_format": "x", "log_namespace": "twisted_slb.access",
                              "log_level": accesslog.LogLevel.info}).split(" ", 1)[0]
            self.assertEqual(line.split(" ", 1)[0], expected)

    def test_writtenAtShutdownAndOnSize(self):
        """Fields waiting are written by the shutdown trigger; many lines are
        written in batches of about 64 KB without waiting for the timer."""
        sink, path = self.logfile_sink()
        sink.write_http(self.clock.seconds(), http_fields())
        self.clock.shutdown()
        self.assertEqual(self.written(path).count(b"\n"), 1)
        for i in range(2000):
            sink.write_http(self.clock.seconds(), http_fields())
        self.assertGreater(self.written(path).count(b"\n"), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.written(path).count(b"\n"), 2001)

    def test_pipesAndTextTakeText(self):
        """To a pipe or a terminal (batches counted to PIPE_BUF), or with
        batch_format off (PyPy), write_http says no: the caller writes the
        text."""
        publisher, out = twistd_like()
        sink = TwistdLog(self.clock, publisher)
        sink.batch_format = True
        self.assertFalse(sink.write_http(self.clock.seconds(), http_fields()))
        text_sink, path = self.logfile_sink()
        text_sink.batch_format = False
        self.assertFalse(text_sink.write_http(self.clock.seconds(), http_fields()))

    def test_textFileGetsText(self):
        """A regular file opened as text gets the batch as text."""
        path = self.mktemp()
        with open(path, "w") as out:
            sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(out)))
            sink.batch_format = True
            self.assertTrue(sink.write_http(self.clock.seconds(), http_fields(uri=b"/caf\xe9")))
            sink.flush()
        with open(path, encoding="utf-8") as f:
            self.assertIn('"GET /caf\u00e9 HTTP/1.1"', f.read())

    def test_ownFile(self):
        """access_log = "/path": fields are formatted with the batch, as the text would be."""
        path = os.path.abspath(self.mktemp())
        text_path = os.path.abspath(self.mktemp())
        by_fields = AccessLogFile(path, reactor=self.clock)
        by_text = AccessLogFile(text_path, reactor=self.clock)
        for fields in (http_fields(), http_fields(uri=b"/caf\xe9"), http_fields(gone=True)):
            self.assertTrue(by_fields.write_http(self.clock.seconds(), fields))
            by_text.write_line(accesslog.http_line(fields))
        by_fields.close()
        by_text.close()
        self.assertEqual(self.written(path), self.written(text_path))
        self.assertEqual(self.written(path).count(b"\n"), 3)
        by_fields.write_http(self.clock.seconds(), http_fields())  # after close: written at once
        self.assertEqual(self.written(path).count(b"\n"), 4)


class ProxyLineTests(SynchronousTestCase):
    """What the proxy gives an access log for each request."""

    def test_fieldsOrText(self):
        """A log with batch_format gets the request's fields, any other
        object with only write_line (an embedder's) the same line as text."""
        from twisted_slb.testing import BalancerRig

        class Fields:
            batch_format = True

            def __init__(self):
                self.rows = []

            def write_http(self, now, fields):
                self.rows.append(fields)
                return True

        class Text:
            def __init__(self):
                self.lines = []

            def write_line(self, line):
                self.lines.append(line)
                return True

        texts = []
        for sink in (Fields(), Text()):
            rig = BalancerRig(backends=["a"])
            rig.proxy.access_log = True
            rig.proxy.access_file = sink
            rig.proxy.listener_name = "w\u00e9b"
            self.assertEqual(rig.get("/x?y").code, 200)
            texts.append([accesslog.http_line(fields) for fields in sink.rows]
                         if isinstance(sink, Fields) else sink.lines)
        self.assertEqual(texts[0], texts[1])
        self.assertEqual(len(texts[0]), 1)
        self.assertRegex(texts[0][0], r'^w\u00e9b 127\.0\.0\.1 balancer\.test "GET /x\?y HTTP/1\.1" 200 -> a '
                                      r"persistence=none bytes=\d+ \d\.\d{3}s$")

    def test_fieldThatIsNotText(self):
        """A listener name that is not text (an embedder set a number) is
        shown as the text path shows it: the request is answered and its
        line written."""
        from twisted_slb.testing import BalancerRig

        path = self.mktemp()
        sink = AccessLogFile(path, reactor=Clock())
        sink.batch_format = True
        rig = BalancerRig(backends=["a"])
        rig.proxy.access_log = True
        rig.proxy.access_file = sink
        rig.proxy.listener_name = 7  # type: ignore[assignment]
        self.assertEqual(rig.get("/").code, 200)
        sink.close()
        with open(path, "rb") as f:
            self.assertRegex(f.read(), rb' 7 127\.0\.0\.1 balancer\.test "GET / HTTP/1\.1" 200 -> a persistence=none ')


class TwistdLogWritingTests(SynchronousTestCase):
    """When L{TwistdLog} writes, and that nothing waits past a stop, a reload or a shutdown."""

    def setUp(self):
        self.clock = ShutdownClock()
        self.publisher, self.out = twistd_like()
        self.sink = TwistdLog(self.clock, self.publisher)

    def lines(self):
        return [l.split("] ", 1)[1] for l in self.out.getvalue().splitlines()]

    def test_writtenWithinATenthOfASecond(self):
        """Lines wait at most flush_delay (0.1 s), then go out together."""
        self.sink.write_line("one")
        self.clock.advance(0.05)
        self.sink.write_line("two")
        self.assertEqual(self.out.getvalue(), "")
        self.clock.advance(0.05)
        self.assertEqual(self.lines(), ["one", "two"])

    def test_oneFlushPerBatch(self):
        """The file is written and flushed once for the lines of one batch."""
        calls = []

        class Counting(io.StringIO):
            def flush(self):
                calls.append(1)

        publisher, out = twistd_like(Counting())
        sink = TwistdLog(self.clock, publisher)
        for i in range(10):
            sink.write_line(f"line {i}")
        self.clock.advance(0.1)
        self.assertEqual(len(calls), 1)
        self.assertEqual(out.getvalue().count("\n"), 10)

    def test_batchesStayWithinPIPE_BUF(self):
        """A batch is written before it would pass PIPE_BUF bytes, so that
        workers sharing a pipe never cut each other's lines."""
        writes: list = []
        publisher, out = twistd_like(RecordingText(writes))
        sink = TwistdLog(self.clock, publisher)
        for i in range(200):
            sink.write_line("x" * 100)
        self.clock.advance(0.1)
        self.assertEqual(out.getvalue().count("\n"), 200)
        self.assertGreater(len(writes), 1)
        self.assertLessEqual(max(writes), accesslog._BATCH_BYTES)

    def test_nonASCIIBatchesStayWithinPIPE_BUF(self):
        """Batches are counted in the bytes written (UTF-8), not in
        characters: lines of two-byte characters stay within PIPE_BUF too."""
        writes: list = []
        publisher, out = twistd_like(RecordingText(writes))
        sink = TwistdLog(self.clock, publisher)
        for i in range(200):
            sink.write_line("\u00e9" * 100)
        self.clock.advance(0.1)
        self.assertEqual(out.getvalue().count("\n"), 200)
        self.assertLessEqual(max(writes), accesslog._BATCH_BYTES)

    def test_regularFileBatchesUpTo64KB(self):
        """To a regular file (twistd's --logfile), where one write is never
        cut by another process's, a batch is written in one write of up to
        64 KB: 200 lines of 100 bytes go in one write, not in five."""
        writes = []
        path = self.mktemp()
        log_file = LogFile.fromFullPath(path)
        self.addCleanup(log_file.close)
        real_write = log_file.write

        def write(data):
            writes.append(len(data))
            return real_write(data)

        log_file.write = write  # type: ignore[method-assign]
        sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(log_file)))
        for i in range(200):
            self.assertTrue(sink.write_line("x" * 100))
        self.assertEqual(writes, [])
        self.clock.advance(0.1)
        self.assertEqual(len(writes), 1)
        for i in range(1000):
            sink.write_line("x" * 100)
        self.clock.advance(0.1)
        self.assertLessEqual(max(writes), accesslog._FILE_BATCH_BYTES)
        self.assertGreater(max(writes), accesslog._BATCH_BYTES)
        with open(path) as f:
            self.assertEqual(f.read().count("\n"), 1200)

    def test_flushedAtShutdown(self):
        """Lines written while shutting down (connections closed by the
        reactor after the services stopped) are written by a shutdown
        trigger, although the timed write would never come."""
        self.sink.write_line("closed at shutdown")
        self.clock.shutdown()
        self.assertEqual(self.lines(), ["closed at shutdown"])

    def test_logFileFlushedAtShutdown(self):
        """The same with twistd's L{LogFile}: the lines waiting reach the
        file at shutdown."""
        path = self.mktemp()
        log_file = LogFile.fromFullPath(path)
        self.addCleanup(log_file.close)
        sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(log_file)))
        self.assertTrue(sink.write_line("closed at shutdown \u00e9"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"")
        self.clock.shutdown()
        with open(path, "rb") as f:
            self.assertTrue(f.read().endswith(" [twisted_slb.access#info] closed at shutdown \u00e9\n".encode()))

    def test_binaryOutputGetsUTF8Batches(self):
        """To a binary output (the observer encodes), lines are encoded into
        one buffer as they come: written as UTF-8, in batches of at most
        PIPE_BUF bytes (not a regular file), the rest at shutdown."""
        writes = []

        class Recording(io.BytesIO):
            def write(self, data):
                writes.append(bytes(data))
                return io.BytesIO.write(self, data)

        out = Recording()
        sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(out)))
        for i in range(100):
            self.assertTrue(sink.write_line(f"caf\u00e9 {i}"))
        self.assertTrue(sink._encode)
        self.assertEqual(len(writes), 1)  # the first 4 KB; the rest waits
        self.clock.shutdown()
        self.assertEqual(len(writes), 2)
        self.assertLessEqual(max(len(w) for w in writes), accesslog._BATCH_BYTES)
        lines = out.getvalue().decode("utf-8").splitlines()
        self.assertEqual([line.split("] ", 1)[1] for line in lines], [f"caf\u00e9 {i}" for i in range(100)])

    def test_rotatingLogFileIsWarnedAbout(self):
        """twistd's default --logfile rotates every megabyte and keeps every
        rotated file: finding access lines headed there logs one warning
        that names the file and says what to do instead; a LogFile that
        keeps a bounded number of files gets none."""
        from twisted.logger import globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        path = self.mktemp()
        log_file = LogFile.fromFullPath(path)
        self.addCleanup(log_file.close)
        sink = TwistdLog(self.clock, LogPublisher(textFileLogObserver(log_file)))
        self.assertTrue(sink.write_line("x"))
        sink.resolve()  # (a reload: not said twice)
        warnings = [e for e in events if e.get("log_level") == accesslog.LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        text = formatEvent(warnings[0])
        self.assertIn(path, text)
        self.assertIn("--logfile=-", text)
        self.assertIn("access_log", text)

        events.clear()
        bounded = LogFile.fromFullPath(self.mktemp(), maxRotatedFiles=5)
        self.addCleanup(bounded.close)
        TwistdLog(self.clock, LogPublisher(textFileLogObserver(bounded))).write_line("x")
        self.assertEqual([e for e in events if e.get("log_level") == accesslog.LogLevel.warn], [])

    def test_closeDropsTheTrigger(self):
        """close writes what waits and removes the shutdown trigger."""
        self.sink.write_line("last")
        self.assertEqual(len(self.clock.triggers), 1)
        self.sink.close()
        self.assertEqual(self.lines(), ["last"])
        self.assertEqual(self.clock.triggers, {})

    def test_eventsWhenAnotherObserverListens(self):
        """With any observer beside twistd's file observer, lines stay events
        (write_line says no) so that observer sees them."""
        self.publisher.addObserver(lambda event: None)
        self.assertFalse(TwistdLog(self.clock, self.publisher).write_line("x"))

    def test_eventsWithoutAFileObserver(self):
        """With no twistd file observer at all (trial, syslog, an embedding
        application), lines stay events."""
        self.assertFalse(TwistdLog(self.clock, LogPublisher(lambda event: None)).write_line("x"))
        self.assertFalse(TwistdLog(self.clock, LogPublisher()).write_line("x"))

    def test_eventsWhenStdoutIsTheLog(self):
        """A file observer writing to a redirected standard output (which
        is itself the log) is not a file to write to."""
        logging_file = LoggingFile(Logger(observer=lambda e: None))
        publisher = LogPublisher(FileLogObserver(logging_file, lambda e: "x\n"))
        self.assertFalse(TwistdLog(self.clock, publisher).write_line("x"))

    def test_eventsWhenTheFormatHasNoRoomForALine(self):
        """An observer whose format does not end with the line's text (a
        custom formatEvent) gets events."""
        publisher = LogPublisher(FileLogObserver(io.StringIO(), lambda e: "always the same\n"))
        self.assertFalse(TwistdLog(self.clock, publisher).write_line("x"))

    def test_reloadLooksAgain(self):
        """resolve writes what waits, then finds the observer again."""
        self.sink.write_line("before")
        self.publisher.addObserver(lambda event: None)
        self.assertFalse(self.sink.resolve())
        self.assertEqual(self.lines(), ["before"])
        self.assertFalse(self.sink.write_line("after"))


class TwistdLogServiceTests(ServiceTestCase):
    """The balancer writes what waits for twistd's log at reload and at stop."""

    def sink_of(self, text):
        service = self.start_balancer(text)
        publisher, out = twistd_like()
        service.twistd_log.publisher = publisher
        self.addCleanup(service.twistd_log.close)  # its shutdown trigger on the real reactor
        return service, out

    @defer.inlineCallbacks
    def test_defaultListenersUseTwistdLog(self):
        """access_log = true gives listeners the TwistdLog; a request's line
        lands in twistd's file with the same text as before."""
        port, _ = yield self.start_http_backend("a")
        service, out = self.sink_of(CONFIG.format(a=port.getHost().port, log="x").replace('access_log = "x"', ""))
        response = yield self.agent().request(
            b"GET", f"http://127.0.0.1:{self.port_of(service, 'web')}/x?y".encode()
        )
        yield readBody(response)
        service.twistd_log.flush()
        self.assertRegex(out.getvalue(), r'\[twisted_slb.access#info\] web 127\.0\.0\.1 127\.0\.0\.1:\d+ '
                                         r'"GET /x\?y HTTP/1\.1" 200 -> a persistence=none bytes=\d+ \d+\.\d{3}s\n')

    def to_log_file(self, service, batch_format: bool) -> str:
        """Send the service's access lines to a twistd-like LogFile, as fields or as text; its path."""
        path = self.mktemp()
        log_file = LogFile.fromFullPath(path)
        self.addCleanup(log_file.close)
        service.twistd_log.publisher = LogPublisher(textFileLogObserver(log_file))
        service.twistd_log.batch_format = batch_format
        service.twistd_log.resolve()
        return path

    @defer.inlineCallbacks
    def test_requestLineToTwistdsLogFile(self):
        """To twistd's --logfile (a LogFile), a request's line is the same
        whether the proxy gives it as fields formatted with the batch (CPython's
        default) or as text (PyPy's)."""
        port, _ = yield self.start_http_backend("a")
        service = self.start_balancer(CONFIG.format(a=port.getHost().port, log="x").replace('access_log = "x"', ""))
        self.addCleanup(service.twistd_log.close)
        texts = []
        for batch_format in (True, False):
            path = self.to_log_file(service, batch_format)
            response = yield self.agent().request(
                b"GET", f"http://127.0.0.1:{self.port_of(service, 'web')}/x?y".encode()
            )
            yield readBody(response)
            service.twistd_log.flush()
            with open(path, "rb") as f:
                texts.append(f.read().decode("utf-8"))
        for text in texts:
            self.assertRegex(text, r'\[twisted_slb.access#info\] web 127\.0\.0\.1 127\.0\.0\.1:\d+ '
                                   '"GET /x\\?y HTTP/1\\.1" 200 -> a persistence=none bytes=\\d+ '
                                   r'\d+\.\d{3}s\n')

    @defer.inlineCallbacks
    def test_fieldsWaitingAreWrittenAtReloadAndStop(self):
        """HTTP lines waiting as fields in a batch for twistd's --logfile are
        written by SIGHUP's reload and by the stop, not lost."""
        service = self.start_balancer(CONFIG.format(a=1, log="x").replace('access_log = "x"', ""))
        self.addCleanup(service.twistd_log.close)
        path = self.to_log_file(service, True)
        self.assertTrue(service.twistd_log.write_http(reactor.seconds(), http_fields(uri=b"/before-reload")))
        service.reload()
        with open(path, "rb") as f:
            self.assertIn(b'"GET /before-reload HTTP/1.1"', f.read())
        self.assertTrue(service.twistd_log.write_http(reactor.seconds(), http_fields(uri=b"/before-stop")))
        service.twistd_log._flush_call.cancel()  # only the stop may write it
        yield service.stopService()
        with open(path, "rb") as f:
            self.assertIn(b'"GET /before-stop HTTP/1.1"', f.read())

    def test_reloadWritesWhatWaits(self):
        """SIGHUP's reload writes the lines waiting."""
        service, out = self.sink_of(CONFIG.format(a=1, log="x").replace('access_log = "x"', ""))
        self.assertTrue(service.twistd_log.write_line("waiting"))
        service.reload()
        self.assertIn("] waiting\n", out.getvalue())

    @defer.inlineCallbacks
    def test_stopWritesWhatWaits(self):
        """Stopping the balancer writes the lines waiting."""
        service, out = self.sink_of(CONFIG.format(a=1, log="x").replace('access_log = "x"', ""))
        self.assertTrue(service.twistd_log.write_line("waiting"))
        service.twistd_log._flush_call.cancel()  # only the stop may write it
        yield service.stopService()
        self.assertIn("] waiting\n", out.getvalue())
