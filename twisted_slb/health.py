"""
Health checks: active (a TCP connect or an HTTP request on a timer) and
passive (the proxies' own failed connects and requests).

Each backend of a group has a L{HealthState}.  An up backend goes down after
C{unhealthy_threshold} failed active checks in a row, or after
C{passive_threshold} failed connects/requests in a row; a down backend comes
up after C{healthy_threshold} successful active checks in a row, or, when the
group has no active checks, after a cool-down.  Each change is one log line.

Being down only means the schedulers and pins stop using the backend: a
client pinned to it is re-pinned to a healthy backend on its next connection
or request; when it comes back, new clients reach it, and clients that were
re-pinned elsewhere stay where they are.
"""

from __future__ import annotations

import random as _random
from typing import Callable, Dict, List, Optional, Tuple

import attr
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.logger import Logger

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import HealthCheckConfig

log = Logger(namespace="twisted_slb.health")


@attr.s(auto_attribs=True)
class HealthState:
    """What the monitor knows of one backend (shown by the admin listener)."""

    consecutive_successes: int = 0
    consecutive_failures: int = 0
    passive_failures: int = 0
    last_check: Optional[float] = None
    last_status: str = ""  # "ok", "failed"
    last_reason: str = ""
    last_change: Optional[float] = None
    checks: int = 0
    down_by: str = ""  # "active" or "passive" while down


class _Check(Protocol):
    """One active check: a connect, or an HTTP request's status line."""

    def __init__(self, probe: "_Probe") -> None:
        self.probe = probe
        self.buffer = b""

    def connectionMade(self) -> None:
        probe = self.probe
        probe.connected(self)
        if probe.config.type == "tcp":
            probe.finish(True, "connected")
            self.transport.loseConnection()
            return
        host = probe.config.host or probe.backend.address
        self.transport.write(
            b"GET " + probe.config.path.encode("utf-8") + b" HTTP/1.1\r\nHost: " + host.encode("utf-8")
            + b"\r\nConnection: close\r\nUser-Agent: twisted_slb-health\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n" not in self.buffer:
            if len(self.buffer) > 4096:
                self.probe.finish(False, "invalid response")
                self.transport.loseConnection()
            return
        line = self.buffer.split(b"\r\n", 1)[0]
        parts = line.split(b" ", 2)
        lo, hi = self.probe.config.expect
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            code = int(parts[1])
            ok = lo <= code <= hi
            self.probe.finish(ok, f"status {code}" + ("" if ok else f" (expected {lo}..{hi})"))
        else:
            self.probe.finish(False, "invalid status line")
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.probe.finish(False, "connection closed before a status line")


class _Probe(ClientFactory):
    noisy = False

    def __init__(self, monitor: "HealthMonitor", backend: Backend, config: HealthCheckConfig) -> None:
        self.monitor = monitor
        self.backend = backend
        self.config = config
        self.done = False
        self.protocol_ = None
        self.connector = None
        self.timer = monitor.reactor.callLater(config.timeout, self._timed_out)

    def buildProtocol(self, addr):
        return _Check(self)

    def connected(self, proto) -> None:
        self.protocol_ = proto

    def clientConnectionFailed(self, connector, reason) -> None:
        why = "timed out" if reason.check(error.TimeoutError) else reason.getErrorMessage()
        self.finish(False, f"connect {why}")

    def _timed_out(self) -> None:
        self.timer = None
        self.finish(False, f"no answer in {self.config.timeout} s")
        self.cancel()

    def cancel(self) -> None:
        if self.protocol_ is not None and self.protocol_.transport is not None:
            self.protocol_.transport.abortConnection()
        elif self.connector is not None:
            self.connector.disconnect()

    def finish(self, ok: bool, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.monitor._checked(self.backend, ok, reason)


class _UDPCheck(DatagramProtocol):
    noisy = False

    def __init__(self, probe: "_UDPProbe") -> None:
        self.probe = probe

    def datagramReceived(self, data: bytes, addr) -> None:
        expect = self.probe.config.expect_bytes
        if expect in data:
            self.probe.finish(True, f"answered ({len(data)} bytes)")
        else:
            self.probe.finish(False, f"answer without {expect!r}: {data[:32]!r}")

    def connectionRefused(self) -> None:
        self.probe.finish(False, "port unreachable (ICMP)")

    def stopProtocol(self) -> None:
        # The epoll reactor closes a connected UDP port on an ICMP error
        # (see twisted_slb.udp._BackendSide).
        if not self.probe.done:
            from twisted_slb.udp import socket_error

            self.probe.finish(False, socket_error(self.probe.port))


class _UDPProbe(_Probe):
    """
    One udp check: C{send} from a socket connected to the backend; a reply
    containing C{expect_bytes} within C{timeout} passes, ICMP port
    unreachable or silence fails.
    """

    def __init__(self, monitor: "HealthMonitor", backend: Backend, config: HealthCheckConfig) -> None:
        _Probe.__init__(self, monitor, backend, config)
        self.port = None
        check = _UDPCheck(self)
        try:
            self.port = monitor.reactor.listenUDP(0, check, interface="::" if ":" in backend.host else "")
            self.port.connect(backend.host, backend.port)
            self.port.write(config.send)
        except (error.CannotListenError, OSError, ValueError) as e:
            self.finish(False, f"cannot send: {e}")

    def finish(self, ok: bool, reason: str) -> None:
        _Probe.finish(self, ok, reason)
        self.cancel()

    def cancel(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()


class HealthMonitor(Service):
    """
    Health of one backend group.

    @ivar group: the L{BackendGroup}.
    @ivar config: the L{HealthCheckConfig}, or L{None} for passive checks only.
    @ivar passive_threshold: failed connects/requests in a row that take a
        backend down.
    @ivar cooldown: seconds a passively downed backend stays out when there
        are no active checks.
    @ivar slow_start: seconds over which a backend that comes back up goes
        from a tenth of its weight to all of it (0: at once).
    """

    #: slow-start steps (the share grows this many times)
    ramp_steps = 10

    def __init__(
        self,
        group: BackendGroup,
        config: Optional[HealthCheckConfig] = None,
        reactor=None,
        passive_threshold: int = 3,
        cooldown: float = 10.0,
        random: Callable[[], float] = _random.random,
        slow_start: float = 0.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.group = group
        self.config = config
        self.reactor = reactor
        self.passive_threshold = passive_threshold
        self.cooldown = cooldown
        self.random = random
        self.slow_start = slow_start
        self._ramps: Dict[str, object] = {}  # backend name -> next slow-start step
        self._timers: Dict[str, object] = {}  # backend name -> next check / cool-down call
        self._probes: Dict[str, _Probe] = {}
        self._watchers: List[Tuple[Backend, bool, Deferred]] = []

    # -- lifetime ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self.sync()

    def stopService(self) -> None:
        Service.stopService(self)
        for call in list(self._timers.values()) + list(self._ramps.values()):
            if call.active():
                call.cancel()
        self._timers.clear()
        self._ramps.clear()
        for probe in list(self._probes.values()):
            probe.done = True
            if probe.timer is not None and probe.timer.active():
                probe.timer.cancel()
            probe.cancel()
        self._probes.clear()
        for backend in self.group.backends:
            if backend.monitor is self:
                backend.monitor = None
                backend.ramp = 1.0

    def update(self, group: BackendGroup, config: Optional[HealthCheckConfig], slow_start: float = 0.0) -> None:
        """A reload: new settings and perhaps new backends."""
        changed = config != self.config
        self.group = group
        self.config = config
        self.slow_start = slow_start
        if changed:
            for call in self._timers.values():
                if call.active():
                    call.cancel()
            self._timers.clear()
        if self.running:
            self.sync()

    def sync(self) -> None:
        """Attach to every backend of the group; start checks of new ones."""
        names = set()
        for backend in self.group.backends:
            names.add(backend.name)
            backend.monitor = self
            if "health" not in backend.extra:
                backend.extra["health"] = HealthState()
            if self.config is not None and backend.name not in self._timers:
                # Jittered first check so that many backends are not all
                # checked at the same moment.
                self._schedule(backend, self.random() * self.config.interval)
        for name in [n for n in self._timers if n not in names]:
            call = self._timers.pop(name)
            if call.active():
                call.cancel()

    # -- active checks ---------------------------------------------------------

    def _schedule(self, backend: Backend, delay: float) -> None:
        self._timers[backend.name] = self.reactor.callLater(delay, self._check, backend)

    def _check(self, backend: Backend) -> None:
        self._timers.pop(backend.name, None)
        config = self.config
        if config is None or backend not in self.group.backends:
            return
        if config.type == "udp":
            self._probes[backend.name] = _UDPProbe(self, backend, config)
            return
        probe = _Probe(self, backend, config)
        self._probes[backend.name] = probe
        probe.connector = self.reactor.connectTCP(backend.host, backend.port, probe, timeout=config.timeout)

    def _checked(self, backend: Backend, ok: bool, reason: str) -> None:
        self._probes.pop(backend.name, None)
        state = self.state(backend)
        state.checks += 1
        state.last_check = self.reactor.seconds()
        state.last_status = "ok" if ok else "failed"
        state.last_reason = reason
        config = self.config
        if ok:
            state.consecutive_successes += 1
            state.consecutive_failures = 0
            if not backend.up and state.consecutive_successes >= config.healthy_threshold:
                self._mark(backend, True, f"{state.consecutive_successes} checks passed ({reason})")
        else:
            state.consecutive_failures += 1
            state.consecutive_successes = 0
            if backend.up and state.consecutive_failures >= config.unhealthy_threshold:
                self._mark(backend, False, f"{state.consecutive_failures} checks failed in a row: {reason}",
                           by="active")
        if self.running and config is not None and backend in self.group.backends:
            self._schedule(backend, config.interval)

    # -- passive checks (called by the proxies through Backend.monitor) --------

    def failure(self, backend: Backend, reason: str) -> None:
        state = self.state(backend)
        state.passive_failures += 1
        if backend.up and state.passive_failures >= self.passive_threshold:
            self._mark(backend, False, f"{state.passive_failures} failures in a row: {reason}", by="passive")
            if self.config is None:
                self._timers[backend.name] = self.reactor.callLater(self.cooldown, self._cooled_down, backend)

    def success(self, backend: Backend) -> None:
        state = backend.extra.get("health")
        if state is not None:
            state.passive_failures = 0

    def _cooled_down(self, backend: Backend) -> None:
        self._timers.pop(backend.name, None)
        if not backend.up:
            state = self.state(backend)
            # One more failure takes it out again at once.
            state.passive_failures = self.passive_threshold - 1
            self._mark(backend, True, f"back after a {self.cooldown} s cool-down")

    # -- state -----------------------------------------------------------------

    def state(self, backend: Backend) -> HealthState:
        state = backend.extra.get("health")
        if state is None:
            state = backend.extra["health"] = HealthState()
        return state

    def _mark(self, backend: Backend, up: bool, why: str, by: str = "") -> None:
        backend.up = up
        if up and self.slow_start > 0:
            self._ramp(backend, 1)
        elif not up:
            call = self._ramps.pop(backend.name, None)
            if call is not None and call.active():
                call.cancel()
            backend.ramp = 1.0
        state = self.state(backend)
        state.last_change = self.reactor.seconds()
        state.down_by = "" if up else by
        if up:
            log.info("backend {group}/{backend} ({address}) up: {why}",
                     group=self.group.name, backend=backend.name, address=backend.address, why=why)
        else:
            log.warn("backend {group}/{backend} ({address}) down: {why}",
                     group=self.group.name, backend=backend.name, address=backend.address, why=why)
        for watch in [w for w in self._watchers if w[0] is backend and w[1] == up]:
            self._watchers.remove(watch)
            watch[2].callback(backend)

    def _ramp(self, backend: Backend, step: int) -> None:
        """Slow start: the share grows in steps from 1/steps to all of it."""
        self._ramps.pop(backend.name, None)
        steps = self.ramp_steps
        backend.ramp = step / steps
        if step < steps and backend.up:
            self._ramps[backend.name] = self.reactor.callLater(
                self.slow_start / steps, self._ramp, backend, step + 1
            )
        else:
            backend.ramp = 1.0

    def when(self, backend: Backend, up: bool) -> Deferred:
        """A L{Deferred} that fires when C{backend} is next marked up (or down)."""
        d: Deferred = Deferred()
        if backend.up == up:
            d.callback(backend)
        else:
            self._watchers.append((backend, up, d))
        return d
