"""The service end to end: real Redis, real Celery workers on two nodes, the real API over HTTP,
Flower, and the real test registry. SQLite job store here; PostgreSQL in test_e2e_postgres.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.images import blob_gets, push_small_image
from tests.service.stack import Stack, WorkerSpec, running, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("service")
    s = Stack(workdir=workdir, redis_url=redis_server.url,
              database_url=f"sqlite:///{workdir / 'jobs.db'}",
              extra_env={"FLOWER_UNAUTHENTICATED_API": "true"})
    with running(s, WorkerSpec("a"), WorkerSpec("b")):
        yield s


@pytest.fixture(scope="module")
def flower(stack: Stack) -> str:
    _proc, port = stack.start_flower()
    return f"http://127.0.0.1:{port}"


def e2fsck_ok(path: str) -> None:
    out = subprocess.run(["e2fsck", "-fn", path], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    assert out.returncode == 0, f"e2fsck -fn {path}: {out.returncode}\n{out.stdout}{out.stderr}"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_succeeded(stack: Stack, job: dict[str, Any], node: str = "a") -> str:
    assert job["status"] == "succeeded", f"{job}\n{stack.logs()}"
    result = job["result"]
    out = result["output"]
    assert Path(out).parent == stack.output_dir(node), out
    assert Path(out).stat().st_size == result["size"]
    assert file_sha256(out) == result["sha256"].removeprefix("sha256:")
    e2fsck_ok(out)
    return str(out)


def test_small_image_export_succeeds_and_ran_on_both_workers(
        stack: Stack, client: httpx.Client, registry: Any, flower: str) -> None:
    image = push_small_image(registry, layers=8, layer_bytes=256 << 10)
    job = stack.submit(client, image.reference)
    assert job["status"] in ("queued", "running") and job["node"] == "a"
    assert client.get(f"/v1/exports/{job['id']}").status_code == 200
    done = stack.wait_job(client, job["id"])
    out = check_succeeded(stack, done)
    assert done["result"]["config"]["Entrypoint"] == ["/bin/sh"]
    assert done["manifest_digest"] == image.manifest_digest
    assert done["progress"]["layers_total"] == 8

    # Flower's HTTP API lists the job's tasks with readable names and credential-free args.
    def flower_tasks() -> dict[str, Any] | None:
        tasks = httpx.get(f"{flower}/api/tasks", timeout=10).json()
        mine = {k: t for k, t in tasks.items() if job["id"] in str(t.get("args"))
                or done["build_id"] in str(t.get("args")) + str(t.get("kwargs"))}
        names = {t["name"] for t in mine.values()}
        ok = {"rootfs_export.resolve", "rootfs_export.fetch_layer",
              "rootfs_export.package"} <= names and all(
            t.get("state") == "SUCCESS" for t in mine.values())
        return mine if ok else None

    tasks = wait_for(flower_tasks, 30, "flower to list the job's tasks", interval=0.5)
    fetches = [t for t in tasks.values() if t["name"] == "rootfs_export.fetch_layer"]
    assert len(fetches) == 8
    assert {t["args"].count("sha256:") for t in fetches} == {1}
    workers = {t["worker"] for t in fetches}
    assert len(workers) >= 2, f"all layer tasks ran on {workers}"
    package = [t for t in tasks.values() if t["name"] == "rootfs_export.package"]
    assert package[0]["worker"].startswith("a@"), package
    assert Path(out).exists()


def test_bad_reference_is_422(client: httpx.Client) -> None:
    resp = client.post("/v1/exports", json={"image": "UPPER/Case::bad"})
    assert resp.status_code == 422
    assert "invalid image reference" in resp.text


def test_registry_404_fails_the_job_clearly(stack: Stack, client: httpx.Client,
                                             registry: Any) -> None:
    ref = f"{registry.host}/svc/does-not-exist:v1"
    job = stack.submit(client, ref)
    done = stack.wait_job(client, job["id"], timeout=60)
    assert done["status"] == "failed", done
    assert "does-not-exist" in done["error"] and "not found" in done["error"].lower(), done


def test_twenty_identical_jobs_download_each_blob_once(stack: Stack, client: httpx.Client,
                                                       registry: Any) -> None:
    image = push_small_image(registry, layers=3, layer_bytes=512 << 10)
    before = blob_gets(registry.log_path.read_text())
    jobs: list[dict[str, Any]] = []
    lock = threading.Lock()

    def submit(body: dict[str, Any]) -> None:
        with stack.client() as c:
            j = stack.submit(c, image.reference, **body)
        with lock:
            jobs.append(j)

    # 18 identical jobs coalesce onto one build; 2 more with another label make a second build
    # that fetches the same blobs at the same time.
    bodies: list[dict[str, Any]] = [{}] * 18 + [{"label": "second"}] * 2
    threads = [threading.Thread(target=submit, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(jobs) == 20
    finished = [stack.wait_job(client, j["id"]) for j in jobs]
    assert all(j["status"] == "succeeded" for j in finished), finished
    first = [j for j in finished if j["options"]["label"] == "rootfs"]
    second = [j for j in finished if j["options"]["label"] == "second"]
    assert len({j["result"]["output"] for j in first}) == 1
    assert len({j["build_id"] for j in first}) == 1
    assert sum(j["reused"] for j in first) == 17
    assert len({j["build_id"] for j in second}) == 1
    assert second[0]["build_id"] != first[0]["build_id"]
    check_succeeded(stack, first[0])
    check_succeeded(stack, second[0])
    after = blob_gets(registry.log_path.read_text())
    # Every layer blob crossed the network once. (Each job's resolve reads the manifest and the
    # few-KB config itself, since a tag may move between submissions.)
    for digest in image.layer_digests:
        downloads = after[digest] - before[digest]
        assert downloads == 1, f"layer {digest} downloaded {downloads} times"

    listed = client.get("/v1/exports", params={"status": "succeeded", "limit": 5})
    assert listed.status_code == 200
    body = listed.json()
    assert len(body["items"]) == 5 and body["total"] >= 20
    page2 = client.get("/v1/exports", params={"status": "succeeded", "limit": 5, "offset": 5})
    assert {i["id"] for i in page2.json()["items"]}.isdisjoint({i["id"] for i in body["items"]})
    assert client.get("/v1/exports", params={"status": "bogus"}).status_code == 422


def test_finished_identical_job_reuses_the_artifact(stack: Stack, client: httpx.Client,
                                                    registry: Any) -> None:
    image = push_small_image(registry, layers=2)
    first = stack.wait_job(client, stack.submit(client, image.reference)["id"])
    assert first["status"] == "succeeded"
    t0 = time.monotonic()
    second = stack.wait_job(client, stack.submit(client, image.reference)["id"])
    assert second["status"] == "succeeded" and second["reused"]
    assert second["result"]["output"] == first["result"]["output"]
    assert time.monotonic() - t0 < 30
    # Other options are another artifact.
    third = stack.wait_job(client, stack.submit(client, image.reference, label="other")["id"])
    assert third["status"] == "succeeded" and third["build_id"] != first["build_id"]
    check_succeeded(stack, third)


def test_job_for_node_b_is_packaged_on_b(stack: Stack, client: httpx.Client,
                                         registry: Any) -> None:
    image = push_small_image(registry, layers=2)
    done = stack.wait_job(client, stack.submit(client, image.reference, node="b",
                                               format="tar")["id"])
    assert done["status"] == "succeeded", done
    out = Path(done["result"]["output"])
    assert out.parent == stack.output_dir("b") and out.suffix == ".tar"
    assert file_sha256(str(out)) == done["result"]["sha256"].removeprefix("sha256:")


def _build_tasks(stack: Stack, build_id: str) -> list[dict[str, Any]]:
    from api import store

    return store.build_tasks(stack.database_url, build_id)


@pytest.mark.slow
def test_debian_image_progress_is_visible_mid_job(stack: Stack, client: httpx.Client,
                                                  debian_image: Any, flower: str) -> None:
    job = stack.submit(client, debian_image.reference)
    seen: list[dict[str, Any]] = []
    flower_progress: list[dict[str, Any]] = []

    def record(view: dict[str, Any]) -> None:
        if view["status"] == "running" and view["progress"]:
            seen.append(view["progress"])
            if view["build_id"] and len(seen) % 4 == 0:
                tasks = httpx.get(f"{flower}/api/tasks", timeout=10).json()
                flower_progress.extend(
                    t for t in tasks.values() if t.get("state") == "PROGRESS"
                    and view["build_id"] in str(t.get("args")) + str(t.get("kwargs")))

    done = stack.wait_job(client, job["id"], timeout=240, on_poll=record)
    out = check_succeeded(stack, done)
    assert done["result"]["config"] is not None
    assert Path(out).stat().st_size > 100 << 20
    # Snapshots taken while the job ran show it part-way, in more than one phase.
    partial = [p for p in seen if p["bytes_total"] and 0 < p["bytes_done"] < p["bytes_total"]
               or 0 < p["layers_done"] < p["layers_total"]]
    assert partial, f"no mid-job progress among {len(seen)} snapshots"
    phases = {p["phase"] for p in seen}
    assert "download" in phases and phases & {"apply", "package"}, phases
    assert done["progress"]["phase"] == "done"
    # Flower showed the running tasks in the PROGRESS state, with the progress event.
    assert flower_progress, "Flower never showed a task in state PROGRESS"
    phases_in_flower = {json.loads(t["result"])["phase"] for t in flower_progress}
    assert phases_in_flower <= {"download", "apply", "package", "check"}, phases_in_flower


@pytest.mark.slow
def test_cancel_stops_the_package_step_and_removes_partial_output(
        stack: Stack, client: httpx.Client, debian_image: Any) -> None:
    job = stack.submit(client, debian_image.reference, label="cancel-me")

    def packaging() -> dict[str, Any] | None:
        view = client.get(f"/v1/exports/{job['id']}").json()
        assert view["status"] not in ("succeeded", "failed"), view
        return view if view["phase"] in ("apply", "package") else None

    view = wait_for(packaging, 240, "the package step to start", interval=0.05)
    build_id = view["build_id"]
    resp = client.delete(f"/v1/exports/{job['id']}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "canceled"

    def package_ended() -> bool:
        rows = [r for r in _build_tasks(stack, build_id) if r["kind"] == "package"]
        return bool(rows) and all(r["state"] != "started" for r in rows)

    wait_for(package_ended, 60, "the package task to stop", on_timeout=stack.logs)
    final = client.get(f"/v1/exports/{job['id']}").json()
    assert final["status"] == "canceled" and final["result"] is None, final
    leftovers = [p.name for p in stack.output_dir("a").iterdir() if build_id in p.name]
    assert leftovers == [], leftovers
