"""
Several worker processes serving the same listening sockets (C{workers = N}).

The parent opens every listener's socket (so ports below 1024 are bound once,
with privileges) and never accepts on them; it starts N worker processes
(C{python -m twisted_slb.workers}) that inherit the sockets and adopt them with
L{IReactorSocket.adoptStreamPort}.  The kernel spreads new connections over
the workers, so one host uses all its cores.

Persistence agrees across workers: cookie persistence is stateless (the
cookie names the backend), and source-IP persistence chooses new clients by
consistent hashing of their address in worker mode, so every worker pins a
given client to the same backend without sharing a table.

The parent restarts a worker that dies (at once, unless that worker is in a
crash loop: see L{WorkerPoolService}), forwards SIGHUP (reload) to the
workers (starting a new generation when the set of listening addresses
changed), and on shutdown asks the workers to stop gracefully.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.logger import Logger

from twisted_slb._io import heap
from twisted_slb._io.reactor import SLBEPollReactor
from twisted_slb._io.sockets import port_family
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.config import Config, ConfigError, load_config

log = Logger(namespace="twisted_slb.workers")


class _NeverAccepts(ServerFactory):
    """The parent's factory: its ports never read, so this never builds."""

    noisy = False

    def buildProtocol(self, addr):  # pragma: no cover - the port is not read
        return None


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPoolService, index: int, generation: int, started: float) -> None:
        self.pool = pool
        self.index = index
        self.generation = generation
        self.started = started  # reactor.seconds() when it was spawned
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.pool._worker_ended(self, reason)


class WorkerPoolService(Service):
    """
    The parent process of worker mode.

    Restarts are judged per worker slot (its index): a worker that dies after
    running for at least L{crash_window} seconds is restarted at once, and its
    slot's back-off is reset.  Only a worker that dies sooner than that after
    starting is in a crash loop: it is restarted after L{restart_delay}
    seconds, doubled on each further quick death of that slot, up to
    L{max_restart_delay}.  The other workers are never touched: they keep
    accepting on the shared sockets meanwhile.

    @ivar config: the L{Config} in force.
    @ivar workers: the running worker process protocols.
    """

    #: a worker that dies sooner than this (seconds) after starting is crash-looping
    crash_window = 5.0
    #: seconds before a crash-looping worker is started again (doubled while it keeps dying)
    restart_delay = 1.0
    #: the longest back-off of a crash loop
    max_restart_delay = 30.0

    def __init__(self, config: Config, reactor=None, python: str = sys.executable,
                 adopted: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
        """
        @param adopted: listener name -> C{(fd, family)} of listening sockets
            handed over by the process this one upgrades (see
            L{twisted_slb.upgrade}); served instead of binding again.
        """
        self.adopted = dict(adopted or {})
        reactor = maybe_global_reactor(reactor)
        self.reactor = reactor
        self.config = config
        self.python = python
        # bind description -> listening port (not read): a reactor's port,
        # which also has stopReading and fileno (not in IListeningPort).
        self.ports: Dict[str, Any] = {}
        self.workers: List[_WorkerProcess] = []
        self.generation = 0
        self._stopping = False
        self._delays: Dict[int, float] = {}  # worker index -> its next crash-loop delay

    # -- sockets -----------------------------------------------------------

    @staticmethod
    def _listeners(config: Config):
        from twisted_slb.service import BalancerService

        return BalancerService._listener_configs(config)

    def _open_sockets(self, config: Config) -> None:
        for listener in self._listeners(config):
            if listener.bind in self.ports:
                continue
            failures: list = []
            if listener.name in self.adopted:
                fd, family = self.adopted.pop(listener.name)
                d = defer.maybeDeferred(self.reactor.adoptStreamPort, fd, family, _NeverAccepts())
            else:
                d = serverFromString(self.reactor, listener.bind).listen(_NeverAccepts())
            d.addCallbacks(lambda port, bind=listener.bind: self.ports.__setitem__(bind, port), failures.append)
            if failures:
                raise SystemExit(
                    f"twisted_slb: listener {listener.name!r} cannot listen on "
                    f"{listener.bind!r}: {failures[0].getErrorMessage()}"
                )
            # The parent holds the socket for its workers; it never accepts.
            self.ports[listener.bind].stopReading()

    def _close_unused_sockets(self) -> None:
        binds = {listener.bind for listener in self._listeners(self.config)}
        for bind in [b for b in self.ports if b not in binds]:
            self.ports.pop(bind).stopListening()

    def listening_sockets(self) -> Dict[str, Tuple[str, int, int]]:
        """Listener name -> C{(bind, fd, family)}, for an upgrade to inherit."""
        return {
            listener.name: (listener.bind, self.ports[listener.bind].fileno(), int(port_family(self.ports[listener.bind])))
            for listener in self._listeners(self.config)
            if listener.bind in self.ports
        }

    # -- workers -----------------------------------------------------------

    def _spawn(self, index: int) -> None:
        args = [self.python, "-m", "twisted_slb.workers", "--config", self.config.path, "--index", str(index)]
        if SLBEPollReactor is None or not isinstance(self.reactor, SLBEPollReactor):
            args.append("--twisted-reactor")  # the parent runs Twisted's reactor: so do its workers
        child_fds: Dict[int, object] = {0: "w", 1: 1, 2: 2}
        for listener in self._listeners(self.config):
            port = self.ports[listener.bind]
            fd = port.fileno()
            child_fds[fd] = fd
            args += ["--listener", f"{listener.name}={fd}:{int(port_family(port))}"]
        proto = _WorkerProcess(self, index, self.generation, self.reactor.seconds())
        self.reactor.spawnProcess(proto, self.python, args, env=os.environ.copy(), childFDs=child_fds)
        self.workers.append(proto)
        assert proto.transport is not None  # spawnProcess connected it
        log.info("worker {index} started (pid {pid})", index=index, pid=proto.transport.pid)

    def _worker_ended(self, proto: _WorkerProcess, reason) -> None:
        if proto in self.workers:
            self.workers.remove(proto)
        if self._stopping or proto.generation != self.generation:
            return
        delay = self.restart_delay_for(proto.index, self.reactor.seconds() - proto.started)
        log.error(
            "worker {index} exited unexpectedly ({reason}) after {uptime:.1f} s; {when}",
            index=proto.index, reason=reason.getErrorMessage(), uptime=self.reactor.seconds() - proto.started,
            when="restarting it now" if delay == 0 else f"crash loop: restarting in {delay} s",
        )
        # Even "now" goes through the reactor: never spawn from inside
        # processEnded.
        self.reactor.callLater(delay, self._respawn, proto.index, proto.generation)

    def restart_delay_for(self, index: int, uptime: float) -> float:
        """
        How long to wait before restarting worker C{index}, which died after
        C{uptime} seconds, and advance (or reset) that slot's back-off.

        @return: 0 after a normal run; the slot's back-off after a quick death.
        """
        if uptime >= self.crash_window:
            self._delays.pop(index, None)
            return 0.0
        delay = self._delays.get(index, self.restart_delay)
        self._delays[index] = min(delay * 2, self.max_restart_delay)
        return delay

    def _respawn(self, index: int, generation: int) -> None:
        if not self._stopping and generation == self.generation:
            self._spawn(index)

    def _signal_all(self, workers, signum: int) -> None:
        for proto in workers:
            try:
                proto.transport.signalProcess(signum)
            except Exception:  # the process already ended
                pass

    # -- lifetime ----------------------------------------------------------

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._open_sockets(self.config)

    def startService(self) -> None:
        Service.startService(self)
        if not self.ports:
            self._open_sockets(self.config)
        for i in range(self.config.workers):
            self._spawn(i)

    def reload(self) -> bool:
        """
        Re-read the configuration.  When every listener keeps its address the
        workers reload in place (SIGHUP); otherwise a new generation of
        workers starts on the new sockets and the old one stops gracefully.
        """
        try:
            config = load_config(self.config.path)
            self._open_sockets(config)
        except (ConfigError, SystemExit) as e:
            log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return False
        same = {(l.name, l.bind) for l in self._listeners(config)} == {
            (l.name, l.bind) for l in self._listeners(self.config)
        }
        self.config = config
        if same and len(self.workers) == config.workers:
            self._signal_all(self.workers, signal.SIGHUP)
            return True
        old = list(self.workers)
        self.generation += 1
        for i in range(config.workers):
            self._spawn(i)
        self._signal_all(old, signal.SIGTERM)
        self._close_unused_sockets()
        return True

    def stopService(self):
        Service.stopService(self)
        self._stopping = True
        workers = list(self.workers)
        self._signal_all(workers, signal.SIGTERM)
        ended = defer.DeferredList([w.ended for w in workers])
        # A worker that outlives its grace period (plus a margin) is killed.
        killer = self.reactor.callLater(
            self.config.grace_period + 5.0, self._signal_all, workers, signal.SIGKILL
        )

        def done(_):
            if killer.active():
                killer.cancel()
            for port in self.ports.values():
                port.stopListening()
            self.ports.clear()

        return ended.addCallback(done)


# -- the worker process ----------------------------------------------------------


def _parse_listener(text: str) -> Tuple[str, Tuple[int, int]]:
    name, _, rest = text.rpartition("=")
    fd, _, family = rest.partition(":")
    return name, (int(fd), int(family))


def worker_main(argv: Optional[List[str]] = None) -> None:
    """Entry point of a worker process (started by L{WorkerPoolService})."""
    parser = argparse.ArgumentParser(prog="python -m twisted_slb.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--twisted-reactor", action="store_true",
                        help="run Twisted's default reactor, not twisted_slb._io.reactor's")
    args = parser.parse_args(argv)

    if not args.twisted_reactor:
        from twisted_slb._io.reactor import install_default

        install_default()
    from twisted.internet import reactor as global_reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from twisted_slb.service import BalancerService

    # A posix reactor: callFromThread, run(installSignalHandlers=...) and
    # more than the one interface mypy gives the global reactor.
    reactor = cast(Any, global_reactor)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config = load_config(args.config)
    adopted = dict(_parse_listener(t) for t in args.listener)
    balancer = BalancerService(config, reactor, adopted=adopted, worker=True)
    balancer.startService()
    for fd, _ in adopted.values():
        # adoptStreamPort duplicated the descriptor: ours is no longer needed.
        os.close(fd)
    heap.freeze_startup()
    trimmer = heap.trimming_service(reactor)  # gives memory freed after a burst back (glibc)
    if trimmer is not None:
        trimmer.startService()

    def reload() -> None:
        heap.thaw()  # the configuration replaced may then be collected
        balancer.reload()

    signal.signal(signal.SIGHUP, lambda *a: reactor.callFromThread(reload))
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.addSystemEventTrigger("before", "shutdown", balancer.stopService)
    _watch_parent(reactor, args.index)
    reactor.run(installSignalHandlers=False)


def _watch_parent(reactor, index: int) -> None:
    """
    Stop (gracefully) when the parent is gone: it holds the write end of our
    standard input, so its death, even by SIGKILL, is end-of-file there.
    Without this, workers of a killed parent would serve on alone, with
    nobody to restart them or forward a reload.
    """
    from twisted.internet.protocol import Protocol
    from twisted.internet.stdio import StandardIO

    class ParentWatch(Protocol):
        def connectionLost(self, reason=None) -> None:
            log.warn("worker {index}: the parent process is gone; stopping", index=index)
            if reactor.running:
                reactor.stop()

    # mypy sees Windows' StandardIO; the posix one (used here) takes stdin and stdout.
    StandardIO(ParentWatch(), stdin=0, stdout=1, reactor=reactor)  # type: ignore[call-arg]


if __name__ == "__main__":
    worker_main()
