"""
Server-side persistence: stick tables and the policies that key them.

One L{StickTable} implementation serves every table policy: a key (bytes)
-> backend key mapping with an idle expiry (an entry lives C{timeout}
seconds after its last use) and a size bound with least-recently-used
eviction.  What differs between policies is only where the key comes from:

 - L{twisted_slb.persistence.sourceip.SourceIPPersistence}: the client's IP
   address (TCP and HTTP);
 - L{HeaderPersistence}: the value of a request header (C{X-Session-Id});
 - L{LearnCookiePersistence}: the value of the application's own cookie,
   learned from the backend's C{Set-Cookie} and never modified.

A policy subclass overrides L{TablePersistence.client_key} (and, to learn
keys from responses, L{TablePersistence.remember}).  The table's surface is
L{IStickTable}: C{get}, C{set}, C{delete} and C{items}, so that a table kept
elsewhere (a shared store) can replace the in-memory one.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from typing import Dict, Iterator, List, Optional, Tuple, Union

from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.persistence._names import TOKEN, cookie_name
from twisted_slb.persistence.interfaces import ON_FAILURE, REPIN, IPersistencePolicy, Session

log = Logger(namespace="twisted_slb.persistence.tables")

#: Keys longer than this are stored as a digest: a client cannot make one
#: entry cost more than a few dozen bytes, whatever it sends.
MAX_KEY_BYTES = 128

Key = Union[bytes, str]


def table_key(value: Key) -> bytes:
    """
    The key a table stores for C{value}: its bytes (a C{str} is UTF-8
    encoded), or, beyond L{MAX_KEY_BYTES}, C{"#"} and a 16-byte digest of it.
    """
    if type(value) is not bytes:
        value = value.encode("utf-8")  # type: ignore[union-attr]
    if len(value) > MAX_KEY_BYTES:
        return b"#" + hashlib.blake2b(value, digest_size=16).digest()
    return value


class IStickTable(Interface):
    """
    A stick table: key (bytes) -> backend key (a
    L{twisted_slb.backends.Backend.id}), with idle expiry and a size bound.

    Everything a table policy needs is these four methods and two
    attributes; a table in a shared store implements the same.
    """

    timeout = Attribute("Seconds an entry lives after its last C{set}; may change on a live table (reload).")
    max_entries = Attribute("The size bound; may change on a live table.")

    def get(key: Key) -> Optional[str]:
        """The backend key stored for C{key}, or L{None} (absent or expired).  Does not refresh."""

    def set(key: Key, backend_key: str) -> None:
        """Store C{key} -> C{backend_key} as its most recent use (restarts its idle time)."""

    def delete(key: Key) -> None:
        """Forget C{key}, if present."""

    def items() -> Iterator[Tuple[bytes, str, float]]:
        """C{(key, backend key, seconds idle)} of the live entries, least recently used first."""


@implementer(IStickTable)
class StickTable:
    """
    Key -> backend key in memory, with idle expiry and an LRU size bound.

    Keys are bytes (a C{str} is UTF-8 encoded, so C{"10.0.0.1"} and
    C{b"10.0.0.1"} are one key); long keys are stored as digests (see
    L{table_key}).  Lookups and updates are O(1): the table is one
    insertion-ordered C{dict}, with the most recently used key at its end, so
    the oldest entries are always at its front.  Expired entries are dropped
    when they are looked up, and a few at a time from the oldest end on
    every C{set} (so the table never needs a timer).

    The table also keeps how many of its entries name each backend (an
    integer per backend key, changed in O(1) as entries come and go), so
    that L{pinned_counts} answers the admin listener without walking the
    table.

    @ivar timeout: seconds an entry lives after its last C{set}.
        May be changed on a live table (a reload does so).
    @ivar max_entries: the size bound.  May be changed on a live table; the
        excess is evicted on the next C{set}, with the oldest one in 1024
        more (see L{_evict}).
    """

    def __init__(self, timeout: float, max_entries: int = 1_000_000, clock=None) -> None:
        clock = maybe_global_reactor(clock)
        self.timeout = timeout
        self.max_entries = max_entries
        self.clock = clock
        # key -> one int packing (last use in milliseconds << 16 | index of
        # the backend key in _keys): a million entries cost a dict slot, a
        # key and one int each, with no tuple or float per entry.
        self._entries: Dict[bytes, int] = {}
        self._keys: List[str] = []
        self._key_index: Dict[str, int] = {}
        # Entries (live or expired but not dropped yet) naming each backend
        # key, by its index in _keys.
        self._counts: List[int] = []
        self._sets = 0  # expiry runs every 32 sets

    def __len__(self) -> int:
        return len(self._entries)

    def _now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _live(self, packed: int, now: int) -> bool:
        return now - (packed >> 16) <= self.timeout * 1000

    def get(self, key: Key) -> Optional[str]:
        key = table_key(key)
        packed = self._entries.get(key)
        if packed is None:
            return None
        if not self._live(packed, self._now()):
            del self._entries[key]
            self._counts[packed & 0xFFFF] -= 1
            return None
        return self._keys[packed & 0xFFFF]

    def set(self, key: Key, backend_key: str) -> None:
        key = table_key(key)
        entries = self._entries
        index = self._key_index.get(backend_key)
        if index is None:
            index = self._intern(backend_key)
        now = self._now()
        counts = self._counts
        old = entries.pop(key, None)
        if old is not None:
            counts[old & 0xFFFF] -= 1
        entries[key] = (now << 16) | index
        counts[index] += 1
        self._sets += 1
        if not self._sets & 31:
            self._expire(now, budget=64)  # two a set, on average
        if len(entries) > self.max_entries:
            self._evict()

    def delete(self, key: Key) -> None:
        old = self._entries.pop(table_key(key), None)
        if old is not None:
            self._counts[old & 0xFFFF] -= 1

    #: The name this method had before tables were keyed by bytes.
    remove = delete

    def _intern(self, backend_key: str) -> int:
        if len(self._keys) >= 0xFFFF:
            # Backend keys that are gone accumulate only across very many
            # reloads; start over from the keys still in use.
            used = {packed & 0xFFFF for packed in self._entries.values()}
            remap = {old: new for new, old in enumerate(sorted(used))}
            self._keys = [self._keys[old] for old in sorted(used)]
            self._key_index = {k: i for i, k in enumerate(self._keys)}
            self._counts = [self._counts[old] for old in sorted(used)]
            self._entries = {
                c: (p >> 16 << 16) | remap[p & 0xFFFF] for c, p in self._entries.items()
            }
        self._key_index[backend_key] = len(self._keys)
        self._keys.append(backend_key)
        self._counts.append(0)
        return len(self._keys) - 1

    # Finding a dict's oldest key (its first) walks over the slots that
    # entries deleted from its front left behind, until the dict next
    # resizes: tens of thousands of them in a large, full table (about
    # 40 us a lookup at 100,000 entries).  So expiry and eviction take their
    # victims from one walk, in batches, never one walk per victim.

    def _evict(self) -> None:
        """
        Drop the least recently used entries beyond C{max_entries}, and a
        slack of one in 1024 more, so that a full table walks its front once
        per many new entries.
        """
        entries = self._entries
        excess = len(entries) - self.max_entries + (self.max_entries >> 10)
        counts = self._counts
        for key in list(islice(entries, excess)):
            counts[entries.pop(key) & 0xFFFF] -= 1

    def _expire(self, now: int, budget: int) -> int:
        entries = self._entries
        limit = now - self.timeout * 1000
        victims: List[bytes] = []
        for key in entries:
            if entries[key] >> 16 >= limit or len(victims) == budget:
                break
            victims.append(key)
        counts = self._counts
        for key in victims:
            counts[entries.pop(key) & 0xFFFF] -= 1
        return len(victims)

    def expire(self) -> int:
        """Drop every expired entry; return how many were dropped."""
        return self._expire(self._now(), budget=len(self._entries))

    def restore(self, key: Key, backend_key: str, idle: float) -> None:
        """
        Put back an entry last used C{idle} seconds ago (a table handed over
        by an upgrade, see L{twisted_slb.upgrade}).  Restore entries oldest
        first, as L{items} gives them; an entry already expired is skipped.
        """
        if idle > self.timeout:
            return
        key = table_key(key)
        index = self._key_index.get(backend_key)
        if index is None:
            index = self._intern(backend_key)
        counts = self._counts
        old = self._entries.pop(key, None)
        if old is not None:
            counts[old & 0xFFFF] -= 1
        self._entries[key] = ((self._now() - int(idle * 1000)) << 16) | index
        counts[index] += 1
        if len(self._entries) > self.max_entries:
            self._evict()

    def pinned_counts(self) -> Dict[str, int]:
        """
        Backend key -> live entries naming it (backends with none left out).

        Drops the expired entries first (each entry is dropped once, so this
        costs O(backends) plus the entries that expired since the last
        call), then reads the counts kept as entries come and go: the admin
        listener calls it on every scrape, whatever the table's size.
        """
        self.expire()
        return {key: count for key, count in zip(self._keys, self._counts) if count}

    def items(self) -> Iterator[Tuple[bytes, str, float]]:
        now = self._now()
        for key, packed in list(self._entries.items()):
            if self._live(packed, now):
                yield key, self._keys[packed & 0xFFFF], (now - (packed >> 16)) / 1000


@implementer(IPersistencePolicy)
class TablePersistence:
    """
    Keeps a client on one backend through a stick table keyed by
    L{client_key}.  A subclass says where the key comes from; a visit
    without a key is balanced as usual and stores nothing.

    @ivar table: the L{IStickTable}.
    @ivar scheduler: when set, new clients are chosen by this scheduler rather
        than the group's.
    @ivar on_failure: C{"repin"} (a client whose backend is down or refuses
        is moved to another, and its entry with it) or C{"strict"} (it is
        refused: 503 for HTTP, a closed connection for TCP, and its entry is
        kept).
    @ivar retry_after: the C{Retry-After} seconds of a strict refusal's 503.
    """

    name = "table"
    scheduler = None
    on_failure = "repin"
    retry_after = 5

    def __init__(self, table: IStickTable, scheduler=None, on_failure: str = "repin") -> None:
        """
        @raise ValueError: C{on_failure} is not C{"repin"} or C{"strict"}.
        """
        if on_failure not in ON_FAILURE:
            raise ValueError(f"{self.name} on_failure {on_failure!r} is not one of {', '.join(ON_FAILURE)}")
        self.table = table
        self.on_failure = on_failure
        if scheduler is not None:
            self.scheduler = scheduler

    def client_key(self, session: Session) -> Optional[Key]:
        """
        The table key of this visit, or L{None} when it has none (it is then
        balanced as usual and nothing is stored).
        """
        raise NotImplementedError(f"{type(self).__name__} must define client_key")

    def find(self, session: Session):
        """
        The client's pin in the table.  When the table is shared (it has a
        C{lookup}, see L{twisted_slb.persistence.store.SharedStickTable})
        and its cache does not hold the key, a L{Deferred} that fires,
        within the store's timeout, with the shared pin or L{None}.
        """
        key = self.client_key(session)
        if key is None:
            return None
        found = self.table.get(key)
        if found is None:
            lookup = getattr(self.table, "lookup", None)
            if lookup is not None:
                return lookup(key)
        return found

    def remember(self, session: Session, backend) -> None:
        key = self.client_key(session)
        if key is not None:
            self.table.set(key, backend.id)

    @property
    def refresh_interval(self) -> float:
        """
        How often a TCP connection that stays open calls L{refresh}: half the
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
        if key is None:
            return
        current = self.table.get(key)
        if current is None or current == backend.id:
            self.table.set(key, backend.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.table) if hasattr(self.table, '__len__') else '?'} entries>"


def _header_name(name: Union[bytes, str]) -> bytes:
    if isinstance(name, str):
        name = name.encode("ascii")
    if not TOKEN.match(name):
        raise ValueError(f"header name {name!r} is not a valid token")
    return name


class HeaderPersistence(TablePersistence):
    """
    Keeps a client on one backend by the value of a request header
    (C{X-Session-Id}, a tenant id): API clients and SDKs that carry a
    session id but no cookies.  A request without the header is balanced as
    usual and nothing is stored.  The header reaches the backend unchanged.

    @ivar header: the header name, as bytes.
    """

    name = "header"

    def __init__(self, table: IStickTable, header: Union[bytes, str] = b"X-Session-Id", scheduler=None,
                 on_failure: str = "repin") -> None:
        """
        @raise ValueError: C{header} is not a header name token, or
            C{on_failure} is not C{"repin"} or C{"strict"}.
        """
        TablePersistence.__init__(self, table, scheduler, on_failure)
        self.header = _header_name(header)

    def client_key(self, session: Session) -> Optional[bytes]:
        """The first value of the header (surrounding whitespace removed), or L{None}."""
        request = session.request
        if request is None:
            return None
        values = request.requestHeaders.getRawHeaders(self.header)
        if not values:
            return None
        value = values[0].strip()
        return value or None


def _set_cookie_deletes(attributes: bytes) -> bool:
    """Whether C{Set-Cookie} attributes (after the value) delete the cookie: C{Max-Age} of 0 or less."""
    for attribute in attributes.split(b";"):
        name, _, value = attribute.partition(b"=")
        if name.strip().lower() == b"max-age":
            value = value.strip()
            return value.startswith(b"-") or value.strip(b"0") == b""
    return False


class LearnCookiePersistence(TablePersistence):
    """
    Keeps a client on one backend by the application's own session cookie,
    learned from the backend's C{Set-Cookie}: the value -> backend is
    stored, and a request carrying that value goes to that backend.  The
    cookie is never modified, so signed or encrypted session cookies work
    (HAProxy C{stick store-response res.cook()}, nginx Plus C{sticky learn},
    ALB C{app_cookie}).

    A request whose value is in the table refreshes its entry (or moves it,
    when the client is re-pinned).  A value the balancer never learned is not
    stored: only backends add entries.  A C{Set-Cookie} that deletes the
    cookie (C{Max-Age=0}, or an empty value) forgets the request's value.

    @ivar cookie_name: the cookie's name, as bytes.
    """

    name = "learn_cookie"

    def __init__(self, table: IStickTable, cookie: Union[bytes, str] = b"JSESSIONID", scheduler=None,
                 on_failure: str = "repin") -> None:
        """
        @raise ValueError: C{cookie} is not a cookie name token, or
            C{on_failure} is not C{"repin"} or C{"strict"}.
        """
        TablePersistence.__init__(self, table, scheduler, on_failure)
        self.cookie_name = cookie_name(cookie)

    def client_key(self, session: Session) -> Optional[bytes]:
        """The value of the cookie in the request (quotes removed), or L{None}."""
        request = session.request
        if request is None:
            return None
        for line in request.requestHeaders.getRawHeaders(b"cookie", ()):
            for part in line.split(b";"):
                name, eq, value = part.partition(b"=")
                if eq and name.strip() == self.cookie_name:
                    value = _strip_quotes(value.strip())
                    if value:
                        return value
        return None

    def learned(self, session: Session) -> List[Tuple[bytes, bool]]:
        """
        The values of our cookie in the backend's response, each with
        whether that C{Set-Cookie} deletes it.
        """
        out: List[Tuple[bytes, bool]] = []
        request = session.request
        assert request is not None  # learned only from an HTTP response
        for line in request.responseHeaders.getRawHeaders(b"set-cookie", ()):
            first, _, rest = line.partition(b";")
            name, eq, value = first.partition(b"=")
            if eq and name.strip() == self.cookie_name:
                value = _strip_quotes(value.strip())
                out.append((value, not value or _set_cookie_deletes(rest)))
        return out

    def remember(self, session: Session, backend) -> None:
        request = session.request
        if request is None:
            return
        sent = self.client_key(session)
        learned = self.learned(session)
        for value, deletes in learned:
            if deletes:
                if sent is not None:
                    self.table.delete(sent)
            else:
                self.table.set(value, backend.id)
        if not learned and sent is not None and session.pinned_key is not None:
            # A value we learned: refresh it, or move it with a re-pinned client.
            self.table.set(sent, backend.id)
            if session.outcome == REPIN:
                log.info("client {client} re-pinned to backend {backend} ({cookie} cookie, learned)",
                         client=session.client_ip, backend=backend.name,
                         cookie=self.cookie_name.decode("ascii"))


def _strip_quotes(value: bytes) -> bytes:
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        return value[1:-1]
    return value
