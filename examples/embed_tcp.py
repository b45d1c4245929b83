"""
Embedding the TCP balancer in a Twisted program, with source-IP persistence:

    python examples/embed_tcp.py 127.0.0.1:9001 127.0.0.1:9002 [--listen ENDPOINT]

Listens on tcp:8081:interface=127.0.0.1 unless --listen names another
server endpoint (for example when the demo already holds port 8081).
"""

import sys

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import CannotListenError

from twisted_slb import Backend, BackendGroup, SourceIPPersistence, StickTable, TCPBalancerFactory


def backend(number: int, address: str) -> Backend:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"embed_tcp.py: not a HOST:PORT backend address: {address!r}")
    return Backend(f"b{number}", host.strip("[]"), int(port))


async def main(reactor, listen: str, addresses: list) -> None:
    group = BackendGroup("echo", [backend(n, a) for n, a in enumerate(addresses, 1)])
    factory = TCPBalancerFactory(group, SourceIPPersistence(StickTable(timeout=1000)), reactor=reactor)
    try:
        port = await endpoints.serverFromString(reactor, listen).listen(factory)
    except CannotListenError as e:
        raise SystemExit(f"embed_tcp.py: {e} (try --listen tcp:PORT:interface=127.0.0.1)")
    print(f"balancing TCP on {port.getHost().host}:{port.getHost().port} over {len(addresses)} backends", flush=True)
    await Deferred()  # serve until interrupted


args = sys.argv[1:]
listen = args.pop(args.index("--listen") + 1) if "--listen" in args[:-1] else "tcp:8081:interface=127.0.0.1"
addresses = [a for a in args if a != "--listen"]
if not addresses:
    raise SystemExit(__doc__)
task.react(lambda reactor: ensureDeferred(main(reactor, listen, addresses)))
