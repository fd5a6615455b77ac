"""A private ``redis-server`` on a free loopback port (never the machine's 6379)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support._proc import free_port, log_tail, stop_process


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries its log tail."""


class RedisProcess:
    """``redis-server`` without persistence in its own temp dir. ``url`` is ``redis://...``."""

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.log_path = self.workdir / "redis.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"RedisProcess(url={self.url!r})"

    def start(self, timeout: float = 20.0) -> RedisProcess:
        if shutil.which(self.binary) is None:
            raise RedisStartError(f"{self.binary} not found on PATH (apt install redis-server)")
        last = ""
        for _ in range(5):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                     "--daemonize", "no"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                return self
            last = log_tail(self.log_path)
            stop_process(self.proc)
            self.proc = None
            if "Address already in use" not in last:
                break
        raise RedisStartError(f"redis-server did not answer on {self.host}; log tail:\n{last}")

    def ping(self) -> bool:
        """Send a raw RESP PING (no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
