"""
Health checks: active (a TCP connect or an HTTP request on a timer) and
passive (outlier detection on the proxies' own connects and requests).

Each backend of a group has a L{HealthState}.  The two kinds of check own
separate pieces of the backend's state (L{twisted_slb.backends.Backend}):

  - active checks set C{healthy}: an up backend goes down after
    C{unhealthy_threshold} failed checks in a row, and comes up after
    C{healthy_threshold} successful ones;
  - passive checks set C{ejected}, as Envoy's outlier detection does: a
    backend is ejected after C{consecutive_failures} failed connects in a
    row, or when C{failure_rate} percent of its requests failed over the last
    C{interval} (once at least C{min_requests} were seen).  An ejection lasts
    C{base_ejection_time} times the number of recent ejections (capped by
    C{max_ejection_time}); that number decays by one for every C{interval}
    spent back in.  No ejection takes out more than C{max_ejection_percent} of
    a group, nor its last usable backend.  A returning backend starts afresh
    (no one-strike rule) and ramps up to its weight over C{slow_start}.

Neither ever touches the operator's C{admin_state}.  Each change is one log
line.  Being down or ejected only means the schedulers and pins stop using
the backend: a client pinned to it is re-pinned to a healthy backend on its
next connection or request; when it comes back, new clients reach it, and
clients that were re-pinned elsewhere stay where they are.
"""

from __future__ import annotations

import math
import random as _random
from typing import Callable, Dict, List, Optional, Tuple, cast

import attr
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import ConfigError, HealthCheckConfig, PassiveHealthConfig

log = Logger(namespace="twisted_slb.health")


@attr.s(auto_attribs=True)
class HealthState:
    """What the monitor knows of one backend (shown by the admin listener)."""

    # active checks
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    last_check: Optional[float] = None
    last_status: str = ""  # "ok", "failed"
    last_reason: str = ""
    checks: int = 0
    down_by: str = ""  # "active" or "passive" while down or ejected
    # passive checks (outlier detection)
    passive_failures: int = 0  # failed connects in a row
    window_start: float = 0.0
    window_successes: int = 0
    window_failures: int = 0  # every failure, failed connects included
    window_connect_failures: int = 0
    previous_successes: int = 0  # the interval before the current one
    previous_failures: int = 0
    previous_connect_failures: int = 0
    ejections: int = 0  # ever
    ejection_count: int = 0  # recent ejections (before decay): the multiplier of the next one
    ejected_until: Optional[float] = None
    returned_at: Optional[float] = None
    last_ejection_reason: str = ""
    refused_at: Optional[float] = None  # last ejection refused by max_ejection_percent


class _Connected(Protocol):
    """A tcp check: the connect is the whole check."""

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    def __init__(self, probe: "_Probe") -> None:
        self.probe = probe

    def connectionMade(self) -> None:
        self.probe.protocol_ = self
        self.probe.finish(True, "connected")
        self.transport.loseConnection()


class _Probe(ClientFactory):
    """
    One active check of one backend, finished (by L{finish}) once: a tcp
    check is a connect; the udp and http checks are subclasses.
    """

    noisy = False

    def __init__(self, monitor: "HealthMonitor", backend: Backend, config: HealthCheckConfig) -> None:
        self.monitor = monitor
        self.backend = backend
        self.config = config
        self.done = False
        self.protocol_ = None
        self.connector = None
        self.timer = monitor.reactor.callLater(config.timeout, self._timed_out)

    def start(self) -> None:
        """Connect (a tcp check)."""
        backend = self.backend
        self.connector = self.monitor.reactor.connectTCP(backend.host, backend.port, self,
                                                          timeout=self.config.timeout)

    def buildProtocol(self, addr):
        return _Connected(self)

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


@implementer(IAgentEndpointFactory)
class _BackendEndpoint:
    """
    Agent's endpoint for a check: always the backend's own address, over
    TLS when its group has C{tls}, with the options the proxy uses (the
    same server name for SNI and verification, the same trust roots).
    """

    def __init__(self, reactor, backend: Backend, timeout: float, tls_options) -> None:
        self.reactor = reactor
        self.backend = backend
        self.timeout = timeout
        self.tls_options = tls_options

    def endpointForURI(self, uri):
        backend = self.backend
        endpoint = TCP4ClientEndpoint(self.reactor, backend.host, backend.port, timeout=self.timeout)
        if ":" in backend.host:
            endpoint = TCP6ClientEndpoint(self.reactor, backend.host, backend.port, timeout=self.timeout)
        if self.tls_options is not None:
            endpoint = wrapClientTLS(self.tls_options, endpoint)
        return endpoint


class _Discard(Protocol):
    """Takes a check's response body, which no one reads: the status said it all."""


class _HTTPProbe(_Probe):
    """
    An http check: C{GET path} through L{twisted.web.client.Agent} (over
    TLS when the group has C{tls}); a status within C{expect} passes.
    """

    def start(self) -> None:
        monitor = self.monitor
        backend = self.backend
        config = self.config
        try:
            tls_options = monitor.tls_options_for(backend)
        except ConfigError as e:  # the group's ca file cannot be read
            self.finish(False, f"TLS options: {e}")
            return
        agent = Agent.usingEndpointFactory(
            monitor.reactor, _BackendEndpoint(monitor.reactor, backend, config.timeout, tls_options)
        )
        host = config.host or backend.address
        scheme = b"https" if tls_options is not None else b"http"
        url = scheme + b"://" + backend.address.encode("utf-8") + config.path.encode("utf-8")
        headers = Headers({b"host": [host.encode("utf-8")], b"user-agent": [b"twisted_slb-health"]})
        self.request = agent.request(b"GET", url, headers)
        self.request.addCallbacks(self._response, self._failed)

    def _response(self, response) -> None:
        lo, hi = self.config.expect
        code = response.code
        ok = lo <= code <= hi
        self.finish(ok, f"status {code}" + ("" if ok else f" (expected {lo}..{hi})"))
        body = _Discard()
        response.deliverBody(body)
        if body.transport is not None:
            body.transport.loseConnection()  # no need to wait for the body

    def _failed(self, reason) -> None:
        if self.done or reason.check(CancelledError):
            return  # timed out or stopped: said already
        if reason.check(error.TimeoutError):
            self.finish(False, "connect timed out")
            return
        if reason.check(error.ConnectError):
            self.finish(False, f"connect {reason.getErrorMessage()}")
            return
        inner = getattr(reason.value, "reasons", None)
        if inner:
            reason = inner[0]
        self.finish(False, f"no response: {reason.getErrorMessage() or reason.type.__name__}")

    def cancel(self) -> None:
        request = getattr(self, "request", None)
        if request is not None and not request.called:
            request.cancel()


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
    @ivar passive: the L{PassiveHealthConfig}.
    @ivar slow_start: seconds over which a backend that comes back up after
        active checks goes from a tenth of its weight to all of it (0: at
        once); a return from an ejection ramps over C{passive.slow_start}.
    @ivar tls: a L{twisted_slb.tls.ClientTLSCache}-like object with
        C{options_for(group, tls, host)}: http checks of a group with C{tls}
        use it, so that they connect exactly as the proxy does.
    """

    #: slow-start steps (the share grows this many times)
    ramp_steps = 10

    def __init__(
        self,
        group: BackendGroup,
        config: Optional[HealthCheckConfig] = None,
        reactor=None,
        passive_threshold: Optional[int] = None,
        cooldown: Optional[float] = None,
        random: Callable[[], float] = _random.random,
        slow_start: float = 0.0,
        passive: Optional[PassiveHealthConfig] = None,
        tls=None,
    ) -> None:
        reactor = maybe_global_reactor(reactor)
        if passive is None:
            passive = PassiveHealthConfig()
        # The older keywords: a consecutive-failure threshold and a fixed cool-down.
        if passive_threshold is not None:
            passive = attr.evolve(passive, consecutive_failures=passive_threshold)
        if cooldown is not None:
            passive = attr.evolve(passive, base_ejection_time=cooldown,
                                  max_ejection_time=max(cooldown, passive.max_ejection_time))
        self.group = group
        self.config = config
        self.passive = passive
        self.reactor = reactor
        self.random = random
        self.slow_start = slow_start
        self.tls = tls
        self._ramps: Dict[str, IDelayedCall] = {}  # backend name -> next slow-start step
        self._timers: Dict[str, IDelayedCall] = {}  # backend name -> next active check
        self._returns: Dict[str, IDelayedCall] = {}  # backend name -> end of its ejection
        self._probes: Dict[str, _Probe] = {}
        self._watchers: List[Tuple[Backend, bool, Deferred]] = []

    @property
    def passive_threshold(self) -> int:
        """Failed connects in a row that eject a backend (C{passive.consecutive_failures})."""
        return self.passive.consecutive_failures

    @property
    def cooldown(self) -> float:
        """The length of a first ejection (C{passive.base_ejection_time})."""
        return self.passive.base_ejection_time

    # -- lifetime ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self.sync()

    def stopService(self) -> None:
        Service.stopService(self)
        for call in list(self._timers.values()) + list(self._ramps.values()) + list(self._returns.values()):
            if call.active():
                call.cancel()
        self._timers.clear()
        self._ramps.clear()
        self._returns.clear()
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
                backend.ejected = False

    def update(self, group: BackendGroup, config: Optional[HealthCheckConfig], slow_start: float = 0.0,
               passive: Optional[PassiveHealthConfig] = None) -> None:
        """A reload: new settings and perhaps new backends.  Running ejections run on."""
        changed = config != self.config
        self.group = group
        self.config = config
        self.slow_start = slow_start
        if passive is not None:
            self.passive = passive
        if changed:
            for call in self._timers.values():
                if call.active():
                    call.cancel()
            self._timers.clear()
            if config is None:
                # No more active checks: their verdict no longer stands.
                for backend in group.backends:
                    if not backend.healthy:
                        self._mark(backend, True, "active checks removed")
        if self.running:
            self.sync()

    def sync(self) -> None:
        """Attach to every backend of the group; start checks of new ones."""
        names = set()
        for backend in self.group.backends:
            names.add(backend.name)
            backend.monitor = self
            if "health" not in backend.extra:
                backend.extra["health"] = HealthState(window_start=self.reactor.seconds())
            if self.config is not None and backend.name not in self._timers:
                # Jittered first check so that many backends are not all
                # checked at the same moment.
                self._schedule(backend, self.random() * self.config.interval)
        for timers in (self._timers, self._returns, self._ramps):
            for name in [n for n in timers if n not in names]:
                call = timers.pop(name)
                if call.active():
                    call.cancel()

    # -- active checks ---------------------------------------------------------

    def tls_options_for(self, backend: Backend):
        """The client TLS options of C{backend} (as the proxy's), or L{None} without C{tls}."""
        group = self.group
        if group.tls is None:
            return None
        if self.tls is None:
            from twisted_slb.tls import ClientTLSCache

            self.tls = ClientTLSCache()
        return self.tls.options_for(group.name, group.tls, backend.host)

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
        probe = (_HTTPProbe if config.type == "http" else _Probe)(self, backend, config)
        self._probes[backend.name] = probe
        probe.start()

    def _checked(self, backend: Backend, ok: bool, reason: str) -> None:
        self._probes.pop(backend.name, None)
        state = self.state(backend)
        state.checks += 1
        state.last_check = self.reactor.seconds()
        state.last_status = "ok" if ok else "failed"
        state.last_reason = reason
        config = self.config
        if config is None:
            return
        if ok:
            state.consecutive_successes += 1
            state.consecutive_failures = 0
            if not backend.healthy and state.consecutive_successes >= config.healthy_threshold:
                self._mark(backend, True, f"{state.consecutive_successes} checks passed ({reason})")
        else:
            state.consecutive_failures += 1
            state.consecutive_successes = 0
            if backend.healthy and state.consecutive_failures >= config.unhealthy_threshold:
                self._mark(backend, False, f"{state.consecutive_failures} checks failed in a row: {reason}")
        if self.running and backend in self.group.backends:
            self._schedule(backend, config.interval)

    # -- passive checks (called by the proxies through Backend.monitor) --------

    def failure(self, backend: Backend, reason: str, connect: Optional[bool] = None) -> None:
        """
        A connect or a request to C{backend} failed.

        @param reason: what happened, for the log.
        @param connect: whether the connect itself failed; L{None}: a reason
            starting with C{"connect"} (as the proxies write it) says so.
            Only failed connects count towards C{consecutive_failures}: a
            backend that breaks one response in ten must not be ejected by
            an unlucky run of three; the failure rate judges it.
        """
        state = self.state(backend)
        passive = self.passive
        self._roll(state, passive.interval)
        state.window_failures += 1
        if connect is None:
            connect = reason.startswith("connect ")
        if connect:
            state.passive_failures += 1
            state.window_connect_failures += 1
        if backend.ejected:
            return
        if connect and 0 < passive.consecutive_failures <= state.passive_failures:
            self._eject(backend, state, f"{state.passive_failures} failed connects in a row: {reason}")
            return
        if passive.failure_rate > 0:
            failures, seen = self._recent(state)
            if seen >= passive.min_requests and failures * 100.0 >= passive.failure_rate * seen:
                self._eject(backend, state, f"{failures} of {seen} requests failed "
                            f"({100.0 * failures / seen:.0f}%, limit {passive.failure_rate:g}%): {reason}")

    def success(self, backend: Backend) -> None:
        """A connect or a request to C{backend} succeeded."""
        state = cast("Optional[HealthState]", backend.extra.get("health"))
        if state is not None:
            state.passive_failures = 0
            self._roll(state, self.passive.interval)
            state.window_successes += 1

    @staticmethod
    def _recent(state: HealthState) -> Tuple[int, int]:
        """
        Failures and requests of the current and the previous interval.

        The proxies report a success when a response head arrives, and a
        failure if the body then breaks: one request, two reports.  So the
        requests are the successes and the failed connects (which never
        succeeded), and never fewer than the failures (requests that failed
        before any response).
        """
        failures = state.window_failures + state.previous_failures
        connects = state.window_connect_failures + state.previous_connect_failures
        seen = max(state.window_successes + state.previous_successes + connects, failures)
        return failures, seen

    def _roll(self, state: HealthState, interval: float) -> None:
        """Start a new failure-rate interval when the current one is over."""
        elapsed = self.reactor.seconds() - state.window_start
        if elapsed >= interval:
            if elapsed >= 2 * interval:
                state.previous_successes = state.previous_failures = state.previous_connect_failures = 0
            else:
                state.previous_successes = state.window_successes
                state.previous_failures = state.window_failures
                state.previous_connect_failures = state.window_connect_failures
            state.window_successes = state.window_failures = state.window_connect_failures = 0
            state.window_start = self.reactor.seconds()

    def _eject(self, backend: Backend, state: HealthState, why: str) -> None:
        passive = self.passive
        now = self.reactor.seconds()
        backends = self.group.backends
        ejected = sum(1 for b in backends if b.ejected)
        allowed = math.floor(len(backends) * passive.max_ejection_percent / 100.0 + 1e-9)
        if passive.max_ejection_percent > 0:
            allowed = max(allowed, 1)
        others_usable = any(b.up for b in backends if b is not backend)
        if ejected >= allowed or not others_usable:
            if state.refused_at is None or now - state.refused_at >= passive.interval:
                state.refused_at = now
                limit = ("it is the group's last usable backend" if not others_usable
                         else f"{ejected} of {len(backends)} already ejected (max_ejection_percent "
                              f"{passive.max_ejection_percent:g})")
                log.warn("backend {group}/{backend} ({address}) not ejected, {limit}: {why}",
                         group=self.group.name, backend=backend.name, address=backend.address,
                         limit=limit, why=why)
            return
        count = self._decayed_count(state, now) + 1
        state.ejection_count = count
        duration = min(passive.base_ejection_time * count, passive.max_ejection_time)
        state.ejections += 1
        state.ejected_until = now + duration
        state.last_ejection_reason = why
        was_up = backend.up
        backend.ejected = True
        self._stop_ramp(backend)
        self._returns[backend.name] = self.reactor.callLater(duration, self._return, backend)
        log.warn("backend {group}/{backend} ({address}) ejected for {duration:g} s (ejection {count}): {why}",
                 group=self.group.name, backend=backend.name, address=backend.address,
                 duration=duration, count=count, why=why)
        self._changed(backend, state, was_up)

    def _decayed_count(self, state: HealthState, now: float) -> int:
        """The recent ejections, less one for every C{interval} spent back in since the last."""
        if state.returned_at is None or state.ejected_until is None or now < state.ejected_until:
            return state.ejection_count
        back_for = now - state.returned_at
        return max(0, state.ejection_count - int(back_for // self.passive.interval))

    def _return(self, backend: Backend) -> None:
        self._returns.pop(backend.name, None)
        state = self.state(backend)
        now = self.reactor.seconds()
        state.returned_at = now
        # A fresh start: no one-strike rule.
        state.passive_failures = 0
        state.window_successes = state.window_failures = state.window_connect_failures = 0
        state.previous_successes = state.previous_failures = state.previous_connect_failures = 0
        state.window_start = now
        was_up = backend.up
        backend.ejected = False
        log.info("backend {group}/{backend} ({address}) back after an ejection of {duration:g} s",
                 group=self.group.name, backend=backend.name, address=backend.address,
                 duration=min(self.passive.base_ejection_time * state.ejection_count,
                              self.passive.max_ejection_time))
        if backend.up and self.passive.slow_start > 0:
            self._ramp(backend, 1, self.passive.slow_start)
        self._changed(backend, state, was_up)

    def passive_snapshot(self, backend: Backend) -> dict:
        """The passive checks' view of C{backend}, for C{/stats}."""
        state = self.state(backend)
        now = self.reactor.seconds()
        self._roll(state, self.passive.interval)
        failures, seen = self._recent(state)
        ejected = backend.ejected and state.ejected_until is not None
        return {
            "ejected": backend.ejected,
            "ejected_for": round(max(0.0, state.ejected_until - now), 3) if ejected else 0.0,
            "ejections": state.ejections,
            "ejection_multiplier": self._decayed_count(state, now),
            "last_ejection_reason": state.last_ejection_reason,
            "consecutive_connect_failures": state.passive_failures,
            "recent_requests": seen,
            "recent_failure_rate": round(100.0 * failures / seen, 1) if seen else 0.0,
        }

    # -- state -----------------------------------------------------------------

    def state(self, backend: Backend) -> HealthState:
        state = cast("Optional[HealthState]", backend.extra.get("health"))
        if state is None:
            state = backend.extra["health"] = HealthState(window_start=self.reactor.seconds())
        return state

    def _mark(self, backend: Backend, up: bool, why: str) -> None:
        """The active checks' verdict changed."""
        was_up = backend.up
        backend.healthy = up
        if up and self.slow_start > 0 and backend.up:
            self._ramp(backend, 1, self.slow_start)
        elif not up:
            self._stop_ramp(backend)
        state = self.state(backend)
        if up:
            log.info("backend {group}/{backend} ({address}) up: {why}",
                     group=self.group.name, backend=backend.name, address=backend.address, why=why)
        else:
            log.warn("backend {group}/{backend} ({address}) down: {why}",
                     group=self.group.name, backend=backend.name, address=backend.address, why=why)
        self._changed(backend, state, was_up)

    def _changed(self, backend: Backend, state: HealthState, was_up: bool) -> None:
        state.down_by = "active" if not backend.healthy else "passive" if backend.ejected else ""
        up = backend.up
        if up == was_up:
            return
        for watch in [w for w in self._watchers if w[0] is backend and w[1] == up]:
            self._watchers.remove(watch)
            watch[2].callback(backend)

    def _stop_ramp(self, backend: Backend) -> None:
        call = self._ramps.pop(backend.name, None)
        if call is not None and call.active():
            call.cancel()
        backend.ramp = 1.0

    def _ramp(self, backend: Backend, step: int, duration: float) -> None:
        """Slow start: the share grows in steps from 1/steps to all of it."""
        self._ramps.pop(backend.name, None)
        steps = self.ramp_steps
        backend.ramp = step / steps
        if step < steps and backend.up:
            self._ramps[backend.name] = self.reactor.callLater(
                duration / steps, self._ramp, backend, step + 1, duration
            )
        else:
            backend.ramp = 1.0

    def when(self, backend: Backend, up: bool) -> Deferred:
        """A L{Deferred} that fires when C{backend} is next usable (or not)."""
        d: Deferred = Deferred()
        if backend.up == up:
            d.callback(backend)
        else:
            self._watchers.append((backend, up, d))
        return d
