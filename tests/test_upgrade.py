"""
Upgrading the code without refusing a connection (twisted_slb.upgrade): the
socket hand-over, the stick table dump and load, the old process's side of
the hand-over in memory, and the real C{twistd slb} upgraded twice under load.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import List

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.server import Site

from tests.test_service import NamePage
from tests.test_twistd import Twistd
from twisted_slb import upgrade
from twisted_slb.config import ListenerConfig
from twisted_slb.persistence.sourceip import StickTable


def _listener(name: str, bind: str) -> ListenerConfig:
    return ListenerConfig(name=name, protocol="tcp", bind=bind, backends="b")


class SocketHandoverTests(SynchronousTestCase):
    def test_encodeDecodeRoundTrip(self) -> None:
        """What the old process puts in TWISTED_SLB_LISTEN_FDS, the new one reads back."""
        sockets = {"web": ("tcp:80", 5, socket.AF_INET), "[admin]": ("unix:/run/a", 7, socket.AF_UNIX)}
        self.assertEqual(upgrade.decode_sockets(upgrade.encode_sockets(sockets)), sockets)

    def test_decodeRejectsGarbage(self) -> None:
        """A malformed variable is an error naming it, not a wrong descriptor."""
        for text in ['[1, 2]', '{"web": 5}', '{"web": {"bind": "tcp:80", "fd": "5", "family": 2}}',
                     '{"web": {"bind": "tcp:80", "fd": -1, "family": 2}}']:
            with self.assertRaises(ValueError) as e:
                upgrade.decode_sockets(text)
            self.assertIn(upgrade.ENV_LISTEN_FDS, str(e.exception))

    def test_adoptsOnlyListenersThatKeptTheirBind(self) -> None:
        """A listener whose bind changed (or that is gone) binds anew; the others adopt their socket."""
        sockets = {"web": ("tcp:80", 5, 2), "raw": ("tcp:81", 6, 2), "gone": ("tcp:82", 7, 2)}
        listeners = [_listener("web", "tcp:80"), _listener("raw", "tcp:9081")]
        self.assertEqual(upgrade.adoption(sockets, listeners), {"web": (5, 2)})

    def test_inheritanceReadsAndRemovesTheVariables(self) -> None:
        """The variables are read once and removed, so workers or a later upgrade never see stale ones."""
        environ = {
            upgrade.ENV_LISTEN_FDS: upgrade.encode_sockets({"web": ("tcp:80", 5, 2)}),
            upgrade.ENV_READY_FD: "9",
            upgrade.ENV_STICK_TABLES: "/tmp/t.json",
            "PATH": "/bin",
        }
        inherited = upgrade.Inheritance.from_environment(environ)
        self.assertEqual((inherited.sockets, inherited.ready_fd, inherited.tables_path),
                         ({"web": ("tcp:80", 5, 2)}, 9, "/tmp/t.json"))
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_reportWritesOneLineAndClosesThePipe(self) -> None:
        """The new process's report reaches the old one as one line, then end of file."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        upgrade.Inheritance(ready_fd=w).report("ready 42")
        self.assertEqual(os.read(r, 100), b"ready 42\n")
        self.assertEqual(os.read(r, 100), b"")

    def test_closeSocketsClosesTheInheritedDescriptors(self) -> None:
        """Inherited descriptors are closed once adopted (the ports hold duplicates)."""
        s = socket.socket()
        self.addCleanup(s.close)
        fd = os.dup(s.fileno())
        upgrade.Inheritance({"web": ("tcp:80", fd, 2)}).close_sockets()
        self.assertRaises(OSError, os.fstat, fd)

    def test_notifySystemd(self) -> None:
        """READY=1 goes as one datagram to $NOTIFY_SOCKET; without it nothing is sent."""
        path = os.path.abspath(self.mktemp())
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(path)
        self.assertTrue(upgrade.notify_systemd("READY=1\nMAINPID=7", {"NOTIFY_SOCKET": path}))
        self.assertEqual(s.recv(100), b"READY=1\nMAINPID=7")
        self.assertFalse(upgrade.notify_systemd("READY=1", {}))


class StickTableDumpTests(SynchronousTestCase):
    def table(self, clock: Clock) -> StickTable:
        return StickTable(timeout=60, clock=clock)

    def test_dumpAndLoadKeepsPinsAndTheirAge(self) -> None:
        """Pins cross over with their idle time plus the time the hand-over took, oldest first."""
        old_clock, new_clock = Clock(), Clock()
        old = self.table(old_clock)
        old.set("10.0.0.1", "a")
        old_clock.advance(20)
        old.set("10.0.0.2", "b")
        doc = json.loads(json.dumps(upgrade.dump_tables({"web/g": old}, now=1000.0)))
        self.assertEqual((doc["format"], doc["version"]), (upgrade.TABLES_FORMAT, 1))
        new_clock.advance(500)
        new = self.table(new_clock)
        self.assertEqual(upgrade.load_tables(doc, {"web/g": new}, now=1005.0), 2)
        self.assertEqual([(c, b, round(i)) for c, b, i in new.items()], [(b"10.0.0.1", "a", 25), (b"10.0.0.2", "b", 5)])
        new_clock.advance(36)  # 10.0.0.1 was idle 61 s: expired, as it would have been in the old process
        self.assertEqual((new.get("10.0.0.1"), new.get("10.0.0.2")), (None, "b"))

    def test_loadSkipsExpiredEntriesAndUnknownTables(self) -> None:
        """An entry older than the timeout, or of a table the new configuration lacks, is not restored."""
        doc = {"format": upgrade.TABLES_FORMAT, "version": 1, "written": 100.0,
               "tables": {"web/g": [["c1", "a", 50.0], ["c2", "a", 1.0]], "gone/g": [["c3", "a", 1.0]]}}
        new = self.table(Clock())
        self.assertEqual(upgrade.load_tables(doc, {"web/g": new}, now=115.0), 1)
        self.assertEqual([c for c, _, _ in new.items()], [b"c2"])

    def test_keysAreAnyBytes(self) -> None:
        """A table's keys are bytes (header and cookie values, digests of long keys): every byte crosses over."""
        clock = Clock()
        old, new = self.table(clock), self.table(clock)
        keys = [bytes(range(256)), b"\xff\x00tenant", "caf\u00e9".encode("utf-8")]
        for key in keys:
            old.set(key, "a")
        doc = json.loads(json.dumps(upgrade.dump_tables({"web/g": old}, now=1000.0)))
        self.assertEqual(upgrade.load_tables(doc, {"web/g": new}, now=1000.0), 3)
        self.assertEqual(sorted(c for c, _, _ in new.items()), sorted(c for c, _, _ in old.items()))

    def test_loadRefusesAnotherVersion(self) -> None:
        """A dump of another format version is refused, not misread."""
        doc = {"format": upgrade.TABLES_FORMAT, "version": 2, "written": 0, "tables": {}}
        with self.assertRaises(ValueError) as e:
            upgrade.load_tables(doc, {}, now=0)
        self.assertIn("version 2", str(e.exception))
        self.assertRaises(ValueError, upgrade.load_tables, {"version": 1}, {}, 0)

    def test_inheritanceLoadsAndDeletesTheFile(self) -> None:
        """The new process loads the dump file, then deletes it."""
        path = self.mktemp()
        old = self.table(Clock())
        old.set("c", "a")
        with open(path, "w") as f:
            json.dump(upgrade.dump_tables({"t": old}, now=10.0), f)
        new = self.table(Clock())
        self.assertEqual(upgrade.Inheritance(tables_path=path).load_tables({"t": new}, now=10.0), 1)
        self.assertEqual(new.get("c"), "a")
        self.assertFalse(os.path.exists(path))


class _Transport:
    pid = 4242

    def __init__(self) -> None:
        self.signals: List[str] = []

    def signalProcess(self, name) -> None:
        self.signals.append(name)


class _Reactor(MemoryReactorClock):
    """A memory reactor that records spawnProcess."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned = []
        self.stopped = False

    def spawnProcess(self, proto, executable, args, env=None, path=None, childFDs=None, **kw):
        proto.makeConnection(_Transport())
        self.spawned.append((proto, args, env, path, childFDs))
        return proto.transport

    def stop(self) -> None:
        self.stopped = True


class _Balancer(list):
    """Stands in for a BalancerService: a config path, sockets and tables."""

    def __init__(self, config_path: str) -> None:
        super().__init__()
        self.config = type("C", (), {"path": config_path, "grace_period": 3.0})()
        self.stick_tables = {"web/g": StickTable(60, clock=Clock())}
        self.stick_tables["web/g"].set("10.1.1.1", "a")

    def listening_sockets(self):
        return {"web": ("tcp:80", 7, 2), "raw": ("tcp:81", 11, 2)}


class OldProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "slb.toml")
        with open(self.config, "w") as f:
            f.write('[backends.b]\nservers = [ { name = "a", address = "127.0.0.1:1" } ]\n'
                    '[listeners.web]\nprotocol = "tcp"\nbind = "tcp:0"\nbackends = "b"\n')
        self.pidfile = os.path.join(self.dir, "slb.pid")
        with open(self.pidfile, "w") as f:
            f.write("100")
        self.options = {"pidfile": self.pidfile}
        self.reactor = _Reactor()
        self.service = upgrade.UpgradeService(_Balancer(self.config), self.reactor, argv=["/py", "twistd", "slb"],
                                              twistd_options=self.options, cwd="/srv")
        self.service.running = True

    def start(self):
        self.assertTrue(self.service.upgrade())
        return self.reactor.spawned[-1]

    def status(self) -> str:
        with open(self.pidfile + ".upgrade") as f:
            return f.read()

    def test_startsTheSameCommandWithTheSockets(self) -> None:
        """The new process runs the same command line, in the same directory, with the sockets and a ready pipe."""
        proto, args, env, path, child_fds = self.start()
        self.assertEqual((args, path), (["/py", "twistd", "slb"], "/srv"))
        self.assertEqual(upgrade.decode_sockets(env[upgrade.ENV_LISTEN_FDS]),
                         {"web": ("tcp:80", 7, 2), "raw": ("tcp:81", 11, 2)})
        self.assertEqual((child_fds[7], child_fds[11], child_fds[12]), (7, 11, "r"))
        self.assertEqual(env[upgrade.ENV_READY_FD], "12")
        with open(env[upgrade.ENV_STICK_TABLES]) as f:
            self.assertEqual(json.load(f)["tables"]["web/g"][0][:2], ["10.1.1.1", "a"])
        # The pid file moved aside, and twistd will remove F.oldbin at exit.
        self.assertEqual(self.options["pidfile"], self.pidfile + ".oldbin")
        self.assertTrue(os.path.exists(self.pidfile + ".oldbin"))
        self.assertFalse(os.path.exists(self.pidfile))

    def test_readyStopsTheOldProcess(self) -> None:
        """On "ready PID" the old process writes the outcome and stops (twistd then drains and exits)."""
        proto = self.start()[0]
        self.assertFalse(self.reactor.stopped)
        proto.childDataReceived(12, b"rea")
        proto.childDataReceived(12, b"dy 555\n")
        self.assertTrue(self.reactor.stopped)
        self.assertEqual(self.status(), "ok 555\n")

    def test_newProcessExitingKeepsTheOldOneServing(self) -> None:
        """A new process that exits before it is ready: pid file back, dump removed, outcome says why."""
        proto, _, env, _, _ = self.start()
        proto.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertFalse(self.reactor.stopped)
        self.assertIsNone(self.service.pending)
        self.assertEqual(self.options["pidfile"], self.pidfile)
        self.assertTrue(os.path.exists(self.pidfile))
        self.assertFalse(os.path.exists(env[upgrade.ENV_STICK_TABLES]))
        self.assertIn("exited with code 1", self.status())

    def test_newProcessSayingFailedIsEnded(self) -> None:
        """The new process's own "failed:" line is logged as the reason, and the process is ended."""
        proto = self.start()[0]
        proto.childDataReceived(12, b"failed: listeners.web.bind: bad\n")
        self.assertEqual(proto.transport.signals, ["KILL"])
        self.assertEqual(self.status(), "failed: the new process 4242 failed: listeners.web.bind: bad\n")

    def test_notReadyInTimeIsAFailure(self) -> None:
        """A new process that never says ready is ended after ready_timeout; the old one keeps serving."""
        proto = self.start()[0]
        self.reactor.advance(upgrade.READY_TIMEOUT)
        self.assertEqual(proto.transport.signals, ["KILL"])
        self.assertFalse(self.reactor.stopped)
        self.assertIn("not ready after 60 s", self.status())
        # A late "ready" from it changes nothing.
        proto.childDataReceived(12, b"ready 1\n")
        self.assertFalse(self.reactor.stopped)

    def test_badConfigurationStartsNothing(self) -> None:
        """A configuration that does not load is reported and no process starts."""
        with open(self.config, "a") as f:
            f.write("[listeners.bad]\nprotocol = 'ftp'\n")
        self.assertFalse(self.service.upgrade())
        self.assertEqual(self.reactor.spawned, [])
        self.assertIn("listeners.bad.protocol", self.status())
        self.assertTrue(os.path.exists(self.pidfile))

    def test_secondSignalDuringAnUpgradeIsIgnored(self) -> None:
        """SIGUSR2 while a new process is starting does not start another."""
        self.start()
        self.assertFalse(self.service.upgrade())
        self.assertEqual(len(self.reactor.spawned), 1)


CONFIG = """
[admin]
bind = "tcp:0:interface=127.0.0.1"

[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{port}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "source_ip" }}

[listeners.raw]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
"""


class _OneRequest(protocol.Protocol):
    """Sends an HTTP/1.0 request over the TCP listener and collects the answer."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.data)


class _Loops:
    """Three client loops: keep-alive HTTP, a new HTTP connection each time, TCP."""

    #: a bound on each loop (they stop when told, long before)
    limit = 20_000

    def __init__(self, web: int, raw: int) -> None:
        self.web, self.raw = web, raw
        self.ok = {"keepalive": 0, "new": 0, "tcp": 0}
        self.failures: List[str] = []
        self.waiters: list = []
        self.running = True
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.keepalive = Agent(reactor, pool=self.pool)
        self.fresh = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    @defer.inlineCallbacks
    def http(self, kind: str, agent):
        for _ in range(self.limit):
            if not self.running:
                return
            try:
                response = yield agent.request(b"GET", f"http://127.0.0.1:{self.web}/".encode())
                body = yield readBody(response)
                if response.code != 200 or not body.startswith(b"backend=a"):
                    self.failures.append(f"{kind}: {response.code} {body[:80]!r}")
                else:
                    self.succeeded(kind)
            except Exception as e:
                self.failures.append(f"{kind}: {e!r}")

    @defer.inlineCallbacks
    def tcp(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.raw)
        for _ in range(self.limit):
            if not self.running:
                return
            try:
                proto = yield endpoint.connect(protocol.Factory.forProtocol(_OneRequest))
                data = yield proto.done
                if not (data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0] and b"backend=a" in data):
                    self.failures.append(f"tcp: {data[:80]!r}")
                else:
                    self.succeeded("tcp")
            except Exception as e:
                self.failures.append(f"tcp: {e!r}")

    def start(self) -> defer.Deferred:
        return defer.gatherResults([self.http("keepalive", self.keepalive), self.http("new", self.fresh), self.tcp()])

    def succeeded(self, kind: str) -> None:
        self.ok[kind] += 1
        for item in list(self.waiters):
            target, d = item
            if all(self.ok[k] >= target[k] for k in target):
                self.waiters.remove(item)
                d.callback(None)

    def more(self, count: int = 20) -> defer.Deferred:
        """Fires once every loop has done C{count} more successful requests."""
        d: defer.Deferred = defer.Deferred()
        self.waiters.append(({k: v + count for k, v in self.ok.items()}, d))
        return d


class UpgradeEndToEndTests(TestCase):
    timeout = 120

    def twistd_path(self) -> str:
        return os.path.join(os.path.dirname(sys.executable), "twistd")

    @defer.inlineCallbacks
    def test_upgradedTwiceUnderLoadWithoutAFailedRequest(self):
        """
        A real twistd slb, under three client loops (keep-alive HTTP, new
        HTTP connections, TCP), is upgraded by SIGUSR2 and then by
        C{twistd slb --upgrade --pidfile F}: no request fails, /stats shows a
        new pid each time, and the stick table crosses over.
        """
        backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage("a")))
        self.addCleanup(backend.stopListening)
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        path = os.path.join(tmp, "slb.toml")
        pidfile = os.path.join(tmp, "slb.pid")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=backend.getHost().port))
        proc = Twistd()
        twistd = self.twistd_path()
        reactor.spawnProcess(proc, twistd, [twistd, f"--pidfile={pidfile}", "-n", "slb", "--config", path],
                             env=os.environ.copy())

        def stop_latest():
            # The first process is long gone: stop whichever holds the pid file.
            try:
                with open(pidfile) as f:
                    os.kill(int(f.read()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
            return proc.ended

        self.addCleanup(stop_latest)
        admin = int((yield proc.wait_for(r"\[admin\] \(admin\) listening on 127\.0\.0\.1:(\d+)", True)).group(1))
        web = int((yield proc.wait_for(r"web \(http\) listening on 127\.0\.0\.1:(\d+)", True)).group(1))
        raw = int((yield proc.wait_for(r"raw \(tcp\) listening on 127\.0\.0\.1:(\d+)", True)).group(1))
        stats_agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

        @defer.inlineCallbacks
        def process():
            response = yield stats_agent.request(b"GET", f"http://127.0.0.1:{admin}/stats".encode())
            return json.loads((yield readBody(response)))["process"]

        loops = _Loops(web, raw)
        done = loops.start()
        self.addCleanup(loops.pool.closeCachedConnections)

        @defer.inlineCallbacks
        def stop_loops():
            loops.running = False
            yield done

        self.addCleanup(stop_loops)
        yield loops.more()
        pids = [(yield process())["pid"]]

        for how in ("signal", "command"):
            serving = proc.wait_for(r"upgrade: process (\d+) is serving; process (\d+) stops accepting")
            old_gone = proc.wait_for(r"upgrade: process \d+ is serving[\s\S]*Server Shut Down\.")
            taken = proc.wait_for(r"(\d+) stick table entries taken over")
            if how == "signal":
                os.kill(pids[-1], signal.SIGUSR2)
            else:
                out, err, code = yield getProcessOutputAndValue(
                    twistd, ["slb", "--upgrade", "--pidfile", pidfile], env=os.environ.copy()
                )
                self.assertEqual(code, 0, out + err)
                self.assertIn(b"upgraded: process ", out)
            m = yield serving
            self.assertEqual(int(m.group(2)), pids[-1])
            self.assertGreaterEqual(int((yield taken).group(1)), 1)
            yield old_gone
            yield loops.more()
            info = yield process()
            self.assertEqual(info["pid"], int(m.group(1)))
            with open(pidfile) as f:
                self.assertEqual(int(f.read()), info["pid"])
            pids.append(info["pid"])

        yield stop_loops()
        self.assertEqual(len(set(pids)), 3, pids)
        self.assertEqual(loops.failures, [])
        self.assertTrue(all(n >= 60 for n in loops.ok.values()), loops.ok)
