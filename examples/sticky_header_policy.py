"""
A persistence policy of your own, in a few lines: stick on a request header.

Every request carrying the same C{X-User-Id} goes to the same backend, with
no cookie and no table: the backend is chosen by rendezvous (highest random
weight) hashing of the header value over the group, so several balancer
processes agree, and when a backend goes down only its users move (each to
its own second choice).  Requests without the header are balanced as usual.

Run (with two backends listening, e.g. the demo backends:
C{twistd -n --pidfile= slb-demo-backend --name a --port 9001}, and b on 9002)::

    python examples/sticky_header_policy.py 127.0.0.1:9001 127.0.0.1:9002

then::

    for i in 1 2 3 4 5; do curl -s -H 'X-User-Id: alice' http://127.0.0.1:8080/; done
    for i in 1 2 3 4 5; do curl -s -H 'X-User-Id: bob' http://127.0.0.1:8080/; done

Options: C{--listen ENDPOINT} (default C{tcp:8080:interface=127.0.0.1}),
C{--header NAME} (default C{X-User-Id}).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import List, Optional

from twisted.internet import defer, endpoints, task
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site
from zope.interface import implementer

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session
from twisted_slb.persistence.resource import PersistenceResource


@implementer(IPersistencePolicy)
class StickyHeader(PersistenceResource):
    """
    Pins each value of a request header to one backend of C{group}.

    The two methods of L{IPersistencePolicy} are all there is: C{find} names
    the backend, C{remember} has nothing to record because the header is the
    pin.  Wrap the proxy with it: C{Site(StickyHeader(proxy, group))}.
    """

    name = "sticky_header"

    def __init__(self, wrapped, group: BackendGroup, header: bytes = b"x-user-id") -> None:
        PersistenceResource.__init__(self, wrapped)
        self.group = group
        self.header = header

    def find(self, session: Session) -> Optional[str]:
        value = session.request.getHeader(self.header)
        if not value:
            return None  # no header: balanced by the group's scheduler

        def score(backend: Backend) -> bytes:
            return hashlib.sha256(backend.id.encode("ascii") + b"\0" + value).digest()

        for backend in sorted(self.group.backends, key=score, reverse=True):
            if backend.takes_pinned_clients:
                return backend.id
        return None

    def remember(self, session: Session, backend: Backend) -> None:
        pass


def parse_backends(addresses: List[str]) -> List[Backend]:
    backends = []
    for i, address in enumerate(addresses, 1):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"backend address {address!r} is not HOST:PORT")
        backends.append(Backend(f"backend-{i}", host.strip("[]"), int(port)))
    return backends


async def main(reactor, argv: List[str]) -> None:
    from twisted_slb.web.proxy import BalancedProxyResource

    parser = argparse.ArgumentParser(description="Stick clients to a backend by a request header.")
    parser.add_argument("backends", nargs="+", help="HOST:PORT of each backend")
    parser.add_argument("--listen", default="tcp:8080:interface=127.0.0.1", help="a Twisted server endpoint")
    parser.add_argument("--header", default="X-User-Id", help="the request header to stick on")
    args = parser.parse_args(argv)

    group = BackendGroup("example", parse_backends(args.backends))
    resource = StickyHeader(BalancedProxyResource(group), group, header=args.header.lower().encode("ascii"))
    port = await endpoints.serverFromString(reactor, args.listen).listen(Site(resource))
    print(f"listening on {port.getHost()}; try: curl -H '{args.header}: alice' http://127.0.0.1:{port.getHost().port}/")
    await defer.Deferred()  # run until interrupted


if __name__ == "__main__":
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
