"""Client behaviour against a real HTTP server that misbehaves on purpose (tests/pull/conftest)."""

from __future__ import annotations

import gzip
import json
import logging
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pull.conftest import FakeServer
from tests.support.imagebuilder import Layer, TarEntry, file, make_tar, sha256_digest
from worker.cache.blobs import BlobCache
from worker.errors import (
    AuthenticationError,
    ConfigError,
    CorruptLayer,
    DigestMismatch,
    LimitExceeded,
    RegistryError,
    UnsupportedManifest,
)
from worker.export import fetch_layer, resolve
from worker.pull.credentials import Credentials
from worker.pull.fetch import fetch_layers
from worker.pull.reference import parse_reference
from worker.pull.registry import RegistryClient

PASSWORD = "hunter2-very-secret"


@pytest.fixture
def fast(settings_factory: Any) -> Any:
    return settings_factory(retry_backoff=0.01, retries=3)


def gz_layer(n: int = 3, size: int = 300_000, seed: int = 0) -> Layer:
    import random
    rnd = random.Random(seed)
    return Layer.from_entries([file(f"f{i}", rnd.randbytes(size)) for i in range(n)], "gzip")


def assert_cache_clean(cache_dir: Path) -> None:
    cache = BlobCache(cache_dir)
    assert cache.entries() == []
    assert list(cache.tmp_dir.iterdir()) == []
    assert list(cache.blob_dir.iterdir()) == []


def pull(image: str, settings: Any, **kw: Any) -> list[Any]:
    resolved = resolve(image, None, settings, **kw)
    return fetch_layers(resolved, settings, **kw)


# -- digests -----------------------------------------------------------------------------------
def test_wrong_blob_digest_rejected_and_nothing_cached(fake_registry: FakeServer,
                                                       fast: Any) -> None:
    layer = gz_layer()
    img = fake_registry.add_image("app", "v1", [layer])
    tampered = bytearray(layer.blob)
    tampered[len(tampered) // 2] ^= 0xFF
    fake_registry.lying_blobs[img.layer_digests[0]] = bytes(tampered)
    with pytest.raises(DigestMismatch) as info:
        pull(img.reference, fast)
    assert img.layer_digests[0] in str(info.value)
    assert_cache_clean(fast.cache_dir)


def test_blob_longer_than_descriptor_rejected(fake_registry: FakeServer, fast: Any) -> None:
    layer = gz_layer(1, 1000)
    img = fake_registry.add_image("app", "v1", [layer])
    fake_registry.lying_blobs[img.layer_digests[0]] = layer.blob + b"extra bytes"
    with pytest.raises(DigestMismatch, match="larger than"):
        pull(img.reference, fast)
    assert_cache_clean(fast.cache_dir)


def test_lying_diff_id_rejected(fake_registry: FakeServer, fast: Any) -> None:
    good, bad = gz_layer(1, 1000, 1), gz_layer(1, 1000, 2)
    img = fake_registry.add_image("app", "v1", [good, bad],
                                  diff_ids=[good.diff_id, sha256_digest(b"lie")])
    with pytest.raises(DigestMismatch) as info:
        pull(img.reference, fast)
    msg = str(info.value)
    assert img.layer_digests[1] in msg and "diff_id" in msg
    assert not BlobCache(fast.cache_dir).has(img.layer_digests[1])
    assert list(BlobCache(fast.cache_dir).tmp_dir.iterdir()) == []


def test_pinned_manifest_digest_checked(fake_registry: FakeServer, fast: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    other = sha256_digest(b"something else")
    # the server answers the pinned digest with a different manifest
    fake_registry.manifests[("app", other)] = (img.manifest_body, "application/vnd.oci.image."
                                                                  "manifest.v1+json")
    with pytest.raises(DigestMismatch, match="manifest"):
        resolve(f"{fake_registry.netloc}/app@{other}", None, fast)
    r = resolve(f"{fake_registry.netloc}/app@{img.manifest_digest}", None, fast)
    assert r.manifest_digest == img.manifest_digest


def test_schema1_refused(fake_registry: FakeServer, fast: Any) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "old", "tag": "v1", "fsLayers": [],
                       "signatures": []}).encode()
    fake_registry.add_manifest("old", "v1", body,
                               "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(UnsupportedManifest, match="schema1"):
        resolve(f"{fake_registry.netloc}/old:v1", None, fast)


def test_manifest_size_limit(fake_registry: FakeServer, settings_factory: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    settings = settings_factory(max_manifest_bytes=100)
    with pytest.raises(RegistryError, match="exceeds the limit"):
        resolve(img.reference, None, settings)


# -- broken streams ------------------------------------------------------------------------
def test_truncated_gzip_is_corrupt_and_not_cached(fake_registry: FakeServer, fast: Any) -> None:
    full = gz_layer(2, 50_000)
    truncated = Layer(full.tar, "gzip")
    truncated.__dict__["blob"] = full.blob[: len(full.blob) // 2]   # the registry has this
    img = fake_registry.add_image("app", "v1", [truncated])
    with pytest.raises(CorruptLayer) as info:
        pull(img.reference, fast)
    assert img.layer_digests[0] in str(info.value)
    assert_cache_clean(fast.cache_dir)


def test_decompression_bomb_over_the_network(fake_registry: FakeServer,
                                             settings_factory: Any) -> None:
    ti = tarfile.TarInfo("bomb")
    ti.size = 1 << 30
    blob = gzip.compress(ti.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * (256 << 20), 9)
    layer = Layer(b"", "gzip")
    layer.__dict__["blob"] = blob
    img = fake_registry.add_image("bomb", "v1", [layer], diff_ids=[sha256_digest(b"x")])
    settings = settings_factory(max_uncompressed_bytes=16 << 20)
    start = time.monotonic()
    with pytest.raises(LimitExceeded) as info:
        pull(img.reference, settings)
    assert time.monotonic() - start < 60
    assert img.layer_digests[0] in str(info.value)
    assert "ROOTFS_EXPORT_MAX_UNCOMPRESSED_BYTES" in str(info.value)
    assert_cache_clean(settings.cache_dir)


def test_dropped_connection_resumes_with_range(fake_registry: FakeServer, fast: Any) -> None:
    layer = gz_layer(4, 400_000)
    img = fake_registry.add_image("app", "v1", [layer])
    fake_registry.drop_after[img.layer_digests[0]] = 700_000
    (index,) = pull(img.reference, fast)
    blob_gets = fake_registry.requests_to(f"/blobs/{img.layer_digests[0]}")
    assert len(blob_gets) == 2
    assert "Range" not in blob_gets[0].headers
    assert blob_gets[1].headers.get("Range", "").startswith("bytes=")
    start = int(blob_gets[1].headers["Range"].split("=")[1].rstrip("-"))
    assert 0 < start <= 700_000
    assert index.diff_id == layer.diff_id
    cache = BlobCache(fast.cache_dir)
    assert cache.path(img.layer_digests[0]).read_bytes() == layer.blob


def test_resume_when_server_ignores_range(fake_registry: FakeServer, fast: Any) -> None:
    layer = gz_layer(3, 400_000)
    img = fake_registry.add_image("app", "v1", [layer])
    fake_registry.drop_after[img.layer_digests[0]] = 500_000
    fake_registry.ignore_range = True
    (index,) = pull(img.reference, fast)
    assert index.diff_id == layer.diff_id
    assert BlobCache(fast.cache_dir).path(img.layer_digests[0]).read_bytes() == layer.blob


# -- retries ----------------------------------------------------------------------------------
def test_429_retry_after_is_honoured(fake_registry: FakeServer, fast: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    fake_registry.failures["/manifests/"] = [(429, {"Retry-After": "2"})]
    start = time.monotonic()
    r = resolve(img.reference, None, fast)
    waited = time.monotonic() - start
    assert r.manifest_digest == img.manifest_digest
    assert waited >= 1.9   # the backoff alone would be ~0.01 s
    assert len(fake_registry.requests_to("/manifests/")) == 2


def test_retry_after_over_the_cap_fails_at_once(fake_registry: FakeServer,
                                                settings_factory: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    fake_registry.failures["/manifests/"] = [(429, {"Retry-After": "999999"})]
    settings = settings_factory(max_retry_after=0.2, retry_backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, settings)
    assert time.monotonic() - start < 5
    assert "registry asked to retry after 999999 s" in str(info.value)
    assert "more than ROOTFS_EXPORT_MAX_RETRY_AFTER=0.2" in str(info.value)
    assert img.reference in str(info.value)
    assert info.value.transient and info.value.status == 429
    assert len(fake_registry.requests_to("/manifests/")) == 1
    # within the cap it is honoured
    fake_registry.failures["/manifests/"] = [(503, {"Retry-After": "0.1"})]
    assert resolve(img.reference, None, settings).manifest_digest == img.manifest_digest


def test_5xx_retried_then_exhausted(fake_registry: FakeServer, fast: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    blob = f"/blobs/{img.layer_digests[0]}"
    fake_registry.failures[blob] = [(503, {}), (502, {})]
    pull(img.reference, fast)
    assert len(fake_registry.requests_to(blob)) == 3
    # now always failing: a transient RegistryError naming the layer
    fake_registry.failures[blob] = [(500, {})] * 10
    with pytest.raises(RegistryError) as info:
        fetch_layers(resolve(img.reference, None, fast), fast,
                     cache=BlobCache(fast.cache_dir / "other"))
    assert info.value.transient and info.value.status == 500
    assert img.layer_digests[0] in str(info.value)


# -- auth ------------------------------------------------------------------------------------
def test_bearer_token_flow_scopes_and_reuse(fake_registry: FakeServer, fast: Any) -> None:
    fake_registry.bearer = True
    a = fake_registry.add_image("team/a", "v1", [gz_layer(1, 100)])
    b = fake_registry.add_image("team/b", "v1", [gz_layer(1, 100, 5)])
    ref_a = parse_reference(a.reference)
    with RegistryClient.for_reference(ref_a, fast) as client:
        client.resolve(ref_a)
        client.resolve(ref_a)
        assert client.auth.token_fetches == 1            # reused, not refetched
        client.resolve(parse_reference(b.reference))
        assert client.auth.token_fetches == 2            # a second repository: its own scope
    scopes = [t["scope"] for t in fake_registry.token_requests]
    assert scopes == ["repository:team/a:pull", "repository:team/b:pull"]
    assert all(t["service"] == "fake-registry" for t in fake_registry.token_requests)
    # anonymous: no credentials were sent to the token endpoint
    assert all(t["authorization"] == "" for t in fake_registry.token_requests)


def test_token_endpoint_failures_are_retried_like_registry_requests(
        fake_registry: FakeServer, fast: Any) -> None:
    fake_registry.bearer = True
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 100)])
    # a 503, a 429 with Retry-After, a dropped connection, then the token
    fake_registry.failures["/token"] = [(503, {}), (429, {"Retry-After": "1"}), (0, {})]
    start = time.monotonic()
    (index,) = pull(img.reference, fast)
    assert index.digest == img.layer_digests[0]
    assert time.monotonic() - start >= 0.9           # Retry-After honoured (backoff: ~0.01 s)
    # each failure was retried: the three failures, then one answered request per token
    assert len(fake_registry.requests_to("/token")) == 3 + len(fake_registry.token_requests)
    # retries exhausted (fast: 3 retries): a transient error naming the token service
    before = len(fake_registry.requests_to("/token"))
    fake_registry.failures["/token"] = [(503, {})] * 10
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, fast)
    assert info.value.transient and info.value.status == 503
    assert "token service" in str(info.value) and "4 attempts" in str(info.value)
    assert len(fake_registry.requests_to("/token")) - before == 4
    before = len(fake_registry.requests_to("/token"))
    fake_registry.failures["/token"] = [(0, {})] * 10
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, fast)
    assert info.value.transient and "token service" in str(info.value)
    assert len(fake_registry.requests_to("/token")) - before == 4


def test_bearer_token_expiry_and_access_token_key(fake_registry: FakeServer, fast: Any) -> None:
    fake_registry.bearer = True
    fake_registry.token_lifetime = 7      # minus the 5 s safety margin: ~2 s
    fake_registry.token_key = "access_token"
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 100)])
    ref = parse_reference(img.reference)
    with RegistryClient.for_reference(ref, fast) as client:
        client.resolve(ref)
        assert client.auth.token_fetches == 1
        time.sleep(2.2)
        client.resolve(ref)
        assert client.auth.token_fetches == 2


def test_bearer_with_basic_credentials(fake_registry: FakeServer, fast: Any) -> None:
    fake_registry.bearer = True
    fake_registry.basic = ("alice", PASSWORD)
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 100)])
    (index,) = pull(img.reference, fast, credentials=Credentials("alice", PASSWORD))
    assert index.digest == img.layer_digests[0]
    assert all(t["authorization"].startswith("Basic ") for t in fake_registry.token_requests)
    with pytest.raises(AuthenticationError) as info:
        resolve(img.reference, None, fast, credentials=Credentials("alice", "wrong-" + PASSWORD))
    assert PASSWORD not in str(info.value) and "alice" in str(info.value)


def test_basic_auth_and_no_secret_in_errors_or_logs(fake_registry: FakeServer, fast: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake_registry.basic = ("bob", PASSWORD)
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 100)])
    with pytest.raises(AuthenticationError, match="requires authentication"):
        resolve(img.reference, None, fast)
    with pytest.raises(AuthenticationError) as info:
        resolve(img.reference, None, fast, credentials=Credentials("bob", "nope-" + PASSWORD))
    assert "rejected" in str(info.value)
    r = resolve(img.reference, None, fast, credentials=Credentials("bob", PASSWORD))
    fetch_layers(r, fast, credentials=Credentials("bob", PASSWORD))
    sent = [s.headers.get("Authorization", "") for s in fake_registry.seen]
    assert any(h.startswith("Basic ") for h in sent)
    assert PASSWORD not in caplog.text and PASSWORD not in str(info.value)
    client = RegistryClient.for_reference(parse_reference(img.reference), fast,
                                          credentials=Credentials("bob", PASSWORD))
    assert PASSWORD not in repr(client.auth) and PASSWORD not in repr(client)


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_cross_host_redirect_drops_authorization(fake_server_factory: Any, fast: Any,
                                                 scheme: str) -> None:
    registry = fake_server_factory("127.0.0.1")
    storage = fake_server_factory("127.0.0.2")
    if scheme == "bearer":
        registry.bearer = True
    else:
        registry.basic = ("carol", PASSWORD)
    layer = gz_layer(2, 100_000)
    img = registry.add_image("app", "v1", [layer])
    storage.blobs.update(registry.blobs)
    registry.redirect_blobs_to = storage.url
    storage.challenge_on_storage = False
    creds = Credentials("carol", PASSWORD) if scheme == "basic" else None
    (index,) = pull(img.reference, fast, credentials=creds)
    assert index.diff_id == layer.diff_id
    reg_blob = [s for s in registry.requests_to("/blobs/") if "Authorization" in s.headers]
    assert reg_blob, "the registry itself got the credentials"
    at_storage = storage.requests_to("/blob/")
    assert at_storage, "the blob came from the storage host"
    assert all("Authorization" not in s.headers for s in at_storage)


def test_storage_host_challenge_gets_no_credentials(fake_server_factory: Any, fast: Any) -> None:
    registry = fake_server_factory("127.0.0.1")
    storage = fake_server_factory("127.0.0.2")
    registry.basic = ("dave", PASSWORD)
    img = registry.add_image("app", "v1", [gz_layer(1, 100)])
    storage.blobs.update(registry.blobs)
    registry.redirect_blobs_to = storage.url
    storage.challenge_on_storage = True     # 401 + WWW-Authenticate: Basic from object storage
    with pytest.raises(AuthenticationError) as info:
        pull(img.reference, fast, credentials=Credentials("dave", PASSWORD))
    assert all("Authorization" not in s.headers for s in storage.seen)
    assert "SIGNED-SECRET" not in str(info.value) and PASSWORD not in str(info.value)


# -- foreign layers --------------------------------------------------------------------------
def test_foreign_urls_only_when_allowed(fake_server_factory: Any, settings_factory: Any) -> None:
    registry = fake_server_factory("127.0.0.1")
    storage = fake_server_factory("127.0.0.2")
    layer = Layer.from_entries([file("win", "x")], "none")
    img = registry.add_image("app", "v1", [layer], push_layers=False,
                             urls={0: [f"{storage.url}/blob/{layer.digest}"]})
    storage.blobs[layer.digest] = layer.blob
    with pytest.raises(ConfigError, match="ROOTFS_EXPORT_ALLOW_FOREIGN_URLS"):
        pull(img.reference, settings_factory())
    assert storage.seen == []
    (index,) = pull(img.reference, settings_factory(allow_foreign_urls=True))
    assert index.diff_id == layer.diff_id


# -- concurrency, cancellation, idempotence ------------------------------------------------------
def test_first_failure_cancels_the_rest_promptly(fake_registry: FakeServer,
                                                 settings_factory: Any) -> None:
    slow = gz_layer(4, 500_000, 7)
    bad = gz_layer(1, 1000, 8)
    img = fake_registry.add_image("app", "v1", [slow, bad])
    fake_registry.slow_blobs[img.layer_digests[0]] = 0.05     # ~80 KiB/s: minutes to finish
    fake_registry.lying_blobs[img.layer_digests[1]] = b"\x00" * bad.size
    settings = settings_factory(download_concurrency=4, read_timeout=5)
    r = resolve(img.reference, None, settings)
    events: list[Any] = []
    start = time.monotonic()
    with pytest.raises(DigestMismatch) as info:
        fetch_layers(r, settings, progress=events.append)
    assert time.monotonic() - start < 20
    assert img.layer_digests[1] in str(info.value)
    assert_cache_clean(settings.cache_dir)
    states = {lp.digest: lp.state for lp in events[-1].layers}
    assert states[img.layer_digests[1]] == "failed"


def test_user_cancel(fake_registry: FakeServer, settings_factory: Any) -> None:
    from worker.errors import Canceled
    slow = gz_layer(2, 500_000, 9)
    img = fake_registry.add_image("app", "v1", [slow])
    fake_registry.slow_blobs[img.layer_digests[0]] = 0.05
    settings = settings_factory(read_timeout=5)
    r = resolve(img.reference, None, settings)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(Canceled):
        fetch_layers(r, settings, cancel=cancel)
    assert time.monotonic() - start < 15
    assert_cache_clean(settings.cache_dir)


def test_progress_events_and_idempotence(fake_registry: FakeServer, fast: Any) -> None:
    layers = [gz_layer(1, 200_000, s) for s in range(3)]
    img = fake_registry.add_image("app", "v1", layers)
    r = resolve(img.reference, None, fast)
    events: list[Any] = []
    first = fetch_layers(r, fast, progress=events.append)
    last = events[-1]
    assert last.layers_done == last.layers_total == 3
    assert last.bytes_done == last.bytes_total == sum(layer.size for layer in layers)
    assert {lp.state for lp in last.layers} == {"cached"}
    assert any(lp.state == "downloading" for e in events for lp in e.layers)
    gets = len(fake_registry.requests_to("/blobs/sha256"))
    # again: everything comes from the cache, no blob is downloaded
    second = fetch_layers(r, fast)
    assert [i.diff_id for i in second] == [i.diff_id for i in first]
    assert len(fake_registry.requests_to("/blobs/sha256")) == gets
    # and the Celery-style single-layer entry point too
    assert fetch_layer(r, 1, fast).diff_id == layers[1].diff_id


def test_concurrent_fetchers_download_once(fake_registry: FakeServer, fast: Any) -> None:
    layer = gz_layer(4, 300_000, 11)
    img = fake_registry.add_image("app", "v1", [layer])
    fake_registry.slow_blobs[img.layer_digests[0]] = 0.0005
    r = resolve(img.reference, None, fast)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fetch_layers(r, fast, cache=BlobCache(fast.cache_dir)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(fake_registry.requests_to(f"/blobs/{img.layer_digests[0]}")) == 1
    assert all(res[0].diff_id == layer.diff_id for res in results)


def test_blob_without_index_is_reindexed_from_disk(fake_registry: FakeServer, fast: Any) -> None:
    layer = Layer.from_entries([file("a", "1"), TarEntry("d", "dir")], "zstd")
    img = fake_registry.add_image("app", "v1", [layer])
    r = resolve(img.reference, None, fast)
    (first,) = fetch_layers(r, fast)
    cache = BlobCache(fast.cache_dir)
    cache.index_path(first.digest).unlink()        # as if we crashed between the renames
    gets = len(fake_registry.requests_to("/blobs/sha256"))
    (again,) = fetch_layers(r, fast)
    assert again == first
    cache.index_path(first.digest).write_bytes(b"scribbled over")   # a damaged index
    (third,) = fetch_layers(r, fast)
    assert third == first and cache.index(first.digest) == first
    assert len(fake_registry.requests_to("/blobs/sha256")) == gets


def test_media_type_lies_are_sniffed(fake_registry: FakeServer, fast: Any) -> None:
    zstd_as_gzip = Layer(make_tar([file("z", "zz")]), "zstd",
                         media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    plain_as_gzip = Layer(make_tar([file("p", "pp")]), "none",
                          media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    img = fake_registry.add_image("app", "v1", [zstd_as_gzip, plain_as_gzip])
    a, b = pull(img.reference, fast)
    assert (a.compression, a.media_type.endswith("gzip")) == ("zstd", True)
    assert (b.compression, b.media_type.endswith("gzip")) == ("none", True)


# -- TLS ---------------------------------------------------------------------------------------
def test_tls_private_ca_and_clear_tls_error(fake_server_factory: Any, fast: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from worker.pull.transport import make_session, request_with_retries

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = fake_server_factory("127.0.0.1", tls=(str(cert), str(key)))
    url = f"https://{server.netloc}/v2/"
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        request_with_retries(make_session(fast), "GET", url, settings=fast, what="ping")
    assert "TLS" in str(info.value) and "SSL_CERT_FILE" in str(info.value)
    assert not info.value.transient
    assert time.monotonic() - start < 5          # not retried with backoff
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    resp = request_with_retries(make_session(fast), "GET", url, settings=fast, what="ping")
    assert resp.status_code == 200


def test_identity_token_refresh_grant(fake_registry: FakeServer, fast: Any) -> None:
    fake_registry.bearer = True
    fake_registry.identity_token = "refresh-" + PASSWORD
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 100)])
    creds = Credentials("", identity_token="refresh-" + PASSWORD)
    (index,) = pull(img.reference, fast, credentials=creds)
    assert index.digest == img.layer_digests[0]
    posts = [t for t in fake_registry.token_requests if t.get("method") == "POST"]
    assert posts and posts[0]["scope"] == "repository:app:pull"
    assert posts[0]["service"] == "fake-registry"
    with pytest.raises(AuthenticationError) as info:
        resolve(img.reference, None, fast, credentials=Credentials("", identity_token="stale"))
    assert "stale" not in str(info.value)


def test_two_processes_download_a_blob_once(fake_registry: FakeServer, fast: Any) -> None:
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[2]
    layer = gz_layer(4, 300_000, 21)
    img = fake_registry.add_image("app", "v1", [layer])
    fake_registry.slow_blobs[img.layer_digests[0]] = 0.003   # ~1 s: the two overlap
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        from worker.settings import load_settings
        from worker.export import resolve, fetch_layer
        s = load_settings(cache_dir={str(fast.cache_dir)!r})
        r = resolve({img.reference!r}, None, s)
        print(fetch_layer(r, 0, s).diff_id)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [layer.diff_id, layer.diff_id]
    assert len(fake_registry.requests_to(f"/blobs/{img.layer_digests[0]}")) == 1


def test_dropped_config_download_is_retried(fake_registry: FakeServer, fast: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 100)])
    config_digest = json.loads(img.manifest_body)["config"]["digest"]
    fake_registry.drop_after[config_digest] = 10
    r = resolve(img.reference, None, fast)
    assert r.config_descriptor.digest == config_digest
    assert len(fake_registry.requests_to(f"/blobs/{config_digest}")) == 2
