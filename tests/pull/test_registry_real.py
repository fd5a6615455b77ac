"""inspect / pull against the REAL docker-registry (with and without auth), via the CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.imagebuilder import (
    Layer,
    TarEntry,
    corrupt_blob,
    directory,
    file,
    opaque,
    push_image,
    push_index,
    sha256_digest,
    symlink,
    whiteout,
)
from worker.cache.blobs import BlobCache
from worker.cache.index import EntryKind
from worker.cli import main
from worker.errors import AuthenticationError, DigestMismatch, PlatformNotFound
from worker.export import fetch_layer, resolve
from worker.pull.credentials import Credentials
from worker.pull.fetch import fetch_layers

ROOT = Path(__file__).resolve().parents[2]


def layers_three() -> list[Layer]:
    return [
        Layer.from_entries([directory("etc"), file("etc/hostname", "box\n"),
                            symlink("bin", "usr/bin"), directory("var/cache")], "gzip"),
        Layer.from_entries([file("usr/bin/app", b"\x7fELF" + b"z" * 5000, mode=0o755),
                            whiteout("etc/hostname")], "zstd"),
        Layer.from_entries([opaque("var/cache"), file("var/cache/new", "n"),
                            TarEntry("dev/console", "char", devmajor=5, devminor=1)], "none"),
    ]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str],
            stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None
            ) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("schema", ["docker", "oci"])
def test_inspect_cli(registry: Any, capsys: pytest.CaptureFixture[str], schema: str) -> None:
    img = push_image(registry, f"inspect/{schema}", "v1", layers_three(), schema=schema,
                     config={"Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve"],
                             "Env": ["A=1"], "WorkingDir": "/srv", "User": "1000",
                             "ExposedPorts": {"8080/tcp": {}}, "Labels": {"team": "x"}})
    code, out, err = run_cli(["inspect", img.reference], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["reference"] == img.reference
    assert doc["manifest_digest"] == img.manifest_digest
    assert doc["media_type"] == img.media_type
    assert doc["index_digest"] is None
    assert [layer["digest"] for layer in doc["layers"]] == img.layer_digests
    assert [layer["diff_id"] for layer in doc["layers"]] == img.diff_ids
    assert [layer["size"] for layer in doc["layers"]] == [layer.size for layer in img.layers]
    assert doc["config"] == {"Entrypoint": ["/usr/bin/app"], "Cmd": ["--serve"],
                             "Env": ["A=1"],
                             "WorkingDir": "/srv", "User": "1000",
                             "ExposedPorts": ["8080/tcp"], "Labels": {"team": "x"}}


@pytest.mark.parametrize("schema", ["docker", "oci"])
def test_pull_cli_fills_cache_with_indexes(registry: Any, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           schema: str) -> None:
    img = push_image(registry, f"pull/{schema}", "v1", layers_three(), schema=schema)
    cache_dir = tmp_path / "c"
    code, out, err = run_cli(["pull", img.reference, "--cache-dir", str(cache_dir)], capsys)
    assert code == 0, err
    assert "3 layers" in out
    assert "cached" in err          # plain progress lines (not a TTY)
    cache = BlobCache(cache_dir)
    for layer, digest, diff_id in zip(img.layers, img.layer_digests, img.diff_ids, strict=True):
        assert cache.path(digest).read_bytes() == layer.blob
        index = cache.index(digest)
        assert index is not None and index.diff_id == diff_id
        assert index.compression == layer.compression
    idx = [cache.index(d) for d in img.layer_digests]
    kinds = {(e.path, e.kind) for i in idx if i for e in i.entries}
    assert ("etc/hostname", EntryKind.WHITEOUT) in kinds
    assert ("var/cache", EntryKind.OPAQUE) in kinds
    assert ("dev/console", EntryKind.CHAR) in kinds
    # cache ls / gc
    code, out, _ = run_cli(["cache", "ls", "--cache-dir", str(cache_dir), "--json"], capsys)
    listed = json.loads(out)
    assert code == 0 and {e["digest"] for e in listed} == set(img.layer_digests)
    code, out, _ = run_cli(["cache", "gc", "--cache-dir", str(cache_dir), "--max-size", "0"],
                           capsys)
    assert code == 0 and "3 blobs evicted" in out
    assert cache.entries() == []


def test_pull_json_reports_per_layer_bytes_and_timings(registry: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    img = push_image(registry, "pull/json", "v1", layers_three())
    args = ["pull", img.reference, "--cache-dir", str(tmp_path / "c"), "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["manifest_digest"] == img.manifest_digest
    layers = doc["layers"]
    assert [x["digest"] for x in layers] == img.layer_digests
    assert [x["diff_id"] for x in layers] == img.diff_ids
    assert [x["compressed_bytes"] for x in layers] == [layer.size for layer in img.layers]
    assert [x["uncompressed_bytes"] for x in layers] == [len(layer.tar) for layer in img.layers]
    assert doc["uncompressed_bytes"] == sum(len(layer.tar) for layer in img.layers)
    for x in layers:
        assert x["cached"] is False
        # the index is done only once its bytes are all downloaded
        assert 0 <= x["download_seconds"] <= x["index_seconds"] <= doc["seconds"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    again = json.loads(out)["layers"]
    assert [(x["cached"], x["download_seconds"], x["index_seconds"]) for x in again] == \
        [(True, None, None)] * 3
    assert [x["entries"] for x in again] == [x["entries"] for x in layers]


def test_multi_platform_index_with_attestations(registry: Any, settings: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    amd = push_image(registry, "multi/app", None,
                     [Layer.from_entries([file("arch", "amd64")], "gzip")],
                     platform="linux/amd64")
    arm = push_image(registry, "multi/app", None,
                     [Layer.from_entries([file("arch", "arm64")], "zstd")],
                     platform="linux/arm64/v8")
    index = push_index(registry, "multi/app", "v1", [amd, arm], attestation=True)
    r = resolve(index.reference, "linux/arm64", settings)
    assert r.manifest_digest == arm.manifest_digest and r.index_digest == index.digest
    assert str(r.platform) == "linux/arm64/v8"
    r2 = resolve(index.reference, "linux/amd64", settings)
    assert r2.manifest_digest == amd.manifest_digest
    (li,) = fetch_layers(r, settings)
    assert li.diff_id == arm.diff_ids[0]
    with pytest.raises(PlatformNotFound) as info:
        resolve(index.reference, "linux/s390x", settings)
    assert info.value.available == ["linux/amd64", "linux/arm64/v8"]
    code, _, err = run_cli(["inspect", index.reference, "--platform", "windows/amd64"], capsys)
    assert code != 0 and "linux/arm64/v8" in err and "unknown" not in err
    # pinned by the index digest
    r3 = resolve(index.digest_reference, "linux/arm64/v8", settings)
    assert r3.manifest_digest == arm.manifest_digest


def test_single_platform_mismatch_names_the_image_platform(registry: Any,
                                                           settings: Any) -> None:
    img = push_image(registry, "single/app", "v1",
                     [Layer.from_entries([file("arch", "arm64")], "gzip")],
                     platform="linux/arm64")
    with pytest.raises(PlatformNotFound) as info:
        resolve(img.reference, "linux/amd64", settings)
    message = str(info.value)
    assert "the image is for linux/arm64, not linux/amd64" in message
    assert img.reference in message and "index" not in message


def test_docker_manifest_list(registry: Any, settings: Any) -> None:
    imgs = [push_image(registry, "list/app", None,
                       [Layer.from_entries([file("p", plat)], "gzip")], schema="docker",
                       platform=plat) for plat in ("linux/amd64", "linux/arm/v7")]
    index = push_index(registry, "list/app", "v1", imgs, schema="docker")
    r = resolve(index.reference, "linux/arm/v7", settings)
    assert r.manifest_digest == imgs[1].manifest_digest
    assert r.media_type == "application/vnd.docker.distribution.manifest.v2+json"


def test_corrupt_blob_in_real_registry(registry: Any, settings: Any) -> None:
    layer = Layer.from_entries([file("a", os.urandom(20000))], "gzip")
    img = push_image(registry, "corrupt/app", "v1", [layer])
    corrupt_blob(registry, img.layer_digests[0], os.urandom(layer.size))
    r = resolve(img.reference, None, settings)
    with pytest.raises(DigestMismatch) as info:
        fetch_layers(r, settings)
    assert img.layer_digests[0] in str(info.value)
    cache = BlobCache(settings.cache_dir)
    assert cache.entries() == [] and list(cache.tmp_dir.iterdir()) == []


def test_lying_diff_ids_in_real_registry(registry: Any, settings: Any) -> None:
    layer = Layer.from_entries([file("a", "x")], "gzip")
    img = push_image(registry, "liar/app", "v1", [layer], diff_ids=[sha256_digest(b"no")])
    r = resolve(img.reference, None, settings)
    with pytest.raises(DigestMismatch, match="diff_id"):
        fetch_layer(r, 0, settings)
    assert BlobCache(settings.cache_dir).entries() == []


# -- auth ------------------------------------------------------------------------------------
def test_auth_registry_without_credentials(auth_registry: Any, settings: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    img = push_image(auth_registry, "private/app", "v1", layers_three())
    with pytest.raises(AuthenticationError, match="requires authentication"):
        resolve(img.reference, None, settings)
    code, _, err = run_cli(["inspect", img.reference], capsys)
    assert code == 1 and "requires authentication" in err


def test_auth_registry_with_password_stdin(auth_registry: Any, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    img = push_image(auth_registry, "private/app", "v2", layers_three(), schema="docker")
    cache_dir = tmp_path / "c"
    code, out, err = run_cli(["pull", img.reference, "--cache-dir", str(cache_dir),
                              "--username", auth_registry.username, "--password-stdin"],
                             capsys, stdin=auth_registry.password + "\n",
                             monkeypatch=monkeypatch)
    assert code == 0, err
    assert auth_registry.password not in out + err
    assert {e.digest for e in BlobCache(cache_dir).entries()} == set(img.layer_digests)
    code, _, err = run_cli(["inspect", img.reference, "--username", auth_registry.username,
                            "--password-stdin"], capsys, stdin="wrong-password\n",
                           monkeypatch=monkeypatch)
    assert code == 1 and "rejected" in err and "wrong-password" not in err


def test_auth_registry_with_docker_config(auth_registry: Any, settings: Any,
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    img = push_image(auth_registry, "private/app", "v3", layers_three(), schema="oci")
    cfg = tmp_path / "docker"
    cfg.mkdir()
    auth = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode())
    (cfg / "config.json").write_text(json.dumps(
        {"auths": {auth_registry.host: {"auth": auth.decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    r = resolve(img.reference, None, settings)
    assert [i.diff_id for i in fetch_layers(r, settings)] == img.diff_ids
    # explicit credentials win over the config
    with pytest.raises(AuthenticationError):
        resolve(img.reference, None, settings,
                credentials=Credentials(auth_registry.username, "bad"))


def test_console_script_end_to_end(registry: Any, tmp_path: Path) -> None:
    img = push_image(registry, "script/app", "v1", layers_three())
    exe = Path(sys.executable).parent / "rootfs-export"
    env = dict(os.environ, ROOTFS_EXPORT_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([str(exe), "pull", img.reference], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(BlobCache(tmp_path / "cache").entries()) == 3
    bad = subprocess.run([str(exe), "inspect", "Not/Valid"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and "must be lowercase" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_real_debian_image_pulls(debian_image: Any, settings: Any) -> None:
    r = resolve(debian_image.reference, None, settings)
    indexes = fetch_layers(r, settings)
    assert len(indexes) == len(r.layers) == 3
    paths = {e.path for e in indexes[0].entries}
    assert "etc/debian_version" in paths and "usr/bin/dpkg" in paths
    assert all(i.diff_id == d for i, d in zip(indexes, r.config.diff_ids, strict=True))


def test_pull_shows_a_progress_bar_on_a_tty(registry: Any, tmp_path: Path) -> None:
    import pty
    import select

    img = push_image(registry, "tty/app", "v1", layers_three())
    exe = Path(sys.executable).parent / "rootfs-export"
    env = dict(os.environ, ROOTFS_EXPORT_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="120",
               TERM="xterm")
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(exe), "pull", img.reference], stdout=subprocess.PIPE,
                            stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    output = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = output.decode("utf-8", "replace")
    assert "3/3 layers" in text                 # the rich overall bar
    assert "\x1b[" in text                      # drawn with terminal control sequences
    assert len(BlobCache(tmp_path / "cache").entries()) == 3
