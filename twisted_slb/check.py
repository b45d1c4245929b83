"""
C{slb-check}: the FAQ's persistence test, with a verdict::

    slb-check URL [-n 30] [--interval 0] [--cookie NAME] [--match REGEX]
              [--no-jar] [--json] [--source ADDR] [--timeout 10]
              [--header NAME:VALUE]... [--admin ADMIN_URL] [--backend-header NAME]
    slb-check --tcp HOST:PORT [-n 30] [--source ADDR] [--match REGEX] [--json]

The first request saves the cookies in a jar; the next N send them (unless
C{--no-jar}).  Each response is attributed to a backend, in this order:
C{--match}, the listener's C{backend_header} (C{--backend-header}, default
C{X-Backend}), a C{backend=NAME} in the body (the demo backends' page), the
persistence cookie's value (the backend's opaque id).  With C{--admin}, the
admin listener's C{/stats} turns ids into backend names.
With C{--header NAME:VALUE} (repeatable) every request carries that header:
the check of header persistence, where no cookie is set.
Exit status: 0 when every request reached one backend, 1 when not, 2 on
usage or connection errors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict, List, Optional, TextIO, Tuple

import attr
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from twisted_slb._typing import IStreamTransport

_DEMO = re.compile(rb"backend=([\w.-]+)")
_REWRITTEN = re.compile(r"^[0-9a-f]{16}~")


class UsageFailure(Exception):
    """Bad arguments: exit 2 with this message."""


@attr.s(auto_attribs=True)
class Visit:
    n: int
    status: int
    backend: Optional[str]
    set_cookies: Dict[str, Optional[str]]  # None: the response deletes the cookie
    note: str = ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slb-check", description="Check session persistence the way the FAQ does.")
    p.add_argument("url", nargs="?", help="the page to request (HTTP or HTTPS)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="check a TCP listener's source-IP persistence instead")
    p.add_argument("-n", type=int, default=30, help="requests after the first (default 30)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between requests")
    p.add_argument("--cookie", help="the persistence cookie's name (default: SERVERID, or a rewritten cookie)")
    p.add_argument("--match", help="regular expression on the body naming the backend (group 1 or the whole match)")
    p.add_argument("--no-jar", action="store_true", help="do not send cookies back (what curl does without -b)")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.add_argument("--source", help="local address to connect from (e.g. 127.0.0.5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="send this header with every request (header persistence: --header X-Session-Id:abc)")
    p.add_argument("--admin", metavar="ADMIN_URL",
                   help="the balancer's admin listener (http://127.0.0.1:8083/): its /stats names the backends "
                        "behind the cookies' opaque ids")
    p.add_argument("--backend-header", default="X-Backend",
                   help="the response header naming the backend (the listener's backend_header; default X-Backend)")
    return p


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = _parser()

    def error(message):
        raise UsageFailure(f"slb-check: {message}\n{parser.format_usage().strip()}")

    # argparse would exit; we return 2 ourselves (the instance's method is
    # replaced on purpose, which mypy refuses).
    parser.error = error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    if (args.url is None) == (args.tcp is None):
        error("give a URL, or --tcp HOST:PORT")
    if args.n < 1:
        error("-n must be at least 1")
    args.headers = []
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", name.strip()):
            error(f"--header wants NAME:VALUE with NAME a header name, not {header!r}")
        if args.tcp:
            error("--header is for HTTP checks, not --tcp")
        args.headers.append((name.strip().encode("latin-1"), value.strip().encode("latin-1")))
    if args.match:
        try:
            args.match_re = re.compile(args.match.encode("utf-8"))
        except re.error as e:
            error(f"--match is not a valid regular expression: {e}")
    else:
        args.match_re = None
    return args


def _identify(args, body: bytes, cookie_value: Optional[str], header: Optional[bytes] = None) -> Optional[str]:
    if args.match_re is not None:
        m = args.match_re.search(body)
        if m is None:
            return None
        return (m.group(1) if m.groups() else m.group(0)).decode("utf-8", "replace")
    if header:
        return header.decode("utf-8", "replace")
    m = _DEMO.search(body)
    if m:
        return m.group(1).decode("utf-8", "replace")
    if cookie_value:
        return cookie_value.split("~", 1)[0] if _REWRITTEN.match(cookie_value) else cookie_value.split(".", 1)[0]
    return None


def _parse_set_cookies(values: List[bytes]) -> Dict[str, Optional[str]]:
    """Cookie name -> value, or L{None} for a cookie the response deletes (Max-Age=0)."""
    out: Dict[str, Optional[str]] = {}
    for raw in values:
        text = raw.decode("latin-1")
        pair = text.split(";", 1)[0]
        name, _, value = pair.partition("=")
        deleted = re.search(r";\s*max-age\s*=\s*0\b", text, re.I)
        out[name.strip()] = None if deleted else value.strip()
    return out


def _persistence_cookie(args, jar: Dict[str, str]) -> Optional[str]:
    if args.cookie:
        return args.cookie
    if "SERVERID" in jar:
        return "SERVERID"
    for name, value in jar.items():
        if value and _REWRITTEN.match(value):
            return name
    return None


def backend_names(stats: dict) -> Dict[str, str]:
    """The id-to-name map of every backend in an admin listener's C{/stats} document."""
    names = {}
    for group in stats.get("groups", []):
        for backend in group.get("backends", []):
            if backend.get("id") and backend.get("name"):
                names[backend["id"]] = backend["name"]
    return names


@defer.inlineCallbacks
def _admin_names(args, reactor):
    """Read the id-to-name map from C{args.admin}'s C{/stats}."""
    url = args.admin.rstrip("/") + "/stats"
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False), connectTimeout=args.timeout)
    try:
        d = agent.request(b"GET", url.encode("utf-8"), Headers({b"user-agent": [b"slb-check"]}))
        d.addTimeout(args.timeout, reactor)
        response = yield d
        body = yield readBody(response)
    except Exception as e:
        raise UsageFailure(f"slb-check: --admin {args.admin}: {e}") from None
    if response.code != 200:
        raise UsageFailure(f"slb-check: --admin {args.admin}: {url} answered {response.code}")
    try:
        return backend_names(json.loads(body))
    except (ValueError, AttributeError):
        raise UsageFailure(f"slb-check: --admin {args.admin}: {url} is not an admin listener's /stats") from None


@defer.inlineCallbacks
def _check_http(args, reactor, out: TextIO):
    names = (yield _admin_names(args, reactor)) if args.admin else {}
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool, connectTimeout=args.timeout,
                  bindAddress=(args.source, 0) if args.source else None)
    jar: Dict[str, str] = {}
    visits: List[Visit] = []
    url = args.url.encode("utf-8")
    for i in range(args.n + 1):
        headers = Headers({b"user-agent": [b"slb-check"]})
        for name, value in args.headers:
            headers.addRawHeader(name, value)
        if jar and not args.no_jar:
            headers.addRawHeader(b"cookie", "; ".join(f"{k}={v}" for k, v in jar.items()).encode("latin-1"))
        d = agent.request(b"GET", url, headers)
        d.addTimeout(args.timeout, reactor)
        response = yield d
        body = yield readBody(response)
        set_cookies = _parse_set_cookies(response.headers.getRawHeaders(b"set-cookie", []))
        for name, value in set_cookies.items():
            if value is None:
                jar.pop(name, None)
            else:
                jar[name] = value
        name = _persistence_cookie(args, jar)
        header = (response.headers.getRawHeaders(args.backend_header.encode("latin-1")) or [None])[-1]
        backend = _identify(args, body, jar.get(name) if name else None, header)
        visits.append(Visit(i, response.code, names.get(backend, backend), set_cookies))
        if args.interval and i < args.n:
            yield task.deferLater(reactor, args.interval, lambda: None)
    return visits, _persistence_cookie(args, jar)


class _FirstLine(Protocol):
    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    def __init__(self) -> None:
        self.buffer = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.done.called:
            self.done.callback(self.buffer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.buffer)


@defer.inlineCallbacks
def _check_tcp(args, reactor, out: TextIO):
    host, _, port = args.tcp.rpartition(":")
    if not host or not port.isdigit():
        raise UsageFailure(f"slb-check: --tcp wants HOST:PORT, not {args.tcp!r}")
    visits: List[Visit] = []
    for i in range(args.n + 1):
        endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=args.timeout,
                                      bindAddress=(args.source, 0) if args.source else None)
        proto = _FirstLine()
        yield connectProtocol(endpoint, proto)
        d = proto.done
        d.addTimeout(args.timeout, reactor)
        data = yield d
        visits.append(Visit(i, 0, _identify(args, data, None), {}))
        if args.interval and i < args.n:
            yield task.deferLater(reactor, args.interval, lambda: None)
    return visits, None


def _verdict(visits: List[Visit], cookie: Optional[str], tcp: bool, headers=()) -> Tuple[bool, str]:
    first = visits[0]
    unknown = [v for v in visits if v.backend is None]
    if unknown:
        return False, (f"request {unknown[0].n}: could not tell which backend answered "
                       "(use --match REGEX, or --cookie NAME)")
    if not tcp and not headers and cookie is None and len({v.backend for v in visits}) > 1:
        return False, "no persistence cookie was set by the first response: is persistence enabled on this listener?"
    for prev, v in zip(visits, visits[1:]):
        if v.backend != prev.backend:
            why = ""
            if cookie and cookie in v.set_cookies:
                why = f": the response (status {v.status}) set a new {cookie}"
            elif headers:
                sent = ", ".join(f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in headers)
                why = f" with the same {sent}: is header persistence enabled on this listener?"
            elif not tcp:
                why = " without any Set-Cookie of the persistence cookie"
            return False, f"request {v.n}: backend changed {prev.backend} -> {v.backend}{why}"
    return True, f"persistent: {len(visits) - 1}/{len(visits) - 1} on backend {first.backend}"


def run(argv: List[str], reactor, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> defer.Deferred:
    """Run slb-check; the L{Deferred} fires with the exit status."""
    try:
        args = _parse(argv)
    except UsageFailure as e:
        err.write(f"{e}\n")
        return defer.succeed(2)
    d = _check_tcp(args, reactor, out) if args.tcp else _check_http(args, reactor, out)

    def report(result):
        visits, cookie = result
        ok, verdict = _verdict(visits, cookie, bool(args.tcp), args.headers)
        if args.json:
            json.dump({
                "target": args.url or args.tcp,
                "persistent": ok,
                "verdict": verdict,
                "cookie": cookie,
                "requests": [attr.asdict(v) for v in visits],
            }, out, indent=2)
            out.write("\n")
        else:
            out.write(f"{'#':>3}  {'status':>6}  {'backend':<20} note\n")
            for v in visits:
                note = "first request" if v.n == 0 else ""
                if cookie and cookie in v.set_cookies and v.n:
                    note = f"set a new {cookie}"
                out.write(f"{v.n:>3}  {v.status or '-':>6}  {str(v.backend):<20} {note}\n")
            out.write(verdict + "\n")
        return 0 if ok else 1

    def failed(f):
        if f.check(UsageFailure):
            err.write(f"{f.value}\n")
        else:
            err.write(f"slb-check: {args.url or args.tcp}: {f.getErrorMessage() or f.type.__name__}\n")
        return 2

    return d.addCallbacks(report, failed)


def main(argv: Optional[List[str]] = None) -> None:
    """The console script."""
    argv = sys.argv[1:] if argv is None else argv
    task.react(lambda reactor: run(argv, reactor).addCallback(_exit))


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
