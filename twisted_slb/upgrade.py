# -*- test-case-name: tests.test_upgrade -*-
"""
Upgrading the running code without refusing a connection, and telling
systemd that the balancer is ready.

On C{SIGUSR2} (or C{twistd slb --upgrade --pidfile F}) the running process,
the I{old} one:

 1. checks that the configuration file still loads (if not, it says why and
    keeps serving);
 2. writes its stick tables to a file (L{TABLES_FORMAT}, version
    L{TABLES_VERSION}, see L{dump_tables});
 3. renames its pid file C{F} to C{F.oldbin} (as nginx does), so that the new
    process can write C{F};
 4. starts its own command line again: the new process inherits the
    listening sockets, named in C{TWISTED_SLB_LISTEN_FDS} (JSON: listener name
    -> C{{"bind", "fd", "family"}}), the stick table file in
    C{TWISTED_SLB_STICK_TABLES}, and the write end of a pipe in
    C{TWISTED_SLB_READY_FD};
 5. the new process adopts every socket whose listener kept its C{bind}
    (L{IReactorSocket.adoptStreamPort}), loads the tables, and once its
    services are started writes C{"ready PID"} on the pipe (or
    C{"failed: why"} when its configuration does not load);
 6. the old process then stops accepting and lets open connections finish
    within C{grace_period}, exactly as on C{SIGTERM}, and exits.

The listening sockets are never closed, so the kernel queues every new
connection for whichever process accepts it: none is refused.  When the new
process fails (it exits, says C{failed:}, or is not ready within
L{READY_TIMEOUT} seconds) the old one logs why, ends it, puts its pid file
back and keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
from types import FrameType
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Tuple, Union

from twisted.application.service import Service
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from twisted_slb._io.twisted_private import keep_socket_on_close

log = Logger(namespace="twisted_slb.upgrade")

ENV_LISTEN_FDS = "TWISTED_SLB_LISTEN_FDS"
ENV_READY_FD = "TWISTED_SLB_READY_FD"
ENV_STICK_TABLES = "TWISTED_SLB_STICK_TABLES"

#: the C{"format"} field of a stick table dump
TABLES_FORMAT = "twisted_slb stick tables"
#: the C{"version"} field this code writes and reads
TABLES_VERSION = 1
#: seconds the old process waits for the new one to say it is serving
READY_TIMEOUT = 60.0

#: listener name -> (bind description, file descriptor, address family)
Sockets = Dict[str, Tuple[str, int, int]]


# -- the listening sockets ------------------------------------------------------


def encode_sockets(sockets: Mapping[str, Tuple[str, int, int]]) -> str:
    """The value of C{TWISTED_SLB_LISTEN_FDS} for C{sockets}."""
    return json.dumps(
        {name: {"bind": bind, "fd": fd, "family": family} for name, (bind, fd, family) in sockets.items()},
        sort_keys=True,
    )


def decode_sockets(text: str) -> Sockets:
    """
    Parse C{TWISTED_SLB_LISTEN_FDS}.

    @raise ValueError: it is not what L{encode_sockets} writes.
    """
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{ENV_LISTEN_FDS} is not a JSON object: {text!r}")
    sockets: Sockets = {}
    for name, entry in doc.items():
        try:
            bind, fd, family = entry["bind"], entry["fd"], entry["family"]
        except (TypeError, KeyError):
            raise ValueError(f"{ENV_LISTEN_FDS}: listener {name!r} needs bind, fd and family: {entry!r}") from None
        if not isinstance(bind, str) or not isinstance(fd, int) or not isinstance(family, int) or fd < 0:
            raise ValueError(f"{ENV_LISTEN_FDS}: listener {name!r} has a bad bind, fd or family: {entry!r}")
        sockets[name] = (bind, fd, family)
    return sockets


def adoption(sockets: Sockets, listeners: Iterable) -> Dict[str, Tuple[int, int]]:
    """
    Listener name -> C{(fd, family)} for the inherited sockets a new process
    serves: those whose listener still exists with the same C{bind}.  (A
    listener whose address changed binds its new one; its old socket is
    closed with the other unused ones.)
    """
    binds = {listener.name: listener.bind for listener in listeners}
    return {
        name: (fd, family)
        for name, (bind, fd, family) in sockets.items()
        if binds.get(name) == bind
    }


# -- stick tables -------------------------------------------------------------------


class _DumpableTable(Protocol):
    """
    What dumping and restoring a stick table uses: L{IStickTable}'s C{items}
    and, of both its implementations (L{StickTable} and
    L{twisted_slb.persistence.store.SharedStickTable}), C{len} and C{restore}.
    """

    def __len__(self) -> int: ...

    def items(self) -> Iterator[Tuple[bytes, str, float]]: ...

    def restore(self, key: bytes, backend_key: str, idle: float) -> None: ...


def dump_tables(tables: Mapping[str, _DumpableTable], now: float) -> dict:
    """
    The stick tables as a JSON-ready document::

        {"format": "twisted_slb stick tables", "version": 1,
         "written": 1700000000.0,                     # wall clock, seconds
         "tables": {"web/app": [["10.0.0.7", "a", 12.5], ...]}}

    Each table (keyed C{listener/group}) lists C{[client, backend, seconds
    idle]}, oldest first; C{client} is the table's key (bytes: an address, a
    header's or a cookie's value) as Latin-1 text.

    @param now: the wall clock (C{time.time()}).
    """
    return {
        "format": TABLES_FORMAT,
        "version": TABLES_VERSION,
        "written": now,
        # A table's keys are bytes (an address, a header's or a cookie's
        # value, a digest); Latin-1 maps each byte to one character and back.
        "tables": {key: [[c.decode("latin-1"), b, round(idle, 3)] for c, b, idle in table.items()]
                   for key, table in tables.items()},
    }


def load_tables(doc: dict, tables: Mapping[str, _DumpableTable], now: float) -> int:
    """
    Restore the entries of a L{dump_tables} document into the tables of the
    same key (entries of a table that no longer exists are dropped), aged by
    the time since it was written.

    @return: how many entries were restored.
    @raise ValueError: not a dump of a version this code reads.
    """
    if not isinstance(doc, dict) or doc.get("format") != TABLES_FORMAT:
        raise ValueError("not a twisted_slb stick table dump")
    if doc.get("version") != TABLES_VERSION:
        raise ValueError(f"stick table dump version {doc.get('version')!r}; this version reads {TABLES_VERSION}")
    age = max(0.0, now - float(doc["written"]))
    restored = 0
    for key, entries in doc["tables"].items():
        table = tables.get(key)
        if table is None:
            continue
        for client, backend, idle in entries:
            before = len(table)
            table.restore(client.encode("latin-1"), backend, idle + age)
            restored += len(table) > before
    return restored


# -- systemd ------------------------------------------------------------------------


def notify_systemd(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """
    Send C{state} (e.g. C{"READY=1"}) to systemd's notification socket, as
    C{sd_notify(3)} does; nothing when C{$NOTIFY_SOCKET} is unset.

    @return: whether a notification was sent.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode("utf-8"), path)
    return True


# -- the new process ----------------------------------------------------------------


class Inheritance:
    """
    What a new process got from the process that started it for an
    upgrade (nothing, in a process started otherwise).

    @ivar sockets: inherited listening sockets, see L{decode_sockets}.
    @ivar ready_fd: the pipe to report on, or L{None}.
    @ivar tables_path: the stick table dump, or L{None}.
    """

    def __init__(self, sockets: Optional[Sockets] = None, ready_fd: Optional[int] = None,
                 tables_path: Optional[str] = None) -> None:
        self.sockets = dict(sockets or {})
        self.ready_fd = ready_fd
        self.tables_path = tables_path

    @classmethod
    def from_environment(cls, environ=None) -> "Inheritance":
        """Read (and remove, so that no child of ours sees them) the variables."""
        environ = os.environ if environ is None else environ
        listen = environ.pop(ENV_LISTEN_FDS, None)
        ready = environ.pop(ENV_READY_FD, None)
        tables = environ.pop(ENV_STICK_TABLES, None)
        return cls(decode_sockets(listen) if listen else None, int(ready) if ready else None, tables or None)

    def adopted(self, listeners: Iterable) -> Dict[str, Tuple[int, int]]:
        return adoption(self.sockets, listeners)

    def load_tables(self, tables: Mapping[str, _DumpableTable], now: Optional[float] = None) -> int:
        """Load and delete the stick table dump, if there is one; log what happened."""
        path, self.tables_path = self.tables_path, None
        if path is None:
            return 0
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            restored = load_tables(doc, tables, time.time() if now is None else now)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("stick tables from the previous process not loaded ({path}): {error}", path=path, error=str(e))
            return 0
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        log.info("{count} stick table entries taken over from the previous process", count=restored)
        return restored

    def close_sockets(self) -> None:
        """Close the inherited descriptors: adopted ports hold duplicates."""
        sockets, self.sockets = self.sockets, {}
        for _, fd, _ in sockets.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def report(self, line: str) -> None:
        """Tell the old process C{line} (C{"ready PID"} or C{"failed: ..."}) and close the pipe."""
        fd, self.ready_fd = self.ready_fd, None
        if fd is None:
            return
        try:
            os.write(fd, line.encode("utf-8", "replace") + b"\n")
            os.close(fd)
        except OSError:
            pass


def report_failure(message: str, environ=None) -> None:
    """In a new process that cannot start: tell the old process why."""
    environ = os.environ if environ is None else environ
    ready = environ.get(ENV_READY_FD)
    if ready:
        Inheritance(ready_fd=int(ready)).report("failed: " + " ".join(message.split()))


class ReadyService(Service):
    """
    The last service of C{twistd slb}: once every listener is started it
    closes the inherited descriptors, tells the old process (if any) and
    systemd (if any) that this process is serving.
    """

    def __init__(self, inheritance: Inheritance) -> None:
        self.inheritance = inheritance

    def startService(self) -> None:
        Service.startService(self)
        pid = os.getpid()
        self.inheritance.close_sockets()
        self.inheritance.report(f"ready {pid}")
        try:
            notify_systemd(f"READY=1\nMAINPID={pid}\nSTATUS=serving")
        except OSError as e:
            log.warn("could not notify systemd: {error}", error=str(e))


# -- the old process ----------------------------------------------------------------


def keep_listening_after_close(port) -> None:
    """
    Make C{port.stopListening()} close only this process's descriptor.

    Twisted's C{tcp.Port} calls C{shutdown()} on a socket it bound itself
    before closing it, and on Linux that stops the socket listening in every
    process that shares it: the new process would be left with a dead
    socket.  Twisted skips the shutdown for adopted sockets through the
    private C{_shouldShutdown} flag, and no public API sets it
    (L{twisted_slb._io.twisted_private.keep_socket_on_close}; tests.test_twisted_private
    checks that the flag still exists).
    """
    keep_socket_on_close(port)


def _listening_ports(balancer) -> list:
    """The listening ports of a balancer or of a worker pool's parent."""
    ports = getattr(balancer, "ports", None)
    if isinstance(ports, dict):  # WorkerPoolService: bind -> port
        return list(ports.values())
    from twisted_slb.service import ListenerService

    return [s.port for s in balancer if isinstance(s, ListenerService) and s.port is not None]



class _NewProcess(ProcessProtocol):
    def __init__(self, upgrade: "UpgradeService", ready_fd: int) -> None:
        self.upgrade = upgrade
        self.ready_fd = ready_fd
        self.buffer = b""
        self.pipe_closed = False
        self.exited = None

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != self.ready_fd:
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.upgrade._line(self, line.decode("utf-8", "replace"))

    def childConnectionLost(self, fd: int) -> None:
        if fd == self.ready_fd:
            self.pipe_closed = True
            if self.exited is not None:
                self.upgrade._failed(self, "it exited before it was ready")

    def processEnded(self, reason) -> None:
        self.exited = reason
        code, signum = reason.value.exitCode, reason.value.signal
        if signum is not None:
            self.upgrade._failed(self, f"it was killed by signal {signum}")
        elif code:
            self.upgrade._failed(self, f"it exited with code {code} (its messages are above)")
        elif self.pipe_closed:
            self.upgrade._failed(self, "it exited before it was ready")
        # Exit code 0 with the pipe open: twistd daemonized; its child reports.


class UpgradeService(Service):
    """
    Upgrades on C{SIGUSR2}: starts this process's command line again with
    the listening sockets, and stops once the new process serves.

    @ivar balancer: a L{twisted_slb.service.BalancerService} or
        L{twisted_slb.workers.WorkerPoolService} (C{listening_sockets()},
        C{config}, optionally C{stick_tables}).
    @ivar twistd_options: twistd's own options (their C{"pidfile"} is read
        when twistd exits), or L{None}.
    """

    ready_timeout = READY_TIMEOUT

    def __init__(self, balancer, reactor, argv: Optional[List[str]] = None,
                 twistd_options=None, cwd: Optional[str] = None) -> None:
        self.balancer = balancer
        self.reactor = reactor
        if argv is None:
            argv = [sys.executable] + list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)[1:])
        self.argv = argv
        self.twistd_options = twistd_options
        self.cwd = os.getcwd() if cwd is None else cwd
        self.pending: Optional[_NewProcess] = None
        self._timeout = None
        self._tables_path: Optional[str] = None
        self._pidfile: Optional[str] = None
        # What signal.signal returned: the SIGUSR2 handler replaced.
        self._previous: Union[Callable[[int, Optional[FrameType]], Any], int, None] = None

    # -- signals ----------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._previous = signal.signal(
            signal.SIGUSR2, lambda signum, frame: self.reactor.callFromThread(self.upgrade)
        )

    def stopService(self):
        Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGUSR2, self._previous)
            self._previous = None

    # -- the pid file and the status file ----------------------------------------

    def _pidfile_path(self) -> Optional[str]:
        options = self.twistd_options
        return (options.get("pidfile") or None) if options is not None else None

    def _status(self, text: str) -> None:
        """Write the outcome where C{twistd slb --upgrade} waits for it (F.upgrade)."""
        path = self._pidfile or self._pidfile_path()
        if path is None:
            return
        try:
            with open(path + ".upgrade", "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            log.warn("could not write {path}: {error}", path=path + ".upgrade", error=str(e))

    # -- upgrading ----------------------------------------------------------------

    def upgrade(self) -> bool:
        """
        Start the new process (see the module docstring).

        @return: whether a new process was started.
        """
        if self.pending is not None:
            assert self.pending.transport is not None  # pending once spawnProcess connected it
            log.warn("upgrade already under way (new process {pid}); SIGUSR2 ignored",
                     pid=self.pending.transport.pid)
            return False
        if not self.running:
            return False
        from twisted_slb.config import ConfigError, load_config

        try:
            load_config(self.balancer.config.path)
        except ConfigError as e:
            return self._refuse(f"the configuration does not load: {e}")
        sockets = self.balancer.listening_sockets()
        env = dict(os.environ)
        env[ENV_LISTEN_FDS] = encode_sockets(sockets)
        tables = getattr(self.balancer, "stick_tables", None)
        if tables:
            fd, self._tables_path = tempfile.mkstemp(prefix="twisted-slb-tables-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(dump_tables(tables, time.time()), f)
            env[ENV_STICK_TABLES] = self._tables_path
        child_fds: Dict[int, object] = {0: 0, 1: 1, 2: 2}
        for _, fd, _ in sockets.values():
            child_fds[fd] = fd
        ready_fd = max(child_fds) + 1
        child_fds[ready_fd] = "r"
        env[ENV_READY_FD] = str(ready_fd)
        path = self._pidfile_path()
        if path is not None and os.path.exists(path):
            os.rename(path, path + ".oldbin")
            self._pidfile = path
            self.twistd_options["pidfile"] = path + ".oldbin"
        proto = _NewProcess(self, ready_fd)
        self.pending = proto
        try:
            self.reactor.spawnProcess(proto, self.argv[0], self.argv, env=env, path=self.cwd, childFDs=child_fds)
        except OSError as e:
            self._failed(proto, f"it could not be started: {e}")
            return False
        self._timeout = self.reactor.callLater(
            self.ready_timeout, lambda: self._failed(proto, f"it was not ready after {self.ready_timeout:g} s")
        )
        assert proto.transport is not None  # spawnProcess connected it
        log.info("upgrade: started process {pid} ({argv}) with {count} listening sockets",
                 pid=proto.transport.pid, argv=" ".join(self.argv), count=len(sockets))
        return True

    def _refuse(self, reason: str) -> bool:
        log.error("upgrade failed, process {pid} keeps serving: {reason}", pid=os.getpid(), reason=reason)
        self._status(f"failed: {reason}")
        return False

    def _line(self, proto: _NewProcess, line: str) -> None:
        if line.startswith("ready"):
            self._ready(proto, line.partition(" ")[2].strip())
        elif line.startswith("failed:"):
            self._failed(proto, line[len("failed:"):].strip())

    def _settle(self, proto: _NewProcess) -> bool:
        """End the wait for C{proto}; False if it was not the one waited for."""
        if self.pending is not proto:
            return False
        self.pending = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        return True

    def _ready(self, proto: _NewProcess, pid: str) -> None:
        if not self._settle(proto):
            return
        self._tables_path = None  # the new process deletes it
        grace = getattr(self.balancer.config, "grace_period", 0)
        log.info(
            "upgrade: process {new} is serving; process {old} stops accepting and lets open connections "
            "finish (at most {grace} s)", new=pid, old=os.getpid(), grace=grace,
        )
        self._status(f"ok {pid}")
        self._pidfile = None
        for port in _listening_ports(self.balancer):
            keep_listening_after_close(port)
        self.reactor.stop()

    def _failed(self, proto: _NewProcess, reason: str) -> None:
        if not self._settle(proto):
            return
        pid = proto.transport.pid if proto.transport is not None else None
        if proto.exited is None and pid is not None:
            assert proto.transport is not None  # it has a pid
            try:
                proto.transport.signalProcess("KILL")
            except Exception:  # it ended meanwhile
                pass
        if self._tables_path is not None:
            try:
                os.unlink(self._tables_path)
            except OSError:
                pass
            self._tables_path = None
        if self._pidfile is not None:
            try:
                os.rename(self._pidfile + ".oldbin", self._pidfile)
            except OSError as e:
                log.warn("could not restore the pid file {path}: {error}", path=self._pidfile, error=str(e))
            self.twistd_options["pidfile"] = self._pidfile
        self._refuse(f"the new process {pid} failed: {reason}")
        self._pidfile = None


# -- twistd slb --upgrade ---------------------------------------------------------


def request_upgrade(pidfile: str, timeout: float = READY_TIMEOUT + 10, sleep=time.sleep,
                    out=sys.stdout) -> int:
    """
    C{twistd slb --upgrade --pidfile F}: send SIGUSR2 to the process of the
    pid file and wait for the outcome it writes to C{F.upgrade}.

    @return: the exit status: 0 upgraded, 1 failed (the old process keeps
        serving) or no outcome in time.
    """
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        print(f"twisted_slb: cannot read a pid from {pidfile}: {e}", file=out)
        return 1
    status = pidfile + ".upgrade"
    try:
        os.unlink(status)
    except FileNotFoundError:
        pass
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError as e:
        print(f"twisted_slb: cannot signal process {pid}: {e}", file=out)
        return 1
    waited = 0.0
    while waited < timeout:
        try:
            with open(status, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n"):
            os.unlink(status)
            text = text.strip()
            if text.startswith("ok "):
                print(f"upgraded: process {text[3:]} serves; process {pid} finishes its connections and exits",
                      file=out)
                return 0
            print(f"upgrade failed, process {pid} keeps serving: {text[len('failed: '):]}", file=out)
            return 1
        sleep(0.1)
        waited += 0.1
    print(f"twisted_slb: no outcome from process {pid} after {timeout:g} s (see its log)", file=out)
    return 1
