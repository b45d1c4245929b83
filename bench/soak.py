"""
A soak test of twisted_slb: mixed HTTP, HTTPS and TCP traffic for a long
time, with backends killed and restarted every few seconds and a reload
every minute, then a report.  Not part of the test suite.

    python -m bench.soak [--duration 600] [--clients 24] [--kill-every 5]
                         [--reload-every 60] [--grace 2] [--seed N]

Everything runs on 127.0.0.1, on free ports picked below the kernel's
ephemeral range (so that a killed backend's port cannot be taken by an
outgoing connection before it restarts), and stops by itself within
C{--duration} + 60 seconds:

 - three demo backends (C{python -m twisted_slb.demo}, an HTTP page naming
   the backend and a TCP port that greets with C{backend=NAME} and echoes
   lines), one killed with SIGKILL in turn every C{--kill-every} seconds and
   restarted on the same ports half that time later;
 - one twisted_slb (C{twistd -n slb}): an HTTP and an HTTPS listener
   (insert-cookie persistence, self-signed certificate) over the backends'
   HTTP ports, a TCP listener (source-IP persistence) over their echo ports,
   HTTP and TCP health checks every second, and an admin listener; reloaded
   (a weight changed, SIGHUP) every C{--reload-every} seconds, at least once;
 - C{--clients} visitor threads (standard library only).  A visitor uses one
   protocol with its own cookie jar (HTTP, HTTPS; most over one keep-alive
   connection, some with a new connection per request) or its own 127.0.x.y
   source address (TCP: a connection per session, greeting then a few echoed
   lines), makes 10 to 150 requests, then leaves and a new one takes its
   slot.  Some leave their connection open (the balancer must close it after
   its idle timeout) and a few close a connection before reading the answer.

Each answer names the backend that served it.  A failed request (no answer,
a wrong answer or a status other than 200) is I{expected} when the visitor's
pinned backend was down (killed and not yet listening again) at some time
from C{--grace} seconds before the request to its end; for a visitor not yet
pinned, when any backend was killed in that window.  Any other failure is
I{unexpected}.  A I{persistence break} is a visitor served by another backend
while its own stayed up since it last served it; a move after its backend
went down is a I{re-pin}.

File descriptors of the balancer are counted after a warm-up (not counting
pooled idle connections to backends, which close by themselves after 30 s)
and at the end, after the visitors are gone and idle connections have timed
out; the minimum over a few samples, so that a health check in flight is not
counted.

The exit status is 0 when there was no unexpected failure, no persistence
break, no descriptor leak (at most C{FD_SLACK} more at the end), every
abandoned connection was closed by the balancer, the balancer never died and
the soak's own machinery did not fail (a backend not restarting, a visitor
thread crashing); 1 otherwise; 3 if the run was cut by its time bound.  The report is printed
and written as JSON to C{bench/results/soak.json} (or C{--json PATH}).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

from bench.__main__ import HERE, ROOT, Proc, free_port, make_cert, rss_kb

NAMES = ("a", "b", "c")
#: Descriptors the balancer may hold at the end beyond those at the start.
#: Both counts are the minimum over several samples, so health-check
#: connections in flight are rarely counted; this covers the rare sample
#: where one or two are.
FD_SLACK = 2
#: Seconds of the balancer's upstream pool idle timeout (web/upstream.py).
POOL_IDLE_TIMEOUT = 30.0
#: Idle timeout of the listeners (client_idle_timeout, idle_timeout).
IDLE_TIMEOUT = 5
#: Client socket timeout.
CLIENT_TIMEOUT = 5.0
#: The run ends, cut if need be, this long after the traffic should have.
END_BOUND = 58.0

_BACKEND = re.compile(rb"backend=(\w+)")


# -- processes ---------------------------------------------------------------


class Children:
    """Every process started, so that all are killed whatever happens."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: List[Proc] = []
        self.closed = False

    def add(self, proc: Proc) -> Proc:
        with self.lock:
            self.procs.append(proc)
            closed = self.closed
        if closed:  # started by a thread while the run was being torn down
            self.kill_all()
        return proc

    def kill_all(self) -> None:
        """SIGKILL every process group still running (safe from any thread)."""
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.p.poll() is None:
                try:
                    os.killpg(proc.p.pid, signal.SIGKILL)
                except OSError:
                    pass

    def stop_all(self) -> None:
        """SIGTERM (then SIGKILL) every process; any started later is killed at once."""
        with self.lock:
            self.closed = True
            procs = list(self.procs)
        for proc in procs:
            try:
                proc.stop()
            except (OSError, ValueError):
                pass
        self.kill_all()


CHILDREN = Children()


class AppendProc(Proc):
    """L{Proc} whose log is appended to (a backend restarted keeps its log)."""

    def __init__(self, argv: List[str], log: str, env: Optional[dict] = None) -> None:
        self.log = open(log, "ab")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True)


def child_env() -> dict:
    # The tree being tested comes first, as for the soak itself.
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""))


_picked: set = set()


def pick_port() -> int:
    """
    A free 127.0.0.1 port below the ephemeral range, so that no outgoing
    connection takes it while its backend is down; an ephemeral one if none.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low > 12000:
        for _ in range(200):
            port = random.randint(10000, low - 1)
            if port in _picked:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                s.close()
            _picked.add(port)
            return port
    return free_port()


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_ports(ports, timeout: float, alive=lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while time.monotonic() < deadline and alive():
        pending = [p for p in pending if not listening(p)]
        if not pending:
            return True
        time.sleep(0.05)
    return False


def source_tree() -> str:
    """The commit of the tree being tested, and whether twisted_slb/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "twisted_slb"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in twisted_slb/' if dirty else ''}"


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def fd_breakdown(pid: int, listener_ports: set, backend_ports: set) -> Dict[str, int]:
    """The process's descriptors by kind, from /proc/PID/fd and /proc/PID/net/tcp{,6}."""
    sockets: Dict[str, Tuple[int, int, str]] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                    sockets[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            pass
    kinds = collections.Counter()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {"total": -1}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds["total"] += 1
        if not target.startswith("socket:["):
            kinds["other"] += 1
            continue
        entry = sockets.get(target[8:-1])
        if entry is None:
            kinds["other_sockets"] += 1
        elif entry[2] == "0A":
            kinds["listening"] += 1
        elif entry[0] in listener_ports:
            kinds["clients"] += 1
        elif entry[1] in backend_ports:
            kinds["to_backends"] += 1
        else:
            kinds["other_sockets"] += 1
    return dict(kinds)


# -- backends ------------------------------------------------------------------


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.http_port = pick_port()
        self.tcp_port = pick_port()
        self.proc: Optional[Proc] = None
        #: [killed at, listening again at (None while down)], in order.
        self.down: List[list] = []


class Backends:
    """The three demo backends, killable and restartable on their ports."""

    def __init__(self, tmp: str, python: str) -> None:
        self.tmp = tmp
        self.python = python
        self.by_name = {name: Backend(name) for name in NAMES}
        self.lock = threading.Lock()
        self.kills = 0
        self.restarts = 0
        self.restart_failures = 0

    @property
    def http_ports(self) -> set:
        return {b.http_port for b in self.by_name.values()}

    @property
    def tcp_ports(self) -> set:
        return {b.tcp_port for b in self.by_name.values()}

    def spawn(self, name: str) -> None:
        b = self.by_name[name]
        argv = [self.python, "-m", "twisted_slb.demo", "--name", name, "--port", str(b.http_port),
                "--tcp-port", str(b.tcp_port), "--interface", "127.0.0.1"]
        b.proc = CHILDREN.add(AppendProc(argv, os.path.join(self.tmp, f"backend-{name}.log"), env=child_env()))

    def wait_up(self, name: str, timeout: float = 15.0) -> bool:
        b = self.by_name[name]
        proc = b.proc
        ok = proc is not None and wait_ports((b.http_port, b.tcp_port), timeout, lambda: proc.p.poll() is None)
        with self.lock:
            if ok and b.down and b.down[-1][1] is None:
                b.down[-1][1] = time.monotonic()
        return ok

    def start(self, name: str) -> bool:
        """(Re)start a backend on its ports; False if it does not listen within 15 s."""
        self.spawn(name)
        if self.wait_up(name):
            return True
        self.kill(name, record=False)
        return False

    def kill(self, name: str, record: bool = True) -> None:
        b = self.by_name[name]
        with self.lock:
            proc, b.proc = b.proc, None
            if record:
                self.kills += 1
                if not b.down or b.down[-1][1] is not None:
                    b.down.append([time.monotonic(), None])
        if proc is not None:
            try:
                os.killpg(proc.p.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.p.wait()
            proc.log.close()

    def is_up(self, name: str) -> bool:
        b = self.by_name[name]
        with self.lock:
            return not b.down or b.down[-1][1] is not None

    def was_down(self, name: str, t0: float, t1: float) -> bool:
        """Whether the backend was down (killed, not listening yet) at some time in [t0, t1]."""
        b = self.by_name[name]
        with self.lock:
            return any(k <= t1 and (u is None or u >= t0) for k, u in reversed(b.down))

    def killed_in(self, t0: float, t1: float) -> bool:
        """Whether any backend was killed in [t0, t1]."""
        with self.lock:
            return any(t0 <= k <= t1 for b in self.by_name.values() for k, _ in b.down)


# -- statistics -----------------------------------------------------------------

COUNTERS = ("sent", "answered", "failed_expected", "failed_unexpected", "persistence_breaks", "repins",
            "visitors", "aborted")


class Stats:
    def __init__(self, start: float) -> None:
        self.start = start
        self.lock = threading.Lock()
        self.by_protocol = {p: dict.fromkeys(COUNTERS, 0) for p in ("http", "https", "tcp")}
        self.errors_expected: collections.Counter = collections.Counter()
        self.errors_unexpected: collections.Counter = collections.Counter()
        self.examples: List[str] = []

    def add(self, protocol: str, key: str, example: str = "") -> None:
        with self.lock:
            self.by_protocol[protocol][key] += 1
            if example and len(self.examples) < 30:
                self.examples.append(f"t={time.monotonic() - self.start:.1f}s {example}")

    def error(self, expected: bool, protocol: str, e: BaseException) -> str:
        text = f"{protocol}: {type(e).__name__}: {e}"[:120]
        with self.lock:
            (self.errors_expected if expected else self.errors_unexpected)[text] += 1
        return text

    def total(self, key: str) -> int:
        with self.lock:
            return sum(c[key] for c in self.by_protocol.values())


class BadAnswer(Exception):
    pass


# -- visitors -------------------------------------------------------------------


class Visitor:
    """One client: a protocol, a cookie jar or a source address, a pinned backend."""

    def __init__(self, soak: "Soak", index: int, rng: random.Random) -> None:
        self.soak = soak
        self.rng = rng
        self.protocol = rng.choices(("http", "https", "tcp"), (35, 35, 30))[0]
        self.keepalive = rng.random() < 0.7
        self.requests = rng.randint(10, 150)
        self.cookie: Optional[str] = None
        self.index = index
        self.source = f"127.0.{1 + index // 250 % 250}.{1 + index % 250}"
        self.backend: Optional[str] = None
        self.pinned_since = 0.0  # start of the last request its backend answered
        self.conn: Optional[http.client.HTTPConnection] = None
        self.may_abandon = True

    # the protocols

    def new_http(self) -> http.client.HTTPConnection:
        soak = self.soak
        if self.protocol == "https":
            return http.client.HTTPSConnection("127.0.0.1", soak.ports["https"], timeout=CLIENT_TIMEOUT,
                                               context=soak.tls)
        return http.client.HTTPConnection("127.0.0.1", soak.ports["http"], timeout=CLIENT_TIMEOUT)

    def http_request(self) -> str:
        if self.conn is None:
            self.conn = self.new_http()
        conn = self.conn
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if not self.keepalive:
            headers["Connection"] = "close"
        conn.request("GET", f"/soak/{self.rng.randrange(1000)}", headers=headers)
        response = conn.getresponse()
        body = response.read()
        for header in response.headers.get_all("Set-Cookie") or []:
            if header.startswith("SERVERID="):
                self.cookie = header.split(";", 1)[0]
        if response.will_close or not self.keepalive:
            self.close()
        if response.status != 200:
            raise BadAnswer(f"status {response.status} {body[:60]!r}")
        match = _BACKEND.search(body)
        if match is None:
            raise BadAnswer(f"no backend name in {body[:60]!r}")
        return match.group(1).decode()

    def tcp_session(self) -> str:
        """Connect, read the greeting, have 1 to 3 lines echoed, close (or leave it open)."""
        s = socket.create_connection(("127.0.0.1", self.soak.ports["tcp"]), timeout=CLIENT_TIMEOUT,
                                     source_address=(self.source, 0))
        try:
            f = s.makefile("rb")
            greeting = f.readline()
            match = _BACKEND.match(greeting)
            if match is None:
                raise BadAnswer(f"greeting {greeting[:60]!r}")
            for _ in range(self.rng.randint(1, 3)):
                token = b"%x" % self.rng.getrandbits(64)
                s.sendall(token + b"\n")
                echo = f.readline()
                if echo != token + b"\n":
                    raise BadAnswer(f"echo {echo[:60]!r} for a line of {len(token) + 1} bytes")
            f.close()
            if self.may_abandon and self.rng.random() < 0.03:
                self.soak.abandon(s, "tcp")
                s = None
            return match.group(1).decode()
        finally:
            if s is not None:
                s.close()

    def abort(self) -> None:
        """A client that goes away before the answer: the balancer must clean up."""
        try:
            if self.protocol == "tcp":
                socket.create_connection(("127.0.0.1", self.soak.ports["tcp"]), timeout=CLIENT_TIMEOUT,
                                         source_address=(self.source, 0)).close()
                return
            conn = self.new_http()
            conn.request("GET", "/abort", headers={"Cookie": self.cookie} if self.cookie else {})
            conn.close()
        except OSError:
            pass

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def leave(self) -> None:
        """Close its connection, or (one in five) leave it open for the balancer to time out."""
        if self.conn is not None and self.conn.sock is not None and self.rng.random() < 0.2:
            self.soak.abandon(self.conn, self.protocol)
            self.conn = None
        self.close()

    # the visit

    def one(self) -> None:
        soak, stats = self.soak, self.soak.stats
        if self.rng.random() < 0.01:
            self.abort()
            stats.add(self.protocol, "aborted")
            return
        stats.add(self.protocol, "sent")
        pinned = self.backend
        t0 = time.monotonic()
        try:
            served = self.tcp_session() if self.protocol == "tcp" else self.http_request()
        except Exception as e:  # noqa: BLE001 - every failure is counted
            self.close()
            t1 = time.monotonic()
            if pinned is not None:
                expected = soak.backends.was_down(pinned, t0 - soak.args.grace, t1)
            else:
                expected = soak.backends.killed_in(t0 - soak.args.grace, t1)
            text = stats.error(expected, self.protocol, e)
            if expected:
                stats.add(self.protocol, "failed_expected")
            else:
                states = " ".join(f"{n}={'up' if soak.backends.is_up(n) else 'down'}" for n in NAMES)
                stats.add(self.protocol, "failed_unexpected",
                          f"{text} (visitor #{self.index} pinned to {pinned}, {t1 - t0:.2f}s; now {states})")
            return
        stats.add(self.protocol, "answered")
        if pinned is not None and served != pinned:
            if soak.backends.was_down(pinned, self.pinned_since, time.monotonic()):
                stats.add(self.protocol, "repins")
            else:
                stats.add(self.protocol, "persistence_breaks",
                          f"{self.protocol} visitor #{self.index}"
                          f"{' from ' + self.source if self.protocol == 'tcp' else ''} "
                          f"pinned to {pinned} (up since it last served it) served by {served}")
        self.backend = served
        self.pinned_since = t0

    def run(self) -> None:
        stopping = self.soak.stopping
        try:
            for _ in range(self.requests):
                if stopping.is_set():
                    break
                self.one()
                stopping.wait(self.rng.uniform(0.0, 0.05))
        finally:
            if stopping.is_set() and self.conn is not None and self.conn.sock is not None:
                # The run is over: leave the connection to the balancer's idle timeout.
                self.soak.abandon(self.conn, self.protocol)
                self.conn = None
            self.leave()


# -- the run ----------------------------------------------------------------------


def tcp_state(sock) -> int:
    """The kernel's TCP state of a socket (1 established, 7 closed, 8 close-wait...)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return 7


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.tmp = tempfile.mkdtemp(prefix="slb-soak-")
        self.backends = Backends(self.tmp, args.slb_python)
        self.ports = {k: pick_port() for k in ("http", "https", "tcp", "admin")}
        self.cert, self.key, _ = make_cert(self.tmp)
        self.tls = ssl.create_default_context()
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE
        self.stats = Stats(self.t0)
        self.stopping = threading.Event()
        self.config = os.path.join(self.tmp, "slb.toml")
        self.slb_log = os.path.join(self.tmp, "slb.log")
        self.slb: Optional[Proc] = None
        self.slb_died = False
        self.reloads = 0
        self.reloads_verified = 0
        self.weight_b = 100
        self.rss: List[Tuple[float, float]] = []
        self.abandoned: List[Tuple[float, object, str]] = []
        self.abandoned_lock = threading.Lock()
        self.abandoned_closed = 0
        self.abandoned_not_closed = 0
        self.chaos_errors: List[str] = []

    @property
    def pid(self) -> int:
        return self.slb.p.pid

    # configuration

    def write_config(self) -> None:
        def servers(port_of):
            return ", ".join(
                f'{{ name = "{n}", address = "127.0.0.1:{port_of(b)}", weight = {self.weight_b if n == "b" else 100} }}'
                for n, b in self.backends.by_name.items()
            )

        p = self.ports
        text = f"""# Written by bench/soak.py.
grace_period = 2

[admin]
bind = "tcp:{p['admin']}:interface=127.0.0.1"

[backends.web]
scheduler = "wrr"
connect_timeout = 2
retries = 2
servers = [ {servers(lambda b: b.http_port)} ]
health_check = {{ type = "http", path = "/health", interval = 1, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2 }}

[backends.echo]
scheduler = "wrr"
connect_timeout = 2
retries = 2
servers = [ {servers(lambda b: b.tcp_port)} ]
health_check = {{ type = "tcp", interval = 1, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2 }}

[listeners.http]
protocol = "http"
bind = "tcp:{p['http']}:interface=127.0.0.1:backlog=1024"
backends = "web"
access_log = false
client_idle_timeout = {IDLE_TIMEOUT}
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.https]
protocol = "https"
bind = "tcp:{p['https']}:interface=127.0.0.1:backlog=1024"
backends = "web"
access_log = false
client_idle_timeout = {IDLE_TIMEOUT}
persistence = {{ type = "insert_cookie", timeout = 3600 }}
certificates = [ {{ cert = "{self.cert}", key = "{self.key}" }} ]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:{p['tcp']}:interface=127.0.0.1:backlog=1024"
backends = "echo"
access_log = false
idle_timeout = {IDLE_TIMEOUT}
persistence = {{ type = "source_ip", timeout = 1000 }}
"""
        with open(self.config + ".new", "w") as f:
            f.write(text)
        os.replace(self.config + ".new", self.config)

    def admin_stats(self) -> Optional[dict]:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.ports["admin"], timeout=3)
            try:
                conn.request("GET", "/stats")
                return json.loads(conn.getresponse().read())
            finally:
                conn.close()
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def backend_states(self) -> Dict[str, Tuple[str, int]]:
        """C{"group/name": (state, weight)} from the admin listener."""
        stats = self.admin_stats() or {"groups": []}
        return {f"{g['name']}/{b['name']}": (b["state"], b["weight"]) for g in stats["groups"] for b in g["backends"]}

    # phases

    def start(self) -> None:
        for name in NAMES:
            self.backends.spawn(name)
        for name in NAMES:
            if not self.backends.wait_up(name):
                raise RuntimeError(f"backend {name} did not start; see {self.tmp}/backend-{name}.log")
        self.write_config()
        argv = [self.args.slb_python, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", f"--logfile={self.slb_log}", "slb", "--config", self.config]
        self.slb = CHILDREN.add(AppendProc(argv, os.path.join(self.tmp, "slb.out"), env=child_env()))
        if not wait_ports(self.ports.values(), 30, lambda: self.slb.p.poll() is None):
            raise RuntimeError(f"twisted_slb did not start; see {self.slb_log} and {self.tmp}/slb.out")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = self.backend_states()
            if len(states) == 2 * len(NAMES) and all(s == "up" for s, _ in states.values()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the backends are not all up by the health checks: {self.backend_states()}")

    def warm_up(self) -> None:
        """A few requests through each listener, so that what is opened lazily is open."""
        rng = random.Random(0)
        for protocol in ("http", "https", "tcp"):
            for keepalive in (True, False):
                v = Visitor(self, 0, rng)
                v.protocol, v.keepalive, v.may_abandon = protocol, keepalive, False
                for _ in range(5):
                    if protocol == "tcp":
                        v.tcp_session()
                    else:
                        v.http_request()
                v.close()

    def fds_now(self) -> Dict[str, int]:
        return fd_breakdown(self.pid, set(self.ports.values()),
                            self.backends.http_ports | self.backends.tcp_ports)

    def fds_min(self, samples: int = 10, exclude_pool: bool = False) -> Dict[str, int]:
        """The sample with the fewest descriptors (without pooled backend connections if asked)."""
        def key(s):
            return s["total"] - (s.get("to_backends", 0) + s.get("clients", 0) if exclude_pool else 0)

        best = None
        for _ in range(samples):
            s = self.fds_now()
            if best is None or key(s) < key(best):
                best = s
            time.sleep(0.1)
        best = dict(best)
        best["counted"] = key(best)
        return best

    def abandon(self, conn, protocol: str) -> None:
        """Keep a connection open without using it: the balancer must close it."""
        with self.abandoned_lock:
            self.abandoned.append((time.monotonic(), conn, protocol))

    def check_abandoned(self, older_than: float) -> None:
        """Connections left open for C{older_than} seconds must have been closed by the balancer."""
        now = time.monotonic()
        with self.abandoned_lock:
            due = [a for a in self.abandoned if now - a[0] >= older_than]
            self.abandoned = [a for a in self.abandoned if now - a[0] < older_than]
        for since, conn, protocol in due:
            sock = getattr(conn, "sock", conn)
            if sock is None or tcp_state(sock) != 1:
                self.abandoned_closed += 1
            else:
                self.abandoned_not_closed += 1
                with self.stats.lock:
                    if len(self.stats.examples) < 30:
                        self.stats.examples.append(
                            f"t={since - self.t0:.1f}s {protocol} connection left open still open "
                            f"after {now - since:.1f}s")
            conn.close()

    def chaos(self, deadline: float) -> None:
        """Kill a backend every kill_every seconds, restart it half-way, reload every reload_every."""
        args = self.args
        now = time.monotonic()
        next_kill = now + 1.0
        next_reload = now + args.reload_every
        turn = 0
        try:
            while not self.stopping.is_set() and next_kill < deadline - args.kill_every / 2:
                if self.stopping.wait(max(0.0, next_kill - time.monotonic())):
                    break
                victim = NAMES[turn % len(NAMES)]
                turn += 1
                self.backends.kill(victim)
                if self.stopping.wait(args.kill_every / 2):
                    break
                self.restart(victim)
                if time.monotonic() >= next_reload:
                    self.reload()
                    next_reload += args.reload_every
                next_kill += args.kill_every
        except Exception as e:  # noqa: BLE001 - reported, never silent
            self.chaos_errors.append(f"chaos: {type(e).__name__}: {e}")
        finally:
            for name in NAMES:
                if not self.backends.is_up(name):
                    self.restart(name)

    def restart(self, name: str) -> None:
        for _ in range(3):
            if self.backends.start(name):
                self.backends.restarts += 1
                return
            self.backends.restart_failures += 1
        self.chaos_errors.append(f"backend {name} did not restart")

    def reload(self) -> None:
        self.reloads += 1
        self.weight_b = 90 if self.weight_b == 100 else 100
        self.write_config()
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            states = self.backend_states()
            if states and all(w == self.weight_b for k, (_, w) in states.items() if k.endswith("/b")):
                self.reloads_verified += 1
                return
            time.sleep(0.1)

    def visitors(self, slot: int, deadline: float) -> None:
        rng = random.Random(f"{self.args.seed}-{slot}")
        index = slot
        while not self.stopping.is_set() and time.monotonic() < deadline:
            visitor = Visitor(self, index, rng)
            self.stats.add(visitor.protocol, "visitors")
            try:
                visitor.run()
            except Exception as e:  # noqa: BLE001 - a bug of the soak itself: reported
                self.chaos_errors.append(f"visitor: {type(e).__name__}: {e}")
            index += self.args.clients

    def sample(self) -> None:
        if self.slb.p.poll() is not None:
            self.slb_died = True
            return
        self.rss.append((time.monotonic() - self.t0, rss_kb(self.pid) / 1024))

    def log_errors(self) -> Tuple[int, List[str]]:
        """Tracebacks, unhandled errors and failed reloads in the balancer's log."""
        count, first = 0, []
        try:
            with open(self.slb_log, errors="replace") as f:
                for line in f:
                    if "Traceback" in line or "Unhandled" in line or "reload failed" in line:
                        count += 1
                        if len(first) < 5:
                            first.append(line.strip()[:200])
        except OSError:
            pass
        return count, first

    def progress(self, start: float) -> None:
        s = self.stats
        print(f"{time.monotonic() - start:6.0f}s  sent {s.total('sent')}  answered {s.total('answered')}  "
              f"failed {s.total('failed_expected')} expected / {s.total('failed_unexpected')} unexpected  "
              f"breaks {s.total('persistence_breaks')}  repins {s.total('repins')}  "
              f"kills {self.backends.kills}  reloads {self.reloads}  "
              f"rss {self.rss[-1][1] if self.rss else 0:.1f} MB  fds {open_fds(self.pid)}", flush=True)

    def run(self, hard_deadline: float) -> dict:
        args = self.args
        self.start()
        self.warm_up()
        time.sleep(0.5)
        fds_start = self.fds_min(exclude_pool=True)
        rss_start = rss_kb(self.pid) / 1024
        print(f"twisted_slb pid {self.pid} up, backends up; {fds_start['counted']} descriptors after warm-up "
              f"({fds_start}); {args.duration:.0f} s of traffic", flush=True)
        start = time.monotonic()
        deadline = start + args.duration
        chaos = threading.Thread(target=self.chaos, args=(deadline,), daemon=True)
        visitors = [threading.Thread(target=self.visitors, args=(i, deadline), daemon=True)
                    for i in range(args.clients)]
        chaos.start()
        for t in visitors:
            t.start()
        every = 10 if args.duration <= 120 else 30
        last = start
        while time.monotonic() < deadline and not self.slb_died:
            time.sleep(0.5)
            self.sample()
            self.check_abandoned(IDLE_TIMEOUT + 5)
            if time.monotonic() - last >= every:
                last = time.monotonic()
                self.progress(start)
        traffic_s = time.monotonic() - start
        self.stopping.set()
        for t in visitors + [chaos]:
            t.join(max(0.1, min(CLIENT_TIMEOUT + 5, hard_deadline - 45 - time.monotonic())))
        self.progress(start)
        stuck = sum(t.is_alive() for t in visitors)

        # The end: no more clients; wait for idle client connections to time out
        # and pooled backend connections to be swept, then count.
        settle_deadline = min(time.monotonic() + POOL_IDLE_TIMEOUT + 10, hard_deadline - 8)
        print(f"traffic stopped; waiting up to {settle_deadline - time.monotonic():.0f} s for idle connections "
              f"to close", flush=True)
        settled = 0
        while time.monotonic() < settle_deadline and not self.slb_died:
            self.sample()
            now = self.fds_now()
            settled = settled + 1 if now["total"] <= fds_start["counted"] + FD_SLACK else 0
            if settled >= 3 and time.monotonic() - start - traffic_s > IDLE_TIMEOUT + 5:
                break
            time.sleep(0.5)
        fds_end = self.fds_min() if not self.slb_died else {"total": -1, "counted": -1}
        self.check_abandoned(0)
        errors, first_errors = self.log_errors()
        final_stats = self.admin_stats()
        s = self.stats
        t_start = start - self.t0
        totals = {k: s.total(k) for k in COUNTERS}
        leak = fds_end["counted"] > fds_start["counted"] + FD_SLACK
        report = {
            "duration_s": args.duration,
            "traffic_s": round(traffic_s, 1),
            "clients": args.clients,
            "seed": args.seed,
            "source": source_tree(),
            "python": sys.version.split()[0],
            "settings": {"kill_every_s": args.kill_every, "reload_every_s": args.reload_every,
                         "grace_s": args.grace, "idle_timeout_s": IDLE_TIMEOUT},
            **totals,
            "by_protocol": s.by_protocol,
            "errors_expected": dict(s.errors_expected.most_common(10)),
            "errors_unexpected": dict(s.errors_unexpected.most_common(10)),
            "examples": s.examples,
            "backend_kills": self.backends.kills,
            "backend_restarts": self.backends.restarts,
            "backend_restart_failures": self.backends.restart_failures,
            "reloads": self.reloads,
            "reloads_verified": self.reloads_verified,
            "abandoned_connections_closed_by_balancer": self.abandoned_closed,
            "abandoned_connections_left_open": self.abandoned_not_closed,
            "rss_start_mb": round(rss_start, 1),
            "rss_peak_mb": round(max([r for _, r in self.rss] or [rss_start]), 1),
            "rss_end_mb": round(self.rss[-1][1], 1) if self.rss else None,
            "rss_by_minute_mb": [round(max([r for t, r in self.rss if int((t - t_start) // 60) == m] or [0]), 1)
                                 for m in range(int((self.rss[-1][0] - t_start) // 60) + 1)] if self.rss else [],
            "fds_start": fds_start["counted"],
            "fds_end": fds_end["counted"],
            "fds_start_detail": fds_start,
            "fds_end_detail": fds_end,
            "fd_slack": FD_SLACK,
            "fd_leak": leak,
            "balancer_died": self.slb_died,
            "balancer_log_errors": errors,
            "balancer_log_first_errors": first_errors,
            "balancer_stats": final_stats,
            "soak_errors": self.chaos_errors + ([f"{stuck} visitor threads still running"] if stuck else []),
            "logs": self.tmp,
        }
        # A run whose own machinery failed (a backend that would not restart,
        # a visitor thread that crashed or hung) proves nothing: not OK either.
        report["ok"] = (not totals["failed_unexpected"] and not totals["persistence_breaks"] and not leak
                        and not self.abandoned_not_closed and not self.slb_died and not report["soak_errors"])
        return report

    def stop(self) -> None:
        self.stopping.set()
        CHILDREN.stop_all()


# -- report ---------------------------------------------------------------------


def print_report(r: dict) -> None:
    rows = [("", "http", "https", "tcp", "total")]
    labels = [("sent", "requests sent"), ("answered", "answered OK"),
              ("failed_expected", "failed, expected (backend down/just killed)"),
              ("failed_unexpected", "failed, UNEXPECTED (backend up)"),
              ("persistence_breaks", "persistence breaks (backend up)"),
              ("repins", "re-pins after a kill"), ("visitors", "visitors"),
              ("aborted", "requests aborted by the client")]
    for key, label in labels:
        rows.append((label, *(str(r["by_protocol"][p][key]) for p in ("http", "https", "tcp")), str(r[key])))
    width = max(len(row[0]) for row in rows)
    print()
    for row in rows:
        print(f"{row[0]:<{width}}  " + "  ".join(f"{c:>9}" for c in row[1:]))
    print()
    lines = [
        ("traffic", f"{r['traffic_s']} s, {r['clients']} visitor threads"),
        ("backend kills / restarts", f"{r['backend_kills']} / {r['backend_restarts']}"
                                     f" ({r['backend_restart_failures']} restart attempts failed)"),
        ("reloads (verified by /stats)", f"{r['reloads']} ({r['reloads_verified']})"),
        ("abandoned connections", f"{r['abandoned_connections_closed_by_balancer']} closed by the balancer, "
                                  f"{r['abandoned_connections_left_open']} left open"),
        ("balancer RSS start / peak / end", f"{r['rss_start_mb']} / {r['rss_peak_mb']} / {r['rss_end_mb']} MB"),
        ("balancer fds start / end", f"{r['fds_start']} / {r['fds_end']} (slack {r['fd_slack']}; "
                                     f"{'LEAK' if r['fd_leak'] else 'no leak'})"),
        ("balancer log errors", str(r["balancer_log_errors"])),
        ("balancer died", str(r["balancer_died"])),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    for text, n in r["errors_expected"].items():
        print(f"  expected   {n:6}  {text}")
    for text, n in r["errors_unexpected"].items():
        print(f"  UNEXPECTED {n:6}  {text}")
    for example in r["examples"]:
        print(f"  example: {example}")
    for line in r["balancer_log_first_errors"]:
        print(f"  balancer log: {line}")
    for line in r["soak_errors"]:
        print(f"  soak: {line}")
    print(f"\nverdict: {'OK' if r['ok'] else 'FAILED'}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--clients", type=int, default=24, help="concurrent visitors (default 24)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between backend kills (default 5)")
    parser.add_argument("--reload-every", type=float, default=60.0,
                        help="seconds between reloads (default 60, at most half the duration)")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="a failure is expected if the visitor's backend was down from this many seconds "
                             "before the request to its end (default 2)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the visitors' choices")
    parser.add_argument("--slb-python", default=sys.executable, help="interpreter of the balancer and backends")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "soak.json"))
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory of logs")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients <= 0 or args.kill_every <= 0:
        parser.error("--duration, --clients and --kill-every must be positive")
    args.reload_every = min(args.reload_every, max(args.duration / 2, 1.0))  # at least one reload
    if args.seed is None:
        args.seed = random.randrange(1 << 30)

    hard_deadline = time.monotonic() + args.duration + END_BOUND

    def cut() -> None:
        print(f"\nbench.soak: still running {END_BOUND:.0f} s after the traffic should have ended; "
              f"killing everything", file=sys.stderr, flush=True)
        CHILDREN.kill_all()
        os._exit(3)

    watchdog = threading.Timer(hard_deadline - time.monotonic(), cut)
    watchdog.daemon = True
    watchdog.start()

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    soak = None
    try:
        soak = Soak(args)
        report = soak.run(hard_deadline)
    finally:
        if soak is not None:
            soak.stop()
        CHILDREN.kill_all()
    watchdog.cancel()
    if report["ok"] and not args.keep_logs:
        shutil.rmtree(soak.tmp, ignore_errors=True)
        report["logs"] = None
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print_report(report)
    if report["logs"]:
        print(f"logs kept in {report['logs']}")
    print(f"JSON written to {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
