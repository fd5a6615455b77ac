"""The real Debian image (debootstrap + apt + deletions) exported to dir and tar must match the
ground truth listing recorded from the build directory itself."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from tests.flatten.support import (
    Listing,
    check_tar_consumers,
    dir_listing,
    export_cli,
    tar_listing,
)

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


def as_ground_truth(listing: Listing, groups: set[frozenset[str]]) -> dict[str, dict[str, Any]]:
    """Our listing in the shape of the image builder's listing.json (root excluded)."""
    group_of = {p: min(g, key=lambda s: s.encode("utf-8", "surrogateescape"))
                for g in groups for p in g}
    nlink = {p: len(g) for g in groups for p in g}
    out = {}
    for path, (kind, mode, uid, gid, mtime, size, link, sha, xattrs, dev) in listing.items():
        if path == ".":
            continue
        t = _TYPES[kind]
        out[path] = {
            "path": path, "type": t, "mode": mode, "uid": uid, "gid": gid,
            "size": size if t == "file" else len(link.encode("utf-8", "surrogateescape"))
            if t == "symlink" else None,
            "sha256": sha or None, "target": link if t == "symlink" else None,
            "hardlink": group_of.get(path), "nlink": nlink.get(path, 1) if t == "file" else None,
            # the ground truth has whole seconds: any sub-second part is a mismatch
            "mtime": mtime // 10**9 if not mtime % 10**9 else mtime / 10**9, "rdev": list(dev) if t in ("char", "block") else None,
            "xattrs": {k: v.hex() for k, v in xattrs},
        }
    return out


def _diff(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> list[str]:
    problems = [f"missing: {p}" for p in sorted(set(want) - set(got))]
    problems += [f"unexpected: {p}" for p in sorted(set(got) - set(want))]
    for p in sorted(set(got) & set(want)):
        for k, v in want[p].items():
            if got[p].get(k) != v:
                problems.append(f"{p}: {k}: got {got[p].get(k)!r}, want {v!r}")
    return problems


@pytest.mark.slow
def test_debian_image_matches_ground_truth(debian_image: Any, tmp_path: Path,
                                           capsys: Any) -> None:
    cache = tmp_path / "cache"
    d, t = tmp_path / "rootfs", tmp_path / "rootfs.tar"
    rd = export_cli(debian_image.reference, d, "dir", cache, capsys)
    rt = export_cli(debian_image.reference, t, "tar", cache, capsys)
    want = debian_image.listing
    got_dir = as_ground_truth(*dir_listing(d))
    problems = _diff(got_dir, want)
    assert not problems, f"{len(problems)} differences, first: " + "\n".join(problems[:30])
    tl, tgroups, _ = tar_listing(t)
    got_tar = as_ground_truth(tl, tgroups)
    problems = _diff(got_tar, want)
    assert not problems, f"{len(problems)} differences, first: " + "\n".join(problems[:30])
    assert rd["counts"] == rt["counts"]
    assert rd["counts"]["entries"] == len(want) + 1
    assert rt["config"]["Cmd"] == debian_image.config["config"].get("Cmd")
    # GNU tar extracts the same tree; mke2fs -d - makes a clean filesystem of it
    work = tmp_path / "consumers"
    work.mkdir()
    check_tar_consumers(t, work, tl)
