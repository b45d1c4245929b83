"""
A real redis-server for the tests: on a free loopback port, persistence off,
stopped in cleanup.

Redis refuses C{--port 0}, so a free port is found by binding port 0 and
closing it; if another process takes it before redis-server binds it (redis
then exits with "Address already in use"), another port is tried.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import time
from typing import List, Optional

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
READY = b"Ready to accept connections"
#: Seconds redis-server may take to say it is ready.
START_TIMEOUT = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """
    One redis-server process.  L{start} it (again, on the same port, after
    L{stop}: a restart), L{stop} it; C{testcase.addCleanup(server.stop)}.

    @ivar port: its port, chosen by the first L{start}.
    """

    def __init__(self, password: str = "") -> None:
        self.password = password
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        self.output: List[bytes] = []

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; run-tests does it)")
        attempts = 10 if self.port is None else 50
        for _ in range(attempts):
            port = self.port if self.port is not None else _free_port()
            if self._try(port):
                self.port = port
                return self
        raise RuntimeError(f"redis-server did not start: {b''.join(self.output[-20:]).decode(errors='replace')}")

    def _try(self, port: int) -> bool:
        args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "notice", "--logfile", "", "--dir", "/tmp",
                "--protected-mode", "yes"]
        if self.password:
            args += ["--requirepass", self.password]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        buffered = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break  # it exited (port taken, most likely)
            buffered += chunk
            if READY in buffered:
                self.output.append(buffered)
                self.process = process
                return True
        self.output.append(buffered)
        process.kill()
        process.wait()
        process.stdout.close()
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()

    def command(self, *args: str) -> bytes:
        """Run one command through redis-cli (for the tests' own checks)."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        extra = ["-a", self.password, "--no-auth-warning"] if self.password else []
        return subprocess.run([cli, "-p", str(self.port), *extra, *args], check=True,
                              stdout=subprocess.PIPE, timeout=10).stdout.strip()


def redis_server(testcase, password: str = "") -> RedisServer:
    """A started L{RedisServer}, stopped when C{testcase} ends."""
    server = RedisServer(password).start()
    testcase.addCleanup(server.stop)
    return server
