"""Workers killed with SIGKILL mid-job: the job still succeeds.

Two ways a worker dies:

- one pool process is killed (the OOM killer's way): Celery's parent process sees it, rejects
  the message (``task_reject_on_worker_lost`` with ``acks_late``) and the task is delivered
  again at once;
- the whole worker (parent and pool) is killed: nobody is left to reject the message, so the
  job store notices the stopped heartbeat (``stale_job_seconds``) and relaunches the build on
  the workers that remain.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.stack import Stack, WorkerSpec, running, wait_for
from tests.service.test_e2e import check_succeeded

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

STALE_SECONDS = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: Any,
          postgres_module_url: str) -> Iterator[Stack]:
    # PostgreSQL, as deployed: a client killed mid-transaction costs it nothing, whereas
    # SQLite must first recover the killed writer's WAL state (seconds, under many readers).
    workdir = tmp_path_factory.mktemp("recovery")
    s = Stack(workdir=workdir, redis_url=redis_server.url, database_url=postgres_module_url,
              extra_env={"ROOTFS_EXPORT_STALE_JOB_SECONDS": str(STALE_SECONDS)})
    # Node a only packages; b only fetches: which worker runs what is known in advance.
    with running(s, WorkerSpec("a", concurrency=1, queues="package.a"),
                 WorkerSpec("b", concurrency=2, queues="fetch")):
        yield s


def _tasks(stack: Stack, build_id: str | None) -> list[dict[str, Any]]:
    from api import store

    return store.build_tasks(stack.database_url, build_id) if build_id else []


def test_whole_fetch_worker_killed_mid_download(stack: Stack, client: httpx.Client,
                                                debian_image: Any) -> None:
    worker_b = next(p for p in stack.procs if p.name.startswith("worker-b"))
    job = stack.submit(client, debian_image.reference)

    def downloading() -> dict[str, Any] | None:
        view = client.get(f"/v1/exports/{job['id']}").json()
        assert view["status"] in ("queued", "running"), view
        rows = [r for r in _tasks(stack, view["build_id"])
                if r["kind"] == "fetch" and r["state"] == "started" and r["layer"] in (0, 1)]
        return view if rows else None

    view = wait_for(downloading, 120, "a layer download to start", interval=0.05,
                    on_timeout=stack.logs)
    worker_b.kill_group(signal.SIGKILL)
    worker_b.popen.wait(timeout=10)
    first_build = view["build_id"]
    # Another fetch worker joins (as a replacement would); the stopped heartbeat of b's tasks
    # makes the API relaunch the build.
    stack.start_worker("c", concurrency=2, queues="fetch")
    done = stack.wait_job(client, job["id"], timeout=180)
    check_succeeded(stack, done)
    assert done["build_id"] != first_build
    lost = [r for r in _tasks(stack, first_build) if r["state"] == "lost"]
    assert lost and all(r["worker"].startswith("b@") for r in lost), lost
    fetched_by = {r["worker"].split("@")[0] for r in _tasks(stack, done["build_id"])
                  if r["kind"] == "fetch"}
    assert fetched_by == {"c"}, fetched_by


def test_pool_process_killed_mid_package(stack: Stack, client: httpx.Client,
                                         debian_image: Any) -> None:
    # What a worker killed mid-package leaves behind for a build that has since ended.
    abandoned = stack.output_dir("a") / f".{'f' * 32}.ext4.k1l2.tmp"
    abandoned.mkdir(parents=True)
    (abandoned / "partial").write_bytes(b"x" * 4096)
    job = stack.submit(client, debian_image.reference, label="kill-pool")

    def packaging() -> dict[str, Any] | None:
        view = client.get(f"/v1/exports/{job['id']}").json()
        assert view["status"] in ("queued", "running"), view
        rows = [r for r in _tasks(stack, view["build_id"])
                if r["kind"] == "package" and r["state"] == "started"]
        return rows[0] if rows and view["phase"] in ("apply", "package") else None

    row = wait_for(packaging, 180, "the package step to start", interval=0.05,
                   on_timeout=stack.logs)
    os.kill(row["pid"], signal.SIGKILL)
    done = stack.wait_job(client, job["id"], timeout=180)
    check_succeeded(stack, done)
    package = [r for r in _tasks(stack, done["build_id"]) if r["kind"] == "package"]
    assert len(package) == 1 and package[0]["deliveries"] == 2, package
    assert package[0]["pid"] != row["pid"]
    assert not abandoned.exists()


def test_task_whose_process_keeps_dying_fails_the_job(stack: Stack, client: httpx.Client,
                                                      debian_image: Any) -> None:
    """A message that kills its worker process every time (the OOM killer, say) is not
    redelivered forever: after MAX_DELIVERIES the job fails saying so."""
    from worker.tasks import MAX_DELIVERIES

    job = stack.submit(client, debian_image.reference, label="poison")
    killed: list[int] = []
    for delivery in range(1, MAX_DELIVERIES + 1):
        def running(n: int = delivery) -> dict[str, Any] | None:
            view = client.get(f"/v1/exports/{job['id']}").json()
            assert view["status"] in ("queued", "running"), view
            rows = [r for r in _tasks(stack, view["build_id"])
                    if r["kind"] == "package" and r["state"] == "started"
                    and r["deliveries"] == n and r["pid"] not in killed]
            return rows[0] if rows else None

        row = wait_for(running, 120, f"delivery {delivery} of the package task", interval=0.05,
                       on_timeout=stack.logs)
        os.kill(row["pid"], signal.SIGKILL)
        killed.append(row["pid"])
    done = stack.wait_job(client, job["id"], timeout=60)
    assert done["status"] == "failed", done
    assert "died each time" in done["error"] and "package task" in done["error"], done["error"]
    leftovers = [p.name for p in stack.output_dir("a").iterdir() if done["build_id"] in p.name]
    assert leftovers == [], leftovers
