"""
Access logs that cost little: buffered writes instead of one flushed log
event per line.

By default (C{access_log = true}) access lines go to twistd's log, in the
C{twisted_slb.access} namespace.  Sent as log events, each line would go
through the observer chain, be formatted by twistd's file observer (time,
system, format string) and flushed to the file on its own, which costs
about as much as the request itself.  L{TwistdLog} writes exactly the same
text to the same file, but formats it with a per-second cached prefix and
writes them in batches, at most a tenth of a second late (see its docstring for
when it steps aside and sends events as before).

With C{access_log = "/path/to/access.log"} the lines go to that file
instead (L{AccessLogFile}), as nginx's C{access_log ... buffer=64k
flush=1s} does: formatted once, buffered, and written when 64 KB are
waiting or once a second, so the file is at most a second behind.

The file is reopened on reload (SIGHUP), so log rotation works the usual
way: rename the file, then send SIGHUP.  A write that fails (disk full, file
removed with its directory) is logged once, the lines are dropped, and
writing is tried again at the next flush; the requests never notice.
"""

from __future__ import annotations

import io
import os
import platform
import select
import stat
import time
from typing import IO, Any, List, Optional, cast

from twisted.logger import FileLogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.logfile import BaseLogFile, LogFile

from twisted_slb._io.twisted_private import file_observer_output, publisher_observers
from twisted_slb._reactor import maybe_global_reactor

log = Logger(namespace="twisted_slb.accesslog")
access = Logger(namespace="twisted_slb.access")

#: The namespace of access lines, part of each line in twistd's log.
ACCESS_NAMESPACE = "twisted_slb.access"

# A batch is written in one call of at most this many bytes (unless one
# line is longer) when twistd's log is a pipe or a terminal: workers share
# their parent's standard output, and writes to a pipe are kept whole only
# up to PIPE_BUF bytes.
_BATCH_BYTES = getattr(select, "PIPE_BUF", 4096)
# To a regular file (twistd's --logfile), where one write(2) is not split by
# another process's: a write per 64 KB, not per 4 KB.
_FILE_BATCH_BYTES = 65536


def _batch_bytes(out: IO[Any]) -> int:
    """The largest batch for twistd's log file C{out}."""
    if isinstance(out, BaseLogFile):
        return _FILE_BATCH_BYTES  # twistd's --logfile (no fileno(): always a file on disk)
    try:
        regular = stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        regular = False
    return _FILE_BATCH_BYTES if regular else _BATCH_BYTES

_MARK = "\x00twisted_slb-access-mark\x00"

#: An HTTP access line, as C{bytes % fields}: L{http_line} gives the same
#: text from the same fields.  The fields, in this order: listener, client,
#: host, method, URI, protocol, status (int), backend, persistence outcome,
#: bytes sent (int), duration (float seconds), and C{b" (client closed)"}
#: or C{b""}; the request's own fields (host to protocol) as received, the
#: others encoded as UTF-8.
HTTP_FORMAT = b'%s %s %s "%s %s %s" %d -> %s persistence=%s bytes=%d %.3fs%s'

#: Whether the access logs take HTTP lines as fields, formatted with their
#: batch (C{write_http}), rather than as text.  On CPython a line formatted
#: per request costs twice what a tuple does plus its share of a batch
#: formatted in one C loop (C{bytes %} by C{map}): the interpreter's work
#: per request is what costs there.  On PyPy the reverse: the JIT makes the
#: f-string cheap, its strings are UTF-8 already, and C{bytes %} is slow
#: (docs/performance.md has the figures).
BATCH_FORMAT = platform.python_implementation() == "CPython"

# Fields of a batch are formatted together (one C loop, L{_format_rows})
# once this many wait, or when the second (the line's time) changes.
_ROWS = 256


def http_text(listener: str, client: str, host: bytes, method: bytes, uri: bytes, proto: bytes, status: int,
              backend: str, outcome: str, sent: int, duration: float, gone: str) -> str:
    """The text of an HTTP access line: the request's bytes are shown as
    Latin-1 characters."""
    return (f'{listener} {client} {host.decode("latin-1")} "{method.decode("latin-1")} {uri.decode("latin-1")} '
            f'{proto.decode("latin-1")}" {status} -> {backend} persistence={outcome} bytes={sent} '
            f"{duration:.3f}s{gone}")


def http_line(fields: tuple) -> str:
    """The text of an HTTP access line from its fields (see L{HTTP_FORMAT})."""
    listener, client, host, method, uri, proto, status, name, outcome, sent, duration, gone = fields
    return http_text(listener.decode(), client.decode(), host, method, uri, proto, status, name.decode(),
                     outcome.decode(), sent, duration, gone.decode())


def _row_format(prefix: bytes, suffix: bytes) -> bytes:
    """L{HTTP_FORMAT} between C{prefix} and C{suffix}, as one format."""
    return prefix.replace(b"%", b"%%") + HTTP_FORMAT + suffix.replace(b"%", b"%%")


def _format_rows(rows: list, row_format: bytes, slow) -> bytes:
    """
    The lines of C{rows} (fields of L{HTTP_FORMAT}) as bytes: formatted by
    C{row_format} all at once when the result is what L{http_line} would
    give, that is ASCII (a request's non-ASCII bytes are shown as Latin-1
    characters, written in UTF-8) and without a newline inside a line;
    otherwise each row by C{slow(row)}.
    """
    try:
        data = b"".join(map(row_format.__mod__, rows))
    except (TypeError, ValueError):  # a field of an unexpected type: the text path shows it
        return b"".join(map(slow, rows))
    if data.isascii() and data.count(b"\n") == row_format.count(b"\n") * len(rows):
        return data
    return b"".join(map(slow, rows))


def _timestamp(now: float) -> str:
    """Local time like twistd's log lines: C{2026-11-24T23:41:29+0000}."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))


class AccessLogFile:
    """
    One access log file, shared by the listeners that name it.

    @ivar path: the file.
    @ivar buffer_bytes: write when this much is waiting.
    @ivar flush_interval: seconds a line may wait at most.
    @ivar batch_format: whether the proxy gives HTTP lines as fields
        (L{write_http}) rather than as text (L{BATCH_FORMAT} by default).
    @ivar failing: whether the last write failed (logged once until one
        succeeds).
    """

    def __init__(self, path: str, reactor=None, buffer_bytes: int = 65536, flush_interval: float = 1.0) -> None:
        reactor = maybe_global_reactor(reactor)
        self.path = path
        self.reactor = reactor
        self.buffer_bytes = buffer_bytes
        self.flush_interval = flush_interval
        self.batch_format = BATCH_FORMAT
        self.failing = False
        self._closed = False
        self._lines: List[bytes] = []
        self._size = 0
        self._second = -1
        self._stamp = b""
        self._rows: List[tuple] = []  # HTTP lines not yet formatted (write_http)
        self._row_format = b""
        self._flush_call = None
        self._fd: Optional[int] = None
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._fd = None
            self._failed(e)

    def write_line(self, line: str) -> bool:
        """Add one access line (without its time, which is put in front).

        @return: C{True}: the line is taken.
        """
        now = self.reactor.seconds()
        if int(now) != self._second:
            self._new_second(now)
        if self._rows:
            self._close_rows()  # (lines stay in order)
        data = self._stamp + line.encode("utf-8", "replace") + b"\n"
        self._lines.append(data)
        self._size += len(data)
        self._taken()
        return True

    def _new_second(self, now: float) -> None:
        self._close_rows()  # (with the previous second's time)
        self._second = int(now)
        self._stamp = _timestamp(now).encode("ascii") + b" "
        self._row_format = _row_format(self._stamp, b"\n")

    def write_http(self, now: float, fields: tuple) -> bool:
        """
        Add one HTTP access line given by its fields (L{HTTP_FORMAT}), at
        time C{now}: the text is L{http_line}'s, formatted later with the
        other lines of its batch, in one C loop instead of a format per
        request.

        @return: C{True}: the line is taken.
        """
        if int(now) != self._second:
            self._new_second(now)
        rows = self._rows
        rows.append(fields)
        if len(rows) >= _ROWS or self._closed:
            self._close_rows()
        self._taken()
        return True

    def _close_rows(self) -> None:
        """Format the HTTP lines waiting as fields into the buffer."""
        rows = self._rows
        if rows:
            self._rows = []
            data = _format_rows(rows, self._row_format, self._row_text)
            self._lines.append(data)
            self._size += len(data)

    def _row_text(self, fields: tuple) -> bytes:
        """One HTTP line formatted as L{write_line} would write it."""
        return self._stamp + http_line(fields).encode("utf-8", "replace") + b"\n"

    def _taken(self) -> None:
        """Write now, or later, what was just added."""
        if self._closed:
            # A connection that ended after the service closed its files (as
            # it stops): its line is written at once, and nothing is left
            # running for a file that is closed.
            self.flush()
            self._close_fd()
        elif self._size >= self.buffer_bytes:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write what is buffered."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        self._close_rows()
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines = []
        self._size = 0
        if self._fd is None:
            self._open()
            if self._fd is None:
                return
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as e:
            self._failed(e)
            return
        if self.failing:
            self.failing = False
            log.info("access log {path}: writing again", path=self.path)

    def _failed(self, error: OSError) -> None:
        if not self.failing:
            self.failing = True
            log.error("access log {path}: cannot write ({error}); access lines are dropped until it works again",
                      path=self.path, error=error.strerror or str(error))

    def reopen(self) -> None:
        """Flush, then reopen the file by name (after a rotation)."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._open()

    def close(self) -> None:
        """Flush and close; a line that comes later is written at once."""
        self.flush()
        self._close_fd()
        self._closed = True

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def twistd_file_observer(publisher=globalLogPublisher) -> Optional[FileLogObserver]:
    """
    The file observer twistd logs to, if it is the only place log events
    go; otherwise L{None}.

    twistd (and a worker process) begins logging to one
    L{twisted.logger.FileLogObserver} (C{textFileLogObserver} of its log
    file or of standard output).  When anything else also observes events
    (a test's observer, C{twistd --logger}, syslog, an embedding
    application's observers), access lines must stay events so that those
    observers see them too.

    Twisted has no public way to list a publisher's observers nor to get a
    L{FileLogObserver}'s file: this reads the private C{LogPublisher._observers}
    and C{FileLogObserver._outFile}, both unchanged since twisted.logger
    appeared (Twisted 15.2), through L{twisted_slb._io.twisted_private}.
    tests/test_twisted_private.py fails loudly if either
    goes away; should one disappear anyway, this returns L{None} and access
    lines are log events again (slower, never lost).
    """
    observers = publisher_observers(publisher)
    if observers is None or len(observers) != 1:
        return None
    observer = observers[0]
    output = file_observer_output(observer) if type(observer) is FileLogObserver else None
    if output is None:
        return None
    from twisted.logger import LoggingFile

    if isinstance(output[0], LoggingFile):
        return None  # standard output sent back into the log: that is events again
    return observer


class TwistdLog:
    """
    Access lines to twistd's log file, the text identical to what twistd's
    observer writes for a C{twisted_slb.access} event, written in batches.

    The first line of a batch schedules its write C{flush_delay} seconds
    later (a tenth of a second), and a batch is written at once when it
    reaches 64 KB (to a regular file, twistd's C{--logfile}) or C{PIPE_BUF}
    bytes (to a pipe or a terminal: workers share their parent's standard
    output, and a pipe keeps only writes up to C{PIPE_BUF} whole); so lines
    reach the file at most a tenth of a second late, in writes of a few dozen lines, instead of an event, a
    formatting and a flush each.  (A write per reactor turn was tried
    first: with a new connection per request a turn holds one or two
    requests, and the write per turn cost 10% of the request.)  L{flush} writes what is waiting; the
    balancer calls it on reload (SIGHUP) and at stop, and a shutdown
    trigger calls it last, after the connections closed while shutting
    down have logged their lines (SIGTERM).

    The line's prefix (time and C{[twisted_slb.access#info]}) is made by
    the observer's own C{formatEvent} once a second, so the text is the same
    whatever time format it uses.  When no single twistd file observer is
    found (L{twistd_file_observer}), or the observer's format has no room
    for a prefix plus the line, L{write_line} returns C{False} and the
    caller emits the event as before.

    @ivar reactor: the clock.
    @ivar flush_delay: seconds a line may wait at most.
    @ivar publisher: where twistd's observer is looked for.
    @ivar batch_format: whether HTTP lines given as fields (L{write_http})
        are taken, to a regular file (L{BATCH_FORMAT} by default); read
        when twistd's observer is found (L{resolve}: the first line, and
        each reload).
    """

    def __init__(self, reactor=None, publisher=globalLogPublisher, flush_delay: float = 0.1) -> None:
        reactor = maybe_global_reactor(reactor)
        self.reactor = reactor
        self.publisher = publisher
        self.flush_delay = flush_delay
        self.batch_format = BATCH_FORMAT
        self._observer: Optional[FileLogObserver] = None
        self._resolved = False
        self._out: Optional[IO[Any]] = None  # a text or a binary file (self._encode)
        self._encode = False
        self._lines: List[str] = []  # to a text file
        self._size = 0
        self._pending = bytearray()  # to a binary file (self._encode)
        self._batch = _BATCH_BYTES
        self._second = -1
        self._prefix = ""
        self._suffix = "\n"
        self._prefix_bytes = b""
        self._suffix_bytes = b"\n"
        self._affixes = 1
        self._takes_fields = False  # write_http takes fields (to a regular file, with batch_format)
        self._bytes = False  # what waits is in self._pending (a binary output, or fields are taken)
        self._decode = False  # a regular file opened as text: batches written as str
        self._rows: List[tuple] = []  # HTTP lines not yet formatted (write_http)
        self._row_format = b""
        self._flush_call = None
        self._trigger = None
        self._announced: Optional[FileLogObserver] = None

    # -- finding twistd's log ------------------------------------------------

    def resolve(self) -> bool:
        """(Re)find twistd's observer; C{True} when lines can be written to it."""
        self.flush()
        self._resolved = True
        self._second = -1
        observer = twistd_file_observer(self.publisher)
        self._observer = None
        self._out = None
        if observer is None:
            return False
        parts = self._format(observer, self.reactor.seconds())
        if parts is None:
            return False
        output = file_observer_output(observer)  # see twistd_file_observer for why
        assert output is not None  # twistd_file_observer returns only an observer with a file
        out, encoding = output
        if observer is not self._announced:
            self._announced = observer
            log.info("access lines go to twistd's log, written in batches")
            if isinstance(out, LogFile) and out.rotateLength and out.maxRotatedFiles is None:
                log.warn(
                    "twistd's log file {path} is rotated every {size} bytes, keeping every rotated file and "
                    "renaming all of them at each rotation: with access lines under load that is about a rotation "
                    "a second, ever slower, until the disk is full. Run twistd with --logfile=- (the journal), "
                    "or give the listeners access_log = \"/path\" and rotate that file (docs/operations.md)",
                    path=out.path, size=out.rotateLength)
        self._observer = observer
        self._out = cast(IO[Any], out)
        self._encode = encoding is not None
        self._batch = _batch_bytes(self._out)
        regular = self._batch == _FILE_BATCH_BYTES  # (twistd's --logfile: batches of any size)
        self._takes_fields = regular and self.batch_format
        # (Lines and fields are kept in the same buffer, in order.)
        self._bytes = self._encode or self._takes_fields
        self._decode = regular and not self._encode and not isinstance(out, BaseLogFile)
        if self._trigger is None and hasattr(self.reactor, "addSystemEventTrigger"):
            self._trigger = self.reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        return True

    @staticmethod
    def _format(observer: FileLogObserver, now: float):
        """The (prefix, suffix) twistd's observer puts around an access line at C{now}."""
        try:
            text = observer.formatEvent(
                {"log_time": now, "log_namespace": ACCESS_NAMESPACE, "log_level": LogLevel.info,
                 "log_format": "{line}", "line": _MARK}
            )
        except Exception:
            return None
        if not text or text.count(_MARK) != 1:
            return None
        prefix, suffix = text.split(_MARK)
        if "\n" in prefix:
            return None
        return prefix, suffix

    @property
    def active(self) -> bool:
        """Whether lines go straight to twistd's log file."""
        return self._out is not None

    # -- writing -------------------------------------------------------------

    def write_line(self, line: str) -> bool:
        """
        Queue one access line for twistd's log.

        @return: C{False} when the caller must emit it as a log event.
        """
        if self._out is None:
            if self._resolved or not self.resolve():
                return False
        now = self.reactor.seconds()
        if int(now) != self._second and not self._new_second(now):
            return False
        if "\n" in line:
            line = line.replace("\n", "\n\t")  # as formatEventAsClassicLogText does
        if self._bytes:
            # A binary output (the observer encodes: a file opened in binary
            # mode) or a regular file (twistd's LogFile) takes bytes: each line
            # is encoded at once into one buffer, so that no line outlives
            # this call (on PyPy, lines kept until the batch is written are
            # copied by every minor collection they live through).
            if self._rows:
                self._close_rows()  # (lines stay in order)
            data = line.encode("utf-8")
            pending = self._pending
            if len(pending) + len(data) + self._affixes > self._batch and pending:
                self.flush()
                pending = self._pending
            pending += self._prefix_bytes
            pending += data
            pending += self._suffix_bytes
        else:
            # Bytes as written (UTF-8): a decoded header may hold non-ASCII.
            added = (len(line) if line.isascii() else len(line.encode("utf-8"))) + self._affixes
            size = self._size + added
            if size > self._batch and self._lines:
                self.flush()
                size = added
            lines = self._lines
            lines.append(self._prefix)  # (three appends and one join: no copy per line)
            lines.append(line)
            lines.append(self._suffix)
            self._size = size
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.flush_delay, self.flush)
        return True

    def _new_second(self, now: float) -> bool:
        """
        The prefix for lines of the second of C{now}, from twistd's
        observer; C{False} (and what waits is written) when its format has
        no room for a line any more.
        """
        self._close_rows()  # (with the previous second's prefix)
        assert self._observer is not None  # set with self._out (resolve)
        parts = self._format(self._observer, now)
        if parts is None:
            self.flush()
            self._out = None
            return False
        self._second = int(now)
        self._prefix, self._suffix = parts
        self._prefix_bytes = self._prefix.encode("utf-8")
        self._suffix_bytes = self._suffix.encode("utf-8")
        self._affixes = len(self._prefix_bytes) + len(self._suffix_bytes)
        self._row_format = _row_format(self._prefix_bytes, self._suffix_bytes)
        return True

    def write_http(self, now: float, fields: tuple) -> bool:
        """
        Queue one HTTP access line given by its fields (L{HTTP_FORMAT}),
        at time C{now}: the text is L{http_line}'s, formatted later, with
        the other lines of its batch, in one C loop instead of a format per
        request.  Only to a regular file (twistd's C{--logfile}), where a
        batch may be of any size.

        @return: C{False} when the caller must write L{http_line} with
            L{write_line} instead (a pipe: batches counted to C{PIPE_BUF}).
        """
        if self._out is None:
            if self._resolved or not self.resolve():
                return False
        if not self._takes_fields:
            return False
        if int(now) != self._second and not self._new_second(now):
            return False
        rows = self._rows
        rows.append(fields)
        if len(rows) >= _ROWS:
            self._close_rows()
            if len(self._pending) >= self._batch:
                self.flush()
                return True
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.flush_delay, self.flush)
        return True

    def _close_rows(self) -> None:
        """Format the HTTP lines waiting as fields into the batch."""
        rows = self._rows
        if rows:
            self._rows = []
            self._pending += _format_rows(rows, self._row_format, self._row_text)

    def _row_text(self, fields: tuple) -> bytes:
        """One HTTP line formatted as L{write_line} would write it."""
        line = http_line(fields)
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return self._prefix_bytes + line.encode("utf-8") + self._suffix_bytes

    def flush(self) -> None:
        """Write the waiting lines to twistd's log file."""
        call = self._flush_call
        if call is not None:
            self._flush_call = None
            if call.active():
                call.cancel()
        self._close_rows()
        data: Any
        if self._pending:
            data, self._pending = self._pending, bytearray()
            if self._decode:
                data = data.decode("utf-8")
        elif self._lines:
            data = "".join(self._lines)
            self._lines = []
            self._size = 0
        else:
            return
        out = self._out
        try:
            # Lines wait only while self._out is set; a failure here is caught as any other.
            assert out is not None
            out.write(data)
            out.flush()
        except Exception:
            # What twistd's observer would have met too (closed file, full
            # disk); say so where logs still go, once per batch.
            log.failure("access lines could not be written to twistd's log")

    def close(self) -> None:
        """Write what is waiting and drop the shutdown trigger."""
        self.flush()
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
