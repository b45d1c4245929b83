"""
Source-IP persistence: a stick table from client address to backend.

The table has an idle expiry (an entry lives C{timeout} seconds after the
client's last new connection or request) and a size bound with
least-recently-used eviction.  Lookups and updates are O(1): the table is one
insertion-ordered C{dict}, with the most recently used client at its end, so
the oldest entries are always at its front.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

from zope.interface import implementer

from twisted_slb.persistence.interfaces import ON_FAILURE, IPersistencePolicy, Session


class StickTable:
    """
    Client key -> backend key, with idle expiry and an LRU size bound.

    Expired entries are dropped when they are looked up, and a few at a time
    from the oldest end on every C{set} (so the table never needs a timer and
    never holds many expired entries for long).

    @ivar timeout: seconds an entry lives after its last C{set} or C{touch}.
        May be changed on a live table (a reload does so).
    @ivar max_entries: the size bound.  May be changed on a live table; the
        excess is evicted on the next C{set}.
    """

    def __init__(self, timeout: float, max_entries: int = 1_000_000, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.timeout = timeout
        self.max_entries = max_entries
        self.clock = clock
        # client -> one int packing (last use in milliseconds << 16 | index
        # of the backend key in _keys): a million entries cost a dict slot, a
        # key string and one int each, with no tuple or float per entry.
        self._entries: Dict[str, int] = {}
        self._keys: List[str] = []
        self._key_index: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _live(self, packed: int, now: int) -> bool:
        return now - (packed >> 16) <= self.timeout * 1000

    def get(self, client: str) -> Optional[str]:
        """The backend key of C{client}, or L{None}; does not refresh."""
        packed = self._entries.get(client)
        if packed is None:
            return None
        if not self._live(packed, self._now()):
            del self._entries[client]
            return None
        return self._keys[packed & 0xFFFF]

    def set(self, client: str, backend_key: str) -> None:
        """Pin C{client} to C{backend_key}, as its most recent use."""
        entries = self._entries
        index = self._key_index.get(backend_key)
        if index is None:
            index = self._intern(backend_key)
        now = self._now()
        entries.pop(client, None)
        entries[client] = (now << 16) | index
        self._expire(now, budget=2)
        while len(entries) > self.max_entries:
            del entries[next(iter(entries))]

    def _intern(self, backend_key: str) -> int:
        if len(self._keys) >= 0xFFFF:
            # Backend keys that are gone accumulate only across very many
            # reloads; start over from the keys still in use.
            used = {packed & 0xFFFF for packed in self._entries.values()}
            remap = {old: new for new, old in enumerate(sorted(used))}
            self._keys = [self._keys[old] for old in sorted(used)]
            self._key_index = {k: i for i, k in enumerate(self._keys)}
            self._entries = {
                c: (p >> 16 << 16) | remap[p & 0xFFFF] for c, p in self._entries.items()
            }
        self._key_index[backend_key] = len(self._keys)
        self._keys.append(backend_key)
        return len(self._keys) - 1

    def touch(self, client: str) -> None:
        """Refresh C{client}'s entry, if it has a live one."""
        key = self.get(client)
        if key is not None:
            self.set(client, key)

    def remove(self, client: str) -> None:
        self._entries.pop(client, None)

    def _expire(self, now: int, budget: int) -> int:
        entries = self._entries
        limit = now - self.timeout * 1000
        dropped = 0
        while entries and dropped < budget:
            oldest = next(iter(entries))
            if entries[oldest] >> 16 >= limit:
                break
            del entries[oldest]
            dropped += 1
        return dropped

    def expire(self) -> int:
        """Drop every expired entry; return how many were dropped."""
        return self._expire(self._now(), budget=len(self._entries))

    def restore(self, client: str, backend_key: str, idle: float) -> None:
        """
        Put back an entry last used C{idle} seconds ago (a table handed over
        by an upgrade, see L{twisted_slb.upgrade}).  Restore entries oldest
        first, as L{items} gives them; an entry already expired is skipped.
        """
        if idle > self.timeout:
            return
        index = self._key_index.get(backend_key)
        if index is None:
            index = self._intern(backend_key)
        self._entries.pop(client, None)
        self._entries[client] = ((self._now() - int(idle * 1000)) << 16) | index
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def items(self) -> Iterator[Tuple[str, str, float]]:
        """C{(client, backend key, seconds idle)} of the live entries, oldest first."""
        now = self._now()
        for client, packed in list(self._entries.items()):
            if self._live(packed, now):
                yield client, self._keys[packed & 0xFFFF], (now - (packed >> 16)) / 1000


@implementer(IPersistencePolicy)
class SourceIPPersistence:
    """
    Keeps a client on one backend by its IP address.

    Works for TCP listeners (each new connection refreshes the pin) and for
    HTTP listeners (each request does).  Subclasses may override
    L{client_key}, for example to keep a whole /24 network together.

    @ivar table: the L{StickTable}.
    @ivar scheduler: when set, new clients are chosen by this scheduler rather
        than the group's (worker mode uses consistent hashing so that every
        worker process pins a client to the same backend).
    @ivar on_failure: C{"repin"} (a client whose backend is down or refuses
        is moved to another) or C{"strict"} (it is refused: 503 for HTTP, a
        closed connection for TCP, and its entry is kept).
    @ivar retry_after: the C{Retry-After} seconds of a strict refusal's 503.
    """

    name = "source_ip"
    scheduler = None
    on_failure = "repin"
    retry_after = 5

    def __init__(self, table: StickTable, scheduler=None, on_failure: str = "repin") -> None:
        """
        @raise ValueError: C{on_failure} is not C{"repin"} or C{"strict"}.
        """
        if on_failure not in ON_FAILURE:
            raise ValueError(f"source_ip on_failure {on_failure!r} is not one of {', '.join(ON_FAILURE)}")
        self.table = table
        self.on_failure = on_failure
        if scheduler is not None:
            self.scheduler = scheduler

    @classmethod
    def from_config(cls, config, clock=None) -> "SourceIPPersistence":
        return cls(StickTable(config.timeout, config.max_entries, clock=clock), on_failure=config.on_failure)

    def client_key(self, session: Session) -> str:
        """The stick table key of a client: its normalised IP address."""
        return session.client_ip

    def find(self, session: Session) -> Optional[str]:
        return self.table.get(self.client_key(session))

    def remember(self, session: Session, backend) -> None:
        self.table.set(self.client_key(session), backend.id)

    @property
    def refresh_interval(self) -> float:
        """
        How often a connection that stays open calls L{refresh}: half the
        table timeout, so that the entry of a client with a connection open
        never expires under it.
        """
        return self.table.timeout / 2.0

    def refresh(self, session: Session, backend) -> None:
        """
        The client still uses C{backend} (its connection is open, or just
        closed): restart its entry's timeout, as HAProxy's C{expire} counts
        from the last activity.  An entry that another connection moved to
        another backend since is left alone.
        """
        key = self.client_key(session)
        current = self.table.get(key)
        if current is None or current == backend.id:
            self.table.set(key, backend.id)
