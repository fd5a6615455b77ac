"""The service as real processes: API (uvicorn), Celery workers and Flower, for the tests.

Every process runs in its own session (process group) so that stopping it also stops its
children (Celery's pool processes); each logs to a file under the stack's directory, whose tail
goes into assertion messages.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support._proc import free_port, log_tail

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLI = str(BIN / "rootfs-export")
CELERY = str(BIN / "celery")

#: Redis databases handed out to stacks in turn (broker, backend), so stacks never share queues
_db_numbers = itertools.count(2, 2)

TERMINAL = ("succeeded", "failed", "canceled")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1, on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{extra}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, lines: int = 60) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n{log_tail(self.log_path, lines)}"

    def children(self) -> list[int]:
        """Direct children (Celery's pool processes)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.kill_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # The leader may be gone while pool children linger: make sure the group is empty.
        self.kill_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)


@dataclass
class Stack:
    """Configuration shared by the processes of one service deployment, and the processes."""

    workdir: Path
    redis_url: str
    database_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    api_port: int = 0
    api_token: str | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        db = next(_db_numbers) % 16
        base = self.redis_url.rstrip("/")
        self.broker_url = f"{base}/{db}"
        self.backend_url = f"{base}/{db + 1}"
        self.cache_dir = self.workdir / "cache"
        # The workers' own Docker config (registry credentials); empty unless a test fills it.
        self.docker_config = self.workdir / "docker-config"
        self.docker_config.mkdir(exist_ok=True)

    def output_dir(self, node: str) -> Path:
        return self.workdir / f"out-{node}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROOTFS_EXPORT_")}
        env.update({
            "ROOTFS_EXPORT_BROKER_URL": self.broker_url,
            "ROOTFS_EXPORT_RESULT_BACKEND": self.backend_url,
            "ROOTFS_EXPORT_DATABASE_URL": self.database_url,
            "ROOTFS_EXPORT_CACHE_DIR": str(self.cache_dir),
            "ROOTFS_EXPORT_NODE": "a",
            "ROOTFS_EXPORT_OUTPUT_DIR": str(self.output_dir("a")),
            "DOCKER_CONFIG": str(self.docker_config),
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin",
        })
        if self.api_token:
            env["ROOTFS_EXPORT_API_TOKEN"] = self.api_token
        env.update(self.extra_env)
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, cwd=self.workdir, env=self.env(**env),
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    # -- the processes ---------------------------------------------------------------------------
    def migrate(self) -> None:
        out = subprocess.run([CLI, "db", "upgrade"], cwd=self.workdir, env=self.env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"db upgrade failed:\n{out.stdout}\n{out.stderr}"

    def start_api(self, timeout: float = 30.0) -> Proc:
        for _ in range(3):
            self.api_port = free_port()
            proc = self.spawn("api", [CLI, "serve", "--port", str(self.api_port)])
            def up(p: Proc = proc) -> bool:
                return not p.alive() or self._api_up()

            try:
                wait_for(up, timeout, "the API", on_timeout=proc.log)
            except AssertionError:
                proc.stop()
                raise
            if proc.alive():
                return proc
            self.procs.remove(proc)
        raise AssertionError(f"the API did not start\n{proc.log()}")

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_worker(self, node: str, *, concurrency: int = 2, queues: str | None = None,
                     wait: bool = True, **env: str) -> Proc:
        argv = [CLI, "worker", "--node", node, "--concurrency", str(concurrency)]
        if queues:
            argv += ["--queues", queues]
        out = self.output_dir(node)
        proc = self.spawn(f"worker-{node}-{len(self.procs)}", argv,
                          ROOTFS_EXPORT_OUTPUT_DIR=str(out), **env)
        if wait:
            wait_for(lambda: not proc.alive() or b" ready." in proc.log_path.read_bytes(), 60,
                     f"worker {node} to be ready", on_timeout=proc.log)
            assert proc.alive(), proc.log()
        return proc

    def start_flower(self, timeout: float = 60.0) -> tuple[Proc, int]:
        port = free_port()
        proc = self.spawn("flower", [CELERY, "-A", "worker", "flower", f"--port={port}",
                                     "--address=127.0.0.1"])

        def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"flower exited\n{proc.log()}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=3
                                 ).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout, "flower", interval=0.3, on_timeout=proc.log)
        return proc, port

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    # -- the API ----------------------------------------------------------------------------------
    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}
        return httpx.Client(base_url=self.api_url, timeout=30, headers=headers)

    def submit(self, client: httpx.Client, image: str, **body: Any) -> dict[str, Any]:
        resp = client.post("/v1/exports", json={"image": image, **body})
        assert resp.status_code == 202, resp.text
        return resp.json()

    def wait_job(self, client: httpx.Client, job_id: str, timeout: float = 120,
                 on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def done() -> bool:
            nonlocal last
            resp = client.get(f"/v1/exports/{job_id}")
            assert resp.status_code == 200, resp.text
            last = resp.json()
            if on_poll:
                on_poll(last)
            return last["status"] in TERMINAL

        wait_for(done, timeout, f"job {job_id} to finish", interval=0.05,
                 on_timeout=lambda: f"last state: {last}\n{self.logs()}")
        return last


@dataclass(frozen=True)
class WorkerSpec:
    """One Celery worker for :func:`running`: its node, pool size and queues."""

    node: str
    concurrency: int = 2
    queues: str | None = None


@contextlib.contextmanager
def running(stack: Stack, *workers: WorkerSpec) -> Iterator[Stack]:
    """Migrate the stack's database, start its API and ``workers``; stop them all afterwards."""
    try:
        stack.migrate()
        stack.start_api()
        for w in workers:
            stack.start_worker(w.node, concurrency=w.concurrency, queues=w.queues)
        yield stack
    finally:
        stack.stop()
