"""
Source-IP persistence: a stick table from client address to backend.

The table (L{twisted_slb.persistence.tables.StickTable}, the one every table
policy uses) has an idle expiry (an entry lives C{timeout} seconds after the
client's last new connection or request) and a size bound with
least-recently-used eviction.
"""

from __future__ import annotations

from twisted_slb.persistence.interfaces import Session

# StickTable is imported from here by code written before the table moved.
from twisted_slb.persistence.tables import Key, StickTable, TablePersistence  # noqa: F401


class SourceIPPersistence(TablePersistence):
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

    @classmethod
    def from_config(cls, config, clock=None) -> "SourceIPPersistence":
        return cls(StickTable(config.timeout, config.max_entries, clock=clock), on_failure=config.on_failure)

    def client_key(self, session: Session) -> Key:
        """The stick table key of a client: its normalised IP address."""
        return session.client_ip
