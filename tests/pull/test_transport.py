"""Transport helpers, challenge parsing and CLI option helpers (pure functions)."""

from __future__ import annotations

import argparse
import io
import time
from email.utils import formatdate
from typing import Any

import pytest

from worker.commands.common import credentials_from_args, parse_size, settings_from_args
from worker.errors import ConfigError
from worker.pull.auth import parse_challenge, repository_of
from worker.pull.transport import (
    backoff_delay,
    is_loopback,
    make_session,
    parse_retry_after,
    redact_url,
    scheme_for,
)


def test_loopback_and_schemes(settings_factory: Any) -> None:
    for host in ("localhost", "localhost:5000", "127.0.0.1", "127.1.2.3:80", "[::1]:5000",
                 "::1"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "example.com", "[2001:db8::1]:5000", "localhost.example.com"):
        assert not is_loopback(host), host
    s = settings_factory(insecure_registries=["reg.internal:5000", "plain.example"])
    assert scheme_for("127.0.0.1:5000", s) == "http"
    assert scheme_for("reg.internal:5000", s) == "http"
    assert scheme_for("plain.example:443", s) == "http"
    assert scheme_for("ghcr.io", s) == "https"
    assert scheme_for("reg.internal:6000", s) == "https"


def test_retry_after_parsing_and_backoff(settings_factory: Any) -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = time.time() + 30
    assert 25 < (parse_retry_after(formatdate(when, usegmt=True)) or 0) <= 31
    s = settings_factory(retry_backoff=0.5, max_retry_after=10)
    assert backoff_delay(0, s, 5.0) == 5.0
    assert backoff_delay(0, s, 3600.0) == 10.0          # capped
    assert 0.25 <= backoff_delay(0, s) <= 1.0
    assert backoff_delay(10, s) == 10.0


def test_redact_url_drops_signatures_and_userinfo() -> None:
    assert redact_url("https://u:pw@s3.example/bucket/blob?X-Amz-Signature=abc") == \
        "https://s3.example/bucket/blob"
    assert redact_url("http://[::1]:5000/v2/x") == "http://[::1]:5000/v2/x"


def test_ca_bundle_from_ssl_cert_file(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/private-ca.pem")
    assert make_session(settings).verify == "/etc/ssl/private-ca.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/x.pem")   # requests applies this one itself
    assert make_session(settings).verify is True


def test_parse_challenge() -> None:
    c = parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                        'scope="repository:library/alpine:pull"')
    assert c is not None and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull"}
    c = parse_challenge('Basic realm="Registry Realm"')
    assert c is not None and c.scheme == "basic" and c.params["realm"] == "Registry Realm"
    c = parse_challenge("Bearer realm=https://x/token, service=svc")
    assert c is not None and c.params == {"realm": "https://x/token", "service": "svc"}
    assert parse_challenge("") is None


def test_repository_of() -> None:
    assert repository_of("https://r/v2/library/alpine/manifests/latest") == "library/alpine"
    assert repository_of("https://r/v2/a/b/c/blobs/sha256:00") == "a/b/c"
    assert repository_of("https://r/v2/") is None


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="--max-size"):
        parse_size("lots", option="--max-size")


def ns(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"image": "reg.example:5000/app:1", "username": None, "password_stdin": False,
            "insecure_registry": [], "cache_dir": None, "platform": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_credentials_from_args() -> None:
    assert credentials_from_args(ns()) is None
    src = credentials_from_args(ns(username="u", password_stdin=True),
                                stdin=io.StringIO("pa55\n"))
    assert src is not None
    creds = src.get("reg.example:5000")
    assert creds is not None and (creds.username, creds.password) == ("u", "pa55")
    assert "pa55" not in repr(src)
    with pytest.raises(ConfigError, match="needs --password-stdin"):
        credentials_from_args(ns(username="u"))
    with pytest.raises(ConfigError, match="needs --username"):
        credentials_from_args(ns(password_stdin=True), stdin=io.StringIO("x"))
    with pytest.raises(ConfigError, match="empty"):
        credentials_from_args(ns(username="u", password_stdin=True), stdin=io.StringIO("\n"))


def test_settings_from_args(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOTFS_EXPORT_INSECURE_REGISTRIES", '["a.example"]')
    s = settings_from_args(ns(cache_dir=str(tmp_path), insecure_registry=["b.example"],
                              concurrency=7))
    assert s.cache_dir == tmp_path
    assert s.insecure_registries == ["a.example", "b.example"]
    assert s.download_concurrency == 7
    with pytest.raises(ConfigError, match="ROOTFS_EXPORT_DOWNLOAD_CONCURRENCY"):
        settings_from_args(ns(concurrency=0))
