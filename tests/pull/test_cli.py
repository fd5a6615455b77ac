"""The command-line shell: help text, signals, cached layers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pull.conftest import FakeServer
from tests.pull.test_misbehaving_registry import gz_layer
from worker.cache.blobs import BlobCache
from worker.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_describes_the_tool() -> None:
    text = build_parser().format_help()
    assert "Turn OCI/Docker images into root filesystems for microVMs" in text
    assert "``" not in text and "command-line shell" not in text


def test_sidecar_of_the_readme_command_is_ignored() -> None:
    # The README's first command writes root.ext4 and its root.ext4.json sidecar.
    for path in ("root.ext4.json", "sub/x.ext4.json"):
        out = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert out.returncode == 0, f"{path} is not ignored"


# -- pull output ---------------------------------------------------------------------------
def test_pull_says_cached_only_for_cached_layers(fake_registry: FakeServer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = fake_registry.add_image("app", "v1", [gz_layer(1, 1000, 1), gz_layer(1, 1000, 2)])
    args = ["pull", img.reference, "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    first = capsys.readouterr().err
    assert first.count("downloading") == 2 and first.count("cached") == 2
    assert main(args) == 0
    second = capsys.readouterr().err
    assert "downloading" not in second
    assert second.count("cached") == 2


# -- signals -------------------------------------------------------------------------------
def _start_slow_pull(fake_registry: FakeServer, cache_dir: Path) -> tuple[Any, Any]:
    img = fake_registry.add_image("app", "v1", [gz_layer(2, 300_000, 5)])
    fake_registry.slow_chunk = 1024
    fake_registry.slow_blobs[img.layer_digests[0]] = 0.01   # ~100 KB/s: seconds to finish
    env = dict(os.environ, ROOTFS_EXPORT_MIN_TRANSFER_RATE="0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "pull", img.reference,
                             "--cache-dir", str(cache_dir)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = cache_dir / "tmp"
    deadline = time.monotonic() + 30
    while not (tmp.is_dir() and any(tmp.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    time.sleep(0.3)   # some bytes in the temp file
    return proc, img


def test_sigterm_during_a_download_leaves_no_temp(fake_registry: FakeServer,
                                                  tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    proc, img = _start_slow_pull(fake_registry, cache_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "rootfs-export: terminated" in err and "Traceback" not in err
    assert list((cache_dir / "tmp").iterdir()) == []
    assert not (cache_dir / "sha256" / img.layer_digests[0].split(":")[1]).exists()


def test_temp_of_a_killed_download_is_swept_on_next_use(fake_registry: FakeServer,
                                                        tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    proc, img = _start_slow_pull(fake_registry, cache_dir)
    proc.kill()   # no handler runs: the temp file stays behind
    proc.communicate(timeout=30)
    left = list((cache_dir / "tmp").iterdir())
    assert left and all(p.name.endswith(".part") for p in left)
    cache = BlobCache(cache_dir)   # next use
    assert list(cache.tmp_dir.iterdir()) == []


def test_temp_of_a_running_download_is_not_swept(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    digest = "sha256:" + "ab" * 32
    with cache.lock(digest), cache.temp_file(digest) as (f, path):
        f.write(b"partial")

        def other_opener() -> None:
            BlobCache(tmp_path / "cache")

        t = threading.Thread(target=other_opener)
        t.start()
        t.join()
        BlobCache(tmp_path / "cache")
        assert path.exists()
    code = ("import sys; from worker.cache.blobs import BlobCache; "
            "print(len(BlobCache(sys.argv[1]).sweep_orphan_temps()))")
    with cache.lock(digest), cache.temp_file(digest) as (f, path):
        out = subprocess.run([sys.executable, "-c", code, str(cache.root)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "0" and path.exists()


# -- scripts/install-python-deps ----------------------------------------------------------------
def _picked_python(env: dict[str, str]) -> str:
    script = ROOT / "scripts" / "install-python-deps"
    text = script.read_text()
    start = text.index("pick_python() {")
    end = text.index("\n}\n", start) + 3
    out = subprocess.run(["bash", "-c", text[start:end] + "pick_python"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_install_python_deps_prefers_the_system_python() -> None:
    # A venv made from a pyenv Python under /root cannot be used by other users.
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    system = Path("/usr/bin/python3")
    usable = system.exists() and subprocess.run(
        [str(system), "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]).returncode == 0
    assert _picked_python(env) == (str(system) if usable else "python3")
    assert _picked_python(dict(env, PYTHON="/opt/py/bin/python3.12")) == "/opt/py/bin/python3.12"
