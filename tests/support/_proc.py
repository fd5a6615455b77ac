"""Small helpers shared by the process fixtures (free ports, log tails, starting, stopping)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate ``proc``, then kill it if it does not exit within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class NoAnswer(Exception):
    """A server started by :func:`start_on_free_port` never answered."""

    def __init__(self, port: int, log: str) -> None:
        super().__init__(f"no answer on port {port}")
        self.port = port
        self.log = log


def start_on_free_port(
    command: Callable[[int], list[str]],
    answers: Callable[[int], bool],
    log_path: Path,
    *,
    timeout: float,
    port_in_use: str,
    port: int | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``command(port)`` in its own session, logging to ``log_path``, until ``answers(port)``.

    A port that was free a moment ago can be taken before the server binds it: when the log
    says ``port_in_use``, try another (up to five free ports; a fixed ``port`` once only).
    Returns the process and its port; raises :class:`NoAnswer` with the last port and the
    log's tail when the server exits or stays silent for ``timeout`` seconds.
    """
    last = ""
    for _ in range(1 if port else 5):
        chosen = port or free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command(chosen), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if _wait_ready(proc, answers, chosen, timeout):
                return proc, chosen
        except BaseException:
            stop_process(proc)
            raise
        last = log_tail(log_path)
        stop_process(proc)
        if port_in_use not in last:
            break
    raise NoAnswer(chosen, last)


def _wait_ready(proc: subprocess.Popen[bytes], answers: Callable[[int], bool], port: int,
                timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if answers(port):
            return True
        time.sleep(0.05)
    return False
