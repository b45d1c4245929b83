"""
The persistence contract.

A persistence policy answers two questions, at two moments of a client's
visit:

 1. Before a backend is chosen: I{is this client pinned to a backend?}
    (L{IPersistencePolicy.find}).  The answer is a backend key (a
    L{twisted_slb.backends.Backend.id}) or L{None}.
 2. Once a backend serves the client: I{remember it}
    (L{IPersistencePolicy.remember}).  A TCP listener calls it when the
    backend connection is up; an HTTP listener calls it when the backend's
    response headers have arrived and before they reach the client, so that a
    cookie policy can add or rewrite C{Set-Cookie}.

Between the two, the balancer decides: a pin to a backend that can take it is
a I{hit}; a client with no pin gets the scheduler's choice (I{new}); a pin to
a backend that is unknown, down, or that failed to connect is replaced by the
scheduler's choice (I{repin}).

A policy whose C{on_failure} attribute is C{"strict"} changes the last case:
a pin to a backend that is still configured but down, or that refused the
connection, is not moved (I{strict}): the client gets a 503 (HTTP) or a
closed connection (TCP) and keeps its pin.  A pin to a backend that is no
longer configured is re-pinned in both modes.  A policy may also report that
the client's pin was there but too old (I{expired}, see L{EXPIRED}).

Both moments receive a L{Session}: what is known of this client for this
connection (TCP) or request (HTTP).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from twisted_slb import choices

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.iweb import IRequest

    from twisted_slb.backends import Backend

#: Persistence outcomes, as logged and counted.
HIT = "hit"
NEW = "new"
REPIN = "repin"
NONE = "none"  # the listener or rule has no persistence
#: The pin names a backend that is down or refused, and the policy's
#: C{on_failure} is C{"strict"}: the client is refused rather than moved.
STRICT = "strict"
#: The client's pin was too old (a cookie past C{max_idle} or C{max_life}):
#: it counts as absent and the client is balanced anew.  A policy's C{find}
#: sets C{session.outcome} to it before answering L{None}.
EXPIRED = "expired"

#: The values of a policy's C{on_failure} (L{twisted_slb.choices.ON_FAILURE}).
ON_FAILURE = choices.ON_FAILURE


@attr.s(slots=True, auto_attribs=True)
class Session:
    """
    One client visit as the balancer sees it.

    @ivar client_ip: the client's IP address, normalised (an IPv4-mapped IPv6
        address is given in its IPv4 form).
    @ivar request: the L{twisted.web.iweb.IRequest} for HTTP, L{None} for TCP.
    @ivar secure: whether the client reached us over TLS.
    @ivar policy: the policy that pinned (or will pin) this client.
    @ivar pinned_key: what L{IPersistencePolicy.find} answered.
    @ivar backend: the backend that serves the visit, once chosen.
    @ivar outcome: L{HIT}, L{NEW}, L{REPIN}, L{EXPIRED}, L{STRICT} or
        L{NONE}, once decided.
    @ivar note: whatever the policy's C{find} wants its C{remember} to know
        about this visit (L{InsertCookie} keeps the cookie it read); it
        lives and dies with the visit.
    @ivar peer_ip: the connection's peer when C{client_ip} came from a
        forwarding header (L{twisted_slb.clientip}), else C{""}: the proxy
        appends it to the C{X-Forwarded-For} it sends on.
    @ivar lookup: HTTP: the L{Deferred} a policy's C{find} returned (a
        shared table asking its store), which the proxy waits for before
        it chooses a backend; it fires with the pinned key or L{None}.
    """

    client_ip: str
    request: Optional[IRequest] = None
    secure: bool = False
    policy: Optional["IPersistencePolicy"] = None
    pinned_key: Optional[str] = None
    backend: Optional["Backend"] = None
    outcome: str = NONE
    note: object = None
    peer_ip: str = ""
    lookup: Optional[Deferred] = None


class IPersistencePolicy(Interface):
    """
    Keeps a client on one backend.

    Implementations are small: subclass one of the policies shipped with
    twisted_slb (L{twisted_slb.persistence.sourceip.SourceIPPersistence},
    L{twisted_slb.persistence.tables.HeaderPersistence},
    L{twisted_slb.persistence.tables.LearnCookiePersistence}, their base
    L{twisted_slb.persistence.tables.TablePersistence},
    L{twisted_slb.persistence.cookies.InsertCookie},
    L{twisted_slb.persistence.cookies.RewriteCookie}) or write a new one with
    these two methods.
    """

    name = Attribute("A short name for logs and C{--check}, e.g. C{'source_ip'}.")

    # Optional, not declared as an Attribute so that existing policies stay
    # valid: C{on_failure} (C{"repin"}, the default, or C{"strict"}) and
    # C{retry_after} (seconds, for the 503 of a strict refusal); see
    # L{is_strict}.

    def find(session: Session) -> Optional[str]:
        """
        Which backend is this client pinned to?

        May also remove the policy's own marks from the request (for example
        strip the C{SERVERID} cookie, or restore a rewritten cookie) so that
        the backend never sees them.

        @param session: the client visit; C{session.request} is set for HTTP.
        @return: a backend key (L{twisted_slb.backends.Backend.id}) or L{None}
            when the client is not pinned.  A key that names no usable
            backend is not an error: the client is re-pinned.  A policy
            whose pins live elsewhere (a shared store) may return a
            L{twisted.internet.defer.Deferred} of the same, which must fire
            (never fail) within a bound it keeps: the TCP and HTTP listeners
            hold the client until it fires (see L{pending_pin}); the UDP
            relay does not wait, and balances such a first datagram unpinned.
        """

    def remember(session: Session, backend: "Backend") -> None:
        """
        Record that C{backend} serves this client.

        Called once per visit, with C{session.outcome} already set.  For
        HTTP, C{session.request.responseHeaders} holds the backend's response
        headers, not yet sent, so that a cookie can be added or rewritten.

        @param session: the client visit.
        @param backend: the backend that serves it.
        """


def pinned_now(found) -> Optional[str]:
    """
    What C{find} answered, for a caller that cannot wait: the key, the
    result of a L{Deferred} that has already fired, else L{None}.
    """
    if not isinstance(found, Deferred):
        return found
    result: List[Any] = []
    found.addBoth(result.append)
    if result and isinstance(result[0], str):
        return result[0]
    return None


def is_strict(policy: object) -> bool:
    """
    Whether C{policy} keeps its clients on a backend that is down or refuses
    them (C{on_failure = "strict"}) rather than moving them.  A policy without
    the attribute re-pins.
    """
    return getattr(policy, "on_failure", "repin") == "strict"


def strict_refusal(session: Session) -> bool:
    """
    Whether a visit for which no backend was found is a strict refusal: the
    client's pin holds (C{on_failure = "strict"}) and its backend is down or
    failed for this visit.  Sets C{session.outcome} to L{STRICT} if so.

    Listeners call this when L{twisted_slb.backends.BackendGroup.route}
    gave no backend (or the retries ran out after the pinned backend failed),
    to refuse the client (503, or a closed connection) rather than report
    that no backend is available.
    """
    if session.outcome == STRICT:
        return True
    if session.outcome == HIT and is_strict(session.policy):
        session.outcome = STRICT
        return True
    return False


def normalise_ip(host: str) -> str:
    """
    The canonical text of a client address: an IPv4-mapped IPv6 address
    (C{::ffff:10.0.0.1}) becomes its IPv4 form, other IPv6 addresses are
    compressed and lowercased, so that one client has one key.
    """
    if ":" not in host:
        return host
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(addr)


def request_client_ip(request) -> Tuple[str, str]:
    """
    The client address of an HTTP request and the peer of its connection,
    both canonical: C{(client, peer)}.  The request's C{client_ip_policy}
    (a L{twisted_slb.clientip.ClientIPPolicy}, set by
    L{twisted_slb.web.front.HTTPFrontFactory}), if any, reads the
    forwarding headers.
    """
    address = request.getClientAddress()
    peer = normalise_ip(getattr(address, "host", None) or "0.0.0.0")
    policy = getattr(request, "client_ip_policy", None)
    if policy is None:
        return peer, peer
    return policy.resolve(peer, request.requestHeaders), peer


def session_for(request) -> Session:
    """
    The L{Session} of an HTTP request, created on first use.

    Persistence wrappers and L{twisted_slb.web.proxy.BalancedProxyResource}
    both call this, so that the wrapper's answer reaches the proxy.
    """
    session = getattr(request, "slb_session", None)
    if session is None:
        if getattr(request, "client_ip_policy", None) is None:
            addr = request.getClientAddress()
            client = peer = normalise_ip(getattr(addr, "host", None) or "0.0.0.0")
        else:
            client, peer = request_client_ip(request)
        session = Session(client, request=request, secure=request.isSecure(),
                          peer_ip=peer if peer != client else "")
        request.slb_session = session
    return session
