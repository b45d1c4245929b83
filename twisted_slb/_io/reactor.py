"""
The reactor C{twistd slb} runs on: Twisted's epoll reactor, dispatching
socket events without the per-event logging context.

Twisted's epoll reactor hands every ready socket to the transport through
C{twisted.python.log.callWithLogger}: it calls the transport's
C{logPrefix()}, builds a context dictionary, and pushes and pops it on
Twisted's context stack, so that an old-style C{log.msg} made while the
event is handled is tagged with the connection's name.  A proxy handles
two to four such events per request, and measured here that bookkeeping is
a sixth of an HTTP listener's CPU time and half of a TCP relay's Python
time (docs/performance.md).  twisted_slb logs through C{twisted.logger},
with its own namespaces and fields, so the context buys it nothing.

L{SLBEPollReactor} is C{EPollReactor} with C{doPoll} doing the same work
without that wrapper; an exception escaping the dispatch (Twisted already
catches those of C{doRead} and C{doWrite}) is still logged.  The one thing
that changes is the C{system} of old-style log lines written during an
event: C{-} instead of the connection's prefix.

It relies on three private attributes of
L{twisted.internet.epollreactor.EPollReactor} (C{_poller}, C{_selectables},
C{_doReadOrWrite}), which Twisted has kept since 2012; L{install} checks
they are there, and L{install_default} otherwise leaves Twisted's reactor
in place.

C{twistd slb} installs it unless a reactor was chosen already (C{twistd
--reactor NAME slb} keeps NAME).  An application that embeds twisted_slb
chooses its own reactor; it can call L{install} before anything imports
C{twisted.internet.reactor}.
"""

from __future__ import annotations

import errno
import sys
from typing import Optional

from twisted.logger import Logger

from twisted_slb._io.twisted_private import EPOLL_REACTOR_PRIVATE

log = Logger(namespace="twisted_slb._io.reactor")

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll: not Linux
    EPollReactor = None  # type: ignore[assignment,misc]  # the optional-import idiom: mypy has no spelling for it


if EPollReactor is not None:

    class SLBEPollReactor(EPollReactor):
        """C{EPollReactor} without the per-event logging context (see the module docstring)."""

        def doPoll(self, timeout: Optional[float]) -> None:
            if timeout is None:
                timeout = -1  # wait indefinitely
            try:
                # At most as many events as selectables, as EPollReactor does.
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            dispatch = self._doReadOrWrite
            selectable_for = self._selectables.get
            for fd, event in events:
                selectable = selectable_for(fd)
                if selectable is None:
                    continue  # removed by an earlier event of this batch
                try:
                    dispatch(selectable, fd, event)
                except Exception:
                    log.failure("error dispatching an event of {selectable!r}", selectable=selectable)

        doIteration = doPoll

else:
    SLBEPollReactor = None  # type: ignore[assignment,misc]  # as EPollReactor above


def install() -> None:
    """
    Install L{SLBEPollReactor} as the global reactor.

    @raise twisted.internet.error.ReactorAlreadyInstalledError: a reactor is
        installed already.
    @raise RuntimeError: it cannot run here: no epoll, or a Twisted whose
        C{EPollReactor} lacks what it relies on.
    """
    if SLBEPollReactor is None:
        raise RuntimeError("the twisted_slb epoll reactor needs epoll (Linux)")
    reactor = SLBEPollReactor()
    missing = [name for name in EPOLL_REACTOR_PRIVATE if not hasattr(reactor, name)]
    if missing:
        raise RuntimeError(f"this Twisted's EPollReactor has no {', '.join(missing)}: use Twisted's own reactor")
    from twisted.internet.main import installReactor

    installReactor(reactor)


def install_default() -> str:
    """
    Install L{SLBEPollReactor} unless a reactor is installed already (or it
    cannot run here).

    @return: the class name of the reactor that will run.
    """
    if "twisted.internet.reactor" not in sys.modules:
        try:
            install()
        except RuntimeError as e:
            log.info("using Twisted's default reactor: {why}", why=str(e))
    from twisted.internet import reactor

    return type(reactor).__name__
