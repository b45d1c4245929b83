"""
The UDP row of the benchmark: request/response datagrams through
twisted_slb's udp listener and through nginx's C{stream} module
(C{listen ... udp}, C{hash $remote_addr consistent}), to the same small UDP
echo backends, in the same run.

    python -m bench --only udp [--duration 5] [--runs 3]
    python -m bench.udp echo PORT [PORT...]      # the echo backend alone

The load generator is this process: C{--udp-clients} client sockets spread
over 16 loopback source addresses (127.0.0.2..17), each with one request in
flight at a time (closed loop), so the figure is request/response pairs per
second.  A lost datagram is sent again after a second (and counted).
"""

from __future__ import annotations

import select
import socket
import sys
import time
from typing import Dict, List

#: nginx's stream module as Debian ships it (libnginx-mod-stream)
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def echo(ports: List[int]) -> None:
    """Answer every datagram on C{ports} with itself (blocking, one process)."""
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        socks.append(s)
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    print("echo ready", flush=True)
    while True:
        for fd, _ in poller.poll():
            s = by_fd[fd]
            while True:
                try:
                    data, addr = s.recvfrom(2048, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                s.sendto(data, addr)


def nginx_stream_conf(tmp: str, listen: int, backends: List[int], idle_timeout: float) -> str:
    """An nginx configuration balancing UDP by client address, as close to ours as nginx allows."""
    servers = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    return f"""load_module {STREAM_MODULE};
daemon off; worker_processes 1; pid {tmp}/nginx-udp.pid; error_log {tmp}/nginx-udp.err;
events {{ worker_connections 20000; }}
stream {{
    upstream udpecho {{ hash $remote_addr consistent; {servers} }}
    server {{ listen 127.0.0.1:{listen} udp; proxy_pass udpecho; proxy_timeout {int(idle_timeout)}s; }}
}}
"""


def wait_udp(port: int, timeout: float = 20.0) -> None:
    """Wait until something at 127.0.0.1:C{port} answers a datagram."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            s.sendto(b"ping", ("127.0.0.1", port))
            try:
                s.recvfrom(2048)
                return
            except OSError:
                continue
    finally:
        s.close()
    raise RuntimeError(f"nothing answers on udp 127.0.0.1:{port} after {timeout}s")


def load(port: int, duration: float, clients: int = 64, size: int = 64) -> Dict[str, float]:
    """
    Closed-loop request/response load on udp 127.0.0.1:C{port} for
    C{duration} seconds; returns C{rps}, C{requests} (answers) and C{lost}.
    """
    target = ("127.0.0.1", port)
    payload = b"x" * size
    socks: Dict[int, socket.socket] = {}
    sent_at: Dict[int, float] = {}
    poller = select.epoll()
    try:
        for i in range(clients):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.0.0.{2 + i % 16}", 0))
            s.setblocking(False)
            socks[s.fileno()] = s
            poller.register(s.fileno(), select.EPOLLIN)
        answers = lost = 0
        start = time.monotonic()
        for fd, s in socks.items():
            s.sendto(payload, target)
            sent_at[fd] = start
        end = start + duration
        now = checked = start
        while now < end:
            for fd, _ in poller.poll(0.2):
                s = socks[fd]
                try:
                    s.recv(2048)
                except BlockingIOError:
                    continue
                answers += 1
                s.sendto(payload, target)
                sent_at[fd] = now
            now = time.monotonic()
            if now - checked > 0.25:
                checked = now
                for fd, when in sent_at.items():
                    if now - when > 1.0:
                        lost += 1
                        socks[fd].sendto(payload, target)
                        sent_at[fd] = now
        elapsed = time.monotonic() - start
    finally:
        poller.close()
        for s in socks.values():
            s.close()
    return {"rps": answers / elapsed, "requests": float(answers), "lost": float(lost)}


def main(argv: List[str]) -> int:
    if argv[:1] == ["echo"]:
        echo([int(p) for p in argv[1:]])
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
