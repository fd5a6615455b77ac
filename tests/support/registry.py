"""A real CNCF distribution registry (Debian's ``docker-registry``) as a test process."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import requests

from tests.support._proc import NoAnswer, log_tail, start_on_free_port, stop_process

REGISTRY_BINARY = "docker-registry"


class RegistryStartError(RuntimeError):
    """The registry process did not come up; the message carries its log tail."""


class RegistryProcess:
    """``docker-registry serve CONFIG`` on a free 127.0.0.1 port with its own storage.

    Use as a context manager or call :meth:`start` / :meth:`stop`. With ``auth=True`` the
    registry requires htpasswd basic auth for ``username`` / ``password``.
    """

    def __init__(
        self,
        *,
        auth: bool = False,
        username: str = "tester",
        password: str | None = None,
        workdir: str | Path | None = None,
        port: int | None = None,
        binary: str = REGISTRY_BINARY,
    ) -> None:
        self.auth = auth
        self.username: str | None = username if auth else None
        self.password: str | None = (password or secrets.token_urlsafe(12)) if auth else None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="registry-"))
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.htpasswd_path = self.workdir / "htpasswd"
        self._fixed_port = port
        self.port: int = 0
        self.binary = binary
        self.proc: subprocess.Popen | None = None

    # -- addresses -----------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def auth_tuple(self) -> tuple[str, str] | None:
        """``(username, password)`` for ``requests``' ``auth=``, or None without auth."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)

    def __repr__(self) -> str:
        return f"RegistryProcess(url={self.url!r}, auth={self.auth})"

    # -- lifecycle ---------------------------------------------------------------------------
    def _write_config(self, port: int) -> None:
        config: dict = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
        }
        if self.auth:
            assert self.username and self.password
            out = subprocess.run(
                ["htpasswd", "-Bbn", self.username, self.password],
                check=True, capture_output=True, text=True,
            ).stdout
            self.htpasswd_path.write_text(out.strip() + "\n")
            config["auth"] = {
                "htpasswd": {"realm": "rootfs-export-test", "path": str(self.htpasswd_path)}
            }
        # JSON is valid YAML, so no YAML writer is needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> RegistryProcess:
        if shutil.which(self.binary) is None:
            raise RegistryStartError(f"{self.binary} not found on PATH (apt install docker-registry)")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.proc, self.port = start_on_free_port(
                self._command, _answers, self.log_path, timeout=timeout,
                port_in_use="address already in use", port=self._fixed_port)
        except NoAnswer as exc:
            self.port = exc.port
            raise RegistryStartError(
                f"docker-registry did not answer on {self.url}/v2/ "
                f"(config {self.config_path}); log tail:\n{exc.log}"
            ) from None
        return self

    def _command(self, port: int) -> list[str]:
        self._write_config(port)
        return [self.binary, "serve", str(self.config_path)]

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences for tests ---------------------------------------------------------------
    def session(self) -> requests.Session:
        """A ``requests`` session carrying this registry's credentials (if any)."""
        s = requests.Session()
        if self.auth_tuple:
            s.auth = self.auth_tuple
        return s

    def log(self) -> str:
        return log_tail(self.log_path, 200)


def _answers(port: int) -> bool:
    try:
        resp = requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2)
    except requests.RequestException:
        return False
    return resp.status_code in (200, 401)
