"""
From a L{twisted_slb.config.Config} to running services.

L{BalancerService} is a L{MultiService} with one L{ListenerService} per
listener.  It owns the runtime state that must outlive a configuration
reload: the L{BackendGroup}s (and so every backend's health and counters), the
stick tables of source-IP persistence, and the upstream connection pool.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Tuple

import attr
from twisted.application.service import MultiService, Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from twisted_slb._io import leantls
from twisted_slb._io import lean
from twisted_slb._io.accept import AcceptGuard
from twisted_slb._io.sockets import port_family
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.backends import BackendGroup
from twisted_slb.config import Config, ConfigError, ListenerConfig, load_config
from twisted_slb.limits import ConnectionLimit, IListenerFactory
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

    #: the L{twisted_slb._io.accept.AcceptGuard} of the port, once listening
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
            d = maybeDeferred(_endpoint, self.reactor, self.config.bind).addCallback(
                lambda endpoint: endpoint.listen(self._switch)
            )

        def listening(port):
            self.port = port
            self._choose_transport()
            guard = AcceptGuard(port, self.config.name, self.reactor)
            if guard.watching:  # a tcp.Port
                self._switch.guard = guard
            self._limit().add_port(port)
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
        """The listener's L{twisted_slb.limits.ConnectionLimit}."""
        return own_factory(self.factory).admission.limit

    def _choose_transport(self) -> None:
        """
        Lean transports for the connections the port accepts from now on
        when the current factory takes them (the TCP relay, plain HTTP, and
        HTTPS with L{twisted_slb._io.leantls}), Twisted's otherwise (TLS behind
        a PROXY protocol header, a reactor without file descriptors).
        """
        port = self.port
        if type(port) is tcp.Port and port.transport is not tcp.Server \
                and issubclass(port.transport, lean.LeanServer):
            port.transport = tcp.Server
        current = self._switch.current
        if getattr(current, "lean", False):
            lean.serve_port(port, self._switch)
        else:
            # An https listener's TLS on the socket (twisted_slb._io.leantls)
            # where it can be; Twisted's TLS wrapper otherwise.
            leantls.serve_port(port, self._switch, current)

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
            # HTTP/2 connections: GOAWAY, then a new connection, new config
            own_factory(old).retire(self.grace_period)
            self._replaced = [f for f in self._replaced + [old] if _open_connections(f)]

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self.port is not None or (self.parent is not None and self.parent.running):
            # Added by a reload to a running balancer: startService listens
            # and logs a failure; the running process must not exit.
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
                    reason=f.getErrorMessage() + _privilege_hint(f),
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
        if port is not None:
            self._limit().remove_port(port)
        guard, self._switch.guard = self._switch.guard, None
        if guard is not None:
            guard.stop()
        d = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        factories, self._replaced = [self.factory] + self._replaced, []

        def drain_all(_):
            return gatherResults([own_factory(factory).drain(self.grace_period) for factory in factories])

        return d.addCallback(drain_all)


def _privilege_hint(failure) -> str:
    """Why a bind after start-up was refused, when privileges were dropped."""
    if "Permission denied" not in failure.getErrorMessage() or os.getuid() == 0:
        return ""
    return (
        " (ports below 1024 need privileges this process dropped at start-up, twistd --uid: "
        "restart it to bind the new port, or pass the socket from systemd with a systemd: bind)"
    )


def _endpoint(reactor, bind: str):
    """
    The server endpoint of C{bind}; for C{systemd:} a clear error when the
    process did not inherit that socket (Twisted's parser raises a bare
    C{IndexError} or C{KeyError}).
    """
    try:
        return serverFromString(reactor, bind)
    except (IndexError, KeyError):
        if not bind.startswith("systemd:"):
            raise
        endpoint = _systemd_without_names(reactor, bind)
        if endpoint is not None:
            return endpoint
        raise ListenFailed(
            "no such socket was passed by systemd (LISTEN_FDS="
            f"{os.environ.get('LISTEN_FDS', 'unset')}, LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES', 'unset')}); "
            "start the process through its .socket unit or systemd-socket-activate"
        ) from None


def _systemd_without_names(reactor, bind: str):
    """
    C{systemd:domain=D:index=N} when the environment named no descriptors.

    Twisted's parser ignores C{LISTEN_FDS} unless C{LISTEN_FDNAMES} names
    every descriptor, and C{systemd-socket-activate} sets no names unless
    given C{--fdname}; systemd's own rule is then that descriptor C{3 + N} is
    the socket.  It is used only if it is a listening socket of that family.
    """
    import socket

    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    fields = dict(part.partition("=")[::2] for part in bind[len("systemd:"):].split(":"))
    if not fields.get("index", "").isdigit():
        return None
    fd = 3 + int(fields["index"])
    family = getattr(socket, "AF_" + fields.get("domain", ""), None)
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with probe:
        try:
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            return None
        if not listening or probe.family != family or probe.type != socket.SOCK_STREAM:
            return None
    return AdoptedStreamServerEndpoint(reactor, fd, family)


def innermost(factory):
    """The listener's own factory under its wrappers (TLS, PROXY protocol)."""
    while hasattr(factory, "wrappedFactory"):
        factory = factory.wrappedFactory
    return factory


def own_factory(factory) -> IListenerFactory:
    """The listener's own factory under its wrappers, as an L{IListenerFactory}."""
    return IListenerFactory(innermost(factory))


def _open_connections(factory) -> int:
    """How many connections a listener factory (maybe under TLS) still has open."""
    return len(own_factory(factory).admission.connections)


@attr.s(frozen=True, auto_attribs=True)
class _Prepared:
    """What L{BalancerService._prepare} built for a configuration, not yet in use."""

    #: https listener name -> its L{twisted_slb.tls.SNIServerOptions}
    server_tls: Dict[str, object]
    #: the backend groups' trust roots (L{twisted_slb.tls.StagedClientTLS})
    client_tls: object


class BalancerService(MultiService):
    """
    Every listener of a configuration, and the state they share.

    @ivar config: the L{Config} in force.
    @ivar groups: backend groups by name.
    @ivar stick_tables: stick tables (source IP, header, learned cookie) by key
        (C{listener/group}, and C{/header:NAME} or C{/learn_cookie:NAME}),
        kept across reloads while a listener or rule uses them.
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
        reactor = maybe_global_reactor(reactor)
        self.reactor = reactor
        self.config = config
        self.groups: Dict[str, BackendGroup] = {}
        self.stick_tables: Dict[str, object] = {}
        # The tables the listeners built since the last reload use.
        self._tables_in_use: set = set()
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
        # The admin listener's /tables and pinned counts read the tables
        # through the census (the same dict: a reload edits it in place).
        self.stats.census.tables = self.stick_tables
        # Cookie-client counters by name, kept across reloads like the tables.
        self._counters_in_use: set = set()
        self.admin_state = None
        self._warned_admin: Optional[str] = None
        self.store = None
        if config.store.type == "redis":
            from twisted_slb.persistence.store import RedisStore

            # First child: started before the listeners, stopped after them.
            self.store = RedisStore(config.store.url, config.store.prefix, config.store.timeout, clock=self.reactor)
            self.store.setServiceParent(self)
            self.stats.store = self.store
        prepared = self._prepare(config)
        self._update_groups(config, prepared)
        for listener in self._listener_configs(config):
            factory = self._build_factory(listener, prepared)
            service = self._listener_service(listener, factory, adopt=self.adopted.get(listener.name))
            service.grace_period = config.grace_period
            service.setServiceParent(self)
        self.stats.retain_splits()

    def listening_sockets(self) -> Dict[str, Tuple[str, int, int]]:
        """
        Listener name -> C{(bind, fd, address family)} of every listening
        socket, for a new process to inherit (see L{twisted_slb.upgrade}).
        """
        return {
            service.name: (service.config.bind, service.port.fileno(), int(port_family(service.port)))
            for service in self
            if isinstance(service, ListenerService) and service.port is not None
        }

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

    def _prepare(self, config: Config) -> "_Prepared":
        """
        Everything of C{config} that can fail, done before anything running
        changes (so that a reload is all or nothing): the https listeners'
        certificates read and their OpenSSL contexts built, the backend
        groups' CA files loaded.  What is left to apply (groups, factories,
        listeners) cannot fail on a configuration that loaded.

        @raise ConfigError: a TLS file is missing, not PEM, or refused by
            OpenSSL.
        """
        from twisted_slb.tls import SNIServerOptions

        certificates = self._load_certificates(config)
        server_tls = {}
        for listener in config.listeners.values():
            if listener.protocol == "https":
                try:
                    server_tls[listener.name] = SNIServerOptions(
                        certificates[listener.name], min_tls=listener.min_tls, alpn=listener.alpn,
                        clock=self.reactor,
                    )
                except ValueError as e:  # min_tls or alpn: checked by the config already
                    raise ConfigError(f"listeners.{listener.name}: {e}") from None
        client_tls = self.client_tls.stage(
            {name: group.tls for name, group in config.backends.items() if group.tls is not None}
        )
        return _Prepared(server_tls, client_tls)

    def _update_groups(self, config: Config, prepared: "_Prepared") -> None:
        from twisted_slb.health import HealthMonitor

        for name, group_config in config.backends.items():
            group = self.groups.get(name)
            if group is None:
                group = self.groups[name] = BackendGroup.from_config(group_config)
                monitor = HealthMonitor(group, group_config.health_check, reactor=self.reactor,
                                        slow_start=group_config.slow_start, passive=group_config.passive,
                                        tls=self.client_tls)
                monitor.setName(f"health:{name}")
                monitor.setServiceParent(self)
            else:
                group.update(group_config)
                self.getServiceNamed(f"health:{name}").update(
                    group, group_config.health_check, group_config.slow_start, group_config.passive
                )
        for name in [n for n in self.groups if n not in config.backends]:
            del self.groups[name]
            self.removeService(self.getServiceNamed(f"health:{name}"))
        # The CA files loaded by _prepare; warns (once) about verify = false.
        self.client_tls.install(prepared.client_tls)

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

    def _build_factory(self, listener: ListenerConfig, prepared: "_Prepared"):
        if listener.protocol == "admin":
            return self._build_admin(listener)
        if listener.protocol == "tcp":
            factory = self._build_tcp(listener)
        elif listener.protocol == "udp":
            return self._build_udp(listener)
        else:
            factory = self._build_site(listener)
            if listener.protocol == "https":
                factory = self._wrap_tls(factory, prepared.server_tls[listener.name])
        if listener.client_ip.source == "proxy_protocol":
            from twisted_slb.clientip import ProxyProtocolFactory

            # Outermost: the header comes before anything, the TLS handshake included.
            factory = ProxyProtocolFactory(factory, self._client_ip_policy(listener), reactor=self.reactor)
        return factory

    def _client_ip_policy(self, listener: ListenerConfig):
        """The listener's L{twisted_slb.clientip.ClientIPPolicy}, counting into its stats."""
        from twisted_slb.clientip import ClientIPPolicy

        stats = self.stats.for_listener(listener.name, listener.protocol)
        return ClientIPPolicy(listener.client_ip.source, listener.client_ip.trusted, listener.name,
                              counts=stats.client_ip)

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

    def _table_key(self, where: str, persistence, route: str = "", kind: str = "") -> str:
        """
        The key of a listener's or rule's stick table, marked in use (a
        reload drops the tables no longer used), and named for the admin
        listener's C{/tables}.

        @param where: C{"listener/group"} (groups of a split joined by C{+}).
        @param route: the listener or rule using it (C{"web"}, C{"web rule
            0"}), for C{/tables}.
        @param kind: the table's type as C{/tables} shows it, when it is not
            C{persistence.type} (C{"udp"}).
        """
        from twisted_slb.persistence.build import stick_table_key

        key = stick_table_key(where, persistence)
        self._tables_in_use.add(key)
        census = self.stats.census
        census.table_types[key] = kind or persistence.type
        routes = census.table_routes.setdefault(key, [])
        if route and route not in routes:
            routes.append(route)
        return key

    def _table_options(self) -> dict:
        """How this balancer's stick tables are kept (see L{twisted_slb.persistence.build.persistence_policy})."""
        scheduler = None
        if self.worker and self.store is None:
            # Without a shared table, workers agree by hashing the client.
            from twisted_slb.scheduling import ConsistentHash

            scheduler = ConsistentHash()
        return {"reactor": self.reactor, "stick_tables": self.stick_tables, "store": self.store,
                "scheduler": scheduler}

    def _table_policy(self, where: str, persistence, route: str = "", kind: str = ""):
        """
        The stick-table policy of a TCP or UDP listener, through the public
        L{twisted_slb.persistence.build.persistence_policy}, its table
        kept across reloads.
        """
        from twisted_slb.persistence.build import persistence_policy

        return persistence_policy(persistence, table_key=self._table_key(where, persistence, route, kind),
                                  **self._table_options())

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
            policy = self._table_policy(f"{listener.name}/{listener.backends}", listener.persistence,
                                        route=listener.name)
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

    # -- udp listeners -------------------------------------------------------

    def _listener_service(self, listener: ListenerConfig, factory, adopt=None):
        """The service of a listener: L{ListenerService}, or a udp listener's own."""
        if listener.protocol == "udp":
            from twisted_slb.udp import UDPListenerService

            return UDPListenerService(listener, factory, self.reactor)
        return ListenerService(listener, factory, self.reactor, adopt=adopt)

    def _build_udp(self, listener: ListenerConfig):
        """
        A L{twisted_slb.udp.UDPBalancer}; on a reload the running one takes
        its settings (see L{twisted_slb.udp.UDPListenerService.reconfigure}),
        keeping its sessions, and the stick table is the same one.
        """
        from twisted_slb.udp import UDPBalancer

        policy = None
        if listener.persistence is not None:
            policy = self._table_policy(f"{listener.name}/{listener.backends}", listener.persistence,
                                        route=listener.name, kind="udp")
        return UDPBalancer(
            self.groups[listener.backends],
            policy=policy,
            reactor=self.reactor,
            idle_timeout=listener.idle_timeout,
            max_sessions=listener.max_sessions,
            listener_name=listener.name,
            stats=self.stats.for_listener(listener.name, "udp"),
            access_log=listener.access_log,
            access_file=self._access_file(listener),
        )

    def _build_route(self, listener: ListenerConfig, group_name: str, persistence, split=(), where: str = "",
                     request_buffering: Optional[bool] = None):
        """
        The resource of a listener's default route or of a rule: a proxy to
        one group, or a L{twisted_slb.web.routing.GroupSplit} between the
        groups of C{split}, behind the persistence wrapper.

        @param where: names the route in the split's stats (C{"web"},
            C{"web rule 0"}).
        @param request_buffering: the rule's setting, or L{None} for the
            listener's.
        """
        from twisted_slb.choices import TABLE_PERSISTENCE_TYPES
        from twisted_slb.persistence.build import wrap_with_persistence
        from twisted_slb.persistence.census import REWRITE_WINDOW

        if split:
            from twisted_slb.web.routing import GroupSplit, SplitChoice

            names = [entry.group for entry in split]
            stats = self.stats.for_split(where or listener.name, names)
            resource = GroupSplit(
                [SplitChoice(self.groups[e.group], e.weight, self._proxy(listener, e.group, request_buffering))
                 for e in split],
                stats,
            )
            group_key = "+".join(names)
            servers = tuple(s for name in names for s in self.config.backends[name].servers)
        else:
            resource = self._proxy(listener, group_name, request_buffering)
            group_key = group_name
            servers = self.config.backends[group_name].servers
        if persistence is None:
            return resource
        # The same public function an embedder calls.
        key = ""
        if persistence.type in TABLE_PERSISTENCE_TYPES:
            key = self._table_key(f"{listener.name}/{group_key}", persistence, route=where or listener.name)
        wrapped = wrap_with_persistence(resource, persistence, table_key=key, servers=servers,
                                        **self._table_options())
        # Cookie policies count their clients for the admin listener.
        if persistence.type == "insert_cookie":
            wrapped.clients = self._cookie_clients(f"{listener.name}/{group_key}", persistence, wrapped.max_idle)
        elif persistence.type == "rewrite_cookie":
            wrapped.clients = self._cookie_clients(f"{listener.name}/{group_key}", persistence, REWRITE_WINDOW)
        return wrapped

    def _cookie_clients(self, where: str, persistence, window: float):
        """
        The L{twisted_slb.persistence.census.RecentClients} counter of a cookie
        policy (the distinct clients per backend in the last C{window}
        seconds), kept across reloads.
        """
        from twisted_slb.persistence.census import RecentClients

        key = f"{where}/{persistence.type}:{persistence.cookie or 'SERVERID'}"
        self._counters_in_use.add(key)
        counters = self.stats.census.cookie_clients
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = RecentClients(window, clock=self.reactor)
        counter.window = window
        return counter

    def _proxy(self, listener: ListenerConfig, group_name: str, request_buffering: Optional[bool] = None):
        from twisted_slb.web.proxy import BalancedProxyResource

        return BalancedProxyResource(
            self.groups[group_name],
            reactor=self.reactor,
            pool=self._upstream_pool(),
            request_timeout=listener.request_timeout,
            response_idle_timeout=listener.response_idle_timeout,
            listener_name=listener.name,
            tls=self.client_tls,
            stats=self.stats.for_listener(listener.name, listener.protocol),
            access_log=listener.access_log,
            access_file=self._access_file(listener),
            backend_header=listener.backend_header.encode("ascii") or None,
            request_buffering=listener.request_buffering if request_buffering is None else request_buffering,
        )

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
            default = self._build_route(listener, listener.backends, listener.persistence, listener.split)
        if not listener.rules:
            return default
        routes = [
            Route(
                rule.domain,
                rule.path,
                self._build_route(listener, rule.backends or listener.backends, rule.persistence,
                                  rule.split, f"{listener.name} rule {i}", rule.request_buffering),
            )
            for i, rule in enumerate(listener.rules)
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
        if listener.client_ip.source in ("x-forwarded-for", "forwarded"):
            site.client_ip_policy = self._client_ip_policy(listener)
        if listener.protocol == "https" and "h2" in listener.alpn:
            from twisted_slb.web.h2 import H2Settings

            site.h2 = H2Settings(listener.max_concurrent_streams, listener.max_header_list_size,
                                 listener.hpack_table_size)
        stats = site.stats = self.stats.for_listener(listener.name, listener.protocol)
        stats.active_source = lambda: len(site.channels)
        return site

    def _wrap_tls(self, site, options):
        from twisted_slb.tls import server_tls_factory

        return server_tls_factory(options, site, reactor=self.reactor)

    # -- reloading ---------------------------------------------------------

    def reload(self, config: Optional[Config] = None) -> bool:
        """
        Re-read the configuration (from C{self.config.path} unless a L{Config}
        is given) and apply it without dropping open connections: listeners
        added, removed or changed; backends added, removed or re-weighted
        (a backend that keeps its name keeps its state and its pins);
        certificates and CA files re-read.

        A reload is all or nothing: everything that can fail (reading and
        checking the file, every TLS file, OpenSSL's contexts) is done
        first, and a failure is one error line ("reload failed, keeping the
        running configuration: ...") with nothing changed.

        @return: whether the new configuration is in force.
        """
        try:
            if config is None:
                config = load_config(self.config.path)
            prepared = self._prepare(config)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return False
        except Exception:
            # A bug, not the file: its traceback is worth having.
            log.failure("reload failed, keeping the running configuration")
            return False
        self._update_groups(config, prepared)
        if config.store != self.config.store:
            log.warn("reload: [store] changed; the store in use is kept until the balancer restarts")
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
        self._tables_in_use = set()
        self._counters_in_use = set()
        self.stats.census.table_routes.clear()
        for listener in self._listener_configs(config):
            factory = self._build_factory(listener, prepared)
            service = self.namedServices.get(listener.name)
            if service is None:
                service = self._listener_service(listener, factory)
                service.setServiceParent(self)
            else:
                service.reconfigure(listener, factory)
            service.grace_period = config.grace_period
        # Tables no listener or rule uses any more (persistence removed or
        # changed type) are dropped; the others keep every pin.
        for key in [k for k in self.stick_tables if k not in self._tables_in_use]:
            del self.stick_tables[key]
            self.stats.census.table_types.pop(key, None)
        cookie_clients = self.stats.census.cookie_clients
        for key in [k for k in cookie_clients if k not in self._counters_in_use]:
            del cookie_clients[key]
        self.stats.retain_splits()
        log.info("configuration reloaded from {path}", path=config.path)
        return True
