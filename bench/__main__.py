"""
twisted_slb against HAProxy and Caddy, side by side, in one run.

    python -m bench [--duration 5] [--runs 3] [--only http_keepalive,...]
                    [--slb-python PATH] [--workers N] [--json out.json] [--quick]

Starts nginx backends (a small body, and a large file for throughput), then
runs each workload against the backend directly, HAProxy (same persistence:
C{cookie SERVERID insert indirect nocache}, C{stick on src}), Caddy
(C{reverse_proxy} with C{lb_policy cookie SERVERID}, and C{lb_policy
ip_hash} for the source-IP rows: Debian's Caddy has no TCP proxy, so its
"TCP" rows are HTTP proxying) and twisted_slb, and prints a table of
absolute figures and ratios to HAProxy and to Caddy.  HAProxy and Caddy
write no access log; twisted_slb's HTTP rows run twice, without its access
log and with it as a user gets it by default (twistd's log file).  Loopback
only, bounded in time: a warm-up, C{--runs} runs, the median.  See
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from bench import udp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TOOLS = {"wrk": "wrk", "haproxy": "haproxy", "nginx": "nginx-light", "curl": "curl", "caddy": "caddy",
         "openssl": "openssl", "h2load": "nghttp2-client"}


def ensure_tools(only=frozenset()) -> None:
    """
    Install wrk, HAProxy, nginx (with its stream module for the udp row) and
    Caddy from Debian's packages if missing.
    """
    tools = {"nginx": TOOLS["nginx"]} if set(only) == {"udp"} else TOOLS
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    if (not only or "udp" in only) and not os.path.exists(udp.STREAM_MODULE):
        missing.append("libnginx-mod-stream")
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install them (apt-get install {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Proc:
    """A background process, stopped at exit."""

    def __init__(self, argv: List[str], log: str, env: Optional[dict] = None) -> None:
        self.log = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


# -- the systems under test --------------------------------------------------


def make_cert(tmp: str) -> tuple:
    """A self-signed RSA 2048 certificate for 127.0.0.1 / localhost (both LBs use it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    import datetime
    import ipaddress

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    cert_path, key_path, both = (os.path.join(tmp, n) for n in ("cert.pem", "key.pem", "both.pem"))
    for path, data in ((cert_path, cert_pem), (key_path, key_pem), (both, cert_pem + key_pem)):
        with open(path, "wb") as f:
            f.write(data)
    return cert_path, key_path, both


class Setup:
    """Ports and processes of one benchmark run."""

    def __init__(self, tmp: str, args) -> None:
        self.tmp = tmp
        self.args = args
        self.procs: List[Proc] = []
        self.backend_ports = [free_port(), free_port()]
        # the same nginx backends over TLS (the http_tls_backend row)
        self.tls_backend_ports = [free_port(), free_port()]
        self.ha = {k: free_port() for k in ("http", "tcp", "https", "tls_backend")}
        self.slb = {k: free_port() for k in ("http", "tcp", "https", "http_log", "tls_backend")}
        self.caddy = {k: free_port() for k in ("http", "tcp", "https", "tls_backend")}
        # the udp row: echo backends, nginx's stream module, our udp listener
        self.udp_backends = [udp.free_udp_port(), udp.free_udp_port()]
        self.nginx_udp = udp.free_udp_port()
        self.slb_udp = udp.free_udp_port()
        self.nginx_udp_pid = 0
        self.cert, self.key, self.both = make_cert(tmp)
        self.slb_pid = 0
        self.ha_pid = 0
        self.caddy_pid = 0

    def start_nginx(self) -> None:
        big = os.path.join(self.tmp, "big")
        with open(big, "wb") as f:
            f.truncate(self.args.bulk_mb * 1024 * 1024)
        servers = "\n".join(
            f"""server {{ listen 127.0.0.1:{port} reuseport; access_log off;
                 location = /big {{ alias {big}; }}
                 location / {{ return 200 "hello from {i}\\n"; }} }}"""
            for i, port in enumerate(self.backend_ports)
        ) + "\n".join(
            f"""server {{ listen 127.0.0.1:{port} ssl reuseport; access_log off;
                 ssl_certificate {self.cert}; ssl_certificate_key {self.key};
                 location / {{ return 200 "hello from {i}\\n"; }} }}"""
            for i, port in enumerate(self.tls_backend_ports)
        )
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                f"""daemon off; worker_processes 1; pid {self.tmp}/nginx.pid; error_log {self.tmp}/nginx.err;
events {{ worker_connections 20000; }}
http {{ keepalive_requests 1000000; client_body_temp_path {self.tmp}; proxy_temp_path {self.tmp};
       fastcgi_temp_path {self.tmp}; uwsgi_temp_path {self.tmp}; scgi_temp_path {self.tmp};
       sendfile on; {servers} }}
"""
            )
        self.procs.append(Proc([tool("nginx"), "-c", conf, "-p", self.tmp], os.path.join(self.tmp, "nginx.log")))
        for port in self.backend_ports + self.tls_backend_ports:
            wait_port(port)

    def start_haproxy(self) -> None:
        a, b = self.backend_ports
        ta, tb = self.tls_backend_ports
        conf = os.path.join(self.tmp, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(
                f"""global
    nbthread 1
    maxconn 9900
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend http
    mode http
    bind 127.0.0.1:{self.ha['http']}
    default_backend web
frontend https
    mode http
    bind 127.0.0.1:{self.ha['https']} ssl crt {self.both} alpn h2,http/1.1
    default_backend web
backend web
    mode http
    balance roundrobin
    # http-reuse safe, HAProxy's default, is the rule twisted_slb keeps: a
    # client connection's first request gets a backend connection of its
    # own, so a new client connection costs a backend connection on both.
    http-reuse safe
    cookie SERVERID insert indirect nocache
    server a 127.0.0.1:{a} cookie a
    server b 127.0.0.1:{b} cookie b
frontend tls_backend
    mode http
    bind 127.0.0.1:{self.ha['tls_backend']}
    default_backend webtls
backend webtls
    mode http
    balance roundrobin
    http-reuse always
    cookie SERVERID insert indirect nocache
    server a 127.0.0.1:{ta} cookie a ssl verify required ca-file {self.cert} sni str(localhost) verifyhost localhost
    server b 127.0.0.1:{tb} cookie b ssl verify required ca-file {self.cert} sni str(localhost) verifyhost localhost
frontend tcp
    mode tcp
    bind 127.0.0.1:{self.ha['tcp']}
    default_backend tcpweb
backend tcpweb
    mode tcp
    balance roundrobin
    stick-table type ip size 1m expire 1000s
    stick on src
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
"""
            )
        p = Proc([tool("haproxy"), "-f", conf], os.path.join(self.tmp, "haproxy.log"))
        self.procs.append(p)
        self.ha_pid = p.p.pid
        for port in self.ha.values():
            wait_port(port)

    def start_caddy(self) -> None:
        """Caddy, one process on one core (C{GOMAXPROCS=1}), no admin API, no automatic HTTPS, no log."""
        a, b = self.backend_ports
        upstreams = f"127.0.0.1:{a} 127.0.0.1:{b}"
        ta, tb = self.tls_backend_ports
        conf = os.path.join(self.tmp, "Caddyfile")
        with open(conf, "w") as f:
            f.write(
                f"""{{
\tadmin off
\tauto_https off
\tstorage file_system {self.tmp}/caddy
}}
http://127.0.0.1:{self.caddy['http']} {{
\tbind 127.0.0.1
\treverse_proxy {upstreams} {{
\t\tlb_policy cookie SERVERID
\t}}
}}
https://127.0.0.1:{self.caddy['https']} {{
\tbind 127.0.0.1
\ttls {self.cert} {self.key}
\treverse_proxy {upstreams} {{
\t\tlb_policy cookie SERVERID
\t}}
}}
http://127.0.0.1:{self.caddy['tls_backend']} {{
\tbind 127.0.0.1
\treverse_proxy https://127.0.0.1:{ta} https://127.0.0.1:{tb} {{
\t\tlb_policy cookie SERVERID
\t\ttransport http {{
\t\t\ttls_trusted_ca_certs {self.cert}
\t\t\ttls_server_name localhost
\t\t}}
\t}}
}}
http://127.0.0.1:{self.caddy['tcp']} {{
\tbind 127.0.0.1
\treverse_proxy {upstreams} {{
\t\tlb_policy ip_hash
\t}}
}}
"""
            )
        env = dict(os.environ, GOMAXPROCS="1", HOME=self.tmp, XDG_DATA_HOME=self.tmp, XDG_CONFIG_HOME=self.tmp)
        p = Proc([tool("caddy"), "run", "--config", conf, "--adapter", "caddyfile"],
                 os.path.join(self.tmp, "caddy.log"), env=env)
        self.procs.append(p)
        self.caddy_pid = p.p.pid
        for port in self.caddy.values():
            wait_port(port)

    def start_slb(self) -> None:
        a, b = self.backend_ports
        ta, tb = self.tls_backend_ports
        conf = os.path.join(self.tmp, "slb.toml")
        with open(conf, "w") as f:
            f.write(
                f"""workers = {self.args.workers}

[backends.web]
scheduler = "rr"
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

# The same backends over TLS, verified as HAProxy and Caddy verify them.
[backends.webtls]
scheduler = "rr"
servers = [ {{ name = "a", address = "127.0.0.1:{ta}" }}, {{ name = "b", address = "127.0.0.1:{tb}" }} ]
tls = {{ verify = true, ca = "{self.cert}", server_name = "localhost" }}

[listeners.tls_backend]
protocol = "http"
access_log = false
bind = "tcp:{self.slb['tls_backend']}:interface=127.0.0.1:backlog=4096"
backends = "webtls"
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.http]
protocol = "http"
access_log = false
bind = "tcp:{self.slb['http']}:interface=127.0.0.1:backlog=4096"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.https]
protocol = "https"
access_log = false
bind = "tcp:{self.slb['https']}:interface=127.0.0.1:backlog=4096"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}
certificates = [ {{ cert = "{self.cert}", key = "{self.key}" }} ]

# The same listeners with the access log as users get it by default
# (twistd's log file).
[listeners.http_log]
protocol = "http"
bind = "tcp:{self.slb['http_log']}:interface=127.0.0.1:backlog=4096"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.tcp]
protocol = "tcp"
access_log = false
bind = "tcp:{self.slb['tcp']}:interface=127.0.0.1:backlog=4096"
backends = "web"
persistence = {{ type = "source_ip", timeout = 1000 }}
"""
            )
            if self.args.workers == 1:  # udp listeners run in one process
                f.write(self.slb_udp_config())
        python = self.args.slb_python
        argv = [python, "-c", "from twisted.scripts.twistd import run; run()", "--pidfile=", "-n",
                f"--logfile={self.tmp}/twistd.log", "slb", "--config", conf]
        if self.args.profile:
            # twistd ends itself with the signal that stopped it, so the
            # figures are written at the reactor's shutdown, not at exit.
            argv[2] = (
                "import cProfile\n"
                "from twisted_slb._io.reactor import install_default\n"
                "install_default()  # the reactor twistd slb runs, not Twisted's default\n"
                "from twisted.internet import reactor\n"
                "from twisted.scripts.twistd import run\n"
                "prof = cProfile.Profile()\n"
                "reactor.addSystemEventTrigger('after', 'shutdown',"
                f" lambda: (prof.disable(), prof.dump_stats({os.path.abspath(self.args.profile)!r})))\n"
                "prof.enable()\n"
                "run()\n"
            )
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = Proc(argv, os.path.join(self.tmp, "slb.log"), env=env)
        self.procs.append(p)
        self.slb_pid = p.p.pid
        for port in self.slb.values():
            wait_port(port)

    def slb_udp_config(self) -> str:
        a, b = self.udp_backends
        return f"""
[backends.udpecho]
scheduler = "hash"
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[listeners.udp]
protocol = "udp"
access_log = false
bind = "udp:{self.slb_udp}:interface=127.0.0.1"
backends = "udpecho"
persistence = {{ type = "source_ip", timeout = 1000 }}
idle_timeout = 30
"""

    def start_udp(self) -> None:
        """The echo backends and nginx's stream module (our udp listener is in slb.toml)."""
        self.procs.append(Proc([sys.executable, "-m", "bench.udp", "echo", *map(str, self.udp_backends)],
                               os.path.join(self.tmp, "udpecho.log"), env=dict(os.environ, PYTHONPATH=ROOT)))
        conf = os.path.join(self.tmp, "nginx-udp.conf")
        with open(conf, "w") as f:
            f.write(udp.nginx_stream_conf(self.tmp, self.nginx_udp, self.udp_backends, 30))
        p = Proc([tool("nginx"), "-c", conf, "-p", self.tmp], os.path.join(self.tmp, "nginx-udp.log"))
        self.procs.append(p)
        self.nginx_udp_pid = p.p.pid
        for port in self.udp_backends + [self.nginx_udp, self.slb_udp]:
            udp.wait_udp(port)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


# -- load generators -----------------------------------------------------------


def wrk(url: str, duration: float, connections: int = 50, close: bool = False) -> Dict[str, float]:
    argv = [tool("wrk"), "-t1", f"-c{connections}", f"-d{max(1, int(duration))}s", "--latency", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no figure for {url}:\n{out}")
    result = {"rps": float(m.group(1))}
    done = re.search(r"^\s*(\d+) requests in", out, re.M)
    if done:
        result["requests"] = float(done.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    result["non2xx"] = float(errors.group(1)) if errors else 0.0
    if socket_errors:
        result["socket_errors"] = socket_errors.group(1)
    for pct in ("50", "99"):
        lm = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if lm:
            value = float(lm.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[lm.group(2)]
            result[f"p{pct}_ms"] = value
    return result


def h2load(url: str, duration: float, connections: int = 50, streams: int = 10) -> Dict[str, float]:
    """HTTP/2 load: C{h2load -t1 -cN -mM} for C{duration} seconds (each connection keeps M streams open)."""
    argv = [tool("h2load"), "-t1", f"-c{connections}", f"-m{streams}", f"-D{max(1, int(duration))}", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    if not m:
        raise RuntimeError(f"h2load gave no figure for {url}:\n{out}")
    if "Application protocol: h2" not in out:
        raise RuntimeError(f"h2load did not speak HTTP/2 to {url}:\n{out}")
    result = {"rps": float(m.group(1))}
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if done:
        result["requests"] = float(done.group(3))
        result["failed"] = float(done.group(4))
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if codes:
        result["non2xx"] = float(int(codes.group(3)) + int(codes.group(4)))  # as wrk counts: neither 2xx nor 3xx
    return result


def bulk(url: str, timeout: float) -> Dict[str, float]:
    out = subprocess.run(
        [tool("curl"), "-s", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url],
        capture_output=True, text=True, timeout=timeout,
    ).stdout.split()
    return {"mb_s": float(out[0]) / 1e6, "bytes": float(out[1])}


def resumed(port: int, duration: float) -> Dict[str, float]:
    """
    New TLS connections per second that resume the first one's session
    (C{openssl s_time -reuse}: one client, one connection at a time, each
    with C{GET /} over HTTP/1.0), and the share of them that were resumed
    (s_time prints C{r} for a resumed session, C{*} for a full handshake).
    """
    argv = [tool("openssl"), "s_time", "-connect", f"127.0.0.1:{port}", "-reuse", "-www", "/",
            "-time", str(max(1, int(duration)))]
    started = time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30,
                             stdin=subprocess.DEVNULL).stdout
    except subprocess.TimeoutExpired:
        # A server that does not close after its answer to HTTP/1.0 holds
        # s_time forever: say so in the row rather than lose the run.
        print(f"bench: openssl s_time against port {port} did not finish", file=sys.stderr)
        return {"rps": 0.0, "requests": 0.0, "resumed_share": 0.0}
    elapsed = time.monotonic() - started  # s_time's own "real seconds" are whole seconds
    m = re.search(r"(\d+) connections in ([\d.]+)s;", out)
    if not m:
        raise RuntimeError(f"openssl s_time gave no figure for port {port}:\n{out}")
    connections = float(m.group(1))
    marks = "".join(re.findall(r"^[r*]+$", out, re.M))
    return {"rps": connections / elapsed, "requests": connections,
            "resumed_share": marks.count("r") / len(marks) if marks else 0.0}


def idle_connections(port: int, pid: int, count: int) -> Dict[str, float]:
    """RSS of C{pid} before and with C{count} idle client connections to C{port}."""
    before = rss_kb(pid)
    socks = []
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        time.sleep(1.0)  # let the server accept them all (a benchmark, not a test)
        during = rss_kb(pid)
    finally:
        for s in socks:
            s.close()
    return {"rss_before_mb": before / 1024, "rss_mb": during / 1024, "connections": count}


def stick_table(python: str, entries: int) -> Dict[str, float]:
    """Process RSS with a stick table of C{entries} clients (bench/sticktable_memory.py)."""
    out = subprocess.run(
        [python, os.path.join(HERE, "sticktable_memory.py"), "--entries", str(entries)],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    figures = dict(re.findall(r"^(RSS after|bytes per entry|lookup):\s+([\d.]+)", out, re.M))
    return {
        "rss_mb": float(figures["RSS after"]),
        "bytes_per_entry": float(figures["bytes per entry"]),
        "lookup_us": float(figures["lookup"]),
    }


def cpu_seconds(pid: int, kinds=(11, 12)) -> float:
    """CPU time (user + system) of C{pid} and its worker processes so far."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(fields[k]) for k in kinds)  # 11: utime, 12: stime
    return ticks / os.sysconf("SC_CLK_TCK")


def with_cpu(pid: int, fn: Callable[[], Dict[str, float]]) -> Callable[[], Dict[str, float]]:
    """
    C{fn}, adding the CPU time C{pid} spent per request, in microseconds
    (C{cpu_us}): a figure that the other tenants of a shared machine
    disturb much less than requests per second.
    """
    def run() -> Dict[str, float]:
        before, before_sys = cpu_seconds(pid), cpu_seconds(pid, (12,))
        result = fn()
        spent, spent_sys = cpu_seconds(pid) - before, cpu_seconds(pid, (12,)) - before_sys
        if result.get("requests"):
            result["cpu_us"] = spent / result["requests"] * 1e6
            result["cpu_sys_share"] = spent_sys / spent if spent else 0.0
        return result

    return run


# -- the run -------------------------------------------------------------------


def median_of(runs: int, fn: Callable[[], Dict[str, float]]) -> Dict[str, float]:
    fn()  # warm-up
    results = [fn() for _ in range(runs)]
    keys = [k for k, v in results[0].items() if isinstance(v, float)]
    return {k: statistics.median(r[k] for r in results) for k in keys}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per figure, after one warm-up (default 3)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--bulk-mb", type=int, default=1024, help="size of the bulk transfer (default 1024 MB)")
    parser.add_argument("--idle", type=int, default=10000, help="idle connections for the memory figure")
    parser.add_argument("--only", default="", help="comma-separated workloads")
    parser.add_argument("--slb-python", default=sys.executable, help="interpreter that runs twisted_slb (e.g. a PyPy venv)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--interleave", action="store_true",
                        help="measure in rounds over all rows (a warm-up round, then --runs rounds) rather than "
                             "row after row: for ratios between rows on a shared machine")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny durations and sizes")
    parser.add_argument("--udp-clients", type=int, default=64, help="client sockets of the udp row (default 64)")
    parser.add_argument("--profile", metavar="FILE", default="",
                        help="run twisted_slb under cProfile, write its figures to FILE and print the top functions")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.runs, args.bulk_mb, args.idle = 1.0, 1, 8, 100
    only = set(filter(None, args.only.split(",")))
    ensure_tools(only)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers we start
    rows: List[dict] = []
    tmp = tempfile.mkdtemp(prefix="slb-bench-")
    setup = Setup(tmp, args)
    try:
        if only != {"udp"}:
            setup.start_nginx()
            setup.start_haproxy()
            setup.start_caddy()
        setup.start_slb()
        direct = f"http://127.0.0.1:{setup.backend_ports[0]}"
        d, n = args.duration, args.connections
        workloads = [
            ("http_keepalive", "HTTP keep-alive + insert cookie (req/s)", "rps",
             lambda base: wrk(base["http"] + "/", d, n), True),
            ("http_keepalive_log", "  same, slb access log on (default) (req/s)", "rps",
             lambda base: wrk(base["http_log"] + "/", d, n), False),
            ("http_close", "HTTP new connection per request (req/s)", "rps",
             lambda base: wrk(base["http"] + "/", d, n, close=True), True),
            ("http_close_log", "  same, slb access log on (default) (req/s)", "rps",
             lambda base: wrk(base["http_log"] + "/", d, n, close=True), False),
            ("tcp_keepalive", "TCP keep-alive + source IP (req/s)", "rps",
             lambda base: wrk(base["tcp"] + "/", d, n), True),
            ("tcp_close", "TCP new connection per request (conn/s)", "rps",
             lambda base: wrk(base["tcp"] + "/", d, n, close=True), True),
            ("tcp_bulk", f"TCP bulk {args.bulk_mb} MB (MB/s)", "mb_s",
             lambda base: bulk(base["tcp"] + "/big", 600), True),
            ("https_keepalive", "HTTPS keep-alive (req/s)", "rps",
             lambda base: wrk(base["https"] + "/", d, n), False),
            ("https_handshakes", "HTTPS new TLS handshake per request (req/s)", "rps",
             lambda base: wrk(base["https"] + "/", d, n, close=True), False),
            ("https_resume", "HTTPS resumed session per request, 1 client (conn/s)", "rps",
             lambda base: resumed(base["https_port"], d), False),
            ("https_h2", "HTTPS HTTP/2, h2load -c50 -m10 (req/s)", "rps",
             lambda base: h2load(base["https"] + "/", d, n, 10), False),
            ("http_tls_backend", "HTTP keep-alive, TLS to the backends (req/s)", "rps",
             lambda base: wrk(base["tls_backend"] + "/", d, n), False),
        ]

        def urls(ports: Dict[str, int]) -> Dict[str, object]:
            base = {k: f"{'https' if k == 'https' else 'http'}://127.0.0.1:{p}" for k, p in ports.items()}
            base.setdefault("http_log", base["http"])  # HAProxy and Caddy log nothing
            base["https_port"] = ports["https"]
            return base

        bases = {
            "direct": {"http": direct, "tcp": direct, "https": None},
            "haproxy": urls(setup.ha),
            "caddy": urls(setup.caddy),
            "twisted_slb": urls(setup.slb),
        }
        pids = {"haproxy": setup.ha_pid, "caddy": setup.caddy_pid, "twisted_slb": setup.slb_pid}
        plans: List[Tuple[dict, str, Callable[[], Dict[str, float]]]] = []
        copies: List[Tuple[dict, dict, str]] = []
        for key, title, unit, fn, has_direct in workloads:
            if only and key not in only:
                continue
            row = {"workload": key, "title": title, "unit": unit}
            same = next((r for r in rows if key.endswith("_log") and r["workload"] == key[:-4]), None)
            for system, base in bases.items():
                if system == "direct" and not has_direct:
                    continue
                if same is not None and system in ("haproxy", "caddy"):
                    copies.append((row, same, system))  # they log nothing: the row without our log measures them
                    continue
                pid = pids.get(system)
                run = (lambda fn=fn, base=base: fn(base))
                plans.append((row, system, run if pid is None else with_cpu(pid, run)))
            rows.append(row)
        if args.interleave:
            # Rounds over every row and balancer: a neighbour that loads the
            # shared machine for a minute disturbs every row alike.
            measured: Dict[Tuple[int, str], List[Dict[str, float]]] = {}
            for round_ in range(args.runs + 1):  # (round 0 is the warm-up)
                for row, system, run in plans:
                    result = run()
                    if round_:
                        measured.setdefault((id(row), system), []).append(result)
            for row, system, _ in plans:
                results = measured[(id(row), system)]
                keys = [k for k, v in results[0].items() if isinstance(v, float)]
                row[system] = {k: statistics.median(r[k] for r in results) for k in keys}
        else:
            for row, system, run in plans:
                row[system] = median_of(args.runs, run)
        for row, same, system in copies:
            row[system] = same[system]
        for row in rows:
            unit, title = row["unit"], row["title"]
            slb = row["twisted_slb"][unit]
            row["ratio"] = slb / row["haproxy"][unit] if row["haproxy"][unit] else 0.0
            row["ratio_caddy"] = slb / row["caddy"][unit] if row["caddy"][unit] else 0.0
            cpu = "".join(
                f"  {who} {row[system]['cpu_us']:.1f} us CPU/req"
                for who, system in (("slb", "twisted_slb"), ("haproxy", "haproxy"), ("caddy", "caddy"))
                if "cpu_us" in row[system]
            )
            print(f"{title:48} slb {slb:9.1f}  haproxy {row['haproxy'][unit]:9.1f}  caddy {row['caddy'][unit]:9.1f}  "
                  f"x{row['ratio']:.2f} HAProxy  x{row['ratio_caddy']:.2f} Caddy{cpu}", flush=True)
        if (not only or "udp" in only) and args.workers == 1:
            setup.start_udp()
            clients = args.udp_clients
            row = {"workload": "udp", "title": f"UDP req/resp, {clients} clients, vs nginx stream (req/s)",
                   "unit": "rps", "compared_with": "nginx stream (hash $remote_addr consistent)"}
            row["direct"] = median_of(args.runs, lambda: udp.load(setup.udp_backends[0], d, clients))
            row["nginx"] = median_of(args.runs, with_cpu(setup.nginx_udp_pid, lambda: udp.load(setup.nginx_udp, d, clients)))
            row["twisted_slb"] = median_of(args.runs, with_cpu(setup.slb_pid, lambda: udp.load(setup.slb_udp, d, clients)))
            row["ratio"] = row["twisted_slb"]["rps"] / row["nginx"]["rps"] if row["nginx"]["rps"] else 0.0
            rows.append(row)
            print(f"{row['title']:48} slb {row['twisted_slb']['rps']:10.1f}  nginx {row['nginx']['rps']:10.1f}  "
                  f"ratio {row['ratio']:.2f}  slb {row['twisted_slb']['cpu_us']:.1f} us CPU per datagram and its answer "
                  f"({row['twisted_slb']['cpu_sys_share']:.0%} in the kernel)  nginx {row['nginx']['cpu_us']:.1f} us "
                  f"({row['nginx']['cpu_sys_share']:.0%} in the kernel)  lost slb {row['twisted_slb']['lost']:.0f} "
                  f"nginx {row['nginx']['lost']:.0f}", flush=True)
        if not only or "memory" in only:
            row = {"workload": "memory_idle", "title": f"RSS with {args.idle} idle connections (MB)", "unit": "rss_mb"}
            row["twisted_slb"] = idle_connections(setup.slb["http"], setup.slb_pid, args.idle)
            # HAProxy's maxconn must fit the descriptor limit here (9900).
            row["haproxy"] = idle_connections(setup.ha["http"], setup.ha_pid, min(args.idle, 9000))
            row["ratio"] = row["twisted_slb"]["rss_mb"] / max(row["haproxy"]["rss_mb"], 0.001)
            rows.append(row)
            print(f"{row['title']:48} slb {row['twisted_slb']['rss_mb']:10.1f}  haproxy {row['haproxy']['rss_mb']:10.1f}", flush=True)
        if not only or "sticktable" in only:
            entries = 10_000 if args.quick else 1_000_000
            rows.append({
                "workload": "sticktable", "title": f"stick table, {entries:,} clients (MB RSS)", "unit": "rss_mb",
                "twisted_slb": stick_table(args.slb_python, entries),
            })
            print(f"{rows[-1]['title']:48} slb {rows[-1]['twisted_slb']['rss_mb']:10.1f}", flush=True)
    except Exception:
        for name in ("haproxy.log", "nginx.log", "caddy.log", "slb.log", "nginx-udp.err", "udpecho.log"):
            path = os.path.join(tmp, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.read()[-2000:]
                print(f"--- {name} ---\n{tail}", file=sys.stderr)
        raise
    finally:
        setup.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "python": args.slb_python,
        "workers": args.workers,
        "duration": args.duration,
        "runs": args.runs,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print_table(rows)
    print(f"\nJSON written to {args.json}")
    if args.profile:
        import pstats

        print(f"\ntwisted_slb's profile (all workloads run; figures in {args.profile}):")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(30)
    return 0


def print_table(rows: List[dict]) -> None:
    """Markdown: each balancer's figure and CPU per request, and twisted_slb's ratios to HAProxy and Caddy."""

    def cell(row: dict, system: str) -> str:
        figures = row.get(system)
        if not figures:
            return ""
        text = f"{figures[row['unit']]:.1f}"
        if "cpu_us" in figures:
            text += f" ({figures['cpu_us']:.0f} us)"
        return text

    def ratio(row: dict, key: str) -> str:
        return "" if row.get(key) is None else f"{row[key]:.2f}x"

    print()
    print("| workload | direct | HAProxy (CPU/req) | Caddy (CPU/req) | twisted_slb (CPU/req) | slb/HAProxy | slb/Caddy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        # The udp row compares with nginx's stream module: its figure goes in the HAProxy column.
        print(f"| {row['title'].strip()} | {cell(row, 'direct')} | {cell(row, 'haproxy') or cell(row, 'nginx')} | "
              f"{cell(row, 'caddy')} | {cell(row, 'twisted_slb')} | {ratio(row, 'ratio')} | {ratio(row, 'ratio_caddy')} |")


if __name__ == "__main__":
    sys.exit(main())
