"""The uncompressed tar the cache keeps beside a compressed layer, and how exports use it."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.imagebuilder import Layer, directory, file, push_image, symlink, whiteout
from tests.support.root import require_root
from worker.cache.blobs import BlobCache
from worker.errors import CorruptLayer
from worker.export import ExportRequest, OutputFormat, build_output, export, resolve
from worker.pull.fetch import fetch_layers


def layers() -> list[Layer]:
    return [
        Layer.from_entries([directory("etc"), file("etc/hostname", "box\n"),
                            file("etc/motd", "hi"), symlink("bin", "usr/bin")], "gzip"),
        Layer.from_entries([file("usr/bin/app", b"\x7fELF" + b"z" * 50_000, mode=0o755),
                            whiteout("etc/hostname")], "zstd"),
        Layer.from_entries([file("srv/plain", "p")], "none"),
    ]


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return sorted(m.name for m in tf)


def test_compressed_layers_keep_a_verified_tar(registry: Any, settings: Any) -> None:
    img = push_image(registry, "kept/tar", "v1", layers())
    indexes = fetch_layers(resolve(img.reference, None, settings), settings)
    cache = BlobCache(settings.cache_dir)
    gz, zst, plain = indexes
    for index in (gz, zst):
        kept = cache.tar_path(index.digest)
        assert sha256(kept) == index.diff_id            # exactly the verified tar
        assert kept.stat().st_size == index.uncompressed_size
    assert not cache.tar_path(plain.digest).exists()    # the blob is its own tar
    sizes = {e.digest: e.size for e in cache.entries()}
    assert sizes[gz.digest] >= gz.compressed_size + gz.uncompressed_size
    assert cache.delete(zst.digest) and not cache.tar_path(zst.digest).exists()


def test_exports_read_the_kept_tar_and_fall_back_to_the_blob(registry: Any, settings: Any,
                                                            tmp_path: Path) -> None:
    img = push_image(registry, "kept/read", "v1", layers())
    resolved = resolve(img.reference, None, settings)
    indexes = fetch_layers(resolved, settings)
    cache = BlobCache(settings.cache_dir)
    gz = indexes[0]
    # Spoil the blob (same size): an export that reads the kept tar does not notice.
    blob = cache.path(gz.digest)
    blob.write_bytes(b"\0" * blob.stat().st_size)
    out = tmp_path / "a.tar"
    build_output(resolved, indexes, ExportRequest(img.reference, str(out), OutputFormat.TAR),
                 settings)
    assert "etc/motd" in tar_names(out) and "usr/bin/app" in tar_names(out)
    # A kept tar of the wrong size is not trusted: the (spoiled) blob is read, and fails.
    kept = cache.tar_path(gz.digest)
    with open(kept, "r+b") as f:
        f.truncate(kept.stat().st_size - 512)
    with pytest.raises(CorruptLayer, match="gzip"):
        build_output(resolved, indexes, ExportRequest(img.reference, str(tmp_path / "b.tar"),
                                                      OutputFormat.TAR), settings)
    # An orphan tar (its blob evicted) is never read, and gc sweeps it.
    blob.unlink()
    with pytest.raises(CorruptLayer, match="missing"):
        build_output(resolved, indexes, ExportRequest(img.reference, str(tmp_path / "c.tar"),
                                                      OutputFormat.TAR), settings)
    cache.gc(1 << 40)
    assert not kept.exists()


@pytest.mark.parametrize("how", ["setting", "low-disk"])
def test_no_copy_when_disabled_or_low_disk(registry: Any, settings_factory: Any,
                                           tmp_path: Path, how: str) -> None:
    img = push_image(registry, f"kept/{how}", "v1", layers())
    settings = settings_factory(cache_uncompressed=(how != "setting"))
    result = export(ExportRequest(img.reference, str(tmp_path / "o.tar"), OutputFormat.TAR,
                                  low_disk=(how == "low-disk")), settings)
    assert result.output_size > 0
    cache = BlobCache(settings.cache_dir)
    assert not list(cache.blob_dir.glob("*.tar"))


def test_a_full_cache_disk_drops_the_copy_not_the_pull(registry: Any, settings_factory: Any,
                                                       tmp_path: Path) -> None:
    # 8 MiB of text compresses to a few KiB: the blob fits a 1 MiB filesystem, its tar cannot
    require_root("mounts a small tmpfs as the cache")
    big = Layer.from_entries([file("srv/big", b"all work and no play " * 400_000)], "gzip")
    img = push_image(registry, "kept/full", "v1", [big])
    cache_dir = tmp_path / "small"
    cache_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(cache_dir)],
                   check=True)
    try:
        settings = settings_factory(cache_dir=cache_dir)
        (index,) = fetch_layers(resolve(img.reference, None, settings), settings)
        cache = BlobCache(cache_dir)
        assert cache.has(index.digest) and cache.has_index(index.digest)
        assert not cache.tar_path(index.digest).exists()
        assert list(cache.tmp_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(cache_dir)], check=True)
