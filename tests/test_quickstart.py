"""
The quick start (docs/quickstart.md) as a new user types it, in a fresh
shell: the demo runs, then every command of the page, each through the real
C{./run-slb} (its pass-through of C{check} and C{slb-check}), with a
C{.venv} that is the test environment's own (its install step is replaced,
so nothing is installed).

The commands are written here once and each must appear in the page word
for word, so the page and this test cannot drift apart.  The page uses the
demo's ports (8080...); the test moves them to free ones.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys

from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import TestCase

from tests.test_twistd import Twistd
from twisted_slb.demo import PortTaken, check_ports_free

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(HERE, "docs", "quickstart.md")

#: (command as the page writes it, what its output must contain)
COMMANDS = [
    ("./run-slb slb-check http://127.0.0.1:8080/ -n 30", "persistent: 30/30 on backend "),
    ("./run-slb slb-check http://127.0.0.1:8081/ -n 30 --cookie JSESSIONID", "persistent: 30/30 on backend "),
    ("./run-slb slb-check --tcp 127.0.0.1:8082 --source 127.0.0.5 -n 10", "persistent: 10/10 on backend "),
    ("./run-slb slb-check http://127.0.0.1:8080/ -n 30 --admin http://127.0.0.1:8083/",
     "persistent: 30/30 on backend "),
    ("for a in 1 2 3; do echo quit | curl -s telnet://127.0.0.1:8082 --interface 127.0.0.5; done", "backend="),
    ("./run-slb --print-config --listen-base 9080 > slb.toml", ""),
    ("./run-slb check slb.toml", "OK: slb.toml is valid"),
]
#: started after COMMANDS, beside the demo, then asked by curl
BESIDE = "./run-slb --config slb.toml"
CURL_BESIDE = "curl -c jar http://127.0.0.1:9080/"


def free_base(span: int) -> int:
    """
    A port base with C{span} free ports after it (the demo's ports are fixed
    offsets of one base).  Chosen below the kernel's ephemeral range, where
    no other test's listening socket or connection is given a port, so that
    a run of free ports is found even while the rest of the suite churns
    through the ephemeral ones.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    low = 10000 if ephemeral_low - span > 10000 else 1024
    for _ in range(200):
        base = random.randrange(low, ephemeral_low - span)
        try:
            check_ports_free(range(base, base + span))
        except PortTaken:
            continue
        return base
    raise RuntimeError("no free range of ports")


class QuickstartTests(TestCase):
    """Every command of docs/quickstart.md works as written, the demo running."""

    timeout = 120

    def setUp(self):
        with open(QUICKSTART) as f:
            self.page = f.read()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, ".venv", "bin"))
        shutil.copy(os.path.join(HERE, "run-slb"), self.dir)
        bin_dir = os.path.dirname(sys.executable)
        for name in ("twistd", "slb-check"):
            os.symlink(os.path.join(bin_dir, name), os.path.join(self.dir, ".venv", "bin", name))
        # run-slb's install step (scripts/install-venv, tested in
        # tests.test_runslb) prints the virtualenv to use: here, the one made
        # of the test environment's own commands, with nothing to install.
        os.makedirs(os.path.join(self.dir, "scripts"))
        install = os.path.join(self.dir, "scripts", "install-venv")
        with open(install, "w") as f:
            f.write('#!/bin/sh\necho "$(cd "$(dirname "$0")/.." && pwd)/.venv"\n')
        os.chmod(install, 0o755)
        # A fresh shell: nothing of a virtualenv on PATH.
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                    "LANG": "C.UTF-8"}
        self.demo_base = free_base(24)
        self.beside_base = free_base(4)
        while abs(self.beside_base - self.demo_base) < 24:
            self.beside_base = free_base(4)

    def localize(self, command: str) -> str:
        """The page's ports (8080.. for the demo, 9080.. beside it) moved to the test's."""
        command = re.sub(r"\b80(8[0-3])\b", lambda m: str(self.demo_base + int(m.group(1)) - 80), command)
        command = re.sub(r"\b90(8[0-3])\b", lambda m: str(self.beside_base + int(m.group(1)) - 80), command)
        if "--print-config" in command:
            command = command.replace("--print-config", f"--print-config --port-base {self.demo_base}")
        return command

    def spawn(self, command: str) -> Twistd:
        proc = Twistd()
        transport = reactor.spawnProcess(proc, "/bin/sh", ["/bin/sh", "-c", "exec " + command],
                                         env=self.env, path=self.dir)
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))

        def stop():
            if not proc.ended.called:
                transport.signalProcess("TERM")
            return proc.ended

        self.addCleanup(stop)
        return proc

    @defer.inlineCallbacks
    def shell(self, command: str):
        out, err, code = yield utils.getProcessOutputAndValue(
            "/bin/sh", ["-c", command], env=self.env, path=self.dir)
        return out.decode("utf-8", "replace") + err.decode("utf-8", "replace"), code

    @defer.inlineCallbacks
    def test_quickstartCommandsWorkAsWritten(self):
        """
        With the demo running, each command of the quick start exits 0 and
        says what the page says; the printed configuration runs beside the
        demo and answers through the demo's backends.
        """
        for command, _ in COMMANDS + [(BESIDE, ""), (CURL_BESIDE, "")]:
            self.assertIn(command, self.page)
        self.assertIn("./run-slb            #", self.page)
        demo = self.spawn(f"./run-slb --port-base {self.demo_base}")
        yield demo.wait_for("twisted_slb demo is running")
        self.assertIn(f"http://127.0.0.1:{self.demo_base + 3}/", demo.output)  # the admin page's URL

        for command, expected in COMMANDS:
            output, code = yield self.shell(self.localize(command))
            self.assertEqual(code, 0, f"{command}\n{output}")
            self.assertIn(expected, output, command)
            if "telnet://" in command:
                self.assertEqual(len(re.findall(r"backend=\w", output)), 3, output)

        beside = self.spawn(self.localize(BESIDE))
        yield beside.wait_for(r"listener insert \(http\) listening on 127\.0\.0\.1:%d" % self.beside_base)
        output, code = yield self.shell(self.localize(CURL_BESIDE))
        self.assertEqual(code, 0, output)
        self.assertRegex(output, r"^backend=[abc] address=127\.0\.0\.1:\d+ ")
