# -*- test-case-name: tests.test_store -*-
"""
Stick tables shared through Redis (L{twisted_slb.persistence.store}).

The seam (a policy's C{find} answering a L{Deferred}) is tested in memory;
the store itself against a real C{redis-server} that each test starts on a
free loopback port with persistence off (L{tests.redisserver}), never a
mock; then two balancers in one process, and two C{twistd slb} processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Dict, List

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ServerFactory
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from tests.redisserver import redis_server
from tests.test_service import NameEcho, NameLineClient, ServiceTestCase
from tests.test_tcp import RelayCase
from tests.test_twistd import Twistd
from twisted_slb.backends import backend_id
from twisted_slb.config import ConfigError, parse_config
from twisted_slb.persistence.interfaces import Session, pinned_now
from twisted_slb.persistence.sourceip import SourceIPPersistence
from twisted_slb.persistence.store import RedisStore, SharedStickTable
from twisted_slb.persistence.tables import IStickTable, StickTable
from zope.interface.verify import verifyObject


def wait_until(predicate, timeout: float = 30.0, step: float = 0.05) -> defer.Deferred:
    """Fires once C{predicate()} is true (checked every C{step} s); fails after C{timeout} s."""

    async def run():
        waited = 0.0
        while not predicate():
            if waited >= timeout:
                raise AssertionError(f"not true within {timeout} s: {predicate}")
            await task.deferLater(reactor, step, lambda: None)
            waited += step

    return defer.ensureDeferred(run())


# -- the seam, in memory ------------------------------------------------------


class _AskingTable(StickTable):
    """A stick table whose misses are answered by a L{Deferred} the test fires."""

    def __init__(self) -> None:
        StickTable.__init__(self, 60, clock=task.Clock())
        self.asked: List[bytes] = []
        self.answers: List[defer.Deferred] = []

    def lookup(self, key):
        self.asked.append(key)
        d = defer.Deferred()
        self.answers.append(d)
        return d


class FindTests(SynchronousTestCase):
    def test_cacheHitAnswersAtOnce(self):
        """A key the cache holds is answered from it: the store is not asked."""
        table = _AskingTable()
        table.set("10.0.0.1", "k1")
        self.assertEqual(SourceIPPersistence(table).find(Session("10.0.0.1")), "k1")
        self.assertEqual(table.asked, [])

    def test_cacheMissAsksTheStore(self):
        """A key the cache does not hold is looked up: C{find} answers the lookup's L{Deferred}."""
        table = _AskingTable()
        found = SourceIPPersistence(table).find(Session("10.0.0.2"))
        self.assertIsInstance(found, defer.Deferred)
        self.assertEqual(table.asked, ["10.0.0.2"])

    def test_pinnedNowTakesOnlyAnAnswerAlreadyThere(self):
        """The UDP relay cannot wait: a fired lookup gives its key, a pending one L{None}."""
        self.assertEqual(pinned_now(defer.succeed("k")), "k")
        self.assertIsNone(pinned_now(defer.Deferred()))
        self.assertEqual(pinned_now("k2"), "k2")


class _LookupPolicy:
    """A policy whose C{find} answers a L{Deferred} the test fires."""

    name = "lookup"

    def __init__(self) -> None:
        self.pending: List[defer.Deferred] = []

    def find(self, session):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def remember(self, session, backend):
        pass


class TCPLookupTests(RelayCase):
    def setUp(self):
        RelayCase.setUp(self)
        self.policy = _LookupPolicy()
        self.factory = self.make_factory()

    def test_waitsForTheLookupThenConnectsThePin(self):
        """
        No backend is connected while the pin is looked up; the backend it
        names is the one connected, and what the client sent meanwhile
        reaches it.
        """
        proto, transport = self.client()
        proto.dataReceived(b"hello")
        self.assertEqual(self.reactor.tcpClients, [])
        self.policy.pending[0].callback(backend_id("b"))
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.2", 82))
        _, backend_transport = self.backends_connected()
        self.assertEqual(backend_transport.value(), b"hello")

    def backends_connected(self):
        return self.backend_connects()

    def test_noPinIsBalanced(self):
        """A lookup that finds nothing (or gave up) is balanced by the scheduler."""
        self.client()
        self.policy.pending[0].callback(None)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_clientGoneDuringTheLookup(self):
        """A client that leaves before the lookup answers gets no backend connection."""
        proto, transport = self.client()
        proto.connectionLost(None)
        self.policy.pending[0].callback(backend_id("a"))
        self.assertEqual(self.reactor.tcpClients, [])


# -- the store, against a real redis-server -----------------------------------


class StoreCase(TestCase):
    timeout = 60

    def setUp(self):
        self.redis = redis_server(self)
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def store(self, url: str = "", timeout: float = 0.5, prefix: str = "slb:") -> RedisStore:
        store = RedisStore(url or self.redis.url, prefix=prefix, timeout=timeout, flush_interval=3600)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def connected(self, store: RedisStore) -> defer.Deferred:
        return wait_until(lambda: store.connected)

    def table(self, store: RedisStore, timeout: int = 60, name: str = "web/app") -> SharedStickTable:
        return SharedStickTable(name, StickTable(timeout), store)

    def warnings(self, text: str) -> List[dict]:
        return [e for e in self.events if text in str(e.get("log_format", ""))]


class RedisStoreTests(StoreCase):
    def test_interface(self):
        """The Redis-backed table is an L{IStickTable} (what the admin table endpoints use)."""
        verifyObject(IStickTable, self.table(self.store()))

    @defer.inlineCallbacks
    def test_newPinIsWrittenWithTheTableTimeoutAsTTL(self):
        """
        A new pin is C{SET PREFIX + table + ":" + key backend-id PX
        timeout}: the key is named as documented and expires with the table.
        """
        store = self.store(prefix="p1:")
        yield self.connected(store)
        table = self.table(store, timeout=120)
        table.set(b"10.1.2.3", "abc123")
        yield wait_until(lambda: store.counts["writes"] == 1 and self.redis.command("EXISTS", "p1:web/app:10.1.2.3") == b"1")
        self.assertEqual(self.redis.command("GET", "p1:web/app:10.1.2.3"), b"abc123")
        ttl = int(self.redis.command("PTTL", "p1:web/app:10.1.2.3"))
        self.assertTrue(110_000 < ttl <= 120_000, ttl)

    @defer.inlineCallbacks
    def test_anotherInstanceFindsThePinAndCachesIt(self):
        """A second store (another instance) finds the pin by lookup, and caches it."""
        first, second = self.store(), self.store()
        yield self.connected(first)
        yield self.connected(second)
        self.table(first).set(b"10.0.0.9", "k9")
        yield wait_until(lambda: self.redis.command("EXISTS", "slb:web/app:10.0.0.9") == b"1")
        other = self.table(second)
        self.assertIsNone(other.get(b"10.0.0.9"))
        self.assertEqual((yield other.lookup(b"10.0.0.9")), "k9")
        self.assertEqual(other.get(b"10.0.0.9"), "k9")
        self.assertIsNone((yield other.lookup(b"10.0.0.10")))
        self.assertEqual(second.counts["lookup_hits"], 1)

    @defer.inlineCallbacks
    def test_refreshesAreBatched(self):
        """
        A pin seen again costs no Redis write: its key is queued, and one
        C{PEXPIRE} per key is sent at the flush, restoring its TTL.  A
        re-pin (another backend) is written at once.
        """
        store = self.store()
        yield self.connected(store)
        table = self.table(store, timeout=100)
        table.set(b"c", "k1")
        yield wait_until(lambda: self.redis.command("EXISTS", "slb:web/app:c") == b"1")
        self.redis.command("PEXPIRE", "slb:web/app:c", "5000")
        for _ in range(50):
            table.set(b"c", "k1")
        self.assertEqual(store.counts["writes"], 1)
        self.assertEqual(store.counts["refreshes"], 0)
        self.assertLess(int(self.redis.command("PTTL", "slb:web/app:c")), 6000)
        store.flush()
        yield wait_until(lambda: int(self.redis.command("PTTL", "slb:web/app:c")) > 90_000)
        self.assertEqual(store.counts["refreshes"], 1)
        table.set(b"c", "k2")
        self.assertEqual(store.counts["writes"], 2)
        yield wait_until(lambda: self.redis.command("GET", "slb:web/app:c") == b"k2")

    @defer.inlineCallbacks
    def test_anyKeyBytesAndScanBoundedAndDelete(self):
        """
        Keys are any bytes (a digest key included); C{shared_items} lists
        the shared entries by SCAN, at most C{limit}; C{delete} removes the
        shared entry too.
        """
        store = self.store()
        yield self.connected(store)
        table = self.table(store)
        keys = [b"#\xff\x00\x01", b"a*b"] + [b"10.0.0.%d" % i for i in range(30)]
        for key in keys:
            table.set(key, "k")
        SharedStickTable("other", StickTable(60), store).set(b"x", "k")
        yield wait_until(lambda: store.counts["writes"] == 33 and self.redis.command("DBSIZE") == b"33")
        everything = yield table.shared_items()
        self.assertEqual(sorted(k for k, _, _ in everything), sorted(keys))
        self.assertTrue(all(v == "k" and 0 <= idle < 5 for _, v, idle in everything))
        self.assertEqual(len((yield table.shared_items(limit=5))), 5)
        table.delete(b"#\xff\x00\x01")
        yield wait_until(lambda: self.redis.command("DBSIZE") == b"32")
        self.assertIsNone(table.get(b"#\xff\x00\x01"))

    @defer.inlineCallbacks
    def test_redisDownAnswersAtOnceLogsOnceAndWritesResume(self):
        """
        With Redis stopped: a lookup answers L{None} at once, writes are
        skipped (the pin stays local), one warning for the episode; once it
        is back (txredisapi reconnects), writes reach it again.
        """
        store = self.store()
        yield self.connected(store)
        table = self.table(store)
        self.redis.stop()
        yield wait_until(lambda: not store.connected)
        lookup = table.lookup(b"1.1.1.1")
        self.assertTrue(lookup.called)
        self.assertIsNone(self.successResultOf(lookup))
        for i in range(5):
            table.set(b"2.2.2.%d" % i, "k")
        self.assertEqual(table.get(b"2.2.2.0"), "k")
        self.assertEqual(store.counts["skipped"], 5)
        self.assertEqual(store.counts["episodes"], 1)
        self.assertEqual(len(self.warnings("serving from the local tables")), 1)
        self.assertEqual(store.snapshot()["connected"], False)
        self.redis.start()
        yield self.connected(store)
        table.set(b"3.3.3.3", "k3")
        yield wait_until(lambda: self.redis.command("GET", "slb:web/app:3.3.3.3") == b"k3")
        self.assertTrue(store.healthy)
        self.assertEqual(len(self.warnings("answering again")), 1)

    @defer.inlineCallbacks
    def test_slowRedisNeverHoldsALookupPastTheTimeout(self):
        """
        A Redis that does not answer (stopped with SIGSTOP): a lookup answers
        L{None} once the store's timeout has passed, counted as a timeout.
        """
        store = self.store(timeout=0.2)
        yield self.connected(store)
        table = self.table(store)
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: self.redis.process and os.kill(self.redis.process.pid, signal.SIGCONT))
        started = reactor.seconds()
        self.assertIsNone((yield table.lookup(b"4.4.4.4")))
        self.assertLess(reactor.seconds() - started, 0.6)
        self.assertEqual(store.counts["lookup_timeouts"], 1)
        self.assertFalse(store.healthy)
        os.kill(self.redis.process.pid, signal.SIGCONT)

    @defer.inlineCallbacks
    def test_passwordInTheURL(self):
        """The URL's password authenticates; a wrong one only leaves the store unused."""
        self.redis.stop()
        self.redis = redis_server(self, password="s3cr:et")
        store = self.store(url=f"redis://:s3cr%3Aet@127.0.0.1:{self.redis.port}/0")
        yield self.connected(store)
        self.table(store).set(b"k", "v")
        yield wait_until(lambda: self.redis.command("GET", "slb:web/app:k") == b"v")
        wrong = self.store(url=f"redis://:nope@127.0.0.1:{self.redis.port}/0", timeout=0.1)
        self.assertIsNone((yield self.table(wrong).lookup(b"k")))


class ConfigTests(SynchronousTestCase):
    BASE = ('[backends.b]\nservers = [{name = "a", address = "127.0.0.1:1"}]\n'
            '[listeners.t]\nprotocol = "tcp"\nbind = "tcp:0"\nbackends = "b"\n[store]\n')

    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, parse_config, self.BASE + text))

    def test_defaultIsMemory(self):
        """Without C{[store]} the tables stay in memory."""
        self.assertEqual(parse_config(self.BASE.replace("[store]\n", "")).store.type, "memory")

    def test_redis(self):
        """C{type = "redis"} reads url, prefix and timeout."""
        store = parse_config(self.BASE + 'type = "redis"\nurl = "rediss://u:p@h:7000/3"\nprefix = "x:"\n'
                             'timeout = 0.2\n').store
        self.assertEqual((store.type, store.url, store.prefix, store.timeout),
                         ("redis", "rediss://u:p@h:7000/3", "x:", 0.2))

    def test_errorsNameFieldValueAndAllowed(self):
        """Each bad value is named with its field and what is allowed; a password is never shown."""
        self.assertIn("store.type: not one of the choices; got 'mysql'; allowed: 'memory' | 'redis'",
                      self.error('type = "mysql"'))
        self.assertIn("store.url: required but missing", self.error('type = "redis"'))
        message = self.error('type = "redis"\nurl = "http://:hunter2@h/0"')
        self.assertIn("store.url: the scheme must be redis or rediss", message)
        self.assertNotIn("hunter2", message)
        self.assertIn("store.url: database '16' is not 0..15", self.error('type = "redis"\nurl = "redis://h/16"'))
        self.assertIn("store.timeout: out of range; got 0",
                      self.error('type = "redis"\nurl = "redis://h"\ntimeout = 0'))
        self.assertIn("store.url: unknown key", self.error('url = "redis://h"'))

    def test_checkShowsTheStoreNotThePassword(self):
        """C{--check} names the store's server, prefix and timeout, never the URL's password."""
        from twisted_slb.config import describe

        text = describe(parse_config(self.BASE + 'type = "redis"\nurl = "redis://:hunter2@10.0.0.5/2"\n'))
        self.assertIn("store: redis redis://10.0.0.5:6379/2, prefix 'slb:', lookup timeout 0.05 s", text)
        self.assertNotIn("hunter2", text)


# -- balancers sharing a store -------------------------------------------------

TCP_CONFIG = """
[backends.pool]
scheduler = "rr"
servers = [ {servers} ]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "pool"
persistence = {{ type = "source_ip", timeout = 600 }}

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "pool"
persistence = {{ type = "source_ip", timeout = 600 }}
{admin}
[store]
type = "redis"
url = "{url}"
timeout = 0.5
"""


def servers_text(ports: Dict[str, int], order: str) -> str:
    return ", ".join(f'{{ name = "{n}", address = "127.0.0.1:{ports[n]}" }}' for n in order)


class ServicesTests(ServiceTestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = redis_server(self)
        self.ports: Dict[str, int] = {}
        for name in "abcd":
            port, _page = yield self.start_http_backend(name)
            self.ports[name] = port.getHost().port

    def balancer(self, order: str):
        service = self.start_balancer(TCP_CONFIG.format(servers=servers_text(self.ports, order), admin="",
                                                        url=self.redis.url))
        return service

    @defer.inlineCallbacks
    def get(self, service, source: str) -> defer.Deferred:
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False), bindAddress=(source, 0))
        response = yield agent.request(b"GET", f"http://127.0.0.1:{self.port_of(service, 'web')}/".encode())
        body = yield readBody(response)
        return body.decode()

    @defer.inlineCallbacks
    def test_twoBalancersWithReorderedServersAgree(self):
        """
        Clients pinned through one balancer (HTTP listener, source_ip)
        reach the same backends through another that lists the servers in
        the reverse order: the pins are shared, by backend id.
        """
        one, two = self.balancer("abcd"), self.balancer("dcba")
        yield wait_until(lambda: one.store.connected and two.store.connected)
        sources = [f"127.0.3.{n}" for n in range(1, 9)]
        first, second = [], []
        for source in sources:
            first.append((yield self.get(one, source)))
        self.assertGreater(len(set(first)), 1)
        for source in sources:
            second.append((yield self.get(two, source)))
        self.assertEqual(first, second)
        self.assertEqual(two.store.counts["lookup_hits"], len(sources))
        self.assertEqual(two.stats.snapshot()["store"]["lookup_hits"], len(sources))

    @defer.inlineCallbacks
    def test_stuckRedisDelaysANewClientByTheTimeoutAtMost(self):
        """
        With Redis not answering (SIGSTOP), a new HTTP client is served by
        the scheduler once the lookup gives up (C{timeout} 0.5 s), and a
        client it pinned then is served from the local table at once.
        """
        one = self.balancer("abcd")
        yield wait_until(lambda: one.store.connected)
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: self.redis.process and os.kill(self.redis.process.pid, signal.SIGCONT))
        started = reactor.seconds()
        name = yield self.get(one, "127.0.3.50")
        self.assertLess(reactor.seconds() - started, 1.5)
        self.assertRegex(name, r"^backend=[abcd] ")
        self.assertEqual((yield self.get(one, "127.0.3.50")), name)
        self.assertEqual(one.store.counts["lookup_timeouts"], 1)
        self.assertEqual(one.stats.listeners["web"].persistence["hit"], 1)
        os.kill(self.redis.process.pid, signal.SIGCONT)

    def test_workersUseTheSharedTableNotHashing(self):
        """With a shared store, worker processes pick new clients with the group's scheduler."""
        from twisted_slb.config import load_config
        from twisted_slb.service import BalancerService

        text = TCP_CONFIG.format(servers=servers_text(self.ports, "ab"), admin="", url=self.redis.url)
        worker = BalancerService(load_config(self.write_config(text)), reactor, worker=True)
        policy = worker.getServiceNamed("tcp").factory.policy
        self.assertIsNone(policy.scheduler)
        self.assertIsInstance(policy.table, SharedStickTable)
        plain = BalancerService(load_config(self.write_config(text.split("[store]")[0])), reactor, worker=True)
        self.assertEqual(type(plain.getServiceNamed("tcp").factory.policy.scheduler).__name__, "ConsistentHash")

    def test_metrics(self):
        """C{/metrics} has the store's state and counts."""
        from prometheus_client import CollectorRegistry, generate_latest

        from twisted_slb.admin import _Collector

        service = self.balancer("ab")
        registry = CollectorRegistry()
        registry.register(_Collector(service.stats))
        text = generate_latest(registry).decode()
        self.assertIn("slb_store_up", text)
        self.assertIn('slb_store_operations_total{kind="lookup_timeouts"}', text)


# -- two twistd slb processes --------------------------------------------------


class TwistdInstancesTests(TestCase):
    timeout = 180

    def setUp(self):
        self.redis = redis_server(self)
        self.ports: Dict[str, int] = {}
        for name in "abcd":
            f = ServerFactory.forProtocol(NameEcho)
            f.name = name
            port = reactor.listenTCP(0, f, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.ports[name] = port.getHost().port

    @defer.inlineCallbacks
    def start(self, name: str, order: str):
        path = os.path.abspath(f"{name}.toml")
        with open(path, "w") as f:
            f.write(TCP_CONFIG.format(servers=servers_text(self.ports, order), url=self.redis.url,
                                      admin='[admin]\nbind = "tcp:0:interface=127.0.0.1"\n'))
        proc = Twistd()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        transport = reactor.spawnProcess(proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path],
                                         env=os.environ.copy())
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        admin = yield proc.wait_for(r"listener \[admin\] \(admin\) listening on 127\.0\.0\.1:(\d+)", True)
        tcp = yield proc.wait_for(r"listener tcp \(tcp\) listening on 127\.0\.0\.1:(\d+)", True)
        instance = {"proc": proc, "transport": transport, "admin": int(admin.group(1)), "tcp": int(tcp.group(1))}
        yield self.until_store(instance, connected=True)
        return instance

    @defer.inlineCallbacks
    def stats(self, instance) -> defer.Deferred:
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = yield agent.request(b"GET", f"http://127.0.0.1:{instance['admin']}/stats".encode())
        return json.loads((yield readBody(response)))["store"]

    @defer.inlineCallbacks
    def until_store(self, instance, connected: bool):
        for _ in range(600):
            store = yield self.stats(instance)
            if (store["connected"] and store["healthy"]) == connected:
                return store
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"store never connected={connected}: {store}")

    def backend_of(self, instance, source: str) -> defer.Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", instance["tcp"], bindAddress=(source, 0))
        client = NameLineClient()
        return connectProtocol(endpoint, client).addCallback(lambda _: client.first)

    @defer.inlineCallbacks
    def through(self, instance, sources: List[str]) -> defer.Deferred:
        answers = []
        for source in sources:
            answers.append((yield self.backend_of(instance, source)))
        return answers

    @defer.inlineCallbacks
    def test_pinsSharedAcrossInstancesRestartsAndOutages(self):
        """
        Two C{twistd slb} with one [store] and reversed server lists:
        20 clients pinned through A reach the same backends through B; A
        restarted still has them; with Redis stopped no connection fails and
        new pins are local (only A knows them); with Redis back, new pins
        are shared again.
        """
        a = yield self.start("a", "abcd")
        b = yield self.start("b", "dcba")
        clients = [f"127.0.4.{n}" for n in range(1, 21)]
        pinned = yield self.through(a, clients)
        self.assertEqual(len(set(pinned)), 4)  # round robin spread them
        self.assertEqual((yield self.through(b, clients)), pinned)

        a["transport"].signalProcess("TERM")
        yield a["proc"].ended
        a = yield self.start("a", "abcd")
        self.assertEqual((yield self.through(a, clients)), pinned)

        self.redis.stop()
        yield self.until_store(a, connected=False)
        local = [f"127.0.5.{n}" for n in range(1, 21)]
        during = yield self.through(a, local)  # none fails (an error would fail the test)
        self.assertEqual((yield self.through(a, local)), during)
        self.assertEqual((yield self.through(a, clients)), pinned)  # the cache keeps serving
        store = yield self.stats(a)
        self.assertGreaterEqual(store["episodes"], 1)
        self.assertGreaterEqual(store["skipped"], 20)

        self.redis.start()
        yield self.until_store(a, connected=True)
        yield self.until_store(b, connected=True)
        self.assertEqual(self.redis.command("DBSIZE"), b"0")  # the pins made meanwhile stayed local
        fresh = [f"127.0.6.{n}" for n in range(1, 21)]
        again = yield self.through(a, fresh)
        self.assertEqual((yield self.through(b, fresh)), again)
        for instance in (a, b):
            instance["transport"].signalProcess("TERM")
            yield instance["proc"].ended


class StopTests(StoreCase):
    @defer.inlineCallbacks
    def test_stoppingIsNotAnEpisode(self):
        """
        Stopping the store sends the queued refreshes and disconnects; the
        replies the disconnection cuts off are neither logged nor counted.
        """
        store = RedisStore(self.redis.url, timeout=0.5, flush_interval=3600)
        store.startService()
        yield self.connected(store)
        table = self.table(store)
        for i in range(50):
            table.set(b"k%d" % i, "v")
            table.set(b"k%d" % i, "v")
        yield store.stopService()
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((store.counts["errors"], store.counts["episodes"]), (0, 0))
        self.assertEqual(self.warnings("serving from the local tables"), [])
