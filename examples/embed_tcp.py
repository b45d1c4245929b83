"""
Embedding the TCP balancer in a Twisted program, with source-IP persistence.

    python examples/embed_tcp.py 127.0.0.1:9101 127.0.0.1:9102 [--listen tcp:8082:interface=127.0.0.1]
"""

import sys

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred

from twisted_slb import Backend, BackendGroup, SourceIPPersistence, StickTable, TCPBalancerFactory


async def main(reactor, *argv):
    listen = argv[argv.index("--listen") + 1] if "--listen" in argv else "tcp:8082:interface=127.0.0.1"
    addresses = [a for a in argv if ":" in a and not a.startswith(("tcp:", "--"))]
    group = BackendGroup("echo", [Backend(f"b{i}", a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1]))
                                  for i, a in enumerate(addresses)])
    factory = TCPBalancerFactory(group, SourceIPPersistence(StickTable(timeout=1000)))
    port = await endpoints.serverFromString(reactor, listen).listen(factory)
    print(f"balancing TCP on 127.0.0.1:{port.getHost().port}", flush=True)
    await Deferred()  # serve until interrupted


task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
