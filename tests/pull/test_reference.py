"""Reference parsing with Docker's normalisation rules."""

from __future__ import annotations

import pytest

from worker.errors import InvalidReference
from worker.pull.reference import parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("index.docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/team/app:v1", "localhost:5000", "team/app", "v1", None),
    ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
    ("[::1]:5000/app:t", "[::1]:5000", "app", "t", None),
    ("ghcr.io/org/sub/app:1.0-rc_1", "ghcr.io", "org/sub/app", "1.0-rc_1", None),
    (f"alpine@{D}", "docker.io", "library/alpine", None, D),
    (f"quay.io/a/b:tag@{D}", "quay.io", "a/b", "tag", D),
    ("a__b/c-d.e:x", "docker.io", "a__b/c-d.e", "x", None),
])
def test_normalisation(text: str, registry: str, repo: str, tag: str | None,
                       digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)


def test_digest_wins_over_tag_as_target() -> None:
    ref = parse_reference(f"quay.io/a/b:tag@{D}")
    assert ref.target == D
    assert str(ref) == f"quay.io/a/b:tag@{D}"
    assert parse_reference("alpine").target == "latest"


def test_api_host_for_docker_hub() -> None:
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert parse_reference("localhost:5000/x").api_host == "localhost:5000"


def test_str_round_trips() -> None:
    for text in ("alpine", "localhost:5000/team/app:v1", f"alpine@{D}"):
        ref = parse_reference(text)
        assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("Alpine", "must be lowercase"),
    ("docker.io/Library/alpine", "must be lowercase"),
    ("alpine:", "invalid tag"),
    ("alpine:-bad", "invalid tag"),
    ("alpine:" + "x" * 129, "invalid tag"),
    ("alpine@sha256:1234", "invalid digest"),
    ("alpine@sha512:" + "a" * 128, "only sha256"),
    ("a//b", "empty path component"),
    ("host:port/app", "invalid registry host"),
    ("https://ghcr.io/a/b", "drop the 'https://' part"),
    ("http://localhost:5000/a", "drop the 'http://' part"),
    ("alpine:t\u00e4", "non-ASCII character '\u00e4'"),
    ("caf\u00e9/app", "non-ASCII"),
    ("localhost:5000/\u0430pp:v1", "non-ASCII"),
    ("with space", "whitespace"),
    ("a/b-/c", "invalid repository name component"),
    ("localhost:5000/", "missing repository"),
    ("a" * 300, "longer than"),
])
def test_invalid_references_say_why(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert fragment in str(info.value)
    assert repr(text)[:20].strip("'") in str(info.value) or text == ""


@pytest.mark.parametrize("tag", ["t\u00e4", "\u00e4", "v\u0661", "x\u00b2"])
def test_tag_grammar_is_ascii(tag: str) -> None:
    # \w would accept these letters and digits of other scripts; a registry would not.
    from worker.pull.reference import _TAG
    assert not _TAG.fullmatch(tag)
    assert _TAG.fullmatch("v1.0-rc_1")
