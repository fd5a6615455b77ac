"""Nothing hangs: slow blobs, trickled documents, silent servers, unreachable registries.

The thresholds are set low in the test settings so each case takes about a second.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from tests.pull.conftest import FakeServer
from tests.pull.test_misbehaving_registry import assert_cache_clean, gz_layer, pull
from worker.errors import RegistryError
from worker.export import resolve


@pytest.fixture
def quick(settings_factory: Any) -> Any:
    return settings_factory(retry_backoff=0.01, retries=5, read_timeout=1.0,
                            request_deadline=2.0, min_transfer_rate=20_000, stall_seconds=1.0,
                            timeout_retries=1)


def elapsed(start: float) -> float:
    return time.monotonic() - start


def test_blob_below_the_minimum_rate_is_aborted_naming_the_layer(fake_registry: FakeServer,
                                                                 quick: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(2, 300_000, 3)])
    digest = img.layer_digests[0]
    fake_registry.slow_chunk = 100
    fake_registry.slow_blobs[digest] = 0.02     # < 5 KB/s, below the 20 KB/s minimum
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        pull(img.reference, quick)
    assert elapsed(start) < 25
    message = str(info.value)
    assert digest in message and "transfer too slow" in message
    assert "ROOTFS_EXPORT_MIN_TRANSFER_RATE=20000" in message
    assert info.value.transient
    # one resume (timeout_retries=1), then the error
    blob_gets = fake_registry.requests_to(f"/blobs/{digest}")
    assert len(blob_gets) == 2 and "Range" in blob_gets[1].headers
    assert_cache_clean(quick.cache_dir)


def test_blob_above_the_minimum_rate_completes(fake_registry: FakeServer,
                                               settings_factory: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 200_000, 4)])
    fake_registry.slow_chunk = 16_384
    fake_registry.slow_blobs[img.layer_digests[0]] = 0.05   # ~320 KB/s for about a second
    settings = settings_factory(min_transfer_rate=20_000, stall_seconds=0.5)
    [index] = pull(img.reference, settings)
    assert index.digest == img.layer_digests[0]


def test_blob_server_going_silent_is_a_stall(fake_registry: FakeServer, quick: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    fake_registry.hang.append(f"/blobs/{img.layer_digests[0]}")
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        pull(img.reference, quick)
    assert elapsed(start) < 25
    assert img.layer_digests[0] in str(info.value)
    assert "within 1 s (2 attempts)" in str(info.value)
    assert len(fake_registry.requests_to(f"/blobs/{img.layer_digests[0]}")) == 2


def test_server_that_never_answers_fails_after_one_retry(fake_registry: FakeServer,
                                                          quick: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    fake_registry.hang.append("/manifests/")
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, quick)
    assert elapsed(start) < 25
    assert "could not get an answer from" in str(info.value)
    assert img.reference in str(info.value)
    assert info.value.transient
    assert len(fake_registry.requests_to("/manifests/")) == 2


def test_trickled_manifest_hits_the_deadline(fake_registry: FakeServer, quick: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    fake_registry.trickle["/manifests/"] = 0.05   # ~20 s for the whole manifest
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, quick)
    assert elapsed(start) < 25
    assert "within 2 s (ROOTFS_EXPORT_REQUEST_DEADLINE)" in str(info.value)
    assert img.reference in str(info.value)


def test_trickled_config_hits_the_deadline(fake_registry: FakeServer, quick: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    config_digest = next(d for d in fake_registry.blobs if d not in img.layer_digests)
    fake_registry.slow_chunk = 1
    fake_registry.slow_blobs[config_digest] = 0.05
    start = time.monotonic()
    with pytest.raises(RegistryError, match="ROOTFS_EXPORT_REQUEST_DEADLINE"):
        resolve(img.reference, None, quick)
    assert elapsed(start) < 25


@pytest.mark.parametrize("behaviour", ["trickle", "hang"])
def test_token_endpoint_cannot_hold_a_pull(fake_registry: FakeServer, quick: Any,
                                           behaviour: str) -> None:
    fake_registry.bearer = True
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    if behaviour == "trickle":
        fake_registry.trickle["/token"] = 0.1
    else:
        fake_registry.hang.append("/token")
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, quick)
    assert elapsed(start) < 25
    assert "token service" in str(info.value)
    assert str(info.value).startswith(img.reference + ": ")


def test_blob_shorter_than_announced_fails_at_once(fake_registry: FakeServer,
                                                   quick: Any) -> None:
    layer = gz_layer(1, 1000)
    img = fake_registry.add_image("app", "v1", [layer])
    digest = img.layer_digests[0]
    fake_registry.lying_blobs[digest] = layer.blob[:-40]
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        pull(img.reference, quick)
    assert elapsed(start) < 25
    assert (f"blob is {layer.size - 40} bytes, shorter than the {layer.size} bytes the "
            "manifest announces") in str(info.value)
    assert digest in str(info.value) and not info.value.transient
    assert len(fake_registry.requests_to(f"/blobs/{digest}")) == 1
    assert_cache_clean(quick.cache_dir)


def test_oversized_header_is_named(fake_registry: FakeServer, quick: Any) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 10)])
    huge = "Bearer " + "a=" * 100_000
    fake_registry.failures["/manifests/"] = [(401, {"WWW-Authenticate": huge})] * 10
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve(img.reference, None, quick)
    assert elapsed(start) < 25
    assert "sent an oversized or invalid header" in str(info.value)
    assert "ConnectionError" not in str(info.value)
    assert len(fake_registry.requests_to("/manifests/")) == 1


# -- unreachable registries ----------------------------------------------------------------
def test_unresolvable_registry_fails_fast_naming_host_and_image(settings: Any) -> None:
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve("nonexistent.invalid/team/app:v1", None, settings)
    assert elapsed(start) < 25
    message = str(info.value)
    assert "cannot resolve nonexistent.invalid" in message
    assert "nonexistent.invalid/team/app:v1" in message
    assert "ConnectionError" not in message


def test_refused_connection_says_so_and_gives_up_soon(settings: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        resolve(f"127.0.0.1:{port}/app:v1", None, settings)
    assert elapsed(start) < 25
    message = str(info.value)
    assert f"connection to 127.0.0.1:{port} refused" in message
    assert f"127.0.0.1:{port}/app:v1" in message
    assert "3 attempts" in message


def test_cancel_interrupts_a_read_blocked_on_a_silent_server(fake_registry: FakeServer,
                                                             settings_factory: Any) -> None:
    from worker.errors import Canceled
    from worker.pull.fetch import fetch_layers
    img = fake_registry.add_image("app", "v1", [gz_layer(2, 300_000, 6)])
    fake_registry.slow_chunk = 4096
    fake_registry.slow_blobs[img.layer_digests[0]] = 30   # one piece, then 30 s of silence
    settings = settings_factory(read_timeout=60, min_transfer_rate=0)
    r = resolve(img.reference, None, settings)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(Canceled):
        fetch_layers(r, settings, cancel=cancel)
    assert elapsed(start) < 25    # bounded: not the default 30 s stall window, nor forever
    assert_cache_clean(settings.cache_dir)
