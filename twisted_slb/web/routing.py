"""
Forwarding rules for HTTP listeners, and the HTTP-to-HTTPS redirect.

A listener with C{[[listeners.X.rules]]} gets a L{RuleRouter}: the first
L{Route} whose domain matches the request's C{Host} and whose path prefix
matches its path renders the request; each route has its own backend group
and persistence (its resource is a persistence wrapper around a proxy).  This
is how different domains get different persistence rules (the FAQ's
question 5).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource, getChildForRequest

if TYPE_CHECKING:
    from twisted_slb.backends import BackendGroup

log = Logger(namespace="twisted_slb.web.routing")

#: A host name (letters, digits, hyphens, underscores, dots) or an IPv6
#: literal in brackets, with an optional port.
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::([0-9]{1,5}))?$")

_DOMAIN_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^\[[0-9a-f:.]+\]$")


def _absolute_target(request: IRequest):
    """The split request target when the client sent an absolute URI."""
    uri = request.uri
    if uri.startswith(b"/") or b"://" not in uri:
        return None
    return urlsplit(uri)


def request_host(request: IRequest) -> Optional[str]:
    """
    The host a request asked for: its C{Host} header (or, for an absolute
    request target, the URI's authority, which RFC 9112 3.2.2 says wins)
    without the port, lowercased, without a trailing dot.

    @return: the host (an IPv6 literal keeps its brackets), or L{None} when
        the header is missing or is not a valid host.
    """
    absolute = _absolute_target(request)
    raw = absolute.netloc if absolute is not None and absolute.netloc else request.getHeader(b"host")
    if raw is None:
        return None
    match = _HOST.match(raw.strip())
    if match is None:
        return None
    host = match.group(1).decode("ascii").lower()
    if host.endswith(".") and not host.startswith("["):
        host = host[:-1]
    return host or None


def request_path(request: IRequest) -> bytes:
    """The path of a request, without the query, as the client sent it."""
    absolute = _absolute_target(request)
    if absolute is not None:
        return absolute.path or b"/"
    return request.uri.split(b"?", 1)[0]


def _check_domain(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    if domain and not _DOMAIN_PATTERN.match(domain):
        raise ValueError(
            f"route domain {domain!r} is not a host name, '*.' followed by a domain, or '' (any host)"
        )
    return domain


def _check_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"route path {path!r} must start with '/'")
    return path


@attr.s(frozen=True, auto_attribs=True)
class Route:
    """
    One forwarding rule.

    @ivar domain: C{""} for any host; C{"app.example.com"} for that host
        exactly; C{"*.example.com"} for any host with exactly one more label
        (C{a.example.com}, not C{example.com} nor C{a.b.example.com}).
        Compared with the C{Host} header without its port, case-insensitively.
    @ivar path: a path prefix, matched segment by segment: C{"/api"} matches
        C{/api}, C{/api/} and C{/api/x}, not C{/apix}; a trailing slash makes
        no difference (C{"/api/"} is C{"/api"}); C{"/"} matches every path.
        The path is compared as the client sent it (percent-encoding
        included), case-sensitively.
    @ivar resource: what renders a matching request.
    """

    domain: str = attr.ib(converter=_check_domain)
    path: str = attr.ib(converter=_check_path)
    resource: IResource = attr.ib()
    _prefix: bytes = attr.ib(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_prefix", self.path.rstrip("/").encode("utf-8"))

    def matches_host(self, host: Optional[str]) -> bool:
        """Whether C{host} (as given by L{request_host}) matches C{domain}."""
        if not self.domain:
            return True
        if host is None:
            return False
        if self.domain.startswith("*."):
            suffix = self.domain[1:]
            label = host[: -len(suffix)]
            return host.endswith(suffix) and bool(label) and "." not in label
        return host == self.domain

    def matches_path(self, path: bytes) -> bool:
        """Whether the request path C{path} (no query) is under C{path}."""
        prefix = self._prefix
        if not prefix:
            return True
        return path == prefix or path.startswith(prefix + b"/")


class RuleRouter(Resource):
    """
    Renders each request with the first matching L{Route}, else C{default}.

    A request no route matches, without a default, gets a 404 with a short
    body.

    @ivar routes: the routes, first match wins.
    @ivar default: the resource for requests no route matches, or L{None}.
    """

    isLeaf = True

    def __init__(self, routes: Sequence[Route], default: Optional[IResource] = None) -> None:
        Resource.__init__(self)
        self.routes: Tuple[Route, ...] = tuple(routes)
        self.default = default

    def route_for(self, request: IRequest) -> Optional[IResource]:
        """The resource that should render C{request}, or L{None}."""
        host = request_host(request)
        path = request_path(request)
        for route in self.routes:
            if route.matches_host(host) and route.matches_path(path):
                return route.resource
        return self.default

    def render(self, request: IRequest) -> bytes:
        resource = self.route_for(request)
        if resource is None:
            log.info(
                "no route for host {host!r} path {path!r}",
                host=request.getHeader(b"host"),
                path=request_path(request),
            )
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"404 Not Found: no route for this host and path.\n"
        return getChildForRequest(resource, request).render(request)


class HTTPSRedirectResource(Resource):
    """
    Sends every request to the same URL over HTTPS with a 301.

    C{http://example.com:8080/a?b=1} becomes C{https://example.com/a?b=1}
    (or C{https://example.com:8443/a?b=1} with C{port=8443}).  A request
    without a valid C{Host} header gets a 400: there is nowhere to send it.

    @ivar port: the HTTPS port, left out of the URL when it is 443.
    """

    isLeaf = True

    def __init__(self, port: int = 443) -> None:
        Resource.__init__(self)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"HTTPS redirect port {port!r} is not a port number (1..65535)")
        self.port = port

    def location_for(self, request: IRequest) -> Optional[bytes]:
        """The HTTPS URL for C{request}, or L{None} without a valid host."""
        host = request_host(request)
        if host is None:
            return None
        target = request.uri
        absolute = _absolute_target(request)
        if absolute is not None:
            # Absolute form (GET http://host/path HTTP/1.1): keep path and query.
            target = (absolute.path or b"/") + (b"?" + absolute.query if absolute.query else b"")
        elif not target.startswith(b"/"):
            # "*" (OPTIONS) or garbage: send the client to the site's root.
            target = b"/"
        netloc = host.encode("ascii")
        if self.port != 443:
            netloc += b":%d" % (self.port,)
        return b"https://" + netloc + target

    def render(self, request: IRequest) -> bytes:
        location = self.location_for(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if location is None:
            request.setResponseCode(400)
            return b"400 Bad Request: a Host header is needed to redirect to HTTPS.\n"
        request.setResponseCode(301)
        request.setHeader(b"location", location)
        return b"Moved to " + location + b"\n"


@attr.s(auto_attribs=True)
class SplitStats:
    """
    What a L{GroupSplit} counts, per group name (kept across reloads by the
    service, so that the counts of a split whose weights change go on).

    @ivar clients: new clients given to each group by weight (a client
        without a usable pin, one per visit for a split without
        persistence).
    @ivar requests: requests each group served, pinned or not.
    """

    clients: dict = attr.ib(factory=dict)
    requests: dict = attr.ib(factory=dict)

    def snapshot(self) -> dict:
        return {"clients": dict(self.clients), "requests": dict(self.requests)}


@attr.s(auto_attribs=True)
class SplitChoice:
    """
    One group of a L{GroupSplit}: the group (a
    L{twisted_slb.backends.BackendGroup}, for its C{name} and C{get}), its
    weight, and the resource that proxies to it.
    """

    group: BackendGroup
    weight: int
    resource: IResource


class GroupSplit(Resource):
    """
    A weighted split between backend groups that keeps each client in its
    group: a canary release (90 % stable, 10 % canary) with sticky sessions.

    Put a persistence wrapper in front of it.  A request whose pin (the
    L{Session}'s C{pinned_key}, a backend id) names a backend of one of the
    groups is rendered by that group's resource, whatever the weights are now,
    so that changing them moves only new clients; that group then keeps the
    client on its backend, or re-pins it within the group when the backend
    is down.  Any other request is given a group by smooth weighted round
    robin over the weights (a group of weight 0 takes no new clients), and
    its resource chooses a backend.  Backend ids must be unique across the
    groups (the configuration checks that backend names are).

    @ivar choices: the L{SplitChoice}s.
    @ivar stats: the L{SplitStats}.
    """

    isLeaf = True

    def __init__(self, choices: Sequence[SplitChoice], stats: Optional[SplitStats] = None) -> None:
        Resource.__init__(self)
        if not choices or not any(c.weight > 0 for c in choices):
            raise ValueError("a split needs at least one group with a weight above 0")
        if any(c.weight < 0 for c in choices):
            raise ValueError("split weights must be 0 or more")
        self.choices: Tuple[SplitChoice, ...] = tuple(choices)
        self.stats = stats if stats is not None else SplitStats()
        self._current = [0] * len(self.choices)

    def pinned_choice(self, key: Optional[str]) -> Optional[SplitChoice]:
        """The group whose backend C{key} names, or L{None}."""
        if key is None:
            return None
        for choice in self.choices:
            if choice.group.get(key) is not None:
                return choice
        return None

    def pick(self) -> SplitChoice:
        """The group of a new client: smooth weighted round robin over the weights."""
        current = self._current
        total = 0
        best = 0
        for i, choice in enumerate(self.choices):
            current[i] += choice.weight
            total += choice.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return self.choices[best]

    def render(self, request: IRequest) -> object:
        from twisted_slb.persistence.interfaces import session_for

        session = session_for(request)
        choice = self.pinned_choice(session.pinned_key)
        stats = self.stats
        if choice is None:
            choice = self.pick()
            name = choice.group.name
            stats.clients[name] = stats.clients.get(name, 0) + 1
        name = choice.group.name
        stats.requests[name] = stats.requests.get(name, 0) + 1
        return getChildForRequest(choice.resource, request).render(request)

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.group.name}={c.weight}" for c in self.choices)
        return f"<GroupSplit {parts}>"
