# -*- test-case-name: tests.test_census -*-
"""
How many clients each backend holds: what an operator watches after
C{drain}, to remove the backend when the count reaches zero.

Two counts per backend:

 - C{pinned_clients}: the entries of the stick tables (C{source_ip},
   C{header}, C{learn_cookie}, and udp listeners' tables) that name it,
   exact.  L{twisted_slb.persistence.tables.StickTable} keeps them as
   entries come and go (L{StickTable.pinned_counts}); any other
   L{IStickTable} (a shared store's) is counted by walking C{items()} when
   the admin listener asks.
 - C{cookie_clients}: for the stateless cookie modes (C{insert_cookie},
   C{rewrite_cookie}), which keep no table, the distinct clients that a
   backend served with a cookie in the last C{window} seconds
   (C{max_idle} for insert cookies; L{REWRITE_WINDOW} for rewrite cookies,
   whose lifetime is the backend's).  L{RecentClients} counts them
   approximately, in bounded memory: a HyperLogLog sketch per backend and
   time bucket (see there for its error).
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.persistence.tables import IStickTable

if TYPE_CHECKING:  # pragma: no cover
    from twisted_slb.backends import BackendGroup

#: The window of C{rewrite_cookie}'s count: the balancer does not know how
#: long the backend's session cookie lives.
REWRITE_WINDOW = 3600

#: HyperLogLog precision: 2**10 = 1024 one-byte registers per sketch.
PRECISION = 10
_REGISTERS = 1 << PRECISION
_MASK = _REGISTERS - 1
#: The hash is 64 bits: PRECISION pick the register, the rest give the rank.
_RANK_BITS = 64 - PRECISION
_ALPHA = 0.7213 / (1 + 1.079 / _REGISTERS)
_INVERSE_POWERS = [2.0 ** -r for r in range(_RANK_BITS + 2)]
#: The window is cut into this many buckets (plus the one filling now).
BUCKETS = 8
#: The relative standard error of the estimate of distinct clients.
STANDARD_ERROR = 1.04 / math.sqrt(_REGISTERS)


def _hash64(identity: bytes) -> int:
    # A deterministic 64-bit hash: Python's hash() is salted per process,
    # which would make two processes' counts (and tests) differ.
    return int.from_bytes(hashlib.blake2b(identity, digest_size=8).digest(), "little")


class RecentClients:
    """
    Distinct clients per backend seen in the last C{window} seconds,
    approximately and in bounded memory.

    Each backend has a ring of C{BUCKETS + 1} HyperLogLog sketches of
    1024 one-byte registers, one per C{window / BUCKETS} seconds (a bucket
    is allocated when a client is first seen in it, and reused when the ring
    comes round); the estimate merges the buckets that are not older than
    the window.  So:

     - memory: at most 9 KB per backend, whatever the number of clients;
     - the window is C{window} to C{window * 9/8} seconds: a client is
       counted at least C{window} seconds after it was last seen, never
       less (a backend reaches zero only when no client was seen for a whole
       window);
     - error: about 3.3% (relative standard error, C{1.04 / sqrt(1024)}) for
       large counts; below a few thousand clients the sketch counts by
       linear counting, within a client or two of the truth for tens of
       clients; zero is exact;
     - cost per request: one 8-byte BLAKE2b digest and a register update,
       O(1).

    @ivar window: seconds; may be changed on a live counter (a reload).
    """

    def __init__(self, window: float, clock=None) -> None:
        clock = maybe_global_reactor(clock)
        self.window = window
        self.clock = clock
        # backend key -> ([bucket epoch per slot], [registers or None per slot])
        self._sketches: Dict[str, Tuple[List[int], List[Optional[bytearray]]]] = {}

    def _width(self) -> float:
        return max(self.window, 1) / BUCKETS

    def seen(self, backend_key: str, identity: bytes) -> None:
        """A client known by C{identity} was just served by the backend C{backend_key}."""
        epoch = int(self.clock.seconds() // self._width())
        sketch = self._sketches.get(backend_key)
        if sketch is None:
            sketch = self._sketches[backend_key] = ([-1] * (BUCKETS + 1), [None] * (BUCKETS + 1))
        epochs, buckets = sketch
        slot = epoch % (BUCKETS + 1)
        registers = buckets[slot]
        if epochs[slot] != epoch or registers is None:
            epochs[slot] = epoch
            registers = buckets[slot] = bytearray(_REGISTERS)
        h = _hash64(identity)
        rank = _RANK_BITS + 1 - (h >> PRECISION).bit_length()
        index = h & _MASK
        if registers[index] < rank:
            registers[index] = rank

    def estimate(self, backend_key: str) -> int:
        """The distinct clients of C{backend_key} seen in the window."""
        sketch = self._sketches.get(backend_key)
        if sketch is None:
            return 0
        epochs, buckets = sketch
        current = int(self.clock.seconds() // self._width())
        live = [b for e, b in zip(epochs, buckets) if b is not None and current - BUCKETS <= e <= current]
        if not live:
            return 0
        merged = live[0] if len(live) == 1 else bytes(map(max, *live))
        zeros = merged.count(0)
        if zeros == _REGISTERS:
            return 0
        raw = _ALPHA * _REGISTERS * _REGISTERS / sum(map(_INVERSE_POWERS.__getitem__, merged))
        if raw <= 2.5 * _REGISTERS and zeros:
            raw = _REGISTERS * math.log(_REGISTERS / zeros)
        return max(1, int(round(raw)))

    def counts(self) -> Dict[str, int]:
        """Backend key -> distinct clients seen in the window (backends with none left out)."""
        out = {}
        for key in list(self._sketches):
            n = self.estimate(key)
            if n:
                out[key] = n
            elif self._stale(key):
                del self._sketches[key]  # a backend no client used for a window: free its buckets
        return out

    def _stale(self, backend_key: str) -> bool:
        current = int(self.clock.seconds() // self._width())
        return all(e < current - BUCKETS for e in self._sketches[backend_key][0])


def table_counts(table: IStickTable) -> Dict[str, int]:
    """
    Backend key -> entries of C{table} naming it: the table's own
    C{pinned_counts()} when it has one, else by walking C{items()}.
    """
    counts = getattr(table, "pinned_counts", None)
    if counts is not None:
        return counts()
    out: Dict[str, int] = {}
    for _, backend_key, _ in table.items():
        out[backend_key] = out.get(backend_key, 0) + 1
    return out


def table_size(table: IStickTable) -> int:
    """The live entries of C{table}."""
    if hasattr(table, "pinned_counts"):
        return sum(table.pinned_counts().values())
    if hasattr(table, "__len__"):
        return len(table)
    return sum(1 for _ in table.items())


def groups_of(name: str) -> List[str]:
    """The backend groups a table or counter named C{listener/group[+group...][/...]} serves."""
    parts = name.split("/")
    return parts[1].split("+") if len(parts) > 1 else []


class PinCensus:
    """
    The balancer's stick tables and cookie-client counters, by name, and
    what they add up to per backend.

    The names are those of L{twisted_slb.service.BalancerService.stick_tables}:
    C{listener/group} (the groups of a split joined by C{+}), then
    C{/header:NAME} or C{/learn_cookie:NAME} for those table types (and
    C{/insert_cookie:NAME} or C{/rewrite_cookie:NAME} for cookie counters).

    @ivar groups: group name -> L{twisted_slb.backends.BackendGroup}.
    @ivar tables: table name -> L{IStickTable} (the service's own dict).
    @ivar table_types: table name -> C{"source_ip"}, C{"header"},
        C{"learn_cookie"} or C{"udp"}.
    @ivar table_routes: table name -> the listeners and rules that use it
        (C{"web"}, C{"web rule 0"}).
    @ivar cookie_clients: counter name -> L{RecentClients}.
    """

    def __init__(self, groups: Mapping[str, BackendGroup]) -> None:
        self.groups = groups
        self.tables: Mapping[str, IStickTable] = {}
        self.table_types: Dict[str, str] = {}
        self.table_routes: Dict[str, List[str]] = {}
        self.cookie_clients: Dict[str, RecentClients] = {}

    def table_type(self, name: str) -> str:
        kind = self.table_types.get(name)
        if kind:
            return kind
        last = name.split("/")[-1] if name.count("/") >= 2 else ""
        return last.partition(":")[0] or "source_ip"

    def backend_for(self, name: str, backend_key: str):
        """The backend a table named C{name} means by C{backend_key}, or L{None} (a backend removed since)."""
        for group_name in groups_of(name):
            group = self.groups.get(group_name)
            backend = group.get(backend_key) if group is not None else None
            if backend is not None:
                return backend
        return None

    def _add(self, out: Dict[Tuple[str, str], int], name: str, counts: Mapping[str, int]) -> None:
        for group_name in groups_of(name):
            group = self.groups.get(group_name)
            if group is None:
                continue
            for backend in group.backends:
                n = counts.get(backend.id)
                if n:
                    out[(group_name, backend.name)] = out.get((group_name, backend.name), 0) + n

    def pinned(self) -> Dict[Tuple[str, str], int]:
        """(group, backend name) -> stick table entries naming the backend, over every table."""
        out: Dict[Tuple[str, str], int] = {}
        for name, table in list(self.tables.items()):
            self._add(out, name, table_counts(table))
        return out

    def cookies(self) -> Dict[Tuple[str, str], int]:
        """
        (group, backend name) -> distinct cookie clients seen in the window,
        summed over the listeners and rules that use the group (a client
        that uses two of them counts in each).
        """
        out: Dict[Tuple[str, str], int] = {}
        for name, counter in list(self.cookie_clients.items()):
            self._add(out, name, counter.counts())
        return out

    def describe(self, names: Optional[Iterable[str]] = None) -> List[dict]:
        """One summary per table (name, type, routes, entries, max_entries, timeout)."""
        out = []
        for name in sorted(self.tables if names is None else names):
            table = self.tables[name]
            out.append({
                "name": name,
                "type": self.table_type(name),
                "routes": list(self.table_routes.get(name, ())),
                "entries": table_size(table),
                "max_entries": getattr(table, "max_entries", None),
                "timeout": getattr(table, "timeout", None),
            })
        return out
