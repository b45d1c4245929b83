"""
Tests for L{twisted_slb.tap} and the twistd plugin: the command line users
type (C{twistd slb --config F}, C{--check}) and what it prints.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess
import sys
import types

from twisted.application.internet import TimerService
from twisted.application.service import IServiceMaker
from twisted.internet import task
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb import tap
from twisted_slb._io import heap
from twisted_slb.service import BalancerService

GOOD = """
[backends.web]
servers = [ { name = "a", address = "127.0.0.1:9001" } ]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = { type = "source_ip", timeout = 1000 }
"""

BAD = GOOD.replace("timeout = 1000", "timeout = 5000")


def _twistd(*args: str, cwd: str) -> subprocess.CompletedProcess:
    """Run the installed twistd of this interpreter's environment."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.run(
        [twistd, "--pidfile=", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


class PluginTests(SynchronousTestCase):
    def test_pluginIsListed(self) -> None:
        """
        The C{slb} service maker is found by Twisted's plugin system, which is
        how C{twistd slb} finds it.
        """
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertIn("slb", names)

    def test_twistdHelpListsSlb(self) -> None:
        """C{twistd --help} lists the C{slb} command."""
        result = _twistd("--help", cwd=self.mktemp_dir())
        self.assertIn("slb", result.stdout)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path


class OptionsTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_configIsLoaded(self) -> None:
        """C{--config F} loads F into a L{Config} for makeService."""
        options = tap.Options()
        options.parseOptions(["--config", self.write(GOOD)])
        self.assertEqual(list(options["loaded"].listeners), ["tcp"])

    def test_badConfigIsOneMessage(self) -> None:
        """
        A bad file raises L{SystemExit} carrying the config error's message
        (twistd prints it and exits 1), not a usage error with the whole
        option summary.
        """
        options = tap.Options()
        path = self.write(BAD)
        with self.assertRaises(SystemExit) as cm:
            options.parseOptions(["--config", path])
        message = str(cm.exception.code)
        self.assertIn(path, message)
        self.assertIn("listeners.tcp.persistence.timeout", message)
        self.assertIn("5000", message)

    def test_portBaseWithConfigIsUsageError(self) -> None:
        """C{--port-base} only means something for the demo."""
        options = tap.Options()
        with self.assertRaises(usage.UsageError):
            options.parseOptions(["--config", self.write(GOOD), "--port-base", "9000"])

    def test_checkWithoutConfigIsUsageError(self) -> None:
        """--check without --config is a usage error."""
        options = tap.Options()
        with self.assertRaises(usage.UsageError):
            options.parseOptions(["--check"])

    def test_makeServiceRunsTheListeners(self) -> None:
        """makeService builds a service tree holding a L{BalancerService}."""
        options = tap.Options()
        options.parseOptions(["--config", self.write(GOOD)])
        top = tap.makeService(options)
        balancers = [s for s in top if isinstance(s, BalancerService)]
        self.assertEqual(len(balancers), 1)
        self.assertEqual(sorted(s.name for s in balancers[0]), ["health:web", "tcp"])


class HeapTests(SynchronousTestCase):
    """twistd slb freezes its start-up heap, and gives it back before a reload (L{twisted_slb._io.heap})."""

    def setUp(self) -> None:
        # A collector that records what is asked of it (CPython's interface).
        self.calls = []
        collector = types.SimpleNamespace(get_threshold=lambda: (700, 10, 10))
        for name in ("collect", "freeze", "unfreeze"):
            setattr(collector, name, lambda name=name: self.calls.append(name))
        collector.set_threshold = lambda *t: self.calls.append(t)
        self.patch(heap, "gc", collector)

    def test_frozenOnceTheListenersStarted(self) -> None:
        """makeService collects and freezes the heap (and sets the GC thresholds) after the balancer has started."""
        options = tap.Options()
        options.parseOptions(["--config", self.write(GOOD)])
        top = tap.makeService(options)
        services = list(top)
        self.assertIsInstance(services[0], BalancerService)
        self.assertIsInstance(services[-1], tap._FreezeHeap)  # MultiService starts them in this order
        services[-1].startService()
        self.assertEqual(self.calls, ["collect", "freeze", (10_000, 10, 10)])

    def test_reloadThawsFirst(self) -> None:
        """A SIGHUP reload unfreezes the heap before reloading."""
        class Balancer:
            def reload(balancer):
                self.calls.append("reload")

        tap._SIGHUPReload(Balancer(), None).reload()
        self.assertEqual(self.calls, ["unfreeze", "reload"])

    def test_aCollectorWithoutFreeze(self) -> None:
        """On PyPy, whose collector has no freeze, nothing is asked of it."""
        self.patch(heap, "gc", types.SimpleNamespace(collect=lambda: self.calls.append("collect")))
        heap.freeze_startup()
        heap.thaw()
        self.assertEqual(self.calls, [])

    def test_aHigherThresholdIsKept(self) -> None:
        """A young threshold set higher than ours (PYTHONGC-like tuning) is not lowered."""
        self.patch(heap.gc, "get_threshold", lambda: (50_000, 10, 10))
        heap.freeze_startup()
        self.assertEqual(self.calls, ["collect", "freeze", (50_000, 10, 10)])

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path


class FreedMemoryTrimmerTests(SynchronousTestCase):
    """Memory freed after a burst goes back to the system, once (L{twisted_slb._io.heap.FreedMemoryTrimmer})."""

    MB = 1 << 20

    def run_trimmer(self, in_use: list) -> list:
        """The looks (one per interval) at which a trimmer seeing C{in_use} bytes in use trims."""
        trims: list = []
        values = iter(in_use)
        current = [next(values)]
        trimmer = heap.FreedMemoryTrimmer(lambda: current[0], lambda: trims.append(look[0]))
        service = TimerService(heap.TRIM_INTERVAL, trimmer)
        service.clock = clock = task.Clock()
        look = [0]
        service.startService()
        self.addCleanup(service.stopService)
        for look[0], current[0] in enumerate(values, 1):
            clock.advance(heap.TRIM_INTERVAL)
        self.assertEqual(trimmer.trims, len(trims))
        return trims

    def test_trimsAfterEachBurst(self) -> None:
        """
        A fall of 32 MB from the peak trims; so does each further fall of
        4 MB while the burst unwinds, and nothing after; growing by 32 MB
        again is a new burst, trimmed when it falls as much.
        """
        mb = self.MB
        in_use = [10, 100, 80, 60, 40, 38, 30, 29, 28, 50, 30, 70, 80, 40, 40]
        self.assertEqual(self.run_trimmer([n * mb for n in in_use]), [3, 4, 6, 13])

    def test_aSteadyProcessIsNeverTrimmed(self) -> None:
        """Ups and downs of less than 32 MB (a process under steady load) never trim."""
        mb = self.MB
        self.assertEqual(self.run_trimmer([(40 + (i * 7) % 31) * mb for i in range(100)]), [])

    def test_withoutGlibcNoService(self) -> None:
        """Where the C library has no mallinfo2 and malloc_trim, nothing runs."""
        self.patch(heap.ctypes, "CDLL", lambda name: object())
        self.assertIsNone(heap.glibc_allocator())
        self.assertIsNone(heap.trimming_service())

    def test_glibcFunctions(self) -> None:
        """On glibc (this project's Linux), the bytes in use are read and malloc_trim(0) runs."""
        allocator = heap.glibc_allocator()
        if platform.libc_ver()[0] != "glibc":
            self.assertIsNone(allocator)
            return
        in_use, trim = allocator
        # malloc itself, not Python objects: PyPy's GC keeps small objects
        # in its own arenas, so bytearrays need not come from malloc's heap.
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        # No collection in between: PyPy's major collections free() their
        # arenas, which could take more from the count than the test adds.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            before = in_use()
            blocks = [libc.malloc(4096) for _ in range(2048)]  # from malloc's heap (large ones are mmap'd)
            try:
                self.assertGreaterEqual(in_use() - before, 8 * self.MB)
            finally:
                for block in blocks:
                    libc.free(block)
        finally:
            if was_enabled:
                gc.enable()
        self.assertIn(trim(), (0, 1))

    def test_twistdRunsIt(self) -> None:
        """twistd slb's service tree runs the trimmer every TRIM_INTERVAL seconds (glibc only)."""
        options = tap.Options()
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(GOOD)
        options.parseOptions(["--config", path])
        timers = [s for s in tap.makeService(options) if isinstance(s, TimerService)]
        if heap.glibc_allocator() is None:
            self.assertEqual(timers, [])
            return
        self.assertEqual(len(timers), 1)
        self.assertEqual(timers[0].step, heap.TRIM_INTERVAL)
        self.assertIsInstance(timers[0].call[0], heap.FreedMemoryTrimmer)


class CommandLineTests(SynchronousTestCase):
    """The real C{twistd} process, as a user runs it."""

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_checkValidPrintsEffectiveSettings(self) -> None:
        """
        C{twistd slb --config F --check} prints each listener with its
        persistence policy and exits 0 without listening.
        """
        path = self.write(GOOD)
        result = _twistd("slb", "--config", path, "--check", cwd=os.path.dirname(path))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("tcp", result.stdout)
        self.assertIn("source_ip", result.stdout)

    def test_checkInvalidExitsOne(self) -> None:
        """C{--check} on a bad file prints the one error and exits 1."""
        path = self.write(BAD)
        result = _twistd("slb", "--config", path, "--check", cwd=os.path.dirname(path))
        self.assertEqual(result.returncode, 1)
        self.assertIn("listeners.tcp.persistence.timeout", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_runBadConfigExitsWithOneMessage(self) -> None:
        """
        C{twistd -n slb --config F} with a bad file prints the message, no
        traceback, and exits non-zero.
        """
        path = self.write(BAD)
        result = _twistd("-n", "slb", "--config", path, cwd=os.path.dirname(path))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("listeners.tcp.persistence.timeout", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_checkNonPemCAIsOneLine(self) -> None:
        """
        C{--check} loads a backend group's C{tls.ca}: a non-PEM one is one
        line naming the field, exit 1; C{twistd -n slb} with it exits with
        that line, not a traceback.
        """
        ca = os.path.abspath(self.mktemp())
        with open(ca, "w") as f:
            f.write("not PEM\n")
        path = self.write(GOOD.replace("[listeners.tcp]", f'tls = {{ ca = "{ca}" }}\n\n[listeners.tcp]'))
        for args in (("slb", "--config", path, "--check"), ("-n", "slb", "--config", path)):
            result = _twistd(*args, cwd=os.path.dirname(path))
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(f"backends.web.tls.ca: {ca} is not a PEM certificate file", result.stderr)
            self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_notARegularFileIsOneLine(self) -> None:
        """C{twistd -n slb --config /dev/zero} exits with one line, not a MemoryError."""
        result = _twistd("-n", "slb", "--config", "/dev/zero", cwd=os.getcwd())
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/dev/zero: not a regular file (a character device)", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
