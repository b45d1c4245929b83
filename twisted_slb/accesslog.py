"""
A buffered access log file, for busy listeners.

By default (C{access_log = true}) access lines are log events in the
C{twisted_slb.access} namespace, written wherever twistd logs.  twistd's
file observer formats each event (time, system, format string) and flushes
the file for every line, which costs about as much as the request itself.
With C{access_log = "/path/to/access.log"} the lines go to that file
instead, as nginx's C{access_log ... buffer=64k flush=1s} does: formatted
once, buffered, and written when 64 KB are waiting or once a second, so the
file is at most a second behind.

The file is reopened on reload (SIGHUP), so log rotation works the usual
way: rename the file, then send SIGHUP.  A write that fails (disk full, file
removed with its directory) is logged once, the lines are dropped, and
writing is tried again at the next flush; the requests never notice.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional

from twisted.logger import Logger

log = Logger(namespace="twisted_slb.accesslog")


def _timestamp(now: float) -> str:
    """Local time like twistd's log lines: C{2026-11-24T23:41:29+0000}."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))


class AccessLogFile:
    """
    One access log file, shared by the listeners that name it.

    @ivar path: the file.
    @ivar buffer_bytes: write when this much is waiting.
    @ivar flush_interval: seconds a line may wait at most.
    @ivar failing: whether the last write failed (logged once until one
        succeeds).
    """

    def __init__(self, path: str, reactor=None, buffer_bytes: int = 65536, flush_interval: float = 1.0) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self.reactor = reactor
        self.buffer_bytes = buffer_bytes
        self.flush_interval = flush_interval
        self.failing = False
        self._lines: List[bytes] = []
        self._size = 0
        self._second = -1
        self._stamp = b""
        self._flush_call = None
        self._fd: Optional[int] = None
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._fd = None
            self._failed(e)

    def write_line(self, line: str) -> None:
        """Add one access line (without its time, which is put in front)."""
        now = self.reactor.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = _timestamp(now).encode("ascii") + b" "
        data = self._stamp + line.encode("utf-8", "replace") + b"\n"
        self._lines.append(data)
        self._size += len(data)
        if self._size >= self.buffer_bytes:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.reactor.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write what is buffered."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
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
        """Flush and close."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
