"""The REST API over real HTTP (uvicorn subprocess): auth, validation, health, cancel of a queued
job, and `serve` refusing an exposed address without a token. No workers run here."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.stack import CLI, Stack, running
from tests.support._proc import free_port

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-test-token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("api")
    with running(Stack(workdir=workdir, redis_url=redis_server.url,
                       database_url=f"sqlite:///{workdir / 'jobs.db'}", api_token=TOKEN)) as s:
        yield s


def test_healthz_checks_database_and_broker(client: httpx.Client) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_token_is_required(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api_url, timeout=10) as anon:
        resp = anon.get("/v1/exports")
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"
        assert anon.get("/v1/exports", headers={"Authorization": "Bearer wrong"}
                        ).status_code == 401
        assert anon.post("/v1/exports", json={"image": "alpine"}).status_code == 401
        assert anon.get("/healthz").status_code == 200     # probes need no token
        assert anon.get("/v1/exports", headers={"Authorization": f"Bearer {TOKEN}"}
                        ).status_code == 200


@pytest.mark.parametrize(("body", "expect"), [
    ({"image": "UPPER/Case::bad"}, "invalid image reference"),
    ({"image": "x@sha256:12"}, "invalid digest"),
    ({"image": ""}, "image"),
    ({}, "image"),
    ({"image": "alpine", "platform": "linux"}, "invalid platform 'linux'"),
    ({"image": "alpine", "format": "zip"}, "format"),
    ({"image": "alpine", "size": "lots"}, "'lots' is not a size"),
    ({"image": "alpine", "size": "1K"}, "outside the accepted range"),
    ({"image": "alpine", "size": "99T"}, "outside the accepted range"),
    ({"image": "alpine", "headroom": -1}, "between 0 and"),
    ({"image": "alpine", "headroom": "huge"}, "'huge' is not a size"),
    ({"image": "alpine", "format": "tar", "size": "1G"}, "applies to the ext4 format only"),
    ({"image": "alpine", "label": "x" * 17}, "at most 16"),
    ({"image": "alpine", "node": "../etc"}, "names a Celery queue"),
    ({"image": "alpine", "ext4_method": "magic"}, "ext4_method"),
    ({"image": "alpine", "output": "/etc/passwd"}, "output"),
])
def test_bad_requests_are_422_with_a_useful_message(client: httpx.Client, body: dict[str, Any],
                                                    expect: str) -> None:
    resp = client.post("/v1/exports", json=body)
    assert resp.status_code == 422, resp.text
    assert expect in resp.text, resp.text


def test_unknown_job_is_404(client: httpx.Client) -> None:
    assert client.get("/v1/exports/nope").status_code == 404
    assert client.delete("/v1/exports/nope").status_code == 404
    assert client.get("/v1/exports", params={"limit": 0}).status_code == 422


def test_queued_job_can_be_canceled(client: httpx.Client) -> None:
    """No worker consumes the queue here: the job waits, and DELETE cancels it."""
    resp = client.post("/v1/exports", json={"image": "127.0.0.1:9/never/runs:1", "size": "64M",
                                            "headroom": "32M", "platform": "linux/amd64"})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/exports/{job['id']}"
    assert job["status"] == "queued"
    assert job["options"] == {"size": 64 << 20, "headroom": 0.0, "min_free": 32 << 20,
                              "ext4_method": "auto", "label": "rootfs"}
    assert job["platform"] == "linux/amd64"
    listed = client.get("/v1/exports", params={"status": "queued"}).json()
    assert job["id"] in {i["id"] for i in listed["items"]}
    resp = client.delete(f"/v1/exports/{job['id']}")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    again = client.delete(f"/v1/exports/{job['id']}")
    assert again.status_code == 409 and "already canceled" in again.text
    assert client.get(f"/v1/exports/{job['id']}").json()["status"] == "canceled"


def test_unhealthy_when_broker_down_or_schema_missing(tmp_path: Path, redis_server: Any) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    s = Stack(workdir=tmp_path, redis_url=dead, database_url=f"sqlite:///{tmp_path / 'none.db'}")
    try:
        s.start_api()
        with s.client() as c:
            resp = c.get("/healthz")
            assert resp.status_code == 503
            body = resp.json()
            assert body["status"] == "unhealthy"
            assert body["database"].startswith("error:") and "db upgrade" in body["database"]
            assert body["broker"].startswith("error:")
    finally:
        s.stop()


def test_submit_with_broker_down_is_503_and_the_job_failed(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    s = Stack(workdir=tmp_path, redis_url=dead, database_url=f"sqlite:///{tmp_path / 'j.db'}")
    try:
        s.migrate()
        s.start_api()
        with s.client() as c:
            resp = c.post("/v1/exports", json={"image": "alpine"})
            assert resp.status_code == 503, resp.text
            assert "could not be queued" in resp.text
            items = c.get("/v1/exports").json()["items"]
            assert [i["status"] for i in items] == ["failed"]
    finally:
        s.stop()


def test_serve_refuses_an_exposed_address_without_a_token(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ROOTFS_EXPORT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    out = subprocess.run([CLI, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API token" in out.stderr
    assert "ROOTFS_EXPORT_API_TOKEN" in out.stderr
