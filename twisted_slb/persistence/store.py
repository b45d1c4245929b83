# -*- test-case-name: tests.test_store -*-
"""
Stick tables shared through Redis: every balancer process and instance that
names the same server sees the same pins, and a restart keeps them.

L{RedisStore} is the connection (a service: it connects, reconnects with
back-off, flushes batched refreshes, and counts what goes wrong);
L{SharedStickTable} is an L{IStickTable} with an in-process
L{StickTable} as a cache in front of the store:

 - C{get} answers from the cache (it never waits);
 - L{SharedStickTable.lookup} asks Redis for a key the cache does not hold,
   and always answers within the store's C{timeout} (L{None} when Redis is
   slow, down or has no entry);
 - C{set} of a new or changed pin writes C{SET key backend-id PX timeout};
   C{set} of the pin the cache already holds (a client seen again) only
   queues the key, and every queued key gets one C{PEXPIRE} per flush
   (about once a second): no Redis write per request or connection;
 - C{delete} deletes both; C{items} lists the cache, and
   L{SharedStickTable.shared_items} the shared entries (C{SCAN}, bounded).

The value stored is the backend's L{twisted_slb.backends.Backend.id}, a digest
of its name: instances that list the same servers in another order agree.

Redis down or slow never fails a request: lookups answer L{None} in time,
writes made while the store is down are dropped (those pins stay local), the
first failure of an episode is logged (and the recovery), and the counts are
in L{RedisStore.snapshot} (C{/stats}, C{/metrics}).  The client library,
txredisapi, reconnects with exponential back-off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from twisted_slb._io.twisted_private import redis_pool_size
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.persistence.tables import IStickTable, Key, StickTable, table_key

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

log = Logger(namespace="twisted_slb.persistence.store")

#: Refreshes queued at most, between two flushes: past this, a refresh is
#: dropped (the entry then lives its remaining time in Redis, and the cache
#: keeps serving it).
MAX_PENDING = 200_000
#: The most entries L{SharedStickTable.shared_items} returns.
SCAN_LIMIT = 10_000


def _glob_escape(data: bytes) -> bytes:
    """C{data} with Redis's glob characters escaped, for C{SCAN MATCH}."""
    out = bytearray()
    for byte in data:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class RedisStore(Service):
    """
    The connection to the Redis server of C{[store]}, shared by every table.

    @ivar prefix: the key prefix, as bytes.
    @ivar timeout: seconds a lookup may take before it answers L{None}.
    @ivar healthy: L{False} from a failure (a timeout, an error, no
        connection) until a reply arrives again: one episode.
    @ivar counts: what happened, by name (see L{snapshot}).
    """

    # Twisted's Service leaves name unannotated (= None), so mypy types it
    # None, though IService documents a str or None.
    name = "store"  # type: ignore[assignment]

    def __init__(self, url: str, prefix: str = "slb:", timeout: float = 0.05, clock=None,
                 flush_interval: float = 1.0) -> None:
        from twisted_slb.config import redis_address

        clock = maybe_global_reactor(clock)
        self.url = url
        self.address = redis_address(url)
        self.prefix = prefix.encode("utf-8")
        self.timeout = timeout
        self.clock = clock
        self.flush_interval = flush_interval
        #: the txredisapi connection handler (untyped) while started, else None
        self.handler: Any = None
        self.healthy = True
        self.problem = ""
        #: full key -> TTL in milliseconds, for the next flush's PEXPIRE
        self.pending: Dict[bytes, int] = {}
        self.counts: Dict[str, int] = dict.fromkeys(
            ("lookups", "lookup_hits", "lookup_timeouts", "writes", "refreshes", "deletes", "errors",
             "skipped", "episodes"), 0)
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock

    def where(self) -> str:
        """The server, for logs (never the password)."""
        a = self.address
        return f"{'rediss' if a['tls'] else 'redis'}://{a['host']}:{a['port']}/{a['db']}"

    def startService(self) -> None:
        import txredisapi

        Service.startService(self)
        a = self.address
        # txredisapi's ssl_context_factory: False (plain TCP) or a TLS creator.
        tls: Union[bool, IOpenSSLClientConnectionCreator] = False
        if a["tls"]:
            from twisted.internet.ssl import optionsForClientTLS

            tls = optionsForClientTLS(a["host"])
        # Lazy: the balancer starts (and serves) whether Redis is up or not;
        # txredisapi keeps connecting in the background, with back-off.
        # Replies are bytes (client keys may be any bytes); a reply that does
        # not come within the reply timeout closes the connection, so that a
        # stuck server is noticed and reconnected.
        self.handler = txredisapi.lazyConnection(
            a["host"], a["port"], dbid=a["db"] or None, reconnect=True, charset=None,
            password=a["password"], username=a["username"], ssl_context_factory=tls,
            connectTimeout=max(1.0, self.timeout * 20), replyTimeout=max(1.0, self.timeout * 20),
            convertNumbers=False,
        )
        self._flusher.start(self.flush_interval, now=False)

    def stopService(self):
        Service.stopService(self)
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        handler, self.handler = self.handler, None
        if handler is not None:
            return handler.disconnect()
        return None

    @property
    def connected(self) -> bool:
        """Whether a connection to Redis is up now."""
        if self.handler is None:
            return False
        # txredisapi's handler has no public "connected" question, and a
        # command sent while it is down waits for a connection rather than
        # failing: the pool size tells us not to send it.
        return redis_pool_size(self.handler) > 0

    # -- episodes ----------------------------------------------------------

    def _down(self, why: str) -> None:
        if self.healthy:
            self.healthy = False
            self.problem = why
            self.counts["episodes"] += 1
            log.warn("store {where}: {why}; serving from the local tables until it answers again",
                     where=self.where(), why=why)

    def _up(self) -> None:
        if not self.healthy:
            self.healthy = True
            self.problem = ""
            log.info("store {where}: answering again; shared tables in use", where=self.where())

    def _failed(self, failure) -> None:
        if not self.running:
            return  # the replies a shutdown cut off are not an episode
        self.counts["errors"] += 1
        self._down(f"command failed: {failure.getErrorMessage()}")

    def _replied(self, result):
        self._up()
        return result

    def _usable(self) -> bool:
        if self.connected:
            return True
        self._down("not connected")
        return False

    def key(self, table: str, key: bytes) -> bytes:
        """The Redis key of C{key} in C{table}: prefix, table name, C{:}, client key."""
        return self.prefix + table.encode("utf-8") + b":" + key

    # -- commands ----------------------------------------------------------

    def lookup(self, table: str, key: bytes) -> Deferred:
        """
        The backend id stored for C{key}, or L{None}; within C{timeout},
        whatever Redis does (never an errback).
        """
        self.counts["lookups"] += 1
        if not self._usable():
            return succeed(None)
        result: Deferred = Deferred()

        def answer(value):
            if not result.called:
                timer.cancel()
                if value is not None:
                    self.counts["lookup_hits"] += 1
                    value = value.decode("ascii", "replace")
                result.callback(value)

        def failed(failure):
            self._failed(failure)
            answer(None)

        def late():
            self.counts["lookup_timeouts"] += 1
            self._down(f"no answer within {self.timeout} s")
            result.callback(None)

        timer = self.clock.callLater(self.timeout, late)
        self.handler.get(self.key(table, key)).addCallback(self._replied).addCallbacks(answer, failed)
        return result

    def write(self, table: str, key: bytes, backend_id: str, ttl: float) -> None:
        """C{SET key backend_id PX ttl}, unless the store is down (then the pin stays local)."""
        full = self.key(table, key)
        self.pending.pop(full, None)
        if not self._usable():
            self.counts["skipped"] += 1
            return
        self.counts["writes"] += 1
        self.handler.set(full, backend_id.encode("ascii"), pexpire=max(1, int(ttl * 1000))).addCallbacks(
            self._replied, self._failed)

    def touch(self, table: str, key: bytes, ttl: float) -> None:
        """Queue C{key} for the next flush's C{PEXPIRE}: its entry lives C{ttl} from now."""
        pending = self.pending
        if len(pending) < MAX_PENDING:
            pending[self.key(table, key)] = max(1, int(ttl * 1000))

    def delete(self, table: str, key: bytes) -> None:
        full = self.key(table, key)
        self.pending.pop(full, None)
        if not self._usable():
            self.counts["skipped"] += 1
            return
        self.counts["deletes"] += 1
        self.handler.delete(full).addCallbacks(self._replied, self._failed)

    def flush(self) -> None:
        """Send the queued refreshes (one C{PEXPIRE} each, pipelined on the connection)."""
        pending, self.pending = self.pending, {}
        if not self._usable():
            self.counts["skipped"] += len(pending)
            return
        if not pending and not self.healthy:
            # Connected again after an episode, and no traffic to show it.
            self.handler.ping().addCallbacks(self._replied, self._failed)
            return
        execute = self.handler.execute_command
        for full, ttl in pending.items():
            self.counts["refreshes"] += 1
            execute("PEXPIRE", full, ttl).addCallbacks(self._replied, self._failed)

    def scan(self, table: str, limit: int = SCAN_LIMIT) -> Deferred:
        """
        C{(key, backend id, seconds to live)} of up to C{limit} shared
        entries of C{table}, by C{SCAN} (in pages of 500, never more than
        C{limit} keys read).  Fails when the store is down.
        """
        if not self._usable():
            from txredisapi import ConnectionError

            return Deferred.fromCoroutine(_raise(ConnectionError(f"store {self.where()}: not connected")))
        pattern = _glob_escape(self.key(table, b"")) + b"*"
        skip = len(self.key(table, b""))
        found: List[bytes] = []

        async def run():
            cursor = 0
            while True:
                cursor, keys = await self.handler.scan(cursor, pattern, 500)
                found.extend(keys)
                if int(cursor) == 0 or len(found) >= limit:
                    break
            keys = found[:limit]
            values = await gatherResults([self.handler.get(k) for k in keys])
            ttls = await gatherResults([self.handler.execute_command("PTTL", k) for k in keys])
            self._up()
            return [(k[skip:], v.decode("ascii", "replace"), int(t) / 1000.0)
                    for k, v, t in zip(keys, values, ttls) if v is not None and int(t) > 0]

        return Deferred.fromCoroutine(run())

    def snapshot(self) -> dict:
        """The store's state and counts, for C{/stats}."""
        return dict(self.counts, type="redis", server=self.where(), connected=self.connected,
                    healthy=self.healthy, problem=self.problem, pending_refreshes=len(self.pending))


async def _raise(error: Exception):
    raise error


@implementer(IStickTable)
class SharedStickTable:
    """
    An L{IStickTable} in a L{RedisStore}, with an in-process L{StickTable}
    in front as a cache (which alone serves while Redis is away).

    @ivar name: the table's name in the store (C{listener/group}, and
        C{/header:NAME} or C{/learn_cookie:NAME}).
    @ivar local: the cache.
    @ivar store: the L{RedisStore}.
    """

    def __init__(self, name: str, local: StickTable, store: RedisStore) -> None:
        self.name = name
        self.local = local
        self.store = store

    @property
    def timeout(self) -> float:
        return self.local.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.local.timeout = value

    @property
    def max_entries(self) -> int:
        return self.local.max_entries

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        self.local.max_entries = value

    def __len__(self) -> int:
        return len(self.local)

    def get(self, key: Key) -> Optional[str]:
        """The cached pin of C{key} (see L{lookup} for the shared one)."""
        return self.local.get(key)

    def lookup(self, key: Key) -> Deferred:
        """
        The shared pin of a key the cache does not hold: a L{Deferred} that
        fires within the store's timeout with the backend id or L{None}.
        A pin found is cached.
        """
        key = table_key(key)

        def found(backend_id):
            if backend_id is not None and self.local.get(key) is None:
                self.local.set(key, backend_id)
            return backend_id

        return self.store.lookup(self.name, key).addCallback(found)

    def set(self, key: Key, backend_key: str) -> None:
        key = table_key(key)
        before = self.local.get(key)
        self.local.set(key, backend_key)
        if before == backend_key:
            self.store.touch(self.name, key, self.local.timeout)
        else:
            self.store.write(self.name, key, backend_key, self.local.timeout)

    def delete(self, key: Key) -> None:
        key = table_key(key)
        self.local.delete(key)
        self.store.delete(self.name, key)

    remove = delete

    def items(self) -> Iterator[Tuple[bytes, str, float]]:
        """The cached entries (what this process uses now); see L{shared_items}."""
        return self.local.items()

    def shared_items(self, limit: int = SCAN_LIMIT) -> Deferred:
        """
        A L{Deferred} list of C{(key, backend id, seconds idle)} of up to
        C{limit} entries in Redis (every instance's pins), by C{SCAN}.
        """
        timeout = self.local.timeout

        def idle(entries):
            return [(k, v, max(0.0, timeout - ttl)) for k, v, ttl in entries]

        return self.store.scan(self.name, limit).addCallback(idle)

    def expire(self) -> int:
        return self.local.expire()

    def restore(self, key: Key, backend_key: str, idle: float) -> None:
        self.local.restore(key, backend_key, idle)

    def __repr__(self) -> str:
        return f"<SharedStickTable {self.name!r} in {self.store.where()}, {len(self.local)} cached>"
