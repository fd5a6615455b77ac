"""Platforms, manifest/index/config parsing and platform selection (pure functions)."""

from __future__ import annotations

import json
import platform as pyplatform

import pytest

from worker.errors import ConfigError, PlatformNotFound, UnsupportedManifest
from worker.pull import manifest as m
from worker.pull.manifest import Platform

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]


def P(text: str) -> Platform:
    return Platform.parse(text)


# -- platforms -----------------------------------------------------------------------------
def test_parse_platform() -> None:
    assert P("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert P("linux/amd64") == Platform("linux", "amd64", None)
    assert P("linux/x86_64") == Platform("linux", "amd64", None)
    assert str(P("linux/arm/v7")) == "linux/arm/v7"


@pytest.mark.parametrize("bad", ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64", ""])
def test_parse_platform_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid platform"):
        P(bad)


def test_arm64_matches_v8_or_no_variant() -> None:
    assert P("linux/arm64").matches(Platform("linux", "arm64", "v8"))
    assert P("linux/arm64").matches(Platform("linux", "arm64"))
    assert P("linux/arm64/v8").matches(Platform("linux", "arm64"))
    assert not P("linux/arm64/v9").matches(Platform("linux", "arm64"))
    assert not P("linux/arm64").matches(Platform("linux", "amd64"))


def test_amd64_ignores_variant_arm_does_not() -> None:
    assert P("linux/amd64").matches(Platform("linux", "amd64", "v3"))
    assert P("linux/amd64/v2").matches(Platform("linux", "amd64"))
    assert P("linux/arm/v7").matches(Platform("linux", "arm", "v7"))
    assert not P("linux/arm/v7").matches(Platform("linux", "arm", "v6"))
    assert not P("linux/amd64").matches(Platform("windows", "amd64"))
    assert not P("linux/amd64").matches(Platform("unknown", "unknown"))


def test_host_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    for machine, expected in [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64/v8"),
                              ("armv7l", "linux/arm/v7"), ("s390x", "linux/s390x")]:
        monkeypatch.setattr(pyplatform, "machine", lambda machine=machine: machine)
        assert str(Platform.host()) == expected


# -- documents -----------------------------------------------------------------------------
def desc(digest: str, media_type: str = m.OCI_MANIFEST, platform: dict | None = None,
         **extra: object) -> dict:
    d = {"mediaType": media_type, "digest": digest, "size": 100, **extra}
    if platform is not None:
        d["platform"] = platform
    return d


def index_doc(media_type: str = m.OCI_INDEX) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": media_type,
        "manifests": [
            desc(D[1], platform={"os": "linux", "architecture": "amd64"}),
            desc(D[2], platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
            desc(D[3], platform={"os": "linux", "architecture": "arm", "variant": "v6"}),
            desc(D[4], platform={"os": "linux", "architecture": "arm", "variant": "v7"}),
            desc(D[5], platform={"os": "unknown", "architecture": "unknown"},
                 annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        ]}).encode()


def manifest_doc(media_type: str = m.DOCKER_MANIFEST, layer_type: str = m.DOCKER_LAYER_GZIP,
                 with_media_type: bool = True) -> bytes:
    doc: dict = {"schemaVersion": 2,
                 "config": desc(D[9], m.DOCKER_CONFIG),
                 "layers": [desc(D[10], layer_type), desc(D[11], layer_type,
                                                          urls=["https://x/y"])]}
    if with_media_type:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


@pytest.mark.parametrize("media_type", [m.OCI_INDEX, m.DOCKER_MANIFEST_LIST])
def test_parse_index_and_select(media_type: str) -> None:
    idx = m.parse_manifest(index_doc(media_type), image="img")
    assert isinstance(idx, m.ImageIndex) and idx.media_type == media_type
    assert len(idx.manifests) == 5
    assert m.select_platform(idx, P("linux/amd64"), image="img").digest == D[1]
    assert m.select_platform(idx, P("linux/arm64"), image="img").digest == D[2]
    assert m.select_platform(idx, P("linux/arm64/v8"), image="img").digest == D[2]
    assert m.select_platform(idx, P("linux/arm/v6"), image="img").digest == D[3]
    # no variant asked for arm: Docker's default, v7
    assert m.select_platform(idx, P("linux/arm"), image="img").digest == D[4]


def test_platform_not_found_lists_offers_without_attestations() -> None:
    idx = m.parse_manifest(index_doc(), image="img")
    assert isinstance(idx, m.ImageIndex)
    with pytest.raises(PlatformNotFound) as info:
        m.select_platform(idx, P("linux/s390x"), image="reg/img:1")
    msg = str(info.value)
    assert "reg/img:1" in msg and "linux/s390x" in msg
    assert "linux/amd64" in msg and "linux/arm64/v8" in msg and "linux/arm/v7" in msg
    assert "unknown" not in msg
    assert info.value.available == ["linux/amd64", "linux/arm/v6", "linux/arm/v7",
                                    "linux/arm64/v8"]


def test_attestation_never_selected() -> None:
    idx = m.parse_manifest(index_doc(), image="img")
    assert isinstance(idx, m.ImageIndex)
    with pytest.raises(PlatformNotFound):
        m.select_platform(idx, Platform("unknown", "unknown"), image="img")


@pytest.mark.parametrize("media_type, layer_type", [
    (m.DOCKER_MANIFEST, m.DOCKER_LAYER_GZIP), (m.OCI_MANIFEST, m.OCI_LAYER_ZSTD),
    (m.OCI_MANIFEST, m.OCI_LAYER_TAR), (m.OCI_MANIFEST, m.OCI_LAYER_ND_GZIP)])
def test_parse_image_manifest(media_type: str, layer_type: str) -> None:
    man = m.parse_manifest(manifest_doc(media_type, layer_type))
    assert isinstance(man, m.ImageManifest)
    assert man.media_type == media_type
    assert man.config.digest == D[9]
    assert [layer.digest for layer in man.layers] == [D[10], D[11]]
    assert man.layers[1].urls == ("https://x/y",)


def test_media_type_from_content_type_or_shape() -> None:
    body = manifest_doc(with_media_type=False)
    assert m.parse_manifest(body, m.DOCKER_MANIFEST).media_type == m.DOCKER_MANIFEST
    assert m.parse_manifest(body, "application/json").media_type == m.OCI_MANIFEST


def test_schema1_refused_clearly() -> None:
    body = json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode()
    with pytest.raises(UnsupportedManifest) as info:
        m.parse_manifest(body, m.DOCKER_SCHEMA1_SIGNED, image="reg/old:1")
    assert "schema1" in str(info.value) and "reg/old:1" in str(info.value)


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/x-foo"}).encode(),
     "unsupported media type"),
    (json.dumps({"schemaVersion": 2, "mediaType": m.OCI_MANIFEST, "config": desc(D[1]),
                 "layers": [desc("sha256:../../etc")]}).encode(), "invalid or unsupported digest"),
    (json.dumps({"schemaVersion": 2, "mediaType": m.OCI_MANIFEST, "config": desc(D[1]),
                 "layers": [desc(D[2], "application/vnd.in-toto+json")]}).encode(),
     "unsupported media type"),
])
def test_malformed_manifests(body: bytes, fragment: str) -> None:
    with pytest.raises(UnsupportedManifest, match=fragment):
        m.parse_manifest(body, image="img")


def test_parse_config() -> None:
    cfg = m.parse_config(json.dumps({
        "architecture": "arm64", "os": "linux", "variant": "v8",
        "config": {"Entrypoint": ["/bin/app"], "Cmd": None, "Env": ["A=1"],
                   "WorkingDir": "/srv", "User": "1000:1000",
                   "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}, "Labels": {"a": "b"}},
        "rootfs": {"type": "layers", "diff_ids": [D[1], D[2]]}}).encode())
    assert cfg.runtime_dict() == {"Entrypoint": ["/bin/app"], "Cmd": None, "Env": ["A=1"],
                                  "WorkingDir": "/srv", "User": "1000:1000",
                                  "ExposedPorts": ["53/udp", "8080/tcp"],
                                  "Labels": {"a": "b"}}
    assert cfg.diff_ids == (D[1], D[2])
    assert cfg.platform == Platform("linux", "arm64", "v8")
    with pytest.raises(UnsupportedManifest, match="diff_ids"):
        m.parse_config(b'{"config": {}}')


def test_resolved_image_json_round_trip() -> None:
    cfg = m.ImageConfig(entrypoint=("/a",), cmd=None, env=("X=1",), working_dir="/w",
                        user="u", exposed_ports=("80/tcp",), labels={"k": "v"},
                        diff_ids=(D[5], D[6]), os="linux", architecture="arm", variant="v7")
    r = m.ResolvedImage(
        reference="localhost:5000/a:b", manifest_digest=D[1], index_digest=D[2],
        media_type=m.OCI_MANIFEST, platform=P("linux/arm/v7"),
        config_descriptor=m.Descriptor(m.OCI_CONFIG, D[3], 10),
        config=cfg,
        layers=(m.Descriptor(m.OCI_LAYER_GZIP, D[7], 1, urls=("https://u",),
                             annotations=(("a", "b"),)),
                m.Descriptor(m.OCI_LAYER_ZSTD, D[8], 2)))
    text = json.dumps(r.to_dict())
    back = m.ResolvedImage.from_dict(json.loads(text))
    assert back == r
    d = r.to_dict()
    assert d["layers"][0]["diff_id"] == D[5] and d["platform"] == "linux/arm/v7"
    assert d["config"]["Entrypoint"] == ["/a"]
