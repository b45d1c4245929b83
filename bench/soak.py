"""
A soak test of twisted_slb: mixed HTTP, HTTPS and TCP traffic for a long
time, with backends killed and restarted every few seconds and a reload
every minute, then a report.

    python -m bench.soak [--duration 600] [--clients 24] [--kill-every 5] [--reload-every 60]

Everything runs on 127.0.0.1 on ephemeral ports and stops by itself:

 - three demo backends (C{python -m twisted_slb.demo}), each killed with
   SIGKILL in turn every C{--kill-every} seconds and restarted on the same
   port half that time later;
 - one twisted_slb (C{twistd -n slb}) with an HTTP and an HTTPS listener
   (insert cookie) and a TCP listener (source IP), HTTP health checks every
   second, reloaded (SIGHUP, with a weight changed) every C{--reload-every}
   seconds;
 - C{--clients} client threads (standard library only): each is a visitor
   that makes a random number of requests over one protocol, remembering
   its cookie (or, for TCP, using its own 127.0.0.N source address), then
   leaves and is replaced by a new one.

Each answer names the backend that served it.  A request counts as failed
when it gets no answer or a status other than 200; a failure is expected
when the backend the visitor was pinned to was killed in the last
C{--grace} seconds (or is down now), and unexpected otherwise.  A
persistence break is a visitor sent to another backend while its own was
up and not recently killed.  At the end the clients stop, the balancer is
given time to close idle connections, and its open file descriptors are
compared with those at the start.

The exit status is 0 when there was no unexpected failure, no persistence
break and no descriptor leak; the report is printed and written as JSON to
C{bench/results/soak.json}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from bench.__main__ import HERE, ROOT, Proc, free_port, make_cert, rss_kb, wait_port

NAMES = ("a", "b", "c")
#: Descriptors the balancer may hold at the end beyond those at the start
#: (a health check in flight per backend, and the admin connection).
FD_SLACK = 6


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Backends:
    """The three demo backends, killable and restartable on their ports."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.ports = {name: free_port() for name in NAMES}
        self.procs: Dict[str, Optional[Proc]] = {name: None for name in NAMES}
        self.killed_at: Dict[str, float] = {name: 0.0 for name in NAMES}
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        argv = [sys.executable, "-m", "twisted_slb.demo", "--name", name, "--port", str(self.ports[name])]
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = Proc(argv, os.path.join(self.tmp, f"backend-{name}.log"), env=env)
        wait_port(self.ports[name])
        with self.lock:
            self.procs[name] = proc

    def kill(self, name: str) -> None:
        with self.lock:
            proc, self.procs[name] = self.procs[name], None
            self.killed_at[name] = time.monotonic()
        if proc is not None:
            os.killpg(proc.p.pid, signal.SIGKILL)
            proc.p.wait()
            proc.log.close()

    def is_up(self, name: str) -> bool:
        with self.lock:
            return self.procs[name] is not None

    def recently_killed(self, name: str, grace: float) -> bool:
        with self.lock:
            return self.procs[name] is None or time.monotonic() - self.killed_at[name] < grace

    def stop(self) -> None:
        for name in NAMES:
            proc = self.procs[name]
            if proc is not None:
                proc.stop()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {
            "sent": 0, "answered": 0, "failed_expected": 0, "failed_unexpected": 0,
            "persistence_breaks": 0, "repins_after_kill": 0, "visitors": 0,
        }
        self.by_protocol: Dict[str, int] = {"http": 0, "https": 0, "tcp": 0}
        self.examples: List[str] = []

    def add(self, key: str, example: str = "") -> None:
        with self.lock:
            self.counts[key] += 1
            if example and len(self.examples) < 20:
                self.examples.append(example)


_BACKEND = re.compile(rb"backend=(\w+)")


class Visitor:
    """One client: a protocol, a cookie jar or a source address, a pinned backend."""

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.protocol = random.choice(("http", "https", "tcp"))
        self.requests = random.randint(10, 150)
        self.cookie: Optional[str] = None
        # A source address of its own for source-IP persistence.
        self.source = f"127.0.{1 + index // 250 % 250}.{1 + index % 250}"
        self.backend: Optional[str] = None

    def request(self) -> Optional[bytes]:
        soak = self.soak
        if self.protocol == "tcp":
            with socket.create_connection(("127.0.0.1", soak.ports["tcp"]), timeout=10,
                                          source_address=(self.source, 0)) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"tcp: {data[:60]!r}")
            return data
        if self.protocol == "https":
            conn = http.client.HTTPSConnection("127.0.0.1", soak.ports["https"], timeout=10, context=soak.tls)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", soak.ports["http"], timeout=10)
        try:
            headers = {"Cookie": self.cookie} if self.cookie else {}
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            body = response.read()
            for header in response.headers.get_all("Set-Cookie") or []:
                if header.startswith("SERVERID="):
                    self.cookie = header.split(";", 1)[0]
            if response.status != 200:
                raise RuntimeError(f"{self.protocol}: status {response.status}")
            return body
        finally:
            conn.close()

    def run(self) -> None:
        soak, stats = self.soak, self.soak.stats
        for _ in range(self.requests):
            if soak.stopping.is_set():
                return
            stats.add("sent")
            with stats.lock:
                stats.by_protocol[self.protocol] += 1
            pinned = self.backend
            try:
                body = self.request()
            except Exception as e:  # noqa: BLE001 - every failure is counted
                if pinned is None or soak.backends.recently_killed(pinned, soak.args.grace) or \
                        not soak.backends.is_up(pinned):
                    stats.add("failed_expected")
                else:
                    stats.add("failed_unexpected", f"{self.protocol} pinned to {pinned}: {e}")
                continue
            stats.add("answered")
            match = _BACKEND.search(body)
            served = match.group(1).decode() if match else "?"
            if pinned is not None and served != pinned:
                if soak.backends.recently_killed(pinned, soak.args.grace):
                    stats.add("repins_after_kill")
                else:
                    stats.add("persistence_breaks", f"{self.protocol} pinned to {pinned}, served by {served}")
            self.backend = served
            time.sleep(random.uniform(0.0, 0.05))


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="slb-soak-")
        self.backends = Backends(self.tmp)
        self.ports = {k: free_port() for k in ("http", "https", "tcp", "admin")}
        self.cert, self.key, _ = make_cert(self.tmp)
        self.tls = ssl.create_default_context()
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE
        self.stats = Stats()
        self.stopping = threading.Event()
        self.config = os.path.join(self.tmp, "slb.toml")
        self.slb: Optional[Proc] = None
        self.reloads = 0
        self.kills = 0
        self.samples: List[Dict[str, float]] = []

    def write_config(self, weight_a: int) -> None:
        servers = ", ".join(
            f'{{ name = "{n}", address = "127.0.0.1:{p}", weight = {weight_a if n == "a" else 100} }}'
            for n, p in self.backends.ports.items()
        )
        text = f"""grace_period = 5

[admin]
bind = "tcp:{self.ports['admin']}:interface=127.0.0.1"

[backends.web]
scheduler = "rr"
connect_timeout = 2
servers = [ {servers} ]
health_check = {{ type = "http", path = "/health", interval = 1, timeout = 1, healthy_threshold = 2, unhealthy_threshold = 1 }}

[listeners.http]
protocol = "http"
bind = "tcp:{self.ports['http']}:interface=127.0.0.1:backlog=1024"
backends = "web"
access_log = false
client_idle_timeout = 5
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.https]
protocol = "https"
bind = "tcp:{self.ports['https']}:interface=127.0.0.1:backlog=1024"
backends = "web"
access_log = false
client_idle_timeout = 5
persistence = {{ type = "insert_cookie", timeout = 3600 }}
certificates = [ {{ cert = "{self.cert}", key = "{self.key}" }} ]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:{self.ports['tcp']}:interface=127.0.0.1:backlog=1024"
backends = "web"
access_log = false
idle_timeout = 5
persistence = {{ type = "source_ip", timeout = 1000 }}
"""
        with open(self.config + ".new", "w") as f:
            f.write(text)
        os.replace(self.config + ".new", self.config)

    def start(self) -> None:
        for name in NAMES:
            self.backends.start(name)
        self.write_config(100)
        argv = [self.args.slb_python, "-c", "from twisted.scripts.twistd import run; run()",
                "--pidfile=", "-n", f"--logfile={os.path.join(self.tmp, 'slb.log')}", "slb", "--config", self.config]
        self.slb = Proc(argv, os.path.join(self.tmp, "slb.out"), env=dict(os.environ, PYTHONPATH=ROOT))
        for port in self.ports.values():
            wait_port(port)

    def chaos(self, deadline: float) -> None:
        """Kill a backend every kill_every seconds; restart it half-way; reload every reload_every."""
        next_reload = time.monotonic() + self.args.reload_every
        order = list(NAMES)
        while not self.stopping.is_set() and time.monotonic() < deadline:
            victim = order[self.kills % len(order)]
            self.backends.kill(victim)
            self.kills += 1
            if self.stopping.wait(self.args.kill_every / 2):
                break
            self.backends.start(victim)
            if time.monotonic() >= next_reload:
                self.reloads += 1
                self.write_config(100 + self.reloads % 2)
                os.kill(self.slb.p.pid, signal.SIGHUP)
                next_reload += self.args.reload_every
            if self.stopping.wait(self.args.kill_every / 2):
                break

    def visitors(self, slot: int, deadline: float) -> None:
        index = slot
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self.stats.add("visitors")
            Visitor(self, index).run()
            index += self.args.clients

    def sample(self) -> None:
        pid = self.slb.p.pid
        self.samples.append({"t": time.monotonic(), "rss_mb": rss_kb(pid) / 1024, "fds": open_fds(pid)})

    def run(self) -> int:
        args = self.args
        self.start()
        time.sleep(3)  # health checks see every backend up (a benchmark, not a test)
        pid = self.slb.p.pid
        fds_start = open_fds(pid)
        start = time.monotonic()
        deadline = start + args.duration
        threads = [threading.Thread(target=self.chaos, args=(deadline,), daemon=True)]
        threads += [threading.Thread(target=self.visitors, args=(i, deadline), daemon=True)
                    for i in range(args.clients)]
        for t in threads:
            t.start()
        last = 0.0
        while time.monotonic() < deadline:
            time.sleep(1)
            self.sample()
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                c = self.stats.counts
                print(f"{time.monotonic() - start:6.0f}s  sent {c['sent']}  failed {c['failed_expected']} expected, "
                      f"{c['failed_unexpected']} unexpected  breaks {c['persistence_breaks']}  "
                      f"rss {self.samples[-1]['rss_mb']:.1f} MB  fds {self.samples[-1]['fds']}", flush=True)
        self.stopping.set()
        for t in threads:
            t.join(30)
        for name in NAMES:
            if not self.backends.is_up(name):
                self.backends.start(name)
        # Idle client connections close after client_idle_timeout (5 s) and
        # pooled backend connections after the pool's idle timeout (30 s).
        time.sleep(37)
        self.sample()
        fds_end = open_fds(pid)
        c = self.stats.counts
        report = {
            "duration_s": args.duration,
            "clients": args.clients,
            **c,
            "by_protocol": self.stats.by_protocol,
            "backend_kills": self.kills,
            "reloads": self.reloads,
            "peak_rss_mb": max(s["rss_mb"] for s in self.samples),
            "end_rss_mb": self.samples[-1]["rss_mb"],
            "fds_start": fds_start,
            "fds_end": fds_end,
            "fd_slack": FD_SLACK,
            "examples": self.stats.examples,
        }
        leak = fds_end > fds_start + FD_SLACK
        report["ok"] = not c["failed_unexpected"] and not c["persistence_breaks"] and not leak
        return report

    def stop(self) -> None:
        self.stopping.set()
        if self.slb is not None:
            self.slb.stop()
        self.backends.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--clients", type=int, default=24, help="concurrent visitors (default 24)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between backend kills (default 5)")
    parser.add_argument("--reload-every", type=float, default=60.0, help="seconds between reloads (default 60)")
    parser.add_argument("--grace", type=float, default=4.0,
                        help="seconds after a kill during which failures of its clients are expected (default 4)")
    parser.add_argument("--slb-python", default=sys.executable)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "soak.json"))
    args = parser.parse_args(argv)
    args.reload_every = min(args.reload_every, max(args.duration / 2, 1.0))  # at least one reload
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print()
    for key, value in report.items():
        if key != "examples":
            print(f"{key:22} {value}")
    for example in report["examples"]:
        print(f"  example: {example}")
    print(f"\nJSON written to {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
