"""The export command around the flattening: limits, broken layers, stdout, low-disk, cancel,
the ``--json`` result, and never a partial output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.flatten.support import dir_listing, run_export, tar_listing
from tests.support.imagebuilder import Layer, TarEntry, file, push_image, symlink
from worker.cache.blobs import BlobCache
from worker.errors import Canceled, CorruptLayer
from worker.export import ExportRequest, OutputFormat, build_output, export, resolve
from worker.progress import Phase, ProgressEvent


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


@pytest.fixture
def small_image(registry: Any) -> Any:
    return push_image(registry, "export/small", "v1", [
        Layer.from_entries([file("etc/hostname", "vm\n"), symlink("bin", "usr/bin"),
                            file("usr/bin/tool", "#!/bin/sh\n" * 100, mode=0o755)]),
        Layer.from_entries([file("etc/motd", "hello"), file("big", os.urandom(3 << 20))],
                           compression="zstd"),
    ], config={"Entrypoint": ["/bin/tool"], "Cmd": ["--serve"], "Env": ["A=1"],
               "WorkingDir": "/srv", "User": "1000:1000",
               "ExposedPorts": {"8080/tcp": {}}, "Labels": {"org.example": "yes"}})


def test_json_result_describes_the_output(small_image: Any, tmp_path: Path) -> None:
    out = tmp_path / "root.tar"
    rc, stdout, err = run_export(small_image.reference, out, "tar", tmp_path / "cache")
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc["image"] == small_image.reference
    assert doc["manifest_digest"] == small_image.manifest_digest
    assert doc["platform"].startswith("linux/")
    assert doc["format"] == "tar" and doc["output"] == str(out)
    assert doc["output_size"] == out.stat().st_size
    assert doc["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert doc["counts"]["file"] == 4 and doc["counts"]["symlink"] == 1
    assert doc["config"] == {"Entrypoint": ["/bin/tool"], "Cmd": ["--serve"],
                             "Env": doc["config"]["Env"], "WorkingDir": "/srv",
                             "User": "1000:1000", "ExposedPorts": ["8080/tcp"],
                             "Labels": {"org.example": "yes"}}
    assert "A=1" in doc["config"]["Env"]
    assert {"resolve", "download", "plan", "apply"} <= set(doc["timings"])
    assert json.loads((tmp_path / "root.tar.json").read_text())["sha256"] == doc["sha256"]
    # progress covered every phase, on stderr, as plain lines (not a TTY)
    for phase in ("resolve", "download", "apply", "done"):
        assert f"rootfs-export: {phase}" in err


def test_tar_to_stdout_equals_tar_file(small_image: Any, tmp_path: Path) -> None:
    out = tmp_path / "file.tar"
    rc, _, err = run_export(small_image.reference, out, "tar", tmp_path / "cache")
    assert rc == 0, err
    cmd = [str(Path(sys.executable).parent / "rootfs-export"), "export",
           small_image.reference, "-o", "-", "--format", "tar", "--cache-dir",
           str(tmp_path / "cache")]
    p = subprocess.run(cmd, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == out.read_bytes()
    assert b"wrote -" in p.stderr


def test_stdout_needs_tar_and_no_json(small_image: Any, tmp_path: Path) -> None:
    rc, _, err = run_export(small_image.reference, Path("-"), "dir", tmp_path / "cache")
    assert rc == 2 and "only possible with --format tar" in err


def test_decompression_bomb_fails_and_leaves_nothing(registry: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = Layer.from_entries([file("zeros", bytes(64 << 20))])
    assert bomb.size < 1 << 20
    img = push_image(registry, "export/bomb", "v1", [bomb])
    monkeypatch.setenv("ROOTFS_EXPORT_MAX_UNCOMPRESSED_BYTES", str(16 << 20))
    for fmt in ("dir", "tar", "ext4"):
        rc, _, err = run_export(img.reference, tmp_path / f"out.{fmt}", fmt, tmp_path / "cache")
        assert rc != 0 and "exceeds the limit" in err and "MAX_UNCOMPRESSED_BYTES" in err, err
    assert _leftovers(tmp_path, {"cache"}) == []
    assert not BlobCache(tmp_path / "cache").has(bomb.digest)


def test_entry_count_limit(registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = push_image(registry, "export/many", "v1",
                     [Layer.from_entries([file(f"f{i}", "") for i in range(50)])])
    monkeypatch.setenv("ROOTFS_EXPORT_MAX_ENTRIES", "20")
    rc, _, err = run_export(img.reference, tmp_path / "out", "dir", tmp_path / "cache")
    assert rc != 0 and "MAX_ENTRIES" in err
    assert _leftovers(tmp_path, {"cache"}) == []


def test_truncated_layer_fails_and_leaves_nothing(registry: Any, tmp_path: Path) -> None:
    good = Layer.from_entries([file("a", os.urandom(200_000))])
    bad = Layer.from_entries([file("b", os.urandom(200_000))])
    bad.__dict__["blob"] = bad.blob[: len(bad.blob) // 2]   # the registry stores what we send
    img = push_image(registry, "export/truncated", "v1", [good, bad])
    for fmt in ("dir", "tar"):
        rc, _, err = run_export(img.reference, tmp_path / f"out.{fmt}", fmt, tmp_path / "cache")
        assert rc != 0 and "truncated" in err and bad.digest in err, err
    assert _leftovers(tmp_path, {"cache"}) == []


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_blob_lost_from_cache_mid_export_leaves_nothing(small_image: Any, settings: Any,
                                                         tmp_path: Path, fmt: str) -> None:
    from worker.pull.fetch import fetch_layers

    resolved = resolve(small_image.reference, None, settings)
    layers = fetch_layers(resolved, settings)
    BlobCache(settings.cache_dir).path(layers[1].digest).unlink()
    out = tmp_path / f"out.{fmt}"
    with pytest.raises(CorruptLayer, match="missing"):
        build_output(resolved, layers, ExportRequest(small_image.reference, str(out),
                                                     OutputFormat(fmt)), settings)
    assert _leftovers(tmp_path, {"cache", "out"}) == []


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_cancel_during_apply_leaves_nothing(small_image: Any, settings: Any, tmp_path: Path,
                                            fmt: str) -> None:
    cancel = threading.Event()
    phases: list[Phase] = []

    def progress(ev: ProgressEvent) -> None:
        phases.append(ev.phase)
        if ev.phase == Phase.APPLY and ev.layers_done == 1:
            cancel.set()

    out = tmp_path / f"out.{fmt}"
    with pytest.raises(Canceled):
        export(ExportRequest(small_image.reference, str(out), OutputFormat(fmt)), settings,
               progress=progress, cancel=cancel)
    assert Phase.DOWNLOAD in phases and Phase.APPLY in phases
    assert _leftovers(tmp_path, {"cache", "out"}) == []


@pytest.mark.parametrize("fmt", ["dir", "tar"])
def test_low_disk_deletes_each_layer_once_read(small_image: Any, settings: Any, tmp_path: Path,
                                               fmt: str) -> None:
    cache = BlobCache(settings.cache_dir)
    seen: list[tuple[int, bool, bool]] = []

    def progress(ev: ProgressEvent) -> None:
        if ev.phase == Phase.APPLY and ev.layers_total:
            seen.append((ev.layers_done, cache.has(small_image.layer_digests[0]),
                         cache.has(small_image.layer_digests[1])))

    out = tmp_path / f"out.{fmt}"
    res = export(ExportRequest(small_image.reference, str(out), OutputFormat(fmt),
                               low_disk=True), settings, progress=progress)
    assert (1, False, True) in seen          # layer 1 gone while layer 2 still in use
    assert (2, False, False) in seen
    assert not cache.has(small_image.layer_digests[0])
    assert not cache.has(small_image.layer_digests[1])
    listing = dir_listing(out)[0] if fmt == "dir" else tar_listing(out)[0]
    assert "big" in listing and res.counts["file"] == 4
    # default mode keeps the (shared) cache
    out2 = tmp_path / f"again.{fmt}"
    export(ExportRequest(small_image.reference, str(out2), OutputFormat(fmt)), settings)
    assert cache.has(small_image.layer_digests[0]) and cache.has(small_image.layer_digests[1])


def test_existing_non_empty_dir_is_refused_untouched(small_image: Any, tmp_path: Path) -> None:
    out = tmp_path / "root"
    out.mkdir()
    (out / "precious").write_text("keep me")
    rc, _, err = run_export(small_image.reference, out, "dir", tmp_path / "cache")
    assert rc != 0 and "not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["precious"]
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_export(small_image.reference, empty, "dir", tmp_path / "cache")
    assert rc == 0, err
    assert (empty / "etc/hostname").read_text() == "vm\n"


@pytest.mark.needs_root(reason="switching to an unprivileged user needs root")
def test_unprivileged_dir_export_warns_with_counts(registry: Any,
                                                  request: pytest.FixtureRequest) -> None:
    img = push_image(registry, "export/privileged", "v1", [Layer.from_entries([
        file("owned", "x", uid=1234, gid=1234), file("mine", "y"),
        TarEntry("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        file("ping", "p", xattrs={"security.capability":
                                  bytes.fromhex("0100000200200000000000000000000000000000")}),
        TarEntry("run/fifo", "fifo"), TarEntry("ro", "dir", mode=0o555),
        file("ro/inside", "in a read-only dir")])])
    # pytest's tmp dirs are root-only all the way up: use a world-traversable one
    work = Path(tempfile.mkdtemp(prefix="rootfs-export-nobody-"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    os.chown(work, 65534, 65534)
    (work / "docker").mkdir()
    os.chown(work / "docker", 65534, 65534)
    exe = str(Path(sys.executable).parent / "rootfs-export")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe,
                        "export", img.reference, "-o", str(work / "root"), "--format", "dir",
                        "--cache-dir", str(work / "cache"), "--json"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DOCKER_CONFIG=str(work / "docker")))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert "could not be preserved" in p.stderr and "not running as root" in p.stderr
    assert doc["extra"]["not_preserved"]["ownership"] >= 1
    assert doc["extra"]["not_preserved"]["devices"] == 1
    assert doc["extra"]["not_preserved"]["xattrs"] == 1
    root = work / "root"
    assert (root / "owned").read_text() == "x" and (root / "mine").read_text() == "y"
    assert not (root / "dev/null").exists() and (root / "run/fifo").exists()
    assert (root / "ro/inside").read_text() == "in a read-only dir"
    assert stat.S_IMODE((root / "ro").stat().st_mode) == 0o555


def test_export_from_a_registry_needing_credentials(auth_registry: Any, tmp_path: Path) -> None:
    img = push_image(auth_registry, "export/private", "v1",
                     [Layer.from_entries([file("secret", "s3cret")])])
    exe = str(Path(sys.executable).parent / "rootfs-export")
    base = [exe, "export", img.reference, "--format", "dir", "--cache-dir",
            str(tmp_path / "cache")]
    p = subprocess.run([*base, "-o", str(tmp_path / "anon")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and not (tmp_path / "anon").exists()
    p = subprocess.run([*base, "-o", str(tmp_path / "root"), "--username",
                        auth_registry.username, "--password-stdin"],
                       input=auth_registry.password + "\n", capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "root/secret").read_text() == "s3cret"
    assert auth_registry.password not in p.stderr + p.stdout


def test_low_disk_with_a_blob_used_twice_and_ext4(registry: Any, settings: Any,
                                                  tmp_path: Path) -> None:
    a = Layer.from_entries([file("a", "first"), file("both", "from a")])
    b = Layer.from_entries([file("b", "b"), file("both", "from b")])
    img = push_image(registry, "export/twice", "v1", [a, b, a])
    out = tmp_path / "root.tar"
    res = export(ExportRequest(img.reference, str(out), OutputFormat.TAR, low_disk=True),
                 settings)
    listing = tar_listing(out)[0]
    assert set(listing) == {".", "a", "b", "both"} and res.counts["file"] == 3
    cache = BlobCache(settings.cache_dir)
    assert not cache.has(a.digest) and not cache.has(b.digest)
    img2 = push_image(registry, "export/ext4-lowdisk", "v1", [a, b])
    out2 = tmp_path / "root.ext4"
    phases: list[Phase] = []
    res2 = export(ExportRequest(img2.reference, str(out2), OutputFormat.EXT4, low_disk=True),
                  settings, progress=lambda ev: phases.append(ev.phase))
    for phase in (Phase.RESOLVE, Phase.DOWNLOAD, Phase.APPLY, Phase.PACKAGE, Phase.DONE):
        assert phase in phases
    assert phases[-1] == Phase.DONE
    assert out2.stat().st_size == res2.output_size and res2.sha256
    assert json.loads((tmp_path / "root.ext4.json").read_text())["format"] == "ext4"
    assert not cache.has(a.digest) and not cache.has(b.digest)
    p = subprocess.run(["debugfs", "-R", "cat /both", str(out2)], capture_output=True)
    assert p.stdout == b"from b"


def test_low_disk_leaves_a_blob_another_job_is_reading(small_image: Any, settings: Any,
                                                       tmp_path: Path) -> None:
    from worker.pull.fetch import fetch_layers

    resolved = resolve(small_image.reference, None, settings)
    layers = fetch_layers(resolved, settings)
    cache = BlobCache(settings.cache_dir)
    with cache.lock(layers[0].digest, shared=True):      # the other job
        build_output(resolved, layers, ExportRequest(small_image.reference,
                                                     str(tmp_path / "o.tar"), OutputFormat.TAR,
                                                     low_disk=True), settings)
    assert cache.has(layers[0].digest) and not cache.has(layers[1].digest)


def test_add_local_files_on_top_in_dir_and_tar(small_image: Any, tmp_path: Path) -> None:
    src = tmp_path / "agent"
    (src / "bin").mkdir(parents=True)
    (src / "bin/init").write_text("#!/bin/sh\n")
    os.chmod(src / "bin/init", 0o755)
    cfg = tmp_path / "motd"
    cfg.write_text("added\n")
    outs = {}
    for fmt in ("dir", "tar"):
        out = tmp_path / f"out.{fmt}"
        rc, stdout, err = run_export(small_image.reference, out, fmt, tmp_path / "cache",
                                     "--add", f"{src}:/opt/agent", "--add", f"{cfg}:/etc/motd",
                                     "--add-owner", "1000:1000")
        assert rc == 0, err
        outs[fmt] = dir_listing(out)[0] if fmt == "dir" else tar_listing(out)[0]
    assert outs["dir"] == outs["tar"]
    assert outs["dir"]["etc/motd"][2:4] == (1000, 1000)
    assert outs["dir"]["opt/agent/bin/init"][1] == 0o755
    assert (tmp_path / "out.dir/etc/motd").read_text() == "added\n"
    assert "usr/bin/tool" in outs["dir"]
    rc, _, err = run_export(small_image.reference, tmp_path / "bad", "dir", tmp_path / "cache",
                            "--add", f"{cfg}:/../../escape")
    assert rc != 0 and "escape" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path.parent / "escape").exists()


def test_cache_max_size_is_kept_after_pull_and_export(registry: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: Any) -> None:
    from worker.cli import main

    imgs = [push_image(registry, f"export/gc-{n}", "v1", [Layer.from_entries(
        [file(f"{n}.bin", os.urandom(300_000))], compression="none")]) for n in "abc"]
    cache_dir = tmp_path / "cache"
    cache = BlobCache(cache_dir)

    def cached() -> set[str]:
        return {e.digest for e in cache.entries()}

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([*argv, "--cache-dir", str(cache_dir)])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    # unset: nothing is evicted
    monkeypatch.delenv("ROOTFS_EXPORT_CACHE_MAX_SIZE", raising=False)
    for img in imgs[:2]:
        assert run("pull", img.reference)[0] == 0
    a, b, c = (img.layer_digests[0] for img in imgs)
    assert {a, b} <= cached()
    one_layer = max(e.size for e in cache.entries())
    # room for about one layer: an export evicts the least recently used blobs, never the
    # image it just wrote (used last)
    monkeypatch.setenv("ROOTFS_EXPORT_CACHE_MAX_SIZE", str(one_layer + 100_000))
    rc, out, err = run("export", imgs[2].reference, "-o", str(tmp_path / "c.tar"),
                       "--format", "tar", "--json")
    assert rc == 0, err
    assert json.loads(out)["format"] == "tar"          # stdout stays one JSON object
    assert c in cached() and a not in cached() and b not in cached()
    assert "evicted" in err and "ROOTFS_EXPORT_CACHE_MAX_SIZE" in err
    assert cache.total_size() <= one_layer + 100_000
    # pull too; a blob another job is reading (shared lock) is never evicted, even at 0
    monkeypatch.setenv("ROOTFS_EXPORT_CACHE_MAX_SIZE", "0")
    with cache.lock(c, shared=True):
        rc, _, err = run("pull", imgs[0].reference)
        assert rc == 0, err
        assert cached() == {c}
    monkeypatch.setenv("ROOTFS_EXPORT_CACHE_MAX_SIZE", str(one_layer + 100_000))
    rc, _, err = run("pull", imgs[1].reference)
    assert rc == 0, err
    assert b in cached() and a not in cached() and c not in cached()


@pytest.mark.parametrize("fmt", ["ext4", "tar"])
def test_total_time_is_the_whole_jobs_wall_time(small_image: Any, settings: Any,
                                                tmp_path: Path, fmt: str) -> None:
    import time

    out = tmp_path / f"out.{fmt}"
    t0 = time.monotonic()
    res = export(ExportRequest(small_image.reference, str(out), OutputFormat(fmt)), settings)
    wall = time.monotonic() - t0
    t = res.timings
    # phases may overlap, but each lies inside the job, and resolve -> download -> plan ->
    # write run one after the other
    assert t["total"] <= wall
    assert all(t["total"] >= v for k, v in t.items() if k != "total")
    written = t["package"] if fmt == "ext4" else t["apply"]
    assert t["total"] >= t["resolve"] + t["download"] + t["plan"] + written
    doc = json.loads((tmp_path / f"out.{fmt}.json").read_text())
    assert doc["timings"]["total"] == round(t["total"], 3)
