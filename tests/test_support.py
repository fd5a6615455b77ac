"""Tests of the shared test infrastructure itself: if these fail, nothing else is trustworthy."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
import zstandard

from tests.support.imagebuilder import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Layer,
    TarEntry,
    compress,
    concat_tars,
    corrupt_blob,
    delete_blob,
    fetch_blob,
    fetch_manifest,
    make_tar,
    opaque,
    push_image,
    push_index,
    sha256_digest,
    sparse_tar,
    whiteout,
)


def _members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8",
                      errors="surrogateescape") as tf:
        return tf.getmembers()


# -- processes -------------------------------------------------------------------------------------
def test_registry_answers_v2(registry):
    resp = requests.get(f"{registry.url}/v2/", timeout=5)
    assert resp.status_code == 200
    assert registry.host.startswith("127.0.0.1:") and registry.url == f"http://{registry.host}"
    assert registry.username is None and registry.password is None


def test_auth_registry_requires_credentials(auth_registry):
    anon = requests.get(f"{auth_registry.url}/v2/", timeout=5)
    assert anon.status_code == 401
    assert anon.headers["WWW-Authenticate"].startswith("Basic ")
    wrong = requests.get(f"{auth_registry.url}/v2/", auth=("tester", "wrong"), timeout=5)
    assert wrong.status_code == 401
    good = requests.get(f"{auth_registry.url}/v2/",
                        auth=(auth_registry.username, auth_registry.password), timeout=5)
    assert good.status_code == 200
    assert auth_registry.username == "tester"


def test_registry_factory_gives_a_fresh_registry(registry_factory, registry, unique_repo):
    fresh = registry_factory(auth=True, username="alice", password="s3cret")
    assert fresh.port != registry.port
    assert requests.get(f"{fresh.url}/v2/", auth=("alice", "s3cret"), timeout=5).status_code == 200
    push_image(fresh, unique_repo, "v1", [Layer.from_entries([TarEntry("f")])])
    catalog = requests.get(f"{fresh.url}/v2/_catalog", auth=("alice", "s3cret"), timeout=5)
    assert catalog.json()["repositories"] == [unique_repo]
    assert unique_repo.startswith("t/test-registry-factory")


def test_redis_answers_ping(redis_server):
    assert redis_server.url.startswith("redis://127.0.0.1:")
    assert not redis_server.url.endswith(":6379")
    assert redis_server.ping()


def test_settings_fixture_uses_tmp_dirs(settings, tmp_path):
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.output_dir == tmp_path / "out"


def test_missing_tool_fails_instead_of_skipping(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no docker-registry, redis-server, htpasswd
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_support.py::test_settings_fixture_uses_tmp_dirs"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout and "passed" not in proc.stdout
    assert "required tools missing" in proc.stdout and "docker-registry" in proc.stdout


# -- tar building -------------------------------------------------------------------------------------
def test_make_tar_writes_every_kind_exactly():
    entries = [
        TarEntry("etc", "dir", mode=0o700, uid=5, gid=6),
        TarEntry("etc/passwd", data=b"root:x:0:0\n", mode=0o4755, mtime=1234567890),
        TarEntry("etc/link", "symlink", linkname="/etc/passwd"),
        TarEntry("etc/hard", "hardlink", linkname="etc/passwd"),
        TarEntry("dev/null", "char", devmajor=1, devminor=3),
        TarEntry("dev/sda", "block", devmajor=8, devminor=0),
        TarEntry("run/fifo", "fifo"),
        TarEntry("../escape", data=b"x"),
        TarEntry("/abs/path", data=b"y"),
        TarEntry("bin/ping", data=b"ELF", xattrs={"security.capability": b"\x01\x00\x00\x02\xff"}),
        TarEntry("ignored", name_bytes=b"caf\xe9"),
        whiteout("usr/share/doc"),
        opaque("var/lib/"),
    ]
    members = _members(make_tar(entries))
    names = [m.name for m in members]
    assert names == ["etc", "etc/passwd", "etc/link", "etc/hard", "dev/null", "dev/sda",
                     "run/fifo", "../escape", "/abs/path", "bin/ping", "caf\udce9",
                     "usr/share/.wh.doc", "var/lib/.wh..wh..opq"]
    by = dict(zip(names, members, strict=True))
    assert by["etc"].isdir() and by["etc"].mode == 0o700 and (by["etc"].uid, by["etc"].gid) == (5, 6)
    assert by["etc/passwd"].mode == 0o4755 and by["etc/passwd"].mtime == 1234567890
    assert by["etc/link"].issym() and by["etc/link"].linkname == "/etc/passwd"
    assert by["etc/link"].mode == 0o777
    assert by["etc/hard"].islnk() and by["etc/hard"].linkname == "etc/passwd"
    assert by["dev/null"].ischr() and (by["dev/null"].devmajor, by["dev/null"].devminor) == (1, 3)
    assert by["dev/sda"].isblk() and by["run/fifo"].isfifo()
    raw = by["bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert raw.encode("utf-8", "surrogateescape") == b"\x01\x00\x00\x02\xff"
    assert by["usr/share/.wh.doc"].size == 0


def test_make_tar_big_ids_and_formats():
    big = 1 << 22  # beyond the 7-digit octal field
    gnu = make_tar([TarEntry("f", uid=big, gid=big + 1)], format="gnu")
    # base-256 numbers set the high bit of the field's first byte
    assert gnu[108] & 0x80 and gnu[116] & 0x80
    assert (_members(gnu)[0].uid, _members(gnu)[0].gid) == (big, big + 1)
    pax = make_tar([TarEntry("f", uid=big)], format="pax")
    assert _members(pax)[0].uid == big
    with pytest.raises(ValueError):
        make_tar([TarEntry("f", uid=big)], format="ustar")
    long_name = "d/" * 80 + "file"
    assert _members(make_tar([TarEntry(long_name)], format="gnu"))[0].name == long_name


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_sparse_tar_is_real_gnu_sparse(fmt, tmp_path):
    size = 8 << 20
    tar = sparse_tar("var/sparse.bin", size, [(0, b"head"), (4 << 20, b"middle" * 100)],
                     format=fmt)
    assert len(tar) < 64 << 10
    combined = concat_tars(make_tar([TarEntry("var", "dir")]), tar)
    with tarfile.open(fileobj=io.BytesIO(combined)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["var", "var/sparse.bin"]
        sparse = members[1]
        assert sparse.issparse() and sparse.size == size
        content = tf.extractfile(sparse).read()
    assert content[:4] == b"head" and content[4 << 20:(4 << 20) + 600] == b"middle" * 100
    assert content.count(0) == size - 4 - 600


def test_compress_roundtrip():
    data = make_tar([TarEntry("a", data=b"hello" * 1000)])
    assert gzip.decompress(compress(data, "gzip")) == data
    assert zstandard.ZstdDecompressor().decompress(compress(data, "zstd")) == data
    assert compress(data, "none") == data
    assert compress(data, "gzip") == compress(data, "gzip")  # deterministic
    with pytest.raises(ValueError):
        compress(data, "bzip2")


# -- pushing -----------------------------------------------------------------------------------------
def test_oci_image_roundtrip_by_digest(registry):
    layers = [Layer.from_entries([TarEntry("etc", "dir"), TarEntry("etc/os", data=b"one")]),
              Layer.from_entries([TarEntry("etc/os", data=b"two")], compression="zstd"),
              Layer.from_entries([whiteout("etc/os")], compression="none")]
    img = push_image(registry, "infra/oci", "v1", layers,
                     config={"Entrypoint": ["/bin/sh"], "Env": ["A=1"], "User": "1000"})
    assert img.reference == f"{registry.host}/infra/oci:v1"
    assert [m["mediaType"] for m in img.manifest["layers"]] == [
        OCI_LAYER["gzip"], OCI_LAYER["zstd"], OCI_LAYER["none"]]
    resp = fetch_manifest(registry, "infra/oci", img.manifest_digest)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert resp.content == img.manifest_bytes
    assert sha256_digest(resp.content) == img.manifest_digest
    for layer, digest in zip(layers, img.layer_digests, strict=True):
        assert fetch_blob(registry, "infra/oci", digest) == layer.blob
    config = fetch_blob(registry, "infra/oci", img.config_digest)
    assert sha256_digest(config) == img.config_digest
    assert img.config["config"]["Entrypoint"] == ["/bin/sh"]
    assert img.config["config"]["Env"] == ["A=1"]
    assert img.config["rootfs"]["diff_ids"] == [sha256_digest(layer.tar) for layer in layers]


def test_docker_image_roundtrip_with_auth(auth_registry):
    layer = Layer.from_entries([TarEntry("hello", data=b"world")])
    img = push_image(auth_registry, "infra/docker", "latest", [layer], schema="docker",
                     platform="linux/arm64/v8")
    assert img.manifest["layers"][0]["mediaType"] == DOCKER_LAYER["gzip"]
    assert requests.get(f"{auth_registry.url}/v2/infra/docker/manifests/latest",
                        timeout=5).status_code == 401
    resp = fetch_manifest(auth_registry, "infra/docker", img.manifest_digest)
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST
    assert resp.content == img.manifest_bytes
    assert fetch_blob(auth_registry, "infra/docker", img.layer_digests[0]) == layer.blob
    assert (img.config["architecture"], img.config["variant"]) == ("arm64", "v8")


def test_lying_diff_ids_and_media_type_are_pushed_as_given(registry):
    layer = Layer(make_tar([TarEntry("x")]), compression="zstd", media_type=OCI_LAYER["gzip"])
    fake = "sha256:" + "0" * 64
    img = push_image(registry, "infra/lies", "v1", [layer], diff_ids=[fake])
    assert img.diff_ids == [fake]
    assert img.manifest["layers"][0]["mediaType"] == OCI_LAYER["gzip"]
    assert fetch_blob(registry, "infra/lies", img.layer_digests[0])[:4] == b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize("schema,media_type", [("oci", OCI_INDEX),
                                               ("docker", DOCKER_MANIFEST_LIST)])
def test_index_with_attestation_is_stored(registry, schema, media_type):
    repo = f"infra/multi-{schema}"
    amd = push_image(registry, repo, None, [Layer.from_entries([TarEntry("arch", data=b"amd64")])],
                     schema=schema, platform="linux/amd64")
    arm = push_image(registry, repo, None, [Layer.from_entries([TarEntry("arch", data=b"arm64")])],
                     schema=schema, platform="linux/arm64/v8")
    assert amd.reference == f"{registry.host}/{repo}@{amd.manifest_digest}"
    idx = push_index(registry, repo, "latest", [amd, arm], schema=schema, attestation=True)
    resp = fetch_manifest(registry, repo, "latest")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == media_type
    assert sha256_digest(resp.content) == idx.digest
    entries = resp.json()["manifests"]
    assert [e["platform"] for e in entries] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
        {"architecture": "unknown", "os": "unknown"},
        {"architecture": "unknown", "os": "unknown"},
    ]
    assert entries[2]["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
    assert entries[2]["annotations"]["vnd.docker.reference.digest"] == amd.manifest_digest
    # the attestation manifest itself is stored too
    assert fetch_manifest(registry, repo, entries[2]["digest"]).status_code == 200


def test_blob_delete_and_corruption_helpers(registry):
    layer = Layer.from_entries([TarEntry("f", data=b"payload")])
    img = push_image(registry, "infra/broken", "v1", [layer])
    corrupt_blob(registry, img.layer_digests[0], b"not the right bytes")
    assert fetch_blob(registry, "infra/broken", img.layer_digests[0]) == b"not the right bytes"
    delete_blob(registry, "infra/broken", img.config_digest)
    resp = requests.get(f"{registry.url}/v2/infra/broken/blobs/{img.config_digest}", timeout=5)
    assert resp.status_code == 404


# -- the real Debian image ------------------------------------------------------------------------------
@pytest.mark.slow
def test_debian_image_is_pushed_and_listing_is_real(debian_image, registry):
    assert debian_image.reference == f"{registry.host}/debian:bookworm"
    resp = fetch_manifest(registry, "debian", "bookworm")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == OCI_MANIFEST
    assert sha256_digest(resp.content) == debian_image.manifest_digest
    assert len(debian_image.manifest["layers"]) == 3
    for desc in debian_image.manifest["layers"]:
        head = requests.head(f"{registry.url}/v2/debian/blobs/{desc['digest']}", timeout=10)
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == desc["size"]
    config = fetch_blob(registry, "debian", debian_image.config_digest)
    assert sha256_digest(config) == debian_image.config_digest
    assert debian_image.config["rootfs"]["diff_ids"] == [x["diff_id"] for x in debian_image.layers]

    listing = debian_image.listing
    assert len(listing) > 1000
    assert debian_image.listing_path.is_file()
    python = debian_image.resolve("usr/bin/python3")
    assert python["type"] == "file" and python["mode"] & 0o111 and python["size"] > 1_000_000
    assert debian_image.resolve("bin/sh")["type"] == "file"  # bin -> usr/bin, sh -> dash
    assert listing["usr/bin/su"]["mode"] & 0o4000  # setuid survives into the ground truth
    assert listing["usr/share/doc"]["type"] == "dir"
    assert not [p for p in listing if p.startswith("usr/share/doc/")]
    assert not [p for p in listing if p.startswith("var/lib/apt/lists/") and
                listing[p]["type"] == "file" and p.endswith("_Packages")]
    assert [p for p in listing if p.startswith("etc/apt/apt.conf.d/")] == [
        "etc/apt/apt.conf.d/99rootfs-export-test"]
    assert listing["usr/share/lintian"]["type"] == "file"
    assert listing["usr/local/bin/cap-test"]["xattrs"]["security.capability"].startswith("01")
    assert any(e["hardlink"] for e in listing.values())


@pytest.mark.slow
def test_debian_layers_carry_whiteouts_and_opaque_dirs(debian_image):
    layer3 = debian_image.blob_path(debian_image.layers[2]["digest"])
    with tarfile.open(layer3, "r:gz") as tf:
        names = tf.getnames()
    assert any(n.startswith("usr/share/doc/.wh.") for n in names)
    assert any(n.startswith("usr/share/man/.wh.") for n in names)
    assert "etc/apt/apt.conf.d/.wh..wh..opq" in names
    assert "etc/apt/apt.conf.d/99rootfs-export-test" in names
    # no whiteout below a path that is itself whited out or replaced
    assert not [n for n in names if n.startswith("usr/share/doc/") and n.count("/") > 3]
    assert not [n for n in names if n.startswith("usr/share/lintian/")]


def _apply_layers_model(blobs: list) -> dict[str, dict]:
    """A minimal in-memory layer applier, only to cross-check the builder against its listing."""
    state: dict[str, dict] = {}

    def drop_under(prefix: str, include_self: bool) -> None:
        for p in [p for p in state if p.startswith(prefix + "/") or (include_self and p == prefix)]:
            del state[p]

    for blob in blobs:
        entries: dict[str, dict] = {}
        with tarfile.open(blob, "r:gz") as tf:
            for m in tf:
                name = m.name.rstrip("/")
                parent, _, base = name.rpartition("/")
                if base == ".wh..wh..opq":
                    drop_under(parent, include_self=False)
                    continue
                if base.startswith(".wh."):
                    drop_under(f"{parent}/{base[4:]}" if parent else base[4:], include_self=True)
                    continue
                if m.islnk():
                    rec = dict(entries.get(m.linkname) or state[m.linkname])
                else:
                    rec = {"type": {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir",
                                    tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char",
                                    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}[m.type]}
                    if m.isfile():
                        rec["sha256"] = sha256_digest(tf.extractfile(m).read()).split(":")[1]
                    if m.issym():
                        rec["target"] = m.linkname
                rec.update(mode=m.mode, uid=m.uid, gid=m.gid, mtime=int(m.mtime))
                entries[name] = rec
        for name, rec in entries.items():
            if rec["type"] != "dir" or state.get(name, rec)["type"] != "dir":
                drop_under(name, include_self=False)
            state[name] = rec
    return state


@pytest.mark.slow
def test_debian_layers_reproduce_the_listing(debian_image):
    state = _apply_layers_model([debian_image.blob_path(x["digest"]) for x in debian_image.layers])
    listing = debian_image.listing
    assert set(state) == set(listing)
    mismatches = [
        (path, key) for path, rec in state.items() for key, value in rec.items()
        if listing[path].get(key) != value
    ]
    assert mismatches == []
