"""The service with its job store in PostgreSQL (a fresh database, migrated by `db upgrade`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.images import blob_gets, push_small_image
from tests.service.stack import Stack, WorkerSpec, running, wait_for
from tests.service.test_e2e import check_succeeded

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: Any,
          postgres_module_url: str) -> Iterator[Stack]:
    s = Stack(workdir=tmp_path_factory.mktemp("service-pg"), redis_url=redis_server.url,
              database_url=postgres_module_url)
    with running(s, WorkerSpec("a"), WorkerSpec("b")):
        yield s


def test_jobs_succeed_and_coalesce_on_postgresql(stack: Stack, client: httpx.Client,
                                                 registry: Any) -> None:
    assert client.get("/healthz").json()["database"] == "ok"
    image = push_small_image(registry, layers=4)
    before = blob_gets(registry.log_path.read_text())
    jobs: list[dict[str, Any]] = []
    lock = threading.Lock()

    def submit() -> None:
        with stack.client() as c:
            j = stack.submit(c, image.reference)
        with lock:
            jobs.append(j)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    finished = [stack.wait_job(client, j["id"]) for j in jobs]
    assert len(finished) == 8
    assert len({j["build_id"] for j in finished}) == 1, finished
    check_succeeded(stack, finished[0])
    after = blob_gets(registry.log_path.read_text())
    assert all(after[d] - before[d] == 1 for d in image.layer_digests)


def test_registry_404_and_cancel_on_postgresql(stack: Stack, client: httpx.Client,
                                               registry: Any) -> None:
    failed = stack.wait_job(client, stack.submit(client, f"{registry.host}/svc/nope:1")["id"])
    assert failed["status"] == "failed" and "not found" in failed["error"], failed
    image = push_small_image(registry, layers=2)
    job = stack.submit(client, image.reference, format="dir")
    resp = client.delete(f"/v1/exports/{job['id']}")
    assert resp.status_code in (200, 409), resp.text
    final = stack.wait_job(client, job["id"])
    if resp.status_code == 200:
        assert final["status"] == "canceled"
        wait_for(lambda: not [p for p in stack.output_dir("a").glob(f"*{final['build_id']}*")]
                 if final["build_id"] else True, 30, "no output for the canceled job")
    else:   # it was already done: then it must have succeeded
        assert final["status"] == "succeeded"
