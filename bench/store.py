"""
The cost of the Redis store against the memory store, in the same run.

Starts a redis-server (free loopback port, persistence off), two TCP
backends that say a line and close, and two C{twistd slb} processes with the
same source_ip TCP listener: one with C{[store] type = "memory"}, one with
C{type = "redis"}.  Then, for each, two workloads of C{--connections}
connections (C{--concurrency} in flight, bounded by C{--max-seconds}):

 - C{new}: every connection from a new client address (127.20.x.y): a
   cache miss, so with Redis a lookup (GET) and a new pin (SET PX);
 - C{pinned}: connections from 50 addresses pinned beforehand: cache hits,
   whose refreshes are batched (one PEXPIRE per key per second).

It prints connections per second and the balancer's CPU time per connection
(from /proc, user + system), plus redis-server's CPU per connection.  The
client and the backends run in this process, so on a 2-core machine the
figures are relative: compare the rows of one run.

    .venv/bin/python -m bench.store --connections 3000
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

CONFIG = """
[backends.pool]
scheduler = "rr"
servers = [ {servers} ]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "pool"
persistence = {{ type = "source_ip", timeout = 600 }}

{store}
"""


class _Name(LineOnlyReceiver):
    def connectionMade(self):
        self.sendLine(b"backend=" + self.factory.name)
        self.transport.loseConnection()


class _Client(LineOnlyReceiver):
    def __init__(self):
        self.done = defer.Deferred()

    def lineReceived(self, line):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(None)


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Twistd(protocol.ProcessProtocol):
    def __init__(self):
        self.output = ""
        self.port = defer.Deferred()

    def outReceived(self, data):
        self.output += data.decode("utf-8", "replace")
        m = re.search(r"listener tcp \(tcp\) listening on 127\.0\.0\.1:(\d+)", self.output)
        if m and not self.port.called:
            self.port.callback(int(m.group(1)))

    errReceived = outReceived


def _address(n: int) -> str:
    return f"127.20.{n // 250 % 250}.{n % 250 + 1}"


async def _run_load(port: int, sources, concurrency: int, max_seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + max_seconds
    queue = iter(sources)

    async def worker():
        nonlocal done
        for source in queue:
            if time.monotonic() > deadline:
                return
            client = _Client()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
            await connectProtocol(endpoint, client)
            await client.done
            done += 1

    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    return done


async def main(args) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.redisserver import RedisServer

    redis = RedisServer().start()
    procs = []
    try:
        servers = []
        for name in (b"a", b"b"):
            factory = protocol.ServerFactory.forProtocol(_Name)
            factory.name = name
            listening = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
            servers.append(f'{{ name = "{name.decode()}", address = "127.0.0.1:{listening.getHost().port}" }}')
        stores = {
            "memory": "",
            "redis": f'[store]\ntype = "redis"\nurl = "{redis.url}"\n',
        }
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        balancers = {}
        for kind, store in stores.items():
            path = os.path.join(tempfile.mkdtemp(), f"{kind}.toml")
            with open(path, "w") as f:
                f.write(CONFIG.format(servers=", ".join(servers), store=store))
            proc = _Twistd()
            transport = reactor.spawnProcess(proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path],
                                             env=os.environ.copy())
            procs.append(transport)
            balancers[kind] = (transport.pid, await proc.port)
        await task.deferLater(reactor, 1.0, lambda: None)  # the redis one connects
        pinned = [f"127.21.0.{n}" for n in range(1, 51)]
        rows = []
        for workload in ("new", "pinned"):
            for kind, (pid, port) in balancers.items():
                if workload == "pinned":
                    await _run_load(port, pinned, 10, args.max_seconds)  # pin them first
                    sources = [pinned[i % len(pinned)] for i in range(args.connections)]
                else:
                    base = {"memory": 0, "redis": 100_000}[kind]
                    sources = [_address(base + i) for i in range(args.connections)]
                cpu, redis_cpu, started = _cpu(pid), _cpu(redis.process.pid), time.monotonic()
                done = await _run_load(port, sources, args.concurrency, args.max_seconds)
                elapsed = time.monotonic() - started
                cpu, redis_cpu = _cpu(pid) - cpu, _cpu(redis.process.pid) - redis_cpu
                rows.append((workload, kind, done, done / elapsed, cpu / done * 1e6,
                             redis_cpu / done * 1e6 if kind == "redis" else 0.0))
        print(f"{'workload':8} {'store':7} {'conns':>6} {'conn/s':>8} {'slb us CPU/conn':>16} {'redis us CPU/conn':>18}")
        for workload, kind, done, rate, cpu, rcpu in rows:
            print(f"{workload:8} {kind:7} {done:6d} {rate:8.0f} {cpu:16.1f} {rcpu:18.1f}")
    finally:
        for transport in procs:
            transport.signalProcess("TERM")
        await task.deferLater(reactor, 1.0, lambda: None)
        redis.stop()


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=3000, help="connections per row (default 3000)")
    parser.add_argument("--concurrency", type=int, default=20, help="connections in flight (default 20)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="cap on each row (default 30)")
    args = parser.parse_args(argv)
    task.react(lambda _: defer.ensureDeferred(main(args)))
    return 0


if __name__ == "__main__":
    sys.exit(run())
