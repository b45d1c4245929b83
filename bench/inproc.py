"""
The CPU cost of one proxied HTTP request in twisted_slb's own code, without
sockets, kernel or load generator:

    python -m bench.inproc [--requests 20000] [--repeat 5] [--profile]
                           [--response FILE] [--access-log FILE]

An HTTP listener's server (L{twisted_slb.web.front}) with insert-cookie
persistence in front of the proxy, two backends, keep-alive on both sides,
in memory (Twisted's L{MemoryReactorClock} and L{StringTransport}): each
round feeds one request (what C{wrk} sends) to the client connection and
one response (what nginx answers) to the backend connection that got it.
It prints the best of C{--repeat} runs in microseconds per request.
C{--response FILE} makes the backends answer with the bytes of FILE instead
(one whole HTTP/1.1 response); an answer the client does not get as a 200
stops the run with an error: a benchmark of errors is worthless.
C{--access-log FILE} turns the access log on, written as under twistd (its
file observer on FILE, lines in batches by L{twisted_slb.accesslog.TwistdLog}):
the difference from a run without it is what a line costs.

It measures what the load benchmark cannot isolate on a shared machine:
the effect of a change to the request path, to within a few percent.  The
reactor, the transports and the kernel are not in it: on CPython its figure
is a little under half of the real cost per request.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Optional

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile

from twisted_slb.accesslog import TwistdLog
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.cookies import InsertCookie
from twisted_slb.web.front import HTTPFrontFactory
from twisted_slb.web.proxy import BalancedProxyResource
from twisted_slb.web.upstream import UpstreamPool

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 03:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"hello from 0\n"
)


class Rig:
    """A client connection to an HTTP listener, and its backend connections."""

    def __init__(self, response: bytes = RESPONSE, access_log: Optional[str] = None) -> None:
        self.response = response
        self.reactor = MemoryReactorClock()
        group = BackendGroup("web", [Backend("a", "127.0.0.1", 8001), Backend("b", "127.0.0.1", 8002)])
        access_file = None
        if access_log:
            # As twistd: one file observer, which TwistdLog writes behind.
            publisher = LogPublisher(textFileLogObserver(LogFile.fromFullPath(access_log)))
            access_file = TwistdLog(reactor=self.reactor, publisher=publisher)
            if not access_file.resolve():
                raise RuntimeError("the access log found no twistd-like observer")
        proxy = BalancedProxyResource(group, reactor=self.reactor, pool=UpstreamPool(self.reactor),
                                      access_log=access_log is not None, access_file=access_file)
        resource = InsertCookie(proxy, reactor=self.reactor)
        factory = HTTPFrontFactory(resource, reactor=self.reactor)
        client = IPv4Address("TCP", "127.0.0.1", 40000)
        self.front = factory.buildProtocol(client)
        self.client = StringTransport(peerAddress=client)
        self.front.makeConnection(self.client)
        self.upstreams = []  # (protocol, transport)

    def one(self) -> None:
        """One request through, answered."""
        self.front.dataReceived(REQUEST)
        while self.reactor.tcpClients:
            # A new backend connection: make it, as the reactor would.
            host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
            proto = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
            proto.makeConnection(transport)
            self.upstreams.append((proto, transport))
        for proto, transport in self.upstreams:
            if transport.value():
                transport.clear()
                proto.dataReceived(self.response)
                break
        else:
            raise RuntimeError("no backend connection got the request")
        out = self.client.value()
        if not out.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"unexpected answer: {out[:200]!r}")
        self.client.clear()


def measure(requests: int, repeat: int, warmup: int = 1000, response: bytes = RESPONSE,
            access_log: Optional[str] = None) -> float:
    """The best of C{repeat} runs, in microseconds of CPU per request."""
    rig = Rig(response, access_log)
    for _ in range(warmup):  # warm-up (and, on PyPy, the JIT)
        rig.one()
    # What the start-up left on the heap (imports, the rig) is not the
    # request path's: keep the collector from walking it during the runs.
    gc.collect()
    if hasattr(gc, "freeze"):  # not on PyPy
        gc.freeze()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(requests):
            rig.one()
        rig.reactor.advance(1)  # (the access log's batch is written)
        best = min(best, (time.process_time() - start) / requests * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1000, help="requests before measuring (default 1000)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run instead")
    parser.add_argument("--response", metavar="FILE", help="the backends' answer: a whole HTTP/1.1 response")
    parser.add_argument("--access-log", metavar="FILE", help="access log on, to FILE as under twistd")
    args = parser.parse_args(argv)
    response = RESPONSE
    if args.response:
        with open(args.response, "rb") as f:
            response = f.read()
    try:
        return run(args, response)
    except RuntimeError as e:
        print(f"bench.inproc: {e}", file=sys.stderr)
        return 1


def run(args, response: bytes) -> int:
    if args.profile:
        import cProfile
        import pstats

        rig = Rig(response, args.access_log)
        rig.one()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.requests):
            rig.one()
        rig.reactor.advance(1)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    print(f"{measure(args.requests, args.repeat, args.warmup, response, args.access_log):.1f} us of CPU per proxied request (best of {args.repeat})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
