"""A long-running local registry serving the real Debian image, for the README's first command.

``scripts/demo-registry`` starts (detached, once) ``docker-registry`` on
127.0.0.1:${ROOTFS_EXPORT_DEMO_PORT:-5000} and makes sure it serves the cached Debian image as
``127.0.0.1:PORT/debian:bookworm``, building the image first when needed. Running it again only
re-checks and re-pushes (blobs already there are skipped). ``scripts/demo-registry stop`` stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import requests

from tests.support.debian import DebianBuildError, ensure_debian_image, push_debian_image
from tests.support.registry import RegistryProcess, RegistryStartError

REPO, TAG = "debian", "bookworm"


def state_dir() -> Path:
    system = Path("/var/cache/rootfs-export-test/demo-registry")
    if os.geteuid() == 0 or os.access(system.parent, os.W_OK):
        return system
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "rootfs-export-test" / "demo-registry"


def demo_port() -> int:
    raw = os.environ.get("ROOTFS_EXPORT_DEMO_PORT", "5000")
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"ROOTFS_EXPORT_DEMO_PORT must be a port number, got {raw!r}") from None


def _our_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"docker-registry" in cmdline else None


def _registry_answers(port: int) -> bool | None:
    """True: a distribution registry; False: something else; None: nothing listening."""
    try:
        resp = requests.get(f"http://127.0.0.1:{port}/v2/", timeout=3)
    except requests.RequestException:
        return None
    return "Docker-Distribution-Api-Version" in resp.headers and resp.status_code == 200


class _Existing:
    """A registry already running on the port (started earlier by this script)."""

    def __init__(self, port: int) -> None:
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.username = self.password = None


def start(port: int) -> str:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    pidfile = directory / "registry.pid"
    # the image first: building takes minutes and must not race a half-started registry
    ensure_debian_image()
    answer = _registry_answers(port)
    registry: object
    if answer is True:
        registry = _Existing(port)
    elif answer is False:
        raise SystemExit(f"127.0.0.1:{port} answers but is not a registry without auth; "
                         "set ROOTFS_EXPORT_DEMO_PORT to a free port")
    else:
        proc = RegistryProcess(workdir=directory, port=port)
        try:
            proc.start()
        except RegistryStartError as exc:
            raise SystemExit(f"could not start the demo registry: {exc}") from None
        assert proc.proc is not None
        pidfile.write_text(f"{proc.proc.pid}\n")
        registry = proc  # left running on purpose: it serves the demo after we exit
    image = push_debian_image(registry, REPO, TAG)
    return image.reference


def stop() -> int:
    pidfile = state_dir() / "registry.pid"
    pid = _our_pid(pidfile)
    if pid is None:
        print("demo registry not running", file=sys.stderr)
        return 0
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if _our_pid(pidfile) is None:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    print(f"stopped demo registry (pid {pid})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo-registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="start", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    port = demo_port()
    if args.action == "stop":
        return stop()
    if args.action == "status":
        up = _registry_answers(port)
        print(f"127.0.0.1:{port}: {'registry up' if up else 'not a registry' if up is False else 'down'}")
        return 0 if up else 1
    try:
        reference = start(port)
    except DebianBuildError as exc:
        print(f"demo-registry: {exc}", file=sys.stderr)
        return 1
    print(reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
