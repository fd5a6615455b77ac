"""README.md's "Run as a service" commands, pasted into bash as a newcomer would.

Only ports, the working directory and the image reference are substituted (the machine's
Redis or another API may own the documented ports, and the test registry has its own port).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.images import push_small_image
from tests.service.stack import REPO, wait_for
from tests.support._proc import free_port

pytestmark = pytest.mark.timeout(240)

README = REPO / "README.md"
MARKERS = ("start", "try", "stop")


def published() -> str:
    """README's "Run as a service" section."""
    readme = README.read_text()
    assert "## Run as a service" in readme, "README.md lost its service section"
    return readme[readme.index("## Run as a service"):]


def block(text: str, marker: str) -> str:
    m = re.search(rf"<!-- service:{marker} -->\s*```sh\n(.*?)```", text, re.DOTALL)
    assert m, f"no ```sh block after <!-- service:{marker} -->"
    return m.group(1)


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOTFS_EXPORT_")}
    env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    return env


def run(script: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=shell_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_pasted_service_section_runs_an_export(tmp_path: Path, registry: Any) -> None:
    text = published()
    image = push_small_image(registry, layers=3)
    workdir = tmp_path / "svc"
    ports = {"6380": str(free_port()), "8000": str(free_port()), "5555": str(free_port())}

    def adapt(script: str) -> str:
        script = script.replace("/tmp/rootfs-export-service", str(workdir))
        script = script.replace("127.0.0.1:5000/debian:bookworm", image.reference)
        for old, new in ports.items():
            script = re.sub(rf"(?<![0-9]){old}(?![0-9])", new, script)
        return script

    start, try_, stop = (adapt(block(text, m)) for m in MARKERS)
    api = f"http://127.0.0.1:{ports['8000']}"
    group: int | None = None
    try:
        # The start block leaves its processes running in this session (process group).
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", start], cwd=REPO,
                                env=shell_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        group = proc.pid
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert '"status":"ok"' in out.replace(" ", ""), out

        # Both workers must be up before the export (the API answers sooner).
        for node in ("node1", "node2"):
            log = workdir / f"worker-{node}.log"

            def ready(log: Path = log) -> bool:
                return log.exists() and b" ready." in log.read_bytes()

            def tail(log: Path = log) -> str:
                return log.read_text() if log.exists() else "(no log)"

            wait_for(ready, 60, f"worker {node}", on_timeout=tail)

        # The reader's shell is in the service directory after the start block.
        tried = run(try_, cwd=workdir)
        assert tried.returncode == 0, tried.stderr
        job = json.loads((workdir / "job.json").read_text())
        assert job["status"] in ("queued", "running"), job
        assert job["id"] in tried.stdout.split("}", 1)[1], tried.stdout   # the GET printed it
        with httpx.Client(base_url=api, timeout=10) as client:
            def finished() -> dict[str, Any] | None:
                view = client.get(f"/v1/exports/{job['id']}").json()
                return view if view["status"] in ("succeeded", "failed", "canceled") else None

            done = wait_for(finished, 120, "the documented export", interval=0.2)
        assert done["status"] == "succeeded", done
        output = Path(done["result"]["output"])
        assert output.parent == workdir / "out-node1" and output.stat().st_size > 0
        tasks = httpx.get(f"http://127.0.0.1:{ports['5555']}/api/tasks", timeout=10).json()
        assert "rootfs_export.package" in {t["name"] for t in tasks.values()}

        stopped = run(stop, cwd=workdir)
        assert stopped.returncode == 0, stopped.stderr
        pids = [int(p.read_text()) for p in workdir.glob("*.pid")]

        def all_gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() for pid in pids)

        wait_for(all_gone, 30, "the documented stop command to end every process")
    finally:
        for pidfile in workdir.glob("*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        if group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
