"""A private ``redis-server`` on a free loopback port (never the machine's 6379)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.support._proc import NoAnswer, start_on_free_port, stop_process


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
        try:
            self.proc, self.port = start_on_free_port(
                self._command, _ping, self.log_path, timeout=timeout,
                port_in_use="Address already in use")
        except NoAnswer as exc:
            self.port = exc.port
            raise RedisStartError(
                f"redis-server did not answer on {self.host}; log tail:\n{exc.log}") from None
        return self

    def _command(self, port: int) -> list[str]:
        return [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"]

    def ping(self) -> bool:
        """Send a raw RESP PING (no client library needed)."""
        return _ping(self.port)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
