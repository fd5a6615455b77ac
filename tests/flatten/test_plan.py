"""The planner's rules, from hand-made entry indexes (the real-tar versions are in test_rules)."""

from __future__ import annotations

import pytest

from worker.cache.index import EntryKind as K
from worker.cache.index import IndexEntry, LayerIndex
from worker.errors import LayerError, LimitExceeded, UnsafeLayerEntry
from worker.flatten.plan import FlatPlan, PlannedEntry, check_plan_limits, plan_layers


def E(path: str, kind: K = K.FILE, **kw) -> IndexEntry:  # noqa: N802
    return IndexEntry(path=path, kind=kind, **kw)


def L(*entries: IndexEntry, n: int = 0) -> LayerIndex:  # noqa: N802
    return LayerIndex(digest=f"sha256:{n:064x}", diff_id="", media_type="", compression="none",
                      compressed_size=0, uncompressed_size=0, entries=tuple(entries))


def plan(*layers: tuple[IndexEntry, ...] | list[IndexEntry]) -> FlatPlan:
    return plan_layers([L(*es, n=i) for i, es in enumerate(layers)])


def tree(p: FlatPlan) -> dict[str, PlannedEntry]:
    return {pe.path: pe for pe in p.entries}


def test_files_dirs_and_implied_parents() -> None:
    p = plan([E("a/b/c", size=3, data_size=3, data_offset=512), E("d", K.DIR, mode=0o700)])
    t = tree(p)
    assert [pe.path for pe in p.entries] == [".", "a", "a/b", "a/b/c", "d"]
    assert t["a"].implied and t["a/b"].implied and t["a"].entry.mode == 0o755
    assert t["a"].entry.uid == 0 and t["."].implied
    assert t["d"].entry.mode == 0o700 and not t["d"].implied
    assert p.counts == {"dir": 4, "file": 1, "implied": 3}
    assert p.file_bytes == 3 and p.file_blocks == 1 and p.data_bytes == 3


def test_later_layer_wins_and_dir_over_dir_merges() -> None:
    p = plan([E("d", K.DIR, mode=0o755, uid=1), E("d/x"), E("f", size=1)],
             [E("d", K.DIR, mode=0o750, uid=2), E("d/y"), E("f", size=2)])
    t = tree(p)
    assert set(t) == {".", "d", "d/x", "d/y", "f"}
    assert t["d"].entry.mode == 0o750 and t["d"].layer == 1 and t["d"].entry.uid == 2
    assert t["f"].layer == 1 and t["f"].entry.size == 2


def test_whiteouts_file_symlink_tree() -> None:
    p = plan([E("a"), E("s", K.SYMLINK, linkname="/a"), E("t/u/v"), E("keep")],
             [E("a", K.WHITEOUT), E("s", K.WHITEOUT), E("t", K.WHITEOUT),
              E("missing", K.WHITEOUT)])
    assert set(tree(p)) == {".", "keep"}


def test_opaque_keeps_same_layer_entries_in_any_order() -> None:
    lower = [E("o", K.DIR), E("o/old"), E("o/sub/deep")]
    before = [E("o/new1"), E("o", K.OPAQUE), E("o/new2")]
    p = plan(lower, before)
    assert set(tree(p)) == {".", "o", "o/new1", "o/new2"}
    p = plan(lower, [E("o", K.DIR, mode=0o711), E("o/new1"), E("o", K.OPAQUE)])
    assert set(tree(p)) == {".", "o", "o/new1"}
    assert tree(p)["o"].entry.mode == 0o711


def test_whiteout_does_not_delete_same_layer_entry() -> None:
    p = plan([E("x", size=1)], [E("x", size=2), E("x", K.WHITEOUT)])
    assert tree(p)["x"].entry.size == 2


def test_type_changes() -> None:
    p = plan([E("d", K.DIR), E("d/child"), E("f")], [E("d"), E("f", K.DIR), E("f/in")])
    t = tree(p)
    assert t["d"].entry.kind == K.FILE and "d/child" not in t
    assert t["f"].entry.kind == K.DIR and "f/in" in t
    p = plan([E("s", K.SYMLINK, linkname="x")], [E("s", K.DIR), E("s/a")])
    assert tree(p)["s"].entry.kind == K.DIR


def test_duplicate_entries_last_wins() -> None:
    p = plan([E("x", size=1), E("x", size=2), E("y", K.DIR), E("y", size=5)])
    t = tree(p)
    assert t["x"].entry.size == 2 and t["y"].entry.kind == K.FILE


def test_hardlink_into_lower_layer() -> None:
    p = plan([E("bin/a", size=4, data_size=4)], [E("bin/b", K.HARDLINK, linkname="bin/a")])
    t = tree(p)
    assert t["bin/a"].link_to is None and t["bin/a"].layer == 0
    assert t["bin/b"].link_to == "bin/a" and t["bin/b"].kind == K.HARDLINK
    assert p.file_bytes == 4 and p.inodes == 3  # ".", "bin" and the shared file inode
    assert p.counts["hardlink"] == 1


def test_hardlink_keeps_old_content_when_target_replaced_or_deleted() -> None:
    orig = E("a", size=4, data_size=4, data_offset=1024)
    p = plan([orig, E("l1", K.HARDLINK, linkname="a"), E("l2", K.HARDLINK, linkname="l1")],
             [E("a", size=9, data_size=9, data_offset=512)])
    t = tree(p)
    assert t["a"].entry.size == 9 and t["a"].layer == 1 and t["a"].link_to is None
    assert t["l1"].link_to is None and t["l1"].entry is orig and t["l1"].layer == 0
    assert t["l2"].link_to == "l1"
    assert p.data_bytes == 13
    p = plan([orig, E("l1", K.HARDLINK, linkname="a")], [E("a", K.WHITEOUT)])
    t = tree(p)
    assert set(t) == {".", "l1"} and t["l1"].entry is orig and t["l1"].has_data


def test_hardlink_to_missing_target_names_both_paths() -> None:
    with pytest.raises(LayerError) as ei:
        plan([E("x/link", K.HARDLINK, linkname="nope/target")])
    assert "nope/target" in str(ei.value) and "x/link" in str(ei.value)
    with pytest.raises(LayerError, match="directory"):
        plan([E("d", K.DIR), E("l", K.HARDLINK, linkname="d")])


def test_symlinked_parents_resolve_inside_root() -> None:
    p = plan([E("usr/lib", K.DIR), E("lib", K.SYMLINK, linkname="/usr/lib"),
              E("up", K.SYMLINK, linkname="../../../../.."),
              E("rel", K.SYMLINK, linkname="usr/../usr/lib"),
              E("c1", K.SYMLINK, linkname="c2"), E("c2", K.SYMLINK, linkname="/etc")],
             [E("lib/x"), E("up/etc/passwd"), E("rel/y"), E("c1/z")])
    t = tree(p)
    assert {"usr/lib/x", "etc/passwd", "usr/lib/y", "etc/z"} <= set(t)
    assert t["lib"].entry.kind == K.SYMLINK and t["up"].entry.kind == K.SYMLINK
    assert all(not pe.path.startswith("..") and not pe.path.startswith("/") for pe in p.entries)


def test_symlink_loop_is_rejected() -> None:
    with pytest.raises(UnsafeLayerEntry) as ei:
        plan([E("a", K.SYMLINK, linkname="b"), E("b", K.SYMLINK, linkname="a")],
             [E("a/file")])
    assert "a/file" in str(ei.value) and f"{1:064x}" in str(ei.value)


def test_dotdot_component_rejected() -> None:
    with pytest.raises(UnsafeLayerEntry):
        plan([E("../etc/passwd")])


def test_whiteout_does_not_follow_symlinks() -> None:
    p = plan([E("usr/lib/keep"), E("lib", K.SYMLINK, linkname="usr/lib")],
             [E("lib/keep", K.WHITEOUT)])
    assert "usr/lib/keep" in tree(p)


def test_file_in_the_way_of_a_parent_is_replaced() -> None:
    p = plan([E("a")], [E("a/b")])
    t = tree(p)
    assert t["a"].entry.kind == K.DIR and t["a"].implied and "a/b" in t


def test_sparse_blocks() -> None:
    p = plan([E("s", size=1 << 30, data_size=8192, sparse=((0, 4096), (1 << 29, 4096)))])
    assert p.file_blocks == 2 and p.file_bytes == 1 << 30


def test_limits() -> None:
    p = plan([E("a" * 50), E("b", size=10, data_size=10)])
    check_plan_limits(p, max_uncompressed_bytes=10, max_entries=3, max_path_length=50)
    with pytest.raises(LimitExceeded, match="MAX_ENTRIES"):
        check_plan_limits(p, max_uncompressed_bytes=10, max_entries=2, max_path_length=50)
    with pytest.raises(LimitExceeded, match="MAX_UNCOMPRESSED"):
        check_plan_limits(p, max_uncompressed_bytes=9, max_entries=3, max_path_length=50)
    with pytest.raises(LimitExceeded, match="a" * 50):
        check_plan_limits(p, max_uncompressed_bytes=10, max_entries=3, max_path_length=49)


def test_deterministic_order_parents_first_bytes_sorted() -> None:
    names = ["b/z", "a", "b/a", "\udcff", "B", "b/m/n"]
    p1 = plan([E(n) for n in names])
    p2 = plan([E(n) for n in reversed(names)])
    assert [pe.path for pe in p1.entries] == [pe.path for pe in p2.entries]
    seen: set[str] = set()
    for pe in p1.entries:
        parent = pe.path.rpartition("/")[0] or "."
        assert pe.path == "." or parent in seen
        seen.add(pe.path)


def test_hardlink_to_symlink_and_device_share_the_inode() -> None:
    p = plan([E("s", K.SYMLINK, linkname="/etc"), E("dev/null", K.CHAR, devmajor=1, devminor=3)],
             [E("s2", K.HARDLINK, linkname="s"), E("dev/null2", K.HARDLINK, linkname="dev/null")])
    t = tree(p)
    assert t["s2"].link_to == "s" and t["dev/null2"].link_to == "dev/null"


def test_hardlink_through_symlinked_parent_resolves_inside_root() -> None:
    p = plan([E("usr/bin/python3", size=1, data_size=1), E("bin", K.SYMLINK, linkname="/usr/bin")],
             [E("py", K.HARDLINK, linkname="bin/python3")])
    assert tree(p)["py"].link_to == "usr/bin/python3"


def test_whiteout_and_opaque_together_in_one_layer() -> None:
    p = plan([E("a/x"), E("a/y"), E("b/z")],
             [E("a", K.OPAQUE), E("a/new"), E("b/z", K.WHITEOUT), E("b/w")])
    assert set(tree(p)) == {".", "a", "a/new", "b", "b/w"}


def test_root_entry_sets_root_metadata_and_cannot_be_a_file() -> None:
    p = plan([E(".", K.DIR, mode=0o700, uid=5)])
    assert tree(p)["."].entry.mode == 0o700 and not tree(p)["."].implied
    with pytest.raises(UnsafeLayerEntry):
        plan([E(".", K.FILE)])


def test_symlink_resolution_work_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.flatten.plan as planmod

    monkeypatch.setattr(planmod, "MAX_EXPANDED_COMPONENTS", 10_000)
    lower = [E("l", K.SYMLINK, linkname="/".join(["d"] * 500))]
    p = plan(lower, [E(f"l/f{i}") for i in range(19)])     # 19 * 500 components: fine
    assert "/".join(["d"] * 500) + "/f18" in tree(p)
    with pytest.raises(UnsafeLayerEntry, match="too much work"):
        plan(lower, [E(f"l/f{i}") for i in range(25)])


@pytest.mark.parametrize("kw", [{"uid": 1 << 40}, {"gid": (1 << 32) - 1}, {"uid": -1}])
def test_ids_no_filesystem_can_hold_are_rejected(kw: dict) -> None:
    with pytest.raises(LayerError, match="out of range") as ei:
        plan([E("etc/x", **kw)])
    assert "etc/x" in str(ei.value)
    plan([E("etc/x", uid=(1 << 32) - 2, gid=4_000_000_000)])


def test_device_numbers_out_of_range_are_rejected() -> None:
    plan([E("dev/ok", K.CHAR, devmajor=4095, devminor=(1 << 20) - 1)])
    with pytest.raises(LayerError, match="device number"):
        plan([E("dev/bad", K.BLOCK, devmajor=1 << 12, devminor=0)])


@pytest.mark.parametrize("entry", [
    E("s", K.SYMLINK, linkname="a\0b"), E("s", K.SYMLINK, linkname=""),
    E("f", xattrs=(("user.a\0b", b"v"),)), E("f", xattrs=(("", b"v"),))])
def test_values_no_syscall_takes_are_rejected(entry: IndexEntry) -> None:
    with pytest.raises(LayerError, match=f"path '{entry.path}'"):
        plan([entry])
