"""Credentials from Docker's config.json, credential helpers and flags; secrets stay hidden."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from worker.errors import AuthenticationError, ConfigError
from worker.pull.credentials import Credentials, CredentialSource, find_credentials

SECRET = "s3cr3t-Pa55"


def write_config(dir_: Path, doc: dict) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "config.json").write_text(json.dumps(doc))
    return dir_


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``docker-credential-test`` on PATH that logs the server URL it was asked for."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-test"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> {log}
case "$server" in
  helper.example:5000) echo '{{"ServerURL":"helper.example:5000","Username":"hu","Secret":"{SECRET}"}}' ;;
  https://index.docker.io/v1/) echo '{{"ServerURL":"x","Username":"<token>","Secret":"idtok-{SECRET}"}}' ;;
  slow.example) sleep 5 ;;
  broken.example) echo 'keychain exploded'; exit 1 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_auths_base64(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d", {"auths": {
        "registry.example:5000": {"auth": b64(f"alice:{SECRET}")},
        "https://index.docker.io/v1/": {"auth": b64(f"hubuser:{SECRET}")}}})
    creds = find_credentials("registry.example:5000", config_dir=cfg)
    assert creds is not None and creds.username == "alice" and creds.password == SECRET
    assert creds.basic == ("alice", SECRET)
    hub = find_credentials("docker.io", config_dir=cfg)
    assert hub is not None and hub.username == "hubuser"
    assert find_credentials("other.example", config_dir=cfg) is None


def test_identity_token(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d", {"auths": {"r.example": {
        "auth": b64("00000000-0000-0000-0000-000000000000:"), "identitytoken": "tok-" + SECRET}}})
    creds = find_credentials("r.example", config_dir=cfg)
    assert creds is not None and creds.identity_token == "tok-" + SECRET
    assert creds.basic is None


def test_docker_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "envdir", {"auths": {"e.example": {"auth": b64("e:p")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    creds = find_credentials("e.example")
    assert creds is not None and creds.username == "e"


def test_cred_helpers_and_store(tmp_path: Path, helper_bin: Path) -> None:
    cfg = write_config(tmp_path / "d", {
        "credHelpers": {"helper.example:5000": "test"},
        "credsStore": "test",
        "auths": {"fallback.example": {"auth": b64("fb:pw")}}})
    creds = find_credentials("helper.example:5000", config_dir=cfg)
    assert creds is not None and (creds.username, creds.password) == ("hu", SECRET)
    hub = find_credentials("docker.io", config_dir=cfg)
    assert hub is not None and hub.identity_token == "idtok-" + SECRET
    # the store has nothing for this one: the auths entry is used
    fb = find_credentials("fallback.example", config_dir=cfg)
    assert fb is not None and fb.username == "fb"
    assert find_credentials("nothing.example", config_dir=cfg) is None
    asked = helper_bin.read_text().split()
    assert "helper.example:5000" in asked and "https://index.docker.io/v1/" in asked


def test_helper_failure_and_timeout(tmp_path: Path, helper_bin: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "d", {"credsStore": "test"})
    with pytest.raises(AuthenticationError, match="keychain exploded"):
        find_credentials("broken.example", config_dir=cfg)
    from worker.pull import credentials
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 0.5)
    with pytest.raises(AuthenticationError, match="did not answer"):
        credentials.run_helper("test", "slow.example", timeout=0.5)


def test_missing_helper_is_not_fatal(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d", {"credsStore": "does-not-exist-anywhere"})
    assert find_credentials("x.example", config_dir=cfg) is None


def test_bad_config_is_a_clear_error_without_secrets(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "d", {})
    (cfg / "config.json").write_text("{ nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        find_credentials("x", config_dir=cfg)
    write_config(cfg, {"auths": {"x": {"auth": b64("no-colon-" + SECRET)}}})
    with pytest.raises(ConfigError) as info:
        find_credentials("x", config_dir=cfg)
    assert SECRET not in str(info.value)


def test_secrets_never_shown() -> None:
    c = Credentials("bob", SECRET)
    t = Credentials("", identity_token=SECRET)
    for obj in (c, t, CredentialSource(c, registry="r.example")):
        assert SECRET not in repr(obj) and SECRET not in str(obj)
    assert "bob" in repr(c)
    assert SECRET not in f"{c} {[c]} {({'k': c})}"
    with pytest.raises(TypeError):
        pickle.dumps(c)


def test_explicit_credentials_only_for_their_registry(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "d", {"auths": {"other.example": {"auth": b64("o:p")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    src = CredentialSource(Credentials("me", SECRET), registry="mine.example")
    assert src.get("mine.example") == Credentials("me", SECRET)
    other = src.get("other.example")
    assert other is not None and other.username == "o"
    assert src.get("third.example") is None
