"""Registry failures through the service: transient errors are retried by the layer task, a
permanent one fails the job naming the layer; private-registry credentials stay with the
workers (never in task arguments, results, the job store or a log line)."""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import requests

from tests.service.images import push_small_image
from tests.service.stack import Stack, WorkerSpec, running
from tests.service.test_e2e import check_succeeded
from tests.support.imagebuilder import delete_blob

pytestmark = pytest.mark.timeout(240)

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "host"}


class FlakyProxy:
    """Real HTTP in front of the real registry; answers 503 to the first ``failures`` GETs of
    each blob listed in ``flaky`` (what an overloaded registry or CDN does)."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream = upstream
        self.failures = failures
        self.flaky: set[str] = set()
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _forward(self) -> None:
                digest = self.path.rsplit("/", 1)[-1]
                if self.command == "GET" and "/blobs/" in self.path and digest in proxy.flaky:
                    with proxy.lock:
                        proxy.seen[digest] += 1
                        fail = proxy.seen[digest] <= proxy.failures
                    if fail:
                        body = b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}'
                        self.send_response(503)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                resp = requests.request(self.command, proxy.upstream + self.path,
                                        headers=headers, stream=True, allow_redirects=False,
                                        timeout=30)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-encoding":
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    for chunk in resp.raw.stream(1 << 16, decode_content=False):
                        self.wfile.write(chunk)
                resp.close()

            do_GET = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("registry-errors")
    # No transport-level retries: every 503 reaches the task, which must retry it itself.
    s = Stack(workdir=workdir, redis_url=redis_server.url,
              database_url=f"sqlite:///{workdir / 'jobs.db'}",
              extra_env={"ROOTFS_EXPORT_RETRIES": "0", "ROOTFS_EXPORT_RETRY_BACKOFF": "0.1"})
    with running(s, WorkerSpec("a")):
        yield s


def _tasks(stack: Stack, build_id: str) -> list[dict[str, Any]]:
    from api import store

    return store.build_tasks(stack.database_url, build_id)


def test_transient_blob_errors_are_retried_by_the_layer_task(stack: Stack, client: httpx.Client,
                                                             registry: Any) -> None:
    image = push_small_image(registry, layers=2)
    with FlakyProxy(registry.url, failures=2) as proxy:
        proxy.flaky = set(image.layer_digests)
        ref = image.reference.replace(registry.host, proxy.host)
        done = stack.wait_job(client, stack.submit(client, ref)["id"], timeout=120)
    check_succeeded(stack, done)
    assert all(proxy.seen[d] == 3 for d in image.layer_digests), proxy.seen
    fetches = [t for t in _tasks(stack, done["build_id"]) if t["kind"] == "fetch"]
    assert len(fetches) == 2 and all(t["deliveries"] == 3 for t in fetches), fetches


def test_missing_layer_fails_the_job_naming_the_layer(stack: Stack, client: httpx.Client,
                                                      registry: Any) -> None:
    image = push_small_image(registry, layers=3)
    gone = image.layer_digests[1]
    delete_blob(registry, image.repo, gone)
    done = stack.wait_job(client, stack.submit(client, image.reference)["id"], timeout=120)
    assert done["status"] == "failed", done
    assert gone in done["error"] and "layer 2/3" in done["error"], done["error"]
    assert done["result"] is None
    out = stack.output_dir("a")
    assert not out.exists() or not any(done["build_id"] in p.name for p in out.iterdir())


def test_private_registry_credentials_stay_with_the_workers(
        stack: Stack, client: httpx.Client, auth_registry: Any) -> None:
    secret = auth_registry.password
    assert secret
    auth = base64.b64encode(f"{auth_registry.username}:{secret}".encode()).decode()
    image = push_small_image(auth_registry, layers=2)
    # Without credentials the job fails: the registry really demands them.
    denied = stack.wait_job(client, stack.submit(client, image.reference)["id"], timeout=60)
    assert denied["status"] == "failed", denied
    assert "401" in denied["error"] or "credentials" in denied["error"].lower(), denied
    (stack.docker_config / "config.json").write_text(
        json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    done = stack.wait_job(client, stack.submit(client, image.reference, label="private")["id"])
    check_succeeded(stack, done)

    haystacks: dict[str, bytes] = {}
    for path in stack.workdir.glob("*.log"):
        haystacks[path.name] = path.read_bytes()
    for path in stack.workdir.glob("jobs.db*"):
        haystacks[path.name] = path.read_bytes()
    haystacks["api"] = client.get("/v1/exports", params={"limit": 500}).content
    import redis

    for url in (stack.broker_url, stack.backend_url):
        r = redis.Redis.from_url(url)
        for key in r.scan_iter(count=1000):
            kind = r.type(key)
            items: list[Any] = []
            if kind == b"string":
                items = [r.get(key)]
            elif kind == b"list":
                items = list(r.lrange(key, 0, -1))
            elif kind == b"hash":
                items = [x for kv in r.hgetall(key).items() for x in kv]
            elif kind == b"zset":
                items = list(r.zrange(key, 0, -1))
            elif kind == b"set":
                items = list(r.smembers(key))
            value = b"".join(x if isinstance(x, bytes) else str(x).encode() for x in items)
            haystacks[f"redis {url} {key!r}"] = bytes(key) + value
        r.close()
    assert len(haystacks) > 5
    for where, data in haystacks.items():
        assert secret.encode() not in data, f"the registry password appears in {where}"
        assert auth.encode() not in data, f"the encoded credentials appear in {where}"
