"""The writers and the layer reader on a local blob cache (no registry): the entry points the
ext4 packaging uses, and what they do when the disk or the cache misbehaves."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from tests.flatten.local import cache_layers, local_plan
from tests.flatten.support import dir_listing, tar_listing
from tests.support.imagebuilder import Layer, directory, file, hardlink, symlink
from worker.errors import Canceled, CorruptLayer, PackagingError, UnsafeLayerEntry
from worker.flatten.dirout import apply_plan, write_dir
from worker.flatten.plan import plan_layers
from worker.flatten.reader import LayerStream, cache_blob_path
from worker.flatten.tarout import write_tar, write_tar_file


def _layers() -> list[Layer]:
    return [Layer.from_entries([directory(".", mode=0o711, uid=7, mtime=1234),
                                file("etc/a", "a" * 5000), symlink("lib", "usr/lib"),
                                file("usr/lib/x", "x")]),
            Layer.from_entries([file("lib/y", "y"), hardlink("h", "etc/a"),
                                directory("lost+found", mode=0o700)], compression="zstd")]


def test_apply_into_a_fresh_mount_point(tmp_path: Path) -> None:
    plan, locate = local_plan(tmp_path / "cache", _layers())
    mnt = tmp_path / "mnt"
    (mnt / "lost+found").mkdir(parents=True)
    report = apply_plan(plan, mnt, locate)
    assert report.warnings == [] and report.layers_read == 2
    st = os.stat(mnt)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_mtime) == (0o711, 7, 1234)
    assert (mnt / "usr/lib/y").read_text() == "y" and os.path.islink(mnt / "lib")
    assert os.stat(mnt / "h").st_ino == os.stat(mnt / "etc/a").st_ino


def test_dir_and_tar_writers_agree_and_call_layer_done(tmp_path: Path) -> None:
    plan, locate = local_plan(tmp_path / "cache", _layers())
    done_dir: list[int] = []
    done_tar: list[int] = []
    write_dir(plan, tmp_path / "d", locate, on_layer_done=done_dir.append)
    rep, sha = write_tar_file(plan, tmp_path / "t.tar", locate, on_layer_done=done_tar.append)
    assert done_dir == done_tar == [0, 1]
    assert dir_listing(tmp_path / "d")[0] == tar_listing(tmp_path / "t.tar")[0]
    assert len(sha) == 64 and rep.bytes_written == (tmp_path / "t.tar").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "d", "t.tar"]


def test_planted_symlink_in_target_is_never_followed(tmp_path: Path) -> None:
    plan, locate = local_plan(tmp_path / "cache", _layers())
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "etc").symlink_to(outside)     # something else raced a symlink in
    with pytest.raises((PackagingError, UnsafeLayerEntry)):
        apply_plan(plan, target, locate)
    assert list(outside.iterdir()) == []


def test_failure_removes_partial_outputs(tmp_path: Path) -> None:
    idx, locate = cache_layers(tmp_path / "cache", _layers())
    plan = plan_layers(idx)
    cache_blob_path(tmp_path / "cache", idx[1].digest).write_bytes(b"")  # blob lost its bytes
    with pytest.raises(CorruptLayer):
        write_dir(plan, tmp_path / "d", locate)
    with pytest.raises(CorruptLayer):
        write_tar_file(plan, tmp_path / "t.tar", locate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_cancel_between_layers(tmp_path: Path) -> None:
    plan, locate = local_plan(tmp_path / "cache", _layers())
    cancel = threading.Event()
    with pytest.raises(Canceled):
        write_dir(plan, tmp_path / "d", locate, cancel=cancel,
                  on_layer_done=lambda i: cancel.set())
    with pytest.raises(Canceled):
        write_tar_file(plan, tmp_path / "t.tar", locate, cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_write_tar_to_a_pipe_like_stream(tmp_path: Path) -> None:
    plan, locate = local_plan(tmp_path / "cache", _layers())
    r, w = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        with os.fdopen(r, "rb") as f:
            chunks.extend(iter(lambda: f.read(65536), b""))

    t = threading.Thread(target=drain)
    t.start()
    with os.fdopen(w, "wb") as out:
        write_tar(plan, out, locate)
    t.join()
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        names = tf.getnames()
    assert "usr/lib/y" in names and names[0] == "."   # tarfile shows "./" as "."


def test_layer_stream_reads_by_offset_and_reports_truncation(tmp_path: Path) -> None:
    data = os.urandom(5_000_000)                 # several decompressed chunks
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(data))
    s = LayerStream(blob, "gzip", layer="sha256:x")
    s.skip_to(1000)
    assert s.read_bytes(10) == data[1000:1010]
    s.skip_to(3_000_000)
    assert b"".join(bytes(p) for p in s.read(2_000_000)) == data[3_000_000:5_000_000]
    with pytest.raises(CorruptLayer, match="overlap"):
        s.skip_to(10)
    s.close()
    blob.write_bytes(gzip.compress(data)[:50_000])
    s = LayerStream(blob, "gzip", layer="sha256:x")
    with pytest.raises(CorruptLayer, match="truncated|ends at"):
        s.skip_to(4_000_000)
    s = LayerStream(tmp_path / "nope", "gzip", layer="sha256:x")
    with pytest.raises(CorruptLayer, match="missing"):
        s.read_bytes(1)


def test_deleted_content_is_never_read(tmp_path: Path) -> None:
    """A layer whose every file a later layer deletes or replaces is not even opened, and a
    layer is read only up to the last byte the plan needs from it."""
    from tests.support.imagebuilder import whiteout

    cache = tmp_path / "cache"
    layers = [Layer.from_entries([file("cache/big.deb", os.urandom(1 << 20)),
                                  file("etc/conf", "old")]),
              Layer.from_entries([file("keep", "k"), file("tail/junk", os.urandom(1 << 20))],
                                 compression="none"),
              Layer.from_entries([whiteout("cache"), file("etc/conf", "new"),
                                  whiteout("tail")])]
    idx, locate = cache_layers(cache, layers)
    plan = plan_layers(idx)
    # layer 1: nothing survives -> its blob may vanish; layer 2: cut right after "keep"
    cache_blob_path(cache, idx[0].digest).unlink()
    keep = next(e for e in idx[1].entries if e.path == "keep")
    blob = cache_blob_path(cache, idx[1].digest)
    blob.write_bytes(blob.read_bytes()[:keep.data_offset + 512])
    write_dir(plan, tmp_path / "d", locate)
    write_tar_file(plan, tmp_path / "t.tar", locate)
    assert (tmp_path / "d/etc/conf").read_text() == "new"
    assert dir_listing(tmp_path / "d")[0] == tar_listing(tmp_path / "t.tar")[0]
    assert plan.data_bytes == 1 + 3


def test_name_too_long_for_a_filesystem_is_refused_by_the_planner(tmp_path: Path) -> None:
    # no format may carry a name the kernel cannot hold: a tar with one could not be unpacked
    name = "d/" + "n" * 300
    with pytest.raises(UnsafeLayerEntry, match="path component of 300 bytes") as err:
        local_plan(tmp_path / "cache", [Layer.from_entries([file(name, "x")])])
    assert err.value.path == name and err.value.layer


def test_unwritable_output_location_is_a_clear_error(tmp_path: Path) -> None:
    plan, locate = local_plan(tmp_path / "cache", _layers())
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PackagingError, match="cannot create"):
        write_tar_file(plan, tmp_path / "file" / "t.tar", locate)
    with pytest.raises(PackagingError, match="cannot create"):
        write_dir(plan, tmp_path / "file" / "d", locate)


def test_very_deep_trees_are_written_and_removed(tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    from worker.flatten.dirout import remove_tree

    # pytest's own tmp cleanup recurses: never leave a deep tree behind, even on failure
    def cleanup() -> None:
        for name in ("d", "x"):
            remove_tree(tmp_path / name)
    request.addfinalizer(cleanup)

    deep = "/".join(["a"] * 1500)          # deeper than Python's recursion limit
    plan, locate = local_plan(tmp_path / "cache", [Layer.from_entries(
        [file(deep + "/f", "x"), directory(deep + "/ro", mode=0o000), file(deep + "/ro/g", "y"),
         symlink(deep + "/out", "/etc")])])
    write_dir(plan, tmp_path / "d", locate)
    write_tar_file(plan, tmp_path / "t.tar", locate)
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "t.tar"), "-C", str(tmp_path / "x")],
                   check=True)

    def find(d: Path) -> str:   # os.walk recurses; find does not
        return subprocess.run(f"cd {d} && find . -printf '%P %y %m %s %l\\n' | sort",
                              shell=True, check=True, capture_output=True, text=True).stdout
    got = find(tmp_path / "d")
    assert got == find(tmp_path / "x") and len(got.splitlines()) == 1505   # root, 1500 dirs, f, ro, ro/g, out
    assert f"{deep}/ro d 0 " in got and f"{deep}/out l 777 4 /etc" in got
    remove_tree(tmp_path / "d")
    assert not (tmp_path / "d").exists() and os.path.exists("/etc")


@pytest.mark.parametrize("mtime", [1e30, -1e30, float("inf"), 4102444800.5, -86400])
def test_extreme_mtimes_do_not_crash_the_writers(tmp_path: Path, mtime: float) -> None:
    from worker.cache.index import EntryKind, IndexEntry, LayerIndex

    layer = Layer.from_entries([file("f", "x")])
    idx, locate = cache_layers(tmp_path / "cache", [layer])
    entries = tuple(IndexEntry(**{**{s: getattr(e, s) for s in IndexEntry.__slots__},
                                  "mtime": mtime}) for e in idx[0].entries)
    odd = LayerIndex(**{**{s: getattr(idx[0], s) for s in LayerIndex.__slots__},
                        "entries": entries})
    plan = plan_layers([odd])
    write_dir(plan, tmp_path / "d", locate)
    write_tar_file(plan, tmp_path / "t.tar", locate)
    assert (tmp_path / "d/f").read_text() == "x"
    assert "f" in tar_listing(tmp_path / "t.tar")[0]
    assert EntryKind.FILE in {e.kind for e in entries}
