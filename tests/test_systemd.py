"""
systemd: the example units pass C{systemd-analyze verify} and C{security},
and C{twistd slb} started by C{systemd-socket-activate} serves the sockets
it is given (C{bind = "systemd:..."}), as systemd's .socket unit would.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.server import Site

from tests.test_service import NamePage
from tests.test_twistd import Twistd
from tests.test_upgrade import _OneRequest

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(os.path.dirname(HERE), "examples", "systemd")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _free_port() -> int:
    """A port free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnitFileTests(TestCase):
    timeout = 60

    def units(self) -> str:
        """The example units, their ExecStart pointed at this virtualenv's twistd (verify checks it exists)."""
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        for name in ("twisted-slb.socket", "twisted-slb.service"):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace("/opt/twisted-slb/bin/twistd", TWISTD)
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        return tmp

    @defer.inlineCallbacks
    def test_unitsVerify(self):
        """systemd-analyze verify finds nothing wrong with the socket and service units."""
        tmp = self.units()
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("systemd-analyze"),
            ["verify", "--man=no", "./twisted-slb.socket", "./twisted-slb.service"],
            env=os.environ.copy(), path=tmp,
        )
        self.assertEqual((code, out + err), (0, b""))

    @defer.inlineCallbacks
    def test_serviceIsHardened(self):
        """systemd-analyze security rates the service's exposure 2.0 or lower (of 10), and it runs unprivileged."""
        tmp = self.units()
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("systemd-analyze"),
            ["security", "--offline=true", "--no-pager", "./twisted-slb.service"],
            env=os.environ.copy(), path=tmp,
        )
        text = out.decode("utf-8", "replace")
        m = re.search(r"Overall exposure level for twisted-slb\.service: ([\d.]+)", text)
        self.assertIsNotNone(m, text + err.decode())
        self.assertLessEqual(float(m.group(1)), 2.0, text)
        for setting in ("DynamicUser=", "NoNewPrivileges=", "ProtectSystem="):
            line = [l for l in text.splitlines() if setting in l][0]
            self.assertTrue(line.startswith("\u2713"), line)  # a check mark: in force


class SocketActivationTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def activate(self, config_path: str, count: int):
        """
        Start C{systemd-socket-activate -l 127.0.0.1:P ... twistd -n slb}
        with C{count} free ports; retry with others if one was taken
        between finding it free and binding it.
        """
        for _ in range(5):
            ports = [_free_port() for _ in range(count)]
            args = [shutil.which("systemd-socket-activate")]
            for port in ports:
                args += ["-l", f"127.0.0.1:{port}"]
            args += [TWISTD, "--pidfile=", "-n", "slb", "--config", config_path]
            proc = Twistd()
            transport = reactor.spawnProcess(proc, args[0], args, env=os.environ.copy())

            def stop(proc=proc, transport=transport):
                if not proc.ended.called:
                    transport.signalProcess("TERM")
                return proc.ended

            self.addCleanup(stop)
            outcome = yield proc.wait_for(
                rf"Listening on 127\.0\.0\.1:{ports[-1]} as|Failed to listen|Failed to open", True
            )
            if outcome.group(0).startswith("Listening"):
                return proc, ports
            yield proc.ended
        self.fail("no free ports for systemd-socket-activate after 5 tries")

    @defer.inlineCallbacks
    def test_exampleServesTheSocketsItIsGiven(self):
        """
        The example slb.toml (its backends on loopback, its sockets INET)
        under systemd-socket-activate: the HTTP listener serves socket 0,
        the TCP listener socket 1; the process binds nothing itself.
        """
        http_backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage("app1")))
        self.addCleanup(http_backend.stopListening)
        with open(os.path.join(UNITS, "slb.toml")) as f:
            text = f.read()
        text = re.sub(r"10\.0\.0\.1[12]:\d+", f"127.0.0.1:{http_backend.getHost().port}", text)
        text = text.replace("domain=INET6", "domain=INET")
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(text)
        proc, (web, tls) = yield self.activate(path, 2)
        # The first connection makes systemd-socket-activate exec twistd.
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = yield agent.request(b"GET", f"http://127.0.0.1:{web}/".encode())
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"backend=app"), body)
        yield proc.wait_for(rf"listener web \(http\) listening on 127\.0\.0\.1:{web}\b", True)
        yield proc.wait_for(rf"listener tls \(tcp\) listening on 127\.0\.0\.1:{tls}\b", True)
        relayed = yield TCP4ClientEndpoint(reactor, "127.0.0.1", tls).connect(
            protocol.Factory.forProtocol(_OneRequest)
        )
        data = yield relayed.done
        self.assertIn(b"backend=app", data)

    @defer.inlineCallbacks
    def test_noSocketFromSystemdFailsClearly(self):
        """Run without systemd, a systemd: bind stops twistd with a message saying what is missing."""
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write('[backends.b]\nservers = [ { name = "a", address = "127.0.0.1:1" } ]\n'
                    '[listeners.web]\nprotocol = "tcp"\nbind = "systemd:domain=INET:index=0"\nbackends = "b"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        out, err, code = yield getProcessOutputAndValue(TWISTD, ["--pidfile=", "-n", "slb", "--config", path], env=env)
        self.assertNotEqual(code, 0)
        self.assertIn(b"listener 'web' cannot listen on 'systemd:domain=INET:index=0': no such socket was passed "
                      b"by systemd", out + err)
