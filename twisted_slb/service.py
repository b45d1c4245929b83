"""
From a L{twisted_slb.config.Config} to running services.

L{BalancerService} is a L{MultiService} with one L{ListenerService} per
listener.  It owns the runtime state that must outlive a configuration
reload: the L{BackendGroup}s (and so every backend's health and counters), the
stick tables of source-IP persistence, and the upstream connection pool.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from twisted_slb import lean
from twisted_slb.accept import AcceptGuard
from twisted_slb.backends import BackendGroup
from twisted_slb.config import Config, ConfigError, ListenerConfig, load_config
from twisted_slb.limits import ConnectionLimit
from twisted_slb.stats import StatsRegistry
from twisted_slb.tls import ClientTLSCache, describe_address

log = Logger(namespace="twisted_slb.service")

#: The service name of the admin listener (no configured listener can have it).
ADMIN = "[admin]"


class ListenFailed(Exception):
    """A listener could not bind its address."""


class _SwitchableFactory(ServerFactory):
    """
    The factory a listening port holds: it builds protocols with whatever
    factory is current, so that a reload changes what new connections get
    without closing the port.  Connections already open keep the factory
    that built them.
    """

    noisy = False

    def __init__(self, current) -> None:
        self.current = current

    def doStart(self) -> None:
        self.current.doStart()

    def doStop(self) -> None:
        self.current.doStop()

    def switch(self, new) -> None:
        old, self.current = self.current, new
        new.doStart()
        old.doStop()

    #: the L{twisted_slb.accept.AcceptGuard} of the port, once listening
    guard = None

    def buildProtocol(self, addr):
        guard = self.guard
        if guard is not None and guard.episode:
            guard.accepted()
        return self.current.buildProtocol(addr)


class ListenerService(Service):
    """
    One listener: listens on its endpoint with its factory.

    It binds in L{privilegedStartService} (so that ports below 1024 can be
    bound before twistd sheds privileges) and raises L{SystemExit} with a
    one-line message when the address cannot be bound at start-up, so that
    C{twistd} exits with that message rather than running without the
    listener.

    @ivar config: the L{ListenerConfig}.
    @ivar factory: the protocol factory that serves connections.
    @ivar port: the L{IListeningPort} once listening, else L{None}.
    """

    def __init__(self, config: ListenerConfig, factory, reactor, adopt: Optional[Tuple[int, int]] = None) -> None:
        """
        @param adopt: C{(file descriptor, address family)} of a listening
            socket opened by a parent process (see L{twisted_slb.workers}),
            served instead of listening on C{config.bind}.
        """
        self.config = config
        self._switch = _SwitchableFactory(factory)
        # Factories a reload replaced: their connections are still open and
        # must be drained too when the listener stops.
        self._replaced: list = []
        self.reactor = reactor
        self.adopt = adopt
        self.port = None
        self.setName(config.name)

    def _listen(self) -> Deferred:
        if self.adopt is not None:
            fd, family = self.adopt
            d = maybeDeferred(self.reactor.adoptStreamPort, fd, family, self._switch)
        else:
            d = serverFromString(self.reactor, self.config.bind).listen(self._switch)

        def listening(port):
            self.port = port
            self._choose_transport()
            if hasattr(port, "_logger"):  # a tcp.Port (see AcceptGuard)
                self._switch.guard = AcceptGuard(port, self.config.name, self.reactor)
            limit = self._limit()
            if limit is not None:
                limit.add_port(port)
            log.info(
                "listener {listener} ({protocol}) listening on {address}",
                listener=self.config.name,
                protocol=self.config.protocol,
                address=describe_address(port.getHost()),
            )
            return port

        d.addCallback(listening)
        return d

    @property
    def factory(self):
        """The factory that serves new connections."""
        return self._switch.current

    def _limit(self):
        """The listener's L{twisted_slb.limits.ConnectionLimit}, if it has one."""
        factory = self.factory
        factory = getattr(factory, "wrappedFactory", factory)  # under TLS
        return getattr(factory, "limit", None)

    def _choose_transport(self) -> None:
        """
        Lean transports for the connections the port accepts from now on
        when the current factory takes them (the TCP relay, plain HTTP),
        Twisted's otherwise (a TLS wrapper, after a reload that made an
        HTTP listener HTTPS).
        """
        port = self.port
        if getattr(self._switch.current, "lean", False):
            lean.serve_port(port, self._switch)
        elif type(port) is tcp.Port and port.transport is lean.LeanServer:
            port.transport = tcp.Server

    def reconfigure(self, config: ListenerConfig, factory) -> None:
        """
        Serve new connections with C{factory} (built from C{config}, whose
        bind must be this listener's); open connections are not disturbed.
        """
        assert config.bind == self.config.bind
        self.config = config
        old = self.factory
        if self.port is None:
            self._switch.current = factory
        else:
            self._switch.switch(factory)
            self._choose_transport()
        if old is not factory:
            self._replaced = [f for f in self._replaced + [old] if _open_connections(f)]

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self.port is not None:
            return
        failures = []
        self._listen().addErrback(failures.append)
        if failures:
            reason = failures[0].getErrorMessage()
            raise SystemExit(
                f"twisted_slb: listener {self.config.name!r} cannot listen on "
                f"{self.config.bind!r}: {reason}"
            )

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None:
            # Not started through twistd's privilegedStartService (embedded,
            # or added by a reload): listen now and log a failure.
            self._listen().addErrback(
                lambda f: log.error(
                    "listener {listener} cannot listen on {bind}: {reason}",
                    listener=self.config.name,
                    bind=self.config.bind,
                    reason=f.getErrorMessage(),
                )
            )

    #: seconds open connections may finish when the listener stops
    grace_period = 10.0

    def stopService(self):
        """
        Stop accepting, then let open connections finish for at most
        L{grace_period} seconds before closing them.
        """
        Service.stopService(self)
        port, self.port = self.port, None
        limit = self._limit()
        if port is not None and limit is not None:
            limit.remove_port(port)
        guard, self._switch.guard = self._switch.guard, None
        if guard is not None:
            guard.stop()
        d = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        factories, self._replaced = [self.factory] + self._replaced, []

        def drain_all(_):
            drains = []
            for factory in factories:
                factory = getattr(factory, "wrappedFactory", factory)  # under TLS
                drain = getattr(factory, "drain", None)
                if drain is not None:
                    drains.append(drain(self.grace_period))
            return gatherResults(drains)

        return d.addCallback(drain_all)


def _open_connections(factory) -> int:
    """How many connections a listener factory (maybe under TLS) still has open."""
    factory = getattr(factory, "wrappedFactory", factory)
    for name in ("channels", "connections"):
        open_now = getattr(factory, name, None)
        if open_now is not None:
            return len(open_now)
    return 0


class BalancerService(MultiService):
    """
    Every listener of a configuration, and the state they share.

    @ivar config: the L{Config} in force.
    @ivar groups: backend groups by name.
    @ivar stick_tables: source-IP stick tables by key (listener / group), kept
        across reloads.
    """

    def __init__(
        self,
        config: Config,
        reactor=None,
        adopted: Optional[Mapping[str, Tuple[int, int]]] = None,
        worker: bool = False,
    ) -> None:
        """
        @param adopted: listener name -> C{(fd, family)} of listening sockets
            inherited from a parent process (worker mode); those listeners
            serve the socket instead of binding their address.
        @param worker: this process is one of several workers: source-IP
            persistence then picks new clients by consistent hashing so that
            all workers agree without sharing a table.
        """
        MultiService.__init__(self)
        self.adopted = dict(adopted or {})
        self.worker = worker
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.groups: Dict[str, BackendGroup] = {}
        self.stick_tables: Dict[str, object] = {}
        self.pool = None
        # Connection counts outlive a reload (open connections still count).
        self.global_limit = ConnectionLimit(config.max_connections, "[all listeners]")
        self.limits: Dict[str, ConnectionLimit] = {}
        self.access_files: Dict[str, object] = {}
        from twisted_slb.accesslog import TwistdLog

        # access_log = true: lines to twistd's log, written in batches.
        self.twistd_log = TwistdLog(reactor)
        self.client_tls = ClientTLSCache()
        self.stats = StatsRegistry(self.groups)
        self.admin_state = None
        self._warned_admin: Optional[str] = None
        certificates = self._load_certificates(config)
        self._update_groups(config)
        for listener in self._listener_configs(config):
            factory = self._build_factory(listener, certificates)
            service = ListenerService(listener, factory, reactor, adopt=self.adopted.get(listener.name))
            service.grace_period = config.grace_period
            service.setServiceParent(self)

    def stopService(self):
        """Stop every listener (letting open connections finish), then close
        the upstream connection pool."""
        d = MultiService.stopService(self)

        def close_pool(result):
            for access_file in self.access_files.values():
                access_file.close()
            # Connections closed later in the shutdown log too: a shutdown
            # trigger of the TwistdLog writes those.
            self.twistd_log.flush()
            if self.pool is not None:
                return self.pool.close().addCallback(lambda _: result)
            return result

        return d.addBoth(close_pool)

    def _access_file(self, listener: ListenerConfig):
        """The buffered access log of a listener: its file (shared by path), or twistd's log."""
        path = listener.access_log_path
        if path is None:
            return self.twistd_log if listener.access_log else None
        access_file = self.access_files.get(path)
        if access_file is None:
            from twisted_slb.accesslog import AccessLogFile

            access_file = self.access_files[path] = AccessLogFile(path, reactor=self.reactor)
        return access_file

    # -- building ----------------------------------------------------------

    def _update_groups(self, config: Config) -> None:
        from twisted_slb.health import HealthMonitor

        for name, group_config in config.backends.items():
            group = self.groups.get(name)
            if group is None:
                group = self.groups[name] = BackendGroup.from_config(group_config)
                monitor = HealthMonitor(group, group_config.health_check, reactor=self.reactor,
                                        slow_start=group_config.slow_start)
                monitor.setName(f"health:{name}")
                monitor.setServiceParent(self)
            else:
                group.update(group_config)
                self.getServiceNamed(f"health:{name}").update(
                    group, group_config.health_check, group_config.slow_start
                )
        for name in [n for n in self.groups if n not in config.backends]:
            del self.groups[name]
            self.removeService(self.getServiceNamed(f"health:{name}"))
        for name, group_config in config.backends.items():
            if group_config.tls is not None:
                # Loads the CA file and warns (once) about verify = false.
                self.client_tls.prepare(name, group_config.tls)

    def _load_certificates(self, config: Config) -> Dict[str, object]:
        """
        Read and check the certificates of every https listener, before
        anything else changes, so that a bad file fails a reload as a whole.

        @raise ConfigError: a certificate file is missing or invalid.
        """
        from twisted_slb.tls import load_certificate_set

        return {
            listener.name: load_certificate_set(
                listener.certificates, f"listeners.{listener.name}.certificates"
            )
            for listener in config.listeners.values()
            if listener.protocol == "https"
        }

    @staticmethod
    def _listener_configs(config: Config):
        """The listeners of C{config}, the admin listener included."""
        listeners = list(config.listeners.values())
        if config.admin is not None:
            listeners.append(ListenerConfig(name=ADMIN, protocol="admin", bind=config.admin.bind,
                                            max_connections=config.admin.max_connections, over_limit="close"))
        return listeners

    def _build_factory(self, listener: ListenerConfig, certificates: Dict[str, object]):
        if listener.protocol == "admin":
            return self._build_admin(listener)
        if listener.protocol == "tcp":
            return self._build_tcp(listener)
        site = self._build_site(listener)
        if listener.protocol == "https":
            return self._wrap_tls(listener, site, certificates[listener.name])
        return site

    def _build_admin(self, listener: ListenerConfig):
        from twisted_slb.admin import AdminState, admin_site, exposed_without_token

        admin = self.config.admin
        if exposed_without_token(admin.bind, admin.token) and self._warned_admin != admin.bind:
            self._warned_admin = admin.bind
            log.warn("the admin listener binds {bind}, beyond loopback, with no [admin] token: anyone who reaches "
                     "it reads the stats, and actions are still refused from other hosts; set [admin] token",
                     bind=admin.bind)
        if self.admin_state is None:
            self.admin_state = AdminState(self.stats, clock=self.reactor)
        self.admin_state.binds = lambda: {l.name: l.bind for l in self.config.listeners.values()}
        # Its own limit, not a child of the global one: a balancer full of
        # client connections must still answer its operator.
        limit = self.limits.get(ADMIN)
        if limit is None:
            limit = self.limits[ADMIN] = ConnectionLimit(admin.max_connections, ADMIN, wait=False)
        else:
            limit.configure(admin.max_connections, False)
        return admin_site(self.stats, admin.token, hosts=admin.hosts, bind=admin.bind, reactor=self.reactor,
                          limit=limit, state=self.admin_state, listener_name=ADMIN)

    def _source_ip_policy(self, key: str, persistence):
        from twisted_slb.persistence.sourceip import SourceIPPersistence, StickTable

        table = self.stick_tables.get(key)
        if table is None:
            table = StickTable(persistence.timeout, persistence.max_entries, clock=self.reactor)
            self.stick_tables[key] = table
        else:
            table.timeout = persistence.timeout
            table.max_entries = persistence.max_entries
        if self.worker:
            from twisted_slb.scheduling import ConsistentHash

            return SourceIPPersistence(table, scheduler=ConsistentHash())
        return SourceIPPersistence(table)

    def _limit_for(self, listener: ListenerConfig) -> ConnectionLimit:
        """The listener's connection limit, kept (with its count) across reloads."""
        wait = listener.over_limit == "wait"
        limit = self.limits.get(listener.name)
        if limit is None:
            limit = self.limits[listener.name] = ConnectionLimit(
                listener.max_connections, listener.name, wait, parent=self.global_limit
            )
        else:
            limit.configure(listener.max_connections, wait)
        return limit

    def _build_tcp(self, listener: ListenerConfig):
        from twisted_slb.tcp import TCPBalancerFactory

        policy = None
        if listener.persistence is not None:
            policy = self._source_ip_policy(f"{listener.name}/{listener.backends}", listener.persistence)
        stats = self.stats.for_listener(listener.name, "tcp")
        factory = TCPBalancerFactory(
            self.groups[listener.backends],
            policy=policy,
            reactor=self.reactor,
            idle_timeout=listener.idle_timeout,
            proxy_protocol=listener.proxy_protocol,
            listener_name=listener.name,
            stats=stats,
            max_connections=listener.max_connections,
            access_log=listener.access_log,
            limit=self._limit_for(listener),
            access_file=self._access_file(listener),
        )
        stats.active_source = lambda: factory.active
        return factory

    def _build_route(self, listener: ListenerConfig, group_name: str, persistence):
        from twisted_slb.persistence.cookies import InsertCookie, RewriteCookie
        from twisted_slb.persistence.resource import PersistenceResource
        from twisted_slb.web.proxy import BalancedProxyResource

        proxy = BalancedProxyResource(
            self.groups[group_name],
            reactor=self.reactor,
            pool=self._upstream_pool(),
            request_timeout=listener.request_timeout,
            listener_name=listener.name,
            tls=self.client_tls,
            stats=self.stats.for_listener(listener.name, listener.protocol),
            access_log=listener.access_log,
            access_file=self._access_file(listener),
        )
        if persistence is None:
            return proxy
        if persistence.type == "insert_cookie":
            return InsertCookie.from_config(proxy, persistence, reactor=self.reactor)
        if persistence.type == "rewrite_cookie":
            return RewriteCookie.from_config(proxy, persistence)
        policy = self._source_ip_policy(f"{listener.name}/{group_name}", persistence)
        return PersistenceResource(proxy, policy)

    def _upstream_pool(self):
        if self.pool is None:
            from twisted_slb.web.proxy import UpstreamPool

            self.pool = UpstreamPool(self.reactor)
        return self.pool

    def _build_resource(self, listener: ListenerConfig):
        from twisted_slb.web.routing import HTTPSRedirectResource, Route, RuleRouter

        if listener.https_redirect_port is not None:
            return HTTPSRedirectResource(listener.https_redirect_port)
        default = None
        if listener.backends is not None:
            default = self._build_route(listener, listener.backends, listener.persistence)
        if not listener.rules:
            return default
        routes = [
            Route(
                rule.domain,
                rule.path,
                self._build_route(listener, rule.backends or listener.backends, rule.persistence),
            )
            for rule in listener.rules
        ]
        return RuleRouter(routes, default)

    def _build_site(self, listener: ListenerConfig):
        from twisted_slb.web.front import HTTPFrontFactory

        site = HTTPFrontFactory(
            self._build_resource(listener),
            reactor=self.reactor,
            client_idle_timeout=listener.client_idle_timeout,
            max_header_bytes=listener.max_header_bytes,
            max_headers=listener.max_headers,
            max_body_bytes=listener.max_body_bytes,
            tunnel_timeout=listener.tunnel_timeout,
            max_connections=listener.max_connections,
            max_connections_per_ip=listener.max_connections_per_ip,
            listener_name=listener.name,
            secure=listener.protocol == "https",
            limit=self._limit_for(listener),
        )
        stats = site.stats = self.stats.for_listener(listener.name, listener.protocol)
        stats.active_source = lambda: len(site.channels)
        return site

    def _wrap_tls(self, listener: ListenerConfig, site, certificates):
        from twisted_slb.tls import SNIServerOptions, server_tls_factory

        options = SNIServerOptions(certificates, min_tls=listener.min_tls, alpn=listener.alpn, clock=self.reactor)
        return server_tls_factory(options, site, reactor=self.reactor)

    # -- reloading ---------------------------------------------------------

    def reload(self, config: Optional[Config] = None) -> bool:
        """
        Re-read the configuration (from C{self.config.path} unless a L{Config}
        is given) and apply it without dropping open connections: listeners
        added, removed or changed; backends added, removed or re-weighted
        (a backend that keeps its name keeps its state and its pins);
        certificates re-read.  A configuration that fails to load is logged
        and the one in force keeps running.

        @return: whether the new configuration is in force.
        """
        try:
            if config is None:
                config = load_config(self.config.path)
            certificates = self._load_certificates(config)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return False
        self._update_groups(config)
        self.config = config
        self.global_limit.configure(config.max_connections, False)
        # Access log files are reopened by name (log rotation: rename, then
        # SIGHUP); files no listener names any more are closed.
        # Lines waiting for twistd's log are written now, and its observer
        # is looked for again.
        self.twistd_log.resolve()
        wanted = {l.access_log_path for l in self._listener_configs(config)}
        for path in list(self.access_files):
            if path in wanted:
                self.access_files[path].reopen()
            else:
                self.access_files.pop(path).close()
        current = {s.name: s for s in list(self) if isinstance(s, ListenerService)}
        for name, service in current.items():
            new = {l.name: l for l in self._listener_configs(config)}.get(name)
            if new is None or new.bind != service.config.bind:
                log.info("listener {listener} removed or moved: closing its port", listener=name)
                self.removeService(service)
                if new is None:
                    # Its open connections still count until they close.
                    self.limits.pop(name, None)
        self.stats.retain(config.listeners)
        for listener in self._listener_configs(config):
            factory = self._build_factory(listener, certificates)
            service = self.namedServices.get(listener.name)
            if service is None:
                service = ListenerService(listener, factory, self.reactor)
                service.setServiceParent(self)
            else:
                service.reconfigure(listener, factory)
            service.grace_period = config.grace_period
        log.info("configuration reloaded from {path}", path=config.path)
        return True
