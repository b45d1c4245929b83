"""
A Twisted web application that serves its own pages and mounts the balancer
under /app, with insert-cookie persistence.

    python examples/embed_web.py 127.0.0.1:9001 127.0.0.1:9002 [--listen tcp:8080:interface=127.0.0.1]

Then: curl http://127.0.0.1:8080/ (the app's own page) and
curl -c jar -b jar http://127.0.0.1:8080/app/ (proxied, sticky; the backends
receive the full path, /app/...).
"""

import sys

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from twisted_slb import Backend, BackendGroup, BalancedProxyResource, InsertCookie


async def main(reactor, *argv):
    listen = argv[argv.index("--listen") + 1] if "--listen" in argv else "tcp:8080:interface=127.0.0.1"
    addresses = [a for a in argv if ":" in a and not a.startswith(("tcp:", "--"))]
    group = BackendGroup("app", [Backend(f"b{i}", a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1]))
                                 for i, a in enumerate(addresses)])
    root = Resource()
    root.putChild(b"", Data(b"this page is the application's own\n", "text/plain"))
    root.putChild(b"app", InsertCookie(BalancedProxyResource(group), name=b"SERVERID", timeout=3600))
    port = await endpoints.serverFromString(reactor, listen).listen(Site(root))
    print(f"serving on 127.0.0.1:{port.getHost().port}", flush=True)
    await Deferred()


task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
