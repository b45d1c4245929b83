"""
From a configuration's C{persistence} to a policy: the one path
C{twistd slb} takes (L{twisted_slb.service.BalancerService}) and an
embedder can take too.

L{wrap_with_persistence} puts the persistence a configuration asks for in
front of an HTTP resource; L{persistence_policy} builds the stick-table
policy of one (for a TCP or UDP listener); L{stick_table_key} names a table
as the service does, so that its pins survive a reload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, MutableMapping, Optional

from twisted.web.resource import IResource

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.choices import TABLE_PERSISTENCE_TYPES
from twisted_slb.persistence.cookies import InsertCookie, RewriteCookie
from twisted_slb.persistence.interfaces import IPersistencePolicy
from twisted_slb.persistence.resource import PersistenceResource
from twisted_slb.persistence.sourceip import SourceIPPersistence
from twisted_slb.persistence.tables import HeaderPersistence, IStickTable, LearnCookiePersistence, StickTable

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

    from twisted_slb.config import PersistenceConfig
    from twisted_slb.persistence.store import RedisStore

__all__ = ["persistence_policy", "stick_table_key", "wrap_with_persistence"]


def stick_table_key(where: str, persistence_config: "PersistenceConfig") -> str:
    """
    The key of a listener's or rule's stick table: C{where}
    (C{"listener/group"}), and for C{header} and C{learn_cookie} what is
    remembered (C{"web/app/header:x-user"}), so that changing the header or
    cookie starts a new table rather than reading pins of another kind.
    """
    if persistence_config.type == "header":
        return f"{where}/header:{persistence_config.header.lower()}"
    if persistence_config.type == "learn_cookie":
        return f"{where}/learn_cookie:{persistence_config.cookie}"
    return where


def persistence_policy(
    persistence_config: "PersistenceConfig",
    reactor: Optional[IReactorTime] = None,
    stick_tables: Optional[MutableMapping[str, IStickTable]] = None,
    table_key: str = "",
    store: Optional[RedisStore] = None,
    scheduler: Optional[object] = None,
) -> IPersistencePolicy:
    """
    The stick-table policy (C{source_ip}, C{header}, C{learn_cookie}) a
    configuration's C{persistence} asks for: what a TCP or UDP listener
    uses, and what L{wrap_with_persistence} puts in front of an HTTP
    resource.

    @param persistence_config: a listener's or rule's C{persistence}.
    @param reactor: the L{IReactorTime} of the table; the global reactor if
        L{None}.
    @param stick_tables: the caller's stick tables by key, so that a table
        (and every pin in it) survives a config reload that rebuilds the
        policies.  A missing table is created and stored in it; an
        existing one takes the new timeout and size bound.  L{None}: a new
        table each call.
    @param table_key: the key of this table in C{stick_tables} (see
        L{stick_table_key}).
    @param store: a L{twisted_slb.persistence.store.RedisStore}: a new
        table is a L{twisted_slb.persistence.store.SharedStickTable} in it
        (named C{table_key}); L{None}: in this process only.
    @param scheduler: for C{source_ip}, the scheduler that picks the
        backend of a new client (C{twistd slb}'s workers without a shared
        store pass a consistent hash, so that they agree); L{None}: the
        group's own.
    @raise ValueError: not a stick-table persistence type.
    """
    kind = persistence_config.type
    if kind not in TABLE_PERSISTENCE_TYPES:
        raise ValueError(f"persistence type {kind!r} has no stick table: expected one of "
                         + ", ".join(repr(k) for k in TABLE_PERSISTENCE_TYPES))
    table = None if stick_tables is None else stick_tables.get(table_key)
    if table is None:
        table = StickTable(persistence_config.timeout, persistence_config.max_entries,
                           clock=maybe_global_reactor(reactor))
        if store is not None:
            # Lazily: the store's module imports txredisapi.
            from twisted_slb.persistence.store import SharedStickTable

            table = SharedStickTable(table_key, table, store)
        if stick_tables is not None:
            stick_tables[table_key] = table
    else:
        table.timeout = persistence_config.timeout
        table.max_entries = persistence_config.max_entries
    on_failure = persistence_config.on_failure
    if kind == "header":
        return HeaderPersistence(table, persistence_config.header, on_failure=on_failure)
    if kind == "learn_cookie":
        return LearnCookiePersistence(table, persistence_config.cookie, on_failure=on_failure)
    if scheduler is not None:
        return SourceIPPersistence(table, scheduler=scheduler, on_failure=on_failure)
    return SourceIPPersistence(table, on_failure=on_failure)


def wrap_with_persistence(
    resource: IResource,
    persistence_config: Optional[PersistenceConfig],
    reactor: Optional[IReactorTime] = None,
    stick_tables: Optional[MutableMapping[str, IStickTable]] = None,
    table_key: str = "",
    servers: Iterable[object] = (),
    store: Optional[RedisStore] = None,
    scheduler: Optional[object] = None,
) -> IResource:
    """
    Put the persistence a configuration asks for in front of C{resource}:
    the one path from a configuration to a policy, which
    L{twisted_slb.service.BalancerService} takes too.

    @param resource: what to wrap, normally a
        L{twisted_slb.web.proxy.BalancedProxyResource}.
    @param persistence_config: a listener's or rule's C{persistence}; L{None}
        means no persistence and C{resource} is returned unchanged.
    @param reactor: the L{IReactorTime} cookie expiry and stick tables use;
        the global reactor if L{None}.
    @param stick_tables: for the table types (C{source_ip}, C{header},
        C{learn_cookie}): see L{persistence_policy}.
    @param table_key: the key of this listener's or rule's table in
        C{stick_tables} (e.g. C{"web/app"}: listener and backend group; see
        L{stick_table_key}).
    @param servers: the group's L{twisted_slb.config.ServerConfig}s, for the
        cookie policies' fixed values (C{cookie = "s1"}).
    @param store: for the table types: see L{persistence_policy}.
    @param scheduler: for C{source_ip}: see L{persistence_policy}.
    @return: the wrapping resource.
    @raise ValueError: an unknown persistence type.
    """
    if persistence_config is None:
        return resource
    kind = persistence_config.type
    if kind == "insert_cookie":
        return InsertCookie.from_config(resource, persistence_config, reactor=reactor, servers=servers)
    if kind == "rewrite_cookie":
        return RewriteCookie.from_config(resource, persistence_config, servers=servers)
    if kind in TABLE_PERSISTENCE_TYPES:
        policy = persistence_policy(persistence_config, reactor, stick_tables, table_key, store, scheduler)
        return PersistenceResource(resource, policy)
    raise ValueError(
        f"unknown persistence type {kind!r}: expected 'insert_cookie', 'rewrite_cookie', 'source_ip', 'header' "
        "or 'learn_cookie'"
    )
