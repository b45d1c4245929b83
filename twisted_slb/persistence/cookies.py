"""
Cookie persistence for HTTP and HTTPS listeners: insert and rewrite.

L{InsertCookie} (HAProxy: C{cookie SERVERID insert indirect nocache}) adds a
cookie of its own that names the backend; L{RewriteCookie} (HAProxy:
C{cookie JSESSIONID prefix}) prefixes a cookie the backend sets with the
backend's id.  Both are resources that wrap the proxy and are the
L{IPersistencePolicy} of the requests they see::

    proxy = BalancedProxyResource(group)
    site = Site(InsertCookie(proxy, name=b"SERVERID", timeout=3600))

Both are stateless: the cookie itself names the backend (by
L{twisted_slb.backends.Backend.id}, derived from the backend's name, never
its address), so any number of balancer processes sharing a configuration
route a client the same way.  Cookies are not signed: a client that forges
one can only choose which of the group's backends serves it, which it could
also do by retrying.

Bad cookies are bad traffic, not errors: a malformed, oversized, non-ASCII
or unknown value is ignored and the client is balanced and re-pinned as if it
had none.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, cast

from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from zope.interface import implementer

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.backends import backend_id
from twisted_slb.persistence._names import cookie_name as _as_name
from twisted_slb.persistence.interfaces import EXPIRED, HIT, ON_FAILURE, REPIN, IPersistencePolicy, Session
from twisted_slb.persistence.resource import PersistenceResource

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

    from twisted_slb.backends import Backend
    from twisted_slb.config import PersistenceConfig
    from twisted_slb.persistence.census import RecentClients

log = Logger(namespace="twisted_slb.persistence.cookies")

#: Characters that must not appear in a Path or Domain attribute.
_BAD_ATTRIBUTE = re.compile(r"[\x00-\x20;,\x7f-\U0010ffff]")

#: Longest cookie value either policy will look at; a longer one is ignored.
MAX_VALUE_BYTES = 4096

_SAMESITE = {"lax": b"Lax", "strict": b"Strict", "none": b"None", "": b""}
_SECURE = ("auto", "always", "never")
MAX_TIMEOUT = 86400
#: The longest C{max_life}: a year.
MAX_LIFE = 365 * 86400
#: Seconds a cookie's time stamp may lie in the future (clocks of balancer
#: processes that share a configuration differ a little); beyond it the
#: cookie is forged or from a badly skewed clock, and counts as expired.
MAX_SKEW = 60

#: A fixed cookie value of a server (C{cookie = "s1"}): no C{.} (it separates
#: the time stamps) and no C{~} (it ends the rewrite prefix).
_FIXED = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: An insert cookie value: a backend id or fixed value, then up to two time
#: stamps (seconds since the epoch, base 36).
_INSERT_VALUE = re.compile(r"^([A-Za-z0-9_-]{1,64})((?:\.[0-9a-z]{1,10}){0,2})$")
_HEX_ID = re.compile(r"^[0-9a-f]{16}$")


class FixedCookieValues:
    """
    The fixed cookie values of a group's servers (C{cookie = "s1"} in
    C{servers = [...]}, HAProxy's C{server a ... cookie s1}), both ways.

    A server without one is named by its id (L{backend_id}).

    @ivar by_value: fixed value -> backend id.
    @ivar by_id: backend id -> fixed value.
    """

    def __init__(self, values: Union[Mapping[str, str], Iterable[object], None] = None) -> None:
        """
        @param values: server name -> fixed value, or server configurations
            (objects with C{name} and C{cookie}, such as
            L{twisted_slb.config.ServerConfig}; an empty C{cookie} is none).
        @raise ValueError: a value is not a cookie-safe token, or two
            servers have the same value.
        """
        pairs = values.items() if isinstance(values, Mapping) else (
            (s.name, s.cookie) for s in (values or ()))  # type: ignore[attr-defined]
        self.by_value: Dict[str, str] = {}
        self.by_id: Dict[str, str] = {}
        for name, value in pairs:
            if not value:
                continue
            if not _FIXED.match(value):
                raise ValueError(f"server {name!r} cookie {value!r} is not 1 to 64 letters, digits, '-' or '_'")
            if value in self.by_value:
                raise ValueError(f"server {name!r} cookie {value!r} is the value of another server too")
            key = backend_id(name)
            self.by_value[value] = key
            self.by_id[key] = value

    def __bool__(self) -> bool:
        return bool(self.by_value)

    def value_for(self, backend: Backend) -> str:
        """The value naming C{backend}: its fixed value, or its id."""
        return self.by_id.get(backend.id, backend.id)

    def key_for(self, value: str) -> Optional[str]:
        """
        The backend key a value names: a fixed value's backend id, or the
        value itself when it is shaped like an id; L{None} otherwise.
        """
        key = self.by_value.get(value)
        if key is not None:
            return key
        if _HEX_ID.match(value):
            return value
        return None


def _check_on_failure(kind: str, on_failure: str) -> str:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"{kind} on_failure {on_failure!r} is not one of {', '.join(ON_FAILURE)}")
    return on_failure


def _unquote(value: bytes) -> Tuple[bytes, bool]:
    """
    C{value} without the one pair of double quotes RFC 6265 allows around a
    cookie value, and whether it had them.
    """
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        return value[1:-1], True
    return value, False


def edit_request_cookies(
    headers: Headers, name: bytes, edit: Callable[[bytes], Optional[bytes]]
) -> None:
    """
    Edit every occurrence of cookie C{name} in the C{Cookie} request
    header(s), in place.

    Cookie names are case-sensitive (RFC 6265).  A header in which C{name}
    does not occur is left byte for byte as it was; one in which it does is
    rebuilt from its pairs joined by C{"; "}; a header left with no pair is
    removed.

    @param headers: the request headers.
    @param name: the cookie name.
    @param edit: called with each value (whitespace stripped, quotes kept),
        in the order the client sent them; returns the new value, or L{None}
        to remove the pair.
    """
    raw = headers.getRawHeaders(b"cookie")
    if not raw:
        return
    changed = False
    lines: List[bytes] = []
    for line in raw:
        parts: List[bytes] = []
        line_changed = False
        for part in line.split(b";"):
            part = part.strip()
            if not part:
                continue
            n, eq, v = part.partition(b"=")
            if eq and n.strip() == name:
                line_changed = True
                new = edit(v.strip())
                if new is None:
                    continue
                part = name + b"=" + new
            parts.append(part)
        if not line_changed:
            lines.append(line)
        elif parts:
            lines.append(b"; ".join(parts))
        changed = changed or line_changed
    if not changed:
        return
    if lines:
        headers.setRawHeaders(b"cookie", lines)
    else:
        headers.removeHeader(b"cookie")


def _forget_received_cookie(request: object, name: bytes) -> None:
    """
    Drop C{name} from C{request.received_cookies} too, so that nothing
    behind the wrapper sees our cookie by that route either.
    """
    received = getattr(request, "received_cookies", None)
    if isinstance(received, dict):
        received.pop(name, None)


def _cache_control_keeps_set_cookie_private(values: Sequence[bytes]) -> bool:
    """
    Whether C{Cache-Control} already keeps shared caches from storing a
    C{Set-Cookie}: C{private}, C{no-store}, or a C{no-cache} / C{private}
    naming C{Set-Cookie}.
    """
    for directive in b",".join(values).split(b","):
        key, eq, arg = directive.strip().partition(b"=")
        key = key.strip().lower()
        if key == b"no-store" or (key == b"private" and not eq):
            return True
        if key in (b"no-cache", b"private") and b"set-cookie" in arg.lower():
            return True
    return False


def add_nocache(headers: Headers) -> None:
    """
    Add C{Cache-Control: no-cache="Set-Cookie"} to response headers that set
    a persistence cookie, so that a shared cache never hands one client's
    pin to others (what HAProxy's C{nocache} is for).

    An existing C{Cache-Control} is kept and the directive appended to it, in
    one header; nothing is added when the response is already C{private} or
    C{no-store}, or already says C{no-cache="Set-Cookie"}: those keep the
    cookie out of shared caches already.
    """
    existing = headers.getRawHeaders(b"cache-control")
    if not existing:
        headers.addRawHeader(b"cache-control", b'no-cache="Set-Cookie"')
        return
    if _cache_control_keeps_set_cookie_private(existing):
        return
    merged = [v.strip() for v in existing if v.strip()]
    merged.append(b'no-cache="Set-Cookie"')
    headers.setRawHeaders(b"cache-control", [b", ".join(merged)])


def _int_to_base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    if n <= 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(digits[r])
    return "".join(reversed(out))


@implementer(IPersistencePolicy)
class InsertCookie(PersistenceResource):
    """
    Insert-cookie persistence: the balancer's own cookie names the backend.

    The first response a client gets from a backend carries
    C{Set-Cookie: SERVERID=<value>}; later requests that carry it go to the
    same backend for as long as it is up (a drained backend keeps its
    clients).  The cookie is stripped from the request before it reaches the
    backend, and a C{SERVERID} cookie the backend sets itself is removed from
    its response, so the two never clash.

    B{The value} is C{<backend id>} (16 hex digits,
    L{twisted_slb.backends.Backend.id}), or the server's fixed value
    (C{cookie = "s1"}, see L{FixedCookieValues}), followed by
    C{.<written>} (when it was last written, seconds since the epoch in base
    36), e.g. C{SERVERID=3f2a9c0d51e4b7a8.sxkq3c}; with C{max_life} it is
    C{.<issued>.<written>}: short, opaque, the same in every process sharing
    the configuration, never the backend's address.  Every form is accepted
    back, a bare one (no stamp, as issued before time stamps were checked)
    included.

    B{Lifetimes}: a cookie written more than C{max_idle} seconds ago, first
    issued more than C{max_life} seconds ago, or stamped more than
    L{MAX_SKEW} seconds in the future, counts as absent: the client is
    balanced anew, gets a new cookie, and the outcome is C{"expired"}.

    B{When it is set}: into every response that came from a backend, whatever
    its status (404, 500 and 302 included), when the client is new or is
    re-pinned (its cookie named no usable backend, or was unreadable); and,
    with C{refresh}, when more than half of C{max_idle} has passed since the
    cookie was written (sliding expiry: only idle clients lose their pin),
    keeping its first issue time.  A
    client that holds a valid, fresh cookie for a usable backend gets no
    C{Set-Cookie} at all, so no status, redirects included, ever re-pins it.

    B{Several cookies}: when a request carries our cookie more than once
    (several C{Cookie} headers, or the name twice, e.g. one set for a parent
    domain), the first valid value in the order the client sent them wins.

    B{Subclassing}: override L{cookie_value_for} and L{parse_cookie_value}
    together to change the value format, or L{set_cookie_header} to change
    the attributes.

    @ivar cookie_name: the cookie name (bytes).
    @ivar timeout: the cookie lifetime in seconds (C{Max-Age}).
    @ivar secure: C{"auto"} (C{Secure} when the client came over TLS),
        C{"always"} or C{"never"}.
    @ivar httponly: whether to add C{HttpOnly}.
    @ivar samesite: C{"lax"}, C{"strict"}, C{"none"} or C{""} (attribute
        left out).
    @ivar domain: the C{Domain} attribute, C{""} for none (a host-only
        cookie).
    @ivar path: the C{Path} attribute, C{""} for none.
    @ivar refresh: whether to re-issue the cookie to active clients.
    @ivar max_idle: seconds after its last writing that a cookie expires.
    @ivar max_life: seconds after its first issue that a cookie expires; 0
        for no limit.
    @ivar on_failure: C{"repin"} or C{"strict"} (see
        L{twisted_slb.persistence.interfaces}).
    @ivar retry_after: the C{Retry-After} seconds of a strict refusal's 503.
    @ivar fixed: the servers' L{FixedCookieValues}.
    @ivar clock: the L{IReactorTime} giving the time.
    @ivar clients: a L{twisted_slb.persistence.census.RecentClients} that
        counts the distinct clients each backend serves (known by address
        and C{User-Agent}: the cookie's value is the same for every client of
        a backend), or L{None}.
    """

    name = "insert_cookie"
    retry_after = 5
    clients: Optional[RecentClients] = None

    def __init__(
        self,
        wrapped: IResource,
        name: Union[bytes, str] = b"SERVERID",
        timeout: int = 3600,
        secure: str = "auto",
        httponly: bool = True,
        samesite: str = "lax",
        domain: str = "",
        path: str = "/",
        refresh: bool = True,
        reactor: Optional[IReactorTime] = None,
        max_idle: Optional[int] = None,
        max_life: int = 0,
        on_failure: str = "repin",
        server_cookies: Union[Mapping[str, str], Iterable[object], None] = None,
    ) -> None:
        """
        @param wrapped: the resource that proxies to the backends.
        @param name: the cookie name.
        @param timeout: the cookie lifetime, 1..86400 seconds.
        @param secure: C{"auto"}, C{"always"} or C{"never"}.
        @param httponly: whether to add C{HttpOnly}.
        @param samesite: C{"lax"}, C{"strict"}, C{"none"} or C{""}.
        @param domain: the C{Domain} attribute, or C{""}.
        @param path: the C{Path} attribute, or C{""}.
        @param refresh: sliding expiry.
        @param reactor: an L{IReactorTime}; the global reactor if L{None}.
        @param max_idle: seconds, 1 to C{timeout}; L{None} or 0 means
            C{timeout}.
        @param max_life: seconds, 0 (no limit) to L{MAX_LIFE}.
        @param on_failure: C{"repin"} or C{"strict"}.
        @param server_cookies: the servers' fixed values (see
            L{FixedCookieValues}).
        @raise ValueError: an option is out of range; the message says which.
        """
        PersistenceResource.__init__(self, wrapped)
        self.cookie_name = _as_name(name)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_TIMEOUT:
            raise ValueError(f"insert cookie timeout {timeout!r} is not an integer from 1 to {MAX_TIMEOUT}")
        if secure not in _SECURE:
            raise ValueError(f"insert cookie secure {secure!r} is not one of {', '.join(_SECURE)}")
        if samesite not in _SAMESITE:
            raise ValueError(f"insert cookie samesite {samesite!r} is not one of lax, strict, none, ''")
        for label, value in (("domain", domain), ("path", path)):
            if _BAD_ATTRIBUTE.search(value):
                raise ValueError(
                    f"insert cookie {label} {value!r} contains a space, ';', ',' or a control "
                    "or non-ASCII character"
                )
        self.timeout = timeout
        self.secure = secure
        self.httponly = httponly
        self.samesite = samesite
        self.domain = domain
        self.path = path
        self.refresh = refresh
        if not max_idle:
            max_idle = timeout
        if isinstance(max_idle, bool) or not isinstance(max_idle, int) or not 1 <= max_idle <= timeout:
            raise ValueError(f"insert cookie max_idle {max_idle!r} is not an integer from 1 to the timeout ({timeout})")
        if isinstance(max_life, bool) or not isinstance(max_life, int) or not 0 <= max_life <= MAX_LIFE:
            raise ValueError(f"insert cookie max_life {max_life!r} is not an integer from 0 to {MAX_LIFE}")
        self.max_idle = max_idle
        self.max_life = max_life
        self.on_failure = _check_on_failure("insert cookie", on_failure)
        self.fixed = FixedCookieValues(server_cookies)
        reactor = maybe_global_reactor(reactor)
        self.clock = reactor
        self._stamp: Tuple[int, str] = (-1, "")
        self._attributes: Tuple[Tuple[int, bool], bytes] = ((-1, False), b"")

    @classmethod
    def from_config(
        cls,
        wrapped: IResource,
        persistence_config: PersistenceConfig,
        reactor: Optional[IReactorTime] = None,
        servers: Iterable[object] = (),
    ) -> InsertCookie:
        """
        Build from a listener's or rule's C{persistence} table
        (C{type = "insert_cookie"}); C{cookie = ""} means C{SERVERID}.

        @param servers: the group's L{twisted_slb.config.ServerConfig}s, for
            their fixed cookie values.
        """
        return cls(
            wrapped,
            name=persistence_config.cookie or "SERVERID",
            timeout=persistence_config.timeout,
            secure=persistence_config.secure,
            httponly=persistence_config.httponly,
            samesite=persistence_config.samesite,
            domain=persistence_config.domain,
            path=persistence_config.path,
            refresh=persistence_config.refresh,
            reactor=reactor,
            max_idle=persistence_config.max_idle or None,
            max_life=persistence_config.max_life,
            on_failure=persistence_config.on_failure,
            server_cookies=servers,
        )

    # -- the value format (override both together) ----------------------

    def cookie_value_for(self, backend: Backend, issued: Optional[int] = None) -> str:
        """
        The cookie value that pins a client to C{backend} now: its fixed
        value or id, then C{.<written>} (now), preceded with C{max_life} by
        C{.<issued>}.  Must be ASCII and need no quoting.

        @param issued: when the client's pin was first issued (kept across
            refreshes); L{None} for now.  Only passed when C{max_life} is
            set, so that subclasses written for C{cookie_value_for(backend)}
            keep working.
        """
        now = int(self.clock.seconds())
        if self._stamp[0] != now:
            self._stamp = (now, _int_to_base36(now))
        value = f"{self.fixed.value_for(backend)}.{self._stamp[1]}"
        if self.max_life:
            first = self._stamp[1] if issued is None or issued == now else _int_to_base36(issued)
            return f"{self.fixed.value_for(backend)}.{first}.{self._stamp[1]}"
        return value

    def parse_cookie_value(
        self, value: str
    ) -> Optional[Union[Tuple[str, Optional[int], Optional[int]], Tuple[str, Optional[int]]]]:
        """
        Read a value made by L{cookie_value_for}, or a bare id or fixed value.

        @param value: the value the client sent, unquoted, ASCII.
        @return: C{(backend key, written or None, issued or None)} (a
            subclass may answer just C{(backend key, written or None)}), or
            L{None} when the value is not ours.
        """
        match = _INSERT_VALUE.match(value)
        if match is None:
            return None
        name, stamps = match.groups()
        key = self.fixed.key_for(name)
        if key is None:
            return None
        times = [int(t, 36) for t in stamps.split(".")[1:]]
        if len(times) == 2:
            return key, times[1], times[0]
        return key, (times[0] if times else None), None

    def expired(self, written: Optional[int], issued: Optional[int]) -> bool:
        """
        Whether a cookie written at C{written} and first issued at C{issued}
        (either L{None} when it does not say) has expired: idle past
        C{max_idle}, older than C{max_life}, or stamped in the future beyond
        L{MAX_SKEW}.
        """
        now = self.clock.seconds()
        if written is not None and (written - now > MAX_SKEW or now - written > self.max_idle):
            return True
        if issued is not None and (issued - now > MAX_SKEW or (self.max_life and now - issued > self.max_life)):
            return True
        return False

    # -- IPersistencePolicy ---------------------------------------------

    def find(self, session: Session) -> Optional[str]:
        """
        The backend key of the first valid cookie of ours in the request,
        which loses every occurrence of our cookie on the way.
        """
        request = session.request
        assert request is not None  # an HTTP policy: every visit has a request
        found: List[Tuple[str, Optional[int], Optional[int]]] = []
        stale: List[str] = []

        def take(value: bytes) -> None:
            if not found and len(value) <= MAX_VALUE_BYTES:
                inner, _ = _unquote(value)
                try:
                    text = inner.decode("ascii")
                except UnicodeDecodeError:
                    return None
                parsed = self.parse_cookie_value(text)
                if parsed is None:
                    return None
                key, written = parsed[0], parsed[1]
                issued = parsed[2] if len(parsed) > 2 else None
                if self.expired(written, issued):
                    stale.append(text)
                else:
                    found.append((key, written, issued))
            return None

        edit_request_cookies(request.requestHeaders, self.cookie_name, take)
        _forget_received_cookie(request, self.cookie_name)
        # What the cookie said (backend key, written, issued), for remember().
        session.note = found[0] if found else None
        if found:
            return found[0][0]
        if stale:
            # Too old: as if absent, but said so in the access log and stats.
            session.outcome = EXPIRED
            log.debug(
                "client {client}: {cookie} cookie {value} expired (max_idle {max_idle} s, max_life {max_life} s)",
                client=session.client_ip, cookie=self.cookie_name.decode("ascii"), value=stale[0],
                max_idle=self.max_idle, max_life=self.max_life,
            )
        return None

    def remember(self, session: Session, backend: Backend) -> None:
        """
        Set the cookie on the backend's response when the client is new, was
        re-pinned, or (with C{refresh}) holds a cookie past half its life.
        """
        request = session.request
        if request is None:
            return
        if self.clients is not None:
            self.clients.seen(backend.id, _client_identity(session, request))
        # What find() read from the cookie (backend key, written, issued).
        seen = cast("Optional[Tuple[str, Optional[int], Optional[int]]]", session.note)
        headers = request.responseHeaders
        self._drop_backend_cookie(headers, backend)
        issued = None
        if session.outcome == HIT and seen is not None and seen[0] == backend.id:
            if not self._needs_refresh(seen[1], seen[2]):
                return
            issued = seen[2]
        elif session.outcome == REPIN:
            log.info(
                "client {client} re-pinned from {old} to backend {backend} ({cookie} cookie)",
                client=session.client_ip,
                old=session.pinned_key,
                backend=backend.name,
                cookie=self.cookie_name.decode("ascii"),
            )
        headers.addRawHeader(b"set-cookie", self.set_cookie_header(session, backend, issued))
        add_nocache(headers)

    # -- helpers ----------------------------------------------------------

    def _needs_refresh(self, written: Optional[int], issued: Optional[int]) -> bool:
        if not self.refresh:
            return False
        if written is None or (self.max_life and issued is None):
            # Issued without (all) the stamps in force now: stamp it.
            return True
        return self.clock.seconds() - written > self.max_idle / 2.0

    def is_secure(self, session: Session) -> bool:
        """Whether the cookie set for this visit gets C{Secure}."""
        return self.secure == "always" or (self.secure == "auto" and bool(session.secure))

    def set_cookie_header(self, session: Session, backend: Backend, issued: Optional[int] = None) -> bytes:
        """
        The C{Set-Cookie} header value pinning this client to C{backend}.

        C{SameSite=None} is left out when the cookie is not C{Secure}:
        browsers reject a C{SameSite=None} cookie without C{Secure}, and the
        client would never be pinned.

        @param issued: when the client's pin was first issued, for a refresh
            with C{max_life}; L{None} for now.
        """
        secure = self.is_secure(session)
        value = (self.cookie_value_for(backend, issued) if self.max_life else self.cookie_value_for(backend))
        encoded = value.encode("ascii")
        # The attributes change once a second (Expires): build them once.
        key = (int(self.clock.seconds()), secure)
        if self._attributes[0] != key:
            self._attributes = (key, self._cookie_attributes(key[0], secure))
        return self.cookie_name + b"=" + encoded + self._attributes[1]

    def _cookie_attributes(self, now: int, secure: bool) -> bytes:
        """The C{Set-Cookie} attributes after the value, from C{; Max-Age} on."""
        parts = [
            b"",
            b"Max-Age=%d" % (self.timeout,),
            b"Expires=" + datetimeToString(now + self.timeout),
        ]
        if self.path:
            parts.append(b"Path=" + self.path.encode("ascii"))
        if self.domain:
            parts.append(b"Domain=" + self.domain.encode("ascii"))
        if secure:
            parts.append(b"Secure")
        if self.httponly:
            parts.append(b"HttpOnly")
        if self.samesite and (secure or self.samesite != "none"):
            parts.append(b"SameSite=" + _SAMESITE[self.samesite])
        return b"; ".join(parts)

    def _drop_backend_cookie(self, headers: Headers, backend: Backend) -> None:
        """
        Remove a C{Set-Cookie} for our cookie name that the backend sent: it
        would overwrite the pin in the client.
        """
        raw = headers.getRawHeaders(b"set-cookie")
        if not raw:
            return
        kept = [v for v in raw if v.partition(b";")[0].partition(b"=")[0].strip() != self.cookie_name]
        if len(kept) == len(raw):
            return
        log.debug(
            "backend {backend} set the {cookie} cookie itself; removed",
            backend=backend.name,
            cookie=self.cookie_name.decode("ascii"),
        )
        if kept:
            headers.setRawHeaders(b"set-cookie", kept)
        else:
            headers.removeHeader(b"set-cookie")


@implementer(IPersistencePolicy)
class RewriteCookie(PersistenceResource):
    """
    Rewrite-cookie persistence: the backend's own session cookie, prefixed
    with the backend's id.

    The backend's C{Set-Cookie: JSESSIONID=abc; Path=/; HttpOnly} reaches the
    client as C{JSESSIONID=<backend id>~abc; Path=/; HttpOnly}: every
    attribute verbatim, so expiry and lifetime stay the backend's; a quoted
    value keeps its quotes around the prefixed value; an empty value (a
    deletion) is left alone; other C{Set-Cookie} headers are untouched.  It
    is done on every response, so a backend that rotates its session id
    keeps the client pinned.

    A request with C{JSESSIONID=<backend id>~abc} goes to that backend, which
    receives C{JSESSIONID=abc}: the prefix is removed from every occurrence
    of the cookie before forwarding, also when it names a backend that is
    unknown or down (the client is then re-pinned, and gets the new prefix as
    soon as its new backend sets the cookie).  A value without a prefix of
    ours (16 hex digits and C{~}) is passed through unchanged and the client
    is balanced as new.  With several occurrences, the first one carrying a
    prefix decides.

    Limit (as with HAProxy's C{prefix} mode): a re-pinned client keeps its
    old prefix until its new backend sets the cookie again; until then each
    request is balanced anew.

    A server with a fixed cookie value (C{cookie = "s1"}) is named by it:
    C{JSESSIONID=s1~abc}, as HAProxy's C{prefix} mode does; the id prefix is
    still accepted for it.

    B{Subclassing}: override L{cookie_value_for} and L{split_cookie_value}
    together to change the prefix format.

    @ivar cookie_name: the backend's cookie name (bytes).
    @ivar on_failure: C{"repin"} or C{"strict"}.
    @ivar retry_after: the C{Retry-After} seconds of a strict refusal's 503.
    @ivar fixed: the servers' L{FixedCookieValues}.
    @ivar clients: a L{twisted_slb.persistence.census.RecentClients} that
        counts the distinct sessions (the backend's own cookie values) each
        backend serves, or L{None}.
    """

    name = "rewrite_cookie"
    retry_after = 5
    clients: Optional[RecentClients] = None

    _PREFIXED = re.compile(rb"^([A-Za-z0-9_-]{1,64})~(.*)$", re.DOTALL)

    def __init__(
        self,
        wrapped: IResource,
        name: Union[bytes, str] = b"JSESSIONID",
        on_failure: str = "repin",
        server_cookies: Union[Mapping[str, str], Iterable[object], None] = None,
    ) -> None:
        """
        @param wrapped: the resource that proxies to the backends.
        @param name: the name of the cookie the backends set.
        @param on_failure: C{"repin"} or C{"strict"}.
        @param server_cookies: the servers' fixed values (see
            L{FixedCookieValues}).
        @raise ValueError: the name is not a valid cookie name, or an
            option is out of range.
        """
        PersistenceResource.__init__(self, wrapped)
        self.cookie_name = _as_name(name)
        self.on_failure = _check_on_failure("rewrite cookie", on_failure)
        self.fixed = FixedCookieValues(server_cookies)

    @classmethod
    def from_config(
        cls, wrapped: IResource, persistence_config: PersistenceConfig, servers: Iterable[object] = ()
    ) -> RewriteCookie:
        """
        Build from a C{persistence} table with C{type = "rewrite_cookie"}.

        @param servers: the group's L{twisted_slb.config.ServerConfig}s, for
            their fixed cookie values.
        @raise ValueError: C{cookie} is empty or not a valid name.
        """
        if not persistence_config.cookie:
            raise ValueError("rewrite_cookie persistence needs the name of the backend's cookie (cookie = ...)")
        return cls(wrapped, name=persistence_config.cookie, on_failure=persistence_config.on_failure,
                   server_cookies=servers)

    # -- the value format (override both together) ----------------------

    def cookie_value_for(self, backend: Backend, value: bytes) -> bytes:
        """The backend's cookie value C{value} as the client gets it."""
        return self.fixed.value_for(backend).encode("ascii") + b"~" + value

    def split_cookie_value(self, value: bytes) -> Optional[Tuple[str, bytes]]:
        """
        Read a value made by L{cookie_value_for}.

        @param value: the value the client sent, unquoted.
        @return: C{(backend key, the backend's own value)}, or L{None} when
            the value carries no prefix of ours.
        """
        match = self._PREFIXED.match(value)
        if match is None:
            return None
        key = self.fixed.key_for(match.group(1).decode("ascii"))
        if key is None:
            return None
        return key, match.group(2)

    # -- IPersistencePolicy ---------------------------------------------

    def find(self, session: Session) -> Optional[str]:
        """
        The backend key of the first prefixed cookie of ours; every prefixed
        occurrence is restored to the backend's value.
        """
        request = session.request
        assert request is not None  # an HTTP policy: every visit has a request
        keys: List[str] = []
        originals: List[bytes] = []

        def restore(value: bytes) -> bytes:
            if len(value) > MAX_VALUE_BYTES:
                return value
            inner, quoted = _unquote(value)
            split = self.split_cookie_value(inner)
            if split is None:
                return value
            key, original = split
            keys.append(key)
            originals.append(original)
            return b'"' + original + b'"' if quoted else original

        edit_request_cookies(request.requestHeaders, self.cookie_name, restore)
        received = getattr(request, "received_cookies", None)
        if isinstance(received, dict) and self.cookie_name in received:
            inner, quoted = _unquote(received[self.cookie_name])
            split = self.split_cookie_value(inner)
            if split is not None:
                received[self.cookie_name] = b'"' + split[1] + b'"' if quoted else split[1]
        # The session the client holds, for the count of cookie clients.
        session.note = originals[0] if originals else None
        return keys[0] if keys else None

    def remember(self, session: Session, backend: Backend) -> None:
        """Prefix the backend's C{Set-Cookie} for our name with its id."""
        request = session.request
        if request is None:
            return
        headers = request.responseHeaders
        raw = headers.getRawHeaders(b"set-cookie")
        if self.clients is not None:
            self._count_client(session, backend, raw)
        if session.outcome == REPIN:
            log.info(
                "client {client} re-pinned from {old} to backend {backend} ({cookie} cookie{note})",
                client=session.client_ip,
                old=session.pinned_key,
                backend=backend.name,
                cookie=self.cookie_name.decode("ascii"),
                note="" if raw else "; the backend set no new cookie yet",
            )
        if not raw:
            return
        rewritten: List[bytes] = []
        changed = False
        for line in raw:
            first, semi, rest = line.partition(b";")
            n, eq, v = first.partition(b"=")
            if eq and n.strip() == self.cookie_name:
                inner, quoted = _unquote(v.strip())
                if inner:
                    new = self.cookie_value_for(backend, inner)
                    if quoted:
                        new = b'"' + new + b'"'
                    line = self.cookie_name + b"=" + new + semi + rest
                    changed = True
            rewritten.append(line)
        if changed:
            headers.setRawHeaders(b"set-cookie", rewritten)

    def _count_client(self, session: Session, backend: Backend, raw: Optional[List[bytes]]) -> None:
        """Count the session the client holds or is given (the backend's own value) as C{backend}'s."""
        value = session.note if isinstance(session.note, bytes) else None
        for line in raw or ():
            n, eq, v = line.partition(b";")[0].partition(b"=")
            if eq and n.strip() == self.cookie_name:
                inner, _ = _unquote(v.strip())
                if inner:
                    value = inner  # a new or rotated session: the client holds this one now
        if value:
            assert self.clients is not None  # called only when counting
            self.clients.seen(backend.id, value)


def _client_identity(session: Session, request: object) -> bytes:
    """A client of an insert cookie, for counting: its address and C{User-Agent}."""
    agent = request.requestHeaders.getRawHeaders(b"user-agent")  # type: ignore[attr-defined]
    return (session.client_ip or "").encode("utf-8") + b"\0" + (agent[0] if agent else b"")
