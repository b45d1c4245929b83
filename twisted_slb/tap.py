"""
twistd support: C{twistd slb [--config slb.toml] [--check] [--port-base N]}.

With C{--config}, every listener of the file runs.  Without it, a demo runs
on loopback: demo backends and one listener per persistence mode, with a few
lines on how to try it.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from twisted.application.service import MultiService, Service
from twisted.python import usage

from twisted_slb._io import heap
from twisted_slb.config import ConfigError, describe, load_config

if TYPE_CHECKING:
    from twisted_slb.service import BalancerService
    from twisted_slb.workers import WorkerPoolService

# What signal.signal returns: the handler it replaced.
_SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class Options(usage.Options):
    synopsis = ("[--config slb.toml] [--check] | [--port-base N] [--print-config [--listen-base N]] "
                "| --upgrade --pidfile F")
    longdesc = (
        "Run the twisted_slb load balancer.  With --config, run the listeners of "
        "that TOML file; with --check, only validate it and print each listener's "
        "effective settings.  Without --config, run a demo on 127.0.0.1."
    )
    optFlags = [
        ["check", None, "Validate the config, print its effective settings and exit (0: valid, 1: invalid)."],
        ["print-config", None, "Demo only: print the demo's configuration (TOML) and exit."],
        ["upgrade", None, "Upgrade the running balancer of --pidfile (SIGUSR2) and wait for the outcome."],
    ]
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        ["port-base", None, None, "Demo only: first port of the demo listeners (default 8080).", int],
        ["pidfile", None, None, "With --upgrade: the pid file of the running balancer."],
        ["listen-base", None, None, "With --print-config: put the printed listeners on this port and the next "
         "three, so that the copy runs beside the demo (its backends stay the demo's).", int],
    ]

    def postOptions(self) -> None:
        if self["upgrade"]:
            if not self["pidfile"]:
                raise usage.UsageError("--upgrade needs --pidfile F (the running balancer's pid file)")
            from twisted_slb.upgrade import request_upgrade

            raise SystemExit(request_upgrade(self["pidfile"]))
        if self["pidfile"]:
            raise usage.UsageError("--pidfile (of slb) goes with --upgrade; twistd's own is twistd --pidfile F slb")
        path = self["config"]
        if path is None:
            if self["check"]:
                raise usage.UsageError("--check needs --config FILE")
            if self["print-config"]:
                from twisted_slb.demo import DEMO_PORT_BASE, demo_config_text

                base = self["port-base"]
                print(demo_config_text(DEMO_PORT_BASE if base is None else base, self["listen-base"]), end="")
                raise SystemExit(0)
            if self["listen-base"] is not None:
                raise usage.UsageError("--listen-base goes with --print-config")
            self["loaded"] = None
            return
        if self["port-base"] is not None or self["print-config"] or self["listen-base"] is not None:
            raise usage.UsageError("--port-base, --print-config and --listen-base apply to the demo only (no --config)")
        try:
            config = load_config(path)
        except ConfigError as e:
            # One message, no traceback, no usage text: the user's file is
            # wrong, not the command line.
            if self["check"]:
                print(f"INVALID: {e}", file=sys.stderr)
            else:
                from twisted_slb.upgrade import report_failure

                report_failure(str(e))  # to the process upgrading to us, if any
            raise SystemExit(str(e) if not self["check"] else 1)
        if self["check"]:
            print(describe(config))
            print(f"OK: {path} is valid")
            raise SystemExit(0)
        self["loaded"] = config


class _FreezeHeap(Service):
    """
    Once the listeners are started, takes what start-up allocated out of
    the garbage collector's walks (see L{twisted_slb._io.heap}).
    """

    def startService(self) -> None:
        Service.startService(self)
        heap.freeze_startup()


class _SIGHUPReload(Service):
    """Reloads the balancer's configuration on SIGHUP (twistd only)."""

    def __init__(self, balancer, reactor) -> None:
        self.balancer = balancer
        self.reactor = reactor
        self._previous: _SignalHandler = None

    def startService(self) -> None:
        import signal

        Service.startService(self)
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(
                signal.SIGHUP,
                lambda signum, frame: self.reactor.callFromThread(self.reload),
            )

    def reload(self) -> None:
        heap.thaw()  # the configuration replaced may then be collected
        self.balancer.reload()

    def stopService(self) -> None:
        import signal

        Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


def makeService(options: Options):
    # Our epoll reactor, unless one was chosen (twistd --reactor NAME): see
    # twisted_slb._io.reactor.  twistd logs its class as it starts.
    from twisted_slb._io.reactor import install_default

    install_default()
    from twisted.internet import reactor

    from twisted_slb.service import BalancerService

    from twisted_slb.upgrade import Inheritance, ReadyService, UpgradeService

    config = options["loaded"]
    if config is None:
        from twisted_slb.demo import demo_service

        return demo_service(options["port-base"], reactor)
    # Sockets (and stick tables) handed over by a process upgrading to us.
    inheritance = Inheritance.from_environment()
    adopted = inheritance.adopted(BalancerService._listener_configs(config))
    top = MultiService()
    balancer: Union[WorkerPoolService, BalancerService]
    if config.workers > 1:
        from twisted_slb.workers import WorkerPoolService

        balancer = WorkerPoolService(config, reactor, adopted=adopted)
    else:
        try:
            single = BalancerService(config, reactor, adopted=adopted)
        except ConfigError as e:
            # A TLS file that changed since it was checked, or that OpenSSL
            # refuses: one line, as for any other error in the file.
            raise SystemExit(f"{config.path}: {e}") from None
        inheritance.load_tables(single.stick_tables)
        balancer = single
    balancer.setServiceParent(top)
    _SIGHUPReload(balancer, reactor).setServiceParent(top)
    # twistd's options (parent of ours): their pid file moves aside during an upgrade.
    UpgradeService(balancer, reactor, twistd_options=getattr(options, "parent", None)).setServiceParent(top)
    ReadyService(inheritance).setServiceParent(top)  # after the listeners started: says "serving"
    trimmer = heap.trimming_service(reactor)  # gives memory freed after a burst back (glibc)
    if trimmer is not None:
        trimmer.setServiceParent(top)
    _FreezeHeap().setServiceParent(top)  # last: after the listeners started
    return top
